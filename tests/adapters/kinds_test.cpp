// Tests for rankwise/adapters/kinds.hpp: every entry of AdapterKinds goes through the paths that read
// the list (make_linear, the slots' state, inject with its patterns and shared tensors, the fine-tuning
// names, learning rates and PEFT forms), so a kind added to the list is covered without a new test.
#include <rankwise/adapters/kinds.hpp>
#include <rankwise/io/checkpoint.hpp>
#include <rankwise/models/adapter_set.hpp>
#include <rankwise/models/finetune.hpp>

#include "support/matchers.hpp"
#include "support/temp_dir.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

using rankwise::AnyLinear;
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;

namespace {

// A user's model of two slots, for inject().
struct KindsHost {
  AnyLinear<double> a, b;
  explicit KindsHost(Random& rng) : a(rankwise::Linear<double>(8, 8, rng)), b(rankwise::Linear<double>(8, 8, rng)) {}
  void for_each_slot(const std::function<void(const std::string&, AnyLinear<double>&)>& f) {
    f("block.a", a);
    f("block.b", b);
  }
};

// Every parameter of a slot, trainable or not, set to values of the seed (so a restored slot differs
// from a fresh one before it is loaded).
void scramble(AnyLinear<double>& slot, std::uint64_t seed) {
  Random rng(seed);
  for (rankwise::Parameter<double>* p : slot.parameters())
    if (p->trainable)
      for (Index i = 0; i < p->value.size(); ++i) p->value.data()[i] = rng.normal(0.0, 0.3);
}

// A slot of kind K at rank 2 over an 8 x 8 base from `seed`, sharing `context`.
template <typename K>
AnyLinear<double> kind_slot(std::uint64_t seed, const rankwise::AdapterContext<double>& context) {
  Random rng(seed);
  Random base_rng(99);  // the same base weights in every slot
  const typename K::Options options = K::at_rank(2, 4.0, typename K::Options{});
  AnyLinear<double> slot =
      rankwise::make_linear(rankwise::Linear<double>(8, 8, base_rng), {std::string(K::name), options}, rng, context);
  slot.set_path("block.a");
  slot.set_training(false);
  return slot;
}

}  // namespace

TEST_CASE("Adapter kinds: every adapter kind goes through the generic paths", "[adapters][kinds]") {
  using rankwise::test_support::same_bits;
  std::vector<std::string> seen;
  rankwise::for_each_adapter_kind([&](auto kind) {
    using K = decltype(kind);
    const std::string name(K::name);
    INFO("kind " << name);
    seen.push_back(name);
    // Shared tensors made once, as inject() makes them.
    Random context_rng(3);
    rankwise::AdapterContext<double> context;
    K::template prepare_context<double>(context, {.max_in = 8, .max_out = 8, .shared_rank = 4}, context_rng);

    // make_linear: the kind's layer under its name.
    AnyLinear<double> slot = kind_slot<K>(1, context);
    CHECK(slot.kind() == name);
    CHECK(slot.template get_if<typename K::template Layer<double>>() != nullptr);
    CHECK(rankwise::is_adapter_name(name));
    scramble(slot, 11);
    const Matrix<double> x = Matrix<double>::Random(8, 5);
    Matrix<double> y, y_back;
    slot.forward(x, y);

    // Its PEFT form: exported as LoRA exactly where it says so.
    if (K::peft_form == rankwise::PeftForm::Lora) {
      const auto factors = slot.lora_factors();
      REQUIRE(factors.has_value());
      Random base_rng(99);
      rankwise::Linear<double> base(8, 8, base_rng);  // the slot's base weights
      Matrix<double> lora_y;
      base.forward(x, lora_y);
      lora_y += factors->scale * factors->B * (factors->A * x);
      CHECK((lora_y - y).cwiseAbs().maxCoeff() < 1e-12);
    }
    if (K::peft_form == rankwise::PeftForm::None) CHECK_FALSE(slot.lora_factors().has_value());

    // save_state / load_state of the slot, found through the kind's layer type.
    rankwise::test_support::TempDir dir("kinds_" + name);
    std::vector<rankwise::NamedAdapter<AnyLinear<double>>> saved = {{"block.a", &slot}};
    rankwise::CheckpointWriter writer;
    writer.add("adapters", saved);
    writer.write(dir.path);
    AnyLinear<double> fresh = kind_slot<K>(2, context);
    fresh.forward(x, y_back);
    CHECK_FALSE(same_bits(y_back, y));
    std::vector<rankwise::NamedAdapter<AnyLinear<double>>> restored = {{"block.a", &fresh}};
    rankwise::CheckpointReader(dir.path).restore("adapters", restored);
    fresh.forward(x, y_back);
    CHECK(same_bits(y_back, y));

    // inject: the kind on one module, with rank patterns where the kind takes them.
    Random host_rng(5), inject_rng(6);
    KindsHost host(host_rng);
    rankwise::InjectionOptions options;
    options.adapter = {name, K::at_rank(2, 4.0, typename K::Options{})};
    options.target_modules = {"a"};
    options.vera_rank = 4;
    options.rank_pattern = {{"a", 1}};
    if (K::rank_patterned) {
      const rankwise::AdapterSet<double> set = rankwise::inject<double>(host, options, inject_rng);
      CHECK(set.paths() == std::vector<std::string>{"block.a"});
      CHECK(host.a.kind() == name);
      CHECK(host.b.kind() == "linear");
      CHECK(host.a.trainable_parameter_count() < kind_slot<K>(1, context).trainable_parameter_count());
    } else {
      CHECK_THROWS_WITH(rankwise::inject<double>(host, options, inject_rng),
                        Catch::Contains("rank_pattern and alpha_pattern apply to lora, dylora, erat (got \"" + name));
      CHECK(host.a.kind() == "linear");
      options.rank_pattern.clear();
      const rankwise::AdapterSet<double> set = rankwise::inject<double>(host, options, inject_rng);
      CHECK(host.a.kind() == name);
      CHECK((set.vera_projections() != nullptr) == (context.vera_projections != nullptr));
    }

    // Fine-tuning: a method of its own, at the kind's learning rate.
    const std::vector<std::string_view> methods = rankwise::finetune_adapter_names();
    CHECK(std::find(methods.begin(), methods.end(), K::name) != methods.end());
    CHECK(rankwise::recommended_lr(name) == K::recommended_lr);
  });
  CHECK(seen == std::vector<std::string>{"lora", "dylora", "erat", "vera", "red", "melora"});
  CHECK(rankwise::recommended_lr("alora") == rankwise::recommended_lr("lora"));
  CHECK_THROWS_WITH(rankwise::recommended_lr("qlora"), Catch::Contains("(got \"qlora\")"));
  // The options variant holds each option type once, after std::monostate.
  CHECK(std::variant_size_v<rankwise::AdapterOptions> == 6);
}
