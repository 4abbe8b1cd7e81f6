// mnemo/memory/titans_variants.hpp — the three ways Titans (Behrouz, Zhong & Mirrokni, "Titans:
// Learning to Memorize at Test Time", 2024, sec. 4) composes its neural memory with attention.
// The projections (W_Q, W_K, W_V, gates) belong to the caller's model; these helpers do the parts
// that are the same in every model, on the library's tensor conventions.
//
// Memory as a Context (MAC, sec. 4.1). A segment's queries attend to the concatenation
//   [persistent tokens (Np, learned, shared by the batch); retrieved memory h = M*(q) (Lm); segment (Ls)]
// with the persistent and memory tokens fully visible and a causal mask inside the segment. This
// is exactly the library's bottom-right causal mask with Lk = Np + Lm + Ls: query row i sits at key
// position Np + Lm + i. mac_attention builds the concatenated K/V once and runs attention on it.
//
// Memory as a Gate (MAG, sec. 4.2). A sliding-window attention branch and the memory branch
// M(x) run side by side and are mixed elementwise:
//   out = sigmoid(g) o attn + (1 - sigmoid(g)) o mem
// with gate logits g from the caller (the paper leaves the gate's form to "normalisation and a
// non-linearity"; a convex sigmoid gate is the common reading, as in Memorizing Transformers).
//
// Memory as a Layer (MAL, sec. 4.3). The memory is a layer before the attention:
//   y = M(x) (update and read, neural_memory),  out = SW-Attn(project(y)).
// memory_as_layer runs the memory, hands y to the caller's projection, and runs the sliding-window
// attention on its result.
//
// heads_view reads a [B, L, H * Dh] buffer as [B, H, L, Dh] through strides, without a copy, so the
// memory's [B, L, D] tensors and attention's [B, H, L, Dh] tensors are the same storage.
//
// Attention path: attention::flash by default, attention::reference with variant_options::reference
// = true (the one switch to check a surprising result).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/neural_memory.hpp"

namespace mnemo::memory {

struct variant_options {
  float scale = 0;         // attention scale; 0: 1 / sqrt(Dh)
  int threads = 0;         // 0: the OpenMP default
  bool reference = false;  // attention::reference instead of attention::flash
};

// x [B, L, H * Dh] as [B, H, L, Dh] (strides only). T may be const.
template <class T>
view<T, 4> heads_view(view<T, 3> x, std::int64_t H) {
  const std::int64_t B = x.extent(0), L = x.extent(1), D = x.extent(2);
  mnemo::detail::require(H >= 1 && D % H == 0, "memory::heads_view: H must be >= 1 and divide x.shape[2] = ", D,
                         ", got H=", H);
  return view<T, 4>(x.data(), {B, H, L, D / H}, {x.stride(0), D / H, x.stride(1), 1});
}

namespace detail {

template <class Mod>
void run_attention(view<const float, 4> q, view<const float, 4> k, view<const float, 4> v, view<float, 4> out,
                   view<float, 3> lse, const Mod& mod, const variant_options& opt) {
  const attention::options ao{.scale = opt.scale, .threads = opt.threads};
  if (opt.reference) attention::reference(q, k, v, out, lse, mod, ao);
  else attention::flash(q, k, v, out, lse, mod, ao);
}

}  // namespace detail

// MAC: the segment's queries over [persistent; memory; segment] keys, causal inside the segment.
inline void mac_attention(view<const float, 4> q,             // [B, H, Ls, D]
                          view<const float, 4> k,             // [B, H, Ls, D]   the segment's keys
                          view<const float, 4> v,             // [B, H, Ls, Dv]
                          view<const float, 3> persistent_k,  // [H, Np, D]      shared by the batch
                          view<const float, 3> persistent_v,  // [H, Np, Dv]
                          view<const float, 4> memory_k,      // [B, H, Lm, D]   projections of h = M*(q)
                          view<const float, 4> memory_v,      // [B, H, Lm, Dv]
                          view<float, 4> out,                 // [B, H, Ls, Dv]
                          view<float, 3> lse = {},            // [B, H, Ls] or empty
                          const variant_options& opt = {}) {
  constexpr const char* fn = "memory::mac_attention";
  const std::int64_t B = q.extent(0), H = q.extent(1), Ls = q.extent(2), D = q.extent(3), Dv = v.extent(3);
  const std::int64_t Np = persistent_k.extent(1), Lm = memory_k.extent(2);
  mnemo::detail::require_shape(fn, "k", k, {B, H, Ls, D}, " [B, H, Ls, D] (from q)");
  mnemo::detail::require_shape(fn, "v", v, {B, H, Ls, Dv}, " [B, H, Ls, Dv]");
  mnemo::detail::require_shape(fn, "persistent_k", persistent_k, {H, Np, D}, " [H, Np, D]");
  mnemo::detail::require_shape(fn, "persistent_v", persistent_v, {H, Np, Dv}, " [H, Np, Dv]");
  mnemo::detail::require_shape(fn, "memory_k", memory_k, {B, H, Lm, D}, " [B, H, Lm, D]");
  mnemo::detail::require_shape(fn, "memory_v", memory_v, {B, H, Lm, Dv}, " [B, H, Lm, Dv]");
  const std::int64_t Lk = Np + Lm + Ls;
  tensor<float, 4> kc({B, H, Lk, D}), vc({B, H, Lk, Dv});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t j = 0; j < Lk; ++j) {
        const float *ks, *vs;
        if (j < Np) {
          ks = persistent_k.ptr(h, j);
          vs = persistent_v.ptr(h, j);
        } else if (j < Np + Lm) {
          ks = memory_k.ptr(b, h, j - Np);
          vs = memory_v.ptr(b, h, j - Np);
        } else {
          ks = k.ptr(b, h, j - Np - Lm);
          vs = v.ptr(b, h, j - Np - Lm);
        }
        std::copy(ks, ks + D, &kc(b, h, j, 0));
        std::copy(vs, vs + Dv, &vc(b, h, j, 0));
      }
    }
  detail::run_attention(q, kc, vc, out, lse, attention::mods::causal{}, opt);
}

