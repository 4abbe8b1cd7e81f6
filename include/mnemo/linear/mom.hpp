// mnemo/linear/mom.hpp — Mixture of Memories (Du et al., "MoM: Linear Sequence Modeling with
// Mixture-of-Memories", 2025, arXiv:2502.13685): M linear-attention memories and a router; each
// token is written to and read from the top_k memories its router logits pick, plus an optional
// shared memory that every token writes and reads.
//
//   I_t     = the top_k memories of logits r_t [M]      (ties: the lower index first)
//   w_t,m   = exp(r_t,m) / sum_{m' in I_t} exp(r_t,m')  for m in I_t (softmax over the selected logits)
//   S^m_t   = write(S^m_{t-1}, k^m_t, v^m_t, g^m_t, beta^m_t)  if m in I_t, else S^m_{t-1}
//   S^s_t   = write(S^s_{t-1}, k^s_t, v^s_t, ...)              the shared memory, every token
//   o_t     = (scale q_t)^T S^s_t + sum_{m in I_t} w_t,m (scale q_t)^T S^m_t
//
// The weights are MoM's: its softmax over all M logits, cut to the top_k and renormalised, is the
// softmax over the selected logits. `write` is the member's one-token update (Member below: linear attention, simple GLA, DeltaNet or
// Gated DeltaNet; a user may add another with the same five members). Like every member, a token
// reads a memory after its own write to it. A memory's gates and betas apply only on the tokens
// routed to it: to a memory, its tokens are one contiguous sequence (MoM's "transform"), so a
// memory that receives no token in a call keeps its state exactly.
//
// Inputs, as fla's MomAttention (fla/layers/mom.py) computes them: q is shared by all memories
// (one query projection); each memory m has its own k^m, v^m (and g^m, beta^m for the gated and
// delta members), and so has the shared memory. The projections are given for every token (a
// library cannot know the router before the caller has run it); a memory reads only its routed
// rows. Router logits are [B, L, M] (one router per token, MoM's) or [B, H, L, M] (one per head).
// The shared memory's output has weight 1 (MoM adds it to the routed mixture).
//
// Shapes: q [B, H, L, Dk]; per memory k [B, H, L, Dk], v [B, H, L, Dv], g and beta [B, H, L];
// logits [B, L, M] or [B, H, L, M]; o [B, H, L, Dv]; state [B, H, M + S, Df, Ds] (S = 1 with a
// shared memory, 0 without; Df, Ds as for the member, Dk and Dv by default) held in a rank-4 view
// [B, H (M + S), Df, Ds]: memory m of head h is slice h (M + S) + m, the shared memory h (M + S) + M.
//
// Paths (chosen in mom(), the one place): reference::mom is the double-precision recurrence above,
// token by token. The fast path does as MoM: for each memory it gathers the rows of the tokens
// routed to it into a contiguous subsequence, runs the member's own kernel on it (the member picks
// its recurrent or chunked form by options.path and the subsequence's length, as for a plain call)
// and scatters the outputs back, weighted, into o; the shared memory runs once over the whole
// sequence and writes o first. The routed outputs are added in ascending memory order.
// Cost: the member's work on top_k L tokens (plus L for the shared memory), in subsequences of about
// top_k L / M tokens, plus one copy of the routed rows of q, k, v in and of o out (bench/mom_rows.cpp
// puts it beside the member alone on the same L tokens).
// Threads: with one router per token, the member's calls spread their H heads over
// options.threads (memories and batches run one after the other); with one per head, the (batch,
// head) pairs go over the threads. Either way the result does not depend on the thread count.
//
// Numerics: f32 (routing weights: the softmax of the selected logits, max first, in f32; the
// reference in double). Logits must be finite (a NaN or an infinity is rejected with
// mnemo::error: express "never this memory" by a large negative finite logit). q, k, v are data:
// a NaN in q_t reaches o_t only; a NaN in k^m_t or v^m_t enters memory m only if t is routed to
// m (it is never read otherwise), and then reaches every later output that reads m, as the member
// describes (common.hpp), including the earlier tokens of its chunk in m's subsequence. A
// selected memory whose weight underflows to 0 still passes a NaN on (0 * NaN). Gates and betas
// are checked as for the member, on every token (routed or not).
//
// Step: mom_step is mom() on one token, in place. (An out-of-place step for state_ring would copy
// the M - top_k memories the token does not touch, so it is not offered. To undo steps, save the
// slices a step will write first: the shared one and those mom_select picks from its logits.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "mnemo/linear/common.hpp"
#include "mnemo/linear/delta_rule.hpp"
#include "mnemo/linear/gated_delta_rule.hpp"
#include "mnemo/linear/linear_attn.hpp"
#include "mnemo/linear/simple_gla.hpp"

