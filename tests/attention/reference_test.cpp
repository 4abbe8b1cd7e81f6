// Tests for mnemo/attention/reference.hpp against a naive attention written here from the
// DESIGN.md conventions: an explicit dense boolean mask and bias matrix, built without the
// mods, then softmax in double. Plus f16/bf16 K/V, fully masked rows, huge logits, strided
// layouts, thread counts and every argument check.
#include "mnemo/attention/reference.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "mnemo/attention/mods.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/tensor.hpp"
#include "support/support.hpp"

namespace {

namespace attn = mnemo::attention;
namespace mods = mnemo::attention::mods;
using mnemo::shape_t;
using mnemo::tensor;
using mnemo::view;

constexpr double neg_inf = -std::numeric_limits<double>::infinity();

struct problem {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
};

std::string describe(const problem& p) {
  return "B=" + std::to_string(p.B) + " Hq=" + std::to_string(p.Hq) + " Hkv=" + std::to_string(p.Hkv) +
         " Lq=" + std::to_string(p.Lq) + " Lk=" + std::to_string(p.Lk) + " D=" + std::to_string(p.D) +
         " Dv=" + std::to_string(p.Dv);
}

// What the naive attention applies, in DESIGN.md's words (each field off by default).
struct mask_spec {
  bool causal = false;                // key j visible iff j <= diag(i) = i + Lk - Lq
  std::int64_t window = 0;            // > 0: diag(i) - window < j <= diag(i)
  std::int64_t prefix = -1;           // >= 0: j < prefix || j <= diag(i)
  std::vector<std::int64_t> doc_ids = {};  // non-empty: diag(i) >= 0 && doc[diag(i)] == doc[j]
  float softcap = 0;                  // > 0: s = c tanh(s / c)
  std::vector<float> slopes = {};          // non-empty: s -= slope[h] |diag(i) - j|
  bool alibi_before_softcap = false;  // the score mods' order (DESIGN.md: softcap first)
};

struct naive_result {
  std::vector<double> out;  // [B, Hq, Lq, Dv]
  std::vector<double> lse;  // [B, Hq, Lq]
};

// Dense attention from the definitions. q, k, v are contiguous [B, H, L, D] float arrays.
naive_result naive(const problem& p, const std::vector<float>& q, const std::vector<float>& k,
                   const std::vector<float>& v, double scale, const mask_spec& m) {
  // mask[i][j] and bias[h][i][j], built once from the spec.
  std::vector<char> mask(static_cast<std::size_t>(p.Lq * p.Lk), 1);
  std::vector<double> bias(static_cast<std::size_t>(p.Hq * p.Lq * p.Lk), 0.0);
  for (std::int64_t i = 0; i < p.Lq; ++i) {
    const std::int64_t diag = i + p.Lk - p.Lq;
    for (std::int64_t j = 0; j < p.Lk; ++j) {
      bool vis = true;
      if (m.causal) vis = vis && j <= diag;
      if (m.window > 0) vis = vis && j <= diag && j > diag - m.window;
      if (m.prefix >= 0) vis = vis && (j < m.prefix || j <= diag);
      if (!m.doc_ids.empty()) vis = vis && diag >= 0 && m.doc_ids[diag] == m.doc_ids[j];
      mask[i * p.Lk + j] = vis;
      if (!m.slopes.empty())
        for (std::int64_t h = 0; h < p.Hq; ++h)
          bias[(h * p.Lq + i) * p.Lk + j] = -static_cast<double>(m.slopes[h]) * std::abs(static_cast<double>(diag - j));
    }
  }
  naive_result r;
  r.out.assign(static_cast<std::size_t>(p.B * p.Hq * p.Lq * p.Dv), 0.0);
  r.lse.assign(static_cast<std::size_t>(p.B * p.Hq * p.Lq), neg_inf);
  const std::int64_t group = p.Hq / p.Hkv;
  std::vector<double> s(static_cast<std::size_t>(p.Lk));
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t h = 0; h < p.Hq; ++h) {
      const std::int64_t hk = h / group;
      for (std::int64_t i = 0; i < p.Lq; ++i) {
        const float* qi = &q[((b * p.Hq + h) * p.Lq + i) * p.D];
        double mx = neg_inf;
        for (std::int64_t j = 0; j < p.Lk; ++j) {
          const float* kj = &k[((b * p.Hkv + hk) * p.Lk + j) * p.D];
          double dot = 0;
          for (std::int64_t c = 0; c < p.D; ++c) dot += static_cast<double>(qi[c]) * kj[c];
          double sc = scale * dot;
          const double bj = bias[(h * p.Lq + i) * p.Lk + j];
          if (m.alibi_before_softcap) sc += bj;
          if (m.softcap > 0) sc = m.softcap * std::tanh(sc / m.softcap);
          if (!m.alibi_before_softcap) sc += bj;
          s[j] = sc;
          if (mask[i * p.Lk + j]) mx = std::max(mx, sc);
        }
        if (mx == neg_inf) continue;  // no visible key: out 0, lse -inf
        double sum = 0;
        std::vector<double> acc(static_cast<std::size_t>(p.Dv), 0.0);
        for (std::int64_t j = 0; j < p.Lk; ++j) {
          if (!mask[i * p.Lk + j]) continue;
          const double e = std::exp(s[j] - mx);
          sum += e;
          const float* vj = &v[((b * p.Hkv + hk) * p.Lk + j) * p.Dv];
          for (std::int64_t c = 0; c < p.Dv; ++c) acc[c] += e * vj[c];
        }
        const std::int64_t row = (b * p.Hq + h) * p.Lq + i;
        for (std::int64_t c = 0; c < p.Dv; ++c) r.out[row * p.Dv + c] = acc[c] / sum;
        r.lse[row] = mx + std::log(sum);
      }
    }
  return r;
}

