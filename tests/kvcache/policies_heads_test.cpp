// Tests of kvcache/policies/{duo_attention, simlayerkv, lagkv, dms}.hpp: each against a plain
// double-precision reference of its paper's equations written here, on random observations with
// awkward sizes (L odd, L below the budget, GQA groups of 3, heads with no slot); a case where the
// method decides right for a known reason (DuoAttention: a sink-dominated head streams, a needle
// head retrieves; SimLayerKV: a sink-dominated layer is lazy, a needle layer is not; LagKV: the
// tokens unlike their lag reference are kept; DMS: a marked token stays readable for w steps and
// then leaves); the decode trackers followed across append / observe / select / compact; and bad
// inputs throwing mnemo::error that names the argument.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "mnemo/kvcache/policies/dms.hpp"
#include "mnemo/kvcache/policies/duo_attention.hpp"
#include "mnemo/kvcache/policies/lagkv.hpp"
#include "mnemo/kvcache/policies/simlayerkv.hpp"
#include "support/support.hpp"

namespace {

using namespace mnemo;
namespace pol = mnemo::kvcache::policies;
using kvcache::selection;
using rows = std::vector<std::vector<std::int64_t>>;

// ---------------------------------------------------------------------------------------------
// Inputs and plain references.

struct inputs {
  tensor<float, 3> k, v, q;  // [Hkv, L, D], [Hkv, L, Dv], [Hq, Lw, D]
  tensor<float, 2> attn;     // [Hq, L]: column sums of the last Lw causal rows
  pol::observation obs() const { return {k, v, q, attn}; }
};

// attn[h, j] = sum over the last Lw rows i (causal: row i sees keys j <= L - Lw + i) of softmax_j(q k / sqrt(D)).
tensor<float, 2> window_sums(const tensor<float, 3>& q, const tensor<float, 3>& k) {
  const std::int64_t Hq = q.extent(0), Lw = q.extent(1), D = q.extent(2), Hkv = k.extent(0), L = k.extent(1);
  tensor<float, 2> attn({Hq, L});
  std::vector<double> s(static_cast<std::size_t>(L));
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lw; ++i) {
      const std::int64_t n = L - Lw + i + 1;
      double m = -1e300, sum = 0;
      for (std::int64_t j = 0; j < n; ++j) {
        double dot = 0;
        for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(q(h, i, c)) * k(h / (Hq / Hkv), j, c);
        s[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(D));
        m = std::max(m, s[static_cast<std::size_t>(j)]);
      }
      for (std::int64_t j = 0; j < n; ++j) sum += std::exp(s[static_cast<std::size_t>(j)] - m);
      for (std::int64_t j = 0; j < n; ++j) attn(h, j) += static_cast<float>(std::exp(s[static_cast<std::size_t>(j)] - m) / sum);
    }
  return attn;
}

inputs random_inputs(std::int64_t Hq, std::int64_t Hkv, std::int64_t L, std::int64_t Lw, std::int64_t D, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  inputs in{tensor<float, 3>({Hkv, L, D}), tensor<float, 3>({Hkv, L, D + 3}), tensor<float, 3>({Hq, Lw, D}), {}};
  for (auto* t : {&in.k, &in.v, &in.q})
    for (auto& x : *t) x = 2.0f * dist(rng);
  in.attn = window_sums(in.q, in.k);
  return in;
}

// The `keep` highest of s (ties: lower index), ascending: the reference of every top-k below.
std::vector<std::int64_t> top_k(const std::vector<double>& s, std::int64_t keep) {
  std::vector<std::int64_t> idx(s.size());
  std::iota(idx.begin(), idx.end(), std::int64_t{0});
  std::stable_sort(idx.begin(), idx.end(),
                   [&](std::int64_t a, std::int64_t b) { return s[static_cast<std::size_t>(a)] > s[static_cast<std::size_t>(b)]; });
  idx.resize(static_cast<std::size_t>(std::min<std::int64_t>(keep, static_cast<std::int64_t>(s.size()))));
  std::sort(idx.begin(), idx.end());
  return idx;
}

// Group sums of attn for kv head h, in double.
std::vector<double> group_sum(const tensor<float, 2>& attn, std::int64_t Hkv, std::int64_t h) {
  const std::int64_t G = attn.extent(0) / Hkv, L = attn.extent(1);
  std::vector<double> a(static_cast<std::size_t>(L), 0.0);
  for (std::int64_t g = 0; g < G; ++g)
    for (std::int64_t j = 0; j < L; ++j) a[static_cast<std::size_t>(j)] += attn(h * G + g, j);
  return a;
}

