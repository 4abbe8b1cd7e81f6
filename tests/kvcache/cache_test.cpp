// Tests for mnemo/kvcache/cache.hpp: append / gather in every storage kind (f32 exact, f16 / bf16
// equal to the rounded input, int8 / int4 within half a quantization step of the group that holds
// the token, the residual window exact), the KIVI flush schedule, ragged compaction that keeps
// K, V and positions together and loses no kept token in any storage kind (bit-identical reads
// before and after), appends after compaction, bytes (int4 <= 0.3 x f16, int8 <= 0.55 x f16),
// the multi-layer wrapper, and every argument check (the cache is unchanged after a throw).
#include "mnemo/kvcache/cache.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace {

namespace kv = mnemo::kvcache;
using mnemo::tensor;

tensor<float, 3> random_tensor(std::int64_t H, std::int64_t n, std::int64_t D, std::uint32_t seed) {
  tensor<float, 3> t({H, n, D});
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (float& x : t) x = normal(rng);
  return t;
}

kv::cache_config config(kv::storage kind, std::int64_t Hkv, std::int64_t capacity, std::int64_t D, std::int64_t Dv) {
  kv::cache_config cfg;
  cfg.kind = kind;
  cfg.Hkv = Hkv;
  cfg.capacity = capacity;
  cfg.D = D;
  cfg.Dv = Dv;
  cfg.quant = {8, 16, 16};  // small groups so that small tests cross several of them
  return cfg;
}

// Every slot of head h, dequantized.
struct head_rows {
  tensor<float, 2> k, v;
};
head_rows read_head(const kv::layer_cache& c, std::int64_t h) {
  const std::int64_t n = c.length(h);
  std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
  std::iota(slots.begin(), slots.end(), std::int64_t{0});
  head_rows r{tensor<float, 2>({n, c.head_dim()}), tensor<float, 2>({n, c.value_dim()})};
  if (n > 0) c.gather(h, slots, r.k, r.v);
  return r;
}

// Half a step of the key group holding quantized slot j of head h, per channel e.
float key_step(const kv::layer_cache& c, std::int64_t h, std::int64_t j, std::int64_t e) {
  std::int64_t start = 0, g = 0;
  for (std::int64_t len : c.key_group_lengths(h)) {
    if (j < start + len) break;
    start += len;
    ++g;
  }
  return c.key_scales(h)[static_cast<std::size_t>(g * c.head_dim() + e)];
}

// Reads of (k, v) from the cache against the appended f32 values in every kind's own precision.
void expect_matches_input(const kv::layer_cache& c, const tensor<float, 3>& k, const tensor<float, 3>& v) {
  for (std::int64_t h = 0; h < c.num_heads(); ++h) {
    const head_rows r = read_head(c, h);
    for (std::int64_t j = 0; j < c.length(h); ++j) {
      const bool quantized = kv::is_quantized(c.kind()) && j < c.quantized_length(h);
      for (std::int64_t e = 0; e < c.head_dim(); ++e) {
        const float x = k(h, j, e), y = r.k(j, e);
        switch (c.kind()) {
          case kv::storage::f32: ASSERT_EQ(y, x); break;
          case kv::storage::f16: ASSERT_EQ(y, static_cast<float>(mnemo::f16(x))); break;
          case kv::storage::bf16: ASSERT_EQ(y, static_cast<float>(mnemo::bf16(x))); break;
          default:
            if (quantized) ASSERT_LE(std::fabs(x - y), 0.5f * key_step(c, h, j, e) * 1.0001f + 1e-6f) << h << " " << j << " " << e;
            else ASSERT_EQ(y, x);
        }
      }
      for (std::int64_t e = 0; e < c.value_dim(); ++e) {
        const float x = v(h, j, e), y = r.v(j, e);
        switch (c.kind()) {
          case kv::storage::f32: ASSERT_EQ(y, x); break;
          case kv::storage::f16: ASSERT_EQ(y, static_cast<float>(mnemo::f16(x))); break;
          case kv::storage::bf16: ASSERT_EQ(y, static_cast<float>(mnemo::bf16(x))); break;
          default:
            if (quantized) {
              const std::int64_t g = e / c.config().quant.value_group;
              ASSERT_LE(std::fabs(x - y), 0.5f * c.value_scales()(h, g, j) * 1.0001f + 1e-6f);
            } else {
              ASSERT_EQ(y, x);
            }
        }
      }
    }
  }
}

