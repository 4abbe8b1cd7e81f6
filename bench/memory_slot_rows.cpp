// bench/memory_slot_rows.cpp — the slot memories of include/mnemo/memory/ (memformer.hpp, lm2.hpp,
// reactive.hpp, token_turing.hpp): each fast path next to its double-precision reference, one
// segment read and written per iteration, named like bench/memory_rows.cpp.
//
//   memory/<impl>/module:memformer/L:../S:../D:../H:../threads:..   memformer_read + memformer_write
//   memory/<impl>/module:lm2/L:../S:../D:../H:../threads:..         lm2_read + lm2_write
//   memory/<impl>/module:rxt/L:../S:../D:../H:../threads:..         rxt_read (L decoder tokens) +
//                                                                   rxt_write (ED of L tokens)
//   memory/<impl>/module:ttm/n:../m:../r:../D:../Hd:../threads:..   ttm_read + ttm_write (identity
//                                                                   processing: the r read tokens)
//
// impl is `fast` (f32: GEMMs, attention::flash) or `reference` (double). Counters:
//   tokens/s  segment tokens (L, or TTM's n input tokens) per second: the figure to compare;
//   FLOP/s    the multiply-adds of the module's equations x 2, the same count for both impls.
// A cross-attention of Lq queries over Lk keys costs (2 Lq + 2 Lk) D^2 for the projections and
// 2 Lq Lk D for the scores and the weighted sum; the modules add their gates (D^2 per gated row).
// A TTM summary of N tokens to k costs N D Hd + N Hd k (the importance MLP) + k N D (alpha^T X).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common.hpp"
#include "memory_common.hpp"
#include "mnemo/memory/lm2.hpp"
#include "mnemo/memory/memformer.hpp"
#include "mnemo/memory/reactive.hpp"
#include "mnemo/memory/token_turing.hpp"

