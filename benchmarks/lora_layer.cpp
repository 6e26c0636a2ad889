// benchmarks/lora_layer: what LoRA costs on top of its frozen Linear, and how close the layer runs
// to the machine's GEMM speed measured in the same run.
//
// For in = out = d in {256, 1024, 4096}, 512 tokens, float, r in {8, 64}, threads in {1, 2}:
//   gemm           W x, a plain Eigen product of the same size (the yardstick)
//   linear_fwd     frozen Linear forward (eval)        lora_fwd     LoRA forward, unmerged (eval)
//   merged_fwd     LoRA forward after merge() (eval)   linear_fb    frozen Linear forward + backward
//   lora_fb        LoRA forward + backward             lora_step    forward + backward + AdamW step
// Counters: GFLOP/s from the products' FLOP count (2 m n k each), allocs and bytes per iteration
// (heap allocations of the whole process, counted by replacing malloc).
// Run: build/bench/benchmarks/lora_layer [--benchmark_filter=...]; docs/benchmarks.md has the table.
#include <rankwise/adapters/lora.hpp>
#include <rankwise/layers/linear.hpp>
#include <rankwise/optim/adamw.hpp>

#include "alloc/counting_malloc.hpp"
#include "bench_context.hpp"

#include <benchmark/benchmark.h>
#include <malloc.h>

#include <cstdio>
#include <string>

namespace {
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::bench::set_threads;

constexpr Index kTokens = 512;

Matrix<float> random_input(Index rows, Index cols, Random& rng) {
  Matrix<float> x(rows, cols);
  rankwise::fill_normal(x, 0.0, 1.0, rng);
  return x;
}

double gemm_flops(Index m, Index k, Index n) { return 2.0 * double(m) * double(k) * double(n); }

void report(benchmark::State& state, double flops_per_iteration, const rankwise::test_support::AllocationCount& a,
            long counted_iterations) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_iteration * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["allocs/iter"] = counted_iterations ? double(a.calls) / double(counted_iterations) : 0.0;
  state.counters["KiB/iter"] = counted_iterations ? double(a.bytes) / 1024.0 / double(counted_iterations) : 0.0;
}

// Runs `body` in the timed loop; counts allocations of every iteration after the first few.
template <typename Body>
void timed(benchmark::State& state, double flops, Body&& body) {
  body();  // warm-up: buffers and optimizer state take their final shapes
  body();
  long counted = 0;
  rankwise::test_support::AllocationCount total;
  for (auto _ : state) {
    rankwise::test_support::start_counting_allocations();
    body();
    const auto a = rankwise::test_support::stop_counting_allocations();
    total.calls += a.calls;
    total.bytes += a.bytes;
    ++counted;
  }
  report(state, flops, total, counted);
}

struct Fixture {
  Index d, r;
  Random rng{7};
  rankwise::LoRA<float> lora;
  Matrix<float> x, dy, y, dx;
  Fixture(Index d_, Index r_)
      : d(d_), r(r_), lora(rankwise::Linear<float>(d_, d_, rng), {.rank = r_, .alpha = 2.0 * double(r_)}, rng) {
    // Non-zero B so that the branch does real work.
    rankwise::fill_normal(lora.B_parameter().value, 0.0, 0.02, rng);
    x = random_input(d, kTokens, rng);
    dy = random_input(d, kTokens, rng);
  }
  double base_flops() const { return gemm_flops(d, d, kTokens); }
  double branch_flops() const { return 2.0 * gemm_flops(r, d, kTokens); }  // A x and B u
};

void BM_gemm(benchmark::State& state) {
  set_threads(int(state.range(2)));
  const Index d = state.range(0);
  Random rng(1);
  const Matrix<float> W = random_input(d, d, rng), x = random_input(d, kTokens, rng);
  Matrix<float> y(d, kTokens);
  timed(state, gemm_flops(d, d, kTokens), [&] {
    y.noalias() = W * x;
    benchmark::DoNotOptimize(y.data());
  });
}

void BM_linear_fwd(benchmark::State& state) {
  set_threads(int(state.range(2)));
  Fixture f(state.range(0), state.range(1));
  rankwise::Linear<float> base = f.lora.base();
  base.set_training(false);
  timed(state, f.base_flops(), [&] {
    base.forward(f.x, f.y);
    benchmark::DoNotOptimize(f.y.data());
  });
}

