// The attention kernel for CPUs with AVX-512 (F, BW, DQ), over float32 or bfloat16 pages with head_dim a
// multiple of 32: cpu_attention.cc's driver calls it in place of the AVX2 kernel there.
//
// The AVX2 kernel updates each (token, head) lane's softmax every eight positions (a maximum, an exponential,
// a rescale) and widens a block's rows into an L1 buffer first. Here a lane's softmax is updated once a block
// of 64 positions (kBlock), its scores computed 16 at a time (kSub):
//  - dots: four positions' rows of a KV head are widened in registers at a time (bfloat16: the odd values are
//    the 32-bit lanes masked, the even ones the lanes shifted up) and met by every lane of the call, D/16 FMAs
//    into a vector per position; the four vectors are summed half-way in registers (quad_sums), and a lane's
//    four quads into its 16 scores (lane_sums): one transpose tree, not 16 reductions.
//  - softmax: the block's maximum, one correction and the exponentials of its scores, vectorized.
//  - values: the lanes in groups whose accumulators fit the 32 registers, each widened V vector serving the
//    group, position by position.
// Queries and accumulators are held in the order the rows widen to (bfloat16: of every 32 values the 16 even
// ones, then the 16 odd ones) and put back in order at the end. A lane's arithmetic is the same whichever
// lanes share its call, so a token's outputs do not depend on the batch (nor on decode vs. prefill).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "cpu_attention.h"
#include "cpu_math.h"
#include "cpu_parallel.h"

#define JAXSERVE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

namespace jaxserve::attention {
namespace {

// A lane's softmax is updated once a block of kBlock positions; its scores are summed kSub at a time.
constexpr int kBlock = static_cast<int>(kWideBlock), kSub = 16;
static_assert(kBlock % kSub == 0 && kBlock <= 64, "a lane's visible positions are a 64-bit mask");

// Software prefetching of the same head's K rows ahead (16-128 positions, into L1 or L2) did not pay: the
// hardware's streams over a page's rows kept up (a 32-sequence decode's 30 layers on one thread: 26 ms without,
// 27-37 ms with). What does pay is asking for the rows the hardware cannot guess: a block's V rows while its
// scores are computed, and the next KV head's K rows (a 32-sequence decode step 16-21 -> 13-15 ms, four-token
// query blocks 30-34 -> 25-28 ms, benchmarks/attention_cpu.py).
template <typename Page, int DV>
JAXSERVE_AVX512 inline void prefetch_row(const Page* row) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int line = 0; line < 16 * DV * static_cast<int>(sizeof(Page)); line += 64) _mm_prefetch(bytes + line, _MM_HINT_T0);
}

// Values lanes in a group: their D/16 accumulators each stay within the 32 registers beside one widened row.
constexpr int kAccumulators = 24;

// A row of 16 * DV values as DV float32 vectors, in the kernel's order (bfloat16: per 32 values the even
// ones, then the odd ones; float32: as stored).
template <typename Page, int DV>
JAXSERVE_AVX512 inline void widen_row(const Page* row, __m512 (&out)[DV]) {
  if constexpr (std::is_same_v<Page, float>) {
    for (int v = 0; v < DV; ++v) out[v] = _mm512_loadu_ps(row + 16 * v);
  } else {
    const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    for (int c = 0; c < DV / 2; ++c) {
      const __m512i pairs = _mm512_loadu_si512(row + 32 * c);
      out[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));      // values 2i: the low halves
      out[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));  // values 2i + 1
    }
  }
}

// In place between the natural order of D values and the kernel's (see widen_row): per 32 values, two
// two-source permutes each way.
template <typename Page>
JAXSERVE_AVX512 void reorder(float* values, int64_t D, bool to_kernel) {
  if constexpr (std::is_same_v<Page, uint16_t>) {
    const __m512i first = to_kernel ? _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
                                    : _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = to_kernel ? _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
                                     : _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t c = 0; c < D; c += 32) {
      const __m512 a = _mm512_loadu_ps(values + c), b = _mm512_loadu_ps(values + c + 16);
      _mm512_storeu_ps(values + c, _mm512_permutex2var_ps(a, first, b));
      _mm512_storeu_ps(values + c + 16, _mm512_permutex2var_ps(a, second, b));
    }
  }
}

