// Tests for rankwise/adapters/bora.hpp and io/peft_bora.hpp: the routed forward and backward against a
// column-by-column reference, finite differences of the data and prior terms in double, both forward
// modes and both priors, threads, one task as a plain LoRA and as a PEFT directory, and bad input.
#include <rankwise/adapters/bora.hpp>
#include <rankwise/core/parallel.hpp>
#include <rankwise/io/checkpoint.hpp>
#include <rankwise/io/peft_bora.hpp>
#include <rankwise/io/state.hpp>
#include <rankwise/models/bora_host.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/matchers.hpp"
#include "support/temp_dir.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

using rankwise::BoRA;
using rankwise::BoRAForward;
using rankwise::BoRAOptions;
using rankwise::BoRAPrior;
using rankwise::Index;
using rankwise::Linear;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::TaskRouting;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

namespace {
// Columns of three tasks, not contiguous and not in order: runs 0 0 | 2 | 1 1 1 | 0 | 2 2 | 1.
const std::vector<std::int32_t> kMixedTasks = {0, 0, 2, 1, 1, 1, 0, 2, 2, 1};

// Every factor random (B_Θ = 0 and θ_d ≈ Θ at init would hide bugs in the gradients).
void randomize_bora(BoRA<double>& bora, Random& rng) {
  bora.global_A_parameter().value = random_matrix<double>(bora.rank(), bora.in_features(), rng);
  bora.global_B_parameter().value = random_matrix<double>(bora.out_features(), bora.rank(), rng);
  for (Index d = 0; d < bora.tasks(); ++d) {
    bora.A_parameter(d).value = random_matrix<double>(bora.rank(), bora.in_features(), rng);
    bora.B_parameter(d).value = random_matrix<double>(bora.out_features(), bora.rank(), rng);
  }
}

BoRA<double> make_bora(BoRAForward forward, BoRAPrior prior, Random& rng, Index in = 6, Index out = 5) {
  BoRA<double> bora(Linear<double>(in, out, rng), {.tasks = 3, .rank = 2, .alpha = 3.0, .tau = 0.7, .prior = prior,
                                                   .forward = forward},
                    rng);
  randomize_bora(bora, rng);
  return bora;
}

// The largest difference between the prior's gradient (add_prior_gradient, from zero) and central
// differences of prior_penalty(), over every trainable value.
double prior_gradient_error(BoRA<double>& bora) {
  bora.zero_grad();
  bora.add_prior_gradient();
  const double h = 1e-6;
  double worst = 0.0;
  for (auto* p : bora.parameters()) {
    if (!p->trainable) continue;
    for (Index i = 0; i < p->value.size(); ++i) {
      double& slot = p->value.data()[i];
      const double saved = slot;
      slot = saved + h;
      const double plus = bora.prior_penalty();
      slot = saved - h;
      const double minus = bora.prior_penalty();
      slot = saved;
      worst = std::max(worst, std::abs((plus - minus) / (2 * h) - p->grad.data()[i]));
    }
  }
  return worst;
}

// The delta one column sees, formed densely: s B_d A_d (Joined: + s B_Θ A_Θ).
Matrix<double> column_delta(const BoRA<double>& bora, Index task) {
  Matrix<double> delta = bora.scale() * (bora.B(task) * bora.A(task));
  if (bora.options().forward == BoRAForward::Joined) delta += bora.scale() * (bora.global_B() * bora.global_A());
  return delta;
}
}  // namespace

