// Projections over block-quantized weights (GGUF's Q4_0 / Q4_1 / Q8_0 families) for x86-64 AVX2, as XLA FFI
// custom calls. pallas_kernels/block_quant.py holds the formats, the pure-JAX reference and the Python side.
//
// Weights stay in their 32-value blocks, a row of blocks per output: a 4-bit block is 16 bytes of nibbles
// (byte j holds value j in its low nibble and value j + 16 in its high one, GGUF's order) with a float32
// scale and min (w = scale * q + min, q in [0, 15]); an 8-bit block is 32 int8 values with a scale
// (w = scale * q). Rows are interleaved in tiles of two (see kTile). A decode step streams 0.75 (4-bit) or
// 1.125 (8-bit) bytes per weight instead of bfloat16's 2.
//
// Activations are quantized per row and block of 32 to about 14 bits, so each block's dot product is exact
// integer arithmetic (vpmaddwd on int16), scaled and summed in float32. A coarse value c is x in units of
// d = max|x| / 127 (llama.cpp's Q8_1 stops there; on the default model that moved "Paris" off the top of
// "What is the capital of France?"); a fine one f is what c leaves over in units of d / 128 (|f| <= 64), and
// the kernels multiply 128 c + f, x ~= (d / 128) * (128 c + f). Rounding is half to even throughout. (Two
// int8 planes through vpmaddubsw were the first form: three multiplies per 32 products where int16 takes two.)
//   y[m, n] = sum_b xs[m, b] * scale[n, b] * sum_j (128 c + f)[m, b, j] * q[n, b, j] + min[n, b] * xsum[m, b]
// with xs = d / 128 and xsum[m, b] = xs[m, b] * sum_j (128 c + f)[m, b, j].
//
// Steps of kFloatMinRows rows or more take float32 instead: each panel of four outputs is unpacked once and
// met by every row in a register-blocked FMA micro-kernel (x . dequantize(w), no activation rounding). With
// the bf16 attribute, on CPUs with AVX512-BF16, every step takes block_quant_avx512.cc's bfloat16 panels
// instead, whatever its rows: a row's result then never depends on how many rows share its step (the integer
// dots below ~8 rows were faster there, but a sequence's greedy tokens changed with the batch it ran in).
//
// Weights may be stacked over layers ([L, N, ...]) and picked by a layer-index operand, so a scanned step
// reads them in place instead of slicing a copy per layer. A row-count operand says how many leading rows of
// x are real tokens: the rest (a step's padding up to its bucket) are not computed and come out zero.
//
//   jaxserve_q4_matmul(x, q, scale, min, layer, rows): y[M, N] = x[M, K] . dequant(q[(L,) N/2, K], scale, min)^T
//   jaxserve_q8_matmul(x, q, scale, layer, rows):      y[M, N] = x[M, K] . dequant(q[(L,) N/2, 2K], scale)^T
//   jaxserve_q4_dequantize_{f32,bf16}(q, scale, min, layer), jaxserve_q8_dequantize_{f32,bf16}(q, scale, layer):
//   [N, K] in float32 or bfloat16
// with scale and min [(L,) N/2, K/16].

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "block_quant.h"
#include "cpu_parallel.h"

