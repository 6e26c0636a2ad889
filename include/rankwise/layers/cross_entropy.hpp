#pragma once
/// \file rankwise/layers/cross_entropy.hpp
/// Cross-entropy of logits against target ids (next-token prediction), as PyTorch's
/// F.cross_entropy(logits, targets, ignore_index=-100, reduction="mean"); and against soft targets
/// (a teacher's distributions).
///
///   p_:,t = softmax(z_:,t)     L = -(1/N) sum over scored t of log p_(y_t),t     (N = scored tokens)
///   dL/dz_:,t = (p_:,t - onehot(y_t)) / N for scored t, 0 for ignored ones
///   soft:  L = -(1/N) sum_t sum_c q_c,t log p_c,t,  dL/dz = (p - q) / N
/// Sums are accumulated in double. With no scored token, L = 0 and the gradient is 0 (PyTorch gives NaN).
/// Docs: docs/layers/cross-entropy.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/types.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace rankwise {

inline constexpr std::int32_t ignore_index = -100;

template <FloatScalar Scalar_>
class CrossEntropy {
 public:
  using Scalar = Scalar_;
  using MatrixType = Matrix<Scalar>;

  /// Mean loss over the tokens whose target is not ignore_index; keeps softmax(logits) for backward().
  double forward(const ConstRef<Scalar>& logits, std::span<const std::int32_t> targets) {
    if (Index(targets.size()) != logits.cols())
      detail::fail("rankwise::CrossEntropy", "need one target per column of the logits (got ", targets.size(),
                   " targets for ", logits.cols(), " columns)");
    for (std::size_t t = 0; t < targets.size(); ++t)
      if (targets[t] != ignore_index && (targets[t] < 0 || targets[t] >= logits.rows()))
        detail::fail("rankwise::CrossEntropy", "target at position ", t, " must be in [0, ", logits.rows(),
                     ") or ignore_index (got ", targets[t], ")");
    softmax(logits);
    m_targets.assign(targets.begin(), targets.end());
    m_soft = false;
    double sum = 0.0;
    m_count = 0;
    for (std::size_t t = 0; t < targets.size(); ++t) {
      if (targets[t] == ignore_index) continue;
      sum -= double(logits(targets[t], Index(t))) - m_log_norm(Index(t));  // -log p_(y_t),t
      ++m_count;
    }
    return m_count ? sum / double(m_count) : 0.0;
  }

  /// Mean soft cross-entropy over the columns with mask[t] != 0 (an empty mask scores every column).
  /// Each column of `target_probs` must be a distribution.
  double forward_soft(const ConstRef<Scalar>& logits, const ConstRef<Scalar>& target_probs,
                      std::span<const std::uint8_t> mask = {}) {
    if (target_probs.rows() != logits.rows() || target_probs.cols() != logits.cols())
      detail::fail("rankwise::CrossEntropy", "soft targets must be ", logits.rows(), " x ", logits.cols(), " (got ",
                   target_probs.rows(), " x ", target_probs.cols(), ")");
    if (!mask.empty() && Index(mask.size()) != logits.cols())
      detail::fail("rankwise::CrossEntropy", "mask must have ", logits.cols(), " entries (got ", mask.size(), ")");
    softmax(logits);
    m_q = target_probs;
    m_soft = true;
    m_mask.assign(mask.begin(), mask.end());
    double sum = 0.0;
    m_count = 0;
    for (Index t = 0; t < logits.cols(); ++t) {
      if (!mask.empty() && mask[std::size_t(t)] == 0) continue;
      ++m_count;
      for (Index c = 0; c < logits.rows(); ++c)
        if (target_probs(c, t) > Scalar(0))
          sum -= double(target_probs(c, t)) * (double(logits(c, t)) - m_log_norm(t));
    }
    return m_count ? sum / double(m_count) : 0.0;
  }

  /// dL/dlogits of the last forward (assigned).
  void backward(MatrixType& dlogits) const {
    if (m_probs.size() == 0) detail::fail<StateError>("rankwise::CrossEntropy", "backward() needs a forward() first");
    dlogits.resize(m_probs.rows(), m_probs.cols());
    const Scalar inv = m_count ? Scalar(1.0 / double(m_count)) : Scalar(0);
    for (Index t = 0; t < m_probs.cols(); ++t) {
      const bool scored = m_soft ? (m_mask.empty() || m_mask[std::size_t(t)] != 0)
                                 : m_targets[std::size_t(t)] != ignore_index;
      if (!scored) {
        dlogits.col(t).setZero();
        continue;
      }
      dlogits.col(t) = m_probs.col(t) * inv;
      if (m_soft)
        dlogits.col(t) -= m_q.col(t) * inv;
      else
        dlogits(m_targets[std::size_t(t)], t) -= inv;
    }
  }

  /// softmax(logits) of the last forward.
  const MatrixType& probabilities() const { return m_probs; }
  /// Tokens scored by the last forward.
  Index scored() const { return m_count; }

 private:
  void softmax(const ConstRef<Scalar>& logits) {
    m_probs.resize(logits.rows(), logits.cols());
    m_log_norm.resize(logits.cols());
    for (Index t = 0; t < logits.cols(); ++t) {
      const Scalar top = logits.col(t).maxCoeff();
      m_probs.col(t) = (logits.col(t).array() - top).exp();
      double sum = 0.0;
      for (Index c = 0; c < logits.rows(); ++c) sum += double(m_probs(c, t));
      m_probs.col(t) /= Scalar(sum);
      m_log_norm(t) = double(top) + std::log(sum);
    }
  }

  MatrixType m_probs, m_q;
  Eigen::Matrix<double, Eigen::Dynamic, 1> m_log_norm;
  std::vector<std::int32_t> m_targets;
  std::vector<std::uint8_t> m_mask;
  bool m_soft = false;
  Index m_count = 0;
};

}  // namespace rankwise