std::vector<float> random_normal(std::int64_t n, std::mt19937& rng, float sigma = 1.0f) {
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (auto& e : x) e = dist(rng);
  return x;
}

template <class T, int R>
tensor<T, R> to_tensor(const std::vector<float>& x, shape_t<R> shape) {
  tensor<T, R> t(shape);
  for (std::int64_t i = 0; i < t.size(); ++i) t.data()[i] = mnemo::from_float<T>(x[static_cast<std::size_t>(i)]);
  return t;
}

// |got - want| <= atol + rtol |want| elementwise; -inf must match exactly; nothing NaN.
void expect_close(const float* got, const std::vector<double>& want, double atol, double rtol, const std::string& what) {
  int reported = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double g = got[i], w = want[i];
    bool ok;
    if (!std::isfinite(w)) ok = g == w;
    else ok = std::abs(g - w) <= atol + rtol * std::abs(w);
    if (!ok && reported++ < 5) ADD_FAILURE() << what << " at flat index " << i << ": got " << g << ", want " << w;
  }
}

struct inputs {
  std::vector<float> q, k, v;
};

inputs random_inputs(const problem& p, std::uint32_t seed) {
  std::mt19937 rng(seed);
  return {random_normal(p.B * p.Hq * p.Lq * p.D, rng), random_normal(p.B * p.Hkv * p.Lk * p.D, rng),
          random_normal(p.B * p.Hkv * p.Lk * p.Dv, rng)};
}

constexpr double out_atol = 1e-6, out_rtol = 1e-5;  // both sides accumulate in double, round once
constexpr double lse_atol = 1e-6, lse_rtol = 1e-6;

// Runs reference(mod) and naive(spec) on the same random inputs and compares out and lse.
template <class Mod>
void check(const problem& p, const mask_spec& spec, const Mod& mod, std::uint32_t seed, float scale = 0) {
  SCOPED_TRACE(describe(p));
  const auto in = random_inputs(p, seed);
  const auto q = to_tensor<float, 4>(in.q, {p.B, p.Hq, p.Lq, p.D});
  const auto k = to_tensor<float, 4>(in.k, {p.B, p.Hkv, p.Lk, p.D});
  const auto v = to_tensor<float, 4>(in.v, {p.B, p.Hkv, p.Lk, p.Dv});
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  attn::reference(q, k, v, out, lse, mod, {.scale = scale});
  const double s = scale != 0 ? static_cast<double>(scale) : 1.0 / std::sqrt(static_cast<double>(p.D));
  const auto want = naive(p, in.q, in.k, in.v, s, spec);
  expect_close(out.data(), want.out, out_atol, out_rtol, "out");
  expect_close(lse.data(), want.lse, lse_atol, lse_rtol, "lse");
}

// Random shapes over the awkward sizes: L in {1, 37, ...}, D in {40, 96, 256}, GQA 1/4/8,
// Lq != Lk both ways (Lq > Lk only when `lq_above_lk`).
std::vector<problem> random_problems(std::uint32_t seed, int count, bool lq_above_lk) {
  std::mt19937 rng(seed);
  const std::int64_t Ls[] = {1, 2, 5, 16, 37, 64};
  const std::int64_t Ds[] = {40, 96, 256};
  const std::int64_t ratios[] = {1, 4, 8};
  auto pick = [&](const auto& arr) { return arr[std::uniform_int_distribution<std::size_t>(0, std::size(arr) - 1)(rng)]; };
  std::vector<problem> out;
  while (static_cast<int>(out.size()) < count) {
    problem p{};
    p.B = pick(std::array<std::int64_t, 2>{1, 2});
    const std::int64_t ratio = pick(ratios);
    p.Hkv = ratio == 8 ? 1 : pick(std::array<std::int64_t, 2>{1, 2});
    p.Hq = p.Hkv * ratio;
    p.Lq = pick(Ls);
    p.Lk = pick(Ls);
    p.D = pick(Ds);
    p.Dv = pick(std::array<std::int64_t, 3>{p.D, 24, 40});
    if (!lq_above_lk && p.Lq > p.Lk) std::swap(p.Lq, p.Lk);
    out.push_back(p);
  }
  return out;
}

