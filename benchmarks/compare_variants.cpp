// compare_variants: fine-tunes the toy transformer with every adapter variant, on downstream tasks and
// on the teacher-student task with planted ranks, over several seeds, and reports what a user chooses
// a method by: trainable parameters, adapter memory, time per step, final accuracy (or teacher KL),
// merged-inference time, each as mean and spread over seeds.
//
// Methods and their budgets (rank r, default 8; the same targets, all six projections, everywhere):
//   lora          LoRA rank r
//   lora_r<r/4>   LoRA at MELoRA's parameter count (MELoRA vs LoRA at equal parameters)
//   melora        MELoRA, n = 4 minis of rank r/4: equivalent rank r (vs lora at equal equivalent rank)
//   dylora@b      DyLoRA trained once at r_max = r, evaluated at b = 1, 2, 4, ..., r (one row per b)
//   erat          ERAT-DLoRA, r_max = r, each depth at its bound
//   vera          VeRA, bank rank 16 r
//   red           RED on every block's down_proj
//   alora         ALoRA (AB-LoRA ablation scores), total rank = lora's (prune and reallocate)
//   alora_sens    the same allocator with AdaLoRA's sensitivity scores
//   alora_gain    rankwise's gain-over-cost allocator (docs/rank/alora.md), total rank = lora's
//   alora_prune   rankwise's recommended allocation: from 3 x the rank, pruned by drop costs to lora's
//                 total rank (pruning_schedule(), docs/rank/alora.md)
//   alora_prune_sens  the same pruning with AdaLoRA's sensitivity scores (no validation evaluations)
//   alora_prune_fisher  the same pruning with drop costs predicted from the training gradients (the
//              empirical Fisher information of each rank's gate; no validation evaluations)
// Tasks: relabel and sort (exact-match accuracy), teacher (KL(teacher || student) in nats per scored
// token, the teacher being the base plus planted changes of known ranks; ALoRA's final ranks are set
// against the planted ones). One pre-trained base (cached) serves every run; the seed varies the
// adapters' initialisation, the data stream and the allocator.
//
// Output: a Markdown table per task on stdout and in <out>/summary.md; per task the CSV files of
// benchmarks/variant_results.hpp in <out>/<task>/ (plots: benchmarks/plot_variants.py <out>/<task>).
// Units of work (a task and a seed: every method) run on --jobs threads at once, one Eigen thread each
// by default. Run: build/benchmarks/compare_variants [--quick] [--seeds 3] [--jobs 2] [--out DIR]
// (docs/benchmarks.md)
#include <rankwise/models/base_checkpoint.hpp>
#include <rankwise/models/finetune.hpp>
#include <rankwise/models/tasks.hpp>
#include <rankwise/models/teacher.hpp>
#include <rankwise/models/toy_transformer.hpp>
#include <rankwise/rankwise.hpp>

#include "bench_context.hpp"
#include "variant_results.hpp"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;
using Model = rankwise::ToyTransformer<float>;
using Clock = std::chrono::steady_clock;

struct Settings {
  bool quick = false;
  int seeds = 3;
  long steps = 300;
  long pretrain_steps = 1500;
  Index rank = 8;
  Index d_model = 64;
  Index layers = 4;
  Index batch = 32;
  Index eval_sequences = 512;
  int threads = 1;  // per job
  int jobs = 2;     // runs of different seeds or tasks at once, each on its own thread
  std::string tasks = "relabel,sort,teacher";
  std::string methods;  // empty: all
  std::string out = "compare_variants_output";
  std::string base;     // empty: <out>/base-cache/<configuration and recipe>
};

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// One method of the comparison: a name for the tables and the recipe that makes it.
struct Method {
  std::string name;
  rankwise::FinetuneRecipe recipe;
  std::vector<Index> eval_ranks;  // DyLoRA: one result row per rank
  Index validation = 0;           // sequences of the allocator's validation batch; 0: --batch
};

