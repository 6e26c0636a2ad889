#pragma once
/// \file rankwise/io/state.hpp
/// StateWriter / StateReader: how anything saves itself into a checkpoint (or a rankwise adapter
/// directory) as named tensors plus a JSON object, and restores itself from them.
///
///   save_state(StateWriter& out, const T& x)   tensors under out's prefix, settings in out.json()
///   load_state(const StateReader& in, T& x)    the reverse; a mismatch throws FormatError
/// These free functions, found by argument-dependent lookup, are the extension point: a type that
/// provides both (in its own namespace) can be checkpointed (concept Checkpointable). This header
/// provides them for Random, parameter lists, LoRA, DyLoRA, VeRA (and its bank), MELoRA, RED, AnyLinear
/// slots, NamedAdapter lists, AdamW, SGD, the RankAllocator, SensitivityImportance and the DyLoRA and
/// ERAT samplers. Tensors are
/// stored in their own precision (F32 for float, F64 for double), so restoring is bit-exact.
/// Docs: docs/io/checkpoints.md

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/melora.hpp>
#include <rankwise/adapters/red.hpp>
#include <rankwise/adapters/vera.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/io/named_adapter.hpp>
#include <rankwise/io/safetensors.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/sgd.hpp>
#include <rankwise/rank/allocator.hpp>
#include <rankwise/rank/dylora_sampler.hpp>
#include <rankwise/rank/erat_sampler.hpp>
#include <rankwise/rank/importance.hpp>

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

// --- LoRA --------------------------------------------------------------------------------------

/// The adapter's own state (not its base): A, B, gates, scaling, enabled flag, dropout generator.
template <FloatScalar Scalar, typename Base>
void save_state(StateWriter& out, const LoRA<Scalar, Base>& lora) {
  if (lora.is_merged()) detail::fail<StateError>("rankwise::save_state", "a merged LoRA cannot be saved; unmerge() first");
  out.matrix("lora_A", lora.A());
  out.matrix("lora_B", lora.B());
  out.vector("gates", lora.gates());
  nlohmann::json& j = out.json();
  j["kind"] = "lora";
  j["in_features"] = lora.in_features();
  j["out_features"] = lora.out_features();
  j["rank"] = lora.rank();
  j["alpha"] = lora.alpha();
  j["scale_rank"] = lora.scale_rank();
  j["use_rslora"] = lora.options().use_rslora;
  j["scale"] = lora.scale();
  j["dropout"] = lora.options().dropout;
  j["init"] = to_string(lora.options().init);
  j["enabled"] = lora.is_enabled();
  StateWriter rng = out.child("dropout_generator");
  save_state(rng, lora.dropout_generator());
}

template <FloatScalar Scalar, typename Base>
void load_state(const StateReader& in, LoRA<Scalar, Base>& lora) {
  if (in.string("kind") != "lora") in.fail("holds a '", in.string("kind"), "' adapter, not a LoRA");
  if (lora.is_merged()) detail::fail<StateError>("rankwise::load_state", "a merged LoRA cannot be restored; unmerge() first");
  if (in.integer("in_features") != lora.in_features() || in.integer("out_features") != lora.out_features())
    in.fail("is a ", in.integer("out_features"), " x ", in.integer("in_features"), " adapter but the model's is ",
            lora.out_features(), " x ", lora.in_features());
  if (in.number("dropout") != lora.options().dropout || in.string("init") != to_string(lora.options().init))
    in.fail("was saved with dropout ", in.number("dropout"), " and init ", in.string("init"), " but the model's LoRA has ",
            lora.options().dropout, " and ", to_string(lora.options().init), "; build the model with the same options");
  const Index rank = Index(in.integer("rank"));
  if (rank < 0) in.fail("'rank' must be >= 0");
  const Matrix<Scalar> A = in.template matrix<Scalar>("lora_A", rank, lora.in_features());
  const Matrix<Scalar> B = in.template matrix<Scalar>("lora_B", lora.out_features(), rank);
  const Matrix<Scalar> gates = in.template matrix<Scalar>("gates", rank, 1);
  if (!gates.allFinite()) in.fail("'gates' must be finite");
  const double alpha = in.number("alpha"), scale = in.number("scale");
  const std::int64_t scale_rank = in.integer("scale_rank");
  if (!(alpha > 0.0) || scale_rank < 1 || !(scale > 0.0)) in.fail("'alpha', 'scale' and 'scale_rank' must be > 0");
  Random dropout_rng;
  load_state(in.child("dropout_generator"), dropout_rng);
  const bool enabled = in.boolean("enabled");
  const bool rslora = in.boolean("use_rslora");
  // Everything is read and checked: now change the adapter.
  lora.assign_factors(A, B);
  lora.set_scaling(alpha, Index(scale_rank), rslora);
  if (lora.scale() != scale) lora.set_scale(scale);
  for (Index i = 0; i < rank; ++i)
    if (gates(i) != Scalar(1)) lora.set_gate(i, double(gates(i)));
  lora.set_enabled(enabled);
  lora.dropout_generator() = dropout_rng;
}

