#pragma once
/// \file rankwise/adapters/lora.hpp
/// LoRA: low-rank adaptation of a frozen linear layer. Hu et al., 2021, arXiv:2106.09685;
/// rsLoRA scaling: Kalajdzievski, 2023, arXiv:2312.03732.
///
///   y = W x + b + s * B diag(g) A drop(x)      s = alpha / r0  (rsLoRA: alpha / sqrt(r0))
///   shapes  x: in x n, A: r x in ("lora_A"), B: out x r ("lora_B"), gates g: r (not trainable)
///   init    A ~ kaiming_uniform(a = sqrt(5)) = U(+-1/sqrt(in)) (or N(0, 1/r0^2)), B = 0, g = 1
///   train   A and B; the base is frozen. r0 is the rank at construction: rank surgery
///           (remove_ranks / add_ranks) keeps s, so surviving ranks keep their contribution.
/// Compute scales with the current rank r; B A is formed only by delta_weight() and merge().
/// Docs: docs/adapters/lora.md

#include <rankwise/adapters/own_parameters.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/init.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parallel.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/detail/merged_weight.hpp>
#include <rankwise/layers/linear.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace rankwise {

/// How A is initialised (B always starts at zero, so the adapter starts as the identity).
enum class LoRAInit {
  KaimingUniform,  ///< PEFT's default (init_lora_weights=True): U(-1/sqrt(in), 1/sqrt(in))
  Gaussian,        ///< PEFT's "gaussian": N(0, (1/r)^2)
};

/// Parses PEFT's names for LoRA's init: "default", "true" or "kaiming_uniform"; "gaussian".
inline LoRAInit lora_init_from_name(std::string_view name) {
  if (name == "default" || name == "true" || name == "kaiming_uniform") return LoRAInit::KaimingUniform;
  if (name == "gaussian") return LoRAInit::Gaussian;
  detail::fail("rankwise::LoRAOptions", "init must be one of \"default\", \"kaiming_uniform\", \"gaussian\" (got \"",
               name, "\")");
}

inline const char* to_string(LoRAInit init) {
  return init == LoRAInit::Gaussian ? "gaussian" : "kaiming_uniform";
}

struct LoRAOptions {
  Index rank = 8;           ///< r, in [1, min(in, out)]
  double alpha = 8.0;       ///< lora_alpha (PEFT's default 8), > 0
  double dropout = 0.0;     ///< dropout on the adapter branch's input while training, in [0, 1)
  bool use_rslora = false;  ///< scale alpha / sqrt(r) instead of alpha / r
  LoRAInit init = LoRAInit::KaimingUniform;
};

namespace detail {
/// The factor gradients of a LoRA branch over columns [begin, begin + count) of a batch, for one part
/// of a cut (core/parallel.hpp): rows [r0, r1) of dB += s dy uᵀ and columns [c0, c1) of dA += t xᵀ.
/// dA is computed as (x tᵀ)ᵀ into rows of the in x r scratch dA_t: twice as fast as t xᵀ, whose
/// packing reads x across its columns. A parameter that wants no gradient is skipped. LoRA calls it
/// over the whole batch, BoRA over each run of one task's columns.
template <FloatScalar Scalar, typename DY, typename X>
void add_lora_gradients(Parameter<Scalar>& A, Parameter<Scalar>& B, const DY& dy, const Matrix<Scalar>& u,
                        const Matrix<Scalar>& t, const X& x, Index begin, Index count, std::pair<Index, Index> rows,
                        std::pair<Index, Index> cols, Scalar s, Matrix<Scalar>& dA_t) {
  const auto [r0, r1] = rows;
  const auto [c0, c1] = cols;
  if (B.wants_grad() && r1 > r0)
    B.grad.middleRows(r0, r1 - r0).noalias() +=
        s * (dy.block(r0, begin, r1 - r0, count) * u.middleCols(begin, count).transpose());
  if (A.wants_grad() && c1 > c0) {
    auto block = dA_t.middleRows(c0, c1 - c0);
    block.noalias() = x.block(c0, begin, c1 - c0, count) * t.middleCols(begin, count).transpose();
    A.grad.middleCols(c0, c1 - c0) += block.transpose();
  }
}
}  // namespace detail

