// The block kernels' bfloat16 plan on CPUs with AMX (Intel Sapphire Rapids and later): one tile multiply
// (tdpbf16ps) takes 16 outputs x 32 weights against 16 tokens, where vdpbf16ps takes 32 weights of one output
// against one token. block_quant_avx512.cc hands every bf16 step here when has_amx(), at every row count,
// so a row's sums still never depend on what else shares its step: each output's sum is the same chain of
// tile multiplies over K, in order, whichever tokens fill the rest of its tile. block_quant.cc hands bfloat16
// blocks (a bfloat16 checkpoint's) here too, with the bf16 attribute: their values need no unpacking.
//
// The weights are the tiles' A side: a block unpacked to bfloat16 is one A-tile row (an output's 32 values),
// so a group of 32 outputs (two A tiles) is unpacked block by block into a panel without reordering. The
// activations are the B side, which AMX wants in pairs (B row r, column n: token n's values 2r and 2r + 1),
// rearranged once per call; the results come out transposed ([outputs, tokens]) and are written back per token.
//
// Linux hands out AMX state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM); each task loads the tile
// configuration on its thread and releases the tiles when done.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cpuid.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "block_quant.h"
#include "cpu_math.h"
#include "block_quant_bf16.h"
#include "cpu_amx.h"
#include "amx_stores.h"
#include "cpu_parallel.h"

namespace jaxserve::block_quant {
#if JAXSERVE_HAVE_AMX
namespace {

constexpr int kGroupOutputs = 2 * kTileDim;        // two A tiles of outputs per panel
constexpr int64_t kChunkValues = kGroupOutputs * kBlock;  // one block of each of the group's outputs (2 KiB)

// Tiles as cpu_amx.h's configure_panel_tiles lays them out. A tile multiply's sums are the same chain of
// multiplies at any width, so rows get the same sums alone or batched (tests/test_block_quant.py).

// Token group g of x [M, K] float32 rounded to bfloat16 and laid out as B tiles: pairs[b] (b < nb) holds its
// block b, pair r of token j at [r][j] (a 16 x 16 transpose of the tokens' 32-bit pairs); tokens past M are
// zero.
JAXSERVE_AVX512_BF16 void pair_group(const float* x, int64_t M, int64_t K, int64_t g, uint32_t* pairs) {
  const int64_t tokens = std::min<int64_t>(kTileDim, M - g * kTileDim);
  const float* rows = x + g * kTileDim * K;
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m512 r[kTileDim];
    for (int j = 0; j < kTileDim; ++j) {
      const float* v = rows + j * K + b * kBlock;
      r[j] = j < tokens ? reinterpret_cast<__m512>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(v + 16), _mm512_loadu_ps(v)))
                        : _mm512_setzero_ps();
    }
    transpose16(r);
    float* tile = reinterpret_cast<float*>(pairs + b * kPairTile);
    for (int j = 0; j < kTileDim; ++j) _mm512_store_ps(tile + j * kTileDim, r[j]);
  }
}

// Every token group paired (pair_group), over the pool's threads when the step is long.
void pair_tokens(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, uint32_t* pairs) {
  const int64_t groups = (M + kTileDim - 1) / kTileDim, per_group = K / kBlock * kPairTile;
  if (groups < 4) {
    for (int64_t g = 0; g < groups; ++g) pair_group(x, M, K, g, pairs + g * per_group);
    return;
  }
  parallel_blocks(pool, groups, [&](int64_t g) { pair_group(x, M, K, g, pairs + g * per_group); });
}

// Block b of tile t's two rows as bfloat16 into two consecutive A-tile rows at `rows`.
template <int kRowBytes>
JAXSERVE_AVX512_BF16 inline void store_block(const Weights& t, int64_t b, uint16_t* rows) {
  __m512i w0, w1;
  block_values<kRowBytes>(t, b, w0, w1);
  _mm512_store_si512(rows, w0);
  _mm512_store_si512(rows + kBlock, w1);
}

// A panel's outputs: its first 16 from storage tile `first` on, the next 16 from `second` on (first + 8 for
// 32 consecutive outputs; a gated panel pairs 16 gate outputs with the same 16 up outputs).
struct PanelTiles {
  int64_t first, second;
  int64_t tile(int i) const { return i < kTileDim / kTile ? first + i : second + i - kTileDim / kTile; }
};

