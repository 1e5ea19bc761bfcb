// Ragged paged attention over a paged KV cache (float32, bfloat16 or float8) as an XLA FFI custom call:
// the AVX2 kernel, the driver that cuts a step into sequences, query blocks and parts (and picks
// cpu_attention_avx512.cc's kernel where it runs), and the handler.
//
//   jaxserve_ragged_paged_attention: see pallas_kernels/reference.py for the semantics (float32, bfloat16,
//   float8_e4m3fn or float8_e5m2 pages)
//
// XLA's path gathers each chunk of pages into a fresh buffer, transposes it head-major and masks whole chunks;
// on the CPU that copying is most of a step's attention. Here each sequence walks its own pages in place with
// an online softmax, eight positions at a time, all heads together (a position's rows of all KV heads are
// adjacent), prefetching rows ahead (the pages are scattered). A prefill chunk's query tokens go in blocks
// that share each loaded block of rows; a token's positions are cut into parts (PartLayout), merged after. A
// bfloat16 or float8 cache is widened to float32 as it is read (a half or a quarter of the bytes of a step
// that is mostly reading them). Semantics are pallas_kernels/reference.py's.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_attention.h"
#include "cpu_math.h"
#include "cpu_parallel.h"

namespace {

using namespace jaxserve;
using namespace jaxserve::attention;

// Eight vectors' horizontal sums as one vector (lane j = sum of v[j]): a tree of hadds instead of eight
// separate reductions.
inline __m256 hsum8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

constexpr int kMaxHeadDim = 256;

// A block's rows of up to this many values (KV heads x head_dim) are widened whole. Widening one head's slice
// of eight rows at a time walked each position's row in strides and left the step waiting on those loads
// (alternated in one process: a 32-sequence decode step 53.5 -> 49.5 ms, one sequence 7.50 -> 7.02 ms).
// Longer rows are widened a head at a time, so that the widened block stays in L1.
constexpr int64_t kMaxWideRow = 512;

// dots[l][j] = q[l] . k_row[j] for L <= 3 query vectors and a block's eight rows, each exactly as a one-vector
// loop computes it (one FMA chain over d, eight lanes at a time); the vectors share each loaded K vector,
// four positions at a time (12 accumulators, the L query vectors and one K vector: AVX2's 16 registers).
template <int L>
inline void block_dots(const float* const* q, const float* const* k_row, int64_t D, __m256 (*dots)[8]) {
  static_assert(L <= 3, "AVX2's 16 registers");
  for (int first = 0; first < 8; first += 4) {
    __m256 acc[L][4];
    for (int l = 0; l < L; ++l)
      for (int j = 0; j < 4; ++j) acc[l][j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      __m256 qd[L];
      for (int l = 0; l < L; ++l) qd[l] = _mm256_loadu_ps(q[l] + d);
      for (int j = 0; j < 4; ++j) {
        const __m256 k = _mm256_loadu_ps(k_row[first + j] + d);
        for (int l = 0; l < L; ++l) acc[l][j] = _mm256_fmadd_ps(qd[l], k, acc[l][j]);
      }
    }
    for (int l = 0; l < L; ++l)
      for (int j = 0; j < 4; ++j) dots[l][first + j] = acc[l][j];
  }
}

// For L (query token, query head) pairs of one KV head: acc[l][d0, d0 + 8V) = acc * c[l] + sum_j p[l][j] *
// v_row[j][d0, d0 + 8V) over a block's eight positions (p = 0 past its end), each pair's FMA chains in
// position order whatever else shares the call; each loaded V vector serves every pair (3 x 4 accumulators,
// three broadcasts and the vector: AVX2's 16 registers).
template <int L, int V>
inline void accumulate_lanes(float* const* acc, const float* c, const float (*p)[8], const float* const* v_row,
                             int64_t d0) {
  static_assert(L <= 3 && V <= 4, "AVX2's 16 registers");
  __m256 o[L][V];
  for (int l = 0; l < L; ++l)
    for (int v = 0; v < V; ++v) o[l][v] = _mm256_mul_ps(_mm256_loadu_ps(acc[l] + d0 + 8 * v), _mm256_set1_ps(c[l]));
  for (int j = 0; j < 8; ++j) {
    __m256 pj[L];
    for (int l = 0; l < L; ++l) pj[l] = _mm256_set1_ps(p[l][j]);
    for (int v = 0; v < V; ++v) {
      const __m256 value = _mm256_loadu_ps(v_row[j] + d0 + 8 * v);
      for (int l = 0; l < L; ++l) o[l][v] = _mm256_fmadd_ps(pj[l], value, o[l][v]);
    }
  }
  for (int l = 0; l < L; ++l)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(acc[l] + d0 + 8 * v, o[l][v]);
}

// One (query token, query head) pair's view of a block of eight positions: its query, which of the positions
// it sees, and its running softmax for that head.
struct AttentionLane {
  const float* q;
  __m256 valid;
  SoftmaxState* state;
  int64_t head;
};

// A block's online-softmax update for L pairs at once, each pair's arithmetic that of one pair alone (the
// dots, the scores' maximum, the exponentials, the value sums in the same order): side by side, the pairs'
// dependency chains (reductions, exp, the accumulators' FMA chains) overlap instead of queueing, which is
// what one pair at a time left a prefill's attention waiting on.
template <int L>
void attend_lanes(const AttentionShape& a, const AttentionLane* lanes, const float* const* k_row,
                  const float* const* v_row) {
  const int64_t D = a.head_dim;
  const float* q[L];
  for (int l = 0; l < L; ++l) q[l] = lanes[l].q;
  __m256 dots[L][8];
  for (int l = 0; l < L; l += 3) {  // dots three pairs at a time
    const int n = std::min(3, L - l);
    if (n == 3) block_dots<3>(q + l, k_row, D, dots + l);
    if (n == 2) block_dots<2>(q + l, k_row, D, dots + l);
    if (n == 1) block_dots<1>(q + l, k_row, D, dots + l);
  }
  alignas(32) float score[L][8];
  for (int l = 0; l < L; ++l) _mm256_store_ps(score[l], _mm256_mul_ps(hsum8(dots[l]), _mm256_set1_ps(a.sm_scale)));
  if (a.soft_cap > 0.f)
    for (int l = 0; l < L; ++l)
      for (int j = 0; j < 8; ++j) score[l][j] = a.soft_cap * std::tanh(score[l][j] / a.soft_cap);
  __m256 s[L], p[L];
  float m_new[L], correction[L];
  for (int l = 0; l < L; ++l) {
    s[l] = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_load_ps(score[l]), lanes[l].valid);
    m_new[l] = std::max(lanes[l].state->m[lanes[l].head], hmax(s[l]));
  }
  for (int l = 0; l < L; ++l)
    correction[l] = std::exp(lanes[l].state->m[lanes[l].head] - m_new[l]);  // 0 on the first block (m = -inf)
  for (int l = 0; l < L; ++l)
    p[l] = _mm256_and_ps(exp_nonpositive(_mm256_sub_ps(s[l], _mm256_set1_ps(m_new[l]))), lanes[l].valid);
  for (int l = 0; l < L; ++l) {
    SoftmaxState& state = *lanes[l].state;
    const int64_t i = lanes[l].head;
    state.l[i] = state.l[i] * correction[l] + hsum(p[l]);
    state.m[i] = m_new[l];
    _mm256_store_ps(score[l], p[l]);
  }
  float* acc[L];
  for (int l = 0; l < L; ++l) acc[l] = lanes[l].state->acc + lanes[l].head * D;
  for (int l = 0; l < L; l += 3) {  // values three pairs at a time
    const int n = std::min(3, L - l);
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
      if (n == 3) accumulate_lanes<3, 4>(acc + l, correction + l, score + l, v_row, d);
      if (n == 2) accumulate_lanes<2, 4>(acc + l, correction + l, score + l, v_row, d);
      if (n == 1) accumulate_lanes<1, 4>(acc + l, correction + l, score + l, v_row, d);
    }
    for (; d < D; d += 8) {
      if (n == 3) accumulate_lanes<3, 1>(acc + l, correction + l, score + l, v_row, d);
      if (n == 2) accumulate_lanes<2, 1>(acc + l, correction + l, score + l, v_row, d);
      if (n == 1) accumulate_lanes<1, 1>(acc + l, correction + l, score + l, v_row, d);
    }
  }
}

