// mnemo/distributed/sharded_decode.hpp — decode against a KV cache split across MPI ranks: each
// rank attends the step's queries to its own keys, and the partial results (out, lse) combine
// exactly across ranks.
//
// Rank r holds keys X_r (a contiguous run of the cache, or any disjoint part: dense or quantized,
// contiguous or paged; whatever kernel reads it must give (out, lse)). With its partial
// (o_r, lse_r) (merge.hpp):
//
//   m = max_r lse_r,   lse = m + log sum_r exp(lse_r - m),   o = sum_r exp(lse_r - lse) o_r
//
// which is attention over the union (Flash-Decoding's combine, Dao et al. 2023, across machines).
// The merge is associative and commutative in exact arithmetic, not in floating point, so the
// order is fixed (DESIGN.md: results do not depend on timing). Two ways, reduction::
//
//   ordered_op (default)  MPI_Allreduce with a user operation (MPI_Op_create) over a packed
//                         (lse, out[0 .. Dv)) datatype, declared NON-commutative: the MPI standard
//                         then combines operands in rank order, and the library picks its reduction
//                         tree from the communicator size and the message size only, never from
//                         arrival times. Result: bit-identical from run to run for a given MPI
//                         library, N and shape; one message per tree level (log N latency).
//   gather                MPI_Allgather of every rank's packed partials, then the N-way merge of
//                         merge.hpp in rank order on every rank: bit-identical to
//                         attention::merge of the same N partials in one process, whatever the MPI
//                         library; N x the bytes of ordered_op per rank.
//
// Positions (mods): rank r's keys are the global keys [start_r, start_r + n_r) with start_r the sum
// of the lower ranks' counts; the queries are the newest tokens (query row i at Lk_total - Lq + i),
// so sharded_decode passes the mod shifted<Mod> (common.hpp) and every mod sees global positions.
// Attention sinks join once, after the combine.
//
// Shapes (this rank): q [B, Hq, Lq, D] (the same on every rank), k [B, Hkv, n_r, D],
// v [B, Hkv, n_r, Dv], out [B, Hq, Lq, Dv], lse [B, Hq, Lq]. A cache's decode (kvcache::decode,
// paged_attention) gives [Hq, Lq, Dv] and [Hq, Lq]: combine has an overload for those.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/merge.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/distributed/common.hpp"
#include "mnemo/distributed/ring_attention.hpp"
#include "mnemo/simd/arch.hpp"

