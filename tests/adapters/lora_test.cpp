// Tests for rankwise/adapters/lora.hpp.
#include <rankwise/adapters/lora.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/borrowing.hpp"
#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

using rankwise::Index;
using rankwise::Linear;
using rankwise::LoRA;
using rankwise::LoRAOptions;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

namespace {
// B = 0 at init would hide every bug in dA: give A and B random values.
template <typename Scalar>
void randomize_adapter(LoRA<Scalar>& lora, Random& rng) {
  lora.A_parameter().value = random_matrix<Scalar>(lora.rank(), lora.in_features(), rng);
  lora.B_parameter().value = random_matrix<Scalar>(lora.out_features(), lora.rank(), rng);
}

// The adapter's output computed the slow, obvious way: W x + b + s B diag(g) A x.
template <typename Scalar>
Matrix<Scalar> reference_forward(const LoRA<Scalar>& lora, const Matrix<Scalar>& x) {
  Matrix<Scalar> y = lora.base().weight() * x;
  y.colwise() += lora.base().bias().col(0);
  const Matrix<Scalar> delta = lora.delta_weight();
  return y + delta * x;
}
}  // namespace

TEMPLATE_TEST_CASE("LoRA: a fresh adapter reproduces its base layer", "[adapters][lora]", float, double) {
  Random rng(42);
  Linear<TestType> base(16, 8, rng);
  const Matrix<TestType> x = random_matrix<TestType>(16, 5, rng);
  Matrix<TestType> y_base, y;
  base.forward(x, y_base);
  for (auto init : {rankwise::LoRAInit::KaimingUniform, rankwise::LoRAInit::Gaussian}) {
    LoRA<TestType> lora(base, {.rank = 4, .alpha = 8.0, .init = init}, rng);
    lora.forward(x, y);
    CHECK(y == y_base);  // B = 0: exactly the base
    CHECK(lora.B().isZero(0));
    CHECK_FALSE(lora.A().isZero(0));
  }
}

TEST_CASE("LoRA: scaling is alpha/r, or alpha/sqrt(r) with rsLoRA", "[adapters][lora]") {
  Random rng(1);
  LoRA<float> plain(Linear<float>(32, 32, rng), {.rank = 4, .alpha = 16.0}, rng);
  LoRA<float> rs(Linear<float>(32, 32, rng), {.rank = 4, .alpha = 16.0, .use_rslora = true}, rng);
  CHECK(plain.scale() == Approx(4.0));
  CHECK(rs.scale() == Approx(8.0));
}

TEST_CASE("LoRA: init draws A like PEFT", "[adapters][lora]") {
  Random rng(2);
  LoRA<double> kaiming(Linear<double>(400, 300, rng), {.rank = 16}, rng);
  CHECK(kaiming.A().cwiseAbs().maxCoeff() <= 1.0 / 20.0);
  CHECK(kaiming.A().cwiseAbs().maxCoeff() > 0.049);
  LoRA<double> gaussian(Linear<double>(400, 300, rng), {.rank = 16, .init = rankwise::LoRAInit::Gaussian}, rng);
  const double sd = std::sqrt(gaussian.A().array().square().mean());
  CHECK(sd == Approx(1.0 / 16.0).epsilon(0.03));
}

TEMPLATE_TEST_CASE("LoRA: forward equals W x + b + s B A x", "[adapters][lora]", float, double) {
  Random rng(3);
  LoRA<TestType> lora(Linear<TestType>(12, 10, rng), {.rank = 3, .alpha = 6.0}, rng);
  randomize_adapter(lora, rng);
  const Matrix<TestType> x = random_matrix<TestType>(12, 7, rng);
  Matrix<TestType> y;
  lora.forward(x, y);
  CHECK_THAT(y, is_close_to(reference_forward(lora, x), 1e-4, 1e-4));
  lora.set_training(false);
  Matrix<TestType> y_eval;
  lora.forward(x, y_eval);
  CHECK_THAT(y_eval, is_close_to(y, 1e-6, 1e-6));
}

