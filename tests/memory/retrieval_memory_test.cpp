// Tests of the retrieval and consolidation memories: memory/retro.hpp (RETRO chunked
// cross-attention and its database), memory/hmt.hpp (HMT recall and segment loop),
// memory/camelot.hpp (CAMELoT consolidated associative memory) and memory/memoryllm.hpp
// (MEMORYLLM pool, M+ long-term memory). Each fast path against its double reference on awkward
// sizes, an independently computed property of each, save/load, and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "mnemo/attention/reference.hpp"
#include "mnemo/memory/camelot.hpp"
#include "mnemo/memory/hmt.hpp"
#include "mnemo/memory/memoryllm.hpp"
#include "mnemo/memory/retro.hpp"
#include "support/support.hpp"

namespace {

namespace mem = mnemo::memory;
using mnemo::tensor;
using mnemo::view;
using mnemo::test::expect_close;
using mnemo::test::expect_error;

// Uniform values in [lo, hi]. (memory/test_util.hpp has the same, but brings the golden runner,
// JSON and two other modules into the TU: a third of its compile, 37 s -> 25 s measured.)
template <int R>
tensor<float, R> random_tensor(mnemo::shape_t<R> shape, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  tensor<float, R> t(shape);
  std::uniform_real_distribution<float> u(lo, hi);
  for (float& x : t) x = u(rng);
  return t;
}
constexpr float inf = std::numeric_limits<float>::infinity();

// Rows of unit length (so cosine similarities and dot products agree).
template <int R>
void normalise_rows(tensor<float, R>& t) {
  const std::int64_t D = t.extent(R - 1);
  for (std::int64_t r = 0; r < t.size() / D; ++r) {
    float* x = t.data() + r * D;
    double n = 0;
    for (std::int64_t e = 0; e < D; ++e) n += static_cast<double>(x[e]) * x[e];
    for (std::int64_t e = 0; e < D; ++e) x[e] = static_cast<float>(x[e] / std::sqrt(n));
  }
}

// ---- RETRO ----

TEST(retro, source_chunk_is_the_papers_shift) {
  // m = 4: tokens 0..2 read nothing, 3..6 (the last of chunk 0 and three of chunk 1) chunk 0, 7..10 chunk 1.
  const std::vector<std::int64_t> want = {-1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1, 2};
  for (std::int64_t i = 0; i < 12; ++i) EXPECT_EQ(mem::retro_source_chunk(i, 4), want[i]) << "i=" << i;
  for (std::int64_t i = 0; i < 5; ++i) EXPECT_EQ(mem::retro_source_chunk(i, 1), i);  // m = 1: its own token
}

TEST(retro, cca_fast_matches_reference) {
  struct shape {
    std::int64_t B, Hq, Hkv, L, D, Dv, m, N, C;
  };
  const shape shapes[] = {
      {1, 1, 1, 1, 8, 8, 4, 3, 0},       // L = 1 < m - 1: nothing attends
      {2, 4, 2, 37, 40, 24, 8, 5, 4},    // L not a multiple of m, GQA 2, a partial attending chunk
      {1, 2, 1, 64, 16, 16, 16, 7, 4},   // L = 4 m: the last token reads the last chunk
      {1, 1, 1, 20, 8, 12, 1, 2, 20},    // m = 1
      {1, 2, 2, 33, 12, 12, 8, 17, 6},   // more neighbour sets than read (ignored)
  };
  std::mt19937 rng(11);
  for (const shape& s : shapes) {
    const std::int64_t Lk = s.C * s.N;
    const auto q = random_tensor<4>({s.B, s.Hq, s.L, s.D}, rng);
    const auto k = random_tensor<4>({s.B, s.Hkv, Lk, s.D}, rng, -2.0f, 2.0f);
    const auto v = random_tensor<4>({s.B, s.Hkv, Lk, s.Dv}, rng);
    tensor<float, 4> o_ref({s.B, s.Hq, s.L, s.Dv}), o_fast({s.B, s.Hq, s.L, s.Dv});
    tensor<float, 3> l_ref({s.B, s.Hq, s.L}), l_fast({s.B, s.Hq, s.L});
    const mem::retro_options opt{.chunk_len = s.m, .neighbour_len = s.N};
    mem::reference::retro_cca(q, k, v, o_ref, l_ref, opt);
    mem::retro_cca(q, k, v, o_fast, l_fast, opt);
    expect_close(o_fast, o_ref, 1e-5, 1e-4, "out L=" + std::to_string(s.L));
    for (std::int64_t b = 0; b < s.B; ++b)
      for (std::int64_t h = 0; h < s.Hq; ++h)
        for (std::int64_t i = 0; i < s.L; ++i) {
          if (i < s.m - 1) {
            EXPECT_EQ(l_fast(b, h, i), -inf);
            EXPECT_EQ(l_ref(b, h, i), -inf);
            for (std::int64_t e = 0; e < s.Dv; ++e) EXPECT_EQ(o_fast(b, h, i, e), 0.0f);
          } else {
            EXPECT_NEAR(l_fast(b, h, i), l_ref(b, h, i), 1e-4);
          }
        }
  }
}

TEST(retro, one_neighbour_row_per_chunk_copies_its_value) {
  // N = 1: the softmax over one row is 1, so token i reads the value row of chunk (i + 1) / m - 1,
  // whatever its query; m = 3, L = 11: tokens 2..4 read chunk 0, 5..7 chunk 1, 8..10 chunk 2.
  const std::int64_t m = 3, L = 11, C = 4, D = 4;
  std::mt19937 rng(3);
  const auto q = random_tensor<4>({1, 1, L, D}, rng), k = random_tensor<4>({1, 1, C, D}, rng);
  tensor<float, 4> v({1, 1, C, D}), out({1, 1, L, D});
  for (std::int64_t c = 0; c < C; ++c)
    for (std::int64_t e = 0; e < D; ++e) v(0, 0, c, e) = static_cast<float>(10 * c + e);
  mem::retro_cca(q, k, v, out, {}, {.chunk_len = m, .neighbour_len = 1});
  const std::int64_t chunk_of[L] = {-1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 2};
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t e = 0; e < D; ++e)
      EXPECT_EQ(out(0, 0, i, e), chunk_of[i] < 0 ? 0.0f : static_cast<float>(10 * chunk_of[i] + e)) << "i=" << i;
}

