// Tests of the fixes of issue 17 (item 2) to kvcache/policies: each one builds the case that
// showed the failure on a real model's attention, on synthetic data small enough to read:
//
//   FastGen      many low-attention punctuation tokens must not starve the budget (output error
//                no worse than StreamingLLM or random slots), and heads of different structure
//                pick different compositions
//   PyramidKV    every layer keeps more than its window, the average budget is kept exactly
//   KNorm        the paper's rule (keep the lowest-norm keys) keeps the attention when low-norm
//                keys draw it
//   causal flag  H2O's normalisation, Scissorhands' and Keyformer's rows follow observation.causal
//
// The output error of a kept set is the attention output of every window row over the kept slots
// against the output over all slots: sqrt(sum |o_kept - o_full|^2 / sum |o_full|^2).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "mnemo/kvcache/policies/fastgen.hpp"
#include "mnemo/kvcache/policies/h2o.hpp"
#include "mnemo/kvcache/policies/keyformer.hpp"
#include "mnemo/kvcache/policies/knorm.hpp"
#include "mnemo/kvcache/policies/pyramidkv.hpp"
#include "mnemo/kvcache/policies/scissorhands.hpp"
#include "mnemo/kvcache/policies/streaming_llm.hpp"

namespace {

using namespace mnemo;
namespace pol = mnemo::kvcache::policies;
using kvcache::selection;

// Keys, values, window queries and the column sums of the window's attention.
struct case_data {
  tensor<float, 3> k, v, q;  // [Hkv, L, D], [Hkv, L, D], [Hq, Lw, D]
  tensor<float, 2> attn;     // [Hq, L]
  bool causal = false;
  pol::observation obs() const {
    pol::observation o{k, v, q, attn};
    o.causal = causal;
    return o;
  }
};

// Row i of the window sees keys [0, visible(i)).
std::int64_t visible(const case_data& c, std::int64_t i) {
  const std::int64_t L = c.k.extent(1), Lw = c.q.extent(1);
  return c.causal ? L - Lw + i + 1 : L;
}

// The softmax probabilities of window row i of query head h over its visible keys, in double.
std::vector<double> probs(const case_data& c, std::int64_t h, std::int64_t i) {
  const std::int64_t D = c.k.extent(2), hk = h / (c.q.extent(0) / c.k.extent(0)), n = visible(c, i);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> p(static_cast<std::size_t>(n));
  double m = -1e300, sum = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    double dot = 0;
    for (std::int64_t d = 0; d < D; ++d) dot += static_cast<double>(c.q(h, i, d)) * c.k(hk, j, d);
    p[static_cast<std::size_t>(j)] = scale * dot;
    m = std::max(m, scale * dot);
  }
  for (double& x : p) sum += x = std::exp(x - m);
  for (double& x : p) x /= sum;
  return p;
}

void fill_attn(case_data& c) {
  const std::int64_t Hq = c.q.extent(0), Lw = c.q.extent(1), L = c.k.extent(1);
  c.attn = tensor<float, 2>({Hq, L});
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lw; ++i) {
      const std::vector<double> p = probs(c, h, i);
      for (std::size_t j = 0; j < p.size(); ++j) c.attn(h, static_cast<std::int64_t>(j)) += static_cast<float>(p[j]);
    }
}

// The relative output error of keeping `sel` (see the file comment).
double output_error(const case_data& c, const selection& sel) {
  const std::int64_t Hq = c.q.extent(0), Lw = c.q.extent(1), Dv = c.v.extent(2), G = Hq / c.k.extent(0);
  double err = 0, norm = 0;
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lw; ++i) {
      const std::vector<double> p = probs(c, h, i);
      const auto& kept = sel.heads[static_cast<std::size_t>(h / G)];
      double kept_mass = 0;
      for (std::int64_t j : kept)
        if (j < static_cast<std::int64_t>(p.size())) kept_mass += p[static_cast<std::size_t>(j)];
      for (std::int64_t e = 0; e < Dv; ++e) {
        double full = 0, part = 0;
        for (std::size_t j = 0; j < p.size(); ++j) full += p[j] * c.v(h / G, static_cast<std::int64_t>(j), e);
        for (std::int64_t j : kept)
          if (j < static_cast<std::int64_t>(p.size())) part += p[static_cast<std::size_t>(j)] * c.v(h / G, j, e);
        part = kept_mass > 0 ? part / kept_mass : 0;
        err += (part - full) * (part - full);
        norm += full * full;
      }
    }
  return std::sqrt(err / norm);
}

