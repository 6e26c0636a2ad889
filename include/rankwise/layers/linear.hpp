#pragma once
/// \file rankwise/layers/linear.hpp
/// Linear: the dense layer y = W x + b (PyTorch's nn.Linear), frozen or trainable.
///
///   shapes  x: in x n, W: out x in ("weight"), b: out ("bias", optional), y: out x n
///   init    W, b ~ U(-1/sqrt(in), 1/sqrt(in))  (PyTorch's kaiming_uniform(a = sqrt(5)))
///   grads   dW += dy x^T, db += rowsum(dy) (only when trainable), dx = W^T dy
/// A frozen layer keeps no copy of its input: its backward needs only W. forward_borrowed(x, y) keeps a
/// reference to the caller's x instead of a copy (x must outlive backward(), unchanged).
/// Docs: docs/layers/linear.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/init.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parallel.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

struct LinearOptions {
  bool bias = true;       ///< add a bias vector
  bool trainable = true;  ///< false: a frozen layer whose backward only propagates dx
};

template <FloatScalar Scalar_>
class Linear {
 public:
  using Scalar = Scalar_;
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;

  /// A fresh layer initialised like PyTorch's nn.Linear.
  Linear(Index in_features, Index out_features, Random& rng, const LinearOptions& options = {}) {
    if (in_features < 1 || out_features < 1)
      detail::fail("rankwise::Linear", "in_features and out_features must be >= 1 (got ", in_features, ", ",
                   out_features, ")");
    const double bound = kaiming_uniform_bound(in_features);
    m_weight.value.resize(out_features, in_features);
    fill_uniform(m_weight.value, -bound, bound, rng);
    if (options.bias) {
      m_bias.value.resize(out_features, 1);
      fill_uniform(m_bias.value, -bound, bound, rng);
    }
    init(options.bias, options.trainable);
  }

  /// A layer with the given weights (out x in) and optional bias (out).
  explicit Linear(MatrixType weight, std::optional<VectorType> bias = std::nullopt, bool trainable = true) {
    if (weight.rows() < 1 || weight.cols() < 1)
      detail::fail("rankwise::Linear", "weight must be at least 1 x 1 (got ", weight.rows(), " x ", weight.cols(),
                   ")");
    if (bias && bias->size() != weight.rows())
      detail::fail("rankwise::Linear", "bias must have out_features = ", weight.rows(), " entries (got ",
                   bias->size(), ")");
    m_weight.value = std::move(weight);
    if (bias) m_bias.value = std::move(*bias);
    init(bias.has_value(), trainable);
  }

  Index in_features() const { return m_weight.value.cols(); }
  Index out_features() const { return m_weight.value.rows(); }
  bool has_bias() const { return m_has_bias; }
  bool is_trainable() const { return m_weight.trainable; }

  /// Freezes or unfreezes the weight and bias together.
  void set_trainable(bool trainable) {
    m_weight.trainable = trainable;
    m_bias.trainable = trainable && m_has_bias;
    if (!trainable) {
      m_x.resize(0, 0);
      m_borrowed_x = nullptr;
    }
    zero_grad();
  }

  const MatrixType& weight() const { return m_weight.value; }
  /// The bias as an out x 1 column (0 x 1 when the layer has none).
  const MatrixType& bias() const { return m_bias.value; }
  Parameter<Scalar>& weight_parameter() { return m_weight; }
  Parameter<Scalar>& bias_parameter() { return m_bias; }

  void set_training(bool training) { m_training = training; }
  bool is_training() const { return m_training; }

  /// Prefixes parameter names with the module path: "<path>.weight", "<path>.bias".
  void set_path(const std::string& path) {
    m_weight.name = join(path, "weight");
    m_bias.name = join(path, "bias");
  }

  /// y = W x + b. In training mode a trainable layer keeps a copy of x for backward().
  void forward(const ConstRef<Scalar>& x, MatrixType& y) {
    compute(x, y);
    if (m_training && m_weight.trainable) {
      m_x = x;
      m_borrowed_x = nullptr;
    }
  }

  /// Like forward(), but a trainable layer keeps a reference to x instead of a copy: x must stay alive
  /// and unchanged until backward() (a model's own activation buffer). Saves one copy of the input.
  void forward_borrowed(const MatrixType& x, MatrixType& y) {
    compute(x, y);
    if (m_training && m_weight.trainable) {
      m_borrowed_x = &x;
      m_x.resize(0, 0);
    }
  }
  void forward_borrowed(const MatrixType&&, MatrixType&) = delete;  // a temporary would dangle

  /// Requires forward() in training mode on the same batch. Accumulates dW, db; assigns dx = W^T dy.
  void backward(const ConstRef<Scalar>& dy, MatrixType& dx) {
    backward_parameters_only(dy);
    dx.resize(in_features(), dy.cols());
    detail::parallel_blocks(dy.cols(), 128, [&](Index c, Index w) {
      dx.middleCols(c, w).noalias() = m_weight.value.transpose() * dy.middleCols(c, w);
    });
  }

