#pragma once
/// \file rankwise/models/finetune.hpp
/// Training a ToyTransformer as library code: pretrain() (every weight, a task mixture) and Finetuner
/// (one fine-tuning run with an adapter chosen by name), so that examples and benchmarks share one loop.
/// Both are recipes over the generic loop, Trainer (models/trainer.hpp), which any model can use.
///
///   Finetuner(model, recipe, validation)   injects the recipe's adapters into a Trainer over the
///                 trainable parameters and gives it the training hooks (rank/hooks.hpp): DyLoRA's rank
///                 sampler, ERAT-DLoRA's windows, ALoRA's RankAllocator; add_hook() adds the caller's
///   step(batch)   checks the batch, then Trainer::step over the toy model's forward, the loss and
///                 dL/dlogits (a TrainingLoss: token cross-entropy unless another is given) and
///                 backward: samplers, clipping, schedule, AdamW, the allocator. Returns the loss.
///   finish()      evaluation ranks (DyLoRA r_max, ERAT depth bounds) and the allocator's finish():
///                 a run whose allocator never acted returns Status::NotApplied (report() says why)
///   evaluate()    exact match and loss on held-out sequences; save_adapter()/load_adapter() files
/// The allocator's hook lives inside step(), so it cannot be forgotten. Nothing here prints: progress
/// goes to a callback, outcomes to Status values and reports. Docs: docs/models/finetune.md

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/factory.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/melora.hpp>
#include <rankwise/adapters/red.hpp>
#include <rankwise/adapters/vera.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/io/atomic_file.hpp>
#include <rankwise/io/named_adapter.hpp>
#include <rankwise/io/peft.hpp>
#include <rankwise/io/rankwise_adapter.hpp>
#include <rankwise/layers/cross_entropy.hpp>
#include <rankwise/models/adapter_set.hpp>
#include <rankwise/models/tasks.hpp>
#include <rankwise/models/trainer.hpp>
#include <rankwise/models/toy_transformer.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/grad_clip.hpp>
#include <rankwise/optim/lr_schedule.hpp>
#include <rankwise/rank/allocator.hpp>
#include <rankwise/rank/hooks.hpp>
#include <rankwise/rank/dylora_sampler.hpp>
#include <rankwise/rank/erat_sampler.hpp>
#include <rankwise/rank/importance.hpp>
#include <rankwise/rank/module.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace rankwise {

// --- losses --------------------------------------------------------------------------------------

/// What a training loop minimises. A loss sees the whole batch, so one that needs more than the
/// target ids (a teacher's distributions, computed from batch.tokens or carried with the batch) plugs
/// in without changing the loop.
template <FloatScalar Scalar>
class TrainingLoss {
 public:
  virtual ~TrainingLoss() = default;
  /// Short name for reports ("cross_entropy").
  virtual const char* name() const = 0;
  /// The loss of `logits` (vocab x batch * seq_len) on `batch`; dL/dlogits is assigned to `dlogits`.
  virtual double forward_backward(const Matrix<Scalar>& logits, const TokenBatch& batch, Matrix<Scalar>& dlogits) = 0;
  /// The loss alone (the allocator's validation batch, evaluation).
  virtual double value(const Matrix<Scalar>& logits, const TokenBatch& batch) = 0;
};

/// Next-token cross-entropy on batch.targets (ignore_index positions are not scored): the default.
template <FloatScalar Scalar>
class TokenCrossEntropy final : public TrainingLoss<Scalar> {
 public:
  const char* name() const override { return "cross_entropy"; }
  double forward_backward(const Matrix<Scalar>& logits, const TokenBatch& batch, Matrix<Scalar>& dlogits) override {
    const double loss = m_ce.forward(logits, batch.targets);
    m_ce.backward(dlogits);
    return loss;
  }
  double value(const Matrix<Scalar>& logits, const TokenBatch& batch) override {
    return m_ce.forward(logits, batch.targets);
  }

 private:
  CrossEntropy<Scalar> m_ce;
};

// --- progress and evaluation -----------------------------------------------------------------------

/// One finished training step, for progress displays (the library never prints).
struct TrainingProgress {
  long step = 0;          ///< steps done, 1-based
  long total = 0;         ///< steps in the run
  double loss = 0.0;      ///< this step's loss
  double lr_factor = 0.0; ///< the schedule's factor used by this step
  Index tokens = 0;       ///< tokens in this step's batch
};
using ProgressCallback = std::function<void(const TrainingProgress&)>;

/// Exact match and mean token cross-entropy on held-out sequences.
struct Evaluation {
  double accuracy = 0.0;  ///< fraction of sequences whose every scored token is the argmax
  double loss = 0.0;      ///< mean over batches of the token cross-entropy
  Index sequences = 0;
};

