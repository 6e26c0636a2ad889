#pragma once
/// \file rankwise/adapters/bora.hpp
/// BoRA (Eide & Frigessi, 2024, arXiv:2407.15857): multi-task LoRA with a hierarchical Gaussian
/// prior. One frozen base layer, D task adapters θ_d = (A_d, B_d) and a global adapter Θ = (A_Θ, B_Θ)
/// of the same shapes; every column (token) of a batch is routed through its task's adapter.
///
///   forward (Task, the paper's):      y_:j = W x_:j + b + s B_d A_d x_:j        d = task of column j
///   forward (Joined, official code):  y_:j = W x_:j + b + s (B_Θ A_Θ + B_d A_d) x_:j
///   prior (Squared, the paper's):     (τ/2) Σ_d ‖θ_d − Θ‖²   (summed over A and B)
///            gradients              τ (θ_d − Θ) for θ_d,   −τ Σ_d (θ_d − Θ) for Θ
///   prior (Unsquared, official code): τ Σ_d Σ_tensors ‖θ_d,t − Θ_t‖_F
///   Joined: the prior pulls each task's own delta θ_d to 0 instead of to Θ (Θ has no prior term
///           and learns from every task's data); Squared (τ/2) Σ_d ‖θ_d‖², Unsquared τ Σ ‖θ_d,t‖_F.
///   shapes  A_d, A_Θ: r x in;  B_d, B_Θ: out x r;  x: in x n;  s = alpha / r (alpha / sqrt r, rsLoRA)
///   init    A_Θ like LoRA's A (Kaiming uniform or Gaussian), B_Θ = 0; in Task mode each θ_d = Θ plus
///           N(0, init_noise²) on every entry (the official code: 0.001), in Joined mode
///           θ_d = N(0, init_noise²) (a delta on top of Θ)
/// τ = 0 gives D independent LoRAs, a large τ one shared LoRA. backward() accumulates the data's
/// gradients only; add_prior_gradient() adds the prior's, once per step, and returns its value.
/// Routing: set_routing(TaskRouting) before forward(); columns of one task need not be contiguous,
/// each run of consecutive columns of one task is one pair of products (no copy of the batch, no
/// B_d A_d formed). Docs: docs/adapters/bora.md

#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/lora_export.hpp>
#include <rankwise/adapters/own_parameters.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/init.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parallel.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/layers/linear.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

/// The paper's squared Gaussian prior or the official code's unsquared norm per tensor.
enum class BoRAPrior { Squared, Unsquared };
/// The task adapter alone (the paper), or the global adapter plus the task's (the official code's
/// default mode "joined_grad").
enum class BoRAForward { Task, Joined };
/// How the task adapters are stored (Task mode): θ_d itself, as the paper writes it (Direct), or its
/// offset from the global adapter, δ_d = θ_d − Θ (Offsets). The model and the objective are the same;
/// what differs is what the optimizer steps on. With Adam at a large τ, Direct's spring τ(θ_d − Θ)
/// dominates every task's and Θ's gradient, and Θ, which the data reach only through the springs,
/// learns slowly; with offsets Θ receives every task's data gradient directly and the prior acts
/// on the offsets alone (docs/adapters/bora.md#parametrization has the measurements).
enum class BoRAParametrization { Direct, Offsets };

struct BoRAOptions {
  Index tasks = 2;           ///< D >= 1
  Index rank = 8;            ///< r of every adapter, in [1, min(in, out)]
  double alpha = 8.0;        ///< lora_alpha, > 0
  bool use_rslora = false;   ///< scale alpha / sqrt(r) instead of alpha / r
  double tau = 1.0;          ///< prior precision τ >= 0 (0: independent tasks)
  BoRAPrior prior = BoRAPrior::Squared;
  BoRAForward forward = BoRAForward::Task;
  double init_noise = 1e-3;  ///< sd of the noise the task adapters start from, >= 0
  LoRAInit init = LoRAInit::KaimingUniform;  ///< how A_Θ is drawn
  BoRAParametrization parametrization = BoRAParametrization::Direct;  ///< Offsets: Task mode only
};

