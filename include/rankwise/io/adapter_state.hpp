#pragma once
/// \file rankwise/io/adapter_state.hpp
/// save_state / load_state (io/state_core.hpp) for the adapter family: LoRA, DyLoRA, VeRA (and its
/// shared bank), MELoRA, RED, and AnyLinear slots, which save the adapter they hold by its kind's layer
/// type (AdapterKinds: a new kind's save_state / load_state, found by argument-dependent lookup, is
/// used without a change here).
/// An adapter's own state only: its base weights are saved as parameters. Docs: docs/io/checkpoints.md

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/adapters/bora.hpp>
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/kinds.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/melora.hpp>
#include <rankwise/adapters/red.hpp>
#include <rankwise/adapters/vera.hpp>
#include <rankwise/io/state_core.hpp>

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
  Random dropout_rng;
  load_state(in.child("dropout_generator"), dropout_rng);
  const bool enabled = in.boolean("enabled");
  const bool rslora = in.boolean("use_rslora");
  try {  // the constructor's rules, before anything changes
    using L = LoRA<Scalar, Base>;
    L::check_factors("the LoRA", lora.in_features(), lora.out_features(), A, B);
    L::check_scaling("the LoRA", lora.in_features(), lora.out_features(), alpha, Index(scale_rank), rslora);
    L::check_scale("the LoRA", "'scale'", scale);
  } catch (const InvalidArgument& e) {
    in.fail("does not hold a valid LoRA state: ", e.what());
  }
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
/// The common checks before an adapter is restored: its kind, its size, and that it is not merged
/// (for an adapter that can be merged).
template <typename AdapterType>
void check_adapter_header(const StateReader& in, const AdapterType& adapter, const char* kind) {
  if (in.string("kind") != kind) in.fail("holds a '", in.string("kind"), "' adapter, not a ", kind, " adapter");
  if constexpr (Mergeable<AdapterType>)
    if (adapter.is_merged())
      fail<StateError>("rankwise::load_state", "a merged ", kind, " adapter cannot be restored; unmerge() first");
  if (in.integer("in_features") != adapter.in_features() || in.integer("out_features") != adapter.out_features())
    in.fail("is a ", in.integer("out_features"), " x ", in.integer("in_features"), " adapter but the model's is ",
            adapter.out_features(), " x ", adapter.in_features());
}

/// A loaded tensor must be finite, as the constructors require of the values they are given: a state
/// saved from a diverged run is refused by name rather than trained on.
template <typename Derived>
void check_finite_state(const StateReader& in, const char* key, const Eigen::MatrixBase<Derived>& values) {
  if (!values.allFinite())
    in.fail("'", key, "' holds a NaN or an infinity (saved from a diverged run?); nothing was restored");
}

template <typename AdapterType>
void write_adapter_header(StateWriter& out, const AdapterType& adapter, const char* kind) {
  if constexpr (Mergeable<AdapterType>)
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
  detail::check_finite_state(in, "lora_A", A);
  detail::check_finite_state(in, "lora_B", B);
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
  detail::check_finite_state(in, "vera_lambda_d", d);
  detail::check_finite_state(in, "vera_lambda_b", b);
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
  detail::check_finite_state(in, "vera_A", A);
  detail::check_finite_state(in, "vera_B", B);
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
  detail::check_finite_state(in, "melora_A", A);
  detail::check_finite_state(in, "melora_B", B);
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
  detail::check_finite_state(in, "activation_scaling", scaling);
  detail::check_finite_state(in, "activation_bias", bias);
  r.scaling_parameter().value.swap(scaling);
  r.bias_parameter().value.swap(bias);
}

/// A model slot: its kind and the state of the adapter it holds (a plain Linear slot holds none: base
/// weights are saved as parameters).
template <FloatScalar Scalar>
void save_state(StateWriter& out, const AnyLinear<Scalar>& slot) {
  bool saved = false;
  for_each_adapter_kind([&](auto kind) {
    using L = typename decltype(kind)::template Layer<Scalar>;
    if (const L* layer = saved ? nullptr : slot.template get_if<L>()) {
      save_state(out, *layer);
      saved = true;
    }
  });
  if (!saved && slot.template get_if<Linear<Scalar>>()) {
    out.json()["kind"] = "linear";
    saved = true;
  }
  if (!saved)
    detail::fail("rankwise::save_state", "a slot of kind '", slot.kind(),
                 "' holds a layer without save_state; save the layer itself");
  out.json()["slot_kind"] = slot.kind();
}

// --- BoRA ----------------------------------------------------------------------------------------

namespace detail {
inline const char* to_string(BoRAPrior prior) { return prior == BoRAPrior::Squared ? "squared" : "unsquared"; }
inline const char* to_string(BoRAForward forward) { return forward == BoRAForward::Task ? "task" : "joined"; }
inline const char* to_string(BoRAParametrization p) { return p == BoRAParametrization::Direct ? "direct" : "offsets"; }
}  // namespace detail

