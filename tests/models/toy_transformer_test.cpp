// Tests for rankwise/models/toy_transformer.hpp and rankwise/models/adapter_set.hpp.
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/vera.hpp>
#include <rankwise/layers/cross_entropy.hpp>
#include <rankwise/models/adapter_set.hpp>
#include <rankwise/models/tasks.hpp>
#include <rankwise/models/toy_transformer.hpp>
#include <rankwise/optim/adamw.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

using rankwise::Index;
using rankwise::InjectionOptions;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::ToyTransformer;
using rankwise::ToyTransformerConfig;

namespace {
const ToyTransformerConfig kToyModel{.vocab = 11, .d_model = 8, .heads = 2, .layers = 2, .d_ff = 12, .max_seq_len = 5};

struct Data {
  std::vector<std::int32_t> tokens, targets;
};

Data tiny_data(Random& rng, Index batch, Index seq_len, Index vocab) {
  Data d;
  for (Index i = 0; i < batch * seq_len; ++i) {
    d.tokens.push_back(std::int32_t(rng.uniform_int(0, vocab - 1)));
    d.targets.push_back(i % 3 == 1 ? rankwise::ignore_index : std::int32_t(rng.uniform_int(0, vocab - 1)));
  }
  return d;
}

double loss_of(ToyTransformer<double>& model, const Data& d, Index seq_len) {
  Matrix<double> logits;
  model.forward(d.tokens, seq_len, logits);
  rankwise::CrossEntropy<double> ce;
  return ce.forward(logits, d.targets);
}

// Worst |analytic - numeric| / max(1, |numeric|) over every trainable scalar of the model.
double model_gradient_error(ToyTransformer<double>& model, const Data& d, Index seq_len, Index* checked) {
  model.set_training(true);
  Matrix<double> logits, dlogits;
  model.forward(d.tokens, seq_len, logits);
  rankwise::CrossEntropy<double> ce;
  ce.forward(logits, d.targets);
  ce.backward(dlogits);
  model.zero_grad();
  model.backward(dlogits);
  double worst = 0.0;
  *checked = 0;
  for (rankwise::Parameter<double>* p : model.parameters()) {
    if (!p->trainable) continue;
    const Matrix<double> analytic = p->grad;
    const Matrix<double> numeric =
        rankwise::test_support::central_differences(p->value, [&] { return loss_of(model, d, seq_len); });
    for (Index i = 0; i < p->value.size(); ++i) {
      const double n = numeric.data()[i];
      worst = std::max(worst, std::abs(analytic.data()[i] - n) / std::max(1.0, std::abs(n)));
      ++*checked;
    }
  }
  return worst;
}

void randomize_trainable(ToyTransformer<double>& model, Random& rng) {
  for (rankwise::Parameter<double>* p : model.parameters())
    if (p->trainable && p->value.isZero(0.0)) rankwise::fill_normal(p->value, 0.0, 0.3, rng);
}
}  // namespace

TEST_CASE("ToyTransformer: the whole model's backward matches finite differences", "[models][toy_transformer][gradcheck]") {
  Random rng(1);
  ToyTransformer<double> model(kToyModel, rng);
  const Data d = tiny_data(rng, 2, 5, 11);
  Index checked = 0;
  const double err = model_gradient_error(model, d, 5, &checked);
  CHECK(err < 1e-6);
  CHECK(checked == rankwise::count_trainable(model.parameters()));
  CHECK(checked > 1000);
}

TEST_CASE("ToyTransformer: gradients stay right with adapters injected", "[models][toy_transformer][gradcheck]") {
  for (const char* name : {"lora", "dylora", "vera", "red", "melora"}) {
    Random rng(2);
    ToyTransformer<double> model(kToyModel, rng);
    InjectionOptions options;
    options.adapter.name = name;
    if (std::string(name) == "lora") options.adapter.options = rankwise::LoRAOptions{.rank = 2, .alpha = 4.0};
    if (std::string(name) == "dylora") options.adapter.options = rankwise::DyLoRAOptions{.max_rank = 3, .frozen = false};
    if (std::string(name) == "melora") options.adapter.options = rankwise::MELoRAOptions{.n = 2, .mini_rank = 1};
    if (std::string(name) == "vera") options.vera_rank = 4;
    if (std::string(name) != "red") options.all_linear = true;
    rankwise::inject(model, options, rng);
    randomize_trainable(model, rng);  // zero-initialised B (and VeRA's b) would hide bugs
    const Data d = tiny_data(rng, 2, 4, 11);
    Index checked = 0;
    const double err = model_gradient_error(model, d, 4, &checked);
    INFO(name << ": " << checked << " values checked");
    CHECK(err < 1e-6);
    CHECK(checked > 0);
  }
}

