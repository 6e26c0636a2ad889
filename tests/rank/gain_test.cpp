// The gain-over-cost allocator's pieces: the gradient probe of LoRA, the residual spectrum, the
// curvature estimate and the move planner (rank/gain.hpp).
#include <rankwise/adapters/lora.hpp>
#include <rankwise/layers/linear.hpp>
#include <rankwise/rank/gain.hpp>
#include <rankwise/rank/module.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <vector>

using rankwise::GainCostModule;
using rankwise::Index;
using rankwise::Linear;
using rankwise::LoRA;
using rankwise::Matrix;
using rankwise::MovePlan;
using rankwise::Random;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

namespace {

GainCostModule gain_module(Index rank, Index max_rank, std::vector<double> costs, std::vector<double> gains,
                           Index unit = 1) {
  GainCostModule g;
  g.rank = rank;
  g.max_rank = max_rank;
  g.unit_cost = unit;
  g.drop_costs = std::move(costs);
  g.protected_rank.assign(static_cast<std::size_t>(rank), 0);
  g.gains = std::move(gains);
  return g;
}

}  // namespace

TEST_CASE("LoRA gradient probe: sums G right and left^T G over the probed batches, G = sum dy x^T",
          "[adapters][lora][gain]") {
  Random rng(3);
  for (const Index rank : {Index(0), Index(2)}) {
    for (const double dropout : {0.0, 0.25}) {
      CAPTURE(rank, dropout);
      LoRA<double> lora(Linear<double>(7, 5, rng),
                        {.rank = rank == 0 ? 1 : rank, .alpha = 2.0, .dropout = dropout}, rng);
      if (rank == 0) {
        const std::vector<Index> all{0};
        lora.remove_ranks(all);
      }
      const Matrix<double> right = random_matrix<double>(7, 3, rng), left = random_matrix<double>(5, 2, rng);
      lora.arm_gradient_probe(right, left);
      REQUIRE(lora.gradient_probe_armed());
      Matrix<double> g = Matrix<double>::Zero(5, 7), y, dx;
      for (int batch = 0; batch < 3; ++batch) {
        const Matrix<double> x = random_matrix<double>(7, 4 + batch, rng), dy = random_matrix<double>(5, 4 + batch, rng);
        lora.forward(x, y);
        if (batch == 2)
          lora.backward_parameters_only(dy);
        else
          lora.backward(dy, dx);
        g += dy * x.transpose();  // the frozen weight's gradient: the raw input, not the dropped-out one
      }
      CHECK(lora.probe_batches() == 3);
      CHECK_THAT(lora.probe_right(), is_close_to(Matrix<double>(g * right), 1e-12, 1e-12));
      CHECK_THAT(lora.probe_left(), is_close_to(Matrix<double>(left.transpose() * g), 1e-12, 1e-12));
      lora.disarm_gradient_probe();
      const Matrix<double> x = random_matrix<double>(7, 2, rng), dy = random_matrix<double>(5, 2, rng);
      lora.forward(x, y);
      lora.backward(dy, dx);
      CHECK(lora.probe_batches() == 3);  // disarmed: nothing more is added
    }
  }
}

TEST_CASE("LoRA gradient probe: bad shapes and a probe armed between forward and backward are refused",
          "[adapters][lora][gain][errors]") {
  Random rng(4);
  LoRA<float> lora(Linear<float>(6, 4, rng), {.rank = 2, .alpha = 4.0}, rng);
  CHECK_THROWS_WITH(lora.arm_gradient_probe(Matrix<float>::Zero(5, 2), Matrix<float>()),
                    Catch::Contains("right must have in_features = 6 rows (got 5 x 2)"));
  CHECK_THROWS_WITH(lora.arm_gradient_probe(Matrix<float>(), Matrix<float>::Zero(3, 2)),
                    Catch::Contains("left must have out_features = 4 rows (got 3 x 2)"));
  Matrix<float> y, dx;
  const Matrix<float> x = random_matrix<float>(6, 3, rng), dy = random_matrix<float>(4, 3, rng);
  lora.forward(x, y);
  lora.arm_gradient_probe(Matrix<float>::Ones(6, 1), Matrix<float>());
  CHECK_THROWS_AS(lora.backward(dy, dx), rankwise::StateError);
}