template <FloatScalar Scalar_, typename Base_ = Linear<Scalar_>>
class LoRA {
 public:
  using Scalar = Scalar_;
  using Base = Base_;
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;

  /// Wraps `base` (taken over and frozen) with a fresh adapter; draws A, then forks the dropout stream.
  LoRA(Base base, const LoRAOptions& options, Random& rng) : m_base(std::move(base)), m_options(options) {
    const Index limit = std::min(in_features(), out_features());
    if (options.rank < 1 || options.rank > limit)
      detail::fail("rankwise::LoRA", "rank must be in [1, min(in, out)] = [1, ", limit, "] (got ", options.rank, ")");
    check_scaling("rankwise::LoRA", in_features(), out_features(), options.alpha, options.rank, options.use_rslora);
    if (!(options.dropout >= 0.0 && options.dropout < 1.0))
      detail::fail("rankwise::LoRA", "dropout must be in [0, 1) (got ", options.dropout, ")");
    if (options.init != LoRAInit::KaimingUniform && options.init != LoRAInit::Gaussian)
      detail::fail("rankwise::LoRA", "init must be KaimingUniform or Gaussian (got enum value ",
                   static_cast<int>(options.init), ")");
    m_base.set_trainable(false);
    m_scale_rank = options.rank;
    m_A.name = "lora_A.weight";
    m_B.name = "lora_B.weight";
    m_A.value.resize(options.rank, in_features());
    init_rows_of_A(m_A.value, rng);
    m_B.value.setZero(out_features(), options.rank);
    m_gates.setOnes(options.rank);
    m_dropout_rng = rng.fork();
    zero_grad();
  }

  // --- shapes and settings -------------------------------------------------------------------
  Index in_features() const { return m_base.in_features(); }
  Index out_features() const { return m_base.out_features(); }
  /// Current number of ranks (rows of A, columns of B); may be 0 after remove_ranks().
  Index rank() const { return m_A.value.rows(); }
  /// The rank the scale is computed from: the rank at construction.
  Index scale_rank() const { return m_scale_rank; }
  double alpha() const { return m_options.alpha; }
  const LoRAOptions& options() const { return m_options; }
  /// s = alpha / r0, or alpha / sqrt(r0) with rsLoRA.
  double scale() const {
    if (m_exact_scale) return *m_exact_scale;
    return m_options.use_rslora ? m_options.alpha / std::sqrt(double(m_scale_rank))
                                : m_options.alpha / double(m_scale_rank);
  }

  const Base& base() const { return m_base; }
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

  /// Disabled: the layer is exactly its base (forward and backward skip the adapter branch).
  void set_enabled(bool enabled) {
    if (m_merge.is_merged() && !enabled)
      detail::fail<StateError>("rankwise::LoRA", "cannot disable a merged adapter; unmerge() first");
    m_enabled = enabled;
  }
  bool is_enabled() const { return m_enabled; }

  /// Names its parameters after the module path: "<path>.lora_A.weight", "<path>.base_layer.weight".
  void set_path(const std::string& path) { detail::adapter_set_path(m_base, path, own()); }

  /// The generator that draws dropout masks (for checkpoints, or to replay a mask).
  Random& dropout_generator() { return m_dropout_rng; }
  const Random& dropout_generator() const { return m_dropout_rng; }

  /// Replaces A (r x in) and B (out x r), as loaders do; the rank becomes r (0 allowed). Gates reset
  /// to 1 and gradients to 0; the scale is unchanged. Strong guarantee: on error nothing changes.
  void assign_factors(const ConstRef<Scalar>& A, const ConstRef<Scalar>& B, bool allow_non_finite = false) {
    if (m_merge.is_merged()) detail::fail<StateError>("rankwise::LoRA", "assign_factors(): unmerge() first");
    check_factors("rankwise::LoRA::assign_factors", in_features(), out_features(), A, B, allow_non_finite);
    MatrixType a = A, b = B;
    m_A.value.swap(a);
    m_B.value.swap(b);
    m_A.zero_grad();
    m_B.zero_grad();
    reset_gates();
    m_cached_cols = -1;
  }

