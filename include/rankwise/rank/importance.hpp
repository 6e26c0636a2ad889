#pragma once
/// \file rankwise/rank/importance.hpp
/// Importance estimators: one score per active rank of every module, higher = more important.
/// They share one interface (ImportanceEstimator) so the RankAllocator can use any of them.
///
///   AblationImportance     AB-LoRA (Liu et al., 2024, arXiv:2403.16187, Eq. 6), on fixed validation
///                          batches: IS'(r) = CE(M without r) - CE(M with only r), by toggling rank
///                          gates (no shape change); (2 R + 1) B evaluations per scoring round, R =
///                          active ranks, B = validation batches (scores: means over the batches, with
///                          their standard errors from the batch-to-batch spread of the differences)
///   FisherImportance       drop costs predicted from the training gradients: EMA(d_i^2) / 2 with
///                          d_i = sum_j A_ij dL/dA_ij = g_i dL/dg_i (Optimal Brain Damage on the rank's
///                          gate, empirical Fisher curvature); needs observe() after every backward
///   SensitivityImportance  AdaLoRA's (Zhang et al., 2023, arXiv:2303.10512) per-weight
///                          s = EMA(|w g|) * EMA(|I - EMA(I)|), averaged over each rank's row of A
///                          and column of B and summed; needs observe() after every backward
///   MagnitudeImportance    |s g_i| ||B[:, i]|| ||A[i, :]||: the norm of the rank's term of delta W
/// score() leaves gates, training modes and shapes exactly as it found them, also when it fails.
/// Docs: docs/rank/estimators.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/optim/optimizer.hpp>
#include <rankwise/rank/module.hpp>

#include <cmath>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace rankwise {

/// What one scoring round produced.
struct ImportanceScores {
  Status status = Status::Ok;
  std::string message;                      ///< why, when status is not Ok
  std::vector<std::vector<double>> scores;  ///< scores[m][i]: rank i of module m (empty when not Ok)
  /// Ablation only: drop_costs[m][i] = CE(M without rank i of module m) - CE(M), the loss the model
  /// loses when that one rank goes (the gain-over-cost allocator compares it with predicted gains).
  std::vector<std::vector<double>> drop_costs;
  /// Ablation over B >= 2 validation batches: the standard errors of scores and drop costs, sd / sqrt(B)
  /// of their per-batch values (paired: every configuration sees the same batches). Empty for one batch.
  std::vector<std::vector<double>> score_errors;
  std::vector<std::vector<double>> drop_cost_errors;
  double loss = std::numeric_limits<double>::quiet_NaN();  ///< CE(M), mean over the batches (ablation only)
  Index batches = 0;             ///< validation batches each configuration was evaluated on (ablation only)
  long full_evaluations = 0;     ///< calls of the whole validation evaluation
  long partial_evaluations = 0;  ///< evaluations that started at a module's stage (upstream cache)
};

/// The estimator interface. Lifetime: the caller owns an estimator; a RankAllocator borrows it.
template <FloatScalar Scalar>
class ImportanceEstimator {
 public:
  virtual ~ImportanceEstimator() = default;
  /// Short name for reports: "ablation", "sensitivity", "magnitude".
  virtual const char* name() const = 0;
  /// Scores every active rank. Requires unmerged adapters. Ensures: gates, training modes and shapes
  /// exactly as on entry (also when it throws or reports Status::NonFinite).
  virtual ImportanceScores score(std::span<RankModule<Scalar>> modules) = 0;
  /// Called after every optimizer step while gradients are present (before zero_grad()).
  virtual void observe(std::span<RankModule<Scalar>> modules) { static_cast<void>(modules); }
  /// Follows rank surgery, like an optimizer (estimators with per-rank state slice it).
  virtual void follow(const RankChange& change) { static_cast<void>(change); }
  /// True when score() relies on observe() having been called.
  virtual bool needs_observations() const { return false; }
};

namespace detail {

template <FloatScalar Scalar>
void check_scorable(const char* where, std::span<RankModule<Scalar>> modules) {
  for (const RankModule<Scalar>& m : modules)
    if (m.is_merged())
      fail<StateError>(where, "module '", m.path(),
                       "' is merged into its base: gates and rank surgery need an unmerged adapter; unmerge() first");
}

/// Saves every gate and training flag; restore() puts them back bit for bit (also from the destructor).
template <FloatScalar Scalar>
class GateGuard {
 public:
  explicit GateGuard(std::span<RankModule<Scalar>> modules) : m_modules(modules) {
    m_gates.resize(modules.size());
    m_training.resize(modules.size());
    for (std::size_t m = 0; m < modules.size(); ++m) {
      const Index r = modules[m].rank();
      m_gates[m].resize(static_cast<std::size_t>(r));
      for (Index i = 0; i < r; ++i) m_gates[m][static_cast<std::size_t>(i)] = modules[m].gate(i);
      m_training[m] = modules[m].is_training() ? 1 : 0;
    }
  }
  GateGuard(const GateGuard&) = delete;
  GateGuard& operator=(const GateGuard&) = delete;
  ~GateGuard() {
    try {
      restore();
    } catch (...) {  // a destructor must not throw; restore() only fails if a rank changed under us
    }
  }

