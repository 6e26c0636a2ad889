#pragma once
/// \file rankwise/adapters/kinds.hpp
/// The adapter kinds: one traits struct per kind, and the one list (AdapterKinds) that the factory
/// (make_linear), injection (inject), the state files (io/adapter_state.hpp) and fine-tuning
/// (models/finetune.hpp) read instead of lists of their own.
///
///   kind       layer (Layer<S>)   options          rank patterns   PEFT form   learning rate
///   "lora"     LoRA<S>            LoRAOptions      rank, alpha     LoRA        2e-3
///   "dylora"   DyLoRA<S>          DyLoRAOptions    max_rank, alpha LoRA        2e-3
///   "erat"     DyLoRA<S>          DyLoRAOptions    max_rank, alpha LoRA        1e-2
///   "vera"     VeRA<S>            VeRAOptions      -               VeRA        1e-2
///   "red"      RED<S>             REDOptions       -               none        1e-2
///   "melora"   MELoRA<S>          MELoRAOptions    -               LoRA        2e-3
///
/// A new kind is its own header (the layer, its options and its save_state / load_state) and one
/// traits struct added to AdapterKinds below; concept AdapterKindTraits says what the struct holds.
/// Docs: docs/concepts/adapter.md#adding-an-adapter-kind

#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/melora.hpp>
#include <rankwise/adapters/red.hpp>
#include <rankwise/adapters/vera.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/layers/linear.hpp>

#include <algorithm>
#include <concepts>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace rankwise {

/// What the adapters of a whole model share: VeRA's projection bank (sized to the largest targeted
/// layer). A kind that shares a tensor between its modules prepares it in prepare_context().
template <FloatScalar Scalar>
struct AdapterContext {
  std::shared_ptr<const VeRAProjections<Scalar>> vera_projections;
};

/// How a kind's adapters are written for PEFT users (Finetuner::save_adapter, docs/io/peft-interop.md).
enum class PeftForm {
  Lora,  ///< as plain LoRA through lora_factors() (exact at the adapter's evaluation ranks)
  Vera,  ///< as PEFT's VeRA (the shared bank and the per-module vectors)
  None,  ///< PEFT has no form for it (rankwise's own files only)
};

/// The shapes of the modules an injection targets, for prepare_context().
struct TargetShapes {
  Index max_in = 0;
  Index max_out = 0;
  Index shared_rank = 0;  ///< InjectionOptions::vera_rank: the rank of a shared bank, where a kind has one
};

/// What a kind's traits struct provides.
template <typename K>
concept AdapterKindTraits = requires(typename K::Options& options, const Index* rank, const double* alpha,
                                     Linear<float> base, Random& rng, const AdapterContext<float>& context,
                                     AdapterContext<float>& prepared, const TargetShapes& shapes) {
  { K::name } -> std::convertible_to<std::string_view>;          // make_linear's name, the slot's kind()
  { K::options_name } -> std::convertible_to<std::string_view>;  // for error messages
  typename K::Options;                                          // default-constructible, the kind's defaults
  typename K::template Layer<float>;
  { K::rank_patterned } -> std::convertible_to<bool>;  // InjectionOptions::rank_pattern / alpha_pattern apply
  { K::peft_form } -> std::convertible_to<PeftForm>;
  { K::recommended_lr } -> std::convertible_to<double>;  // the peak learning rate of examples/finetune
  { K::default_target } -> std::convertible_to<std::string_view>;  // suffix adapted when no target is given, or ""
  { K::template make<float>(std::move(base), options, rng, context) } -> std::same_as<typename K::template Layer<float>>;
  K::apply_pattern(options, rank, alpha);                        // a module's rank / alpha from the patterns
  { K::at_rank(Index{}, double{}, options) } -> std::same_as<typename K::Options>;  // Finetuner: rank r, alpha
  K::template prepare_context<float>(prepared, shapes, rng);     // shared tensors of the whole injection
};

namespace detail {
template <typename T, typename Dependent>
struct deferred {  // T, named through a template parameter so that lookups in it wait for that parameter
  using type = T;
};
}  // namespace detail

