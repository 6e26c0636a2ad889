// Tests for rankwise/rank/importance.hpp (and the RankModule handle of rankwise/rank/module.hpp).
#include <rankwise/rank/importance.hpp>
#include <rankwise/rank/module.hpp>

#include <rankwise/adapters/lora.hpp>
#include <rankwise/layers/linear.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <vector>

using rankwise::AblationImportance;
using rankwise::AblationScope;
using rankwise::Index;
using rankwise::Linear;
using rankwise::LoRA;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::RankModule;
using rankwise::Status;
using rankwise::test_support::random_matrix;

// An adapter that is not rank-adjustable cannot be wrapped (the error is the unsatisfied concept).
static_assert(!std::is_constructible_v<RankModule<float>, Linear<float>&, std::string>,
              "a plain Linear is not rank-adjustable");
static_assert(std::is_constructible_v<RankModule<float>, LoRA<float>&, std::string>);
static_assert(!std::is_constructible_v<RankModule<float>, LoRA<double>&, std::string>, "scalars must agree");

namespace {

// Two stacked adapted layers (5 -> 4 -> 3) with random, non-zero A and B, and a fixed validation
// batch. Stacking couples them, so the two scopes of "M with only r" give different scores.
struct TwoLayerModel {
  Random rng{7};
  LoRA<float> first{Linear<float>(5, 4, rng), {.rank = 3, .alpha = 6.0}, rng};
  LoRA<float> second{Linear<float>(4, 3, rng), {.rank = 2, .alpha = 2.0}, rng};
  Matrix<float> x = random_matrix<float>(5, 16, rng);
  Matrix<float> target = random_matrix<float>(3, 16, rng);
  Matrix<float> h, y;
  Matrix<float> cache[2];  // input of stage 1 for the two slots of a staged evaluation
  int calls = 0;

  TwoLayerModel() {
    for (LoRA<float>* l : {&first, &second}) {
      l->A_parameter().value = random_matrix<float>(l->rank(), l->in_features(), rng);
      l->B_parameter().value = 0.5f * random_matrix<float>(l->out_features(), l->rank(), rng);
    }
  }

  std::vector<RankModule<float>> modules() { return {RankModule<float>(first, "l0.fc"), RankModule<float>(second, "l1.fc")}; }

  double loss_of(const Matrix<float>& out) const {
    return 0.5 * (out - target).cast<double>().squaredNorm() / double(out.cols());
  }
  double evaluate() {
    ++calls;
    first.forward(x, h);
    second.forward(h, y);
    return loss_of(y);
  }
  rankwise::StagedEvaluation staged() {
    rankwise::StagedEvaluation s;
    s.module_stage = {0, 1};
    s.capture = [this](int slot) {
      first.forward(x, cache[slot]);
      second.forward(cache[slot], y);
      return loss_of(y);
    };
    s.evaluate_from = [this](Index stage, int slot) {
      if (stage == 0) first.forward(x, h);
      second.forward(stage == 0 ? h : cache[slot], y);
      return loss_of(y);
    };
    return s;
  }
};

// The loss with an explicit set of active ranks per layer, from the weights in double: an
// independent computation of what the gates should achieve.
double reference_loss(const TwoLayerModel& m, const std::vector<int>& on0, const std::vector<int>& on1) {
  const auto effective = [](const LoRA<float>& l, const std::vector<int>& on) {
    Matrix<double> w = l.base().weight().cast<double>();
    for (Index i = 0; i < l.rank(); ++i)
      if (on[static_cast<std::size_t>(i)])
        w += l.scale() * l.B().col(i).cast<double>() * l.A().row(i).cast<double>();
    return w;
  };
  Matrix<double> h = effective(m.first, on0) * m.x.cast<double>();
  h.colwise() += m.first.base().bias().col(0).cast<double>();
  Matrix<double> y = effective(m.second, on1) * h;
  y.colwise() += m.second.base().bias().col(0).cast<double>();
  return 0.5 * (y - m.target.cast<double>()).squaredNorm() / double(y.cols());
}

std::vector<int> all_but(Index r, Index i) {
  std::vector<int> v(static_cast<std::size_t>(r), 1);
  v[static_cast<std::size_t>(i)] = 0;
  return v;
}
std::vector<int> only(Index r, Index i) {
  std::vector<int> v(static_cast<std::size_t>(r), 0);
  v[static_cast<std::size_t>(i)] = 1;
  return v;
}
std::vector<int> all(Index r) { return std::vector<int>(static_cast<std::size_t>(r), 1); }
std::vector<int> none(Index r) { return std::vector<int>(static_cast<std::size_t>(r), 0); }

// Every output of the model in eval mode, to compare bit for bit.
Matrix<float> outputs(TwoLayerModel& m) {
  m.first.set_training(false);
  m.second.set_training(false);
  Matrix<float> h, y;
  m.first.forward(m.x, h);
  m.second.forward(h, y);
  m.first.set_training(true);
  m.second.set_training(true);
  return y;
}

}  // namespace

