// benchmarks/toy_transformer: the toy transformer's reference configuration (vocab 128, d_model 128,
// 4 heads, 4 layers, d_ff 512, sequence 64, batch 32, float) against the performance targets of its
// training step. Three modes: full fine-tuning (AdamW on every parameter), LoRA r = 8 on all six
// projections of every block (AdamW on the adapters only) and inference forward.
//
//   1. ms/step, tokens/s and GFLOP/s (FLOPs counted from the products) of each mode with 1 and 2
//      threads, next to a plain 512 x 128 times 128 x 2048 product measured in the same rounds. The
//      modes and the product are interleaved round by round and medians are reported, so a change of
//      load on the shared machine hits all of them alike; wall and process CPU times are both shown.
//   2. Where the time of a training step goes, measured inside the step: every linear slot is wrapped
//      in a timer (base product + adapter), the loss and the optimizer are timed around their calls,
//      the rest (attention core, LayerNorm, GELU, residual adds, embeddings) is the difference. The
//      pieces of that rest are then timed alone at the step's shapes.
//   3. Heap allocations of a step after the first, split into those made inside the matrix products
//      (Eigen's packing buffers, OpenBLAS's threads) or the OpenMP runtime, and the others (rankwise's
//      own code).
//   4. Peak resident memory (VmHWM) of each mode, each in a process of its own.
// Every target is printed with PASS or FAIL.
//
// A fourth mode, the LoRA model with every adapter disabled, is timed as a reference: the floor of a
// LoRA step.
// Run: build/bench/benchmarks/toy_transformer [--rounds N] [--threads-list 1,2] [--only full|lora|inference|frozen]
//   --only runs that mode's steps alone, for a profiler (perf record ...).
#include <rankwise/adapters/lora.hpp>
#include <rankwise/core/init.hpp>
#include <rankwise/layers/causal_attention.hpp>
#include <rankwise/layers/cross_entropy.hpp>
#include <rankwise/layers/embedding.hpp>
#include <rankwise/layers/gelu.hpp>
#include <rankwise/layers/layer_norm.hpp>
#include <rankwise/models/adapter_set.hpp>
#include <rankwise/models/toy_transformer.hpp>
#include <rankwise/optim/adamw.hpp>

#include "alloc/counting_malloc.hpp"
#include "bench_context.hpp"
#include "fma_peak.hpp"

#include <cxxabi.h>
#include <dlfcn.h>
#include <malloc.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;

const rankwise::ToyTransformerConfig kConfig{.vocab = 128, .d_model = 128, .heads = 4, .layers = 4, .d_ff = 512,
                                             .max_seq_len = 64};
constexpr Index kSeq = 64, kBatch = 32, kTokens = kSeq * kBatch, kRank = 8;

// Frozen: the LoRA model with every adapter disabled, a reference for the floor of a LoRA step (the
// frozen products forward and backward, attention and the elementwise work; no adapter work).
enum class Mode { Full, LoRA, Inference, Frozen };
const char* name(Mode m) {
  switch (m) {
    case Mode::Full: return "full fine-tuning";
    case Mode::LoRA: return "LoRA r=8, 6 projections";
    case Mode::Inference: return "inference forward";
    case Mode::Frozen: return "(reference) LoRA step, adapters disabled";
  }
  return "";
}
const char* key(Mode m) {
  return m == Mode::Full ? "full" : m == Mode::LoRA ? "lora" : m == Mode::Frozen ? "frozen" : "inference";
}
Mode mode_of(const char* text) {
  for (Mode m : {Mode::Full, Mode::LoRA, Mode::Inference, Mode::Frozen})
    if (std::strcmp(text, key(m)) == 0) return m;
  return Mode::Inference;
}

