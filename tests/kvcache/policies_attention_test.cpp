// Tests of the attention side output the KV policies read (attention::column_sums in
// attention/reference.hpp, flash.hpp, decode.hpp): flash and decode against the double-precision
// reference, the reference against its own probabilities written out, and bad arguments.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>

#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/reference.hpp"

namespace {

using namespace mnemo;
namespace attn = mnemo::attention;
namespace mods = mnemo::attention::mods;

template <class T, int R>
tensor<T, R> random_tensor(shape_t<R> shape, std::uint32_t seed) {
  tensor<T, R> t(shape);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (auto& x : t) x = T(dist(rng));
  return t;
}

struct problem {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, rows;
};

void expect_close(const tensor<float, 3>& got, const tensor<float, 3>& want, const std::string& what) {
  constexpr float atol = 2e-6f, rtol = 1e-4f;
  for (std::int64_t i = 0; i < want.size(); ++i)
    ASSERT_NEAR(got.data()[i], want.data()[i], atol + rtol * std::abs(want.data()[i])) << what << " at " << i;
}

template <class Mod>
tensor<float, 3> reference_sums(const problem& p, const tensor<float, 4>& q, const tensor<float, 4>& k, const Mod& mod) {
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.D});
  tensor<float, 3> sums({p.B, p.Hq, p.Lk});
  attn::reference(cview(q), k, k, out.as_view(), {}, mod, {}, attn::column_sums{sums.as_view(), p.rows});
  return sums;
}

// The reference's sums equal the probabilities it implies: exp(s - lse) summed over the rows.
TEST(ColumnSums, ReferenceEqualsProbabilitiesFromLse) {
  const problem p{1, 4, 2, 9, 13, 8, 3};
  const auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, 1);
  const auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, 2);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.D});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq}), sums({p.B, p.Hq, p.Lk});
  attn::reference(cview(q), k, k, out.as_view(), lse.as_view(), mods::causal{}, {}, attn::column_sums{sums.as_view(), p.rows});
  const double scale = 1.0 / std::sqrt(static_cast<double>(p.D));
  for (std::int64_t h = 0; h < p.Hq; ++h)
    for (std::int64_t j = 0; j < p.Lk; ++j) {
      double want = 0;
      for (std::int64_t i = p.Lq - p.rows; i < p.Lq; ++i) {
        if (j > i + p.Lk - p.Lq) continue;
        double s = 0;
        for (std::int64_t c = 0; c < p.D; ++c) s += static_cast<double>(q(0, h, i, c)) * k(0, h / 2, j, c);
        want += std::exp(scale * s - lse(0, h, i));
      }
      EXPECT_NEAR(sums(0, h, j), want, 1e-5) << "h=" << h << " j=" << j;
    }
}

TEST(ColumnSums, FlashMatchesReferenceAroundTileEdges) {
  std::uint32_t seed = 10;
  for (const problem& p : {problem{1, 2, 2, 1, 1, 8, 0}, problem{1, 4, 1, 37, 37, 40, 0}, problem{2, 4, 2, 64, 64, 16, 16},
                           problem{1, 8, 2, 130, 130, 32, 70}, problem{1, 2, 1, 20, 150, 24, 5}}) {
    const auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, seed++);
    const auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, seed++);
    const std::string what = "Lq=" + std::to_string(p.Lq) + " Lk=" + std::to_string(p.Lk) + " rows=" + std::to_string(p.rows);
    for (int causal = 0; causal < 2; ++causal) {
      tensor<float, 4> out({p.B, p.Hq, p.Lq, p.D}), out_plain({p.B, p.Hq, p.Lq, p.D});
      tensor<float, 3> sums({p.B, p.Hq, p.Lk});
      const attn::column_sums cs{sums.as_view(), p.rows};
      if (causal) {
        attn::flash(cview(q), k, k, out.as_view(), {}, mods::causal{}, {}, cs);
        attn::flash(cview(q), k, k, out_plain.as_view(), {}, mods::causal{});
        expect_close(sums, reference_sums(p, q, k, mods::causal{}), what + " causal");
      } else {
        attn::flash(cview(q), k, k, out.as_view(), {}, mods::none{}, {}, cs);
        attn::flash(cview(q), k, k, out_plain.as_view(), {}, mods::none{});
        expect_close(sums, reference_sums(p, q, k, mods::none{}), what);
      }
      for (std::int64_t i = 0; i < out.size(); ++i) ASSERT_EQ(out.data()[i], out_plain.data()[i]) << "out changed: " << what;
    }
  }
}

