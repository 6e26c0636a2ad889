#pragma once
/// \file rankwise/rank/dylora_sampler.hpp
/// DyLoRASampler: DyLoRA's rank schedule (Valipour et al., 2023, arXiv:2210.07558), as the official
/// code does it: before each optimisation step draw one b ~ U{r_min, ..., r_max} and use it for every
/// DyLoRA adapter of the model (global, not per layer).
///
///   b = uniform_int(r_min, r_max) from the sampler's own stream, forked from the Random it was given
/// The sampler decides; the adapters act (DyLoRA::set_active_rank(b)). Docs: docs/adapters/dylora.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>

namespace rankwise {

struct DyLoRASamplerOptions {
  Index min_rank = 1;  ///< r_min (the paper uses 1)
  Index max_rank = 8;  ///< r_max, the adapters' maximum rank
};

class DyLoRASampler {
 public:
  /// Forks its stream from `rng`, so the same seed gives the same ranks on every platform.
  DyLoRASampler(const DyLoRASamplerOptions& options, Random& rng) : m_options(options) {
    if (options.min_rank < 1 || options.min_rank > options.max_rank)
      detail::fail("rankwise::DyLoRASampler", "need 1 <= r_min <= r_max (got r_min ", options.min_rank, ", r_max ",
                   options.max_rank, ")");
    m_rng = rng.fork();
  }

  /// The rank of the next step, one for the whole model.
  Index sample() {
    m_last = m_rng.uniform_int(m_options.min_rank, m_options.max_rank);
    return m_last;
  }

  /// The rank returned by the last sample() (0 before the first).
  Index last() const { return m_last; }
  Index min_rank() const { return m_options.min_rank; }
  Index max_rank() const { return m_options.max_rank; }
  const DyLoRASamplerOptions& options() const { return m_options; }
  /// The sampler's stream (snapshot()/restore() for checkpoints).
  Random& generator() { return m_rng; }

 private:
  DyLoRASamplerOptions m_options;
  Random m_rng;
  Index m_last = 0;
};

}  // namespace rankwise