  /// Sets how the scale is computed: s = alpha / r0, or alpha / sqrt(r0) with rsLoRA (loaders use it
  /// to reproduce a file's scale exactly). Requires alpha finite and > 0, r0 >= 1.
  void set_scaling(double alpha, Index scale_rank, bool use_rslora) {
    check_scaling("rankwise::LoRA::set_scaling", in_features(), out_features(), alpha, scale_rank, use_rslora);
    if (m_merge.is_merged()) detail::fail<StateError>("rankwise::LoRA", "set_scaling(): unmerge() first");
    m_options.alpha = alpha;
    m_options.use_rslora = use_rslora;
    m_scale_rank = scale_rank;
    m_exact_scale.reset();
  }

  /// Sets s itself, for loaders that must give back a saved scale to the last bit (alpha / r0 cannot
  /// express every double). alpha() and scale_rank() keep describing how s was chosen; set_scaling()
  /// returns to the formula. Requires s finite and > 0.
  void set_scale(double scale) {
    check_scale("rankwise::LoRA", "set_scale: scale", scale);
    if (m_merge.is_merged()) detail::fail<StateError>("rankwise::LoRA", "set_scale(): unmerge() first");
    m_exact_scale = scale;
  }

  // --- the rules every way of setting the state follows (the constructor's) ----------------------
  /// Factors for an in -> out layer: A r x in and B out x r with r <= min(in, out), every value finite
  /// unless `allow_non_finite`. Loaders check with it before they change anything. InvalidArgument
  /// naming `where` otherwise.
  static void check_factors(const char* where, Index in, Index out, const ConstRef<Scalar>& A, const ConstRef<Scalar>& B,
                            bool allow_non_finite = false) {
    if (A.cols() != in || B.rows() != out || A.rows() != B.cols())
      detail::fail(where, "need A r x ", in, " and B ", out, " x r (got A ", A.rows(), " x ", A.cols(), ", B ",
                   B.rows(), " x ", B.cols(), ")");
    if (A.rows() > std::min(in, out))
      detail::fail(where, "the rank must be at most min(in, out) = ", std::min(in, out), " (got ", A.rows(), ")");
    if (!allow_non_finite && (!A.allFinite() || !B.allFinite()))
      detail::fail(where, "A and B must be finite (", A.allFinite() ? "B" : "A",
                   " holds a NaN or an infinity; allow_non_finite accepts it)");
  }
  /// Scaling for an in -> out layer: alpha finite and > 0, 1 <= scale_rank <= min(in, out), and the
  /// scale alpha / scale_rank (alpha / sqrt(scale_rank) with rsLoRA) finite and > 0 in Scalar.
  static void check_scaling(const char* where, Index in, Index out, double alpha, Index scale_rank, bool use_rslora) {
    if (!(alpha > 0.0) || !std::isfinite(alpha))
      detail::fail(where, "alpha must be a finite number > 0 (got ", alpha, ")");
    if (scale_rank < 1 || scale_rank > std::min(in, out))
      detail::fail(where, "the scale rank must be in [1, min(in, out)] = [1, ", std::min(in, out), "] (got ", scale_rank,
                   ")");
    const double s = use_rslora ? alpha / std::sqrt(double(scale_rank)) : alpha / double(scale_rank);
    if (!representable_scale(s))
      detail::fail(where, "the scale alpha / ", use_rslora ? "sqrt(r) = " : "r = ", s,
                   " is not a finite number > 0 in the adapter's precision (alpha ", alpha, ", r ", scale_rank, ")");
  }
  /// A scale set as such (set_scale, loaders): finite and > 0 in Scalar; `what` names it in the message.
  static void check_scale(const char* where, const char* what, double scale) {
    if (!representable_scale(scale))
      detail::fail(where, what, " must be a finite number > 0 in the adapter's precision (got ", scale, ")");
  }
  static bool representable_scale(double s) {
    return s > 0.0 && std::isfinite(s) && std::isfinite(Scalar(s)) && Scalar(s) > Scalar(0);
  }

