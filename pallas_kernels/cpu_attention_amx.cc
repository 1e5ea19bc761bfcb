// Attention's two products over bfloat16 pages in AMX tiles (Intel Sapphire Rapids and later), for the
// AVX-512 kernel's blocks (cpu_attention_avx512.cc): per block of up to 64 positions and KV head, every lane's
// scores and then its share of the values, 16 lanes to a tile.
//  - scores: the K rows are the A tiles as they lie in a page (16 positions x 32 values, the page's row
//    stride: no copy), the lanes' queries rounded to bfloat16 the B tiles (a lane's pairs of values down a
//    column); the sums come out [position][lane] and one transpose puts them in the lanes' rows.
//  - values: the lanes' softmax weights rounded to bfloat16 are the A tiles (a lane's 32 positions a row), the
//    V rows the B tiles, two positions' rows interleaved into pairs (16 of the head's values a tile).
// Each sum is the same chain of tile multiplies whichever lanes share its tile, so a token's outputs still do
// not depend on its batch. Queries and weights are rounded to bfloat16 for the multiplies, as a GPU's flash
// attention rounds them; the softmax itself stays float32 (cpu_attention_avx512.cc).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "block_quant.h"
#include "cpu_amx.h"
#include "cpu_attention.h"
#include "cpu_parallel.h"

namespace jaxserve::attention {

bool has_amx_attention() {
  static const bool yes = JAXSERVE_HAVE_AMX && block_quant::has_bf16_dots() && block_quant::has_amx();
  return yes;
}

#if JAXSERVE_HAVE_AMX
namespace {

constexpr int kPositionsPerTile = 2 * kTileDim;  // a bfloat16 A tile's row: 32 positions (or 32 values)

// Rows [from, to) asked for ahead, into L1.
JAXSERVE_AMX inline void prefetch_rows(const uint16_t* const* rows, int from, int to, int64_t D) {
  for (int j = from; j < to; ++j)
    for (int64_t line = 0; line < D * 2; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(rows[j]) + line, _MM_HINT_T0);
}

// Lanes l0.. (up to 16) of a block's queries as B tiles: pairs[c] holds values 32c..32c + 31, pair r of lane n
// at [r][n]; lanes past `count` are zero.
JAXSERVE_AMX void pair_queries(const Lane* lanes, int count, int64_t D, uint32_t* pairs) {
  for (int64_t c = 0; c < D / kPositionsPerTile; ++c) {
    __m512 r[kTileDim];
    for (int n = 0; n < kTileDim; ++n) {
      r[n] = _mm512_setzero_ps();
      if (n >= count) continue;
      const float* q = lanes[n].q + c * kPositionsPerTile;
      r[n] = reinterpret_cast<__m512>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + 16), _mm512_loadu_ps(q)));
    }
    transpose16(r);
    float* tile = reinterpret_cast<float*>(pairs + c * kPairTile);
    for (int i = 0; i < kTileDim; ++i) _mm512_store_ps(tile + i * kTileDim, r[i]);
  }
}

// Where position group g's K rows are as one A tile: in place when its 16 rows lie at the page's row stride
// (one page holds them), else copied into `spare` (zero past n).
const uint16_t* rows_in_place(const uint16_t* const* rows, int g, int n, int64_t stride, int64_t D,
                              uint16_t* spare) {
  const int j0 = g * kTileDim;
  bool in_place = j0 + kTileDim <= n;
  for (int j = 1; in_place && j < kTileDim; ++j) in_place = rows[j0 + j] == rows[j0] + j * stride;
  if (in_place) return rows[j0];
  for (int j = 0; j < kTileDim; ++j) {
    if (j0 + j < n)
      std::memcpy(spare + j * D, rows[j0 + j], D * sizeof(uint16_t));
    else
      std::memset(spare + j * D, 0, D * sizeof(uint16_t));
  }
  return spare;
}

// One query chunk's B tile against the position groups' A tiles, into sums tiles 0-3. Tile numbers are
// immediates, hence the unrolled groups.
JAXSERVE_AMX inline void score_chunk(const uint32_t* query_pairs, const uint16_t* const* k_tiles,
                                     const int64_t* k_strides, int groups) {
  _tile_loadd(6, query_pairs, 64);
  _tile_loadd(4, k_tiles[0], k_strides[0]);
  _tile_dpbf16ps(0, 4, 6);
  if (groups > 1) {
    _tile_loadd(5, k_tiles[1], k_strides[1]);
    _tile_dpbf16ps(1, 5, 6);
  }
  if (groups > 2) {
    _tile_loadd(4, k_tiles[2], k_strides[2]);
    _tile_dpbf16ps(2, 4, 6);
  }
  if (groups > 3) {
    _tile_loadd(5, k_tiles[3], k_strides[3]);
    _tile_dpbf16ps(3, 5, 6);
  }
}