TEST_CASE("LoRA: backward matches finite differences", "[adapters][lora][gradcheck]") {
  Random rng(7);
  const Matrix<double> x = random_matrix<double>(6, 4, rng);
  SECTION("plain") {
    LoRA<double> lora(Linear<double>(6, 5, rng), {.rank = 3, .alpha = 6.0}, rng);
    randomize_adapter(lora, rng);
    const auto result = rankwise::testing::check_gradients(lora, x, rng);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
    CHECK(result.entries.size() == 3);  // input, lora_A, lora_B: the base is frozen
  }
  SECTION("rsLoRA") {
    LoRA<double> lora(Linear<double>(6, 5, rng), {.rank = 2, .alpha = 3.0, .use_rslora = true}, rng);
    randomize_adapter(lora, rng);
    const auto result = rankwise::testing::check_gradients(lora, x, rng);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
  }
  SECTION("with dropout, the mask replayed by seed") {
    LoRA<double> lora(Linear<double>(6, 5, rng), {.rank = 3, .alpha = 6.0, .dropout = 0.4}, rng);
    randomize_adapter(lora, rng);
    const Random::Snapshot mask_stream = lora.dropout_generator().snapshot();
    rankwise::testing::GradientCheckOptions options;
    options.before_forward = [&] { lora.dropout_generator().restore(mask_stream); };
    const auto result = rankwise::testing::check_gradients(lora, x, rng, options);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
  }
  SECTION("with gates") {
    LoRA<double> lora(Linear<double>(6, 5, rng), {.rank = 4, .alpha = 4.0}, rng);
    randomize_adapter(lora, rng);
    lora.set_gate(1, 0.0);
    lora.set_gate(2, 0.5);
    const auto result = rankwise::testing::check_gradients(lora, x, rng);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
  }
  SECTION("after rank surgery") {
    LoRA<double> lora(Linear<double>(6, 5, rng), {.rank = 4, .alpha = 4.0}, rng);
    randomize_adapter(lora, rng);
    const std::vector<Index> gone = {0, 2};
    lora.remove_ranks(gone);
    lora.add_ranks(1, rng);
    lora.B_parameter().value.col(2).setConstant(0.3);  // the fresh rank is zero in B: make it count
    REQUIRE(lora.rank() == 3);
    const auto result = rankwise::testing::check_gradients(lora, x, rng);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
  }
}

TEST_CASE("LoRA: an adapter that borrows its input (shared by q, k, v in a model) matches finite differences",
          "[adapters][lora][gradcheck]") {
  Random rng(17);
  const Matrix<double> x = random_matrix<double>(6, 4, rng);
  SECTION("with gates") {
    LoRA<double> lora(Linear<double>(6, 5, rng), {.rank = 4, .alpha = 4.0}, rng);
    randomize_adapter(lora, rng);
    lora.set_gate(2, 0.5);
    rankwise::test_support::Borrowing<LoRA<double>> borrowing(lora);
    const auto result = rankwise::testing::check_gradients(borrowing, x, rng);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
    CHECK(result.entries.size() == 3);
  }
  SECTION("with dropout (the masked input is kept instead)") {
    LoRA<double> lora(Linear<double>(6, 5, rng), {.rank = 3, .alpha = 6.0, .dropout = 0.4}, rng);
    randomize_adapter(lora, rng);
    const Random::Snapshot mask_stream = lora.dropout_generator().snapshot();
    rankwise::testing::GradientCheckOptions options;
    options.before_forward = [&] { lora.dropout_generator().restore(mask_stream); };
    rankwise::test_support::Borrowing<LoRA<double>> borrowing(lora);
    const auto result = rankwise::testing::check_gradients(borrowing, x, rng, options);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
  }
}

