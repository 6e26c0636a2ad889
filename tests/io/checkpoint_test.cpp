// Tests for rankwise/io/checkpoint.hpp, rankwise/io/state.hpp and rankwise/io/rankwise_adapter.hpp.
#include <rankwise/adapters/factory.hpp>
#include <rankwise/io/checkpoint.hpp>
#include <rankwise/io/rankwise_adapter.hpp>
#include <rankwise/io/state.hpp>
#include <rankwise/optim/lr_schedule.hpp>

#include "support/matchers.hpp"
#include "support/temp_dir.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <limits>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

using rankwise::AdamW;
using rankwise::CheckpointReader;
using rankwise::CheckpointWriter;
using rankwise::FormatError;
using rankwise::Index;
using rankwise::Linear;
using rankwise::LoRA;
using rankwise::Matrix;
using rankwise::NamedAdapter;
using rankwise::Parameter;
using rankwise::Random;
using rankwise::SGD;
using rankwise::test_support::random_matrix;
using rankwise::test_support::same_bits;
using rankwise::test_support::read_bytes;
using rankwise::test_support::read_text;
using rankwise::test_support::TempDir;
using rankwise::test_support::write_text;
using Catch::Contains;

namespace fs = std::filesystem;

namespace {

// Everything a small fine-tuning run holds: two adapted layers with dropout, AdamW under a cosine
// schedule, the data generator and the generator that draws new ranks. `seed` only decides the
// initial values, which a restore must overwrite.
struct Run {
  std::unique_ptr<LoRA<float>> q, up;
  std::vector<NamedAdapter<LoRA<float>>> adapters;
  std::vector<Parameter<float>*> base;
  std::unique_ptr<AdamW<float>> optimizer;
  Random data, surgery;
  rankwise::LRSchedule schedule = rankwise::LRSchedule::cosine(3, 24);
  long step = 0;

  explicit Run(std::uint64_t seed) : data(seed + 1), surgery(seed + 2) {
    Random init(seed);
    q = std::make_unique<LoRA<float>>(Linear<float>(10, 10, init), rankwise::LoRAOptions{.rank = 6, .alpha = 12.0, .dropout = 0.2}, init);
    up = std::make_unique<LoRA<float>>(Linear<float>(10, 14, init), rankwise::LoRAOptions{.rank = 4, .alpha = 4.0, .dropout = 0.2}, init);
    q->set_path("layers.0.attn.q_proj");
    up->set_path("layers.0.mlp.up_proj");
    adapters = {{"layers.0.attn.q_proj", q.get()}, {"layers.0.mlp.up_proj", up.get()}};
    std::vector<Parameter<float>*> params;
    for (LoRA<float>* layer : {q.get(), up.get()})
      for (Parameter<float>* p : layer->parameters()) (p->trainable ? params : base).push_back(p);
    optimizer = std::make_unique<AdamW<float>>(params, rankwise::AdamWOptions{.lr = 0.02, .weight_decay = 0.01});
  }

  // One step: y = up(q(x)), loss = |y - target|^2 / 2; surgery at fixed steps.
  void train_step() {
    if (step == 4) optimizer->follow(q->remove_ranks(std::vector<Index>{1, 4}));
    if (step == 7 || step == 15) optimizer->follow(up->add_ranks(2, surgery));
    const Matrix<float> x = random_matrix<float>(10, 8, data);
    const Matrix<float> target = random_matrix<float>(14, 8, data);
    Matrix<float> h, y, dh, dx;
    q->zero_grad();
    up->zero_grad();
    q->forward(x, h);
    up->forward(h, y);
    up->backward(y - target, dh);
    q->backward(dh, dx);
    optimizer->set_lr_factor(schedule.factor(step));
    optimizer->step();
    ++step;
  }

  void save(const fs::path& dir) const {
    CheckpointWriter ckpt;
    ckpt.set_step(step);
    ckpt.add("base", base);
    ckpt.add("adapters", adapters);
    ckpt.add("optimizer", *optimizer);
    ckpt.add("data_rng", data);
    ckpt.add("surgery_rng", surgery);
    ckpt.metadata()["note"] = "resume test";
    ckpt.write(dir);
  }