TEST(retro, causal_across_chunks) {
  // Changing chunk u's neighbours changes no token before (u + 1) m - 1, the first that reads them.
  const std::int64_t m = 5, N = 4, L = 30, C = 6, D = 8;
  std::mt19937 rng(5);
  const auto q = random_tensor<4>({1, 2, L, D}, rng);
  auto k = random_tensor<4>({1, 2, C * N, D}, rng), v = random_tensor<4>({1, 2, C * N, D}, rng);
  tensor<float, 4> a({1, 2, L, D}), b({1, 2, L, D});
  const mem::retro_options opt{.chunk_len = m, .neighbour_len = N};
  mem::retro_cca(q, k, v, a, {}, opt);
  const std::int64_t u = 3;
  for (std::int64_t j = u * N; j < (u + 1) * N; ++j)
    for (std::int64_t e = 0; e < D; ++e) {
      k(0, 1, j, e) += 1.0f;
      v(0, 1, j, e) -= 2.0f;
    }
  mem::retro_cca(q, k, v, b, {}, opt);
  for (std::int64_t i = 0; i < L; ++i) {
    const bool reads_u = i >= (u + 1) * m - 1 && i < (u + 2) * m - 1;
    EXPECT_EQ(a(0, 0, i, 0), b(0, 0, i, 0)) << "head 0 keeps its neighbours, i=" << i;
    if (reads_u) EXPECT_NE(a(0, 1, i, 0), b(0, 1, i, 0)) << "i=" << i;
    else EXPECT_EQ(a(0, 1, i, 0), b(0, 1, i, 0)) << "i=" << i;
  }
}