// A panel's `count` outputs (count <= 32, even) unpacked block by block: panel[b] is two A tiles, row i of the
// pair being output i's block b. Rows past count are zero.
template <int kRowBytes>
JAXSERVE_AVX512_BF16 void unpack_group(const Weights& w, PanelTiles tiles, int count, uint16_t* panel) {
  if (count < kGroupOutputs)
    for (int64_t b = 0; b < w.nb; ++b)
      std::memset(panel + b * kChunkValues + count * kBlock, 0, (kGroupOutputs - count) * kBlock * 2);
  for (int i = 0; i < count / kTile; ++i) {
    const Weights t = tile_at<kRowBytes>(w, tiles.tile(i));
    for (int64_t b = 0; b < w.nb; ++b) {
      prefetch_block<kRowBytes>(t, b);
      store_block<kRowBytes>(t, b, panel + b * kChunkValues + i * kTile * kBlock);
    }
  }
}

// The tile step shared by the panels and the stream, between zero_sum_tiles and store_sum_tiles (cpu_amx.h):
// one block's two A tiles (32 outputs x 32 values, `weights`) against one or two token groups' B tiles, into
// sum tiles 0-1 (and 2-3).
template <bool kTwo>
JAXSERVE_AMX inline void multiply_block(const uint16_t* weights, const uint32_t* tokens0, const uint32_t* tokens1) {
  _tile_loadd(4, weights, 64);
  _tile_loadd(5, weights + kTileDim * kBlock, 64);
  _tile_loadd(6, tokens0, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 5, 6);
  if constexpr (kTwo) {
    _tile_loadd(7, tokens1, 64);
    _tile_dpbf16ps(2, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// One or two token groups (kTwo) against a panel: the group's sums, [outputs, tokens] per tile, into `sums`
// (four 16 x 16 float32 tiles, in tile order 0-3).
template <bool kTwo>
JAXSERVE_AMX void multiply_groups(const uint16_t* panel, const uint32_t* pairs0, const uint32_t* pairs1, int64_t nb,
                                  float* sums) {
  zero_sum_tiles(kTwo ? 4 : 2);
  for (int64_t b = 0; b < nb; ++b) {
    // The tokens' next tiles into L1: tile loads left to the hardware waited on L2 (a quarter of the loop).
    if (b + 2 < nb)
      for (int line = 0; line < kPairTile * 4; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(pairs0 + (b + 2) * kPairTile) + line, _MM_HINT_T0);
        if constexpr (kTwo)
          _mm_prefetch(reinterpret_cast<const char*>(pairs1 + (b + 2) * kPairTile) + line, _MM_HINT_T0);
      }
    multiply_block<kTwo>(panel + b * kChunkValues, pairs0 + b * kPairTile, kTwo ? pairs1 + b * kPairTile : nullptr);
  }
  store_sum_tiles(sums, kTwo ? 4 : 2);
}

// Steps of one token group (up to 16 tokens) stream the weights instead: a group of outputs is unpacked one
// block at a time into an L1 chunk and multiplied at once, the sums staying in tiles across K (a whole
// panel of a 1536-wide projection is 96 KiB: it spilled L1 and cost a one-row step ~40% more). The group's
// weights are one contiguous region per array; the next group's is prefetched a slice per block. From two
// token groups on, a panel's second use pays for it: 32-row decode steps ran 2-4% faster on panels than
// streamed (two engines stepped in turns).
template <int kRowBytes>
JAXSERVE_AMX void stream_group(const Weights& w, PanelTiles panel, PanelTiles next, int count, const uint32_t* tokens,
                               uint16_t* chunks, float* sums) {
  constexpr int64_t kTileBlockBytes = kTile * kRowBytes;
  const int tiles = count / kTile;
  // The next panel's two halves (16 outputs each, one contiguous region per array), a slice per block.
  const Weights ahead[2] = {tile_at<kRowBytes>(w, next.first), tile_at<kRowBytes>(w, next.second)};
  const int64_t half_bytes = kTileDim / kTile * w.nb * kTileBlockBytes, half_scales = kTileDim * w.nb * sizeof(float);
  zero_sum_tiles(2);
  if (count < kGroupOutputs)
    for (int c = 0; c < 2; ++c) std::memset(chunks + c * kChunkValues, 0, sizeof(uint16_t) * kChunkValues);
  // Block b + 1 is unpacked before block b's tiles load: a tile load right behind the stores that fill its
  // chunk waited on them.
  auto unpack_chunk = [&](int64_t b) JAXSERVE_AVX512_BF16 {
    for (const Weights& half : ahead) {
      const char* q = reinterpret_cast<const char*>(half.q);
      for (int64_t line = b * half_bytes / w.nb; line < (b + 1) * half_bytes / w.nb; line += 64)
        _mm_prefetch(q + line, _MM_HINT_T0);
      if (half.scale) {
        const int64_t line = b * half_scales / w.nb / 64 * 64;
        _mm_prefetch(reinterpret_cast<const char*>(half.scale) + line, _MM_HINT_T0);
        if (half.min) _mm_prefetch(reinterpret_cast<const char*>(half.min) + line, _MM_HINT_T0);
      }
    }
    uint16_t* chunk = chunks + (b & 1) * kChunkValues;
    for (int i = 0; i < tiles; ++i)
      store_block<kRowBytes>(tile_at<kRowBytes>(w, panel.tile(i)), b, chunk + i * kTile * kBlock);
  };
  unpack_chunk(0);
  for (int64_t b = 0; b < w.nb; ++b) {
    if (b + 1 < w.nb) unpack_chunk(b + 1);
    const uint16_t* chunk = chunks + (b & 1) * kChunkValues;
    multiply_block<false>(chunk, tokens + b * kPairTile, nullptr);
  }
  store_sum_tiles(sums, 2);
}

// A gated panel's activations (as store_gated computes them) rounded to bfloat16 straight into the B tiles the
// down projection multiplies (pair_group's layout for a [M, width] input: token group G's block kb at
// pairs + (G * width / 32 + kb) * kPairTile, pair r of token j at [r][j]). The panel's 16 outputs are half a
// block, 8 pair rows of 64 bytes each: two activation rows interleaved, the tokens already in columns, so no
// transpose and half of store_gated's bytes; the down projection then skips its pair_tokens. The values are
// pair_group's of store_gated's output (the same rounding), so the down projection's sums do not change.
// Columns past the group's real tokens are zero.
JAXSERVE_AVX512_BF16 void store_gated_pairs(const float* sums, int64_t m0, int64_t tokens, int64_t o0,
                                            uint32_t* pairs, int64_t width, bool streaming) {
  const int64_t blocks = width / kBlock, half = (o0 % kBlock) / kTileDim;
  // word 2j from word j (the even output's bfloat16), 2j + 1 from word 16 + j (the odd one's)
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int g = 0; g * kTileDim < tokens; ++g) {
    alignas(64) float activation[kTileDim * kTileDim];
    silu_times_tile(sums + 2 * g * kPairTile, sums + (2 * g + 1) * kPairTile, activation);
    const int64_t real = std::min<int64_t>(kTileDim, tokens - g * kTileDim);
    const __mmask16 columns = _cvtu32_mask16(real == kTileDim ? 0xFFFFu : (1u << real) - 1);
    uint32_t* tile =
        pairs + ((m0 / kTileDim + g) * blocks + o0 / kBlock) * kPairTile + half * (kTileDim / 2) * kTileDim;
    for (int i = 0; i < kTileDim / 2; ++i) {
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_load_ps(activation + (2 * i + 1) * kTileDim),
                                                _mm512_load_ps(activation + 2 * i * kTileDim));
      const __m512i row = _mm512_maskz_mov_epi32(
          columns, _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(both)));
      if (streaming)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(tile + i * kTileDim), row);
      else
        _mm512_store_si512(tile + i * kTileDim, row);
    }
  }
}

