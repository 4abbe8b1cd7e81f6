// Tests for mnemo/kvcache/decode.hpp: the fused decode kernel against the double-precision
// reference in every storage kind (D 40 / 128, Dv != D, GQA ratios 1 / 4, Lq 1 / 3, lengths across
// the chunk size and the key groups, ragged heads after compaction, an empty head giving out = 0,
// lse = -inf), bit-identical results for every thread count, agreement of the f16 cache with
// attention::decode on the same data, int8 / int4 errors against the unquantized attention that
// grow with fewer bits, the column-sums side output against attention::reference's on the
// dequantized cache (every storage kind, ragged heads, summed-row counts), NaN propagation, and
// every argument check.
#include "mnemo/kvcache/decode.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/reference.hpp"

namespace {

namespace kv = mnemo::kvcache;
namespace attn = mnemo::attention;
using mnemo::tensor;

tensor<float, 3> random_tensor(std::int64_t a, std::int64_t b, std::int64_t c, std::uint32_t seed) {
  tensor<float, 3> t({a, b, c});
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (float& x : t) x = normal(rng);
  return t;
}

struct problem {
  std::int64_t Hq, Hkv, Lq, L, D, Dv;
};

kv::layer_cache filled(kv::storage kind, const problem& p, std::uint32_t seed, kv::quant_options qo = {32, 16, 48}) {
  kv::cache_config cfg;
  cfg.kind = kind;
  cfg.Hkv = p.Hkv;
  cfg.capacity = p.L + 8;
  cfg.D = p.D;
  cfg.Dv = p.Dv;
  cfg.quant = qo;
  kv::layer_cache c(cfg);
  c.append(random_tensor(p.Hkv, p.L, p.D, seed), random_tensor(p.Hkv, p.L, p.Dv, seed + 1));
  return c;
}

void expect_close_to_reference(const kv::layer_cache& c, std::int64_t Hq, std::int64_t Lq, std::uint32_t seed) {
  const tensor<float, 3> q = random_tensor(Hq, Lq, c.head_dim(), seed);
  tensor<float, 3> out({Hq, Lq, c.value_dim()}), want({Hq, Lq, c.value_dim()});
  tensor<float, 2> lse({Hq, Lq}), want_lse({Hq, Lq});
  kv::decode(c, q, out, lse);
  kv::reference::decode(c, q, want, want_lse);
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lq; ++i) {
      if (std::isinf(want_lse(h, i))) {
        EXPECT_EQ(lse(h, i), want_lse(h, i));
      } else {
        EXPECT_NEAR(lse(h, i), want_lse(h, i), 2e-5 * (1 + std::fabs(want_lse(h, i))));
      }
      for (std::int64_t e = 0; e < c.value_dim(); ++e)
        ASSERT_NEAR(out(h, i, e), want(h, i, e), 2e-5 + 1e-4 * std::fabs(want(h, i, e)))
            << kv::storage_name(c.kind()) << " h " << h << " i " << i << " e " << e;
    }
}

TEST(CacheDecode, MatchesReferenceInEveryStorage) {
  const problem problems[] = {
      {4, 4, 1, 1, 40, 40},      // one token: residual window only
      {8, 2, 1, 37, 40, 24},     // Dv != D, awkward sizes
      {8, 2, 3, 600, 128, 128},  // across the chunk size, several key groups, Lq = 3
      {4, 1, 1, 1100, 96, 80},   // MQA-like group of 4, three chunks
  };
  std::uint32_t seed = 1;
  for (const problem& p : problems)
    for (kv::storage kind : kv::all_storages) {
      SCOPED_TRACE(::testing::Message() << kv::storage_name(kind) << " L " << p.L << " D " << p.D);
      expect_close_to_reference(filled(kind, p, seed), p.Hq, p.Lq, seed + 7);
      seed += 3;
    }
}

