// Tests for rankwise/adapters/dylora.hpp.
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/sgd.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

using rankwise::DyLoRA;
using rankwise::DyLoRAOptions;
using rankwise::Index;
using rankwise::Linear;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

namespace {
// B = 0 at init would hide every bug in dA: give A and B random values.
template <typename Scalar>
void randomize_adapter(DyLoRA<Scalar>& dylora, Random& rng) {
  dylora.A_parameter().value = random_matrix<Scalar>(dylora.max_rank(), dylora.in_features(), rng);
  dylora.B_parameter().value = random_matrix<Scalar>(dylora.out_features(), dylora.max_rank(), rng);
}

// The truncated formula, computed the obvious way: W x + b + (alpha / b) sum_{k < b} B[:, k] A[k, :] x.
template <typename Scalar>
Matrix<Scalar> truncated_forward(const DyLoRA<Scalar>& dylora, const Matrix<Scalar>& x, Index b) {
  Matrix<Scalar> y = dylora.base().weight() * x;
  y.colwise() += dylora.base().bias().col(0);
  for (Index k = 0; k < b; ++k) {
    const Matrix<Scalar> component = dylora.B().col(k) * (dylora.A().row(k) * x);
    y += Scalar(dylora.alpha() / double(b)) * component;
  }
  return y;
}

// One training step of a squared loss towards `target`.
template <typename Layer, typename Opt>
void train_step(Layer& layer, Opt& opt, const Matrix<double>& x, const Matrix<double>& target) {
  Matrix<double> y, dx;
  layer.zero_grad();
  layer.forward(x, y);
  layer.backward(y - target, dx);
  opt.step();
}
}  // namespace

TEMPLATE_TEST_CASE("DyLoRA: a fresh adapter reproduces its base layer at every rank", "[adapters][dylora]", float,
                   double) {
  Random rng(1);
  Linear<TestType> base(12, 10, rng);
  const Matrix<TestType> x = random_matrix<TestType>(12, 5, rng);
  Matrix<TestType> y_base, y;
  base.forward(x, y_base);
  DyLoRA<TestType> dylora(base, {.max_rank = 6}, rng);
  CHECK(dylora.active_rank() == 6);
  CHECK(dylora.B().isZero(0));
  CHECK_FALSE(dylora.A().isZero(0));
  for (Index b = 1; b <= 6; ++b) {
    dylora.set_active_rank(b);
    dylora.forward(x, y);
    CHECK(y == y_base);
  }
}

TEST_CASE("DyLoRA: A is drawn like LoRA's A of rank r_max from the same stream", "[adapters][dylora]") {
  Random rng_a(5), rng_b(5);
  DyLoRA<double> dylora(Linear<double>(40, 30, rng_a), {.max_rank = 8}, rng_a);
  rankwise::LoRA<double> lora(Linear<double>(40, 30, rng_b), {.rank = 8}, rng_b);
  CHECK(dylora.A() == lora.A());
  CHECK(dylora.A().cwiseAbs().maxCoeff() <= 1.0 / std::sqrt(40.0));
}

TEMPLATE_TEST_CASE("DyLoRA: evaluated at every b it equals the truncated formula with scale alpha / b",
                   "[adapters][dylora]", float, double) {
  Random rng(2);
  DyLoRA<TestType> dylora(Linear<TestType>(14, 9, rng), {.max_rank = 5, .alpha = 10.0}, rng);
  randomize_adapter(dylora, rng);
  const Matrix<TestType> x = random_matrix<TestType>(14, 6, rng);
  for (const bool training : {true, false}) {
    dylora.set_training(training);
    for (Index b = 1; b <= 5; ++b) {
      dylora.set_active_rank(b);
      CHECK(dylora.scale() == Approx(10.0 / double(b)));
      Matrix<TestType> y;
      dylora.forward(x, y);
      CHECK_THAT(y, is_close_to(truncated_forward(dylora, x, b), 1e-4, 1e-4));
      // ...which is a plain LoRA of rank b made of the leading components.
      rankwise::LoRA<TestType> lora(dylora.base(), {.rank = b, .alpha = 10.0}, rng);
      lora.A_parameter().value = dylora.A().topRows(b);
      lora.B_parameter().value = dylora.B().leftCols(b);
      Matrix<TestType> y_lora;
      lora.forward(x, y_lora);
      CHECK_THAT(y, is_close_to(y_lora, 1e-5, 1e-5));
    }
  }
}