TEST(Cache, AppendAndGatherEveryStorage) {
  for (kv::storage kind : kv::all_storages) {
    SCOPED_TRACE(kv::storage_name(kind));
    kv::layer_cache c(config(kind, 3, 100, 40, 24));
    const tensor<float, 3> k = random_tensor(3, 61, 40, 1), v = random_tensor(3, 61, 24, 2);
    c.append(k.as_view().narrow(1, 0, 30), v.as_view().narrow(1, 0, 30));
    c.append(k.as_view().narrow(1, 30, 31), v.as_view().narrow(1, 30, 31));
    for (std::int64_t h = 0; h < 3; ++h) {
      EXPECT_EQ(c.length(h), 61);
      for (std::int64_t j = 0; j < 61; ++j) EXPECT_EQ(c.positions(h)[static_cast<std::size_t>(j)], j);
    }
    EXPECT_EQ(c.next_position(), 61);
    expect_matches_input(c, k, v);
    const tensor<float, 3> all = c.keys();
    const head_rows r = read_head(c, 1);
    EXPECT_EQ(all(1, 60, 7), r.k(60, 7));
  }
}

TEST(Cache, FlushScheduleKeepsTheResidualWindow) {
  // residual 16, key_group 8: once a head holds 16 residual tokens, its oldest 8 are quantized.
  kv::layer_cache c(config(kv::storage::int4, 1, 200, 16, 16));
  std::int64_t expected_q = 0, expected_r = 0;
  for (std::int64_t t = 0; t < 70; ++t) {
    const tensor<float, 3> k = random_tensor(1, 1, 16, 100 + static_cast<std::uint32_t>(t));
    c.append(k, k);
    if (++expected_r == 16) expected_q += 8, expected_r -= 8;
    ASSERT_EQ(c.quantized_length(0), expected_q);
    ASSERT_EQ(c.residual_length(0), expected_r);
  }
  for (std::int64_t len : c.key_group_lengths(0)) EXPECT_EQ(len, 8);
}

TEST(Cache, CompactionLosesNoKeptTokenInAnyStorage) {
  std::mt19937 rng(7);
  for (kv::storage kind : kv::all_storages) {
    SCOPED_TRACE(kv::storage_name(kind));
    kv::layer_cache c(config(kind, 4, 120, 40, 33));
    const tensor<float, 3> k = random_tensor(4, 90, 40, 3), v = random_tensor(4, 90, 33, 4);
    std::vector<std::int64_t> pos(90);
    for (std::int64_t j = 0; j < 90; ++j) pos[static_cast<std::size_t>(j)] = 1000 + 3 * j;
    c.append(k, v, pos);
    std::vector<head_rows> before;
    for (std::int64_t h = 0; h < 4; ++h) before.push_back(read_head(c, h));
    const std::int64_t bytes_before = c.bytes();
    // Ragged: head 0 keeps everything, head 1 nothing, heads 2 and 3 random subsets.
    kv::selection sel;
    sel.heads.resize(4);
    for (std::int64_t j = 0; j < 90; ++j) sel.heads[0].push_back(j);
    for (std::int64_t h = 2; h < 4; ++h)
      for (std::int64_t j = 0; j < 90; ++j)
        if (std::uniform_int_distribution<int>(0, 2)(rng) == 0) sel.heads[static_cast<std::size_t>(h)].push_back(j);
    c.compact(sel);
    EXPECT_LT(c.bytes(), bytes_before);
    for (std::int64_t h = 0; h < 4; ++h) {
      const auto& kept = sel.heads[static_cast<std::size_t>(h)];
      ASSERT_EQ(c.length(h), static_cast<std::int64_t>(kept.size()));
      const head_rows after = read_head(c, h);
      for (std::size_t i = 0; i < kept.size(); ++i) {
        const std::int64_t j = kept[i];
        EXPECT_EQ(c.positions(h)[i], 1000 + 3 * j);
        EXPECT_EQ(c.rotary_positions(h)[i], 1000 + 3 * j);
        for (std::int64_t e = 0; e < 40; ++e) ASSERT_EQ(after.k(static_cast<std::int64_t>(i), e), before[static_cast<std::size_t>(h)].k(j, e));
        for (std::int64_t e = 0; e < 33; ++e) ASSERT_EQ(after.v(static_cast<std::int64_t>(i), e), before[static_cast<std::size_t>(h)].v(j, e));
      }
    }
    // Appending after compaction: the new tokens land after each head's kept ones.
    const tensor<float, 3> k2 = random_tensor(4, 25, 40, 5), v2 = random_tensor(4, 25, 33, 6);
    c.append(k2, v2);
    EXPECT_EQ(c.next_position(), 1000 + 3 * 89 + 1 + 25);
    for (std::int64_t h = 0; h < 4; ++h) {
      const std::int64_t kept = static_cast<std::int64_t>(sel.heads[static_cast<std::size_t>(h)].size());
      ASSERT_EQ(c.length(h), kept + 25);
      const head_rows r = read_head(c, h);
      for (std::int64_t t = 0; t < 25; ++t) {
        EXPECT_EQ(c.positions(h)[static_cast<std::size_t>(kept + t)], 1000 + 3 * 89 + 1 + t);
        const bool quantized = kv::is_quantized(kind) && kept + t < c.quantized_length(h);
        const float tol = quantized ? 0.5f * key_step(c, h, kept + t, 0) * 1.0001f + 1e-6f
                          : kind == kv::storage::f32 ? 0.0f
                                                     : 1e-2f * (1 + std::fabs(k2(h, t, 0)));
        EXPECT_LE(std::fabs(r.k(kept + t, 0) - k2(h, t, 0)), tol);
      }
    }
  }
}

