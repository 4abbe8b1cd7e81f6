// mnemo/memory/lamemo.hpp — Look-Ahead Memory (Ji, Zhang, Yang, Hu & Huang, "LaMemo: Language
// Modeling with Look-Ahead Memory", NAACL 2022).
//
// Transformer-XL's memory (memory/segment_recurrence.hpp) keeps the states of past tokens as they
// were computed: each saw only its left context. LaMemo refreshes them: when segment tau + 1
// arrives, every memory token attends to it (its right context, so no mask) and the result is
// interpolated with the memory token's old state, the weights being the normalisers of the two
// attentions. With Z_old = sum over the keys the token has seen so far of exp(s), Z_la the same sum
// over the new segment's keys:
//   o_la  = softmax(scale q_m K_seg^T) V_seg                    look-ahead attention, [M, Dv]
//   alpha = Z_old / (Z_old + Z_la) = sigmoid(lse_old - lse_la)
//   o_m  <- alpha o_m + (1 - alpha) o_la                         memory interpolation
//   lse_m <- log(Z_old + Z_la)
// so after the update o_m is exactly the attention of q_m over everything it has seen, left and
// right (the incremental, linear-cost form of bidirectional attention: M x L scores per segment).
// Then the segment attends over [memory; segment], causal within the segment (bottom-right, as
// Transformer-XL), and its tokens join the memory (the last M of [memory; segment] are kept) with
// their own output and lse as the "old" values of the next look-ahead.
//
// One layer of the kernel. The memory holds, per token, the layer's query, key and value (q_m,
// k_m, v_m: the projections of the memory's hidden states of the layer below) and the layer's
// state o_m with its log-normaliser lse_m. The segment reads k_m, v_m; the refreshed o_m is what the
// caller turns (W_o, residual, FFN) into this layer's memory states, i.e. the memory of the next
// layer: in the paper layer n's segment reads the memory refreshed by layer n - 1. A stacked model
// therefore overwrites queries(), keys() and values() with the projections of the refreshed
// states below before each call (they are mutable views); a single layer keeps its own.
// Left out: the paper's disentangled relative positions (q and k carry absolute positions here)
// and the backward.
//
// API: lamemo_memory (the state, save/load), lamemo_attention (one step: look-ahead refresh, the
// segment's read over [memory; segment], then the write), lamemo_read (the read alone over the
// stored k_m, v_m, no mask).
//
// Shapes: q, k [B, H, L, D], v [B, H, L, Dv], out [B, H, L, Dv]; memory q_m, k_m [B, H, M, D], v_m
// and o_m [B, H, M, Dv], lse_m [B, H, M].
// Paths: reference::lamemo_attention runs both attentions through attention::reference and the
// interpolation in double; the fast path runs attention::flash (lse side output) and the
// interpolation in f32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"
#include "mnemo/memory/segment_recurrence.hpp"

namespace mnemo::memory {

// The last M tokens' q, k, v, state o and log-normaliser lse, oldest first.
class lamemo_memory {
 public:
  lamemo_memory() = default;
  lamemo_memory(std::int64_t B, std::int64_t H, std::int64_t M, std::int64_t D, std::int64_t Dv)
      : q_((mnemo::detail::require(B >= 1 && H >= 1 && M >= 0 && D >= 1 && Dv >= 1,
                                   "lamemo_memory: B, H, D, Dv must be >= 1 and M >= 0, got B=", B, ", H=", H, ", M=", M,
                                   ", D=", D, ", Dv=", Dv),
            shape_t<4>{B, H, M, D})),
        k_({B, H, M, D}),
        v_({B, H, M, Dv}),
        o_({B, H, M, Dv}),
        lse_({B, H, M}) {}

  std::int64_t batch() const { return q_.extent(0); }
  std::int64_t heads() const { return q_.extent(1); }
  std::int64_t capacity() const { return q_.extent(2); }
  std::int64_t size() const { return size_; }
  std::int64_t key_dim() const { return q_.extent(3); }
  std::int64_t value_dim() const { return v_.extent(3); }
  bool empty() const { return q_.extent(0) == 0; }
  void clear() { size_ = 0; }