bool in_set(std::int64_t j, std::int64_t L, std::int64_t sinks, std::int64_t recent) { return j < sinks || j >= L - recent; }

bool keeps(const selection& sel, std::int64_t h, std::int64_t j) {
  const auto& r = sel.heads[static_cast<std::size_t>(h)];
  return std::binary_search(r.begin(), r.end(), j);
}

// DuoAttention from its equations (estimate path): r_h, roles, head budgets, kept sets.
rows duo_reference(const tensor<float, 2>& attn, std::int64_t Hkv, std::int64_t sinks, std::int64_t recent, double recovery,
                   std::int64_t budget) {
  const std::int64_t L = attn.extent(1);
  std::vector<bool> retrieval;
  std::int64_t pool = Hkv * budget, n_r = 0;
  for (std::int64_t h = 0; h < Hkv; ++h) {
    const std::vector<double> a = group_sum(attn, Hkv, h);
    double in = 0, all = 0;
    for (std::int64_t j = 0; j < L; ++j) {
      all += a[static_cast<std::size_t>(j)];
      if (in_set(j, L, sinks, recent)) in += a[static_cast<std::size_t>(j)];
    }
    retrieval.push_back(in / all < recovery);
    if (retrieval.back()) ++n_r;
    else pool -= std::min(L, sinks + recent);
  }
  rows out;
  std::int64_t i = 0;
  for (std::int64_t h = 0; h < Hkv; ++h) {
    std::vector<std::int64_t> row;
    if (!retrieval[static_cast<std::size_t>(h)]) {
      for (std::int64_t j = 0; j < L; ++j)
        if (in_set(j, L, sinks, recent)) row.push_back(j);
    } else {
      const std::int64_t keep = std::min(L, pool / n_r + (i++ < pool % n_r ? 1 : 0));
      std::vector<double> a = group_sum(attn, Hkv, h);
      for (std::int64_t j = 0; j < L; ++j)
        if (in_set(j, L, sinks, recent)) a[static_cast<std::size_t>(j)] = 1e300;
      row = top_k(a, keep);
    }
    out.push_back(row);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// DuoAttention.

TEST(DuoAttention, MatchesTheReferenceOnRandomObservations) {
  struct shape { std::int64_t Hq, Hkv, L, Lw, D; };
  std::int64_t retrieval = 0, streaming = 0;
  for (const shape s : {shape{6, 2, 37, 5, 8}, shape{4, 4, 64, 8, 16}, shape{3, 1, 21, 3, 4}}) {
    const inputs in = random_inputs(s.Hq, s.Hkv, s.L, s.Lw, s.D, static_cast<std::uint32_t>(s.L));
    // Thresholds just below each head's own share (it and the higher ones stream, the lower ones
    // retrieve; clear of rounding) and above all.
    std::vector<double> recoveries = pol::duo_attention{2, 5}.streaming_share(in.obs());
    for (double& r : recoveries) r -= 1e-9;
    recoveries.push_back(1.0);
    for (double recovery : recoveries) {
      const pol::duo_attention p{2, 5, {}, 0.5, recovery};
      for (std::uint8_t r : p.retrieval_heads(in.obs())) (r ? retrieval : streaming) += 1;
      for (std::int64_t budget : {std::int64_t{7}, std::int64_t{12}, s.L, s.L + 9}) {
        const selection sel = p.select(in.obs(), budget);
        EXPECT_EQ(sel.heads, duo_reference(in.attn, s.Hkv, 2, 5, recovery, budget))
            << "L " << s.L << " G " << s.Hq / s.Hkv << " recovery " << recovery << " budget " << budget;
        EXPECT_LE(sel.total_kept(), s.Hkv * budget);
      }
    }
  }
  EXPECT_GE(retrieval, 3);
  EXPECT_GE(streaming, 3);
}

TEST(DuoAttention, SinkHeadStreamsAndNeedleHeadRetrieves) {
  // kv head 0: every query matches the sink key (slot 0); kv head 1: every query matches a
  // needle in the middle (slot 30). G = 3 query heads per kv head.
  const std::int64_t Hq = 6, Hkv = 2, L = 61, Lw = 4, D = 8, needle = 30;
  tensor<float, 3> k({Hkv, L, D}), v({Hkv, L, D}), q({Hq, Lw, D});
  std::mt19937 rng(3);
  std::normal_distribution<float> noise(0.0f, 0.1f);
  for (auto& x : k) x = noise(rng);
  for (auto& x : q) x = noise(rng);
  for (std::int64_t c = 0; c < D; ++c) {
    k(0, 0, c) = 4.0f;
    k(1, needle, c) = 4.0f;
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < Lw; ++i) q(h, i, c) += 2.0f;
  }
  const tensor<float, 2> attn = window_sums(q, k);
  const pol::observation o{k, v, q, attn};
  const pol::duo_attention p{4, 8, {}, 0.5, 0.9};
  const std::vector<double> r = p.streaming_share(o);
  EXPECT_GT(r[0], 0.99);
  EXPECT_LT(r[1], 0.05);
  EXPECT_EQ(p.retrieval_heads(o), (std::vector<std::uint8_t>{0, 1}));
  const selection sel = p.select(o, 16);
  EXPECT_EQ(sel.kept(0), 12) << "the streaming head keeps 4 sinks + 8 recent";
  EXPECT_EQ(sel.kept(1), 20) << "the retrieval head takes the rest of 2 x 16";
  EXPECT_TRUE(keeps(sel, 1, needle));
  EXPECT_FALSE(keeps(sel, 0, needle));
  // Gates [layers, Hkv], the row of observation.layer, clipped to [0, 1] before the threshold.
  const std::vector<float> g = {0.0f, 1.0f, 1.7f, -0.2f};
  pol::duo_attention gated = p;
  gated.gates = view<const float, 2>(g.data(), {2, 2});
  pol::observation at1 = o;
  at1.layer = 1;
  at1.layers = 2;
  EXPECT_EQ(gated.retrieval_heads(at1), (std::vector<std::uint8_t>{1, 0}));
  const selection gsel = gated.select({k, {}, {}, {}, {}, {}, 1, 2}, 16);  // no attention: the newest slots
  EXPECT_EQ(gsel.kept(1), 12);
  EXPECT_EQ(gsel.kept(0), 20);
  for (std::int64_t j = 0; j < L; ++j)  // 4 sinks and the 16 newest
    EXPECT_EQ(keeps(gsel, 0, j), j < 4 || j >= L - 16) << "slot " << j;
}

TEST(DuoAttention, DecoderKeepsTheRolesAndTheBudget) {
  const std::int64_t Hq = 6, Hkv = 2, L = 40, budget = 14;
  const inputs in = random_inputs(Hq, Hkv, L, 6, 8, 17);
  const pol::duo_attention p{2, 4, {}, 0.5, 0.5};
  const std::vector<std::uint8_t> roles = {0, 1};
  pol::duo_attention::decoder dec(p, roles);
  for (std::int64_t j = 0; j < L; ++j)
    for (std::int64_t h = 0; h < Hkv; ++h) dec.append(h);
  dec.observe(in.attn);
  // The prefill rule on the same sums, with the same roles (given as gates).
  const std::vector<float> g = {0.0f, 1.0f};
  pol::duo_attention gated = p;
  gated.gates = view<const float, 2>(g.data(), {1, 2});
  EXPECT_EQ(dec.select(budget).heads, gated.select(in.obs(), budget).heads);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int step = 0; step < 30; ++step) {
    const selection sel = dec.select(budget);
    kvcache::validate("duo decoder", sel, dec.lengths());
    EXPECT_EQ(sel.kept(0), std::min<std::int64_t>(dec.length(0), 6));
    EXPECT_EQ(sel.kept(1), std::min<std::int64_t>(dec.length(1), 2 * budget - 6));
    for (std::int64_t h = 0; h < Hkv; ++h) {
      EXPECT_TRUE(keeps(sel, h, 0));
      EXPECT_TRUE(keeps(sel, h, dec.length(h) - 1));
    }
    dec.compact(sel);
    for (std::int64_t h = 0; h < Hkv; ++h) dec.append(h);
    const std::vector<std::int64_t> n = dec.lengths();
    tensor<float, 2> probs({Hq, *std::max_element(n.begin(), n.end())});
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t j = 0; j < n[static_cast<std::size_t>(h / 3)]; ++j) probs(h, j) = u(rng);
    dec.observe(probs);
  }
  pol::duo_attention::decoder fresh(p, roles);  // heads with no slot: empty selections
  EXPECT_EQ(fresh.select(budget).heads, rows(2));
}

