// The sampler's passes over the vocabulary, as XLA FFI calls (XLA's CPU backend sorts for the first two):
//
//   jaxserve_sampling_threshold(scaled f32[S, V], top_k i32[S], top_p f32[S], min_p f32[S], live_rows i32[1])
//     -> threshold f32[S] (the tokens with scaled >= threshold survive all three filters), row_max f32[S]
//   jaxserve_token_logprobs(logits f32[S, V], token_ids i32[S], live_rows i32[1])
//     -> token_logprob f32[S], rank i32[S], top_ids i32[S, K], top_logprobs f32[S, K] (sampler.token_logprobs)
//   jaxserve_log_normalizer(logits f32[S, V], live_rows i32[1]) -> log_total f32[S], first_max i32[S]
//     (log(sum(e^x)) for every sampled token's logprob, and the greedy token)
//
// The threshold is jaxserve/sampler.py's filter_threshold, as defined there: top_k keeps the values down to
// the k-th largest (ties kept); top_p then keeps, of those, the fewest largest values whose probability
// reaches top_p of their mass (ties kept); min_p keeps values within log(min_p) of the row's maximum. XLA's
// CPU top_k is a sort, and a nucleus wider than the sampler's window needed 32 passes of bisection over the
// vocabulary (45 ms a step at 32 rows). Here a row costs two passes: its maximum, then each token's
// e^(x - max) with the tokens within kPruneNats of the maximum set aside; a cut-off is selected among those
// (a weighted quickselect, linear). When they cannot hold it, or are too many (a flat distribution's nucleus,
// a top_k beyond them), a histogram of every token's distance below the maximum finds the one bin the cut-off
// lies in, and the selection runs among that bin's tokens. Masses add up in double; the thresholds are the
// tokens' own values, so they differ from the sampler's reference only where a sum lands within rounding of
// top_p.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "cpu_math.h"
#include "cpu_parallel.h"

namespace {

using jaxserve::exp_nonpositive;
using jaxserve::hmax;
using jaxserve::parallel_blocks;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Tokens set aside per row: those within this many nats of the maximum (e^-12 ~ 6e-6 of its probability),
// up to kMaxPruned of them (past that, selecting among them costs more than the histogram path).
constexpr float kPruneNats = 12.0f;
constexpr int64_t kMaxPruned = 2048;

struct Candidate {
  float x;        // the scaled logit
  float e;        // e^(x - max)
  int32_t index;  // the token
};

// The largest value v among c[0, n) with weight(c[i] : c[i].x >= v) >= target, where weight is 1 per token
// (kByMass false: v is the target-th largest value) or e (mass). c is reordered. Three-way quickselect on x:
// expected linear time. If rounding leaves the whole set short of the target, the smallest value.
template <bool kByMass>
float largest_value_with_weight(Candidate* c, int64_t n, double target) {
  float smallest = kNegInf;
  while (n > 0) {
    const float a = c[0].x, b = c[n / 2].x, d = c[n - 1].x;
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), d));  // median of three
    int64_t hi = 0, mid = 0, lo = n;  // [0, hi) > pivot, [hi, mid) == pivot, [lo, n) < pivot
    while (mid < lo) {
      if (c[mid].x > pivot)
        std::swap(c[hi++], c[mid++]);
      else if (c[mid].x < pivot)
        std::swap(c[mid], c[--lo]);
      else
        ++mid;
    }
    double above = 0, equal = 0;
    for (int64_t i = 0; i < hi; ++i) above += kByMass ? c[i].e : 1.0;
    for (int64_t i = hi; i < lo; ++i) equal += kByMass ? c[i].e : 1.0;
    if (above >= target && hi > 0) {
      n = hi;
    } else if (above + equal >= target) {
      return pivot;
    } else {
      target -= above + equal;
      smallest = pivot;
      c += lo;
      n -= lo;
    }
  }
  return smallest;
}

struct RowFilter {
  int64_t top_k;  // 0 = off
  float top_p;    // 1 = off
  float min_p;    // 0 = off
};