// --- clocks -----------------------------------------------------------------------------------------
double wall_now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
double cpu_now() {  // CPU time of the whole process (all threads)
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n == 0 ? 0.0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// --- FLOPs of the products of one step (2 m n k each), counted from the shapes ------------------------
double step_flops(Mode mode) {
  const double d = double(kConfig.d_model), ff = double(kConfig.d_ff), V = double(kConfig.vocab), n = double(kTokens);
  const double L = double(kConfig.layers), T = double(kSeq), r = double(kRank);
  // The linear slots: 4 d x d projections, up and down per block, and the lm_head.
  const double linear_fwd = L * (4 * 2 * d * d + 2 * 2 * d * ff) * n + 2 * d * V * n;
  // Attention: K^T Q and V P over every sequence and head (full T x T products).
  const double attention_fwd = L * 2 * 2 * T * d * n;
  // LoRA: A x and B u per adapter.
  const double lora_fwd = L * (4 * 2 * r * (d + d) + 2 * 2 * r * (d + ff)) * n;
  switch (mode) {
    case Mode::Inference: return linear_fwd + attention_fwd;
    // forward, dx and dW of every linear; attention backward is 4 products (dV, dP, dQ, dK)
    case Mode::Full: return 3 * linear_fwd + 3 * attention_fwd;
    // forward and dx of the frozen linears (the lm_head too); the adapters: forward 2 products,
    // backward 4 (dB, B^T dy, dA, A^T t)
    case Mode::LoRA: return 2 * linear_fwd + 3 * attention_fwd + 3 * lora_fwd;
    case Mode::Frozen: return 2 * linear_fwd + 3 * attention_fwd;
  }
  return 0;
}

// --- a linear slot that times itself -----------------------------------------------------------------
struct SlotClock {
  double seconds = 0;
};

template <typename Inner>
class TimedSlot {
 public:
  using Scalar = typename Inner::Scalar;
  using MatrixType = Matrix<Scalar>;
  TimedSlot(Inner inner, SlotClock* clock) : m_inner(std::move(inner)), m_clock(clock) {}
  Index in_features() const { return m_inner.in_features(); }
  Index out_features() const { return m_inner.out_features(); }
  void forward(const rankwise::ConstRef<Scalar>& x, MatrixType& y) {
    const double t = wall_now();
    m_inner.forward(x, y);
    m_clock->seconds += wall_now() - t;
  }
  void forward_borrowed(const MatrixType& x, MatrixType& y) {
    const double t = wall_now();
    if constexpr (requires { m_inner.forward_borrowed(x, y); })
      m_inner.forward_borrowed(x, y);
    else
      m_inner.forward(x, y);
    m_clock->seconds += wall_now() - t;
  }
  void forward_borrowed(const MatrixType&&, MatrixType&) = delete;
  void backward(const rankwise::ConstRef<Scalar>& dy, MatrixType& dx) {
    const double t = wall_now();
    m_inner.backward(dy, dx);
    m_clock->seconds += wall_now() - t;
  }
  std::vector<rankwise::Parameter<Scalar>*> parameters() { return m_inner.parameters(); }
  void set_training(bool training) { m_inner.set_training(training); }
  bool is_training() const { return m_inner.is_training(); }
  void zero_grad() { m_inner.zero_grad(); }
  void set_path(const std::string& path) { m_inner.set_path(path); }

 private:
  Inner m_inner;
  SlotClock* m_clock;
};

template <typename Inner>
bool wrap_slot(rankwise::ToyTransformer<float>& model, const std::string& path, SlotClock* clock) {
  Inner* inner = model.linear(path).template get_if<Inner>();
  if (!inner) return false;
  const std::string kind = model.linear(path).kind();
  // A copy: the replacement must match the slot's current shapes, so the slot may not be moved from.
  model.replace_linear(path, rankwise::AnyLinear<float>(kind, TimedSlot<Inner>(Inner(*inner), clock)));
  return true;
}

// --- one mode's model, optimizer and data ---------------------------------------------------------------
std::vector<std::int32_t> random_tokens(Random& rng) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(kTokens));
  for (auto& v : t) v = std::int32_t(rng.uniform_int(0, kConfig.vocab - 1));
  return t;
}

struct StepClocks {  // seconds spent in the parts of the last step
  SlotClock slots;
  double loss = 0, optimizer = 0;
};

