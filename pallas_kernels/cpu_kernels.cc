// CPU kernels for x86-64 (AVX2 + FMA) as XLA FFI custom calls: small-batch projections with bf16 or int8
// weights, and ragged paged attention over a float32, bfloat16 or float8 KV cache (further down).
//
// Projections. XLA CPU's bf16 x bf16 -> f32 dot streams a decode step's weights at ~6 GB/s on this class of
// machine, a quarter of its memory bandwidth, and decode at small batch is nothing but that stream. These
// kernels read each weight once per call, widen it to f32 in registers (exact for bf16 and int8) and
// accumulate in f32, so the results equal XLA's up to summation order. Work is split in blocks over XLA's own
// intra-op thread pool; the calling thread takes blocks too, so a busy pool never stalls a call.
//
//   jaxserve_bf16_matmul_kn: y[M, N] = x[M, K] . w[K, N]              (nnx.Linear's kernel layout)
//   jaxserve_int8_matmul_kn: y[M, N] = (x[M, K] . q[K, N]) * scale[N]   (int8 weights, per-column scale)
//   jaxserve_bf16_matmul_nk: y[M, N] = x[M, K] . w[N, K]^T            (a tied embedding used as the LM head)
//   jaxserve_ragged_paged_attention: see pallas_kernels/reference.py for the semantics (float32, bfloat16,
//   float8_e4m3fn or float8_e5m2 pages)
//   jaxserve_write_rows: pages[slots[t]] = rows[t], in place (a float8 cache's KV write)

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "cpu_parallel.h"

namespace {

using jaxserve::exp_nonpositive;
using jaxserve::hmax;
using jaxserve::parallel_blocks;

// 8 bf16 -> 8 f32: the bf16 bits are the high half of the f32 bits.
inline __m256 widen8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void widen_all(const uint16_t* src, float* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = bf16_to_f32(src[i]);
}

// 8 int8 -> 8 f32 (exact).
inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One-byte float8 KV values, a tag type per format so that widen8 picks the conversion.
struct Fp8E4M3 {
  uint8_t bits;
};
struct Fp8E5M2 {
  uint8_t bits;
};

// 8 float8_e5m2 -> 8 f32: an e5m2 byte is the high byte of the float16 of the same value, which F16C widens
// exactly (subnormals included).
inline __m256 widen8(const Fp8E5M2* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), bytes));
}

// 8 float8_e4m3fn -> 8 f32: the byte S EEEE MMM placed as the float16 S 0EEEE MMM0000000 is its value times
// 2^-8 (exponent bias 15 instead of 7; subnormals line up too), then scaled back exactly. The NaN bytes 0x7f /
// 0xff would read as +-480; the cache never holds them (writes saturate at 448).
inline __m256 widen8(const Fp8E4M3* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i high = _mm_unpacklo_epi8(_mm_setzero_si128(), bytes);  // each byte << 8
  const __m128i half = _mm_and_si128(_mm_srai_epi16(high, 1), _mm_set1_epi16(static_cast<int16_t>(0xBFFF)));
  return _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.f));
}

inline float to_f32(uint16_t v) { return bf16_to_f32(v); }
inline float to_f32(int8_t v) { return static_cast<float>(v); }

// acc[m0:m0+MT, :] += x[m0:m0+MT, k0:k1] . w[k0:k1, :], walking the weight rows in memory order: one
// sequential stream per thread is what this machine's prefetchers stream fastest (a column-tiled walk, a
// strided stream per tile, ran at a third of the speed).
template <int MT, typename W>
void kn_rows(const float* x, const W* w, float* acc, int64_t m0, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    __m256 b[MT];
    for (int m = 0; m < MT; ++m) b[m] = _mm256_broadcast_ss(x + (m0 + m) * K + k);
    const W* row = w + k * N;
    int64_t c = 0;
    for (; c + 16 <= N; c += 16) {
      __m256 w0 = widen8(row + c), w1 = widen8(row + c + 8);
      for (int m = 0; m < MT; ++m) {
        float* ym = acc + (m0 + m) * N + c;
        _mm256_storeu_ps(ym, _mm256_fmadd_ps(b[m], w0, _mm256_loadu_ps(ym)));
        _mm256_storeu_ps(ym + 8, _mm256_fmadd_ps(b[m], w1, _mm256_loadu_ps(ym + 8)));
      }
    }
    for (; c < N; ++c)
      for (int m = 0; m < MT; ++m) acc[(m0 + m) * N + c] += x[(m0 + m) * K + k] * to_f32(row[c]);
  }
}