namespace mnemo::linear {

// The inputs of one memory (routed or shared). g and beta are used by the members that take them
// and may be left empty otherwise. An empty k makes a shared memory absent.
template <class T>
struct mom_memory {
  view<const T, 4> k;         // [B, H, L, Dk]
  view<const T, 4> v;         // [B, H, L, Dv]
  view<const float, 3> g;     // [B, H, L] log-decays <= 0 (simple_gla, gated_delta_rule)
  view<const float, 3> beta;  // [B, H, L] in [0, 2] (delta_rule, gated_delta_rule)
};

// The same for one token (mom_step).
template <class T>
struct mom_token {
  view<const T, 3> k;         // [B, H, Dk]
  view<const T, 3> v;         // [B, H, Dv]
  view<const float, 2> g;     // [B, H]
  view<const float, 2> beta;  // [B, H]
};

// Router logits and top_k. One router per token ([B, L, M], MoM's) or per head ([B, H, L, M]);
// held as [B, Hr, L, M] with Hr = 1 or H.
struct mom_router {
  view<const float, 4> logits;  // [B, Hr, L, M]
  std::int64_t top_k = 1;

  mom_router(view<const float, 4> per_head, std::int64_t k) : logits(per_head), top_k(k) {}  // [B, H, L, M]
  mom_router(view<const float, 3> per_token, std::int64_t k)                                 // [B, L, M]
      : logits(per_token.data(), {per_token.extent(0), 1, per_token.extent(1), per_token.extent(2)},
               {per_token.stride(0), per_token.stride(0), per_token.stride(1), 1}),
        top_k(k) {}
};

// The router of one token (mom_step): [B, M] or [B, H, M].
struct mom_token_router {
  view<const float, 4> logits;  // [B, Hr, 1, M]
  std::int64_t top_k = 1;

