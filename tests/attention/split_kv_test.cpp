// Tests for mnemo/attention/split_kv.hpp: every KV source through the engine (split_kv::attend, at
// the ISA simd::dispatch picks, so MNEMO_ISA runs the same cases at every level) against its
// reference — strided views in f32 / f16 / bf16 with a mask and a score mod against
// attention::reference, the cache's dense and KIVI stores (ragged heads, quantized part and residual
// window) against kvcache::reference::decode, gathered per-row key sets against attention::reference
// over each row's key set — on awkward sizes (Lk 1, 511, 512, 513, 1000; D 40, 96; GQA 1, 4, 8;
// Lq 1, 3, 16), with and without column sums, and bit-identical for 1, 2 and 3 threads.
#include "mnemo/attention/split_kv.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/decode.hpp"
#include "mnemo/simd/dispatch.hpp"

namespace {

namespace attn = mnemo::attention;
namespace skv = mnemo::attention::split_kv;
namespace kv = mnemo::kvcache;
namespace mods = mnemo::attention::mods;
using mnemo::bf16;
using mnemo::f16;
using mnemo::tensor;
using mnemo::view;

// f32 tolerance against the double references (attention/decode_test.cpp uses the same); f16 and
// bf16 sources are compared with references on the same rounded inputs.
constexpr double atol = 2e-5, rtol = 1e-4;
// KIVI: the reference dequantizes first, the kernel folds scale and minimum into the dot products.
constexpr double kivi_atol = 1e-4, kivi_rtol = 1e-3;

struct sizes {
  std::int64_t Lk, D, G, Lq;
};

std::string describe(const sizes& s) {
  return "Lk=" + std::to_string(s.Lk) + " D=" + std::to_string(s.D) + " G=" + std::to_string(s.G) +
         " Lq=" + std::to_string(s.Lq);
}

// The awkward sizes every source runs (Lq cycles so that each (Lk, D, G) sees one row count).
std::vector<sizes> all_sizes() {
  std::vector<sizes> out;
  const std::int64_t Lqs[] = {1, 3, 16};
  std::size_t n = 0;
  for (std::int64_t Lk : {1, 511, 512, 513, 1000})
    for (std::int64_t D : {40, 96})
      for (std::int64_t G : {1, 4, 8}) out.push_back({Lk, D, G, Lqs[n++ % 3]});
  return out;
}

template <class T, int R>
tensor<T, R> random_tensor(mnemo::shape_t<R> shape, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  tensor<T, R> t(shape);
  std::uniform_real_distribution<float> u(lo, hi);
  for (T& x : t) x = T(u(rng));
  return t;
}

// The engine's outputs of one run: out [B, Hq, Lq, Dv], lse [B, Hq, Lq], sums [B, Hq, width].
struct result {
  tensor<float, 4> out;
  tensor<float, 3> lse, sums;
};

bool same_bits(const tensor<float, 4>& a, const tensor<float, 4>& b) {
  return std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}
bool same_bits(const tensor<float, 3>& a, const tensor<float, 3>& b) {
  return std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

// Runs the engine over `src` at the dispatched ISA, with and without column sums and at 1, 2 and 3
// threads; expects every run bit-identical and returns the one with column sums.
template <class Source, class Mod>
result run_engine(const attn::dims& d, const Source& src, view<const float, 4> q, const Mod& mod, std::int64_t width,
                  std::int64_t summed_rows, const std::string& what) {
  auto once = [&](int threads, bool sums) {
    result r{tensor<float, 4>({d.B, d.Hq, d.Lq, d.Dv}), tensor<float, 3>({d.B, d.Hq, d.Lq}),
             tensor<float, 3>({d.B, d.Hq, std::max<std::int64_t>(width, 1)})};
    std::fill(r.sums.begin(), r.sums.end(), -7.0f);  // every column in [0, width) must be written
    const skv::sums_out cs{sums ? r.sums.as_view() : view<float, 3>{}, d.Lq - summed_rows, width};
    attn::decode_workspace ws;
    mnemo::simd::dispatch(mnemo::simd::level::automatic, [&]<class Arch>() {
      skv::attend<Arch>(d, src, q, r.out.as_view(), r.lse.as_view(), mod, threads, ws, cs);
    });
    return r;
  };
  result base = once(1, true);
  const result plain = once(1, false);
  EXPECT_TRUE(same_bits(base.out, plain.out) && same_bits(base.lse, plain.lse))
      << what << ": the column sums changed the outputs";
  for (int threads : {2, 3}) {
    const result r = once(threads, true);
    EXPECT_TRUE(same_bits(base.out, r.out) && same_bits(base.lse, r.lse) && same_bits(base.sums, r.sums))
        << what << ": threads=" << threads << " is not bit-identical to threads=1";
  }
  return base;
}

template <int R>
void expect_close(const tensor<float, R>& got, const tensor<float, R>& want, double a, double r,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::int64_t i = 0; i < got.size(); ++i) {
    const double g = got.data()[i], w = want.data()[i];
    if (std::isinf(w)) {
      ASSERT_EQ(g, w) << what << " at " << i;
      continue;
    }
    ASSERT_NEAR(g, w, a + r * std::fabs(w)) << what << " at " << i;
  }
}

// ---------------------------------------------------------------------------------------------
// The sources, one case type each: make the data for some sizes, run the engine, and compare.

// Strided views in KV, B = 2, with a sliding window (empty chunks at Lk >= 512) and a softcap.
template <class KV>
struct strided_case {
  static void check(const sizes& s, std::uint32_t seed) {
    std::mt19937 rng(seed);
    const std::int64_t B = 2, Hkv = 2, Hq = Hkv * s.G, Dv = s.D;
    const auto q = random_tensor<float, 4>({B, Hq, s.Lq, s.D}, rng, -2.0f, 2.0f);
    const auto k = random_tensor<KV, 4>({B, Hkv, s.Lk, s.D}, rng);
    const auto v = random_tensor<KV, 4>({B, Hkv, s.Lk, Dv}, rng);
    const auto mod = mods::all_of(mods::sliding_window{s.Lk > 512 ? 300 : s.Lk + s.Lq}, mods::softcap{5.0f});
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.D)));
    const attn::dims d{B, Hq, Hkv, s.Lq, s.Lk, s.D, Dv, scale};
    const skv::strided_source<KV> src{k, v, {}};
    const std::int64_t summed = std::min<std::int64_t>(s.Lq, 2);
    const result got = run_engine(d, src, q, mod, s.Lk, summed, describe(s));
    result want{tensor<float, 4>({B, Hq, s.Lq, Dv}), tensor<float, 3>({B, Hq, s.Lq}), tensor<float, 3>({B, Hq, s.Lk})};
    attn::reference(mnemo::cview(q), k, v, want.out.as_view(), want.lse.as_view(), mod, {},
                    attn::column_sums{want.sums.as_view(), summed});
    expect_close(got.out, want.out, atol, rtol, describe(s) + " out");
    expect_close(got.lse, want.lse, atol, rtol, describe(s) + " lse");
    expect_close(got.sums, want.sums, atol, rtol, describe(s) + " column sums");
  }
};