namespace detail {

/// Sizes and ids of a batch against a model, before anything changes.
template <FloatScalar Scalar>
void check_batch(const char* where, const ToyTransformer<Scalar>& model, const TokenBatch& batch) {
  const ToyTransformerConfig& c = model.config();
  if (batch.batch < 1 || batch.seq_len < 1)
    fail(where, "a batch needs batch >= 1 and seq_len >= 1 (got ", batch.batch, " x ", batch.seq_len, ")");
  if (batch.seq_len > c.max_seq_len)
    fail(where, "sequences of ", batch.seq_len, " tokens are longer than the model's context max_seq_len = ",
         c.max_seq_len);
  const std::size_t n = std::size_t(batch.batch * batch.seq_len);
  if (batch.tokens.size() != n || batch.targets.size() != n)
    fail(where, "a batch of ", batch.batch, " x ", batch.seq_len, " needs ", n, " tokens and targets (got ",
         batch.tokens.size(), " and ", batch.targets.size(), ")");
  for (std::size_t i = 0; i < n; ++i) {
    if (batch.tokens[i] < 0 || batch.tokens[i] >= c.vocab)
      fail(where, "token id ", batch.tokens[i], " at position ", i, " is outside the vocabulary [0, ", c.vocab, ")");
    if (batch.targets[i] != ignore_index && (batch.targets[i] < 0 || batch.targets[i] >= c.vocab))
      fail(where, "target ", batch.targets[i], " at position ", i, " is outside the vocabulary [0, ", c.vocab,
           ") and is not ignore_index");
  }
}

template <FloatScalar Scalar>
void check_task(const char* where, const ToyTransformer<Scalar>& model, const TaskGenerator& task) {
  const TaskOptions& o = task.options();
  if (o.seq_len > model.config().max_seq_len)
    fail(where, "the task's sequences of ", o.seq_len, " tokens are longer than the model's context max_seq_len = ",
         model.config().max_seq_len);
  if (o.vocab > model.config().vocab)
    fail(where, "the task uses token ids up to ", o.vocab - 1, ", outside the model's vocabulary [0, ",
         model.config().vocab, ")");
}

/// The block index of "layers.{i}.<...>"; the deepest block for modules outside the blocks (lm_head).
inline Index module_depth(const std::string& path, Index layers) {
  const std::string prefix = "layers.";
  if (path.rfind(prefix, 0) == 0) {
    const std::size_t dot = path.find('.', prefix.size());
    const std::string number = path.substr(prefix.size(), dot == std::string::npos ? std::string::npos : dot - prefix.size());
    if (!number.empty() && number.size() < 7 && number.find_first_not_of("0123456789") == std::string::npos)
      return std::min<Index>(std::stol(number), layers - 1);
  }
  return layers - 1;
}

}  // namespace detail

/// Exact match and loss of `model` on `sequences` held-out sequences of `task`, drawn from
/// Random(seed) in batches of `batch` (a seed the training streams do not use). Evaluates in eval
/// mode and restores the model's training flag.
template <FloatScalar Scalar>
Evaluation evaluate_model(ToyTransformer<Scalar>& model, const TaskGenerator& task, Index sequences, Index batch = 32,
                          std::uint64_t seed = 0xE7A1) {
  const char* where = "rankwise::evaluate_model";
  if (sequences < 1 || batch < 1)
    detail::fail(where, "sequences and batch must be >= 1 (got ", sequences, " and ", batch, ")");
  detail::check_task(where, model, task);
  const bool training = model.is_training();
  model.set_training(false);
  Random rng(seed);
  Matrix<Scalar> logits;
  CrossEntropy<Scalar> ce;
  Evaluation result;
  double right = 0.0, loss = 0.0;
  Index batches = 0;
  while (result.sequences < sequences) {
    const Index b = std::min(batch, sequences - result.sequences);
    const TokenBatch data = task.sample(b, rng);
    model.forward(data.tokens, data.seq_len, logits);
    right += exact_match<Scalar>(data, logits) * double(b);
    loss += ce.forward(logits, data.targets);
    result.sequences += b;
    ++batches;
  }
  model.set_training(training);
  result.accuracy = right / double(result.sequences);
  result.loss = loss / double(batches);
  return result;
}

// --- pre-training ----------------------------------------------------------------------------------

/// How the base model is pre-trained: every weight, AdamW, warm-up then cosine decay, clipping.
struct PretrainRecipe {
  TaskKind task = TaskKind::Mixture;  ///< copy, reverse and grammar, one per sequence
  TaskOptions task_options{};
  long steps = 1500;
  Index batch = 32;                   ///< sequences per step
  double lr = 3e-3;
  double weight_decay = 0.01;
  long warmup_steps = -1;             ///< -1: steps / 20
  double final_lr_factor = 0.05;      ///< the cosine schedule ends at lr * final_lr_factor
  double clip_norm = 1.0;             ///< global gradient-norm clipping; 0: none
  std::uint64_t seed = 1;             ///< the model's initialisation (load_or_pretrain) and the data stream
};

struct PretrainResult {
  long steps = 0;
  long skipped_steps = 0;   ///< steps whose loss or gradient was not finite (no update)
  double final_loss = 0.0;  ///< mean loss of the last tenth of the steps
};