std::vector<Method> all_methods(const Settings& s) {
  const auto recipe = [&](const std::string& adapter, Index rank) {
    rankwise::FinetuneRecipe r;
    r.adapter = adapter;
    r.rank = rank;
    r.alpha = 2.0 * double(rank);
    r.steps = s.steps;
    r.lr = rankwise::recommended_lr(adapter);
    return r;
  };
  const Index small = std::max<Index>(1, s.rank / 4);
  std::vector<Method> m;
  m.push_back({"lora", recipe("lora", s.rank), {}});
  m.push_back({"lora_r" + std::to_string(small), recipe("lora", small), {}});
  {
    Method melora{"melora", recipe("melora", s.rank), {}};
    melora.recipe.alpha = 2.0 * double(s.rank);
    m.push_back(melora);
  }
  {
    Method dylora{"dylora", recipe("dylora", s.rank), {}};
    for (Index b = 1; b <= s.rank; b *= 2) dylora.eval_ranks.push_back(b);
    if (dylora.eval_ranks.back() != s.rank) dylora.eval_ranks.push_back(s.rank);
    m.push_back(dylora);
  }
  m.push_back({"erat", recipe("erat", s.rank), {}});
  m.push_back({"vera", recipe("vera", s.rank), {}});
  m.push_back({"red", recipe("red", s.rank), {}});
  m.push_back({"alora", recipe("alora", s.rank), {}});
  Method sens{"alora_sens", recipe("alora", s.rank), {}};
  sens.recipe.importance = "sensitivity";
  m.push_back(sens);
  Method gain{"alora_gain", recipe("alora", s.rank), {}};
  gain.recipe.allocator = rankwise::gain_over_cost_schedule(s.steps);
  gain.validation = 4 * s.batch;  // its drop costs need a larger batch than one step's (docs/rank/alora.md)
  gain.recipe.validation_batches = 4;
  m.push_back(gain);
  Method prune{"alora_prune", recipe("alora", s.rank), {}};
  prune.recipe.allocator = rankwise::pruning_schedule(s.steps);
  prune.recipe.importance = "drop_cost";
  prune.recipe.validation_batches = 4;
  prune.validation = 4 * s.batch;
  m.push_back(prune);
  Method prune_sens{"alora_prune_sens", recipe("alora", s.rank), {}};  // no validation evaluations
  prune_sens.recipe.allocator = rankwise::pruning_schedule(s.steps);
  prune_sens.recipe.importance = "sensitivity";
  m.push_back(prune_sens);
  Method prune_fisher{"alora_prune_fisher", recipe("alora", s.rank), {}};  // drop costs from training gradients
  prune_fisher.recipe.allocator = rankwise::pruning_schedule(s.steps);
  prune_fisher.recipe.importance = "fisher";
  m.push_back(prune_fisher);
  if (s.methods.empty()) return m;
  std::vector<Method> chosen;
  for (const std::string& name : rankwise::bench::split_list(s.methods)) {
    auto it = std::find_if(m.begin(), m.end(), [&](const Method& x) { return x.name == name; });
    if (it == m.end()) {
      std::string known;
      for (const Method& x : m) known += (known.empty() ? "" : ", ") + x.name;
      rankwise::detail::fail("compare_variants", "--methods: unknown method \"", name, "\" (known: ", known, ")");
    }
    chosen.push_back(*it);
  }
  return chosen;
}

// Bytes of the adapters' tensors: every trainable parameter, and VeRA's shared bank once.
Index adapter_bytes(rankwise::Finetuner<float>& tuner) {
  Index bytes = Index(sizeof(float)) * tuner.report().parameters.trainable;
  if (tuner.recipe().adapter == "vera") {
    const auto vera = tuner.adapters<rankwise::VeRA<float>>();
    if (!vera.empty())
      bytes += Index(sizeof(float)) *
               (vera.front().adapter->projections().A().size() + vera.front().adapter->projections().B().size());
  }
  return bytes;
}

// One inference forward of the merged model on `batch`, best of 5, in milliseconds.
double merged_forward_ms(Model& model, const rankwise::TokenBatch& batch) {
  std::vector<rankwise::AnyLinear<float>*> merged;
  model.for_each_slot([&](const std::string&, rankwise::AnyLinear<float>& slot) {
    if (slot.kind() != "linear" && slot.is_mergeable()) {
      slot.merge();
      merged.push_back(&slot);
    }
  });
  model.set_training(false);
  Matrix<float> logits;
  double best = 1e300;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    model.forward(batch.tokens, batch.seq_len, logits);
    best = std::min(best, 1e3 * seconds_since(t0));
  }
  for (auto* slot : merged) slot->unmerge();
  model.set_training(true);
  return best;
}