namespace {

using jaxserve::parallel_blocks;
using jaxserve::block_quant::AlignedBuffer;
using jaxserve::block_quant::kBlock;
using jaxserve::block_quant::kTile;
using jaxserve::block_quant::Weights;

// x's rows quantized per block of 32: the values 128 c + f as int16 [M, K] (|.| < 2^14), the fine unit
// (scale) [M, K / 32], and the blocks' sums block-major [K / 32, M rounded up to 8] (zero past M) for the
// 4-bit mins, which meet eight rows' sums in one vector.
struct QuantizedRows {
  std::vector<int16_t> values;
  std::vector<float> scale, sum_by_block;
  int64_t padded_rows = 0;
};

inline float hsum4(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// One block of 32 floats -> its int16 values 128 c + f, the fine unit and the block's sum; the reference
// (block_quant.quantize_activations) computes the same float32 expressions in the same order.
void quantize_block(const float* x, int16_t* values, float* scale, float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float d = _mm_cvtss_f32(m) / 127.0f;
  const float inverse = d > 0.0f ? 1.0f / d : 0.0f;
  const __m256 dv = _mm256_set1_ps(d), inv = _mm256_set1_ps(inverse), inv_fine = _mm256_set1_ps(inverse * 128.0f);
  const __m256 limit = _mm256_set1_ps(127.0f);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m256i t[4];
  __m256i total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256 rc = _mm256_round_ps(_mm256_mul_ps(v[i], inv), kRound);
    const __m256 rest = _mm256_sub_ps(v[i], _mm256_mul_ps(rc, dv));
    const __m256 rf = _mm256_max_ps(_mm256_min_ps(_mm256_round_ps(_mm256_mul_ps(rest, inv_fine), kRound), limit),
                                    _mm256_sub_ps(_mm256_setzero_ps(), limit));
    t[i] = _mm256_add_epi32(_mm256_slli_epi32(_mm256_cvtps_epi32(rc), 7), _mm256_cvtps_epi32(rf));
    total = _mm256_add_epi32(total, t[i]);
  }
  for (int i = 0; i < 2; ++i)  // packs interleave the lanes; the 64-bit permute restores the order
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + 16 * i),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(t[2 * i], t[2 * i + 1]), 0xd8));
  *scale = d / 128.0f;
  *sum = *scale * static_cast<float>(hsum_epi32(total));
}

void quantize_rows(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, QuantizedRows& out) {
  const int64_t nb = K / kBlock;
  out.values.resize(M * K);
  out.scale.resize(M * nb);
  out.padded_rows = (M + 7) / 8 * 8;
  out.sum_by_block.assign(nb * out.padded_rows, 0.0f);
  auto rows = [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * nb; i < m1 * nb; ++i)
      quantize_block(x + i * kBlock, out.values.data() + i * kBlock, &out.scale[i],
                     &out.sum_by_block[(i % nb) * out.padded_rows + i / nb]);
  };
  const int64_t rows_per_task = 16;
  if (M <= rows_per_task) {
    rows(0, M);
  } else {
    parallel_blocks(pool, (M + rows_per_task - 1) / rows_per_task,
                    [&](int64_t t) { rows(t * rows_per_task, std::min(M, (t + 1) * rows_per_task)); });
  }
}

constexpr int64_t kPrefetchBytes = 2048;  // ahead of the tile stream: 1 KiB left the cores waiting on memory

// A tile's two weight blocks widened to int16 as four vectors, w[i] = (row 0's values 8i..8i+7 | row 1's),
// so that one activation block's eight values broadcast to both lanes meet both rows: after four vpmaddwd
// the int32 lanes 0-3 sum row 0, lanes 4-7 row 1.
struct TileBlock {
  __m256i w[4];
};

inline TileBlock load_tile_block(const uint8_t* q, std::true_type /*four bit*/) {
  // GGUF's nibble order: byte j holds value j (low) and value j + 16 (high); the two rows' 16 bytes adjoin,
  // one per lane, and the in-lane unpacks widen each lane's bytes 0-7 and 8-15.
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i nibble = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  const __m256i low = _mm256_and_si256(v, nibble), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
  return {{_mm256_unpacklo_epi8(low, zero), _mm256_unpackhi_epi8(low, zero), _mm256_unpacklo_epi8(high, zero),
           _mm256_unpackhi_epi8(high, zero)}};
}

inline TileBlock load_tile_block(const uint8_t* q, std::false_type /*eight bit*/) {
  // row 0's 32 bytes, then row 1's; sign-extended by unpacking each byte beside itself and shifting.
  const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
  const __m256i first = _mm256_permute2x128_si256(r0, r1, 0x20), second = _mm256_permute2x128_si256(r0, r1, 0x31);
  return {{_mm256_srai_epi16(_mm256_unpacklo_epi8(first, first), 8),
           _mm256_srai_epi16(_mm256_unpackhi_epi8(first, first), 8),
           _mm256_srai_epi16(_mm256_unpacklo_epi8(second, second), 8),
           _mm256_srai_epi16(_mm256_unpackhi_epi8(second, second), 8)}};
}

// (128 c + f) . w for one row's block against both rows of a tile block: exact in int32 (|w| <= 127, so each
// product pair stays below 2^22). Lanes 0-3: row 0 of the tile, 4-7: row 1.
inline __m256i block_dot(const TileBlock& wb, const int16_t* xb) {
  __m256i sum[4];
  for (int i = 0; i < 4; ++i)
    sum[i] = _mm256_madd_epi16(
        wb.w[i], _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 8 * i))));
  return _mm256_add_epi32(_mm256_add_epi32(sum[0], sum[1]), _mm256_add_epi32(sum[2], sum[3]));
}

