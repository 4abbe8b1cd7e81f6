// mnemo/attention/quest.hpp — Quest: query-aware page selection for decode (Tang et al., "Quest:
// Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024), and the selected-block
// decode engine that landmark.hpp and retrieval.hpp share.
//
// Pages. The keys of each (batch, kv head) are cut into pages of `page_size` consecutive positions
// (the last page may be partial). Each page keeps the elementwise minimum and maximum of its keys:
//   mn_p[c] = min_{j in p} k_j[c],   mx_p[c] = max_{j in p} k_j[c].
// For a query q the page's upper bound of q . k is
//   U_p = sum_c max(q_c mn_p[c], q_c mx_p[c])  >=  max_{j in p} q . k_j
// (each term bounds q_c k_j[c] whatever the sign of q_c). Decode scores every page by U_p (with the
// scaled query), keeps the `pages` best per query head, and attends exactly to their keys plus a
// local window of the last `window` keys:
//   sel  = top-`pages` candidate pages by U_p (simd::top_k_indices: ties to the lower page, NaN last)
//   keys = { j in a selected page, j < Lk - window } u { Lk - window <= j < Lk }
//   out  = attention over keys
// which is exactly attention restricted to that key set: the reference is attention::reference
// with that key set as the mask (the tests do that). Candidate pages are the pages that start
// before Lk - window (a page straddling the window edge contributes only its keys outside the
// window, so no key is listed twice).
//
// Shapes: q [B, Hq, 1, D] (one decode step), k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] in f32, f16 or
// bf16, out [B, Hq, 1, Dv], lse [B, Hq, 1] (optional), selected pages [B, Hq, pages] (ascending,
// -1 after the last when fewer candidates exist). Query head h reads kv head h / (Hq / Hkv); each
// query head selects its own pages, the G = Hq / Hkv heads of a group share one read of the page
// metadata (2 D floats per page: at page_size 16 that is 1/8 of the f32 K bytes).
//
// Numerics: bounds, scores, softmax and outputs in f32 (simd::exp), NaN bounds ranked last;
// reference_quest_decode computes the page metadata and bounds in double from k itself.
//
// The selected-block decode (sparse_decode_detail::block_decode) takes any per-block score:
// Quest's bound here, the landmark key's q . k in landmark.hpp. It selects the blocks and lists
// each query head's keys; the split-KV engine (split_kv.hpp) attends over them as a gathered
// source, so the selected keys and the window are one softmax (no merge).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/split_kv.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/dispatch.hpp"
#include "mnemo/simd/math.hpp"
#include "mnemo/simd/select.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::attention {

// Options of the selected-block decodes (Quest pages, landmark blocks).
struct block_select_options {
  std::int64_t blocks = 128;  // blocks (pages) attended per query head, >= 1
  std::int64_t window = 0;    // most recent keys always attended, >= 0
  float scale = 0;            // 0: 1 / sqrt(D)
  int threads = 0;            // 0: the OpenMP default
};
using quest_options = block_select_options;

// Elementwise min / max of the keys of every page, per (batch, kv head); grows with the cache.
class quest_pages {
 public:
  quest_pages() = default;
  quest_pages(std::int64_t B, std::int64_t Hkv, std::int64_t D, std::int64_t page_size)
      : B_(B), Hkv_(Hkv), D_(D), page_(page_size), mn_(static_cast<std::size_t>(B * Hkv)),
        mx_(static_cast<std::size_t>(B * Hkv)) {
    mnemo::detail::require(B >= 1 && Hkv >= 1 && D >= 1, "quest_pages: B, Hkv, D must be >= 1, got B=", B,
                           ", Hkv=", Hkv, ", D=", D);
    mnemo::detail::require(page_size >= 1, "quest_pages: page_size must be >= 1, got ", page_size);
  }

  // Pages of the whole cache k [B, Hkv, Lk, D].
  template <class K>
  static quest_pages build(const K& k, std::int64_t page_size) {
    const auto kv = cview(k);
    quest_pages p(kv.extent(0), kv.extent(1), kv.extent(3), page_size);
    p.update(kv);
    return p;
  }