/// Every task's factors and the global ones, τ and the options the factors depend on (not the
/// routing, which belongs to a batch).
template <FloatScalar Scalar, typename Base>
void save_state(StateWriter& out, const BoRA<Scalar, Base>& bora) {
  detail::write_adapter_header(out, bora, "bora");
  nlohmann::json& j = out.json();
  j["tasks"] = bora.tasks();
  j["rank"] = bora.rank();
  j["alpha"] = bora.options().alpha;
  j["use_rslora"] = bora.options().use_rslora;
  j["tau"] = bora.tau();
  j["prior"] = detail::to_string(bora.options().prior);
  j["forward"] = detail::to_string(bora.options().forward);
  j["parametrization"] = detail::to_string(bora.options().parametrization);
  out.matrix("global/lora_A", bora.global_A());
  out.matrix("global/lora_B", bora.global_B());
  for (Index d = 0; d < bora.tasks(); ++d) {
    out.matrix("task_" + std::to_string(d) + "/lora_A", bora.A(d));
    out.matrix("task_" + std::to_string(d) + "/lora_B", bora.B(d));
  }
}

/// Refuses a state of another shape, task count, rank, scaling, prior, forward mode or
/// parametrization (a state without one was written before there was a choice: Direct), or with
/// non-finite values, before anything changes; then restores every factor and τ and clears the
/// gradients.
template <FloatScalar Scalar, typename Base>
void load_state(const StateReader& in, BoRA<Scalar, Base>& bora) {
  detail::check_adapter_header(in, bora, "bora");
  if (in.integer("tasks") != bora.tasks())
    in.fail("was saved with ", in.integer("tasks"), " tasks but the model's BoRA has ", bora.tasks());
  if (in.integer("rank") != bora.rank() || in.number("alpha") != bora.options().alpha ||
      in.boolean("use_rslora") != bora.options().use_rslora)
    in.fail("was saved with rank ", in.integer("rank"), ", alpha ", in.number("alpha"), " but the model's BoRA has rank ",
            bora.rank(), ", alpha ", bora.options().alpha, " (and rsLoRA must match); build it with the same options");
  if (in.string("prior") != detail::to_string(bora.options().prior) ||
      in.string("forward") != detail::to_string(bora.options().forward))
    in.fail("was saved with the ", in.string("prior"), " prior and the ", in.string("forward"),
            " forward but the model's BoRA has ", detail::to_string(bora.options().prior), " and ",
            detail::to_string(bora.options().forward));
  const std::string parametrization = in.has("parametrization") ? in.string("parametrization") : "direct";
  if (parametrization != detail::to_string(bora.options().parametrization))
    in.fail("stores its task adapters as '", parametrization, "' but the model's BoRA stores them as '",
            detail::to_string(bora.options().parametrization), "' (the tensors mean different things)");
  const double tau = in.number("tau");
  if (!(tau >= 0.0) || !std::isfinite(tau)) in.fail("'tau' must be a finite number >= 0 (got ", tau, ")");
  std::vector<std::pair<Matrix<Scalar>, Matrix<Scalar>>> factors;  // global first
  for (Index d = -1; d < bora.tasks(); ++d) {
    const std::string key = d < 0 ? std::string("global") : "task_" + std::to_string(d);
    Matrix<Scalar> A = in.template matrix<Scalar>(key + "/lora_A", bora.rank(), bora.in_features());
    Matrix<Scalar> B = in.template matrix<Scalar>(key + "/lora_B", bora.out_features(), bora.rank());
    detail::check_finite_state(in, (key + "/lora_A").c_str(), A);
    detail::check_finite_state(in, (key + "/lora_B").c_str(), B);
    factors.emplace_back(std::move(A), std::move(B));
  }
  // Everything is read and checked: now change the adapter.
  bora.set_tau(tau);
  bora.assign_factors(std::move(factors));
}

template <FloatScalar Scalar>
void load_state(const StateReader& in, AnyLinear<Scalar>& slot) {
  if (in.string("slot_kind") != slot.kind())
    in.fail("holds a '", in.string("slot_kind"), "' slot but the model's is '", slot.kind(), "'");
  bool loaded = slot.template get_if<Linear<Scalar>>() != nullptr;
  for_each_adapter_kind([&](auto kind) {
    using L = typename decltype(kind)::template Layer<Scalar>;
    if (L* layer = loaded ? nullptr : slot.template get_if<L>()) {
      load_state(in, *layer);
      loaded = true;
    }
  });
  if (!loaded)
    detail::fail("rankwise::load_state", "a slot of kind '", slot.kind(),
                 "' holds a layer without load_state; restore the layer itself");
}

}  // namespace rankwise