// (Query token, query head) pairs taken together by attend_lanes: two tokens' three query heads for a
// model with three per KV head. Alternated in one process against one pair at a time (a 512-token prompt's
// attention over 30 layers, min of 30): 126.6 -> 101.5 ms, bit for bit the same outputs.
constexpr int kLanes = 6;

// Rows are prefetched this many positions ahead: the pages are scattered, and a block of eight positions
// computes in less time than a miss to memory takes.
constexpr int64_t kPrefetchAhead = 16;

// Query tokens t < count (q rows token_stride apart) of one sequence, each over its own positions
// [lo[t], hi[t]), all heads. Token t's positions from first[t] on go to states[t][0], from first[t] + chunk[t]
// on to states[t][1], and so on (its parts, see PartLayout). A position's rows of all KV heads are adjacent in
// the cache, so taking the heads together reads whole runs of cache lines; and a block of eight positions'
// rows, once loaded, serves every token of the call (a prefill chunk's block of queries) while it is in L1.
template <typename Page>
void attend_tokens(const AttentionShape& a, const float* q_first, int64_t token_stride, int64_t count,
                   const int64_t* lo, const int64_t* hi, const int64_t* first, const int64_t* chunk,
                   const Page* k_pages, const Page* v_pages, const int32_t* pages, SoftmaxState* const* states) {
  const int64_t G = a.group, D = a.head_dim, row = a.num_kv_heads * D;
  int64_t begin = INT64_MAX, end = 0;
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t k = 0; k < part_count(first[t], chunk[t], hi[t]); ++k) states[t][k].reset(a.num_heads, D);
    if (lo[t] < hi[t]) {
      begin = std::min(begin, lo[t]);
      end = std::max(end, hi[t]);
    }
  }
  if (begin >= end) return;  // no token sees any position
  begin = begin / 8 * 8;  // blocks start at multiples of 8 whatever tokens share the call
  auto slot_offset = [&](int64_t p) {
    return (static_cast<int64_t>(pages[p / a.page_size]) * a.page_size + p % a.page_size) * row;
  };
  auto prefetch = [&](int64_t p) {
    const int64_t base = slot_offset(p);
    for (int64_t d = 0; d < row; d += 64 / sizeof(Page)) {  // 64-byte lines
      _mm_prefetch(reinterpret_cast<const char*>(k_pages + base + d), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v_pages + base + d), _MM_HINT_T0);
    }
  };
  for (int64_t p = begin; p < std::min(end, begin + kPrefetchAhead); ++p) prefetch(p);
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t p0 = begin; p0 < end; p0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, end - p0));
    for (int64_t p = p0 + kPrefetchAhead; p < std::min(end, p0 + kPrefetchAhead + 8); ++p) prefetch(p);
    int64_t offset[8];  // a short last block repeats its last row; the tokens' masks leave the copies out
    for (int j = 0; j < 8; ++j) offset[j] = slot_offset(p0 + std::min(j, n - 1));
    const __m256 position = _mm256_add_ps(lane, _mm256_set1_ps(static_cast<float>(p0)));
    // A bfloat16 cache's rows are widened to float32 once, not once per query head and token that reads them:
    // the block's whole rows (all KV heads) at once where they fit, each position's row front to back.
    alignas(32) float k_block[8 * kMaxWideRow], v_block[8 * kMaxWideRow];
    const bool whole_rows = !std::is_same_v<Page, float> && row <= kMaxWideRow;
    if constexpr (!std::is_same_v<Page, float>) {
      if (whole_rows)
        for (int j = 0; j < n; ++j)
          for (int64_t d = 0; d < row; d += 8) {
            _mm256_store_ps(k_block + j * row + d, widen8(k_pages + offset[j] + d));
            _mm256_store_ps(v_block + j * row + d, widen8(v_pages + offset[j] + d));
          }
    }
    for (int64_t h = 0; h < a.num_kv_heads; ++h) {
      // The block's rows of KV head h as float32.
      const float* k_row[8];
      const float* v_row[8];
      alignas(32) float k_wide[8 * kMaxHeadDim], v_wide[8 * kMaxHeadDim];
      for (int j = 0; j < 8; ++j) {
        const Page* k = k_pages + offset[j] + h * D;
        const Page* v = v_pages + offset[j] + h * D;
        if constexpr (std::is_same_v<Page, float>) {
          k_row[j] = k;
          v_row[j] = v;
        } else if (j >= n) {  // a repeated last row
          k_row[j] = k_row[n - 1];
          v_row[j] = v_row[n - 1];
        } else if (whole_rows) {
          k_row[j] = k_block + j * row + h * D;
          v_row[j] = v_block + j * row + h * D;
        } else {
          for (int64_t d = 0; d < D; d += 8) {
            _mm256_store_ps(k_wide + j * D + d, widen8(k + d));
            _mm256_store_ps(v_wide + j * D + d, widen8(v + d));
          }
          k_row[j] = k_wide + j * D;
          v_row[j] = v_wide + j * D;
        }
      }
      AttentionLane lanes[kLanes];
      int count_lanes = 0;
      static_assert(kLanes == 6, "one case per lane count below");
      auto flush = [&] {
        switch (count_lanes) {
          case 6: attend_lanes<6>(a, lanes, k_row, v_row); break;
          case 5: attend_lanes<5>(a, lanes, k_row, v_row); break;
          case 4: attend_lanes<4>(a, lanes, k_row, v_row); break;
          case 3: attend_lanes<3>(a, lanes, k_row, v_row); break;
          case 2: attend_lanes<2>(a, lanes, k_row, v_row); break;
          case 1: attend_lanes<1>(a, lanes, k_row, v_row); break;
        }
        count_lanes = 0;
      };
      for (int64_t t = 0; t < count; ++t) {
        if (hi[t] <= p0 || lo[t] >= p0 + n) continue;  // none of this token's positions
        const __m256 valid = _mm256_and_ps(
            _mm256_cmp_ps(position, _mm256_set1_ps(static_cast<float>(lo[t])), _CMP_GE_OQ),
            _mm256_cmp_ps(position, _mm256_set1_ps(static_cast<float>(hi[t])), _CMP_LT_OQ));
        SoftmaxState* state = &states[t][(p0 - first[t]) / chunk[t]];
        for (int64_t g = 0; g < G; ++g) {
          const int64_t i = h * G + g;  // the query head
          lanes[count_lanes++] = {q_first + t * token_stride + i * D, valid, state, i};
          if (count_lanes == kLanes) flush();
        }
      }
      flush();
    }
  }
}

