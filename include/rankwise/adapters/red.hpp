#pragma once
/// \file rankwise/adapters/red.hpp
/// RED: representation editing. Wu et al., 2024, arXiv:2402.15179 (ACL 2024).
///
///   h = W x + b0,   y = l_scale (.) h + l_bias        (edits a layer's output, per feature)
///   shapes  x: in x n, h, y: out x n; l_scale, l_bias: out ("delta_vector.activation_scaling",
///           "delta_vector.activation_bias", the official code's names)
///   init    l_scale = 1, l_bias = 0, so the adapter starts as its base
///   train   l_scale and l_bias; the base is frozen. Ablations: scaling only or bias only.
/// In a Transformer RED wraps the FFN down projection (before dropout, residual and LayerNorm).
/// Merge folds the edit into the base: W' = diag(l_scale) W, b' = l_scale (.) b0 + l_bias (a bias is
/// added to a base that has none). Not exportable as LoRA: the update is not low-rank.
/// Docs: docs/adapters/red.md

#include <rankwise/adapters/own_parameters.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/layers/linear.hpp>

#include <string>
#include <utility>
#include <vector>

namespace rankwise {

struct REDOptions {
  bool scaling = true;  ///< train l_scale (false: the "bias only" ablation, l_scale = 1 fixed)
  bool bias = true;     ///< train l_bias (false: the "scaling only" ablation, l_bias = 0 fixed)
};

template <FloatScalar Scalar_, typename Base_ = Linear<Scalar_>>
class RED {
 public:
  using Scalar = Scalar_;
  using Base = Base_;
  using MatrixType = Matrix<Scalar>;

  /// Wraps `base` (taken over and frozen) with l_scale = 1 and l_bias = 0.
  explicit RED(Base base, const REDOptions& options = {}) : m_base(std::move(base)), m_options(options) {
    init(MatrixType::Ones(out_features(), 1), MatrixType::Zero(out_features(), 1));
  }

  /// Wraps `base` with given vectors (out x 1 each), e.g. read from a file.
  RED(Base base, MatrixType scaling, MatrixType bias, const REDOptions& options = {})
      : m_base(std::move(base)), m_options(options) {
    init(std::move(scaling), std::move(bias));
  }

  Index in_features() const { return m_base.in_features(); }
  Index out_features() const { return m_base.out_features(); }
  const REDOptions& options() const { return m_options; }
  const Base& base() const { return m_base; }
  /// l_scale and l_bias (out x 1 each).
  const MatrixType& scaling() const { return m_scale.value; }
  const MatrixType& bias() const { return m_bias.value; }
  Parameter<Scalar>& scaling_parameter() { return m_scale; }
  Parameter<Scalar>& bias_parameter() { return m_bias; }

  void set_training(bool training) {
    m_training = training;
    m_base.set_training(training);
    if (!training) m_cached_cols = -1;
  }
  bool is_training() const { return m_training; }

  /// "<path>.delta_vector.activation_scaling", "<path>.delta_vector.activation_bias",
  /// "<path>.base_layer.weight".
  void set_path(const std::string& path) { detail::adapter_set_path(m_base, path, own()); }

  /// y = l_scale (.) (W x + b0) + l_bias. In training mode keeps h for the gradient of l_scale.
  void forward(const ConstRef<Scalar>& x, MatrixType& y) {
    if (x.rows() != in_features())
      detail::fail("rankwise::RED", "forward: input must have in_features = ", in_features(), " rows (got ", x.rows(),
                   " x ", x.cols(), ")");
    m_base.forward(x, y);
    m_cached_cols = m_training ? x.cols() : -1;
    if (m_merged) return;
    const bool keep = m_training && m_scale.trainable;
    if (keep) m_h.resize(y.rows(), y.cols());
    // One pass over the output, column by column (contiguous), keeping h where backward needs it.
    for (Index j = 0; j < y.cols(); ++j) {
      if (keep) m_h.col(j) = y.col(j);
      y.col(j).array() = y.col(j).array() * m_scale.value.col(0).array() + m_bias.value.col(0).array();
    }
  }

  /// Requires forward() in training mode on the same batch, and an unmerged adapter.
  /// Accumulates d l_scale, d l_bias (those trained); assigns dx = W^T (l_scale (.) dy).
  void backward(const ConstRef<Scalar>& dy, MatrixType& dx) {
    if (m_cached_cols < 0)
      detail::fail<StateError>("rankwise::RED", "backward() needs a forward() in training mode first");
    if (m_merged) detail::fail<StateError>("rankwise::RED", "backward() on a merged adapter; unmerge() first");
    if (dy.rows() != out_features() || dy.cols() != m_cached_cols)
      detail::fail("rankwise::RED", "backward: dy must be ", out_features(), " x ", m_cached_cols,
                   " like the forward output (got ", dy.rows(), " x ", dy.cols(), ")");
    // One pass over dy, column by column: both vector gradients and dL/dh = l_scale (.) dy.
    const bool train_scale = m_scale.wants_grad(), train_bias = m_bias.wants_grad();
    if (train_scale && m_h.cols() != dy.cols())
      detail::fail<StateError>("rankwise::RED", "backward: the scaling was made trainable after its forward()");
    m_g.resize(dy.rows(), dy.cols());
    for (Index j = 0; j < dy.cols(); ++j) {
      if (train_scale) m_scale.grad.col(0).array() += dy.col(j).array() * m_h.col(j).array();
      if (train_bias) m_bias.grad.col(0) += dy.col(j);
      m_g.col(j).array() = dy.col(j).array() * m_scale.value.col(0).array();
    }
    m_base.backward(m_g, dx);
  }

