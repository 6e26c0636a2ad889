// finetune: pre-train the toy transformer on a mixture of synthetic tasks (or reuse the cached base),
// then fine-tune it on a task it has never seen with any adapter, and compare accuracy before and after.
// Run: build/examples/finetune [--adapter lora|dylora|erat|vera|red|melora|alora] [--task relabel|sort|add]
//      (scripts/demo.sh runs it with no flags; --help lists everything)
#include <rankwise/rankwise.hpp>

#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

namespace {
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;
using Model = rankwise::ToyTransformer<float>;
using Clock = std::chrono::steady_clock;

struct Settings {
  std::string adapter = "lora";
  Index rank = 8;
  double alpha = 16.0;
  std::string targets = "all-linear";
  std::string task = "relabel";
  long steps = 400;
  double lr = 2e-3;
  std::uint64_t seed = 1;
  int threads = 2;
  long pretrain_steps = 1500;
  Index batch = 32;
  Index eval_sequences = 512;
  std::string base_path;
  std::string output = "finetune_output";
  bool quiet = false;
  bool small = false;  // a tiny model and short runs, for the test suite
};

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One line that rewrites itself on a terminal, plain lines (every 10 %) otherwise.
class Progress {
 public:
  Progress(std::string label, long total, bool quiet)
      : m_label(std::move(label)), m_total(total), m_tty(isatty(STDOUT_FILENO) != 0), m_quiet(quiet) {}
  void update(long step, double loss, double tokens_per_second, double elapsed) {
    if (m_quiet) return;
    const long done = step + 1;
    const double eta = done > 0 ? elapsed / double(done) * double(m_total - done) : 0.0;
    char line[160];
    std::snprintf(line, sizeof line, "%s step %5ld/%ld  loss %.4f  %7.0f tokens/s  ETA %4.0fs", m_label.c_str(), done,
                  m_total, loss, tokens_per_second, eta);
    if (m_tty) {
      std::printf("\r%s", line);
      if (done == m_total) std::printf("\n");
      std::fflush(stdout);
    } else if (done == m_total || done % std::max(1L, m_total / 10) == 0) {
      std::printf("%s\n", line);
      std::fflush(stdout);
    }
  }

