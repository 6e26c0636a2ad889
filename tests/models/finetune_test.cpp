// Tests for rankwise/models/finetune.hpp and rankwise/models/base_checkpoint.hpp.
#include <rankwise/models/base_checkpoint.hpp>
#include <rankwise/models/finetune.hpp>

#include "support/matchers.hpp"
#include "support/temp_dir.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <span>

#include <Eigen/Core>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

using rankwise::Finetuner;
using rankwise::FinetuneRecipe;
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::TokenBatch;
using rankwise::ToyTransformer;
using rankwise::ToyTransformerConfig;
using rankwise::test_support::TempDir;

namespace {
const ToyTransformerConfig kFinetuneModel{.vocab = 48, .d_model = 16, .heads = 2, .layers = 2, .d_ff = 32, .max_seq_len = 19};
const rankwise::TaskOptions kTask{.vocab = 48, .seq_len = 19, .letters = 8};
const std::vector<std::string> kKinds = {"lora", "dylora", "erat", "vera", "red", "melora", "alora"};

/// One thread, so that the same seed gives the same bits (Eigen's parallel products may not).
struct OneThread {
  int saved = Eigen::nbThreads();
  OneThread() { Eigen::setNbThreads(1); }
  ~OneThread() { Eigen::setNbThreads(saved); }
};

FinetuneRecipe tiny_recipe(const std::string& adapter, long steps = 40) {
  FinetuneRecipe r;
  r.adapter = adapter;
  r.rank = 4;
  r.alpha = 8.0;
  r.melora_n = 2;
  r.steps = steps;
  r.lr = adapter == "red" || adapter == "vera" ? 2e-2 : 1e-2;
  r.seed = 3;
  return r;
}

TokenBatch validation_batch() {
  const rankwise::TaskGenerator task(rankwise::TaskKind::Copy, kTask);
  Random rng(99);
  return task.sample(8, rng);
}

/// Runs `recipe` for its steps on the copy task; returns the loss curve.
std::vector<double> train(Finetuner<float>& tuner, std::uint64_t data_seed = 5) {
  const rankwise::TaskGenerator task(rankwise::TaskKind::Copy, kTask);
  Random rng(data_seed);
  for (long s = 0; s < tuner.recipe().steps; ++s) tuner.step(task.sample(8, rng));
  return tuner.losses();
}

double mean(const std::vector<double>& v, std::size_t begin, std::size_t end) {
  double sum = 0.0;
  for (std::size_t i = begin; i < end; ++i) sum += v[i];
  return sum / double(end - begin);
}

std::map<std::string, Matrix<float>> values_of(ToyTransformer<float>& model, bool trainable) {
  std::map<std::string, Matrix<float>> out;
  for (rankwise::Parameter<float>* p : model.parameters())
    if (p->trainable == trainable) out.emplace(p->name, p->value);
  return out;
}

/// The name a base tensor had before an adapter wrapped its layer.
std::string base_name(const std::string& name) {
  const std::string wrapped = ".base_layer.";
  const auto at = name.find(wrapped);
  return at == std::string::npos ? name : name.substr(0, at) + "." + name.substr(at + wrapped.size());
}

Matrix<float> eval_logits(ToyTransformer<float>& model, const TokenBatch& batch) {
  model.set_training(false);
  Matrix<float> logits;
  model.forward(batch.tokens, batch.seq_len, logits);
  model.set_training(true);
  return logits;
}

bool same(const Matrix<float>& a, const Matrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && a == b;
}

bool same(const std::map<std::string, Matrix<float>>& a, const std::map<std::string, Matrix<float>>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [name, value] : a) {
    auto it = b.find(name);
    if (it == b.end() || !same(value, it->second)) return false;
  }
  return true;
}

bool all_plain(ToyTransformer<float>& model) {
  bool plain = true;
  model.for_each_slot([&](const std::string&, rankwise::AnyLinear<float>& slot) { plain = plain && slot.kind() == "linear"; });
  for (rankwise::Parameter<float>* p : model.parameters()) plain = plain && p->trainable;
  return plain;
}
}  // namespace

