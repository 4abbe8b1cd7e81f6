// mnemo/kvcache/attend.hpp — attention of queries over a policy's selection, without a gather
// by hand.
//
//   kvcache::attend_selected(q, k, v, sel, out, lse)
//
//   q    [Hq, Lq, D]     queries (post-RoPE)          k  [Hkv, L, D]   keys in slot order
//   sel  selection        kept slots per kv head       v  [Hkv, L, Dv]  values
//   out  [Hq, Lq, Dv]    out[h, i] = sum_{j in sel.heads[h / G]} p_ij v_j,
//                        p_ij = softmax_j(scale q_hi . k_j)   over the kept slots only
//   lse  [Hq, Lq]        log-sum-exp of those scores, or empty
//
// Every kept slot is visible to every query row: a selection is what the queries may read (a
// decode step, or the evaluation of a policy: the output over the kept slots against the output
// over all of them). Query head h reads kv head h / G, G = Hq / Hkv. A head that keeps no slot
// gives out = 0 and lse = -inf (DESIGN.md: an empty row is not NaN). The kept rows of each head
// are gathered once into a contiguous block and the attention engine runs on it (attention::attend:
// split-KV decode for Lq <= 16, flash above; path::reference for the double-precision check).
// The same selection applied to a cache is layer_cache::compact, after which kvcache::decode reads
// the kept slots in place.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "mnemo/attention/attention.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/selection.hpp"

namespace mnemo::kvcache {

inline void attend_selected(view<const float, 3> q, view<const float, 3> k, view<const float, 3> v, const selection& sel,
                            view<float, 3> out, view<float, 2> lse = {}, const attention::options& opt = {},
                            attention::path p = attention::path::automatic) {
  constexpr const char* fn = "kvcache::attend_selected";
  using mnemo::detail::require;
  mnemo::detail::require_data(fn, "q", q, " [Hq, Lq, D]");
  mnemo::detail::require_data(fn, "k", k, " [Hkv, L, D]");
  require(!v.empty(), fn, ": v [Hkv, L, Dv] must be a non-empty view");
  const std::int64_t Hq = q.extent(0), Lq = q.extent(1), D = q.extent(2);
  const std::int64_t Hkv = k.extent(0), L = k.extent(1), Dv = v.extent(2);
  require(k.extent(2) == D, fn, ": k.shape[2] must equal D = ", D, " (from q), got ", k.extent(2));
  require(Hq % Hkv == 0, fn, ": q.shape[0] (Hq) must be a multiple of Hkv = ", Hkv, " (from k), got ", Hq);
  require(v.extent(0) == Hkv && v.extent(1) == L, fn, ": v must have shape [Hkv = ", Hkv, ", L = ", L, ", Dv], got ",
          shape_string(v.shape()));
  mnemo::detail::require_shape(fn, "out", out, {Hq, Lq, Dv}, " [Hq, Lq, Dv]");
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, {Hq, Lq}, " [Hq, Lq]");
  validate(fn, sel, std::vector<std::int64_t>(static_cast<std::size_t>(Hkv), L));

  const std::int64_t G = Hq / Hkv;
  for (std::int64_t h = 0; h < Hkv; ++h) {
    const auto& rows = sel.heads[static_cast<std::size_t>(h)];
    const auto n = static_cast<std::int64_t>(rows.size());
    if (n == 0) {  // nothing visible: out 0, lse -inf
      for (std::int64_t g = 0; g < G; ++g)
        for (std::int64_t i = 0; i < Lq; ++i) {
          std::fill_n(out.ptr(h * G + g, i), Dv, 0.0f);
          if (!lse.empty()) lse(h * G + g, i) = -std::numeric_limits<float>::infinity();
        }
      continue;
    }
    tensor<float, 4> qh({1, G, Lq, D}), kh({1, 1, n, D}), vh({1, 1, n, Dv}), oh({1, G, Lq, Dv});
    tensor<float, 3> lh({1, G, Lq});
    for (std::int64_t g = 0; g < G; ++g)
      for (std::int64_t i = 0; i < Lq; ++i) std::copy_n(q.ptr(h * G + g, i), D, qh.as_view().ptr(0, g, i));
    for (std::int64_t r = 0; r < n; ++r) {
      std::copy_n(k.ptr(h, rows[static_cast<std::size_t>(r)]), D, kh.as_view().ptr(0, 0, r));
      std::copy_n(v.ptr(h, rows[static_cast<std::size_t>(r)]), Dv, vh.as_view().ptr(0, 0, r));
    }
    attention::attend(cview(qh), cview(kh), cview(vh), oh.as_view(), lh.as_view(), attention::mods::none{}, opt, p);
    for (std::int64_t g = 0; g < G; ++g)
      for (std::int64_t i = 0; i < Lq; ++i) {
        std::copy_n(oh.as_view().ptr(0, g, i), Dv, out.ptr(h * G + g, i));
        if (!lse.empty()) lse(h * G + g, i) = lh(0, g, i);
      }
  }
}

}  // namespace mnemo::kvcache