// e^(x - max) per lane, 0 for -inf (a masked token has no mass; exp_nonpositive alone would give it e^-87).
inline __m256 token_masses(__m256 x, __m256 max) {
  return _mm256_and_ps(exp_nonpositive(_mm256_sub_ps(x, max)), _mm256_cmp_ps(x, _mm256_set1_ps(kNegInf), _CMP_GT_OQ));
}

// Masses add up in double: a float sum of 49152 terms is off by ~1e-6, a nucleus at top_p 0.999 by a dozen tokens.
inline __m256d add_in_double(__m256d sum, __m256 v) {
  return _mm256_add_pd(sum, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                          _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
}

inline double lanes_total(__m256d sum) {
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, sum);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// Every token's e^(x - max) into e[V]; the tokens with x > floor into `out`, at most kMaxPruned + 8 of them
// (more: `out` holds more than kMaxPruned, incomplete). Returns the sum of every token's e^(x - max).
double masses(const float* x, int64_t V, float max, float floor, float* e, std::vector<Candidate>& out) {
  out.clear();
  const __m256 vmax = _mm256_set1_ps(max), vfloor = _mm256_set1_ps(floor);
  __m256d sum = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 ev = token_masses(v, vmax);
    _mm256_storeu_ps(e + i, ev);
    sum = add_in_double(sum, ev);
    int keep = _mm256_movemask_ps(_mm256_cmp_ps(v, vfloor, _CMP_GT_OQ));
    if (keep && static_cast<int64_t>(out.size()) <= kMaxPruned)
      for (; keep; keep &= keep - 1) {
        const int j = __builtin_ctz(keep);
        out.push_back({x[i + j], e[i + j], static_cast<int32_t>(i + j)});
      }
  }
  double total = lanes_total(sum);
  for (; i < V; ++i) {
    e[i] = x[i] > kNegInf ? std::exp(x[i] - max) : 0.f;
    total += e[i];
    if (x[i] > floor && static_cast<int64_t>(out.size()) <= kMaxPruned)
      out.push_back({x[i], e[i], static_cast<int32_t>(i)});
  }
  return total;
}

// The top_k / top_p cut-off among `c`, the tokens within kPruneNats of the maximum; false when they cannot
// decide it (fewer than k of them, less than the nucleus's mass, or too many of them to have been kept).
bool cutoff_among(std::vector<Candidate>& c, const RowFilter& f, double total, float& threshold) {
  const int64_t n = static_cast<int64_t>(c.size());
  if (n > kMaxPruned) return false;
  float k_threshold = kNegInf;
  if (f.top_k > 0) {
    if (n < f.top_k) return false;
    k_threshold = largest_value_with_weight<false>(c.data(), n, static_cast<double>(f.top_k));
  }
  threshold = k_threshold;
  if (f.top_p >= 1.f) return true;
  // The nucleus is drawn from the top-k tokens' mass (all tokens' when top_k is off).
  int64_t kept = 0;
  double kept_mass = 0;
  for (int64_t i = 0; i < n; ++i)
    if (c[i].x >= k_threshold) {
      kept_mass += c[i].e;
      c[kept++] = c[i];
    }
  const double target = static_cast<double>(f.top_p) * (f.top_k > 0 ? kept_mass : total);
  if (target <= 0) return true;  // no mass to take a share of
  if (kept_mass < target) return false;
  threshold = std::max(k_threshold, largest_value_with_weight<true>(c.data(), kept, target));
  return true;
}

// Every token's distance below the maximum in bins of 1/kBinsPerNat nat out to kBinNats (the last bin holds
// everything further; -inf tokens go to kBins, counted nowhere): counts and masses per bin. Bins only split
// the tokens by value (a bin's tokens all lie below the previous bins'), so a cut-off is found by walking bins
// and then selecting among one bin's tokens alone. For rows whose cut-off the pruned tokens cannot hold: a
// flat distribution's nucleus, a top_k beyond them.
constexpr int kBinsPerNat = 16, kBinNats = 64, kBins = kBinsPerNat * kBinNats;