TEST_CASE("RankModule: forwards rank, gates and surgery to the adapter it wraps", "[rank][importance]") {
  Random rng(1);
  LoRA<float> lora(Linear<float>(6, 4, rng), {.rank = 3, .alpha = 6.0}, rng);
  lora.set_path("blocks.0.fc");
  RankModule<float> module(lora, "blocks.0.fc");
  CHECK(module.path() == "blocks.0.fc");
  CHECK(module.in_features() == 6);
  CHECK(module.out_features() == 4);
  CHECK(module.max_rank() == 4);
  CHECK(module.cost_per_rank() == 10);
  CHECK(module.scale() == Approx(2.0));
  module.set_gate(1, 0.0);
  CHECK(lora.gate(1) == 0.0);
  module.reset_gates();
  CHECK(lora.gate(1) == 1.0);
  const std::vector<rankwise::RankSlice<float>> slices = module.rank_slices();
  REQUIRE(slices.size() == 2);
  CHECK(slices[0].parameter == &lora.A_parameter());
  CHECK(slices[0].axis == rankwise::Axis::Rows);
  CHECK(slices[1].parameter == &lora.B_parameter());
  CHECK(slices[1].axis == rankwise::Axis::Cols);
  const Index removed[] = {0};
  const rankwise::RankChange change = module.remove_ranks(removed);
  CHECK(lora.rank() == 2);
  CHECK(change.changes.size() == 2);
  module.add_ranks(2, rng);
  CHECK(module.rank() == 4);
  RankModule<float> copy = module;
  CHECK(copy.same_adapter(module));
  CHECK_THROWS_WITH(RankModule<float>(lora, ""), Catch::Contains("[rankwise::RankModule]") && Catch::Contains("path"));
}

TEST_CASE("AblationImportance: scores are CE(M without r) - CE(M with only r) over the network", "[rank][importance]") {
  TwoLayerModel model;
  std::vector<RankModule<float>> modules = model.modules();
  AblationImportance<float> estimator([&] { return model.evaluate(); });
  const rankwise::ImportanceScores s = estimator.score(modules);
  REQUIRE(s.status == Status::Ok);
  REQUIRE(s.scores.size() == 2);
  REQUIRE(s.scores[0].size() == 3);
  REQUIRE(s.scores[1].size() == 2);
  CHECK(s.loss == Approx(reference_loss(model, all(3), all(2))).epsilon(1e-5));
  for (Index i = 0; i < 3; ++i) {
    const double expected = reference_loss(model, all_but(3, i), all(2)) - reference_loss(model, only(3, i), none(2));
    CHECK(s.scores[0][static_cast<std::size_t>(i)] == Approx(expected).epsilon(1e-4).margin(1e-5));
  }
  for (Index i = 0; i < 2; ++i) {
    const double expected = reference_loss(model, all(3), all_but(2, i)) - reference_loss(model, none(3), only(2, i));
    CHECK(s.scores[1][static_cast<std::size_t>(i)] == Approx(expected).epsilon(1e-4).margin(1e-5));
  }
  // 2 R + 1 evaluations: one of M, then R without and R with only each rank.
  CHECK(model.calls == 2 * 5 + 1);
  CHECK(s.full_evaluations == 11);
  CHECK(s.partial_evaluations == 0);
}