namespace mnemo::bench {
namespace {

namespace mem = mnemo::memory;

// Multiply-adds of one projected cross-attention, Lq queries over Lk keys.
double cross_attention_macs(double Lq, double Lk, double D) { return (2 * Lq + 2 * Lk) * D * D + 2 * Lq * Lk * D; }

// [D, D] weights scaled by 1/sqrt(D), filled from consecutive seeds.
struct weight_set {
  std::vector<tensor<float, 2>> w;
  weight_set(std::int64_t D, int n, std::uint64_t seed) {
    const float a = 1.0f / std::sqrt(static_cast<float>(D));
    for (int i = 0; i < n; ++i) {
      w.emplace_back(shape_t<2>{D, D});
      fill_random(w.back(), seed + static_cast<std::uint64_t>(i), -a, a);
    }
  }
  mem::attention_projections projections(int first) const {
    return {w[first], w[first + 1], w[first + 2], w[first + 3]};
  }
};

std::string slot_label(std::int64_t L, std::int64_t S, std::int64_t D, std::int64_t H, int threads) {
  return "B=1 L=" + std::to_string(L) + " S=" + std::to_string(S) + " D=" + std::to_string(D) + " H=" +
         std::to_string(H) + " threads=" + std::to_string(threads);
}

// The three attention slot memories: one read of L tokens and one write of a segment of L tokens.
// The memory is reset from m0 outside the timing, so every iteration does the same work.
enum class slot_module { memformer, lm2, rxt };

void slot_row(benchmark::State& state, int threads, slot_module module, std::int64_t L, std::int64_t S,
              std::int64_t D, std::int64_t H, bool reference) {
  tensor<float, 3> x({1, L, D}), m0({1, S, D}), m({1, S, D}), out({1, L, D});
  fill_random(x, 61);
  fill_random(m0, 62);
  const weight_set ws(D, 11, 70);
  tensor<float, 2> bias({S, D});
  fill_random(bias, 64, -0.5f, 0.5f);
  const mem::memformer_weights mw{ws.projections(0), ws.projections(4), bias};
  const mem::lm2_weights lw{ws.projections(0), ws.w[8], ws.projections(4), ws.w[9], ws.w[10]};
  tensor<float, 1> b_gate({D});
  fill_random(b_gate, 63);
  const mem::rxt_weights rw{ws.projections(0), ws.projections(4), ws.w[8], b_gate};
  for (auto _ : state) {
    state.PauseTiming();
    std::copy(m0.begin(), m0.end(), m.begin());
    state.ResumeTiming();
    switch (module) {
      case slot_module::memformer: {
        const mem::memformer_options opt{.heads = H, .threads = threads};
        if (reference) {
          mem::reference::memformer_read(x, m, mw, out, opt);
          mem::reference::memformer_write(x, m, mw, opt);
        } else {
          mem::memformer_read(x, m, mw, out, opt);
          mem::memformer_write(x, m, mw, opt);
        }
        break;
      }
      case slot_module::lm2: {
        const mem::lm2_options opt{.heads = H, .threads = threads};
        if (reference) {
          mem::reference::lm2_read(x, m, lw, out, opt);
          mem::reference::lm2_write(x, m, lw, opt);
        } else {
          mem::lm2_read(x, m, lw, out, opt);
          mem::lm2_write(x, m, lw, opt);
        }
        break;
      }
      case slot_module::rxt: {
        const mem::rxt_options opt{.heads = H, .threads = threads};
        if (reference) {
          mem::reference::rxt_read(x, m, rw, out, opt);
          mem::reference::rxt_write(x, m, rw, opt);
        } else {
          mem::rxt_read(x, m, rw, out, opt);
          mem::rxt_write(x, m, rw, opt);
        }
        break;
      }
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::DoNotOptimize(m.data());
    benchmark::ClobberMemory();
  }
  const double l = static_cast<double>(L), s = static_cast<double>(S), d = static_cast<double>(D);
  double macs = cross_attention_macs(l, s, d) + cross_attention_macs(s, l, d);  // read + write
  if (module == slot_module::memformer) macs += 2 * s * d * d;                  // the own-slot key and value
  if (module == slot_module::lm2) macs += l * d * d + s * d * d + d * d;        // g_out, g_forget, g_in
  if (module == slot_module::rxt) macs += s * d * d;                            // G
  set_token_counters(state, l, 2 * macs, slot_label(L, S, D, H, threads));
}

// TTM: read r tokens from [memory; input], identity processing, write m tokens from
// [memory; read; input]; importance MLPs with Hd hidden units (gelu).
void ttm_row(benchmark::State& state, int threads, std::int64_t n, std::int64_t m, std::int64_t r, std::int64_t D,
             std::int64_t Hd, bool reference) {
  tensor<float, 3> in({1, n, D}), m0({1, m, D}), memory({1, m, D}), z({1, r, D});
  fill_random(in, 81);
  fill_random(m0, 82);
  tensor<float, 2> r1({D, Hd}), r2({Hd, r}), m1({D, Hd}), m2({Hd, m});
  const float a = 1.0f / std::sqrt(static_cast<float>(D)), b = 1.0f / std::sqrt(static_cast<float>(Hd));
  fill_random(r1, 83, -a, a);
  fill_random(r2, 84, -b, b);
  fill_random(m1, 85, -a, a);
  fill_random(m2, 86, -b, b);
  const mem::ttm_weights w{{r1, r2}, {m1, m2}};
  const mem::ttm_options opt{.threads = threads};
  for (auto _ : state) {
    state.PauseTiming();
    std::copy(m0.begin(), m0.end(), memory.begin());
    state.ResumeTiming();
    if (reference) {
      mem::reference::ttm_read(memory, in, w, z, opt);
      mem::reference::ttm_write(memory, z, in, w, opt);
    } else {
      mem::ttm_read(memory, in, w, z, opt);
      mem::ttm_write(memory, z, in, w, opt);
    }
    benchmark::DoNotOptimize(memory.data());
    benchmark::ClobberMemory();
  }
  auto summary = [&](double N, double k) { return N * D * Hd + N * Hd * k + k * N * D; };
  const double macs = summary(static_cast<double>(m + n), static_cast<double>(r)) +
                      summary(static_cast<double>(m + r + n), static_cast<double>(m));
  set_token_counters(state, static_cast<double>(n), 2 * macs,
                     "B=1 n=" + std::to_string(n) + " m=" + std::to_string(m) + " r=" + std::to_string(r) + " D=" +
                         std::to_string(D) + " Hd=" + std::to_string(Hd) + " threads=" + std::to_string(threads));
}

const bool registered = [] {
  const bool full = full_size();
  const std::int64_t L = full ? 4096 : 1024, S = 64, D = full ? 512 : 256, H = D / 64;
  for (const char* impl : {"fast", "reference"}) {
    const bool ref = std::string(impl) == "reference";
    if (ref && full) continue;  // the double loops at the small shape only
    const std::initializer_list<std::pair<std::string_view, std::string>> keys = {
        {"L", std::to_string(L)}, {"S", std::to_string(S)}, {"D", std::to_string(D)}, {"H", std::to_string(H)}};
    for (const auto& [name, module] : {std::pair{"memformer", slot_module::memformer},
                                       std::pair{"lm2", slot_module::lm2}, std::pair{"rxt", slot_module::rxt}}) {
      const slot_module mod = module;
      add_row(impl, name, keys, [=](benchmark::State& st, int t) { slot_row(st, t, mod, L, S, D, H, ref); });
    }
    // TTM: m = 96 memory tokens, r = 16 read tokens, n = L input tokens per step.
    const std::int64_t n = L, m = 96, r = 16, Hd = 64;
    add_row(impl, "ttm",
            {{"n", std::to_string(n)}, {"m", std::to_string(m)}, {"r", std::to_string(r)}, {"D", std::to_string(D)},
             {"Hd", std::to_string(Hd)}},
            [=](benchmark::State& st, int t) { ttm_row(st, t, n, m, r, D, Hd, ref); });
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
