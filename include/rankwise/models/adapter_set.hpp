#pragma once
/// \file rankwise/models/adapter_set.hpp
/// Adapters on any model: the ModuleHost concept, SlotList (a host made of slots the caller owns), and
/// inject(), which replaces the host's selected linear slots with adapters, like PEFT's get_peft_model,
/// and returns an AdapterSet: the one object that knows the adapted modules by path.
///
///   ModuleHost   anything with for_each_slot(f), calling f(path, AnyLinear&) for each linear slot
///                in a fixed order (ToyTransformer is one; a struct of AnyLinear members needs a
///                three-line member function, or a SlotList)
///   inject       targets by suffix (target_modules), by regex over the whole path (target_regex) or
///                all_linear; rank_pattern / alpha_pattern per module; any adapter kind by name.
///                Validates everything before the host changes; freezes the host's own parameters
///                when it lists them (parameters()), like PEFT
///   AdapterSet   modules() (path and slot), parameters() (the trainable ones, named after the path:
///                unique by construction), rank_modules() (for a RankAllocator), named_adapters() (for
///                save_peft_adapter / save_rankwise_adapter), merge() / unmerge(), summary(),
///                assign_values() (set parameter values by name, all or nothing)
/// The set refers to the host's slots: the host must outlive it and keep its slots at the same
/// addresses (a slot's layer lives on the heap, so moving the host itself is fine when its slots are
/// members of a heap object or of a model that is not moved). Docs: docs/models/adapter-set.md

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/factory.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/pattern.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/io/named_adapter.hpp>
#include <rankwise/rank/module.hpp>

#include <algorithm>
#include <concepts>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

namespace detail {
/// The scalar of a host: the one given, else the host's Scalar member type.
template <typename Host, typename Explicit>
struct host_scalar {
  using type = Explicit;
};
template <typename Host>
  requires requires { typename Host::Scalar; }
struct host_scalar<Host, void> {
  using type = typename Host::Scalar;
};

}  // namespace detail

/// What inject() needs from a model: its linear slots by path, in a fixed order.
template <typename Host, typename Scalar>
concept ModuleHost =
    FloatScalar<Scalar> && requires(Host& host, const std::function<void(const std::string&, AnyLinear<Scalar>&)>& f) {
      host.for_each_slot(f);
    };

/// A host whose parameters inject() can freeze (ToyTransformer; any model with parameters()).
template <typename Host, typename Scalar>
concept ParameterHost = requires(Host& host) {
  { host.parameters() } -> std::convertible_to<std::vector<Parameter<Scalar>*>>;
};

/// A host made of slots that live elsewhere, e.g. members of the caller's model. It refers to them:
/// each slot must outlive the list and stay at its address.
template <FloatScalar Scalar_>
class SlotList {
 public:
  using Scalar = Scalar_;
  /// Adds `slot` as `path`; InvalidArgument for an empty or repeated path or a slot listed twice.
  SlotList& add(std::string path, AnyLinear<Scalar>& slot) {
    if (path.empty()) detail::fail("rankwise::SlotList", "every slot needs a non-empty path");
    for (const Entry& e : m_entries) {
      if (e.path == path) detail::fail("rankwise::SlotList", "path '", path, "' is listed twice");
      if (e.slot == &slot) detail::fail("rankwise::SlotList", "slot '", path, "' is already listed as '", e.path, "'");
    }
    m_entries.push_back({std::move(path), &slot});
    return *this;
  }
  void for_each_slot(const std::function<void(const std::string&, AnyLinear<Scalar>&)>& f) {
    for (const Entry& e : m_entries) f(e.path, *e.slot);
  }
  Index size() const { return Index(m_entries.size()); }

 private:
  struct Entry {
    std::string path;
    AnyLinear<Scalar>* slot;
  };
  std::vector<Entry> m_entries;
};

struct InjectionOptions {
  AdapterSpec adapter{};                         ///< adapter name and options
  std::vector<std::string> target_modules{};     ///< suffix names
  std::string target_regex{};                    ///< or a regex over the whole path
  bool all_linear = false;                       ///< or every linear module but lm_head
  std::map<std::string, Index> rank_pattern{};   ///< per-module rank (LoRA: rank, DyLoRA: max_rank)
  std::map<std::string, double> alpha_pattern{}; ///< per-module alpha (LoRA, DyLoRA)
  Index vera_rank = 256;                       ///< rank of VeRA's shared bank (PEFT's default r)
};