// The mean output error of `draws` random sets of `budget` slots per head.
double random_error(const case_data& c, std::int64_t budget, int draws, std::uint32_t seed) {
  const std::int64_t Hkv = c.k.extent(0), L = c.k.extent(1);
  std::mt19937 rng(seed);
  double sum = 0;
  for (int t = 0; t < draws; ++t) {
    selection sel;
    for (std::int64_t h = 0; h < Hkv; ++h) {
      std::vector<std::int64_t> all(static_cast<std::size_t>(L));
      std::iota(all.begin(), all.end(), std::int64_t{0});
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(static_cast<std::size_t>(std::min(budget, L)));
      std::sort(all.begin(), all.end());
      sel.heads.push_back(all);
    }
    sum += output_error(c, sel);
  }
  return sum / draws;
}

// ---------------------------------------------------------------------------------------------
// FastGen.

std::string choice_name(pol::fastgen::choice c) {
  using ch = pol::fastgen::choice;
  return c == ch::special ? "special" : c == ch::punct ? "punct" : c == ch::frequency ? "frequency" : "local";
}

// L = 200 tokens, non-causal (an encoder, as all-MiniLM-L6-v2): token 0 is special, 30% of the
// tokens are punctuation with small keys (little attention), and 32 ordinary tokens spread over
// the first 160 draw most of the attention of the 16 window rows.
case_data punctuation_heavy(std::vector<std::uint8_t>& special, std::vector<std::uint8_t>& punct) {
  const std::int64_t Hkv = 2, Hq = 2, L = 200, Lw = 16, D = 16;
  case_data c{tensor<float, 3>({Hkv, L, D}), tensor<float, 3>({Hkv, L, D}), tensor<float, 3>({Hq, Lw, D}), {}, false};
  special.assign(static_cast<std::size_t>(L), 0);
  punct.assign(static_cast<std::size_t>(L), 0);
  special[0] = 1;
  std::mt19937 rng(17);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  for (std::int64_t h = 0; h < Hkv; ++h) {
    std::vector<float> u(static_cast<std::size_t>(D));
    float norm = 0;
    for (float& x : u) {
      x = n01(rng);
      norm += x * x;
    }
    for (float& x : u) x /= std::sqrt(norm);
    for (std::int64_t j = 0; j < L; ++j) {
      const bool is_punct = j >= 1 && (j % 10 == 2 || j % 10 == 5 || j % 10 == 8);
      const bool hot = (j % 10 == 4 || j % 10 == 7) && j < 160;
      punct[static_cast<std::size_t>(j)] = is_punct ? 1 : 0;
      const float along = j == 0 ? 2.0f : hot ? 2.5f : 0.0f, spread = is_punct ? 0.3f : 1.0f;
      for (std::int64_t d = 0; d < D; ++d) {
        c.k(h, j, d) = along * u[static_cast<std::size_t>(d)] + spread * n01(rng);
        c.v(h, j, d) = n01(rng);
      }
    }
    for (std::int64_t i = 0; i < Lw; ++i)
      for (std::int64_t d = 0; d < D; ++d) c.q(h, i, d) = 4.0f * u[static_cast<std::size_t>(d)] + 0.3f * n01(rng);
  }
  fill_attn(c);
  return c;
}

TEST(FastGenFix, BadFractionsThrow) {
  const tensor<float, 3> k({1, 8, 4});
  const tensor<float, 2> attn({1, 8});
  const pol::observation o{k, {}, {}, attn};
  for (double f : {-0.1, 1.5}) {
    try {
      pol::fastgen{0.9, 0.5, f}.profile(o, 4);
      ADD_FAILURE() << "frequency_fraction " << f << " must throw";
    } catch (const mnemo::error& e) {
      EXPECT_NE(std::string(e.what()).find("frequency_fraction must be in [0, 1]"), std::string::npos) << e.what();
    }
  }
}

