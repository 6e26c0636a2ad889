// Tests for rankwise/models/trainer.hpp: the generic training loop over a model that is not the toy
// transformer (a struct of three slots with its own forward and backward), its hooks, its allocator and
// its refusals.
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/models/adapter_set.hpp>
#include <rankwise/io/checkpoint.hpp>
#include <rankwise/io/state.hpp>
#include <rankwise/models/trainer.hpp>
#include <rankwise/models/trainer_state.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/grad_clip.hpp>
#include <rankwise/optim/lr_schedule.hpp>
#include <rankwise/rank/hooks.hpp>
#include <rankwise/rank/importance.hpp>

#include "support/matchers.hpp"
#include "support/temp_dir.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

using rankwise::AnyLinear;
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;

namespace {

// A user's regression model: three slots, tanh between them, a mean-squared-error loss.
struct TrainerHost {
  using Scalar = double;
  AnyLinear<double> first, second, out;
  Matrix<double> a, h, b, g, y, dy, dg, dh, dx;
  explicit TrainerHost(Random& rng)
      : first(rankwise::Linear<double>(7, 6, rng)), second(rankwise::Linear<double>(6, 6, rng)),
        out(rankwise::Linear<double>(6, 4, rng)) {}
  void for_each_slot(const std::function<void(const std::string&, AnyLinear<double>&)>& f) {
    f("net.first", first);
    f("net.second", second);
    f("net.out", out);
  }
  /// 0.5 * mean over columns of |y - target|^2, its gradients accumulated.
  double loss_and_backward(const Matrix<double>& x, const Matrix<double>& target) {
    first.forward(x, a);
    h = a.array().tanh();
    second.forward(h, b);
    g = b.array().tanh();
    out.forward(g, y);
    const double n = double(x.cols());
    dy = (y - target) / n;
    out.backward(dy, dg);
    dg.array() *= 1.0 - g.array().square();
    second.backward(dg, dh);
    dh.array() *= 1.0 - h.array().square();
    first.backward(dh, dx);
    return 0.5 * (y - target).squaredNorm() / n;
  }
};

struct TrainerData {
  Matrix<double> x, target;
};

TrainerData trainer_data(std::uint64_t seed) {
  Random rng(seed);
  TrainerData d{Matrix<double>(7, 16), Matrix<double>(4, 16)};
  rankwise::fill_normal(d.x, 0.0, 1.0, rng);
  rankwise::fill_normal(d.target, 0.0, 1.0, rng);
  return d;
}

rankwise::InjectionOptions trainer_lora(Index rank) {
  rankwise::InjectionOptions o;
  o.adapter = {"lora", rankwise::LoRAOptions{.rank = rank, .alpha = 2.0 * double(rank)}};
  o.all_linear = true;
  return o;
}

// Records what every call saw.
struct RecordingHook final : rankwise::TrainingHook {
  std::vector<long> before, after;
  int finished = 0;
  std::function<void()> on_before;
  const char* name() const override { return "recording"; }
  void before_step(long step) override {
    before.push_back(step);
    if (on_before) on_before();
  }
  void after_step(long step) override { after.push_back(step); }
  rankwise::Status finish() override {
    ++finished;
    return rankwise::Status::Ok;
  }
};

std::vector<Matrix<double>> values_of(const std::vector<rankwise::Parameter<double>*>& params) {
  std::vector<Matrix<double>> out;
  for (const rankwise::Parameter<double>* p : params) out.push_back(p->value);
  return out;
}

}  // namespace

TEST_CASE("Trainer: its steps are the hand-written loop's, bit for bit", "[models][trainer]") {
  const rankwise::TrainerOptions options{.steps = 20, .lr = 1e-2, .weight_decay = 0.01, .clip_norm = 0.5};
  Random rng_a(3), rng_b(3);
  TrainerHost host_a(rng_a), host_b(rng_b);
  rankwise::AdapterSet<double> set_a = rankwise::inject(host_a, trainer_lora(2), rng_a);
  rankwise::AdapterSet<double> set_b = rankwise::inject(host_b, trainer_lora(2), rng_b);

  rankwise::Trainer<double> trainer(set_a.parameters(), options);
  const std::vector<rankwise::Parameter<double>*> params = set_b.parameters();
  rankwise::AdamW<double> adamw(params, {.lr = options.lr, .weight_decay = options.weight_decay});
  const rankwise::LRSchedule schedule = rankwise::LRSchedule::linear(options.steps / 10, options.steps);
  for (long t = 0; t < 8; ++t) {
    const TrainerData d = trainer_data(100 + std::uint64_t(t));
    const double loss = trainer.step([&] { return host_a.loss_and_backward(d.x, d.target); });
    set_b.zero_grad();
    const double expected = host_b.loss_and_backward(d.x, d.target);
    const double norm = rankwise::clip_grad_norm(params, options.clip_norm).norm;
    adamw.set_lr_factor(schedule.factor(t));
    adamw.step();
    CHECK(loss == expected);
    CHECK(trainer.last_step().grad_norm == norm);
    CHECK(trainer.last_step().lr_factor == schedule.factor(t));
    CHECK(trainer.last_step().step == t + 1);
  }
  const std::vector<Matrix<double>> a = values_of(set_a.parameters()), b = values_of(params);
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i] == b[i]);
  CHECK(trainer.steps_done() == 8);
  CHECK(trainer.losses().size() == 8);
  CHECK(trainer.optimizer().step_count() == 8);
}

