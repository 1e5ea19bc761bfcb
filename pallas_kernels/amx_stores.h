// What the AMX projections share once a panel's sums are float32 tiles ([output][token], as
// block_quant_amx.cc's bfloat16 tiles and int8_rows_amx.cc's scaled int32 ones leave them): writing them out as
// rows, with the MLP's activation, or folded into each token's running argmax. Only functions with these
// target attributes use AVX-512, so the library still loads on AVX2-only CPUs.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_amx.h"
#include "cpu_math.h"

namespace jaxserve::block_quant {
namespace {

// 16 float32 outputs of a token's row into y at `out`: `streaming` (a whole aligned 64-byte line) past the
// caches, else masked to `valid`. A long step's y is written one 64-byte piece a row per panel, rows N * 4 bytes
// apart, so an ordinary store first reads its line from memory; a streaming store does not (a 128-row decode
// step 5% faster, alternated step by step; prefill steps even).
JAXSERVE_AVX512_BF16 inline void store_row(float* out, __m512 values, __mmask16 valid, bool streaming) {
  if (streaming)
    _mm512_stream_ps(out, values);
  else
    _mm512_mask_storeu_ps(out, valid, values);
}

// silu(gate) * up over a gated pair of sums tiles (16 x 16 each), cpu_math.h's arithmetic on 16 lanes.
JAXSERVE_AVX512_BF16 inline void silu_times_tile(const float* gate, const float* up, float* activation) {
  for (int i = 0; i < kPairTile; i += kTileDim)
    _mm512_store_ps(activation + i, silu_times16(_mm512_load_ps(gate + i), _mm512_load_ps(up + i)));
}

// The group's sums (tile a + 2 * g: outputs 16a.., tokens 16g..; [output][token]) into y's rows m0.. for its
// real tokens and outputs.
JAXSERVE_AVX512_BF16 void store_sums(const float* sums, int64_t m0, int64_t tokens, int64_t o0, int count, float* y,
                                     int64_t N, bool streaming) {
  for (int g = 0; g * kTileDim < tokens; ++g)
    for (int a = 0; a * kTileDim < count; ++a) {
      __m512 rows[kTileDim];
      for (int r = 0; r < kTileDim; ++r) rows[r] = _mm512_load_ps(sums + (a + 2 * g) * kPairTile + r * kTileDim);
      transpose16(rows);
      const int valid = std::min(kTileDim, count - a * kTileDim);
      const __mmask16 outputs = _cvtu32_mask16((1u << valid) - 1);
      for (int j = 0; j < std::min<int64_t>(kTileDim, tokens - g * kTileDim); ++j)
        store_row(y + (m0 + g * kTileDim + j) * N + o0 + a * kTileDim, rows[j], outputs,
                  streaming && valid == kTileDim);
    }
}

// A gated panel's sums (tile 2g: 16 gate outputs, tile 2g + 1: the same 16 up outputs, tokens 16g..) as
// silu(gate) * up into y's rows m0.. [tokens, width], columns o0..o0 + 16. The activation is elementwise, so it
// is taken in the tiles' [output][token] order and only its result transposed (one transpose, not two: a 4 x 128
// prefill ~5% faster, alternated).
JAXSERVE_AVX512_BF16 void store_gated(const float* sums, int64_t m0, int64_t tokens, int64_t o0, float* y,
                                      int64_t width, bool streaming) {
  for (int g = 0; g * kTileDim < tokens; ++g) {
    alignas(64) float activation[kTileDim * kTileDim];
    silu_times_tile(sums + 2 * g * kPairTile, sums + (2 * g + 1) * kPairTile, activation);
    __m512 rows[kTileDim];
    for (int r = 0; r < kTileDim; ++r) rows[r] = _mm512_load_ps(activation + r * kTileDim);
    transpose16(rows);
    for (int j = 0; j < std::min<int64_t>(kTileDim, tokens - g * kTileDim); ++j)
      store_row(y + (m0 + g * kTileDim + j) * width + o0, rows[j], 0xFFFF, streaming);
  }
}

// Where each token's largest output so far is, for one task (a contiguous range of panels, walked in order):
// per token, the value, its index, and whether any output was a NaN.
struct RunningMax {
  float* value;
  int32_t* index;
  int32_t* nan;
};

// The group's sums (as store_sums reads them) folded into the task's running maxima instead of written out:
// per token, the first index of its largest output (a strictly larger one replaces it, so ties keep the
// earlier output), and whether it saw a NaN. Tokens are the tiles' columns, so it is vertical compares.
JAXSERVE_AVX512_BF16 void fold_max(const float* sums, int64_t m0, int64_t tokens, int64_t o0, int count,
                                   RunningMax& best) {
  for (int g = 0; g * kTileDim < tokens; ++g) {
    const int64_t t0 = m0 + g * kTileDim;
    __m512 value = _mm512_loadu_ps(best.value + t0);
    __m512i index = _mm512_loadu_si512(best.index + t0), nan = _mm512_loadu_si512(best.nan + t0);
    for (int a = 0; a * kTileDim < count; ++a)
      for (int r = 0; r < std::min(kTileDim, count - a * kTileDim); ++r) {
        const __m512 v = _mm512_load_ps(sums + (a + 2 * g) * kPairTile + r * kTileDim);
        const __mmask16 larger = _mm512_cmp_ps_mask(v, value, _CMP_GT_OQ);
        value = _mm512_mask_mov_ps(value, larger, v);
        index = _mm512_mask_mov_epi32(index, larger, _mm512_set1_epi32(static_cast<int32_t>(o0 + a * kTileDim + r)));
        nan = _mm512_mask_mov_epi32(nan, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(1));
      }
    _mm512_storeu_ps(best.value + t0, value);
    _mm512_storeu_si512(best.index + t0, index);
    _mm512_storeu_si512(best.nan + t0, nan);
  }
}

// A projection's panels split over the pool's threads: `tasks` contiguous ranges of `per_task` panels (about
// four a thread, so a slow thread's share is taken up by the others).
struct PanelTasks {
  PanelTasks(int64_t panels, int64_t threads) {
    const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(panels / 2, threads * 4));
    per_task = (panels + wanted - 1) / wanted;
    tasks = (panels + per_task - 1) / per_task;
  }
  int64_t per_task, tasks;
};

// An argmax call's running maxima, one set per task (`padded` tokens apiece; -inf, the task's first output, no
// NaN to start), merged in task order: a later task's value wins only if larger, so ties keep the first index;
// a row that saw a NaN gets N - 1.
struct TaskMaxima {
  TaskMaxima(bool on, int64_t tasks, int64_t padded, int64_t outputs_per_task)
      : padded(padded), value(on ? tasks * padded : 0, -INFINITY), index(value.size()), nan(value.size()) {
    for (int64_t t = 0; on && t < tasks; ++t)
      std::fill_n(index.begin() + t * padded, padded, static_cast<int32_t>(t * outputs_per_task));
  }
  RunningMax of(int64_t t) {
    if (value.empty()) return {nullptr, nullptr, nullptr};
    return {value.data() + t * padded, index.data() + t * padded, nan.data() + t * padded};
  }
  void merge(int64_t M, int64_t N, int32_t* y_argmax) const {
    const int64_t tasks = static_cast<int64_t>(value.size()) / padded;
    for (int64_t m = 0; m < M; ++m) {
      float best = value[m];
      int32_t at = index[m], saw_nan = nan[m];
      for (int64_t t = 1; t < tasks; ++t) {
        if (value[t * padded + m] > best) {
          best = value[t * padded + m];
          at = index[t * padded + m];
        }
        saw_nan |= nan[t * padded + m];
      }
      y_argmax[m] = saw_nan ? static_cast<int32_t>(N - 1) : at;
    }
  }
  int64_t padded;
  std::vector<float> value;
  std::vector<int32_t> index, nan;
};

}  // namespace
}  // namespace jaxserve::block_quant
