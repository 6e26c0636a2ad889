#pragma once
/// \file rankwise/adapters/dylora.hpp
/// DyLoRA: one LoRA pair of maximum rank r_max trained so that every leading truncation works.
/// Valipour et al., 2023, arXiv:2210.07558. Also the adapter of ERAT-DLoRA (rank/erat_sampler.hpp).
///
///   y = W x + b + (alpha / b) B[:, :b] A[:b, :] x      b = the active rank, 1 <= b <= r_max
///   shapes  x: in x n, A: r_max x in ("lora_A"), B: out x r_max ("lora_B")
///   init    A ~ kaiming_uniform(a = sqrt(5)) = U(+-1/sqrt(in)), B = 0 (as loralib)
///   train   the window [lo, b) of components: frozen mode lo = b - 1 (the official default),
///           non-frozen lo = 0, ERAT any lo < b. Components outside the window get no gradient and,
///           through the parameters' update windows, no optimizer update either (no momentum drift,
///           no weight decay); hold_untrained = false gives PyTorch's drifting behaviour instead.
/// A rank sampler (rank/dylora_sampler.hpp) picks b each step; evaluation, merge and export work at any
/// b <= r_max. Compute scales with b; B A is formed only to merge or export. Docs: docs/adapters/dylora.md

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

struct DyLoRAOptions {
  Index max_rank = 8;          ///< r_max, in [1, min(in, out)]
  double alpha = 16.0;         ///< scale alpha / b at active rank b (the official GLUE scripts: 16 with r_max 8)
  bool frozen = true;          ///< train only component b - 1 (official default); false: all of [0, b)
  bool hold_untrained = true;  ///< components outside the trained window keep value and optimizer state
};

template <FloatScalar Scalar_, typename Base_ = Linear<Scalar_>>
class DyLoRA {
 public:
  using Scalar = Scalar_;
  using Base = Base_;
  using MatrixType = Matrix<Scalar>;

  /// Wraps `base` (taken over and frozen); draws A. The active rank starts at r_max.
  DyLoRA(Base base, const DyLoRAOptions& options, Random& rng) : m_base(std::move(base)), m_options(options) {
    const Index limit = std::min(in_features(), out_features());
    if (options.max_rank < 1 || options.max_rank > limit)
      detail::fail("rankwise::DyLoRA", "max_rank must be in [1, min(in, out)] = [1, ", limit, "] (got ",
                   options.max_rank, ")");
    if (!(options.alpha > 0.0) || !std::isfinite(options.alpha))
      detail::fail("rankwise::DyLoRA", "alpha must be a finite number > 0 (got ", options.alpha, ")");
    m_base.set_trainable(false);
    m_A.name = "lora_A.weight";
    m_B.name = "lora_B.weight";
    m_A.value.resize(options.max_rank, in_features());
    fill_kaiming_uniform(m_A.value, in_features(), rng);
    m_B.value.setZero(out_features(), options.max_rank);
    zero_grad();
    set_active_rank(options.max_rank);
  }

  // --- shapes and settings -------------------------------------------------------------------
  Index in_features() const { return m_base.in_features(); }
  Index out_features() const { return m_base.out_features(); }
  Index max_rank() const { return m_options.max_rank; }
  /// b: the number of leading components forward() uses.
  Index active_rank() const { return m_rank; }
  /// lo: the first trained component; the trained window is [window_begin(), active_rank()).
  Index window_begin() const { return m_lo; }
  double alpha() const { return m_options.alpha; }
  const DyLoRAOptions& options() const { return m_options; }
  /// alpha / b at the active rank.
  double scale() const { return scale_at(m_rank); }
  double scale_at(Index b) const { return m_options.alpha / double(b); }

  const Base& base() const { return m_base; }
  const MatrixType& A() const { return m_A.value; }
  const MatrixType& B() const { return m_B.value; }
  Parameter<Scalar>& A_parameter() { return m_A; }
  Parameter<Scalar>& B_parameter() { return m_B; }

  /// Uses the leading b components; trains [b - 1, b) in frozen mode, [0, b) otherwise.
  void set_active_rank(Index b) {
    check_rank("set_active_rank", b);
    set_window(m_options.frozen ? b - 1 : 0, b);
  }