// ---------------------------------------------------------------------------------------------
// SimLayerKV.

TEST(SimLayerKV, MatchesTheReferenceOnRandomObservations) {
  for (std::int64_t L : {std::int64_t{9}, std::int64_t{37}, std::int64_t{50}}) {
    const std::int64_t Hq = 6, Hkv = 2;
    const inputs in = random_inputs(Hq, Hkv, L, 4, 8, static_cast<std::uint32_t>(L + 1));
    const std::int64_t ni = 2, rec = 6;
    double in_set_sum = 0, all = 0;
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t j = 0; j < L; ++j) {
        all += in.attn(h, j);
        if (in_set(j, L, ni, rec)) in_set_sum += in.attn(h, j);
      }
    const double share = in_set_sum / all;
    for (double threshold : {share - 0.01, share + 0.01}) {
      const pol::simlayerkv p{ni, rec, threshold, 0};
      EXPECT_NEAR(p.lazy_share(in.obs()), share, 1e-12);
      EXPECT_EQ(p.is_lazy(in.obs()), share > threshold);
      for (std::int64_t budget : {std::int64_t{8}, std::int64_t{13}, L, L + 4}) {
        rows want;
        for (std::int64_t h = 0; h < Hkv; ++h) {
          std::vector<double> a = group_sum(in.attn, Hkv, h);
          std::vector<std::int64_t> row;
          if (share > threshold) {
            for (std::int64_t j = 0; j < L; ++j)
              if (in_set(j, L, ni, rec)) row.push_back(j);
          } else {
            for (std::int64_t j = 0; j < L; ++j)
              if (in_set(j, L, ni, rec)) a[static_cast<std::size_t>(j)] = 1e300;
            row = top_k(a, budget);
          }
          want.push_back(row);
        }
        EXPECT_EQ(p.select(in.obs(), budget).heads, want) << "L " << L << " budget " << budget << " lazy " << (share > threshold);
      }
    }
  }
}