// The V rows of positions [32k, 32k + 32) as B tiles: pairs[k * groups + c] holds values 16c..16c + 15, row r
// interleaving positions 32k + 2r and 32k + 2r + 1 (zero from n on).
JAXSERVE_AMX void pair_values(const uint16_t* const* rows, int n, int64_t D, uint32_t* pairs,
                              const uint16_t* const* ahead, int n_ahead) {
  const int64_t groups = D / kTileDim;
  alignas(64) static constexpr uint16_t kLow[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int k = 0; k * kPositionsPerTile < n; ++k) {
    for (int r = 0; r < kTileDim; ++r) {
      const int j = k * kPositionsPerTile + 2 * r;
      prefetch_rows(ahead, j, std::min(n_ahead, j + 2), D);
      for (int64_t piece = 0; piece < D / kPositionsPerTile; ++piece) {  // 32 values: two B tiles' rows
        const __m512i even = j < n ? _mm512_loadu_si512(rows[j] + piece * 32) : _mm512_setzero_si512();
        const __m512i odd = j + 1 < n ? _mm512_loadu_si512(rows[j + 1] + piece * 32) : _mm512_setzero_si512();
        uint32_t* tile = pairs + (k * groups + 2 * piece) * kPairTile + r * kTileDim;
        _mm512_store_si512(tile, _mm512_permutex2var_epi16(even, low, odd));
        _mm512_store_si512(tile + kPairTile, _mm512_permutex2var_epi16(even, high, odd));
      }
    }
  }
}

// Sums tile c += the weights' A tile (already in tile 4) . value pairs' B tile, for c < count. (Tile numbers
// are immediates the intrinsics spell into the instruction, hence the unrolled tiles.)
JAXSERVE_AMX inline void value_chunk(const uint32_t* value_pairs, int count) {
  _tile_loadd(6, value_pairs, 64);
  _tile_dpbf16ps(0, 4, 6);
  if (count > 1) {
    _tile_loadd(7, value_pairs + kPairTile, 64);
    _tile_dpbf16ps(1, 4, 7);
  }
  if (count > 2) {
    _tile_loadd(6, value_pairs + 2 * kPairTile, 64);
    _tile_dpbf16ps(2, 4, 6);
  }
  if (count > 3) {
    _tile_loadd(7, value_pairs + 3 * kPairTile, 64);
    _tile_dpbf16ps(3, 4, 7);
  }
}

JAXSERVE_AMX void load_attention_tiles() { configure_tiles({16, 16, 16, 16, 16, 16, 16, 16}); }

JAXSERVE_AMX void scores_in_tiles(const Lane* lanes, int64_t count, const uint16_t* const* k_rows, int64_t stride,
                                  int n, int64_t D, float sm_scale, float* scores, const uint16_t* const* ahead,
                                  int n_ahead) {
  const int groups = (n + kTileDim - 1) / kTileDim;
  uint32_t* query_pairs = thread_scratch<uint32_t, 16>(D / kPositionsPerTile * kPairTile);
  uint16_t* spare = thread_scratch<uint16_t, 17>(4 * kTileDim * D);
  float* sums = thread_scratch<float, 18>(4 * kPairTile);
  const uint16_t* k_tiles[4];
  int64_t k_strides[4];
  for (int g = 0; g < groups; ++g) {
    k_tiles[g] = rows_in_place(k_rows, g, n, stride, D, spare + g * kTileDim * D);
    k_strides[g] = (k_tiles[g] == spare + g * kTileDim * D ? D : stride) * sizeof(uint16_t);
  }
  for (int64_t l0 = 0; l0 < count; l0 += kTileDim) {
    const int here = static_cast<int>(std::min<int64_t>(kTileDim, count - l0));
    pair_queries(lanes + l0, here, D, query_pairs);
    zero_sum_tiles(groups);
    for (int64_t c = 0; c < D / kPositionsPerTile; ++c) {
      const uint16_t* chunk_tiles[4];
      for (int g = 0; g < groups; ++g) chunk_tiles[g] = k_tiles[g] + c * kPositionsPerTile;
      score_chunk(query_pairs + c * kPairTile, chunk_tiles, k_strides, groups);
    }
    store_sum_tiles(sums, groups);
    for (int g = 0; g < groups; ++g) {  // [position][lane] -> the lanes' rows
      if (l0 == 0) prefetch_rows(ahead, g * kTileDim, std::min(n_ahead, (g + 1) * kTileDim), D);
      __m512 r[kTileDim];
      for (int i = 0; i < kTileDim; ++i) r[i] = _mm512_load_ps(sums + g * kPairTile + i * kTileDim);
      transpose16(r);
      for (int l = 0; l < here; ++l)
        _mm512_store_ps(scores + (l0 + l) * kWideBlock + g * kTileDim, _mm512_mul_ps(r[l], _mm512_set1_ps(sm_scale)));
    }
  }
}

