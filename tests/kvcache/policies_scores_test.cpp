// Tests of the score-based policies expected_attention.hpp, criticalkv.hpp (CriticalKV and
// CriticalAdaKV), leverage.hpp and chunkkv.hpp: each header's scores against a plain double
// reference written here from the paper's equations, the selection against the top of those
// scores (or the method's own rule: two stages, whole chunks), one case per method where it is
// right for a known reason, awkward sizes (L odd, L < budget, L = 0, GQA group 3) and bad inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "mnemo/kvcache/policies/chunkkv.hpp"
#include "mnemo/kvcache/policies/criticalkv.hpp"
#include "mnemo/kvcache/policies/expected_attention.hpp"
#include "mnemo/kvcache/policies/knorm.hpp"
#include "mnemo/kvcache/policies/leverage.hpp"
#include "support/support.hpp"

namespace {

using namespace mnemo;
namespace pol = mnemo::kvcache::policies;
using kvcache::selection;
using mnemo::test::expect_error;
using matrix = std::vector<std::vector<double>>;

// ---------------------------------------------------------------------------------------------
// Inputs: random keys, values and window queries, and the causal column sums of the window rows.

struct inputs {
  tensor<float, 3> k, v, q;  // [Hkv, L, D], [Hkv, L, Dv], [Hq, Lw, D]
  tensor<float, 2> attn;     // [Hq, L]
  pol::observation obs() const { return {k, v, q, attn}; }
};

void fill_attn(inputs& in) {
  const std::int64_t Hq = in.q.extent(0), Lw = in.q.extent(1), D = in.q.extent(2);
  const std::int64_t Hkv = in.k.extent(0), L = in.k.extent(1);
  for (auto& a : in.attn) a = 0.0f;
  std::vector<double> s(static_cast<std::size_t>(L));
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lw; ++i) {
      const std::int64_t n = L - Lw + i + 1;
      double m = -1e300, sum = 0;
      for (std::int64_t j = 0; j < n; ++j) {
        double dot = 0;
        for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(in.q(h, i, c)) * in.k(h / (Hq / Hkv), j, c);
        s[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(D));
        m = std::max(m, s[static_cast<std::size_t>(j)]);
      }
      for (std::int64_t j = 0; j < n; ++j) sum += std::exp(s[static_cast<std::size_t>(j)] - m);
      for (std::int64_t j = 0; j < n; ++j) in.attn(h, j) += static_cast<float>(std::exp(s[static_cast<std::size_t>(j)] - m) / sum);
    }
}

inputs random_inputs(std::int64_t Hq, std::int64_t Hkv, std::int64_t L, std::int64_t Lw, std::int64_t D, std::int64_t Dv,
                     std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  inputs in{tensor<float, 3>({Hkv, L, D}), tensor<float, 3>({Hkv, L, Dv}), tensor<float, 3>({Hq, Lw, D}), tensor<float, 2>({Hq, L})};
  for (auto* t : {&in.k, &in.v, &in.q})
    for (auto& x : *t) x = dist(rng);
  fill_attn(in);
  return in;
}

tensor<float, 2> header_scores(const auto& policy, const pol::observation& o) {
  tensor<float, 2> s({o.k.extent(0), o.k.extent(1)});
  policy.scores(o, s);
  return s;
}

void expect_scores(const tensor<float, 2>& got, const matrix& want, double rtol, const std::string& what) {
  for (std::size_t h = 0; h < want.size(); ++h)
    for (std::size_t j = 0; j < want[h].size(); ++j)
      EXPECT_NEAR(got(static_cast<std::int64_t>(h), static_cast<std::int64_t>(j)), want[h][j], 1e-7 + rtol * std::abs(want[h][j]))
          << what << " head " << h << " slot " << j;
}

// The `keep` best of each row (ties to the lower slot), ascending: the rule the policies use.
selection top_of(const matrix& s, std::int64_t budget) {
  selection sel;
  for (const auto& row : s) {
    std::vector<std::int64_t> order(row.size());
    std::iota(order.begin(), order.end(), std::int64_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return row[static_cast<std::size_t>(a)] > row[static_cast<std::size_t>(b)];
    });
    order.resize(std::min<std::size_t>(order.size(), static_cast<std::size_t>(budget)));
    std::sort(order.begin(), order.end());
    sel.heads.push_back(order);
  }
  return sel;
}

// `sel` is a top-`budget` set of the reference scores: min(budget, L) ascending slots per head, and
// no dropped slot scores above a kept one (beyond float rounding: near-ties may go either way).
void expect_top(const selection& sel, const matrix& want, std::int64_t budget, const std::string& what) {
  ASSERT_EQ(sel.heads.size(), want.size()) << what;
  for (std::size_t h = 0; h < want.size(); ++h) {
    const auto& row = sel.heads[h];
    const auto L = static_cast<std::int64_t>(want[h].size());
    ASSERT_EQ(static_cast<std::int64_t>(row.size()), std::min(budget, L)) << what << " head " << h;
    EXPECT_TRUE(std::is_sorted(row.begin(), row.end()) && std::adjacent_find(row.begin(), row.end()) == row.end()) << what;
    double lowest_kept = 1e300, highest_dropped = -1e300;
    for (std::int64_t j = 0; j < L; ++j) {
      const double v = want[h][static_cast<std::size_t>(j)];
      if (std::binary_search(row.begin(), row.end(), j))
        lowest_kept = std::min(lowest_kept, v);
      else
        highest_dropped = std::max(highest_dropped, v);
    }
    EXPECT_GE(lowest_kept, highest_dropped - 1e-6 * std::abs(highest_dropped)) << what << " head " << h;
  }
}