TEST_CASE("Trainer: a non-finite loss or an exception changes nothing and skips the after-step hooks",
          "[models][trainer]") {
  Random rng(4);
  TrainerHost host(rng);
  rankwise::AdapterSet<double> set = rankwise::inject(host, trainer_lora(2), rng);
  rankwise::Trainer<double> trainer(set.parameters(), {.steps = 5});
  RecordingHook hook;
  trainer.add_hook(hook);
  const TrainerData d = trainer_data(7);
  trainer.step([&] { return host.loss_and_backward(d.x, d.target); });
  const std::vector<Matrix<double>> before = values_of(set.parameters());

  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK(std::isnan(trainer.step([&] {
    host.loss_and_backward(d.x, d.target);
    return nan;
  })));
  CHECK(trainer.last_step().skipped);
  CHECK(values_of(set.parameters()) == before);
  CHECK_THROWS_AS(trainer.step([]() -> double { throw std::runtime_error("the user's forward failed"); }),
                  std::runtime_error);
  CHECK(values_of(set.parameters()) == before);
  CHECK(trainer.steps_done() == 2);
  CHECK(hook.before == std::vector<long>{0, 1, 2});
  CHECK(hook.after == std::vector<long>{0});

  trainer.step([&] { return host.loss_and_backward(d.x, d.target); });
  CHECK(trainer.finish() == rankwise::Status::NonFinite);
  CHECK_THAT(trainer.message(), Catch::Contains("1 of 3 steps were skipped"));
  CHECK(hook.finished == 1);
  CHECK(trainer.finish() == rankwise::Status::NonFinite);  // idempotent
  CHECK(hook.finished == 1);
}

TEST_CASE("Trainer: allocate_ranks prunes a user's model to its budget, the optimizer following",
          "[models][trainer][rank]") {
  const long steps = 48;
  Random rng(5);
  TrainerHost host(rng);
  rankwise::AdapterSet<double> set = rankwise::inject(host, trainer_lora(4), rng);
  rankwise::Trainer<double> trainer(set.parameters(), {.steps = steps, .lr = 1e-2});
  rankwise::FisherImportance<double> drop_costs;
  rankwise::RankAllocator<double>& allocator =
      trainer.allocate_ranks(set.rank_modules(), drop_costs, rankwise::pruning_schedule(steps, 5), rng);
  CHECK(trainer.allocator() == &allocator);
  CHECK(allocator.options().total_steps == steps);
  bool changed = false;
  for (long t = 0; t < steps; ++t) {
    const TrainerData d = trainer_data(200 + std::uint64_t(t));
    trainer.step([&] { return host.loss_and_backward(d.x, d.target); });
    changed = changed || trainer.last_step().ranks_changed;
  }
  CHECK(changed);
  CHECK(trainer.finish() == rankwise::Status::Ok);
  CHECK(allocator.total_ranks() == 5);
  Index total = 0;
  for (const auto& [path, rank] : trainer.ranks()) total += rank;
  CHECK(total == 5);
  CHECK(trainer.ranks().size() == 3);
  for (rankwise::Parameter<double>* p : set.parameters()) {  // the optimizer's state was sliced alike
    const auto* state = trainer.optimizer().state_of(p->name);
    REQUIRE(state != nullptr);
    CHECK(state->m.rows() == p->value.rows());
    CHECK(state->m.cols() == p->value.cols());
  }
}