TEST_CASE("LoRA: forward_borrowed and backward_parameters_only compute exactly what forward and backward do",
          "[adapters][lora]") {
  Random rng(18);
  for (const double dropout : {0.0, 0.3}) {
    LoRA<float> copying(Linear<float>(9, 7, rng), {.rank = 3, .alpha = 6.0, .dropout = dropout}, rng);
    randomize_adapter(copying, rng);
    copying.set_gate(1, 0.25);
    LoRA<float> borrowing = copying, lean = copying;  // same weights, same dropout stream
    const Matrix<float> x = random_matrix<float>(9, 5, rng), dy = random_matrix<float>(7, 5, rng);
    Matrix<float> y1, y2, y3, dx1, dx2;
    copying.forward(x, y1);
    copying.backward(dy, dx1);
    borrowing.forward_borrowed(x, y2);
    borrowing.backward(dy, dx2);
    lean.forward_borrowed(x, y3);
    lean.backward_parameters_only(dy);
    INFO("dropout " << dropout);
    CHECK(y1 == y2);
    CHECK(y1 == y3);
    CHECK(dx1 == dx2);
    for (LoRA<float>* other : {&borrowing, &lean}) {
      CHECK(other->A_parameter().grad == copying.A_parameter().grad);
      CHECK(other->B_parameter().grad == copying.B_parameter().grad);
    }
    CHECK_FALSE(copying.A_parameter().grad.isZero(0.0f));
  }
  // A borrowed input that changed shape before backward() is caught; temporaries are not accepted.
  LoRA<float> lora(Linear<float>(4, 3, rng), {.rank = 2}, rng);
  Matrix<float> x = random_matrix<float>(4, 6, rng), y, dx;
  lora.forward_borrowed(x, y);
  x.resize(4, 1);
  CHECK_THROWS_WITH(lora.backward(Matrix<float>::Zero(3, 6), dx),
                    Catch::Contains("[rankwise::LoRA]") && Catch::Contains("changed shape"));
  CHECK_THROWS_AS(lora.backward_parameters_only(Matrix<float>::Zero(3, 2)), rankwise::InvalidArgument);
  static_assert(!rankwise::test_support::BorrowsTemporaries<LoRA<float>>);
}

TEST_CASE("LoRA: dropout acts on the adapter branch only, and only while training", "[adapters][lora]") {
  Random rng(8);
  LoRA<double> lora(Linear<double>(50, 40, rng), {.rank = 4, .alpha = 4.0, .dropout = 0.5}, rng);
  randomize_adapter(lora, rng);
  const Matrix<double> x = random_matrix<double>(50, 30, rng);
  Matrix<double> y1, y2, y_eval;
  lora.forward(x, y1);
  lora.forward(x, y2);
  CHECK_FALSE(y1.isApprox(y2));  // a new mask each step
  lora.set_training(false);
  lora.forward(x, y_eval);
  CHECK_THAT(y_eval, is_close_to(reference_forward(lora, x), 1e-9, 1e-9));

  lora.set_enabled(false);  // no branch: no dropout either, even in training mode
  lora.set_training(true);
  Matrix<double> y_base, y_disabled;
  lora.forward(x, y_disabled);
  Linear<double> copy = lora.base();
  copy.forward(x, y_base);
  CHECK(y_disabled == y_base);

  // Inverted dropout keeps the expectation: average many masked outputs.
  lora.set_enabled(true);
  Matrix<double> mean = Matrix<double>::Zero(40, 30);
  for (int i = 0; i < 400; ++i) {
    lora.forward(x, y1);
    mean += y1 / 400.0;
  }
  const double rel = (mean - y_eval).norm() / (y_eval - y_base).norm();
  CHECK(rel < 0.1);
}

TEST_CASE("LoRA: disabled is exactly the base, in forward and in backward", "[adapters][lora]") {
  Random rng(9);
  LoRA<float> lora(Linear<float>(8, 6, rng), {.rank = 2}, rng);
  randomize_adapter(lora, rng);
  Linear<float> base = lora.base();
  base.set_trainable(false);
  const Matrix<float> x = random_matrix<float>(8, 3, rng), dy = random_matrix<float>(6, 3, rng);
  lora.set_enabled(false);
  CHECK_FALSE(lora.is_enabled());
  Matrix<float> y, y_base, dx, dx_base;
  lora.forward(x, y);
  base.forward(x, y_base);
  CHECK(y == y_base);
  lora.zero_grad();
  lora.backward(dy, dx);
  base.backward(dy, dx_base);
  CHECK(dx == dx_base);
  CHECK(lora.A_parameter().grad.isZero(0.0f));
  CHECK(lora.B_parameter().grad.isZero(0.0f));
}

