// benchmarks/toy_transformer: milliseconds per step and tokens/s of the toy transformer's reference
// configuration (vocab 128, d_model 128, 4 heads, 4 layers, d_ff 512, sequence 64, batch 32, float)
// for full fine-tuning (AdamW on every parameter), LoRA r = 8 on all six projections of every block
// (AdamW on the adapters only) and inference forward; with 1 and 2 threads; the achieved GFLOP/s next
// to a plain 512 x 128 times 128 x 2048 product measured in the same run; peak resident memory of
// full versus LoRA fine-tuning (each in a child process of its own); heap allocations per step; and
// the share of the step spent outside the linear layers (attention core, LayerNorm, GELU,
// cross-entropy, residual adds), from those pieces timed alone at the same shapes.
// Run: build/bench/benchmarks/toy_transformer [--steps N] [--threads-list 1,2]
#include <rankwise/adapters/lora.hpp>
#include <rankwise/layers/causal_attention.hpp>
#include <rankwise/layers/cross_entropy.hpp>
#include <rankwise/layers/gelu.hpp>
#include <rankwise/layers/layer_norm.hpp>
#include <rankwise/models/injection.hpp>
#include <rankwise/models/toy_transformer.hpp>
#include <rankwise/optim/adamw.hpp>

#include "alloc/counting_malloc.hpp"
#include "bench_context.hpp"

#include <malloc.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;
using Clock = std::chrono::steady_clock;

const rankwise::ToyTransformerConfig kConfig{.vocab = 128, .d_model = 128, .heads = 4, .layers = 4, .d_ff = 512,
                                             .max_seq_len = 64};
constexpr Index kSeq = 64, kBatch = 32, kTokens = kSeq * kBatch, kRank = 8;

enum class Mode { Full, LoRA, Inference };
const char* name(Mode m) { return m == Mode::Full ? "full fine-tuning" : m == Mode::LoRA ? "LoRA r=8, 6 projections" : "inference forward"; }

// FLOPs of the products of one step (2 m n k each), counted from the shapes.
double step_flops(Mode mode) {
  const double d = double(kConfig.d_model), ff = double(kConfig.d_ff), V = double(kConfig.vocab), n = double(kTokens);
  const double L = double(kConfig.layers), T = double(kSeq), r = double(kRank);
  const double linear_fwd = L * (4 * 2 * d * d + 2 * 2 * d * ff) * n + 2 * d * V * n;
  const double attention_fwd = L * 2 * 2 * T * d * n;  // K^T Q and V P over every sequence and head
  const double lora_fwd = L * (4 * 2 * r * (d + d) + 2 * r * (d + ff) * 2) * n;
  switch (mode) {
    case Mode::Inference: return linear_fwd + attention_fwd;
    case Mode::Full: return 3 * linear_fwd + 3 * attention_fwd;  // forward, dx and dW; attention backward is 4 products
    case Mode::LoRA: return 2 * linear_fwd + 3 * attention_fwd + 2.5 * lora_fwd;
  }
  return 0;
}

struct Measurement {
  double ms_per_step = 0;
  double allocations_per_step = 0;
};

std::vector<std::int32_t> random_tokens(Random& rng) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(kTokens));
  for (auto& v : t) v = std::int32_t(rng.uniform_int(0, kConfig.vocab - 1));
  return t;
}

Measurement run_mode(Mode mode, int steps) {
  Random rng(5);
  rankwise::ToyTransformer<float> model(kConfig, rng);
  if (mode == Mode::LoRA) {
    rankwise::InjectionOptions o;
    o.all_linear = true;
    o.adapter.options = rankwise::LoRAOptions{.rank = kRank, .alpha = 16.0};
    rankwise::inject_adapters(model, o, rng);
  }
  std::vector<rankwise::Parameter<float>*> params = model.parameters();
  rankwise::AdamW<float> opt(params, {.lr = 1e-4});
  rankwise::CrossEntropy<float> ce;
  const std::vector<std::int32_t> tokens = random_tokens(rng), targets = random_tokens(rng);
  Matrix<float> logits, dlogits;
  model.set_training(mode != Mode::Inference);
  const auto step = [&] {
    if (mode == Mode::Inference) {
      model.forward(tokens, kSeq, logits);
      return;
    }
    model.zero_grad();
    model.forward(tokens, kSeq, logits);
    ce.forward(logits, targets);
    ce.backward(dlogits);
    model.backward(dlogits);
    opt.step();
  };
  step();
  step();
  rankwise::test_support::start_counting_allocations();
  const auto start = Clock::now();
  for (int i = 0; i < steps; ++i) step();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const auto allocs = rankwise::test_support::stop_counting_allocations();
  return {1e3 * seconds / steps, double(allocs.calls) / steps};
}

