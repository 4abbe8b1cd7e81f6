// Tests of kvcache/policies/*.hpp: every golden kv_* case (kept sets exact, scores within the
// case tolerance), the invariants of every policy (budget respected, sinks / windows kept where
// the policy says, ascending unique slots), the decode-time trackers against their prefill rule
// (SnapKV / PyramidKV / AdaKV sliding windows, FastGen's per-head choice, ThinK's channels included),
// and bad budgets / mismatched shapes throwing mnemo::error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kvcache/policies_golden_ops.hpp"
#include "support/support.hpp"
#include "mnemo/kvcache/attend.hpp"
#include "mnemo/kvcache/policies.hpp"
#include "mnemo/kvcache/policies/list.hpp"

namespace {

using namespace mnemo;
namespace pol = mnemo::kvcache::policies;
namespace kg = mnemo::kv_golden;
using kvcache::selection;
using mnemo::test::expect_error;

// ---------------------------------------------------------------------------------------------
// Golden cases.

TEST(PoliciesGolden, EveryKvCaseEveryPath) {
  int checked = 0;
  for (const auto& entry : std::filesystem::directory_iterator(MNEMO_GOLDEN_DIR)) {
    if (!entry.is_directory() || entry.path().filename().string().rfind("kv_", 0) != 0) continue;
    const golden::golden_case c(entry.path());
    for (kg::path p : {kg::path::flash, kg::path::reference, kg::path::decode}) {
      if (p == kg::path::decode && c.op() != "kv_tova") continue;
      if (!kg::uses_attention(c.op()) && p != kg::path::reference) continue;
      const golden::results got = kg::run(c, p);
      for (const std::string& name : c.outputs()) {
        const npy::array* g = got.find(name);
        ASSERT_NE(g, nullptr) << c.name() << " has no output " << name;
        const golden::comparison cmp = golden::compare(name, *g, c.expected(name), c.atol(), c.rtol());
        EXPECT_TRUE(cmp.ok) << c.name() << " [" << kg::path_name(p) << "] " << cmp.failure;
      }
      ++checked;
    }
  }
  EXPECT_GE(checked, 9 + 5);  // 9 cases, the 4 attention ones on 2 or 3 paths
}

// ---------------------------------------------------------------------------------------------
// Invariants on random observations.

struct inputs {
  tensor<float, 3> k, v, q;  // [Hkv, L, D], [Hkv, L, D], [Hq, Lw, D]
  tensor<float, 2> attn;     // [Hq, L]: column sums of the last Lw causal rows
};

inputs random_inputs(std::int64_t Hq, std::int64_t Hkv, std::int64_t L, std::int64_t Lw, std::int64_t D, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  inputs in{tensor<float, 3>({Hkv, L, D}), tensor<float, 3>({Hkv, L, D}), tensor<float, 3>({Hq, Lw, D}),
            tensor<float, 2>({Hq, L})};
  for (auto* t : {&in.k, &in.v, &in.q})
    for (auto& x : *t) x = dist(rng);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> s(static_cast<std::size_t>(L));
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lw; ++i) {
      const std::int64_t n = L - Lw + i + 1;
      double m = -1e300, sum = 0;
      for (std::int64_t j = 0; j < n; ++j) {
        double dot = 0;
        for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(in.q(h, i, c)) * in.k(h / (Hq / Hkv), j, c);
        s[static_cast<std::size_t>(j)] = scale * dot;
        m = std::max(m, scale * dot);
      }
      for (std::int64_t j = 0; j < n; ++j) sum += std::exp(s[static_cast<std::size_t>(j)] - m);
      for (std::int64_t j = 0; j < n; ++j) in.attn(h, j) += static_cast<float>(std::exp(s[static_cast<std::size_t>(j)] - m) / sum);
    }
  return in;
}

pol::observation observe(const inputs& in) { return {in.k, in.v, in.q, in.attn}; }

void expect_valid(const selection& sel, std::int64_t Hkv, std::int64_t L, std::int64_t max_per_head,
                  const std::string& what) {
  ASSERT_EQ(sel.num_heads(), Hkv) << what;
  EXPECT_NO_THROW(kvcache::validate(what.c_str(), sel, std::vector<std::int64_t>(static_cast<std::size_t>(Hkv), L))) << what;
  for (std::int64_t h = 0; h < Hkv; ++h) EXPECT_LE(sel.kept(h), std::min(max_per_head, L)) << what << " head " << h;
}

bool keeps(const selection& sel, std::int64_t h, std::int64_t j) {
  const auto& row = sel.heads[static_cast<std::size_t>(h)];
  return std::binary_search(row.begin(), row.end(), j);
}

