// Projections in AMX int8 tiles (tdpbssd): int8 weights with one scale per output row against activations
// quantized to int8 with one scale per token. Both sides are first rotated by the same orthonormal transform,
// a 64-point Walsh-Hadamard transform of each 64-value block of K (the weights once at load,
// int8_rows.pack; the activations here), so x . w is unchanged while the outliers that a per-token
// scale cannot hold are spread over their block (perplexity of the default model: docs/benchmarks.md round 32).
//
// Every product and sum is an exact integer (int32 over K), and the float part is the same three roundings
// for every output, (float(sum) * x_scale) * w_scale: a token's outputs are bit for bit the same alone, in any
// batch and inside a prompt, whatever path or tile width its step takes, with no care for summation order.
// The weights need no unpacking: they are stored as the tiles' A side ([N / 16][K / 64][16 outputs][64 values]),
// loaded straight from memory, at one byte a value against the 4-bit blocks' 0.625 and bfloat16's two.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cpuid.h>
#include <cstdint>
#include <cstring>

#include "amx_stores.h"
#include "block_quant.h"
#include "cpu_amx.h"
#include "cpu_parallel.h"

namespace jaxserve::int8_rows {
namespace {

using block_quant::fold_max;
using block_quant::PanelTasks;
using block_quant::RunningMax;
using block_quant::TaskMaxima;
using block_quant::store_gated;
using block_quant::store_sums;

constexpr int kChunk = 64;                   // K values per tile row: 64 int8
constexpr int64_t kTileBytes = kTileDim * kChunk;  // one A or B tile, 1 KiB
constexpr int kPanelOutputs = 2 * kTileDim;  // two A tiles of outputs per panel

bool has_amx_int8() {
  static const bool yes = [] {
    unsigned a, b, c, d;
    return block_quant::has_amx() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 25));
  }();
  return yes;
}

#if JAXSERVE_HAVE_AMX
#define JAXSERVE_AMX_INT8 \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// 64 values (four vectors) through the 64-point Walsh-Hadamard transform, scaled by 1/8 (exact) to be
// orthonormal: six butterfly stages, value i paired with i ^ h, the lower one getting a + b and the upper a - b
// (int8_rows.rotate is the same arithmetic).
JAXSERVE_AVX512_BF16 inline void rotate64(__m512 v[4]) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int h = 1; h < kTileDim; h *= 2) {
    const __m512i partner = _mm512_xor_si512(lane, _mm512_set1_epi32(h));
    const __mmask16 upper = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(h));
    for (int i = 0; i < 4; ++i) {
      const __m512 other = _mm512_permutexvar_ps(partner, v[i]);
      // lower lanes: v + other (= a + b); upper lanes: other - v (= a - b, a the lower partner)
      v[i] = _mm512_mask_sub_ps(_mm512_add_ps(v[i], other), upper, other, v[i]);
    }
  }
  for (int h = 1; h < 4; h *= 2)
    for (int i = 0; i < 4; ++i)
      if (!(i & h)) {
        const __m512 a = v[i], b = v[i + h];
        v[i] = _mm512_add_ps(a, b);
        v[i + h] = _mm512_sub_ps(a, b);
      }
  for (int i = 0; i < 4; ++i) v[i] = _mm512_mul_ps(v[i], _mm512_set1_ps(0.125f));
}