  // Brings the pages up to date with a cache that grew: k [B, Hkv, Lk, D] holds the keys already
  // summarized (the first size(), unchanged) followed by new ones. Recomputes the last partial
  // page and adds the new pages; O((Lk - size() + page_size) D).
  template <class K>
  void update(const K& kin) {
    constexpr const char* fn = "quest_pages::update";
    const auto k = cview(kin);
    mnemo::detail::require(page_ > 0, fn, ": the pages are empty (default-constructed)");
    const std::int64_t Lk = k.extent(2);
    mnemo::detail::require_shape(fn, "k", k, {B_, Hkv_, Lk, D_}, " [B, Hkv, Lk, D] (B, Hkv, D from the pages)");
    mnemo::detail::require(Lk >= size_, fn, ": k.shape[2] (Lk) must be >= the keys already summarized (", size_,
                           "), got ", Lk);
    const std::int64_t first = size_ / page_, n_pages = (Lk + page_ - 1) / page_;
    for (std::int64_t b = 0; b < B_; ++b)
      for (std::int64_t hk = 0; hk < Hkv_; ++hk) {
        auto& mn = mn_[static_cast<std::size_t>(b * Hkv_ + hk)];
        auto& mx = mx_[static_cast<std::size_t>(b * Hkv_ + hk)];
        mn.resize(static_cast<std::size_t>(n_pages * D_));
        mx.resize(static_cast<std::size_t>(n_pages * D_));
        for (std::int64_t p = first; p < n_pages; ++p) {
          float* lo = mn.data() + p * D_;
          float* hi = mx.data() + p * D_;
          std::fill(lo, lo + D_, std::numeric_limits<float>::infinity());
          std::fill(hi, hi + D_, -std::numeric_limits<float>::infinity());
          for (std::int64_t j = p * page_; j < std::min(Lk, (p + 1) * page_); ++j) {
            const auto* kj = k.ptr(b, hk, j);
            for (std::int64_t c = 0; c < D_; ++c) {
              const float x = to_float(kj[c]);
              lo[c] = std::min(lo[c], x);
              hi[c] = std::max(hi[c], x);
            }
          }
        }
      }
    size_ = Lk;
  }

  std::int64_t batch() const { return B_; }
  std::int64_t kv_heads() const { return Hkv_; }
  std::int64_t dim() const { return D_; }
  std::int64_t page_size() const { return page_; }
  std::int64_t size() const { return size_; }  // keys summarized
  std::int64_t pages() const { return page_ > 0 ? (size_ + page_ - 1) / page_ : 0; }
  bool empty() const { return page_ == 0; }

  // Page p's minimum / maximum, D floats.
  const float* min(std::int64_t b, std::int64_t hk, std::int64_t p) const {
    return mn_[static_cast<std::size_t>(b * Hkv_ + hk)].data() + p * D_;
  }
  const float* max(std::int64_t b, std::int64_t hk, std::int64_t p) const {
    return mx_[static_cast<std::size_t>(b * Hkv_ + hk)].data() + p * D_;
  }

 private:
  std::int64_t B_ = 0, Hkv_ = 0, D_ = 0, page_ = 0, size_ = 0;
  std::vector<std::vector<float>> mn_, mx_;  // per (b, hk): [pages, D]
};

namespace sparse_decode_detail {

// Upper bound of q . k over a page: sum_c max(q_c mn_c, q_c mx_c).
template <class Arch>
float page_bound(const float* q, const float* mn, const float* mx, std::int64_t D) {
  std::int64_t c = 0;
  float sum = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t W = simd::width<Arch>;
    batch acc(0.0f);
    for (; c + W <= D; c += W) {
      const batch qb = batch::load_unaligned(q + c);
      acc += xsimd::max(qb * batch::load_unaligned(mn + c), qb * batch::load_unaligned(mx + c));
    }
    sum = simd::hsum<Arch>(acc);
  }
  for (; c < D; ++c) sum += std::max(q[c] * mn[c], q[c] * mx[c]);
  return sum;
}

// Validated sizes of a selected-block decode.
struct block_dims {
  dims d;
  std::int64_t block;    // keys per block
  std::int64_t n_cand;   // candidate blocks: those that start before Lk - window
  std::int64_t limit;    // Lk - window (clamped to >= 0): keys of part 1 are below it
};