TEST_CASE("DyLoRA: backward matches finite differences at several ranks, in both modes", "[adapters][dylora][gradcheck]") {
  Random rng(3);
  const Matrix<double> x = random_matrix<double>(7, 4, rng);
  for (const bool frozen : {true, false}) {
    DyLoRA<double> dylora(Linear<double>(7, 6, rng), {.max_rank = 5, .alpha = 4.0, .frozen = frozen}, rng);
    randomize_adapter(dylora, rng);
    for (const Index b : {1, 3, 5}) {
      dylora.set_active_rank(b);
      CHECK(dylora.window_begin() == (frozen ? b - 1 : 0));
      const auto result = rankwise::testing::check_gradients(dylora, x, rng);
      INFO((frozen ? "frozen" : "non-frozen") << " mode, b = " << b << ": " << result.worst);
      CHECK(result.max_error < 1e-7);
      CHECK(result.entries.size() == 3);  // input, lora_A, lora_B: the base is frozen
      // The gradient is exactly the window's: zero outside [lo, b), non-zero inside.
      const Index lo = dylora.window_begin();
      const Matrix<double>& gA = dylora.A_parameter().grad;
      const Matrix<double>& gB = dylora.B_parameter().grad;
      CHECK(gA.topRows(lo).isZero(0.0));
      CHECK(gA.bottomRows(5 - b).isZero(0.0));
      CHECK(gB.leftCols(lo).isZero(0.0));
      CHECK(gB.rightCols(5 - b).isZero(0.0));
      CHECK(gA.middleRows(lo, b - lo).cwiseAbs().minCoeff() > 0.0);
      CHECK(gB.middleCols(lo, b - lo).cwiseAbs().minCoeff() > 0.0);
    }
  }
}

TEST_CASE("DyLoRA: backward matches finite differences with an ERAT window", "[adapters][dylora][gradcheck]") {
  Random rng(4);
  const Matrix<double> x = random_matrix<double>(8, 3, rng);
  DyLoRA<double> dylora(Linear<double>(8, 7, rng), {.max_rank = 6, .alpha = 6.0}, rng);
  randomize_adapter(dylora, rng);
  for (const auto& [lo, b] : std::vector<std::pair<Index, Index>>{{1, 4}, {2, 6}, {0, 2}}) {
    dylora.set_window(lo, b);
    const auto result = rankwise::testing::check_gradients(dylora, x, rng);
    INFO("window [" << lo << ", " << b << "): " << result.worst);
    CHECK(result.max_error < 1e-7);
    CHECK(dylora.A_parameter().grad.topRows(lo).isZero(0.0));
    CHECK(dylora.A_parameter().grad.middleRows(lo, b - lo).cwiseAbs().minCoeff() > 0.0);
  }
}

TEST_CASE("DyLoRA: only the trained window changes in an AdamW step with momentum and weight decay",
          "[adapters][dylora]") {
  Random rng(6);
  const Matrix<double> x = random_matrix<double>(10, 8, rng), target = random_matrix<double>(9, 8, rng);
  for (const bool frozen : {true, false}) {
    DyLoRA<double> dylora(Linear<double>(10, 9, rng), {.max_rank = 6, .alpha = 6.0, .frozen = frozen}, rng);
    randomize_adapter(dylora, rng);
    rankwise::AdamW<double> opt(dylora.parameters(), {.lr = 1e-2, .weight_decay = 0.1});
    // Every component gets momentum first (b = r_max, non-frozen window).
    dylora.set_window(0, 6);
    train_step(dylora, opt, x, target);
    for (const Index b : {3, 1, 5, 2}) {
      dylora.set_active_rank(b);
      const Index lo = dylora.window_begin();
      const Matrix<double> A0 = dylora.A(), B0 = dylora.B();
      train_step(dylora, opt, x, target);
      for (Index k = 0; k < 6; ++k) {
        const bool trained = k >= lo && k < b;
        INFO((frozen ? "frozen" : "non-frozen") << ", b = " << b << ", component " << k);
        CHECK((dylora.A().row(k) == A0.row(k)) == !trained);  // bit for bit outside
        CHECK((dylora.B().col(k) == B0.col(k)) == !trained);
      }
    }
  }
}

TEST_CASE("DyLoRA: with hold_untrained = false, AdamW moves the frozen components as PyTorch does",
          "[adapters][dylora]") {
  Random rng(7);
  const Matrix<double> x = random_matrix<double>(6, 5, rng), target = random_matrix<double>(6, 5, rng);
  DyLoRA<double> dylora(Linear<double>(6, 6, rng), {.max_rank = 4, .hold_untrained = false}, rng);
  randomize_adapter(dylora, rng);
  rankwise::AdamW<double> opt(dylora.parameters(), {.lr = 1e-2, .weight_decay = 0.1});
  dylora.set_active_rank(4);
  train_step(dylora, opt, x, target);
  dylora.set_active_rank(2);  // frozen mode: only component 1 has a gradient
  CHECK_FALSE(dylora.A_parameter().update_window.has_value());
  const Matrix<double> A0 = dylora.A();
  train_step(dylora, opt, x, target);
  CHECK(dylora.A_parameter().grad.row(0).isZero(0.0));
  CHECK(dylora.A().row(0) != A0.row(0));  // momentum and decay moved it anyway
  CHECK(dylora.A().row(3) != A0.row(3));
}

