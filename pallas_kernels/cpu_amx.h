// What the AMX kernels share (block_quant_amx.cc's projections, cpu_attention_amx.cc's attention): whether the
// compiler has the intrinsics, the target attributes, a tile configuration and the 16 x 16 transpose their
// results pass through. Only functions with these attributes use AMX or AVX-512, so the library still loads on
// AVX2-only CPUs.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

// AMX intrinsics came with GCC 11 and Clang 12; with older compilers the library builds without these paths.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define JAXSERVE_HAVE_AMX 1
#else
#define JAXSERVE_HAVE_AMX 0
#endif

#ifndef JAXSERVE_AVX512_BF16
#define JAXSERVE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif
#define JAXSERVE_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace jaxserve {

constexpr int kTileDim = 16;  // an AMX tile: 16 rows of 64 bytes (16 float32 sums, or 16 bfloat16 pairs)
constexpr int kPairTile = kTileDim * kTileDim;  // one tile's 32-bit values: bfloat16 pairs or float32 sums

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#if JAXSERVE_HAVE_AMX
// Tile t: 16 rows of 4 * widths[t] bytes (none where 0).
JAXSERVE_AMX inline void configure_tiles(const int (&widths)[8]) {
  TileConfig config = {};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = widths[t] > 0 ? kTileDim : 0;
    config.colsb[t] = static_cast<uint16_t>(4 * widths[t]);
  }
  // GCC 12 does not see ldtilecfg read the config and dropped the stores above (tiles left unconfigured)
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// The projections' tiles for a step of M tokens (block_quant_amx.cc, int8_rows_amx.cc): 0-3 the sums of a
// panel's two output tiles against two token groups (A0.B0, A1.B0, A0.B1, A1.B1), 4-5 the weights (16 rows of
// 64 bytes), 6-7 the groups' activations; all 16 rows. Token groups narrower than 16 get narrower B and sum
// tiles (a tile multiply's time follows its width: one token's is half a full tile's); from three groups on
// every pair is full width, the last zero-padded.
JAXSERVE_AMX inline void configure_panel_tiles(int64_t M) {
  const int tokens0 = static_cast<int>(std::min<int64_t>(kTileDim, M));
  const int tokens1 = M > 2 * kTileDim ? kTileDim : static_cast<int>(std::clamp<int64_t>(M - kTileDim, 0, kTileDim));
  configure_tiles({tokens0, tokens0, tokens1, tokens1, kTileDim, kTileDim, tokens0, tokens1});
}

// Sum tiles 0..count-1 (count <= 4) zeroed, or stored tile after tile into `sums` (16 x 16 float32 each). Tile
// numbers are immediates the intrinsics spell into the instruction, hence the unrolled tiles; with a constant
// count the branches fold away.
JAXSERVE_AMX inline void zero_sum_tiles(int count) {
  _tile_zero(0);
  if (count > 1) _tile_zero(1);
  if (count > 2) _tile_zero(2);
  if (count > 3) _tile_zero(3);
}

JAXSERVE_AMX inline void store_sum_tiles(float* sums, int count) {
  _tile_stored(0, sums, 64);
  if (count > 1) _tile_stored(1, sums + kPairTile, 64);
  if (count > 2) _tile_stored(2, sums + 2 * kPairTile, 64);
  if (count > 3) _tile_stored(3, sums + 3 * kPairTile, 64);
}

JAXSERVE_AMX inline void release_tiles() { _tile_release(); }
#endif

// rows[0..15] transposed in place (16 x 16 float32): unpack pairs, then 4 x 4 blocks, then 128-bit lanes.
JAXSERVE_AVX512_BF16 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  // u[4i + c], 128-bit lane L: column 4L + c of rows 4i..4i+3
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
  }
}

}  // namespace jaxserve
