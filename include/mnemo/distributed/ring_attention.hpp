// mnemo/distributed/ring_attention.hpp — ring attention over MPI: self-attention over a sequence
// sharded across N ranks, forward and backward, with the K/V blocks travelling around the ring
// while each rank computes on the block it holds.
//
// Forward (Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
// Context", 2023; Li et al., "Sequence Parallelism", 2021). Rank r holds the rows Q_r, K_r, V_r of
// its shard (common.hpp: contiguous, zig-zag or any tiling of [0, L)). In step s = 0 .. N-1 it
// holds the K/V block of rank src = r - s (mod N), and while it computes the partial result of its
// queries over that block
//
//   (o_s, lse_s) = flash(Q_r, K_src, V_src)          with the mod at global positions
//
// it sends the block on to rank r + 1 and receives the next one from rank r - 1 (MPI_Isend /
// MPI_Irecv, double-buffered). The partials combine exactly (merge.hpp):
//
//   lse = log sum_s exp(lse_s),   o = sum_s exp(lse_s - lse) o_s
//
// in step order, so the result does not depend on timing; it equals attention over the whole
// sequence to f32 rounding (one extra rounding per step, the merge's double sums). A (query
// segment, key segment) pair the mod leaves empty (a causal block above the diagonal) is skipped
// without a kernel call. Attention sinks join once, after the last step.
//
// Backward (the same ring; Liu et al. 2023, section 3). With the forward's final out and lse, the
// flash backward of Q_r against one block gives exactly that block's share of the gradients
// (P = exp(s - lse) with the global lse, D = rowsum(dO o O) with the global O):
//
//   dQ_r = sum_s dQ_r|src,    dK_src = sum_r dK_src|r,    dV_src = sum_r dV_src|r.
//
// dQ stays home. dK, dV of a block travel with it: in step s rank r receives from r - 1 the sums
// of block src over the ranks it has already visited, adds its own share (computed while the
// receive is in flight) and sends them on; after N steps they arrive at src. K/V travel N - 1
// hops and dK/dV N hops, each overlapped with a step's compute except the last dK/dV hop home: it
// waits for the neighbour's last step, so one block's transfer per call is exposed. Sums are in
// ring order: the result does not depend on timing. The sinks' gradient is not computed here.
//
// Overlap. Shared-memory and TCP transports progress a large message only inside MPI calls, so
// each step's compute is cut into kernel calls of at most ring_options::progress_rows query rows
// with an MPI_Testall between them. stats (common.hpp) splits each call's time into compute and
// wait (blocked in MPI_Waitall): wait is the communication the compute did not hide.
//
// Shapes (this rank, n = layout.rows()): q [B, Hq, n, D], k [B, Hkv, n, D], v [B, Hkv, n, Dv],
// out [B, Hq, n, Dv], lse [B, Hq, n]; B, Hq, Hkv, D, Dv equal on every rank. K/V elements f32, f16
// or bf16 in the forward, f32 in the backward. Collective over comm: every rank calls with the
// same mod and options.
//
// The readable single-process path is attention::flash / attention::flash_backward over the
// gathered sequence (the tests compare the two).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/flash_backward.hpp"
#include "mnemo/attention/merge.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/distributed/common.hpp"