TEST(retro, database_retrieves_and_gathers) {
  const std::int64_t De = 16, r = 3, Dt = 2, n = 40;
  std::mt19937 rng(7);
  auto keys = random_tensor<2>({n, De}, rng);
  normalise_rows(keys);
  tensor<float, 3> payload({n, r, Dt});
  for (std::int64_t c = 0; c < n; ++c)
    for (std::int64_t t = 0; t < r; ++t)
      for (std::int64_t e = 0; e < Dt; ++e) payload(c, t, e) = static_cast<float>(100 * c + 10 * t + e);
  mem::retro_database db(De, r, Dt, 64);
  db.add(view<const float, 2>(keys).narrow(0, 0, 25), view<const float, 3>(payload).narrow(0, 0, 25));
  db.add(view<const float, 2>(keys).narrow(0, 25, 15), view<const float, 3>(payload).narrow(0, 25, 15));
  EXPECT_EQ(db.size(), n);
  // A chunk's own key is its nearest neighbour (unit keys: q . k = 1 beats every other).
  const std::int64_t C = 5, k = 2;
  tensor<float, 2> queries({C, De});
  for (std::int64_t u = 0; u < C; ++u)
    for (std::int64_t e = 0; e < De; ++e) queries(u, e) = keys(7 * u + 1, e);
  tensor<std::int64_t, 2> slots({C, k}), slots_ivf({C, k});
  db.retrieve(queries, slots);
  for (std::int64_t u = 0; u < C; ++u) EXPECT_EQ(db.keys().position(slots(u, 0)), 7 * u + 1);
  mem::knn_index index;
  index.build(db.keys(), {.n_lists = 4});
  db.retrieve(queries, index, 4, slots_ivf);  // every list probed: exact
  for (std::int64_t u = 0; u < C; ++u)
    for (std::int64_t j = 0; j < k; ++j) EXPECT_EQ(slots_ivf(u, j), slots(u, j));
  tensor<float, 2> nb({C * k * r, Dt});
  db.gather(slots, nb);
  for (std::int64_t u = 0; u < C; ++u)
    for (std::int64_t j = 0; j < k; ++j)
      for (std::int64_t t = 0; t < r; ++t)
        EXPECT_EQ(nb((u * k + j) * r + t, 1), static_cast<float>(100 * db.keys().position(slots(u, j)) + 10 * t + 1));
  // Chunk means.
  tensor<float, 2> x({7, 2}), means({3, 2});
  for (std::int64_t t = 0; t < 7; ++t) x(t, 0) = x(t, 1) = static_cast<float>(t);
  mem::retro_chunk_means(x, 3, means);
  EXPECT_EQ(means(0, 0), 1.0f);
  EXPECT_EQ(means(1, 1), 4.0f);
  EXPECT_EQ(means(2, 0), 6.0f);  // the short last chunk
}

TEST(retro, bad_input) {
  tensor<float, 4> q({1, 1, 10, 4}), k({1, 1, 6, 4}), v({1, 1, 6, 4}), out({1, 1, 10, 4});
  expect_error([&] { mem::retro_cca(q, k, v, out, {}, {.chunk_len = 0, .neighbour_len = 3}); },
               {"memory::retro_cca", "chunk_len", "got 0"});
  expect_error([&] { mem::retro_cca(q, k, v, out, {}, {.chunk_len = 3, .neighbour_len = 4}); },
               {"memory::retro_cca", "k_nb.shape[2]", "N = neighbour_len = 4", "got 6"});
  expect_error([&] { mem::reference::retro_cca(q, k, v, out, {}, {.chunk_len = 2, .neighbour_len = 3}); },
               {"memory::reference::retro_cca", "floor(L / m) = 5", "got 6"});
  mem::retro_database db(4, 2, 3, 8);
  tensor<float, 2> keys({2, 4});
  tensor<float, 3> bad({2, 3, 3});
  expect_error([&] { db.add(keys, bad); }, {"retro_database::add", "payload", "[n, r, Dt]"});
}

// ---- HMT ----

tensor<float, 2> random_matrix(std::int64_t r, std::int64_t c, std::mt19937& rng) { return random_tensor<2>({r, c}, rng); }

TEST(hmt, recall_fast_matches_reference) {
  std::mt19937 rng(13);
  const std::int64_t B = 2, N = 5, D = 24, Dh = 8;
  const auto wq = random_matrix(D, Dh, rng), wk = random_matrix(D, Dh, rng);
  mem::hmt_memory m(B, N, wq, wk);
  tensor<float, 2> s = random_tensor<2>({B, D}, rng), ref({B, D}), fast({B, D});
  mem::reference::hmt_recall(s, m, ref);
  mem::hmt_recall(s, m, fast);
  for (std::int64_t e = 0; e < D; ++e) EXPECT_EQ(fast(1, e), 0.0f);  // an empty cache recalls 0
  expect_close(fast, ref, 0, 0, "empty");
  for (int step = 0; step < 8; ++step) {  // 8 > N: the ring wraps
    m.append(random_tensor<2>({B, D}, rng, -2.0f, 2.0f));
    mem::reference::hmt_recall(s, m, ref);
    mem::hmt_recall(s, m, fast);
    expect_close(fast, ref, 1e-5, 1e-4, "step " + std::to_string(step));
  }
  EXPECT_EQ(m.size(), N);
}

TEST(hmt, one_cached_embedding_is_recalled_exactly) {
  std::mt19937 rng(17);
  const std::int64_t D = 6, Dh = 3;
  mem::hmt_memory m(1, 4, random_matrix(D, Dh, rng), random_matrix(D, Dh, rng));
  const auto e = random_tensor<2>({1, D}, rng);
  m.append(e);
  tensor<float, 2> out({1, D});
  mem::hmt_recall(random_tensor<2>({1, D}, rng), m, out);
  for (std::int64_t c = 0; c < D; ++c) EXPECT_NEAR(out(0, c), e(0, c), 1e-6);
}

