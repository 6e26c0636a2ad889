#pragma once
/// \file rankwise/adapters/melora.hpp
/// MELoRA: mini-ensemble low-rank adapters. Ren et al., 2024, arXiv:2402.17263 (ACL 2024).
///
///   y = W x + b + [s B_1 A_1 x_1; ...; s B_n A_n x_n],  s = alpha / r_mini
///   i.e. Delta W = blockdiag(s B_1 A_1, ..., s B_n A_n), rank up to n r_mini at the cost of rank r_mini
///   shapes  x_i, y_i: the i-th of n equal contiguous chunks of the in (out) features;
///           A_i: r_mini x (in / n), B_i: (out / n) x r_mini, stacked as
///           "melora_A": (n r_mini) x (in / n) (rows i r_mini .. of mini i) and
///           "melora_B": (out / n) x (n r_mini) (columns i r_mini .. of mini i)
///   init    each A_i ~ kaiming_uniform(a = sqrt(5)) = U(+-1/sqrt(in / n)), drawn mini by mini; B = 0
///   train   A and B; the base is frozen
/// in and out must be divisible by n (the official code silently drops the remainder; rankwise
/// refuses). Forward and backward work block by block and never form the block-diagonal matrix.
/// Export: exactly a plain LoRA of rank n r_mini with block-structured factors. Docs: docs/adapters/melora.md

#include <rankwise/adapters/lora_export.hpp>
#include <rankwise/adapters/own_parameters.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/init.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/detail/merged_weight.hpp>
#include <rankwise/layers/linear.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

struct MELoRAOptions {
  Index n = 2;          ///< number of mini-LoRAs on the block diagonal (the official GLUE script: 2)
  Index mini_rank = 8;  ///< r_mini, the rank of each mini-LoRA (the official code's --rank)
  double alpha = 16.0;  ///< scale alpha / r_mini for every mini (the official scripts use 16)
};

template <FloatScalar Scalar_, typename Base_ = Linear<Scalar_>>
class MELoRA {
 public:
  using Scalar = Scalar_;
  using Base = Base_;
  using MatrixType = Matrix<Scalar>;

  /// Wraps `base` (taken over and frozen) with n fresh mini-LoRAs; draws A_1, ..., A_n in order.
  MELoRA(Base base, const MELoRAOptions& options, Random& rng) : m_base(std::move(base)), m_options(options) {
    const Index in = in_features(), out = out_features(), n = options.n;
    if (n < 1) detail::fail("rankwise::MELoRA", "n must be >= 1 (got ", n, ")");
    if (in % n != 0 || out % n != 0)
      detail::fail("rankwise::MELoRA", "in and out must be divisible by n = ", n, " (got in ", in, ", out ", out,
                   "; remainders ", in % n, " and ", out % n, ")");
    const Index limit = std::min(in / n, out / n);
    if (options.mini_rank < 1 || options.mini_rank > limit)
      detail::fail("rankwise::MELoRA", "mini_rank must be in [1, min(in, out) / n] = [1, ", limit, "] (got ",
                   options.mini_rank, ")");
    if (!(options.alpha > 0.0) || !std::isfinite(options.alpha))
      detail::fail("rankwise::MELoRA", "alpha must be a finite number > 0 (got ", options.alpha, ")");
    m_base.set_trainable(false);
    m_A.name = "melora_A.weight";
    m_B.name = "melora_B.weight";
    m_A.value.resize(n * options.mini_rank, in / n);
    fill_kaiming_uniform(m_A.value, in / n, rng);  // row-major: A_1 first, then A_2, ...
    m_B.value.setZero(out / n, n * options.mini_rank);
    zero_grad();
  }

  Index in_features() const { return m_base.in_features(); }
  Index out_features() const { return m_base.out_features(); }
  Index n() const { return m_options.n; }
  Index mini_rank() const { return m_options.mini_rank; }
  /// n r_mini: the rank of the equivalent plain LoRA.
  Index equivalent_rank() const { return m_options.n * m_options.mini_rank; }
  double alpha() const { return m_options.alpha; }
  /// alpha / r_mini.
  double scale() const { return m_options.alpha / double(m_options.mini_rank); }
  const MELoRAOptions& options() const { return m_options; }
  const Base& base() const { return m_base; }
  /// The stacked factors; A_i = A().middleRows(i r_mini, r_mini), B_i = B().middleCols(i r_mini, r_mini).
  const MatrixType& A() const { return m_A.value; }
  const MatrixType& B() const { return m_B.value; }
  Parameter<Scalar>& A_parameter() { return m_A; }
  Parameter<Scalar>& B_parameter() { return m_B; }

  void set_training(bool training) {
    m_training = training;
    m_base.set_training(training);
    if (!training) m_cached_cols = -1;
  }
  bool is_training() const { return m_training; }

  /// "<path>.melora_A.weight", "<path>.melora_B.weight", "<path>.base_layer.weight".
  void set_path(const std::string& path) { detail::adapter_set_path(m_base, path, own()); }

  /// y = W x + b + blockwise s B_i A_i x_i. In training mode caches what backward() needs.
  void forward(const ConstRef<Scalar>& x, MatrixType& y) {
    if (x.rows() != in_features())
      detail::fail("rankwise::MELoRA", "forward: input must have in_features = ", in_features(), " rows (got ",
                   x.rows(), " x ", x.cols(), ")");
    m_base.forward(x, y);
    m_cached_cols = m_training ? x.cols() : -1;
    if (m_merge.is_merged()) return;
    const Index r = mini_rank(), di = in_features() / n(), dout = out_features() / n();
    const Scalar s = Scalar(scale());
    m_u.resize(equivalent_rank(), x.cols());
    for (Index i = 0; i < n(); ++i) {
      m_u.middleRows(i * r, r).noalias() = m_A.value.middleRows(i * r, r) * x.middleRows(i * di, di);
      y.middleRows(i * dout, dout).noalias() += s * (m_B.value.middleCols(i * r, r) * m_u.middleRows(i * r, r));
    }
    if (m_training) m_x = x;
  }