namespace mnemo::distributed {

struct ring_options {
  attention::options attention = {};  // scale, threads, isa, sinks (sinks: the forward's)
  // Query rows per kernel call; MPI is polled between calls so messages progress during compute.
  // 0: one call per (query segment, key segment) pair.
  std::int64_t progress_rows = 2048;
};

namespace ring_detail {

inline constexpr int tag_kv = 2101, tag_dkv = 2102;

// One (query piece, key segment) kernel call: local rows [q_row, q_row + qn) at global positions
// [q_pos, ...), keys [k_row, k_row + kn) of the block at global positions [k_pos, ...).
struct piece {
  std::int64_t q_row, q_pos, qn, k_row, k_pos, kn;
};

// The calls of one step, in a fixed order: query segments, key segments, query pieces. Pairs the
// mod leaves empty are dropped.
template <class Mod>
std::vector<piece> pieces(const shard& qs, const shard& ks, std::int64_t progress_rows, const Mod& mod) {
  std::vector<piece> out;
  std::int64_t q_row = 0;
  for (const segment& a : qs.segments) {
    std::int64_t k_row = 0;
    for (const segment& b : ks.segments) {
      if (attention::mods::classify(mod, a.start, a.start + a.length, b.start, b.start + b.length) !=
          attention::tile::empty) {
        const std::int64_t step = progress_rows > 0 ? progress_rows : std::max<std::int64_t>(a.length, 1);
        for (std::int64_t i = 0; i < a.length; i += step) {
          const std::int64_t qn = std::min(step, a.length - i);
          if (attention::mods::classify(mod, a.start + i, a.start + i + qn, b.start, b.start + b.length) !=
              attention::tile::empty)
            out.push_back({q_row + i, a.start + i, qn, k_row, b.start, b.length});
        }
      }
      k_row += b.length;
    }
    q_row += a.length;
  }
  return out;
}

// The mod of one call at global positions (common.hpp: query row i of qn sits at i + kn - qn).
template <class Mod>
shifted<Mod> at(const Mod& mod, const piece& p, std::int64_t L) {
  return {mod, p.q_pos - (p.kn - p.qn), p.k_pos, L, L};
}

// Requests in flight; poll() lets them progress between kernel calls.
struct in_flight {
  std::vector<MPI_Request> reqs;
  void poll() {
    if (reqs.empty()) return;
    int done = 0;
    MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE);
  }
  double wait() {  // seconds blocked
    const double t = MPI_Wtime();
    if (!reqs.empty()) MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE);
    reqs.clear();
    return MPI_Wtime() - t;
  }
};

inline int message_bytes(const char* fn, std::int64_t bytes) {
  mnemo::detail::require(bytes <= INT_MAX, fn, ": a block of ", bytes, " bytes exceeds one MPI message (INT_MAX = ",
                         INT_MAX, " bytes); use more ranks or a smaller batch");
  return static_cast<int>(bytes);
}

// The sizes every rank must share: B, Hq, Hkv, D, Dv agree across ranks (collective).
inline void check_same_sizes(const char* fn, MPI_Comm comm, const attention::dims& d) {
  std::int64_t mine[5] = {d.B, d.Hq, d.Hkv, d.D, d.Dv}, lo[5], hi[5];
  MPI_Allreduce(mine, lo, 5, MPI_INT64_T, MPI_MIN, comm);
  MPI_Allreduce(mine, hi, 5, MPI_INT64_T, MPI_MAX, comm);
  const char* names[5] = {"B", "Hq", "Hkv", "D", "Dv"};
  for (int i = 0; i < 5; ++i)
    mnemo::detail::require(lo[i] == hi[i], fn, ": ", names[i], " must be the same on every rank, got values from ",
                           lo[i], " to ", hi[i]);
}

// Copies k and v [B, Hkv, n, D|Dv] into one contiguous block: K rows, then V rows.
template <class T>
void pack(view<const T, 4> k, view<const T, 4> v, T* buf) {
  const std::int64_t B = k.extent(0), H = k.extent(1), n = k.extent(2), D = k.extent(3), Dv = v.extent(3);
  T* kp = buf;
  T* vp = buf + B * H * n * D;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t j = 0; j < n; ++j) {
        std::copy_n(k.ptr(b, h, j), D, kp + ((b * H + h) * n + j) * D);
        std::copy_n(v.ptr(b, h, j), Dv, vp + ((b * H + h) * n + j) * Dv);
      }
}

// The K and V views of a packed block of n rows.
template <class T>
std::pair<view<T, 4>, view<T, 4>> unpack(T* buf, std::int64_t B, std::int64_t H, std::int64_t n, std::int64_t D,
                                         std::int64_t Dv) {
  return {view<T, 4>(buf, {B, H, n, D}), view<T, 4>(buf + B * H * n * D, {B, H, n, Dv})};
}

// out = out e^(lse - lse'), lse' = log(e^lse + e^sink) per row: the sinks joined once (a part with
// lse = sink and out = 0, merged in double).
inline void add_sinks(view<float, 4> out, view<float, 3> lse, view<const float, 1> sinks) {
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  for (std::int64_t b = 0; b < out.extent(0); ++b)
    for (std::int64_t h = 0; h < out.extent(1); ++h) {
      const double sink = sinks(h);
      if (sink == neg_inf) continue;
      for (std::int64_t i = 0; i < out.extent(2); ++i) {
        const double l = lse(b, h, i);
        if (std::isnan(l)) continue;
        const double m = std::max(l, sink), wl = l == neg_inf ? 0.0 : std::exp(l - m), ws = std::exp(sink - m);
        const double f = wl / (wl + ws);
        float* o = out.ptr(b, h, i);
        for (std::int64_t c = 0; c < out.extent(3); ++c) o[c] = static_cast<float>(o[c] * f);
        lse(b, h, i) = static_cast<float>(m + std::log(wl + ws));
      }
    }
}

}  // namespace ring_detail

