#pragma once
/// \file rankwise/rank/allocator.hpp
/// RankAllocator: moves ranks between rank-adjustable adapters under a fixed budget. The paper's
/// ALoRA (Liu et al., 2024, arXiv:2403.16187, Algorithm 1), rankwise's gain-over-cost resolution of it,
/// and an AdaLoRA-like prune-only policy (Zhang et al., 2023, arXiv:2303.10512) for comparison.
///
///   gain over cost         before each round a sketch of every module's frozen-weight gradient
///                          (LoRA::arm_gradient_probe) gives the direction a new rank would use; a
///                          trial rank per module starts there (B = 0) and trains; then ranks move
///                          from the cheapest leave-one-out drop costs to the largest trial gains only
///                          while gain >= gain_ratio x cost, and young ranks are never pruned
///                          (rank/gain.hpp; gain_over_cost_schedule(T) for the defaults)
///   prune and reallocate   after K1 warm-up steps, N_A rounds K2 steps apart: score every active rank,
///                          remove the n_A lowest, give what they freed to the modules that lost none
///                          (evenly, the remainder to the highest mean score); training goes on after
///   prune only             start above budget; every prune_interval steps prune down to the cubic
///                          budget b(t) = b(T) + (b(0) - b(T)) (1 - (t - t_i) / (T - t_i - t_f))^3
///   budget                 in ranks (the paper) or in parameters (a rank of module m costs in + out);
///                          the modules never hold more than the budget
/// The allocator decides; the adapters act (remove_ranks / add_ranks: new A rows drawn like A's init,
/// new B columns zero); optimizers follow (add_optimizer / add_follower). Scales stay alpha / r_init.
/// step() is the training-step hook; finish() reports a run that never let the allocator act.
/// Docs: docs/rank/alora.md

#include <rankwise/core/config.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/optim/optimizer.hpp>
#include <rankwise/rank/gain.hpp>
#include <rankwise/rank/importance.hpp>
#include <rankwise/rank/module.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <iomanip>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace rankwise {

/// How the budget is counted.
enum class BudgetUnit {
  Ranks,       ///< the number of ranks over all modules (the paper)
  Parameters,  ///< trainable scalars: a rank of module m costs in_m + out_m
};

enum class AllocationPolicy {
  PruneAndReallocate,  ///< ALoRA's Algorithm 1, exactly as the paper specifies it
  PruneOnly,           ///< AdaLoRA-like: start above budget, prune down on a cubic schedule, never add
  GainOverCost,        ///< rankwise's resolution: move a rank only while its predicted gain beats its cost
};

/// How the gain-over-cost allocator predicts what one more rank would bring a module.
enum class GainEstimate {
  Trial,      ///< a trial rank per module, warm-started and trained for trial_steps, then its drop cost
  Curvature,  ///< sigma_1^2 / (2 h) from the residual gradient and the module's curvature (no trial)
};

struct RankAllocatorOptions {
  AllocationPolicy policy = AllocationPolicy::PruneAndReallocate;
  BudgetUnit budget_unit = BudgetUnit::Ranks;
  /// Total budget in budget_unit, >= 1 and <= capacity. Unset: what the modules hold at construction
  /// (prune-and-reallocate starts at its budget); prune-only needs it set, below the start.
  std::optional<Index> budget;
  /// K1: optimizer steps before the first round (prune-only: t_i, steps before pruning starts).
  long warmup_steps = 0;
  /// N_A: number of rounds (the paper: at most 8).
  long rounds = 8;
  /// n_A: ranks pruned per round; 0 = the number of adapted module kinds per block (module_kind()).
  Index ranks_per_round = 0;
  /// K2: recovery steps between rounds.
  long recovery_steps = 0;
  /// T: the run's length. Optional for prune-and-reallocate (then the schedule must fit in it);
  /// required for prune-only.
  long total_steps = 0;
  /// Prune-only: t_f, final steps at the target budget (no pruning), >= 0.
  long final_steps = 0;
  /// Prune-only: pruning happens every prune_interval steps (AdaLoRA's deltaT), >= 1.
  long prune_interval = 1;
  /// Gain-over-cost: a rank moves only when the predicted gain of the receiver's next rank is at
  /// least gain_ratio times the drop cost of what pays for it (> 0).
  double gain_ratio = 1.5;
  /// Gain-over-cost: ranks younger than this many steps are never pruned (-1: 2 * recovery_steps,
  /// so a rank added at one round survives the next).
  long min_rank_age = -1;
  /// Gain-over-cost: columns of the gradient sketch per module (>= 1; capped at min(in, out)).
  Index probe_rank = 8;
  /// Gain-over-cost: training steps per sketch pass; two passes end at each round (0: recovery_steps / 4,
  /// at least 1).
  long probe_steps = 0;
  /// Gain-over-cost: at most this many moves per round (0 = no limit).
  Index max_moves_per_round = 0;
  /// Gain-over-cost: new ranks start along the top directions of the residual gradient (rows of A
  /// along its right singular vectors, B zero); false draws them like A's init, as the paper does.
  bool warm_start = true;
  /// Gain-over-cost: how the gain of one more rank is predicted.
  GainEstimate gain_estimate = GainEstimate::Trial;
  /// Gain-over-cost with trials: steps a trial rank trains before the round (0: recovery_steps / 2).
  long trial_steps = 0;
};

/// The paper's schedule in steps: K1 = one epoch, K2 = a quarter epoch, N_A = 8.
inline RankAllocatorOptions paper_schedule(long steps_per_epoch) {
  if (steps_per_epoch < 1)
    detail::fail("rankwise::paper_schedule", "steps_per_epoch must be >= 1 (got ", steps_per_epoch, ")");
  RankAllocatorOptions options;
  options.warmup_steps = steps_per_epoch;
  options.recovery_steps = std::max(1L, steps_per_epoch / 4);
  options.rounds = 8;
  return options;
}

/// Gain-over-cost defaults for a run of `total_steps` optimizer steps: the first round after a fifth
/// of the run (K1 = T / 5), four rounds an eighth of the run apart (K2 = T / 8), so that the last round
/// leaves two fifths of the run for the new ranks to learn; each round's two sketch passes take the
/// K2 / 4 steps before it each. Needs total_steps >= 8.
inline RankAllocatorOptions gain_over_cost_schedule(long total_steps) {
  if (total_steps < 8)
    detail::fail("rankwise::gain_over_cost_schedule", "total_steps must be >= 8 (got ", total_steps, ")");
  RankAllocatorOptions options;
  options.policy = AllocationPolicy::GainOverCost;
  options.warmup_steps = total_steps / 5;
  options.recovery_steps = total_steps / 8;
  options.rounds = 4;
  options.total_steps = total_steps;
  return options;
}

/// The recommended allocation for a run of `total_steps` optimizer steps (docs/rank/alora.md, "Pruning
/// by drop costs"): prune-only, from adapters started at about three times their budgeted rank, with
/// drop costs (AblationImportance with leave_one_out, over several validation batches) as the scores.
/// Pruning starts after T / 6 steps, runs every T / 24 steps along AdaLoRA's cubic budget curve, and
/// reaches the budget at 2 T / 3, so that the last third of the run trains the final allocation.
/// `budget` is the ranks the modules end with (the Finetuner's is rank x modules); the allocator
/// refuses to start without one. Needs total_steps >= 24.
inline RankAllocatorOptions pruning_schedule(long total_steps, std::optional<Index> budget = std::nullopt) {
  if (total_steps < 24)
    detail::fail("rankwise::pruning_schedule", "total_steps must be >= 24 (got ", total_steps, ")");
  RankAllocatorOptions options;
  options.budget = budget;
  options.policy = AllocationPolicy::PruneOnly;
  options.warmup_steps = total_steps / 6;
  options.total_steps = total_steps;
  options.final_steps = total_steps / 3;
  options.prune_interval = std::max(1L, total_steps / 24);
  return options;
}

