// mnemo/memory/camelot.hpp — CAMELoT's consolidated associative memory (He et al., "CAMELoT:
// Towards Large Language Models with Training-Free Consolidated Associative Memory", 2024).
//
// A memory of S slots per (batch, head): keys K_j, values V_j, counts c_j (how many pairs a slot
// has absorbed) and a last-use time tau_j. Pairs (k_t, v_t) arrive one at a time (the clock t
// counts every pair ever written); each is either consolidated into its nearest slot or stored:
//   j*  = argmax_j sim(k_t, K_j),  sim(a, b) = a . b / (|a| |b|)   (cosine; ties: the lower slot;
//                                                                   0 when a norm is 0)
//   consolidation  (sim(k_t, K_j*) >= threshold):                   running means
//     K_j* = (c K_j* + k_t) / (c + 1),  V_j* = (c V_j* + v_t) / (c + 1),  c_j* = c + 1, tau_j* = t
//   novelty        (below the threshold, or an empty memory):  a new slot (K, V, c, tau) = (k_t, v_t, 1, t)
//                  in the first free slot, or, when all S are used, in place of the least
//                  recently used one (argmin_j tau_j, ties: the lower slot): recency-based replacement.
// The read is attention over the n <= S filled slots:
//   out_i = sum_j softmax_j(scale q_i . K_j) V_j,   lse_i = log sum_j exp(scale q_i . K_j)
// (lse so that attention::merge can join it with a local window exactly, as CAMELoT
// concatenates memory and context). An empty memory reads out = 0, lse = -inf. Reads do not
// refresh tau (only writes do).
//
// Shapes: keys [B, H, S, D], values [B, H, S, Dv], counts and last_used [B, H, S] (int64);
// write k [B, H, L, D], v [B, H, L, Dv]; read q [B, H, Lq, D], out [B, H, Lq, Dv], lse [B, H, Lq].
// Paths: reference::camelot_write scores every slot in double per pair; the fast write scores a
// block of pairs against the slots as they were at the block's start with one GEMM, then walks
// the block in order, rescoring directly (f32 dots) only the slots the block has changed so far,
// so the decisions are the reference's wherever a similarity is not within f32 rounding of the
// threshold or of another slot's. reference::camelot_read is attention::reference (double); the
// fast read is attention::flash.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"

namespace mnemo::memory {

struct camelot_options {
  float threshold = 0.9f;  // consolidate when the nearest slot's cosine similarity is >= this; in [-1, 1], or > 1: never
  float scale = 0;         // read: 0 is 1 / sqrt(D)
  int threads = 0;         // 0: the OpenMP default
};

class camelot_memory {
 public:
  camelot_memory() = default;
  camelot_memory(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t D, std::int64_t Dv)
      : k_({B, H, S, D}), v_({B, H, S, Dv}), count_({B, H, S}), used_({B, H, S}),
        size_(static_cast<std::size_t>(std::max<std::int64_t>(0, B * H)), 0) {
    mnemo::detail::require(B >= 1 && H >= 1 && S >= 1 && D >= 1 && Dv >= 1,
                           "camelot_memory: B, H, S, D, Dv must be >= 1, got B=", B, ", H=", H, ", S=", S, ", D=", D,
                           ", Dv=", Dv);
  }

  std::int64_t batch() const { return k_.extent(0); }
  std::int64_t heads() const { return k_.extent(1); }
  std::int64_t slots() const { return k_.extent(2); }
  std::int64_t key_dim() const { return k_.extent(3); }
  std::int64_t value_dim() const { return v_.extent(3); }
  bool empty() const { return k_.size() == 0; }
  std::int64_t size(std::int64_t b, std::int64_t h) const { return size_.at(static_cast<std::size_t>(b * heads() + h)); }
  std::int64_t clock() const { return clock_; }  // pairs written per (b, h) so far

  view<const float, 4> keys() const { return k_; }                  // [B, H, S, D]
  view<const float, 4> values() const { return v_; }                // [B, H, S, Dv]
  view<const std::int64_t, 3> counts() const { return count_; }     // [B, H, S]
  view<const std::int64_t, 3> last_used() const { return used_; }   // [B, H, S]

  void clear() {
    std::fill(size_.begin(), size_.end(), 0);
    clock_ = 0;
  }

  // For the write paths: the mutable state of one (b, h).
  struct slot_state {
    float* k;
    float* v;
    std::int64_t* count;
    std::int64_t* used;
    std::int64_t& size;
  };
  slot_state state(std::int64_t b, std::int64_t h) {
    return {k_.as_view().ptr(b, h), v_.as_view().ptr(b, h), count_.as_view().ptr(b, h), used_.as_view().ptr(b, h),
            size_[static_cast<std::size_t>(b * heads() + h)]};
  }
  void advance_clock(std::int64_t n) { clock_ += n; }