// The policy list (policies/list.hpp): every entry selects within its budget from an observation
// whose attn sums the rows the entry asks for, and every tracker follows a decode run (append,
// observe, select on overflow, compact) keeping valid, in-budget selections.
TEST(PolicyList, EveryEntrySelectsWithinItsBudget) {
  const std::int64_t Hq = 6, Hkv = 2, L = 61, Lw = 8, D = 12;
  const inputs in = random_inputs(Hq, Hkv, L, Lw, D, 23);
  const inputs all_rows = random_inputs(Hq, Hkv, L, L, D, 23);
  const inputs last_row = random_inputs(Hq, Hkv, L, 1, D, 23);
  std::vector<std::uint8_t> special(static_cast<std::size_t>(L), 0), punct(static_cast<std::size_t>(L), 0);
  special[0] = 1;
  for (std::int64_t j = 5; j < L; j += 9) punct[static_cast<std::size_t>(j)] = 1;
  ASSERT_GE(pol::all().size(), 14u);
  int plans = 0;
  for (const pol::entry& e : pol::all()) {
    const inputs& src = e.rows == pol::attn_rows::all ? all_rows : e.rows == pol::attn_rows::last ? last_row : in;
    pol::observation o = observe(src);
    o.q = in.q;  // the window's queries; attn is what the entry asks for
    o.special = special;
    o.punct = punct;
    EXPECT_EQ(&pol::find(e.name), &e);
    for (const std::int64_t budget : std::vector<std::int64_t>{Lw, 17, 40, L, L + 5}) {
      const std::string what = std::string(e.name) + " budget " + std::to_string(budget);
      if (e.selects == pol::axis::channels) {
        const selection ch = e.select(o, std::min(budget, D));
        expect_valid(ch, Hkv, D, std::min(budget, D), what);
        continue;
      }
      const selection sel = e.select(o, budget);
      ASSERT_EQ(sel.num_heads(), Hkv) << what;
      EXPECT_NO_THROW(kvcache::validate(what.c_str(), sel, std::vector<std::int64_t>(static_cast<std::size_t>(Hkv), L)))
          << what;
      EXPECT_LE(sel.total_kept(), Hkv * std::min(budget, L)) << what;  // head-adaptive ones are ragged
      if (e.plan) {  // a merging method: its plan keeps select's slots and folds only evicted ones
        const kvcache::merge_plan plan = e.plan(o, budget);
        EXPECT_EQ(plan.keep.heads, sel.heads) << what;
        EXPECT_NO_THROW(kvcache::validate(what.c_str(), plan, std::vector<std::int64_t>(static_cast<std::size_t>(Hkv), L)))
            << what;
        ++plans;
      }
    }
  }
  EXPECT_EQ(plans, 4 * 5);  // CaM, MergingPress, DMC, MovieChat at 5 budgets
}

TEST(PolicyList, EveryTrackerFollowsADecodeRun) {
  const std::int64_t Hq = 4, Hkv = 2, L = 40, Lw = 8, D = 8, budget = 16, steps = 50;
  const inputs in = random_inputs(Hq, Hkv, L, Lw, D, 29);
  std::mt19937 rng(31);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  int trackers = 0;
  for (const pol::entry& e : pol::all()) {
    if (!e.make_tracker) continue;
    ++trackers;
    pol::tracker t = e.make_tracker(observe(in), budget);
    std::vector<float> key(static_cast<std::size_t>(D));
    for (std::int64_t step = 0; step < steps; ++step) {
      for (std::int64_t h = 0; h < Hkv; ++h) {
        for (float& x : key) x = normal(rng);
        t.append({h, key.data(), D, step == 0, step % 7 == 3});
      }
      const std::vector<std::int64_t> len = t.lengths();
      ASSERT_EQ(len.size(), static_cast<std::size_t>(Hkv)) << e.name;
      if (t.observes()) {
        const std::int64_t n = *std::max_element(len.begin(), len.end());
        tensor<float, 2> probs({Hq, n});
        for (std::int64_t h = 0; h < Hq; ++h) {
          const std::int64_t m = len[static_cast<std::size_t>(h / (Hq / Hkv))];
          double sum = 0;
          for (std::int64_t j = 0; j < m; ++j) sum += probs(h, j) = uniform(rng);
          for (std::int64_t j = 0; j < m; ++j) probs(h, j) = static_cast<float>(probs(h, j) / sum);
        }
        t.observe(probs);
      }
      if (pol::should_compress(len, budget)) {
        const selection sel = t.select(budget);
        EXPECT_NO_THROW(kvcache::validate(e.name.data(), sel, len)) << e.name << " step " << step;
        EXPECT_LE(sel.total_kept(), Hkv * budget) << e.name << " step " << step;
        t.compact(sel);
        EXPECT_EQ(t.lengths(), [&] {
          std::vector<std::int64_t> n;
          for (const auto& row : sel.heads) n.push_back(static_cast<std::int64_t>(row.size()));
          return n;
        }()) << e.name;
      }
    }
  }
  EXPECT_GE(trackers, 11);  // every policy but KeyDiff and ThinK (not trackers) and StreamingLLM
}