struct Histogram {
  int64_t count[kBins + 1];
  double mass[kBins + 1];
  std::vector<uint16_t> bin;  // per token
};

void fill_histogram(const float* x, const float* e, int64_t V, float max, Histogram& h) {
  std::fill(h.count, h.count + kBins + 1, 0);
  std::fill(h.mass, h.mass + kBins + 1, 0.0);
  h.bin.resize(V);
  const __m256 vmax = _mm256_set1_ps(max), neg_inf = _mm256_set1_ps(kNegInf);
  const __m256 per_nat = _mm256_set1_ps(kBinsPerNat), last = _mm256_set1_ps(kBins - 1);
  alignas(32) int32_t b[8];
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    // min(distance, last) picks `last` for NaN distances too; -inf tokens (and NaNs) to the uncounted bin
    const __m256 bins = _mm256_blendv_ps(_mm256_set1_ps(kBins), _mm256_min_ps(_mm256_mul_ps(_mm256_sub_ps(vmax, v),
                                                                                            per_nat), last),
                                         _mm256_cmp_ps(v, neg_inf, _CMP_GT_OQ));
    _mm256_store_si256(reinterpret_cast<__m256i*>(b), _mm256_cvttps_epi32(bins));
    for (int j = 0; j < 8; ++j) {
      h.bin[i + j] = static_cast<uint16_t>(b[j]);
      ++h.count[b[j]];
      h.mass[b[j]] += e[i + j];
    }
  }
  for (; i < V; ++i) {
    const int bin = x[i] > kNegInf ? static_cast<int>(std::min((max - x[i]) * kBinsPerNat, float(kBins - 1))) : kBins;
    h.bin[i] = static_cast<uint16_t>(bin);
    ++h.count[bin];
    h.mass[bin] += e[i];
  }
}

// The tokens of bin b with x >= at_least, sixteen bin indices compared at a time.
void tokens_in_bin(const float* x, const float* e, const Histogram& h, int b, float at_least,
                   std::vector<Candidate>& out) {
  out.clear();
  const int64_t V = static_cast<int64_t>(h.bin.size());
  const __m256i wanted = _mm256_set1_epi16(static_cast<int16_t>(b));
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    const __m256i bins = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h.bin.data() + i));
    // two mask bits per matching 16-bit lane: keep the low one
    for (uint32_t hit = _mm256_movemask_epi8(_mm256_cmpeq_epi16(bins, wanted)) & 0x55555555u; hit; hit &= hit - 1) {
      const int64_t t = i + __builtin_ctz(hit) / 2;
      if (x[t] >= at_least) out.push_back({x[t], e[t], static_cast<int32_t>(t)});
    }
  }
  for (; i < V; ++i)
    if (h.bin[i] == b && x[i] >= at_least) out.push_back({x[i], e[i], static_cast<int32_t>(i)});
}

float cutoff_by_histogram(const float* x, const float* e, int64_t V, float max, const RowFilter& f, double total,
                          Histogram& h, std::vector<Candidate>& c) {
  fill_histogram(x, e, V, max, h);
  float k_threshold = kNegInf;  // also when fewer than k tokens are finite: the k-th largest is -inf
  int k_bin = kBins - 1;
  double top_k_mass = total;
  if (f.top_k > 0) {
    int64_t above = 0;
    int b = 0;
    for (; b < kBins && above + h.count[b] < f.top_k; ++b) above += h.count[b];
    if (b < kBins) {
      tokens_in_bin(x, e, h, b, kNegInf, c);
      k_threshold = largest_value_with_weight<false>(c.data(), c.size(), static_cast<double>(f.top_k - above));
      k_bin = b;
      top_k_mass = 0;
      for (int i = 0; i < b; ++i) top_k_mass += h.mass[i];
      for (const Candidate& t : c) top_k_mass += t.x >= k_threshold ? t.e : 0.0;
    }
  }
  const double target = static_cast<double>(f.top_p) * top_k_mass;
  if (f.top_p >= 1.f || target <= 0) return k_threshold;
  double above = 0;
  int b = 0;
  for (; b < k_bin && above + h.mass[b] < target; ++b) above += h.mass[b];
  tokens_in_bin(x, e, h, b, b == k_bin ? k_threshold : kNegInf, c);
  return std::max(k_threshold, largest_value_with_weight<true>(c.data(), c.size(), target - above));
}

