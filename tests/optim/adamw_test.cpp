// Tests for rankwise/optim/adamw.hpp and rankwise/optim/optimizer.hpp.
#include <rankwise/adapters/lora.hpp>
#include <rankwise/optim/adamw.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

using rankwise::AdamW;
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Parameter;
using rankwise::Random;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

namespace {
Parameter<double> make_parameter(const char* name, Index rows, Index cols, Random& rng) {
  Parameter<double> p{name, random_matrix<double>(rows, cols, rng), {}, true, false};
  p.grad = random_matrix<double>(rows, cols, rng);
  return p;
}
}  // namespace

TEST_CASE("AdamW: the first two steps equal their closed forms", "[optim][adamw]") {
  Random rng(1);
  Parameter<double> p = make_parameter("w", 3, 4, rng);
  const Matrix<double> p0 = p.value, g1 = p.grad;
  const double lr = 0.01, wd = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  AdamW<double> opt({&p}, {.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd});
  opt.step();
  // t = 1: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps), after decay by (1 - lr wd).
  const Matrix<double> p1 = (p0 * (1 - lr * wd)).array() - lr * g1.array() / (g1.array().abs() + eps);
  CHECK_THAT(p.value, is_close_to(p1, 1e-12, 1e-14));

  const Matrix<double> g2 = random_matrix<double>(3, 4, rng);
  p.grad = g2;
  opt.step();
  const Matrix<double> m = b1 * (1 - b1) * g1 + (1 - b1) * g2;
  const Matrix<double> v = b2 * (1 - b2) * g1.cwiseAbs2() + (1 - b2) * g2.cwiseAbs2();
  const double c1 = 1 - b1 * b1, c2 = 1 - b2 * b2;
  const Matrix<double> p2 =
      (p1 * (1 - lr * wd)).array() - lr * (m.array() / c1) / ((v.array() / c2).sqrt() + eps);
  CHECK_THAT(p.value, is_close_to(p2, 1e-12, 1e-14));
  CHECK(opt.step_count() == 2);
}

TEST_CASE("AdamW: frozen parameters are never touched", "[optim][adamw]") {
  Random rng(2);
  Parameter<float> frozen{"f", Matrix<float>::Ones(2, 2), Matrix<float>::Ones(2, 2), false, false};
  AdamW<float> opt({&frozen}, {.lr = 0.1});
  opt.step();
  CHECK(frozen.value == Matrix<float>::Ones(2, 2));
  CHECK(opt.state_of("f") == nullptr);
}

TEST_CASE("AdamW: groups carry their own lr and weight decay", "[optim][adamw]") {
  Random rng(3);
  Parameter<double> a = make_parameter("a", 2, 2, rng), b = make_parameter("b", 2, 2, rng);
  a.value.setZero();
  b.value.setZero();
  a.grad.setConstant(1.0);
  b.grad.setConstant(-2.0);
  std::vector<rankwise::ParameterGroup<double>> groups = {{{&a}, 0.1, 0.0, "slow"}, {{&b}, 0.5, {}, "fast"}};
  AdamW<double> opt(groups, {.lr = 1.0, .weight_decay = 0.0});
  opt.step();
  CHECK(a.value(0, 0) == Approx(-0.1));  // |first step| = lr for any gradient
  CHECK(b.value(0, 0) == Approx(0.5));
  opt.set_lr_factor(0.5);
  a.grad.setConstant(1.0);
  b.grad.setConstant(-2.0);
  opt.step();
  CHECK(a.value(0, 0) == Approx(-0.15));
  CHECK(b.value(0, 0) == Approx(0.75));
}