  double saved(std::size_t m, Index i) const { return m_gates[m][static_cast<std::size_t>(i)]; }

  void restore() {
    for (std::size_t m = 0; m < m_modules.size(); ++m) {
      restore_module(m);
      m_modules[m].set_training(m_training[m] != 0);
    }
  }

  void restore_module(std::size_t m) {
    RankModule<Scalar>& module = m_modules[m];
    const Index r = Index(m_gates[m].size());
    if (module.rank() != r)
      fail<StateError>("rankwise::AblationImportance", "the rank of '", module.path(), "' changed from ", r, " to ",
                       module.rank(), " while scoring; the validation callable must not change the adapters");
    for (Index i = 0; i < r; ++i) module.set_gate(i, m_gates[m][static_cast<std::size_t>(i)]);
  }

  void zero_module(std::size_t m) {
    for (Index i = 0; i < m_modules[m].rank(); ++i) m_modules[m].set_gate(i, 0.0);
  }

 private:
  std::span<RankModule<Scalar>> m_modules;
  std::vector<std::vector<double>> m_gates;
  std::vector<char> m_training;
};

}  // namespace detail

/// Which ranks stay on in AB-LoRA's "M with only r".
enum class AblationScope {
  Network,  ///< every other rank of every module is zeroed (the paper's plain reading; default)
  Module,   ///< only the other ranks of r's own module are zeroed
};

struct AblationImportanceOptions {
  AblationScope scope = AblationScope::Network;
  /// Only the leave-one-out half: score = drop cost = CE(M without r) - CE(M), R + 1 evaluations
  /// instead of 2 R + 1 (what the gain-over-cost allocator needs; not the paper's score).
  bool leave_one_out = false;
  /// Called after every evaluation with (evaluations done, evaluations in this round).
  std::function<void(long done, long total)> progress = {};
};

/// The upstream-activation cache of a model that can be evaluated from a given stage onward.
/// Zeroing a rank of a module at stage l leaves everything upstream of stage l unchanged, so the
/// inputs of every stage are computed once per round and each ablated evaluation starts at l.
struct StagedEvaluation {
  /// module_stage[m]: the stage module m sits in (0 = the first); nothing upstream of that stage
  /// may depend on module m.
  std::vector<Index> module_stage;
  /// Runs the whole evaluation on the validation batch with the current gates, keeps the input of
  /// every stage in cache `slot` (0 or 1), and returns the loss.
  std::function<double(int slot)> capture;
  /// Returns the loss computed from the input of `stage` kept in `slot`, with the current gates.
  std::function<double(Index stage, int slot)> evaluate_from;
};

/// AB-LoRA scores from a user-supplied validation loss. The callable evaluates the model on one fixed,
/// seeded validation batch in eval mode (accumulating the loss in double) and returns it; the
/// estimator switches the adapters to eval mode and toggles their gates around it. With several
/// batches (the second constructor) every configuration is evaluated on each of them; scores and drop
/// costs are the means of the per-batch differences, and their standard errors are reported, so that a
/// caller can tell a real difference between two ranks from the noise of the validation data.
/// Errors: a non-finite loss stops the round with Status::NonFinite; an exception thrown by the
/// callable is rethrown as rankwise::Error (the original nested, std::rethrow_if_nested). In both
/// cases gates, training modes and shapes are restored first.
template <FloatScalar Scalar>
class AblationImportance final : public ImportanceEstimator<Scalar> {
 public:
  explicit AblationImportance(std::function<double()> evaluate, AblationImportanceOptions options = {})
      : m_options(std::move(options)) {
    if (!evaluate)
      detail::fail("rankwise::AblationImportance", "the validation callable must be set (got an empty function)");
    m_evaluate = [f = std::move(evaluate)](Index) { return f(); };
    check_scope();
  }