  // --- the Layer contract ----------------------------------------------------------------------
  /// y = W x + b + s B diag(g) A drop(x). In training mode caches what backward() needs (a copy of x).
  void forward(const ConstRef<Scalar>& x, MatrixType& y) { forward_impl(x, y, nullptr); }

  /// Like forward(), but without dropout the adapter keeps a reference to x instead of a copy: x must
  /// stay alive and unchanged until backward() (a model's activation buffer, which q, k and v may
  /// share). With dropout the masked input is kept as in forward().
  void forward_borrowed(const MatrixType& x, MatrixType& y) { forward_impl(x, y, &x); }
  void forward_borrowed(const MatrixType&&, MatrixType&) = delete;  // a temporary would dangle

  /// Requires forward() in training mode on the same batch, and an unmerged adapter.
  /// Accumulates dA, dB (base frozen); assigns dx.
  void backward(const ConstRef<Scalar>& dy, MatrixType& dx) {
    check_backward(dy);
    if (m_probe.armed) accumulate_probe(dy);
    m_base.backward(dy, dx);
    if (!branch_active()) return;
    branch_backward(dy, &dx);
  }

  /// Like backward() without dx: accumulates dA and dB only, for a caller that needs no input
  /// gradient (the first layer of a model whose embeddings are frozen). Skips the base's W^T dy.
  void backward_parameters_only(const ConstRef<Scalar>& dy) {
    check_backward(dy);
    if (m_probe.armed) accumulate_probe(dy);
    if (branch_active()) branch_backward(dy, nullptr);
  }

  /// The frozen base parameters (flagged non-trainable), then lora_A and lora_B.
  std::vector<Parameter<Scalar>*> parameters() { return detail::adapter_parameters(m_base, own()); }

  void zero_grad() { detail::adapter_zero_grad(m_base, own()); }

  /// r (in + out): the adapter's own trainable scalars.
  Index trainable_parameter_count() const { return m_A.value.size() + m_B.value.size(); }

  // --- merge -----------------------------------------------------------------------------------
  /// Delta W = s B diag(g) A (out x in). Forms the dense product: for merge and export only.
  MatrixType delta_weight() const {
    if (rank() == 0) return MatrixType::Zero(out_features(), in_features());
    const MatrixType gated_A = m_gates.asDiagonal() * m_A.value;
    return Scalar(scale()) * (m_B.value * gated_A);
  }

  /// W <- W + delta_weight(); the original W is kept so that unmerge() restores it bit for bit.
  void merge() {
    if (!m_enabled) detail::fail<StateError>("rankwise::LoRA", "merge(): the adapter is disabled");
    m_merge.merge(m_base, [this] { return delta_weight(); }, "rankwise::LoRA");
  }

  /// Restores the base weight exactly as it was before merge().
  void unmerge() { m_merge.unmerge(m_base, "rankwise::LoRA"); }
  bool is_merged() const { return m_merge.is_merged(); }

  // --- gates and rank surgery --------------------------------------------------------------------
  /// Multiplier of rank i (1 by default; 0 ablates it without changing shapes).
  double gate(Index i) const {
    check_rank_index("gate", i);
    return double(m_gates(i));
  }
  void set_gate(Index i, double value) {
    check_rank_index("set_gate", i);
    if (!std::isfinite(value)) detail::fail("rankwise::LoRA", "set_gate: value must be finite (got ", value, ")");
    m_gates(i) = Scalar(value);
    update_unit_gates();
  }
  void reset_gates() {
    m_gates.setOnes(rank());
    m_unit_gates = true;
  }
  const VectorType& gates() const { return m_gates; }