matrix to_matrix(const tensor<float, 2>& t) {
  matrix m(static_cast<std::size_t>(t.extent(0)), std::vector<double>(static_cast<std::size_t>(t.extent(1))));
  for (std::int64_t h = 0; h < t.extent(0); ++h)
    for (std::int64_t j = 0; j < t.extent(1); ++j) m[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)] = t(h, j);
  return m;
}

bool keeps(const selection& sel, std::int64_t h, std::int64_t j) {
  const auto& row = sel.heads[static_cast<std::size_t>(h)];
  return std::binary_search(row.begin(), row.end(), j);
}

// ---------------------------------------------------------------------------------------------
// Plain linear algebra in double.

matrix zeros(std::int64_t n, std::int64_t m) {
  return matrix(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(m), 0.0));
}
matrix mul(const matrix& a, const matrix& b) {
  matrix c = zeros(static_cast<std::int64_t>(a.size()), static_cast<std::int64_t>(b[0].size()));
  for (std::size_t i = 0; i < a.size(); ++i)
    for (std::size_t l = 0; l < b.size(); ++l)
      for (std::size_t j = 0; j < b[0].size(); ++j) c[i][j] += a[i][l] * b[l][j];
  return c;
}
matrix transpose(const matrix& a) {
  matrix t = zeros(static_cast<std::int64_t>(a[0].size()), static_cast<std::int64_t>(a.size()));
  for (std::size_t i = 0; i < a.size(); ++i)
    for (std::size_t j = 0; j < a[0].size(); ++j) t[j][i] = a[i][j];
  return t;
}
std::vector<double> matvec(const matrix& a, const std::vector<double>& x) {
  std::vector<double> y(a.size(), 0.0);
  for (std::size_t i = 0; i < a.size(); ++i)
    for (std::size_t j = 0; j < x.size(); ++j) y[i] += a[i][j] * x[j];
  return y;
}

// The RoPE rotation at position p as a D x D matrix: half_split pairs (i, i + dim/2) of the first
// dim channels, the identity on the rest.
matrix rope_matrix(double p, std::int64_t D, std::int64_t dim, double base) {
  matrix r = zeros(D, D);
  for (std::int64_t c = dim; c < D; ++c) r[c][c] = 1.0;
  const std::int64_t h = dim / 2;
  for (std::int64_t i = 0; i < h; ++i) {
    const double a = p * std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
    r[i][i] = std::cos(a), r[i][i + h] = -std::sin(a), r[i + h][i] = std::sin(a), r[i + h][i + h] = std::cos(a);
  }
  return r;
}

// Eigenpairs of a symmetric matrix by cyclic Jacobi rotations: values[c], vectors[:, c].
void jacobi(matrix a, std::vector<double>& values, matrix& vectors) {
  const std::size_t n = a.size();
  vectors = zeros(static_cast<std::int64_t>(n), static_cast<std::int64_t>(n));
  for (std::size_t i = 0; i < n; ++i) vectors[i][i] = 1.0;
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (std::size_t p = 0; p < n; ++p)
      for (std::size_t q = p + 1; q < n; ++q) off += a[p][q] * a[p][q];
    if (off < 1e-30) break;
    for (std::size_t p = 0; p < n; ++p)
      for (std::size_t q = p + 1; q < n; ++q) {
        if (a[p][q] == 0.0) continue;
        const double theta = (a[q][q] - a[p][p]) / (2 * a[p][q]);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (std::size_t k = 0; k < n; ++k) {  // A <- A J (columns p, q)
          const double akp = a[k][p], akq = a[k][q];
          a[k][p] = c * akp - s * akq, a[k][q] = s * akp + c * akq;
        }
        for (std::size_t k = 0; k < n; ++k) {  // A <- J^T A (rows p, q)
          const double apk = a[p][k], aqk = a[q][k];
          a[p][k] = c * apk - s * aqk, a[q][k] = s * apk + c * aqk;
        }
        for (std::size_t k = 0; k < n; ++k) {
          const double vkp = vectors[k][p], vkq = vectors[k][q];
          vectors[k][p] = c * vkp - s * vkq, vectors[k][q] = s * vkp + c * vkq;
        }
      }
  }
  values.resize(n);
  for (std::size_t i = 0; i < n; ++i) values[i] = a[i][i];
}

// ---------------------------------------------------------------------------------------------
// ExpectedAttention.

struct ea_params {
  std::int64_t sinks = 4;
  bool covariance = true, value_norm = true, causal = true;
  double epsilon = 0.0, rope_base = 0.0;
  std::int64_t future = 512, rope_dim = 0;
};