// attend_selected against attention written out in double over each head's kept slots: ragged
// heads, an empty head (out 0, lse -inf), GQA groups of 3, the decode (Lq <= 16) and flash paths.
TEST(AttendSelected, EqualsAttentionOverTheKeptSlots) {
  const std::int64_t Hq = 6, Hkv = 2, L = 37, D = 12, Dv = 10;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  tensor<float, 3> k({Hkv, L, D}), v({Hkv, L, Dv});
  for (auto* t : {&k, &v})
    for (auto& x : *t) x = normal(rng);
  selection sel;
  sel.heads = {{0, 3, 4, 9, 17, 30, 36}, {}};
  for (const std::int64_t Lq : {1, 5, 20}) {
    tensor<float, 3> q({Hq, Lq, D}), out({Hq, Lq, Dv});
    tensor<float, 2> lse({Hq, Lq});
    for (auto& x : q) x = normal(rng);
    kvcache::attend_selected(q, k, v, sel, out, lse);
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < Lq; ++i) {
        const auto& rows = sel.heads[static_cast<std::size_t>(h / 3)];
        if (rows.empty()) {
          for (std::int64_t c = 0; c < Dv; ++c) EXPECT_EQ(out(h, i, c), 0.0f);
          EXPECT_EQ(lse(h, i), -std::numeric_limits<float>::infinity());
          continue;
        }
        std::vector<double> s;
        for (std::int64_t j : rows) {
          double dot = 0;
          for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(q(h, i, c)) * k(h / 3, j, c);
          s.push_back(scale * dot);
        }
        const double m = *std::max_element(s.begin(), s.end());
        double z = 0;
        for (double x : s) z += std::exp(x - m);
        EXPECT_NEAR(lse(h, i), m + std::log(z), 1e-5) << "Lq " << Lq;
        for (std::int64_t c = 0; c < Dv; ++c) {
          double o = 0;
          for (std::size_t r = 0; r < rows.size(); ++r) o += std::exp(s[r] - m) / z * v(h / 3, rows[r], c);
          EXPECT_NEAR(out(h, i, c), o, 2e-5) << "Lq " << Lq << " head " << h << " row " << i;
        }
      }
  }
  tensor<float, 3> q({Hq, 1, D}), out({Hq, 1, Dv});
  selection bad;
  bad.heads = {{0, 40}, {}};
  expect_error([&] { kvcache::attend_selected(q, k, v, bad, out); }, {"selection.heads[0][1]", "[0, 37)", "got 40"});
  tensor<float, 3> q5({5, 1, D});
  expect_error([&] { kvcache::attend_selected(q5, k, v, sel, out); }, {"Hq", "multiple of Hkv = 2", "got 5"});
}

TEST(PolicyInvariants, EveryPolicyRespectsTheBudgetAndKeepsItsForcedSlots) {
  const std::int64_t Hq = 8, Hkv = 2, L = 97, Lw = 8, D = 16;
  const inputs in = random_inputs(Hq, Hkv, L, Lw, D, 7);
  const pol::observation o = observe(in);
  const tensor<float, 2> filters = pol::qfilter::fit(in.q, Hkv);
  for (std::int64_t budget : {std::int64_t{10}, std::int64_t{24}, std::int64_t{48}, L, L + 5}) {
    const std::string b = " budget " + std::to_string(budget);
    const std::int64_t full = std::min(budget, L);
    auto exact = [&](const selection& sel, const std::string& name) {
      expect_valid(sel, Hkv, L, budget, name + b);
      for (std::int64_t h = 0; h < Hkv; ++h) EXPECT_EQ(sel.kept(h), full) << name << b;
    };
    const selection s_llm = pol::streaming_llm{4}.select(o, budget);
    exact(s_llm, "streaming_llm");
    for (std::int64_t h = 0; h < Hkv; ++h) {
      for (std::int64_t j = 0; j < 4; ++j) EXPECT_TRUE(keeps(s_llm, h, j)) << "sink " << j << b;
      EXPECT_TRUE(keeps(s_llm, h, L - 1)) << "newest" << b;
    }
    const selection s_h2o = pol::h2o{5}.select(o, budget);
    exact(s_h2o, "h2o");
    const selection s_sci = pol::scissorhands{5}.select(o, budget);
    exact(s_sci, "scissorhands");
    const selection s_kf = pol::keyformer{5, 1.0f, 3}.select(o, budget);
    exact(s_kf, "keyformer");
    for (const selection* s : {&s_h2o, &s_sci, &s_kf})
      for (std::int64_t h = 0; h < Hkv; ++h)
        for (std::int64_t j = L - 5; j < L; ++j) EXPECT_TRUE(keeps(*s, h, j)) << "recent " << j << b;
    exact(pol::tova{}.select(o, budget), "tova");
    EXPECT_TRUE(keeps(pol::tova{}.select(o, budget), 0, L - 1)) << "tova keeps the current token" << b;
    const selection s_snap = pol::snapkv{Lw, 5}.select(o, budget);
    exact(s_snap, "snapkv");
    if (budget >= Lw) {
      for (std::int64_t j = L - Lw; j < L; ++j) EXPECT_TRUE(keeps(s_snap, 1, j)) << "snapkv window " << j << b;
    }
    exact(pol::knorm{}.select(o, budget), "knorm");
    exact(pol::keydiff{}.select(o, budget), "keydiff");
    exact(pol::qfilter{filters}.select(o, budget), "qfilter");
    const selection s_alisa = pol::alisa{0.5, Lw}.select(o, budget);
    exact(s_alisa, "alisa");
    for (std::int64_t j = L - pol::alisa{0.5, Lw}.local_slots(full); j < L; ++j) EXPECT_TRUE(keeps(s_alisa, 0, j)) << "alisa local" << b;
    // Head-adaptive: ragged, the layer total is Hkv * budget, every head at least its floor.
    const selection s_ada = pol::adakv{pol::snapkv{Lw, 5}, 0.2}.select(o, budget);
    expect_valid(s_ada, Hkv, L, L, "adakv" + b);
    EXPECT_EQ(s_ada.total_kept(), Hkv * full) << b;
    for (std::int64_t h = 0; h < Hkv; ++h) EXPECT_GE(s_ada.kept(h), static_cast<std::int64_t>(0.2 * full)) << b;
    const std::vector<std::uint8_t> special = [&] {
      std::vector<std::uint8_t> f(static_cast<std::size_t>(L), 0);
      f[0] = 1;
      return f;
    }();
    pol::observation of = o;
    of.special = special;
    const pol::fastgen::plan fg = pol::fastgen{}.profile(of, budget);
    expect_valid(fg.kept, Hkv, L, budget, "fastgen" + b);
    ASSERT_EQ(fg.per_head.size(), static_cast<std::size_t>(Hkv));
    for (std::int64_t h = 0; h < Hkv; ++h) EXPECT_TRUE(keeps(fg.kept, h, 0)) << "fastgen special token" << b;
  }
}

