// Tests for rankwise/layers/layer_norm.hpp, gelu.hpp, embedding.hpp, causal_attention.hpp and
// cross_entropy.hpp: the blocks of the toy transformer.
#include <rankwise/layers/causal_attention.hpp>
#include <rankwise/layers/cross_entropy.hpp>
#include <rankwise/layers/embedding.hpp>
#include <rankwise/layers/gelu.hpp>
#include <rankwise/layers/layer_norm.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/matchers.hpp"
#include "support/stacked_attention.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

using StackedAttention = rankwise::test_support::StackedAttention<double>;

TEST_CASE("LayerNorm: normalises every token and matches finite differences", "[layers][layer_norm][gradcheck]") {
  Random rng(1);
  rankwise::LayerNorm<double> norm(6);
  const Matrix<double> x = random_matrix<double>(6, 5, rng) * 3.0;
  Matrix<double> y;
  norm.forward(x, y);
  for (Index t = 0; t < 5; ++t) {
    CHECK(y.col(t).mean() == Approx(0.0).margin(1e-12));
    CHECK(y.col(t).squaredNorm() / 6.0 == Approx(1.0).epsilon(1e-4));  // var / (var + eps)
  }
  norm.gamma().value = random_matrix<double>(6, 1, rng);
  norm.beta().value = random_matrix<double>(6, 1, rng);
  const auto result = rankwise::testing::check_gradients(norm, x, rng);
  INFO(result.worst);
  CHECK(result.max_error < 1e-7);
  CHECK_THROWS_WITH(rankwise::LayerNorm<float>(4, {.eps = 0.0}), Catch::Contains("eps must be"));
}

TEST_CASE("GELU: exact erf form, with its derivative", "[layers][gelu][gradcheck]") {
  Random rng(2);
  rankwise::GELU<double> gelu(4);
  Matrix<double> x(4, 1), y;
  x << -2.0, 0.0, 0.5, 3.0;
  gelu.forward(x, y);
  CHECK(y(0, 0) == Approx(-0.04550026389635842));
  CHECK(y(1, 0) == 0.0);
  CHECK(y(2, 0) == Approx(0.3457312306246149));
  CHECK(y(3, 0) == Approx(2.9959502053));
  const auto result = rankwise::testing::check_gradients(gelu, random_matrix<double>(4, 6, rng), rng);
  CHECK(result.max_error < 1e-7);
}

TEST_CASE("Embedding: looks rows up and accumulates repeated ids", "[layers][embedding]") {
  Random rng(3);
  rankwise::Embedding<double> table(5, 3, rng);
  const std::vector<std::int32_t> ids = {4, 1, 4};
  Matrix<double> y;
  table.forward(ids, y);
  CHECK(y.col(0) == table.weight().value.row(4).transpose());
  CHECK(y.col(1) == table.weight().value.row(1).transpose());
  const Matrix<double> dy = random_matrix<double>(3, 3, rng);
  table.zero_grad();
  table.backward(dy);
  CHECK_THAT(Matrix<double>(table.weight().grad.row(4).transpose()),
             is_close_to(Matrix<double>(dy.col(0) + dy.col(2)), 1e-14, 1e-14));
  CHECK(table.weight().grad.row(0).isZero(0.0));
  const std::vector<std::int32_t> bad = {5};
  CHECK_THROWS_WITH(table.forward(bad, y), Catch::Contains("[0, 5) (got 5)"));
}

TEST_CASE("CausalSelfAttention: causal, normalised, and matches finite differences", "[layers][attention][gradcheck]") {
  Random rng(4);
  const Index d = 8, heads = 2, T = 5, batches = 2;
  StackedAttention layer(d, heads, T);
  const Matrix<double> x = random_matrix<double>(3 * d, batches * T, rng);
  Matrix<double> y;
  layer.forward(x, y);
  const Matrix<double>& P = layer.m_attention.probabilities();
  for (Index c = 0; c < P.cols(); ++c) {
    const Index i = c % T;
    CHECK(P.col(c).sum() == Approx(1.0));
    CHECK(P.col(c).tail(T - i - 1).isZero(0.0));  // no query sees a later key
  }
  // Changing a later token of a sequence never changes an earlier output.
  Matrix<double> x2 = x, y2;
  x2.col(3).setConstant(5.0);  // token 3 of sequence 0
  layer.forward(x2, y2);
  CHECK(y2.leftCols(3) == y.leftCols(3));
  CHECK(y2.rightCols(T) == y.rightCols(T));  // the other sequence is untouched
  const auto result = rankwise::testing::check_gradients(layer, x, rng);
  INFO(result.worst);
  CHECK(result.max_error < 1e-7);
  CHECK_THROWS_WITH(rankwise::CausalSelfAttention<float>(10, 3), Catch::Contains("multiple of heads"));
  rankwise::CausalSelfAttention<double> core(d, heads);
  Matrix<double> o;
  CHECK_THROWS_WITH(core.forward(x.topRows(d), x.middleRows(d, d), x.bottomRows(d), 3, o),
                    Catch::Contains("multiple of seq_len"));
}

