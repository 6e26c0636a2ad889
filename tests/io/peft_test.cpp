// Tests for rankwise/io/peft.hpp (and io/peft_config.hpp, io/named_adapter.hpp).
#include <rankwise/adapters/factory.hpp>
#include <rankwise/io/peft.hpp>

#include "support/matchers.hpp"
#include "support/temp_dir.hpp"
#include "support/paths.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <string>
#include <vector>

using rankwise::DType;
using rankwise::FormatError;
using rankwise::Index;
using rankwise::Linear;
using rankwise::LoRA;
using rankwise::LoRAOptions;
using rankwise::Matrix;
using rankwise::NamedAdapter;
using rankwise::PeftAlpha;
using rankwise::PeftConfig;
using rankwise::Random;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;
using rankwise::test_support::same_bits;
using rankwise::test_support::test_data_dir;
using rankwise::test_support::read_bytes;
using rankwise::test_support::read_text;
using rankwise::test_support::TempDir;
using rankwise::test_support::write_text;
using Catch::Contains;

namespace fs = std::filesystem;

namespace {


// A small "model": LoRA adapters on named linear layers, held at stable addresses.
struct Model {
  std::vector<std::unique_ptr<LoRA<float>>> layers;
  std::vector<NamedAdapter<LoRA<float>>> modules;

  void add(const std::string& path, Index in, Index out, const LoRAOptions& options, Random& rng) {
    layers.push_back(std::make_unique<LoRA<float>>(Linear<float>(in, out, rng), options, rng));
    layers.back()->set_path(path);
    modules.push_back({path, layers.back().get()});
  }
  LoRA<float>& at(std::size_t i) { return *layers[i]; }
};

// Four modules like two attention layers; B random so that the adapters do something.
Model make_model(Random& rng, const LoRAOptions& options = {.rank = 4, .alpha = 8.0}) {
  Model m;
  m.add("layers.0.attn.q_proj", 8, 8, options, rng);
  m.add("layers.0.mlp.up_proj", 8, 12, options, rng);
  m.add("layers.1.attn.q_proj", 8, 8, options, rng);
  m.add("layers.1.mlp.down_proj", 12, 8, options, rng);
  for (auto& layer : m.layers) layer->B_parameter().value = random_matrix<float>(layer->out_features(), layer->rank(), rng);
  return m;
}

// A model with the same layers (same base weights) but other adapter settings.
Model fresh_copy(const Model& source, Random& rng, const LoRAOptions& options = {.rank = 2, .alpha = 1.0}) {
  Model m;
  for (std::size_t i = 0; i < source.layers.size(); ++i) {
    m.layers.push_back(std::make_unique<LoRA<float>>(source.layers[i]->base(), options, rng));
    m.modules.push_back({source.modules[i].path, m.layers.back().get()});
  }
  return m;
}

Matrix<float> output(LoRA<float>& layer, const Matrix<float>& x) {
  Matrix<float> y;
  layer.set_training(false);
  layer.forward(x, y);
  return y;
}

// A copy of the golden PEFT directory that a test may modify.
fs::path copy_golden(const TempDir& dir) {
  const fs::path target = dir.path / "adapter";
  fs::copy(test_data_dir() / "peft_lora", target, fs::copy_options::recursive);
  return target;
}

}  // namespace

// --- reading PEFT's files ---------------------------------------------------------------------

TEST_CASE("parse_peft_config: reads PEFT's key set and ignores unknown keys", "[io][peft]") {
  const PeftConfig c = rankwise::parse_peft_config(read_text(test_data_dir() / "peft_lora/adapter_config.json"));
  CHECK(c.peft_type == "LORA");
  CHECK(c.r == 2);
  CHECK(c.lora_alpha == 4.0);
  CHECK(c.target_modules == std::vector<std::string>{"q_proj", "v_proj"});
  CHECK_FALSE(c.target_modules_regex);
  REQUIRE(c.rank_pattern.size() == 1);
  CHECK(c.rank_pattern[0].first == "layers.1.attn.v_proj");
  CHECK(c.rank_pattern[0].second == 1);
  CHECK(c.alpha_pattern[0].second == 3.0);
  CHECK(c.lora_dropout == 0.05);
  CHECK(c.task_type == std::string("CAUSAL_LM"));
  CHECK(c.base_model_name_or_path == std::string("toy-transformer"));
  CHECK(c.init_lora_weights == "true");
  CHECK(c.inference_mode);
  CHECK_FALSE(c.use_rslora);
}

TEST_CASE("parse_peft_config: PEFT's defaults and matching rules", "[io][peft]") {
  PeftConfig c = rankwise::parse_peft_config(R"({"peft_type": "LORA", "target_modules": ["q_proj"], "r": null})");
  CHECK(c.r == 8);
  CHECK(c.lora_alpha == 8.0);
  CHECK(rankwise::parse_peft_config(R"({"peft_type": "VERA"})").r == 256);
  CHECK(rankwise::peft_targets(c, "layers.0.attn.q_proj"));
  CHECK(rankwise::peft_targets(c, "q_proj"));
  CHECK_FALSE(rankwise::peft_targets(c, "layers.0.attn.xq_proj"));
  c = rankwise::parse_peft_config(
      R"({"peft_type": "LORA", "target_modules": ".*\\.(q|v)_proj", "exclude_modules": ["layers.1.attn.q_proj"],
          "rank_pattern": {"v_proj": 3, "layers.0.attn.v_proj": 5}, "alpha_pattern": {"^layers\\.1.*": 2}})");
  CHECK(rankwise::peft_targets(c, "layers.0.attn.q_proj"));
  CHECK_FALSE(rankwise::peft_targets(c, "layers.1.attn.q_proj"));  // excluded
  CHECK_FALSE(rankwise::peft_targets(c, "layers.0.attn.k_proj"));
  CHECK(rankwise::peft_rank_for(c, "layers.0.attn.v_proj") == 3);  // the first matching key wins
  CHECK(rankwise::peft_rank_for(c, "layers.0.attn.q_proj") == 8);
  CHECK(rankwise::peft_alpha_for(c, "layers.1.mlp.up_proj") == 2.0);
  CHECK(rankwise::peft_alpha_for(c, "layers.0.mlp.up_proj") == 8.0);
}