// One row's working memory.
struct RowScratch {
  std::vector<float> e;  // every token's e^(x - max)
  std::vector<Candidate> candidates;
  Histogram histogram;
};

float max_of(const float* x, int64_t V) {
  __m256 vmax = _mm256_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
  float max = hmax(vmax);
  for (; i < V; ++i) max = std::max(max, x[i]);
  return max;
}

void row_threshold(const float* x, int64_t V, const RowFilter& f, RowScratch& scratch, float& threshold,
                   float& row_max) {
  const float max = max_of(x, V);
  row_max = max;
  threshold = kNegInf;
  if (f.top_k > 0 || f.top_p < 1.f) {
    const float safe_max = std::isfinite(max) ? max : 0.f;
    scratch.e.resize(V);
    float* e = scratch.e.data();
    const double total = masses(x, V, safe_max, safe_max - kPruneNats, e, scratch.candidates);
    if (!cutoff_among(scratch.candidates, f, total, threshold))
      threshold = cutoff_by_histogram(x, e, V, safe_max, f, total, scratch.histogram, scratch.candidates);
  }
  if (f.min_p > 0.f) threshold = std::max(threshold, max + std::log(f.min_p));
}

ffi::Error SamplingThreshold(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scaled, ffi::Buffer<ffi::S32> top_k,
                             ffi::Buffer<ffi::F32> top_p, ffi::Buffer<ffi::F32> min_p, ffi::Buffer<ffi::S32> live_rows,
                             ffi::ResultBuffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::F32> row_max) {
  auto d = scaled.dimensions();
  if (d.size() != 2 || top_k.element_count() != d[0] || top_p.element_count() != d[0] ||
      min_p.element_count() != d[0] || live_rows.element_count() != 1)
    return ffi::Error::InvalidArgument("sampling_threshold: expected scaled[S, V] and [S] parameters");
  const int64_t S = d[0], V = d[1];
  const int64_t live = std::clamp<int64_t>(live_rows.typed_data()[0], 0, S);
  float* out_threshold = threshold->typed_data();
  float* out_max = row_max->typed_data();
  for (int64_t r = live; r < S; ++r) {  // bucket padding
    out_threshold[r] = kNegInf;
    out_max[r] = 0.f;
  }
  const float* x = scaled.typed_data();
  const int32_t* k = top_k.typed_data();
  const float *p = top_p.typed_data(), *m = min_p.typed_data();
  parallel_blocks(pool, live, [&](int64_t r) {
    auto scratch = std::make_unique<RowScratch>();
    const RowFilter f{k[r] > 0 && k[r] < V ? k[r] : 0, p[r], m[r]};
    row_threshold(x + r * V, V, f, *scratch, out_threshold[r], out_max[r]);
  });
  return ffi::Error::Success();
}

// ---- Logprobs: a token's, its rank and the K most likely tokens' (jaxserve/sampler.py's token_logprobs) ----

