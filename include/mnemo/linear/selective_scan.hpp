// mnemo/linear/selective_scan.hpp — the selective scan of Mamba-1 (Gu & Dao, "Mamba: Linear-Time
// Sequence Modeling with Selective State Spaces", 2023): a diagonal state space whose step size,
// input and output matrices depend on the token. Per batch b and channel d (group g = d / (Dm/G)):
//
//   dt_t     = softplus(delta_t + delta_bias)         (each part optional; softplus = log(1 + exp))
//   x_t[n]   = exp(dt_t A[n]) x_{t-1}[n] + dt_t Bm[g, n, t] u_t      x [N], x_0 = state (or 0)
//   y_t      = sum_n Cm[g, n, t] x_t[n] + D u_t                       read after the update
//   y_t     *= silu(z_t)                                              when z is given
//
// The state takes dt B u (Mamba's simplified discretisation, not the exact zero-order hold of B).
// selective_scan_step is one token of the same (mamba's selective_state_update). The arguments
// follow mamba's selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus).
//
// Shapes: u, delta, z, y [B, Dm, L] (channels first); A [Dm, N] (<= 0, finite: decays); Bm, Cm
// [B, G, N, L] with Dm % G == 0; D, delta_bias [Dm]; state [B, Dm, N] in and out (an empty view:
// start from zero and return nothing), so a long input can be fed in pieces and a step continues a
// prefill. Step: u, delta, z, y [B, Dm]; Bm, Cm [B, G, N]; state_in and state_out [B, Dm, N], the
// same view (in place) or disjoint, so linear::state_ring can keep the last states for rollback
// (state_ring.hpp). D, z and delta_bias may be empty views.
//
// The fast path runs per (batch, block of channels) item and, inside, per chunk of
// scan_chunk tokens: the chunk's B and C columns of each group are transposed once into [token, N]
// rows (shared by the group's channels), dt is computed for the chunk vectorised over time, and
// each channel then takes two passes over the chunk: all its decays exp(dt_t A) (they do not depend
// on the state, so they run as independent exps side by side), then the recurrence with the state
// x [N] in registers, vectorised over N (N is padded to the vector width with A = B = C = 0, so the
// padding lanes stay 0). The step does the same over a block of channels. The scan is sequential
// in time and reads each input element once, but it is not bandwidth-bound on every CPU: it takes
// one exp per state element and token (N = 16 exps per 16 bytes of u, delta, z and y), and on the
// 2-core Zen 1 EPYC these rows were measured on (128-bit FP units) an exp costs 0.77 ns per lane:
// 16 of them take about 9x the time of streaming the 16 bytes at machine/stream_read's 11.7 GB/s
// (bench/ssm_rows.cpp, bench/README.md).
//
// Numerics: f32 throughout (reference: double). softplus(x) = max(x, 0) + log1p(exp(-|x|)) for
// every x (no switch to the identity above 20); the f32 forms of softplus and silu are those of
// activation.hpp. A must be finite and <= 0 (mnemo::error
// otherwise). With dt >= 0 the decay's argument dt A is <= 0 and goes through
// simd::exp_nonpositive, clamped at simd::min_normal_exp_arg (-87.3: the exact decay there is below
// FLT_MIN and the clamped one differs from it by less than 1.2e-38); a chunk with a negative dt
// (no softplus, negative delta) uses simd::exp.
// NaN in u, delta, B, C, D or z is data and propagates: a NaN at token t of channel d (in u, delta
// or its group's B) enters the state, so y of channel d is NaN from t on; a NaN in C or z at t
// spoils y_t only. Other channels and earlier tokens are untouched. An infinite dt * u
// may give NaN where the reference gives +-inf when N is not a multiple of the vector width
// (0 * inf in a padding lane).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/linear/activation.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::linear {

struct selective_scan_options {
  bool delta_softplus = false;  // dt = softplus(delta + delta_bias)
  int threads = 0;              // threads over (batch, channel block); 0: the OpenMP default
};

namespace detail {

// Tokens per chunk of the fast path: its B and C rows (2 x 64 x N floats, 8 KiB at N = 16) and
// the channel's dt, dt u and y rows stay in L1.
inline constexpr std::int64_t scan_chunk = 64;
// Channels per work item: the chunk's B / C transpose is shared by the item's channels of one
// group; B * Dm / 32 items keep both cores busy at B = 1 from Dm = 64 on.
inline constexpr std::int64_t scan_channel_block = 32;
// Channels per work item of the step.
inline constexpr std::int64_t scan_step_block = 256;

// A [Dm, N]: finite and <= 0. Tested on the bit patterns (+0 = 0x00000000; -0 .. -FLT_MAX =
// 0x80000000 .. 0xFF7FFFFF), which GCC vectorises: the float compares stayed scalar, and the check
// runs on every step, where it took a quarter of the time of a one-token call at Dm = 2048, N = 16.
inline bool all_finite_nonpositive(const float* x, std::int64_t n) {
  constexpr std::uint32_t negative_zero = 0x80000000u, negative_inf = 0xFF800000u;
  std::uint32_t bad = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(x[i]);
    bad |= static_cast<std::uint32_t>(u != 0) &
           static_cast<std::uint32_t>(u - negative_zero >= negative_inf - negative_zero);
  }
  return bad == 0;
}

