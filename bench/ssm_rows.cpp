// bench/ssm_rows.cpp — rows of the state-space front-ends (include/mnemo/linear/causal_conv1d.hpp,
// selective_scan.hpp), at Mamba-1 sizes: Dm = 2048 channels (d_inner of a 1B-class model),
// N = 16 states per channel, W = 4 taps, one group of B / C; and of the Mamba-2 SSD core
// (mamba2.hpp) at the linear family's sizes: H = 8 heads of P = 128 channels, N = 128 states, one
// group (the step: H = 32, as the linear family's step rows).
//
//   ssm/conv1d/B:1/Dm:2048/L:<L>/W:4/threads:<t>          causal_conv1d with bias, SiLU, initial and
//                                                        final states; L = 2048 (small), 8192 (full)
//   ssm/selective_scan/B:1/Dm:2048/N:16/L:<L>/threads:<t>  the selective scan with D, z, delta_bias,
//                                                        softplus and the state in and out
//   ssm/conv1d_step/B:<B>/Dm:2048/W:4/threads:<t>        one token of causal_conv1d_step (bias, SiLU)
//   ssm/selective_scan_step/B:<B>/Dm:2048/N:16/threads:<t>  one token of selective_scan_step (all options)
//   ssm/rmw_pass/B:<B>/Dm:2048/W:4/threads:<t>           one plain read-modify-write pass s = a s + b over
//   ssm/rmw_pass/B:<B>/Dm:2048/N:16/threads:<t>          a state of B x Dm x 3 floats (the convolution's
//                                                        W - 1 columns) or B x Dm x 16 (the scan's): the
//                                                        floor of each step, keyed like it; B in {1, 8}
//   ssm/mamba2/B:1/H:8/P:128/N:128/L:<L>/threads:<t>     the chunked Mamba-2 (default chunk) with D, z,
//                                                        dt_bias, softplus and the state in and out
//   ssm/mamba2_step/B:<B>/H:32/P:128/N:128/threads:<t>   one token of mamba2_step (all options, in place)
//   ssm/rmw_pass/B:<B>/H:32/P:128/N:128/threads:<t>      the plain pass over its B x 32 x 128 x 128 state
//
// Counters: `bytes/s` counts the traffic a call cannot avoid, in f32:
//   conv1d              x read, y written: 2 x 4 B Dm L (the weights, bias and states are < 0.1%)
//   selective_scan      u, delta, z read and y written (4 x 4 B Dm L), Bm and Cm read (2 x 4 B G N L),
//                       the state read and written (2 x 4 B Dm N); A, D, delta_bias are < 0.1%.
//                       Against machine/stream_read at the same thread count: the target is
//                       >= 0.5 at 1 thread (the scan is sequential in time and streams its inputs).
//   conv1d_step         the state read and written (2 x 4 B Dm (W-1)), x read and y written
//                       (2 x 4 B Dm), the weights and bias read once (4 Dm (W+1))
//   selective_scan_step the state read and written (2 x 4 B Dm N), A read (4 Dm N), u, delta, z, y
//                       (4 x 4 B Dm), Bm and Cm (2 x 4 B G N)
//   rmw_pass            the state read and written (2 x 4 B Dm n, or 2 x 4 B H N P)
//   mamba2_step         the state read and written (2 x 4 B H N P), x, z, y (3 x 4 B H P), dt
//                       (4 B H), Bm and Cm (2 x 4 B G N)
// and `FLOP/s` for the chunked mamba2, counted as bench/linear_rows.cpp counts simple_gla (the
// same kernel with k = B, q = C, v = dt x): per chunk of n tokens and head 4 n N P (the state read
// and update) + n (n + 1) (N + P) (the causal triangle), times 2; the softplus, the skip and the
// gate are not counted. Against the machine/sgemm row at the same thread count: the issue's
// target is >= 0.5 at 1 thread.
// The target for the steps: time within 2x of the rmw_pass row of the same state size
// (`bench/plot --baseline rmw_pass`, or the ratio of the two times). `tokens/s` = B L (B for a step).
#include <algorithm>
#include <cstdint>
#include <string>

#include "common.hpp"
#include "mnemo/linear/causal_conv1d.hpp"
#include "mnemo/linear/mamba2.hpp"
#include "mnemo/linear/selective_scan.hpp"
#include "mnemo/simd/simd.hpp"

