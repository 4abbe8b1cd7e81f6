// mnemo/linear/mamba2.hpp — the SSD layer core of Mamba-2 (Dao & Gu, "Transformers are SSMs:
// Generalized Models and Efficient Algorithms Through Structured State Space Duality", ICML 2024):
// a state space whose transition is a scalar times the identity per head and step. Per batch b and
// head h (group g = h / (H / G)):
//
//   dt_t = softplus(dt_raw_t + dt_bias[h])             (each part optional; softplus = log(1 + exp))
//   S_t  = exp(dt_t A[h]) S_{t-1} + B_t (dt_t x_t)^T    S [N, P], S_0 = state (or 0)
//   y_t  = C_t^T S_t + D[h] x_t                         read after the update
//   y_t *= silu(z_t)                                    when z is given
//
// with B_t = Bm[b, g, t], C_t = Cm[b, g, t] (shared by the H / G heads of a group). This is
// simple_gla.hpp with q = C, k = B, v = dt x, g = dt A and scale 1, plus the skip and the gate; the
// arguments follow mamba's mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D, z, dt_bias,
// initial_states, dt_softplus) and its one-token selective_state_update. With A[d, n] = A[h] for
// every channel d = h P + p of head h and every n, selective_scan.hpp (Mamba-1) computes the same
// outputs (its state is this one transposed per head).
//
// Shapes (the library's [B, H, L, D] layout; mamba's x, z [B, L, H, P] and B, C [B, L, G, N]
// buffers are these through strides, its dt [B, L, H] must be transposed, since a view's innermost
// dimension is contiguous): x, z, y [B, H, L, P]; dt [B, H, L]; A [H] (finite, <= 0); Bm, Cm
// [B, G, L, N] with H % G == 0; D, dt_bias [H]; state [B, H, N, P] in and out (an empty view: start from zero and
// return nothing), so a long input can be fed in pieces and a step continues a prefill. mamba's
// ssm_state [B, H, P, N] is this state transposed. D, z and dt_bias may be empty views. Not
// covered: a D per head channel ([H, P]), dt_limit clamping, variable-length packing (seq_idx).
// Step: x, z, y [B, H, P]; dt [B, H]; Bm, Cm [B, G, N]; state_in and state_out [B, H, N, P], the
// same view (in place) or disjoint, so linear::state_ring keeps the last states for rollback:
//   linear::state_ring<4> ring({B, H, N, P}, depth);     // ring.state(): fill from the prefill
//   auto [in, out] = ring.advance();  linear::mamba2_step(x, dt, A, Bm, Cm, D, z, dt_bias, y, in, out);
//   ring.rollback(rejected);                             // the state before the rejected tokens
//
// Fast path: per (batch, head), choose_form (common.hpp) picks the recurrent form (one pass over
// the state per token, common.hpp recurrent_token, with q = C_t and k = B_t read in place) or the
// chunked form, the scalar-decay chunk kernel of linear_attn.hpp: per chunk of n tokens the log
// decays g = dt A and the rows dt_t x_t are formed (n and n P floats), and C and B are read in
// place from their group's rows, so heads that share a group share B and C without a copy (each
// head still makes its own suffix-decayed copy of the chunk's B, as simple_gla does for k). Then
// y += D x and y *= silu(z) on the chunk's rows while they are in cache. Cost as simple_gla's:
// 4 N P + (n + 1)(N + P) multiply-adds per token and head, plus one softplus per token and head and,
// for the gate, one exp and one division per element of y (activation.hpp's silu). Without z a
// call took the CPU time of simple_gla on the same sizes (H = 8, L = 4096, N = P = 128, chunk 32,
// one thread, ad-hoc A/B on a loaded 2-core Zen 1); the gate added about a fifth (perf: silu_n),
// about 290 FMAs of the products per element of y against an exp and a division.
//
// Numerics: f32 inputs and outputs, f32 arithmetic (reference: double); the softplus and silu of
// activation.hpp. A must be finite and <= 0 (mnemo::error otherwise). dt is data: it is not
// checked, and without softplus a negative dt makes dt A > 0, a growth factor exp(dt A) > 1,
// computed as it is. Decay products over a range of
// tokens are exp of the sum of the dt A in that range, accumulated in order (common.hpp), so a
// strong decay (a large dt times A < 0) underflows to exactly 0, never to NaN.
// NaN in x, dt, Bm, Cm, D or z is data and propagates. A NaN in dt_t of head h, or in its group's
// B_t, enters the whole state of (b, h), so y_t and every later y of (b, h) are NaN; a NaN in
// x_t[c] enters column c of the state, so y[c] from t on. The chunked form may also make those
// columns of the earlier tokens of t's chunk NaN (0 * NaN in the causal products, as every member
// of the linear family, common.hpp). A NaN in C_t spoils y_t of the group's heads only, in z_t[c]
// y_t[c] only, in D[h] every y of head h. Other heads and earlier chunks are untouched.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/linear/activation.hpp"
#include "mnemo/linear/common.hpp"
#include "mnemo/linear/linear_attn.hpp"