double tail_mean(const std::vector<double>& losses) {
  const std::size_t k = std::max<std::size_t>(1, losses.size() / 10);
  double sum = 0.0;
  for (std::size_t i = losses.size() - k; i < losses.size(); ++i) sum += losses[i];
  return sum / double(k);
}

// The teacher-student task: the teacher, its held-out set, and the truth.
struct Teacher {
  std::unique_ptr<rankwise::PlantedTeacher<float>> planted;
  std::vector<rankwise::TeacherBatch<float>> held_out;
  rankwise::PlantCalibration calibration;
};

Teacher make_teacher(Model& base, const rankwise::TaskOptions& task_options, const Settings& s) {
  Teacher t;
  Random rng(0x7EAC4E5);
  t.planted = std::make_unique<rankwise::PlantedTeacher<float>>(base, rankwise::default_plant_plan(base.config()),
                                                                 rankwise::PlantOptions{}, rng);
  const rankwise::TaskGenerator inputs(rankwise::TaskKind::Mixture, task_options);
  Random calibration_rng(0xCA11B);
  t.calibration = t.planted->calibrate(inputs.sample(s.batch, calibration_rng));
  rankwise::TeacherTask<float> task(t.planted->model(), inputs);
  Random held_out_rng(0xE7A1);
  t.held_out = task.held_out(s.eval_sequences, s.batch, held_out_rng);
  return t;
}

// One line for the report: the planted ranks and how far the teacher sits from the base.
std::string describe(const Teacher& t) {
  std::string line = "teacher: planted ranks";
  for (const rankwise::ModuleRank& m : t.planted->truth())
    if (m.rank > 0) line += " " + m.path + "=" + std::to_string(m.rank);
  char kl[128];
  std::snprintf(kl, sizeof kl, "; KL(teacher || base) %.4f nats/token%s", t.calibration.total_kl,
                t.calibration.status == rankwise::Status::Ok ? "" : " (calibration: not every target met)");
  return line + kl;
}

struct TaskResults {
  std::vector<rankwise::bench::VariantRun> runs;
  std::vector<rankwise::bench::RankRecord> ranks;
  std::string allocation;  // teacher: allocations against the truth
};