TEST_CASE("AblationImportance: the module scope keeps the other modules whole", "[rank][importance]") {
  TwoLayerModel model;
  std::vector<RankModule<float>> modules = model.modules();
  AblationImportance<float> estimator([&] { return model.evaluate(); }, {.scope = AblationScope::Module});
  const rankwise::ImportanceScores s = estimator.score(modules);
  REQUIRE(s.status == Status::Ok);
  for (Index i = 0; i < 3; ++i) {
    const double expected = reference_loss(model, all_but(3, i), all(2)) - reference_loss(model, only(3, i), all(2));
    CHECK(s.scores[0][static_cast<std::size_t>(i)] == Approx(expected).epsilon(1e-4).margin(1e-5));
  }
  const double expected = reference_loss(model, all(3), all_but(2, 1)) - reference_loss(model, all(3), only(2, 1));
  CHECK(s.scores[1][1] == Approx(expected).epsilon(1e-4).margin(1e-5));
  // The scopes really differ on a coupled model.
  AblationImportance<float> network([&] { return model.evaluate(); });
  CHECK(network.score(modules).scores[1][1] != Approx(s.scores[1][1]).epsilon(1e-3));
}

TEST_CASE("AblationImportance: the upstream cache gives the same scores with partial evaluations", "[rank][importance]") {
  for (AblationScope scope : {AblationScope::Network, AblationScope::Module}) {
    TwoLayerModel model;
    std::vector<RankModule<float>> modules = model.modules();
    AblationImportance<float> plain([&] { return model.evaluate(); }, {.scope = scope});
    AblationImportance<float> cached(model.staged(), {.scope = scope});
    CHECK(cached.uses_stages());
    const rankwise::ImportanceScores a = plain.score(modules);
    const rankwise::ImportanceScores b = cached.score(modules);
    REQUIRE(b.status == Status::Ok);
    CHECK(a.scores == b.scores);  // the same float operations on the same inputs: bit-identical
    CHECK(a.loss == b.loss);
    // Network scope caches M and the base model (2 full runs); module scope needs only M.
    CHECK(b.full_evaluations == (scope == AblationScope::Network ? 2 : 1));
    CHECK(b.partial_evaluations == 10);
  }
}

TEST_CASE("AblationImportance: gates, training modes and outputs are restored bit for bit", "[rank][importance]") {
  TwoLayerModel model;
  model.first.set_gate(2, 0.5);  // a non-trivial gate must come back as it was
  std::vector<RankModule<float>> modules = model.modules();
  const Matrix<float> before = outputs(model);
  long last_done = 0, last_total = 0, progress_calls = 0;
  AblationImportance<float> estimator([&] { return model.evaluate(); },
                                      {.progress = [&](long done, long total) {
                                        CHECK(done == last_done + 1);
                                        last_done = done;
                                        last_total = total;
                                        ++progress_calls;
                                      }});
  REQUIRE(model.first.is_training());
  bool eval_mode_seen = true;
  AblationImportance<float> checks_mode([&] {
    eval_mode_seen = eval_mode_seen && !model.first.is_training() && !model.second.is_training();
    return model.evaluate();
  });
  checks_mode.score(modules);
  CHECK(eval_mode_seen);
  estimator.score(modules);
  CHECK(progress_calls == 11);
  CHECK(last_total == 11);
  CHECK(model.first.gate(2) == 0.5);
  CHECK(model.first.gate(0) == 1.0);
  CHECK(model.first.is_training());
  CHECK(model.second.is_training());
  CHECK(outputs(model) == before);
}

TEST_CASE("AblationImportance: a NaN or a throwing validation leaves everything as it was", "[rank][importance][errors]") {
  TwoLayerModel model;
  std::vector<RankModule<float>> modules = model.modules();
  const Matrix<float> before = outputs(model);
  int call = 0;
  SECTION("NaN on the 4th evaluation: Status::NonFinite, no scores") {
    AblationImportance<float> estimator([&] {
      return ++call == 4 ? std::numeric_limits<double>::quiet_NaN() : model.evaluate();
    });
    const rankwise::ImportanceScores s = estimator.score(modules);
    CHECK(s.status == Status::NonFinite);
    CHECK(s.scores.empty());
    CHECK_THAT(s.message, Catch::Contains("[rankwise::AblationImportance]") && Catch::Contains("nan") &&
                              Catch::Contains("rank 2 of 'l0.fc'"));
  }
  SECTION("an exception on the 7th evaluation: rethrown as rankwise::Error, the original nested") {
    AblationImportance<float> estimator([&]() -> double {
      if (++call == 7) throw std::runtime_error("disk on fire");
      return model.evaluate();
    });
    CHECK_THROWS_WITH(estimator.score(modules), Catch::Contains("[rankwise::AblationImportance]") &&
                                                    Catch::Contains("threw") && Catch::Contains("only rank"));
    bool nested_found = false;
    call = 0;
    try {
      estimator.score(modules);
    } catch (const rankwise::Error& e) {
      try {
        std::rethrow_if_nested(e);
      } catch (const std::runtime_error& inner) {
        nested_found = std::string(inner.what()) == "disk on fire";
      }
    }
    CHECK(nested_found);
  }
  CHECK(model.first.rank() == 3);
  CHECK(model.second.rank() == 2);
  for (Index i = 0; i < 3; ++i) CHECK(model.first.gate(i) == 1.0);
  CHECK(model.first.is_training());
  CHECK(outputs(model) == before);
}

