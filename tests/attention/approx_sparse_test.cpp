// Tests for the sparse approximations of attention/approx/: Routing (routing.hpp), ProbSparse
// (probsparse.hpp), SPARSEK (sparsek.hpp), Combiner (combiner.hpp). Each fast path against its own
// double reference (tight: the same approximation), on awkward shapes (L = 1, Lq != Lk, GQA,
// causal, rows that see nothing); each exactness limit against attention::reference (Routing with
// one cluster, ProbSparse with u = Lq, SPARSEK with k >= Lk and with sharp scores, Combiner with
// one block or constant blocks); the SparseK operator's fast threshold against the sort-based one;
// the k-means state (deterministic init, unit centroids, the update); every argument check. The
// error of each approximation against exact attention is printed (not asserted: it depends on
// the data).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "mnemo/attention/approx/combiner.hpp"
#include "mnemo/attention/approx/probsparse.hpp"
#include "mnemo/attention/approx/routing.hpp"
#include "mnemo/attention/approx/sparsek.hpp"
#include "mnemo/attention/reference.hpp"
#include "support/support.hpp"

namespace mnemo::attention::approx {
namespace {

using test::expect_close;
using test::expect_error;
using test::random_tensor;

constexpr double atol = 2e-5, rtol = 2e-4;  // f32 flash against the double reference

struct shape {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
};

const std::vector<shape> shapes = {
    {1, 2, 2, 1, 1, 16, 16},      // L = 1
    {1, 4, 1, 1, 300, 32, 24},    // decode, MQA
    {2, 4, 2, 37, 37, 40, 40},    // GQA 2, odd L
    {1, 2, 2, 20, 129, 16, 8},    // Lq < Lk, Dv != D
    {1, 2, 1, 70, 70, 64, 64},    // a flash tile and a bit
    {2, 2, 2, 30, 20, 16, 16},    // Lq > Lk: causal rows 0..9 see no key (not for Combiner)
};

struct data {
  tensor<float, 4> q, k, v;
  explicit data(const shape& s, std::uint32_t seed, float q_range = 1.0f)
      : q(random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.D}, seed, -q_range, q_range)),
        k(random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.D}, seed + 1)),
        v(random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, seed + 2)) {}
};

// sqrt(sum (a - b)^2 / sum b^2): the error reported against exact attention.
template <class A, class B>
double rel_error(const A& a, const B& b) {
  double e = 0, r = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) {
    e += (a.data()[i] - b.data()[i]) * double(a.data()[i] - b.data()[i]);
    r += double(b.data()[i]) * b.data()[i];
  }
  return r > 0 ? std::sqrt(e / r) : 0.0;
}

tensor<float, 4> exact(const data& x, bool causal) {
  tensor<float, 4> out({x.q.extent(0), x.q.extent(1), x.q.extent(2), x.v.extent(3)});
  if (causal) attention::reference(cview(x.q), x.k, x.v, out.as_view(), {}, mods::causal{});
  else attention::reference(cview(x.q), x.k, x.v, out.as_view());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Routing.

TEST(ApproxRouting, InitIsDeterministicAndUnit) {
  const routing_state a = routing_init(2, 5, 24, 7), b = routing_init(2, 5, 24, 7), c = routing_init(2, 5, 24, 8);
  EXPECT_TRUE(std::equal(a.centroids.begin(), a.centroids.end(), b.centroids.begin()));
  EXPECT_FALSE(std::equal(a.centroids.begin(), a.centroids.end(), c.centroids.begin()));
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t cl = 0; cl < 5; ++cl) {
      double n2 = 0;
      for (std::int64_t e = 0; e < 24; ++e) n2 += double(a.centroids(h, cl, e)) * a.centroids(h, cl, e);
      EXPECT_NEAR(n2, 1.0, 1e-6);
    }
}

