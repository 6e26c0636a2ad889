// allocation_study: does rank allocation beat uniform LoRA at the same budget, on configurations it was
// not tuned to? A family of planted-rank teacher configurations is generated from seeds: for each one,
// a random planted rank per linear module of the toy transformer (zeros included; modules of
// different shapes: attention 32 x 32, MLP 32 x 128 and 128 x 32), a budget equal to the planted total
// or binding below it, and several training seeds. Every configuration and seed runs
//   lora       uniform LoRA at the budget (every module the same rank)
//   paper      ALoRA exactly as the paper specifies it (AB-LoRA scores, prune n_A and reallocate)
//   gain       rankwise's gain-over-cost allocator (docs/rank/alora.md)
//   prune      rankwise's recommended allocator: LoRA at 3 x the rank, pruned by drop costs to the
//              budget (pruning_schedule()); prune-x<k> starts at k x the rank, prune-fisher /
//              prune-ab / prune-sens / prune-mag prune by Fisher drop costs (prune-fisher<digits>: EMA
//              factor 0.<digits>), AB-LoRA, sensitivity (prune-sens-sum: summed over each slice, not
//              averaged) or magnitude scores
//   prune-balanced  the control: the same start and schedule, ending at uniform ranks
//   oracle     LoRA on the planted modules only, ranks in proportion to the planted ones
//   oracle-optimal  LoRA at the budget-optimal ranks (below)
//   prune-fisher-to-planted, prune-fisher-to-optimal  prune-fisher that must end at the oracle's or the
//              budget-optimal ranks: what the allocator's own choice of ranks is worth
// and the program reports every configuration (mean and standard deviation over seeds) and the
// family: how often and by how much each allocator beats uniform LoRA on the held-out teacher KL,
// the Spearman correlation of its final ranks with the planted ones and with the budget-optimal ranks
// (when the budget binds, the planted ranks are not the best allocation: each planted change is
// calibrated to cost the same KL alone, so a direction of a rank-2 change is worth three of a rank-6
// one; the budget-optimal ranks keep the directions worth most, each worth its change's calibrated
// KL split by the data-visible spectrum; they equal the planted ranks when the budget does not bind),
// the ranks left on modules planted
// at rank 0, the share of pruned ranks that had been added at the round before (oscillation) and the
// allocator's cost: extra wall time over the uniform run and the scoring rounds' share of the run.
// Output: text on stdout, <out>/runs.csv (one row per run) and <out>/summary.md.
// Run: build/benchmarks/allocation_study [--configs 12] [--seeds 5] [--steps 1200] [--jobs 2] [--out DIR] (docs/benchmarks.md)
#include <rankwise/models/base_checkpoint.hpp>
#include <rankwise/models/finetune.hpp>
#include <rankwise/models/teacher.hpp>
#include <rankwise/rankwise.hpp>

#include "bench_context.hpp"
#include "study_base.hpp"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
using rankwise::Index;
using rankwise::Random;
using Model = rankwise::ToyTransformer<float>;
using Clock = std::chrono::steady_clock;

struct Settings {
  int configs = 12;
  int seeds = 5;
  int first_config = 1;
  long steps = 1200;
  long pretrain_steps = 1500;
  Index batch = 32;
  Index eval_sequences = 256;
  Index validation = 128;         // sequences of the allocator's fixed validation batch
  Index validation_batches = 4;  // parts it is scored in (standard errors need >= 2)
  int jobs = 2;
  double gain_ratio = 1.5;
  std::string methods = "lora,paper,gain,prune,prune-balanced,oracle";
  std::string basis = "inputs";  // where planted changes take their input directions (PlantBasis)
  std::string out = "allocation_study_output";
  std::string base;
  bool quick = false;
  bool verbose = false;
};

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The control of the pruning runs (method prune-balanced): scores that make prune-only take one rank from
// every module in turn (each module's weakest by magnitude first), so that the run starts and trains like
// the pruning runs but ends with uniform ranks. What it gains over uniform LoRA comes from the start
// above the budget, not from allocation.
class BalancedScores final : public rankwise::ImportanceEstimator<float> {
 public:
  const char* name() const override { return "balanced"; }
  rankwise::ImportanceScores score(std::span<rankwise::RankModule<float>> modules) override {
    rankwise::ImportanceScores magnitude = m_magnitude.score(modules);
    rankwise::ImportanceScores out;
    for (const std::vector<double>& v : magnitude.scores) {
      std::vector<std::size_t> order(v.size());
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
      std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return v[a] < v[b]; });
      std::vector<double> position(v.size());
      for (std::size_t k = 0; k < order.size(); ++k) position[order[k]] = double(k) - double(v.size());
      out.scores.push_back(position);  // the weakest of the largest module first, then round robin
    }
    return out;
  }

 private:
  rankwise::MagnitudeImportance<float> m_magnitude;
};