// Non-decreasing document ids [Lk]: segments of random length 1..max_len.
std::vector<std::int64_t> random_doc_ids(std::int64_t Lk, std::mt19937& rng, std::int64_t max_len) {
  std::vector<std::int64_t> ids(static_cast<std::size_t>(Lk));
  std::uniform_int_distribution<std::int64_t> len(1, max_len);
  std::int64_t doc = 0, left = len(rng);
  for (auto& id : ids) {
    if (left-- == 0) {
      ++doc;
      left = len(rng) - 1;
    }
    id = doc;
  }
  return ids;
}

std::vector<float> random_slopes(std::int64_t Hq, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(0.01f, 0.5f);
  std::vector<float> s(static_cast<std::size_t>(Hq));
  for (auto& x : s) x = u(rng);
  return s;
}

constexpr int shapes_per_mod = 8;

// The seeds below (1..8, with the Lq > Lk flag each test uses) must reach every awkward size.
TEST(Reference, RandomShapesCoverTheAwkwardSizes) {
  std::vector<problem> all;
  for (std::uint32_t seed = 1; seed <= 8; ++seed) {
    const bool lq_above_lk = seed != 6 && seed != 8;  // Document and Compositions keep Lq <= Lk
    for (const auto& p : random_problems(seed, shapes_per_mod, lq_above_lk)) all.push_back(p);
  }
  auto any = [&](auto pred) { return std::any_of(all.begin(), all.end(), pred); };
  for (std::int64_t D : {40, 96, 256}) EXPECT_TRUE(any([&](const problem& p) { return p.D == D; })) << D;
  for (std::int64_t r : {1, 4, 8}) EXPECT_TRUE(any([&](const problem& p) { return p.Hq / p.Hkv == r; })) << r;
  for (std::int64_t L : {1, 37}) EXPECT_TRUE(any([&](const problem& p) { return p.Lq == L || p.Lk == L; })) << L;
  EXPECT_TRUE(any([](const problem& p) { return p.Lq > p.Lk; }));
  EXPECT_TRUE(any([](const problem& p) { return p.Lq < p.Lk; }));
  EXPECT_TRUE(any([](const problem& p) { return p.Dv != p.D; }));
  EXPECT_TRUE(any([](const problem& p) { return p.B > 1; }));
}

TEST(Reference, NoMask) {
  for (const auto& p : random_problems(1, shapes_per_mod, true)) check(p, {}, mods::none{}, 11);
}

TEST(Reference, Causal) {
  for (const auto& p : random_problems(2, shapes_per_mod, true)) check(p, {.causal = true}, mods::causal{}, 12);
}

TEST(Reference, SlidingWindow) {
  std::int64_t n = 0;
  for (const auto& p : random_problems(3, shapes_per_mod, true))
    for (std::int64_t w : {std::int64_t{1}, std::int64_t{7}, p.Lk + 3}) {
      check(p, {.window = w}, mods::sliding_window{w}, static_cast<std::uint32_t>(13 + n++));
    }
}

TEST(Reference, Alibi) {
  std::mt19937 rng(4);
  for (const auto& p : random_problems(4, shapes_per_mod, true)) {
    const auto slopes = random_slopes(p.Hq, rng);
    check(p, {.slopes = slopes}, mods::alibi{view<const float, 1>(slopes.data(), {p.Hq})}, 14);
    const auto standard = mods::alibi_slopes(p.Hq);
    check(p, {.causal = true, .slopes = standard},
          mods::all_of(mods::alibi{view<const float, 1>(standard.data(), {p.Hq})}, mods::causal{}), 15);
  }
}

TEST(Reference, Softcap) {
  for (const auto& p : random_problems(5, shapes_per_mod, true)) {
    check(p, {.softcap = 0.5f}, mods::softcap{0.5f}, 16);  // a cap well below the scores
    check(p, {.softcap = 30.0f}, mods::softcap{30.0f}, 17, 2.0f);
  }
}

TEST(Reference, Document) {
  std::mt19937 rng(6);
  for (const auto& p : random_problems(6, shapes_per_mod, false)) {
    for (std::int64_t max_len : {1, 4, 100}) {
      const auto ids = random_doc_ids(p.Lk, rng, max_len);
      const mods::document doc{view<const std::int64_t, 1>(ids.data(), {p.Lk})};
      check(p, {.doc_ids = ids}, doc, 18);
      check(p, {.causal = true, .doc_ids = ids}, mods::all_of(doc, mods::causal{}), 19);
    }
  }
}