TEST(ApproxRouting, AssignIsTheArgmax) {
  const routing_state st = routing_init(2, 7, 16, 3);
  const auto x = random_tensor<float, 4>({2, 4, 50, 16}, 11);
  tensor<std::int64_t, 3> cl({2, 4, 50});
  routing_assign(st, cview(x), cl.as_view());
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 4; ++h)
      for (std::int64_t i = 0; i < 50; ++i) {
        std::int64_t best = 0;
        double top = -1e300;
        for (std::int64_t c = 0; c < 7; ++c) {
          double s = 0;
          for (std::int64_t e = 0; e < 16; ++e) s += double(x(b, h, i, e)) * st.centroids(h / 2, c, e);
          if (s > top) top = s, best = c;
        }
        EXPECT_EQ(cl(b, h, i), best);
      }
}

TEST(ApproxRouting, UpdateMovesCentroidsToTheirMembers) {
  // decay 0: each centroid becomes the normalised sum of its unit members (the EMA's fixed point
  // of one step); decay 1: nothing moves. Centroids stay unit.
  routing_state st = routing_init(1, 3, 8, 5);
  const routing_state before = st;
  const auto q = random_tensor<float, 4>({1, 2, 20, 8}, 21), k = random_tensor<float, 4>({1, 1, 30, 8}, 22);
  routing_update(st, cview(q), cview(k), 1.0f);
  for (std::int64_t i = 0; i < st.centroids.size(); ++i)
    EXPECT_NEAR(st.centroids.data()[i], before.centroids.data()[i], 1e-7);  // renormalised: a rounding
  tensor<std::int64_t, 3> cq({1, 2, 20}), ck({1, 1, 30});
  routing_assign(st, cview(q), cq.as_view());
  routing_assign(st, cview(k), ck.as_view());
  routing_update(st, cview(q), cview(k), 0.0f);
  for (std::int64_t c = 0; c < 3; ++c) {
    std::vector<double> sum(8, 0.0);
    bool any = false;
    auto add = [&](const float* x) {
      double n = 0;
      for (int e = 0; e < 8; ++e) n += double(x[e]) * x[e];
      for (int e = 0; e < 8; ++e) sum[e] += x[e] / std::sqrt(n);
      any = true;
    };
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t i = 0; i < 20; ++i)
        if (cq(0, h, i) == c) add(&q(0, h, i, 0));
    for (std::int64_t j = 0; j < 30; ++j)
      if (ck(0, 0, j) == c) add(&k(0, 0, j, 0));
    double n = 0;
    for (double s : sum) n += s * s;
    for (int e = 0; e < 8; ++e)
      EXPECT_NEAR(st.centroids(0, c, e), any ? sum[e] / std::sqrt(n) : before.centroids(0, c, e), 1e-6);
  }
}

TEST(ApproxRouting, FastMatchesReference) {
  for (const shape& s : shapes)
    for (bool causal : {false, true})
      for (std::int64_t C : {1, 3, 8}) {
        const data x(s, 100 + static_cast<std::uint32_t>(C));
        const routing_state st = routing_init(s.Hkv, C, s.D, 9);
        tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv}), want(got.shape());
        tensor<float, 3> lg({s.B, s.Hq, s.Lq}), lw(lg.shape());
        routing_attention(cview(x.q), cview(x.k), cview(x.v), st, causal, got.as_view(), lg.as_view());
        reference_routing_attention(cview(x.q), cview(x.k), cview(x.v), st, causal, want.as_view(), lw.as_view());
        expect_close(got, want, atol, rtol, "routing out");
        expect_close(lg, lw, atol, rtol, "routing lse");
        if (C == 1) expect_close(got, exact(x, causal), atol, rtol, "routing, one cluster = exact attention");
        else if (s.Lq > 30)
          std::printf("routing C=%lld causal=%d Lq=%lld Lk=%lld: error vs exact %.3f\n", (long long)C, causal,
                      (long long)s.Lq, (long long)s.Lk, rel_error(got, exact(x, causal)));
      }
}

