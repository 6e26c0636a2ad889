#pragma once
/// \file rankwise/adapters/vera.hpp
/// VeRA: vector-based random matrix adaptation. Kopiczko, Blankevoort & Asano, 2024, arXiv:2310.11454.
///
///   y = W x + b + diag(lambda_b) B_s diag(lambda_d) A_s x      A_s = A[:, :in], B_s = B[:out, :]
///   shapes  bank (VeRAProjections, shared by every VeRA adapter of a model): A: r x max_in ("vera_A"),
///           B: max_out x r ("vera_B"); per layer lambda_d: r ("vera_lambda_d"), lambda_b: out
///           ("vera_lambda_b")
///   init    A, B ~ kaiming_uniform(a = 0) = U(+-sqrt(6 / fan_in)), fan_in = max_in for A, r for B, drawn
///           A then B, row by row, from one Random (PEFT's layout); lambda_d = d_initial (0.1),
///           lambda_b = 0, so the adapter starts as its base
///   train   lambda_d and lambda_b; A, B and the base are frozen
/// The bank is held once (std::shared_ptr<const VeRAProjections>) and sliced top-left per layer; it can
/// be drawn from a seed or built from stored matrices. Docs: docs/adapters/vera.md

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

#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

/// The frozen random projections shared by every VeRA adapter of a model.
template <FloatScalar Scalar_>
class VeRAProjections {
 public:
  using Scalar = Scalar_;
  using MatrixType = Matrix<Scalar>;

  /// Draws A (rank x max_in) then B (max_out x rank) with PEFT's Kaiming-uniform bounds.
  VeRAProjections(Index rank, Index max_in, Index max_out, Random& rng) {
    if (rank < 1 || max_in < 1 || max_out < 1)
      detail::fail("rankwise::VeRAProjections", "rank, max_in and max_out must be >= 1 (got ", rank, ", ", max_in,
                   ", ", max_out, ")");
    m_A.value.resize(rank, max_in);
    m_B.value.resize(max_out, rank);
    fill_kaiming_uniform(m_A.value, max_in, rng, 0.0);
    fill_kaiming_uniform(m_B.value, rank, rng, 0.0);
    init();
  }

  /// Stored projections: A is r x max_in, B is max_out x r, finite unless `allow_non_finite`.
  VeRAProjections(MatrixType A, MatrixType B, bool allow_non_finite = false) {
    if (A.rows() < 1 || A.cols() < 1 || B.rows() < 1 || B.cols() != A.rows())
      detail::fail("rankwise::VeRAProjections", "need A: r x max_in and B: max_out x r with r, max_in, max_out >= 1 ",
                   "(got A ", A.rows(), " x ", A.cols(), ", B ", B.rows(), " x ", B.cols(), ")");
    if (!allow_non_finite && (!A.allFinite() || !B.allFinite()))
      detail::fail("rankwise::VeRAProjections", "the projections must be finite (", A.allFinite() ? "B" : "A",
                   " holds a NaN or an infinity; allow_non_finite accepts it)");
    m_A.value = std::move(A);
    m_B.value = std::move(B);
    init();
  }

  /// A bank ready to share: std::make_shared of either constructor.
  static std::shared_ptr<const VeRAProjections> make(Index rank, Index max_in, Index max_out, Random& rng) {
    return std::make_shared<const VeRAProjections>(rank, max_in, max_out, rng);
  }

  Index rank() const { return m_A.value.rows(); }
  Index max_in() const { return m_A.value.cols(); }
  Index max_out() const { return m_B.value.rows(); }
  const MatrixType& A() const { return m_A.value; }
  const MatrixType& B() const { return m_B.value; }
  /// The two frozen tensors, named "vera_A" and "vera_B" (PEFT's keys), for files and memory reports.
  std::vector<const Parameter<Scalar>*> parameters() const { return {&m_A, &m_B}; }
  /// Scalars held: r (max_in + max_out).
  Index size() const { return m_A.value.size() + m_B.value.size(); }

 private:
  void init() {
    m_A.name = "vera_A";
    m_B.name = "vera_B";
    m_A.trainable = false;
    m_B.trainable = false;
  }

  Parameter<Scalar> m_A;
  Parameter<Scalar> m_B;
};

