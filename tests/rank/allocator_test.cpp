// Tests for rankwise/rank/allocator.hpp.
#include <rankwise/rank/allocator.hpp>

#include <rankwise/adapters/lora.hpp>
#include <rankwise/layers/linear.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/rank/importance.hpp>
#include <rankwise/rank/module.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <deque>
#include <functional>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

using rankwise::AllocationPolicy;
using rankwise::BudgetUnit;
using rankwise::ImportanceScores;
using rankwise::Index;
using rankwise::Linear;
using rankwise::LoRA;
using rankwise::Matrix;
using rankwise::ModuleCapacity;
using rankwise::Random;
using rankwise::RankAllocator;
using rankwise::RankAllocatorOptions;
using rankwise::RankModule;
using rankwise::Status;
using rankwise::test_support::random_matrix;

namespace {

using Scores = std::vector<std::vector<double>>;

// An estimator whose scores the test decides, so that every decision of the allocator is known.
class ScriptedImportance final : public rankwise::ImportanceEstimator<float> {
 public:
  using Rule = std::function<Scores(std::span<RankModule<float>>)>;
  explicit ScriptedImportance(Rule rule) : m_rule(std::move(rule)) {}
  const char* name() const override { return "scripted"; }
  ImportanceScores score(std::span<RankModule<float>> modules) override {
    ++calls;
    ImportanceScores s;
    s.scores = m_rule(modules);
    return s;
  }
  void follow(const rankwise::RankChange& change) override { followed += long(change.changes.size()); }
  int calls = 0;
  long followed = 0;

 private:
  Rule m_rule;
};

// Scores that rank module m's rank i by (bias[m] + 0.01 i): a fixed preference per module.
ScriptedImportance::Rule by_module(std::vector<double> bias) {
  return [bias](std::span<RankModule<float>> modules) {
    Scores s(modules.size());
    for (std::size_t m = 0; m < modules.size(); ++m)
      for (Index i = 0; i < modules[m].rank(); ++i) s[m].push_back(bias[m] + 0.01 * double(i));
    return s;
  };
}

// Adapters of various shapes held at stable addresses, as a model would hold them.
struct Bank {
  Random rng{11};
  std::deque<LoRA<float>> layers;
  void add(Index in, Index out, Index rank, const std::string& path) {
    layers.emplace_back(Linear<float>(in, out, rng), rankwise::LoRAOptions{.rank = rank, .alpha = 2.0 * double(rank)},
                        rng);
    layers.back().set_path(path);
    layers.back().B_parameter().value = random_matrix<float>(out, rank, rng);
    paths.push_back(path);
  }
  std::vector<RankModule<float>> modules() {
    std::vector<RankModule<float>> out;
    for (std::size_t m = 0; m < layers.size(); ++m) out.emplace_back(layers[m], paths[m]);
    return out;
  }
  std::vector<rankwise::Parameter<float>*> parameters() {
    std::vector<rankwise::Parameter<float>*> out;
    for (LoRA<float>& l : layers) {
      out.push_back(&l.A_parameter());
      out.push_back(&l.B_parameter());
    }
    return out;
  }
  std::vector<Index> ranks() const {
    std::vector<Index> r;
    for (const LoRA<float>& l : layers) r.push_back(l.rank());
    return r;
  }
  std::vector<std::string> paths;
};

// "<prefix><m><suffix>", built by appending (GCC 12 warns falsely on "literal" + std::string).
std::string path_of(const char* prefix, std::size_t m, const char* suffix = "") {
  std::string path(prefix);
  path += std::to_string(m);
  path += suffix;
  return path;
}

RankAllocatorOptions schedule(long warmup, long recovery, long rounds, Index per_round) {
  RankAllocatorOptions o;
  o.warmup_steps = warmup;
  o.recovery_steps = recovery;
  o.rounds = rounds;
  o.ranks_per_round = per_round;
  return o;
}


}  // namespace

TEST_CASE("RankAllocator helpers: module kinds, uniform ranks, the paper's schedule", "[rank][allocator]") {
  CHECK(rankwise::module_kind("layers.3.attn.q_proj") == "layers.attn.q_proj");
  CHECK(rankwise::module_kind("layers.12.mlp.down_proj") == "layers.mlp.down_proj");
  CHECK(rankwise::module_kind("encoder") == "encoder");
  CHECK(rankwise::module_kind("h2.0.fc") == "h2.fc");
  CHECK(rankwise::uniform_ranks(16, 6) == std::vector<Index>{3, 3, 3, 3, 2, 2});
  CHECK(rankwise::uniform_ranks(4, 6) == std::vector<Index>{1, 1, 1, 1, 0, 0});
  const RankAllocatorOptions paper = rankwise::paper_schedule(1000);
  CHECK(paper.warmup_steps == 1000);
  CHECK(paper.recovery_steps == 250);
  CHECK(paper.rounds == 8);
  CHECK_THROWS_WITH(rankwise::paper_schedule(0), Catch::Contains("steps_per_epoch must be >= 1"));
}

TEST_CASE("plan_reallocation: the paper's example, 8 ranks over three modules give +3, +3, +2", "[rank][allocator]") {
  // Modules 3 and 4 hold the 8 lowest scores; the three others are ranked by mean score
  // m2 > m0 > m1 (not in index order, so the order must come from the scores).
  const Scores scores{{5.0, 5.0, 5.0, 5.0}, {2.0, 3.0, 4.0, 3.0}, {9.0, 8.0, 7.0, 8.0}, {-1.0, -2.0, -3.0, -4.0},
                      {0.0, -0.5, 0.5, -0.1}};
  const std::vector<ModuleCapacity> caps(5, ModuleCapacity{.rank = 4, .max_rank = 16, .cost = 1});
  const rankwise::RoundPlan plan = rankwise::plan_reallocation(scores, caps, 8);
  CHECK(plan.remove[3] == std::vector<Index>{0, 1, 2, 3});
  CHECK(plan.remove[4] == std::vector<Index>{0, 1, 2, 3});
  CHECK(plan.add == std::vector<Index>{3, 2, 3, 0, 0});
  REQUIRE(plan.pruned.size() == 8);
  CHECK(plan.pruned.front().score == -4.0);  // lowest first
  CHECK(plan.pruned.front().module == 3);
  CHECK(plan.pruned.front().rank == 3);
  CHECK(plan.mean_scores[2] == Approx(8.0));
}