  /// Scores averaged over `batches` fixed validation batches: evaluate(b) returns the loss on batch b,
  /// 0 <= b < batches (equal-sized batches, so that the mean over them is the loss of their union).
  AblationImportance(std::function<double(Index)> evaluate, Index batches, AblationImportanceOptions options = {})
      : m_evaluate(std::move(evaluate)), m_options(std::move(options)), m_batches(batches) {
    if (!m_evaluate)
      detail::fail("rankwise::AblationImportance", "the validation callable must be set (got an empty function)");
    if (batches < 1) detail::fail("rankwise::AblationImportance", "batches must be >= 1 (got ", batches, ")");
    check_scope();
  }

  /// Scores through the upstream-activation cache (same scores, about half the work).
  explicit AblationImportance(StagedEvaluation staged, AblationImportanceOptions options = {})
      : m_staged(std::move(staged)), m_options(std::move(options)) {
    if (!m_staged.capture || !m_staged.evaluate_from)
      detail::fail("rankwise::AblationImportance",
                   "a staged evaluation needs both capture and evaluate_from (got an empty function)");
    for (Index s : m_staged.module_stage)
      if (s < 0) detail::fail("rankwise::AblationImportance", "module_stage entries must be >= 0 (got ", s, ")");
    m_use_stages = true;
    check_scope();
  }

  const char* name() const override { return "ablation"; }
  const AblationImportanceOptions& options() const { return m_options; }
  bool uses_stages() const { return m_use_stages; }
  /// Validation batches every configuration is evaluated on (1 with the upstream-activation cache).
  Index batches() const { return m_batches; }

  ImportanceScores score(std::span<RankModule<Scalar>> modules) override {
    detail::check_scorable("rankwise::AblationImportance", modules);
    if (m_use_stages && m_staged.module_stage.size() != modules.size())
      detail::fail("rankwise::AblationImportance", "module_stage must have one entry per module = ", modules.size(),
                   " (got ", m_staged.module_stage.size(), ")");
    ImportanceScores result;
    result.batches = m_batches;
    Index ranks = 0;
    for (const RankModule<Scalar>& m : modules) ranks += m.rank();
    m_total = ((m_options.leave_one_out ? 1 : 2) * long(ranks) + 1) * long(m_batches);
    if (m_use_stages && m_options.scope == AblationScope::Network && !m_options.leave_one_out) m_total += 1;
    m_done = 0;
    // Per-batch losses: of M, and of every rank's two ablations.
    std::vector<double> full;
    std::vector<std::vector<std::vector<double>>> without(modules.size()), only(modules.size());
    for (std::size_t m = 0; m < modules.size(); ++m) {
      without[m].resize(static_cast<std::size_t>(modules[m].rank()));
      only[m].resize(static_cast<std::size_t>(modules[m].rank()));
    }

    detail::GateGuard<Scalar> guard(modules);
    std::string label = "the network M";  // names the running evaluation in error messages
    try {
      for (RankModule<Scalar>& m : modules) m.set_training(false);
      if (m_use_stages) {
        full.assign(1, run(result, [&] { return m_staged.capture(0); }, true));
        if (!finite_or_report(full, label, result)) return result;
      } else if (!evaluate_batches(result, label, full)) {
        return result;
      }
      if (m_use_stages && m_options.scope == AblationScope::Network && !m_options.leave_one_out) {
        for (std::size_t m = 0; m < modules.size(); ++m) guard.zero_module(m);
        label = "the base model (every rank zeroed)";
        const std::vector<double> base{run(result, [&] { return m_staged.capture(1); }, true)};
        if (!finite_or_report(base, label, result)) return result;
        for (std::size_t m = 0; m < modules.size(); ++m) guard.restore_module(m);
      }
      // M without r: one gate off, everything else as it was.
      for (std::size_t m = 0; m < modules.size(); ++m) {
        for (Index i = 0; i < modules[m].rank(); ++i) {
          label = describe("M without rank", i, modules[m]);
          modules[m].set_gate(i, 0.0);
          std::vector<double>& losses = without[m][static_cast<std::size_t>(i)];
          const bool ok = evaluate(result, m, 0, label, losses);
          modules[m].set_gate(i, guard.saved(m, i));
          if (!ok) return result;
        }
      }
      // M with only r: r's gate on, the others off (network-wide or within r's module).
      const bool network = m_options.scope == AblationScope::Network;
      if (network && !m_options.leave_one_out)
        for (std::size_t m = 0; m < modules.size(); ++m) guard.zero_module(m);
      for (std::size_t m = 0; m < modules.size() && !m_options.leave_one_out; ++m) {
        if (!network) guard.zero_module(m);
        for (Index i = 0; i < modules[m].rank(); ++i) {
          label = describe("M with only rank", i, modules[m]);
          modules[m].set_gate(i, guard.saved(m, i));
          std::vector<double>& losses = only[m][static_cast<std::size_t>(i)];
          const bool ok = evaluate(result, m, network ? 1 : 0, label, losses);
          modules[m].set_gate(i, 0.0);
          if (!ok) return result;
        }
        if (!network) guard.restore_module(m);
      }
      guard.restore();
    } catch (...) {
      guard.restore();
      std::ostringstream os;
      os << "[rankwise::AblationImportance] the validation callable threw while evaluating " << label
         << "; gates and shapes are restored";
      std::throw_with_nested(Error(os.str()));
    }
    result.loss = mean_of(full);
    const bool errors = full.size() > 1;
    result.scores.resize(modules.size());
    result.drop_costs.resize(modules.size());
    if (errors) {
      result.score_errors.resize(modules.size());
      result.drop_cost_errors.resize(modules.size());
    }
    std::vector<double> cost(full.size()), score(full.size());
    for (std::size_t m = 0; m < modules.size(); ++m) {
      for (std::size_t i = 0; i < without[m].size(); ++i) {
        for (std::size_t b = 0; b < full.size(); ++b) {
          cost[b] = without[m][i][b] - full[b];
          score[b] = m_options.leave_one_out ? cost[b] : without[m][i][b] - only[m][i][b];
        }
        result.drop_costs[m].push_back(mean_of(cost));
        result.scores[m].push_back(mean_of(score));
        if (errors) {
          result.drop_cost_errors[m].push_back(standard_error(cost));
          result.score_errors[m].push_back(standard_error(score));
        }
      }
    }
    return result;
  }

