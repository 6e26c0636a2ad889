// Tests for rankwise/rank/dylora_sampler.hpp and rankwise/rank/erat_sampler.hpp (with the DyLoRA
// adapter they drive).
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/rank/dylora_sampler.hpp>
#include <rankwise/rank/erat_sampler.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <map>
#include <memory>
#include <vector>

using rankwise::DyLoRA;
using rankwise::DyLoRASampler;
using rankwise::ERATSampler;
using rankwise::Index;
using rankwise::Linear;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::RankWindow;
using rankwise::test_support::random_matrix;

TEST_CASE("DyLoRASampler: uniform on [r_min, r_max], reproducible from the seed", "[rank][dylora_sampler]") {
  Random rng_a(3), rng_b(3), rng_c(4);
  DyLoRASampler a({.min_rank = 2, .max_rank = 6}, rng_a), b({.min_rank = 2, .max_rank = 6}, rng_b),
      c({.min_rank = 2, .max_rank = 6}, rng_c);
  std::map<Index, int> counts;
  std::vector<Index> first, third;
  const int draws = 6000;
  for (int i = 0; i < draws; ++i) {
    const Index r = a.sample();
    CHECK(a.last() == r);
    CHECK(b.sample() == r);  // same seed, same ranks
    first.push_back(r);
    third.push_back(c.sample());
    ++counts[r];
  }
  CHECK(first != third);  // another seed, other ranks
  REQUIRE(counts.size() == 5);
  CHECK(counts.begin()->first == 2);
  CHECK(counts.rbegin()->first == 6);
  for (const auto& [rank, n] : counts) CHECK(std::abs(n - draws / 5) < 120);  // about 4 sigma
  // The sampler draws from its own forked stream, and it is exactly uniform_int on it.
  Random replay(3);
  Random fork = replay.fork();
  for (int i = 0; i < 10; ++i) CHECK(fork.uniform_int(2, 6) == first[std::size_t(i)]);
}

TEST_CASE("DyLoRASampler: r_min > r_max or r_min < 1 is rejected", "[rank][dylora_sampler][errors]") {
  Random rng(1);
  CHECK_THROWS_WITH(DyLoRASampler({.min_rank = 5, .max_rank = 4}, rng),
                    Catch::Contains("[rankwise::DyLoRASampler]") && Catch::Contains("1 <= r_min <= r_max") &&
                        Catch::Contains("r_min 5, r_max 4"));
  CHECK_THROWS_AS(DyLoRASampler({.min_rank = 0, .max_rank = 4}, rng), rankwise::InvalidArgument);
}

TEST_CASE("ERATSampler: the depth bound follows round(r_lo + (r_max - r_lo) (l + 1) / L)", "[rank][erat_sampler]") {
  Random rng(1);
  ERATSampler sampler({.max_rank = 8, .num_layers = 4}, rng);
  CHECK(sampler.depth_floor() == 4);  // max(1, 8 / 2)
  CHECK(sampler.width() == 2);        // ceil(8 / 4)
  // r_lo + 4 (l + 1) / 4 = 5, 6, 7, 8: increasing with depth, the deepest reaches r_max.
  CHECK(sampler.depth_bound(0) == 5);
  CHECK(sampler.depth_bound(1) == 6);
  CHECK(sampler.depth_bound(2) == 7);
  CHECK(sampler.depth_bound(3) == 8);
  // A rounding case: r_max 16, L 12: r_lo = 8, 8 + 8 (l + 1) / 12, computed here in double.
  ERATSampler deep({.max_rank = 16, .num_layers = 12}, rng);
  for (Index l = 0; l < 12; ++l) {
    const double exact = 8.0 + 8.0 * double(l + 1) / 12.0;
    CHECK(deep.depth_bound(l) == Index(std::floor(exact + 0.5)));
    if (l > 0) CHECK(deep.depth_bound(l) >= deep.depth_bound(l - 1));
  }
  ERATSampler flat({.max_rank = 8, .num_layers = 4, .depth_aware = false}, rng);
  for (Index l = 0; l < 4; ++l) CHECK(flat.depth_bound(l) == 8);
}