  /// Like backward(), for callers that do not need dx (the first layer of a model).
  void backward_parameters_only(const ConstRef<Scalar>& dy) {
    check_backward(dy);
    if (m_weight.wants_grad()) {
      const MatrixType& x = m_borrowed_x ? *m_borrowed_x : m_x;
      if (x.cols() != dy.cols() || x.rows() != in_features())
        detail::fail<StateError>("rankwise::Linear", "backward: the input of forward() is gone (the layer was made "
                                 "trainable after its forward(), or a borrowed input changed shape)");
      // Row blocks of dW: each sums over the whole batch, so no reduction is needed.
      detail::parallel_blocks(out_features(), 32, [&](Index r, Index h) {
        m_weight.grad.middleRows(r, h).noalias() += dy.middleRows(r, h) * x.transpose();
      });
    }
    if (m_has_bias && m_bias.wants_grad()) m_bias.grad.col(0) += dy.rowwise().sum();
  }

  /// The weight and, when present, the bias (frozen ones included, flagged as such).
  std::vector<Parameter<Scalar>*> parameters() {
    if (m_has_bias) return {&m_weight, &m_bias};
    return {&m_weight};
  }

  void zero_grad() {
    m_weight.zero_grad();
    m_bias.zero_grad();
  }

  Index parameter_count() const { return m_weight.value.size() + m_bias.value.size(); }

  /// Replaces the weights (same shapes) — used by merge()/unmerge() of adapters.
  void assign_weight(const ConstRef<Scalar>& weight) {
    if (weight.rows() != out_features() || weight.cols() != in_features())
      detail::fail("rankwise::Linear::assign_weight", "weight must be ", out_features(), " x ", in_features(),
                   " (got ", weight.rows(), " x ", weight.cols(), ")");
    m_weight.value = weight;
  }

  /// Adds a bias (zero-initialised) to a layer that has none; a no-op otherwise.
  void ensure_bias() {
    if (m_has_bias) return;
    m_has_bias = true;
    m_bias.value.setZero(out_features(), 1);
    m_bias.trainable = m_weight.trainable;
    m_bias.zero_grad();
  }

  /// Replaces the bias (out entries); adds one when the layer had none.
  void assign_bias(const ConstRef<Scalar>& bias) {
    if (bias.rows() != out_features() || bias.cols() != 1)
      detail::fail("rankwise::Linear::assign_bias", "bias must be ", out_features(), " x 1 (got ", bias.rows(),
                   " x ", bias.cols(), ")");
    ensure_bias();
    m_bias.value = bias;
  }

  /// Removes the bias (used to restore a layer whose bias was added by a merge).
  void drop_bias() {
    m_has_bias = false;
    m_bias.value.resize(0, 1);
    m_bias.grad.resize(0, 1);
    m_bias.trainable = false;
  }

 private:
  static std::string join(const std::string& path, const char* leaf) {
    return path.empty() ? std::string(leaf) : path + "." + leaf;
  }

  void init(bool bias, bool trainable) {
    m_has_bias = bias;
    m_weight.name = "weight";
    m_bias.name = "bias";
    m_bias.is_vector = true;
    if (!bias) m_bias.value.resize(0, 1);
    set_trainable(trainable);
    zero_grad();
  }

  void compute(const ConstRef<Scalar>& x, MatrixType& y) {
    check_input("forward", x);
    y.resize(out_features(), x.cols());
    detail::parallel_blocks(x.cols(), 128, [&](Index c, Index w) {  // column blocks of the batch (core/parallel.hpp)
      y.middleCols(c, w).noalias() = m_weight.value * x.middleCols(c, w);
    });
    if (m_has_bias) y.colwise() += m_bias.value.col(0);
    m_cached_cols = m_training ? x.cols() : -1;
  }

  void check_input(const char* what, const ConstRef<Scalar>& x) const {
    if (x.rows() != in_features())
      detail::fail("rankwise::Linear", what, ": input must have in_features = ", in_features(),
                   " rows (got ", x.rows(), " x ", x.cols(), ")");
  }

  void check_backward(const ConstRef<Scalar>& dy) const {
    if (m_cached_cols < 0)
      detail::fail<StateError>("rankwise::Linear", "backward() needs a forward() in training mode first");
    if (dy.rows() != out_features() || dy.cols() != m_cached_cols)
      detail::fail("rankwise::Linear", "backward: dy must be ", out_features(), " x ", m_cached_cols,
                   " like the forward output (got ", dy.rows(), " x ", dy.cols(), ")");
  }

  Parameter<Scalar> m_weight;
  Parameter<Scalar> m_bias;
  bool m_has_bias = false;
  bool m_training = true;
  MatrixType m_x;            // input of the last training forward (trainable layers only)
  const MatrixType* m_borrowed_x = nullptr;  // or the caller's input, after forward_borrowed()
  Index m_cached_cols = -1;  // batch size of the last training forward; -1: none
};

static_assert(Layer<Linear<float>>, "Linear must model the Layer contract");

}  // namespace rankwise