TEST_CASE("LoRA: merge gives the adapted output and unmerge restores the base bit for bit", "[adapters][lora]") {
  Random rng(10);
  LoRA<float> lora(Linear<float>(64, 48, rng), {.rank = 8, .alpha = 16.0}, rng);
  randomize_adapter(lora, rng);
  lora.set_gate(3, 0.0);
  const Matrix<float> original = lora.base().weight();
  const Matrix<float> x = random_matrix<float>(64, 9, rng);
  Matrix<float> y_adapted, y_merged, y_after;
  lora.set_training(false);
  lora.forward(x, y_adapted);
  lora.merge();
  CHECK(lora.is_merged());
  lora.forward(x, y_merged);
  CHECK_THAT(y_merged, is_close_to(y_adapted, 1e-4, 1e-4));
  // The merged base alone computes the same: the adapter adds nothing on top.
  Linear<float> merged_base = lora.base();
  Matrix<float> y_plain;
  merged_base.forward(x, y_plain);
  CHECK(y_plain == y_merged);
  CHECK_THAT(Matrix<float>(lora.base().weight() - original), is_close_to(lora.delta_weight(), 1e-5, 1e-6));

  lora.unmerge();
  CHECK_FALSE(lora.is_merged());
  CHECK(lora.base().weight() == original);  // bit for bit
  lora.forward(x, y_after);
  CHECK(y_after == y_adapted);
}

TEST_CASE("LoRA: trainable parameters are r (in + out)", "[adapters][lora]") {
  Random rng(11);
  LoRA<float> lora(Linear<float>(768, 768, rng), {.rank = 8, .alpha = 16.0}, rng);
  CHECK(lora.trainable_parameter_count() == 8 * (768 + 768));
  CHECK(rankwise::count_trainable(lora.parameters()) == lora.trainable_parameter_count());
  // PEFT's classic anchor: RoBERTa-base, q and v of 12 layers, r = 8.
  CHECK(12 * 2 * lora.trainable_parameter_count() == 294912);
}

TEST_CASE("LoRA: a gated-off rank is the same function as a removed one", "[adapters][lora]") {
  Random rng(12);
  LoRA<double> lora(Linear<double>(20, 16, rng), {.rank = 8, .alpha = 8.0}, rng);
  randomize_adapter(lora, rng);
  lora.set_training(false);
  const Matrix<double> x = random_matrix<double>(20, 5, rng);
  lora.set_gate(1, 0.0);
  lora.set_gate(3, 0.0);
  Matrix<double> y_gated, y_removed;
  lora.forward(x, y_gated);
  lora.reset_gates();
  const Matrix<double> A = lora.A(), B = lora.B();
  const std::vector<Index> gone = {3, 1};
  const rankwise::RankChange change = lora.remove_ranks(gone);
  lora.forward(x, y_removed);
  CHECK_THAT(y_removed, is_close_to(y_gated, 1e-12, 1e-12));
  CHECK(lora.rank() == 6);
  CHECK(lora.scale() == Approx(1.0));  // the scale stays alpha / r0
  const std::vector<Index> survivors = {0, 2, 4, 5, 6, 7};
  for (std::size_t j = 0; j < survivors.size(); ++j) {
    CHECK(lora.A().row(Index(j)) == A.row(survivors[j]));
    CHECK(lora.B().col(Index(j)) == B.col(survivors[j]));
  }
  REQUIRE(change.changes.size() == 2);
  CHECK(change.changes[0].parameter == lora.A_parameter().name);
  CHECK(change.changes[0].axis == rankwise::Axis::Rows);
  CHECK(change.changes[1].axis == rankwise::Axis::Cols);
  CHECK(change.changes[0].kept == survivors);
  CHECK(change.changes[0].old_count == 8);
}

TEST_CASE("LoRA: added ranks leave the function unchanged and start like A", "[adapters][lora]") {
  Random rng(13);
  LoRA<double> lora(Linear<double>(30, 24, rng), {.rank = 2, .alpha = 4.0}, rng);
  randomize_adapter(lora, rng);
  lora.set_training(false);
  const Matrix<double> x = random_matrix<double>(30, 4, rng);
  Matrix<double> before, after;
  lora.forward(x, before);
  const rankwise::RankChange change = lora.add_ranks(3, rng);
  lora.forward(x, after);
  CHECK(lora.rank() == 5);
  CHECK_THAT(after, is_close_to(before, 1e-12, 1e-12));  // equal up to summation order
  CHECK(lora.B().rightCols(3).isZero(0.0));
  CHECK(lora.A().bottomRows(3).cwiseAbs().maxCoeff() <= 1.0 / std::sqrt(30.0));
  CHECK_FALSE(lora.A().bottomRows(3).isZero(0.0));
  CHECK(lora.gates().tail(3).isOnes(0.0));
  CHECK(change.changes[0].added == 3);
  CHECK(change.changes[0].kept == std::vector<Index>{0, 1});
  CHECK(lora.trainable_parameter_count() == 5 * (30 + 24));
}

