#pragma once
/// \file rankwise/models/injection.hpp
/// inject_adapters: wraps the linear modules of a ToyTransformer that match a target pattern with an
/// adapter chosen by name, like PEFT's target_modules, and freezes everything else.
///
///   target_modules  names matched against the END of the module path at a dot boundary
///                   ("q_proj" matches layers.3.attn.q_proj; "attn.v_proj" too)
///   target_regex    an ECMAScript regular expression matched against the WHOLE path
///   all_linear      every linear module except lm_head (PEFT's "all-linear")
///   (exactly one of them; RED with none of them targets every block's mlp.down_proj, where RED edits)
///   rank_pattern, alpha_pattern   per-module overrides for LoRA and DyLoRA, keyed like PEFT's: a key
///                   matches a path that equals it or ends with "." + key
/// VeRA gets one bank of projections sized to the largest targeted input and output, shared by every
/// adapter (held once). Returns typed handles: path and slot, whose as<T>() gives the adapter.
/// Docs: docs/models/toy-transformer.md

#include <rankwise/adapters/factory.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/models/toy_transformer.hpp>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <regex>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

struct InjectionOptions {
  AdapterSpec adapter;                         ///< adapter name and options
  std::vector<std::string> target_modules;     ///< suffix names
  std::string target_regex;                    ///< or a regex over the whole path
  bool all_linear = false;                     ///< or every linear module but lm_head
  std::map<std::string, Index> rank_pattern;   ///< per-module rank (LoRA: rank, DyLoRA: max_rank)
  std::map<std::string, double> alpha_pattern; ///< per-module alpha (LoRA, DyLoRA)
  Index vera_rank = 256;                       ///< rank of VeRA's shared bank (PEFT's default r)
};

/// One adapted module: its path and its slot (typed access through slot->as<T>()).
template <FloatScalar Scalar>
struct InjectedModule {
  std::string path;
  AnyLinear<Scalar>* slot = nullptr;
};

template <FloatScalar Scalar>
struct Injection {
  std::vector<InjectedModule<Scalar>> modules;
  std::shared_ptr<const VeRAProjections<Scalar>> vera_projections;  ///< set for VeRA
};

/// True when `path` is `name` or ends with "." + name (PEFT's target_modules rule).
inline bool path_matches_suffix(const std::string& path, const std::string& name) {
  if (name.empty()) return false;
  if (path == name) return true;
  return path.size() > name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
         path[path.size() - name.size() - 1] == '.';
}