TEST(ColumnSums, FlashWithWindowModAndHalfKeys) {
  const problem p{1, 4, 2, 70, 90, 32, 0};
  const auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, 40);
  const auto k = random_tensor<f16, 4>({p.B, p.Hkv, p.Lk, p.D}, 41);
  const auto mod = mods::all_of(mods::causal{}, mods::sliding_window{7});
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.D});
  tensor<float, 3> sums({p.B, p.Hq, p.Lk}), want({p.B, p.Hq, p.Lk});
  attn::flash(cview(q), k, k, out.as_view(), {}, mod, {}, attn::column_sums{sums.as_view(), 0});
  attn::reference(cview(q), k, k, out.as_view(), {}, mod, {}, attn::column_sums{want.as_view(), 0});
  expect_close(sums, want, "window 7, f16 keys");
}

TEST(ColumnSums, DecodeMatchesReferenceAcrossChunksAndThreads) {
  std::uint32_t seed = 60;
  for (const problem& p : {problem{1, 8, 2, 1, 1, 16, 0}, problem{1, 4, 4, 1, 1300, 24, 1}, problem{2, 8, 2, 3, 1030, 16, 2}}) {
    const auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, seed++);
    const auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, seed++);
    const tensor<float, 3> want = reference_sums(p, q, k, mods::causal{});
    tensor<float, 3> first;
    for (int threads : {1, 2}) {
      tensor<float, 4> out({p.B, p.Hq, p.Lq, p.D});
      tensor<float, 3> sums({p.B, p.Hq, p.Lk});
      attn::decode_workspace ws;
      attn::decode<float>(q, k, k, out.as_view(), {}, mods::causal{}, {0, threads}, ws, attn::column_sums{sums.as_view(), p.rows});
      expect_close(sums, want, "decode Lk=" + std::to_string(p.Lk));
      if (threads == 1) first = sums;
      else
        for (std::int64_t i = 0; i < sums.size(); ++i) ASSERT_EQ(sums.data()[i], first.data()[i]) << "thread-dependent";
    }
  }
}

TEST(ColumnSums, RowsThatSeeNoKeyContributeNothing) {
  // Sliding window 1 with Lq > Lk: the first rows see nothing (qp < 0 is never visible).
  const problem p{1, 2, 1, 4, 2, 8, 0};
  const auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, 80);
  const auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, 81);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.D});
  tensor<float, 3> sums({p.B, p.Hq, p.Lk});
  attn::flash(cview(q), k, k, out.as_view(), {}, mods::causal{}, {}, attn::column_sums{sums.as_view(), 0});
  // Rows 0 and 1 see no key, rows 2 and 3 each spread a probability mass of 1.
  for (std::int64_t h = 0; h < p.Hq; ++h) {
    double total = 0;
    for (std::int64_t j = 0; j < p.Lk; ++j) {
      ASSERT_TRUE(std::isfinite(sums(0, h, j)));
      total += sums(0, h, j);
    }
    EXPECT_NEAR(total, 2.0, 1e-5);
  }
  // Decode, 3 rows against 2 keys: row 0 sees nothing, rows 1 and 2 each spread a mass of 1.
  attn::decode<float>(cview(q).narrow(2, 1, 3), k, k, out.as_view().narrow(2, 1, 3), {}, mods::causal{}, {},
                      attn::column_sums{sums.as_view(), 0});
  for (std::int64_t h = 0; h < p.Hq; ++h) {
    double total = 0;
    for (std::int64_t j = 0; j < p.Lk; ++j) total += sums(0, h, j);
    EXPECT_NEAR(total, 2.0, 1e-5);
  }
}

TEST(ColumnSums, BadArgumentsThrow) {
  const auto q = random_tensor<float, 4>({1, 2, 3, 8}, 90);
  const auto k = random_tensor<float, 4>({1, 1, 5, 8}, 91);
  tensor<float, 4> out({1, 2, 3, 8});
  tensor<float, 3> wrong({1, 2, 4}), sums({1, 2, 5});
  EXPECT_THROW(attn::flash(cview(q), k, k, out.as_view(), {}, mods::none{}, {}, attn::column_sums{wrong.as_view(), 0}),
               mnemo::error);
  EXPECT_THROW(attn::reference(cview(q), k, k, out.as_view(), {}, mods::none{}, {}, attn::column_sums{sums.as_view(), 4}),
               mnemo::error);
  EXPECT_THROW(attn::decode<float>(q, k, k, out.as_view(), {}, mods::none{}, {}, attn::column_sums{sums.as_view(), -1}),
               mnemo::error);
  try {
    attn::flash(cview(q), k, k, out.as_view(), {}, mods::none{}, {}, attn::column_sums{wrong.as_view(), 0});
  } catch (const mnemo::error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("column_sums.sums"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[1, 2, 5]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[1, 2, 4]"), std::string::npos) << msg;
  }
}

}  // namespace
