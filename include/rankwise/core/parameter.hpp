#pragma once
/// \file rankwise/core/parameter.hpp
/// Parameter: a named tensor with its gradient and a trainable flag; and SliceChange, the record
/// an adapter returns when rank surgery changes a parameter's shape, so that an optimizer can
/// slice its state the same way.
///
/// Vectors (biases, scale vectors) are stored as `n x 1` matrices with `is_vector` set; files
/// store them as 1-D tensors. `name` is the full key of the tensor inside its model, e.g.
/// "layers.0.attn.q_proj.lora_A.weight"; optimizer state is keyed by it, never by address.
/// An update window marks the only slices a step trains (DyLoRA's frozen components, ERAT's
/// window): backward leaves the other slices' gradient at zero, and optimizers leave their values
/// and their state bit for bit as they were (no momentum, no weight decay, no step count).
/// Docs: docs/concepts/layer.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/types.hpp>

#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace rankwise {

/// Which axis of a parameter a rank change (or an update window) slices: A's rows, B's columns.
enum class Axis { Rows, Cols };

/// The slices [begin, end) along `axis` that the next optimizer steps may change; the others are
/// frozen for now. begin == end trains nothing.
struct UpdateWindow {
  Axis axis = Axis::Rows;
  Index begin = 0;
  Index end = 0;
};

template <FloatScalar Scalar_>
struct Parameter {
  using Scalar = Scalar_;

  std::string name;
  Matrix<Scalar> value;
  Matrix<Scalar> grad;  ///< same shape as value; backward() accumulates into it
  bool trainable = true;
  bool is_vector = false;  ///< a 1-D tensor stored as a column
  std::optional<UpdateWindow> update_window = std::nullopt;  ///< unset: every slice is trained

  /// grad = 0 with value's shape (allocates only when the shape changed). A frozen parameter keeps no
  /// gradient storage at all: its grad becomes empty, which is what frozen weights cost nothing for.
  void zero_grad() {
    if (trainable)
      grad.setZero(value.rows(), value.cols());
    else
      grad.resize(0, 0);
  }
  Index size() const { return value.size(); }

  /// Whether backward() should accumulate into grad: true for a trainable parameter, whose grad must
  /// then have value's shape (StateError otherwise: a parameter made trainable needs zero_grad()).
  bool wants_grad() const {
    if (!trainable) return false;
    if (grad.rows() != value.rows() || grad.cols() != value.cols())
      detail::fail<StateError>("rankwise::Parameter", "'", name, "' is trainable but its gradient is ", grad.rows(),
                               " x ", grad.cols(), " instead of ", value.rows(), " x ", value.cols(),
                               "; call zero_grad() after making it trainable or changing its shape");
    return true;
  }
};

/// What assign_values() accepts.
struct AssignOptions {
  bool require_all = false;       ///< every parameter must be given a value
  bool allow_non_finite = false;  ///< accept NaN and infinite values (refused by default)
};

/// The one way to set parameter values from outside: `values` maps parameter names (Parameter::name,
/// e.g. "layers.0.attn.q_proj.lora_A.weight") to matrices of the parameter's shape (a vector
/// parameter of n entries is n x 1, as a 1-D safetensors tensor reads). All or nothing: an unknown
/// name, a wrong shape, a non-finite value or (with require_all) a missing parameter throws
/// InvalidArgument naming it, and no value changes. Gradients and optimizer state are left as they
/// are. Throws InvalidArgument when two parameters share a name.
template <FloatScalar Scalar>
void assign_values(const std::vector<Parameter<Scalar>*>& params, const std::map<std::string, Matrix<Scalar>>& values,
                   const AssignOptions& options = {}) {
  const char* where = "rankwise::assign_values";
  std::map<std::string, Parameter<Scalar>*> by_name;
  for (Parameter<Scalar>* p : params) {
    if (p == nullptr) detail::fail(where, "a parameter pointer is null");
    if (!by_name.emplace(p->name, p).second)
      detail::fail(where, "two parameters are named '", p->name, "'; give modules distinct paths (set_path())");
  }
  for (const auto& [name, value] : values) {
    const auto it = by_name.find(name);
    if (it == by_name.end()) {
      std::string known;
      std::size_t listed = 0;
      for (const auto& [n, p] : by_name) {
        if (listed++ == 8) {
          known += ", ...";
          break;
        }
        known += (known.empty() ? "" : ", ") + n;
      }
      detail::fail(where, "no parameter is named '", name, "' (", by_name.size(), " parameters: ", known, ")");
    }
    const Parameter<Scalar>& p = *it->second;
    if (value.rows() != p.value.rows() || value.cols() != p.value.cols())
      detail::fail(where, "'", name, "' is ", p.value.rows(), " x ", p.value.cols(), " but the value given is ",
                   value.rows(), " x ", value.cols());
    if (!options.allow_non_finite && !value.allFinite())
      detail::fail(where, "the value given for '", name,
                   "' is not finite everywhere (AssignOptions::allow_non_finite accepts it)");
  }
  if (options.require_all)
    for (const auto& [name, p] : by_name)
      if (!values.count(name)) detail::fail(where, "no value is given for '", name, "' (require_all is set)");
  for (const auto& [name, value] : values) by_name.at(name)->value = value;
}

/// How one parameter changed shape along `axis`: the old slices in `kept` survive, in that order,
/// then `added` fresh slices follow. Optimizers keep the state of kept slices and start added ones
/// from zero.
struct SliceChange {
  std::string parameter;   ///< Parameter::name of the changed tensor
  Axis axis = Axis::Rows;
  Index old_count = 0;     ///< number of slices along axis before the change
  std::vector<Index> kept; ///< old indices that survive, ascending
  Index added = 0;         ///< fresh slices appended after the kept ones
};

/// Everything one surgery call changed (usually A's rows and B's columns together).
struct RankChange {
  std::vector<SliceChange> changes;
};

}  // namespace rankwise
