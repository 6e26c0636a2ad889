// A steady-state training step of a layer performs no heap allocation: every buffer is reused.
// Sizes are kept below Eigen's stack-allocation limit (128 KiB) for GEMM packing buffers, so any
// allocation counted here is rankwise's own. (Larger products make Eigen allocate its packing
// buffers; benchmarks/lora_layer reports those.)
#include <rankwise/adapters/bora.hpp>
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/melora.hpp>
#include <rankwise/adapters/red.hpp>
#include <rankwise/adapters/vera.hpp>
#include <rankwise/rank/dylora_sampler.hpp>
#include <rankwise/layers/cross_entropy.hpp>
#include <rankwise/models/adapter_set.hpp>
#include <rankwise/models/toy_transformer.hpp>
#include <rankwise/models/trainer.hpp>
#include <rankwise/layers/linear.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/grad_clip.hpp>
#include <rankwise/optim/sgd.hpp>

#include "alloc/counting_malloc.hpp"
#include "support/matchers.hpp"

#include <catch2/catch.hpp>

using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::test_support::random_matrix;

namespace {
template <typename LayerType, typename Opt>
rankwise::test_support::AllocationCount count_steady_state(LayerType& layer, Opt& opt, Random& rng) {
  const Matrix<float> x = random_matrix<float>(layer.in_features(), 32, rng);
  const Matrix<float> dy = random_matrix<float>(layer.out_features(), 32, rng);
  Matrix<float> y, dx;
  const auto params = layer.parameters();
  const auto step = [&] {
    layer.zero_grad();
    layer.forward(x, y);
    layer.backward(dy, dx);
    rankwise::clip_grad_norm(params, 1.0);
    opt.step();
  };
  step();  // the first step sizes the buffers and the optimizer state
  step();
  rankwise::test_support::start_counting_allocations();
  for (int i = 0; i < 5; ++i) step();
  return rankwise::test_support::stop_counting_allocations();
}
}  // namespace

TEST_CASE("allocation counter: sees allocations", "[alloc]") {
  rankwise::test_support::start_counting_allocations();
  Matrix<float>* m = new Matrix<float>(100, 100);
  delete m;
  const auto count = rankwise::test_support::stop_counting_allocations();
  CHECK(count.calls >= 2);
  CHECK(count.bytes >= 100 * 100 * sizeof(float));
}

TEST_CASE("LoRA + AdamW: a steady-state training step does not allocate", "[alloc][adapters][lora]") {
  Random rng(1);
  for (double dropout : {0.0, 0.1}) {
    rankwise::LoRA<float> lora(rankwise::Linear<float>(64, 48, rng), {.rank = 8, .dropout = dropout}, rng);
    rankwise::LoRA<float> rank_one(rankwise::Linear<float>(64, 48, rng), {.rank = 1, .dropout = dropout}, rng);
    rankwise::AdamW<float> rank_one_opt(rank_one.parameters(), {});
    CHECK(count_steady_state(rank_one, rank_one_opt, rng).calls == 0);  // rank-1 products take other paths
    lora.set_gate(2, 0.5);
    rankwise::AdamW<float> opt(lora.parameters(), {});
    const auto count = count_steady_state(lora, opt, rng);
    INFO("dropout " << dropout << ": " << count.calls << " allocations, " << count.bytes << " bytes");
    CHECK(count.calls == 0);
  }
}

TEST_CASE("Linear + SGD: a steady-state training step does not allocate", "[alloc][layers][linear]") {
  Random rng(2);
  rankwise::Linear<float> layer(64, 48, rng);
  rankwise::SGD<float> opt(layer.parameters(), {.lr = 0.1, .momentum = 0.9});
  const auto count = count_steady_state(layer, opt, rng);
  INFO(count.calls << " allocations, " << count.bytes << " bytes");
  CHECK(count.calls == 0);
}

TEST_CASE("LoRA after surgery: steady state again after one warm-up step", "[alloc][adapters][lora]") {
  Random rng(3);
  rankwise::LoRA<float> lora(rankwise::Linear<float>(64, 64, rng), {.rank = 8}, rng);
  rankwise::AdamW<float> opt(lora.parameters(), {});
  count_steady_state(lora, opt, rng);
  const std::vector<rankwise::Index> gone = {1, 3};
  opt.follow(lora.remove_ranks(gone));
  opt.follow(lora.add_ranks(2, rng));
  const auto count = count_steady_state(lora, opt, rng);
  CHECK(count.calls == 0);
}