  void load(const fs::path& dir) {
    CheckpointReader ckpt(dir);
    step = ckpt.step();
    ckpt.restore("base", base);
    ckpt.restore("adapters", adapters);  // adapters first: they take their saved ranks
    ckpt.restore("optimizer", *optimizer);
    ckpt.restore("data_rng", data);
    ckpt.restore("surgery_rng", surgery);
  }
};

void require_same(const Run& a, const Run& b) {
  for (std::size_t i = 0; i < a.adapters.size(); ++i) {
    const LoRA<float>& la = *a.adapters[i].adapter;
    const LoRA<float>& lb = *b.adapters[i].adapter;
    CAPTURE(a.adapters[i].path);
    REQUIRE(same_bits(la.A(), lb.A()));
    REQUIRE(same_bits(la.B(), lb.B()));
    REQUIRE(same_bits(la.base().weight(), lb.base().weight()));
    REQUIRE(la.dropout_generator() == lb.dropout_generator());
  }
  REQUIRE(a.optimizer->step_count() == b.optimizer->step_count());
  for (const auto& [name, state] : a.optimizer->states()) {
    CAPTURE(name);
    const auto* other = b.optimizer->state_of(name);
    REQUIRE(other != nullptr);
    REQUIRE(same_bits(state.m, other->m));
    REQUIRE(same_bits(state.v, other->v));
    REQUIRE((state.steps == other->steps).all());
  }
  REQUIRE(a.data == b.data);
  REQUIRE(a.surgery == b.surgery);
}

}  // namespace

TEST_CASE("Checkpoint: resuming gives bit for bit the run that never stopped", "[io][checkpoint]") {
  TempDir dir("resume");
  Run uninterrupted(1);
  for (int i = 0; i < 20; ++i) uninterrupted.train_step();

  Run first_half(1);
  for (int i = 0; i < 10; ++i) first_half.train_step();
  first_half.save(dir.path / "ckpt");

  Run resumed(99);  // other initial values, other ranks: all must come from the checkpoint
  REQUIRE(resumed.q->rank() == 6);
  resumed.load(dir.path / "ckpt");
  CHECK(resumed.step == 10);
  CHECK(resumed.q->rank() == 4);
  CHECK(resumed.up->rank() == 6);
  require_same(first_half, resumed);
  for (int i = 0; i < 10; ++i) resumed.train_step();  // includes a surgery at step 15
  require_same(uninterrupted, resumed);
  CHECK(CheckpointReader(dir.path / "ckpt").metadata()["note"] == "resume test");
}

TEST_CASE("Checkpoint: SGD, double parameters and generators round-trip", "[io][checkpoint]") {
  TempDir dir("sgd");
  Random rng(3);
  Parameter<double> w{"w", random_matrix<double>(3, 4, rng), random_matrix<double>(3, 4, rng), true, false};
  Parameter<double> b{"b", random_matrix<double>(3, 1, rng), random_matrix<double>(3, 1, rng), true, true};
  SGD<double> sgd(std::vector<Parameter<double>*>{&w, &b}, {.lr = 0.1, .momentum = 0.9});
  sgd.step();
  sgd.set_lr_factor(0.5);
  rng.normal();  // leaves a spare normal in the generator
  CheckpointWriter ckpt;
  ckpt.add("params", std::vector<Parameter<double>*>{&w, &b});
  ckpt.add("sgd", sgd);
  ckpt.add("rng", rng);
  ckpt.write(dir.path);

  Parameter<double> w2{"w", Matrix<double>::Zero(3, 4), Matrix<double>::Zero(3, 4), true, false};
  Parameter<double> b2{"b", Matrix<double>::Zero(3, 1), Matrix<double>::Zero(3, 1), true, true};
  SGD<double> sgd2(std::vector<Parameter<double>*>{&w2, &b2}, {.lr = 0.1, .momentum = 0.9});
  Random rng2(0);
  CheckpointReader reader(dir.path);
  reader.restore("params", std::vector<Parameter<double>*>{&w2, &b2});
  reader.restore("sgd", sgd2);
  reader.restore("rng", rng2);
  CHECK(same_bits(w2.value, w.value));
  CHECK(same_bits(b2.value, b.value));
  CHECK(sgd2.step_count() == 1);
  CHECK(sgd2.lr_factor() == 0.5);
  CHECK(same_bits(*sgd2.velocity_of("w"), *sgd.velocity_of("w")));
  CHECK(rng2 == rng);
  CHECK(rng2.normal() == rng.normal());  // the spare comes back too
  CHECK(rankwise::SafetensorsReader(dir.path / "tensors-1.safetensors").info("params/w").dtype == rankwise::DType::F64);
}

