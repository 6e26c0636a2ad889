#pragma once
/// \file rankwise/io/detail/transpose.hpp
/// The copy between a row-major file and a column-major Eigen matrix is a transpose; done naively
/// (one strided element at a time) it runs at a fraction of memory speed. This kernel moves 4 x 4
/// tiles through SSE registers (2 x 2 for double) and walks the destination a few columns at a time
/// from top to bottom, so its writes stream through memory instead of touching one cache line per
/// page. Sources with a power-of-two leading dimension alias in the cache: callers pad it (the
/// reader reads rows into a buffer with a padded stride). Portable scalar code covers other targets
/// and the edges. Docs: docs/io/safetensors.md (performance)

#include <rankwise/core/config.hpp>

#include <algorithm>
#include <cstddef>
#include <type_traits>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#include <xmmintrin.h>
#define RANKWISE_IO_SSE2 1
#endif

namespace rankwise::detail {

/// dst[j * dst_ld + i] = src[i * src_ld + j] for i < rows, j < cols.
template <typename T>
void transpose_copy(const T* src, Index rows, Index cols, Index src_ld, T* dst, Index dst_ld) {
#if defined(RANKWISE_IO_SSE2)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    constexpr Index tile = std::is_same_v<T, float> ? 4 : 2;
    constexpr Index panel = 8;  // destination columns written together, top to bottom
    const Index rows_t = rows - rows % tile, cols_p = cols - cols % panel;
    for (Index j0 = 0; j0 < cols_p; j0 += panel) {
      for (Index i = 0; i < rows_t; i += tile) {
        for (Index j = j0; j < j0 + panel; j += tile) {
          const T* s = src + i * src_ld + j;
          T* d = dst + j * dst_ld + i;
          if constexpr (std::is_same_v<T, float>) {
            __m128 r0 = _mm_loadu_ps(s), r1 = _mm_loadu_ps(s + src_ld);
            __m128 r2 = _mm_loadu_ps(s + 2 * src_ld), r3 = _mm_loadu_ps(s + 3 * src_ld);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            _mm_storeu_ps(d, r0);
            _mm_storeu_ps(d + dst_ld, r1);
            _mm_storeu_ps(d + 2 * dst_ld, r2);
            _mm_storeu_ps(d + 3 * dst_ld, r3);
          } else {
            const __m128d r0 = _mm_loadu_pd(s), r1 = _mm_loadu_pd(s + src_ld);
            _mm_storeu_pd(d, _mm_unpacklo_pd(r0, r1));
            _mm_storeu_pd(d + dst_ld, _mm_unpackhi_pd(r0, r1));
          }
        }
      }
    }
    // The edges: the last rows % tile rows, and the last cols % panel columns.
    for (Index i = rows_t; i < rows; ++i)
      for (Index j = 0; j < cols_p; ++j) dst[j * dst_ld + i] = src[i * src_ld + j];
    for (Index j = cols_p; j < cols; ++j)
      for (Index i = 0; i < rows; ++i) dst[j * dst_ld + i] = src[i * src_ld + j];
    return;
  }
#endif
  constexpr Index tile = 8;
  for (Index j0 = 0; j0 < cols; j0 += tile)
    for (Index i0 = 0; i0 < rows; i0 += tile) {
      const Index i1 = std::min(i0 + tile, rows), j1 = std::min(j0 + tile, cols);
      for (Index j = j0; j < j1; ++j)
        for (Index i = i0; i < i1; ++i) dst[j * dst_ld + i] = src[i * src_ld + j];
    }
}

}  // namespace rankwise::detail
