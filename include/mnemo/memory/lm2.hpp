// mnemo/memory/lm2.hpp — the memory module of LM2 (Kang, Wu, Christianos, Chan, Greenlee,
// Thomas, Purtorab & Toulis, "LM2: Large Memory Models", arXiv:2502.06049, 2025).
//
// A memory bank M_t [S, D] of S slots sits beside each decoder block.
//   Read (memory information flow): the input embeddings E [L, D] query the bank,
//     E_mem = CrossAttn_read(E, M_t)              Q = E Wq, K = M_t Wk, V = M_t Wv (memformer.hpp)
//     g_out = sigmoid(E_mem W_out)                the output gate
//     out   = g_out * E_mem                       what the block adds to its residual stream
//   Write (memory update), LSTM-like:
//     g_in     = sigmoid(E W_in)                  how much new information enters
//     g_forget = sigmoid(E_mem W_forget)          how much of the old memory stays
//     M_{t+1}  = g_in * tanh(E_mem) + g_forget * M_t
//
// Indexing of the write. The paper writes the update with token-indexed E and E_mem against the
// slot-indexed M_t. Here every term of the write is indexed by slot i:
//   E_mem,i = CrossAttn_write(m_i, E)             slot i attends over the segment's tokens (the
//                                                 memory's output for the segment, per slot)
//   g_in    = sigmoid(mean_t(E_t) W_in)           the input gate from the segment's input (one
//                                                 vector per sequence, the same for every slot)
//   g_forget,i = sigmoid(E_mem,i W_forget)
//   m_i <- g_in * tanh(E_mem,i) + g_forget,i * m_i
// so the candidate and the forget gate differ per slot (what slot i read), and the input gate
// follows the input, as in the paper. The gates have no biases (the paper writes none).
//
// Shapes: E [B, L, D], memory [B, S, D] (the state, owned by the caller, updated in place by
// lm2_write), out [B, L, D]; every weight [D, D].
// Paths: reference:: in double; the fast path: Eigen GEMMs for the projections and gates,
// attention::flash for the cross-attention, f32.
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

struct lm2_options {
  std::int64_t heads = 1;  // H, divides D
  int threads = 0;         // 0: the OpenMP default
};

struct lm2_weights {
  attention_projections read = {};   // E queries the bank (keys and values from the memory)
  view<const float, 2> w_out = {};   // [D, D] output gate
  attention_projections write = {};  // the slots query the segment (the write's E_mem per slot)
  view<const float, 2> w_in = {};      // [D, D] input gate
  view<const float, 2> w_forget = {};  // [D, D] forget gate
};

namespace detail {

inline void check_lm2(const char* fn, const view<const float, 3>& x, const view<const float, 3>& memory,
                      const lm2_weights& w, const lm2_options& opt, bool write) {
  const std::int64_t B = memory.extent(0), S = memory.extent(1), D = memory.extent(2);
  mnemo::detail::require(B >= 1 && S >= 1 && D >= 1, fn, ": memory must have shape [B, S, D] with B, S, D >= 1, got ",
                         shape_string(memory.shape()));
  mnemo::detail::require(x.extent(0) == B && x.extent(1) >= 1 && x.extent(2) == D, fn, ": x must have shape [", B,
                         ", L >= 1, ", D, "] (B, D from memory), got ", shape_string(x.shape()));
  check_heads(fn, D, opt.heads);
  if (write) {
    check_projections(fn, "weights.write", w.write, D);
    check_square(fn, "weights.w_in", w.w_in, D);
    check_square(fn, "weights.w_forget", w.w_forget, D);
  } else {
    check_projections(fn, "weights.read", w.read, D);
    check_square(fn, "weights.w_out", w.w_out, D);
  }
  check_threads(fn, opt.threads);
}

}  // namespace detail