/// Trains every trainable parameter of `model` on recipe.task, drawing batches from a stream seeded
/// by recipe.seed. Calls `on_step` after every step.
template <FloatScalar Scalar>
PretrainResult pretrain(ToyTransformer<Scalar>& model, const PretrainRecipe& recipe, const ProgressCallback& on_step = {}) {
  const char* where = "rankwise::pretrain";
  if (recipe.warmup_steps < -1 || (recipe.steps >= 1 && recipe.warmup_steps >= recipe.steps))
    detail::fail(where, "warmup_steps must be -1 (steps / 20) or in [0, steps) = [0, ", recipe.steps, ") (got ",
                 recipe.warmup_steps, ")");
  const TrainerOptions options{.steps = recipe.steps, .lr = recipe.lr, .weight_decay = recipe.weight_decay,
                               .schedule = ScheduleKind::Cosine,
                               .warmup_steps = recipe.warmup_steps < 0 ? recipe.steps / 20 : recipe.warmup_steps,
                               .final_lr_factor = recipe.final_lr_factor, .clip_norm = recipe.clip_norm};
  Trainer<Scalar>::check_options(options, where);  // steps, clipping, the schedule's factor
  if (recipe.batch < 1) detail::fail(where, "batch must be >= 1 (got ", recipe.batch, ")");
  const TaskGenerator task(recipe.task, recipe.task_options);
  detail::check_task(where, model, task);
  std::vector<Parameter<Scalar>*> params;
  for (Parameter<Scalar>* p : model.parameters())
    if (p->trainable) params.push_back(p);
  if (params.empty()) detail::fail(where, "the model has no trainable parameter");
  Trainer<Scalar> trainer(params, options);
  Random rng(recipe.seed * 7919 + 1);
  TokenCrossEntropy<Scalar> loss_fn;
  Matrix<Scalar> logits, dlogits;
  PretrainResult result;
  const long tail = std::max(1L, recipe.steps / 10);
  double tail_sum = 0.0;
  model.set_training(true);
  for (long step = 0; step < recipe.steps; ++step) {
    const TokenBatch data = task.sample(recipe.batch, rng);
    const double loss = trainer.step([&] {
      model.zero_grad();
      model.forward(data.tokens, data.seq_len, logits);
      const double value = loss_fn.forward_backward(logits, data, dlogits);
      model.backward(dlogits);
      return value;
    });
    if (step >= recipe.steps - tail) tail_sum += loss;
    if (on_step) on_step({step + 1, recipe.steps, loss, trainer.last_step().lr_factor, Index(data.tokens.size())});
  }
  result.steps = trainer.steps_done();
  result.skipped_steps = trainer.skipped_steps();
  result.final_loss = tail_sum / double(tail);
  return result;
}

// --- fine-tuning ----------------------------------------------------------------------------------

/// The method names a FinetuneRecipe accepts: every adapter kind (adapters/kinds.hpp) and "alora",
/// LoRA whose ranks a RankAllocator moves (ALoRA, *Allocating* LoRA, arXiv:2403.16187 — not PEFT's
/// Activated LoRA; its files are plain LoRA).
inline std::vector<std::string_view> finetune_adapter_names() {
  std::vector<std::string_view> names = adapter_kind_names();
  names.push_back("alora");
  return names;
}

/// "lora, dylora, ..., alora": the methods, for messages.
inline std::string finetune_method_list() {
  std::string out;
  for (std::string_view n : finetune_adapter_names()) out += (out.empty() ? "" : ", ") + std::string(n);
  return out;
}

/// The peak learning rate examples/finetune uses for each method, the kind's recommended_lr: 2e-3 for
/// the LoRA family (LoRA, ALoRA, DyLoRA, MELoRA), 1e-2 for the methods that train few parameters per
/// module or a narrow window of ranks per step (VeRA, RED, ERAT), chosen on the toy tasks
/// (docs/models/finetune.md). InvalidArgument for an unknown method.
inline double recommended_lr(std::string_view adapter) {
  double lr = 0.0;
  if (!visit_adapter_kind(adapter == "alora" ? "lora" : adapter, [&](auto kind) { lr = decltype(kind)::recommended_lr; }))
    detail::fail("rankwise::recommended_lr", "adapter must be one of ", finetune_method_list(), " (got \"", adapter,
                 "\")");
  return lr;
}