  /// Requires forward() in training mode on the same batch, and an unmerged adapter.
  /// Accumulates dA, dB block by block; assigns dx.
  void backward(const ConstRef<Scalar>& dy, MatrixType& dx) {
    if (m_cached_cols < 0)
      detail::fail<StateError>("rankwise::MELoRA", "backward() needs a forward() in training mode first");
    if (m_merge.is_merged())
      detail::fail<StateError>("rankwise::MELoRA", "backward() on a merged adapter; unmerge() first");
    if (dy.rows() != out_features() || dy.cols() != m_cached_cols)
      detail::fail("rankwise::MELoRA", "backward: dy must be ", out_features(), " x ", m_cached_cols,
                   " like the forward output (got ", dy.rows(), " x ", dy.cols(), ")");
    m_base.backward(dy, dx);
    const Index r = mini_rank(), di = in_features() / n(), dout = out_features() / n();
    const Scalar s = Scalar(scale());
    m_t.resize(equivalent_rank(), dy.cols());
    const bool train_A = m_A.wants_grad(), train_B = m_B.wants_grad();
    for (Index i = 0; i < n(); ++i) {
      const Eigen::Block<const ConstRef<Scalar>> dy_i = dy.middleRows(i * dout, dout);
      if (train_B) m_B.grad.middleCols(i * r, r).noalias() += s * (dy_i * m_u.middleRows(i * r, r).transpose());
      // Scaled apart: at r_mini = 1 Eigen would copy a scaled operand to the heap.
      m_t.middleRows(i * r, r).noalias() = m_B.value.middleCols(i * r, r).transpose() * dy_i;
      m_t.middleRows(i * r, r) *= s;
      if (train_A)
        m_A.grad.middleRows(i * r, r).noalias() += m_t.middleRows(i * r, r) * m_x.middleRows(i * di, di).transpose();
      dx.middleRows(i * di, di).noalias() += m_A.value.middleRows(i * r, r).transpose() * m_t.middleRows(i * r, r);
    }
  }

  /// The frozen base parameters, then melora_A and melora_B.
  std::vector<Parameter<Scalar>*> parameters() { return detail::adapter_parameters(m_base, own()); }

  void zero_grad() { detail::adapter_zero_grad(m_base, own()); }

  /// r_mini (in + out), whatever n.
  Index trainable_parameter_count() const { return m_A.value.size() + m_B.value.size(); }

  /// The exact plain LoRA of rank n r_mini: A' holds A_i in rows i r_mini.. and input columns of chunk i
  /// (zero elsewhere), B' holds B_i in output rows of chunk i and columns i r_mini.., scale alpha / r_mini.
  LoRAFactors<Scalar> lora_factors() const {
    const Index r = mini_rank(), di = in_features() / n(), dout = out_features() / n();
    LoRAFactors<Scalar> f;
    f.A.setZero(equivalent_rank(), in_features());
    f.B.setZero(out_features(), equivalent_rank());
    for (Index i = 0; i < n(); ++i) {
      f.A.block(i * r, i * di, r, di) = m_A.value.middleRows(i * r, r);
      f.B.block(i * dout, i * r, dout, r) = m_B.value.middleCols(i * r, r);
    }
    f.scale = scale();
    return f;
  }

  /// Delta W = blockdiag(s B_i A_i) (out x in); for merge and export only.
  MatrixType delta_weight() const {
    const Index r = mini_rank(), di = in_features() / n(), dout = out_features() / n();
    MatrixType delta = MatrixType::Zero(out_features(), in_features());
    for (Index i = 0; i < n(); ++i)
      delta.block(i * dout, i * di, dout, di).noalias() =
          Scalar(scale()) * (m_B.value.middleCols(i * r, r) * m_A.value.middleRows(i * r, r));
    return delta;
  }

  /// Adds each s B_i A_i to the i-th diagonal block of W; unmerge() restores W bit for bit.
  void merge() {
    m_merge.merge(m_base, [this] { return delta_weight(); }, "rankwise::MELoRA");
  }

  void unmerge() { m_merge.unmerge(m_base, "rankwise::MELoRA"); }
  bool is_merged() const { return m_merge.is_merged(); }

 private:
  /// Its own parameters and the suffixes they are named by (adapters/own_parameters.hpp).
  std::array<detail::OwnParameter<Scalar>, 2> own() {
    return {{{&m_A, "melora_A.weight"}, {&m_B, "melora_B.weight"}}};
  }

  Base m_base;
  MELoRAOptions m_options;
  Parameter<Scalar> m_A;  // stacked A_i, (n r_mini) x (in / n)
  Parameter<Scalar> m_B;  // stacked B_i, (out / n) x (n r_mini)
  detail::MergedWeight<Scalar> m_merge;
  bool m_training = true;
  Index m_cached_cols = -1;
  // Buffers reused across steps.
  MatrixType m_x;  // input, in x n_tokens
  MatrixType m_u;  // stacked A_i x_i, (n r_mini) x n_tokens
  MatrixType m_t;  // stacked s B_i^T dy_i, (n r_mini) x n_tokens
};

static_assert(Layer<MELoRA<float>>, "MELoRA must model the Layer contract");
static_assert(Adapter<MELoRA<float>>, "MELoRA must model the Adapter contract");
static_assert(Mergeable<MELoRA<float>>, "MELoRA must be mergeable");

}  // namespace rankwise