TEST_CASE("Finetuner: every adapter kind lowers the loss and never moves a frozen weight", "[models][finetune]") {
  for (const std::string& kind : kKinds) {
    Random rng(7);
    ToyTransformer<float> model(kFinetuneModel, rng);
    const std::map<std::string, Matrix<float>> before = values_of(model, true);  // all trainable before injection
    Finetuner<float> tuner(model, tiny_recipe(kind), validation_batch());
    const std::map<std::string, Matrix<float>> trainable_at_start = values_of(model, true);
    const std::vector<double> curve = train(tuner);
    INFO(kind << ": loss " << mean(curve, 0, 5) << " -> " << mean(curve, 35, 40));
    CHECK(mean(curve, 35, 40) < 0.9 * mean(curve, 0, 5));
    CHECK(tuner.finish() == rankwise::Status::Ok);

    Index frozen = 0, moved = 0;
    for (rankwise::Parameter<float>* p : model.parameters()) {
      if (p->trainable) {
        auto it = trainable_at_start.find(p->name);
        moved += it == trainable_at_start.end() || !same(it->second, p->value);
        continue;
      }
      // Every frozen tensor is bit for bit the one the model had before the adapters came.
      const auto it = before.find(base_name(p->name));
      INFO(p->name);
      REQUIRE(it != before.end());
      CHECK(same(it->second, p->value));
      ++frozen;
    }
    CHECK(frozen > 0);
    CHECK(moved > 0);
  }
}

TEST_CASE("Finetuner: a fixed seed reproduces the loss curve bit for bit", "[models][finetune]") {
  OneThread one;
  for (const std::string kind : {"lora", "dylora", "erat", "alora", "vera"}) {
    const auto curve = [&](std::uint64_t seed) {
      Random rng(7);
      ToyTransformer<float> model(kFinetuneModel, rng);
      FinetuneRecipe recipe = tiny_recipe(kind, 30);
      recipe.seed = seed;
      Finetuner<float> tuner(model, recipe, validation_batch());
      return train(tuner);
    };
    const std::vector<double> a = curve(3), b = curve(3), c = curve(4);
    INFO(kind);
    CHECK(a == b);
    CHECK(a != c);  // the seed matters: the comparison above can fail
  }
}

TEST_CASE("Finetuner: the allocator acts, keeps the budget, and the run reports its ranks", "[models][finetune]") {
  Random rng(7);
  ToyTransformer<float> model(kFinetuneModel, rng);
  Finetuner<float> tuner(model, tiny_recipe("alora"), validation_batch());
  REQUIRE(tuner.allocator() != nullptr);
  const rankwise::TaskGenerator task(rankwise::TaskKind::Copy, kTask);
  Random data(5);
  long changes = 0;
  for (long s = 0; s < 40; ++s) {
    tuner.step(task.sample(8, data));
    changes += tuner.last_step().ranks_changed;
  }
  CHECK(changes == 4);  // K1 = 8, K2 = 4, N_A = 4: rounds after steps 8, 12, 16, 20
  CHECK(tuner.finish() == rankwise::Status::Ok);
  const rankwise::FinetuneReport report = tuner.report();
  const std::vector<Index> initial = tuner.allocator()->initial_ranks();
  std::vector<Index> now;
  Index total = 0;
  for (const auto& [path, rank] : report.ranks) {
    now.push_back(rank);
    total += rank;
  }
  CHECK(total == 12 * 4);  // the budget: 12 modules at rank 4
  CHECK(now != initial);
  CHECK(report.ranks.count("layers.1.mlp.down_proj") == 1);
  CHECK_THAT(report.allocation_table, Catch::Contains("total ranks"));
  // Trainable parameters follow the ranks: sum of r (in + out).
  Index expected = 0;
  for (const auto& m : tuner.adapters().modules()) {
    const auto& lora = m.slot->as<rankwise::LoRA<float>>();
    expected += lora.rank() * (lora.in_features() + lora.out_features());
  }
  CHECK(report.parameters.trainable == expected);
}