// --- the rest of the adapter family --------------------------------------------------------------

namespace detail {
/// The common checks before an adapter is restored: its kind, its size, and that it is not merged.
template <typename AdapterType>
void check_adapter_header(const StateReader& in, const AdapterType& adapter, const char* kind) {
  if (in.string("kind") != kind) in.fail("holds a '", in.string("kind"), "' adapter, not a ", kind, " adapter");
  if (adapter.is_merged())
    fail<StateError>("rankwise::load_state", "a merged ", kind, " adapter cannot be restored; unmerge() first");
  if (in.integer("in_features") != adapter.in_features() || in.integer("out_features") != adapter.out_features())
    in.fail("is a ", in.integer("out_features"), " x ", in.integer("in_features"), " adapter but the model's is ",
            adapter.out_features(), " x ", adapter.in_features());
}

template <typename AdapterType>
void write_adapter_header(StateWriter& out, const AdapterType& adapter, const char* kind) {
  if (adapter.is_merged())
    fail<StateError>("rankwise::save_state", "a merged ", kind, " adapter cannot be saved; unmerge() first");
  out.json()["kind"] = kind;
  out.json()["in_features"] = adapter.in_features();
  out.json()["out_features"] = adapter.out_features();
}

/// A 64-bit FNV-1a digest of a matrix's shape and bits, to recognise VeRA's shared bank.
template <FloatScalar Scalar>
std::uint64_t fingerprint(const Matrix<Scalar>& m, std::uint64_t h = 1469598103934665603ULL) {
  const auto mix = [&h](const void* data, std::size_t size) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < size; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  };
  const Index dims[2] = {m.rows(), m.cols()};
  mix(dims, sizeof(dims));
  mix(m.data(), sizeof(Scalar) * std::size_t(m.size()));
  return h;
}

template <FloatScalar Scalar>
std::string bank_fingerprint(const VeRAProjections<Scalar>& bank) {
  std::ostringstream os;
  os << std::hex << fingerprint(bank.B(), fingerprint(bank.A()));
  return os.str();
}
}  // namespace detail

/// DyLoRA: A and B at full rank r_max, the active rank b and the trained window's start.
template <FloatScalar Scalar, typename Base>
void save_state(StateWriter& out, const DyLoRA<Scalar, Base>& d) {
  detail::write_adapter_header(out, d, "dylora");
  out.matrix("lora_A", d.A());
  out.matrix("lora_B", d.B());
  nlohmann::json& j = out.json();
  j["max_rank"] = d.max_rank();
  j["alpha"] = d.alpha();
  j["frozen"] = d.options().frozen;
  j["hold_untrained"] = d.options().hold_untrained;
  j["active_rank"] = d.active_rank();
  j["window_begin"] = d.window_begin();
}

template <FloatScalar Scalar, typename Base>
void load_state(const StateReader& in, DyLoRA<Scalar, Base>& d) {
  detail::check_adapter_header(in, d, "dylora");
  if (in.integer("max_rank") != d.max_rank() || in.number("alpha") != d.alpha() ||
      in.boolean("frozen") != d.options().frozen || in.boolean("hold_untrained") != d.options().hold_untrained)
    in.fail("was saved with max_rank ", in.integer("max_rank"), ", alpha ", in.number("alpha"),
            " but the model's DyLoRA has ", d.max_rank(), " and ", d.alpha(), " (or other frozen / hold_untrained); "
            "build the model with the same options");
  const std::int64_t b = in.integer("active_rank"), lo = in.integer("window_begin");
  if (lo < 0 || lo >= b || b > d.max_rank()) in.fail("the window [", lo, ", ", b, ") must lie in [0, ", d.max_rank(), "]");
  Matrix<Scalar> A = in.template matrix<Scalar>("lora_A", d.max_rank(), d.in_features());
  Matrix<Scalar> B = in.template matrix<Scalar>("lora_B", d.out_features(), d.max_rank());
  d.A_parameter().value.swap(A);
  d.B_parameter().value.swap(B);
  d.set_window(Index(lo), Index(b));
}