TEST_CASE("BoRA: the routed forward and backward equal a column-by-column reference, in both modes",
          "[adapters][bora]") {
  for (BoRAForward mode : {BoRAForward::Task, BoRAForward::Joined}) {
    INFO("mode " << (mode == BoRAForward::Task ? "Task" : "Joined"));
    Random rng(31);
    BoRA<double> bora = make_bora(mode, BoRAPrior::Squared, rng);
    const TaskRouting routing(kMixedTasks, 3);
    REQUIRE(routing.runs().size() == 6);
    CHECK(routing.columns_of(1) == 4);
    bora.set_routing(routing);
    const Index n = Index(kMixedTasks.size());
    const Matrix<double> x = random_matrix<double>(6, n, rng), dy = random_matrix<double>(5, n, rng);
    Matrix<double> y, dx;
    bora.zero_grad();
    bora.forward(x, y);
    bora.backward(dy, dx);
    const Matrix<double>& W = bora.base().weight();
    const double s = bora.scale();
    std::vector<Matrix<double>> dA(3, Matrix<double>::Zero(2, 6)), dB(3, Matrix<double>::Zero(5, 2));
    Matrix<double> dA_global = Matrix<double>::Zero(2, 6), dB_global = Matrix<double>::Zero(5, 2);
    for (Index j = 0; j < n; ++j) {
      const Index d = kMixedTasks[std::size_t(j)];
      const Matrix<double> expected_y = W * x.col(j) + bora.base().bias() + column_delta(bora, d) * x.col(j);
      CHECK_THAT(Matrix<double>(y.col(j)), is_close_to(expected_y, 1e-13, 1e-13));
      const Matrix<double> expected_dx = (W + column_delta(bora, d)).transpose() * dy.col(j);
      CHECK_THAT(Matrix<double>(dx.col(j)), is_close_to(expected_dx, 1e-13, 1e-13));
      dB[std::size_t(d)] += s * dy.col(j) * (bora.A(d) * x.col(j)).transpose();
      dA[std::size_t(d)] += s * (bora.B(d).transpose() * dy.col(j)) * x.col(j).transpose();
      dB_global += s * dy.col(j) * (bora.global_A() * x.col(j)).transpose();
      dA_global += s * (bora.global_B().transpose() * dy.col(j)) * x.col(j).transpose();
    }
    for (Index d = 0; d < 3; ++d) {
      CHECK_THAT(bora.A_parameter(d).grad, is_close_to(dA[std::size_t(d)], 1e-12, 1e-12));
      CHECK_THAT(bora.B_parameter(d).grad, is_close_to(dB[std::size_t(d)], 1e-12, 1e-12));
    }
    if (mode == BoRAForward::Joined) {  // Θ learns from every task's columns
      CHECK_THAT(bora.global_A_parameter().grad, is_close_to(dA_global, 1e-12, 1e-12));
      CHECK_THAT(bora.global_B_parameter().grad, is_close_to(dB_global, 1e-12, 1e-12));
    } else {  // Θ sees no data, only the prior
      CHECK(bora.global_A_parameter().grad.isZero(0.0));
      CHECK(bora.global_B_parameter().grad.isZero(0.0));
    }
  }
}

TEST_CASE("BoRA: data gradients match finite differences in double (both modes)", "[adapters][bora][gradcheck]") {
  for (BoRAForward mode : {BoRAForward::Task, BoRAForward::Joined}) {
    Random rng(32);
    BoRA<double> bora = make_bora(mode, BoRAPrior::Squared, rng);
    bora.set_routing(TaskRouting(kMixedTasks, 3));
    const Matrix<double> x = random_matrix<double>(6, Index(kMixedTasks.size()), rng);
    const auto result = rankwise::testing::check_gradients(bora, x, rng);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
    CHECK(result.checked_values > 0);
  }
}

TEST_CASE("BoRA: the prior's gradient matches finite differences of its value, for both priors and modes",
          "[adapters][bora][gradcheck]") {
  for (BoRAForward mode : {BoRAForward::Task, BoRAForward::Joined})
    for (BoRAPrior prior : {BoRAPrior::Squared, BoRAPrior::Unsquared}) {
      INFO("mode " << int(mode) << ", prior " << int(prior));
      Random rng(33);
      BoRA<double> bora = make_bora(mode, prior, rng);
      bora.zero_grad();
      const double value = bora.add_prior_gradient();
      CHECK(value == Approx(bora.prior_penalty()).epsilon(1e-15));
      CHECK(value > 0.0);
      CHECK(prior_gradient_error(bora) < 1e-7);
      if (mode == BoRAForward::Joined) CHECK(bora.global_A_parameter().grad.isZero(0.0));
    }
}