// E[exp(q.k/sqrt(D))] over q ~ N(mu, Sigma) of each query head's window rows (positions >= sinks,
// RoPE undone and the average future rotation applied when rope_base > 0), softmax over the
// non-sink slots, group mean, (+ eps) * ||v||, sinks at max + 1.
matrix ref_expected_attention(const inputs& in, const ea_params& p) {
  const std::int64_t Hq = in.q.extent(0), Lw = in.q.extent(1), D = in.q.extent(2);
  const std::int64_t Hkv = in.k.extent(0), L = in.k.extent(1), G = Hq / Hkv, Dv = in.v.extent(2);
  const std::int64_t first_pos = p.causal ? L - Lw : L, dim = p.rope_dim == 0 ? D : p.rope_dim;
  matrix rbar = zeros(D, D);
  if (p.rope_base > 0) {
    for (std::int64_t t = first_pos + Lw; t < first_pos + Lw + p.future; ++t) {
      const matrix r = rope_matrix(static_cast<double>(t), D, dim, p.rope_base);
      for (std::int64_t a = 0; a < D; ++a)
        for (std::int64_t b = 0; b < D; ++b) rbar[a][b] += r[a][b] / static_cast<double>(p.future);
    }
  }
  matrix out = zeros(Hkv, L);
  for (std::int64_t hk = 0; hk < Hkv; ++hk) {
    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g;
      std::vector<std::vector<double>> rows;
      for (std::int64_t i = 0; i < Lw; ++i) {
        const std::int64_t pos = first_pos + i;
        if (pos < p.sinks) continue;
        std::vector<double> q(static_cast<std::size_t>(D));
        for (std::int64_t c = 0; c < D; ++c) q[static_cast<std::size_t>(c)] = in.q(h, i, c);
        if (p.rope_base > 0) q = matvec(transpose(rope_matrix(static_cast<double>(pos), D, dim, p.rope_base)), q);
        rows.push_back(q);
      }
      const double n = static_cast<double>(rows.size());
      std::vector<double> mu(static_cast<std::size_t>(D), 0.0);
      for (const auto& r : rows)
        for (std::int64_t c = 0; c < D; ++c) mu[c] += r[c] / n;
      matrix sigma = zeros(D, D);
      for (const auto& r : rows)
        for (std::int64_t a = 0; a < D; ++a)
          for (std::int64_t b = 0; b < D; ++b) sigma[a][b] += (r[a] - mu[a]) * (r[b] - mu[b]) / n;
      if (p.rope_base > 0) {
        mu = matvec(rbar, mu);
        sigma = mul(rbar, mul(sigma, transpose(rbar)));
      }
      std::vector<double> z(static_cast<std::size_t>(L), 0.0);
      double zmax = -1e300, sum = 0;
      for (std::int64_t j = p.sinks; j < L; ++j) {
        std::vector<double> k(static_cast<std::size_t>(D));
        for (std::int64_t c = 0; c < D; ++c) k[c] = in.k(hk, j, c);
        double lin = 0, quad = 0;
        const std::vector<double> sk = matvec(sigma, k);
        for (std::int64_t c = 0; c < D; ++c) lin += mu[c] * k[c], quad += k[c] * sk[c];
        z[j] = lin / std::sqrt(static_cast<double>(D)) + (p.covariance ? quad / (2.0 * static_cast<double>(D)) : 0.0);
        zmax = std::max(zmax, z[j]);
      }
      for (std::int64_t j = p.sinks; j < L; ++j) sum += std::exp(z[j] - zmax);
      for (std::int64_t j = p.sinks; j < L; ++j) out[hk][j] += std::exp(z[j] - zmax) / sum / static_cast<double>(G);
    }
    for (std::int64_t j = p.sinks; j < L; ++j) {
      double vv = 0;
      for (std::int64_t c = 0; c < Dv; ++c) vv += static_cast<double>(in.v(hk, j, c)) * in.v(hk, j, c);
      out[hk][j] = (out[hk][j] + p.epsilon) * (p.value_norm ? std::sqrt(vv) : 1.0);
    }
  }
  double top = -1e300;
  for (const auto& row : out)
    for (std::int64_t j = p.sinks; j < L; ++j) top = std::max(top, row[j]);
  for (auto& row : out)
    for (std::int64_t j = 0; j < std::min(p.sinks, L); ++j) row[j] = top + 1;
  return out;
}

pol::expected_attention make_ea(const ea_params& p) {
  pol::expected_attention ea;
  ea.sinks = p.sinks, ea.covariance = p.covariance, ea.value_norm = p.value_norm;
  ea.epsilon = static_cast<float>(p.epsilon), ea.rope_base = p.rope_base, ea.future = p.future, ea.rope_dim = p.rope_dim;
  return ea;
}

TEST(ExpectedAttention, ScoresMatchTheGaussianMomentReference) {
  struct shape {
    std::int64_t Hq, Hkv, L, Lw, D, Dv;
  };
  for (const shape s : {shape{6, 2, 37, 7, 8, 6}, shape{3, 1, 20, 20, 6, 5}, shape{4, 4, 9, 3, 4, 4}}) {
    const inputs in = random_inputs(s.Hq, s.Hkv, s.L, s.Lw, s.D, s.Dv, 17);
    std::vector<ea_params> cases(8);
    cases[1].covariance = false;
    cases[2].value_norm = false, cases[2].epsilon = 0.01;
    cases[3].rope_base = 10000.0, cases[3].future = 64;
    cases[4].rope_base = 100.0, cases[4].causal = false, cases[4].future = 5;
    cases[5].sinks = 0, cases[5].epsilon = 0.001;
    cases[6].causal = false, cases[6].sinks = 3;
    cases[7].rope_base = 500.0, cases[7].rope_dim = 2, cases[7].future = 40;  // partial rotary
    for (std::size_t c = 0; c < cases.size(); ++c) {
      const ea_params& p = cases[c];
      const std::string what = "L " + std::to_string(s.L) + " case " + std::to_string(c);
      pol::observation o = in.obs();
      o.causal = p.causal;
      const matrix want = ref_expected_attention(in, p);
      expect_scores(header_scores(make_ea(p), o), want, 2e-5, what);
      for (std::int64_t budget : {std::int64_t{1}, std::int64_t{6}, s.L - 1, s.L + 3})
        expect_top(make_ea(p).select(o, budget), want, budget, what + " budget " + std::to_string(budget));
    }
  }
}

