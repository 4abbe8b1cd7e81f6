// mnemo/attention/mods.hpp — masks and score modifications, composed at compile time: the whole
// mod contract, in one place.
//
// A mod is a small functor passed as a template parameter (FlexAttention's mask_mod/score_mod,
// resolved by the compiler instead of a JIT). It may provide any of these members; the free
// functions of the same names in namespace mods (below) give every kernel one way to call them,
// with the defaults of a mod that leaves the member out:
//
//   bool visible(int64 h, int64 qp, int64 kp) const
//        may query position qp of query head h see key kp?                 default: true
//        (the head-less `visible(qp, kp)` of earlier versions is still accepted: a mod that
//        provides only that form is the same mask for every head)
//   tile block(int64 q0, int64 q1, int64 k0, int64 k1) const
//        classify the tile of query positions [q0, q1) x key positions [k0, k1), for every head:
//        tile::empty (nothing visible: skip it), tile::full (everything visible: no per-element
//        checks), tile::partial (check each element; a per-head mask whose heads differ on a
//        tile says partial there).                          default: partial with visible, else full
//   void mask_tile(float* s, int64 ld, int64 h, int64 qp0, int64 qn, int64 k0, int64 kn) const
//        bulk masking of a key-major tile (flash's S^T = K Q^T): s[j * ld + i] = -inf for every
//        key k0 + j (j < kn) the query at qp0 + i (i < qn) of head h may not see, every other
//        element untouched: exactly the elements where visible(h, qp0 + i, k0 + j) is false, in
//        runs instead of qn * kn visible() calls (fill_masked and friends below help).
//                                                           default: visible() per element
//   S    score(S s, int64 h, int64 qp, int64 kp) const      (S = float and double)
//        rewrite the scaled score s.                                       default: s
//   S    score_derivative(S s, int64 h, int64 qp, int64 kp) const
//        d score / d s at s, for the backward pass (flash_backward.hpp); a score mod without it is
//        forward-only.                                                     default (no score): 1
//   template <class Arch>
//   void score_tile(float* s, float* g, int64 ld, int64 kn, int64 qn, int64 nq, int64 h,
//                   int64 qp0, int64 k0) const
//        score() over a key-major tile in vector loops (simd::softcap_columns, alibi_columns):
//        s[j * ld + i] for keys k0 + j (j < kn) and query positions qp0 + i of head h; the tile
//        is nq columns wide (a multiple of the SIMD width of Arch), the queries i >= qn are
//        padding whose finite scores are never used (rewrite them or not). g: null in the
//        forward; in the backward g[j * ld + i] *= score_derivative at the same element (the
//        chain rule through composed mods).            default: score() per element, i < qn
//   void validate(const char* fn, int64 Hq, int64 Lq, int64 Lk) const
//        throw mnemo::error if the mod does not fit the call (slopes per head, ids per key, ...)
//
// The built-in mods below (and the sparse patterns of sparse.hpp) use exactly these members, so
// kernels hold no switch on a mod's type and a user's mod written the same way runs as fast.
//
// The head. reference, flash, flash_backward, sparse::attention, the split-KV engine (decode,
// the cache decode, attention::paged, quest/landmark/retrieval) and the top-k references pass
// each query head to visible() and mask_tile(). The fast top-k selection still asks the head-less
// mods::visible(mod, qp, kp), i.e. head 0, once for the whole kv group: a mask that differs per
// head is not for it yet.
//
// Positions. Kernels pass query positions on the key axis: query row i of Lq sits at
// qp = i + (Lk - Lq) (the bottom-right aligned diagonal, DESIGN.md), keys at kp = j. So a mod
// never needs Lq or Lk, and prefill-with-cache and decode obey the same rule. With Lq > Lk the
// first rows have qp < 0 and see no key under a causal mask.
//
// Score pipeline (DESIGN.md): s = scale * q.k, then the score mods in the order they are
// composed, then the mask, then softmax. Compose softcap before alibi to follow the
// flash-attention order the golden cases use: all_of(softcap{30}, alibi{slopes}, causal{}).
//
// Compositions: all_of(m...) (visible where every part is, score mods in order) and
// any_of(m...) (visible where any part is; masks only).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/gemm.hpp"