TEST(FastGenFix, PunctuationDoesNotStarveTheBudget) {
  std::vector<std::uint8_t> special, punct;
  const case_data c = punctuation_heavy(special, punct);
  pol::observation o = c.obs();
  o.special = special;
  o.punct = punct;
  const std::int64_t L = c.k.extent(1);
  for (std::int64_t budget : {L / 10, L / 5, L / 2}) {
    const pol::fastgen::plan plan = pol::fastgen{}.profile(o, budget);
    const double fastgen = output_error(c, plan.kept);
    const double streaming = output_error(c, pol::streaming_llm{4}.select(o, budget));
    const double random = random_error(c, budget, 20, 5);
    std::string choices;
    for (auto ch : plan.per_head) choices += choice_name(ch) + " ";
    std::printf("budget %3lld: relative output error fastgen %.3f (kept %lld, %lld; choices %s) streaming_llm %.3f random %.3f\n",
                static_cast<long long>(budget), fastgen, static_cast<long long>(plan.kept.kept(0)),
                static_cast<long long>(plan.kept.kept(1)), choices.c_str(), streaming, random);
    EXPECT_LE(fastgen, streaming) << "budget " << budget;
    EXPECT_LE(fastgen, random) << "budget " << budget;
    for (std::int64_t h = 0; h < 2; ++h) {
      EXPECT_LE(plan.kept.kept(h), budget);
      EXPECT_TRUE(std::binary_search(plan.kept.heads[static_cast<std::size_t>(h)].begin(),
                                     plan.kept.heads[static_cast<std::size_t>(h)].end(), 0))
          << "the special token is kept";
    }
  }
}

// Four heads of four structures, attention sums given directly: head 0 attends the special token,
// head 1 the special token and the punctuation, head 2 eight scattered ordinary tokens, head 3
// the newest 20 tokens evenly. Each must pick its own composition.
TEST(FastGenFix, HeadsOfDifferentStructurePickDifferentCompositions) {
  const std::int64_t H = 4, L = 120, budget = 24;
  const tensor<float, 3> k({H, L, 4});
  tensor<float, 2> attn({H, L});
  std::vector<std::uint8_t> special(static_cast<std::size_t>(L), 0), punct(static_cast<std::size_t>(L), 0);
  special[0] = 1;
  for (std::int64_t j = 5; j < L; j += 10) punct[static_cast<std::size_t>(j)] = 1;
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t j = 0; j < L; ++j) attn(h, j) = 0.001f;
  attn(0, 0) = 10;
  attn(1, 0) = 2;
  for (std::int64_t j = 5; j < L; j += 10) attn(1, j) = 2;
  for (std::int64_t j = 3; j < 70; j += 9) attn(2, j) = 3;
  for (std::int64_t j = L - 20; j < L; ++j) attn(3, j) = 1;
  pol::observation o{k, {}, {}, attn};
  o.special = special;
  o.punct = punct;
  const pol::fastgen::plan plan = pol::fastgen{}.profile(o, budget);
  using ch = pol::fastgen::choice;
  const std::vector<ch> want = {ch::special, ch::punct, ch::frequency, ch::local};
  for (std::int64_t h = 0; h < H; ++h)
    EXPECT_EQ(static_cast<int>(plan.per_head[static_cast<std::size_t>(h)]), static_cast<int>(want[static_cast<std::size_t>(h)]))
        << "head " << h;
  EXPECT_EQ(plan.kept.kept(0), 1) << "the special composition keeps only the special token";
  EXPECT_EQ(plan.kept.kept(1), 13);
  // Every head recovers nearly all its attention within the budget.
  for (std::int64_t h = 0; h < H; ++h) {
    double got = 0, total = 0;
    for (std::int64_t j = 0; j < L; ++j) total += attn(h, j);
    for (std::int64_t j : plan.kept.heads[static_cast<std::size_t>(h)]) got += attn(h, j);
    EXPECT_GT(got / total, 0.9) << "head " << h;
  }
}

// ---------------------------------------------------------------------------------------------
// PyramidKV.