namespace mnemo::bench {
namespace {

constexpr std::int64_t model_dim = 2048, state_dim = 16, conv_width = 4, groups = 1;
// Mamba-2: heads of the prefill and of the step, head dim P, state size N, groups of B / C.
constexpr std::int64_t ssd_heads = 8, ssd_step_heads = 32, ssd_head_dim = 128, ssd_state_dim = 128, ssd_groups = 1;

std::int64_t prefill_L() { return full_size() ? 8192 : tiny_size() ? 256 : 2048; }

void set_counters(benchmark::State& state, double bytes, double tokens, const std::string& label, int threads) {
  set_rate_counters(state, 0, bytes);
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(label + " threads=" + std::to_string(threads));
}

constexpr double f32 = sizeof(float);

void conv_row(benchmark::State& state, std::int64_t L, int threads) {
  const std::int64_t B = 1, Dm = model_dim, W = conv_width;
  tensor<float, 3> x({B, Dm, L}), y({B, Dm, L}), s({B, Dm, W - 1});
  tensor<float, 2> w({Dm, W});
  tensor<float, 1> bias({Dm});
  fill_random(x, 1);
  fill_random(w, 2, -0.5f, 0.5f);
  fill_random(bias, 3);
  const linear::conv1d_options opt{linear::conv_activation::silu, threads};
  for (auto _ : state) {
    linear::causal_conv1d(x, w, bias, y, s, s, opt);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 2 * f32 * B * Dm * L, static_cast<double>(B * L),
               "B=1 Dm=2048 L=" + std::to_string(L) + " W=4 bias silu states", threads);
}

// Inputs of a Mamba-1 scan over L tokens (L = 1: the step's columns are the same data).
struct scan_inputs {
  std::int64_t B, Dm, N, L, G;
  tensor<float, 3> u, delta, z, y, state;
  tensor<float, 2> A;
  tensor<float, 4> Bm, Cm;
  tensor<float, 1> D, bias;