/// VeRA: the layer's vectors; the shared bank is recognised by a fingerprint (save the bank itself
/// once as its own component, see below).
template <FloatScalar Scalar, typename Base>
void save_state(StateWriter& out, const VeRA<Scalar, Base>& v) {
  detail::write_adapter_header(out, v, "vera");
  out.vector("vera_lambda_d", v.lambda_d());
  out.vector("vera_lambda_b", v.lambda_b());
  out.json()["rank"] = v.rank();
  out.json()["d_initial"] = v.options().d_initial;
  out.json()["bank"] = {{"rank", v.projections().rank()},
                        {"max_in", v.projections().max_in()},
                        {"max_out", v.projections().max_out()},
                        {"fingerprint", detail::bank_fingerprint(v.projections())}};
}

template <FloatScalar Scalar, typename Base>
void load_state(const StateReader& in, VeRA<Scalar, Base>& v) {
  detail::check_adapter_header(in, v, "vera");
  const StateReader bank = in.child("bank");
  if (bank.string("fingerprint") != detail::bank_fingerprint(v.projections()))
    in.fail("was trained over other projections (a ", bank.integer("rank"), " x ", bank.integer("max_in"), " / ",
            bank.integer("max_out"), " x ", bank.integer("rank"), " bank) than the model's; build the VeRA adapters "
            "over the same bank (same seed, or read_vera_projections())");
  Matrix<Scalar> d = in.template matrix<Scalar>("vera_lambda_d", v.rank(), 1);
  Matrix<Scalar> b = in.template matrix<Scalar>("vera_lambda_b", v.out_features(), 1);
  v.lambda_d_parameter().value.swap(d);
  v.lambda_b_parameter().value.swap(b);
}

/// VeRA's shared bank: vera_A [r, max_in] and vera_B [max_out, r], saved once per model.
template <FloatScalar Scalar>
void save_state(StateWriter& out, const VeRAProjections<Scalar>& bank) {
  out.json()["kind"] = "vera_projections";
  out.json()["fingerprint"] = detail::bank_fingerprint(bank);
  out.matrix("vera_A", bank.A());
  out.matrix("vera_B", bank.B());
}

/// The bank saved by save_state, ready to build VeRA adapters over (it is shared and immutable, so
/// it is read into a new object rather than restored in place).
template <FloatScalar Scalar>
std::shared_ptr<const VeRAProjections<Scalar>> read_vera_projections(const StateReader& in) {
  if (in.string("kind") != "vera_projections") in.fail("holds a '", in.string("kind"), "', not VeRA projections");
  Matrix<Scalar> A = in.template matrix<Scalar>("vera_A");
  Matrix<Scalar> B = in.template matrix<Scalar>("vera_B");
  if (A.rows() < 1 || A.cols() < 1 || B.rows() < 1 || B.cols() != A.rows())
    in.fail("vera_A must be r x max_in and vera_B max_out x r (got ", A.rows(), " x ", A.cols(), " and ", B.rows(),
            " x ", B.cols(), ")");
  return std::make_shared<const VeRAProjections<Scalar>>(std::move(A), std::move(B));
}

/// MELoRA: the stacked mini factors melora_A [(n r_mini), in / n] and melora_B [out / n, (n r_mini)].
template <FloatScalar Scalar, typename Base>
void save_state(StateWriter& out, const MELoRA<Scalar, Base>& m) {
  detail::write_adapter_header(out, m, "melora");
  out.matrix("melora_A", m.A());
  out.matrix("melora_B", m.B());
  out.json()["n"] = m.n();
  out.json()["mini_rank"] = m.mini_rank();
  out.json()["alpha"] = m.alpha();
}