TEST_CASE("BoRA: tau = 0 leaves the tasks independent, and the prior pulls each task toward the mean",
          "[adapters][bora]") {
  Random rng(34);
  BoRA<double> bora = make_bora(BoRAForward::Task, BoRAPrior::Squared, rng);
  bora.set_tau(0.0);
  bora.zero_grad();
  CHECK(bora.add_prior_gradient() == 0.0);
  for (auto* p : bora.parameters())
    if (p->trainable) CHECK(p->grad.isZero(0.0));
  // A task with no column in the batch gets no data gradient.
  bora.set_routing(TaskRouting(std::vector<std::int32_t>{0, 0, 2, 2}, 3));
  Matrix<double> y, dx;
  bora.forward(random_matrix<double>(6, 4, rng), y);
  bora.backward(random_matrix<double>(5, 4, rng), dx);
  CHECK(bora.A_parameter(1).grad.isZero(0.0));
  CHECK(bora.B_parameter(1).grad.isZero(0.0));
  CHECK_FALSE(bora.A_parameter(0).grad.isZero(0.0));
  // Θ at the mean of the tasks makes the squared prior's gradient of Θ zero.
  bora.set_tau(2.0);
  bora.set_global_to_mean();
  bora.zero_grad();
  bora.add_prior_gradient();
  CHECK(bora.global_A_parameter().grad.norm() < 1e-12);
  CHECK(bora.global_B_parameter().grad.norm() < 1e-12);
  CHECK(bora.distance_from_global(0) > 0.0);
}

TEST_CASE("BoRA: initialisation is Θ like a LoRA plus seeded noise per task, and deterministic", "[adapters][bora]") {
  Random rng(35), again(35);
  const BoRAOptions options{.tasks = 4, .rank = 3, .alpha = 6.0, .tau = 1.0, .init_noise = 1e-3};
  BoRA<double> a(Linear<double>(8, 7, rng), options, rng), b(Linear<double>(8, 7, again), options, again);
  CHECK(a.global_B().isZero(0.0));
  CHECK_FALSE(a.global_A().isZero(0.0));
  for (Index d = 0; d < 4; ++d) {
    CHECK(a.A(d) == b.A(d));
    const double distance = a.distance_from_global(d);
    CHECK(distance > 0.0);
    CHECK(distance < 1e-3 * std::sqrt(3.0 * 15.0) * 3.0);  // about the sd times the root of the count
  }
  CHECK(a.A(0) != a.A(1));
  CHECK(a.trainable_parameter_count() == 5 * 3 * (8 + 7));
  a.set_path("layers.0.q");
  CHECK(a.A_parameter(2).name == "layers.0.q.bora_task.2.lora_A.weight");
  CHECK(a.global_B_parameter().name == "layers.0.q.bora_global.lora_B.weight");
}

TEST_CASE("BoRA: one task's adapter is a plain LoRA computing the same outputs (both modes)", "[adapters][bora]") {
  for (BoRAForward mode : {BoRAForward::Task, BoRAForward::Joined}) {
    Random rng(36);
    BoRA<double> bora = make_bora(mode, BoRAPrior::Squared, rng);
    const Matrix<double> x = random_matrix<double>(6, 5, rng);
    for (Index d = 0; d < 3; ++d) {
      bora.set_routing(TaskRouting::uniform(5, d, 3));
      Matrix<double> y_bora, y_lora;
      bora.forward(x, y_bora);
      const auto [A, B] = bora.task_factors_as_lora(d);
      rankwise::LoRA<double> lora(bora.base(), {.rank = 2, .alpha = 3.0}, rng);
      lora.assign_factors(A, B);
      lora.set_scale(bora.scale());
      lora.forward(x, y_lora);
      CHECK_THAT(y_lora, is_close_to(y_bora, 1e-13, 1e-13));
      CHECK(A.rows() == (mode == BoRAForward::Task ? 2 : 4));
    }
  }
}