TEST_CASE("DyLoRA: SGD with momentum leaves the untrained components alone too", "[adapters][dylora]") {
  Random rng(8);
  const Matrix<double> x = random_matrix<double>(6, 5, rng), target = random_matrix<double>(5, 5, rng);
  DyLoRA<double> dylora(Linear<double>(6, 5, rng), {.max_rank = 4}, rng);
  randomize_adapter(dylora, rng);
  rankwise::SGD<double> opt(dylora.parameters(), {.lr = 1e-2, .momentum = 0.9, .weight_decay = 0.01});
  dylora.set_window(0, 4);
  train_step(dylora, opt, x, target);
  dylora.set_active_rank(3);
  const Matrix<double> A0 = dylora.A(), B0 = dylora.B();
  train_step(dylora, opt, x, target);
  CHECK(dylora.A().topRows(2) == A0.topRows(2));
  CHECK(dylora.A().row(3) == A0.row(3));
  CHECK(dylora.B().leftCols(2) == B0.leftCols(2));
  CHECK(dylora.A().row(2) != A0.row(2));
}

TEST_CASE("DyLoRA: merge at any rank gives the adapted output, and unmerge restores the base bit for bit",
          "[adapters][dylora]") {
  Random rng(9);
  DyLoRA<float> dylora(Linear<float>(32, 24, rng), {.max_rank = 8, .alpha = 16.0}, rng);
  randomize_adapter(dylora, rng);
  dylora.set_training(false);
  const Matrix<float> original = dylora.base().weight();
  const Matrix<float> x = random_matrix<float>(32, 7, rng);
  for (const Index b : {1, 4, 8}) {
    dylora.set_active_rank(b);
    Matrix<float> y_adapted, y_merged, y_after;
    dylora.forward(x, y_adapted);
    dylora.merge();
    Linear<float> merged_base = dylora.base();
    merged_base.forward(x, y_merged);
    CHECK_THAT(y_merged, is_close_to(y_adapted, 1e-4, 1e-4));
    CHECK_THROWS_AS(dylora.set_active_rank(b == 1 ? 2 : 1), rankwise::StateError);
    dylora.unmerge();
    CHECK(dylora.base().weight() == original);
    dylora.forward(x, y_after);
    CHECK(y_after == y_adapted);
  }
}

TEST_CASE("DyLoRA: export at a chosen b is a plain LoRA equal to the adapter's delta", "[adapters][dylora]") {
  Random rng(10);
  DyLoRA<float> dylora(Linear<float>(20, 16, rng), {.max_rank = 6, .alpha = 12.0}, rng);
  randomize_adapter(dylora, rng);
  for (Index b = 1; b <= 6; ++b) {
    const rankwise::LoRAFactors<float> f = dylora.lora_factors(b);
    CHECK(f.rank() == b);
    CHECK(f.A.rows() == b);
    CHECK(f.A.cols() == 20);
    CHECK(f.B.rows() == 16);
    CHECK(f.scale == Approx(12.0 / double(b)));
    CHECK(f.alpha() == Approx(12.0));
    const Matrix<float> delta = dylora.delta_weight(b);
    CHECK(double((f.delta_weight() - delta).norm()) <= 1e-6 * double(delta.norm()));
    // The delta itself is the truncated sum of components.
    Matrix<double> expected = Matrix<double>::Zero(16, 20);
    for (Index k = 0; k < b; ++k)
      expected += (12.0 / double(b)) * dylora.B().col(k).cast<double>() * dylora.A().row(k).cast<double>();
    CHECK((delta.cast<double>() - expected).norm() <= 1e-6 * expected.norm());
  }
  dylora.set_active_rank(3);
  CHECK(dylora.lora_factors().rank() == 3);
  CHECK(rankwise::lora_factors(dylora).rank() == 3);
}

TEST_CASE("DyLoRA: parameter counts are r_max (in + out) stored and b (in + out) deployed", "[adapters][dylora]") {
  Random rng(11);
  DyLoRA<float> dylora(Linear<float>(768, 768, rng), {.max_rank = 8}, rng);
  CHECK(dylora.trainable_parameter_count() == 8 * (768 + 768));
  CHECK(rankwise::count_trainable(dylora.parameters()) == dylora.trainable_parameter_count());
  // DyLoRA's GLUE setting: RoBERTa-base q and v of 12 layers at r_max = 8, the same as LoRA r = 8.
  CHECK(12 * 2 * dylora.trainable_parameter_count() == 294912);
  for (Index b = 1; b <= 8; ++b) CHECK(dylora.deployed_parameter_count(b) == b * 1536);
}