namespace kinds {

/// Defaults for a kind without rank patterns or shared tensors.
struct KindDefaults {
  static constexpr bool rank_patterned = false;
  static constexpr PeftForm peft_form = PeftForm::Lora;
  static constexpr std::string_view default_target = "";
  template <typename Options>
  static void apply_pattern(Options&, const Index* rank, const double* alpha) {
    if (rank || alpha) detail::fail("rankwise::inject", "rank and alpha patterns do not apply to this kind");
  }
  template <typename Options>
  static Options at_rank(Index, double, Options o) {
    return o;
  }
  template <FloatScalar Scalar>
  static void prepare_context(AdapterContext<Scalar>&, const TargetShapes&, Random&) {}
};

/// A kind (Kind, which names its Layer) whose layer draws its init from the stream and whose rank (the
/// options' member `Rank`) and alpha follow the patterns: LoRA, DyLoRA.
template <typename Kind, typename Options_, Index Options_::*Rank>
struct RankPatternedKind : KindDefaults {
  using Options = Options_;
  static constexpr bool rank_patterned = true;
  // The return type names Kind through S, so that it is looked up when make<S> is used (Kind is still
  // incomplete where this base is instantiated) and no body is instantiated to deduce it.
  template <FloatScalar S>
  static typename detail::deferred<Kind, S>::type::template Layer<S> make(Linear<S> base, const Options& o,
                                                                          Random& rng, const AdapterContext<S>&) {
    return typename Kind::template Layer<S>(std::move(base), o, rng);
  }
  static void apply_pattern(Options& o, const Index* rank, const double* alpha) {
    if (rank) o.*Rank = *rank;
    if (alpha) o.alpha = *alpha;
  }
  static Options at_rank(Index rank, double alpha, Options o) {
    o.*Rank = rank;
    o.alpha = alpha;
    return o;
  }
};

struct LoRAKind : RankPatternedKind<LoRAKind, LoRAOptions, &LoRAOptions::rank> {
  static constexpr std::string_view name = "lora", options_name = "LoRAOptions";
  template <FloatScalar S>
  using Layer = LoRA<S>;
  static constexpr double recommended_lr = 2e-3;
};

struct DyLoRAKind : RankPatternedKind<DyLoRAKind, DyLoRAOptions, &DyLoRAOptions::max_rank> {
  static constexpr std::string_view name = "dylora", options_name = "DyLoRAOptions";
  template <FloatScalar S>
  using Layer = DyLoRA<S>;
  static constexpr double recommended_lr = 2e-3;
};

/// ERAT-DLoRA: a DyLoRA layer whose windows an ERATSampler sets each step (rank/hooks.hpp).
struct ERATKind : DyLoRAKind {
  static constexpr std::string_view name = "erat";
  static constexpr double recommended_lr = 1e-2;
};

struct VeRAKind : KindDefaults {
  static constexpr std::string_view name = "vera", options_name = "VeRAOptions";
  using Options = VeRAOptions;
  template <FloatScalar S>
  using Layer = VeRA<S>;
  static constexpr PeftForm peft_form = PeftForm::Vera;
  static constexpr double recommended_lr = 1e-2;
  template <FloatScalar S>
  static Layer<S> make(Linear<S> base, const Options& o, Random&, const AdapterContext<S>& context) {
    if (!context.vera_projections)
      detail::fail("rankwise::make_linear", "adapter \"vera\" needs the model's shared projection bank in "
                                            "context.vera_projections (got none)");
    return Layer<S>(std::move(base), context.vera_projections, o);
  }
  /// The bank, sized to the largest targeted layer, at the injection's shared rank.
  template <FloatScalar S>
  static void prepare_context(AdapterContext<S>& context, const TargetShapes& shapes, Random& rng) {
    if (shapes.shared_rank < 1)
      detail::fail("rankwise::inject", "vera_rank must be >= 1 (got ", shapes.shared_rank, ")");
    context.vera_projections =
        std::make_shared<const VeRAProjections<S>>(shapes.shared_rank, shapes.max_in, shapes.max_out, rng);
  }
};

struct REDKind : KindDefaults {
  static constexpr std::string_view name = "red", options_name = "REDOptions";
  using Options = REDOptions;
  template <FloatScalar S>
  using Layer = RED<S>;
  static constexpr PeftForm peft_form = PeftForm::None;
  static constexpr double recommended_lr = 1e-2;
  static constexpr std::string_view default_target = "mlp.down_proj";  // the paper edits the FFN outputs
  template <FloatScalar S>
  static Layer<S> make(Linear<S> base, const Options& o, Random&, const AdapterContext<S>&) {
    return Layer<S>(std::move(base), o);
  }
};

struct MELoRAKind : KindDefaults {
  static constexpr std::string_view name = "melora", options_name = "MELoRAOptions";
  using Options = MELoRAOptions;
  template <FloatScalar S>
  using Layer = MELoRA<S>;
  static constexpr double recommended_lr = 2e-3;
  template <FloatScalar S>
  static Layer<S> make(Linear<S> base, const Options& o, Random& rng, const AdapterContext<S>&) {
    return Layer<S>(std::move(base), o, rng);
  }
  /// n minis of rank r / n: the same equivalent rank as LoRA's r.
  static Options at_rank(Index rank, double alpha, Options o) {
    o.mini_rank = std::max<Index>(1, rank / std::max<Index>(1, o.n));
    o.alpha = alpha;
    return o;
  }
};

}  // namespace kinds