  /// Uses the leading b components and trains [lo, b) (ERAT-DLoRA's window).
  void set_window(Index lo, Index b) {
    if (lo < 0 || lo >= b || b > max_rank())
      detail::fail("rankwise::DyLoRA", "window [lo, b) must satisfy 0 <= lo < b <= r_max = ", max_rank(), " (got [",
                   lo, ", ", b, "))");
    if (m_merge.is_merged() && b != m_rank)
      detail::fail<StateError>("rankwise::DyLoRA", "cannot change the active rank of a merged adapter (merged at ",
                               m_rank, ", asked ", b, "); unmerge() first");
    m_rank = b;
    m_lo = lo;
    if (m_options.hold_untrained) {
      m_A.update_window = UpdateWindow{Axis::Rows, lo, b};
      m_B.update_window = UpdateWindow{Axis::Cols, lo, b};
    } else {
      m_A.update_window.reset();
      m_B.update_window.reset();
    }
  }

  void set_training(bool training) {
    m_training = training;
    m_base.set_training(training);
    if (!training) m_cached_cols = -1;
  }
  bool is_training() const { return m_training; }

  /// Names its parameters after the module path: "<path>.lora_A.weight", "<path>.base_layer.weight".
  void set_path(const std::string& path) { detail::adapter_set_path(m_base, path, own()); }

  // --- the Layer contract ----------------------------------------------------------------------
  /// y = W x + b + (alpha / b) B[:, :b] A[:b, :] x. In training mode caches what backward() needs.
  void forward(const ConstRef<Scalar>& x, MatrixType& y) {
    if (x.rows() != in_features())
      detail::fail("rankwise::DyLoRA", "forward: input must have in_features = ", in_features(), " rows (got ",
                   x.rows(), " x ", x.cols(), ")");
    m_base.forward(x, y);
    m_cached_cols = m_training ? x.cols() : -1;
    if (m_merge.is_merged()) return;
    const Index b = m_rank;
    // Buffers hold r_max rows, so a step at another rank reuses them instead of reallocating.
    if (m_u.rows() != max_rank() || m_u.cols() != x.cols()) m_u.resize(max_rank(), x.cols());
    if (m_training) m_x = x;
    m_u.topRows(b).noalias() = m_A.value.topRows(b) * x;
    y.noalias() += Scalar(scale_at(b)) * (m_B.value.leftCols(b) * m_u.topRows(b));
    m_cached_rank = b;
  }

  /// Requires forward() in training mode on the same batch at the same active rank, and an unmerged
  /// adapter. Accumulates the gradients of the window [lo, b) only; assigns dx (through all b).
  void backward(const ConstRef<Scalar>& dy, MatrixType& dx) {
    if (m_cached_cols < 0)
      detail::fail<StateError>("rankwise::DyLoRA", "backward() needs a forward() in training mode first");
    if (m_merge.is_merged())
      detail::fail<StateError>("rankwise::DyLoRA", "backward() on a merged adapter; unmerge() first");
    if (dy.rows() != out_features() || dy.cols() != m_cached_cols)
      detail::fail("rankwise::DyLoRA", "backward: dy must be ", out_features(), " x ", m_cached_cols,
                   " like the forward output (got ", dy.rows(), " x ", dy.cols(), ")");
    if (m_cached_rank != m_rank)
      detail::fail<StateError>("rankwise::DyLoRA", "the active rank changed between forward() (", m_cached_rank,
                               ") and backward() (", m_rank, ")");
    m_base.backward(dy, dx);
    const Index b = m_rank, lo = m_lo, len = b - lo;
    const Scalar s = Scalar(scale_at(b));
    if (m_t.rows() != max_rank() || m_t.cols() != dy.cols()) m_t.resize(max_rank(), dy.cols());
    // dL/dU (b x n), scaled apart: at b = 1 Eigen would copy a scaled operand to the heap.
    m_t.topRows(b).noalias() = m_B.value.leftCols(b).transpose() * dy;
    m_t.topRows(b) *= s;
    if (m_B.wants_grad()) m_B.grad.middleCols(lo, len).noalias() += s * (dy * m_u.middleRows(lo, len).transpose());
    if (m_A.wants_grad()) m_A.grad.middleRows(lo, len).noalias() += m_t.middleRows(lo, len) * m_x.transpose();
    dx.noalias() += m_A.value.topRows(b).transpose() * m_t.topRows(b);
  }