namespace mnemo::distributed {

enum class reduction { ordered_op, gather };

namespace sharded_detail {

// The user operation of reduction::ordered_op: inout = in (lower ranks) merged with inout (higher
// ranks), row by row; a row is (lse, out[0 .. Dv)) as Dv + 1 floats.
template <class Arch>
void merge_op(void* in, void* inout, int* len, MPI_Datatype* type) {
  int bytes = 0;
  MPI_Type_size(*type, &bytes);
  const std::int64_t row = bytes / static_cast<int>(sizeof(float)), Dv = row - 1;
  const float* a = static_cast<const float*>(in);
  float* b = static_cast<float*>(inout);
  for (int x = 0; x < *len; ++x) {
    const float* pa = a + x * row;
    float* pb = b + x * row;
    const float* parts[2] = {pa + 1, pb + 1};
    const float lses[2] = {pa[0], pb[0]};
    float w[2];
    attention::merge_row<Arch>(
        2, [&](std::int64_t p) { return parts[p]; }, [&](std::int64_t p) { return lses[p]; }, w, Dv, pb + 1, pb);
  }
}

// The packed rows (lse, out) of out [B, Hq, Lq, Dv] and lse [B, Hq, Lq], row-major over (b, h, i).
inline void pack(view<const float, 4> out, view<const float, 3> lse, float* dst) {
  const std::int64_t Dv = out.extent(3);
  for (std::int64_t b = 0; b < out.extent(0); ++b)
    for (std::int64_t h = 0; h < out.extent(1); ++h)
      for (std::int64_t i = 0; i < out.extent(2); ++i, dst += Dv + 1) {
        dst[0] = lse(b, h, i);
        std::copy_n(out.ptr(b, h, i), Dv, dst + 1);
      }
}

inline void unpack(const float* src, view<float, 4> out, view<float, 3> lse) {
  const std::int64_t Dv = out.extent(3);
  for (std::int64_t b = 0; b < out.extent(0); ++b)
    for (std::int64_t h = 0; h < out.extent(1); ++h)
      for (std::int64_t i = 0; i < out.extent(2); ++i, src += Dv + 1) {
        lse(b, h, i) = src[0];
        std::copy_n(src + 1, Dv, out.ptr(b, h, i));
      }
}

// The combine on validated arguments (see combine below).
template <class TuArch>
void combine(MPI_Comm comm, const detail::comm_info& c, view<float, 4> out, view<float, 3> lse, reduction how,
             stats& s) {
  const std::int64_t Dv = out.extent(3), rows = out.extent(0) * out.extent(1) * out.extent(2), row = Dv + 1;
  std::vector<float> mine(static_cast<std::size_t>(rows * row));
  pack(out, lse, mine.data());
  const double t = MPI_Wtime();
  if (how == reduction::ordered_op) {
    MPI_Datatype type;
    MPI_Type_contiguous(static_cast<int>(row), MPI_FLOAT, &type);
    MPI_Type_commit(&type);
    MPI_Op op;
    MPI_Op_create(&merge_op<TuArch>, /*commute=*/0, &op);
    std::vector<float> result(mine.size());
    const int rc = MPI_Allreduce(mine.data(), result.data(), static_cast<int>(rows), type, op, comm);
    MPI_Op_free(&op);
    MPI_Type_free(&type);
    detail::check_mpi(rc, "distributed::combine", "MPI_Allreduce");
    s.wait += MPI_Wtime() - t;
    s.bytes_sent += rows * row * static_cast<std::int64_t>(sizeof(float));
    unpack(result.data(), out, lse);
    return;
  }
  std::vector<float> every(static_cast<std::size_t>(rows * row * c.size));
  const int rc = MPI_Allgather(mine.data(), static_cast<int>(rows * row), MPI_FLOAT, every.data(),
                               static_cast<int>(rows * row), MPI_FLOAT, comm);
  detail::check_mpi(rc, "distributed::combine", "MPI_Allgather");
  s.wait += MPI_Wtime() - t;
  s.bytes_sent += rows * row * static_cast<std::int64_t>(sizeof(float)) * (c.size - 1);
  const double t_merge = MPI_Wtime();
  std::vector<float> w(static_cast<std::size_t>(c.size));
  simd::dispatch<TuArch>(simd::level::automatic, [&]<class Arch>() {
    for (std::int64_t x = 0; x < rows; ++x) {
      const std::int64_t stride = rows * row;
      float* res = mine.data() + x * row;
      attention::merge_row<Arch>(
          c.size, [&](std::int64_t p) { return every.data() + p * stride + x * row + 1; },
          [&](std::int64_t p) { return every[static_cast<std::size_t>(p * stride + x * row)]; }, w.data(), Dv,
          res + 1, res);
    }
  });
  s.compute += MPI_Wtime() - t_merge;
  unpack(mine.data(), out, lse);
}

}  // namespace sharded_detail

// Replaces this rank's partial (out, lse) over its keys by the result over every rank's keys, the
// same on every rank (see the header for `how`). B, Hq, Lq, Dv must agree across ranks. Collective.
template <class TuArch = simd::default_arch>
void combine(MPI_Comm comm,
             view<float, 4> out,  // [B, Hq, Lq, Dv]  in: this rank's partial; out: the merged result
             view<float, 3> lse,  // [B, Hq, Lq]      likewise
             reduction how = reduction::ordered_op, stats* st = nullptr) {
  constexpr const char* fn = "distributed::combine";
  const double t0 = MPI_Wtime();
  const detail::comm_info c = detail::info(fn, comm);
  detail::collective_check(fn, comm, c, [&] {
    mnemo::detail::require_data(fn, "out", out, " [B, Hq, Lq, Dv]");
    mnemo::detail::require(!lse.empty() || lse.size() == 0, fn, ": lse must be a view of memory");
    mnemo::detail::require_shape(fn, "lse", lse, {out.extent(0), out.extent(1), out.extent(2)},
                                 " [B, Hq, Lq] (from out)");
    mnemo::detail::require(how == reduction::ordered_op || how == reduction::gather, fn,
                           ": how must be reduction::ordered_op or reduction::gather, got ", static_cast<int>(how));
  });
  std::int64_t mine[4] = {out.extent(0), out.extent(1), out.extent(2), out.extent(3)}, lo[4], hi[4];
  MPI_Allreduce(mine, lo, 4, MPI_INT64_T, MPI_MIN, comm);
  MPI_Allreduce(mine, hi, 4, MPI_INT64_T, MPI_MAX, comm);
  const char* names[4] = {"B", "Hq", "Lq", "Dv"};
  for (int i = 0; i < 4; ++i)
    mnemo::detail::require(lo[i] == hi[i], fn, ": out.shape[", i, "] (", names[i],
                           ") must be the same on every rank, got values from ", lo[i], " to ", hi[i]);
  mnemo::detail::require(out.extent(0) * out.extent(1) * out.extent(2) <= INT_MAX, fn,
                         ": more than INT_MAX rows (B * Hq * Lq) in one combine");
  stats s{};
  sharded_detail::combine<TuArch>(comm, c, out, lse, how, s);
  s.total = MPI_Wtime() - t0;
  s.steps = 1;
  if (st) *st = s;
}

// Sharded decode over strided K/V views (attention::decode on each rank's keys, then combine):
// out and lse (the latter may be empty) hold the result over every rank's keys, on every rank.
// K/V elements float, f16 or bf16. Collective.
template <class KV, class Mod = attention::mods::none, class TuArch = simd::default_arch>
void sharded_decode(MPI_Comm comm,
                    view<const float, 4> q,   // [B, Hq, Lq, D]   the same on every rank
                    view<const KV, 4> k,      // [B, Hkv, n_r, D] this rank's keys
                    view<const KV, 4> v,      // [B, Hkv, n_r, Dv]
                    view<float, 4> out,       // [B, Hq, Lq, Dv]
                    view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                    const Mod& mod = {}, const attention::options& opt = {},
                    reduction how = reduction::ordered_op, stats* st = nullptr) {
  constexpr const char* fn = "distributed::sharded_decode";
  const double t0 = MPI_Wtime();
  const detail::comm_info c = detail::info(fn, comm);
  std::int64_t n = k.extent(2), start = 0, L = 0;
  MPI_Exscan(&n, &start, 1, MPI_INT64_T, MPI_SUM, comm);
  if (c.rank == 0) start = 0;  // MPI_Exscan leaves rank 0's result undefined
  MPI_Allreduce(&n, &L, 1, MPI_INT64_T, MPI_SUM, comm);
  const std::int64_t Lq = q.extent(2);
  const shifted<Mod> local{mod, L - n, start, Lq, L};
  detail::collective_check(fn, comm, c, [&] {
    attention::detail::check_args(fn, q, k, v, out, lse, local, opt);
    mnemo::detail::require(Lq <= attention::decode_max_rows, fn, ": q.shape[2] (Lq) must be <= ",
                           attention::decode_max_rows, ", got ", Lq);
  });
  tensor<float, 3> own_lse(lse.empty() ? shape_t<3>{out.extent(0), out.extent(1), Lq} : shape_t<3>{0, 0, 0});
  const view<float, 3> l = lse.empty() ? own_lse.as_view() : lse;
  attention::options kernel_opt = opt;
  kernel_opt.sinks = {};  // joined once, after the combine
  stats s{};
  const double t = MPI_Wtime();
  attention::decode<KV, shifted<Mod>, TuArch>(q, k, v, out, l, local, kernel_opt);
  s.compute += MPI_Wtime() - t;
  combine<TuArch>(comm, out, l, how, nullptr);
  const double t_comb = MPI_Wtime() - t;
  s.wait += t_comb - s.compute;
  if (!opt.sinks.empty()) ring_detail::add_sinks(out, l, opt.sinks);
  s.total = MPI_Wtime() - t0;
  s.steps = 1;
  if (st) *st = s;
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = attention::mods::none, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void sharded_decode(MPI_Comm comm, view<const float, 4> q, const K& k, const V& v, view<float, 4> out,
                    view<float, 3> lse = {}, const Mod& mod = {}, const attention::options& opt = {},
                    reduction how = reduction::ordered_op, stats* st = nullptr) {
  sharded_decode<element_t<K>, Mod, TuArch>(comm, q, cview(k), cview(v), out, lse, mod, opt, how, st);
}

// The combine for one sequence's rows, out [Hq, Lq, Dv] and lse [Hq, Lq]: the shapes of
// kvcache::decode (any storage kind: f32, f16, bf16, KIVI int8/int4/int2) and of one sequence of
// kvcache::paged_attention. Each rank decodes from its own cache with options.sinks empty, then
//   distributed::combine(comm, out, lse);
// and adds the sinks, if any, after it (a sink is one more part with lse = sink and out = 0).
// This header does not include the caches, whose decode kernels cost a test translation unit
// about 24 s of compile for every storage kind they instantiate. Collective.
template <class TuArch = simd::default_arch>
void combine(MPI_Comm comm,
             view<float, 3> out,  // [Hq, Lq, Dv]
             view<float, 2> lse,  // [Hq, Lq]
             reduction how = reduction::ordered_op, stats* st = nullptr) {
  const view<float, 4> o4(out.data(), {1, out.extent(0), out.extent(1), out.extent(2)},
                          {0, out.stride(0), out.stride(1), 1});
  const view<float, 3> l3(lse.data(), {1, lse.extent(0), lse.extent(1)}, {0, lse.stride(0), 1});
  combine<TuArch>(comm, o4, l3, how, st);
}

}  // namespace mnemo::distributed