 private:
  void check_scope() const {
    if (m_options.scope != AblationScope::Network && m_options.scope != AblationScope::Module)
      detail::fail("rankwise::AblationImportance", "scope must be Network or Module (got enum value ",
                   static_cast<int>(m_options.scope), ")");
  }

  static std::string describe(const char* what, Index i, const RankModule<Scalar>& m) {
    std::ostringstream os;
    os << what << ' ' << i << " of '" << m.path() << "'";
    return os.str();
  }

  template <typename F>
  double run(ImportanceScores& result, F&& f, bool full) {
    const double loss = f();
    if (full)
      ++result.full_evaluations;
    else
      ++result.partial_evaluations;
    ++m_done;
    if (m_options.progress) m_options.progress(m_done, m_total);
    return loss;
  }

  /// The current configuration on every validation batch, into `losses`; false (and the result
  /// reported) when a loss is not finite.
  bool evaluate_batches(ImportanceScores& result, const std::string& label, std::vector<double>& losses) {
    losses.resize(static_cast<std::size_t>(m_batches));
    for (Index b = 0; b < m_batches; ++b)
      losses[static_cast<std::size_t>(b)] = run(result, [&] { return m_evaluate(b); }, true);
    return finite_or_report(losses, label, result);
  }

  bool evaluate(ImportanceScores& result, std::size_t module, int slot, const std::string& label,
                std::vector<double>& losses) {
    if (!m_use_stages) return evaluate_batches(result, label, losses);
    losses.assign(1, run(result, [&] { return m_staged.evaluate_from(m_staged.module_stage[module], slot); }, false));
    return finite_or_report(losses, label, result);
  }

  bool finite_or_report(const std::vector<double>& losses, const std::string& label, ImportanceScores& result) const {
    for (std::size_t b = 0; b < losses.size(); ++b) {
      if (std::isfinite(losses[b])) continue;
      std::ostringstream os;
      os << "[rankwise::AblationImportance] the validation loss of " << label;
      if (m_batches > 1) os << " on validation batch " << b;
      os << " is " << losses[b] << "; the round is abandoned and gates and shapes are restored";
      result.status = Status::NonFinite;
      result.message = os.str();
      result.scores.clear();
      return false;
    }
    return true;
  }

  static double mean_of(const std::vector<double>& v) {
    double sum = 0.0;
    for (double x : v) sum += x;
    return v.empty() ? 0.0 : sum / double(v.size());
  }

  /// sd / sqrt(n) of n >= 2 values (sample standard deviation).
  static double standard_error(const std::vector<double>& v) {
    const double mean = mean_of(v);
    double ss = 0.0;
    for (double x : v) ss += (x - mean) * (x - mean);
    const double n = double(v.size());
    return std::sqrt(ss / (n - 1.0) / n);
  }

