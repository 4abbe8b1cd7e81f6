// Tests for attention/sparse.hpp: every pattern against its paper definition written out here,
// block layouts at block sizes that divide, equal, exceed and do not align with flash's 64 x 64
// tiles (block_sparse must agree with the pattern element by element, and its tile classifier
// must never call a tile empty or full wrongly), flash with the block_sparse mod against
// attention::reference with the explicit element mask (GQA, Lq != Lk, rows that see nothing),
// the golden causal and sliding-window cases run as block-sparse layouts, and every check that
// throws mnemo::error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/attention/sparse.hpp"
#include "mnemo/core/npy.hpp"
#include "support/mask_tile.hpp"

namespace mnemo::attention::sparse {
namespace {

using paper_mask = std::function<bool(std::int64_t i, std::int64_t j)>;

template <class T, int R>
tensor<T, R> random_tensor(shape_t<R> shape, std::uint32_t seed) {
  tensor<T, R> t(shape);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (T& x : t) x = T(dist(gen));
  return t;
}

// Every (qp, kp) of [0, L)^2: the mod agrees with the written-out definition.
template <class Mask>
void expect_mask(const Mask& m, std::int64_t L, const paper_mask& want, const std::string& what) {
  std::int64_t bad = 0;
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < L; ++j)
      if (mods::visible(m, 0, i, j) != want(i, j) && bad++ < 5)
        ADD_FAILURE() << what << ": visible(" << i << ", " << j << ") = " << mods::visible(m, 0, i, j) << ", want "
                      << want(i, j);
  EXPECT_EQ(bad, 0) << what;
}

// block() is sound on [q0, q1) x [k0, k1): empty means nothing visible, full means all visible.
template <class Mask>
void expect_sound_tile(const Mask& m, std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1,
                       const std::string& what) {
  const tile t = mods::classify(m, q0, q1, k0, k1);
  bool any = false, all = true;
  for (std::int64_t i = q0; i < q1; ++i)
    for (std::int64_t j = k0; j < k1; ++j) {
      const bool vis = mods::visible(m, 0, i, j);
      any = any || vis;
      all = all && vis;
    }
  if (t == tile::empty) {
    EXPECT_FALSE(any) << what << ": tile [" << q0 << "," << q1 << ")x[" << k0 << "," << k1
                                            << ") called empty";
  }
  if (t == tile::full) {
    EXPECT_TRUE(all) << what << ": tile [" << q0 << "," << q1 << ")x[" << k0 << "," << k1
                                          << ") called full";
  }
}

// The 64 x 64 flash tiles (query rows shifted by a cache offset, so some rows sit at qp < 0)
// and random rectangles.
template <class Mask>
void expect_sound_tiles(const Mask& m, std::int64_t L, const std::string& what) {
  constexpr std::int64_t tile_size = flash_traits<>::block_q;
  for (std::int64_t offset : {std::int64_t{0}, std::int64_t{-21}})
    for (std::int64_t q0 = offset; q0 < L; q0 += tile_size)
      for (std::int64_t k0 = 0; k0 < L; k0 += tile_size)
        expect_sound_tile(m, q0, std::min(q0 + tile_size, L), k0, std::min(k0 + tile_size, L), what);
  std::mt19937 gen(7);
  std::uniform_int_distribution<std::int64_t> pos(0, L - 1);
  for (int r = 0; r < 200; ++r) {
    std::int64_t a = pos(gen), b = pos(gen), c = pos(gen), d = pos(gen);
    expect_sound_tile(m, std::min(a, b), std::max(a, b) + 1, std::min(c, d), std::max(c, d) + 1, what);
  }
}

// The block sizes a layout is tested at: divisors of the 64 x 64 tile, equal, a multiple, and
// sizes that do not align with it.
const std::vector<std::pair<std::int64_t, std::int64_t>> layout_blocks = {{16, 16}, {64, 64}, {128, 128}, {24, 40}};

// A layout of the pattern at every block size: the block_sparse mod is the pattern, element by
// element, and classifies tiles soundly.
template <class Mask>
void expect_layouts(const Mask& m, std::int64_t L, const std::string& what) {
  for (auto [bq, bk] : layout_blocks) {
    const block_layout layout = layout_of(m, L, bq, bk);
    const block_sparse mod{&layout, m};
    const std::string name = what + " layout " + std::to_string(bq) + "x" + std::to_string(bk);
    expect_mask(mod, L, [&](std::int64_t i, std::int64_t j) { return m.visible(0, i, j); }, name);
    expect_sound_tiles(mod, L, name);
    EXPECT_GT(layout.density(), 0.0) << name;
    EXPECT_LE(layout.density(), 1.0) << name;
  }
}

// ---------------------------------------------------------------------------------------------
// Patterns against the papers.

TEST(SparsePatterns, StridedIsSparseTransformerA1UnionA2) {
  for (std::int64_t L : {1, 37, 150}) {
    for (std::int64_t unit : {1, 8}) {
      const std::int64_t l = 5;
      const strided m{unit, l};
      // A1: t = max(0, i - l) <= j <= i; A2: (i - j) mod l = 0; on units of `unit` tokens, causal.
      expect_mask(m, L, [&](std::int64_t i, std::int64_t j) {
        const std::int64_t I = i / unit, J = j / unit;
        const bool a1 = std::max<std::int64_t>(0, I - l) <= J && J <= I;
        const bool a2 = J <= I && (I - J) % l == 0;
        return j <= i && (a1 || a2);
      }, "strided unit " + std::to_string(unit));
      expect_sound_tiles(m, L, "strided");
      expect_layouts(m, L, "strided unit " + std::to_string(unit));
    }
  }
}

TEST(SparsePatterns, FixedIsSparseTransformerFixed) {
  const std::int64_t L = 150, l = 8, c = 2;
  for (std::int64_t unit : {1, 4}) {
    const fixed m{unit, l, c};
    // A1: floor(j / l) = floor(i / l); A2: j mod l in {l - c, ..., l - 1}; causal.
    expect_mask(m, L, [&](std::int64_t i, std::int64_t j) {
      const std::int64_t I = i / unit, J = j / unit;
      return j <= i && (J / l == I / l || (J % l >= l - c && J % l <= l - 1));
    }, "fixed");
    expect_layouts(m, L, "fixed unit " + std::to_string(unit));
  }
}

TEST(SparsePatterns, LongformerWindowAndGlobalTokens) {
  for (std::int64_t L : {1, 37, 150}) {
    const std::vector<std::int64_t> globals = L > 17 ? std::vector<std::int64_t>{0, 17, L - 1} : std::vector<std::int64_t>{0};
    const std::set<std::int64_t> g(globals.begin(), globals.end());
    for (bool causal : {false, true}) {
      const std::int64_t w = 9;
      const longformer m = make_longformer(L, w, globals, causal);
      expect_mask(m, L, [&](std::int64_t i, std::int64_t j) {
        const bool global = g.count(i) || g.count(j);
        if (causal) return j <= i && (i - j < w || global);
        return std::abs(i - j) <= w / 2 || global;
      }, causal ? "longformer causal" : "longformer");
      expect_layouts(m, L, causal ? "longformer causal" : "longformer");
    }
  }
}

TEST(SparsePatterns, DilatedWindow) {
  const std::int64_t L = 150;
  for (std::int64_t dilation : {1, 3}) {
    const dilated_window m{4, dilation};
    expect_mask(m, L, [&](std::int64_t i, std::int64_t j) {
      for (std::int64_t t = 0; t < 4; ++t)
        if (j == i - t * dilation) return true;
      return false;
    }, "dilated " + std::to_string(dilation));
    expect_layouts(m, L, "dilated " + std::to_string(dilation));
  }
}

TEST(SparsePatterns, BigBirdWindowGlobalRandom) {
  const std::int64_t L = 150, unit = 8, window = 3, globals = 1, random = 2;
  const std::int64_t n = (L + unit - 1) / unit;
  for (bool causal : {false, true}) {
    const bigbird m = make_bigbird(L, unit, window, globals, random, 42, causal);
    // The random blocks: for each non-global query block, min(random, free) distinct blocks that
    // are neither global nor in the window (and not above the diagonal when causal).
    for (std::int64_t I = 0; I < n; ++I) {
      std::int64_t free = 0;
      for (std::int64_t J = globals; I >= globals && J < (causal ? I + 1 : n); ++J) free += std::abs(I - J) > window / 2;
      const std::vector<std::int64_t> r(m.random_cols.begin() + m.random_ptr[I], m.random_cols.begin() + m.random_ptr[I + 1]);
      EXPECT_EQ(static_cast<std::int64_t>(r.size()), std::min(random, free)) << "query block " << I;
      for (std::size_t t = 0; t < r.size(); ++t) {
        EXPECT_GE(r[t], globals);
        EXPECT_GT(std::abs(I - r[t]), window / 2);
        if (causal) {
          EXPECT_LE(r[t], I);
        }
        if (t) {
          EXPECT_LT(r[t - 1], r[t]);
        }
      }
    }
    expect_mask(m, L, [&](std::int64_t i, std::int64_t j) {
      const std::int64_t I = i / unit, J = j / unit;
      const bool rnd = std::count(m.random_cols.begin() + m.random_ptr[I], m.random_cols.begin() + m.random_ptr[I + 1], J) > 0;
      return (!causal || j <= i) && (I < globals || J < globals || std::abs(I - J) <= window / 2 || rnd);
    }, "bigbird");
    expect_layouts(m, L, causal ? "bigbird causal" : "bigbird");
  }
  // Reproducible from the seed, different across seeds.
  const bigbird a = make_bigbird(L, unit, window, globals, random, 42), b = make_bigbird(L, unit, window, globals, random, 42);
  const bigbird c = make_bigbird(L, unit, window, globals, random, 43);
  EXPECT_EQ(a.random_cols, b.random_cols);
  EXPECT_NE(a.random_cols, c.random_cols);
}

// ---------------------------------------------------------------------------------------------
// User-supplied layouts.

// A random CSR layout with random full flags, and its element mask written out: a listed full
// block is visible, a listed partial block where j <= i (element = causal).
struct user_case {
  block_layout layout;
  paper_mask want;
};
user_case random_user_layout(std::int64_t L, std::int64_t bq, std::int64_t bk, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::bernoulli_distribution keep(0.4), full(0.5);
  const std::int64_t n_qb = (L + bq - 1) / bq, n_kb = (L + bk - 1) / bk;
  std::vector<std::int64_t> row_ptr{0}, cols;
  std::vector<std::uint8_t> flags;
  auto state = std::make_shared<std::vector<int>>(n_qb * n_kb, 0);
  for (std::int64_t qb = 0; qb < n_qb; ++qb) {
    for (std::int64_t kb = 0; kb < n_kb; ++kb) {
      if (!keep(gen)) continue;
      cols.push_back(kb);
      flags.push_back(full(gen) ? 1 : 0);
      (*state)[qb * n_kb + kb] = flags.back() ? 2 : 1;
    }
    row_ptr.push_back(static_cast<std::int64_t>(cols.size()));
  }
  return {block_layout(L, bq, bk, row_ptr, cols, flags), [=](std::int64_t i, std::int64_t j) {
            const int s = (*state)[i / bq * n_kb + j / bk];
            return s == 2 || (s == 1 && j <= i);
          }};
}

TEST(SparseLayout, UserSuppliedCsr) {
  for (auto [bq, bk] : layout_blocks) {
    const std::int64_t L = 150;
    const user_case u = random_user_layout(L, bq, bk, 3);
    const block_sparse mod{&u.layout, mods::causal{}};
    expect_mask(mod, L, u.want, "user layout");
    expect_sound_tiles(mod, L, "user layout");
    EXPECT_EQ(u.layout.row_ptr().size(), static_cast<std::size_t>(u.layout.n_qb() + 1));
  }
  // No flags: every listed block full; element mods::none by default.
  const block_layout all(64, 32, 32, {0, 1, 2}, {0, 1});
  const block_sparse<> mod{&all};
  EXPECT_TRUE(mod.visible(0, 0, 31));
  EXPECT_FALSE(mod.visible(0, 0, 32));
  EXPECT_TRUE(mod.visible(0, 40, 63));
  EXPECT_FALSE(mod.visible(0, 40, 0));
  EXPECT_DOUBLE_EQ(all.density(), 0.5);
}

TEST(SparseLayout, ElementMaskIsTheDenseForm) {
  const std::int64_t L = 70;
  const strided m{4, 3};
  const tensor<std::uint8_t, 2> mask = element_mask(m, L);
  const dense_mask dm{mask.as_view()};
  expect_mask(dm, L, [&](std::int64_t i, std::int64_t j) { return m.visible(0, i, j); }, "dense_mask");
  EXPECT_FALSE(dm.visible(0, -1, 0));
}

// ---------------------------------------------------------------------------------------------
// Flash with the block_sparse mod, and the layout-driven sparse::attention, against the reference
// with the explicit element mask.

struct shape {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
};

// out and lse against the reference, float32 tolerance; -inf lse exactly.
void expect_close(const tensor<float, 4>& out, const tensor<float, 3>& lse, const tensor<float, 4>& want,
                  const tensor<float, 3>& want_lse, const std::string& what) {
  std::int64_t bad = 0;  // NaN counts as bad
  for (std::int64_t i = 0; i < out.size(); ++i)
    bad += !(std::abs(double(out.data()[i]) - want.data()[i]) <= 1e-5 + 1e-4 * std::abs(want.data()[i]));
  EXPECT_EQ(bad, 0) << what << ": out";
  for (std::int64_t i = 0; i < lse.size(); ++i) {
    const float g = lse.data()[i], w = want_lse.data()[i];
    if (std::isinf(w)) {
      EXPECT_EQ(g, w) << what << ": lse[" << i << "]";
    } else {
      EXPECT_NEAR(g, w, 1e-5 + 1e-4 * std::abs(w)) << what << ": lse[" << i << "]";
    }
  }
}

template <class Mask>
void expect_flash_matches(const Mask& pattern, const block_layout& layout, const shape& s, const std::string& what,
                          std::uint32_t seed) {
  const auto q = random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.D}, seed);
  const auto k = random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.D}, seed + 1);
  const auto v = random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, seed + 2);
  tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv}), want({s.B, s.Hq, s.Lq, s.Dv});
  tensor<float, 3> lse({s.B, s.Hq, s.Lq}), want_lse({s.B, s.Hq, s.Lq});
  const tensor<std::uint8_t, 2> mask = element_mask(pattern, s.Lk);
  reference(cview(q), k, v, want.as_view(), want_lse.as_view(), dense_mask{mask.as_view()});
  flash(cview(q), k, v, out.as_view(), lse.as_view(), block_sparse{&layout, pattern}, options{0, 2});
  expect_close(out, lse, want, want_lse, what + " (flash)");
  std::fill(out.data(), out.data() + out.size(), std::numeric_limits<float>::quiet_NaN());
  std::fill(lse.data(), lse.data() + lse.size(), std::numeric_limits<float>::quiet_NaN());
  attention(cview(q), k, v, out.as_view(), lse.as_view(), block_sparse{&layout, pattern}, options{0, 2});
  expect_close(out, lse, want, want_lse, what + " (sparse::attention)");
}