TEST_CASE("plan_reallocation: ties, full modules, empty modules and parameter costs", "[rank][allocator]") {
  SECTION("equal scores are broken by module index, then rank index") {
    const Scores scores{{1.0, 0.0, 0.0}, {0.0, 0.0}, {2.0}};
    const std::vector<ModuleCapacity> caps{{3, 8, 1}, {2, 8, 1}, {1, 8, 1}};
    const rankwise::RoundPlan plan = rankwise::plan_reallocation(scores, caps, 3);
    CHECK(plan.remove[0] == std::vector<Index>{1, 2});
    CHECK(plan.remove[1] == std::vector<Index>{0});
    CHECK(plan.add == std::vector<Index>{0, 0, 3});
  }
  SECTION("when every module lost a rank nothing is added") {
    const Scores scores{{0.0, 5.0}, {0.1, 5.0}, {0.2, 5.0}};
    const std::vector<ModuleCapacity> caps(3, ModuleCapacity{2, 8, 1});
    const rankwise::RoundPlan plan = rankwise::plan_reallocation(scores, caps, 3);
    CHECK(plan.add == std::vector<Index>{0, 0, 0});
    CHECK(plan.pruned.size() == 3);
  }
  SECTION("a module at max_rank is skipped; an empty module comes last among receivers") {
    const Scores scores{{9.0, 9.0}, {}, {1.0, 1.0}, {-5.0, -6.0, -7.0}};
    const std::vector<ModuleCapacity> caps{{2, 2, 1}, {0, 4, 1}, {2, 4, 1}, {3, 4, 1}};
    const rankwise::RoundPlan plan = rankwise::plan_reallocation(scores, caps, 3);
    // receivers by mean: m0 (full), m2, m1 (empty, mean -inf): 3 ranks -> m2 +2, m1 +1
    CHECK(plan.add == std::vector<Index>{0, 1, 2, 0});
    CHECK(plan.mean_scores[1] == -std::numeric_limits<double>::infinity());
  }
  SECTION("parameter costs: what was freed is handed out without exceeding it") {
    // The pruned rank freed 20 parameters; receivers cost 12 and 6 per rank.
    const Scores scores{{-1.0}, {3.0}, {2.0}};
    const std::vector<ModuleCapacity> caps{{1, 8, 20}, {1, 8, 12}, {1, 8, 6}};
    const rankwise::RoundPlan plan = rankwise::plan_reallocation(scores, caps, 1);
    CHECK(plan.add == std::vector<Index>{0, 1, 1});  // 12 + 6 = 18 <= 20; another rank would not fit
  }
  SECTION("bad input") {
    const std::vector<ModuleCapacity> caps{{2, 8, 1}};
    CHECK_THROWS_WITH(rankwise::plan_reallocation({{1.0, 2.0}}, caps, 3),
                      Catch::Contains("[rankwise::plan_reallocation]") && Catch::Contains("[0, active ranks = 2]"));
    CHECK_THROWS_WITH(rankwise::plan_reallocation({{1.0}}, caps, 1), Catch::Contains("rank 2 but 1 scores"));
    CHECK_THROWS_WITH(rankwise::plan_reallocation({{1.0, std::nan("")}}, caps, 1), Catch::Contains("NaN"));
  }
}

TEST_CASE("plan_pruning: the lowest ranks go until enough budget is freed", "[rank][allocator]") {
  const Scores scores{{3.0, 0.5}, {0.1, 0.2, 4.0}};
  const std::vector<ModuleCapacity> caps{{2, 8, 10}, {3, 8, 4}};
  const rankwise::RoundPlan plan = rankwise::plan_pruning(scores, caps, 9);
  // 0.1 (4), 0.2 (4), then 0.5 (10): 18 >= 9 only after the third
  CHECK(plan.remove[0] == std::vector<Index>{1});
  CHECK(plan.remove[1] == std::vector<Index>{0, 1});
  CHECK(plan.add == std::vector<Index>{0, 0});
}

TEST_CASE("RankAllocator: rounds at K1, K1 + K2, ... and the budget holds after every round", "[rank][allocator]") {
  Bank bank;
  for (int m = 0; m < 4; ++m) bank.add(12, 10, 4, path_of("blocks.", std::size_t(m), ".fc"));
  ScriptedImportance scripted(by_module({3.0, 1.0, 2.0, 0.0}));
  rankwise::AdamW<float> optimizer(bank.parameters(), {.lr = 1e-3});
  Random rng(5);
  RankAllocator<float> allocator(bank.modules(), scripted, schedule(10, 5, 3, 2), rng);
  allocator.add_optimizer(optimizer);
  CHECK(allocator.budget() == 16);
  CHECK(allocator.status() == Status::NotApplied);
  std::vector<long> acted_at;
  for (long t = 1; t <= 40; ++t) {
    CHECK(allocator.step() == Status::Ok);
    if (allocator.acted_at_last_step()) {
      acted_at.push_back(t);
      CHECK(allocator.used() <= allocator.budget());
      CHECK(allocator.total_ranks() == 16);  // some module always lost nothing here
    }
  }
  CHECK(acted_at == std::vector<long>{10, 15, 20});
  CHECK(allocator.is_done());
  CHECK(scripted.calls == 3);
  // Module 3 scores lowest and loses 2 ranks in rounds 1 and 2, then module 1 in round 3; each time
  // modules 0 and 2 (the highest means) gain one each, and the emptied module 3 comes last.
  CHECK(bank.ranks() == std::vector<Index>{7, 2, 7, 0});
  CHECK(allocator.rank_pattern() == std::map<std::string, Index>{
                                        {"blocks.0.fc", 7}, {"blocks.1.fc", 2}, {"blocks.2.fc", 7}, {"blocks.3.fc", 0}});
  REQUIRE(allocator.events().size() == 3);
  const rankwise::AllocationEvent& first = allocator.events()[0];
  CHECK(first.step == 10);
  CHECK(first.pruned.size() == 2);
  CHECK(first.pruned[0].module == 3);
  CHECK(first.added == std::vector<Index>{1, 0, 1, 0});  // m0 then m2 (means 3 > 2 > 1)
  CHECK(first.ranks_after == std::vector<Index>{5, 4, 5, 2});
  CHECK(allocator.finish() == Status::Ok);
  const std::string table = allocator.format_table();
  CHECK_THAT(table, Catch::Contains("blocks.3.fc") && Catch::Contains("start") && Catch::Contains("r3") &&
                        Catch::Contains("total ranks"));
  CHECK_THAT(allocator.format_events(), Catch::Contains("round 1 (step 10): pruned blocks.3.fc#0") &&
                                            Catch::Contains("added blocks.0.fc +1 blocks.2.fc +1"));
}