TEST_CASE("Checkpoint: a new checkpoint replaces the old one and removes its tensors", "[io][checkpoint]") {
  TempDir dir("generations");
  Run run(5);
  run.train_step();
  run.save(dir.path);
  run.train_step();
  run.save(dir.path);
  CHECK(fs::exists(dir.path / "tensors-2.safetensors"));
  CHECK_FALSE(fs::exists(dir.path / "tensors-1.safetensors"));
  CHECK(rankwise::test_support::count_entries(dir.path) == 2);
  CHECK(CheckpointReader(dir.path).step() == 2);
}

TEST_CASE("Checkpoint: a write that fails halfway leaves the previous checkpoint intact", "[io][checkpoint]") {
  TempDir dir("ckpt_fail");
  Run run(6);
  run.train_step();
  run.save(dir.path);
  const auto manifest = read_bytes(dir.path / "checkpoint.json");
  const auto tensors = read_bytes(dir.path / "tensors-1.safetensors");
  run.train_step();
  // Halfway through the tensors, then halfway through checkpoint.json (after the new tensors are complete).
  for (const std::uint64_t budget : {std::uint64_t(tensors.size() / 2), std::uint64_t(tensors.size() + 100)}) {
    CAPTURE(budget);
    {
      rankwise::ScopedWriteFailure failure(budget);
      CHECK_THROWS_AS(run.save(dir.path), rankwise::IoError);
    }
    CHECK(read_bytes(dir.path / "checkpoint.json") == manifest);
    CHECK(read_bytes(dir.path / "tensors-1.safetensors") == tensors);
    CHECK(rankwise::test_support::count_entries(dir.path) == 2);  // no temporary, no orphan
    Run restored(7);
    restored.load(dir.path);
    CHECK(restored.step == 1);
  }
}

TEST_CASE("Checkpoint: restoring into a model that differs reports what differs", "[io][checkpoint][errors]") {
  TempDir dir("ckpt_mismatch");
  Run run(8);
  run.train_step();
  run.save(dir.path);
  CheckpointReader ckpt(dir.path);

  Random rng(1);
  LoRA<float> other(Linear<float>(10, 12, rng), {.rank = 2, .dropout = 0.2}, rng);
  LoRA<float> extra(Linear<float>(10, 10, rng), {.rank = 2, .dropout = 0.2}, rng);
  std::vector<NamedAdapter<LoRA<float>>> wrong_paths = {{"layers.0.attn.q_proj", &other}, {"layers.9.attn.q_proj", &extra}};
  CHECK_THROWS_WITH(ckpt.restore("adapters", wrong_paths),
                    Contains("component 'adapters': the modules do not match the model (2)") &&
                        Contains("module 'layers.9.attn.q_proj' is not in the checkpoint") &&
                        Contains("module 'layers.0.mlp.up_proj' is in the checkpoint but not in the model"));
  LoRA<float> up(Linear<float>(10, 12, rng), {.rank = 2, .dropout = 0.2}, rng);
  std::vector<NamedAdapter<LoRA<float>>> wrong_shape = {{"layers.0.attn.q_proj", &extra}, {"layers.0.mlp.up_proj", &up}};
  CHECK_THROWS_WITH(ckpt.restore("adapters", wrong_shape),
                    Contains("component 'adapters/layers.0.mlp.up_proj': is a 14 x 10 adapter but the model's is 12 x 10"));
  LoRA<float> no_dropout(Linear<float>(10, 10, rng), {.rank = 2}, rng);
  CHECK_THROWS_WITH(ckpt.restore("adapters/layers.0.attn.q_proj", no_dropout), Contains("has no component"));
  CHECK_THROWS_WITH(rankwise::load_state(ckpt.component("adapters").child("layers.0.attn.q_proj"), no_dropout),
                    Contains("was saved with dropout 0.2 and init kaiming_uniform but the model's LoRA has 0 and"));
  CHECK(no_dropout.rank() == 2);  // nothing changed

  Parameter<float> small{"layers.0.attn.q_proj.base_layer.weight", Matrix<float>::Zero(3, 3), {}, false, false};
  Parameter<float> missing{"nope", Matrix<float>::Zero(1, 1), {}, false, false};
  CHECK_THROWS_WITH(ckpt.restore("base", std::vector<Parameter<float>*>{&small, &missing}),
                    Contains("2 parameter(s) do not match") &&
                        Contains("'layers.0.attn.q_proj.base_layer.weight' is 10 x 10 in the checkpoint but 3 x 3 in the model") &&
                        Contains("'nope' is not in the checkpoint"));
  CHECK(small.value.isZero());

  SGD<float> sgd(run.optimizer->groups(), {});
  CHECK_THROWS_WITH(ckpt.restore("optimizer", sgd), Contains("holds a 'AdamW' optimizer, not SGD"));
  Parameter<float> lone{"lone", Matrix<float>::Zero(2, 2), Matrix<float>::Zero(2, 2), true, false};
  AdamW<float> unrelated({&lone}, {});
  CHECK_THROWS_WITH(ckpt.restore("optimizer", unrelated), Contains("does not fit the optimizer") && Contains("not a parameter"));
  CHECK_THROWS_WITH(ckpt.restore("data_rng", unrelated), Contains("component 'data_rng': 'kind' is missing"));
}