inline void check_scan_A(const char* fn, const view<const float, 2>& A) {
  // A contiguous A in one pass (row by row, the loop setup per row of 16 cost as much as the test).
  if (A.is_contiguous() && all_finite_nonpositive(A.data(), A.size())) return;
  for (std::int64_t d = 0; d < A.extent(0); ++d) {
    const float* row = A.ptr(d);
    if (all_finite_nonpositive(row, A.extent(1))) continue;
    for (std::int64_t n = 0; n < A.extent(1); ++n)
      mnemo::detail::require(row[n] <= 0.0f && std::isfinite(row[n]), fn, ": A must be finite and <= 0, got A[", d,
                             ", ", n, "] = ", row[n]);
  }
}

// What the full op and the step share: A, Bm, Cm (their last dimension `tail`: L, or none for the
// step), D, delta_bias, the options. Returns N and G.
template <int RB>
std::pair<std::int64_t, std::int64_t> check_scan_params(const char* fn, std::int64_t B, std::int64_t Dm,
                                                        const view<const float, 2>& A, const view<const float, RB>& Bm,
                                                        const view<const float, RB>& Cm, const view<const float, 1>& D,
                                                        const view<const float, 1>& delta_bias,
                                                        const selective_scan_options& opt, std::int64_t L) {
  using mnemo::detail::require;
  using mnemo::detail::require_data;
  using mnemo::detail::require_shape;
  const char* bc_dims = RB == 4 ? " [B, G, N, L]" : " [B, G, N]";
  require_data(fn, "A", A, " [Dm, N]");
  require_data(fn, "Bm", Bm, bc_dims);
  require_data(fn, "Cm", Cm, bc_dims);
  const std::int64_t N = A.extent(1), G = Bm.extent(1);
  require(N >= 1, fn, ": A [Dm, N] needs N >= 1, got N=", N, " (A.shape[1])");
  require_shape(fn, "A", A, {Dm, N}, " [Dm, N] (Dm from u)");
  require(G >= 1 && Dm % G == 0, fn, ": Bm.shape[1] (G, groups) must divide Dm: Dm=", Dm, ", G=", G);
  if constexpr (RB == 4) {
    require_shape(fn, "Bm", Bm, {B, G, N, L}, bc_dims);
    require_shape(fn, "Cm", Cm, {B, G, N, L}, bc_dims);
  } else {
    require_shape(fn, "Bm", Bm, {B, G, N}, bc_dims);
    require_shape(fn, "Cm", Cm, {B, G, N}, bc_dims);
  }
  if (!D.empty()) require_shape(fn, "D", D, {Dm}, " [Dm]");
  if (!delta_bias.empty()) require_shape(fn, "delta_bias", delta_bias, {Dm}, " [Dm]");
  require(opt.threads >= 0, fn, ": options.threads must be >= 0, got ", opt.threads);
  check_scan_A(fn, A);
  return {N, G};
}

// out must not overlap any input.
template <class Out, int RU, int RB>
void check_scan_disjoint(const char* fn, const char* name, const Out& out, const view<const float, RU>& u,
                         const view<const float, RU>& delta, const view<const float, 2>& A,
                         const view<const float, RB>& Bm, const view<const float, RB>& Cm,
                         const view<const float, 1>& D, const view<const float, RU>& z,
                         const view<const float, 1>& delta_bias) {
  using mnemo::detail::require_disjoint;
  require_disjoint(fn, name, out, "u", u);
  require_disjoint(fn, name, out, "delta", delta);
  require_disjoint(fn, name, out, "A", A);
  require_disjoint(fn, name, out, "Bm", Bm);
  require_disjoint(fn, name, out, "Cm", Cm);
  require_disjoint(fn, name, out, "D", D);
  require_disjoint(fn, name, out, "z", z);
  require_disjoint(fn, name, out, "delta_bias", delta_bias);
}

