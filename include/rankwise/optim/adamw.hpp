#pragma once
/// \file rankwise/optim/adamw.hpp
/// AdamW: Adam with decoupled weight decay (Kingma & Ba, 2015, arXiv:1412.6980; Loshchilov & Hutter,
/// 2019, arXiv:1711.05101), as PyTorch's torch.optim.AdamW computes it.
///
///   m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
///   p = p - lr wd p                (decoupled decay, before the Adam step)
///   p = p - lr (m / c1) / (sqrt(v / c2) + eps),   c1 = 1 - b1^t, c2 = 1 - b2^t
/// State (m, v and t) is keyed by parameter name. t is counted per slice: after rank surgery the kept
/// slices keep their moments and their t, fresh slices start from m = v = 0 and t = 0, exactly as a
/// fresh parameter would. A parameter with an update window is stepped on those slices only: the
/// others keep value, m, v and t bit for bit (so a component that DyLoRA does not train this step
/// does not drift through momentum or decay), and t counts the steps each slice was trained.
/// Docs: docs/optim/adamw.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/optim/optimizer.hpp>

#include <cmath>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace rankwise {

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  ///< PyTorch's AdamW default; groups may override
};

template <FloatScalar Scalar_>
class AdamW {
 public:
  using Scalar = Scalar_;

  /// The moments of one parameter. `steps` holds t per slice along `axis` (rows unless the parameter
  /// was resized along its columns).
  struct State {
    Matrix<Scalar> m;
    Matrix<Scalar> v;
    Axis axis = Axis::Rows;
    Eigen::Array<double, Eigen::Dynamic, 1> steps;
  };

  AdamW(std::vector<Parameter<Scalar>*> parameters, const AdamWOptions& options)
      : AdamW(std::vector<ParameterGroup<Scalar>>{ParameterGroup<Scalar>{std::move(parameters), {}, {}, "default"}},
              options) {}

  AdamW(std::vector<ParameterGroup<Scalar>> groups, const AdamWOptions& options) : m_options(options) {
    if (!(options.beta1 >= 0.0 && options.beta1 < 1.0))
      detail::fail("rankwise::AdamW", "beta1 must be in [0, 1) (got ", options.beta1, ")");
    if (!(options.beta2 >= 0.0 && options.beta2 < 1.0))
      detail::fail("rankwise::AdamW", "beta2 must be in [0, 1) (got ", options.beta2, ")");
    if (!(options.eps > 0.0) || !std::isfinite(options.eps))
      detail::fail("rankwise::AdamW", "eps must be a finite number > 0 (got ", options.eps, ")");
    m_groups = detail::checked_groups("rankwise::AdamW", std::move(groups), options.lr, options.weight_decay);
  }

  /// One update of every trainable parameter from its gradient.
  void step() {
    ++m_step;
    const Scalar b1 = Scalar(m_options.beta1), b2 = Scalar(m_options.beta2), eps = Scalar(m_options.eps);
    for (ParameterGroup<Scalar>& group : m_groups) {
      const double lr = *group.lr * m_lr_factor;
      const Scalar decay = Scalar(1.0 - lr * *group.weight_decay);
      for (Parameter<Scalar>* p : group.parameters) {
        if (!p->trainable) continue;
        State& s = state(*p);
        // The whole tensor, or only the slices of its update window: the rest is left bit for bit.
        const detail::StepBlock b = window_block(*p, s);
        if (b.empty()) continue;  // no slices (rank 0), or an empty window
        Block m = s.m.block(b.row, b.col, b.rows, b.cols);
        Block v = s.v.block(b.row, b.col, b.rows, b.cols);
        Block value = p->value.block(b.row, b.col, b.rows, b.cols);
        const Block grad = p->grad.block(b.row, b.col, b.rows, b.cols);
        m = b1 * m + (Scalar(1) - b1) * grad;
        v = b2 * v + (Scalar(1) - b2) * grad.cwiseAbs2();
        if (decay != Scalar(1)) value *= decay;
        const Index first = s.axis == Axis::Rows ? b.row : b.col;
        const Index count = s.axis == Axis::Rows ? b.rows : b.cols;
        s.steps.segment(first, count) += 1.0;
        if ((s.steps.segment(first, count) == s.steps(first)).all()) {
          const double t = s.steps(first);
          const Scalar step_size = Scalar(lr / (1.0 - std::pow(m_options.beta1, t)));
          const Scalar inv_sqrt_c2 = Scalar(1.0 / std::sqrt(1.0 - std::pow(m_options.beta2, t)));
          value.array() -= step_size * m.array() / ((v.array().sqrt() * inv_sqrt_c2) + eps);
        } else {
          update_per_slice(*p, s, lr, eps, first, first + count);
        }
      }
    }
  }