namespace mnemo::linear {

struct mamba2_options {
  bool dt_softplus = false;      // dt = softplus(dt + dt_bias)
  std::int64_t chunk_size = 0;   // tokens per chunk of the chunked form; 0: default_chunk_size
  form path = form::automatic;   // force the recurrent or the chunked form (common.hpp, choose_form)
  int threads = 0;               // threads over (batch, head); 0: the OpenMP default
};

namespace detail {

// The validated sizes of one call (L = 1 for a step).
struct mamba2_dims {
  std::int64_t B, H, L, P, N, G;
};

// Every check of the full op (R = 4: x [B, H, L, P]) and of the step (R = 3: x [B, H, P]), once
// per call. state_in: the state the call reads when it is not `state` (an out-of-place step).
template <int R>
mamba2_dims check_mamba2(const char* fn, const view<const float, R>& x, const view<const float, R - 1>& dt,
                         const view<const float, 1>& A, const view<const float, R>& Bm,
                         const view<const float, R>& Cm, const view<const float, 1>& D,
                         const view<const float, R>& z, const view<const float, 1>& dt_bias,
                         const view<float, R>& y, const view<float, 4>& state, const view<const float, 4>& state_in,
                         const mamba2_options& opt) {
  using mnemo::detail::require;
  using mnemo::detail::require_data;
  using mnemo::detail::require_disjoint;
  using mnemo::detail::require_shape;
  constexpr bool full = R == 4;
  const char* xd = full ? " [B, H, L, P]" : " [B, H, P]";
  const char* bd = full ? " [B, G, L, N]" : " [B, G, N]";
  require_data(fn, "x", x, xd);
  require_data(fn, "dt", dt, full ? " [B, H, L]" : " [B, H]");
  require_data(fn, "A", A, " [H]");
  require_data(fn, "Bm", Bm, bd);
  require_data(fn, "Cm", Cm, bd);
  require_data(fn, "y", y, xd);
  const std::int64_t B = x.extent(0), H = x.extent(1), L = full ? x.extent(2) : 1, P = x.extent(R - 1);
  const std::int64_t G = Bm.extent(1), N = Bm.extent(R - 1);
  // [b, h, (L,) last] for the full op or the step.
  auto shape = [&](std::int64_t b, std::int64_t h, std::int64_t last) {
    if constexpr (full) return shape_t<R>{b, h, L, last};
    else return shape_t<R>{b, h, last};
  };
  require(P >= 1, fn, ": x", xd, " needs a head dim P >= 1, got P=", P);
  require(N >= 1, fn, ": Bm", bd, " needs a state size N >= 1, got N=", N);
  require(G >= 1 && H % G == 0, fn, ": Bm.shape[1] (G, groups) must divide H: H=", H, ", G=", G);
  if constexpr (full) require_shape(fn, "dt", dt, {B, H, L}, " [B, H, L] (from x)");
  else require_shape(fn, "dt", dt, {B, H}, " [B, H] (from x)");
  require_shape(fn, "A", A, {H}, " [H] (H from x)");
  require_shape(fn, "Bm", Bm, shape(B, G, N), bd);
  require_shape(fn, "Cm", Cm, shape(B, G, N), bd);
  if (!D.empty()) require_shape(fn, "D", D, {H}, " [H]");
  if (!z.empty()) require_shape(fn, "z", z, shape(B, H, P), xd);
  if (!dt_bias.empty()) require_shape(fn, "dt_bias", dt_bias, {H}, " [H]");
  require_shape(fn, "y", y, shape(B, H, P), xd);
  const char* sname = full ? "state" : "state_out";
  if (!full || !state.empty()) require_shape(fn, sname, state, {B, H, N, P}, " [B, H, N, P]");
  if (!full) require_shape(fn, "state_in", state_in, {B, H, N, P}, " [B, H, N, P]");
  require(opt.chunk_size >= 0, fn, ": options.chunk_size must be >= 0 (0: the default), got ", opt.chunk_size);
  require(opt.threads >= 0, fn, ": options.threads must be >= 0, got ", opt.threads);
  require(opt.path == form::automatic || opt.path == form::recurrent || opt.path == form::chunked, fn,
          ": options.path must be automatic, recurrent or chunked, got ", static_cast<int>(opt.path));
  for (std::int64_t h = 0; h < H; ++h)
    require(A(h) <= 0.0f && std::isfinite(A(h)), fn, ": A must be finite and <= 0, got A[", h, "] = ", A(h));
  // Aliasing: the chunked form reads x, B and C after writing rows of y, and the state is read
  // and written throughout, so y and the state overlap no input and not each other.
  auto disjoint_from_inputs = [&](const char* name, const auto& out) {
    require_disjoint(fn, name, out, "x", x);
    require_disjoint(fn, name, out, "dt", dt);
    require_disjoint(fn, name, out, "A", A);
    require_disjoint(fn, name, out, "Bm", Bm);
    require_disjoint(fn, name, out, "Cm", Cm);
    require_disjoint(fn, name, out, "D", D);
    require_disjoint(fn, name, out, "z", z);
    require_disjoint(fn, name, out, "dt_bias", dt_bias);
  };
  disjoint_from_inputs("y", y);
  disjoint_from_inputs(sname, state);
  require_disjoint(fn, "y", y, sname, state);
  require_disjoint(fn, "y", y, "state_in", state_in);
  if (!same_view(state_in, view<const float, 4>(state)))
    require_disjoint(fn, sname, state, "state_in", state_in, "; they may be the same view (in place)");
  return {B, H, L, P, N, G};
}

// One (batch, head) of a call: rows are tokens.
struct mamba2_head {
  view<const float, 2> x;         // [L, P]
  const float* dt;                // [L]
  float A;                        // A[h]
  view<const float, 2> Bm, Cm;    // [L, N], the head's group
  const float* D;                 // &D[h] or null
  view<const float, 2> z;         // [L, P] or empty
  float bias;                     // dt_bias[h] or 0
  view<float, 2> y;               // [L, P]
  view<float, 2> state;           // [N, P] or empty
  view<const float, 2> src;       // [N, P]: the state the first token reads, when not `state`; or empty
};

// dt of n tokens in place: dt + bias, then softplus.
template <class Arch>
void mamba2_dt(float* dt, std::int64_t n, float bias, bool softplus) {
  for (std::int64_t i = 0; i < n; ++i) dt[i] += bias;
  if (softplus) activate_inplace<false, Arch>(dt, n);
}

// One output row: y += D x, then y *= silu(z) (z null: no gate); gate [P] is workspace.
template <class Arch>
void mamba2_output_row(float* y, const float* x, const float* z, std::int64_t P, const float* D, float* gate) {
  if (D) simd::axpy<Arch>(*D, x, y, P);
  if (!z) return;
  std::copy(z, z + P, gate);
  activate_inplace<true, Arch>(gate, P);
  for (std::int64_t c = 0; c < P; ++c) y[c] *= gate[c];
}

// Recurrent form, one head (and the step): per token one pass over the state,
//   S_i = exp(dt A) S_i + B_i (dt x) ;  y += C_i S_i.
// FromSrc (an out-of-place step): the first token reads hd.src and writes hd.state. A template
// flag, so the in-place form compiles without the second pointer (common.hpp, recurrent_token).
template <class Arch, bool FromSrc>
void mamba2_recurrent_head(const mamba2_dims& d, const mamba2_head& hd, bool softplus) {
  matrix zero;
  state_map s = map_state(hd.state, d.N, d.P, zero);
  std::vector<float> v(d.P), gate(d.P);
  for (std::int64_t t = 0; t < d.L; ++t) {
    float dt = hd.dt[t];
    mamba2_dt<Arch>(&dt, 1, hd.bias, softplus);
    const float* xt = hd.x.ptr(t);
    for (std::int64_t c = 0; c < d.P; ++c) v[c] = dt * xt[c];
    const bool out_of_place = FromSrc && t == 0;
    float* yt = hd.y.ptr(t);
    recurrent_token<Arch>(s.data(), s.outerStride(), d.N, d.P, hd.Cm.ptr(t), hd.Bm.ptr(t), v.data(), nullptr,
                          {simd::exp<Arch>(dt * hd.A), nullptr}, yt, nullptr, out_of_place ? hd.src.data() : nullptr,
                          out_of_place ? hd.src.stride(0) : 0);
    mamba2_output_row<Arch>(yt, xt, hd.z.empty() ? nullptr : hd.z.ptr(t), d.P, hd.D, gate.data());
  }
}

// Chunked form, one head: the scalar-decay chunk kernel of linear_attn.hpp with q = C and k = B
// read in place, v = dt x and g = dt A formed per chunk, y written in place, then skip and gate.
template <class Arch>
void mamba2_chunked_head(const mamba2_dims& d, const mamba2_head& hd, bool softplus, std::int64_t chunk) {
  const std::int64_t C = std::min(chunk, d.L);
  matrix zero;
  state_map s = map_state(hd.state, d.N, d.P, zero);
  const bool fast = simd_chunks<Arch>(d.P);
  matrix k(C, d.N), v(C, d.P), a(C, C), decay(C, C);
  std::vector<float> dt(C), g(C), prefix(C), suffix(C), gate(d.P);
  std::vector<float> alpha_o(fast ? C : 0), alpha_s(fast ? d.N : 0);
  for (std::int64_t t0 = 0; t0 < d.L; t0 += C) {
    const std::int64_t n = std::min(C, d.L - t0);
    std::copy(hd.dt + t0, hd.dt + t0 + n, dt.data());
    mamba2_dt<Arch>(dt.data(), n, hd.bias, softplus);
    for (std::int64_t i = 0; i < n; ++i) {
      g[i] = dt[i] * hd.A;
      const float* xi = hd.x.ptr(t0 + i);
      float* vi = v.row(i).data();
      for (std::int64_t c = 0; c < d.P; ++c) vi[c] = dt[i] * xi[c];
    }
    scalar_decay_tables<Arch>(g.data(), n, decay, prefix.data(), suffix.data());
    if (fast) {
      scalar_decay_chunk_simd<true, Arch>(n, d.N, d.P, {hd.Cm.ptr(t0), hd.Cm.stride(0)},
                                          {hd.Bm.ptr(t0), hd.Bm.stride(0)}, {v.data(), d.P},
                                          {hd.y.ptr(t0), hd.y.stride(0)}, s, k, a, decay, prefix.data(),
                                          suffix.data(), 1.0f, alpha_o.data(), alpha_s.data());
    } else {  // Eigen's products; K is copied (the suffix decays scale it)
      auto K = k.topRows(n);
      K = rows_of(hd.Bm, t0, n);
      scalar_decay_chunk<true>(rows_of(hd.Cm, t0, n), K, v.topRows(n), rows_of(hd.y, t0, n), s, a, decay,
                               prefix.data(), suffix.data(), 1.0f);
    }
    if (hd.D || !hd.z.empty())
      for (std::int64_t i = 0; i < n; ++i)
        mamba2_output_row<Arch>(hd.y.ptr(t0 + i), hd.x.ptr(t0 + i), hd.z.empty() ? nullptr : hd.z.ptr(t0 + i), d.P,
                                hd.D, gate.data());
  }
}

// The views of (b, h) from the [B, H, L, *] tensors of a call.
inline mamba2_head mamba2_head_of(const mamba2_dims& d, std::int64_t b, std::int64_t h, const view<const float, 4>& x,
                                  const view<const float, 3>& dt, const view<const float, 1>& A,
                                  const view<const float, 4>& Bm, const view<const float, 4>& Cm,
                                  const view<const float, 1>& D, const view<const float, 4>& z,
                                  const view<const float, 1>& dt_bias, const view<float, 4>& y,
                                  const view<float, 4>& state, const view<const float, 4>& state_in) {
  const std::int64_t g = h / (d.H / d.G);
  mamba2_head hd{x[b][h], dt.ptr(b, h), A(h), Bm[b][g], Cm[b][g], D.empty() ? nullptr : D.ptr() + h,
                 z.empty() ? view<const float, 2>{} : z[b][h], dt_bias.empty() ? 0.0f : dt_bias(h), y[b][h],
                 state.empty() ? view<float, 2>{} : state[b][h], {}};
  if (!state_in.empty() && !same_view(state_in, view<const float, 4>(state))) hd.src = state_in[b][h];
  return hd;
}

// Every (batch, head) through the form choose_form() picks (the step: form::recurrent, on its
// token views [B, H, 1, P], common.hpp token_view).
template <class Arch>
void mamba2_run(const mamba2_dims& d, const view<const float, 4>& x, const view<const float, 3>& dt,
                const view<const float, 1>& A, const view<const float, 4>& Bm, const view<const float, 4>& Cm,
                const view<const float, 1>& D, const view<const float, 4>& z, const view<const float, 1>& dt_bias,
                const view<float, 4>& y, const view<float, 4>& state, const view<const float, 4>& state_in,
                const mamba2_options& opt) {
  if (d.L == 0) return;
  options lopt;
  lopt.path = opt.path;
  const form f = choose_form(lopt, d.L);
  for_each_head(d.B * d.H, opt.threads, f == form::chunked, [&](std::int64_t bh) {
    const mamba2_head hd = mamba2_head_of(d, bh / d.H, bh % d.H, x, dt, A, Bm, Cm, D, z, dt_bias, y, state, state_in);
    if (f == form::chunked)
      mamba2_chunked_head<Arch>(d, hd, opt.dt_softplus, opt.chunk_size > 0 ? opt.chunk_size : default_chunk_size);
    else if (hd.src.empty())
      mamba2_recurrent_head<Arch, false>(d, hd, opt.dt_softplus);
    else
      mamba2_recurrent_head<Arch, true>(d, hd, opt.dt_softplus);
  });
}

}  // namespace detail

namespace reference {

// The SSD recurrence in double, one token at a time.
inline void mamba2(view<const float, 4> x,        // [B, H, L, P]
                   view<const float, 3> dt,       // [B, H, L]
                   view<const float, 1> A,        // [H], <= 0
                   view<const float, 4> Bm,       // [B, G, L, N]
                   view<const float, 4> Cm,       // [B, G, L, N]
                   view<const float, 1> D,        // [H] or empty
                   view<const float, 4> z,        // [B, H, L, P] or empty
                   view<const float, 1> dt_bias,  // [H] or empty
                   view<float, 4> y,              // [B, H, L, P]
                   view<float, 4> state = {},     // [B, H, N, P] in and out, or empty
                   const mamba2_options& opt = {}) {
  const auto d = detail::check_mamba2<4>("linear::reference::mamba2", x, dt, A, Bm, Cm, D, z, dt_bias, y, state, {},
                                         opt);
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H, g = h / (d.H / d.G);
    std::vector<double> s(static_cast<std::size_t>(d.N * d.P), 0.0);  // S [N, P]
    if (!state.empty())
      for (std::int64_t i = 0; i < d.N; ++i)
        for (std::int64_t c = 0; c < d.P; ++c) s[i * d.P + c] = state(b, h, i, c);
    for (std::int64_t t = 0; t < d.L; ++t) {
      double step = static_cast<double>(dt(b, h, t)) + (dt_bias.empty() ? 0.0 : dt_bias(h));
      if (opt.dt_softplus) step = detail::softplus(step);
      const double decay = std::exp(step * A(h));
      for (std::int64_t i = 0; i < d.N; ++i)  // S = exp(dt A) S + B (dt x)^T
        for (std::int64_t c = 0; c < d.P; ++c)
          s[i * d.P + c] = decay * s[i * d.P + c] + static_cast<double>(Bm(b, g, t, i)) * step * x(b, h, t, c);
      for (std::int64_t c = 0; c < d.P; ++c) {  // y = C^T S + D x, times silu(z)
        double acc = D.empty() ? 0.0 : static_cast<double>(D(h)) * x(b, h, t, c);
        for (std::int64_t i = 0; i < d.N; ++i) acc += static_cast<double>(Cm(b, g, t, i)) * s[i * d.P + c];
        if (!z.empty()) acc *= detail::silu(static_cast<double>(z(b, h, t, c)));
        y(b, h, t, c) = static_cast<float>(acc);
      }
    }
    if (!state.empty())
      for (std::int64_t i = 0; i < d.N; ++i)
        for (std::int64_t c = 0; c < d.P; ++c) state(b, h, i, c) = static_cast<float>(s[i * d.P + c]);
  }, opt.threads);
}

}  // namespace reference