TEST(Reference, PrefixLm) {
  for (const auto& p : random_problems(7, shapes_per_mod, true))
    for (std::int64_t prefix : {std::int64_t{0}, std::int64_t{3}, p.Lk / 2, p.Lk + 1})
      check(p, {.prefix = prefix}, mods::prefix_lm{prefix}, 20);
}

TEST(Reference, Compositions) {
  std::mt19937 rng(8);
  for (const auto& p : random_problems(8, shapes_per_mod, false)) {
    const auto slopes = random_slopes(p.Hq, rng);
    const mods::alibi al{view<const float, 1>(slopes.data(), {p.Hq})};
    // The golden cases' pipeline: softcap, then ALiBi, then a window (which is causal).
    check(p, {.window = 5, .softcap = 1.5f, .slopes = slopes},
          mods::all_of(mods::softcap{1.5f}, al, mods::sliding_window{5}), 21);
    check(p, {.causal = true, .softcap = 1.5f, .slopes = slopes}, mods::all_of(mods::softcap{1.5f}, al, mods::causal{}),
          22);
    // Score mods apply in composition order: ALiBi first gives a different (also checked) result.
    check(p, {.softcap = 1.5f, .slopes = slopes, .alibi_before_softcap = true},
          mods::all_of(al, mods::softcap{1.5f}), 23);
    const auto ids = random_doc_ids(p.Lk, rng, 6);
    const mods::document doc{view<const std::int64_t, 1>(ids.data(), {p.Lk})};
    check(p, {.window = 4, .doc_ids = ids, .softcap = 2.0f, .slopes = slopes},
          mods::all_of(doc, mods::sliding_window{4}, mods::softcap{2.0f}, al), 24);
    check(p, {.causal = true, .prefix = 3}, mods::all_of(mods::prefix_lm{3}, mods::causal{}), 25);
    check(p, {.window = 3, .prefix = 2}, mods::all_of(mods::all_of(mods::prefix_lm{2}), mods::sliding_window{3}), 26);
  }
}

TEST(Reference, LongSequences) {
  // L = 1000 where it stays cheap: one head, or one query row.
  check({1, 1, 1, 1000, 1000, 40, 40}, {.causal = true}, mods::causal{}, 27);
  check({1, 8, 1, 1, 1000, 96, 96}, {.window = 300}, mods::sliding_window{300}, 28);
  check({1, 4, 1, 37, 1000, 40, 24}, {.causal = true}, mods::causal{}, 29);
}

// f16/bf16 K/V give exactly what the float path gives on the rounded values (both read every
// element as float and accumulate in the same double order).
template <class KV>
void check_half_kv(std::uint32_t seed) {
  for (const auto& p : random_problems(seed, 4, true)) {
    SCOPED_TRACE(describe(p) + " " + mnemo::dtype_name<KV>());
    const auto in = random_inputs(p, seed);
    const auto q = to_tensor<float, 4>(in.q, {p.B, p.Hq, p.Lq, p.D});
    const auto k16 = to_tensor<KV, 4>(in.k, {p.B, p.Hkv, p.Lk, p.D});
    const auto v16 = to_tensor<KV, 4>(in.v, {p.B, p.Hkv, p.Lk, p.Dv});
    std::vector<float> kr(in.k.size()), vr(in.v.size());
    for (std::size_t i = 0; i < kr.size(); ++i) kr[i] = mnemo::to_float(k16.data()[i]);
    for (std::size_t i = 0; i < vr.size(); ++i) vr[i] = mnemo::to_float(v16.data()[i]);
    const auto kf = to_tensor<float, 4>(kr, k16.shape());
    const auto vf = to_tensor<float, 4>(vr, v16.shape());

    const auto mod = mods::all_of(mods::softcap{3.0f}, mods::causal{});
    tensor<float, 4> out16({p.B, p.Hq, p.Lq, p.Dv}), outf({p.B, p.Hq, p.Lq, p.Dv});
    tensor<float, 3> lse16({p.B, p.Hq, p.Lq}), lsef({p.B, p.Hq, p.Lq});
    attn::reference(q, k16, v16, out16, lse16, mod);
    attn::reference(q, kf, vf, outf, lsef, mod);
    for (std::int64_t i = 0; i < outf.size(); ++i) ASSERT_EQ(out16.data()[i], outf.data()[i]) << i;
    for (std::int64_t i = 0; i < lsef.size(); ++i) ASSERT_EQ(lse16.data()[i], lsef.data()[i]) << i;

    const auto want = naive(p, in.q, kr, vr, 1.0 / std::sqrt(static_cast<double>(p.D)), {.causal = true, .softcap = 3.0f});
    expect_close(out16.data(), want.out, out_atol, out_rtol, "out");
    expect_close(lse16.data(), want.lse, lse_atol, lse_rtol, "lse");
  }
}

