// Tests for mnemo/kvcache/rope.hpp: apply_rope against the double reference in both layouts and
// with partial rotary dims; the interleaved layout against complex multiplication by e^{i p theta};
// the half-split layout as the interleaved one on permuted channels; the relative-position property
// q(p1) . k(p2) = f(p1 - p2); re-rotation of a compacted cache to its slot indices, equal to rotating
// the raw keys there directly (exactly up to f32 for dense kinds, within the requantization step for
// int8), with original positions untouched; and the argument checks.
// The frequency schemes (linear, dynamic NTK, YaRN, Llama-3, LongRoPE, with their attention
// factors): frequencies and rotated rows against an independent double computation written from
// ../shared/golden/README.md `rope_scaled` (Hugging Face's rope init functions) in both layouts and
// with partial rotary dims; af on the rotated channels only; the relative-position property with
// af^2; re-rotation under every scheme (af not applied twice) and across frequencies (dynamic
// seq_len growing, LongRoPE crossing O); thread-count independence; the scheme argument checks.
#include "mnemo/kvcache/rope.hpp"

#include "support/support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <complex>
#include <cstdint>
#include <numbers>
#include <numeric>
#include <string>
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

// ---------------------------------------------------------------------------------------------
// Frequency schemes.

// Expected inverse frequencies, written from the README formulas in Hugging Face's own form
// (1 / base^(2i / rd); yarn's extrapolation factor; llama3's where-chain), independently of
// rope.hpp.
std::vector<double> expected_inv_freq(const kv::rope& r, std::int64_t rd, std::int64_t seq_len) {
  const std::int64_t half = rd / 2;
  const double O = static_cast<double>(r.original_context);
  double base = r.base;
  if (r.scaling == kv::rope_scaling::dynamic) {
    const double S = std::max(static_cast<double>(seq_len), O);
    base = r.base * std::pow((r.factor * S / O) - (r.factor - 1), static_cast<double>(rd) / (rd - 2));
  }
  std::vector<double> d(static_cast<std::size_t>(half));
  for (std::int64_t i = 0; i < half; ++i) d[static_cast<std::size_t>(i)] = 1.0 / std::pow(base, static_cast<double>(2 * i) / rd);
  std::vector<double> f = d;
  for (std::int64_t i = 0; i < half; ++i) {
    const double di = d[static_cast<std::size_t>(i)];
    double& fi = f[static_cast<std::size_t>(i)];
    switch (r.scaling) {
      case kv::rope_scaling::none:
      case kv::rope_scaling::dynamic: break;
      case kv::rope_scaling::linear: fi = di / r.factor; break;
      case kv::rope_scaling::yarn: {
        auto corr_dim = [&](double rot) { return (rd * std::log(O / (rot * 2 * std::numbers::pi))) / (2 * std::log(r.base)); };
        double lo = corr_dim(r.beta_fast), hi = corr_dim(r.beta_slow);
        if (r.truncate) lo = std::floor(lo), hi = std::ceil(hi);
        lo = std::max(lo, 0.0), hi = std::min(hi, static_cast<double>(rd - 1));
        if (lo == hi) hi += 0.001;
        const double linear = std::min(1.0, std::max(0.0, (static_cast<double>(i) - lo) / (hi - lo)));
        const double extrapolation = 1 - linear;
        fi = (di / r.factor) * (1 - extrapolation) + di * extrapolation;
        break;
      }
      case kv::rope_scaling::llama3: {
        const double wl = 2 * std::numbers::pi / di, low_wl = O / r.low_freq_factor, high_wl = O / r.high_freq_factor;
        const double scaled = wl > low_wl ? di / r.factor : di;
        const double smooth = (O / wl - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        const bool medium = !(wl < high_wl) && !(wl > low_wl);
        fi = medium ? (1 - smooth) * scaled / r.factor + smooth * scaled : scaled;
        break;
      }
      case kv::rope_scaling::longrope: {
        const auto& e = static_cast<double>(seq_len) > O ? r.long_factor : r.short_factor;
        fi = 1.0 / (e[static_cast<std::size_t>(i)] * std::pow(r.base, static_cast<double>(2 * i) / rd));
        break;
      }
    }
  }
  return f;
}

double expected_attention_factor(const kv::rope& r) {
  if (r.attention_factor > 0) return r.attention_factor;
  if (r.scaling == kv::rope_scaling::yarn) return r.factor > 1 ? 0.1 * std::log(r.factor) + 1 : 1.0;
  if (r.scaling == kv::rope_scaling::longrope)
    return r.factor > 1 ? std::sqrt(1 + std::log(r.factor) / std::log(static_cast<double>(r.original_context))) : 1.0;
  return 1.0;
}

// x [H, L, D] rotated as the README states (complex multiplication of each pair, times af on the
// rotated channels only), in double.
tensor<float, 3> expected_rows(const kv::rope& r, const tensor<float, 3>& x, const std::vector<std::int64_t>& pos,
                               std::int64_t seq_len) {
  const std::int64_t D = x.extent(2), rd = r.dim == 0 ? D : r.dim;
  const auto f = expected_inv_freq(r, rd, seq_len);
  const double af = expected_attention_factor(r);
  tensor<float, 3> y = x;
  for (std::int64_t h = 0; h < x.extent(0); ++h)
    for (std::int64_t t = 0; t < x.extent(1); ++t)
      for (std::int64_t i = 0; i < rd / 2; ++i) {
        const std::int64_t a = r.layout == kv::rope_layout::interleaved ? 2 * i : i;
        const std::int64_t b = r.layout == kv::rope_layout::interleaved ? 2 * i + 1 : i + rd / 2;
        const std::complex<double> z(x(h, t, a), x(h, t, b));
        const std::complex<double> w =
            af * z * std::polar(1.0, static_cast<double>(pos[static_cast<std::size_t>(t)]) * f[static_cast<std::size_t>(i)]);
        y(h, t, a) = static_cast<float>(w.real());
        y(h, t, b) = static_cast<float>(w.imag());
      }
  return y;
}

std::vector<double> ramp_factors(std::int64_t n, double first, double last) {
  std::vector<double> e(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) e[static_cast<std::size_t>(i)] = first + (last - first) * static_cast<double>(i) / std::max<std::int64_t>(n - 1, 1);
  return e;
}

// One rope per scheme (rotary dim rd, D = 40), with the parameters the models ship.
struct named_rope {
  std::string name;
  kv::rope r;
};

std::vector<named_rope> schemes(std::int64_t rd, kv::rope_layout layout) {
  std::vector<named_rope> out;
  const auto add = [&](std::string name, kv::rope r) {
    r.dim = rd;
    r.layout = layout;
    out.push_back({std::move(name), std::move(r)});
  };
  add("none", {});
  add("linear", {.scaling = kv::rope_scaling::linear, .factor = 4.0});
  add("dynamic", {.scaling = kv::rope_scaling::dynamic, .factor = 2.0, .original_context = 256, .seq_len = 900});
  add("yarn", {.scaling = kv::rope_scaling::yarn, .factor = 8.0, .original_context = 128});
  add("yarn_no_truncate", {.scaling = kv::rope_scaling::yarn, .factor = 4.0, .original_context = 512, .truncate = false});
  add("yarn_given_af", {.scaling = kv::rope_scaling::yarn, .factor = 16.0, .original_context = 4096, .attention_factor = 0.7});
  add("llama3", {.base = 500000.0, .scaling = kv::rope_scaling::llama3, .factor = 8.0, .original_context = 8192});
  add("llama3_small_O", {.scaling = kv::rope_scaling::llama3, .factor = 4.0, .original_context = 64,
                         .low_freq_factor = 1.0, .high_freq_factor = 8.0});
  const std::int64_t half = rd == 0 ? 20 : rd / 2;
  add("longrope_short", {.scaling = kv::rope_scaling::longrope, .factor = 32.0, .original_context = 4096, .seq_len = 4096,
                         .short_factor = ramp_factors(half, 1.0, 1.5), .long_factor = ramp_factors(half, 1.0, 40.0)});
  add("longrope_long", {.scaling = kv::rope_scaling::longrope, .factor = 32.0, .original_context = 4096, .seq_len = 4097,
                        .short_factor = ramp_factors(half, 1.0, 1.5), .long_factor = ramp_factors(half, 1.0, 40.0)});
  return out;
}

// Consecutive runs longer than the exact-angle period, gaps, a repeated and a negative position.
std::vector<std::int64_t> mixed_positions() {
  std::vector<std::int64_t> p = {0, 1, 2, 3, 7, 7, -5};
  for (std::int64_t t = 0; t < 40; ++t) p.push_back(600 + t);
  for (std::int64_t t = 0; t < 20; ++t) p.push_back(5000 + 37 * t);
  for (std::int64_t t = 0; t < 70; ++t) p.push_back(99000 + t);
  return p;
}

TEST(RopeSchemes, FrequenciesMatchTheFormulas) {
  for (std::int64_t rd : {2, 16, 40})
    for (const auto& [name, r] : schemes(rd, kv::rope_layout::half_split)) {
      if (r.scaling == kv::rope_scaling::longrope && rd != 40) continue;  // factor lists of 20
      SCOPED_TRACE(name + " rd " + std::to_string(rd));
      const auto f = kv::frequencies(r, 40);
      const auto want = expected_inv_freq(r, rd, r.seq_len);
      ASSERT_EQ(f.dim, rd);
      ASSERT_EQ(f.inv_freq.size(), want.size());
      for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(f.inv_freq[i], want[i], 1e-12 * want[i]) << i;
      EXPECT_NEAR(f.attention_factor, expected_attention_factor(r), 1e-15);
    }
  // The golden yarn case's attention factor (README: 1.2079 for factor 8).
  EXPECT_NEAR(kv::frequencies({.dim = 32, .scaling = kv::rope_scaling::yarn, .factor = 8.0, .original_context = 128}, 64)
                  .attention_factor,
              1.20794, 1e-5);
  // Factor <= 1: yarn and longrope have af = 1.
  EXPECT_EQ(kv::frequencies({.scaling = kv::rope_scaling::yarn, .factor = 1.0, .original_context = 128}, 8).attention_factor, 1.0);
}

TEST(RopeSchemes, EverySchemeMatchesTheFormulasInBothLayouts) {
  const auto pos = mixed_positions();
  const std::int64_t L = static_cast<std::int64_t>(pos.size()), D = 40;
  for (kv::rope_layout layout : {kv::rope_layout::interleaved, kv::rope_layout::half_split})
    for (std::int64_t rd : {0, 16})
      for (const auto& [name, r] : schemes(rd, layout)) {
        if (r.scaling == kv::rope_scaling::longrope && rd != 0) continue;
        SCOPED_TRACE(name + (layout == kv::rope_layout::interleaved ? " interleaved" : " half_split") + " rd " +
                     std::to_string(rd));
        const tensor<float, 3> x = random_tensor(3, L, D, 11);
        const tensor<float, 3> want = expected_rows(r, x, pos, r.seq_len);
        tensor<float, 3> fast = x, ref = x;
        kv::apply_rope(r, fast, pos);
        kv::reference::apply_rope(r, ref, pos);
        for (std::int64_t i = 0; i < x.size(); ++i) {
          ASSERT_NEAR(ref.data()[i], want.data()[i], 1e-6 * (1 + std::fabs(want.data()[i]))) << i;
          ASSERT_NEAR(fast.data()[i], want.data()[i], 3e-6 * (1 + std::fabs(want.data()[i]))) << i;
        }
        if (rd != 0) {  // channels past the rotary dim: copied, never scaled by af
          for (std::int64_t h = 0; h < 3; ++h)
            for (std::int64_t t = 0; t < L; ++t)
              for (std::int64_t e = rd; e < D; ++e) ASSERT_EQ(fast(h, t, e), x(h, t, e));
        }
      }
}

TEST(RopeSchemes, DynamicAndLongRopeTakeTheSequenceLengthFromThePositions) {
  // seq_len 0: max(positions) + 1 (Hugging Face's dynamic update); LongRoPE switches to its long
  // factors once that exceeds O.
  for (const auto& [name, r0] : schemes(0, kv::rope_layout::half_split)) {
    if (r0.scaling != kv::rope_scaling::dynamic && name != "longrope_short") continue;
    SCOPED_TRACE(name);
    for (std::int64_t last : {100, 4095, 4096, 6000}) {
      kv::rope r = r0;
      r.seq_len = 0;
      const auto pos = iota_positions(8, last - 7);
      const tensor<float, 3> x = random_tensor(1, 8, 40, 12);
      tensor<float, 3> got = x;
      kv::apply_rope(r, got, pos);
      const tensor<float, 3> want = expected_rows(r, x, pos, last + 1);
      for (std::int64_t i = 0; i < x.size(); ++i) ASSERT_NEAR(got.data()[i], want.data()[i], 3e-6 * (1 + std::fabs(want.data()[i])));
    }
  }
}

TEST(RopeSchemes, ScoresDependOnRelativePositionTimesAfSquared) {
  const std::int64_t D = 32;
  const tensor<float, 3> q0 = random_tensor(1, 1, D, 4), k0 = random_tensor(1, 1, D, 5);
  for (const auto& [name, r] : schemes(0, kv::rope_layout::interleaved)) {
    if (r.scaling == kv::rope_scaling::longrope) continue;  // factor lists of D / 2 = 16, not 20
    SCOPED_TRACE(name);
    auto score = [&](std::int64_t pq, std::int64_t pk) {
      tensor<float, 3> q = q0, k = k0;
      kv::apply_rope(r, q, std::vector<std::int64_t>{pq});
      kv::apply_rope(r, k, std::vector<std::int64_t>{pk});
      double s = 0;
      for (std::int64_t e = 0; e < D; ++e) s += static_cast<double>(q(0, 0, e)) * k(0, 0, e);
      return s;
    };
    double plain = 0;
    for (std::int64_t e = 0; e < D; ++e) plain += static_cast<double>(q0(0, 0, e)) * k0(0, 0, e);
    const double af = expected_attention_factor(r);
    EXPECT_NEAR(score(10, 3), score(1010, 1003), 2e-4 * af * af);
    EXPECT_NEAR(score(57, 57), af * af * plain, 2e-4 * af * af);  // distance 0: q.k times af^2
  }
}

TEST(RopeSchemes, ThreadCountDoesNotChangeTheResult) {
  const auto pos = iota_positions(300, 17);
  const kv::rope r{.dim = 16, .scaling = kv::rope_scaling::yarn, .factor = 8.0, .original_context = 128};
  tensor<float, 3> a = random_tensor(2, 300, 24, 9), b = a;
  kv::apply_rope(r, a, pos, 1);
  kv::apply_rope(r, b, pos, 4);
  for (std::int64_t i = 0; i < a.size(); ++i) ASSERT_EQ(a.data()[i], b.data()[i]);
}

// Keys rotated with `from` at positions 0..39, compacted, re-rotated to their slots under `to`:
// equal to rotating the raw kept keys there with `to` directly (af once).
void check_rerotate(const kv::rope& from, const kv::rope& to, bool same, kv::storage kind) {
  const std::int64_t D = 32;
  kv::cache_config cfg;
  cfg.kind = kind;
  cfg.Hkv = 2;
  cfg.capacity = 64;
  cfg.D = D;
  cfg.quant = {8, 16, 16};
  kv::layer_cache c(cfg);
  const tensor<float, 3> raw = random_tensor(2, 40, D, 6), v = random_tensor(2, 40, D, 7);
  tensor<float, 3> k = raw;
  const std::vector<std::int64_t> pos = iota_positions(40, 3000, 7);  // far from the slots: real moves
  kv::apply_rope(from, k, pos);
  c.append(k, v, pos);
  kv::selection sel;
  sel.heads = {{0, 1, 2, 30, 38, 39}, {5, 9, 10, 11, 12, 13, 14, 15, 16, 17, 39}};
  c.compact(sel);
  if (same) kv::rerotate(c, from);
  else kv::rerotate(c, from, to);
  for (std::int64_t h = 0; h < 2; ++h) {
    const auto& kept = sel.heads[static_cast<std::size_t>(h)];
    const std::int64_t n = static_cast<std::int64_t>(kept.size());
    tensor<float, 3> want({1, n, D});
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t e = 0; e < D; ++e) want(0, i, e) = raw(h, kept[static_cast<std::size_t>(i)], e);
    kv::reference::apply_rope(to, want, iota_positions(n, 0));
    std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
    std::iota(slots.begin(), slots.end(), std::int64_t{0});
    tensor<float, 2> got({n, D}), got_v({n, D});
    c.gather(h, slots, got, got_v);
    const float tol = kind == kv::storage::f32 ? 2e-5f : 0.15f;
    for (std::int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(c.rotary_positions(h)[static_cast<std::size_t>(i)], i);
      for (std::int64_t e = 0; e < D; ++e) ASSERT_NEAR(got(i, e), want(0, i, e), tol) << h << " " << i << " " << e;
    }
  }
}

