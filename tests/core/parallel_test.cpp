// Tests for rankwise/core/parallel.hpp: the sleeping worker pool, the fixed cut of the work, and the
// layers that split their work over threads (Linear, attention, LayerNorm, GELU, LoRA): the same
// numbers run after run, close to one thread's, and exact gradients.
#include <rankwise/adapters/lora.hpp>
#include <rankwise/core/parallel.hpp>
#include <rankwise/layers/gelu.hpp>
#include <rankwise/layers/layer_norm.hpp>
#include <rankwise/layers/linear.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/matchers.hpp"
#include "support/stacked_attention.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <stdexcept>
#include <vector>

namespace {
// Restores one thread when a test ends, whatever it set.
struct ThreadsGuard {
  ~ThreadsGuard() { rankwise::set_num_threads(1); }
};

// One step of a layer from zero gradients: forward, backward; returns y, dx and dW.
template <typename Scalar>
std::vector<rankwise::Matrix<Scalar>> linear_step(rankwise::Linear<Scalar>& layer, const rankwise::Matrix<Scalar>& x,
                                                  const rankwise::Matrix<Scalar>& dy) {
  layer.zero_grad();
  rankwise::Matrix<Scalar> y, dx;
  layer.forward(x, y);
  layer.backward(dy, dx);
  return {y, dx, layer.weight_parameter().grad};
}
}  // namespace

TEST_CASE("set_num_threads: refuses counts outside 1 to 64 and keeps the current one", "[core][parallel][errors]") {
  ThreadsGuard guard;
  rankwise::set_num_threads(2);
  CHECK_THROWS_WITH(rankwise::set_num_threads(0), Catch::Contains("[rankwise::set_num_threads] threads must be in [1, 64] (got 0)"));
  CHECK_THROWS_AS(rankwise::set_num_threads(65), rankwise::InvalidArgument);
  CHECK(rankwise::num_threads() == 2);
}

TEST_CASE("parallel_parts: every part runs exactly once, on any thread count, job after job", "[core][parallel]") {
  ThreadsGuard guard;
  for (int threads : {1, 2, 3, 4}) {
    rankwise::set_num_threads(threads);
    for (rankwise::Index parts : {1, 2, 3, 7, 64}) {
      for (int job = 0; job < 50; ++job) {
        std::vector<std::atomic<int>> calls(static_cast<std::size_t>(parts));
        rankwise::detail::parallel_parts(parts, [&](rankwise::Index p) { calls[std::size_t(p)].fetch_add(1); });
        for (rankwise::Index p = 0; p < parts; ++p) {
          INFO("threads " << threads << ", parts " << parts << ", job " << job << ", part " << p);
          REQUIRE(calls[std::size_t(p)].load() == 1);
        }
      }
    }
  }
}

TEST_CASE("parallel_parts: a part that throws reaches the caller after every other part has finished",
          "[core][parallel][errors]") {
  ThreadsGuard guard;
  for (int threads : {1, 2, 3}) {
    rankwise::set_num_threads(threads);
    for (int job = 0; job < 20; ++job) {
      std::atomic<int> finished{0};
      CHECK_THROWS_WITH(rankwise::detail::parallel_parts(6,
                                                         [&](rankwise::Index p) {
                                                           if (p == 3) throw std::runtime_error("part 3 failed");
                                                           finished.fetch_add(1);
                                                         }),
                        "part 3 failed");
      CHECK(finished.load() == 5);  // the others ran to the end before the exception left
    }
    // The pool works as before afterwards.
    std::atomic<int> calls{0};
    rankwise::detail::parallel_parts(4, [&](rankwise::Index) { calls.fetch_add(1); });
    CHECK(calls.load() == 4);
  }
}

TEST_CASE("part_range: cuts n items into aligned blocks that cover 0 to n in order", "[core][parallel]") {
  for (rankwise::Index n : {0, 1, 15, 16, 17, 100, 2048, 2049}) {
    for (rankwise::Index parts : {1, 2, 3, 5}) {
      rankwise::Index expected_begin = 0;
      for (rankwise::Index p = 0; p < parts; ++p) {
        const auto [begin, end] = rankwise::detail::part_range(n, parts, p);
        INFO("n " << n << ", parts " << parts << ", part " << p);
        CHECK(begin == expected_begin);
        CHECK(end >= begin);
        if (p + 1 < parts) CHECK(end % 16 == 0);
        expected_begin = end;
      }
      CHECK(expected_begin == n);
    }
  }
}

