// mnemo/memory/compressive_transformer.hpp — the Compressive Transformer (Rae, Potapenko,
// Jayakumar, Hillier & Lillicrap, "Compressive Transformers for Long-Range Sequence Modelling",
// ICLR 2020; arXiv 2019). Not Infini-attention's compressive memory (memory/compressive.hpp).
//
// Per layer a FIFO memory m of n_m past activations and a compressed memory cm of n_cm. For a
// segment h of L tokens (Algorithm 1 of the paper):
//   out    = attention of h over [cm; m; h]        multi-head, causal within the segment
//   m, old = the last n_m of [m; h], and the rest   the oldest fall out of m ...
//   new_cm = f_c(old)                               ... compressed by rate c: ceil(|old| / c) rows
//   cm     = the last n_cm of [cm; new_cm]
// Compression functions f_c (the paper's section 3.1), each over groups of c consecutive evicted
// rows (a last, shorter group of r < c rows uses r rows, as if the rest were zero padding):
//   mean_pool   the mean of the group
//   max_pool    the channel-wise maximum of the group
//   conv        a 1-D convolution with kernel size and stride c: new_g = sum_{i<c} old_{gc+i} W_i,
//               W [c, D, D], full channels (the paper's conv, a learned d x d kernel per tap; the
//               best function in its comparison, used with the reconstruction loss below)
//   most_used   keep the ceil(|old| / c) evicted rows with the largest accumulated attention
//               weight (the sum over every query that attended to the row while it was in m or in
//               its own segment), in time order; ties keep the older row
// Attention-reconstruction loss (the paper's L^attn, trained on the compression network only):
//   L = 1 / (B H L) sum_{b, h, i} || attn(q_i, old) - attn(q_i, new_cm) ||^2
// over the segment's queries, full (unmasked) attention over the evicted rows and over their
// compression. Its value only: a backward is not provided.
//
// Keys and values. The paper compresses a layer's activations and projects [cm; m; h] with the
// layer's W_k, W_v. This module holds the projected keys and values instead (as a KV cache does),
// so f_c is applied to the keys and to the values per head: for mean_pool that is the same thing
// (pooling commutes with a linear projection); max_pool and conv then act per head on keys and
// values (kernels conv_keys [c, D, D] and conv_values [c, Dv, Dv], shared by the heads); most_used
// picks the rows per head. Relative positions: the module takes absolute-position q and k (put
// any rotation into them before the call); the relative terms are memory/segment_recurrence.hpp's.
//
// API: compressive_transformer_memory (the state, save/load), compressive_transformer_attention
// (one step: the read over [cm; m; h], then the write and compression; returns what it evicted,
// compressed and, if asked, L^attn), compressive_transformer_read (the read alone over [cm; m]),
// compress_memories (f_c alone), attention_reconstruction_loss (L^attn alone).
//
// Shapes: q, k [B, H, L, D], v [B, H, L, Dv], out [B, H, L, Dv]; state m [B, H, n_m, D | Dv],
// cm [B, H, n_cm, D | Dv], usage [B, H, n_m] (most_used only). Fill levels are shared by the batch.
// Paths: reference::* run the attention through attention::reference and the compression in
// double; the fast path runs attention::flash (its column sums give most_used's weights), the
// convolution as one GEMM per (batch, head) and the selection through memory::topk.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"
#include "mnemo/memory/segment_recurrence.hpp"