/// The paper's learning-rate rule: the prior's gradient grows with τ, so the learning rate does too,
/// lr = τ · lr_per_tau for τ > 0 (the paper: 1e-5 per unit of τ with AdamW on OPT-350m), and
/// lr_at_zero for τ = 0 (the paper: 1e-4). Measured against a fixed rate in docs/adapters/bora.md.
inline double bora_paper_learning_rate(double tau, double lr_per_tau = 1e-5, double lr_at_zero = 1e-4) {
  if (!(tau >= 0.0) || !std::isfinite(tau))
    detail::fail("rankwise::bora_paper_learning_rate", "tau must be a finite number >= 0 (got ", tau, ")");
  if (!(lr_per_tau > 0.0) || !std::isfinite(lr_per_tau) || !(lr_at_zero > 0.0) || !std::isfinite(lr_at_zero))
    detail::fail("rankwise::bora_paper_learning_rate", "lr_per_tau and lr_at_zero must be finite numbers > 0 (got ",
                 lr_per_tau, ", ", lr_at_zero, ")");
  return tau > 0.0 ? tau * lr_per_tau : lr_at_zero;
}

/// Which task each column of a batch belongs to, kept as runs of consecutive columns of one task.
/// Built once per batch and shared by every BoRA layer of a model.
class TaskRouting {
 public:
  struct Run {
    Index begin;
    Index count;
    Index task;
  };

  TaskRouting() = default;

  /// From one task id per column; every id must be in [0, tasks).
  TaskRouting(std::span<const std::int32_t> task_of_column, Index tasks) { assign(task_of_column, tasks); }

  /// Every column in task `task`.
  static TaskRouting uniform(Index columns, Index task, Index tasks) {
    const std::vector<std::int32_t> ids(std::size_t(std::max<Index>(columns, 0)), std::int32_t(task));
    return TaskRouting(ids, tasks);
  }

  /// One task per sequence of a batch whose columns are sequence after sequence, seq_len columns each
  /// (the layout of ToyTransformer and of most sequence models): sequence i's columns go to task
  /// task_of_sequence[i]. seq_len >= 1.
  static TaskRouting by_sequence(std::span<const std::int32_t> task_of_sequence, Index seq_len, Index tasks) {
    if (seq_len < 1) detail::fail("rankwise::TaskRouting", "seq_len must be >= 1 (got ", seq_len, ")");
    std::vector<std::int32_t> ids;
    ids.reserve(task_of_sequence.size() * std::size_t(seq_len));
    for (const std::int32_t task : task_of_sequence) ids.insert(ids.end(), std::size_t(seq_len), task);
    return TaskRouting(ids, tasks);
  }

  /// Reassigns (reusing its storage: no allocation once it has held as many runs). Strong guarantee.
  void assign(std::span<const std::int32_t> task_of_column, Index tasks) {
    if (tasks < 1) detail::fail("rankwise::TaskRouting", "the number of tasks must be >= 1 (got ", tasks, ")");
    for (std::size_t j = 0; j < task_of_column.size(); ++j)
      if (task_of_column[j] < 0 || task_of_column[j] >= tasks)
        detail::fail("rankwise::TaskRouting", "task ids must be in [0, ", tasks, ") (got ", task_of_column[j],
                     " for column ", j, ")");
    m_runs.clear();
    for (std::size_t j = 0; j < task_of_column.size(); ++j) {
      const Index task = task_of_column[j];
      if (!m_runs.empty() && m_runs.back().task == task)
        ++m_runs.back().count;
      else
        m_runs.push_back({Index(j), 1, task});
    }
    m_columns = Index(task_of_column.size());
    m_tasks = tasks;
  }

  Index columns() const { return m_columns; }
  Index tasks() const { return m_tasks; }
  const std::vector<Run>& runs() const { return m_runs; }
  /// How many columns belong to `task`.
  Index columns_of(Index task) const {
    Index n = 0;
    for (const Run& run : m_runs)
      if (run.task == task) n += run.count;
    return n;
  }