// y = x . w for w[K, N] (`scale`, when given, multiplies column n of the result: int8 weights).
template <typename W>
void matmul_kn(ffi::ThreadPool& pool, const uint16_t* x_bf16, const W* w, const float* scale, float* y, int64_t M,
               int64_t K, int64_t N) {
  std::vector<float> xf(M * K);
  widen_all(x_bf16, xf.data(), M * K);
  // One contiguous range of weight rows per thread, each into its own partial sum, added up at the end.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), K / 64));
  std::vector<float> partial(parts * M * N, 0.f);
  parallel_blocks(pool, parts, [&](int64_t p) {
    const int64_t k0 = K * p / parts, k1 = K * (p + 1) / parts;
    float* acc = partial.data() + p * M * N;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) kn_rows<4>(xf.data(), w, acc, m, K, N, k0, k1);
    if (M - m == 3) kn_rows<3>(xf.data(), w, acc, m, K, N, k0, k1);
    if (M - m == 2) kn_rows<2>(xf.data(), w, acc, m, K, N, k0, k1);
    if (M - m == 1) kn_rows<1>(xf.data(), w, acc, m, K, N, k0, k1);
  });
  std::memcpy(y, partial.data(), M * N * sizeof(float));
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t i = 0; i < M * N; ++i) y[i] += partial[p * M * N + i];
  if (scale)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] *= scale[n];
}

ffi::Error MatmulKN(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("bf16_matmul_kn: expected x[M, K] and w[K, N]");
  matmul_kn(pool, reinterpret_cast<const uint16_t*>(x.typed_data()), reinterpret_cast<const uint16_t*>(w.typed_data()),
            nullptr, y->typed_data(), xd[0], xd[1], wd[1]);
  return ffi::Error::Success();
}

ffi::Error Int8MatmulKN(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || scale.element_count() != wd[1])
    return ffi::Error::InvalidArgument("int8_matmul_kn: expected x[M, K], w[K, N] and scale[N]");
  matmul_kn(pool, reinterpret_cast<const uint16_t*>(x.typed_data()), w.typed_data(), scale.typed_data(),
            y->typed_data(), xd[0], xd[1], wd[1]);
  return ffi::Error::Success();
}

// y[:, n] = x . w[n, :] for one weight row: a single sequential stream, re-read from L1 for each of x's rows.
void nk_row(const float* x, const uint16_t* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n) {
  const uint16_t* r = w + n * K;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), widen8(r + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 8), widen8(r + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 16), widen8(r + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 24), widen8(r + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), widen8(r + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) s += xm[k] * bf16_to_f32(r[k]);
    y[m * N + n] = s;
  }
}

ffi::Error MatmulNK(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("bf16_matmul_nk: expected x[M, K] and w[N, K]");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  std::vector<float> xf(M * K);
  widen_all(reinterpret_cast<const uint16_t*>(x.typed_data()), xf.data(), M * K);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  const int64_t rows_per_block = 256;
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  parallel_blocks(pool, blocks, [&](int64_t b) {
    for (int64_t n = b * rows_per_block; n < std::min(N, (b + 1) * rows_per_block); ++n)
      nk_row(xf.data(), wp, yp, M, K, N, n);
  });
  return ffi::Error::Success();
}

// ---- Ragged paged attention over a paged KV cache (float32, bfloat16 or float8) ----------------------------
//
// XLA's path gathers each chunk of pages into a fresh buffer, transposes it head-major and masks whole chunks;
// on the CPU that copying is most of a step's attention. Here each sequence walks its own pages in place with
// an online softmax, eight positions at a time, all heads together (a position's rows of all KV heads are
// adjacent), prefetching rows ahead (the pages are scattered). A prefill chunk's query tokens go in blocks
// that share each loaded block of rows; a token's positions are cut into parts (PartLayout), merged after. A
// bfloat16 or float8 cache is widened to float32 as it is read (a half or a quarter of the bytes of a step
// that is mostly reading them). Semantics are pallas_kernels/reference.py's.

// Eight vectors' horizontal sums as one vector (lane j = sum of v[j]): a tree of hadds instead of eight
// separate reductions.
inline __m256 hsum8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

struct AttentionShape {
  int64_t num_tokens, num_heads, head_dim, page_size, num_kv_heads, pages_per_seq, group;
  float sm_scale, soft_cap;
  int64_t sliding_window;
};