// Sums of 16-lane vectors, a transpose tree in two steps. quad_sums: lane 4i + j of the result holds part of
// d[j]'s sum (vectors d[0..3]: pairs interleaved and added within 128-bit lanes, then their 64-bit halves);
// lane_sums: of four such quads (16 vectors), lane j = the whole sum of vector j (128-bit lanes added across
// the quads). Each output's sum is the same tree whatever the other vectors hold.
JAXSERVE_AVX512 inline __m512 quad_sums(__m512 d0, __m512 d1, __m512 d2, __m512 d3) {
  const __m512 low = _mm512_add_ps(_mm512_unpacklo_ps(d0, d1), _mm512_unpackhi_ps(d0, d1));
  const __m512 high = _mm512_add_ps(_mm512_unpacklo_ps(d2, d3), _mm512_unpackhi_ps(d2, d3));
  const __m512d a = _mm512_castps_pd(low), b = _mm512_castps_pd(high);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
}

JAXSERVE_AVX512 inline __m512 lane_sums(const float* quads) {
  const __m512 q0 = _mm512_load_ps(quads), q1 = _mm512_load_ps(quads + 16), q2 = _mm512_load_ps(quads + 32),
               q3 = _mm512_load_ps(quads + 48);
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(q2, q3, _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(q2, q3, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of every lane for the block's positions [j0, j0 + 16) ∩ [0, n), times sm_scale, into
// scores[l * kBlock + j0]: four positions at a time, their rows widened once for all lanes (zero past n, where
// no lane looks) and each lane's four product vectors (kernel order) summed into a quad in registers; a lane's
// four quads then make its 16 scores.
template <typename Page, int DV>
JAXSERVE_AVX512 void lane_scores(const Lane* lanes, int64_t count, const Page* const* rows, int j0, int n,
                                 float sm_scale, float* quads, float* scores, const Page* const* v_rows,
                                 const Page* const* k_next, int n_next) {
  for (int j = 0; j < kSub; j += 4) {
    __m512 k[4][DV];
    for (int r = 0; r < 4; ++r) {
      if (j0 + j + r < n_next) prefetch_row<Page, DV>(k_next[j0 + j + r]);
      if (j0 + j + r < n) {
        prefetch_row<Page, DV>(v_rows[j0 + j + r]);
        widen_row<Page, DV>(rows[j0 + j + r], k[r]);
      } else {
        for (int v = 0; v < DV; ++v) k[r][v] = _mm512_setzero_ps();
      }
    }
    for (int64_t l = 0; l < count; ++l) {
      const float* q = lanes[l].q;
      __m512 acc[4];
      for (int r = 0; r < 4; ++r) acc[r] = _mm512_mul_ps(_mm512_loadu_ps(q), k[r][0]);
      for (int v = 1; v < DV; ++v) {
        const __m512 qv = _mm512_loadu_ps(q + 16 * v);
        for (int r = 0; r < 4; ++r) acc[r] = _mm512_fmadd_ps(qv, k[r][v], acc[r]);
      }
      _mm512_store_ps(quads + (l * 4 + j / 4) * 16, quad_sums(acc[0], acc[1], acc[2], acc[3]));
    }
  }
  for (int64_t l = 0; l < count; ++l)
    _mm512_store_ps(scores + l * kBlock + j0, _mm512_mul_ps(lane_sums(quads + l * 64), _mm512_set1_ps(sm_scale)));
}

// A lane's online-softmax update for the block's first `subs` groups of 16 scores: the new running max, the
// correction of what it held (returned) and the weights into p (zero where it does not see).
JAXSERVE_AVX512 float softmax_update(const AttentionShape& a, const Lane& lane, const float* scores, int subs,
                                     float* p) {
  __m512 s[kBlock / kSub];
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int b = 0; b < subs; ++b) {
    s[b] = _mm512_load_ps(scores + b * kSub);
    if (a.soft_cap > 0.f) {
      alignas(64) float capped[kSub];
      _mm512_store_ps(capped, s[b]);
      for (float& x : capped) x = a.soft_cap * std::tanh(x / a.soft_cap);
      s[b] = _mm512_load_ps(capped);
    }
    s[b] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), static_cast<__mmask16>(lane.visible >> (b * kSub)), s[b]);
    top = _mm512_max_ps(top, s[b]);
  }
  SoftmaxState& state = *lane.state;
  const int64_t i = lane.head;
  const float m_new = std::max(state.m[i], _mm512_reduce_max_ps(top));
  const float correction = std::exp(state.m[i] - m_new);  // 0 on the first block (m = -inf)
  __m512 sum = _mm512_setzero_ps();
  for (int b = 0; b < subs; ++b) {
    const __m512 weights = _mm512_maskz_mov_ps(static_cast<__mmask16>(lane.visible >> (b * kSub)),
                                               exp_nonpositive16(_mm512_sub_ps(s[b], _mm512_set1_ps(m_new))));
    sum = _mm512_add_ps(sum, weights);
    _mm512_store_ps(p + b * kSub, weights);
  }
  state.l[i] = state.l[i] * correction + _mm512_reduce_add_ps(sum);
  state.m[i] = m_new;
  return correction;
}