template <FloatScalar Scalar, typename Base>
void load_state(const StateReader& in, MELoRA<Scalar, Base>& m) {
  detail::check_adapter_header(in, m, "melora");
  if (in.integer("n") != m.n() || in.integer("mini_rank") != m.mini_rank() || in.number("alpha") != m.alpha())
    in.fail("was saved with n ", in.integer("n"), ", mini_rank ", in.integer("mini_rank"), ", alpha ",
            in.number("alpha"), " but the model's MELoRA has ", m.n(), ", ", m.mini_rank(), ", ", m.alpha());
  Matrix<Scalar> A = in.template matrix<Scalar>("melora_A", m.A().rows(), m.A().cols());
  Matrix<Scalar> B = in.template matrix<Scalar>("melora_B", m.B().rows(), m.B().cols());
  m.A_parameter().value.swap(A);
  m.B_parameter().value.swap(B);
}

/// RED: the scaling and bias vectors (the official names: delta_vector.activation_scaling / _bias).
template <FloatScalar Scalar, typename Base>
void save_state(StateWriter& out, const RED<Scalar, Base>& r) {
  detail::write_adapter_header(out, r, "red");
  out.vector("activation_scaling", r.scaling());
  out.vector("activation_bias", r.bias());
  out.json()["scaling"] = r.options().scaling;
  out.json()["bias"] = r.options().bias;
}

template <FloatScalar Scalar, typename Base>
void load_state(const StateReader& in, RED<Scalar, Base>& r) {
  detail::check_adapter_header(in, r, "red");
  if (in.boolean("scaling") != r.options().scaling || in.boolean("bias") != r.options().bias)
    in.fail("was saved training scaling ", in.boolean("scaling"), " and bias ", in.boolean("bias"),
            " but the model's RED trains ", r.options().scaling, " and ", r.options().bias);
  Matrix<Scalar> scaling = in.template matrix<Scalar>("activation_scaling", r.out_features(), 1);
  Matrix<Scalar> bias = in.template matrix<Scalar>("activation_bias", r.out_features(), 1);
  r.scaling_parameter().value.swap(scaling);
  r.bias_parameter().value.swap(bias);
}

/// A model slot: its kind and the state of the adapter it holds (a plain Linear slot holds none: base
/// weights are saved as parameters).
template <FloatScalar Scalar>
void save_state(StateWriter& out, const AnyLinear<Scalar>& slot) {
  if (const auto* a = slot.template get_if<LoRA<Scalar>>()) save_state(out, *a);
  else if (const auto* d = slot.template get_if<DyLoRA<Scalar>>()) save_state(out, *d);
  else if (const auto* v = slot.template get_if<VeRA<Scalar>>()) save_state(out, *v);
  else if (const auto* m = slot.template get_if<MELoRA<Scalar>>()) save_state(out, *m);
  else if (const auto* r = slot.template get_if<RED<Scalar>>()) save_state(out, *r);
  else if (slot.template get_if<Linear<Scalar>>()) out.json()["kind"] = "linear";
  else
    detail::fail("rankwise::save_state", "a slot of kind '", slot.kind(),
                 "' holds a layer without save_state; save the layer itself");
  out.json()["slot_kind"] = slot.kind();
}

template <FloatScalar Scalar>
void load_state(const StateReader& in, AnyLinear<Scalar>& slot) {
  if (in.string("slot_kind") != slot.kind())
    in.fail("holds a '", in.string("slot_kind"), "' slot but the model's is '", slot.kind(), "'");
  if (auto* a = slot.template get_if<LoRA<Scalar>>()) load_state(in, *a);
  else if (auto* d = slot.template get_if<DyLoRA<Scalar>>()) load_state(in, *d);
  else if (auto* v = slot.template get_if<VeRA<Scalar>>()) load_state(in, *v);
  else if (auto* m = slot.template get_if<MELoRA<Scalar>>()) load_state(in, *m);
  else if (auto* r = slot.template get_if<RED<Scalar>>()) load_state(in, *r);
  else if (!slot.template get_if<Linear<Scalar>>())
    detail::fail("rankwise::load_state", "a slot of kind '", slot.kind(),
                 "' holds a layer without load_state; restore the layer itself");
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
  for (const NamedAdapter<AdapterType>& m : modules) load_state(in.child(m.path), *m.adapter);
}

// --- optimizers --------------------------------------------------------------------------------

