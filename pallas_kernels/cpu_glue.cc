// The elementwise work between a layer's projections, as XLA FFI calls: RMSNorm with the residual add before
// it, and RoPE with the KV cache write. XLA CPU ran each of these as several single-threaded passes over
// [T, hidden] (a 512-token prefill step spent ~30 ms of ~190 in them); here each is one pass, split by rows
// over XLA's intra-op threads. Each row is computed on its own, so its values never depend on how many rows
// share its step; they are the XLA path's (models/llama: RMSNorm with fixed_order_sum, apply_rope,
// cast_to_cache) operation for operation, except RMSNorm's reciprocal square root: XLA CPU approximates it
// (about a third of results an ulp off), here it is 1 / sqrt.
//
//   jaxserve_add_rms_norm: sum = x + delta; normed = sum * rsqrt(mean(sum^2) + eps) * w     x, delta[T, H], w[H]
//                          returns (sum, normed)
//   jaxserve_rope_write_kv: q, k of qkv[T, (Hq + 2 Hkv) * D] rotated (rotate-half, cos/sin[T, D/2]); k and v
//                           written (rounded to the pages' dtype) at slots[t] of k/v_pages[P, S, Hkv, D], in
//                           place; returns (q[T, Hq, D], k_pages, v_pages)
// Rows from `rows[0]` on (a step's padding) come back zero and write nothing.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_parallel.h"

namespace {

using jaxserve::parallel_blocks;
using jaxserve::thread_scratch;

// The halving fold of models/llama.fixed_order_sum over buf[0:n] (destroys buf).
float fold_sum(float* buf, int64_t n) {
  while (n > 1) {
    const int64_t half = n / 2;
    for (int64_t i = 0; i < half; ++i) buf[i] = buf[i] + buf[i + half];
    if (n % 2) buf[0] = buf[0] + buf[n - 1];
    n = half;
  }
  return buf[0];
}

void norm_row(const float* x, const float* w, float eps, float* out, int64_t h, float* buf) {
  for (int64_t i = 0; i < h; ++i) buf[i] = x[i] * x[i];
  const float mean_square = fold_sum(buf, h) / static_cast<float>(h);
  const float r = 1.0f / std::sqrt(mean_square + eps);
  for (int64_t i = 0; i < h; ++i) out[i] = (x[i] * r) * w[i];
}

int64_t live_rows(const int32_t* rows, int64_t t) { return std::clamp<int64_t>(rows[0], 0, t); }

constexpr int64_t kRowsPerBlock = 16;

void add_norm_rows(ffi::ThreadPool& pool, const float* x, const float* delta, const float* w, float eps, float* sum,
                   float* normed, int64_t t, int64_t h, int64_t live) {
  parallel_blocks(pool, (t + kRowsPerBlock - 1) / kRowsPerBlock, [&](int64_t b) {
    float* buf = thread_scratch<float, 0>(h);
    for (int64_t r = b * kRowsPerBlock; r < std::min(t, (b + 1) * kRowsPerBlock); ++r) {
      float *s = sum + r * h, *out = normed + r * h;
      if (r >= live) {
        std::memset(s, 0, h * sizeof(float));
        std::memset(out, 0, h * sizeof(float));
        continue;
      }
      for (int64_t i = 0; i < h; ++i) s[i] = x[r * h + i] + delta[r * h + i];
      norm_row(s, w, eps, out, h, buf);
    }
  });
}

ffi::Error AddRmsNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> delta,
                      ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> rows, float eps, ffi::ResultBuffer<ffi::F32> sum,
                      ffi::ResultBuffer<ffi::F32> normed) {
  auto d = x.dimensions();
  if (d.size() != 2 || w.element_count() != d[1] || delta.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("add_rms_norm: x[T, H], delta[T, H], w[H]");
  add_norm_rows(pool, x.typed_data(), delta.typed_data(), w.typed_data(), eps, sum->typed_data(),
                normed->typed_data(), d[0], d[1], live_rows(rows.typed_data(), d[0]));
  return ffi::Error::Success();
}

// Round to nearest even, as XLA's f32 -> bf16 convert (a NaN stays a quiet NaN).
inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

// dst[0:d] = src rotated: [x1 * cos - x2 * sin, x2 * cos + x1 * sin] for halves x1, x2, with the fused
// multiply-adds XLA CPU contracts apply_rope's expressions into (the same values).
inline void rotate(const float* src, const float* cos, const float* sin, float* dst, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    dst[i] = std::fma(src[i], cos[i], -(src[i + half] * sin[i]));
    dst[i + half] = std::fma(src[i + half], cos[i], src[i] * sin[i]);
  }
}