TEST(PyramidKVFix, EveryLayerKeepsMoreThanItsWindowAndTheAverageExactly) {
  // all-MiniLM-L6-v2: 6 layers; L = 256 at a 25% budget with SnapKV's 32-token window.
  const pol::pyramidkv p{pol::snapkv{32, 5}, 20};
  const std::int64_t layers = 6, window = 32;
  for (std::int64_t average : {std::int64_t{33}, std::int64_t{38}, std::int64_t{64}, std::int64_t{128}, std::int64_t{1000}}) {
    const std::vector<std::int64_t> b = p.layer_budgets(layers, average);
    std::printf("average %4lld: layer budgets", static_cast<long long>(average));
    for (auto x : b) std::printf(" %lld", static_cast<long long>(x));
    std::printf("\n");
    ASSERT_EQ(b.size(), static_cast<std::size_t>(layers));
    EXPECT_EQ(std::accumulate(b.begin(), b.end(), std::int64_t{0}), layers * average) << "average " << average;
    for (std::size_t l = 0; l < b.size(); ++l) {
      EXPECT_GT(b[l], window) << "layer " << l << ", average " << average;
      if (l) {
        EXPECT_LE(b[l], b[l - 1]);
      }
    }
    // The top layer keeps at least a fifth of the average's non-window share (rounded down).
    EXPECT_GE(b.back() - window, (average - window) / 5) << "average " << average;
  }
}

// ---------------------------------------------------------------------------------------------
// KNorm.

// Devoto et al.'s observation: keys of low L2 norm draw the attention (their sink-like tokens).
// Here the queries point along -u, the ordinary keys have a large +u component (negative logits)
// and 10 keys are small: they draw the attention, and knorm keeps them.
TEST(KNormFix, KeepsTheAttentionWhenLowNormKeysDrawIt) {
  const std::int64_t L = 100, Lw = 8, D = 16;
  case_data c{tensor<float, 3>({1, L, D}), tensor<float, 3>({1, L, D}), tensor<float, 3>({1, Lw, D}), {}, true};
  std::mt19937 rng(23);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  for (std::int64_t j = 0; j < L; ++j) {
    const bool small = j % 10 == 3;
    for (std::int64_t d = 0; d < D; ++d) {
      c.k(0, j, d) = small ? 0.1f * n01(rng) : (d == 0 ? 3.0f : 0.0f) + n01(rng);
      c.v(0, j, d) = n01(rng);
    }
  }
  for (std::int64_t i = 0; i < Lw; ++i)
    for (std::int64_t d = 0; d < D; ++d) c.q(0, i, d) = (d == 0 ? -4.0f : 0.0f) + 0.3f * n01(rng);
  fill_attn(c);
  const selection sel = pol::knorm{}.select(c.obs(), 10);
  double kept = 0, total = 0;
  for (std::int64_t j = 0; j < L; ++j) total += c.attn(0, j);
  for (std::int64_t j : sel.heads[0]) kept += c.attn(0, j);
  std::printf("knorm keeps %.3f of the attention at 10%% (random: 0.10)\n", kept / total);
  EXPECT_GT(kept / total, 0.5);
  EXPECT_LT(output_error(c, sel), random_error(c, 10, 20, 3));
}

// ---------------------------------------------------------------------------------------------
// The causal flag.

case_data random_case(std::int64_t Hq, std::int64_t Hkv, std::int64_t L, std::int64_t Lw, std::int64_t D, bool causal,
                      std::uint32_t seed) {
  case_data c{tensor<float, 3>({Hkv, L, D}), tensor<float, 3>({Hkv, L, D}), tensor<float, 3>({Hq, Lw, D}), {}, causal};
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  for (auto* t : {&c.k, &c.v, &c.q})
    for (auto& x : *t) x = n01(rng);
  fill_attn(c);
  return c;
}