TEST_CASE("ToyTransformer: under frozen embeddings the first block skips its input gradient, nothing else changes",
          "[models][toy_transformer]") {
  // Two identical LoRA models; in the second the embeddings learn, so its first block computes the
  // input gradient in full. Every adapter gradient must agree bit for bit.
  const auto build = [](bool embeddings_learn) {
    Random rng(6);
    ToyTransformer<double> model(kToyModel, rng);
    InjectionOptions options;
    options.all_linear = true;
    options.adapter.options = rankwise::LoRAOptions{.rank = 2, .alpha = 4.0};
    rankwise::inject(model, options, rng);
    randomize_trainable(model, rng);
    for (rankwise::Parameter<double>* p : model.parameters())
      if (p->name.rfind("embed_", 0) == 0) {
        p->trainable = embeddings_learn;
        p->zero_grad();
      }
    return model;
  };
  ToyTransformer<double> lean = build(false), complete = build(true);
  Random rng(7);
  const Data d = tiny_data(rng, 2, 4, 11);
  for (ToyTransformer<double>* model : {&lean, &complete}) {
    Matrix<double> logits, dlogits;
    model->forward(d.tokens, 4, logits);
    rankwise::CrossEntropy<double> ce;
    ce.forward(logits, d.targets);
    ce.backward(dlogits);
    model->zero_grad();
    model->backward(dlogits);
  }
  const auto a = lean.parameters(), b = complete.parameters();
  REQUIRE(a.size() == b.size());
  Index adapters = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!a[i]->trainable) continue;
    INFO(a[i]->name);
    CHECK(a[i]->grad == b[i]->grad);
    ++adapters;
  }
  CHECK(adapters == 2 * 6 * kToyModel.layers);  // lora_A and lora_B of every projection
  for (rankwise::Parameter<double>* p : b)
    if (p->name.rfind("embed_", 0) == 0) CHECK_FALSE(p->grad.isZero(0.0));  // the full path did run
}

TEST_CASE("inject: each pattern kind selects exactly the intended modules", "[models][injection]") {
  Random rng(3);
  ToyTransformer<float> model({.vocab = 16, .d_model = 8, .heads = 2, .layers = 3, .d_ff = 8, .max_seq_len = 4}, rng);
  const auto select = [&](InjectionOptions o) { return rankwise::select_targets(rankwise::slot_paths<float>(model), o); };
  InjectionOptions suffix;
  suffix.target_modules = {"q_proj", "attn.v_proj"};
  CHECK(select(suffix) == std::vector<std::string>{"layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj",
                                                   "layers.1.attn.v_proj", "layers.2.attn.q_proj", "layers.2.attn.v_proj"});
  InjectionOptions partial;
  partial.target_modules = {"proj"};  // not a whole name: matches nothing
  CHECK(select(partial).empty());
  InjectionOptions regex;
  regex.target_regex = R"(layers\.[12]\.mlp\..*)";
  CHECK(select(regex) == std::vector<std::string>{"layers.1.mlp.up_proj", "layers.1.mlp.down_proj",
                                                  "layers.2.mlp.up_proj", "layers.2.mlp.down_proj"});
  InjectionOptions all;
  all.all_linear = true;
  CHECK(select(all).size() == 18);  // six per block, lm_head excluded
  InjectionOptions red;
  red.adapter.name = "red";
  CHECK(select(red) == std::vector<std::string>{"layers.0.mlp.down_proj", "layers.1.mlp.down_proj", "layers.2.mlp.down_proj"});
}