  void set_lr_factor(double factor) {
    if (!(factor >= 0.0) || !std::isfinite(factor))
      detail::fail("rankwise::AdamW", "lr factor must be a finite number >= 0 (got ", factor, ")");
    m_lr_factor = factor;
  }
  double lr_factor() const { return m_lr_factor; }
  long step_count() const { return m_step; }
  const std::vector<ParameterGroup<Scalar>>& groups() const { return m_groups; }
  const AdamWOptions& options() const { return m_options; }

  /// Slices m, v and the step counts of the changed parameters as the surgery sliced them.
  void follow(const RankChange& change) {
    for (const SliceChange& c : change.changes) {
      auto it = m_state.find(c.parameter);
      if (it == m_state.end()) continue;
      State& s = it->second;
      if (s.axis != c.axis) {
        if ((s.steps != s.steps(0)).any())
          detail::fail<StateError>("rankwise::AdamW", "follow: '", c.parameter,
                                   "' was resized along both axes; per-slice step counts cannot follow");
        const double t = s.steps.size() ? s.steps(0) : double(m_step);
        s.axis = c.axis;
        s.steps.setConstant(c.axis == Axis::Rows ? s.m.rows() : s.m.cols(), t);
      }
      State next = s;
      detail::slice_state(next.m, c, "rankwise::AdamW");
      detail::slice_state(next.v, c, "rankwise::AdamW");
      Eigen::Array<double, Eigen::Dynamic, 1> steps(Index(c.kept.size()) + c.added);
      for (std::size_t j = 0; j < c.kept.size(); ++j) steps(Index(j)) = s.steps(c.kept[j]);
      steps.tail(c.added).setZero();
      next.steps.swap(steps);
      s = std::move(next);
    }
  }

  /// The state of a parameter, or nullptr before its first step.
  const State* state_of(const std::string& name) const {
    auto it = m_state.find(name);
    return it == m_state.end() ? nullptr : &it->second;
  }

  /// Every parameter's state, keyed by parameter name (for checkpoints).
  const std::unordered_map<std::string, State>& states() const { return m_state; }

  /// Puts back what step_count() and states() returned (checkpoints). Each state must belong to a
  /// parameter of the groups, match its current shape, and hold one step count per slice along its
  /// axis. Strong guarantee: on error nothing changes.
  void restore(long step_count, std::unordered_map<std::string, State> states) {
    if (step_count < 0) detail::fail("rankwise::AdamW", "restore: step count must be >= 0 (got ", step_count, ")");
    for (const auto& [name, s] : states) {
      const Parameter<Scalar>* p = find_parameter(name);
      if (p == nullptr)
        detail::fail("rankwise::AdamW", "restore: state for '", name, "', which is not a parameter of this optimizer");
      if (s.m.rows() != p->value.rows() || s.m.cols() != p->value.cols() || s.v.rows() != p->value.rows() ||
          s.v.cols() != p->value.cols())
        detail::fail("rankwise::AdamW", "restore: the state of '", name, "' must be ", p->value.rows(), " x ",
                     p->value.cols(), " like the parameter (got m ", s.m.rows(), " x ", s.m.cols(), ", v ",
                     s.v.rows(), " x ", s.v.cols(), ")");
      const Index slices = s.axis == Axis::Rows ? p->value.rows() : p->value.cols();
      if (s.steps.size() != slices)
        detail::fail("rankwise::AdamW", "restore: '", name, "' needs ", slices, " step counts, one per ",
                     s.axis == Axis::Rows ? "row" : "column", " (got ", s.steps.size(), ")");
      if (!(s.steps >= 0.0).all() || !s.steps.isFinite().all())
        detail::fail("rankwise::AdamW", "restore: the step counts of '", name, "' must be finite and >= 0");
    }
    m_state.swap(states);
    m_step = step_count;
  }

