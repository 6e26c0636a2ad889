#pragma once
/// \file rankwise/core/random.hpp
/// Random: the seeded generator behind every random number in rankwise, with the same output on
/// every platform for the same seed (std:: distributions differ between standard libraries, so
/// rankwise converts the raw bits itself).
///
///   bits     xoshiro256** (Blackman & Vigna, 2018), state seeded from the 64-bit seed by splitmix64
///   uniform  u = (bits >> 11) * 2^-53, exact in [0, 1)
///   normal   Marsaglia's polar method in double, with a logarithm computed from +, -, *, / and an
///            exact frexp, so no libm difference can leak in; pairs are used in order
///   integers unbiased rejection sampling
/// Copying a Random copies its stream; fork() starts an independent stream. Docs: docs/core/random.md

#include <rankwise/core/error.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>

namespace rankwise {

namespace detail {

/// Returns x rounded to double and hidden from the optimizer, so that a following addition cannot be
/// fused with the multiplication that produced x. A fused multiply-add changes the last bit of a
/// result on some compilers and machines but not others (Clang's -ffp-contract=fast even ignores
/// pragmas); a volatile round trip is the one barrier every compiler honours.
inline double no_fuse(double x) {
  volatile double stored = x;
  return stored;
}

/// Natural logarithm of x > 0 from IEEE-exact operations only (about 1 ulp): x = m 2^e with
/// m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m - 1) / (m + 1)) by its odd series.
inline double portable_log(double x) {
  int e = 0;
  double m = std::frexp(x, &e);  // exact: x = m * 2^e, m in [0.5, 1)
  if (m < 0.70710678118654752440) {
    m = m * 2.0;
    e = e - 1;
  }
  const double t = (m - 1.0) / (m + 1.0);  // |t| <= 0.1716, so t^2 <= 0.0295
  const double t2 = t * t;
  double p = 1.0 / 25.0;  // atanh(t) / t = sum t^(2k) / (2k + 1): 13 terms reach double precision
  for (int k = 23; k >= 1; k -= 2) {
    p = no_fuse(p * t2) + 1.0 / double(k);
  }
  const double log_m = no_fuse(2.0 * t * p);
  const double ln2_hi = 6.93147180369123816490e-01;  // ln 2 split so that e * ln2_hi is exact
  const double ln2_lo = 1.90821492927058770002e-10;
  const double de = double(e);
  return de * ln2_hi + (no_fuse(de * ln2_lo) + log_m);  // de * ln2_hi is exact
}

}  // namespace detail

class Random {
 public:
  using State = std::array<std::uint64_t, 4>;

  explicit Random(std::uint64_t seed = 0) { reseed(seed); }

  /// Restarts the stream from `seed`.
  void reseed(std::uint64_t seed) {
    std::uint64_t z = seed;
    for (std::uint64_t& word : m_state) word = splitmix64(z);
    m_has_spare = false;
    m_spare = 0.0;
  }

  /// 64 raw random bits.
  std::uint64_t next_u64() {
    const std::uint64_t result = rotl(m_state[1] * 5, 7) * 9;
    const std::uint64_t t = m_state[1] << 17;
    m_state[2] ^= m_state[0];
    m_state[3] ^= m_state[1];
    m_state[1] ^= m_state[2];
    m_state[0] ^= m_state[3];
    m_state[2] ^= t;
    m_state[3] = rotl(m_state[3], 45);
    return result;
  }

  /// Uniform double in [0, 1), 53 random bits.
  double uniform() { return double(next_u64() >> 11) * 0x1.0p-53; }

  /// Uniform double in [lo, hi).
  double uniform(double lo, double hi) {
      return lo + detail::no_fuse((hi - lo) * uniform());
  }

  /// Standard normal N(0, 1).
  double normal() {
      if (m_has_spare) {
      m_has_spare = false;
      return m_spare;
    }
    double u = 0.0, v = 0.0, s = 0.0;
    do {
      u = 2.0 * uniform() - 1.0;
      v = 2.0 * uniform() - 1.0;
      s = detail::no_fuse(u * u) + detail::no_fuse(v * v);  // 2 * uniform() - 1 is exact: no fusing risk
    } while (s >= 1.0 || s == 0.0);
    const double f = std::sqrt(-2.0 * detail::portable_log(s) / s);  // sqrt is exact-rounded by IEEE 754
    m_spare = v * f;
    m_has_spare = true;
    return u * f;
  }

  /// Normal with the given mean and standard deviation.
  double normal(double mean, double stddev) {
      return mean + detail::no_fuse(stddev * normal());
  }

  /// True with probability p.
  bool bernoulli(double p) { return uniform() < p; }

  /// Uniform integer in [lo, hi], both included, without modulo bias.
  Index uniform_int(Index lo, Index hi) {
    if (lo > hi) detail::fail("rankwise::Random::uniform_int", "need lo <= hi (got ", lo, " > ", hi, ")");
    const std::uint64_t range = std::uint64_t(hi - lo) + 1;  // 0 means the full 2^64 range
    if (range == 0) return Index(next_u64());
    const std::uint64_t limit = std::numeric_limits<std::uint64_t>::max() -
                                std::numeric_limits<std::uint64_t>::max() % range;
    std::uint64_t x = next_u64();
    while (x >= limit) x = next_u64();
    return lo + Index(x % range);
  }

  /// A generator on an independent stream, seeded from this one (which advances by one draw).
  Random fork() { return Random(next_u64()); }

  /// The whole stream position, for checkpoints: restoring it replays the same numbers.
  struct Snapshot {
    State state{};
    bool has_spare = false;
    double spare = 0.0;
  };
  Snapshot snapshot() const { return {m_state, m_has_spare, m_spare}; }
  void restore(const Snapshot& s) {
    m_state = s.state;
    m_has_spare = s.has_spare;
    m_spare = s.spare;
  }

  friend bool operator==(const Random& a, const Random& b) {
    return a.m_state == b.m_state && a.m_has_spare == b.m_has_spare &&
           (!a.m_has_spare || a.m_spare == b.m_spare);
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static std::uint64_t splitmix64(std::uint64_t& z) {
    z += 0x9e3779b97f4a7c15ULL;
    std::uint64_t r = z;
    r = (r ^ (r >> 30)) * 0xbf58476d1ce4e5b9ULL;
    r = (r ^ (r >> 27)) * 0x94d049bb133111ebULL;
    return r ^ (r >> 31);
  }

  State m_state{};
  bool m_has_spare = false;
  double m_spare = 0.0;
};

}  // namespace rankwise
