// Tests for mnemo/kvcache/merge_plan.hpp, merge.hpp and the merging policies (policies/cam.hpp,
// merging.hpp, dmc.hpp, moviechat.hpp): every method's plan, applied by kvcache::reference::merge,
// against an independent double-precision reference written from the method's equations; the plan
// applied to a layer_cache of every storage kind against the f32 reference (within one rounding of
// the kind of what the cache held, and within the kind's input error of the merge of the original
// tokens); kvcache::decode over a merged cache against attention over the merged K/V; the DMC
// decoder step by step through a cache; merging beating dropping on near-duplicate tokens; empty
// heads; and the argument checks (the cache unchanged after a throw).
#include "mnemo/kvcache/merge.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "mnemo/kvcache/decode.hpp"
#include "mnemo/kvcache/policies/cam.hpp"
#include "mnemo/kvcache/policies/dmc.hpp"
#include "mnemo/kvcache/policies/knorm.hpp"
#include "mnemo/kvcache/policies/merging.hpp"
#include "mnemo/kvcache/policies/moviechat.hpp"
#include "support/support.hpp"

namespace {

namespace kv = mnemo::kvcache;
namespace pol = mnemo::kvcache::policies;
using mnemo::tensor;
using mnemo::view;

tensor<float, 3> normal3(std::int64_t a, std::int64_t b, std::int64_t c, std::uint32_t seed, float sigma = 1.0f) {
  tensor<float, 3> t({a, b, c});
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, sigma);
  for (float& x : t) x = n(rng);
  return t;
}

// Column sums of softmax(q k^T / sqrt(D)) over all rows (non-causal), [Hq, L]: an observation.attn.
tensor<float, 2> column_sums(const tensor<float, 3>& q, const tensor<float, 3>& k) {
  const std::int64_t Hq = q.extent(0), Lw = q.extent(1), D = q.extent(2), Hkv = k.extent(0), L = k.extent(1);
  tensor<float, 2> s({Hq, L});
  std::fill(s.begin(), s.end(), 0.0f);
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lw; ++i) {
      const std::int64_t hk = h / (Hq / Hkv);
      std::vector<double> p(static_cast<std::size_t>(L));
      double m = -1e300, z = 0;
      for (std::int64_t j = 0; j < L; ++j) {
        double dot = 0;
        for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(q(h, i, c)) * k(hk, j, c);
        p[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(D));
        m = std::max(m, p[static_cast<std::size_t>(j)]);
      }
      for (double& x : p) z += (x = std::exp(x - m));
      for (std::int64_t j = 0; j < L; ++j) s(h, j) += static_cast<float>(p[static_cast<std::size_t>(j)] / z);
    }
  return s;
}

double cosine(const double* a, const double* b, std::int64_t D) {
  double dot = 0, na = 0, nb = 0;
  for (std::int64_t c = 0; c < D; ++c) dot += a[c] * b[c], na += a[c] * a[c], nb += b[c] * b[c];
  return na > 0 && nb > 0 ? dot / std::sqrt(na * nb) : 0.0;
}

std::vector<double> row(const tensor<float, 3>& x, std::int64_t h, std::int64_t j) {
  std::vector<double> r(static_cast<std::size_t>(x.extent(2)));
  for (std::int64_t c = 0; c < x.extent(2); ++c) r[static_cast<std::size_t>(c)] = x(h, j, c);
  return r;
}

// Expected merged rows of one head, [kept][D] and [kept][Dv].
struct expected_head {
  std::vector<std::vector<double>> k, v;
};

void expect_head(const kv::reference::merged_kv& got, std::int64_t h, const expected_head& want, double tol) {
  ASSERT_LE(static_cast<std::int64_t>(want.k.size()), got.k.extent(1));
  for (std::size_t i = 0; i < want.k.size(); ++i) {
    for (std::size_t c = 0; c < want.k[i].size(); ++c)
      ASSERT_NEAR(got.k(h, static_cast<std::int64_t>(i), static_cast<std::int64_t>(c)), want.k[i][c], tol) << h << " " << i;
    for (std::size_t c = 0; c < want.v[i].size(); ++c)
      ASSERT_NEAR(got.v(h, static_cast<std::int64_t>(i), static_cast<std::int64_t>(c)), want.v[i][c], tol) << h << " " << i;
  }
}

// ---- CaM --------------------------------------------------------------------------------------

