// bora_lm_study: BoRA's tau sweep on the toy transformer, on a family of multi-task configurations
// generated from seeds that it was not tuned to. For each configuration:
//   tasks      D in [3, 5] related tasks over one pre-trained base (the model of allocation_study)
//   truth      teacher_d = base + S + O_d: S a planted change every task shares (rank 2 in three
//              modules), O_d a change of task d's own (rank 1 in two modules), each calibrated so that
//              it alone moves its teacher by a target KL (S: --shared-kl, O_d: --own-kl)
//   data       task d has N_d training sequences, log-uniform in [--min-sequences, --max-sequences]
//              (data-poor and data-rich tasks side by side), labelled with teacher_d's next-token
//              distributions at every non-padding position
//   student    the base with BoRA (rank --rank) in every linear module but the LM head; one batch
//              holds every task's sequences, routed by sequence (TaskRouting::by_sequence)
//   objective  sum over tasks of the KL summed over each task's tokens (the paper's summed NLL, up to
//              the teachers' entropies) + tau/2 sum_d ||theta_d - Theta||^2, full batch, AdamW;
//              --parametrization offsets trains theta_d as Theta + delta_d for tau > 0 (tau = 0 and the
//              shared LoRA are always trained as plain LoRAs: they are the baselines)
// and for each training seed it trains BoRA at every tau of the sweep (tau = 0: D independent LoRAs)
// and one shared LoRA on every task's data (BoRA with one task). tau is chosen per configuration by
// the validation KL (a held-out split per task); the test KL and perplexity of that tau are reported.
// Held-out perplexity of task d: exp(cross-entropy of the student against teacher_d's distributions
// per token) = exp(H(q) + KL(q || p)); its excess over the teacher's own is the KL.
// Output: text on stdout, <out>/runs.csv (one row per configuration, seed, method and task, columns
// as bora_study's, so benchmarks/plot_bora.py plots it) and <out>/summary.md.
// Run: build/benchmarks/bora_lm_study [--configs 6] [--seeds 3] [--steps 300] [--jobs 2] [--out DIR]
//      (docs/adapters/bora.md)
#include "bench_context.hpp"
#include "study_base.hpp"

#include <rankwise/detail/rank_correlation.hpp>
#include <rankwise/models/base_checkpoint.hpp>
#include <rankwise/models/bora_host.hpp>
#include <rankwise/models/teacher.hpp>
#include <rankwise/models/toy_transformer.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/version.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {
namespace fs = std::filesystem;
using rankwise::Index;
using rankwise::Random;
using Model = rankwise::ToyTransformer<float>;
using Batch = rankwise::TeacherBatch<float>;
using Clock = std::chrono::steady_clock;

struct Settings {
  int configs = 6, seeds = 3, steps = 300, jobs = 2, first_config = 0;
  long pretrain_steps = 1500;
  Index rank = 4;
  double lr = 1e-2;
  double shared_kl = 0.05, own_kl = 0.03;
  Index min_sequences = 4, max_sequences = 128;
  Index validation = 64, test = 128;
  std::vector<double> taus = {0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0};
  std::string out = "bora_lm_study", base;
  std::string forward = "task", prior = "squared", parametrization = "direct";
  bool quick = false;
};

struct Config {
  int id = 0;
  Index tasks = 3;
  std::vector<Index> sequences;
  std::vector<rankwise::ModuleRank> shared_plan;
  std::vector<std::vector<rankwise::ModuleRank>> own_plans;
};

std::vector<rankwise::ModuleRank> pick_modules(const std::vector<std::string>& paths, Index count, Index rank,
                                               Random& rng) {
  std::vector<std::string> pool = paths;
  std::vector<rankwise::ModuleRank> plan;
  for (Index k = 0; k < count && !pool.empty(); ++k) {
    const std::size_t i = std::min(pool.size() - 1, std::size_t(rng.uniform() * double(pool.size())));
    plan.push_back({pool[i], rank});
    pool.erase(pool.begin() + std::ptrdiff_t(i));
  }
  // Model order, as PlantedTeacher expects no particular order but reports read better.
  std::sort(plan.begin(), plan.end(), [&](const auto& a, const auto& b) {
    return std::find(paths.begin(), paths.end(), a.path) < std::find(paths.begin(), paths.end(), b.path);
  });
  return plan;
}