  /// The frozen base parameters, then the trained vectors (a vector fixed by an ablation is listed
  /// too, flagged non-trainable, so that its value is part of the state).
  std::vector<Parameter<Scalar>*> parameters() { return detail::adapter_parameters(m_base, own()); }

  void zero_grad() { detail::adapter_zero_grad(m_base, own()); }

  /// 2 out (out for an ablation).
  Index trainable_parameter_count() const {
    return (m_scale.trainable ? out_features() : 0) + (m_bias.trainable ? out_features() : 0);
  }

  /// The change merge() makes to the weight: diag(l_scale) W - W (out x in).
  MatrixType delta_weight() const {
    const MatrixType& W = m_merged ? m_original_weight : m_base.weight();
    return ((m_scale.value.col(0).array() - Scalar(1)).matrix().asDiagonal() * W).eval();
  }

  /// The bias after merge(): l_scale (.) b0 + l_bias (b0 = 0 when the base has none).
  MatrixType merged_bias() const {
    const bool had_bias = m_merged ? m_had_bias : m_base.has_bias();
    const MatrixType& b0 = m_merged ? m_original_bias : m_base.bias();
    if (!had_bias) return m_bias.value;
    return (m_scale.value.array() * b0.array() + m_bias.value.array()).matrix();
  }

  /// W <- diag(l_scale) W, b <- l_scale (.) b + l_bias; unmerge() restores W and b bit for bit (and
  /// removes a bias that merge() had to add).
  void merge() {
    if (m_merged) detail::fail<StateError>("rankwise::RED", "merge(): the adapter is already merged");
    MatrixType weight = m_scale.value.col(0).asDiagonal() * m_base.weight();
    MatrixType bias = merged_bias();
    MatrixType original_weight = m_base.weight();
    MatrixType original_bias = m_base.bias();
    const bool had_bias = m_base.has_bias();
    m_base.assign_weight(weight);
    m_base.assign_bias(bias);
    m_original_weight.swap(original_weight);
    m_original_bias.swap(original_bias);
    m_had_bias = had_bias;
    m_merged = true;
  }

  void unmerge() {
    if (!m_merged) detail::fail<StateError>("rankwise::RED", "unmerge(): the adapter is not merged");
    m_base.assign_weight(m_original_weight);
    if (m_had_bias)
      m_base.assign_bias(m_original_bias);
    else
      m_base.drop_bias();
    m_original_weight.resize(0, 0);
    m_original_bias.resize(0, 1);
    m_merged = false;
  }
  bool is_merged() const { return m_merged; }

 private:
  /// Its own parameters and the suffixes they are named by (adapters/own_parameters.hpp).
  std::array<detail::OwnParameter<Scalar>, 2> own() {
    return {{{&m_scale, "delta_vector.activation_scaling"}, {&m_bias, "delta_vector.activation_bias"}}};
  }

  void init(MatrixType scaling, MatrixType bias) {
    if (!m_options.scaling && !m_options.bias)
      detail::fail("rankwise::RED", "at least one of scaling and bias must be trained (got both false)");
    const Index out = out_features();
    if (scaling.rows() != out || scaling.cols() != 1 || bias.rows() != out || bias.cols() != 1)
      detail::fail("rankwise::RED", "scaling and bias must have the layer's out_features = ", out,
                   " entries (got scaling ", scaling.rows(), " x ", scaling.cols(), ", bias ", bias.rows(), " x ",
                   bias.cols(), ")");
    m_base.set_trainable(false);
    m_scale.name = "delta_vector.activation_scaling";
    m_bias.name = "delta_vector.activation_bias";
    m_scale.is_vector = true;
    m_bias.is_vector = true;
    m_scale.value = std::move(scaling);
    m_bias.value = std::move(bias);
    m_scale.trainable = m_options.scaling;
    m_bias.trainable = m_options.bias;
    zero_grad();
  }

  Base m_base;
  REDOptions m_options;
  Parameter<Scalar> m_scale;  // l_scale, out x 1
  Parameter<Scalar> m_bias;   // l_bias, out x 1
  bool m_merged = false;
  bool m_had_bias = false;
  bool m_training = true;
  Index m_cached_cols = -1;
  MatrixType m_original_weight;
  MatrixType m_original_bias;
  // Buffers reused across steps.
  MatrixType m_h;  // W x + b0, out x n
  MatrixType m_g;  // l_scale (.) dy, out x n
};

static_assert(Layer<RED<float>>, "RED must model the Layer contract");
static_assert(Adapter<RED<float>>, "RED must model the Adapter contract");
static_assert(Mergeable<RED<float>>, "RED must be mergeable");

}  // namespace rankwise