  // <prefix>keys.npy, values.npy, counts.npy, last_used.npy (int64), sizes.npy (int64 [B H]),
  // clock.npy (int64 [1]).
  void save(const std::string& prefix) const {
    mnemo::detail::require(!empty(), "camelot_memory::save: the memory is empty");
    npy::save(detail::npy_path(prefix, "keys"), k_);
    npy::save(detail::npy_path(prefix, "values"), v_);
    npy::save(detail::npy_path(prefix, "counts"), count_);
    npy::save(detail::npy_path(prefix, "last_used"), used_);
    detail::save_record(detail::npy_path(prefix, "sizes"), size_);
    detail::save_record(detail::npy_path(prefix, "clock"), {clock_});
  }
  static camelot_memory load(const std::string& prefix) {
    const tensor<float, 4> k = npy::load<float, 4>(detail::npy_path(prefix, "keys"));
    const shape_t<4> s = k.shape();
    const tensor<float, 4> v = npy::load<float, 4>(detail::npy_path(prefix, "values"));
    mnemo::detail::require(v.extent(0) == s[0] && v.extent(1) == s[1] && v.extent(2) == s[2], "camelot_memory::load: ",
                           prefix, "values.npy: expected [B, H, S] = ", shape_string(shape_t<3>{s[0], s[1], s[2]}),
                           " as in keys.npy, got ", shape_string(v.shape()));
    camelot_memory m(s[0], s[1], s[2], s[3], v.extent(3));
    m.k_ = k;
    m.v_ = v;
    for (auto [name, dst] : {std::pair{"counts", &m.count_}, std::pair{"last_used", &m.used_}}) {
      *dst = npy::load<std::int64_t, 3>(detail::npy_path(prefix, name));
      mnemo::detail::require(dst->shape() == shape_t<3>{s[0], s[1], s[2]}, "camelot_memory::load: ", prefix, name,
                             ".npy: expected shape ", shape_string(shape_t<3>{s[0], s[1], s[2]}), ", got ",
                             shape_string(dst->shape()));
    }
    m.size_ = detail::load_record(detail::npy_path(prefix, "sizes"), s[0] * s[1]);
    for (std::int64_t n : m.size_)
      mnemo::detail::require(n >= 0 && n <= s[2], "camelot_memory::load: ", prefix, "sizes.npy: every size must be in [0, S = ",
                             s[2], "], got ", n);
    m.clock_ = detail::load_record(detail::npy_path(prefix, "clock"), 1)[0];
    return m;
  }