// Merges the states of consecutive position ranges and writes the normalized outputs of every head.
void write_merged(const AttentionShape& a, const SoftmaxState* parts, int64_t count, float* out_token) {
  const int64_t D = a.head_dim;
  for (int64_t i = 0; i < a.num_heads; ++i) {
    float m = -INFINITY, l = 0.f;
    for (int64_t k = 0; k < count; ++k) m = std::max(m, parts[k].m[i]);
    float* o = out_token + i * D;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
    for (int64_t k = 0; k < count; ++k) {
      if (parts[k].l[i] == 0.f) continue;  // an empty range (m = -inf)
      const float w = count == 1 ? 1.f : std::exp(parts[k].m[i] - m);
      l += parts[k].l[i] * w;
      const float* acc = parts[k].acc + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] += acc[d] * w;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

constexpr int64_t kMaxQueryBlock = 16;  // the most query tokens of a prefill chunk an attend call takes

// The cache's pages hold Page values (float32, bfloat16 bits, or a float8 tag type); queries and outputs
// float32.
template <typename Page>
ffi::Error AttendPages(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                       ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                       ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs, float sm_scale,
                       int64_t sliding_window, float soft_cap, bool tiles, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k_pages.dimensions(), pd = page_indices.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || pd.size() != 2)
    return ffi::Error::InvalidArgument("ragged_paged_attention: expected q[T, H, D], pages[P, S, Hkv, D]");
  AttentionShape a{qd[0], qd[1], qd[2], kd[1], kd[2], pd[1], qd[1] / kd[2], sm_scale, soft_cap, sliding_window};
  if (a.head_dim % 8 || a.head_dim > kMaxHeadDim || a.num_heads % a.num_kv_heads)
    return ffi::Error::InvalidArgument("ragged_paged_attention: unsupported head shape");
  const int32_t* lens = kv_lens.typed_data();
  const int32_t* table = page_indices.typed_data();
  const int32_t* cu = cu_q_lens.typed_data();
  const int64_t live_seqs = std::min<int64_t>(num_seqs.typed_data()[0], pd[0]);
  float* o = out->typed_data();
  std::memset(o, 0, a.num_tokens * a.num_heads * a.head_dim * sizeof(float));  // padded tokens stay zero
  const float* qp = q.typed_data();
  const Page* kp = static_cast<const Page*>(k_pages.untyped_data());
  const Page* vp = static_cast<const Page*>(v_pages.untyped_data());
  // (first token, query length, visible length) of sequence s
  auto sequence = [&](int64_t s, int64_t& first, int64_t& q_len, int64_t& kv_len) {
    first = cu[s];
    q_len = std::min<int64_t>(cu[s + 1], a.num_tokens) - first;
    // Never read past the sequence's page-table row, whatever kv_lens says (XLA's path clamps its gathers).
    kv_len = std::min<int64_t>(lens[s], a.pages_per_seq * a.page_size);
  };
  const int64_t token_stride = a.num_heads * a.head_dim;
  // The AVX-512 kernel where it runs (float32 or bfloat16 pages, head_dim a multiple of 32), else AVX2's.
  // Either gives a token the same sums in any batch; the two differ in summation order.
  constexpr bool kWideable = std::is_same_v<Page, uint16_t> || std::is_same_v<Page, float>;
  const bool wide = kWideable && a.head_dim % 32 == 0 && has_avx512_attention();
  a.tiles = tiles && wide && std::is_same_v<Page, uint16_t> && has_amx_attention();
  const int64_t align = wide ? kWideBlock : 8;
  // A query block's tokens share each block of loaded rows: 16 in tiles (48 lanes of a 3-head group fill three
  // tiles; a prompt's attention 10-15% faster than with 8), 8 otherwise (the float kernels measured even).
  const int64_t query_block = a.tiles ? kMaxQueryBlock : 8;
  auto attend = [&](const float* q_first, int64_t count, const int64_t* lo, const int64_t* hi,
                    const int64_t* part_first, const int64_t* chunk, const int32_t* pages,
                    SoftmaxState* const* token_states) {
    if constexpr (kWideable)
      if (wide)
        return attend_tokens_avx512(a, q_first, token_stride, count, lo, hi, part_first, chunk, kp, vp, pages,
                                    token_states);
    attend_tokens(a, q_first, token_stride, count, lo, hi, part_first, chunk, kp, vp, pages, token_states);
  };
  constexpr int64_t kWhole = INT64_MAX / 4;  // a part's chunk when the call covers just that part
  // Where to run the work is the only thing the step's size decides, in units claimed by the threads in turn:
  // a prefill chunk's query blocks are a unit each (its latest, longest-reaching block first, so that the last
  // units claimed are short ones). With fewer sequences than twice the threads, a sequence of one query block
  // (a decoding token, with its draft tokens if any) is split by its tokens' parts instead, a unit each
  // (flash-decoding), so that one sequence still keeps every thread busy. (Four units a prefill chunk with
  // its blocks dealt round them measured the same to ~10% slower on a 128-token prompt.)
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool split = live_seqs < 2 * threads;
  std::vector<int64_t> unit_start(live_seqs + 1, 0), state_start(live_seqs + 1, 0);
  for (int64_t s = 0; s < live_seqs; ++s) {
    int64_t first, q_len, kv_len;
    sequence(s, first, q_len, kv_len);
    const int64_t blocks = (std::max<int64_t>(q_len, 0) + query_block - 1) / query_block;
    const bool by_parts = split && blocks == 1;
    unit_start[s + 1] = unit_start[s] + (by_parts ? kMaxParts : blocks);
    state_start[s + 1] = state_start[s] + (by_parts ? q_len * kMaxParts : 0);
  }
  std::vector<SoftmaxState> states(state_start[live_seqs]);  // split sequences' tokens' parts
  // A sequence's query token i (of q_len, kv_len positions visible): the positions it sees [lo, hi), its parts.
  auto token_view = [&](int64_t kv_len, int64_t q_len, int64_t i, int64_t& lo, int64_t& hi) {
    const int64_t pos = kv_len - q_len + i;  // this query token's position: it sees [lo, pos]
    hi = std::max<int64_t>(pos + 1, 0);
    lo = a.sliding_window > 0 ? std::clamp<int64_t>(pos - a.sliding_window + 1, 0, hi) : 0;
    return part_layout(lo, hi, align);
  };
  parallel_blocks(pool, unit_start[live_seqs], [&](int64_t unit) {
    const int64_t s = std::upper_bound(unit_start.begin(), unit_start.end(), unit) - unit_start.begin() - 1;
    const int64_t index = unit - unit_start[s];
    int64_t first, q_len, kv_len;
    sequence(s, first, q_len, kv_len);
    const int32_t* pages = table + s * a.pages_per_seq;
    const float* q_first = qp + first * token_stride;
    int64_t lo[kMaxQueryBlock], hi[kMaxQueryBlock], part_first[kMaxQueryBlock], chunk[kMaxQueryBlock],
        parts[kMaxQueryBlock];
    SoftmaxState* token_states[kMaxQueryBlock];
    if (state_start[s + 1] > state_start[s]) {  // this unit takes part `index` of each token that has one
      for (int64_t t = 0; t < q_len; ++t) {
        const PartLayout layout = token_view(kv_len, q_len, t, lo[t], hi[t]);
        part_first[t] = layout.first + index * layout.chunk;
        chunk[t] = kWhole;
        if (index < layout.count) {
          lo[t] = std::max(lo[t], part_first[t]);
          hi[t] = std::min(hi[t], part_first[t] + layout.chunk);
        } else {
          lo[t] = hi[t];  // none
        }
        token_states[t] = &states[state_start[s] + t * kMaxParts + index];
      }
      attend(q_first, q_len, lo, hi, part_first, chunk, pages, token_states);
      return;
    }
    // Query block `index` from the end: up to query_block tokens (a prefill chunk's, or one decoding token).
    const int64_t i0 = ((q_len + query_block - 1) / query_block - 1 - index) * query_block;
    const int64_t count = std::min(query_block, q_len - i0);
    SoftmaxState block_states[kMaxQueryBlock * kMaxParts];
    for (int64_t t = 0; t < count; ++t) {
      const PartLayout layout = token_view(kv_len, q_len, i0 + t, lo[t], hi[t]);
      part_first[t] = layout.first;
      chunk[t] = layout.chunk;
      parts[t] = layout.count;
      token_states[t] = block_states + t * kMaxParts;
    }
    attend(q_first + i0 * token_stride, count, lo, hi, part_first, chunk, pages, token_states);
    for (int64_t t = 0; t < count; ++t)
      write_merged(a, token_states[t], parts[t], o + (first + i0 + t) * token_stride);
  });
  for (int64_t s = 0; s < live_seqs; ++s) {
    if (state_start[s + 1] == state_start[s]) continue;
    int64_t first, q_len, kv_len, lo, hi;
    sequence(s, first, q_len, kv_len);
    for (int64_t t = 0; t < q_len; ++t)
      write_merged(a, &states[state_start[s] + t * kMaxParts], token_view(kv_len, q_len, t, lo, hi).count,
                   o + (first + t) * token_stride);
  }
  return ffi::Error::Success();
}

ffi::Error RaggedPagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                                ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> kv_lens,
                                ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> cu_q_lens,
                                ffi::Buffer<ffi::S32> num_seqs, float sm_scale, int64_t sliding_window,
                                float soft_cap, int64_t tiles, ffi::ResultBuffer<ffi::F32> out) {
  if (k_pages.element_type() != v_pages.element_type())
    return ffi::Error::InvalidArgument("ragged_paged_attention: K and V pages of different dtypes");
  auto attend = [&](auto page) {  // the kernel over pages of page's type
    return AttendPages<decltype(page)>(pool, q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                       sm_scale, sliding_window, soft_cap, tiles != 0, out);
  };
  switch (k_pages.element_type()) {
    case ffi::DataType::F32: return attend(float{});
    case ffi::DataType::BF16: return attend(uint16_t{});
    case ffi::DataType::F8E4M3FN: return attend(Fp8E4M3{});
    case ffi::DataType::F8E5M2: return attend(Fp8E5M2{});
    default:
      return ffi::Error::InvalidArgument("ragged_paged_attention: pages must be float32, bfloat16 or float8");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_ragged_paged_attention, RaggedPagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("tiles")
                                  .Ret<ffi::Buffer<ffi::F32>>());
