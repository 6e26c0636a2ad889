// Tests for rankwise/layers/linear.hpp, and the backward rule of docs/concepts/layer.md.
#include <rankwise/layers/linear.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/borrowing.hpp"
#include "support/matchers.hpp"

#include <catch2/catch.hpp>

using rankwise::Index;
using rankwise::Linear;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::Vector;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

TEMPLATE_TEST_CASE("Linear: forward computes W x + b", "[layers][linear]", float, double) {
  Random rng(1);
  Linear<TestType> layer(5, 3, rng);
  const Matrix<TestType> x = random_matrix<TestType>(5, 4, rng);
  Matrix<TestType> y;
  layer.forward(x, y);
  Matrix<TestType> expected = layer.weight() * x;
  expected.colwise() += layer.bias().col(0);
  CHECK_THAT(y, is_close_to(expected));
  CHECK(layer.in_features() == 5);
  CHECK(layer.out_features() == 3);
  CHECK(layer.parameter_count() == 5 * 3 + 3);
}

TEST_CASE("Linear: init matches PyTorch's bound 1/sqrt(in)", "[layers][linear]") {
  Random rng(2);
  Linear<float> layer(256, 64, rng);
  CHECK(layer.weight().cwiseAbs().maxCoeff() <= 1.0f / 16.0f);
  CHECK(layer.bias().cwiseAbs().maxCoeff() <= 1.0f / 16.0f);
  CHECK(layer.weight().cwiseAbs().maxCoeff() > 0.06f);
}

TEST_CASE("Linear: backward matches finite differences", "[layers][linear][gradcheck]") {
  Random rng(3);
  SECTION("with bias") {
    Linear<double> layer(6, 4, rng);
    const auto result = rankwise::testing::check_gradients(layer, random_matrix<double>(6, 5, rng), rng);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
    CHECK(result.entries.size() == 3);  // input, weight, bias
  }
  SECTION("without bias") {
    Linear<double> layer(3, 7, rng, {.bias = false});
    const auto result = rankwise::testing::check_gradients(layer, random_matrix<double>(3, 2, rng), rng);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
    CHECK(result.entries.size() == 2);
  }
  SECTION("frozen: only the input gradient") {
    Linear<double> layer(4, 4, rng, {.trainable = false});
    const auto result = rankwise::testing::check_gradients(layer, random_matrix<double>(4, 3, rng), rng);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
    CHECK(result.entries.size() == 1);
  }
}

TEST_CASE("Layer contract: backward accumulates parameter gradients and assigns dx", "[layers][linear][concepts]") {
  Random rng(4);
  Linear<double> layer(3, 2, rng);
  const Matrix<double> x = random_matrix<double>(3, 4, rng);
  const Matrix<double> dy = random_matrix<double>(2, 4, rng);
  Matrix<double> y, dx;
  layer.zero_grad();
  layer.forward(x, y);
  layer.backward(dy, dx);
  const Matrix<double> dw_once = layer.weight_parameter().grad;
  const Matrix<double> db_once = layer.bias_parameter().grad;
  CHECK_THAT(dw_once, is_close_to(Matrix<double>(dy * x.transpose()), 1e-12, 1e-12));
  CHECK_THAT(db_once, is_close_to(Matrix<double>(dy.rowwise().sum()), 1e-12, 1e-12));

  dx.setConstant(100.0);  // whatever dx held before is overwritten, not added to
  layer.forward(x, y);
  layer.backward(dy, dx);
  CHECK_THAT(dx, is_close_to(Matrix<double>(layer.weight().transpose() * dy), 1e-12, 1e-12));
  CHECK_THAT(layer.weight_parameter().grad, is_close_to(Matrix<double>(2.0 * dw_once), 1e-12, 1e-12));
  CHECK_THAT(layer.bias_parameter().grad, is_close_to(Matrix<double>(2.0 * db_once), 1e-12, 1e-12));

  layer.zero_grad();
  CHECK(layer.weight_parameter().grad.isZero(0.0));
}

TEST_CASE("Linear: a frozen layer accumulates nothing and keeps no input copy", "[layers][linear]") {
  Random rng(5);
  Linear<float> layer(3, 3, rng, {.trainable = false});
  Matrix<float> y, dx;
  layer.forward(random_matrix<float>(3, 2, rng), y);
  layer.backward(random_matrix<float>(3, 2, rng), dx);
  CHECK(layer.weight_parameter().grad.isZero(0.0f));
  CHECK(layer.bias_parameter().grad.isZero(0.0f));
  CHECK_FALSE(layer.weight_parameter().trainable);
  CHECK(dx.rows() == 3);
}

TEST_CASE("Linear: set_path names the parameters after the module", "[layers][linear]") {
  Random rng(6);
  Linear<float> layer(2, 2, rng);
  layer.set_path("layers.0.mlp.up_proj");
  CHECK(layer.weight_parameter().name == "layers.0.mlp.up_proj.weight");
  CHECK(layer.bias_parameter().name == "layers.0.mlp.up_proj.bias");
}