 private:
  std::string m_label;
  long m_total;
  bool m_tty;
  bool m_quiet;
};

// Exact-match accuracy on held-out sequences (a fixed seed the training stream never uses).
double evaluate(Model& model, const rankwise::TaskGenerator& task, Index sequences, Index batch) {
  model.set_training(false);
  Random rng(0xE7A1);
  Matrix<float> logits;
  double right = 0.0;
  Index seen = 0;
  while (seen < sequences) {
    const Index b = std::min(batch, sequences - seen);
    const rankwise::TokenBatch data = task.sample(b, rng);
    model.forward(data.tokens, data.seq_len, logits);
    right += rankwise::exact_match<float>(data, logits) * double(b);
    seen += b;
  }
  model.set_training(true);
  return right / double(sequences);
}

double train_step(Model& model, const rankwise::TokenBatch& data, rankwise::CrossEntropy<float>& loss_fn,
                  Matrix<float>& logits, Matrix<float>& dlogits) {
  // [snippet: train_step]
  model.forward(data.tokens, data.seq_len, logits);
  const double loss = loss_fn.forward(logits, data.targets);
  loss_fn.backward(dlogits);
  model.backward(dlogits);
  // [snippet: train_step]
  return loss;
}

void pretrain(Model& model, const Settings& s, const rankwise::TaskOptions& task_options) {
  const rankwise::TaskGenerator mixture(rankwise::TaskKind::Mixture, task_options);
  Random rng(s.seed * 7919 + 1);
  std::vector<rankwise::Parameter<float>*> params = model.parameters();
  rankwise::AdamW<float> optimizer(params, {.lr = 3e-3, .weight_decay = 0.01});
  const auto schedule = rankwise::LRSchedule::cosine(s.pretrain_steps / 20, s.pretrain_steps, 0.05);
  rankwise::CrossEntropy<float> loss_fn;
  Matrix<float> logits, dlogits;
  Progress progress("pre-train", s.pretrain_steps, s.quiet);
  const auto start = Clock::now();
  for (long step = 0; step < s.pretrain_steps; ++step) {
    const rankwise::TokenBatch data = mixture.sample(s.batch, rng);
    model.zero_grad();
    const double loss = train_step(model, data, loss_fn, logits, dlogits);
    rankwise::clip_grad_norm(params, 1.0);
    optimizer.set_lr_factor(schedule.factor(step));
    optimizer.step();
    const double elapsed = seconds_since(start);
    progress.update(step, loss, double((step + 1) * s.batch * task_options.seq_len) / elapsed, elapsed);
  }
}

// The adapter options for the chosen method at rank s.rank.
rankwise::InjectionOptions injection_for(const Settings& s) {
  rankwise::InjectionOptions o;
  const std::string name = s.adapter == "alora" ? "lora" : s.adapter;
  o.adapter.name = name;
  if (name == "lora") o.adapter.options = rankwise::LoRAOptions{.rank = s.rank, .alpha = s.alpha};
  if (name == "dylora" || name == "erat")
    o.adapter.options = rankwise::DyLoRAOptions{.max_rank = s.rank, .alpha = s.alpha, .frozen = false};
  if (name == "melora")  // n = 4 minis of rank r/4: the same equivalent rank r as LoRA
    o.adapter.options = rankwise::MELoRAOptions{.n = 4, .mini_rank = std::max<Index>(1, s.rank / 4), .alpha = s.alpha};
  if (name == "vera") o.vera_rank = 16 * s.rank;
  if (name != "red") {
    if (s.targets == "all-linear") {
      o.all_linear = true;
    } else {
      std::stringstream list(s.targets);
      for (std::string item; std::getline(list, item, ',');)
        if (!item.empty()) o.target_modules.push_back(item);
    }
  }
  return o;
}

// What some adapters need around each step: DyLoRA's sampled rank, ERAT-DLoRA's windows, and the
// rank allocator of ALoRA (AB-LoRA scores on a fixed validation batch, prune and reallocate).
class RankHooks {
 public:
  RankHooks(const Settings& s, Model& model, const rankwise::Injection<float>& injection,
            rankwise::AdamW<float>& optimizer, const rankwise::TaskGenerator& task, Random& rng)
      : m_s(s), m_model(model), m_injection(injection) {
    const Index layers = model.config().layers;
    for (const auto& m : injection.modules) {
      if (m.slot->kind() == "dylora" || m.slot->kind() == "erat") {
        m_dylora.push_back(&m.slot->as<rankwise::DyLoRA<float>>());
        m_depths.push_back(std::stol(m.path.substr(7, m.path.find('.', 7) - 7)));  // layers.{i}.
      }
    }
    if (s.adapter == "dylora")
      m_dylora_sampler.emplace(rankwise::DyLoRASamplerOptions{.min_rank = 1, .max_rank = s.rank}, rng);
    if (s.adapter == "erat")
      m_erat_sampler.emplace(rankwise::ERATSamplerOptions{.max_rank = s.rank, .min_rank = 1, .total_steps = s.steps,
                                                          .num_layers = layers},
                             rng);
    if (s.adapter == "alora") {
      Random validation_rng(0xA11C);
      m_validation = task.sample(s.batch, validation_rng);
      for (const auto& m : injection.modules)
        m_modules.emplace_back(m.slot->as<rankwise::LoRA<float>>(), m.path);
      m_ablation.emplace([this] { return validation_loss(); });
      rankwise::RankAllocatorOptions options;
      options.warmup_steps = s.steps / 5;                            // K1
      options.rounds = 4;                                            // N_A
      options.recovery_steps = std::max(1L, s.steps / 10);           // K2
      options.total_steps = s.steps;
      m_allocator.emplace(m_modules, *m_ablation, options, rng);
      m_allocator->add_optimizer(optimizer);
    }
  }

  void before_step(long step) {
    if (m_dylora_sampler) {
      const Index b = m_dylora_sampler->sample();  // one rank for the whole model
      for (auto* a : m_dylora) a->set_active_rank(b);
    }
    if (m_erat_sampler) {
      m_erat_sampler->sample_step(step, m_depths, m_windows);  // a window per module
      for (std::size_t i = 0; i < m_dylora.size(); ++i) m_dylora[i]->set_window(m_windows[i].lo, m_windows[i].b);
    }
  }