TEST_CASE("DyLoRA: set_path names parameters like LoRA's", "[adapters][dylora]") {
  Random rng(12);
  DyLoRA<float> dylora(Linear<float>(4, 4, rng), {.max_rank = 2}, rng);
  dylora.set_path("layers.0.attn.v_proj");
  CHECK(dylora.A_parameter().name == "layers.0.attn.v_proj.lora_A.weight");
  CHECK(dylora.B_parameter().name == "layers.0.attn.v_proj.lora_B.weight");
  CHECK(dylora.parameters().front()->name == "layers.0.attn.v_proj.base_layer.weight");
  CHECK(dylora.parameters().size() == 4);  // base weight, base bias, A, B: every piece of state
}

TEST_CASE("DyLoRA: invalid options and calls are rejected, naming what must hold", "[adapters][dylora][errors]") {
  Random rng(0);
  Linear<float> base(5, 4, rng);
  SECTION("max_rank outside [1, min(in, out)]") {
    CHECK_THROWS_WITH(DyLoRA<float>(base, {.max_rank = 0}, rng),
                      Catch::Contains("[rankwise::DyLoRA]") && Catch::Contains("[1, 4]") && Catch::Contains("got 0"));
    CHECK_THROWS_WITH(DyLoRA<float>(base, {.max_rank = 5}, rng), Catch::Contains("(got 5)"));
  }
  SECTION("alpha <= 0 or not finite") {
    CHECK_THROWS_WITH(DyLoRA<float>(base, {.max_rank = 2, .alpha = 0.0}, rng), Catch::Contains("alpha must be"));
    CHECK_THROWS_AS(DyLoRA<float>(base, {.max_rank = 2, .alpha = INFINITY}, rng), rankwise::InvalidArgument);
  }
  DyLoRA<float> dylora(base, {.max_rank = 3}, rng);
  SECTION("b > r_max or b < 1") {
    CHECK_THROWS_WITH(dylora.set_active_rank(4),
                      Catch::Contains("[rankwise::DyLoRA]") && Catch::Contains("[1, 3] (got 4)"));
    CHECK_THROWS_AS(dylora.set_active_rank(0), rankwise::InvalidArgument);
    CHECK_THROWS_WITH(dylora.lora_factors(4), Catch::Contains("lora_factors"));
    CHECK_THROWS_AS(dylora.delta_weight(0), rankwise::InvalidArgument);
    CHECK(dylora.active_rank() == 3);  // unchanged
  }
  SECTION("a window that is empty or beyond r_max") {
    CHECK_THROWS_WITH(dylora.set_window(2, 2), Catch::Contains("0 <= lo < b <= r_max = 3 (got [2, 2))"));
    CHECK_THROWS_AS(dylora.set_window(-1, 2), rankwise::InvalidArgument);
    CHECK_THROWS_AS(dylora.set_window(0, 4), rankwise::InvalidArgument);
  }
  Matrix<float> y, dx;
  SECTION("the rank changes between forward and backward") {
    dylora.forward(Matrix<float>::Ones(5, 2), y);
    dylora.set_active_rank(1);
    CHECK_THROWS_WITH(dylora.backward(Matrix<float>::Ones(4, 2), dx), Catch::Contains("changed between forward()"));
  }
  SECTION("wrong shapes, backward before forward, merge twice") {
    CHECK_THROWS_WITH(dylora.forward(Matrix<float>::Zero(4, 2), y), Catch::Contains("in_features = 5"));
    CHECK_THROWS_AS(dylora.backward(Matrix<float>::Zero(4, 2), dx), rankwise::StateError);
    dylora.forward(Matrix<float>::Zero(5, 2), y);
    CHECK_THROWS_WITH(dylora.backward(Matrix<float>::Zero(4, 3), dx), Catch::Contains("dy must be 4 x 2"));
    CHECK_THROWS_AS(dylora.unmerge(), rankwise::StateError);
    dylora.merge();
    CHECK_THROWS_AS(dylora.merge(), rankwise::StateError);
    dylora.forward(Matrix<float>::Zero(5, 2), y);
    CHECK_THROWS_AS(dylora.backward(Matrix<float>::Zero(4, 2), dx), rankwise::StateError);
  }
}

static_assert(rankwise::Layer<DyLoRA<double>>);
static_assert(rankwise::Adapter<DyLoRA<float>>);
static_assert(rankwise::Mergeable<DyLoRA<double>>);