// Every method on one task with one seed (a unit of work: units run concurrently on --jobs threads, so
// everything a unit changes is its own; the base is only read).
TaskResults run_unit(const std::string& task_name, Model& base, const rankwise::TaskOptions& task_options,
                     const std::vector<Method>& methods, const Settings& s, Teacher* teacher, int seed) {
  TaskResults results;
  const bool distill = teacher != nullptr;
  const rankwise::TaskKind kind = distill ? rankwise::TaskKind::Mixture : rankwise::task_kind_from_name(task_name);
  const rankwise::TaskGenerator task(kind, task_options);
  Random timing_rng(0x71E);
  const rankwise::TokenBatch timing_batch = task.sample(s.batch, timing_rng);
  for (const Method& method : methods) {
    Random init_rng(1);
    Model model(base.config(), init_rng);
    model.copy_parameters_from(base);
    rankwise::FinetuneRecipe recipe = method.recipe;
    recipe.seed = std::uint64_t(seed);
    Random validation_rng(std::uint64_t(seed) * 31 + 0xA11C);
    const rankwise::TokenBatch validation = task.sample(method.validation > 0 ? method.validation : s.batch, validation_rng);
    std::shared_ptr<rankwise::TrainingLoss<float>> loss;
    if (distill) loss = std::make_shared<rankwise::TeacherLoss<float>>(teacher->planted->model());
    rankwise::Finetuner<float> tuner(model, recipe, validation, loss);
    Random data_rng(std::uint64_t(seed) * 104729 + 3);
    const auto start = Clock::now();
    for (long step = 0; step < recipe.steps; ++step) tuner.step(task.sample(s.batch, data_rng));
    const double ms_per_step = 1e3 * seconds_since(start) / double(recipe.steps);
    const rankwise::Status status = tuner.finish();
    if (status != rankwise::Status::Ok)
      std::printf("  note: %s seed %d: %s\n", method.name.c_str(), seed, tuner.report().message.c_str());

    rankwise::bench::VariantRun run;
    run.seed = std::uint64_t(seed);
    run.steps = recipe.steps;
    run.trainable_parameters = tuner.report().parameters.trainable;
    run.adapter_bytes = adapter_bytes(tuner);
    run.ms_per_step = ms_per_step;
    run.final_loss = tail_mean(tuner.losses());
    run.losses = tuner.losses();
    const auto score = [&](rankwise::bench::VariantRun& r) {
      if (distill)
        r.teacher_kl = rankwise::evaluate_distillation(model, teacher->held_out).mean_kl();
      else
        r.accuracy = rankwise::evaluate_model(model, task, s.eval_sequences, s.batch).accuracy;
      r.merged_ms = merged_forward_ms(model, timing_batch);
    };
    if (method.eval_ranks.empty()) {
      run.method = method.name;
      score(run);
      results.runs.push_back(run);
    } else {
      // DyLoRA: the same trained adapters, truncated to each rank b (b (in + out) parameters each).
      const auto modules = tuner.adapters<rankwise::DyLoRA<float>>();
      for (Index b : method.eval_ranks) {
        rankwise::bench::VariantRun at = run;
        at.method = method.name + "@" + std::to_string(b);
        at.trainable_parameters = 0;
        for (const auto& m : modules) {
          m.adapter->set_active_rank(b);
          at.trainable_parameters += b * (m.adapter->in_features() + m.adapter->out_features());
        }
        at.adapter_bytes = Index(sizeof(float)) * at.trainable_parameters;
        score(at);
        results.runs.push_back(at);
      }
    }
    if (const rankwise::RankAllocator<float>* allocator = tuner.allocator()) {
      const auto& modules = tuner.adapters().modules();
      for (std::size_t i = 0; i < modules.size(); ++i)
        results.ranks.push_back({method.name, std::uint64_t(seed), 0, modules[i].path, allocator->initial_ranks()[i]});
      Index round = 0;
      for (const rankwise::AllocationEvent& e : allocator->events()) {
        if (e.status != rankwise::Status::Ok || e.ranks_after.size() != modules.size()) continue;
        ++round;
        for (std::size_t i = 0; i < modules.size(); ++i)
          results.ranks.push_back({method.name, std::uint64_t(seed), round, modules[i].path, e.ranks_after[i]});
      }
      if (distill) {
        const rankwise::AllocationComparison c =
            rankwise::compare_allocation(teacher->planted->truth(), allocator->rank_pattern());
        char line[256];
        std::snprintf(line, sizeof line, "| %s | %d | %ld | %.3f | %s |\n", method.name.c_str(), seed,
                      long(c.allocated_total), c.share_on_planted(),
                      c.spearman ? std::to_string(*c.spearman).c_str() : "n/a");
        results.allocation += line;
      }
    }
    const rankwise::bench::VariantRun& shown = results.runs.back();
    std::printf("  %-8s %-12s seed %d  %7.2f ms/step  loss %.4f  %s %.4f\n", task_name.c_str(),
                shown.method.c_str(), seed, ms_per_step, shown.final_loss, distill ? "KL" : "accuracy",
                distill ? shown.teacher_kl : shown.accuracy);
    std::fflush(stdout);
  }
  return results;
}

