// mnemo/memory/memoryllm.hpp — the latent memory pool of MEMORYLLM (Wang et al., "MEMORYLLM:
// Towards Self-Updatable Large Language Models", ICML 2024) and the long-term memory of M+
// (Wang et al., "M+: Extending MemoryLLM with Scalable Long-Term Memory", ICML 2025).
//
// Each layer keeps a pool theta of N memory vectors [N, D] (hidden states). Self-update with a
// new context whose hidden states at this layer are h [L, D] (L >= K):
//   e       = h[L - K : L]                          the last K hidden states
//   drop    = K distinct slots of [0, N), drawn uniformly (seeded)
//   theta'  = [theta without drop (in order); e]    N - K kept slots, then the K new ones
// so a slot written u updates ago survives with probability (1 - K / N)^u (the paper's
// exponential forgetting). The draw is deterministic: update u of batch row b uses the counter
// stream (seed, u B + b) of core/random.hpp (a partial Fisher-Yates shuffle of [0, N)).
// Read: the layer's tokens attend over the pool, keys = values = theta split into H heads of
// Dh = D / H (the layer's own projections, if any, are the caller's):
//   out_i = sum_j softmax_j(scale q_i . theta_j^h) theta_j^h,   lse_i as in attention/.
// M+ long-term memory: the dropped slots are not lost but appended to a kNN memory (memory/knn.hpp,
// keys = values = the dropped vector per head); M+'s co-trained retriever is replaced by exact
// inner-product search. The long-term read retrieves the topk stored vectors per query and head
// and joins them with the pool in one softmax (exact, through the two parts' lse):
//   out = (e^{lse_pool} out_pool + e^{lse_ltm} out_ltm) / (e^{lse_pool} + e^{lse_ltm}).
//
// Shapes: pool [B, N, D]; update h [B, L, D]; read q [B, H, Lq, Dh], out [B, H, Lq, Dh],
// lse [B, H, Lq]; the long-term knn_memory is [B, H, capacity, Dh].
// Paths: the update is copies (one version). reference::memoryllm_read / mplus_read are
// attention::reference and reference::knn_attention in double, joined in double; the fast reads
// are attention::flash over the pool read in place through strides, knn_attention and
// attention::merge.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/merge.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/random.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"
#include "mnemo/memory/knn.hpp"

namespace mnemo::memory {

struct memoryllm_options {
  std::int64_t update_len = 0;  // K in [1, N]: slots dropped and hidden states appended per update
  std::int64_t heads = 1;       // H: the pool's D splits into H heads of D / H for the read
  std::uint64_t seed = 0;       // the drop draw
  float scale = 0;              // read: 0 is 1 / sqrt(D / H)
  int threads = 0;              // 0: the OpenMP default
};

// theta [B, N, D], the number of updates so far, and (M+) a long-term kNN memory of dropped slots.
class memory_pool {
 public:
  memory_pool() = default;
  // long_term_capacity = 0: MEMORYLLM (dropped slots are forgotten); > 0: M+ with a kNN memory of
  // that many vectors per (b, head), heads = the H of the read.
  memory_pool(std::int64_t B, std::int64_t N, std::int64_t D, std::int64_t long_term_capacity = 0, std::int64_t heads = 1)
      : theta_({B, N, D}) {
    mnemo::detail::require(B >= 1 && N >= 1 && D >= 1, "memory_pool: B, N, D must be >= 1, got B=", B, ", N=", N,
                           ", D=", D);
    mnemo::detail::require(long_term_capacity >= 0, "memory_pool: long_term_capacity must be >= 0, got ",
                           long_term_capacity);
    mnemo::detail::require(heads >= 1 && D % heads == 0, "memory_pool: heads must divide D = ", D, ", got ", heads);
    if (long_term_capacity > 0) ltm_ = knn_memory(B, heads, D / heads, D / heads, long_term_capacity);
  }

  std::int64_t batch() const { return theta_.extent(0); }
  std::int64_t slots() const { return theta_.extent(1); }
  std::int64_t dim() const { return theta_.extent(2); }
  bool empty() const { return theta_.size() == 0; }
  std::int64_t updates() const { return updates_; }
  bool has_long_term() const { return !ltm_.empty(); }

