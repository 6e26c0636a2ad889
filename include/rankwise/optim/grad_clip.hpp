#pragma once
/// \file rankwise/optim/grad_clip.hpp
/// Global gradient-norm clipping (PyTorch's clip_grad_norm_):
///   norm = sqrt(sum over trainable parameters of ||grad||^2)   (accumulated in double)
///   if norm > max_norm: every grad *= max_norm / (norm + 1e-6)
/// A NaN or infinite norm changes nothing and is reported as Status::NonFinite, so the caller can
/// skip the step. Docs: docs/optim/grad-clip.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>

#include <cmath>
#include <vector>

namespace rankwise {

struct ClipResult {
  double norm = 0.0;     ///< the global norm before clipping
  bool clipped = false;  ///< true when the gradients were scaled down
  Status status = Status::Ok;
};

/// The global L2 norm of the trainable gradients, in double.
template <FloatScalar Scalar>
double gradient_norm(const std::vector<Parameter<Scalar>*>& params) {
  double sum = 0.0;
  for (const Parameter<Scalar>* p : params) {
    if (!p->trainable) continue;
    const Scalar* g = p->grad.data();
    for (Index i = 0; i < p->grad.size(); ++i) sum += double(g[i]) * double(g[i]);
  }
  return std::sqrt(sum);
}

template <FloatScalar Scalar>
ClipResult clip_grad_norm(const std::vector<Parameter<Scalar>*>& params, double max_norm) {
  if (!(max_norm > 0.0) || !std::isfinite(max_norm))
    detail::fail("rankwise::clip_grad_norm", "max_norm must be a finite number > 0 (got ", max_norm, ")");
  ClipResult result;
  result.norm = gradient_norm(params);
  if (!std::isfinite(result.norm)) {
    result.status = Status::NonFinite;
    return result;
  }
  if (result.norm > max_norm) {
    const Scalar factor = Scalar(max_norm / (result.norm + 1e-6));
    for (Parameter<Scalar>* p : params)
      if (p->trainable) p->grad *= factor;
    result.clipped = true;
  }
  return result;
}

}  // namespace rankwise