// y[m0:m0+MR, the tile's two outputs], walking K in blocks: each tile block is loaded once for MR rows. The
// 4-bit mins (min * xsum) go to their own two accumulators, a lane per row, outside the per-row work. m0 is
// a multiple of 8.
template <int MR, bool kFourBit>
void dot_tile(const QuantizedRows& x, int64_t K, const Weights& w, int64_t m0, int64_t tile, float* y,
              int64_t N) {
  constexpr int64_t kBlockBytes = kFourBit ? kBlock / 2 : kBlock;
  const Weights t = jaxserve::block_quant::tile_of<kFourBit>(w, tile);
  const uint8_t* q = t.q;
  const float* scale = t.scale;
  const float* min = t.min;
  const int16_t* xq = x.values.data() + m0 * K;
  const float* xscale = x.scale.data() + m0 * w.nb;
  const float* xsum = kFourBit ? x.sum_by_block.data() + m0 : nullptr;
  __m256 acc[MR], min_acc[kTile] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.nb; ++b, q += kTile * kBlockBytes, scale += kTile) {
    _mm_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(scale) + kPrefetchBytes / 2, _MM_HINT_T0);
    const TileBlock wb = load_tile_block(q, std::integral_constant<bool, kFourBit>());
    const __m256 ws = _mm256_set_m128(_mm_broadcast_ss(scale + 1), _mm_broadcast_ss(scale));
    for (int m = 0; m < MR; ++m) {
      const __m256i dot = block_dot(wb, xq + m * K + b * kBlock);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(ws, _mm256_broadcast_ss(xscale + m * w.nb + b)),
                               acc[m]);
    }
    if (kFourBit) {
      _mm_prefetch(reinterpret_cast<const char*>(min + b * kTile) + kPrefetchBytes / 2, _MM_HINT_T0);
      const __m256 sums = _mm256_loadu_ps(xsum + b * x.padded_rows);
      for (int n = 0; n < kTile; ++n)
        min_acc[n] = _mm256_fmadd_ps(_mm256_broadcast_ss(min + b * kTile + n), sums, min_acc[n]);
    }
  }
  alignas(32) float mins[kTile][8];
  for (int n = 0; n < kTile; ++n) _mm256_store_ps(mins[n], min_acc[n]);
  for (int m = 0; m < MR; ++m) {
    y[(m0 + m) * N + tile * kTile] = hsum4(_mm256_castps256_ps128(acc[m])) + mins[0][m];
    y[(m0 + m) * N + tile * kTile + 1] = hsum4(_mm256_extractf128_ps(acc[m], 1)) + mins[1][m];
  }
}

// Rows per pass over a task's tiles: their activations (2 KiB per row and 1024 inputs) stay in L1 while the
// tiles stream past; a pass of 64 rows re-read them from L2 for every tile, at half the speed.
constexpr int64_t kRowsPerPass = 8;

template <bool kFourBit>
void dot_rows(const QuantizedRows& x, int64_t K, const Weights& w, int64_t m0, int64_t m1, int64_t tile, float* y,
              int64_t N) {
  constexpr int kRows = 8;
  int64_t m = m0;
  for (; m + kRows <= m1; m += kRows) dot_tile<kRows, kFourBit>(x, K, w, m, tile, y, N);
  switch (m1 - m) {
    case 7: return dot_tile<7, kFourBit>(x, K, w, m, tile, y, N);
    case 6: return dot_tile<6, kFourBit>(x, K, w, m, tile, y, N);
    case 5: return dot_tile<5, kFourBit>(x, K, w, m, tile, y, N);
    case 4: return dot_tile<4, kFourBit>(x, K, w, m, tile, y, N);
    case 3: return dot_tile<3, kFourBit>(x, K, w, m, tile, y, N);
    case 2: return dot_tile<2, kFourBit>(x, K, w, m, tile, y, N);
    case 1: return dot_tile<1, kFourBit>(x, K, w, m, tile, y, N);
  }
}

// Eight float32 values stored as float32, or rounded to bfloat16 (to nearest, ties to even; the weights are
// finite) for XLA's bfloat16 dots.
inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }

