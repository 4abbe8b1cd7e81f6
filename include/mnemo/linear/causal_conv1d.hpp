// mnemo/linear/causal_conv1d.hpp — the short depthwise causal convolution in front of the
// recurrence of Mamba (Gu & Dao, 2023) and Gated DeltaNet (as in Dao-AILab/causal-conv1d).
//
//   xx[b, d, :] = initial_states[b, d, :] ++ x[b, d, :]               W-1 + L columns (zeros when no state)
//   y[b, d, t]  = act(bias[d] + sum_{w < W} weight[d, w] xx[b, d, t + w])
//   final_states[b, d, :] = the last W-1 columns of xx                  raw inputs, not outputs
//
// weight[d, W-1] multiplies the current input x[b, d, t], weight[d, 0] the one W-1 steps back
// (the cross-correlation of F.conv1d). act is the identity or SiLU, after the bias. When
// L < W-1, final_states begins with the last columns of initial_states (or zeros).
// causal_conv1d_step is the same for one token: y = act(bias + weight . [state, x]), then the
// state shifts left by one column and takes x.
//
// Shapes: x, y [B, Dm, L] (channels first, each row contiguous in time), weight [Dm, W],
// bias [Dm] or empty, initial_states / final_states [B, Dm, W-1] or empty (the two may be the
// same view: the state is then updated in place, which is how a long input is fed in pieces);
// step: x, y [B, Dm], state [B, Dm, W-1] (state_in and state_out: the same view or disjoint, so
// linear::state_ring can keep the last few states for rollback, state_ring.hpp).
// A [B, L, Dm] buffer cannot be passed permuted: mnemo views keep the innermost dimension
// contiguous (core/tensor.hpp), so channels-last data must be transposed first.
//
// Numerics: f32 in and out, f32 accumulation in W terms, in order w = 0 .. W-1 (reference: double).
// SiLU as in activation.hpp (x sigmoid(x) from exp(-|x|); -0 below x = -87.3, the limit; like
// torch's silu, a pre-activation of -inf gives NaN).
// NaN: nothing is validated elementwise, a NaN propagates like in the sum: a NaN in x[b, d, t]
// makes y[b, d, t .. t+W-1] NaN (every output whose window holds it, also where the weight is 0,
// 0 * NaN = NaN) and final_states if it is among the last W-1 inputs; a NaN weight or bias makes
// the whole channel NaN. Nothing else is touched.
//
// Threads: (batch, block of conv_channel_block channels) items over mnemo::parallel_for.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/linear/activation.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"

