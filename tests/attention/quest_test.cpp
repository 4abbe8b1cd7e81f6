// Tests for mnemo/attention/quest.hpp: page metadata against a brute-force min/max (built at once
// and grown step by step), the upper-bound property, quest_decode against attention::reference
// restricted to the selected keys (GQA, awkward Lk / D / page sizes, windows inside, across and
// beyond the cache, f16 K/V), the selection against the double-precision bounds of
// reference::quest_decode, "all pages" equal to dense attention, and every argument check.
#include "mnemo/attention/quest.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "mnemo/attention/reference.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/tensor.hpp"

namespace {

namespace attn = mnemo::attention;
using mnemo::f16;
using mnemo::tensor;
using mnemo::view;

constexpr double atol = 2e-5, rtol = 1e-4;

template <class T, int R>
void fill(tensor<T, R>& t, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  for (T& x : t) x = T(u(rng));
}

template <int R>
void expect_close(const tensor<float, R>& got, const tensor<float, R>& want, const char* what) {
  ASSERT_EQ(got.shape(), want.shape());
  for (std::int64_t i = 0; i < got.size(); ++i) {
    const double w = want.data()[i];
    if (std::isinf(w)) {
      EXPECT_EQ(got.data()[i], want.data()[i]) << what << " at " << i;
      continue;
    }
    ASSERT_LE(std::fabs(got.data()[i] - w), atol + rtol * std::fabs(w)) << what << " at " << i;
  }
}

struct problem {
  std::int64_t B = 1, Hq = 4, Hkv = 2, Lk = 100, D = 40, Dv = 24, page = 16, blocks = 3, window = 0;
};

// quest_decode vs the dense reference restricted to the pages quest_decode selected.
template <class KV>
void check_against_mask(const problem& p, std::uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "Hq=" << p.Hq << " Hkv=" << p.Hkv << " Lk=" << p.Lk << " D=" << p.D
                                    << " page=" << p.page << " blocks=" << p.blocks << " window=" << p.window);
  std::mt19937 rng(seed);
  tensor<float, 4> q({p.B, p.Hq, 1, p.D});
  tensor<KV, 4> k({p.B, p.Hkv, p.Lk, p.D}), v({p.B, p.Hkv, p.Lk, p.Dv});
  fill(q, rng, -2.0f, 2.0f);
  fill(k, rng);
  fill(v, rng);
  const auto pages = attn::quest_pages::build(k, p.page);
  tensor<float, 4> out({p.B, p.Hq, 1, p.Dv}), want({p.B, p.Hq, 1, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, 1}), want_lse({p.B, p.Hq, 1});
  tensor<std::int64_t, 3> sel({p.B, p.Hq, p.blocks});
  attn::quest_options opt;
  opt.blocks = p.blocks;
  opt.window = p.window;
  attn::quest_decode(q, k, v, pages, out, lse, opt, sel);
  const std::int64_t limit = std::max<std::int64_t>(0, p.Lk - p.window);
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t h = 0; h < p.Hq; ++h) {
      std::vector<std::int64_t> chosen;
      for (std::int64_t i = 0; i < p.blocks; ++i) {
        const std::int64_t pg = sel(b, h, i);
        if (pg < 0) continue;
        ASSERT_LT(pg * p.page, limit) << "a selected page must start below Lk - window";
        if (!chosen.empty()) {
          ASSERT_GT(pg, chosen.back()) << "selected pages ascend";
        }
        chosen.push_back(pg);
      }
      const std::int64_t n_cand = (limit + p.page - 1) / p.page;
      EXPECT_EQ(static_cast<std::int64_t>(chosen.size()), std::min(p.blocks, n_cand));
      attn::sparse_decode_detail::reference_over_keys<KV>(q, mnemo::cview(k), mnemo::cview(v), want, want_lse, b, h,
                                                          h / (p.Hq / p.Hkv),
                                                          attn::sparse_decode_detail::key_set(chosen, p.page, limit, p.Lk),
                                                          static_cast<float>(1.0 / std::sqrt(double(p.D))));
    }
  expect_close(out, want, "out");
  expect_close(lse, want_lse, "lse");
}

