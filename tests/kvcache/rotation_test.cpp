// Tests for mnemo/kvcache/rotation.hpp and the int2 (KIVI 2-bit) storage of kvcache/quant.hpp,
// cache.hpp and decode.hpp:
//   - the randomized Hadamard transform against its definition (double), R^T R = I, norms kept,
//     the block of non-power-of-two head dims, signs fixed by the seed;
//   - a rotated f32 cache decodes like the unrotated one (out, lse, column sums, with a mod) and
//     reads back the appended keys and values; rope re-rotation works through it;
//   - rotated int8 / int4 / int2 caches: decode against the reference over the gathered (rotated
//     back) cache, read-back within the quantization step of the rotated rows;
//   - on keys with outlier channels and queries that share them, rotated int4 lowers the score
//     error by the ratio the stored quantization steps predict, and the output error 2x;
//   - int2: packing (four codes per byte), round trips within half a step, SIMD against reference
//     quantizers and code loads (native and scalar arch), the cache's codes against an independent
//     scalar dequantization, compaction, bytes, decode against the reference (awkward D, GQA,
//     Lq > 1, ragged heads, value groups that split a tile, the scalar engine), column sums;
//   - bad inputs: rotation with an unsupported D or Dv, an unknown rotation, paged int2, values too
//     large to rotate.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "mnemo/kvcache/decode.hpp"
#include "mnemo/kvcache/paged.hpp"
#include "mnemo/kvcache/rope.hpp"
#include "mnemo/kvcache/rotation.hpp"
#include "support/support.hpp"

namespace {

namespace kv = mnemo::kvcache;
namespace quant = mnemo::kvcache::quant;
namespace attn = mnemo::attention;
using mnemo::tensor;
using mnemo::view;
using arch = mnemo::simd::default_arch;
using scalar = mnemo::simd::scalar_arch;

tensor<float, 3> normal_tensor(std::int64_t a, std::int64_t b, std::int64_t c, std::uint32_t seed, float sd = 1.0f) {
  tensor<float, 3> t({a, b, c});
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, sd);
  for (float& x : t) x = normal(rng);
  return t;
}

kv::cache_config config(kv::storage kind, std::int64_t Hkv, std::int64_t capacity, std::int64_t D, std::int64_t Dv,
                        kv::rotation r = kv::rotation::none, kv::quant_options qo = {8, 16, 16}) {
  kv::cache_config cfg;
  cfg.kind = kind;
  cfg.Hkv = Hkv;
  cfg.capacity = capacity;
  cfg.D = D;
  cfg.Dv = Dv;
  cfg.quant = qo;
  cfg.rotate.kind = r;
  return cfg;
}

// Every slot of head h as gathered (rotated back, dequantized).
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

struct decoded {
  tensor<float, 3> out;
  tensor<float, 2> lse, sums;
};
decoded run_decode(const kv::layer_cache& c, const tensor<float, 3>& q, std::int64_t sum_rows = 0, int threads = 1) {
  const std::int64_t Hq = q.extent(0), Lq = q.extent(1);
  decoded r{tensor<float, 3>({Hq, Lq, c.value_dim()}), tensor<float, 2>({Hq, Lq}),
            tensor<float, 2>({Hq, std::max<std::int64_t>(c.max_length(), 1)})};
  kv::decode(c, q, r.out, r.lse, {0, threads}, kv::column_sums{r.sums.as_view(), sum_rows});
  return r;
}

void expect_near_tensors(const float* a, const float* b, std::int64_t n, double atol, double rtol, const char* what) {
  for (std::int64_t i = 0; i < n; ++i) {
    if (std::isinf(b[i])) {
      ASSERT_EQ(a[i], b[i]) << what << " [" << i << "]";
      continue;
    }
    ASSERT_NEAR(a[i], b[i], atol + rtol * std::fabs(b[i])) << what << " [" << i << "]";
  }
}

// ---------------------------------------------------------------------------------------------
// The transform.