TEST(CacheDecode, ValueGroupsThatSplitATile) {
  // value_group 16 splits every SIMD tile over several groups (and int4 leaves the pair order).
  for (kv::storage kind : {kv::storage::int8, kv::storage::int4})
    expect_close_to_reference(filled(kind, {8, 2, 1, 300, 64, 96}, 11, {16, 16, 16}), 8, 1, 12);
}

TEST(CacheDecode, RaggedHeadsAndAnEmptyHead) {
  std::mt19937 rng(3);
  for (kv::storage kind : kv::all_storages) {
    SCOPED_TRACE(kv::storage_name(kind));
    kv::layer_cache c = filled(kind, {12, 3, 1, 700, 64, 64}, 21);
    kv::selection sel;
    sel.heads.resize(3);
    for (std::int64_t j = 0; j < 700; ++j) {
      if (std::uniform_int_distribution<int>(0, 3)(rng) == 0) sel.heads[0].push_back(j);
      if (j % 5 != 0) sel.heads[2].push_back(j);
    }
    c.compact(sel);  // head 1 keeps nothing
    c.append(random_tensor(3, 5, 64, 22), random_tensor(3, 5, 64, 23));
    kv::selection drop_head1 = sel;
    drop_head1.heads[0].clear();
    drop_head1.heads[2].clear();
    for (std::int64_t j = 0; j < c.length(0); ++j) drop_head1.heads[0].push_back(j);
    for (std::int64_t j = 0; j < c.length(2); ++j) drop_head1.heads[2].push_back(j);
    drop_head1.heads[1].clear();
    c.compact(drop_head1);
    ASSERT_EQ(c.length(1), 0);
    expect_close_to_reference(c, 12, 2, 24);
    const tensor<float, 3> q = random_tensor(12, 1, 64, 25);
    tensor<float, 3> out({12, 1, 64});
    tensor<float, 2> lse({12, 1});
    kv::decode(c, q, out, lse);
    for (std::int64_t h = 4; h < 8; ++h) {  // the query heads of kv head 1
      EXPECT_EQ(lse(h, 0), -std::numeric_limits<float>::infinity());
      for (std::int64_t e = 0; e < 64; ++e) EXPECT_EQ(out(h, 0, e), 0.0f);
    }
  }
}

TEST(CacheDecode, BitIdenticalForEveryThreadCount) {
  for (kv::storage kind : {kv::storage::f16, kv::storage::int4}) {
    const kv::layer_cache c = filled(kind, {8, 2, 1, 1500, 64, 64}, 31);
    const tensor<float, 3> q = random_tensor(8, 1, 64, 32);
    tensor<float, 3> a({8, 1, 64}), b({8, 1, 64});
    tensor<float, 2> la({8, 1}), lb({8, 1});
    kv::decode(c, q, a, la, {0, 1});
    attn::decode_workspace ws;
    for (int threads : {2, 3}) {
      kv::decode(c, q, b, lb, {0, threads}, ws);
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.bytes()), 0) << threads;
      EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.bytes()), 0) << threads;
    }
  }
}

TEST(CacheDecode, F16CacheAgreesWithAttentionDecode) {
  const problem p{8, 2, 2, 900, 64, 64};
  const kv::layer_cache c = filled(kv::storage::f16, p, 41);
  const tensor<float, 3> q = random_tensor(8, 2, 64, 42);
  tensor<float, 3> out({8, 2, 64});
  kv::decode(c, q, out, {}, {0.2f, 1});
  // The same keys through attention::decode: [1, Hkv, L, D] views of the cache's storage.
  const auto k = c.dense_keys<mnemo::f16>(), v = c.dense_values<mnemo::f16>();
  const mnemo::view<const mnemo::f16, 4> k4(k.data(), {1, 2, p.L, 64}, {0, k.stride(0), k.stride(1), 1});
  const mnemo::view<const mnemo::f16, 4> v4(v.data(), {1, 2, p.L, 64}, {0, v.stride(0), v.stride(1), 1});
  const mnemo::view<const float, 4> q4(q.data(), {1, 8, 2, 64});
  tensor<float, 4> want({1, 8, 2, 64});
  attn::decode<mnemo::f16>(q4, k4, v4, want, {}, attn::mods::none{}, {0.2f, 1});
  for (std::int64_t i = 0; i < want.size(); ++i) ASSERT_NEAR(out.data()[i], want.data()[i], 1e-5);
}