/// Everything one fine-tuning run is made of, but the data.
struct FinetuneRecipe {
  std::string adapter = "lora";  ///< lora, dylora, erat, vera, red, melora, alora
  /// LoRA/ALoRA: rank; DyLoRA/ERAT: r_max; MELoRA: equivalent rank (melora_n minis of rank / melora_n);
  /// VeRA: see vera_rank; RED: unused.
  Index rank = 8;
  double alpha = 16.0;                        ///< LoRA, DyLoRA, ERAT, MELoRA
  /// PEFT's target_modules: names matched against the end of the module path ("q_proj",
  /// "attn.v_proj"), or {"all-linear"}. With target_regex empty too: every linear module but lm_head,
  /// for RED every mlp.down_proj (where RED edits).
  std::vector<std::string> target_modules{};
  std::string target_regex{};                 ///< or a regular expression over the whole path
  /// PEFT's rank_pattern and alpha_pattern (LoRA, DyLoRA, ERAT): per-module rank and alpha, keyed by
  /// module-path suffix or regular expression (models/adapter_set.hpp).
  std::map<std::string, Index> rank_pattern{};
  std::map<std::string, double> alpha_pattern{};
  AdapterOptions options{};                   ///< replaces the options built from rank and alpha (same kind)
  Index vera_rank = 0;                        ///< rank of VeRA's shared bank; 0: 16 x rank
  Index melora_n = 4;                         ///< MELoRA's number of minis
  bool dylora_frozen = false;                 ///< DyLoRA: train only component b - 1 (the paper) or all of [0, b)
  double lr = 2e-3;
  double weight_decay = 0.0;
  ScheduleKind schedule = ScheduleKind::Linear;
  long warmup_steps = -1;                     ///< -1: steps / 10
  double final_lr_factor = 0.0;
  long steps = 400;
  double clip_norm = 1.0;                     ///< global gradient-norm clipping; 0: none
  std::uint64_t seed = 1;                     ///< adapters' init, VeRA's bank, samplers, allocator (not the data)
  /// ALoRA's schedule; unset: K1 = steps / 5, K2 = steps / 10, N_A = 4 rounds, budget = initial ranks.
  std::optional<RankAllocatorOptions> allocator{};
  /// ALoRA's importance scores: "ablation" (AB-LoRA, the paper's; needs the validation batch),
  /// "drop_cost" (its leave-one-out half: the validation loss a rank's removal costs; what gain over
  /// cost always uses), "fisher" (the drop cost predicted from the training gradients: the empirical
  /// Fisher information of each rank's gate, FisherImportance), "sensitivity" (AdaLoRA's smoothed
  /// |w dL/dw| with its uncertainty) or "magnitude" (|B| |A| per rank, a cheap baseline).
  std::string importance = "ablation";
  /// AB-LoRA's validation batch is scored as this many equal parts (its sequences split in order):
  /// scores are the means over the parts, with their standard errors in the allocator's events.
  /// 1 <= validation_batches <= the validation batch's sequences.
  Index validation_batches = 1;
  /// "alora" with a prune-only allocator (pruning_schedule()): the adapters start at this multiple of
  /// `rank` (alpha scaled alike, so that every rank keeps the scale alpha / rank), and the budget, unless
  /// the allocator options set one, is `rank` x the number of adapted modules. >= 2.
  Index prune_start_factor = 3;
};

/// The end of a run, for summaries.
struct FinetuneReport {
  std::string adapter;
  long steps = 0;                      ///< steps taken
  long skipped_steps = 0;              ///< steps whose loss or gradient was not finite (no update)
  ParameterSummary parameters;         ///< trainable and total parameters now
  Status status = Status::Ok;          ///< finish()'s outcome (Ok before finish())
  std::string message;                 ///< why, when status is not Ok; the allocator's summary otherwise
  std::map<std::string, Index> ranks;  ///< ALoRA: rank per module now; DyLoRA/ERAT: evaluation rank
  std::string allocation_table;        ///< ALoRA: RankAllocator::format_table()
};

template <FloatScalar Scalar>
class Finetuner {
 public:
  /// Injects the recipe's adapters into `model` (which must hold plain linear layers and outlive the
  /// Finetuner). `validation` is the allocator's fixed batch for AB-LoRA scores: required for
  /// "alora", ignored otherwise. `loss` replaces token cross-entropy (for training and validation).
  /// `estimator`, when given, scores the ranks of an "alora" run in place of recipe.importance (any
  /// ImportanceEstimator: your own scores, or a control).
  /// A bad recipe throws InvalidArgument and leaves the model as it was (check_recipe() runs first).
  Finetuner(ToyTransformer<Scalar>& model, const FinetuneRecipe& recipe, const TokenBatch& validation = {},
            std::shared_ptr<TrainingLoss<Scalar>> loss = nullptr,
            std::shared_ptr<ImportanceEstimator<Scalar>> estimator = nullptr)
      : Finetuner(prechecked(model, recipe, validation), recipe, validation, std::move(loss), Unchecked{},
                  std::move(estimator)) {}

  Finetuner(const Finetuner&) = delete;
  Finetuner& operator=(const Finetuner&) = delete;
  Finetuner(Finetuner&&) = delete;  // the hooks hold pointers into this object
  Finetuner& operator=(Finetuner&&) = delete;

  /// Checks `recipe` against a model of `config` by setting it up on a scratch model, so that a
  /// program meets every set-up error before it pre-trains or writes anything.
  static void check_recipe(const ToyTransformerConfig& config, const FinetuneRecipe& recipe,
                           const TokenBatch& validation = {}) {
    Random rng(0);
    ToyTransformer<Scalar> scratch(config, rng);
    Finetuner probe(scratch, recipe, validation, nullptr, Unchecked{});
  }