namespace mnemo::memory {

enum class compression { mean_pool, max_pool, conv, most_used };

inline const char* compression_name(compression c) {
  switch (c) {
    case compression::mean_pool: return "mean_pool";
    case compression::max_pool: return "max_pool";
    case compression::conv: return "conv";
    case compression::most_used: return "most_used";
  }
  return "?";
}

struct compressive_transformer_options {
  std::int64_t rate = 3;                       // c >= 1
  compression function = compression::mean_pool;
  view<const float, 3> conv_keys = {};          // [c, D, D]  (conv only)
  view<const float, 3> conv_values = {};          // [c, Dv, Dv] (conv only)
  bool reconstruction_loss = false;            // compute L^attn of the step
  float scale = 0;                             // 0: 1 / sqrt(D)
  int threads = 0;                             // 0: the OpenMP default
};

// What one step did.
struct compressive_step {
  std::int64_t evicted = 0;           // rows that fell out of m
  std::int64_t compressed = 0;        // rows they became (before cm's own capacity cut)
  double reconstruction_loss = 0;     // L^attn (0 unless asked for and something was evicted)
};

// m and cm (keys and values), the usage of m's rows, and their fill levels.
class compressive_transformer_memory {
 public:
  compressive_transformer_memory() = default;
  compressive_transformer_memory(std::int64_t B, std::int64_t H, std::int64_t n_m, std::int64_t n_cm, std::int64_t D,
                                 std::int64_t Dv)
      : mk_((mnemo::detail::require(B >= 1 && H >= 1 && D >= 1 && Dv >= 1 && n_m >= 0 && n_cm >= 0,
                                    "compressive_transformer_memory: B, H, D, Dv must be >= 1 and n_m, n_cm >= 0, got B=",
                                    B, ", H=", H, ", n_m=", n_m, ", n_cm=", n_cm, ", D=", D, ", Dv=", Dv),
             shape_t<4>{B, H, n_m, D})),
        mv_({B, H, n_m, Dv}),
        ck_({B, H, n_cm, D}),
        cv_({B, H, n_cm, Dv}),
        use_({B, H, n_m}) {}

  std::int64_t batch() const { return mk_.extent(0); }
  std::int64_t heads() const { return mk_.extent(1); }
  std::int64_t memory_capacity() const { return mk_.extent(2); }      // n_m
  std::int64_t compressed_capacity() const { return ck_.extent(2); }  // n_cm
  std::int64_t key_dim() const { return mk_.extent(3); }
  std::int64_t value_dim() const { return mv_.extent(3); }
  std::int64_t memory_size() const { return m_len_; }
  std::int64_t compressed_size() const { return c_len_; }
  bool empty() const { return mk_.extent(0) == 0; }
  void clear() { m_len_ = c_len_ = 0; }

  view<const float, 4> memory_keys() const { return mk_.as_view().narrow(2, 0, m_len_); }        // [B, H, m, D]
  view<const float, 4> memory_values() const { return mv_.as_view().narrow(2, 0, m_len_); }      // [B, H, m, Dv]
  view<const float, 4> compressed_keys() const { return ck_.as_view().narrow(2, 0, c_len_); }    // [B, H, cm, D]
  view<const float, 4> compressed_values() const { return cv_.as_view().narrow(2, 0, c_len_); }  // [B, H, cm, Dv]
  view<const float, 3> usage() const { return use_.as_view().narrow(2, 0, m_len_); }             // [B, H, m]

  // <prefix>{mk,mv,ck,cv}.npy (whole capacities), <prefix>usage.npy, <prefix>config.npy (int64: m, cm sizes).
  void save(const std::string& prefix) const {
    mnemo::detail::require(!empty(), "compressive_transformer_memory::save: the memory is empty");
    npy::save(detail::npy_path(prefix, "mk"), mk_);
    npy::save(detail::npy_path(prefix, "mv"), mv_);
    npy::save(detail::npy_path(prefix, "ck"), ck_);
    npy::save(detail::npy_path(prefix, "cv"), cv_);
    npy::save(detail::npy_path(prefix, "usage"), use_);
    detail::save_record(detail::npy_path(prefix, "config"), {m_len_, c_len_});
  }
  static compressive_transformer_memory load(const std::string& prefix) {
    constexpr const char* who = "compressive_transformer_memory::load";
    compressive_transformer_memory m;
    m.mk_ = npy::load<float, 4>(detail::npy_path(prefix, "mk"));
    const std::int64_t B = m.mk_.extent(0), H = m.mk_.extent(1), n_m = m.mk_.extent(2);
    m.mv_ = detail::load_rows(who, prefix, "mv", B, H, n_m);
    m.ck_ = npy::load<float, 4>(detail::npy_path(prefix, "ck"));
    m.cv_ = detail::load_rows(who, prefix, "cv", B, H, m.ck_.extent(2));
    mnemo::detail::require(m.ck_.extent(0) == B && m.ck_.extent(1) == H && m.ck_.extent(3) == m.mk_.extent(3) &&
                               m.cv_.extent(3) == m.mv_.extent(3),
                           who, ": ", prefix, "ck.npy / cv.npy: expected B, H, D, Dv as in mk.npy / mv.npy, got ",
                           shape_string(m.ck_.shape()), " and ", shape_string(m.cv_.shape()));
    m.use_ = detail::load_checked<3>(detail::npy_path(prefix, "usage"), {B, H, n_m});
    m.m_len_ = detail::load_size(who, prefix, n_m, 0, 2);
    m.c_len_ = detail::load_size(who, prefix, m.ck_.extent(2), 1, 2);
    return m;
  }

