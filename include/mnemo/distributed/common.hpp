// mnemo/distributed/common.hpp — what ring attention and sharded decode share: how a sequence is
// laid out over MPI ranks (shards of global positions), the mod adapter that gives a kernel
// running on one shard the global positions, collective argument checks, and small MPI helpers.
//
// Optional component (DESIGN.md, "Optional components"): it needs MPI (Debian's OpenMPI,
// libopenmpi-dev) and is the CMake target mnemo::distributed; nothing in the header-only core
// includes it. MPI must be initialised by the caller (MPI_Init or MPI_Init_thread with at least
// MPI_THREAD_FUNNELED: only the calling thread talks to MPI; the kernels' OpenMP threads never do).
//
// Shards. A rank holds some rows of a sequence of L tokens as one or more segments of global
// positions, in the order the rows lie in its local tensors:
//   contiguous_shard(L, r, N)   rank r holds [r L / N, (r + 1) L / N) (sizes differ by at most 1)
//   zigzag_shard(L, r, N)       the sequence in 2N chunks (sizes differ by at most 1); rank r holds
//                               chunks r and 2N-1-r, in that order. Under a causal mask every rank
//                               then has the same amount of visible work (Brandon et al., "Striped
//                               Attention", 2023, and the zig-zag layout of ring-flash-attention).
// Any other layout works too: a shard is just its list of segments; together the ranks' segments
// must tile [0, L) exactly (checked, collectively).
//
// Positions. The tiled kernels pass a mod query position i + (Lk - Lq) for local query row i and
// key position j for local key j (mods.hpp). shifted<Mod> adds the offsets that turn these into
// global positions, so every mod (causal, sliding_window, alibi, document, prefix_lm, compositions,
// a user's) sees the same (query, key) pairs as it would in one process:
//   qp_global = qp_local + dq,   kp_global = kp_local + dk.
//
// Errors. Every rank checks the arguments, then the ranks agree (one MPI_Allreduce) on whether any
// failed; if one did, every rank throws mnemo::error (the failing rank with its own message, the
// others naming the failing rank), so no rank is left waiting in a collective.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "mnemo/attention/mods.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::distributed {

// A run of `length` local rows holding global positions [start, start + length).
struct segment {
  std::int64_t start = 0, length = 0;
};

// The rows of one rank: its segments, in the order its local rows hold them.
struct shard {
  std::vector<segment> segments;

  std::int64_t rows() const {
    std::int64_t n = 0;
    for (const segment& s : segments) n += s.length;
    return n;
  }
};

namespace detail {

// Start of part p of n of [0, L) in parts whose sizes differ by at most 1 (the larger ones first).
inline std::int64_t balanced_start(std::int64_t L, std::int64_t n, std::int64_t p) {
  const std::int64_t base = L / n, extra = L % n;
  return p * base + std::min(p, extra);
}

inline void check_layout_args(const char* fn, std::int64_t L, int rank, int ranks) {
  mnemo::detail::require(L >= 0, fn, ": L must be >= 0, got ", L);
  mnemo::detail::require(ranks >= 1, fn, ": ranks must be >= 1, got ", ranks);
  mnemo::detail::require(rank >= 0 && rank < ranks, fn, ": rank must be in [0, ", ranks, "), got ", rank);
}

}  // namespace detail

// Rank r of N holds the r-th of N contiguous runs of [0, L).
inline shard contiguous_shard(std::int64_t L, int rank, int ranks) {
  detail::check_layout_args("distributed::contiguous_shard", L, rank, ranks);
  const std::int64_t a = detail::balanced_start(L, ranks, rank), b = detail::balanced_start(L, ranks, rank + 1);
  return {{{a, b - a}}};
}

// Rank r of N holds chunks r and 2N-1-r of [0, L) cut into 2N chunks (the causal load balance).
inline shard zigzag_shard(std::int64_t L, int rank, int ranks) {
  detail::check_layout_args("distributed::zigzag_shard", L, rank, ranks);
  const std::int64_t n = 2 * static_cast<std::int64_t>(ranks), c0 = rank, c1 = n - 1 - rank;
  const auto chunk = [&](std::int64_t c) {
    const std::int64_t a = detail::balanced_start(L, n, c);
    return segment{a, detail::balanced_start(L, n, c + 1) - a};
  };
  return {{chunk(c0), chunk(c1)}};
}

// The mod adapter: Mod at global positions (see the header). lq_global and lk_global are the
// global lengths Mod is validated against (a document mask's ids are per global key).
template <class Mod>
struct shifted {
  Mod inner;
  std::int64_t dq = 0, dk = 0;                    // added to the kernel's query and key positions
  std::int64_t lq_global = 0, lk_global = 0;      // for inner's validate

