#pragma once
/// \file rankwise/io/state_core.hpp
/// StateWriter / StateReader: how anything saves itself into a checkpoint (or a rankwise adapter
/// directory) as named tensors plus a JSON object, and restores itself from them.
///
///   save_state(StateWriter& out, const T& x)   tensors under out's prefix, settings in out.json()
///   load_state(const StateReader& in, T& x)    the reverse; a mismatch throws FormatError
/// These free functions, found by argument-dependent lookup, are the extension point: a type that
/// provides both (in its own namespace) can be checkpointed (concept Checkpointable). This header
/// provides them for Random, parameter lists and NamedAdapter lists (each adapter by its own
/// save_state); the library's components have theirs in io/adapter_state.hpp (the adapters and model
/// slots), io/optimizer_state.hpp (AdamW, SGD) and io/rank_state.hpp (the rank allocator, importance
/// estimators and rank samplers); io/state.hpp includes them all. Tensors are stored in their own
/// precision (F32 for float, F64 for double), so restoring is bit-exact. Docs: docs/io/checkpoints.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/io/named_adapter.hpp>
#include <rankwise/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace rankwise {

/// Where a component writes: tensors named "<prefix><key>" and its own JSON object.
class StateWriter {
 public:
  StateWriter(SafetensorsWriter& tensors, nlohmann::json& json, std::string prefix)
      : m_tensors(&tensors), m_json(&json), m_prefix(std::move(prefix)) {
    if (m_json->is_null()) *m_json = nlohmann::json::object();
  }

  /// A 2-D tensor; an lvalue is referenced and must live until the checkpoint is written.
  template <FloatScalar Scalar>
  void matrix(std::string_view key, const Matrix<Scalar>& m) {
    m_tensors->add(name(key), m, native_dtype<Scalar>());
  }
  template <FloatScalar Scalar>
  void matrix(std::string_view key, Matrix<Scalar>&& m) {
    m_tensors->add(name(key), std::move(m), native_dtype<Scalar>());
  }
  /// A 1-D tensor from a column.
  template <FloatScalar Scalar>
  void vector(std::string_view key, const Matrix<Scalar>& v) {
    m_tensors->add_vector(name(key), v, native_dtype<Scalar>());
  }
  template <FloatScalar Scalar>
  void vector(std::string_view key, Matrix<Scalar>&& v) {
    m_tensors->add_vector(name(key), std::move(v), native_dtype<Scalar>());
  }
  template <FloatScalar Scalar>
  void vector(std::string_view key, const Vector<Scalar>& v) {
    m_tensors->add_vector(name(key), v, native_dtype<Scalar>());
  }
  template <FloatScalar Scalar>
  void vector(std::string_view key, Vector<Scalar>&& v) {
    m_tensors->add_vector(name(key), std::move(v), native_dtype<Scalar>());
  }

  /// The component's settings (numbers must be finite: JSON has no NaN or infinity).
  nlohmann::json& json() { return *m_json; }

  /// A nested component: tensors under "<prefix><key>/", settings in json()[key].
  StateWriter child(std::string_view key) {
    return StateWriter(*m_tensors, (*m_json)[std::string(key)], name(key) + "/");
  }

  const std::string& prefix() const { return m_prefix; }

 private:
  std::string name(std::string_view key) const { return m_prefix + std::string(key); }

  SafetensorsWriter* m_tensors;
  nlohmann::json* m_json;
  std::string m_prefix;
};

/// Where a component reads from; every accessor throws FormatError naming the file, the component
/// and what was expected.
class StateReader {
 public:
  StateReader(const SafetensorsReader& tensors, const nlohmann::json& json, std::string prefix, std::string label)
      : m_tensors(&tensors), m_json(&json), m_prefix(std::move(prefix)), m_label(std::move(label)) {
    if (!m_json->is_object()) fail("its settings must be a JSON object");
  }

  bool has_tensor(std::string_view key) const { return m_tensors->contains(name(key)); }

  /// A tensor of rank <= 2 as a matrix (1-D: a column).
  template <FloatScalar Scalar>
  Matrix<Scalar> matrix(std::string_view key) const {
    if (!has_tensor(key)) fail("tensor '", name(key), "' is missing");
    return m_tensors->template matrix<Scalar>(name(key));
  }

  /// A tensor that must have the given shape (rows x cols; a 1-D tensor of n is n x 1).
  template <FloatScalar Scalar>
  Matrix<Scalar> matrix(std::string_view key, Index rows, Index cols) const {
    Matrix<Scalar> m = matrix<Scalar>(key);
    if (m.rows() != rows || m.cols() != cols)
      fail("tensor '", name(key), "' must be ", rows, " x ", cols, " (got ", m.rows(), " x ", m.cols(), ")");
    return m;
  }