TEST_CASE("Trainer: DyLoRA's sampler from AdapterSet::dylora_modules runs before every step",
          "[models][trainer][rank]") {
  Random rng(6);
  TrainerHost host(rng);
  rankwise::InjectionOptions o;
  o.adapter = {"dylora", rankwise::DyLoRAOptions{.max_rank = 4, .alpha = 8.0}};
  o.all_linear = true;
  rankwise::AdapterSet<double> set = rankwise::inject(host, o, rng);
  rankwise::Trainer<double> trainer(set.parameters(), {.steps = 30});
  trainer.add_hook(std::make_unique<rankwise::DyLoRAHook<double>>(set.dylora_modules(), rng));
  std::vector<Index> seen;
  RecordingHook hook;  // after the sampler: sees the rank it set
  hook.on_before = [&] { seen.push_back(set.slot("net.second").as<rankwise::DyLoRA<double>>().active_rank()); };
  trainer.add_hook(hook);
  const TrainerData d = trainer_data(8);
  for (long t = 0; t < 30; ++t) trainer.step([&] { return host.loss_and_backward(d.x, d.target); });
  REQUIRE(seen.size() == 30);
  CHECK(*std::min_element(seen.begin(), seen.end()) >= 1);
  CHECK(*std::max_element(seen.begin(), seen.end()) <= 4);
  CHECK(*std::min_element(seen.begin(), seen.end()) < *std::max_element(seen.begin(), seen.end()));
  CHECK(trainer.finish() == rankwise::Status::Ok);
  for (const rankwise::DyLoRAModule<double>& m : set.dylora_modules()) CHECK(m.adapter->active_rank() == 4);
}