TEST(ApproxRouting, Errors) {
  const shape s{1, 4, 2, 8, 8, 16, 16};
  const data x(s, 1);
  tensor<float, 4> out({1, 4, 8, 16});
  const routing_state bad = routing_init(3, 4, 16, 1);
  expect_error([&] { routing_attention(cview(x.q), cview(x.k), cview(x.v), bad, false, out.as_view()); },
               {"approx::routing_attention", "state.centroids", "[2, C, 16]", "[3, 4, 16]"});
  expect_error([&] { (void)routing_init(1, 0, 16, 1); }, {"approx::routing_init", "C=0"});
  routing_state st = routing_init(2, 4, 16, 1);
  expect_error([&] { routing_update(st, cview(x.q), cview(x.k), 1.5f); }, {"approx::routing_update", "decay", "1.5"});
  const float sink[4] = {0, 0, 0, 0};
  options o;
  o.sinks = view<const float, 1>(sink, {4});
  expect_error([&] { routing_attention(cview(x.q), cview(x.k), cview(x.v), st, false, out.as_view(), {}, o); },
               {"approx::routing_attention", "sinks"});
}

// ---------------------------------------------------------------------------------------------
// ProbSparse.

TEST(ApproxProbSparse, RowsAndDraws) {
  EXPECT_EQ(probsparse_rows(1, {}), 1);
  EXPECT_EQ(probsparse_rows(96, {}), 25);  // 5 * ceil(ln 96) = 5 * 5
  EXPECT_EQ(probsparse_rows(10, {}), 10);  // clamped to Lq
  EXPECT_EQ(probsparse_draws(4096, {}), 45);
  probsparse_options p;
  p.top_u = 3;
  EXPECT_EQ(probsparse_rows(96, p), 3);
}

TEST(ApproxProbSparse, FastMatchesReference) {
  for (const shape& s : shapes)
    for (bool causal : {false, true})
      for (bool exact_measure : {false, true})
        for (std::int64_t top_u : {0, 2}) {
          const data x(s, 300, 3.0f);  // wider queries: peaked rows, measures far apart
          probsparse_options p;
          p.causal = causal;
          p.exact_measure = exact_measure;
          p.top_u = top_u;
          p.factor = 2;
          p.seed = 17;
          const std::int64_t u = probsparse_rows(s.Lq, p);
          tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv}), want(got.shape());
          tensor<std::int64_t, 3> sg({s.B, s.Hq, u}), sw(sg.shape());
          probsparse_attention(cview(x.q), cview(x.k), cview(x.v), got.as_view(), p, sg.as_view());
          reference_probsparse_attention(cview(x.q), cview(x.k), cview(x.v), want.as_view(), p, sw.as_view());
          ASSERT_TRUE(std::equal(sg.begin(), sg.end(), sw.begin())) << "selected rows differ";
          expect_close(got, want, atol, rtol, "probsparse out");
          if (s.Lq > 30 && top_u == 0)
            std::printf("probsparse u=%lld causal=%d exact_M=%d Lq=%lld: error vs exact %.3f\n", (long long)u, causal,
                        exact_measure, (long long)s.Lq, rel_error(got, exact(x, causal)));
        }
}

TEST(ApproxProbSparse, AllRowsIsExactAttention) {
  for (const shape& s : shapes)
    for (bool causal : {false, true}) {
      const data x(s, 400);
      probsparse_options p;
      p.causal = causal;
      p.top_u = s.Lq;
      tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv});
      probsparse_attention(cview(x.q), cview(x.k), cview(x.v), got.as_view(), p);
      expect_close(got, exact(x, causal), atol, rtol, "probsparse u = Lq");
    }
}