TEST(SimLayerKV, SinkLayerIsLazyAndNeedleLayerIsNot) {
  const std::int64_t Hq = 4, Hkv = 2, L = 64, Lw = 4, D = 8;
  auto layer = [&](std::int64_t hot) {
    tensor<float, 3> k({Hkv, L, D}), q({Hq, Lw, D});
    std::mt19937 rng(7);
    std::normal_distribution<float> noise(0.0f, 0.1f);
    for (auto& x : k) x = noise(rng);
    for (auto& x : q) x = 2.0f + noise(rng);
    for (std::int64_t h = 0; h < Hkv; ++h)
      for (std::int64_t c = 0; c < D; ++c) k(h, hot, c) = 4.0f;
    return std::pair{k, window_sums(q, k)};
  };
  const pol::simlayerkv p{4, 8, 0.9, 0};
  const auto [k_sink, a_sink] = layer(0);
  const auto [k_needle, a_needle] = layer(30);
  EXPECT_TRUE(p.is_lazy({k_sink, {}, {}, a_sink}));
  EXPECT_FALSE(p.is_lazy({k_needle, {}, {}, a_needle}));
  const selection lazy = p.select({k_sink, {}, {}, a_sink}, 20);
  EXPECT_EQ(lazy.kept(0), 12);
  const selection active = p.select({k_needle, {}, {}, a_needle}, 20);
  EXPECT_EQ(active.kept(0), 20);
  EXPECT_TRUE(keeps(active, 1, 30));
  EXPECT_EQ(p.select({k_needle, {}, {}, a_needle}, L).kept(1), L) << "an active layer keeps everything at budget >= L";
  // The last keep_last_layers layers are never lazy.
  const pol::simlayerkv last{4, 8, 0.9, 1};
  EXPECT_FALSE(last.is_lazy({k_sink, {}, {}, a_sink, {}, {}, 3, 4}));
  EXPECT_TRUE(last.is_lazy({k_sink, {}, {}, a_sink, {}, {}, 2, 4}));
}

TEST(SimLayerKV, DecoderDecidesOnTheFirstStepAndFollowsTheCache) {
  const std::int64_t Hq = 6, Hkv = 2, budget = 10;
  const pol::simlayerkv p{2, 4, 0.8, 0};
  for (bool sinky : {true, false}) {
    pol::simlayerkv::decoder dec(Hkv, p);
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    for (int step = 0; step < 40; ++step) {
      for (std::int64_t h = 0; h < Hkv; ++h) dec.append(h);
      const std::vector<std::int64_t> n = dec.lengths();
      tensor<float, 2> probs({Hq, n[0]});
      for (std::int64_t h = 0; h < Hq; ++h)
        for (std::int64_t j = 0; j < n[0]; ++j) probs(h, j) = sinky && j == 0 ? 1.0f : (sinky ? 0.0f : u(rng));
      if (step == 0) {
        EXPECT_FALSE(dec.lazy().has_value());
      }
      dec.observe(probs);
      if (!sinky && step == 0) {
        // One slot: everything is in I u R, so the first step cannot tell. Decide explicitly, as a
        // prefill's is_lazy would.
        dec.set_lazy(false);
      }
      ASSERT_TRUE(dec.lazy().has_value());
      EXPECT_EQ(*dec.lazy(), sinky);
      if (!pol::should_compress(n, budget)) continue;
      const selection sel = dec.select(budget);
      kvcache::validate("simlayerkv decoder", sel, n);
      for (std::int64_t h = 0; h < Hkv; ++h) {
        EXPECT_EQ(sel.kept(h), sinky ? 6 : budget);
        EXPECT_TRUE(keeps(sel, h, 0) && keeps(sel, h, 1) && keeps(sel, h, n[0] - 1));
      }
      dec.compact(sel);
    }
  }
  EXPECT_EQ(pol::simlayerkv::decoder(Hkv, p).select(budget).heads, rows(2)) << "heads with no slot";
}