TEST(ExpectedAttention, TheCovarianceFindsTheKeyFutureQueriesSpreadTowards) {
  // Queries: a mean along e0 and a wide spread (+-4) along e1. Keys: small and random, slot 10 a
  // key along e1 (mu . k = 0: a mean-only model sees nothing special), slot 20 a key along e0 half
  // as long. Under the Gaussian model exp(k^T Sigma k / 2D) makes slot 10 the most attended one.
  const std::int64_t Hq = 3, Hkv = 1, L = 31, Lw = 16, D = 4;
  inputs in = random_inputs(Hq, Hkv, L, Lw, D, 4, 23);
  for (auto& x : in.k) x *= 0.1f;
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lw; ++i) {
      for (std::int64_t c = 0; c < D; ++c) in.q(h, i, c) = 0.1f * in.q(h, i, c);
      in.q(h, i, 0) += 2.0f;
      in.q(h, i, 1) = (i % 2 ? 4.0f : -4.0f);
    }
  for (std::int64_t c = 0; c < D; ++c) in.k(0, 10, c) = in.k(0, 20, c) = 0.0f;
  in.k(0, 10, 1) = 3.0f;
  in.k(0, 20, 0) = 1.5f;
  for (auto& x : in.v) x = 0.5f;  // equal value norms: the expected attention alone decides
  fill_attn(in);
  const pol::observation o = in.obs();
  pol::expected_attention ea;
  ea.sinks = 0;
  EXPECT_EQ(ea.select(o, 1).heads[0], std::vector<std::int64_t>{10});
  ea.covariance = false;
  EXPECT_EQ(ea.select(o, 1).heads[0], std::vector<std::int64_t>{20});  // the mean alone prefers e0
}

TEST(ExpectedAttention, SinksAreKeptAndEmptyHeadsGiveEmptySelections) {
  const inputs in = random_inputs(6, 2, 15, 5, 8, 8, 5);
  const selection sel = pol::expected_attention{}.select(in.obs(), 6);
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t j = 0; j < 4; ++j) EXPECT_TRUE(keeps(sel, h, j)) << "sink " << j;
  float dummy = 0;
  const pol::observation empty{view<const float, 3>(&dummy, {2, 0, 8}), view<const float, 3>(&dummy, {2, 0, 8}), {}, {}};
  EXPECT_EQ(pol::expected_attention{}.select(empty, 4).heads, (std::vector<std::vector<std::int64_t>>(2)));
  // L <= sinks: every slot is a sink and kept.
  const inputs tiny = random_inputs(3, 1, 3, 3, 4, 4, 6);
  EXPECT_EQ(pol::expected_attention{}.select(tiny.obs(), 5).heads[0], (std::vector<std::int64_t>{0, 1, 2}));
}

// ---------------------------------------------------------------------------------------------
// CriticalKV / CriticalAdaKV.

tensor<float, 3> random_wo(std::int64_t Hq, std::int64_t Dv, std::int64_t Dm, std::uint32_t seed) {
  return mnemo::test::random_tensor<float, 3>({Hq, Dv, Dm}, seed);
}

// n[hk][j] = mean over the group of sum_m |sum_c v[hk, j, c] w_o[h, c, m]|.
matrix ref_projected_norms(const inputs& in, const tensor<float, 3>& w_o) {
  const std::int64_t Hkv = in.v.extent(0), L = in.v.extent(1), Dv = in.v.extent(2);
  const std::int64_t Hq = w_o.extent(0), Dm = w_o.extent(2), G = Hq / Hkv;
  matrix n = zeros(Hkv, L);
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t j = 0; j < L; ++j)
      for (std::int64_t m = 0; m < Dm; ++m) {
        double y = 0;
        for (std::int64_t c = 0; c < Dv; ++c) y += static_cast<double>(in.v(h / G, j, c)) * w_o(h, c, m);
        n[h / G][j] += std::abs(y) / static_cast<double>(G);
      }
  return n;
}

// Stage 1: the `first` best base scores; stage 2: the best (base + eps) * n up to `keep`.
std::vector<std::int64_t> ref_two_stage(const std::vector<double>& base, const std::vector<double>& n, std::int64_t first,
                                        std::int64_t keep, double eps) {
  std::vector<std::int64_t> kept = top_of(matrix{base}, first).heads[0];
  std::vector<double> second(base.size());
  for (std::size_t j = 0; j < base.size(); ++j) second[j] = (base[j] + eps) * n[j];
  for (std::int64_t j : kept) second[static_cast<std::size_t>(j)] = 1e300;
  return top_of(matrix{second}, keep).heads[0];
}

TEST(CriticalKV, ScoresAndTwoStageSelectionMatchTheReference) {
  for (const std::int64_t L : {std::int64_t{37}, std::int64_t{12}}) {
    const std::int64_t Hq = 6, Hkv = 2, Lw = 5, D = 8, Dv = 6, Dm = 10;
    const inputs in = random_inputs(Hq, Hkv, L, Lw, D, Dv, 31);
    const tensor<float, 3> w_o = random_wo(Hq, Dv, Dm, 32);
    const pol::snapkv base{Lw, 3};
    const pol::criticalkv<> ck{base, w_o, 0.5, 1e-4f};
    const matrix s = to_matrix(header_scores(base, in.obs()));
    const matrix n = ref_projected_norms(in, w_o);
    matrix want = zeros(Hkv, L);
    for (std::int64_t h = 0; h < Hkv; ++h)
      for (std::int64_t j = 0; j < L; ++j) want[h][j] = (s[h][j] + 1e-4) * n[h][j];
    tensor<float, 2> got_n({Hkv, L});
    ck.projected_norms(in.obs(), got_n);
    expect_scores(got_n, n, 1e-5, "projected norms");
    expect_scores(header_scores(ck, in.obs()), want, 1e-5, "criticalkv scores");
    for (std::int64_t budget : {std::int64_t{0}, std::int64_t{1}, std::int64_t{7}, L - 1, L + 2}) {
      const std::int64_t keep = std::min(budget, L);
      const selection sel = ck.select(in.obs(), budget);
      for (std::int64_t h = 0; h < Hkv; ++h)
        EXPECT_EQ(sel.heads[h], ref_two_stage(s[h], n[h], keep / 2, keep, 1e-4)) << "L " << L << " budget " << budget;
    }
    // first_stage = 1: the base policy alone; 0: the stage-2 score alone.
    EXPECT_EQ((pol::criticalkv<>{base, w_o, 1.0}.select(in.obs(), 9).heads), base.select(in.obs(), 9).heads);
    EXPECT_EQ((pol::criticalkv<>{base, w_o, 0.0}.select(in.obs(), 9).heads), top_of(want, 9).heads);
  }
}