struct VeRAOptions {
  double d_initial = 0.1;  ///< initial value of every lambda_d entry (PEFT's default; <= 0.1 recommended)
};

template <FloatScalar Scalar_, typename Base_ = Linear<Scalar_>>
class VeRA {
 public:
  using Scalar = Scalar_;
  using Base = Base_;
  using MatrixType = Matrix<Scalar>;
  using Projections = VeRAProjections<Scalar>;

  /// Wraps `base` (taken over and frozen) with vectors of its own over the shared `projections`.
  VeRA(Base base, std::shared_ptr<const Projections> projections, const VeRAOptions& options = {})
      : m_base(std::move(base)), m_projections(std::move(projections)), m_options(options) {
    if (!m_projections) detail::fail("rankwise::VeRA", "needs a projection bank (got a null pointer)");
    if (in_features() > m_projections->max_in() || out_features() > m_projections->max_out())
      detail::fail("rankwise::VeRA", "the layer must fit in the shared bank: need in <= max_in = ",
                   m_projections->max_in(), " and out <= max_out = ", m_projections->max_out(), " (got in ",
                   in_features(), ", out ", out_features(), ")");
    if (!std::isfinite(options.d_initial))
      detail::fail("rankwise::VeRA", "d_initial must be finite (got ", options.d_initial, ")");
    m_base.set_trainable(false);
    m_d.name = "vera_lambda_d";
    m_b.name = "vera_lambda_b";
    m_d.is_vector = true;
    m_b.is_vector = true;
    m_d.value.setConstant(rank(), 1, Scalar(options.d_initial));
    m_b.value.setZero(out_features(), 1);
    zero_grad();
  }

  Index in_features() const { return m_base.in_features(); }
  Index out_features() const { return m_base.out_features(); }
  Index rank() const { return m_projections->rank(); }
  const VeRAOptions& options() const { return m_options; }
  const Base& base() const { return m_base; }
  const Projections& projections() const { return *m_projections; }
  const std::shared_ptr<const Projections>& shared_projections() const { return m_projections; }
  /// lambda_d (r x 1) and lambda_b (out x 1).
  const MatrixType& lambda_d() const { return m_d.value; }
  const MatrixType& lambda_b() const { return m_b.value; }
  Parameter<Scalar>& lambda_d_parameter() { return m_d; }
  Parameter<Scalar>& lambda_b_parameter() { return m_b; }

  void set_training(bool training) {
    m_training = training;
    m_base.set_training(training);
    if (!training) m_cached_cols = -1;
  }
  bool is_training() const { return m_training; }

  /// Names its parameters after the module path: "<path>.vera_lambda_d", "<path>.base_layer.weight".
  /// The bank keeps its own names: it belongs to the model, not to one layer.
  void set_path(const std::string& path) { detail::adapter_set_path(m_base, path, own()); }

  /// y = W x + b + lambda_b (.) B_s (lambda_d (.) A_s x). Keeps P = A_s x and V = B_s Q for backward();
  /// the input itself is not needed.
  void forward(const ConstRef<Scalar>& x, MatrixType& y) {
    if (x.rows() != in_features())
      detail::fail("rankwise::VeRA", "forward: input must have in_features = ", in_features(), " rows (got ",
                   x.rows(), " x ", x.cols(), ")");
    m_base.forward(x, y);
    m_cached_cols = m_training ? x.cols() : -1;
    if (m_merge.is_merged()) return;
    m_p.noalias() = m_projections->A().leftCols(in_features()) * x;  // P = A_s x, r x n
    m_q = (m_p.array().colwise() * m_d.value.col(0).array()).matrix();  // Q = lambda_d (.) P
    m_v.noalias() = m_projections->B().topRows(out_features()) * m_q;  // V = B_s Q, out x n
    y.array() += m_v.array().colwise() * m_b.value.col(0).array();
  }

