// mnemo/core/serial_gemm.hpp — Eigen products that stay on the calling thread, and the loop that
// runs per-item bodies containing them.
//
// Eigen's GEMM starts its own OpenMP team when it is called outside a parallel region
// (Eigen/src/Core/products/Parallelizer.h: omp_get_num_threads() == 1 and enough work). A kernel
// that threads over (batch, head) itself must not get a second, hidden layer of threads, and a
// call with threads = 1 must use one thread. Measured in mnemo_bench before this existed: a
// chunked Titans call 685 ms instead of 0.9 ms, one-thread linear-attention rows about 100x slower.
//
//   detail::for_each_item(n, threads, eigen, body)  body(i) for i in [0, n); when `eigen`, a
//                                                   serial run happens inside a team of one
//   detail::gemm<accumulate::add>(dst, lhs, rhs)     dst += lhs * rhs on this thread only
#pragma once

#include <algorithm>
#include <cstdint>

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "mnemo/core/parallel.hpp"

namespace mnemo::detail {

// Calls body(i) for i in [0, n) over up to `threads` threads. Bodies that call Eigen products
// pass eigen = true: a serial run is then wrapped in a team of one, whose nthreads-var of 1 makes
// Eigen's nbThreads() read 1 inside (the caller's setting is untouched).
template <class Body>
void for_each_item(std::int64_t n, int threads, bool eigen, Body&& body) {
#if defined(_OPENMP)
  if (eigen && !(resolve_threads(threads) > 1 && n > 1 && !omp_in_parallel())) {
#pragma omp parallel num_threads(1)
    {
      omp_set_num_threads(1);
      for (std::int64_t i = 0; i < n; ++i) body(i);
    }
    return;
  }
#else
  (void)eigen;
#endif
  parallel_for(n, body, threads);
}

// True when Eigen would start threads for a large product here: outside any multi-threaded team
// with nbThreads() > 1. Eigen::setNbThreads(n > 1), by a user or a benchmark, overrides the team's
// nthreads-var that for_each_item sets, so this can happen even inside it.
inline bool eigen_would_thread() {
#if defined(EIGEN_HAS_OPENMP)
  return Eigen::nbThreads() > 1 && omp_get_num_threads() == 1;
#else
  return false;
#endif
}

// Eigen runs a product serially when its destination has at most 32 rows at compile time (the
// Condition of parallelize_gemm in Eigen/src/Core/products/Parallelizer.h).
inline constexpr std::int64_t serial_panel_rows = 32;
using serial_panel = Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor,
                                              serial_panel_rows, Eigen::Dynamic>,
                                Eigen::Unaligned, Eigen::OuterStride<>>;

enum class accumulate { assign, add, subtract };

// dst = lhs * rhs (or += / -=) on the calling thread only; dst is a row-major matrix, map or
// block. When Eigen would thread, the product is cut into row panels of serial_panel_rows, each
// run serially (this repacks rhs once per panel: 13% slower for a 128 x 128 x 128 product, so it
// is done only then).
template <accumulate Mode, class Dst, class Lhs, class Rhs>
void gemm(Dst&& dst, const Lhs& lhs, const Rhs& rhs) {
  auto apply = [](auto&& d, const auto& a, const auto& b) {
    if constexpr (Mode == accumulate::assign) d.noalias() = a * b;
    else if constexpr (Mode == accumulate::add) d.noalias() += a * b;
    else d.noalias() -= a * b;
  };
  if (!eigen_would_thread()) {
    apply(dst, lhs, rhs);
    return;
  }
  for (std::int64_t p = 0; p < dst.rows(); p += serial_panel_rows) {
    const std::int64_t r = std::min<std::int64_t>(serial_panel_rows, dst.rows() - p);
    serial_panel panel(&dst.coeffRef(p, 0), r, dst.cols(), Eigen::OuterStride<>(dst.outerStride()));
    apply(panel, lhs.middleRows(p, r), rhs);
  }
}

}  // namespace mnemo::detail
