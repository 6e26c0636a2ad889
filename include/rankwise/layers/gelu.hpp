#pragma once
/// \file rankwise/layers/gelu.hpp
/// GELU activation (Hendrycks & Gimpel, 2016, arXiv:1606.08415), exact form as PyTorch's nn.GELU():
///   y = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2
///   dy/dx = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
/// Elementwise, any shape; no parameters. In training mode forward() keeps dy/dx (not x), computed
/// while Phi(x) is at hand, so that backward() is one product and the caller may reuse x's buffer.
/// Docs: docs/layers/activations.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parallel.hpp>
#include <rankwise/core/types.hpp>

#include <unsupported/Eigen/SpecialFunctions>  // vectorised erf (Eigen's own module, shipped with it)

#include <cmath>
#include <numbers>
#include <vector>

namespace rankwise {

template <FloatScalar Scalar_>
class GELU {
 public:
  using Scalar = Scalar_;
  using MatrixType = Matrix<Scalar>;

  explicit GELU(Index features) : m_features(features) {
    if (features < 1) detail::fail("rankwise::GELU", "features must be >= 1 (got ", features, ")");
  }

  Index in_features() const { return m_features; }
  Index out_features() const { return m_features; }
  void set_training(bool training) { m_training = training; }
  bool is_training() const { return m_training; }

  void forward(const ConstRef<Scalar>& x, MatrixType& y) {
    if (x.rows() != m_features)
      detail::fail("rankwise::GELU", "forward: input must have ", m_features, " rows (got ", x.rows(), ")");
    y.resize(x.rows(), x.cols());
    const Scalar inv_sqrt2 = Scalar(1.0 / std::numbers::sqrt2);
    m_cached = m_training;
    if (!m_training) {
      m_dydx.resize(0, 0);
      detail::parallel_blocks(x.cols(), 64, [&](Index c, Index w) {  // column blocks (core/parallel.hpp)
        const auto in = x.middleCols(c, w).array();
        y.middleCols(c, w).array() = in * (Scalar(1) + (in * inv_sqrt2).erf()) * Scalar(0.5);
      });
      return;
    }
    const Scalar inv_sqrt2pi = Scalar(1.0 / std::sqrt(2.0 * std::numbers::pi));
    m_dydx.resize(x.rows(), x.cols());
    detail::parallel_blocks(x.cols(), 64, [&](Index c, Index w) {
      const auto in = x.middleCols(c, w).array();
      auto dydx = m_dydx.middleCols(c, w).array();
      dydx = (Scalar(1) + (in * inv_sqrt2).erf()) * Scalar(0.5);  // Phi(x)
      y.middleCols(c, w).array() = in * dydx;
      dydx += in * (in.square() * Scalar(-0.5)).exp() * inv_sqrt2pi;
    });
  }

  void backward(const ConstRef<Scalar>& dy, MatrixType& dx) {
    if (!m_cached) detail::fail<StateError>("rankwise::GELU", "backward() needs a forward() in training mode first");
    if (dy.rows() != m_dydx.rows() || dy.cols() != m_dydx.cols())
      detail::fail("rankwise::GELU", "backward: dy must be ", m_dydx.rows(), " x ", m_dydx.cols(), " (got ",
                   dy.rows(), " x ", dy.cols(), ")");
    dx.resize(dy.rows(), dy.cols());
    detail::parallel_blocks(dy.cols(), 64, [&](Index c, Index w) {
      dx.middleCols(c, w).array() = dy.middleCols(c, w).array() * m_dydx.middleCols(c, w).array();
    });
  }

  std::vector<Parameter<Scalar>*> parameters() { return {}; }
  void zero_grad() {}

 private:
  Index m_features;
  bool m_training = true;
  bool m_cached = false;
  MatrixType m_dydx;  // dy/dx at the input of the last training forward
};

}  // namespace rankwise