TEST(PolicyInvariants, PyramidBudgetsDecreaseAndAverageTheBudget) {
  const pol::pyramidkv p{pol::snapkv{8, 5}, 20};
  const std::vector<std::int64_t> b = p.layer_budgets(32, 200);
  ASSERT_EQ(b.size(), 32u);
  double mean = 0;
  for (std::size_t l = 0; l < b.size(); ++l) {
    mean += static_cast<double>(b[l]) / 32.0;
    EXPECT_GE(b[l], 8);
    if (l) {
      EXPECT_LE(b[l], b[l - 1]);
    }
  }
  EXPECT_NEAR(mean, 200.0, 1.0);  // floors lose < 1 slot per layer
  const inputs in = random_inputs(4, 2, 300, 8, 8, 9);
  pol::observation o = observe(in);
  o.layer = 31;
  o.layers = 32;
  const selection s = p.select(o, 200);
  for (std::int64_t h = 0; h < 2; ++h) EXPECT_EQ(s.kept(h), b.back());
}

TEST(PolicyInvariants, ThinkPrunesExactlyTheDroppedChannels) {
  const inputs in = random_inputs(4, 2, 30, 6, 12, 11);
  const pol::think t{};
  const selection ch = t.select(observe(in), 7);
  tensor<float, 3> k_out({2, 30, 12});
  pol::think::prune(in.k, ch, k_out.as_view());
  for (std::int64_t h = 0; h < 2; ++h) {
    EXPECT_EQ(ch.kept(h), 7);
    for (std::int64_t c = 0; c < 12; ++c)
      for (std::int64_t j = 0; j < 30; ++j) EXPECT_EQ(k_out(h, j, c), keeps(ch, h, c) ? in.k(h, j, c) : 0.0f);
  }
}

TEST(PolicyInvariants, QFilterFitPointsAgainstTheQueries) {
  // Queries clustered along +e0: the filter is -e0 (up to sign convention: mean(q . f) < 0), and
  // keys along +e0 score highest.
  tensor<float, 3> q({2, 50, 4});
  std::mt19937 rng(3);
  std::normal_distribution<float> noise(0.0f, 0.1f);
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t i = 0; i < 50; ++i)
      for (std::int64_t c = 0; c < 4; ++c) q(h, i, c) = (c == 0 ? 3.0f : 0.0f) + noise(rng);
  const tensor<float, 2> f = pol::qfilter::fit(q, 1);
  EXPECT_LT(f(0, 0), -0.99f);
}

// ---------------------------------------------------------------------------------------------
// Decode-time trackers.

// Feeds `steps` decode steps of random probabilities over a growing cache and compresses on
// overflow; the cache lengths must never exceed the budget after a compression.
template <class Decoder, class Append, class Observe, class Select>
void run_decoder(Decoder& dec, std::int64_t Hkv, std::int64_t Hq, std::int64_t budget, Append append, Observe observe_step,
                 Select select_fn) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<std::int64_t> len(static_cast<std::size_t>(Hkv), 0);
  for (int step = 0; step < 60; ++step) {
    for (std::int64_t h = 0; h < Hkv; ++h) {
      append(dec, h);
      ++len[static_cast<std::size_t>(h)];
    }
    const std::int64_t Lmax = *std::max_element(len.begin(), len.end());
    tensor<float, 2> probs({Hq, Lmax});
    for (std::int64_t h = 0; h < Hq; ++h) {
      const std::int64_t n = len[static_cast<std::size_t>(h / (Hq / Hkv))];
      for (std::int64_t j = 0; j < n; ++j) probs(h, j) = u(rng) / static_cast<float>(n);
    }
    observe_step(dec, probs);
    if (pol::should_compress(len, budget)) {
      const selection sel = select_fn(dec, budget);
      kvcache::validate("decoder", sel, len);
      for (std::int64_t h = 0; h < Hkv; ++h) {
        ASSERT_EQ(sel.kept(h), budget);
        EXPECT_TRUE(std::binary_search(sel.heads[static_cast<std::size_t>(h)].begin(), sel.heads[static_cast<std::size_t>(h)].end(),
                                       len[static_cast<std::size_t>(h)] - 1))
            << "the newest slot is kept";
        len[static_cast<std::size_t>(h)] = sel.kept(h);
      }
      dec.compact(sel);
    }
  }
}

