#pragma once
/// \file rankwise/models/base_checkpoint.hpp
/// The pre-trained base model on disk: save_state / load_state for ToyTransformer (its configuration
/// is recorded and checked, so a checkpoint of another configuration is refused, naming what
/// differs, before anything changes), and load_or_pretrain(), which reuses a base cached in a
/// checkpoint directory (io/checkpoint.hpp) or pre-trains it and saves it there.
///
///   component "model"   tensors  every parameter by name (embed_tokens.weight, layers.0.attn.q_proj.weight, ...)
///                       settings {"kind": "toy_transformer", "config": {...}, "parameters": {"names": [...]}}
///   metadata "base"     the configuration, the pre-training recipe and its result
///   base_checkpoint_name(config, recipe)   a directory name that changes whenever the weights would
/// Only base models are saved this way: adapters go to their own files (Finetuner::save_adapter).
/// Docs: docs/models/finetune.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/io/checkpoint.hpp>
#include <rankwise/io/state.hpp>
#include <rankwise/models/finetune.hpp>
#include <rankwise/models/tasks.hpp>
#include <rankwise/models/toy_transformer.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace rankwise {

namespace detail {

inline nlohmann::json config_json(const ToyTransformerConfig& c) {
  return {{"vocab", c.vocab}, {"d_model", c.d_model}, {"heads", c.heads},
          {"layers", c.layers}, {"d_ff", c.d_ff}, {"max_seq_len", c.max_seq_len}};
}

inline nlohmann::json pretrain_recipe_json(const PretrainRecipe& r) {
  const TaskOptions& t = r.task_options;
  return {{"task", to_string(r.task)},
          {"task_options", {{"vocab", t.vocab}, {"seq_len", t.seq_len}, {"letters", t.letters},
                            {"min_length", t.min_length}, {"max_length", t.max_length},
                            {"max_digits", t.max_digits}, {"relabel_seed", t.relabel_seed}}},
          {"steps", r.steps}, {"batch", r.batch}, {"lr", r.lr}, {"weight_decay", r.weight_decay},
          {"warmup_steps", r.warmup_steps}, {"final_lr_factor", r.final_lr_factor},
          {"clip_norm", r.clip_norm}, {"seed", r.seed}};
}

/// Names every slot that holds an adapter (an empty string for a base model).
template <FloatScalar Scalar>
std::string adapted_slots(ToyTransformer<Scalar>& model) {
  std::string adapted;
  model.for_each_slot([&](const std::string& path, AnyLinear<Scalar>& slot) {
    if (slot.kind() != "linear") adapted += (adapted.empty() ? "'" : ", '") + path + "' (" + slot.kind() + ")";
  });
  return adapted;
}

}  // namespace detail

/// The base model: its configuration and every parameter by name. Throws StateError for a model
/// that holds adapters (save those with Finetuner::save_adapter or save_rankwise_adapter).
template <FloatScalar Scalar>
void save_state(StateWriter& out, const ToyTransformer<Scalar>& model) {
  auto& m = const_cast<ToyTransformer<Scalar>&>(model);  // parameters() and the slots are only read
  const std::string adapted = detail::adapted_slots(m);
  if (!adapted.empty())
    detail::fail<StateError>("rankwise::save_state", "a ToyTransformer is saved as a base model, but it holds adapters "
                             "at ", adapted, "; save the adapters with save_rankwise_adapter");
  out.json()["kind"] = "toy_transformer";
  out.json()["config"] = detail::config_json(model.config());
  StateWriter params = out.child("parameters");
  save_state(params, m.parameters());
}

/// Restores a base model saved by save_state. The configuration must be the model's (FormatError
/// naming every field that differs) and every parameter must be there with its shape; nothing
/// changes unless everything fits.
template <FloatScalar Scalar>
void load_state(const StateReader& in, ToyTransformer<Scalar>& model) {
  if (in.string("kind") != "toy_transformer") in.fail("holds a '", in.string("kind"), "', not a toy_transformer");
  const std::string adapted = detail::adapted_slots(model);
  if (!adapted.empty())
    detail::fail<StateError>("rankwise::load_state", "a base model is loaded before adapters are injected, but the "
                             "model holds adapters at ", adapted);
  const StateReader saved = in.child("config");
  const ToyTransformerConfig& c = model.config();
  const std::pair<const char*, Index> fields[] = {{"vocab", c.vocab}, {"d_model", c.d_model}, {"heads", c.heads},
                                                  {"layers", c.layers}, {"d_ff", c.d_ff},
                                                  {"max_seq_len", c.max_seq_len}};
  std::ostringstream theirs, ours;
  int differ = 0;
  for (const auto& [name, value] : fields) {
    const std::int64_t v = saved.integer(name);
    if (v == value) continue;
    theirs << (differ ? ", " : "") << name << ' ' << v;
    ours << (differ ? ", " : "") << name << ' ' << value;
    ++differ;
  }
  if (differ)
    in.fail("was saved from a model of another configuration (", theirs.str(), ") than this model's (", ours.str(),
            "); build the model with the checkpoint's configuration or pre-train a new base");
  load_state(in.child("parameters"), model.parameters());
}

