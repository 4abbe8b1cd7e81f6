// mnemo/memory/reactive.hpp — the short-term memory (STM) of the Reactive Transformer (Filipek,
// "Reactive Transformer (RxT) — Stateful Real-Time Processing for Event-Driven Reactive Language
// Models", 2025).
//
// RxT handles a conversation one interaction at a time. The decoder generates the answer Y_t to
// the query X_t reading a fixed-size STM of S slots [S, D] (memory cross-attention); afterwards,
// asynchronously, the memory encoder encodes concat(X_t, Y_t) into ED_t [L, D] and the memory
// attention network writes it into the STM:
//   Read (memory cross-attention): the decoder's hidden states query the slots,
//     r = CrossAttn_read(x, STM_{t-1})           Q = x Wq, K = STM Wk, V = STM Wv (memformer.hpp)
//   The STM is a set of slots, not a sequence: no positions enter here.
//   Write (simple memory attention with a gated residual):
//     Update = CrossAttn_write(STM_{t-1}, ED_t)  the slots are the queries, ED keys and values
//     G      = sigmoid((STM_{t-1} + Update) W_g + b_g)
//     STM_t  = (1 - G) * STM_{t-1} + G * Update
// The paper's variants that put a memory self-attention or an inter-layer attention before this
// step, and the norms around it, belong to the caller's network; this header is the step itself.
//
// Shapes: x, r [B, L, D]; ED [B, L_ed, D]; stm [B, S, D] (the state, owned by the caller,
// updated in place by rxt_write); every weight [D, D], b_g [D] or empty (0).
// Paths: reference:: in double; the fast path: Eigen GEMMs and attention::flash, f32.
// examples/18_reactive_memory.cpp runs a few interactions through both.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"
#include "mnemo/memory/memformer.hpp"  // attention_projections, cross_attention
#include "mnemo/simd/math.hpp"

