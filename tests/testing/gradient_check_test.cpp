// Tests for rankwise/testing/gradient_check.hpp: the checker must catch a wrong gradient.
#include <rankwise/layers/linear.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;

namespace {
// A Linear whose backward forgets the bias gradient and scales dx: a checker must notice both.
class BrokenLinear {
 public:
  using Scalar = double;
  explicit BrokenLinear(Random& rng, double dx_scale, bool drop_bias_grad)
      : m_inner(3, 2, rng), m_dx_scale(dx_scale), m_drop_bias_grad(drop_bias_grad) {}
  Index in_features() const { return 3; }
  Index out_features() const { return 2; }
  void forward(const rankwise::ConstRef<double>& x, Matrix<double>& y) { m_inner.forward(x, y); }
  void backward(const rankwise::ConstRef<double>& dy, Matrix<double>& dx) {
    m_inner.backward(dy, dx);
    dx *= m_dx_scale;
    if (m_drop_bias_grad) m_inner.bias_parameter().grad.setZero();
  }
  std::vector<rankwise::Parameter<double>*> parameters() { return m_inner.parameters(); }
  void set_training(bool t) { m_inner.set_training(t); }
  bool is_training() const { return m_inner.is_training(); }
  void zero_grad() { m_inner.zero_grad(); }

 private:
  rankwise::Linear<double> m_inner;
  double m_dx_scale;
  bool m_drop_bias_grad;
};
static_assert(rankwise::Layer<BrokenLinear>);
}  // namespace

TEST_CASE("check_gradients: a correct layer passes, a wrong one fails where it is wrong", "[testing][gradcheck]") {
  Random rng(1);
  const Matrix<double> x = rankwise::test_support::random_matrix<double>(3, 4, rng);
  BrokenLinear correct(rng, 1.0, false);
  const auto ok = rankwise::testing::check_gradients(correct, x, rng);
  CHECK(ok.max_error < 1e-7);
  CHECK(ok.checked_values == 3 * 4 + 3 * 2 + 2);

  BrokenLinear wrong_dx(rng, 1.5, false);
  const auto bad_dx = rankwise::testing::check_gradients(wrong_dx, x, rng);
  CHECK(bad_dx.max_error > 0.1);
  CHECK(bad_dx.entries[0].name == "input");
  CHECK(bad_dx.entries[0].max_error > 0.1);
  CHECK(bad_dx.entries[1].max_error < 1e-7);

  BrokenLinear wrong_bias(rng, 1.0, true);
  const auto bad_bias = rankwise::testing::check_gradients(wrong_bias, x, rng);
  CHECK(bad_bias.max_error > 0.1);
  CHECK_THAT(bad_bias.worst, Catch::StartsWith("bias"));
}

namespace {
// Detaches row 0 of its weight, as DyLoRA detaches its frozen components: that row's gradient is zero.
class DetachingLinear {
 public:
  using Scalar = double;
  explicit DetachingLinear(Random& rng) : m_inner(3, 2, rng) {
    m_inner.weight_parameter().update_window = rankwise::UpdateWindow{rankwise::Axis::Rows, 1, 2};
  }
  Index in_features() const { return 3; }
  Index out_features() const { return 2; }
  void forward(const rankwise::ConstRef<double>& x, Matrix<double>& y) { m_inner.forward(x, y); }
  void backward(const rankwise::ConstRef<double>& dy, Matrix<double>& dx) {
    const Matrix<double> before = m_inner.weight_parameter().grad.row(0);
    m_inner.backward(dy, dx);
    m_inner.weight_parameter().grad.row(0) = before;  // nothing accumulates into the detached row
  }
  std::vector<rankwise::Parameter<double>*> parameters() { return m_inner.parameters(); }
  void set_training(bool t) { m_inner.set_training(t); }
  bool is_training() const { return m_inner.is_training(); }
  void zero_grad() { m_inner.zero_grad(); }
  rankwise::Linear<double>& inner() { return m_inner; }

 private:
  rankwise::Linear<double> m_inner;
};
}  // namespace

TEST_CASE("check_gradients: slices outside an update window must have a zero gradient", "[testing][gradcheck]") {
  Random rng(2);
  const Matrix<double> x = rankwise::test_support::random_matrix<double>(3, 4, rng);
  DetachingLinear detaching(rng);
  const auto ok = rankwise::testing::check_gradients(detaching, x, rng);
  INFO(ok.worst);
  CHECK(ok.max_error < 1e-7);
  CHECK(ok.checked_values == 3 * 4 + 3 * 2 + 2);

  // A plain Linear with the same window still writes row 0's true (non-zero) gradient: caught.
  rankwise::Linear<double> layer(3, 2, rng);
  layer.weight_parameter().update_window = rankwise::UpdateWindow{rankwise::Axis::Rows, 1, 2};
  const auto leaking = rankwise::testing::check_gradients(layer, x, rng);
  CHECK(leaking.max_error > 1e-3);
  CHECK_THAT(leaking.worst, Catch::StartsWith("weight(0,"));
}