TEST(QuestPages, MinMaxMatchBruteForceBuiltAtOnceAndGrown) {
  std::mt19937 rng(1);
  tensor<float, 4> k({2, 3, 53, 40});
  fill(k, rng);
  const auto at_once = attn::quest_pages::build(k, 16);
  attn::quest_pages grown(2, 3, 40, 16);
  for (std::int64_t L : {0, 1, 15, 16, 17, 40, 53}) grown.update(mnemo::cview(k).narrow(2, 0, L));
  ASSERT_EQ(at_once.pages(), 4);
  ASSERT_EQ(grown.pages(), 4);
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t hk = 0; hk < 3; ++hk)
      for (std::int64_t p = 0; p < 4; ++p)
        for (std::int64_t c = 0; c < 40; ++c) {
          float lo = std::numeric_limits<float>::infinity(), hi = -lo;
          for (std::int64_t j = p * 16; j < std::min<std::int64_t>(53, (p + 1) * 16); ++j) {
            lo = std::min(lo, k(b, hk, j, c));
            hi = std::max(hi, k(b, hk, j, c));
          }
          EXPECT_EQ(at_once.min(b, hk, p)[c], lo);
          EXPECT_EQ(at_once.max(b, hk, p)[c], hi);
          EXPECT_EQ(grown.min(b, hk, p)[c], lo);
          EXPECT_EQ(grown.max(b, hk, p)[c], hi);
        }
}

TEST(QuestPages, BoundIsAnUpperBoundOfEveryScoreInThePage) {
  std::mt19937 rng(2);
  tensor<float, 4> k({1, 1, 101, 37});
  tensor<float, 1> q({37});
  fill(k, rng);
  fill(q, rng, -3.0f, 3.0f);
  const auto pages = attn::quest_pages::build(k, 8);
  for (std::int64_t p = 0; p < pages.pages(); ++p) {
    const float u = attn::sparse_decode_detail::page_bound<mnemo::simd::default_arch>(q.data(), pages.min(0, 0, p),
                                                                                     pages.max(0, 0, p), 37);
    for (std::int64_t j = p * 8; j < std::min<std::int64_t>(101, (p + 1) * 8); ++j) {
      double dot = 0;
      for (std::int64_t c = 0; c < 37; ++c) dot += double(q(c)) * k(0, 0, j, c);
      EXPECT_GE(u + 1e-4, dot) << "page " << p << " key " << j;
    }
  }
}

TEST(QuestDecode, MatchesReferenceOverSelectedKeys) {
  std::uint32_t seed = 10;
  for (const problem& p : {problem{1, 4, 2, 100, 40, 24, 16, 3, 0}, problem{2, 8, 1, 257, 64, 64, 16, 5, 37},
                           problem{1, 2, 2, 1, 40, 40, 16, 2, 0}, problem{1, 4, 4, 77, 96, 32, 7, 4, 20},
                           problem{1, 4, 1, 50, 40, 40, 16, 2, 100}, problem{1, 4, 2, 130, 33, 17, 1, 9, 5}})
    check_against_mask<float>(p, seed++);
}

TEST(QuestDecode, F16Cache) { check_against_mask<f16>(problem{1, 8, 2, 300, 128, 128, 16, 6, 32}, 20); }

