// Tests for rankwise/rank/hooks.hpp: the samplers and the allocator as hooks of a plain training loop.
#include <rankwise/rank/hooks.hpp>

#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/layers/linear.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/rank/importance.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <deque>
#include <memory>
#include <string>
#include <vector>

using rankwise::DyLoRA;
using rankwise::DyLoRAModule;
using rankwise::Index;
using rankwise::Linear;
using rankwise::LoRA;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::Status;
using rankwise::test_support::random_matrix;

namespace {

// Three DyLoRA adapters of different r_max at depths 0, 1, 1 (they live in a deque: stable addresses).
struct DyLoRABank {
  Random rng{11};
  std::deque<DyLoRA<float>> adapters;
  DyLoRABank() {
    adapters.emplace_back(Linear<float>(6, 6, rng), rankwise::DyLoRAOptions{.max_rank = 4}, rng);
    adapters.emplace_back(Linear<float>(6, 5, rng), rankwise::DyLoRAOptions{.max_rank = 2}, rng);
    adapters.emplace_back(Linear<float>(5, 6, rng), rankwise::DyLoRAOptions{.max_rank = 3}, rng);
  }
  std::vector<DyLoRAModule<float>> modules() {
    return {{"l0.a", &adapters[0], 0}, {"l1.b", &adapters[1], 1}, {"l1.c", &adapters[2], 1}};
  }
};

// A hook that records the calls it sees.
struct Recorder final : rankwise::TrainingHook {
  std::vector<std::string>* log = nullptr;
  std::string tag;
  Status result = Status::Ok;
  std::string said;
  Recorder(std::vector<std::string>& l, std::string t, Status r = Status::Ok, std::string m = {})
      : log(&l), tag(std::move(t)), result(r), said(std::move(m)) {}
  const char* name() const override { return "recorder"; }
  void before_step(long step) override { log->push_back(tag + ".before." + std::to_string(step)); }
  void after_step(long step) override { log->push_back(tag + ".after." + std::to_string(step)); }
  Status finish() override {
    log->push_back(tag + ".finish");
    return result;
  }
  std::string message() const override { return said; }
};

}  // namespace

TEST_CASE("DyLoRAHook: one sampled rank per step for every module, r_max to evaluate", "[rank][hooks]") {
  DyLoRABank bank;
  Random hook_rng(5), reference_rng(5);
  rankwise::DyLoRAHook<float> hook(bank.modules(), hook_rng);
  rankwise::DyLoRASampler reference({.min_rank = 1, .max_rank = 4}, reference_rng);  // r_max: the largest, 4
  for (long step = 0; step < 40; ++step) {
    hook.before_step(step);
    const Index b = reference.sample();
    CHECK(bank.adapters[0].active_rank() == std::min<Index>(b, 4));
    CHECK(bank.adapters[1].active_rank() == std::min<Index>(b, 2));
    CHECK(bank.adapters[2].active_rank() == std::min<Index>(b, 3));
  }
  CHECK(hook.finish() == Status::Ok);
  CHECK(bank.adapters[0].active_rank() == 4);
  CHECK(bank.adapters[1].active_rank() == 2);
  CHECK(bank.adapters[2].active_rank() == 3);
  CHECK(hook.ranks() == std::map<std::string, Index>{{"l0.a", 4}, {"l1.b", 2}, {"l1.c", 3}});
}

TEST_CASE("ERATHook: the sampler's windows per module and depth, the depth bound to evaluate", "[rank][hooks]") {
  DyLoRABank bank;
  const rankwise::ERATSamplerOptions options{.max_rank = 0, .min_rank = 1, .total_steps = 30, .num_layers = 2};
  Random hook_rng(9), reference_rng(9);
  rankwise::ERATHook<float> hook(bank.modules(), options, hook_rng);
  CHECK(hook.sampler().max_rank() == 4);  // 0: the largest r_max of the modules
  rankwise::ERATSamplerOptions resolved = options;
  resolved.max_rank = 4;
  rankwise::ERATSampler reference(resolved, reference_rng);
  const std::vector<Index> depths = {0, 1, 1};
  std::vector<rankwise::RankWindow> windows;
  for (long step = 0; step < 40; ++step) {
    hook.before_step(step);
    reference.sample_step(step, depths, windows);
    for (std::size_t i = 0; i < 3; ++i) {
      const Index b = std::min(windows[i].b, bank.adapters[i].max_rank());
      CHECK(bank.adapters[i].active_rank() == b);
      CHECK(bank.adapters[i].window_begin() == std::min(windows[i].lo, b - 1));
    }
  }
  hook.finish();
  for (std::size_t i = 0; i < 3; ++i) {
    const Index expected = std::min(reference.depth_bound(depths[i]), bank.adapters[i].max_rank());
    CHECK(bank.adapters[i].active_rank() == expected);
    CHECK(hook.evaluation_rank(i) == expected);
  }
}

