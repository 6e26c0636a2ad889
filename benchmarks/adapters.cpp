// adapters: forward + backward of every adapter at in = out = 1024, 512 tokens, float, next to LoRA and
// the frozen Linear it wraps; BoRA's routed multi-task step against D separate LoRA steps. Reports time, FLOP/s (useful FLOPs of the method) and trainable parameters,
// and a memory report of a model whose VeRA layers share one bank.
// Run: build/bench/benchmarks/bench_adapters [--benchmark_filter=...]; docs/benchmarks.md has the table.
#include <rankwise/rankwise.hpp>

#include "bench_context.hpp"

#include <benchmark/benchmark.h>

#include <malloc.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace {

using rankwise::Index;
using rankwise::Linear;
using rankwise::Matrix;
using rankwise::Random;

constexpr Index kIn = 1024, kOut = 1024, kTokens = 512;

// Times forward + backward of `layer`; `flops` is the useful work of one such pass.
template <typename LayerType>
void run(benchmark::State& state, LayerType& layer, double flops, Index trainable) {
  Random rng(7);
  Matrix<float> x(kIn, kTokens), dy(kOut, kTokens), y, dx;
  rankwise::fill_normal(x, 0.0, 1.0, rng);
  rankwise::fill_normal(dy, 0.0, 1.0, rng);
  layer.set_training(true);
  for (int i = 0; i < 2; ++i) {  // size every buffer before timing
    layer.forward(x, y);
    layer.backward(dy, dx);
  }
  for (auto _ : state) {
    layer.forward(x, y);
    layer.backward(dy, dx);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["trainable"] = double(trainable);
}

// FLOPs of the pieces, n = tokens.
constexpr double kN = double(kTokens);
constexpr double frozen_flops() { return 4.0 * kIn * kOut * kN; }  // W x and W^T dy
constexpr double lora_flops(double r) { return frozen_flops() + 6.0 * r * kN * (kIn + kOut); }
// Frozen DyLoRA: the forward and dU at rank b, gradients of one component only.
constexpr double dylora_frozen_flops(double b) {
  return frozen_flops() + 4.0 * b * kN * (kIn + kOut) + 2.0 * kN * (kIn + kOut);
}
constexpr double window_flops(double lo, double b) {
  return frozen_flops() + 4.0 * b * kN * (kIn + kOut) + 2.0 * (b - lo) * kN * (kIn + kOut);
}
constexpr double vera_flops(double r) { return frozen_flops() + 4.0 * r * kN * (kIn + kOut); }

void BM_Linear_frozen(benchmark::State& state) {
  Random rng(1);
  Linear<float> layer(kIn, kOut, rng, {.trainable = false});
  run(state, layer, frozen_flops(), 0);
}

void BM_LoRA(benchmark::State& state) {
  Random rng(1);
  const Index r = state.range(0);
  rankwise::LoRA<float> layer(Linear<float>(kIn, kOut, rng), {.rank = r, .alpha = 16.0}, rng);
  run(state, layer, lora_flops(double(r)), layer.trainable_parameter_count());
}

void BM_DyLoRA(benchmark::State& state) {
  Random rng(1);
  const Index b = state.range(0);
  const bool frozen = state.range(1) != 0;
  rankwise::DyLoRA<float> layer(Linear<float>(kIn, kOut, rng), {.max_rank = 8, .frozen = frozen}, rng);
  layer.set_active_rank(b);
  run(state, layer, frozen ? dylora_frozen_flops(double(b)) : lora_flops(double(b)), layer.trainable_parameter_count());
  state.SetLabel(frozen ? "r_max 8, frozen" : "r_max 8, non-frozen");
}

void BM_ERAT_window(benchmark::State& state) {
  Random rng(1);
  rankwise::DyLoRA<float> layer(Linear<float>(kIn, kOut, rng), {.max_rank = 8}, rng);
  layer.set_window(2, 6);
  run(state, layer, window_flops(2.0, 6.0), layer.trainable_parameter_count());
  state.SetLabel("r_max 8, window [2, 6)");
}

void BM_VeRA(benchmark::State& state) {
  Random rng(1);
  const Index r = state.range(0);
  auto bank = rankwise::VeRAProjections<float>::make(r, kIn, kOut, rng);
  rankwise::VeRA<float> layer(Linear<float>(kIn, kOut, rng), bank);
  run(state, layer, vera_flops(double(r)), layer.trainable_parameter_count());
}

void BM_RED(benchmark::State& state) {
  Random rng(1);
  rankwise::RED<float> layer(Linear<float>(kIn, kOut, rng));
  run(state, layer, frozen_flops(), layer.trainable_parameter_count());
}

void BM_MELoRA(benchmark::State& state) {
  Random rng(1);
  const Index n = state.range(0), r = state.range(1);
  rankwise::MELoRA<float> layer(Linear<float>(kIn, kOut, rng), {.n = n, .mini_rank = r}, rng);
  run(state, layer, lora_flops(double(r)), layer.trainable_parameter_count());
  state.SetLabel("equivalent rank " + std::to_string(n * r));
}

void BM_AnyLinear_LoRA(benchmark::State& state) {  // the cost of the type-erased slot
  Random rng(1);
  rankwise::AnyLinear<float> layer =
      rankwise::make_linear(Linear<float>(kIn, kOut, rng), {"lora", rankwise::LoRAOptions{.rank = 8}}, rng);
  run(state, layer, lora_flops(8.0), layer.trainable_parameter_count());
}

// BoRA, r = 8, D tasks: the 512 tokens routed in runs of `run` columns, task after task (a run of 64
// is a sequence per task; 1 mixes tasks column by column). The target: at most 1.2x one LoRA
// step (BM_LoRA/8) on the same tokens.
void BM_BoRA_routed(benchmark::State& state) {
  Random rng(1);
  const Index tasks = state.range(0), run_length = state.range(1);
  rankwise::BoRA<float> layer(Linear<float>(kIn, kOut, rng), {.tasks = tasks, .rank = 8, .alpha = 16.0}, rng);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(kTokens));
  for (std::size_t j = 0; j < ids.size(); ++j) ids[j] = std::int32_t((Index(j) / run_length) % tasks);
  layer.set_routing(rankwise::TaskRouting(ids, tasks));
  run(state, layer, lora_flops(8.0), layer.trainable_parameter_count());
}

