// Shared by cpu_attention.cc (the AVX2 kernel, the driver, the FFI handler) and cpu_attention_avx512.cc: the
// shape of a call, a query token's softmax state, and how a token's positions are cut into parts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace jaxserve::attention {

struct AttentionShape {
  int64_t num_tokens, num_heads, head_dim, page_size, num_kv_heads, pages_per_seq, group;
  float sm_scale, soft_cap;
  int64_t sliding_window;
  bool tiles = false;  // the AVX-512 kernel's products in AMX tiles (bfloat16 pages, has_amx_attention())
};

constexpr int kMaxHeadDim = 256;

// The online softmax's state of one query token over a range of positions: per query head the running max m,
// the sum l of e^(score - m) and the unnormalized output acc [head_dim].
struct SoftmaxState {
  std::vector<float> storage;
  float *acc = nullptr, *m = nullptr, *l = nullptr;
  void reset(int64_t heads, int64_t head_dim) {
    storage.assign(heads * (head_dim + 2), 0.f);
    acc = storage.data();
    m = acc + heads * head_dim;
    l = m + heads;
    std::fill(m, m + heads, -INFINITY);
  }
};

// Parts of `chunk` positions from `first` up to `hi` (at least one).
inline int64_t part_count(int64_t first, int64_t chunk, int64_t hi) {
  return std::max<int64_t>(1, (hi - first + chunk - 1) / chunk);
}

// A query token's visible positions [lo, hi) are cut into up to kMaxParts parts (at least kMinPartPositions
// each) at multiples of `align` (the kernel's block of positions) that depend on lo and hi alone, each part an
// online softmax of its own, merged in order after. A decoding token's parts run on threads of their own
// (flash-decoding); a prefill token's run in turn as its block of queries walks the positions. Either way,
// and in any batch, a token gets the same sums: greedy outputs do not depend on what else shares a step (an
// earlier split chosen by the number of sequences did).
constexpr int64_t kMaxParts = 4;
constexpr int64_t kMinPartPositions = 64;

struct PartLayout {
  int64_t first, chunk, count;  // part k: [first + k * chunk, first + (k + 1) * chunk) within [lo, hi)
};

inline PartLayout part_layout(int64_t lo, int64_t hi, int64_t align) {
  const int64_t first = lo / align * align;
  if (hi <= lo) return {first, align, 1};
  const int64_t parts = std::clamp<int64_t>((hi - lo) / kMinPartPositions, 1, kMaxParts);
  const int64_t chunk = ((hi - first + parts - 1) / parts + align - 1) / align * align;
  return {first, chunk, part_count(first, chunk, hi)};
}

// Query tokens t < count (q rows token_stride apart) of one sequence, each over its own positions
// [lo[t], hi[t]), all heads; token t's positions from first[t] + k * chunk[t] on go to states[t][k] (its
// parts). Page: the cache's values (float32, bfloat16 bits).
//
// The AVX-512 kernel (cpu_attention_avx512.cc), for caches of float32 or bfloat16 and head_dim a multiple of
// 32 on CPUs with AVX-512 (has_avx512_attention): blocks of kWideBlock positions, so its parts align to that.
constexpr int64_t kWideBlock = 64;
bool has_avx512_attention();
void attend_tokens_avx512(const AttentionShape& a, const float* q_first, int64_t token_stride, int64_t count,
                          const int64_t* lo, const int64_t* hi, const int64_t* first, const int64_t* chunk,
                          const uint16_t* k_pages, const uint16_t* v_pages, const int32_t* pages,
                          SoftmaxState* const* states);
void attend_tokens_avx512(const AttentionShape& a, const float* q_first, int64_t token_stride, int64_t count,
                          const int64_t* lo, const int64_t* hi, const int64_t* first, const int64_t* chunk,
                          const float* k_pages, const float* v_pages, const int32_t* pages,
                          SoftmaxState* const* states);

// One (query token, query head) lane of a KV head's block in the AVX-512 kernel: its query (float32, in the
// kernel's order; in natural order for the tiles), which of the block's positions it sees (bit j: the block's
// position j), its softmax state and head.
struct Lane {
  const float* q;
  uint64_t visible;
  SoftmaxState* state;
  int64_t head;
};

// Its two products in AMX tiles for bfloat16 pages (cpu_attention_amx.cc; head_dim a multiple of 32), between
// begin_amx_attention() and end_amx_attention() on the calling thread; the queries in natural order:
//  - amx_scores: scores[l * kWideBlock + j] = sm_scale * q_l . k_rows[j] for the block's n <= 64 positions
//    (rows `stride` values apart within a page);
//  - amx_values: out[l * D + d] = sum over j < n of p[l * kWideBlock + j] * v_rows[j][d], where p holds `subs`
//    groups of 16 weights.
// Each asks for rows ahead[0..n_ahead) (the next rows the kernel reads) while it works.
bool has_amx_attention();
void begin_amx_attention();
void end_amx_attention();
void amx_scores(const Lane* lanes, int64_t count, const uint16_t* const* k_rows, int64_t stride, int n, int64_t D,
                float sm_scale, float* scores, const uint16_t* const* ahead, int n_ahead);
void amx_values(int64_t count, const float* p, int subs, const uint16_t* const* v_rows, int n, int64_t D, float* out,
                const uint16_t* const* ahead, int n_ahead);

}  // namespace jaxserve::attention