// The paper's merge with the mask's expectation, from H2O's scores (computed here again).
expected_head cam_reference(const tensor<float, 3>& k, const tensor<float, 3>& v, const tensor<float, 2>& attn,
                            std::int64_t h, std::int64_t budget, std::int64_t m, bool similar) {
  const std::int64_t L = k.extent(1), G = attn.extent(0) / k.extent(0);
  std::vector<double> s(static_cast<std::size_t>(L));
  for (std::int64_t j = 0; j < L; ++j) {
    double a = 0;
    for (std::int64_t g = 0; g < G; ++g) a += attn(h * G + g, j);
    s[static_cast<std::size_t>(j)] = static_cast<float>(a / static_cast<double>(L - j) / static_cast<double>(G));
  }
  std::vector<std::int64_t> order(static_cast<std::size_t>(L));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    return static_cast<float>(s[static_cast<std::size_t>(a)]) > static_cast<float>(s[static_cast<std::size_t>(b)]);
  });
  std::vector<std::int64_t> keep(order.begin(), order.begin() + std::min(budget, L));
  std::sort(keep.begin(), keep.end());
  expected_head out;
  for (std::int64_t t : keep) out.k.push_back(row(k, h, t)), out.v.push_back(row(v, h, t));
  if (keep.empty()) return out;
  for (std::int64_t e = 0; e < L; ++e) {
    if (std::binary_search(keep.begin(), keep.end(), e)) continue;
    std::vector<std::size_t> targets;  // indices into keep
    if (!similar) {
      for (std::size_t i = 0; i < keep.size() && static_cast<std::int64_t>(targets.size()) < m; ++i)
        if (keep[i] > e) targets.push_back(i);
    } else {
      std::size_t best = 0;
      double top = -2;
      const std::vector<double> ke = row(k, h, e);
      for (std::size_t i = 0; i < keep.size(); ++i) {
        const double c = cosine(ke.data(), row(k, h, keep[i]).data(), k.extent(2));
        if (c > top) top = c, best = i;
      }
      targets.push_back(best);
    }
    if (targets.empty()) continue;
    double mean = 0;
    for (std::size_t i : targets) mean += s[static_cast<std::size_t>(keep[i])];
    mean /= static_cast<double>(targets.size());
    const double p = std::clamp(s[static_cast<std::size_t>(e)] / mean, 0.0, 1.0);
    for (std::size_t i : targets)
      for (std::int64_t c = 0; c < v.extent(2); ++c) out.v[i][static_cast<std::size_t>(c)] += p / static_cast<double>(targets.size()) * v(h, e, c);
  }
  return out;
}

TEST(Merge, CamAgainstItsEquations) {
  const std::int64_t Hkv = 2, G = 2, L = 37, D = 16, Dv = 12;
  const tensor<float, 3> k = normal3(Hkv, L, D, 1), v = normal3(Hkv, L, Dv, 2), q = normal3(Hkv * G, 5, D, 3);
  const tensor<float, 2> attn = column_sums(q, k);
  pol::observation o{k, v, q, attn};
  for (bool similar : {false, true})
    for (std::int64_t m : {1, 4, 32})
      for (std::int64_t budget : {0, 1, 9, 36, 37, 50}) {
        SCOPED_TRACE(testing::Message() << "similar " << similar << " m " << m << " budget " << budget);
        pol::cam c;
        c.merge_window = m;
        c.into = similar ? pol::cam::target::similar : pol::cam::target::next;
        const kv::merge_plan p = c.plan(o, budget);
        EXPECT_EQ(p.rule, kv::merge_rule::sum);
        EXPECT_FALSE(p.keys);
        EXPECT_EQ(p.keep.heads, c.select(o, budget).heads);
        if (budget >= 9 && budget < L) {
          EXPECT_GT(p.num_folds(), 0);
        }
        const kv::reference::merged_kv got = kv::reference::merge(p, k, v);
        for (std::int64_t h = 0; h < Hkv; ++h) {
          const expected_head want = cam_reference(k, v, attn, h, budget, m, similar);
          ASSERT_EQ(static_cast<std::int64_t>(want.k.size()), p.keep.kept(h));
          expect_head(got, h, want, 1e-5);
        }
      }
}

// ---- MergingPress -----------------------------------------------------------------------------

// kvpress's merge: the most similar kept key, weight max(s, 0) |v_e| / (|v_e| + |v_t| + eps), mean.
expected_head merging_reference(const tensor<float, 3>& k, const tensor<float, 3>& v, std::int64_t h,
                                const std::vector<std::int64_t>& keep, double threshold) {
  const double eps = 1e-6;
  auto norm = [](const std::vector<double>& x) {
    double n = 0;
    for (double a : x) n += a * a;
    return std::sqrt(n);
  };
  expected_head out;
  std::vector<double> total;
  for (std::int64_t t : keep) out.k.push_back(row(k, h, t)), out.v.push_back(row(v, h, t)), total.push_back(1);
  for (std::int64_t e = 0; e < k.extent(1) && !keep.empty(); ++e) {
    if (std::binary_search(keep.begin(), keep.end(), e)) continue;
    const std::vector<double> ke = row(k, h, e);
    std::size_t best = 0;
    double top = -1e300;
    for (std::size_t i = 0; i < keep.size(); ++i) {
      const std::vector<double> kt = row(k, h, keep[i]);
      double dot = 0;
      for (std::size_t c = 0; c < ke.size(); ++c) dot += ke[c] * kt[c];
      const double s = dot / (std::max(norm(ke), eps) * std::max(norm(kt), eps));
      if (s > top) top = s, best = i;
    }
    if (top < threshold || top <= 0) continue;
    const std::vector<double> ve = row(v, h, e), vt = row(v, h, keep[best]);
    const double w = top * norm(ve) / (norm(ve) + norm(vt) + eps);
    for (std::size_t c = 0; c < ve.size(); ++c) out.v[best][c] = (out.v[best][c] * total[best] + w * ve[c]) / (total[best] + w);
    total[best] += w;
  }
  return out;
}