TEST_CASE("ERATSampler: windows respect the depth bound, the width and the time schedule", "[rank][erat_sampler]") {
  Random rng(2);
  const Index T = 100;
  ERATSampler sampler({.max_rank = 8, .total_steps = T, .num_layers = 4}, rng);
  std::vector<Index> depths = {0, 1, 2, 3};
  std::vector<RankWindow> windows;
  std::map<Index, int> at_bound, dynamic_values;
  int total = 0;
  for (const Index step : {Index(0), T / 2, T, 2 * T}) {
    int below_bound = 0, count = 0;
    for (int rep = 0; rep < 2000; ++rep) {
      sampler.sample_step(step, depths, windows);
      REQUIRE(windows.size() == 4);
      for (std::size_t m = 0; m < 4; ++m) {
        const RankWindow w = windows[m];
        const Index b_max = sampler.depth_bound(depths[m]);
        CHECK(w.b >= 1);
        CHECK(w.b <= b_max);
        CHECK(w.lo >= std::max<Index>(0, w.b - sampler.width()));
        CHECK(w.lo < w.b);
        if (w.b < b_max) ++below_bound;
        if (step >= T && m == 0) ++dynamic_values[w.b];
        ++count;
        ++total;
      }
    }
    const double expected_dynamic = std::min(1.0, double(step) / double(T));
    INFO("step " << step);
    if (step == 0) {
      CHECK(below_bound == 0);  // early training uses the highest rank of each depth
    } else {
      // A dynamic draw lands below b_max with probability (b_max - 1) / b_max; average over depths 5..8.
      const double below = expected_dynamic * (4.0 / 5 + 5.0 / 6 + 6.0 / 7 + 7.0 / 8) / 4.0;
      CHECK(double(below_bound) / count == Approx(below).margin(0.03));
    }
  }
  // From step T on, b is uniform on [1, b_max(0)] = [1, 5] at depth 0.
  REQUIRE(dynamic_values.size() == 5);
  for (const auto& [b, n] : dynamic_values) CHECK(std::abs(n - 4000 / 5) < 120);
  CHECK(sampler.dynamic_probability(0) == 0.0);
  CHECK(sampler.dynamic_probability(T / 4) == Approx(0.25));
  CHECK(sampler.dynamic_probability(3 * T) == 1.0);
  (void)total;
}

TEST_CASE("ERATSampler: the window's lower end is uniform over the width, or fixed", "[rank][erat_sampler]") {
  Random rng(3);
  ERATSampler sampler({.max_rank = 8, .num_layers = 1, .width = 3, .time_aware = false}, rng);
  std::map<Index, int> offsets;
  for (int i = 0; i < 3000; ++i) {
    const RankWindow w = sampler.sample(5, 0);
    if (w.b >= 3) ++offsets[w.b - w.lo];  // trained width 1, 2 or 3
  }
  REQUIRE(offsets.size() == 3);
  CHECK(offsets.at(1) == Approx(offsets.at(3)).epsilon(0.15));
  ERATSampler fixed({.max_rank = 8, .num_layers = 1, .width = 3, .random_begin = false, .time_aware = false}, rng);
  for (int i = 0; i < 200; ++i) {
    const RankWindow w = fixed.sample(5, 0);
    CHECK(w.lo == std::max<Index>(0, w.b - 3));
  }
}

TEST_CASE("ERATSampler: per module by default, reproducible from the seed", "[rank][erat_sampler]") {
  Random rng_a(4), rng_b(4);
  ERATSampler a({.max_rank = 8, .total_steps = 10, .num_layers = 3}, rng_a);
  ERATSampler b({.max_rank = 8, .total_steps = 10, .num_layers = 3}, rng_b);
  const std::vector<Index> depths = {0, 0, 1, 1, 2, 2};  // q and v of three layers
  std::vector<RankWindow> wa, wb;
  bool modules_differ = false;
  for (Index step = 0; step < 40; ++step) {
    a.sample_step(step, depths, wa);
    b.sample_step(step, depths, wb);
    CHECK(wa == wb);
    if (!(wa[0] == wa[1])) modules_differ = true;
  }
  CHECK(modules_differ);  // not one rank for the whole model
}