// dt[i] = softplus?(delta[i] + bias) and dtu[i] = dt[i] u[i] for i < n.
template <class Arch>
void scan_dt(const float* delta, const float* u, std::int64_t n, const float* bias, bool bias_per_item, float bias0,
             bool softplus_on, float* dt, float* dtu) {
  for (std::int64_t i = 0; i < n; ++i) dt[i] = delta[i] + (bias_per_item ? bias[i] : bias0);
  if (softplus_on) activate_inplace<false, Arch>(dt, n);
  for (std::int64_t i = 0; i < n; ++i) dtu[i] = dt[i] * u[i];
}

// y[i] = (y[i] + D u[i]) * silu(z[i]) for i < n (z may be null: no gate); gate [n] is workspace.
template <class Arch>
void scan_output(float* y, const float* u, const float* z, std::int64_t n, const float* Dp, bool D_per_item, float D0,
                 float* gate) {
  for (std::int64_t i = 0; i < n; ++i) y[i] = simd::detail::fmadd<Arch>(D_per_item ? Dp[i] : D0, u[i], y[i]);
  if (!z) return;
  std::copy(z, z + n, gate);
  activate_inplace<true, Arch>(gate, n);
  for (std::int64_t i = 0; i < n; ++i) y[i] *= gate[i];
}

// exp(dt A) of the scan, for dt >= 0 and A <= 0 (so the argument is <= 0): simd::exp_nonpositive,
// cheaper than simd::exp, after clamping the argument to min_normal_exp_arg (the result there is
// below FLT_MIN = 1.2e-38 anyway; max(lo, x) keeps a NaN x on x86, and NaN-propagating max does
// elsewhere). Calls with a negative dt (no softplus and a negative delta) take simd::exp.
template <std::size_t K, class B>
void decay_exp_n(B* x) {
  for (std::size_t k = 0; k < K; ++k) x[k] = xsimd::max(B(simd::min_normal_exp_arg), x[k]);
  simd::exp_nonpositive_n<K>(x);
}

// Batches of exp(dt A) computed side by side: independent dependency chains for the scheduler
// (one exp is a chain of about 12 dependent operations, simd/math.hpp).
inline constexpr std::size_t decay_exp_group = 4;

// buf[0 .. nb * width) = exp(buf), in groups of decay_exp_group batches; nonnegative_dt: every
// argument is dt A with dt >= 0 (or NaN), else each batch goes through simd::exp.
template <class Arch>
void decay_exps(float* buf, std::int64_t nb, bool nonnegative_dt) {
  using batch = simd::fbatch<Arch>;
  constexpr std::int64_t w = simd::width<Arch>;
  constexpr std::int64_t K = static_cast<std::int64_t>(decay_exp_group);
  std::int64_t q = 0;
  if (nonnegative_dt) {
    for (; q + K <= nb; q += K) {
      batch e[K];
#pragma GCC unroll 8
      for (std::int64_t k = 0; k < K; ++k) e[k] = simd::load<Arch>(buf + (q + k) * w);
      decay_exp_n<K>(e);
#pragma GCC unroll 8
      for (std::int64_t k = 0; k < K; ++k) simd::store(buf + (q + k) * w, e[k]);
    }
    for (; q < nb; ++q) {
      batch e = simd::load<Arch>(buf + q * w);
      decay_exp_n<1>(&e);
      simd::store(buf + q * w, e);
    }
  }
  for (; q < nb; ++q) simd::store(buf + q * w, simd::exp(simd::load<Arch>(buf + q * w)));
}

// out[i] = the sum of the lanes of batch i of `lanes` [n rounded up to the width, width], for
// i < n, a width of rows at a time (xsimd::haddp: one transposing reduction for `width` sums in
// place of a horizontal sum each). Rows n .. the next multiple of the width are zeroed first.
template <class Arch>
void reduce_lanes(float* lanes, std::int64_t n, float* out) {
  using batch = simd::fbatch<Arch>;
  constexpr std::int64_t w = simd::width<Arch>;
  for (std::int64_t i = n; i % w != 0; ++i) simd::store(lanes + i * w, batch(0.0f));
  for (std::int64_t i0 = 0; i0 < n; i0 += w) {
    batch rows[w];
#pragma GCC unroll 16
    for (std::int64_t r = 0; r < w; ++r) rows[r] = simd::load<Arch>(lanes + (i0 + r) * w);
    const batch sums = xsimd::haddp(rows);
    if (i0 + w <= n) simd::store(out + i0, sums);
    else simd::store_partial(out + i0, sums, n - i0);
  }
}

// Whether every dt[i] >= 0 or NaN (exp's argument dt A is then <= 0 or NaN).
inline bool nonnegative(const float* dt, std::int64_t n) {
  bool ok = true;
  for (std::int64_t i = 0; i < n; ++i) ok &= !(dt[i] < 0.0f);
  return ok;
}