TEST(Merge, MergingPressAgainstItsEquations) {
  const std::int64_t Hkv = 2, L = 33, D = 8, Dv = 6;
  tensor<float, 3> k = normal3(Hkv, L, D, 50);
  const tensor<float, 3> v = normal3(Hkv, L, Dv, 51);
  for (std::int64_t c = 0; c < D; ++c) k(1, 4, c) = 0.0f;  // a zero key: cosine 0 with every key
  pol::observation o{k, v, {}, {}};
  for (float threshold : {0.0f, 0.3f})
    for (std::int64_t budget : {0, 1, 10, 33}) {
      SCOPED_TRACE(testing::Message() << "threshold " << threshold << " budget " << budget);
      pol::merging<pol::knorm> m;
      m.threshold = threshold;
      const kv::merge_plan p = m.plan(o, budget);
      EXPECT_EQ(p.keep.heads, pol::knorm{}.select(o, budget).heads);
      if (budget == 10) {
        EXPECT_GT(p.num_folds(), 0);
      }
      EXPECT_EQ(p.rule, kv::merge_rule::mean);
      EXPECT_FALSE(p.keys);
      const kv::reference::merged_kv got = kv::reference::merge(p, k, v);
      for (std::int64_t h = 0; h < Hkv; ++h)
        expect_head(got, h, merging_reference(k, v, h, p.keep.heads[static_cast<std::size_t>(h)], threshold), 1e-5);
    }
  mnemo::test::expect_error([&] { pol::fold_similar(o, pol::knorm{}.select(o, 3), 2.0f); },
                            {"kvcache::policies::fold_similar", "threshold", "[0, 1]", "got 2"});
}

// ---- DMC --------------------------------------------------------------------------------------

// The running mean of the paper, token by token.
expected_head dmc_reference(const tensor<float, 3>& k, const tensor<float, 3>& v, std::int64_t h,
                            const std::vector<int>& alpha, const std::vector<double>& omega) {
  expected_head out;
  std::vector<double> z;
  for (std::int64_t t = 0; t < k.extent(1); ++t) {
    const double w = omega[static_cast<std::size_t>(t)];
    if (t == 0 || !alpha[static_cast<std::size_t>(t)]) {
      out.k.push_back(row(k, h, t)), out.v.push_back(row(v, h, t)), z.push_back(w);
      continue;
    }
    for (int which = 0; which < 2; ++which) {
      std::vector<double>& last = which ? out.v.back() : out.k.back();
      const std::vector<double> x = row(which ? v : k, h, t);
      for (std::size_t c = 0; c < last.size(); ++c) last[c] = (z.back() * last[c] + w * x[c]) / (z.back() + w);
    }
    z.back() += w;
  }
  return out;
}

TEST(Merge, DmcAgainstTheRunningMean) {
  const std::int64_t Hkv = 3, L = 41, D = 8, Dv = 10;
  const tensor<float, 3> k = normal3(Hkv, L, D, 4), v = normal3(Hkv, L, Dv, 5);
  tensor<float, 2> alpha({Hkv, L}), omega({Hkv, L});
  std::mt19937 rng(6);
  for (float& a : alpha) a = std::uniform_int_distribution<int>(0, 2)(rng) > 0 ? 1.0f : 0.0f;
  for (float& w : omega) w = std::uniform_real_distribution<float>(0.1f, 1.0f)(rng);
  pol::observation o{k, v, {}, {}};
  pol::dmc given{alpha, omega};
  const kv::merge_plan p = given.plan(o, 0);  // the budget is not used when alpha is given
  const kv::reference::merged_kv got = kv::reference::merge(p, k, v);
  for (std::int64_t h = 0; h < Hkv; ++h) {
    std::vector<int> a(static_cast<std::size_t>(L));
    std::vector<double> w(static_cast<std::size_t>(L));
    for (std::int64_t t = 0; t < L; ++t) a[static_cast<std::size_t>(t)] = alpha(h, t) > 0.5f, w[static_cast<std::size_t>(t)] = omega(h, t);
    const expected_head want = dmc_reference(k, v, h, a, w);
    ASSERT_EQ(static_cast<std::int64_t>(want.k.size()), p.keep.kept(h));
    expect_head(got, h, want, 1e-5);
  }
  // The test rule: the L - budget tokens most similar to their predecessor merge, omega = 1.
  for (std::int64_t budget : {0, 1, 7, 40, 41, 60}) {
    SCOPED_TRACE(budget);
    const kv::merge_plan r = pol::dmc{}.plan(o, budget);
    const kv::reference::merged_kv m = kv::reference::merge(r, k, v);
    for (std::int64_t h = 0; h < Hkv; ++h) {
      if (budget == 0) {
        EXPECT_EQ(r.keep.kept(h), 0);
        continue;
      }
      std::vector<std::pair<double, std::int64_t>> sim;
      for (std::int64_t t = 1; t < L; ++t) sim.emplace_back(-cosine(row(k, h, t).data(), row(k, h, t - 1).data(), D), t);
      std::sort(sim.begin(), sim.end());
      std::vector<int> a(static_cast<std::size_t>(L), 0);
      for (std::int64_t i = 0; i < L - std::min(budget, L); ++i) a[static_cast<std::size_t>(sim[static_cast<std::size_t>(i)].second)] = 1;
      const expected_head want = dmc_reference(k, v, h, a, std::vector<double>(static_cast<std::size_t>(L), 1.0));
      ASSERT_EQ(r.keep.kept(h), std::min(budget, L));
      expect_head(m, h, want, 1e-5);
    }
  }
}

