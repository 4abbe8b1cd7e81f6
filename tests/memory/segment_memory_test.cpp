// Tests of the segment memories: memory/segment_recurrence.hpp (Transformer-XL with relative
// positions, the GTrXL gate), memory/compressive_transformer.hpp (Rae et al.) and memory/lamemo.hpp
// (look-ahead memory). Fast against reference over several segments on awkward sizes; facts that
// follow from the equations, with expected values computed here from the inputs (attention over the
// whole sequence, pooling by hand, the gate with zero weights); bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "memory/test_util.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/attention/score_terms.hpp"
#include "mnemo/memory/compressive_transformer.hpp"
#include "mnemo/memory/lamemo.hpp"
#include "mnemo/memory/segment_recurrence.hpp"

namespace {

using namespace memory_test;
namespace mem = mnemo::memory;
namespace att = mnemo::attention;
using mnemo::cview;

// The tokens of `steps` segments of L tokens each (the last one `last` tokens long).
struct stream {
  std::int64_t B, H, D, Dv;
  std::vector<std::int64_t> lens;
  tensor<float, 4> q, k, v;  // the whole sequence [B, H, sum(lens), .]
  stream(std::int64_t B_, std::int64_t H_, std::int64_t D_, std::int64_t Dv_, std::vector<std::int64_t> lens_,
         std::uint32_t seed)
      : B(B_), H(H_), D(D_), Dv(Dv_), lens(std::move(lens_)) {
    std::mt19937 rng(seed);
    std::int64_t T = 0;
    for (auto l : lens) T += l;
    q = random_tensor<4>({B, H, T, D}, rng);
    k = random_tensor<4>({B, H, T, D}, rng);
    v = random_tensor<4>({B, H, T, Dv}, rng);
  }
  std::int64_t start(std::size_t s) const {
    std::int64_t t = 0;
    for (std::size_t i = 0; i < s; ++i) t += lens[i];
    return t;
  }
  template <class X>
  view<const float, 4> seg(const X& x, std::size_t s) const {
    return cview(x).narrow(2, start(s), lens[s]);
  }
};

tensor<float, 4> copy_of(view<const float, 4> x) {
  tensor<float, 4> t({x.extent(0), x.extent(1), x.extent(2), x.extent(3)});
  for (std::int64_t a = 0; a < x.extent(0); ++a)
    for (std::int64_t b = 0; b < x.extent(1); ++b)
      for (std::int64_t c = 0; c < x.extent(2); ++c) std::copy_n(x.ptr(a, b, c), x.extent(3), t.as_view().ptr(a, b, c));
  return t;
}
tensor<float, 3> copy_of(view<const float, 3> x) {
  tensor<float, 3> t({x.extent(0), x.extent(1), x.extent(2)});
  for (std::int64_t a = 0; a < x.extent(0); ++a)
    for (std::int64_t b = 0; b < x.extent(1); ++b) std::copy_n(x.ptr(a, b), x.extent(2), t.as_view().ptr(a, b));
  return t;
}

// ---------------------------------------------------------------------------------------------
// Transformer-XL

struct xl_case {
  std::int64_t B, H, M, D, Dv;
  std::vector<std::int64_t> lens;
  std::int64_t Hr;  // 0: no relative term
  bool biases;
};

TEST(segment_recurrence, xl_fast_matches_reference) {
  std::uint32_t seed = 100;
  for (const xl_case& c : std::vector<xl_case>{{1, 1, 3, 8, 8, {1, 1, 1}, 0, false},
                                               {2, 3, 20, 40, 24, {37, 37, 5}, 1, true},
                                               {1, 2, 64, 16, 32, {50, 50, 50}, 2, false},
                                               {1, 2, 0, 16, 16, {9, 17}, 2, true},
                                               {2, 1, 7, 12, 20, {3, 30, 1}, 1, false}}) {
    const stream s(c.B, c.H, c.D, c.Dv, c.lens, ++seed);
    std::mt19937 rng(seed);
    const std::int64_t N = c.M + 40;
    const tensor<float, 3> r = random_tensor<3>({std::max<std::int64_t>(c.Hr, 1), N, c.D}, rng);
    const tensor<float, 2> u = random_tensor<2>({c.H, c.D}, rng), vb = random_tensor<2>({c.H, c.D}, rng);
    mem::xl_position pos;
    if (c.Hr > 0) pos = {r, c.biases ? cview(u) : view<const float, 2>{}, c.biases ? cview(vb) : view<const float, 2>{}};
    mem::kv_memory mr(c.B, c.H, c.M, c.D, c.Dv), mf(c.B, c.H, c.M, c.D, c.Dv);
    for (std::size_t i = 0; i < c.lens.size(); ++i) {
      const std::int64_t L = c.lens[i];
      tensor<float, 4> out_r({c.B, c.H, L, c.Dv}), out_f = out_r;
      mem::reference::xl_attention(s.seg(s.q, i), s.seg(s.k, i), s.seg(s.v, i), pos, mr, out_r);
      mem::xl_attention(s.seg(s.q, i), s.seg(s.k, i), s.seg(s.v, i), pos, mf, out_f);
      const std::string what = "M=" + std::to_string(c.M) + " step " + std::to_string(i);
      expect_close(out_f, out_r, 2e-5, 1e-4, what);
      ASSERT_EQ(mf.size(), std::min(c.M, s.start(i + 1))) << what;
      // The memory is the last M tokens seen.
      const std::int64_t m = mf.size();
      expect_close(copy_of(mf.keys()), copy_of(cview(s.k).narrow(2, s.start(i + 1) - m, m)), 0, 0, what + ": keys");
      expect_close(copy_of(mf.values()), copy_of(cview(s.v).narrow(2, s.start(i + 1) - m, m)), 0, 0, what + ": values");
    }
  }
}

// With M >= everything seen, the segment's output is the causal attention over the whole sequence
// (with the same relative terms over it): the memory only moves where the keys come from.
TEST(segment_recurrence, xl_with_enough_memory_is_attention_over_the_whole_sequence) {
  for (bool relative : {false, true}) {
    const stream s(1, 2, 16, 8, {13, 21}, 7);
    std::mt19937 rng(8);
    const tensor<float, 3> r = random_tensor<3>({2, 34, 16}, rng);
    const tensor<float, 2> u = random_tensor<2>({2, 16}, rng), vb = random_tensor<2>({2, 16}, rng);
    mem::xl_position pos;
    if (relative) pos = {r, u, vb};
    mem::kv_memory m(1, 2, 40, 16, 8);
    tensor<float, 4> out0({1, 2, 13, 8}), out1({1, 2, 21, 8}), full({1, 2, 34, 8});
    mem::xl_attention(s.seg(s.q, 0), s.seg(s.k, 0), s.seg(s.v, 0), pos, m, out0);
    mem::xl_attention(s.seg(s.q, 1), s.seg(s.k, 1), s.seg(s.v, 1), pos, m, out1);
    if (relative)
      att::reference(cview(s.q), cview(s.k), cview(s.v), full.as_view(), {},
                     att::mods::all_of(att::mods::relative_position(cview(s.q)[0], cview(s.k)[0], r, u, vb, 0),
                                       att::mods::causal{}));
    else
      att::reference(cview(s.q), cview(s.k), cview(s.v), full.as_view(), {}, att::mods::causal{});
    expect_close(out0, copy_of(cview(full).narrow(2, 0, 13)), 2e-5, 1e-4, "segment 0");
    expect_close(out1, copy_of(cview(full).narrow(2, 13, 21)), 2e-5, 1e-4, "segment 1");
  }
}

TEST(segment_recurrence, gtrxl_gate) {
  std::mt19937 rng(5);
  for (std::int64_t D : {1, 24, 67}) {
    const std::int64_t B = 2, L = 9;
    const tensor<float, 3> x = random_tensor<3>({B, L, D}, rng), y = random_tensor<3>({B, L, D}, rng);
    std::vector<tensor<float, 2>> w;
    for (int i = 0; i < 6; ++i) w.push_back(random_tensor<2>({D, D}, rng, -0.3f, 0.3f));
    const mem::gtrxl_weights gw{w[0], w[1], w[2], w[3], w[4], w[5], 1.5f};
    tensor<float, 3> got({B, L, D}), want = got;
    mem::reference::gtrxl_gate(x, y, gw, want);
    mem::gtrxl_gate(x, y, gw, got);
    expect_close(got, want, 1e-5, 1e-4, "D=" + std::to_string(D));
    // Zero weights: r = 1/2, z = sigmoid(-b_g), h = tanh(0) = 0, so g = (1 - sigmoid(-b_g)) x.
    const tensor<float, 2> zero({D, D});
    const float bg = 2.0f;
    const mem::gtrxl_weights zw{zero, zero, zero, zero, zero, zero, bg};
    mem::gtrxl_gate(x, y, zw, got);
    tensor<float, 3> expect({B, L, D});
    for (std::int64_t i = 0; i < x.size(); ++i)
      expect.data()[i] = static_cast<float>((1.0 - 1.0 / (1.0 + std::exp(double(bg)))) * x.data()[i]);
    expect_close(got, expect, 1e-6, 1e-6, "zero weights");
  }
}

TEST(segment_recurrence, bad_inputs) {
  const stream s(1, 2, 8, 4, {5}, 3);
  mem::kv_memory m(1, 2, 4, 8, 4);
  tensor<float, 4> out({1, 2, 5, 4}), bad({1, 2, 5, 5});
  tensor<float, 3> r_bad({3, 10, 8});
  expect_error([&] { mem::xl_attention(s.q, s.k, bad, {}, m, out); }, {"v", "[1, 2, 5, 4]", "[1, 2, 5, 5]"});
  expect_error([&] { mem::xl_attention(s.q, s.k, s.v, {}, m, bad); }, {"out", "[1, 2, 5, 4]", "[1, 2, 5, 5]"});
  expect_error([&] { mem::xl_attention(s.q, s.k, s.v, {r_bad}, m, out); }, {"position.r", "[3, 10, 8]"});
  expect_error([&] { mem::reference::xl_attention(s.q, s.k, s.v, {}, m, out, {.threads = -1}); }, {"threads", "-1"});
  mem::kv_memory none;
  expect_error([&] { mem::xl_attention(s.q, s.k, s.v, {}, none, out); }, {"memory", "empty"});
  expect_error([&] { mem::kv_memory(1, 0, 4, 8, 4); }, {"H=0"});
  const tensor<float, 3> x({1, 3, 4});
  const tensor<float, 2> w({4, 4}), w_bad({4, 3});
  tensor<float, 3> o({1, 3, 4});
  expect_error([&] { mem::gtrxl_gate(x, x, {w, w, w, w, w, w_bad}, o); }, {"weights.u_g", "[4, 4]", "[4, 3]"});
}

// ---------------------------------------------------------------------------------------------
// Compressive Transformer

tensor<float, 3> random_kernel(std::int64_t c, std::int64_t D, std::mt19937& rng) {
  return random_tensor<3>({c, D, D}, rng, -0.5f, 0.5f);
}

struct ct_case {
  std::int64_t B, H, n_m, n_cm, D, Dv, c;
  std::vector<std::int64_t> lens;
};

TEST(compressive_transformer, fast_matches_reference) {
  std::uint32_t seed = 200;
  for (const ct_case& c : std::vector<ct_case>{{1, 1, 2, 3, 8, 8, 1, {1, 1, 1, 1, 1}},
                                               {2, 3, 20, 9, 40, 24, 3, {37, 11, 37, 5}},
                                               {1, 2, 16, 5, 16, 32, 4, {16, 16, 16, 16}},
                                               {1, 2, 0, 6, 12, 12, 2, {7, 9}},
                                               {1, 1, 10, 0, 12, 20, 3, {13, 4}}})
    for (mem::compression f :
         {mem::compression::mean_pool, mem::compression::max_pool, mem::compression::conv, mem::compression::most_used}) {
      const stream s(c.B, c.H, c.D, c.Dv, c.lens, ++seed);
      std::mt19937 rng(seed);
      const tensor<float, 3> wk = random_kernel(c.c, c.D, rng), wv = random_kernel(c.c, c.Dv, rng);
      // Threads on the largest case only: many small attention calls, whose OpenMP barriers cost
      // seconds on a loaded machine.
      const mem::compressive_transformer_options opt{.rate = c.c,
                                                     .function = f,
                                                     .conv_keys = wk,
                                                     .conv_values = wv,
                                                     .reconstruction_loss = true,
                                                     .threads = c.B * c.H > 2 ? 0 : 1};
      mem::compressive_transformer_memory mr(c.B, c.H, c.n_m, c.n_cm, c.D, c.Dv), mf = mr;
      for (std::size_t i = 0; i < c.lens.size(); ++i) {
        const std::int64_t L = c.lens[i];
        tensor<float, 4> out_r({c.B, c.H, L, c.Dv}), out_f = out_r;
        const auto sr = mem::reference::compressive_transformer_attention(s.seg(s.q, i), s.seg(s.k, i), s.seg(s.v, i),
                                                                          mr, out_r, opt);
        const auto sf = mem::compressive_transformer_attention(s.seg(s.q, i), s.seg(s.k, i), s.seg(s.v, i), mf, out_f, opt);
        const std::string what = std::string(mem::compression_name(f)) + " n_m=" + std::to_string(c.n_m) +
                                 " c=" + std::to_string(c.c) + " step " + std::to_string(i);
        expect_close(out_f, out_r, 2e-5, 1e-4, what);
        ASSERT_EQ(sf.evicted, sr.evicted) << what;
        ASSERT_EQ(sf.compressed, sr.compressed) << what;
        EXPECT_NEAR(sf.reconstruction_loss, sr.reconstruction_loss, 1e-6 + 1e-4 * sr.reconstruction_loss) << what;
        ASSERT_EQ(mf.memory_size(), mr.memory_size()) << what;
        ASSERT_EQ(mf.compressed_size(), mr.compressed_size()) << what;
        expect_close(copy_of(mf.compressed_keys()), copy_of(mr.compressed_keys()), 1e-5, 1e-4, what + ": cm keys");
        expect_close(copy_of(mf.compressed_values()), copy_of(mr.compressed_values()), 1e-5, 1e-4, what + ": cm values");
        if (f == mem::compression::most_used)
          expect_close(copy_of(mf.usage()), copy_of(mr.usage()), 1e-5, 1e-4, what + ": usage");
      }
    }
}

// Compression functions against values computed here.
TEST(compressive_transformer, compression_functions) {
  std::mt19937 rng(9);
  const std::int64_t B = 1, H = 2, n = 7, D = 5, c = 3, nc = 3;  // groups of 3, 3 and 1
  const tensor<float, 4> k = random_tensor<4>({B, H, n, D}, rng), v = random_tensor<4>({B, H, n, D}, rng);
  tensor<float, 3> usage({B, H, n});
  const float use[2][7] = {{0.1f, 0.9f, 0.3f, 0.9f, 0.5f, 0.0f, 0.2f}, {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f}};
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t t = 0; t < n; ++t) usage(0, h, t) = use[h][t];
  // conv with W_i = I / c: sum / c per group (the mean for full groups)
  tensor<float, 3> eye({c, D, D});
  for (std::int64_t i = 0; i < c; ++i)
    for (std::int64_t j = 0; j < D; ++j) eye(i, j, j) = 1.0f / static_cast<float>(c);
  for (bool fast : {false, true})
    for (mem::compression f :
         {mem::compression::mean_pool, mem::compression::max_pool, mem::compression::conv, mem::compression::most_used}) {
      tensor<float, 4> ok({B, H, nc, D}), ov({B, H, nc, D}), want({B, H, nc, D});
      const mem::compressive_transformer_options opt{.rate = c, .function = f, .conv_keys = eye, .conv_values = eye};
      if (fast) mem::compress_memories(k, v, usage, opt, ok, ov);
      else mem::reference::compress_memories(k, v, usage, opt, ok, ov);
      const std::int64_t picks[2][3] = {{1, 3, 4}, {4, 5, 6}};  // the 3 largest usages, in time order (tie: older)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t g = 0; g < nc; ++g)
          for (std::int64_t j = 0; j < D; ++j) {
            const std::int64_t r = std::min(c, n - g * c);
            double sum = 0, mx = -1e30;
            for (std::int64_t i = 0; i < r; ++i) {
              sum += k(0, h, g * c + i, j);
              mx = std::max(mx, double(k(0, h, g * c + i, j)));
            }
            double w = 0;
            switch (f) {
              case mem::compression::mean_pool: w = sum / r; break;
              case mem::compression::max_pool: w = mx; break;
              case mem::compression::conv: w = sum / c; break;
              case mem::compression::most_used: w = k(0, h, picks[h][g], j); break;
            }
            want(0, h, g, j) = static_cast<float>(w);
          }
      expect_close(ok, want, 1e-6, 1e-5, std::string(fast ? "fast " : "reference ") + mem::compression_name(f));
    }
  // Rate 1 mean pooling is the identity, so its reconstruction loss is 0; a coarser one is not.
  const tensor<float, 4> q = random_tensor<4>({B, H, 4, D}, rng);
  tensor<float, 4> k1({B, H, n, D}), v1 = k1, k3({B, H, nc, D}), v3 = k3;
  mem::compress_memories(k, v, {}, {.rate = 1}, k1, v1);
  mem::compress_memories(k, v, {}, {.rate = 3}, k3, v3);
  EXPECT_NEAR(mem::attention_reconstruction_loss(q, k, v, k1, v1), 0.0, 1e-12);
  EXPECT_NEAR(mem::reference::attention_reconstruction_loss(q, k, v, k1, v1), 0.0, 1e-12);
  EXPECT_GT(mem::reference::attention_reconstruction_loss(q, k, v, k3, v3), 1e-4);
}