TEST(PolicyDecoders, EveryTrackerStaysWithinBudget) {
  const std::int64_t Hkv = 2, Hq = 4, budget = 16, D = 8;
  auto no_observe = [](auto&, const tensor<float, 2>&) {};
  std::vector<float> key(static_cast<std::size_t>(D), 0.5f);
  {
    pol::h2o::decoder dec(Hkv, 2);
    run_decoder(dec, Hkv, Hq, budget, [](auto& d, std::int64_t h) { d.append(h); },
                [](auto& d, const tensor<float, 2>& p) { d.observe(p); }, [](auto& d, std::int64_t b) { return d.select(b); });
  }
  {
    pol::scissorhands::decoder dec(Hkv, 2);
    run_decoder(dec, Hkv, Hq, budget, [](auto& d, std::int64_t h) { d.append(h); },
                [](auto& d, const tensor<float, 2>& p) { d.observe(p); }, [](auto& d, std::int64_t b) { return d.select(b); });
  }
  {
    pol::keyformer::decoder dec(Hkv, pol::keyformer{2, 1.5f, 7});
    run_decoder(dec, Hkv, Hq, budget, [](auto& d, std::int64_t h) { d.append(h); },
                [](auto& d, const tensor<float, 2>& p) { d.observe(p); }, [](auto& d, std::int64_t b) { return d.select(b); });
  }
  {
    pol::alisa::decoder dec(Hkv, pol::alisa{0.25, 4});
    run_decoder(dec, Hkv, Hq, budget, [](auto& d, std::int64_t h) { d.append(h); },
                [](auto& d, const tensor<float, 2>& p) { d.observe(p); }, [](auto& d, std::int64_t b) { return d.select(b); });
  }
  {
    pol::knorm::decoder dec(Hkv);
    run_decoder(dec, Hkv, Hq, budget, [&](auto& d, std::int64_t h) { d.append(h, key.data(), D); }, no_observe,
                [](auto& d, std::int64_t b) { return d.select(b, 2, 1); });
  }
}

TEST(PolicyDecoders, H2OAccumulatesExactlyTheObservedSums) {
  pol::h2o::decoder dec(1);
  for (int j = 0; j < 3; ++j) dec.append(0);
  tensor<float, 2> p({2, 3});
  for (std::int64_t j = 0; j < 3; ++j) {
    p(0, j) = 0.1f * static_cast<float>(j + 1);
    p(1, j) = 0.05f;
  }
  dec.observe(p);
  dec.observe(p);
  for (std::int64_t j = 0; j < 3; ++j) EXPECT_FLOAT_EQ(dec.scores(0)[static_cast<std::size_t>(j)], 2 * (p(0, j) + p(1, j)));
  const selection keep_top = dec.select(1);
  EXPECT_EQ(keep_top.heads[0], std::vector<std::int64_t>{2});
}

TEST(PolicyDecoders, TovaAndStreamingMatchTheirPrefillRule) {
  const inputs in = random_inputs(4, 2, 40, 1, 8, 21);
  pol::tova::decoder dec(2);
  for (int j = 0; j < 40; ++j) {
    dec.append(0);
    dec.append(1);
  }
  dec.observe(in.attn);
  const selection from_decoder = dec.select(12);
  // Prefill TOVA forces the last slot; the decoder scores it by its own probability instead, so
  // compare on the slots before it.
  const selection prefill = pol::tova{}.select(observe(in), 12);
  std::vector<std::int64_t> a = from_decoder.heads[0], b = prefill.heads[0];
  a.erase(std::remove(a.begin(), a.end(), 39), a.end());
  b.erase(std::remove(b.begin(), b.end(), 39), b.end());
  const std::size_t n = std::min(a.size(), b.size());
  EXPECT_TRUE(std::equal(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(n), a.begin()));
  EXPECT_EQ(from_decoder.heads[0], from_decoder.heads[1]);
  const selection s = pol::streaming_llm{4}.keep({50, 10}, 20);
  EXPECT_EQ(s.kept(0), 20);
  EXPECT_EQ(s.kept(1), 10);
  EXPECT_EQ(s.heads[0].front(), 0);
  EXPECT_EQ(s.heads[0][4], 34);
}

// Drives a window decoder (snapkv / pyramidkv / adakv) through `steps` decode steps over ragged
// heads: each step appends one slot per kv head and observes random probabilities; the test keeps
// its own history of the last `window` steps' per-query-head probabilities per slot, so when
// `overflow(len)` says so, `check(sel, attn)` sees the decoder's selection and, for equal head
// lengths, the window's column sums [Hq, L] a prefill over the same tokens would have (else empty).
struct window_driver {
  std::int64_t Hkv = 2, Hq = 4, window = 6, steps = 90;