TEST_CASE("parse_peft_config: rejects values of the wrong type, naming the key and its offset",
          "[io][peft][errors]") {
  using rankwise::parse_peft_config;
  CHECK_THROWS_WITH(parse_peft_config("{\"r\": 4}", "c.json"), Contains("'c.json' at byte 0: \"peft_type\" must be given"));
  CHECK_THROWS_WITH(parse_peft_config(R"({"peft_type": "LORA", "r": 0})", "c.json"),
                    Contains("'c.json' at byte 22: \"r\" must be an integer >= 1 (got 0)"));
  CHECK_THROWS_WITH(parse_peft_config(R"({"peft_type": "LORA", "r": 2.5})"), Contains("\"r\" must be an integer >= 1 (got 2.5)"));
  CHECK_THROWS_WITH(parse_peft_config(R"({"peft_type": "LORA", "lora_alpha": "16"})"),
                    Contains("\"lora_alpha\" must be a number (got a string)"));
  CHECK_THROWS_WITH(parse_peft_config(R"({"peft_type": "LORA", "target_modules": [1]})"),
                    Contains("\"target_modules\" must list module names as strings"));
  CHECK_THROWS_WITH(parse_peft_config(R"({"peft_type": "LORA", "rank_pattern": {"q": -1}})"),
                    Contains("\"rank_pattern\" values must be integers >= 1 (got -1 for 'q')"));
  CHECK_THROWS_WITH(parse_peft_config(R"({"peft_type": "LORA", "alpha_pattern": []})"),
                    Contains("\"alpha_pattern\" must be an object"));
  CHECK_THROWS_WITH(parse_peft_config(R"({"peft_type": "LORA", "use_rslora": "yes"})"),
                    Contains("\"use_rslora\" must be true or false (got a string)"));
  CHECK_THROWS_WITH(parse_peft_config(R"({"peft_type": "LORA", "lora_dropout": 1.5})"),
                    Contains("\"lora_dropout\" must be in [0, 1) (got 1.5)"));
  CHECK_THROWS_WITH(parse_peft_config(R"({"peft_type": "LORA", "bias": "some"})"), Contains("\"bias\" must be"));
  CHECK_THROWS_WITH(parse_peft_config(R"({"peft_type": "LORA",)", "c.json"), Contains("'c.json' at byte") && Contains("not valid JSON"));
  CHECK_THROWS_WITH(parse_peft_config(std::string("{\"peft_type\": \"LORA\"}\0 x", 24)), Contains("at byte 21: not valid JSON (a NUL byte)"));
  CHECK_THROWS_WITH(parse_peft_config("[1, 2]"), Contains("the config must be a JSON object"));
  CHECK_THROWS_AS(parse_peft_config("{\"peft_type\": 3}"), FormatError);
  const PeftConfig bad_regex = parse_peft_config(R"({"peft_type": "LORA", "target_modules": "(q"})");
  CHECK_THROWS_WITH(rankwise::peft_targets(bad_regex, "q"), Contains("is not a valid regular expression"));
}

TEST_CASE("peft_targets: patterns from a file cannot hang or crash the loader", "[io][peft][errors]") {
  // Regressions: with std::regex the first pattern backtracked for hours on this path (nested
  // quantifiers) and the second overflowed the stack (deep nesting).
  using rankwise::parse_peft_config;
  const std::string path = std::string(48, 'a') + "!";
  const auto started = std::chrono::steady_clock::now();
  const PeftConfig nested = parse_peft_config(R"({"peft_type": "LORA", "target_modules": "(a+)+$"})");
  CHECK_FALSE(rankwise::peft_targets(nested, path));
  const PeftConfig alternation = parse_peft_config(R"({"peft_type": "LORA", "target_modules": "(a|a)*b"})");
  CHECK_FALSE(rankwise::peft_targets(alternation, path));
  const PeftConfig keys = parse_peft_config(R"({"peft_type": "LORA", "rank_pattern": {"(a*)*b": 4}, "r": 2})");
  CHECK(rankwise::peft_rank_for(keys, path) == 2);
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));  // a hang, not a speed goal

  const std::string deep = std::string(2000, '(') + "q" + std::string(2000, ')');
  const PeftConfig deep_config = parse_peft_config("{\"peft_type\": \"LORA\", \"target_modules\": \"" + deep + "\"}");
  CHECK(rankwise::peft_targets(deep_config, "q"));  // within the limits: compiled without recursion
  const std::string deeper = std::string(5000, '(') + "q" + std::string(5000, ')');
  const PeftConfig long_config = parse_peft_config("{\"peft_type\": \"LORA\", \"target_modules\": \"" + deeper + "\"}");
  CHECK_THROWS_AS(rankwise::peft_targets(long_config, "q"), FormatError);
  CHECK_THROWS_WITH(rankwise::peft_targets(long_config, "q"), Contains("more than the 4096 accepted"));
  const PeftConfig backreference = parse_peft_config(R"({"peft_type": "LORA", "target_modules": "(q)\\1"})");
  CHECK_THROWS_WITH(rankwise::peft_targets(backreference, "qq"), Contains("is not a valid regular expression"));
  // The usual PEFT patterns work as in Python's re.fullmatch.
  const PeftConfig usual = parse_peft_config(R"j({"peft_type": "LORA", "target_modules": ".*\\.(q_proj|v_proj)"})j");
  CHECK(rankwise::peft_targets(usual, "model.layers.0.self_attn.q_proj"));
  CHECK_FALSE(rankwise::peft_targets(usual, "model.layers.0.self_attn.k_proj"));
  CHECK_FALSE(rankwise::peft_targets(usual, "q_proj"));
}

