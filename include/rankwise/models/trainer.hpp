#pragma once
/// \file rankwise/models/trainer.hpp
/// The training loop of any model: AdamW over the parameters it is given, a learning-rate schedule,
/// gradient clipping, a skip for non-finite steps, and the training hooks (rank/hooks.hpp) around each
/// step. The model's forward, loss and backward are the caller's: a function Trainer::step() calls.
///
///   Trainer(params, options)       AdamW (or LoRA+ groups) over `params`; the run is options.steps long
///   allocate_ranks(modules, scores, schedule, rng)   a RankAllocator the loop drives (ALoRA); optimizers follow
///   add_hook(hook)                 DyLoRA's or ERAT's sampler, your own
///   step(f)                        hooks.before_step; zero_grad; loss = f() (forward, loss, backward);
///                                  clipping; schedule; AdamW; hooks.after_step. A step whose loss or
///                                  gradient is not finite changes nothing and runs no after_step.
///   finish()                       evaluation ranks, the allocator's report, NonFinite for skipped steps
/// Finetuner (models/finetune.hpp) is this loop with a recipe for the toy transformer.
/// Docs: docs/models/trainer.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/grad_clip.hpp>
#include <rankwise/optim/lr_schedule.hpp>
#include <rankwise/optim/optimizer.hpp>
#include <rankwise/rank/allocator.hpp>
#include <rankwise/rank/hooks.hpp>
#include <rankwise/rank/importance.hpp>
#include <rankwise/rank/module.hpp>

#include <cmath>
#include <concepts>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

/// How long a run is and how it updates. Every field is checked when the Trainer is made.
struct TrainerOptions {
  long steps = 0;                                ///< the run's length (the schedule and the allocator need it); >= 1
  double lr = 2e-3;                              ///< AdamW's peak learning rate (groups may set their own)
  double weight_decay = 0.0;
  ScheduleKind schedule = ScheduleKind::Linear;  ///< warm-up, then constant, linear or cosine decay
  long warmup_steps = -1;                        ///< -1: steps / 10
  double final_lr_factor = 0.0;                  ///< the factor the decay reaches at `steps`, in [0, 1]
  double clip_norm = 1.0;                        ///< global gradient-norm clipping; 0: none
};

/// The details of one step (step() itself returns the loss).
struct StepInfo {
  long step = 0;           ///< 1-based
  double loss = 0.0;
  double grad_norm = 0.0;  ///< before clipping
  double lr_factor = 0.0;
  bool skipped = false;    ///< non-finite loss or gradient: no update, no after_step hooks
  bool ranks_changed = false;
};

template <FloatScalar Scalar>
class Trainer {
 public:
  /// AdamW over `params` (each non-null, named uniquely: AdapterSet::parameters() is).
  Trainer(std::vector<Parameter<Scalar>*> params, const TrainerOptions& options)
      : m_options(checked(options)),
        m_params(std::move(params)),
        m_optimizer(m_params, {.lr = options.lr, .weight_decay = options.weight_decay}),
        m_schedule(schedule_of(options)) {
    init();
  }
  /// AdamW over parameter groups with their own rates (LoRA+: loraplus_groups()).
  Trainer(std::vector<ParameterGroup<Scalar>> groups, const TrainerOptions& options)
      : m_options(checked(options)),
        m_params(flatten(groups)),
        m_optimizer(std::move(groups), {.lr = options.lr, .weight_decay = options.weight_decay}),
        m_schedule(schedule_of(options)) {
    init();
  }

  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;
  Trainer(Trainer&&) = delete;  // the hooks hold pointers into this object
  Trainer& operator=(Trainer&&) = delete;