  mom_token_router(view<const float, 3> per_head, std::int64_t k)  // [B, H, M]
      : logits(per_head.data(), {per_head.extent(0), per_head.extent(1), 1, per_head.extent(2)},
               {per_head.stride(0), per_head.stride(1), per_head.extent(2), 1}),
        top_k(k) {}
  mom_token_router(view<const float, 2> per_token, std::int64_t k)  // [B, M]
      : logits(per_token.data(), {per_token.extent(0), 1, 1, per_token.extent(1)},
               {per_token.stride(0), per_token.stride(0), per_token.extent(1), 1}),
        top_k(k) {}
};

// The members a memory can be. A member is a type with
//   name                        for messages and benchmark rows
//   uses_g, uses_beta           whether it reads mom_memory::g / ::beta (checked as the member checks them)
//   features                    whether it takes options.map and options.normalize (linear_attn)
//   run<Arch>(q, k, v, g, beta, o, state, opt)   its fast kernel on f32 views [1 or B, heads, n, D]
//   reference_write(S, k, v, g, beta)            one token into a double state S [Df, Ds] (k, v
//                               prepared as common.hpp's reference_row / reference_values do)
// so a user adds one (say a retention memory) by writing these five, without touching mom().
namespace mom_members {

using in4 = view<const float, 4>;  // f32 q, k, v of a member call
using in3 = view<const float, 3>;  // g, beta (empty where the member takes none)
using out4 = view<float, 4>;       // o, state
using rows = std::vector<double>;  // a prepared row, or a state [Df, Ds] row-major, in double

struct linear_attn {
  static constexpr const char* name = "linear_attn";
  static constexpr bool uses_g = false, uses_beta = false, features = true;
  template <class Arch>
  static void run(in4 q, in4 k, in4 v, in3, in3, out4 o, out4 state, const options& opt) {
    linear::linear_attn<in4, in4, in4, Arch>(q, k, v, o, state, opt);
  }
  static void reference_write(rows& s, const rows& k, const rows& v, double, double) {  // S += k v^T
    const std::size_t Ds = v.size();
    for (std::size_t i = 0; i < k.size(); ++i)
      for (std::size_t c = 0; c < Ds; ++c) s[i * Ds + c] += k[i] * v[c];
  }
};

struct simple_gla {
  static constexpr const char* name = "simple_gla";
  static constexpr bool uses_g = true, uses_beta = false, features = false;
  template <class Arch>
  static void run(in4 q, in4 k, in4 v, in3 g, in3, out4 o, out4 state, const options& opt) {
    linear::simple_gla<in4, in4, in4, Arch>(q, k, v, g, o, state, opt);
  }
  static void reference_write(rows& s, const rows& k, const rows& v, double g, double) {  // S = e^g S + k v^T
    const std::size_t Ds = v.size();
    const double a = std::exp(g);
    for (std::size_t i = 0; i < k.size(); ++i)
      for (std::size_t c = 0; c < Ds; ++c) s[i * Ds + c] = a * s[i * Ds + c] + k[i] * v[c];
  }
};

// S = exp(g) S; u = beta (v - S^T k); S += k u^T (g = 0: DeltaNet).
inline void reference_delta_write(rows& s, const rows& k, const rows& v, double g, double beta) {
  const std::size_t Ds = v.size();
  const double a = std::exp(g);
  for (double& e : s) e *= a;
  rows u(Ds);
  for (std::size_t c = 0; c < Ds; ++c) {
    double sk = 0;
    for (std::size_t i = 0; i < k.size(); ++i) sk += s[i * Ds + c] * k[i];
    u[c] = beta * (v[c] - sk);
  }
  for (std::size_t i = 0; i < k.size(); ++i)
    for (std::size_t c = 0; c < Ds; ++c) s[i * Ds + c] += k[i] * u[c];
}

struct delta_rule {
  static constexpr const char* name = "delta_rule";
  static constexpr bool uses_g = false, uses_beta = true, features = false;
  template <class Arch>
  static void run(in4 q, in4 k, in4 v, in3, in3 beta, out4 o, out4 state, const options& opt) {
    linear::delta_rule<in4, in4, in4, Arch>(q, k, v, beta, o, state, opt);
  }
  static void reference_write(rows& s, const rows& k, const rows& v, double, double beta) {
    reference_delta_write(s, k, v, 0.0, beta);
  }
};

struct gated_delta_rule {
  static constexpr const char* name = "gated_delta_rule";
  static constexpr bool uses_g = true, uses_beta = true, features = false;
  template <class Arch>
  static void run(in4 q, in4 k, in4 v, in3 g, in3 beta, out4 o, out4 state, const options& opt) {
    linear::gated_delta_rule<in4, in4, in4, Arch>(q, k, v, g, beta, o, state, opt);
  }
  static void reference_write(rows& s, const rows& k, const rows& v, double g, double beta) {
    reference_delta_write(s, k, v, g, beta);
  }
};

}  // namespace mom_members

// The routing of one token, as mom() does it: the top_k memories of `logits` [M] (contiguous),
// highest logit first, ties to the lower index, into sel [top_k]; their weights (the softmax of their
// logits, in f32) into w [top_k]. O(top_k M).
inline void mom_select(const float* logits, std::int64_t M, std::int64_t top_k, std::int64_t* sel, float* w) {
  for (std::int64_t j = 0; j < top_k; ++j) {
    std::int64_t best = -1;
    for (std::int64_t m = 0; m < M; ++m) {
      bool taken = false;
      for (std::int64_t i = 0; i < j; ++i) taken |= sel[i] == m;
      if (!taken && (best < 0 || logits[m] > logits[best])) best = m;  // strict: ties keep the lower index
    }
    sel[j] = best;
  }
  const float top = logits[sel[0]];
  float sum = 0;
  for (std::int64_t j = 0; j < top_k; ++j) sum += w[j] = std::exp(logits[sel[j]] - top);
  for (std::int64_t j = 0; j < top_k; ++j) w[j] /= sum;
}

namespace detail {

// The validated sizes of a mom call.
struct mom_dims {
  dims d;             // B, H, L, Dk, Dv, Df, Ds, scale, ... (common.hpp)
  std::int64_t M;     // routed memories
  std::int64_t S;     // 1 with a shared memory, else 0
  std::int64_t Hr;    // router heads: 1 (per token) or H
  std::int64_t top_k;
};

template <class Member, class T>
void check_mom_memory(const std::string& fn, const view<const T, 4>& q, const mom_memory<T>& mem,
                      const view<float, 4>& o, const options& opt) {
  const dims d = check_common<T>(fn.c_str(), q, mem.k, mem.v, o, {}, opt, Member::features);
  if constexpr (Member::uses_g) check_scalar_gate(fn.c_str(), mem.g, d);
  if constexpr (Member::uses_beta) check_beta(fn.c_str(), mem.beta, d);
}

// Every boundary check of mom (and mom_step, through it).
template <class Member, class T>
mom_dims check_mom(const char* fn, const view<const T, 4>& q, std::span<const mom_memory<T>> memories,
                   const mom_memory<T>& shared, const mom_router& router, const view<float, 4>& o,
                   const view<float, 4>& state, const options& opt) {
  using mnemo::detail::require;
  const std::int64_t M = static_cast<std::int64_t>(memories.size());
  require(M >= 1, fn, ": memories must hold M >= 1 routed memories, got M = ", M);
  const dims d = check_common<T>(fn, q, memories[0].k, memories[0].v, o, {}, opt, Member::features);
  for (std::int64_t m = 0; m < M; ++m)
    check_mom_memory<Member, T>(std::string(fn) + ": memories[" + std::to_string(m) + "]", q, memories[m], o, opt);
  const std::int64_t S = shared.k.empty() ? 0 : 1;
  if (S) check_mom_memory<Member, T>(std::string(fn) + ": shared memory", q, shared, o, opt);
  const view<const float, 4>& r = router.logits;
  mnemo::detail::require_data(fn, "router logits", r, " [B, L, M] or [B, H, L, M]");
  const std::int64_t Hr = r.extent(1);
  require(Hr == 1 || Hr == d.H, fn, ": router logits must have one router per token ([B, L, M]) or per head",
          " ([B, H, L, M] with H = ", d.H, "), got ", Hr, " router heads");
  if (Hr == 1)
    require(r.shape() == shape_t<4>{d.B, 1, d.L, M}, fn, ": router logits must have shape [", d.B, ", ", d.L, ", ", M,
            "] [B, L, M] (M = memories.size()), got [", r.extent(0), ", ", r.extent(2), ", ", r.extent(3), "]");
  else
    mnemo::detail::require_shape(fn, "router logits", r, {d.B, d.H, d.L, M}, " [B, H, L, M] (M = memories.size())");
  require(router.top_k >= 1 && router.top_k <= M, fn, ": top_k must be in [1, M = ", M, "], got ", router.top_k);
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < Hr; ++h)
      for (std::int64_t t = 0; t < d.L; ++t)
        for (std::int64_t m = 0; m < M; ++m)
          if (!std::isfinite(r(b, h, t, m)))
            mnemo::detail::fail(fn, ": router logits must be finite, got logits[", b, ", ",
                                Hr == 1 ? "" : std::to_string(h) + ", ", t, ", ", m, "] = ", r(b, h, t, m));
  if (!state.empty())
    mnemo::detail::require_shape(fn, "state", state, {d.B, d.H * (M + S), d.Df, d.Ds},
                                 " [B, H (M + S), Df, Ds] (S = 1 with a shared memory; memory m of head h at"
                                 " h (M + S) + m)");
  using mnemo::detail::require_disjoint;
  require_disjoint(fn, "o", o, "router logits", r);
  require_disjoint(fn, "state", state, "o", o);
  require_disjoint(fn, "state", state, "q", q);
  require_disjoint(fn, "state", state, "router logits", r);
  auto disjoint_from_state = [&](const mom_memory<T>& mem) {
    require_disjoint(fn, "state", state, "k", mem.k);
    require_disjoint(fn, "state", state, "v", mem.v);
    if constexpr (Member::uses_g) require_disjoint(fn, "state", state, "g", mem.g);
    if constexpr (Member::uses_beta) require_disjoint(fn, "state", state, "beta", mem.beta);
  };
  for (const auto& mem : memories) disjoint_from_state(mem);
  if (S) disjoint_from_state(shared);
  return {d, M, S, Hr, router.top_k};
}

// The state slice of memory `slot` of heads [h0, h0 + n) of batch b: [1, n, Df, Ds].
inline view<float, 4> mom_state_slice(const view<float, 4>& state, const mom_dims& md, std::int64_t b, std::int64_t h0,
                                      std::int64_t n, std::int64_t slot) {
  const std::int64_t per_head = md.M + md.S;
  return {state.ptr(b, h0 * per_head + slot),
          {1, n, md.d.Df, md.d.Ds},
          {state.stride(0), per_head * state.stride(1), state.stride(2), 1}};
}

// [B, H, L, D] of T to a new f32 tensor (the shared memory of f16 / bf16 inputs: the members run
// their f32 instantiation only).
template <class Arch, class T>
tensor<float, 4> to_f32(const view<const T, 4>& x) {
  tensor<float, 4> y(x.shape());
  for (std::int64_t b = 0; b < x.extent(0); ++b)
    for (std::int64_t h = 0; h < x.extent(1); ++h)
      for (std::int64_t t = 0; t < x.extent(2); ++t)
        simd::convert<Arch>(x.ptr(b, h, t), y.as_view().ptr(b, h, t), x.extent(3));
  return y;
}

// The routed memories of one routing group: heads [h0, h0 + Hg) of batch b, which share router
// row hr (all heads with one router per token, one head with a router per head). For each memory:
// gather its tokens' rows into a contiguous subsequence, run the member, scatter the weighted rows.
template <class Member, class Arch, class T>
void run_mom_group(const mom_dims& md, const view<const T, 4>& q, std::span<const mom_memory<T>> memories,
                   const mom_router& router, const view<float, 4>& o, const view<float, 4>& state, std::int64_t b,
                   std::int64_t hr, std::int64_t h0, std::int64_t Hg, const options& opt) {
  const dims& d = md.d;
  std::vector<std::vector<std::int64_t>> tokens(md.M);
  std::vector<std::vector<float>> weights(md.M);
  std::vector<std::int64_t> sel(md.top_k);
  std::vector<float> w(md.top_k);
  for (std::int64_t t = 0; t < d.L; ++t) {
    mom_select(router.logits.ptr(b, hr, t), md.M, md.top_k, sel.data(), w.data());
    for (std::int64_t j = 0; j < md.top_k; ++j) {
      tokens[sel[j]].push_back(t);
      weights[sel[j]].push_back(w[j]);
    }
  }
  std::int64_t most = 0;
  for (const auto& list : tokens) most = std::max(most, static_cast<std::int64_t>(list.size()));
  std::vector<float> qg(Hg * most * d.Dk), kg(Hg * most * d.Dk), vg(Hg * most * d.Dv), og(Hg * most * d.Dv);
  std::vector<float> gg(Member::uses_g ? Hg * most : 0), bg(Member::uses_beta ? Hg * most : 0);
  for (std::int64_t m = 0; m < md.M; ++m) {
    const std::int64_t n = static_cast<std::int64_t>(tokens[m].size());
    if (n == 0) continue;  // no token: the memory keeps its state
    const mom_memory<T>& mem = memories[m];
    for (std::int64_t h = 0; h < Hg; ++h)
      for (std::int64_t i = 0; i < n; ++i) {  // gather
        const std::int64_t t = tokens[m][i], row = h * n + i;
        simd::convert<Arch>(q.ptr(b, h0 + h, t), qg.data() + row * d.Dk, d.Dk);
        simd::convert<Arch>(mem.k.ptr(b, h0 + h, t), kg.data() + row * d.Dk, d.Dk);
        simd::convert<Arch>(mem.v.ptr(b, h0 + h, t), vg.data() + row * d.Dv, d.Dv);
        if constexpr (Member::uses_g) gg[row] = mem.g(b, h0 + h, t);
        if constexpr (Member::uses_beta) bg[row] = mem.beta(b, h0 + h, t);
      }
    using cview3 = view<const float, 3>;
    using cview4 = view<const float, 4>;
    const cview3 gv = Member::uses_g ? cview3(gg.data(), {1, Hg, n}) : cview3();
    const cview3 bv = Member::uses_beta ? cview3(bg.data(), {1, Hg, n}) : cview3();
    const view<float, 4> ov(og.data(), {1, Hg, n, d.Dv});
    Member::template run<Arch>(cview4(qg.data(), {1, Hg, n, d.Dk}), cview4(kg.data(), {1, Hg, n, d.Dk}),
                               cview4(vg.data(), {1, Hg, n, d.Dv}), gv, bv, ov,
                               mom_state_slice(state, md, b, h0, Hg, m), opt);
    for (std::int64_t h = 0; h < Hg; ++h)  // scatter, weighted
      for (std::int64_t i = 0; i < n; ++i)
        simd::axpy<Arch>(weights[m][i], ov.ptr(0, h, i), o.ptr(b, h0 + h, tokens[m][i]), d.Dv);
  }
}

// The fast path (see the header comment).
template <class Member, class Arch, class T>
void run_mom(const mom_dims& md, const view<const T, 4>& q, std::span<const mom_memory<T>> memories,
             const mom_memory<T>& shared, const mom_router& router, const view<float, 4>& o, view<float, 4> state,
             const options& opt) {
  const dims& d = md.d;
  if (d.L == 0) return;
  tensor<float, 4> zero_state;
  if (state.empty()) {  // start from zero, return nothing
    zero_state = tensor<float, 4>({d.B, d.H * (md.M + md.S), d.Df, d.Ds});
    std::fill(zero_state.begin(), zero_state.end(), 0.0f);
    state = zero_state;
  }
  if (md.S) {  // the shared memory sees every token and writes o first
    const view<float, 4> s{state.ptr(0, md.M), {d.B, d.H, d.Df, d.Ds},
                           {state.stride(0), (md.M + 1) * state.stride(1), state.stride(2), 1}};
    if constexpr (std::is_same_v<T, float>)
      Member::template run<Arch>(q, shared.k, shared.v, shared.g, shared.beta, o, s, opt);
    else
      Member::template run<Arch>(to_f32<Arch>(q), to_f32<Arch>(shared.k), to_f32<Arch>(shared.v), shared.g,
                                 shared.beta, o, s, opt);
  } else {
    for (std::int64_t b = 0; b < d.B; ++b)
      for (std::int64_t h = 0; h < d.H; ++h)
        for (std::int64_t t = 0; t < d.L; ++t) std::fill(o.ptr(b, h, t), o.ptr(b, h, t) + d.Dv, 0.0f);
  }
  if (md.Hr == 1) {  // one routing for all heads: each member call spreads its H heads over the threads
    for (std::int64_t b = 0; b < d.B; ++b)
      run_mom_group<Member, Arch, T>(md, q, memories, router, o, state, b, 0, 0, d.H, opt);
    return;
  }
  // One routing per head: the (batch, head) pairs go over the threads, each member call runs on one.
  options one = opt;
  one.threads = 1;
  for_each_head(d.B * d.H, opt.threads, true, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    run_mom_group<Member, Arch, T>(md, q, memories, router, o, state, b, h, h, 1, one);
  });
}

}  // namespace detail