// The alternative to routing: D separate LoRA steps (r = 8), each on its task's 512 / D tokens.
void BM_LoRA_per_task(benchmark::State& state) {
  Random rng(1);
  const Index tasks = state.range(0), width = kTokens / tasks;
  std::vector<rankwise::LoRA<float>> layers;
  for (Index d = 0; d < tasks; ++d) layers.emplace_back(Linear<float>(kIn, kOut, rng), rankwise::LoRAOptions{.rank = 8, .alpha = 16.0}, rng);
  Matrix<float> x(kIn, kTokens), dy(kOut, kTokens);
  rankwise::fill_normal(x, 0.0, 1.0, rng);
  rankwise::fill_normal(dy, 0.0, 1.0, rng);
  std::vector<Matrix<float>> y(static_cast<std::size_t>(tasks)), dx(static_cast<std::size_t>(tasks));
  const auto step = [&] {
    for (Index d = 0; d < tasks; ++d) {
      layers[std::size_t(d)].forward(x.middleCols(d * width, width), y[std::size_t(d)]);
      layers[std::size_t(d)].backward(dy.middleCols(d * width, width), dx[std::size_t(d)]);
    }
  };
  step();
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(dx.back().data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(lora_flops(8.0) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["trainable"] = double(tasks * layers.front().trainable_parameter_count());
}

BENCHMARK(BM_Linear_frozen)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LoRA)->Arg(1)->Arg(4)->Arg(8)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DyLoRA)->Args({1, 1})->Args({4, 1})->Args({4, 0})->Args({8, 0})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ERAT_window)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_VeRA)->Arg(256)->Arg(1024)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RED)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MELoRA)->Args({8, 1})->Args({2, 4})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AnyLinear_LoRA)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_BoRA_routed)->Args({1, 512})->Args({4, 128})->Args({4, 64})->Args({4, 1})->Args({16, 32})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LoRA_per_task)->Arg(4)->Arg(16)->Unit(benchmark::kMillisecond);

// A model of 12 layers with VeRA on q and v: the shared bank must be counted once.
void print_memory_report() {
  Random rng(3);
  auto bank = rankwise::VeRAProjections<float>::make(256, kIn, kOut, rng);
  rankwise::AdapterContext<float> context{bank};
  std::vector<rankwise::AnyLinear<float>> slots;
  rankwise::MemoryReport report;
  for (int layer = 0; layer < 12; ++layer)
    for (int m = 0; m < 2; ++m) {
      slots.push_back(rankwise::make_linear(Linear<float>(kIn, kOut, rng, {.trainable = false}), {"vera", {}}, rng,
                                            context));
      report.add_layer(slots.back());
    }
  std::printf("memory report, 24 VeRA layers (1024 x 1024, r = 256) sharing one bank:\n");
  std::printf("  trainable %ld, frozen per-layer %ld, shared %ld scalars in %ld tensors (bank: %ld), %.1f MiB\n",
              long(report.trainable()), long(report.frozen()), long(report.shared()), long(report.shared_tensors()),
              long(bank->size()), double(report.bytes()) / (1024.0 * 1024.0));
}

}  // namespace

int main(int argc, char** argv) {
  namespace rb = rankwise::bench;
  // Keep Eigen's GEMM workspaces mapped between calls (docs/benchmarks.md, "Traps");
  // RANKWISE_BENCH_MALLOPT=0 measures glibc's defaults. One thread: the most repeatable figures.
  const bool tuned = rb::env_or("RANKWISE_BENCH_MALLOPT", "1") != "0";
  if (tuned) {
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
  }
  rb::set_threads(1);
  benchmark::AddCustomContext("cpu", rb::cpu_model());
  benchmark::AddCustomContext("compiler", rb::compiler());
  benchmark::AddCustomContext("flags", RANKWISE_BENCH_FLAGS);
  benchmark::AddCustomContext("eigen", rb::eigen_version() + ", SIMD " + rb::simd());
  benchmark::AddCustomContext("products", rb::backend());
  benchmark::AddCustomContext("OPENBLAS_CORETYPE", rb::env_or("OPENBLAS_CORETYPE", "(unset)"));
  benchmark::AddCustomContext("OPENBLAS_L2_SIZE", rb::env_or("OPENBLAS_L2_SIZE", "(unset)"));
  benchmark::AddCustomContext("malloc", tuned ? "mmap/trim thresholds raised (mallopt)" : "glibc defaults");
  benchmark::AddCustomContext("threads", "1");
  benchmark::AddCustomContext("shape", "in = out = 1024, 512 tokens, float");
  print_memory_report();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