template <class KV>
block_dims check_block_decode(const char* fn, const view<const float, 4>& q, const view<const KV, 4>& k,
                              const view<const KV, 4>& v, const view<float, 4>& out, const view<float, 3>& lse,
                              std::int64_t block, std::int64_t n_blocks, const block_select_options& opt) {
  using mnemo::detail::require;
  const dims d = detail::check_args(fn, q, k, v, out, lse, mods::none{}, options{opt.scale, opt.threads});
  require(d.Lq == 1, fn, ": q.shape[2] (Lq) must be 1 (one decode step), got ", d.Lq);
  require(opt.blocks >= 1, fn, ": options.blocks must be >= 1, got ", opt.blocks);
  require(opt.window >= 0, fn, ": options.window must be >= 0, got ", opt.window);
  const std::int64_t limit = std::max<std::int64_t>(0, d.Lk - opt.window);
  const std::int64_t n_cand = std::min(n_blocks, (limit + block - 1) / block);
  return {d, block, n_cand, limit};
}

// Each row's keys, for the gathered source: keys [B, Hkv, R, cap] and counts [B, Hkv, R].
struct key_lists {
  tensor<std::int64_t, 4> keys;
  tensor<std::int64_t, 3> counts;
};

// The window [limit, Lk) appended to every row's list, and the attention over the lists on the
// split-KV engine (one softmax over the selected keys and the window). scores (optional, [B, Hkv,
// R, cap]) holds the listed keys' scaled scores; the window's are filled in here.
template <class Arch, class KV>
void attend_lists(const dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v, view<float, 4> out,
                  view<float, 3> lse, std::int64_t limit, int threads, key_lists& lists, tensor<float, 4>* scores) {
  const std::int64_t G = d.group();
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, hk = bh % d.Hq / G, r = bh % d.Hq % G;
        std::int64_t& n = lists.counts(b, hk, r);
        for (std::int64_t j = limit; j < d.Lk; ++j, ++n) {
          lists.keys(b, hk, r, n) = j;
          if (scores) (*scores)(b, hk, r, n) = d.scale * simd::dot<Arch>(q.ptr(b, bh % d.Hq, 0), k.ptr(b, hk, j), d.D);
        }
      },
      threads);
  decode_workspace ws;
  const split_kv::gathered_source<KV> src{k, v, cview(lists.keys), cview(lists.counts),
                                          scores ? cview(*scores) : view<const float, 4>{}};
  split_kv::attend<Arch>(d, src, q, out, lse, mods::none{}, threads, ws);
}

// The selected-block decode. score_blocks(b, hk, qs, bs) fills bs[g * n_cand + p] with the score of
// candidate block p for query head g of the group (qs [G, D]: the group's scaled queries).
// `selected` [B, Hq, blocks] (or empty) receives each head's selected blocks.
template <class Arch, class KV, class ScoreBlocks>
void block_decode(const block_dims& bd, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v,
                  view<float, 4> out, view<float, 3> lse, view<std::int64_t, 3> selected, std::int64_t blocks,
                  int threads, ScoreBlocks&& score_blocks) {
  const dims& d = bd.d;
  const std::int64_t G = d.group(), n_sel = std::min(blocks, bd.n_cand);
  const std::int64_t cap = std::max<std::int64_t>(1, n_sel * bd.block + d.Lk - bd.limit);
  key_lists lists{tensor<std::int64_t, 4>({d.B, d.Hkv, G, cap}), tensor<std::int64_t, 3>({d.B, d.Hkv, G})};
  // Dynamic: on a shared machine a statically assigned thread that starts late holds up the call.
  parallel_for_dynamic(
      d.B * d.Hkv,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hkv, hk = bh % d.Hkv;
        std::vector<float> qs(static_cast<std::size_t>(G * d.D));
        for (std::int64_t g = 0; g < G; ++g)
          for (std::int64_t c = 0; c < d.D; ++c) qs[static_cast<std::size_t>(g * d.D + c)] = d.scale * q(b, hk * G + g, 0, c);
        std::vector<float> bs(static_cast<std::size_t>(G * bd.n_cand));
        score_blocks(b, hk, qs.data(), bs.data());
        std::vector<std::int64_t> sel(static_cast<std::size_t>(n_sel));
        simd::top_k_workspace top;
        for (std::int64_t g = 0; g < G; ++g) {
          const std::int64_t h = hk * G + g;
          simd::top_k_indices<Arch>(bs.data() + g * bd.n_cand, bd.n_cand, n_sel, sel.data(), top);
          if (!selected.empty())
            for (std::int64_t i = 0; i < blocks; ++i) selected(b, h, i) = i < n_sel ? sel[static_cast<std::size_t>(i)] : -1;
          // The selected blocks' keys below the window, ascending.
          std::int64_t n = 0;
          for (std::int64_t p : sel)
            for (std::int64_t j = p * bd.block; j < std::min(bd.limit, (p + 1) * bd.block); ++j) lists.keys(b, hk, g, n++) = j;
          lists.counts(b, hk, g) = n;
        }
      },
      threads);
  attend_lists<Arch>(d, q, k, v, out, lse, bd.limit, threads, lists, nullptr);
}