  // --- the training step ------------------------------------------------------------------------
  /// One optimisation step on `batch`; returns its loss. Throws InvalidArgument for a batch that does
  /// not fit the model (nothing changes then), StateError after the recipe's steps or after finish().
  double step(const TokenBatch& batch) {
    if (m_trainer.is_finished()) detail::fail<StateError>(where, "step() after finish(): the run is over");
    if (m_trainer.steps_done() >= m_recipe.steps)
      detail::fail<StateError>(where, "the recipe's ", m_recipe.steps, " steps are done; call finish()");
    detail::check_batch(where, m_model, batch);
    // [snippet: step]
    return m_trainer.step([&] {  // hooks, zero_grad, this, clipping, schedule, AdamW, hooks (models/trainer.hpp)
      m_model.zero_grad();
      m_model.forward(batch.tokens, batch.seq_len, m_logits);
      const double loss = m_loss->forward_backward(m_logits, batch, m_dlogits);
      m_model.backward(m_dlogits);
      return loss;
    });
    // [snippet: step]
  }

  /// Ends training: every adapter at its evaluation rank, the allocator's finish(). Returns
  /// NotApplied when the allocator never acted, NonFinite when steps were skipped, Ok otherwise
  /// (report().message says more). Calling it again returns the same status.
  Status finish() { return m_trainer.finish(); }

  /// Exact match and loss of the model on held-out sequences of `task`, at the evaluation ranks.
  Evaluation evaluate(const TaskGenerator& task, Index sequences, Index batch = 32, std::uint64_t seed = 0xE7A1) {
    apply_evaluation_ranks();
    return evaluate_model(m_model, task, sequences, batch, seed);
  }

  // --- state and reports ----------------------------------------------------------------------------
  long steps_done() const { return m_trainer.steps_done(); }
  bool is_finished() const { return m_trainer.is_finished(); }
  const std::vector<double>& losses() const { return m_trainer.losses(); }
  const StepInfo& last_step() const { return m_trainer.last_step(); }
  const FinetuneRecipe& recipe() const { return m_recipe; }
  const AdapterSet<Scalar>& adapters() const { return m_adapters; }
  const LRSchedule& schedule() const { return m_trainer.schedule(); }
  AdamW<Scalar>& optimizer() { return m_trainer.optimizer(); }
  /// The generic loop this run drives (models/trainer.hpp).
  Trainer<Scalar>& trainer() { return m_trainer; }
  const Trainer<Scalar>& trainer() const { return m_trainer; }
  ToyTransformer<Scalar>& model() { return m_model; }
  const TrainingLoss<Scalar>& loss() const { return *m_loss; }
  /// Runs `hook` in every step after the Finetuner's own hooks (samplers, allocator), and in finish().
  /// The hook must outlive the Finetuner.
  void add_hook(TrainingHook& hook) { m_trainer.add_hook(hook); }
  /// The rank allocator of an "alora" run, else nullptr.
  const RankAllocator<Scalar>* allocator() const { return m_trainer.allocator(); }

  FinetuneReport report() const {
    FinetuneReport r;
    r.adapter = m_recipe.adapter;
    r.steps = m_trainer.steps_done();
    r.skipped_steps = m_trainer.skipped_steps();
    r.parameters = summarize_parameters(m_model);
    r.status = m_trainer.status();
    r.message = m_trainer.message();
    r.ranks = m_trainer.ranks();
    if (const RankAllocator<Scalar>* allocator = m_trainer.allocator()) {
      r.allocation_table = allocator->format_table();
      if (r.message.empty()) r.message = allocator->message();
    }
    return r;
  }

  /// The adapted modules as typed NamedAdapters (for the io/ functions): T is the adapter type
  /// (LoRA<Scalar>, DyLoRA<Scalar>, VeRA<Scalar>, ...) or AnyLinear<Scalar> for the slots themselves.
  template <typename T>
  std::vector<NamedAdapter<T>> adapters() const {
    std::vector<NamedAdapter<T>> out;
    for (const InjectedModule<Scalar>& m : m_adapters.modules()) {
      if constexpr (std::is_same_v<T, AnyLinear<Scalar>>)
        out.push_back({m.path, m.slot});
      else
        out.push_back({m.path, &m.slot->template as<T>()});
    }
    return out;
  }

  // --- files -----------------------------------------------------------------------------------------
  /// What save_adapter() wrote into its directory.
  struct SavedAdapter {
    std::filesystem::path dir;
    std::string peft_type;  ///< "LORA", "VERA", or empty when the kind has no PEFT form (RED)
  };

  /// Saves the adapters, at their evaluation ranks, into `dir`: rankwise's adapter directory
  /// (rankwise_adapter.json / .safetensors, the whole state, every kind) and, where PEFT has a form
  /// for the kind, PEFT's files next to them (adapter_config.json / adapter_model.safetensors): LoRA,
  /// ALoRA (rank_pattern), DyLoRA and ERAT at their evaluation ranks and MELoRA as plain LoRA, VeRA
  /// natively. Also writes finetune_recipe.json, the recipe as a record. Each file is atomic.
  SavedAdapter save_adapter(const std::filesystem::path& dir, const PeftSaveOptions& peft = {}) {
    apply_evaluation_ranks();
    SavedAdapter saved{dir, {}};
    save_rankwise_adapter(dir, adapters<AnyLinear<Scalar>>());
    PeftForm form = PeftForm::None;
    visit_adapter_kind(m_recipe.adapter == "alora" ? "lora" : m_recipe.adapter,
                       [&](auto kind) { form = decltype(kind)::peft_form; });
    if (form == PeftForm::Vera) {
      save_peft_vera(dir, adapters<VeRA<Scalar>>(), peft);
      saved.peft_type = "VERA";
    } else if (form == PeftForm::Lora) {
      save_peft_adapter(dir, adapters<AnyLinear<Scalar>>(), peft);
      saved.peft_type = "LORA";
    }
    write_file_atomically(dir / "finetune_recipe.json", recipe_json(m_recipe).dump(2) + "\n", peft.durable);
    return saved;
  }

