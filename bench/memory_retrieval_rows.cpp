// bench/memory_retrieval_rows.cpp — rows of the retrieval and consolidation memories
// (include/mnemo/memory/retro.hpp, hmt.hpp, camelot.hpp, memoryllm.hpp), each fast path next to
// its double-precision reference at one shape, named as bench/memory_rows.cpp:
//
//   memory/<impl>/module:retro/L:../m:../N:../D:../threads:..          retro_cca (H = 8, Dv = D)
//   memory/<impl>/module:hmt/L:../S:../N:../D:../Dh:../threads:..      hmt_forward, a copying block
//   memory/<impl>/module:camelot/L:../S:../D:../threads:..             camelot_write of L pairs into a
//                                                                      half-full memory + camelot_read of L
//   memory/<impl>/module:memoryllm/Lq:../N:../D:../K:../threads:..     memoryllm_update (K) + memoryllm_read (Lq)
//   memory/<impl>/module:mplus/Lq:../N:../D:../ltm:../topk:../threads:..  mplus_read over pool + long-term memory
//
// impl is `fast` or `reference` (double). Counters: tokens/s (the figure to compare: tokens of
// the sequence for retro and hmt, pairs written for camelot, query rows for memoryllm and
// mplus) and FLOP/s from the multiply-adds of each module's equations (the same count for both
// impls, so a FLOP/s ratio is a time ratio):
//   retro      2 H L N (D + Dv)                  every attending token against its N neighbour rows
//   hmt        segments x 2 (D Dh + N D Dh + N (Dh + D))   the recall as the paper writes it
//   camelot    2 H L S D (write: similarity to every slot) + 2 H L S (D + Dv) (read)
//   memoryllm  2 Lq N D x 2 (pool attention over D = H Dh)
//   mplus      the pool read + 2 H Lq ltm Dh (the long-term search) + 2 H Lq topk 2 Dh
#include <cstdint>
#include <string>

#include "common.hpp"
#include "memory_common.hpp"
#include "mnemo/memory/camelot.hpp"
#include "mnemo/memory/hmt.hpp"
#include "mnemo/memory/memoryllm.hpp"
#include "mnemo/memory/retro.hpp"