TEST(CriticalKV, AmongEqualAttentionItPrefersTheValueTheOutputProjectionCarries) {
  // Equal attention on every slot. Slot 3's value is the largest but lies in W_o's null space
  // (channels 2, 3 of v map to nothing); slot 8's value is smaller but fully projected. Value norm
  // alone would keep 3; CriticalKV keeps 8, the slot whose eviction moves the output most.
  const std::int64_t Hq = 2, Hkv = 1, L = 16, Lw = 4, Dv = 4, Dm = 3;
  inputs in = random_inputs(Hq, Hkv, L, Lw, 4, Dv, 41);
  for (auto& a : in.attn) a = 0.25f;
  for (auto& x : in.v) x = 0.01f;
  tensor<float, 3> w_o({Hq, Dv, Dm});
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t m = 0; m < Dm; ++m) w_o(h, 0, m) = w_o(h, 1, m) = 1.0f;
  in.v(0, 3, 2) = 10.0f, in.v(0, 3, 3) = 10.0f;
  in.v(0, 8, 0) = 1.0f;
  const pol::criticalkv<> ck{pol::snapkv{Lw, 1}, w_o, 0.0};
  EXPECT_EQ(ck.select(in.obs(), 1 + Lw).heads[0], (std::vector<std::int64_t>{8, 12, 13, 14, 15}));  // + SnapKV's window
}

TEST(CriticalAdaKV, AllocatesLikeAdaKVThenRunsTheTwoStagesPerHead) {
  const std::int64_t Hq = 6, Hkv = 3, L = 29, Lw = 4, D = 8, Dv = 5, Dm = 7;  // GQA group 2 over 3 kv heads
  inputs in = random_inputs(Hq, Hkv, L, Lw, D, Dv, 51);
  for (std::int64_t j = 0; j < L; ++j) in.attn(0, j) *= 4.0f;  // head 0 concentrates: unequal budgets
  const tensor<float, 3> w_o = random_wo(Hq, Dv, Dm, 52);
  const pol::snapkv base{Lw, 3};
  const matrix s = to_matrix(header_scores(base, in.obs()));
  const matrix n = ref_projected_norms(in, w_o);
  for (std::int64_t budget : {std::int64_t{3}, std::int64_t{8}, std::int64_t{20}, L + 4}) {
    const pol::critical_adakv<> ca{base, w_o, 0.2, 0.5, 1e-4f};
    const selection sel = ca.select(in.obs(), budget);
    const selection alloc = pol::adakv{base, 0.2}.select(in.obs(), budget);
    const std::int64_t keep = std::min(budget, L), floor = static_cast<std::int64_t>(0.2 * static_cast<double>(keep));
    EXPECT_EQ(sel.total_kept(), Hkv * keep) << budget;
    for (std::int64_t h = 0; h < Hkv; ++h) {
      const std::int64_t b = alloc.kept(h);
      ASSERT_EQ(sel.kept(h), b) << "head " << h << " budget " << budget;
      const std::int64_t first = std::max(b / 2, std::min(floor, b));
      EXPECT_EQ(sel.heads[h], ref_two_stage(s[h], n[h], first, b, 1e-4)) << "head " << h << " budget " << budget;
    }
  }
  tensor<float, 2> got({Hkv, L});
  pol::critical_adakv<>{base, w_o}.scores(in.obs(), got);
  expect_scores(got, to_matrix(header_scores(pol::criticalkv<>{base, w_o}, in.obs())), 0.0, "critical_adakv scores");
}

// ---------------------------------------------------------------------------------------------
// Leverage scores.

// lev_j = sum over the top-r eigenpairs (lambda > 1e-10 lambda_max) of X^T X of (x_j . w)^2 / lambda.
std::vector<double> ref_leverage(const matrix& x, std::int64_t rank) {
  const std::size_t C = x[0].size();
  const matrix gram = mul(transpose(x), x);
  std::vector<double> values;
  matrix vectors;
  jacobi(gram, values, vectors);
  std::vector<std::size_t> order(C);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return values[a] > values[b]; });
  const std::size_t r = rank == 0 ? C : std::min<std::size_t>(C, static_cast<std::size_t>(rank));
  std::vector<double> lev(x.size(), 0.0);
  for (std::size_t i = 0; i < r; ++i) {
    const std::size_t c = order[i];
    if (!(values[c] > 1e-10 * values[order[0]])) break;
    for (std::size_t j = 0; j < x.size(); ++j) {
      double p = 0;
      for (std::size_t a = 0; a < C; ++a) p += x[j][a] * vectors[a][c];
      lev[j] += p * p / values[c];
    }
  }
  return lev;
}

