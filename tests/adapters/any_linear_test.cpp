// Tests for rankwise/adapters/any_linear.hpp, rankwise/adapters/factory.hpp,
// rankwise/adapters/lora_export.hpp and rankwise/core/memory.hpp.
#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/adapters/factory.hpp>
#include <rankwise/adapters/lora_export.hpp>
#include <rankwise/core/memory.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/rank/module.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/borrowing.hpp"
#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <map>
#include <memory>
#include <string>
#include <vector>

using rankwise::AdapterSpec;
using rankwise::AnyLinear;
using rankwise::Index;
using rankwise::Linear;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

namespace {
// Gives every trainable tensor of a slot random values (B = 0 would hide bugs and make deltas zero).
template <typename Scalar>
void randomize_trainable(AnyLinear<Scalar>& slot, Random& rng) {
  for (rankwise::Parameter<Scalar>* p : slot.parameters())
    if (p->trainable) p->value = random_matrix<Scalar>(p->value.rows(), p->value.cols(), rng);
}

template <typename Scalar>
rankwise::AdapterContext<Scalar> context_for(Index in, Index out, Random& rng) {
  return {rankwise::VeRAProjections<Scalar>::make(16, in, out, rng)};
}
}  // namespace

TEST_CASE("LoRAFactors: LoRA's export folds the gates into A and equals its delta", "[adapters][lora_export]") {
  Random rng(1);
  rankwise::LoRA<float> lora(Linear<float>(20, 12, rng), {.rank = 4, .alpha = 8.0}, rng);
  lora.B_parameter().value = random_matrix<float>(12, 4, rng);
  lora.set_gate(1, 0.0);
  lora.set_gate(2, 0.5);
  const rankwise::LoRAFactors<float> f = rankwise::lora_factors(lora);
  CHECK(f.rank() == 4);
  CHECK(f.scale == Approx(2.0));
  CHECK(f.alpha() == Approx(8.0));
  CHECK(f.A.row(1).isZero(0.0f));
  const Matrix<float> delta = lora.delta_weight();
  CHECK(double((f.delta_weight() - delta).norm()) <= 1e-6 * double(delta.norm()));
}

TEST_CASE("make_linear: every name builds its layer, with typed access", "[adapters][factory]") {
  Random rng(2);
  const auto context = context_for<float>(16, 16, rng);
  AnyLinear<float> linear = rankwise::make_linear(Linear<float>(16, 16, rng), {.name = "linear"}, rng, context);
  AnyLinear<float> lora = rankwise::make_linear(Linear<float>(16, 16, rng), {.name = "lora"}, rng, context);
  AnyLinear<float> dylora = rankwise::make_linear(
      Linear<float>(16, 16, rng), {.name = "dylora", .options = rankwise::DyLoRAOptions{.max_rank = 4}}, rng, context);
  AnyLinear<float> erat = rankwise::make_linear(Linear<float>(16, 16, rng), {.name = "erat"}, rng, context);
  AnyLinear<float> vera = rankwise::make_linear(Linear<float>(16, 16, rng), {.name = "vera"}, rng, context);
  AnyLinear<float> red = rankwise::make_linear(Linear<float>(16, 16, rng), {.name = "red"}, rng, context);
  AnyLinear<float> melora = rankwise::make_linear(
      Linear<float>(16, 16, rng), {.name = "melora", .options = rankwise::MELoRAOptions{.n = 4, .mini_rank = 2}}, rng,
      context);
  CHECK(linear.kind() == "linear");
  CHECK(linear.get_if<Linear<float>>() != nullptr);
  CHECK(lora.as<rankwise::LoRA<float>>().rank() == 8);  // LoRAOptions' defaults
  CHECK(dylora.as<rankwise::DyLoRA<float>>().max_rank() == 4);
  CHECK(erat.kind() == "erat");
  CHECK(erat.get_if<rankwise::DyLoRA<float>>() != nullptr);
  CHECK(vera.as<rankwise::VeRA<float>>().shared_projections() == context.vera_projections);
  CHECK(red.get_if<rankwise::RED<float>>() != nullptr);
  CHECK(melora.as<rankwise::MELoRA<float>>().n() == 4);
  // Typed access to the wrong type: nullptr, or an exception naming the slot.
  CHECK(lora.get_if<rankwise::VeRA<float>>() == nullptr);
  CHECK_THROWS_WITH(red.as<rankwise::LoRA<float>>(),
                    Catch::Contains("[rankwise::AnyLinear]") && Catch::Contains("holds a \"red\""));
  const AnyLinear<float>& const_slot = melora;
  CHECK(const_slot.get_if<rankwise::MELoRA<float>>() != nullptr);
  // Counts come through the interface.
  CHECK(linear.trainable_parameter_count() == 16 * 16 + 16);  // a trainable Linear, as given
  CHECK(lora.trainable_parameter_count() == 8 * 32);
  CHECK(vera.trainable_parameter_count() == 16 + 16);
  CHECK(red.trainable_parameter_count() == 32);
  CHECK(melora.trainable_parameter_count() == 2 * 32);
  for (const auto name : rankwise::adapter_names()) CHECK(rankwise::is_adapter_name(name));
  CHECK_FALSE(rankwise::is_adapter_name("alora"));
}