// acc = acc * correction + sum_j p[j] * v_row[j] for a group of up to L lanes (kernel order), the rows in
// position order, each widened once for the group.
template <typename Page, int DV, int L>
JAXSERVE_AVX512 void lane_values(const Lane* lanes, int count, const float* correction, const float* p,
                                 const Page* const* rows, int n, int64_t D) {
  __m512 acc[L][DV];
  for (int l = 0; l < count; ++l) {
    const float* state_acc = lanes[l].state->acc + lanes[l].head * D;
    for (int v = 0; v < DV; ++v)
      acc[l][v] = _mm512_mul_ps(_mm512_loadu_ps(state_acc + 16 * v), _mm512_set1_ps(correction[l]));
  }
  for (int j = 0; j < n; ++j) {
    __m512 value[DV];
    widen_row<Page, DV>(rows[j], value);
    for (int l = 0; l < count; ++l) {
      const __m512 weight = _mm512_set1_ps(p[l * kBlock + j]);
      for (int v = 0; v < DV; ++v) acc[l][v] = _mm512_fmadd_ps(weight, value[v], acc[l][v]);
    }
  }
  for (int l = 0; l < count; ++l) {
    float* state_acc = lanes[l].state->acc + lanes[l].head * D;
    for (int v = 0; v < DV; ++v) _mm512_storeu_ps(state_acc + 16 * v, acc[l][v]);
  }
}