TEST_CASE("Linear on 2 threads: deterministic, equal to 1 thread up to rounding, exact gradients", "[core][parallel][layers]") {
  ThreadsGuard guard;
  rankwise::Random rng(11);
  rankwise::Linear<float> layer(96, 80, rng);
  const rankwise::Matrix<float> x = rankwise::test_support::random_matrix<float>(96, 1000, rng);
  const rankwise::Matrix<float> dy = rankwise::test_support::random_matrix<float>(80, 1000, rng);
  rankwise::set_num_threads(1);
  const auto one = linear_step(layer, x, dy);
  rankwise::set_num_threads(2);
  REQUIRE(rankwise::detail::parts_for(x.cols()) == 2);  // the split really happens
  const auto two = linear_step(layer, x, dy);
  const auto again = linear_step(layer, x, dy);
  for (std::size_t i = 0; i < one.size(); ++i) {
    INFO("output " << i << " (y, dx, dW)");
    CHECK(rankwise::test_support::same_bits(two[i], again[i]));
    CHECK_THAT(two[i], rankwise::test_support::IsCloseTo<float>(one[i], 1e-5, 1e-4));
  }

  rankwise::Linear<double> small(8, 64, rng);  // 256 columns and 64 rows: every product split in two
  REQUIRE(rankwise::detail::parts_for(256) == 2);
  REQUIRE(rankwise::detail::parts_for(64, 32) == 2);
  const rankwise::Matrix<double> xs = rankwise::test_support::random_matrix<double>(8, 256, rng);
  const auto result = rankwise::testing::check_gradients(small, xs, rng);
  INFO(result.worst);
  CHECK(result.max_error < 1e-6);  // sums over 256 columns: the differences' own error is ~1e-7 here
  // In double, the split gradients equal one thread's up to the order of the sums.
  const rankwise::Matrix<double> dys = rankwise::test_support::random_matrix<double>(64, 256, rng);
  const auto split = linear_step(small, xs, dys);
  rankwise::set_num_threads(1);
  const auto whole = linear_step(small, xs, dys);
  for (std::size_t i = 0; i < whole.size(); ++i) CHECK_THAT(split[i], rankwise::test_support::IsCloseTo<double>(whole[i], 1e-12, 1e-12));
}

namespace {
// One step of any layer from zero gradients: y, dx and the gradient of every trainable parameter.
template <rankwise::Layer L>
std::vector<rankwise::Matrix<typename L::Scalar>> any_step(L& layer, const rankwise::Matrix<typename L::Scalar>& x,
                                                           const rankwise::Matrix<typename L::Scalar>& dy) {
  layer.zero_grad();
  rankwise::Matrix<typename L::Scalar> y, dx;
  layer.forward(x, y);
  layer.backward(dy, dx);
  std::vector<rankwise::Matrix<typename L::Scalar>> out = {y, dx};
  for (auto* p : layer.parameters())
    if (p->trainable) out.push_back(p->grad);
  return out;
}

// On 2 and 3 threads: bit for bit the same twice, close to 1 thread, and gradients exact against
// finite differences.
// check_input = false skips the finite differences of dx (one per input element: the cost of the test
// under the sanitizers) where dx is a plain product of already-checked factors; dx is still compared
// with 1 thread's, whose gradient the layer's own tests check against finite differences.
template <rankwise::Layer L>
void check_split_layer(L& layer, rankwise::Index columns, rankwise::Random& rng, bool check_input = true) {
  const auto x = rankwise::test_support::random_matrix<double>(layer.in_features(), columns, rng);
  const auto dy = rankwise::test_support::random_matrix<double>(layer.out_features(), columns, rng);
  rankwise::set_num_threads(1);
  const auto one = any_step(layer, x, dy);
  for (int threads : {2, 3}) {
    rankwise::set_num_threads(threads);
    const auto split = any_step(layer, x, dy);
    const auto again = any_step(layer, x, dy);
    REQUIRE(split.size() == one.size());
    for (std::size_t i = 0; i < one.size(); ++i) {
      INFO(threads << " threads, output " << i << " (y, dx, then the parameters' gradients)");
      CHECK(rankwise::test_support::same_bits(split[i], again[i]));
      CHECK_THAT(split[i], rankwise::test_support::IsCloseTo<double>(one[i], 1e-12, 1e-12));
    }
    // h = 1e-5: the losses sum thousands of terms, whose rounding over h = 1e-6 reaches 2e-6.
    const auto result = rankwise::testing::check_gradients(layer, x, rng, {.step = 1e-5, .check_input = check_input});
    INFO(threads << " threads: " << result.worst);
    CHECK(result.max_error < 1e-6);
  }
}
}  // namespace

TEST_CASE("Attention, LayerNorm, GELU and LoRA on 2 and 3 threads: deterministic, close to 1 thread, exact gradients",
          "[core][parallel][layers][gradcheck]") {
  ThreadsGuard guard;
  rankwise::Random rng(12);
  rankwise::set_num_threads(2);
  // Shapes large enough that every split happens: 8 (sequence, head) pairs of at least 4, 192
  // columns in blocks of at least 64 for the elementwise layers, 256 columns in blocks of at least
  // 128 and 64 rows in blocks of at least 32 for LoRA's products.
  REQUIRE(rankwise::detail::parts_for(8, 4) == 2);
  REQUIRE(rankwise::detail::parts_for(192, 64) == 2);
  SECTION("attention over (sequence, head) pairs") {
    rankwise::test_support::StackedAttention<double> attention(8, 2, 6);
    check_split_layer(attention, 24, rng);
  }
  SECTION("LayerNorm over column blocks") {
    rankwise::LayerNorm<double> norm(6);
    norm.gamma().value = rankwise::test_support::random_matrix<double>(6, 1, rng);
    check_split_layer(norm, 192, rng);
  }
  SECTION("GELU over column blocks") {
    rankwise::GELU<double> gelu(5);
    check_split_layer(gelu, 192, rng);
  }
  SECTION("LoRA: its branch over column blocks, dA and dB over blocks of their rows and columns") {
    rankwise::LoRA<double> lora(rankwise::Linear<double>(64, 64, rng), {.rank = 4, .alpha = 8.0}, rng);
    auto parameters = lora.parameters();
    parameters.back()->value = rankwise::test_support::random_matrix<double>(64, 4, rng);  // B = 0 would hide dA
    // dx = W^T dy + s A^T (B^T dy) over column blocks: compared with 1 thread (16384 input elements
    // would take 65536 forwards); dA and dB, the split reductions, against finite differences.
    check_split_layer(lora, 256, rng, /*check_input=*/false);
  }
}
