// finetune: pre-train the toy transformer on a mixture of synthetic tasks (or reuse the cached base),
// then fine-tune it on a task it has never seen with any adapter, compare accuracy before and after,
// and save the adapter (PEFT and rankwise files) and the loss curve. --task teacher fine-tunes toward a
// teacher (the base plus planted changes of known ranks) instead, scored by KL(teacher || model); with
// --adapter alora the final ranks are then set against the planted ones.
// Run: build/examples/finetune [--adapter lora|dylora|erat|vera|red|melora|alora]
//                              [--task relabel|sort|add|teacher]
//      (scripts/demo.sh runs it with no flags; --help lists everything)
#include <rankwise/models/base_checkpoint.hpp>
#include <rankwise/models/finetune.hpp>
#include <rankwise/models/teacher.hpp>
#include <rankwise/rankwise.hpp>

#include "finetune_cli.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

namespace {
using rankwise::Index;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

using finetune_cli::Settings;
using finetune_cli::split;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One line that rewrites itself on a terminal, plain lines (every 10 %) otherwise.
class Progress {
 public:
  Progress(std::string label, bool quiet)
      : m_label(std::move(label)), m_tty(isatty(STDOUT_FILENO) != 0), m_quiet(quiet), m_start(Clock::now()) {}

  void update(const rankwise::TrainingProgress& p) {
    m_tokens += double(p.tokens);
    if (m_quiet) return;
    const double elapsed = seconds_since(m_start);
    const double eta = elapsed / double(p.step) * double(p.total - p.step);
    char line[160];
    std::snprintf(line, sizeof line, "%s step %5ld/%ld  loss %.4f  %7.0f tokens/s  ETA %4.0fs", m_label.c_str(), p.step,
                  p.total, p.loss, m_tokens / std::max(elapsed, 1e-9), eta);
    if (m_tty) {
      std::printf("\r%s", line);
      if (p.step == p.total) std::printf("\n");
      std::fflush(stdout);
    } else if (p.step == p.total || p.step % std::max(1L, p.total / 10) == 0) {
      std::printf("%s\n", line);
      std::fflush(stdout);
    }
  }