/// The kind of a module: its path without the numeric components ("layers.3.attn.q_proj" ->
/// "layers.attn.q_proj"), so that every block's q_proj is one kind.
inline std::string module_kind(std::string_view path) {
  std::string kind;
  std::size_t start = 0;
  while (start <= path.size()) {
    std::size_t end = path.find('.', start);
    if (end == std::string_view::npos) end = path.size();
    const std::string_view part = path.substr(start, end - start);
    const bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!numeric) {
      if (!kind.empty()) kind += '.';
      kind += part;
    }
    start = end + 1;
  }
  return kind;
}

/// `budget` ranks spread over `modules` modules as evenly as possible, the remainder to the first ones.
inline std::vector<Index> uniform_ranks(Index budget, Index modules) {
  if (modules < 1) detail::fail("rankwise::uniform_ranks", "modules must be >= 1 (got ", modules, ")");
  if (budget < 0) detail::fail("rankwise::uniform_ranks", "budget must be >= 0 (got ", budget, ")");
  std::vector<Index> ranks(static_cast<std::size_t>(modules), budget / modules);
  for (Index m = 0; m < budget % modules; ++m) ranks[static_cast<std::size_t>(m)] += 1;
  return ranks;
}

/// One module as the planner sees it: its rank, the most it can hold and what one rank costs.
struct ModuleCapacity {
  Index rank = 0;
  Index max_rank = 0;
  Index cost = 1;  ///< budget units per rank: 1 (ranks) or in + out (parameters)
};

/// A rank chosen for removal: its index in its module at scoring time, and its score.
struct PrunedRank {
  Index module = 0;
  Index rank = 0;
  double score = 0.0;
  double error = std::numeric_limits<double>::quiet_NaN();  ///< standard error of the score (NaN: one batch)
};

/// What a round will do: which ranks each module loses (ascending) and how many it gains.
struct RoundPlan {
  std::vector<std::vector<Index>> remove;
  std::vector<Index> add;
  std::vector<PrunedRank> pruned;  ///< lowest score first
  std::vector<double> mean_scores; ///< per module; -infinity for a module without ranks
};

namespace detail {

inline void check_plan_inputs(const char* where, const std::vector<std::vector<double>>& scores,
                              std::span<const ModuleCapacity> modules) {
  if (scores.size() != modules.size())
    fail(where, "scores must have one entry per module = ", modules.size(), " (got ", scores.size(), ")");
  for (std::size_t m = 0; m < modules.size(); ++m) {
    if (Index(scores[m].size()) != modules[m].rank)
      fail(where, "module ", m, " has rank ", modules[m].rank, " but ", scores[m].size(), " scores");
    if (modules[m].cost < 1) fail(where, "module ", m, " must cost >= 1 per rank (got ", modules[m].cost, ")");
    for (double s : scores[m])
      if (std::isnan(s)) fail(where, "scores must not be NaN (module ", m, ")");
  }
}

/// Every rank sorted by (score, module, rank), lowest first: the deterministic pruning order.
inline std::vector<PrunedRank> pruning_order(const std::vector<std::vector<double>>& scores) {
  std::vector<PrunedRank> all;
  for (std::size_t m = 0; m < scores.size(); ++m)
    for (std::size_t i = 0; i < scores[m].size(); ++i) all.push_back({Index(m), Index(i), scores[m][i]});
  std::stable_sort(all.begin(), all.end(), [](const PrunedRank& a, const PrunedRank& b) {
    if (a.score != b.score) return a.score < b.score;
    if (a.module != b.module) return a.module < b.module;
    return a.rank < b.rank;
  });
  return all;
}

inline RoundPlan empty_plan(const std::vector<std::vector<double>>& scores) {
  RoundPlan plan;
  plan.remove.resize(scores.size());
  plan.add.assign(scores.size(), 0);
  plan.mean_scores.resize(scores.size());
  for (std::size_t m = 0; m < scores.size(); ++m) {
    if (scores[m].empty()) {
      plan.mean_scores[m] = -std::numeric_limits<double>::infinity();
      continue;
    }
    double sum = 0.0;
    for (double s : scores[m]) sum += s;
    plan.mean_scores[m] = sum / double(scores[m].size());
  }
  return plan;
}

inline void take(RoundPlan& plan, const PrunedRank& r) {
  plan.pruned.push_back(r);
  plan.remove[static_cast<std::size_t>(r.module)].push_back(r.rank);
}

inline void sort_removals(RoundPlan& plan) {
  for (std::vector<Index>& v : plan.remove) std::sort(v.begin(), v.end());
}

}  // namespace detail

/// ALoRA's round on given scores: prune the `n_prune` lowest-scored ranks; the modules that lost none
/// receive what was freed (n_prune ranks, or their parameters), one rank each in turn, in order of
/// decreasing mean score (ties: lower module index first), skipping modules at max_rank or whose
/// rank no longer fits. If every module lost a rank nothing is added. Never adds more than it freed.
inline RoundPlan plan_reallocation(const std::vector<std::vector<double>>& scores,
                                   std::span<const ModuleCapacity> modules, Index n_prune) {
  detail::check_plan_inputs("rankwise::plan_reallocation", scores, modules);
  Index total = 0;
  for (const ModuleCapacity& m : modules) total += m.rank;
  if (n_prune < 0 || n_prune > total)
    detail::fail("rankwise::plan_reallocation", "n_prune must be in [0, active ranks = ", total, "] (got ", n_prune,
                 ")");
  RoundPlan plan = detail::empty_plan(scores);
  const std::vector<PrunedRank> order = detail::pruning_order(scores);
  Index freed = 0;
  for (Index k = 0; k < n_prune; ++k) {
    const PrunedRank& r = order[static_cast<std::size_t>(k)];
    detail::take(plan, r);
    freed += modules[static_cast<std::size_t>(r.module)].cost;
  }
  detail::sort_removals(plan);

  std::vector<Index> receivers;
  for (std::size_t m = 0; m < modules.size(); ++m)
    if (plan.remove[m].empty()) receivers.push_back(Index(m));
  std::stable_sort(receivers.begin(), receivers.end(), [&](Index a, Index b) {
    const double ma = plan.mean_scores[static_cast<std::size_t>(a)], mb = plan.mean_scores[static_cast<std::size_t>(b)];
    if (ma != mb) return ma > mb;
    return a < b;
  });
  Index left = freed;
  bool progress = true;
  while (progress && left > 0) {
    progress = false;
    for (Index m : receivers) {
      const ModuleCapacity& c = modules[static_cast<std::size_t>(m)];
      Index& add = plan.add[static_cast<std::size_t>(m)];
      if (c.rank + add >= c.max_rank || c.cost > left) continue;
      add += 1;
      left -= c.cost;
      progress = true;
      if (left == 0) break;
    }
  }
  return plan;
}

/// Prune-only step on given scores: remove the lowest-scored ranks until at least `units_to_free`
/// budget units are freed (or no rank is left).
inline RoundPlan plan_pruning(const std::vector<std::vector<double>>& scores, std::span<const ModuleCapacity> modules,
                              Index units_to_free) {
  detail::check_plan_inputs("rankwise::plan_pruning", scores, modules);
  if (units_to_free < 0)
    detail::fail("rankwise::plan_pruning", "units_to_free must be >= 0 (got ", units_to_free, ")");
  RoundPlan plan = detail::empty_plan(scores);
  Index freed = 0;
  for (const PrunedRank& r : detail::pruning_order(scores)) {
    if (freed >= units_to_free) break;
    detail::take(plan, r);
    freed += modules[static_cast<std::size_t>(r.module)].cost;
  }
  detail::sort_removals(plan);
  return plan;
}