inline void store8(uint16_t* out, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1)));
}

// Dequantizes one tile to rows [kTile, K] of float32 or bfloat16 (scale * q + min in float32, rounded twice,
// as block_quant.dequantize).
template <bool kFourBit, typename Out>
void unpack_tile(const Weights& w, int64_t tile, int64_t K, Out* rows) {
  constexpr int64_t kBlockBytes = kFourBit ? kBlock / 2 : kBlock;
  const Weights t = jaxserve::block_quant::tile_of<kFourBit>(w, tile);
  const uint8_t* q = t.q;
  const float* scale = t.scale;
  const float* min = t.min;
  for (int64_t b = 0; b < w.nb; ++b)
    for (int r = 0; r < kTile; ++r, q += kBlockBytes) {
      const int64_t i = b * kTile + r;
      const __m256 s = _mm256_set1_ps(scale[i]), m = _mm256_set1_ps(kFourBit ? min[i] : 0.0f);
      Out* row = rows + r * K + b * kBlock;
      __m128i values[2];  // 32 values as two vectors of 16 bytes
      if (kFourBit) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        values[0] = _mm_and_si128(packed, _mm_set1_epi8(0x0f));
        values[1] = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0f));
      } else {
        values[0] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        values[1] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
      }
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e) {
          const __m128i eight = e ? _mm_srli_si128(values[h], 8) : values[h];
          const __m256i wide = kFourBit ? _mm256_cvtepu8_epi32(eight) : _mm256_cvtepi8_epi32(eight);
          store8(row + 16 * h + 8 * e, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(wide), s), m));
        }
    }
}

// Tiles are split over the thread pool in contiguous ranges; each range is walked once per kRowsPerPass rows
// (its weights, a few hundred KiB, come back from L2).
template <bool kFourBit>
void block_matmul(ffi::ThreadPool& pool, const float* xf, const Weights& w, float* y, int64_t M, int64_t K,
                  int64_t N) {
  QuantizedRows x;
  quantize_rows(pool, xf, M, K, x);
  const int64_t tiles = N / kTile;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(tiles / 4, pool.num_threads() * 4));
  const int64_t per_task = (tiles + tasks - 1) / tasks;
  parallel_blocks(pool, (tiles + per_task - 1) / per_task, [&](int64_t t) {
    const int64_t lo = t * per_task, hi = std::min(tiles, lo + per_task);
    for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass)
      for (int64_t tile = lo; tile < hi; ++tile)
        dot_rows<kFourBit>(x, K, w, m0, std::min(M, m0 + kRowsPerPass), tile, y, N);
  });
}

// ---- Steps of kFloatMinRows rows and more: float32 over unpacked panels ----------------------------------
//
// The integer dots spend ~12 instructions per 64 products on scaling and reducing each block; from about 12
// rows up it pays to unpack a panel of NP outputs to float32 once (it stays in L1) and let every row meet it in
// a register-blocked float32 micro-kernel: MR rows x NP outputs accumulators of eight k-lanes, reduced once at
// the end. Activations stay float32 here, so these rows get x . dequantize(w), the dense path's arithmetic.
constexpr int64_t kFloatMinRows = 12;
constexpr int kPanelRows = 3;  // rows per micro-kernel: 3 x 4 accumulators, 3 activation registers, one weight

template <int MR, int NP>
void panel_rows(const float* x, int64_t K, const float* panel, int64_t m0, float* y, int64_t N, int64_t n0) {
  __m256 acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* xr = x + m0 * K;
  int64_t k = 0;
  do {  // K >= 32: a do loop keeps the accumulators in registers (block_quant_avx512.cc's panel_rows)
    __m256 a[MR];
    for (int i = 0; i < MR; ++i) a[i] = _mm256_loadu_ps(xr + i * K + k);
    for (int j = 0; j < NP; ++j) {
      const __m256 b = _mm256_loadu_ps(panel + j * K + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(a[i], b, acc[i][j]);
    }
    k += 8;
  } while (k < K);
  for (int i = 0; i < MR; ++i) {
    float* out = y + (m0 + i) * N + n0;
    if (NP == 4) {  // four reductions at once: lanes of hadd(hadd(a, b), hadd(c, d)) halves sum to a..d
      const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[i][0], acc[i][1]), _mm256_hadd_ps(acc[i][2], acc[i][3]));
      _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
    } else {
      for (int j = 0; j < NP; ++j)
        out[j] = hsum4(_mm_add_ps(_mm256_castps256_ps128(acc[i][j]), _mm256_extractf128_ps(acc[i][j], 1)));
    }
  }
}

