// mnemo/memory/hmt.hpp — Hierarchical Memory Transformer (He, Cao, Qin, Prakriya, Sun & Cong,
// "HMT: Hierarchical Memory Transformer for Efficient Long Context Language Processing", 2024).
//
// A long input x [B, L, D] is processed in segments H_n of S tokens (the last may be shorter)
// by a user-supplied block (the backbone: any callable, as memory/recurrent_memory.hpp's RMT).
// For segment n:
//   1. representation extraction: a summary of the segment's first j tokens,
//        S_n = block([T; H_n[0 : j]; T])[j + 1]            T [D] a learned prompt embedding
//   2. memory search: cross-attention of the summary over the cached memory embeddings of the
//      last N segments M = (m_{n-N}, ..., m_{n-1}) [N', D] (N' = min(N, n)),
//        q = S_n W_q,  K = M W_k,  P_n = softmax(scale q K^T) M        W_q, W_k [D, Dh]
//      (P_n = 0 while the cache is empty);
//   3. the segment, with the recalled memory token before and after it, and the last k tokens of
//      the previous segment in front (sensory memory, k = sensory_len, 0 to disable):
//        out = block([H_{n-1}[-k:]; P_n; H_n; P_n]),  y_n = out[k + 1 : k + 1 + |H_n|],
//        m_n = out[last]                                  the segment's memory embedding
//   4. m_n joins the cache (the oldest leaves once N are held).
//
// Shapes: x, y [B, L, D]; the cache [B, N, D]; W_q, W_k [D, Dh]; summaries and recalled tokens [B, D].
// Paths: reference::hmt_recall follows step 2 literally in double (K = M W_k recomputed every
// call); the fast recall keeps each cached embedding's key m W_k (projected once, when it is
// appended, in f32), so a recall costs D Dh + N' (Dh + D) instead of N' D Dh multiply-adds. The
// segment loop (hmt_forward / reference::hmt_forward) is plumbing around the caller's block and
// the recall of its path.
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

namespace mnemo::memory {

struct hmt_options {
  std::int64_t segment_len = 0;  // S >= 1
  std::int64_t summary_len = 0;  // j in [1, S]: tokens summarised (0: S / 2, at least 1)
  std::int64_t sensory_len = 0;  // k >= 0: tokens of the previous segment in front of the next
  float scale = 0;               // recall: 0 is 1 / sqrt(Dh)
  int threads = 0;               // 0: the OpenMP default
};

// The cache of memory embeddings (a ring of the last N per batch row), its keys m W_k, and W_q, W_k.
class hmt_memory {
 public:
  hmt_memory() = default;
  hmt_memory(std::int64_t B, std::int64_t N, view<const float, 2> wq,  // [D, Dh]
             view<const float, 2> wk)                                   // [D, Dh]
      : wq_({wq.extent(0), wq.extent(1)}), wk_({wk.extent(0), wk.extent(1)}), cache_({B, N, wq.extent(0)}),
        keys_({B, N, wq.extent(1)}) {
    constexpr const char* fn = "hmt_memory";
    mnemo::detail::require(B >= 1 && N >= 1 && wq.extent(0) >= 1 && wq.extent(1) >= 1, fn,
                           ": B, N, D, Dh must be >= 1, got B=", B, ", N=", N, ", D=", wq.extent(0), ", Dh=", wq.extent(1));
    mnemo::detail::require_shape(fn, "wk", wk, {wq.extent(0), wq.extent(1)}, " [D, Dh] (as wq)");
    for (std::int64_t i = 0; i < dim(); ++i) {
      std::copy(wq.ptr(i), wq.ptr(i) + key_dim(), wq_.as_view().ptr(i));
      std::copy(wk.ptr(i), wk.ptr(i) + key_dim(), wk_.as_view().ptr(i));
    }
  }

  std::int64_t batch() const { return cache_.extent(0); }
  std::int64_t capacity() const { return cache_.extent(1); }  // N
  std::int64_t dim() const { return cache_.extent(2); }       // D
  std::int64_t key_dim() const { return keys_.extent(2); }    // Dh
  std::int64_t size() const { return size_; }                 // cached embeddings: slots [0, size)
  std::int64_t total_added() const { return total_; }
  bool empty() const { return cache_.size() == 0; }

  view<const float, 2> wq() const { return wq_; }         // [D, Dh]
  view<const float, 2> wk() const { return wk_; }         // [D, Dh]
  view<const float, 3> cache() const { return cache_; }   // [B, N, D] (ring)
  view<const float, 3> keys() const { return keys_; }     // [B, N, Dh]: cache W_k