TEST(CacheDecode, QuantizationErrorGrowsWithFewerBits) {
  // Attention over the quantized cache against attention over the exact f32 keys and values.
  const problem p{8, 2, 1, 512, 128, 128};
  const tensor<float, 3> q = random_tensor(8, 1, 128, 51);
  double err[5] = {};
  for (kv::storage kind : kv::all_storages) {
    const kv::layer_cache c = filled(kind, p, 52, {});
    const kv::layer_cache exact = filled(kv::storage::f32, p, 52);
    tensor<float, 3> out({8, 1, 128}), want({8, 1, 128});
    kv::decode(c, q, out);
    kv::reference::decode(exact, q, want);
    for (std::int64_t i = 0; i < out.size(); ++i)
      err[static_cast<int>(kind)] = std::max(err[static_cast<int>(kind)], double(std::fabs(out.data()[i] - want.data()[i])));
  }
  EXPECT_LT(err[static_cast<int>(kv::storage::f32)], 1e-5);
  EXPECT_LT(err[static_cast<int>(kv::storage::f16)], err[static_cast<int>(kv::storage::int8)]);
  EXPECT_LT(err[static_cast<int>(kv::storage::int8)], err[static_cast<int>(kv::storage::int4)]);
  EXPECT_LT(err[static_cast<int>(kv::storage::int4)], 0.1);  // |v| ~ 1: an int4 output stays usable
}

// The cache of kind `kind` with ragged heads: head 0 keeps about a third of its slots, head 1
// every slot but multiples of 7, head 2 nothing, then 5 more tokens everywhere.
kv::layer_cache ragged(kv::storage kind, std::int64_t L, std::int64_t D, std::uint32_t seed) {
  kv::layer_cache c = filled(kind, {12, 3, 1, L, D, D}, seed);
  kv::selection sel;
  sel.heads.resize(3);
  for (std::int64_t j = 0; j < L; ++j) {
    if (j % 3 == 1) sel.heads[0].push_back(j);
    if (j % 7 != 0) sel.heads[1].push_back(j);
  }
  c.compact(sel);
  c.append(random_tensor(3, 5, D, seed + 2), random_tensor(3, 5, D, seed + 3));
  return c;
}