namespace mnemo::linear {

enum class conv_activation { none, silu };

struct conv1d_options {
  conv_activation activation = conv_activation::none;
  int threads = 0;  // threads over (batch, channel block); 0: the OpenMP default
};

inline const char* conv_activation_name(conv_activation a) {
  switch (a) {
    case conv_activation::none: return "none";
    case conv_activation::silu: return "silu";
  }
  return "?";
}

namespace detail {

// Channels per work item of the full op: 16 rows of a long L is plenty of work per item, and
// B * Dm / 16 items keep both cores busy at B = 1 from Dm = 32 on.
inline constexpr std::int64_t conv_channel_block = 16;
// Channels per work item of the step (a few floats of state per channel).
inline constexpr std::int64_t conv_step_block = 512;

// Checks everything the full op and the step share: weight, bias, the states, the options.
inline std::int64_t check_conv_params(const char* fn, std::int64_t Dm, const view<const float, 2>& weight,
                                      const view<const float, 1>& bias, const conv1d_options& opt) {
  using mnemo::detail::require;
  mnemo::detail::require_data(fn, "weight", weight, " [Dm, W]");
  const std::int64_t W = weight.extent(1);
  require(W >= 1, fn, ": weight [Dm, W] needs W >= 1, got W=", W, " (weight.shape[1])");
  mnemo::detail::require_shape(fn, "weight", weight, {Dm, W}, " [Dm, W] (Dm from x)");
  if (!bias.empty()) mnemo::detail::require_shape(fn, "bias", bias, {Dm}, " [Dm]");
  require(opt.activation == conv_activation::none || opt.activation == conv_activation::silu, fn,
          ": options.activation must be none or silu, got ", static_cast<int>(opt.activation));
  require(opt.threads >= 0, fn, ": options.threads must be >= 0, got ", opt.threads);
  return W;
}

// The state pair of a call: each [B, Dm, W-1], or empty when not `required`; the two are the
// same view or disjoint.
inline void check_conv_states(const char* fn, const char* in_name, const view<const float, 3>& in,
                              const char* out_name, const view<float, 3>& out, std::int64_t B, std::int64_t Dm,
                              std::int64_t W, bool required) {
  using mnemo::detail::require_shape;
  if (required) {
    mnemo::detail::require_data(fn, in_name, in, " [B, Dm, W-1]");
    mnemo::detail::require_data(fn, out_name, out, " [B, Dm, W-1]");
  }
  if (required || !in.empty()) require_shape(fn, in_name, in, {B, Dm, W - 1}, " [B, Dm, W-1]");
  if (required || !out.empty()) require_shape(fn, out_name, out, {B, Dm, W - 1}, " [B, Dm, W-1]");
  if (!same_view(in, out))
    mnemo::detail::require_disjoint(fn, out_name, out, in_name, in, "; they may be the same view (in place)");
}

// The outputs t in [t0, L) whose window lies inside x (t0 >= W-1): y[t] = act(bias + sum_w w[w]
// x[t-W+1+w]). WC: W at compile time (0: read W at run time). Groups of activation_group vectors:
// independent sums, and SiLU on the group side by side (activation.hpp) before the store.
template <int WC, class Arch>
void conv_body(const float* x, const float* w, std::int64_t W, float bias, bool silu_act, float* y, std::int64_t t0,
               std::int64_t L) {
  const float* xs = x - (W - 1);  // xs[t + j] = xx[t + j] inside x
  std::int64_t t = t0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t vw = simd::width<Arch>, K = static_cast<std::int64_t>(activation_group);
    const batch vb(bias);
    auto one = [&](std::int64_t at) {
      batch acc = vb;
      if constexpr (WC > 0) {
#pragma GCC unroll 8
        for (int j = 0; j < WC; ++j) acc = simd::detail::fmadd(batch(w[j]), simd::load<Arch>(xs + at + j), acc);
      } else {
        for (std::int64_t j = 0; j < W; ++j) acc = simd::detail::fmadd(batch(w[j]), simd::load<Arch>(xs + at + j), acc);
      }
      return acc;
    };
    for (; t + K * vw <= L; t += K * vw) {
      batch a[K];
#pragma GCC unroll 8
      for (std::int64_t k = 0; k < K; ++k) a[k] = one(t + k * vw);
      if (silu_act) silu_n<K>(a);
#pragma GCC unroll 8
      for (std::int64_t k = 0; k < K; ++k) simd::store(y + t + k * vw, a[k]);
    }
    for (; t + vw <= L; t += vw) {
      batch a = one(t);
      if (silu_act) silu_n<1>(&a);
      simd::store(y + t, a);
    }
  }
  for (; t < L; ++t) {
    float acc = bias;
    for (std::int64_t j = 0; j < W; ++j) acc = simd::detail::fmadd<Arch>(w[j], xs[t + j], acc);
    y[t] = silu_act ? silu<Arch>(acc) : acc;
  }
}

// One (b, d) row of the full op. head: workspace of 2 (W-1) floats.
template <class Arch>
void conv_row(const float* x, std::int64_t L, const float* w, std::int64_t W, float bias, bool silu_act,
              const float* init, float* y, float* fin, float* head) {
  const std::int64_t S = W - 1, nh = std::min(L, S);
  // xx's first S + nh columns: the state (or zeros), then x. Read before `fin` is written, which
  // may be `init` itself.
  for (std::int64_t j = 0; j < S; ++j) head[j] = init ? init[j] : 0.0f;
  std::copy(x, x + nh, head + S);
  for (std::int64_t t = 0; t < nh; ++t) {
    float acc = bias;
    for (std::int64_t j = 0; j < W; ++j) acc = simd::detail::fmadd<Arch>(w[j], head[t + j], acc);
    y[t] = silu_act ? silu<Arch>(acc) : acc;
  }
  if (W == 4) conv_body<4, Arch>(x, w, W, bias, silu_act, y, nh, L);
  else conv_body<0, Arch>(x, w, W, bias, silu_act, y, nh, L);
  if (fin) {
    if (L >= S) std::copy(x + L - S, x + L, fin);
    else std::copy(head + L, head + L + S, fin);  // the last S of [state, x], L < S
  }
}

// The step's pre-activation outputs and state shift for channels [d0, d1) of one batch row. WC: W
// at compile time (0: at run time), which unrolls the few taps of the usual W = 4.
template <int WC, class Arch>
void conv_step_rows(std::int64_t d0, std::int64_t d1, std::int64_t W_runtime, const float* x,
                    const view<const float, 2>& weight, const float* bias, const view<const float, 2>& state_in,
                    const view<float, 2>& state_out, float* y) {
  const std::int64_t W = WC > 0 ? WC : W_runtime, S = W - 1;
  for (std::int64_t d = d0; d < d1; ++d) {
    const float* w = weight.ptr(d);
    const float* si = state_in.ptr(d);
    float* so = state_out.ptr(d);
    const float xt = x[d];
    float acc = bias ? bias[d] : 0.0f;
    for (std::int64_t j = 0; j < S; ++j) acc = simd::detail::fmadd<Arch>(w[j], si[j], acc);
    y[d] = simd::detail::fmadd<Arch>(w[S], xt, acc);
    for (std::int64_t j = 0; j + 1 < S; ++j) so[j] = si[j + 1];  // ascending: in place reads before it writes
    if (S > 0) so[S - 1] = xt;
  }
}

}  // namespace detail