TEST_CASE("ERATSampler: invalid options are rejected, naming what must hold", "[rank][erat_sampler][errors]") {
  Random rng(5);
  CHECK_THROWS_WITH(ERATSampler({.max_rank = 4, .min_rank = 5}, rng),
                    Catch::Contains("[rankwise::ERATSampler]") && Catch::Contains("r_min 5, r_max 4"));
  CHECK_THROWS_WITH(ERATSampler({.max_rank = 4, .width = 5}, rng), Catch::Contains("width must be in [1, r_max]"));
  CHECK_THROWS_WITH(ERATSampler({.max_rank = 8, .min_rank = 3, .depth_floor = 2}, rng),
                    Catch::Contains("depth_floor must be in [r_min, r_max] = [3, 8]"));
  CHECK_THROWS_AS(ERATSampler({.total_steps = 0}, rng), rankwise::InvalidArgument);
  CHECK_THROWS_AS(ERATSampler({.num_layers = 0}, rng), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(ERATSampler({.per_module = false}, rng), Catch::Contains("needs depth_aware = false"));
  ERATSampler sampler({.num_layers = 2}, rng);
  CHECK_THROWS_WITH(sampler.sample(0, 2), Catch::Contains("depth must be in [0, num_layers) = [0, 2) (got 2)"));
  CHECK_THROWS_AS(sampler.sample(-1, 0), rankwise::InvalidArgument);
  // r_min above the default floor raises the floor instead of failing.
  ERATSampler raised({.max_rank = 8, .min_rank = 6}, rng);
  CHECK(raised.depth_floor() == 6);
}

namespace {
// Trains a few DyLoRA modules with windows from `next_windows(step, windows)`; returns their factors.
template <typename NextWindows>
std::vector<Matrix<double>> train_modules(bool frozen, NextWindows next_windows) {
  Random rng(42);
  std::vector<std::unique_ptr<DyLoRA<double>>> modules;
  std::vector<rankwise::Parameter<double>*> params;
  for (int m = 0; m < 3; ++m) {
    modules.push_back(std::make_unique<DyLoRA<double>>(Linear<double>(8, 8, rng),
                                                       rankwise::DyLoRAOptions{.max_rank = 4, .frozen = frozen}, rng));
    modules.back()->set_path(std::to_string(m) + ".m");
    for (auto* p : modules.back()->parameters()) params.push_back(p);
  }
  rankwise::AdamW<double> opt(params, {.lr = 1e-2, .weight_decay = 0.1});
  Random data(7);
  const Matrix<double> x = random_matrix<double>(8, 6, data), target = random_matrix<double>(8, 6, data);
  std::vector<RankWindow> windows(3);
  Matrix<double> y, dy, dx;
  for (Index step = 0; step < 25; ++step) {
    next_windows(step, windows);
    for (std::size_t m = 0; m < 3; ++m) modules[m]->set_window(windows[m].lo, windows[m].b);
    dy.setZero(8, 6);
    for (auto& module : modules) {  // three modules in a chain
      module->zero_grad();
    }
    Matrix<double> h = x;
    for (auto& module : modules) {
      module->forward(h, y);
      h = y;
    }
    dy = h - target;
    for (auto it = modules.rbegin(); it != modules.rend(); ++it) {
      (*it)->backward(dy, dx);
      dy = dx;
    }
    opt.step();
  }
  std::vector<Matrix<double>> factors;
  for (auto& module : modules) {
    factors.push_back(module->A());
    factors.push_back(module->B());
  }
  return factors;
}
}  // namespace

TEST_CASE("ERATSampler: DyLoRA's frozen and non-frozen training are special cases, bit for bit", "[rank][erat_sampler]") {
  for (const bool frozen : {true, false}) {
    Random dylora_rng(11), erat_rng(11);
    DyLoRASampler dylora_sampler({.max_rank = 4}, dylora_rng);
    // One window per step for every module, no depth or time awareness, and the DyLoRA window.
    ERATSampler erat_sampler({.max_rank = 4,
                              .total_steps = 25,
                              .num_layers = 1,
                              .width = frozen ? 1 : 4,
                              .random_begin = false,
                              .depth_aware = false,
                              .time_aware = false,
                              .per_module = false},
                             erat_rng);
    const auto with_dylora = train_modules(frozen, [&](Index, std::vector<RankWindow>& windows) {
      const Index b = dylora_sampler.sample();
      for (RankWindow& w : windows) w = RankWindow{frozen ? b - 1 : 0, b};
    });
    const std::vector<Index> depths = {0, 0, 0};
    const auto with_erat = train_modules(frozen, [&](Index step, std::vector<RankWindow>& windows) {
      erat_sampler.sample_step(step, depths, windows);
    });
    INFO((frozen ? "frozen" : "non-frozen"));
    REQUIRE(with_dylora.size() == with_erat.size());
    for (std::size_t i = 0; i < with_dylora.size(); ++i) CHECK(with_dylora[i] == with_erat[i]);
    CHECK_FALSE(with_dylora[1].isZero(0.0));  // B was trained
  }
}

TEST_CASE("ERAT-DLoRA: a model trained with windows can be evaluated at every rank", "[rank][erat_sampler]") {
  Random rng(12);
  const Index in = 16, out = 16, tokens = 64;
  DyLoRA<double> adapter(Linear<double>(in, out, rng), {.max_rank = 6, .alpha = 6.0}, rng);
  // A target that differs from the base by a rank-6 change with decaying strength.
  Matrix<double> U = random_matrix<double>(out, 6, rng), V = random_matrix<double>(6, in, rng);
  for (Index k = 0; k < 6; ++k) U.col(k) *= 0.5 / double(k + 1);
  const Matrix<double> target_weight = adapter.base().weight() + U * V;
  rankwise::AdamW<double> opt(adapter.parameters(), {.lr = 2e-2, .weight_decay = 0.0});
  ERATSampler sampler({.max_rank = 6, .total_steps = 300, .num_layers = 1}, rng);
  Matrix<double> x(in, tokens), y, dx;
  const auto loss_at = [&](Index b, const Matrix<double>& input) {
    adapter.set_active_rank(b);
    adapter.forward(input, y);
    Matrix<double> target = target_weight * input;
    target.colwise() += adapter.base().bias().col(0);
    return 0.5 * (y - target).squaredNorm() / double(tokens);
  };
  const Matrix<double> x_eval = random_matrix<double>(in, 256, rng);
  adapter.set_training(false);
  const double base_loss = loss_at(6, x_eval);
  adapter.set_training(true);
  for (Index step = 0; step < 600; ++step) {
    rankwise::fill_normal(x, 0.0, 1.0, rng);
    const RankWindow w = sampler.sample(step, 0);
    adapter.set_window(w.lo, w.b);
    Matrix<double> target = target_weight * x;
    target.colwise() += adapter.base().bias().col(0);
    adapter.zero_grad();
    adapter.forward(x, y);
    adapter.backward((y - target) / double(tokens), dx);
    opt.step();
  }
  adapter.set_training(false);
  double previous = base_loss;
  for (Index b = 1; b <= 6; ++b) {
    const double loss = loss_at(b, x_eval);
    INFO("b = " << b << ": loss " << loss << ", base " << base_loss);
    CHECK(loss < 0.5 * base_loss);   // every truncation learned something
    CHECK(loss < previous * 1.05);   // and more components do not hurt
    previous = loss;
  }
}
