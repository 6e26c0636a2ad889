#pragma once
/// \file rankwise/io/detail/transpose.hpp
/// The copy between a row-major file and a column-major Eigen matrix is a transpose; done naively
/// (one strided element at a time) it runs at a fraction of memory speed, and power-of-two leading
/// dimensions, which models are full of, make it worse through cache-set conflicts. This kernel
/// moves 4 x 4 tiles through SSE registers (2 x 2 for double) in strips of 16 rows, so both sides
/// are touched a cache line at a time. Portable scalar code covers other targets and the edges.
/// Docs: docs/io/safetensors.md (performance)

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
  constexpr Index strip = 16;
#if defined(RANKWISE_IO_SSE2)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    constexpr Index tile = std::is_same_v<T, float> ? 4 : 2;
    const Index rows_t = rows - rows % tile, cols_t = cols - cols % tile;
    for (Index i0 = 0; i0 < rows_t; i0 += strip) {
      const Index i1 = std::min(i0 + strip, rows_t);
      for (Index j = 0; j < cols_t; j += tile) {
        for (Index i = i0; i < i1; i += tile) {
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
    // The edges: the last rows % tile rows, and the last cols % tile columns of the other rows.
    for (Index i = rows_t; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) dst[j * dst_ld + i] = src[i * src_ld + j];
    for (Index j = cols_t; j < cols; ++j)
      for (Index i = 0; i < rows_t; ++i) dst[j * dst_ld + i] = src[i * src_ld + j];
    return;
  }
#endif
  constexpr Index tile = 8;
  for (Index i0 = 0; i0 < rows; i0 += tile)
    for (Index j0 = 0; j0 < cols; j0 += tile) {
      const Index i1 = std::min(i0 + tile, rows), j1 = std::min(j0 + tile, cols);
      for (Index j = j0; j < j1; ++j)
        for (Index i = i0; i < i1; ++i) dst[j * dst_ld + i] = src[i * src_ld + j];
    }
  (void)strip;
}

}  // namespace rankwise::detail
