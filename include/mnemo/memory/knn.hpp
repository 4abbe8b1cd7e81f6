// mnemo/memory/knn.hpp — kNN memory of Memorizing Transformers (Wu, Rabe, Hutchins & Szegedy,
// "Memorizing Transformers", ICLR 2022).
//
// An external memory of (key, value) pairs per (batch, head), filled FIFO with the keys and values
// of earlier segments (the oldest pairs are dropped once `capacity` is reached). A query retrieves
// the topk stored pairs with the largest inner product q . k (exact search), attends over them,
//   s_j = scale * q . k_j  (j in the retrieved set),  out_mem = sum_j softmax(s)_j v_j,
//   lse_mem = log sum_j exp(s_j)
// and the result is combined with the local attention either by a learned gate per head (the
// paper's gating: out = sigmoid(g_h) out_mem + (1 - sigmoid(g_h)) out_local) or exactly,
// as one softmax over local and retrieved keys together, through attention::merge(out_mem,
// lse_mem, out_local, lse_local) (attention/decode.hpp), which (out, lse) makes possible.
//
// Search order: scores descending, equal scores by slot index (the same rule in both paths).
// While the memory holds fewer than topk pairs the missing entries have index -1 and score -inf;
// they get weight 0, and a query facing an empty memory gets out_mem = 0, lse_mem = -inf (merge
// then returns the local result unchanged), never NaN.
//
// Shapes: keys [B, H, capacity, D], values [B, H, capacity, Dv] (slots, FIFO ring); add k [B, H,
// L, D], v [B, H, L, Dv]; queries q [B, H, Lq, D]; indices (int64 slots) and scores [B, H, Lq,
// topk]; out [B, H, Lq, Dv], lse [B, H, Lq]. position(slot) gives the absolute token position
// stored in a slot (the count of pairs added before it).
//
// Paths: reference::knn_search / knn_attention score in double and sort fully; the fast path
// scores a block of queries against all stored keys with one GEMM and selects with the SIMD
// partial top-k of memory/common.hpp.
// Approximate search: memory/knn_ivf.hpp (knn_index, knn_search_ivf, knn_attention_ivf) over the
// IVF index of attention/retrieval.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::memory {

struct knn_options {
  float scale = 0;  // >= 0; 0: 1 / sqrt(D)
  int threads = 0;  // 0: the OpenMP default
};

// The stored pairs: a FIFO ring of `capacity` slots per (batch, head).
class knn_memory {
 public:
  knn_memory() = default;
  knn_memory(std::int64_t B, std::int64_t H, std::int64_t D, std::int64_t Dv, std::int64_t capacity)
      : k_({B, H, capacity, D}), v_({B, H, capacity, Dv}) {
    mnemo::detail::require(B >= 1 && H >= 1 && D >= 1 && Dv >= 1 && capacity >= 1,
                           "knn_memory: B, H, D, Dv, capacity must be >= 1, got B=", B, ", H=", H, ", D=", D,
                           ", Dv=", Dv, ", capacity=", capacity);
  }

  std::int64_t batch() const { return k_.extent(0); }
  std::int64_t heads() const { return k_.extent(1); }
  std::int64_t capacity() const { return k_.extent(2); }
  std::int64_t key_dim() const { return k_.extent(3); }
  std::int64_t value_dim() const { return v_.extent(3); }
  std::int64_t size() const { return size_; }          // valid slots: [0, size)
  std::int64_t total_added() const { return total_; }  // pairs ever added
  bool empty() const { return k_.size() == 0; }

  view<const float, 4> keys() const { return k_; }    // [B, H, capacity, D]
  view<const float, 4> values() const { return v_; }  // [B, H, capacity, Dv]

  // Absolute position (0-based count of pairs added before it) of the pair in `slot`.
  std::int64_t position(std::int64_t slot) const {
    mnemo::detail::require(slot >= 0 && slot < size_, "knn_memory::position: slot must be in [0, ", size_, "), got ",
                           slot);
    const std::int64_t oldest = size_ < capacity() ? 0 : next_;
    return total_ - size_ + (slot - oldest + capacity()) % capacity();
  }

