// bench/linear_rows.cpp — rows of the linear-attention family (include/mnemo/linear/).
//
//   linear/<form>/op:<op>/L:<L>/D:<D>/threads:<t>    form recurrent or chunked, op one of the member
//                                                    table (linear::all_members, members.hpp: linear_attn,
//                                                    retention, simple_gla, gla, delta_rule,
//                                                    gated_delta_rule, kda, rwkv7); B = 1, H = 8, Dk = Dv = D = 128,
//                                                    f32, default chunk size. Small: L = 2048; full:
//                                                    L = 8192. `bench/plot --baseline recurrent`
//                                                    shows chunked / recurrent.
//   linear/<form>/op:<op>/L:<L>/D:128/threads:1      full only, L in {1, 2, 4, 8}: where the chunked
//                                                    form overtakes the recurrent one
//                                                    (linear::recurrent_below)
//   linear/chunked/op:<op>/L:8192/D:128/chunk:<C>/threads:1   full only, C in {8, 16, 24, 32, 48, 64, 128}:
//                                                    the default chunk sizes
//   linear/reference/op:<op>/L:<L>/D:128/threads:<t> the readable double-precision recurrence
//                                                    (linear::reference::<op>, the one the tests trust) at
//                                                    the same shape: `--baseline reference`
//   linear/step/op:<op>/B:<B>/H:32/D:128/threads:<t>  one decoding step (<op>_step: state update and
//                                                    output for one token) over a [B, 32, 128, 128] f32
//                                                    state, B in {1, 8} (2 MiB: cache-resident here;
//                                                    16 MiB: past L2)
//   linear/rmw_pass/B:<B>/H:32/D:128/threads:<t>     one plain read-modify-write pass S = a S + b over the
//                                                    same state memory: the floor of a step. Compare with
//                                                    `bench/plot --baseline rmw_pass --ignore-for-baseline kv,op`
//   linear_vs_flash/<op>/L:<L>/D:128/threads:<t>     the chunked form of each op over a sweep of L
//                                                    (small: 256, 512, 1024, 4096; full: also 16384
//                                                    and 65536): bench/plot prints and marks where
//                                                    each op's time crosses flash's
//   linear_vs_flash/flash/L:<L>/D:128/threads:<t>    causal softmax attention (attention::flash) at the
//                                                    same B, H, L, D: `--baseline flash` gives the
//                                                    ratios. Registered up to L = 16384 (full): a
//                                                    causal call at L = 65536 is 8.8 TFLOP, about a
//                                                    minute an iteration on one core here (flash
//                                                    runs at ~160 GFLOP/s at L = 16384).
//
// Counters: `tokens/s` = B H L per iteration (every linear row: the figure that compares the two
// forms, and the linear ops with flash). Chunked rows also count `FLOP/s`: the multiply-adds (x2)
// of the chunked algorithm's products, per chunk of n tokens and head,
//   decaying linear attention (linear_attn, retention, simple_gla, gla):
//       4 n Dk Dv               the state read Q S and the state update K^T V
//     + n (n + 1) (Dk + Dv)     the causal triangle of Q K^T and of (Q K^T o D) V, diagonal included
//   delta rules (and kda; the members with beta): 6 n Dk Dv (the state read of [K; Q] and the update K^T U) + n (n + 1) (Dk + Dv)
//     (Q K^T and P U) + n (n - 1) (Dk + Dv) (the strict triangle of K K^T and the unit-triangular
//     solve on Dv columns).
//   rwkv7 (two rank-one terms, rwkv7.hpp): 8 n Dk Dv (the state read of [A; Q] and the update
//     [K; B]^T [V; U]) + 2 n (n + 1) (Dk + Dv) + 2 n (n - 1) (Dk + Dv), as bench/rwkv7_rows.cpp.
// Decay tables, exps, feature maps, L2 norms and GLA's element-wise sub-block terms are not
// counted. Only the causal triangle counts, although the kernels compute the scores of whole
// micro-kernel row blocks: the count is the algorithm's, not the hardware's. The recurrent form
// does 4 Dk Dv FLOPs per token and head (linear attention and the scalar-gated members: the state
// update and the read; the delta rules 6 Dk Dv with their extra state read), the chunked one
// 4 Dk Dv + (n + 1)(Dk + Dv), so the chunked form's speed-up over the recurrent one is at most
// its FLOP rate over the recurrent one's, times 4 Dk Dv / (4 Dk Dv + (n + 1)(Dk + Dv)) (0.89 at
// chunk 32). Step and rmw_pass rows count `bytes/s` = the state read and written once,
// 2 x 4 B H Dk Dv per iteration. Flash rows count 2 (D + Dv) per visible (query, key) pair and head, as every prefill row
// (bench/README.md). `%sgemm` in the plot is then the share of the machine's GEMM peak.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/linear/members.hpp"
#include "mnemo/simd/simd.hpp"