 private:
  tensor<float, 4> k_, v_;
  tensor<std::int64_t, 3> count_, used_;
  std::vector<std::int64_t> size_;  // [B * H] filled slots
  std::int64_t clock_ = 0;
};

namespace detail {

inline void check_camelot_write(const char* fn, const view<const float, 4>& k, const view<const float, 4>& v,
                                const camelot_memory& mem, const camelot_options& opt) {
  mnemo::detail::require(!mem.empty(), fn, ": the memory is empty (default-constructed)");
  const std::int64_t B = mem.batch(), H = mem.heads(), L = k.extent(2);
  mnemo::detail::require_shape(fn, "k", k, {B, H, L, mem.key_dim()}, " [B, H, L, D] (B, H, D from the memory)");
  mnemo::detail::require_shape(fn, "v", v, {B, H, L, mem.value_dim()}, " [B, H, L, Dv]");
  mnemo::detail::require(!std::isnan(opt.threshold), fn, ": options.threshold must not be NaN");
  check_threads(fn, opt.threads);
}

inline attention::options check_camelot_read(const char* fn, const view<const float, 4>& q, const camelot_memory& mem,
                                             const view<float, 4>& out, const view<float, 3>& lse,
                                             const camelot_options& opt) {
  mnemo::detail::require(!mem.empty(), fn, ": the memory is empty (default-constructed)");
  const std::int64_t B = mem.batch(), H = mem.heads(), Lq = q.extent(2);
  mnemo::detail::require_shape(fn, "q", q, {B, H, Lq, mem.key_dim()}, " [B, H, Lq, D] (B, H, D from the memory)");
  mnemo::detail::require_shape(fn, "out", out, {B, H, Lq, mem.value_dim()}, " [B, H, Lq, Dv]");
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, {B, H, Lq}, " [B, H, Lq]");
  mnemo::detail::require(std::isfinite(opt.scale) && opt.scale >= 0, fn,
                         ": options.scale must be finite and >= 0 (0: 1/sqrt(D)), got ", opt.scale);
  check_threads(fn, opt.threads);
  return {.scale = opt.scale, .threads = 1};
}

// Applies the decision for pair (k, v) at time `now`: consolidate into `best` (sim >= threshold)
// or store in a new / least recently used slot. Shared by both paths (the arithmetic is a mean).
template <class T>
void camelot_apply(camelot_memory::slot_state st, std::int64_t S, std::int64_t D, std::int64_t Dv, const float* k,
                   const float* v, std::int64_t now, std::int64_t best, bool consolidate, std::int64_t* changed) {
  std::int64_t slot;
  if (consolidate) {
    slot = best;
    const T c = static_cast<T>(st.count[slot]), inv = T(1) / (c + 1);
    float *K = st.k + slot * D, *V = st.v + slot * Dv;
    for (std::int64_t e = 0; e < D; ++e) K[e] = static_cast<float>((c * K[e] + k[e]) * inv);
    for (std::int64_t e = 0; e < Dv; ++e) V[e] = static_cast<float>((c * V[e] + v[e]) * inv);
    ++st.count[slot];
  } else {
    if (st.size < S) {
      slot = st.size++;
    } else {
      slot = 0;
      for (std::int64_t j = 1; j < S; ++j)
        if (st.used[j] < st.used[slot]) slot = j;
    }
    std::copy(k, k + D, st.k + slot * D);
    std::copy(v, v + Dv, st.v + slot * Dv);
    st.count[slot] = 1;
  }
  st.used[slot] = now;
  if (changed) *changed = slot;
}

template <class Read>
void camelot_read_heads(const view<const float, 4>& q, const camelot_memory& mem, const view<float, 4>& out,
                        const view<float, 3>& lse, int threads, Read&& read) {
  const std::int64_t H = mem.heads(), Lq = q.extent(2), D = mem.key_dim(), Dv = mem.value_dim();
  parallel_for(mem.batch() * H, [&](std::int64_t bh) {
    const std::int64_t b = bh / H, h = bh % H, n = mem.size(b, h);
    const view<const float, 4> qh(q.ptr(b, h), {1, 1, Lq, D}, {0, 0, q.stride(2), 1});
    const view<const float, 4> kh(mem.keys().ptr(b, h), {1, 1, n, D});
    const view<const float, 4> vh(mem.values().ptr(b, h), {1, 1, n, Dv});
    const view<float, 4> oh(out.ptr(b, h), {1, 1, Lq, Dv}, {0, 0, out.stride(2), 1});
    view<float, 3> lh;
    if (!lse.empty()) lh = view<float, 3>(lse.ptr(b, h), {1, 1, Lq}, {0, 0, 1});
    read(qh, kh, vh, oh, lh);
  }, threads);
}

}  // namespace detail

namespace reference {

// Writes the L pairs of each (b, h) in order, scoring every slot in double.
inline void camelot_write(view<const float, 4> k,  // [B, H, L, D]
                          view<const float, 4> v,  // [B, H, L, Dv]
                          camelot_memory& mem, const camelot_options& opt = {}) {
  detail::check_camelot_write("memory::reference::camelot_write", k, v, mem, opt);
  const std::int64_t H = mem.heads(), L = k.extent(2), S = mem.slots(), D = mem.key_dim(), Dv = mem.value_dim();
  const std::int64_t t0 = mem.clock();
  parallel_for(mem.batch() * H, [&](std::int64_t bh) {
    const std::int64_t b = bh / H, h = bh % H;
    const camelot_memory::slot_state st = mem.state(b, h);
    for (std::int64_t t = 0; t < L; ++t) {
      const float* kt = k.ptr(b, h, t);
      double kn = 0;
      for (std::int64_t e = 0; e < D; ++e) kn += static_cast<double>(kt[e]) * kt[e];
      std::int64_t best = -1;
      double best_sim = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < st.size; ++j) {
        double dot = 0, n2 = 0;
        for (std::int64_t e = 0; e < D; ++e) {
          dot += static_cast<double>(kt[e]) * st.k[j * D + e];
          n2 += static_cast<double>(st.k[j * D + e]) * st.k[j * D + e];
        }
        const double sim = kn > 0 && n2 > 0 ? dot / std::sqrt(kn * n2) : 0.0;
        if (sim > best_sim) {
          best_sim = sim;
          best = j;
        }
      }
      detail::camelot_apply<double>(st, S, D, Dv, kt, v.ptr(b, h, t), t0 + t + 1, best,
                                    best >= 0 && best_sim >= opt.threshold, nullptr);
    }
  }, opt.threads);
  mem.advance_clock(L);
}

// Attention over the filled slots, in double (attention::reference).
inline void camelot_read(view<const float, 4> q,  // [B, H, Lq, D]
                         const camelot_memory& mem,
                         view<float, 4> out,       // [B, H, Lq, Dv]
                         view<float, 3> lse = {},  // [B, H, Lq] or empty
                         const camelot_options& opt = {}) {
  const attention::options aopt = detail::check_camelot_read("memory::reference::camelot_read", q, mem, out, lse, opt);
  detail::camelot_read_heads(q, mem, out, lse, opt.threads, [&](auto qh, auto kh, auto vh, auto oh, auto lh) {
    attention::reference<float>(qh, kh, vh, oh, lh, {}, aopt);
  });
}

}  // namespace reference

