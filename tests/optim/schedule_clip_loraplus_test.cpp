// Tests for rankwise/optim/lr_schedule.hpp, grad_clip.hpp and loraplus.hpp.
#include <rankwise/adapters/lora.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/grad_clip.hpp>
#include <rankwise/optim/loraplus.hpp>
#include <rankwise/optim/lr_schedule.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

using rankwise::LRSchedule;
using rankwise::Matrix;
using rankwise::Parameter;
using rankwise::Random;

TEST_CASE("LRSchedule: constant, linear and cosine factors", "[optim][lr_schedule]") {
  CHECK(LRSchedule::constant().factor(0) == 1.0);
  CHECK(LRSchedule::constant().factor(12345) == 1.0);

  const LRSchedule linear = LRSchedule::linear(10, 110);
  CHECK(linear.factor(0) == 0.0);
  CHECK(linear.factor(5) == Approx(0.5));
  CHECK(linear.factor(10) == Approx(1.0));
  CHECK(linear.factor(60) == Approx(0.5));
  CHECK(linear.factor(110) == Approx(0.0));
  CHECK(linear.factor(500) == Approx(0.0));

  const LRSchedule cosine = LRSchedule::cosine(0, 100, 0.1);
  CHECK(cosine.factor(0) == Approx(1.0));
  CHECK(cosine.factor(50) == Approx(0.55));
  CHECK(cosine.factor(100) == Approx(0.1));
  CHECK(LRSchedule::cosine(4, 8).factor(2) == Approx(0.5));
  // Monotone after warm-up.
  for (long t = 1; t <= 100; ++t) CHECK(cosine.factor(t) <= cosine.factor(t - 1));
}

TEST_CASE("LRSchedule: invalid settings are rejected", "[optim][lr_schedule][errors]") {
  CHECK_THROWS_WITH(LRSchedule::linear(10, 10), Catch::Contains("total_steps must be > warmup_steps = 10 (got 10)"));
  CHECK_THROWS_AS(LRSchedule::cosine(-1, 10), rankwise::InvalidArgument);
  CHECK_THROWS_AS(LRSchedule::cosine(0, 10, 1.5), rankwise::InvalidArgument);
  CHECK_THROWS_AS(LRSchedule::constant().factor(-1), rankwise::InvalidArgument);
  CHECK(rankwise::schedule_kind_from_name("cosine") == rankwise::ScheduleKind::Cosine);
  CHECK_THROWS_WITH(rankwise::schedule_kind_from_name("step"), Catch::Contains("got \"step\""));
}

TEST_CASE("clip_grad_norm: clips to the global norm and reports it", "[optim][grad_clip]") {
  Parameter<double> a{"a", Matrix<double>::Zero(1, 2), Matrix<double>(1, 2), true, false};
  Parameter<double> b{"b", Matrix<double>::Zero(1, 1), Matrix<double>(1, 1), true, false};
  Parameter<double> frozen{"f", Matrix<double>::Zero(1, 1), Matrix<double>::Constant(1, 1, 100.0), false, false};
  a.grad << 3.0, 0.0;
  b.grad << 4.0;
  const std::vector<Parameter<double>*> params = {&a, &b, &frozen};
  CHECK(rankwise::gradient_norm(params) == Approx(5.0));

  rankwise::ClipResult r = rankwise::clip_grad_norm(params, 10.0);
  CHECK_FALSE(r.clipped);
  CHECK(a.grad(0, 0) == 3.0);

  r = rankwise::clip_grad_norm(params, 1.0);
  CHECK(r.clipped);
  CHECK(r.norm == Approx(5.0));
  CHECK(r.status == rankwise::Status::Ok);
  CHECK(rankwise::gradient_norm(params) == Approx(1.0).epsilon(1e-5));
  CHECK(frozen.grad(0, 0) == 100.0);

  b.grad(0, 0) = std::numeric_limits<double>::quiet_NaN();
  const double a_before = a.grad(0, 0);
  r = rankwise::clip_grad_norm(params, 1.0);
  CHECK(r.status == rankwise::Status::NonFinite);
  CHECK(a.grad(0, 0) == a_before);  // nothing changed
  CHECK_THROWS_WITH(rankwise::clip_grad_norm(params, 0.0), Catch::Contains("max_norm must be"));
}

TEST_CASE("loraplus_groups: B and vectors learn ratio times faster than A", "[optim][loraplus]") {
  Random rng(1);
  rankwise::LoRA<double> lora(rankwise::Linear<double>(6, 6, rng), {.rank = 2}, rng);
  Parameter<double> bias{"scale_vector", Matrix<double>::Zero(6, 1), Matrix<double>::Zero(6, 1), true, true};
  std::vector<Parameter<double>*> params = lora.parameters();
  params.push_back(&bias);
  const auto groups = rankwise::loraplus_groups(params, {.lr = 1e-3, .ratio = 16.0, .weight_decay = 0.1});
  REQUIRE(groups.size() == 3);
  CHECK(groups[0].name == "lora_A");
  CHECK(groups[0].parameters == std::vector<Parameter<double>*>{&lora.A_parameter()});
  CHECK(*groups[0].lr == Approx(1e-3));
  CHECK(*groups[0].weight_decay == Approx(0.1));
  CHECK(groups[1].name == "lora_B");
  CHECK(groups[1].parameters == std::vector<Parameter<double>*>{&lora.B_parameter()});
  CHECK(*groups[1].lr == Approx(16e-3));
  CHECK(groups[2].name == "vectors");
  CHECK(groups[2].parameters == std::vector<Parameter<double>*>{&bias});
  CHECK(*groups[2].lr == Approx(16e-3));
  CHECK(*groups[2].weight_decay == 0.0);

  // Adam's first step moves each entry by exactly its lr: B moves 16 times as far as A.
  rankwise::AdamW<double> opt(groups, {.weight_decay = 0.0});
  lora.A_parameter().grad.setConstant(1.0);
  lora.B_parameter().grad.setConstant(1.0);
  const Matrix<double> A0 = lora.A(), B0 = lora.B();
  opt.step();
  CHECK((A0 - lora.A()).cwiseAbs().maxCoeff() == Approx(1e-3 * (1 - 0.1 * 1e-3)).margin(1e-4));
  CHECK((B0 - lora.B()).cwiseAbs().maxCoeff() == Approx(16e-3).epsilon(1e-6));
  CHECK_THROWS_WITH(rankwise::loraplus_groups(params, {.ratio = 0.5}), Catch::Contains("ratio must be"));
  CHECK_THROWS_AS(rankwise::loraplus_groups(params, {.lr = 0.0}), rankwise::InvalidArgument);
}