  std::function<double(Index)> m_evaluate;
  StagedEvaluation m_staged;
  AblationImportanceOptions m_options;
  Index m_batches = 1;
  bool m_use_stages = false;
  long m_done = 0;
  long m_total = 0;
};

/// How a rank's slice (its row of A, its column of B) turns per-weight scores into one number.
enum class SliceReduction {
  Mean,  ///< the mean over the slice's weights (AdaLoRA's)
  Sum,   ///< the sum: a slice of 128 weights counts as much as 128 weights, whatever the module's width
};

struct SensitivityImportanceOptions {
  double beta1 = 0.85;  ///< EMA factor of the sensitivity |w g| (AdaLoRA's default)
  double beta2 = 0.85;  ///< EMA factor of its uncertainty |I - EMA(I)|
  SliceReduction reduction = SliceReduction::Mean;
};

/// AdaLoRA-style sensitivity: observe() after every optimizer step updates, for every weight of every
/// rank-sliced parameter, I = |w g|, Ibar = b1 Ibar + (1 - b1) I, U = b2 U + (1 - b2) |I - Ibar|;
/// the score of rank i is the sum over its trainable slices (row of A, column of B) of mean(Ibar U).
/// State is keyed by parameter name and follows surgery like an optimizer's (fresh slices start at 0).
template <FloatScalar Scalar>
class SensitivityImportance final : public ImportanceEstimator<Scalar> {
 public:
  explicit SensitivityImportance(const SensitivityImportanceOptions& options = {}) : m_options(options) {
    if (!(options.beta1 >= 0.0 && options.beta1 < 1.0))
      detail::fail("rankwise::SensitivityImportance", "beta1 must be in [0, 1) (got ", options.beta1, ")");
    if (!(options.beta2 >= 0.0 && options.beta2 < 1.0))
      detail::fail("rankwise::SensitivityImportance", "beta2 must be in [0, 1) (got ", options.beta2, ")");
  }

  const char* name() const override { return "sensitivity"; }
  bool needs_observations() const override { return true; }
  const SensitivityImportanceOptions& options() const { return m_options; }

  void observe(std::span<RankModule<Scalar>> modules) override {
    const Scalar b1 = Scalar(m_options.beta1), b2 = Scalar(m_options.beta2);
    for (RankModule<Scalar>& module : modules) {
      for (const RankSlice<Scalar>& slice : slices_of(module)) {
        const Parameter<Scalar>& p = *slice.parameter;
        if (!p.trainable) continue;  // a frozen factor has no gradient and adds nothing to the score
        auto [it, inserted] = m_state.try_emplace(p.name);
        State& s = it->second;
        if (inserted) {
          s.sensitivity.setZero(p.value.rows(), p.value.cols());
          s.uncertainty.setZero(p.value.rows(), p.value.cols());
        }
        if (s.sensitivity.rows() != p.value.rows() || s.sensitivity.cols() != p.value.cols())
          detail::fail<StateError>("rankwise::SensitivityImportance", "the state of '", p.name, "' is ",
                                   s.sensitivity.rows(), " x ", s.sensitivity.cols(), " but the parameter is ",
                                   p.value.rows(), " x ", p.value.cols(),
                                   "; call follow() with the RankChange of the surgery");
        if (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols())
          detail::fail<StateError>("rankwise::SensitivityImportance", "the gradient of '", p.name,
                                   "' does not match its value; observe() needs the gradients of the last backward");
        s.current = (p.value.array() * p.grad.array()).abs().matrix();
        s.sensitivity = b1 * s.sensitivity + (Scalar(1) - b1) * s.current;
        s.uncertainty.array() =
            b2 * s.uncertainty.array() + (Scalar(1) - b2) * (s.current - s.sensitivity).array().abs();
      }
    }
    m_observations += 1;
  }

  void follow(const RankChange& change) override {
    for (const SliceChange& c : change.changes) {
      auto it = m_state.find(c.parameter);
      if (it == m_state.end()) continue;
      State next;
      next.sensitivity = it->second.sensitivity;
      next.uncertainty = it->second.uncertainty;
      detail::slice_state(next.sensitivity, c, "rankwise::SensitivityImportance");
      detail::slice_state(next.uncertainty, c, "rankwise::SensitivityImportance");
      it->second = std::move(next);
    }
  }

