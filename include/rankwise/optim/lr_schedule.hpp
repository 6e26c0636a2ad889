#pragma once
/// \file rankwise/optim/lr_schedule.hpp
/// Learning-rate schedules: a factor in [0, 1] for each optimizer step t = 0, 1, ..., which the
/// training loop passes to Optimizer::set_lr_factor() before step().
///
///   constant  f(t) = 1
///   linear    f(t) = t / W during warm-up (t < W), then decays linearly from 1 at t = W to
///             `final_factor` at t = T and stays there (Hugging Face's linear schedule with final 0)
///   cosine    warm-up as above, then f(t) = m + (1 - m) (1 + cos(pi (t - W) / (T - W))) / 2, m = final_factor
/// (W = warmup_steps, T = total_steps.) Docs: docs/optim/lr-schedule.md

#include <rankwise/core/error.hpp>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <string_view>

namespace rankwise {

enum class ScheduleKind { Constant, Linear, Cosine };

struct LRScheduleOptions {
  ScheduleKind kind = ScheduleKind::Constant;
  long warmup_steps = 0;      ///< W >= 0
  long total_steps = 1;       ///< T > W for linear and cosine
  double final_factor = 0.0;  ///< the factor reached at T, in [0, 1]
};

/// Parses "constant", "linear" or "cosine".
inline ScheduleKind schedule_kind_from_name(std::string_view name) {
  if (name == "constant") return ScheduleKind::Constant;
  if (name == "linear") return ScheduleKind::Linear;
  if (name == "cosine") return ScheduleKind::Cosine;
  detail::fail("rankwise::LRSchedule", "schedule must be one of \"constant\", \"linear\", \"cosine\" (got \"", name,
               "\")");
}

class LRSchedule {
 public:
  explicit LRSchedule(const LRScheduleOptions& options = {}) : m_options(options) {
    if (options.warmup_steps < 0)
      detail::fail("rankwise::LRSchedule", "warmup_steps must be >= 0 (got ", options.warmup_steps, ")");
    if (options.kind != ScheduleKind::Constant && options.total_steps <= options.warmup_steps)
      detail::fail("rankwise::LRSchedule", "total_steps must be > warmup_steps = ", options.warmup_steps, " (got ",
                   options.total_steps, ")");
    if (!(options.final_factor >= 0.0 && options.final_factor <= 1.0))
      detail::fail("rankwise::LRSchedule", "final_factor must be in [0, 1] (got ", options.final_factor, ")");
  }

  static LRSchedule constant() { return LRSchedule(); }
  static LRSchedule linear(long warmup_steps, long total_steps, double final_factor = 0.0) {
    return LRSchedule({ScheduleKind::Linear, warmup_steps, total_steps, final_factor});
  }
  static LRSchedule cosine(long warmup_steps, long total_steps, double final_factor = 0.0) {
    return LRSchedule({ScheduleKind::Cosine, warmup_steps, total_steps, final_factor});
  }

  /// The factor for step t (0-based).
  double factor(long t) const {
    if (t < 0) detail::fail("rankwise::LRSchedule", "step must be >= 0 (got ", t, ")");
    const LRScheduleOptions& o = m_options;
    if (o.kind == ScheduleKind::Constant) return 1.0;
    if (t < o.warmup_steps) return double(t) / double(o.warmup_steps);
    const double progress = std::min(1.0, double(t - o.warmup_steps) / double(o.total_steps - o.warmup_steps));
    if (o.kind == ScheduleKind::Linear) return 1.0 - (1.0 - o.final_factor) * progress;
    return o.final_factor + (1.0 - o.final_factor) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  }

  const LRScheduleOptions& options() const { return m_options; }

 private:
  LRScheduleOptions m_options;
};

}  // namespace rankwise