constexpr int kMaxHeadDim = 256;

// A block's rows of up to this many values (KV heads x head_dim) are widened whole. Widening one head's slice
// of eight rows at a time walked each position's row in strides and left the step waiting on those loads
// (alternated in one process: a 32-sequence decode step 53.5 -> 49.5 ms, one sequence 7.50 -> 7.02 ms).
// Longer rows are widened a head at a time, so that the widened block stays in L1.
constexpr int64_t kMaxWideRow = 512;

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

// Parts of `chunk` positions from `first` up to `hi` (at least one).
inline int64_t part_count(int64_t first, int64_t chunk, int64_t hi) {
  return std::max<int64_t>(1, (hi - first + chunk - 1) / chunk);
}

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

// A query token's visible positions [lo, hi) are cut into up to kMaxParts parts (at least kMinPartPositions
// each) at multiples of 8 that depend on lo and hi alone, each part an online softmax of its own, merged in
// order after. A decoding token's parts run on threads of their own (flash-decoding); a prefill token's run in
// turn as its block of queries walks the positions. Either way, and in any batch, a token gets the same sums:
// greedy outputs do not depend on what else shares a step (an earlier split chosen by the number of sequences
// did).
constexpr int64_t kMaxParts = 4;
constexpr int64_t kMinPartPositions = 64;
constexpr int64_t kQueryBlock = 8;  // a prefill chunk's query tokens that share each block of loaded rows

struct PartLayout {
  int64_t first, chunk, count;  // part k: [first + k * chunk, first + (k + 1) * chunk) within [lo, hi)
};

inline PartLayout part_layout(int64_t lo, int64_t hi) {
  const int64_t first = lo / 8 * 8;
  if (hi <= lo) return {first, 8, 1};
  const int64_t parts = std::clamp<int64_t>((hi - lo) / kMinPartPositions, 1, kMaxParts);
  const int64_t chunk = ((hi - first + parts - 1) / parts + 7) / 8 * 8;
  return {first, chunk, part_count(first, chunk, hi)};
}

// The cache's pages hold Page values (float32, bfloat16 bits, or a float8 tag type); queries and outputs
// float32.
template <typename Page>
ffi::Error AttendPages(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                       ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                       ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs, float sm_scale,
                       int64_t sliding_window, float soft_cap, ffi::ResultBuffer<ffi::F32> out) {
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
  // (first token, query length, visible length, first visible position) of sequence s
  auto sequence = [&](int64_t s, int64_t& first, int64_t& q_len, int64_t& kv_len, int64_t& from) {
    first = cu[s];
    q_len = std::min<int64_t>(cu[s + 1], a.num_tokens) - first;
    // Never read past the sequence's page-table row, whatever kv_lens says (XLA's path clamps its gathers).
    kv_len = std::min<int64_t>(lens[s], a.pages_per_seq * a.page_size);
    from = a.sliding_window > 0 ? std::max<int64_t>(0, kv_len - a.sliding_window) : 0;  // a decode token's
  };
  const int64_t token_stride = a.num_heads * a.head_dim;
  constexpr int64_t kWhole = INT64_MAX / 4;  // a part's chunk when the call covers just that part
  // Where to run the parts is the only thing the step's size decides: with fewer sequences than twice the
  // threads, each sequence gets kMaxParts units (a decoding token's parts on threads of their own, a prefill
  // chunk's query blocks dealt round them); with more, one unit walks all of a sequence's parts in turn.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t units = live_seqs < 2 * threads ? kMaxParts : 1;
  std::vector<SoftmaxState> states(units > 1 ? live_seqs * units : 0);  // decoding tokens' parts, when split
  parallel_blocks(pool, live_seqs * units, [&](int64_t unit) {  // unit `part` of sequence s
    const int64_t s = unit / units, part = unit % units;
    int64_t first, q_len, kv_len, from;
    sequence(s, first, q_len, kv_len, from);
    const int32_t* pages = table + s * a.pages_per_seq;
    const float* q_first = qp + first * token_stride;
    if (q_len == 1 && units > 1) {  // this unit takes the decoding token's part `part`, if it has one
      const PartLayout layout = part_layout(from, kv_len);
      if (part >= layout.count) return;
      const int64_t part_first = layout.first + part * layout.chunk;
      const int64_t lo = std::max(from, part_first), hi = std::min(kv_len, part_first + layout.chunk);
      SoftmaxState* state = &states[unit];
      attend_tokens(a, q_first, token_stride, 1, &lo, &hi, &part_first, &kWhole, kp, vp, pages, &state);
      return;
    }
    // The query tokens (a prefill chunk's, or one decoding token) in blocks of kQueryBlock, the blocks dealt
    // round the units (later tokens see more positions, so every unit gets early and late blocks).
    SoftmaxState block_states[kQueryBlock * kMaxParts];
    for (int64_t i0 = part * kQueryBlock; i0 < q_len; i0 += units * kQueryBlock) {
      const int64_t count = std::min(kQueryBlock, q_len - i0);
      int64_t lo[kQueryBlock], hi[kQueryBlock], part_first[kQueryBlock], chunk[kQueryBlock], parts[kQueryBlock];
      SoftmaxState* token_states[kQueryBlock];
      for (int64_t t = 0; t < count; ++t) {
        const int64_t pos = kv_len - q_len + i0 + t;  // this query token's position: it sees [lo, pos]
        hi[t] = std::max<int64_t>(pos + 1, 0);
        lo[t] = a.sliding_window > 0 ? std::clamp<int64_t>(pos - a.sliding_window + 1, 0, hi[t]) : 0;
        const PartLayout layout = part_layout(lo[t], hi[t]);
        part_first[t] = layout.first;
        chunk[t] = layout.chunk;
        parts[t] = layout.count;
        token_states[t] = block_states + t * kMaxParts;
      }
      attend_tokens(a, q_first + i0 * token_stride, token_stride, count, lo, hi, part_first, chunk, kp, vp, pages,
                    token_states);
      for (int64_t t = 0; t < count; ++t)
        write_merged(a, token_states[t], parts[t], o + (first + i0 + t) * token_stride);
    }
  });
  for (int64_t s = 0; units > 1 && s < live_seqs; ++s) {
    int64_t first, q_len, kv_len, from;
    sequence(s, first, q_len, kv_len, from);
    if (q_len == 1) write_merged(a, &states[s * units], part_layout(from, kv_len).count, o + first * token_stride);
  }
  return ffi::Error::Success();
}