template <int NP>
void panel_all_rows(const float* x, int64_t M, int64_t K, const float* panel, float* y, int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + kPanelRows <= M; m += kPanelRows) panel_rows<kPanelRows, NP>(x, K, panel, m, y, N, n0);
  if (M - m == 2) panel_rows<2, NP>(x, K, panel, m, y, N, n0);
  if (M - m == 1) panel_rows<1, NP>(x, K, panel, m, y, N, n0);
}

template <bool kFourBit>
void float_matmul(ffi::ThreadPool& pool, const float* xf, const Weights& w, float* y, int64_t M, int64_t K,
                  int64_t N) {
  AlignedBuffer<float> x(M * K);  // K is a multiple of 32, so every row starts aligned too
  std::memcpy(x.data, xf, M * K * sizeof(float));
  jaxserve::block_quant::walk_panels<float>(
      pool, N / kTile, K, [&](int64_t tile, float* rows) { unpack_tile<kFourBit>(w, tile, K, rows); },
      [&](const float* panel, int64_t outputs, int64_t n0) {
        if (outputs == 4)
          panel_all_rows<4>(x.data, M, K, panel, y, N, n0);
        else
          panel_all_rows<2>(x.data, M, K, panel, y, N, n0);
      });
}

// Dequantizes every tile to rows [N, K] (float32 or bfloat16): for steps with many tokens, where XLA's GEMM
// outruns the integer dots once the weights are unpacked.
// On CPUs with AVX512-BF16, bfloat16 rows come from block_quant_avx512.cc's 512-bit unpacking.
template <bool kFourBit, typename Out>
void dequantize_tiles(ffi::ThreadPool& pool, const Weights& w, Out* out, int64_t N, int64_t K) {
  const int64_t tiles = N / kTile;
  const int64_t per_task = std::max<int64_t>(1, tiles / (pool.num_threads() * 4));
  const bool wide = std::is_same_v<Out, uint16_t> && jaxserve::block_quant::has_bf16_dots();
  parallel_blocks(pool, (tiles + per_task - 1) / per_task, [&](int64_t t) {
    for (int64_t tile = t * per_task; tile < std::min(tiles, (t + 1) * per_task); ++tile) {
      Out* rows = out + tile * kTile * K;
      if constexpr (std::is_same_v<Out, uint16_t>) {
        if (wide) {
          jaxserve::block_quant::bf16_unpack_tile(w, tile, K, rows, kFourBit);
          continue;
        }
      }
      unpack_tile<kFourBit, Out>(w, tile, K, rows);
    }
  });
}

// Checks the weights' shapes against K and points `w` at layer `layer` of them; N comes back in `n`.
template <bool kFourBit>
ffi::Error layer_weights(const ffi::AnyBuffer& q, const ffi::Buffer<ffi::F32>& scale, const float* min,
                         const ffi::Buffer<ffi::S32>& layer, int64_t K, Weights& w, int64_t& n) {
  auto qd = q.dimensions(), sd = scale.dimensions();
  const int64_t rank = qd.size(), nb = K / kBlock;
  if ((rank != 2 && rank != 3) || static_cast<int64_t>(sd.size()) != rank || K % kBlock ||
      qd[rank - 1] != nb * kTile * (kFourBit ? kBlock / 2 : kBlock) || sd[rank - 2] != qd[rank - 2] ||
      sd[rank - 1] != nb * kTile || (rank == 3 && sd[0] != qd[0]) || layer.element_count() != 1 || nb < 1)
    return ffi::Error::InvalidArgument("block quant: expected q[(L,) N/2, bytes] and scale[(L,) N/2, K/16] for K");
  const int64_t L = rank == 3 ? qd[0] : 1, tiles = qd[rank - 2];
  const int32_t l = *layer.typed_data();
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("block quant: layer index out of range");
  const int64_t layer_bytes = tiles * qd[rank - 1], layer_scales = tiles * sd[rank - 1];
  w = Weights{static_cast<const uint8_t*>(q.untyped_data()) + l * layer_bytes, scale.typed_data() + l * layer_scales,
              min ? min + l * layer_scales : nullptr, nb};
  n = tiles * kTile;
  return ffi::Error::Success();
}