  view<float, 3> pool() { return theta_; }  // [B, N, D]: set the initial theta here
  view<const float, 3> pool() const { return theta_; }
  const knn_memory& long_term() const { return ltm_; }
  knn_memory& long_term() { return ltm_; }
  void count_update() { ++updates_; }

  // <prefix>pool.npy, <prefix>updates.npy (int64 [1]) and, under M+, <prefix>ltm_*.npy (knn_memory::save).
  void save(const std::string& prefix) const {
    mnemo::detail::require(!empty(), "memory_pool::save: the pool is empty");
    npy::save(detail::npy_path(prefix, "pool"), theta_);
    detail::save_record(detail::npy_path(prefix, "updates"), {updates_});
    if (has_long_term()) ltm_.save(prefix + "ltm_");
  }
  // long_term: whether prefix holds an M+ long-term memory (ltm_*.npy) to load as well.
  static memory_pool load(const std::string& prefix, bool long_term = false) {
    memory_pool p;
    p.theta_ = npy::load<float, 3>(detail::npy_path(prefix, "pool"));
    p.updates_ = detail::load_record(detail::npy_path(prefix, "updates"), 1)[0];
    if (long_term) {
      p.ltm_ = knn_memory::load(prefix + "ltm_");
      const knn_memory& l = p.ltm_;
      mnemo::detail::require(l.batch() == p.batch() && l.key_dim() * l.heads() == p.dim() && l.value_dim() == l.key_dim(),
                             "memory_pool::load: ", prefix, "ltm_keys.npy: expected [B, H, capacity, D / H] with B = ",
                             p.batch(), ", D = ", p.dim(), ", got [", l.batch(), ", ", l.heads(), ", ", l.capacity(), ", ",
                             l.key_dim(), "]");
    }
    return p;
  }

 private:
  tensor<float, 3> theta_;
  knn_memory ltm_;
  std::int64_t updates_ = 0;
};

// The K slots update `update` drops from batch row b, ascending: the first K of a partial
// Fisher-Yates shuffle of [0, N) driven by rng::counter_stream(seed, update * B + b).
inline std::vector<std::int64_t> memoryllm_dropped_slots(std::uint64_t seed, std::int64_t update, std::int64_t B,
                                                         std::int64_t b, std::int64_t N, std::int64_t K) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(N));
  std::iota(order.begin(), order.end(), std::int64_t{0});
  rng::counter_stream s(seed, static_cast<std::uint64_t>(update * B + b));
  for (std::int64_t i = 0; i < K; ++i) std::swap(order[i], order[i + s.below(N - i)]);
  order.resize(static_cast<std::size_t>(K));
  std::sort(order.begin(), order.end());
  return order;
}

// The self-update: drops K random slots of each row (into the long-term memory under M+) and
// appends h's last K hidden states (see the header).
inline void memoryllm_update(view<const float, 3> h,  // [B, L, D]
                             memory_pool& pool, const memoryllm_options& opt) {
  constexpr const char* fn = "memory::memoryllm_update";
  mnemo::detail::require(!pool.empty(), fn, ": the pool is empty (default-constructed)");
  const std::int64_t B = pool.batch(), N = pool.slots(), D = pool.dim(), K = opt.update_len, L = h.extent(1);
  mnemo::detail::require(K >= 1 && K <= N, fn, ": options.update_len (K) must be in [1, N = ", N, "], got ", K);
  mnemo::detail::require_shape(fn, "h", h, {B, L, D}, " [B, L, D] (B, D from the pool)");
  mnemo::detail::require(L >= K, fn, ": h must hold at least K = ", K, " tokens, got L = ", L);
  const view<float, 3> theta = pool.pool();
  tensor<float, 3> dropped(pool.has_long_term() ? shape_t<3>{B, K, D} : shape_t<3>{0, 0, 0});
  for (std::int64_t b = 0; b < B; ++b) {
    const std::vector<std::int64_t> drop = memoryllm_dropped_slots(opt.seed, pool.updates(), B, b, N, K);
    // Compaction in place: kept slots move down over the dropped ones, in order.
    std::int64_t w = 0;
    std::size_t next_drop = 0;
    for (std::int64_t j = 0; j < N; ++j) {
      if (next_drop < drop.size() && drop[next_drop] == j) {
        if (pool.has_long_term()) std::copy(theta.ptr(b, j), theta.ptr(b, j) + D, dropped.as_view().ptr(b, next_drop));
        ++next_drop;
        continue;
      }
      if (w != j) std::copy(theta.ptr(b, j), theta.ptr(b, j) + D, theta.ptr(b, w));
      ++w;
    }
    for (std::int64_t t = 0; t < K; ++t) std::copy(h.ptr(b, L - K + t), h.ptr(b, L - K + t) + D, theta.ptr(b, N - K + t));
  }
  if (pool.has_long_term()) {
    knn_memory& ltm = pool.long_term();
    const std::int64_t H = ltm.heads(), Dh = D / H;
    const view<const float, 4> per_head(dropped.data(), {B, H, K, Dh}, {K * D, Dh, D, 1});
    ltm.add(per_head, per_head);
  }
  pool.count_update();
}