TEST(RopeSchemes, RerotateUnderEveryScheme) {
  for (kv::rope_layout layout : {kv::rope_layout::interleaved, kv::rope_layout::half_split})
    for (const auto& [name, r0] : schemes(0, layout)) {
      if (r0.scaling == kv::rope_scaling::longrope) continue;  // lists of 20: D = 32 below
      for (std::int64_t rd : {0, 16}) {
        kv::rope r = r0;
        r.dim = rd;
        SCOPED_TRACE(name + " rd " + std::to_string(rd));
        for (kv::storage kind : {kv::storage::f32, kv::storage::int8}) check_rerotate(r, r, true, kind);
      }
    }
  const kv::rope lr{.scaling = kv::rope_scaling::longrope, .factor = 32.0, .original_context = 4096, .seq_len = 100,
                    .short_factor = ramp_factors(16, 1.0, 1.5), .long_factor = ramp_factors(16, 1.0, 40.0)};
  check_rerotate(lr, lr, true, kv::storage::f32);
}

TEST(RopeSchemes, RerotateAcrossFrequencies) {
  // Dynamic NTK whose sequence grew past O, and LongRoPE crossing O: the keys move to the new
  // frequencies (and LongRoPE's af stays once).
  kv::rope d1{.scaling = kv::rope_scaling::dynamic, .factor = 2.0, .original_context = 256, .seq_len = 300};
  kv::rope d2 = d1;
  d2.seq_len = 5000;
  check_rerotate(d1, d2, false, kv::storage::f32);
  kv::rope l1{.scaling = kv::rope_scaling::longrope, .factor = 32.0, .original_context = 4096, .seq_len = 4000,
              .short_factor = ramp_factors(16, 1.0, 1.5), .long_factor = ramp_factors(16, 1.0, 40.0)};
  kv::rope l2 = l1;
  l2.seq_len = 9000;
  check_rerotate(l1, l2, false, kv::storage::f32);
  kv::rope y1{.scaling = kv::rope_scaling::yarn, .factor = 4.0, .original_context = 128}, y2 = y1;
  y2.factor = 16.0;  // another af: the key's af changes by af2 / af1
  check_rerotate(y1, y2, false, kv::storage::f32);
}