TEST_CASE("AblationImportance: over several validation batches, scores are means with standard errors",
          "[rank][importance]") {
  TwoLayerModel model;
  std::vector<RankModule<float>> modules = model.modules();
  // Three batches: the model's batch and two others; the callable says which one to evaluate.
  Random rng(11);
  const std::vector<Matrix<float>> inputs = {model.x, random_matrix<float>(5, 16, rng), random_matrix<float>(5, 16, rng)};
  std::vector<Index> seen;
  const auto on_batch = [&](Index b) {
    seen.push_back(b);
    model.x = inputs[static_cast<std::size_t>(b)];
    return model.evaluate();
  };
  AblationImportance<float> estimator(on_batch, 3, {.leave_one_out = false});
  CHECK(estimator.batches() == 3);
  const rankwise::ImportanceScores s = estimator.score(modules);
  REQUIRE(s.status == Status::Ok);
  CHECK(s.batches == 3);
  CHECK(s.full_evaluations == 3 * (2 * 5 + 1));  // every configuration on every batch
  CHECK(seen.size() == 33);
  // Each rank's score against the same score computed per batch by the one-batch estimator.
  std::vector<rankwise::ImportanceScores> per_batch;
  for (Index b = 0; b < 3; ++b) {
    model.x = inputs[static_cast<std::size_t>(b)];
    AblationImportance<float> one([&] { return model.evaluate(); });
    per_batch.push_back(one.score(modules));
    CHECK(per_batch.back().score_errors.empty());  // one batch: no standard errors
  }
  REQUIRE(s.score_errors.size() == 2);
  REQUIRE(s.drop_cost_errors.size() == 2);
  double loss = 0.0;
  for (const rankwise::ImportanceScores& b : per_batch) loss += b.loss / 3.0;
  CHECK(s.loss == Approx(loss).epsilon(1e-12));
  for (std::size_t m = 0; m < 2; ++m)
    for (std::size_t i = 0; i < s.scores[m].size(); ++i) {
      for (const auto& [value, error, field] :
           {std::tuple{s.scores[m][i], s.score_errors[m][i], &rankwise::ImportanceScores::scores},
            std::tuple{s.drop_costs[m][i], s.drop_cost_errors[m][i], &rankwise::ImportanceScores::drop_costs}}) {
        double mean = 0.0, ss = 0.0;
        for (const rankwise::ImportanceScores& b : per_batch) mean += (b.*field)[m][i] / 3.0;
        for (const rankwise::ImportanceScores& b : per_batch) ss += ((b.*field)[m][i] - mean) * ((b.*field)[m][i] - mean);
        CAPTURE(m, i);
        CHECK(value == Approx(mean).epsilon(1e-10).margin(1e-12));
        CHECK(error == Approx(std::sqrt(ss / 2.0 / 3.0)).epsilon(1e-10).margin(1e-12));
        CHECK(error > 0.0);  // different batches give different differences
      }
    }
  // A non-finite loss on one batch names the batch.
  AblationImportance<float> failing([&](Index b) { return b == 2 ? std::nan("") : on_batch(b); }, 3);
  const rankwise::ImportanceScores bad = failing.score(modules);
  CHECK(bad.status == Status::NonFinite);
  CHECK_THAT(bad.message, Catch::Contains("the network M on validation batch 2 is nan"));
  CHECK_THROWS_WITH(AblationImportance<float>(on_batch, 0), Catch::Contains("batches must be >= 1 (got 0)"));
  CHECK_THROWS_WITH(AblationImportance<float>(std::function<double(Index)>{}, 2), Catch::Contains("empty function"));
}