namespace reference {

// Mixture of Memories, one token at a time in double (the recurrence of the header comment).
template <class Member, class Q>
void mom(const Q& q,                                                // [B, H, L, Dk]
         std::span<const mom_memory<element_t<Q>>> memories,        // M routed memories
         const mom_memory<element_t<Q>>& shared,                    // the shared memory, or {} (none)
         const mom_router& router,                                  // logits [B, L, M] or [B, H, L, M], top_k
         view<float, 4> o,                                          // [B, H, L, Dv]
         view<float, 4> state = {},                                 // [B, H (M + S), Df, Ds] in and out, or empty
         const options& opt = {}) {
  using T = element_t<Q>;
  const auto md =
      detail::check_mom<Member, T>("linear::reference::mom", cview(q), memories, shared, router, o, state, opt);
  const detail::dims& d = md.d;
  const std::int64_t slots = md.M + md.S;
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H, hr = md.Hr == 1 ? 0 : h;
    std::vector<std::vector<double>> s(static_cast<std::size_t>(slots));
    for (std::int64_t m = 0; m < slots; ++m)
      s[m] = detail::reference_load_state(state.empty() ? view<float, 2>() : state[b][h * slots + m], d);
    std::vector<std::int64_t> sel(md.top_k);
    std::vector<float> unused(md.top_k);
    std::vector<double> acc(d.Dv), read(d.Ds);
    // o += w (scale q)^T S, normalised as the member's read
    auto read_into = [&](const std::vector<double>& qt, const std::vector<double>& st, double w) {
      std::fill(read.begin(), read.end(), 0.0);
      for (std::int64_t i = 0; i < d.Df; ++i)
        for (std::int64_t c = 0; c < d.Ds; ++c) read[c] += qt[i] * st[i * d.Ds + c];
      const double den = d.normalize ? read[d.Dv] + static_cast<double>(normalize_eps) : 1.0;
      for (std::int64_t c = 0; c < d.Dv; ++c) acc[c] += w * read[c] / den;
    };
    auto write = [&](std::vector<double>& st, const mom_memory<T>& mem, std::int64_t t) {
      const auto kt = detail::reference_row(mem.k[b][h].ptr(t), d, 1.0);
      const auto vt = detail::reference_values(mem.v[b][h].ptr(t), d);
      const double g = Member::uses_g ? mem.g(b, h, t) : 0.0, beta = Member::uses_beta ? mem.beta(b, h, t) : 0.0;
      Member::reference_write(st, kt, vt, g, beta);
    };
    for (std::int64_t t = 0; t < d.L; ++t) {
      const auto qt = detail::reference_row(cview(q)[b][h].ptr(t), d, d.scale);
      std::fill(acc.begin(), acc.end(), 0.0);
      if (md.S) {
        write(s[md.M], shared, t);
        read_into(qt, s[md.M], 1.0);
      }
      const float* logits = router.logits.ptr(b, hr, t);
      mom_select(logits, md.M, md.top_k, sel.data(), unused.data());
      double top = logits[sel[0]], sum = 0;
      for (std::int64_t j = 0; j < md.top_k; ++j) sum += std::exp(static_cast<double>(logits[sel[j]]) - top);
      std::vector<std::int64_t> order(sel);  // ascending memory order, as the fast path adds them
      std::sort(order.begin(), order.end());
      for (std::int64_t m : order) {
        write(s[m], memories[m], t);
        read_into(qt, s[m], std::exp(static_cast<double>(logits[m]) - top) / sum);
      }
      for (std::int64_t c = 0; c < d.Dv; ++c) o(b, h, t, c) = static_cast<float>(acc[c]);
    }
    if (!state.empty())
      for (std::int64_t m = 0; m < slots; ++m) detail::reference_store_state(s[m], d, state[b][h * slots + m]);
  }, opt.threads);
}

}  // namespace reference

