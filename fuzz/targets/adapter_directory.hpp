#pragma once
// Target "adapter_directory": the adapter directory loaders on a structured input, a config and a
// weights file separated by the line "----8<----" (common.hpp: part_separator; no separator: all is
// config, the weights file is empty). The two parts are written both as a PEFT directory
// (adapter_config.json, adapter_model.safetensors) and as rankwise's own adapter directory
// (rankwise_adapter.json, rankwise_adapter.safetensors), and every loader runs on them:
//   read_peft_lora, load_peft_adapter into LoRA adapters (models.hpp: LoRAModel);
//   read_peft_vera, load_peft_adapter into VeRA adapters built over the projections just read;
//   load_rankwise_adapter into a slot of every adapter kind (models.hpp: SlotModel).
// Each either succeeds or throws a rankwise::Error. A refused PEFT load leaves every adapter as it
// was; a loaded adapter runs a forward and backward pass. rankwise's loader restores module after
// module (a refused module is unchanged, those before it are loaded), so after it every slot, loaded
// or not, must run.

#include "common.hpp"
#include "models.hpp"
#include "oracles.hpp"

#include <rankwise/io/adapter_state.hpp>
#include <rankwise/io/peft.hpp>
#include <rankwise/io/rankwise_adapter.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace rankwise::fuzz {

inline int adapter_directory(const std::uint8_t* data, std::size_t size) {
  static const std::filesystem::path dir = scratch("adapter_directory");
  const Parts parts = split_parts(data, size);
  write_file(dir / "adapter_config.json", parts.first);
  write_file(dir / "adapter_model.safetensors", parts.second);
  write_file(dir / "rankwise_adapter.json", parts.first);
  write_file(dir / "rankwise_adapter.safetensors", parts.second);

  // PEFT LoRA: what read_peft_lora returns holds together.
  attempt("read_peft_lora", [&] {
    const PeftLoRAAdapter<float> file = read_peft_lora<float>(dir);
    for (const PeftLoRAModule<float>& m : file.modules)
      require(m.factors.A.rows() == m.factors.B.cols() && m.factors.A.rows() >= 1 && std::isfinite(m.factors.scale) &&
                  m.factors.scale > 0.0,
              "read_peft_lora: module '" + m.path + "' has factors of different ranks or a scale that is not finite and > 0");
  });

  LoRAModel loras(1);
  const bool lora_loaded = attempt(
      "load_peft_adapter (LoRA)", [&] { load_peft_adapter(dir, loras.modules); }, [&] { return snapshot_all(loras.layers); });
  if (lora_loaded)
    for (const auto& m : loras.modules) exercise("load_peft_adapter (LoRA) '" + m.path + "'", *m.adapter);

  // PEFT VeRA: read the projections, build the adapters that fit over them, load.
  std::optional<PeftVeRAAdapter<float>> vera_file;
  attempt("read_peft_vera", [&] { vera_file = read_peft_vera<float>(dir); });
  if (vera_file) {
    const VeRAProjections<float>& bank = *vera_file->projections;
    for (const PeftVeRAModule<float>& m : vera_file->modules)
      require(m.lambda_d.rows() == bank.rank() && m.lambda_d.cols() == 1 && m.lambda_b.cols() == 1 &&
                  m.lambda_b.rows() <= bank.max_out(),
              "read_peft_vera: module '" + m.path + "' has vectors that do not fit the projections");
    VeRAModel veras(2, vera_file->projections);
    if (!veras.modules.empty()) {
      const bool vera_loaded = attempt(
          "load_peft_adapter (VeRA)", [&] { load_peft_adapter(dir, veras.modules); },
          [&] { return snapshot_all(veras.layers); });
      if (vera_loaded)
        for (const auto& m : veras.modules) exercise("load_peft_adapter (VeRA) '" + m.path + "'", *m.adapter);
    }
  }

  // rankwise's own directory, into a slot of every kind.
  static const std::shared_ptr<const VeRAProjections<float>> bank = fixed_bank();
  SlotModel slots(3, bank);
  attempt("load_rankwise_adapter", [&] { load_rankwise_adapter(dir, slots.modules); }, [&] { return snapshot(slots.modules); });
  for (const auto& m : slots.modules) exercise("load_rankwise_adapter '" + m.path + "'", *m.adapter);
  return 0;
}

}  // namespace rankwise::fuzz