TEST(RopeSchemes, BadSchemeParametersThrow) {
  using mnemo::test::expect_error;
  tensor<float, 3> x = random_tensor(1, 2, 8, 1);
  const auto pos = iota_positions(2, 0);
  const auto apply = [&](const kv::rope& r) { return [&, r] { kv::apply_rope(r, x, pos); }; };
  expect_error(apply({.dim = 3}), {"kvcache::apply_rope", "rope.dim", "D = 8", "got 3"});
  expect_error(apply({.scaling = kv::rope_scaling::linear, .factor = 0.0}), {"rope.factor", "linear", "got 0"});
  expect_error(apply({.scaling = kv::rope_scaling::yarn, .factor = -2.0, .original_context = 4}), {"rope.factor", "yarn", "got -2"});
  expect_error(apply({.scaling = kv::rope_scaling::dynamic, .factor = 2.0}), {"rope.original_context", "dynamic", "got 0"});
  expect_error(apply({.scaling = kv::rope_scaling::yarn, .factor = 2.0, .original_context = 64, .beta_fast = 0.5}),
               {"beta_fast", "yarn", "got beta_fast 0.5, beta_slow 1"});
  expect_error(apply({.scaling = kv::rope_scaling::llama3, .factor = 8.0, .original_context = 64, .low_freq_factor = 4.0,
                      .high_freq_factor = 4.0}),
               {"high_freq_factor", "llama3", "got low 4, high 4"});
  expect_error(apply({.scaling = kv::rope_scaling::longrope, .factor = 8.0, .original_context = 64,
                      .short_factor = {1, 1, 1}, .long_factor = {1, 1, 1, 1}}),
               {"short_factor", "rotary dim / 2 = 4", "got 3 and 4"});
  expect_error(apply({.scaling = kv::rope_scaling::longrope, .factor = 8.0, .original_context = 64,
                      .short_factor = {1, 1, 1, 1}, .long_factor = {1, 0, 1, 1}}),
               {"long_factor", "> 0", "got 0"});
  expect_error(apply({.attention_factor = -1.0}), {"rope.attention_factor", "got -1"});
  expect_error(apply({.seq_len = -3}), {"rope.seq_len", "got -3"});
  expect_error([&] { kv::apply_rope({}, x, pos, -1); }, {"threads", "got -1"});
  expect_error([&] { (void)kv::frequencies({.dim = 10}, 8); }, {"kvcache::frequencies", "rope.dim", "got 10"});
  kv::layer_cache c(kv::cache_config{kv::storage::f32, 1, 4, 8, 8, {}});
  c.append(random_tensor(1, 2, 8, 2), random_tensor(1, 2, 8, 3));
  const kv::rope dyn{.scaling = kv::rope_scaling::dynamic, .factor = 2.0, .original_context = 4};
  expect_error([&] { kv::rerotate(c, dyn); }, {"kvcache::rerotate", "rope.seq_len", "dynamic", "got 0"});
  expect_error([&] { kv::rerotate(c, kv::rope{.dim = 4}, kv::rope{.dim = 8}); }, {"kvcache::rerotate", "same channels"});
  expect_error([&] { kv::rerotate(c, kv::rope{}, kv::rope{.layout = kv::rope_layout::interleaved}); },
               {"kvcache::rerotate", "same channels"});
}

}  // namespace