TEST_CASE("inject: everything not adapted is frozen, with per-module ranks", "[models][injection]") {
  Random rng(4);
  ToyTransformer<float> model({.vocab = 16, .d_model = 8, .heads = 2, .layers = 2, .d_ff = 8, .max_seq_len = 4}, rng);
  InjectionOptions o;
  o.target_modules = {"q_proj", "v_proj"};
  o.adapter.options = rankwise::LoRAOptions{.rank = 2, .alpha = 4.0};
  o.rank_pattern = {{"layers.1.attn.v_proj", 4}};
  const auto injection = rankwise::inject(model, o, rng);
  REQUIRE(injection.size() == 4);
  CHECK(injection.modules()[3].path == "layers.1.attn.v_proj");
  CHECK(injection.modules()[3].slot->as<rankwise::LoRA<float>>().rank() == 4);
  CHECK(injection.modules()[0].slot->as<rankwise::LoRA<float>>().rank() == 2);
  for (rankwise::Parameter<float>* p : model.parameters()) {
    const bool adapter = p->name.find("lora_") != std::string::npos;
    INFO(p->name);
    CHECK(p->trainable == adapter);
  }
  const rankwise::ParameterSummary s = rankwise::summarize_parameters(model);
  CHECK(s.trainable == 3 * 2 * (8 + 8) + 4 * (8 + 8));
  CHECK_THAT(s.to_string(), Catch::StartsWith("trainable params: 160 || all params: "));
}

TEST_CASE("inject: bad patterns and names are rejected without changing the model", "[models][injection][errors]") {
  Random rng(5);
  ToyTransformer<float> model({.vocab = 16, .d_model = 8, .heads = 2, .layers = 1, .d_ff = 8, .max_seq_len = 4}, rng);
  InjectionOptions none;
  none.target_modules = {"c_attn"};
  CHECK_THROWS_WITH(rankwise::inject(model, none, rng),
                    Catch::Contains("matches no module") && Catch::Contains("layers.0.attn.q_proj") &&
                        Catch::Contains("lm_head"));
  InjectionOptions unknown;
  unknown.all_linear = true;
  unknown.adapter.name = "ia3";
  CHECK_THROWS_WITH(rankwise::inject(model, unknown, rng), Catch::Contains("got \"ia3\""));
  InjectionOptions two;
  two.all_linear = true;
  two.target_modules = {"q_proj"};
  CHECK_THROWS_WITH(rankwise::inject(model, two, rng), Catch::Contains("exactly one of"));
  InjectionOptions bad_regex;
  bad_regex.target_regex = "(";
  CHECK_THROWS_WITH(rankwise::inject(model, bad_regex, rng), Catch::Contains("not a valid regular expression"));
  InjectionOptions too_big;
  too_big.all_linear = true;
  too_big.adapter.options = rankwise::LoRAOptions{.rank = 9};
  CHECK_THROWS_WITH(rankwise::inject(model, too_big, rng), Catch::Contains("module 'layers.0.attn.q_proj'"));
  for (const std::string& path : model.linear_paths()) CHECK(model.linear(path).kind() == "linear");
  for (rankwise::Parameter<float>* p : model.parameters()) CHECK(p->trainable);
}

TEST_CASE("ToyTransformer: bad input is rejected", "[models][toy_transformer][errors]") {
  Random rng(6);
  ToyTransformer<float> model({.vocab = 16, .d_model = 8, .heads = 2, .layers = 1, .d_ff = 8, .max_seq_len = 4}, rng);
  Matrix<float> logits;
  const std::vector<std::int32_t> long_seq(5, 1), bad_id = {1, 2, 16, 3};
  CHECK_THROWS_WITH(model.forward(long_seq, 5, logits), Catch::Contains("seq_len must be in [1, max_seq_len] = [1, 4] (got 5)"));
  CHECK_THROWS_WITH(model.forward(bad_id, 4, logits), Catch::Contains("[0, 16) (got 16)"));
  CHECK_THROWS_WITH(model.linear("layers.7.attn.q_proj"), Catch::Contains("no linear module at path"));
  CHECK_THROWS_AS(ToyTransformer<float>({.d_model = 10, .heads = 3}, rng), rankwise::InvalidArgument);
}

TEST_CASE("ToyTransformer: copy_parameters_from gives the same model, or refuses and changes nothing", "[models][toy_transformer]") {
  Random rng(8);
  ToyTransformer<double> a(kToyModel, rng), b(kToyModel, rng);
  const Data d = tiny_data(rng, 2, 4, kToyModel.vocab);
  Matrix<double> ya, yb;
  a.set_training(false);
  b.set_training(false);
  a.forward(d.tokens, 4, ya);
  b.forward(d.tokens, 4, yb);
  REQUIRE_FALSE(ya == yb);
  b.copy_parameters_from(a);
  b.forward(d.tokens, 4, yb);
  CHECK(ya == yb);

  ToyTransformerConfig wider = kToyModel;
  wider.d_ff = 16;
  ToyTransformer<double> other(wider, rng);
  CHECK_THROWS_WITH(other.copy_parameters_from(a), Catch::Contains("the same configuration"));
  InjectionOptions lora;
  lora.target_modules = {"q_proj"};
  lora.adapter.name = "lora";
  lora.adapter.options = rankwise::LoRAOptions{.rank = 2, .alpha = 4.0};
  rankwise::inject(b, lora, rng);
  const Matrix<double> before = b.parameters().front()->value;
  rankwise::fill_normal(a.parameters().front()->value, 0.0, 1.0, rng);
  CHECK_THROWS_WITH(b.copy_parameters_from(a), Catch::Contains("the same tensors"));
  CHECK(b.parameters().front()->value == before);
}