  const nlohmann::json& json() const { return *m_json; }
  bool has(std::string_view key) const { return m_json->contains(std::string(key)); }

  StateReader child(std::string_view key) const {
    auto it = m_json->find(std::string(key));
    if (it == m_json->end()) fail("it has no entry '", key, "'");
    return StateReader(*m_tensors, *it, name(key) + "/", m_label);
  }

  // Typed settings: a missing key or a value of another type throws FormatError.
  double number(std::string_view key) const {
    const nlohmann::json& v = value(key);
    if (!v.is_number()) fail("'", key, "' must be a number");
    return v.get<double>();
  }
  std::int64_t integer(std::string_view key) const {
    const nlohmann::json& v = value(key);
    if (!v.is_number_integer()) fail("'", key, "' must be an integer");
    return v.get<std::int64_t>();
  }
  std::uint64_t unsigned_integer(std::string_view key) const {
    const nlohmann::json& v = value(key);
    if (!v.is_number_unsigned()) fail("'", key, "' must be a non-negative integer");
    return v.get<std::uint64_t>();
  }
  bool boolean(std::string_view key) const {
    const nlohmann::json& v = value(key);
    if (!v.is_boolean()) fail("'", key, "' must be true or false");
    return v.get<bool>();
  }
  std::string string(std::string_view key) const {
    const nlohmann::json& v = value(key);
    if (!v.is_string()) fail("'", key, "' must be a string");
    return v.get<std::string>();
  }

  /// Throws FormatError("[rankwise::load_state] '<file>': component '<prefix>': ...").
  template <typename... Parts>
  [[noreturn]] void fail(Parts&&... parts) const {
    detail::fail<FormatError>("rankwise::load_state", "'", m_label, "': component '",
                              m_prefix.empty() ? std::string("<root>") : m_prefix.substr(0, m_prefix.size() - 1),
                              "': ", std::forward<Parts>(parts)...);
  }

  const std::string& prefix() const { return m_prefix; }
  const std::string& label() const { return m_label; }
  /// The file the tensors come from (to read a JSON sub-object with its own StateReader).
  const SafetensorsReader* tensor_source() const { return m_tensors; }

 private:
  std::string name(std::string_view key) const { return m_prefix + std::string(key); }
  const nlohmann::json& value(std::string_view key) const {
    auto it = m_json->find(std::string(key));
    if (it == m_json->end()) fail("'", key, "' is missing");
    return *it;
  }

  const SafetensorsReader* m_tensors;
  const nlohmann::json* m_json;
  std::string m_prefix;
  std::string m_label;
};

/// Types that save and restore themselves through save_state / load_state.
template <typename T>
concept Checkpointable = requires(StateWriter& out, const StateReader& in, const T& saved, T& restored) {
  save_state(out, saved);
  load_state(in, restored);
};

// --- Random ------------------------------------------------------------------------------------

inline void save_state(StateWriter& out, const Random& rng) {
  const Random::Snapshot s = rng.snapshot();
  out.json()["state"] = s.state;
  out.json()["has_spare"] = s.has_spare;
  out.json()["spare"] = s.spare;
}

inline void load_state(const StateReader& in, Random& rng) {
  Random::Snapshot s;
  const nlohmann::json& words = in.json().contains("state") ? in.json()["state"] : nlohmann::json();
  if (!words.is_array() || words.size() != 4) in.fail("'state' must be a list of four 64-bit integers");
  for (std::size_t i = 0; i < 4; ++i) {
    if (!words[i].is_number_unsigned()) in.fail("'state' must be a list of four 64-bit integers");
    s.state[i] = words[i].get<std::uint64_t>();
  }
  if (s.state == Random::State{}) in.fail("'state' must not be all zero (xoshiro256** never reaches it)");
  s.has_spare = in.boolean("has_spare");
  s.spare = in.number("spare");
  rng.restore(s);
}

// --- parameters by name ------------------------------------------------------------------------

/// Values of parameters, keyed by Parameter::name (vectors as 1-D tensors). Gradients are not saved.
template <FloatScalar Scalar>
void save_state(StateWriter& out, const std::vector<Parameter<Scalar>*>& params) {
  nlohmann::json names = nlohmann::json::array();
  for (const Parameter<Scalar>* p : params) {
    if (p == nullptr) detail::fail("rankwise::save_state", "a parameter list holds a null pointer");
    if (p->is_vector)
      out.vector(p->name, p->value);
    else
      out.matrix(p->name, p->value);
    names.push_back(p->name);
  }
  out.json()["names"] = names;
}