 private:
  template <bool Exact>
  friend compressive_step compressive_transformer_step(const char*, view<const float, 4>, view<const float, 4>,
                                                       view<const float, 4>, compressive_transformer_memory&,
                                                       view<float, 4>, const compressive_transformer_options&);
  tensor<float, 4> mk_, mv_, ck_, cv_;
  tensor<float, 3> use_;
  std::int64_t m_len_ = 0, c_len_ = 0;
};

namespace detail {

inline void check_compression(const char* fn, const compressive_transformer_options& opt, std::int64_t D,
                              std::int64_t Dv) {
  mnemo::detail::require(opt.rate >= 1, fn, ": options.rate must be >= 1, got ", opt.rate);
  check_threads(fn, opt.threads);
  check_scale(fn, opt.scale);
  if (opt.function == compression::conv) {
    mnemo::detail::require_shape(fn, "options.conv_keys", opt.conv_keys, {opt.rate, D, D}, " [rate, D, D] (conv)");
    mnemo::detail::require_shape(fn, "options.conv_values", opt.conv_values, {opt.rate, Dv, Dv},
                                 " [rate, Dv, Dv] (conv)");
  }
}

inline std::int64_t compressed_rows(std::int64_t n, std::int64_t c) { return (n + c - 1) / c; }

// The rows of x [n, Dx] (one head, row stride ld) compressed by mean/max pooling or the conv
// kernel w [c, Dx, Dx], into dst (row stride ldd); T = double (the reference) or float.
template <class T>
void pool_or_conv(compression f, std::int64_t c, const float* x, std::int64_t ld, std::int64_t n, std::int64_t Dx,
                  const view<const float, 3>& w, float* dst, std::int64_t ldd) {
  std::vector<T> acc(static_cast<std::size_t>(Dx));
  for (std::int64_t g0 = 0, g = 0; g0 < n; g0 += c, ++g) {
    const std::int64_t r = std::min(c, n - g0);
    std::fill(acc.begin(), acc.end(), f == compression::max_pool ? -std::numeric_limits<T>::infinity() : T(0));
    for (std::int64_t i = 0; i < r; ++i) {
      const float* row = x + (g0 + i) * ld;
      if (f == compression::conv) {
        for (std::int64_t j = 0; j < Dx; ++j)
          for (std::int64_t o = 0; o < Dx; ++o) acc[o] += static_cast<T>(row[j]) * static_cast<T>(w(i, j, o));
      } else {
        for (std::int64_t j = 0; j < Dx; ++j)
          acc[j] = f == compression::max_pool ? std::max<T>(acc[j], row[j]) : acc[j] + static_cast<T>(row[j]);
      }
    }
    for (std::int64_t j = 0; j < Dx; ++j)
      dst[g * ldd + j] = static_cast<float>(f == compression::mean_pool ? acc[j] / static_cast<T>(r) : acc[j]);
  }
}

// The fast conv: complete groups as one GEMM [ng, c Dx] x [c Dx, Dx], the last partial group with
// its first r taps.
inline void conv_fast(std::int64_t c, const float* x, std::int64_t ld, std::int64_t n, std::int64_t Dx,
                      const matrix& w, float* dst, std::int64_t ldd, matrix& xs) {
  const std::int64_t rows = compressed_rows(n, c);
  xs.resize(rows, c * Dx);
  xs.setZero();
  for (std::int64_t t = 0; t < n; ++t) std::copy_n(x + t * ld, Dx, xs.data() + t * Dx);
  outer_stride_map out(dst, rows, Dx, Eigen::OuterStride<>(ldd));
  gemm<accumulate::assign>(out, xs, w);  // the zero-filled tail of a partial group adds nothing
}

// The indices (ascending) of the `keep` largest usages of one head's n rows.
template <bool Exact>
void most_used_rows(const float* usage, std::int64_t n, std::int64_t keep, std::vector<std::int64_t>& idx,
                    topk_workspace& ws, std::vector<float>& vals) {
  idx.resize(static_cast<std::size_t>(n));
  vals.resize(static_cast<std::size_t>(n));
  std::int64_t got;
  if constexpr (Exact) got = reference::topk(usage, n, keep, vals.data(), idx.data());
  else got = topk(usage, n, keep, vals.data(), idx.data(), ws);
  idx.resize(static_cast<std::size_t>(got));
  std::sort(idx.begin(), idx.end());
}

template <bool Exact>
void compress(const char* fn, view<const float, 4> keys, view<const float, 4> values, view<const float, 3> usage,
              const compressive_transformer_options& opt, view<float, 4> out_keys, view<float, 4> out_values) {
  const std::int64_t B = keys.extent(0), H = keys.extent(1), n = keys.extent(2), D = keys.extent(3),
                     Dv = values.extent(3), c = opt.rate;
  check_compression(fn, opt, D, Dv);
  const std::int64_t nc = compressed_rows(n, c);
  mnemo::detail::require_shape(fn, "values", values, {B, H, n, Dv}, " [B, H, n, Dv] (B, H, n from keys)");
  mnemo::detail::require_shape(fn, "out_keys", out_keys, {B, H, nc, D}, " [B, H, ceil(n / rate), D]");
  mnemo::detail::require_shape(fn, "out_values", out_values, {B, H, nc, Dv}, " [B, H, ceil(n / rate), Dv]");
  if (opt.function == compression::most_used)
    mnemo::detail::require_shape(fn, "usage", usage, {B, H, n}, " [B, H, n] (most_used)");
  matrix wk, wv;
  if (!Exact && opt.function == compression::conv) {
    wk.resize(c * D, D);
    wv.resize(c * Dv, Dv);
    for (std::int64_t i = 0; i < c; ++i)
      for (std::int64_t j = 0; j < D; ++j)
        for (std::int64_t o = 0; o < D; ++o) wk(i * D + j, o) = opt.conv_keys(i, j, o);
    for (std::int64_t i = 0; i < c; ++i)
      for (std::int64_t j = 0; j < Dv; ++j)
        for (std::int64_t o = 0; o < Dv; ++o) wv(i * Dv + j, o) = opt.conv_values(i, j, o);
  }
  for_each_item(B * H, opt.threads, !Exact, [&](std::int64_t bh) {
    const std::int64_t b = bh / H, h = bh % H;
    if (n == 0) return;
    const float* xk = keys.ptr(b, h);
    const float* xv = values.ptr(b, h);
    float* dk = out_keys.ptr(b, h);
    float* dv = out_values.ptr(b, h);
    const std::int64_t ldk = keys.stride(2), ldv = values.stride(2), lok = out_keys.stride(2), lov = out_values.stride(2);
    if (opt.function == compression::most_used) {
      std::vector<std::int64_t> idx;
      std::vector<float> vals;
      topk_workspace ws;
      std::vector<float> u(static_cast<std::size_t>(n));
      for (std::int64_t t = 0; t < n; ++t) u[t] = usage(b, h, t);
      most_used_rows<Exact>(u.data(), n, nc, idx, ws, vals);
      for (std::size_t g = 0; g < idx.size(); ++g) {
        std::copy_n(xk + idx[g] * ldk, D, dk + static_cast<std::int64_t>(g) * lok);
        std::copy_n(xv + idx[g] * ldv, Dv, dv + static_cast<std::int64_t>(g) * lov);
      }
    } else if (!Exact && opt.function == compression::conv) {
      matrix xs;
      conv_fast(c, xk, ldk, n, D, wk, dk, lok, xs);
      conv_fast(c, xv, ldv, n, Dv, wv, dv, lov, xs);
    } else {
      using T = std::conditional_t<Exact, double, float>;
      pool_or_conv<T>(opt.function, c, xk, ldk, n, D, opt.conv_keys, dk, lok);
      pool_or_conv<T>(opt.function, c, xv, ldv, n, Dv, opt.conv_values, dv, lov);
    }
  });
}

template <bool Exact>
double reconstruction_loss(const char* fn, view<const float, 4> q, view<const float, 4> old_k,
                           view<const float, 4> old_v, view<const float, 4> new_k, view<const float, 4> new_v,
                           const compressive_transformer_options& opt) {
  const std::int64_t B = q.extent(0), H = q.extent(1), L = q.extent(2), D = q.extent(3), Dv = old_v.extent(3);
  mnemo::detail::require_shape(fn, "old_k", old_k, {B, H, old_k.extent(2), D}, " [B, H, n, D] (B, H, D from q)");
  mnemo::detail::require_shape(fn, "old_v", old_v, {B, H, old_k.extent(2), Dv}, " [B, H, n, Dv] (n from old_k)");
  mnemo::detail::require_shape(fn, "new_k", new_k, {B, H, new_k.extent(2), D}, " [B, H, n', D]");
  mnemo::detail::require_shape(fn, "new_v", new_v, {B, H, new_k.extent(2), Dv}, " [B, H, n', Dv]");
  check_threads(fn, opt.threads);
  check_scale(fn, opt.scale);
  if (B * H * L == 0) return 0;
  tensor<float, 4> a({B, H, L, Dv}), c({B, H, L, Dv});
  const attention::options ao{.scale = opt.scale, .threads = opt.threads};
  attend<Exact, attention::mods::none>(q, old_k, old_v, a, {}, ao);
  attend<Exact, attention::mods::none>(q, new_k, new_v, c, {}, ao);
  double sum = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) {
    const double e = double(a.data()[i]) - double(c.data()[i]);
    sum += e * e;
  }
  return sum / static_cast<double>(B * H * L);
}

}  // namespace detail