TEST_CASE("BoRA on 2 threads: bit for bit repeatable and equal to 1 thread up to rounding", "[adapters][bora][parallel]") {
  struct Guard {
    ~Guard() { rankwise::set_num_threads(1); }
  } guard;
  Random rng(37);
  BoRA<double> bora = make_bora(BoRAForward::Joined, BoRAPrior::Squared, rng, 64, 64);
  std::vector<std::int32_t> ids(300);
  for (std::size_t j = 0; j < ids.size(); ++j) ids[j] = std::int32_t((j / 7 + j / 50) % 3);
  bora.set_routing(TaskRouting(ids, 3));
  const Matrix<double> x = random_matrix<double>(64, 300, rng), dy = random_matrix<double>(64, 300, rng);
  const auto step = [&] {
    bora.zero_grad();
    Matrix<double> y, dx;
    bora.forward(x, y);
    bora.backward(dy, dx);
    std::vector<Matrix<double>> out = {y, dx};
    for (auto* p : bora.parameters())
      if (p->trainable) out.push_back(p->grad);
    return out;
  };
  const auto one = step();
  rankwise::set_num_threads(2);
  REQUIRE(rankwise::detail::parts_for(300) == 2);
  const auto two = step(), again = step();
  for (std::size_t i = 0; i < one.size(); ++i) {
    CHECK(rankwise::test_support::same_bits(two[i], again[i]));
    CHECK_THAT(two[i], is_close_to(one[i], 1e-12, 1e-12));
  }
}

TEST_CASE("BoRA: the paper's learning-rate rule scales with tau", "[adapters][bora]") {
  CHECK(rankwise::bora_paper_learning_rate(0.0) == 1e-4);
  CHECK(rankwise::bora_paper_learning_rate(100.0) == Approx(1e-3).epsilon(1e-15));
  CHECK(rankwise::bora_paper_learning_rate(10.0, 2e-5, 3e-4) == Approx(2e-4).epsilon(1e-15));
  CHECK_THROWS_WITH(rankwise::bora_paper_learning_rate(-1.0), Catch::Contains("tau must be a finite number >= 0 (got -1)"));
  CHECK_THROWS_WITH(rankwise::bora_paper_learning_rate(1.0, 0.0), Catch::Contains("must be finite numbers > 0"));
}

TEST_CASE("BoRA: bad input is refused with a clear error and changes nothing", "[adapters][bora][errors]") {
  Random rng(38);
  CHECK_THROWS_WITH(TaskRouting(std::vector<std::int32_t>{0, 3, 1}, 3),
                    Catch::Contains("task ids must be in [0, 3) (got 3 for column 1)"));
  CHECK_THROWS_WITH(TaskRouting(std::vector<std::int32_t>{0, -1}, 3), Catch::Contains("(got -1 for column 1)"));
  CHECK_THROWS_WITH(TaskRouting(std::vector<std::int32_t>{0}, 0), Catch::Contains("must be >= 1 (got 0)"));
  CHECK_THROWS_WITH(BoRA<double>(Linear<double>(4, 4, rng), {.tasks = 0}, rng), Catch::Contains("tasks must be >= 1"));
  CHECK_THROWS_WITH(BoRA<double>(Linear<double>(4, 4, rng), {.rank = 2, .tau = -1.0}, rng),
                    Catch::Contains("tau must be a finite number >= 0 (got -1)"));
  CHECK_THROWS_WITH(BoRA<double>(Linear<double>(4, 4, rng), {.rank = 2, .tau = std::nan("")}, rng),
                    Catch::Contains("tau must be a finite number >= 0"));
  CHECK_THROWS_WITH(BoRA<double>(Linear<double>(4, 4, rng), {.rank = 2, .init_noise = -1.0}, rng),
                    Catch::Contains("init_noise must be a finite number >= 0"));
  BoRA<double> bora = make_bora(BoRAForward::Task, BoRAPrior::Squared, rng);
  CHECK_THROWS_WITH(bora.set_tau(-0.5), Catch::Contains("[rankwise::BoRA::set_tau] tau must be"));
  CHECK(bora.tau() == 0.7);
  CHECK_THROWS_WITH(bora.set_routing(TaskRouting(std::vector<std::int32_t>{0, 1}, 2)),
                    Catch::Contains("the routing is for 2 tasks, the layer has 3"));
  CHECK_THROWS_WITH(bora.A(3), Catch::Contains("task must be in [0, 3) (got 3)"));
  Matrix<double> y, dx;
  const Matrix<double> x = random_matrix<double>(6, 4, rng);
  CHECK_THROWS_WITH(bora.forward(x, y), Catch::Contains("the routing covers 0 columns, the batch has 4"));
  bora.set_routing(TaskRouting::uniform(4, 1, 3));
  bora.forward(x, y);
  bora.set_routing(TaskRouting::uniform(4, 2, 3));  // a new batch's routing before this batch's backward
  CHECK_THROWS_AS(bora.backward(random_matrix<double>(5, 4, rng), dx), rankwise::StateError);
  BoRA<double> joined = make_bora(BoRAForward::Joined, BoRAPrior::Squared, rng);
  const Matrix<double> before = joined.global_A();
  CHECK_THROWS_AS(joined.set_global_to_mean(), rankwise::StateError);
  CHECK(joined.global_A() == before);
}