TEST(SparseFlash, MatchesReferenceWithElementMask) {
  const std::vector<shape> shapes = {{1, 4, 2, 150, 150, 40, 40},    // GQA 2, awkward D
                                     {1, 4, 1, 37, 200, 64, 32},     // MQA, Lq < Lk (prefill with cache), Dv != D
                                     {2, 2, 2, 70, 50, 32, 32}};     // Lq > Lk: the first 20 rows see nothing
  std::uint32_t seed = 100;
  for (const shape& s : shapes) {
    const std::int64_t L = s.Lk;
    const std::vector<std::int64_t> globals{0, L / 3};
    const auto sts = strided{16, 3};
    const auto fix = fixed{8, 4, 1};
    const auto lf = make_longformer(L, 17, globals, false);
    const auto bb = make_bigbird(L, 16, 3, 1, 2, 9, false);
    const auto dil = dilated_window{8, 2};
    const auto any = mods::any_of(dil, sts);
    // 24 x 40 does not align with the 64-key chunks; 32 x 128 blocks are cut into 64-key pieces.
    for (auto [bq, bk] : {std::pair<std::int64_t, std::int64_t>{16, 16}, {64, 64}, {128, 64}, {24, 40}, {32, 128}}) {
      const std::string at = " L=" + std::to_string(L) + " Lq=" + std::to_string(s.Lq) + " blocks " +
                             std::to_string(bq) + "x" + std::to_string(bk);
      expect_flash_matches(sts, layout_of(sts, L, bq, bk), s, "strided" + at, seed++);
      expect_flash_matches(fix, layout_of(fix, L, bq, bk), s, "fixed" + at, seed++);
      expect_flash_matches(lf, layout_of(lf, L, bq, bk), s, "longformer" + at, seed++);
      expect_flash_matches(bb, layout_of(bb, L, bq, bk), s, "bigbird" + at, seed++);
      expect_flash_matches(dil, layout_of(dil, L, bq, bk), s, "dilated" + at, seed++);
      expect_flash_matches(any, layout_of(any, L, bq, bk), s, "dilated | strided" + at, seed++);
    }
    const user_case u = random_user_layout(L, 32, 32, seed);
    const block_sparse user_mod{&u.layout, mods::causal{}};
    expect_flash_matches(user_mod, u.layout, s, "user layout", seed++);
  }
}

