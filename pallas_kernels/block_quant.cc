// Projections over block-quantized weights (GGUF's Q4_0 / Q4_1 / Q8_0 families) for x86-64 AVX2, as XLA FFI
// custom calls. pallas_kernels/block_quant.py holds the formats, the pure-JAX reference and the Python side.
//
// Weights stay in their 32-value blocks, a row of blocks per output: a 4-bit block is 16 bytes of nibbles
// (byte j holds value j in its low nibble and value j + 16 in its high one, GGUF's order) with a float32
// scale and min (w = scale * q + min, q in [0, 15]); an 8-bit block is 32 int8 values with a scale
// (w = scale * q). Rows are interleaved in tiles of two (see kTile). A decode step streams 0.75 (4-bit) or
// 1.125 (8-bit) bytes per weight instead of bfloat16's 2. A bfloat16 model's weights come in the same tiles as
// blocks of 32 bfloat16 values (no scale), so they take the same loops and the same promise below.
//
// Every step multiplies in float32, y = x . dequantize(w) with no rounding of the activations, by one of two
// loops that give each output the same sums: steps of up to kFusedMaxRows rows unpack each block in registers
// and multiply it at once; longer ones unpack a panel of four outputs to L1 and meet it with every row in a
// register-blocked micro-kernel. Per output both run one chain of FMAs over eight k-lanes, k ascending, and
// the same final reduction, so a row's result never depends on how many rows share its step: a sequence's
// tokens and logprobs are the same alone, batched, or verified several at a time. (The earlier integer dots
// over ~14-bit activations below 12 rows and XLA's dot from 64 rows were each faster somewhere, but the
// sums changed at each crossover and with them greedy outputs under concurrency.) With the bf16 attribute,
// on CPUs with AVX512-BF16, block_quant_avx512.cc's bfloat16 loops take every step instead, on the same plan;
// on CPUs with AMX, block_quant_amx.cc's tiles do, for bfloat16 blocks too.
//
// Weights may be stacked over layers ([L, N, ...]) and picked by a layer-index operand, so a scanned step
// reads them in place instead of slicing a copy per layer. A row-count operand says how many leading rows of
// x are real tokens: the rest (a step's padding up to its bucket) are not computed and come out zero.
//
//   jaxserve_q4_matmul(x, q, scale, min, layer, rows): y[M, N] = x[M, K] . dequant(q[(L,) N/2, K], scale, min)^T
//   jaxserve_q8_matmul(x, q, scale, layer, rows):      y[M, N] = x[M, K] . dequant(q[(L,) N/2, 2K], scale)^T
//   jaxserve_bf16_block_matmul(x, q, layer, rows):     y[M, N] = x[M, K] . float32(q[(L,) N/2, 2K] as bfloat16)^T
//     (with the bf16 attribute on AMX CPUs: bf16(x) . q^T in tiles, float32 sums)
// with scale and min [(L,) N/2, K/16].

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "block_quant.h"
#include "cpu_math.h"
#include "cpu_parallel.h"

namespace {

using jaxserve::parallel_blocks;
using jaxserve::block_quant::AlignedBuffer;
using jaxserve::block_quant::kBlock;
using jaxserve::block_quant::kTile;
using jaxserve::block_quant::store_pair_sums;
using jaxserve::block_quant::Weights;

// The block formats: 4-bit values with a scale and min, 8-bit with a scale, bfloat16 values as they are.
enum class Format { kQ4, kQ8, kBF16 };

// The q array's elements per block (uint8 nibble pairs, int8 values, bfloat16 bits as uint16), their size,
// and a block's bytes.
template <Format F>
constexpr int64_t kBlockValues = F == Format::kQ4 ? kBlock / 2 : kBlock;
template <Format F>
constexpr int64_t kValueBytes = F == Format::kBF16 ? 2 : 1;
template <Format F>
constexpr int64_t kBlockBytes = kBlockValues<F> * kValueBytes<F>;

template <Format F>
inline Weights tile_of(const Weights& w, int64_t tile) {
  return jaxserve::block_quant::tile_at<kBlockBytes<F>>(w, tile);
}

constexpr int64_t kPrefetchBytes = 2048;  // ahead of the tile stream: 1 KiB left the cores waiting on memory

// Values 16h + 8e .. 16h + 8e + 7 of the block at q, dequantized: scale * q + min in one FMA (rounded once;
// block_quant.dequantize rounds the product and the sum apart, which can differ in the last bit). A 4-bit
// block's bytes 8e.. hold them in their low nibbles (h = 0) or high ones (h = 1); an 8-bit block's bytes
// 16h + 8e..; a bfloat16 block's values widen exactly (scale and min unused). Both loops unpack through
// this, so they multiply by the same weights.
template <Format F>
inline __m256 unpack8(const uint8_t* q, int h, int e, __m256 scale, __m256 min) {
  if constexpr (F == Format::kBF16) {
    const __m128i eight = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 2 * (16 * h + 8 * e)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(eight), 16));
  }
  const __m128i eight =
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + (F == Format::kQ4 ? 8 * e : 16 * h + 8 * e)));
  __m256i wide;
  if (F == Format::kQ4) {
    wide = _mm256_cvtepu8_epi32(eight);
    wide = h ? _mm256_srli_epi32(wide, 4) : _mm256_and_si256(wide, _mm256_set1_epi32(0x0f));
  } else {
    wide = _mm256_cvtepi8_epi32(eight);
  }
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), scale, min);
}