  /// Requires forward() in training mode on the same batch, and an unmerged adapter.
  /// Accumulates d lambda_b, d lambda_d; assigns dx.
  void backward(const ConstRef<Scalar>& dy, MatrixType& dx) {
    if (m_cached_cols < 0)
      detail::fail<StateError>("rankwise::VeRA", "backward() needs a forward() in training mode first");
    if (m_merge.is_merged())
      detail::fail<StateError>("rankwise::VeRA", "backward() on a merged adapter; unmerge() first");
    if (dy.rows() != out_features() || dy.cols() != m_cached_cols)
      detail::fail("rankwise::VeRA", "backward: dy must be ", out_features(), " x ", m_cached_cols,
                   " like the forward output (got ", dy.rows(), " x ", dy.cols(), ")");
    m_base.backward(dy, dx);
    if (m_b.wants_grad()) m_b.grad.col(0) += (dy.array() * m_v.array()).rowwise().sum().matrix();
    m_g = (dy.array().colwise() * m_b.value.col(0).array()).matrix();     // lambda_b (.) dy
    m_q.noalias() = m_projections->B().topRows(out_features()).transpose() * m_g;  // dL/dQ, r x n
    if (m_d.wants_grad()) m_d.grad.col(0) += (m_q.array() * m_p.array()).rowwise().sum().matrix();
    m_q.array().colwise() *= m_d.value.col(0).array();                    // dL/dP
    dx.noalias() += m_projections->A().leftCols(in_features()).transpose() * m_q;
  }

  /// The frozen base parameters, then vera_lambda_d and vera_lambda_b. The shared bank is not listed
  /// here (it is not this layer's): see projections() and shared_parameters().
  std::vector<Parameter<Scalar>*> parameters() { return detail::adapter_parameters(m_base, own()); }

  /// The frozen tensors this layer shares with others (the bank): memory reports count them once.
  std::vector<const Parameter<Scalar>*> shared_parameters() const { return m_projections->parameters(); }

  void zero_grad() { detail::adapter_zero_grad(m_base, own()); }

  /// out + r.
  Index trainable_parameter_count() const { return m_d.value.size() + m_b.value.size(); }

  /// Delta W = diag(lambda_b) B_s diag(lambda_d) A_s (out x in); for merge and export only.
  MatrixType delta_weight() const {
    const LoRAFactors<Scalar> f = lora_factors();
    return f.B * f.A;
  }

  /// The exact plain LoRA of rank r: A' = diag(lambda_d) A_s, B' = diag(lambda_b) B_s, scale 1.
  LoRAFactors<Scalar> lora_factors() const {
    LoRAFactors<Scalar> f;
    f.A = m_d.value.col(0).asDiagonal() * m_projections->A().leftCols(in_features());
    f.B = m_b.value.col(0).asDiagonal() * m_projections->B().topRows(out_features());
    f.scale = 1.0;
    return f;
  }

  /// W <- W + delta_weight(); unmerge() restores W bit for bit.
  void merge() {
    m_merge.merge(m_base, [this] { return delta_weight(); }, "rankwise::VeRA");
  }

  void unmerge() { m_merge.unmerge(m_base, "rankwise::VeRA"); }
  bool is_merged() const { return m_merge.is_merged(); }

 private:
  /// Its own parameters and the suffixes they are named by (adapters/own_parameters.hpp).
  std::array<detail::OwnParameter<Scalar>, 2> own() {
    return {{{&m_d, "vera_lambda_d"}, {&m_b, "vera_lambda_b"}}};
  }

  Base m_base;
  std::shared_ptr<const Projections> m_projections;
  VeRAOptions m_options;
  Parameter<Scalar> m_d;  // lambda_d, r x 1
  Parameter<Scalar> m_b;  // lambda_b, out x 1
  detail::MergedWeight<Scalar> m_merge;
  bool m_training = true;
  Index m_cached_cols = -1;
  // Buffers reused across steps.
  MatrixType m_p;  // A_s x, r x n
  MatrixType m_q;  // lambda_d (.) P in forward; dL/dQ then dL/dP in backward, r x n
  MatrixType m_v;  // B_s Q, out x n
  MatrixType m_g;  // lambda_b (.) dy, out x n
};

static_assert(Layer<VeRA<float>>, "VeRA must model the Layer contract");
static_assert(Adapter<VeRA<float>>, "VeRA must model the Adapter contract");
static_assert(Mergeable<VeRA<float>>, "VeRA must be mergeable");

}  // namespace rankwise