TEST_CASE("LoRA: rank 0 costs nothing and contributes nothing", "[adapters][lora]") {
  Random rng(14);
  LoRA<float> lora(Linear<float>(6, 6, rng), {.rank = 2}, rng);
  randomize_adapter(lora, rng);
  const std::vector<Index> all = {0, 1};
  lora.remove_ranks(all);
  CHECK(lora.rank() == 0);
  CHECK(lora.trainable_parameter_count() == 0);
  Matrix<float> y, y_base, dx;
  const Matrix<float> x = random_matrix<float>(6, 3, rng);
  lora.forward(x, y);
  Linear<float> base = lora.base();
  base.forward(x, y_base);
  CHECK(y == y_base);
  lora.backward(random_matrix<float>(6, 3, rng), dx);
  CHECK(lora.delta_weight().isZero(0.0f));
  lora.add_ranks(1, rng);  // and it can grow back
  CHECK(lora.rank() == 1);
}

TEST_CASE("LoRA: set_path names parameters like PEFT's state dict", "[adapters][lora]") {
  Random rng(15);
  LoRA<float> lora(Linear<float>(4, 4, rng), {.rank = 2}, rng);
  lora.set_path("layers.1.attn.q_proj");
  CHECK(lora.A_parameter().name == "layers.1.attn.q_proj.lora_A.weight");
  CHECK(lora.B_parameter().name == "layers.1.attn.q_proj.lora_B.weight");
  CHECK(lora.parameters().front()->name == "layers.1.attn.q_proj.base_layer.weight");
}

TEST_CASE("LoRA: a fixed seed gives the same training run", "[adapters][lora][determinism]") {
  const auto run = [] {
    Random rng(99);
    LoRA<float> lora(Linear<float>(16, 12, rng), {.rank = 4, .alpha = 8.0, .dropout = 0.1}, rng);
    rankwise::AdamW<float> opt(lora.parameters(), {.lr = 1e-2});
    const Matrix<float> x = random_matrix<float>(16, 8, rng), target = random_matrix<float>(12, 8, rng);
    Matrix<float> y, dx;
    for (int step = 0; step < 20; ++step) {
      lora.zero_grad();
      lora.forward(x, y);
      lora.backward(y - target, dx);
      opt.step();
    }
    return std::pair{lora.A(), lora.B()};
  };
  const auto first = run(), second = run();
  CHECK(first.first == second.first);
  CHECK(first.second == second.second);
  CHECK_FALSE(first.second.isZero(0.0f));
}

