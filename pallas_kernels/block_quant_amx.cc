// The block kernels' bfloat16 plan on CPUs with AMX (Intel Sapphire Rapids and later): one tile multiply
// (tdpbf16ps) takes 16 outputs x 32 weights against 16 tokens, where vdpbf16ps takes 32 weights of one output
// against one token. block_quant_avx512.cc hands every bf16 step here when has_amx(), at every row count,
// so a row's sums still never depend on what else shares its step: each output's sum is the same chain of
// tile multiplies over K, in order, whichever tokens fill the rest of its tile.
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
#include <cpuid.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "block_quant.h"
#include "block_quant_bf16.h"
#include "cpu_parallel.h"

#define JAXSERVE_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace jaxserve::block_quant {
namespace {

constexpr int kTileDim = 16;                       // an AMX tile: 16 rows of 64 bytes
constexpr int kGroupOutputs = 2 * kTileDim;        // two A tiles of outputs per panel
constexpr int64_t kChunkValues = kGroupOutputs * kBlock;  // one block of each of the group's outputs (2 KiB)
constexpr int64_t kPairTile = kTileDim * kTileDim;  // a B tile: 16 pair-rows x 16 tokens, as uint32 pairs

// Tiles 0-3 hold sums (A0.B0, A1.B0, A0.B1, A1.B1), 4-5 the weights, 6-7 the activations; all 16 x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
// A constant in memory, not a local: GCC 12 drops a local's stores before ldtilecfg (it does not see the
// builtin read them), which left the tiles unconfigured.
alignas(64) constexpr TileConfig kTileConfig = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64},
                                                {16, 16, 16, 16, 16, 16, 16, 16}};

JAXSERVE_AMX void load_tile_config() { _tile_loadconfig(&kTileConfig); }

// x [M, K] bfloat16 -> pairs[G][nb][16][16] (G = ceil(M / 16) token groups): B tile (g, b) holds block b of
// group g's tokens, pair r of token j at [r][j]; tokens past M stay zero.
void pair_tokens(const uint16_t* x, int64_t M, int64_t K, uint32_t* pairs) {
  const int64_t nb = K / kBlock, groups = (M + kTileDim - 1) / kTileDim;
  std::memset(pairs, 0, groups * nb * kPairTile * sizeof(uint32_t));
  for (int64_t m = 0; m < M; ++m) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(x + m * K);
    uint32_t* group = pairs + (m / kTileDim) * nb * kPairTile + m % kTileDim;
    for (int64_t b = 0; b < nb; ++b)
      for (int r = 0; r < kTileDim; ++r) group[b * kPairTile + r * kTileDim] = row[b * kTileDim + r];
  }
}

// Outputs [o0, o0 + count) (count <= 32, even) unpacked block by block: panel[b] is two A tiles, row i of
// the pair being output o0 + i's block b. Rows past count are zero.
template <bool kFourBit>
JAXSERVE_AVX512_BF16 void unpack_group(const Weights& w, int64_t o0, int count, uint16_t* panel) {
  if (count < kGroupOutputs)
    for (int64_t b = 0; b < w.nb; ++b)
      std::memset(panel + b * kChunkValues + count * kBlock, 0, (kGroupOutputs - count) * kBlock * 2);
  for (int i = 0; i < count / kTile; ++i) {
    const Weights t = tile_of<kFourBit>(w, o0 / kTile + i);
    uint16_t* rows = panel + i * kTile * kBlock;
    for (int64_t b = 0; b < w.nb; ++b) {
      prefetch_block<kFourBit>(t, b);
      __m512i w0, w1;
      unpack_block<kFourBit>(t, b, w0, w1);
      _mm512_store_si512(rows + b * kChunkValues, w0);
      _mm512_store_si512(rows + b * kChunkValues + kBlock, w1);
    }
  }
}