TEST_CASE("RankAllocator: a round keeps the function of the surviving ranks, their scale and optimizer state",
          "[rank][allocator]") {
  Bank bank;
  bank.add(8, 6, 4, "a");
  bank.add(8, 6, 4, "b");
  ScriptedImportance scripted(by_module({1.0, 0.0}));
  rankwise::AdamW<float> optimizer(bank.parameters(), {.lr = 1e-2});
  Random rng(6);
  // A few real steps so that the optimizer has state worth keeping.
  const Matrix<float> x = random_matrix<float>(8, 5, rng);
  Matrix<float> y, dx;
  for (int t = 0; t < 3; ++t) {
    for (LoRA<float>& l : bank.layers) {
      l.zero_grad();
      l.forward(x, y);
      l.backward(random_matrix<float>(6, 5, rng), dx);
    }
    optimizer.step();
  }
  const auto state_a = *optimizer.state_of("a.lora_A.weight");
  const auto state_b = *optimizer.state_of("b.lora_A.weight");
  const auto state_bB = *optimizer.state_of("b.lora_B.weight");
  const double scale_a = bank.layers[0].scale(), scale_b = bank.layers[1].scale();
  // What module b computes without its two lowest ranks (0 and 1), and what module a computes now.
  for (LoRA<float>& l : bank.layers) l.set_training(false);
  bank.layers[1].set_gate(0, 0.0);
  bank.layers[1].set_gate(1, 0.0);
  Matrix<float> expected_a, expected_b;
  bank.layers[0].forward(x, expected_a);
  bank.layers[1].forward(x, expected_b);
  bank.layers[1].reset_gates();

  RankAllocator<float> allocator(bank.modules(), scripted, schedule(1, 1, 1, 2), rng);
  allocator.add_optimizer(optimizer);
  REQUIRE(allocator.step() == Status::Ok);
  REQUIRE(bank.ranks() == std::vector<Index>{6, 2});
  Matrix<float> after_a, after_b;
  bank.layers[0].forward(x, after_a);
  bank.layers[1].forward(x, after_b);
  CHECK_THAT(after_a, rankwise::test_support::is_close_to(expected_a, 1e-6, 1e-6));  // new ranks: B = 0
  CHECK_THAT(after_b, rankwise::test_support::is_close_to(expected_b, 1e-6, 1e-6));
  CHECK(bank.layers[0].scale() == scale_a);  // alpha / r_init, unchanged
  CHECK(bank.layers[1].scale() == scale_b);
  CHECK(bank.layers[0].B().rightCols(2).isZero(0));
  // Surviving ranks keep their moments; the new ones start from zero.
  const auto& new_a = *optimizer.state_of("a.lora_A.weight");
  CHECK(new_a.m.topRows(4) == state_a.m);
  CHECK(new_a.v.topRows(4) == state_a.v);
  CHECK(new_a.m.bottomRows(2).isZero(0));
  const auto& new_b = *optimizer.state_of("b.lora_A.weight");
  CHECK(new_b.m == state_b.m.bottomRows(2));
  CHECK(new_b.v == state_b.v.bottomRows(2));
  CHECK(optimizer.state_of("b.lora_B.weight")->m == state_bB.m.rightCols(2));
  CHECK(scripted.followed == 4);  // two surgeries, each changing A and B
  optimizer.step();                // and the optimizer accepts the new shapes
}

TEST_CASE("RankAllocator: the same seed gives the same allocation and the same weights", "[rank][allocator]") {
  const auto run = [](std::uint64_t seed) {
    Bank bank;
    bank.rng.reseed(seed);
    for (int m = 0; m < 3; ++m) bank.add(6, 6, 2, path_of("l.", std::size_t(m)));
    Random data(seed + 1);
    const Matrix<float> x_val = random_matrix<float>(6, 8, data);
    const Matrix<float> target = random_matrix<float>(6, 8, data);
    const auto loss = [&]() {
      double total = 0.0;
      Matrix<float> y;
      for (LoRA<float>& l : bank.layers) {
        l.forward(x_val, y);
        total += (y - target).cast<double>().squaredNorm();
      }
      return total;
    };
    rankwise::AblationImportance<float> ablation(loss);
    rankwise::AdamW<float> optimizer(bank.parameters(), {.lr = 1e-2});
    Random rng(seed + 2);
    RankAllocator<float> allocator(bank.modules(), ablation, schedule(3, 2, 3, 1), rng);
    allocator.add_optimizer(optimizer);
    Matrix<float> y, dx;
    for (int t = 0; t < 10; ++t) {
      const Matrix<float> x = random_matrix<float>(6, 8, data);
      for (LoRA<float>& l : bank.layers) {
        l.zero_grad();
        l.set_training(true);
        l.forward(x, y);
        l.backward(y - target, dx);
      }
      optimizer.step();
      allocator.step();
    }
    std::vector<Matrix<float>> weights;
    for (LoRA<float>& l : bank.layers) {
      weights.push_back(l.A());
      weights.push_back(l.B());
    }
    return std::make_pair(allocator.format_events(), weights);
  };
  const auto a = run(21), b = run(21), c = run(22);
  CHECK(a.first == b.first);
  CHECK(a.second == b.second);
  CHECK(a.first != c.first);
}

TEST_CASE("RankAllocator: a budget smaller than the number of modules leaves modules at rank 0", "[rank][allocator]") {
  Bank bank;
  for (int m = 0; m < 6; ++m) bank.add(5, 5, 1, path_of("m", std::size_t(m)));
  // Budget 4 over 6 modules: two modules start at rank 0 (uniform_ranks(4, 6) = 1 1 1 1 0 0).
  const Index none[] = {0};
  bank.layers[4].remove_ranks(none);
  bank.layers[5].remove_ranks(none);
  ScriptedImportance scripted(by_module({0.0, 1.0, 2.0, 3.0, 4.0, 5.0}));
  Random rng(8);
  RankAllocatorOptions options = schedule(1, 1, 3, 1);
  options.budget = 4;
  RankAllocator<float> allocator(bank.modules(), scripted, options, rng);
  CHECK(allocator.used() == 4);
  CHECK(allocator.trainable_parameters() == 4 * 10);
  for (int t = 0; t < 3; ++t) {
    allocator.step();
    CHECK(allocator.used() <= 4);
  }
  // Each round the lowest module (m0, then m1, m2) loses its rank; the highest-mean receiver with
  // ranks (m3) gains it, because empty modules come last.
  CHECK(bank.ranks() == std::vector<Index>{0, 0, 0, 4, 0, 0});
  CHECK(allocator.trainable_parameters() == 40);
}