  void after_step() {
    if (m_allocator) m_allocator->step();
  }

  // Evaluation uses every rank a module may use at the end of training.
  void finish() {
    for (std::size_t i = 0; i < m_dylora.size(); ++i) {
      const Index b = m_erat_sampler ? m_erat_sampler->depth_bound(m_depths[i]) : m_dylora[i]->max_rank();
      m_dylora[i]->set_active_rank(b);
    }
    if (m_allocator && m_allocator->finish() != rankwise::Status::Ok)
      std::printf("warning: %s\n", m_allocator->message().c_str());
  }

  void report() const {
    if (m_allocator) std::printf("\nfinal ranks per module (ALoRA, AB-LoRA scores)\n%s\n", m_allocator->format_table().c_str());
  }

 private:
  // The validation loss in eval mode, on one fixed batch.
  double validation_loss() {
    m_model.set_training(false);
    m_model.forward(m_validation.tokens, m_validation.seq_len, m_logits);
    m_model.set_training(true);
    return m_loss.forward(m_logits, m_validation.targets);
  }

  const Settings& m_s;
  Model& m_model;
  const rankwise::Injection<float>& m_injection;
  std::vector<rankwise::DyLoRA<float>*> m_dylora;
  std::vector<Index> m_depths;
  std::vector<rankwise::RankWindow> m_windows;
  std::optional<rankwise::DyLoRASampler> m_dylora_sampler;
  std::optional<rankwise::ERATSampler> m_erat_sampler;
  rankwise::TokenBatch m_validation;
  rankwise::CrossEntropy<float> m_loss;
  Matrix<float> m_logits;
  std::vector<rankwise::RankModule<float>> m_modules;
  std::optional<rankwise::AblationImportance<float>> m_ablation;
  std::optional<rankwise::RankAllocator<float>> m_allocator;
};

int run(const Settings& s) {
  Eigen::setNbThreads(s.threads);
  const rankwise::TaskOptions task_options{.vocab = 128, .seq_len = 32, .letters = 16, .min_length = 2,
                                           .max_length = 8, .max_digits = 4};
  rankwise::ToyTransformerConfig config{.vocab = 128, .d_model = 128, .heads = 4, .layers = 4, .d_ff = 512,
                                        .max_seq_len = task_options.seq_len};
  if (s.small) {
    config.d_model = 32;
    config.layers = 2;
    config.d_ff = 64;
  }
  const rankwise::TaskGenerator task(rankwise::task_kind_from_name(s.task), task_options);
  Random rng(s.seed);
  Model model(config, rng);
  const auto start = Clock::now();
  pretrain(model, s, task_options);
  const double pretrain_seconds = seconds_since(start);
  const double before = evaluate(model, task, s.eval_sequences, s.batch);
  std::printf("base model: %s accuracy %.3f (never trained on it)\n", s.task.c_str(), before);

  // [snippet: inject]
  rankwise::InjectionOptions injection = injection_for(s);
  const rankwise::Injection<float> adapters = rankwise::inject_adapters(model, injection, rng);
  std::vector<rankwise::Parameter<float>*> params = model.parameters();
  rankwise::AdamW<float> optimizer(params, {.lr = s.lr, .weight_decay = 0.0});
  // [snippet: inject]
  RankHooks hooks(s, model, adapters, optimizer, task, rng);
  const rankwise::ParameterSummary summary = rankwise::summarize_parameters(model);
  std::printf("%s on %s: %s\n", s.adapter.c_str(), s.targets.c_str(), summary.to_string().c_str());

  const auto schedule = rankwise::LRSchedule::linear(s.steps / 10, s.steps);
  rankwise::CrossEntropy<float> loss_fn;
  Matrix<float> logits, dlogits;
  Random data_rng(s.seed * 104729 + 3);
  std::filesystem::create_directories(s.output);
  std::ofstream curve(std::filesystem::path(s.output) / "loss_curve.csv");
  curve << "step,loss,lr_factor\n";
  Progress progress("fine-tune", s.steps, s.quiet);
  std::vector<double> losses;
  const auto tune_start = Clock::now();
  for (long step = 0; step < s.steps; ++step) {
    const rankwise::TokenBatch data = task.sample(s.batch, data_rng);
    hooks.before_step(step);
    model.zero_grad();
    const double loss = train_step(model, data, loss_fn, logits, dlogits);
    rankwise::clip_grad_norm(params, 1.0);
    optimizer.set_lr_factor(schedule.factor(step));
    optimizer.step();
    hooks.after_step();
    losses.push_back(loss);
    curve << step << ',' << loss << ',' << schedule.factor(step) << '\n';
    const double elapsed = seconds_since(tune_start);
    progress.update(step, loss, double((step + 1) * s.batch * task_options.seq_len) / elapsed, elapsed);
  }
  const double tune_seconds = seconds_since(tune_start);
  hooks.finish();
  const double after = evaluate(model, task, s.eval_sequences, s.batch);

  std::printf("\nsummary\n");
  std::printf("  adapter            %s (rank %ld, alpha %g, targets %s)\n", s.adapter.c_str(), long(s.rank), s.alpha,
              s.targets.c_str());
  std::printf("  trainable params   %ld of %ld (%.3f %%)\n", long(summary.trainable), long(summary.total),
              summary.percent());
  std::printf("  %s accuracy   %.3f -> %.3f  (exact match, %ld held-out sequences)\n", s.task.c_str(), before, after,
              long(s.eval_sequences));
  std::printf("  time               pre-train %.1f s, fine-tune %.1f s (%.1f ms/step)\n", pretrain_seconds, tune_seconds,
              1e3 * tune_seconds / double(std::max(1L, s.steps)));
  std::printf("  loss curve         %s\n", (std::filesystem::path(s.output) / "loss_curve.csv").c_str());
  hooks.report();
  // The default run must show fine-tuning working on accuracy; the tiny test run only on the loss.
  const std::size_t k = std::min<std::size_t>(5, losses.size() / 2);
  double first = 0, last = 0;
  for (std::size_t i = 0; i < k; ++i) {
    first += losses[i];
    last += losses[losses.size() - 1 - i];
  }
  const bool ok = s.small ? last < first : after > before;
  std::printf("finetune: %s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
}  // namespace

int main(int argc, char** argv) {
  Settings s;
  CLI::App app{"Pre-train the toy transformer, then fine-tune it with an adapter on an unseen task."};
  app.add_option("--adapter", s.adapter, "lora, dylora, erat, vera, red, melora or alora")->capture_default_str();
  app.add_option("--rank", s.rank, "adapter rank (VeRA: the bank's rank is 16x this)")->capture_default_str();
  app.add_option("--alpha", s.alpha, "adapter alpha")->capture_default_str();
  app.add_option("--targets", s.targets, "all-linear, or module names separated by commas (q_proj,v_proj)")
      ->capture_default_str();
  app.add_option("--task", s.task, "downstream task: relabel, sort or add")->capture_default_str();
  app.add_option("--steps", s.steps, "fine-tuning steps")->capture_default_str();
  app.add_option("--lr", s.lr, "fine-tuning learning rate")->capture_default_str();
  app.add_option("--batch", s.batch, "sequences per step")->capture_default_str();
  app.add_option("--output", s.output, "directory for the adapter and the loss curve")->capture_default_str();
  app.add_flag("--quiet", s.quiet, "no progress display");
  app.add_option("--eval-sequences", s.eval_sequences, "held-out sequences for the accuracy")->capture_default_str();
  app.add_flag("--small", s.small, "a tiny model and short runs (for the tests)");
  app.add_option("--pretrain-steps", s.pretrain_steps, "pre-training steps")->capture_default_str();
  app.add_option("--seed", s.seed, "seed of everything random")->capture_default_str();
  app.add_option("--threads", s.threads, "threads for the matrix products")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (s.small) {
    s.pretrain_steps = std::min(s.pretrain_steps, 60L);
    s.steps = std::min(s.steps, 40L);
    s.batch = std::min<Index>(s.batch, 16);
    s.eval_sequences = std::min<Index>(s.eval_sequences, 64);
    s.rank = std::min<Index>(s.rank, 4);
  }
  try {
    return run(s);
  } catch (const rankwise::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
