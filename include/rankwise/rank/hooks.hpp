#pragma once
/// \file rankwise/rank/hooks.hpp
/// Training hooks: what a training loop calls around each step, so that DyLoRA's rank sampler,
/// ERAT-DLoRA's windows and the rank allocator run in any loop over any model, not only in Finetuner.
///
///   the loop    for t in 0 .. T-1:  hooks.before_step(t); zero_grad; forward; backward;
///                                   optimizer.step(); hooks.after_step(t)      (skip both on a bad step)
///               hooks.finish()      evaluation ranks, the allocator's final report
///   TrainingHook    the interface; every call has a default that does nothing
///   DyLoRAHook      one rank b ~ U{r_min .. r_max} per step for all its DyLoRA modules (DyLoRA's
///                   nested dropout); evaluates at r_max
///   ERATHook        a window [lo, b) per module per step (ERAT-DLoRA), from the module's depth and the
///                   step; evaluates at each depth's bound
///   AllocatorHook   RankAllocator::step() after every update, RankAllocator::finish() at the end
///   HookList        runs hooks in order; finish() returns the first status that is not Ok
/// Hooks borrow what they act on: the adapters and the allocator must outlive them.
/// Docs: docs/rank/hooks.md

#include <rankwise/adapters/dylora.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/rank/allocator.hpp>
#include <rankwise/rank/dylora_sampler.hpp>
#include <rankwise/rank/erat_sampler.hpp>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

/// What a training loop calls. `step` is 0-based; after_step() runs only after an update that was
/// applied (a loop that skips a step for a non-finite loss skips the hook too).
class TrainingHook {
 public:
  virtual ~TrainingHook() = default;
  virtual const char* name() const = 0;
  /// Before the forward pass: samplers set the ranks this step trains.
  virtual void before_step(long /*step*/) {}
  /// After the optimizer's update: allocators observe gradients and act.
  virtual void after_step(long /*step*/) {}
  /// Puts the adapters at the ranks they are evaluated and saved with (idempotent; training may go on
  /// after it, before_step() sets the training ranks again).
  virtual void set_evaluation_ranks() {}
  /// The end of training: evaluation ranks, and whatever the hook reports (Ok, NotApplied, NonFinite).
  virtual Status finish() {
    set_evaluation_ranks();
    return Status::Ok;
  }
  /// Why finish() returned what it did, or a summary; empty when there is nothing to say.
  virtual std::string message() const { return {}; }
  /// The rank of every module the hook controls, by path, as evaluated (empty when it controls none).
  virtual std::map<std::string, Index> ranks() const { return {}; }
};

namespace detail {

template <FloatScalar Scalar>
Index largest_max_rank(const char* where, const std::vector<DyLoRAModule<Scalar>>& modules) {
  if (modules.empty()) fail(where, "needs at least one DyLoRA module (got none)");
  Index r = 0;
  for (const DyLoRAModule<Scalar>& m : modules) {
    if (m.adapter == nullptr) fail(where, "module '", m.path, "' has no adapter (a null pointer)");
    r = std::max(r, m.adapter->max_rank());
  }
  return r;
}

}  // namespace detail

/// DyLoRA's training: every step one rank b ~ U{min_rank .. r_max} for the whole model (each module
/// uses min(b, its own r_max)); evaluation at each module's r_max.
template <FloatScalar Scalar>
class DyLoRAHook final : public TrainingHook {
 public:
  /// r_max is the largest max_rank() of `modules`. Forks its stream from `rng`.
  DyLoRAHook(std::vector<DyLoRAModule<Scalar>> modules, Random& rng, Index min_rank = 1)
      : m_modules(std::move(modules)),
        m_sampler(DyLoRASamplerOptions{.min_rank = min_rank,
                                       .max_rank = detail::largest_max_rank("rankwise::DyLoRAHook", m_modules)},
                  rng) {}

  const char* name() const override { return "dylora"; }
  void before_step(long) override {
    const Index b = m_sampler.sample();  // one rank for the whole model
    for (const DyLoRAModule<Scalar>& m : m_modules) m.adapter->set_active_rank(std::min(b, m.adapter->max_rank()));
  }
  void set_evaluation_ranks() override {
    for (const DyLoRAModule<Scalar>& m : m_modules) m.adapter->set_active_rank(m.adapter->max_rank());
  }
  std::map<std::string, Index> ranks() const override {
    std::map<std::string, Index> out;
    for (const DyLoRAModule<Scalar>& m : m_modules) out[m.path] = m.adapter->max_rank();
    return out;
  }

  const std::vector<DyLoRAModule<Scalar>>& modules() const { return m_modules; }
  /// The sampler (its stream, for checkpoints).
  DyLoRASampler& sampler() { return m_sampler; }

 private:
  std::vector<DyLoRAModule<Scalar>> m_modules;
  DyLoRASampler m_sampler;
};

/// ERAT-DLoRA's training: every step a window [lo, b) per module from ERATSampler (its depth and the
/// step decide the distribution); evaluation at min(depth bound, the module's r_max).
template <FloatScalar Scalar>
class ERATHook final : public TrainingHook {
 public:
  /// `options.max_rank` 0 takes the largest max_rank() of `modules`; every module's depth must be in
  /// [0, options.num_layers). Forks its stream from `rng`.
  ERATHook(std::vector<DyLoRAModule<Scalar>> modules, ERATSamplerOptions options, Random& rng)
      : m_modules(std::move(modules)), m_sampler(resolve(m_modules, options), rng) {
    for (const DyLoRAModule<Scalar>& m : m_modules) {
      if (m.depth < 0 || m.depth >= m_sampler.options().num_layers)
        detail::fail("rankwise::ERATHook", "module '", m.path, "' has depth ", m.depth,
                     " but depths must be in [0, num_layers = ", m_sampler.options().num_layers, ")");
      m_depths.push_back(m.depth);
    }
  }