TEST_CASE("RankAllocator: when every module loses a rank the total shrinks", "[rank][allocator]") {
  Bank bank;
  for (int m = 0; m < 3; ++m) bank.add(6, 6, 3, path_of("m", std::size_t(m)));
  // Each module's rank 0 is among the three lowest scores.
  ScriptedImportance scripted([](std::span<RankModule<float>> modules) {
    Scores s(modules.size());
    for (std::size_t m = 0; m < modules.size(); ++m)
      for (Index i = 0; i < modules[m].rank(); ++i) s[m].push_back(i == 0 ? -1.0 - double(m) : 10.0);
    return s;
  });
  Random rng(9);
  RankAllocator<float> allocator(bank.modules(), scripted, schedule(1, 1, 1, 3), rng);
  allocator.step();
  CHECK(bank.ranks() == std::vector<Index>{2, 2, 2});
  CHECK(allocator.used() == 6);
  CHECK(allocator.events()[0].added == std::vector<Index>{0, 0, 0});
}

TEST_CASE("RankAllocator: a parameter budget weights ranks by in + out and is never exceeded", "[rank][allocator]") {
  Bank bank;
  bank.add(16, 16, 4, "wide");   // 32 per rank
  bank.add(4, 6, 4, "narrow");   // 10 per rank
  bank.add(8, 8, 4, "middle");   // 16 per rank
  ScriptedImportance scripted(by_module({0.0, 2.0, 1.0}));
  Random rng(10);
  RankAllocatorOptions options = schedule(1, 1, 3, 1);
  options.budget_unit = BudgetUnit::Parameters;
  RankAllocator<float> allocator(bank.modules(), scripted, options, rng);
  CHECK(allocator.budget() == 4 * 32 + 4 * 10 + 4 * 16);
  for (int t = 0; t < 3; ++t) {
    allocator.step();
    CHECK(allocator.used() <= allocator.budget());
    CHECK(allocator.used() == allocator.trainable_parameters());
  }
  // Round 1 frees 32 from "wide": narrow (max 4, full) is skipped, middle gains 2 (32 = 2 x 16).
  CHECK(allocator.events()[0].added == std::vector<Index>{0, 0, 2});
  CHECK(bank.ranks()[0] == 1);
}

TEST_CASE("RankAllocator: prune-only follows the cubic budget down and never adds", "[rank][allocator]") {
  Bank bank;
  for (int m = 0; m < 3; ++m) bank.add(10, 10, 6, path_of("m", std::size_t(m)));
  ScriptedImportance scripted(by_module({0.0, 2.0, 1.0}));
  Random rng(12);
  RankAllocatorOptions options;
  options.policy = AllocationPolicy::PruneOnly;
  options.budget = 12;  // from 18: AdaLoRA's 1.5 x
  options.warmup_steps = 5;
  options.total_steps = 40;
  options.final_steps = 10;
  options.prune_interval = 3;
  RankAllocator<float> allocator(bank.modules(), scripted, options, rng);
  // b(t) = 12 + floor(6 (1 - (t - 5) / 25)^3) between t_i and T - t_f.
  CHECK(allocator.budget_at(5) == 18);
  CHECK(allocator.budget_at(10) == 12 + Index(std::floor(6.0 * std::pow(1.0 - 5.0 / 25.0, 3))));
  CHECK(allocator.budget_at(20) == 12 + Index(std::floor(6.0 * std::pow(1.0 - 15.0 / 25.0, 3))));
  CHECK(allocator.budget_at(30) == 12);
  Index previous = allocator.total_ranks();
  for (long t = 1; t <= 40; ++t) {
    allocator.step();
    CHECK(allocator.total_ranks() <= previous);  // never adds
    if (allocator.acted_at_last_step() || t >= 30) CHECK(allocator.total_ranks() <= allocator.budget_at(t));
    previous = allocator.total_ranks();
    if (t <= 5) CHECK(allocator.total_ranks() == 18);
  }
  CHECK(allocator.total_ranks() == 12);
  CHECK(allocator.is_done());
  for (const rankwise::AllocationEvent& e : allocator.events()) CHECK(e.added == std::vector<Index>{0, 0, 0});
  CHECK(bank.ranks() == std::vector<Index>{0, 6, 6});  // m0 scores lowest throughout
  CHECK(allocator.finish() == Status::Ok);
}

TEST_CASE("RankAllocator: a run that ends before the allocator acted says so", "[rank][allocator]") {
  Bank bank;
  bank.add(6, 6, 2, "a");
  bank.add(6, 6, 2, "b");
  ScriptedImportance scripted(by_module({0.0, 1.0}));
  Random rng(13);
  SECTION("no round") {
    RankAllocator<float> allocator(bank.modules(), scripted, schedule(100, 10, 2, 1), rng);
    for (int t = 0; t < 50; ++t) allocator.step();
    CHECK(allocator.finish() == Status::NotApplied);
    CHECK_THAT(allocator.message(), Catch::Contains("never acted") && Catch::Contains("step 50") &&
                                        Catch::Contains("due at step 100"));
    CHECK(bank.ranks() == std::vector<Index>{2, 2});
    CHECK_THROWS_WITH(allocator.step(), Catch::Contains("step() after finish()"));
  }
  SECTION("some rounds") {
    RankAllocator<float> allocator(bank.modules(), scripted, schedule(5, 10, 3, 1), rng);
    for (int t = 0; t < 20; ++t) allocator.step();
    CHECK(allocator.finish() == Status::Ok);
    CHECK_THAT(allocator.message(), Catch::Contains("ran 2 of 3 rounds"));
  }
  SECTION("prune-only that did not reach its budget") {
    RankAllocatorOptions options;
    options.policy = AllocationPolicy::PruneOnly;
    options.budget = 2;
    options.total_steps = 100;
    options.warmup_steps = 50;
    RankAllocator<float> allocator(bank.modules(), scripted, options, rng);
    for (int t = 0; t < 60; ++t) allocator.step();
    CHECK(allocator.finish() == Status::NotApplied);
    CHECK_THAT(allocator.message(), Catch::Contains("above its budget"));
  }
}