// One row: log_total = log(sum(e^x)); rank = 1 + the tokens whose logprob exceeds `token`'s; the K largest
// values (ties: lower token first, as lax.top_k) as (token, logprob). The K-th largest value is selected among
// the tokens within kPruneNats of the maximum, or through the histogram; the tokens at or above it are sorted.
void row_logprobs(const float* x, int64_t V, int32_t token, int64_t K, RowScratch& scratch, float& token_logprob,
                  int32_t& rank, int32_t* top_ids, float* top_logprobs) {
  const float max = max_of(x, V), safe_max = std::isfinite(max) ? max : 0.f;
  scratch.e.resize(V);
  float* e = scratch.e.data();
  std::vector<Candidate>& c = scratch.candidates;
  const double total = masses(x, V, safe_max, safe_max - kPruneNats, e, c);
  const float log_total = safe_max + static_cast<float>(std::log(total));
  const int64_t n = static_cast<int64_t>(c.size());
  float kth;
  if (n >= K && n <= kMaxPruned) {
    kth = largest_value_with_weight<false>(c.data(), n, static_cast<double>(K));
    c.erase(std::remove_if(c.begin(), c.end(), [kth](const Candidate& t) { return t.x < kth; }), c.end());
  } else {
    Histogram& h = scratch.histogram;
    fill_histogram(x, e, V, safe_max, h);
    int64_t above = 0;
    int b = 0;
    for (; b < kBins && above + h.count[b] < K; ++b) above += h.count[b];
    kth = kNegInf;  // fewer than K finite tokens: -inf ones fill the rest, lowest tokens first
    if (b < kBins) {
      tokens_in_bin(x, e, h, b, kNegInf, c);
      kth = largest_value_with_weight<false>(c.data(), c.size(), static_cast<double>(K - above));
    }
    c.clear();
    for (int64_t i = 0; i < V; ++i)
      if (x[i] >= kth) c.push_back({x[i], e[i], static_cast<int32_t>(i)});
  }
  const int64_t kept = std::min<int64_t>(K, c.size());
  std::partial_sort(c.begin(), c.begin() + kept, c.end(), [](const Candidate& a, const Candidate& b) {
    return a.x > b.x || (a.x == b.x && a.index < b.index);
  });
  for (int64_t i = 0; i < K; ++i) {
    top_ids[i] = i < kept ? c[i].index : 0;
    top_logprobs[i] = i < kept ? c[i].x - log_total : kNegInf;
  }
  // Ranks compare the rounded logprobs, as the sampler's reference does.
  token_logprob = x[token] - log_total;
  const __m256 mine = _mm256_set1_ps(token_logprob), total_v = _mm256_set1_ps(log_total);
  int64_t above = 0, i = 0;
  for (; i + 8 <= V; i += 8)
    above += __builtin_popcount(_mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), total_v), mine, _CMP_GT_OQ)));
  for (; i < V; ++i) above += (x[i] - log_total) > token_logprob;
  rank = static_cast<int32_t>(1 + above);
}

ffi::Error TokenLogprobs(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> token_ids,
                         ffi::Buffer<ffi::S32> live_rows, ffi::ResultBuffer<ffi::F32> token_logprob,
                         ffi::ResultBuffer<ffi::S32> rank, ffi::ResultBuffer<ffi::S32> top_ids,
                         ffi::ResultBuffer<ffi::F32> top_logprobs) {
  auto d = logits.dimensions();
  auto td = top_ids->dimensions();
  if (d.size() != 2 || token_ids.element_count() != d[0] || live_rows.element_count() != 1 || td.size() != 2 ||
      td[0] != d[0] || td[1] < 1 || td[1] > d[1])
    return ffi::Error::InvalidArgument("token_logprobs: expected logits[S, V], token_ids[S] and top_ids[S, K <= V]");
  const int64_t S = d[0], V = d[1], K = td[1];
  const int64_t live = std::clamp<int64_t>(live_rows.typed_data()[0], 0, S);
  const float* x = logits.typed_data();
  const int32_t* tokens = token_ids.typed_data();
  float *lp = token_logprob->typed_data(), *top_lp = top_logprobs->typed_data();
  int32_t *ranks = rank->typed_data(), *ids = top_ids->typed_data();
  for (int64_t r = live; r < S; ++r) {  // bucket padding
    lp[r] = 0.f;
    ranks[r] = 1;
    std::fill(ids + r * K, ids + (r + 1) * K, 0);
    std::fill(top_lp + r * K, top_lp + (r + 1) * K, 0.f);
  }
  parallel_blocks(pool, live, [&](int64_t r) {
    auto scratch = std::make_unique<RowScratch>();
    const int32_t token = std::clamp<int32_t>(tokens[r], 0, static_cast<int32_t>(V - 1));
    row_logprobs(x + r * V, V, token, K, *scratch, lp[r], ranks[r], ids + r * K, top_lp + r * K);
  });
  return ffi::Error::Success();
}