TEST_CASE("LoRA: invalid options and calls are rejected, naming what must hold", "[adapters][lora][errors]") {
  Random rng(0);
  Linear<float> base(4, 3, rng);
  SECTION("rank outside [1, min(in, out)]") {
    CHECK_THROWS_WITH(LoRA<float>(base, {.rank = 0}, rng),
                      Catch::Contains("[rankwise::LoRA]") && Catch::Contains("[1, 3]") && Catch::Contains("got 0"));
    CHECK_THROWS_WITH(LoRA<float>(base, {.rank = 4}, rng), Catch::Contains("(got 4)"));
  }
  SECTION("alpha <= 0") {
    CHECK_THROWS_WITH(LoRA<float>(base, {.rank = 2, .alpha = 0.0}, rng), Catch::Contains("alpha must be"));
    CHECK_THROWS_AS(LoRA<float>(base, {.rank = 2, .alpha = -1.0}, rng), rankwise::InvalidArgument);
    CHECK_THROWS_AS(LoRA<float>(base, {.rank = 2, .alpha = std::nan("")}, rng), rankwise::InvalidArgument);
  }
  SECTION("dropout outside [0, 1)") {
    CHECK_THROWS_WITH(LoRA<float>(base, {.rank = 2, .dropout = 1.0}, rng),
                      Catch::Contains("dropout must be in [0, 1) (got 1)"));
    CHECK_THROWS_AS(LoRA<float>(base, {.rank = 2, .dropout = -0.1}, rng), rankwise::InvalidArgument);
  }
  SECTION("unknown init name") {
    CHECK(rankwise::lora_init_from_name("gaussian") == rankwise::LoRAInit::Gaussian);
    CHECK(rankwise::lora_init_from_name("default") == rankwise::LoRAInit::KaimingUniform);
    CHECK_THROWS_WITH(rankwise::lora_init_from_name("pissa"),
                      Catch::Contains("[rankwise::LoRAOptions]") && Catch::Contains("got \"pissa\""));
    CHECK_THROWS_AS(LoRA<float>(base, {.rank = 2, .init = static_cast<rankwise::LoRAInit>(7)}, rng),
                    rankwise::InvalidArgument);
  }
  LoRA<float> lora(base, {.rank = 2}, rng);
  Matrix<float> y, dx;
  SECTION("input of the wrong shape") {
    CHECK_THROWS_WITH(lora.forward(Matrix<float>::Zero(5, 2), y),
                      Catch::Contains("[rankwise::LoRA]") && Catch::Contains("in_features = 4"));
  }
  SECTION("removing a rank index that does not exist, or twice") {
    const std::vector<Index> bad = {2};
    CHECK_THROWS_WITH(lora.remove_ranks(bad), Catch::Contains("[0, 2) (got 2)"));
    const std::vector<Index> twice = {1, 1};
    CHECK_THROWS_WITH(lora.remove_ranks(twice), Catch::Contains("listed twice"));
    CHECK(lora.rank() == 2);  // nothing changed
  }
  SECTION("adding beyond min(in, out), or a negative count") {
    CHECK_THROWS_WITH(lora.add_ranks(2, rng), Catch::Contains("[2, 3]"));
    CHECK_THROWS_AS(lora.add_ranks(-1, rng), rankwise::InvalidArgument);
    CHECK(lora.rank() == 2);
  }
  SECTION("gates out of range or not finite") {
    CHECK_THROWS_AS(lora.set_gate(5, 0.0), rankwise::InvalidArgument);
    CHECK_THROWS_AS(lora.set_gate(0, INFINITY), rankwise::InvalidArgument);
  }
  SECTION("merge twice, unmerge unmerged, train or resize while merged") {
    CHECK_THROWS_AS(lora.unmerge(), rankwise::StateError);
    lora.merge();
    CHECK_THROWS_AS(lora.merge(), rankwise::StateError);
    lora.forward(Matrix<float>::Zero(4, 2), y);
    CHECK_THROWS_AS(lora.backward(Matrix<float>::Zero(3, 2), dx), rankwise::StateError);
    CHECK_THROWS_AS(lora.add_ranks(1, rng), rankwise::StateError);
    CHECK_THROWS_AS(lora.set_enabled(false), rankwise::StateError);
  }
  SECTION("backward before forward") {
    CHECK_THROWS_AS(lora.backward(Matrix<float>::Zero(3, 2), dx), rankwise::StateError);
  }
}

TEST_CASE("LoRA: assign_factors and set_scaling restore a saved state exactly", "[adapters][lora]") {
  Random rng(21);
  LoRA<float> source(Linear<float>(6, 5, rng), {.rank = 4, .alpha = 12.0, .use_rslora = true}, rng);
  randomize_adapter(source, rng);
  const std::vector<Index> drop = {1};
  source.remove_ranks(drop);  // rank 3, scale still alpha / sqrt(4)
  LoRA<float> target(source.base(), {.rank = 2, .alpha = 1.0}, rng);
  target.set_gate(0, 0.5);
  target.assign_factors(source.A(), source.B());
  target.set_scaling(source.alpha(), source.scale_rank(), source.options().use_rslora);
  CHECK(target.rank() == 3);
  CHECK(target.scale() == source.scale());
  CHECK(target.gates() == Matrix<float>::Ones(3, 1));  // gates reset
  CHECK(target.A_parameter().grad == Matrix<float>::Zero(3, 6));
  const Matrix<float> x = random_matrix<float>(6, 4, rng);
  Matrix<float> y_source, y_target;
  source.forward(x, y_source);
  target.forward(x, y_target);
  CHECK(y_target == y_source);  // bit for bit

  target.set_scale(0.1 + 0.2);  // any double, not only alpha / r0
  CHECK(target.scale() == 0.1 + 0.2);
  target.set_scaling(2.0, 4, false);  // back to the formula
  CHECK(target.scale() == 0.5);

  target.assign_factors(Matrix<float>(0, 6), Matrix<float>(5, 0));  // rank 0 is a valid state
  CHECK(target.rank() == 0);
}