namespace mnemo::bench {
namespace {

// An op is a row of the member table (linear::all_members), passed as a value M.

constexpr std::int64_t heads = 8;
constexpr std::int64_t head_dim = 128;

// Gates and betas of the rows: log-decays in [-0.1, 0] (a decay of 0.9 to 1 per token, GLA's and
// Gated DeltaNet's usual range), beta in [0.05, 1]; RWKV-7's a = -kk, b = kk * iclr (kk a unit
// vector, iclr in [0, 1]). rwkv7 runs here at the family's gates, scale and k; bench/rwkv7_rows.cpp
// has it with RWKV-7's own (log-decays in [-exp(-0.5), 0], scale 1).
constexpr float gate_lo = -0.1f;
constexpr float beta_lo = 0.05f;

// a = -kk, b = kk * iclr over rows of D values: kk the unit vector along a's random values, iclr
// b's values in [0, 1].
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

struct linear_inputs {
  tensor<float, 4> q, k, v, o, state;  // [B, H, L, D] x 4, [B, H, D, D]
  tensor<float, 3> g, beta;            // [B, H, L]
  tensor<float, 4> gk, a, b;           // [B, H, L, D]
  tensor<float, 1> gamma;              // [H]

  linear_inputs(std::int64_t L, std::int64_t D)
      : q({1, heads, L, D}),
        k({1, heads, L, D}),
        v({1, heads, L, D}),
        o({1, heads, L, D}),
        state({1, heads, D, D}),
        g({1, heads, L}),
        beta({1, heads, L}),
        gk({1, heads, L, D}),
        a({1, heads, L, D}),
        b({1, heads, L, D}),
        gamma(linear::retnet_gamma(heads)) {
    fill_random(q, 11);
    fill_random(k, 12);
    fill_random(v, 13);
    fill_random(g, 14, gate_lo, 0.0f);
    fill_random(gk, 15, gate_lo, 0.0f);
    fill_random(beta, 16, beta_lo, 1.0f);
    fill_random(a, 17);
    fill_random(b, 18, 0.0f, 1.0f);
    rwkv7_a_b(a.data(), b.data(), heads * L, D);
  }