namespace mnemo::attention {

enum class tile { empty, partial, full };

// One concept per member of the contract.
template <class M>
concept has_head_visible = requires(const M& m, std::int64_t i) {
  { m.visible(i, i, i) } -> std::convertible_to<bool>;
};
template <class M>
concept has_headless_visible = requires(const M& m, std::int64_t i) {
  { m.visible(i, i) } -> std::convertible_to<bool>;
};
template <class M>
concept has_visible = has_head_visible<M> || has_headless_visible<M>;
template <class M>
concept has_score = requires(const M& m, float s, double d, std::int64_t i) {
  { m.score(s, i, i, i) } -> std::convertible_to<float>;
  { m.score(d, i, i, i) } -> std::convertible_to<double>;
};
template <class M>
concept has_score_derivative = requires(const M& m, float s, double d, std::int64_t i) {
  { m.score_derivative(s, i, i, i) } -> std::convertible_to<float>;
  { m.score_derivative(d, i, i, i) } -> std::convertible_to<double>;
};
// d score / d s is known: no score mod, or one with score_derivative.
template <class M>
concept has_known_derivative = !has_score<M> || has_score_derivative<M>;
template <class M>
concept has_block = requires(const M& m, std::int64_t i) {
  { m.block(i, i, i, i) } -> std::same_as<tile>;
};
template <class M>
concept has_mask_tile = requires(const M& m, float* s, std::int64_t i) {
  { m.mask_tile(s, i, i, i, i, i, i) } -> std::same_as<void>;
};
// The head-less mask_tile(s, ld, qp0, qn, k0, kn) of earlier versions.
template <class M>
concept has_headless_mask_tile = requires(const M& m, float* s, std::int64_t i) {
  { m.mask_tile(s, i, i, i, i, i) } -> std::same_as<void>;
};
template <class M, class Arch>
concept has_score_tile = requires(const M& m, float* s, std::int64_t i) {
  m.template score_tile<Arch>(s, s, i, i, i, i, i, i, i);
};
template <class M>
concept has_validate = requires(const M& m, std::int64_t i) { m.validate("", i, i, i); };

namespace mods {

// ---------------------------------------------------------------------------------------------
// Uniform access for kernels: the member when the mod has it, else the default of the contract.

template <class M>
inline bool visible(const M& m, std::int64_t h, std::int64_t qp, std::int64_t kp) {
  if constexpr (has_head_visible<M>) return m.visible(h, qp, kp);
  else if constexpr (has_headless_visible<M>) return m.visible(qp, kp);
  else return true;
}

// The head-less form, for callers written before masks saw the head: the mask of head 0, which
// is every head's for all the built-in mods. Kernels that know the head pass it.
template <class M>
inline bool visible(const M& m, std::int64_t qp, std::int64_t kp) {
  return mods::visible(m, 0, qp, kp);
}

template <class M, class S>
inline S score(const M& m, S s, std::int64_t h, std::int64_t qp, std::int64_t kp) {
  if constexpr (has_score<M>) return m.score(s, h, qp, kp);
  else return s;
}

template <class M, class S>
inline S score_derivative(const M& m, S s, std::int64_t h, std::int64_t qp, std::int64_t kp) {
  static_assert(has_known_derivative<M>,
                "attention backward: a score mod must provide `S score_derivative(S s, int64 h, int64 qp, int64 kp) "
                "const` (d score / d s) so its gradient can be computed");
  if constexpr (has_score<M>) return m.score_derivative(s, h, qp, kp);
  else return S(1);
}

template <class M>
inline tile classify(const M& m, std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) {
  if (q0 >= q1 || k0 >= k1) return tile::empty;
  if constexpr (has_block<M>) return m.block(q0, q1, k0, k1);
  else if constexpr (has_visible<M>) return tile::partial;
  else return tile::full;
}

template <class M>
inline void validate(const M& m, const char* fn, std::int64_t Hq, std::int64_t Lq, std::int64_t Lk) {
  if constexpr (has_validate<M>) m.validate(fn, Hq, Lq, Lk);
}

// -inf over a key-major tile where visible(h, qp0 + i, k0 + j) is false (see mask_tile above).
template <class M>
void mask_tile(const M& m, float* s, std::int64_t ld, std::int64_t h, std::int64_t qp0, std::int64_t qn,
               std::int64_t k0, std::int64_t kn) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  if constexpr (!has_visible<M>) {
    return;
  } else if constexpr (has_mask_tile<M>) {
    m.mask_tile(s, ld, h, qp0, qn, k0, kn);
  } else if constexpr (has_headless_mask_tile<M>) {
    m.mask_tile(s, ld, qp0, qn, k0, kn);
  } else {
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < qn; ++i)
        if (!mods::visible(m, h, qp0 + i, k0 + j)) s[j * ld + i] = neg_inf;
  }
}