 private:
  std::vector<Run> m_runs;
  Index m_columns = 0;
  Index m_tasks = 0;
};

template <FloatScalar Scalar_, typename Base_ = Linear<Scalar_>>
class BoRA {
 public:
  using Scalar = Scalar_;
  using Base = Base_;
  using MatrixType = Matrix<Scalar>;

  /// Wraps `base` (taken over and frozen). Draws A_Θ, then every task's noise, task by task.
  BoRA(Base base, const BoRAOptions& options, Random& rng) : m_base(std::move(base)), m_options(options) {
    const Index limit = std::min(in_features(), out_features());
    if (options.tasks < 1) detail::fail("rankwise::BoRA", "tasks must be >= 1 (got ", options.tasks, ")");
    if (options.rank < 1 || options.rank > limit)
      detail::fail("rankwise::BoRA", "rank must be in [1, min(in, out)] = [1, ", limit, "] (got ", options.rank, ")");
    LoRA<Scalar, Base>::check_scaling("rankwise::BoRA", in_features(), out_features(), options.alpha, options.rank,
                                      options.use_rslora);
    check_tau("rankwise::BoRA", options.tau);
    if (!(options.init_noise >= 0.0) || !std::isfinite(options.init_noise))
      detail::fail("rankwise::BoRA", "init_noise must be a finite number >= 0 (got ", options.init_noise, ")");
    if (options.prior != BoRAPrior::Squared && options.prior != BoRAPrior::Unsquared)
      detail::fail("rankwise::BoRA", "prior must be Squared or Unsquared (got enum value ", int(options.prior), ")");
    if (options.forward != BoRAForward::Task && options.forward != BoRAForward::Joined)
      detail::fail("rankwise::BoRA", "forward must be Task or Joined (got enum value ", int(options.forward), ")");
    if (options.parametrization != BoRAParametrization::Direct &&
        options.parametrization != BoRAParametrization::Offsets)
      detail::fail("rankwise::BoRA", "parametrization must be Direct or Offsets (got enum value ",
                   int(options.parametrization), ")");
    if (options.parametrization == BoRAParametrization::Offsets && options.forward == BoRAForward::Joined)
      detail::fail("rankwise::BoRA", "parametrization Offsets applies to forward Task (in Joined mode the task "
                                     "adapters already are offsets added to the global one)");
    m_base.set_trainable(false);
    const Index r = options.rank;
    m_global.A.value.resize(r, in_features());
    if (options.init == LoRAInit::Gaussian)
      fill_normal(m_global.A.value, 0.0, 1.0 / double(r), rng);
    else
      fill_kaiming_uniform(m_global.A.value, in_features(), rng);
    m_global.B.value.setZero(out_features(), r);
    m_tasks.resize(std::size_t(options.tasks));
    for (Factors& task : m_tasks) {
      task.A.value.resize(r, in_features());
      task.B.value.resize(out_features(), r);
      fill_normal(task.A.value, 0.0, options.init_noise, rng);
      fill_normal(task.B.value, 0.0, options.init_noise, rng);
      if (!stores_offsets()) {
        task.A.value += m_global.A.value;
        task.B.value += m_global.B.value;
      }
    }
    if (offsets()) {  // the factors each task computes with, Θ + δ_d, refreshed by every forward()
      m_effective.resize(m_tasks.size());
      for (Factors& f : m_effective) {
        f.A.value.resize(r, in_features());
        f.B.value.resize(out_features(), r);
        f.A.zero_grad();
        f.B.zero_grad();
      }
    }
    name_parameters("");
    zero_grad();
  }