// A step against the paper's algorithm written out: n_m = L, so each segment pushes the previous one
// out of m; it is mean-pooled into pairs, and cm keeps the last n_cm of them. The output is the
// causal attention over [cm; m; h] assembled here.
TEST(compressive_transformer, step_follows_the_algorithm) {
  const std::int64_t L = 6, c = 2, n_cm = 4, D = 8;
  const stream s(1, 1, D, D, {L, L, L, L}, 21);
  mem::compressive_transformer_memory m(1, 1, L, n_cm, D, D);
  for (std::size_t i = 0; i < 4; ++i) {
    // cm before this step: the pooled pairs of segments 0 .. i-2, the last n_cm of them.
    std::vector<std::vector<float>> ck, cv;
    for (std::int64_t t0 = 0; t0 < s.start(i) - L; t0 += c) {  // tokens that left m before this step
      std::vector<float> a(D), b(D);
      for (std::int64_t j = 0; j < D; ++j) {
        a[j] = 0.5f * (s.k(0, 0, t0, j) + s.k(0, 0, t0 + 1, j));
        b[j] = 0.5f * (s.v(0, 0, t0, j) + s.v(0, 0, t0 + 1, j));
      }
      ck.push_back(a);
      cv.push_back(b);
    }
    while (static_cast<std::int64_t>(ck.size()) > n_cm) {
      ck.erase(ck.begin());
      cv.erase(cv.begin());
    }
    const std::int64_t ncm = static_cast<std::int64_t>(ck.size()), nm = i == 0 ? 0 : L, T = ncm + nm + L;
    tensor<float, 4> kk({1, 1, T, D}), vv({1, 1, T, D});
    for (std::int64_t t = 0; t < ncm; ++t)
      for (std::int64_t j = 0; j < D; ++j) {
        kk(0, 0, t, j) = ck[t][j];
        vv(0, 0, t, j) = cv[t][j];
      }
    for (std::int64_t t = 0; t < nm + L; ++t)
      for (std::int64_t j = 0; j < D; ++j) {
        kk(0, 0, ncm + t, j) = s.k(0, 0, s.start(i) - nm + t, j);
        vv(0, 0, ncm + t, j) = s.v(0, 0, s.start(i) - nm + t, j);
      }
    tensor<float, 4> want({1, 1, L, D}), got = want;
    att::reference(s.seg(s.q, i), cview(kk), cview(vv), want.as_view(), {}, att::mods::causal{});
    ASSERT_EQ(m.compressed_size(), ncm) << "step " << i;
    const auto st = mem::compressive_transformer_attention(s.seg(s.q, i), s.seg(s.k, i), s.seg(s.v, i), m, got,
                                                           {.rate = c, .function = mem::compression::mean_pool});
    EXPECT_EQ(st.evicted, i == 0 ? 0 : L);
    EXPECT_EQ(st.compressed, i == 0 ? 0 : L / c);
    expect_close(got, want, 2e-5, 1e-4, "step " + std::to_string(i));
  }
}