// A cache of kind Kind with ragged heads: head 0 holds Lk tokens, head 1 keeps every third after
// compaction (quantized kinds: the kept slots stay in their groups, the residual window as is).
template <kv::storage Kind>
struct cache_case {
  static void check(const sizes& s, std::uint32_t seed) {
    std::mt19937 rng(seed);
    const std::int64_t Hkv = 2, Hq = Hkv * s.G, Dv = s.D;
    kv::layer_cache c({.kind = Kind, .Hkv = Hkv, .capacity = s.Lk, .D = s.D, .quant = {64, 64, 96}});
    c.append(random_tensor<float, 3>({Hkv, s.Lk, s.D}, rng), random_tensor<float, 3>({Hkv, s.Lk, Dv}, rng));
    kv::selection sel;
    sel.heads.resize(2);
    for (std::int64_t j = 0; j < s.Lk; ++j) {
      sel.heads[0].push_back(j);
      if (j % 3 == 0) sel.heads[1].push_back(j);
    }
    c.compact(sel);
    const auto q = random_tensor<float, 3>({Hq, s.Lq, s.D}, rng, -2.0f, 2.0f);
    const std::int64_t Lmax = c.max_length(), summed = s.Lq;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.D)));
    const attn::dims d{1, Hq, Hkv, s.Lq, Lmax, s.D, Dv, scale};
    const view<const float, 4> q4(q.data(), {1, Hq, s.Lq, s.D});
    result got;
    if constexpr (Kind == kv::storage::int8 || Kind == kv::storage::int4) {
      got = run_engine(d, kv::kivi_source<Kind == kv::storage::int8 ? 8 : 4>(c), q4, mods::none{}, Lmax, summed, describe(s));
    } else {
      using T = std::conditional_t<Kind == kv::storage::f32, float, std::conditional_t<Kind == kv::storage::f16, f16, bf16>>;
      const auto kd = c.dense_keys<T>(), vd = c.dense_values<T>();
      const view<const T, 4> k4(kd.data(), {1, Hkv, kd.extent(1), s.D}, {Hkv * kd.stride(0), kd.stride(0), kd.stride(1), 1});
      const view<const T, 4> v4(vd.data(), {1, Hkv, vd.extent(1), Dv}, {Hkv * vd.stride(0), vd.stride(0), vd.stride(1), 1});
      got = run_engine(d, skv::strided_source<T>{k4, v4, c.lengths()}, q4, mods::none{}, Lmax, summed, describe(s));
    }
    tensor<float, 3> out({Hq, s.Lq, Dv});
    tensor<float, 2> lse({Hq, s.Lq}), sums({Hq, Lmax});
    kv::reference::decode(c, q, out, lse, {}, kv::column_sums{sums, 0});
    const bool quantized = kv::is_quantized(Kind);
    const double a = quantized ? kivi_atol : atol, r = quantized ? kivi_rtol : rtol;
    const tensor<float, 4> want_out = [&] {
      tensor<float, 4> t({1, Hq, s.Lq, Dv});
      std::copy(out.begin(), out.end(), t.begin());
      return t;
    }();
    tensor<float, 3> want_lse({1, Hq, s.Lq}), want_sums({1, Hq, Lmax});  // Lmax = Lk >= 1: head 0 keeps all
    std::copy(lse.begin(), lse.end(), want_lse.begin());
    std::copy(sums.begin(), sums.end(), want_sums.begin());
    expect_close(got.out, want_out, a, r, describe(s) + " out");
    expect_close(got.lse, want_lse, a, r, describe(s) + " lse");
    expect_close(got.sums, want_sums, a, r, describe(s) + " column sums");
  }
};