  ImportanceScores score(std::span<RankModule<Scalar>> modules) override {
    detail::check_scorable("rankwise::SensitivityImportance", modules);
    ImportanceScores result;
    result.scores.resize(modules.size());
    for (std::size_t m = 0; m < modules.size(); ++m) {
      const Index r = modules[m].rank();
      std::vector<double>& out = result.scores[m];
      out.assign(static_cast<std::size_t>(r), 0.0);
      for (const RankSlice<Scalar>& slice : slices_of(modules[m])) {
        const Parameter<Scalar>& p = *slice.parameter;
        if (!p.trainable) continue;
        const auto it = m_state.find(p.name);
        if (it == m_state.end()) {
          if (r == 0) continue;
          detail::fail<StateError>("rankwise::SensitivityImportance", "no gradient of '", p.name,
                                   "' was observed yet; call observe() after every backward (RankAllocator::step() "
                                   "does)");
        }
        const State& s = it->second;
        const Index extent = slice.axis == Axis::Rows ? s.sensitivity.rows() : s.sensitivity.cols();
        if (extent != r || s.sensitivity.rows() != p.value.rows() || s.sensitivity.cols() != p.value.cols())
          detail::fail<StateError>("rankwise::SensitivityImportance", "the state of '", p.name,
                                   "' does not match its shape; call follow() with the RankChange of the surgery");
        const bool sum = m_options.reduction == SliceReduction::Sum;
        for (Index i = 0; i < r; ++i) {
          double v = 0.0;
          if (slice.axis == Axis::Rows) {
            const auto w = (s.sensitivity.row(i).array() * s.uncertainty.row(i).array()).template cast<double>();
            v = sum ? w.sum() : w.mean();
          } else {
            const auto w = (s.sensitivity.col(i).array() * s.uncertainty.col(i).array()).template cast<double>();
            v = sum ? w.sum() : w.mean();
          }
          out[static_cast<std::size_t>(i)] += v;
        }
      }
      for (double v : out)
        if (!std::isfinite(v)) {
          result.status = Status::NonFinite;
          result.message = "[rankwise::SensitivityImportance] a score of '" + modules[m].path() +
                           "' is not finite (non-finite gradients were observed)";
          result.scores.clear();
          return result;
        }
    }
    return result;
  }

  long observations() const { return m_observations; }

  /// The smoothed sensitivity and uncertainty of every observed parameter, by name (for checkpoints).
  struct Moments {
    Matrix<Scalar> sensitivity;
    Matrix<Scalar> uncertainty;
  };
  std::map<std::string, Moments> moments() const {
    std::map<std::string, Moments> out;
    for (const auto& [name, s] : m_state) out.emplace(name, Moments{s.sensitivity, s.uncertainty});
    return out;
  }
  /// Puts back what observations() and moments() returned; shapes are checked at the next observe().
  void restore(long observations, const std::map<std::string, Moments>& moments) {
    if (observations < 0)
      detail::fail("rankwise::SensitivityImportance", "restore: observations must be >= 0 (got ", observations, ")");
    for (const auto& [name, m] : moments)
      if (m.sensitivity.rows() != m.uncertainty.rows() || m.sensitivity.cols() != m.uncertainty.cols())
        detail::fail("rankwise::SensitivityImportance", "restore: the moments of '", name, "' differ in shape");
    std::unordered_map<std::string, State> state;
    for (const auto& [name, m] : moments) state.emplace(name, State{m.sensitivity, m.uncertainty, {}});
    m_state.swap(state);
    m_observations = observations;
  }

 private:
  struct State {
    Matrix<Scalar> sensitivity;  // Ibar
    Matrix<Scalar> uncertainty;  // Ubar
    Matrix<Scalar> current;      // I of the last step (a reused buffer)
  };

  static std::vector<RankSlice<Scalar>> slices_of(RankModule<Scalar>& module) {
    std::vector<RankSlice<Scalar>> slices = module.rank_slices();
    if (slices.empty())
      detail::fail("rankwise::SensitivityImportance", "module '", module.path(),
                   "' does not expose its rank-sliced parameters (A_parameter(), B_parameter())");
    return slices;
  }

  SensitivityImportanceOptions m_options;
  std::unordered_map<std::string, State> m_state;
  long m_observations = 0;
};

struct FisherImportanceOptions {
  double beta = 0.95;  ///< EMA factor of the squared gate gradient (about 1 / (1 - beta) steps remembered)
};