  /// Removes the given rank indices (any order, no duplicates). A, B, their gradients and the gates
  /// lose those rows/columns; the survivors keep their order and values. Returns what changed so an
  /// optimizer can follow. Strong guarantee: on error nothing changes.
  RankChange remove_ranks(std::span<const Index> indices) {
    if (m_merge.is_merged()) detail::fail<StateError>("rankwise::LoRA", "remove_ranks(): unmerge() first");
    const Index r = rank();
    std::vector<char> removed(static_cast<std::size_t>(r), 0);
    for (Index i : indices) {
      if (i < 0 || i >= r)
        detail::fail("rankwise::LoRA", "remove_ranks: rank index must be in [0, ", r, ") (got ", i, ")");
      if (removed[static_cast<std::size_t>(i)])
        detail::fail("rankwise::LoRA", "remove_ranks: rank index ", i, " is listed twice");
      removed[static_cast<std::size_t>(i)] = 1;
    }
    std::vector<Index> kept;
    kept.reserve(static_cast<std::size_t>(r));
    for (Index i = 0; i < r; ++i)
      if (!removed[static_cast<std::size_t>(i)]) kept.push_back(i);
    const Index k = Index(kept.size());
    MatrixType A(k, in_features()), A_grad(k, in_features()), B(out_features(), k), B_grad(out_features(), k);
    VectorType gates(k);
    for (Index j = 0; j < k; ++j) {
      const Index i = kept[static_cast<std::size_t>(j)];
      A.row(j) = m_A.value.row(i);
      A_grad.row(j) = m_A.grad.row(i);
      B.col(j) = m_B.value.col(i);
      B_grad.col(j) = m_B.grad.col(i);
      gates(j) = m_gates(i);
    }
    m_A.value.swap(A);
    m_A.grad.swap(A_grad);
    m_B.value.swap(B);
    m_B.grad.swap(B_grad);
    m_gates.swap(gates);
    update_unit_gates();
    m_cached_cols = -1;  // cached activations no longer match the shapes
    return make_change(r, std::move(kept), 0);
  }

  /// Appends k fresh ranks: new rows of A drawn like A's init, new columns of B zero, gates 1, so the
  /// function is unchanged. The rank may not exceed min(in, out).
  RankChange add_ranks(Index k, Random& rng) {
    if (m_merge.is_merged()) detail::fail<StateError>("rankwise::LoRA", "add_ranks(): unmerge() first");
    const Index r = rank();
    const Index limit = std::min(in_features(), out_features());
    if (k < 0 || r + k > limit)
      detail::fail("rankwise::LoRA", "add_ranks: rank + k must be in [rank, min(in, out)] = [", r, ", ", limit,
                   "] (got rank ", r, " + k ", k, ")");
    MatrixType A(r + k, in_features());
    A.topRows(r) = m_A.value;
    init_rows_of_A(A.bottomRows(k), rng);
    MatrixType A_grad = MatrixType::Zero(r + k, in_features());
    A_grad.topRows(r) = m_A.grad;
    MatrixType B = MatrixType::Zero(out_features(), r + k);
    B.leftCols(r) = m_B.value;
    MatrixType B_grad = MatrixType::Zero(out_features(), r + k);
    B_grad.leftCols(r) = m_B.grad;
    VectorType gates = VectorType::Ones(r + k);
    gates.head(r) = m_gates;
    m_A.value.swap(A);
    m_A.grad.swap(A_grad);
    m_B.value.swap(B);
    m_B.grad.swap(B_grad);
    m_gates.swap(gates);
    update_unit_gates();
    m_cached_cols = -1;
    std::vector<Index> kept(static_cast<std::size_t>(r));
    for (Index i = 0; i < r; ++i) kept[static_cast<std::size_t>(i)] = i;
    return make_change(r, std::move(kept), k);
  }