TEST(compressive_transformer, bad_inputs) {
  const stream s(1, 2, 8, 4, {5}, 3);
  mem::compressive_transformer_memory m(1, 2, 4, 4, 8, 4);
  tensor<float, 4> out({1, 2, 5, 4}), bad({1, 2, 5, 5});
  expect_error([&] { mem::compressive_transformer_attention(s.q, s.k, s.v, m, out, {.rate = 0}); }, {"rate", ">= 1", "0"});
  expect_error([&] { mem::compressive_transformer_attention(s.q, s.k, s.v, m, out, {.function = mem::compression::conv}); },
               {"options.conv_keys", "[3, 8, 8]"});
  expect_error([&] { mem::compressive_transformer_attention(s.q, s.k, s.v, m, bad); }, {"out", "[1, 2, 5, 4]", "[1, 2, 5, 5]"});
  expect_error([&] { mem::reference::compressive_transformer_attention(bad, s.k, s.v, m, out); }, {"q", "[1, 2, 5, 5]"});
  tensor<float, 4> ck({1, 2, 2, 8}), cv({1, 2, 2, 4});
  expect_error([&] { mem::compress_memories(s.k, s.v, {}, {.function = mem::compression::most_used}, ck, cv); },
               {"usage", "[1, 2, 5]"});
  expect_error([&] { mem::compressive_transformer_memory(1, 2, -1, 4, 8, 4); }, {"n_m=-1"});
}