  // --- what runs around the step -----------------------------------------------------------------
  /// A RankAllocator over `modules` (AdapterSet::rank_modules()), scored by `estimator` (which must
  /// outlive the Trainer), driven after every update; the optimizer follows its surgery. An unset
  /// options.total_steps becomes the run's steps. One allocator per run (StateError for a second,
  /// or once training has started).
  RankAllocator<Scalar>& allocate_ranks(std::vector<RankModule<Scalar>> modules, ImportanceEstimator<Scalar>& estimator,
                                        RankAllocatorOptions options, Random& rng) {
    if (m_allocator) detail::fail<StateError>(where, "allocate_ranks: this run has a rank allocator already");
    if (m_step > 0) detail::fail<StateError>(where, "allocate_ranks after ", m_step, " steps: set it up before training");
    if (options.total_steps == 0) options.total_steps = m_options.steps;
    m_allocator = std::make_unique<RankAllocator<Scalar>>(std::move(modules), estimator, options, rng);
    m_allocator->add_optimizer(m_optimizer);
    m_allocator_hook = &m_hooks.add(std::make_unique<AllocatorHook<Scalar>>(*m_allocator));
    return *m_allocator;
  }
  /// Runs a hook the Trainer owns, after those added before it; returns it, typed.
  template <typename H>
    requires std::derived_from<H, TrainingHook>
  H& add_hook(std::unique_ptr<H> hook) {
    if (m_step > 0) detail::fail<StateError>(where, "add_hook after ", m_step, " steps: add hooks before training");
    return m_hooks.add(std::move(hook));
  }
  /// Runs a hook the caller owns (it must outlive the Trainer).
  void add_hook(TrainingHook& hook) {
    if (m_step > 0) detail::fail<StateError>(where, "add_hook after ", m_step, " steps: add hooks before training");
    m_hooks.add(hook);
  }

  // --- the step ------------------------------------------------------------------------------------
  /// One optimisation step. `loss_and_backward` runs the model's forward pass, its loss and its
  /// backward pass (accumulating into the parameters' gradients, which the Trainer has zeroed) and
  /// returns the loss. StateError after options.steps steps or after finish(); an exception from the
  /// function propagates with no update made.
  template <typename F>
    requires std::invocable<F&> && std::convertible_to<std::invoke_result_t<F&>, double>
  double step(F&& loss_and_backward) {
    if (m_finished) detail::fail<StateError>(where, "step() after finish(): the run is over");
    if (m_step >= m_options.steps)
      detail::fail<StateError>(where, "the run's ", m_options.steps, " steps are done; call finish()");
    // [snippet: step]
    m_hooks.before_step(m_step);  // samplers set the ranks this step trains
    for (Parameter<Scalar>* p : m_params) p->zero_grad();
    const double loss = static_cast<double>(loss_and_backward());
    StepInfo info;
    info.step = m_step + 1;
    info.loss = loss;
    info.grad_norm = m_options.clip_norm > 0.0 ? clip_grad_norm(m_params, m_options.clip_norm).norm
                                               : gradient_norm(m_params);
    info.lr_factor = m_schedule.factor(m_step);
    if (std::isfinite(loss) && std::isfinite(info.grad_norm)) {
      m_optimizer.set_lr_factor(info.lr_factor);
      m_optimizer.step();
      m_hooks.after_step(m_step);  // the allocator (a NonFinite round is abandoned and retried: its events())
      info.ranks_changed = m_allocator_hook != nullptr && m_allocator_hook->acted_at_last_step();
    } else {
      info.skipped = true;
      ++m_skipped;
    }
    // [snippet: step]
    ++m_step;
    m_losses.push_back(loss);
    m_last = info;
    return loss;
  }

  /// Ends the run: every hook's finish() (evaluation ranks, the allocator's report). Returns
  /// NotApplied when the allocator never acted, NonFinite when steps were skipped, Ok otherwise
  /// (message() says more). Calling it again returns the same status.
  Status finish() {
    if (m_finished) return m_status;
    m_status = m_hooks.finish();
    m_message = m_hooks.message();
    if (m_status == Status::Ok && m_skipped > 0) {
      m_status = Status::NonFinite;
      m_message = std::to_string(m_skipped) + " of " + std::to_string(m_step) +
                  " steps were skipped because their loss or gradient was not finite";
    }
    m_finished = true;
    return m_status;
  }
  /// Puts the adapters at the ranks they are evaluated and saved with (DyLoRA's r_max, ERAT's depth
  /// bounds); training may go on afterwards.
  void set_evaluation_ranks() { m_hooks.set_evaluation_ranks(); }

  /// Continues a run from a checkpoint (models/trainer_state.hpp restores it): `steps_done` steps
  /// taken, `skipped` of them skipped, their `losses`. The schedule and the hooks go on from there.
  /// StateError after finish(); InvalidArgument, with nothing changed, for counts no run can reach.
  void restore_progress(long steps_done, long skipped, std::vector<double> losses) {
    if (m_finished) detail::fail<StateError>(where, "restore_progress after finish(): the run is over");
    if (steps_done < 0 || steps_done > m_options.steps || skipped < 0 || skipped > steps_done ||
        losses.size() != static_cast<std::size_t>(steps_done))
      detail::fail(where, "restore_progress needs 0 <= skipped <= steps_done <= steps = ", m_options.steps,
                   " and a loss per step done (got steps_done ", steps_done, ", skipped ", skipped, ", ",
                   losses.size(), " losses)");
    m_step = steps_done;
    m_skipped = skipped;
    m_losses = std::move(losses);
    m_losses.reserve(static_cast<std::size_t>(m_options.steps));
    m_last = StepInfo{};
    m_last.step = steps_done;
  }

