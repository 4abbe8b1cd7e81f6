// Tests for mnemo/kvcache/rope.hpp: apply_rope against the double reference in both layouts and
// with partial rotary dims; the interleaved layout against complex multiplication by e^{i p theta};
// the half-split layout as the interleaved one on permuted channels; the relative-position property
// q(p1) . k(p2) = f(p1 - p2); re-rotation of a compacted cache to its slot indices, equal to rotating
// the raw keys there directly (exactly up to f32 for dense kinds, within the requantization step for
// int8), with original positions untouched; and the argument checks.
#include "mnemo/kvcache/rope.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <complex>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace {

namespace kv = mnemo::kvcache;
using mnemo::tensor;

tensor<float, 3> random_tensor(std::int64_t a, std::int64_t b, std::int64_t c, std::uint32_t seed) {
  tensor<float, 3> t({a, b, c});
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (float& x : t) x = normal(rng);
  return t;
}

std::vector<std::int64_t> iota_positions(std::int64_t n, std::int64_t first, std::int64_t step = 1) {
  std::vector<std::int64_t> p(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) p[static_cast<std::size_t>(i)] = first + i * step;
  return p;
}

TEST(Rope, MatchesReferenceInBothLayouts) {
  for (kv::rope_layout layout : {kv::rope_layout::interleaved, kv::rope_layout::half_split})
    for (std::int64_t dim : {0, 32}) {
      const kv::rope r{dim, 10000.0, layout};
      tensor<float, 3> x = random_tensor(3, 17, 40, 1), y = x;
      const auto pos = iota_positions(17, 100000, 37);  // large positions: the angle must stay accurate
      kv::apply_rope(r, x, pos);
      kv::reference::apply_rope(r, y, pos);
      for (std::int64_t i = 0; i < x.size(); ++i) ASSERT_NEAR(x.data()[i], y.data()[i], 2e-6 * (1 + std::fabs(y.data()[i])));
    }
}

TEST(Rope, InterleavedIsComplexMultiplication) {
  const std::int64_t D = 16;
  const kv::rope r{0, 500.0, kv::rope_layout::interleaved};
  tensor<float, 3> x = random_tensor(1, 4, D, 2);
  const tensor<float, 3> x0 = x;
  const auto pos = iota_positions(4, 3, 1000);
  kv::apply_rope(r, x, pos);
  for (std::int64_t t = 0; t < 4; ++t)
    for (std::int64_t i = 0; i < D / 2; ++i) {
      const double theta = std::pow(500.0, -2.0 * static_cast<double>(i) / D);
      const std::complex<double> z(x0(0, t, 2 * i), x0(0, t, 2 * i + 1));
      const std::complex<double> w = z * std::polar(1.0, static_cast<double>(pos[static_cast<std::size_t>(t)]) * theta);
      EXPECT_NEAR(x(0, t, 2 * i), w.real(), 1e-5);
      EXPECT_NEAR(x(0, t, 2 * i + 1), w.imag(), 1e-5);
    }
}

TEST(Rope, HalfSplitIsInterleavedOnPermutedChannels) {
  const std::int64_t D = 24;
  tensor<float, 3> x = random_tensor(2, 5, D, 3), y({2, 5, D});
  for (std::int64_t h = 0; h < 2; ++h)  // y's pair (2i, 2i + 1) is x's pair (i, i + D / 2)
    for (std::int64_t t = 0; t < 5; ++t)
      for (std::int64_t i = 0; i < D / 2; ++i) y(h, t, 2 * i) = x(h, t, i), y(h, t, 2 * i + 1) = x(h, t, i + D / 2);
  const auto pos = iota_positions(5, 7, 11);
  kv::apply_rope({0, 10000.0, kv::rope_layout::half_split}, x, pos);
  kv::apply_rope({0, 10000.0, kv::rope_layout::interleaved}, y, pos);
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t t = 0; t < 5; ++t)
      for (std::int64_t i = 0; i < D / 2; ++i) {
        EXPECT_FLOAT_EQ(y(h, t, 2 * i), x(h, t, i));
        EXPECT_FLOAT_EQ(y(h, t, 2 * i + 1), x(h, t, i + D / 2));
      }
}