/// The loss a rank's removal would cost, predicted to second order from the training gradients alone
/// (Optimal Brain Damage on the rank's gate, with the empirical Fisher for the curvature): with g_i the
/// gate of rank i, d_i = g_i dL/dg_i = sum_j A_ij dL/dA_ij (the same number from B's column), and the
/// score is EMA(d_i^2) / 2, bias-corrected per rank (a rank added later is not penalised for its
/// shorter history). Near a minimum dL/dg_i averages to zero but its batch-to-batch variance does not:
/// E[d_i^2] = (mean)^2 + Var(d_i) is then the Fisher information of the gate over the batch size, and
/// F g^2 / 2 is what dropping g to 0 costs. One dot product per rank per step; no extra passes.
template <FloatScalar Scalar>
class FisherImportance final : public ImportanceEstimator<Scalar> {
 public:
  explicit FisherImportance(const FisherImportanceOptions& options = {}) : m_options(options) {
    if (!(options.beta >= 0.0 && options.beta < 1.0))
      detail::fail("rankwise::FisherImportance", "beta must be in [0, 1) (got ", options.beta, ")");
  }

  const char* name() const override { return "fisher"; }
  bool needs_observations() const override { return true; }
  const FisherImportanceOptions& options() const { return m_options; }

  void observe(std::span<RankModule<Scalar>> modules) override {
    const double beta = m_options.beta;
    for (RankModule<Scalar>& module : modules) {
      const std::optional<RankSlice<Scalar>> slice = trainable_slice(module);
      if (!slice) continue;  // frozen factors only: nothing to learn from
      const Parameter<Scalar>& p = *slice->parameter;
      const Index r = module.rank();
      if (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols())
        detail::fail<StateError>("rankwise::FisherImportance", "the gradient of '", p.name,
                                 "' does not match its value; observe() needs the gradients of the last backward");
      State& s = m_state[p.name];
      if (s.ema.size() == 0 && s.steps.size() == 0) {
        s.ema = Vector<double>::Zero(r);
        s.steps = Vector<double>::Zero(r);
      }
      if (s.ema.size() != r)
        detail::fail<StateError>("rankwise::FisherImportance", "the state of '", p.name, "' has ", s.ema.size(),
                                 " ranks but the module has ", r, "; call follow() with the RankChange of the surgery");
      for (Index i = 0; i < r; ++i) {
        const double d = slice->axis == Axis::Rows
                             ? (p.value.row(i).array() * p.grad.row(i).array()).template cast<double>().sum()
                             : (p.value.col(i).array() * p.grad.col(i).array()).template cast<double>().sum();
        s.ema(i) = beta * s.ema(i) + (1.0 - beta) * d * d;
        s.steps(i) += 1.0;
      }
    }
    m_observations += 1;
  }

  void follow(const RankChange& change) override {
    for (const SliceChange& c : change.changes) {
      auto it = m_state.find(c.parameter);
      if (it == m_state.end()) continue;
      SliceChange per_rank = c;  // the state holds one entry per rank, whichever factor it came from
      per_rank.axis = Axis::Rows;
      detail::slice_state(it->second.ema, per_rank, "rankwise::FisherImportance");
      detail::slice_state(it->second.steps, per_rank, "rankwise::FisherImportance");
    }
  }

  ImportanceScores score(std::span<RankModule<Scalar>> modules) override {
    detail::check_scorable("rankwise::FisherImportance", modules);
    ImportanceScores result;
    result.scores.resize(modules.size());
    for (std::size_t m = 0; m < modules.size(); ++m) {
      const Index r = modules[m].rank();
      std::vector<double>& out = result.scores[m];
      out.assign(static_cast<std::size_t>(r), 0.0);
      if (r == 0) continue;
      const std::optional<RankSlice<Scalar>> slice = trainable_slice(modules[m]);
      if (!slice) continue;
      const auto it = m_state.find(slice->parameter->name);
      if (it == m_state.end())
        detail::fail<StateError>("rankwise::FisherImportance", "no gradient of '", slice->parameter->name,
                                 "' was observed yet; call observe() after every backward (RankAllocator::step() "
                                 "does)");
      const State& s = it->second;
      if (s.ema.size() != r)
        detail::fail<StateError>("rankwise::FisherImportance", "the state of '", slice->parameter->name,
                                 "' does not match its rank; call follow() with the RankChange of the surgery");
      for (Index i = 0; i < r; ++i) {
        const double n = s.steps(i);
        const double v = n == 0.0 ? 0.0 : 0.5 * s.ema(i) / (1.0 - std::pow(m_options.beta, n));
        if (!std::isfinite(v)) {
          result.status = Status::NonFinite;
          result.message = "[rankwise::FisherImportance] a score of '" + modules[m].path() +
                           "' is not finite (non-finite gradients were observed)";
          result.scores.clear();
          return result;
        }
        out[static_cast<std::size_t>(i)] = v;
      }
    }
    return result;
  }