namespace reference {

// The convolution in double, one output at a time.
inline void causal_conv1d(view<const float, 3> x,                    // [B, Dm, L]
                          view<const float, 2> weight,               // [Dm, W]
                          view<const float, 1> bias,                 // [Dm] or empty
                          view<float, 3> y,                          // [B, Dm, L]
                          view<const float, 3> initial_states = {},  // [B, Dm, W-1] or empty
                          view<float, 3> final_states = {},          // [B, Dm, W-1] or empty
                          const conv1d_options& opt = {}) {
  const char* fn = "linear::reference::causal_conv1d";
  mnemo::detail::require_data(fn, "x", x, " [B, Dm, L]");
  mnemo::detail::require_data(fn, "y", y, " [B, Dm, L]");
  const std::int64_t B = x.extent(0), Dm = x.extent(1), L = x.extent(2);
  const std::int64_t W = detail::check_conv_params(fn, Dm, weight, bias, opt);
  mnemo::detail::require_shape(fn, "y", y, {B, Dm, L}, " [B, Dm, L]");
  detail::check_conv_states(fn, "initial_states", initial_states, "final_states", final_states, B, Dm, W, false);
  parallel_for(B * Dm, [&](std::int64_t bd) {
    const std::int64_t b = bd / Dm, d = bd % Dm, S = W - 1;
    std::vector<double> xx(static_cast<std::size_t>(S + L), 0.0);
    for (std::int64_t j = 0; j < S; ++j) xx[j] = initial_states.empty() ? 0.0 : initial_states(b, d, j);
    for (std::int64_t t = 0; t < L; ++t) xx[S + t] = x(b, d, t);
    for (std::int64_t t = 0; t < L; ++t) {
      double acc = bias.empty() ? 0.0 : bias(d);
      for (std::int64_t j = 0; j < W; ++j) acc += static_cast<double>(weight(d, j)) * xx[t + j];
      y(b, d, t) = static_cast<float>(opt.activation == conv_activation::silu ? detail::silu(acc) : acc);
    }
    if (!final_states.empty())
      for (std::int64_t j = 0; j < S; ++j) final_states(b, d, j) = static_cast<float>(xx[L + j]);
  }, opt.threads);
}

}  // namespace reference

// The convolution; see the header comment. initial_states and final_states may be the same view.
template <class Arch = simd::default_arch>
void causal_conv1d(view<const float, 3> x,                    // [B, Dm, L]
                   view<const float, 2> weight,               // [Dm, W]
                   view<const float, 1> bias,                 // [Dm] or empty
                   view<float, 3> y,                          // [B, Dm, L]
                   view<const float, 3> initial_states = {},  // [B, Dm, W-1] or empty (zeros)
                   view<float, 3> final_states = {},          // [B, Dm, W-1] or empty
                   const conv1d_options& opt = {}) {
  const char* fn = "linear::causal_conv1d";
  using mnemo::detail::require_disjoint;
  mnemo::detail::require_data(fn, "x", x, " [B, Dm, L]");
  mnemo::detail::require_data(fn, "y", y, " [B, Dm, L]");
  const std::int64_t B = x.extent(0), Dm = x.extent(1), L = x.extent(2);
  const std::int64_t W = detail::check_conv_params(fn, Dm, weight, bias, opt);
  mnemo::detail::require_shape(fn, "y", y, {B, Dm, L}, " [B, Dm, L]");
  detail::check_conv_states(fn, "initial_states", initial_states, "final_states", final_states, B, Dm, W, false);
  require_disjoint(fn, "y", y, "x", x);
  require_disjoint(fn, "y", y, "weight", weight);
  require_disjoint(fn, "y", y, "bias", bias);
  require_disjoint(fn, "y", y, "initial_states", initial_states);
  require_disjoint(fn, "y", y, "final_states", final_states);
  require_disjoint(fn, "final_states", final_states, "x", x);
  require_disjoint(fn, "final_states", final_states, "weight", weight);
  require_disjoint(fn, "final_states", final_states, "bias", bias);
  const bool silu_act = opt.activation == conv_activation::silu;
  const std::int64_t blocks = (Dm + detail::conv_channel_block - 1) / detail::conv_channel_block;
  parallel_for(B * blocks, [&](std::int64_t item) {
    const std::int64_t b = item / blocks, d0 = item % blocks * detail::conv_channel_block;
    const std::int64_t d1 = std::min(Dm, d0 + detail::conv_channel_block);
    std::vector<float> head(static_cast<std::size_t>(2 * (W - 1)));
    for (std::int64_t d = d0; d < d1; ++d)
      detail::conv_row<Arch>(x.ptr(b, d), L, weight.ptr(d), W, bias.empty() ? 0.0f : bias(d), silu_act,
                             initial_states.empty() ? nullptr : initial_states.ptr(b, d), y.ptr(b, d),
                             final_states.empty() ? nullptr : final_states.ptr(b, d), head.data());
  }, opt.threads);
}