TEST(Rope, ScoresDependOnRelativePositionOnly) {
  const std::int64_t D = 32;
  const tensor<float, 3> q0 = random_tensor(1, 1, D, 4), k0 = random_tensor(1, 1, D, 5);
  auto score = [&](std::int64_t pq, std::int64_t pk) {
    tensor<float, 3> q = q0, k = k0;
    const std::vector<std::int64_t> a = {pq}, b = {pk};
    kv::apply_rope({}, q, a);
    kv::apply_rope({}, k, b);
    double s = 0;
    for (std::int64_t e = 0; e < D; ++e) s += static_cast<double>(q(0, 0, e)) * k(0, 0, e);
    return s;
  };
  EXPECT_NEAR(score(10, 3), score(1010, 1003), 1e-4);
  EXPECT_NEAR(score(57, 57), score(0, 0), 1e-4);
}

TEST(Rope, RerotateMovesKeptKeysToTheirSlots) {
  const kv::rope r{0, 10000.0, kv::rope_layout::half_split};
  for (kv::storage kind : {kv::storage::f32, kv::storage::bf16, kv::storage::int8}) {
    SCOPED_TRACE(kv::storage_name(kind));
    kv::cache_config cfg;
    cfg.kind = kind;
    cfg.Hkv = 2;
    cfg.capacity = 64;
    cfg.D = 32;
    cfg.quant = {8, 16, 16};
    kv::layer_cache c(cfg);
    const tensor<float, 3> raw = random_tensor(2, 40, 32, 6), v = random_tensor(2, 40, 32, 7);
    tensor<float, 3> k = raw;
    const auto pos = iota_positions(40, 0);
    kv::apply_rope(r, k, pos);
    c.append(k, v);
    kv::selection sel;
    sel.heads = {{0, 1, 2, 30, 38, 39}, {5, 9, 10, 11, 12, 13, 14, 15, 16, 17, 39}};
    c.compact(sel);
    kv::rerotate(c, r);
    for (std::int64_t h = 0; h < 2; ++h) {
      const auto& kept = sel.heads[static_cast<std::size_t>(h)];
      const std::int64_t n = static_cast<std::int64_t>(kept.size());
      tensor<float, 3> want({1, n, 32});
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t e = 0; e < 32; ++e) want(0, i, e) = raw(h, kept[static_cast<std::size_t>(i)], e);
      kv::apply_rope(r, want, iota_positions(n, 0));
      std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
      std::iota(slots.begin(), slots.end(), std::int64_t{0});
      tensor<float, 2> got({n, 32}), got_v({n, 32});
      c.gather(h, slots, got, got_v);
      const float tol = kind == kv::storage::f32 ? 1e-5f : kind == kv::storage::bf16 ? 0.05f : 0.1f;
      for (std::int64_t i = 0; i < n; ++i) {
        EXPECT_EQ(c.positions(h)[static_cast<std::size_t>(i)], kept[static_cast<std::size_t>(i)]);
        EXPECT_EQ(c.rotary_positions(h)[static_cast<std::size_t>(i)], i);
        for (std::int64_t e = 0; e < 32; ++e) ASSERT_NEAR(got(i, e), want(0, i, e), tol) << h << " " << i << " " << e;
      }
    }
  }
}

TEST(Rope, BadArgumentsThrow) {
  tensor<float, 3> x = random_tensor(1, 2, 8, 1);
  const auto pos = iota_positions(2, 0);
  EXPECT_THROW(kv::apply_rope({3, 10000.0, kv::rope_layout::half_split}, x, pos), mnemo::error);   // odd dim
  EXPECT_THROW(kv::apply_rope({10, 10000.0, kv::rope_layout::half_split}, x, pos), mnemo::error);  // dim > D
  EXPECT_THROW(kv::apply_rope({0, -1.0, kv::rope_layout::half_split}, x, pos), mnemo::error);      // base
  EXPECT_THROW(kv::apply_rope({}, x, iota_positions(3, 0)), mnemo::error);                        // positions
  kv::layer_cache c(kv::cache_config{kv::storage::f32, 1, 4, 6, 6, {}});
  EXPECT_THROW(kv::rerotate(c, {8, 10000.0, kv::rope_layout::half_split}), mnemo::error);
  c.append(random_tensor(1, 2, 6, 2), random_tensor(1, 2, 6, 3));
  EXPECT_THROW(c.set_keys(0, tensor<float, 2>({3, 6}), iota_positions(3, 0)), mnemo::error);
  EXPECT_THROW(c.set_keys(0, tensor<float, 2>({2, 6}), iota_positions(1, 0)), mnemo::error);
}

}  // namespace