/// The paths of `model` the options select, in model order (without checking that any match).
template <FloatScalar Scalar>
std::vector<std::string> select_targets(const ToyTransformer<Scalar>& model, const InjectionOptions& options) {
  int ways = int(!options.target_modules.empty()) + int(!options.target_regex.empty()) + int(options.all_linear);
  const bool red_default = ways == 0 && options.adapter.name == "red";
  if (ways != 1 && !red_default)
    detail::fail("rankwise::inject_adapters", "give exactly one of target_modules, target_regex, all_linear (got ",
                 ways, ")");
  std::regex pattern;
  if (!options.target_regex.empty()) {
    try {
      pattern = std::regex(options.target_regex, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      detail::fail("rankwise::inject_adapters", "target_regex '", options.target_regex,
                   "' is not a valid regular expression (", e.what(), ")");
    }
  }
  std::vector<std::string> selected;
  for (const std::string& path : model.linear_paths()) {
    bool take = false;
    if (red_default)
      take = path_matches_suffix(path, "mlp.down_proj");
    else if (options.all_linear)
      take = path != "lm_head";
    else if (!options.target_regex.empty())
      take = std::regex_match(path, pattern);
    else
      take = std::any_of(options.target_modules.begin(), options.target_modules.end(),
                         [&](const std::string& name) { return path_matches_suffix(path, name); });
    if (take) selected.push_back(path);
  }
  return selected;
}

namespace detail {
template <typename V>
const V* pattern_value(const std::map<std::string, V>& pattern, const std::string& path) {
  for (const auto& [key, value] : pattern)
    if (path_matches_suffix(path, key)) return &value;
  return nullptr;
}
}  // namespace detail

/// Freezes the model, then replaces every selected linear module with the adapter of `options`.
/// Strong guarantee for bad options: everything is validated before the model changes.
template <FloatScalar Scalar>
Injection<Scalar> inject_adapters(ToyTransformer<Scalar>& model, const InjectionOptions& options, Random& rng) {
  if (!is_adapter_name(options.adapter.name) || options.adapter.name == "linear")
    detail::fail("rankwise::inject_adapters",
                 "adapter must be one of \"lora\", \"dylora\", \"erat\", \"vera\", \"red\", \"melora\" (got \"",
                 options.adapter.name, "\")");
  const std::vector<std::string> targets = select_targets(model, options);
  if (targets.empty()) {
    std::string known;
    for (const std::string& p : model.linear_paths()) known += (known.empty() ? "" : ", ") + p;
    detail::fail("rankwise::inject_adapters", "the target pattern matches no module; the module paths are: ", known);
  }
  const bool patterned = options.adapter.name == "lora" || options.adapter.name == "dylora" ||
                         options.adapter.name == "erat";
  if (!patterned && (!options.rank_pattern.empty() || !options.alpha_pattern.empty()))
    detail::fail("rankwise::inject_adapters", "rank_pattern and alpha_pattern apply to lora, dylora and erat (got \"",
                 options.adapter.name, "\")");
  for (const auto& [key, rank] : options.rank_pattern)
    if (rank < 1) detail::fail("rankwise::inject_adapters", "rank_pattern['", key, "'] must be >= 1 (got ", rank, ")");

  Injection<Scalar> result;
  AdapterContext<Scalar> context;
  if (options.adapter.name == "vera") {
    Index max_in = 0, max_out = 0;
    for (const std::string& path : targets) {
      max_in = std::max(max_in, model.linear(path).in_features());
      max_out = std::max(max_out, model.linear(path).out_features());
    }
    if (options.vera_rank < 1)
      detail::fail("rankwise::inject_adapters", "vera_rank must be >= 1 (got ", options.vera_rank, ")");
    result.vera_projections = std::make_shared<const VeRAProjections<Scalar>>(options.vera_rank, max_in, max_out, rng);
    context.vera_projections = result.vera_projections;
  }

  // Build every replacement first, so a bad option leaves the model untouched.
  std::vector<AnyLinear<Scalar>> built;
  for (const std::string& path : targets) {
    AnyLinear<Scalar>& slot = model.linear(path);
    const Linear<Scalar>* base = slot.template get_if<Linear<Scalar>>();
    if (base == nullptr)
      detail::fail("rankwise::inject_adapters", "module '", path, "' already holds a \"", slot.kind(),
                   "\" adapter; inject into a model with plain linear modules");
    AdapterSpec spec = options.adapter;
    if (patterned) {
      const Index* rank = detail::pattern_value(options.rank_pattern, path);
      const double* alpha = detail::pattern_value(options.alpha_pattern, path);
      if (options.adapter.name == "lora") {
        LoRAOptions o = detail::adapter_options<LoRAOptions>(spec, "LoRAOptions");
        if (rank) o.rank = *rank;
        if (alpha) o.alpha = *alpha;
        spec.options = o;
      } else {
        DyLoRAOptions o = detail::adapter_options<DyLoRAOptions>(spec, "DyLoRAOptions");
        if (rank) o.max_rank = *rank;
        if (alpha) o.alpha = *alpha;
        spec.options = o;
      }
    }
    Linear<Scalar> frozen = *base;
    frozen.set_trainable(false);
    try {
      built.push_back(make_linear(std::move(frozen), spec, rng, context));
    } catch (const InvalidArgument& e) {
      detail::fail("rankwise::inject_adapters", "module '", path, "': ", e.what());
    }
  }
  model.set_base_trainable(false);
  for (std::size_t i = 0; i < targets.size(); ++i) {
    model.replace_linear(targets[i], std::move(built[i]));
    result.modules.push_back({targets[i], &model.linear(targets[i])});
  }
  return result;
}

/// Trainable and total parameters of a model, like PEFT's print_trainable_parameters. Tensors shared
/// between adapters (VeRA's bank) are counted once.
struct ParameterSummary {
  Index trainable = 0;
  Index total = 0;
  double percent() const { return total ? 100.0 * double(trainable) / double(total) : 0.0; }
  /// "trainable params: 12,288 || all params: 842,624 || trainable%: 1.4583"
  std::string to_string() const {
    const auto grouped = [](Index v) {
      std::string digits = std::to_string(v), out;
      for (std::size_t i = 0; i < digits.size(); ++i) {
        if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
        out += digits[i];
      }
      return out;
    };
    char pct[32];
    std::snprintf(pct, sizeof pct, "%.4f", percent());
    return "trainable params: " + grouped(trainable) + " || all params: " + grouped(total) + " || trainable%: " + pct;
  }
};

template <FloatScalar Scalar>
ParameterSummary summarize_parameters(ToyTransformer<Scalar>& model) {
  ParameterSummary s;
  for (Parameter<Scalar>* p : model.parameters()) {
    s.total += p->size();
    if (p->trainable) s.trainable += p->size();
  }
  std::vector<const Parameter<Scalar>*> shared_seen;
  model.for_each_slot([&](const std::string&, AnyLinear<Scalar>& slot) {
    for (const Parameter<Scalar>* p : slot.shared_parameters())
      if (std::find(shared_seen.begin(), shared_seen.end(), p) == shared_seen.end()) {
        shared_seen.push_back(p);
        s.total += p->size();
      }
  });
  return s;
}

}  // namespace rankwise