TEST_CASE("Finetuner: pruning by drop costs starts above the budget and ends at rank x modules", "[models][finetune]") {
  Random rng(7);
  ToyTransformer<float> model(kFinetuneModel, rng);
  FinetuneRecipe recipe = tiny_recipe("alora", 48);
  recipe.rank = 2;
  recipe.alpha = 4.0;
  recipe.importance = "drop_cost";
  recipe.validation_batches = 2;
  recipe.allocator = rankwise::pruning_schedule(recipe.steps);
  Finetuner<float> tuner(model, recipe, validation_batch());
  REQUIRE(tuner.allocator() != nullptr);
  for (const auto& m : tuner.adapters().modules()) {
    const auto& lora = m.slot->as<rankwise::LoRA<float>>();
    CHECK(lora.rank() == 6);                   // prune_start_factor 3 x rank 2
    CHECK(lora.scale() == Approx(4.0 / 2.0));  // alpha scaled alike: every rank keeps alpha / rank
  }
  CHECK(tuner.allocator()->budget() == 12 * 2);
  train(tuner);
  CHECK(tuner.finish() == rankwise::Status::Ok);
  CHECK(tuner.allocator()->total_ranks() == 24);
  // Every pruning event reports the standard errors of the pruned ranks' drop costs (two batches).
  bool any = false;
  for (const rankwise::AllocationEvent& e : tuner.allocator()->events())
    for (const rankwise::PrunedRank& p : e.pruned) {
      CHECK(std::isfinite(p.error));
      CHECK(p.error >= 0.0);
      any = true;
    }
  CHECK(any);
}

TEST_CASE("Finetuner: pruning by Fisher drop costs needs no validation batch, and a caller's hook runs every step",
          "[models][finetune]") {
  struct Counting final : rankwise::TrainingHook {
    long before = 0, after = 0, finished = 0, last_step = -1;
    const char* name() const override { return "counting"; }
    void before_step(long step) override {
      CHECK(step == last_step + 1);
      ++before;
    }
    void after_step(long step) override {
      last_step = step;
      ++after;
    }
    rankwise::Status finish() override {
      ++finished;
      return rankwise::Status::Ok;
    }
  };
  Random rng(7);
  ToyTransformer<float> model(kFinetuneModel, rng);
  FinetuneRecipe recipe = tiny_recipe("alora", 48);
  recipe.rank = 2;
  recipe.alpha = 4.0;
  recipe.importance = "fisher";
  recipe.allocator = rankwise::pruning_schedule(recipe.steps);
  Finetuner<float> tuner(model, recipe);  // no validation batch: the scores come from the training gradients
  Counting counting;
  tuner.add_hook(counting);
  train(tuner);
  CHECK(tuner.finish() == rankwise::Status::Ok);
  CHECK(counting.before == 48);
  CHECK(counting.after == 48);
  CHECK(counting.finished == 1);
  CHECK(tuner.allocator()->total_ranks() == 24);  // from 3 x 2 x 12 modules to 2 x 12
  CHECK(tuner.allocator()->events().size() >= 2);  // the budget was reached over several rounds
}

TEST_CASE("Finetuner: a caller's importance estimator scores the ranks", "[models][finetune]") {
  struct Counting final : rankwise::ImportanceEstimator<float> {
    int calls = 0;
    const char* name() const override { return "counting"; }
    rankwise::ImportanceScores score(std::span<rankwise::RankModule<float>> modules) override {
      ++calls;
      rankwise::ImportanceScores s;
      for (const rankwise::RankModule<float>& m : modules)
        s.scores.push_back(std::vector<double>(static_cast<std::size_t>(m.rank()), double(m.path().size())));
      return s;
    }
  };
  Random rng(7);
  ToyTransformer<float> model(kFinetuneModel, rng);
  auto estimator = std::make_shared<Counting>();
  Finetuner<float> tuner(model, tiny_recipe("alora"), validation_batch(), nullptr, estimator);
  train(tuner);
  CHECK(tuner.finish() == rankwise::Status::Ok);
  CHECK(estimator->calls == 4);  // the four rounds of the default schedule
}