// ---- Every sampled token's logprob: a row's log-normalizer, and its first maximum (the greedy token) ----

// A row's maximum and the first index of it; a row with a NaN gives its last index (as sampler.greedy_tokens,
// whose comparisons with a NaN maximum all fail) and false.
bool row_first_max(const float* x, int64_t V, float& max, int32_t& first_max) {
  __m256 vmax = _mm256_set1_ps(kNegInf), nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vmax = _mm256_max_ps(vmax, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  max = hmax(vmax);
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < V; ++i) {
    max = std::max(max, x[i]);
    has_nan |= std::isnan(x[i]);
  }
  first_max = static_cast<int32_t>(V - 1);
  if (has_nan) return false;
  const __m256 target = _mm256_set1_ps(max);
  for (i = 0; i + 8 <= V; i += 8)
    if (const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ))) {
      first_max = static_cast<int32_t>(i + __builtin_ctz(hit));
      break;
    }
  if (i + 8 > V)
    for (; i < V; ++i)
      if (x[i] == max) {
        first_max = static_cast<int32_t>(i);
        break;
      }
  return true;
}

// log(sum(e^x)) in double from the maximum, and the first index of the maximum (row_first_max); a row with a
// NaN gives NaN.
void row_normalizer(const float* x, int64_t V, float& log_total, int32_t& first_max) {
  float max;
  if (!row_first_max(x, V, max, first_max)) {
    log_total = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (!std::isfinite(max)) {  // all -inf (or +inf present): as logsumexp
    log_total = max;
    return;
  }
  const __m256 target = _mm256_set1_ps(max);
  __m256d sum = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) sum = add_in_double(sum, token_masses(_mm256_loadu_ps(x + i), target));
  double total = lanes_total(sum);
  for (; i < V; ++i) total += x[i] > kNegInf ? std::exp(x[i] - max) : 0.0;
  log_total = max + static_cast<float>(std::log(total));
}

ffi::Error LogNormalizer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> live_rows,
                         ffi::ResultBuffer<ffi::F32> log_total, ffi::ResultBuffer<ffi::S32> first_max) {
  auto d = logits.dimensions();
  if (d.size() != 2 || live_rows.element_count() != 1)
    return ffi::Error::InvalidArgument("log_normalizer: expected logits[S, V]");
  const int64_t S = d[0], V = d[1];
  const int64_t live = std::clamp<int64_t>(live_rows.typed_data()[0], 0, S);
  float* totals = log_total->typed_data();
  int32_t* firsts = first_max->typed_data();
  std::fill(totals + live, totals + S, 0.f);  // bucket padding
  std::fill(firsts + live, firsts + S, 0);
  const float* x = logits.typed_data();
  parallel_blocks(pool, live, [&](int64_t r) { row_normalizer(x + r * V, V, totals[r], firsts[r]); });
  return ffi::Error::Success();
}

// The greedy tokens alone (row_first_max): LogNormalizer without its pass of exponentials, for steps whose rows
// need no logprob.
ffi::Error FirstMax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> live_rows,
                    ffi::ResultBuffer<ffi::S32> first_max) {
  auto d = logits.dimensions();
  if (d.size() != 2 || live_rows.element_count() != 1)
    return ffi::Error::InvalidArgument("first_max: expected logits[S, V]");
  const int64_t S = d[0], V = d[1];
  const int64_t live = std::clamp<int64_t>(live_rows.typed_data()[0], 0, S);
  int32_t* firsts = first_max->typed_data();
  std::fill(firsts + live, firsts + S, 0);  // bucket padding
  const float* x = logits.typed_data();
  parallel_blocks(pool, live, [&](int64_t r) {
    float max;
    row_first_max(x + r * V, V, max, firsts[r]);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_first_max, FirstMax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_log_normalizer, LogNormalizer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_token_logprobs, TokenLogprobs,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_sampling_threshold, SamplingThreshold,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