TEST(hmt, forward_fast_matches_reference) {
  std::mt19937 rng(19);
  const std::int64_t B = 2, L = 37, D = 12, Dh = 4;
  const auto wq = random_matrix(D, Dh, rng), wk = random_matrix(D, Dh, rng);
  const auto x = random_tensor<3>({B, L, D}, rng);
  const auto prompt = random_tensor<1>({D}, rng);
  // A block that mixes tokens: out_t = tanh(in_t + mean of in), so summaries and memories differ.
  auto block = [](view<const float, 3> in, view<float, 3> out) {
    for (std::int64_t b = 0; b < in.extent(0); ++b)
      for (std::int64_t e = 0; e < in.extent(2); ++e) {
        double mean = 0;
        for (std::int64_t t = 0; t < in.extent(1); ++t) mean += in(b, t, e);
        mean /= static_cast<double>(in.extent(1));
        for (std::int64_t t = 0; t < in.extent(1); ++t) out(b, t, e) = static_cast<float>(std::tanh(in(b, t, e) + mean));
      }
  };
  const mem::hmt_options opt{.segment_len = 8, .summary_len = 3, .sensory_len = 2};
  mem::hmt_memory m_ref(B, 3, wq, wk), m_fast(B, 3, wq, wk);
  tensor<float, 3> y_ref({B, L, D}), y_fast({B, L, D});
  mem::reference::hmt_forward(x, m_ref, prompt, block, y_ref, opt);
  mem::hmt_forward(x, m_fast, prompt, block, y_fast, opt);
  expect_close(y_fast, y_ref, 1e-5, 1e-4, "y");
  expect_close(m_fast.cache(), m_ref.cache(), 1e-5, 1e-4, "cache");
  EXPECT_EQ(m_fast.total_added(), 5);  // ceil(37 / 8) segments
}

TEST(hmt, identity_block_passes_tokens_through) {
  // With block = identity, y_n = the segment itself, the summary is T, and every memory
  // embedding is the recalled token: 0 for the first segment, hence 0 forever.
  std::mt19937 rng(23);
  const std::int64_t L = 10, D = 4;
  mem::hmt_memory m(1, 2, random_matrix(D, 2, rng), random_matrix(D, 2, rng));
  const auto x = random_tensor<3>({1, L, D}, rng);
  tensor<float, 3> y({1, L, D});
  std::vector<std::int64_t> lens;
  auto identity = [&](view<const float, 3> in, view<float, 3> out) {
    lens.push_back(in.extent(1));
    for (std::int64_t t = 0; t < in.extent(1); ++t)
      for (std::int64_t e = 0; e < D; ++e) out(0, t, e) = in(0, t, e);
  };
  mem::hmt_forward(x, m, random_tensor<1>({D}, rng), identity, y, {.segment_len = 4, .sensory_len = 1});
  expect_close(y, x, 0, 0, "y");
  for (std::int64_t s = 0; s < m.size(); ++s)
    for (std::int64_t e = 0; e < D; ++e) EXPECT_EQ(m.cache()(0, s, e), 0.0f);
  // Summaries of j = 2 tokens (+2 prompts), segments 4, 4, 2 with 0, 1, 1 sensory tokens (+2 recalls).
  EXPECT_EQ(lens, (std::vector<std::int64_t>{4, 6, 4, 7, 4, 5}));
}

TEST(hmt, bad_input) {
  tensor<float, 2> wq({4, 2}), wk({4, 3}), s({1, 4}), out({1, 4});
  expect_error([&] { mem::hmt_memory(1, 2, wq, wk); }, {"hmt_memory", "wk", "[D, Dh]"});
  mem::hmt_memory m(1, 2, wq, wq);
  tensor<float, 2> s_bad({1, 5});
  expect_error([&] { mem::hmt_recall(s_bad, m, out); }, {"memory::hmt_recall", "summary", "[B, D]"});
  tensor<float, 3> x({1, 5, 4}), y({1, 5, 4});
  tensor<float, 1> t({4});
  auto id = [](view<const float, 3>, view<float, 3>) {};
  expect_error([&] { mem::hmt_forward(x, m, t, id, y, {.segment_len = 2, .summary_len = 3}); },
               {"memory::hmt_forward", "summary_len", "got 3"});
}

// ---- CAMELoT ----

