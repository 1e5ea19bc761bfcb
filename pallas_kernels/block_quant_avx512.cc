// The block kernels in bfloat16 for CPUs with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids and later),
// taken with the bf16 attribute at every row count: vdpbf16ps multiplies 32 bfloat16 pairs into 16 float32
// sums per instruction, twice the float32 FMA rate. As block_quant.cc's float32 path, each panel of four
// outputs is unpacked once (here to bfloat16, in L1) and met by every row in a register-blocked micro-kernel;
// steps of up to 8 rows skip the panel and multiply each unpacked block in registers, with the same sums. The
// activations are rounded to bfloat16 once per call. Both roundings are to nearest even, as XLA's convert;
// the sums stay float32. On CPUs that also have AMX (has_amx()), every one of these steps goes to
// block_quant_amx.cc's tiles instead, at every row count.
// Only these functions use AVX-512 (by target attribute): the library still loads on AVX2-only CPUs, where
// has_bf16_dots() is false and nothing here runs.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "block_quant.h"
#include "block_quant_bf16.h"
#include "cpu_parallel.h"

namespace jaxserve::block_quant {
namespace {

constexpr int kPanelRows = 6;  // rows per micro-kernel: 6 x 4 accumulators, 6 activation registers, one weight

// One tile dequantized to bfloat16 rows [kTile, K].
template <bool kFourBit>
JAXSERVE_AVX512_BF16 void unpack_tile(const Weights& w, int64_t tile, int64_t K, uint16_t* rows) {
  const Weights t = tile_of<kFourBit>(w, tile);
  for (int64_t b = 0; b < w.nb; ++b) {
    prefetch_block<kRowBytesOf<kFourBit>>(t, b);
    __m512i w0, w1;
    unpack_block<kFourBit>(t, b, w0, w1);
    _mm512_storeu_si512(rows + b * kBlock, w0);
    _mm512_storeu_si512(rows + K + b * kBlock, w1);
  }
}

// An accumulator's two halves added: eight lanes left to reduce.
JAXSERVE_AVX512_BF16 inline __m256 half_sum(__m512 acc) {
  return _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
}

// y[m0:m0+MR, n0:n0+NP] from MR activation rows against NP panel rows: 16 float32 lanes of pair sums per
// output, reduced once at the end.
template <int MR, int NP>
JAXSERVE_AVX512_BF16 void panel_rows(const uint16_t* x, int64_t K, const uint16_t* panel, int64_t m0, float* y,
                                     int64_t N, int64_t n0) {
  __m512 acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
  const uint16_t* xr = x + m0 * K;
  int64_t k = 0;
  // K >= 32: with no path around the loop GCC keeps the accumulators in registers throughout (a for loop had
  // it zero a stack copy of all 24 before the loop and spill them after: ~15% of a prefill's panel time)
  do {
    __m512bh a[MR];
    for (int i = 0; i < MR; ++i) a[i] = reinterpret_cast<__m512bh>(_mm512_load_si512(xr + i * K + k));
    for (int j = 0; j < NP; ++j) {
      const __m512bh b = reinterpret_cast<__m512bh>(_mm512_load_si512(panel + j * K + k));
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a[i], b);
    }
    k += 32;
  } while (k < K);
  for (int i = 0; i < MR; ++i) {
    __m256 half[NP];
    for (int j = 0; j < NP; ++j) half[j] = half_sum(acc[i][j]);
    float* out = y + (m0 + i) * N + n0;
    // four reductions at once: lanes of hadd(hadd(a, b), hadd(c, d)) halves sum to a..d (a pair of outputs:
    // store_pair_sums, the same additions)
    if constexpr (NP == 4) {
      const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(half[0], half[1]), _mm256_hadd_ps(half[2], half[3]));
      _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
    } else {
      store_pair_sums(half[0], half[1], out);
    }
  }
}

template <int NP>
JAXSERVE_AVX512_BF16 void panel_all_rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* panel, float* y,
                                         int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + kPanelRows <= M; m += kPanelRows) panel_rows<kPanelRows, NP>(x, K, panel, m, y, N, n0);
  switch (M - m) {
    case 5: return panel_rows<5, NP>(x, K, panel, m, y, N, n0);
    case 4: return panel_rows<4, NP>(x, K, panel, m, y, N, n0);
    case 3: return panel_rows<3, NP>(x, K, panel, m, y, N, n0);
    case 2: return panel_rows<2, NP>(x, K, panel, m, y, N, n0);
    case 1: return panel_rows<1, NP>(x, K, panel, m, y, N, n0);
  }
}

// Steps of at most kFusedMaxRows rows multiply each block as it is unpacked, in registers, skipping the panel's
// store and reload (at one row, unpacking is half of a decode step's time). Per output they run the panels'
// vdpbf16ps chain and final reduction, so a row's sums are the same whichever path a step takes. Up to 8 rows
// (16 accumulators beside the two unpacked vectors) they beat the panels: at 8 rows gate_up 128-149 against
// 176-218 µs, the 8-bit head 2.6-3.0 against 3.3-4.2 ms.
constexpr int64_t kFusedMaxRows = 8;

