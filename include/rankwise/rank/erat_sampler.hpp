#pragma once
/// \file rankwise/rank/erat_sampler.hpp
/// ERATSampler: the rank schedule of ERAT-DLoRA ("enhanced range adaptation in time and depth aware
/// dynamic LoRA", Neurocomputing 2024, doi:10.1016/j.neucom.2024.128778). Only the abstract is public
/// and no code is: everything below is rankwise's interpretation of it, not the authors' algorithm.
///
/// Per step t (of T) and per module at depth l in [0, L), it returns a window [lo, b): the DyLoRA
/// adapter uses components [0, b) with scale alpha / b and trains [lo, b).
///   depth bound  b_max(l) = round(r_lo + (r_max - r_lo) (l + 1) / L)    (half up; deepest = r_max)
///   time         with probability min(1, t / T): b ~ U{r_min .. b_max(l)}, else b = b_max(l)
///   range        lo ~ U{max(0, b - w) .. b - 1}    (w = ceil(r_max / 4); fixed: lo = max(0, b - w))
/// Defaults: r_lo = max(r_min, floor(r_max / 2)). Draw order per module: one uniform for the time
/// coin (time-aware only), one integer for b (dynamic phase only), one for lo (when its range has more
/// than one value). Modules are drawn in the order given, from one stream, so runs are reproducible.
/// DyLoRA is the special case depth_aware = time_aware = per_module = false with w = 1 (frozen) or
/// w = r_max, random_begin = false (non-frozen). Docs: docs/adapters/erat.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>

#include <algorithm>
#include <span>
#include <vector>

namespace rankwise {

struct ERATSamplerOptions {
  Index max_rank = 8;         ///< r_max, the adapters' maximum rank
  Index min_rank = 1;         ///< r_min, the smallest b of the dynamic phase
  Index total_steps = 1000;   ///< T: the dynamic phase is always on from step T
  Index num_layers = 1;       ///< L: depths are 0 .. L - 1
  Index width = 0;            ///< w, the trained window's largest width; 0: ceil(r_max / 4)
  Index depth_floor = 0;      ///< r_lo of the depth bound; 0: max(r_min, floor(r_max / 2))
  bool random_begin = true;   ///< lo ~ U{max(0, b - w) .. b - 1}; false: lo = max(0, b - w)
  bool depth_aware = true;    ///< false: b_max(l) = r_max at every depth
  bool time_aware = true;     ///< false: the dynamic phase from step 0
  bool per_module = true;     ///< false: one window per step for every module (needs depth_aware = false)
};

/// Components [0, b) are used, [lo, b) are trained.
struct RankWindow {
  Index lo = 0;
  Index b = 1;
  friend bool operator==(const RankWindow&, const RankWindow&) = default;
};

class ERATSampler {
 public:
  /// Forks its stream from `rng`, so the same seed gives the same windows on every platform.
  ERATSampler(const ERATSamplerOptions& options, Random& rng) : m_options(options) {
    const char* where = "rankwise::ERATSampler";
    if (options.min_rank < 1 || options.min_rank > options.max_rank)
      detail::fail(where, "need 1 <= r_min <= r_max (got r_min ", options.min_rank, ", r_max ", options.max_rank, ")");
    if (options.total_steps < 1) detail::fail(where, "total_steps must be >= 1 (got ", options.total_steps, ")");
    if (options.num_layers < 1) detail::fail(where, "num_layers must be >= 1 (got ", options.num_layers, ")");
    if (m_options.width == 0) m_options.width = (options.max_rank + 3) / 4;
    if (m_options.width < 1 || m_options.width > options.max_rank)
      detail::fail(where, "width must be in [1, r_max] = [1, ", options.max_rank, "] or 0 for ceil(r_max / 4) (got ",
                   options.width, ")");
    if (m_options.depth_floor == 0) m_options.depth_floor = std::max(options.min_rank, options.max_rank / 2);
    if (m_options.depth_floor < options.min_rank || m_options.depth_floor > options.max_rank)
      detail::fail(where, "depth_floor must be in [r_min, r_max] = [", options.min_rank, ", ", options.max_rank,
                   "] or 0 for max(r_min, r_max / 2) (got ", options.depth_floor, ")");
    if (!options.per_module && options.depth_aware)
      detail::fail(where, "per_module = false shares one rank across depths, so it needs depth_aware = false "
                          "(got depth_aware = true)");
    m_rng = rng.fork();
  }

  /// b_max(l): the largest rank a module at depth l may use.
  Index depth_bound(Index depth) const {
    check_depth(depth);
    if (!m_options.depth_aware) return m_options.max_rank;
    // round(r_lo + (r_max - r_lo) (l + 1) / L), half up, in exact integer arithmetic
    const Index L = m_options.num_layers, lo = m_options.depth_floor;
    const Index num = lo * L + (m_options.max_rank - lo) * (depth + 1);
    return (2 * num + L) / (2 * L);
  }

  /// The probability that step t samples b (dynamic phase) rather than using b_max(l).
  double dynamic_probability(Index step) const {
    if (step < 0) detail::fail("rankwise::ERATSampler", "step must be >= 0 (got ", step, ")");
    if (!m_options.time_aware) return 1.0;
    return std::min(1.0, double(step) / double(m_options.total_steps));
  }

  /// One module's window at step t; call in a fixed module order.
  RankWindow sample(Index step, Index depth) {
    const Index b_max = depth_bound(depth);
    const double p = dynamic_probability(step);
    bool dynamic = true;
    if (m_options.time_aware) dynamic = m_rng.uniform() < p;
    RankWindow window;
    window.b = dynamic ? m_rng.uniform_int(m_options.min_rank, b_max) : b_max;
    const Index first = std::max<Index>(0, window.b - m_options.width);
    if (first == window.b - 1 || !m_options.random_begin)
      window.lo = first;
    else
      window.lo = m_rng.uniform_int(first, window.b - 1);
    return window;
  }

  /// The windows of every module at step t, modules at the given depths in this order. With
  /// per_module = false one window is drawn and shared (DyLoRA's global rank).
  void sample_step(Index step, std::span<const Index> depths, std::vector<RankWindow>& out) {
    out.resize(depths.size());
    if (depths.empty()) return;
    if (!m_options.per_module) {
      for (Index depth : depths) check_depth(depth);
      const RankWindow shared = sample(step, depths[0]);
      std::fill(out.begin(), out.end(), shared);
      return;
    }
    for (std::size_t i = 0; i < depths.size(); ++i) out[i] = sample(step, depths[i]);
  }

  const ERATSamplerOptions& options() const { return m_options; }  ///< with width and depth_floor resolved
  Index max_rank() const { return m_options.max_rank; }
  Index width() const { return m_options.width; }
  Index depth_floor() const { return m_options.depth_floor; }
  /// The sampler's stream (snapshot()/restore() for checkpoints).
  Random& generator() { return m_rng; }

 private:
  void check_depth(Index depth) const {
    if (depth < 0 || depth >= m_options.num_layers)
      detail::fail("rankwise::ERATSampler", "depth must be in [0, num_layers) = [0, ", m_options.num_layers,
                   ") (got ", depth, ")");
  }

  ERATSamplerOptions m_options;
  Random m_rng;
};

}  // namespace rankwise