TEST_CASE("load_peft_adapter: loads a directory written by PEFT's rules", "[io][peft]") {
  Random rng(1);
  Model model;
  const LoRAOptions options{.rank = 3, .alpha = 1.0};
  for (const char* path : {"layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.0.attn.k_proj",
                           "layers.1.attn.q_proj", "layers.1.attn.v_proj"})
    model.add(path, 4, 3, options, rng);
  const PeftConfig config = rankwise::load_peft_adapter(test_data_dir() / "peft_lora", model.modules);
  CHECK(config.r == 2);
  // make_golden.py: A[i][j] = (i + 1) / 4 - j / 8, B[i][j] = (i - j) / 2 + m, m = 0..3 over q0, v0, q1, v1.
  const int golden_index[] = {0, 1, -1, 2, 3};
  for (std::size_t k = 0; k < 5; ++k) {
    LoRA<float>& layer = model.at(k);
    CAPTURE(model.modules[k].path);
    if (golden_index[k] < 0) {
      CHECK(layer.rank() == 0);  // k_proj is not targeted: no adapter there
      continue;
    }
    const Index r = model.modules[k].path == "layers.1.attn.v_proj" ? 1 : 2;
    REQUIRE(layer.rank() == r);
    for (Index i = 0; i < r; ++i)
      for (Index j = 0; j < 4; ++j) CHECK(layer.A()(i, j) == float(double(i + 1) / 4.0 - double(j) / 8.0));
    for (Index i = 0; i < 3; ++i)
      for (Index j = 0; j < r; ++j) CHECK(layer.B()(i, j) == float(double(i - j) / 2.0 + golden_index[k]));
    CHECK(layer.scale() == (r == 1 ? 3.0 : 2.0));  // alpha_pattern 3 / rank 1, lora_alpha 4 / r 2
    const Matrix<float> x = random_matrix<float>(4, 5, rng);
    Matrix<float> expected = layer.base().weight() * x + Matrix<float>(float(layer.scale()) * layer.B() * (layer.A() * x));
    expected.colwise() += layer.base().bias().col(0);
    CHECK_THAT(output(layer, x), is_close_to(expected, 1e-5, 1e-5));
  }
}

// --- round trips --------------------------------------------------------------------------------

TEST_CASE("save_peft_adapter: LoRA round-trips bit for bit, with rank_pattern and alpha_pattern after surgery",
          "[io][peft]") {
  for (const bool rslora : {false, true}) {
    CAPTURE(rslora);
    TempDir dir("peft_round_trip");
    Random rng(2);
    Model model = make_model(rng, {.rank = 4, .alpha = 6.0, .dropout = 0.1, .use_rslora = rslora});
    const std::vector<Index> drop_one = {1}, drop_two = {0, 3};
    model.at(1).remove_ranks(drop_one);  // rank 3
    model.at(3).remove_ranks(drop_two);  // rank 2
    const PeftConfig written = rankwise::save_peft_adapter(dir.path, model.modules);

    CHECK(written.r == 4);
    CHECK(written.use_rslora == rslora);
    REQUIRE(written.rank_pattern.size() == 2);
    CHECK(written.rank_pattern[0] == std::pair<std::string, Index>{"layers.0.mlp.up_proj", 3});
    CHECK(written.rank_pattern[1] == std::pair<std::string, Index>{"layers.1.mlp.down_proj", 2});
    const double s = model.at(0).scale();
    for (const auto& [path, alpha] : written.alpha_pattern) {
      const Index r = rankwise::peft_rank_for(written, path);
      // PEFT's alpha / r gives s back to within a unit of the last place (alpha / r cannot reach every
      // double); rankwise reads the exact s from the weights' metadata.
      CHECK(std::abs((rslora ? alpha / std::sqrt(double(r)) : alpha / double(r)) - s) <= 1e-15 * s);
    }
    const PeftConfig on_disk = rankwise::parse_peft_config(read_text(dir.path / "adapter_config.json"));
    CHECK(on_disk.rank_pattern == written.rank_pattern);
    CHECK(on_disk.alpha_pattern == written.alpha_pattern);
    CHECK(on_disk.lora_dropout == 0.1);
    CHECK(on_disk.target_modules.size() == 4);

    Model loaded = fresh_copy(model, rng);
    rankwise::load_peft_adapter(dir.path, loaded.modules);
    const Matrix<float> x = random_matrix<float>(12, 6, rng);
    for (std::size_t k = 0; k < 4; ++k) {
      CAPTURE(k);
      CHECK(same_bits(loaded.at(k).A(), model.at(k).A()));
      CHECK(same_bits(loaded.at(k).B(), model.at(k).B()));
      CHECK(loaded.at(k).scale() == model.at(k).scale());
      const Matrix<float> xk = x.topRows(model.at(k).in_features());
      CHECK(same_bits(output(loaded.at(k), xk), output(model.at(k), xk)));
    }
  }
}