namespace detail {
template <FloatScalar Scalar>
nlohmann::json group_settings(const std::vector<ParameterGroup<Scalar>>& groups) {
  nlohmann::json out = nlohmann::json::array();
  for (const ParameterGroup<Scalar>& g : groups) out.push_back({{"name", g.name}, {"lr", *g.lr}, {"weight_decay", *g.weight_decay}});
  return out;
}

template <typename Map>
std::vector<std::string> sorted_keys(const Map& map) {
  std::vector<std::string> keys;
  for (const auto& entry : map) keys.push_back(entry.first);
  std::sort(keys.begin(), keys.end());
  return keys;
}
}  // namespace detail

/// m, v and per-slice step counts of every parameter, the step count and the lr factor. The
/// options and groups are recorded for reference; the optimizer's own are kept on restore.
template <FloatScalar Scalar>
void save_state(StateWriter& out, const AdamW<Scalar>& opt) {
  nlohmann::json& j = out.json();
  j["kind"] = "AdamW";
  j["step_count"] = opt.step_count();
  j["lr_factor"] = opt.lr_factor();
  j["options"] = {{"lr", opt.options().lr}, {"beta1", opt.options().beta1}, {"beta2", opt.options().beta2},
                  {"eps", opt.options().eps}, {"weight_decay", opt.options().weight_decay}};
  j["groups"] = detail::group_settings(opt.groups());
  nlohmann::json axes = nlohmann::json::object();
  for (const std::string& name : detail::sorted_keys(opt.states())) {
    const typename AdamW<Scalar>::State& s = opt.states().at(name);
    out.matrix("m/" + name, s.m);
    out.matrix("v/" + name, s.v);
    out.vector("steps/" + name, Matrix<double>(s.steps.matrix()));
    axes[name] = s.axis == Axis::Rows ? "rows" : "cols";
  }
  j["states"] = axes;
}

template <FloatScalar Scalar>
void load_state(const StateReader& in, AdamW<Scalar>& opt) {
  if (in.string("kind") != "AdamW") in.fail("holds a '", in.string("kind"), "' optimizer, not AdamW");
  const std::int64_t step_count = in.integer("step_count");
  const double lr_factor = in.number("lr_factor");
  if (!(lr_factor >= 0.0) || !std::isfinite(lr_factor) || step_count < 0)
    in.fail("'lr_factor' and 'step_count' must be >= 0");
  const nlohmann::json& axes = in.json().contains("states") ? in.json()["states"] : nlohmann::json();
  if (!axes.is_object()) in.fail("'states' must be an object of parameter name -> axis");
  std::unordered_map<std::string, typename AdamW<Scalar>::State> states;
  for (const auto& [name, axis] : axes.items()) {
    if (axis != "rows" && axis != "cols") in.fail("the axis of '", name, "' must be \"rows\" or \"cols\"");
    typename AdamW<Scalar>::State s;
    s.m = in.template matrix<Scalar>("m/" + name);
    s.v = in.template matrix<Scalar>("v/" + name);
    s.axis = axis == "rows" ? Axis::Rows : Axis::Cols;
    const Matrix<double> steps = in.template matrix<double>("steps/" + name);
    if (steps.cols() != 1) in.fail("'steps/", name, "' must be a vector");
    s.steps = steps.col(0).array();
    states.emplace(name, std::move(s));
  }
  try {
    opt.restore(long(step_count), std::move(states));
    opt.set_lr_factor(lr_factor);
  } catch (const InvalidArgument& e) {
    in.fail("does not fit the optimizer: ", e.what());
  }
}

template <FloatScalar Scalar>
void save_state(StateWriter& out, const SGD<Scalar>& opt) {
  nlohmann::json& j = out.json();
  j["kind"] = "SGD";
  j["step_count"] = opt.step_count();
  j["lr_factor"] = opt.lr_factor();
  j["options"] = {{"lr", opt.options().lr}, {"momentum", opt.options().momentum},
                  {"weight_decay", opt.options().weight_decay}, {"nesterov", opt.options().nesterov}};
  j["groups"] = detail::group_settings(opt.groups());
  nlohmann::json names = nlohmann::json::array();
  for (const std::string& name : detail::sorted_keys(opt.velocities())) {
    out.matrix("velocity/" + name, opt.velocities().at(name));
    names.push_back(name);
  }
  j["velocities"] = names;
}

