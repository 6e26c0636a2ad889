// Tests for rankwise/adapters/red.hpp.
#include <rankwise/adapters/red.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <optional>

using rankwise::Index;
using rankwise::Linear;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::RED;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

namespace {
template <typename Scalar>
void randomize_vectors(RED<Scalar>& red, Random& rng) {
  red.scaling_parameter().value = random_matrix<Scalar>(red.out_features(), 1, rng);
  red.bias_parameter().value = random_matrix<Scalar>(red.out_features(), 1, rng);
}
}  // namespace

TEMPLATE_TEST_CASE("RED: a fresh adapter reproduces its base (scale 1, bias 0)", "[adapters][red]", float, double) {
  Random rng(1);
  Linear<TestType> base(10, 8, rng);
  const Matrix<TestType> x = random_matrix<TestType>(10, 5, rng);
  Matrix<TestType> y_base, y;
  base.forward(x, y_base);
  RED<TestType> red(base);
  red.forward(x, y);
  CHECK(y == y_base);
  CHECK(red.scaling().isOnes(0));
  CHECK(red.bias().isZero(0));
}

TEMPLATE_TEST_CASE("RED: forward is scale (.) (W x + b0) + bias, per output feature", "[adapters][red]", float, double) {
  Random rng(2);
  RED<TestType> red(Linear<TestType>(9, 7, rng));
  randomize_vectors(red, rng);
  const Matrix<TestType> x = random_matrix<TestType>(9, 4, rng);
  Matrix<TestType> y;
  red.forward(x, y);
  Matrix<TestType> h = red.base().weight() * x;
  h.colwise() += red.base().bias().col(0);
  for (Index j = 0; j < 4; ++j)
    for (Index i = 0; i < 7; ++i) CHECK(double(y(i, j)) == Approx(double(red.scaling()(i, 0) * h(i, j) + red.bias()(i, 0))).epsilon(1e-5).margin(1e-6));
}

TEST_CASE("RED: backward matches finite differences", "[adapters][red][gradcheck]") {
  Random rng(3);
  const Matrix<double> x = random_matrix<double>(6, 4, rng);
  for (const rankwise::REDOptions options : {rankwise::REDOptions{}, rankwise::REDOptions{.scaling = false},
                                              rankwise::REDOptions{.bias = false}}) {
    RED<double> red(Linear<double>(6, 5, rng), options);
    randomize_vectors(red, rng);
    const auto result = rankwise::testing::check_gradients(red, x, rng);
    INFO("scaling " << options.scaling << ", bias " << options.bias << ": " << result.worst);
    CHECK(result.max_error < 1e-7);
    CHECK(result.entries.size() == std::size_t(1 + (options.scaling ? 1 : 0) + (options.bias ? 1 : 0)));
  }
}

TEST_CASE("RED: merge folds the edit into the base, adding a bias when it has none", "[adapters][red]") {
  Random rng(4);
  for (const bool with_bias : {true, false}) {
    RED<float> red(Linear<float>(16, 12, rng, {.bias = with_bias}));
    randomize_vectors(red, rng);
    red.set_training(false);
    const Matrix<float> original = red.base().weight();
    const Matrix<float> x = random_matrix<float>(16, 5, rng);
    Matrix<float> y_adapted, y_merged, y_after;
    red.forward(x, y_adapted);
    red.merge();
    CHECK(red.base().has_bias());
    Linear<float> merged_base = red.base();
    merged_base.forward(x, y_merged);
    CHECK_THAT(y_merged, is_close_to(y_adapted, 1e-5, 1e-5));
    CHECK_THAT(Matrix<float>(red.base().weight()),
               is_close_to(Matrix<float>(red.scaling().col(0).asDiagonal() * original), 1e-6, 1e-7));
    red.unmerge();
    CHECK(red.base().weight() == original);
    CHECK(red.base().has_bias() == with_bias);  // an added bias is removed again
    red.forward(x, y_after);
    CHECK(y_after == y_adapted);
    // delta_weight is the change of the weight merge() makes.
    CHECK_THAT(red.delta_weight(),
               is_close_to(Matrix<float>(red.scaling().col(0).asDiagonal() * original - original), 1e-6, 1e-6));
  }
}

TEST_CASE("RED: trainable parameters are 2 d per edited layer (LLaMA-2-7B gives 262,144)", "[adapters][red]") {
  Random rng(5);
  // LLaMA-2-7B's down_proj maps 11008 -> 4096; the count depends only on the output size, so a
  // narrow input keeps the test small.
  RED<float> down(Linear<float>(8, 4096, rng, {.bias = false}));
  CHECK(down.trainable_parameter_count() == 2 * 4096);
  CHECK(rankwise::count_trainable(down.parameters()) == down.trainable_parameter_count());
  CHECK(32 * down.trainable_parameter_count() == 262144);
  RED<float> roberta(Linear<float>(8, 768, rng));
  CHECK(12 * roberta.trainable_parameter_count() == 18432);  // RoBERTa-base, 0.02M
  RED<float> bias_only(Linear<float>(8, 768, rng), {.scaling = false});
  CHECK(bias_only.trainable_parameter_count() == 768);
  CHECK(rankwise::count_trainable(bias_only.parameters()) == 768);
}

TEST_CASE("RED: set_path uses the official code's names, and every vector is in parameters()", "[adapters][red]") {
  Random rng(6);
  RED<float> red(Linear<float>(4, 3, rng), {.bias = false});
  red.set_path("layers.3.mlp.down_proj");
  const auto params = red.parameters();
  REQUIRE(params.size() == 4);
  CHECK(params[0]->name == "layers.3.mlp.down_proj.base_layer.weight");
  CHECK(params[2]->name == "layers.3.mlp.down_proj.delta_vector.activation_scaling");
  CHECK(params[3]->name == "layers.3.mlp.down_proj.delta_vector.activation_bias");
  CHECK(params[2]->trainable);
  CHECK_FALSE(params[3]->trainable);  // the fixed vector of an ablation is state, not trained
  CHECK(params[2]->is_vector);
}

TEST_CASE("RED: vectors that do not match the layer's output, and bad calls, are rejected", "[adapters][red][errors]") {
  Random rng(0);
  Linear<float> base(5, 4, rng);
  CHECK_THROWS_WITH(RED<float>(base, Matrix<float>::Ones(3, 1), Matrix<float>::Zero(4, 1)),
                    Catch::Contains("[rankwise::RED]") && Catch::Contains("out_features = 4") &&
                        Catch::Contains("got scaling 3 x 1, bias 4 x 1"));
  CHECK_THROWS_AS(RED<float>(base, Matrix<float>::Ones(4, 2), Matrix<float>::Zero(4, 1)), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(RED<float>(base, {.scaling = false, .bias = false}), Catch::Contains("at least one of"));
  RED<float> red(base, Matrix<float>::Constant(4, 1, 2.0f), Matrix<float>::Ones(4, 1));
  Matrix<float> y, dx;
  CHECK_THROWS_WITH(red.forward(Matrix<float>::Zero(4, 2), y), Catch::Contains("in_features = 5"));
  CHECK_THROWS_AS(red.backward(Matrix<float>::Zero(4, 2), dx), rankwise::StateError);
  CHECK_THROWS_AS(red.unmerge(), rankwise::StateError);
  red.merge();
  CHECK_THROWS_AS(red.merge(), rankwise::StateError);
}

static_assert(rankwise::Layer<RED<double>>);
static_assert(rankwise::Adapter<RED<float>>);
static_assert(rankwise::Mergeable<RED<double>>);