TEST(Merge, DmcDecoderThroughACacheOfEveryKind) {
  const std::int64_t Hkv = 2, L = 45, D = 16, Dv = 16, Hq = 4;
  const tensor<float, 3> k = normal3(Hkv, L, D, 7), v = normal3(Hkv, L, Dv, 8);
  std::mt19937 rng(9);
  std::vector<std::vector<int>> alpha(Hkv, std::vector<int>(L));
  std::vector<std::vector<double>> omega(Hkv, std::vector<double>(L));
  for (auto& r : alpha)
    for (int& a : r) a = std::uniform_int_distribution<int>(0, 1)(rng);
  for (auto& r : omega)
    for (double& w : r) w = static_cast<float>(std::uniform_real_distribution<double>(0.2, 1.0)(rng));
  for (kv::storage kind : kv::layer_storages) {
    SCOPED_TRACE(kv::storage_name(kind));
    kv::layer_cache c({.kind = kind, .Hkv = Hkv, .capacity = L, .D = D, .quant = {8, 16, 16}});
    pol::dmc::decoder dec(Hkv);
    for (std::int64_t t = 0; t < L; ++t) {
      c.append(k.as_view().narrow(1, t, 1), v.as_view().narrow(1, t, 1));
      std::vector<float> a(Hkv), w(Hkv);
      for (std::int64_t h = 0; h < Hkv; ++h)
        a[static_cast<std::size_t>(h)] = static_cast<float>(alpha[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)]),
        w[static_cast<std::size_t>(h)] = static_cast<float>(omega[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)]);
      kv::merge(c, dec.step(a, w));
      ASSERT_EQ(c.lengths(), dec.lengths());
    }
    const tensor<float, 3> gk = c.keys(), gv = c.values();
    // f32: the running mean up to f32 rounding; the other kinds within their error on |x| <~ 4.
    const double tol = kind == kv::storage::f32    ? 1e-5
                       : kind == kv::storage::f16  ? 4e-3
                       : kind == kv::storage::bf16 ? 3e-2
                       : kind == kv::storage::int8 ? 0.1
                                                   : 1.5;  // int4 / int2 of a few-step group: a loose sanity bound
    for (std::int64_t h = 0; h < Hkv; ++h) {
      const expected_head want =
          dmc_reference(k, v, h, alpha[static_cast<std::size_t>(h)], omega[static_cast<std::size_t>(h)]);
      ASSERT_EQ(c.length(h), static_cast<std::int64_t>(want.k.size()));
      double z = 0;
      for (float x : dec.weights(h)) z += x;
      double total = 0;
      for (double x : omega[static_cast<std::size_t>(h)]) total += x;
      EXPECT_NEAR(z, total, 1e-4);
      for (std::size_t i = 0; i < want.k.size(); ++i) {
        for (std::int64_t e = 0; e < D; ++e) ASSERT_NEAR(gk(h, static_cast<std::int64_t>(i), e), want.k[i][static_cast<std::size_t>(e)], tol);
        for (std::int64_t e = 0; e < Dv; ++e) ASSERT_NEAR(gv(h, static_cast<std::int64_t>(i), e), want.v[i][static_cast<std::size_t>(e)], tol);
      }
    }
    // Decoding reads it like any cache.
    const tensor<float, 3> q = normal3(Hq, 1, D, 10);
    tensor<float, 3> out({Hq, 1, Dv}), want({Hq, 1, Dv});
    kv::decode(c, q, out);
    kv::reference::decode(c, q, want);
    mnemo::test::expect_close(out, want, 1e-4, 1e-4);
  }
}

// ---- MovieChat --------------------------------------------------------------------------------