namespace reference {

// out = sigmoid(E_mem W_out) * E_mem with E_mem = CrossAttn_read(x, memory), in double.
inline void lm2_read(view<const float, 3> x,       // [B, L, D]
                     view<const float, 3> memory,  // [B, S, D]
                     const lm2_weights& w,
                     view<float, 3> out,  // [B, L, D]
                     const lm2_options& opt = {}) {
  constexpr const char* fn = "memory::reference::lm2_read";
  detail::check_lm2(fn, x, memory, w, opt, false);
  mnemo::detail::require_shape(fn, "out", out, x.shape(), " [B, L, D]");
  const std::int64_t L = x.extent(1), D = x.extent(2);
  parallel_for(x.extent(0), [&](std::int64_t b) {
    detail::dmatrix e = detail::ref_cross_attention(x, memory, b, w.read, opt.heads);
    const detail::dmatrix g = detail::ref_matmul(e, L, w.w_out);
    for (std::int64_t i = 0; i < L * D; ++i) e[i] *= detail::ref_sigmoid(g[i]);
    detail::store_item(e, out, b);
  }, opt.threads);
}

// M <- g_in * tanh(E_mem) + g_forget * M (per slot, see the header), in double; memory in place.
inline void lm2_write(view<const float, 3> x,  // [B, L, D] the segment's input E
                      view<float, 3> memory,   // [B, S, D] in and out
                      const lm2_weights& w, const lm2_options& opt = {}) {
  detail::check_lm2("memory::reference::lm2_write", x, memory, w, opt, true);
  const std::int64_t S = memory.extent(1), L = x.extent(1), D = memory.extent(2);
  parallel_for(memory.extent(0), [&](std::int64_t b) {
    const detail::dmatrix e = detail::ref_cross_attention(memory, x, b, w.write, opt.heads);  // [S, D]
    const detail::dmatrix gf = detail::ref_matmul(e, S, w.w_forget);
    detail::dmatrix mean(static_cast<std::size_t>(D), 0.0);
    for (std::int64_t t = 0; t < L; ++t)
      for (std::int64_t c = 0; c < D; ++c) mean[c] += x(b, t, c) / static_cast<double>(L);
    const detail::dmatrix gi = detail::ref_matmul(mean, 1, w.w_in);
    for (std::int64_t i = 0; i < S; ++i)
      for (std::int64_t c = 0; c < D; ++c)
        memory(b, i, c) = static_cast<float>(detail::ref_sigmoid(gi[c]) * std::tanh(e[i * D + c]) +
                                             detail::ref_sigmoid(gf[i * D + c]) * memory(b, i, c));
  }, opt.threads);
}

}  // namespace reference

// The gated read (f32: GEMMs and flash); same contract as reference::lm2_read.
template <class Arch = simd::default_arch>
void lm2_read(view<const float, 3> x,       // [B, L, D]
              view<const float, 3> memory,  // [B, S, D]
              const lm2_weights& w,
              view<float, 3> out,  // [B, L, D]
              const lm2_options& opt = {}) {
  constexpr const char* fn = "memory::lm2_read";
  detail::check_lm2(fn, x, memory, w, opt, false);
  mnemo::detail::require_shape(fn, "out", out, x.shape(), " [B, L, D]");
  const std::int64_t B = x.extent(0), L = x.extent(1), D = x.extent(2);
  tensor<float, 3> e({B, L, D});
  cross_attention<Arch>(x, memory, w.read, e, opt.heads, opt.threads);
  detail::project_rows(cview(e), w.w_out, out, opt.threads);  // out = E_mem W_out, gated below
  parallel_for(B * L, [&](std::int64_t bt) {
    const std::int64_t b = bt / L, t = bt % L;
    float* o = out.ptr(b, t);
    const float* ev = e.data() + bt * D;
    for (std::int64_t c = 0; c < D; ++c) o[c] = detail::sigmoid<Arch>(o[c]) * ev[c];
  }, opt.threads);
}

// The gated write (f32: GEMMs and flash); same contract as reference::lm2_write.
template <class Arch = simd::default_arch>
void lm2_write(view<const float, 3> x,  // [B, L, D] the segment's input E
               view<float, 3> memory,   // [B, S, D] in and out
               const lm2_weights& w, const lm2_options& opt = {}) {
  detail::check_lm2("memory::lm2_write", x, memory, w, opt, true);
  const std::int64_t B = memory.extent(0), S = memory.extent(1), L = x.extent(1), D = memory.extent(2);
  tensor<float, 3> e({B, S, D}), gf({B, S, D}), mean({B, 1, D}), gi({B, 1, D});
  cross_attention<Arch>(view<const float, 3>(memory), x, w.write, e, opt.heads, opt.threads);
  detail::project_rows(cview(e), w.w_forget, gf, opt.threads);
  for (std::int64_t b = 0; b < B; ++b) {
    float* mb = mean.data() + b * D;
    std::fill_n(mb, D, 0.0f);
    for (std::int64_t t = 0; t < L; ++t) {
      const float* xt = x.ptr(b, t);
      for (std::int64_t c = 0; c < D; ++c) mb[c] += xt[c];
    }
    for (std::int64_t c = 0; c < D; ++c) mb[c] /= static_cast<float>(L);
  }
  detail::project_rows(cview(mean), w.w_in, gi, opt.threads);
  parallel_for(B * S, [&](std::int64_t bi) {
    const std::int64_t b = bi / S;
    float* m = memory.ptr(b, bi % S);
    const float *ev = e.data() + bi * D, *f = gf.data() + bi * D, *g = gi.data() + b * D;
    for (std::int64_t c = 0; c < D; ++c)
      m[c] = detail::sigmoid<Arch>(g[c]) * std::tanh(ev[c]) + detail::sigmoid<Arch>(f[c]) * m[c];
  }, opt.threads);
}

}  // namespace mnemo::memory