double time_ms(int repeats, const std::function<void()>& f) {
  f();
  const auto start = Clock::now();
  for (int i = 0; i < repeats; ++i) f();
  return 1e3 * std::chrono::duration<double>(Clock::now() - start).count() / repeats;
}

double gemm_gflops() {
  Random rng(1);
  Matrix<float> W(kConfig.d_ff, kConfig.d_model), X(kConfig.d_model, kTokens), Y(kConfig.d_ff, kTokens);
  rankwise::fill_normal(W, 0, 1, rng);
  rankwise::fill_normal(X, 0, 1, rng);
  const double ms = time_ms(50, [&] { Y.noalias() = W * X; });
  return 2.0 * double(W.rows()) * double(W.cols()) * double(kTokens) / (ms * 1e6);
}

// Milliseconds of the non-linear pieces of one LoRA training step, each timed alone at its shapes.
struct Breakdown {
  double attention = 0, layer_norm = 0, gelu = 0, cross_entropy = 0, residual = 0;
  double total() const { return attention + layer_norm + gelu + cross_entropy + residual; }
};

Breakdown non_linear_parts() {
  Random rng(2);
  const Index d = kConfig.d_model, ff = kConfig.d_ff, L = kConfig.layers;
  Matrix<float> q(d, kTokens), k(d, kTokens), v(d, kTokens), o, dq, dk, dv, dy(d, kTokens), h(ff, kTokens);
  for (Matrix<float>* m : {&q, &k, &v, &dy}) rankwise::fill_normal(*m, 0, 1, rng);
  rankwise::fill_normal(h, 0, 1, rng);
  Breakdown b;
  rankwise::CausalSelfAttention<float> attention(d, kConfig.heads);
  b.attention = L * time_ms(10, [&] {
                  attention.forward(q, k, v, kSeq, o);
                  attention.backward(dy, dq, dk, dv);
                });
  rankwise::LayerNorm<float> norm(d);
  Matrix<float> y, dx;
  b.layer_norm = double(2 * L + 1) * time_ms(20, [&] {
                   norm.forward(q, y);
                   norm.backward(dy, dx);
                 });
  rankwise::GELU<float> gelu(ff);
  Matrix<float> gy, gdx;
  b.gelu = L * time_ms(20, [&] {
             gelu.forward(h, gy);
             gelu.backward(h, gdx);
           });
  Matrix<float> logits(kConfig.vocab, kTokens), dlogits;
  rankwise::fill_normal(logits, 0, 1, rng);
  const std::vector<std::int32_t> targets = random_tokens(rng);
  rankwise::CrossEntropy<float> ce;
  b.cross_entropy = time_ms(20, [&] {
    ce.forward(logits, targets);
    ce.backward(dlogits);
  });
  b.residual = double(4 * L) * time_ms(50, [&] { q += dy; });  // two adds forward, two backward per block
  return b;
}

// Runs `mode` in a fresh process (this program, re-executed) and returns its peak resident memory in
// MiB. A forked child would inherit the pages of the measurements above.
double peak_rss_mib(Mode mode) {
  const pid_t pid = fork();
  if (pid == 0) {
    const char* arg = mode == Mode::Full ? "full" : "lora";
    execl("/proc/self/exe", "toy_transformer", "--rss-child", arg, static_cast<char*>(nullptr));
    _exit(127);
  }
  int status = 0;
  struct rusage usage {};
  wait4(pid, &status, 0, &usage);
  return double(usage.ru_maxrss) / 1024.0;
}
}  // namespace