// Token group g (16 tokens of x [M, K]) rotated, quantized and laid out as B tiles: tile c (K values 64c..)
// holds quad r of token j at [r][j]; tokens past M are zero (scale 0). x_scale[16g + j]: token j's scale,
// max |rotated value| times 1/127 (a product, as XLA turns the reference's division by 127 into one).
JAXSERVE_AVX512_BF16 void quantize_group(const float* x, int64_t M, int64_t K, int64_t g, int8_t* tiles,
                                         float* x_scale) {
  const int64_t chunks = K / kChunk, tokens = std::min<int64_t>(kTileDim, M - g * kTileDim);
  float* rotated = thread_scratch<float, 6>(K);
  int32_t* quads = thread_scratch<int32_t, 7>(kTileDim * (K / 4));  // [token][quad]
  std::memset(quads + tokens * (K / 4), 0, (kTileDim - tokens) * K);
  for (int64_t j = 0; j < tokens; ++j) {
    const float* row = x + (g * kTileDim + j) * K;
    __m512 largest = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      __m512 v[4];
      for (int i = 0; i < 4; ++i) v[i] = _mm512_loadu_ps(row + c * kChunk + 16 * i);
      rotate64(v);
      for (int i = 0; i < 4; ++i) {
        _mm512_store_ps(rotated + c * kChunk + 16 * i, v[i]);
        largest = _mm512_max_ps(largest, _mm512_abs_ps(v[i]));
        nan |= _mm512_cmp_ps_mask(v[i], v[i], _CMP_UNORD_Q);
      }
    }
    // (max_ps drops NaNs, so they are caught apart and carried into every output through the scale)
    const float peak = nan ? NAN : _mm512_reduce_max_ps(largest);
    const bool finite = std::isfinite(peak);
    x_scale[g * kTileDim + j] = finite ? peak * (1.0f / 127.0f) : NAN;  // a NaN or inf: every output NaN
    const float inverse = finite && peak > 0.0f ? 127.0f / peak : 0.0f;
    int8_t* bytes = reinterpret_cast<int8_t*>(quads + j * (K / 4));
    for (int64_t k = 0; k < K; k += 16) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(rotated + k), _mm512_set1_ps(inverse)));
      const __m512i clamped = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(bytes + k), _mm512_cvtepi32_epi8(clamped));
    }
  }
  for (int64_t j = tokens; j < kTileDim; ++j) x_scale[g * kTileDim + j] = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512 r[kTileDim];
    for (int j = 0; j < kTileDim; ++j) r[j] = _mm512_castsi512_ps(_mm512_loadu_si512(quads + j * (K / 4) + c * 16));
    transpose16(r);  // [token][quad] -> [quad][token]
    int8_t* tile = tiles + (g * chunks + c) * kTileBytes;
    for (int q = 0; q < kTileDim; ++q) _mm512_store_si512(tile + q * kChunk, _mm512_castps_si512(r[q]));
  }
}

// A panel's two A tiles (`first`, `second`: 16 outputs each, their rows of 64 values `chunks` tiles long)
// against one or two token groups' B tiles, over all of K, into int32 sum tiles 0-1 (and 2-3), stored to `sums`.
// With next_first, the next panel's tile rows are asked for a chunk at a time: a one-group step reads little else.
template <bool kTwo>
JAXSERVE_AMX_INT8 void multiply_panel(const int8_t* first, const int8_t* second, const int8_t* next_first,
                                      const int8_t* next_second, const int8_t* tokens0, const int8_t* tokens1,
                                      int64_t chunks, int32_t* sums) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kTwo) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    if (next_first)
      for (int line = 0; line < kTileBytes; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(next_first + c * kTileBytes) + line, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next_second + c * kTileBytes) + line, _MM_HINT_T0);
      }
    _tile_loadd(4, first + c * kTileBytes, kChunk);
    _tile_loadd(5, second + c * kTileBytes, kChunk);
    _tile_loadd(6, tokens0 + c * kTileBytes, kChunk);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 5, 6);
    if constexpr (kTwo) {
      _tile_loadd(7, tokens1 + c * kTileBytes, kChunk);
      _tile_dpbssd(2, 4, 7);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, sums, 64);
  _tile_stored(1, sums + kPairTile, 64);
  if constexpr (kTwo) {
    _tile_stored(2, sums + 2 * kPairTile, 64);
    _tile_stored(3, sums + 3 * kPairTile, 64);
  }
}

// The int32 sums (tile a + 2g: outputs `a` of the panel, tokens of group g) as float32 outputs in place:
// (float(sum) * x_scale) * w_scale, the same three roundings at every path.
JAXSERVE_AVX512_BF16 void scale_sums(float* sums, int groups, const float* x_scale, const float* w_scale0,
                                     const float* w_scale1) {
  for (int g = 0; g < groups; ++g) {
    const __m512 tokens = _mm512_loadu_ps(x_scale + g * kTileDim);
    for (int a = 0; a < 2; ++a) {
      float* tile = sums + (a + 2 * g) * kPairTile;
      const float* w_scale = a ? w_scale1 : w_scale0;
      for (int r = 0; r < kTileDim; ++r) {
        const __m512 sum = _mm512_cvtepi32_ps(_mm512_load_si512(tile + r * kTileDim));
        _mm512_store_ps(tile + r * kTileDim, _mm512_mul_ps(_mm512_mul_ps(sum, tokens), _mm512_set1_ps(w_scale[r])));
      }
    }
  }
}