TEST_CASE("Checkpoint: a corrupted or hostile checkpoint raises FormatError", "[io][checkpoint][errors]") {
  TempDir dir("ckpt_bad");
  Run run(9);
  run.save(dir.path);
  const std::string manifest = read_text(dir.path / "checkpoint.json");
  const auto rewrite = [&](const std::string& from, const std::string& to) {
    std::string m = manifest;
    m.replace(m.find(from), from.size(), to);
    write_text(dir.path / "checkpoint.json", m);
  };
  rewrite("\"tensors-1.safetensors\"", "\"../tensors-1.safetensors\"");
  CHECK_THROWS_WITH(CheckpointReader(dir.path), Contains("checkpoint.json' at byte 0: expected \"tensors\" to name a file"));
  rewrite("\"rankwise.checkpoint\"", "\"other\"");
  CHECK_THROWS_WITH(CheckpointReader(dir.path), Contains("expected a rankwise checkpoint"));
  rewrite("\"version\": 1", "\"version\": 2");
  CHECK_THROWS_WITH(CheckpointReader(dir.path), Contains("expected \"version\": 1 (got 2)"));
  write_text(dir.path / "checkpoint.json", manifest.substr(0, manifest.size() / 2));
  CHECK_THROWS_WITH(CheckpointReader(dir.path), Contains("not valid JSON"));
  write_text(dir.path / "checkpoint.json", manifest);
  fs::resize_file(dir.path / "tensors-1.safetensors", fs::file_size(dir.path / "tensors-1.safetensors") - 3);
  CHECK_THROWS_WITH(CheckpointReader(dir.path), Contains("tensors-1.safetensors' at byte") && Contains("data buffer holds"));
  fs::remove(dir.path / "checkpoint.json");
  CHECK_THROWS_AS(CheckpointReader(dir.path), rankwise::IoError);
}

TEST_CASE("Checkpoint: component names and writers are checked", "[io][checkpoint][errors]") {
  CheckpointWriter ckpt;
  Random rng(1);
  CHECK_THROWS_WITH(ckpt.add("a/b", rng), Contains("without '/'"));
  ckpt.add("rng", rng);
  CHECK_THROWS_WITH(ckpt.add("rng", rng), Contains("component 'rng' was added twice"));
  CHECK_THROWS_AS(ckpt.set_step(-1), rankwise::InvalidArgument);
  LoRA<float> lora(Linear<float>(4, 4, rng), {.rank = 2}, rng);
  lora.merge();
  CHECK_THROWS_AS(ckpt.add("lora", lora), rankwise::StateError);
  static_assert(rankwise::Checkpointable<LoRA<float>>);
  static_assert(rankwise::Checkpointable<AdamW<double>>);
  static_assert(rankwise::Checkpointable<Random>);
}

