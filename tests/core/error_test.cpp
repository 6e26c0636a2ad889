// Tests for rankwise/core/error.hpp, config.hpp, parameter.hpp and layer.hpp.
#include <rankwise/core/config.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/layers/linear.hpp>

#include <catch2/catch.hpp>

#include <string>

using rankwise::Index;

TEST_CASE("Error: fail() formats [where] and the parts, and throws the requested type", "[core][error]") {
  try {
    rankwise::detail::fail("rankwise::Thing", "rank must be in [1, ", 3, "] (got ", 0, ")");
    FAIL("fail() returned");
  } catch (const rankwise::InvalidArgument& e) {
    CHECK(std::string(e.what()) == "[rankwise::Thing] rank must be in [1, 3] (got 0)");
  }
  CHECK_THROWS_AS(rankwise::detail::fail<rankwise::FormatError>("x", "y"), rankwise::FormatError);
  CHECK_THROWS_AS(rankwise::detail::fail<rankwise::StateError>("x", "y"), rankwise::StateError);
  CHECK_THROWS_AS(rankwise::detail::fail<rankwise::IoError>("x", "y"), rankwise::IoError);
}

TEST_CASE("Error: every rankwise exception is caught as rankwise::Error", "[core][error]") {
  CHECK_THROWS_AS(rankwise::detail::fail<rankwise::InvalidArgument>("a", "b"), rankwise::Error);
  CHECK_THROWS_AS(rankwise::detail::fail<rankwise::FormatError>("a", "b"), rankwise::Error);
  CHECK_THROWS_AS(rankwise::detail::fail<rankwise::StateError>("a", "b"), rankwise::Error);
  CHECK_THROWS_AS(rankwise::detail::fail<rankwise::IoError>("a", "b"), std::runtime_error);
}

TEST_CASE("Error: RANKWISE_ASSERT throws AssertionError in the test build", "[core][error]") {
  const int three = 3;
  CHECK_NOTHROW(RANKWISE_ASSERT(three == 3, "holds"));
  CHECK_THROWS_AS(RANKWISE_ASSERT(three == 4, "does not hold"), rankwise::AssertionError);
  CHECK_THROWS_WITH(RANKWISE_ASSERT(three == 4, "does not hold"), Catch::Contains("does not hold") &&
                                                                      Catch::Contains("three == 4"));
}

TEST_CASE("Error: Status names", "[core][error]") {
  CHECK(std::string(rankwise::to_string(rankwise::Status::Ok)) == "Ok");
  CHECK(std::string(rankwise::to_string(rankwise::Status::NonFinite)) == "NonFinite");
  CHECK(std::string(rankwise::to_string(rankwise::Status::NotApplied)) == "NotApplied");
}

TEST_CASE("Parameter: zero_grad gives a zero gradient of the value's shape", "[core][parameter]") {
  rankwise::Parameter<float> p{"w", rankwise::Matrix<float>::Ones(3, 2), {}, true, false};
  p.zero_grad();
  CHECK(p.grad.rows() == 3);
  CHECK(p.grad.cols() == 2);
  CHECK(p.grad.isZero(0.0f));
  p.grad.setOnes();
  p.zero_grad();
  CHECK(p.grad.isZero(0.0f));
  CHECK(p.size() == 6);
}

TEST_CASE("Layer: count_trainable counts only trainable scalars", "[core][layer]") {
  rankwise::Random rng(3);
  rankwise::Linear<float> a(4, 3, rng), b(2, 5, rng, {.bias = false, .trainable = false});
  std::vector<rankwise::Parameter<float>*> params = a.parameters();
  for (auto* p : b.parameters()) params.push_back(p);
  CHECK(rankwise::count_trainable(params) == 4 * 3 + 3);
  rankwise::zero_grad(params);
  for (auto* p : params) CHECK(p->grad.isZero(0.0f));
}

// The compile-time contract: a type without backward() is not a Layer.
struct NotALayer {
  using Scalar = float;
  Index in_features() const { return 1; }
  Index out_features() const { return 1; }
};
static_assert(rankwise::Layer<rankwise::Linear<double>>);
static_assert(!rankwise::Layer<NotALayer>);
static_assert(!rankwise::Layer<rankwise::Parameter<float>>);
static_assert(!rankwise::Adapter<rankwise::Linear<float>>, "a plain Linear wraps nothing");
