#pragma once
/// \file rankwise/io/rank_state.hpp
/// save_state / load_state (io/state_core.hpp) for rank allocation and rank sampling: the
/// RankAllocator (its schedule position, budget, history and stream), the stateful importance
/// estimators (SensitivityImportance, FisherImportance) and the DyLoRA and ERAT samplers.
/// Docs: docs/io/checkpoints.md

#include <rankwise/io/state_core.hpp>
#include <rankwise/rank/allocator.hpp>
#include <rankwise/rank/dylora_sampler.hpp>
#include <rankwise/rank/erat_sampler.hpp>
#include <rankwise/rank/importance.hpp>

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

/// FisherImportance: per parameter, the EMA of d_i^2 and its observation counts per rank.
template <FloatScalar Scalar>
void save_state(StateWriter& out, const FisherImportance<Scalar>& estimator) {
  out.json()["kind"] = "fisher";
  out.json()["observations"] = estimator.observations();
  out.json()["beta"] = estimator.options().beta;
  nlohmann::json names = nlohmann::json::array();
  for (const auto& [name, m] : estimator.moments()) {
    out.vector("ema/" + name, Vector<double>(m.ema));
    out.vector("steps/" + name, Vector<double>(m.steps));
    names.push_back(name);
  }
  out.json()["parameters"] = names;
}

/// Restores a FisherImportance; its EMA factor must be the saved one (the EMA means another thing
/// under another factor).
template <FloatScalar Scalar>
void load_state(const StateReader& in, FisherImportance<Scalar>& estimator) {
  if (in.string("kind") != "fisher") in.fail("holds a '", in.string("kind"), "', not a Fisher estimator");
  if (in.number("beta") != estimator.options().beta)
    in.fail("was saved with beta ", in.number("beta"), " but the estimator has ", estimator.options().beta);
  const std::int64_t observations = in.integer("observations");
  if (observations < 0) in.fail("'observations' must be >= 0");
  const nlohmann::json& names = in.json().contains("parameters") ? in.json()["parameters"] : nlohmann::json();
  if (!names.is_array()) in.fail("'parameters' must be a list of names");
  std::map<std::string, typename FisherImportance<Scalar>::Moments> moments;
  for (const nlohmann::json& name : names) {
    if (!name.is_string()) in.fail("'parameters' must be a list of names");
    const std::string n = name.get<std::string>();
    const Matrix<double> ema = in.template matrix<double>("ema/" + n);
    if (ema.cols() != 1) in.fail("tensor 'ema/", n, "' must be one-dimensional");
    const Matrix<double> steps = in.template matrix<double>("steps/" + n, ema.rows(), 1);
    moments.emplace(n, typename FisherImportance<Scalar>::Moments{ema.col(0), steps.col(0)});
  }
  try {
    estimator.restore(long(observations), moments);
  } catch (const InvalidArgument& e) {
    in.fail(e.what());
  }
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
