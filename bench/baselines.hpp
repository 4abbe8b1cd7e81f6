// bench/baselines.hpp — the attention baselines every mnemo kernel is measured against.
//
//   out_i = sum_j softmax_j(scale * q_i . k_j  over the keys j visible to i) v_j
//
//   eigen_attention     naive, as a user writes it by hand with Eigen, per (batch, query head):
//                         S = scale * Q K^T          [Lq, Lk], materialised whole
//                         S_ij = -inf where masked   (causal)
//                         P = row_softmax(S)         in place
//                         O = P V                    [Lq, Dv]
//   openblas_attention  GEMM-softmax-GEMM, blocked over query rows so the score buffer is
//                       [rows, Lk], never [Lq, Lk]. Per (batch, kv head, block of query rows) the
//                       rows of every query head that shares the kv head are stacked into one
//                       matrix (so K and V are read once per group, and decode's Lq = 1 becomes
//                       a GEMM with Hq / Hkv rows):
//                         S = scale * Q_blk K^T      cblas_sgemm, only over the keys the block can see
//                         P = masked row_softmax(S)
//                         O_blk = P V                cblas_sgemm
//
// Shapes and conventions are the library's (DESIGN.md): q [B, Hq, Lq, D], k [B, Hkv, Lk, D],
// v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv], lse [B, Hq, Lq] (optional); query head h reads kv head
// h / (Hq / Hkv); causal masks are bottom-right aligned (query i sees key j iff j <= i + Lk - Lq);
// a row with no visible key gives out = 0 and lse = -inf, never NaN. Arguments are checked by
// the library's own attention::detail::check_args, so bad shapes throw mnemo::error.
//
// Numerics: float32 throughout (GEMMs accumulate in float), the softmax subtracts the row
// maximum and uses Eigen's vectorised exp, so the baselines are not held back by a scalar
// std::exp loop.
//
// Threads: work items ((b, h) for Eigen, (b, kv head, block) for OpenBLAS) are spread over
// mnemo::parallel_for with options.threads; every GEMM runs on one thread (Eigen::setNbThreads(1)
// and openblas_set_num_threads(1) for the duration of the call, restored afterwards), so
// "threads: t" means t cores in every row, as it does for the library's kernels.
//
// openblas_attention is compiled only where the including target defines MNEMO_BENCH_OPENBLAS
// and links OpenBLAS (mnemo_bench does; the tests, which link no BLAS, see only the Eigen one).
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"

#if defined(MNEMO_BENCH_OPENBLAS)
#include <cblas.h>
#endif