/// One entry of the allocator's log: a round (or a prune-only step) and what it did.
struct AllocationEvent {
  long round = 0;  ///< 1-based count of attempts
  long step = 0;   ///< the optimizer step after which it ran
  Status status = Status::Ok;
  std::string message;  ///< why, when status is not Ok (nothing was changed then)
  double loss = std::numeric_limits<double>::quiet_NaN();  ///< CE(M) on the validation batch, if known
  Index target = 0;                ///< the budget this event enforced (prune-only: b(t))
  std::vector<PrunedRank> pruned;  ///< ranks removed, lowest score first
  std::vector<Index> added;        ///< ranks added per module
  std::vector<double> mean_scores; ///< per module, before the round
  std::vector<Index> ranks_after;  ///< per module
  Index used_after = 0;            ///< budget units held after the event
  /// Pruned ranks that had been added at the previous successful round (oscillation).
  Index pruned_recent = 0;
  /// Gain-over-cost: per module, the predicted gain of one more rank (nats; NaN when unknown).
  std::vector<double> predicted_gains;
  /// Gain-over-cost with trials over several validation batches: the standard error of each
  /// module's measured gain (NaN when unknown).
  std::vector<double> gain_errors;
  /// Wall time of the round's scoring (the estimator's evaluations), in seconds.
  double scoring_seconds = 0.0;
};

template <FloatScalar Scalar>
class RankAllocator {
 public:
  using Follower = std::function<void(const RankChange&)>;

  /// Borrows `estimator` (it must outlive the allocator) and the adapters behind `modules`; forks
  /// `rng` for the new ranks' initialisation.
  RankAllocator(std::vector<RankModule<Scalar>> modules, ImportanceEstimator<Scalar>& estimator,
                const RankAllocatorOptions& options, Random& rng)
      : m_modules(std::move(modules)), m_estimator(&estimator), m_options(options), m_rng(rng.fork()) {
    validate();
    for (const RankModule<Scalar>& m : m_modules) {
      m_initial_ranks.push_back(m.rank());
      m_births.emplace_back(static_cast<std::size_t>(m.rank()), 0L);
    }
    m_start = used();
    m_next_due = m_options.warmup_steps;
    m_message = "no round has run yet";
  }

  /// Every RankChange is passed to `follower` (after the estimator), e.g. to an optimizer's follow().
  void add_follower(Follower follower) {
    if (!follower) detail::fail("rankwise::RankAllocator", "add_follower: the follower must be set (got an empty function)");
    m_followers.push_back(std::move(follower));
  }
  /// The optimizer follows every rank change; it must outlive the allocator.
  template <typename O>
    requires Optimizer<O>
  void add_optimizer(O& optimizer) {
    add_follower([&optimizer](const RankChange& change) { optimizer.follow(change); });
  }

  /// The training-step hook: call it after every optimizer step, before zero_grad(). Feeds the
  /// estimator's observe() and runs a round when one is due. Returns Ok, or NonFinite when a due
  /// round was abandoned (nothing changed; it is retried recovery_steps later). Exceptions from the
  /// validation callable propagate as rankwise::Error, after the adapters were restored.
  Status step() {
    if (m_finished) detail::fail<StateError>(where, "step() after finish(): the run is over");
    ++m_step;
    m_acted = false;
    if (m_done) return Status::Ok;
    if (m_estimator->needs_observations()) m_estimator->observe(std::span<RankModule<Scalar>>(m_modules));
    if (m_options.policy == AllocationPolicy::PruneAndReallocate) {
      if (m_step < m_next_due) return Status::Ok;
      return attempt(budget(), /*reallocate=*/true);
    }
    if (m_options.policy == AllocationPolicy::GainOverCost) return gain_step();
    return prune_only_step();
  }

  /// Marks the end of training and returns status(): NotApplied (with message()) when no round ever
  /// ran, or when prune-only training ended above its budget.
  Status finish() {
    m_finished = true;
    if (m_options.policy == AllocationPolicy::PruneOnly && used() > budget()) {
      m_status = Status::NotApplied;
      std::ostringstream os;
      os << "prune-only allocation ended at step " << m_step << " above its budget (" << used() << " > " << budget()
         << " " << unit_name() << "); the target was due at step "
         << (m_options.total_steps - m_options.final_steps);
      m_message = os.str();
    } else if (m_rounds_done == 0) {
      m_status = Status::NotApplied;
      std::ostringstream os;
      os << "the allocator never acted: training ended at step " << m_step;
      if (m_options.policy != AllocationPolicy::PruneOnly)
        os << " but the first round was due at step " << std::max(1L, m_options.warmup_steps);
      if (m_attempts > 0) os << " (" << m_attempts << " attempt(s) failed: " << last_failure() << ")";
      os << "; the adapters kept their initial ranks";
      m_message = os.str();
    } else if (m_options.policy != AllocationPolicy::PruneOnly && m_rounds_done < m_options.rounds) {
      std::ostringstream os;
      os << "ran " << m_rounds_done << " of " << m_options.rounds << " rounds before training ended at step " << m_step;
      m_message = os.str();
    }
    return m_status;
  }

  /// NotApplied until the first round succeeded; NonFinite after an abandoned round; Ok otherwise.
  Status status() const { return m_status; }
  const std::string& message() const { return m_message; }
  /// True when the last step() call changed ranks.
  bool acted_at_last_step() const { return m_acted; }
  /// True when no further round will run.
  bool is_done() const { return m_done; }
  long steps() const { return m_step; }
  long rounds_done() const { return m_rounds_done; }
  /// The step at which the next prune-and-reallocate round is due.
  long next_round_step() const { return std::max(1L, m_next_due); }

  /// n_A as used: the option, or the number of module kinds.
  Index ranks_per_round() const { return m_ranks_per_round; }
  Index budget() const { return m_budget; }
  BudgetUnit budget_unit() const { return m_options.budget_unit; }
  /// Budget units the modules hold now.
  Index used() const {
    Index u = 0;
    for (const RankModule<Scalar>& m : m_modules) u += m.rank() * unit_cost(m);
    return u;
  }
  /// The most the modules can hold: sum of max_rank in budget units.
  Index capacity() const {
    Index c = 0;
    for (const RankModule<Scalar>& m : m_modules) c += m.max_rank() * unit_cost(m);
    return c;
  }
  Index total_ranks() const {
    Index r = 0;
    for (const RankModule<Scalar>& m : m_modules) r += m.rank();
    return r;
  }
  /// Trainable adapter parameters: sum of rank * (in + out).
  Index trainable_parameters() const {
    Index n = 0;
    for (const RankModule<Scalar>& m : m_modules) n += m.rank() * m.cost_per_rank();
    return n;
  }
  /// Prune-only: the budget b(t) after step t (prune-and-reallocate: the budget).
  Index budget_at(long t) const {
    if (m_options.policy != AllocationPolicy::PruneOnly) return m_budget;
    const long ti = m_options.warmup_steps, T = m_options.total_steps, tf = m_options.final_steps;
    if (t <= ti) return m_start;
    if (t >= T - tf) return m_budget;
    const double progress = double(t - ti) / double(T - ti - tf);
    const double f = (1.0 - progress) * (1.0 - progress) * (1.0 - progress);
    return m_budget + Index(std::floor(double(m_start - m_budget) * f));
  }