// The Mamba-2 SSD layer core; see the header comment.
template <class Arch = simd::default_arch>
void mamba2(view<const float, 4> x,        // [B, H, L, P]
            view<const float, 3> dt,       // [B, H, L]
            view<const float, 1> A,        // [H], <= 0
            view<const float, 4> Bm,       // [B, G, L, N]
            view<const float, 4> Cm,       // [B, G, L, N]
            view<const float, 1> D,        // [H] or empty
            view<const float, 4> z,        // [B, H, L, P] or empty
            view<const float, 1> dt_bias,  // [H] or empty
            view<float, 4> y,              // [B, H, L, P]
            view<float, 4> state = {},     // [B, H, N, P] in and out, or empty
            const mamba2_options& opt = {}) {
  const auto d = detail::check_mamba2<4>("linear::mamba2", x, dt, A, Bm, Cm, D, z, dt_bias, y, state, {}, opt);
  detail::mamba2_run<Arch>(d, x, dt, A, Bm, Cm, D, z, dt_bias, y, state, {}, opt);
}

// One token (mamba's selective_state_update for Mamba-2): state_out = exp(dt A) state_in +
// B (dt x)^T per head, y = C^T state_out + D x, gated by silu(z). state_in and state_out are the
// same view (in place) or disjoint (e.g. the two slots of linear::state_ring::advance()).
template <class Arch = simd::default_arch>
void mamba2_step(view<const float, 3> x,          // [B, H, P]
                 view<const float, 2> dt,         // [B, H]
                 view<const float, 1> A,          // [H], <= 0
                 view<const float, 3> Bm,         // [B, G, N]
                 view<const float, 3> Cm,         // [B, G, N]
                 view<const float, 1> D,          // [H] or empty
                 view<const float, 3> z,          // [B, H, P] or empty
                 view<const float, 1> dt_bias,    // [H] or empty
                 view<float, 3> y,                // [B, H, P]
                 view<const float, 4> state_in,   // [B, H, N, P]
                 view<float, 4> state_out,        // [B, H, N, P]
                 mamba2_options opt = {}) {
  const char* fn = "linear::mamba2_step";
  mnemo::detail::require_data(fn, "state_in", state_in, " [B, H, N, P]");
  mnemo::detail::require_data(fn, "state_out", state_out, " [B, H, N, P]");
  const auto d = detail::check_mamba2<3>(fn, x, dt, A, Bm, Cm, D, z, dt_bias, y, state_out, state_in, opt);
  opt.path = form::recurrent;
  detail::mamba2_run<Arch>(d, detail::token_view(x), detail::token_view(dt), A, detail::token_view(Bm),
                           detail::token_view(Cm), D, detail::token_view(z), dt_bias, detail::token_view(y), state_out,
                           state_in, opt);
}

// One token, the state updated in place.
template <class Arch = simd::default_arch>
void mamba2_step(view<const float, 3> x,        // [B, H, P]
                 view<const float, 2> dt,       // [B, H]
                 view<const float, 1> A,        // [H], <= 0
                 view<const float, 3> Bm,       // [B, G, N]
                 view<const float, 3> Cm,       // [B, G, N]
                 view<const float, 1> D,        // [H] or empty
                 view<const float, 3> z,        // [B, H, P] or empty
                 view<const float, 1> dt_bias,  // [H] or empty
                 view<float, 3> y,              // [B, H, P]
                 view<float, 4> state,          // [B, H, N, P] in and out
                 const mamba2_options& opt = {}) {
  mamba2_step<Arch>(x, dt, A, Bm, Cm, D, z, dt_bias, y, view<const float, 4>(state), state, opt);
}

}  // namespace mnemo::linear