class Runner {
 public:
  Runner(Mode mode, bool timed) : m_mode(mode), m_rng(5), m_model(kConfig, m_rng) {
    if (mode == Mode::LoRA || mode == Mode::Frozen) {
      rankwise::InjectionOptions o;
      o.all_linear = true;
      o.adapter.options = rankwise::LoRAOptions{.rank = kRank, .alpha = 16.0};
      rankwise::inject(m_model, o, m_rng);
    }
    if (mode == Mode::Frozen)
      m_model.for_each_slot([](const std::string&, rankwise::AnyLinear<float>& slot) {
        if (auto* lora = slot.get_if<rankwise::LoRA<float>>()) lora->set_enabled(false);
      });
    if (timed)
      for (const std::string& path : m_model.linear_paths())
        if (!wrap_slot<rankwise::LoRA<float>>(m_model, path, &m_clocks.slots))
          wrap_slot<rankwise::Linear<float>>(m_model, path, &m_clocks.slots);
    m_params = m_model.parameters();
    m_opt = std::make_unique<rankwise::AdamW<float>>(m_params, rankwise::AdamWOptions{.lr = 1e-4});
    m_tokens = random_tokens(m_rng);
    m_targets = random_tokens(m_rng);
    m_model.set_training(mode != Mode::Inference);
  }

  void step() {
    m_clocks = {SlotClock{}, 0, 0};
    if (m_mode == Mode::Inference) {
      m_model.forward(m_tokens, kSeq, m_logits);
      return;
    }
    double t = wall_now();
    m_model.zero_grad();
    m_clocks.optimizer += wall_now() - t;
    m_model.forward(m_tokens, kSeq, m_logits);
    t = wall_now();
    m_ce.forward(m_logits, m_targets);
    m_ce.backward(m_dlogits);
    m_clocks.loss += wall_now() - t;
    m_model.backward(m_dlogits);
    t = wall_now();
    m_opt->step();
    m_clocks.optimizer += wall_now() - t;
  }

  const StepClocks& clocks() const { return m_clocks; }
  Mode mode() const { return m_mode; }

 private:
  Mode m_mode;
  Random m_rng;
  rankwise::ToyTransformer<float> m_model;
  std::vector<rankwise::Parameter<float>*> m_params;
  std::unique_ptr<rankwise::AdamW<float>> m_opt;
  rankwise::CrossEntropy<float> m_ce;
  std::vector<std::int32_t> m_tokens, m_targets;
  Matrix<float> m_logits, m_dlogits;
  StepClocks m_clocks;
};

// --- the same-run product --------------------------------------------------------------------------------
struct Gemm {
  Gemm() : W(kConfig.d_ff, kConfig.d_model), X(kConfig.d_model, kTokens), Y(kConfig.d_ff, kTokens) {
    Random rng(1);
    rankwise::fill_normal(W, 0, 1, rng);
    rankwise::fill_normal(X, 0, 1, rng);
  }
  void run() { Y.noalias() = W * X; }
  double flops() const { return 2.0 * double(W.rows()) * double(W.cols()) * double(X.cols()); }
  Matrix<float> W, X, Y;
};

struct Timing {
  std::vector<double> wall, cpu;
  void add(double w, double c) {
    wall.push_back(w);
    cpu.push_back(c);
  }
};

template <typename F>
void timed(Timing& timing, F&& f) {
  const double w = wall_now(), c = cpu_now();
  f();
  timing.add(wall_now() - w, cpu_now() - c);
}

// --- allocations ------------------------------------------------------------------------------------------
struct Allocations {
  long total = 0, in_products = 0;
  std::map<std::string, long> others;  // innermost named frame of the other allocations
};

std::string symbol_of(void* address, std::string* object = nullptr) {
  Dl_info info{};
  if (dladdr(address, &info) == 0) return {};
  if (object && info.dli_fname) *object = info.dli_fname;
  return info.dli_sname ? info.dli_sname : "";
}

std::string demangled(const std::string& s) {
  int status = 0;
  char* d = abi::__cxa_demangle(s.c_str(), nullptr, nullptr, &status);
  std::string out = status == 0 && d ? d : s;
  std::free(d);
  return out.size() > 110 ? out.substr(0, 110) + "..." : out;
}

