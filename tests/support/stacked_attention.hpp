#pragma once
// A test's view of rankwise::CausalSelfAttention as a Layer: its input is [q; k; v] stacked (3d x n),
// so that the generic gradient checker and the step helpers apply to it.
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/layers/causal_attention.hpp>

#include <vector>

namespace rankwise::test_support {

template <typename Scalar_>
class StackedAttention {
 public:
  using Scalar = Scalar_;
  // borrow: q, k, v are copied into buffers of this object, which forward_borrowed() keeps references to.
  StackedAttention(rankwise::Index d, rankwise::Index heads, rankwise::Index seq_len, bool borrow = false)
      : m_attention(d, heads), m_d(d), m_seq_len(seq_len), m_borrow(borrow) {}
  rankwise::Index in_features() const { return 3 * m_d; }
  rankwise::Index out_features() const { return m_d; }
  void forward(const rankwise::ConstRef<Scalar>& x, rankwise::Matrix<Scalar>& y) {
    if (!m_borrow) {
      m_attention.forward(x.topRows(m_d), x.middleRows(m_d, m_d), x.bottomRows(m_d), m_seq_len, y);
      return;
    }
    m_q = x.topRows(m_d);
    m_k = x.middleRows(m_d, m_d);
    m_v = x.bottomRows(m_d);
    m_attention.forward_borrowed(m_q, m_k, m_v, m_seq_len, y);
  }
  void backward(const rankwise::ConstRef<Scalar>& dy, rankwise::Matrix<Scalar>& dx) {
    rankwise::Matrix<Scalar> dq, dk, dv;
    m_attention.backward(dy, dq, dk, dv);
    dx.resize(3 * m_d, dy.cols());
    dx << dq, dk, dv;
  }
  std::vector<rankwise::Parameter<Scalar>*> parameters() { return {}; }
  void set_training(bool t) { m_attention.set_training(t); }
  bool is_training() const { return m_attention.is_training(); }
  void zero_grad() {}
  rankwise::CausalSelfAttention<Scalar> m_attention;

 private:
  rankwise::Index m_d, m_seq_len;
  bool m_borrow;
  rankwise::Matrix<Scalar> m_q, m_k, m_v;
};
static_assert(rankwise::Layer<StackedAttention<double>>);

}  // namespace rankwise::test_support