// Pruning to given ranks (methods prune-fisher-to-planted and prune-fisher-to-optimal): Fisher drop
// costs, except that each module's `target` best ranks are never pruned, so that the run starts and
// trains like prune-fisher but ends at the target allocation (as near as the start allows). Against
// prune-fisher it tells what the allocator's own choice of ranks is worth, everything else equal.
class TargetedScores final : public rankwise::ImportanceEstimator<float> {
 public:
  explicit TargetedScores(std::map<std::string, Index> targets) : m_targets(std::move(targets)) {}
  const char* name() const override { return "targeted"; }
  bool needs_observations() const override { return true; }
  void observe(std::span<rankwise::RankModule<float>> modules) override { m_fisher.observe(modules); }
  void follow(const rankwise::RankChange& change) override { m_fisher.follow(change); }
  rankwise::ImportanceScores score(std::span<rankwise::RankModule<float>> modules) override {
    rankwise::ImportanceScores out = m_fisher.score(modules);
    if (out.status != rankwise::Status::Ok) return out;
    for (std::size_t m = 0; m < modules.size(); ++m) {
      const auto it = m_targets.find(modules[m].path());
      const Index target = it == m_targets.end() ? 0 : it->second;
      std::vector<double>& v = out.scores[m];
      std::vector<std::size_t> order(v.size());
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
      std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return v[a] > v[b]; });
      for (std::size_t k = 0; k < order.size() && Index(k) < target; ++k) v[order[k]] = 1e30;  // its best `target`
    }
    return out;
  }

 private:
  std::map<std::string, Index> m_targets;
  rankwise::FisherImportance<float> m_fisher;
};

// A configuration of the family: planted ranks per module and a budget, from its seed alone.
struct Configuration {
  int id = 0;
  bool binding = false;      // budget below the planted total
  Index uniform_rank = 0;    // the budget is uniform_rank * modules
  Index budget = 0;
  std::vector<rankwise::ModuleRank> plan;  // every module, planted rank 0 included
};

Configuration make_configuration(int id, const std::vector<std::string>& paths) {
  Configuration c;
  c.id = id;
  Random rng(0xC0F16 + std::uint64_t(id) * 7919);
  c.binding = id % 2 == 0;
  c.uniform_rank = rng.uniform_int(2, 3);
  const Index modules = Index(paths.size());
  c.budget = c.uniform_rank * modules;
  // The planted total: the budget, or half as much again when the budget binds.
  const Index total = c.binding ? c.budget * 3 / 2 : c.budget;
  std::vector<Index> ranks(paths.size(), 0);
  std::vector<std::size_t> live;
  for (std::size_t m = 0; m < paths.size(); ++m)
    if (rng.uniform() >= 0.4) live.push_back(m);  // about 40 % of the modules need nothing
  if (live.size() < 2) live = {0, paths.size() - 1};
  const Index cap = 12;
  Index sum = 0;
  for (std::size_t m : live) {
    ranks[m] = rng.uniform_int(1, 6);
    sum += ranks[m];
  }
  // Adjust one rank at a time on random live modules until the planted total is met; when every live
  // module is full, one more module becomes live.
  while (sum != total) {
    if (sum < total && std::all_of(live.begin(), live.end(), [&](std::size_t m) { return ranks[m] >= cap; })) {
      for (std::size_t m = 0; m < paths.size(); ++m)
        if (ranks[m] == 0) {
          live.push_back(m);
          ranks[m] = 1;
          ++sum;
          break;
        }
      continue;
    }
    const std::size_t m = live[static_cast<std::size_t>(rng.uniform_int(0, Index(live.size()) - 1))];
    if (sum < total && ranks[m] < cap) {
      ++ranks[m];
      ++sum;
    } else if (sum > total && ranks[m] > 1) {
      --ranks[m];
      --sum;
    }
  }
  for (std::size_t m = 0; m < paths.size(); ++m) c.plan.push_back({paths[m], ranks[m]});
  return c;
}