  template <class Decoder, class Overflow, class Select, class Check>
  int run(Decoder& dec, Overflow overflow, Select select_fn, Check check) const {
    const std::int64_t G = Hq / Hkv;
    std::mt19937 rng(9);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    std::vector<std::int64_t> len(static_cast<std::size_t>(Hkv), 0);
    std::vector<std::vector<std::vector<float>>> hist;  // [step][Hq][len of its kv head], oldest first
    int compressions = 0;
    for (std::int64_t step = 0; step < steps; ++step) {
      for (std::int64_t h = 0; h < Hkv; ++h) {
        dec.append(h);
        ++len[static_cast<std::size_t>(h)];
      }
      for (auto& st : hist)
        for (auto& row : st) row.push_back(0.0f);
      const std::int64_t Lmax = *std::max_element(len.begin(), len.end());
      tensor<float, 2> probs({Hq, Lmax});
      std::vector<std::vector<float>> now(static_cast<std::size_t>(Hq));
      for (std::int64_t h = 0; h < Hq; ++h) {
        const std::int64_t n = len[static_cast<std::size_t>(h / G)];
        for (std::int64_t j = 0; j < n; ++j) now[static_cast<std::size_t>(h)].push_back(probs(h, j) = u(rng) / static_cast<float>(n));
      }
      dec.observe(probs);
      hist.push_back(std::move(now));
      if (static_cast<std::int64_t>(hist.size()) > window) hist.erase(hist.begin());
      if (!overflow(len)) continue;
      ++compressions;
      tensor<float, 2> attn;
      if (std::all_of(len.begin(), len.end(), [&](std::int64_t n) { return n == len[0]; })) {
        attn = tensor<float, 2>({Hq, len[0]});
        for (const auto& st : hist)
          for (std::int64_t h = 0; h < Hq; ++h)
            for (std::int64_t j = 0; j < len[0]; ++j) attn(h, j) += st[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)];
      }
      const selection sel = select_fn();
      kvcache::validate("window decoder", sel, len);
      check(sel, attn, len);
      for (auto& st : hist)
        for (std::int64_t h = 0; h < Hq; ++h) {
          auto& row = st[static_cast<std::size_t>(h)];
          std::vector<float> kept;
          for (std::int64_t j : sel.heads[static_cast<std::size_t>(h / G)]) kept.push_back(row[static_cast<std::size_t>(j)]);
          row = kept;
        }
      for (std::int64_t h = 0; h < Hkv; ++h) len[static_cast<std::size_t>(h)] = sel.kept(h);
      dec.compact(sel);
      if (::testing::Test::HasFatalFailure()) return compressions;
    }
    return compressions;
  }
};

// The newest `window` slots of every head are in sel.
void expect_window_kept(const selection& sel, const std::vector<std::int64_t>& len, std::int64_t window) {
  for (std::size_t h = 0; h < len.size(); ++h)
    for (std::int64_t j = std::max<std::int64_t>(0, len[h] - window); j < len[h]; ++j)
      EXPECT_TRUE(std::binary_search(sel.heads[h].begin(), sel.heads[h].end(), j)) << "head " << h << " slot " << j;
}

TEST(PolicyDecoders, SnapKVSlidingWindowMatchesThePrefillSelection) {
  const window_driver drv;
  const pol::snapkv p{drv.window, 3};
  const std::int64_t budget = 20, D = 4;
  pol::snapkv::decoder dec(drv.Hkv, p);
  const int n = drv.run(
      dec, [&](const std::vector<std::int64_t>& len) { return pol::should_compress(len, budget); },
      [&] { return dec.select(budget); },
      [&](const selection& sel, const tensor<float, 2>& attn, const std::vector<std::int64_t>& len) {
        ASSERT_NE(attn.size(), 0);
        const tensor<float, 3> k({drv.Hkv, len[0], D});
        EXPECT_EQ(sel.heads, p.select({k, {}, {}, attn}, budget).heads) << "the prefill rule on the same window sums";
        for (std::int64_t h = 0; h < drv.Hkv; ++h) EXPECT_EQ(sel.kept(h), budget);
        expect_window_kept(sel, len, drv.window);
      });
  EXPECT_GT(n, 50);
}

TEST(PolicyDecoders, PyramidKVKeepsItsLayerBudgetWhileDecoding) {
  const window_driver drv;
  const pol::pyramidkv p{pol::snapkv{drv.window, 3}, 4};
  const std::int64_t layers = 4, average = 24, D = 4;
  const std::vector<std::int64_t> budgets = p.layer_budgets(layers, average);
  for (std::int64_t layer : {0, 3}) {
    pol::pyramidkv::decoder dec(drv.Hkv, p, layer, layers, average);
    ASSERT_EQ(dec.budget(), budgets[static_cast<std::size_t>(layer)]);
    drv.run(
        dec, [&](const std::vector<std::int64_t>&) { return dec.should_compress(); }, [&] { return dec.select(); },
        [&](const selection& sel, const tensor<float, 2>& attn, const std::vector<std::int64_t>& len) {
          ASSERT_NE(attn.size(), 0);
          const tensor<float, 3> k({drv.Hkv, len[0], D});
          pol::observation o{k, {}, {}, attn};
          o.layer = layer;
          o.layers = layers;
          EXPECT_EQ(sel.heads, p.select(o, average).heads);
          for (std::int64_t h = 0; h < drv.Hkv; ++h) EXPECT_EQ(sel.kept(h), dec.budget());
          expect_window_kept(sel, len, drv.window);
        });
  }
  EXPECT_GT(budgets[0], budgets[3]);
}