void BM_lora_fwd(benchmark::State& state) {
  set_threads(int(state.range(2)));
  Fixture f(state.range(0), state.range(1));
  f.lora.set_training(false);
  timed(state, f.base_flops() + f.branch_flops(), [&] {
    f.lora.forward(f.x, f.y);
    benchmark::DoNotOptimize(f.y.data());
  });
}

void BM_merged_fwd(benchmark::State& state) {
  set_threads(int(state.range(2)));
  Fixture f(state.range(0), state.range(1));
  f.lora.set_training(false);
  f.lora.merge();
  timed(state, f.base_flops(), [&] {
    f.lora.forward(f.x, f.y);
    benchmark::DoNotOptimize(f.y.data());
  });
}

void BM_linear_fb(benchmark::State& state) {
  set_threads(int(state.range(2)));
  Fixture f(state.range(0), state.range(1));
  rankwise::Linear<float> base = f.lora.base();
  timed(state, 2.0 * f.base_flops(), [&] {
    base.forward(f.x, f.y);
    base.backward(f.dy, f.dx);
    benchmark::DoNotOptimize(f.dx.data());
  });
}

void BM_lora_fb(benchmark::State& state) {
  set_threads(int(state.range(2)));
  Fixture f(state.range(0), state.range(1));
  // forward: W x, A x, B u; backward: W^T dy, dB, B^T dy, dA, A^T t.
  const double flops = 2.0 * f.base_flops() + 2.5 * f.branch_flops();
  timed(state, flops, [&] {
    f.lora.zero_grad();
    f.lora.forward(f.x, f.y);
    f.lora.backward(f.dy, f.dx);
    benchmark::DoNotOptimize(f.dx.data());
  });
}

void BM_lora_step(benchmark::State& state) {
  set_threads(int(state.range(2)));
  Fixture f(state.range(0), state.range(1));
  rankwise::AdamW<float> opt(f.lora.parameters(), {.lr = 1e-5});
  const double flops = 2.0 * f.base_flops() + 2.5 * f.branch_flops();
  timed(state, flops, [&] {
    f.lora.zero_grad();
    f.lora.forward(f.x, f.y);
    f.lora.backward(f.dy, f.dx);
    opt.step();
    benchmark::DoNotOptimize(f.dx.data());
  });
}

void sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "r", "threads"});
  for (long threads : {1, 2})
    for (long d : {256, 1024, 4096})
      for (long r : {8, 64}) b->Args({d, r, threads});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

void gemm_sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "r", "threads"});
  for (long threads : {1, 2})
    for (long d : {256, 1024, 4096}) b->Args({d, 0, threads});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
}  // namespace

BENCHMARK(BM_gemm)->Apply(gemm_sizes);
BENCHMARK(BM_linear_fwd)->Apply(sizes);
BENCHMARK(BM_lora_fwd)->Apply(sizes);
BENCHMARK(BM_merged_fwd)->Apply(sizes);
BENCHMARK(BM_linear_fb)->Apply(sizes);
BENCHMARK(BM_lora_fb)->Apply(sizes);
BENCHMARK(BM_lora_step)->Apply(sizes);

int main(int argc, char** argv) {
  namespace rb = rankwise::bench;
  // glibc unmaps and re-faults blocks above 128 KiB on every free (Eigen's GEMM packing buffers among
  // them); an application may keep them mapped. RANKWISE_BENCH_MALLOPT=0 measures the default.
  const bool tuned = rb::env_or("RANKWISE_BENCH_MALLOPT", "1") != "0";
  if (tuned) {
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
  }
  benchmark::AddCustomContext("cpu", rb::cpu_model());
  benchmark::AddCustomContext("compiler", rb::compiler());
  benchmark::AddCustomContext("flags", RANKWISE_BENCH_FLAGS);
  benchmark::AddCustomContext("eigen", rb::eigen_version() + ", SIMD " + rb::simd());
  benchmark::AddCustomContext("products", rb::backend());
  benchmark::AddCustomContext("OPENBLAS_CORETYPE", rb::env_or("OPENBLAS_CORETYPE", "(unset)"));
  benchmark::AddCustomContext("OPENBLAS_L2_SIZE", rb::env_or("OPENBLAS_L2_SIZE", "(unset)"));
  benchmark::AddCustomContext("malloc", tuned ? "mmap/trim thresholds raised (mallopt)" : "glibc defaults");
  benchmark::AddCustomContext("tokens", std::to_string(kTokens));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