  std::vector<Index> ranks() const {
    std::vector<Index> r;
    for (const RankModule<Scalar>& m : m_modules) r.push_back(m.rank());
    return r;
  }
  const std::vector<Index>& initial_ranks() const { return m_initial_ranks; }
  /// module path -> rank, for export (PEFT's rank_pattern).
  std::map<std::string, Index> rank_pattern() const {
    std::map<std::string, Index> pattern;
    for (const RankModule<Scalar>& m : m_modules) pattern[m.path()] = m.rank();
    return pattern;
  }
  const std::vector<AllocationEvent>& events() const { return m_events; }

  /// Everything the allocator carries from one step to the next, for checkpoints (io/state.hpp):
  /// restore() into an allocator built over the same modules (at any ranks) resumes the schedule,
  /// the budget and the new ranks' random stream exactly where progress() left them.
  struct Progress {
    long step = 0, next_due = 0, rounds_done = 0, attempts = 0;
    bool done = false, acted = false, finished = false;
    Status status = Status::NotApplied;
    std::string message;
    Index budget = 0, start = 0, ranks_per_round = 0;
    std::vector<Index> initial_ranks;
    std::vector<AllocationEvent> events;
    Random::Snapshot rng;
    /// Per module, the step at which each current rank was added (0: from the start); empty = all 0.
    std::vector<std::vector<long>> births;
    long last_round_step = 0;
  };
  Progress progress() const {
    return {m_step,    m_next_due, m_rounds_done, m_attempts, m_done,          m_acted,         m_finished,
            m_status,  m_message,  m_budget,      m_start,    m_ranks_per_round, m_initial_ranks, m_events,
            m_rng.snapshot(), m_births, m_last_round_step};
  }
  void restore(Progress p) {
    if (p.initial_ranks.size() != m_modules.size())
      detail::fail(where, "restore: the saved progress covers ", p.initial_ranks.size(), " modules but the allocator has ",
                   m_modules.size());
    if (p.step < 0 || p.rounds_done < 0 || p.attempts < 0 || p.budget < 1 || p.start < 0 || p.ranks_per_round < 0)
      detail::fail(where, "restore: counts must be >= 0 and the budget >= 1 (got step ", p.step, ", budget ", p.budget, ")");
    m_step = p.step;
    m_next_due = p.next_due;
    m_rounds_done = p.rounds_done;
    m_attempts = p.attempts;
    m_done = p.done;
    m_acted = p.acted;
    m_finished = p.finished;
    m_status = p.status;
    m_message = std::move(p.message);
    m_budget = p.budget;
    m_start = p.start;
    m_ranks_per_round = p.ranks_per_round;
    m_initial_ranks = std::move(p.initial_ranks);
    m_events = std::move(p.events);
    m_rng.restore(p.rng);
    m_last_round_step = p.last_round_step;
    m_births.assign(m_modules.size(), {});
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      const std::size_t r = static_cast<std::size_t>(m_modules[m].rank());
      if (m < p.births.size() && p.births[m].size() == r)
        m_births[m] = p.births[m];
      else
        m_births[m].assign(r, 0L);
    }
    m_probe_phase = 0;  // a sketch in progress is not saved: the next round sketches afresh
    disarm_probes();
  }

  /// Per module, the step at which each current rank was added (0: present from the start).
  const std::vector<std::vector<long>>& rank_births() const { return m_births; }
  const std::vector<RankModule<Scalar>>& modules() const { return m_modules; }
  const RankAllocatorOptions& options() const { return m_options; }

  /// Ranks per module at the start, after each successful round (at most 10 columns), and now.
  std::string format_table() const {
    std::vector<const AllocationEvent*> shown;
    for (const AllocationEvent& e : m_events)
      if (e.status == Status::Ok) shown.push_back(&e);
    if (shown.size() > 10) shown.clear();
    int width = 12;
    for (const RankModule<Scalar>& m : m_modules) width = std::max(width, int(m.path().size()));
    std::ostringstream os;
    os << std::left << std::setw(width) << "module" << std::right << std::setw(7) << "start";
    for (const AllocationEvent* e : shown) os << std::setw(4) << 'r' << e->round;
    os << std::setw(6) << "now" << '\n';
    Index start_total = 0;
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      os << std::left << std::setw(width) << m_modules[m].path() << std::right << std::setw(7) << m_initial_ranks[m];
      for (const AllocationEvent* e : shown) os << std::setw(5) << e->ranks_after[m];
      os << std::setw(6) << m_modules[m].rank() << '\n';
      start_total += m_initial_ranks[m];
    }
    os << std::left << std::setw(width) << "total ranks" << std::right << std::setw(7) << start_total;
    for (const AllocationEvent* e : shown) {
      Index t = 0;
      for (Index r : e->ranks_after) t += r;
      os << std::setw(5) << t;
    }
    os << std::setw(6) << total_ranks() << '\n'
       << "parameters " << trainable_parameters() << ", budget " << m_budget << ' ' << unit_name() << '\n';
    return os.str();
  }

  /// One line per event: step, loss, what was pruned (with scores) and where ranks went.
  std::string format_events() const {
    std::ostringstream os;
    os.precision(4);
    for (const AllocationEvent& e : m_events) {
      os << "round " << e.round << " (step " << e.step << ")";
      if (e.status != Status::Ok) {
        os << ": " << to_string(e.status) << ": " << e.message << '\n';
        continue;
      }
      if (std::isfinite(e.loss)) os << " loss " << e.loss;
      os << ": pruned";
      if (e.pruned.empty()) os << " nothing";
      for (const PrunedRank& p : e.pruned)
      {
        os << ' ' << m_modules[static_cast<std::size_t>(p.module)].path() << '#' << p.rank << " (" << p.score;
        if (std::isfinite(p.error)) os << " +- " << p.error;
        os << ")";
      }
      os << "; added";
      bool any = false;
      for (std::size_t m = 0; m < e.added.size(); ++m)
        if (e.added[m] > 0) {
          os << ' ' << m_modules[m].path() << " +" << e.added[m];
          any = true;
        }
      if (!any) os << " nothing";
      os << '\n';
    }
    return os.str();
  }

 private:
  static constexpr const char* where = "rankwise::RankAllocator";

  Index unit_cost(const RankModule<Scalar>& m) const {
    return m_options.budget_unit == BudgetUnit::Parameters ? m.cost_per_rank() : Index(1);
  }
  const char* unit_name() const { return m_options.budget_unit == BudgetUnit::Parameters ? "parameters" : "ranks"; }

  std::string last_failure() const {
    for (auto it = m_events.rbegin(); it != m_events.rend(); ++it)
      if (it->status != Status::Ok) return it->message;
    return "an exception";
  }

  void validate() {
    const RankAllocatorOptions& o = m_options;
    if (m_modules.empty()) detail::fail(where, "needs at least one module (got none)");
    if (o.policy != AllocationPolicy::PruneAndReallocate && o.policy != AllocationPolicy::PruneOnly &&
        o.policy != AllocationPolicy::GainOverCost)
      detail::fail(where, "policy must be PruneAndReallocate, PruneOnly or GainOverCost (got enum value ",
                   static_cast<int>(o.policy), ")");
    if (o.budget_unit != BudgetUnit::Ranks && o.budget_unit != BudgetUnit::Parameters)
      detail::fail(where, "budget_unit must be Ranks or Parameters (got enum value ", static_cast<int>(o.budget_unit),
                   ")");
    std::set<std::string> paths;
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      if (!paths.insert(m_modules[m].path()).second)
        detail::fail(where, "module paths must be unique (got '", m_modules[m].path(), "' twice)");
      for (std::size_t k = 0; k < m; ++k)
        if (m_modules[m].same_adapter(m_modules[k]))
          detail::fail(where, "modules '", m_modules[k].path(), "' and '", m_modules[m].path(),
                       "' are the same adapter");
    }
    detail::check_scorable(where, std::span<RankModule<Scalar>>(m_modules));
    const Index held = used(), cap = capacity();
    m_budget = o.budget.value_or(held);
    if (m_budget < 1 || m_budget > cap)
      detail::fail(where, "budget must be in [1, capacity = ", cap, "] ", unit_name(), " (got ", m_budget,
                   o.budget ? ")" : ", what the modules hold)");
    if (o.warmup_steps < 0) detail::fail(where, "warmup_steps must be >= 0 (got ", o.warmup_steps, ")");
    if (o.total_steps < 0) detail::fail(where, "total_steps must be >= 0 (got ", o.total_steps, ")");
    if (o.policy == AllocationPolicy::GainOverCost) {
      if (held > m_budget)
        detail::fail(where, "the modules hold ", held, " ", unit_name(), ", above the budget of ", m_budget,
                     "; gain-over-cost starts at or below its budget (see uniform_ranks())");
      if (o.warmup_steps < 1) detail::fail(where, "warmup_steps (K1) must be >= 1 (got ", o.warmup_steps, ")");
      if (o.recovery_steps < 1) detail::fail(where, "recovery_steps (K2) must be >= 1 (got ", o.recovery_steps, ")");
      if (o.rounds < 1) detail::fail(where, "rounds must be >= 1 (got ", o.rounds, ")");
      if (!(o.gain_ratio > 0.0) || !std::isfinite(o.gain_ratio))
        detail::fail(where, "gain_ratio must be finite and > 0 (got ", o.gain_ratio, ")");
      if (o.min_rank_age < -1) detail::fail(where, "min_rank_age must be >= 0, or -1 for 2 * recovery_steps (got ",
                                            o.min_rank_age, ")");
      if (o.probe_rank < 1) detail::fail(where, "probe_rank must be >= 1 (got ", o.probe_rank, ")");
      if (o.probe_steps < 0) detail::fail(where, "probe_steps must be >= 0 (got ", o.probe_steps, ")");
      if (o.trial_steps < 0) detail::fail(where, "trial_steps must be >= 0 (got ", o.trial_steps, ")");
      if (o.gain_estimate != GainEstimate::Trial && o.gain_estimate != GainEstimate::Curvature)
        detail::fail(where, "gain_estimate must be Trial or Curvature (got enum value ",
                     static_cast<int>(o.gain_estimate), ")");
      if (o.max_moves_per_round < 0)
        detail::fail(where, "max_moves_per_round must be >= 0 (got ", o.max_moves_per_round, ")");
      for (const RankModule<Scalar>& m : m_modules)
        if (!m.supports_gradient_probe())
          detail::fail(where, "gain-over-cost needs adapters with a gradient probe (LoRA); '", m.path(),
                       "' has none");
      const long last = o.warmup_steps + (o.rounds - 1) * o.recovery_steps;
      if (o.total_steps > 0 && last > o.total_steps)
        detail::fail(where, "the schedule does not fit: round ", o.rounds, " is due at step ", last,
                     " but total_steps is ", o.total_steps, "; lower warmup_steps, recovery_steps or rounds");
    } else if (o.policy == AllocationPolicy::PruneAndReallocate) {
      if (held > m_budget)
        detail::fail(where, "the modules hold ", held, " ", unit_name(), ", above the budget of ", m_budget,
                     "; prune-and-reallocate starts at or below its budget (see uniform_ranks())");
      if (o.warmup_steps < 1)
        detail::fail(where, "warmup_steps (K1) must be >= 1 (got ", o.warmup_steps,
                     "); the paper trains one epoch first (paper_schedule())");
      if (o.recovery_steps < 1)
        detail::fail(where, "recovery_steps (K2) must be >= 1 (got ", o.recovery_steps,
                     "); the paper uses a quarter epoch");
      if (o.rounds < 1) detail::fail(where, "rounds (N_A) must be >= 1 (got ", o.rounds, ")");
      if (o.ranks_per_round < 0) detail::fail(where, "ranks_per_round (n_A) must be >= 0 (got ", o.ranks_per_round, ")");
      m_ranks_per_round = o.ranks_per_round;
      if (m_ranks_per_round == 0) {
        std::set<std::string> kinds;
        for (const RankModule<Scalar>& m : m_modules) kinds.insert(module_kind(m.path()));
        m_ranks_per_round = Index(kinds.size());
      }
      const Index active = total_ranks();
      if (m_ranks_per_round > active)
        detail::fail(where, "ranks_per_round (n_A) must be in [1, active ranks = ", active, "] (got ", m_ranks_per_round,
                     o.ranks_per_round == 0 ? ", the number of module kinds)" : ")");
      const long last = o.warmup_steps + (o.rounds - 1) * o.recovery_steps;
      if (o.total_steps > 0 && last > o.total_steps)
        detail::fail(where, "the schedule does not fit: round ", o.rounds, " is due at step ", last,
                     " but total_steps is ", o.total_steps, "; lower warmup_steps, recovery_steps or rounds");
    } else {
      if (!o.budget) detail::fail(where, "prune-only needs an explicit budget below what the modules hold (", held, ")");
      if (m_budget >= held)
        detail::fail(where, "prune-only must start above its budget: the modules hold ", held, " ", unit_name(),
                     " but the budget is ", m_budget);
      if (o.final_steps < 0) detail::fail(where, "final_steps must be >= 0 (got ", o.final_steps, ")");
      if (o.prune_interval < 1) detail::fail(where, "prune_interval must be >= 1 (got ", o.prune_interval, ")");
      if (o.total_steps <= o.warmup_steps + o.final_steps)
        detail::fail(where, "prune-only needs total_steps > warmup_steps + final_steps = ",
                     o.warmup_steps + o.final_steps, " (got ", o.total_steps, ")");
    }
  }

  Status prune_only_step() {
    const long ti = m_options.warmup_steps, T = m_options.total_steps, tf = m_options.final_steps;
    if (m_step <= ti) return Status::Ok;
    const bool final_phase = m_step >= T - tf;
    if (!final_phase && (m_step - ti) % m_options.prune_interval != 0) return Status::Ok;
    const Index target = budget_at(m_step);
    if (used() <= target) {
      if (final_phase) m_done = true;
      return Status::Ok;
    }
    const Status s = attempt(target, /*reallocate=*/false);
    if (s == Status::Ok && final_phase) m_done = true;
    return s;
  }

  // --- gain over cost ---------------------------------------------------------------------------
  long probe_window() const {
    return m_options.probe_steps > 0 ? m_options.probe_steps : std::max(1L, m_options.recovery_steps / 4);
  }
  long min_rank_age() const {
    return m_options.min_rank_age >= 0 ? m_options.min_rank_age : 2 * m_options.recovery_steps;
  }

  /// Orthonormal bases of the row space of A (in x r) and the column space of B (out x r), in double.
  std::pair<Matrix<double>, Matrix<double>> factor_bases(RankModule<Scalar>& m) {
    const std::vector<RankSlice<Scalar>> slices = m.rank_slices();
    Matrix<double> qa(m.in_features(), 0), qb(m.out_features(), 0);
    for (const RankSlice<Scalar>& sl : slices) {
      const Matrix<double> v = sl.parameter->value.template cast<double>();
      if (sl.axis == Axis::Rows && v.cols() == m.in_features()) qa = orthonormal_basis(v.transpose());
      if (sl.axis == Axis::Cols && v.rows() == m.out_features()) qb = orthonormal_basis(v);
    }
    return {qa, qb};
  }

  void disarm_probes() {
    for (RankModule<Scalar>& m : m_modules)
      if (m.supports_gradient_probe()) m.disarm_gradient_probe();
  }

  /// First pass: Omega random, off the row space of A; each module sums G Omega.
  void arm_first_pass() {
    m_probe_q.assign(m_modules.size(), Matrix<double>());
    for (RankModule<Scalar>& m : m_modules) {
      const Index k = std::min(m_options.probe_rank, std::min(m.in_features(), m.out_features()));
      Matrix<double> omega(m.in_features(), k);
      for (Index j = 0; j < k; ++j)
        for (Index i = 0; i < m.in_features(); ++i) omega(i, j) = m_rng.normal();
      project_off(omega, factor_bases(m).first);
      m.arm_gradient_probe(omega.template cast<Scalar>(), Matrix<Scalar>());
    }
  }

  /// Second pass: Q = the range of (I - P_B) G Omega; each module sums Q^T G.
  void arm_second_pass() {
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      RankModule<Scalar>& module = m_modules[m];
      Matrix<double> y = module.probe_right().template cast<double>();
      project_off(y, factor_bases(module).second);
      m_probe_q[m] = orthonormal_basis(y, 1e-6);
      module.arm_gradient_probe(Matrix<Scalar>(), m_probe_q[m].template cast<Scalar>());
    }
  }

  long trial_window() const {
    return m_options.trial_steps > 0 ? m_options.trial_steps : std::max(1L, m_options.recovery_steps / 2);
  }

  /// Trials: one sketch pass (Psi^T G, Psi off the columns of B), then one trial rank per module along
  /// the top right singular vector of the residual, trained for trial_window() steps, then the round.
  Status trial_step() {
    const long w = probe_window(), t = trial_window();
    if (m_probe_phase == 0) {
      if (m_step < m_next_due - w - t) return Status::Ok;
      for (RankModule<Scalar>& m : m_modules) {
        const Index k = std::min(m_options.probe_rank, std::min(m.in_features(), m.out_features()));
        Matrix<double> psi(m.out_features(), k);
        for (Index j = 0; j < k; ++j)
          for (Index i = 0; i < m.out_features(); ++i) psi(i, j) = m_rng.normal();
        project_off(psi, factor_bases(m).second);
        m.arm_gradient_probe(Matrix<Scalar>(), psi.template cast<Scalar>());
      }
      m_probe_phase = 1;
      m_probe_start = m_step;
      return Status::Ok;
    }
    if (m_probe_phase == 1) {
      if (m_step < m_probe_start + w) return Status::Ok;
      m_trial_spectra = residual_spectra();
      const std::vector<ResidualSpectrum>& spectra = m_trial_spectra;
      disarm_probes();
      m_trial.assign(m_modules.size(), 0);
      for (std::size_t m = 0; m < m_modules.size(); ++m) {
        RankModule<Scalar>& module = m_modules[m];
        if (module.rank() >= module.max_rank()) continue;
        if (m_options.warm_start && spectra[m].directions.cols() > 0 && !spectra[m].sigma.empty() &&
            spectra[m].sigma.front() > 0.0) {
          const Matrix<double> row = row_norm(module) * spectra[m].directions.leftCols(1).transpose();
          notify(module.add_ranks_with_rows(row.template cast<Scalar>()));
        } else {
          notify(module.add_ranks(1, m_rng));
        }
        m_births[m].push_back(m_step);
        m_trial[m] = 1;
      }
      m_probe_phase = 2;
      m_probe_start = m_step;
      return Status::Ok;
    }
    if (m_step < m_probe_start + t) return Status::Ok;
    m_probe_phase = 0;
    return trial_round();
  }

  /// Removes every trial rank (a failed round leaves the modules as they were before the trials).
  void drop_trials() {
    for (std::size_t m = 0; m < m_trial.size(); ++m)
      if (m_trial[m]) remove_from(m, {m_modules[m].rank() - 1});
    m_trial.assign(m_modules.size(), 0);
  }

  /// Starts a round's event and scores every rank. If the estimator throws, `undo` runs, the round is
  /// retried recovery_steps later and the exception propagates.
  ImportanceScores score_round(AllocationEvent& event, Index target, const std::function<void()>& undo = {}) {
    detail::check_scorable(where, std::span<RankModule<Scalar>>(m_modules));
    ++m_attempts;
    event.round = m_attempts;
    event.step = m_step;
    event.target = target;
    ImportanceScores scored;
    const auto started = std::chrono::steady_clock::now();
    try {
      scored = m_estimator->score(std::span<RankModule<Scalar>>(m_modules));
      event.scoring_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    } catch (...) {
      if (undo) undo();
      m_next_due = m_step + std::max(1L, m_options.recovery_steps);
      throw;
    }
    event.loss = scored.loss;
    return scored;
  }

  /// Gain over cost needs one finite drop cost per rank: throws StateError when the estimator gives
  /// none or the wrong number, returns the message of a non-finite one (empty when all are usable).
  std::string drop_cost_problem(const ImportanceScores& scored) const {
    if (scored.drop_costs.size() != m_modules.size())
      detail::fail<StateError>(where, "gain-over-cost needs drop costs (AblationImportance); the estimator '",
                               m_estimator->name(), "' gives none");
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      if (Index(scored.drop_costs[m].size()) != m_modules[m].rank())
        detail::fail<StateError>(where, "the estimator '", m_estimator->name(), "' returned ",
                                 scored.drop_costs[m].size(), " drop costs for '", m_modules[m].path(), "' of rank ",
                                 m_modules[m].rank());
      for (double c : scored.drop_costs[m])
        if (!std::isfinite(c))
          return std::string("[rankwise::RankAllocator] a drop cost of '") + m_modules[m].path() +
                 "' is not finite; nothing was changed";
    }
    return {};
  }

  /// What plan_moves() needs of module m's first `rank` ranks (a trial rank, if any, comes after them).
  GainCostModule plan_input(std::size_t m, Index rank, const std::vector<double>& drop_costs) const {
    GainCostModule g;
    g.rank = rank;
    g.max_rank = m_modules[m].max_rank();
    g.unit_cost = unit_cost(m_modules[m]);
    g.drop_costs.assign(drop_costs.begin(), drop_costs.begin() + rank);
    g.protected_rank.resize(static_cast<std::size_t>(rank));
    const long age = min_rank_age();
    for (std::size_t i = 0; i < static_cast<std::size_t>(rank); ++i)
      g.protected_rank[i] = m_births[m][i] > 0 && m_step - m_births[m][i] < age;
    return g;
  }

  /// The pruned ranks (lowest drop cost first), the oscillation count and the mean drop cost per module.
  void record_plan(AllocationEvent& event, const MovePlan& plan, const std::vector<GainCostModule>& plan_in,
                   const ImportanceScores& scored) const {
    event.pruned_recent = count_recent(plan.remove);
    for (std::size_t m = 0; m < m_modules.size(); ++m)
      for (Index i : plan.remove[m])
        event.pruned.push_back({Index(m), i, plan_in[m].drop_costs[static_cast<std::size_t>(i)],
                                error_of(scored.drop_cost_errors, m, i)});
    std::sort(event.pruned.begin(), event.pruned.end(),
              [](const PrunedRank& a, const PrunedRank& b) { return a.score < b.score; });
    event.added = plan.add;
    event.mean_scores.assign(m_modules.size(), -std::numeric_limits<double>::infinity());
    for (std::size_t m = 0; m < m_modules.size(); ++m)
      if (plan_in[m].rank > 0) {
        double sum = 0.0;
        for (double c : plan_in[m].drop_costs) sum += c;
        event.mean_scores[m] = sum / double(plan_in[m].rank);
      }
  }

  /// Appends k ranks to module m: along directions.col(first), col(first + 1), ... while there are
  /// any (with warm_start), then drawn like A's init; all born now.
  void add_warm(std::size_t m, Index k, const Matrix<double>& directions, Index first) {
    RankModule<Scalar>& module = m_modules[m];
    const Index warm = m_options.warm_start ? std::clamp<Index>(directions.cols() - first, 0, k) : 0;
    if (warm > 0) {
      const Matrix<double> rows = row_norm(module) * directions.middleCols(first, warm).transpose();
      notify(module.add_ranks_with_rows(rows.template cast<Scalar>()));
    }
    if (k > warm) notify(module.add_ranks(k - warm, m_rng));
    m_births[m].resize(m_births[m].size() + static_cast<std::size_t>(k), m_step);
  }

  Status trial_round() {
    AllocationEvent event;
    const ImportanceScores scored = score_round(event, m_budget, [this] { drop_trials(); });
    if (scored.status != Status::Ok) {
      drop_trials();
      return fail_round(std::move(event), scored.status, scored.message);
    }
    std::string problem;
    try {
      problem = drop_cost_problem(scored);
    } catch (...) {
      drop_trials();
      throw;
    }
    if (!problem.empty()) {
      drop_trials();
      return fail_round(std::move(event), Status::NonFinite, std::move(problem));
    }
    std::vector<GainCostModule> plan_in;
    event.predicted_gains.assign(m_modules.size(), std::numeric_limits<double>::quiet_NaN());
    event.gain_errors.assign(m_modules.size(), std::numeric_limits<double>::quiet_NaN());
    Index used_existing = 0;
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      const Index trial = m_trial[m] ? 1 : 0;
      plan_in.push_back(plan_input(m, m_modules[m].rank() - trial, scored.drop_costs[m]));
      GainCostModule& g = plan_in.back();
      used_existing += g.rank * g.unit_cost;
      if (trial) {
        // The trial measured what the top residual direction brings; the next directions are predicted
        // from it by the sketch's spectrum: gain_j = gain_1 (sigma_j / sigma_1)^2.
        const double gain = scored.drop_costs[m][static_cast<std::size_t>(g.rank)];
        event.predicted_gains[m] = gain;
        event.gain_errors[m] = error_of(scored.drop_cost_errors, m, g.rank);
        const std::vector<double>& sigma = m_trial_spectra[m].sigma;
        if (gain > 0.0) {
          g.gains.push_back(gain);
          if (m_options.warm_start)
            for (std::size_t j = 1; j < sigma.size() && sigma.front() > 0.0; ++j)
              g.gains.push_back(gain * (sigma[j] / sigma.front()) * (sigma[j] / sigma.front()));
        }
      }
    }
    const MovePlan plan = plan_moves(plan_in, std::max<Index>(0, m_budget - used_existing), m_options.gain_ratio,
                                     m_options.max_moves_per_round);
    record_plan(event, plan, plan_in, scored);
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      std::vector<Index> remove = plan.remove[m];
      if (m_trial[m] && plan.add[m] == 0) remove.push_back(m_modules[m].rank() - 1);  // the trial goes
      if (m_trial[m] && plan.add[m] > 0) m_births[m].back() = m_step;               // the trial stays
      if (!remove.empty()) remove_from(m, remove);
      // More than one rank: the trial, then the next residual directions (or A's init).
      const Index first = m_trial[m] ? 1 : 0;
      if (plan.add[m] > first) add_warm(m, plan.add[m] - first, m_trial_spectra[m].directions, first);
    }
    m_trial.assign(m_modules.size(), 0);
    return finish_gain_round(std::move(event), !plan.moves.empty());
  }

  Status finish_gain_round(AllocationEvent event, bool moved) {
    event.ranks_after = ranks();
    event.used_after = used();
    RANKWISE_ASSERT(event.used_after <= m_budget, "RankAllocator: a gain-over-cost round exceeded the budget");
    m_events.push_back(std::move(event));
    m_last_round_step = m_step;
    ++m_rounds_done;
    m_acted = moved;
    m_status = Status::Ok;
    std::ostringstream os;
    os << "ran " << m_rounds_done << " round(s), last at step " << m_step;
    m_message = os.str();
    m_next_due = m_step + m_options.recovery_steps;
    if (m_rounds_done >= m_options.rounds) m_done = true;
    return Status::Ok;
  }

  Status gain_step() {
    if (m_options.gain_estimate == GainEstimate::Trial) return trial_step();
    const long w = probe_window();
    if (m_probe_phase == 0) {
      if (m_step < m_next_due - 2 * w) return Status::Ok;
      arm_first_pass();
      m_probe_phase = 1;
      m_probe_start = m_step;
      return Status::Ok;
    }
    if (m_step < m_probe_start + w) return Status::Ok;
    if (m_probe_phase == 1) {
      arm_second_pass();
      m_probe_phase = 2;
      m_probe_start = m_step;
      return Status::Ok;
    }
    m_probe_phase = 0;
    return gain_round();
  }

  /// The residual spectrum of every module from the second pass (its sums averaged per batch).
  std::vector<ResidualSpectrum> residual_spectra() {
    std::vector<ResidualSpectrum> spectra(m_modules.size());
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      RankModule<Scalar>& module = m_modules[m];
      const long batches = module.probe_batches();
      Matrix<double> z = module.probe_left().template cast<double>();
      if (batches > 0) z /= double(batches);
      // rows of z live in the input space: take off what the current ranks of A already span.
      Matrix<double> zt = z.transpose();
      project_off(zt, factor_bases(module).first);
      spectra[m] = residual_spectrum(zt.transpose());
      if (batches == 0) spectra[m].sigma.assign(spectra[m].sigma.size(), 0.0);
    }
    return spectra;
  }

  /// ||Delta W_i||^2 of every rank: (s g_i ||B[:, i]|| ||A[i, :]||)^2.
  std::vector<double> delta_norms2(RankModule<Scalar>& m) {
    const Index r = m.rank();
    std::vector<double> d(static_cast<std::size_t>(r), 0.0);
    const Parameter<Scalar>* a = nullptr;
    const Parameter<Scalar>* b = nullptr;
    for (const RankSlice<Scalar>& sl : m.rank_slices()) (sl.axis == Axis::Rows ? a : b) = sl.parameter;
    if (!a || !b) return d;
    for (Index i = 0; i < r; ++i) {
      const double v = m.scale() * m.gate(i) * double(b->value.col(i).norm()) * double(a->value.row(i).norm());
      d[static_cast<std::size_t>(i)] = v * v;
    }
    return d;
  }

  /// The typical norm of a row of A in module m (new warm-started rows get it).
  double row_norm(RankModule<Scalar>& m) {
    for (const RankSlice<Scalar>& sl : m.rank_slices())
      if (sl.axis == Axis::Rows && sl.parameter->value.rows() > 0)
        return double(sl.parameter->value.rowwise().norm().mean());
    return 1.0 / std::sqrt(3.0);  // the norm of a row drawn U(+-1/sqrt(in)), LoRA's init
  }

  Status gain_round() {
    const std::vector<ResidualSpectrum> spectra = residual_spectra();
    disarm_probes();
    AllocationEvent event;
    const ImportanceScores scored = score_round(event, m_budget);
    if (scored.status != Status::Ok) return fail_round(std::move(event), scored.status, scored.message);
    if (std::string problem = drop_cost_problem(scored); !problem.empty())
      return fail_round(std::move(event), Status::NonFinite, std::move(problem));
    std::vector<std::vector<double>> norms;
    for (RankModule<Scalar>& m : m_modules) norms.push_back(delta_norms2(m));
    const std::vector<double> h = module_curvatures(scored.drop_costs, norms);
    std::vector<GainCostModule> plan_in;
    event.predicted_gains.assign(m_modules.size(), std::numeric_limits<double>::quiet_NaN());
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      plan_in.push_back(plan_input(m, m_modules[m].rank(), scored.drop_costs[m]));
      GainCostModule& g = plan_in.back();
      if (h[m] > 0.0)
        for (double sigma : spectra[m].sigma) g.gains.push_back(sigma * sigma / (2.0 * h[m]));
      if (!g.gains.empty()) event.predicted_gains[m] = g.gains.front();
    }
    const MovePlan plan = plan_moves(plan_in, std::max<Index>(0, m_budget - used()), m_options.gain_ratio,
                                     m_options.max_moves_per_round);
    record_plan(event, plan, plan_in, scored);
    for (std::size_t m = 0; m < m_modules.size(); ++m)
      if (!plan.remove[m].empty()) remove_from(m, plan.remove[m]);
    for (std::size_t m = 0; m < m_modules.size(); ++m)
      if (plan.add[m] > 0) add_warm(m, plan.add[m], spectra[m].directions, 0);
    return finish_gain_round(std::move(event), !plan.moves.empty());
  }

  std::vector<ModuleCapacity> capacities() const {
    std::vector<ModuleCapacity> caps;
    for (const RankModule<Scalar>& m : m_modules) caps.push_back({m.rank(), m.max_rank(), unit_cost(m)});
    return caps;
  }

  Status fail_round(AllocationEvent event, Status status, std::string message) {
    event.status = status;
    event.message = std::move(message);
    event.ranks_after = ranks();
    event.used_after = used();
    m_status = status;
    m_message = event.message;
    m_events.push_back(std::move(event));
    m_next_due = m_step + std::max(1L, m_options.recovery_steps);
    return status;
  }

  /// Scores, plans and acts. Nothing changes unless the scores are usable.
  Status attempt(Index target, bool reallocate) {
    AllocationEvent event;
    const ImportanceScores scored = score_round(event, target);
    if (scored.status != Status::Ok) return fail_round(std::move(event), scored.status, scored.message);
    if (scored.scores.size() != m_modules.size())
      detail::fail<StateError>(where, "the estimator '", m_estimator->name(), "' returned scores for ",
                               scored.scores.size(), " modules, expected ", m_modules.size());
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      if (Index(scored.scores[m].size()) != m_modules[m].rank())
        detail::fail<StateError>(where, "the estimator '", m_estimator->name(), "' returned ", scored.scores[m].size(),
                                 " scores for '", m_modules[m].path(), "' of rank ", m_modules[m].rank());
      for (double s : scored.scores[m])
        if (!std::isfinite(s))
          return fail_round(std::move(event), Status::NonFinite,
                            std::string("[rankwise::RankAllocator] a score of '") + m_modules[m].path() +
                                "' is not finite; nothing was changed");
    }
    const std::vector<ModuleCapacity> caps = capacities();
    RoundPlan plan = reallocate ? plan_reallocation(scored.scores, caps, std::min(m_ranks_per_round, total_ranks()))
                                : plan_pruning(scored.scores, caps, used() - target);
    event.pruned_recent = count_recent(plan.remove);
    apply(plan);
    m_last_round_step = m_step;
    event.pruned = std::move(plan.pruned);
    for (PrunedRank& r : event.pruned) r.error = error_of(scored.score_errors, static_cast<std::size_t>(r.module), r.rank);
    event.added = std::move(plan.add);
    event.mean_scores = std::move(plan.mean_scores);
    event.ranks_after = ranks();
    event.used_after = used();
    RANKWISE_ASSERT(event.used_after <= std::max(m_budget, m_start), "RankAllocator: a round exceeded the budget");
    m_events.push_back(std::move(event));
    ++m_rounds_done;
    m_acted = true;
    m_status = Status::Ok;
    std::ostringstream os;
    os << "ran " << m_rounds_done << (reallocate ? " round(s)" : " pruning step(s)") << ", last at step " << m_step;
    m_message = os.str();
    if (reallocate) {
      m_next_due = m_step + m_options.recovery_steps;
      if (m_rounds_done >= m_options.rounds) m_done = true;
    }
    return Status::Ok;
  }

  /// The adapters act, the estimator and the followers follow: removals first, then additions.
  void apply(const RoundPlan& plan) {
    for (std::size_t m = 0; m < m_modules.size(); ++m)
      if (!plan.remove[m].empty()) remove_from(m, plan.remove[m]);
    for (std::size_t m = 0; m < m_modules.size(); ++m)
      if (plan.add[m] > 0) {
        notify(m_modules[m].add_ranks(plan.add[m], m_rng));
        m_births[m].resize(m_births[m].size() + static_cast<std::size_t>(plan.add[m]), m_step);
      }
  }

  void remove_from(std::size_t m, const std::vector<Index>& indices) {
    notify(m_modules[m].remove_ranks(indices));
    std::vector<long> kept;
    for (std::size_t i = 0; i < m_births[m].size(); ++i)
      if (!std::binary_search(indices.begin(), indices.end(), Index(i))) kept.push_back(m_births[m][i]);
    m_births[m] = std::move(kept);
  }

  /// errors[m][i], or NaN when the estimator gave no standard errors.
  static double error_of(const std::vector<std::vector<double>>& errors, std::size_t m, Index i) {
    if (m >= errors.size() || i < 0 || static_cast<std::size_t>(i) >= errors[m].size())
      return std::numeric_limits<double>::quiet_NaN();
    return errors[m][static_cast<std::size_t>(i)];
  }

  /// How many of the ranks to remove were added at the previous successful round.
  Index count_recent(const std::vector<std::vector<Index>>& remove) const {
    if (m_last_round_step <= 0) return 0;
    Index n = 0;
    for (std::size_t m = 0; m < remove.size(); ++m)
      for (Index i : remove[m])
        if (m_births[m][static_cast<std::size_t>(i)] == m_last_round_step) ++n;
    return n;
  }

  void notify(const RankChange& change) {
    m_estimator->follow(change);
    for (const Follower& f : m_followers) f(change);
  }

  std::vector<RankModule<Scalar>> m_modules;
  ImportanceEstimator<Scalar>* m_estimator;
  RankAllocatorOptions m_options;
  Random m_rng;
  std::vector<Follower> m_followers;
  std::vector<Index> m_initial_ranks;
  std::vector<std::vector<long>> m_births;
  long m_last_round_step = 0;
  // Gain-over-cost: 0 idle, 1 first sketch pass (G Omega), 2 second pass (Q^T G) running since m_probe_start.
  int m_probe_phase = 0;
  std::vector<char> m_trial;  // per module: holds a trial rank (its last) until the round
  std::vector<ResidualSpectrum> m_trial_spectra;  // per module: the sketch the trial came from
  long m_probe_start = 0;
  std::vector<Matrix<double>> m_probe_q;  // per module: the orthonormal range of the first pass
  std::vector<AllocationEvent> m_events;
  Index m_budget = 0;
  Index m_start = 0;  // budget units held at construction (prune-only: b(0))
  Index m_ranks_per_round = 0;
  long m_step = 0;
  long m_next_due = 0;
  long m_rounds_done = 0;
  long m_attempts = 0;
  bool m_done = false;
  bool m_acted = false;
  bool m_finished = false;
  Status m_status = Status::NotApplied;
  std::string m_message;
};

}  // namespace rankwise
