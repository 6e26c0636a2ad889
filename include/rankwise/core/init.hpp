#pragma once
/// \file rankwise/core/init.hpp
/// Initialisers: fill a matrix from a Random, in row-major order (the order of PyTorch's tensors),
/// so the same seed gives the same matrix on every platform.
///
///   fill_uniform          U(lo, hi)
///   fill_normal           N(mean, stddev^2)
///   fill_kaiming_uniform  U(-bound, bound), bound = sqrt(6 / ((1 + a^2) fan_in)); PyTorch's default
///                         for nn.Linear and LoRA's A uses a = sqrt(5), i.e. bound = 1 / sqrt(fan_in)
/// Values are drawn in double and rounded once to the scalar. Docs: docs/core/random.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>

#include <cmath>

namespace rankwise {

/// Fills `out` (a matrix or a writable block of one) with draw(), row by row. Takes a const
/// reference so that temporaries such as `A.bottomRows(k)` bind (Eigen's documented idiom).
template <typename Derived, typename Draw>
void fill_with(const Eigen::MatrixBase<Derived>& out, Draw&& draw) {
  using Scalar = typename Derived::Scalar;
  Derived& m = const_cast<Derived&>(out.derived());
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<Scalar>(draw());
}

template <typename Derived>
void fill_uniform(const Eigen::MatrixBase<Derived>& m, double lo, double hi, Random& rng) {
  if (!(lo <= hi)) detail::fail("rankwise::fill_uniform", "need lo <= hi (got ", lo, ", ", hi, ")");
  fill_with(m, [&] { return rng.uniform(lo, hi); });
}

template <typename Derived>
void fill_normal(const Eigen::MatrixBase<Derived>& m, double mean, double stddev, Random& rng) {
  if (!(stddev >= 0.0)) detail::fail("rankwise::fill_normal", "stddev must be >= 0 (got ", stddev, ")");
  fill_with(m, [&] { return rng.normal(mean, stddev); });
}

/// The bound of kaiming_uniform for a given fan-in and negative slope a.
inline double kaiming_uniform_bound(Index fan_in, double a = std::sqrt(5.0)) {
  if (fan_in < 1) detail::fail("rankwise::kaiming_uniform_bound", "fan_in must be >= 1 (got ", fan_in, ")");
  return std::sqrt(6.0 / ((1.0 + detail::no_fuse(a * a)) * double(fan_in)));
}

template <typename Derived>
void fill_kaiming_uniform(const Eigen::MatrixBase<Derived>& m, Index fan_in, Random& rng, double a = std::sqrt(5.0)) {
  const double bound = kaiming_uniform_bound(fan_in, a);
  fill_with(m, [&] { return rng.uniform(-bound, bound); });
}

}  // namespace rankwise