// With `gated` (N even, N / 2 a multiple of 16): y [M, N / 2] = silu(x . gate^T) * (x . up^T), gate the
// weights' first N / 2 outputs and up the rest, each output's sums the same tile multiplies as ungated.
// `x_pairs` (x null): the activations already as B tiles (store_gated_pairs's output); `y_pairs` (gated, y
// null): the activations out as such tiles for the next projection; `y_argmax` (ungated, y null): per token
// the first index of its largest output (N - 1 where one is a NaN), as the sampler's greedy token of y.
template <int kRowBytes>
void matmul(ffi::ThreadPool& pool, const float* x, const Weights& w, float* y, int64_t M, int64_t K, int64_t N,
            bool gated, const uint32_t* x_pairs, uint32_t* y_pairs, int32_t* y_argmax) {
  const int64_t nb = K / kBlock, groups = (M + kTileDim - 1) / kTileDim;
  const uint32_t* pairs = x_pairs;
  if (pairs == nullptr) {
    uint32_t* scratch = thread_scratch<uint32_t, 0>(groups * nb * kPairTile);
    pair_tokens(pool, x, M, K, scratch);
    pairs = scratch;
  }
  const int64_t panels = gated ? N / 2 / kTileDim : (N + kGroupOutputs - 1) / kGroupOutputs;
  const int64_t up_tiles = N / 2 / kTile;  // a gated panel's up half starts this many storage tiles later
  auto tiles_of = [&](int64_t p) {
    return gated ? PanelTiles{p * kTileDim / kTile, up_tiles + p * kTileDim / kTile}
                 : PanelTiles{p * kGroupOutputs / kTile, p * kGroupOutputs / kTile + kTileDim / kTile};
  };
  const int64_t width = gated ? N / 2 : N;
  // Steps of more than two token groups (the panels) stream y's rows where they are whole aligned lines; the
  // short steps' y is small and read next, from the cache.
  const void* out = y_pairs ? static_cast<void*>(y_pairs) : y;
  const bool streaming = groups > 2 && reinterpret_cast<uintptr_t>(out) % 64 == 0 && width % kTileDim == 0;
  const PanelTasks split(panels, pool.num_threads());
  TaskMaxima maxima(y_argmax != nullptr, split.tasks, groups * kTileDim, split.per_task * kGroupOutputs);
  parallel_blocks(pool, split.tasks, [&](int64_t t) {
    RunningMax best = maxima.of(t);
    uint16_t* panel = thread_scratch<uint16_t, 1>(std::max<int64_t>(nb, 2) * kChunkValues);  // or two chunks
    float* sums = thread_scratch<float, 2>(4 * kPairTile);
    configure_panel_tiles(M);
    for (int64_t p = t * split.per_task; p < std::min(panels, (t + 1) * split.per_task); ++p) {
      const int64_t o0 = gated ? p * kTileDim : p * kGroupOutputs;  // y's first column of the panel
      const int count = gated ? kGroupOutputs : static_cast<int>(std::min<int64_t>(kGroupOutputs, N - o0));
      auto store = [&](int64_t m0, int64_t tokens) {
        if (y_argmax)
          fold_max(sums, m0, tokens, o0, count, best);
        else if (y_pairs)
          store_gated_pairs(sums, m0, tokens, o0, y_pairs, width, streaming);
        else if (gated)
          store_gated(sums, m0, tokens, o0, y, width, streaming);
        else
          store_sums(sums, m0, tokens, o0, count, y, N, streaming);
      };
      if (groups == 1) {
        stream_group<kRowBytes>(w, tiles_of(p), tiles_of(std::min(p + 1, panels - 1)), count, pairs, panel, sums);
        store(0, M);
        continue;
      }
      unpack_group<kRowBytes>(w, tiles_of(p), count, panel);
      for (int64_t g = 0; g < groups; g += 2) {
        const uint32_t* pairs0 = pairs + g * nb * kPairTile;
        if (g + 1 < groups)
          multiply_groups<true>(panel, pairs0, pairs0 + nb * kPairTile, nb, sums);
        else
          multiply_groups<false>(panel, pairs0, nullptr, nb, sums);
        store(g * kTileDim, std::min<int64_t>(2 * kTileDim, M - g * kTileDim));
      }
    }
    release_tiles();
    if (streaming) _mm_sfence();  // the streamed rows are in memory before the caller reads y
  });
  if (y_argmax) maxima.merge(M, N, y_argmax);
}

}  // namespace
#endif  // JAXSERVE_HAVE_AMX