// The budget-optimal ranks (aligned with c.plan): the budget goes, direction by direction, to the
// planted directions worth most, a direction's worth being its change's calibrated KL split in
// proportion to the squares of the change's data-visible singular values. `kl` and `spectra` are in
// the order of the planted (non-zero) modules. Equal worths go round robin (first directions first).
std::vector<Index> budget_optimal_ranks(const Configuration& c, const std::vector<double>& kl,
                                        const std::vector<std::vector<double>>& spectra) {
  struct Direction {
    double worth;
    std::size_t order, module;
  };
  std::vector<Direction> directions;
  std::size_t planted = 0;
  for (std::size_t m = 0; m < c.plan.size(); ++m) {
    if (c.plan[m].rank == 0) continue;
    const std::vector<double>& s = spectra.at(planted);
    double total = 0.0;
    for (double v : s) total += v * v;
    for (std::size_t k = 0; k < s.size() && Index(k) < c.plan[m].rank; ++k)
      directions.push_back({total > 0.0 ? kl.at(planted) * s[k] * s[k] / total : 0.0, k, m});
    ++planted;
  }
  // Worths equal to within a part in a thousand count as equal, so that near-ties go round robin.
  std::stable_sort(directions.begin(), directions.end(), [](const Direction& a, const Direction& b) {
    if (std::abs(a.worth - b.worth) > 1e-3 * std::max(a.worth, b.worth)) return a.worth > b.worth;
    return a.order != b.order ? a.order < b.order : a.module < b.module;
  });
  std::vector<Index> ranks(c.plan.size(), 0);
  for (std::size_t i = 0; i < directions.size() && Index(i) < c.budget; ++i) ++ranks[directions[i].module];
  return ranks;
}

struct Run {
  std::string method;
  int config = 0;
  int seed = 0;
  double kl = NAN;
  double spearman = NAN;
  double spearman_optimal = NAN;  // against the budget-optimal ranks
  double zero_rank = NAN;  // mean final rank on modules planted at rank 0
  long pruned = 0, pruned_recent = 0, rounds = 0;
  double seconds = 0.0;
  double scoring_seconds = 0.0;  // the allocator's scoring rounds
  std::string ranks;
};

// The ranks in proportion to the planted ones at the budget (aligned with c.plan; planted modules get
// at least 1).
std::vector<Index> oracle_ranks(const Configuration& c) {
  Index planted = 0;
  for (const rankwise::ModuleRank& m : c.plan) planted += m.rank;
  std::vector<Index> ranks;
  Index sum = 0;
  for (const rankwise::ModuleRank& m : c.plan) {
    const Index k = m.rank == 0 ? 0 : std::max<Index>(1, Index(std::floor(double(m.rank * c.budget) / double(planted))));
    ranks.push_back(k);
    sum += k;
  }
  for (std::size_t i = 0; sum < c.budget; i = (i + 1) % ranks.size())  // the remainder to planted modules
    if (ranks[i] > 0 && ranks[i] < c.plan[i].rank) {
      ++ranks[i];
      ++sum;
    }
  return ranks;
}