TEST_CASE("RankAllocator: a failing validation leaves the adapters exactly as they were", "[rank][allocator][errors]") {
  Bank bank;
  bank.add(6, 5, 3, "a");
  bank.add(6, 5, 3, "b");
  const Matrix<float> x = random_matrix<float>(6, 4, bank.rng);
  const auto snapshot = [&] {
    std::vector<Matrix<float>> s;
    for (LoRA<float>& l : bank.layers) {
      s.push_back(l.A());
      s.push_back(l.B());
      s.push_back(l.gates());
    }
    return s;
  };
  const std::vector<Matrix<float>> before = snapshot();
  int calls = 0;
  bool fail_with_nan = true;
  bool healthy = false;
  rankwise::AblationImportance<float> ablation([&]() -> double {
    ++calls;
    if (!healthy && calls == 5) {
      if (fail_with_nan) return std::numeric_limits<double>::quiet_NaN();
      throw std::runtime_error("validation data missing");
    }
    Matrix<float> y;
    double total = 0.0;
    for (LoRA<float>& l : bank.layers) {
      l.forward(x, y);
      total += y.cast<double>().squaredNorm();
    }
    return total;
  });
  Random rng(14);
  RankAllocator<float> allocator(bank.modules(), ablation, schedule(2, 3, 1, 1), rng);
  allocator.step();
  SECTION("NaN: Status::NonFinite, an event, a retry K2 steps later") {
    CHECK(allocator.step() == Status::NonFinite);
    CHECK(snapshot() == before);
    CHECK(allocator.status() == Status::NonFinite);
    CHECK_THAT(allocator.message(), Catch::Contains("nan"));
    REQUIRE(allocator.events().size() == 1);
    CHECK(allocator.events()[0].status == Status::NonFinite);
    CHECK(allocator.next_round_step() == 5);
    healthy = true;
    allocator.step();
    allocator.step();
    CHECK(allocator.rounds_done() == 0);
    CHECK(allocator.step() == Status::Ok);  // step 5: the retry succeeds
    CHECK(allocator.rounds_done() == 1);
    CHECK(allocator.status() == Status::Ok);
  }
  SECTION("an exception: rethrown as rankwise::Error") {
    fail_with_nan = false;
    CHECK_THROWS_WITH(allocator.step(), Catch::Contains("[rankwise::AblationImportance]") && Catch::Contains("threw"));
    CHECK(snapshot() == before);
    CHECK(allocator.rounds_done() == 0);
    CHECK(allocator.events().empty());
  }
}

TEST_CASE("RankAllocator: invalid budgets, schedules and modules are rejected, nothing changed",
          "[rank][allocator][errors]") {
  Bank bank;
  bank.add(4, 3, 2, "a");
  bank.add(4, 3, 2, "b");
  ScriptedImportance scripted(by_module({0.0, 1.0}));
  Random rng(15);
  const auto make = [&](const RankAllocatorOptions& o) { RankAllocator<float> a(bank.modules(), scripted, o, rng); };
  RankAllocatorOptions o = schedule(1, 1, 1, 1);
  o.budget = 0;
  CHECK_THROWS_WITH(make(o), Catch::Contains("[rankwise::RankAllocator]") && Catch::Contains("[1, capacity = 6]") &&
                                 Catch::Contains("got 0"));
  o.budget = 7;
  CHECK_THROWS_WITH(make(o), Catch::Contains("got 7"));
  o.budget = 3;
  CHECK_THROWS_WITH(make(o), Catch::Contains("the modules hold 4") && Catch::Contains("above the budget of 3"));
  o = schedule(1, 1, 1, 5);
  CHECK_THROWS_WITH(make(o), Catch::Contains("ranks_per_round (n_A) must be in [1, active ranks = 4] (got 5)"));
  CHECK_THROWS_WITH(make(schedule(0, 1, 1, 1)), Catch::Contains("warmup_steps (K1) must be >= 1"));
  CHECK_THROWS_WITH(make(schedule(1, 0, 1, 1)), Catch::Contains("recovery_steps (K2) must be >= 1"));
  CHECK_THROWS_WITH(make(schedule(1, 1, 0, 1)), Catch::Contains("rounds (N_A) must be >= 1"));
  o = schedule(10, 10, 3, 1);
  o.total_steps = 25;
  CHECK_THROWS_WITH(make(o), Catch::Contains("round 3 is due at step 30 but total_steps is 25"));
  o = RankAllocatorOptions{};
  o.policy = AllocationPolicy::PruneOnly;
  o.total_steps = 10;
  CHECK_THROWS_WITH(make(o), Catch::Contains("prune-only needs an explicit budget"));
  o.budget = 4;
  CHECK_THROWS_WITH(make(o), Catch::Contains("must start above its budget"));
  o.budget = 2;
  o.total_steps = 0;
  CHECK_THROWS_WITH(make(o), Catch::Contains("total_steps > warmup_steps + final_steps"));
  // Modules: duplicate paths, the same adapter twice, no modules, a merged adapter.
  std::vector<RankModule<float>> twice{RankModule<float>(bank.layers[0], "x"), RankModule<float>(bank.layers[1], "x")};
  CHECK_THROWS_WITH(RankAllocator<float>(twice, scripted, schedule(1, 1, 1, 1), rng), Catch::Contains("unique"));
  std::vector<RankModule<float>> same{RankModule<float>(bank.layers[0], "x"), RankModule<float>(bank.layers[0], "y")};
  CHECK_THROWS_WITH(RankAllocator<float>(same, scripted, schedule(1, 1, 1, 1), rng),
                    Catch::Contains("are the same adapter"));
  CHECK_THROWS_WITH(RankAllocator<float>({}, scripted, schedule(1, 1, 1, 1), rng), Catch::Contains("at least one module"));
  RankAllocator<float> allocator(bank.modules(), scripted, schedule(1, 1, 1, 1), rng);
  bank.layers[1].merge();
  CHECK_THROWS_AS(allocator.step(), rankwise::StateError);
  CHECK(scripted.calls == 0);
  bank.layers[1].unmerge();
  CHECK(bank.ranks() == std::vector<Index>{2, 2});
  // An estimator that returns scores of the wrong shape is caught before any surgery.
  ScriptedImportance wrong([](std::span<RankModule<float>>) { return Scores{{1.0}}; });
  RankAllocator<float> with_wrong(bank.modules(), wrong, schedule(1, 1, 1, 1), rng);
  CHECK_THROWS_WITH(with_wrong.step(), Catch::Contains("returned scores for 1 modules, expected 2"));
  CHECK(bank.ranks() == std::vector<Index>{2, 2});
  CHECK_THROWS_WITH(allocator.add_follower(nullptr), Catch::Contains("empty function"));
}