// A block's scale and min, broadcast (zeros where the format has none).
template <Format F>
inline void block_scale_min(const Weights& t, int64_t i, __m256& scale, __m256& min) {
  scale = _mm256_set1_ps(F == Format::kBF16 ? 0.0f : t.scale[i]);
  min = _mm256_set1_ps(F == Format::kQ4 ? t.min[i] : 0.0f);
}

// ---- Steps of up to kFusedMaxRows rows: each block multiplied as it is unpacked ---------------------------
//
// The panel's store and reload cost more than they save when few rows meet it. Measured against the panels
// (all of one step's projections and the 8-bit head, medians alternated in one process, Zen 3, both still
// unpacking with a multiply and an add): at one row 11.7 against 20.6 ms, at four 15.6 against 25.5, at eight
// 30.0 against 33.7, at ten 43.0 against 40.8.
constexpr int64_t kFusedMaxRows = 8;
constexpr int kFusedRows = 4;  // rows per pass: 4 x 2 accumulators beside the unpacked vector

// At one row a step is bound by the instructions per weight (unpacking with a separate multiply and add took
// ~18% more time than unpack8's one FMA). Each output's sum is a chain of FMAs four cycles apart: a pass over
// one row takes NT tiles at once to have more chains in flight.
template <Format F, int MR, int NT>
void fused_tiles(const float* x, int64_t K, const Weights& w, int64_t first_tile, int64_t end_tile, float* y,
                 int64_t N) {
  constexpr int64_t kBytes = kBlockBytes<F>;
  constexpr int kOutputs = NT * kTile;
  for (int64_t tile = first_tile; tile < end_tile; tile += NT) {
    Weights t[NT];
    for (int i = 0; i < NT; ++i) t[i] = tile_of<F>(w, tile + i);
    __m256 acc[MR][kOutputs];
    for (int m = 0; m < MR; ++m)
      for (int o = 0; o < kOutputs; ++o) acc[m][o] = _mm256_setzero_ps();
    for (int64_t b = 0; b < w.nb; ++b) {
      for (int i = 0; i < NT; ++i)  // every cache line of the block's tile (a bfloat16 one spans two)
        for (int64_t line = 0; line < kTile * kBytes; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(t[i].q + b * kTile * kBytes) + line + kPrefetchBytes, _MM_HINT_T0);
      // one output row at a time (its scale, min and four vectors of values), so the accumulators stay in
      // registers (all rows' values at once spilled them)
      for (int o = 0; o < kOutputs; ++o) {
        const Weights& to = t[o / kTile];
        const int64_t i = b * kTile + o % kTile;
        const uint8_t* q = to.q + i * kBytes;
        __m256 scale, min;
        block_scale_min<F>(to, i, scale, min);
        for (int h = 0; h < 2; ++h)
          for (int e = 0; e < 2; ++e) {
            const __m256 values = unpack8<F>(q, h, e, scale, min);
            const int64_t k = b * kBlock + 16 * h + 8 * e;
            for (int m = 0; m < MR; ++m)
              acc[m][o] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), values, acc[m][o]);
          }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int i = 0; i < NT; ++i)
        store_pair_sums(acc[m][i * kTile], acc[m][i * kTile + 1], y + m * N + (tile + i) * kTile);
  }
}

template <Format F, int MR, int NT>
void fused_pass(ffi::ThreadPool& pool, const float* x, const Weights& w, float* y, int64_t K, int64_t N) {
  const int64_t tiles = N / kTile, groups = (tiles + NT - 1) / NT;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(groups / 4, pool.num_threads() * 4));
  const int64_t per_task = (groups + tasks - 1) / tasks;
  parallel_blocks(pool, (groups + per_task - 1) / per_task, [&](int64_t task) {
    const int64_t lo = task * per_task * NT, hi = std::min(tiles, (task + 1) * per_task * NT);
    const int64_t whole = lo + (hi - lo) / NT * NT;
    fused_tiles<F, MR, NT>(x, K, w, lo, whole, y, N);
    if (whole < hi) fused_tiles<F, MR, 1>(x, K, w, whole, hi, y, N);
  });
}