template <typename Page>
void store_row(const float* src, Page* dst, int64_t d) {
  if constexpr (sizeof(Page) == 4) {
    std::memcpy(dst, src, d * sizeof(float));
  } else {
    for (int64_t i = 0; i < d; ++i) dst[i] = to_bf16(src[i]);
  }
}

template <typename Page>
void rope_rows(ffi::ThreadPool& pool, const float* qkv, const float* cos, const float* sin, const int32_t* slots,
               Page* k_pages, Page* v_pages, float* q_out, int64_t t, int64_t hq, int64_t hkv, int64_t d,
               int64_t live) {
  const int64_t width = (hq + 2 * hkv) * d, half = d / 2;
  parallel_blocks(pool, (t + kRowsPerBlock - 1) / kRowsPerBlock, [&](int64_t b) {
    float* rotated = thread_scratch<float, 0>(d);
    for (int64_t r = b * kRowsPerBlock; r < std::min(t, (b + 1) * kRowsPerBlock); ++r) {
      float* q = q_out + r * hq * d;
      if (r >= live) {
        std::memset(q, 0, hq * d * sizeof(float));
        continue;
      }
      const float* row = qkv + r * width;
      const float *c = cos + r * half, *s = sin + r * half;
      for (int64_t h = 0; h < hq; ++h) rotate(row + h * d, c, s, q + h * d, d);
      Page* k_dst = k_pages + static_cast<int64_t>(slots[r]) * hkv * d;
      Page* v_dst = v_pages + static_cast<int64_t>(slots[r]) * hkv * d;
      for (int64_t h = 0; h < hkv; ++h) {
        rotate(row + (hq + h) * d, c, s, rotated, d);
        store_row(rotated, k_dst + h * d, d);
        store_row(row + (hq + hkv + h) * d, v_dst + h * d, d);
      }
    }
  });
}

ffi::Error RopeWriteKv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos,
                       ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::S32> slots, ffi::AnyBuffer k_pages,
                       ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> q,
                       ffi::Result<ffi::AnyBuffer> k_out, ffi::Result<ffi::AnyBuffer> v_out) {
  auto qd = q->dimensions(), pd = k_pages.dimensions();
  if (qd.size() != 3 || pd.size() != 4 || qkv.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("rope_write_kv: q[T, Hq, D], pages[P, S, Hkv, D], qkv[T, W]");
  }
  const int64_t t = qd[0], hq = qd[1], d = qd[2], hkv = pd[2], num_slots = pd[0] * pd[1];
  const auto type = k_pages.element_type();
  if (qkv.dimensions()[0] != t || qkv.dimensions()[1] != (hq + 2 * hkv) * d || pd[3] != d || d % 2 ||
      cos.element_count() != t * (d / 2) || sin.element_count() != t * (d / 2) || slots.element_count() != t ||
      v_pages.element_type() != type || (type != ffi::DataType::F32 && type != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("rope_write_kv: shapes or page dtype (float32 or bfloat16) do not match");
  if (k_out->untyped_data() != k_pages.untyped_data() || v_out->untyped_data() != v_pages.untyped_data())
    return ffi::Error::InvalidArgument("rope_write_kv: the pages must be aliased to the results");
  const int64_t live = live_rows(rows.typed_data(), t);
  for (int64_t r = 0; r < live; ++r)
    if (slots.typed_data()[r] < 0 || slots.typed_data()[r] >= num_slots)
      return ffi::Error::InvalidArgument("rope_write_kv: slot out of range");
  if (type == ffi::DataType::F32) {
    rope_rows(pool, qkv.typed_data(), cos.typed_data(), sin.typed_data(), slots.typed_data(),
              static_cast<float*>(k_out->untyped_data()), static_cast<float*>(v_out->untyped_data()),
              q->typed_data(), t, hq, hkv, d, live);
  } else {
    rope_rows(pool, qkv.typed_data(), cos.typed_data(), sin.typed_data(), slots.typed_data(),
              static_cast<uint16_t*>(k_out->untyped_data()), static_cast<uint16_t*>(v_out->untyped_data()),
              q->typed_data(), t, hq, hkv, d, live);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_add_rms_norm, AddRmsNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_rope_write_kv, RopeWriteKv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