namespace mnemo::bench {
namespace {

namespace mem = mnemo::memory;

constexpr std::int64_t H = 8;

void retro_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t m, std::int64_t N, std::int64_t D,
               bool reference) {
  const std::int64_t C = L / m;
  tensor<float, 4> q({1, H, L, D}), k({1, H, C * N, D}), v({1, H, C * N, D}), out({1, H, L, D});
  tensor<float, 3> lse({1, H, L});
  fill_random(q, 1);
  fill_random(k, 2);
  fill_random(v, 3);
  const mem::retro_options opt{.chunk_len = m, .neighbour_len = N, .threads = threads};
  for (auto _ : state) {
    if (reference) mem::reference::retro_cca(q, k, v, out, lse, opt);
    else mem::retro_cca(q, k, v, out, lse, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double attending = static_cast<double>(L - (m - 1));
  set_token_counters(state, static_cast<double>(L), 2.0 * H * attending * static_cast<double>(N * 2 * D),
                     "H=8 L=" + std::to_string(L) + " m=" + std::to_string(m) + " N=" + std::to_string(N) +
                         " D=Dv=" + std::to_string(D) + " threads=" + std::to_string(threads));
}

void hmt_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t S, std::int64_t N, std::int64_t D,
             std::int64_t Dh, bool reference) {
  tensor<float, 3> x({1, L, D}), y({1, L, D});
  tensor<float, 2> wq({D, Dh}), wk({D, Dh});
  tensor<float, 1> prompt({D});
  fill_random(x, 11);
  fill_random(wq, 12, -0.1f, 0.1f);
  fill_random(wk, 13, -0.1f, 0.1f);
  fill_random(prompt, 14);
  // The backbone stand-in: out = in (a copy), the same for both impls.
  auto block = [](view<const float, 3> in, view<float, 3> out) {
    for (std::int64_t t = 0; t < in.extent(1); ++t) std::copy(in.ptr(0, t), in.ptr(0, t) + in.extent(2), out.ptr(0, t));
  };
  const mem::hmt_options opt{.segment_len = S, .threads = threads};
  mem::hmt_memory memory(1, N, wq, wk);
  for (std::int64_t i = 0; i < N; ++i) memory.append(view<const float, 2>(x.data() + i * D, {1, D}));  // a full cache
  for (auto _ : state) {
    if (reference) mem::reference::hmt_forward(x, memory, prompt, block, y, opt);
    else mem::hmt_forward(x, memory, prompt, block, y, opt);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double segments = static_cast<double>((L + S - 1) / S);
  const double per_recall = static_cast<double>(D * Dh + N * D * Dh + N * (Dh + D));
  set_token_counters(state, static_cast<double>(L), 2.0 * segments * per_recall,
                     "L=" + std::to_string(L) + " S=" + std::to_string(S) + " N=" + std::to_string(N) +
                         " D=" + std::to_string(D) + " Dh=" + std::to_string(Dh) + " threads=" + std::to_string(threads));
}

void camelot_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t S, std::int64_t D, bool reference) {
  tensor<float, 4> k({1, H, L, D}), v({1, H, L, D}), q({1, H, L, D}), out({1, H, L, D}), k0({1, H, S / 2, D});
  tensor<float, 3> lse({1, H, L});
  fill_random(k, 21);
  fill_random(v, 22);
  fill_random(q, 23);
  fill_random(k0, 24);
  // Random keys in D = 64 rarely pass 0.3, so most pairs are novel: the memory fills and then replaces.
  const mem::camelot_options opt{.threshold = 0.3f, .threads = threads};
  mem::camelot_memory half(1, H, S, D, D);
  mem::camelot_write(k0, k0, half, opt);
  for (auto _ : state) {
    mem::camelot_memory m = half;  // the same start every iteration (a copy of S/2 slots: < 1% of the row)
    if (reference) {
      mem::reference::camelot_write(k, v, m, opt);
      mem::reference::camelot_read(q, m, out, lse, opt);
    } else {
      mem::camelot_write(k, v, m, opt);
      mem::camelot_read(q, m, out, lse, opt);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_token_counters(state, static_cast<double>(L), 2.0 * H * static_cast<double>(L * S) * static_cast<double>(3 * D),
                     "H=8 L=" + std::to_string(L) + " S=" + std::to_string(S) + " D=Dv=" + std::to_string(D) +
                         " threshold=0.3 threads=" + std::to_string(threads));
}

void memoryllm_row(benchmark::State& state, int threads, std::int64_t Lq, std::int64_t N, std::int64_t D, std::int64_t K,
                   std::int64_t ltm, std::int64_t topk, bool reference) {
  const std::int64_t Dh = D / H;
  tensor<float, 3> h({1, K, D});
  tensor<float, 4> q({1, H, Lq, Dh}), out({1, H, Lq, Dh});
  tensor<float, 3> lse({1, H, Lq});
  fill_random(h, 31);
  fill_random(q, 32);
  mem::memory_pool pool(1, N, D, ltm, H);
  std::vector<float> init(static_cast<std::size_t>(N * D));
  for (std::size_t i = 0; i < init.size(); ++i) init[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
  std::copy(init.begin(), init.end(), pool.pool().data());
  const mem::memoryllm_options opt{.update_len = K, .heads = H, .seed = 1, .threads = threads};
  if (ltm > 0)
    while (pool.long_term().size() < ltm) mem::memoryllm_update(h, pool, opt);  // a full long-term memory
  for (auto _ : state) {
    if (ltm > 0) {
      if (reference) mem::reference::mplus_read(q, pool, topk, out, lse, opt);
      else mem::mplus_read(q, pool, topk, out, lse, opt);
    } else {
      mem::memoryllm_update(h, pool, opt);
      if (reference) mem::reference::memoryllm_read(q, pool, out, lse, opt);
      else mem::memoryllm_read(q, pool, out, lse, opt);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  double flops = 2.0 * static_cast<double>(Lq * N) * static_cast<double>(2 * D);
  if (ltm > 0) flops += 2.0 * H * static_cast<double>(Lq) * static_cast<double>(ltm * Dh + topk * 2 * Dh);
  set_token_counters(state, static_cast<double>(Lq), flops,
                     "H=8 Lq=" + std::to_string(Lq) + " N=" + std::to_string(N) + " D=" + std::to_string(D) +
                         " K=" + std::to_string(K) + " ltm=" + std::to_string(ltm) + " topk=" + std::to_string(topk) +
                         " threads=" + std::to_string(threads));
}

const bool registered = [] {
  const bool full = full_size();
  for (const char* impl : {"fast", "reference"}) {
    const bool ref = std::string(impl) == "reference";
    {  // RETRO: m = 64 and k = 2 neighbours of r = 128 tokens, as the paper.
      const std::int64_t L = full ? 2048 : 1024, m = 64, N = 256, D = 64;
      add_row(impl, "retro", {{"L", std::to_string(L)}, {"m", std::to_string(m)}, {"N", std::to_string(N)}, {"D", std::to_string(D)}},
              [=](benchmark::State& st, int t) { retro_row(st, t, L, m, N, D, ref); });
    }
    {
      const std::int64_t L = full ? 8192 : 4096, S = 256, N = 64, D = 512, Dh = 64;
      add_row(impl, "hmt",
              {{"L", std::to_string(L)}, {"S", std::to_string(S)}, {"N", std::to_string(N)}, {"D", std::to_string(D)}, {"Dh", std::to_string(Dh)}},
              [=](benchmark::State& st, int t) { hmt_row(st, t, L, S, N, D, Dh, ref); });
    }
    {
      const std::int64_t L = 512, S = full ? 4096 : 1024, D = 64;
      add_row(impl, "camelot", {{"L", std::to_string(L)}, {"S", std::to_string(S)}, {"D", std::to_string(D)}},
              [=](benchmark::State& st, int t) { camelot_row(st, t, L, S, D, ref); });
    }
    {
      const std::int64_t Lq = 256, N = full ? 8192 : 2048, D = 512, K = 256;
      add_row(impl, "memoryllm", {{"Lq", std::to_string(Lq)}, {"N", std::to_string(N)}, {"D", std::to_string(D)}, {"K", std::to_string(K)}},
              [=](benchmark::State& st, int t) { memoryllm_row(st, t, Lq, N, D, K, 0, 0, ref); });
      const std::int64_t ltm = full ? 32768 : 2048, topk = 32;  // the reference sorts every query's scores
      add_row(impl, "mplus",
              {{"Lq", std::to_string(Lq)}, {"N", std::to_string(N)}, {"D", std::to_string(D)}, {"ltm", std::to_string(ltm)}, {"topk", std::to_string(topk)}},
              [=](benchmark::State& st, int t) { memoryllm_row(st, t, Lq, N, D, K, ltm, topk, ref); });
    }
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