template <bool kFourBit, int MR>
JAXSERVE_AVX512_BF16 void fused_tiles(const uint16_t* x, int64_t K, const Weights& w, int64_t first_tile,
                                      int64_t end_tile, float* y, int64_t N) {
  for (int64_t tile = first_tile; tile < end_tile; ++tile) {
    const Weights tw = tile_of<kFourBit>(w, tile);
    __m512 acc[MR][kTile];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < kTile; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < w.nb; ++b) {
      prefetch_block<kRowBytesOf<kFourBit>>(tw, b);
      __m512i w0, w1;
      unpack_block<kFourBit>(tw, b, w0, w1);
      for (int m = 0; m < MR; ++m) {
        const __m512bh a = reinterpret_cast<__m512bh>(_mm512_load_si512(x + m * K + b * kBlock));
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, reinterpret_cast<__m512bh>(w0));
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, reinterpret_cast<__m512bh>(w1));
      }
    }
    for (int m = 0; m < MR; ++m)
      store_pair_sums(half_sum(acc[m][0]), half_sum(acc[m][1]), y + m * N + tile * kTile);
  }
}

template <bool kFourBit, int MR>
void fused_matmul(ffi::ThreadPool& pool, const uint16_t* x, const Weights& w, float* y, int64_t K, int64_t N) {
  const int64_t tiles = N / kTile;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(tiles / 8, pool.num_threads() * 4));
  const int64_t per_task = (tiles + tasks - 1) / tasks;
  parallel_blocks(pool, (tiles + per_task - 1) / per_task, [&](int64_t t) {
    fused_tiles<kFourBit, MR>(x, K, w, t * per_task, std::min(tiles, (t + 1) * per_task), y, N);
  });
}

// From this many rows the activations are rounded on every thread: a prompt step's 512 rows of down's input
// are 3 MB of float32 (alternated in one process: a 128-token prompt 100.9 -> 98.5 and 101.5 -> 100.1 ms,
// medians of 12, the same logprobs).
constexpr int64_t kParallelRoundingRows = 64;

template <bool kFourBit>
void matmul(ffi::ThreadPool& pool, const float* xf, const Weights& w, float* y, int64_t M, int64_t K, int64_t N) {
  if (has_amx()) return amx_matmul(pool, xf, w, y, M, K, N, kRowBytesOf<kFourBit>);
  AlignedBuffer<uint16_t> x(M * K);  // K is a multiple of 32: every row starts 64-byte aligned
  if (M >= kParallelRoundingRows) {
    constexpr int64_t kBlocks = 8;
    const int64_t per_block = (M + kBlocks - 1) / kBlocks;
    parallel_blocks(pool, kBlocks, [&](int64_t b) {
      const int64_t m0 = b * per_block, m1 = std::min(M, m0 + per_block);
      if (m0 < m1) round_rows(xf + m0 * K, (m1 - m0) * K, x.data + m0 * K);
    });
  } else {
    round_rows(xf, M * K, x.data);
  }
  static_assert(kFusedMaxRows == 8, "one case per row count below");
  switch (M) {
    case 1: return fused_matmul<kFourBit, 1>(pool, x.data, w, y, K, N);
    case 2: return fused_matmul<kFourBit, 2>(pool, x.data, w, y, K, N);
    case 3: return fused_matmul<kFourBit, 3>(pool, x.data, w, y, K, N);
    case 4: return fused_matmul<kFourBit, 4>(pool, x.data, w, y, K, N);
    case 5: return fused_matmul<kFourBit, 5>(pool, x.data, w, y, K, N);
    case 6: return fused_matmul<kFourBit, 6>(pool, x.data, w, y, K, N);
    case 7: return fused_matmul<kFourBit, 7>(pool, x.data, w, y, K, N);
    case 8: return fused_matmul<kFourBit, 8>(pool, x.data, w, y, K, N);
  }
  walk_panels<uint16_t>(
      pool, N / kTile, K, [&](int64_t tile, uint16_t* rows) { unpack_tile<kFourBit>(w, tile, K, rows); },
      [&](const uint16_t* panel, int64_t outputs, int64_t n0) {
        if (outputs == 4)
          panel_all_rows<4>(x.data, M, K, panel, y, N, n0);
        else
          panel_all_rows<2>(x.data, M, K, panel, y, N, n0);
      });
}

}  // namespace

bool has_bf16_dots() {
  // JAXSERVE_CPU_AVX512=0 keeps the AVX2 paths on any CPU (to compare them, or to test them on this one).
  static const bool yes = [] {
    const char* setting = std::getenv("JAXSERVE_CPU_AVX512");
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           !(setting && std::string(setting) == "0");
  }();
  return yes;
}

void bf16_matmul(ffi::ThreadPool& pool, const float* x, const Weights& w, float* y, int64_t M, int64_t K, int64_t N,
                 bool four_bit) {
  if (four_bit)
    matmul<true>(pool, x, w, y, M, K, N);
  else
    matmul<false>(pool, x, w, y, M, K, N);
}

}  // namespace jaxserve::block_quant

// For the Python side (cpu_kernels.has_fast_bf16_dots), so that it and the kernels agree.
extern "C" int jaxserve_has_bf16_dots() { return jaxserve::block_quant::has_bf16_dots() ? 1 : 0; }