TEST_CASE("AblationImportance: invalid set-ups are rejected", "[rank][importance][errors]") {
  TwoLayerModel model;
  std::vector<RankModule<float>> modules = model.modules();
  CHECK_THROWS_WITH(AblationImportance<float>(std::function<double()>{}),
                    Catch::Contains("[rankwise::AblationImportance]") && Catch::Contains("empty function"));
  rankwise::StagedEvaluation staged = model.staged();
  staged.evaluate_from = nullptr;
  CHECK_THROWS_WITH(AblationImportance<float>(staged), Catch::Contains("capture and evaluate_from"));
  staged = model.staged();
  staged.module_stage = {0};
  AblationImportance<float> short_stages(staged);
  CHECK_THROWS_WITH(short_stages.score(modules), Catch::Contains("one entry per module = 2") && Catch::Contains("got 1"));
  staged.module_stage = {0, -1};
  CHECK_THROWS_WITH(AblationImportance<float>(staged), Catch::Contains(">= 0 (got -1)"));
  CHECK_THROWS_WITH(AblationImportance<float>([] { return 0.0; }, {.scope = static_cast<AblationScope>(9)}),
                    Catch::Contains("scope must be"));
  model.first.merge();
  AblationImportance<float> estimator([&] { return model.evaluate(); });
  CHECK_THROWS_AS(estimator.score(modules), rankwise::StateError);
  CHECK_THROWS_WITH(estimator.score(modules), Catch::Contains("'l0.fc' is merged"));
  CHECK(model.calls == 0);
}

TEST_CASE("SensitivityImportance: EMAs of |w g| and its uncertainty, averaged per rank", "[rank][importance]") {
  Random rng(3);
  LoRA<float> lora(Linear<float>(5, 4, rng), {.rank = 3}, rng);
  std::vector<RankModule<float>> modules{RankModule<float>(lora, "fc")};
  const double b1 = 0.8, b2 = 0.6;
  rankwise::SensitivityImportance<float> estimator({.beta1 = b1, .beta2 = b2});
  CHECK(estimator.needs_observations());
  CHECK_THROWS_AS(estimator.score(modules), rankwise::StateError);  // nothing observed yet
  lora.B_parameter().value = random_matrix<float>(4, 3, rng);
  // Reference EMAs in double, element by element.
  Matrix<double> ia = Matrix<double>::Zero(3, 5), ua = ia, ib = Matrix<double>::Zero(4, 3), ub = ib;
  for (int step = 0; step < 3; ++step) {
    lora.A_parameter().grad = random_matrix<float>(3, 5, rng);
    lora.B_parameter().grad = random_matrix<float>(4, 3, rng);
    estimator.observe(modules);
    const Matrix<double> cur_a =
        (lora.A().cast<double>().array() * lora.A_parameter().grad.cast<double>().array()).abs().matrix();
    const Matrix<double> cur_b =
        (lora.B().cast<double>().array() * lora.B_parameter().grad.cast<double>().array()).abs().matrix();
    ia = b1 * ia + (1 - b1) * cur_a;
    ua = (b2 * ua.array() + (1 - b2) * (cur_a - ia).array().abs()).matrix();
    ib = b1 * ib + (1 - b1) * cur_b;
    ub = (b2 * ub.array() + (1 - b2) * (cur_b - ib).array().abs()).matrix();
  }
  CHECK(estimator.observations() == 3);
  const rankwise::ImportanceScores s = estimator.score(modules);
  REQUIRE(s.status == Status::Ok);
  for (Index i = 0; i < 3; ++i) {
    const double expected =
        (ia.row(i).array() * ua.row(i).array()).mean() + (ib.col(i).array() * ub.col(i).array()).mean();
    CHECK(s.scores[0][static_cast<std::size_t>(i)] == Approx(expected).epsilon(1e-4));
  }
  // Surgery: the state follows like an optimizer's; fresh ranks start at zero.
  const Index gone[] = {1};
  estimator.follow(lora.remove_ranks(gone));
  estimator.follow(lora.add_ranks(1, rng));
  const rankwise::ImportanceScores after = estimator.score(modules);
  CHECK(after.scores[0][0] == s.scores[0][0]);
  CHECK(after.scores[0][1] == s.scores[0][2]);
  CHECK(after.scores[0][2] == 0.0);
  // Unfollowed surgery is caught instead of silently misaligning the scores.
  lora.add_ranks(1, rng);
  CHECK_THROWS_WITH(estimator.score(modules), Catch::Contains("call follow()"));
  CHECK_THROWS_WITH(rankwise::SensitivityImportance<float>({.beta1 = 1.0}), Catch::Contains("beta1 must be in [0, 1)"));
}