rankwise::FinetuneRecipe recipe_for(const std::string& method, const Configuration& c, const Settings& s,
                                    const std::vector<Index>& optimal) {
  rankwise::FinetuneRecipe r;
  r.adapter = method == "lora" || method.rfind("oracle", 0) == 0 ? "lora" : "alora";
  r.rank = c.uniform_rank;
  r.alpha = 2.0 * double(c.uniform_rank);
  r.steps = s.steps;
  r.lr = rankwise::recommended_lr("lora");
  if (method == "lora") return r;
  if (method == "oracle-optimal") {  // LoRA at the budget-optimal ranks
    for (std::size_t i = 0; i < optimal.size(); ++i)
      if (optimal[i] > 0) {
        r.target_modules.push_back(c.plan[i].path);
        r.rank_pattern[c.plan[i].path] = optimal[i];
        r.alpha_pattern[c.plan[i].path] = 2.0 * double(optimal[i]);
      }
    return r;
  }
  if (method == "oracle") {  // LoRA on the planted modules only, ranks in proportion to the planted ones
    const std::vector<Index> ranks = oracle_ranks(c);
    for (std::size_t i = 0; i < ranks.size(); ++i)
      if (ranks[i] > 0) {
        r.target_modules.push_back(c.plan[i].path);
        r.rank_pattern[c.plan[i].path] = ranks[i];
        r.alpha_pattern[c.plan[i].path] = 2.0 * double(ranks[i]);  // the same scale, 2, as every other run
      }
    return r;
  }
  rankwise::RankAllocatorOptions a;
  if (method.rfind("prune", 0) == 0) {
    // rankwise's recommended allocation: three times the rank to start, pruned by drop costs to the
    // budget (pruning_schedule()). Variants: prune-x<k> starts at k times the rank; prune-fisher,
    // prune-ab, prune-sens and prune-mag prune by Fisher drop costs, AB-LoRA, sensitivity or magnitude
    // scores; prune-balanced is the control that ends at uniform ranks (BalancedScores).
    r.importance = "drop_cost";
    std::stringstream parts(method);
    for (std::string part; std::getline(parts, part, '-');) {
      if (part.size() > 1 && part[0] == 'x') r.prune_start_factor = std::stol(part.substr(1));
      if (part == "ab") r.importance = "ablation";
      if (part == "sens") r.importance = "sensitivity";
      if (part.rfind("fisher", 0) == 0) r.importance = "fisher";  // fisher<digits>: beta = 0.<digits>
      if (part == "mag") r.importance = "magnitude";
    }
    r.allocator = rankwise::pruning_schedule(s.steps);
    return r;
  }
  if (method == "paper") {
    a.policy = rankwise::AllocationPolicy::PruneAndReallocate;
    a.warmup_steps = std::max(1L, s.steps / 5);
    a.rounds = 4;
    a.recovery_steps = std::max(1L, s.steps / 10);
  } else {
    a = rankwise::gain_over_cost_schedule(s.steps);
    a.gain_ratio = s.gain_ratio;
  }
  r.allocator = a;
  return r;
}