TEST_CASE("rankwise adapter directory: the whole LoRA state round-trips bit for bit", "[io][checkpoint]") {
  TempDir dir("rankwise_adapter");
  Random rng(10);
  LoRA<float> a(Linear<float>(6, 5, rng), {.rank = 4, .alpha = 3.0, .use_rslora = true}, rng);
  LoRA<float> b(Linear<float>(5, 6, rng), {.rank = 3, .init = rankwise::LoRAInit::Gaussian}, rng);
  a.B_parameter().value = random_matrix<float>(5, 4, rng);
  b.B_parameter().value = random_matrix<float>(6, 3, rng);
  a.set_gate(2, 0.25);
  b.set_scale(0.1 + 0.2);
  b.set_enabled(false);
  std::vector<NamedAdapter<LoRA<float>>> saved = {{"a", &a}, {"b", &b}};
  rankwise::save_rankwise_adapter(dir.path, saved);

  LoRA<float> a2(a.base(), {.rank = 1, .use_rslora = false}, rng);
  LoRA<float> b2(b.base(), {.rank = 1, .init = rankwise::LoRAInit::Gaussian}, rng);
  std::vector<NamedAdapter<LoRA<float>>> loaded = {{"a", &a2}, {"b", &b2}};
  rankwise::load_rankwise_adapter(dir.path, loaded);
  CHECK(same_bits(a2.A(), a.A()));
  CHECK(same_bits(b2.B(), b.B()));
  CHECK(a2.gates() == a.gates());
  CHECK(a2.scale() == a.scale());
  CHECK(a2.options().use_rslora);
  CHECK(b2.scale() == 0.1 + 0.2);
  CHECK_FALSE(b2.is_enabled());
  CHECK(b2.dropout_generator() == b.dropout_generator());
  const Matrix<float> x = random_matrix<float>(6, 3, rng);
  Matrix<float> y1, y2;
  a.set_training(false);
  a2.set_training(false);
  a.forward(x, y1);
  a2.forward(x, y2);
  CHECK(same_bits(y1, y2));
  const std::string json = read_text(dir.path / "rankwise_adapter.json");
  CHECK_THAT(json, Contains("\"format\": \"rankwise.adapter\"") && Contains("\"kind\": \"lora\""));
  CHECK(rankwise::SafetensorsReader(dir.path / "rankwise_adapter.safetensors").contains("a/lora_A"));

  write_text(dir.path / "rankwise_adapter.json", "{\"format\": \"rankwise.adapter\", \"version\": 3}");
  CHECK_THROWS_WITH(rankwise::load_rankwise_adapter(dir.path, loaded), Contains("expected {\"format\": \"rankwise.adapter\""));
}

namespace {
// One slot of every kind, with random trainable values so that a missed tensor would show.
std::vector<rankwise::AnyLinear<float>> family(Random& rng, const std::shared_ptr<const rankwise::VeRAProjections<float>>& bank) {
  using rankwise::AdapterSpec;
  std::vector<rankwise::AnyLinear<float>> slots;
  Random base_rng(77);  // the same base weights every time
  const rankwise::AdapterContext<float> context{bank};
  slots.push_back(rankwise::make_linear(Linear<float>(8, 8, base_rng), AdapterSpec{"lora", rankwise::LoRAOptions{.rank = 3}}, rng, context));
  slots.push_back(rankwise::make_linear(Linear<float>(8, 8, base_rng), AdapterSpec{"dylora", rankwise::DyLoRAOptions{.max_rank = 4}}, rng, context));
  slots.push_back(rankwise::make_linear(Linear<float>(8, 12, base_rng), AdapterSpec{"vera", std::monostate{}}, rng, context));
  slots.push_back(rankwise::make_linear(Linear<float>(8, 8, base_rng), AdapterSpec{"melora", rankwise::MELoRAOptions{.n = 2, .mini_rank = 2}}, rng, context));
  slots.push_back(rankwise::make_linear(Linear<float>(8, 8, base_rng), AdapterSpec{"red", std::monostate{}}, rng, context));
  slots.push_back(rankwise::make_linear(Linear<float>(8, 8, base_rng), AdapterSpec{"linear", std::monostate{}}, rng, context));
  return slots;
}

std::vector<NamedAdapter<rankwise::AnyLinear<float>>> named(std::vector<rankwise::AnyLinear<float>>& slots) {
  std::vector<NamedAdapter<rankwise::AnyLinear<float>>> out;
  for (auto& slot : slots) out.push_back({"layers.0." + slot.kind(), &slot});
  return out;
}
}  // namespace