TEST(Cache, CompactionKeepsRowsTogetherInTheResidualAndAcrossGroups) {
  // Tokens whose key and value encode their own index: after compaction slot i must hold token
  // kept[i] in K, V and position alike.
  for (kv::storage kind : kv::all_storages) {
    SCOPED_TRACE(kv::storage_name(kind));
    kv::layer_cache c(config(kind, 2, 64, 16, 16));
    tensor<float, 3> k({2, 50, 16}), v({2, 50, 16});
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t j = 0; j < 50; ++j)
        for (std::int64_t e = 0; e < 16; ++e) k(h, j, e) = v(h, j, e) = static_cast<float>(j) + 0.25f * static_cast<float>(e % 2);
    c.append(k, v);
    kv::selection sel;
    sel.heads = {{0, 7, 8, 9, 31, 40, 41, 49}, {3, 17, 45}};
    c.compact(sel);
    for (std::int64_t h = 0; h < 2; ++h) {
      const head_rows r = read_head(c, h);
      const auto& kept = sel.heads[static_cast<std::size_t>(h)];
      for (std::size_t i = 0; i < kept.size(); ++i) {
        EXPECT_EQ(c.positions(h)[i], kept[i]);
        EXPECT_NEAR(r.k(static_cast<std::int64_t>(i), 0), static_cast<float>(kept[i]), 0.5f);  // another token is >= 1 away
        EXPECT_NEAR(r.v(static_cast<std::int64_t>(i), 0), static_cast<float>(kept[i]), 0.05f);
      }
    }
  }
}

TEST(Cache, QuantizedBytesAgainstF16) {
  // The default groups at D = Dv = 128 and 2048 tokens (residual window included).
  std::int64_t bytes[5] = {};
  for (kv::storage kind : kv::all_storages) {
    kv::cache_config cfg;
    cfg.kind = kind;
    cfg.Hkv = 2;
    cfg.capacity = 2048;
    cfg.D = 128;
    kv::layer_cache c(cfg);
    const tensor<float, 3> k = random_tensor(2, 2048, 128, 9);
    c.append(k, k);
    bytes[static_cast<int>(kind)] = c.bytes();
  }
  const double f16 = static_cast<double>(bytes[static_cast<int>(kv::storage::f16)]);
  EXPECT_EQ(bytes[static_cast<int>(kv::storage::f32)], 2 * 2048 * 256 * 4);
  EXPECT_EQ(bytes[static_cast<int>(kv::storage::f16)], 2 * 2048 * 256 * 2);
  EXPECT_LE(bytes[static_cast<int>(kv::storage::int8)] / f16, 0.55);
  EXPECT_LE(bytes[static_cast<int>(kv::storage::int4)] / f16, 0.30);
}

TEST(Cache, MultiLayerWrapper) {
  kv::cache model(3, config(kv::storage::f16, 2, 10, 8, 8));
  EXPECT_EQ(model.num_layers(), 3);
  const tensor<float, 3> k = random_tensor(2, 4, 8, 1);
  model[1].append(k, k);
  EXPECT_EQ(model.bytes(), model.layer(1).bytes());
  EXPECT_EQ(model.layer(0).length(0), 0);
  EXPECT_THROW(model.layer(3), mnemo::error);
  EXPECT_THROW(kv::cache(0, config(kv::storage::f16, 2, 10, 8, 8)), mnemo::error);
}

