#pragma once
/// \file rankwise/io/checkpoint.hpp
/// Training checkpoints: everything a run needs to resume exactly where it stopped, in one directory.
///
///   <dir>/checkpoint.json            {"format": "rankwise.checkpoint", "version": 1, "step": t,
///                                     "generation": g, "tensors": "tensors-<g>.safetensors",
///                                     "metadata": {...}, "components": {<name>: {...}, ...}}
///   <dir>/tensors-<g>.safetensors    every component's tensors, named "<component>/<key>"
/// A component is anything with save_state / load_state (io/state.hpp): parameter lists (base
/// weights), adapters with their current ranks, optimizers, generators, and later allocators and
/// samplers. Writing never destroys the previous checkpoint: the new tensors go to a new generation
/// file, then checkpoint.json is replaced atomically, and only then is the old file removed. A crash
/// at any point leaves a checkpoint.json that names a complete tensors file.
/// Docs: docs/io/checkpoints.md

#include <rankwise/core/error.hpp>
#include <rankwise/io/atomic_file.hpp>
#include <rankwise/io/detail/file.hpp>
#include <rankwise/io/safetensors.hpp>
#include <rankwise/io/state.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace rankwise {

namespace detail {
inline constexpr const char* checkpoint_manifest = "checkpoint.json";
inline constexpr std::size_t max_checkpoint_manifest_bytes = std::size_t(256) << 20;

/// The generation number of "tensors-<g>.safetensors", if the name has that form.
inline std::optional<std::uint64_t> checkpoint_generation(std::string_view name) {
  constexpr std::string_view head = "tensors-", tail = ".safetensors";
  if (name.size() <= head.size() + tail.size() || name.substr(0, head.size()) != head ||
      name.substr(name.size() - tail.size()) != tail)
    return std::nullopt;
  const std::string_view digits = name.substr(head.size(), name.size() - head.size() - tail.size());
  if (digits.size() > 18) return std::nullopt;
  std::uint64_t g = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
    g = g * 10 + std::uint64_t(c - '0');
  }
  return g;
}

inline std::string checkpoint_tensor_file(std::uint64_t generation) {
  return "tensors-" + std::to_string(generation) + ".safetensors";
}
}  // namespace detail

/// Collects the components of a checkpoint, then writes them. Lvalue data (parameter values,
/// optimizer moments, ...) is referenced, not copied: call write() before training on.
class CheckpointWriter {
 public:
  CheckpointWriter() : m_components(nlohmann::json::object()), m_metadata(nlohmann::json::object()) {}

  /// The training step the checkpoint is taken at.
  void set_step(long step) {
    if (step < 0) detail::fail("rankwise::CheckpointWriter", "step must be >= 0 (got ", step, ")");
    m_step = step;
  }
  long step() const { return m_step; }

  /// Free-form named metadata (any JSON: strings, numbers, objects), returned as saved.
  nlohmann::json& metadata() { return m_metadata; }

  /// Adds a component under `name` through its save_state(StateWriter&, const T&). If it throws,
  /// discard the writer (the component may be half added).
  template <typename T>
  void add(const std::string& name, const T& component) {
    if (name.empty() || name.find('/') != std::string::npos)
      detail::fail("rankwise::CheckpointWriter", "component names must be non-empty and without '/' (got '", name, "')");
    if (m_components.contains(name)) detail::fail("rankwise::CheckpointWriter", "component '", name, "' was added twice");
    StateWriter out(m_tensors, m_components[name], name + "/");
    save_state(out, component);
  }

  /// Writes the checkpoint into `dir` (created if needed), replacing the one there without ever
  /// leaving it incomplete.
  void write(const std::filesystem::path& dir) const {
    const char* where = "rankwise::CheckpointWriter";
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) detail::fail<IoError>(where, "cannot create directory '", dir.string(), "': ", ec.message());
    // A generation that no file in the directory uses yet.
    std::uint64_t generation = 1;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec))
      if (auto g = detail::checkpoint_generation(entry.path().filename().string())) generation = std::max(generation, *g + 1);
    if (ec) detail::fail<IoError>(where, "cannot list directory '", dir.string(), "': ", ec.message());

    const std::string tensor_file = detail::checkpoint_tensor_file(generation);
    SafetensorsWriter tensors = m_tensors;
    tensors.set_metadata("rankwise.checkpoint.generation", std::to_string(generation));
    tensors.write(dir / tensor_file);

    nlohmann::json manifest;
    manifest["format"] = "rankwise.checkpoint";
    manifest["version"] = 1;
    manifest["step"] = m_step;
    manifest["generation"] = generation;
    manifest["tensors"] = tensor_file;
    manifest["metadata"] = m_metadata;
    manifest["components"] = m_components;
    std::string text;
    try {
      text = manifest.dump(1) + "\n";
    } catch (const nlohmann::json::exception& e) {
      std::filesystem::remove(dir / tensor_file, ec);
      detail::fail(where, "the metadata cannot be written as JSON (", e.what(), ")");
    }
    try {
      write_file_atomically(dir / detail::checkpoint_manifest, text);
    } catch (...) {
      std::filesystem::remove(dir / tensor_file, ec);  // the previous checkpoint stays as it was
      throw;
    }
    // The new checkpoint is in place: older tensor files are no longer referenced.
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      const auto g = detail::checkpoint_generation(entry.path().filename().string());
      if (g && *g != generation) std::filesystem::remove(entry.path(), ec);
    }
  }

 private:
  long m_step = 0;
  SafetensorsWriter m_tensors{DType::F32};
  nlohmann::json m_components;
  nlohmann::json m_metadata;
};

