// Tests of memory/compressive.hpp (Infini-attention): retrieval, both update rules and the whole
// segmented attention, fast against reference on awkward shapes; facts that follow from the
// equations (a stored pair is retrieved exactly, the delta rule does not store a known pair
// twice, an empty memory retrieves 0); pieces; save/load; bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "memory/test_util.hpp"
#include "mnemo/memory/compressive.hpp"

namespace {

using namespace memory_test;
namespace mem = mnemo::memory;

struct infini_problem {
  std::int64_t B, H, L, Dk, Dv;
  tensor<float, 4> q, k, v;
  tensor<float, 1> beta;
  infini_problem(std::int64_t B_, std::int64_t H_, std::int64_t L_, std::int64_t Dk_, std::int64_t Dv_,
                 std::uint32_t seed)
      : B(B_), H(H_), L(L_), Dk(Dk_), Dv(Dv_) {
    std::mt19937 rng(seed);
    q = random_tensor<4>({B, H, L, Dk}, rng);
    k = random_tensor<4>({B, H, L, Dk}, rng);
    v = random_tensor<4>({B, H, L, Dv}, rng);
    beta = random_tensor<1>({H}, rng, -2.0f, 2.0f);
  }
};

void expect_same_state(const mem::compressive_state& a, const mem::compressive_state& b, double atol, double rtol,
                       const std::string& what) {
  tensor<float, 4> ma({a.batch(), a.heads(), a.key_dim(), a.value_dim()}), mb = ma;
  tensor<float, 3> za({a.batch(), a.heads(), a.key_dim()}), zb = za;
  std::copy(a.memory().data(), a.memory().data() + ma.size(), ma.data());
  std::copy(b.memory().data(), b.memory().data() + ma.size(), mb.data());
  std::copy(a.normalizer().data(), a.normalizer().data() + za.size(), za.data());
  std::copy(b.normalizer().data(), b.normalizer().data() + za.size(), zb.data());
  expect_close(ma, mb, atol, rtol, what + ": M");
  expect_close(za, zb, atol, rtol, what + ": z");
}

TEST(compressive, fast_matches_reference) {
  struct shape {
    std::int64_t B, H, L, Dk, Dv, S;
  };
  std::uint32_t seed = 1;
  for (const shape& s : std::vector<shape>{{1, 1, 1, 8, 8, 0},
                                           {2, 3, 37, 40, 24, 16},
                                           {1, 2, 64, 16, 32, 64},
                                           {1, 2, 50, 96, 40, 7},
                                           {2, 1, 20, 12, 12, 0}})
    for (mem::compressive_rule rule : {mem::compressive_rule::linear, mem::compressive_rule::delta}) {
      const infini_problem p(s.B, s.H, s.L, s.Dk, s.Dv, ++seed);
      mem::compressive_state sr(s.B, s.H, s.Dk, s.Dv), sf(s.B, s.H, s.Dk, s.Dv);
      tensor<float, 4> out_ref({s.B, s.H, s.L, s.Dv}), out_fast = out_ref;
      const mem::compressive_options opt{.segment_len = s.S, .update = rule};
      mem::reference::infini_attention(p.q, p.k, p.v, p.beta, sr, out_ref, opt);
      mem::infini_attention(p.q, p.k, p.v, p.beta, sf, out_fast, opt);
      const std::string what = "L=" + std::to_string(s.L) + " S=" + std::to_string(s.S) +
                               (rule == mem::compressive_rule::delta ? " delta" : " linear");
      expect_close(out_fast, out_ref, 1e-5, 1e-4, what + ": out");
      expect_same_state(sf, sr, 1e-4, 1e-5, what);
      // The primitives alone.
      tensor<float, 4> r_ref({s.B, s.H, s.L, s.Dv}), r_fast = r_ref;
      mem::reference::compressive_retrieve(p.q, sr, r_ref);
      mem::compressive_retrieve(p.q, sr, r_fast);
      expect_close(r_fast, r_ref, 1e-5, 1e-4, what + ": retrieve");
      mem::reference::compressive_update(p.k, p.v, sr, rule);
      mem::compressive_update(p.k, p.v, sf, rule);
      expect_same_state(sf, sr, 1e-4, 1e-5, what + ", update");
    }
}

// Queries and keys far below zero: sigma = e^x is then below f32's normal range (e^-100), and
// the fast path divided by a subnormal sigma(q) . z through its reciprocal, +inf (out -inf or NaN
// where the reference, in double, is finite; fuzz/memory_fuzz.cpp). The state stays in range
// (keys near -10 give z near e^-10 per token); only the feature rows of q, and of k in the delta
// rule's correction, are extreme.
TEST(compressive, very_negative_queries_and_keys_match_the_reference) {
  for (mem::compressive_rule rule : {mem::compressive_rule::linear, mem::compressive_rule::delta}) {
    infini_problem p(1, 2, 24, 6, 5, 77);
    for (std::int64_t i = 0; i < p.k.size(); ++i) p.k.data()[i] = -10.0f + p.k.data()[i];
    mem::compressive_state sr(1, 2, 6, 5), sf(1, 2, 6, 5);
    mem::reference::compressive_update(p.k, p.v, sr, rule);
    mem::reference::compressive_update(p.k, p.v, sf, rule);  // the same state for both retrievals
    for (std::int64_t i = 0; i < p.q.size(); ++i) p.q.data()[i] = -100.0f + 3.0f * p.q.data()[i];
    tensor<float, 4> r_ref({1, 2, 24, 5}), r_fast = r_ref;
    mem::reference::compressive_retrieve(p.q, sr, r_ref);
    mem::compressive_retrieve(p.q, sf, r_fast);
    for (std::int64_t i = 0; i < r_fast.size(); ++i) ASSERT_TRUE(std::isfinite(r_fast.data()[i])) << i;
    expect_close(r_fast, r_ref, 1e-5, 1e-4, "retrieve with q near -100");
    // A second segment of keys near -100: the delta rule's correction reads M with them.
    for (std::int64_t i = 0; i < p.k.size(); ++i) p.k.data()[i] -= 90.0f;
    mem::reference::compressive_update(p.k, p.v, sr, rule);
    mem::compressive_update(p.k, p.v, sf, rule);
    expect_same_state(sf, sr, 1e-4, 1e-4, "update with k near -100");
  }
}

TEST(compressive, a_stored_pair_is_retrieved) {
  // One token: M = sigma(k)^T v, z = sigma(k), so retrieving at q = k gives v exactly.
  const infini_problem p(1, 2, 1, 6, 5, 3);
  for (bool fast : {false, true}) {
    mem::compressive_state st(1, 2, 6, 5);
    tensor<float, 4> got({1, 2, 1, 5});
    if (fast) {
      mem::compressive_update(p.k, p.v, st);
      mem::compressive_retrieve(p.k, st, got);
    } else {
      mem::reference::compressive_update(p.k, p.v, st);
      mem::reference::compressive_retrieve(p.k, st, got);
    }
    expect_close(got, p.v, 1e-6, 1e-5, fast ? "fast" : "reference");
  }
}

TEST(compressive, delta_rule_does_not_store_a_known_pair_twice) {
  const infini_problem p(1, 1, 1, 7, 4, 4);
  for (bool fast : {false, true}) {
    mem::compressive_state st(1, 1, 7, 4);
    auto update = [&] {
      if (fast) mem::compressive_update(p.k, p.v, st, mem::compressive_rule::delta);
      else mem::reference::compressive_update(p.k, p.v, st, mem::compressive_rule::delta);
    };
    update();
    const std::vector<float> m1(st.memory().data(), st.memory().data() + 28), z1(st.normalizer().data(), st.normalizer().data() + 7);
    update();
    for (int i = 0; i < 28; ++i) EXPECT_NEAR(st.memory().data()[i], m1[i], 1e-6) << "M changed at " << i;
    for (int i = 0; i < 7; ++i) EXPECT_NEAR(st.normalizer().data()[i], 2 * z1[i], 1e-6) << "z at " << i;
  }
}

TEST(compressive, empty_memory_gives_local_attention_only) {
  // First segment: A_mem = 0, so out = (1 - sigmoid(beta)) A_dot.
  const infini_problem p(1, 2, 9, 8, 8, 5);
  mem::compressive_state st(1, 2, 8, 8);
  tensor<float, 4> out({1, 2, 9, 8}), local({1, 2, 9, 8});
  mem::infini_attention(p.q, p.k, p.v, p.beta, st, out, {.segment_len = 9});
  mnemo::attention::reference(p.q, p.k, p.v, local, {}, mnemo::attention::mods::causal{});
  for (std::int64_t h = 0; h < 2; ++h) {
    const double g = 1.0 / (1.0 + std::exp(-double(p.beta(h))));
    for (std::int64_t t = 0; t < 9; ++t)
      for (std::int64_t c = 0; c < 8; ++c) EXPECT_NEAR(out(0, h, t, c), (1 - g) * local(0, h, t, c), 1e-5);
  }
}

TEST(compressive, pieces_equal_one_call) {
  const infini_problem p(2, 2, 30, 12, 10, 6);
  for (bool fast : {false, true}) {
    mem::compressive_state one(2, 2, 12, 10), two(2, 2, 12, 10);
    tensor<float, 4> y1({2, 2, 30, 10}), y2 = y1;
    const mem::compressive_options opt{.segment_len = 5, .update = mem::compressive_rule::delta};
    auto run = [&](mem::compressive_state& st, std::int64_t t0, std::int64_t n, tensor<float, 4>& y) {
      auto cut = [&](const tensor<float, 4>& x) { return mnemo::cview(x).narrow(2, t0, n); };
      if (fast) mem::infini_attention(cut(p.q), cut(p.k), cut(p.v), p.beta, st, y.as_view().narrow(2, t0, n), opt);
      else mem::reference::infini_attention(cut(p.q), cut(p.k), cut(p.v), p.beta, st, y.as_view().narrow(2, t0, n), opt);
    };
    run(one, 0, 30, y1);
    run(two, 0, 10, y2);
    run(two, 10, 20, y2);
    expect_close(y2, y1, 1e-6, 1e-5, "pieces");
    expect_same_state(two, one, 1e-6, 1e-6, "pieces");
  }
}

TEST(compressive, threads_do_not_change_results) {
  const infini_problem p(2, 3, 21, 16, 16, 8);
  mem::compressive_state a(2, 3, 16, 16), b(2, 3, 16, 16);
  tensor<float, 4> ya({2, 3, 21, 16}), yb = ya;
  mem::infini_attention(p.q, p.k, p.v, p.beta, a, ya, {.segment_len = 8, .threads = 1});
  mem::infini_attention(p.q, p.k, p.v, p.beta, b, yb, {.segment_len = 8, .threads = 2});
  expect_close(yb, ya, 0, 0, "threads");
  expect_same_state(b, a, 0, 0, "threads");
}

TEST(compressive, save_load_round_trip) {
  const infini_problem p(2, 2, 12, 8, 6, 9);
  mem::compressive_state st(2, 2, 8, 6);
  tensor<float, 4> y({2, 2, 12, 6});
  mem::infini_attention(p.q, p.k, p.v, p.beta, st, y, {.segment_len = 4});
  scratch_dir dir("compressive");
  st.save(dir.file("infini_"));
  const mem::compressive_state back = mem::compressive_state::load(dir.file("infini_"));
  EXPECT_EQ(back.batch(), 2);
  EXPECT_EQ(back.heads(), 2);
  EXPECT_EQ(back.key_dim(), 8);
  EXPECT_EQ(back.value_dim(), 6);
  expect_same_state(back, st, 0, 0, "loaded");
  mnemo::npy::save(dir.file("infini_z.npy"), tensor<float, 3>({2, 2, 7}));
  expect_error([&] { (void)mem::compressive_state::load(dir.file("infini_")); }, {"z.npy", "[2, 2, 8]", "[2, 2, 7]"});
}

TEST(compressive, bad_inputs) {
  const infini_problem p(1, 2, 5, 4, 3, 11);
  mem::compressive_state st(1, 2, 4, 3);
  tensor<float, 4> out({1, 2, 5, 3}), q_bad({1, 2, 5, 5}), v_bad({1, 3, 5, 3});
  tensor<float, 1> beta_bad({3});
  expect_error([&] { mem::infini_attention(q_bad, p.k, p.v, p.beta, st, out); }, {"q", "[1, 2, 5, 4]", "[1, 2, 5, 5]"});
  expect_error([&] { mem::infini_attention(p.q, p.k, v_bad, p.beta, st, out); }, {"v", "[1, 2, 5, 3]", "[1, 3, 5, 3]"});
  expect_error([&] { mem::infini_attention(p.q, p.k, p.v, beta_bad, st, out); }, {"beta", "[2]", "[3]"});
  expect_error([&] { mem::infini_attention(p.q, p.k, p.v, p.beta, st, out, {.segment_len = -1}); },
               {"segment_len", ">= 0", "-1"});
  expect_error([&] { mem::reference::infini_attention(p.q, p.k, p.v, p.beta, st, out, {.threads = -1}); },
               {"threads", ">= 0", "-1"});
  expect_error([&] { mem::compressive_retrieve(p.q, st, q_bad); }, {"out", "[1, 2, 5, 3]", "[1, 2, 5, 5]"});
  expect_error([&] { mem::compressive_update(q_bad, p.v, st); }, {"k", "[1, 2, 5, 4]", "[1, 2, 5, 5]"});
  mem::compressive_state empty;
  expect_error([&] { mem::compressive_retrieve(p.q, empty, out); }, {"state", "empty"});
  expect_error([&] { mem::compressive_state(1, 0, 4, 3); }, {"H=0"});
}

}  // namespace