  // Appends L pairs per (b, h), dropping the oldest beyond capacity.
  void add(view<const float, 4> k,  // [B, H, L, D]
           view<const float, 4> v)  // [B, H, L, Dv]
  {
    constexpr const char* fn = "knn_memory::add";
    mnemo::detail::require(!empty(), fn, ": the memory is empty (default-constructed)");
    const std::int64_t B = batch(), H = heads(), L = k.extent(2), cap = capacity();
    mnemo::detail::require_shape(fn, "k", k, {B, H, L, key_dim()}, " [B, H, L, D] (B, H, D from the memory)");
    mnemo::detail::require_shape(fn, "v", v, {B, H, L, value_dim()}, " [B, H, L, Dv]");
    const std::int64_t skip = std::max<std::int64_t>(0, L - cap);  // would be overwritten in this call
    std::int64_t next = (next_ + skip) % cap;
    for (std::int64_t t = skip; t < L; ++t) {
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < H; ++h) {
          std::copy(k.ptr(b, h, t), k.ptr(b, h, t) + key_dim(), &k_(b, h, next, 0));
          std::copy(v.ptr(b, h, t), v.ptr(b, h, t) + value_dim(), &v_(b, h, next, 0));
        }
      next = (next + 1) % cap;
    }
    next_ = next;
    total_ += L;
    size_ = std::min(cap, size_ + L);
  }

  void clear() {
    size_ = 0;
    next_ = 0;
    total_ = 0;
  }

  // <prefix>keys.npy, <prefix>values.npy, <prefix>ring.npy (int64: size, next, total).
  void save(const std::string& prefix) const {
    mnemo::detail::require(!empty(), "knn_memory::save: the memory is empty");
    npy::save(detail::npy_path(prefix, "keys"), k_);
    npy::save(detail::npy_path(prefix, "values"), v_);
    detail::save_record(detail::npy_path(prefix, "ring"), {size_, next_, total_});
  }
  static knn_memory load(const std::string& prefix) {
    knn_memory m;
    m.k_ = npy::load<float, 4>(detail::npy_path(prefix, "keys"));
    m.v_ = npy::load<float, 4>(detail::npy_path(prefix, "values"));
    const std::string vp = detail::npy_path(prefix, "values");
    mnemo::detail::require(m.v_.extent(0) == m.k_.extent(0) && m.v_.extent(1) == m.k_.extent(1) &&
                               m.v_.extent(2) == m.k_.extent(2),
                           "knn_memory::load: ", vp, ": expected [B, H, capacity] = ",
                           shape_string(shape_t<3>{m.k_.extent(0), m.k_.extent(1), m.k_.extent(2)}),
                           " as in keys.npy, got ", shape_string(m.v_.shape()));
    const auto r = detail::load_record(detail::npy_path(prefix, "ring"), 3);
    const std::int64_t cap = m.capacity();
    mnemo::detail::require(r[0] >= 0 && r[0] <= cap && r[1] >= 0 && r[1] < cap && r[2] >= r[0] &&
                               (r[0] == cap || r[1] == r[0]),
                           "knn_memory::load: ", prefix, "ring.npy: inconsistent (size, next, total) = (", r[0], ", ",
                           r[1], ", ", r[2], ") for capacity ", cap);
    m.size_ = r[0];
    m.next_ = r[1];
    m.total_ = r[2];
    return m;
  }

 private:
  tensor<float, 4> k_, v_;
  std::int64_t size_ = 0, next_ = 0, total_ = 0;
};