Allocations count_allocations(Runner& runner) {
  namespace ts = rankwise::test_support;
  ts::start_counting_allocations(true);
  runner.step();
  const ts::AllocationCount count = ts::stop_counting_allocations();
  Allocations a;
  a.total = count.calls;
  for (const ts::AllocationStack& s : ts::counted_stacks()) {
    bool in_products = false;
    std::string first_named;
    for (int i = 1; i < s.depth && !in_products; ++i) {  // frame 0 is the counting hook
      std::string object;
      const std::string sym = symbol_of(s.frames[i], &object);
      if (sym.find("general_matrix_matrix_product") != std::string::npos ||
          sym.find("parallelize_gemm") != std::string::npos || sym.find("gemm_functor") != std::string::npos ||
          object.find("libgomp") != std::string::npos || object.find("openblas") != std::string::npos ||
          object.find("libblas") != std::string::npos)
        in_products = true;
      else if (first_named.empty() && !sym.empty() && sym != "malloc" && sym.find("aligned_malloc") == std::string::npos)
        first_named = sym;
    }
    if (in_products)
      ++a.in_products;
    else
      ++a.others[first_named.empty() ? std::string("(unnamed)") : demangled(first_named)];
  }
  return a;
}

// --- pieces of the non-product work, each timed alone at the step's shapes (1 thread, CPU time) --------
double cpu_ms(int repeats, const std::function<void()>& f) {
  f();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    const double c = cpu_now();
    f();
    t.push_back(1e3 * (cpu_now() - c));
  }
  return median(t);
}

template <typename Attention>
void attention_forward(Attention& attention, const Matrix<float>& q, const Matrix<float>& k, const Matrix<float>& v,
                       Matrix<float>& o) {
  if constexpr (requires { attention.forward_borrowed(q, k, v, kSeq, o); })
    attention.forward_borrowed(q, k, v, kSeq, o);  // as the model calls it
  else
    attention.forward(q, k, v, kSeq, o);
}

struct Pieces {
  double attention = 0, layer_norm = 0, gelu = 0, residual = 0, embeddings = 0;
  double total() const { return attention + layer_norm + gelu + residual + embeddings; }
};

Pieces time_pieces(bool with_embedding_grads) {
  Random rng(2);
  const Index d = kConfig.d_model, ff = kConfig.d_ff, L = kConfig.layers;
  Matrix<float> q(d, kTokens), k(d, kTokens), v(d, kTokens), o, dq, dk, dv, dy(d, kTokens), h(ff, kTokens),
      dh(ff, kTokens);
  for (Matrix<float>* m : {&q, &k, &v, &dy, &h, &dh}) rankwise::fill_normal(*m, 0, 1, rng);
  Pieces p;
  rankwise::CausalSelfAttention<float> attention(d, kConfig.heads);
  p.attention = double(L) * cpu_ms(9, [&] {
                  attention_forward(attention, q, k, v, o);
                  attention.backward(dy, dq, dk, dv);
                });
  rankwise::LayerNorm<float> norm(d, {.trainable = false});
  Matrix<float> y, dx;
  p.layer_norm = double(2 * L + 1) * cpu_ms(9, [&] {
                   norm.forward(q, y);
                   norm.backward(dy, dx);
                 });
  rankwise::GELU<float> gelu(ff);
  Matrix<float> gy, gdx;
  p.gelu = double(L) * cpu_ms(9, [&] {
             gelu.forward(h, gy);
             gelu.backward(dh, gdx);
           });
  p.residual = double(4 * L) * cpu_ms(21, [&] { q += dy; });  // two adds forward, two backward per block
  rankwise::Embedding<float> tok(kConfig.vocab, d, rng), pos(kConfig.max_seq_len, d, rng);
  tok.set_trainable(with_embedding_grads);
  pos.set_trainable(with_embedding_grads);
  const std::vector<std::int32_t> ids = random_tokens(rng);
  std::vector<std::int32_t> positions(ids.size());
  for (std::size_t t = 0; t < positions.size(); ++t) positions[t] = std::int32_t(Index(t) % kSeq);
  Matrix<float> e, ep;
  p.embeddings = cpu_ms(21, [&] {
    tok.forward(ids, e);
    pos.forward(positions, ep);
    e += ep;
    tok.backward(dy);
    pos.backward(dy);
  });
  return p;
}