  /// Loads rankwise's adapter directory written by save_adapter() from a run of the same recipe
  /// (same adapter kind, targets and seed) into this Finetuner's model, before any step.
  void load_adapter(const std::filesystem::path& dir) {
    if (const long done = m_trainer.steps_done(); done > 0)
      detail::fail<StateError>(where, "load_adapter() after ", done, " steps: load before training");
    load_rankwise_adapter(dir, adapters<AnyLinear<Scalar>>());
  }

  /// The recipe as JSON (finetune_recipe.json).
  static nlohmann::json recipe_json(const FinetuneRecipe& r) {
    nlohmann::json j;
    j["adapter"] = r.adapter;
    j["rank"] = r.rank;
    j["alpha"] = r.alpha;
    j["target_modules"] = r.target_modules;
    j["target_regex"] = r.target_regex;
    j["custom_options"] = !std::holds_alternative<std::monostate>(r.options);
    j["vera_rank"] = r.vera_rank;
    j["melora_n"] = r.melora_n;
    j["dylora_frozen"] = r.dylora_frozen;
    j["lr"] = r.lr;
    j["weight_decay"] = r.weight_decay;
    j["schedule"] = r.schedule == ScheduleKind::Constant ? "constant" : r.schedule == ScheduleKind::Linear ? "linear" : "cosine";
    j["warmup_steps"] = r.warmup_steps;
    j["final_lr_factor"] = r.final_lr_factor;
    j["steps"] = r.steps;
    j["clip_norm"] = r.clip_norm;
    j["seed"] = r.seed;
    j["importance"] = r.importance;
    j["validation_batches"] = r.validation_batches;
    if (r.allocator) {
      const RankAllocatorOptions& a = *r.allocator;
      j["allocator"] = {{"policy", a.policy == AllocationPolicy::GainOverCost ? "gain_over_cost"
                                   : a.policy == AllocationPolicy::PruneOnly  ? "prune_only"
                                                                              : "prune_and_reallocate"},
                        {"warmup_steps", a.warmup_steps}, {"rounds", a.rounds}, {"recovery_steps", a.recovery_steps},
                        {"ranks_per_round", a.ranks_per_round}};
    }
    return j;
  }

 private:
  static constexpr const char* where = "rankwise::Finetuner";

  struct Unchecked {};

  /// Sets the recipe up on `model` directly: a failure after the injection leaves the model adapted,
  /// which is why the public constructor first runs check_recipe() on a scratch model.
  Finetuner(ToyTransformer<Scalar>& model, const FinetuneRecipe& recipe, const TokenBatch& validation,
            std::shared_ptr<TrainingLoss<Scalar>> loss, Unchecked,
            std::shared_ptr<ImportanceEstimator<Scalar>> estimator = nullptr)
      : m_model(model),
        m_recipe(checked(model, recipe, validation)),
        m_rng(recipe.seed),
        m_adapters(inject(model, injection_options(recipe), m_rng)),
        m_loss(loss ? std::move(loss) : std::make_shared<TokenCrossEntropy<Scalar>>()),
        m_validation(split_sequences(validation, recipe.validation_batches)),
        m_estimator(std::move(estimator)),
        m_trainer(trainable_parameters(model), trainer_options(recipe)) {
    m_model.set_training(true);
    set_up_hooks();
  }

  static ToyTransformer<Scalar>& prechecked(ToyTransformer<Scalar>& model, const FinetuneRecipe& recipe,
                                            const TokenBatch& validation) {
    check_recipe(model.config(), recipe, validation);
    return model;
  }

  static bool is_method(std::string_view name) {
    const std::vector<std::string_view> names = finetune_adapter_names();
    return std::find(names.begin(), names.end(), name) != names.end();
  }