// Passes of up to kFusedRows rows; each pass streams the weights again (a step this short is far from the
// memory bandwidth).
template <Format F>
void fused_matmul(ffi::ThreadPool& pool, const float* x, const Weights& w, float* y, int64_t M, int64_t K,
                  int64_t N) {
  static_assert(kFusedRows == 4, "one case per row count below");
  for (int64_t m0 = 0; m0 < M; m0 += kFusedRows) {
    const float* xm = x + m0 * K;
    float* ym = y + m0 * N;
    switch (std::min<int64_t>(kFusedRows, M - m0)) {
      case 1: fused_pass<F, 1, 2>(pool, xm, w, ym, K, N); break;
      case 2: fused_pass<F, 2, 2>(pool, xm, w, ym, K, N); break;
      case 3: fused_pass<F, 3, 1>(pool, xm, w, ym, K, N); break;
      case 4: fused_pass<F, 4, 1>(pool, xm, w, ym, K, N); break;
    }
  }
}

// ---- Longer steps: float32 over unpacked panels ------------------------------------------------------------
//
// A panel of NP outputs is unpacked to float32 once (it stays in L1) and every row meets it in a
// register-blocked micro-kernel: MR rows x NP outputs accumulators of eight k-lanes, reduced once at the end.
// (Against XLA's dot over whole unpacked layers at 512 rows: 9-27% less time for gate_up, qkv and o, 5% more
// for down; at 32-64 rows 1.4-2.6x faster.)
constexpr int kPanelRows = 3;  // rows per micro-kernel: 3 x 4 accumulators, 3 activation registers, one weight

