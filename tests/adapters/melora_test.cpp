// Tests for rankwise/adapters/melora.hpp.
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/melora.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <cmath>

using rankwise::Index;
using rankwise::Linear;
using rankwise::Matrix;
using rankwise::MELoRA;
using rankwise::Random;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

namespace {
template <typename Scalar>
void randomize_adapter(MELoRA<Scalar>& melora, Random& rng) {
  melora.A_parameter().value = random_matrix<Scalar>(melora.A().rows(), melora.A().cols(), rng);
  melora.B_parameter().value = random_matrix<Scalar>(melora.B().rows(), melora.B().cols(), rng);
}

// blockdiag(s B_1 A_1, ..., s B_n A_n), built the obvious way, in double.
template <typename Scalar>
Matrix<double> block_diagonal_delta(const MELoRA<Scalar>& melora) {
  const Index n = melora.n(), r = melora.mini_rank();
  const Index di = melora.in_features() / n, dout = melora.out_features() / n;
  Matrix<double> delta = Matrix<double>::Zero(melora.out_features(), melora.in_features());
  for (Index i = 0; i < n; ++i) {
    const Matrix<double> A_i = melora.A().middleRows(i * r, r).template cast<double>();
    const Matrix<double> B_i = melora.B().middleCols(i * r, r).template cast<double>();
    delta.block(i * dout, i * di, dout, di) = melora.scale() * B_i * A_i;
  }
  return delta;
}
}  // namespace

TEMPLATE_TEST_CASE("MELoRA: a fresh adapter reproduces its base layer", "[adapters][melora]", float, double) {
  Random rng(1);
  Linear<TestType> base(16, 8, rng);
  const Matrix<TestType> x = random_matrix<TestType>(16, 5, rng);
  Matrix<TestType> y_base, y;
  base.forward(x, y_base);
  MELoRA<TestType> melora(base, {.n = 4, .mini_rank = 2}, rng);
  melora.forward(x, y);
  CHECK(y == y_base);
  CHECK(melora.B().isZero(0));
  CHECK(melora.A().rows() == 8);
  CHECK(melora.A().cols() == 4);
  CHECK(melora.B().rows() == 2);
  CHECK(melora.B().cols() == 8);
  // Each A_i is Kaiming-uniform over its own fan-in in / n = 4.
  CHECK(melora.A().cwiseAbs().maxCoeff() <= 0.5);
  CHECK_FALSE(melora.A().isZero(0));
}

TEMPLATE_TEST_CASE("MELoRA: forward equals W x + b + blockdiag(s B_i A_i) x", "[adapters][melora]", float, double) {
  Random rng(2);
  for (const Index n : {1, 2, 4}) {
    MELoRA<TestType> melora(Linear<TestType>(12, 8, rng), {.n = n, .mini_rank = 2, .alpha = 3.0}, rng);
    randomize_adapter(melora, rng);
    CHECK(melora.scale() == Approx(1.5));
    const Matrix<TestType> x = random_matrix<TestType>(12, 6, rng);
    Matrix<TestType> y;
    melora.forward(x, y);
    Matrix<double> expected = melora.base().weight().template cast<double>() * x.template cast<double>();
    expected.colwise() += melora.base().bias().col(0).template cast<double>();
    expected += block_diagonal_delta(melora) * x.template cast<double>();
    CHECK_THAT(Matrix<double>(y.template cast<double>()), is_close_to(expected, 1e-4, 1e-4));
  }
}

TEST_CASE("MELoRA: backward matches finite differences for n = 2 and n = 4", "[adapters][melora][gradcheck]") {
  Random rng(3);
  const Matrix<double> x = random_matrix<double>(8, 3, rng);
  for (const Index n : {2, 4}) {
    MELoRA<double> melora(Linear<double>(8, 12, rng), {.n = n, .mini_rank = 2, .alpha = 4.0}, rng);
    randomize_adapter(melora, rng);
    const auto result = rankwise::testing::check_gradients(melora, x, rng);
    INFO("n = " << n << ": " << result.worst);
    CHECK(result.max_error < 1e-7);
    CHECK(result.entries.size() == 3);  // input, melora_A, melora_B
  }
}

TEST_CASE("MELoRA: merge gives the adapted output and unmerge restores the base bit for bit", "[adapters][melora]") {
  Random rng(4);
  MELoRA<float> melora(Linear<float>(64, 32, rng), {.n = 8, .mini_rank = 1, .alpha = 16.0}, rng);
  randomize_adapter(melora, rng);
  melora.set_training(false);
  const Matrix<float> original = melora.base().weight();
  const Matrix<float> x = random_matrix<float>(64, 5, rng);
  Matrix<float> y_adapted, y_merged, y_after;
  melora.forward(x, y_adapted);
  melora.merge();
  Linear<float> merged_base = melora.base();
  merged_base.forward(x, y_merged);
  CHECK_THAT(y_merged, is_close_to(y_adapted, 1e-4, 1e-4));
  // Only the diagonal blocks changed.
  const Matrix<float> change = melora.base().weight() - original;
  CHECK(change.block(0, 8, 4, 56).isZero(0.0f));
  CHECK_FALSE(change.block(0, 0, 4, 8).isZero(0.0f));
  melora.unmerge();
  CHECK(melora.base().weight() == original);
  melora.forward(x, y_after);
  CHECK(y_after == y_adapted);
}