// One or two token groups (kTwo) against a panel: the group's sums, [outputs, tokens] per tile, into `sums`
// (four 16 x 16 float32 tiles, in tile order 0-3).
template <bool kTwo>
JAXSERVE_AMX void multiply_groups(const uint16_t* panel, const uint32_t* pairs0, const uint32_t* pairs1, int64_t nb,
                                  float* sums) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kTwo) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t b = 0; b < nb; ++b) {
    _tile_loadd(4, panel + b * kChunkValues, 64);
    _tile_loadd(5, panel + b * kChunkValues + kTileDim * kBlock, 64);
    _tile_loadd(6, pairs0 + b * kPairTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if constexpr (kTwo) {
      _tile_loadd(7, pairs1 + b * kPairTile, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, sums, 64);
  _tile_stored(1, sums + kPairTile, 64);
  if constexpr (kTwo) {
    _tile_stored(2, sums + 2 * kPairTile, 64);
    _tile_stored(3, sums + 3 * kPairTile, 64);
  }
}

JAXSERVE_AMX void release_tiles() { _tile_release(); }

// y[m, o0 + o] = sums[tile (o / 16) + 2 * (m - m0) / 16][o % 16][(m - m0) % 16] for the group's real tokens.
void store_sums(const float* sums, int64_t m0, int64_t tokens, int64_t o0, int count, float* y, int64_t N) {
  for (int64_t j = 0; j < tokens; ++j) {
    const float* column = sums + (j / kTileDim) * 2 * kPairTile + j % kTileDim;
    float* out = y + (m0 + j) * N + o0;
    for (int o = 0; o < count; ++o) out[o] = column[(o / kTileDim) * kPairTile + (o % kTileDim) * kTileDim];
  }
}

template <bool kFourBit>
void matmul(ffi::ThreadPool& pool, const uint16_t* x, const Weights& w, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t nb = K / kBlock, groups = (M + kTileDim - 1) / kTileDim;
  AlignedBuffer<uint32_t> pairs(groups * nb * kPairTile);
  pair_tokens(x, M, K, pairs.data);
  const int64_t panels = (N + kGroupOutputs - 1) / kGroupOutputs;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(panels / 2, pool.num_threads() * 4));
  const int64_t per_task = (panels + tasks - 1) / tasks;
  parallel_blocks(pool, (panels + per_task - 1) / per_task, [&](int64_t t) {
    AlignedBuffer<uint16_t> panel(nb * kChunkValues);
    AlignedBuffer<float> sums(4 * kPairTile);
    load_tile_config();
    for (int64_t p = t * per_task; p < std::min(panels, (t + 1) * per_task); ++p) {
      const int64_t o0 = p * kGroupOutputs;
      const int count = static_cast<int>(std::min<int64_t>(kGroupOutputs, N - o0));
      unpack_group<kFourBit>(w, o0, count, panel.data);
      for (int64_t g = 0; g < groups; g += 2) {
        const uint32_t* pairs0 = pairs.data + g * nb * kPairTile;
        if (g + 1 < groups)
          multiply_groups<true>(panel.data, pairs0, pairs0 + nb * kPairTile, nb, sums.data);
        else
          multiply_groups<false>(panel.data, pairs0, nullptr, nb, sums.data);
        store_sums(sums.data, g * kTileDim, std::min<int64_t>(2 * kTileDim, M - g * kTileDim), o0, count, y, N);
      }
    }
    release_tiles();
  });
}

}  // namespace

bool has_amx() {
  // JAXSERVE_CPU_AMX=0 keeps the AVX512-BF16 loops (to compare them, or to test them on an AMX machine).
  static const bool yes = [] {
    const char* setting = std::getenv("JAXSERVE_CPU_AMX");
    if (setting && std::string(setting) == "0") return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return tile && bf16 && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return yes;
}

void amx_matmul(ffi::ThreadPool& pool, const uint16_t* x, const Weights& w, float* y, int64_t M, int64_t K, int64_t N,
                bool four_bit) {
  if (four_bit)
    matmul<true>(pool, x, w, y, M, K, N);
  else
    matmul<false>(pool, x, w, y, M, K, N);
}

}  // namespace jaxserve::block_quant