/// Every adapter kind the library knows, in the order of its lists and messages.
using AdapterKinds =
    std::tuple<kinds::LoRAKind, kinds::DyLoRAKind, kinds::ERATKind, kinds::VeRAKind, kinds::REDKind, kinds::MELoRAKind>;

namespace detail {
template <typename Tuple>
struct all_kinds_valid;
template <typename... K>
struct all_kinds_valid<std::tuple<K...>> : std::bool_constant<(AdapterKindTraits<K> && ...)> {};
static_assert(all_kinds_valid<AdapterKinds>::value, "every entry of AdapterKinds must satisfy AdapterKindTraits");

// std::variant<std::monostate, the kinds' option types without repeats>.
template <typename Variant, typename... Ts>
struct unique_variant {
  using type = Variant;
};
template <typename... Vs, typename T, typename... Ts>
struct unique_variant<std::variant<Vs...>, T, Ts...>
    : std::conditional_t<(std::is_same_v<T, Vs> || ...), unique_variant<std::variant<Vs...>, Ts...>,
                         unique_variant<std::variant<Vs..., T>, Ts...>> {};
template <typename Tuple>
struct kind_options_variant;
template <typename... K>
struct kind_options_variant<std::tuple<K...>> : unique_variant<std::variant<std::monostate>, typename K::Options...> {};
}  // namespace detail

/// The options of one adapter kind; std::monostate asks for the kind's defaults.
using AdapterOptions = typename detail::kind_options_variant<AdapterKinds>::type;

/// Calls f(K{}) for every kind K, in order.
template <typename F>
void for_each_adapter_kind(F&& f) {
  std::apply([&](auto... kind) { (f(kind), ...); }, AdapterKinds{});
}

/// Calls f(K{}) for the kind named `name` and returns true, or returns false when there is none.
template <typename F>
bool visit_adapter_kind(std::string_view name, F&& f) {
  bool found = false;
  for_each_adapter_kind([&](auto kind) {
    if (!found && decltype(kind)::name == name) {
      found = true;
      f(kind);
    }
  });
  return found;
}

/// The kinds' names, in order.
inline std::vector<std::string_view> adapter_kind_names() {
  std::vector<std::string_view> names;
  for_each_adapter_kind([&](auto kind) { names.push_back(decltype(kind)::name); });
  return names;
}

/// "\"lora\", \"dylora\", ..." for messages.
inline std::string quoted_adapter_kind_names() {
  std::string out;
  for (std::string_view n : adapter_kind_names()) out += (out.empty() ? "\"" : ", \"") + std::string(n) + "\"";
  return out;
}

}  // namespace rankwise