  // One call of `o` over the whole sequence, from a zero state (the delta rules normalise q and k
  // in the op, as Gated DeltaNet layers do).
  template <class M>
  void run(M m, linear::options opt) {
    std::fill(state.begin(), state.end(), 0.0f);
    opt.use_qk_l2norm = M::beta;
    linear::run_member(m, cview(q), cview(k), cview(v), {gamma, g, gk, beta, a, b}, o, state, opt);
  }
  // The same call through linear::reference.
  template <class M>
  void run_reference(M m, linear::options opt) {
    std::fill(state.begin(), state.end(), 0.0f);
    opt.use_qk_l2norm = M::beta;
    linear::reference_member(m, cview(q), cview(k), cview(v), {gamma, g, gk, beta, a, b}, o, state, opt);
  }
};

// The chunked algorithm's FLOPs (header comment), per head, over L tokens in chunks of C.
template <class M>
double chunked_flops(M, std::int64_t L, std::int64_t Dk, std::int64_t Dv, std::int64_t C) {
  double total = 0;
  for (std::int64_t t0 = 0; t0 < L; t0 += C) {
    const double n = static_cast<double>(std::min(C, L - t0)), dk = static_cast<double>(Dk),
                 dv = static_cast<double>(Dv);
    if constexpr (std::is_same_v<M, linear::members::rwkv7>)
      total += 8 * n * dk * dv + 2 * n * (n + 1) * (dk + dv) + 2 * n * (n - 1) * (dk + dv);
    else if (M::beta) total += 6 * n * dk * dv + n * (n + 1) * (dk + dv) + n * (n - 1) * (dk + dv);
    else total += 4 * n * dk * dv + n * (n + 1) * (dk + dv);
  }
  return total;
}

template <class M>
void set_linear_counters(benchmark::State& state, M which, linear::form form, std::int64_t L, std::int64_t C,
                         int threads) {
  const double tokens = static_cast<double>(heads * L);
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  if (form == linear::form::chunked)
    set_rate_counters(state, static_cast<double>(heads) * chunked_flops(which, L, head_dim, head_dim, C), 0);
  state.SetLabel("B=1 H=" + std::to_string(heads) + " L=" + std::to_string(L) + " Dk=" + std::to_string(head_dim) +
                 " Dv=" + std::to_string(head_dim) + " op=" + M::name +
                 " form=" + (form == linear::form::chunked ? "chunked" : "recurrent") +
                 (form == linear::form::chunked ? " chunk=" + std::to_string(C) : std::string()) +
                 " threads=" + std::to_string(threads));
}

template <class M>
void linear_row(benchmark::State& state, M which, linear::form form, std::int64_t L, std::int64_t chunk, int threads) {
  if (!threads_available(state, threads)) return;
  linear_inputs in(L, head_dim);
  linear::options opt;
  opt.path = form;
  opt.threads = threads;
  opt.chunk_size = chunk;
  for (auto _ : state) {
    in.run(which, opt);
    benchmark::DoNotOptimize(in.o.data());
    benchmark::ClobberMemory();
  }
  set_linear_counters(state, which, form, L, chunk > 0 ? chunk : M::default_chunk, threads);
}

template <class M>
void reference_row(benchmark::State& state, M which, std::int64_t L, int threads) {
  if (!threads_available(state, threads)) return;
  linear_inputs in(L, head_dim);
  linear::options opt;
  opt.threads = threads;
  for (auto _ : state) {
    in.run_reference(which, opt);
    benchmark::DoNotOptimize(in.o.data());
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(heads * L), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel("B=1 H=" + std::to_string(heads) + " L=" + std::to_string(L) + " Dk=" + std::to_string(head_dim) +
                 " Dv=" + std::to_string(head_dim) + " op=" + M::name + " form=reference threads=" +
                 std::to_string(threads));
}

// Decode-shaped inputs: one token of q, k, v, gates and betas for [B, step_heads] heads, and the state.
constexpr std::int64_t step_heads = 32;

struct step_inputs {
  tensor<float, 3> q, k, v, o, gk, a, b;  // [B, H, D]
  tensor<float, 2> g, beta;         // [B, H]
  tensor<float, 1> gamma;           // [H]
  tensor<float, 4> state;           // [B, H, D, D]

  explicit step_inputs(std::int64_t B)
      : q({B, step_heads, head_dim}),
        k({B, step_heads, head_dim}),
        v({B, step_heads, head_dim}),
        o({B, step_heads, head_dim}),
        gk({B, step_heads, head_dim}),
        a({B, step_heads, head_dim}),
        b({B, step_heads, head_dim}),
        g({B, step_heads}),
        beta({B, step_heads}),
        gamma(linear::retnet_gamma(step_heads)),
        state({B, step_heads, head_dim, head_dim}) {
    fill_random(q, 21);
    fill_random(k, 22);
    fill_random(v, 23);
    fill_random(gk, 24, gate_lo, 0.0f);
    fill_random(g, 25, gate_lo, 0.0f);
    fill_random(beta, 26, beta_lo, 1.0f);
    fill_random(state, 27);
    fill_random(a, 28);
    fill_random(b, 29, 0.0f, 1.0f);
    rwkv7_a_b(a.data(), b.data(), B * step_heads, head_dim);
  }

  template <class M>
  void step(M m, linear::options opt) {
    opt.use_qk_l2norm = M::beta;
    linear::step_member(m, cview(q), cview(k), cview(v), {gamma, g, gk, beta, a, b}, o, state, opt);
  }
};

double state_bytes(std::int64_t B) { return static_cast<double>(B * step_heads * head_dim * head_dim * sizeof(float)); }

void set_step_counters(benchmark::State& state, const char* what, std::int64_t B, int threads) {
  set_rate_counters(state, 0, 2 * state_bytes(B));  // the state read and written once
  state.SetLabel("B=" + std::to_string(B) + " H=" + std::to_string(step_heads) + " Dk=" + std::to_string(head_dim) +
                 " Dv=" + std::to_string(head_dim) + " " + what + " threads=" + std::to_string(threads));
}

template <class M>
void step_row(benchmark::State& state, M which, std::int64_t B, int threads) {
  if (!threads_available(state, threads)) return;
  step_inputs in(B);
  linear::options opt;
  opt.threads = threads;
  for (auto _ : state) {
    in.step(which, opt);
    benchmark::DoNotOptimize(in.o.data());
    benchmark::ClobberMemory();
  }
  set_step_counters(state, (std::string("op=") + M::name).c_str(), B, threads);
}

// S = a S + b over every (batch, head) state, one vector pass, (batch, head) pairs over the
// threads as the step functions spread them. a and b keep the values bounded (|S| <= 1 stays so).
void rmw_pass_row(benchmark::State& state, std::int64_t B, int threads) {
  if (!threads_available(state, threads)) return;
  step_inputs in(B);
  constexpr float a = 0.5f, b = 0.25f;
  const std::int64_t n = head_dim * head_dim;
  for (auto _ : state) {
    parallel_for(B * step_heads, [&](std::int64_t bh) {
      float* s = in.state.data() + bh * n;
      using batch = simd::fbatch<>;
      constexpr std::int64_t w = simd::width<>;
      std::int64_t i = 0;
      if constexpr (simd::enabled)
        for (; i + w <= n; i += w) simd::store(s + i, batch(a) * simd::load<simd::default_arch>(s + i) + batch(b));
      for (; i < n; ++i) s[i] = a * s[i] + b;
    }, threads);
    benchmark::DoNotOptimize(in.state.data());
    benchmark::ClobberMemory();
  }
  set_step_counters(state, "rmw_pass", B, threads);
}

void flash_row(benchmark::State& state, std::int64_t L, int threads) {
  if (!threads_available(state, threads)) return;
  const shape s = prefill_shape(L, head_dim, true, heads);
  attention_inputs<float> in(s);
  const attention::options opt{0, threads};
  for (auto _ : state) {
    attention::flash(cview(in.q), in.k, in.v, in.out, in.lse, attention::mods::causal{}, opt);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_attention_counters(state, s, threads);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(heads * L), benchmark::Counter::kIsIterationInvariantRate);
}

std::string form_name(linear::form f) { return f == linear::form::chunked ? "chunked" : "recurrent"; }

const bool registered = [] {
  const std::int64_t main_L = full_size() ? 8192 : 2048;
  for (int t : thread_counts())
    linear::all_members::for_each([&](auto which) {
      using M = decltype(which);
      for (linear::form f : {linear::form::recurrent, linear::form::chunked})
        register_row(row_name("linear", form_name(f),
                              {{"op", M::name}, {"L", std::to_string(main_L)}, {"D", std::to_string(head_dim)},
                               {"threads", std::to_string(t)}}),
                     [=](benchmark::State& st) { linear_row(st, which, f, main_L, 0, t); });
    });

  for (int t : thread_counts())
    linear::all_members::for_each([&](auto which) {
      using M = decltype(which);
      register_row(row_name("linear", "reference",
                            {{"op", M::name}, {"L", std::to_string(main_L)}, {"D", std::to_string(head_dim)},
                             {"threads", std::to_string(t)}}),
                   [=](benchmark::State& st) { reference_row(st, which, main_L, t); });
    });

  for (int t : thread_counts())
    for (std::int64_t B : {1, 8}) {
      const std::string Bs = std::to_string(B), Hs = std::to_string(step_heads), Ds = std::to_string(head_dim),
                        ts = std::to_string(t);
      register_row(row_name("linear", "rmw_pass", {{"B", Bs}, {"H", Hs}, {"D", Ds}, {"threads", ts}}),
                   [=](benchmark::State& st) { rmw_pass_row(st, B, t); });
      linear::all_members::for_each([&](auto which) {
        using M = decltype(which);
        register_row(row_name("linear", "step", {{"op", M::name}, {"B", Bs}, {"H", Hs}, {"D", Ds}, {"threads", ts}}),
                     [=](benchmark::State& st) { step_row(st, which, B, t); });
      });
    }

  if (full_size()) {
    linear::all_members::for_each([&](auto which) {
      using M = decltype(which);
      for (std::int64_t L : {1, 2, 4, 8})
        for (linear::form f : {linear::form::recurrent, linear::form::chunked})
          register_row(row_name("linear", form_name(f),
                                {{"op", M::name}, {"L", std::to_string(L)}, {"D", std::to_string(head_dim)},
                                 {"threads", "1"}}),
                       [=](benchmark::State& st) { linear_row(st, which, f, L, 0, 1); });
      for (std::int64_t C : {8, 16, 24, 32, 48, 64, 128})
        register_row(row_name("linear", "chunked",
                              {{"op", M::name}, {"L", "8192"}, {"D", std::to_string(head_dim)},
                               {"chunk", std::to_string(C)}, {"threads", "1"}}),
                     [=](benchmark::State& st) { linear_row(st, which, linear::form::chunked, 8192, C, 1); });
    });
  }

  // Starts at L = 256: the chunked ops overtake causal flash below L = 1024 here (at L = 1024 the
  // fastest op took 6.3 ms a call against flash's 21 ms, one thread, 2026-11-24), and bench/plot
  // interpolates the crossover between two measured lengths.
  const std::vector<std::int64_t> sweep = full_size()
                                              ? std::vector<std::int64_t>{256, 512, 1024, 4096, 16384, 65536}
                                              : std::vector<std::int64_t>{256, 512, 1024, 4096};
  const std::int64_t flash_max_L = 16384;
  for (int t : thread_counts())
    for (std::int64_t L : sweep) {
      const auto keys = [&](const char* impl) {
        return row_name("linear_vs_flash", impl,
                        {{"L", std::to_string(L)}, {"D", std::to_string(head_dim)}, {"threads", std::to_string(t)}});
      };
      linear::all_members::for_each([&](auto which) {
        using M = decltype(which);
        register_row(keys(M::name),
                     [=](benchmark::State& st) { linear_row(st, which, linear::form::chunked, L, 0, t); });
      });
      if (L <= flash_max_L) register_row(keys("flash"), [=](benchmark::State& st) { flash_row(st, L, t); });
    }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
