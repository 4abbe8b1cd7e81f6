// bench/memory_segment_rows.cpp — the segment memories (memory/segment_recurrence.hpp,
// memory/compressive_transformer.hpp, memory/lamemo.hpp): every fast path next to its
// double-precision reference, one segment step on a memory that is already full.
//
//   memory/<impl>/module:xl/L:../M:../D:../rel:1/threads:..                     xl_attention (H = 8), relative terms on
//   memory/<impl>/module:gtrxl_gate/L:../D:../threads:..                        gtrxl_gate (B = 1)
//   memory/<impl>/module:compressive_transformer/L:../n_m:../n_cm:../c:../fn:../D:../threads:..
//                                                                              compressive_transformer_attention (H = 8)
//   memory/<impl>/module:lamemo/L:../M:../D:../threads:..                       lamemo_attention (H = 8)
//
// impl is `fast` (the library's f32 path) or `reference` (double). Counters: tokens/s (segment
// tokens per second: the figure to compare) and FLOP/s of the defining equations x 2, the same
// count for both impls:
//   attention over [memory; segment]: per (head, query) (m + (L + 1) / 2) keys x 2 (D + Dv), m the
//     memory rows it sees (M; n_m + n_cm for the Compressive Transformer);
//   relative terms (xl): one more D-long dot per pair (q.r);
//   LaMemo's look-ahead: M x L pairs per head, 2 (D + Dv) each;
//   compression (conv): c D^2 per compressed row, keys and values; GTrXL gate: 6 D^2 per token.
#include <algorithm>
#include <cstdint>
#include <string>

#include "common.hpp"
#include "memory_common.hpp"
#include "mnemo/memory/compressive_transformer.hpp"
#include "mnemo/memory/lamemo.hpp"
#include "mnemo/memory/segment_recurrence.hpp"