// Runs every method and seed on configuration c; `optimal` receives its budget-optimal ranks.
std::vector<Run> run_configuration(const Configuration& c, Model& base, const rankwise::TaskOptions& task_options,
                                   const Settings& s, std::vector<Index>& optimal) {
  Random plant_rng(0x9A4 + std::uint64_t(c.id));
  std::vector<rankwise::ModuleRank> nonzero;
  for (const rankwise::ModuleRank& m : c.plan)
    if (m.rank > 0) nonzero.push_back(m);
  const rankwise::TaskGenerator inputs(rankwise::TaskKind::Mixture, task_options);
  Random basis_rng(0xBA515 + std::uint64_t(c.id));
  const rankwise::PlantOptions plant_options{
      .basis = s.basis == "weights" ? rankwise::PlantBasis::Weights : rankwise::PlantBasis::Inputs};
  rankwise::PlantedTeacher<float> teacher(base, nonzero, plant_options, plant_rng, inputs.sample(256, basis_rng));
  Random calibration_rng(0xCA11B + std::uint64_t(c.id));
  const rankwise::PlantCalibration calibration = teacher.calibrate(inputs.sample(s.batch, calibration_rng));
  // The rank of every planted change as the data sees it, and the budget-optimal ranks from it.
  Random spectrum_rng(0x5BEC + std::uint64_t(c.id));
  const std::vector<std::vector<double>> spectra = teacher.effect_spectra(inputs.sample(256, spectrum_rng));
  optimal = budget_optimal_ranks(c, calibration.kl, spectra);
  std::vector<rankwise::ModuleRank> optimal_truth = teacher.truth();
  for (rankwise::ModuleRank& m : optimal_truth)
    for (std::size_t i = 0; i < c.plan.size(); ++i)
      if (c.plan[i].path == m.path) m.rank = optimal[i];
  if (s.verbose) {
    std::ostringstream os;
    os << "configuration " << c.id << ": planted rank / participation ratio of dW X (sum s^2)^2 / sum s^4:";
    for (std::size_t i = 0; i < spectra.size(); ++i) {
      double s2 = 0.0, s4 = 0.0;
      for (double v : spectra[i]) {
        s2 += v * v;
        s4 += v * v * v * v;
      }
      char cell[64];
      std::snprintf(cell, sizeof cell, " %ld/%.1f", long(teacher.changes()[i].rank), s4 > 0.0 ? s2 * s2 / s4 : 0.0);
      os << cell;
    }
    os << "\nconfiguration " << c.id << ": budget-optimal ranks";
    for (Index k : optimal) os << ' ' << k;
    std::printf("%s\n", os.str().c_str());
  }
  rankwise::TeacherTask<float> task(teacher.model(), inputs);
  Random held_out_rng(0xE7A1 + std::uint64_t(c.id));
  const std::vector<rankwise::TeacherBatch<float>> held_out = task.held_out(s.eval_sequences, s.batch, held_out_rng);
  std::vector<Run> runs;
  for (int seed = 1; seed <= s.seeds; ++seed) {
    for (const std::string& method : rankwise::bench::split_list(s.methods)) {
      Random init_rng(1);
      Model model(base.config(), init_rng);
      model.copy_parameters_from(base);
      rankwise::FinetuneRecipe recipe = recipe_for(method, c, s, optimal);
      recipe.seed = std::uint64_t(seed);
      recipe.validation_batches = s.validation_batches;
      Random validation_rng(std::uint64_t(seed) * 31 + 0xA11C);
      const rankwise::TokenBatch validation = inputs.sample(s.validation, validation_rng);
      auto loss = std::make_shared<rankwise::TeacherLoss<float>>(teacher.model());
      std::shared_ptr<rankwise::ImportanceEstimator<float>> estimator;
      if (method == "prune-balanced") estimator = std::make_shared<BalancedScores>();
      if (method == "prune-fisher-to-planted" || method == "prune-fisher-to-optimal") {
        std::map<std::string, Index> targets;
        for (std::size_t i = 0; i < c.plan.size(); ++i)
          targets[c.plan[i].path] = method == "prune-fisher-to-optimal" ? optimal[i] : oracle_ranks(c)[i];
        estimator = std::make_shared<TargetedScores>(std::move(targets));
      }
      if (const std::size_t f = method.find("-fisher");
          f != std::string::npos && method.size() > f + 7 && std::isdigit(static_cast<unsigned char>(method[f + 7])))
        estimator = std::make_shared<rankwise::FisherImportance<float>>(
            rankwise::FisherImportanceOptions{.beta = std::stod("0." + method.substr(f + 7))});
      if (method.find("-sum") != std::string::npos)  // sensitivity summed over each slice (not averaged)
        estimator = std::make_shared<rankwise::SensitivityImportance<float>>(
            rankwise::SensitivityImportanceOptions{.reduction = rankwise::SliceReduction::Sum});
      rankwise::Finetuner<float> tuner(model, recipe, validation, loss, estimator);
      Random data_rng(std::uint64_t(seed) * 104729 + 3);
      const auto start = Clock::now();
      for (long step = 0; step < recipe.steps; ++step) tuner.step(inputs.sample(s.batch, data_rng));
      tuner.finish();
      Run r;
      r.method = method;
      r.config = c.id;
      r.seed = seed;
      r.seconds = seconds_since(start);
      r.kl = rankwise::evaluate_distillation(model, held_out).mean_kl();
      if (const rankwise::RankAllocator<float>* allocator = tuner.allocator()) {
        const std::map<std::string, Index> ranks = allocator->rank_pattern();
        const rankwise::AllocationComparison cmp = rankwise::compare_allocation(teacher.truth(), ranks);
        r.spearman = cmp.spearman.value_or(NAN);
        r.spearman_optimal = rankwise::compare_allocation(optimal_truth, ranks).spearman.value_or(NAN);
        double zero_sum = 0.0;
        int zero_n = 0;
        for (const rankwise::ModuleRank& m : c.plan) {
          if (m.rank == 0) {
            zero_sum += double(ranks.at(m.path));
            ++zero_n;
          }
          r.ranks += std::to_string(ranks.at(m.path)) + " ";
        }
        r.zero_rank = zero_n ? zero_sum / zero_n : NAN;
        if (s.verbose && seed == 1) {
          std::ostringstream os;
          os << "configuration " << c.id << ", " << method << ", seed 1: planted";
          for (const rankwise::ModuleRank& m : c.plan) os << ' ' << m.rank;
          os << "\n" << allocator->format_table() << allocator->format_events();
          for (const rankwise::AllocationEvent& e : allocator->events()) {
            os << "  round " << e.round << " drop costs (mean per module) / predicted gain of one more rank:";
            for (std::size_t m = 0; m < e.mean_scores.size(); ++m) {
              char cell[64];
              std::snprintf(cell, sizeof cell, " %.2g/%.2g", e.mean_scores[m],
                            m < e.predicted_gains.size() ? e.predicted_gains[m] : NAN);
              os << cell;
            }
            os << '\n';
          }
          std::printf("%s", os.str().c_str());
        }
        for (const rankwise::AllocationEvent& e : allocator->events()) {
          r.scoring_seconds += e.scoring_seconds;
          if (e.status != rankwise::Status::Ok) continue;
          ++r.rounds;
          r.pruned += long(e.pruned.size());
          r.pruned_recent += long(e.pruned_recent);
        }
      }
      runs.push_back(r);
    }
  }
  return runs;
}