namespace mnemo::memory {

struct rxt_options {
  std::int64_t heads = 1;  // H, divides D
  int threads = 0;         // 0: the OpenMP default
};

struct rxt_weights {
  attention_projections read = {};   // memory cross-attention: the decoder queries the STM
  attention_projections write = {};  // memory attention: the STM queries ED
  view<const float, 2> w_gate = {};  // [D, D] residual gate W_g
  view<const float, 1> b_gate = {};  // [D] residual gate bias b_g, or empty (0)
};

namespace detail {

inline void check_rxt(const char* fn, const view<const float, 3>& x, const view<const float, 3>& stm,
                      const rxt_weights& w, const rxt_options& opt, bool write) {
  const std::int64_t B = stm.extent(0), S = stm.extent(1), D = stm.extent(2);
  mnemo::detail::require(B >= 1 && S >= 1 && D >= 1, fn, ": stm must have shape [B, S, D] with B, S, D >= 1, got ",
                         shape_string(stm.shape()));
  mnemo::detail::require(x.extent(0) == B && x.extent(1) >= 1 && x.extent(2) == D, fn,
                         write ? ": ed must have shape [" : ": x must have shape [", B, ", L >= 1, ", D,
                         "] (B, D from stm), got ", shape_string(x.shape()));
  check_heads(fn, D, opt.heads);
  if (write) {
    check_projections(fn, "weights.write", w.write, D);
    check_square(fn, "weights.w_gate", w.w_gate, D);
    if (!w.b_gate.empty()) mnemo::detail::require_shape(fn, "weights.b_gate", w.b_gate, {D}, " [D]");
  } else {
    check_projections(fn, "weights.read", w.read, D);
  }
  check_threads(fn, opt.threads);
}

}  // namespace detail

namespace reference {

// r = CrossAttn_read(x, stm), in double.
inline void rxt_read(view<const float, 3> x,    // [B, L, D] decoder hidden states
                     view<const float, 3> stm,  // [B, S, D]
                     const rxt_weights& w,
                     view<float, 3> out,  // [B, L, D]
                     const rxt_options& opt = {}) {
  constexpr const char* fn = "memory::reference::rxt_read";
  detail::check_rxt(fn, x, stm, w, opt, false);
  mnemo::detail::require_shape(fn, "out", out, x.shape(), " [B, L, D]");
  cross_attention(x, stm, w.read, out, opt.heads, opt.threads);
}

// STM <- (1 - G) STM + G Update (see the header), in double; stm in place.
inline void rxt_write(view<const float, 3> ed,  // [B, L_ed, D] the encoded interaction
                      view<float, 3> stm,       // [B, S, D] in and out
                      const rxt_weights& w, const rxt_options& opt = {}) {
  detail::check_rxt("memory::reference::rxt_write", ed, stm, w, opt, true);
  const std::int64_t S = stm.extent(1), D = stm.extent(2);
  parallel_for(stm.extent(0), [&](std::int64_t b) {
    const detail::dmatrix u = detail::ref_cross_attention(stm, ed, b, w.write, opt.heads);  // Update [S, D]
    detail::dmatrix sum = detail::to_double(stm, b);
    for (std::int64_t i = 0; i < S * D; ++i) sum[i] += u[i];
    const detail::dmatrix a = detail::ref_matmul(sum, S, w.w_gate);
    for (std::int64_t i = 0; i < S; ++i)
      for (std::int64_t c = 0; c < D; ++c) {
        const double g = detail::ref_sigmoid(a[i * D + c] + (w.b_gate.empty() ? 0.0 : w.b_gate(c)));
        stm(b, i, c) = static_cast<float>((1 - g) * stm(b, i, c) + g * u[i * D + c]);
      }
  }, opt.threads);
}

}  // namespace reference

// r = CrossAttn_read(x, stm) (f32: GEMMs and flash); same contract as reference::rxt_read.
template <class Arch = simd::default_arch>
void rxt_read(view<const float, 3> x,    // [B, L, D] decoder hidden states
              view<const float, 3> stm,  // [B, S, D]
              const rxt_weights& w,
              view<float, 3> out,  // [B, L, D]
              const rxt_options& opt = {}) {
  constexpr const char* fn = "memory::rxt_read";
  detail::check_rxt(fn, x, stm, w, opt, false);
  mnemo::detail::require_shape(fn, "out", out, x.shape(), " [B, L, D]");
  cross_attention<Arch>(x, stm, w.read, out, opt.heads, opt.threads);
}

// The gated memory-attention write (f32: GEMMs and flash); same contract as reference::rxt_write.
template <class Arch = simd::default_arch>
void rxt_write(view<const float, 3> ed,  // [B, L_ed, D] the encoded interaction
               view<float, 3> stm,       // [B, S, D] in and out
               const rxt_weights& w, const rxt_options& opt = {}) {
  detail::check_rxt("memory::rxt_write", ed, stm, w, opt, true);
  const std::int64_t B = stm.extent(0), S = stm.extent(1), D = stm.extent(2);
  tensor<float, 3> u({B, S, D}), sum({B, S, D}), a({B, S, D});
  cross_attention<Arch>(view<const float, 3>(stm), ed, w.write, u, opt.heads, opt.threads);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < S; ++i) {
      const float* m = stm.ptr(b, i);
      const float* ui = u.data() + (b * S + i) * D;
      float* si = sum.data() + (b * S + i) * D;
      for (std::int64_t c = 0; c < D; ++c) si[c] = m[c] + ui[c];
    }
  detail::project_rows(cview(sum), w.w_gate, a, opt.threads);
  parallel_for(B * S, [&](std::int64_t bi) {
    float* m = stm.ptr(bi / S, bi % S);
    const float *ui = u.data() + bi * D, *ai = a.data() + bi * D;
    for (std::int64_t c = 0; c < D; ++c) {
      const float g = detail::sigmoid<Arch>(ai[c] + (w.b_gate.empty() ? 0.0f : w.b_gate(c)));
      m[c] += g * (ui[c] - m[c]);  // (1 - G) STM + G Update
    }
  }, opt.threads);
}

}  // namespace mnemo::memory
