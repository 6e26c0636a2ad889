// Test helper: a Layer that runs a layer's forward_borrowed() the way a model does, on an input
// buffer that stays alive and unchanged until the next forward(), so that the generic gradient
// checker and comparisons apply to the borrowing path.
#pragma once

#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>

#include <vector>

namespace rankwise::test_support {

template <typename L>
class Borrowing {
 public:
  using Scalar = typename L::Scalar;
  explicit Borrowing(L& layer) : m_layer(layer) {}
  Index in_features() const { return m_layer.in_features(); }
  Index out_features() const { return m_layer.out_features(); }
  void forward(const ConstRef<Scalar>& x, Matrix<Scalar>& y) {
    m_input = x;
    m_layer.forward_borrowed(m_input, y);
  }
  void backward(const ConstRef<Scalar>& dy, Matrix<Scalar>& dx) { m_layer.backward(dy, dx); }
  std::vector<Parameter<Scalar>*> parameters() { return m_layer.parameters(); }
  void set_training(bool training) { m_layer.set_training(training); }
  bool is_training() const { return m_layer.is_training(); }
  void zero_grad() { m_layer.zero_grad(); }
  /// The buffer the layer borrows (a test may change it to check misuse is caught).
  Matrix<Scalar>& input() { return m_input; }

 private:
  L& m_layer;
  Matrix<Scalar> m_input;
};

/// True when forward_borrowed() accepts a temporary (it must not: the reference would dangle).
template <typename L>
concept BorrowsTemporaries = requires(L& layer, Matrix<typename L::Scalar>& y) {
  layer.forward_borrowed(Matrix<typename L::Scalar>(), y);
};

}  // namespace rankwise::test_support