/// Reads a checkpoint directory; components are restored by name through load_state.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::filesystem::path& dir) : m_dir(dir) {
    const std::filesystem::path manifest_path = dir / detail::checkpoint_manifest;
    m_label = manifest_path.string();
    std::string text;
    {
      detail::ReadOnlyFile file(manifest_path, "rankwise::CheckpointReader");
      if (file.size() > detail::max_checkpoint_manifest_bytes)
        fail_at(0, "expected at most ", detail::max_checkpoint_manifest_bytes, " bytes (got ", file.size(), ")");
      text.resize(std::size_t(file.size()));
      if (!file.read_at(0, text.data(), text.size(), "rankwise::CheckpointReader"))
        fail_at(0, "the file shrank while it was read");
    }
    if (const std::size_t nul = text.find('\0'); nul != std::string::npos) fail_at(nul, "not valid JSON (a NUL byte)");
    try {
      m_manifest = nlohmann::json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
      fail_at(e.byte > 0 ? e.byte - 1 : 0, "not valid JSON (", e.what(), ")");
    } catch (const nlohmann::json::exception& e) {
      fail_at(0, "not valid JSON (", e.what(), ")");
    }
    if (!m_manifest.is_object() || m_manifest.value("format", nlohmann::json()) != "rankwise.checkpoint")
      fail_at(0, "expected a rankwise checkpoint (\"format\": \"rankwise.checkpoint\")");
    if (m_manifest.value("version", nlohmann::json()) != 1)
      fail_at(0, "expected \"version\": 1 (got ", m_manifest.value("version", nlohmann::json()).dump(), ")");
    const nlohmann::json& step = m_manifest["step"];
    if (!step.is_number_unsigned() || step.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<long>::max()))
      fail_at(0, "expected \"step\" to be an integer >= 0");
    m_step = step.get<std::int64_t>();
    const nlohmann::json& tensors = m_manifest["tensors"];
    if (!tensors.is_string() || !detail::checkpoint_generation(tensors.get<std::string>()))
      fail_at(0, "expected \"tensors\" to name a file \"tensors-<n>.safetensors\" in the same directory");
    if (!m_manifest["components"].is_object()) fail_at(0, "expected \"components\" to be an object");
    m_tensors = std::make_unique<SafetensorsReader>(dir / tensors.get<std::string>());
  }

  long step() const { return long(m_step); }
  const nlohmann::json& metadata() const {
    static const nlohmann::json empty = nlohmann::json::object();
    auto it = m_manifest.find("metadata");
    return it == m_manifest.end() ? empty : *it;
  }
  bool contains(const std::string& name) const { return m_manifest.at("components").contains(name); }
  std::vector<std::string> components() const {
    std::vector<std::string> names;
    for (const auto& [name, value] : m_manifest.at("components").items()) names.push_back(name);
    return names;
  }

  /// The reader of one component (for custom load_state code).
  StateReader component(const std::string& name) const {
    const nlohmann::json& components = m_manifest.at("components");
    auto it = components.find(name);
    if (it == components.end())
      detail::fail<FormatError>("rankwise::CheckpointReader", "'", m_label, "' has no component '", name, "'");
    return StateReader(*m_tensors, *it, name + "/", m_label);
  }

  /// Restores `target` from the component `name` through its load_state(const StateReader&, T&).
  template <typename T>
  void restore(const std::string& name, T&& target) const {
    load_state(component(name), std::forward<T>(target));
  }

  const std::filesystem::path& directory() const { return m_dir; }

 private:
  template <typename... Parts>
  [[noreturn]] void fail_at(std::size_t offset, Parts&&... parts) const {
    detail::fail<FormatError>("rankwise::CheckpointReader", "'", m_label, "' at byte ", offset, ": ",
                              std::forward<Parts>(parts)...);
  }

  std::filesystem::path m_dir;
  std::string m_label;
  nlohmann::json m_manifest;
  std::int64_t m_step = 0;
  std::unique_ptr<SafetensorsReader> m_tensors;
};

}  // namespace rankwise
