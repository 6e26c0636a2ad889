// What every rankwise benchmark prints about the run: machine, compiler, flags, Eigen, BLAS, threads,
// and the environment variables known to change the numbers (docs/benchmarks.md, "Traps").
#pragma once
#include <rankwise/core/parallel.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#if defined(RANKWISE_USE_BLAS)
extern "C" {
void openblas_set_num_threads(int);
char* openblas_get_corename(void);
char* openblas_get_config(void);
}
#endif

namespace rankwise::bench {

/// The mean of v (0 when empty) and its sample standard deviation (0 below two values).
inline double mean(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / double(v.size());
}
inline double sd(const std::vector<double>& v) {
  if (v.size() < 2) return 0.0;
  const double m = mean(v);
  double s = 0.0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / double(v.size() - 1));
}

/// The non-empty items of a comma-separated list ("lora,,gain" -> {"lora", "gain"}).
inline std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> items;
  std::stringstream in(list);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) items.push_back(item);
  return items;
}

inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

inline std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string(fallback);
}

inline std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "g++ " __VERSION__;
#else
  return "unknown";
#endif
}

inline std::string simd() {
#if defined(__AVX512F__)
  return "AVX-512 (" + std::string(Eigen::SimdInstructionSetsInUse()) + ")";
#elif defined(__AVX2__) && defined(__FMA__)
  return "AVX2 + FMA (" + std::string(Eigen::SimdInstructionSetsInUse()) + ")";
#else
  return Eigen::SimdInstructionSetsInUse();
#endif
}

/// The first three fields of /proc/loadavg (1, 5 and 15 minutes): how busy the machine was.
inline std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return a + " " + b + " " + c;
}

inline std::string backend() {
#if defined(RANKWISE_USE_BLAS)
  return std::string("OpenBLAS (") + openblas_get_corename() + " kernel; " + openblas_get_config() + ")";
#else
  return "Eigen's own kernels";
#endif
}

inline std::string eigen_version() {
  return std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) + "." +
         std::to_string(EIGEN_MINOR_VERSION);
}

/// RANKWISE_BENCH_POOL=0: set_threads() sets the product backend's threads instead of rankwise's.
inline bool backend_threads() {
  const char* pool = std::getenv("RANKWISE_BENCH_POOL");
  return pool && std::string(pool) == "0";
}

/// Whose threads set_threads() sets.
inline std::string threads_kind() {
  return backend_threads() ? "the product backend's (RANKWISE_BENCH_POOL=0)" : "rankwise's own (core/parallel.hpp)";
}

/// Sets n threads: rankwise's own (core/parallel.hpp: they split the products, each product running
/// on one thread), or with RANKWISE_BENCH_POOL=0 those of whichever backend runs the products (Eigen's
/// OpenMP, or OpenBLAS), for comparison.
inline void set_threads(int n) {
  const bool backend = backend_threads();
  rankwise::set_num_threads(backend ? 1 : n);
  Eigen::setNbThreads(backend ? n : 1);
#if defined(RANKWISE_USE_BLAS)
  openblas_set_num_threads(backend ? n : 1);
#endif
}

}  // namespace rankwise::bench