  long observations() const { return m_observations; }

  /// Per observed parameter (by name), per rank: the EMA of d_i^2 and the number of observations
  /// behind it (its bias correction). For checkpoints.
  struct Moments {
    Vector<double> ema;
    Vector<double> steps;
  };
  std::map<std::string, Moments> moments() const { return {m_state.begin(), m_state.end()}; }
  /// Puts back what observations() and moments() returned; ranks are checked at the next observe().
  /// Refuses (InvalidArgument, nothing changed) lengths that differ, negative or non-finite values and
  /// counts that are not whole numbers.
  void restore(long observations, const std::map<std::string, Moments>& moments) {
    const char* where = "rankwise::FisherImportance";
    if (observations < 0) detail::fail(where, "restore: observations must be >= 0 (got ", observations, ")");
    for (const auto& [name, m] : moments) {
      if (m.ema.size() != m.steps.size())
        detail::fail(where, "restore: '", name, "' has ", m.ema.size(), " EMA values but ", m.steps.size(),
                     " observation counts");
      for (Index i = 0; i < m.ema.size(); ++i) {
        if (!(std::isfinite(m.ema(i)) && m.ema(i) >= 0.0))
          detail::fail(where, "restore: the EMA of '", name, "' rank ", i, " must be finite and >= 0 (got ", m.ema(i),
                       ")");
        if (!(m.steps(i) >= 0.0 && m.steps(i) <= double(observations) && m.steps(i) == std::floor(m.steps(i))))
          detail::fail(where, "restore: the observation count of '", name, "' rank ", i,
                       " must be a whole number in [0, observations = ", observations, "] (got ", m.steps(i), ")");
      }
    }
    m_state = std::unordered_map<std::string, Moments>(moments.begin(), moments.end());
    m_observations = observations;
  }

 private:
  using State = Moments;  // ema: EMA of d_i^2 per rank; steps: its observations (sliced alike on surgery)

  // The first trainable rank-sliced factor (A's rows for LoRA): d_i is the same from either factor.
  static std::optional<RankSlice<Scalar>> trainable_slice(RankModule<Scalar>& module) {
    const std::vector<RankSlice<Scalar>> slices = module.rank_slices();
    if (slices.empty())
      detail::fail("rankwise::FisherImportance", "module '", module.path(),
                   "' does not expose its rank-sliced parameters (A_parameter(), B_parameter())");
    for (const RankSlice<Scalar>& slice : slices)
      if (slice.parameter->trainable) return slice;
    return std::nullopt;
  }

  FisherImportanceOptions m_options;
  std::unordered_map<std::string, State> m_state;
  long m_observations = 0;
};

/// |s g_i| ||B[:, i]|| ||A[i, :]|| (the product of the norms of rank i's slices, times the module's scale
/// and the rank's gate): the Frobenius norm of that rank's term of delta W. Needs no data and no state.
template <FloatScalar Scalar>
class MagnitudeImportance final : public ImportanceEstimator<Scalar> {
 public:
  const char* name() const override { return "magnitude"; }

  ImportanceScores score(std::span<RankModule<Scalar>> modules) override {
    detail::check_scorable("rankwise::MagnitudeImportance", modules);
    ImportanceScores result;
    result.scores.resize(modules.size());
    for (std::size_t m = 0; m < modules.size(); ++m) {
      RankModule<Scalar>& module = modules[m];
      const std::vector<RankSlice<Scalar>> slices = module.rank_slices();
      if (slices.empty())
        detail::fail("rankwise::MagnitudeImportance", "module '", module.path(),
                     "' does not expose its rank-sliced parameters (A_parameter(), B_parameter())");
      const Index r = module.rank();
      std::vector<double>& out = result.scores[m];
      out.assign(static_cast<std::size_t>(r), std::abs(module.scale()));
      for (Index i = 0; i < r; ++i) {
        double& v = out[static_cast<std::size_t>(i)];
        v *= std::abs(module.gate(i));
        for (const RankSlice<Scalar>& slice : slices) {
          const Matrix<Scalar>& w = slice.parameter->value;
          v *= slice.axis == Axis::Rows ? double(w.row(i).template cast<double>().norm())
                                        : double(w.col(i).template cast<double>().norm());
        }
        if (!std::isfinite(v)) {
          result.status = Status::NonFinite;
          result.message = "[rankwise::MagnitudeImportance] the score of rank " + std::to_string(i) + " of '" +
                           module.path() + "' is not finite";
          result.scores.clear();
          return result;
        }
      }
    }
    return result;
  }
};

}  // namespace rankwise