TEST_CASE("Finetuner: an allocator that never acted is reported, not hidden", "[models][finetune]") {
  {
    Random rng(7);
    ToyTransformer<float> model(kFinetuneModel, rng);
    Finetuner<float> never_stepped(model, tiny_recipe("alora"), validation_batch());
    CHECK(never_stepped.finish() == rankwise::Status::NotApplied);
    CHECK_THAT(never_stepped.report().message,
               Catch::Contains("the allocator never acted: training ended at step 0 but the first round was due at step 8"));
  }
  Random rng(7);
  ToyTransformer<float> model(kFinetuneModel, rng);
  Finetuner<float> tuner(model, tiny_recipe("alora"), validation_batch());
  const rankwise::TaskGenerator task(rankwise::TaskKind::Copy, kTask);
  Random data(5);
  for (int s = 0; s < 5; ++s) tuner.step(task.sample(8, data));  // stops before K1 = 8
  CHECK(tuner.finish() == rankwise::Status::NotApplied);
  const rankwise::FinetuneReport report = tuner.report();
  CHECK(report.status == rankwise::Status::NotApplied);
  CHECK_THAT(report.message, Catch::Contains("never acted") && Catch::Contains("step 5"));
  CHECK(tuner.finish() == rankwise::Status::NotApplied);  // idempotent
  CHECK_THROWS_AS(tuner.step(task.sample(8, data)), rankwise::StateError);

  // A plain LoRA run has no allocator and finishes Ok.
  Random rng2(7);
  ToyTransformer<float> plain(kFinetuneModel, rng2);
  Finetuner<float> lora(plain, tiny_recipe("lora", 5));
  CHECK(lora.allocator() == nullptr);
  for (int s = 0; s < 5; ++s) lora.step(task.sample(8, data));
  CHECK_THROWS_WITH(lora.step(task.sample(8, data)), Catch::Contains("5 steps are done"));
  CHECK(lora.finish() == rankwise::Status::Ok);
}

TEST_CASE("Finetuner: bad recipes are rejected before the model changes", "[models][finetune][errors]") {
  Random rng(7);
  ToyTransformer<float> model(kFinetuneModel, rng);
  const TokenBatch validation = validation_batch();
  const auto rejects = [&](FinetuneRecipe recipe, const std::string& what, TokenBatch v = {}) {
    INFO(what);
    CHECK_THROWS_WITH(Finetuner<float>(model, recipe, v), Catch::Contains(what));
    CHECK_THROWS_WITH(Finetuner<float>::check_recipe(kFinetuneModel, recipe, v), Catch::Contains(what));
    CHECK(all_plain(model));
  };
  FinetuneRecipe r = tiny_recipe("ia3");
  rejects(r, "adapter must be one of lora, dylora, erat, vera, red, melora, alora (got \"ia3\")");
  r = tiny_recipe("lora");
  r.target_modules = {"c_attn"};
  rejects(r, "the target pattern matches no module; the module paths are: layers.0.attn.q_proj, ");
  r = tiny_recipe("lora");
  r.rank = 0;
  rejects(r, "rank must be >= 1 (got 0)");
  r.rank = 17;  // above min(in, out) = 16
  rejects(r, "module 'layers.0.attn.q_proj'");
  r = tiny_recipe("lora");
  r.steps = 0;
  rejects(r, "steps must be >= 1 (got 0)");
  r = tiny_recipe("lora");
  r.lr = -1.0;
  rejects(r, "lr must be a finite number > 0 (got -1)");
  r = tiny_recipe("alora");
  rejects(r, "needs a validation batch");
  r = tiny_recipe("lora");
  r.allocator = rankwise::RankAllocatorOptions{};
  rejects(r, "allocator options apply to adapter \"alora\"", validation);
  r = tiny_recipe("alora");
  r.allocator = rankwise::RankAllocatorOptions{};
  r.allocator->warmup_steps = 30;
  r.allocator->rounds = 8;
  r.allocator->recovery_steps = 5;
  rejects(r, "the schedule does not fit", validation);
  r = tiny_recipe("lora");
  r.options = rankwise::VeRAOptions{};
  rejects(r, "takes LoRAOptions (got VeRAOptions)");
  r = tiny_recipe("melora");
  r.melora_n = 3;  // 16 is not a multiple of 3
  rejects(r, "module 'layers.0.attn.q_proj'");
  r = tiny_recipe("alora");
  r.validation_batches = 9;  // the validation batch has 8 sequences
  rejects(r, "validation_batches must be in [1, sequences of the validation batch = 8] (got 9)", validation);
  r.validation_batches = 0;
  rejects(r, "validation_batches must be in [1, sequences of the validation batch = 8] (got 0)", validation);
  r = tiny_recipe("alora");
  r.importance = "entropy";
  rejects(r, "importance must be one of ablation, drop_cost, fisher, sensitivity, magnitude (got \"entropy\")", validation);
  r = tiny_recipe("alora");
  r.prune_start_factor = 1;
  rejects(r, "prune_start_factor must be >= 2 (got 1)", validation);
  r = tiny_recipe("alora");
  r.allocator = rankwise::pruning_schedule(r.steps);
  r.rank_pattern = {{"q_proj", 2}};
  rejects(r, "rank_pattern does not combine with a prune-only allocator", validation);
  TokenBatch long_validation = validation;
  long_validation.seq_len = 20;
  rejects(tiny_recipe("alora"), "longer than the model's context max_seq_len = 19", long_validation);

  Finetuner<float> first(model, tiny_recipe("lora"));
  CHECK_THROWS_WITH(Finetuner<float>(model, tiny_recipe("lora")), Catch::Contains("already holds adapters"));
}