TEST_CASE("load_peft_adapter: an alpha edited by hand wins over the exact scale saved with the weights",
          "[io][peft]") {
  TempDir dir("peft_edited");
  Random rng(12);
  Model model = make_model(rng, {.rank = 4, .alpha = 8.0});
  rankwise::save_peft_adapter(dir.path, model.modules);
  std::string config = read_text(dir.path / "adapter_config.json");
  const std::string from = "\"lora_alpha\": 8";
  config.replace(config.find(from), from.size(), "\"lora_alpha\": 4");
  write_text(dir.path / "adapter_config.json", config);
  Model loaded = fresh_copy(model, rng);
  rankwise::load_peft_adapter(dir.path, loaded.modules);
  CHECK(loaded.at(0).scale() == 1.0);  // 4 / 4, not the saved 2
  CHECK(rankwise::read_peft_lora<double>(dir.path).modules[0].factors.scale == 1.0);
}

TEST_CASE("save_peft_adapter: FoldIntoB writes one alpha that llama.cpp's rule applies correctly", "[io][peft]") {
  TempDir dir("peft_fold");
  Random rng(3);
  Model model = make_model(rng, {.rank = 4, .alpha = 6.0, .use_rslora = true});
  const std::vector<Index> drop = {0};
  model.at(2).remove_ranks(drop);
  const PeftConfig written = rankwise::save_peft_adapter(dir.path, model.modules, {.alpha = PeftAlpha::FoldIntoB});
  CHECK(written.alpha_pattern.empty());
  CHECK_FALSE(written.use_rslora);  // llama.cpp knows no rsLoRA: the scale is folded instead
  const auto adapter = rankwise::read_peft_lora<float>(dir.path);
  REQUIRE(adapter.modules.size() == 4);
  for (std::size_t k = 0; k < 4; ++k) {
    // llama.cpp: s = lora_alpha / rank, with the rank read from lora_B's shape.
    const auto& f = adapter.modules[k].factors;
    const double llama_scale = written.lora_alpha / double(f.B.cols());
    const Matrix<float> delta = float(llama_scale) * f.B * f.A;
    CAPTURE(adapter.modules[k].path);
    CHECK_THAT(delta, is_close_to(model.at(k).delta_weight(), 1e-5, 1e-6));
  }
}

TEST_CASE("save_peft_adapter: gates are folded into the factors, F16 on request", "[io][peft]") {
  TempDir dir("peft_gates");
  Random rng(4);
  Model model = make_model(rng);
  model.at(0).set_gate(1, 0.5);
  model.at(0).set_gate(3, 0.0);
  rankwise::save_peft_adapter(dir.path, model.modules, {.dtype = DType::F16, .task_type = "CAUSAL_LM"});
  CHECK(rankwise::SafetensorsReader(dir.path / "adapter_model.safetensors").info(
            "base_model.model.layers.0.attn.q_proj.lora_A.weight").dtype == DType::F16);
  CHECK(rankwise::parse_peft_config(read_text(dir.path / "adapter_config.json")).task_type == std::string("CAUSAL_LM"));
  Model loaded = fresh_copy(model, rng);
  rankwise::load_peft_adapter(dir.path, loaded.modules);
  for (std::size_t k = 0; k < 4; ++k) CHECK_THAT(loaded.at(k).delta_weight(), is_close_to(model.at(k).delta_weight(), 2e-3, 2e-3));
}

TEST_CASE("save_peft_adapter: rank-0 modules are left out and come back as rank 0", "[io][peft]") {
  TempDir dir("peft_rank0");
  Random rng(5);
  Model model = make_model(rng);
  const std::vector<Index> all = {0, 1, 2, 3};
  model.at(1).remove_ranks(all);
  const PeftConfig written = rankwise::save_peft_adapter(dir.path, model.modules);
  CHECK(written.target_modules.size() == 3);
  Model loaded = fresh_copy(model, rng);
  rankwise::load_peft_adapter(dir.path, loaded.modules);
  CHECK(loaded.at(1).rank() == 0);
  CHECK(loaded.at(0).rank() == 4);
}

// --- mismatches and bad directories ----------------------------------------------------------

TEST_CASE("load_peft_adapter: reports every mismatch with the model in one error and changes nothing",
          "[io][peft][errors]") {
  TempDir dir("peft_mismatch");
  Random rng(6);
  Model model = make_model(rng);
  rankwise::save_peft_adapter(dir.path, model.modules);
  Model other;
  other.add("layers.0.attn.q_proj", 8, 8, {.rank = 2}, rng);
  other.add("layers.0.mlp.up_proj", 9, 12, {.rank = 2}, rng);  // wrong in_features
  other.add("layers.7.attn.q_proj", 8, 8, {.rank = 2}, rng);   // not in the file but targeted? no: full paths
  const Matrix<float> before = other.at(0).A();
  try {
    rankwise::load_peft_adapter(dir.path, other.modules);
    FAIL("no exception");
  } catch (const FormatError& e) {
    const std::string what = e.what();
    CHECK_THAT(what, Contains("[rankwise::load_peft_adapter]") && Contains("does not match the model (3 problems)"));
    CHECK_THAT(what, Contains("module 'layers.0.mlp.up_proj': lora_A is [4, 8] and lora_B [12, 4] but the model's "
                              "layer needs [r, 9] and [12, r]"));
    CHECK_THAT(what, Contains("module 'layers.1.attn.q_proj' is in '") && Contains("but not in the model"));
    CHECK_THAT(what, Contains("module 'layers.1.mlp.down_proj' is in '"));
  }
  CHECK(other.at(0).A() == before);  // nothing changed
  CHECK(other.at(0).rank() == 2);

  // A module the config targets but the file lacks.
  write_text(dir.path / "adapter_config.json",
             R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj", "down_proj"]})");
  Model extra = fresh_copy(model, rng);
  extra.add("layers.2.attn.q_proj", 8, 8, {.rank = 2}, rng);
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(dir.path, extra.modules),
                    Contains("module 'layers.2.attn.q_proj' is targeted by the config but"));
}

