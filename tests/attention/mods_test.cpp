// Tests for mnemo/attention/mods.hpp: each mod's visible() against DESIGN.md's definition, its
// score(), its validate() messages, and block() checked exhaustively on small grids against
// visible(): a tile called empty has no visible element, a tile called full has only visible
// elements (and for the single mods, whose classifiers are exact, a partial tile has both).
#include "mnemo/attention/mods.hpp"
#include "support/mask_tile.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <random>
#include <vector>

namespace {

namespace mods = mnemo::attention::mods;
using mnemo::view;
using mnemo::attention::tile;
using mnemo::test::expect_mask_tile;

// Positions of the grid: queries may sit left of key 0 (rows of Lq > Lk attention).
constexpr std::int64_t n_keys = 11;
constexpr std::int64_t first_query = -3;

// exact: partial only when the tile has both visible and hidden elements (the single mods).
// elementwise: sound, and exact on 1x1 tiles (compositions of mods that all have block()).
// sound: empty and full are never wrong.
enum class exactness { exact, elementwise, sound };

// Every tile [q0, q1) x [k0, k1) of the grid, compared with the elementwise visible().
template <class Mod>
void check_blocks(const Mod& mod, exactness ex, const std::string& name) {
  SCOPED_TRACE(name);
  int bad = 0;
  std::int64_t tiles = 0;
  for (std::int64_t q0 = first_query; q0 < n_keys; ++q0)
    for (std::int64_t q1 = q0 + 1; q1 <= n_keys; ++q1)
      for (std::int64_t k0 = 0; k0 < n_keys; ++k0)
        for (std::int64_t k1 = k0 + 1; k1 <= n_keys; ++k1) {
          std::int64_t seen = 0, total = 0;
          for (std::int64_t q = q0; q < q1; ++q)
            for (std::int64_t k = k0; k < k1; ++k) {
              seen += mods::visible(mod, 0, q, k) ? 1 : 0;
              ++total;
            }
          const tile t = mods::classify(mod, q0, q1, k0, k1);
          ++tiles;
          bool ok = true;
          if (t == tile::empty) ok = seen == 0;
          else if (t == tile::full) ok = seen == total;
          else if (ex == exactness::exact || (ex == exactness::elementwise && total == 1)) ok = seen > 0 && seen < total;
          if (!ok && bad++ < 5) {
            ADD_FAILURE() << "tile q[" << q0 << ", " << q1 << ") k[" << k0 << ", " << k1 << "): classified "
                          << static_cast<int>(t) << " but " << seen << " of " << total << " visible";
          }
        }
  EXPECT_EQ(tiles, (n_keys - first_query) * (n_keys - first_query + 1) / 2 * n_keys * (n_keys + 1) / 2);
}

// Document ids over the grid's key positions (non-decreasing).
std::vector<std::vector<std::int64_t>> doc_patterns() {
  return {
      std::vector<std::int64_t>(n_keys, 0),       // one document
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10},          // every token its own
      {0, 0, 0, 1, 1, 2, 2, 2, 2, 5, 5},          // gaps in the id values
      {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
      {3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4},
  };
}

// A document mod never sees queries left of key 0; the grid's document rows start at 0 ...
// except that visible() must answer for them, so the grid keeps them (ids are never read there).
mods::document doc_of(const std::vector<std::int64_t>& ids) {
  return {view<const std::int64_t, 1>(ids.data(), {static_cast<std::int64_t>(ids.size())})};
}

TEST(Mods, CausalIsBottomRightAligned) {
  const mods::causal m;
  for (std::int64_t q = first_query; q < n_keys; ++q)
    for (std::int64_t k = 0; k < n_keys; ++k) EXPECT_EQ(m.visible(0, q, k), k <= q) << q << " " << k;
  check_blocks(m, exactness::exact, "causal");
}

TEST(Mods, SlidingWindowSeesTheWKeysEndingAtTheDiagonal) {
  for (std::int64_t w = 1; w <= n_keys + 1; ++w) {
    const mods::sliding_window m{w};
    for (std::int64_t q = first_query; q < n_keys; ++q) {
      std::int64_t count = 0;
      for (std::int64_t k = 0; k < n_keys; ++k) {
        const bool vis = m.visible(0, q, k);
        count += vis;
        if (vis) {
          EXPECT_TRUE(k <= q && q - k < w) << w << " " << q << " " << k;
        }
      }
      // w keys ending at q, clipped to [0, q]
      EXPECT_EQ(count, std::max<std::int64_t>(0, std::min(w, q + 1))) << "w=" << w << " q=" << q;
    }
    check_blocks(m, exactness::exact, "window " + std::to_string(w));
  }
}

TEST(Mods, PrefixLmIsBidirectionalOverThePrefix) {
  for (std::int64_t prefix = 0; prefix <= n_keys + 1; ++prefix) {
    const mods::prefix_lm m{prefix};
    for (std::int64_t q = first_query; q < n_keys; ++q)
      for (std::int64_t k = 0; k < n_keys; ++k) EXPECT_EQ(m.visible(0, q, k), k < prefix || k <= q);
    check_blocks(m, exactness::exact, "prefix " + std::to_string(prefix));
  }
}

TEST(Mods, DocumentSeesItsOwnDocument) {
  for (const auto& ids : doc_patterns()) {
    const auto m = doc_of(ids);
    for (std::int64_t q = first_query; q < n_keys; ++q)
      for (std::int64_t k = 0; k < n_keys; ++k)
        EXPECT_EQ(m.visible(0, q, k), q >= 0 && ids[q] == ids[k]) << q << " " << k;
    check_blocks(m, exactness::exact, "document");
    check_blocks(mods::all_of(m, mods::causal{}), exactness::elementwise, "document + causal");
  }
}

TEST(Mods, ModsWithoutMasksSeeEverything) {
  const std::vector<float> slopes{0.5f, 0.25f};
  const mods::alibi al{view<const float, 1>(slopes.data(), {2})};
  EXPECT_TRUE(mods::visible(mods::none{}, -5, 3));
  EXPECT_TRUE(mods::visible(mods::softcap{2.0f}, 0, 9));
  EXPECT_TRUE(mods::visible(al, 0, 9));
  EXPECT_EQ(mods::classify(mods::none{}, 0, 4, 0, 4), tile::full);
  EXPECT_EQ(mods::classify(mods::softcap{2.0f}, 0, 4, 0, 4), tile::full);
  EXPECT_EQ(mods::classify(al, 0, 4, 0, 4), tile::full);
  check_blocks(mods::none{}, exactness::exact, "none");
  check_blocks(mods::all_of(mods::softcap{2.0f}, al), exactness::exact, "softcap + alibi");
  // Empty ranges are empty tiles, whatever the mod.
  EXPECT_EQ(mods::classify(mods::none{}, 3, 3, 0, 4), tile::empty);
  EXPECT_EQ(mods::classify(mods::causal{}, 0, 4, 2, 2), tile::empty);
}

// A mod with visible() but no block(): every non-empty tile must be treated as partial.
struct checkerboard {
  bool visible(std::int64_t q, std::int64_t k) const { return ((q + k) & 1) == 0; }
};

TEST(Mods, VisibleWithoutBlockIsPartial) {
  EXPECT_EQ(mods::classify(checkerboard{}, 0, 1, 0, 1), tile::partial);
  EXPECT_EQ(mods::classify(checkerboard{}, 0, 5, 0, 5), tile::partial);
  check_blocks(checkerboard{}, exactness::sound, "checkerboard");
  check_blocks(mods::all_of(checkerboard{}, mods::causal{}), exactness::sound, "checkerboard + causal");
}

TEST(Mods, CompositionsAreSoundAndExactPerElement) {
  const auto ids = doc_patterns()[2];
  const auto doc = doc_of(ids);
  for (std::int64_t w : {1, 3, 6}) {
    for (std::int64_t prefix : {0, 2, 5}) {
      check_blocks(mods::all_of(mods::prefix_lm{prefix}, mods::sliding_window{w}), exactness::elementwise, "prefix+window");
      check_blocks(mods::all_of(doc, mods::prefix_lm{prefix}), exactness::elementwise, "doc+prefix");
    }
    check_blocks(mods::all_of(mods::causal{}, mods::sliding_window{w}), exactness::elementwise, "causal+window");
    check_blocks(mods::all_of(doc, mods::sliding_window{w}, mods::softcap{1.0f}), exactness::elementwise, "doc+window+cap");
    check_blocks(mods::all_of(mods::all_of(doc, mods::causal{}), mods::sliding_window{w}), exactness::elementwise,
                 "nested");
  }
  // visible() of a composition is the conjunction of its parts.
  const auto m = mods::all_of(mods::prefix_lm{2}, mods::sliding_window{3}, doc);
  for (std::int64_t q = first_query; q < n_keys; ++q)
    for (std::int64_t k = 0; k < n_keys; ++k)
      EXPECT_EQ(m.visible(0, q, k), mods::prefix_lm{2}.visible(0, q, k) && mods::sliding_window{3}.visible(0, q, k) &&
                                     doc.visible(0, q, k));
}

TEST(Mods, SoftcapScore) {
  const mods::softcap m{5.0f};
  for (double s : {-1e4, -50.0, -5.0, -0.1, 0.0, 0.1, 5.0, 50.0, 1e4}) {
    const double got = m.score(s, 0, 0, 0);
    EXPECT_DOUBLE_EQ(got, 5.0 * std::tanh(s / 5.0));
    EXPECT_LE(std::abs(got), 5.0);
    EXPECT_FLOAT_EQ(m.score(static_cast<float>(s), 0, 0, 0), static_cast<float>(5.0 * std::tanh(s / 5.0)));
  }
  EXPECT_NEAR(m.score(1e-3, 0, 0, 0), 1e-3, 1e-9);  // identity near 0
}

TEST(Mods, AlibiScoreIsMinusSlopeTimesDistance) {
  const std::vector<float> slopes{0.5f, 0.125f, 0.03125f};
  const mods::alibi m{view<const float, 1>(slopes.data(), {3})};
  for (std::int64_t h = 0; h < 3; ++h)
    for (std::int64_t q = first_query; q < n_keys; ++q)
      for (std::int64_t k = 0; k < n_keys; ++k) {
        const double want = 1.0 - static_cast<double>(slopes[h]) * std::abs(static_cast<double>(q - k));
        EXPECT_DOUBLE_EQ(m.score(1.0, h, q, k), want);
        EXPECT_FLOAT_EQ(m.score(1.0f, h, q, k), static_cast<float>(want));
      }
}

TEST(Mods, ScoreModsApplyInCompositionOrder) {
  const std::vector<float> slopes{0.5f};
  const mods::alibi al{view<const float, 1>(slopes.data(), {1})};
  const mods::softcap cap{2.0f};
  const double s = 3.0;
  const std::int64_t q = 7, k = 1;  // distance 6: bias -3
  EXPECT_DOUBLE_EQ(mods::all_of(cap, al).score(s, 0, q, k), 2.0 * std::tanh(s / 2.0) - 3.0);
  EXPECT_DOUBLE_EQ(mods::all_of(al, cap).score(s, 0, q, k), 2.0 * std::tanh((s - 3.0) / 2.0));
  EXPECT_DOUBLE_EQ(mods::score(mods::all_of(cap, mods::causal{}), s, 0, q, k), 2.0 * std::tanh(s / 2.0));
  EXPECT_DOUBLE_EQ(mods::score(mods::causal{}, s, 0, q, k), s);  // masks leave scores alone
  static_assert(!mnemo::attention::has_score<mods::all_of_t<mods::causal>>);
  static_assert(!mnemo::attention::has_visible<mods::all_of_t<mods::softcap>>);
  static_assert(mnemo::attention::has_block<mods::all_of_t<mods::softcap>>);
}

TEST(Mods, StandardAlibiSlopes) {
  // 2^(-8 (h + 1) / Hq): for Hq = 8 these are 1/2, 1/4, ..., 1/256.
  const auto s8 = mods::alibi_slopes(8);
  ASSERT_EQ(s8.size(), 8u);
  for (int h = 0; h < 8; ++h) EXPECT_EQ(s8[h], 1.0f / static_cast<float>(2 << h)) << h;
  for (std::int64_t Hq : {1, 3, 12, 16}) {
    const auto s = mods::alibi_slopes(Hq);
    ASSERT_EQ(static_cast<std::int64_t>(s.size()), Hq);
    EXPECT_FLOAT_EQ(s.back(), 1.0f / 256.0f);  // the last head always gets 2^-8
    for (std::size_t h = 1; h < s.size(); ++h) EXPECT_FLOAT_EQ(s[h] / s[h - 1], s[0]);  // geometric, ratio s0
  }
}

// ---------------------------------------------------------------------------------------------
// The tile-level members: mask_tile, score_tile, score_derivative; the head index; the old form.

// Document ids over [0, n): runs of 1 to 40 positions.
std::vector<std::int64_t> random_docs(std::int64_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<std::int64_t> len(1, 40);
  std::vector<std::int64_t> ids;
  for (std::int64_t id = 0; static_cast<std::int64_t>(ids.size()) < n; ++id)
    ids.insert(ids.end(), static_cast<std::size_t>(len(gen)), id);
  ids.resize(static_cast<std::size_t>(n));
  return ids;
}

TEST(ModsTiles, MaskTileMatchesVisible) {
  constexpr std::int64_t L = 300;
  expect_mask_tile(mods::causal{}, L, "causal");
  for (std::int64_t w : {1, 7, 64, 100}) expect_mask_tile(mods::sliding_window{w}, L, "window " + std::to_string(w));
  for (std::int64_t prefix : {0, 5, 70}) expect_mask_tile(mods::prefix_lm{prefix}, L, "prefix " + std::to_string(prefix));
  // expect_mask_tile's queries reach L + 67: the ids cover them.
  const auto ids = random_docs(L + 80, 3);
  const auto doc = doc_of(ids);
  expect_mask_tile(doc, L, "document");
  expect_mask_tile(mods::all_of(doc, mods::causal{}), L, "document + causal");
  expect_mask_tile(mods::all_of(mods::sliding_window{50}, mods::prefix_lm{20}), L, "window + prefix");
  expect_mask_tile(mods::all_of(checkerboard{}, mods::causal{}), L, "checkerboard (no mask_tile) + causal");
  expect_mask_tile(mods::all_of(mods::softcap{2.0f}, mods::sliding_window{9}), L, "softcap + window");
}

// A per-head mask: head h sees the 3 (h + 1) keys ending at its diagonal.
struct head_window {
  bool visible(std::int64_t h, std::int64_t q, std::int64_t k) const { return k <= q && q - k < 3 * (h + 1); }
};

TEST(ModsTiles, VisibleReceivesTheHead) {
  const auto m = mods::all_of(head_window{}, mods::prefix_lm{2});
  for (std::int64_t h = 0; h < 3; ++h) {
    const mods::sliding_window w{3 * (h + 1)};
    for (std::int64_t q = first_query; q < n_keys; ++q)
      for (std::int64_t k = 0; k < n_keys; ++k) {
        EXPECT_EQ(mods::visible(head_window{}, h, q, k), w.visible(h, q, k)) << h << " " << q << " " << k;
        EXPECT_EQ(mods::visible(m, h, q, k), w.visible(h, q, k) && k <= q) << h << " " << q << " " << k;
      }
    expect_mask_tile(mods::all_of(head_window{}, mods::causal{}), 300, "head window, head " + std::to_string(h), h);
  }
  // The head-less free function asks head 0.
  EXPECT_TRUE(mods::visible(head_window{}, 5, 3));
  EXPECT_FALSE(mods::visible(head_window{}, 5, 2));
}

// A mod written against the earlier contract: visible(qp, kp) and mask_tile without the head.
struct old_causal {
  bool visible(std::int64_t q, std::int64_t k) const { return k <= q; }
  void mask_tile(float* s, std::int64_t ld, std::int64_t qp0, std::int64_t qn, std::int64_t k0, std::int64_t kn) const {
    mods::causal{}.mask_tile(s, ld, 0, qp0, qn, k0, kn);
  }
};

TEST(ModsTiles, ModsWithoutTheHeadStillWork) {
  static_assert(mnemo::attention::has_visible<old_causal> && !mnemo::attention::has_mask_tile<old_causal>);
  for (std::int64_t h : {0, 3})
    for (std::int64_t q = first_query; q < n_keys; ++q)
      for (std::int64_t k = 0; k < n_keys; ++k) {
        EXPECT_EQ(mods::visible(old_causal{}, h, q, k), k <= q);
        EXPECT_EQ(mods::visible(mods::all_of(old_causal{}, mods::none{}), h, q, k), k <= q);
      }
  // mods::mask_tile calls the head-less mask_tile; all_of and any_of pass through it.
  const std::int64_t ld = 20;
  std::vector<float> got(ld * 9, 1.0f), want(ld * 9, 1.0f);
  mods::mask_tile(old_causal{}, got.data(), ld, 2, 3, 17, 0, 9);
  mods::mask_tile(mods::causal{}, want.data(), ld, 2, 3, 17, 0, 9);
  EXPECT_EQ(got, want);
  check_blocks(mods::all_of(old_causal{}, mods::sliding_window{4}), exactness::sound, "old causal + window");
}

TEST(ModsTiles, AnyOfIsTheUnion) {
  const auto ids = doc_patterns()[2];
  const auto doc = doc_of(ids);
  for (std::int64_t w : {1, 3}) {
    for (std::int64_t prefix : {0, 2, 5}) {
      const auto m = mods::any_of(mods::sliding_window{w}, mods::prefix_lm{prefix});
      const auto m2 = mods::any_of(mods::all_of(mods::prefix_lm{prefix}, mods::sliding_window{w}), doc);
      for (std::int64_t q = first_query; q < n_keys; ++q)
        for (std::int64_t k = 0; k < n_keys; ++k) {
          const bool window = mods::sliding_window{w}.visible(0, q, k), pre = mods::prefix_lm{prefix}.visible(0, q, k);
          EXPECT_EQ(m.visible(0, q, k), window || pre) << q << " " << k;
          EXPECT_EQ(m2.visible(0, q, k), (window && pre) || doc.visible(0, q, k)) << q << " " << k;
        }
      check_blocks(m, exactness::elementwise, "window | prefix");
      check_blocks(m2, exactness::elementwise, "(prefix & window) | doc");
    }
    check_blocks(mods::any_of(mods::sliding_window{w}, mods::all_of(doc, mods::causal{})), exactness::elementwise,
                 "window | (doc & causal)");
    check_blocks(mods::all_of(mods::any_of(mods::sliding_window{w}, doc), mods::causal{}), exactness::elementwise,
                 "(window | doc) & causal");
  }
  check_blocks(mods::any_of(checkerboard{}, mods::causal{}), exactness::sound, "checkerboard | causal");
  check_blocks(mods::any_of(old_causal{}, mods::sliding_window{2}), exactness::sound, "old causal | window");
  // A part without a mask sees everything, and so does the union.
  EXPECT_TRUE(mods::visible(mods::any_of(mods::causal{}, mods::none{}), 0, 0, 9));
  EXPECT_EQ(mods::classify(mods::any_of(mods::causal{}, mods::none{}), 0, 4, 5, 9), tile::full);
  EXPECT_EQ(mods::classify(mods::any_of(mods::causal{}, mods::sliding_window{2}), 0, 4, 5, 9), tile::empty);
  EXPECT_EQ(mods::classify(mods::any_of(mods::causal{}, mods::prefix_lm{9}), 0, 4, 5, 9), tile::full);
  // Per-head parts keep their head.
  for (std::int64_t h = 0; h < 3; ++h)
    for (std::int64_t q = first_query; q < n_keys; ++q)
      for (std::int64_t k = 0; k < n_keys; ++k)
        EXPECT_EQ(mods::visible(mods::any_of(head_window{}, doc), h, q, k),
                  head_window{}.visible(h, q, k) || doc.visible(h, q, k));
}

TEST(ModsTiles, AnyOfMaskTileMatchesVisible) {
  constexpr std::int64_t L = 300;
  const auto ids = random_docs(L + 80, 4);
  const auto doc = doc_of(ids);
  expect_mask_tile(mods::any_of(mods::sliding_window{16}, mods::prefix_lm{40}), L, "window | prefix");
  expect_mask_tile(mods::any_of(mods::sliding_window{8}, mods::all_of(doc, mods::causal{})), L,
                   "window | (doc & causal)");
  expect_mask_tile(mods::all_of(mods::any_of(mods::sliding_window{30}, doc), mods::causal{}), L,
                   "(window | doc) & causal");
  expect_mask_tile(mods::any_of(checkerboard{}, mods::causal{}), L, "checkerboard | causal: per element");
  expect_mask_tile(mods::any_of(old_causal{}, mods::sliding_window{3}), L, "old causal | window");
  expect_mask_tile(mods::any_of(mods::sliding_window{5}, mods::sliding_window{9}, mods::prefix_lm{3}), L,
                   "three parts");
  for (std::int64_t h : {0, 2})
    expect_mask_tile(mods::any_of(head_window{}, mods::all_of(mods::causal{}, mods::sliding_window{1})), L,
                     "head window | diagonal, head " + std::to_string(h), h);
}

TEST(ModsTiles, ScoreDerivatives) {
  const std::vector<float> slopes{0.5f};
  const mods::alibi al{view<const float, 1>(slopes.data(), {1})};
  const mods::softcap cap{2.0f};
  const std::int64_t q = 7, k = 1;  // distance 6: bias -3
  for (double s : {-30.0, -1.0, 0.0, 0.5, 4.0}) {
    const double t = std::tanh(s / 2.0), t3 = std::tanh((s - 3.0) / 2.0);
    EXPECT_DOUBLE_EQ(mods::score_derivative(cap, s, 0, q, k), 1.0 - t * t);
    EXPECT_DOUBLE_EQ(mods::score_derivative(al, s, 0, q, k), 1.0);
    EXPECT_DOUBLE_EQ(mods::score_derivative(mods::causal{}, s, 0, q, k), 1.0);  // no score: identity
    EXPECT_DOUBLE_EQ(mods::score_derivative(mods::all_of(cap, al), s, 0, q, k), 1.0 - t * t);
    EXPECT_DOUBLE_EQ(mods::score_derivative(mods::all_of(al, cap, mods::causal{}), s, 0, q, k), 1.0 - t3 * t3);
    EXPECT_DOUBLE_EQ(mods::score_derivative(mods::all_of(cap, cap), s, 0, q, k),
                     (1.0 - std::tanh(2.0 * t / 2.0) * std::tanh(2.0 * t / 2.0)) * (1.0 - t * t));
  }
}

// A score mod without score_tile: the per-element fallback.
struct shifted {
  template <class S>
  S score(S s, std::int64_t h, std::int64_t q, std::int64_t k) const {
    return s * S(0.5) + static_cast<S>(h + q - 2 * k);
  }
  template <class S>
  S score_derivative(S, std::int64_t, std::int64_t, std::int64_t) const {
    return S(0.5);
  }
};

// score_tile of m over a key-major tile against score() and score_derivative() per element, at
// the scalar level and at the build's best.
template <class Arch, class M>
void expect_score_tile(const M& m, const std::string& what) {
  SCOPED_TRACE(what);
  constexpr std::int64_t kn = 5, qn = 13, nq = 16, ld = 19, h = 1, qp0 = 40, k0 = 37;
  std::vector<float> s(kn * ld), g(kn * ld, 1.0f);
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> dist(-6.0f, 6.0f);
  for (float& x : s) x = dist(gen);
  const std::vector<float> s0 = s;
  std::vector<float> s_fwd = s;
  mods::score_tile<Arch>(m, s_fwd.data(), nullptr, ld, kn, qn, nq, h, qp0, k0);
  mods::score_tile<Arch>(m, s.data(), g.data(), ld, kn, qn, nq, h, qp0, k0);
  for (std::int64_t j = 0; j < kn; ++j)
    for (std::int64_t i = 0; i < qn; ++i) {
      const std::int64_t x = j * ld + i;
      const double want = mods::score(m, static_cast<double>(s0[x]), h, qp0 + i, k0 + j);
      const double dwant = mods::score_derivative(m, static_cast<double>(s0[x]), h, qp0 + i, k0 + j);
      EXPECT_NEAR(s[x], want, 1e-5 * (1 + std::abs(want))) << j << " " << i;
      EXPECT_EQ(s[x], s_fwd[x]) << "the derivative must not change the scores";
      EXPECT_NEAR(g[x], dwant, 1e-5) << j << " " << i;
    }
  for (std::int64_t j = 0; j < kn; ++j)  // columns past the tile's width are never touched
    for (std::int64_t i = nq; i < ld; ++i) EXPECT_EQ(s[j * ld + i], s0[j * ld + i]);
}

TEST(ModsTiles, ScoreTileMatchesScore) {
  const std::vector<float> slopes{0.5f, 0.125f};
  const mods::alibi al{view<const float, 1>(slopes.data(), {2})};
  const auto run = [&]<class Arch>() {
    expect_score_tile<Arch>(mods::softcap{3.0f}, "softcap");
    expect_score_tile<Arch>(al, "alibi");
    expect_score_tile<Arch>(shifted{}, "user mod, per element");
    expect_score_tile<Arch>(mods::all_of(mods::softcap{3.0f}, al, mods::causal{}), "softcap, alibi, causal");
    expect_score_tile<Arch>(mods::all_of(al, shifted{}, mods::softcap{2.0f}), "alibi, user mod, softcap");
  };
  run.template operator()<mnemo::simd::scalar_arch>();
  run.template operator()<mnemo::simd::default_arch>();
  static_assert(mnemo::attention::has_score_tile<mods::softcap, mnemo::simd::scalar_arch>);
  static_assert(!mnemo::attention::has_score_tile<shifted, mnemo::simd::scalar_arch>);
  static_assert(!mnemo::attention::has_score_tile<mods::all_of_t<mods::causal>, mnemo::simd::scalar_arch>);
}

template <class Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected mnemo::error";
  } catch (const mnemo::error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

TEST(Mods, ValidateMessages) {
  const std::vector<float> slopes{0.5f, 0.25f};
  const std::vector<std::int64_t> ids{0, 1, 1, 0};
  mods::validate(mods::none{}, "f", 4, 3, 5);
  mods::validate(mods::causal{}, "f", 4, 3, 5);
  mods::validate(mods::sliding_window{1}, "f", 4, 3, 5);
  expect_error([] { mods::validate(mods::sliding_window{0}, "fn_name", 4, 3, 5); },
               {"fn_name", "sliding_window.size", "> 0", "got 0"});
  expect_error([] { mods::validate(mods::prefix_lm{-3}, "f", 4, 3, 5); }, {"prefix_lm.prefix", "got -3"});
  expect_error([] { mods::validate(mods::softcap{}, "f", 4, 3, 5); }, {"softcap.cap", "got 0"});
  expect_error([] { mods::validate(mods::softcap{std::numeric_limits<float>::quiet_NaN()}, "f", 4, 3, 5); },
               {"softcap.cap", "nan"});
  expect_error([&] { mods::validate(mods::alibi{view<const float, 1>(slopes.data(), {2})}, "f", 4, 3, 5); },
               {"alibi.slopes", "[Hq] = [4]", "got [2]"});
  expect_error([&] { mods::validate(doc_of(ids), "f", 4, 3, 4); },
               {"document.ids", "non-decreasing", "ids[2]=1", "ids[3]=0"});
  expect_error([&] { mods::validate(doc_of({0, 0, 1}), "f", 4, 3, 4); }, {"document.ids", "[Lk] = [4]", "got [3]"});
  expect_error([&] { mods::validate(mods::all_of(mods::causal{}, mods::sliding_window{-1}), "f", 4, 3, 5); },
               {"sliding_window.size", "got -1"});
}

}  // namespace
