// The machine's single-precision peak, measured: a loop of independent fused multiply-adds on the
// widest vectors the CPU has (AVX-512, else AVX2 + FMA, else scalar), on `threads` threads at once.
// The benchmarks report their speeds as a fraction of this number measured in the same run, since
// the machines (and their load) differ (../shared notes: an FMA loop reaches about 241 GFLOP/s per
// core on the reference machine). Compiled for those instruction sets function by function, so the
// build itself needs no -march flag.
#pragma once

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace rankwise::bench {

namespace detail {
// 16 independent accumulators hide the FMA latency (4 cycles, 2 ports: 8 in flight) with room to spare.
__attribute__((target("avx512f"))) inline float fma_loop_avx512(long iterations) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(0.001f * float(i));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iterations; ++it)
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  __m512 sum = acc[0];
  for (int i = 1; i < 16; ++i) sum = _mm512_add_ps(sum, acc[i]);
  return _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx2,fma"))) inline float fma_loop_avx2(long iterations) {
  __m256 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm256_set1_ps(0.001f * float(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iterations; ++it)
    for (int i = 0; i < 16; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  alignas(32) float out[8];
  __m256 sum = acc[0];
  for (int i = 1; i < 16; ++i) sum = _mm256_add_ps(sum, acc[i]);
  _mm256_store_ps(out, sum);
  float s = 0;
  for (float v : out) s += v;
  return s;
}

/// Floats per FMA instruction of the widest path this CPU runs.
inline int fma_width() {
  if (__builtin_cpu_supports("avx512f")) return 16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
  return 0;
}

inline float fma_loop(long iterations) {
  const int w = fma_width();
  return w == 16 ? fma_loop_avx512(iterations) : fma_loop_avx2(iterations);
}
}  // namespace detail

/// GFLOP/s of `threads` threads running the FMA loop together for about `seconds` (2 FLOPs per lane
/// per FMA). 0 when the CPU has neither AVX-512 nor AVX2 + FMA.
inline double fma_peak_gflops(int threads, double seconds = 0.3) {
  const int width = detail::fma_width();
  if (width == 0 || threads < 1) return 0.0;
  const long iterations = 1L << 20;  // 16 FMAs each: about 8 ms per call at 2 FMAs per cycle, 1 GHz
  std::atomic<long> calls{0};
  std::atomic<bool> stop{false};
  std::atomic<float> sink{0.0f};
  const auto work = [&] {
    float s = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      s += detail::fma_loop(iterations);
      calls.fetch_add(1, std::memory_order_relaxed);
    }
    sink.store(s);
  };
  (void)detail::fma_loop(iterations / 16);  // wake the vector units up
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(work);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (std::thread& t : pool) t.join();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double flops = double(calls.load()) * double(iterations) * 16.0 * double(width) * 2.0;
  return flops / elapsed * 1e-9;
}

}  // namespace rankwise::bench
