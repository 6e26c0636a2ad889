#pragma once
/// \file rankwise/detail/rank_correlation.hpp
/// Spearman's rank correlation of two equally long samples: the Pearson correlation of their ranks
/// 1..n, tied values given their average rank. Unset with fewer than 2 values or a constant sample.
/// Used by compare_allocation (models/teacher.hpp) and the studies in benchmarks/. Internal: users
/// never include it.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <optional>
#include <vector>

namespace rankwise::detail {

// Ranks 1..n, ties given their average rank.
inline std::vector<double> average_ranks(const std::vector<double>& v) {
  std::vector<std::size_t> order(v.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return v[a] < v[b]; });
  std::vector<double> ranks(v.size());
  for (std::size_t i = 0; i < order.size();) {
    std::size_t j = i;
    while (j + 1 < order.size() && v[order[j + 1]] == v[order[i]]) ++j;
    for (std::size_t k = i; k <= j; ++k) ranks[order[k]] = 0.5 * double(i + j) + 1.0;
    i = j + 1;
  }
  return ranks;
}

inline std::optional<double> spearman(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() < 2) return std::nullopt;
  const std::vector<double> ra = average_ranks(a), rb = average_ranks(b);
  const double mean = 0.5 * double(a.size() + 1);
  double sab = 0.0, saa = 0.0, sbb = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    sab += (ra[i] - mean) * (rb[i] - mean);
    saa += (ra[i] - mean) * (ra[i] - mean);
    sbb += (rb[i] - mean) * (rb[i] - mean);
  }
  if (saa == 0.0 || sbb == 0.0) return std::nullopt;
  return sab / std::sqrt(saa * sbb);
}

}  // namespace rankwise::detail