TEST_CASE("BoRA: every task saves as a PEFT LoRA directory that computes the task's outputs (both modes)",
          "[adapters][bora][io][peft]") {
  for (BoRAForward mode : {BoRAForward::Task, BoRAForward::Joined}) {
    INFO("mode " << int(mode));
    Random rng(39);
    BoRA<double> q = make_bora(mode, BoRAPrior::Squared, rng), v = make_bora(mode, BoRAPrior::Squared, rng);
    rankwise::test_support::TempDir dir("bora_peft");
    // F64 files, so that the comparison is exact (the default F32 rounds every factor once).
    const auto configs = rankwise::save_peft_bora<double, Linear<double>>(dir.path, {{"layers.0.q", &q}, {"layers.0.v", &v}},
                                                                          {.dtype = rankwise::DType::F64});
    REQUIRE(configs.size() == 4);  // the global adapter and 3 tasks
    const Matrix<double> x = random_matrix<double>(6, 4, rng);
    for (Index task = -1; task < 3; ++task) {
      INFO("task " << task);
      const auto adapter = rankwise::read_peft_lora<double>(rankwise::peft_bora_directory(dir.path, task));
      REQUIRE(adapter.modules.size() == 2);
      for (BoRA<double>* layer : {&q, &v}) {
        const auto& module = adapter.modules[layer == &q ? 0 : 1];
        CHECK(module.path == (layer == &q ? "layers.0.q" : "layers.0.v"));
        // What the file computes, against what the task computes in the BoRA layer.
        Matrix<double> expected;
        if (task >= 0) {
          layer->set_routing(TaskRouting::uniform(4, task, 3));
          layer->forward(x, expected);
        } else {
          expected = layer->base().weight() * x + layer->scale() * layer->global_B() * (layer->global_A() * x);
          expected.colwise() += layer->base().bias().col(0);
        }
        Matrix<double> from_file = layer->base().weight() * x + module.factors.delta_weight() * x;
        from_file.colwise() += layer->base().bias().col(0);
        CHECK_THAT(from_file, is_close_to(expected, 1e-12, 1e-12));
      }
    }
  }
  Random rng(40);
  BoRA<double> three = make_bora(BoRAForward::Task, BoRAPrior::Squared, rng);
  BoRA<double> two(Linear<double>(6, 5, rng), {.tasks = 2, .rank = 2}, rng);
  rankwise::test_support::TempDir dir("bora_peft_bad");
  CHECK_THROWS_WITH((rankwise::save_peft_bora<double, Linear<double>>(dir.path / "out", {{"a", &three}, {"b", &two}})),
                    Catch::Contains("every module must have the same number of tasks (module 'a' has 3, module 'b' has 2)"));
  CHECK_FALSE(std::filesystem::exists(dir.path / "out"));
}