TEST(camelot, write_and_read_fast_match_reference) {
  struct shape {
    std::int64_t B, H, S, D, Dv, L;
    float threshold;
  };
  const shape shapes[] = {
      {1, 1, 1, 3, 2, 1, 0.5f},     // one slot, one pair
      {2, 3, 17, 4, 5, 150, 0.8f},  // L > S (replacement) and > the 64-pair block; D = 4: many consolidations
      {1, 2, 40, 16, 8, 70, 0.3f},
  };
  std::mt19937 rng(29);
  for (const shape& s : shapes) {
    mem::camelot_memory a(s.B, s.H, s.S, s.D, s.Dv), b(s.B, s.H, s.S, s.D, s.Dv);
    const mem::camelot_options opt{.threshold = s.threshold};
    for (int round = 0; round < 2; ++round) {  // a second write continues the clock
      const auto k = random_tensor<4>({s.B, s.H, s.L, s.D}, rng), v = random_tensor<4>({s.B, s.H, s.L, s.Dv}, rng);
      mem::reference::camelot_write(k, v, a, opt);
      mem::camelot_write(k, v, b, opt);
    }
    for (std::int64_t bb = 0; bb < s.B; ++bb)
      for (std::int64_t h = 0; h < s.H; ++h) ASSERT_EQ(b.size(bb, h), a.size(bb, h));
    std::int64_t merged = 0;
    for (std::int64_t c : std::vector<std::int64_t>(a.counts().data(), a.counts().data() + s.B * s.H * s.S))
      merged += c > 1 ? 1 : 0;
    if (s.L > s.S) {
      EXPECT_GT(merged, 0) << "the case should consolidate";
    }
    for (std::int64_t i = 0; i < s.B * s.H * s.S; ++i) {
      EXPECT_EQ(b.counts().data()[i], a.counts().data()[i]) << i;
      EXPECT_EQ(b.last_used().data()[i], a.last_used().data()[i]) << i;
    }
    expect_close(b.keys(), a.keys(), 1e-5, 1e-4, "keys");
    expect_close(b.values(), a.values(), 1e-5, 1e-4, "values");
    const auto q = random_tensor<4>({s.B, s.H, 9, s.D}, rng);
    tensor<float, 4> o_ref({s.B, s.H, 9, s.Dv}), o_fast({s.B, s.H, 9, s.Dv});
    tensor<float, 3> l_ref({s.B, s.H, 9}), l_fast({s.B, s.H, 9});
    mem::reference::camelot_read(q, a, o_ref, l_ref, opt);
    mem::camelot_read(q, a, o_fast, l_fast, opt);
    expect_close(o_fast, o_ref, 1e-5, 1e-4, "out");
    expect_close(l_fast, l_ref, 1e-5, 1e-4, "lse");
  }
}

TEST(camelot, without_consolidation_replacement_is_fifo) {
  // threshold > 1: every pair is novel; slots fill in order, then the least recently used, which
  // is the oldest: pair t ends in slot t mod S.
  const std::int64_t S = 5, L = 13, D = 3;
  tensor<float, 4> k({1, 1, L, D}), v({1, 1, L, 1});
  for (std::int64_t t = 0; t < L; ++t) {
    for (std::int64_t e = 0; e < D; ++e) k(0, 0, t, e) = static_cast<float>(t + 1);  // all parallel: sim = 1
    v(0, 0, t, 0) = static_cast<float>(t);
  }
  mem::camelot_memory m(1, 1, S, D, 1);
  mem::camelot_write(k, v, m, {.threshold = 1.5f});
  ASSERT_EQ(m.size(0, 0), S);
  for (std::int64_t t = L - S; t < L; ++t) {
    EXPECT_EQ(m.values()(0, 0, t % S, 0), static_cast<float>(t));
    EXPECT_EQ(m.last_used()(0, 0, t % S), t + 1);
  }
}

TEST(camelot, consolidation_is_a_running_mean) {
  // Three pairs along one direction and one orthogonal: the three merge into one slot (count 3,
  // the means of keys and values), the fourth gets its own.
  tensor<float, 4> k({1, 1, 4, 2}), v({1, 1, 4, 1});
  const float ks[4][2] = {{1, 0}, {2, 0.01f}, {3, -0.01f}, {0, 1}};
  for (int t = 0; t < 4; ++t) {
    k(0, 0, t, 0) = ks[t][0];
    k(0, 0, t, 1) = ks[t][1];
    v(0, 0, t, 0) = static_cast<float>(3 * t);
  }
  for (bool ref : {false, true}) {
    mem::camelot_memory m(1, 1, 4, 2, 1);
    if (ref) mem::reference::camelot_write(k, v, m, {.threshold = 0.99f});
    else mem::camelot_write(k, v, m, {.threshold = 0.99f});
    ASSERT_EQ(m.size(0, 0), 2);
    EXPECT_EQ(m.counts()(0, 0, 0), 3);
    EXPECT_NEAR(m.keys()(0, 0, 0, 0), 2.0f, 1e-6);
    EXPECT_NEAR(m.keys()(0, 0, 0, 1), 0.0f, 1e-6);
    EXPECT_NEAR(m.values()(0, 0, 0, 0), 3.0f, 1e-6);  // (0 + 3 + 6) / 3
    EXPECT_EQ(m.counts()(0, 0, 1), 1);
    EXPECT_EQ(m.values()(0, 0, 1, 0), 9.0f);
    EXPECT_EQ(m.last_used()(0, 0, 0), 3);
  }
}

