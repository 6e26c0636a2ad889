#pragma once
/// \file rankwise/optim/sgd.hpp
/// SGD with momentum (PyTorch's torch.optim.SGD with dampening 0).
///
///   g' = grad + wd p                    (coupled L2 weight decay, as PyTorch)
///   v  = mu v + g'  (v = g' on the first step)
///   p  = p - lr (nesterov ? g' + mu v : v)
/// State (v) is keyed by parameter name; follow() slices it like rank surgery sliced the parameter,
/// and fresh slices start at v = 0, which makes their first step v = g' as for a fresh parameter.
/// Docs: docs/optim/sgd.md

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

struct SGDOptions {
  double lr = 1e-2;
  double momentum = 0.0;      ///< mu in [0, 1)
  double weight_decay = 0.0;  ///< default for groups that set none
  bool nesterov = false;      ///< needs momentum > 0
};

template <FloatScalar Scalar_>
class SGD {
 public:
  using Scalar = Scalar_;

  SGD(std::vector<Parameter<Scalar>*> parameters, const SGDOptions& options)
      : SGD(std::vector<ParameterGroup<Scalar>>{ParameterGroup<Scalar>{std::move(parameters), {}, {}, "default"}},
            options) {}

  SGD(std::vector<ParameterGroup<Scalar>> groups, const SGDOptions& options) : m_options(options) {
    if (!(options.momentum >= 0.0 && options.momentum < 1.0))
      detail::fail("rankwise::SGD", "momentum must be in [0, 1) (got ", options.momentum, ")");
    if (options.nesterov && options.momentum == 0.0)
      detail::fail("rankwise::SGD", "nesterov needs momentum > 0 (got momentum 0)");
    m_groups = detail::checked_groups("rankwise::SGD", std::move(groups), options.lr, options.weight_decay);
  }

  /// One update of every trainable parameter from its gradient.
  void step() {
    ++m_step;
    const Scalar mu = Scalar(m_options.momentum);
    for (ParameterGroup<Scalar>& group : m_groups) {
      const Scalar lr = Scalar(*group.lr * m_lr_factor);
      const Scalar wd = Scalar(*group.weight_decay);
      for (Parameter<Scalar>* p : group.parameters) {
        if (!p->trainable) continue;
        check_shapes(*p);
        // The whole tensor, or only the slices of its update window: the rest is left bit for bit.
        const detail::StepBlock b = detail::step_block(*p, "rankwise::SGD");
        Block value = p->value.block(b.row, b.col, b.rows, b.cols);
        const Block grad = p->grad.block(b.row, b.col, b.rows, b.cols);
        if (m_options.momentum == 0.0) {
          if (b.empty()) continue;
          if (wd != Scalar(0))
            value -= lr * (grad + wd * value);
          else
            value -= lr * grad;
          continue;
        }
        Matrix<Scalar>& velocity_matrix = velocity(*p);
        if (b.empty()) continue;
        Block v = velocity_matrix.block(b.row, b.col, b.rows, b.cols);
        if (wd != Scalar(0))
          v = mu * v + (grad + wd * value);
        else
          v = mu * v + grad;
        if (m_options.nesterov)
          value -= lr * ((grad + wd * value) + mu * v);
        else
          value -= lr * v;
      }
    }
  }

  /// Multiplies every group's lr (set it from an LRSchedule before step()).
  void set_lr_factor(double factor) {
    if (!(factor >= 0.0) || !std::isfinite(factor))
      detail::fail("rankwise::SGD", "lr factor must be a finite number >= 0 (got ", factor, ")");
    m_lr_factor = factor;
  }
  double lr_factor() const { return m_lr_factor; }
  long step_count() const { return m_step; }
  const std::vector<ParameterGroup<Scalar>>& groups() const { return m_groups; }
  const SGDOptions& options() const { return m_options; }

  /// Slices the momentum of the changed parameters as the surgery sliced them.
  void follow(const RankChange& change) {
    for (const SliceChange& c : change.changes) {
      auto it = m_velocity.find(c.parameter);
      if (it != m_velocity.end()) detail::slice_state(it->second, c, "rankwise::SGD");
    }
  }

  /// The momentum buffer of a parameter, or nullptr before its first step.
  const Matrix<Scalar>* velocity_of(const std::string& name) const {
    auto it = m_velocity.find(name);
    return it == m_velocity.end() ? nullptr : &it->second;
  }

  /// Every momentum buffer, keyed by parameter name (for checkpoints).
  const std::unordered_map<std::string, Matrix<Scalar>>& velocities() const { return m_velocity; }

  /// Puts back what step_count() and velocities() returned (checkpoints). Each buffer must belong to a
  /// parameter of the groups and match its current shape. Strong guarantee: on error nothing changes.
  void restore(long step_count, std::unordered_map<std::string, Matrix<Scalar>> velocities) {
    if (step_count < 0) detail::fail("rankwise::SGD", "restore: step count must be >= 0 (got ", step_count, ")");
    for (const auto& [name, v] : velocities) {
      const Parameter<Scalar>* p = find_parameter(name);
      if (p == nullptr)
        detail::fail("rankwise::SGD", "restore: momentum for '", name, "', which is not a parameter of this optimizer");
      if (v.rows() != p->value.rows() || v.cols() != p->value.cols())
        detail::fail("rankwise::SGD", "restore: the momentum of '", name, "' must be ", p->value.rows(), " x ",
                     p->value.cols(), " like the parameter (got ", v.rows(), " x ", v.cols(), ")");
    }
    m_velocity.swap(velocities);
    m_step = step_count;
  }

 private:
  using Block = Eigen::Block<Matrix<Scalar>>;

  Matrix<Scalar>& velocity(const Parameter<Scalar>& p) {
    auto [it, inserted] = m_velocity.try_emplace(p.name);
    if (inserted) it->second.setZero(p.value.rows(), p.value.cols());
    if (it->second.rows() != p.value.rows() || it->second.cols() != p.value.cols())
      detail::fail<StateError>("rankwise::SGD", "the state of '", p.name, "' is ", it->second.rows(), " x ",
                               it->second.cols(), " but the parameter is ", p.value.rows(), " x ", p.value.cols(),
                               "; call follow() with the RankChange of the surgery");
    return it->second;
  }

  const Parameter<Scalar>* find_parameter(const std::string& name) const {
    for (const ParameterGroup<Scalar>& group : m_groups)
      for (const Parameter<Scalar>* p : group.parameters)
        if (p->name == name) return p;
    return nullptr;
  }

  static void check_shapes(const Parameter<Scalar>& p) {
    if (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols())
      detail::fail<StateError>("rankwise::SGD", "the gradient of '", p.name, "' does not match its value; call zero_grad()");
  }

  SGDOptions m_options;
  std::vector<ParameterGroup<Scalar>> m_groups;
  std::unordered_map<std::string, Matrix<Scalar>> m_velocity;
  double m_lr_factor = 1.0;
  long m_step = 0;
};

static_assert(Optimizer<SGD<float>>, "SGD must model the Optimizer contract");

}  // namespace rankwise