// Mixture of Memories; see the header comment. Member: one of mom_members (or a user's own with
// the same members). q and every memory's k, v: float, f16 or bf16 (one type).
template <class Member, class Q, class Arch = simd::default_arch>
void mom(const Q& q,                                                // [B, H, L, Dk]
         std::span<const mom_memory<element_t<Q>>> memories,        // M routed memories
         const mom_memory<element_t<Q>>& shared,                    // the shared memory, or {} (none)
         const mom_router& router,                                  // logits [B, L, M] or [B, H, L, M], top_k
         view<float, 4> o,                                          // [B, H, L, Dv]
         view<float, 4> state = {},                                 // [B, H (M + S), Df, Ds] in and out, or empty
         const options& opt = {}) {
  using T = element_t<Q>;
  const auto md = detail::check_mom<Member, T>("linear::mom", cview(q), memories, shared, router, o, state, opt);
  detail::run_mom<Member, Arch, T>(md, cview(q), memories, shared, router, o, state, opt);
}

// One decoding step: q [B, H, Dk], each memory's k, v [B, H, D] and g, beta [B, H], router [B, M]
// or [B, H, M], o [B, H, Dv]; continues `state` in place.
template <class Member, class Q, class Arch = simd::default_arch>
void mom_step(const Q& q,                                            // [B, H, Dk]
              std::span<const mom_token<element_t<Q>>> memories,      // M routed memories
              const mom_token<element_t<Q>>& shared,                  // the shared memory, or {} (none)
              const mom_token_router& router,                         // logits [B, M] or [B, H, M], top_k
              view<float, 3> o,                                       // [B, H, Dv]
              view<float, 4> state,                                   // [B, H (M + S), Df, Ds] in and out
              options opt = {}) {
  using T = element_t<Q>;
  opt.path = form::recurrent;
  auto lift = [](const mom_token<T>& x) {
    return mom_memory<T>{detail::token_view(x.k), detail::token_view(x.v), detail::token_view(x.g),
                         detail::token_view(x.beta)};
  };
  std::vector<mom_memory<T>> mems;
  mems.reserve(memories.size());
  for (const auto& x : memories) mems.push_back(lift(x));
  mom<Member, view<const T, 4>, Arch>(detail::token_view(cview(q)), std::span<const mom_memory<T>>(mems), lift(shared),
                                      mom_router(router.logits, router.top_k), detail::token_view(o), state, opt);
}

}  // namespace mnemo::linear