TEST_CASE("SensitivityImportance: a frozen factor adds nothing and needs no gradient", "[rank][importance]") {
  Random rng(5);
  LoRA<float> lora(Linear<float>(5, 4, rng), {.rank = 2}, rng);
  lora.B_parameter().value = random_matrix<float>(4, 2, rng);
  lora.A_parameter().trainable = false;  // A frozen, as in LoRA-FA
  lora.zero_grad();                      // a frozen parameter keeps no gradient storage
  std::vector<RankModule<float>> modules{RankModule<float>(lora, "fc")};
  rankwise::SensitivityImportance<float> estimator({.beta1 = 0.5, .beta2 = 0.5});
  lora.B_parameter().grad = random_matrix<float>(4, 2, rng);
  estimator.observe(modules);
  const rankwise::ImportanceScores s = estimator.score(modules);
  // One observation: Ibar = I / 2, Ubar = |I - I / 2| / 2 = I / 4, so the score is mean(I^2) / 8 over B's column.
  for (Index i = 0; i < 2; ++i) {
    const Matrix<double> cur =
        (lora.B().col(i).cast<double>().array() * lora.B_parameter().grad.col(i).cast<double>().array()).abs().matrix();
    CHECK(s.scores[0][static_cast<std::size_t>(i)] == Approx(cur.array().square().mean() / 8.0).epsilon(1e-5));
  }
}

TEST_CASE("MagnitudeImportance: |s| ||B[:, i]|| ||A[i, :]|| per rank", "[rank][importance]") {
  Random rng(4);
  LoRA<double> lora(Linear<double>(6, 5, rng), {.rank = 3, .alpha = 12.0}, rng);
  lora.B_parameter().value = random_matrix<double>(5, 3, rng);
  std::vector<RankModule<double>> modules{RankModule<double>(lora, "fc")};
  rankwise::MagnitudeImportance<double> estimator;
  const rankwise::ImportanceScores s = estimator.score(modules);
  for (Index i = 0; i < 3; ++i) {
    // The Frobenius norm of the rank's term s B[:, i] A[i, :] of delta W.
    const Matrix<double> term = lora.scale() * lora.B().col(i) * lora.A().row(i);
    CHECK(s.scores[0][static_cast<std::size_t>(i)] == Approx(term.norm()).epsilon(1e-12));
  }
  lora.set_gate(1, 0.0);
  CHECK(estimator.score(modules).scores[0][1] == 0.0);
}