// Gathered key sets: every row (b, kv head, r = g * Lq + i) its own random keys in random order,
// some rows empty, some longer than a chunk; scores computed or given.
template <class KV, bool Given>
struct gathered_case {
  static void check(const sizes& s, std::uint32_t seed) {
    std::mt19937 rng(seed);
    const std::int64_t B = 1, Hkv = 2, Hq = Hkv * s.G, Dv = s.D, R = s.G * s.Lq;
    const auto q = random_tensor<float, 4>({B, Hq, s.Lq, s.D}, rng, -2.0f, 2.0f);
    const auto k = random_tensor<KV, 4>({B, Hkv, s.Lk, s.D}, rng);
    const auto v = random_tensor<KV, 4>({B, Hkv, s.Lk, Dv}, rng);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.D)));
    tensor<std::int64_t, 4> keys({B, Hkv, R, s.Lk});
    tensor<std::int64_t, 3> counts({B, Hkv, R});
    tensor<float, 4> given({B, Hkv, R, s.Lk});
    std::vector<std::int64_t> perm(static_cast<std::size_t>(s.Lk));
    for (std::int64_t hk = 0; hk < Hkv; ++hk)
      for (std::int64_t r = 0; r < R; ++r) {
        std::iota(perm.begin(), perm.end(), std::int64_t{0});
        std::shuffle(perm.begin(), perm.end(), rng);
        const std::int64_t n = r % 5 == 4 ? 0 : std::uniform_int_distribution<std::int64_t>(1, s.Lk)(rng);
        counts(0, hk, r) = n;
        const std::int64_t h = hk * s.G + r / s.Lq, i = r % s.Lq;
        for (std::int64_t t = 0; t < n; ++t) {
          const std::int64_t j = perm[static_cast<std::size_t>(t)];
          keys(0, hk, r, t) = j;
          double dot = 0;
          for (std::int64_t e = 0; e < s.D; ++e) dot += static_cast<double>(scale * q(0, h, i, e)) * mnemo::to_float(k(0, hk, j, e));
          given(0, hk, r, t) = static_cast<float>(dot);
        }
      }
    const attn::dims d{B, Hq, Hkv, s.Lq, s.Lk, s.D, Dv, scale};
    const skv::gathered_source<KV> src{k, v, keys, counts, Given ? mnemo::cview(given) : view<const float, 4>{}};
    const std::int64_t summed = s.Lq;
    const result got = run_engine(d, src, q, mods::none{}, s.Lk, summed, describe(s));
    // The reference: attention::reference of each row alone over its key set.
    struct key_mask {
      const std::vector<char>* keep;
      bool visible(std::int64_t, std::int64_t kp) const { return (*keep)[static_cast<std::size_t>(kp)] != 0; }
    };
    result want{tensor<float, 4>({B, Hq, s.Lq, Dv}), tensor<float, 3>({B, Hq, s.Lq}), tensor<float, 3>({B, Hq, s.Lk})};
    std::fill(want.sums.begin(), want.sums.end(), 0.0f);
    tensor<float, 3> row_sums({1, 1, s.Lk});
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < s.Lq; ++i) {
        const std::int64_t hk = h / s.G, r = (h % s.G) * s.Lq + i;
        std::vector<char> keep(static_cast<std::size_t>(s.Lk), 0);
        for (std::int64_t t = 0; t < counts(0, hk, r); ++t) keep[static_cast<std::size_t>(keys(0, hk, r, t))] = 1;
        attn::reference<KV, key_mask>(mnemo::cview(q).narrow(1, h, 1).narrow(2, i, 1),
                                      mnemo::cview(k).narrow(1, hk, 1), mnemo::cview(v).narrow(1, hk, 1),
                                      want.out.as_view().narrow(1, h, 1).narrow(2, i, 1),
                                      want.lse.as_view().narrow(1, h, 1).narrow(2, i, 1), key_mask{&keep}, {},
                                      attn::column_sums{row_sums.as_view(), 0});
        for (std::int64_t j = 0; j < s.Lk; ++j) want.sums(0, h, j) += row_sums(0, 0, j);
      }
    expect_close(got.out, want.out, atol, rtol, describe(s) + " out");
    expect_close(got.lse, want.lse, atol, rtol, describe(s) + " lse");
    expect_close(got.sums, want.sums, atol, rtol, describe(s) + " column sums");
  }
};