// One channel over n tokens with its state x [Np] (padded) in NV registers: B and C rows of the
// chunk at bt / ct (row stride Np), a [Np] the channel's A (padded with 0). ys[i] = C_i . x_i.
// Two passes over the chunk: first every decay exp(dt_i A) into `decay` [n, Np], in groups of
// decay_exp_group independent batches (they do not depend on the state); then the recurrence,
// whose chain per token is one FMA per vector. The per-token sums C_i . x_i are kept as batches in
// `lanes` [n rounded up to the width, width] and reduced a width of tokens at a time
// (xsimd::haddp: one transposing reduction for `width` tokens in place of a horizontal sum per
// token). nonnegative_dt: every dt_i >= 0 (or NaN), so exp's argument is <= 0.
template <int NV, class Arch>
void scan_channel_regs(float* x, const float* a, const float* bt, const float* ct, std::int64_t Np, const float* dt,
                       const float* dtu, std::int64_t n, float* ys, float* lanes, float* decay, bool nonnegative_dt) {
  using batch = simd::fbatch<Arch>;
  constexpr std::int64_t w = simd::width<Arch>;
  batch xs[NV], as[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) {
    xs[j] = simd::load<Arch>(x + j * w);
    as[j] = simd::load<Arch>(a + j * w);
  }
  for (std::int64_t i = 0; i < n; ++i) {
    const batch dtb(dt[i]);
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) simd::store(decay + (i * NV + j) * w, dtb * as[j]);
  }
  decay_exps<Arch>(decay, n * NV, nonnegative_dt);
  for (std::int64_t i = 0; i < n; ++i) {
    const batch ub(dtu[i]);
    const float* bi = bt + i * Np;
    const float* ci = ct + i * Np;
    const float* ei = decay + i * Np;
    batch acc(0.0f);
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      xs[j] = simd::detail::fmadd(simd::load<Arch>(ei + j * w), xs[j], ub * simd::load<Arch>(bi + j * w));
      acc = simd::detail::fmadd(simd::load<Arch>(ci + j * w), xs[j], acc);
    }
    simd::store(lanes + i * w, acc);
  }
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) simd::store(x + j * w, xs[j]);
  reduce_lanes<Arch>(lanes, n, ys);
}

// The same for any Np (x updated in memory, from L1), and the plain loop of scalar_arch.
template <class Arch>
void scan_channel_loop(float* x, const float* a, const float* bt, const float* ct, std::int64_t Np, const float* dt,
                       const float* dtu, std::int64_t n, float* ys) {
  for (std::int64_t i = 0; i < n; ++i) {
    const float* bi = bt + i * Np;
    const float* ci = ct + i * Np;
    std::int64_t j = 0;
    float sum = 0.0f;
    if constexpr (simd::vectorized<Arch>) {
      using batch = simd::fbatch<Arch>;
      constexpr std::int64_t w = simd::width<Arch>;
      const batch dtb(dt[i]), ub(dtu[i]);
      batch acc(0.0f);
      for (; j + w <= Np; j += w) {
        const batch e = simd::exp(dtb * simd::load<Arch>(a + j));
        const batch xj = simd::detail::fmadd(e, simd::load<Arch>(x + j), ub * simd::load<Arch>(bi + j));
        simd::store(x + j, xj);
        acc = simd::detail::fmadd(simd::load<Arch>(ci + j), xj, acc);
      }
      sum = simd::hsum(acc);
    }
    for (; j < Np; ++j) {
      x[j] = simd::detail::fmadd<Arch>(simd::exp<Arch>(dt[i] * a[j]), x[j], dtu[i] * bi[j]);
      sum = simd::detail::fmadd<Arch>(ci[j], x[j], sum);
    }
    ys[i] = sum;
  }
}

// Workspaces: lanes [scan_chunk x lanes<Arch>], decay [scan_chunk x Np] floats.
template <class Arch>
void scan_channel(float* x, const float* a, const float* bt, const float* ct, std::int64_t Np, const float* dt,
                  const float* dtu, std::int64_t n, float* ys, float* lanes, float* decay) {
  if constexpr (simd::vectorized<Arch>) {
    const bool nonnegative_dt = nonnegative(dt, n);
    switch (Np / simd::width<Arch>) {
      case 1: return scan_channel_regs<1, Arch>(x, a, bt, ct, Np, dt, dtu, n, ys, lanes, decay, nonnegative_dt);
      case 2: return scan_channel_regs<2, Arch>(x, a, bt, ct, Np, dt, dtu, n, ys, lanes, decay, nonnegative_dt);
      case 4: return scan_channel_regs<4, Arch>(x, a, bt, ct, Np, dt, dtu, n, ys, lanes, decay, nonnegative_dt);
      default: break;
    }
  }
  scan_channel_loop<Arch>(x, a, bt, ct, Np, dt, dtu, n, ys);
}