// y [M, N] = x . w^T (w: [N / 16, K / 64, 16, 64] int8, w_scale [N]), or gated (y [M, N / 2] = silu(the first
// N / 2 outputs) * the rest, panel p pairing gate outputs 16p.. with up outputs N / 2 + 16p..), or y_argmax [M]:
// each token's first largest output (N - 1 where one is a NaN).
void matmul(ffi::ThreadPool& pool, const float* x, const int8_t* w, const float* w_scale, float* y, int64_t M,
            int64_t K, int64_t N, bool gated, int32_t* y_argmax) {
  const int64_t chunks = K / kChunk, groups = (M + kTileDim - 1) / kTileDim;
  int8_t* tiles = thread_scratch<int8_t, 4>(groups * chunks * kTileBytes);
  float* x_scale = thread_scratch<float, 5>(groups * kTileDim + kTileDim);
  auto quantize = [&](int64_t g) { quantize_group(x, M, K, g, tiles, x_scale); };
  if (groups < 4) {
    for (int64_t g = 0; g < groups; ++g) quantize(g);
  } else {
    parallel_blocks(pool, groups, quantize);
  }
  const int64_t panels = gated ? N / 2 / kTileDim : N / kPanelOutputs + (N % kPanelOutputs ? 1 : 0);
  const int64_t up_tile = N / 2 / kTileDim;  // a gated panel's up half: this many tile rows later
  auto tile_rows = [&](int64_t p, int64_t& first, int64_t& second) {
    first = gated ? p : 2 * p;
    second = gated ? up_tile + p : std::min<int64_t>(2 * p + 1, N / kTileDim - 1);  // an odd tail repeats
  };
  const int64_t width = gated ? N / 2 : N;
  const bool streaming = groups > 2 && reinterpret_cast<uintptr_t>(y) % 64 == 0 && width % kTileDim == 0;
  const PanelTasks split(panels, pool.num_threads());
  TaskMaxima maxima(y_argmax != nullptr, split.tasks, groups * kTileDim, split.per_task * kPanelOutputs);
  parallel_blocks(pool, split.tasks, [&](int64_t t) {
    RunningMax best = maxima.of(t);
    float* sums = thread_scratch<float, 2>(4 * kPairTile);
    configure_panel_tiles(M);
    const int64_t last = std::min(panels, (t + 1) * split.per_task);
    for (int64_t p = t * split.per_task; p < last; ++p) {
      int64_t first, second, next_first, next_second;
      tile_rows(p, first, second);
      tile_rows(std::min(p + 1, panels - 1), next_first, next_second);
      const int64_t o0 = gated ? p * kTileDim : p * kPanelOutputs;
      const int count = gated ? kPanelOutputs : static_cast<int>(std::min<int64_t>(kPanelOutputs, N - o0));
      const int8_t* a0 = w + first * chunks * kTileBytes;
      const int8_t* a1 = w + second * chunks * kTileBytes;
      // The next panel's weights, a chunk of each tile row per chunk, asked for while the first group pair
      // meets this one (the later pairs find this panel in the caches).
      const int8_t* next1 = w + next_second * chunks * kTileBytes;
      for (int64_t g = 0; g < groups; g += 2) {
        const int8_t* next0 = g == 0 && p + 1 < last ? w + next_first * chunks * kTileBytes : nullptr;
        const int8_t* tokens0 = tiles + g * chunks * kTileBytes;
        const bool two = g + 1 < groups;
        if (two)
          multiply_panel<true>(a0, a1, next0, next1, tokens0, tokens0 + chunks * kTileBytes, chunks,
                               reinterpret_cast<int32_t*>(sums));
        else
          multiply_panel<false>(a0, a1, next0, next1, tokens0, nullptr, chunks, reinterpret_cast<int32_t*>(sums));
        scale_sums(sums, two ? 2 : 1, x_scale + g * kTileDim, w_scale + first * kTileDim, w_scale + second * kTileDim);
        const int64_t m0 = g * kTileDim, tokens = std::min<int64_t>(2 * kTileDim, M - m0);
        if (y_argmax)
          fold_max(sums, m0, tokens, o0, count, best);
        else if (gated)
          store_gated(sums, m0, tokens, o0, y, width, streaming);
        else
          store_sums(sums, m0, tokens, o0, count, y, N, streaming);
      }
    }
    release_tiles();
    if (streaming) _mm_sfence();
  });
  if (y_argmax) maxima.merge(M, N, y_argmax);
}
#endif  // JAXSERVE_HAVE_AMX