  view<float, 4> queries() { return q_.as_view().narrow(2, 0, size_); }  // [B, H, size, D]
  view<float, 4> keys() { return k_.as_view().narrow(2, 0, size_); }     // [B, H, size, D]
  view<float, 4> values() { return v_.as_view().narrow(2, 0, size_); }   // [B, H, size, Dv]
  view<const float, 4> queries() const { return q_.as_view().narrow(2, 0, size_); }
  view<const float, 4> keys() const { return k_.as_view().narrow(2, 0, size_); }
  view<const float, 4> values() const { return v_.as_view().narrow(2, 0, size_); }
  view<const float, 4> states() const { return o_.as_view().narrow(2, 0, size_); }           // [B, H, size, Dv]
  view<const float, 3> log_normalizers() const { return lse_.as_view().narrow(2, 0, size_); }  // [B, H, size]

  // <prefix>{q,k,v,o,lse}.npy (the whole capacity), <prefix>config.npy (int64: size).
  void save(const std::string& prefix) const {
    mnemo::detail::require(!empty(), "lamemo_memory::save: the memory is empty");
    npy::save(detail::npy_path(prefix, "q"), q_);
    npy::save(detail::npy_path(prefix, "k"), k_);
    npy::save(detail::npy_path(prefix, "v"), v_);
    npy::save(detail::npy_path(prefix, "o"), o_);
    npy::save(detail::npy_path(prefix, "lse"), lse_);
    detail::save_record(detail::npy_path(prefix, "config"), {size_});
  }
  static lamemo_memory load(const std::string& prefix) {
    constexpr const char* who = "lamemo_memory::load";
    lamemo_memory m;
    m.q_ = npy::load<float, 4>(detail::npy_path(prefix, "q"));
    const std::int64_t B = m.q_.extent(0), H = m.q_.extent(1), M = m.q_.extent(2), D = m.q_.extent(3);
    m.k_ = detail::load_checked<4>(detail::npy_path(prefix, "k"), {B, H, M, D});
    m.v_ = detail::load_rows(who, prefix, "v", B, H, M);
    m.o_ = detail::load_checked<4>(detail::npy_path(prefix, "o"), {B, H, M, m.v_.extent(3)});
    m.lse_ = detail::load_checked<3>(detail::npy_path(prefix, "lse"), {B, H, M});
    m.size_ = detail::load_size(who, prefix, M);
    return m;
  }