// ---------------------------------------------------------------------------------------------
// LaMemo

struct lm_case {
  std::int64_t B, H, M, D, Dv;
  std::vector<std::int64_t> lens;
};

TEST(lamemo, fast_matches_reference) {
  std::uint32_t seed = 300;
  for (const lm_case& c : std::vector<lm_case>{{1, 1, 3, 8, 8, {1, 1, 1, 1}},
                                               {2, 3, 20, 40, 24, {37, 11, 37}},
                                               {1, 2, 64, 16, 32, {50, 50, 50}},
                                               {1, 2, 0, 16, 16, {9, 17}},
                                               {2, 1, 7, 12, 20, {3, 30, 1}}}) {
    const stream s(c.B, c.H, c.D, c.Dv, c.lens, ++seed);
    mem::lamemo_memory mr(c.B, c.H, c.M, c.D, c.Dv), mf = mr;
    for (std::size_t i = 0; i < c.lens.size(); ++i) {
      const std::int64_t L = c.lens[i];
      tensor<float, 4> out_r({c.B, c.H, L, c.Dv}), out_f = out_r;
      mem::reference::lamemo_attention(s.seg(s.q, i), s.seg(s.k, i), s.seg(s.v, i), mr, out_r);
      mem::lamemo_attention(s.seg(s.q, i), s.seg(s.k, i), s.seg(s.v, i), mf, out_f);
      const std::string what = "M=" + std::to_string(c.M) + " step " + std::to_string(i);
      expect_close(out_f, out_r, 2e-5, 1e-4, what);
      ASSERT_EQ(mf.size(), mr.size()) << what;
      expect_close(copy_of(mf.states()), copy_of(mr.states()), 2e-5, 1e-4, what + ": states");
      expect_close(copy_of(mf.log_normalizers()), copy_of(mr.log_normalizers()), 2e-5, 1e-5, what + ": lse");
    }
  }
}