TEST_CASE("DyLoRA + AdamW: a step at a freshly sampled rank does not allocate", "[alloc][adapters][dylora]") {
  Random rng(4);
  for (const bool frozen : {true, false}) {
    rankwise::DyLoRA<float> dylora(rankwise::Linear<float>(64, 48, rng), {.max_rank = 8, .frozen = frozen}, rng);
    rankwise::DyLoRASampler sampler({.max_rank = 8}, rng);
    rankwise::AdamW<float> opt(dylora.parameters(), {.weight_decay = 0.1});
    const Matrix<float> x = random_matrix<float>(64, 32, rng), dy = random_matrix<float>(48, 32, rng);
    Matrix<float> y, dx;
    const auto step = [&] {
      dylora.set_active_rank(sampler.sample());
      dylora.zero_grad();
      dylora.forward(x, y);
      dylora.backward(dy, dx);
      opt.step();
    };
    for (int i = 0; i < 3; ++i) step();
    rankwise::test_support::start_counting_allocations();
    for (int i = 0; i < 8; ++i) step();
    const auto count = rankwise::test_support::stop_counting_allocations();
    INFO((frozen ? "frozen: " : "non-frozen: ") << count.calls << " allocations, " << count.bytes << " bytes");
    CHECK(count.calls == 0);
  }
}

TEST_CASE("VeRA, RED, MELoRA + AdamW: a steady-state training step does not allocate", "[alloc][adapters]") {
  Random rng(5);
  auto bank = rankwise::VeRAProjections<float>::make(32, 64, 64, rng);
  rankwise::VeRA<float> vera(rankwise::Linear<float>(64, 48, rng), bank);
  rankwise::AdamW<float> vera_opt(vera.parameters(), {});
  const auto vera_count = count_steady_state(vera, vera_opt, rng);
  CHECK(vera_count.calls == 0);
  rankwise::RED<float> red(rankwise::Linear<float>(64, 48, rng));
  rankwise::AdamW<float> red_opt(red.parameters(), {});
  const auto red_count = count_steady_state(red, red_opt, rng);
  CHECK(red_count.calls == 0);
  for (const Index mini_rank : {1, 2}) {  // rank-1 products take other paths inside Eigen
    rankwise::MELoRA<float> melora(rankwise::Linear<float>(64, 48, rng), {.n = 4, .mini_rank = mini_rank}, rng);
    rankwise::AdamW<float> melora_opt(melora.parameters(), {});
    const auto melora_count = count_steady_state(melora, melora_opt, rng);
    INFO("r_mini = " << mini_rank);
    CHECK(melora_count.calls == 0);
  }
}

TEST_CASE("BoRA + AdamW: a step with routing set per batch and the prior does not allocate", "[alloc][adapters][bora]") {
  Random rng(6);
  // (Task, Direct), (Joined, Direct), (Task, Offsets): every forward mode and parametrization.
  for (int setup = 0; setup < 3; ++setup)
    for (auto prior : {rankwise::BoRAPrior::Squared, rankwise::BoRAPrior::Unsquared}) {
      const auto forward = setup == 1 ? rankwise::BoRAForward::Joined : rankwise::BoRAForward::Task;
      const auto parametrization = setup == 2 ? rankwise::BoRAParametrization::Offsets : rankwise::BoRAParametrization::Direct;
      rankwise::BoRA<float> bora(rankwise::Linear<float>(64, 48, rng),
                                 {.tasks = 3, .rank = 4, .tau = 0.5, .prior = prior, .forward = forward,
                                  .parametrization = parametrization},
                                 rng);
      rankwise::AdamW<float> opt(bora.parameters(), {});
      std::vector<std::int32_t> ids(32);
      for (std::size_t j = 0; j < ids.size(); ++j) ids[j] = std::int32_t((j / 5 + j % 2) % 3);
      const rankwise::TaskRouting routing(ids, 3);
      const Matrix<float> x = random_matrix<float>(64, 32, rng), dy = random_matrix<float>(48, 32, rng);
      Matrix<float> y, dx;
      const auto step = [&] {
        bora.set_routing(routing);  // a new batch's routing, into the layer's own storage
        bora.zero_grad();
        bora.forward(x, y);
        bora.backward(dy, dx);
        bora.add_prior_gradient();
        opt.step();
      };
      step();
      step();
      rankwise::test_support::start_counting_allocations();
      for (int i = 0; i < 5; ++i) step();
      const auto count = rankwise::test_support::stop_counting_allocations();
      INFO("forward mode " << int(forward) << ", parametrization " << int(parametrization) << ", prior " << int(prior)
                           << ": " << count.calls << " allocations");
      CHECK(count.calls == 0);
    }
}

