// CPU kernels for x86-64 (AVX2 + FMA) as XLA FFI custom calls: small-batch projections with bf16 or int8
// weights (ragged paged attention is cpu_attention.cc's, the sampler's passes cpu_sampling.cc's).
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
//   jaxserve_write_rows: pages[slots[t]] = rows[t], in place (a float8 cache's KV write)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_math.h"
#include "cpu_parallel.h"

namespace {

using jaxserve::bf16_to_f32;
using jaxserve::hsum;
using jaxserve::parallel_blocks;
using jaxserve::widen8;

// 8 int8 -> 8 f32 (exact).
inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

void widen_all(const uint16_t* src, float* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = bf16_to_f32(src[i]);
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