// The score mods over a key-major tile, g *= their derivative when g is not null (see
// score_tile above). A score mod without score_tile is called per element for the real queries.
template <class Arch, class M>
void score_tile(const M& m, float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t qn, std::int64_t nq,
                std::int64_t h, std::int64_t qp0, std::int64_t k0) {
  if constexpr (!has_score<M>) {
    return;
  } else if constexpr (has_score_tile<M, Arch>) {
    m.template score_tile<Arch>(s, g, ld, kn, qn, nq, h, qp0, k0);
  } else {
    if constexpr (has_score_derivative<M>) {
      if (g != nullptr) {  // the backward: the derivative at the score before the mod
        for (std::int64_t j = 0; j < kn; ++j)
          for (std::int64_t i = 0; i < qn; ++i) {
            float& x = s[j * ld + i];
            g[j * ld + i] *= m.score_derivative(x, h, qp0 + i, k0 + j);
            x = m.score(x, h, qp0 + i, k0 + j);
          }
        return;
      }
    }
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < qn; ++i) {
        float& x = s[j * ld + i];
        x = m.score(x, h, qp0 + i, k0 + j);
      }
  }
}

// ---------------------------------------------------------------------------------------------
// Helpers for writing mask_tile: per key row the visible queries are usually an interval or a
// few, so a row costs a few fills.

inline constexpr float masked = -std::numeric_limits<float>::infinity();

// row[i] = -inf for i in [a, b) (nothing when a >= b).
inline void fill_masked(float* row, std::int64_t a, std::int64_t b) {
  for (std::int64_t i = a; i < b; ++i) row[i] = masked;
}

// The rectangle of queries [i0, i1) x keys [j0, j1) of a key-major tile.
inline void fill_masked_rect(float* s, std::int64_t ld, std::int64_t i0, std::int64_t i1, std::int64_t j0,
                             std::int64_t j1) {
  for (std::int64_t j = j0; j < j1; ++j) fill_masked(s + j * ld, i0, i1);
}

// min(max(x, lo), hi): a position turned into a row of the tile.
inline std::int64_t clamp_to(std::int64_t x, std::int64_t lo, std::int64_t hi) { return std::min(std::max(x, lo), hi); }

// ---------------------------------------------------------------------------------------------
// Built-in mods.

// No mask, no score change.
struct none {};

// Bottom-right causal: key kp is visible iff kp <= qp.
struct causal {
  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const { return kp <= qp; }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    if (k0 > q1 - 1) return tile::empty;
    if (k1 - 1 <= q0) return tile::full;
    return tile::partial;
  }
  // Per key row kp the queries qp < kp are masked.
  void mask_tile(float* s, std::int64_t ld, std::int64_t, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    for (std::int64_t j = 0; j < kn; ++j) fill_masked(s + j * ld, 0, clamp_to(k0 + j - qp0, 0, qn));
  }
};

// Causal sliding window of `size` keys ending at the diagonal: qp - size < kp <= qp.
// Written as distances, qp - kp < size, never as qp - size: positions are bounded by the lengths,
// so a distance cannot overflow, while qp - size does for a huge size and a negative qp (Lq > Lk).
// A size at least the number of positions is therefore the same as causal{} (no window).
struct sliding_window {
  std::int64_t size = 0;

  // Distances, not qp - size: a huge window (INT64_MAX) must not overflow; it is no window.
  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const { return kp <= qp && qp - kp < size; }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    // nearest pair (q1 - 1, k0) beyond the diagonal, or farthest pair (q0, k1 - 1) out of the window
    if (k0 > q1 - 1 || q0 - (k1 - 1) >= size) return tile::empty;
    // every pair on or below the diagonal, and the farthest (q1 - 1, k0) inside the window
    if (k1 - 1 <= q0 && (q1 - 1) - k0 < size) return tile::full;
    return tile::partial;
  }
  // Per key row kp the queries kp <= qp < kp + size stay.
  void mask_tile(float* s, std::int64_t ld, std::int64_t, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    for (std::int64_t j = 0; j < kn; ++j) {
      float* row = s + j * ld;
      // queries qp0 + i with d <= i < d + size, d = k0 + j - qp0; compared without forming d + size
      const std::int64_t d = k0 + j - qp0, a = clamp_to(d, 0, qn), b = size > qn - d ? qn : clamp_to(d + size, a, qn);
      fill_masked(row, 0, a);
      fill_masked(row, b, qn);
    }
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t) const {
    detail::require(size > 0, fn, ": sliding_window.size must be > 0, got ", size);
  }
};

