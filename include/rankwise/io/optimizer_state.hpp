#pragma once
/// \file rankwise/io/optimizer_state.hpp
/// save_state / load_state (io/state_core.hpp) for the optimizers, AdamW and SGD: their moments per
/// parameter (by name), step counts and learning-rate factor. Docs: docs/io/checkpoints.md

#include <rankwise/io/state_core.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/sgd.hpp>

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

}  // namespace rankwise