// ---------------------------------------------------------------------------------------------
// LagKV.

// s_j of the header's equations, in double: chunks of `lag` after `sinks`, each against the next.
std::vector<double> lag_reference_scores(const tensor<float, 3>& k, const tensor<float, 3>& v, std::int64_t h, std::int64_t sinks,
                                         std::int64_t lag, double v_weight, std::int64_t chunks) {
  std::vector<double> s;
  for (std::int64_t i = 0; i < chunks; ++i) {
    std::vector<double> part(static_cast<std::size_t>(lag), 0.0);
    for (const tensor<float, 3>* x : {&k, &v}) {
      const std::int64_t D = x->extent(2), s0 = sinks + i * lag;
      std::vector<double> sigma;
      for (std::int64_t t = s0; t < s0 + lag; ++t) {
        std::vector<double> z;
        for (std::int64_t c = 0; c < D; ++c) {
          double lo = 1e300, hi = -1e300;
          for (std::int64_t r = s0 + lag; r < s0 + 2 * lag; ++r) {
            lo = std::min(lo, static_cast<double>((*x)(h, r, c)));
            hi = std::max(hi, static_cast<double>((*x)(h, r, c)));
          }
          z.push_back(((*x)(h, t, c) - lo) / (hi - lo));
        }
        const double mean = std::accumulate(z.begin(), z.end(), 0.0) / static_cast<double>(D);
        double var = 0;
        for (double e : z) var += (e - mean) * (e - mean);
        sigma.push_back(std::sqrt(var / static_cast<double>(D - 1)));
      }
      double den = 0;
      for (double e : sigma) den += std::exp(e);
      for (std::int64_t t = 0; t < lag; ++t)
        part[static_cast<std::size_t>(t)] += (x == &k ? 1.0 : v_weight) * std::exp(sigma[static_cast<std::size_t>(t)]) / den;
    }
    s.insert(s.end(), part.begin(), part.end());
  }
  return s;
}

// The kept set: sinks, then the newest tail slots, then each chunk its share (the first chunks one
// more while the remainder lasts), by s.
std::vector<std::int64_t> lag_reference_keep(const std::vector<double>& s, std::int64_t L, std::int64_t sinks, std::int64_t lag,
                                             std::int64_t chunks, std::int64_t budget) {
  std::vector<std::int64_t> row;
  const std::int64_t tail = sinks + chunks * lag;
  std::int64_t left = budget;
  for (std::int64_t j = 0; j < std::min(sinks, L) && left > 0; ++j, --left) row.push_back(j);
  for (std::int64_t j = L - 1; j >= std::max(tail, sinks) && left > 0; --j, --left) row.push_back(j);
  if (chunks > 0 && left > 0) {
    for (std::int64_t i = 0; i < chunks; ++i) {
      const std::int64_t share = std::min(lag, left / chunks + (i < left % chunks ? 1 : 0));
      const std::vector<double> part(s.begin() + i * lag, s.begin() + (i + 1) * lag);
      for (std::int64_t t : top_k(part, share)) row.push_back(sinks + i * lag + t);
    }
  }
  std::sort(row.begin(), row.end());
  return row;
}

TEST(LagKV, MatchesTheReferenceOnRandomObservations) {
  struct shape { std::int64_t L, sinks, lag; };
  for (const shape s : {shape{37, 3, 5}, shape{64, 4, 8}, shape{21, 2, 10}, shape{3, 4, 4}}) {
    const std::int64_t Hkv = 2, D = 7;
    const inputs in = random_inputs(2 * Hkv, Hkv, s.L, 1, D, static_cast<std::uint32_t>(s.L * 3));
    const pol::lagkv p{s.sinks, s.lag, 0.5};
    const std::int64_t chunks = s.L > s.sinks ? std::max<std::int64_t>(0, (s.L - s.sinks) / s.lag - 1) : 0;
    EXPECT_EQ(p.chunks_of(s.L).chunks, chunks);
    tensor<float, 2> raw({Hkv, s.L});
    p.raw_scores(in.obs(), raw);
    for (std::int64_t h = 0; h < Hkv; ++h) {
      const std::vector<double> want = lag_reference_scores(in.k, in.v, h, s.sinks, s.lag, 0.5, chunks);
      for (std::int64_t j = 0; j < chunks * s.lag; ++j)
        EXPECT_NEAR(raw(h, s.sinks + j), want[static_cast<std::size_t>(j)], 1e-6) << "L " << s.L << " slot " << s.sinks + j;
      for (std::int64_t budget : {std::int64_t{2}, std::int64_t{10}, std::int64_t{17}, s.L, s.L + 3})
        EXPECT_EQ(p.select(in.obs(), budget).heads[static_cast<std::size_t>(h)],
                  lag_reference_keep(want, s.L, s.sinks, s.lag, chunks, budget))
            << "L " << s.L << " lag " << s.lag << " budget " << budget << " head " << h;
    }
  }
}

