// AVX2 helpers shared by the CPU kernels: widening bfloat16 and float8 values, e^x over x <= 0 (softmax
// terms), silu(g) * u, a vector's sum and maximum.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace jaxserve {

// 8 bf16 -> 8 f32: the bf16 bits are the high half of the f32 bits.
inline __m256 widen8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One-byte float8 KV values, a tag type per format so that widen8 picks the conversion.
struct Fp8E4M3 {
  uint8_t bits;
};
struct Fp8E5M2 {
  uint8_t bits;
};

// 8 float8_e5m2 -> 8 f32: an e5m2 byte is the high byte of the float16 of the same value, which F16C widens
// exactly (subnormals included).
inline __m256 widen8(const Fp8E5M2* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), bytes));
}

// 8 float8_e4m3fn -> 8 f32: the byte S EEEE MMM placed as the float16 S 0EEEE MMM0000000 is its value times
// 2^-8 (exponent bias 15 instead of 7; subnormals line up too), then scaled back exactly. The NaN bytes 0x7f /
// 0xff would read as +-480; the cache never holds them (writes saturate at 448).
inline __m256 widen8(const Fp8E4M3* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i high = _mm_unpacklo_epi8(_mm_setzero_si128(), bytes);  // each byte << 8
  const __m128i half = _mm_and_si128(_mm_srai_epi16(high, 1), _mm_set1_epi16(static_cast<int16_t>(0xBFFF)));
  return _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.f));
}

// e^x for x <= 0 (scores minus their running max), a Cephes-style polynomial: ~1e-7 relative error. Its
// constants, shared with the 16-lane version below: x is clamped at kExpLowest, split as
// n ln2 + r (ln2 in two parts), e^r = 1 + r + r^2 (kExpPoly in r, highest power first), times 2^n.
constexpr float kExpLowest = -87.0f, kLog2e = 1.44269504088896341f, kLn2High = 0.693359375f,
                kLn2Low = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpLowest));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2High), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Low), x);
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpPoly[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

// silu(g) * u, 8 lanes. sigmoid(g) = 1 / (1 + e^-g) for g >= 0 and e^g / (1 + e^g) below, from e = e^-|g|,
// which never overflows.
inline __m256 silu_times(__m256 g, __m256 u) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp_nonpositive(_mm256_or_ps(g, _mm256_set1_ps(-0.f)));  // e^-|g|
  const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, g), _mm256_add_ps(one, e));  // g < 0: e / (1 + e)
  return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), u);
}

// The same two on 16 lanes (AVX-512 CPUs), the same operations lane for lane, so either width gives a value
// the same bits.
#define JAXSERVE_MATH_AVX512 __attribute__((target("avx512f,avx512dq")))

JAXSERVE_MATH_AVX512 inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpLowest));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2High), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Low), x);
  __m512 y = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpPoly[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x);
  y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
  const __m512i pow2 = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2));
}

JAXSERVE_MATH_AVX512 inline __m512 silu_times16(__m512 g, __m512 u) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = exp_nonpositive16(_mm512_or_ps(g, _mm512_set1_ps(-0.f)));
  const __mmask16 negative = _mm512_movepi32_mask(_mm512_castps_si512(g));  // blendv's sign-bit select
  const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e));
  return _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), u);
}

// out[i] = silu(g[i]) * u[i] for i < n: the MLP's activation out of block_quant's gated projections (the AMX
// panels' store, or a pass after the other paths' product), the same arithmetic either way.
inline void silu_times_row(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, silu_times(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  for (; i < n; ++i) {
    const float e = std::exp(-std::fabs(g[i]));
    out[i] = g[i] * ((std::signbit(g[i]) ? e : 1.f) / (1.f + e)) * u[i];
  }
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

}  // namespace jaxserve