TEST_CASE("CausalSelfAttention: forward_borrowed keeps references and computes exactly what forward does",
          "[layers][attention][gradcheck]") {
  Random rng(14);
  const Index d = 8, heads = 2, T = 4, batches = 3;
  StackedAttention copying(d, heads, T), borrowing(d, heads, T, true);
  const Matrix<double> x = random_matrix<double>(3 * d, batches * T, rng), dy = random_matrix<double>(d, batches * T, rng);
  Matrix<double> y1, y2, dx1, dx2;
  copying.forward(x, y1);
  copying.backward(dy, dx1);
  borrowing.forward(x, y2);
  borrowing.backward(dy, dx2);
  CHECK(y1 == y2);
  CHECK(dx1 == dx2);
  const auto result = rankwise::testing::check_gradients(borrowing, x, rng);
  INFO(result.worst);
  CHECK(result.max_error < 1e-7);
  // A borrowed input that changed shape before backward() is caught.
  rankwise::CausalSelfAttention<double> core(d, heads);
  Matrix<double> q = x.topRows(d), k = x.middleRows(d, d), v = x.bottomRows(d), o, dq, dk, dv;
  core.forward_borrowed(q, k, v, T, o);
  v.resize(d, T);
  CHECK_THROWS_WITH(core.backward(dy, dq, dk, dv), Catch::Contains("changed shape"));
}

TEST_CASE("GELU: the derivative kept by a training forward gives the same outputs as evaluation", "[layers][gelu]") {
  Random rng(15);
  rankwise::GELU<float> gelu(5);
  const Matrix<float> x = random_matrix<float>(5, 9, rng) * 3.0f;
  Matrix<float> y_train, y_eval, dx;
  gelu.forward(x, y_train);
  gelu.set_training(false);
  gelu.forward(x, y_eval);
  CHECK_THAT(y_train, is_close_to(y_eval, 1e-6, 1e-7));
  CHECK_THROWS_AS(gelu.backward(x, dx), rankwise::StateError);  // evaluation keeps nothing
}

TEST_CASE("CrossEntropy: loss and gradient, with ignored positions and soft targets", "[layers][cross_entropy][gradcheck]") {
  Random rng(5);
  const Matrix<double> logits = random_matrix<double>(7, 4, rng);
  const std::vector<std::int32_t> targets = {3, rankwise::ignore_index, 0, 6};
  rankwise::CrossEntropy<double> ce;
  const double loss = ce.forward(logits, targets);
  double expected = 0.0;
  for (Index t : {0, 2, 3}) {
    const double lse = std::log(logits.col(t).array().exp().sum());
    expected += lse - logits(targets[std::size_t(t)], t);
  }
  CHECK(loss == Approx(expected / 3.0));
  CHECK(ce.scored() == 3);
  Matrix<double> grad;
  ce.backward(grad);
  CHECK(grad.col(1).isZero(0.0));
  Matrix<double> probe = logits;
  rankwise::CrossEntropy<double> other;
  const Matrix<double> numeric =
      rankwise::test_support::central_differences(probe, [&] { return other.forward(probe, targets); });
  for (Index c = 0; c < 7; ++c)
    for (Index t = 0; t < 4; ++t) CHECK(grad(c, t) == Approx(numeric(c, t)).margin(1e-7));

  // Soft targets equal to one-hot give the same loss; a mask drops columns.
  Matrix<double> q = Matrix<double>::Zero(7, 4);
  q(3, 0) = q(0, 2) = q(6, 3) = 1.0;
  q(1, 1) = 1.0;
  const std::vector<std::uint8_t> mask = {1, 0, 1, 1};
  CHECK(ce.forward_soft(logits, q, mask) == Approx(loss));
  Matrix<double> soft_grad;
  ce.backward(soft_grad);
  CHECK_THAT(soft_grad, is_close_to(grad, 1e-12, 1e-14));

  const std::vector<std::int32_t> bad = {3, 7, 0, 1};
  CHECK_THROWS_WITH(ce.forward(logits, bad), Catch::Contains("[0, 7) or ignore_index (got 7)"));
  const std::vector<std::int32_t> none(4, rankwise::ignore_index);
  CHECK(ce.forward(logits, none) == 0.0);
}
