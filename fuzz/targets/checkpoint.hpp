#pragma once
// Target "checkpoint": CheckpointReader and restore() on a structured input, the manifest
// (checkpoint.json) and the tensors file separated by the line "----8<----" (common.hpp). The
// tensors are written under the name the manifest gives when it is a valid
// "tensors-<g>.safetensors", else as "tensors-1.safetensors". Then every component the manifest
// names is restored into the component of models.hpp's CheckpointModel of its kind (a LoRA, DyLoRA,
// VeRA and its bank, MELoRA, RED, a parameter list, AdamW, SGD, a Random, a FisherImportance, a
// RankAllocator, a DyLoRASampler, a Trainer, a list of model slots of every kind), and into one
// other chosen by its name, whose loader must refuse it (restoring into all of them took ten times
// longer per input).
// Each restore either succeeds or throws a rankwise::Error; a refused restore leaves its target
// unchanged (except the Trainer, which restores part by part); a restored adapter
// runs a forward and backward pass, a restored optimizer or trainer takes a step.

#include "common.hpp"
#include "models.hpp"
#include "oracles.hpp"

#include <rankwise/io/checkpoint.hpp>
#include <rankwise/io/state.hpp>
#include <rankwise/models/trainer_state.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <system_error>
#include <vector>

namespace rankwise::fuzz {

namespace detail {
/// The tensors file name the manifest asks for, if it is one the reader accepts.
inline std::string checkpoint_tensors_name(std::string_view manifest) {
  try {
    const nlohmann::json j = nlohmann::json::parse(manifest);
    if (j.is_object() && j.contains("tensors") && j["tensors"].is_string()) {
      const std::string name = j["tensors"].get<std::string>();
      if (rankwise::detail::checkpoint_generation(name)) return name;
    }
  } catch (const nlohmann::json::exception&) {
  }
  return "tensors-1.safetensors";
}

/// The kind a component was saved as: its "kind", or for the three without one, what its keys say.
inline std::string saved_kind(const nlohmann::json& j) {
  if (j.contains("kind") && j["kind"].is_string()) return j["kind"].get<std::string>();
  if (j.contains("state")) return "random";
  if (j.contains("names")) return "parameters";
  if (j.contains("paths")) return "slots";
  return {};
}

/// Steps an optimizer over the model's parameters with a fixed gradient.
template <typename Optimizer>
void take_step(const std::string& what, Optimizer& optimizer, CheckpointModel& model) {
  try {
    for (Parameter<float>* p : model.params) p->grad.setConstant(p->value.rows(), p->value.cols(), 0.25f);
    optimizer.step();
  } catch (const Error& e) {
    throw Finding(what + ": a step after the restore failed: " + e.what());
  }
}
}  // namespace detail

inline int checkpoint(const std::uint8_t* data, std::size_t size) {
  static const std::filesystem::path dir = scratch("checkpoint");
  static std::string tensors_written;  // removed when the next input names another file
  const Parts parts = split_parts(data, size);
  const std::string tensors = detail::checkpoint_tensors_name(parts.first);
  if (!tensors_written.empty() && tensors_written != tensors) {
    std::error_code ignored;
    std::filesystem::remove(dir / tensors_written, ignored);
  }
  write_file(dir / "checkpoint.json", parts.first);
  write_file(dir / tensors, parts.second);
  tensors_written = tensors;

  std::optional<CheckpointReader> reader;
  attempt("CheckpointReader", [&] { reader.emplace(dir); });
  if (!reader) return 0;
  (void)reader->step();
  (void)reader->metadata();

  CheckpointModel model(11);
  CheckpointModel& m = model;
  // Each loader under the "kind" its component saves (the three without one: by their keys).
  using Loader = std::function<void(const std::string& name)>;
  const auto load = [&](const char* what, auto& target, auto&& after) {
    return [&reader, what, after, t = &target](const std::string& name) {
      const std::string on = "restore('" + name + "') into " + what;
      if (attempt(on, [&] { reader->restore(name, *t); }, [&] { return snapshot(*t); })) after(on);
    };
  };
  const auto nothing = [](const std::string&) {};
  const std::vector<std::pair<std::string, Loader>> loaders = {
      {"lora", load("LoRA", m.lora, [&](const std::string& on) { exercise(on, m.lora); })},
      {"dylora", load("DyLoRA", m.dylora, [&](const std::string& on) { exercise(on, m.dylora); })},
      {"vera", load("VeRA", m.vera, [&](const std::string& on) { exercise(on, m.vera); })},
      {"melora", load("MELoRA", m.melora, [&](const std::string& on) { exercise(on, m.melora); })},
      {"red", load("RED", m.red, [&](const std::string& on) { exercise(on, m.red); })},
      {"vera_projections",
       [&](const std::string& name) {
         attempt("read_vera_projections('" + name + "')", [&] {
           const std::shared_ptr<const VeRAProjections<float>> bank = read_vera_projections<float>(reader->component(name));
           if (bank->max_in() >= 8 && bank->max_out() >= 8) {
             VeRA<float> over(Linear<float>(8, 8, m.rng), bank);
             exercise("read_vera_projections('" + name + "')", over);
           }
         });
       }},
      {"parameters", load("parameters", m.params, nothing)},
      {"AdamW", load("AdamW", m.adamw, [&](const std::string& on) { detail::take_step(on, m.adamw, m); })},
      {"SGD", load("SGD", m.sgd, [&](const std::string& on) { detail::take_step(on, m.sgd, m); })},
      {"random", load("Random", m.generator, nothing)},
      {"fisher", load("FisherImportance", m.fisher, nothing)},
      {"rank_allocator", load("RankAllocator", m.allocator, nothing)},
      {"dylora_sampler", load("DyLoRASampler", m.sampler, nothing)},
      {"trainer",
       [&](const std::string& name) {
         const std::string on = "restore('" + name + "') into Trainer";
         if (!attempt(on, [&] { reader->restore(name, m.trainer); }) ||
             m.trainer.steps_done() >= m.trainer.options().steps)
           return;
         try {
           m.trainer.step([&] {
             for (Parameter<float>* p : m.params) p->grad.setConstant(0.25f);
             return 1.0;
           });
         } catch (const Error& e) {
           throw Finding(on + ": a step after the restore failed: " + e.what());
         }
       }},
      {"slots",
       [&](const std::string& name) {
         const std::string on = "restore('" + name + "') into slots";
         attempt(on, [&] { reader->restore(name, m.slots.modules); }, [&] { return snapshot(m.slots.modules); });
         for (const auto& slot : m.slots.modules) exercise(on + " '" + slot.path + "'", *slot.adapter);
       }},
  };
  for (const std::string& name : reader->components()) {
    const std::string kind = detail::saved_kind(reader->component(name).json());
    const std::size_t other = std::hash<std::string>{}(name) % loaders.size();  // one refusal too
    for (std::size_t i = 0; i < loaders.size(); ++i)
      if (loaders[i].first == kind || i == other) loaders[i].second(name);
  }
  return 0;
}

}  // namespace rankwise::fuzz