struct Stats {
  double mean = NAN, sd = NAN;
  int n = 0;
};

Stats stats_of(const std::vector<double>& v) {
  Stats s;
  double sum = 0.0;
  for (double x : v)
    if (std::isfinite(x)) {
      sum += x;
      ++s.n;
    }
  if (s.n == 0) return s;
  s.mean = sum / s.n;
  if (s.n > 1) {
    double ss = 0.0;
    for (double x : v)
      if (std::isfinite(x)) ss += (x - s.mean) * (x - s.mean);
    s.sd = std::sqrt(ss / (s.n - 1));
  }
  return s;
}

std::string fmt(const Stats& s, int precision = 4) {
  char buf[64];
  if (!std::isfinite(s.mean)) return "-";
  if (std::isfinite(s.sd))
    std::snprintf(buf, sizeof buf, "%.*f ± %.*f", precision, s.mean, precision, s.sd);
  else
    std::snprintf(buf, sizeof buf, "%.*f", precision, s.mean);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  CLI::App app{"allocation_study: rank allocators against uniform LoRA on a family of planted-rank teachers"};
  app.add_option("--configs", s.configs, "configurations of the family")->check(CLI::PositiveNumber);
  app.add_option("--first-config", s.first_config, "id of the first configuration")->check(CLI::PositiveNumber);
  app.add_option("--seeds", s.seeds, "training seeds per configuration")->check(CLI::PositiveNumber);
  app.add_option("--steps", s.steps, "fine-tuning steps")->check(CLI::Range(20L, 100000L));
  app.add_option("--jobs", s.jobs, "configurations run at once, one thread each")->check(CLI::Range(1, 64));
  app.add_option("--gain-ratio", s.gain_ratio, "gain-over-cost: the gain a move must reach, in drop costs")
      ->check(CLI::PositiveNumber);
  app.add_option("--validation", s.validation, "sequences in the allocators' validation batch")
      ->check(CLI::Range(1, 4096));
  app.add_option("--validation-batches", s.validation_batches,
                 "parts the validation batch is scored in (their spread gives the scores' standard errors)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--methods", s.methods,
                 "comma-separated: lora, paper, gain, prune, prune-x<k>, prune-fisher[<digits>], prune-ab, prune-sens[-sum], "
                 "prune-mag, "
                 "prune-balanced (the control), oracle (LoRA on the planted modules, ranks in proportion), oracle-optimal "
                 "(LoRA at the budget-optimal ranks), prune-fisher-to-planted / -to-optimal (pruning that ends at those ranks)");
  app.add_option("--basis", s.basis,
                 "planted changes orthonormal in the inputs' metric (inputs: every direction moves the outputs "
                 "alike) or in weight space (weights)")
      ->check(CLI::IsMember({"inputs", "weights"}));
  app.add_option("--out", s.out, "results directory");
  app.add_option("--base", s.base, "cached base directory (default: <out>/base-cache/...)");
  app.add_flag("--quick", s.quick, "two configurations, two seeds, 120 steps, a 32-sequence validation batch in 2 parts: a smoke run");
  app.add_flag("--verbose", s.verbose, "print every allocator's rounds for the first seed");
  CLI11_PARSE(app, argc, argv);
  for (const std::string& m : rankwise::bench::split_list(s.methods))
    if (m != "lora" && m != "paper" && m != "gain" && m.rfind("prune", 0) != 0 && m != "oracle" &&
        m != "oracle-optimal") {
      std::fprintf(stderr,
                   "allocation_study: --methods: unknown method \"%s\" (known: lora, paper, gain, prune, oracle, "
                   "oracle-optimal)\n",
                   m.c_str());
      return 2;
    }
  if (s.quick) {
    s.configs = std::min(s.configs, 2);
    s.seeds = std::min(s.seeds, 2);
    s.steps = 120;
    s.pretrain_steps = 300;
    s.eval_sequences = 64;
    s.validation = std::min<Index>(s.validation, 32);
    s.validation_batches = std::min<Index>(s.validation_batches, 2);
  }
  Eigen::setNbThreads(1);
  const rankwise::TaskOptions task_options = rankwise::bench::study_task_options();
  const rankwise::PretrainRecipe pretraining{.task_options = task_options, .steps = s.pretrain_steps,
                                             .batch = s.batch, .seed = 1};
  std::printf("allocation_study: rankwise %s; %s; %s; Eigen %s\n", rankwise::version_string,
              rankwise::bench::cpu_model().c_str(), rankwise::bench::compiler().c_str(),
              rankwise::bench::eigen_version().c_str());
  std::printf("model: vocab 128, d_model 32, 4 heads, 2 layers, d_ff 128, sequence 32, batch %ld; %ld pre-training "
              "steps; %ld fine-tuning steps; configurations %d..%d, %d seed(s) each; %ld held-out sequences; "
              "gain ratio %.2f; validation batch %ld sequences in %ld part(s); planted basis %s; %d job(s)\n",
              long(s.batch), s.pretrain_steps, s.steps, s.first_config, s.first_config + s.configs - 1, s.seeds,
              long(s.eval_sequences), s.gain_ratio, long(s.validation), long(s.validation_batches), s.basis.c_str(), s.jobs);
  std::fflush(stdout);
  const fs::path out = s.out;
  fs::create_directories(out);
  rankwise::bench::StudyBase study = rankwise::bench::load_study_base(pretraining, out, s.base);
  rankwise::PretrainedBase<float>& base = study.base;
  const std::vector<std::string>& paths = study.paths;
  std::vector<Configuration> configurations;
  for (int i = 0; i < s.configs; ++i) configurations.push_back(make_configuration(s.first_config + i, paths));

  const auto start = Clock::now();
  std::vector<std::vector<Run>> results(configurations.size());
  std::vector<std::vector<Index>> optimal(configurations.size());
  std::atomic<std::size_t> next{0};
  std::mutex print;
  std::vector<std::thread> workers;
  for (int j = 0; j < s.jobs; ++j)
    workers.emplace_back([&] {
      for (std::size_t i; (i = next++) < configurations.size();) {
        results[i] = run_configuration(configurations[i], base.model, task_options, s, optimal[i]);
        std::lock_guard<std::mutex> lock(print);
        std::printf("  configuration %d done (%.0f s)\n", configurations[i].id, seconds_since(start));
        std::fflush(stdout);
      }
    });
  for (std::thread& w : workers) w.join();

  std::ofstream csv(out / "runs.csv");
  csv << "config,binding,budget,seed,method,teacher_kl,spearman,spearman_optimal,zero_module_rank,rounds,pruned,pruned_recent,seconds,"
         "scoring_seconds,final_ranks\n";
  std::ostringstream md;
  const std::vector<std::string> methods = rankwise::bench::split_list(s.methods);
  md << "| config | budget | planted ranks (budget-optimal ranks) |";
  for (const std::string& m : methods) md << ' ' << m << " KL |";
  for (const std::string& m : methods)
    if (m != "lora") md << ' ' << m << " spearman |";
  md << "\n|---|---|---|";
  for (std::size_t i = 0; i < methods.size(); ++i) md << "---|";
  for (const std::string& m : methods)
    if (m != "lora") md << "---|";
  md << '\n';
  // Family statistics of each allocator against uniform LoRA.
  struct Family {
    int wins = 0, within_sd = 0, n = 0;
    std::vector<double> rel, spearman, spearman_equal, spearman_binding, spearman_optimal, zero;
    long pruned = 0, recent = 0;
    double seconds = 0.0, lora_seconds = 0.0, scoring_seconds = 0.0;
  };
  std::map<std::string, Family> family;
  for (std::size_t i = 0; i < configurations.size(); ++i) {
    const Configuration& c = configurations[i];
    std::map<std::string, std::vector<double>> kl, rho, rho_optimal;
    std::map<std::string, double> seconds;
    for (const Run& r : results[i]) {
      kl[r.method].push_back(r.kl);
      rho[r.method].push_back(r.spearman);
      rho_optimal[r.method].push_back(r.spearman_optimal);
      seconds[r.method] += r.seconds;
      csv << c.id << ',' << (c.binding ? 1 : 0) << ',' << c.budget << ',' << r.seed << ',' << r.method << ',' << r.kl
          << ',' << r.spearman << ',' << r.spearman_optimal << ',' << r.zero_rank << ',' << r.rounds << ',' << r.pruned << ',' << r.pruned_recent
          << ',' << r.seconds << ',' << r.scoring_seconds << ',' << r.ranks << '\n';
    }
    md << "| " << c.id << " | " << c.budget << (c.binding ? " (binding)" : " (= planted)") << " | ";
    for (const rankwise::ModuleRank& m : c.plan) md << m.rank << ' ';
    if (c.binding) {
      md << "(";
      for (std::size_t k = 0; k < optimal[i].size(); ++k) md << (k ? " " : "") << optimal[i][k];
      md << ") ";
    }
    md << '|';
    for (const std::string& m : methods) md << ' ' << fmt(stats_of(kl[m])) << " |";
    for (const std::string& m : methods)
      if (m != "lora") md << ' ' << fmt(stats_of(rho[m]), 2) << " |";
    md << '\n';
    const Stats lora = stats_of(kl["lora"]);
    for (const std::string& m : methods) {
      if (m == "lora" || !std::isfinite(lora.mean)) continue;
      Family& f = family[m];
      const Stats st = stats_of(kl[m]);
      ++f.n;
      if (st.mean < lora.mean) ++f.wins;
      if (st.mean <= lora.mean + (std::isfinite(lora.sd) ? lora.sd : 0.0)) ++f.within_sd;
      f.rel.push_back((lora.mean - st.mean) / lora.mean);
      f.spearman.push_back(stats_of(rho[m]).mean);
      (c.binding ? f.spearman_binding : f.spearman_equal).push_back(stats_of(rho[m]).mean);
      f.spearman_optimal.push_back(stats_of(rho_optimal[m]).mean);
      for (const Run& r : results[i])
        if (r.method == m) {
          f.zero.push_back(r.zero_rank);
          f.pruned += r.pruned;
          f.recent += r.pruned_recent;
          f.scoring_seconds += r.scoring_seconds;
        }
      f.seconds += seconds[m];
      f.lora_seconds += seconds["lora"];
    }
  }
  md << "\n| allocator | configurations better than uniform LoRA | mean KL reduction | never worse by more than 1 sd "
        "| mean Spearman with planted ranks (equal budgets / binding) | with budget-optimal ranks | mean rank on rank-0 "
        "modules | pruned ranks added the round before | extra time over uniform | scoring time / run time |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& [m, f] : family) {
    char line[512];
    std::vector<double> percent;
    for (double x : f.rel) percent.push_back(100.0 * x);
    std::snprintf(line, sizeof line,
                  "| %s | %d of %d | %s %% | %d of %d | %s (%s / %s) | %s | %s | %ld of %ld (%.1f %%) | %.0f %% | %.0f %% |\n",
                  m.c_str(), f.wins, f.n, fmt(stats_of(percent), 1).c_str(), f.within_sd, f.n,
                  fmt(stats_of(f.spearman), 2).c_str(), fmt(stats_of(f.spearman_equal), 2).c_str(),
                  fmt(stats_of(f.spearman_binding), 2).c_str(), fmt(stats_of(f.spearman_optimal), 2).c_str(),
                  fmt(stats_of(f.zero), 2).c_str(), f.recent, f.pruned,
                  f.pruned ? 100.0 * double(f.recent) / double(f.pruned) : 0.0,
                  f.lora_seconds > 0 ? 100.0 * (f.seconds - f.lora_seconds) / f.lora_seconds : 0.0,
                  f.seconds > 0 ? 100.0 * f.scoring_seconds / f.seconds : 0.0);
    md << line;
  }
  md << "\n(KL: held-out KL(teacher || student), nats per scored token, mean ± sd over seeds; mean KL reduction is "
        "100 (KL_lora - KL_allocator) / KL_lora, mean ± sd over configurations)\n";
  std::ofstream(out / "summary.md") << md.str();
  std::printf("%s\nresults in %s (%.0f s total)\n", md.str().c_str(), out.c_str(), seconds_since(start));
  return 0;
}