template <bool kFourBit>
ffi::Error BlockMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                       const float* min, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows, bool bf16,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || rows.element_count() != 1) return ffi::Error::InvalidArgument("block matmul: expected x[M, K]");
  const int64_t M = xd[0], K = xd[1];
  Weights w;
  int64_t N;
  if (auto err = layer_weights<kFourBit>(q, scale, min, layer, K, w, N); err.failure()) return err;
  if (y->dimensions()[1] != N) return ffi::Error::InvalidArgument("block matmul: y's width is not N");
  const int64_t live = std::clamp<int64_t>(*rows.typed_data(), 0, M);
  std::memset(y->typed_data() + live * N, 0, (M - live) * N * sizeof(float));
  if (live > 0 && bf16 && jaxserve::block_quant::has_bf16_dots())
    jaxserve::block_quant::bf16_matmul(pool, x.typed_data(), w, y->typed_data(), live, K, N, kFourBit);
  else if (live >= kFloatMinRows)
    float_matmul<kFourBit>(pool, x.typed_data(), w, y->typed_data(), live, K, N);
  else if (live > 0)
    block_matmul<kFourBit>(pool, x.typed_data(), w, y->typed_data(), live, K, N);
  return ffi::Error::Success();
}

ffi::Error Q4Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> min, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows, bool bf16,
                    ffi::ResultBuffer<ffi::F32> y) {
  if (min.element_count() != scale.element_count())
    return ffi::Error::InvalidArgument("q4 matmul: min and scale differ in shape");
  return BlockMatmul<true>(pool, x, q, scale, min.typed_data(), layer, rows, bf16, y);
}

ffi::Error Q8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows, bool bf16,
                    ffi::ResultBuffer<ffi::F32> y) {
  return BlockMatmul<false>(pool, x, q, scale, nullptr, layer, rows, bf16, y);
}

template <bool kFourBit, ffi::DataType T>
ffi::Error BlockDequantize(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale, const float* min,
                           ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<T> out) {
  auto od = out->dimensions();
  if (od.size() != 2) return ffi::Error::InvalidArgument("block dequantize: expected out[N, K]");
  Weights w;
  int64_t N;
  if (auto err = layer_weights<kFourBit>(q, scale, min, layer, od[1], w, N); err.failure()) return err;
  if (od[0] != N) return ffi::Error::InvalidArgument("block dequantize: out's height is not N");
  dequantize_tiles<kFourBit>(pool, w, out->typed_data(), N, od[1]);
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error Q4Dequantize(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> min,
                        ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<T> out) {
  if (min.element_count() != scale.element_count())
    return ffi::Error::InvalidArgument("q4 dequantize: min and scale differ in shape");
  return BlockDequantize<true, T>(pool, q, scale, min.typed_data(), layer, out);
}

template <ffi::DataType T>
ffi::Error Q8Dequantize(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<T> out) {
  return BlockDequantize<false, T>(pool, q, scale, nullptr, layer, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_q4_matmul, Q4Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("bf16")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_q8_matmul, Q8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("bf16")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Dequantization to float32 (_f32) or bfloat16 (_bf16) rows.
#define JAXSERVE_DEQUANTIZE_HANDLERS(SUFFIX, T)                                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_q4_dequantize##SUFFIX, Q4Dequantize<T>,                            \
                                ffi::Ffi::Bind()                                                            \
                                    .Ctx<ffi::ThreadPool>()                                                 \
                                    .Arg<ffi::AnyBuffer>()                                                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                           \
                                    .Arg<ffi::Buffer<ffi::S32>>()                                           \
                                    .Ret<ffi::Buffer<T>>());                                                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_q8_dequantize##SUFFIX, Q8Dequantize<T>,                            \
                                ffi::Ffi::Bind()                                                            \
                                    .Ctx<ffi::ThreadPool>()                                                 \
                                    .Arg<ffi::AnyBuffer>()                                                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                           \
                                    .Arg<ffi::Buffer<ffi::S32>>()                                           \
                                    .Ret<ffi::Buffer<T>>());

JAXSERVE_DEQUANTIZE_HANDLERS(_f32, ffi::F32)
JAXSERVE_DEQUANTIZE_HANDLERS(_bf16, ffi::BF16)