  // Appends one memory embedding per batch row [B, D] (the oldest leaves when N are held) and its key m W_k.
  void append(view<const float, 2> m) {
    constexpr const char* fn = "hmt_memory::append";
    mnemo::detail::require(!empty(), fn, ": the memory is empty (default-constructed)");
    mnemo::detail::require_shape(fn, "m", m, {batch(), dim()}, " [B, D]");
    const std::int64_t slot = total_ % capacity(), D = dim(), Dh = key_dim();
    const detail::cmap W(wk_.data(), D, Dh);
    for (std::int64_t b = 0; b < batch(); ++b) {
      float* c = cache_.as_view().ptr(b, slot);
      std::copy(m.ptr(b), m.ptr(b) + D, c);
      Eigen::Map<Eigen::RowVectorXf>(keys_.as_view().ptr(b, slot), Dh).noalias() =
          Eigen::Map<const Eigen::RowVectorXf>(c, D) * W;
    }
    ++total_;
    size_ = std::min(capacity(), size_ + 1);
  }

  void clear() {
    size_ = 0;
    total_ = 0;
  }

  // <prefix>wq.npy, wk.npy, cache.npy, keys.npy, ring.npy (int64: size, total).
  void save(const std::string& prefix) const {
    mnemo::detail::require(!empty(), "hmt_memory::save: the memory is empty");
    npy::save(detail::npy_path(prefix, "wq"), wq_);
    npy::save(detail::npy_path(prefix, "wk"), wk_);
    npy::save(detail::npy_path(prefix, "cache"), cache_);
    npy::save(detail::npy_path(prefix, "keys"), keys_);
    detail::save_record(detail::npy_path(prefix, "ring"), {size_, total_});
  }
  static hmt_memory load(const std::string& prefix) {
    const tensor<float, 2> wq = npy::load<float, 2>(detail::npy_path(prefix, "wq"));
    const tensor<float, 2> wk = detail::load_checked<2>(detail::npy_path(prefix, "wk"), wq.shape());
    const tensor<float, 3> cache = npy::load<float, 3>(detail::npy_path(prefix, "cache"));
    mnemo::detail::require(cache.extent(2) == wq.extent(0), "hmt_memory::load: ", prefix, "cache.npy: expected D = ",
                           wq.extent(0), " (wq.npy's rows), got ", cache.extent(2));
    hmt_memory m(cache.extent(0), cache.extent(1), wq, wk);
    m.cache_ = cache;
    m.keys_ = detail::load_checked<3>(detail::npy_path(prefix, "keys"), {cache.extent(0), cache.extent(1), wq.extent(1)});
    const auto r = detail::load_record(detail::npy_path(prefix, "ring"), 2);
    mnemo::detail::require(r[0] >= 0 && r[0] <= m.capacity() && r[1] >= r[0] && (r[0] == m.capacity() || r[0] == r[1]),
                           "hmt_memory::load: ", prefix, "ring.npy: inconsistent (size, total) = (", r[0], ", ", r[1],
                           ") for capacity ", m.capacity());
    m.size_ = r[0];
    m.total_ = r[1];
    return m;
  }

 private:
  tensor<float, 2> wq_, wk_;
  tensor<float, 3> cache_, keys_;
  std::int64_t size_ = 0, total_ = 0;
};

namespace detail {

inline float check_hmt_recall(const char* fn, const view<const float, 2>& s, const hmt_memory& mem,
                              const view<float, 2>& out, float scale) {
  mnemo::detail::require(!mem.empty(), fn, ": the memory is empty (default-constructed)");
  mnemo::detail::require_shape(fn, "summary", s, {mem.batch(), mem.dim()}, " [B, D] (from the memory)");
  mnemo::detail::require_shape(fn, "out", out, {mem.batch(), mem.dim()}, " [B, D]");
  mnemo::detail::require(std::isfinite(scale) && scale >= 0, fn,
                         ": options.scale must be finite and >= 0 (0: 1/sqrt(Dh)), got ", scale);
  return scale != 0 ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(mem.key_dim())));
}

}  // namespace detail