// Greedy adjacent merging by the count-weighted mean, scanning every pair each round.
expected_head moviechat_reference(const tensor<float, 3>& k, const tensor<float, 3>& v, std::int64_t h, std::int64_t budget) {
  expected_head g;
  std::vector<double> n;
  for (std::int64_t j = 0; j < k.extent(1); ++j) g.k.push_back(row(k, h, j)), g.v.push_back(row(v, h, j)), n.push_back(1);
  while (static_cast<std::int64_t>(g.k.size()) > budget) {
    std::size_t best = 0;
    double top = -10;
    for (std::size_t a = 0; a + 1 < g.k.size(); ++a) {
      const double c = cosine(g.k[a].data(), g.k[a + 1].data(), k.extent(2));
      if (c > top) top = c, best = a;
    }
    for (int which = 0; which < 2; ++which) {
      auto& x = which ? g.v : g.k;
      for (std::size_t c = 0; c < x[best].size(); ++c)
        x[best][c] = (n[best] * x[best][c] + n[best + 1] * x[best + 1][c]) / (n[best] + n[best + 1]);
      x.erase(x.begin() + static_cast<std::ptrdiff_t>(best) + 1);
    }
    n[best] += n[best + 1];
    n.erase(n.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  return g;
}

TEST(Merge, MovieChatAgainstGreedyAdjacentMerging) {
  const std::int64_t Hkv = 2, L = 40, D = 12, Dv = 7;
  const tensor<float, 3> k = normal3(Hkv, L, D, 11), v = normal3(Hkv, L, Dv, 12);
  pol::observation o{k, v, {}, {}};
  for (std::int64_t budget : {1, 2, 13, 39, 40, 70}) {
    SCOPED_TRACE(budget);
    const kv::merge_plan p = pol::moviechat{}.plan(o, budget);
    EXPECT_TRUE(p.keys);
    EXPECT_EQ(p.rule, kv::merge_rule::mean);
    const kv::reference::merged_kv got = kv::reference::merge(p, k, v);
    for (std::int64_t h = 0; h < Hkv; ++h) {
      ASSERT_EQ(p.keep.kept(h), std::min(budget, L));
      expect_head(got, h, moviechat_reference(k, v, h, budget), 1e-5);
    }
  }
  EXPECT_EQ(pol::moviechat{}.plan(o, 0).keep.total_kept(), 0);
}

// ---- the plan on a cache of every kind ---------------------------------------------------------

// Attention of q [Hq, 1, D] over merged K/V [Hkv, n, D] (ragged: kept[h] rows), in double.
tensor<float, 3> attend(const tensor<float, 3>& q, const tensor<float, 3>& k, const tensor<float, 3>& v,
                        const std::vector<std::int64_t>& kept) {
  const std::int64_t Hq = q.extent(0), D = q.extent(2), Dv = v.extent(2), G = Hq / k.extent(0);
  tensor<float, 3> out({Hq, 1, Dv});
  for (std::int64_t h = 0; h < Hq; ++h) {
    const std::int64_t hk = h / G, n = kept[static_cast<std::size_t>(hk)];
    std::vector<double> p(static_cast<std::size_t>(n));
    double m = -1e300, z = 0;
    for (std::int64_t j = 0; j < n; ++j) {
      double dot = 0;
      for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(q(h, 0, c)) * k(hk, j, c);
      m = std::max(m, p[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(D)));
    }
    for (double& x : p) z += (x = std::exp(x - m));
    for (std::int64_t e = 0; e < Dv; ++e) {
      double o = 0;
      for (std::int64_t j = 0; j < n; ++j) o += p[static_cast<std::size_t>(j)] * v(hk, j, e);
      out(h, 0, e) = n > 0 ? static_cast<float>(o / z) : 0.0f;
    }
  }
  return out;
}

// Half a quantization step of what slot j of head h holds, key channel e / value channel e.
double key_half_step(const kv::layer_cache& c, std::int64_t h, std::int64_t j, std::int64_t e) {
  if (!kv::is_quantized(c.kind()) || j >= c.quantized_length(h)) return 0;
  std::int64_t start = 0, g = 0;
  for (std::int64_t len : c.key_group_lengths(h)) {
    if (j < start + len) break;
    start += len, ++g;
  }
  return 0.5 * c.key_scales(h)[static_cast<std::size_t>(g * c.head_dim() + e)];
}
double value_half_step(const kv::layer_cache& c, std::int64_t h, std::int64_t j, std::int64_t e) {
  if (!kv::is_quantized(c.kind()) || j >= c.quantized_length(h)) return 0;
  return 0.5 * c.value_scales()(h, e / c.config().quant.value_group, j);
}
// One rounding of x in a dense kind.
double rounding(kv::storage kind, double x) {
  const double eps = kind == kv::storage::f16 ? 0x1p-11 : kind == kv::storage::bf16 ? 0x1p-8 : 0x1p-24;
  return std::fabs(x) * eps + 1e-7;
}

// Applies p to a cache of `kind` holding (k, v) and checks the stored K/V against the reference.
// With `rotate`, the cache stores Hadamard-rotated keys and values (kvcache/rotation.hpp): one
// rounding in the rotated space spreads over a block of b channels, at most sqrt(b) times the
// largest of them per channel (b times for a relative rounding of the rotated row).
void check_cache(kv::storage kind, const kv::merge_plan& p, const tensor<float, 3>& k, const tensor<float, 3>& v,
                 bool rotate = false) {
  const std::int64_t Hkv = k.extent(0), L = k.extent(1), D = k.extent(2), Dv = v.extent(2);
  kv::cache_config cfg{.kind = kind, .Hkv = Hkv, .capacity = L + 4, .D = D, .Dv = Dv, .quant = {8, 16, 16}};
  if (rotate) cfg.rotate = {.kind = kv::rotation::hadamard, .keys = true, .values = true};
  kv::layer_cache c(cfg);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(L));
  for (std::int64_t j = 0; j < L; ++j) pos[static_cast<std::size_t>(j)] = 100 + 2 * j;
  c.append(k, v, pos);
  // What the cache held (dequantized), and how far that is from the input.
  const tensor<float, 3> held_k = c.keys(), held_v = c.values();
  double input_err = mnemo::test::max_abs_diff(held_k, k);
  input_err = std::max(input_err, mnemo::test::max_abs_diff(held_v, v));
  const kv::reference::merged_kv want = kv::reference::merge(p, held_k, held_v);  // from what it held
  const kv::reference::merged_kv orig = kv::reference::merge(p, k, v);            // from the f32 input
  // Sum of |coefficients| of a merged row: 1 for a mean, a_t + sum w for a sum.
  double gain = 1;
  if (p.rule == kv::merge_rule::sum)
    for (std::int64_t h = 0; h < Hkv; ++h)
      for (std::int64_t t : p.keep.heads[static_cast<std::size_t>(h)]) {
        double g = 1;
        for (const kv::fold& f : p.folds[static_cast<std::size_t>(h)])
          if (f.into == t) g += f.weight;
        gain = std::max(gain, g);
      }
  kv::merge(c, p);
  const tensor<float, 3> got_k = c.keys(), got_v = c.values();
  for (std::int64_t h = 0; h < Hkv; ++h) {
    const auto& keep = p.keep.heads[static_cast<std::size_t>(h)];
    ASSERT_EQ(c.length(h), static_cast<std::int64_t>(keep.size()));
    for (std::size_t i = 0; i < keep.size(); ++i) {
      const auto j = static_cast<std::int64_t>(i);
      ASSERT_EQ(c.positions(h)[i], 100 + 2 * keep[i]);  // a merged slot keeps its kept slot's position
      for (int which = 0; which < 2; ++which) {
        const tensor<float, 3>& got = which ? got_v : got_k;
        const tensor<float, 3>& w = which ? want.v : want.k;
        const tensor<float, 3>& o = which ? orig.v : orig.k;
        const std::int64_t W = which ? Dv : D, b = rotate ? kv::hadamard_block(W) : 1;
        double top = 0, step = 0;  // the row's largest |x| and half step
        for (std::int64_t e = 0; e < W; ++e)
          top = std::max(top, std::fabs(static_cast<double>(w(h, j, e)))),
          step = std::max(step, which ? value_half_step(c, h, j, e) : key_half_step(c, h, j, e));
        for (std::int64_t e = 0; e < W; ++e) {
          const double half = which ? value_half_step(c, h, j, e) : key_half_step(c, h, j, e);
          const double tol = rotate ? std::sqrt(static_cast<double>(b)) * step * 1.001 +
                                          static_cast<double>(b) * rounding(kind, top) + 1e-5
                                    : std::max(rounding(kind, w(h, j, e)), half * 1.001 + 1e-5);
          ASSERT_NEAR(got(h, j, e), w(h, j, e), tol) << (which ? "v " : "k ") << h << " " << i << " " << e;
          ASSERT_NEAR(got(h, j, e), o(h, j, e), tol + gain * input_err + 1e-5);
        }
      }
    }
  }
  // kvcache::decode over the merged cache: attention over what it holds, and for f32 over the
  // reference merge of the input.
  const std::int64_t Hq = 2 * Hkv;
  const tensor<float, 3> q = normal3(Hq, 1, D, 99);
  tensor<float, 3> out({Hq, 1, Dv});
  kv::decode(c, q, out);
  std::vector<std::int64_t> kept;
  for (std::int64_t h = 0; h < Hkv; ++h) kept.push_back(p.keep.kept(h));
  mnemo::test::expect_close(out, attend(q, got_k, got_v, kept), 1e-4, 1e-4, "decode vs attention over the cache's K/V");
  if (kind == kv::storage::f32) mnemo::test::expect_close(out, attend(q, orig.k, orig.v, kept), 1e-4, 1e-4, "decode vs reference merge");
}

TEST(Merge, EveryPlanOnEveryStorageKind) {
  const std::int64_t Hkv = 3, L = 53, D = 24, Dv = 40;  // several key groups of 8, a residual window of 16
  const tensor<float, 3> k = normal3(Hkv, L, D, 13), v = normal3(Hkv, L, Dv, 14), q = normal3(Hkv * 2, 6, D, 15);
  const tensor<float, 2> attn = column_sums(q, k);
  pol::observation o{k, v, q, attn};
  pol::cam similar;
  similar.into = pol::cam::target::similar;
  std::vector<std::pair<const char*, kv::merge_plan>> plans = {
      {"cam", pol::cam{}.plan(o, 20)},
      {"cam similar", similar.plan(o, 11)},
      {"dmc", pol::dmc{}.plan(o, 17)},
      {"moviechat", pol::moviechat{}.plan(o, 9)},
      {"merging", pol::merging<pol::knorm>{}.plan(o, 14)},
  };
  // Ragged by hand: head 0 keeps nothing, head 1 keeps every slot, head 2 folds everything into two.
  kv::merge_plan ragged;
  ragged.keep.heads = {{}, {}, {5, 40}};
  for (std::int64_t j = 0; j < L; ++j) ragged.keep.heads[1].push_back(j);
  ragged.folds = {{}, {}, {}};
  for (std::int64_t j = 0; j < L; ++j)
    if (j != 5 && j != 40) ragged.folds[2].push_back({j, j < 30 ? 5 : 40, 0.25f + 0.01f * static_cast<float>(j)});
  ragged.self = {{}, std::vector<float>(static_cast<std::size_t>(L), 1.0f), {2.0f, 0.5f}};
  ragged.keys = true;
  plans.emplace_back("ragged mean", ragged);
  ragged.rule = kv::merge_rule::sum;
  ragged.keys = false;
  for (auto& f : ragged.folds[2]) f.weight *= 0.1f;
  plans.emplace_back("ragged sum", ragged);
  for (const auto& [name, p] : plans)
    for (kv::storage kind : kv::layer_storages)
      for (bool rotate : {false, true}) {
        SCOPED_TRACE(testing::Message() << name << " " << kv::storage_name(kind) << (rotate ? " rotated" : ""));
        check_cache(kind, p, k, v, rotate);
      }
}

TEST(Merge, MergingBeatsDroppingOnNearDuplicates) {
  // 32 pairs of near-duplicate tokens (keys 1e-3 apart, values a little apart): keeping one slot
  // per pair, the merged slots hold the pairs' means and every pair loses the same half of its
  // weight, so attention over the merged cache is nearly the full one; dropping keeps one of each.
  const std::int64_t Hkv = 2, L = 64, D = 16, Dv = 16, Hq = 4;
  tensor<float, 3> k = normal3(Hkv, L, D, 20), v = normal3(Hkv, L, Dv, 21);
  const tensor<float, 3> dk = normal3(Hkv, L, D, 22, 1e-3f), dv = normal3(Hkv, L, Dv, 23, 0.3f);
  for (std::int64_t h = 0; h < Hkv; ++h)
    for (std::int64_t j = 1; j < L; j += 2) {
      for (std::int64_t c = 0; c < D; ++c) k(h, j, c) = k(h, j - 1, c) + dk(h, j, c);
      for (std::int64_t c = 0; c < Dv; ++c) v(h, j, c) = v(h, j - 1, c) + dv(h, j, c);
    }
  pol::observation o{k, v, {}, {}};
  const tensor<float, 3> q = normal3(Hq, 1, D, 24);
  std::vector<std::int64_t> all(Hkv, L);
  const tensor<float, 3> full = attend(q, k, v, all);
  const std::pair<const char*, kv::merge_plan> plans[] = {{"moviechat", pol::moviechat{}.plan(o, L / 2)},
                                                          {"dmc", pol::dmc{}.plan(o, L / 2)}};
  for (const auto& [name, p] : plans) {
    for (std::int64_t h = 0; h < Hkv; ++h) {
      ASSERT_EQ(p.keep.kept(h), L / 2);
      for (std::int64_t i = 0; i < L / 2; ++i) ASSERT_EQ(p.keep.heads[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)], 2 * i);
    }
    for (kv::storage kind : {kv::storage::f32, kv::storage::f16, kv::storage::int8}) {
      SCOPED_TRACE(testing::Message() << name << " " << kv::storage_name(kind));
      kv::layer_cache merged({.kind = kind, .Hkv = Hkv, .capacity = L, .D = D, .quant = {8, 16, 16}});
      merged.append(k, v);
      kv::layer_cache dropped = merged;
      kv::merge(merged, p);
      dropped.compact(p.keep);
      tensor<float, 3> om({Hq, 1, Dv}), od({Hq, 1, Dv});
      kv::decode(merged, q, om);
      kv::decode(dropped, q, od);
      const double em = mnemo::test::max_abs_diff(om, full), ed = mnemo::test::max_abs_diff(od, full);
      EXPECT_LT(em, 0.5 * ed) << "merged " << em << ", dropped " << ed;
      RecordProperty(std::string(name) + " " + kv::storage_name(kind) + " merged/dropped error",
                     std::to_string(em) + " / " + std::to_string(ed));
    }
  }
}