  // --- shapes and settings -------------------------------------------------------------------
  Index in_features() const { return m_base.in_features(); }
  Index out_features() const { return m_base.out_features(); }
  Index rank() const { return m_options.rank; }
  Index tasks() const { return Index(m_tasks.size()); }
  const BoRAOptions& options() const { return m_options; }
  double scale() const {
    return m_options.use_rslora ? m_options.alpha / std::sqrt(double(m_options.rank))
                                : m_options.alpha / double(m_options.rank);
  }
  double tau() const { return m_options.tau; }
  /// Changes τ (a sweep, or a schedule). τ >= 0 and finite.
  void set_tau(double tau) {
    check_tau("rankwise::BoRA::set_tau", tau);
    m_options.tau = tau;
  }

  const Base& base() const { return m_base; }
  /// The stored factors of a task: θ_d (Direct; Joined: the task's own adapter), or δ_d = θ_d − Θ
  /// (Offsets). task_factors_as_lora() gives what the task computes with in every case.
  const MatrixType& A(Index task) const { return task_factors(task).A.value; }
  const MatrixType& B(Index task) const { return task_factors(task).B.value; }
  const MatrixType& global_A() const { return m_global.A.value; }
  const MatrixType& global_B() const { return m_global.B.value; }
  Parameter<Scalar>& A_parameter(Index task) { return task_factors(task).A; }
  Parameter<Scalar>& B_parameter(Index task) { return task_factors(task).B; }
  Parameter<Scalar>& global_A_parameter() { return m_global.A; }
  Parameter<Scalar>& global_B_parameter() { return m_global.B; }

  void set_training(bool training) {
    m_training = training;
    m_base.set_training(training);
    if (!training) m_cached_cols = -1;
  }
  bool is_training() const { return m_training; }

  /// Names: "<path>.base_layer.*", "<path>.bora_global.lora_A.weight" (and B),
  /// "<path>.bora_task.<d>.lora_A.weight" (and B).
  void set_path(const std::string& path) {
    m_base.set_path(path.empty() ? std::string("base_layer") : path + ".base_layer");
    name_parameters(path);
  }

  /// The task of every column of the next forward() (and of its backward()).
  void set_routing(const TaskRouting& routing) {
    if (routing.tasks() != tasks())
      detail::fail("rankwise::BoRA", "set_routing: the routing is for ", routing.tasks(), " tasks, the layer has ",
                   tasks());
    m_routing = routing;
    ++m_routing_version;
  }
  const TaskRouting& routing() const { return m_routing; }

  // --- the Layer contract ----------------------------------------------------------------------
  /// y = W x + b + s B_d A_d x per column (Joined: + s B_Θ A_Θ x). Keeps a copy of x while training.
  void forward(const ConstRef<Scalar>& x, MatrixType& y) {
    check_forward(x);
    m_base.forward(x, y);
    m_cached_cols = m_training ? x.cols() : -1;
    m_forward_routing = m_routing_version;
    if (m_training) m_x = x;
    const Scalar s = Scalar(scale());
    const bool joined = m_options.forward == BoRAForward::Joined;
    m_u.resize(rank(), x.cols());
    if (joined) m_u_global.resize(rank(), x.cols());
    if (offsets())
      for (std::size_t d = 0; d < m_tasks.size(); ++d) {
        m_effective[d].A.value.noalias() = m_global.A.value + m_tasks[d].A.value;
        m_effective[d].B.value.noalias() = m_global.B.value + m_tasks[d].B.value;
      }
    detail::parallel_blocks(x.cols(), 128, [&](Index c, Index w) {
      for_runs_in(c, w, [&](Index begin, Index count, Index task) {
        add_branch(used(task), m_u, x, y, begin, count, s);
      });
      if (joined) add_branch(m_global, m_u_global, x, y, c, w, s);
    });
  }