TEST(CacheDecode, ColumnSumsMatchAttentionReferenceOnTheDequantizedCache) {
  // attention::reference over each head's dequantized slots (layer_cache::gather) is an
  // independent computation of the same probabilities; the kernel reads the codes directly.
  const std::int64_t D = 48, Lq = 3, Hq = 12, G = 4;
  std::uint32_t seed = 71;
  for (kv::storage kind : kv::all_storages) {
    const kv::layer_cache c = ragged(kind, 700, D, seed);
    const tensor<float, 3> q = random_tensor(Hq, Lq, D, seed + 5);
    seed += 11;
    for (std::int64_t rows : {0, 2}) {
      SCOPED_TRACE(::testing::Message() << kv::storage_name(kind) << " rows " << rows);
      const std::int64_t Lmax = c.max_length();
      tensor<float, 3> out({Hq, Lq, D});
      tensor<float, 2> sums({Hq, Lmax + 3}), sums2({Hq, Lmax + 3}), ref_sums({Hq, Lmax});
      for (float& x : sums) x = -7.0f;  // columns past max_length() must stay untouched
      for (float& x : sums2) x = -7.0f;
      kv::decode(c, q, out, {}, {0, 1}, kv::column_sums{sums.as_view(), rows});
      kv::decode(c, q, out, {}, {0, 2}, kv::column_sums{sums2.as_view(), rows});
      kv::reference::decode(c, q, out, {}, {}, kv::column_sums{ref_sums.as_view(), rows});
      for (std::int64_t hk = 0; hk < 3; ++hk) {
        const std::int64_t n = c.length(hk);
        std::vector<float> want(static_cast<std::size_t>(G * n));
        if (n > 0) {
          std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
          for (std::int64_t j = 0; j < n; ++j) slots[static_cast<std::size_t>(j)] = j;
          tensor<float, 4> k({1, 1, n, D}), v({1, 1, n, D}), o({1, G, Lq, D});
          tensor<float, 3> cs({1, G, n});
          c.gather(hk, slots, k.as_view()[0][0], v.as_view()[0][0]);
          const mnemo::view<const float, 4> q4(&q(hk * G, 0, 0), {1, G, Lq, D});
          attn::reference<float>(q4, mnemo::cview(k), mnemo::cview(v), o.as_view(), {}, attn::mods::none{}, {},
                                 attn::column_sums{cs.as_view(), rows});
          std::copy_n(cs.data(), cs.size(), want.data());
        }
        for (std::int64_t g = 0; g < G; ++g) {
          const std::int64_t h = hk * G + g;
          for (std::int64_t j = 0; j < Lmax + 3; ++j) {
            if (j >= Lmax) {
              ASSERT_EQ(sums(h, j), -7.0f) << "h " << h << " j " << j;
            } else if (j >= n) {
              ASSERT_EQ(sums(h, j), 0.0f) << "h " << h << " j " << j;
              ASSERT_EQ(ref_sums(h, j), 0.0f) << "h " << h << " j " << j;
            } else {
              const float w = want[static_cast<std::size_t>(g * n + j)];
              ASSERT_NEAR(sums(h, j), w, 1e-6 + 1e-4 * w) << "h " << h << " j " << j;
              ASSERT_NEAR(ref_sums(h, j), w, 1e-6 + 1e-5 * w) << "h " << h << " j " << j;
            }
          }
        }
      }
      EXPECT_EQ(std::memcmp(sums.data(), sums2.data(), sums.bytes()), 0) << "thread count changed the sums";
    }
  }
}

// A mask and score mod on every storage kind (softcap and a sliding window that leaves whole
// chunks out, with sinks), against attention::reference over the gathered (dequantized) cache.
TEST(CacheDecode, ModsAndSinksMatchAttentionReferenceOnTheGatheredCache) {
  const problem p{8, 2, 3, 1100, 64, 48};
  const auto mod = attn::mods::all_of(attn::mods::softcap{4.0f}, attn::mods::sliding_window{600});
  tensor<float, 1> sinks({p.Hq});
  for (std::int64_t h = 0; h < p.Hq; ++h) sinks(h) = 0.3f * static_cast<float>(h) - 1.0f;
  std::uint32_t seed = 301;
  for (kv::storage kind : kv::all_storages) {
    SCOPED_TRACE(kv::storage_name(kind));
    const kv::layer_cache c = filled(kind, p, seed);
    const tensor<float, 3> q = random_tensor(p.Hq, p.Lq, p.D, seed + 7);
    seed += 13;
    tensor<float, 3> out({p.Hq, p.Lq, p.Dv});
    tensor<float, 2> lse({p.Hq, p.Lq});
    attn::options opt;
    opt.sinks = mnemo::cview(sinks);
    attn::decode_workspace ws;
    kv::decode(c, q, out, lse, mod, opt, ws);
    // The reference: [1, Hkv, L, D] gathered, queries [1, Hq, Lq, D] at the last positions.
    tensor<float, 4> k({1, p.Hkv, p.L, p.D}), v({1, p.Hkv, p.L, p.Dv}), q4({1, p.Hq, p.Lq, p.D}), o({1, p.Hq, p.Lq, p.Dv});
    tensor<float, 3> l({1, p.Hq, p.Lq});
    std::vector<std::int64_t> slots(static_cast<std::size_t>(p.L));
    for (std::int64_t j = 0; j < p.L; ++j) slots[static_cast<std::size_t>(j)] = j;
    for (std::int64_t hk = 0; hk < p.Hkv; ++hk) c.gather(hk, slots, k.as_view()[0][hk], v.as_view()[0][hk]);
    std::copy_n(q.data(), q.size(), q4.data());
    attn::reference<float>(mnemo::cview(q4), mnemo::cview(k), mnemo::cview(v), o.as_view(), l.as_view(), mod, opt);
    for (std::int64_t h = 0; h < p.Hq; ++h)
      for (std::int64_t i = 0; i < p.Lq; ++i) {
        EXPECT_NEAR(lse(h, i), l(0, h, i), 2e-5 * (1 + std::fabs(l(0, h, i))));
        for (std::int64_t e = 0; e < p.Dv; ++e)
          ASSERT_NEAR(out(h, i, e), o(0, h, i, e), 2e-5 + 1e-4 * std::fabs(o(0, h, i, e))) << "h " << h << " i " << i;
      }
  }
}