TEST_CASE("AnyLinear: each kind behaves as the layer it holds, gradients included", "[adapters][any_linear][gradcheck]") {
  Random rng(3);
  const auto context = context_for<double>(8, 8, rng);
  const Matrix<double> x = random_matrix<double>(8, 3, rng);
  const std::vector<AdapterSpec> specs = {
      {"linear", {}},
      {"lora", rankwise::LoRAOptions{.rank = 2, .alpha = 4.0}},
      {"dylora", rankwise::DyLoRAOptions{.max_rank = 3, .frozen = false}},
      {"erat", rankwise::DyLoRAOptions{.max_rank = 3}},
      {"vera", {}},
      {"red", {}},
      {"melora", rankwise::MELoRAOptions{.n = 2, .mini_rank = 1}}};
  for (const AdapterSpec& spec : specs) {
    AnyLinear<double> slot = rankwise::make_linear(Linear<double>(8, 8, rng), spec, rng, context);
    randomize_trainable(slot, rng);
    const auto result = rankwise::testing::check_gradients(slot, x, rng);
    INFO(spec.name << ": " << result.worst);
    CHECK(result.max_error < 1e-7);
    CHECK(slot.in_features() == 8);
    CHECK(slot.out_features() == 8);
    CHECK(slot.is_training());
    slot.set_training(false);
    CHECK_FALSE(slot.is_training());
  }
}

TEST_CASE("AnyLinear: forward_borrowed and backward_parameters_only match forward and backward for every kind",
          "[adapters][any_linear]") {
  Random context_rng(4);
  const auto context = context_for<float>(8, 6, context_rng);
  const std::vector<AdapterSpec> specs = {
      {"linear", {}}, {"lora", rankwise::LoRAOptions{.rank = 2, .alpha = 4.0}},  // their own lean calls
      {"dylora", rankwise::DyLoRAOptions{.max_rank = 3, .frozen = false}}, {"vera", {}}, {"red", {}}};  // fallbacks
  for (const AdapterSpec& spec : specs) {
    Random rng_a(5), rng_b(5);  // two identical slots
    AnyLinear<float> plain = rankwise::make_linear(Linear<float>(8, 6, rng_a), spec, rng_a, context);
    AnyLinear<float> lean = rankwise::make_linear(Linear<float>(8, 6, rng_b), spec, rng_b, context);
    randomize_trainable(plain, rng_a);
    randomize_trainable(lean, rng_b);
    const Matrix<float> x = random_matrix<float>(8, 5, rng_a), dy = random_matrix<float>(6, 5, rng_a);
    Matrix<float> y1, y2, dx;
    plain.forward(x, y1);
    plain.backward(dy, dx);
    lean.forward_borrowed(x, y2);
    lean.backward_parameters_only(dy);
    INFO(spec.name);
    CHECK(y1 == y2);
    const auto p1 = plain.parameters(), p2 = lean.parameters();
    REQUIRE(p1.size() == p2.size());
    for (std::size_t i = 0; i < p1.size(); ++i)
      if (p1[i]->trainable) CHECK(p1[i]->grad == p2[i]->grad);
  }
  static_assert(!rankwise::test_support::BorrowsTemporaries<AnyLinear<float>>);
}

TEST_CASE("AnyLinear: merge, and the exact plain-LoRA export, through the interface", "[adapters][any_linear]") {
  Random rng(4);
  const auto context = context_for<float>(24, 24, rng);
  const Matrix<float> x = random_matrix<float>(24, 5, rng);
  for (const std::string name : {"lora", "dylora", "erat", "vera", "red", "melora"}) {
    AnyLinear<float> slot = rankwise::make_linear(Linear<float>(24, 24, rng), {.name = name}, rng, context);
    randomize_trainable(slot, rng);
    slot.set_training(false);
    INFO(name);
    REQUIRE(slot.is_mergeable());
    Matrix<float> y_adapted, y_merged, y_after;
    slot.forward(x, y_adapted);
    const Matrix<float> base_weight = slot.parameters().front()->value;
    slot.merge();
    CHECK(slot.is_merged());
    slot.forward(x, y_merged);
    CHECK_THAT(y_merged, is_close_to(y_adapted, 1e-4, 1e-4));
    const Matrix<float> delta = slot.parameters().front()->value - base_weight;
    slot.unmerge();
    CHECK_FALSE(slot.is_merged());
    slot.forward(x, y_after);
    CHECK(y_after == y_adapted);
    const std::optional<rankwise::LoRAFactors<float>> f = slot.lora_factors();
    CHECK(f.has_value() == (name != "red"));  // RED's edit is not low-rank
    if (f) CHECK(double((f->delta_weight() - delta).norm()) <= 1e-5 * double(delta.norm()));
  }
  AnyLinear<float> linear(Linear<float>(4, 4, rng));
  CHECK_FALSE(linear.is_mergeable());
  CHECK_FALSE(linear.lora_factors().has_value());
  CHECK_THROWS_WITH(linear.merge(),
                    Catch::Contains("[rankwise::AnyLinear]") && Catch::Contains("\"linear\" slot cannot be merged"));
  CHECK_THROWS_AS(linear.unmerge(), rankwise::StateError);
}