 private:
  using Block = Eigen::Block<Matrix<Scalar>>;

  /// The block this step may change. A window along the other axis than the state's step counts
  /// turns them to that axis, which is possible while every slice has the same count.
  detail::StepBlock window_block(const Parameter<Scalar>& p, State& s) {
    const detail::StepBlock b = detail::step_block(p, "rankwise::AdamW");
    if (p.update_window && p.update_window->axis != s.axis) {
      if (s.steps.size() > 0 && (s.steps != s.steps(0)).any())
        detail::fail<StateError>("rankwise::AdamW", "'", p.name,
                                 "' was trained by slices along both axes; per-slice step counts cannot follow");
      const double t = s.steps.size() ? s.steps(0) : 0.0;
      s.axis = p.update_window->axis;
      s.steps.setConstant(s.axis == Axis::Rows ? s.m.rows() : s.m.cols(), t);
    }
    return b;
  }

  State& state(const Parameter<Scalar>& p) {
    auto [it, inserted] = m_state.try_emplace(p.name);
    State& s = it->second;
    if (inserted) {
      s.m.setZero(p.value.rows(), p.value.cols());
      s.v.setZero(p.value.rows(), p.value.cols());
      s.steps.setZero(p.value.rows());
    }
    if (s.m.rows() != p.value.rows() || s.m.cols() != p.value.cols())
      detail::fail<StateError>("rankwise::AdamW", "the state of '", p.name, "' is ", s.m.rows(), " x ", s.m.cols(),
                               " but the parameter is ", p.value.rows(), " x ", p.value.cols(),
                               "; call follow() with the RankChange of the surgery");
    if (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols())
      detail::fail<StateError>("rankwise::AdamW", "the gradient of '", p.name,
                               "' does not match its value; call zero_grad()");
    return s;
  }

  const Parameter<Scalar>* find_parameter(const std::string& name) const {
    for (const ParameterGroup<Scalar>& group : m_groups)
      for (const Parameter<Scalar>* p : group.parameters)
        if (p->name == name) return p;
    return nullptr;
  }

  void update_per_slice(Parameter<Scalar>& p, const State& s, double lr, Scalar eps, Index begin, Index end) {
    for (Index k = begin; k < end; ++k) {
      const double t = s.steps(k);
      const Scalar step_size = Scalar(lr / (1.0 - std::pow(m_options.beta1, t)));
      const Scalar inv_sqrt_c2 = Scalar(1.0 / std::sqrt(1.0 - std::pow(m_options.beta2, t)));
      if (s.axis == Axis::Rows)
        p.value.row(k).array() -=
            step_size * s.m.row(k).array() / ((s.v.row(k).array().sqrt() * inv_sqrt_c2) + eps);
      else
        p.value.col(k).array() -=
            step_size * s.m.col(k).array() / ((s.v.col(k).array().sqrt() * inv_sqrt_c2) + eps);
    }
  }

  AdamWOptions m_options;
  std::vector<ParameterGroup<Scalar>> m_groups;
  std::unordered_map<std::string, State> m_state;
  double m_lr_factor = 1.0;
  long m_step = 0;
};

static_assert(Optimizer<AdamW<float>>, "AdamW must model the Optimizer contract");

}  // namespace rankwise