  /// The frozen base parameters (flagged non-trainable), then lora_A and lora_B (all r_max components).
  std::vector<Parameter<Scalar>*> parameters() { return detail::adapter_parameters(m_base, own()); }

  void zero_grad() { detail::adapter_zero_grad(m_base, own()); }

  /// r_max (in + out): every component is stored and trained at some step.
  Index trainable_parameter_count() const { return m_A.value.size() + m_B.value.size(); }
  /// b (in + out): what a deployment at rank b keeps.
  Index deployed_parameter_count(Index b) const {
    check_rank("deployed_parameter_count", b);
    return b * (in_features() + out_features());
  }

  // --- merge and export ------------------------------------------------------------------------
  /// Delta W at rank b = (alpha / b) B[:, :b] A[:b, :] (out x in); for merge and export only.
  MatrixType delta_weight(Index b) const {
    check_rank("delta_weight", b);
    return Scalar(scale_at(b)) * (m_B.value.leftCols(b) * m_A.value.topRows(b));
  }
  /// Delta W at the active rank.
  MatrixType delta_weight() const { return delta_weight(m_rank); }

  /// W <- W + delta_weight() at the active rank; unmerge() restores W bit for bit.
  void merge() {
    m_merge.merge(m_base, [this] { return delta_weight(); }, "rankwise::DyLoRA");
  }

  void unmerge() { m_merge.unmerge(m_base, "rankwise::DyLoRA"); }
  bool is_merged() const { return m_merge.is_merged(); }

  /// The plain LoRA of rank b that computes exactly this adapter at rank b: A[:b], B[:, :b], alpha / b.
  LoRAFactors<Scalar> lora_factors(Index b) const {
    check_rank("lora_factors", b);
    return LoRAFactors<Scalar>{m_A.value.topRows(b), m_B.value.leftCols(b), scale_at(b)};
  }
  /// The plain LoRA at the active rank.
  LoRAFactors<Scalar> lora_factors() const { return lora_factors(m_rank); }

 private:
  /// Its own parameters and the suffixes they are named by (adapters/own_parameters.hpp).
  std::array<detail::OwnParameter<Scalar>, 2> own() {
    return {{{&m_A, "lora_A.weight"}, {&m_B, "lora_B.weight"}}};
  }

  void check_rank(const char* what, Index b) const {
    if (b < 1 || b > max_rank())
      detail::fail("rankwise::DyLoRA", what, ": rank b must be in [1, r_max] = [1, ", max_rank(), "] (got ", b, ")");
  }

  Base m_base;
  DyLoRAOptions m_options;
  Parameter<Scalar> m_A;
  Parameter<Scalar> m_B;
  Index m_rank = 0;  // b
  Index m_lo = 0;    // first trained component
  detail::MergedWeight<Scalar> m_merge;
  bool m_training = true;
  Index m_cached_cols = -1;
  Index m_cached_rank = 0;
  // Buffers reused across steps (r_max rows each, used up to the active rank).
  MatrixType m_x;  // input, in x n
  MatrixType m_u;  // A[:b] x, r_max x n
  MatrixType m_t;  // s B[:, :b]^T dy, r_max x n
};

static_assert(Layer<DyLoRA<float>>, "DyLoRA must model the Layer contract");
static_assert(Adapter<DyLoRA<float>>, "DyLoRA must model the Adapter contract");
static_assert(Mergeable<DyLoRA<float>>, "DyLoRA must be mergeable");

/// A DyLoRA adapter the rank samplers' hooks (rank/hooks.hpp) drive, with its module path and (for
/// ERAT) its depth; AdapterSet::dylora_modules() makes them. It never owns the adapter.
template <FloatScalar Scalar>
struct DyLoRAModule {
  std::string path;
  DyLoRA<Scalar>* adapter = nullptr;
  Index depth = 0;  ///< ERAT: the module's layer, 0 .. num_layers - 1 (DyLoRAHook ignores it)
};

}  // namespace rankwise