template <bool Exact>
compressive_step compressive_transformer_step(const char* fn, view<const float, 4> q, view<const float, 4> k,
                                              view<const float, 4> v, compressive_transformer_memory& mem,
                                              view<float, 4> out, const compressive_transformer_options& opt) {
  mnemo::detail::require(!mem.empty(), fn, ": memory is empty (default-constructed)");
  const std::int64_t B = mem.batch(), H = mem.heads(), D = mem.key_dim(), Dv = mem.value_dim();
  const std::int64_t L = detail::check_segment(fn, q, k, v, out, B, H, D, Dv, opt.threads,
                                               " [B, H, L, D] (B, H, D from the memory)");
  detail::check_compression(fn, opt, D, Dv);
  const std::int64_t nc = mem.c_len_, nm = mem.m_len_, n_m = mem.memory_capacity(), n_cm = mem.compressed_capacity();
  const bool most_used = opt.function == compression::most_used;

  // out = attention over [cm; m; h], causal within h (bottom-right: Lk = nc + nm + L).
  const std::int64_t total = nm + L;
  tensor<float, 4> kc({B, H, nc + total, D}), vc({B, H, nc + total, Dv});
  detail::copy_rows(mem.compressed_keys(), 0, kc, 0, nc);
  detail::copy_rows(mem.memory_keys(), 0, kc, nc, nm);
  detail::copy_rows(k, 0, kc, nc + nm, L);
  detail::copy_rows(mem.compressed_values(), 0, vc, 0, nc);
  detail::copy_rows(mem.memory_values(), 0, vc, nc, nm);
  detail::copy_rows(v, 0, vc, nc + nm, L);
  const view<const float, 4> km = cview(kc).narrow(2, nc, total), vm = cview(vc).narrow(2, nc, total);  // [m; h]
  tensor<float, 3> sums(most_used ? shape_t<3>{B, H, nc + total} : shape_t<3>{0, 0, 0});
  tensor<float, 3> use(most_used ? shape_t<3>{B, H, total} : shape_t<3>{0, 0, 0});
  detail::attend<Exact>(q, kc, vc, out, {}, detail::attention_options({opt.scale, opt.threads}),
                        most_used ? attention::column_sums{sums, 0} : attention::column_sums{});
  if (most_used)
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t t = 0; t < total; ++t) use(b, h, t) = (t < nm ? mem.use_(b, h, t) : 0.0f) + sums(b, h, nc + t);

  // m keeps the last n_m rows of [m; h]; the n_old before them are compressed into cm.
  const std::int64_t kept = std::min(total, n_m), n_old = total - kept;
  const std::int64_t n_new = n_cm > 0 ? detail::compressed_rows(n_old, opt.rate) : 0;
  compressive_step step{n_old, n_new, 0.0};
  if (n_new > 0) {
    const auto old_k = km.narrow(2, 0, n_old), old_v = vm.narrow(2, 0, n_old);
    const auto old_use = most_used ? cview(use).narrow(2, 0, n_old) : view<const float, 3>{};
    tensor<float, 4> new_k({B, H, n_new, D}), new_v({B, H, n_new, Dv});
    detail::compress<Exact>(fn, old_k, old_v, old_use, opt, new_k, new_v);
    if (opt.reconstruction_loss)
      step.reconstruction_loss = detail::reconstruction_loss<Exact>(fn, q, old_k, old_v, new_k, new_v, opt);
    // cm = the last n_cm rows of [cm; new_cm]
    const std::int64_t c_total = nc + n_new, c_kept = std::min(c_total, n_cm);
    const std::int64_t old_c_kept = std::max<std::int64_t>(nc - (c_total - c_kept), 0);
    detail::copy_rows(mem.ck_, nc - old_c_kept, mem.ck_, 0, old_c_kept);
    detail::copy_rows(mem.cv_, nc - old_c_kept, mem.cv_, 0, old_c_kept);
    detail::copy_rows(new_k, n_new - (c_kept - old_c_kept), mem.ck_, old_c_kept, c_kept - old_c_kept);
    detail::copy_rows(new_v, n_new - (c_kept - old_c_kept), mem.cv_, old_c_kept, c_kept - old_c_kept);
    mem.c_len_ = c_kept;
  }
  detail::copy_rows(km, n_old, mem.mk_, 0, kept);
  detail::copy_rows(vm, n_old, mem.mv_, 0, kept);
  if (most_used)
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h) std::copy_n(use.data() + (b * H + h) * total + n_old, kept, mem.use_.as_view().ptr(b, h));
  mem.m_len_ = kept;
  return step;
}