// The step for channels [d0, d1) of batch b: state_out = exp(dt A) state_in + dt u B, y = C . state_out
// (before D and the gate). Like the prefill: every decay of the block first (independent exps in
// groups, decay [nd, Np]), then the updates, with the sums reduced a width of channels at a time.
// One channel after the other with its exps inline took 60 ns a channel at N = 16 on the 2-core
// EPYC (AVX2): the latency of one exp chain, the next channel's unable to start.
template <class Arch>
void scan_step_rows(std::int64_t b, std::int64_t d0, std::int64_t d1, std::int64_t N, std::int64_t per_group,
                    const view<const float, 2>& A, const view<const float, 3>& Bm, const view<const float, 3>& Cm,
                    const view<const float, 3>& state_in, const view<float, 3>& state_out, const float* dt,
                    const float* dtu, float* y) {
  const std::int64_t nd = d1 - d0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    const std::int64_t nv = (N + w - 1) / w, Np = nv * w;
    // Uninitialised (every element is written before it is read): zeroing the two took 5% of a
    // step at Dm = 2048, N = 16 (perf, 2-core EPYC).
    const std::unique_ptr<float[]> decay(new float[static_cast<std::size_t>(nd * Np)]),
        lanes(new float[static_cast<std::size_t>((nd + w) * w)]);
    // Past N the loads give 0: A = 0 (decay 1), state, B and C = 0, so the padding lanes add 0.
    auto load = [&](const float* p, std::int64_t n0) {
      return n0 + w <= N ? simd::load<Arch>(p + n0) : simd::load_partial<Arch>(p + n0, N - n0);
    };
    for (std::int64_t d = d0; d < d1; ++d) {
      const batch dtb(dt[d - d0]);
      const float* a = A.ptr(d);
      float* e = decay.get() + (d - d0) * Np;
      std::int64_t n0 = 0;
      for (; n0 + w <= N; n0 += w) simd::store(e + n0, dtb * simd::load<Arch>(a + n0));
      if (n0 < N) simd::store(e + n0, dtb * simd::load_partial<Arch>(a + n0, N - n0));
    }
    decay_exps<Arch>(decay.get(), nd * nv, nonnegative(dt, nd));
    const std::int64_t full = N / w;  // vectors without a tail
    // The group of channel d, advanced as d crosses a group boundary (no division per channel).
    std::int64_t g = d0 / per_group, next_group = (g + 1) * per_group;
    for (std::int64_t d = d0; d < d1; ++d) {
      if (d == next_group) {
        ++g;
        next_group += per_group;
      }
      const float *bg = Bm.ptr(b, g), *cg = Cm.ptr(b, g), *si = state_in.ptr(b, d);
      const float* e = decay.get() + (d - d0) * Np;
      float* so = state_out.ptr(b, d);
      const batch ub(dtu[d - d0]);
      batch acc(0.0f);
      for (std::int64_t n0 = 0; n0 < full * w; n0 += w) {
        const batch x = simd::detail::fmadd(simd::load<Arch>(e + n0), simd::load<Arch>(si + n0),
                                            ub * simd::load<Arch>(bg + n0));
        simd::store(so + n0, x);
        acc = simd::detail::fmadd(simd::load<Arch>(cg + n0), x, acc);
      }
      if (full < nv) {
        const std::int64_t n0 = full * w;
        const batch x = simd::detail::fmadd(simd::load<Arch>(e + n0), load(si, n0), ub * load(bg, n0));
        simd::store_partial(so + n0, x, N - n0);
        acc = simd::detail::fmadd(load(cg, n0), x, acc);
      }
      simd::store(lanes.get() + (d - d0) * w, acc);
    }
    reduce_lanes<Arch>(lanes.get(), nd, y);
  } else {
    for (std::int64_t d = d0; d < d1; ++d) {
      const std::int64_t g = d / per_group;
      const float *a = A.ptr(d), *bg = Bm.ptr(b, g), *cg = Cm.ptr(b, g), *si = state_in.ptr(b, d);
      float* so = state_out.ptr(b, d);
      float sum = 0.0f;
      for (std::int64_t n = 0; n < N; ++n) {
        const float x = simd::detail::fmadd<Arch>(simd::exp<Arch>(dt[d - d0] * a[n]), si[n], dtu[d - d0] * bg[n]);
        so[n] = x;
        sum = simd::detail::fmadd<Arch>(cg[n], x, sum);
      }
      y[d - d0] = sum;
    }
  }
}

}  // namespace detail