TEST_CASE("load_peft_adapter: rejects directories it cannot load faithfully", "[io][peft][errors]") {
  Random rng(7);
  Model model;
  for (const char* path : {"layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj"})
    model.add(path, 4, 3, {.rank = 2}, rng);
  TempDir dir("peft_bad");
  const fs::path adapter = copy_golden(dir);
  const std::string config = read_text(adapter / "adapter_config.json");
  const auto with = [&](const std::string& from, const std::string& to) {
    std::string c = config;
    c.replace(c.find(from), from.size(), to);
    write_text(adapter / "adapter_config.json", c);
  };
  with("\"peft_type\": \"LORA\"", "\"peft_type\": \"VERA\"");
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(adapter, model.modules), Contains("peft_type must be \"LORA\" to load LoRA adapters (got \"VERA\")"));
  with("\"use_dora\": false", "\"use_dora\": true");
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(adapter, model.modules), Contains("uses DoRA"));
  with("\"bias\": \"none\"", "\"bias\": \"all\"");
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(adapter, model.modules), Contains("saves base biases (bias \"all\")"));
  with("\"rank_pattern\": {\n    \"layers.1.attn.v_proj\": 1\n  }", "\"rank_pattern\": {}");
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(adapter, model.modules),
                    Contains("module 'layers.1.attn.v_proj': has rank 1 but the config gives it rank 2"));
  write_text(adapter / "adapter_config.json", config);

  // Weights with an unknown tensor and a missing half.
  rankwise::SafetensorsReader golden(adapter / "adapter_model.safetensors");
  rankwise::SafetensorsWriter writer;
  for (const auto& t : golden.tensors())
    if (t.name != "base_model.model.layers.0.attn.v_proj.lora_B.weight") writer.add(t.name, golden.matrix<float>(t.name));
  writer.add("base_model.model.lm_head.weight", Matrix<float>(Matrix<float>::Zero(2, 2)));
  writer.write(adapter / "adapter_model.safetensors");
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(adapter, model.modules),
                    Contains("(2 problems)") && Contains("tensor 'base_model.model.lm_head.weight' is not a LoRA weight") &&
                        Contains("module 'layers.0.attn.v_proj': has lora_A but no lora_B"));
  fs::remove(adapter / "adapter_model.safetensors");
  CHECK_THROWS_AS(rankwise::load_peft_adapter(adapter, model.modules), rankwise::IoError);
  write_text(adapter / "adapter_model.bin", "pickle");
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(adapter, model.modules), Contains("adapter_model.bin (a pickle)"));
}

TEST_CASE("load_peft_adapter: target_modules and exclude_modules decide, also for modules in the file",
          "[io][peft]") {
  // Regressions: modules present in the file were loaded whatever the config targeted, and an invalid
  // pattern went unnoticed when every module was in the file.
  Random rng(9);
  const auto model_of_four = [&] {
    Model model;
    for (const char* path : {"layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj"})
      model.add(path, 4, 3, {.rank = 2}, rng);
    return model;
  };
  TempDir dir("peft_targets");
  const fs::path adapter = copy_golden(dir);
  const std::string config = read_text(adapter / "adapter_config.json");
  const auto with = [&](const std::string& from, const std::string& to) {
    std::string c = config;
    REQUIRE(c.find(from) != std::string::npos);
    c.replace(c.find(from), from.size(), to);
    write_text(adapter / "adapter_config.json", c);
  };
  const std::string targets = "\"target_modules\": [\n    \"q_proj\",\n    \"v_proj\"\n  ]";

  with(targets, "\"target_modules\": [\"q_proj\"]");  // the file still holds v_proj's weights
  Model only_q = model_of_four();
  rankwise::load_peft_adapter(adapter, only_q.modules);
  CHECK(only_q.at(0).rank() == 2);
  CHECK(only_q.at(1).rank() == 0);
  CHECK(only_q.at(2).rank() == 2);
  CHECK(only_q.at(3).rank() == 0);

  with("\"exclude_modules\": null", "\"exclude_modules\": [\"layers.1.attn.q_proj\"]");
  Model excluded = model_of_four();
  rankwise::load_peft_adapter(adapter, excluded.modules);
  CHECK(excluded.at(0).rank() == 2);
  CHECK(excluded.at(2).rank() == 0);
  CHECK(excluded.at(3).rank() == 1);  // rank_pattern gives layers.1.attn.v_proj rank 1

  with(targets, "\"target_modules\": \"(q|v\"");  // every module is in the file; the pattern is still read
  Model invalid = model_of_four();
  const Matrix<float> untouched = invalid.at(0).A();
  CHECK_THROWS_AS(rankwise::load_peft_adapter(adapter, invalid.modules), FormatError);
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(adapter, invalid.modules), Contains("is not a valid regular expression"));
  CHECK(invalid.at(0).A() == untouched);
}