TEST_CASE("Finetuner: a batch that does not fit the model is rejected and changes nothing", "[models][finetune][errors]") {
  OneThread one;
  const rankwise::TaskGenerator task(rankwise::TaskKind::Copy, kTask);
  const auto first_loss_after_bad_batches = [&](bool bad) {
    Random rng(7);
    ToyTransformer<float> model(kFinetuneModel, rng);
    Finetuner<float> tuner(model, tiny_recipe("dylora"), {});
    Random data(5);
    const TokenBatch good = task.sample(4, data);
    if (bad) {
      TokenBatch too_long = good;
      too_long.seq_len = 38;
      too_long.batch = 2;
      CHECK_THROWS_WITH(tuner.step(too_long), Catch::Contains("sequences of 38 tokens are longer than the model's "
                                                              "context max_seq_len = 19"));
      TokenBatch bad_id = good;
      bad_id.tokens[7] = 48;
      CHECK_THROWS_WITH(tuner.step(bad_id), Catch::Contains("token id 48 at position 7 is outside the vocabulary [0, 48)"));
      TokenBatch bad_target = good;
      bad_target.targets[3] = -2;
      CHECK_THROWS_WITH(tuner.step(bad_target), Catch::Contains("target -2 at position 3"));
      TokenBatch short_batch = good;
      short_batch.tokens.pop_back();
      CHECK_THROWS_WITH(tuner.step(short_batch), Catch::Contains("needs 76 tokens and targets (got 75 and 76)"));
      CHECK(tuner.steps_done() == 0);
    }
    tuner.step(good);
    return tuner.step(task.sample(4, data));
  };
  CHECK(first_loss_after_bad_batches(true) == first_loss_after_bad_batches(false));

  Random rng(7);
  ToyTransformer<float> model(kFinetuneModel, rng);
  const rankwise::TaskGenerator long_task(rankwise::TaskKind::Copy, {.vocab = 48, .seq_len = 24, .letters = 8});
  CHECK_THROWS_WITH(rankwise::evaluate_model(model, long_task, 8), Catch::Contains("longer than the model's context"));
}

namespace {
/// The soft-target form of cross-entropy with one-hot targets: the door for a teacher's distributions.
class OneHotSoftTargets final : public rankwise::TrainingLoss<float> {
 public:
  const char* name() const override { return "soft_one_hot"; }
  double forward_backward(const Matrix<float>& logits, const TokenBatch& batch, Matrix<float>& dlogits) override {
    const double loss = value(logits, batch);
    m_ce.backward(dlogits);
    return loss;
  }
  double value(const Matrix<float>& logits, const TokenBatch& batch) override {
    ++calls;
    m_q.setZero(logits.rows(), logits.cols());
    m_mask.assign(batch.targets.size(), 0);
    for (std::size_t t = 0; t < batch.targets.size(); ++t)
      if (batch.targets[t] != rankwise::ignore_index) {
        m_q(batch.targets[t], Index(t)) = 1.0f;
        m_mask[t] = 1;
      }
    return m_ce.forward_soft(logits, m_q, m_mask);
  }
  long calls = 0;

 private:
  rankwise::CrossEntropy<float> m_ce;
  Matrix<float> m_q;
  std::vector<std::uint8_t> m_mask;
};
}  // namespace