TEST(CacheDecode, ColumnSumsFeedATrackerWithoutASecondPass) {
  // Each query head's sums over all its rows add up to the number of rows that see a slot.
  const kv::layer_cache c = ragged(kv::storage::int4, 1300, 64, 81);
  const tensor<float, 3> q = random_tensor(12, 2, 64, 82);
  tensor<float, 3> out({12, 2, 64});
  tensor<float, 2> sums({12, c.max_length()});
  kv::decode(c, q, out, {}, {}, kv::column_sums{sums.as_view(), 0});
  for (std::int64_t h = 0; h < 12; ++h) {
    double total = 0;
    for (std::int64_t j = 0; j < c.max_length(); ++j) total += sums(h, j);
    EXPECT_NEAR(total, c.length(h / 4) > 0 ? 2.0 : 0.0, 1e-4) << h;
  }
}

TEST(CacheDecode, NaNInAQueryOrAKeyMakesItsRowsNaN) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (kv::storage kind : {kv::storage::f32, kv::storage::int8}) {
    SCOPED_TRACE(kv::storage_name(kind));
    const problem p{8, 2, 2, 1100, 32, 32};
    kv::layer_cache c({kind, p.Hkv, p.L, p.D, p.Dv, {32, 16, 48}});
    tensor<float, 3> k = random_tensor(p.Hkv, p.L, p.D, 91);
    if (kind == kv::storage::f32) k(1, 600, 3) = nan;  // kv head 1, a middle chunk (quantized appends reject NaN)
    c.append(k, random_tensor(p.Hkv, p.L, p.Dv, 93));
    tensor<float, 3> q = random_tensor(8, 2, 32, 92);
    q(0, 1, 5) = nan;  // query head 0 (kv head 0), row 1: every score of that row is NaN
    for (int threads : {1, 2}) {
      tensor<float, 3> out({8, 2, 32});
      tensor<float, 2> lse({8, 2}), sums({8, c.max_length()});
      kv::decode(c, q, out, lse, {0, threads}, kv::column_sums{sums.as_view(), 0});
      for (std::int64_t h = 0; h < 8; ++h)
        for (std::int64_t i = 0; i < 2; ++i) {
          const bool want_nan = (h == 0 && i == 1) || (kind == kv::storage::f32 && h >= 4);
          EXPECT_EQ(std::isnan(lse(h, i)), want_nan) << "h " << h << " i " << i << " lse " << lse(h, i);
          for (std::int64_t e = 0; e < 32; ++e) ASSERT_EQ(std::isnan(out(h, i, e)), want_nan) << "h " << h << " i " << i;
        }
      tensor<float, 3> want({8, 2, 32});
      tensor<float, 2> want_lse({8, 2});
      kv::reference::decode(c, q, want, want_lse);
      EXPECT_TRUE(std::isnan(want_lse(0, 1)));
      EXPECT_TRUE(std::isnan(want(0, 1, 0)));
      EXPECT_FALSE(std::isnan(sums(1, 0))) << "a NaN row adds nothing to the sums";
    }
  }
}