// The key set of a selected-block decode for one head: keys of the listed blocks below `limit`,
// plus [limit, Lk). Used by the references (as a mask) and by tests.
inline std::vector<char> key_set(const std::vector<std::int64_t>& blocks, std::int64_t block, std::int64_t limit,
                                 std::int64_t Lk) {
  std::vector<char> keep(static_cast<std::size_t>(Lk), 0);
  for (std::int64_t p : blocks)
    for (std::int64_t j = p * block; j < std::min(limit, (p + 1) * block); ++j) keep[static_cast<std::size_t>(j)] = 1;
  for (std::int64_t j = limit; j < Lk; ++j) keep[static_cast<std::size_t>(j)] = 1;
  return keep;
}

// Reference attention of one query head over an explicit key set (double, attention::reference).
template <class KV>
void reference_over_keys(view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v, view<float, 4> out,
                         view<float, 3> lse, std::int64_t b, std::int64_t h, std::int64_t hk, const std::vector<char>& keep,
                         float scale) {
  struct key_mask {
    const std::vector<char>* keep;
    bool visible(std::int64_t, std::int64_t kp) const { return (*keep)[static_cast<std::size_t>(kp)] != 0; }
  };
  const auto qh = q.narrow(0, b, 1).narrow(1, h, 1);
  const auto kh = k.narrow(0, b, 1).narrow(1, hk, 1);
  const auto vh = v.narrow(0, b, 1).narrow(1, hk, 1);
  const auto oh = out.narrow(0, b, 1).narrow(1, h, 1);
  const auto lh = lse.empty() ? view<float, 3>{} : lse.narrow(0, b, 1).narrow(1, h, 1);
  reference<KV, key_mask>(qh, kh, vh, oh, lh, key_mask{&keep}, options{scale, 1});
}

// The end of a selected-block decode's reference for head h of batch b: the top `blocks` of the
// blocks' double scores (the fast path's selection rule), written to `selected` (ascending, -1
// padded; may be empty), then attention::reference over their keys below the window and the window.
template <class KV>
void reference_blocks(const block_dims& bd, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v,
                      view<float, 4> out, view<float, 3> lse, view<std::int64_t, 3> selected, std::int64_t blocks,
                      std::int64_t b, std::int64_t h, const std::vector<double>& score) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(std::min(blocks, bd.n_cand)));
  simd::reference_top_k_indices(score.data(), bd.n_cand, static_cast<std::int64_t>(order.size()), order.data());
  if (!selected.empty())
    for (std::int64_t i = 0; i < blocks; ++i)
      selected(b, h, i) = i < static_cast<std::int64_t>(order.size()) ? order[static_cast<std::size_t>(i)] : -1;
  reference_over_keys(q, k, v, out, lse, b, h, h / bd.d.group(), key_set(order, bd.block, bd.limit, bd.d.Lk), bd.d.scale);
}

}  // namespace sparse_decode_detail

namespace detail {

inline void check_quest_pages(const char* fn, const quest_pages& pages, const dims& d) {
  using mnemo::detail::require;
  require(!pages.empty(), fn, ": pages are empty (default-constructed)");
  require(pages.batch() == d.B && pages.kv_heads() == d.Hkv && pages.dim() == d.D, fn,
          ": pages must summarize keys [B, Hkv, *, D] = [", d.B, ", ", d.Hkv, ", *, ", d.D, "], got [",
          pages.batch(), ", ", pages.kv_heads(), ", *, ", pages.dim(), "]");
  require(pages.size() == d.Lk, fn, ": pages must summarize all Lk = ", d.Lk, " keys (call update), got ",
          pages.size());
}

}  // namespace detail

