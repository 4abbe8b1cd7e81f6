// mnemo/attention/mods.hpp — masks and score modifications, composed at compile time.
//
// A mod is a small functor passed as a template parameter (FlexAttention's mask_mod/score_mod,
// resolved by the compiler instead of a JIT). It may provide any of:
//
//   bool visible(int64 qp, int64 kp) const           may query position qp see key kp?
//   S    score(S s, int64 h, int64 qp, int64 kp) const  rewrite the scaled score s (S = float/double)
//   tile block(int64 q0, int64 q1, int64 k0, int64 k1) const
//        classify the tile of query positions [q0, q1) x key positions [k0, k1):
//        tile::empty (nothing visible: skip it), tile::full (everything visible: no per-element
//        checks), tile::partial (check each element)
//   void validate(const char* fn, int64 Hq, int64 Lq, int64 Lk) const
//        throw mnemo::error if the mod does not fit the call (slopes per head, ids per key, ...)
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
// A mod without `visible` sees everything; without `score` leaves scores alone; a mod with
// `visible` but no `block` makes every tile partial (correct, just slower in tiled kernels).
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::attention {

enum class tile { empty, partial, full };

template <class M>
concept has_visible = requires(const M& m, std::int64_t i) {
  { m.visible(i, i) } -> std::convertible_to<bool>;
};
template <class M>
concept has_score = requires(const M& m, float s, double d, std::int64_t i) {
  { m.score(s, i, i, i) } -> std::convertible_to<float>;
  { m.score(d, i, i, i) } -> std::convertible_to<double>;
};
template <class M>
concept has_block = requires(const M& m, std::int64_t i) {
  { m.block(i, i, i, i) } -> std::same_as<tile>;
};
template <class M>
concept has_validate = requires(const M& m, std::int64_t i) { m.validate("", i, i, i); };

namespace mods {

// Uniform access for kernels: defaults for what a mod does not provide.
template <class M>
inline bool visible(const M& m, std::int64_t qp, std::int64_t kp) {
  if constexpr (has_visible<M>) return m.visible(qp, kp);
  else return true;
}

template <class M, class S>
inline S score(const M& m, S s, std::int64_t h, std::int64_t qp, std::int64_t kp) {
  if constexpr (has_score<M>) return m.score(s, h, qp, kp);
  else return s;
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

// No mask, no score change.
struct none {};

// Bottom-right causal: key kp is visible iff kp <= qp.
struct causal {
  bool visible(std::int64_t qp, std::int64_t kp) const { return kp <= qp; }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    if (k0 > q1 - 1) return tile::empty;
    if (k1 - 1 <= q0) return tile::full;
    return tile::partial;
  }
};

// Causal sliding window of `size` keys ending at the diagonal: qp - size < kp <= qp.
// Written as distances, qp - kp < size, never as qp - size: positions are bounded by the lengths,
// so a distance cannot overflow, while qp - size does for a huge size and a negative qp (Lq > Lk).
// A size at least the number of positions is therefore the same as causal{} (no window).
struct sliding_window {
  std::int64_t size = 0;

  bool visible(std::int64_t qp, std::int64_t kp) const { return kp <= qp && qp - kp < size; }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    // nearest pair (q1 - 1, k0) beyond the diagonal, or farthest pair (q0, k1 - 1) out of the window
    if (k0 > q1 - 1 || q0 - (k1 - 1) >= size) return tile::empty;
    // every pair on or below the diagonal, and the farthest (q1 - 1, k0) inside the window
    if (k1 - 1 <= q0 && (q1 - 1) - k0 < size) return tile::full;
    return tile::partial;
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t) const {
    detail::require(size > 0, fn, ": sliding_window.size must be > 0, got ", size);
  }
};

// Prefix-LM: keys in the prefix [0, prefix) are visible to every query (bidirectional prefix),
// later keys causally.
struct prefix_lm {
  std::int64_t prefix = 0;

  bool visible(std::int64_t qp, std::int64_t kp) const { return kp < prefix || kp <= qp; }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    if (k1 - 1 < prefix || k1 - 1 <= q0) return tile::full;
    if (k0 >= prefix && k0 > q1 - 1) return tile::empty;
    return tile::partial;
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

  bool visible(std::int64_t qp, std::int64_t kp) const { return qp >= 0 && ids(qp) == ids(kp); }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    if (q1 <= 0) return tile::empty;
    const std::int64_t qa = ids(q0 < 0 ? 0 : q0), qb = ids(q1 - 1), ka = ids(k0), kb = ids(k1 - 1);
    if (qb < ka || kb < qa) return tile::empty;
    if (q0 >= 0 && qa == qb && ka == kb && qa == ka) return tile::full;  // rows at qp < 0 see nothing
    return tile::partial;
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

// Softcap (Gemma 2, Grok): s = cap * tanh(s / cap).
struct softcap {
  float cap = 0;

  template <class S>
  S score(S s, std::int64_t, std::int64_t, std::int64_t) const {
    using std::tanh;
    return static_cast<S>(cap) * tanh(s / static_cast<S>(cap));
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t) const {
    detail::require(cap > 0 && std::isfinite(cap), fn, ": softcap.cap must be finite and > 0, got ", cap);
  }
};

// ALiBi: s -= slope[h] * |qp - kp|, one slope per query head.
struct alibi {
  view<const float, 1> slopes;  // [Hq]

  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    const std::int64_t d = qp >= kp ? qp - kp : kp - qp;
    return s - static_cast<S>(slopes(h)) * static_cast<S>(d);
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

// Composition: visible where every part is visible; score mods applied in order; a tile is
// empty if any part says empty, full if every part says full.
template <class... M>
struct all_of_t {
  std::tuple<M...> parts;

  static constexpr bool any_visible = (has_visible<M> || ...);
  static constexpr bool any_score = (has_score<M> || ...);

  bool visible(std::int64_t qp, std::int64_t kp) const
    requires any_visible
  {
    return std::apply([&](const auto&... m) { return (mods::visible(m, qp, kp) && ...); }, parts);
  }

  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const
    requires any_score
  {
    std::apply([&](const auto&... m) { ((s = mods::score(m, s, h, qp, kp)), ...); }, parts);
    return s;
  }

  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    bool all_full = true, any_empty = false;
    std::apply(
        [&](const auto&... m) {
          ((
               [&] {
                 const tile t = mods::classify(m, q0, q1, k0, k1);
                 any_empty = any_empty || t == tile::empty;
                 all_full = all_full && t == tile::full;
               }()),
           ...);
        },
        parts);
    return any_empty ? tile::empty : all_full ? tile::full : tile::partial;
  }

  void validate(const char* fn, std::int64_t Hq, std::int64_t Lq, std::int64_t Lk) const {
    std::apply([&](const auto&... m) { (mods::validate(m, fn, Hq, Lq, Lk), ...); }, parts);
  }
};

template <class... M>
all_of_t<M...> all_of(M... m) {
  return {std::tuple<M...>(std::move(m)...)};
}

}  // namespace mods
}  // namespace mnemo::attention