  /// Accumulates the data's gradients of every task's factors (and of Θ in Joined mode); assigns dx.
  void backward(const ConstRef<Scalar>& dy, MatrixType& dx) {
    check_backward(dy);
    m_base.backward(dy, dx);
    const Scalar s = Scalar(scale());
    const bool joined = m_options.forward == BoRAForward::Joined;
    m_t.resize(rank(), dy.cols());
    if (joined) m_t_global.resize(rank(), dy.cols());
    detail::parallel_blocks(dy.cols(), 128, [&](Index c, Index w) {
      for_runs_in(c, w, [&](Index begin, Index count, Index task) {
        add_branch_dx(used(task), m_t, dy, dx, begin, count, s);
      });
      if (joined) add_branch_dx(m_global, m_t_global, dy, dx, c, w, s);
    });
    // dB_d += s dy u^T and dA_d += t x^T over each task's runs, in the runs' order; the parts are
    // row blocks of the B's and column blocks of the A's, so no part sums what another writes.
    const Index parts = std::min(detail::parts_for(out_features(), 32), detail::parts_for(in_features(), 32));
    m_dA_t.resize(in_features(), rank());
    if (offsets())
      for (Factors& f : m_effective) {
        f.A.grad.setZero();
        f.B.grad.setZero();
      }
    auto gradients = [&](Index p) {
      const auto rows = detail::part_range(out_features(), parts, p, 8), cols = detail::part_range(in_features(), parts, p, 8);
      for (const TaskRouting::Run& run : m_routing.runs()) {
        Factors& f = used(run.task);
        detail::add_lora_gradients(f.A, f.B, dy, m_u, m_t, m_x, run.begin, run.count, rows, cols, s, m_dA_t);
      }
      if (joined)
        detail::add_lora_gradients(m_global.A, m_global.B, dy, m_u_global, m_t_global, m_x, 0, dy.cols(), rows, cols, s,
                                   m_dA_t);
    };
    detail::parallel_parts(parts, gradients);  // one part: on the calling thread
    if (offsets())  // θ_d = Θ + δ_d: the gradient of θ_d is both δ_d's and (summed over tasks) Θ's
      for (std::size_t d = 0; d < m_tasks.size(); ++d)
        for (int which = 0; which < 2; ++which) {
          const MatrixType& g = which == 0 ? m_effective[d].A.grad : m_effective[d].B.grad;
          Parameter<Scalar>& task = which == 0 ? m_tasks[d].A : m_tasks[d].B;
          Parameter<Scalar>& global = which == 0 ? m_global.A : m_global.B;
          if (task.wants_grad()) task.grad += g;
          if (global.wants_grad()) global.grad += g;
        }
  }

  /// Every parameter: the base's (frozen), then Θ's A and B, then each task's A and B.
  std::vector<Parameter<Scalar>*> parameters() {
    std::vector<Parameter<Scalar>*> params = m_base.parameters();
    for_each_own([&](Parameter<Scalar>& p) { params.push_back(&p); });
    return params;
  }

  void zero_grad() {
    m_base.zero_grad();
    for_each_own([](Parameter<Scalar>& p) { p.zero_grad(); });
  }

  /// (D + 1) r (in + out).
  Index trainable_parameter_count() const { return (tasks() + 1) * rank() * (in_features() + out_features()); }

  // --- the prior ---------------------------------------------------------------------------------
  /// The prior's value: (τ/2) Σ_d ‖θ_d − Θ‖² (Squared) or τ Σ_d Σ_t ‖θ_d,t − Θ_t‖ (Unsquared); in
  /// Joined mode the same of θ_d alone (with Offsets θ_d − Θ is the stored δ_d).
  double prior_penalty() const {
    double sum = 0.0;
    for (const Factors& f : m_tasks)
      for (int which = 0; which < 2; ++which) sum += prior_term(distance_squared(f, which));
    return sum;
  }

