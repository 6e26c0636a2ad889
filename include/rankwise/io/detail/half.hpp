#pragma once
/// \file rankwise/io/detail/half.hpp
/// Conversions between float and the 16-bit formats of safetensors files, done on the bits so that
/// every platform gives the same result.
///
///   F16   IEEE 754 binary16: 1 sign, 5 exponent (bias 15), 10 fraction bits; subnormals down to 2^-24
///   BF16  bfloat16: the upper half of a binary32 (1 sign, 8 exponent, 7 fraction bits)
/// Widening (16 -> 32 bits) is exact. Narrowing rounds to nearest, ties to even; values beyond the
/// largest finite value round to infinity; NaN stays NaN (quiet, sign and leading payload kept).
/// double -> 16 bits goes through float: 24 >= 2 * 11 + 2 bits, so that double rounding can never
/// differ from rounding once. Docs: docs/io/safetensors.md

#include <bit>
#include <cstdint>

namespace rankwise::detail {

inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t fraction = h & 0x3ffu;
  std::uint32_t bits = 0;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (fraction << 13);  // infinity or NaN (payload kept)
  } else if (exponent != 0) {
    bits = sign | ((exponent + (127 - 15)) << 23) | (fraction << 13);
  } else if (fraction == 0) {
    bits = sign;  // signed zero
  } else {
    // Subnormal half: fraction * 2^-24. Shift the leading one into the implicit position.
    int e = 127 - 15 + 1;
    while ((fraction & 0x400u) == 0) {
      fraction <<= 1;
      --e;
    }
    bits = sign | (std::uint32_t(e) << 23) | ((fraction & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

inline std::uint16_t float_to_half(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint16_t sign = std::uint16_t((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {
    if (magnitude == 0x7f800000u) return std::uint16_t(sign | 0x7c00u);  // infinity
    return std::uint16_t(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));  // quiet NaN
  }
  if (magnitude >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (magnitude >= 0x38800000u) {
    // Normal half (|x| >= 2^-14): rebias and round the 13 dropped bits to nearest even. A carry out
    // of the fraction correctly bumps the exponent.
    const std::uint32_t rebiased = magnitude - ((127u - 15u) << 23);
    const std::uint32_t round = 0xfffu + ((rebiased >> 13) & 1u);
    return std::uint16_t(sign | ((rebiased + round) >> 13));
  }
  if (magnitude < 0x33000000u) return sign;  // below half of the smallest subnormal (2^-25): zero
  // Subnormal half: the result is round(|x| / 2^-24) with the implicit bit made explicit.
  const std::uint32_t exponent = magnitude >> 23;  // in [102, 112]
  const std::uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - exponent;  // in [14, 24]
  const std::uint32_t kept = mantissa >> shift;
  const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1u);
  const std::uint32_t rounded = kept + ((rest > halfway || (rest == halfway && (kept & 1u))) ? 1u : 0u);
  return std::uint16_t(sign | rounded);
}

inline float bfloat16_to_float(std::uint16_t b) { return std::bit_cast<float>(std::uint32_t(b) << 16); }

inline std::uint16_t float_to_bfloat16(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((bits >> 16) | 0x0040u);  // quiet NaN
  const std::uint32_t round = 0x7fffu + ((bits >> 16) & 1u);  // overflow correctly yields infinity
  return std::uint16_t((bits + round) >> 16);
}

}  // namespace rankwise::detail
