// The bfloat16 pieces shared by block_quant_avx512.cc (vdpbf16ps loops) and block_quant_amx.cc (AMX tiles):
// unpacking a tile's blocks to bfloat16 and rounding the activations. Only functions with these target
// attributes use AVX-512, so the library still loads on AVX2-only CPUs.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "block_quant.h"

#ifndef JAXSERVE_AVX512_BF16
#define JAXSERVE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace jaxserve::block_quant {
namespace {

// Block b of a tile's two rows dequantized to bfloat16 (32 values each, in w0 and w1): scale * q + min in
// float32 (as block_quant.dequantize), then rounded. A 4-bit block has only sixteen values: they are computed
// once into a table that vpermw looks the block's 32 nibbles up in (about two thirds of the instructions of
// converting each value); one vector holds both rows' tables (row 1's at indices 16-31) and one widening reads
// both rows' bytes. `t` is the tile's weights (tile_of).
template <bool kFourBit>
JAXSERVE_AVX512_BF16 inline void unpack_block(const Weights& t, int64_t b, __m512i& w0, __m512i& w1) {
  static_assert(kTile == 2, "a tile's two rows are unpacked together");
  constexpr int64_t kBlockBytes = kFourBit ? kBlock / 2 : kBlock;
  const uint8_t* q = t.q + b * kTile * kBlockBytes;
  const float *scale = t.scale, *min = t.min;
  const int64_t i = b * kTile;
  if constexpr (kFourBit) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i nibble = _mm512_set1_epi16(0x0f), second_table = _mm512_set1_epi16(0x10);
    const __m512 values0 = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(scale[i])), _mm512_set1_ps(min[i]));
    const __m512 values1 = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(scale[i + 1])), _mm512_set1_ps(min[i + 1]));
    const __m512i tables = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(values1, values0));
    // words 0-15: row 0's bytes, 16-31: row 1's; value j of a row's block is byte j's low nibble for j < 16,
    // byte j - 16's high one after
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    const __m512i high = _mm512_srli_epi16(bytes, 4);
    const __m512i index0 = _mm512_and_si512(_mm512_shuffle_i64x2(bytes, high, 0x44), nibble);
    // (x & 0x0f) | 0x10: row 1's values sit at table indices 16-31
    const __m512i index1 =
        _mm512_ternarylogic_epi32(_mm512_shuffle_i64x2(bytes, high, 0xee), nibble, second_table, 0xea);
    w0 = _mm512_permutexvar_epi16(index0, tables);
    w1 = _mm512_permutexvar_epi16(index1, tables);
  } else {
    __m512i rows[kTile];
    for (int r = 0; r < kTile; ++r) {
      const __m512 s = _mm512_set1_ps(scale[i + r]);
      __m512 values[2];
      for (int h = 0; h < 2; ++h)
        values[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kBlock * r + 16 * h)))),
                                  s);
      rows[r] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(values[1], values[0]));
    }
    w0 = rows[0];
    w1 = rows[1];
  }
}

// Block b of a tile's two rows as bfloat16, for blocks of kRowBytes bytes a row: 4-bit (16) and 8-bit (32)
// ones unpacked, a bfloat16 checkpoint's (64) loaded as they are.
template <int kRowBytes>
JAXSERVE_AVX512_BF16 inline void block_values(const Weights& t, int64_t b, __m512i& w0, __m512i& w1) {
  if constexpr (kRowBytes == 64) {
    const uint8_t* q = t.q + b * kTile * kRowBytes;
    w0 = _mm512_loadu_si512(q);
    w1 = _mm512_loadu_si512(q + kRowBytes);
  } else {
    unpack_block<kRowBytes == kBlock / 2>(t, b, w0, w1);
  }
}

// Blocks go by faster than the hardware's prefetchers fetch them: unpacking waited on memory until each block
// prefetched the weights 2 KiB ahead (alternated in one process: a one-row decode step 9.1 -> 8.0-8.6 ms, a
// 32-row one 55.7 -> 52.1 ms, medians of six to twelve; 1-4 KiB within the noise of each other).
constexpr int64_t kPrefetchBytes = 2048;

// kRowBytes: a block's bytes a row (16: 4-bit, 32: 8-bit, 64: bfloat16).
template <int kRowBytes>
JAXSERVE_AVX512_BF16 inline void prefetch_block(const Weights& t, int64_t b) {
  _mm_prefetch(reinterpret_cast<const char*>(t.q) + b * kTile * kRowBytes + kPrefetchBytes, _MM_HINT_T0);
}

template <bool kFourBit>
constexpr int kRowBytesOf = kFourBit ? kBlock / 2 : kBlock;

// x [M, K] float32 -> bfloat16, 32 values at a time (K is a multiple of 32).
JAXSERVE_AVX512_BF16 inline void round_rows(const float* x, int64_t count, uint16_t* out) {
  for (int64_t i = 0; i < count; i += 32) {
    const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_store_si512(out + i, reinterpret_cast<__m512i>(pair));
  }
}

}  // namespace
}  // namespace jaxserve::block_quant