  /// The checks that do not need the model to change (the injection checks the rest, before it
  /// changes anything).
  static const FinetuneRecipe& checked(ToyTransformer<Scalar>& model, const FinetuneRecipe& r,
                                       const TokenBatch& validation) {
    if (!is_method(r.adapter))
      detail::fail(where, "adapter must be one of ", finetune_method_list(), " (got \"", r.adapter, "\")");
    if (r.rank < 1) detail::fail(where, "rank must be >= 1 (got ", r.rank, ")");
    if (!(r.alpha > 0.0) || !std::isfinite(r.alpha)) detail::fail(where, "alpha must be a finite number > 0 (got ", r.alpha, ")");
    Trainer<Scalar>::check_options(trainer_options(r), where);  // steps, warm-up, clipping, schedule
    if (r.vera_rank < 0) detail::fail(where, "vera_rank must be >= 0 (got ", r.vera_rank, ")");
    if (r.melora_n < 1) detail::fail(where, "melora_n must be >= 1 (got ", r.melora_n, ")");
    if (r.allocator && r.adapter != "alora")
      detail::fail(where, "allocator options apply to adapter \"alora\" (got \"", r.adapter, "\")");
    if (r.prune_start_factor < 2)
      detail::fail(where, "prune_start_factor must be >= 2 (got ", r.prune_start_factor, ")");
    if (prunes(r) && !r.rank_pattern.empty())
      detail::fail(where, "rank_pattern does not combine with a prune-only allocator, which chooses the ranks "
                          "(got ", r.rank_pattern.size(), " pattern(s))");
    const bool validated = r.importance == "ablation" || r.importance == "drop_cost";
    if (!validated && r.importance != "fisher" && r.importance != "sensitivity" && r.importance != "magnitude")
      detail::fail(where, "importance must be one of ablation, drop_cost, fisher, sensitivity, magnitude (got \"",
                   r.importance,
                   "\")");
    if (r.allocator && r.allocator->policy == AllocationPolicy::GainOverCost && !validated)
      detail::fail(where, "the gain-over-cost allocator compares drop costs, which need importance \"ablation\" or "
                   "\"drop_cost\" (got \"", r.importance, "\")");
    if (r.importance != "ablation" && r.adapter != "alora")
      detail::fail(where, "importance \"", r.importance, "\" applies to adapter \"alora\" (got \"", r.adapter, "\")");
    if (r.adapter == "alora" && validated) {
      if (validation.batch < 1)
        detail::fail(where, "adapter \"alora\" needs a validation batch for its importance scores (got none)");
      detail::check_batch(where, model, validation);
      if (r.validation_batches < 1 || r.validation_batches > validation.batch)
        detail::fail(where, "validation_batches must be in [1, sequences of the validation batch = ", validation.batch,
                     "] (got ", r.validation_batches, ")");
    }
    bool ranked = false;  // the model must still be a base model
    model.for_each_slot([&](const std::string&, AnyLinear<Scalar>& slot) {
      ranked = ranked || slot.kind() != "linear";
    });
    if (ranked)
      detail::fail(where, "the model already holds adapters; fine-tune a model with plain linear modules "
                          "(load the base again)");
    return r;
  }

  static InjectionOptions injection_options(const FinetuneRecipe& r) {
    InjectionOptions o;
    const std::string kind = r.adapter == "alora" ? "lora" : r.adapter;
    o.adapter.name = kind;
    if (!std::holds_alternative<std::monostate>(r.options)) {
      o.adapter.options = r.options;
    } else {
      // The kind's options at the recipe's rank and alpha (pruning runs start above the budget, at the
      // same scale), after the recipe's settings of particular kinds.
      const bool above = r.adapter == "alora" && prunes(r);
      const Index rank = above ? r.rank * r.prune_start_factor : r.rank;
      const double alpha = above ? r.alpha * double(r.prune_start_factor) : r.alpha;
      visit_adapter_kind(kind, [&](auto k) {
        using K = decltype(k);
        typename K::Options base{};
        if constexpr (std::is_same_v<typename K::Options, DyLoRAOptions>) base.frozen = r.dylora_frozen;
        if constexpr (std::is_same_v<typename K::Options, MELoRAOptions>) base.n = r.melora_n;
        o.adapter.options = K::at_rank(rank, alpha, base);
      });
    }
    o.vera_rank = r.vera_rank > 0 ? r.vera_rank : 16 * r.rank;  // used by kinds with a shared bank
    o.rank_pattern = r.rank_pattern;
    o.alpha_pattern = r.alpha_pattern;
    const bool all = r.target_modules.size() == 1 && r.target_modules.front() == "all-linear";
    if (all) {
      o.all_linear = true;
    } else if (!r.target_modules.empty()) {
      o.target_modules = r.target_modules;
    }
    o.target_regex = r.target_regex;
    std::string_view default_target;
    visit_adapter_kind(kind, [&](auto k) { default_target = decltype(k)::default_target; });
    if (r.target_modules.empty() && r.target_regex.empty() && default_target.empty()) o.all_linear = true;
    return o;
  }

  static bool prunes(const FinetuneRecipe& r) { return r.allocator && r.allocator->policy == AllocationPolicy::PruneOnly; }

  static std::vector<Parameter<Scalar>*> trainable_parameters(ToyTransformer<Scalar>& model) {
    std::vector<Parameter<Scalar>*> params;
    for (Parameter<Scalar>* p : model.parameters())
      if (p->trainable) params.push_back(p);
    return params;
  }

  static TrainerOptions trainer_options(const FinetuneRecipe& r) {
    return {.steps = r.steps, .lr = r.lr, .weight_decay = r.weight_decay, .schedule = r.schedule,
            .warmup_steps = r.warmup_steps, .final_lr_factor = r.final_lr_factor, .clip_norm = r.clip_norm};
  }