namespace reference {

// The selective scan in double, one token at a time.
inline void selective_scan(view<const float, 3> u,           // [B, Dm, L]
                           view<const float, 3> delta,       // [B, Dm, L]
                           view<const float, 2> A,           // [Dm, N], <= 0
                           view<const float, 4> Bm,          // [B, G, N, L]
                           view<const float, 4> Cm,          // [B, G, N, L]
                           view<const float, 1> D,           // [Dm] or empty
                           view<const float, 3> z,           // [B, Dm, L] or empty
                           view<const float, 1> delta_bias,  // [Dm] or empty
                           view<float, 3> y,                 // [B, Dm, L]
                           view<float, 3> state = {},        // [B, Dm, N] in and out, or empty
                           const selective_scan_options& opt = {}) {
  const char* fn = "linear::reference::selective_scan";
  mnemo::detail::require_data(fn, "u", u, " [B, Dm, L]");
  mnemo::detail::require_data(fn, "y", y, " [B, Dm, L]");
  const std::int64_t B = u.extent(0), Dm = u.extent(1), L = u.extent(2);
  mnemo::detail::require_shape(fn, "delta", delta, {B, Dm, L}, " [B, Dm, L] (from u)");
  const auto NG = detail::check_scan_params<4>(fn, B, Dm, A, Bm, Cm, D, delta_bias, opt, L);
  const std::int64_t N = NG.first, G = NG.second;
  if (!z.empty()) mnemo::detail::require_shape(fn, "z", z, {B, Dm, L}, " [B, Dm, L]");
  mnemo::detail::require_shape(fn, "y", y, {B, Dm, L}, " [B, Dm, L]");
  if (!state.empty()) mnemo::detail::require_shape(fn, "state", state, {B, Dm, N}, " [B, Dm, N]");
  const std::int64_t per_group = Dm / G;
  parallel_for(B * Dm, [&](std::int64_t bd) {
    const std::int64_t b = bd / Dm, d = bd % Dm, g = d / per_group;
    std::vector<double> x(static_cast<std::size_t>(N), 0.0);
    if (!state.empty())
      for (std::int64_t n = 0; n < N; ++n) x[n] = state(b, d, n);
    for (std::int64_t t = 0; t < L; ++t) {
      double dt = static_cast<double>(delta(b, d, t)) + (delta_bias.empty() ? 0.0 : delta_bias(d));
      if (opt.delta_softplus) dt = detail::softplus(dt);
      const double ut = u(b, d, t);
      double acc = 0;
      for (std::int64_t n = 0; n < N; ++n) {
        x[n] = std::exp(dt * A(d, n)) * x[n] + dt * Bm(b, g, n, t) * ut;
        acc += static_cast<double>(Cm(b, g, n, t)) * x[n];
      }
      if (!D.empty()) acc += static_cast<double>(D(d)) * ut;
      if (!z.empty()) {
        const double zt = z(b, d, t);
        acc *= zt / (1.0 + std::exp(-zt));
      }
      y(b, d, t) = static_cast<float>(acc);
    }
    if (!state.empty())
      for (std::int64_t n = 0; n < N; ++n) state(b, d, n) = static_cast<float>(x[n]);
  }, opt.threads);
}

}  // namespace reference