TEST_CASE("rankwise adapter directory: every adapter kind, in model slots, round-trips bit for bit", "[io][checkpoint]") {
  TempDir dir("family");
  Random rng(30);
  const auto bank = rankwise::VeRAProjections<float>::make(4, 8, 12, rng);
  std::vector<rankwise::AnyLinear<float>> saved = family(rng, bank);
  for (auto& slot : saved)  // a plain Linear slot's weights are the model's, not an adapter's: left alone
    for (Parameter<float>* p : slot.parameters())
      if (p->trainable && slot.kind() != "linear") p->value = random_matrix<float>(p->value.rows(), p->value.cols(), rng);
  saved[1].as<rankwise::DyLoRA<float>>().set_window(1, 3);
  const auto modules = named(saved);
  rankwise::save_rankwise_adapter(dir.path, modules);

  Random other(31);
  std::vector<rankwise::AnyLinear<float>> loaded = family(other, bank);
  rankwise::load_rankwise_adapter(dir.path, named(loaded));
  CHECK(loaded[1].as<rankwise::DyLoRA<float>>().active_rank() == 3);
  CHECK(loaded[1].as<rankwise::DyLoRA<float>>().window_begin() == 1);
  const Matrix<float> x = random_matrix<float>(8, 5, rng);
  for (std::size_t i = 0; i < saved.size(); ++i) {
    CAPTURE(saved[i].kind());
    Matrix<float> y1, y2;
    saved[i].set_training(false);
    loaded[i].set_training(false);
    saved[i].forward(x, y1);
    loaded[i].forward(x, y2);
    CHECK(same_bits(y1, y2));
  }

  // The VeRA vectors belong to their bank: other projections are refused; so is another kind.
  std::vector<rankwise::AnyLinear<float>> wrong_bank = family(other, rankwise::VeRAProjections<float>::make(4, 8, 12, other));
  CHECK_THROWS_WITH(rankwise::load_rankwise_adapter(dir.path, named(wrong_bank)),
                    Contains("component 'layers.0.vera': was trained over other projections"));
  std::vector<rankwise::AnyLinear<float>> swapped = family(other, bank);
  std::swap(swapped[0], swapped[1]);
  std::vector<NamedAdapter<rankwise::AnyLinear<float>>> swapped_modules = {{"layers.0.lora", &swapped[0]}, {"layers.0.dylora", &swapped[1]},
      {"layers.0.vera", &swapped[2]}, {"layers.0.melora", &swapped[3]}, {"layers.0.red", &swapped[4]}, {"layers.0.linear", &swapped[5]}};
  CHECK_THROWS_WITH(rankwise::load_rankwise_adapter(dir.path, swapped_modules),
                    Contains("component 'layers.0.lora': holds a 'lora' slot but the model's is 'dylora'"));
}

TEST_CASE("Checkpoint: VeRA's shared bank is saved once and read back as a bank", "[io][checkpoint]") {
  TempDir dir("bank");
  Random rng(32);
  const auto bank = rankwise::VeRAProjections<double>::make(3, 6, 5, rng);
  CheckpointWriter ckpt;
  ckpt.add("vera_bank", *bank);
  ckpt.write(dir.path);
  const auto back = rankwise::read_vera_projections<double>(CheckpointReader(dir.path).component("vera_bank"));
  CHECK(same_bits(back->A(), bank->A()));
  CHECK(same_bits(back->B(), bank->B()));
}

namespace {
// A run whose ranks move: three LoRA modules, AdamW, an ALoRA-style allocator driven by a stateful
// estimator (AdaLoRA's sensitivity scores or Fisher drop costs), and a DyLoRA sampler whose draws feed
// the data (only to give it a stream).
template <typename Estimator>
struct AllocatingRun {
  std::vector<std::unique_ptr<LoRA<float>>> layers;
  std::vector<NamedAdapter<LoRA<float>>> adapters;
  std::vector<Parameter<float>*> base;
  std::unique_ptr<AdamW<float>> optimizer;
  Estimator importance;
  std::unique_ptr<rankwise::RankAllocator<float>> allocator;
  std::unique_ptr<rankwise::DyLoRASampler> sampler;
  Random data;

  explicit AllocatingRun(std::uint64_t seed) : data(seed + 1) {
    Random init(seed);
    std::vector<rankwise::RankModule<float>> modules;
    std::vector<Parameter<float>*> params;
    for (int i = 0; i < 3; ++i) {
      layers.push_back(std::make_unique<LoRA<float>>(Linear<float>(6, 6, init), rankwise::LoRAOptions{.rank = 4}, init));
      const std::string path = "layers." + std::to_string(i) + ".proj";
      layers.back()->set_path(path);
      adapters.push_back({path, layers.back().get()});
      modules.emplace_back(*layers.back(), path);
      for (Parameter<float>* p : layers.back()->parameters()) (p->trainable ? params : base).push_back(p);
    }
    optimizer = std::make_unique<AdamW<float>>(params, rankwise::AdamWOptions{.lr = 0.03});
    rankwise::RankAllocatorOptions options;
    options.warmup_steps = 3;
    options.rounds = 3;
    options.ranks_per_round = 2;
    options.recovery_steps = 3;
    allocator = std::make_unique<rankwise::RankAllocator<float>>(modules, importance, options, init);
    allocator->add_optimizer(*optimizer);
    sampler = std::make_unique<rankwise::DyLoRASampler>(rankwise::DyLoRASamplerOptions{.min_rank = 1, .max_rank = 4}, init);
  }