TEST_CASE("BoRA: a checkpoint restores every factor and tau bit for bit, and refuses another task count",
          "[adapters][bora][io][checkpoint]") {
  Random rng(41);
  BoRA<double> q = make_bora(BoRAForward::Joined, BoRAPrior::Unsquared, rng);
  q.set_tau(3.5);
  rankwise::test_support::TempDir dir("bora_checkpoint");
  rankwise::CheckpointWriter writer;
  writer.add("adapters", std::vector<rankwise::NamedAdapter<BoRA<double>>>{{"q", &q}});
  writer.write(dir.path);

  const BoRAOptions options{.tasks = 3, .rank = 2, .alpha = 3.0, .tau = 0.7, .prior = BoRAPrior::Unsquared,
                            .forward = BoRAForward::Joined};
  Random other(99);
  BoRA<double> restored(Linear<double>(q.base()), options, other);
  rankwise::CheckpointReader reader(dir.path);
  reader.restore("adapters", std::vector<rankwise::NamedAdapter<BoRA<double>>>{{"q", &restored}});
  CHECK(restored.tau() == 3.5);
  CHECK(rankwise::test_support::same_bits(restored.global_A(), q.global_A()));
  CHECK(rankwise::test_support::same_bits(restored.global_B(), q.global_B()));
  for (Index d = 0; d < 3; ++d) {
    CHECK(rankwise::test_support::same_bits(restored.A(d), q.A(d)));
    CHECK(rankwise::test_support::same_bits(restored.B(d), q.B(d)));
  }
  // The same step from the same state: the same numbers.
  const Matrix<double> x = random_matrix<double>(6, 10, rng), dy = random_matrix<double>(5, 10, rng);
  Matrix<double> y1, y2, dx1, dx2;
  for (BoRA<double>* layer : {&q, &restored}) {
    layer->set_routing(TaskRouting(kMixedTasks, 3));
    layer->zero_grad();
  }
  q.forward(x, y1);
  q.backward(dy, dx1);
  restored.forward(x, y2);
  restored.backward(dy, dx2);
  CHECK(rankwise::test_support::same_bits(y1, y2));
  CHECK(rankwise::test_support::same_bits(q.A_parameter(2).grad, restored.A_parameter(2).grad));
  CHECK(q.add_prior_gradient() == restored.add_prior_gradient());

  // A model with another number of tasks, or another prior, is refused and keeps its factors.
  BoRA<double> two(Linear<double>(q.base()), {.tasks = 2, .rank = 2, .alpha = 3.0, .prior = BoRAPrior::Unsquared,
                                               .forward = BoRAForward::Joined}, other);
  const Matrix<double> before = two.A(1);
  CHECK_THROWS_WITH(reader.restore("adapters", std::vector<rankwise::NamedAdapter<BoRA<double>>>{{"q", &two}}),
                    Catch::Contains("was saved with 3 tasks but the model's BoRA has 2"));
  CHECK(rankwise::test_support::same_bits(two.A(1), before));
  BoRA<double> squared(Linear<double>(q.base()), {.tasks = 3, .rank = 2, .alpha = 3.0, .forward = BoRAForward::Joined}, other);
  CHECK_THROWS_WITH(reader.restore("adapters", std::vector<rankwise::NamedAdapter<BoRA<double>>>{{"q", &squared}}),
                    Catch::Contains("was saved with the unsquared prior and the joined forward but the model's BoRA has squared and joined"));
  // assign_factors checks before it changes anything.
  CHECK_THROWS_WITH(squared.assign_factors({{Matrix<double>::Zero(2, 6), Matrix<double>::Zero(5, 2)}}),
                    Catch::Contains("need 4 pairs"));
}