// After two segments (M >= L), the state of memory token t of segment 0 is the attention of its
// query over everything it has seen: tokens 0..t of segment 0 (its causal left context) and all of
// segment 1 (its look-ahead); the segment's output is the causal attention over both segments.
TEST(lamemo, states_are_attention_over_left_and_right_context) {
  const std::int64_t L0 = 11, L1 = 7, D = 12, Dv = 9;
  const stream s(1, 2, D, Dv, {L0, L1}, 31);
  for (bool fast : {false, true}) {
    mem::lamemo_memory m(1, 2, 20, D, Dv);
    tensor<float, 4> out0({1, 2, L0, Dv}), out1({1, 2, L1, Dv});
    (fast ? mem::lamemo_attention : mem::reference::lamemo_attention)(s.seg(s.q, 0), s.seg(s.k, 0), s.seg(s.v, 0), m,
                                                                       out0, {});
    (fast ? mem::lamemo_attention : mem::reference::lamemo_attention)(s.seg(s.q, 1), s.seg(s.k, 1), s.seg(s.v, 1), m,
                                                                       out1, {});
    ASSERT_EQ(m.size(), L0 + L1);
    tensor<float, 4> full({1, 2, L0 + L1, Dv});
    att::reference(cview(s.q), cview(s.k), cview(s.v), full.as_view(), {}, att::mods::causal{});
    expect_close(out1, copy_of(cview(full).narrow(2, L0, L1)), 2e-5, 1e-4, "segment 1 output");
    for (std::int64_t t = 0; t < L0; ++t) {
      const std::int64_t n = t + 1 + L1;
      tensor<float, 4> kk({1, 2, n, D}), vv({1, 2, n, Dv}), want({1, 2, 1, Dv});
      for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t j = 0; j < n; ++j) {
          const std::int64_t src = j <= t ? j : L0 + (j - t - 1);
          std::copy_n(&s.k(0, h, src, 0), D, &kk(0, h, j, 0));
          std::copy_n(&s.v(0, h, src, 0), Dv, &vv(0, h, j, 0));
        }
      att::reference(cview(s.q).narrow(2, t, 1), cview(kk), cview(vv), want.as_view(), {}, att::mods::none{});
      expect_close(copy_of(m.states().narrow(2, t, 1)), want, 2e-5, 1e-4,
                   std::string(fast ? "fast" : "reference") + " state of token " + std::to_string(t));
    }
  }
}