bool has_amx() {
  // JAXSERVE_CPU_AMX=0 keeps the AVX512-BF16 loops (to compare them, or to test them on an AMX machine).
  static const bool yes = [] {
    const char* setting = std::getenv("JAXSERVE_CPU_AMX");
    if (!JAXSERVE_HAVE_AMX || (setting && std::string(setting) == "0")) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return tile && bf16 && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return yes;
}

void amx_matmul(ffi::ThreadPool& pool, const float* x, const Weights& w, float* y, int64_t M, int64_t K, int64_t N,
                int row_bytes, bool gated, const uint32_t* x_pairs, uint32_t* y_pairs, int32_t* y_argmax) {
#if JAXSERVE_HAVE_AMX
  if (row_bytes == kBlock / 2)
    matmul<kBlock / 2>(pool, x, w, y, M, K, N, gated, x_pairs, y_pairs, y_argmax);
  else if (row_bytes == kBlock)
    matmul<kBlock>(pool, x, w, y, M, K, N, gated, x_pairs, y_pairs, y_argmax);
  else
    matmul<2 * kBlock>(pool, x, w, y, M, K, N, gated, x_pairs, y_pairs, y_argmax);
#endif
}

}  // namespace jaxserve::block_quant

// For the Python side (cpu_kernels.has_amx_tiles), so that it and the kernels agree.
extern "C" int jaxserve_has_amx() { return jaxserve::block_quant::has_amx() ? 1 : 0; }