/// One adapted module: its path and its slot (typed access through slot->as<T>()).
template <FloatScalar Scalar>
struct InjectedModule {
  std::string path;
  AnyLinear<Scalar>* slot = nullptr;
};

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

/// The adapted modules of one host, by path, in the host's order.
template <FloatScalar Scalar>
class AdapterSet {
 public:
  AdapterSet() = default;
  /// A set over modules the caller adapted by hand (inject() makes one for you); InvalidArgument for
  /// an empty or repeated path or a null slot.
  explicit AdapterSet(std::vector<InjectedModule<Scalar>> modules, AdapterContext<Scalar> context = {})
      : m_modules(std::move(modules)), m_context(std::move(context)) {
    std::set<std::string> seen;
    for (const InjectedModule<Scalar>& m : m_modules) {
      if (m.path.empty()) detail::fail("rankwise::AdapterSet", "every module needs a non-empty path");
      if (m.slot == nullptr) detail::fail("rankwise::AdapterSet", "module '", m.path, "' has a null slot");
      if (!seen.insert(m.path).second) detail::fail("rankwise::AdapterSet", "module path '", m.path, "' is listed twice");
    }
  }

  const std::vector<InjectedModule<Scalar>>& modules() const { return m_modules; }
  Index size() const { return Index(m_modules.size()); }
  /// The slot at `path`; InvalidArgument naming the adapted paths otherwise.
  AnyLinear<Scalar>& slot(const std::string& path) const {
    for (const InjectedModule<Scalar>& m : m_modules)
      if (m.path == path) return *m.slot;
    detail::fail("rankwise::AdapterSet", "no adapted module at path '", path, "'; the adapted paths are: ", paths_text());
  }
  std::vector<std::string> paths() const {
    std::vector<std::string> out;
    for (const InjectedModule<Scalar>& m : m_modules) out.push_back(m.path);
    return out;
  }
  /// What the modules share (VeRA's bank; empty for other kinds).
  const AdapterContext<Scalar>& context() const { return m_context; }
  /// VeRA's shared bank (null for other adapters).
  const std::shared_ptr<const VeRAProjections<Scalar>>& vera_projections() const { return m_context.vera_projections; }