// f16 K/V (converted per chunk) through the layout-driven kernel, against the reference on the
// same rounded K/V: 16 x 16 blocks with a causal element, MQA, Lq < Lk, D and Dv not multiples of 16.
TEST(SparseAttention, HalfPrecisionKeysAndValues) {
  const std::int64_t Hq = 3, Lq = 100, Lk = 130, D = 48, Dv = 24;
  const auto q = random_tensor<float, 4>({1, Hq, Lq, D}, 5);
  const auto k = random_tensor<f16, 4>({1, 1, Lk, D}, 6);
  const auto v = random_tensor<f16, 4>({1, 1, Lk, Dv}, 7);
  const user_case u = random_user_layout(Lk, 16, 16, 8);
  const block_sparse mod{&u.layout, mods::causal{}};
  tensor<float, 4> out({1, Hq, Lq, Dv}), want({1, Hq, Lq, Dv});
  tensor<float, 3> lse({1, Hq, Lq}), want_lse({1, Hq, Lq});
  const tensor<std::uint8_t, 2> mask = element_mask(mod, Lk);
  reference(cview(q), k, v, want.as_view(), want_lse.as_view(), dense_mask{mask.as_view()});
  attention(cview(q), k, v, out.as_view(), lse.as_view(), mod, options{0, 2});
  expect_close(out, lse, want, want_lse, "f16 K/V");
}