namespace detail {

struct knn_dims {
  std::int64_t B, H, Lq, D, Dv, topk;
  float scale;
};

inline knn_dims check_knn_search(const char* fn, const view<const float, 4>& q, const knn_memory& mem,
                                 std::int64_t topk, const view<std::int64_t, 4>& indices, const view<float, 4>& scores,
                                 int threads) {
  mnemo::detail::require(!mem.empty(), fn, ": the memory is empty (default-constructed)");
  const std::int64_t B = mem.batch(), H = mem.heads(), Lq = q.extent(2), D = mem.key_dim();
  mnemo::detail::require_shape(fn, "q", q, {B, H, Lq, D}, " [B, H, Lq, D] (B, H, D from the memory)");
  mnemo::detail::require(topk >= 1, fn, ": topk must be >= 1, got ", topk);
  if (!indices.empty()) mnemo::detail::require_shape(fn, "indices", indices, {B, H, Lq, topk}, " [B, H, Lq, topk]");
  if (!scores.empty()) mnemo::detail::require_shape(fn, "scores", scores, {B, H, Lq, topk}, " [B, H, Lq, topk]");
  check_threads(fn, threads);
  return {B, H, Lq, D, mem.value_dim(), topk, 0.0f};
}

inline knn_dims check_knn_attention(const char* fn, const view<const float, 4>& q, const knn_memory& mem,
                                    std::int64_t topk, const view<float, 4>& out, const view<float, 3>& lse,
                                    const knn_options& opt) {
  knn_dims d = check_knn_search(fn, q, mem, topk, {}, {}, opt.threads);
  mnemo::detail::require_shape(fn, "out", out, {d.B, d.H, d.Lq, d.Dv}, " [B, H, Lq, Dv]");
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, {d.B, d.H, d.Lq}, " [B, H, Lq]");
  // A negative scale would turn the missing entries' -inf scores into +inf.
  mnemo::detail::require(std::isfinite(opt.scale) && opt.scale >= 0, fn,
                         ": options.scale must be finite and >= 0 (0: 1/sqrt(D)), got ", opt.scale);
  d.scale = opt.scale != 0 ? opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d.D)));
  return d;
}

// Query rows scored per GEMM in the fast search: [rows, D] x [D, size]. 16 rows keep the score
// block of a 64K-pair memory at 4 MiB per thread.
inline constexpr std::int64_t knn_query_block = 16;

}  // namespace detail

namespace reference {

// Exact top-k by q . k in double with a full sort (ties by slot); missing entries -1 / -inf.
inline void knn_search(view<const float, 4> q,  // [B, H, Lq, D]
                       const knn_memory& mem, std::int64_t topk,
                       view<std::int64_t, 4> indices,  // [B, H, Lq, topk]
                       view<float, 4> scores,          // [B, H, Lq, topk] or empty
                       int threads = 0) {
  const auto d = detail::check_knn_search("memory::reference::knn_search", q, mem, topk, indices, scores, threads);
  mnemo::detail::require(!indices.empty(), "memory::reference::knn_search: indices must be a non-empty view");
  const view<const float, 4> keys = mem.keys();
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    std::vector<std::pair<double, std::int64_t>> s(static_cast<std::size_t>(mem.size()));
    for (std::int64_t t = 0; t < d.Lq; ++t) {
      for (std::int64_t j = 0; j < mem.size(); ++j) {
        double dot = 0;
        for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(q(b, h, t, c)) * keys(b, h, j, c);
        s[j] = {-dot, j};  // ascending (-score, slot)
      }
      std::sort(s.begin(), s.end());
      for (std::int64_t j = 0; j < topk; ++j) {
        const bool have = j < mem.size();
        indices(b, h, t, j) = have ? s[j].second : -1;
        if (!scores.empty()) scores(b, h, t, j) = have ? static_cast<float>(-s[j].first) : detail::minus_inf;
      }
    }
  }, threads);
}

