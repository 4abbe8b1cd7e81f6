// 40 — a million-token causal prefill over MPI ranks (ring attention), then one decode step over
// the KV cache the prefill left sharded across the ranks.
//
//   mpirun -np 4 ./example_40_ring_prefill [L]        L: sequence length, default 1048576
//
// Each rank holds only its zig-zag shard of the sequence (distributed/common.hpp: chunks r and
// 2N-1-r of 2N), so under the causal mask every rank has the same work. Q, K, V are generated per
// global position from a stateless hash (core/random.hpp), so no rank ever holds the whole
// sequence, and the checks below can regenerate any key they need.
//
// The program checks what follows from the definitions, not from the code under test:
//   1. the prefill rows at the ends of every segment equal attention computed here in double over
//      keys 0 .. p, streamed from the generator (the causal row of position p);
//   2. the decode step (a new token at position L, which sees every key) equals the same streamed
//      computation over all L keys, and every rank holds the same bytes.
// Run time: the prefill is L^2 / 2 x 4D flops, 3.2e13 for L = 1M at D = 16. On the project's 2-core
// VM (4 ranks, -O3, under load) L = 65536 took 11 s and L = 262144 took 262 s (8.4 GFLOP/s in all:
// tiles of D = 16 keep the kernel far from its peak), so L = 1M takes about 70 minutes there and
// minutes on 4 real machines; the test suite runs this example with L = 16384 (about 2 s).
#include <mpi.h>

#include <mnemo/distributed/ring_attention.hpp>
#include <mnemo/distributed/sharded_decode.hpp>
#include <mnemo/core/random.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace dist = mnemo::distributed;
namespace att = mnemo::attention;

