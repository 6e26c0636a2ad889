#pragma once
/// \file rankwise/layers/causal_attention.hpp
/// The core of causal multi-head self-attention (Vaswani et al., 2017, arXiv:1706.03762), between the
/// q/k/v projections and the output projection, which are separate (adaptable) linear slots.
///
///   per sequence and head h (dh = d / heads rows of q, k, v):
///   S = K_h^T Q_h / sqrt(dh)         (keys x queries; S_ji = k_j . q_i / sqrt(dh))
///   P = softmax over keys j <= i of column i  (causal: later keys are masked out)
///   O_h = V_h P                      (dh x queries)
///   backward: dV_h = dO_h P^T, dP = V_h^T dO_h, dS_:i = P_:i ⊙ (dP_:i - P_:i . dP_:i) / sqrt(dh),
///             dQ_h = K_h dS, dK_h = Q_h dS^T
///   shapes  q, k, v, o: d x (batch * seq_len), the tokens of one sequence in consecutive columns
/// No parameters. Keeps P (seq_len x seq_len per sequence and head) for backward, and copies of q, k, v
/// (forward) or references to the caller's q, k, v (forward_borrowed). The (sequence, head) pairs are
/// cut into blocks on rankwise's threads (core/parallel.hpp). Docs: docs/layers/attention.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/parallel.hpp>
#include <rankwise/core/types.hpp>

#include <cmath>
#include <limits>
#include <vector>

namespace rankwise {

template <FloatScalar Scalar_>
class CausalSelfAttention {
 public:
  using Scalar = Scalar_;
  using MatrixType = Matrix<Scalar>;

  CausalSelfAttention(Index d_model, Index heads) : m_d(d_model), m_heads(heads) {
    if (d_model < 1 || heads < 1 || d_model % heads != 0)
      detail::fail("rankwise::CausalSelfAttention", "d_model must be a positive multiple of heads (got d_model ",
                   d_model, ", heads ", heads, ")");
  }

  Index d_model() const { return m_d; }
  Index heads() const { return m_heads; }
  Index head_dim() const { return m_d / m_heads; }
  void set_training(bool training) { m_training = training; }
  bool is_training() const { return m_training; }

  /// o = attention(q, k, v) over sequences of seq_len consecutive columns. In training mode keeps copies
  /// of q, k and v for backward().
  void forward(const ConstRef<Scalar>& q, const ConstRef<Scalar>& k, const ConstRef<Scalar>& v, Index seq_len,
               MatrixType& o) {
    compute(q, k, v, seq_len, o);
    m_borrowed = {};
    if (m_training) {
      m_q = q;
      m_k = k;
      m_v = v;
    }
  }

  /// Like forward(), but keeps references to q, k and v instead of copies: they must stay alive and
  /// unchanged until backward() (a model's activation buffers).
  void forward_borrowed(const MatrixType& q, const MatrixType& k, const MatrixType& v, Index seq_len,
                        MatrixType& o) {
    compute(q, k, v, seq_len, o);
    m_borrowed = {&q, &k, &v};
    if (m_training) {  // release the copies a forward() may have made
      m_q.resize(0, 0);
      m_k.resize(0, 0);
      m_v.resize(0, 0);
    }
  }
  void forward_borrowed(const MatrixType&&, const MatrixType&, const MatrixType&, Index, MatrixType&) = delete;
  void forward_borrowed(const MatrixType&, const MatrixType&&, const MatrixType&, Index, MatrixType&) = delete;
  void forward_borrowed(const MatrixType&, const MatrixType&, const MatrixType&&, Index, MatrixType&) = delete;

  /// Gradients of q, k and v (assigned) from the gradient of the output.
  void backward(const ConstRef<Scalar>& dout, MatrixType& dq, MatrixType& dk, MatrixType& dv) {
    if (m_seq_len < 0)
      detail::fail<StateError>("rankwise::CausalSelfAttention", "backward() needs a forward() in training mode first");
    const MatrixType& q = m_borrowed.q ? *m_borrowed.q : m_q;
    const MatrixType& k = m_borrowed.k ? *m_borrowed.k : m_k;
    const MatrixType& v = m_borrowed.v ? *m_borrowed.v : m_v;
    if (q.cols() != m_cols || k.cols() != m_cols || v.cols() != m_cols || q.rows() != m_d || k.rows() != m_d ||
        v.rows() != m_d)
      detail::fail<StateError>("rankwise::CausalSelfAttention", "backward: the borrowed q, k or v changed shape");
    if (dout.rows() != m_d || dout.cols() != m_cols)
      detail::fail("rankwise::CausalSelfAttention", "backward: dout must be ", m_d, " x ", m_cols, " (got ",
                   dout.rows(), " x ", dout.cols(), ")");
    const Index n = m_cols, T = m_seq_len, dh = head_dim(), pairs = (n / T) * m_heads;
    const Scalar scale = Scalar(1.0 / std::sqrt(double(dh)));
    dq.resize(m_d, n);
    dk.resize(m_d, n);
    dv.resize(m_d, n);
    const Index parts = prepare_scratch(pairs, T);
    // Each (sequence, head) pair is independent: parts of consecutive pairs, one scratch per part.
    auto part = [&](Index p) {
      const auto [first, last] = detail::part_range(pairs, parts, p, 1);
      Scratch& scratch = m_scratch[std::size_t(p)];
      MatrixType& dS = scratch.matrix;
      for (Index pair = first; pair < last; ++pair) {
        const Index b = pair / m_heads, h = pair % m_heads;
        const auto P = m_P.middleCols(pair * T, T);
        const auto dO = dout.block(h * dh, b * T, dh, T);
        dv.block(h * dh, b * T, dh, T).noalias() = dO * P.transpose();
        dS.noalias() = v.block(h * dh, b * T, dh, T).transpose() * dO;  // dP
        // dS_:i = P_:i (dP_:i - P_:i . dP_:i) / sqrt(dh); P is exactly 0 above the causal limit, so
        // whole columns are computed at once and the masked entries stay 0.
        scratch.row.noalias() = (P.array() * dS.array()).matrix().colwise().sum();
        dS.array() = P.array() * (dS.array().rowwise() - scratch.row.array()) * scale;
        dq.block(h * dh, b * T, dh, T).noalias() = k.block(h * dh, b * T, dh, T) * dS;
        dk.block(h * dh, b * T, dh, T).noalias() = q.block(h * dh, b * T, dh, T) * dS.transpose();
      }
    };
    detail::parallel_parts(parts, part);  // one part: on the calling thread
  }