TEST(PolicyDecoders, AdaKVReallocatesOverRaggedHeads) {
  const window_driver drv;
  const pol::adakv p{pol::snapkv{drv.window, 3}, 0.25};
  const std::int64_t budget = 16, D = 4;
  pol::adakv::decoder dec(drv.Hkv, p);
  int rectangular = 0, ragged = 0;
  const int n = drv.run(
      dec, [&](const std::vector<std::int64_t>&) { return dec.should_compress(budget); }, [&] { return dec.select(budget); },
      [&](const selection& sel, const tensor<float, 2>& attn, const std::vector<std::int64_t>& len) {
        ragged += attn.size() == 0 ? 1 : 0;
        if (attn.size() != 0) {  // equal head lengths: the prefill allocation on the same window sums
          ++rectangular;
          const tensor<float, 3> k({drv.Hkv, len[0], D});
          EXPECT_EQ(sel.heads, p.select({k, {}, {}, attn}, budget).heads);
        }
        EXPECT_EQ(sel.total_kept(), drv.Hkv * budget) << "the layer's budget, shared between the heads";
        const auto floor = static_cast<std::int64_t>(p.alpha * static_cast<double>(budget));
        for (std::int64_t h = 0; h < drv.Hkv; ++h) EXPECT_GE(sel.kept(h), std::min(floor, len[static_cast<std::size_t>(h)]));
        expect_window_kept(sel, len, drv.window);
      });
  EXPECT_GT(n, 50);
  EXPECT_GE(rectangular, 1);
  EXPECT_GE(ragged, 10) << "random attention should give the heads different shares";
}

TEST(PolicyDecoders, FastGenAppliesEachHeadsPrefillChoice) {
  const std::int64_t Hq = 4, Hkv = 2, L = 40, budget = 16;
  const inputs in = random_inputs(Hq, Hkv, L, L, 8, 41);
  std::vector<std::uint8_t> special(static_cast<std::size_t>(L), 0), punct(static_cast<std::size_t>(L), 0);
  special[0] = special[1] = 1;
  for (std::int64_t j = 3; j < L; j += 7) punct[static_cast<std::size_t>(j)] = 1;
  const pol::fastgen p{0.6, 0.5};
  pol::observation o = observe(in);
  o.special = special;
  o.punct = punct;
  const pol::fastgen::plan plan = p.profile(o, budget);
  pol::fastgen::decoder dec(p, plan.per_head);
  for (std::int64_t h = 0; h < Hkv; ++h)
    for (std::int64_t j = 0; j < L; ++j) {
      const float a = in.attn(2 * h, j) + in.attn(2 * h + 1, j);
      dec.append(h, special[static_cast<std::size_t>(j)] != 0, punct[static_cast<std::size_t>(j)] != 0, a);
    }
  EXPECT_EQ(dec.select(budget).heads, plan.kept.heads) << "the prefill's set from the same attention";
  dec.compact(plan.kept);
  std::mt19937 rng(43);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int step = 0; step < 60; ++step) {
    // No flagged token while decoding: special + punctuation stay at most 2 + 6 slots, so the
    // local stage (8 slots, added oldest first and capped at the budget) reaches the newest one.
    for (std::int64_t h = 0; h < Hkv; ++h) dec.append(h, false, false);
    const std::vector<std::int64_t> len = dec.lengths();
    tensor<float, 2> probs({Hq, *std::max_element(len.begin(), len.end())});
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t j = 0; j < len[static_cast<std::size_t>(h / 2)]; ++j) probs(h, j) = u(rng);
    dec.observe(probs);
    if (!pol::should_compress(len, budget)) continue;
    const selection sel = dec.select(budget);
    kvcache::validate("fastgen decoder", sel, len);
    for (std::int64_t h = 0; h < Hkv; ++h) {
      const auto& row = sel.heads[static_cast<std::size_t>(h)];
      EXPECT_LE(sel.kept(h), budget);
      EXPECT_EQ(row[0], 0) << "special tokens come first";
      EXPECT_EQ(row[1], 1);
      if (dec.head_choice(h) >= pol::fastgen::choice::local) {
        EXPECT_EQ(row.back(), len[static_cast<std::size_t>(h)] - 1) << "the local window keeps the newest slot";
      }
    }
    dec.compact(sel);
  }
}

TEST(PolicyDecoders, ThinkPrunesNewKeysLikeThePrefill) {
  const inputs in = random_inputs(4, 2, 30, 4, 8, 51);
  const selection channels = pol::think{}.select(observe(in), 5);
  const pol::think::decoder dec(channels, 8);
  tensor<float, 3> k({2, 5, 8}), want({2, 5, 8});
  std::mt19937 rng(52);
  std::normal_distribution<float> dist;
  for (float& x : k) x = dist(rng);
  pol::think::prune(k, channels, want);
  dec.apply(k);
  for (std::int64_t h = 0; h < 2; ++h) {
    std::int64_t zero_channels = 0;
    for (std::int64_t c = 0; c < 8; ++c) zero_channels += k(h, 0, c) == 0.0f ? 1 : 0;
    EXPECT_EQ(zero_channels, 3);
    for (std::int64_t j = 0; j < 5; ++j)
      for (std::int64_t c = 0; c < 8; ++c) EXPECT_EQ(k(h, j, c), want(h, j, c));
  }
}