  /// Every trainable parameter of the adapters, in module order, named "<path>.<name>" (unique).
  std::vector<Parameter<Scalar>*> parameters() const {
    std::vector<Parameter<Scalar>*> out;
    for (const InjectedModule<Scalar>& m : m_modules)
      for (Parameter<Scalar>* p : m.slot->parameters())
        if (p->trainable && std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
    return out;
  }

  /// Sets parameter values by name (assign_values(): all or nothing, shapes and finiteness checked),
  /// over every parameter of the adapted slots, frozen ones included. StateError, with nothing
  /// changed, while any adapter is merged (its base would no longer match its factors).
  void assign_values(const std::map<std::string, Matrix<Scalar>>& values, const AssignOptions& options = {}) {
    for (const InjectedModule<Scalar>& m : m_modules)
      if (m.slot->is_merged())
        detail::fail<StateError>("rankwise::AdapterSet", "assign_values: module '", m.path,
                                 "' is merged; unmerge() first (nothing was changed)");
    std::vector<Parameter<Scalar>*> all;
    for (const InjectedModule<Scalar>& m : m_modules)
      for (Parameter<Scalar>* p : m.slot->parameters())
        if (std::find(all.begin(), all.end(), p) == all.end()) all.push_back(p);
    rankwise::assign_values(all, values, options);
  }

  /// A RankModule per module for a RankAllocator or an importance estimator; InvalidArgument when a
  /// module's adapter cannot change its rank (only LoRA can today).
  std::vector<RankModule<Scalar>> rank_modules() const {
    std::vector<RankModule<Scalar>> out;
    for (const InjectedModule<Scalar>& m : m_modules) {
      LoRA<Scalar>* lora = m.slot->template get_if<LoRA<Scalar>>();
      if (lora == nullptr)
        detail::fail("rankwise::AdapterSet", "module '", m.path, "' holds a \"", m.slot->kind(),
                     "\" adapter, whose rank cannot change; rank allocation needs \"lora\"");
      out.emplace_back(*lora, m.path);
    }
    return out;
  }

  /// A DyLoRAModule per module for DyLoRAHook or ERATHook, each at the depth `depth_of` gives its
  /// path (0 without it; ERAT needs depths); InvalidArgument when a module is not DyLoRA or ERAT.
  std::vector<DyLoRAModule<Scalar>> dylora_modules(const std::function<Index(const std::string&)>& depth_of = {}) const {
    std::vector<DyLoRAModule<Scalar>> out;
    for (const InjectedModule<Scalar>& m : m_modules) {
      DyLoRA<Scalar>* dylora = m.slot->template get_if<DyLoRA<Scalar>>();
      if (dylora == nullptr)
        detail::fail("rankwise::AdapterSet", "module '", m.path, "' holds a \"", m.slot->kind(),
                     "\" adapter; DyLoRA's and ERAT's rank samplers need \"dylora\" or \"erat\"");
      out.push_back({m.path, dylora, depth_of ? depth_of(m.path) : Index(0)});
    }
    return out;
  }

  /// The modules as save_peft_adapter() and save_rankwise_adapter() take them.
  std::vector<NamedAdapter<AnyLinear<Scalar>>> named_adapters() const {
    std::vector<NamedAdapter<AnyLinear<Scalar>>> out;
    for (const InjectedModule<Scalar>& m : m_modules) out.push_back({m.path, m.slot});
    return out;
  }

  /// Folds every adapter into its base (zero inference overhead); StateError, with nothing changed,
  /// when a module cannot be merged or is merged already.
  void merge() {
    for (const InjectedModule<Scalar>& m : m_modules) {
      if (!m.slot->is_mergeable())
        detail::fail<StateError>("rankwise::AdapterSet", "module '", m.path, "' holds a \"", m.slot->kind(),
                                 "\" adapter, which cannot be merged; nothing was merged");
      if (m.slot->is_merged())
        detail::fail<StateError>("rankwise::AdapterSet", "module '", m.path, "' is merged already; nothing was merged");
    }
    for (const InjectedModule<Scalar>& m : m_modules) m.slot->merge();
  }
  /// Takes every adapter out of its base again; StateError, with nothing changed, unless all are merged.
  void unmerge() {
    for (const InjectedModule<Scalar>& m : m_modules)
      if (!m.slot->is_merged())
        detail::fail<StateError>("rankwise::AdapterSet", "module '", m.path, "' is not merged; nothing was unmerged");
    for (const InjectedModule<Scalar>& m : m_modules) m.slot->unmerge();
  }
  bool is_merged() const {
    return !m_modules.empty() && std::all_of(m_modules.begin(), m_modules.end(),
                                             [](const InjectedModule<Scalar>& m) { return m.slot->is_merged(); });
  }

  /// Sets train or eval mode on every adapter (dropout, caches).
  void set_training(bool training) {
    for (const InjectedModule<Scalar>& m : m_modules) m.slot->set_training(training);
  }
  void zero_grad() {
    for (const InjectedModule<Scalar>& m : m_modules) m.slot->zero_grad();
  }

  /// PEFT's print_trainable_parameters for the host of this set (summarize_parameters()).
  template <typename Host>
    requires ModuleHost<Host, Scalar>
  ParameterSummary summary(Host& host) const;

 private:
  std::string paths_text() const {
    std::string known;
    for (const InjectedModule<Scalar>& m : m_modules) known += (known.empty() ? "" : ", ") + m.path;
    return known.empty() ? "(none)" : known;
  }

  std::vector<InjectedModule<Scalar>> m_modules;
  AdapterContext<Scalar> m_context;
};

/// PEFT's print_trainable_parameters for `host`: every parameter the host lists (when it lists
/// them) and those of its slots; tensors shared between adapters (VeRA's bank) once.
template <typename ExplicitScalar = void, typename Host,
          typename Scalar = typename detail::host_scalar<Host, ExplicitScalar>::type>
  requires ModuleHost<Host, Scalar>
ParameterSummary summarize_parameters(Host& host) {
  ParameterSummary s;
  std::set<const Parameter<Scalar>*> seen;
  const auto count = [&](const Parameter<Scalar>* p) {
    if (!seen.insert(p).second) return;
    s.total += p->size();
    if (p->trainable) s.trainable += p->size();
  };
  if constexpr (ParameterHost<Host, Scalar>) {
    for (const Parameter<Scalar>* p : host.parameters()) count(p);
  }
  host.for_each_slot([&](const std::string&, AnyLinear<Scalar>& slot) {
    for (const Parameter<Scalar>* p : slot.parameters()) count(p);
    for (const Parameter<Scalar>* p : slot.shared_parameters()) count(p);
  });
  return s;
}

template <FloatScalar Scalar>
template <typename Host>
  requires ModuleHost<Host, Scalar>
ParameterSummary AdapterSet<Scalar>::summary(Host& host) const {
  return summarize_parameters<Scalar>(host);
}

/// True when `path` is `name` or ends with "." + name (PEFT's target_modules rule).
inline bool path_matches_suffix(const std::string& path, const std::string& name) {
  if (name.empty()) return false;
  if (path == name) return true;
  return path.size() > name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
         path[path.size() - name.size() - 1] == '.';
}

/// The paths among `paths` that the options select, in their order (without checking that any match).
inline std::vector<std::string> select_targets(const std::vector<std::string>& paths, const InjectionOptions& options) {
  const char* where = "rankwise::inject";
  int ways = int(!options.target_modules.empty()) + int(!options.target_regex.empty()) + int(options.all_linear);
  std::string_view default_target;  // the kind's own target when none is given (RED: mlp.down_proj)
  visit_adapter_kind(options.adapter.name, [&](auto kind) { default_target = decltype(kind)::default_target; });
  const bool kind_default = ways == 0 && !default_target.empty();
  if (ways != 1 && !kind_default)
    detail::fail(where, "give exactly one of target_modules, target_regex, all_linear (got ", ways, ")");
  std::optional<PathPattern> pattern;
  if (!options.target_regex.empty()) {
    std::string error;
    pattern = PathPattern::compile(options.target_regex, error);
    if (!pattern)
      detail::fail(where, "target_regex '", options.target_regex, "' is not a valid regular expression (", error, ")");
  }
  std::vector<std::string> selected;
  for (const std::string& path : paths) {
    bool take = false;
    if (kind_default)
      take = path_matches_suffix(path, std::string(default_target));
    else if (options.all_linear)
      take = path != "lm_head";
    else if (!options.target_regex.empty())
      take = pattern->full_match(path);
    else
      take = std::any_of(options.target_modules.begin(), options.target_modules.end(),
                         [&](const std::string& name) { return path_matches_suffix(path, name); });
    if (take) selected.push_back(path);
  }
  return selected;
}

/// The slot paths of `host`, in its order.
template <FloatScalar Scalar, typename Host>
  requires ModuleHost<Host, Scalar>
std::vector<std::string> slot_paths(Host& host) {
  std::vector<std::string> paths;
  host.for_each_slot([&](const std::string& path, AnyLinear<Scalar>&) { paths.push_back(path); });
  return paths;
}

namespace detail {
template <typename V>
const V* pattern_value(const std::map<std::string, V>& pattern, const std::string& path) {
  for (const auto& [key, value] : pattern)
    if (path_matches_suffix(path, key)) return &value;
  return nullptr;
}
}  // namespace detail

/// Replaces every selected linear slot of `host` with the adapter of `options` (its parameters named
/// after the path), freezes the host's own parameters when it lists them, and returns the set.
/// Strong guarantee for bad options: everything is validated and built before the host changes.
/// The scalar is the host's `Scalar` member type, or given: inject<float>(host, options, rng).
template <typename ExplicitScalar = void, typename Host,
          typename Scalar = typename detail::host_scalar<Host, ExplicitScalar>::type>
  requires ModuleHost<Host, Scalar>
AdapterSet<Scalar> inject(Host& host, const InjectionOptions& options, Random& rng) {
  const char* where = "rankwise::inject";
  bool rank_patterned = false;
  if (!visit_adapter_kind(options.adapter.name, [&](auto kind) { rank_patterned = decltype(kind)::rank_patterned; }))
    detail::fail(where, "adapter must be one of ", quoted_adapter_kind_names(), " (got \"", options.adapter.name, "\")");
  std::vector<std::string> paths;
  std::vector<AnyLinear<Scalar>*> slots;
  std::set<std::string> unique;
  host.for_each_slot([&](const std::string& path, AnyLinear<Scalar>& slot) {
    if (path.empty()) detail::fail(where, "the host lists a slot with an empty path");
    if (!unique.insert(path).second) detail::fail(where, "the host lists the path '", path, "' twice");
    paths.push_back(path);
    slots.push_back(&slot);
  });
  const std::vector<std::string> targets = select_targets(paths, options);
  if (targets.empty()) {
    std::string known;
    for (const std::string& p : paths) known += (known.empty() ? "" : ", ") + p;
    detail::fail(where, "the target pattern matches no module; the module paths are: ", known.empty() ? "(none)" : known);
  }
  if (!rank_patterned && (!options.rank_pattern.empty() || !options.alpha_pattern.empty())) {
    std::string patterned;
    for_each_adapter_kind([&](auto kind) {
      if (decltype(kind)::rank_patterned) patterned += (patterned.empty() ? "" : ", ") + std::string(decltype(kind)::name);
    });
    detail::fail(where, "rank_pattern and alpha_pattern apply to ", patterned, " (got \"", options.adapter.name, "\")");
  }
  for (const auto& [key, rank] : options.rank_pattern)
    if (rank < 1) detail::fail(where, "rank_pattern['", key, "'] must be >= 1 (got ", rank, ")");
  const auto slot_of = [&](const std::string& path) {
    return slots[std::size_t(std::find(paths.begin(), paths.end(), path) - paths.begin())];
  };

  // Tensors the kind shares between its modules (VeRA's bank), sized to the largest target.
  AdapterContext<Scalar> context;
  TargetShapes shapes{.shared_rank = options.vera_rank};
  for (const std::string& path : targets) {
    shapes.max_in = std::max(shapes.max_in, slot_of(path)->in_features());
    shapes.max_out = std::max(shapes.max_out, slot_of(path)->out_features());
  }
  visit_adapter_kind(options.adapter.name,
                     [&](auto kind) { decltype(kind)::template prepare_context<Scalar>(context, shapes, rng); });

  // Check every replacement first, so that a bad option leaves the host untouched: each is built once
  // over a stand-in of its module's shape (one at a time, freed at once) from a copy of the stream.
  // The real ones are then built around the modules' own bases, moved and not copied, from the same
  // draws: the host's weights are never held twice.
  std::vector<AdapterSpec> specs;
  Random trial_rng = rng;
  for (const std::string& path : targets) {
    AnyLinear<Scalar>& slot = *slot_of(path);
    const Linear<Scalar>* base = slot.template get_if<Linear<Scalar>>();
    if (base == nullptr)
      detail::fail(where, "module '", path, "' already holds a \"", slot.kind(),
                   "\" adapter; inject into a model with plain linear modules");
    AdapterSpec spec = options.adapter;
    if (rank_patterned) {
      const Index* rank = detail::pattern_value(options.rank_pattern, path);
      const double* alpha = detail::pattern_value(options.alpha_pattern, path);
      visit_adapter_kind(spec.name, [&](auto kind) {
        using K = decltype(kind);
        typename K::Options o = detail::adapter_options<typename K::Options>(spec, K::options_name);
        K::apply_pattern(o, rank, alpha);
        spec.options = o;
      });
    }
    try {
      Linear<Scalar> stand_in(Matrix<Scalar>::Zero(base->out_features(), base->in_features()),
                              base->has_bias() ? std::optional<Vector<Scalar>>(Vector<Scalar>::Zero(base->out_features()))
                                               : std::nullopt,
                              false);
      make_linear(std::move(stand_in), spec, trial_rng, context);
    } catch (const InvalidArgument& e) {
      detail::fail(where, "module '", path, "': ", e.what());
    }
    specs.push_back(std::move(spec));
  }
  // Nothing below throws but for a failed allocation.
  if constexpr (ParameterHost<Host, Scalar>) {
    for (Parameter<Scalar>* p : host.parameters()) p->trainable = false;
  }
  std::vector<InjectedModule<Scalar>> modules;
  for (std::size_t i = 0; i < targets.size(); ++i) {
    AnyLinear<Scalar>* slot = slot_of(targets[i]);
    const bool training = slot->is_training();
    Linear<Scalar> base = std::move(*slot->template get_if<Linear<Scalar>>());
    base.set_trainable(false);
    AnyLinear<Scalar> adapted = make_linear(std::move(base), specs[i], rng, context);
    adapted.set_path(targets[i]);
    adapted.set_training(training);
    *slot = std::move(adapted);
    modules.push_back({targets[i], slot});
  }
  return AdapterSet<Scalar>(std::move(modules), std::move(context));
}

}  // namespace rankwise