 private:
  template <bool Exact>
  friend void lamemo_step(const char*, view<const float, 4>, view<const float, 4>, view<const float, 4>,
                          lamemo_memory&, view<float, 4>, const segment_options&);
  tensor<float, 4> q_, k_, v_, o_;
  tensor<float, 3> lse_;
  std::int64_t size_ = 0;
};

namespace detail {

// o <- alpha o + (1 - alpha) o_la, lse <- log(Z + Z_la) for n rows of one head; T the arithmetic.
template <class T>
void lamemo_interpolate(float* o, std::int64_t ldo, float* lse, const float* o_la, std::int64_t ldl,
                        const float* lse_la, std::int64_t n, std::int64_t Dv) {
  for (std::int64_t t = 0; t < n; ++t) {
    const T a = lse[t], b = lse_la[t], m = std::max(a, b);
    if (m == -std::numeric_limits<T>::infinity()) continue;  // neither attention saw a key: o stays
    const T wa = std::exp(a - m), wb = std::exp(b - m), inv = T(1) / (wa + wb);
    float* row = o + t * ldo;
    const float* la = o_la + t * ldl;
    for (std::int64_t c = 0; c < Dv; ++c) row[c] = static_cast<float>((wa * T(row[c]) + wb * T(la[c])) * inv);
    lse[t] = static_cast<float>(m + std::log(wa + wb));
  }
}

}  // namespace detail

template <bool Exact>
void lamemo_step(const char* fn, view<const float, 4> q, view<const float, 4> k, view<const float, 4> v,
                 lamemo_memory& mem, view<float, 4> out, const segment_options& opt) {
  mnemo::detail::require(!mem.empty(), fn, ": memory is empty (default-constructed)");
  const std::int64_t B = mem.batch(), H = mem.heads(), D = mem.key_dim(), Dv = mem.value_dim(), m = mem.size_;
  const std::int64_t L = detail::check_segment(fn, q, k, v, out, B, H, D, Dv, opt.threads,
                                               " [B, H, L, D] (B, H, D from the memory)");
  detail::check_scale(fn, opt.scale);
  const attention::options ao = detail::attention_options(opt);
  using T = std::conditional_t<Exact, double, float>;

  // 1. Look-ahead: the memory attends to the whole segment, then interpolates.
  if (m > 0 && L > 0) {
    tensor<float, 4> o_la({B, H, m, Dv});
    tensor<float, 3> lse_la({B, H, m});
    detail::attend<Exact, attention::mods::none>(cview(mem.q_).narrow(2, 0, m), k, v, o_la, lse_la, ao);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        detail::lamemo_interpolate<T>(mem.o_.as_view().ptr(b, h), Dv, mem.lse_.as_view().ptr(b, h),
                                      o_la.as_view().ptr(b, h), Dv, lse_la.as_view().ptr(b, h), m, Dv);
  }

  // 2. The segment over [memory; segment], causal within the segment.
  const tensor<float, 4> kc = detail::concat_tokens(cview(mem.k_).narrow(2, 0, m), k),
                         vc = detail::concat_tokens(cview(mem.v_).narrow(2, 0, m), v);
  tensor<float, 3> lse({B, H, L});
  detail::attend<Exact>(q, kc, vc, out, lse, ao);

  // 3. The last M of [memory; segment] stay, with the segment's outputs as their states.
  const std::int64_t total = m + L, kept = std::min(total, mem.capacity()), drop = total - kept;
  const std::int64_t old_kept = std::max<std::int64_t>(m - drop, 0), new_from = L - (kept - old_kept);
  const auto roll = [&](tensor<float, 4>& store, const view<const float, 4>& seg) {
    detail::copy_rows(store, m - old_kept, store, 0, old_kept);
    detail::copy_rows(seg, new_from, store, old_kept, kept - old_kept);
  };
  roll(mem.q_, q);
  roll(mem.k_, k);
  roll(mem.v_, v);
  roll(mem.o_, out);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      float* l = mem.lse_.as_view().ptr(b, h);
      std::copy_n(l + (m - old_kept), old_kept, l);
      std::copy_n(lse.as_view().ptr(b, h) + new_from, kept - old_kept, l + old_kept);
    }
  mem.size_ = kept;
}

namespace reference {

// One LaMemo step (see the header), in double.
inline void lamemo_attention(view<const float, 4> q,  // [B, H, L, D]
                             view<const float, 4> k,  // [B, H, L, D]
                             view<const float, 4> v,  // [B, H, L, Dv]
                             lamemo_memory& memory,   // in and out
                             view<float, 4> out,      // [B, H, L, Dv]
                             const segment_options& opt = {}) {
  lamemo_step<true>("memory::reference::lamemo_attention", q, k, v, memory, out, opt);
}

// The read alone: attention of q over the memory's keys and values, no mask (the memory does
// not change). In double.
inline void lamemo_read(view<const float, 4> q,  // [B, H, Lq, D]
                        const lamemo_memory& memory,
                        view<float, 4> out,  // [B, H, Lq, Dv]
                        const segment_options& opt = {}) {
  mnemo::detail::require(!memory.empty(), "memory::reference::lamemo_read: memory is empty (default-constructed)");
  detail::memory_read<true>("memory::reference::lamemo_read", q, memory.keys(), memory.values(), out, opt);
}

}  // namespace reference

// The read alone (attention::flash); same contract as reference::lamemo_read.
inline void lamemo_read(view<const float, 4> q,  // [B, H, Lq, D]
                        const lamemo_memory& memory,
                        view<float, 4> out,  // [B, H, Lq, Dv]
                        const segment_options& opt = {}) {
  mnemo::detail::require(!memory.empty(), "memory::lamemo_read: memory is empty (default-constructed)");
  detail::memory_read<false>("memory::lamemo_read", q, memory.keys(), memory.values(), out, opt);
}

// One LaMemo step (attention::flash); same contract as reference::lamemo_attention.
inline void lamemo_attention(view<const float, 4> q,  // [B, H, L, D]
                             view<const float, 4> k,  // [B, H, L, D]
                             view<const float, 4> v,  // [B, H, L, Dv]
                             lamemo_memory& memory,   // in and out
                             view<float, 4> out,      // [B, H, L, Dv]
                             const segment_options& opt = {}) {
  lamemo_step<false>("memory::lamemo_attention", q, k, v, memory, out, opt);
}

}  // namespace mnemo::memory