TEST(LagKV, KeepsTheTokensUnlikeTheirLagReference) {
  // Every token a copy of one pattern with a little noise, except slots 9 and 22 (chunks 0 and 1),
  // whose keys and values swing far outside the next chunk's range.
  const std::int64_t Hkv = 1, L = 40, D = 8, sinks = 4, lag = 8;
  tensor<float, 3> k({Hkv, L, D}), v({Hkv, L, D});
  std::mt19937 rng(13);
  std::normal_distribution<float> noise(0.0f, 0.05f);
  for (std::int64_t j = 0; j < L; ++j)
    for (std::int64_t c = 0; c < D; ++c) {
      k(0, j, c) = static_cast<float>(c) + noise(rng);
      v(0, j, c) = -static_cast<float>(c) + noise(rng);
    }
  for (std::int64_t j : {9, 22})
    for (std::int64_t c = 0; c < D; ++c) {
      k(0, j, c) += c % 2 ? 3.0f : -3.0f;
      v(0, j, c) += c % 2 ? -3.0f : 3.0f;
    }
  const pol::lagkv p{sinks, lag, 1.0};
  ASSERT_EQ(p.chunks_of(L).chunks, 3);  // chunks at 4, 12, 20; tail [28, 40)
  const selection sel = p.select({k, v, {}, {}}, sinks + 12 + 3);  // one slot per chunk
  std::vector<std::int64_t> want = {0, 1, 2, 3, 9, 22};
  for (std::int64_t j = 28; j < 40; ++j) want.push_back(j);
  const auto& row = sel.heads[0];
  EXPECT_EQ(row.size(), 19u);
  for (std::int64_t j : want) EXPECT_TRUE(keeps(sel, 0, j)) << "slot " << j;
}

// ---------------------------------------------------------------------------------------------
// DMS.

// Readable: unmarked (z <= theta) or marked at most w steps ago; of those, the `budget` lowest z.
std::vector<std::int64_t> dms_reference(const std::vector<float>& z, std::int64_t w, float theta, std::int64_t budget) {
  const auto L = static_cast<std::int64_t>(z.size());
  std::vector<double> s;
  std::int64_t live = 0;
  for (std::int64_t j = 0; j < L; ++j) {
    const bool ok = !(z[static_cast<std::size_t>(j)] > theta) || L - 1 - j <= w;
    live += ok;
    s.push_back(ok ? -static_cast<double>(z[static_cast<std::size_t>(j)]) : -1e300);
  }
  return top_k(s, std::min(live, budget));
}

TEST(DMS, PrefillAndDecoderMatchTheReference) {
  const std::int64_t Hkv = 3, L = 37;
  std::mt19937 rng(19);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  tensor<float, 2> z({Hkv, L});
  for (auto& x : z) x = dist(rng);
  const tensor<float, 3> k({Hkv, L, 4});
  for (std::int64_t w : {std::int64_t{0}, std::int64_t{5}, std::int64_t{40}})
    for (std::int64_t budget : {std::int64_t{6}, std::int64_t{20}, L + 2}) {
      const pol::dms p{w, 0.5f, z};
      const selection pre = p.select({k, {}, {}, {}}, budget);
      pol::dms::decoder dec(Hkv, p);
      for (std::int64_t j = 0; j < L; ++j)
        for (std::int64_t h = 0; h < Hkv; ++h) dec.append(h, z(h, j));
      const selection post = dec.select(budget);
      for (std::int64_t h = 0; h < Hkv; ++h) {
        const std::vector<float> row(z.data() + h * L, z.data() + (h + 1) * L);
        EXPECT_EQ(pre.heads[static_cast<std::size_t>(h)], dms_reference(row, w, 0.5f, budget)) << "w " << w << " budget " << budget;
      }
      EXPECT_EQ(post.heads, pre.heads) << "the decoder at the prompt's last step is the prefill rule";
    }
}