matrix head_rows(const tensor<float, 3>& t, std::int64_t h) {
  matrix m = zeros(t.extent(1), t.extent(2));
  for (std::int64_t j = 0; j < t.extent(1); ++j)
    for (std::int64_t c = 0; c < t.extent(2); ++c) m[j][c] = t(h, j, c);
  return m;
}

matrix ref_leverage_scores(const inputs& in, pol::leverage::source of, std::int64_t rank, std::int64_t sinks) {
  const std::int64_t Hkv = in.k.extent(0), L = in.k.extent(1);
  matrix out = zeros(Hkv, L);
  double top = -1e300;
  for (std::int64_t h = 0; h < Hkv; ++h) {
    std::vector<double> lk = ref_leverage(head_rows(in.k, h), rank), lv = ref_leverage(head_rows(in.v, h), rank);
    const double sk = std::accumulate(lk.begin(), lk.end(), 0.0), sv = std::accumulate(lv.begin(), lv.end(), 0.0);
    for (std::int64_t j = sinks; j < L; ++j) {
      const double a = lk[j] / sk, b = lv[j] / sv;
      using S = pol::leverage::source;
      out[h][j] = of == S::product ? a * b : of == S::keys ? a : of == S::values ? b : 0.5 * (a + b);
      top = std::max(top, out[h][j]);
    }
  }
  for (auto& row : out)
    for (std::int64_t j = 0; j < std::min(sinks, L); ++j) row[j] = top + 1;
  return out;
}

TEST(Leverage, ScoresMatchTheJacobiReference) {
  using S = pol::leverage::source;
  struct shape {
    std::int64_t Hkv, L, D, Dv;
  };
  for (const shape sh : {shape{2, 37, 8, 6}, shape{3, 5, 8, 4}, shape{1, 64, 16, 16}}) {
    const inputs in = random_inputs(sh.Hkv, sh.Hkv, sh.L, 1, sh.D, sh.Dv, 61);
    for (S of : {S::product, S::keys, S::values, S::average})
      for (std::int64_t rank : {std::int64_t{0}, std::int64_t{3}})
        for (std::int64_t sinks : {std::int64_t{0}, std::int64_t{4}}) {
          const pol::leverage lev{of, rank, sinks};
          const matrix want = ref_leverage_scores(in, of, rank, sinks);
          const std::string what = "L " + std::to_string(sh.L) + " source " + std::to_string(static_cast<int>(of)) +
                                   " rank " + std::to_string(rank) + " sinks " + std::to_string(sinks);
          expect_scores(header_scores(lev, in.obs()), want, 1e-5, what);
          for (std::int64_t budget : {std::int64_t{2}, std::int64_t{9}, sh.L + 1})
            expect_top(lev.select(in.obs(), budget), want, budget, what + " budget " + std::to_string(budget));
        }
  }
  // Full rank with L <= D: every row is alone in its direction, leverage 1 each (normalised 1/L).
  const inputs few = random_inputs(1, 1, 5, 1, 8, 8, 62);
  const tensor<float, 2> s = header_scores(pol::leverage{S::keys, 0, 0}, few.obs());
  for (std::int64_t j = 0; j < 5; ++j) EXPECT_NEAR(s(0, j), 0.2f, 1e-5f);
}

TEST(Leverage, KeepsTheKeyThatIsAloneInItsDirection) {
  // 40 keys in the span of e0..e2, one key at slot 17 along e5 with a norm below the others': it
  // carries a whole direction of the row space alone, so its leverage is 1 (the others share 3).
  const std::int64_t L = 41, D = 8;
  inputs in = random_inputs(1, 1, L, 1, D, D, 71);
  for (std::int64_t j = 0; j < L; ++j)
    for (std::int64_t c = 3; c < D; ++c) in.k(0, j, c) = 0.0f;
  for (std::int64_t c = 0; c < D; ++c) in.k(0, 17, c) = 0.0f;
  in.k(0, 17, 5) = 0.8f;
  const selection sel = pol::leverage{pol::leverage::source::keys, 0, 0}.select(in.obs(), 1);
  EXPECT_EQ(sel.heads[0], std::vector<std::int64_t>{17});
  const tensor<float, 2> s = header_scores(pol::leverage{pol::leverage::source::keys, 0, 0}, in.obs());
  EXPECT_NEAR(s(0, 17), 0.25f, 1e-5f);  // 1 of the total 4 (the numerical rank)
  // Rank 3 leaves e5 out: the truncated row space has nothing of slot 17.
  EXPECT_LT(header_scores(pol::leverage{pol::leverage::source::keys, 3, 0}, in.obs())(0, 17), 1e-4f);
  float dummy = 0;
  const pol::observation empty{view<const float, 3>(&dummy, {2, 0, 8}), view<const float, 3>(&dummy, {2, 0, 8}), {}, {}};
  EXPECT_EQ(pol::leverage{}.select(empty, 4).heads, (std::vector<std::vector<std::int64_t>>(2)));
}

// ---------------------------------------------------------------------------------------------
// ChunkKV.