int main(int argc, char** argv) {
  namespace rb = rankwise::bench;
  int steps = 10;
  std::vector<int> thread_counts = {1, 2};
  if (argc == 3 && std::strcmp(argv[1], "--rss-child") == 0) {
    rb::set_threads(1);
    run_mode(std::strcmp(argv[2], "full") == 0 ? Mode::Full : Mode::LoRA, 2);
    return 0;
  }
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) steps = std::max(1, std::atoi(argv[++i]));
    if (std::strcmp(argv[i], "--threads-list") == 0 && i + 1 < argc) {
      thread_counts.clear();
      for (char* t = std::strtok(argv[++i], ","); t; t = std::strtok(nullptr, ",")) thread_counts.push_back(std::atoi(t));
    }
  }
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  std::printf("# toy transformer: vocab %ld, d_model %ld, heads %ld, layers %ld, d_ff %ld, sequence %ld, batch %ld, float\n",
              long(kConfig.vocab), long(kConfig.d_model), long(kConfig.heads), long(kConfig.layers), long(kConfig.d_ff),
              long(kSeq), long(kBatch));
  std::printf("# cpu %s | %s | flags %s | Eigen %s, SIMD %s | products: %s | %d timed steps\n", rb::cpu_model().c_str(),
              rb::compiler().c_str(), RANKWISE_BENCH_FLAGS, rb::eigen_version().c_str(), rb::simd().c_str(),
              rb::backend().c_str(), steps);
  std::printf("# malloc: mmap/trim thresholds raised (mallopt)\n\n");
  std::printf("| mode | threads | ms/step | tokens/s | GFLOP/step | GFLOP/s | same-run GEMM GFLOP/s | ratio | allocs/step |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (int threads : thread_counts) {
    rb::set_threads(threads);
    const double gemm = gemm_gflops();
    double full_ms = 0;
    for (Mode mode : {Mode::Full, Mode::LoRA, Mode::Inference}) {
      const Measurement m = run_mode(mode, steps);
      if (mode == Mode::Full) full_ms = m.ms_per_step;
      const double gflop = step_flops(mode) * 1e-9;
      std::printf("| %s | %d | %.1f | %.0f | %.2f | %.1f | %.1f | %.2f | %.1f |\n", name(mode), threads, m.ms_per_step,
                  double(kTokens) / (m.ms_per_step * 1e-3), gflop, gflop / (m.ms_per_step * 1e-3), gemm,
                  gflop / (m.ms_per_step * 1e-3) / gemm, m.allocations_per_step);
      if (mode == Mode::LoRA) std::printf("| (LoRA step / full step) | %d | %.2f x | | | | | | |\n", threads, m.ms_per_step / full_ms);
    }
  }
  rb::set_threads(1);
  const Breakdown b = non_linear_parts();
  const Measurement lora = run_mode(Mode::LoRA, steps);
  std::printf("\n## LoRA step, 1 thread: where the time goes (pieces timed alone at the step's shapes)\n\n");
  std::printf("| part | ms | share of the step |\n|---|---|---|\n");
  const auto row = [&](const char* part, double ms) { std::printf("| %s | %.2f | %.1f %% |\n", part, ms, 100 * ms / lora.ms_per_step); };
  row("attention core (scores, softmax, weighted sum; fwd+bwd)", b.attention);
  row("LayerNorm (9, fwd+bwd)", b.layer_norm);
  row("GELU (fwd+bwd)", b.gelu);
  row("cross-entropy + softmax", b.cross_entropy);
  row("residual adds", b.residual);
  row("all of the above", b.total());
  row("the rest: linear layers, adapters, embeddings, AdamW", lora.ms_per_step - b.total());
  std::printf("\n## peak resident memory (child process each)\n\n| mode | MiB |\n|---|---|\n");
  std::printf("| full fine-tuning | %.1f |\n", peak_rss_mib(Mode::Full));
  std::printf("| LoRA r=8 | %.1f |\n", peak_rss_mib(Mode::LoRA));
  return 0;
}