 private:
  std::string m_label;
  bool m_tty;
  bool m_quiet;
  Clock::time_point m_start;
  double m_tokens = 0.0;
};

// The output directory can be created and takes files: found now, not after pre-training. What the
// probe creates is removed again, so that a run refused later leaves nothing behind.
void check_writable(const fs::path& dir, const char* option) {
  std::error_code ec;
  fs::path first_new;  // the outermost directory the probe creates
  for (fs::path p = fs::absolute(dir, ec); !p.empty() && !fs::exists(p, ec); p = p.parent_path()) {
    first_new = p;
    if (p == p.parent_path()) break;
  }
  fs::create_directories(dir, ec);
  const fs::path probe = dir / ".rankwise-write-test";
  std::FILE* f = ec ? nullptr : std::fopen(probe.c_str(), "wb");
  const std::string why = ec ? ec.message() : std::string("cannot create a file in it");
  if (f != nullptr) std::fclose(f);
  std::error_code ignored;
  fs::remove(probe, ignored);
  if (!first_new.empty()) fs::remove_all(first_new, ignored);
  if (f == nullptr)
    rankwise::detail::fail<rankwise::IoError>("finetune", option, " '", dir.string(), "' is not a writable directory (",
                                              why, ")");
}

// --base must hold a base checkpoint, or be a directory the program may write one into: new or empty.
// A directory of other files (an adapter directory, say) is refused rather than written into.
void check_base_dir(const fs::path& dir) {
  std::error_code ec;
  if (rankwise::has_checkpoint(dir) || !fs::exists(dir, ec)) return;
  if (!fs::is_directory(dir, ec))
    rankwise::detail::fail("finetune", "--base '", dir.string(), "' is a file, not a directory");
  if (!fs::is_empty(dir, ec))
    rankwise::detail::fail("finetune", "--base '", dir.string(),
                           "' holds files but no base checkpoint (checkpoint.json); give a directory with a saved "
                           "base, or a new or empty one for the pre-trained base");
}

int run(const Settings& s) {
  rankwise::set_num_threads(s.threads);  // rankwise's threads split the products; Eigen's own stay at 1
  Eigen::setNbThreads(1);
  const rankwise::TaskOptions task_options{.vocab = 128, .seq_len = 32, .letters = 16, .min_length = 2,
                                           .max_length = 8, .max_digits = 4};
  rankwise::ToyTransformerConfig config{.vocab = 128, .d_model = s.d_model, .heads = 4, .layers = s.layers,
                                        .d_ff = 4 * s.d_model, .max_seq_len = task_options.seq_len};
  const rankwise::PretrainRecipe pretraining{.task_options = task_options, .steps = s.pretrain_steps,
                                             .batch = s.batch, .seed = s.seed};
  // [snippet: recipe]
  rankwise::FinetuneRecipe recipe;
  recipe.adapter = s.adapter;  // lora, dylora, erat, vera, red, melora or alora
  recipe.rank = s.rank;
  recipe.alpha = s.alpha;
  recipe.target_modules = split(s.targets);  // {"q_proj", "v_proj"}; empty: all-linear
  recipe.steps = s.steps;
  recipe.lr = s.lr > 0.0 ? s.lr : rankwise::recommended_lr(s.adapter);
  recipe.seed = s.seed;
  // [snippet: recipe]
  if (s.adapter == "alora") {
    // [snippet: allocator]
    if (s.allocator.starts_with("prune")) {  // start at 3 x rank, prune to rank x modules
      recipe.allocator = rankwise::pruning_schedule(recipe.steps);
      recipe.importance = s.allocator == "prune-fisher" ? "fisher"      // drop costs from training gradients
                          : s.allocator == "prune-sens" ? "sensitivity"  // AdaLoRA's scores
                                                        : "drop_cost";   // measured on the validation batch
    } else if (s.allocator == "gain") {
      recipe.allocator = rankwise::gain_over_cost_schedule(recipe.steps);
    }  // paper: the Finetuner's default, ALoRA's procedure as published
    recipe.validation_batches = s.validation_batches;
    // [snippet: allocator]
  }
  // The teacher task's inputs are the pre-training mixture; its targets come from the teacher.
  const bool distill = s.task == "teacher";
  const rankwise::TaskGenerator task(distill ? rankwise::TaskKind::Mixture : rankwise::task_kind_from_name(s.task),
                                     task_options);
  rankwise::Random validation_rng(s.seed * 31 + 0xA11C);
  const rankwise::TokenBatch validation = task.sample(s.validation, validation_rng);  // ALoRA's scoring batch
  // Every set-up error (names, ranks, patterns) before anything is trained or written.
  rankwise::Finetuner<float>::check_recipe(config, recipe, validation);

  const fs::path output = s.output;
  const fs::path base_dir =
      s.base.empty() ? output / "base-cache" / rankwise::base_checkpoint_name(config, pretraining) : fs::path(s.base);
  check_base_dir(base_dir);
  check_writable(output, "--output");
  if (rankwise::has_checkpoint(base_dir))
    std::printf("base model: loading the pre-trained base from %s\n", base_dir.c_str());
  else
    std::printf("base model: pre-training %ld steps on copy/reverse/grammar, then saving it to %s\n",
                s.pretrain_steps, base_dir.c_str());
  std::fflush(stdout);
  const auto start = Clock::now();
  Progress pretrain_progress("pre-train", s.quiet);
  rankwise::PretrainedBase<float> base = rankwise::load_or_pretrain<float>(
      config, pretraining, base_dir, [&](const rankwise::TrainingProgress& p) { pretrain_progress.update(p); });
  const double base_seconds = seconds_since(start);
  if (!base.same_recipe)
    std::printf("note: the base in %s was pre-trained with other settings: %s\n", base_dir.c_str(),
                base.info.recipe.dump().c_str());
  rankwise::ToyTransformer<float>& model = base.model;

  // --task teacher: the teacher is built from the base before any adapter is injected into it.
  std::unique_ptr<rankwise::PlantedTeacher<float>> teacher;
  std::vector<rankwise::TeacherBatch<float>> held_out;
  std::shared_ptr<rankwise::TrainingLoss<float>> training_loss;  // null: next-token cross-entropy
  if (distill) {
    rankwise::Random plant_rng(s.seed * 7919 + 0x7EAC);
    teacher = std::make_unique<rankwise::PlantedTeacher<float>>(model, rankwise::default_plant_plan(config),
                                                                rankwise::PlantOptions{}, plant_rng);
    rankwise::Random calibration_rng(s.seed * 131 + 0xCA11B);
    const rankwise::PlantCalibration calibration = teacher->calibrate(task.sample(s.batch, calibration_rng));
    std::printf("teacher: the base plus planted changes of rank");
    for (const rankwise::ModuleRank& m : teacher->truth())
      if (m.rank > 0) std::printf(" %s=%ld", m.path.c_str(), long(m.rank));
    std::printf("%s\n", calibration.status == rankwise::Status::Ok ? "" : " (calibration: not every target met)");
    rankwise::Random held_out_rng(s.seed * 17 + 0xE7A1);
    held_out = rankwise::TeacherTask<float>(teacher->model(), task).held_out(s.eval_sequences, s.batch, held_out_rng);
    training_loss = std::make_shared<rankwise::TeacherLoss<float>>(teacher->model());
  }
  const rankwise::Evaluation before = rankwise::evaluate_model(model, task, s.eval_sequences, s.batch);
  // The score: exact-match accuracy, or for the teacher task the held-out KL(teacher || model).
  const double before_score = distill ? rankwise::evaluate_distillation(model, held_out).mean_kl() : before.accuracy;
  if (distill)
    std::printf("base model: KL(teacher || base) %.4f nats/token on %ld held-out sequences\n", before_score,
                long(s.eval_sequences));
  else
    std::printf("base model: %s accuracy %.3f (never trained on it)\n", s.task.c_str(), before.accuracy);

  // injects the adapters, owns the rank hooks
  rankwise::Finetuner<float> tuner(model, recipe, validation, training_loss);
  const std::string targets = s.targets.empty() ? (s.adapter == "red" ? "mlp.down_proj" : "all-linear") : s.targets;
  std::printf("%s on %s: %s\n", s.adapter.c_str(), targets.c_str(), tuner.report().parameters.to_string().c_str());

  Progress progress("fine-tune", s.quiet);
  const auto tune_start = Clock::now();
  // [snippet: loop]
  rankwise::Random data_rng(s.seed * 104729 + 3);
  for (long step = 0; step < recipe.steps; ++step) {
    const rankwise::TokenBatch batch = task.sample(s.batch, data_rng);
    const double loss = tuner.step(batch);  // rank sampling, forward, backward, clipping, AdamW, allocator
    progress.update({step + 1, recipe.steps, loss, tuner.last_step().lr_factor, Index(batch.tokens.size())});
  }
  const rankwise::Status status = tuner.finish();  // NotApplied when the allocator never acted
  const rankwise::Evaluation after = tuner.evaluate(task, s.eval_sequences);
  // [snippet: loop]
  const double after_score = distill ? rankwise::evaluate_distillation(model, held_out).mean_kl() : after.accuracy;
  const double tune_seconds = seconds_since(tune_start);

  // [snippet: save]
  const auto saved = tuner.save_adapter(output / "adapter", {.base_model_name_or_path = "rankwise-toy-transformer"});
  // [snippet: save]
  std::ostringstream curve;
  curve << "step,loss,lr_factor\n";
  curve.precision(9);
  for (std::size_t i = 0; i < tuner.losses().size(); ++i)
    curve << i << ',' << tuner.losses()[i] << ',' << tuner.schedule().factor(long(i)) << '\n';
  rankwise::write_file_atomically(output / "loss_curve.csv", curve.str());

  const rankwise::FinetuneReport report = tuner.report();
  std::printf("\nsummary\n");
  std::printf("  adapter            %s (rank %ld, alpha %g, targets %s, %ld steps, lr %g)\n", s.adapter.c_str(),
              long(s.rank), s.alpha, targets.c_str(), s.steps, recipe.lr);
  std::printf("  trainable params   %ld of %ld (%.3f %%)\n", long(report.parameters.trainable),
              long(report.parameters.total), report.parameters.percent());
  if (distill)
    std::printf("  teacher KL         %.4f -> %.4f  (nats per scored token, %ld held-out sequences)\n", before_score,
                after_score, long(s.eval_sequences));
  else
    std::printf("  %s accuracy   %.3f -> %.3f  (exact match, %ld held-out sequences; loss %.3f -> %.3f)\n",
                s.task.c_str(), before.accuracy, after.accuracy, long(after.sequences), before.loss, after.loss);
  std::printf("  time               base %.1f s (%s), fine-tune %.1f s (%.1f ms/step)\n", base_seconds,
              base.loaded ? "loaded" : "pre-trained", tune_seconds, 1e3 * tune_seconds / double(std::max(1L, s.steps)));
  std::printf("  base model         %s\n", base_dir.c_str());
  std::printf("  adapter            %s (%s)\n", saved.dir.c_str(),
              saved.peft_type.empty() ? "rankwise files; PEFT has no form for RED"
                                      : ("PEFT " + saved.peft_type + " and rankwise files").c_str());
  std::printf("  loss curve         %s\n", (output / "loss_curve.csv").c_str());
  if (!report.allocation_table.empty())
    std::printf("\nfinal ranks per module (ALoRA, AB-LoRA scores)\n%s", report.allocation_table.c_str());
  if (distill && tuner.allocator() != nullptr) {
    const rankwise::AllocationComparison c =
        rankwise::compare_allocation(teacher->truth(), tuner.allocator()->rank_pattern());
    std::printf("\nfinal ranks against the planted ones (%.0f %% of the ranks on planted modules)\n%s\n",
                100.0 * c.share_on_planted(), c.format_table().c_str());
  }
  if (status != rankwise::Status::Ok) std::printf("warning: %s\n", report.message.c_str());
  // Fine-tuning worked when the loss fell and the accuracy did not drop (RED, with 512 parameters,
  // lowers the loss of relabel but cannot get whole answers right: its accuracy stays where it was);
  // on the teacher task, when the loss fell and the held-out KL fell.
  const std::vector<double>& losses = tuner.losses();
  const std::size_t k = std::min<std::size_t>(5, losses.size() / 2);
  double first = 0, last = 0;
  for (std::size_t i = 0; i < k; ++i) {
    first += losses[i];
    last += losses[losses.size() - 1 - i];
  }
  const bool better = distill ? after_score < before_score : after.accuracy >= before.accuracy;
  std::vector<std::string> reasons;
  if (status != rankwise::Status::Ok)
    reasons.push_back(std::string("the run ended with status ") + rankwise::to_string(status) + ": " + report.message);
  if (!(last < first)) {
    char why[160];
    std::snprintf(why, sizeof why, "the loss did not fall (mean of the first %zu steps %.4f, of the last %zu %.4f)", k,
                  first / double(std::max<std::size_t>(k, 1)), k, last / double(std::max<std::size_t>(k, 1)));
    reasons.push_back(why);
  }
  if (!better) {
    char why[160];
    if (distill)
      std::snprintf(why, sizeof why, "the held-out KL did not fall (%.4f -> %.4f)", before_score, after_score);
    else
      std::snprintf(why, sizeof why, "the %s accuracy dropped (%.3f -> %.3f)", s.task.c_str(), before.accuracy,
                    after.accuracy);
    reasons.push_back(why);
  }
  if (reasons.empty()) {
    std::printf("finetune: OK\n");
    return 0;
  }
  std::printf("finetune: FAILED:");
  for (std::size_t i = 0; i < reasons.size(); ++i) std::printf("%s %s", i ? ";" : "", reasons[i].c_str());
  std::printf("\n");
  return 1;
}
}  // namespace

int main(int argc, char** argv) {
  try {  // rankwise::Error and the rest: one line, nothing half done
    const finetune_cli::CommandLine line = finetune_cli::parse_command_line(argc, argv);
    if (!line.help.empty()) {
      std::printf("%s", line.help.c_str());
      return 0;
    }
    if (line.settings.small && !line.settings.quiet) std::printf("--small: %s\n", line.small_note.c_str());
    return run(line.settings);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