TEST_CASE("load_peft_adapter: factors and scales follow LoRA's constructor rules, nothing changed otherwise",
          "[io][peft][errors]") {
  // Regressions: each of these directories loaded before, into adapters no constructor can make.
  Random rng(8);
  Model source;
  source.add("small", 2, 2, {.rank = 2, .alpha = 4.0}, rng);
  source.add("wide", 6, 5, {.rank = 2, .alpha = 4.0}, rng);
  TempDir dir("peft_rules");
  const fs::path adapter = dir.path / "adapter";
  rankwise::save_peft_adapter(adapter, source.modules);
  const std::string config = read_text(adapter / "adapter_config.json");
  rankwise::SafetensorsReader saved(adapter / "adapter_model.safetensors");
  const auto rewrite = [&](const std::string& name, const Matrix<float>& value) {
    rankwise::SafetensorsWriter writer;
    for (const auto& t : saved.tensors())
      if (t.name != name) writer.add(t.name, saved.matrix<float>(t.name));
    writer.add(name, value);
    writer.write(adapter / "adapter_model.safetensors");
  };
  Model target = fresh_copy(source, rng);
  const Matrix<float> before = target.at(1).A();

  Matrix<float> nan_A = saved.matrix<float>("base_model.model.wide.lora_A.weight");
  nan_A(1, 3) = std::numeric_limits<float>::quiet_NaN();
  rewrite("base_model.model.wide.lora_A.weight", nan_A);
  CHECK_THROWS_AS(rankwise::load_peft_adapter(adapter, target.modules), FormatError);
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(adapter, target.modules),
                    Contains("module 'wide': [lora] A and B must be finite (A holds a NaN or an infinity"));
  CHECK(target.at(1).A() == before);
  CHECK(target.at(0).rank() == 2);
  rankwise::load_peft_adapter(adapter, target.modules, {.allow_non_finite = true});  // asked for: accepted
  CHECK(std::isnan(target.at(1).A()(1, 3)));

  rewrite("base_model.model.wide.lora_A.weight", saved.matrix<float>("base_model.model.wide.lora_A.weight"));
  // The config with one top-level key's value replaced.
  const auto set_key = [&](const std::string& key, const std::string& value) {
    std::string c = config;
    const std::size_t at = c.find("\"" + key + "\": ");
    REQUIRE(at != std::string::npos);
    const std::size_t from = at + key.size() + 4, to = c.find_first_of(",\n", from);
    c.replace(from, to - from, value);
    write_text(adapter / "adapter_config.json", c);
  };
  set_key("lora_alpha", "1e300");
  Model third = fresh_copy(source, rng);
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(adapter, third.modules),
                    Contains("is not a finite number > 0 in the adapter's precision"));
  CHECK(third.at(0).rank() == 2);

  // Rank 4 in a 2 x 2 layer (in and out match the model; the rank cannot).
  write_text(adapter / "adapter_config.json", config);
  set_key("r", "4");
  {
    rankwise::SafetensorsWriter writer;
    writer.add("base_model.model.small.lora_A.weight", Matrix<float>(Matrix<float>::Ones(4, 2)));
    writer.add("base_model.model.small.lora_B.weight", Matrix<float>(Matrix<float>::Ones(2, 4)));
    writer.add("base_model.model.wide.lora_A.weight", Matrix<float>(Matrix<float>::Ones(4, 6)));
    writer.add("base_model.model.wide.lora_B.weight", Matrix<float>(Matrix<float>::Ones(5, 4)));
    writer.write(adapter / "adapter_model.safetensors");
  }
  Model fourth = fresh_copy(source, rng);
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(adapter, fourth.modules),
                    Contains("(1 problem)") && Contains("module 'small': [lora] the rank must be at most min(in, out) = 2 (got 4)"));
  CHECK(fourth.at(1).rank() == 2);
}

TEST_CASE("save_peft_adapter: rejects what PEFT cannot represent", "[io][peft][errors]") {
  TempDir dir("peft_save_errors");
  Random rng(8);
  Model model = make_model(rng);
  CHECK_THROWS_WITH(rankwise::save_peft_adapter(dir.path, model.modules, {.dtype = DType::I32}), Contains("dtype must be F32, F16, BF16 or F64"));
  CHECK_THROWS_WITH(rankwise::save_peft_adapter(dir.path, model.modules, {.task_type = "CHAT"}), Contains("task_type must be empty or one of"));
  CHECK_THROWS_WITH(rankwise::save_peft_adapter(dir.path, model.modules, {.target_modules = {"q_proj"}}),
                    Contains("target_modules does not match module 'layers.0.mlp.up_proj'"));
  CHECK_THROWS_WITH(rankwise::save_peft_adapter(dir.path, std::vector<NamedAdapter<LoRA<float>>>{}), Contains("no module of rank > 0"));
  std::vector<NamedAdapter<LoRA<float>>> twice = {model.modules[0], model.modules[0]};
  CHECK_THROWS_WITH(rankwise::save_peft_adapter(dir.path, twice), Contains("listed twice"));
  // "q" is a dotted suffix of "a.q": PEFT's pattern rule would give "a.q" the rank meant for "q".
  Model clash;
  clash.add("q", 8, 8, {.rank = 4}, rng);
  clash.add("a.q", 8, 8, {.rank = 4}, rng);
  clash.add("b.q", 8, 8, {.rank = 4}, rng);
  const std::vector<Index> drop = {0};
  clash.at(0).remove_ranks(drop);
  CHECK_THROWS_WITH(rankwise::save_peft_adapter(dir.path, clash.modules), Contains("gets another module's rank or alpha"));
  CHECK(rankwise::test_support::count_entries(dir.path) == 0);  // nothing was written
}