  // --- gradient probe (rank allocation) ------------------------------------------------------------
  /// Arms a probe of G = dL/dW, the gradient the frozen weight would receive (out x in), applied to
  /// given matrices without ever forming G: every training-mode backward() until
  /// disarm_gradient_probe() adds dy (x^T right) to probe_right() (out x k) and (left^T dy) x^T to
  /// probe_left() (k x in), x being the layer's input. Either side may be empty (0 columns). The
  /// cost per step is O(n k (in + out)); the forward keeps a copy of x only for the left side.
  /// RankAllocator's gain estimates use it (docs/rank/alora.md). Works at rank 0 too.
  void arm_gradient_probe(MatrixType right, MatrixType left) {
    if (right.size() > 0 && right.rows() != in_features())
      detail::fail("rankwise::LoRA", "arm_gradient_probe: right must have in_features = ", in_features(),
                   " rows (got ", right.rows(), " x ", right.cols(), ")");
    if (left.size() > 0 && left.rows() != out_features())
      detail::fail("rankwise::LoRA", "arm_gradient_probe: left must have out_features = ", out_features(),
                   " rows (got ", left.rows(), " x ", left.cols(), ")");
    m_probe.right = std::move(right);
    m_probe.left = std::move(left);
    m_probe.right_sum = MatrixType::Zero(out_features(), m_probe.right.cols());
    m_probe.left_sum = MatrixType::Zero(m_probe.left.cols(), in_features());
    m_probe.armed = m_probe.right.cols() > 0 || m_probe.left.cols() > 0;
    m_probe.batches = 0;
    m_probe.cols = -1;
  }
  void disarm_gradient_probe() { m_probe.armed = false; }
  bool gradient_probe_armed() const { return m_probe.armed; }
  /// Sum over the probed backward() calls of G right (out x k), and of left^T G (k x in).
  const MatrixType& probe_right() const { return m_probe.right_sum; }
  const MatrixType& probe_left() const { return m_probe.left_sum; }
  /// How many backward() calls the probe has seen.
  long probe_batches() const { return m_probe.batches; }

  /// Appends ranks whose rows of A are given (k x in), with B's new columns zero and gates 1, so the
  /// function is unchanged (the allocator's warm start: directions that the gradient favours).
  RankChange add_ranks_with_rows(const MatrixType& rows) {
    if (m_merge.is_merged()) detail::fail<StateError>("rankwise::LoRA", "add_ranks_with_rows(): unmerge() first");
    if (rows.cols() != in_features())
      detail::fail("rankwise::LoRA", "add_ranks_with_rows: rows must have in_features = ", in_features(),
                   " columns (got ", rows.rows(), " x ", rows.cols(), ")");
    if (!rows.allFinite()) detail::fail("rankwise::LoRA", "add_ranks_with_rows: rows must be finite");
    Random unused(0);  // add_ranks() draws rows that are then overwritten
    RankChange change = add_ranks(rows.rows(), unused);
    m_A.value.bottomRows(rows.rows()) = rows;
    return change;
  }

 private:
  /// Its own parameters and the suffixes they are named by (adapters/own_parameters.hpp).
  std::array<detail::OwnParameter<Scalar>, 2> own() {
    return {{{&m_A, "lora_A.weight"}, {&m_B, "lora_B.weight"}}};
  }

  bool branch_active() const { return m_enabled && !m_merge.is_merged() && rank() > 0; }

  void forward_impl(const ConstRef<Scalar>& x, MatrixType& y, const MatrixType* borrow) {
    if (x.rows() != in_features())
      detail::fail("rankwise::LoRA", "forward: input must have in_features = ", in_features(), " rows (got ",
                   x.rows(), " x ", x.cols(), ")");
    m_base.forward(x, y);
    m_cached_cols = m_training ? x.cols() : -1;
    m_borrowed_x = nullptr;
    if (m_training && m_probe.armed) capture_probe_input(x);
    if (!branch_active()) return;
    const bool drop = m_training && m_options.dropout > 0.0;
    if (drop) {
      draw_mask(x.rows(), x.cols());
      m_x.array() = x.array() * m_mask.array();
    } else if (m_training && borrow) {
      m_borrowed_x = borrow;
      m_x.resize(0, 0);
    } else if (m_training) {
      m_x = x;
    }
    m_u.resize(rank(), x.cols());
    if (drop || (m_training && !borrow))
      branch_forward(m_x, y);
    else
      branch_forward(x, y);
  }