  /// The attention weights of the last forward: column i of block (b, h) is query i's distribution.
  const MatrixType& probabilities() const { return m_P; }

 private:
  void compute(const ConstRef<Scalar>& q, const ConstRef<Scalar>& k, const ConstRef<Scalar>& v, Index seq_len,
               MatrixType& o) {
    check_inputs(q, k, v, seq_len);
    const Index n = q.cols(), T = seq_len, dh = head_dim(), pairs = (n / T) * m_heads;
    const Scalar scale = Scalar(1.0 / std::sqrt(double(dh)));
    m_P.resize(T, pairs * T);
    o.resize(m_d, n);
    const Index parts = detail::parts_for(pairs, 4);  // backward's cut (prepare_scratch), without its scratch
    auto part = [&](Index p) {
      const auto [first, last] = detail::part_range(pairs, parts, p, 1);
      for (Index pair = first; pair < last; ++pair) {
        const Index b = pair / m_heads, h = pair % m_heads;
        auto P = m_P.middleCols(pair * T, T);
        P.noalias() = k.block(h * dh, b * T, dh, T).transpose() * q.block(h * dh, b * T, dh, T);
        for (Index i = 0; i < T; ++i) {  // column i: query i over keys 0..i
          auto col = P.col(i);
          const Scalar top = col.head(i + 1).maxCoeff();
          col.head(i + 1) = ((col.head(i + 1).array() - top) * scale).exp();
          col.head(i + 1) /= col.head(i + 1).sum();
          col.tail(T - i - 1).setZero();
        }
        o.block(h * dh, b * T, dh, T).noalias() = v.block(h * dh, b * T, dh, T) * P;
      }
    };
    detail::parallel_parts(parts, part);  // one part: on the calling thread
    m_seq_len = m_training ? T : -1;
    m_cols = n;
  }

  /// The cut of `pairs` (sequence, head) pairs into parts (one per thread, at least 4 pairs each)
  /// and a scratch per part for backward, allocated only when the shapes change.
  Index prepare_scratch(Index pairs, Index T) {
    const Index parts = detail::parts_for(pairs, 4);
    if (Index(m_scratch.size()) < parts) m_scratch.resize(std::size_t(parts));
    for (Index p = 0; p < parts; ++p) {
      Scratch& scratch = m_scratch[std::size_t(p)];
      scratch.matrix.resize(T, T);
      scratch.row.resize(1, T);
    }
    return parts;
  }

  void check_inputs(const ConstRef<Scalar>& q, const ConstRef<Scalar>& k, const ConstRef<Scalar>& v,
                    Index seq_len) const {
    if (q.rows() != m_d || k.rows() != m_d || v.rows() != m_d || k.cols() != q.cols() || v.cols() != q.cols())
      detail::fail("rankwise::CausalSelfAttention", "q, k and v must all be ", m_d, " x n (got ", q.rows(), " x ",
                   q.cols(), ", ", k.rows(), " x ", k.cols(), ", ", v.rows(), " x ", v.cols(), ")");
    if (seq_len < 1 || q.cols() % seq_len != 0)
      detail::fail("rankwise::CausalSelfAttention", "the number of tokens (", q.cols(),
                   ") must be a multiple of seq_len (got ", seq_len, ")");
  }

  Index m_d;
  Index m_heads;
  bool m_training = true;
  Index m_seq_len = -1;
  Index m_cols = 0;
  MatrixType m_P, m_q, m_k, m_v;  // m_q, m_k, m_v: copies made by forward()
  struct Scratch {
    MatrixType matrix;                             // dP, then dS, of one pair (backward)
    Eigen::Matrix<Scalar, 1, Eigen::Dynamic> row;  // column maxima, sums or dot products
  };
  std::vector<Scratch> m_scratch;  // one per part of the cut (core/parallel.hpp)
  struct Borrowed {
    const MatrixType* q = nullptr;
    const MatrixType* k = nullptr;
    const MatrixType* v = nullptr;
  } m_borrowed;  // the caller's q, k, v after forward_borrowed()
};

}  // namespace rankwise