namespace detail {

struct memoryllm_dims {
  std::int64_t B, H, Lq, Dh, N;
  attention::options aopt;
};

inline memoryllm_dims check_memoryllm_read(const char* fn, const view<const float, 4>& q, const memory_pool& pool,
                                           const view<float, 4>& out, const view<float, 3>& lse,
                                           const memoryllm_options& opt) {
  mnemo::detail::require(!pool.empty(), fn, ": the pool is empty (default-constructed)");
  const std::int64_t B = pool.batch(), H = opt.heads, D = pool.dim(), Lq = q.extent(2);
  mnemo::detail::require(H >= 1 && D % H == 0, fn, ": options.heads must divide D = ", D, ", got ", H);
  const std::int64_t Dh = D / H;
  mnemo::detail::require_shape(fn, "q", q, {B, H, Lq, Dh}, " [B, H, Lq, D / H] (B, D from the pool, H from options.heads)");
  mnemo::detail::require_shape(fn, "out", out, {B, H, Lq, Dh}, " [B, H, Lq, D / H]");
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, {B, H, Lq}, " [B, H, Lq]");
  mnemo::detail::require(std::isfinite(opt.scale) && opt.scale >= 0, fn,
                         ": options.scale must be finite and >= 0 (0: 1/sqrt(D / H)), got ", opt.scale);
  check_threads(fn, opt.threads);
  return {B, H, Lq, Dh, pool.slots(), {.scale = opt.scale, .threads = opt.threads}};
}

// The pool as keys (and values) [B, H, N, Dh], read in place.
inline view<const float, 4> pool_heads(const memory_pool& pool, std::int64_t H) {
  const view<const float, 3> t = pool.pool();
  const std::int64_t D = pool.dim(), Dh = D / H;
  return {t.data(), {pool.batch(), H, pool.slots(), Dh}, {t.stride(0), Dh, t.stride(1), 1}};
}

inline void check_mplus(const char* fn, const memory_pool& pool, std::int64_t topk, const memoryllm_options& opt) {
  mnemo::detail::require(pool.has_long_term(), fn, ": the pool has no long-term memory (long_term_capacity = 0)");
  mnemo::detail::require(pool.long_term().heads() == opt.heads, fn, ": options.heads must be the long-term memory's ",
                         pool.long_term().heads(), " heads, got ", opt.heads);
  mnemo::detail::require(topk >= 1, fn, ": topk must be >= 1, got ", topk);
}

}  // namespace detail