TEST(HadamardRotation, MatchesDefinitionInvertsAndKeepsNorms) {
  for (std::int64_t n : {8, 16, 40, 48, 72, 96, 128, 256}) {
    SCOPED_TRACE(n);
    const kv::hadamard_rotation r(n, 7);
    EXPECT_EQ(r.block(), n & -n);
    const tensor<float, 3> x = normal_tensor(1, 1, n, static_cast<std::uint32_t>(n));
    std::vector<float> y(x.data(), x.data() + n);
    r.forward(y.data());
    const std::vector<double> want = kv::reference::rotate(r, x.data());
    double nx = 0, ny = 0;
    for (std::int64_t c = 0; c < n; ++c) {
      EXPECT_NEAR(y[c], want[c], 1e-5 * (1 + std::fabs(want[c])));
      nx += double(x.data()[c]) * x.data()[c];
      ny += double(y[c]) * y[c];
    }
    EXPECT_NEAR(ny, nx, 1e-5 * nx);
    r.inverse(y.data());
    for (std::int64_t c = 0; c < n; ++c) EXPECT_NEAR(y[c], x.data()[c], 1e-5 * (1 + std::fabs(x.data()[c])));
  }
  EXPECT_EQ(kv::hadamard_block(48), 16);
  EXPECT_EQ(kv::hadamard_block(72), 8);
  EXPECT_EQ(kv::hadamard_block(128), 128);
}

TEST(HadamardRotation, SeedFixesTheSigns) {
  const kv::hadamard_rotation a(64, 1), b(64, 1), c(64, 2);
  int same = 0, differ = 0;
  for (std::int64_t i = 0; i < 64; ++i) {
    EXPECT_EQ(a.sign(i), b.sign(i));
    EXPECT_EQ(std::fabs(a.sign(i)), 1.0f);
    (a.sign(i) == c.sign(i) ? same : differ)++;
  }
  EXPECT_GT(differ, 8);  // independent signs: about half differ
  EXPECT_GT(same, 8);
}

// ---------------------------------------------------------------------------------------------
// Rotated caches.

TEST(RotatedCache, F32DecodeEqualsTheUnrotatedOne) {
  struct shape {
    std::int64_t Hq, Hkv, Lq, L, D, Dv;
    bool keys, values;
  };
  const shape shapes[] = {{8, 2, 1, 37, 48, 40, true, true},
                          {8, 2, 3, 300, 72, 72, true, false},
                          {4, 4, 1, 600, 128, 128, false, true},
                          {8, 1, 2, 129, 96, 48, true, true}};
  std::uint32_t seed = 11;
  for (const shape& s : shapes) {
    SCOPED_TRACE(::testing::Message() << "D " << s.D << " Dv " << s.Dv << " L " << s.L);
    kv::cache_config cfg = config(kv::storage::f32, s.Hkv, s.L + 4, s.D, s.Dv);
    kv::layer_cache plain(cfg);
    cfg.rotate = {kv::rotation::hadamard, s.keys, s.values, seed};
    kv::layer_cache rot(cfg);
    EXPECT_EQ(rot.rotates_keys(), s.keys);
    EXPECT_EQ(rot.rotates_values(), s.values);
    const tensor<float, 3> k = normal_tensor(s.Hkv, s.L, s.D, seed + 1), v = normal_tensor(s.Hkv, s.L, s.Dv, seed + 2);
    plain.append(k, v);
    rot.append(k.as_view().narrow(1, 0, s.L / 2), v.as_view().narrow(1, 0, s.L / 2));
    rot.append(k.as_view().narrow(1, s.L / 2, s.L - s.L / 2), v.as_view().narrow(1, s.L / 2, s.L - s.L / 2));
    // Read back in the original space.
    const tensor<float, 3> kk = rot.keys(), vv = rot.values();
    expect_near_tensors(kk.data(), k.data(), k.size(), 2e-6, 2e-6, "keys()");
    expect_near_tensors(vv.data(), v.data(), v.size(), 2e-6, 2e-6, "values()");
    if (s.keys) {
      EXPECT_NE(rot.dense_keys<float>()(0, 0, 0), k(0, 0, 0));  // stored rotated
    }
    const tensor<float, 3> q = normal_tensor(s.Hq, s.Lq, s.D, seed + 3);
    const decoded a = run_decode(plain, q, s.Lq), b = run_decode(rot, q, s.Lq);
    expect_near_tensors(b.out.data(), a.out.data(), a.out.size(), 1e-5, 1e-4, "out");
    expect_near_tensors(b.lse.data(), a.lse.data(), a.lse.size(), 1e-5, 1e-5, "lse");
    expect_near_tensors(b.sums.data(), a.sums.data(), a.sums.size(), 1e-6, 1e-4, "column sums");
    // With a mod (the second entry point).
    tensor<float, 3> oa({s.Hq, s.Lq, s.Dv}), ob({s.Hq, s.Lq, s.Dv});
    attn::decode_workspace ws;
    const attn::mods::sliding_window window{s.L / 3 + 1};
    kv::decode(plain, q, oa, {}, window, {}, ws);
    kv::decode(rot, q, ob, {}, window, {}, ws);
    expect_near_tensors(ob.data(), oa.data(), oa.size(), 1e-5, 1e-4, "out with a mod");
    seed += 5;
  }
}