// Ring attention forward (see the header): this rank's out (and lse) for its rows of the sequence
// laid out by `layout` across the ranks of comm. Collective.
template <class KV, class Mod = attention::mods::none, class TuArch = simd::default_arch>
void ring_attention(MPI_Comm comm, const shard& layout,
                    view<const float, 4> q,   // [B, Hq, n, D]
                    view<const KV, 4> k,      // [B, Hkv, n, D]
                    view<const KV, 4> v,      // [B, Hkv, n, Dv]
                    view<float, 4> out,       // [B, Hq, n, Dv]
                    view<float, 3> lse = {},  // [B, Hq, n] or empty
                    const Mod& mod = {}, const ring_options& opt = {}, stats* st = nullptr) {
  constexpr const char* fn = "distributed::ring_attention";
  using mnemo::detail::require;
  const double t_start = MPI_Wtime();
  const detail::comm_info c = detail::info(fn, comm);
  std::int64_t L = 0;
  const std::vector<shard> all = detail::all_shards(fn, comm, c, layout, L);
  attention::dims d{};
  detail::collective_check(fn, comm, c, [&] {
    require(q.extent(2) == layout.rows(), fn, ": q.shape[2] must be this rank's layout rows = ", layout.rows(),
            ", got ", q.extent(2));
    d = attention::detail::check_args(fn, q, k, v, out, lse, shifted<Mod>{mod, 0, 0, L, L}, opt.attention);
    require(k.extent(2) == q.extent(2), fn, ": k.shape[2] must equal q.shape[2] (self-attention), got ", k.extent(2),
            " and ", q.extent(2));
    if (!same_view(out, q)) mnemo::detail::require_disjoint(fn, "out", out, "q", q);
    require(out.size() == 0 || !same_view(out, q), fn, ": out must not be q (every step reads q)");
    require(opt.progress_rows >= 0, fn, ": ring_options.progress_rows must be >= 0, got ", opt.progress_rows);
  });
  ring_detail::check_same_sizes(fn, comm, d);

  const int N = c.size, r = c.rank, next = (r + 1) % N, prev = (r + N - 1) % N;
  const std::int64_t B = d.B, Hq = d.Hq, Hkv = d.Hkv, D = d.D, Dv = d.Dv, n = q.extent(2);
  std::int64_t n_max = 0, seg_max = 1;
  for (const shard& s : all) {
    n_max = std::max(n_max, s.rows());
    for (const segment& g : s.segments) seg_max = std::max(seg_max, g.length);
  }
  const std::int64_t piece_max = opt.progress_rows > 0 ? std::min(opt.progress_rows, seg_max) : seg_max;
  const auto block_elems = [&](int rank) { return B * Hkv * all[static_cast<std::size_t>(rank)].rows() * (D + Dv); };
  ring_detail::message_bytes(fn, B * Hkv * n_max * (D + Dv) * static_cast<std::int64_t>(sizeof(KV)));

  tensor<KV, 1> buf[2] = {tensor<KV, 1>({B * Hkv * n_max * (D + Dv)}), tensor<KV, 1>({B * Hkv * n_max * (D + Dv)})};
  ring_detail::pack<KV>(k, v, buf[0].data());
  tensor<float, 3> own_lse(lse.empty() ? shape_t<3>{B, Hq, n} : shape_t<3>{0, 0, 0});
  const view<float, 3> acc_lse = lse.empty() ? own_lse.as_view() : lse;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < n; ++i) {
        std::fill_n(out.ptr(b, h, i), Dv, 0.0f);
        acc_lse(b, h, i) = -std::numeric_limits<float>::infinity();
      }
  tensor<float, 4> part_out({B, Hq, piece_max, Dv});
  tensor<float, 3> part_lse({B, Hq, piece_max});
  attention::options kernel_opt = opt.attention;
  kernel_opt.sinks = {};  // joined once, at the end

  stats s{};
  ring_detail::in_flight flight;
  int cur = 0;
  for (int step = 0; step < N; ++step) {
    const int src = (r - step + N) % N, incoming = (src + N - 1) % N;
    if (step + 1 < N) {
      flight.reqs.resize(2);
      MPI_Irecv(buf[1 - cur].data(), static_cast<int>(block_elems(incoming) * sizeof(KV)), MPI_BYTE, prev,
                ring_detail::tag_kv, comm, &flight.reqs[0]);
      MPI_Isend(buf[cur].data(), static_cast<int>(block_elems(src) * sizeof(KV)), MPI_BYTE, next, ring_detail::tag_kv,
                comm, &flight.reqs[1]);
      s.bytes_sent += block_elems(src) * static_cast<std::int64_t>(sizeof(KV));
    }
    const double t_compute = MPI_Wtime();
    const shard& ks = all[static_cast<std::size_t>(src)];
    const auto [kb, vb] = ring_detail::unpack<const KV>(buf[cur].data(), B, Hkv, ks.rows(), D, Dv);
    for (const ring_detail::piece& p : ring_detail::pieces(layout, ks, opt.progress_rows, mod)) {
      const view<float, 4> po(part_out.data(), {B, Hq, p.qn, Dv});
      const view<float, 3> pl(part_lse.data(), {B, Hq, p.qn});
      attention::flash<KV, shifted<Mod>, TuArch>(q.narrow(2, p.q_row, p.qn), kb.narrow(2, p.k_row, p.kn),
                                                 vb.narrow(2, p.k_row, p.kn), po, pl, ring_detail::at(mod, p, L),
                                                 kernel_opt);
      const view<float, 4> oa = out.narrow(2, p.q_row, p.qn);
      const view<float, 3> la = acc_lse.narrow(2, p.q_row, p.qn);
      attention::merge<TuArch>(oa, la, po, pl, oa, la, kernel_opt.threads);
      flight.poll();
    }
    s.compute += MPI_Wtime() - t_compute;
    s.wait += flight.wait();
    cur = 1 - cur;
    ++s.steps;
  }
  if (!opt.attention.sinks.empty()) ring_detail::add_sinks(out, acc_lse, opt.attention.sinks);
  s.total = MPI_Wtime() - t_start;
  if (st) *st = s;
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = attention::mods::none, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void ring_attention(MPI_Comm comm, const shard& layout, view<const float, 4> q, const K& k, const V& v,
                    view<float, 4> out, view<float, 3> lse = {}, const Mod& mod = {}, const ring_options& opt = {},
                    stats* st = nullptr) {
  ring_attention<element_t<K>, Mod, TuArch>(comm, layout, q, cview(k), cview(v), out, lse, mod, opt, st);
}

