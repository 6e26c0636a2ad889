#pragma once
/// \file rankwise/optim/optimizer.hpp
/// What every rankwise optimizer shares: parameter groups with their own learning rate and weight
/// decay, a learning-rate factor set by a schedule, state keyed by Parameter::name (never by address),
/// and follow(RankChange), which slices the state exactly as rank surgery sliced the parameter.
///
///   effective lr of a group = group.lr * lr_factor()
/// Parameters must outlive the optimizer and stay at the same address (hold adapters in stable
/// storage); their shapes may change only through surgery that the optimizer is told to follow().
/// A parameter with an update window is stepped on that window only: the slices outside keep their
/// value and their optimizer state bit for bit (see Parameter::update_window).
/// Docs: docs/concepts/optimizer.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>

#include <cmath>
#include <concepts>
#include <optional>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace rankwise {

/// Parameters that share a learning rate and weight decay. Unset values take the optimizer's.
template <FloatScalar Scalar>
struct ParameterGroup {
  std::vector<Parameter<Scalar>*> parameters;
  std::optional<double> lr;
  std::optional<double> weight_decay;
  std::string name;  ///< for reports and checkpoints
};

/// The Optimizer contract (docs/concepts/optimizer.md).
template <typename O>
concept Optimizer = requires(O& opt, const O& copt, const RankChange& change, double factor) {
  opt.step();
  opt.set_lr_factor(factor);
  { copt.lr_factor() } -> std::convertible_to<double>;
  opt.follow(change);
  { copt.step_count() } -> std::convertible_to<long>;
};

namespace detail {

/// Validated groups: every parameter non-null, names non-empty and unique, rates in range.
template <FloatScalar Scalar>
std::vector<ParameterGroup<Scalar>> checked_groups(const char* where, std::vector<ParameterGroup<Scalar>> groups,
                                                   double default_lr, double default_wd) {
  if (!(default_lr > 0.0) || !std::isfinite(default_lr))
    fail(where, "lr must be a finite number > 0 (got ", default_lr, ")");
  if (!(default_wd >= 0.0) || !std::isfinite(default_wd))
    fail(where, "weight_decay must be a finite number >= 0 (got ", default_wd, ")");
  std::unordered_set<std::string> names;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    ParameterGroup<Scalar>& group = groups[g];
    if (!group.lr) group.lr = default_lr;
    if (!group.weight_decay) group.weight_decay = default_wd;
    if (!(*group.lr > 0.0) || !std::isfinite(*group.lr))
      fail(where, "lr of group ", g, " ('", group.name, "') must be a finite number > 0 (got ", *group.lr, ")");
    if (!(*group.weight_decay >= 0.0) || !std::isfinite(*group.weight_decay))
      fail(where, "weight_decay of group ", g, " ('", group.name, "') must be >= 0 (got ", *group.weight_decay,
           ")");
    for (Parameter<Scalar>* p : group.parameters) {
      if (p == nullptr) fail(where, "group ", g, " ('", group.name, "') holds a null parameter");
      if (p->name.empty()) fail(where, "every parameter needs a name: state is keyed by it (group ", g, ")");
      if (!names.insert(p->name).second)
        fail(where, "parameter names must be unique, since state is keyed by them (got '", p->name,
             "' twice; give modules distinct paths with set_path())");
    }
  }
  return groups;
}

/// The block of a parameter that a step may change: all of it, or the slices of its update window.
struct StepBlock {
  Index row = 0;
  Index col = 0;
  Index rows = 0;
  Index cols = 0;
  bool empty() const { return rows == 0 || cols == 0; }
};

template <FloatScalar Scalar>
StepBlock step_block(const Parameter<Scalar>& p, const char* where) {
  if (!p.update_window) return {0, 0, p.value.rows(), p.value.cols()};
  const UpdateWindow& w = *p.update_window;
  const bool rows = w.axis == Axis::Rows;
  const Index extent = rows ? p.value.rows() : p.value.cols();
  if (w.begin < 0 || w.begin > w.end || w.end > extent)
    fail(where, "the update window of '", p.name, "' must satisfy 0 <= begin <= end <= ", extent, " (got [",
         w.begin, ", ", w.end, "))");
  return rows ? StepBlock{w.begin, 0, w.end - w.begin, p.value.cols()}
              : StepBlock{0, w.begin, p.value.rows(), w.end - w.begin};
}

/// Applies a SliceChange to a state tensor: kept slices in order, then `added` zero slices.
template <typename Derived>
void slice_state(Eigen::PlainObjectBase<Derived>& state, const SliceChange& change, const char* where) {
  using Plain = typename Derived::PlainObject;
  const bool rows = change.axis == Axis::Rows;
  const Index extent = rows ? state.rows() : state.cols();
  if (extent != change.old_count)
    fail(where, "follow: the state of '", change.parameter, "' has ", extent,
         " slices but the change starts from ", change.old_count);
  const Index k = Index(change.kept.size());
  const Index n = k + change.added;
  Plain out = rows ? Plain::Zero(n, state.cols()) : Plain::Zero(state.rows(), n);
  for (Index j = 0; j < k; ++j) {
    const Index i = change.kept[static_cast<std::size_t>(j)];
    if (i < 0 || i >= extent) fail(where, "follow: kept index ", i, " is outside [0, ", extent, ")");
    if (rows)
      out.row(j) = state.row(i);
    else
      out.col(j) = state.col(i);
  }
  state.derived().swap(out);
}

}  // namespace detail
}  // namespace rankwise
