// bench/distributed/ring_bench.cpp — ring attention and sharded decode over MPI: time per step
// against the number of ranks, split into compute and communication, beside the model of
// bench/distributed.md. A plain MPI program (not Google Benchmark: every rank must run the same
// collective calls in the same order), run once per rank count:
//
//   for n in 1 2 4; do mpirun -np $n ./mnemo_ring_bench; done
//
// Per configuration it measures, on this machine's transport (loopback: shared memory):
//   link       latency a (8-byte ping-pong, half the round trip) and bandwidth B (4 MiB ping-pong)
//   step       ring_attention's time per ring step (slowest rank), its compute and its wait
//              (blocked in MPI_Waitall: communication the compute did not hide)
//   comm       the same K/V passes around the ring with no compute: what there was to hide
//   hidden     1 - wait / comm, the fraction of the communication hidden behind compute
//   model      the model's hidden fraction min(1, T_compute / T_comm) with T_comm = a + bytes / B
//              from the measured link and T_compute from the measured step (bench/distributed.md)
// and for sharded decode the local decode time against the combine (ordered MPI_Op and gather).
//
// Options: --rows n1,n2,...  query rows per rank (default 128,512,2048)  --heads H (2)  --dim D (64)
//          --reps r (3)  --decode-keys K (total keys of the decode rows, default 65536)
//          --causal-L L (the causal load-balance rows: contiguous vs zig-zag shards, default 8192; 0: off)
//          --backward 0|1 (the backward's rows under each forward row, default 1; comm there is twice the
//          forward's comm alone: K/V and dK/dV both travel)
#include <mpi.h>

#include <mnemo/distributed/ring_attention.hpp>
#include <mnemo/distributed/sharded_decode.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace dist = mnemo::distributed;
namespace att = mnemo::attention;