TEST_CASE("FisherImportance: d_i = g_i dL/dg_i from either factor, scored as the bias-corrected EMA(d_i^2) / 2",
          "[rank][importance]") {
  Random rng(8);
  LoRA<double> lora(Linear<double>(6, 5, rng), {.rank = 3, .alpha = 6.0}, rng);
  lora.B_parameter().value = random_matrix<double>(5, 3, rng);
  lora.set_gate(2, 0.7);  // d_i carries the gate: it is what setting the gate to 0 moves, to first order
  std::vector<RankModule<double>> modules{RankModule<double>(lora, "fc")};
  const double beta = 0.6;
  rankwise::FisherImportance<double> estimator({.beta = beta});
  CHECK(estimator.needs_observations());
  CHECK_THROWS_AS(estimator.score(modules), rankwise::StateError);  // nothing observed yet
  const auto loss_at = [&](const Matrix<double>& x, const Matrix<double>& t) {
    Matrix<double> y;
    lora.forward(x, y);
    return 0.5 * (y - t).squaredNorm();
  };
  std::vector<double> ema(3, 0.0);
  for (int step = 1; step <= 4; ++step) {
    const Matrix<double> x = random_matrix<double>(6, 7, rng), t = random_matrix<double>(5, 7, rng);
    lora.zero_grad();
    Matrix<double> y, dx;
    lora.forward(x, y);
    lora.backward(y - t, dx);
    estimator.observe(modules);
    for (Index i = 0; i < 3; ++i) {
      // Independent: g dL/dg by central differences on the gate, and the same sum over B's column.
      const double g = lora.gate(i), h = 1e-6;
      lora.set_gate(i, g + h);
      const double up = loss_at(x, t);
      lora.set_gate(i, g - h);
      const double down = loss_at(x, t);
      lora.set_gate(i, g);
      const double d = g * (up - down) / (2 * h);
      const double from_a = lora.A().row(i).dot(lora.A_parameter().grad.row(i));
      const double from_b = lora.B().col(i).dot(lora.B_parameter().grad.col(i));
      CHECK(from_a == Approx(d).epsilon(1e-6));
      CHECK(from_b == Approx(d).epsilon(1e-6));
      ema[static_cast<std::size_t>(i)] = beta * ema[static_cast<std::size_t>(i)] + (1 - beta) * d * d;
    }
    const rankwise::ImportanceScores s = estimator.score(modules);
    REQUIRE(s.status == Status::Ok);
    for (std::size_t i = 0; i < 3; ++i)
      CHECK(s.scores[0][i] == Approx(0.5 * ema[i] / (1 - std::pow(beta, step))).epsilon(1e-6));
  }
  CHECK(estimator.observations() == 4);
  // Surgery: kept ranks keep their history; a fresh rank has none and scores 0 until observed, then is
  // corrected for its own (shorter) history.
  const rankwise::ImportanceScores before = estimator.score(modules);
  const Index gone[] = {0};
  estimator.follow(lora.remove_ranks(gone));
  estimator.follow(lora.add_ranks(1, rng));
  const rankwise::ImportanceScores after = estimator.score(modules);
  CHECK(after.scores[0][0] == before.scores[0][1]);
  CHECK(after.scores[0][1] == before.scores[0][2]);
  CHECK(after.scores[0][2] == 0.0);
  lora.B_parameter().value.col(2).setConstant(0.3);
  lora.zero_grad();
  {
    const Matrix<double> x = random_matrix<double>(6, 7, rng), t = random_matrix<double>(5, 7, rng);
    Matrix<double> y, dx;
    lora.forward(x, y);
    lora.backward(y - t, dx);
  }
  estimator.observe(modules);
  const double d = lora.A().row(2).dot(lora.A_parameter().grad.row(2));
  CHECK(estimator.score(modules).scores[0][2] == Approx(0.5 * d * d).epsilon(1e-9));  // (1 - beta) d^2 / (1 - beta)
  // Unfollowed surgery is caught; an invalid beta is refused.
  lora.add_ranks(1, rng);
  CHECK_THROWS_WITH(estimator.observe(modules), Catch::Contains("call follow()"));
  CHECK_THROWS_WITH(rankwise::FisherImportance<float>({.beta = 1.0}), Catch::Contains("beta must be in [0, 1)"));
  CHECK_THROWS_WITH(rankwise::FisherImportance<float>({.beta = -0.1}), Catch::Contains("beta must be in [0, 1)"));
}

TEST_CASE("SensitivityImportance: SliceReduction::Sum adds a slice's weights instead of averaging them",
          "[rank][importance]") {
  Random rng(6);
  LoRA<float> lora(Linear<float>(7, 4, rng), {.rank = 2}, rng);
  lora.B_parameter().value = random_matrix<float>(4, 2, rng);
  std::vector<RankModule<float>> modules{RankModule<float>(lora, "fc")};
  rankwise::SensitivityImportance<float> mean({.beta1 = 0.5, .beta2 = 0.5});
  rankwise::SensitivityImportance<float> sum({.beta1 = 0.5, .beta2 = 0.5, .reduction = rankwise::SliceReduction::Sum});
  lora.A_parameter().grad = random_matrix<float>(2, 7, rng);
  lora.B_parameter().grad = random_matrix<float>(4, 2, rng);
  mean.observe(modules);
  sum.observe(modules);
  const rankwise::ImportanceScores m = mean.score(modules), s = sum.score(modules);
  for (Index i = 0; i < 2; ++i) {
    // One observation: Ibar = I / 2 and Ubar = I / 4 per weight, so each weight contributes I^2 / 8.
    const auto ia = (lora.A().row(i).cast<double>().array() * lora.A_parameter().grad.row(i).cast<double>().array());
    const auto ib = (lora.B().col(i).cast<double>().array() * lora.B_parameter().grad.col(i).cast<double>().array());
    const double a2 = ia.square().sum() / 8.0, b2 = ib.square().sum() / 8.0;
    CHECK(s.scores[0][static_cast<std::size_t>(i)] == Approx(a2 + b2).epsilon(1e-5));          // 7 + 4 weights
    CHECK(m.scores[0][static_cast<std::size_t>(i)] == Approx(a2 / 7.0 + b2 / 4.0).epsilon(1e-5));  // per-slice means
  }
}