TEST_CASE("Finetuner: the loss is pluggable, for training and for the allocator's validation", "[models][finetune]") {
  OneThread one;
  const auto run = [](std::shared_ptr<rankwise::TrainingLoss<float>> loss) {
    Random rng(7);
    ToyTransformer<float> model(kFinetuneModel, rng);
    FinetuneRecipe recipe = tiny_recipe("alora", 12);
    recipe.allocator = rankwise::RankAllocatorOptions{};
    recipe.allocator->warmup_steps = 4;
    recipe.allocator->rounds = 1;
    recipe.allocator->recovery_steps = 1;
    Finetuner<float> tuner(model, recipe, validation_batch(), std::move(loss));
    return train(tuner);
  };
  auto soft = std::make_shared<OneHotSoftTargets>();
  const std::vector<double> hard_curve = run(nullptr), soft_curve = run(soft);
  REQUIRE(hard_curve.size() == soft_curve.size());
  for (std::size_t i = 0; i < hard_curve.size(); ++i) CHECK(soft_curve[i] == Approx(hard_curve[i]).epsilon(1e-4));
  // 12 training steps, and one AB-LoRA round: 2 R + 1 validation evaluations for R = 48 ranks.
  CHECK(soft->calls == 12 + 2 * 48 + 1);
}

TEST_CASE("ToyTransformer checkpoint: a base round-trips bit for bit, and one of another configuration is refused",
          "[models][base_checkpoint]") {
  TempDir dir("base_checkpoint");
  Random rng(1);
  ToyTransformer<float> model(kFinetuneModel, rng);
  const rankwise::PretrainRecipe recipe{.task_options = kTask, .steps = 6, .batch = 4, .seed = 2};
  const rankwise::PretrainResult result = rankwise::pretrain(model, recipe);
  CHECK(result.steps == 6);
  CHECK(result.skipped_steps == 0);
  rankwise::save_base_checkpoint(dir.path / "base", model, recipe, result);

  Random other_rng(2);
  ToyTransformer<float> fresh(kFinetuneModel, other_rng);
  const rankwise::BaseCheckpointInfo info = rankwise::load_base_checkpoint(dir.path / "base", fresh);
  CHECK(info.recipe["steps"] == 6);
  CHECK(info.result.final_loss == result.final_loss);
  const std::map<std::string, Matrix<float>> a = values_of(model, true), b = values_of(fresh, true);
  CHECK(same(a, b));
  const TokenBatch batch = validation_batch();
  CHECK(same(eval_logits(model, batch), eval_logits(fresh, batch)));

  ToyTransformerConfig wider = kFinetuneModel;
  wider.d_ff = 24;
  wider.layers = 3;
  ToyTransformer<float> other(wider, rng);
  const std::map<std::string, Matrix<float>> untouched = values_of(other, true);
  CHECK_THROWS_AS(rankwise::load_base_checkpoint(dir.path / "base", other), rankwise::FormatError);
  CHECK_THROWS_WITH(rankwise::load_base_checkpoint(dir.path / "base", other),
                    Catch::Contains("component 'model': was saved from a model of another configuration (layers 2, "
                                    "d_ff 32) than this model's (layers 3, d_ff 24)"));
  CHECK(same(values_of(other, true), untouched));

  Finetuner<float> tuner(fresh, tiny_recipe("lora"));
  CHECK_THROWS_WITH(rankwise::save_base_checkpoint(dir.path / "adapted", fresh, recipe, result),
                    Catch::Contains("holds adapters at 'layers.0.attn.q_proj' (lora)"));
  CHECK(!std::filesystem::exists(dir.path / "adapted" / "checkpoint.json"));
  CHECK_THROWS_AS(rankwise::load_base_checkpoint(dir.path / "base", fresh), rankwise::StateError);
}

TEST_CASE("load_or_pretrain: the second call loads the cached base instead of training again", "[models][base_checkpoint]") {
  OneThread one;
  TempDir dir("base_cache");
  const rankwise::PretrainRecipe recipe{.task_options = kTask, .steps = 8, .batch = 4, .seed = 2};
  const std::filesystem::path cache = dir.path / rankwise::base_checkpoint_name(kFinetuneModel, recipe);
  CHECK(cache.filename().string().rfind("toy-v48-d16-h2-l2-ff32-ctx19-mixture-8steps-seed2-", 0) == 0);
  long steps_seen = 0;
  rankwise::PretrainedBase<float> first =
      rankwise::load_or_pretrain<float>(kFinetuneModel, recipe, cache, [&](const rankwise::TrainingProgress&) { ++steps_seen; });
  CHECK_FALSE(first.loaded);
  CHECK(steps_seen == 8);
  rankwise::PretrainedBase<float> second =
      rankwise::load_or_pretrain<float>(kFinetuneModel, recipe, cache, [&](const rankwise::TrainingProgress&) { ++steps_seen; });
  CHECK(second.loaded);
  CHECK(second.same_recipe);
  CHECK(steps_seen == 8);  // nothing trained the second time
  CHECK(same(values_of(first.model, true), values_of(second.model, true)));

  // A fine-tuning run from the cached base is the run from the freshly trained one.
  Finetuner<float> a(first.model, tiny_recipe("lora", 10)), b(second.model, tiny_recipe("lora", 10));
  CHECK(train(a) == train(b));

  rankwise::PretrainRecipe longer = recipe;
  longer.steps = 9;
  rankwise::PretrainRecipe other_lr = recipe;
  other_lr.lr = 1e-3;
  ToyTransformerConfig other_config = kFinetuneModel;
  other_config.heads = 4;
  const std::set<std::string> names = {rankwise::base_checkpoint_name(kFinetuneModel, recipe),
                                       rankwise::base_checkpoint_name(kFinetuneModel, longer),
                                       rankwise::base_checkpoint_name(kFinetuneModel, other_lr),
                                       rankwise::base_checkpoint_name(other_config, recipe)};
  CHECK(names.size() == 4);
  CHECK_THROWS_WITH(rankwise::load_or_pretrain<float>(other_config, recipe, cache),
                    Catch::Contains("(heads 2) than this model's (heads 4)"));
}

