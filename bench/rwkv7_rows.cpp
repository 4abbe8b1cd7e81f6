// bench/rwkv7_rows.cpp — rows of RWKV-7's generalized delta rule (include/mnemo/linear/rwkv7.hpp),
// at the linear family's shapes (bench/linear_rows.cpp): B = 1, H = 8, Dk = Dv = D = 128, f32.
//
//   rwkv7/<form>/H:8/L:<L>/D:128/threads:<t>      form chunked (default chunk, 16) or recurrent;
//                                                  L = 8192 (full), 2048 (small), 64 (tiny)
//   rwkv7/step/B:<B>/H:32/D:128/threads:<t>       one decoding step (rwkv7_step, in place) over a
//                                                  [B, 32, 128, 128] f32 state, B in {1, 8}
//   rwkv7/rmw_pass/B:<B>/H:32/D:128/threads:<t>   one plain read-modify-write pass S = a S + b over the
//                                                  same state memory: the floor of a step
//                                                  (`bench/plot --baseline rmw_pass`)
//
// Inputs as an RWKV-7 layer feeds them: log-decays in [-exp(-0.5), 0] (w = exp(-exp(-0.5)
// sigmoid(.)), RWKV-7's range; every 16-token chunk is weak), a = -kk, b = kk * iclr with kk a unit
// vector and iclr in [0, 1], scale 1.
//
// Counters: `tokens/s` = B H L per iteration. Chunked rows also count `FLOP/s`, the multiply-adds
// (x2) of the chunked algorithm's products, per chunk of n tokens and head, as bench/linear_rows.cpp
// counts the delta rules:
//   8 n Dk Dv                      the state read [Ag; Qg] S and the update [Kd; Bd]^T [V; U]
//   + 2 n (n + 1) (Dk + Dv)        P_qk and P_qb (diagonal included) and their products with V and U
//   + 2 n (n - 1) (Dk + Dv)        the strict triangles A_ak and A_ab, A_ak V and the solve on Dv columns
// Exps, masks and the element-wise decay factors are not counted. Against machine/sgemm
// (bench/baselines_bench.cpp) at the same thread count: the target is >= 0.5 at L = 8192,
// 1 thread. Step and rmw_pass rows count `bytes/s` = the state read and written once,
// 2 x 4 B H Dk Dv per iteration; the target is a step within 2x of rmw_pass's time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "common.hpp"
#include "mnemo/linear/rwkv7.hpp"
#include "mnemo/simd/simd.hpp"

namespace mnemo::bench {
namespace {

constexpr std::int64_t heads = 8, step_heads = 32, head_dim = 128;
constexpr float gate_lo = -0.6065307f;  // -exp(-0.5)

std::int64_t prefill_L() { return full_size() ? 8192 : tiny_size() ? tiny_prefill_L : 2048; }

// a = -kk, b = kk * iclr over rows of D values: kk the unit vector along a's random values, iclr
// random in [0, 1] (b holds it on entry).
void rwkv7_a_b(float* a, float* b, std::int64_t rows, std::int64_t D) {
  for (std::int64_t r = 0; r < rows; ++r) {
    float* ar = a + r * D;
    float* br = b + r * D;
    double ss = 0;
    for (std::int64_t c = 0; c < D; ++c) ss += static_cast<double>(ar[c]) * ar[c];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss + 1e-12));
    for (std::int64_t c = 0; c < D; ++c) {
      const float kk = ar[c] * inv;
      ar[c] = -kk;
      br[c] = kk * br[c];
    }
  }
}

// The chunked algorithm's FLOPs (header comment), per head, over L tokens in chunks of C.
double chunked_flops(std::int64_t L, std::int64_t Dk, std::int64_t Dv, std::int64_t C) {
  double total = 0;
  const double dk = static_cast<double>(Dk), dv = static_cast<double>(Dv);
  for (std::int64_t t0 = 0; t0 < L; t0 += C) {
    const double n = static_cast<double>(std::min(C, L - t0));
    total += 8 * n * dk * dv + 2 * n * (n + 1) * (dk + dv) + 2 * n * (n - 1) * (dk + dv);
  }
  return total;
}

void prefill_row(benchmark::State& state, linear::form form, std::int64_t L, int threads) {
  const std::int64_t D = head_dim;
  tensor<float, 4> q({1, heads, L, D}), k({1, heads, L, D}), v({1, heads, L, D}), g({1, heads, L, D}),
      a({1, heads, L, D}), b({1, heads, L, D}), o({1, heads, L, D}), s({1, heads, D, D});
  fill_random(q, 11);
  fill_random(k, 12, -1.0f / std::sqrt(static_cast<float>(D)), 1.0f / std::sqrt(static_cast<float>(D)));
  fill_random(v, 13);
  fill_random(g, 14, gate_lo, 0.0f);
  fill_random(a, 15);
  fill_random(b, 16, 0.0f, 1.0f);
  rwkv7_a_b(a.data(), b.data(), heads * L, D);
  const linear::options opt{.scale = 1.0f, .path = form, .threads = threads};
  for (auto _ : state) {
    std::fill(s.begin(), s.end(), 0.0f);
    linear::rwkv7(q, k, v, g, a, b, o, s, opt);
    benchmark::DoNotOptimize(o.data());
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(heads * L), benchmark::Counter::kIsIterationInvariantRate);
  const bool chunked = form == linear::form::chunked;
  if (chunked)
    set_rate_counters(state, static_cast<double>(heads) * chunked_flops(L, D, D, linear::rwkv7_default_chunk_size), 0);
  state.SetLabel("B=1 H=" + std::to_string(heads) + " L=" + std::to_string(L) + " Dk=" + std::to_string(D) +
                 " Dv=" + std::to_string(D) + " op=rwkv7 form=" + (chunked ? "chunked" : "recurrent") +
                 (chunked ? " chunk=" + std::to_string(linear::rwkv7_default_chunk_size) : std::string()) +
                 " threads=" + std::to_string(threads));
}

