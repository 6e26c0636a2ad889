#pragma once
/// \file rankwise/models/bora_host.hpp
/// BoRA across a whole model: any ModuleHost (models/adapter_set.hpp: anything with for_each_slot) gets
/// BoRA layers in the linear slots it names, and every batch is routed, and every prior gradient added,
/// through one call each instead of a loop over the model's modules in every training loop.
///
///   inject_bora(host, paths, options, rng)   each named slot (a Linear) becomes kind "bora" around it,
///                                            frozen; every path is checked before the host changes
///   bora_modules(host)                       every BoRA slot of the host, in the host's order, by path
///   set_task_routing(host, routing)          routes every BoRA slot (before each forward)
///   add_bora_prior_gradients(host)           the prior's gradient of every slot, once per step; returns
///                                            the total prior penalty (the loss term it differentiates)
///   set_bora_tau(host, tau)                  the prior's strength in every slot
/// A sequence-level routing for a batch of sequences: TaskRouting::by_sequence (adapters/bora.hpp).
/// Docs: docs/adapters/bora.md#in-a-model

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/adapters/bora.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/layers/linear.hpp>
#include <rankwise/models/adapter_set.hpp>

#include <set>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

/// A BoRA slot of a host, by path.
template <FloatScalar Scalar>
struct BoRAModule {
  std::string path;
  BoRA<Scalar>* layer = nullptr;
};

/// Every BoRA slot of `host`, in the host's order.
template <FloatScalar Scalar, ModuleHost<Scalar> Host>
std::vector<BoRAModule<Scalar>> bora_modules(Host& host) {
  std::vector<BoRAModule<Scalar>> out;
  host.for_each_slot([&](const std::string& path, AnyLinear<Scalar>& slot) {
    if (BoRA<Scalar>* layer = slot.template get_if<BoRA<Scalar>>()) out.push_back({path, layer});
  });
  return out;
}

/// Replaces each slot of `host` named in `paths` (each must hold a Linear) by a BoRA layer around it
/// (kind "bora", the base frozen), drawing the inits from `rng` in the order of `paths`. Every path is
/// checked (known, a Linear, named once, a valid rank for its shape) before anything changes.
/// Returns the new modules in the order of `paths`.
template <FloatScalar Scalar, ModuleHost<Scalar> Host>
std::vector<BoRAModule<Scalar>> inject_bora(Host& host, const std::vector<std::string>& paths,
                                            const BoRAOptions& options, Random& rng) {
  const char* where = "rankwise::inject_bora";
  if (paths.empty()) detail::fail(where, "paths must name at least one module (got none)");
  std::vector<std::pair<std::string, AnyLinear<Scalar>*>> slots;
  std::set<std::string> seen;
  for (const std::string& path : paths) {
    if (!seen.insert(path).second) detail::fail(where, "module '", path, "' is named twice");
    AnyLinear<Scalar>* found = nullptr;
    host.for_each_slot([&](const std::string& p, AnyLinear<Scalar>& slot) {
      if (p == path) found = &slot;
    });
    if (!found) detail::fail(where, "the model has no linear module '", path, "'");
    const Linear<Scalar>* base = found->template get_if<Linear<Scalar>>();
    if (!base)
      detail::fail(where, "module '", path, "' must hold a plain Linear (got kind \"", found->kind(), "\")");
    // The options against the module's shape, on a stand-in (no copy of the weight).
    try {
      Random trial_rng(0);
      BoRA<Scalar> trial(Linear<Scalar>(Matrix<Scalar>::Zero(base->out_features(), base->in_features()),
                                        std::nullopt, false),
                         options, trial_rng);
    } catch (const InvalidArgument& e) {
      detail::fail(where, "module '", path, "': ", e.what());
    }
    slots.emplace_back(path, found);
  }
  std::vector<BoRAModule<Scalar>> out;
  for (auto& [path, slot] : slots) {
    const bool training = slot->is_training();
    Linear<Scalar> base = std::move(*slot->template get_if<Linear<Scalar>>());
    base.set_trainable(false);
    AnyLinear<Scalar> adapted("bora", BoRA<Scalar>(std::move(base), options, rng));
    adapted.set_path(path);
    adapted.set_training(training);
    *slot = std::move(adapted);
    out.push_back({path, &slot->template as<BoRA<Scalar>>()});
  }
  return out;
}

/// Routes every BoRA slot of `host` by `routing`; returns how many slots were routed. Throws (nothing
/// changed) when the routing is for another task count than some slot's.
template <FloatScalar Scalar, ModuleHost<Scalar> Host>
Index set_task_routing(Host& host, const TaskRouting& routing) {
  const std::vector<BoRAModule<Scalar>> modules = bora_modules<Scalar>(host);
  for (const BoRAModule<Scalar>& m : modules)
    if (m.layer->tasks() != routing.tasks())
      detail::fail("rankwise::set_task_routing", "the routing is for ", routing.tasks(), " tasks, module '", m.path,
                   "' has ", m.layer->tasks());
  for (const BoRAModule<Scalar>& m : modules) m.layer->set_routing(routing);
  return Index(modules.size());
}

/// Adds the prior's gradient of every BoRA slot of `host` (once per step, after backward); returns the
/// prior penalty summed over the slots.
template <FloatScalar Scalar, ModuleHost<Scalar> Host>
double add_bora_prior_gradients(Host& host) {
  double penalty = 0.0;
  for (const BoRAModule<Scalar>& m : bora_modules<Scalar>(host)) penalty += m.layer->add_prior_gradient();
  return penalty;
}

/// Sets the prior's strength of every BoRA slot of `host` (tau >= 0, finite; checked before any change).
template <FloatScalar Scalar, ModuleHost<Scalar> Host>
void set_bora_tau(Host& host, double tau) {
  const std::vector<BoRAModule<Scalar>> modules = bora_modules<Scalar>(host);
  if (!modules.empty()) modules.front().layer->set_tau(tau);  // validates (throws before any change)
  for (const BoRAModule<Scalar>& m : modules) m.layer->set_tau(tau);
}

}  // namespace rankwise