namespace mnemo::bench::baselines {

namespace detail {

using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using const_rows = Eigen::Map<const row_matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using rows = Eigen::Map<row_matrix, Eigen::Unaligned, Eigen::OuterStride<>>;

inline constexpr float minus_inf = -std::numeric_limits<float>::infinity();

// Keys query row i may see under a bottom-right causal mask: [0, visible_keys).
inline std::int64_t causal_visible_keys(std::int64_t i, std::int64_t offset, std::int64_t Lk) {
  return std::clamp<std::int64_t>(i + offset + 1, 0, Lk);
}

// Eigen's products use one thread while this lives; Eigen's default comes back after.
class eigen_single_threaded {
 public:
  eigen_single_threaded() { Eigen::setNbThreads(1); }
  // Back to "OpenMP's default" (0): restoring nbThreads() would pin Eigen to that count for the
  // rest of the process, threading products that other rows expect to run on one thread.
  ~eigen_single_threaded() { Eigen::setNbThreads(0); }
  eigen_single_threaded(const eigen_single_threaded&) = delete;
  eigen_single_threaded& operator=(const eigen_single_threaded&) = delete;
};

// The GEMMs read rows of k and v through their row stride: it must cover a whole row.
inline void require_row_strides(const char* fn, const view<const float, 4>& k, const view<const float, 4>& v) {
  mnemo::detail::require(k.stride(2) >= k.extent(3), fn, ": k's row stride (stride[2]) must be >= D = ",
                         k.extent(3), ", got ", k.stride(2));
  mnemo::detail::require(v.stride(2) >= v.extent(3), fn, ": v's row stride (stride[2]) must be >= Dv = ",
                         v.extent(3), ", got ", v.stride(2));
}

}  // namespace detail

// Naive Eigen attention: the whole [Lq, Lk] score matrix per (batch, query head).
inline void eigen_attention(view<const float, 4> q,   // [B, Hq, Lq, D]
                            view<const float, 4> k,   // [B, Hkv, Lk, D]
                            view<const float, 4> v,   // [B, Hkv, Lk, Dv]
                            view<float, 4> out,       // [B, Hq, Lq, Dv]
                            view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                            bool causal = false, const attention::options& opt = {}) {
  constexpr const char* fn = "baselines::eigen_attention";
  const attention::dims d = attention::detail::check_args(fn, q, k, v, out, lse, attention::mods::none{}, opt);
  detail::require_row_strides(fn, k, v);
  const detail::eigen_single_threaded one_thread_per_product;
  using detail::minus_inf;

  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        const detail::const_rows Q(q.ptr(b, h), d.Lq, d.D, Eigen::OuterStride<>(q.stride(2)));
        const detail::const_rows K(k.ptr(b, hk), d.Lk, d.D, Eigen::OuterStride<>(k.stride(2)));
        const detail::const_rows V(v.ptr(b, hk), d.Lk, d.Dv, Eigen::OuterStride<>(v.stride(2)));
        detail::rows O(out.ptr(b, h), d.Lq, d.Dv, Eigen::OuterStride<>(out.stride(2)));

        detail::row_matrix S = Q * K.transpose();  // [Lq, Lk]
        S *= d.scale;
        if (causal) {
          for (std::int64_t i = 0; i < d.Lq; ++i) {
            const std::int64_t seen = detail::causal_visible_keys(i, d.offset(), d.Lk);
            S.row(i).tail(d.Lk - seen).setConstant(minus_inf);
          }
        }
        const Eigen::VectorXf row_max = S.rowwise().maxCoeff();
        // A row with no visible key is shifted by 0 instead of -inf: exp(-inf - 0) = 0, not NaN.
        const Eigen::VectorXf shift = (row_max.array() == minus_inf).select(Eigen::VectorXf::Zero(d.Lq), row_max);
        S = (S.array().colwise() - shift.array()).exp().matrix();
        const Eigen::VectorXf row_sum = S.rowwise().sum();
        O.noalias() = S * V;
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          const bool seen_any = row_sum(i) > 0;
          O.row(i) *= seen_any ? 1.0f / row_sum(i) : 0.0f;
          if (!lse.empty()) lse(b, h, i) = seen_any ? shift(i) + std::log(row_sum(i)) : minus_inf;
        }
      },
      opt.threads);
}

#if defined(MNEMO_BENCH_OPENBLAS)

// Query rows per block, summed over the heads of a GQA group. 256, measured at L = 4096, D = 128,
// one thread (Xeon, AVX-512, OpenBLAS 0.3.21): 131 GFLOP/s against 108 at 64 and 136 at 512 rows
// without a mask; 124 against 109 at 64 and 117 at 512 with the causal mask, where larger blocks
// compute more scores above the diagonal. The [256, Lk] score buffer is 4 MiB per thread at Lk = 4096.
inline constexpr std::int64_t openblas_block_rows = 256;

namespace detail {

// OpenBLAS uses this many threads per call while this lives; the previous count comes back after.
class openblas_threads {
 public:
  explicit openblas_threads(int n) : saved_(openblas_get_num_threads()) { openblas_set_num_threads(n); }
  ~openblas_threads() { openblas_set_num_threads(saved_); }
  openblas_threads(const openblas_threads&) = delete;
  openblas_threads& operator=(const openblas_threads&) = delete;

 private:
  int saved_;
};

// One thread's buffers, sized on first use.
struct openblas_workspace {
  std::vector<float> q;  // [rows, D]   stacked query rows of the group
  std::vector<float> s;  // [rows, Lk]  scores, then probabilities
  std::vector<float> o;  // [rows, Dv]  unnormalised outputs
  std::vector<float> inv_sum;  // [rows] 1 / softmax denominator, 0 for a row with no visible key
};

}  // namespace detail