TEST_CASE("AnyLinear: parameters() and the accessors carry an adapter's whole state", "[adapters][any_linear]") {
  // What a file round trip needs, without files: copy every named tensor (and the non-tensor state)
  // into an adapter built from another seed, and the two compute the same, bit for bit.
  for (const std::string name : {"linear", "lora", "dylora", "erat", "vera", "red", "melora"}) {
    INFO(name);
    Random rng_a(1), rng_b(2);
    const rankwise::AdapterOptions options =
        name == "melora" ? rankwise::AdapterOptions{rankwise::MELoRAOptions{.n = 2, .mini_rank = 2}}
                         : rankwise::AdapterOptions{};
    auto bank_a = rankwise::VeRAProjections<double>::make(16, 12, 12, rng_a);
    AnyLinear<double> a = rankwise::make_linear(Linear<double>(12, 12, rng_a), {name, options}, rng_a, {bank_a});
    randomize_trainable(a, rng_a);
    a.set_path("layers.1.mlp.down_proj");
    // The bank travels as its two matrices.
    auto bank_b = std::make_shared<const rankwise::VeRAProjections<double>>(bank_a->A(), bank_a->B());
    AnyLinear<double> b = rankwise::make_linear(Linear<double>(12, 12, rng_b), {name, options}, rng_b, {bank_b});
    b.set_path("layers.1.mlp.down_proj");
    std::map<std::string, rankwise::Parameter<double>*> by_name;
    for (auto* p : b.parameters()) by_name[p->name] = p;
    REQUIRE(by_name.size() == a.parameters().size());
    for (const auto* p : a.parameters()) {
      REQUIRE(by_name.count(p->name) == 1);
      rankwise::Parameter<double>& target = *by_name[p->name];
      CHECK(target.trainable == p->trainable);
      REQUIRE(target.value.rows() == p->value.rows());
      REQUIRE(target.value.cols() == p->value.cols());
      target.value = p->value;
    }
    if (auto* dylora = a.get_if<rankwise::DyLoRA<double>>()) {
      dylora->set_window(1, 5);
      b.as<rankwise::DyLoRA<double>>().set_window(dylora->window_begin(), dylora->active_rank());
    }
    const Matrix<double> x = random_matrix<double>(12, 4, rng_a);
    Matrix<double> ya, yb;
    a.set_training(false);
    b.set_training(false);
    a.forward(x, ya);
    b.forward(x, yb);
    CHECK(ya == yb);
  }
}

TEST_CASE("AnyLinear: a rank allocator reaches LoRA's ranks through typed access", "[adapters][any_linear]") {
  Random rng(5);
  AnyLinear<double> slot =
      rankwise::make_linear(Linear<double>(10, 10, rng), {"lora", rankwise::LoRAOptions{.rank = 4}}, rng);
  randomize_trainable(slot, rng);
  slot.set_path("layers.0.attn.q_proj");
  rankwise::RankModule<double> ranks(slot.as<rankwise::LoRA<double>>(), "layers.0.attn.q_proj");
  CHECK(ranks.rank() == 4);
  CHECK(ranks.in_features() == 10);
  ranks.set_gate(2, 0.0);
  CHECK(slot.as<rankwise::LoRA<double>>().gate(2) == 0.0);
  ranks.reset_gates();
  CHECK(slot.as<rankwise::LoRA<double>>().gate(2) == 1.0);
  const std::vector<Index> gone = {1, 3};
  const rankwise::RankChange removed = ranks.remove_ranks(gone);
  CHECK(removed.changes.front().parameter == "layers.0.attn.q_proj.lora_A.weight");
  ranks.add_ranks(1, rng);
  CHECK(slot.as<rankwise::LoRA<double>>().rank() == 3);
  // The slot's own interface sees the new shapes (the layer was changed in place, not copied).
  Matrix<double> x = Matrix<double>::Random(10, 3), y;
  slot.forward(x, y);
  CHECK(y.rows() == 10);
  CHECK(slot.trainable_parameter_count() == 3 * (10 + 10));
  // Other kinds hold no LoRA: typed access refuses them.
  const auto context = context_for<double>(10, 10, rng);
  for (const std::string name : {"linear", "dylora", "vera", "red", "melora"}) {
    AnyLinear<double> other = rankwise::make_linear(Linear<double>(10, 10, rng),
                                                    {.name = name, .options = name == "melora"
                                                                                 ? rankwise::AdapterOptions{rankwise::MELoRAOptions{.mini_rank = 2}}
                                                                                 : rankwise::AdapterOptions{}},
                                                    rng, context);
    CHECK(other.get_if<rankwise::LoRA<double>>() == nullptr);
    CHECK_THROWS_AS(other.as<rankwise::LoRA<double>>(), rankwise::InvalidArgument);
  }
}