namespace reference {

// Attention over the pool in double (attention::reference).
inline void memoryllm_read(view<const float, 4> q,  // [B, H, Lq, Dh]
                           const memory_pool& pool,
                           view<float, 4> out,       // [B, H, Lq, Dh]
                           view<float, 3> lse = {},  // [B, H, Lq] or empty
                           const memoryllm_options& opt = {}) {
  const auto d = detail::check_memoryllm_read("memory::reference::memoryllm_read", q, pool, out, lse, opt);
  const view<const float, 4> kv = detail::pool_heads(pool, d.H);
  attention::reference<float>(q, kv, kv, out, lse, {}, d.aopt);
}

// M+: the pool and the topk long-term vectors of each query in one softmax, in double.
inline void mplus_read(view<const float, 4> q,  // [B, H, Lq, Dh]
                       const memory_pool& pool, std::int64_t topk,
                       view<float, 4> out,       // [B, H, Lq, Dh]
                       view<float, 3> lse = {},  // [B, H, Lq] or empty
                       const memoryllm_options& opt = {}) {
  constexpr const char* fn = "memory::reference::mplus_read";
  const auto d = detail::check_memoryllm_read(fn, q, pool, out, lse, opt);
  detail::check_mplus(fn, pool, topk, opt);
  tensor<float, 4> o_pool({d.B, d.H, d.Lq, d.Dh}), o_ltm({d.B, d.H, d.Lq, d.Dh});
  tensor<float, 3> l_pool({d.B, d.H, d.Lq}), l_ltm({d.B, d.H, d.Lq});
  memoryllm_read(q, pool, o_pool, l_pool, opt);
  reference::knn_attention(q, pool.long_term(), topk, o_ltm, l_ltm, {.scale = opt.scale, .threads = opt.threads});
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.H; ++h)
      for (std::int64_t i = 0; i < d.Lq; ++i) {
        const double la = l_pool(b, h, i), lb = l_ltm(b, h, i), m = std::max(la, lb);
        const double wa = std::isinf(la) ? 0.0 : std::exp(la - m), wb = std::isinf(lb) ? 0.0 : std::exp(lb - m);
        const double z = wa + wb;
        for (std::int64_t e = 0; e < d.Dh; ++e)
          out(b, h, i, e) = z > 0 ? static_cast<float>((wa * o_pool(b, h, i, e) + wb * o_ltm(b, h, i, e)) / z) : 0.0f;
        if (!lse.empty()) lse(b, h, i) = z > 0 ? static_cast<float>(m + std::log(z)) : detail::minus_inf;
      }
}

}  // namespace reference

// Attention over the pool (attention::flash, the pool read in place); same contract as the reference.
template <class Arch = simd::default_arch>
void memoryllm_read(view<const float, 4> q,  // [B, H, Lq, Dh]
                    const memory_pool& pool,
                    view<float, 4> out,       // [B, H, Lq, Dh]
                    view<float, 3> lse = {},  // [B, H, Lq] or empty
                    const memoryllm_options& opt = {}) {
  const auto d = detail::check_memoryllm_read("memory::memoryllm_read", q, pool, out, lse, opt);
  const view<const float, 4> kv = detail::pool_heads(pool, d.H);
  attention::flash<float, attention::mods::none, Arch>(q, kv, kv, out, lse, {}, d.aopt);
}

// M+ read (flash over the pool, knn_attention over the long-term memory, attention::merge).
template <class Arch = simd::default_arch>
void mplus_read(view<const float, 4> q,  // [B, H, Lq, Dh]
                const memory_pool& pool, std::int64_t topk,
                view<float, 4> out,       // [B, H, Lq, Dh]
                view<float, 3> lse = {},  // [B, H, Lq] or empty
                const memoryllm_options& opt = {}) {
  constexpr const char* fn = "memory::mplus_read";
  const auto d = detail::check_memoryllm_read(fn, q, pool, out, lse, opt);
  detail::check_mplus(fn, pool, topk, opt);
  tensor<float, 4> o_pool({d.B, d.H, d.Lq, d.Dh}), o_ltm({d.B, d.H, d.Lq, d.Dh});
  tensor<float, 3> l_pool({d.B, d.H, d.Lq}), l_ltm({d.B, d.H, d.Lq});
  memoryllm_read<Arch>(q, pool, o_pool, l_pool, opt);
  knn_attention<Arch>(q, pool.long_term(), topk, o_ltm, l_ltm, {.scale = opt.scale, .threads = opt.threads});
  attention::merge<Arch>(o_pool, l_pool, o_ltm, l_ltm, out, lse, opt.threads);
}

}  // namespace mnemo::memory
