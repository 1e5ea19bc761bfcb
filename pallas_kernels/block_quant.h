// Shared by block_quant.cc (the AVX2 kernels, the FFI handlers) and block_quant_avx512.cc (the AVX512-BF16 path).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "cpu_parallel.h"

namespace jaxserve::block_quant {

constexpr int64_t kBlock = 32;

// Weights come in tiles of kTile output rows, interleaved block by block ([N / kTile, blocks, kTile, block]
// for the values, [N / kTile, blocks, kTile] for scales and mins), so that a thread walking its tiles reads
// three strictly sequential streams; rows side by side (two rows' blocks a row-length apart) ran at a third
// of the memory bandwidth.
constexpr int kTile = 2;

struct Weights {
  const uint8_t* q;  // this layer's tiles
  const float* scale;  // nullptr for bfloat16 weights
  const float* min;    // nullptr for 8-bit and bfloat16 weights
  int64_t nb;        // blocks per row
};

// The weights of tile `tile` alone: its blocks, scales and mins (nb unchanged), for blocks of kBlockBytes
// bytes; weights without scales (bfloat16 blocks) keep null ones.
template <int64_t kBlockBytes>
inline Weights tile_at(const Weights& w, int64_t tile) {
  const int64_t per_tile = w.nb * kTile;
  return {w.q + tile * per_tile * kBlockBytes, w.scale ? w.scale + tile * per_tile : nullptr,
          w.min ? w.min + tile * per_tile : nullptr, w.nb};
}

template <bool kFourBit>
inline Weights tile_of(const Weights& w, int64_t tile) {
  return tile_at<kFourBit ? kBlock / 2 : kBlock>(w, tile);
}

// 64-byte aligned scratch: the micro-kernels' vector loads then never straddle cache lines (a malloc'd
// buffer's 16-byte alignment split half of them and cost ~30%).
template <typename T>
struct AlignedBuffer {
  explicit AlignedBuffer(int64_t n)
      : data(static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64))) {}
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* data;
};

// out[0], out[1] = the sums of a's and b's lanes, by hadd(hadd(a, b), hadd(a, b)): for each output the same
// additions as the panels' four-output reduction (lanes of hadd(hadd(a, b), hadd(c, d)) halves), so every
// path gives an output the same sum. Shared by the float32 and the bfloat16 loops.
inline void store_pair_sums(__m256 a, __m256 b, float* out) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(a, b));
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  out[0] = lanes[0];
  out[1] = lanes[1];
}

// The many-row paths walk the weights in panels of kPanel outputs (two tiles; the last may hold one), split
// over the thread pool in contiguous ranges: each task unpacks a panel at a time into its own L1-sized
// scratch with `unpack(tile, rows)` (T: float or bfloat16 bits) and has every row meet it with
// `multiply(panel, outputs, first_output)`.
constexpr int kPanel = 4;

template <typename T, typename Unpack, typename Multiply>
void walk_panels(ffi::ThreadPool& pool, int64_t tiles, int64_t K, Unpack&& unpack, Multiply&& multiply) {
  const int64_t panels = (tiles + 1) / 2;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(panels / 2, pool.num_threads() * 4));
  const int64_t per_task = (panels + tasks - 1) / tasks;
  parallel_blocks(pool, (panels + per_task - 1) / per_task, [&](int64_t t) {
    AlignedBuffer<T> panel(kPanel * K);
    for (int64_t p = t * per_task; p < std::min(panels, (t + 1) * per_task); ++p) {
      const int64_t tile = 2 * p, count = std::min<int64_t>(2, tiles - tile);
      for (int64_t i = 0; i < count; ++i) unpack(tile + i, panel.data + i * kTile * K);
      multiply(static_cast<const T*>(panel.data), count * kTile, tile * kTile);
    }
  });
}

// Whether this CPU multiplies bfloat16 pairs in hardware (AVX512-BF16's vdpbf16ps).
bool has_bf16_dots();

// y[M, N] = bf16(x[M, K]) . bf16(dequantize(w))^T with float32 sums, for every step with the bf16
// attribute on CPUs with has_bf16_dots(): twice the float32 FMA rate, and one path at every batch size.
void bf16_matmul(ffi::ThreadPool& pool, const float* x, const Weights& w, float* y, int64_t M, int64_t K,
                 int64_t N, bool four_bit);

// Whether this CPU and OS give this process AMX's bfloat16 tiles (block_quant_amx.cc).
bool has_amx();

// y[M, N] = bf16(x[M, K]) . bf16(dequantize(w))^T with float32 sums, in AMX tiles: bf16_matmul's path on CPUs
// with has_amx(), at every row count, and the bf16 attribute's path for bfloat16 blocks there. row_bytes: a
// block's bytes a row (16: 4-bit, 32: 8-bit, 64: bfloat16). With `gated` (N / 2 a multiple of 16): y[M, N / 2] =
// silu(first half's outputs) * second half's, in the panels' store (a fused gate/up projection); with `y_pairs`
// too, those activations come out as the next projection's AMX B tiles (y unused), which that projection takes
// as `x_pairs` (x unused): [ceil(M / 16), width / 32, 16, 16] uint32, each a bfloat16 pair of one token.
// With `y_argmax` instead of y (ungated): y_argmax[m] = the first index of row m's largest output (N - 1 if the
// row has a NaN), the sampler's greedy token, without writing the outputs.
void amx_matmul(ffi::ThreadPool& pool, const float* x, const Weights& w, float* y, int64_t M, int64_t K,
                int64_t N, int row_bytes, bool gated = false, const uint32_t* x_pairs = nullptr,
                uint32_t* y_pairs = nullptr, int32_t* y_argmax = nullptr);

}  // namespace jaxserve::block_quant