template <FloatScalar Scalar>
void load_state(const StateReader& in, SGD<Scalar>& opt) {
  if (in.string("kind") != "SGD") in.fail("holds a '", in.string("kind"), "' optimizer, not SGD");
  const std::int64_t step_count = in.integer("step_count");
  const double lr_factor = in.number("lr_factor");
  if (!(lr_factor >= 0.0) || !std::isfinite(lr_factor) || step_count < 0)
    in.fail("'lr_factor' and 'step_count' must be >= 0");
  const nlohmann::json& names = in.json().contains("velocities") ? in.json()["velocities"] : nlohmann::json();
  if (!names.is_array()) in.fail("'velocities' must be a list of parameter names");
  std::unordered_map<std::string, Matrix<Scalar>> velocities;
  for (const nlohmann::json& name : names) {
    if (!name.is_string()) in.fail("'velocities' must be a list of parameter names");
    velocities.emplace(name.get<std::string>(), in.template matrix<Scalar>("velocity/" + name.get<std::string>()));
  }
  try {
    opt.restore(long(step_count), std::move(velocities));
    opt.set_lr_factor(lr_factor);
  } catch (const InvalidArgument& e) {
    in.fail("does not fit the optimizer: ", e.what());
  }
}

// --- rank allocation and rank sampling ------------------------------------------------------------

namespace detail {
inline nlohmann::json finite_or_null(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(); }
inline double number_or_nan(const nlohmann::json& v) {
  return v.is_number() ? v.get<double>() : std::numeric_limits<double>::quiet_NaN();
}
inline Status status_from_name(const StateReader& in, const std::string& name) {
  for (Status s : {Status::Ok, Status::NonFinite, Status::NotApplied})
    if (name == to_string(s)) return s;
  in.fail("'", name, "' is not a status (Ok, NonFinite, NotApplied)");
}
template <typename T>
std::vector<T> json_list(const StateReader& in, const nlohmann::json& j, const char* what) {
  if (!j.is_array()) in.fail("'", what, "' must be a list");
  std::vector<T> out;
  for (const nlohmann::json& v : j) {
    if constexpr (std::is_same_v<T, double>) {
      out.push_back(number_or_nan(v));
    } else {
      if (!v.is_number_integer()) in.fail("'", what, "' must be a list of integers");
      out.push_back(v.get<T>());
    }
  }
  return out;
}
}  // namespace detail

/// The allocator's schedule position, budget, history and random stream (not its estimator: add that
/// as its own component). Its modules are checked by path.
template <FloatScalar Scalar>
void save_state(StateWriter& out, const RankAllocator<Scalar>& allocator) {
  const typename RankAllocator<Scalar>::Progress p = allocator.progress();
  nlohmann::json& j = out.json();
  j["kind"] = "rank_allocator";
  j["policy"] = allocator.options().policy == AllocationPolicy::PruneOnly ? "prune_only" : "prune_and_reallocate";
  nlohmann::json paths = nlohmann::json::array();
  for (const RankModule<Scalar>& m : allocator.modules()) paths.push_back(m.path());
  j["modules"] = paths;
  j["step"] = p.step;
  j["next_due"] = p.next_due;
  j["rounds_done"] = p.rounds_done;
  j["attempts"] = p.attempts;
  j["done"] = p.done;
  j["acted"] = p.acted;
  j["finished"] = p.finished;
  j["status"] = to_string(p.status);
  j["message"] = p.message;
  j["budget"] = p.budget;
  j["start"] = p.start;
  j["ranks_per_round"] = p.ranks_per_round;
  j["initial_ranks"] = p.initial_ranks;
  nlohmann::json events = nlohmann::json::array();
  for (const AllocationEvent& e : p.events) {
    nlohmann::json pruned = nlohmann::json::array(), scores = nlohmann::json::array();
    for (const PrunedRank& r : e.pruned)
      pruned.push_back({r.module, r.rank, detail::finite_or_null(r.score), detail::finite_or_null(r.error)});
    for (double v : e.mean_scores) scores.push_back(detail::finite_or_null(v));
    events.push_back({{"round", e.round}, {"step", e.step}, {"status", to_string(e.status)}, {"message", e.message},
                      {"loss", detail::finite_or_null(e.loss)}, {"target", e.target}, {"pruned", pruned},
                      {"added", e.added}, {"mean_scores", scores}, {"ranks_after", e.ranks_after},
                      {"used_after", e.used_after}});
  }
  j["events"] = events;
  Random rng;
  rng.restore(p.rng);
  StateWriter generator = out.child("generator");
  save_state(generator, rng);
}

