#pragma once
/// \file rankwise/io/peft_bora.hpp
/// BoRA's adapters as plain PEFT LoRA directories: one per task, `<dir>/task_<d>`, and one for the
/// global adapter Θ, `<dir>/global`. Each loads in PEFT or llama.cpp like any LoRA (read_peft_lora,
/// load_peft_adapter here) and computes exactly what its task computes in the BoRA model (in Joined
/// mode the task's directory holds Θ and the task's own delta stacked, rank 2r).
/// Docs: docs/adapters/bora.md#merge--export

#include <rankwise/adapters/bora.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/io/named_adapter.hpp>
#include <rankwise/io/peft.hpp>

#include <filesystem>
#include <string>
#include <vector>

namespace rankwise {

/// The directory save_peft_bora() writes task `task` to (−1: the global adapter).
inline std::filesystem::path peft_bora_directory(const std::filesystem::path& dir, Index task) {
  return task < 0 ? dir / "global" : dir / ("task_" + std::to_string(task));
}

/// Writes every task's adapter and the global one (see the file comment). Every module must have the
/// same number of tasks. Each file is written atomically, the weights before the config; the
/// directories one after the other, the global one first. Returns the configs, global first.
template <FloatScalar Scalar, typename Base>
std::vector<PeftConfig> save_peft_bora(const std::filesystem::path& dir,
                                       const std::vector<NamedAdapter<BoRA<Scalar, Base>>>& modules,
                                       const PeftSaveOptions& options = {}) {
  const char* where = "rankwise::save_peft_bora";
  detail::check_named_adapters(where, modules);
  if (modules.empty()) detail::fail(where, "there are no modules to save");
  const Index tasks = modules.front().adapter->tasks();
  for (const NamedAdapter<BoRA<Scalar, Base>>& m : modules)
    if (m.adapter->tasks() != tasks)
      detail::fail(where, "every module must have the same number of tasks (module '", modules.front().path, "' has ",
                   tasks, ", module '", m.path, "' has ", m.adapter->tasks(), ")");
  std::vector<PeftConfig> configs;
  for (Index task = -1; task < tasks; ++task) {
    std::vector<PeftLoRAModule<Scalar>> plain;
    for (const NamedAdapter<BoRA<Scalar, Base>>& m : modules) {
      PeftLoRAModule<Scalar> module{m.path, m.adapter->task_lora_factors(task)};
      module.use_rslora = m.adapter->options().use_rslora;
      module.init = m.adapter->options().init;
      plain.push_back(std::move(module));
    }
    configs.push_back(save_peft_lora(peft_bora_directory(dir, task), plain, options));
  }
  return configs;
}

}  // namespace rankwise