// Every source of the engine, named once.
using sources = ::testing::Types<strided_case<float>, strided_case<f16>, strided_case<bf16>,
                                 cache_case<kv::storage::f32>, cache_case<kv::storage::f16>,
                                 cache_case<kv::storage::bf16>, cache_case<kv::storage::int8>,
                                 cache_case<kv::storage::int4>, gathered_case<float, false>,
                                 gathered_case<f16, false>, gathered_case<float, true>>;

template <class Case>
class SplitKvSource : public ::testing::Test {};
TYPED_TEST_SUITE(SplitKvSource, sources);

TYPED_TEST(SplitKvSource, AgreesWithReferenceAndIsBitIdenticalForEveryThreadCount) {
  std::uint32_t seed = 1;
  for (const sizes& s : all_sizes()) {
    SCOPED_TRACE(describe(s));
    TypeParam::check(s, seed++);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// The concept admits the sources, and names what a source lacks.
static_assert(skv::kv_source<skv::strided_source<float>>);
static_assert(skv::kv_source<skv::gathered_source<f16>>);
static_assert(skv::kv_source<kv::kivi_source<4>>);
static_assert(!skv::kv_source<int>);

// The score pass stores haddp's sums by the compile-time table haddp_order; it must be the order
// xsimd's haddp really has at the level this run dispatches to ($MNEMO_ISA).
TEST(SplitKvEngine, HaddpOrderTableIsXsimdsOrder) {
  mnemo::simd::dispatch(mnemo::simd::level::automatic, [&]<class Arch>() {
    if constexpr (mnemo::simd::vectorized<Arch>) {
      const auto probed = skv::haddp_order_probed<Arch>();
      for (std::size_t l = 0; l < probed.size(); ++l) EXPECT_EQ(skv::haddp_order<Arch>[l], probed[l]) << "lane " << l;
    }
  });
}

}  // namespace