double state_bytes(std::int64_t B) { return static_cast<double>(B * step_heads * head_dim * head_dim * sizeof(float)); }

void set_step_counters(benchmark::State& state, const char* what, std::int64_t B, int threads) {
  set_rate_counters(state, 0, 2 * state_bytes(B));  // the state read and written once
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(B), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel("B=" + std::to_string(B) + " H=" + std::to_string(step_heads) + " Dk=" + std::to_string(head_dim) +
                 " Dv=" + std::to_string(head_dim) + " " + what + " threads=" + std::to_string(threads));
}

void step_row(benchmark::State& state, std::int64_t B, int threads) {
  const std::int64_t H = step_heads, D = head_dim;
  tensor<float, 3> q({B, H, D}), k({B, H, D}), v({B, H, D}), g({B, H, D}), a({B, H, D}), b({B, H, D}), o({B, H, D});
  tensor<float, 4> s({B, H, D, D});
  fill_random(q, 21);
  fill_random(k, 22, -1.0f / std::sqrt(static_cast<float>(D)), 1.0f / std::sqrt(static_cast<float>(D)));
  fill_random(v, 23);
  fill_random(g, 24, gate_lo, 0.0f);
  fill_random(a, 25);
  fill_random(b, 26, 0.0f, 1.0f);
  fill_random(s, 27, -0.1f, 0.1f);
  rwkv7_a_b(a.data(), b.data(), B * H, D);
  const linear::options opt{.scale = 1.0f, .threads = threads};
  for (auto _ : state) {
    linear::rwkv7_step(q, k, v, g, a, b, o, s, opt);
    benchmark::DoNotOptimize(o.data());
    benchmark::ClobberMemory();
  }
  set_step_counters(state, "op=rwkv7", B, threads);
}

// S = a S + b over every (batch, head) state, one vector pass, (batch, head) pairs over the threads
// as the step spreads them (bench/linear_rows.cpp's rmw_pass, at this file's shapes).
void rmw_pass_row(benchmark::State& state, std::int64_t B, int threads) {
  tensor<float, 4> s({B, step_heads, head_dim, head_dim});
  fill_random(s, 27);
  constexpr float a = 0.5f, b = 0.25f;
  const std::int64_t n = head_dim * head_dim;
  for (auto _ : state) {
    parallel_for(B * step_heads, [&](std::int64_t bh) {
      float* p = s.data() + bh * n;
      std::int64_t i = 0;
      if constexpr (simd::enabled) {
        using batch = simd::fbatch<>;
        constexpr std::int64_t w = simd::width<>;
        for (; i + w <= n; i += w) simd::store(p + i, batch(a) * simd::load<simd::default_arch>(p + i) + batch(b));
      }
      for (; i < n; ++i) p[i] = a * p[i] + b;
    }, threads);
    benchmark::DoNotOptimize(s.data());
    benchmark::ClobberMemory();
  }
  set_step_counters(state, "rmw_pass", B, threads);
}

const bool registered = [] {
  const std::int64_t L = prefill_L();
  const std::string Ls = std::to_string(L), Hs = std::to_string(heads), Ds = std::to_string(head_dim),
                    SHs = std::to_string(step_heads);
  for (int t : thread_counts()) {
    const std::string ts = std::to_string(t);
    auto guarded = [t](auto body) {
      return [t, body](benchmark::State& st) {
        if (threads_available(st, t)) body(st);
      };
    };
    for (linear::form f : {linear::form::chunked, linear::form::recurrent})
      register_row(row_name("rwkv7", f == linear::form::chunked ? "chunked" : "recurrent",
                            {{"H", Hs}, {"L", Ls}, {"D", Ds}, {"threads", ts}}),
                   guarded([f, L, t](benchmark::State& st) { prefill_row(st, f, L, t); }));
    for (std::int64_t B : {1, 8}) {
      const std::string Bs = std::to_string(B);
      register_row(row_name("rwkv7", "step", {{"B", Bs}, {"H", SHs}, {"D", Ds}, {"threads", ts}}),
                   guarded([B, t](benchmark::State& st) { step_row(st, B, t); }));
      register_row(row_name("rwkv7", "rmw_pass", {{"B", Bs}, {"H", SHs}, {"D", Ds}, {"threads", ts}}),
                   guarded([B, t](benchmark::State& st) { rmw_pass_row(st, B, t); }));
    }
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