// Attention of each query over its topk retrieved pairs, in double; lse for attention::merge.
inline void knn_attention(view<const float, 4> q,  // [B, H, Lq, D]
                          const knn_memory& mem, std::int64_t topk,
                          view<float, 4> out,       // [B, H, Lq, Dv]
                          view<float, 3> lse = {},  // [B, H, Lq] or empty
                          const knn_options& opt = {}) {
  const auto d = detail::check_knn_attention("memory::reference::knn_attention", q, mem, topk, out, lse, opt);
  tensor<std::int64_t, 4> idx({d.B, d.H, d.Lq, topk});
  knn_search(q, mem, topk, idx, {}, opt.threads);
  const view<const float, 4> keys = mem.keys(), values = mem.values();
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    std::vector<double> s(static_cast<std::size_t>(topk)), acc(static_cast<std::size_t>(d.Dv));
    for (std::int64_t t = 0; t < d.Lq; ++t) {
      double m = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < topk; ++j) {
        const std::int64_t slot = idx(b, h, t, j);
        s[j] = -std::numeric_limits<double>::infinity();
        if (slot < 0) continue;
        double dot = 0;
        for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(q(b, h, t, c)) * keys(b, h, slot, c);
        s[j] = d.scale * dot;
        m = std::max(m, s[j]);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      double z = 0;
      if (m > -std::numeric_limits<double>::infinity())
        for (std::int64_t j = 0; j < topk; ++j) {
          if (idx(b, h, t, j) < 0) continue;
          const double p = std::exp(s[j] - m);
          z += p;
          for (std::int64_t c = 0; c < d.Dv; ++c) acc[c] += p * values(b, h, idx(b, h, t, j), c);
        }
      for (std::int64_t c = 0; c < d.Dv; ++c) out(b, h, t, c) = z > 0 ? static_cast<float>(acc[c] / z) : 0.0f;
      if (!lse.empty()) lse(b, h, t) = z > 0 ? static_cast<float>(m + std::log(z)) : detail::minus_inf;
    }
  }, opt.threads);
}

}  // namespace reference

namespace detail {

// Softmax over each query's retrieved scores sc (q . k, descending, missing = -inf; scaled here,
// in place) and the weighted sum of the retrieved value rows; lse when not empty.
template <class Arch>
void attend_retrieved(const knn_memory& mem, const knn_dims& d, tensor<std::int64_t, 4>& idx, tensor<float, 4>& sc,
                      const view<float, 4>& out, const view<float, 3>& lse, int threads) {
  const view<const float, 4> values = mem.values();
  const std::int64_t topk = d.topk;
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    for (std::int64_t t = 0; t < d.Lq; ++t) {
      float* s = &sc(b, h, t, 0);
      // Missing entries are -inf and sort last, so the maximum is s[0] (-inf: nothing retrieved).
      simd::scale<Arch>(d.scale, s, topk);
      const float m = s[0];
      const float z = simd::exp_sum<Arch>(s, topk, m);
      float* o = out.ptr(b, h, t);
      std::fill(o, o + d.Dv, 0.0f);
      for (std::int64_t j = 0; j < topk && idx(b, h, t, j) >= 0; ++j)
        simd::axpy<Arch>(s[j] / z, values.ptr(b, h, idx(b, h, t, j)), o, d.Dv);
      if (!lse.empty()) lse(b, h, t) = z > 0 ? m + std::log(z) : minus_inf;
    }
  }, threads);
}

}  // namespace detail