TEST(lamemo, bad_inputs) {
  const stream s(1, 2, 8, 4, {5}, 3);
  mem::lamemo_memory m(1, 2, 4, 8, 4);
  tensor<float, 4> out({1, 2, 5, 4}), bad({1, 2, 5, 5});
  expect_error([&] { mem::lamemo_attention(s.q, bad, s.v, m, out); }, {"k", "[1, 2, 5, 8]", "[1, 2, 5, 5]"});
  expect_error([&] { mem::lamemo_attention(s.q, s.k, s.v, m, out, {.scale = NAN}); }, {"scale", "finite"});
  mem::lamemo_memory none;
  expect_error([&] { mem::reference::lamemo_attention(s.q, s.k, s.v, none, out); }, {"memory", "empty"});
  expect_error([&] { mem::lamemo_memory(1, 2, -3, 8, 4); }, {"M=-3"});
}

// ---------------------------------------------------------------------------------------------
// Associative reads: 8 facts with orthogonal, sharp keys (8 e_i: score 16 against 0 at scale 1/4)
// written as one segment; a query equal to a fact's key reads back its value (softmax weight
// e^16 / (e^16 + 7) = 1 - 8e-7) in every module whose memory holds the facts as pairs. The
// Compressive Transformer keeps 4 in m and 4 in cm at rate 1 (lossless), so all 8 come back.
TEST(segment_memories, reads_recall_stored_pairs) {
  constexpr std::int64_t n = 8, D = 16, Dv = 6;
  std::mt19937 rng(41);
  tensor<float, 4> keys({1, 1, n, D});
  const tensor<float, 4> values = random_tensor<4>({1, 1, n, Dv}, rng);
  for (std::int64_t i = 0; i < n; ++i) keys(0, 0, i, i) = 8.0f;
  const tensor<float, 4> noise = random_tensor<4>({1, 1, n, D}, rng);  // the write segment's own queries
  tensor<float, 4> seg_out({1, 1, n, Dv});
  for (bool fast : {false, true}) {
    mem::kv_memory xl(1, 1, n, D, Dv);
    xl.push(keys, values);
    mem::compressive_transformer_memory ct(1, 1, 4, 4, D, Dv);
    mem::compressive_transformer_attention(noise, keys, values, ct, seg_out, {.rate = 1});
    mem::lamemo_memory lm(1, 1, n, D, Dv);
    mem::lamemo_attention(noise, keys, values, lm, seg_out);
    ASSERT_EQ(ct.memory_size(), 4);
    ASSERT_EQ(ct.compressed_size(), 4);
    tensor<float, 4> a({1, 1, n, Dv}), b = a, c = a;
    if (fast) {
      mem::xl_read(keys, xl, a);
      mem::compressive_transformer_read(keys, ct, b);
      mem::lamemo_read(keys, lm, c);
    } else {
      mem::reference::xl_read(keys, xl, a);
      mem::reference::compressive_transformer_read(keys, ct, b);
      mem::reference::lamemo_read(keys, lm, c);
    }
    const std::string what = fast ? "fast " : "reference ";
    expect_close(a, values, 1e-5, 1e-5, what + "xl_read");
    expect_close(b, values, 1e-5, 1e-5, what + "compressive_transformer_read");
    expect_close(c, values, 1e-5, 1e-5, what + "lamemo_read");
  }
  mem::kv_memory xl(1, 1, n, D, Dv);
  tensor<float, 4> bad({1, 1, n, 5});
  expect_error([&] { mem::xl_read(keys, xl, bad); }, {"out", "[1, 1, 8, 6]", "[1, 1, 8, 5]"});
}