ffi::Error RaggedPagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                                ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> kv_lens,
                                ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> cu_q_lens,
                                ffi::Buffer<ffi::S32> num_seqs, float sm_scale, int64_t sliding_window,
                                float soft_cap, ffi::ResultBuffer<ffi::F32> out) {
  if (k_pages.element_type() != v_pages.element_type())
    return ffi::Error::InvalidArgument("ragged_paged_attention: K and V pages of different dtypes");
  auto attend = [&](auto page) {  // the kernel over pages of page's type
    return AttendPages<decltype(page)>(pool, q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                       sm_scale, sliding_window, soft_cap, out);
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

// pages[slots[t]] = rows[t] for every t, in place: `out` is `pages` (aliased). For a float8 cache, whose
// scatter XLA CPU runs by widening the whole cache to float16 and narrowing it back.
ffi::Error WriteRows(ffi::AnyBuffer pages, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> slots,
                     ffi::Result<ffi::AnyBuffer> out) {
  auto pd = pages.dimensions(), rd = rows.dimensions();
  if (pd.size() != 4 || rd.size() != 3 || rd[0] != slots.element_count() || rd[1] != pd[2] || rd[2] != pd[3] ||
      pages.element_type() != rows.element_type())
    return ffi::Error::InvalidArgument("write_rows: expected pages[P, S, H, D], rows[T, H, D], slots[T]");
  const int64_t row_bytes = rows.size_bytes() / std::max<int64_t>(1, rd[0]), num_slots = pd[0] * pd[1];
  auto* dst = static_cast<uint8_t*>(out->untyped_data());
  if (dst != pages.untyped_data()) std::memcpy(dst, pages.untyped_data(), pages.size_bytes());  // not aliased
  const auto* src = static_cast<const uint8_t*>(rows.untyped_data());
  const int32_t* slot = slots.typed_data();
  for (int64_t t = 0; t < rd[0]; ++t) {
    if (slot[t] < 0 || slot[t] >= num_slots) return ffi::Error::InvalidArgument("write_rows: slot out of range");
    std::memcpy(dst + slot[t] * row_bytes, src + t * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_write_rows, WriteRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_bf16_matmul_kn, MatmulKN,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_int8_matmul_kn, Int8MatmulKN,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_bf16_matmul_nk, MatmulNK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

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
                                  .Ret<ffi::Buffer<ffi::F32>>());