int run(Settings s) {
  if (s.quick) {
    s.seeds = 1;
    s.steps = std::min(s.steps, 30L);
    s.pretrain_steps = std::min(s.pretrain_steps, 40L);
    s.d_model = 32;
    s.layers = 2;
    s.rank = std::min<Index>(s.rank, 4);
    s.batch = std::min<Index>(s.batch, 8);
    s.eval_sequences = std::min<Index>(s.eval_sequences, 32);
  }
  if (s.seeds < 1) rankwise::detail::fail("compare_variants", "--seeds must be >= 1 (got ", s.seeds, ")");
  if (s.jobs < 1) rankwise::detail::fail("compare_variants", "--jobs must be >= 1 (got ", s.jobs, ")");
  if (s.threads < 1) rankwise::detail::fail("compare_variants", "--threads must be >= 1 (got ", s.threads, ")");
  rankwise::bench::set_threads(s.threads);
  const std::vector<Method> methods = all_methods(s);
  const std::vector<std::string> tasks = rankwise::bench::split_list(s.tasks);
  for (const std::string& t : tasks)
    if (t != "teacher") (void)rankwise::task_kind_from_name(t);  // unknown names fail before any work

  const rankwise::TaskOptions task_options{.vocab = 128, .seq_len = 32, .letters = 16, .min_length = 2,
                                           .max_length = 8, .max_digits = 4};
  const rankwise::ToyTransformerConfig config{.vocab = 128, .d_model = s.d_model, .heads = 4, .layers = s.layers,
                                              .d_ff = 4 * s.d_model, .max_seq_len = task_options.seq_len};
  const rankwise::PretrainRecipe pretraining{.task_options = task_options, .steps = s.pretrain_steps,
                                             .batch = s.batch, .seed = 1};
  std::printf("compare_variants: rankwise %s\n", rankwise::version_string);
  std::printf("machine: %s; %s; Eigen %s; %s; %d thread(s)\n", rankwise::bench::cpu_model().c_str(),
              rankwise::bench::compiler().c_str(), rankwise::bench::eigen_version().c_str(),
              rankwise::bench::backend().c_str(), s.threads);
  std::printf("model: vocab 128, d_model %ld, 4 heads, %ld layers, d_ff %ld, sequence %ld, batch %ld; "
              "%ld pre-training steps; %ld fine-tuning steps; rank %ld; %d seed(s); %ld held-out sequences\n",
              long(s.d_model), long(s.layers), long(4 * s.d_model), long(task_options.seq_len), long(s.batch),
              s.pretrain_steps, s.steps, long(s.rank), s.seeds, long(s.eval_sequences));
  std::fflush(stdout);

  const fs::path out = s.out;
  const fs::path base_dir =
      s.base.empty() ? out / "base-cache" / rankwise::base_checkpoint_name(config, pretraining) : fs::path(s.base);
  const auto start = Clock::now();
  rankwise::PretrainedBase<float> base = rankwise::load_or_pretrain<float>(config, pretraining, base_dir);
  std::printf("base: %s in %.1f s (%s)\n", base.loaded ? "loaded" : "pre-trained", seconds_since(start),
              base_dir.c_str());

  // Units of work: every (task, seed), run on --jobs threads. Each teacher-task unit builds its own
  // teacher (the same one: fixed seeds, deterministic), since a model's forward uses its own buffers.
  struct Unit {
    std::size_t task;
    int seed;
    TaskResults results;
  };
  // The teacher's units first: they are the longest (a teacher forward per step), and starting them
  // early keeps both jobs busy to the end.
  std::vector<Unit> units;
  for (int pass = 0; pass < 2; ++pass)
    for (std::size_t t = 0; t < tasks.size(); ++t)
      if ((tasks[t] == "teacher") == (pass == 0))
        for (int seed = 1; seed <= s.seeds; ++seed) units.push_back({t, seed, {}});
  std::vector<std::string> teacher_lines(tasks.size());
  std::atomic<std::size_t> next{0};
  std::vector<std::exception_ptr> errors(std::size_t(s.jobs));
  const auto worker = [&](std::size_t job) {
    try {
      for (std::size_t i = next++; i < units.size(); i = next++) {
        Unit& u = units[i];
        const std::string& task_name = tasks[u.task];
        std::unique_ptr<Teacher> teacher;
        if (task_name == "teacher") {
          teacher = std::make_unique<Teacher>(make_teacher(base.model, task_options, s));
          if (u.seed == 1) teacher_lines[u.task] = describe(*teacher);
        }
        std::printf("  %s seed %d: started\n", task_name.c_str(), u.seed);
        std::fflush(stdout);
        u.results = run_unit(task_name, base.model, task_options, methods, s, teacher.get(), u.seed);
      }
    } catch (...) {
      errors[job] = std::current_exception();
      next = units.size();  // the other jobs stop after their current unit
    }
  };
  std::printf("%zu runs of every method (%zu tasks x %d seeds) on %d job(s) of %d thread(s)\n", units.size(),
              tasks.size(), s.seeds, s.jobs, s.threads);
  std::fflush(stdout);
  const auto runs_start = Clock::now();
  {
    std::vector<std::thread> pool;
    for (int j = 1; j < s.jobs; ++j) pool.emplace_back(worker, std::size_t(j));
    worker(0);
    for (std::thread& t : pool) t.join();
  }
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  std::printf("all runs in %.0f s\n", seconds_since(runs_start));

  std::string summary = "# Variant comparison\n\n";
  for (std::size_t t = 0; t < tasks.size(); ++t) {
    const std::string& task_name = tasks[t];
    const bool distill = task_name == "teacher";
    TaskResults r;
    std::vector<std::string> allocation_lines;
    for (Unit& u : units) {
      if (u.task != t) continue;
      r.runs.insert(r.runs.end(), u.results.runs.begin(), u.results.runs.end());
      r.ranks.insert(r.ranks.end(), u.results.ranks.begin(), u.results.ranks.end());
      std::stringstream lines(u.results.allocation);
      for (std::string line; std::getline(lines, line);) allocation_lines.push_back(line + "\n");
    }
    // Method by method (in the order of the first seed's results), seed by seed.
    std::vector<std::string> order;
    for (const rankwise::bench::VariantRun& run : r.runs)
      if (std::find(order.begin(), order.end(), run.method) == order.end()) order.push_back(run.method);
    const auto position = [&](const std::string& name) { return std::find(order.begin(), order.end(), name); };
    std::stable_sort(r.runs.begin(), r.runs.end(),
                     [&](const auto& a, const auto& b) { return position(a.method) < position(b.method); });
    std::sort(allocation_lines.begin(), allocation_lines.end());
    for (const std::string& line : allocation_lines) r.allocation += line;
    rankwise::bench::write_variant_results(out / task_name, r.runs, r.ranks);
    const std::vector<rankwise::bench::VariantSummary> summaries = rankwise::bench::summarize(r.runs);
    std::string section = "## " + task_name + (distill ? " (teacher KL, nats per scored token; lower is better)"
                                                       : " (exact-match accuracy; higher is better)") + "\n\n";
    if (!teacher_lines[t].empty()) section += teacher_lines[t] + "\n\n";
    section += rankwise::bench::markdown_table(summaries, {.min_max = true});
    if (!r.allocation.empty())
      section += "\nAllocations against the planted ranks (total rank allocated; share of it on planted modules; "
                 "Spearman correlation of allocated and planted rank over the modules):\n\n"
                 "| method | seed | total rank | share on planted | Spearman |\n|---|---|---|---|---|\n" +
                 r.allocation;
    std::printf("\n%s\n", section.c_str());
    summary += section + "\n";
  }
  rankwise::write_file_atomically(out / "summary.md", summary);
  std::printf("results in %s (summary.md; per task: runs.csv, loss_curves.csv, ranks.csv, summary.csv)\n",
              out.c_str());
  std::printf("total %.0f s\n", seconds_since(start));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  CLI::App app{"Fine-tune the toy transformer with every adapter variant over several seeds and compare them."};
  app.add_flag("--quick", s.quick, "a tiny model, one seed, a few steps (for the tests)");
  app.add_option("--seeds", s.seeds, "seeds per method")->capture_default_str();
  app.add_option("--steps", s.steps, "fine-tuning steps per run")->capture_default_str();
  app.add_option("--pretrain-steps", s.pretrain_steps, "pre-training steps of the base")->capture_default_str();
  app.add_option("--rank", s.rank, "rank r of the budget")->capture_default_str();
  app.add_option("--d-model", s.d_model, "model width (4 heads, d_ff = 4 d_model)")->capture_default_str();
  app.add_option("--layers", s.layers, "transformer blocks")->capture_default_str();
  app.add_option("--batch", s.batch, "sequences per step")->capture_default_str();
  app.add_option("--tasks", s.tasks, "tasks, separated by commas: relabel, sort, add, teacher")->capture_default_str();
  app.add_option("--methods", s.methods, "methods to run (default: all)");
  app.add_option("--eval-sequences", s.eval_sequences, "held-out sequences per evaluation")->capture_default_str();
  app.add_option("--threads", s.threads, "threads for the matrix products, per job")->capture_default_str();
  app.add_option("--jobs", s.jobs,
                 "runs at once (each task and seed is one unit of work); jobs x threads should not exceed the cores")
      ->capture_default_str();
  app.add_option("--out", s.out, "directory for the results")->capture_default_str();
  app.add_option("--base", s.base, "base checkpoint directory (default: <out>/base-cache/...)");
  CLI11_PARSE(app, argc, argv);
  try {
    return run(s);
  } catch (const rankwise::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