TEST_CASE("Sampler hooks refuse what they cannot drive", "[rank][hooks][errors]") {
  DyLoRABank bank;
  Random rng(1);
  CHECK_THROWS_WITH(rankwise::DyLoRAHook<float>({}, rng), Catch::Contains("needs at least one DyLoRA module (got none)"));
  CHECK_THROWS_WITH(rankwise::DyLoRAHook<float>({{"x", nullptr, 0}}, rng), Catch::Contains("module 'x' has no adapter"));
  std::vector<DyLoRAModule<float>> deep = bank.modules();
  deep[2].depth = 2;
  CHECK_THROWS_WITH(rankwise::ERATHook<float>(deep, {.max_rank = 0, .num_layers = 2}, rng),
                    Catch::Contains("module 'l1.c' has depth 2 but depths must be in [0, num_layers = 2)"));
  CHECK_THROWS_WITH(rankwise::DyLoRAHook<float>(bank.modules(), rng, 5), Catch::Contains("need 1 <= r_min <= r_max"));
}

TEST_CASE("HookList: order of calls, the first status that is not Ok wins, messages are joined", "[rank][hooks]") {
  std::vector<std::string> log;
  rankwise::HookList list;
  Recorder& first = list.add(std::make_unique<Recorder>(log, "a", Status::Ok, "a is fine"));
  Recorder second(log, "b", Status::NotApplied, "b never acted");
  list.add(second);
  list.add(std::make_unique<Recorder>(log, "c", Status::NonFinite, "c saw a NaN"));
  CHECK(list.size() == 3);
  list.before_step(0);
  list.after_step(0);
  CHECK(list.finish() == Status::NotApplied);
  CHECK(list.message() == "b never acted");
  CHECK(log == std::vector<std::string>{"a.before.0", "b.before.0", "c.before.0", "a.after.0", "b.after.0", "c.after.0",
                                        "a.finish", "b.finish", "c.finish"});
  second.result = Status::Ok;
  first.said.clear();
  CHECK(list.finish() == Status::NonFinite);
  CHECK(list.message() == "c saw a NaN");
  rankwise::HookList fine;
  fine.add(std::make_unique<Recorder>(log, "x", Status::Ok, "x: 3 rounds"));
  fine.add(std::make_unique<Recorder>(log, "y", Status::Ok, "y: done"));
  CHECK(fine.finish() == Status::Ok);
  CHECK(fine.message() == "x: 3 rounds; y: done");
  CHECK_THROWS_WITH(list.add(std::unique_ptr<Recorder>()), Catch::Contains("the hook is null"));
}

TEST_CASE("AllocatorHook: a plain loop with the hook prunes exactly as calling the allocator does", "[rank][hooks]") {
  // Two identical runs of LoRA on two layers fitting a random linear map: one calls allocator.step()
  // itself, the other runs it through a HookList. Same seeds: same ranks, same weights.
  const auto run = [](bool through_hook, Status* finished, std::map<std::string, Index>* ranks) {
    Random rng(21);
    std::deque<LoRA<float>> layers;
    layers.emplace_back(Linear<float>(8, 8, rng), rankwise::LoRAOptions{.rank = 6, .alpha = 12.0}, rng);
    layers.emplace_back(Linear<float>(8, 8, rng), rankwise::LoRAOptions{.rank = 6, .alpha = 12.0}, rng);
    layers[0].set_path("l0");
    layers[1].set_path("l1");
    std::vector<rankwise::Parameter<float>*> params;
    for (LoRA<float>& l : layers)
      for (rankwise::Parameter<float>* p : l.parameters())
        if (p->trainable) params.push_back(p);
    rankwise::AdamW<float> optimizer(params, {.lr = 1e-2, .weight_decay = 0.0});
    std::vector<rankwise::RankModule<float>> modules{{layers[0], "l0"}, {layers[1], "l1"}};
    rankwise::FisherImportance<float> estimator;
    rankwise::RankAllocatorOptions options = rankwise::pruning_schedule(48);
    options.budget = 6;
    rankwise::RankAllocator<float> allocator(modules, estimator, options, rng);
    allocator.add_optimizer(optimizer);
    rankwise::HookList hooks;
    hooks.add(std::make_unique<rankwise::AllocatorHook<float>>(allocator));
    const Matrix<float> target = random_matrix<float>(8, 8, rng);
    Matrix<float> x, h, y, dy, dh, dx;
    for (long step = 0; step < 48; ++step) {
      x = random_matrix<float>(8, 16, rng);
      if (through_hook) hooks.before_step(step);
      for (LoRA<float>& l : layers) l.zero_grad();
      layers[0].forward(x, h);
      layers[1].forward(h, y);
      dy = (y - target * x) / 16.0f;
      layers[1].backward(dy, dh);
      layers[0].backward(dh, dx);
      optimizer.step();
      if (through_hook)
        hooks.after_step(step);
      else
        allocator.step();
    }
    *finished = through_hook ? hooks.finish() : allocator.finish();
    *ranks = through_hook ? hooks.ranks() : allocator.rank_pattern();
    return Matrix<float>(layers[0].A());
  };
  Status direct_status = Status::NotApplied, hooked_status = Status::NotApplied;
  std::map<std::string, Index> direct_ranks, hooked_ranks;
  const Matrix<float> direct = run(false, &direct_status, &direct_ranks);
  const Matrix<float> hooked = run(true, &hooked_status, &hooked_ranks);
  CHECK(direct_status == Status::Ok);
  CHECK(hooked_status == Status::Ok);
  CHECK(hooked_ranks == direct_ranks);
  CHECK(hooked_ranks.at("l0") + hooked_ranks.at("l1") == 6);  // pruned from 12 to the budget
  REQUIRE(hooked.rows() == direct.rows());
  CHECK(hooked == direct);
}