  scan_inputs(std::int64_t B_, std::int64_t L_)
      : B(B_), Dm(model_dim), N(state_dim), L(L_), G(groups),
        u({B, Dm, L}), delta({B, Dm, L}), z({B, Dm, L}), y({B, Dm, L}), state({B, Dm, N}),
        A({Dm, N}), Bm({B, G, N, L}), Cm({B, G, N, L}), D({Dm}), bias({Dm}) {
    fill_random(u, 11);
    fill_random(delta, 12, -4.0f, 0.0f);  // softplus: dt in (0.02, 0.7)
    fill_random(z, 13);
    fill_random(A, 14, -8.0f, -0.5f);
    fill_random(Bm, 15);
    fill_random(Cm, 16);
    fill_random(D, 17);
    fill_random(bias, 18, -0.5f, 0.5f);
  }
};

void scan_row(benchmark::State& state, std::int64_t L, int threads) {
  scan_inputs in(1, L);
  const linear::selective_scan_options opt{true, threads};
  for (auto _ : state) {
    linear::selective_scan(in.u, in.delta, in.A, in.Bm, in.Cm, in.D, in.z, in.bias, in.y, in.state, opt);
    benchmark::DoNotOptimize(in.y.data());
    benchmark::ClobberMemory();
  }
  const double bytes = f32 * (4.0 * in.B * in.Dm * L + 2.0 * in.B * in.G * in.N * L + 2.0 * in.B * in.Dm * in.N);
  set_counters(state, bytes, static_cast<double>(in.B * L),
               "B=1 Dm=2048 N=16 G=1 L=" + std::to_string(L) + " D z delta_bias softplus state", threads);
}

void conv_step_row(benchmark::State& state, std::int64_t B, int threads) {
  const std::int64_t Dm = model_dim, W = conv_width;
  tensor<float, 2> x({B, Dm}), y({B, Dm}), w({Dm, W});
  tensor<float, 3> s({B, Dm, W - 1});
  tensor<float, 1> bias({Dm});
  fill_random(x, 21);
  fill_random(w, 22, -0.5f, 0.5f);
  fill_random(bias, 23);
  fill_random(s, 24);
  const linear::conv1d_options opt{linear::conv_activation::silu, threads};
  for (auto _ : state) {
    linear::causal_conv1d_step(x, w, bias, y, s, opt);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double bytes = f32 * (2.0 * B * Dm * (W - 1) + 2.0 * B * Dm + Dm * (W + 1.0));
  set_counters(state, bytes, static_cast<double>(B), "B=" + std::to_string(B) + " Dm=2048 W=4 bias silu", threads);
}

void scan_step_row(benchmark::State& state, std::int64_t B, int threads) {
  scan_inputs in(B, 1);
  tensor<float, 2> y({B, in.Dm});
  // The [.., 1] columns of scan_inputs, reshaped (the same contiguous data).
  const view<const float, 2> u2(in.u.data(), {B, in.Dm}), d2(in.delta.data(), {B, in.Dm}), z2(in.z.data(), {B, in.Dm});
  const view<const float, 3> B3(in.Bm.data(), {B, in.G, in.N}), C3(in.Cm.data(), {B, in.G, in.N});
  fill_random(in.state, 25);
  const linear::selective_scan_options opt{true, threads};
  for (auto _ : state) {
    linear::selective_scan_step(u2, d2, in.A, B3, C3, in.D, z2, in.bias, y, in.state, opt);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double bytes = f32 * (2.0 * B * in.Dm * in.N + 1.0 * in.Dm * in.N + 4.0 * B * in.Dm + 2.0 * B * in.G * in.N);
  set_counters(state, bytes, static_cast<double>(B),
               "B=" + std::to_string(B) + " Dm=2048 N=16 G=1 D z delta_bias softplus", threads);
}

// Inputs of a Mamba-2 call over L tokens with H heads (L = 1: the step's tokens are the same data).
struct ssd_inputs {
  std::int64_t B, H, L, P, N, G;
  tensor<float, 4> x, z, y, Bm, Cm, state;
  tensor<float, 3> dt;
  tensor<float, 1> A, D, bias;

  ssd_inputs(std::int64_t B_, std::int64_t H_, std::int64_t L_)
      : B(B_), H(H_), L(L_), P(ssd_head_dim), N(ssd_state_dim), G(ssd_groups),
        x({B, H, L, P}), z({B, H, L, P}), y({B, H, L, P}), Bm({B, G, L, N}), Cm({B, G, L, N}), state({B, H, N, P}),
        dt({B, H, L}), A({H}), D({H}), bias({H}) {
    fill_random(x, 41);
    fill_random(z, 42);
    fill_random(Bm, 43);
    fill_random(Cm, 44);
    fill_random(state, 45);
    fill_random(dt, 46, -4.0f, 0.0f);  // softplus: dt in (0.02, 0.7)
    fill_random(A, 47, -8.0f, -0.5f);
    fill_random(D, 48);
    fill_random(bias, 49, -0.5f, 0.5f);
  }
};

// The chunked algorithm's FLOPs per head (header comment; bench/linear_rows.cpp, chunked_flops).
double ssd_chunked_flops(std::int64_t L, std::int64_t N, std::int64_t P, std::int64_t C) {
  double total = 0;
  for (std::int64_t t0 = 0; t0 < L; t0 += C) {
    const double n = static_cast<double>(std::min(C, L - t0));
    total += 4 * n * static_cast<double>(N * P) + n * (n + 1) * static_cast<double>(N + P);
  }
  return total;
}

void mamba2_row(benchmark::State& state, std::int64_t L, int threads) {
  ssd_inputs in(1, ssd_heads, L);
  const linear::mamba2_options opt{true, 0, linear::form::chunked, threads};
  for (auto _ : state) {
    linear::mamba2(in.x, in.dt, in.A, in.Bm, in.Cm, in.D, in.z, in.bias, in.y, in.state, opt);
    benchmark::DoNotOptimize(in.y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 0, static_cast<double>(in.B * L),
               "B=1 H=8 P=128 N=128 G=1 L=" + std::to_string(L) + " chunk=" +
                   std::to_string(linear::default_chunk_size) + " D z dt_bias softplus state",
               threads);
  set_rate_counters(state, static_cast<double>(in.H) * ssd_chunked_flops(L, in.N, in.P, linear::default_chunk_size),
                    0);
}

void mamba2_step_row(benchmark::State& state, std::int64_t B, int threads) {
  ssd_inputs in(B, ssd_step_heads, 1);
  // The [.., 1, ..] tokens of ssd_inputs, reshaped (the same contiguous data).
  const std::int64_t H = in.H, P = in.P, N = in.N, G = in.G;
  const view<const float, 3> x3(in.x.data(), {B, H, P}), z3(in.z.data(), {B, H, P});
  const view<const float, 3> B3(in.Bm.data(), {B, G, N}), C3(in.Cm.data(), {B, G, N});
  const view<const float, 2> dt2(in.dt.data(), {B, H});
  const view<float, 3> y3(in.y.data(), {B, H, P});
  const linear::mamba2_options opt{true, 0, linear::form::automatic, threads};
  for (auto _ : state) {
    linear::mamba2_step(x3, dt2, in.A, B3, C3, in.D, z3, in.bias, y3, in.state, opt);
    benchmark::DoNotOptimize(in.y.data());
    benchmark::ClobberMemory();
  }
  const double bytes = f32 * (2.0 * B * H * N * P + 3.0 * B * H * P + 1.0 * B * H + 2.0 * B * G * N);
  set_counters(state, bytes, static_cast<double>(B),
               "B=" + std::to_string(B) + " H=32 P=128 N=128 G=1 D z dt_bias softplus", threads);
}

// s = a s + b over `size` floats, one vector pass, split over the threads like the steps; `label`
// names the state.
void rmw_pass_row(benchmark::State& state, std::int64_t B, std::int64_t size, const std::string& label, int threads) {
  tensor<float, 1> s({size});
  fill_random(s, 31);
  constexpr float a = 0.5f, b = 0.25f;
  constexpr std::int64_t block = 4096;  // floats per work item
  const std::int64_t items = (size + block - 1) / block;
  for (auto _ : state) {
    parallel_for(items, [&](std::int64_t item) {
      float* p = s.data() + item * block;
      const std::int64_t m = std::min(block, size - item * block);
      std::int64_t i = 0;
      if constexpr (simd::enabled) {
        using batch = simd::fbatch<>;
        constexpr std::int64_t w = simd::width<>;
        for (; i + w <= m; i += w) simd::store(p + i, batch(a) * simd::load<simd::default_arch>(p + i) + batch(b));
      }
      for (; i < m; ++i) p[i] = a * p[i] + b;
    }, threads);
    benchmark::DoNotOptimize(s.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 2 * f32 * static_cast<double>(size), static_cast<double>(B),
               "B=" + std::to_string(B) + " " + label + " rmw_pass", threads);
}

void rmw_pass_row(benchmark::State& state, std::int64_t B, std::int64_t n, int threads) {
  rmw_pass_row(state, B, B * model_dim * n, "Dm=2048 n=" + std::to_string(n), threads);
}

const bool registered = [] {
  const std::int64_t L = prefill_L();
  const std::string Ls = std::to_string(L), Dms = std::to_string(model_dim), Ns = std::to_string(state_dim),
                    Ws = std::to_string(conv_width), SPs = std::to_string(ssd_head_dim),
                    SNs = std::to_string(ssd_state_dim);
  for (int t : thread_counts()) {
    const std::string ts = std::to_string(t);
    auto guarded = [t](auto body) {
      return [t, body](benchmark::State& st) {
        if (threads_available(st, t)) body(st);
      };
    };
    register_row(row_name("ssm", "conv1d", {{"B", "1"}, {"Dm", Dms}, {"L", Ls}, {"W", Ws}, {"threads", ts}}),
                 guarded([L, t](benchmark::State& st) { conv_row(st, L, t); }));
    register_row(row_name("ssm", "selective_scan", {{"B", "1"}, {"Dm", Dms}, {"N", Ns}, {"L", Ls}, {"threads", ts}}),
                 guarded([L, t](benchmark::State& st) { scan_row(st, L, t); }));
    register_row(row_name("ssm", "mamba2",
                          {{"B", "1"}, {"H", std::to_string(ssd_heads)}, {"P", SPs}, {"N", SNs}, {"L", Ls}, {"threads", ts}}),
                 guarded([L, t](benchmark::State& st) { mamba2_row(st, L, t); }));
    for (std::int64_t B : {1, 8}) {
      const std::string Bs = std::to_string(B);
      register_row(row_name("ssm", "conv1d_step", {{"B", Bs}, {"Dm", Dms}, {"W", Ws}, {"threads", ts}}),
                   guarded([B, t](benchmark::State& st) { conv_step_row(st, B, t); }));
      register_row(row_name("ssm", "selective_scan_step", {{"B", Bs}, {"Dm", Dms}, {"N", Ns}, {"threads", ts}}),
                   guarded([B, t](benchmark::State& st) { scan_step_row(st, B, t); }));
      // Keyed like the step they are the floor of (W:4 for the convolution's W - 1 = 3 columns,
      // N:16 for the scan), so `bench/plot --baseline rmw_pass` pairs them.
      register_row(row_name("ssm", "rmw_pass", {{"B", Bs}, {"Dm", Dms}, {"W", Ws}, {"threads", ts}}),
                   guarded([B, t](benchmark::State& st) { rmw_pass_row(st, B, conv_width - 1, t); }));
      register_row(row_name("ssm", "rmw_pass", {{"B", Bs}, {"Dm", Dms}, {"N", Ns}, {"threads", ts}}),
                   guarded([B, t](benchmark::State& st) { rmw_pass_row(st, B, state_dim, t); }));
      // The step and its floor, keyed alike.
      const auto ssd_name = [&](const char* impl) {
        return row_name("ssm", impl, {{"B", Bs}, {"H", std::to_string(ssd_step_heads)}, {"P", SPs}, {"N", SNs}, {"threads", ts}});
      };
      register_row(ssd_name("mamba2_step"), guarded([B, t](benchmark::State& st) { mamba2_step_row(st, B, t); }));
      register_row(ssd_name("rmw_pass"), guarded([B, t](benchmark::State& st) {
                     rmw_pass_row(st, B, B * ssd_step_heads * ssd_state_dim * ssd_head_dim,
                                  "H=32 P=128 N=128", t);
                   }));
    }
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