// Ring attention backward (see the header): this rank's dq, dk, dv from the forward's out and lse
// of its rows. Every score mod needs a known derivative (attention::backward_supported). Collective.
template <class Mod = attention::mods::none, class TuArch = simd::default_arch>
void ring_attention_backward(MPI_Comm comm, const shard& layout,
                             view<const float, 4> q,     // [B, Hq, n, D]
                             view<const float, 4> k,     // [B, Hkv, n, D]
                             view<const float, 4> v,     // [B, Hkv, n, Dv]
                             view<const float, 4> out,   // [B, Hq, n, Dv]  the forward's output
                             view<const float, 3> lse,   // [B, Hq, n]      the forward's lse
                             view<const float, 4> dout,  // [B, Hq, n, Dv]
                             view<float, 4> dq,          // [B, Hq, n, D]
                             view<float, 4> dk,          // [B, Hkv, n, D]
                             view<float, 4> dv,          // [B, Hkv, n, Dv]
                             const Mod& mod = {}, const ring_options& opt = {}, stats* st = nullptr) {
  static_assert(attention::backward_supported<Mod>,
                "distributed::ring_attention_backward: every score mod needs a derivative (mods.hpp: "
                "score_derivative)");
  constexpr const char* fn = "distributed::ring_attention_backward";
  using mnemo::detail::require;
  using mnemo::detail::require_shape;
  const double t_start = MPI_Wtime();
  const detail::comm_info c = detail::info(fn, comm);
  std::int64_t L = 0;
  const std::vector<shard> all = detail::all_shards(fn, comm, c, layout, L);
  attention::dims d{};
  detail::collective_check(fn, comm, c, [&] {
    require(q.extent(2) == layout.rows(), fn, ": q.shape[2] must be this rank's layout rows = ", layout.rows(),
            ", got ", q.extent(2));
    d = attention::detail::check_args(fn, q, k, v, out, view<float, 3>{}, shifted<Mod>{mod, 0, 0, L, L},
                                      opt.attention);
    require(k.extent(2) == q.extent(2), fn, ": k.shape[2] must equal q.shape[2] (self-attention), got ", k.extent(2),
            " and ", q.extent(2));
    require(!lse.empty() || d.B * d.Hq * d.Lq == 0, fn, ": lse must be the forward's lse [B, Hq, n], got an empty view");
    require_shape(fn, "lse", lse, {d.B, d.Hq, d.Lq}, " [B, Hq, n]");
    mnemo::detail::require_data(fn, "dout", dout, " [B, Hq, n, Dv]");
    require_shape(fn, "dout", dout, {d.B, d.Hq, d.Lq, d.Dv}, " [B, Hq, n, Dv]");
    mnemo::detail::require_data(fn, "dq", dq, " [B, Hq, n, D]");
    require_shape(fn, "dq", dq, {d.B, d.Hq, d.Lq, d.D}, " [B, Hq, n, D]");
    mnemo::detail::require_data(fn, "dk", dk, " [B, Hkv, n, D]");
    require_shape(fn, "dk", dk, {d.B, d.Hkv, d.Lk, d.D}, " [B, Hkv, n, D]");
    mnemo::detail::require_data(fn, "dv", dv, " [B, Hkv, n, Dv]");
    require_shape(fn, "dv", dv, {d.B, d.Hkv, d.Lk, d.Dv}, " [B, Hkv, n, Dv]");
    require(opt.progress_rows >= 0, fn, ": ring_options.progress_rows must be >= 0, got ", opt.progress_rows);
  });
  ring_detail::check_same_sizes(fn, comm, d);

  const int N = c.size, r = c.rank, next = (r + 1) % N, prev = (r + N - 1) % N;
  const std::int64_t B = d.B, Hq = d.Hq, Hkv = d.Hkv, D = d.D, Dv = d.Dv, n = q.extent(2);
  std::int64_t n_max = 0, seg_max = 1;
  for (const shard& s : all) {
    n_max = std::max(n_max, s.rows());
    for (const segment& g : s.segments) seg_max = std::max(seg_max, g.length);
  }
  const std::int64_t piece_max = opt.progress_rows > 0 ? std::min(opt.progress_rows, seg_max) : seg_max;
  const auto rows_of = [&](int rank) { return all[static_cast<std::size_t>(rank)].rows(); };
  const auto block_bytes = [&](int rank) {
    return static_cast<int>(B * Hkv * rows_of(rank) * (D + Dv) * static_cast<std::int64_t>(sizeof(float)));
  };
  const std::int64_t block_max = B * Hkv * n_max * (D + Dv);
  ring_detail::message_bytes(fn, block_max * static_cast<std::int64_t>(sizeof(float)));

  tensor<float, 1> kv[2] = {tensor<float, 1>({block_max}), tensor<float, 1>({block_max})};
  tensor<float, 1> dkv[2] = {tensor<float, 1>({block_max}), tensor<float, 1>({block_max})};
  tensor<float, 1> dkv_local({block_max});
  tensor<float, 4> tmp_dq({B, Hq, piece_max, D}), tmp_dk({B, Hkv, seg_max, D}), tmp_dv({B, Hkv, seg_max, Dv});
  ring_detail::pack<float>(k, v, kv[0].data());
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < n; ++i) std::fill_n(dq.ptr(b, h, i), D, 0.0f);
  attention::options kernel_opt = opt.attention;
  kernel_opt.sinks = {};  // P comes from the final lse, which holds the sinks already

  stats s{};
  ring_detail::in_flight flight;
  MPI_Request dkv_sent[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  const auto wait_one = [&](MPI_Request& req) {
    const double t = MPI_Wtime();
    MPI_Wait(&req, MPI_STATUS_IGNORE);
    s.wait += MPI_Wtime() - t;
  };
  int cur = 0;
  for (int step = 0; step < N; ++step) {
    const int src = (r - step + N) % N, incoming = (src + N - 1) % N, slot = step % 2;
    const std::int64_t ns = rows_of(src);
    if (step + 1 < N) {
      flight.reqs.push_back(MPI_REQUEST_NULL);
      MPI_Irecv(kv[1 - cur].data(), block_bytes(incoming), MPI_BYTE, prev, ring_detail::tag_kv, comm,
                &flight.reqs.back());
      flight.reqs.push_back(MPI_REQUEST_NULL);
      MPI_Isend(kv[cur].data(), block_bytes(src), MPI_BYTE, next, ring_detail::tag_kv, comm, &flight.reqs.back());
      s.bytes_sent += block_bytes(src);
    }
    if (step > 0) {  // the sums of block src so far, from the ranks before us
      wait_one(dkv_sent[slot]);  // the send from step - 2 used this buffer
      flight.reqs.push_back(MPI_REQUEST_NULL);
      MPI_Irecv(dkv[slot].data(), block_bytes(src), MPI_BYTE, prev, ring_detail::tag_dkv, comm, &flight.reqs.back());
    }
    const double t_compute = MPI_Wtime();
    const auto [kb, vb] = ring_detail::unpack<const float>(kv[cur].data(), B, Hkv, ns, D, Dv);
    const auto [dkl, dvl] = ring_detail::unpack<float>(dkv_local.data(), B, Hkv, ns, D, Dv);
    std::fill_n(dkv_local.data(), B * Hkv * ns * (D + Dv), 0.0f);
    for (const ring_detail::piece& p : ring_detail::pieces(layout, all[static_cast<std::size_t>(src)],
                                                           opt.progress_rows, mod)) {
      const view<float, 4> gq(tmp_dq.data(), {B, Hq, p.qn, D});
      const view<float, 4> gk(tmp_dk.data(), {B, Hkv, p.kn, D});
      const view<float, 4> gv(tmp_dv.data(), {B, Hkv, p.kn, Dv});
      attention::flash_backward<shifted<Mod>, TuArch>(
          q.narrow(2, p.q_row, p.qn), kb.narrow(2, p.k_row, p.kn), vb.narrow(2, p.k_row, p.kn),
          out.narrow(2, p.q_row, p.qn), lse.narrow(2, p.q_row, p.qn), dout.narrow(2, p.q_row, p.qn), gq, gk, gv,
          ring_detail::at(mod, p, L), kernel_opt);
      for (std::int64_t b = 0; b < B; ++b) {
        for (std::int64_t h = 0; h < Hq; ++h)
          for (std::int64_t i = 0; i < p.qn; ++i) {
            float* dst = dq.ptr(b, h, p.q_row + i);
            const float* add = gq.ptr(b, h, i);
            for (std::int64_t x = 0; x < D; ++x) dst[x] += add[x];
          }
        for (std::int64_t h = 0; h < Hkv; ++h)
          for (std::int64_t j = 0; j < p.kn; ++j) {
            float* dst_k = dkl.ptr(b, h, p.k_row + j);
            float* dst_v = dvl.ptr(b, h, p.k_row + j);
            const float* add_k = gk.ptr(b, h, j);
            const float* add_v = gv.ptr(b, h, j);
            for (std::int64_t x = 0; x < D; ++x) dst_k[x] += add_k[x];
            for (std::int64_t x = 0; x < Dv; ++x) dst_v[x] += add_v[x];
          }
      }
      flight.poll();
    }
    s.compute += MPI_Wtime() - t_compute;
    s.wait += flight.wait();
    // This rank's share joins the sums that came in (ring order), and the sums go on.
    const std::int64_t elems = B * Hkv * ns * (D + Dv);
    float* acc = dkv[slot].data();
    const float* mine = dkv_local.data();
    if (step == 0) std::copy_n(mine, elems, acc);
    else
      for (std::int64_t x = 0; x < elems; ++x) acc[x] += mine[x];
    if (N > 1) {
      MPI_Isend(acc, block_bytes(src), MPI_BYTE, next, ring_detail::tag_dkv, comm, &dkv_sent[slot]);
      s.bytes_sent += block_bytes(src);
    }
    cur = 1 - cur;
    ++s.steps;
  }
  // After N steps the sums of our own block arrive from the previous rank.
  const int home = N % 2;
  if (N > 1) {
    wait_one(dkv_sent[home]);
    MPI_Request req;
    MPI_Irecv(dkv[home].data(), block_bytes(r), MPI_BYTE, prev, ring_detail::tag_dkv, comm, &req);
    wait_one(req);
    wait_one(dkv_sent[1 - home]);
  }
  const auto [gk, gv] = ring_detail::unpack<const float>(dkv[N > 1 ? home : 0].data(), B, Hkv, n, D, Dv);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hkv; ++h)
      for (std::int64_t j = 0; j < n; ++j) {
        std::copy_n(gk.ptr(b, h, j), D, dk.ptr(b, h, j));
        std::copy_n(gv.ptr(b, h, j), Dv, dv.ptr(b, h, j));
      }
  s.total = MPI_Wtime() - t_start;
  if (st) *st = s;
}

}  // namespace mnemo::distributed