// ---------------------------------------------------------------------------------------------
// Errors.

TEST(PolicyErrors, BadBudgetsAndShapesThrow) {
  const inputs in = random_inputs(4, 2, 20, 4, 8, 31);
  const pol::observation o = observe(in);
  expect_error([&] { pol::knorm{}.select(o, -1); }, {"budget must be >= 0", "got -1"});
  expect_error([&] { pol::streaming_llm{4}.select(o, 3); }, {"budget must be >= 4", "got 3"});
  expect_error([&] { pol::h2o{6}.select(o, 5); }, {"recent", "got 5"});
  expect_error([&] { pol::snapkv{0, 5}.select(o, 5); }, {"window must be in [1, L = 20]", "got 0"});
  expect_error([&] { pol::snapkv{4, 4}.select(o, 5); }, {"kernel_size must be odd", "got 4"});
  expect_error([&] { pol::think{}.select(o, 9); }, {"budget (key channels kept) must be in [0, D = 8]", "got 9"});
  pol::observation o_layer = o;
  o_layer.layer = 4;
  o_layer.layers = 4;
  expect_error([&] { pol::pyramidkv{pol::snapkv{4, 5}}.select(o_layer, 10); },
               {"observation.layer must be in [0, layers = 4)", "got 4"});
  expect_error([&] { pol::pyramidkv{pol::snapkv{8, 5}}.layer_budgets(4, 7); }, {"budget must be >= 8", "got 7"});
  expect_error([&] { pol::adakv{pol::snapkv{4, 5}, 1.5}.select(o, 5); }, {"alpha must be in [0, 1]", "got 1.5"});
  tensor<float, 2> bad_attn({4, 19});
  expect_error([&] { pol::tova{}.select({in.k, {}, {}, bad_attn}, 5); }, {"observation.attn", "[4, 20]", "[4, 19]"});
  tensor<float, 3> bad_q({3, 4, 8});
  expect_error([&] { pol::keyformer{}.select({in.k, {}, bad_q, {}}, 5); }, {"Hq", "multiple of Hkv = 2", "got 3"});
  tensor<float, 3> bad_qd({4, 4, 7});
  expect_error([&] { pol::scissorhands{}.select({in.k, {}, bad_qd, {}}, 5); }, {"D = 8", "got 7"});
  expect_error([&] { pol::h2o{}.select({in.k, {}, {}, {}}, 5); }, {"observation.attn"});
  expect_error([&] { pol::knorm{}.select({}, 5); }, {"observation.k"});
  tensor<float, 2> bad_filters({2, 7});
  expect_error([&] { pol::qfilter{bad_filters}.select(o, 5); }, {"filters", "[2, 8]", "[2, 7]"});
  tensor<float, 2> scores({2, 19});
  expect_error([&] { pol::knorm{}.scores(o, scores); }, {"scores", "[2, 20]", "[2, 19]"});
  pol::h2o::decoder dec(2);
  dec.append(0);
  selection wrong;
  wrong.heads = {{0}, {0}};
  expect_error([&] { dec.compact(wrong); }, {"selection.heads[1][0]", "[0, 0)"});
  expect_error([&] { dec.select(-2); }, {"budget must be >= 0", "got -2"});
  expect_error([&] { dec.observe(tensor<float, 2>({3, 4})); }, {"multiple of Hkv = 2"});
  expect_error([&] { pol::snapkv::decoder(2, pol::snapkv{0, 3}); }, {"window must be >= 1", "got 0"});
  pol::snapkv::decoder snap(2, pol::snapkv{4, 3});
  snap.append(0);
  expect_error([&] { snap.observe(tensor<float, 2>({3, 4})); }, {"multiple of Hkv = 2", "[3, 4]"});
  expect_error([&] { snap.observe(tensor<float, 2>({2, 0})); }, {"probs"});
  expect_error([&] { pol::pyramidkv::decoder(2, pol::pyramidkv{pol::snapkv{4, 3}}, 4, 4, 10); },
               {"layer must be in [0, layers = 4)", "got 4"});
  expect_error([&] { pol::adakv::decoder(2, pol::adakv{pol::snapkv{4, 3}, 2.0}).select(3); }, {"alpha", "got 2"});
  const selection ch = pol::think{}.select(o, 6);
  expect_error([&] { pol::think::decoder(ch, 7); }, {"selection.heads[0]", "[0, 7)"});
  expect_error([&] { pol::think::decoder(ch, 8).apply(tensor<float, 3>({2, 1, 6}).as_view()); }, {"D = 8", "[2, 1, 6]"});
  expect_error([&] { pol::fastgen::decoder(pol::fastgen{}, {}); }, {"one choice per kv head"});
  expect_error([] { pol::find("no_such_policy"); }, {"name must be one of", "snapkv", "got 'no_such_policy'"});
  std::vector<std::uint8_t> short_flags(3, 0);
  pol::observation o_flags = o;
  o_flags.special = short_flags;
  expect_error([&] { pol::fastgen{}.select(o_flags, 5); }, {"special", "L = 20", "got 3"});
}

}  // namespace