// Non-causal rows (every row saw every key): the number of rows behind each column is the same,
// so uniform column sums give uniform H2O scores.
TEST(CausalFlag, H2ONonCausalCountsEveryRowForEveryKey) {
  const std::int64_t L = 12;
  const tensor<float, 3> k({1, L, 4});
  tensor<float, 2> attn({2, L});
  for (auto& x : attn) x = 1.0f;
  pol::observation o{k, {}, {}, attn};
  o.causal = false;
  tensor<float, 2> s({1, L});
  pol::h2o{}.scores(o, s);
  for (std::int64_t j = 0; j < L; ++j) EXPECT_FLOAT_EQ(s(0, j), 1.0f / static_cast<float>(L)) << "slot " << j;
  o.causal = true;  // all L rows, causal: key j was seen by L - j rows (the golden kv_observed_attention rule)
  pol::h2o{}.scores(o, s);
  for (std::int64_t j = 0; j < L; ++j) EXPECT_FLOAT_EQ(s(0, j), 1.0f / static_cast<float>(L - j)) << "slot " << j;
}

// A causal window of the last Lw rows (attention::column_sums rows = Lw): key j was seen by
// min(Lw, L - j) of them; non-causal, by all Lw. rows outside [0, L] throw.
TEST(CausalFlag, H2OCountsTheRowsOfAWindow) {
  for (bool causal : {true, false}) {
    const case_data c = random_case(4, 2, 20, 5, 8, causal, 37);
    tensor<float, 2> s({2, 20});
    pol::h2o{0, true, 5}.scores(c.obs(), s);
    for (std::int64_t hk = 0; hk < 2; ++hk)
      for (std::int64_t j = 0; j < 20; ++j) {
        const double seen = causal ? std::min<std::int64_t>(5, 20 - j) : 5;
        const double want = (c.attn(2 * hk, j) + c.attn(2 * hk + 1, j)) / 2.0 / seen;
        EXPECT_NEAR(s(hk, j), want, 1e-6 * (1 + want)) << (causal ? "causal" : "non-causal") << " slot " << j;
      }
  }
  const case_data c = random_case(2, 1, 10, 3, 4, true, 41);
  tensor<float, 2> s({1, 10});
  try {
    pol::h2o{0, true, 11}.scores(c.obs(), s);
    ADD_FAILURE() << "rows > L must throw";
  } catch (const mnemo::error& e) {
    EXPECT_NE(std::string(e.what()).find("rows (the query rows behind observation.attn) must be in [0, L = 10], got 11"),
              std::string::npos)
        << e.what();
  }
}

// Scissorhands' counts against a direct count over the rows' own probabilities, both settings.
TEST(CausalFlag, ScissorhandsCountsOverTheKeysEachRowSaw) {
  for (bool causal : {true, false}) {
    const case_data c = random_case(4, 2, 30, 6, 8, causal, 29);
    tensor<float, 2> s({2, 30});
    pol::scissorhands{}.scores(c.obs(), s);
    for (std::int64_t hk = 0; hk < 2; ++hk)
      for (std::int64_t j = 0; j < 30; ++j) {
        double low = 0;
        for (std::int64_t h = 2 * hk; h < 2 * hk + 2; ++h)
          for (std::int64_t i = 0; i < 6; ++i) {
            const std::vector<double> p = probs(c, h, i);
            if (j < static_cast<std::int64_t>(p.size()) && p[static_cast<std::size_t>(j)] < 1.0 / static_cast<double>(p.size())) ++low;
          }
        EXPECT_EQ(s(hk, j), -static_cast<float>(low)) << (causal ? "causal" : "non-causal") << " head " << hk << " slot " << j;
      }
  }
}

// Keyformer: the newest key draws every row's attention. Causal, only the last row saw it (score
// <= the group's 2 query heads x 1 row); non-causal, all 6 rows did.
TEST(CausalFlag, KeyformerScoresTheKeysEachRowSaw) {
  for (bool causal : {true, false}) {
    case_data c = random_case(2, 1, 30, 6, 8, causal, 31);
    for (std::int64_t d = 0; d < 8; ++d) {
      c.k(0, 29, d) = 0.0f;
      for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t i = 0; i < 6; ++i) c.q(h, i, d) = d == 0 ? 10.0f : 0.0f;
    }
    c.k(0, 29, 0) = 10.0f;
    tensor<float, 2> s({1, 30});
    pol::keyformer{0, 1.0f, 3}.scores(c.obs(), s);
    if (causal) {
      EXPECT_LE(s(0, 29), 2.0f + 1e-5f);
    } else {
      EXPECT_GT(s(0, 29), 2.0f * 5.5f);
    }
  }
}

}  // namespace