  /// u = diag(g) A x and y += s B u, over column blocks of the batch on rankwise's threads
  /// (core/parallel.hpp).
  template <typename Input>
  void branch_forward(const Input& x, MatrixType& y) {
    const Scalar s = Scalar(scale());
    detail::parallel_blocks(x.cols(), 128, [&](Index c, Index w) {
      auto u = m_u.middleCols(c, w);
      u.noalias() = m_A.value * x.middleCols(c, w);
      if (!m_unit_gates) u.array().colwise() *= m_gates.array();
      y.middleCols(c, w).noalias() += s * (m_B.value * u);
    });
  }

  void check_backward(const ConstRef<Scalar>& dy) const {
    if (m_cached_cols < 0)
      detail::fail<StateError>("rankwise::LoRA", "backward() needs a forward() in training mode first");
    if (m_merge.is_merged())
      detail::fail<StateError>("rankwise::LoRA", "backward() on a merged adapter; unmerge() first");
    if (dy.rows() != out_features() || dy.cols() != m_cached_cols)
      detail::fail("rankwise::LoRA", "backward: dy must be ", out_features(), " x ", m_cached_cols,
                   " like the forward output (got ", dy.rows(), " x ", dy.cols(), ")");
  }

  /// t = diag(g) s B^T dy and dx += A^T t (masked with dropout; skipped when dx is null) over column
  /// blocks of the batch, then dB += s dy u^T (row blocks) and dA += t x^T (column blocks; x: the
  /// branch's input of the forward) as the parts of one job: no part sums what another writes.
  void branch_backward(const ConstRef<Scalar>& dy, MatrixType* dx) {
    const Scalar s = Scalar(scale());
    const bool masked = m_training && m_options.dropout > 0.0;
    m_t.resize(rank(), dy.cols());
    if (masked && dx) m_dx_branch.resize(in_features(), dy.cols());
    detail::parallel_blocks(dy.cols(), 128, [&](Index c, Index w) {
      auto t = m_t.middleCols(c, w);
      // Scaled apart: at r = 1 Eigen would copy a scaled operand to the heap.
      t.noalias() = m_B.value.transpose() * dy.middleCols(c, w);
      t *= s;
      if (!m_unit_gates) t.array().colwise() *= m_gates.array();
      if (!dx) return;
      if (masked) {
        auto branch = m_dx_branch.middleCols(c, w);
        branch.noalias() = m_A.value.transpose() * t;
        dx->middleCols(c, w).array() += branch.array() * m_mask.middleCols(c, w).array();
      } else
        dx->middleCols(c, w).noalias() += m_A.value.transpose() * t;
    });
    const bool grad_A = m_A.wants_grad();
    const MatrixType& x = m_borrowed_x ? *m_borrowed_x : m_x;
    if (grad_A && (x.cols() != dy.cols() || x.rows() != in_features()))
      detail::fail<StateError>("rankwise::LoRA", "backward: the borrowed input of forward_borrowed() changed shape");
    const Index parts = std::min(detail::parts_for(out_features(), 32), detail::parts_for(in_features(), 32));
    if (grad_A) m_dA_t.resize(in_features(), rank());
    auto gradients = [&](Index p) {
      detail::add_lora_gradients(m_A, m_B, dy, m_u, m_t, x, 0, dy.cols(), detail::part_range(out_features(), parts, p, 8),
                                 detail::part_range(in_features(), parts, p, 8), s, m_dA_t);
    };
    detail::parallel_parts(parts, gradients);  // one part: on the calling thread
  }