// Dequantizes one tile to float32 rows [kTile, K].
template <Format F>
void unpack_tile(const Weights& w, int64_t tile, int64_t K, float* rows) {
  const Weights t = tile_of<F>(w, tile);
  for (int64_t b = 0; b < w.nb; ++b)
    for (int r = 0; r < kTile; ++r) {
      const int64_t i = b * kTile + r;
      __m256 scale, min;
      block_scale_min<F>(t, i, scale, min);
      float* row = rows + r * K + b * kBlock;
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e)
          _mm256_storeu_ps(row + 16 * h + 8 * e, unpack8<F>(t.q + i * kBlockBytes<F>, h, e, scale, min));
    }
}

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
    } else {  // a pair of outputs: the same additions
      store_pair_sums(acc[i][0], acc[i][1], out);
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

template <Format F>
void panel_matmul(ffi::ThreadPool& pool, const float* xf, const Weights& w, float* y, int64_t M, int64_t K,
                  int64_t N) {
  AlignedBuffer<float> x(M * K);  // K is a multiple of 32, so every row starts aligned too
  std::memcpy(x.data, xf, M * K * sizeof(float));
  jaxserve::block_quant::walk_panels<float>(
      pool, N / kTile, K, [&](int64_t tile, float* rows) { unpack_tile<F>(w, tile, K, rows); },
      [&](const float* panel, int64_t outputs, int64_t n0) {
        if (outputs == 4)
          panel_all_rows<4>(x.data, M, K, panel, y, N, n0);
        else
          panel_all_rows<2>(x.data, M, K, panel, y, N, n0);
      });
}

// Checks the weights' shapes against K and points `w` at layer `layer` of them (`scale` null for bfloat16
// blocks, `min` for all but 4-bit ones); N comes back in `n`.
template <Format F>
ffi::Error layer_weights(const ffi::AnyBuffer& q, const ffi::Buffer<ffi::F32>* scale, const float* min,
                         const ffi::Buffer<ffi::S32>& layer, int64_t K, Weights& w, int64_t& n) {
  auto qd = q.dimensions();
  const int64_t rank = qd.size(), nb = K / kBlock;
  bool ok = (rank == 2 || rank == 3) && K % kBlock == 0 && nb >= 1 && layer.element_count() == 1 &&
            qd[rank - 1] == nb * kTile * kBlockValues<F> &&
            static_cast<int64_t>(q.size_bytes()) == q.element_count() * kValueBytes<F>;
  if (ok && scale) {
    auto sd = scale->dimensions();
    ok = static_cast<int64_t>(sd.size()) == rank && sd[rank - 2] == qd[rank - 2] && sd[rank - 1] == nb * kTile &&
         (rank == 2 || sd[0] == qd[0]);
  }
  if (!ok)
    return ffi::Error::InvalidArgument(
        "block quant: expected q[(L,) N/2, values] (and scale[(L,) N/2, K/16]) for K");
  const int64_t L = rank == 3 ? qd[0] : 1, tiles = qd[rank - 2];
  const int32_t l = *layer.typed_data();
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("block quant: layer index out of range");
  const int64_t layer_bytes = tiles * qd[rank - 1] * kValueBytes<F>, layer_scales = tiles * nb * kTile;
  w = Weights{static_cast<const uint8_t*>(q.untyped_data()) + l * layer_bytes,
              scale ? scale->typed_data() + l * layer_scales : nullptr, min ? min + l * layer_scales : nullptr, nb};
  n = tiles * kTile;
  return ffi::Error::Success();
}

// With `gated`, y[M, N / 2] = silu(x . w[:N/2]^T) * (x . w[N/2:]^T) (a fused gate/up projection straight into
// the MLP's activation): in the AMX panels' store where they run (no [M, N] round trip through memory), else
// the whole product first, then silu_times_row over it; either way each output's sums are the ungated ones.
// On the AMX path only, `paired_out` (with gated) writes those activations as the next projection's B tiles
// (y uint32 [ceil(M / 16), N / 64, 16, 16]) and `paired_in` takes x as such tiles ([ceil(M / 16), K / 32, 16,
// 16]; M is y's rows): the MLP's activation goes from gate/up to down in bfloat16 pairs, as down would have
// rounded it, without the float32 round trip (amx_matmul). `argmax` (ungated, AMX path): y int32 [M], each row's
// first largest output (the greedy token of an LM head), the outputs themselves never written.
template <Format F>
ffi::Error BlockMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, const ffi::Buffer<ffi::F32>* scale,
                       const float* min, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows, bool bf16,
                       bool gated, bool paired_in, bool paired_out, bool argmax, ffi::Result<ffi::AnyBuffer> y) {
  using jaxserve::block_quant::has_amx, jaxserve::block_quant::has_bf16_dots;
  const bool tiles = bf16 && has_bf16_dots() && has_amx();
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  const auto u32 = ffi::DataType::U32, f32 = ffi::DataType::F32;
  const auto y_type = paired_out ? u32 : argmax ? ffi::DataType::S32 : f32;
  if (rows.element_count() != 1 || x.element_type() != (paired_in ? u32 : f32) || y->element_type() != y_type ||
      xd.size() != (paired_in ? 4 : 2) || yd.size() != (paired_out ? 4 : argmax ? 1 : 2))
    return ffi::Error::InvalidArgument("block matmul: expected x[M, K] float32 (or its pairs) and y to match");
  if ((paired_in || paired_out || argmax) && !tiles)
    return ffi::Error::InvalidArgument("block matmul: paired activations and argmax need the AMX path");
  if (paired_out && !gated) return ffi::Error::InvalidArgument("block matmul: paired_out is for gated calls");
  if (argmax && (gated || paired_out)) return ffi::Error::InvalidArgument("block matmul: argmax is for plain calls");
  const int64_t M = paired_in ? yd[0] : xd[0], K = paired_in ? xd[1] * kBlock : xd[1];
  const int64_t groups = (M + 15) / 16;
  if (paired_in && (xd[0] != groups || xd[2] != 16 || xd[3] != 16))
    return ffi::Error::InvalidArgument("block matmul: paired x is not [ceil(M / 16), K / 32, 16, 16]");
  Weights w;
  int64_t N = 0;
  if (auto err = layer_weights<F>(q, scale, min, layer, K, w, N); err.failure()) return err;
  const int64_t width = gated ? N / 2 : N;
  if (gated && N % 2) return ffi::Error::InvalidArgument("block matmul: gated needs N even");
  if (paired_out ? (yd[0] != groups || yd[1] * kBlock != width || yd[2] != 16 || yd[3] != 16 || width % 32)
                 : (yd[0] != M || (!argmax && yd[1] != width)))
    return ffi::Error::InvalidArgument("block matmul: y's shape is not [M, N] ([M, N / 2] gated, or its pairs)");
  const int64_t live = std::clamp<int64_t>(*rows.typed_data(), 0, M);
  float* y_rows = paired_out || argmax ? nullptr : static_cast<float*>(y->untyped_data());
  int32_t* y_argmax = argmax ? static_cast<int32_t*>(y->untyped_data()) : nullptr;
  uint32_t* y_pairs = paired_out ? static_cast<uint32_t*>(y->untyped_data()) : nullptr;
  const float* x_rows = paired_in ? nullptr : static_cast<const float*>(x.untyped_data());
  const uint32_t* x_pairs = paired_in ? static_cast<const uint32_t*>(x.untyped_data()) : nullptr;
  if (paired_out) {  // the groups no live row reaches
    const int64_t written = (live + 15) / 16 * (width / kBlock) * 256;
    std::memset(y_pairs + written, 0, (groups * (width / kBlock) * 256 - written) * sizeof(uint32_t));
  } else if (argmax) {
    std::fill(y_argmax + live, y_argmax + M, 0);
  } else {
    std::memset(y_rows + live * width, 0, (M - live) * width * sizeof(float));
  }
  if (live == 0) return ffi::Error::Success();
  constexpr int kRowBytes = F == Format::kQ4 ? kBlock / 2 : F == Format::kQ8 ? kBlock : 2 * kBlock;
  if ((gated || paired_in || argmax) && tiles && width % 16 == 0) {
    jaxserve::block_quant::amx_matmul(pool, x_rows, w, y_rows, live, K, N, kRowBytes, gated, x_pairs, y_pairs,
                                      y_argmax);
    return ffi::Error::Success();
  }
  if (argmax) return ffi::Error::InvalidArgument("block matmul: argmax needs N a multiple of 16");
  if (paired_in) return ffi::Error::InvalidArgument("block matmul: paired x needs y's width a multiple of 16");
  // Gated on the other paths: the whole product in this thread's scratch (per-call buffers paid fresh pages)
  float* out = gated ? jaxserve::thread_scratch<float, 3>(live * N) : y_rows;
  if (F != Format::kBF16 && bf16 && has_bf16_dots())
    jaxserve::block_quant::bf16_matmul(pool, x_rows, w, out, live, K, N, F == Format::kQ4);
  else if (F == Format::kBF16 && tiles)
    jaxserve::block_quant::amx_matmul(pool, x_rows, w, out, live, K, N, kRowBytes);
  else if (live > kFusedMaxRows)
    panel_matmul<F>(pool, x_rows, w, out, live, K, N);
  else
    fused_matmul<F>(pool, x_rows, w, out, live, K, N);
  if (gated) {
    const int64_t rows_per_block = std::max<int64_t>(1, 16384 / width);  // ~10 us a block
    parallel_blocks(pool, (live + rows_per_block - 1) / rows_per_block, [&](int64_t b) {
      for (int64_t m = b * rows_per_block; m < std::min(live, (b + 1) * rows_per_block); ++m)
        jaxserve::silu_times_row(out + m * N, out + m * N + width, y_rows + m * width, width);
    });
  }
  return ffi::Error::Success();
}