TEST_CASE("save_peft_adapter: a save that fails halfway leaves the previous directory intact", "[io][peft]") {
  TempDir dir("peft_fail");
  Random rng(9);
  Model model = make_model(rng);
  rankwise::save_peft_adapter(dir.path, model.modules);
  const auto weights = read_bytes(dir.path / "adapter_model.safetensors");
  const auto config = read_bytes(dir.path / "adapter_config.json");
  model.at(0).B_parameter().value.setConstant(7.0f);
  for (const bool durable : {true, false}) {
    rankwise::ScopedWriteFailure failure(500);
    CHECK_THROWS_AS(rankwise::save_peft_adapter(dir.path, model.modules, {.durable = durable}), rankwise::IoError);
  }
  CHECK(read_bytes(dir.path / "adapter_model.safetensors") == weights);
  CHECK(read_bytes(dir.path / "adapter_config.json") == config);
  CHECK(rankwise::test_support::count_entries(dir.path) == 2);
}

// --- the rest of the adapter family ----------------------------------------------------------

TEST_CASE("save_peft_adapter: VeRA, MELoRA and DyLoRA (at a chosen rank) export as exact plain LoRA", "[io][peft]") {
  TempDir dir("peft_family");
  Random rng(20);
  const auto bank = rankwise::VeRAProjections<float>::make(4, 16, 16, rng);
  rankwise::VeRA<float> v1(Linear<float>(8, 8, rng), bank), v2(Linear<float>(12, 16, rng), bank);
  for (auto* v : {&v1, &v2}) {
    v->lambda_d_parameter().value = random_matrix<float>(4, 1, rng);
    v->lambda_b_parameter().value = random_matrix<float>(v->out_features(), 1, rng);
  }
  const PeftConfig vera_config = rankwise::save_peft_adapter(
      dir.path / "vera", std::vector<NamedAdapter<rankwise::VeRA<float>>>{{"layers.0.q", &v1}, {"layers.0.up", &v2}});
  CHECK(vera_config.peft_type == "LORA");
  CHECK(vera_config.r == 4);
  CHECK(vera_config.lora_alpha == 4.0);  // scale 1 = alpha / r
  const auto vera = rankwise::read_peft_lora<float>(dir.path / "vera");
  CHECK_THAT(Matrix<float>(float(vera.modules[0].factors.scale) * vera.modules[0].factors.B * vera.modules[0].factors.A),
             is_close_to(v1.delta_weight(), 1e-6, 1e-7));
  CHECK_THAT(Matrix<float>(float(vera.modules[1].factors.scale) * vera.modules[1].factors.B * vera.modules[1].factors.A),
             is_close_to(v2.delta_weight(), 1e-6, 1e-7));

  rankwise::MELoRA<float> me(Linear<float>(16, 12, rng), {.n = 2, .mini_rank = 3, .alpha = 6.0}, rng);
  me.B_parameter().value = random_matrix<float>(6, 6, rng);
  rankwise::save_peft_adapter(dir.path / "melora", std::vector<NamedAdapter<rankwise::MELoRA<float>>>{{"mlp", &me}});
  const auto melora = rankwise::read_peft_lora<float>(dir.path / "melora");
  REQUIRE(melora.modules[0].factors.rank() == 6);  // n r_mini
  CHECK_THAT(Matrix<float>(float(melora.modules[0].factors.scale) * melora.modules[0].factors.B * melora.modules[0].factors.A),
             is_close_to(me.delta_weight(), 1e-6, 1e-6));

  rankwise::DyLoRA<float> dy(Linear<float>(10, 10, rng), {.max_rank = 6, .alpha = 12.0}, rng);
  dy.B_parameter().value = random_matrix<float>(10, 6, rng);
  // [any rank b <= r_max deploys as a LoRA of rank b]
  std::vector<rankwise::PeftLoRAModule<float>> at_three = {{"attn.q", dy.lora_factors(3)}};
  rankwise::save_peft_lora(dir.path / "dylora", at_three);
  const auto dylora = rankwise::read_peft_lora<float>(dir.path / "dylora");
  REQUIRE(dylora.modules[0].factors.rank() == 3);
  CHECK(dylora.modules[0].factors.scale == 4.0);  // alpha / b
  CHECK_THAT(Matrix<float>(4.0f * dylora.modules[0].factors.B * dylora.modules[0].factors.A),
             is_close_to(dy.delta_weight(3), 1e-6, 1e-6));
}