// --- planted ranks ------------------------------------------------------------------------------

namespace {

// Six independent 16 x 16 layers whose targets are base + a delta of known rank (6, 3, 1, 0, 2, 4),
// observed with noise (sd 0.3). LoRA starts uniform at the true total (16 ranks); AdamW trains all.
struct Planted {
  static constexpr Index d = 16, tokens = 64;
  const std::vector<Index> truth{6, 3, 1, 0, 2, 4};
  Random rng;
  Random data;
  std::deque<LoRA<float>> layers;
  std::vector<Matrix<float>> target_weight;
  Matrix<float> x_val;
  std::vector<Matrix<float>> val_noise;

  explicit Planted(std::uint64_t seed) : rng(seed) {
    const std::vector<Index> start = rankwise::uniform_ranks(16, 6);
    for (std::size_t m = 0; m < truth.size(); ++m) {
      Linear<float> base(d, d, rng);
      Matrix<float> u(d, 6), v(6, d);
      rankwise::fill_normal(u, 0.0, 0.5, rng);
      rankwise::fill_normal(v, 0.0, 0.5, rng);
      target_weight.push_back(base.weight() + u.leftCols(truth[m]) * v.topRows(truth[m]));
      layers.emplace_back(base, rankwise::LoRAOptions{.rank = start[m], .alpha = 2.0 * double(start[m])}, rng);
      layers.back().set_path(path_of("layers.", std::size_t(m), ".proj"));
    }
    data = rng.fork();
    x_val = random_matrix<float>(d, tokens, data);
    for (std::size_t m = 0; m < truth.size(); ++m) {
      val_noise.emplace_back(d, tokens);
      rankwise::fill_normal(val_noise.back(), 0.0, 0.3, data);
    }
  }

  std::vector<RankModule<float>> modules() {
    std::vector<RankModule<float>> out;
    for (std::size_t m = 0; m < layers.size(); ++m) out.emplace_back(layers[m], path_of("layers.", std::size_t(m), ".proj"));
    return out;
  }

  Matrix<float> target(std::size_t m, const Matrix<float>& x) const {
    Matrix<float> t = target_weight[m] * x;
    t.colwise() += layers[m].base().bias().col(0);
    return t;
  }

  // Half the mean squared error summed over layers, in double; noisy (validation) or clean (fit).
  double loss(const Matrix<float>& x, bool with_noise) {
    double total = 0.0;
    Matrix<float> y;
    for (std::size_t m = 0; m < layers.size(); ++m) {
      layers[m].forward(x, y);
      Matrix<float> diff = y - target(m, x);
      if (with_noise) diff -= val_noise[m];
      total += 0.5 * diff.cast<double>().squaredNorm() / double(x.cols());
    }
    return total;
  }

  // Trains `steps` steps (with the allocator's hook when given) and returns the clean fit loss.
  double train(long steps, RankAllocator<float>* allocator, rankwise::AdamW<float>& optimizer) {
    Matrix<float> x(d, tokens), noise(d, tokens), y, dx;
    for (long t = 0; t < steps; ++t) {
      rankwise::fill_normal(x, 0.0, 1.0, data);
      for (std::size_t m = 0; m < layers.size(); ++m) {
        rankwise::fill_normal(noise, 0.0, 0.3, data);
        layers[m].zero_grad();
        layers[m].set_training(true);
        layers[m].forward(x, y);
        layers[m].backward((y - target(m, x) - noise) / float(tokens), dx);
      }
      optimizer.step();
      if (allocator) allocator->step();
    }
    for (LoRA<float>& l : layers) l.set_training(false);
    Random test_data(99);
    return loss(random_matrix<float>(d, 256, test_data), false);
  }

  std::vector<rankwise::Parameter<float>*> parameters() {
    std::vector<rankwise::Parameter<float>*> out;
    for (LoRA<float>& l : layers) {
      out.push_back(&l.A_parameter());
      out.push_back(&l.B_parameter());
    }
    return out;
  }
};

// Spearman's rank correlation, ties given their average rank.
double spearman(const std::vector<double>& a, const std::vector<double>& b) {
  const auto ranks = [](const std::vector<double>& v) {
    std::vector<double> r(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) {
      double below = 0, equal = 0;
      for (double w : v) {
        if (w < v[i]) below += 1;
        if (w == v[i]) equal += 1;
      }
      r[i] = below + (equal + 1) / 2;
    }
    return r;
  };
  const std::vector<double> ra = ranks(a), rb = ranks(b);
  const double n = double(ra.size());
  double ma = 0, mb = 0;
  for (std::size_t i = 0; i < ra.size(); ++i) {
    ma += ra[i] / n;
    mb += rb[i] / n;
  }
  double c = 0, va = 0, vb = 0;
  for (std::size_t i = 0; i < ra.size(); ++i) {
    c += (ra[i] - ma) * (rb[i] - mb);
    va += (ra[i] - ma) * (ra[i] - ma);
    vb += (rb[i] - mb) * (rb[i] - mb);
  }
  return c / std::sqrt(va * vb);
}

constexpr long planted_steps = 700;  // K1 = 150, 8 rounds K2 = 50 apart (last at 500), then 200 more

struct PlantedOutcome {
  std::vector<double> final_ranks;
  std::vector<double> truth;
  double fit = 0.0;
  double uniform_fit = 0.0;
  std::string table;
};

// The fit of uniform LoRA on the planted problem of `seed`: what every allocator is set against.
double uniform_fit(std::uint64_t seed) {
  Planted uniform(seed);
  rankwise::AdamW<float> optimizer(uniform.parameters(), {.lr = 1e-2, .weight_decay = 0.0});
  return uniform.train(planted_steps, nullptr, optimizer);
}

// The final ranks against the planted ones, and the allocator's tables for a failure's report.
void record_allocation(PlantedOutcome& out, const Planted& planted, const RankAllocator<float>& allocator) {
  for (std::size_t m = 0; m < planted.truth.size(); ++m) {
    out.final_ranks.push_back(double(planted.layers[m].rank()));
    out.truth.push_back(double(planted.truth[m]));
  }
  out.table = allocator.format_table() + allocator.format_events();
}

PlantedOutcome run_planted(std::uint64_t seed, bool sensitivity) {
  PlantedOutcome out;
  out.uniform_fit = uniform_fit(seed);
  Planted planted(seed);
  rankwise::AblationImportance<float> ablation([&] { return planted.loss(planted.x_val, true); });
  rankwise::SensitivityImportance<float> sensitivity_estimator;
  rankwise::ImportanceEstimator<float>& estimator =
      sensitivity ? static_cast<rankwise::ImportanceEstimator<float>&>(sensitivity_estimator) : ablation;
  rankwise::AdamW<float> optimizer(planted.parameters(), {.lr = 1e-2, .weight_decay = 0.0});
  RankAllocatorOptions options = schedule(150, 50, 8, 2);
  options.total_steps = planted_steps;
  Random rng(seed + 100);
  RankAllocator<float> allocator(planted.modules(), estimator, options, rng);
  allocator.add_optimizer(optimizer);
  out.fit = planted.train(planted_steps, &allocator, optimizer);
  CHECK(allocator.finish() == Status::Ok);
  CHECK(allocator.rounds_done() == 8);
  CHECK(allocator.total_ranks() <= 16);
  record_allocation(out, planted, allocator);
  return out;
}

}  // namespace