  /// Adds the prior's gradient to every task's factors (and to Θ's, in Task mode with Direct) and returns the
  /// prior's value. Call it once per step, after backward() and before the optimizer. For the
  /// unsquared norm, a tensor at distance 0 gets the subgradient 0.
  double add_prior_gradient() {
    const double tau = m_options.tau;
    const bool own = stores_offsets();  // the stored tensor is the distance itself: Θ gets no prior term
    double sum = 0.0;  // the prior's value, from the distances the weights need anyway
    for (Factors& f : m_tasks)
      for (int which = 0; which < 2; ++which) {
        Parameter<Scalar>& task = which == 0 ? f.A : f.B;
        Parameter<Scalar>& global = which == 0 ? m_global.A : m_global.B;
        const double squared = distance_squared(f, which);
        sum += prior_term(squared);
        double weight = tau;
        if (m_options.prior == BoRAPrior::Unsquared) weight = squared > 0.0 ? tau / std::sqrt(squared) : 0.0;
        if (weight == 0.0) continue;
        const Scalar w = Scalar(weight);
        if (own) {
          if (task.wants_grad()) task.grad.noalias() += w * task.value;
          continue;
        }
        if (task.wants_grad()) task.grad.noalias() += w * (task.value - global.value);
        if (global.wants_grad()) global.grad.noalias() -= w * (task.value - global.value);
      }
    return sum;
  }

  /// ‖θ_d − Θ‖ over A and B (Joined: ‖θ_d‖; Offsets: ‖δ_d‖), the paper's distance of a task from the mean.
  double distance_from_global(Index task) const {
    const Factors& f = task_factors(task);
    return std::sqrt(distance_squared(f, 0) + distance_squared(f, 1));
  }

  /// Sets Θ to the mean of the task adapters (for fixed θ_d, the Θ that minimises the squared prior).
  /// Task mode only. With Offsets the tasks' θ_d stay as they are: Θ takes the offsets' mean, which
  /// each δ_d gives up.
  void set_global_to_mean() {
    if (m_options.forward == BoRAForward::Joined)
      detail::fail<StateError>("rankwise::BoRA", "set_global_to_mean(): in Joined mode Θ is not the tasks' mean");
    if (offsets()) {
      MatrixType mean_A = MatrixType::Zero(rank(), in_features()), mean_B = MatrixType::Zero(out_features(), rank());
      for (const Factors& f : m_tasks) {
        mean_A += f.A.value;
        mean_B += f.B.value;
      }
      mean_A /= Scalar(tasks());
      mean_B /= Scalar(tasks());
      m_global.A.value += mean_A;
      m_global.B.value += mean_B;
      for (Factors& f : m_tasks) {
        f.A.value -= mean_A;
        f.B.value -= mean_B;
      }
      return;
    }
    m_global.A.value.setZero();
    m_global.B.value.setZero();
    for (const Factors& f : m_tasks) {
      m_global.A.value += f.A.value;
      m_global.B.value += f.B.value;
    }
    m_global.A.value /= Scalar(tasks());
    m_global.B.value /= Scalar(tasks());
  }

  /// Replaces every factor: `factors` holds (A, B) of Θ, then of task 0, 1, ... (loaders use it).
  /// Gradients are cleared, and a backward() needs a new forward(). Strong guarantee: the shapes
  /// (A r x in, B out x r, D + 1 pairs) and finiteness are checked before anything changes.
  void assign_factors(std::vector<std::pair<MatrixType, MatrixType>> factors) {
    const char* where = "rankwise::BoRA::assign_factors";
    if (Index(factors.size()) != tasks() + 1)
      detail::fail(where, "need ", tasks() + 1, " pairs (the global adapter, then each task; got ", factors.size(), ")");
    for (std::size_t i = 0; i < factors.size(); ++i) {
      const auto& [A, B] = factors[i];
      if (A.rows() != rank() || A.cols() != in_features() || B.rows() != out_features() || B.cols() != rank())
        detail::fail(where, "pair ", i, " must be A ", rank(), " x ", in_features(), " and B ", out_features(), " x ",
                     rank(), " (got A ", A.rows(), " x ", A.cols(), ", B ", B.rows(), " x ", B.cols(), ")");
      if (!A.allFinite() || !B.allFinite()) detail::fail(where, "pair ", i, " holds a NaN or an infinity");
    }
    m_global.A.value.swap(factors[0].first);
    m_global.B.value.swap(factors[0].second);
    for (std::size_t d = 0; d < m_tasks.size(); ++d) {
      m_tasks[d].A.value.swap(factors[d + 1].first);
      m_tasks[d].B.value.swap(factors[d + 1].second);
    }
    zero_grad();
    m_cached_cols = -1;
  }