namespace detail {

// Pairs scored against the slots per GEMM in the fast write: [block, D] x [D, S].
inline constexpr std::int64_t camelot_block = 64;

}  // namespace detail

// The write, blocked (see the header); the same decisions as reference::camelot_write.
template <class Arch = simd::default_arch>
void camelot_write(view<const float, 4> k,  // [B, H, L, D]
                   view<const float, 4> v,  // [B, H, L, Dv]
                   camelot_memory& mem, const camelot_options& opt = {}) {
  detail::check_camelot_write("memory::camelot_write", k, v, mem, opt);
  const std::int64_t H = mem.heads(), L = k.extent(2), S = mem.slots(), D = mem.key_dim(), Dv = mem.value_dim();
  const std::int64_t t0 = mem.clock();
  detail::for_each_item(mem.batch() * H, opt.threads, true, [&](std::int64_t bh) {
    const std::int64_t b = bh / H, h = bh % H;
    const camelot_memory::slot_state st = mem.state(b, h);
    const std::int64_t bl = std::min(detail::camelot_block, std::max<std::int64_t>(L, 1));
    detail::matrix kin(bl, D), dots(bl, S);
    std::vector<float> slot_norm(static_cast<std::size_t>(S)), key_norm(static_cast<std::size_t>(bl));
    std::vector<char> stale(static_cast<std::size_t>(S));
    std::vector<std::int64_t> changed;
    for (std::int64_t p0 = 0; p0 < L; p0 += bl) {
      const std::int64_t n = std::min(bl, L - p0), size0 = st.size;
      for (std::int64_t t = 0; t < n; ++t) {
        std::copy(k.ptr(b, h, p0 + t), k.ptr(b, h, p0 + t) + D, kin.row(t).data());
        key_norm[t] = kin.row(t).norm();
      }
      const detail::cmap K(st.k, S, D);
      if (size0 > 0)
        detail::gemm<detail::accumulate::assign>(dots.topLeftCorner(n, size0), kin.topRows(n),
                                                 K.topRows(size0).transpose());
      for (std::int64_t j = 0; j < size0; ++j) slot_norm[j] = K.row(j).norm();
      std::fill(stale.begin(), stale.end(), 0);
      changed.clear();
      for (std::int64_t t = 0; t < n; ++t) {
        const float kn = key_norm[t];
        std::int64_t best = -1;
        float best_sim = -std::numeric_limits<float>::infinity();
        const float* row = dots.row(t).data();
        for (std::int64_t j = 0; j < size0; ++j) {
          if (stale[j]) continue;
          const float den = kn * slot_norm[j], sim = den > 0 ? row[j] / den : 0.0f;
          if (sim > best_sim) {
            best_sim = sim;
            best = j;
          }
        }
        for (std::int64_t j : changed) {  // slots this block changed: direct dots, current norms
          const float den = kn * slot_norm[j], sim = den > 0 ? kin.row(t).dot(K.row(j)) / den : 0.0f;
          if (sim > best_sim || (sim == best_sim && j < best)) {
            best_sim = sim;
            best = j;
          }
        }
        std::int64_t slot = -1;
        detail::camelot_apply<float>(st, S, D, Dv, k.ptr(b, h, p0 + t), v.ptr(b, h, p0 + t), t0 + p0 + t + 1, best,
                                     best >= 0 && best_sim >= opt.threshold, &slot);
        slot_norm[slot] = K.row(slot).norm();
        if (!stale[slot]) {
          stale[slot] = 1;
          changed.push_back(slot);
        }
      }
    }
  });
  mem.advance_clock(L);
}

// Attention over the filled slots (attention::flash); same contract as reference::camelot_read.
template <class Arch = simd::default_arch>
void camelot_read(view<const float, 4> q,  // [B, H, Lq, D]
                  const camelot_memory& mem,
                  view<float, 4> out,       // [B, H, Lq, Dv]
                  view<float, 3> lse = {},  // [B, H, Lq] or empty
                  const camelot_options& opt = {}) {
  const attention::options aopt = detail::check_camelot_read("memory::camelot_read", q, mem, out, lse, opt);
  detail::camelot_read_heads(q, mem, out, lse, opt.threads, [&](auto qh, auto kh, auto vh, auto oh, auto lh) {
    attention::flash<float, attention::mods::none, Arch>(qh, kh, vh, oh, lh, {}, aopt);
  });
}

}  // namespace mnemo::memory
