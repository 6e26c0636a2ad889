// Tests for rankwise/core/random.hpp and rankwise/core/init.hpp.
#include <rankwise/core/init.hpp>
#include <rankwise/core/random.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;

TEST_CASE("Random: the same seed gives the same stream, another seed another one", "[core][random]") {
  Random a(123), b(123), c(124);
  bool differs = false;
  for (int i = 0; i < 1000; ++i) {
    const std::uint64_t x = a.next_u64();
    CHECK(x == b.next_u64());
    differs = differs || x != c.next_u64();
  }
  CHECK(differs);
}

TEST_CASE("Random: the stream is pinned to its specification on every platform", "[core][random]") {
  // splitmix64 seeded with 0 starts with this published value; it seeds word 0 of the state.
  std::uint64_t z = 0;
  z += 0x9e3779b97f4a7c15ULL;
  std::uint64_t r = z;
  r = (r ^ (r >> 30)) * 0xbf58476d1ce4e5b9ULL;
  r = (r ^ (r >> 27)) * 0x94d049bb133111ebULL;
  r ^= r >> 31;
  CHECK(r == 0xe220a8397b1dcdafULL);

  // Regression anchors recorded from this implementation and checked identical under GCC and Clang,
  // -O0 to -O3, with and without -march=native and -ffp-contract=fast. If one changes, every seeded
  // model, VeRA bank and test fixture changes with it, so the change must be deliberate.
  Random rng(42);
  const std::vector<std::uint64_t> expected = {0x15780b2e0c2ec716ULL, 0x6104d9866d113a7eULL, 0xae17533239e499a1ULL};
  for (std::uint64_t e : expected) CHECK(rng.next_u64() == e);
  Random normals(7);
  CHECK(normals.normal() == 0x1.edc0d635eea0bp-1);
  CHECK(normals.normal() == -0x1.1052212a30fdep+0);

  // A digest (FNV-1a) of every byte of a float kaiming fill and a double normal fill.
  Random k(1);
  Matrix<float> m(100, 100);
  rankwise::fill_kaiming_uniform(m, 37, k);
  Matrix<double> g(100, 100);
  rankwise::fill_normal(g, 0.3, 2.5, k);
  std::uint64_t digest = 1469598103934665603ULL;
  const auto mix = [&](const void* data, std::size_t n) {
    const unsigned char* bytes = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < n; ++i) {
      digest ^= bytes[i];
      digest *= 1099511628211ULL;
    }
  };
  mix(m.data(), std::size_t(m.size()) * sizeof(float));
  mix(g.data(), std::size_t(g.size()) * sizeof(double));
  CHECK(digest == 0x47ea053a0656a7bcULL);
}

TEST_CASE("Random: portable_log agrees with the C library to about one ulp", "[core][random]") {
  Random rng(5);
  double worst = 0.0;
  for (int i = 0; i < 100000; ++i) {
    const double x = rng.uniform() + 1e-300;
    const double ref = std::log(x);
    worst = std::max(worst, std::abs(rankwise::detail::portable_log(x) - ref) / std::abs(ref));
  }
  CHECK(worst < 1e-15);
  CHECK(rankwise::detail::portable_log(1.0) == 0.0);
  CHECK(rankwise::detail::portable_log(0.5) == Approx(-0.6931471805599453).epsilon(1e-15));
}

TEST_CASE("Random: uniform and normal have the right moments", "[core][random]") {
  Random rng(2024);
  const int n = 200000;
  double su = 0, su2 = 0, sn = 0, sn2 = 0;
  int within_one_sigma = 0;
  for (int i = 0; i < n; ++i) {
    const double u = rng.uniform();
    REQUIRE(u >= 0.0);
    REQUIRE(u < 1.0);
    su += u;
    su2 += u * u;
    const double g = rng.normal();
    sn += g;
    sn2 += g * g;
    within_one_sigma += std::abs(g) < 1.0;
  }
  CHECK(su / n == Approx(0.5).margin(0.005));
  CHECK(su2 / n - (su / n) * (su / n) == Approx(1.0 / 12.0).margin(0.002));
  CHECK(sn / n == Approx(0.0).margin(0.01));
  CHECK(sn2 / n == Approx(1.0).margin(0.01));
  CHECK(double(within_one_sigma) / n == Approx(0.6827).margin(0.005));
}

TEST_CASE("Random: uniform_int covers its range evenly and rejects an empty one", "[core][random]") {
  Random rng(9);
  std::vector<int> counts(7, 0);
  for (int i = 0; i < 70000; ++i) {
    const Index k = rng.uniform_int(3, 9);
    REQUIRE(k >= 3);
    REQUIRE(k <= 9);
    ++counts[std::size_t(k - 3)];
  }
  for (int c : counts) CHECK(c == Approx(10000).margin(500));
  CHECK_THROWS_AS(rng.uniform_int(5, 4), rankwise::InvalidArgument);
}

TEST_CASE("Random: snapshot and restore replay the stream, and fork is independent", "[core][random]") {
  Random rng(11);
  rng.normal();  // leaves a spare normal in the state
  const Random::Snapshot s = rng.snapshot();
  const double a = rng.normal(), b = rng.normal(), c = rng.uniform();
  rng.restore(s);
  CHECK(rng.normal() == a);
  CHECK(rng.normal() == b);
  CHECK(rng.uniform() == c);

  Random parent(11);
  Random child = parent.fork();
  CHECK_FALSE(child == parent);
  Random parent2(11);
  CHECK(parent2.fork() == child);  // forking is deterministic too
}

TEST_CASE("init: fills in row-major order with the requested distribution", "[core][init]") {
  Random a(3), b(3);
  Matrix<double> m(2, 3);
  rankwise::fill_uniform(m, -1.0, 1.0, a);
  for (Index i = 0; i < 2; ++i)
    for (Index j = 0; j < 3; ++j) CHECK(m(i, j) == b.uniform(-1.0, 1.0));

  Random rng(4);
  Matrix<float> w(64, 400);
  rankwise::fill_kaiming_uniform(w, 400, rng);
  CHECK(rankwise::kaiming_uniform_bound(400) == Approx(1.0 / 20.0));
  CHECK(w.cwiseAbs().maxCoeff() <= 0.05f);
  CHECK(w.cwiseAbs().maxCoeff() > 0.049f);
  CHECK(double(w.mean()) == Approx(0.0).margin(0.001));

  Matrix<double> g(200, 200);
  rankwise::fill_normal(g, 1.0, 0.5, rng);
  CHECK(g.mean() == Approx(1.0).margin(0.01));
  CHECK(std::sqrt((g.array() - g.mean()).square().mean()) == Approx(0.5).margin(0.01));

  // Blocks of a matrix can be filled in place.
  Matrix<double> z = Matrix<double>::Zero(4, 4);
  rankwise::fill_uniform(z.bottomRows(2), 1.0, 2.0, rng);
  CHECK(z.topRows(2).isZero(0.0));
  CHECK(z.bottomRows(2).minCoeff() >= 1.0);
}

TEST_CASE("init: invalid arguments are rejected", "[core][init][errors]") {
  Random rng(0);
  Matrix<float> m(2, 2);
  CHECK_THROWS_WITH(rankwise::fill_uniform(m, 1.0, 0.0, rng), Catch::Contains("[rankwise::fill_uniform]"));
  CHECK_THROWS_AS(rankwise::fill_normal(m, 0.0, -1.0, rng), rankwise::InvalidArgument);
  CHECK_THROWS_WITH(rankwise::kaiming_uniform_bound(0), Catch::Contains("fan_in must be >= 1 (got 0)"));
}