TEST(DMS, MarkedTokenStaysReadableForWStepsThenLeaves) {
  const std::int64_t w = 4, budget = 100;
  pol::dms::decoder dec(2, pol::dms{w, 0.0f, {}});
  // Head 0: the token of step 3 is marked (z = 2); head 1: nothing is marked.
  for (std::int64_t t = 0; t < 12; ++t) {
    dec.append(0, t == 3 ? 2.0f : -1.0f);
    dec.append(1, -1.0f);
    const selection sel = dec.select(budget);
    kvcache::validate("dms decoder", sel, dec.lengths());
    const bool alive = std::find(dec.logits(0).begin(), dec.logits(0).end(), 2.0f) != dec.logits(0).end();
    if (t >= 3 && t <= 3 + w) {
      EXPECT_TRUE(alive && sel.kept(0) == dec.length(0)) << "step " << t << ": readable for w steps";
      EXPECT_FALSE(dec.should_compress(budget)) << "step " << t;
    }
    if (t == 3 + w + 1) {
      EXPECT_TRUE(dec.should_compress(budget));
      EXPECT_EQ(sel.kept(0), dec.length(0) - 1) << "step " << t << ": the marked token leaves";
      EXPECT_FALSE(keeps(sel, 0, 3));
    }
    EXPECT_EQ(sel.kept(1), dec.length(1));
    dec.compact(sel);
    EXPECT_EQ(dec.age(1, dec.length(1) - 1), 0);
  }
  EXPECT_EQ(dec.length(0), 11);
  EXPECT_EQ(dec.length(1), 12);
  EXPECT_EQ(dec.age(0, 0), 11) << "ages follow compaction";
  // Over the budget, the highest logits leave first: the marked ones before any unmarked.
  pol::dms::decoder cap(1, pol::dms{100, 0.0f, {}});
  for (float z : {-3.0f, 1.5f, -0.5f, 0.7f, -2.0f}) cap.append(0, z);
  EXPECT_EQ(cap.select(3).heads[0], (std::vector<std::int64_t>{0, 2, 4}));
  EXPECT_EQ(cap.select(2).heads[0], (std::vector<std::int64_t>{0, 4}));
  cap.observe(tensor<float, 2>({1, 5}));  // a no-op
  EXPECT_EQ(cap.length(0), 5);
  EXPECT_EQ(pol::dms::decoder(2, pol::dms{}).select(4).heads, rows(2)) << "heads with no slot";
}

// ---------------------------------------------------------------------------------------------
// Empty heads and bad inputs.

TEST(PolicyHeads, NoSlotGivesEmptySelections) {
  const float dummy[1] = {0.0f};
  const view<const float, 3> k0(dummy, {2, 0, 4}), q0(dummy, {4, 0, 4});
  const view<const float, 2> a0(dummy, {4, 0}), z0(dummy, {2, 0});
  const pol::observation o{k0, k0, {}, a0};
  EXPECT_EQ(pol::duo_attention{}.select(o, 0).heads, rows(2));
  EXPECT_EQ(pol::simlayerkv{}.select(o, 0).heads, rows(2));
  EXPECT_EQ(pol::lagkv{}.select(o, 3).heads, rows(2));
  EXPECT_EQ((pol::dms{8, 0.0f, z0}.select(o, 3).heads), rows(2));
}