  void capture_probe_input(const ConstRef<Scalar>& x) {
    if (m_probe.right.cols() > 0) m_probe.p.noalias() = m_probe.right.transpose() * x;  // k x n
    if (m_probe.left.cols() > 0) m_probe.x = x;
    m_probe.cols = x.cols();
  }

  void accumulate_probe(const ConstRef<Scalar>& dy) {
    if (m_probe.cols != dy.cols())
      detail::fail<StateError>("rankwise::LoRA", "backward: the gradient probe was armed after this batch's forward()");
    if (m_probe.right.cols() > 0) m_probe.right_sum.noalias() += dy * m_probe.p.transpose();
    if (m_probe.left.cols() > 0) {
      m_probe.q.noalias() = m_probe.left.transpose() * dy;  // k x n
      m_probe.left_sum.noalias() += m_probe.q * m_probe.x.transpose();
    }
    ++m_probe.batches;
  }

  template <typename Derived>
  void init_rows_of_A(const Eigen::MatrixBase<Derived>& rows, Random& rng) const {
    if (m_options.init == LoRAInit::Gaussian)
      fill_normal(rows, 0.0, 1.0 / double(m_scale_rank), rng);
    else
      fill_kaiming_uniform(rows, in_features(), rng);
  }

  void draw_mask(Index rows, Index cols) {
    const double p = m_options.dropout;
    const Scalar keep = Scalar(1.0 / (1.0 - p));
    m_mask.resize(rows, cols);
    Scalar* data = m_mask.data();
    for (Index i = 0; i < m_mask.size(); ++i) data[i] = m_dropout_rng.uniform() < p ? Scalar(0) : keep;
  }

  void update_unit_gates() { m_unit_gates = (m_gates.array() == Scalar(1)).all(); }

  void check_rank_index(const char* what, Index i) const {
    if (i < 0 || i >= rank())
      detail::fail("rankwise::LoRA", what, ": rank index must be in [0, ", rank(), ") (got ", i, ")");
  }

  RankChange make_change(Index old_count, std::vector<Index> kept, Index added) const {
    RankChange change;
    change.changes.push_back(SliceChange{m_A.name, Axis::Rows, old_count, kept, added});
    change.changes.push_back(SliceChange{m_B.name, Axis::Cols, old_count, std::move(kept), added});
    return change;
  }

  Base m_base;
  LoRAOptions m_options;
  Index m_scale_rank = 0;
  std::optional<double> m_exact_scale;  // set_scale(): overrides alpha / r0
  Parameter<Scalar> m_A;
  Parameter<Scalar> m_B;
  VectorType m_gates;
  bool m_unit_gates = true;
  bool m_enabled = true;
  detail::MergedWeight<Scalar> m_merge;
  bool m_training = true;
  Index m_cached_cols = -1;
  Random m_dropout_rng;
  // Buffers reused across steps, so a steady-state step does not allocate.
  MatrixType m_x;          // input of the adapter branch (after dropout), in x n
  const MatrixType* m_borrowed_x = nullptr;  // or the caller's input, after forward_borrowed()
  MatrixType m_mask;       // dropout mask scaled by 1/(1-p), in x n
  MatrixType m_u;          // diag(g) A x, r x n
  MatrixType m_t;          // diag(g) s B^T dy, r x n
  MatrixType m_dx_branch;  // A^T t before the dropout mask, in x n
  MatrixType m_dA_t;       // this batch's dA, transposed (in x r)
  struct GradientProbe {
    bool armed = false;
    Index cols = -1;  // columns of the batch whose input was captured
    long batches = 0;
    MatrixType right, left;          // in x k, out x k
    MatrixType right_sum, left_sum;  // out x k, k x in
    MatrixType p, q, x;              // right^T x (k x n), left^T dy (k x n), the input (in x n)
  } m_probe;
};

static_assert(Layer<LoRA<float>>, "LoRA must model the Layer contract");
static_assert(RankAdjustable<LoRA<float>>, "LoRA must be rank-adjustable");
static_assert(Mergeable<LoRA<float>>, "LoRA must be mergeable");

}  // namespace rankwise