TEST_CASE("BoRA with offsets: the same model and objective as the paper's parametrization, Θ gets every task's "
          "gradient, and checkpoints say which they hold",
          "[adapters][bora][gradcheck]") {
  using rankwise::BoRAParametrization;
  Random rng(42);
  BoRA<double> direct = make_bora(BoRAForward::Task, BoRAPrior::Squared, rng);
  BoRA<double> offsets(Linear<double>(direct.base()), {.tasks = 3, .rank = 2, .alpha = 3.0, .tau = 0.7,
                                                        .parametrization = BoRAParametrization::Offsets},
                       rng);
  // The same θ_d: δ_d = θ_d − Θ.
  offsets.global_A_parameter().value = direct.global_A();
  offsets.global_B_parameter().value = direct.global_B();
  for (Index d = 0; d < 3; ++d) {
    offsets.A_parameter(d).value = direct.A(d) - direct.global_A();
    offsets.B_parameter(d).value = direct.B(d) - direct.global_B();
    CHECK_THAT(offsets.task_factors_as_lora(d).first, is_close_to(direct.A(d), 1e-15, 1e-15));
    CHECK(offsets.distance_from_global(d) == Approx(direct.distance_from_global(d)).epsilon(1e-14));
  }
  CHECK(offsets.prior_penalty() == Approx(direct.prior_penalty()).epsilon(1e-14));
  const Index n = Index(kMixedTasks.size());
  const Matrix<double> x = random_matrix<double>(6, n, rng), dy = random_matrix<double>(5, n, rng);
  Matrix<double> y1, y2, dx1, dx2;
  for (BoRA<double>* layer : {&direct, &offsets}) {
    layer->set_routing(TaskRouting(kMixedTasks, 3));
    layer->zero_grad();
  }
  direct.forward(x, y1);
  direct.backward(dy, dx1);
  offsets.forward(x, y2);
  offsets.backward(dy, dx2);
  CHECK_THAT(y2, is_close_to(y1, 1e-13, 1e-13));
  CHECK_THAT(dx2, is_close_to(dx1, 1e-13, 1e-13));
  // The data's gradient of δ_d is θ_d's; Θ's is the sum of every task's (in the paper's form, zero).
  Matrix<double> sum_A = Matrix<double>::Zero(2, 6), sum_B = Matrix<double>::Zero(5, 2);
  for (Index d = 0; d < 3; ++d) {
    CHECK_THAT(offsets.A_parameter(d).grad, is_close_to(direct.A_parameter(d).grad, 1e-12, 1e-12));
    CHECK_THAT(offsets.B_parameter(d).grad, is_close_to(direct.B_parameter(d).grad, 1e-12, 1e-12));
    sum_A += direct.A_parameter(d).grad;
    sum_B += direct.B_parameter(d).grad;
  }
  CHECK(direct.global_A_parameter().grad.isZero(0.0));
  CHECK_THAT(offsets.global_A_parameter().grad, is_close_to(sum_A, 1e-12, 1e-12));
  CHECK_THAT(offsets.global_B_parameter().grad, is_close_to(sum_B, 1e-12, 1e-12));

  // Finite differences in double: the data terms, and the prior (on the offsets alone), both priors.
  {
    const auto result = rankwise::testing::check_gradients(offsets, x, rng);
    INFO(result.worst);
    CHECK(result.max_error < 1e-7);
  }
  for (BoRAPrior prior : {BoRAPrior::Squared, BoRAPrior::Unsquared}) {
    BoRA<double> p(Linear<double>(direct.base()), {.tasks = 3, .rank = 2, .alpha = 3.0, .tau = 0.7, .prior = prior,
                                                    .parametrization = BoRAParametrization::Offsets},
                   rng);
    randomize_bora(p, rng);
    p.zero_grad();
    CHECK(p.add_prior_gradient() == Approx(p.prior_penalty()).epsilon(1e-15));
    CHECK(prior_gradient_error(p) < 1e-7);
    CHECK(p.global_A_parameter().grad.isZero(0.0));  // the prior does not touch Θ
  }

  // The seeded init draws the same θ_d as the paper's form.
  Random r1(7), r2(7);
  BoRA<double> a(Linear<double>(direct.base()), {.tasks = 2, .rank = 2}, r1);
  BoRA<double> b(Linear<double>(direct.base()), {.tasks = 2, .rank = 2, .parametrization = BoRAParametrization::Offsets}, r2);
  for (Index d = 0; d < 2; ++d) CHECK(rankwise::test_support::same_bits(b.task_factors_as_lora(d).first, a.A(d)));

  // set_global_to_mean keeps every task's factors and moves the offsets' mean into Θ.
  const Matrix<double> before = offsets.task_factors_as_lora(1).second;
  offsets.set_global_to_mean();
  CHECK_THAT(offsets.task_factors_as_lora(1).second, is_close_to(before, 1e-14, 1e-14));
  CHECK((offsets.A(0) + offsets.A(1) + offsets.A(2)).norm() < 1e-13);

  // Offsets with the Joined forward is refused; a checkpoint of the other parametrization too.
  CHECK_THROWS_WITH(BoRA<double>(Linear<double>(4, 4, rng), {.rank = 2, .forward = BoRAForward::Joined,
                                                              .parametrization = BoRAParametrization::Offsets},
                                 rng),
                    Catch::Contains("parametrization Offsets applies to forward Task"));
  rankwise::test_support::TempDir dir("bora_offsets_checkpoint");
  rankwise::CheckpointWriter writer;
  writer.add("adapters", std::vector<rankwise::NamedAdapter<BoRA<double>>>{{"q", &offsets}});
  writer.write(dir.path);
  rankwise::CheckpointReader reader(dir.path);
  const Matrix<double> kept = direct.A(0);
  CHECK_THROWS_WITH(reader.restore("adapters", std::vector<rankwise::NamedAdapter<BoRA<double>>>{{"q", &direct}}),
                    Catch::Contains("stores its task adapters as 'offsets' but the model's BoRA stores them as 'direct'"));
  CHECK(rankwise::test_support::same_bits(direct.A(0), kept));
  BoRA<double> back(Linear<double>(direct.base()), {.tasks = 3, .rank = 2, .alpha = 3.0,
                                                     .parametrization = BoRAParametrization::Offsets},
                    rng);
  reader.restore("adapters", std::vector<rankwise::NamedAdapter<BoRA<double>>>{{"q", &back}});
  for (Index d = 0; d < 3; ++d) CHECK(rankwise::test_support::same_bits(back.A(d), offsets.A(d)));
}