TEST(PolicyHeads, BadInputsThrow) {
  using test::expect_error;
  const inputs in = random_inputs(6, 2, 30, 4, 8, 23);
  const pol::observation o = in.obs();
  const pol::observation no_attn{in.k, in.v, in.q, {}};
  // DuoAttention
  expect_error([&] { pol::duo_attention{}.select(no_attn, 300); }, {"duo_attention::select", "observation.attn"});
  expect_error([&] { pol::duo_attention{4, 8}.select(o, 11); }, {"duo_attention::select", "budget must be >= 12", "got 11"});
  expect_error([&] { pol::duo_attention{-1, 8}.select(o, 20); }, {"n_sink and recent must be >= 0", "got -1"});
  expect_error([&] { pol::duo_attention{4, 8, {}, 0.5, 1.5}.select(o, 20); }, {"recovery must be in [0, 1]", "got 1.5"});
  const std::vector<float> g(6, 1.0f);
  expect_error([&] { pol::duo_attention{4, 8, view<const float, 2>(g.data(), {3, 2})}.select(o, 20); },
               {"gates", "[1, 2]", "[3, 2]"});
  pol::observation at5 = o;
  at5.layer = 5;
  at5.layers = 3;
  expect_error([&] { pol::duo_attention{4, 8, view<const float, 2>(g.data(), {3, 2})}.select(at5, 20); },
               {"observation.layer must be in [0, layers = 3)", "got 5"});
  expect_error([&] { pol::duo_attention::decoder(pol::duo_attention{}, {}); }, {"retrieval", "got 0"});
  pol::duo_attention::decoder duo(pol::duo_attention{1, 1}, {1, 0});
  duo.append(0);
  expect_error([&] { duo.observe(tensor<float, 2>({3, 1})); }, {"duo_attention::decoder::observe", "multiple of Hkv = 2", "got [3, 1]"});
  expect_error([&] { duo.select(0); }, {"duo_attention::decoder::select", "budget must be >= 1", "got 0"});
  expect_error([&] { pol::duo_attention{}.head_budgets({1}, {5, 5}, 5); }, {"head_budgets", "one flag per kv head (2)", "got 1"});
  expect_error([&] { duo.append(2); }, {"head must be in [0, 2)", "got 2"});
  // SimLayerKV
  expect_error([&] { pol::simlayerkv{}.select(no_attn, 30); }, {"simlayerkv::select", "observation.attn"});
  expect_error([&] { pol::simlayerkv{2, 6}.select(o, 7); }, {"simlayerkv::select", "budget must be >= 8", "got 7"});
  expect_error([&] { pol::simlayerkv{2, 6, 1.2}.select(o, 30); }, {"threshold must be in [0, 1]", "got 1.2"});
  expect_error([&] { pol::simlayerkv{2, 6, 0.9, -1}.select(o, 30); }, {"keep_last_layers must be >= 0", "got -1"});
  expect_error([&] { pol::simlayerkv{}.is_lazy(at5); }, {"observation.layer must be in [0, layers = 3)", "got 5"});
  expect_error([&] { pol::simlayerkv::decoder(2, pol::simlayerkv{}, 4, 4); }, {"layer must be in [0, layers = 4)", "got 4"});
  expect_error([&] { pol::simlayerkv::decoder(0, pol::simlayerkv{}); }, {"Hkv must be >= 1", "got 0"});
  tensor<float, 2> bad_scores({2, 29});
  expect_error([&] { pol::simlayerkv{2, 6}.scores(o, bad_scores); }, {"scores", "[2, 30]", "[2, 29]"});
  // LagKV
  expect_error([&] { pol::lagkv{}.select({in.k, {}, {}, {}}, 10); }, {"lagkv::select", "observation.v"});
  expect_error([&] { pol::lagkv{4, 0}.select(o, 10); }, {"lag must be >= 1", "got 0"});
  expect_error([&] { pol::lagkv{-2, 4}.select(o, 10); }, {"n_sink must be >= 0", "got -2"});
  expect_error([&] { pol::lagkv{4, 4, -1.0}.select(o, 10); }, {"v_weight must be >= 0", "got -1"});
  expect_error([&] { pol::lagkv{}.select(o, -3); }, {"budget must be >= 0", "got -3"});
  tensor<float, 3> bad_v({2, 29, 8});
  expect_error([&] { pol::lagkv{}.select({in.k, bad_v, {}, {}}, 10); }, {"observation.v", "L = 30", "[2, 29, 8]"});
  // DMS
  expect_error([&] { pol::dms{}.select(o, 10); }, {"dms::select", "logits [Hkv, L]"});
  tensor<float, 2> z({2, 31});
  expect_error([&] { pol::dms{4, 0.0f, z}.select(o, 10); }, {"logits", "[2, 30]", "[2, 31]"});
  tensor<float, 2> z_nan({2, 30});
  z_nan(1, 7) = std::nanf("");
  expect_error([&] { pol::dms{4, 0.0f, z_nan}.select(o, 10); }, {"logits must be finite", "[1, 7]"});
  expect_error([&] { pol::dms{-1}.select(o, 10); }, {"window must be >= 0", "got -1"});
  expect_error([&] { pol::dms::decoder(0, pol::dms{}); }, {"Hkv must be >= 1", "got 0"});
  pol::dms::decoder dec(2, pol::dms{});
  expect_error([&] { dec.append(0, INFINITY); }, {"dms::decoder::append", "must be finite", "inf"});
  expect_error([&] { dec.append(3, 0.0f); }, {"head must be in [0, 2)", "got 3"});
  expect_error([&] { dec.select(-1); }, {"dms::decoder::select", "budget must be >= 0", "got -1"});
  dec.append(0, 0.0f);
  selection wrong;
  wrong.heads = {{0}, {0}};
  expect_error([&] { dec.compact(wrong); }, {"selection.heads[1][0]", "[0, 0)"});
  expect_error([&] { (void)dec.age(0, 1); }, {"slot must be in [0, 1)", "got 1"});
}

}  // namespace