TEST_CASE("AnyLinear: moving a slot keeps its parameters where the optimizer holds them", "[adapters][any_linear]") {
  Random rng(6);
  std::vector<AnyLinear<float>> slots;
  slots.push_back(rankwise::make_linear(Linear<float>(6, 6, rng), {"lora", rankwise::LoRAOptions{.rank = 2}}, rng));
  slots.front().set_path("a");
  const rankwise::Parameter<float>* A = slots.front().parameters()[2];
  for (int i = 0; i < 8; ++i) {  // reallocations move the slots
    slots.push_back(rankwise::make_linear(Linear<float>(6, 6, rng), {"red", {}}, rng));
    slots.back().set_path(std::to_string(i) + ".red");
  }
  CHECK(slots.front().parameters()[2] == A);
  CHECK(A->name == "a.lora_A.weight");
  std::vector<rankwise::Parameter<float>*> params;
  for (AnyLinear<float>& slot : slots)
    for (auto* p : slot.parameters()) params.push_back(p);
  rankwise::AdamW<float> opt(params, {});  // names are unique thanks to set_path
  AnyLinear<float> moved = std::move(slots.front());
  CHECK(moved.parameters()[2] == A);
  CHECK_THROWS_WITH(slots.front().in_features(), Catch::Contains("moved from"));
}

TEST_CASE("MemoryReport: VeRA's shared bank appears once in a model's report", "[core][memory]") {
  Random rng(7);
  const auto context = context_for<float>(32, 32, rng);  // r = 16
  rankwise::MemoryReport report;
  std::vector<AnyLinear<float>> model;
  for (int i = 0; i < 4; ++i) {
    model.push_back(rankwise::make_linear(Linear<float>(32, 32, rng, {.trainable = false}), {"vera", {}}, rng, context));
    report.add_layer(model.back());
  }
  CHECK(report.shared_tensors() == 2);
  CHECK(report.shared() == 16 * (32 + 32));
  CHECK(report.trainable() == 4 * (32 + 16));
  CHECK(report.frozen() == 4 * (32 * 32 + 32));
  CHECK(report.bytes() == 4 * report.total());
  CHECK(model[0].shared_parameters().size() == 2);
  CHECK(model[0].shared_parameters()[0] == model[3].shared_parameters()[0]);
}

TEST_CASE("make_linear: unknown names, mismatched options and a missing bank are rejected", "[adapters][factory][errors]") {
  Random rng(0);
  Linear<float> base(8, 8, rng);
  CHECK_THROWS_WITH(rankwise::make_linear(base, {.name = "vera2"}, rng),
                    Catch::Contains("[rankwise::make_linear]") && Catch::Contains("must be one of") &&
                        Catch::Contains("\"melora\"") && Catch::Contains("(got \"vera2\")"));
  CHECK_THROWS_AS(rankwise::make_linear(base, {.name = ""}, rng), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(rankwise::make_linear(base, {"lora", rankwise::MELoRAOptions{}}, rng),
                    Catch::Contains("adapter \"lora\" takes LoRAOptions (got MELoRAOptions)"));
  CHECK_THROWS_WITH(rankwise::make_linear(base, {"linear", rankwise::REDOptions{}}, rng),
                    Catch::Contains("\"linear\" takes no options (got REDOptions)"));
  CHECK_THROWS_WITH(rankwise::make_linear(base, {.name = "vera"}, rng),
                    Catch::Contains("context.vera_projections (got none)"));
  // The adapter's own checks still speak.
  CHECK_THROWS_WITH(rankwise::make_linear(base, {"melora", rankwise::MELoRAOptions{.n = 3}}, rng),
                    Catch::Contains("[rankwise::MELoRA]"));
  CHECK_THROWS_WITH(AnyLinear<float>("", base), Catch::Contains("kind must be a non-empty name"));
}

static_assert(rankwise::Layer<AnyLinear<double>>);