namespace {

constexpr std::int64_t D = 16;  // small head dim: the point is the length
constexpr std::uint64_t seed = 40;

// Element c of the row of tensor t (0: q, 1: k, 2: v, 3: the decode query) at global position p.
float value(std::uint64_t t, std::int64_t p, std::int64_t c) {
  const std::uint64_t id = (t << 56) ^ (static_cast<std::uint64_t>(p) << 6) ^ static_cast<std::uint64_t>(c);
  return static_cast<float>(2.0 * mnemo::rng::to_unit(mnemo::rng::mix(seed ^ mnemo::rng::mix(id))) - 1.0);
}

// Attention of query row qrow over keys 0 .. last, in double, keys and values streamed from the
// generator: out [D] and the lse.
double streamed_row(const float* qrow, std::int64_t last, double* out) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  double m = -INFINITY, l = 0, acc[D] = {};
  for (std::int64_t j = 0; j <= last; ++j) {
    double s = 0;
    for (std::int64_t c = 0; c < D; ++c) s += static_cast<double>(qrow[c]) * value(1, j, c);
    s *= scale;
    const double m2 = std::max(m, s), a = std::exp(m - m2), e = std::exp(s - m2);
    l = l * a + e;
    for (std::int64_t c = 0; c < D; ++c) acc[c] = acc[c] * a + e * value(2, j, c);
    m = m2;
  }
  for (std::int64_t c = 0; c < D; ++c) out[c] = acc[c] / l;
  return m + std::log(l);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, N = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &N);
  const std::int64_t L = argc > 1 ? std::atoll(argv[1]) : std::int64_t{1} << 20;
  if (L < 1) {
    if (rank == 0) std::fprintf(stderr, "usage: %s [L >= 1]\n", argv[0]);
    MPI_Finalize();
    return 2;
  }

  // This rank's shard and its rows of Q, K, V ([B = 1, H = 1, n, D]).
  const dist::shard shard = dist::zigzag_shard(L, rank, N);
  const std::int64_t n = shard.rows();
  mnemo::tensor<float, 4> q({1, 1, n, D}), k({1, 1, n, D}), v({1, 1, n, D}), out({1, 1, n, D});
  mnemo::tensor<float, 3> lse({1, 1, n});
  std::vector<std::int64_t> position;  // global position of each local row
  for (const dist::segment& s : shard.segments)
    for (std::int64_t j = 0; j < s.length; ++j) position.push_back(s.start + j);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t c = 0; c < D; ++c) {
      q(0, 0, i, c) = value(0, position[static_cast<std::size_t>(i)], c);
      k(0, 0, i, c) = value(1, position[static_cast<std::size_t>(i)], c);
      v(0, 0, i, c) = value(2, position[static_cast<std::size_t>(i)], c);
    }

  // 1. The prefill: causal ring attention. One thread per rank (the ranks share the cores).
  dist::ring_options ro;
  ro.attention.threads = 1;
  dist::stats st;
  MPI_Barrier(MPI_COMM_WORLD);
  dist::ring_attention(MPI_COMM_WORLD, shard, mnemo::cview(q), k, v, out, lse, att::mods::causal{}, ro, &st);
  double worst = 0;
  std::int64_t row = 0;
  for (const dist::segment& s : shard.segments) {
    for (std::int64_t i : {row, row + s.length - 1}) {
      if (s.length == 0) break;
      double want[D];
      const double want_lse = streamed_row(q.as_view().ptr(0, 0, i), position[static_cast<std::size_t>(i)], want);
      for (std::int64_t c = 0; c < D; ++c) worst = std::max(worst, std::abs(out(0, 0, i, c) - want[c]));
      worst = std::max(worst, std::abs(lse(0, 0, i) - want_lse) / std::max(1.0, std::abs(want_lse)));
    }
    row += s.length;
  }
  double prefill_err = 0, slowest = 0, wait = 0, compute = 0;
  MPI_Allreduce(&worst, &prefill_err, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(&st.total, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(&st.wait, &wait, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(&st.compute, &compute, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);

  // 2. One decode step: a new token at position L sees every key, wherever it lives.
  mnemo::tensor<float, 4> qn({1, 1, 1, D}), on({1, 1, 1, D});
  mnemo::tensor<float, 3> ln({1, 1, 1});
  for (std::int64_t c = 0; c < D; ++c) qn(0, 0, 0, c) = value(3, L, c);
  dist::stats ds;
  att::options opt;
  opt.threads = 1;
  dist::sharded_decode(MPI_COMM_WORLD, mnemo::cview(qn), k, v, on, ln, att::mods::none{}, opt,
                       dist::reduction::ordered_op, &ds);
  mnemo::tensor<float, 4> root = on;
  MPI_Bcast(root.data(), static_cast<int>(D), MPI_FLOAT, 0, MPI_COMM_WORLD);
  int same = std::memcmp(root.data(), on.data(), sizeof(float) * D) == 0, all_same = 0;
  MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);

  int status = 0;
  if (rank == 0) {
    double want[D], decode_err = 0;
    const double want_lse = streamed_row(qn.data(), L - 1, want);
    for (std::int64_t c = 0; c < D; ++c) decode_err = std::max(decode_err, std::abs(on(0, 0, 0, c) - want[c]));
    decode_err = std::max(decode_err, std::abs(ln(0, 0, 0) - want_lse) / std::max(1.0, std::abs(want_lse)));
    std::printf("ring prefill: L = %lld over %d ranks (zig-zag), H = 1, D = %lld, causal\n", static_cast<long long>(L),
                N, static_cast<long long>(D));
    std::printf("  time %.3f s (slowest rank), compute %.3f s, waiting for K/V %.4f s (%.1f%% of the time)\n",
                slowest, compute, wait, 100.0 * wait / slowest);
    std::printf("  rows at the ends of every segment vs double attention over their prefix: max error %.2e\n",
                prefill_err);
    std::printf("sharded decode: 1 query over %lld keys on %d ranks: max error %.2e, same bytes on every rank: %s\n",
                static_cast<long long>(L), N, decode_err, all_same ? "yes" : "NO");
    const double tol = 1e-4;
    status = prefill_err <= tol && decode_err <= tol && all_same ? 0 : 1;
    if (status) std::printf("FAILED: errors above %.0e or ranks disagree\n", tol);
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return status;
}