TEST_CASE("BoRA in a model: inject_bora, routing by sequence, the prior of every module", "[adapters][bora]") {
  // A host of two slots (any ModuleHost works: here a SlotList-like struct).
  struct Host {
    rankwise::AnyLinear<double> first, second;
    void for_each_slot(const std::function<void(const std::string&, rankwise::AnyLinear<double>&)>& f) {
      f("first", first);
      f("second", second);
    }
  };
  Random rng(43);
  Host host{Linear<double>(4, 6, rng), Linear<double>(6, 3, rng)};
  const auto modules = rankwise::inject_bora<double>(host, {"second", "first"}, {.tasks = 2, .rank = 2, .tau = 2.0}, rng);
  REQUIRE(modules.size() == 2);
  CHECK(modules[0].path == "second");
  CHECK(host.first.kind() == "bora");
  CHECK(rankwise::bora_modules<double>(host).size() == 2);
  // Two sequences of 3 columns: tasks 1 then 0.
  const TaskRouting routing = TaskRouting::by_sequence(std::vector<std::int32_t>{1, 0}, 3, 2);
  REQUIRE(routing.runs().size() == 2);
  CHECK(routing.runs()[0].task == 1);
  CHECK(routing.runs()[1].begin == 3);
  CHECK(rankwise::set_task_routing<double>(host, routing) == 2);
  CHECK(host.second.as<BoRA<double>>().routing().columns() == 6);
  for (const auto& m : modules) randomize_bora(*m.layer, rng);
  host.first.zero_grad();
  host.second.zero_grad();
  const double penalty = rankwise::add_bora_prior_gradients<double>(host);
  CHECK(penalty == Approx(modules[0].layer->prior_penalty() + modules[1].layer->prior_penalty()).epsilon(1e-15));
  CHECK(!modules[1].layer->A_parameter(0).grad.isZero(0.0));
  rankwise::set_bora_tau<double>(host, 5.0);
  CHECK(modules[0].layer->tau() == 5.0);
  CHECK_THROWS_WITH(rankwise::set_bora_tau<double>(host, -1.0), Catch::Contains("tau must be"));
  CHECK(modules[1].layer->tau() == 5.0);
  // Bad input: nothing changes.
  Host other{Linear<double>(4, 6, rng), Linear<double>(6, 3, rng)};
  CHECK_THROWS_WITH(rankwise::inject_bora<double>(other, {"first", "third"}, {.tasks = 2, .rank = 2}, rng),
                    Catch::Contains("the model has no linear module 'third'"));
  CHECK(other.first.kind() == "linear");
  CHECK_THROWS_WITH(rankwise::inject_bora<double>(other, {"first", "first"}, {.tasks = 2, .rank = 2}, rng),
                    Catch::Contains("module 'first' is named twice"));
  CHECK_THROWS_WITH(rankwise::inject_bora<double>(other, {"second"}, {.tasks = 2, .rank = 4}, rng),
                    Catch::Contains("module 'second': "));
  CHECK(other.second.kind() == "linear");
  CHECK_THROWS_WITH(rankwise::set_task_routing<double>(host, TaskRouting::uniform(6, 0, 3)),
                    Catch::Contains("the routing is for 3 tasks, module 'first' has 2"));
  CHECK_THROWS_WITH(TaskRouting::by_sequence(std::vector<std::int32_t>{0}, 0, 2), Catch::Contains("seq_len must be >= 1"));
}