namespace mnemo::bench {
namespace {

namespace mem = mnemo::memory;

constexpr std::int64_t H = 8;

// Attention FLOPs of L queries per head over m memory rows plus the causal segment.
double attention_flops(std::int64_t L, std::int64_t m, std::int64_t D, std::int64_t extra_per_pair = 0) {
  const double pairs = static_cast<double>(L) * (static_cast<double>(m) + (static_cast<double>(L) + 1) / 2);
  return static_cast<double>(H) * pairs * 2.0 * static_cast<double>(2 * D + extra_per_pair);
}

struct segment_inputs {
  tensor<float, 4> q, k, v, out;
  segment_inputs(std::int64_t L, std::int64_t D) : q({1, H, L, D}), k({1, H, L, D}), v({1, H, L, D}), out({1, H, L, D}) {
    fill_random(q, 41);
    fill_random(k, 42);
    fill_random(v, 43);
  }
};

void xl_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t M, std::int64_t D, bool reference) {
  segment_inputs in(L, D);
  tensor<float, 3> r({H, M + L, D});
  tensor<float, 2> u({H, D}), vb({H, D});
  fill_random(r, 44);
  fill_random(u, 45);
  fill_random(vb, 46);
  const mem::xl_position pos{r, u, vb};
  const mem::segment_options opt{.threads = threads};
  mem::kv_memory memory(1, H, M, D, D);
  while (memory.size() < M) memory.push(in.k, in.v);
  for (auto _ : state) {
    if (reference) mem::reference::xl_attention(in.q, in.k, in.v, pos, memory, in.out, opt);
    else mem::xl_attention(in.q, in.k, in.v, pos, memory, in.out, opt);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_token_counters(state, static_cast<double>(L), attention_flops(L, M, D, D),
                     "H=8 L=" + std::to_string(L) + " M=" + std::to_string(M) + " D=" + std::to_string(D) +
                         " threads=" + std::to_string(threads));
}

void gate_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t D, bool reference) {
  tensor<float, 3> x({1, L, D}), y({1, L, D}), out({1, L, D});
  fill_random(x, 51);
  fill_random(y, 52);
  tensor<float, 2> w({D, D});
  fill_random(w, 53, -0.05f, 0.05f);
  const mem::gtrxl_weights gw{w, w, w, w, w, w};
  for (auto _ : state) {
    if (reference) mem::reference::gtrxl_gate(x, y, gw, out, threads);
    else mem::gtrxl_gate(x, y, gw, out, threads);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_token_counters(state, static_cast<double>(L), 2.0 * 6.0 * static_cast<double>(L * D * D),
                     "L=" + std::to_string(L) + " D=" + std::to_string(D) + " threads=" + std::to_string(threads));
}

void compressive_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t n_m, std::int64_t n_cm,
                     std::int64_t c, mem::compression f, std::int64_t D, bool reference) {
  segment_inputs in(L, D);
  tensor<float, 3> wk({c, D, D}), wv({c, D, D});
  fill_random(wk, 61, -0.1f, 0.1f);
  fill_random(wv, 62, -0.1f, 0.1f);
  const mem::compressive_transformer_options opt{
      .rate = c, .function = f, .conv_keys = wk, .conv_values = wv, .threads = threads};
  mem::compressive_transformer_memory memory(1, H, n_m, n_cm, D, D);
  while (memory.memory_size() < n_m || memory.compressed_size() < n_cm)  // fill both (fast path)
    mem::compressive_transformer_attention(in.q, in.k, in.v, memory, in.out, opt);
  for (auto _ : state) {
    if (reference) mem::reference::compressive_transformer_attention(in.q, in.k, in.v, memory, in.out, opt);
    else mem::compressive_transformer_attention(in.q, in.k, in.v, memory, in.out, opt);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  const double conv = f == mem::compression::conv ? 2.0 * 2.0 * static_cast<double>(H * L * D * D) : 0.0;
  set_token_counters(state, static_cast<double>(L), attention_flops(L, n_m + n_cm, D) + conv,
                     "H=8 L=" + std::to_string(L) + " n_m=" + std::to_string(n_m) + " n_cm=" + std::to_string(n_cm) +
                         " c=" + std::to_string(c) + " " + mem::compression_name(f) + " threads=" + std::to_string(threads));
}

void lamemo_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t M, std::int64_t D, bool reference) {
  segment_inputs in(L, D);
  const mem::segment_options opt{.threads = threads};
  mem::lamemo_memory memory(1, H, M, D, D);
  while (memory.size() < M) mem::lamemo_attention(in.q, in.k, in.v, memory, in.out, opt);
  for (auto _ : state) {
    if (reference) mem::reference::lamemo_attention(in.q, in.k, in.v, memory, in.out, opt);
    else mem::lamemo_attention(in.q, in.k, in.v, memory, in.out, opt);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  const double look_ahead = static_cast<double>(H * M * L) * 2.0 * static_cast<double>(2 * D);
  set_token_counters(state, static_cast<double>(L), attention_flops(L, M, D) + look_ahead,
                     "H=8 L=" + std::to_string(L) + " M=" + std::to_string(M) + " D=" + std::to_string(D) +
                         " threads=" + std::to_string(threads));
}

const bool registered = [] {
  const std::int64_t L = full_size() ? 512 : tiny_size() ? 64 : 256, M = L, D = 64;
  for (const char* impl : {"fast", "reference"}) {
    const bool ref = std::string(impl) == "reference";
    add_row(impl, "xl", {{"L", std::to_string(L)}, {"M", std::to_string(M)}, {"D", std::to_string(D)}, {"rel", "1"}},
            [=](benchmark::State& st, int t) { xl_row(st, t, L, M, D, ref); });
    const std::int64_t Dg = 256;
    add_row(impl, "gtrxl_gate", {{"L", std::to_string(L)}, {"D", std::to_string(Dg)}},
            [=](benchmark::State& st, int t) { gate_row(st, t, L, Dg, ref); });
    const std::int64_t c = 4, n_cm = M / 2;
    for (mem::compression f : {mem::compression::conv, mem::compression::most_used})
      add_row(impl, "compressive_transformer",
              {{"L", std::to_string(L)},
               {"n_m", std::to_string(M)},
               {"n_cm", std::to_string(n_cm)},
               {"c", std::to_string(c)},
               {"fn", mem::compression_name(f)},
               {"D", std::to_string(D)}},
              [=](benchmark::State& st, int t) { compressive_row(st, t, L, M, n_cm, c, f, D, ref); });
    add_row(impl, "lamemo", {{"L", std::to_string(L)}, {"M", std::to_string(M)}, {"D", std::to_string(D)}},
            [=](benchmark::State& st, int t) { lamemo_row(st, t, L, M, D, ref); });
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
