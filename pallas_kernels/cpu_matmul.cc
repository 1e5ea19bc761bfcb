// bfloat16-weight projections for small batches on x86-64 CPUs (AVX2 + FMA), as XLA FFI custom calls.
//
// Why: XLA CPU's bf16 x bf16 -> f32 dot streams a decode step's weights at ~6 GB/s on this class of machine,
// a quarter of its memory bandwidth, and decode at small batch is nothing but that stream. These kernels read
// each weight once per call, widen bf16 to f32 in registers (a 16-bit shift, exact) and accumulate in f32, so
// the results equal XLA's up to summation order. Work is split in blocks over XLA's own intra-op
// thread pool; the calling thread takes blocks too, so a busy pool never stalls a call.
//
//   jaxserve_bf16_matmul_kn: y[M, N] = x[M, K] . w[K, N]      (nnx.Linear's kernel layout)
//   jaxserve_bf16_matmul_nk: y[M, N] = x[M, K] . w[N, K]^T    (a tied embedding used as the LM head)

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// Split [0, num_blocks) over the calling thread and up to pool.num_threads() - 1 helpers. Blocks are claimed
// from one atomic counter; the caller returns once every block is done and no helper is inside `work`.
// A helper that starts late finds every block claimed and leaves without touching the caller's stack.
template <typename F>
void parallel_blocks(ffi::ThreadPool& pool, int64_t num_blocks, F&& body) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0}, active{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [&shared, num_blocks, &body]() {
    for (int64_t b; (b = shared->next.fetch_add(1)) < num_blocks;) {
      body(b);
      shared->done.fetch_add(1);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), num_blocks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([state = shared, num_blocks, work_ptr = &work]() {
      state->active.fetch_add(1);
      if (state->next.load() < num_blocks) (*work_ptr)();
      state->active.fetch_sub(1);
    });
  }
  work();
  while (shared->done.load() < num_blocks || shared->active.load() > 0) _mm_pause();
}

void widen_all(const uint16_t* src, float* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = bf16_to_f32(src[i]);
}

// acc[m0:m0+MT, :] += x[m0:m0+MT, k0:k1] . w[k0:k1, :], walking the weight rows in memory order: one
// sequential stream per thread is what this machine's prefetchers stream fastest (a column-tiled walk, a
// strided stream per tile, ran at a third of the speed).
template <int MT>
void kn_rows(const float* x, const uint16_t* w, float* acc, int64_t m0, int64_t K, int64_t N, int64_t k0,
             int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    __m256 b[MT];
    for (int m = 0; m < MT; ++m) b[m] = _mm256_broadcast_ss(x + (m0 + m) * K + k);
    const uint16_t* row = w + k * N;
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
      for (int m = 0; m < MT; ++m) acc[(m0 + m) * N + c] += x[(m0 + m) * K + k] * bf16_to_f32(row[c]);
  }
}

ffi::Error MatmulKN(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("bf16_matmul_kn: expected x[M, K] and w[K, N]");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  std::vector<float> xf(M * K);
  widen_all(reinterpret_cast<const uint16_t*>(x.typed_data()), xf.data(), M * K);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  // One contiguous range of weight rows per thread, each into its own partial sum, added up at the end.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), K / 64));
  std::vector<float> partial(parts * M * N, 0.f);
  parallel_blocks(pool, parts, [&](int64_t p) {
    const int64_t k0 = K * p / parts, k1 = K * (p + 1) / parts;
    float* acc = partial.data() + p * M * N;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) kn_rows<4>(xf.data(), wp, acc, m, K, N, k0, k1);
    if (M - m == 3) kn_rows<3>(xf.data(), wp, acc, m, K, N, k0, k1);
    if (M - m == 2) kn_rows<2>(xf.data(), wp, acc, m, K, N, k0, k1);
    if (M - m == 1) kn_rows<1>(xf.data(), wp, acc, m, K, N, k0, k1);
  });
  float* yp = y->typed_data();
  std::memcpy(yp, partial.data(), M * N * sizeof(float));
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t i = 0; i < M * N; ++i) yp[i] += partial[p * M * N + i];
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_bf16_matmul_kn, MatmulKN,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_bf16_matmul_nk, MatmulNK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