// One token: y = act(bias + weight . [state_in, x]) per channel, state_out = state_in shifted left
// by one column with x appended. state_in and state_out are the same view (in place) or disjoint.
template <class Arch = simd::default_arch>
void causal_conv1d_step(view<const float, 2> x,          // [B, Dm]
                        view<const float, 2> weight,     // [Dm, W]
                        view<const float, 1> bias,       // [Dm] or empty
                        view<float, 2> y,                // [B, Dm]
                        view<const float, 3> state_in,   // [B, Dm, W-1]
                        view<float, 3> state_out,        // [B, Dm, W-1]
                        const conv1d_options& opt = {}) {
  const char* fn = "linear::causal_conv1d_step";
  using mnemo::detail::require_disjoint;
  mnemo::detail::require_data(fn, "x", x, " [B, Dm]");
  mnemo::detail::require_data(fn, "y", y, " [B, Dm]");
  const std::int64_t B = x.extent(0), Dm = x.extent(1);
  const std::int64_t W = detail::check_conv_params(fn, Dm, weight, bias, opt);
  mnemo::detail::require_shape(fn, "y", y, {B, Dm}, " [B, Dm]");
  detail::check_conv_states(fn, "state_in", state_in, "state_out", state_out, B, Dm, W, true);
  require_disjoint(fn, "y", y, "x", x);
  require_disjoint(fn, "y", y, "weight", weight);
  require_disjoint(fn, "y", y, "bias", bias);
  require_disjoint(fn, "y", y, "state_in", state_in);
  require_disjoint(fn, "y", y, "state_out", state_out);
  require_disjoint(fn, "state_out", state_out, "x", x);
  require_disjoint(fn, "state_out", state_out, "weight", weight);
  require_disjoint(fn, "state_out", state_out, "bias", bias);
  const std::int64_t blocks = (Dm + detail::conv_step_block - 1) / detail::conv_step_block;
  parallel_for(B * blocks, [&](std::int64_t item) {
    const std::int64_t b = item / blocks, d0 = item % blocks * detail::conv_step_block;
    const std::int64_t d1 = std::min(Dm, d0 + detail::conv_step_block);
    const float* xr = x.ptr(b);
    float* yr = y.ptr(b);
    const float* bp = bias.empty() ? nullptr : bias.ptr();
    if (W == 4)
      detail::conv_step_rows<4, Arch>(d0, d1, W, xr, weight, bp, state_in[b], state_out[b], yr);
    else
      detail::conv_step_rows<0, Arch>(d0, d1, W, xr, weight, bp, state_in[b], state_out[b], yr);
    if (opt.activation == conv_activation::silu) detail::activate_inplace<true, Arch>(yr + d0, d1 - d0);
  }, opt.threads);
}

// One token, the state updated in place.
template <class Arch = simd::default_arch>
void causal_conv1d_step(view<const float, 2> x,       // [B, Dm]
                        view<const float, 2> weight,  // [Dm, W]
                        view<const float, 1> bias,    // [Dm] or empty
                        view<float, 2> y,             // [B, Dm]
                        view<float, 3> state,         // [B, Dm, W-1] in and out
                        const conv1d_options& opt = {}) {
  causal_conv1d_step<Arch>(x, weight, bias, y, view<const float, 3>(state), state, opt);
}

}  // namespace mnemo::linear