TEST(camelot, recalls_stored_associations) {
  // 24 random unit keys in D = 64 (pairwise cosines far below 0.9): each stored; a sharp read
  // (scale 30) of key i returns value i.
  const std::int64_t P = 24, D = 64;
  std::mt19937 rng(31);
  auto k = random_tensor<4>({1, 1, P, D}, rng);
  normalise_rows(k);
  const auto v = random_tensor<4>({1, 1, P, D}, rng);
  mem::camelot_memory m(1, 1, 32, D, D);
  const mem::camelot_options opt{.threshold = 0.9f, .scale = 30.0f};
  mem::camelot_write(k, v, m, opt);
  ASSERT_EQ(m.size(0, 0), P);
  tensor<float, 4> out({1, 1, P, D});
  mem::camelot_read(k, m, out, {}, opt);
  expect_close(out, v, 0.05, 0, "recalled values");
  // An empty memory reads 0 with lse -inf.
  mem::camelot_memory e(1, 1, 4, D, D);
  tensor<float, 3> lse({1, 1, P});
  mem::camelot_read(k, e, out, lse, opt);
  EXPECT_EQ(lse(0, 0, 0), -inf);
  EXPECT_EQ(out(0, 0, 0, 0), 0.0f);
}

TEST(camelot, bad_input) {
  mem::camelot_memory m(1, 2, 4, 3, 5);
  tensor<float, 4> k({1, 2, 6, 3}), v({1, 2, 6, 4}), q({1, 2, 2, 3}), out({1, 2, 2, 4});
  expect_error([&] { mem::camelot_write(k, v, m); }, {"memory::camelot_write", "v", "[B, H, L, Dv]"});
  expect_error([&] { mem::reference::camelot_read(q, m, out); }, {"memory::reference::camelot_read", "out"});
  expect_error([&] { mem::camelot_memory(1, 1, 0, 3, 3); }, {"camelot_memory", "S=0"});
}

// ---- MEMORYLLM / M+ ----

TEST(memoryllm, dropped_slots_are_distinct_seeded_and_uniform) {
  const auto a = mem::memoryllm_dropped_slots(5, 3, 2, 1, 20, 6);
  EXPECT_EQ(a, mem::memoryllm_dropped_slots(5, 3, 2, 1, 20, 6));  // deterministic
  EXPECT_NE(a, mem::memoryllm_dropped_slots(6, 3, 2, 1, 20, 6));  // seeded
  EXPECT_EQ(std::set<std::int64_t>(a.begin(), a.end()).size(), 6u);
  EXPECT_TRUE(std::is_sorted(a.begin(), a.end()));
  EXPECT_GE(a.front(), 0);
  EXPECT_LT(a.back(), 20);
  // Every slot is dropped about K / N of the time (2000 draws: 600 expected per slot, sd ~ 20).
  std::vector<int> hits(10);
  for (int u = 0; u < 2000; ++u)
    for (std::int64_t j : mem::memoryllm_dropped_slots(1, u, 1, 0, 10, 3)) ++hits[j];
  for (int h : hits) EXPECT_NEAR(h, 600, 100);
}