// GEMM-softmax-GEMM with OpenBLAS. `block_rows` (summed over a GQA group) sets the score
// buffer to [block_rows, Lk] per thread.
inline void openblas_attention(view<const float, 4> q,   // [B, Hq, Lq, D]
                               view<const float, 4> k,   // [B, Hkv, Lk, D]
                               view<const float, 4> v,   // [B, Hkv, Lk, Dv]
                               view<float, 4> out,       // [B, Hq, Lq, Dv]
                               view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                               bool causal = false, const attention::options& opt = {},
                               std::int64_t block_rows = openblas_block_rows) {
  constexpr const char* fn = "baselines::openblas_attention";
  const attention::dims d = attention::detail::check_args(fn, q, k, v, out, lse, attention::mods::none{}, opt);
  detail::require_row_strides(fn, k, v);
  mnemo::detail::require(block_rows >= 1, fn, ": block_rows must be >= 1, got ", block_rows);
  using detail::minus_inf;

  const std::int64_t G = d.group();
  const std::int64_t qb = std::max<std::int64_t>(1, block_rows / G);  // query rows per head per block
  const std::int64_t blocks = (d.Lq + qb - 1) / qb;
  const std::int64_t rows_max = G * std::min(qb, d.Lq);
  const detail::openblas_threads one_thread_per_gemm(1);
  std::vector<detail::openblas_workspace> workspaces(
      static_cast<std::size_t>(std::max(resolve_threads(opt.threads), thread_index() + 1)));

  parallel_for_dynamic(
      d.B * d.Hkv * blocks,
      [&](std::int64_t item) {
        const std::int64_t b = item / (d.Hkv * blocks), hk = (item / blocks) % d.Hkv, blk = item % blocks;
        const std::int64_t i0 = blk * qb, n = std::min(qb, d.Lq - i0), M = G * n;
        // Keys the block can see: all of them, or under the causal mask those up to its last row's diagonal.
        const std::int64_t kend = causal ? detail::causal_visible_keys(i0 + n - 1, d.offset(), d.Lk) : d.Lk;

        detail::openblas_workspace& ws = workspaces[static_cast<std::size_t>(thread_index())];
        if (ws.s.empty()) {
          ws.q.resize(static_cast<std::size_t>(rows_max * d.D));
          ws.s.resize(static_cast<std::size_t>(rows_max * d.Lk));
          ws.o.resize(static_cast<std::size_t>(rows_max * d.Dv));
          ws.inv_sum.resize(static_cast<std::size_t>(rows_max));
        }
        if (kend > 0) {
          for (std::int64_t g = 0; g < G; ++g)
            for (std::int64_t r = 0; r < n; ++r)
              std::memcpy(&ws.q[static_cast<std::size_t>((g * n + r) * d.D)], q.ptr(b, hk * G + g, i0 + r),
                          static_cast<std::size_t>(d.D) * sizeof(float));
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(kend),
                      static_cast<int>(d.D), d.scale, ws.q.data(), static_cast<int>(d.D), k.ptr(b, hk),
                      static_cast<int>(k.stride(2)), 0.0f, ws.s.data(), static_cast<int>(kend));
        }
        // Row softmax over the visible prefix of each row; the masked tail becomes 0.
        for (std::int64_t g = 0; g < G; ++g) {
          for (std::int64_t r = 0; r < n; ++r) {
            const std::int64_t i = i0 + r, row = g * n + r;
            const std::int64_t seen = causal ? detail::causal_visible_keys(i, d.offset(), kend) : kend;
            float* s_row = ws.s.data() + row * kend;
            if (seen == 0) {
              std::fill(s_row, s_row + kend, 0.0f);
              ws.inv_sum[static_cast<std::size_t>(row)] = 0.0f;
              if (!lse.empty()) lse(b, hk * G + g, i) = minus_inf;
              continue;
            }
            Eigen::Map<Eigen::ArrayXf> p(s_row, seen);
            const float m = p.maxCoeff();
            p = (p - m).exp();
            const float sum = p.sum();
            std::fill(s_row + seen, s_row + kend, 0.0f);
            ws.inv_sum[static_cast<std::size_t>(row)] = 1.0f / sum;
            if (!lse.empty()) lse(b, hk * G + g, i) = m + std::log(sum);
          }
        }
        if (kend > 0)
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(M), static_cast<int>(d.Dv),
                      static_cast<int>(kend), 1.0f, ws.s.data(), static_cast<int>(kend), v.ptr(b, hk),
                      static_cast<int>(v.stride(2)), 0.0f, ws.o.data(), static_cast<int>(d.Dv));
        for (std::int64_t g = 0; g < G; ++g) {
          for (std::int64_t r = 0; r < n; ++r) {
            const std::int64_t row = g * n + r;
            const float inv = ws.inv_sum[static_cast<std::size_t>(row)];
            const float* acc = ws.o.data() + row * d.Dv;
            float* o_row = out.ptr(b, hk * G + g, i0 + r);
            if (kend == 0) std::fill(o_row, o_row + d.Dv, 0.0f);
            else
              for (std::int64_t c = 0; c < d.Dv; ++c) o_row[c] = acc[c] * inv;
          }
        }
      },
      opt.threads);
}

#endif  // MNEMO_BENCH_OPENBLAS

}  // namespace mnemo::bench::baselines