namespace detail {

template <bool Exact>
void compressive_read(const char* fn, view<const float, 4> q, const compressive_transformer_memory& mem,
                      view<float, 4> out, const segment_options& opt) {
  mnemo::detail::require(!mem.empty(), fn, ": memory is empty (default-constructed)");
  const tensor<float, 4> k = concat_tokens(mem.compressed_keys(), mem.memory_keys()),
                         v = concat_tokens(mem.compressed_values(), mem.memory_values());
  memory_read<Exact>(fn, q, k, v, out, opt);
}

}  // namespace detail

namespace reference {

// The read alone: attention of q over [cm; m], no mask (the memory does not change). In double.
inline void compressive_transformer_read(view<const float, 4> q,  // [B, H, Lq, D]
                                         const compressive_transformer_memory& memory,
                                         view<float, 4> out,  // [B, H, Lq, Dv]
                                         const segment_options& opt = {}) {
  detail::compressive_read<true>("memory::reference::compressive_transformer_read", q, memory, out, opt);
}

// One step of the Compressive Transformer (see the header), in double.
inline compressive_step compressive_transformer_attention(view<const float, 4> q,  // [B, H, L, D]
                                                          view<const float, 4> k,  // [B, H, L, D]
                                                          view<const float, 4> v,  // [B, H, L, Dv]
                                                          compressive_transformer_memory& memory,  // in and out
                                                          view<float, 4> out,  // [B, H, L, Dv]
                                                          const compressive_transformer_options& opt = {}) {
  return compressive_transformer_step<true>("memory::reference::compressive_transformer_attention", q, k, v, memory,
                                            out, opt);
}

// f_c of n rows: out [B, H, ceil(n / rate), D | Dv]; usage [B, H, n] for most_used (else empty).
inline void compress_memories(view<const float, 4> keys,    // [B, H, n, D]
                              view<const float, 4> values,  // [B, H, n, Dv]
                              view<const float, 3> usage,   // [B, H, n] or empty
                              const compressive_transformer_options& opt,
                              view<float, 4> out_keys,     // [B, H, ceil(n / rate), D]
                              view<float, 4> out_values) {  // [B, H, ceil(n / rate), Dv]
  detail::compress<true>("memory::reference::compress_memories", keys, values, usage, opt, out_keys, out_values);
}

// L^attn: mean over (b, h, query) of ||attn(q, old) - attn(q, new)||^2, unmasked attention.
inline double attention_reconstruction_loss(view<const float, 4> q,      // [B, H, L, D]
                                            view<const float, 4> old_k,  // [B, H, n, D]
                                            view<const float, 4> old_v,  // [B, H, n, Dv]
                                            view<const float, 4> new_k,  // [B, H, n', D]
                                            view<const float, 4> new_v,  // [B, H, n', Dv]
                                            const compressive_transformer_options& opt = {}) {
  return detail::reconstruction_loss<true>("memory::reference::attention_reconstruction_loss", q, old_k, old_v, new_k,
                                           new_v, opt);
}

}  // namespace reference