// ---------------------------------------------------------------------------------------------
// Golden cases: causal and sliding window as block-sparse layouts.

TEST(SparseGolden, CausalAndWindowAsLayouts) {
  const std::filesystem::path dir = MNEMO_GOLDEN_DIR;
  if (!std::filesystem::exists(dir / "attn_fwd_causal")) GTEST_SKIP() << "no golden cases at " << dir;
  for (const char* name : {"attn_fwd_causal", "attn_fwd_window"}) {
    const std::filesystem::path c = dir / name;
    std::ifstream meta(c / "meta.json");
    const auto j = nlohmann::json::parse(meta);
    const auto& p = j["params"];
    const auto q = npy::load<float, 4>((c / "q.npy").string());
    const auto k = npy::load<float, 4>((c / "k.npy").string());
    const auto v = npy::load<float, 4>((c / "v.npy").string());
    const auto want = npy::load<float, 4>((c / "out.npy").string());
    const auto want_lse = npy::load<float, 3>((c / "lse.npy").string());
    const double atol = j["atol"], rtol = j["rtol"];
    const std::int64_t Lk = p["Lk"], window = p["window"];
    tensor<float, 4> out(want.shape());
    tensor<float, 3> lse(want_lse.shape());
    const options opt{p["scale"].get<float>(), 1};
    auto check = [&](const std::string& what) {
      for (std::int64_t i = 0; i < out.size(); ++i)
        EXPECT_NEAR(out.data()[i], want.data()[i], atol + rtol * std::abs(want.data()[i])) << name << " " << what;
      for (std::int64_t i = 0; i < lse.size(); ++i)
        EXPECT_NEAR(lse.data()[i], want_lse.data()[i], atol + rtol * std::abs(want_lse.data()[i])) << name << " " << what;
    };
    if (window > 0) {
      const mods::sliding_window w{window};
      for (std::int64_t b : {16, 64}) {
        const block_layout layout = layout_of(w, Lk, b, b);
        flash(cview(q), k, v, out.as_view(), lse.as_view(), block_sparse{&layout, w}, opt);
        check("window layout " + std::to_string(b));
      }
    } else {
      const block_layout layout = layout_of(mods::causal{}, Lk, 64, 64);
      flash(cview(q), k, v, out.as_view(), lse.as_view(), block_sparse{&layout, mods::causal{}}, opt);
      check("causal layout");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// mask_tile (the bulk masker flash calls on partial tiles) against visible(), element by element
// (tests/support/mask_tile.hpp).

using mnemo::test::expect_mask_tile;

TEST(SparseMaskTile, PatternsMatchVisible) {
  const std::int64_t L = 300;
  expect_mask_tile(make_longformer(L, 17, {0, 5, 40, 41, 150, L - 1}, false), L, "longformer");
  expect_mask_tile(make_longformer(L, 9, {3, 44, 120}, true), L, "longformer causal");
  expect_mask_tile(dilated_window{8, 3}, L, "dilated 8x3");
  expect_mask_tile(dilated_window{20, 1}, L, "dilated 20x1");
  expect_mask_tile(dilated_window{5, 16}, L, "dilated 5x16");
  expect_mask_tile(strided{1, 7}, L, "strided token-level");
  expect_mask_tile(strided{16, 3}, L, "strided units of 16");
  expect_mask_tile(fixed{8, 4, 1}, L, "fixed");
  expect_mask_tile(make_bigbird(L, 16, 3, 1, 2, 5, true), L, "bigbird causal");
  expect_mask_tile(make_bigbird(L, 12, 3, 1, 2, 5, false), L, "bigbird");
  expect_mask_tile(mods::any_of(dilated_window{8, 3}, make_longformer(L, 9, {3, 44, 120}, true)), L,
                   "dilated | longformer");
  expect_mask_tile(mods::any_of(strided{16, 3}, fixed{8, 4, 1}, mods::sliding_window{5}), L, "strided | fixed | window");
}

TEST(SparseMaskTile, BlockSparseMatchesVisible) {
  const std::int64_t L = 300;
  // Whole blocks (16 x 16 divides the tile, 24 x 40 does not align with it), partial blocks
  // refined by an element that has its own mask_tile (longformer), by an arithmetic one
  // (causal, sliding window) and by the per-element fallback (dense_mask).
  for (auto [bq, bk] : layout_blocks) {
    const std::string at = std::to_string(bq) + "x" + std::to_string(bk) + " ";
    const user_case u = random_user_layout(L, bq, bk, 17);
    expect_mask_tile(block_sparse{&u.layout, mods::causal{}}, L, at + "user layout, causal element");
    const block_sparse<> whole{&u.layout};
    expect_mask_tile(whole, L, at + "user layout, whole blocks");
    const auto lf = make_longformer(L, 33, {2, 100}, false);
    const block_layout lf_layout = layout_of(lf, L, bq, bk);
    expect_mask_tile(block_sparse{&lf_layout, lf}, L, at + "longformer layout");
    const mods::sliding_window sw{50};
    const block_layout sw_layout = layout_of(sw, L, bq, bk);
    expect_mask_tile(block_sparse{&sw_layout, sw}, L, at + "sliding window layout");
  }
  const strided st{4, 3};
  const tensor<std::uint8_t, 2> mask = element_mask(st, L);
  const block_layout st_layout = layout_of(st, L, 16, 16);
  expect_mask_tile(block_sparse{&st_layout, dense_mask{mask.as_view()}}, L, "dense_mask element");
}

// ---------------------------------------------------------------------------------------------
// Errors.

// The call throws mnemo::error whose message contains every one of `parts`.
template <class F>
void expect_error(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "expected mnemo::error containing '" << *parts.begin() << "'";
  } catch (const mnemo::error& e) {
    for (const char* p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

TEST(SparseErrors, BadLayouts) {
  // 64 positions in blocks of 32: 2 query blocks, 2 key blocks.
  expect_error([] { block_layout(64, 32, 32, {0, 1, 2}, {0, 2}); }, {"cols[1]", "[0, 2)", "got 2"});
  expect_error([] { block_layout(64, 32, 32, {0, 1, 2}, {0, -1}); }, {"cols[1]", "got -1"});
  expect_error([] { block_layout(64, 32, 32, {0, 2, 2}, {1, 0}); }, {"strictly increasing", "cols[0] = 1"});
  expect_error([] { block_layout(64, 32, 32, {0, 2, 2}, {1, 1}); }, {"strictly increasing"});
  expect_error([] { block_layout(64, 32, 32, {0, 2}, {0, 1}); }, {"row_ptr", "3 entries", "got 2"});
  expect_error([] { block_layout(64, 32, 32, {1, 1, 2}, {0, 1}); }, {"row_ptr[0] must be 0", "got 1"});
  expect_error([] { block_layout(64, 32, 32, {0, 1, 3}, {0, 1}); }, {"row_ptr[n_qb]", "cols.size() = 2", "got 3"});
  expect_error([] { block_layout(64, 32, 32, {0, 2, 1}, {0, 1}); }, {"row_ptr[n_qb]"});
  expect_error([] { block_layout(64, 32, 32, {0, 2, 1}, {0}); }, {"non-decreasing", "row_ptr[1] = 2"});
  expect_error([] { block_layout(64, 32, 32, {0, 1, 2}, {0, 1}, {1}); }, {"full", "2 entries", "got 1"});
  expect_error([] { block_layout(64, 32, 32, {0, 1, 2}, {0, 1}, {1, 2}); }, {"full[1]", "0 or 1", "got 2"});
  expect_error([] { block_layout(64, 0, 32, {0}, {}); }, {"block_q", "> 0", "got 0"});
  expect_error([] { block_layout(64, 32, -1, {0}, {}); }, {"block_k", "got -1"});
  expect_error([] { block_layout(0, 32, 32, {0}, {}); }, {"length", ">= 1", "got 0"});
  expect_error([] { layout_of(mods::causal{}, 64, 0, 16); }, {"layout_of", "block_q", "got 0"});
}

TEST(SparseErrors, BadPatternsAndCalls) {
  expect_error([] { make_longformer(50, 5, {3, 50}); }, {"globals[1]", "[0, 50)", "got 50"});
  expect_error([] { make_longformer(50, 0, {}); }, {"window", "got 0"});
  expect_error([] { make_bigbird(50, 8, 0, 1, 1, 0); }, {"window", "got 0"});
  expect_error([] { make_bigbird(50, 0, 3, 1, 1, 0); }, {"unit", "got 0"});
  expect_error([] { make_bigbird(50, 8, 3, -1, 1, 0); }, {"globals", "got -1"});
  expect_error([] { make_bigbird(50, 8, 3, 1, -2, 0); }, {"random", "got -2"});

  const auto q = random_tensor<float, 4>({1, 1, 8, 16}, 1);
  const auto k = random_tensor<float, 4>({1, 1, 64, 16}, 2);
  tensor<float, 4> out({1, 1, 8, 16});
  const block_layout layout = layout_of(mods::causal{}, 32, 16, 16);  // length 32, but Lk = 64
  expect_error([&] { flash(cview(q), k, k, out.as_view(), {}, block_sparse{&layout, mods::causal{}}); },
               {"attention::flash", "layout.length()", "Lk = 64", "got 32"});
  expect_error([&] { flash(cview(q), k, k, out.as_view(), {}, block_sparse<>{}); }, {"layout", "null"});
  expect_error([&] { attention(cview(q), k, k, out.as_view(), {}, block_sparse{&layout, mods::causal{}}); },
               {"sparse::attention", "layout.length()", "Lk = 64", "got 32"});
  expect_error([&] { attention(cview(q), k, k, out.as_view(), {}, block_sparse<>{}); },
               {"sparse::attention", "layout", "null"});
  tensor<float, 4> bad_out({1, 1, 8, 15});
  const block_layout fits = layout_of(mods::causal{}, 64, 16, 16);
  expect_error([&] { attention(cview(q), k, k, bad_out.as_view(), {}, block_sparse{&fits, mods::causal{}}); },
               {"sparse::attention", "out", "[1, 1, 8, 16]"});
  const tensor<std::uint8_t, 2> mask({32, 32});
  expect_error([&] { reference(cview(q), k, k, out.as_view(), {}, dense_mask{mask.as_view()}); },
               {"dense_mask.mask", "[64, 64]", "got [32, 32]"});
  expect_error([&] { flash(cview(q), k, k, out.as_view(), {}, strided{0, 2}); }, {"strided.unit", "got 0"});
  expect_error([&] { flash(cview(q), k, k, out.as_view(), {}, strided{1, 0}); }, {"strided.stride", "got 0"});
  expect_error([&] { flash(cview(q), k, k, out.as_view(), {}, fixed{1, 4, 5}); }, {"fixed.summary", "[1, 4]", "got 5"});
  expect_error([&] { flash(cview(q), k, k, out.as_view(), {}, dilated_window{0, 1}); }, {"dilated_window.window"});
  expect_error([&] { flash(cview(q), k, k, out.as_view(), {}, dilated_window{2, 0}); }, {"dilated_window.dilation"});
  const auto lf = make_longformer(32, 4, {});
  expect_error([&] { flash(cview(q), k, k, out.as_view(), {}, lf); }, {"longformer.length", "Lk = 64", "got 32"});
  const auto bb = make_bigbird(32, 8, 3, 1, 1, 0);
  expect_error([&] { flash(cview(q), k, k, out.as_view(), {}, bb); }, {"bigbird.length", "Lk = 64", "got 32"});
  expect_error([] { element_mask(mods::causal{}, 0); }, {"element_mask", "length", "got 0"});
}

}  // namespace
}  // namespace mnemo::attention::sparse
