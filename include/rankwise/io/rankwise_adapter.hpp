#pragma once
/// \file rankwise/io/rankwise_adapter.hpp
/// rankwise's own adapter directory, for adapters that PEFT has no format for (RED, MELoRA's blocks,
/// a DyLoRA with its full rank, ...) and for any adapter whose complete state must come back bit
/// for bit (gates, exact scale, dropout generator).
///
///   <dir>/rankwise_adapter.safetensors  "<module path>/<key>" for each module's tensors
///                                       (LoRA: lora_A [r, in], lora_B [out, r], gates [r])
///   <dir>/rankwise_adapter.json         {"format": "rankwise.adapter", "version": 1,
///                                        "modules": {"paths": [...], "<module path>": {"kind": ..., ...}}}
/// Each module is written by its save_state (io/state.hpp), so every Checkpointable adapter type
/// works. The weights are written before the JSON, each file atomically. Docs: docs/io/peft-interop.md

#include <rankwise/core/error.hpp>
#include <rankwise/io/atomic_file.hpp>
#include <rankwise/io/detail/file.hpp>
#include <rankwise/io/named_adapter.hpp>
#include <rankwise/io/safetensors.hpp>
#include <rankwise/io/state.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

namespace rankwise {

namespace detail {
inline constexpr const char* rankwise_adapter_json = "rankwise_adapter.json";
inline constexpr const char* rankwise_adapter_weights = "rankwise_adapter.safetensors";
}  // namespace detail

template <typename AdapterType>
void save_rankwise_adapter(const std::filesystem::path& dir, const std::vector<NamedAdapter<AdapterType>>& modules) {
  SafetensorsWriter tensors;
  nlohmann::json root;
  root["format"] = "rankwise.adapter";
  root["version"] = 1;
  StateWriter out(tensors, root["modules"], "");
  save_state(out, modules);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) detail::fail<IoError>("rankwise::save_rankwise_adapter", "cannot create directory '", dir.string(), "': ", ec.message());
  tensors.write(dir / detail::rankwise_adapter_weights);
  write_file_atomically(dir / detail::rankwise_adapter_json, root.dump(1) + "\n");
}

/// Restores every module. The module paths must be exactly those saved (all mismatches are reported
/// before anything changes); each module's kind and shapes are checked before that module changes.
template <typename AdapterType>
void load_rankwise_adapter(const std::filesystem::path& dir, const std::vector<NamedAdapter<AdapterType>>& modules) {
  const char* where = "rankwise::load_rankwise_adapter";
  const std::filesystem::path json_path = dir / detail::rankwise_adapter_json;
  detail::ReadOnlyFile file(json_path, where);
  if (file.size() > (std::uint64_t(64) << 20))
    detail::fail<FormatError>(where, "'", json_path.string(), "' at byte 0: expected at most 64 MiB");
  std::string text(std::size_t(file.size()), '\0');
  if (!file.read_at(0, text.data(), text.size(), where))
    detail::fail<FormatError>(where, "'", json_path.string(), "': the file shrank while it was read");
  nlohmann::json root;
  if (text.find('\0') != std::string::npos)
    detail::fail<FormatError>(where, "'", json_path.string(), "' at byte ", text.find('\0'), ": not valid JSON (a NUL byte)");
  try {
    root = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    detail::fail<FormatError>(where, "'", json_path.string(), "': not valid JSON (", e.what(), ")");
  }
  if (!root.is_object() || root.value("format", nlohmann::json()) != "rankwise.adapter" ||
      root.value("version", nlohmann::json()) != 1 || !root.contains("modules"))
    detail::fail<FormatError>(where, "'", json_path.string(),
                              "' at byte 0: expected {\"format\": \"rankwise.adapter\", \"version\": 1, \"modules\": {...}}");
  const SafetensorsReader tensors(dir / detail::rankwise_adapter_weights);
  load_state(StateReader(tensors, root["modules"], "", json_path.string()), modules);
}

}  // namespace rankwise