TEST_CASE("RankAllocator: AB-LoRA scores find planted per-layer ranks and beat uniform LoRA",
          "[rank][allocator][planted]") {
  const PlantedOutcome out = run_planted(2, /*sensitivity=*/false);
  INFO(out.table);
  CAPTURE(out.fit, out.uniform_fit);
  CHECK(spearman(out.final_ranks, out.truth) >= 0.8);
  CHECK(out.fit < out.uniform_fit);
}

TEST_CASE("RankAllocator: sensitivity scores find planted per-layer ranks and beat uniform LoRA",
          "[rank][allocator][planted]") {
  const PlantedOutcome out = run_planted(2, /*sensitivity=*/true);
  INFO(out.table);
  CAPTURE(out.fit, out.uniform_fit);
  CHECK(spearman(out.final_ranks, out.truth) >= 0.8);
  CHECK(out.fit < out.uniform_fit);
}

PlantedOutcome run_planted_gain(std::uint64_t seed, Index* pruned_recent = nullptr) {
  PlantedOutcome out;
  out.uniform_fit = uniform_fit(seed);
  Planted planted(seed);
  rankwise::AblationImportance<float> ablation([&] { return planted.loss(planted.x_val, true); },
                                               {.leave_one_out = true});
  rankwise::AdamW<float> optimizer(planted.parameters(), {.lr = 1e-2, .weight_decay = 0.0});
  const RankAllocatorOptions options = rankwise::gain_over_cost_schedule(planted_steps);
  Random rng(seed + 100);
  RankAllocator<float> allocator(planted.modules(), ablation, options, rng);
  allocator.add_optimizer(optimizer);
  out.fit = planted.train(planted_steps, &allocator, optimizer);
  CHECK(allocator.finish() == Status::Ok);
  CHECK(allocator.rounds_done() == options.rounds);
  CHECK(allocator.total_ranks() <= 16);
  Index recent = 0;
  for (const rankwise::AllocationEvent& e : allocator.events()) recent += e.pruned_recent;
  if (pruned_recent) *pruned_recent = recent;
  record_allocation(out, planted, allocator);
  return out;
}

TEST_CASE("RankAllocator: gain over cost finds planted per-layer ranks, beats uniform LoRA, and settles",
          "[rank][allocator][planted][gain]") {
  Index recent = -1;
  const PlantedOutcome out = run_planted_gain(2, &recent);
  INFO(out.table);
  CAPTURE(out.fit, out.uniform_fit);
  CHECK(spearman(out.final_ranks, out.truth) >= 0.8);
  CHECK(out.fit < out.uniform_fit);
  CHECK(recent == 0);  // no rank added at one round is pruned at the next
}

TEST_CASE("RankAllocator: gain over cost holds the budget, keeps trial ranks inside their window, and a failed "
          "round leaves the ranks as they were", "[rank][allocator][gain]") {
  Planted planted(3);
  bool throw_now = false;
  rankwise::AblationImportance<float> ablation(
      [&] {
        if (throw_now) throw std::runtime_error("validation data went away");
        return planted.loss(planted.x_val, true);
      },
      {.leave_one_out = true});
  rankwise::AdamW<float> optimizer(planted.parameters(), {.lr = 1e-2, .weight_decay = 0.0});
  RankAllocatorOptions options = rankwise::gain_over_cost_schedule(200);  // K1 40, K2 25, trial 12, sketch 6
  Random rng(7);
  RankAllocator<float> allocator(planted.modules(), ablation, options, rng);
  allocator.add_optimizer(optimizer);
  CHECK(allocator.budget() == 16);
  Matrix<float> x(Planted::d, Planted::tokens), y, dx;
  Index most = 0;
  for (long t = 1; t <= 200; ++t) {
    rankwise::fill_normal(x, 0.0, 1.0, planted.data);
    for (std::size_t m = 0; m < planted.layers.size(); ++m) {
      planted.layers[m].zero_grad();
      planted.layers[m].forward(x, y);
      planted.layers[m].backward((y - planted.target(m, x)) / float(Planted::tokens), dx);
    }
    optimizer.step();
    throw_now = t == 90;  // rounds are due at steps 40, 65, 90, ...: the third one fails
    if (throw_now) {
      CHECK_THROWS_WITH(allocator.step(), Catch::Contains("the validation callable threw"));
      CHECK(allocator.total_ranks() == 16);  // the trial ranks are gone again
      continue;
    }
    allocator.step();
    most = std::max(most, allocator.total_ranks());
    if (allocator.total_ranks() > 16) CHECK(allocator.total_ranks() == 16 + 6);  // one trial rank per module
    if (!allocator.events().empty() && allocator.events().back().step == t) CHECK(allocator.used() <= 16);
  }
  CHECK(most == 22);
  CHECK(allocator.finish() == Status::Ok);
  CHECK(allocator.total_ranks() <= 16);
  CHECK(allocator.rank_births().size() == 6);
}