Config make_config(int id, const std::vector<std::string>& paths, const Settings& s) {
  Random rng(3000 + std::uint64_t(id));
  Config c;
  c.id = id;
  c.tasks = 3 + Index(rng.uniform() * 3);  // 3 to 5
  for (Index d = 0; d < c.tasks; ++d)
    c.sequences.push_back(Index(std::exp(
        rng.uniform(std::log(double(s.min_sequences)), std::log(double(s.max_sequences) + 1.0)))));
  c.shared_plan = pick_modules(paths, 3, 2, rng);
  for (Index d = 0; d < c.tasks; ++d) c.own_plans.push_back(pick_modules(paths, 2, 1, rng));
  return c;
}

// Every task's batch in one, sequence after sequence (the columns of the batches side by side).
Batch concatenate(const std::vector<const Batch*>& parts) {
  Batch out;
  out.inputs.seq_len = parts.front()->inputs.seq_len;
  out.temperature = parts.front()->temperature;
  Index columns = 0;
  for (const Batch* b : parts) columns += b->probs.cols();
  out.probs.resize(parts.front()->probs.rows(), columns);
  Index at = 0;
  for (const Batch* b : parts) {
    out.inputs.batch += b->inputs.batch;
    out.inputs.tokens.insert(out.inputs.tokens.end(), b->inputs.tokens.begin(), b->inputs.tokens.end());
    out.inputs.targets.insert(out.inputs.targets.end(), b->inputs.targets.begin(), b->inputs.targets.end());
    out.probs.middleCols(at, b->probs.cols()) = b->probs;
    out.mask.insert(out.mask.end(), b->mask.begin(), b->mask.end());
    out.entropy.insert(out.entropy.end(), b->entropy.begin(), b->entropy.end());
    out.argmax.insert(out.argmax.end(), b->argmax.begin(), b->argmax.end());
    out.scored += b->scored;
    at += b->probs.cols();
  }
  return out;
}

struct Data {
  Batch train;                                   // every task's training sequences
  std::vector<std::int32_t> task_of_sequence;    // of `train`
  std::vector<std::vector<Batch>> validation, test;  // per task
};

struct Score {
  double kl = 0.0, perplexity = 0.0;
};

// The student's KL and perplexity against task `task`'s held-out batches, every column routed to
// `route` (the task, or 0 for the shared LoRA).
Score evaluate(Model& student, const std::vector<Batch>& batches, Index route, Index tasks) {
  student.set_training(false);
  rankwise::DistillationScore total;
  double entropy = 0.0;
  rankwise::Matrix<float> logits;
  for (const Batch& b : batches) {
    rankwise::set_task_routing<float>(student,
                                      rankwise::TaskRouting::uniform(b.inputs.batch * b.inputs.seq_len, route, tasks));
    student.forward(b.inputs.tokens, b.inputs.seq_len, logits);
    total += rankwise::score_distillation<float>(b, logits);
    for (double h : b.entropy) entropy += h;
  }
  student.set_training(true);
  return {total.mean_kl(), std::exp((total.kl_sum + entropy) / double(total.scored))};
}

struct Run {
  int seed = 0;
  bool shared = false;
  double tau = 0.0;
  std::vector<Score> validation, test;
  std::vector<double> distance;  // ||theta_d - Theta|| over every module
  double seconds = 0.0;
};