// Chunk scores from the base scores (the layer's sum over heads unless per_head), then chunks
// best first, each whole if it fits in what is left of min(budget, L).
selection ref_chunkkv(const matrix& s, std::int64_t c, std::int64_t budget, bool per_head, matrix* pooled = nullptr) {
  const std::int64_t H = static_cast<std::int64_t>(s.size()), L = static_cast<std::int64_t>(s[0].size());
  const std::int64_t n = (L + c - 1) / c;
  matrix chunk = zeros(H, n);
  for (std::int64_t m = 0; m < n; ++m) {
    const std::int64_t lo = m * c, hi = std::min(L, lo + c);
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t j = lo; j < hi; ++j)
        for (std::int64_t to = 0; to < H; ++to)
          if (per_head ? to == h : true) chunk[to][m] += s[h][j] / static_cast<double>(hi - lo);
  }
  if (pooled) {
    *pooled = zeros(H, L);
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t j = 0; j < L; ++j) (*pooled)[h][j] = chunk[h][j / c];
  }
  selection sel;
  for (std::int64_t h = 0; h < H; ++h) {
    std::vector<std::int64_t> order(static_cast<std::size_t>(n)), kept;
    std::iota(order.begin(), order.end(), std::int64_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return chunk[h][a] > chunk[h][b]; });
    std::int64_t left = std::min(budget, L);
    for (std::int64_t m : order) {
      const std::int64_t lo = m * c, hi = std::min(L, lo + c);
      if (hi - lo > left) continue;
      for (std::int64_t j = lo; j < hi; ++j) kept.push_back(j);
      left -= hi - lo;
    }
    std::sort(kept.begin(), kept.end());
    sel.heads.push_back(kept);
  }
  return sel;
}

TEST(ChunkKV, ChunkScoresAndWholeChunkSelectionMatchTheReference) {
  for (const std::int64_t L : {std::int64_t{37}, std::int64_t{40}, std::int64_t{7}}) {
    const std::int64_t Hq = 6, Hkv = 2, Lw = 4;  // GQA group 3
    const inputs in = random_inputs(Hq, Hkv, L, Lw, 8, 8, 81);
    const pol::snapkv base{Lw, 3};
    const matrix s = to_matrix(header_scores(base, in.obs()));
    for (const bool per_head : {false, true})
      for (const std::int64_t c : {std::int64_t{5}, std::int64_t{1}, std::int64_t{8}}) {
        const pol::chunkkv<> ck{base, c, per_head};
        matrix pooled;
        ref_chunkkv(s, c, 0, per_head, &pooled);
        const std::string what = "L " + std::to_string(L) + " chunk " + std::to_string(c) + (per_head ? " per head" : "");
        expect_scores(header_scores(ck, in.obs()), pooled, 1e-5, what);
        for (std::int64_t budget : {std::int64_t{0}, std::int64_t{3}, std::int64_t{12}, std::int64_t{20}, L, L + 5}) {
          const selection sel = ck.select(in.obs(), budget);
          EXPECT_EQ(sel.heads, ref_chunkkv(s, c, budget, per_head).heads) << what << " budget " << budget;
          for (std::int64_t h = 0; h < Hkv; ++h) {
            EXPECT_LE(sel.kept(h), std::min(budget, L)) << what;
            EXPECT_GT(sel.kept(h), std::min(budget, L) - c) << what << " budget " << budget;  // < one chunk unused
            if (!per_head) {
              EXPECT_EQ(sel.heads[h], sel.heads[0]) << what;
            }
          }
        }
        // chunk_size 1: plain top of the base scores (summed over heads unless per_head).
        if (c == 1 && per_head) {
          EXPECT_EQ(ck.select(in.obs(), 9).heads, base.select(in.obs(), 9).heads) << what;
        }
      }
  }
}

TEST(ChunkKV, AnyBasePolicyAndTheShortLastChunkFillsTheRemainder) {
  // Knorm as the base (keys only). The last chunk [35, 37) is short and scores lowest (its keys are
  // long): with budget 12 two full chunks fit, a third does not, and the short one fills the rest.
  const std::int64_t L = 37;
  inputs in = random_inputs(4, 2, L, 4, 8, 8, 95);
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t j = 35; j < L; ++j)
      for (std::int64_t c = 0; c < 8; ++c) in.k(h, j, c) = 5.0f;
  const pol::observation keys_only{in.k, {}, {}, {}};
  const matrix s = to_matrix(header_scores(pol::knorm{}, keys_only));
  for (const bool per_head : {false, true}) {
    const pol::chunkkv<pol::knorm> ck{{}, 5, per_head};
    for (std::int64_t budget : {std::int64_t{4}, std::int64_t{12}, std::int64_t{23}, std::int64_t{36}})
      EXPECT_EQ(ck.select(keys_only, budget).heads, ref_chunkkv(s, 5, budget, per_head).heads) << budget;
    const selection sel = ck.select(keys_only, 12);
    for (std::int64_t h = 0; h < 2; ++h) {
      EXPECT_EQ(sel.kept(h), 12);
      EXPECT_TRUE(keeps(sel, h, 35) && keeps(sel, h, 36));
    }
  }
}

TEST(ChunkKV, KeepsTheWholePhraseAroundAnAttendedToken) {
  // Attention peaks on slots 12 and 13; their chunk [10, 15) is kept whole, neighbours included,
  // where SnapKV keeps the two peaks and scattered others.
  const std::int64_t Hq = 3, Hkv = 1, L = 40, Lw = 5;
  inputs in = random_inputs(Hq, Hkv, L, Lw, 4, 4, 91);
  for (std::int64_t h = 0; h < Hq; ++h) in.attn(h, 12) += 3.0f, in.attn(h, 13) += 3.0f;
  const pol::snapkv base{Lw, 1};
  const selection sel = pol::chunkkv<>{base, 5}.select(in.obs(), 10);
  EXPECT_EQ(sel.heads[0], (std::vector<std::int64_t>{10, 11, 12, 13, 14, 35, 36, 37, 38, 39}));  // + the window's chunk
  const selection snap = base.select(in.obs(), 10);
  EXPECT_TRUE(keeps(snap, 0, 12) && keeps(snap, 0, 13));
  EXPECT_NE(snap.heads[0], sel.heads[0]);
}

