#pragma once
// The second oracle of the file-based targets: snapshots of every kind of loaded object (a refused
// load must leave them as they were) and a forward and backward pass through a loaded adapter, so
// that state a loader accepted but that does not hold together is exercised.

#include "common.hpp"
#include "models.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace rankwise::fuzz {

inline Snapshot& add_random(Snapshot& s, const Random& rng) {
  const Random::Snapshot r = rng.snapshot();
  for (std::uint64_t word : r.state) s.words.push_back(word);
  return s.add(r.has_spare).add(r.spare);
}

inline Snapshot snapshot(const LoRA<float>& l) {
  Snapshot s;
  s.add(l.A()).add(l.B()).add(Matrix<float>(l.gates())).add(l.scale()).add(std::int64_t(l.scale_rank()));
  s.add(l.alpha()).add(l.options().use_rslora).add(l.is_enabled()).add(l.is_merged());
  return add_random(s, l.dropout_generator());
}
inline Snapshot snapshot(const DyLoRA<float>& d) {
  Snapshot s;
  return s.add(d.A()).add(d.B()).add(std::int64_t(d.active_rank())).add(std::int64_t(d.window_begin()));
}
inline Snapshot snapshot(const VeRA<float>& v) {
  Snapshot s;
  return s.add(v.lambda_d()).add(v.lambda_b());
}
inline Snapshot snapshot(const MELoRA<float>& m) {
  Snapshot s;
  return s.add(m.A()).add(m.B());
}
inline Snapshot snapshot(const RED<float>& r) {
  Snapshot s;
  return s.add(r.scaling()).add(r.bias());
}
/// A list of model slots: every slot's adapter as above (a module list restores all or nothing).
inline Snapshot snapshot(const std::vector<NamedAdapter<AnyLinear<float>>>& modules) {
  Snapshot s;
  for (const NamedAdapter<AnyLinear<float>>& m : modules) {
    if (const auto* l = m.adapter->get_if<LoRA<float>>()) s.append(snapshot(*l));
    else if (const auto* d = m.adapter->get_if<DyLoRA<float>>()) s.append(snapshot(*d));
    else if (const auto* v = m.adapter->get_if<VeRA<float>>()) s.append(snapshot(*v));
    else if (const auto* e = m.adapter->get_if<MELoRA<float>>()) s.append(snapshot(*e));
    else if (const auto* r = m.adapter->get_if<RED<float>>()) s.append(snapshot(*r));
  }
  return s;
}

/// Every layer of a list of owned layers (the PEFT loaders change all of them or none).
template <typename Layers>
Snapshot snapshot_all(const Layers& layers) {
  Snapshot s;
  for (const auto& layer : layers) s.append(snapshot(*layer));
  return s;
}
inline Snapshot snapshot(const Random& rng) {
  Snapshot s;
  return add_random(s, rng);
}
inline Snapshot snapshot(const std::vector<Parameter<float>*>& params) {
  Snapshot s;
  for (const Parameter<float>* p : params) s.add(p->value);
  return s;
}
template <typename Map>
std::vector<std::string> sorted_names(const Map& map) {
  std::vector<std::string> names;
  for (const auto& entry : map) names.push_back(entry.first);
  std::sort(names.begin(), names.end());
  return names;
}
inline Snapshot snapshot(const AdamW<float>& opt) {
  Snapshot s;
  s.add(std::int64_t(opt.step_count())).add(opt.lr_factor());
  for (const std::string& name : sorted_names(opt.states())) {
    const AdamW<float>::State& st = opt.states().at(name);
    s.add(name).add(st.m).add(st.v).add(st.axis == Axis::Rows).add(Matrix<float>(st.steps.cast<float>().matrix()));
  }
  return s;
}
inline Snapshot snapshot(const SGD<float>& opt) {
  Snapshot s;
  s.add(std::int64_t(opt.step_count())).add(opt.lr_factor());
  for (const std::string& name : sorted_names(opt.velocities())) s.add(name).add(opt.velocities().at(name));
  return s;
}
inline Snapshot snapshot(const FisherImportance<float>& f) {
  Snapshot s;
  s.add(std::int64_t(f.observations()));
  for (const auto& [name, m] : f.moments()) {
    s.add(name);
    for (double v : m.ema) s.add(v);
    for (double v : m.steps) s.add(v);
  }
  return s;
}
inline Snapshot snapshot(const RankAllocator<float>& a) {
  const RankAllocator<float>::Progress p = a.progress();
  Snapshot s;
  s.add(std::int64_t(p.step)).add(std::int64_t(p.next_due)).add(std::int64_t(p.rounds_done)).add(std::int64_t(p.attempts));
  s.add(p.done).add(p.acted).add(p.finished).add(std::int64_t(p.status)).add(p.message);
  s.add(std::int64_t(p.budget)).add(std::int64_t(p.start)).add(std::int64_t(p.ranks_per_round));
  for (Index r : p.initial_ranks) s.add(std::int64_t(r));
  s.add(std::int64_t(p.events.size()));
  for (std::uint64_t word : p.rng.state) s.words.push_back(word);
  return s;
}
inline Snapshot snapshot(DyLoRASampler& sampler) { return snapshot(sampler.generator()); }

/// A fixed input of `rows` features and three tokens.
inline Matrix<float> probe_input(Index rows) {
  Matrix<float> x(rows, 3);
  for (Index j = 0; j < x.cols(); ++j)
    for (Index i = 0; i < x.rows(); ++i) x(i, j) = float(std::sin(double(1 + i + 7 * j)));
  return x;
}

/// One training forward and backward pass through a layer that a loader changed. Whatever the
/// loaded values (NaN included), the pass must run and give outputs of the right shapes; an
/// exception, even a rankwise::Error, means the loader accepted state that does not hold together.
template <typename Layer>
void exercise(const std::string& what, Layer& layer) {
  try {
    layer.set_training(true);
    layer.zero_grad();
    const Matrix<float> x = probe_input(layer.in_features());
    Matrix<float> y, dx;
    layer.forward(x, y);
    require(y.rows() == layer.out_features() && y.cols() == x.cols(), what + ": forward gave an output of the wrong shape");
    layer.backward(Matrix<float>::Ones(y.rows(), y.cols()), dx);
    require(dx.rows() == x.rows() && dx.cols() == x.cols(), what + ": backward gave an input gradient of the wrong shape");
    layer.set_training(false);
    layer.forward(x, y);
  } catch (const Error& e) {
    throw Finding(what + ": a pass through the loaded layer failed: " + e.what());
  }
}

}  // namespace rankwise::fuzz