TEST(ApproxProbSparse, OtherRowsGetTheMean) {
  // Lq > Lk, causal: the first rows see no key (out 0); top_u = 1, so the others get the mean of
  // the keys they see.
  const shape s{1, 1, 1, 6, 4, 8, 4};
  const data x(s, 500);
  probsparse_options p;
  p.causal = true;
  p.top_u = 1;
  tensor<float, 4> got({1, 1, 6, 4});
  tensor<std::int64_t, 3> sel({1, 1, 1});
  probsparse_attention(cview(x.q), cview(x.k), cview(x.v), got.as_view(), p, sel.as_view());
  for (std::int64_t i = 0; i < 6; ++i) {
    if (i == sel(0, 0, 0)) continue;
    const std::int64_t n = std::max<std::int64_t>(0, i - 2 + 1);
    for (std::int64_t c = 0; c < 4; ++c) {
      double m = 0;
      for (std::int64_t j = 0; j < n; ++j) m += x.v(0, 0, j, c);
      EXPECT_NEAR(got(0, 0, i, c), n ? m / n : 0.0, 1e-6);
    }
  }
  EXPECT_GE(sel(0, 0, 0), 2);  // rows without a key have M = -inf
}

TEST(ApproxProbSparse, Errors) {
  const shape s{1, 2, 2, 8, 8, 16, 16};
  const data x(s, 1);
  tensor<float, 4> out({1, 2, 8, 16});
  probsparse_options p;
  p.factor = 0;
  expect_error([&] { probsparse_attention(cview(x.q), cview(x.k), cview(x.v), out.as_view(), p); },
               {"approx::probsparse_attention", "factor", "0"});
  tensor<std::int64_t, 3> sel({1, 2, 3});
  expect_error([&] { probsparse_attention(cview(x.q), cview(x.k), cview(x.v), out.as_view(), {}, sel.as_view()); },
               {"approx::probsparse_attention", "selected", "[1, 2, 8]"});
}

// ---------------------------------------------------------------------------------------------
// SPARSEK.

TEST(ApproxSparseK, ThresholdMatchesSortBased) {
  std::mt19937 gen(5);
  for (std::int64_t n : {1, 2, 7, 100, 1000})
    for (std::int64_t kk : {1, 3, 50})
      for (float spread : {0.3f, 3.0f, 30.0f}) {
        std::uniform_real_distribution<float> u(-spread, spread);
        std::vector<float> z(static_cast<std::size_t>(n));
        for (float& e : z) e = u(gen);
        if (n > 3) z[1] = z[2] = z[3];  // ties
        const double fast = sparsek_threshold(z.data(), n, kk), ref = reference::sparsek_threshold(z.data(), n, kk);
        EXPECT_EQ(fast, ref) << "n=" << n << " k=" << kk;
        if (n <= kk) {
          EXPECT_EQ(fast, -std::numeric_limits<double>::infinity());
          continue;
        }
        double sum = 0;
        for (float e : z) sum += std::clamp(double(e) - ref, 0.0, 1.0);
        EXPECT_NEAR(sum, double(kk), 1e-9 * n) << "sum of the mask";
      }
}

TEST(ApproxSparseK, OperatorIsTheProjection) {
  // Sharp scores: 1 on the top k, 0 elsewhere. Close scores: fractional, summing to k.
  std::vector<float> z = {5, -3, 9, 0.5f, 20, -1};
  std::vector<float> m(6);
  sparsek(view<const float, 1>(z.data(), {6}), 3, view<float, 1>(m.data(), {6}));
  EXPECT_EQ(m, (std::vector<float>{1, 0, 1, 0, 1, 0}));
  z = {0.1f, 0.2f, 0.3f, 0.4f};
  sparsek(view<const float, 1>(z.data(), {4}), 2, view<float, 1>(m.data(), {4}));
  // tau = -0.25: m = z + 0.25
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(m[j], z[j] + 0.25, 1e-6);
  expect_error([&] { (void)sparsek_threshold(z.data(), 4, 0); }, {"approx::sparsek_threshold", "k", "0"});
}

