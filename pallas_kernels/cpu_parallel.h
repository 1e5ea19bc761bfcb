// Shared by the CPU kernels: parallel_blocks, a loop split over XLA's intra-op thread pool, and
// thread_scratch, each thread's buffers kept across calls.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxserve {

// Split [0, num_blocks) over the calling thread and up to pool.num_threads() - 1 helpers. Blocks are claimed
// from one atomic counter; the caller returns once every block is done and no helper is inside `work`.
// A helper that starts late finds every block claimed and leaves without touching the caller's stack.
// (A pool of this library's own spinning workers measured no faster: XLA's threads already spin between
// ops, and more spinners than cores only took turns.)
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

// This thread's 64-byte aligned scratch number kSlot, at least n values, kept and grown across calls: a long
// step's buffers are over glibc's mmap threshold, and allocating them per call paid for fresh pages (page
// faults were ~20% of a 128-token step's projections).
template <typename T, int kSlot>
T* thread_scratch(int64_t n) {
  struct Kept {
    T* data = nullptr;
    int64_t size = 0;
    ~Kept() { std::free(data); }
  };
  thread_local Kept kept;
  if (kept.size < n) {
    std::free(kept.data);
    kept.data = static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64));
    kept.size = n;
  }
  return kept.data;
}

}  // namespace jaxserve