// The selective scan; see the header comment.
template <class Arch = simd::default_arch>
void selective_scan(view<const float, 3> u,           // [B, Dm, L]
                    view<const float, 3> delta,       // [B, Dm, L]
                    view<const float, 2> A,           // [Dm, N], <= 0
                    view<const float, 4> Bm,          // [B, G, N, L]
                    view<const float, 4> Cm,          // [B, G, N, L]
                    view<const float, 1> D,           // [Dm] or empty
                    view<const float, 3> z,           // [B, Dm, L] or empty
                    view<const float, 1> delta_bias,  // [Dm] or empty
                    view<float, 3> y,                 // [B, Dm, L]
                    view<float, 3> state = {},        // [B, Dm, N] in and out, or empty
                    const selective_scan_options& opt = {}) {
  const char* fn = "linear::selective_scan";
  mnemo::detail::require_data(fn, "u", u, " [B, Dm, L]");
  mnemo::detail::require_data(fn, "y", y, " [B, Dm, L]");
  const std::int64_t B = u.extent(0), Dm = u.extent(1), L = u.extent(2);
  mnemo::detail::require_data(fn, "delta", delta, " [B, Dm, L]");
  mnemo::detail::require_shape(fn, "delta", delta, {B, Dm, L}, " [B, Dm, L] (from u)");
  const auto NG = detail::check_scan_params<4>(fn, B, Dm, A, Bm, Cm, D, delta_bias, opt, L);
  const std::int64_t N = NG.first, G = NG.second;
  if (!z.empty()) mnemo::detail::require_shape(fn, "z", z, {B, Dm, L}, " [B, Dm, L]");
  mnemo::detail::require_shape(fn, "y", y, {B, Dm, L}, " [B, Dm, L]");
  if (!state.empty()) mnemo::detail::require_shape(fn, "state", state, {B, Dm, N}, " [B, Dm, N]");
  detail::check_scan_disjoint(fn, "y", y, u, delta, A, Bm, Cm, D, z, delta_bias);
  detail::check_scan_disjoint(fn, "state", state, u, delta, A, Bm, Cm, D, z, delta_bias);
  mnemo::detail::require_disjoint(fn, "y", y, "state", state);

  constexpr std::int64_t lanes = simd::lanes<Arch>;
  const std::int64_t Np = (N + lanes - 1) / lanes * lanes, per_group = Dm / G;
  const std::int64_t cb = detail::scan_channel_block, T = detail::scan_chunk;
  const std::int64_t blocks = (Dm + cb - 1) / cb;
  parallel_for(B * blocks, [&](std::int64_t item) {
    const std::int64_t b = item / blocks, d0 = item % blocks * cb, d1 = std::min(Dm, d0 + cb), nd = d1 - d0;
    // Workspace, sized once per item: the block's padded states and A rows, the chunk's B and C
    // rows of one group, and one channel's dt, dt u and y over the chunk.
    std::vector<float> xs(static_cast<std::size_t>(nd * Np), 0.0f), as(xs.size(), 0.0f);
    std::vector<float> bt(static_cast<std::size_t>(T * Np), 0.0f), ct(bt.size(), 0.0f);
    std::vector<float> dt(static_cast<std::size_t>(T)), dtu(dt.size()), ys(dt.size()), gate(dt.size());
    std::vector<float> lanes_ws(static_cast<std::size_t>(T * lanes)), decay(bt.size());
    for (std::int64_t d = d0; d < d1; ++d) {
      std::copy(A.ptr(d), A.ptr(d) + N, as.data() + (d - d0) * Np);
      if (!state.empty()) std::copy(state.ptr(b, d), state.ptr(b, d) + N, xs.data() + (d - d0) * Np);
    }
    for (std::int64_t t0 = 0; t0 < L; t0 += T) {
      const std::int64_t n = std::min(T, L - t0);
      std::int64_t loaded = -1;  // the group whose B and C rows bt / ct hold
      for (std::int64_t d = d0; d < d1; ++d) {
        const std::int64_t g = d / per_group;
        if (g != loaded) {
          for (std::int64_t k = 0; k < N; ++k) {
            const float* bk = Bm.ptr(b, g, k) + t0;
            const float* ck = Cm.ptr(b, g, k) + t0;
            for (std::int64_t i = 0; i < n; ++i) {
              bt[i * Np + k] = bk[i];
              ct[i * Np + k] = ck[i];
            }
          }
          loaded = g;
        }
        detail::scan_dt<Arch>(delta.ptr(b, d) + t0, u.ptr(b, d) + t0, n, nullptr, false,
                              delta_bias.empty() ? 0.0f : delta_bias(d), opt.delta_softplus, dt.data(), dtu.data());
        detail::scan_channel<Arch>(xs.data() + (d - d0) * Np, as.data() + (d - d0) * Np, bt.data(), ct.data(), Np,
                                   dt.data(), dtu.data(), n, ys.data(), lanes_ws.data(), decay.data());
        float* yd = y.ptr(b, d) + t0;
        std::copy(ys.data(), ys.data() + n, yd);
        detail::scan_output<Arch>(yd, u.ptr(b, d) + t0, z.empty() ? nullptr : z.ptr(b, d) + t0, n, nullptr, false,
                                  D.empty() ? 0.0f : D(d), gate.data());
      }
    }
    if (!state.empty())
      for (std::int64_t d = d0; d < d1; ++d)
        std::copy(xs.data() + (d - d0) * Np, xs.data() + (d - d0) * Np + N, state.ptr(b, d));
  }, opt.threads);
}