TEST(ApproxSparseK, FastMatchesReference) {
  for (const shape& s : shapes)
    for (bool causal : {false, true})
      for (std::int64_t window : {1, 5, 64})
        for (std::int64_t kk : {1, 4, 16}) {
          if (!causal && window > 1) continue;
          const data x(s, 600);
          const auto z = random_tensor<float, 3>({s.B, s.Hkv, s.Lk}, 601, -2.0f, 2.0f);
          sparsek_options p{kk, causal, window};
          tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv}), want(got.shape());
          tensor<float, 3> lg({s.B, s.Hq, s.Lq}), lw(lg.shape());
          sparsek_attention(cview(x.q), cview(x.k), cview(x.v), cview(z), p, got.as_view(), lg.as_view());
          reference_sparsek_attention(cview(x.q), cview(x.k), cview(x.v), cview(z), p, want.as_view(), lw.as_view());
          expect_close(got, want, atol, rtol, "sparsek out");
          expect_close(lg, lw, atol, rtol, "sparsek lse");
          if (s.Lq > 30 && kk == 16 && window == 1)
            std::printf("sparsek k=%lld causal=%d Lq=%lld: error vs exact %.3f\n", (long long)kk, causal,
                        (long long)s.Lq, rel_error(got, exact(x, causal)));
        }
}

TEST(ApproxSparseK, BudgetOfAllKeysIsExactAttention) {
  for (const shape& s : shapes)
    for (bool causal : {false, true}) {
      const data x(s, 700);
      const auto z = random_tensor<float, 3>({s.B, s.Hkv, s.Lk}, 701);
      tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv});
      sparsek_attention(cview(x.q), cview(x.k), cview(x.v), cview(z), {s.Lk, causal, 3}, got.as_view());
      expect_close(got, exact(x, causal), atol, rtol, "sparsek k = Lk");
    }
}

TEST(ApproxSparseK, SharpScoresAreExactAttentionOverTheSelected) {
  // z_j = 10 * (a permutation): masks are exactly 0 or 1, the k largest selected; out must be
  // exact attention over those keys (attention::reference on the gathered keys).
  const shape s{1, 4, 2, 9, 57, 16, 16};
  const data x(s, 800);
  tensor<float, 3> z({1, 2, 57});
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t j = 0; j < 57; ++j) z(0, h, j) = 10.0f * float((j * 17 + h * 5) % 57);
  const std::int64_t kk = 12;
  tensor<float, 4> got({1, 4, 9, 16});
  sparsek_attention(cview(x.q), cview(x.k), cview(x.v), cview(z), {kk, false, 1}, got.as_view());
  tensor<float, 4> ks({1, 2, kk, 16}), vs({1, 2, kk, 16}), want({1, 4, 9, 16});
  for (std::int64_t h = 0; h < 2; ++h) {
    std::vector<std::int64_t> idx(57);
    std::iota(idx.begin(), idx.end(), 0);
    std::sort(idx.begin(), idx.end(), [&](auto a, auto b) { return z(0, h, a) > z(0, h, b); });
    idx.resize(kk);
    std::sort(idx.begin(), idx.end());
    for (std::int64_t t = 0; t < kk; ++t)
      for (std::int64_t e = 0; e < 16; ++e) ks(0, h, t, e) = x.k(0, h, idx[t], e), vs(0, h, t, e) = x.v(0, h, idx[t], e);
  }
  attention::reference(cview(x.q), ks, vs, want.as_view());
  expect_close(got, want, atol, rtol, "sparsek, sharp scores");
}

TEST(ApproxSparseK, ScoresAreTheProjection) {
  const auto k = random_tensor<float, 4>({2, 2, 10, 12}, 901), w = random_tensor<float, 4>({1, 1, 2, 12}, 902);
  tensor<float, 3> z({2, 2, 10});
  const view<const float, 2> wv(w.data(), {2, 12});
  sparsek_scores(cview(k), wv, z.as_view());
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t j = 0; j < 10; ++j) {
        double s = 0;
        for (std::int64_t e = 0; e < 12; ++e) s += double(wv(h, e)) * k(b, h, j, e);
        EXPECT_NEAR(z(b, h, j), s, 1e-5);
      }
}