TEST_CASE("LoRA: assign_factors and set_scaling reject bad input", "[adapters][lora][errors]") {
  Random rng(22);
  LoRA<float> lora(Linear<float>(4, 3, rng), {.rank = 2}, rng);
  CHECK_THROWS_WITH(lora.assign_factors(Matrix<float>(2, 5), Matrix<float>(3, 2)),
                    Catch::Contains("[rankwise::LoRA::assign_factors] need A r x 4 and B 3 x r (got A 2 x 5, B 3 x 2)"));
  CHECK_THROWS_WITH(lora.assign_factors(Matrix<float>(2, 4), Matrix<float>(3, 1)), Catch::Contains("got A 2 x 4, B 3 x 1"));
  CHECK(lora.rank() == 2);
  CHECK_THROWS_WITH(lora.set_scaling(0.0, 2, false), Catch::Contains("alpha must be a finite number > 0 (got 0)"));
  CHECK_THROWS_WITH(lora.set_scaling(1.0, 0, false), Catch::Contains("scale rank must be in [1, min(in, out)] = [1, 3] (got 0)"));
  CHECK_THROWS_WITH(lora.set_scale(-1.0), Catch::Contains("scale must be a finite number > 0"));
  // The constructor's rules hold for every way in (regressions: each was accepted before).
  CHECK_THROWS_WITH(lora.assign_factors(Matrix<float>(4, 4), Matrix<float>(3, 4)),
                    Catch::Contains("the rank must be at most min(in, out) = 3 (got 4)"));
  Matrix<float> A = Matrix<float>::Ones(2, 4), B = Matrix<float>::Ones(3, 2);
  A(1, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(lora.assign_factors(A, B), Catch::Contains("A and B must be finite (A holds a NaN or an infinity"));
  B(0, 0) = std::numeric_limits<float>::infinity();
  A(1, 2) = 1.0f;
  CHECK_THROWS_WITH(lora.assign_factors(A, B), Catch::Contains("(B holds a NaN or an infinity"));
  CHECK(lora.A().allFinite());  // unchanged
  lora.assign_factors(A, B, /*allow_non_finite=*/true);
  CHECK(std::isinf(lora.B()(0, 0)));
  CHECK_THROWS_WITH(lora.set_scaling(1.0, std::int64_t(1) << 62, false),
                    Catch::Contains("scale rank must be in [1, min(in, out)] = [1, 3] (got 4611686018427387904)"));
  CHECK_THROWS_WITH(lora.set_scaling(1e300, 2, false),
                    Catch::Contains("the scale alpha / r = 5e+299 is not a finite number > 0 in the adapter's precision"));
  CHECK_THROWS_WITH(lora.set_scale(1e300), Catch::Contains("scale must be a finite number > 0 in the adapter's precision"));
  CHECK_THROWS_AS(LoRA<float>(Linear<float>(4, 3, rng), {.rank = 2, .alpha = 1e40}, rng), rankwise::InvalidArgument);
  CHECK(lora.scale() == 8.0 / 2.0);  // the default alpha 8 over rank 2, unchanged by the refusals
  lora.merge();
  CHECK_THROWS_AS(lora.assign_factors(Matrix<float>(1, 4), Matrix<float>(3, 1)), rankwise::StateError);
  CHECK_THROWS_AS(lora.set_scaling(1.0, 1, false), rankwise::StateError);
  CHECK_THROWS_AS(lora.set_scale(1.0), rankwise::StateError);
}

static_assert(rankwise::Layer<LoRA<double>>);
static_assert(rankwise::Adapter<LoRA<float>>);
static_assert(rankwise::RankAdjustable<LoRA<double>>);