TEST_CASE("Trainer: bad options and calls out of order are refused with nothing changed",
          "[models][trainer][errors]") {
  Random rng(9);
  TrainerHost host(rng);
  rankwise::AdapterSet<double> set = rankwise::inject(host, trainer_lora(2), rng);
  using rankwise::TrainerOptions;
  CHECK_THROWS_AS(rankwise::Trainer<double>(set.parameters(), TrainerOptions{}), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(rankwise::Trainer<double>(set.parameters(), TrainerOptions{}), Catch::Contains("steps must be >= 1 (got 0)"));
  CHECK_THROWS_AS(rankwise::Trainer<double>(set.parameters(), {.steps = 5, .warmup_steps = 5}), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(rankwise::Trainer<double>(set.parameters(), {.steps = 5, .warmup_steps = 5}), Catch::Contains("warmup_steps must be -1"));
  CHECK_THROWS_AS(rankwise::Trainer<double>(set.parameters(), {.steps = 5, .clip_norm = -1.0}), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(rankwise::Trainer<double>(set.parameters(), {.steps = 5, .clip_norm = -1.0}), Catch::Contains("clip_norm must be"));
  CHECK_THROWS_AS(rankwise::Trainer<double>(set.parameters(), {.steps = 5, .final_lr_factor = 2.0}), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(rankwise::Trainer<double>(set.parameters(), {.steps = 5, .final_lr_factor = 2.0}), Catch::Contains("final_lr_factor must be in [0, 1]"));
  CHECK_THROWS_AS(rankwise::Trainer<double>(set.parameters(), {.steps = 5, .lr = -1.0}), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(rankwise::Trainer<double>(set.parameters(), {.steps = 5, .lr = -1.0}), Catch::Contains("lr must be a finite number > 0"));
  CHECK_THROWS_AS(rankwise::Trainer<double>(std::vector<rankwise::Parameter<double>*>{}, {.steps = 5}), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(rankwise::Trainer<double>(std::vector<rankwise::Parameter<double>*>{}, {.steps = 5}), Catch::Contains("no parameter to train"));
  CHECK_THROWS_AS(set.dylora_modules(), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(set.dylora_modules(), Catch::Contains("need \"dylora\" or \"erat\""));

  {
    rankwise::Trainer<double> pruning(set.parameters(), {.steps = 48});
    rankwise::FisherImportance<double> scores;
    pruning.allocate_ranks(set.rank_modules(), scores, rankwise::pruning_schedule(48, 4), rng);
    CHECK_THROWS_AS(pruning.allocate_ranks(set.rank_modules(), scores, rankwise::pruning_schedule(48, 4), rng),
                    rankwise::StateError);
    CHECK_THROWS_WITH(pruning.allocate_ranks(set.rank_modules(), scores, rankwise::pruning_schedule(48, 4), rng),
                      Catch::Contains("has a rank allocator already"));
  }
  rankwise::Trainer<double> trainer(set.parameters(), {.steps = 2});
  const TrainerData d = trainer_data(10);
  const auto step = [&] { return host.loss_and_backward(d.x, d.target); };
  trainer.step(step);
  RecordingHook late;
  CHECK_THROWS_AS(trainer.add_hook(late), rankwise::StateError);
  CHECK_THROWS_WITH(trainer.add_hook(late), Catch::Contains("add hooks before training"));
  trainer.step(step);
  const std::vector<Matrix<double>> done = values_of(set.parameters());
  CHECK_THROWS_AS(trainer.step(step), rankwise::StateError);
  CHECK_THROWS_WITH(trainer.step(step), Catch::Contains("the run's 2 steps are done; call finish()"));
  CHECK(values_of(set.parameters()) == done);
  trainer.finish();
  CHECK_THROWS_AS(trainer.step(step), rankwise::StateError);
  CHECK_THROWS_WITH(trainer.step(step), Catch::Contains("after finish()"));
}

namespace {

// A pruning run over TrainerHost whose state goes to and comes from a checkpoint.
struct TrainerRun {
  static constexpr long steps = 48;
  Random rng;
  TrainerHost host;
  rankwise::AdapterSet<double> set;
  rankwise::FisherImportance<double> scores;
  std::unique_ptr<rankwise::Trainer<double>> trainer;

  explicit TrainerRun(std::uint64_t seed)
      : rng(seed), host(rng), set(rankwise::inject(host, trainer_lora(4), rng)) {
    trainer = std::make_unique<rankwise::Trainer<double>>(set.parameters(), rankwise::TrainerOptions{.steps = steps, .lr = 1e-2});
    trainer->allocate_ranks(set.rank_modules(), scores, rankwise::pruning_schedule(steps, 5), rng);
  }
  void train(long n) {
    for (long i = 0; i < n; ++i) {
      const TrainerData d = trainer_data(300 + std::uint64_t(trainer->steps_done()));
      trainer->step([&] { return host.loss_and_backward(d.x, d.target); });
    }
  }
  std::vector<rankwise::Parameter<double>*> frozen() {
    std::vector<rankwise::Parameter<double>*> out;
    for (const auto& m : set.modules())
      for (rankwise::Parameter<double>* p : m.slot->parameters())
        if (!p->trainable) out.push_back(p);
    return out;
  }
  void save(const std::filesystem::path& dir) {
    rankwise::CheckpointWriter ckpt;
    ckpt.set_step(trainer->steps_done());
    ckpt.add("base", frozen());
    ckpt.add("adapters", set.named_adapters());
    ckpt.add("scores", scores);
    ckpt.add("trainer", *trainer);
    ckpt.write(dir);
  }
  void load(const std::filesystem::path& dir) {
    rankwise::CheckpointReader ckpt(dir);
    ckpt.restore("base", frozen());
    ckpt.restore("adapters", set.named_adapters());  // first: the adapters take their saved ranks
    ckpt.restore("scores", scores);
    ckpt.restore("trainer", *trainer);
  }
};

}  // namespace

TEST_CASE("Trainer: a pruning run resumes from a checkpoint bit for bit", "[models][trainer][io]") {
  rankwise::test_support::TempDir dir("trainer_resume");
  TrainerRun uninterrupted(21);
  uninterrupted.train(TrainerRun::steps);

  TrainerRun first(21);
  first.train(20);
  first.save(dir.path);
  TrainerRun resumed(999);  // other initial values: everything comes from the checkpoint
  resumed.load(dir.path);
  CHECK(resumed.trainer->steps_done() == 20);
  CHECK(resumed.trainer->losses() == first.trainer->losses());
  resumed.train(TrainerRun::steps - 20);

  CHECK(uninterrupted.trainer->finish() == rankwise::Status::Ok);
  CHECK(resumed.trainer->finish() == rankwise::Status::Ok);
  CHECK(resumed.trainer->ranks() == uninterrupted.trainer->ranks());
  CHECK(resumed.trainer->losses() == uninterrupted.trainer->losses());
  const std::vector<Matrix<double>> a = values_of(resumed.set.parameters()), b = values_of(uninterrupted.set.parameters());
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i] == b[i]);

  // A trainer set up differently is refused, unchanged.
  rankwise::Random rng(5);
  TrainerHost host(rng);
  rankwise::AdapterSet<double> set = rankwise::inject(host, trainer_lora(4), rng);
  rankwise::Trainer<double> shorter(set.parameters(), {.steps = 40});
  rankwise::CheckpointReader ckpt(dir.path);
  CHECK_THROWS_AS(ckpt.restore("trainer", shorter), rankwise::FormatError);
  CHECK_THROWS_WITH(ckpt.restore("trainer", shorter), Catch::Contains("a run of 48 steps but this trainer's run is 40"));
  rankwise::Trainer<double> plain(set.parameters(), {.steps = 48});
  CHECK_THROWS_WITH(ckpt.restore("trainer", plain), Catch::Contains("holds a rank allocator but this trainer has none"));
  CHECK(plain.steps_done() == 0);
  CHECK_THROWS_AS(plain.restore_progress(5, 6, std::vector<double>(5)), rankwise::InvalidArgument);
}