TEST_CASE("Finetuner: a saved adapter loads back into a fresh model and gives the same logits", "[models][finetune][io]") {
  OneThread one;
  TempDir dir("saved_adapter");
  Random base_rng(1);
  ToyTransformer<float> base(kFinetuneModel, base_rng);
  const rankwise::PretrainRecipe pretraining{.task_options = kTask, .steps = 4, .batch = 4};
  rankwise::save_base_checkpoint(dir.path / "base", base, pretraining, rankwise::pretrain(base, pretraining));
  const TokenBatch batch = validation_batch();
  const rankwise::TaskGenerator task(rankwise::TaskKind::Copy, kTask);
  const auto fresh_model = [&](std::uint64_t seed) {
    Random rng(seed);
    ToyTransformer<float> model(kFinetuneModel, rng);
    rankwise::load_base_checkpoint(dir.path / "base", model);
    return model;
  };

  for (const std::string& kind : kKinds) {
    INFO(kind);
    const std::filesystem::path out = dir.path / kind;
    ToyTransformer<float> model = fresh_model(11);
    Finetuner<float> tuner(model, tiny_recipe(kind, 24), validation_batch());
    train(tuner);
    tuner.finish();
    const auto saved = tuner.save_adapter(out);
    const Matrix<float> logits = eval_logits(model, batch);
    const double accuracy = tuner.evaluate(task, 32).accuracy;
    CHECK(std::filesystem::exists(out / "finetune_recipe.json"));

    // rankwise's directory: the whole state, bit for bit, into a model rebuilt the same way.
    ToyTransformer<float> again = fresh_model(12);
    Finetuner<float> loaded(again, tiny_recipe(kind, 24), validation_batch());
    loaded.load_adapter(out);
    CHECK(same(eval_logits(again, batch), logits));
    CHECK(loaded.evaluate(task, 32).accuracy == accuracy);

    // PEFT's files: into plain LoRA modules of any rank (VeRA natively), the same function.
    if (kind == "red") {
      CHECK(saved.peft_type.empty());
      CHECK(!std::filesystem::exists(out / "adapter_config.json"));
      continue;
    }
    ToyTransformer<float> peft = fresh_model(13);
    if (kind == "vera") {
      CHECK(saved.peft_type == "VERA");
      Finetuner<float> vera(peft, tiny_recipe("vera", 24));
      rankwise::load_peft_adapter(out, vera.adapters<rankwise::VeRA<float>>());
      CHECK(same(eval_logits(peft, batch), logits));
      continue;
    }
    CHECK(saved.peft_type == "LORA");
    FinetuneRecipe plain = tiny_recipe("lora");
    plain.rank = 1;
    Finetuner<float> lora(peft, plain);
    const rankwise::PeftConfig config = rankwise::load_peft_adapter(out, lora.adapters<rankwise::LoRA<float>>());
    CHECK_THAT(eval_logits(peft, batch), rankwise::test_support::is_close_to(logits, 1e-4, 1e-5));
    if (kind == "alora") CHECK(!config.rank_pattern.empty());  // the allocator's ranks, per module
    if (kind == "lora") CHECK(same(eval_logits(peft, batch), logits));
  }
}