TEST_CASE("AdamW: state follows rank surgery (remove {1, 3} of 8, then add 2)", "[optim][adamw]") {
  Random rng(4);
  rankwise::LoRA<double> lora(rankwise::Linear<double>(10, 9, rng), {.rank = 8, .alpha = 8.0}, rng);
  lora.set_path("m");
  AdamW<double> opt(lora.parameters(), {.lr = 1e-2});
  const Matrix<double> x = random_matrix<double>(10, 6, rng);
  Matrix<double> y, dx;
  for (int i = 0; i < 3; ++i) {
    lora.zero_grad();
    lora.forward(x, y);
    lora.backward(random_matrix<double>(9, 6, rng), dx);
    opt.step();
  }
  const auto* before = opt.state_of("m.lora_A.weight");
  REQUIRE(before != nullptr);
  const Matrix<double> mA = before->m, vA = before->v;
  const Matrix<double> mB = opt.state_of("m.lora_B.weight")->m;

  const std::vector<Index> gone = {1, 3};
  opt.follow(lora.remove_ranks(gone));
  opt.follow(lora.add_ranks(2, rng));
  REQUIRE(lora.rank() == 8);

  const auto& sA = *opt.state_of("m.lora_A.weight");
  const auto& sB = *opt.state_of("m.lora_B.weight");
  const std::vector<Index> survivors = {0, 2, 4, 5, 6, 7};
  for (std::size_t j = 0; j < survivors.size(); ++j) {
    CHECK(sA.m.row(Index(j)) == mA.row(survivors[j]));
    CHECK(sA.v.row(Index(j)) == vA.row(survivors[j]));
    CHECK(sB.m.col(Index(j)) == mB.col(survivors[j]));
    CHECK(sA.steps(Index(j)) == 3.0);
  }
  CHECK(sA.m.bottomRows(2).isZero(0.0));
  CHECK(sA.v.bottomRows(2).isZero(0.0));
  CHECK(sB.m.rightCols(2).isZero(0.0));
  CHECK(sA.steps.tail(2).isZero(0.0));

  // The next step treats the fresh rows as fresh parameters: |update| = lr (t = 1), while the
  // survivors continue with t = 4.
  lora.zero_grad();
  lora.forward(x, y);
  lora.backward(random_matrix<double>(9, 6, rng), dx);
  const Matrix<double> A_before = lora.A(), gA = lora.A_parameter().grad;
  opt.step();
  const double wd_decay = 1 - 1e-2 * 1e-2;
  for (Index j = 6; j < 8; ++j)
    for (Index c = 0; c < 10; ++c) {
      const double expected = A_before(j, c) * wd_decay - 1e-2 * gA(j, c) / (std::abs(gA(j, c)) + 1e-8);
      CHECK(lora.A()(j, c) == Approx(expected).epsilon(1e-10));
    }
  CHECK(opt.state_of("m.lora_A.weight")->steps(0) == 4.0);
}

TEST_CASE("AdamW: slices outside the update window keep value and state bit for bit", "[optim][adamw]") {
  Random rng(7);
  // Rows of A and columns of B, as DyLoRA's frozen components, with momentum and weight decay on.
  Parameter<double> A = make_parameter("A", 6, 4, rng), B = make_parameter("B", 5, 6, rng);
  AdamW<double> opt(std::vector<Parameter<double>*>{&A, &B}, {.lr = 1e-2, .weight_decay = 0.1});
  opt.step();  // every slice has momentum now
  for (const auto& [lo, b] : std::vector<std::pair<Index, Index>>{{2, 3}, {0, 4}, {5, 6}}) {
    A.grad = random_matrix<double>(6, 4, rng);  // non-zero gradients outside too: they must be ignored
    B.grad = random_matrix<double>(5, 6, rng);
    A.update_window = rankwise::UpdateWindow{rankwise::Axis::Rows, lo, b};
    B.update_window = rankwise::UpdateWindow{rankwise::Axis::Cols, lo, b};
    const Matrix<double> A0 = A.value, B0 = B.value;
    const Matrix<double> mA = opt.state_of("A")->m, vA = opt.state_of("A")->v, mB = opt.state_of("B")->m;
    const Eigen::ArrayXd tA = opt.state_of("A")->steps;
    opt.step();
    for (Index i = 0; i < 6; ++i) {
      const bool inside = i >= lo && i < b;
      INFO("window [" << lo << ", " << b << "), slice " << i);
      CHECK((A.value.row(i) == A0.row(i)) == !inside);
      CHECK((opt.state_of("A")->m.row(i) == mA.row(i)) == !inside);
      CHECK((opt.state_of("A")->v.row(i) == vA.row(i)) == !inside);
      CHECK(opt.state_of("A")->steps(i) == tA(i) + (inside ? 1.0 : 0.0));
      CHECK((B.value.col(i) == B0.col(i)) == !inside);
      CHECK((opt.state_of("B")->m.col(i) == mB.col(i)) == !inside);
    }
  }
  // Inside the window the step is AdamW's with the slice's own t: a slice trained once before (t = 2).
  A.update_window = rankwise::UpdateWindow{rankwise::Axis::Rows, 5, 6};
  A.grad = random_matrix<double>(6, 4, rng);
  const Matrix<double> A0 = A.value, m0 = opt.state_of("A")->m, v0 = opt.state_of("A")->v;
  REQUIRE(opt.state_of("A")->steps(5) == 2.0);
  opt.step();
  const double lr = 1e-2, t = 3.0;
  for (Index c = 0; c < 4; ++c) {
    const double m = 0.9 * m0(5, c) + 0.1 * A.grad(5, c);
    const double v = 0.999 * v0(5, c) + 0.001 * A.grad(5, c) * A.grad(5, c);
    const double expected = A0(5, c) * (1 - lr * 0.1) -
                            lr * (m / (1 - std::pow(0.9, t))) / (std::sqrt(v / (1 - std::pow(0.999, t))) + 1e-8);
    CHECK(A.value(5, c) == Approx(expected).epsilon(1e-12));
  }
}