// Quest decode in double: page min/max and bounds computed from k itself, top `blocks` pages per
// query head (the fast path's selection rule: ties to the lower page), then attention::reference
// over the selected keys plus the window. `selected` [B, Hq, blocks] (or empty) receives the pages, as quest_decode's.
template <class KV>
void reference_quest_decode(view<const float, 4> q,  // [B, Hq, 1, D]
                  view<const KV, 4> k,     // [B, Hkv, Lk, D]
                  view<const KV, 4> v,     // [B, Hkv, Lk, Dv]
                  std::int64_t page_size, view<float, 4> out, view<float, 3> lse,
                  view<std::int64_t, 3> selected, const quest_options& opt = {}) {
  constexpr const char* fn = "attention::reference_quest_decode";
  mnemo::detail::require(page_size >= 1, fn, ": page_size must be >= 1, got ", page_size);
  const std::int64_t Lk = k.extent(2);
  const auto bd = sparse_decode_detail::check_block_decode(fn, q, k, v, out, lse, page_size,
                                                           (Lk + page_size - 1) / page_size, opt);
  const dims& d = bd.d;
  if (!selected.empty()) mnemo::detail::require_shape(fn, "selected", selected, {d.B, d.Hq, opt.blocks}, " [B, Hq, blocks]");
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h) {
      const std::int64_t hk = h / d.group();
      std::vector<double> bound(static_cast<std::size_t>(bd.n_cand));
      for (std::int64_t p = 0; p < bd.n_cand; ++p) {
        double u = 0;
        for (std::int64_t c = 0; c < d.D; ++c) {
          double lo = std::numeric_limits<double>::infinity(), hi = -lo;
          for (std::int64_t j = p * page_size; j < std::min(Lk, (p + 1) * page_size); ++j) {
            lo = std::min(lo, static_cast<double>(to_float(k(b, hk, j, c))));
            hi = std::max(hi, static_cast<double>(to_float(k(b, hk, j, c))));
          }
          const double qc = static_cast<double>(d.scale) * q(b, h, 0, c);
          u += std::max(qc * lo, qc * hi);
        }
        bound[static_cast<std::size_t>(p)] = u;
      }
      sparse_decode_detail::reference_blocks(bd, q, k, v, out, lse, selected, opt.blocks, b, h, bound);
    }
}


// Quest decode: top `opt.blocks` pages per query head by their upper bound, exact attention over
// their keys plus the last `opt.window` keys. Runs at the ISA simd::dispatch picks ($MNEMO_ISA). `selected` [B, Hq, blocks] (or empty)
// receives each head's pages (ascending, -1 padded).
template <class KV, class TuArch = simd::default_arch>
void quest_decode(view<const float, 4> q,  // [B, Hq, 1, D]
                  view<const KV, 4> k,     // [B, Hkv, Lk, D]
                  view<const KV, 4> v,     // [B, Hkv, Lk, Dv]
                  const quest_pages& pages, view<float, 4> out,  // [B, Hq, 1, Dv]
                  view<float, 3> lse = {},                       // [B, Hq, 1] or empty
                  const quest_options& opt = {}, view<std::int64_t, 3> selected = {}) {
  constexpr const char* fn = "attention::quest_decode";
  mnemo::detail::require(!pages.empty(), fn, ": pages are empty (default-constructed)");
  const auto bd = sparse_decode_detail::check_block_decode(fn, q, k, v, out, lse, pages.page_size(), pages.pages(), opt);
  detail::check_quest_pages(fn, pages, bd.d);
  if (!selected.empty())
    mnemo::detail::require_shape(fn, "selected", selected, {bd.d.B, bd.d.Hq, opt.blocks}, " [B, Hq, blocks]");
  const std::int64_t G = bd.d.group(), D = bd.d.D, n = bd.n_cand;
  simd::dispatch<TuArch>(simd::level::automatic, [&]<class Arch>() {
    sparse_decode_detail::block_decode<Arch>(
        bd, q, k, v, out, lse, selected, opt.blocks, opt.threads,
        [&](std::int64_t b, std::int64_t hk, const float* qs, float* bs) {
          // Page-major: each page's metadata is read once for the whole group.
          for (std::int64_t p = 0; p < n; ++p) {
            const float* mn = pages.min(b, hk, p);
            const float* mx = pages.max(b, hk, p);
            for (std::int64_t g = 0; g < G; ++g) bs[g * n + p] = sparse_decode_detail::page_bound<Arch>(qs + g * D, mn, mx, D);
          }
        });
  });
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void quest_decode(view<const float, 4> q, const K& k, const V& v, const quest_pages& pages, view<float, 4> out,
                  view<float, 3> lse = {}, const quest_options& opt = {}, view<std::int64_t, 3> selected = {}) {
  quest_decode<element_t<K>, TuArch>(q, cview(k), cview(v), pages, out, lse, opt, selected);
}

}  // namespace mnemo::attention