// ---------------------------------------------------------------------------------------------
// Bad inputs.

TEST(PolicyScoreErrors, BadParametersAndObservationsThrow) {
  const inputs in = random_inputs(4, 2, 20, 4, 8, 6, 101);
  const pol::observation o = in.obs();
  const tensor<float, 3> w_o = random_wo(4, 6, 5, 102);
  // ExpectedAttention.
  expect_error([&] { pol::expected_attention{}.select(o, -1); }, {"expected_attention::select", "budget must be >= 0", "got -1"});
  expect_error([&] { pol::expected_attention{}.select({in.k, in.v, {}, {}}, 3); }, {"observation.q"});
  expect_error([&] { pol::expected_attention{}.select({in.k, {}, in.q, {}}, 3); }, {"observation.v", "value_norm"});
  expect_error([&] { pol::expected_attention{-1}.select(o, 3); }, {"sinks must be >= 0", "got -1"});
  pol::expected_attention ea;
  ea.rope_base = 10000.0, ea.rope_dim = 3;
  expect_error([&] { ea.select(o, 3); }, {"rope_dim", "D = 8", "got 3"});
  ea.rope_dim = 0, ea.future = 0;
  expect_error([&] { ea.select(o, 3); }, {"future must be >= 1", "got 0"});
  ea.future = 8, ea.rope_base = -1.0;
  expect_error([&] { ea.select(o, 3); }, {"rope_base must be >= 0", "got -1"});
  const tensor<float, 3> bad_q({3, 4, 8});
  expect_error([&] { pol::expected_attention{}.select({in.k, in.v, bad_q, {}}, 3); }, {"Hq", "multiple of Hkv = 2", "got 3"});
  tensor<float, 2> bad_out({2, 19});
  expect_error([&] { pol::expected_attention{}.scores(o, bad_out); }, {"scores", "[2, 20]", "[2, 19]"});
  // CriticalKV.
  const pol::snapkv base{4, 3};
  expect_error([&] { pol::criticalkv<>{base, {}}.select(o, 3); }, {"criticalkv::select", "w_o"});
  expect_error([&] { pol::criticalkv<>{base, w_o}.select({in.k, {}, in.q, in.attn}, 3); }, {"observation.v"});
  const tensor<float, 3> wo_dv = random_wo(4, 5, 5, 103), wo_hq = random_wo(2, 6, 5, 104), wo_3 = random_wo(3, 6, 5, 105);
  expect_error([&] { pol::criticalkv<>{base, wo_dv}.select(o, 3); }, {"w_o", "Dv = 6", "[4, 5, 5]"});
  expect_error([&] { pol::criticalkv<>{base, wo_hq}.select(o, 3); }, {"w_o.shape[0]", "observation.attn.shape[0] = 4", "got 2"});
  expect_error([&] { pol::criticalkv<>{base, wo_3}.select(o, 3); }, {"w_o.shape[0]", "multiple of Hkv = 2", "got 3"});
  expect_error([&] { pol::criticalkv<>{base, w_o, 1.5}.select(o, 3); }, {"first_stage must be in [0, 1]", "got 1.5"});
  expect_error([&] { pol::criticalkv<>{base, w_o, 0.5, -1.0f}.select(o, 3); }, {"epsilon must be >= 0", "got -1"});
  expect_error([&] { pol::criticalkv<>{base, w_o}.select(o, -2); }, {"budget must be >= 0", "got -2"});
  expect_error([&] { pol::criticalkv<>{pol::snapkv{0, 3}, w_o}.select(o, 3); }, {"window must be in [1, L = 20]", "got 0"});
  expect_error([&] { pol::critical_adakv<>{base, w_o, 1.5}.select(o, 3); }, {"alpha must be in [0, 1]", "got 1.5"});
  expect_error([&] { pol::critical_adakv<>{base, w_o, 0.2, -0.5}.select(o, 3); }, {"first_stage", "got -0.5"});
  // Leverage.
  expect_error([&] { pol::leverage{}.select({in.k, {}, {}, {}}, 3); }, {"leverage::select", "observation.v"});
  EXPECT_NO_THROW(pol::leverage{pol::leverage::source::keys}.select({in.k, {}, {}, {}}, 3));
  expect_error([&] { pol::leverage{pol::leverage::source::keys, -1}.select(o, 3); }, {"rank must be >= 0", "got -1"});
  expect_error([&] { pol::leverage{pol::leverage::source::keys, 0, -2}.select(o, 3); }, {"sinks must be >= 0", "got -2"});
  expect_error([&] { pol::leverage{pol::leverage::source::keys, 0, 0, 1.0}.select(o, 3); }, {"rel_tol must be in [0, 1)", "got 1"});
  expect_error([&] { pol::leverage{}.select({}, 3); }, {"observation.k"});
  const tensor<float, 3> bad_v({2, 19, 6});
  expect_error([&] { pol::leverage{}.select({in.k, bad_v, {}, {}}, 3); }, {"observation.v", "L = 20", "[2, 19, 6]"});
  // ChunkKV.
  expect_error([&] { pol::chunkkv<>{base, 0}.select(o, 3); }, {"chunkkv::select", "chunk_size must be >= 1", "got 0"});
  expect_error([&] { pol::chunkkv<>{base, 4}.select(o, -1); }, {"budget must be >= 0", "got -1"});
  expect_error([&] { pol::chunkkv<>{base, 4}.select({in.k, in.v, in.q, {}}, 3); }, {"observation.attn"});
}

}  // namespace