  void train_step() {
    const auto scale = float(sampler->sample());
    const Matrix<float> x = random_matrix<float>(6, 8, data), target = scale * random_matrix<float>(6, 8, data);
    Matrix<float> h = x, y, dy, dx;
    for (auto& layer : layers) {
      layer->forward(h, y);
      h = y;
    }
    dy = y - target;
    for (auto it = layers.rbegin(); it != layers.rend(); ++it) {
      (*it)->backward(dy, dx);
      dy = dx;
    }
    optimizer->step();
    allocator->step();
    for (auto& layer : layers) layer->zero_grad();
  }

  void save(const fs::path& dir) const {
    CheckpointWriter ckpt;
    ckpt.add("base", base);
    ckpt.add("adapters", adapters);
    ckpt.add("optimizer", *optimizer);
    ckpt.add("importance", importance);
    ckpt.add("allocator", *allocator);
    ckpt.add("sampler", *sampler);
    ckpt.add("data", data);
    ckpt.write(dir);
  }
  void load(const fs::path& dir) {
    CheckpointReader ckpt(dir);
    ckpt.restore("base", base);
    ckpt.restore("adapters", adapters);
    ckpt.restore("optimizer", *optimizer);
    ckpt.restore("importance", importance);
    ckpt.restore("allocator", *allocator);
    ckpt.restore("sampler", *sampler);
    ckpt.restore("data", data);
  }
};
}  // namespace

TEMPLATE_TEST_CASE("Checkpoint: a run with rank allocation and a rank sampler resumes bit for bit", "[io][checkpoint]",
                   rankwise::SensitivityImportance<float>, rankwise::FisherImportance<float>) {
  using Run = AllocatingRun<TestType>;
  TempDir dir("allocating");
  Run uninterrupted(3);
  for (int i = 0; i < 14; ++i) uninterrupted.train_step();
  REQUIRE(uninterrupted.allocator->rounds_done() == 3);

  Run first(3);
  for (int i = 0; i < 5; ++i) first.train_step();  // rounds at steps 3, 6 and 9: one done, the next due
  REQUIRE(first.allocator->rounds_done() == 1);
  first.save(dir.path);
  Run resumed(42);
  resumed.load(dir.path);
  CHECK(resumed.allocator->steps() == 5);
  CHECK(resumed.allocator->rounds_done() == 1);
  CHECK(resumed.allocator->events().size() == first.allocator->events().size());
  CHECK(resumed.allocator->ranks() == first.allocator->ranks());
  for (int i = 0; i < 9; ++i) resumed.train_step();

  CHECK(resumed.allocator->rounds_done() == 3);
  CHECK(resumed.allocator->ranks() == uninterrupted.allocator->ranks());
  CHECK(resumed.allocator->format_events() == uninterrupted.allocator->format_events());
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(same_bits(resumed.layers[i]->A(), uninterrupted.layers[i]->A()));
    CHECK(same_bits(resumed.layers[i]->B(), uninterrupted.layers[i]->B()));
  }
  CHECK(resumed.data == uninterrupted.data);
}

