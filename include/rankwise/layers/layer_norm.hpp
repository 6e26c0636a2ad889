#pragma once
/// \file rankwise/layers/layer_norm.hpp
/// LayerNorm over the features of each token (Ba, Kiros & Hinton, 2016, arXiv:1607.06450), as
/// PyTorch's nn.LayerNorm(d):
///
///   mu = mean(x_:,t)   var = mean((x_:,t - mu)^2)   xhat = (x - mu) / sqrt(var + eps)
///   y = gamma ⊙ xhat + beta
///   shapes  x, y: d x n; gamma ("weight"), beta ("bias"): d; init gamma = 1, beta = 0
///   grads   dgamma += rowsum(dy ⊙ xhat), dbeta += rowsum(dy),
///           dx = (g - mean(g) - xhat ⊙ mean(g ⊙ xhat)) / sqrt(var + eps),  g = gamma ⊙ dy
/// Statistics are computed in the layer's scalar with a two-pass mean/variance.
/// Docs: docs/layers/layer-norm.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parallel.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace rankwise {

struct LayerNormOptions {
  double eps = 1e-5;
  bool trainable = true;
};

template <FloatScalar Scalar_>
class LayerNorm {
 public:
  using Scalar = Scalar_;
  using MatrixType = Matrix<Scalar>;

  explicit LayerNorm(Index features, const LayerNormOptions& options = {}) : m_eps(options.eps) {
    if (features < 1) detail::fail("rankwise::LayerNorm", "features must be >= 1 (got ", features, ")");
    if (!(options.eps > 0.0) || !std::isfinite(options.eps))
      detail::fail("rankwise::LayerNorm", "eps must be a finite number > 0 (got ", options.eps, ")");
    m_gamma = {"weight", MatrixType::Ones(features, 1), MatrixType::Zero(features, 1), options.trainable, true};
    m_beta = {"bias", MatrixType::Zero(features, 1), MatrixType::Zero(features, 1), options.trainable, true};
  }

  Index in_features() const { return m_gamma.value.rows(); }
  Index out_features() const { return m_gamma.value.rows(); }
  void set_training(bool training) { m_training = training; }
  bool is_training() const { return m_training; }
  void set_trainable(bool trainable) {
    m_gamma.trainable = m_beta.trainable = trainable;
    zero_grad();
  }
  void set_path(const std::string& path) {
    m_gamma.name = path.empty() ? std::string("weight") : path + ".weight";
    m_beta.name = path.empty() ? std::string("bias") : path + ".bias";
  }
  Parameter<Scalar>& gamma() { return m_gamma; }
  Parameter<Scalar>& beta() { return m_beta; }

  void forward(const ConstRef<Scalar>& x, MatrixType& y) {
    if (x.rows() != in_features())
      detail::fail("rankwise::LayerNorm", "forward: input must have ", in_features(), " rows (got ", x.rows(),
                   " x ", x.cols(), ")");
    const Index d = x.rows(), n = x.cols();
    m_xhat.resize(d, n);
    m_inv_std.resize(n);
    y.resize(d, n);
    detail::parallel_blocks(n, 64, [&](Index c, Index w) {  // column blocks (core/parallel.hpp)
      for (Index t = c; t < c + w; ++t) {
        const Scalar mu = x.col(t).mean();
        m_xhat.col(t) = x.col(t).array() - mu;
        const Scalar var = m_xhat.col(t).squaredNorm() / Scalar(d);
        m_inv_std(t) = Scalar(1) / std::sqrt(var + Scalar(m_eps));
        m_xhat.col(t) *= m_inv_std(t);
      }
      y.middleCols(c, w).array() =
          (m_xhat.middleCols(c, w).array().colwise() * m_gamma.value.col(0).array()).colwise() +
          m_beta.value.col(0).array();
    });
    m_cached_cols = m_training ? n : -1;
  }

  void backward(const ConstRef<Scalar>& dy, MatrixType& dx) {
    if (m_cached_cols < 0)
      detail::fail<StateError>("rankwise::LayerNorm", "backward() needs a forward() in training mode first");
    if (dy.rows() != in_features() || dy.cols() != m_cached_cols)
      detail::fail("rankwise::LayerNorm", "backward: dy must be ", in_features(), " x ", m_cached_cols, " (got ",
                   dy.rows(), " x ", dy.cols(), ")");
    const Index d = dy.rows(), n = dy.cols();
    if (m_gamma.wants_grad()) m_gamma.grad.col(0) += (dy.array() * m_xhat.array()).rowwise().sum().matrix();
    if (m_beta.wants_grad()) m_beta.grad.col(0) += dy.rowwise().sum();
    dx.resize(d, n);
    const Scalar inv_d = Scalar(1) / Scalar(d);
    detail::parallel_blocks(n, 64, [&](Index c, Index w) {
      for (Index t = c; t < c + w; ++t) {
        // g = gamma ⊙ dy, written straight into dx's column.
        dx.col(t).array() = m_gamma.value.col(0).array() * dy.col(t).array();
        const Scalar mean_g = dx.col(t).sum() * inv_d;
        const Scalar mean_gx = dx.col(t).dot(m_xhat.col(t)) * inv_d;
        dx.col(t).array() = (dx.col(t).array() - mean_g - m_xhat.col(t).array() * mean_gx) * m_inv_std(t);
      }
    });
  }

  std::vector<Parameter<Scalar>*> parameters() { return {&m_gamma, &m_beta}; }
  void zero_grad() {
    m_gamma.zero_grad();
    m_beta.zero_grad();
  }

 private:
  double m_eps;
  Parameter<Scalar> m_gamma;
  Parameter<Scalar> m_beta;
  bool m_training = true;
  Index m_cached_cols = -1;
  MatrixType m_xhat;
  Vector<Scalar> m_inv_std;
};

}  // namespace rankwise