TEST(RotatedCache, RopeRerotationWorksThroughTheRotation) {
  // rerotate reads keys through gather (rotated back) and writes them with set_keys (rotated again).
  const kv::rope r{};
  kv::layer_cache plain(config(kv::storage::f32, 2, 64, 48, 48));
  kv::layer_cache rot(config(kv::storage::f32, 2, 64, 48, 48, kv::rotation::hadamard));
  const tensor<float, 3> k = normal_tensor(2, 50, 48, 5), v = normal_tensor(2, 50, 48, 6);
  plain.append(k, v);
  rot.append(k, v);
  kv::selection sel;
  sel.heads = {{1, 4, 9, 30, 49}, {0, 2, 3, 40}};
  plain.compact(sel);
  rot.compact(sel);
  kv::rerotate(plain, r);
  kv::rerotate(rot, r);
  const tensor<float, 3> a = plain.keys(), b = rot.keys();
  expect_near_tensors(b.data(), a.data(), a.size(), 1e-5, 1e-5, "re-rotated keys");
}

// Rotated quantized caches: the kernel against the double reference over the gathered cache, and
// each gathered key within the L2 error of its rotated row's quantization (R^T keeps norms).
TEST(RotatedCache, QuantizedKindsDecodeAndReadBackInTheOriginalSpace) {
  std::uint32_t seed = 41;
  for (kv::storage kind : {kv::storage::int8, kv::storage::int4, kv::storage::int2}) {
    SCOPED_TRACE(kv::storage_name(kind));
    kv::layer_cache c(config(kind, 2, 140, 72, 48, kv::rotation::hadamard, {16, 16, 24}));
    const tensor<float, 3> k = normal_tensor(2, 131, 72, seed), v = normal_tensor(2, 131, 48, seed + 1);
    c.append(k, v);
    const tensor<float, 3> q = normal_tensor(8, 3, 72, seed + 2);
    tensor<float, 3> want({8, 3, 48});
    tensor<float, 2> want_lse({8, 3});
    const decoded got = run_decode(c, q);
    kv::reference::decode(c, q, want, want_lse);
    expect_near_tensors(got.out.data(), want.data(), want.size(), 2e-5, 1e-4, "out");
    expect_near_tensors(got.lse.data(), want_lse.data(), want_lse.size(), 2e-5, 2e-5, "lse");
    for (std::int64_t h = 0; h < 2; ++h) {
      const head_rows r = read_head(c, h);
      std::int64_t start = 0, g = 0;
      const auto lens = c.key_group_lengths(h);
      for (std::int64_t j = 0; j < c.quantized_length(h); ++j) {
        while (j >= start + lens[static_cast<std::size_t>(g)]) start += lens[static_cast<std::size_t>(g++)];
        double err = 0, bound = 0;
        for (std::int64_t e = 0; e < 72; ++e) {
          err += std::pow(r.k(j, e) - k(h, j, e), 2);
          bound += std::pow(0.5 * c.key_scales(h)[static_cast<std::size_t>(g * 72 + e)], 2);
        }
        ASSERT_LE(std::sqrt(err), std::sqrt(bound) * 1.001 + 1e-5) << "h " << h << " j " << j;
      }
      for (std::int64_t j = c.quantized_length(h); j < c.length(h); ++j)  // residual: f32, rotated back
        for (std::int64_t e = 0; e < 72; ++e) ASSERT_NEAR(r.k(j, e), k(h, j, e), 2e-6);
    }
    seed += 7;
  }
}

// Keys with a few outlier channels (20x the others, offset by one of their units, as the massive
// channels of trained models) and queries that share them at 4x: the score error of a channel is
// q_c times the key's rounding error there, so the outlier channels' large steps count most.
struct outlier_data {
  tensor<float, 3> k, v, q;
};
outlier_data outlier_problem(std::int64_t Hq, std::int64_t Hkv, std::int64_t Lq, std::int64_t L, std::int64_t D,
                             std::uint32_t seed) {
  constexpr std::int64_t outlier_channels = 4;
  constexpr float key_scale = 20.0f, key_offset = 1.0f, query_scale = 4.0f;
  auto make = [&](std::int64_t H, std::int64_t n, float scale, float offset, std::uint32_t s) {
    tensor<float, 3> t = normal_tensor(H, n, D, s);
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t j = 0; j < n; ++j)
        for (std::int64_t c = 0; c < outlier_channels; ++c) {
          float& x = t(h, j, (c * 37 + 5) % D);
          x = scale * (x + offset);
        }
    return t;
  };
  return {make(Hkv, L, key_scale, key_offset, seed), normal_tensor(Hkv, L, D, seed + 1),
          make(Hq, Lq, query_scale, 0.0f, seed + 2)};
}