  // --- one task as a plain LoRA ----------------------------------------------------------------
  /// The factors task `task` computes with, as one LoRA of the same scale: (A_d, B_d) in Task mode
  /// (Offsets: (A_Θ + δA_d, B_Θ + δB_d)), ([A_Θ; A_d], [B_Θ B_d]) of rank 2r in Joined mode. Task −1:
  /// Θ alone.
  std::pair<MatrixType, MatrixType> task_factors_as_lora(Index task) const {
    if (task == -1) return {m_global.A.value, m_global.B.value};
    const Factors& f = task_factors(task);
    if (offsets()) return {m_global.A.value + f.A.value, m_global.B.value + f.B.value};
    if (m_options.forward == BoRAForward::Task) return {f.A.value, f.B.value};
    MatrixType A(2 * rank(), in_features()), B(out_features(), 2 * rank());
    A << m_global.A.value, f.A.value;
    B << m_global.B.value, f.B.value;
    return {std::move(A), std::move(B)};
  }

  /// The same with the scale, as the exporters take it (adapters/lora_export.hpp).
  LoRAFactors<Scalar> task_lora_factors(Index task) const {
    auto [A, B] = task_factors_as_lora(task);
    return {std::move(A), std::move(B), scale()};
  }

  /// Δ W of one task (dense; for merge and export only).
  MatrixType delta_weight(Index task) const {
    const auto [A, B] = task_factors_as_lora(task);
    return Scalar(scale()) * (B * A);
  }

 private:
  struct Factors {
    Parameter<Scalar> A;
    Parameter<Scalar> B;
  };

  /// f(parameter) for Θ's A and B, then each task's A and B.
  template <typename F>
  void for_each_own(F&& f) {
    f(m_global.A);
    f(m_global.B);
    for (Factors& task : m_tasks) {
      f(task.A);
      f(task.B);
    }
  }

  static void check_tau(const char* where, double tau) {
    if (!(tau >= 0.0) || !std::isfinite(tau)) detail::fail(where, "tau must be a finite number >= 0 (got ", tau, ")");
  }

  const Factors& task_factors(Index task) const {
    if (task < 0 || task >= tasks())
      detail::fail("rankwise::BoRA", "task must be in [0, ", tasks(), ") (got ", task, ")");
    return m_tasks[std::size_t(task)];
  }
  Factors& task_factors(Index task) { return const_cast<Factors&>(std::as_const(*this).task_factors(task)); }

  void name_parameters(const std::string& path) {
    const std::string prefix = path.empty() ? std::string() : path + ".";
    m_global.A.name = prefix + "bora_global.lora_A.weight";
    m_global.B.name = prefix + "bora_global.lora_B.weight";
    for (std::size_t d = 0; d < m_tasks.size(); ++d) {
      m_tasks[d].A.name = prefix + "bora_task." + std::to_string(d) + ".lora_A.weight";
      m_tasks[d].B.name = prefix + "bora_task." + std::to_string(d) + ".lora_B.weight";
    }
  }

  /// The prior's term for one tensor at squared distance `squared`.
  double prior_term(double squared) const {
    return m_options.prior == BoRAPrior::Squared ? 0.5 * m_options.tau * squared : m_options.tau * std::sqrt(squared);
  }

  bool offsets() const { return m_options.parametrization == BoRAParametrization::Offsets; }
  /// Whether the stored task tensors are themselves what the prior measures (Joined, or Offsets).
  bool stores_offsets() const { return m_options.forward == BoRAForward::Joined || offsets(); }
  /// The factors a task computes with: its own (Direct, Joined) or Θ + δ_d (Offsets, from forward()).
  Factors& used(Index task) { return offsets() ? m_effective[std::size_t(task)] : m_tasks[std::size_t(task)]; }