  /// The checks the constructor runs on `o` (the optimizer checks lr and weight_decay), with errors
  /// naming `caller`: for code that takes these options from its own configuration.
  static void check_options(const TrainerOptions& o, const char* caller) {
    if (o.steps < 1) detail::fail(caller, "steps must be >= 1 (got ", o.steps, ")");
    if (!(o.lr > 0.0) || !std::isfinite(o.lr)) detail::fail(caller, "lr must be a finite number > 0 (got ", o.lr, ")");
    if (!(o.weight_decay >= 0.0) || !std::isfinite(o.weight_decay))
      detail::fail(caller, "weight_decay must be a finite number >= 0 (got ", o.weight_decay, ")");
    if (o.warmup_steps < -1 || o.warmup_steps >= o.steps)
      detail::fail(caller, "warmup_steps must be -1 (steps / 10) or in [0, steps) = [0, ", o.steps, ") (got ",
                   o.warmup_steps, ")");
    if (!(o.clip_norm >= 0.0) || !std::isfinite(o.clip_norm))
      detail::fail(caller, "clip_norm must be a finite number >= 0 (got ", o.clip_norm, ")");
    if (!(o.final_lr_factor >= 0.0 && o.final_lr_factor <= 1.0))
      detail::fail(caller, "final_lr_factor must be in [0, 1] (got ", o.final_lr_factor, ")");
  }

  // --- state and reports ---------------------------------------------------------------------------
  long steps_done() const { return m_step; }
  long skipped_steps() const { return m_skipped; }
  bool is_finished() const { return m_finished; }
  /// finish()'s outcome (Ok before finish()) and why.
  Status status() const { return m_status; }
  const std::string& message() const { return m_message; }
  const std::vector<double>& losses() const { return m_losses; }
  const StepInfo& last_step() const { return m_last; }
  const TrainerOptions& options() const { return m_options; }
  const LRSchedule& schedule() const { return m_schedule; }
  const std::vector<Parameter<Scalar>*>& parameters() const { return m_params; }
  AdamW<Scalar>& optimizer() { return m_optimizer; }
  const AdamW<Scalar>& optimizer() const { return m_optimizer; }
  /// The rank allocator from allocate_ranks(), else nullptr.
  RankAllocator<Scalar>* allocator() { return m_allocator.get(); }
  const RankAllocator<Scalar>* allocator() const { return m_allocator.get(); }
  /// Every hook's ranks, by module path (the allocator's now, the samplers' evaluation ranks).
  std::map<std::string, Index> ranks() const { return m_hooks.ranks(); }

 private:
  static constexpr const char* where = "rankwise::Trainer";

  static const TrainerOptions& checked(const TrainerOptions& o) {
    check_options(o, where);
    return o;
  }

  static LRSchedule schedule_of(const TrainerOptions& o) {
    if (o.schedule == ScheduleKind::Constant) return LRSchedule::constant();
    const long warmup = o.warmup_steps < 0 ? o.steps / 10 : o.warmup_steps;
    return LRSchedule({o.schedule, warmup, o.steps, o.final_lr_factor});
  }

  static std::vector<Parameter<Scalar>*> flatten(const std::vector<ParameterGroup<Scalar>>& groups) {
    std::vector<Parameter<Scalar>*> out;
    for (const ParameterGroup<Scalar>& g : groups) out.insert(out.end(), g.parameters.begin(), g.parameters.end());
    return out;
  }

  void init() {
    if (m_params.empty()) detail::fail(where, "there is no parameter to train (got an empty list)");
    m_losses.reserve(static_cast<std::size_t>(m_options.steps));
  }

  TrainerOptions m_options;
  std::vector<Parameter<Scalar>*> m_params;
  AdamW<Scalar> m_optimizer;
  LRSchedule m_schedule;
  std::unique_ptr<RankAllocator<Scalar>> m_allocator;
  HookList m_hooks;  // after m_allocator: its hook borrows the allocator
  AllocatorHook<Scalar>* m_allocator_hook = nullptr;
  long m_step = 0;
  long m_skipped = 0;
  std::vector<double> m_losses;
  StepInfo m_last;
  bool m_finished = false;
  Status m_status = Status::Ok;
  std::string m_message;
};

}  // namespace rankwise