// Every state survives save and load; a mismatched file is reported by name.
TEST(segment_memories, save_load_round_trip) {
  const stream s(2, 2, 8, 6, {5, 9}, 51);
  scratch_dir dir("segment_memory");
  tensor<float, 4> out0({2, 2, 5, 6}), out1({2, 2, 9, 6}), again({2, 2, 9, 6});
  {
    mem::kv_memory m(2, 2, 7, 8, 6);
    mem::xl_attention(s.seg(s.q, 0), s.seg(s.k, 0), s.seg(s.v, 0), {}, m, out0);
    m.save(dir.file("xl_"));
    mem::kv_memory back = mem::kv_memory::load(dir.file("xl_"));
    ASSERT_EQ(back.size(), 5);
    mem::xl_attention(s.seg(s.q, 1), s.seg(s.k, 1), s.seg(s.v, 1), {}, m, out1);
    mem::xl_attention(s.seg(s.q, 1), s.seg(s.k, 1), s.seg(s.v, 1), {}, back, again);
    expect_close(again, out1, 0, 0, "xl after load");
    mnemo::npy::save(dir.file("xl_v.npy"), tensor<float, 4>({2, 3, 7, 6}));
    expect_error([&] { (void)mem::kv_memory::load(dir.file("xl_")); }, {"v.npy", "[2, 2, 7]", "[2, 3, 7, 6]"});
  }
  {
    mem::compressive_transformer_memory m(2, 2, 4, 3, 8, 6);
    const mem::compressive_transformer_options opt{.rate = 2, .function = mem::compression::most_used};
    mem::compressive_transformer_attention(s.seg(s.q, 0), s.seg(s.k, 0), s.seg(s.v, 0), m, out0, opt);
    m.save(dir.file("ct_"));
    mem::compressive_transformer_memory back = mem::compressive_transformer_memory::load(dir.file("ct_"));
    ASSERT_EQ(back.memory_size(), 4);
    ASSERT_EQ(back.compressed_size(), 1);
    mem::compressive_transformer_attention(s.seg(s.q, 1), s.seg(s.k, 1), s.seg(s.v, 1), m, out1, opt);
    mem::compressive_transformer_attention(s.seg(s.q, 1), s.seg(s.k, 1), s.seg(s.v, 1), back, again, opt);
    expect_close(again, out1, 0, 0, "compressive after load");
  }
  {
    mem::lamemo_memory m(2, 2, 7, 8, 6);
    mem::lamemo_attention(s.seg(s.q, 0), s.seg(s.k, 0), s.seg(s.v, 0), m, out0);
    m.save(dir.file("lm_"));
    mem::lamemo_memory back = mem::lamemo_memory::load(dir.file("lm_"));
    mem::lamemo_attention(s.seg(s.q, 1), s.seg(s.k, 1), s.seg(s.v, 1), m, out1);
    mem::lamemo_attention(s.seg(s.q, 1), s.seg(s.k, 1), s.seg(s.v, 1), back, again);
    expect_close(again, out1, 0, 0, "lamemo after load");
    expect_close(copy_of(back.states()), copy_of(m.states()), 0, 0, "lamemo states after load");
  }
}

}  // namespace