TEST_CASE("MELoRA: the export is a plain LoRA of rank n r_mini equal to the block-diagonal delta", "[adapters][melora]") {
  Random rng(5);
  for (const Index n : {2, 4}) {
    MELoRA<float> melora(Linear<float>(32, 24, rng), {.n = n, .mini_rank = 3, .alpha = 6.0}, rng);
    randomize_adapter(melora, rng);
    const rankwise::LoRAFactors<float> f = rankwise::lora_factors(melora);
    CHECK(f.rank() == 3 * n);
    CHECK(f.A.cols() == 32);
    CHECK(f.B.rows() == 24);
    CHECK(f.scale == Approx(2.0));
    const Matrix<double> expected = block_diagonal_delta(melora);
    CHECK((f.delta_weight().cast<double>() - expected).norm() <= 1e-6 * expected.norm());
    CHECK((melora.delta_weight().cast<double>() - expected).norm() <= 1e-6 * expected.norm());
    // A plain LoRA loaded with the factors computes the same layer.
    rankwise::LoRA<float> lora(melora.base(), {.rank = f.rank(), .alpha = f.alpha()}, rng);
    lora.A_parameter().value = f.A;
    lora.B_parameter().value = f.B;
    const Matrix<float> x = random_matrix<float>(32, 4, rng);
    Matrix<float> y_melora, y_lora;
    melora.forward(x, y_melora);
    lora.forward(x, y_lora);
    CHECK_THAT(y_lora, is_close_to(y_melora, 1e-4, 1e-4));
  }
}

TEST_CASE("MELoRA: trainable parameters are r_mini (in + out) whatever n", "[adapters][melora]") {
  Random rng(6);
  for (const Index n : {1, 2, 8}) {
    MELoRA<float> q(Linear<float>(768, 768, rng), {.n = n, .mini_rank = 1}, rng);
    CHECK(q.trainable_parameter_count() == 1 * (768 + 768));
    CHECK(rankwise::count_trainable(q.parameters()) == q.trainable_parameter_count());
    CHECK(q.equivalent_rank() == n);
  }
  // RoBERTa-base q, v of 12 layers, r_mini = 1, n = 8: 36,864, eight times fewer than LoRA r = 8.
  MELoRA<float> anchor(Linear<float>(768, 768, rng), {.n = 8, .mini_rank = 1}, rng);
  CHECK(12 * 2 * anchor.trainable_parameter_count() == 36864);
  CHECK(36864 * 8 == 294912);
}

TEST_CASE("MELoRA: set_path names the stacked factors", "[adapters][melora]") {
  Random rng(7);
  MELoRA<float> melora(Linear<float>(4, 4, rng), {.n = 2, .mini_rank = 1}, rng);
  melora.set_path("layers.0.attn.q_proj");
  CHECK(melora.A_parameter().name == "layers.0.attn.q_proj.melora_A.weight");
  CHECK(melora.B_parameter().name == "layers.0.attn.q_proj.melora_B.weight");
  CHECK(melora.parameters().front()->name == "layers.0.attn.q_proj.base_layer.weight");
}

TEST_CASE("MELoRA: indivisible dimensions and invalid options are rejected", "[adapters][melora][errors]") {
  Random rng(0);
  SECTION("in or out not divisible by n") {
    CHECK_THROWS_WITH(MELoRA<float>(Linear<float>(10, 8, rng), {.n = 4, .mini_rank = 1}, rng),
                      Catch::Contains("[rankwise::MELoRA]") && Catch::Contains("divisible by n = 4") &&
                          Catch::Contains("got in 10, out 8; remainders 2 and 0"));
    CHECK_THROWS_WITH(MELoRA<float>(Linear<float>(8, 6, rng), {.n = 4, .mini_rank = 1}, rng),
                      Catch::Contains("remainders 0 and 2"));
  }
  SECTION("n < 1, mini_rank outside [1, min(in, out) / n], alpha <= 0") {
    CHECK_THROWS_WITH(MELoRA<float>(Linear<float>(8, 8, rng), {.n = 0}, rng), Catch::Contains("n must be >= 1"));
    CHECK_THROWS_WITH(MELoRA<float>(Linear<float>(8, 16, rng), {.n = 4, .mini_rank = 3}, rng),
                      Catch::Contains("[1, 2] (got 3)"));
    CHECK_THROWS_AS(MELoRA<float>(Linear<float>(8, 8, rng), {.n = 2, .mini_rank = 0}, rng), rankwise::InvalidArgument);
    CHECK_THROWS_WITH(MELoRA<float>(Linear<float>(8, 8, rng), {.n = 2, .mini_rank = 1, .alpha = -1.0}, rng),
                      Catch::Contains("alpha must be"));
  }
  SECTION("state errors") {
    MELoRA<float> melora(Linear<float>(4, 4, rng), {.n = 2, .mini_rank = 1}, rng);
    Matrix<float> y, dx;
    CHECK_THROWS_AS(melora.backward(Matrix<float>::Zero(4, 2), dx), rankwise::StateError);
    CHECK_THROWS_WITH(melora.forward(Matrix<float>::Zero(3, 2), y), Catch::Contains("in_features = 4"));
    melora.merge();
    CHECK_THROWS_AS(melora.merge(), rankwise::StateError);
  }
}

static_assert(rankwise::Layer<MELoRA<double>>);
static_assert(rankwise::Adapter<MELoRA<float>>);
static_assert(rankwise::Mergeable<MELoRA<double>>);