// Prefix-LM: keys in the prefix [0, prefix) are visible to every query (bidirectional prefix),
// later keys causally.
struct prefix_lm {
  std::int64_t prefix = 0;

  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const { return kp < prefix || kp <= qp; }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    if (k1 - 1 < prefix || k1 - 1 <= q0) return tile::full;
    if (k0 >= prefix && k0 > q1 - 1) return tile::empty;
    return tile::partial;
  }
  // Key rows in the prefix stay whole; later ones are causal.
  void mask_tile(float* s, std::int64_t ld, std::int64_t, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    for (std::int64_t j = std::max<std::int64_t>(prefix - k0, 0); j < kn; ++j)
      fill_masked(s + j * ld, 0, clamp_to(k0 + j - qp0, 0, qn));
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t) const {
    detail::require(prefix >= 0, fn, ": prefix_lm.prefix must be >= 0, got ", prefix);
  }
};

// Document (varlen) mask: several sequences packed along the key axis; `ids` [Lk] gives each
// key position's document, non-decreasing. A query at qp sees keys of its own document
// (compose with causal{} for causal packed sequences). Needs Lq <= Lk so every query has a
// position on the key axis.
struct document {
  view<const std::int64_t, 1> ids;  // [Lk]

  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const { return qp >= 0 && ids(qp) == ids(kp); }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    if (q1 <= 0) return tile::empty;
    const std::int64_t qa = ids(q0 < 0 ? 0 : q0), qb = ids(q1 - 1), ka = ids(k0), kb = ids(k1 - 1);
    if (qb < ka || kb < qa) return tile::empty;
    if (q0 >= 0 && qa == qb && ka == kb && qa == ka) return tile::full;  // rows at qp < 0 see nothing
    return tile::partial;
  }
  // Ids are non-decreasing, so the queries of key kp's document are one run [a, b) of the tile's
  // rows, and both ends only move forward from one key row to the next: O(qn + kn) per tile.
  void mask_tile(float* s, std::int64_t ld, std::int64_t, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    std::int64_t a = clamp_to(-qp0, 0, qn), b = a;  // rows at qp < 0 see nothing
    for (std::int64_t j = 0; j < kn; ++j) {
      const std::int64_t id = ids(k0 + j);
      while (a < qn && ids(qp0 + a) < id) ++a;
      b = std::max(a, b);
      while (b < qn && ids(qp0 + b) <= id) ++b;
      fill_masked(s + j * ld, 0, a);
      fill_masked(s + j * ld, b, qn);
    }
  }
  void validate(const char* fn, std::int64_t, std::int64_t Lq, std::int64_t Lk) const {
    detail::require(ids.extent(0) == Lk, fn, ": document.ids must have shape [Lk] = [", Lk, "], got [",
                    ids.extent(0), "]");
    detail::require(Lq <= Lk, fn, ": document mask needs Lq <= Lk, got Lq=", Lq, ", Lk=", Lk);
    for (std::int64_t j = 1; j < Lk; ++j)
      detail::require(ids(j - 1) <= ids(j), fn, ": document.ids must be non-decreasing, got ids[", j - 1,
                      "]=", ids(j - 1), " > ids[", j, "]=", ids(j));
  }
};

// Softcap (Gemma 2, Grok): s = cap * tanh(s / cap), d/ds = 1 - tanh^2(s / cap).
struct softcap {
  float cap = 0;

  template <class S>
  S score(S s, std::int64_t, std::int64_t, std::int64_t) const {
    using std::tanh;
    return static_cast<S>(cap) * tanh(s / static_cast<S>(cap));
  }
  template <class S>
  S score_derivative(S s, std::int64_t, std::int64_t, std::int64_t) const {
    using std::tanh;
    const S t = tanh(s / static_cast<S>(cap));
    return S(1) - t * t;
  }
  template <class Arch>
  void score_tile(float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t, std::int64_t nq, std::int64_t,
                  std::int64_t, std::int64_t) const {
    simd::softcap_columns<Arch>(s, g, ld, kn, nq, cap);
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t) const {
    detail::require(cap > 0 && std::isfinite(cap), fn, ": softcap.cap must be finite and > 0, got ", cap);
  }
};