TEST_CASE("ToyTransformer + LoRA: a training step after the first does not allocate", "[alloc][models][toy_transformer]") {
  // LoRA with dropout (copied inputs), LoRA without (borrowed inputs, the first block's input gradient
  // skipped), and full fine-tuning (trainable Linear slots and embeddings).
  for (const int setup : {0, 1, 2}) {
    Random rng(4);
    rankwise::ToyTransformer<float> model({.vocab = 32, .d_model = 16, .heads = 2, .layers = 2, .d_ff = 32, .max_seq_len = 8},
                                          rng);
    if (setup < 2) {
      rankwise::InjectionOptions injection;
      injection.all_linear = true;
      injection.adapter.options = rankwise::LoRAOptions{.rank = 4, .alpha = 8.0, .dropout = setup == 0 ? 0.1 : 0.0};
      rankwise::inject(model, injection, rng);
    }
    std::vector<rankwise::Parameter<float>*> params = model.parameters();
    rankwise::AdamW<float> opt(params, {});
    rankwise::CrossEntropy<float> ce;
    std::vector<std::int32_t> tokens(32), targets(32);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = std::int32_t(rng.uniform_int(0, 31));
      targets[i] = i % 4 == 0 ? rankwise::ignore_index : std::int32_t(rng.uniform_int(0, 31));
    }
    Matrix<float> logits, dlogits;
    const auto step = [&] {
      model.zero_grad();
      model.forward(tokens, 8, logits);
      ce.forward(logits, targets);
      ce.backward(dlogits);
      model.backward(dlogits);
      rankwise::clip_grad_norm(params, 1.0);
      opt.step();
    };
    step();
    rankwise::test_support::start_counting_allocations();
    for (int i = 0; i < 3; ++i) step();
    const auto count = rankwise::test_support::stop_counting_allocations();
    INFO("setup " << setup << ": " << count.calls << " allocations, " << count.bytes << " bytes");
    CHECK(count.calls == 0);
  }
}

TEST_CASE("Trainer + LoRA: a step of the generic loop after the first does not allocate", "[alloc][models][trainer]") {
  Random rng(5);
  rankwise::ToyTransformer<float> model({.vocab = 32, .d_model = 16, .heads = 2, .layers = 2, .d_ff = 32, .max_seq_len = 8},
                                        rng);
  rankwise::InjectionOptions injection;
  injection.all_linear = true;
  injection.adapter.options = rankwise::LoRAOptions{.rank = 4, .alpha = 8.0};
  const rankwise::AdapterSet<float> adapters = rankwise::inject(model, injection, rng);
  rankwise::Trainer<float> trainer(adapters.parameters(), {.steps = 10});
  rankwise::CrossEntropy<float> ce;
  std::vector<std::int32_t> tokens(32), targets(32);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = std::int32_t(rng.uniform_int(0, 31));
    targets[i] = std::int32_t(rng.uniform_int(0, 31));
  }
  Matrix<float> logits, dlogits;
  const auto forward_backward = [&] {
    model.forward(tokens, 8, logits);
    const double loss = ce.forward(logits, targets);
    ce.backward(dlogits);
    model.backward(dlogits);
    return loss;
  };
  trainer.step(forward_backward);
  rankwise::test_support::start_counting_allocations();
  for (int i = 0; i < 3; ++i) trainer.step(forward_backward);
  const auto count = rankwise::test_support::stop_counting_allocations();
  INFO(count.calls << " allocations, " << count.bytes << " bytes");
  CHECK(count.calls == 0);
}
