#pragma once
/// \file rankwise/adapters/factory.hpp
/// make_linear: builds a model slot (AnyLinear) around a base Linear from an adapter name and its
/// options, so a model can choose its adapters from a config at run time. The names are "linear"
/// (the base itself) and every kind of AdapterKinds (adapters/kinds.hpp): "lora", "dylora", "erat",
/// "vera" (the shared bank comes from the context), "red", "melora"; each takes its kind's options
/// (std::monostate: the kind's defaults). Typed access: slot.as<LoRA<float>>() etc.
/// Docs: docs/concepts/adapter.md

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/adapters/kinds.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/layers/linear.hpp>

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace rankwise {

/// What to put in a slot: an adapter name and its options.
struct AdapterSpec {
  std::string name = "lora";
  AdapterOptions options{};
};

/// The names make_linear() accepts: "linear" and every adapter kind.
inline std::vector<std::string_view> adapter_names() {
  std::vector<std::string_view> names = {"linear"};
  for (std::string_view n : adapter_kind_names()) names.push_back(n);
  return names;
}

inline bool is_adapter_name(std::string_view name) {
  for (std::string_view known : adapter_names())
    if (known == name) return true;
  return false;
}

namespace detail {

inline std::string adapter_options_name(const AdapterOptions& options) {
  if (std::holds_alternative<std::monostate>(options)) return "no options";
  std::string out = "unknown options";
  for_each_adapter_kind([&](auto kind) {
    if (std::holds_alternative<typename decltype(kind)::Options>(options)) out = decltype(kind)::options_name;
  });
  return out;
}

/// The options of type O from a spec: O's defaults for std::monostate, an error for another type.
template <typename O>
O adapter_options(const AdapterSpec& spec, std::string_view expected) {
  if (std::holds_alternative<std::monostate>(spec.options)) return O{};
  if (const O* options = std::get_if<O>(&spec.options)) return *options;
  fail("rankwise::make_linear", "adapter \"", spec.name, "\" takes ", expected, " (got ",
       adapter_options_name(spec.options), ")");
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
                   detail::adapter_options_name(spec.options), ")");
    return AnyLinear<Scalar>(std::move(base));
  }
  std::optional<AnyLinear<Scalar>> slot;
  visit_adapter_kind(name, [&](auto kind) {
    using K = decltype(kind);
    const typename K::Options options = detail::adapter_options<typename K::Options>(spec, K::options_name);
    slot.emplace(name, K::template make<Scalar>(std::move(base), options, rng, context));
  });
  if (!slot)
    detail::fail("rankwise::make_linear", "adapter name must be one of \"linear\", ", quoted_adapter_kind_names(),
                 " (got \"", name, "\")");
  return std::move(*slot);
}

}  // namespace rankwise