ffi::Error Q4Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> min, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows, bool bf16,
                    bool gated, bool paired_in, bool paired_out, bool argmax, ffi::Result<ffi::AnyBuffer> y) {
  if (min.element_count() != scale.element_count())
    return ffi::Error::InvalidArgument("q4 matmul: min and scale differ in shape");
  return BlockMatmul<Format::kQ4>(pool, x, q, &scale, min.typed_data(), layer, rows, bf16, gated, paired_in,
                                  paired_out, argmax, y);
}

ffi::Error Q8Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows, bool bf16, bool gated, bool paired_in,
                    bool paired_out, bool argmax, ffi::Result<ffi::AnyBuffer> y) {
  return BlockMatmul<Format::kQ8>(pool, x, q, &scale, nullptr, layer, rows, bf16, gated, paired_in, paired_out,
                                  argmax, y);
}

ffi::Error BF16BlockMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::Buffer<ffi::S32> layer,
                           ffi::Buffer<ffi::S32> rows, bool bf16, bool gated, bool paired_in, bool paired_out,
                           bool argmax, ffi::Result<ffi::AnyBuffer> y) {
  return BlockMatmul<Format::kBF16>(pool, x, q, nullptr, nullptr, layer, rows, bf16, gated, paired_in, paired_out,
                                    argmax, y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_q4_matmul, Q4Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("bf16")
                                  .Attr<bool>("gated")
                                  .Attr<bool>("paired_in")
                                  .Attr<bool>("paired_out")
                                  .Attr<bool>("argmax")
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_q8_matmul, Q8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("bf16")
                                  .Attr<bool>("gated")
                                  .Attr<bool>("paired_in")
                                  .Attr<bool>("paired_out")
                                  .Attr<bool>("argmax")
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_bf16_block_matmul, BF16BlockMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("bf16")
                                  .Attr<bool>("gated")
                                  .Attr<bool>("paired_in")
                                  .Attr<bool>("paired_out")
                                  .Attr<bool>("argmax")
                                  .Ret<ffi::AnyBuffer>());