  const char* name() const override { return "erat"; }
  void before_step(long step) override {
    m_sampler.sample_step(Index(step), m_depths, m_windows);  // a window per module
    for (std::size_t i = 0; i < m_modules.size(); ++i) {
      DyLoRA<Scalar>& d = *m_modules[i].adapter;
      const Index b = std::min(m_windows[i].b, d.max_rank());
      d.set_window(std::min(m_windows[i].lo, b - 1), b);
    }
  }
  void set_evaluation_ranks() override {
    for (std::size_t i = 0; i < m_modules.size(); ++i) m_modules[i].adapter->set_active_rank(evaluation_rank(i));
  }
  std::map<std::string, Index> ranks() const override {
    std::map<std::string, Index> out;
    for (std::size_t i = 0; i < m_modules.size(); ++i) out[m_modules[i].path] = evaluation_rank(i);
    return out;
  }

  /// min(b_max(depth), r_max) of module i.
  Index evaluation_rank(std::size_t i) const {
    return std::min(m_sampler.depth_bound(m_modules[i].depth), m_modules[i].adapter->max_rank());
  }
  const std::vector<DyLoRAModule<Scalar>>& modules() const { return m_modules; }
  ERATSampler& sampler() { return m_sampler; }

 private:
  static ERATSamplerOptions resolve(const std::vector<DyLoRAModule<Scalar>>& modules, ERATSamplerOptions options) {
    const Index largest = detail::largest_max_rank("rankwise::ERATHook", modules);
    if (options.max_rank == 0) options.max_rank = largest;
    return options;
  }

  std::vector<DyLoRAModule<Scalar>> m_modules;
  ERATSampler m_sampler;
  std::vector<Index> m_depths;
  std::vector<RankWindow> m_windows;
};

/// The rank allocator as a hook: step() after every update (it observes gradients, runs due rounds
/// and keeps the optimizers it was given in step with the surgery), finish() at the end.
template <FloatScalar Scalar>
class AllocatorHook final : public TrainingHook {
 public:
  explicit AllocatorHook(RankAllocator<Scalar>& allocator) : m_allocator(allocator) {}

  const char* name() const override { return "allocator"; }
  void after_step(long) override { m_last = m_allocator.step(); }
  Status finish() override { return m_allocator.finish(); }
  std::string message() const override { return m_allocator.message(); }
  std::map<std::string, Index> ranks() const override { return m_allocator.rank_pattern(); }

  /// The status of the last after_step() (NonFinite: the round was abandoned and will be retried).
  Status last_status() const { return m_last; }
  bool acted_at_last_step() const { return m_allocator.acted_at_last_step(); }
  RankAllocator<Scalar>& allocator() { return m_allocator; }
  const RankAllocator<Scalar>& allocator() const { return m_allocator; }

 private:
  RankAllocator<Scalar>& m_allocator;
  Status m_last = Status::Ok;
};

/// Hooks run in the order they were added, for every call.
class HookList {
 public:
  /// Adds a hook the list owns; returns it (typed, for the caller's own use).
  template <typename H>
    requires std::derived_from<H, TrainingHook>
  H& add(std::unique_ptr<H> hook) {
    if (!hook) detail::fail("rankwise::HookList", "add: the hook is null");
    H& ref = *hook;
    m_owned.push_back(std::move(hook));
    m_hooks.push_back(&ref);
    return ref;
  }
  /// Adds a hook the caller owns (it must outlive the list).
  void add(TrainingHook& hook) { m_hooks.push_back(&hook); }

  void before_step(long step) {
    for (TrainingHook* h : m_hooks) h->before_step(step);
  }
  void after_step(long step) {
    for (TrainingHook* h : m_hooks) h->after_step(step);
  }
  void set_evaluation_ranks() {
    for (TrainingHook* h : m_hooks) h->set_evaluation_ranks();
  }
  /// Every hook's finish(), in order; the first status that is not Ok (with that hook's message), else
  /// Ok with the messages joined.
  Status finish() {
    Status status = Status::Ok;
    m_message.clear();
    for (TrainingHook* h : m_hooks) {
      const Status s = h->finish();
      const std::string message = h->message();
      if (status == Status::Ok && s != Status::Ok) {
        status = s;
        m_message = message;
      } else if (status == Status::Ok && !message.empty()) {
        m_message += (m_message.empty() ? "" : "; ") + message;
      }
    }
    return status;
  }
  /// What the last finish() said.
  const std::string& message() const { return m_message; }
  /// The ranks every hook reports, merged (a later hook's entry wins for the same path).
  std::map<std::string, Index> ranks() const {
    std::map<std::string, Index> out;
    for (const TrainingHook* h : m_hooks)
      for (const auto& [path, rank] : h->ranks()) out[path] = rank;
    return out;
  }
  std::size_t size() const { return m_hooks.size(); }
  bool empty() const { return m_hooks.empty(); }

 private:
  std::vector<std::unique_ptr<TrainingHook>> m_owned;
  std::vector<TrainingHook*> m_hooks;
  std::string m_message;
};

}  // namespace rankwise