TEST_CASE("Checkpoint: a Fisher estimator's state is refused when it cannot be its own", "[io][checkpoint]") {
  TempDir dir("fisher");
  AllocatingRun<rankwise::FisherImportance<float>> run(7);
  for (int i = 0; i < 4; ++i) run.train_step();
  REQUIRE(run.importance.observations() == 4);
  {
    CheckpointWriter ckpt;
    ckpt.add("importance", run.importance);
    ckpt.write(dir.path);
  }
  // Another EMA factor: the saved EMA would mean another thing.
  rankwise::FisherImportance<float> other_beta({.beta = 0.9});
  CHECK_THROWS_WITH(CheckpointReader(dir.path).restore("importance", other_beta),
                    Contains("component 'importance': was saved with beta 0.95 but the estimator has 0.9"));
  CHECK(other_beta.observations() == 0);
  // The same factor: every rank's EMA and count come back.
  rankwise::FisherImportance<float> back;
  CheckpointReader(dir.path).restore("importance", back);
  CHECK(back.observations() == 4);
  REQUIRE(back.moments().size() == run.importance.moments().size());
  for (const auto& [name, m] : run.importance.moments()) {
    CHECK(same_bits(Matrix<double>(back.moments().at(name).ema), Matrix<double>(m.ema)));
    CHECK(same_bits(Matrix<double>(back.moments().at(name).steps), Matrix<double>(m.steps)));
  }
  // restore() itself refuses states no run can reach, and keeps its own.
  auto moments = run.importance.moments();
  moments.begin()->second.ema(0) = -1.0;
  CHECK_THROWS_WITH(back.restore(4, moments), Contains("must be finite and >= 0 (got -1)"));
  moments = run.importance.moments();
  moments.begin()->second.steps(0) = 5.0;
  CHECK_THROWS_WITH(back.restore(4, moments), Contains("must be a whole number in [0, observations = 4] (got 5)"));
  moments = run.importance.moments();
  moments.begin()->second.steps.resize(1);
  CHECK_THROWS_WITH(back.restore(4, moments), Contains("observation counts"));
  CHECK(back.observations() == 4);
}

namespace checkpoint_rules {

// A LoRA state as a damaged or hand-made file could hold it: every key of LoRA's component, with the
// values chosen by the test.
struct LoRAStateFile {
  Index in = 8, out = 8, rank = 2;
  double alpha = 4.0, scale = 2.0;
  std::int64_t scale_rank = 2;
  float a_value = 0.5f;
};
void save_state(rankwise::StateWriter& w, const LoRAStateFile& f) {
  w.matrix("lora_A", Matrix<float>(Matrix<float>::Constant(f.rank, f.in, f.a_value)));
  w.matrix("lora_B", Matrix<float>(Matrix<float>::Zero(f.out, f.rank)));
  w.vector("gates", Matrix<float>(Matrix<float>::Ones(f.rank, 1)));
  nlohmann::json& j = w.json();
  j["kind"] = "lora";
  j["in_features"] = f.in;
  j["out_features"] = f.out;
  j["rank"] = f.rank;
  j["alpha"] = f.alpha;
  j["scale_rank"] = f.scale_rank;
  j["use_rslora"] = false;
  j["scale"] = f.scale;
  j["dropout"] = 0.0;
  j["init"] = "kaiming_uniform";
  j["enabled"] = true;
  rankwise::StateWriter g = w.child("dropout_generator");
  save_state(g, Random(1));
}
void load_state(const rankwise::StateReader& in, LoRAStateFile&) { in.fail("not read in this test"); }

}  // namespace checkpoint_rules

TEST_CASE("load_state: a LoRA state follows the constructor's rules, anything else is refused with nothing changed",
          "[io][checkpoint][errors]") {
  // Regressions: each of these states loaded before.
  using checkpoint_rules::LoRAStateFile;
  TempDir dir("lora_rules");
  Random rng(3);
  LoRA<float> lora(Linear<float>(8, 8, rng), {.rank = 2, .alpha = 4.0}, rng);
  const Matrix<float> A = lora.A();
  const auto refused = [&](const LoRAStateFile& file, const std::string& message) {
    CheckpointWriter w;
    w.add("lora", file);
    w.write(dir.path);
    CheckpointReader reader(dir.path);
    CHECK_THROWS_AS(reader.restore("lora", lora), FormatError);
    CHECK_THROWS_WITH(reader.restore("lora", lora), Contains(message));
    CHECK(lora.A() == A);
    CHECK(lora.scale() == 2.0);
  };
  refused({.rank = 64}, "the rank must be at most min(in, out) = 8 (got 64)");
  refused({.a_value = std::numeric_limits<float>::infinity()}, "A and B must be finite");
  refused({.scale_rank = std::int64_t(1) << 62}, "scale rank must be in [1, min(in, out)] = [1, 8] (got 4611686018427387904)");
  refused({.alpha = 1e300, .scale = 5e299}, "is not a finite number > 0 in the adapter's precision");
  refused({.scale = 1e300}, "'scale' must be a finite number > 0 in the adapter's precision");
  // The same writer with valid values is accepted (the test's file is right but for the value changed).
  CheckpointWriter w;
  w.add("lora", LoRAStateFile{.a_value = 0.25f});
  w.write(dir.path);
  CheckpointReader(dir.path).restore("lora", lora);
  CHECK(lora.A()(0, 0) == 0.25f);
}