TEST_CASE("LoRA: add_ranks_with_rows keeps the function and puts the given rows in A", "[adapters][lora][gain]") {
  Random rng(5);
  LoRA<double> lora(Linear<double>(6, 4, rng), {.rank = 2, .alpha = 4.0}, rng);
  lora.B_parameter().value = random_matrix<double>(4, 2, rng);
  lora.set_training(false);
  const Matrix<double> x = random_matrix<double>(6, 3, rng);
  Matrix<double> before, after;
  lora.forward(x, before);
  const Matrix<double> rows = random_matrix<double>(2, 6, rng);
  const rankwise::RankChange change = lora.add_ranks_with_rows(rows);
  REQUIRE(lora.rank() == 4);
  CHECK(change.changes.size() == 2);
  CHECK(Matrix<double>(lora.A().bottomRows(2)) == rows);
  CHECK(Matrix<double>(lora.B().rightCols(2)) == Matrix<double>::Zero(4, 2));
  lora.forward(x, after);
  CHECK(after == before);
  CHECK_THROWS_WITH(lora.add_ranks_with_rows(Matrix<double>::Zero(1, 5)),
                    Catch::Contains("rows must have in_features = 6 columns (got 1 x 5)"));
  CHECK_THROWS_WITH(lora.add_ranks_with_rows(Matrix<double>::Zero(1, 6)), Catch::Contains("min(in, out)"));
  CHECK(lora.rank() == 4);
  rankwise::RankModule<double> module(lora, "m");
  CHECK(module.supports_gradient_probe());
}

TEST_CASE("residual_spectrum: singular values and directions of a planted low-rank sketch", "[rank][gain]") {
  Random rng(6);
  // Z = 3 u1 v1^T + 1 u2 v2^T with orthonormal u (4 x 2) and v (9 x 2).
  const Matrix<double> u = rankwise::orthonormal_basis(random_matrix<double>(4, 2, rng));
  const Matrix<double> v = rankwise::orthonormal_basis(random_matrix<double>(9, 2, rng));
  REQUIRE(u.cols() == 2);
  REQUIRE(v.cols() == 2);
  const Matrix<double> z = 3.0 * u.col(0) * v.col(0).transpose() + 1.0 * u.col(1) * v.col(1).transpose();
  const rankwise::ResidualSpectrum s = rankwise::residual_spectrum(z);
  REQUIRE(s.sigma.size() >= 2);
  CHECK(s.sigma[0] == Approx(3.0));
  CHECK(s.sigma[1] == Approx(1.0));
  CHECK(std::abs(s.directions.col(0).dot(v.col(0))) == Approx(1.0));
  // A rank-deficient matrix gives as many basis vectors as its rank; project_off removes a span.
  Matrix<double> m(5, 3);
  m << random_matrix<double>(5, 2, rng), Matrix<double>::Zero(5, 1);
  m.col(2) = m.col(0) + m.col(1);
  const Matrix<double> q = rankwise::orthonormal_basis(m);
  CHECK(q.cols() == 2);
  CHECK(rankwise::orthonormal_basis(Matrix<double>::Zero(5, 3)).cols() == 0);  // B of fresh ranks
  CHECK(rankwise::orthonormal_basis(Matrix<double>(5, 0)).cols() == 0);
  Matrix<double> w = m;
  rankwise::project_off(w, q);
  CHECK(w.norm() < 1e-12);
}

TEST_CASE("module_curvatures: 2 sum(costs) / sum(||dW||^2), shrunk towards the pooled value", "[rank][gain]") {
  // Pooled: costs 0.4 + 0.2 + 0.0 (a negative cost counts as 0) over 3 ranks, norms 1 + 1 + 2.
  const std::vector<double> h = rankwise::module_curvatures({{0.4, 0.2}, {-0.1}, {}}, {{1.0, 1.0}, {2.0}, {}});
  const double c_pool = 0.6 / 3, d_pool = 4.0 / 3;
  CHECK(h[0] == Approx(2.0 * (0.6 + 2 * c_pool) / (2.0 + 2 * d_pool)));
  CHECK(h[1] == Approx(2.0 * (0.0 + 2 * c_pool) / (2.0 + 2 * d_pool)));
  CHECK(h[2] == Approx(2.0 * c_pool / d_pool));
  CHECK(rankwise::module_curvatures({{-1.0}}, {{1.0}}) == std::vector<double>{0.0});
  CHECK_THROWS_AS(rankwise::module_curvatures({{1.0}}, {}), rankwise::InvalidArgument);
}