// Exact top-k search (f32 fast path: GEMM scores, SIMD partial top-k); same contract and, for
// scores that differ by more than f32 rounding, the same slots as reference::knn_search.
template <class Arch = simd::default_arch>
void knn_search(view<const float, 4> q,  // [B, H, Lq, D]
                const knn_memory& mem, std::int64_t topk,
                view<std::int64_t, 4> indices,  // [B, H, Lq, topk]
                view<float, 4> scores,          // [B, H, Lq, topk] or empty
                int threads = 0) {
  const auto d = detail::check_knn_search("memory::knn_search", q, mem, topk, indices, scores, threads);
  mnemo::detail::require(!indices.empty(), "memory::knn_search: indices must be a non-empty view");
  const std::int64_t n = mem.size(), blocks = (d.Lq + detail::knn_query_block - 1) / detail::knn_query_block;
  const view<const float, 4> keys = mem.keys();
  detail::for_each_item(d.B * d.H * blocks, threads, true, [&](std::int64_t item) {
    const std::int64_t bh = item / blocks, b = bh / d.H, h = bh % d.H;
    const std::int64_t t0 = item % blocks * detail::knn_query_block, rows = std::min(detail::knn_query_block, d.Lq - t0);
    detail::matrix qs(rows, d.D), s(rows, n);
    std::vector<float> vals(static_cast<std::size_t>(topk));
    topk_workspace ws;
    for (std::int64_t r = 0; r < rows; ++r) std::copy(q.ptr(b, h, t0 + r), q.ptr(b, h, t0 + r) + d.D, qs.row(r).data());
    if (n > 0) detail::gemm<detail::accumulate::assign>(s, qs, detail::cmap(keys.ptr(b, h), n, d.D).transpose());
    for (std::int64_t r = 0; r < rows; ++r) {
      std::int64_t* out_i = indices.ptr(b, h, t0 + r);
      const std::int64_t got = memory::topk<Arch>(s.row(r).data(), n, topk, vals.data(), out_i, ws);
      for (std::int64_t j = got; j < topk; ++j) {
        out_i[j] = -1;
        vals[j] = detail::minus_inf;
      }
      if (!scores.empty()) std::copy(vals.begin(), vals.end(), scores.ptr(b, h, t0 + r));
    }
  });
}

// Attention over the retrieved pairs (f32 fast path); same contract as reference::knn_attention.
template <class Arch = simd::default_arch>
void knn_attention(view<const float, 4> q,  // [B, H, Lq, D]
                   const knn_memory& mem, std::int64_t topk,
                   view<float, 4> out,       // [B, H, Lq, Dv]
                   view<float, 3> lse = {},  // [B, H, Lq] or empty
                   const knn_options& opt = {}) {
  const auto d = detail::check_knn_attention("memory::knn_attention", q, mem, topk, out, lse, opt);
  tensor<std::int64_t, 4> idx({d.B, d.H, d.Lq, topk});
  tensor<float, 4> sc({d.B, d.H, d.Lq, topk});
  knn_search<Arch>(q, mem, topk, idx, sc, opt.threads);
  detail::attend_retrieved<Arch>(mem, d, idx, sc, out, lse, opt.threads);
}

// out = sigmoid(gate_h) out_mem + (1 - sigmoid(gate_h)) out_local (the paper's learned gate).
inline void knn_gate(view<const float, 4> out_mem,    // [B, H, L, Dv]
                     view<const float, 4> out_local,  // [B, H, L, Dv]
                     view<const float, 1> gate,       // [H] logits
                     view<float, 4> out)              // [B, H, L, Dv]
{
  constexpr const char* fn = "memory::knn_gate";
  const shape_t<4> s = out_mem.shape();
  mnemo::detail::require_shape<const float, 4>(fn, "out_local", out_local, s, " [B, H, L, Dv] (from out_mem)");
  mnemo::detail::require_shape(fn, "gate", gate, {s[1]}, " [H]");
  mnemo::detail::require_shape<float, 4>(fn, "out", out, s, " [B, H, L, Dv]");
  for (std::int64_t b = 0; b < s[0]; ++b)
    for (std::int64_t h = 0; h < s[1]; ++h) {
      const float g = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(gate(h)))));
      for (std::int64_t t = 0; t < s[2]; ++t) {
        const float *m = out_mem.ptr(b, h, t), *l = out_local.ptr(b, h, t);
        float* o = out.ptr(b, h, t);
        for (std::int64_t c = 0; c < s[3]; ++c) o[c] = g * m[c] + (1 - g) * l[c];
      }
    }
}

}  // namespace mnemo::memory