// kTiles: the products in AMX tiles (bfloat16 pages; cpu_attention_amx.cc), the queries and accumulators in
// natural order.
template <typename Page, int DV, bool kTiles>
JAXSERVE_AVX512 void attend(const AttentionShape& a, const float* q_first, int64_t token_stride, int64_t count,
                            const int64_t* lo, const int64_t* hi, const int64_t* first, const int64_t* chunk,
                            const Page* k_pages, const Page* v_pages, const int32_t* pages,
                            SoftmaxState* const* states) {
  constexpr int64_t D = 16 * DV;
  constexpr int kGroup = std::max(1, kAccumulators / DV);
  const int64_t G = a.group, H = a.num_heads, row = a.num_kv_heads * D;
  int64_t begin = INT64_MAX, end = 0;
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t k = 0; k < part_count(first[t], chunk[t], hi[t]); ++k) states[t][k].reset(H, D);
    if (lo[t] < hi[t]) {
      begin = std::min(begin, lo[t]);
      end = std::max(end, hi[t]);
    }
  }
  if (begin >= end) return;  // no token sees any position
  begin = begin / kBlock * kBlock;  // blocks start at multiples of kBlock whatever tokens share the call
  // This thread's buffers (cpu_parallel.h), numbered past block_quant's.
  float* q = thread_scratch<float, 10>(count * H * D);
  for (int64_t t = 0; t < count; ++t) {
    std::memcpy(q + t * H * D, q_first + t * token_stride, H * D * sizeof(float));
    if constexpr (!kTiles)
      for (int64_t i = 0; i < H; ++i) reorder<Page>(q + (t * H + i) * D, D, true);
  }
  const int64_t max_lanes = count * G;
  float* quads = thread_scratch<float, 11>(max_lanes * 64);
  float* scores = thread_scratch<float, 12>(max_lanes * kBlock);
  float* p = thread_scratch<float, 13>(max_lanes * kBlock);
  float* correction = thread_scratch<float, 14>(max_lanes);
  Lane* lanes = thread_scratch<Lane, 15>(max_lanes);
  float* values = kTiles ? thread_scratch<float, 21>(max_lanes * D) : nullptr;
  if constexpr (kTiles) begin_amx_attention();
  auto slot_offset = [&](int64_t pos) {
    return (static_cast<int64_t>(pages[pos / a.page_size]) * a.page_size + pos % a.page_size) * row;
  };
  for (int64_t p0 = begin; p0 < end; p0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, end - p0));
    const int subs = (n + kSub - 1) / kSub;
    int64_t offset[kBlock];
    for (int j = 0; j < n; ++j) offset[j] = slot_offset(p0 + j);
    for (int64_t h = 0; h < a.num_kv_heads; ++h) {
      const Page* k_rows[kBlock];
      const Page* v_rows[kBlock];
      for (int j = 0; j < n; ++j) {
        k_rows[j] = k_pages + offset[j] + h * D;
        v_rows[j] = v_pages + offset[j] + h * D;
      }
      // The rows the hardware cannot guess are asked for while the scores are computed, a few with each group
      // of positions (all at once, up front, they filled the line-fill buffers and the loop stalled there):
      // the V rows this head's values read next, and the K rows of the next head (or of the next block's
      // first head).
      const Page* k_next[kBlock];
      int n_next = 0;
      if (h + 1 < a.num_kv_heads) {
        for (n_next = 0; n_next < n; ++n_next) k_next[n_next] = k_rows[n_next] + D;
      } else if (p0 + kBlock < end) {
        for (n_next = 0; n_next < std::min<int64_t>(kBlock, end - p0 - kBlock); ++n_next)
          k_next[n_next] = k_pages + slot_offset(p0 + kBlock + n_next);
      }
      int64_t live = 0;
      for (int64_t t = 0; t < count; ++t) {
        const int64_t from = std::clamp<int64_t>(lo[t] - p0, 0, kBlock);
        const int64_t to = std::clamp<int64_t>(hi[t] - p0, 0, kBlock);
        if (from >= to) continue;  // none of this token's positions
        const uint64_t below_to = to == 64 ? ~0ull : (1ull << to) - 1;
        const uint64_t visible = below_to & ~((1ull << from) - 1);
        SoftmaxState* state = &states[t][(p0 - first[t]) / chunk[t]];
        for (int64_t g = 0; g < G; ++g) {
          const int64_t i = h * G + g;  // the query head
          lanes[live++] = {q + (t * H + i) * D, visible, state, i};
        }
      }
      if (live == 0) continue;
      if constexpr (kTiles) {
        // The same rows asked for ahead as lane_scores asks for them, spread over the work in tiles: this
        // head's V rows while the scores are put in rows, the next K rows while the V rows are paired.
        amx_scores(lanes, live, reinterpret_cast<const uint16_t* const*>(k_rows), row, n, D, a.sm_scale, scores,
                   reinterpret_cast<const uint16_t* const*>(v_rows), n);
        for (int64_t l = 0; l < live; ++l)
          correction[l] = softmax_update(a, lanes[l], scores + l * kBlock, subs, p + l * kBlock);
        amx_values(live, p, subs, reinterpret_cast<const uint16_t* const*>(v_rows), n, D, values,
                   reinterpret_cast<const uint16_t* const*>(k_next), n_next);
        for (int64_t l = 0; l < live; ++l) {
          float* acc = lanes[l].state->acc + lanes[l].head * D;
          const __m512 c = _mm512_set1_ps(correction[l]);
          for (int v = 0; v < DV; ++v)
            _mm512_storeu_ps(acc + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(acc + 16 * v), c,
                                                           _mm512_loadu_ps(values + l * D + 16 * v)));
        }
        continue;
      }
      for (int b = 0; b < subs; ++b)
        lane_scores<Page, DV>(lanes, live, k_rows, b * kSub, n, a.sm_scale, quads, scores, v_rows, k_next,
                              n_next);
      for (int64_t l = 0; l < live; ++l)
        correction[l] = softmax_update(a, lanes[l], scores + l * kBlock, subs, p + l * kBlock);
      for (int64_t l0 = 0; l0 < live; l0 += kGroup) {
        const int size = static_cast<int>(std::min<int64_t>(kGroup, live - l0));
        lane_values<Page, DV, kGroup>(lanes + l0, size, correction + l0, p + l0 * kBlock, v_rows, n, D);
      }
    }
  }
  if constexpr (kTiles) {
    end_amx_attention();
    return;
  }
  for (int64_t t = 0; t < count; ++t)
    for (int64_t k = 0; k < part_count(first[t], chunk[t], hi[t]); ++k)
      for (int64_t i = 0; i < H; ++i) reorder<Page>(states[t][k].acc + i * D, D, false);
}