/// Restores every parameter by name; all names and shapes are checked before any value changes.
template <FloatScalar Scalar>
void load_state(const StateReader& in, const std::vector<Parameter<Scalar>*>& params) {
  std::vector<std::string> problems;
  std::vector<Matrix<Scalar>> values(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    const Parameter<Scalar>& p = *params[i];
    if (!in.has_tensor(p.name)) {
      problems.push_back("'" + p.name + "' is not in the checkpoint");
      continue;
    }
    values[i] = in.template matrix<Scalar>(p.name);
    if (values[i].rows() != p.value.rows() || values[i].cols() != p.value.cols()) {
      std::ostringstream os;
      os << "'" << p.name << "' is " << values[i].rows() << " x " << values[i].cols() << " in the checkpoint but "
         << p.value.rows() << " x " << p.value.cols() << " in the model";
      problems.push_back(os.str());
    }
  }
  if (!problems.empty()) {
    std::ostringstream os;
    os << problems.size() << " parameter(s) do not match:";
    for (const std::string& p : problems) os << "\n  - " << p;
    in.fail(os.str());
  }
  for (std::size_t i = 0; i < params.size(); ++i) params[i]->value.swap(values[i]);
}

// --- a model's adapters ------------------------------------------------------------------------

/// Each adapter under its module path; the list of paths is kept to report missing or extra modules.
template <typename AdapterType>
void save_state(StateWriter& out, const std::vector<NamedAdapter<AdapterType>>& modules) {
  detail::check_named_adapters("rankwise::save_state", modules);
  nlohmann::json paths = nlohmann::json::array();
  for (const NamedAdapter<AdapterType>& m : modules) {
    StateWriter child = out.child(m.path);
    save_state(child, *m.adapter);
    paths.push_back(m.path);
  }
  out.json()["paths"] = paths;
}

/// Restores each adapter; the module paths must be exactly those saved (all mismatches reported).
/// All or nothing: every adapter checks its state before it changes, and when a later module's state
/// is refused, the modules already restored get their previous states back (kept in memory while
/// loading: the adapters' own tensors, not the base weights).
template <typename AdapterType>
void load_state(const StateReader& in, const std::vector<NamedAdapter<AdapterType>>& modules) {
  detail::check_named_adapters("rankwise::load_state", modules);
  const nlohmann::json& saved = in.json().contains("paths") ? in.json()["paths"] : nlohmann::json();
  if (!saved.is_array()) in.fail("'paths' must be a list of module paths");
  std::set<std::string> in_file, in_model;
  for (const nlohmann::json& p : saved) {
    if (!p.is_string()) in.fail("'paths' must be a list of module paths");
    in_file.insert(p.get<std::string>());
  }
  std::vector<std::string> problems;
  for (const NamedAdapter<AdapterType>& m : modules) {
    in_model.insert(m.path);
    if (!in_file.count(m.path)) problems.push_back("module '" + m.path + "' is not in the checkpoint");
  }
  for (const std::string& p : in_file)
    if (!in_model.count(p)) problems.push_back("module '" + p + "' is in the checkpoint but not in the model");
  if (!problems.empty()) {
    std::ostringstream os;
    os << "the modules do not match the model (" << problems.size() << "):";
    for (const std::string& p : problems) os << "\n  - " << p;
    in.fail(os.str());
  }
  struct Backup {
    std::vector<unsigned char> tensors;
    nlohmann::json json;
  };
  std::vector<Backup> backups;
  backups.reserve(modules.size());
  std::size_t done = 0;
  try {
    for (; done < modules.size(); ++done) {
      const NamedAdapter<AdapterType>& m = modules[done];
      const StateReader child = in.child(m.path);
      Backup backup;
      try {  // an adapter that cannot be saved (a merged one) cannot be restored either: load_state says why
        SafetensorsWriter tensors;
        StateWriter writer(tensors, backup.json, "");
        save_state(writer, *m.adapter);
        backup.tensors = tensors.serialize();  // now: the writer references the adapter's tensors
      } catch (const Error&) {
      }
      load_state(child, *m.adapter);
      backups.push_back(std::move(backup));
    }
  } catch (...) {
    for (std::size_t i = done; i-- > 0;) {  // put back what was restored, newest first
      try {
        const SafetensorsReader tensors = SafetensorsReader::from_bytes(backups[i].tensors, "<previous state>");
        load_state(StateReader(tensors, backups[i].json, "", "<previous state>"), *modules[i].adapter);
      } catch (const Error&) {  // its own previous state is valid; report the original error regardless
      }
    }
    throw;
  }
}

}  // namespace rankwise