TEST(memoryllm, update_keeps_order_and_appends_the_last_k) {
  const std::int64_t B = 2, N = 9, D = 4, K = 3, L = 5;
  mem::memory_pool pool(B, N, D, 16, 2);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t j = 0; j < N; ++j)
      for (std::int64_t e = 0; e < D; ++e) pool.pool()(b, j, e) = static_cast<float>(100 * b + j);
  tensor<float, 3> h({B, L, D});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < L; ++t)
      for (std::int64_t e = 0; e < D; ++e) h(b, t, e) = static_cast<float>(-1 - t);
  mem::memoryllm_update(h, pool, {.update_len = K, .seed = 9});
  std::multiset<float> dropped;
  for (std::int64_t b = 0; b < B; ++b) {
    std::vector<float> kept;
    for (std::int64_t j = 0; j < N - K; ++j) kept.push_back(pool.pool()(b, j, 0));
    EXPECT_TRUE(std::is_sorted(kept.begin(), kept.end())) << "kept slots stay in order";
    for (float x : kept) EXPECT_TRUE(x >= 100 * b && x < 100 * b + N);
    for (std::int64_t t = 0; t < K; ++t) EXPECT_EQ(pool.pool()(b, N - K + t, 2), static_cast<float>(-1 - (L - K + t)));
    for (std::int64_t j = 0; j < N; ++j)
      if (std::find(kept.begin(), kept.end(), static_cast<float>(100 * b + j)) == kept.end())
        dropped.insert(static_cast<float>(100 * b + j));
  }
  EXPECT_EQ(dropped.size(), static_cast<std::size_t>(B * K));
  // The dropped slots went to the long-term memory (both heads).
  const mem::knn_memory& ltm = pool.long_term();
  EXPECT_EQ(ltm.size(), K);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t s = 0; s < K; ++s) {
      EXPECT_EQ(dropped.count(ltm.keys()(b, 1, s, 0)), 1u);
      EXPECT_EQ(ltm.values()(b, 0, s, 1), ltm.keys()(b, 1, s, 0));
    }
  EXPECT_EQ(pool.updates(), 1);
}

TEST(memoryllm, read_fast_matches_reference) {
  std::mt19937 rng(37);
  const std::int64_t B = 2, N = 37, D = 24, H = 2, Dh = 12, Lq = 5;
  mem::memory_pool pool(B, N, D, 40, H);
  const auto init = random_tensor<3>({B, N, D}, rng);
  std::copy(init.begin(), init.end(), pool.pool().data());
  const mem::memoryllm_options opt{.update_len = 7, .heads = H, .seed = 1};
  for (int u = 0; u < 3; ++u) mem::memoryllm_update(random_tensor<3>({B, 10, D}, rng), pool, opt);
  const auto q = random_tensor<4>({B, H, Lq, Dh}, rng, -2.0f, 2.0f);
  tensor<float, 4> o_ref({B, H, Lq, Dh}), o_fast({B, H, Lq, Dh});
  tensor<float, 3> l_ref({B, H, Lq}), l_fast({B, H, Lq});
  mem::reference::memoryllm_read(q, pool, o_ref, l_ref, opt);
  mem::memoryllm_read(q, pool, o_fast, l_fast, opt);
  expect_close(o_fast, o_ref, 1e-5, 1e-4, "pool read");
  expect_close(l_fast, l_ref, 1e-5, 1e-4, "pool lse");
  mem::reference::mplus_read(q, pool, 4, o_ref, l_ref, opt);
  mem::mplus_read(q, pool, 4, o_fast, l_fast, opt);
  expect_close(o_fast, o_ref, 1e-5, 1e-4, "M+ read");
  expect_close(l_fast, l_ref, 1e-5, 1e-4, "M+ lse");
}

TEST(memoryllm, mplus_with_every_dropped_slot_is_one_softmax_over_both) {
  // topk >= the long-term size: the M+ read is attention over [pool; all dropped slots].
  std::mt19937 rng(41);
  const std::int64_t N = 6, D = 8, H = 2, Dh = 4, K = 2, Lq = 3;
  mem::memory_pool pool(1, N, D, 8, H);
  const auto init = random_tensor<3>({1, N, D}, rng);
  std::copy(init.begin(), init.end(), pool.pool().data());
  const mem::memoryllm_options opt{.update_len = K, .heads = H};
  mem::memoryllm_update(random_tensor<3>({1, 3, D}, rng), pool, opt);
  mem::memoryllm_update(random_tensor<3>({1, 3, D}, rng), pool, opt);
  const std::int64_t n_ltm = pool.long_term().size();
  ASSERT_EQ(n_ltm, 2 * K);
  tensor<float, 4> all({1, H, N + n_ltm, Dh});
  for (std::int64_t h = 0; h < H; ++h) {
    for (std::int64_t j = 0; j < N; ++j)
      for (std::int64_t e = 0; e < Dh; ++e) all(0, h, j, e) = pool.pool()(0, j, h * Dh + e);
    for (std::int64_t j = 0; j < n_ltm; ++j)
      for (std::int64_t e = 0; e < Dh; ++e) all(0, h, N + j, e) = pool.long_term().keys()(0, h, j, e);
  }
  const auto q = random_tensor<4>({1, H, Lq, Dh}, rng);
  tensor<float, 4> want({1, H, Lq, Dh}), got({1, H, Lq, Dh});
  mnemo::attention::reference<float>(q, all, all, want);
  mem::mplus_read(q, pool, 8, got, {}, opt);
  expect_close(got, want, 1e-5, 1e-4, "M+ = one softmax");
}

