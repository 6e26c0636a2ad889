#pragma once
/// \file rankwise/adapters/factory.hpp
/// make_linear: builds a model slot (AnyLinear) around a base Linear from an adapter name and its
/// options, so a model can choose its adapters from a config at run time.
///
///   name       layer built                      options (std::monostate: the kind's defaults)
///   "linear"   the base itself                  none
///   "lora"     LoRA<Scalar>                     LoRAOptions
///   "dylora"   DyLoRA<Scalar>                   DyLoRAOptions
///   "erat"     DyLoRA<Scalar> (windows set by   DyLoRAOptions
///              an ERATSampler each step)
///   "vera"     VeRA<Scalar>                     VeRAOptions; the shared bank comes from the context
///   "red"      RED<Scalar>                      REDOptions
///   "melora"   MELoRA<Scalar>                   MELoRAOptions
/// Typed access: slot.as<LoRA<float>>() etc. Docs: docs/concepts/adapter.md

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/melora.hpp>
#include <rankwise/adapters/red.hpp>
#include <rankwise/adapters/vera.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/layers/linear.hpp>

#include <array>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace rankwise {

/// The options of one adapter kind; std::monostate asks for the kind's defaults.
using AdapterOptions =
    std::variant<std::monostate, LoRAOptions, DyLoRAOptions, VeRAOptions, REDOptions, MELoRAOptions>;

/// What to put in a slot: an adapter name and its options.
struct AdapterSpec {
  std::string name = "lora";
  AdapterOptions options{};
};

/// What adapters of a whole model share: VeRA's projection bank (sized to the largest targeted layer).
template <FloatScalar Scalar>
struct AdapterContext {
  std::shared_ptr<const VeRAProjections<Scalar>> vera_projections;
};

/// The names make_linear() accepts.
inline constexpr std::array<std::string_view, 7> adapter_names = {"linear", "lora",  "dylora", "erat",
                                                                  "vera",   "red",   "melora"};

inline bool is_adapter_name(std::string_view name) {
  for (std::string_view known : adapter_names)
    if (known == name) return true;
  return false;
}

namespace detail {

inline const char* adapter_options_name(std::size_t index) {
  static constexpr std::array<const char*, 6> names = {"no options",  "LoRAOptions", "DyLoRAOptions",
                                                       "VeRAOptions", "REDOptions",  "MELoRAOptions"};
  return index < names.size() ? names[index] : "unknown options";
}

/// The options of type O from a spec: O's defaults for std::monostate, an error for another type.
template <typename O>
O adapter_options(const AdapterSpec& spec, const char* expected) {
  if (std::holds_alternative<std::monostate>(spec.options)) return O{};
  if (const O* options = std::get_if<O>(&spec.options)) return *options;
  fail("rankwise::make_linear", "adapter \"", spec.name, "\" takes ", expected, " (got ",
       adapter_options_name(spec.options.index()), ")");
}

}  // namespace detail

/// A slot holding `base` wrapped as `spec` says. Draws the adapter's random init from `rng`.
template <FloatScalar Scalar>
AnyLinear<Scalar> make_linear(Linear<Scalar> base, const AdapterSpec& spec, Random& rng,
                              const AdapterContext<Scalar>& context = {}) {
  const std::string& name = spec.name;
  if (name == "linear") {
    if (!std::holds_alternative<std::monostate>(spec.options))
      detail::fail("rankwise::make_linear", "adapter \"linear\" takes no options (got ",
                   detail::adapter_options_name(spec.options.index()), ")");
    return AnyLinear<Scalar>(std::move(base));
  }
  if (name == "lora")
    return AnyLinear<Scalar>(name, LoRA<Scalar>(std::move(base), detail::adapter_options<LoRAOptions>(spec, "LoRAOptions"), rng));
  if (name == "dylora" || name == "erat")
    return AnyLinear<Scalar>(
        name, DyLoRA<Scalar>(std::move(base), detail::adapter_options<DyLoRAOptions>(spec, "DyLoRAOptions"), rng));
  if (name == "vera") {
    const VeRAOptions options = detail::adapter_options<VeRAOptions>(spec, "VeRAOptions");
    if (!context.vera_projections)
      detail::fail("rankwise::make_linear", "adapter \"vera\" needs the model's shared projection bank in "
                                            "context.vera_projections (got none)");
    return AnyLinear<Scalar>(name, VeRA<Scalar>(std::move(base), context.vera_projections, options));
  }
  if (name == "red")
    return AnyLinear<Scalar>(name, RED<Scalar>(std::move(base), detail::adapter_options<REDOptions>(spec, "REDOptions")));
  if (name == "melora")
    return AnyLinear<Scalar>(
        name, MELoRA<Scalar>(std::move(base), detail::adapter_options<MELoRAOptions>(spec, "MELoRAOptions"), rng));
  detail::fail("rankwise::make_linear",
               "adapter name must be one of \"linear\", \"lora\", \"dylora\", \"erat\", \"vera\", \"red\", "
               "\"melora\" (got \"",
               name, "\")");
}

}  // namespace rankwise