TEST(RotatedCache, Int4ErrorOnOutlierChannelsDropsAsTheStepsPredict) {
  const std::int64_t Hq = 32, Hkv = 8, Lq = 16, L = 1024, D = 128;
  const outlier_data x = outlier_problem(Hq, Hkv, Lq, L, D, 3);
  kv::layer_cache exact(config(kv::storage::f32, Hkv, L, D, D, kv::rotation::none, {}));
  exact.append(x.k, x.v);
  const decoded want = run_decode(exact, x.q);
  double out_err[2] = {}, score_err[2] = {}, predicted[2] = {};
  for (int rotated = 0; rotated < 2; ++rotated) {
    kv::layer_cache c(config(kv::storage::int4, Hkv, L, D, D, rotated ? kv::rotation::hadamard : kv::rotation::none, {}));
    c.append(x.k, x.v);
    const decoded got = run_decode(c, x.q);
    double num = 0, den = 0;
    for (std::int64_t i = 0; i < want.out.size(); ++i)
      num += std::pow(got.out.data()[i] - want.out.data()[i], 2), den += std::pow(want.out.data()[i], 2);
    out_err[rotated] = std::sqrt(num / den);
    // Score error of the first query row of every head against its kv head's quantized keys
    // (gathered), and its prediction from the stored steps: a uniform rounding error of variance
    // step^2 / 12 per channel, in the stored space, where the query is R q.
    const tensor<float, 3> kk = c.keys();
    for (std::int64_t h = 0; h < Hq; ++h) {
      const std::int64_t hk = h / (Hq / Hkv);
      std::vector<float> qs(&x.q(h, 0, 0), &x.q(h, 0, 0) + D);
      if (rotated) c.key_rotation().forward(qs.data());
      std::int64_t start = 0, g = 0;
      const auto lens = c.key_group_lengths(hk);
      for (std::int64_t j = 0; j < c.quantized_length(hk); ++j) {
        while (j >= start + lens[static_cast<std::size_t>(g)]) start += lens[static_cast<std::size_t>(g++)];
        double e = 0, var = 0;
        for (std::int64_t ch = 0; ch < D; ++ch) {
          e += double(x.q(h, 0, ch)) * (kk(hk, j, ch) - x.k(hk, j, ch));
          const double step = c.key_scales(hk)[static_cast<std::size_t>(g * D + ch)];
          var += double(qs[static_cast<std::size_t>(ch)]) * qs[static_cast<std::size_t>(ch)] * step * step / 12;
        }
        score_err[rotated] += e * e;
        predicted[rotated] += var;
      }
    }
  }
  const double predicted_ratio = predicted[0] / predicted[1], score_ratio = score_err[0] / score_err[1];
  std::printf("int4, keys with outlier channels: output rel error %.4g unrotated, %.4g rotated (%.2fx lower); "
              "score mse %.2fx lower, predicted from the stored steps %.2fx\n",
              out_err[0], out_err[1], out_err[0] / out_err[1], score_ratio, predicted_ratio);
  EXPECT_GT(predicted_ratio, 4.0);  // the outlier channels' steps dominate unrotated
  EXPECT_GT(score_ratio, 0.5 * predicted_ratio);
  EXPECT_LT(score_ratio, 2.0 * predicted_ratio);
  EXPECT_GT(out_err[0], 1.5 * out_err[1]);  // measured 2.1x (AVX2)
}

// ---------------------------------------------------------------------------------------------
// int2.