TEST(Reference, F16KeysAndValues) { check_half_kv<mnemo::f16>(30); }
TEST(Reference, BF16KeysAndValues) { check_half_kv<mnemo::bf16>(31); }

TEST(Reference, FullyMaskedRowsGiveZeroAndMinusInf) {
  // Lq > Lk: the first Lq - Lk rows sit before key 0 (bottom-right alignment).
  const problem p{2, 4, 2, 20, 7, 40, 24};
  const auto in = random_inputs(p, 32);
  const auto q = to_tensor<float, 4>(in.q, {p.B, p.Hq, p.Lq, p.D});
  const auto k = to_tensor<float, 4>(in.k, {p.B, p.Hkv, p.Lk, p.D});
  const auto v = to_tensor<float, 4>(in.v, {p.B, p.Hkv, p.Lk, p.Dv});
  auto run = [&](const auto& mod, std::int64_t masked_rows) {
    tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
    tensor<float, 3> lse({p.B, p.Hq, p.Lq});
    for (auto& x : out) x = std::numeric_limits<float>::quiet_NaN();  // must be overwritten
    for (auto& x : lse) x = std::numeric_limits<float>::quiet_NaN();
    attn::reference(q, k, v, out, lse, mod);
    for (std::int64_t b = 0; b < p.B; ++b)
      for (std::int64_t h = 0; h < p.Hq; ++h)
        for (std::int64_t i = 0; i < p.Lq; ++i) {
          const bool masked = i < masked_rows;
          if (masked) {
            EXPECT_EQ(lse(b, h, i), -std::numeric_limits<float>::infinity()) << i;
          } else {
            EXPECT_TRUE(std::isfinite(lse(b, h, i))) << i;
          }
          for (std::int64_t c = 0; c < p.Dv; ++c) {
            ASSERT_FALSE(std::isnan(out(b, h, i, c)));
            if (masked) {
              ASSERT_EQ(out(b, h, i, c), 0.0f);
            }
          }
        }
  };
  run(mods::causal{}, p.Lq - p.Lk);
  run(mods::sliding_window{3}, p.Lq - p.Lk);
  run(mods::all_of(mods::softcap{2.0f}, mods::prefix_lm{0}), p.Lq - p.Lk);
  run(mods::all_of(mods::alibi{view<const float, 1>(mods::alibi_slopes(4).data(), {4})}, mods::causal{}),
      p.Lq - p.Lk);
  check(p, {.causal = true}, mods::causal{}, 32);
  check(p, {.window = 2}, mods::sliding_window{2}, 33);

  // Without lse, out is the same.
  tensor<float, 4> out1({p.B, p.Hq, p.Lq, p.Dv}), out2({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  attn::reference(q, k, v, out1, lse, mods::causal{});
  attn::reference(q, k, v, out2, {}, mods::causal{});
  for (std::int64_t i = 0; i < out1.size(); ++i) ASSERT_EQ(out1.data()[i], out2.data()[i]);
}

TEST(Reference, HugeLogitsDoNotOverflow) {
  // Scores of +-1e4: exp() overflows (or underflows to a 0/0) unless rows are shifted by their max.
  const problem p{1, 2, 1, 16, 24, 40, 40};
  std::mt19937 rng(34);
  auto in = random_inputs(p, 34);
  constexpr float logit = 1e4f;
  // Spread: scores in roughly +-1e4, nearly one-hot rows.
  const float spread_scale = logit / std::sqrt(static_cast<float>(p.D));
  for (const float sign : {1.0f, -1.0f}) {
    // Offset: channel 0 carries a common +-1e4 to every score, the rest O(1).
    auto off = in;
    const float c = std::sqrt(logit * std::sqrt(static_cast<float>(p.D)));
    for (std::int64_t r = 0; r < p.B * p.Hq * p.Lq; ++r) off.q[r * p.D] = c;
    for (std::int64_t r = 0; r < p.B * p.Hkv * p.Lk; ++r) off.k[r * p.D] = sign * c;
    const auto q = to_tensor<float, 4>(off.q, {p.B, p.Hq, p.Lq, p.D});
    const auto k = to_tensor<float, 4>(off.k, {p.B, p.Hkv, p.Lk, p.D});
    const auto v = to_tensor<float, 4>(off.v, {p.B, p.Hkv, p.Lk, p.Dv});
    tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
    tensor<float, 3> lse({p.B, p.Hq, p.Lq});
    attn::reference(q, k, v, out, lse, mods::causal{});
    const auto want = naive(p, off.q, off.k, off.v, 1.0 / std::sqrt(static_cast<double>(p.D)), {.causal = true});
    for (float x : out) ASSERT_TRUE(std::isfinite(x));
    for (float x : lse) ASSERT_TRUE(std::isfinite(x));
    for (float x : lse) ASSERT_GT(std::abs(x), 0.5 * logit);
    expect_close(out.data(), want.out, out_atol, out_rtol, "offset out");
    expect_close(lse.data(), want.lse, lse_atol, lse_rtol, "offset lse");
  }
  const auto q = to_tensor<float, 4>(in.q, {p.B, p.Hq, p.Lq, p.D});
  const auto k = to_tensor<float, 4>(in.k, {p.B, p.Hkv, p.Lk, p.D});
  const auto v = to_tensor<float, 4>(in.v, {p.B, p.Hkv, p.Lk, p.Dv});
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  attn::reference(q, k, v, out, lse, mods::none{}, {.scale = spread_scale});
  for (float x : out) ASSERT_TRUE(std::isfinite(x));
  for (float x : lse) ASSERT_TRUE(std::isfinite(x));
  const auto want = naive(p, in.q, in.k, in.v, spread_scale, {});
  expect_close(out.data(), want.out, out_atol, out_rtol, "spread out");
  expect_close(lse.data(), want.lse, lse_atol, lse_rtol, "spread lse");
}

TEST(Reference, BLHDLayoutThroughStridesAndNoWritesOutside) {
  // q, k, v and out in [B, L, H, D] buffers, used as [B, H, L, D] by permute; out lives inside a
  // larger buffer whose other elements must stay untouched.
  const problem p{2, 4, 2, 9, 13, 40, 24};
  const auto in = random_inputs(p, 35);
  const auto q = to_tensor<float, 4>(in.q, {p.B, p.Hq, p.Lq, p.D});
  const auto k = to_tensor<float, 4>(in.k, {p.B, p.Hkv, p.Lk, p.D});
  const auto v = to_tensor<float, 4>(in.v, {p.B, p.Hkv, p.Lk, p.Dv});
  auto to_blhd = [](const tensor<float, 4>& t) {
    tensor<float, 4> r({t.extent(0), t.extent(2), t.extent(1), t.extent(3)});
    for (std::int64_t a = 0; a < t.extent(0); ++a)
      for (std::int64_t h = 0; h < t.extent(1); ++h)
        for (std::int64_t l = 0; l < t.extent(2); ++l)
          for (std::int64_t d = 0; d < t.extent(3); ++d) r(a, l, h, d) = t(a, h, l, d);
    return r;
  };
  auto qb = to_blhd(q), kb = to_blhd(k), vb = to_blhd(v);
  constexpr std::int64_t pad = 5;  // out rows padded to Dv + pad; the pads hold a sentinel
  constexpr float sentinel = 12345.0f;
  tensor<float, 4> out_buf({p.B, p.Lq, p.Hq, p.Dv + pad});
  for (auto& x : out_buf) x = sentinel;
  const view<float, 4> out_bhld = out_buf.as_view().narrow(3, 2, p.Dv).permute({0, 2, 1, 3});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  const auto mod = mods::all_of(mods::softcap{4.0f}, mods::sliding_window{6});
  attn::reference(view<const float, 4>(qb.as_view().permute({0, 2, 1, 3})),
                  view<const float, 4>(kb.as_view().permute({0, 2, 1, 3})),
                  view<const float, 4>(vb.as_view().permute({0, 2, 1, 3})), out_bhld, view<float, 3>(lse), mod);

  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse_c({p.B, p.Hq, p.Lq});
  attn::reference(q, k, v, out, lse_c, mod);
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t l = 0; l < p.Lq; ++l)
      for (std::int64_t h = 0; h < p.Hq; ++h)
        for (std::int64_t c = 0; c < p.Dv + pad; ++c) {
          const bool inside = c >= 2 && c < 2 + p.Dv;
          if (inside) {
            ASSERT_EQ(out_buf(b, l, h, c), out(b, h, l, c - 2));
          } else {
            ASSERT_EQ(out_buf(b, l, h, c), sentinel) << "wrote outside out";
          }
        }
  for (std::int64_t i = 0; i < lse.size(); ++i) ASSERT_EQ(lse.data()[i], lse_c.data()[i]);
}

TEST(Reference, ThreadCountDoesNotChangeResults) {
  const problem p{2, 8, 2, 37, 37, 40, 40};
  const auto in = random_inputs(p, 36);
  const auto q = to_tensor<float, 4>(in.q, {p.B, p.Hq, p.Lq, p.D});
  const auto k = to_tensor<float, 4>(in.k, {p.B, p.Hkv, p.Lk, p.D});
  const auto v = to_tensor<float, 4>(in.v, {p.B, p.Hkv, p.Lk, p.Dv});
  tensor<float, 4> o1({p.B, p.Hq, p.Lq, p.Dv}), o2 = o1, o0 = o1;
  tensor<float, 3> l1({p.B, p.Hq, p.Lq}), l2 = l1, l0 = l1;
  attn::reference(q, k, v, o1, l1, mods::causal{}, {.threads = 1});
  attn::reference(q, k, v, o2, l2, mods::causal{}, {.threads = 2});
  attn::reference(q, k, v, o0, l0, mods::causal{}, {.threads = 0});
  for (std::int64_t i = 0; i < o1.size(); ++i) {
    ASSERT_EQ(o1.data()[i], o2.data()[i]);
    ASSERT_EQ(o1.data()[i], o0.data()[i]);
  }
  for (std::int64_t i = 0; i < l1.size(); ++i) {
    ASSERT_EQ(l1.data()[i], l2.data()[i]);
    ASSERT_EQ(l1.data()[i], l0.data()[i]);
  }
}

// ---- bad input: each check throws mnemo::error naming the argument and both values ----------

using mnemo::test::expect_error;

struct bad_input : ::testing::Test {
  // A valid call: B=1, Hq=4, Hkv=2, Lq=3, Lk=5, D=8, Dv=6.
  tensor<float, 4> q{{1, 4, 3, 8}}, k{{1, 2, 5, 8}}, v{{1, 2, 5, 6}}, out{{1, 4, 3, 6}};
  tensor<float, 3> lse{{1, 4, 3}};
  std::vector<float> slopes = std::vector<float>(4, 0.5f);
  std::vector<std::int64_t> ids{0, 0, 1, 1, 2};

  template <class Mod = mods::none>
  void call(const tensor<float, 4>& q_, const tensor<float, 4>& k_, const tensor<float, 4>& v_, tensor<float, 4>& o_,
            view<float, 3> l_, const Mod& mod = {}, attn::options opt = {}) {
    attn::reference(q_, k_, v_, o_, l_, mod, opt);
  }
};

TEST_F(bad_input, ValidCallRuns) {
  for (auto& x : out) x = -7.0f;
  call(q, k, v, out, lse);
  for (float x : out) EXPECT_EQ(x, 0.0f);  // all-zero values: out is their average, 0
}

TEST_F(bad_input, ShapeMismatches) {
  for (auto& x : out) x = -7.0f;
  tensor<float, 4> k_d({1, 2, 5, 7}), k_b({2, 2, 5, 8}), v_lk({1, 2, 4, 6}), v_h({1, 1, 5, 6});
  expect_error([&] { call(q, k_d, v, out, lse); }, {"attention::reference", "k must have shape [1, 2, 5, 8]", "got [1, 2, 5, 7]"});
  expect_error([&] { call(q, k_b, v, out, lse); }, {"k must have shape [1, 2, 5, 8]", "got [2, 2, 5, 8]"});
  expect_error([&] { call(q, k, v_lk, out, lse); }, {"v must have shape [1, 2, 5, 6]", "got [1, 2, 4, 6]"});
  expect_error([&] { call(q, k, v_h, out, lse); }, {"v must have shape [1, 2, 5, 6]", "got [1, 1, 5, 6]"});
  tensor<float, 4> out_dv({1, 4, 3, 5}), out_lq({1, 4, 2, 6}), out_h({1, 2, 3, 6});
  expect_error([&] { call(q, k, v, out_dv, lse); }, {"out must have shape [1, 4, 3, 6]", "got [1, 4, 3, 5]"});
  expect_error([&] { call(q, k, v, out_lq, lse); }, {"out must have shape [1, 4, 3, 6]", "got [1, 4, 2, 6]"});
  expect_error([&] { call(q, k, v, out_h, lse); }, {"out must have shape [1, 4, 3, 6]", "got [1, 2, 3, 6]"});
  tensor<float, 3> lse_h({1, 2, 3}), lse_lq({1, 4, 4});
  expect_error([&] { call(q, k, v, out, lse_h); }, {"lse must have shape [1, 4, 3]", "got [1, 2, 3]"});
  expect_error([&] { call(q, k, v, out, lse_lq); }, {"lse must have shape [1, 4, 3]", "got [1, 4, 4]"});
  for (float x : out) EXPECT_EQ(x, -7.0f) << "a rejected call wrote to out";
}

TEST_F(bad_input, HeadCounts) {
  tensor<float, 4> k3({1, 3, 5, 8}), v3({1, 3, 5, 6});
  expect_error([&] { call(q, k3, v3, out, lse); }, {"Hq", "Hkv", "multiple", "Hq=4", "Hkv=3"});
  // Zero extents: over real memory or as zero-size tensors (no data), the same rule.
  const std::vector<float> buf(1);
  const view<const float, 4> k0(buf.data(), {1, 0, 5, 8}), v0(buf.data(), {1, 0, 5, 6});
  expect_error([&] { attn::reference(q, k0, v0, out, lse); }, {"head counts", "Hkv=0"});
  expect_error([&] { attn::reference(q, tensor<float, 4>({1, 0, 5, 8}), tensor<float, 4>({1, 0, 5, 6}), out, lse); },
               {"head counts", "k.shape[1] (Hkv)", "Hkv=0"});
  const view<const float, 4> qd(buf.data(), {1, 4, 3, 0}), kd(buf.data(), {1, 2, 5, 0});
  expect_error([&] { attn::reference(qd, kd, view<const float, 4>(v), out, lse); }, {"head dims", "D=0"});
}

TEST_F(bad_input, EmptyViewsAndOptions) {
  // A default-constructed view is a zero-size view: the shape checks name it.
  expect_error([&] { attn::reference(view<const float, 4>{}, k, v, out.as_view()); },
               {"attention::reference", "q.shape[3] (D)", "D=0"});
  expect_error([&] { attn::reference(q, k, v, view<float, 4>{}); }, {"out must have shape [1, 4, 3, 6]", "got [0, 0, 0, 0]"});
  expect_error([&] { attn::reference(view<const float, 4>(nullptr, {1, 4, 3, 8}), k, v, out.as_view()); },
               {"attention::reference: q [B, Hq, Lq, D] must be a view of memory, got a null view of shape [1, 4, 3, 8]"});
  expect_error([&] { call(q, k, v, out, lse, mods::none{}, {.scale = std::numeric_limits<float>::quiet_NaN()}); },
               {"options.scale", "finite", "nan"});
  expect_error([&] { call(q, k, v, out, lse, mods::none{}, {.scale = std::numeric_limits<float>::infinity()}); },
               {"options.scale", "inf"});
  expect_error([&] { call(q, k, v, out, lse, mods::none{}, {.threads = -1}); }, {"options.threads", ">= 0", "got -1"});
}

TEST_F(bad_input, ModArguments) {
  const view<const float, 1> three(slopes.data(), {3});
  expect_error([&] { call(q, k, v, out, lse, mods::alibi{three}); }, {"alibi.slopes", "[Hq] = [4]", "got [3]"});
  expect_error([&] { call(q, k, v, out, lse, mods::alibi{}); }, {"alibi.slopes", "[Hq] = [4]"});
  expect_error([&] { call(q, k, v, out, lse, mods::all_of(mods::causal{}, mods::alibi{three})); },
               {"alibi.slopes", "[Hq] = [4]", "got [3]"});
  expect_error([&] { call(q, k, v, out, lse, mods::sliding_window{0}); }, {"sliding_window.size", "> 0", "got 0"});
  expect_error([&] { call(q, k, v, out, lse, mods::sliding_window{-2}); }, {"sliding_window.size", "> 0", "got -2"});
  expect_error([&] { call(q, k, v, out, lse, mods::softcap{0.0f}); }, {"softcap.cap", "> 0", "got 0"});
  expect_error([&] { call(q, k, v, out, lse, mods::softcap{-1.0f}); }, {"softcap.cap", "> 0", "got -1"});
  expect_error([&] { call(q, k, v, out, lse, mods::softcap{std::numeric_limits<float>::infinity()}); },
               {"softcap.cap", "finite", "got inf"});
  expect_error([&] { call(q, k, v, out, lse, mods::prefix_lm{-1}); }, {"prefix_lm.prefix", ">= 0", "got -1"});

  std::vector<std::int64_t> unsorted{0, 0, 3, 1, 4};
  expect_error([&] { call(q, k, v, out, lse, mods::document{view<const std::int64_t, 1>(unsorted.data(), {5})}); },
               {"document.ids", "non-decreasing", "ids[2]=3", "ids[3]=1"});
  expect_error([&] { call(q, k, v, out, lse, mods::document{view<const std::int64_t, 1>(ids.data(), {4})}); },
               {"document.ids", "[Lk] = [5]", "got [4]"});
  // Lq > Lk: queries would have no position on the key axis.
  tensor<float, 4> q6({1, 4, 6, 8}), out6({1, 4, 6, 6});
  expect_error([&] { call(q6, k, v, out6, {}, mods::document{view<const std::int64_t, 1>(ids.data(), {5})}); },
               {"document", "Lq <= Lk", "Lq=6", "Lk=5"});
  call(q, k, v, out, lse, mods::document{view<const std::int64_t, 1>(ids.data(), {5})});  // the valid one runs
}

}  // namespace