// One step (attention::flash, GEMM conv, SIMD top-k); same contract as the reference.
inline compressive_step compressive_transformer_attention(view<const float, 4> q,  // [B, H, L, D]
                                                          view<const float, 4> k,  // [B, H, L, D]
                                                          view<const float, 4> v,  // [B, H, L, Dv]
                                                          compressive_transformer_memory& memory,  // in and out
                                                          view<float, 4> out,  // [B, H, L, Dv]
                                                          const compressive_transformer_options& opt = {}) {
  return compressive_transformer_step<false>("memory::compressive_transformer_attention", q, k, v, memory, out, opt);
}

// The read alone (attention::flash); same contract as reference::compressive_transformer_read.
inline void compressive_transformer_read(view<const float, 4> q,  // [B, H, Lq, D]
                                         const compressive_transformer_memory& memory,
                                         view<float, 4> out,  // [B, H, Lq, Dv]
                                         const segment_options& opt = {}) {
  detail::compressive_read<false>("memory::compressive_transformer_read", q, memory, out, opt);
}

inline void compress_memories(view<const float, 4> keys, view<const float, 4> values, view<const float, 3> usage,
                              const compressive_transformer_options& opt, view<float, 4> out_keys,
                              view<float, 4> out_values) {
  detail::compress<false>("memory::compress_memories", keys, values, usage, opt, out_keys, out_values);
}

inline double attention_reconstruction_loss(view<const float, 4> q, view<const float, 4> old_k,
                                            view<const float, 4> old_v, view<const float, 4> new_k,
                                            view<const float, 4> new_v, const compressive_transformer_options& opt = {}) {
  return detail::reconstruction_loss<false>("memory::attention_reconstruction_loss", q, old_k, old_v, new_k, new_v, opt);
}

}  // namespace mnemo::memory