// MAG mixing: out = sigmoid(gate) o attn + (1 - sigmoid(gate)) o mem, elementwise. out may be
// the same view as attn or mem.
inline void mag_combine(view<const float, 4> attn,  // [B, H, L, Dv]
                        view<const float, 4> mem,   // [B, H, L, Dv]
                        view<const float, 4> gate,  // [B, H, L, Dv] logits
                        view<float, 4> out)         // [B, H, L, Dv]
{
  constexpr const char* fn = "memory::mag_combine";
  const shape_t<4> s = attn.shape();
  mnemo::detail::require_shape<const float, 4>(fn, "mem", mem, s, " [B, H, L, Dv] (from attn)");
  mnemo::detail::require_shape<const float, 4>(fn, "gate", gate, s, " [B, H, L, Dv] (from attn)");
  mnemo::detail::require_shape<float, 4>(fn, "out", out, s, " [B, H, L, Dv] (from attn)");
  for (std::int64_t b = 0; b < s[0]; ++b)
    for (std::int64_t h = 0; h < s[1]; ++h)
      for (std::int64_t t = 0; t < s[2]; ++t) {
        const float *a = attn.ptr(b, h, t), *m = mem.ptr(b, h, t), *g = gate.ptr(b, h, t);
        float* o = out.ptr(b, h, t);
        for (std::int64_t c = 0; c < s[3]; ++c) {
          const float w = 1.0f / (1.0f + std::exp(-g[c]));
          o[c] = w * a[c] + (1.0f - w) * m[c];
        }
      }
}

// MAG: sliding-window causal attention of `window` keys, mixed with the memory branch's output.
inline void memory_as_gate(view<const float, 4> q,        // [B, H, L, D]
                           view<const float, 4> k,        // [B, H, L, D]
                           view<const float, 4> v,        // [B, H, L, Dv]
                           std::int64_t window,
                           view<const float, 4> mem_out,  // [B, H, L, Dv]  M(x) in heads layout
                           view<const float, 4> gate,     // [B, H, L, Dv]  logits
                           view<float, 4> out,            // [B, H, L, Dv]
                           const variant_options& opt = {}) {
  detail::run_attention(q, k, v, out, {}, attention::mods::sliding_window{window}, opt);
  mag_combine(out, mem_out, gate, out);
}

// MAL: y = M(x) through the neural memory (update and read), then
// project(view<const float, 3> y [B, L, D], view<float, 4> aq, ak [B, H, L, Dh], av [B, H, L, Dv])
// fills the attention inputs, and out = sliding-window attention of `window` keys.
template <class Project>
void memory_as_layer(view<const float, 3> q, view<const float, 3> k, view<const float, 3> v,  // [B, L, D] memory inputs
                     view<const float, 2> theta, view<const float, 2> eta, view<const float, 2> alpha,  // [B, L]
                     neural_memory_state& state,
                     Project&& project,
                     std::int64_t H, std::int64_t Dh, std::int64_t Dv, std::int64_t window,
                     view<float, 4> out,  // [B, H, L, Dv]
                     const neural_memory_options& memory_opt = {}, const variant_options& opt = {}) {
  constexpr const char* fn = "memory::memory_as_layer";
  const std::int64_t B = q.extent(0), L = q.extent(1), D = q.extent(2);
  mnemo::detail::require(H >= 1 && Dh >= 1 && Dv >= 1, fn, ": H, Dh, Dv must be >= 1, got H=", H, ", Dh=", Dh,
                         ", Dv=", Dv);
  mnemo::detail::require_shape(fn, "out", out, {B, H, L, Dv}, " [B, H, L, Dv]");
  tensor<float, 3> y({B, L, D});
  if (opt.reference) reference::neural_memory(q, k, v, theta, eta, alpha, state, y, memory_opt);
  else neural_memory(q, k, v, theta, eta, alpha, state, y, memory_opt);
  tensor<float, 4> aq({B, H, L, Dh}), ak({B, H, L, Dh}), av({B, H, L, Dv});
  project(view<const float, 3>(y.as_view()), aq.as_view(), ak.as_view(), av.as_view());
  detail::run_attention(aq, ak, av, out, {}, attention::mods::sliding_window{window}, opt);
}

}  // namespace mnemo::memory