TEST(CacheDecode, BadArgumentsThrow) {
  const kv::layer_cache c = filled(kv::storage::int8, {8, 2, 1, 50, 32, 16}, 61);
  const tensor<float, 3> q = random_tensor(8, 1, 32, 62);
  tensor<float, 3> out({8, 1, 16});
  tensor<float, 2> lse({8, 1});
  EXPECT_THROW(kv::decode(c, random_tensor(8, 1, 31, 1), out, lse), mnemo::error);  // D
  EXPECT_THROW(kv::decode(c, random_tensor(5, 1, 32, 1), tensor<float, 3>({5, 1, 16}), {}), mnemo::error);  // Hq % Hkv
  EXPECT_THROW(kv::decode(c, random_tensor(8, 17, 32, 1), tensor<float, 3>({8, 17, 16}), {}), mnemo::error);  // Lq
  EXPECT_THROW(kv::decode(c, q, tensor<float, 3>({8, 1, 32}), lse), mnemo::error);  // out Dv
  EXPECT_THROW(kv::decode(c, q, out, tensor<float, 2>({8, 2})), mnemo::error);      // lse
  EXPECT_THROW(kv::decode(c, q, out, lse, {std::numeric_limits<float>::infinity(), 0}), mnemo::error);
  EXPECT_THROW(kv::decode(c, q, out, lse, {0, -1}), mnemo::error);
  EXPECT_THROW(kv::decode(c, mnemo::view<const float, 3>{}, out, lse), mnemo::error);
  EXPECT_THROW(kv::decode(kv::layer_cache{}, q, out, lse), mnemo::error);
  tensor<float, 2> short_sums({8, 49}), wrong_heads({4, 50}), sums({8, 50});
  EXPECT_THROW(kv::decode(c, q, out, lse, {}, kv::column_sums{short_sums.as_view(), 0}), mnemo::error);
  EXPECT_THROW(kv::decode(c, q, out, lse, {}, kv::column_sums{wrong_heads.as_view(), 0}), mnemo::error);
  EXPECT_THROW(kv::decode(c, q, out, lse, {}, kv::column_sums{sums.as_view(), 2}), mnemo::error);
  EXPECT_THROW(kv::decode(c, q, out, lse, {}, kv::column_sums{sums.as_view(), -1}), mnemo::error);
  try {
    kv::decode(c, q, out, lse, {}, kv::column_sums{short_sums.as_view(), 0});
    ADD_FAILURE() << "no mnemo::error";
  } catch (const mnemo::error& e) {
    EXPECT_NE(std::string(e.what()).find("column_sums.sums must have shape [Hq = 8, >= max_length() = 50], got [8, 49]"),
              std::string::npos)
        << e.what();
  }
  try {
    kv::decode(c, q, out, lse, {}, kv::column_sums{sums.as_view(), 2});
    ADD_FAILURE() << "no mnemo::error";
  } catch (const mnemo::error& e) {
    EXPECT_NE(std::string(e.what()).find("column_sums.rows must be in [0, Lq = 1]"), std::string::npos) << e.what();
  }
  try {
    kv::decode(c, random_tensor(8, 1, 31, 1), out, lse);
  } catch (const mnemo::error& e) {
    EXPECT_NE(std::string(e.what()).find("D = 32, got 31"), std::string::npos) << e.what();
  }
}

}  // namespace