  void set_up_hooks() {
    const Index layers = m_model.config().layers;
    const auto depth = [layers](const std::string& path) { return detail::module_depth(path, layers); };
    if (m_recipe.adapter == "dylora")
      m_trainer.add_hook(std::make_unique<DyLoRAHook<Scalar>>(m_adapters.dylora_modules(), m_rng));
    else if (m_recipe.adapter == "erat")
      m_trainer.add_hook(std::make_unique<ERATHook<Scalar>>(
          m_adapters.dylora_modules(depth),
          ERATSamplerOptions{.max_rank = 0, .min_rank = 1, .total_steps = m_recipe.steps, .num_layers = layers}, m_rng));
    if (m_recipe.adapter == "alora") {
      std::vector<RankModule<Scalar>> modules = m_adapters.rank_modules();
      RankAllocatorOptions options;
      if (m_recipe.allocator) {
        options = *m_recipe.allocator;
      } else {
        options.warmup_steps = std::max(1L, m_recipe.steps / 5);     // K1
        options.rounds = 4;                                          // N_A
        options.recovery_steps = std::max(1L, m_recipe.steps / 10);  // K2
      }
      if (!m_estimator) {  // else the caller's
        if (m_recipe.importance == "fisher")
          m_estimator = std::make_unique<FisherImportance<Scalar>>();
        else if (m_recipe.importance == "sensitivity")
          m_estimator = std::make_unique<SensitivityImportance<Scalar>>();
        else if (m_recipe.importance == "magnitude")
          m_estimator = std::make_unique<MagnitudeImportance<Scalar>>();
        else
          m_estimator = std::make_unique<AblationImportance<Scalar>>(
              [this](Index part) { return validation_loss(part); }, Index(m_validation.size()),
              AblationImportanceOptions{.leave_one_out = options.policy == AllocationPolicy::GainOverCost ||
                                                         m_recipe.importance == "drop_cost"});
      }
      if (options.total_steps == 0) options.total_steps = m_recipe.steps;
      if (options.policy == AllocationPolicy::PruneOnly && !options.budget) {
        Index budget = 0;  // rank x modules, in the allocator's unit
        for (const RankModule<Scalar>& m : modules)
          budget += m_recipe.rank * (options.budget_unit == BudgetUnit::Parameters ? m.cost_per_rank() : 1);
        options.budget = budget;
      }
      m_trainer.allocate_ranks(std::move(modules), *m_estimator, options, m_rng);
    }
  }

  /// DyLoRA evaluates with every rank it trained (r_max), ERAT with each depth's bound.
  void apply_evaluation_ranks() { m_trainer.set_evaluation_ranks(); }

  /// `batch`'s sequences in `parts` consecutive groups of (nearly) equal size; nothing for an empty batch.
  static std::vector<TokenBatch> split_sequences(const TokenBatch& batch, Index parts) {
    std::vector<TokenBatch> out;
    if (batch.batch < 1) return out;
    parts = std::clamp<Index>(parts, 1, batch.batch);
    const std::size_t len = static_cast<std::size_t>(batch.seq_len);
    for (Index p = 0; p < parts; ++p) {
      const Index first = batch.batch * p / parts, last = batch.batch * (p + 1) / parts;
      TokenBatch part{.batch = last - first, .seq_len = batch.seq_len, .tokens = {}, .targets = {}};
      const auto from = static_cast<std::ptrdiff_t>(static_cast<std::size_t>(first) * len);
      const auto to = static_cast<std::ptrdiff_t>(static_cast<std::size_t>(last) * len);
      part.tokens.assign(batch.tokens.begin() + from, batch.tokens.begin() + to);
      part.targets.assign(batch.targets.begin() + from, batch.targets.begin() + to);
      out.push_back(std::move(part));
    }
    return out;
  }

  /// The loss on part `part` of the fixed validation batch, in eval mode (AB-LoRA's CE(M)).
  double validation_loss(Index part) {
    const TokenBatch& batch = m_validation[static_cast<std::size_t>(part)];
    const bool training = m_model.is_training();
    m_model.set_training(false);
    m_model.forward(batch.tokens, batch.seq_len, m_validation_logits);
    m_model.set_training(training);
    return m_loss->value(m_validation_logits, batch);
  }

  ToyTransformer<Scalar>& m_model;
  FinetuneRecipe m_recipe;
  Random m_rng;
  AdapterSet<Scalar> m_adapters;
  std::shared_ptr<TrainingLoss<Scalar>> m_loss;
  std::vector<TokenBatch> m_validation;  // the validation batch in validation_batches parts
  Matrix<Scalar> m_validation_logits;
  std::shared_ptr<ImportanceEstimator<Scalar>> m_estimator;  // before m_trainer: its allocator borrows it
  Trainer<Scalar> m_trainer;  // AdamW, the schedule, the hooks: DyLoRA's or ERAT's sampler, the allocator
  Matrix<Scalar> m_logits, m_dlogits;
};

}  // namespace rankwise