TEST_CASE("plan_moves: a rank moves only while the gain beats gain_ratio x its cost", "[rank][gain]") {
  // Module 0 has a cheap rank (0.001) and a dear one; module 1 predicts 0.01, then 0.0012.
  const std::vector<GainCostModule> modules{gain_module(2, 8, {0.001, 0.05}, {}),
                                            gain_module(1, 8, {0.02}, {0.01, 0.0012})};
  const MovePlan plan = rankwise::plan_moves(modules, 0, 1.5);
  REQUIRE(plan.moves.size() == 1);  // the second gain (0.0012) does not pay for the next rank (0.05)
  CHECK(plan.remove[0] == std::vector<Index>{0});
  CHECK(plan.add == std::vector<Index>{0, 1});
  CHECK(plan.moves[0].from == 0);
  CHECK(plan.moves[0].cost == 0.001);
  // A higher ratio settles at once; nothing moves.
  CHECK(rankwise::plan_moves(modules, 0, 20.0).moves.empty());
}

TEST_CASE("plan_moves: protected ranks stay, free budget pays first, nobody gives and receives at once",
          "[rank][gain]") {
  std::vector<GainCostModule> modules{gain_module(2, 8, {0.0, 0.0}, {0.5}), gain_module(1, 8, {0.001}, {0.4})};
  modules[1].protected_rank[0] = 1;
  // Free budget of one unit: module 0 (best gain) takes it; module 1 cannot be paid: its only donor
  // candidates are module 0's ranks, but module 0 is receiving, and its own rank is protected.
  MovePlan plan = rankwise::plan_moves(modules, 1, 1.5);
  REQUIRE(plan.moves.size() == 1);
  CHECK(plan.moves[0].from == -1);
  CHECK(plan.add == std::vector<Index>{1, 0});
  CHECK(plan.remove[0].empty());
  CHECK(plan.remove[1].empty());
  // A module at rank 0 can be emptied: its ranks cost nothing against a gain elsewhere.
  const std::vector<GainCostModule> emptied{gain_module(2, 4, {-0.001, 0.0001}, {}), gain_module(2, 4, {0.1, 0.1}, {0.02, 0.01})};
  plan = rankwise::plan_moves(emptied, 0, 1.5);
  CHECK(plan.remove[0] == std::vector<Index>{0, 1});
  CHECK(plan.add == std::vector<Index>{0, 2});
  // max_moves caps a round.
  CHECK(rankwise::plan_moves(emptied, 0, 1.5, 1).moves.size() == 1);
}

TEST_CASE("plan_moves: budget units in parameters, a dear receiver paid by several ranks", "[rank][gain]") {
  // Receiver: one rank costs 40 units; donors: ranks of 16 units each (three are needed).
  const std::vector<GainCostModule> modules{gain_module(0, 8, {}, {0.1}, 40),
                                            gain_module(4, 8, {0.001, 0.002, 0.003, 0.5}, {}, 16)};
  const MovePlan plan = rankwise::plan_moves(modules, 0, 1.5);
  REQUIRE(plan.moves.size() == 1);
  CHECK(plan.remove[1] == std::vector<Index>{0, 1, 2});
  CHECK(plan.moves[0].cost == Approx(0.006));
  // Invalid input.
  CHECK_THROWS_WITH(rankwise::plan_moves(modules, 0, 0.0), Catch::Contains("gain_ratio must be finite and > 0"));
  CHECK_THROWS_WITH(rankwise::plan_moves(modules, -1, 1.5), Catch::Contains("free_units must be >= 0"));
  std::vector<GainCostModule> bad = modules;
  bad[1].drop_costs.pop_back();
  CHECK_THROWS_WITH(rankwise::plan_moves(bad, 0, 1.5), Catch::Contains("one drop cost and one protection flag per rank"));
}