template <FloatScalar Scalar>
void load_state(const StateReader& in, RankAllocator<Scalar>& allocator) {
  if (in.string("kind") != "rank_allocator") in.fail("holds a '", in.string("kind"), "', not a rank allocator");
  const std::string policy =
      allocator.options().policy == AllocationPolicy::PruneOnly ? "prune_only" : "prune_and_reallocate";
  if (in.string("policy") != policy) in.fail("was saved with policy ", in.string("policy"), " but the allocator uses ", policy);
  const nlohmann::json& paths = in.json().contains("modules") ? in.json()["modules"] : nlohmann::json();
  std::vector<std::string> expected;
  for (const RankModule<Scalar>& m : allocator.modules()) expected.push_back(m.path());
  if (!paths.is_array() || paths != nlohmann::json(expected))
    in.fail("was saved over the modules ", paths.dump(), " but the allocator has ", nlohmann::json(expected).dump());
  typename RankAllocator<Scalar>::Progress p;
  p.step = long(in.integer("step"));
  p.next_due = long(in.integer("next_due"));
  p.rounds_done = long(in.integer("rounds_done"));
  p.attempts = long(in.integer("attempts"));
  p.done = in.boolean("done");
  p.acted = in.boolean("acted");
  p.finished = in.boolean("finished");
  p.status = detail::status_from_name(in, in.string("status"));
  p.message = in.string("message");
  p.budget = Index(in.integer("budget"));
  p.start = Index(in.integer("start"));
  p.ranks_per_round = Index(in.integer("ranks_per_round"));
  p.initial_ranks = detail::json_list<Index>(in, in.json()["initial_ranks"], "initial_ranks");
  const nlohmann::json& events = in.json().contains("events") ? in.json()["events"] : nlohmann::json();
  if (!events.is_array()) in.fail("'events' must be a list");
  for (const nlohmann::json& e : events) {
    if (!e.is_object()) in.fail("every event must be an object");
    const StateReader event(*in.tensor_source(), e, in.prefix() + "events/", in.label());
    AllocationEvent out;
    out.round = long(event.integer("round"));
    out.step = long(event.integer("step"));
    out.status = detail::status_from_name(in, event.string("status"));
    out.message = event.string("message");
    out.loss = detail::number_or_nan(e.contains("loss") ? e["loss"] : nlohmann::json());
    out.target = Index(event.integer("target"));
    const nlohmann::json& pruned = e.contains("pruned") ? e["pruned"] : nlohmann::json();
    if (!pruned.is_array()) in.fail("an event's 'pruned' must be a list");
    for (const nlohmann::json& r : pruned) {
      if (!r.is_array() || r.size() < 3 || r.size() > 4 || !r[0].is_number_integer() || !r[1].is_number_integer())
        in.fail("an event's pruned ranks must be [module, rank, score] or [module, rank, score, standard error]");
      out.pruned.push_back({r[0].get<Index>(), r[1].get<Index>(), detail::number_or_nan(r[2]),
                            r.size() == 4 ? detail::number_or_nan(r[3]) : std::numeric_limits<double>::quiet_NaN()});
    }
    out.added = detail::json_list<Index>(in, e.contains("added") ? e["added"] : nlohmann::json(), "added");
    out.mean_scores = detail::json_list<double>(in, e.contains("mean_scores") ? e["mean_scores"] : nlohmann::json(), "mean_scores");
    out.ranks_after = detail::json_list<Index>(in, e.contains("ranks_after") ? e["ranks_after"] : nlohmann::json(), "ranks_after");
    out.used_after = Index(event.integer("used_after"));
    p.events.push_back(std::move(out));
  }
  Random rng;
  load_state(in.child("generator"), rng);
  p.rng = rng.snapshot();
  try {
    allocator.restore(std::move(p));
  } catch (const InvalidArgument& e) {
    in.fail("does not fit the allocator: ", e.what());
  }
}

/// SensitivityImportance: its smoothed sensitivities and uncertainties, by parameter name.
template <FloatScalar Scalar>
void save_state(StateWriter& out, const SensitivityImportance<Scalar>& estimator) {
  out.json()["kind"] = "sensitivity";
  out.json()["observations"] = estimator.observations();
  out.json()["beta1"] = estimator.options().beta1;
  out.json()["beta2"] = estimator.options().beta2;
  nlohmann::json names = nlohmann::json::array();
  for (auto& [name, m] : estimator.moments()) {
    out.matrix("sensitivity/" + name, Matrix<Scalar>(m.sensitivity));
    out.matrix("uncertainty/" + name, Matrix<Scalar>(m.uncertainty));
    names.push_back(name);
  }
  out.json()["parameters"] = names;
}