TEST(Merge, EmptyHeadsAndEmptyPlans) {
  kv::layer_cache c({.kind = kv::storage::int4, .Hkv = 2, .capacity = 40, .D = 8, .quant = {8, 16, 16}});
  const tensor<float, 3> k = normal3(2, 30, 8, 30);
  c.append(k, k);
  kv::merge_plan p;
  p.keep.heads = {{}, {1, 2}};
  p.folds = {{}, {{0, 1, 1.0f}, {29, 2, 0.5f}}};
  kv::merge(c, p);
  EXPECT_EQ(c.length(0), 0);
  EXPECT_EQ(c.length(1), 2);
  tensor<float, 3> q = normal3(2, 1, 8, 31), out({2, 1, 8});
  kv::decode(c, q, out);
  for (std::int64_t e = 0; e < 8; ++e) EXPECT_EQ(out(0, 0, e), 0.0f);  // a head with no slot gives 0
  // A plan over empty heads: nothing to do; an eviction plan is a compaction.
  kv::merge_plan none = kv::eviction_plan(kv::selection{{{}, {}}});
  kv::merge(c, none);
  EXPECT_EQ(c.total_length(), 0);
  kv::merge(c, none);
  EXPECT_EQ(c.total_length(), 0);
}

TEST(Merge, BadPlansThrowAndChangeNothing) {
  kv::layer_cache c({.kind = kv::storage::int8, .Hkv = 2, .capacity = 40, .D = 8, .quant = {8, 16, 16}});
  const tensor<float, 3> k = normal3(2, 30, 8, 40);
  c.append(k, k);
  const tensor<float, 3> before = c.values();
  auto good = [] {
    kv::merge_plan p;
    p.keep.heads = {{0, 5}, {3}};
    p.folds = {{{1, 0, 0.5f}, {7, 5, 1.0f}}, {{4, 3, 2.0f}}};
    return p;
  };
  kv::merge_plan p = good();
  p.folds.pop_back();  // wrong head count
  mnemo::test::expect_error([&] { kv::merge(c, p); }, {"kvcache::merge", "plan.folds.size()", "expected 2", "got 1"});
  p = good();
  p.folds[0][1].into = 6;  // target slot evicted
  mnemo::test::expect_error([&] { kv::merge(c, p); }, {"kvcache::merge", "plan.folds[0][1].into", "kept slot", "got 6", "evicted"});
  p = good();
  p.folds[1][0].weight = -1.0f;  // negative weight
  mnemo::test::expect_error([&] { kv::merge(c, p); }, {"kvcache::merge", "plan.folds[1][0].weight", ">= 0", "got -1"});
  p = good();
  p.folds[0][0].from = 5;  // a kept slot cannot fold
  mnemo::test::expect_error([&] { kv::merge(c, p); }, {"plan.folds[0][0].from", "evicted slot", "got 5", "kept"});
  p = good();
  p.folds[0][0].from = 30;
  mnemo::test::expect_error([&] { kv::merge(c, p); }, {"plan.folds[0][0].from", "[0, 30)", "got 30"});
  p = good();
  p.keep.heads.pop_back();
  mnemo::test::expect_error([&] { kv::merge(c, p); }, {"kvcache::merge", "selection.heads.size()", "expected 2", "got 1"});
  p = good();
  p.self = {{0.0f, 1.0f}};
  mnemo::test::expect_error([&] { kv::merge(c, p); }, {"plan.self.size()", "expected 2", "got 1"});
  p.self = {{0.0f}, {1.0f}};
  mnemo::test::expect_error([&] { kv::merge(c, p); }, {"plan.self[0]", "expected 2", "got 1"});
  p.self = {{0.0f, 1.0f}, {1.0f}};
  p.folds[0] = {{7, 5, 1.0f}};  // slot 0 keeps weight 0 and receives nothing: 0 / 0 under the mean
  mnemo::test::expect_error([&] { kv::merge(c, p); }, {"kept slot 0 of kv head 0", "merge_rule::mean", "got 0"});
  p = good();
  p.rule = kv::merge_rule::sum;
  p.folds[1][0].weight = 3e38f;  // a merged value int8 cannot hold
  mnemo::test::expect_error([&] { kv::merge(c, p); }, {"kvcache::merge", "merged value of kv head 1", "int8"});
  EXPECT_EQ(c.length(0), 30);
  EXPECT_EQ(c.length(1), 30);
  EXPECT_EQ(mnemo::test::max_abs_diff(c.values(), before), 0.0);
  // The reference and the policies check their arguments too.
  mnemo::test::expect_error([&] { kv::reference::merge(good(), k, tensor<float, 3>({2, 29, 8})); },
                            {"kvcache::reference::merge", "v", "[2, 30, 8]"});
  pol::observation o{k, k, {}, {}};
  pol::cam bad_cam;
  bad_cam.merge_window = 0;
  const tensor<float, 2> attn = column_sums(normal3(2, 3, 8, 41), k);
  o.attn = attn;
  mnemo::test::expect_error([&] { bad_cam.plan(o, 4); }, {"kvcache::policies::cam::plan", "merge_window", "got 0"});
  mnemo::test::expect_error([&] { pol::moviechat{}.plan(o, -1); }, {"kvcache::policies::moviechat::plan", "budget", "got -1"});
  tensor<float, 2> omega({2, 30});
  std::fill(omega.begin(), omega.end(), 1.0f);
  omega(1, 3) = 0.0f;
  mnemo::test::expect_error([&] { pol::dmc{{}, omega}.plan(o, 4); }, {"kvcache::policies::dmc::plan", "omega", "> 0", "[1, 3]"});
  pol::dmc::decoder dec(2);
  const std::vector<float> one = {1.0f}, two = {1.0f, 1.0f}, bad = {1.0f, -2.0f};
  mnemo::test::expect_error([&] { dec.step(one, two); }, {"dmc::decoder::step", "alpha", "Hkv = 2", "got 1"});
  mnemo::test::expect_error([&] { dec.step(two, bad); }, {"dmc::decoder::step", "omega[1]", "> 0", "got -2"});
  // set_slots checks its slots.
  const std::vector<std::int64_t> slots = {3, 3};
  tensor<float, 2> rows({2, 8});
  mnemo::test::expect_error([&] { c.set_slots(0, slots, {}, rows); }, {"kvcache::layer_cache::set_slots", "ascending"});
}

}  // namespace
