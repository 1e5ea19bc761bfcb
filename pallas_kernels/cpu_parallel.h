// parallel_blocks: a loop split over XLA's intra-op thread pool, shared by the CPU kernels.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
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

}  // namespace jaxserve