// One token (mamba's selective_state_update): state_out = exp(dt A) state_in + dt B u per
// channel, y = C . state_out + D u, gated by silu(z). state_in and state_out are the same view (in
// place) or disjoint.
template <class Arch = simd::default_arch>
void selective_scan_step(view<const float, 2> u,           // [B, Dm]
                         view<const float, 2> delta,       // [B, Dm]
                         view<const float, 2> A,           // [Dm, N], <= 0
                         view<const float, 3> Bm,          // [B, G, N]
                         view<const float, 3> Cm,          // [B, G, N]
                         view<const float, 1> D,           // [Dm] or empty
                         view<const float, 2> z,           // [B, Dm] or empty
                         view<const float, 1> delta_bias,  // [Dm] or empty
                         view<float, 2> y,                 // [B, Dm]
                         view<const float, 3> state_in,    // [B, Dm, N]
                         view<float, 3> state_out,         // [B, Dm, N]
                         const selective_scan_options& opt = {}) {
  const char* fn = "linear::selective_scan_step";
  using mnemo::detail::require_data;
  using mnemo::detail::require_shape;
  require_data(fn, "u", u, " [B, Dm]");
  require_data(fn, "y", y, " [B, Dm]");
  const std::int64_t B = u.extent(0), Dm = u.extent(1);
  require_data(fn, "delta", delta, " [B, Dm]");
  require_shape(fn, "delta", delta, {B, Dm}, " [B, Dm] (from u)");
  const auto NG = detail::check_scan_params<3>(fn, B, Dm, A, Bm, Cm, D, delta_bias, opt, 0);
  const std::int64_t N = NG.first, G = NG.second;
  if (!z.empty()) require_shape(fn, "z", z, {B, Dm}, " [B, Dm]");
  require_shape(fn, "y", y, {B, Dm}, " [B, Dm]");
  require_data(fn, "state_in", state_in, " [B, Dm, N]");
  require_data(fn, "state_out", state_out, " [B, Dm, N]");
  require_shape(fn, "state_in", state_in, {B, Dm, N}, " [B, Dm, N]");
  require_shape(fn, "state_out", state_out, {B, Dm, N}, " [B, Dm, N]");
  detail::check_scan_disjoint(fn, "y", y, u, delta, A, Bm, Cm, D, z, delta_bias);
  detail::check_scan_disjoint(fn, "state_out", state_out, u, delta, A, Bm, Cm, D, z, delta_bias);
  mnemo::detail::require_disjoint(fn, "y", y, "state_in", state_in);
  mnemo::detail::require_disjoint(fn, "y", y, "state_out", state_out);
  if (!same_view(state_in, state_out))
    mnemo::detail::require_disjoint(fn, "state_out", state_out, "state_in", state_in,
                                    "; they may be the same view (in place)");

  const std::int64_t per_group = Dm / G, cb = detail::scan_step_block;
  const std::int64_t blocks = (Dm + cb - 1) / cb;
  parallel_for(B * blocks, [&](std::int64_t item) {
    const std::int64_t b = item / blocks, d0 = item % blocks * cb, d1 = std::min(Dm, d0 + cb), nd = d1 - d0;
    std::vector<float> dt(static_cast<std::size_t>(nd)), dtu(dt.size()), gate(dt.size());
    detail::scan_dt<Arch>(delta.ptr(b) + d0, u.ptr(b) + d0, nd, delta_bias.empty() ? nullptr : delta_bias.ptr() + d0,
                          !delta_bias.empty(), 0.0f, opt.delta_softplus, dt.data(), dtu.data());
    float* yr = y.ptr(b) + d0;
    detail::scan_step_rows<Arch>(b, d0, d1, N, per_group, A, Bm, Cm, state_in, state_out, dt.data(), dtu.data(), yr);
    detail::scan_output<Arch>(yr, u.ptr(b) + d0, z.empty() ? nullptr : z.ptr(b) + d0, nd,
                              D.empty() ? nullptr : D.ptr() + d0, !D.empty(), 0.0f, gate.data());
  }, opt.threads);
}

// One token, the state updated in place.
template <class Arch = simd::default_arch>
void selective_scan_step(view<const float, 2> u,           // [B, Dm]
                         view<const float, 2> delta,       // [B, Dm]
                         view<const float, 2> A,           // [Dm, N], <= 0
                         view<const float, 3> Bm,          // [B, G, N]
                         view<const float, 3> Cm,          // [B, G, N]
                         view<const float, 1> D,           // [Dm] or empty
                         view<const float, 2> z,           // [B, Dm] or empty
                         view<const float, 1> delta_bias,  // [Dm] or empty
                         view<float, 2> y,                 // [B, Dm]
                         view<float, 3> state,             // [B, Dm, N] in and out
                         const selective_scan_options& opt = {}) {
  selective_scan_step<Arch>(u, delta, A, Bm, Cm, D, z, delta_bias, y, view<const float, 3>(state), state, opt);
}

}  // namespace mnemo::linear
