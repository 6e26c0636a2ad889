// What does one AB-LoRA scoring round cost, and what does the upstream-activation cache save?
// A stack of L adapted d x d layers (tanh between them) is scored on a fixed validation batch:
// the round should cost about (2 R + 1) validation forwards for R active ranks; with the cache,
// each ablated evaluation starts at the ablated layer, so on average it runs about half the stack.
// Counters: ranks, evaluations (full + partial), forward_equivalents = round time / one forward.
// Run: build/benchmarks/bench_allocator [--benchmark_format=csv]
#include <rankwise/rankwise.hpp>

#include "bench_context.hpp"

#include <benchmark/benchmark.h>

#include <chrono>
#include <deque>
#include <string>
#include <vector>

using rankwise::Index;
using rankwise::Matrix;

namespace {

constexpr Index kDim = 128;
constexpr Index kTokens = 256;
constexpr Index kLayers = 8;

struct Stack {
  rankwise::Random rng{1};
  std::deque<rankwise::LoRA<float>> layers;
  Matrix<float> x, target;
  Matrix<float> a, b;                           // ping-pong activations
  std::vector<Matrix<float>> cache[2];          // input of every layer, per slot
  std::vector<rankwise::RankModule<float>> modules;

  explicit Stack(Index rank) {
    for (Index l = 0; l < kLayers; ++l) {
      layers.emplace_back(rankwise::Linear<float>(kDim, kDim, rng), rankwise::LoRAOptions{.rank = rank}, rng);
      rankwise::fill_normal(layers.back().B_parameter().value, 0.0, 0.05, rng);  // trained-looking B
      layers.back().set_training(false);
      std::string path("layers.");
      path += std::to_string(l);
      path += ".proj";
      layers.back().set_path(path);
      modules.emplace_back(layers.back(), path);
    }
    x.resize(kDim, kTokens);
    target.resize(kDim, kTokens);
    rankwise::fill_normal(x, 0.0, 1.0, rng);
    rankwise::fill_normal(target, 0.0, 1.0, rng);
    cache[0].resize(kLayers);
    cache[1].resize(kLayers);
  }

  // Runs layers [first, L) from `input` and returns half the mean squared error, in double.
  double run_from(Index first, const Matrix<float>& input, std::vector<Matrix<float>>* keep) {
    const Matrix<float>* in = &input;
    for (Index l = first; l < kLayers; ++l) {
      if (keep) (*keep)[static_cast<std::size_t>(l)] = *in;
      Matrix<float>& out = (l % 2 == 0) ? a : b;
      layers[static_cast<std::size_t>(l)].forward(*in, out);
      if (l + 1 < kLayers) out.array() = out.array().tanh();
      in = &out;
    }
    return 0.5 * (*in - target).cast<double>().squaredNorm() / double(kTokens);
  }

  double evaluate() { return run_from(0, x, nullptr); }

  rankwise::StagedEvaluation staged() {
    rankwise::StagedEvaluation s;
    for (Index l = 0; l < kLayers; ++l) s.module_stage.push_back(l);
    s.capture = [this](int slot) { return run_from(0, x, &cache[slot]); };
    s.evaluate_from = [this](Index stage, int slot) {
      return run_from(stage, cache[slot][static_cast<std::size_t>(stage)], nullptr);
    };
    return s;
  }

  double seconds_per_forward() {
    for (int i = 0; i < 3; ++i) benchmark::DoNotOptimize(evaluate());
    const int n = 30;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) benchmark::DoNotOptimize(evaluate());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / n;
  }
};

void report(benchmark::State& state, const rankwise::ImportanceScores& s, double seconds, long rounds, double forward,
            Index ranks) {
  state.counters["ranks"] = double(ranks);
  state.counters["full_evals"] = double(s.full_evaluations);
  state.counters["partial_evals"] = double(s.partial_evaluations);
  state.counters["expected_forwards"] = double(2 * ranks + 1);
  state.counters["forward_equivalents"] = seconds / double(rounds) / forward;
  state.counters["forward_ms"] = forward * 1e3;
}

void BM_ValidationForward(benchmark::State& state) {
  Stack stack(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(stack.evaluate());
}

void BM_ScoringRound(benchmark::State& state) {
  Stack stack(state.range(0));
  const double forward = stack.seconds_per_forward();
  rankwise::AblationImportance<float> estimator([&] { return stack.evaluate(); });
  rankwise::ImportanceScores s;
  double seconds = 0.0;
  long rounds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    s = estimator.score(stack.modules);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++rounds;
  }
  report(state, s, seconds, rounds, forward, kLayers * state.range(0));
}

void BM_ScoringRoundCached(benchmark::State& state) {
  Stack stack(state.range(0));
  const double forward = stack.seconds_per_forward();
  rankwise::AblationImportance<float> estimator(stack.staged());
  rankwise::ImportanceScores s;
  double seconds = 0.0;
  long rounds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    s = estimator.score(stack.modules);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++rounds;
  }
  report(state, s, seconds, rounds, forward, kLayers * state.range(0));
}

}  // namespace

// Argument: rank per layer (8 layers, so R = 8 x rank).
BENCHMARK(BM_ValidationForward)->Arg(8)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ScoringRound)->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Arg(16)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ScoringRoundCached)->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Arg(16)->Unit(benchmark::kMillisecond);

int main(int argc, char** argv) {
  namespace rb = rankwise::bench;
  rb::set_threads(1);  // the most repeatable figures (docs/benchmarks.md, "Traps"), whatever OMP_NUM_THREADS says
  benchmark::AddCustomContext("cpu", rb::cpu_model());
  benchmark::AddCustomContext("compiler", rb::compiler());
  benchmark::AddCustomContext("flags", RANKWISE_BENCH_FLAGS);
  benchmark::AddCustomContext("eigen", rb::eigen_version() + ", SIMD " + rb::simd());
  benchmark::AddCustomContext("products", rb::backend());
  benchmark::AddCustomContext("threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("model", std::to_string(kLayers) + " LoRA layers " + std::to_string(kDim) + " x " +
                                           std::to_string(kDim) + ", tanh between, " + std::to_string(kTokens) +
                                           " validation tokens");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