// --- peak resident memory, each mode in a process of its own ------------------------------------------
long status_kib(const char* field) {  // a "Vm...:   123 kB" line of /proc/self/status
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string prefix = std::string(field) + ":";
  while (std::getline(in, line))
    if (line.rfind(prefix, 0) == 0) return std::atol(line.c_str() + prefix.size());
  return -1;
}

int rss_child(Mode mode) {
  rankwise::bench::set_threads(1);
  const long before = status_kib("VmRSS");
  Runner runner(mode, false);
  const long built = status_kib("VmRSS");
  for (int i = 0; i < 3; ++i) runner.step();
  std::printf("%ld %ld %ld\n", before, built, status_kib("VmHWM"));
  return 0;
}

struct Rss {
  double before = 0, built = 0, peak = 0;  // MiB
};

Rss peak_rss(Mode mode) {
  char exe[4096] = {};
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len <= 0) return {};
  const std::string command = std::string("'") + exe + "' --rss-child " + key(mode);
  FILE* child = popen(command.c_str(), "r");
  if (!child) return {};
  long before = 0, built = 0, peak = 0;
  const int got = std::fscanf(child, "%ld %ld %ld", &before, &built, &peak);
  pclose(child);
  if (got != 3) return {};
  return {double(before) / 1024, double(built) / 1024, double(peak) / 1024};
}

const char* verdict(bool ok) { return ok ? "PASS" : "FAIL"; }