  bool visible(std::int64_t h, std::int64_t qp, std::int64_t kp) const
    requires attention::has_visible<Mod>
  {
    return attention::mods::visible(inner, h, qp + dq, kp + dk);
  }
  attention::tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    return attention::mods::classify(inner, q0 + dq, q1 + dq, k0 + dk, k1 + dk);
  }
  void mask_tile(float* s, std::int64_t ld, std::int64_t h, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const
    requires attention::has_visible<Mod>
  {
    attention::mods::mask_tile(inner, s, ld, h, qp0 + dq, qn, k0 + dk, kn);
  }
  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const
    requires attention::has_score<Mod>
  {
    return inner.score(s, h, qp + dq, kp + dk);
  }
  template <class S>
  S score_derivative(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const
    requires attention::has_score_derivative<Mod>
  {
    return inner.score_derivative(s, h, qp + dq, kp + dk);
  }
  template <class Arch>
  void score_tile(float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t qn, std::int64_t nq,
                  std::int64_t h, std::int64_t qp0, std::int64_t k0) const
    requires attention::has_score<Mod>
  {
    attention::mods::score_tile<Arch>(inner, s, g, ld, kn, qn, nq, h, qp0 + dq, k0 + dk);
  }
  void validate(const char* fn, std::int64_t Hq, std::int64_t, std::int64_t) const {
    attention::mods::validate(inner, fn, Hq, lq_global, lk_global);
  }
};

// Statistics of one distributed call on this rank (wall-clock seconds, MPI_Wtime).
struct stats {
  double total = 0;    // the whole call
  double compute = 0;  // local kernels and merges
  double wait = 0;     // blocked in MPI_Wait / MPI_Waitall / collectives: communication not hidden
  std::int64_t bytes_sent = 0;
  int steps = 0;
};

namespace detail {

struct comm_info {
  int rank = 0, size = 1;
};

inline comm_info info(const char* fn, MPI_Comm comm) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  mnemo::detail::require(initialized && !finalized, fn, ": MPI must be initialised (MPI_Init) and not finalised");
  mnemo::detail::require(comm != MPI_COMM_NULL, fn, ": comm must be a communicator, got MPI_COMM_NULL");
  comm_info c;
  MPI_Comm_rank(comm, &c.rank);
  MPI_Comm_size(comm, &c.size);
  return c;
}

inline void check_mpi(int rc, const char* fn, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  mnemo::detail::fail(fn, ": ", call, " failed: ", std::string(text, static_cast<std::size_t>(len)));
}

// Runs check() (which throws mnemo::error on a bad argument) on every rank, then agrees: if any
// rank failed, every rank throws (see the header). Collective over comm.
template <class Check>
void collective_check(const char* fn, MPI_Comm comm, const comm_info& c, Check&& check) {
  std::string message;
  try {
    check();
  } catch (const mnemo::error& e) {
    message = e.what();
  }
  int mine = message.empty() ? c.size : c.rank, first = c.size;  // the lowest failing rank
  MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
  if (first == c.size) return;
  if (!message.empty()) throw mnemo::error(message);
  mnemo::detail::fail(fn, ": an argument is invalid on rank ", first, " (see that rank's error)");
}

// Every rank's segments, in rank order, and the global length. Throws (collectively) unless the
// segments of all ranks tile [0, L).
inline std::vector<shard> all_shards(const char* fn, MPI_Comm comm, const comm_info& c, const shard& mine,
                                     std::int64_t& L) {
  int n = static_cast<int>(mine.segments.size());
  std::vector<int> counts(static_cast<std::size_t>(c.size)), displs(static_cast<std::size_t>(c.size));
  MPI_Allgather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, comm);
  int total = 0;
  for (int r = 0; r < c.size; ++r) {
    displs[static_cast<std::size_t>(r)] = 2 * total;
    total += counts[static_cast<std::size_t>(r)];
    counts[static_cast<std::size_t>(r)] *= 2;
  }
  std::vector<std::int64_t> flat_mine, flat(static_cast<std::size_t>(2 * total));
  for (const segment& s : mine.segments) flat_mine.insert(flat_mine.end(), {s.start, s.length});
  MPI_Allgatherv(flat_mine.data(), 2 * n, MPI_INT64_T, flat.data(), counts.data(), displs.data(), MPI_INT64_T, comm);
  std::vector<shard> all(static_cast<std::size_t>(c.size));
  std::vector<segment> sorted;
  for (int r = 0; r < c.size; ++r)
    for (int i = 0; i < counts[static_cast<std::size_t>(r)] / 2; ++i) {
      const std::size_t at = static_cast<std::size_t>(displs[static_cast<std::size_t>(r)] + 2 * i);
      all[static_cast<std::size_t>(r)].segments.push_back({flat[at], flat[at + 1]});
      sorted.push_back({flat[at], flat[at + 1]});
    }
  std::sort(sorted.begin(), sorted.end(), [](const segment& a, const segment& b) { return a.start < b.start; });
  // Every rank sees the same list, so every rank reaches the same verdict: no agreement step needed.
  std::int64_t next = 0;
  for (const segment& s : sorted) {
    mnemo::detail::require(s.length >= 0, fn, ": layout: a segment length must be >= 0, got ", s.length,
                           " (segment at ", s.start, ")");
    if (s.length == 0) continue;
    mnemo::detail::require(s.start == next, fn, ": layout: the ranks' segments must tile [0, L) without gaps or ",
                           "overlaps; expected a segment starting at ", next, ", got one at ", s.start);
    next += s.length;
  }
  L = next;
  return all;
}

}  // namespace detail
}  // namespace mnemo::distributed