TEST_CASE("AdamW: an update window outside the parameter is refused", "[optim][adamw][errors]") {
  Random rng(8);
  Parameter<double> A = make_parameter("A", 3, 2, rng);
  AdamW<double> opt(std::vector<Parameter<double>*>{&A}, {});
  A.update_window = rankwise::UpdateWindow{rankwise::Axis::Rows, 1, 4};
  CHECK_THROWS_WITH(opt.step(), Catch::Contains("[rankwise::AdamW]") && Catch::Contains("<= 3 (got [1, 4))"));
  // After windows along rows have made step counts differ, a window along columns cannot follow.
  A.update_window = rankwise::UpdateWindow{rankwise::Axis::Rows, 0, 1};
  opt.step();
  A.update_window = rankwise::UpdateWindow{rankwise::Axis::Cols, 0, 1};
  CHECK_THROWS_AS(opt.step(), rankwise::StateError);
}

TEST_CASE("AdamW: a step after surgery that was not followed is refused", "[optim][adamw][errors]") {
  Random rng(5);
  rankwise::LoRA<float> lora(rankwise::Linear<float>(6, 6, rng), {.rank = 3}, rng);
  AdamW<float> opt(lora.parameters(), {});
  opt.step();
  const std::vector<Index> gone = {0};
  lora.remove_ranks(gone);
  CHECK_THROWS_WITH(opt.step(), Catch::Contains("call follow()"));
}