/// A directory name for the base that `config` and `recipe` produce, readable and unique:
/// "toy-v128-d128-h4-l4-ff512-ctx32-mixture-1500steps-seed1-<8 hex digits of everything else>".
inline std::string base_checkpoint_name(const ToyTransformerConfig& config, const PretrainRecipe& recipe) {
  const std::string all = nlohmann::json({{"config", detail::config_json(config)},
                                          {"recipe", detail::pretrain_recipe_json(recipe)}})
                              .dump();
  std::uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (unsigned char ch : all) h = (h ^ ch) * 1099511628211ULL;
  char hex[9];
  std::snprintf(hex, sizeof hex, "%08x", unsigned(h ^ (h >> 32)));
  std::ostringstream os;
  os << "toy-v" << config.vocab << "-d" << config.d_model << "-h" << config.heads << "-l" << config.layers << "-ff"
     << config.d_ff << "-ctx" << config.max_seq_len << '-' << to_string(recipe.task) << '-' << recipe.steps
     << "steps-seed" << recipe.seed << '-' << hex;
  return os.str();
}

/// True when `dir` holds a checkpoint (checkpoint.json).
inline bool has_checkpoint(const std::filesystem::path& dir) {
  std::error_code ec;
  return std::filesystem::is_regular_file(dir / "checkpoint.json", ec);
}

/// Writes `model` (a base model) as the checkpoint in `dir`, with the recipe and result that made it.
template <FloatScalar Scalar>
void save_base_checkpoint(const std::filesystem::path& dir, const ToyTransformer<Scalar>& model,
                          const PretrainRecipe& recipe, const PretrainResult& result) {
  CheckpointWriter ckpt;
  ckpt.set_step(result.steps);
  ckpt.add("model", model);
  ckpt.metadata()["base"] = {{"config", detail::config_json(model.config())},
                             {"recipe", detail::pretrain_recipe_json(recipe)},
                             {"steps", result.steps},
                             {"skipped_steps", result.skipped_steps},
                             {"final_loss", std::isfinite(result.final_loss) ? nlohmann::json(result.final_loss)
                                                                             : nlohmann::json()}};
  ckpt.write(dir);
}

/// What a base checkpoint records about how it was made.
struct BaseCheckpointInfo {
  nlohmann::json recipe;  ///< the pre-training recipe (null when the checkpoint does not say)
  PretrainResult result;
};

/// Loads the base checkpoint in `dir` into `model` (see load_state for the checks).
template <FloatScalar Scalar>
BaseCheckpointInfo load_base_checkpoint(const std::filesystem::path& dir, ToyTransformer<Scalar>& model) {
  const CheckpointReader ckpt(dir);
  if (!ckpt.contains("model"))
    detail::fail<FormatError>("rankwise::load_base_checkpoint", "'", (dir / "checkpoint.json").string(),
                              "' is a checkpoint without a 'model' component, not a base model");
  ckpt.restore("model", model);
  BaseCheckpointInfo info;
  const nlohmann::json& base = ckpt.metadata().contains("base") ? ckpt.metadata()["base"] : nlohmann::json();
  if (base.is_object()) {
    info.recipe = base.value("recipe", nlohmann::json());
    info.result.steps = base.value("steps", 0L);
    info.result.skipped_steps = base.value("skipped_steps", 0L);
    const nlohmann::json& loss = base.contains("final_loss") ? base["final_loss"] : nlohmann::json();
    info.result.final_loss = loss.is_number() ? loss.get<double>() : std::numeric_limits<double>::quiet_NaN();
  }
  return info;
}

/// A base model and where it came from.
template <FloatScalar Scalar>
struct PretrainedBase {
  ToyTransformer<Scalar> model;
  bool loaded = false;      ///< true: read from the checkpoint; false: pre-trained now and saved
  bool same_recipe = true;  ///< the checkpoint's recorded recipe is the one asked for
  BaseCheckpointInfo info;  ///< the recipe and result that made it
};

/// The base of `config` pre-trained with `recipe`: read from `dir` when it holds a checkpoint (its
/// configuration must be `config`: FormatError otherwise, naming what differs), else built from
/// Random(recipe.seed), pre-trained (`on_step` after each step) and saved into `dir`.
template <FloatScalar Scalar>
PretrainedBase<Scalar> load_or_pretrain(const ToyTransformerConfig& config, const PretrainRecipe& recipe,
                                        const std::filesystem::path& dir, const ProgressCallback& on_step = {}) {
  Random rng(recipe.seed);
  PretrainedBase<Scalar> base{ToyTransformer<Scalar>(config, rng), false, true, {}};
  if (has_checkpoint(dir)) {
    base.info = load_base_checkpoint(dir, base.model);
    base.loaded = true;
    base.same_recipe = base.info.recipe == detail::pretrain_recipe_json(recipe);
    return base;
  }
  base.info.result = pretrain(base.model, recipe, on_step);
  base.info.recipe = detail::pretrain_recipe_json(recipe);
  save_base_checkpoint(dir, base.model, recipe, base.info.result);
  return base;
}

}  // namespace rankwise