TEST(Cache, BadConfigThrows) {
  EXPECT_THROW(kv::layer_cache(config(kv::storage::f32, 0, 10, 8, 8)), mnemo::error);
  EXPECT_THROW(kv::layer_cache(config(kv::storage::f32, 2, 0, 8, 8)), mnemo::error);
  EXPECT_THROW(kv::layer_cache(config(kv::storage::f32, 2, 10, 0, 8)), mnemo::error);
  kv::cache_config cfg = config(kv::storage::int8, 2, 10, 64, 64);
  cfg.quant = {16, 16, 8};  // residual < key_group
  EXPECT_THROW((kv::layer_cache(cfg)), mnemo::error);
  cfg.quant = {8, 24, 16};  // value_group neither a multiple of 16 nor >= Dv
  EXPECT_THROW((kv::layer_cache(cfg)), mnemo::error);
  cfg.quant = {0, 16, 16};
  EXPECT_THROW((kv::layer_cache(cfg)), mnemo::error);
  try {
    cfg.quant = {16, 16, 8};
    kv::layer_cache bad(cfg);
    FAIL();
  } catch (const mnemo::error& e) {
    EXPECT_NE(std::string(e.what()).find("residual"), std::string::npos) << e.what();
  }
}

TEST(Cache, BadAppendThrowsAndChangesNothing) {
  for (kv::storage kind : {kv::storage::f32, kv::storage::int8}) {
    kv::layer_cache c(config(kind, 2, 10, 8, 8));
    const tensor<float, 3> k = random_tensor(2, 6, 8, 1);
    c.append(k, k);
    EXPECT_THROW(c.append(random_tensor(3, 1, 8, 2), random_tensor(3, 1, 8, 2)), mnemo::error);  // Hkv
    EXPECT_THROW(c.append(random_tensor(2, 1, 7, 2), random_tensor(2, 1, 8, 2)), mnemo::error);  // D
    EXPECT_THROW(c.append(random_tensor(2, 1, 8, 2), random_tensor(2, 2, 8, 2)), mnemo::error);  // n of v
    EXPECT_THROW(c.append(k, k), mnemo::error);                                                  // capacity
    const std::vector<std::int64_t> two = {1, 2};
    EXPECT_THROW(c.append(random_tensor(2, 1, 8, 2), random_tensor(2, 1, 8, 2), two), mnemo::error);
    EXPECT_THROW(c.append(mnemo::view<const float, 3>{}, k), mnemo::error);
    EXPECT_EQ(c.length(0), 6);
    EXPECT_EQ(c.length(1), 6);
  }
  kv::layer_cache q(config(kv::storage::int4, 1, 10, 4, 4));
  tensor<float, 3> bad({1, 1, 4});
  bad(0, 0, 2) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(q.append(bad, bad), mnemo::error);
  EXPECT_EQ(q.length(0), 0);
  try {
    kv::layer_cache c(config(kv::storage::f32, 2, 4, 8, 8));
    c.append(random_tensor(2, 5, 8, 1), random_tensor(2, 5, 8, 1));
    FAIL();
  } catch (const mnemo::error& e) {
    EXPECT_NE(std::string(e.what()).find("capacity 4"), std::string::npos) << e.what();
  }
}

TEST(Cache, BadSelectionAndGatherThrowAndChangeNothing) {
  kv::layer_cache c(config(kv::storage::int8, 2, 40, 8, 8));
  const tensor<float, 3> k = random_tensor(2, 30, 8, 1);
  c.append(k, k);
  const std::int64_t bytes = c.bytes();
  kv::selection sel;
  sel.heads = {{0, 1}};  // one head short
  EXPECT_THROW(c.compact(sel), mnemo::error);
  sel.heads = {{0, 1}, {3, 2}};  // not ascending
  EXPECT_THROW(c.compact(sel), mnemo::error);
  sel.heads = {{0, 1}, {2, 30}};  // out of range
  EXPECT_THROW(c.compact(sel), mnemo::error);
  EXPECT_EQ(c.bytes(), bytes);
  EXPECT_EQ(c.length(1), 30);
  tensor<float, 2> rk({1, 8}), rv({1, 8});
  const std::vector<std::int64_t> out_of_range = {30};
  EXPECT_THROW(c.gather(0, out_of_range, rk, rv), mnemo::error);
  const std::vector<std::int64_t> ok = {29};
  EXPECT_THROW(c.gather(2, ok, rk, rv), mnemo::error);
  tensor<float, 2> wrong({2, 8});
  EXPECT_THROW(c.gather(0, ok, wrong, rv), mnemo::error);
  EXPECT_THROW(c.dense_keys<float>(), mnemo::error);
  EXPECT_THROW(c.length(-1), mnemo::error);
}

}  // namespace