TEST_CASE("AdamW: invalid options are rejected", "[optim][adamw][errors]") {
  Random rng(6);
  Parameter<float> p{"p", Matrix<float>::Ones(1, 1), Matrix<float>::Zero(1, 1), true, false};
  Parameter<float> q{"p", Matrix<float>::Ones(1, 1), Matrix<float>::Zero(1, 1), true, false};
  Parameter<float> unnamed{"", Matrix<float>::Ones(1, 1), Matrix<float>::Zero(1, 1), true, false};
  CHECK_THROWS_WITH(AdamW<float>({&p}, {.lr = 0.0}), Catch::Contains("[rankwise::AdamW] lr must be"));
  CHECK_THROWS_WITH(AdamW<float>({&p}, {.lr = -1e-3}), Catch::Contains("(got -0.001)"));
  CHECK_THROWS_AS(AdamW<float>({&p}, {.beta1 = 1.0}), rankwise::InvalidArgument);
  CHECK_THROWS_AS(AdamW<float>({&p}, {.beta2 = -0.1}), rankwise::InvalidArgument);
  CHECK_THROWS_AS(AdamW<float>({&p}, {.eps = 0.0}), rankwise::InvalidArgument);
  CHECK_THROWS_AS(AdamW<float>({&p}, {.weight_decay = -1.0}), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(AdamW<float>(std::vector<Parameter<float>*>{&p, &q}, {}), Catch::Contains("unique"));
  CHECK_THROWS_WITH(AdamW<float>({&unnamed}, {}), Catch::Contains("needs a name"));
  CHECK_THROWS_AS(AdamW<float>(std::vector<Parameter<float>*>{nullptr}, {}), rankwise::InvalidArgument);
  std::vector<rankwise::ParameterGroup<float>> bad = {{{&p}, -1.0, {}, "g"}};
  CHECK_THROWS_WITH(AdamW<float>(bad, {}), Catch::Contains("lr of group 0 ('g')"));
  AdamW<float> opt({&p}, {});
  CHECK_THROWS_AS(opt.set_lr_factor(-1.0), rankwise::InvalidArgument);
}

TEST_CASE("AdamW: restore() puts back moments and per-slice steps, so training continues identically",
          "[optim][adamw]") {
  Random rng(5);
  rankwise::LoRA<float> lora(rankwise::Linear<float>(6, 6, rng), {.rank = 4}, rng);
  lora.B_parameter().value = random_matrix<float>(6, 4, rng);
  AdamW<float> opt(lora.parameters(), {.lr = 0.01});
  const auto train = [&](rankwise::LoRA<float>& layer, AdamW<float>& o, Random& data) {
    const Matrix<float> x = random_matrix<float>(6, 3, data), dy = random_matrix<float>(6, 3, data);
    Matrix<float> y, dx;
    layer.zero_grad();
    layer.forward(x, y);
    layer.backward(dy, dx);
    o.step();
  };
  train(lora, opt, rng);
  const std::vector<Index> gone = {2};
  opt.follow(lora.remove_ranks(gone));
  opt.follow(lora.add_ranks(2, rng));  // per-slice step counts now differ: {1, 1, 1, 0, 0}
  train(lora, opt, rng);
  REQUIRE(opt.state_of("lora_A.weight")->steps(3) == 1.0);

  rankwise::LoRA<float> copy = lora;
  AdamW<float> restored(copy.parameters(), {.lr = 0.01});
  restored.restore(opt.step_count(), opt.states());
  CHECK(restored.step_count() == 2);
  Random data_a(9), data_b(9);
  for (int i = 0; i < 3; ++i) {
    train(lora, opt, data_a);
    train(copy, restored, data_b);
  }
  CHECK(copy.A() == lora.A());
  CHECK(copy.B() == lora.B());
}

TEST_CASE("AdamW: restore() rejects state that does not fit the parameters", "[optim][adamw][errors]") {
  Parameter<float> p{"p", Matrix<float>::Ones(2, 3), Matrix<float>::Zero(2, 3), true, false};
  AdamW<float> opt({&p}, {});
  using State = AdamW<float>::State;
  const auto state = [](Index rows, Index cols, Index steps) {
    State s;
    s.m.setZero(rows, cols);
    s.v.setZero(rows, cols);
    s.steps.setZero(steps);
    return s;
  };
  CHECK_THROWS_WITH(opt.restore(1, {{"q", state(2, 3, 2)}}), Catch::Contains("'q', which is not a parameter"));
  CHECK_THROWS_WITH(opt.restore(1, {{"p", state(3, 2, 3)}}),
                    Catch::Contains("must be 2 x 3 like the parameter (got m 3 x 2, v 3 x 2)"));
  CHECK_THROWS_WITH(opt.restore(1, {{"p", state(2, 3, 3)}}), Catch::Contains("needs 2 step counts, one per row (got 3)"));
  State negative = state(2, 3, 2);
  negative.steps(0) = -1.0;
  CHECK_THROWS_WITH(opt.restore(1, {{"p", negative}}), Catch::Contains("finite and >= 0"));
  CHECK(opt.states().empty());
}

static_assert(rankwise::Optimizer<AdamW<double>>);