TEST(Int2, PacksFourCodesPerByteLowBitsFirst) {
  std::vector<std::uint8_t> row(3, 0);
  quant::set_code(row.data(), 2, 0, 1);
  quant::set_code(row.data(), 2, 1, 2);
  quant::set_code(row.data(), 2, 3, 3);
  quant::set_code(row.data(), 2, 9, 2);
  EXPECT_EQ(row[0], 0b11'00'10'01);
  EXPECT_EQ(row[1], 0);
  EXPECT_EQ(row[2], 0b00'00'10'00);
  quant::set_code(row.data(), 2, 1, 0);  // rewriting one code keeps the others
  EXPECT_EQ(row[0], 0b11'00'00'01);
  for (int c : {0, 1, 2, 3, 9}) EXPECT_EQ(quant::get_code(row.data(), 2, c), (row[c / 4] >> (2 * (c % 4))) & 3);
  EXPECT_EQ(quant::row_bytes(2, 9), 3);
  EXPECT_EQ(quant::row_bytes(2, 128), 32);
  EXPECT_EQ(quant::levels(2), 3);
}

template <class A>
void check_int2_simd(std::int64_t n, std::int64_t group, std::uint32_t seed) {
  const tensor<float, 3> xt = normal_tensor(1, 1, n, seed, 3.0f);
  const float* x = xt.data();
  const std::int64_t groups = (n + group - 1) / group, rb = quant::row_bytes(2, n);
  std::vector<std::uint8_t> c_ref(static_cast<std::size_t>(rb)), c_simd(static_cast<std::size_t>(rb));
  std::vector<float> s_ref(static_cast<std::size_t>(groups)), m_ref(s_ref.size()), s_simd(s_ref.size()), m_simd(s_ref.size());
  quant::reference::quantize_token(x, n, group, 2, c_ref.data(), s_ref.data(), m_ref.data());
  quant::quantize_token<A, 2>(x, n, group, c_simd.data(), s_simd.data(), m_simd.data());
  EXPECT_EQ(c_ref, c_simd);
  EXPECT_EQ(s_ref, s_simd);
  EXPECT_EQ(m_ref, m_simd);
  std::vector<float> y(static_cast<std::size_t>(n)), y_simd(y.size());
  quant::reference::dequantize_token(c_ref.data(), n, group, 2, s_ref.data(), m_ref.data(), y.data());
  quant::dequantize_token<A, 2>(c_ref.data(), n, group, s_ref.data(), m_ref.data(), y_simd.data());
  for (std::int64_t c = 0; c < n; ++c) {
    const float step = s_ref[static_cast<std::size_t>(c / group)];
    EXPECT_LE(std::fabs(x[c] - y[c]), 0.5 * step * (1 + 1e-5) + 4e-7 * std::fabs(x[c])) << c;
    EXPECT_NEAR(y_simd[c], y[c], 2e-7 * (std::fabs(y[c]) + std::fabs(m_ref[static_cast<std::size_t>(c / group)])));
  }
  const tensor<float, 3> a = normal_tensor(1, 1, n, seed + 1);
  double want = 0;
  for (std::int64_t c = 0; c < n; ++c) want += double(a.data()[c]) * quant::get_code(c_ref.data(), 2, c);
  EXPECT_NEAR((quant::dot_codes<A, 2>(a.data(), c_ref.data(), n)), want, 1e-5 * (1 + std::fabs(want)) * double(n));
  if constexpr (mnemo::simd::vectorized<A>) {
    constexpr std::int64_t W = mnemo::simd::width<A>;
    alignas(64) float f[W], s[W];
    for (std::int64_t c = 0; c + W <= n; c += W) {
      quant::load_codes<A, 2>(c_ref.data(), c).store_aligned(f);
      for (std::int64_t i = 0; i < W; ++i) ASSERT_EQ(f[i], quant::get_code(c_ref.data(), 2, c + i)) << c + i;
    }
    for (std::int64_t c = 0; c + 2 * W <= n; c += 2 * W) {
      mnemo::simd::fbatch<A> first, second;
      quant::load_code_pair<A, 2>(c_ref.data(), c, first, second);
      first.store_aligned(f);
      second.store_aligned(s);
      for (std::int64_t i = 0; i < W; ++i) {
        ASSERT_EQ(f[i], quant::get_code(c_ref.data(), 2, c + quant::pair_channel<2>(i, W)));
        ASSERT_EQ(s[i], quant::get_code(c_ref.data(), 2, c + quant::pair_channel<2>(W + i, W)));
      }
    }
    const std::int64_t c0 = n / W * W;
    if (c0 < n) {
      quant::load_codes_partial<A, 2>(c_ref.data(), c0, n - c0).store_aligned(f);
      for (std::int64_t i = 0; i < W; ++i) EXPECT_EQ(f[i], c0 + i < n ? quant::get_code(c_ref.data(), 2, c0 + i) : 0);
    }
  }
}

TEST(Int2, QuantizersAndCodeLoadsMatchTheReference) {
  for (std::int64_t n : {1, 3, 15, 16, 37, 128, 131})
    for (std::int64_t group : {16, 32, 1000}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " group " << group);
      check_int2_simd<arch>(n, group, static_cast<std::uint32_t>(7 * n + group));
      check_int2_simd<scalar>(n, group, static_cast<std::uint32_t>(9 * n + group));
    }
  // Channel groups (keys) and a constant group.
  const std::int64_t n = 37, D = 72, cs = quant::row_bytes(2, D);
  const tensor<float, 3> x = normal_tensor(1, n, D, 5);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(n * cs));
  std::vector<float> scale(D), min(D), y(D);
  quant::reference::quantize_channels(x.data(), D, n, D, 2, codes.data(), cs, scale.data(), min.data());
  for (std::int64_t t = 0; t < n; ++t) {
    quant::reference::dequantize_channels(codes.data() + t * cs, D, 2, scale.data(), min.data(), y.data());
    for (std::int64_t c = 0; c < D; ++c) ASSERT_LE(std::fabs(x(0, t, c) - y[c]), 0.5 * scale[c] * (1 + 1e-5) + 1e-6);
  }
  const std::vector<float> flat(37, -0.75f);
  std::vector<std::uint8_t> fc(static_cast<std::size_t>(quant::row_bytes(2, 37)));
  std::vector<float> fs(3), fm(3), fy(37);
  quant::reference::quantize_token(flat.data(), 37, 16, 2, fc.data(), fs.data(), fm.data());
  quant::reference::dequantize_token(fc.data(), 37, 16, 2, fs.data(), fm.data(), fy.data());
  for (float v : fy) EXPECT_EQ(v, -0.75f);
}

// The cache's int2 codes read back by hand: code c of a row is bits [2 (c mod 4), + 2) of byte c / 4,
// x = min + scale * code with the key group's per-channel and the token's per-group scale and min.
TEST(Int2, CacheCodesAgainstAnIndependentDequantization) {
  const std::int64_t H = 3, D = 72, Dv = 48, VG = 16;
  kv::layer_cache c(config(kv::storage::int2, H, 150, D, Dv, kv::rotation::none, {8, VG, 16}));
  const tensor<float, 3> k = normal_tensor(H, 121, D, 1), v = normal_tensor(H, 121, Dv, 2);
  c.append(k.as_view().narrow(1, 0, 37), v.as_view().narrow(1, 0, 37));
  c.append(k.as_view().narrow(1, 37, 84), v.as_view().narrow(1, 37, 84));
  EXPECT_EQ(c.key_codes().extent(2), 18);
  EXPECT_EQ(c.value_codes().extent(2), 12);
  auto code = [](const std::uint8_t* row, std::int64_t ch) { return (row[ch / 4] >> (2 * (ch % 4))) & 3; };
  for (std::int64_t h = 0; h < H; ++h) {
    const head_rows r = read_head(c, h);
    ASSERT_EQ(c.quantized_length(h), 112);
    std::int64_t start = 0, g = 0;
    const auto lens = c.key_group_lengths(h);
    for (std::int64_t j = 0; j < c.length(h); ++j) {
      if (j >= c.quantized_length(h)) {
        for (std::int64_t e = 0; e < D; ++e) ASSERT_EQ(r.k(j, e), k(h, j, e));
        continue;
      }
      while (j >= start + lens[static_cast<std::size_t>(g)]) start += lens[static_cast<std::size_t>(g++)];
      const std::uint8_t* kc = c.key_codes().ptr(h, j);
      for (std::int64_t e = 0; e < D; ++e) {
        const float s = c.key_scales(h)[static_cast<std::size_t>(g * D + e)], m = c.key_mins(h)[static_cast<std::size_t>(g * D + e)];
        ASSERT_EQ(r.k(j, e), m + s * static_cast<float>(code(kc, e))) << h << " " << j << " " << e;
        ASSERT_LE(std::fabs(r.k(j, e) - k(h, j, e)), 0.5f * s * 1.0001f + 1e-6f);
      }
      const std::uint8_t* vc = c.value_codes().ptr(h, j);
      for (std::int64_t e = 0; e < Dv; ++e) {
        const float s = c.value_scales()(h, e / VG, j), m = c.value_mins()(h, e / VG, j);
        ASSERT_EQ(r.v(j, e), m + s * static_cast<float>(code(vc, e)));
        ASSERT_LE(std::fabs(r.v(j, e) - v(h, j, e)), 0.5f * s * 1.0001f + 1e-6f);
      }
    }
  }
  // Compaction keeps every kept token bit-identical.
  std::vector<head_rows> before;
  for (std::int64_t h = 0; h < H; ++h) before.push_back(read_head(c, h));
  kv::selection sel;
  sel.heads = {{}, {0, 5, 8, 9, 63, 111, 112, 120}, {}};
  for (std::int64_t j = 0; j < 121; j += 3) sel.heads[2].push_back(j);
  c.compact(sel);
  for (std::int64_t h = 0; h < H; ++h) {
    const head_rows after = read_head(c, h);
    const auto& kept = sel.heads[static_cast<std::size_t>(h)];
    ASSERT_EQ(c.length(h), static_cast<std::int64_t>(kept.size()));
    for (std::size_t i = 0; i < kept.size(); ++i) {
      for (std::int64_t e = 0; e < D; ++e) ASSERT_EQ(after.k(std::int64_t(i), e), before[h].k(kept[i], e));
      for (std::int64_t e = 0; e < Dv; ++e) ASSERT_EQ(after.v(std::int64_t(i), e), before[h].v(kept[i], e));
    }
  }
}

TEST(Int2, BytesAgainstF16) {
  std::int64_t bytes[2] = {};
  for (kv::storage kind : {kv::storage::f16, kv::storage::int2}) {
    kv::layer_cache c(config(kind, 2, 2048, 128, 128, kv::rotation::none, {}));
    c.append(normal_tensor(2, 2048, 128, 9), normal_tensor(2, 2048, 128, 10));
    bytes[kind == kv::storage::int2] = c.bytes();
  }
  // 80 bytes per quantized token (header of cache.hpp) against f16's 512, plus the f32 window.
  EXPECT_LE(double(bytes[1]) / double(bytes[0]), 0.22);
}

struct problem {
  std::int64_t Hq, Hkv, Lq, L, D, Dv;
};

kv::layer_cache filled_int2(const problem& p, std::uint32_t seed, kv::rotation r = kv::rotation::none,
                            kv::quant_options qo = {32, 16, 48}) {
  kv::layer_cache c(config(kv::storage::int2, p.Hkv, p.L + 8, p.D, p.Dv, r, qo));
  c.append(normal_tensor(p.Hkv, p.L, p.D, seed), normal_tensor(p.Hkv, p.L, p.Dv, seed + 1));
  return c;
}

void expect_decode_matches_reference(const kv::layer_cache& c, std::int64_t Hq, std::int64_t Lq, std::uint32_t seed) {
  const tensor<float, 3> q = normal_tensor(Hq, Lq, c.head_dim(), seed);
  const std::int64_t rows = Lq > 1 ? Lq - 1 : 0;
  const decoded got = run_decode(c, q, rows, 1), got3 = run_decode(c, q, rows, 3);
  decoded want{tensor<float, 3>({Hq, Lq, c.value_dim()}), tensor<float, 2>({Hq, Lq}),
               tensor<float, 2>({Hq, std::max<std::int64_t>(c.max_length(), 1)})};
  kv::reference::decode(c, q, want.out, want.lse, {}, kv::column_sums{want.sums.as_view(), rows});
  expect_near_tensors(got.out.data(), want.out.data(), want.out.size(), 2e-5, 1e-4, "out");
  expect_near_tensors(got.lse.data(), want.lse.data(), want.lse.size(), 2e-5, 2e-5, "lse");
  if (c.max_length() > 0) expect_near_tensors(got.sums.data(), want.sums.data(), want.sums.size(), 1e-6, 1e-4, "sums");
  EXPECT_EQ(std::memcmp(got.out.data(), got3.out.data(), got.out.bytes()), 0) << "thread count changed out";
}

TEST(Int2, DecodeMatchesTheReference) {
  const problem problems[] = {
      {4, 4, 1, 1, 48, 48},      // one token: residual window only
      {8, 2, 1, 37, 72, 40},     // Dv != D, awkward sizes
      {8, 2, 3, 600, 128, 128},  // across the chunk size, several key groups, Lq = 3
      {4, 1, 2, 1100, 96, 80},   // MQA-like group of 4, three chunks
  };
  std::uint32_t seed = 1;
  for (const problem& p : problems)
    for (kv::rotation r : {kv::rotation::none, kv::rotation::hadamard}) {
      SCOPED_TRACE(::testing::Message() << "L " << p.L << " D " << p.D << " " << kv::rotation_name(r));
      expect_decode_matches_reference(filled_int2(p, seed, r), p.Hq, p.Lq, seed + 7);
      seed += 3;
    }
  // Value groups of 16 split every SIMD tile over several groups; one group over all of Dv.
  expect_decode_matches_reference(filled_int2({8, 2, 1, 300, 64, 96}, 11, kv::rotation::none, {16, 16, 16}), 8, 1, 12);
  expect_decode_matches_reference(filled_int2({8, 2, 1, 300, 64, 96}, 13, kv::rotation::none, {16, 128, 16}), 8, 1, 14);
}

TEST(Int2, RaggedHeadsAndAnEmptyHead) {
  kv::layer_cache c = filled_int2({12, 3, 1, 700, 64, 64}, 21);
  kv::selection sel;
  sel.heads.resize(3);
  for (std::int64_t j = 0; j < 700; ++j) {
    if (j % 4 == 1) sel.heads[0].push_back(j);
    if (j % 5 != 0) sel.heads[2].push_back(j);
  }
  c.compact(sel);  // head 1 keeps nothing
  ASSERT_EQ(c.length(1), 0);
  expect_decode_matches_reference(c, 12, 2, 24);
  c.append(normal_tensor(3, 5, 64, 22), normal_tensor(3, 5, 64, 23));
  expect_decode_matches_reference(c, 12, 3, 25);
}

TEST(Int2, ScalarEngineMatchesTheReference) {
  // The vector paths run above; the scalar instantiation of the int2 source runs here (the test
  // executable dispatches at its own level only).
  namespace skv = attn::split_kv;
  const problem p{8, 2, 2, 300, 72, 48};
  const kv::layer_cache c = filled_int2(p, 31);
  const tensor<float, 3> q = normal_tensor(p.Hq, p.Lq, p.D, 32);
  const attn::dims d{1, p.Hq, p.Hkv, p.Lq, c.max_length(), p.D, p.Dv, static_cast<float>(1.0 / std::sqrt(double(p.D)))};
  tensor<float, 4> out({1, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({1, p.Hq, p.Lq});
  const view<const float, 4> q4(q.data(), {1, p.Hq, p.Lq, p.D});
  attn::decode_workspace ws;
  skv::attend<scalar>(d, kv::kivi_source<2>(c), q4, out.as_view(), lse.as_view(), attn::mods::none{}, 1, ws);
  tensor<float, 3> want({p.Hq, p.Lq, p.Dv});
  tensor<float, 2> want_lse({p.Hq, p.Lq});
  kv::reference::decode(c, q, want, want_lse);
  expect_near_tensors(out.data(), want.data(), want.size(), 2e-5, 1e-4, "scalar out");
  expect_near_tensors(lse.data(), want_lse.data(), want_lse.size(), 2e-5, 2e-5, "scalar lse");
}

// ---------------------------------------------------------------------------------------------
// Bad inputs.

TEST(RotatedCache, BadInputsThrowNamingTheArgument) {
  using mnemo::test::expect_error;
  expect_error([] { kv::layer_cache c(config(kv::storage::int4, 1, 8, 36, 36, kv::rotation::hadamard)); },
               {"kvcache::layer_cache", "config.D", "multiple of 8", "36"});
  expect_error([] { kv::layer_cache c(config(kv::storage::int4, 1, 8, 63, 64, kv::rotation::hadamard)); },
               {"config.D", "63"});
  expect_error([] { kv::layer_cache c(config(kv::storage::int8, 1, 8, 64, 20, kv::rotation::hadamard)); },
               {"config.Dv", "20"});
  {  // keys only: any Dv
    kv::cache_config cfg = config(kv::storage::int8, 1, 8, 64, 20, kv::rotation::hadamard);
    cfg.rotate.values = false;
    EXPECT_NO_THROW(kv::layer_cache{cfg});
  }
  expect_error(
      [] {
        kv::cache_config cfg = config(kv::storage::int4, 1, 8, 64, 64);
        cfg.rotate.kind = static_cast<kv::rotation>(7);
        kv::layer_cache c(cfg);
      },
      {"config.rotate.kind", "7"});
  expect_error(
      [] {
        kv::paged_cache c({.kind = kv::storage::int2, .Hkv = 1, .D = 16, .page_size = 16, .num_pages = 4});
      },
      {"kvcache::paged_cache", "config.kind", "int2"});
  // Values too large to rotate without overflow, in every kind; nothing is appended.
  for (kv::storage kind : {kv::storage::f32, kv::storage::int4, kv::storage::int2}) {
    kv::layer_cache c(config(kind, 1, 8, 64, 64, kv::rotation::hadamard));
    tensor<float, 3> big = normal_tensor(1, 1, 64, 1), ok = normal_tensor(1, 1, 64, 2);
    big(0, 0, 5) = 1e37f;
    expect_error([&] { c.append(big, ok); }, {"kvcache::layer_cache::append", "k", "rotated storage", "[0, 0, 5]"});
    expect_error([&] { c.append(ok, big); }, {"kvcache::layer_cache::append", "v", "Dv"});
    big(0, 0, 5) = std::numeric_limits<float>::quiet_NaN();
    expect_error([&] { c.append(big, ok); }, {"kvcache::layer_cache::append", "k"});
    EXPECT_EQ(c.length(0), 0);
    c.append(ok, ok);
    tensor<float, 2> k2({1, 64});
    k2(0, 3) = 1e37f;
    const std::vector<std::int64_t> rot = {0};
    expect_error([&] { c.set_keys(0, k2, rot); }, {"kvcache::layer_cache::set_keys", "k", "rotated storage"});
  }
}

}  // namespace