TEST(memoryllm, bad_input) {
  mem::memory_pool pool(1, 4, 6);
  tensor<float, 3> h({1, 2, 6});
  expect_error([&] { mem::memoryllm_update(h, pool, {.update_len = 3}); },
               {"memory::memoryllm_update", "at least K = 3", "got L = 2"});
  expect_error([&] { mem::memoryllm_update(h, pool, {.update_len = 5}); }, {"update_len", "[1, N = 4]", "got 5"});
  tensor<float, 4> q({1, 4, 1, 1}), out({1, 4, 1, 1});
  expect_error([&] { mem::memoryllm_read(q, pool, out, {}, {.heads = 4}); }, {"memory::memoryllm_read", "heads", "D = 6"});
  tensor<float, 4> q2({1, 2, 1, 3}), out2({1, 2, 1, 3});
  expect_error([&] { mem::mplus_read(q2, pool, 2, out2, {}, {.heads = 2}); }, {"memory::mplus_read", "no long-term memory"});
}

// ---- save / load ----

TEST(retrieval_memories, save_load_round_trip) {
  mnemo::test::scratch_dir dir("retrieval_memory");
  std::mt19937 rng(43);
  {  // CAMELoT: every state tensor and the clock
    mem::camelot_memory m(2, 1, 5, 3, 2);
    mem::camelot_write(random_tensor<4>({2, 1, 7, 3}, rng), random_tensor<4>({2, 1, 7, 2}, rng), m, {.threshold = 0.5f});
    m.save(dir.file("cam_"));
    const mem::camelot_memory back = mem::camelot_memory::load(dir.file("cam_"));
    expect_close(back.keys(), m.keys(), 0, 0, "camelot keys");
    expect_close(back.values(), m.values(), 0, 0, "camelot values");
    for (std::int64_t i = 0; i < 10; ++i) {
      EXPECT_EQ(back.counts().data()[i], m.counts().data()[i]);
      EXPECT_EQ(back.last_used().data()[i], m.last_used().data()[i]);
    }
    EXPECT_EQ(back.size(1, 0), m.size(1, 0));
    EXPECT_EQ(back.clock(), 7);
  }
  {  // MEMORYLLM pool with an M+ long-term memory
    mem::memory_pool p(1, 6, 4, 8, 2);
    mem::memoryllm_update(random_tensor<3>({1, 3, 4}, rng), p, {.update_len = 2, .heads = 2});
    p.save(dir.file("pool_"));
    const mem::memory_pool back = mem::memory_pool::load(dir.file("pool_"), true);
    expect_close(back.pool(), p.pool(), 0, 0, "pool");
    expect_close(back.long_term().keys(), p.long_term().keys(), 0, 0, "long-term keys");
    EXPECT_EQ(back.updates(), 1);
    EXPECT_EQ(back.long_term().size(), 2);
  }
  {  // HMT: weights, cache, keys and ring
    mem::hmt_memory m(1, 3, random_tensor<2>({4, 2}, rng), random_tensor<2>({4, 2}, rng));
    for (int i = 0; i < 4; ++i) m.append(random_tensor<2>({1, 4}, rng));
    m.save(dir.file("hmt_"));
    const mem::hmt_memory back = mem::hmt_memory::load(dir.file("hmt_"));
    const auto s = random_tensor<2>({1, 4}, rng);
    tensor<float, 2> a({1, 4}), b({1, 4});
    mem::hmt_recall(s, m, a);
    mem::hmt_recall(s, back, b);
    expect_close(b, a, 0, 0, "recall after load");
    EXPECT_EQ(back.total_added(), 4);
    mnemo::memory::detail::save_record(dir.file("hmt_ring.npy"), {3, 2});
    expect_error([&] { (void)mem::hmt_memory::load(dir.file("hmt_")); }, {"ring.npy", "inconsistent", "capacity 3"});
  }
  {  // RETRO database
    mem::retro_database db(3, 2, 2, 4);
    db.add(random_tensor<2>({5, 3}, rng), random_tensor<3>({5, 2, 2}, rng));
    db.save(dir.file("db_"));
    const mem::retro_database back = mem::retro_database::load(dir.file("db_"));
    EXPECT_EQ(back.size(), 4);
    expect_close(back.payload(), db.payload(), 0, 0, "payload");
  }
}

}  // namespace