TEST_CASE("save_peft_vera: native VeRA directories round-trip bit for bit", "[io][peft]") {
  TempDir dir("peft_vera");
  Random rng(21);
  const auto bank = rankwise::VeRAProjections<float>::make(3, 20, 20, rng);  // larger than any layer
  rankwise::VeRA<float> a(Linear<float>(8, 12, rng), bank), b(Linear<float>(12, 8, rng), bank);
  for (auto* v : {&a, &b}) {
    v->lambda_d_parameter().value = random_matrix<float>(3, 1, rng);
    v->lambda_b_parameter().value = random_matrix<float>(v->out_features(), 1, rng);
  }
  const std::vector<NamedAdapter<rankwise::VeRA<float>>> modules = {{"layers.0.attn.q_proj", &a}, {"layers.0.mlp.down_proj", &b}};
  const PeftConfig written = rankwise::save_peft_vera(dir.path, modules);
  CHECK(written.peft_type == "VERA");
  CHECK(written.r == 3);
  const PeftConfig config = rankwise::parse_peft_config(read_text(dir.path / "adapter_config.json"));
  CHECK(config.peft_type == "VERA");
  CHECK(config.save_projection);
  CHECK(config.r == 3);
  rankwise::SafetensorsReader weights(dir.path / "adapter_model.safetensors");
  CHECK(weights.info("base_model.vera_A").shape == std::vector<Index>{3, 12});  // trimmed to the largest layer
  CHECK(weights.info("base_model.vera_B").shape == std::vector<Index>{12, 3});
  CHECK(weights.info("base_model.model.layers.0.attn.q_proj.vera_lambda_b").shape == std::vector<Index>{12});
  CHECK(weights.info("base_model.model.layers.0.attn.q_proj.vera_lambda_d").shape == std::vector<Index>{3});

  const auto file = rankwise::read_peft_vera<float>(dir.path);
  rankwise::VeRA<float> a2(a.base(), file.projections), b2(b.base(), file.projections);
  rankwise::load_peft_adapter(dir.path, std::vector<NamedAdapter<rankwise::VeRA<float>>>{{"layers.0.attn.q_proj", &a2},
                                                                                          {"layers.0.mlp.down_proj", &b2}});
  for (auto [original, loaded] : {std::pair{&a, &a2}, std::pair{&b, &b2}}) {
    CHECK(same_bits(loaded->lambda_d(), original->lambda_d()));
    CHECK(same_bits(loaded->lambda_b(), original->lambda_b()));
    const Matrix<float> x = random_matrix<float>(original->in_features(), 4, rng);
    Matrix<float> y1, y2;
    original->set_training(false);
    loaded->set_training(false);
    original->forward(x, y1);
    loaded->forward(x, y2);
    CHECK(same_bits(y1, y2));
  }

  // Adapters over another bank would apply the vectors to other projections: refused.
  const auto other = rankwise::VeRAProjections<float>::make(3, 20, 20, rng);
  rankwise::VeRA<float> a3(a.base(), other), b3(b.base(), bank);
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(dir.path, std::vector<NamedAdapter<rankwise::VeRA<float>>>{
                                                              {"layers.0.attn.q_proj", &a3}, {"layers.0.mlp.down_proj", &b3}}),
                    Contains("(1 problem)") && Contains("its projection bank does not hold the file's vera_A / vera_B"));
  CHECK_THROWS_WITH(rankwise::save_peft_vera(dir.path, std::vector<NamedAdapter<rankwise::VeRA<float>>>{{"x", &a3}, {"y", &b3}}),
                    Contains("uses another projection bank"));
  // A file without its projections cannot be used outside PyTorch.
  rankwise::SafetensorsWriter without;
  for (const auto& t : weights.tensors())
    if (t.name.rfind("base_model.vera_", 0) != 0) without.add_vector(t.name, weights.matrix<float>(t.name));
  without.write(dir.path / "adapter_model.safetensors");
  CHECK_THROWS_WITH(rankwise::read_peft_vera<float>(dir.path), Contains("save_projection was false"));
}

TEST_CASE("save_peft_adapter: model slots export what has a plain-LoRA form and name what has not", "[io][peft]") {
  TempDir dir("peft_slots");
  Random rng(22);
  std::vector<rankwise::AnyLinear<float>> slots;
  slots.push_back(rankwise::make_linear(Linear<float>(8, 8, rng), {"lora", LoRAOptions{.rank = 2, .alpha = 4.0}}, rng));
  slots.push_back(rankwise::make_linear(Linear<float>(8, 8, rng), {"melora", rankwise::MELoRAOptions{.n = 2, .mini_rank = 2}}, rng));
  slots.push_back(rankwise::make_linear(Linear<float>(8, 8, rng), {"red", std::monostate{}}, rng));
  std::vector<NamedAdapter<rankwise::AnyLinear<float>>> modules = {{"a.lora", &slots[0]}, {"a.melora", &slots[1]}, {"a.red", &slots[2]}};
  CHECK_THROWS_WITH(rankwise::save_peft_adapter(dir.path, modules),
                    Contains("module 'a.red' holds a 'red' layer, whose update is not a plain LoRA"));
  modules.pop_back();
  const PeftConfig written = rankwise::save_peft_adapter(dir.path, modules);
  CHECK(written.rank_pattern.size() == 1);  // rank 2 and rank 4
  const auto back = rankwise::read_peft_lora<float>(dir.path);
  CHECK(back.modules[1].factors.rank() == 4);
}

TEST_CASE("load_peft_adapter (VeRA): non-finite vectors are refused unless PeftLoadOptions::allow_non_finite",
          "[io][peft]") {
  TempDir dir("peft_vera_nan");
  Random rng(23);
  const auto bank = rankwise::VeRAProjections<float>::make(3, 8, 8, rng);
  rankwise::VeRA<float> saved(Linear<float>(8, 8, rng), bank);
  saved.lambda_b_parameter().value(2) = std::numeric_limits<float>::quiet_NaN();  // a diverged run
  rankwise::save_peft_vera(dir.path, std::vector<NamedAdapter<rankwise::VeRA<float>>>{{"layers.0.q", &saved}});
  rankwise::VeRA<float> loaded(Linear<float>(8, 8, rng), bank);
  const Matrix<float> before = loaded.lambda_b();
  const std::vector<NamedAdapter<rankwise::VeRA<float>>> modules = {{"layers.0.q", &loaded}};
  CHECK_THROWS_WITH(rankwise::load_peft_adapter(dir.path, modules),
                    Contains("does not hold valid VeRA adapters") && Contains("vera_lambda_b holds a NaN or an infinity"));
  CHECK(same_bits(loaded.lambda_b(), before));
  rankwise::load_peft_adapter(dir.path, modules, {.allow_non_finite = true});
  CHECK(std::isnan(loaded.lambda_b()(2)));
  CHECK(same_bits(loaded.lambda_d(), saved.lambda_d()));
}