namespace reference {

// P = softmax(scale (s W_q) (M W_k)^T) M over the cached embeddings, in double (0 when none).
inline void hmt_recall(view<const float, 2> summary,  // [B, D]
                       const hmt_memory& mem,
                       view<float, 2> out,  // [B, D]
                       const hmt_options& opt = {}) {
  const float scale = detail::check_hmt_recall("memory::reference::hmt_recall", summary, mem, out, opt.scale);
  const std::int64_t D = mem.dim(), Dh = mem.key_dim(), n = mem.size();
  const view<const float, 2> wq = mem.wq(), wk = mem.wk();
  const view<const float, 3> M = mem.cache();
  for (std::int64_t b = 0; b < mem.batch(); ++b) {
    std::vector<double> q(static_cast<std::size_t>(Dh), 0.0), s(static_cast<std::size_t>(n)), acc(static_cast<std::size_t>(D), 0.0);
    for (std::int64_t c = 0; c < Dh; ++c)
      for (std::int64_t e = 0; e < D; ++e) q[c] += static_cast<double>(summary(b, e)) * wq(e, c);
    double mx = -std::numeric_limits<double>::infinity();
    for (std::int64_t j = 0; j < n; ++j) {
      double dot = 0;
      for (std::int64_t c = 0; c < Dh; ++c) {
        double kc = 0;
        for (std::int64_t e = 0; e < D; ++e) kc += static_cast<double>(M(b, j, e)) * wk(e, c);
        dot += q[c] * kc;
      }
      s[j] = scale * dot;
      mx = std::max(mx, s[j]);
    }
    double z = 0;
    for (std::int64_t j = 0; j < n; ++j) {
      const double p = std::exp(s[j] - mx);
      z += p;
      for (std::int64_t e = 0; e < D; ++e) acc[e] += p * M(b, j, e);
    }
    for (std::int64_t e = 0; e < D; ++e) out(b, e) = z > 0 ? static_cast<float>(acc[e] / z) : 0.0f;
  }
}

}  // namespace reference

// The recall with the cached keys (f32, Eigen); same contract as reference::hmt_recall.
template <class Arch = simd::default_arch>
void hmt_recall(view<const float, 2> summary,  // [B, D]
                const hmt_memory& mem,
                view<float, 2> out,  // [B, D]
                const hmt_options& opt = {}) {
  const float scale = detail::check_hmt_recall("memory::hmt_recall", summary, mem, out, opt.scale);
  const std::int64_t D = mem.dim(), Dh = mem.key_dim(), n = mem.size();
  const detail::cmap Wq(mem.wq().data(), D, Dh);
  detail::for_each_item(mem.batch(), opt.threads, true, [&](std::int64_t b) {
    float* o = out.ptr(b);
    if (n == 0) {
      std::fill(o, o + D, 0.0f);
      return;
    }
    const Eigen::RowVectorXf q = scale * (Eigen::Map<const Eigen::RowVectorXf>(summary.ptr(b), D) * Wq);
    const detail::cmap K(mem.keys().ptr(b), n, Dh), M(mem.cache().ptr(b), n, D);
    Eigen::RowVectorXf p = q * K.transpose();
    const float mx = p.maxCoeff();
    p = (p.array() - mx).exp();
    p /= p.sum();
    Eigen::Map<Eigen::RowVectorXf>(o, D).noalias() = p * M;
  });
}