TEST_CASE("RankAllocator: gain-over-cost options are checked", "[rank][allocator][gain][errors]") {
  Planted planted(4);
  rankwise::AblationImportance<float> ablation([&] { return planted.loss(planted.x_val, true); });
  Random rng(1);
  const auto refuses = [&](RankAllocatorOptions o, const char* what) {
    CAPTURE(what);
    CHECK_THROWS_WITH(RankAllocator<float>(planted.modules(), ablation, o, rng), Catch::Contains(what));
  };
  const RankAllocatorOptions good = rankwise::gain_over_cost_schedule(200);
  RankAllocatorOptions o = good;
  o.gain_ratio = 0.0;
  refuses(o, "gain_ratio must be finite and > 0 (got 0)");
  o = good;
  o.min_rank_age = -2;
  refuses(o, "min_rank_age must be >= 0, or -1");
  o = good;
  o.probe_rank = 0;
  refuses(o, "probe_rank must be >= 1 (got 0)");
  o = good;
  o.trial_steps = -1;
  refuses(o, "trial_steps must be >= 0 (got -1)");
  o = good;
  o.budget = 10;
  refuses(o, "above the budget of 10");
  o = good;
  o.rounds = 20;
  refuses(o, "the schedule does not fit");
  CHECK_THROWS_WITH(rankwise::gain_over_cost_schedule(7), Catch::Contains("total_steps must be >= 8 (got 7)"));
}

// Not run by default: the planted-rank tests above use one seed; this checks that they are not
// tuned to it (`rankwise_tests "[planted-seeds]"`, about 20 s). Measured: the fit beats uniform LoRA
// for all 32 runs; Spearman >= 0.8 for 16/16 seeds with sensitivity and 15/16 with ablation (seed 9
// ends in a two-round cycle at 0.67: ranks added to under-ranked modules capture small singular
// directions and score below the redundant ranks of an over-ranked module, then move back).
// The recommended allocation: the adapters start at three times the uniform ranks (the extra ranks
// drawn from their own stream, so that the targets are those of the other runs) and are pruned by drop
// costs (measured on the validation batch, or predicted from the training gradients: Fisher) to the
// same total of 16 ranks. Measured with Fisher scores: Spearman >= 0.93 and a better fit than uniform
// LoRA on 16 of 16 seeds.
PlantedOutcome run_planted_pruning(std::uint64_t seed, bool fisher = false) {
  PlantedOutcome out;
  out.uniform_fit = uniform_fit(seed);
  Planted planted(seed);
  Random extra(seed + 200);
  for (LoRA<float>& l : planted.layers) l.add_ranks(2 * l.rank(), extra);
  rankwise::AblationImportance<float> drop_costs([&] { return planted.loss(planted.x_val, true); },
                                                 {.leave_one_out = true});
  rankwise::FisherImportance<float> predicted;
  rankwise::ImportanceEstimator<float>& estimator =
      fisher ? static_cast<rankwise::ImportanceEstimator<float>&>(predicted) : drop_costs;
  rankwise::AdamW<float> optimizer(planted.parameters(), {.lr = 1e-2, .weight_decay = 0.0});
  RankAllocatorOptions options = rankwise::pruning_schedule(planted_steps);
  options.budget = 16;
  Random rng(seed + 100);
  RankAllocator<float> allocator(planted.modules(), estimator, options, rng);
  allocator.add_optimizer(optimizer);
  CHECK(allocator.total_ranks() == 48);
  out.fit = planted.train(planted_steps, &allocator, optimizer);
  CHECK(allocator.finish() == Status::Ok);
  CHECK(allocator.total_ranks() == 16);
  record_allocation(out, planted, allocator);
  return out;
}

TEST_CASE("RankAllocator: pruning by drop costs from above the budget finds planted ranks and beats uniform LoRA",
          "[rank][allocator][planted]") {
  const PlantedOutcome out = run_planted_pruning(2);
  INFO(out.table);
  CAPTURE(out.fit, out.uniform_fit);
  CHECK(spearman(out.final_ranks, out.truth) >= 0.8);
  CHECK(out.fit < out.uniform_fit);
  CHECK(out.final_ranks[3] <= 1.0);  // the layer planted at rank 0 keeps at most one rank
}

TEST_CASE("RankAllocator: pruning by Fisher drop costs finds planted ranks and beats uniform LoRA",
          "[rank][allocator][planted]") {
  const PlantedOutcome out = run_planted_pruning(2, true);
  INFO(out.table);
  CAPTURE(out.fit, out.uniform_fit);
  CHECK(spearman(out.final_ranks, out.truth) >= 0.8);
  CHECK(out.fit < out.uniform_fit);
  CHECK(out.final_ranks[3] <= 1.0);  // the layer planted at rank 0 keeps at most one rank
}

TEST_CASE("pruning_schedule: the recommended schedule scales with the run", "[rank][allocator]") {
  const RankAllocatorOptions o = rankwise::pruning_schedule(1200);
  CHECK(o.policy == rankwise::AllocationPolicy::PruneOnly);
  CHECK(o.warmup_steps == 200);
  CHECK(o.final_steps == 400);
  CHECK(o.prune_interval == 50);
  CHECK(o.total_steps == 1200);
  CHECK_FALSE(o.budget.has_value());
  CHECK_THROWS_WITH(rankwise::pruning_schedule(23), Catch::Contains("total_steps must be >= 24 (got 23)"));
}

TEST_CASE("RankAllocator: planted ranks are found for many seeds", "[.planted-seeds]") {
  // Every seed fits better than uniform LoRA; at least 15 of 16 reach Spearman >= 0.8.
  const auto survey = [](const std::string& label, const std::function<PlantedOutcome(std::uint64_t)>& run) {
    int found = 0;
    for (std::uint64_t seed = 1; seed <= 16; ++seed) {
      const PlantedOutcome out = run(seed);
      const double rho = spearman(out.final_ranks, out.truth);
      CAPTURE(label, seed, rho, out.fit, out.uniform_fit);
      CHECK(out.fit < out.uniform_fit);
      found += rho >= 0.8 ? 1 : 0;
      WARN(label << " seed " << seed << ": spearman " << rho << ", fit " << out.fit << " vs uniform "
                 << out.uniform_fit);
    }
    CAPTURE(label);
    CHECK(found >= 15);
  };
  survey("ablation", [](std::uint64_t seed) { return run_planted(seed, false); });
  survey("sensitivity", [](std::uint64_t seed) { return run_planted(seed, true); });
  survey("gain over cost", [](std::uint64_t seed) {
    Index recent = 0;
    const PlantedOutcome out = run_planted_gain(seed, &recent);
    CHECK(recent == 0);
    return out;
  });
  survey("pruning by measured drop costs", [](std::uint64_t seed) { return run_planted_pruning(seed, false); });
  survey("pruning by Fisher drop costs", [](std::uint64_t seed) { return run_planted_pruning(seed, true); });
}