template <FloatScalar Scalar>
void load_state(const StateReader& in, SensitivityImportance<Scalar>& estimator) {
  if (in.string("kind") != "sensitivity") in.fail("holds a '", in.string("kind"), "', not a sensitivity estimator");
  const std::int64_t observations = in.integer("observations");
  if (observations < 0) in.fail("'observations' must be >= 0");
  const nlohmann::json& names = in.json().contains("parameters") ? in.json()["parameters"] : nlohmann::json();
  if (!names.is_array()) in.fail("'parameters' must be a list of names");
  std::map<std::string, typename SensitivityImportance<Scalar>::Moments> moments;
  for (const nlohmann::json& name : names) {
    if (!name.is_string()) in.fail("'parameters' must be a list of names");
    const std::string n = name.get<std::string>();
    Matrix<Scalar> s = in.template matrix<Scalar>("sensitivity/" + n);
    Matrix<Scalar> u = in.template matrix<Scalar>("uncertainty/" + n, s.rows(), s.cols());
    moments.emplace(n, typename SensitivityImportance<Scalar>::Moments{std::move(s), std::move(u)});
  }
  estimator.restore(long(observations), moments);
}

/// DyLoRASampler: its stream (the ranks it drew are in the adapters' state). The last rank it
/// returned is recorded but not restored: last() is 0 until the next sample().
inline void save_state(StateWriter& out, const DyLoRASampler& sampler) {
  out.json()["kind"] = "dylora_sampler";
  out.json()["min_rank"] = sampler.min_rank();
  out.json()["max_rank"] = sampler.max_rank();
  out.json()["last"] = sampler.last();
  StateWriter generator = out.child("generator");
  save_state(generator, const_cast<DyLoRASampler&>(sampler).generator());  // read only
}

inline void load_state(const StateReader& in, DyLoRASampler& sampler) {
  if (in.string("kind") != "dylora_sampler") in.fail("holds a '", in.string("kind"), "', not a DyLoRA sampler");
  if (in.integer("min_rank") != sampler.min_rank() || in.integer("max_rank") != sampler.max_rank())
    in.fail("was saved with ranks [", in.integer("min_rank"), ", ", in.integer("max_rank"), "] but the sampler draws from [",
            sampler.min_rank(), ", ", sampler.max_rank(), "]");
  Random rng;
  load_state(in.child("generator"), rng);
  sampler.generator() = rng;
}

/// ERATSampler: its stream; its options are checked.
inline void save_state(StateWriter& out, const ERATSampler& sampler) {
  const ERATSamplerOptions& o = sampler.options();
  out.json()["kind"] = "erat_sampler";
  out.json()["options"] = {{"min_rank", o.min_rank}, {"max_rank", o.max_rank}, {"width", o.width},
                           {"depth_floor", o.depth_floor}, {"total_steps", o.total_steps}, {"num_layers", o.num_layers},
                           {"time_aware", o.time_aware}, {"depth_aware", o.depth_aware},
                           {"random_begin", o.random_begin}, {"per_module", o.per_module}};
  StateWriter generator = out.child("generator");
  save_state(generator, const_cast<ERATSampler&>(sampler).generator());  // read only
}

inline void load_state(const StateReader& in, ERATSampler& sampler) {
  if (in.string("kind") != "erat_sampler") in.fail("holds a '", in.string("kind"), "', not an ERAT sampler");
  const ERATSamplerOptions& o = sampler.options();
  const nlohmann::json expected = {{"min_rank", o.min_rank}, {"max_rank", o.max_rank}, {"width", o.width},
                                   {"depth_floor", o.depth_floor}, {"total_steps", o.total_steps},
                                   {"num_layers", o.num_layers}, {"time_aware", o.time_aware},
                                   {"depth_aware", o.depth_aware}, {"random_begin", o.random_begin},
                                   {"per_module", o.per_module}};
  if (!in.has("options") || in.json()["options"] != expected)
    in.fail("was saved with options ", in.has("options") ? in.json()["options"].dump() : std::string("{}"),
            " but the sampler has ", expected.dump());
  Random rng;
  load_state(in.child("generator"), rng);
  sampler.generator() = rng;
}

}  // namespace rankwise