// --serve: the rankwise side of benchmarks/peers/compare.py, which interleaves it with the PyTorch
// peer round by round. One model per mode, built on first use and kept; commands on stdin, one
// answer line each on stdout:
//   info                       -> "info <description of the build>"
//   run <mode> <threads> <n>   -> "run <wall ms/step> <cpu ms/step> <GFLOP/step>" (median of n steps,
//                                 after one unmeasured step)
//   peak <threads>             -> "peak <GFLOP/s of the FMA loop>"
//   rss <mode>                 -> "rss <peak resident MiB> <MiB before the model>" (the mode in a process
//                                 of its own)
int serve_rounds() {
  namespace rb = rankwise::bench;
  std::map<std::string, std::unique_ptr<Runner>> runners;
  char line[256];
  while (std::fgets(line, sizeof line, stdin)) {
    char command[32] = {}, mode_name[32] = {};
    int threads = 1, steps = 1;
    const int got = std::sscanf(line, "%31s %31s %d %d", command, mode_name, &threads, &steps);
    if (got >= 1 && std::strcmp(command, "info") == 0) {
      std::printf("info rankwise, %s, flags %s, Eigen %s, SIMD %s, products: %s, threads: %s\n", rb::compiler().c_str(),
                  RANKWISE_BENCH_FLAGS, rb::eigen_version().c_str(), rb::simd().c_str(), rb::backend().c_str(),
                  rb::threads_kind().c_str());
    } else if (got == 4 && std::strcmp(command, "run") == 0) {
      const Mode mode = mode_of(mode_name);
      rb::set_threads(threads);
      std::unique_ptr<Runner>& runner = runners[mode_name];
      if (!runner) runner = std::make_unique<Runner>(mode, false);
      runner->step();  // the first step after a change of threads or mode is not measured
      std::vector<double> wall, cpu;
      for (int i = 0; i < std::max(1, steps); ++i) {
        const double w = wall_now(), c = cpu_now();
        runner->step();
        wall.push_back(wall_now() - w);
        cpu.push_back(cpu_now() - c);
      }
      std::printf("run %.4f %.4f %.4f\n", 1e3 * median(wall), 1e3 * median(cpu), step_flops(mode) * 1e-9);
    } else if (got == 2 && std::strcmp(command, "peak") == 0) {
      std::printf("peak %.2f\n", rb::fma_peak_gflops(std::atoi(mode_name)));
    } else if (got == 2 && std::strcmp(command, "rss") == 0) {
      const Rss rss = peak_rss(mode_of(mode_name));
      std::printf("rss %.1f %.1f\n", rss.peak, rss.before);
    } else {
      std::printf("error unknown command: %s", line);
    }
    std::fflush(stdout);
  }
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  namespace rb = rankwise::bench;
  int rounds = 11;
  std::vector<int> thread_counts = {1, 2};
  const char* only = nullptr;
  bool serve = false;
  if (argc == 3 && std::strcmp(argv[1], "--rss-child") == 0)
    return rss_child(mode_of(argv[2]));
  for (int i = 1; i < argc; ++i) {
    if ((std::strcmp(argv[i], "--rounds") == 0 || std::strcmp(argv[i], "--steps") == 0) && i + 1 < argc)
      rounds = std::max(1, std::atoi(argv[++i]));
    else if (std::strcmp(argv[i], "--threads-list") == 0 && i + 1 < argc) {
      thread_counts.clear();
      for (char* t = std::strtok(argv[++i], ","); t; t = std::strtok(nullptr, ",")) thread_counts.push_back(std::atoi(t));
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc)
      only = argv[++i];
    else if (std::strcmp(argv[i], "--serve") == 0)
      serve = true;
  }
  // glibc would unmap and re-fault blocks over 128 KiB on every free (Eigen's packing buffers among
  // them); RANKWISE_BENCH_MALLOPT=0 measures the defaults.
  const bool tuned = rb::env_or("RANKWISE_BENCH_MALLOPT", "1") != "0";
  if (tuned) {
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
  }
  if (serve) return serve_rounds();
  if (only) {  // one mode's steps alone, for a profiler
    const Mode mode = mode_of(only);
    rb::set_threads(thread_counts.front());
    Runner runner(mode, false);
    const double w = wall_now(), c = cpu_now();
    for (int i = 0; i < rounds; ++i) runner.step();
    std::printf("%s, %d threads: %.1f ms/step wall, %.1f ms/step CPU\n", name(mode), thread_counts.front(),
                1e3 * (wall_now() - w) / rounds, 1e3 * (cpu_now() - c) / rounds);
    return 0;
  }

  std::printf("# toy transformer: vocab %ld, d_model %ld, heads %ld, layers %ld, d_ff %ld, sequence %ld, batch %ld, float\n",
              long(kConfig.vocab), long(kConfig.d_model), long(kConfig.heads), long(kConfig.layers), long(kConfig.d_ff),
              long(kSeq), long(kBatch));
  std::printf("# cpu %s | %s | flags %s | Eigen %s, SIMD %s | products: %s | threads: %s\n", rb::cpu_model().c_str(),
              rb::compiler().c_str(), RANKWISE_BENCH_FLAGS, rb::eigen_version().c_str(), rb::simd().c_str(),
              rb::backend().c_str(), rb::threads_kind().c_str());
  std::printf("# malloc: %s | OMP_WAIT_POLICY=%s | load average at start: %s\n",
              tuned ? "mmap/trim thresholds raised (mallopt)" : "glibc defaults",
              rb::env_or("OMP_WAIT_POLICY", "(unset)").c_str(), rb::load_average().c_str());
  std::printf("# %d interleaved rounds per thread count (product x3, then one step of each mode); medians\n\n",
              rounds);

  Runner full(Mode::Full, false), lora(Mode::LoRA, false), inference(Mode::Inference, false),
      frozen(Mode::Frozen, false);
  Runner* runners[] = {&full, &lora, &inference};  // the modes of the targets
  Runner* timed_modes[] = {&full, &lora, &inference, &frozen};
  Gemm gemm;
  struct Row {
    int threads;
    double gemm_gflops, ms[4], cpu_ms[4];
  };
  std::vector<Row> rows;
  std::printf("| mode | threads | ms/step (wall) | ms/step (CPU, all threads) | tokens/s | GFLOP/step | GFLOP/s | same-run GEMM GFLOP/s | ratio |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (int threads : thread_counts) {
    rb::set_threads(threads);
    for (Runner* r : timed_modes) {  // warm-up: sizes the buffers and the optimizer state
      r->step();
      r->step();
    }
    gemm.run();
    Timing g, t[4];
    for (int round = 0; round < rounds; ++round) {
      for (int rep = 0; rep < 3; ++rep) timed(g, [&] { gemm.run(); });
      for (int m = 0; m < 4; ++m) timed(t[m], [&] { timed_modes[m]->step(); });
    }
    Row row{threads, gemm.flops() / median(g.wall) * 1e-9, {}, {}};
    for (int m = 0; m < 4; ++m) {
      row.ms[m] = 1e3 * median(t[m].wall);
      row.cpu_ms[m] = 1e3 * median(t[m].cpu);
      const Mode mode = timed_modes[m]->mode();
      const double gflop = step_flops(mode) * 1e-9, rate = gflop / (row.ms[m] * 1e-3);
      std::printf("| %s | %d | %.1f | %.1f | %.0f | %.2f | %.1f | %.1f | %.2f |\n", name(mode), threads, row.ms[m],
                  row.cpu_ms[m], double(kTokens) / (row.ms[m] * 1e-3), gflop, rate, row.gemm_gflops,
                  rate / row.gemm_gflops);
    }
    rows.push_back(row);
  }

  // Where the time goes: timed slots inside real steps (1 thread), interleaved full / LoRA.
  rb::set_threads(1);
  Runner timed_full(Mode::Full, true), timed_lora(Mode::LoRA, true);
  struct Parts {
    std::vector<double> step, slots, loss, optimizer;
  } parts[2];
  Runner* timed_runners[] = {&timed_full, &timed_lora};
  for (Runner* r : timed_runners) {
    r->step();
    r->step();
  }
  for (int round = 0; round < rounds; ++round)
    for (int m = 0; m < 2; ++m) {
      const double w = wall_now();
      timed_runners[m]->step();
      const double step = wall_now() - w;
      const StepClocks& c = timed_runners[m]->clocks();
      parts[m].step.push_back(step);
      parts[m].slots.push_back(c.slots.seconds / step);
      parts[m].loss.push_back(c.loss / step);
      parts[m].optimizer.push_back(c.optimizer / step);
    }
  const Pieces pieces_lora = time_pieces(false), pieces_full = time_pieces(true);
  double share_rest[2], step_ms[2];
  std::printf("\n## Where the time of a training step goes (1 thread; shares measured inside the step, medians)\n\n");
  std::printf("| part | full: share | LoRA: share |\n|---|---|---|\n");
  for (int m = 0; m < 2; ++m) {
    step_ms[m] = 1e3 * median(parts[m].step);
    share_rest[m] = 1.0 - median(parts[m].slots) - median(parts[m].loss) - median(parts[m].optimizer);
  }
  std::printf("| step (ms, wall) | %.1f | %.1f |\n", step_ms[0], step_ms[1]);
  std::printf("| linear slots: base products + adapters, forward and backward (25) | %.1f %% | %.1f %% |\n",
              100 * median(parts[0].slots), 100 * median(parts[1].slots));
  std::printf("| cross-entropy with its softmax | %.1f %% | %.1f %% |\n", 100 * median(parts[0].loss),
              100 * median(parts[1].loss));
  std::printf("| optimizer: zero_grad + AdamW step | %.1f %% | %.1f %% |\n", 100 * median(parts[0].optimizer),
              100 * median(parts[1].optimizer));
  std::printf("| the rest: attention core, LayerNorm, GELU, residual adds, embeddings | %.1f %% | %.1f %% |\n",
              100 * share_rest[0], 100 * share_rest[1]);
  const double non_product[2] = {1.0 - median(parts[0].slots), 1.0 - median(parts[1].slots)};
  std::printf("| **everything but the linear slots** | **%.1f %%** | **%.1f %%** |\n", 100 * non_product[0],
              100 * non_product[1]);
  std::printf("\nThe rest, piece by piece, each timed alone at the step's shapes (1 thread, CPU ms per step):\n\n");
  std::printf("| piece | full: ms | LoRA: ms |\n|---|---|---|\n");
  std::printf("| attention core x%ld (scores, causal softmax, weighted sum; fwd+bwd) | %.2f | %.2f |\n",
              long(kConfig.layers), pieces_full.attention, pieces_lora.attention);
  std::printf("| LayerNorm x%ld (fwd+bwd) | %.2f | %.2f |\n", long(2 * kConfig.layers + 1), pieces_full.layer_norm,
              pieces_lora.layer_norm);
  std::printf("| GELU x%ld (fwd+bwd) | %.2f | %.2f |\n", long(kConfig.layers), pieces_full.gelu, pieces_lora.gelu);
  std::printf("| residual adds x%ld | %.2f | %.2f |\n", long(4 * kConfig.layers), pieces_full.residual,
              pieces_lora.residual);
  std::printf("| embeddings (fwd%s) | %.2f | %.2f |\n", "; bwd when trainable", pieces_full.embeddings,
              pieces_lora.embeddings);
  std::printf("| sum (compare with the rest's share of the step) | %.2f | %.2f |\n", pieces_full.total(),
              pieces_lora.total());

  // Allocations of a step after the first (1 thread, then 2).
  std::printf("\n## Heap allocations in one training step after the first\n\n");
  std::printf("| mode | threads | all | inside the products (Eigen, OpenBLAS) or OpenMP | the others (rankwise's own code) |\n|---|---|---|---|---|\n");
  long own_allocations = 0;
  for (int threads : thread_counts) {
    rb::set_threads(threads);
    for (Runner* r : runners) {
      r->step();
      const Allocations a = count_allocations(*r);
      long others = 0;
      for (const auto& [where, n] : a.others) others += n;
      own_allocations += others;
      std::printf("| %s | %d | %ld | %ld | %ld |\n", name(r->mode()), threads, a.total, a.in_products, others);
      for (const auto& [where, n] : a.others) std::printf("|   %ld from %s | | | | |\n", n, where.c_str());
    }
  }

  // Peak memory.
  const Rss rss_full = peak_rss(Mode::Full), rss_lora = peak_rss(Mode::LoRA), rss_inf = peak_rss(Mode::Inference);
  std::printf("\n## Peak resident memory (VmHWM; each mode in a process of its own, 3 steps, 1 thread)\n\n");
  std::printf("| mode | at start, MiB | model built, MiB | peak, MiB | peak - at start, MiB |\n|---|---|---|---|---|\n");
  for (const auto& [mode, r] : {std::pair{Mode::Full, rss_full}, std::pair{Mode::LoRA, rss_lora}, std::pair{Mode::Inference, rss_inf}})
    std::printf("| %s | %.1f | %.1f | %.1f | %.1f |\n", name(mode), r.before, r.built, r.peak, r.peak - r.before);

  // Targets.
  std::printf("\n## Targets\n\n");
  for (const Row& row : rows) {
    const double ratio = row.ms[1] / row.ms[0];
    std::printf("%s  LoRA step <= 0.7x full step, %d thread%s: %.2fx (%.1f / %.1f ms; CPU time %.2fx)\n",
                verdict(ratio <= 0.7), row.threads, row.threads > 1 ? "s" : "", ratio, row.ms[1], row.ms[0],
                row.cpu_ms[1] / row.cpu_ms[0]);
  }
  std::printf("%s  LoRA peak memory < full fine-tuning's: %.1f < %.1f MiB\n", verdict(rss_lora.peak < rss_full.peak),
              rss_lora.peak, rss_full.peak);
  for (const Row& row : rows) {
    const double rate = step_flops(Mode::LoRA) * 1e-9 / (row.ms[1] * 1e-3);
    std::printf("%s  LoRA step GFLOP/s >= 50 %% of the same-run GEMM's, %d thread%s: %.1f / %.1f = %.0f %%\n",
                verdict(rate >= 0.5 * row.gemm_gflops), row.threads, row.threads > 1 ? "s" : "", rate,
                row.gemm_gflops, 100 * rate / row.gemm_gflops);
  }
  for (const Row& row : rows)
    std::printf("info  floor of a LoRA step, %d thread%s: with every adapter disabled it is %.2fx the full step "
                "(%.1f ms), the adapters take %.0f %% of the LoRA step\n",
                row.threads, row.threads > 1 ? "s" : "", row.ms[3] / row.ms[0], row.ms[3],
                100 * (1 - row.ms[3] / row.ms[1]));
  std::printf("%s  no heap allocation by rankwise's own code in a step after the first: %ld\n",
              verdict(own_allocations == 0), own_allocations);
  std::printf("%s  attention, LayerNorm, softmax and elementwise work < 1/3 of the step: LoRA %.1f %%, full %.1f %%\n",
              verdict(non_product[0] < 1.0 / 3 && non_product[1] < 1.0 / 3), 100 * non_product[1],
              100 * non_product[0]);
  return 0;
}