TEST(QuestDecode, SelectionAgreesWithDoubleBoundsAndReferenceOutput) {
  std::mt19937 rng(30);
  const std::int64_t Hq = 4, Hkv = 2, Lk = 333, D = 40, page = 16, blocks = 5, window = 24;
  tensor<float, 4> q({1, Hq, 1, D}), k({1, Hkv, Lk, D}), v({1, Hkv, Lk, D});
  fill(q, rng, -2.0f, 2.0f);
  fill(k, rng);
  fill(v, rng);
  attn::quest_options opt;
  opt.blocks = blocks;
  opt.window = window;
  tensor<float, 4> out({1, Hq, 1, D}), ref({1, Hq, 1, D});
  tensor<std::int64_t, 3> sel({1, Hq, blocks}), ref_sel({1, Hq, blocks});
  attn::quest_decode(q, k, v, attn::quest_pages::build(k, page), out, {}, opt, sel);
  attn::reference_quest_decode<float>(q, k, v, page, ref, {}, ref_sel, opt);
  // Random data has no near-ties at this size: the f32 and double selections coincide.
  for (std::int64_t i = 0; i < sel.size(); ++i) EXPECT_EQ(sel.data()[i], ref_sel.data()[i]) << i;
  expect_close(out, ref, "out");
}

TEST(QuestDecode, AllPagesIsDenseAttention) {
  std::mt19937 rng(40);
  tensor<float, 4> q({1, 8, 1, 64}), k({1, 2, 200, 64}), v({1, 2, 200, 48});
  fill(q, rng, -2.0f, 2.0f);
  fill(k, rng);
  fill(v, rng);
  tensor<float, 4> out({1, 8, 1, 48}), dense({1, 8, 1, 48});
  tensor<float, 3> lse({1, 8, 1}), dense_lse({1, 8, 1});
  attn::quest_options opt;
  opt.blocks = 13;  // 200 / 16 rounds up to 13 pages
  opt.window = 10;
  attn::quest_decode(q, k, v, attn::quest_pages::build(k, 16), out, lse, opt);
  attn::reference(q, k, v, dense, dense_lse);
  expect_close(out, dense, "out");
  expect_close(lse, dense_lse, "lse");
}

TEST(QuestDecode, BadArgumentsThrow) {
  tensor<float, 4> q({1, 4, 1, 8}), k({1, 2, 20, 8}), v({1, 2, 20, 8}), out({1, 4, 1, 8});
  tensor<float, 4> q2({1, 4, 2, 8}), out2({1, 4, 2, 8});
  const auto pages = attn::quest_pages::build(k, 4);
  attn::quest_options opt;
  opt.blocks = 2;
  EXPECT_NO_THROW(attn::quest_decode(q, k, v, pages, out, {}, opt));
  EXPECT_THROW(attn::quest_decode(q2, k, v, pages, out2, {}, opt), mnemo::error);  // Lq = 2
  attn::quest_options bad = opt;
  bad.blocks = 0;
  EXPECT_THROW(attn::quest_decode(q, k, v, pages, out, {}, bad), mnemo::error);
  bad = opt;
  bad.window = -1;
  EXPECT_THROW(attn::quest_decode(q, k, v, pages, out, {}, bad), mnemo::error);
  const auto stale = attn::quest_pages::build(mnemo::cview(k).narrow(2, 0, 12), 4);
  EXPECT_THROW(attn::quest_decode(q, k, v, stale, out, {}, opt), mnemo::error);  // pages.size() != Lk
  tensor<float, 4> k3({1, 2, 20, 6});
  EXPECT_THROW(attn::quest_decode(q, k, v, attn::quest_pages::build(k3, 4), out, {}, opt), mnemo::error);  // D
  EXPECT_THROW(attn::quest_decode(q, k, v, attn::quest_pages{}, out, {}, opt), mnemo::error);
  tensor<std::int64_t, 3> sel({1, 4, 3});
  EXPECT_THROW(attn::quest_decode(q, k, v, pages, out, {}, opt, sel), mnemo::error);  // [B, Hq, blocks]
  EXPECT_THROW(attn::quest_pages(1, 2, 8, 0), mnemo::error);
  attn::quest_pages grown(1, 2, 8, 4);
  grown.update(k);
  EXPECT_THROW(grown.update(mnemo::cview(k).narrow(2, 0, 10)), mnemo::error);  // shrank
  EXPECT_THROW(grown.update(k3), mnemo::error);
  EXPECT_THROW(attn::reference_quest_decode<float>(q, k, v, 0, out, {}, {}, opt), mnemo::error);
}

}  // namespace