namespace detail {

// The segment loop of hmt_forward, with the recall of one path.
template <class Block, class Recall>
void hmt_segments(const char* fn, view<const float, 3> x, hmt_memory& mem, view<const float, 1> prompt, Block&& block,
                  view<float, 3> y, const hmt_options& opt, Recall&& recall) {
  mnemo::detail::require(!mem.empty(), fn, ": the memory is empty (default-constructed)");
  const std::int64_t B = x.extent(0), L = x.extent(1), D = x.extent(2), S = opt.segment_len;
  mnemo::detail::require(S >= 1, fn, ": options.segment_len must be >= 1, got ", S);
  const std::int64_t j = opt.summary_len != 0 ? opt.summary_len : std::max<std::int64_t>(1, S / 2), k = opt.sensory_len;
  mnemo::detail::require(j >= 1 && j <= S, fn, ": options.summary_len must be in [1, segment_len = ", S, "], got ", j);
  mnemo::detail::require(k >= 0, fn, ": options.sensory_len must be >= 0, got ", k);
  mnemo::detail::require_shape(fn, "x", x, {mem.batch(), L, mem.dim()}, " [B, L, D] (B, D from the memory)");
  mnemo::detail::require_shape(fn, "prompt", prompt, {D}, " [D]");
  mnemo::detail::require_shape(fn, "y", y, {B, L, D}, " [B, L, D]");
  tensor<float, 3> sin({B, j + 2, D}), sout({B, j + 2, D}), in({B, k + S + 2, D}), out({B, k + S + 2, D});
  tensor<float, 2> summary({B, D}), recalled({B, D}), m({B, D});
  std::int64_t prev0 = 0, prev_n = 0;  // the previous segment
  for (std::int64_t t0 = 0; t0 < L; t0 += S) {
    const std::int64_t n = std::min(S, L - t0), js = std::min(j, n), ks = std::min(k, prev_n);
    // 1. [T; H_n[0 : j]; T] -> the summary at the last position.
    const view<float, 3> si = sin.as_view().narrow(1, 0, js + 2), so = sout.as_view().narrow(1, 0, js + 2);
    for (std::int64_t b = 0; b < B; ++b) {
      std::copy(prompt.data(), prompt.data() + D, si.ptr(b, 0));
      for (std::int64_t t = 0; t < js; ++t) std::copy(x.ptr(b, t0 + t), x.ptr(b, t0 + t) + D, si.ptr(b, 1 + t));
      std::copy(prompt.data(), prompt.data() + D, si.ptr(b, js + 1));
    }
    block(view<const float, 3>(si), so);
    for (std::int64_t b = 0; b < B; ++b) std::copy(so.ptr(b, js + 1), so.ptr(b, js + 1) + D, summary.as_view().ptr(b));
    // 2. Recall over the cache.
    recall(view<const float, 2>(summary), view<float, 2>(recalled));
    // 3. [H_{n-1}[-k:]; P; H_n; P] -> y_n and m_n.
    const std::int64_t len = ks + n + 2;
    const view<float, 3> iv = in.as_view().narrow(1, 0, len), ov = out.as_view().narrow(1, 0, len);
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t t = 0; t < ks; ++t)
        std::copy(x.ptr(b, prev0 + prev_n - ks + t), x.ptr(b, prev0 + prev_n - ks + t) + D, iv.ptr(b, t));
      std::copy(recalled.as_view().ptr(b), recalled.as_view().ptr(b) + D, iv.ptr(b, ks));
      for (std::int64_t t = 0; t < n; ++t) std::copy(x.ptr(b, t0 + t), x.ptr(b, t0 + t) + D, iv.ptr(b, ks + 1 + t));
      std::copy(recalled.as_view().ptr(b), recalled.as_view().ptr(b) + D, iv.ptr(b, ks + 1 + n));
    }
    block(view<const float, 3>(iv), ov);
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t t = 0; t < n; ++t) std::copy(ov.ptr(b, ks + 1 + t), ov.ptr(b, ks + 1 + t) + D, y.ptr(b, t0 + t));
      std::copy(ov.ptr(b, len - 1), ov.ptr(b, len - 1) + D, m.as_view().ptr(b));
    }
    // 4. m_n joins the cache.
    mem.append(m);
    prev0 = t0;
    prev_n = n;
  }
}

}  // namespace detail

namespace reference {

// The whole input through `block` segment by segment (see the header), recalling in double.
// block(in, out) gets view<const float, 3> in and view<float, 3> out of equal shape [B, n', D].
template <class Block>
void hmt_forward(view<const float, 3> x,       // [B, L, D]
                 hmt_memory& mem,              // the cache, read and appended
                 view<const float, 1> prompt,  // [D]: T
                 Block&& block,
                 view<float, 3> y,  // [B, L, D]
                 const hmt_options& opt) {
  detail::hmt_segments("memory::reference::hmt_forward", x, mem, prompt, block, y, opt,
                       [&](view<const float, 2> s, view<float, 2> p) { hmt_recall(s, mem, p, opt); });
}

}  // namespace reference

// The same with the fast recall.
template <class Arch = simd::default_arch, class Block>
void hmt_forward(view<const float, 3> x,       // [B, L, D]
                 hmt_memory& mem,              // the cache, read and appended
                 view<const float, 1> prompt,  // [D]: T
                 Block&& block,
                 view<float, 3> y,  // [B, L, D]
                 const hmt_options& opt) {
  detail::hmt_segments("memory::hmt_forward", x, mem, prompt, block, y, opt,
                       [&](view<const float, 2> s, view<float, 2> p) { hmt_recall<Arch>(s, mem, p, opt); });
}

}  // namespace mnemo::memory