// ALiBi: s -= slope[h] * |qp - kp|, one slope per query head (an additive bias: d/ds = 1).
struct alibi {
  view<const float, 1> slopes;  // [Hq]

  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    const std::int64_t d = qp >= kp ? qp - kp : kp - qp;
    return s - static_cast<S>(slopes(h)) * static_cast<S>(d);
  }
  template <class S>
  S score_derivative(S, std::int64_t, std::int64_t, std::int64_t) const {
    return S(1);
  }
  template <class Arch>
  void score_tile(float* s, float*, std::int64_t ld, std::int64_t kn, std::int64_t, std::int64_t nq, std::int64_t h,
                  std::int64_t qp0, std::int64_t k0) const {
    simd::alibi_columns<Arch>(s, ld, kn, nq, slopes(h), qp0, k0);
  }
  void validate(const char* fn, std::int64_t Hq, std::int64_t, std::int64_t) const {
    detail::require(!slopes.empty() && slopes.extent(0) == Hq, fn, ": alibi.slopes must have shape [Hq] = [", Hq,
                    "], got [", slopes.extent(0), "]");
  }
};

// The standard ALiBi slopes 2^(-8 (h + 1) / Hq), h = 0 .. Hq-1.
inline std::vector<float> alibi_slopes(std::int64_t Hq) {
  std::vector<float> s(static_cast<std::size_t>(Hq));
  for (std::int64_t h = 0; h < Hq; ++h)
    s[static_cast<std::size_t>(h)] = static_cast<float>(std::exp2(-8.0 * static_cast<double>(h + 1) / Hq));
  return s;
}

// ---------------------------------------------------------------------------------------------
// Compositions.

// The class of each part of a composition on the tile [q0, q1) x [k0, k1).
template <class... M>
std::array<tile, sizeof...(M)> classify_parts(const std::tuple<M...>& parts, std::int64_t q0, std::int64_t q1,
                                              std::int64_t k0, std::int64_t k1) {
  return std::apply(
      [&](const auto&... m) { return std::array<tile, sizeof...(M)>{mods::classify(m, q0, q1, k0, k1)...}; }, parts);
}

// The class of a composition from its parts' classes: `absorbing` if any part has it, else `unit`
// if every part has it, else partial (all_of: empty absorbs, full is the unit; any_of: the reverse).
template <std::size_t N>
tile combine_classes(const std::array<tile, N>& t, tile absorbing, tile unit) {
  if (std::ranges::find(t, absorbing) != t.end()) return absorbing;
  return std::ranges::count(t, unit) == std::ssize(t) ? unit : tile::partial;
}

// all_of: visible where every part is visible; score mods applied in order (their derivatives
// by the chain rule); a tile is empty if any part says empty, full if every part says full;
// mask_tile masks with each part that is partial on the tile.
template <class... M>
struct all_of_t {
  std::tuple<M...> parts;

  static constexpr bool any_visible = (has_visible<M> || ...);
  static constexpr bool any_score = (has_score<M> || ...);

  bool visible(std::int64_t h, std::int64_t qp, std::int64_t kp) const
    requires any_visible
  {
    return std::apply([&](const auto&... m) { return (mods::visible(m, h, qp, kp) && ...); }, parts);
  }

  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const
    requires any_score
  {
    std::apply([&](const auto&... m) { ((s = mods::score(m, s, h, qp, kp)), ...); }, parts);
    return s;
  }

  template <class S>
  S score_derivative(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const
    requires(any_score && (has_known_derivative<M> && ...))
  {
    S d = 1;
    std::apply(
        [&](const auto&... m) {
          ((d *= mods::score_derivative(m, s, h, qp, kp), s = mods::score(m, s, h, qp, kp)), ...);
        },
        parts);
    return d;
  }

  template <class Arch>
  void score_tile(float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t qn, std::int64_t nq,
                  std::int64_t h, std::int64_t qp0, std::int64_t k0) const
    requires any_score
  {
    std::apply([&](const auto&... m) { (mods::score_tile<Arch>(m, s, g, ld, kn, qn, nq, h, qp0, k0), ...); }, parts);
  }

  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    return combine_classes(classify_parts(parts, q0, q1, k0, k1), tile::empty, tile::full);
  }