TEST_CASE("ToyTransformer: fine-tuning lowers the loss for every adapter, frozen weights never move, and a seed reproduces the curve",
          "[models][toy_transformer][finetune]") {
  const auto run = [](const std::string& name, std::vector<double>* curve, bool* frozen_unchanged) {
    Random rng(7);
    ToyTransformer<float> model({.vocab = 48, .d_model = 16, .heads = 2, .layers = 2, .d_ff = 32, .max_seq_len = 19}, rng);
    InjectionOptions o;
    o.adapter.name = name;
    if (name == "lora") o.adapter.options = rankwise::LoRAOptions{.rank = 4, .alpha = 8.0};
    if (name == "dylora" || name == "erat") o.adapter.options = rankwise::DyLoRAOptions{.max_rank = 4, .frozen = false};
    if (name == "melora") o.adapter.options = rankwise::MELoRAOptions{.n = 2, .mini_rank = 2};
    if (name == "vera") o.vera_rank = 16;
    if (name != "red") o.all_linear = true;
    rankwise::inject(model, o, rng);
    std::vector<std::pair<std::string, Matrix<float>>> frozen;
    for (rankwise::Parameter<float>* p : model.parameters())
      if (!p->trainable) frozen.emplace_back(p->name, p->value);
    std::vector<rankwise::Parameter<float>*> params = model.parameters();
    rankwise::AdamW<float> opt(params, {.lr = name == "red" || name == "vera" ? 1e-2 : 3e-3, .weight_decay = 0.0});
    rankwise::TaskGenerator task(rankwise::TaskKind::Copy, {.vocab = 48, .seq_len = 19, .letters = 8});
    Matrix<float> logits, dlogits;
    rankwise::CrossEntropy<float> ce;
    for (int step = 0; step < 40; ++step) {
      const rankwise::TokenBatch batch = task.sample(8, rng);
      model.zero_grad();
      model.forward(batch.tokens, batch.seq_len, logits);
      curve->push_back(ce.forward(logits, batch.targets));
      ce.backward(dlogits);
      model.backward(dlogits);
      opt.step();
    }
    *frozen_unchanged = true;
    std::size_t k = 0;
    for (rankwise::Parameter<float>* p : model.parameters())
      if (!p->trainable) *frozen_unchanged = *frozen_unchanged && p->value == frozen[k++].second;
  };
  for (const std::string name : {"lora", "dylora", "vera", "red", "melora"}) {
    std::vector<double> curve, again;
    bool unchanged = false, unchanged_again = false;
    run(name, &curve, &unchanged);
    run(name, &again, &unchanged_again);
    const double first = (curve[0] + curve[1] + curve[2]) / 3, last = (curve[37] + curve[38] + curve[39]) / 3;
    INFO(name << ": loss " << first << " -> " << last);
    CHECK(last < 0.9 * first);
    CHECK(unchanged);
    CHECK(curve == again);
  }
}

TEST_CASE("inject: by hand, as docs/models/toy-transformer.md shows it", "[models][injection]") {
  Random rng(8);
  ToyTransformer<float> model({.vocab = 16, .d_model = 16, .heads = 2, .layers = 2, .d_ff = 32, .max_seq_len = 4}, rng);
  // [snippet: inject]
  rankwise::InjectionOptions options;
  options.adapter = {"lora", rankwise::LoRAOptions{.rank = 8, .alpha = 16.0}};
  options.target_modules = {"q_proj", "v_proj"};
  const rankwise::AdapterSet<float> adapters = rankwise::inject(model, options, rng);
  rankwise::LoRA<float>& q0 = adapters.slot("layers.0.attn.q_proj").as<rankwise::LoRA<float>>();
  // [snippet: inject]
  CHECK(adapters.size() == 4);
  CHECK(adapters.modules()[0].path == "layers.0.attn.q_proj");
  CHECK(q0.rank() == 8);
  CHECK(q0.scale() == 2.0);
}