namespace {

int rank_ = 0, ranks_ = 1;

double max_over_ranks(double x) {
  double y = 0;
  MPI_Allreduce(&x, &y, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return y;
}

std::vector<std::int64_t> parse_list(const char* s) {
  std::vector<std::int64_t> out;
  for (const char* p = s; *p;) {
    out.push_back(std::atoll(p));
    while (*p && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  return out;
}

template <class T, int R>
void fill(mnemo::tensor<T, R>& t, unsigned seed) {
  std::mt19937 g(seed + 1000u * static_cast<unsigned>(rank_));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (std::int64_t i = 0; i < t.size(); ++i) t.data()[i] = u(g);
}

// Half the round trip of `bytes` between ranks 0 and 1 (seconds); 0 with one rank.
double ping_pong(std::int64_t bytes, int reps) {
  if (ranks_ < 2) return 0;
  std::vector<char> buf(static_cast<std::size_t>(std::max<std::int64_t>(bytes, 1)));
  MPI_Barrier(MPI_COMM_WORLD);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t = MPI_Wtime();
    if (rank_ == 0) {
      MPI_Send(buf.data(), static_cast<int>(bytes), MPI_BYTE, 1, 7, MPI_COMM_WORLD);
      MPI_Recv(buf.data(), static_cast<int>(bytes), MPI_BYTE, 1, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else if (rank_ == 1) {
      MPI_Recv(buf.data(), static_cast<int>(bytes), MPI_BYTE, 0, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      MPI_Send(buf.data(), static_cast<int>(bytes), MPI_BYTE, 0, 7, MPI_COMM_WORLD);
    }
    best = std::min(best, (MPI_Wtime() - t) / 2);
  }
  double out = best;
  MPI_Bcast(&out, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  return out;
}

// The ring's K/V passes alone: N - 1 steps of Isend to the next rank and Irecv from the previous.
double comm_alone(std::int64_t bytes, int reps) {
  if (ranks_ < 2) return 0;
  std::vector<char> a(static_cast<std::size_t>(bytes)), b(static_cast<std::size_t>(bytes));
  const int next = (rank_ + 1) % ranks_, prev = (rank_ + ranks_ - 1) % ranks_;
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t = MPI_Wtime();
    for (int s = 0; s + 1 < ranks_; ++s) {
      MPI_Request req[2];
      MPI_Irecv(b.data(), static_cast<int>(bytes), MPI_BYTE, prev, 9, MPI_COMM_WORLD, &req[0]);
      MPI_Isend(a.data(), static_cast<int>(bytes), MPI_BYTE, next, 9, MPI_COMM_WORLD, &req[1]);
      MPI_Waitall(2, req, MPI_STATUSES_IGNORE);
      std::swap(a, b);
    }
    best = std::min(best, max_over_ranks((MPI_Wtime() - t) / (ranks_ - 1)));
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks_);
  std::vector<std::int64_t> rows{128, 512, 2048};
  std::int64_t H = 2, D = 64, decode_keys = 65536, causal_L = 8192;
  int reps = 3;
  bool with_backward = true;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--rows") rows = parse_list(argv[i + 1]);
    else if (a == "--heads") H = std::atoll(argv[i + 1]);
    else if (a == "--dim") D = std::atoll(argv[i + 1]);
    else if (a == "--reps") reps = std::atoi(argv[i + 1]);
    else if (a == "--decode-keys") decode_keys = std::atoll(argv[i + 1]);
    else if (a == "--causal-L") causal_L = std::atoll(argv[i + 1]);
    else if (a == "--backward") with_backward = std::atoi(argv[i + 1]) != 0;
  }

  const double lat = ping_pong(8, 200), big = 4 << 20, bw = ranks_ > 1 ? big / (ping_pong(4 << 20, 20) - lat) : 0;
  if (rank_ == 0) {
    std::printf("# ring_bench: %d ranks, H = %lld, D = %lld, f32, mods::none, 1 thread per rank\n", ranks_,
                static_cast<long long>(H), static_cast<long long>(D));
    if (ranks_ > 1) std::printf("# link: latency a = %.2f us, bandwidth B = %.2f GB/s\n", lat * 1e6, bw * 1e-9);
    std::printf("%-6s %-6s %11s %11s %11s %11s %10s %9s %9s %10s\n", "ranks", "n/rank", "call_ms", "step_ms",
                "compute_ms", "wait_ms", "comm_ms", "hidden", "model", "GFLOP/s/r");
  }
  double flop_rate = 0;
  for (const std::int64_t n : rows) {
    const dist::shard shard = dist::contiguous_shard(n * ranks_, rank_, ranks_);
    mnemo::tensor<float, 4> q({1, H, n, D}), k({1, H, n, D}), v({1, H, n, D}), out({1, H, n, D});
    mnemo::tensor<float, 3> lse({1, H, n});
    fill(q, 1);
    fill(k, 2);
    fill(v, 3);
    dist::ring_options ro;
    ro.attention.threads = 1;
    ro.progress_rows = std::max<std::int64_t>(n / 8, 64);
    double call = 1e30, compute = 0, wait = 0;
    for (int r = 0; r < reps; ++r) {
      MPI_Barrier(MPI_COMM_WORLD);
      dist::stats st;
      dist::ring_attention(MPI_COMM_WORLD, shard, mnemo::cview(q), k, v, out, lse, att::mods::none{}, ro, &st);
      const double t = max_over_ranks(st.total);
      if (t < call) {
        call = t;
        compute = max_over_ranks(st.compute);
        wait = max_over_ranks(st.wait);
      }
    }
    const std::int64_t block_bytes = 2 * H * n * D * static_cast<std::int64_t>(sizeof(float));
    const double comm = comm_alone(block_bytes, reps);  // per step
    const double step = call / ranks_, compute_step = compute / ranks_, wait_step = ranks_ > 1 ? wait / (ranks_ - 1) : 0;
    const double flops_step = 4.0 * static_cast<double>(n) * n * D * H;
    const double model_comm = ranks_ > 1 ? lat + block_bytes / bw : 0;
    const double hidden = comm > 0 ? std::clamp(1.0 - wait_step / comm, 0.0, 1.0) : 1.0;
    const double model = model_comm > 0 ? std::min(1.0, compute_step / model_comm) : 1.0;
    flop_rate = flops_step / compute_step;  // of the largest n at the end of the loop
    if (rank_ == 0)
      std::printf("%-6d %-6lld %11.3f %11.3f %11.3f %11.4f %10.4f %8.1f%% %8.1f%% %10.2f\n", ranks_,
                  static_cast<long long>(n), call * 1e3, step * 1e3, compute_step * 1e3, wait_step * 1e3, comm * 1e3,
                  100 * hidden, 100 * model, flops_step / compute_step * 1e-9);
    if (with_backward) {  // the backward: K/V and the travelling dK/dV, twice the bytes per step
      mnemo::tensor<float, 4> dout({1, H, n, D}), dq({1, H, n, D}), dk({1, H, n, D}), dv({1, H, n, D});
      fill(dout, 10);
      double bcall = 1e30, bcompute = 0, bwait = 0;
      for (int r = 0; r < reps; ++r) {
        MPI_Barrier(MPI_COMM_WORLD);
        dist::stats st;
        dist::ring_attention_backward(MPI_COMM_WORLD, shard, mnemo::cview(q), mnemo::cview(k), mnemo::cview(v),
                                      mnemo::cview(out), mnemo::cview(lse), mnemo::cview(dout), dq, dk, dv,
                                      att::mods::none{}, ro, &st);
        const double t = max_over_ranks(st.total);
        if (t < bcall) {
          bcall = t;
          bcompute = max_over_ranks(st.compute);
          bwait = max_over_ranks(st.wait);
        }
      }
      const double bcomm = 2 * comm, bstep = bcompute / ranks_, bwait_step = ranks_ > 1 ? bwait / ranks_ : 0;
      const double bhidden = bcomm > 0 ? std::clamp(1.0 - bwait_step / bcomm, 0.0, 1.0) : 1.0;
      const double bmodel = model_comm > 0 ? std::min(1.0, bstep / (2 * model_comm)) : 1.0;
      if (rank_ == 0)
        std::printf("%-6s %-6lld %11.3f %11.3f %11.3f %11.4f %10.4f %8.1f%% %8.1f%%   (backward)\n", "", 
                    static_cast<long long>(n), bcall * 1e3, bcall / ranks_ * 1e3, bstep * 1e3, bwait_step * 1e3,
                    bcomm * 1e3, 100 * bhidden, 100 * bmodel);
    }
  }

  // The model's threshold (bench/distributed.md): the rows per rank n* from which a step's compute
  // 4 n^2 D H / F covers its communication a + 2 n H D 4 / B, the positive root of
  // (4 D H / F) n^2 - (8 H D / B) n - a = 0, with F the flop rate of the largest n above.
  if (rank_ == 0 && ranks_ > 1) {
    const double qa = 4.0 * D * H / flop_rate, qb = 8.0 * H * D / bw;
    const double n_star = (qb + std::sqrt(qb * qb + 4 * qa * lat)) / (2 * qa);
    std::printf("# model: F = %.2f GFLOP/s per rank, a = %.2f us, B = %.2f GB/s -> communication hidden from n* = %.0f "
                "rows per rank\n",
                flop_rate * 1e-9, lat * 1e6, bw * 1e-9, n_star);
  }

  // Causal load balance: one causal call over causal_L tokens, contiguous shards against zig-zag.
  // With contiguous shards rank r has r + 1 non-empty blocks; zig-zag gives every rank the same.
  if (causal_L > 0) {
    if (rank_ == 0)
      std::printf("\n# causal, L = %lld in total: contiguous vs zig-zag shards\n%-6s %-11s %11s %15s %15s\n",
                  static_cast<long long>(causal_L), "ranks", "layout", "call_ms", "compute_min_ms", "compute_max_ms");
    for (int zig = 0; zig < 2; ++zig) {
      const dist::shard shard = zig ? dist::zigzag_shard(causal_L, rank_, ranks_)
                                    : dist::contiguous_shard(causal_L, rank_, ranks_);
      const std::int64_t n = shard.rows();
      mnemo::tensor<float, 4> q({1, H, n, D}), k({1, H, n, D}), v({1, H, n, D}), out({1, H, n, D});
      fill(q, 7);
      fill(k, 8);
      fill(v, 9);
      dist::ring_options ro;
      ro.attention.threads = 1;
      ro.progress_rows = 256;
      double call = 1e30, cmin = 0, cmax = 0;
      for (int r = 0; r < reps; ++r) {
        MPI_Barrier(MPI_COMM_WORLD);
        dist::stats st;
        dist::ring_attention(MPI_COMM_WORLD, shard, mnemo::cview(q), k, v, out, {}, att::mods::causal{}, ro, &st);
        const double t = max_over_ranks(st.total);
        if (t < call) {
          call = t;
          cmax = max_over_ranks(st.compute);
          cmin = -max_over_ranks(-st.compute);
        }
      }
      if (rank_ == 0)
        std::printf("%-6d %-11s %11.3f %15.3f %15.3f\n", ranks_, zig ? "zigzag" : "contiguous", call * 1e3, cmin * 1e3,
                    cmax * 1e3);
    }
  }

  // Sharded decode: Hq = 32, Hkv = 8, D = 128 (the standard decode shape), decode_keys split evenly.
  {
    const std::int64_t Hq = 32, Hkv = 8, Dd = 128;
    const dist::shard shard = dist::contiguous_shard(decode_keys, rank_, ranks_);
    const std::int64_t n = shard.rows();
    mnemo::tensor<float, 4> q({1, Hq, 1, Dd}), k({1, Hkv, n, Dd}), v({1, Hkv, n, Dd}), out({1, Hq, 1, Dd});
    mnemo::tensor<float, 3> lse({1, Hq, 1});
    fill(q, 4);
    fill(k, 5);
    fill(v, 6);
    att::options opt;
    opt.threads = 1;
    if (rank_ == 0)
      std::printf("\n# sharded decode: Hq = 32, Hkv = 8, D = 128, f32, %lld keys in total, 1 query\n"
                  "%-6s %-10s %-11s %11s %11s %11s\n",
                  static_cast<long long>(decode_keys), "ranks", "keys/rank", "reduction", "call_ms", "local_ms",
                  "combine_ms");
    for (auto how : {dist::reduction::ordered_op, dist::reduction::gather}) {
      double call = 1e30, comb = 0, local = 0;
      for (int r = 0; r < reps + 2; ++r) {
        MPI_Barrier(MPI_COMM_WORLD);
        dist::stats st;
        dist::sharded_decode(MPI_COMM_WORLD, mnemo::cview(q), k, v, out, lse, att::mods::none{}, opt, how, &st);
        const double t = max_over_ranks(st.total);
        if (t < call) {
          call = t;
          local = max_over_ranks(st.compute);
          comb = max_over_ranks(st.wait);
        }
      }
      if (rank_ == 0)
        std::printf("%-6d %-10lld %-11s %11.3f %11.3f %11.3f\n", ranks_, static_cast<long long>(n),
                    how == dist::reduction::ordered_op ? "ordered_op" : "gather", call * 1e3, local * 1e3, comb * 1e3);
    }
  }
  MPI_Finalize();
  return 0;
}
