// mnemo/core/parallel.hpp — parallel_for over OpenMP when the build has it, serial otherwise.
//
// Kernels take an optional thread count (0 = the OpenMP default, i.e. OMP_NUM_THREADS or the
// number of cores; any count is clamped to what the machine can run, resolve_threads). The body must not throw: entry points validate before they go parallel.
// Work items are handed out statically in index order, so which thread runs an item never
// changes a result; kernels that promise thread-count-independent results (split-KV decode)
// also fix their own reduction order.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mnemo {

// At most this many threads per processor: beyond a few per core, more threads only add switching
// (results never depend on the thread count), and far more than the machine can run makes the
// OpenMP runtime fail to create them and exit the process (threads = 20000: issue 16).
inline constexpr int max_threads_per_processor = 8;

// Threads a kernel will use for `threads` (0 = default): the request, clamped to
// max_threads_per_processor per processor (or per OpenMP default thread, if that is more) and to
// OMP_THREAD_LIMIT.
inline int resolve_threads(int threads) {
#if defined(_OPENMP)
  const int wanted = threads > 0 ? threads : omp_get_max_threads();
  const long long most = static_cast<long long>(max_threads_per_processor) *
                         std::max(omp_get_num_procs(), omp_get_max_threads());
  return static_cast<int>(std::min<long long>({wanted, most, omp_get_thread_limit()}));
#else
  (void)threads;
  return 1;
#endif
}

// Calls body(i) for every i in [0, n), over up to `threads` threads (0 = default).
template <class Body>
void parallel_for(std::int64_t n, Body&& body, int threads = 0) {
  if (n <= 0) return;
#if defined(_OPENMP)
  const int t = resolve_threads(threads);
  if (t > 1 && n > 1 && !omp_in_parallel()) {
#pragma omp parallel for num_threads(t) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#else
  (void)threads;
#endif
  for (std::int64_t i = 0; i < n; ++i) body(i);
}

// As parallel_for, but hands items out dynamically (for items of uneven cost, such as causal
// tiles). Results must not depend on which thread ran an item.
template <class Body>
void parallel_for_dynamic(std::int64_t n, Body&& body, int threads = 0) {
  if (n <= 0) return;
#if defined(_OPENMP)
  const int t = resolve_threads(threads);
  if (t > 1 && n > 1 && !omp_in_parallel()) {
#pragma omp parallel for num_threads(t) schedule(dynamic, 1)
    for (std::int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#else
  (void)threads;
#endif
  for (std::int64_t i = 0; i < n; ++i) body(i);
}

// Index of the calling thread inside a parallel_for (0 when serial): for per-thread workspace.
inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace mnemo
