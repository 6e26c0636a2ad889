// Tests for rankwise/optim/sgd.hpp.
#include <rankwise/adapters/lora.hpp>
#include <rankwise/optim/sgd.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <vector>

using rankwise::Index;
using rankwise::Matrix;
using rankwise::Parameter;
using rankwise::Random;
using rankwise::SGD;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

TEST_CASE("SGD: steps equal their closed forms", "[optim][sgd]") {
  Random rng(1);
  Parameter<double> p{"w", random_matrix<double>(3, 2, rng), random_matrix<double>(3, 2, rng), true, false};
  const Matrix<double> p0 = p.value, g1 = p.grad, g2 = random_matrix<double>(3, 2, rng);
  SECTION("plain") {
    SGD<double> opt({&p}, {.lr = 0.1});
    opt.step();
    CHECK_THAT(p.value, is_close_to(Matrix<double>(p0 - 0.1 * g1), 1e-14, 1e-14));
  }
  SECTION("momentum and weight decay") {
    SGD<double> opt({&p}, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01});
    opt.step();
    const Matrix<double> v1 = g1 + 0.01 * p0;
    const Matrix<double> p1 = p0 - 0.1 * v1;
    CHECK_THAT(p.value, is_close_to(p1, 1e-14, 1e-14));
    p.grad = g2;
    opt.step();
    const Matrix<double> v2 = 0.9 * v1 + (g2 + 0.01 * p1);
    CHECK_THAT(p.value, is_close_to(Matrix<double>(p1 - 0.1 * v2), 1e-14, 1e-14));
  }
  SECTION("nesterov") {
    SGD<double> opt({&p}, {.lr = 0.1, .momentum = 0.5, .nesterov = true});
    opt.step();
    CHECK_THAT(p.value, is_close_to(Matrix<double>(p0 - 0.1 * (g1 + 0.5 * g1)), 1e-14, 1e-14));
  }
}

TEST_CASE("SGD: momentum follows rank surgery", "[optim][sgd]") {
  Random rng(2);
  rankwise::LoRA<double> lora(rankwise::Linear<double>(5, 5, rng), {.rank = 4}, rng);
  SGD<double> opt(lora.parameters(), {.lr = 0.1, .momentum = 0.9});
  lora.A_parameter().grad = random_matrix<double>(4, 5, rng);
  opt.step();
  const Matrix<double> v = *opt.velocity_of("lora_A.weight");
  const std::vector<Index> gone = {0, 3};
  opt.follow(lora.remove_ranks(gone));
  opt.follow(lora.add_ranks(1, rng));
  const Matrix<double>& w = *opt.velocity_of("lora_A.weight");
  REQUIRE(w.rows() == 3);
  CHECK(w.row(0) == v.row(1));
  CHECK(w.row(1) == v.row(2));
  CHECK(w.row(2).isZero(0.0));
}

TEST_CASE("SGD: slices outside the update window keep value and momentum bit for bit", "[optim][sgd]") {
  Random rng(3);
  for (const bool nesterov : {false, true}) {
    Parameter<double> B{"B", random_matrix<double>(4, 5, rng), random_matrix<double>(4, 5, rng), true, false};
    SGD<double> opt({&B}, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.05, .nesterov = nesterov});
    opt.step();
    B.update_window = rankwise::UpdateWindow{rankwise::Axis::Cols, 1, 3};
    B.grad = random_matrix<double>(4, 5, rng);
    const Matrix<double> B0 = B.value, v0 = *opt.velocity_of("B");
    opt.step();
    for (Index j = 0; j < 5; ++j) {
      const bool inside = j >= 1 && j < 3;
      CHECK((B.value.col(j) == B0.col(j)) == !inside);
      CHECK((opt.velocity_of("B")->col(j) == v0.col(j)) == !inside);
    }
    const Matrix<double> v_expected = 0.9 * v0.col(1) + (B.grad.col(1) + 0.05 * B0.col(1));
    CHECK_THAT(Matrix<double>(opt.velocity_of("B")->col(1)), is_close_to(v_expected, 1e-14, 1e-14));
  }
  Parameter<double> plain{"p", Matrix<double>::Ones(2, 2), Matrix<double>::Ones(2, 2), true, false};
  plain.update_window = rankwise::UpdateWindow{rankwise::Axis::Rows, 1, 1};  // an empty window trains nothing
  SGD<double> opt({&plain}, {.lr = 0.1, .weight_decay = 0.1});
  opt.step();
  CHECK(plain.value == Matrix<double>::Ones(2, 2));
  plain.update_window = rankwise::UpdateWindow{rankwise::Axis::Cols, -1, 1};
  CHECK_THROWS_WITH(opt.step(), Catch::Contains("[rankwise::SGD]") && Catch::Contains("update window of 'p'"));
}

TEST_CASE("SGD: invalid options are rejected", "[optim][sgd][errors]") {
  Parameter<float> p{"p", Matrix<float>::Ones(1, 1), Matrix<float>::Zero(1, 1), true, false};
  CHECK_THROWS_WITH(SGD<float>({&p}, {.lr = 0.0}), Catch::Contains("[rankwise::SGD] lr must be"));
  CHECK_THROWS_WITH(SGD<float>({&p}, {.momentum = 1.0}), Catch::Contains("momentum must be in [0, 1) (got 1)"));
  CHECK_THROWS_AS(SGD<float>({&p}, {.nesterov = true}), rankwise::InvalidArgument);
}

TEST_CASE("SGD: restore() puts back saved momentum, so training continues identically", "[optim][sgd]") {
  Random rng(3);
  Parameter<double> a{"a", random_matrix<double>(3, 2, rng), {}, true, false};
  Parameter<double> b = a;
  const Matrix<double> g1 = random_matrix<double>(3, 2, rng), g2 = random_matrix<double>(3, 2, rng);
  SGD<double> first({&a}, {.lr = 0.1, .momentum = 0.9});
  a.grad = g1;
  first.step();
  SGD<double> second({&b}, {.lr = 0.1, .momentum = 0.9});
  b.value = a.value;
  second.restore(first.step_count(), first.velocities());
  a.grad = g2;
  b.grad = g2;
  first.step();
  second.step();
  CHECK(b.value == a.value);
  CHECK(second.step_count() == 2);
}

TEST_CASE("SGD: restore() rejects state that does not fit the parameters", "[optim][sgd][errors]") {
  Parameter<float> p{"p", Matrix<float>::Ones(2, 2), Matrix<float>::Zero(2, 2), true, false};
  SGD<float> opt({&p}, {.momentum = 0.5});
  CHECK_THROWS_WITH(opt.restore(1, {{"q", Matrix<float>::Zero(2, 2)}}),
                    Catch::Contains("momentum for 'q', which is not a parameter of this optimizer"));
  CHECK_THROWS_WITH(opt.restore(1, {{"p", Matrix<float>::Zero(2, 3)}}),
                    Catch::Contains("must be 2 x 2 like the parameter (got 2 x 3)"));
  CHECK_THROWS_WITH(opt.restore(-1, {}), Catch::Contains("step count must be >= 0"));
  CHECK(opt.step_count() == 0);
}

static_assert(rankwise::Optimizer<SGD<float>>);