// x [M, K] float32, q int8 [(L,) N / 16, K * 16], scale float32 [(L,) N / 16, 16], layer and rows int32 scalars;
// y float32 [M, N] ([M, N / 2] gated) or, with argmax, int32 [M]. Rows from rows[0] on come back zero.
ffi::Error Int8RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                          bool gated, bool argmax, ffi::Result<ffi::AnyBuffer> y) {
  if (!has_amx_int8()) return ffi::Error::InvalidArgument("int8 rows matmul: needs AMX int8 tiles");
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || (qd.size() != 2 && qd.size() != 3) || sd.size() != qd.size() || rows.element_count() != 1 ||
      layer.element_count() != 1)
    return ffi::Error::InvalidArgument("int8 rows matmul: expected x [M, K], q [(L,) N / 16, K * 16], scales alike");
  const int64_t M = xd[0], K = xd[1], stacked = qd.size() == 3 ? qd[0] : 1;
  const int64_t tile_rows = qd[qd.size() - 2], N = tile_rows * kTileDim;
  if (K % kChunk || qd[qd.size() - 1] != K * kTileDim || sd[sd.size() - 2] != tile_rows || sd[sd.size() - 1] != kTileDim)
    return ffi::Error::InvalidArgument("int8 rows matmul: K must be a multiple of 64 and q / scales [N / 16, K * 16] / [N / 16, 16]");
  if (gated && N % (2 * kTileDim)) return ffi::Error::InvalidArgument("int8 rows matmul: gated needs N a multiple of 32");
  if (argmax && gated) return ffi::Error::InvalidArgument("int8 rows matmul: argmax is for plain calls");
  const int64_t width = gated ? N / 2 : N;
  if (y->element_type() != (argmax ? ffi::DataType::S32 : ffi::DataType::F32) || yd.size() != (argmax ? 1 : 2) ||
      yd[0] != M || (!argmax && yd[1] != width))
    return ffi::Error::InvalidArgument("int8 rows matmul: y is not [M, N] ([M, N / 2] gated, int32 [M] argmax)");
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= stacked) return ffi::Error::InvalidArgument("int8 rows matmul: layer out of range");
  const int8_t* w = q.typed_data() + l * N * K;
  const float* w_scale = scale.typed_data() + l * N;
  const int64_t live = std::clamp<int64_t>(*rows.typed_data(), 0, M);
  float* y_rows = argmax ? nullptr : static_cast<float*>(y->untyped_data());
  int32_t* y_argmax = argmax ? static_cast<int32_t*>(y->untyped_data()) : nullptr;
  if (argmax)
    std::fill(y_argmax + live, y_argmax + M, 0);
  else
    std::memset(y_rows + live * width, 0, (M - live) * width * sizeof(float));
#if JAXSERVE_HAVE_AMX
  if (live > 0) matmul(pool, x.typed_data(), w, w_scale, y_rows, live, K, N, gated, y_argmax);
#endif
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxserve::int8_rows

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_int8_rows_matmul, jaxserve::int8_rows::Int8RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("gated")
                                  .Attr<bool>("argmax")
                                  .Ret<ffi::AnyBuffer>());

// For the Python side (int8_rows.available), so that it and the kernels agree.
extern "C" int jaxserve_has_amx_int8() { return jaxserve::int8_rows::has_amx_int8() ? 1 : 0; }