template <typename Page>
void attend_any(const AttentionShape& a, const float* q_first, int64_t token_stride, int64_t count,
                const int64_t* lo, const int64_t* hi, const int64_t* first, const int64_t* chunk, const Page* k_pages,
                const Page* v_pages, const int32_t* pages, SoftmaxState* const* states) {
  switch (a.head_dim) {
#define JAXSERVE_HEAD_DIM(d)                                                                                     \
  case d:                                                                                                          \
    if constexpr (std::is_same_v<Page, uint16_t>)                                                              \
      if (a.tiles)                                                                                                 \
        return attend<Page, d / 16, true>(a, q_first, token_stride, count, lo, hi, first, chunk, k_pages, v_pages, \
                                          pages, states);                                                          \
    return attend<Page, d / 16, false>(a, q_first, token_stride, count, lo, hi, first, chunk, k_pages, v_pages,    \
                                       pages, states);
    JAXSERVE_HEAD_DIM(32)
    JAXSERVE_HEAD_DIM(64)
    JAXSERVE_HEAD_DIM(96)
    JAXSERVE_HEAD_DIM(128)
    JAXSERVE_HEAD_DIM(160)
    JAXSERVE_HEAD_DIM(192)
    JAXSERVE_HEAD_DIM(224)
    JAXSERVE_HEAD_DIM(256)
#undef JAXSERVE_HEAD_DIM
  }
}

}  // namespace

bool has_avx512_attention() {
  // JAXSERVE_CPU_AVX512=0 keeps the AVX2 kernel on any CPU (to compare them, or to test it on this one).
  static const bool yes = [] {
    const char* setting = std::getenv("JAXSERVE_CPU_AVX512");
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           !(setting && std::string(setting) == "0");
  }();
  return yes;
}

void attend_tokens_avx512(const AttentionShape& a, const float* q_first, int64_t token_stride, int64_t count,
                          const int64_t* lo, const int64_t* hi, const int64_t* first, const int64_t* chunk,
                          const uint16_t* k_pages, const uint16_t* v_pages, const int32_t* pages,
                          SoftmaxState* const* states) {
  attend_any(a, q_first, token_stride, count, lo, hi, first, chunk, k_pages, v_pages, pages, states);
}

void attend_tokens_avx512(const AttentionShape& a, const float* q_first, int64_t token_stride, int64_t count,
                          const int64_t* lo, const int64_t* hi, const int64_t* first, const int64_t* chunk,
                          const float* k_pages, const float* v_pages, const int32_t* pages,
                          SoftmaxState* const* states) {
  attend_any(a, q_first, token_stride, count, lo, hi, first, chunk, k_pages, v_pages, pages, states);
}

}  // namespace jaxserve::attention

// For the Python side (cpu_kernels.has_avx512_attention), so that it and the kernel agree.
extern "C" int jaxserve_has_avx512_attention() { return jaxserve::attention::has_avx512_attention() ? 1 : 0; }
