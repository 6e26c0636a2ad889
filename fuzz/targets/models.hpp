#pragma once
// The small fixed models the file-based fuzz targets load into, shared with fuzz/make_seeds.cpp so
// that the seeds are files these models accept. Built afresh for every input (a few microseconds):
// one execution never sees the state another left behind. Every dimension is at most 16.

#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/factory.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/melora.hpp>
#include <rankwise/adapters/red.hpp>
#include <rankwise/adapters/vera.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/io/named_adapter.hpp>
#include <rankwise/layers/linear.hpp>
#include <rankwise/models/trainer.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/sgd.hpp>
#include <rankwise/rank/allocator.hpp>
#include <rankwise/rank/dylora_sampler.hpp>
#include <rankwise/rank/importance.hpp>
#include <rankwise/rank/module.hpp>

#include <memory>
#include <string>
#include <vector>

namespace rankwise::fuzz {

/// A rows x cols matrix of standard normal draws.
inline Matrix<float> normal_matrix(Index rows, Index cols, Random& rng) {
  Matrix<float> m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) m(i, j) = float(rng.normal());
  return m;
}

/// A layer of the PEFT models: its path (as in a Llama-style model) and size.
struct LayerShape {
  const char* path;
  Index in;
  Index out;
};

inline constexpr LayerShape peft_layers[] = {
    {"model.layers.0.self_attn.q_proj", 16, 16},
    {"model.layers.0.self_attn.v_proj", 16, 8},
    {"model.layers.0.mlp.up_proj", 8, 16},
    {"model.layers.1.self_attn.q_proj", 16, 16},
};

/// LoRA adapters on the PEFT layers (rank 4 where it fits), the target of load_peft_adapter.
struct LoRAModel {
  std::vector<std::unique_ptr<LoRA<float>>> layers;
  std::vector<NamedAdapter<LoRA<float>>> modules;

  explicit LoRAModel(std::uint64_t seed, const LoRAOptions& options = {.rank = 4, .alpha = 8.0}) {
    Random rng(seed);
    for (const LayerShape& s : peft_layers) {
      layers.push_back(std::make_unique<LoRA<float>>(Linear<float>(s.in, s.out, rng), options, rng));
      layers.back()->set_path(s.path);
      modules.push_back({s.path, layers.back().get()});
    }
  }
};

/// VeRA adapters on the PEFT layers over `bank`, leaving out the layers the bank is too small for.
struct VeRAModel {
  std::vector<std::unique_ptr<VeRA<float>>> layers;
  std::vector<NamedAdapter<VeRA<float>>> modules;

  VeRAModel(std::uint64_t seed, const std::shared_ptr<const VeRAProjections<float>>& bank) {
    Random rng(seed);
    for (const LayerShape& s : peft_layers) {
      Linear<float> base(s.in, s.out, rng);
      if (s.in > bank->max_in() || s.out > bank->max_out()) continue;
      layers.push_back(std::make_unique<VeRA<float>>(std::move(base), bank));
      modules.push_back({s.path, layers.back().get()});
    }
  }
};

/// The projection bank of every VeRA adapter saved by rankwise's own formats (their loaders
/// recognise a bank by its fingerprint, so the seeds and the targets must draw the same one).
inline std::shared_ptr<const VeRAProjections<float>> fixed_bank() {
  Random rng(4242);
  return VeRAProjections<float>::make(4, 16, 16, rng);
}

/// One model slot of every kind, as rankwise's adapter directory and checkpoints hold them.
struct SlotModel {
  std::vector<AnyLinear<float>> slots;
  std::vector<NamedAdapter<AnyLinear<float>>> modules;

  SlotModel(std::uint64_t seed, const std::shared_ptr<const VeRAProjections<float>>& bank) {
    Random rng(seed);
    const AdapterContext<float> context{bank};
    slots.push_back(make_linear(Linear<float>(8, 8, rng), AdapterSpec{"lora", LoRAOptions{.rank = 3, .dropout = 0.1}}, rng, context));
    slots.push_back(make_linear(Linear<float>(8, 8, rng), AdapterSpec{"dylora", DyLoRAOptions{.max_rank = 4}}, rng, context));
    slots.push_back(make_linear(Linear<float>(8, 12, rng), AdapterSpec{"vera", std::monostate{}}, rng, context));
    slots.push_back(make_linear(Linear<float>(8, 8, rng), AdapterSpec{"melora", MELoRAOptions{.n = 2, .mini_rank = 2}}, rng, context));
    slots.push_back(make_linear(Linear<float>(8, 12, rng), AdapterSpec{"red", std::monostate{}}, rng, context));
    slots.push_back(make_linear(Linear<float>(6, 4, rng), AdapterSpec{"linear", std::monostate{}}, rng, context));
    for (AnyLinear<float>& slot : slots) modules.push_back({"model.layers.0." + slot.kind(), &slot});
  }
};

/// Everything a training run checkpoints, one of each kind that io/state.hpp and
/// models/trainer_state.hpp restore.
struct CheckpointModel {
  Random rng;
  std::shared_ptr<const VeRAProjections<float>> bank = fixed_bank();
  LoRA<float> lora;
  DyLoRA<float> dylora;
  VeRA<float> vera;
  MELoRA<float> melora;
  RED<float> red;
  Parameter<float> w, b;
  std::vector<Parameter<float>*> params;
  AdamW<float> adamw;
  SGD<float> sgd;
  Random generator;
  FisherImportance<float> fisher;
  RankAllocator<float> allocator;
  DyLoRASampler sampler;
  Trainer<float> trainer;
  SlotModel slots;

  explicit CheckpointModel(std::uint64_t seed)
      : rng(seed),
        lora(Linear<float>(12, 8, rng), {.rank = 4, .alpha = 8.0, .dropout = 0.1}, rng),
        dylora(Linear<float>(8, 8, rng), {.max_rank = 4}, rng),
        vera(Linear<float>(16, 12, rng), bank),
        melora(Linear<float>(8, 8, rng), {.n = 2, .mini_rank = 2}, rng),
        red(Linear<float>(8, 12, rng)),
        w(named("w", normal_matrix(4, 3, rng), false)),
        b(named("b", normal_matrix(5, 1, rng), true)),
        params{&w, &b},
        adamw(params, {.lr = 0.01}),
        sgd(params, {.lr = 0.01, .momentum = 0.9}),
        generator(seed + 1),
        allocator({RankModule<float>(lora, "model.lora")}, fisher, allocator_options(), rng),
        sampler({.min_rank = 1, .max_rank = 4}, rng),
        trainer(params, {.steps = 8}),
        slots(seed + 2, bank) {
    lora.set_path("model.lora");
    for (Parameter<float>* p : params) p->zero_grad();
  }
  CheckpointModel(const CheckpointModel&) = delete;
  CheckpointModel& operator=(const CheckpointModel&) = delete;

  static RankAllocatorOptions allocator_options() {
    RankAllocatorOptions options;
    options.warmup_steps = 2;
    options.rounds = 2;
    options.ranks_per_round = 1;
    options.recovery_steps = 2;
    return options;
  }

 private:
  static Parameter<float> named(const char* name, Matrix<float> value, bool is_vector) {
    Parameter<float> p;
    p.name = name;
    p.value = std::move(value);
    p.is_vector = is_vector;
    return p;
  }
};

}  // namespace rankwise::fuzz