JAXSERVE_AMX void values_in_tiles(int64_t count, const float* p, int subs, const uint16_t* const* v_rows, int n,
                                  int64_t D, float* out, const uint16_t* const* ahead, int n_ahead) {
  const int64_t groups = D / kTileDim, chunks = (n + kPositionsPerTile - 1) / kPositionsPerTile;
  uint32_t* value_pairs = thread_scratch<uint32_t, 19>(chunks * groups * kPairTile);
  uint16_t* weights = thread_scratch<uint16_t, 20>(chunks * kTileDim * kPositionsPerTile);
  float* sums = thread_scratch<float, 18>(4 * kPairTile);
  pair_values(v_rows, n, D, value_pairs, ahead, n_ahead);
  for (int64_t l0 = 0; l0 < count; l0 += kTileDim) {
    const int here = static_cast<int>(std::min<int64_t>(kTileDim, count - l0));
    for (int64_t k = 0; k < chunks; ++k)  // the lanes' weights of positions 32k.. as an A tile
      for (int l = 0; l < kTileDim; ++l) {
        const float* w = p + (l0 + l) * kWideBlock + k * kPositionsPerTile;
        // softmax_update wrote `subs` groups of 16 weights; the rest of a chunk is zero
        const __m512 first = l < here ? _mm512_load_ps(w) : _mm512_setzero_ps();
        const __m512 second = l < here && 2 * k + 1 < subs ? _mm512_load_ps(w + 16) : _mm512_setzero_ps();
        _mm512_store_si512(weights + (k * kTileDim + l) * kPositionsPerTile,
                           reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(second, first)));
      }
    for (int64_t c0 = 0; c0 < groups; c0 += 4) {  // four sums tiles: 64 of the head's values
      const int here_groups = static_cast<int>(std::min<int64_t>(4, groups - c0));
      zero_sum_tiles(here_groups);
      for (int64_t k = 0; k < chunks; ++k) {
        const uint32_t* pairs = value_pairs + (k * groups + c0) * kPairTile;
        _tile_loadd(4, weights + k * kTileDim * kPositionsPerTile, 64);
        value_chunk(pairs, here_groups);
      }
      store_sum_tiles(sums, here_groups);
      for (int c = 0; c < here_groups; ++c)
        for (int l = 0; l < here; ++l)
          _mm512_storeu_ps(out + (l0 + l) * D + (c0 + c) * kTileDim,
                           _mm512_load_ps(sums + c * kPairTile + l * kTileDim));
    }
  }
}

}  // namespace
#endif  // JAXSERVE_HAVE_AMX

// The entry points have no target attributes (GCC would take differing ones for function versions); the
// driver calls them only where has_amx_attention().
void begin_amx_attention() {
#if JAXSERVE_HAVE_AMX
  load_attention_tiles();
#endif
}

void end_amx_attention() {
#if JAXSERVE_HAVE_AMX
  release_tiles();
#endif
}

void amx_scores(const Lane* lanes, int64_t count, const uint16_t* const* k_rows, int64_t stride, int n, int64_t D,
                float sm_scale, float* scores, const uint16_t* const* ahead, int n_ahead) {
#if JAXSERVE_HAVE_AMX
  scores_in_tiles(lanes, count, k_rows, stride, n, D, sm_scale, scores, ahead, n_ahead);
#endif
}

void amx_values(int64_t count, const float* p, int subs, const uint16_t* const* v_rows, int n, int64_t D, float* out,
                const uint16_t* const* ahead, int n_ahead) {
#if JAXSERVE_HAVE_AMX
  values_in_tiles(count, p, subs, v_rows, n, D, out, ahead, n_ahead);
#endif
}

}  // namespace jaxserve::attention