Run train(const Config& c, const Model& base, const std::vector<std::string>& paths, const Data& data, double tau,
          bool shared, int seed, const Settings& s) {
  const auto start = Clock::now();
  Random init_rng(1);
  Model student(base.config(), init_rng);
  student.copy_parameters_from(const_cast<Model&>(base));
  student.set_base_trainable(false);
  Random rng(std::uint64_t(seed) * 7919 + 11);
  const Index tasks = shared ? 1 : c.tasks;
  const std::vector<rankwise::BoRAModule<float>> modules = rankwise::inject_bora<float>(
      student, paths,
      {.tasks = tasks,
       .rank = s.rank,
       .alpha = 2.0 * double(s.rank),
       .tau = tau,
       .prior = s.prior == "unsquared" ? rankwise::BoRAPrior::Unsquared : rankwise::BoRAPrior::Squared,
       .forward = s.forward == "joined" && !shared ? rankwise::BoRAForward::Joined : rankwise::BoRAForward::Task,
       // tau = 0 and the shared LoRA are the baselines, trained as plain LoRAs in every case: with offsets,
       // Θ would move with every task's gradient, which couples the tasks even at tau = 0
       .parametrization = s.parametrization == "offsets" && s.forward == "task" && tau > 0.0 && !shared
                              ? rankwise::BoRAParametrization::Offsets
                              : rankwise::BoRAParametrization::Direct},
      rng);
  std::vector<rankwise::Parameter<float>*> parameters;
  for (const rankwise::BoRAModule<float>& m : modules)
    for (rankwise::Parameter<float>* p : m.layer->parameters())
      if (p->trainable) parameters.push_back(p);
  rankwise::AdamW<float> optimizer(parameters, {.lr = s.lr, .weight_decay = 0.0});
  std::vector<std::int32_t> route = data.task_of_sequence;
  if (shared) std::fill(route.begin(), route.end(), 0);
  const rankwise::TaskRouting routing = rankwise::TaskRouting::by_sequence(route, data.train.inputs.seq_len, tasks);
  rankwise::DistillationLoss<float> loss;
  rankwise::Matrix<float> logits, dlogits;
  student.set_training(true);
  for (int step = 0; step < s.steps; ++step) {
    rankwise::set_task_routing<float>(student, routing);
    student.zero_grad();
    student.forward(data.train.inputs.tokens, data.train.inputs.seq_len, logits);
    loss.forward(logits, data.train);
    loss.backward(dlogits);
    dlogits *= float(loss.scored());  // summed over every task's tokens, as the paper's objective
    student.backward(dlogits);
    rankwise::add_bora_prior_gradients<float>(student);
    optimizer.step();
  }
  Run r;
  r.seed = seed;
  r.shared = shared;
  r.tau = tau;
  for (Index d = 0; d < c.tasks; ++d) {
    r.validation.push_back(evaluate(student, data.validation[std::size_t(d)], shared ? 0 : d, tasks));
    r.test.push_back(evaluate(student, data.test[std::size_t(d)], shared ? 0 : d, tasks));
    double squared = 0.0;
    if (!shared)
      for (const rankwise::BoRAModule<float>& m : modules) squared += std::pow(m.layer->distance_from_global(d), 2);
    r.distance.push_back(std::sqrt(squared));
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return r;
}

using rankwise::bench::mean;
using rankwise::bench::sd;
double task_mean(const std::vector<Score>& scores, bool perplexity = false) {
  double s = 0.0;
  for (const Score& x : scores) s += perplexity ? x.perplexity : x.kl;
  return s / double(scores.size());
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bora_lm_study: BoRA's tau sweep on the toy transformer, on a seeded multi-task family"};
  Settings s;
  app.add_option("--configs", s.configs, "configurations of the family")->check(CLI::Range(1, 1000));
  app.add_option("--first-config", s.first_config, "id of the first configuration")->check(CLI::Range(0, 100000));
  app.add_option("--seeds", s.seeds, "training seeds per configuration")->check(CLI::Range(1, 100));
  app.add_option("--steps", s.steps, "AdamW steps per run (full batch)")->check(CLI::Range(1, 100000));
  app.add_option("--pretrain-steps", s.pretrain_steps, "pre-training steps of the base")->check(CLI::Range(1L, 1000000L));
  app.add_option("--rank", s.rank, "BoRA's rank in every module")->check(CLI::Range(Index(1), Index(32)));
  app.add_option("--lr", s.lr, "AdamW's learning rate of every run")->check(CLI::PositiveNumber);
  app.add_option("--taus", s.taus, "the tau sweep")->check(CLI::NonNegativeNumber);
  app.add_option("--shared-kl", s.shared_kl, "KL each shared change alone moves its teacher by")->check(CLI::PositiveNumber);
  app.add_option("--own-kl", s.own_kl, "KL each task's own change alone moves its teacher by")->check(CLI::PositiveNumber);
  app.add_option("--min-sequences", s.min_sequences, "fewest training sequences of a task")->check(CLI::Range(Index(1), Index(100000)));
  app.add_option("--max-sequences", s.max_sequences, "most training sequences of a task")->check(CLI::Range(Index(1), Index(100000)));
  app.add_option("--forward", s.forward, "BoRA's forward: task (the paper's: the task adapter alone) or joined (the "
                 "official code's: the global adapter plus the task's)")->check(CLI::IsMember({"task", "joined"}));
  app.add_option("--prior", s.prior, "the prior: squared (the paper's) or unsquared (the official code's norm per tensor)")
      ->check(CLI::IsMember({"squared", "unsquared"}));
  app.add_option("--parametrization", s.parametrization, "how the task adapters are stored (forward task): direct "
                 "(the paper's theta_d) or offsets (theta_d - Theta)")->check(CLI::IsMember({"direct", "offsets"}));
  app.add_option("--jobs", s.jobs, "runs at once, one thread each")->check(CLI::Range(1, 64));
  app.add_option("--out", s.out, "output directory");
  app.add_option("--base", s.base, "directory of the pre-trained base (default: <out>/base-cache/...)");
  app.add_flag("--quick", s.quick, "the suite's smoke run: 1 configuration, 1 seed, 20 steps, 2 taus, a 300-step base");
  CLI11_PARSE(app, argc, argv);
  if (s.min_sequences > s.max_sequences) {
    std::fprintf(stderr, "bora_lm_study: --min-sequences (%ld) must be <= --max-sequences (%ld)\n", long(s.min_sequences),
                 long(s.max_sequences));
    return 2;
  }
  if (s.quick) {
    s.configs = 1;
    s.seeds = 1;
    s.steps = 20;
    s.pretrain_steps = 300;
    s.taus = {0.0, 100.0};
    s.max_sequences = std::min<Index>(s.max_sequences, 16);
    s.min_sequences = std::min(s.min_sequences, s.max_sequences);
    s.validation = 16;
    s.test = 16;
  }
  Eigen::setNbThreads(1);
  const auto start = Clock::now();
  const rankwise::TaskOptions task_options = rankwise::bench::study_task_options();
  const rankwise::PretrainRecipe pretraining{.task_options = task_options, .steps = s.pretrain_steps, .batch = 32,
                                             .seed = 1};
  std::printf("# bora_lm_study: rankwise %s; %s; %s\n", rankwise::version_string, rankwise::bench::cpu_model().c_str(),
              rankwise::bench::compiler().c_str());
  std::printf("# model: vocab 128, d_model 32, 4 heads, 2 layers, d_ff 128, sequence 32; %ld pre-training steps; "
              "BoRA rank %ld (alpha %ld, forward %s, prior %s, parametrization %s) in every linear module but the LM head; %d full-batch AdamW steps, lr %g; "
              "configurations %d..%d, %d seed(s); training sequences per task in [%ld, %ld]; shared KL %g, own KL %g; "
              "%ld validation and %ld test sequences per task; taus:",
              s.pretrain_steps, long(s.rank), long(2 * s.rank), s.forward.c_str(), s.prior.c_str(), s.parametrization.c_str(), s.steps, s.lr, s.first_config,
              s.first_config + s.configs - 1, s.seeds, long(s.min_sequences), long(s.max_sequences), s.shared_kl,
              s.own_kl, long(s.validation), long(s.test));
  for (double t : s.taus) std::printf(" %g", t);
  std::printf("\n# KL: nats per token against the task's teacher, held out; perplexity exp(H(q) + KL)\n\n");
  std::fflush(stdout);
  const fs::path out = s.out;
  fs::create_directories(out);
  rankwise::bench::StudyBase study = rankwise::bench::load_study_base(pretraining, out, s.base);
  rankwise::PretrainedBase<float>& base = study.base;
  const std::vector<std::string>& paths = study.paths;
  const rankwise::TaskGenerator inputs(rankwise::TaskKind::Mixture, task_options);
  const rankwise::TeacherTaskOptions labels{.positions = rankwise::DistillPositions::NonPadding};

  std::ofstream csv(out / "runs.csv");
  csv << "config,seed,method,tau,task,train_columns,validation_excess,test_excess,distance,test_perplexity,"
         "teacher_perplexity\n";
  std::printf("| config | tasks (training sequences) | tau=0 KL | best tau (by validation) | BoRA at it | shared | "
              "poorest task: tau=0 / BoRA / shared | perplexity: tau=0 / BoRA / shared / teacher | Spearman(distance, size) |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  std::fflush(stdout);
  std::vector<double> gain_vs_independent, gain_vs_shared, poor_gain_vs_independent, poor_gain_vs_shared, rho;
  int beats_both = 0, poor_beats_both = 0;
  std::vector<std::vector<double>> by_tau(s.taus.size()), poor_by_tau(s.taus.size()), ppl_by_tau(s.taus.size());
  std::vector<double> shared_all, shared_poor_all, shared_ppl_all, teacher_ppl_all;
  for (int k = s.first_config; k < s.first_config + s.configs; ++k) {
    const Config c = make_config(k, paths, s);
    // The teachers: base + S, then + O_d for each task.
    Random plant_rng(0x5A4ED + std::uint64_t(k));
    Random sample_rng(0xB0A + std::uint64_t(k));
    const rankwise::PlantOptions plant{.basis = rankwise::PlantBasis::Inputs};
    rankwise::PlantedTeacher<float> shared_teacher(base.model, c.shared_plan, plant, plant_rng,
                                                   inputs.sample(256, sample_rng));
    const rankwise::PlantCalibration shared_cal =
        shared_teacher.calibrate(inputs.sample(64, sample_rng), {.target_kl = s.shared_kl});
    std::vector<std::unique_ptr<rankwise::PlantedTeacher<float>>> teachers;
    Data data;
    std::vector<const Batch*> parts;
    std::vector<Batch> train_parts(std::size_t(c.tasks));
    std::vector<double> teacher_perplexity;
    std::string calibration_note = shared_cal.status == rankwise::Status::Ok ? "" : " (shared: " + shared_cal.message + ")";
    for (Index d = 0; d < c.tasks; ++d) {
      teachers.push_back(std::make_unique<rankwise::PlantedTeacher<float>>(
          shared_teacher.model(), c.own_plans[std::size_t(d)], plant, plant_rng, inputs.sample(256, sample_rng)));
      const rankwise::PlantCalibration own_cal =
          teachers.back()->calibrate(inputs.sample(64, sample_rng), {.target_kl = s.own_kl});
      if (own_cal.status != rankwise::Status::Ok) calibration_note += " (task " + std::to_string(d) + ": " + own_cal.message + ")";
      rankwise::TeacherTask<float> task(teachers.back()->model(), inputs, labels);
      Random data_rng(0xDA7A + 131 * std::uint64_t(k) + std::uint64_t(d));
      const Index n = c.sequences[std::size_t(d)];
      train_parts[std::size_t(d)] = std::move(task.held_out(n, n, data_rng).front());
      data.task_of_sequence.insert(data.task_of_sequence.end(), std::size_t(n), std::int32_t(d));
      data.validation.push_back(task.held_out(s.validation, 64, data_rng));
      data.test.push_back(task.held_out(s.test, 64, data_rng));
      double h = 0.0, scored = 0.0;
      for (const Batch& b : data.test.back()) {
        for (double e : b.entropy) h += e;
        scored += double(b.scored);
      }
      teacher_perplexity.push_back(std::exp(h / scored));
    }
    for (const Batch& b : train_parts) parts.push_back(&b);
    data.train = concatenate(parts);
    if (!calibration_note.empty()) std::printf("# configuration %d: calibration%s\n", k, calibration_note.c_str());

    // Every run of the configuration: each seed at each tau, and the shared LoRA.
    struct Job {
      int seed;
      double tau;
      bool shared;
    };
    std::vector<Job> jobs;
    for (int seed = 1; seed <= s.seeds; ++seed) {
      for (double tau : s.taus) jobs.push_back({seed, tau, false});
      jobs.push_back({seed, 0.0, true});
    }
    std::vector<Run> runs(jobs.size());
    std::atomic<std::size_t> next{0};
    std::vector<std::thread> workers;
    for (int j = 0; j < std::min<int>(s.jobs, int(jobs.size())); ++j)
      workers.emplace_back([&] {
        for (std::size_t i; (i = next++) < jobs.size();)
          runs[i] = train(c, base.model, paths, data, jobs[i].tau, jobs[i].shared, jobs[i].seed, s);
      });
    for (std::thread& w : workers) w.join();

    const std::size_t poorest =
        std::size_t(std::min_element(c.sequences.begin(), c.sequences.end()) - c.sequences.begin());
    std::vector<std::vector<double>> validation(s.taus.size()), test(s.taus.size()), poor(s.taus.size()),
        ppl(s.taus.size());
    std::vector<std::vector<double>> distance(s.taus.size(), std::vector<double>(std::size_t(c.tasks), 0.0));
    std::vector<double> shared_test, shared_poor, shared_ppl;
    for (const Run& r : runs) {
      for (Index d = 0; d < c.tasks; ++d) {
        const std::size_t t = std::size_t(d);
        csv << k << ',' << r.seed << ',' << (r.shared ? "shared," : "bora,");
        if (!r.shared) csv << r.tau;
        csv << ',' << d << ',' << c.sequences[t] << ',' << r.validation[t].kl << ',' << r.test[t].kl << ',';
        if (!r.shared) csv << r.distance[t];
        csv << ',' << r.test[t].perplexity << ',' << teacher_perplexity[t] << '\n';
      }
      if (r.shared) {
        shared_test.push_back(task_mean(r.test));
        shared_poor.push_back(r.test[poorest].kl);
        shared_ppl.push_back(task_mean(r.test, true));
        continue;
      }
      const std::size_t t = std::size_t(std::find(s.taus.begin(), s.taus.end(), r.tau) - s.taus.begin());
      validation[t].push_back(task_mean(r.validation));
      test[t].push_back(task_mean(r.test));
      poor[t].push_back(r.test[poorest].kl);
      ppl[t].push_back(task_mean(r.test, true));
      for (Index d = 0; d < c.tasks; ++d) distance[t][std::size_t(d)] += r.distance[std::size_t(d)] / double(s.seeds);
    }
    std::size_t best = 0;
    for (std::size_t t = 1; t < s.taus.size(); ++t)
      if (mean(validation[t]) < mean(validation[best])) best = t;
    std::vector<double> sizes;
    for (Index n : c.sequences) sizes.push_back(double(n));
    const double r_best = rankwise::detail::spearman(distance[best], sizes).value_or(0.0);
    rho.push_back(r_best);
    gain_vs_independent.push_back(mean(test[0]) - mean(test[best]));
    gain_vs_shared.push_back(mean(shared_test) - mean(test[best]));
    poor_gain_vs_independent.push_back(mean(poor[0]) - mean(poor[best]));
    poor_gain_vs_shared.push_back(mean(shared_poor) - mean(poor[best]));
    if (mean(test[best]) < mean(test[0]) && mean(test[best]) < mean(shared_test)) ++beats_both;
    if (mean(poor[best]) < mean(poor[0]) && mean(poor[best]) < mean(shared_poor)) ++poor_beats_both;
    for (std::size_t t = 0; t < s.taus.size(); ++t) {
      by_tau[t].push_back(mean(test[t]));
      poor_by_tau[t].push_back(mean(poor[t]));
      ppl_by_tau[t].push_back(mean(ppl[t]));
    }
    shared_all.push_back(mean(shared_test));
    shared_poor_all.push_back(mean(shared_poor));
    shared_ppl_all.push_back(mean(shared_ppl));
    teacher_ppl_all.push_back(mean(teacher_perplexity));
    std::string sizes_text;
    for (Index n : c.sequences) sizes_text += (sizes_text.empty() ? "" : ", ") + std::to_string(n);
    std::printf("| %d | %ld (%s) | %.4f ± %.4f | %g | %.4f ± %.4f | %.4f ± %.4f | %.4f / %.4f / %.4f | "
                "%.3f / %.3f / %.3f / %.3f | %.2f |\n",
                k, long(c.tasks), sizes_text.c_str(), mean(test[0]), sd(test[0]), s.taus[best], mean(test[best]),
                sd(test[best]), mean(shared_test), sd(shared_test), mean(poor[0]), mean(poor[best]), mean(shared_poor),
                mean(ppl[0]), mean(ppl[best]), mean(shared_ppl), mean(teacher_perplexity), r_best);
    std::fflush(stdout);
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  std::string summary;
  char line[600];
  std::snprintf(line, sizeof line, "## The family (%d configurations x %d seeds)\n\n", s.configs, s.seeds);
  summary += line;
  std::snprintf(line, sizeof line,
                "- BoRA at its validation-chosen tau beats both tau = 0 and the shared LoRA: on the task mean in %d of "
                "%d configurations, on the poorest task in %d of %d\n",
                beats_both, s.configs, poor_beats_both, s.configs);
  summary += line;
  std::snprintf(line, sizeof line,
                "- held-out KL, independent minus BoRA: %.4f ± %.4f (all tasks), %.4f ± %.4f (the poorest task)\n",
                mean(gain_vs_independent), sd(gain_vs_independent), mean(poor_gain_vs_independent),
                sd(poor_gain_vs_independent));
  summary += line;
  std::snprintf(line, sizeof line,
                "- held-out KL, shared minus BoRA: %.4f ± %.4f (all tasks), %.4f ± %.4f (the poorest task)\n",
                mean(gain_vs_shared), sd(gain_vs_shared), mean(poor_gain_vs_shared), sd(poor_gain_vs_shared));
  summary += line;
  std::snprintf(line, sizeof line,
                "- Spearman correlation of ||theta_d - Theta|| with the task's training sequences, at the chosen tau: "
                "%.2f ± %.2f\n",
                mean(rho), sd(rho));
  summary += line;
  std::snprintf(line, sizeof line,
                "\n| method | held-out KL, task mean (family mean ± sd) | the poorest task | perplexity, task mean "
                "(the teachers': %.3f) |\n|---|---|---|---|\n",
                mean(teacher_ppl_all));
  summary += line;
  for (std::size_t t = 0; t < s.taus.size(); ++t) {
    std::snprintf(line, sizeof line, "| tau = %g | %.4f ± %.4f | %.4f ± %.4f | %.3f ± %.3f |\n", s.taus[t],
                  mean(by_tau[t]), sd(by_tau[t]), mean(poor_by_tau[t]), sd(poor_by_tau[t]), mean(ppl_by_tau[t]),
                  sd(ppl_by_tau[t]));
    summary += line;
  }
  std::snprintf(line, sizeof line, "| shared LoRA | %.4f ± %.4f | %.4f ± %.4f | %.3f ± %.3f |\n", mean(shared_all),
                sd(shared_all), mean(shared_poor_all), sd(shared_poor_all), mean(shared_ppl_all), sd(shared_ppl_all));
  summary += line;
  std::printf("\n%s\nresults in %s (runs.csv, summary.md); %.1f s total\n", summary.c_str(), out.string().c_str(),
              seconds);
  std::ofstream(out / "summary.md") << summary;
  return 0;
}