  /// ‖θ_d,t − Θ_t‖² of A (which 0) or B (which 1); in Joined mode ‖θ_d,t‖² (Offsets: ‖δ_d,t‖²).
  double distance_squared(const Factors& f, int which) const {
    const MatrixType& task = which == 0 ? f.A.value : f.B.value;
    if (stores_offsets()) return double(task.squaredNorm());
    const MatrixType& global = which == 0 ? m_global.A.value : m_global.B.value;
    return double((task - global).squaredNorm());
  }

  /// u = A x (kept in u_store) and y += s B u over columns [begin, begin + count).
  static void add_branch(const Factors& f, MatrixType& u_store, const ConstRef<Scalar>& x, MatrixType& y, Index begin,
                         Index count, Scalar s) {
    auto u = u_store.middleCols(begin, count);
    u.noalias() = f.A.value * x.middleCols(begin, count);
    y.middleCols(begin, count).noalias() += s * (f.B.value * u);
  }

  /// t = s Bᵀ dy (kept in t_store) and dx += Aᵀ t over columns [begin, begin + count).
  static void add_branch_dx(const Factors& f, MatrixType& t_store, const ConstRef<Scalar>& dy, MatrixType& dx,
                            Index begin, Index count, Scalar s) {
    auto t = t_store.middleCols(begin, count);
    t.noalias() = f.B.value.transpose() * dy.middleCols(begin, count);
    t *= s;
    dx.middleCols(begin, count).noalias() += f.A.value.transpose() * t;
  }

  /// Calls f(begin, count, task) for the part of each run inside columns [c, c + w).
  template <typename F>
  void for_runs_in(Index c, Index w, F&& f) const {
    for (const TaskRouting::Run& run : m_routing.runs()) {
      const Index begin = std::max(run.begin, c), end = std::min(run.begin + run.count, c + w);
      if (begin < end) f(begin, end - begin, run.task);
    }
  }

  void check_forward(const ConstRef<Scalar>& x) const {
    if (x.rows() != in_features())
      detail::fail("rankwise::BoRA", "forward: input must have in_features = ", in_features(), " rows (got ",
                   x.rows(), " x ", x.cols(), ")");
    if (m_routing.columns() != x.cols())
      detail::fail("rankwise::BoRA", "forward: the routing covers ", m_routing.columns(),
                   " columns, the batch has ", x.cols(), " (set_routing() before forward())");
  }

  void check_backward(const ConstRef<Scalar>& dy) const {
    if (m_cached_cols < 0)
      detail::fail<StateError>("rankwise::BoRA", "backward() needs a forward() in training mode first");
    if (dy.rows() != out_features() || dy.cols() != m_cached_cols)
      detail::fail("rankwise::BoRA", "backward: dy must be ", out_features(), " x ", m_cached_cols,
                   " like the forward output (got ", dy.rows(), " x ", dy.cols(), ")");
    if (m_forward_routing != m_routing_version)
      detail::fail<StateError>("rankwise::BoRA", "backward: set_routing() was called after forward(); the batch's "
                               "routing is gone");
  }

  Base m_base;
  BoRAOptions m_options;
  Factors m_global;
  std::vector<Factors> m_tasks;
  std::vector<Factors> m_effective;  // Offsets: Θ + δ_d of each task, with its gradient
  TaskRouting m_routing;
  bool m_training = true;
  Index m_cached_cols = -1;
  MatrixType m_x;                  // the input of the last training forward
  MatrixType m_u, m_t;             // A_d x and s B_d^T dy, column by column (r x n)
  MatrixType m_u_global, m_t_global;  // the same for Θ in Joined mode
  MatrixType m_dA_t;               // one run's dA, transposed (in x r)
  std::uint64_t m_routing_version = 0, m_forward_routing = 0;  // set_routing() calls; the one forward() used
};

static_assert(Adapter<BoRA<float>>, "BoRA must model the Adapter contract");

}  // namespace rankwise