TEST(ApproxSparseK, Errors) {
  const shape s{1, 2, 2, 8, 8, 16, 16};
  const data x(s, 1);
  tensor<float, 4> out({1, 2, 8, 16});
  const auto z = random_tensor<float, 3>({1, 2, 7}, 2);
  const auto zz = random_tensor<float, 3>({1, 2, 8}, 2);
  expect_error([&] { sparsek_attention(cview(x.q), cview(x.k), cview(x.v), cview(z), {4}, out.as_view()); },
               {"approx::sparsek_attention", "z", "[1, 2, 8]", "[1, 2, 7]"});
  expect_error([&] { sparsek_attention(cview(x.q), cview(x.k), cview(x.v), cview(zz), {0}, out.as_view()); },
               {"approx::sparsek_attention", "k", "0"});
  expect_error([&] { sparsek_attention(cview(x.q), cview(x.k), cview(x.v), cview(zz), {4, true, 0}, out.as_view()); },
               {"approx::sparsek_attention", "window", "0"});
}

// ---------------------------------------------------------------------------------------------
// Combiner.

TEST(ApproxCombiner, FastMatchesReference) {
  for (const shape& s : shapes)
    for (bool causal : {false, true})
      if (s.Lq <= s.Lk)
      for (std::int64_t block : {1, 7, 16, 1000}) {
        const data x(s, 1000);
        tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv}), want(got.shape());
        tensor<float, 3> lg({s.B, s.Hq, s.Lq}), lw(lg.shape());
        combiner_attention(cview(x.q), cview(x.k), cview(x.v), {block, causal}, got.as_view(), lg.as_view());
        reference_combiner_attention(cview(x.q), cview(x.k), cview(x.v), {block, causal}, want.as_view(), lw.as_view());
        expect_close(got, want, atol, rtol, "combiner out");
        expect_close(lg, lw, atol, rtol, "combiner lse");
        if (block >= s.Lk) expect_close(got, exact(x, causal), atol, rtol, "combiner, one block = exact attention");
        else if (s.Lq > 30 && block == 7)
          std::printf("combiner block=%lld causal=%d Lq=%lld: error vs exact %.3f\n", (long long)block, causal,
                      (long long)s.Lq, rel_error(got, exact(x, causal)));
      }
}

TEST(ApproxCombiner, ConstantBlocksAreExact) {
  // Every block's keys and values equal: the summary is the block, its logit + log n_r its mass.
  const shape s{1, 2, 1, 40, 40, 16, 8};
  data x(s, 1100);
  const std::int64_t block = 8;
  for (std::int64_t j = 0; j < 40; ++j) {
    for (std::int64_t e = 0; e < 16; ++e) x.k(0, 0, j, e) = x.k(0, 0, j / block * block, e);
    for (std::int64_t e = 0; e < 8; ++e) x.v(0, 0, j, e) = x.v(0, 0, j / block * block, e);
  }
  tensor<float, 4> got({1, 2, 40, 8});
  tensor<float, 3> lse({1, 2, 40}), lse_exact({1, 2, 40});
  combiner_attention(cview(x.q), cview(x.k), cview(x.v), {block, false}, got.as_view(), lse.as_view());
  tensor<float, 4> want({1, 2, 40, 8});
  attention::reference(cview(x.q), x.k, x.v, want.as_view(), lse_exact.as_view());
  expect_close(got, want, atol, rtol, "combiner, constant blocks");
  expect_close(lse, lse_exact, atol, rtol, "combiner lse, constant blocks");
}

TEST(ApproxCombiner, Errors) {
  const shape s{1, 2, 2, 8, 8, 16, 16};
  const data x(s, 1);
  tensor<float, 4> out({1, 2, 8, 16});
  expect_error([&] { combiner_attention(cview(x.q), cview(x.k), cview(x.v), {0}, out.as_view()); },
               {"approx::combiner_attention", "block", "0"});
  const auto q = random_tensor<float, 4>({1, 2, 9, 16}, 3);
  tensor<float, 4> out9({1, 2, 9, 16});
  expect_error([&] { combiner_attention(cview(q), cview(x.k), cview(x.v), {4}, out9.as_view()); },
               {"approx::combiner_attention", "Lq=9", "Lk=8"});
}

}  // namespace
}  // namespace mnemo::attention::approx