  void mask_tile(float* s, std::int64_t ld, std::int64_t h, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const
    requires any_visible
  {
    std::apply(
        [&](const auto&... m) {
          ((
               [&] {
                 const tile t = mods::classify(m, qp0, qp0 + qn, k0, k0 + kn);
                 if (t == tile::empty) fill_masked_rect(s, ld, 0, qn, 0, kn);
                 else if (t == tile::partial) mods::mask_tile(m, s, ld, h, qp0, qn, k0, kn);
               }()),
           ...);
        },
        parts);
  }

  void validate(const char* fn, std::int64_t Hq, std::int64_t Lq, std::int64_t Lk) const {
    std::apply([&](const auto&... m) { (mods::validate(m, fn, Hq, Lq, Lk), ...); }, parts);
  }
};

template <class... M>
all_of_t<M...> all_of(M... m) {
  return {std::tuple<M...>(std::move(m)...)};
}

// any_of: visible where any part is visible, the union of masks (a sliding window plus global
// tokens, a document mask plus a shared prefix, ...). Its parts are masks only: a score mod has no
// place in a union (compose it outside: all_of(softcap{30}, any_of(...))). A tile is empty if every
// part says empty, full if any part says full, partial otherwise. mask_tile goes through the
// parts: on a tile (else on each of its key rows) where one part is full nothing is masked, where
// every part is empty everything is, and where exactly one part is not empty that part's own
// mask_tile masks it; only where two or more parts are partial is visible() asked per element.
template <class... M>
struct any_of_t {
  static_assert(sizeof...(M) >= 1, "mods::any_of: needs at least one part");
  static_assert((!has_score<M> && ...),
                "mods::any_of: every part must be a mask only (no score()); compose score mods outside: "
                "mods::all_of(mods::softcap{...}, mods::any_of(...))");

  std::tuple<M...> parts;

  static constexpr bool any_visible = (has_visible<M> || ...);

  bool visible(std::int64_t h, std::int64_t qp, std::int64_t kp) const
    requires any_visible
  {
    return std::apply([&](const auto&... m) { return (mods::visible(m, h, qp, kp) || ...); }, parts);
  }

  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    return combine_classes(classify_parts(parts, q0, q1, k0, k1), tile::full, tile::empty);
  }

  void mask_tile(float* s, std::int64_t ld, std::int64_t h, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const
    requires any_visible
  {
    if (mask_by_one_part(s, ld, h, qp0, qn, k0, kn)) return;
    for (std::int64_t j = 0; j < kn; ++j) {
      float* row = s + j * ld;
      if (mask_by_one_part(row, ld, h, qp0, qn, k0 + j, 1)) continue;
      for (std::int64_t i = 0; i < qn; ++i)
        if (!visible(h, qp0 + i, k0 + j)) row[i] = masked;
    }
  }

  void validate(const char* fn, std::int64_t Hq, std::int64_t Lq, std::int64_t Lk) const {
    std::apply([&](const auto&... m) { (mods::validate(m, fn, Hq, Lq, Lk), ...); }, parts);
  }

 private:
  // Masks queries [qp0, qp0 + qn) x keys [k0, k0 + kn) and returns true when the parts' classes
  // decide it alone (a full part, no part, or exactly one part not empty); false otherwise.
  bool mask_by_one_part(float* s, std::int64_t ld, std::int64_t h, std::int64_t qp0, std::int64_t qn,
                        std::int64_t k0, std::int64_t kn) const {
    return [&]<std::size_t... I>(std::index_sequence<I...>) {
      const auto t = classify_parts(parts, qp0, qp0 + qn, k0, k0 + kn);
      std::size_t not_empty = 0, which = 0;
      for (std::size_t p = 0; p < sizeof...(M); ++p) {
        if (t[p] == tile::full) return true;
        if (t[p] != tile::empty) {
          ++not_empty;
          which = p;
        }
      }
      if (not_empty == 0) fill_masked_rect(s, ld, 0, qn, 0, kn);
      else if (not_empty == 1)
        ((I == which ? mods::mask_tile(std::get<I>(parts), s, ld, h, qp0, qn, k0, kn) : void()), ...);
      return not_empty <= 1;
    }(std::index_sequence_for<M...>{});
  }
};

template <class... M>
any_of_t<M...> any_of(M... m) {
  return {std::tuple<M...>(std::move(m)...)};
}

}  // namespace mods
}  // namespace mnemo::attention