TEST_CASE("Linear: bad input and wrong call order are rejected", "[layers][linear][errors]") {
  Random rng(7);
  Linear<float> layer(4, 3, rng);
  Matrix<float> y, dx;
  SECTION("input with the wrong number of rows") {
    CHECK_THROWS_WITH(layer.forward(Matrix<float>::Zero(5, 2), y),
                      Catch::Contains("[rankwise::Linear]") && Catch::Contains("in_features = 4") &&
                          Catch::Contains("got 5 x 2"));
  }
  SECTION("backward before any forward") {
    CHECK_THROWS_AS(layer.backward(Matrix<float>::Zero(3, 2), dx), rankwise::StateError);
  }
  SECTION("backward after an eval-mode forward") {
    layer.set_training(false);
    layer.forward(Matrix<float>::Zero(4, 2), y);
    CHECK_THROWS_AS(layer.backward(Matrix<float>::Zero(3, 2), dx), rankwise::StateError);
  }
  SECTION("dy of another batch size") {
    layer.forward(Matrix<float>::Zero(4, 2), y);
    CHECK_THROWS_WITH(layer.backward(Matrix<float>::Zero(3, 5), dx), Catch::Contains("dy must be 3 x 2"));
  }
  SECTION("empty shapes and mismatched bias") {
    CHECK_THROWS_AS(Linear<float>(0, 3, rng), rankwise::InvalidArgument);
    CHECK_THROWS_WITH(Linear<float>(Matrix<float>::Ones(3, 2), Vector<float>::Ones(2)),
                      Catch::Contains("bias must have out_features = 3 entries (got 2)"));
    CHECK_THROWS_AS(layer.assign_weight(Matrix<float>::Zero(4, 3)), rankwise::InvalidArgument);
  }
}

TEST_CASE("Linear: bias can be added and removed for merges", "[layers][linear]") {
  Random rng(8);
  Linear<float> layer(Matrix<float>::Ones(2, 3));
  CHECK_FALSE(layer.has_bias());
  CHECK(layer.parameters().size() == 1);
  layer.assign_bias(Matrix<float>::Constant(2, 1, 0.5f));
  CHECK(layer.has_bias());
  Matrix<float> y;
  layer.forward(Matrix<float>::Ones(3, 1), y);
  CHECK(y(0, 0) == 3.5f);
  layer.drop_bias();
  layer.forward(Matrix<float>::Ones(3, 1), y);
  CHECK(y(0, 0) == 3.0f);
}

TEST_CASE("Linear: frozen weights keep no gradient storage, unfreezing works, flipping the flag alone is caught",
          "[layers][linear][errors]") {
  Random rng(9);
  Linear<float> layer(4, 3, rng, {.trainable = false});
  CHECK(layer.weight_parameter().grad.size() == 0);
  Matrix<float> y, dx;
  const Matrix<float> x = random_matrix<float>(4, 2, rng), dy = random_matrix<float>(3, 2, rng);
  layer.set_trainable(true);
  layer.forward(x, y);
  layer.backward(dy, dx);
  CHECK_THAT(layer.weight_parameter().grad, is_close_to(Matrix<float>(dy * x.transpose())));
  layer.set_trainable(false);
  CHECK(layer.weight_parameter().grad.size() == 0);
  layer.weight_parameter().trainable = true;  // bypassing set_trainable(): no gradient storage yet
  layer.forward(x, y);
  CHECK_THROWS_WITH(layer.backward(dy, dx), Catch::Contains("call zero_grad()"));
}

TEST_CASE("Linear: forward_borrowed keeps a reference to the input and computes exactly what forward does",
          "[layers][linear][gradcheck]") {
  Random rng(9);
  Linear<double> layer(6, 4, rng);
  rankwise::test_support::Borrowing<Linear<double>> borrowing(layer);
  const auto result = rankwise::testing::check_gradients(borrowing, random_matrix<double>(6, 5, rng), rng);
  INFO(result.worst);
  CHECK(result.max_error < 1e-7);
  CHECK(result.entries.size() == 3);

  // Same outputs and gradients as the copying forward(), bit for bit.
  Linear<float> copying(7, 5, rng), borrowing_layer = copying;
  const Matrix<float> x = random_matrix<float>(7, 6, rng), dy = random_matrix<float>(5, 6, rng);
  Matrix<float> y1, y2, dx1, dx2;
  copying.forward(x, y1);
  copying.backward(dy, dx1);
  borrowing_layer.forward_borrowed(x, y2);
  borrowing_layer.backward(dy, dx2);
  CHECK(y1 == y2);
  CHECK(dx1 == dx2);
  CHECK(copying.weight_parameter().grad == borrowing_layer.weight_parameter().grad);
  CHECK(copying.bias_parameter().grad == borrowing_layer.bias_parameter().grad);

  // A borrowed input that changed shape before backward() is caught; temporaries are not accepted.
  Matrix<float> shrinking = x;
  borrowing_layer.forward_borrowed(shrinking, y2);
  shrinking.resize(7, 2);
  CHECK_THROWS_AS(borrowing_layer.backward(dy, dx2), rankwise::StateError);
  static_assert(!rankwise::test_support::BorrowsTemporaries<Linear<float>>);
}
