// Tests of memory/knn.hpp (Memorizing Transformers): the FIFO ring (positions, overflow), exact
// search and attention, fast against reference on awkward shapes; fewer pairs than topk and an
// empty memory (no NaN); the exact merge with local attention equals one softmax over both key
// sets; the gate; save/load; bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "memory/test_util.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/memory/knn.hpp"
#include "mnemo/memory/knn_ivf.hpp"

namespace {

using namespace memory_test;
namespace mem = mnemo::memory;

// A memory of the given shape filled with `pairs` random pairs, added in pieces of `piece`.
mem::knn_memory filled(std::int64_t B, std::int64_t H, std::int64_t D, std::int64_t Dv, std::int64_t cap,
                       std::int64_t pairs, std::int64_t piece, std::mt19937& rng) {
  mem::knn_memory m(B, H, D, Dv, cap);
  for (std::int64_t t = 0; t < pairs; t += piece) {
    const std::int64_t n = std::min(piece, pairs - t);
    m.add(random_tensor<4>({B, H, n, D}, rng), random_tensor<4>({B, H, n, Dv}, rng));
  }
  return m;
}

TEST(knn, ring_keeps_the_latest_pairs) {
  mem::knn_memory m(1, 1, 1, 1, 4);
  auto add = [&](std::vector<float> xs) {
    const std::int64_t n = static_cast<std::int64_t>(xs.size());
    m.add(view<const float, 4>(xs.data(), {1, 1, n, 1}), view<const float, 4>(xs.data(), {1, 1, n, 1}));
  };
  add({0, 1, 2});
  EXPECT_EQ(m.size(), 3);
  add({3, 4});  // 0 dropped
  EXPECT_EQ(m.size(), 4);
  EXPECT_EQ(m.total_added(), 5);
  for (std::int64_t s = 0; s < 4; ++s) EXPECT_EQ(m.keys()(0, 0, s, 0), static_cast<float>(m.position(s)));
  add({5, 6, 7, 8, 9, 10});  // longer than the capacity: only 7..10 stay
  std::vector<float> kept;
  for (std::int64_t s = 0; s < 4; ++s) {
    EXPECT_EQ(m.keys()(0, 0, s, 0), static_cast<float>(m.position(s)));
    kept.push_back(m.keys()(0, 0, s, 0));
  }
  std::sort(kept.begin(), kept.end());
  EXPECT_EQ(kept, (std::vector<float>{7, 8, 9, 10}));
  m.clear();
  EXPECT_EQ(m.size(), 0);
}

TEST(knn, fast_matches_reference) {
  struct shape {
    std::int64_t B, H, Lq, D, Dv, cap, pairs, piece, topk;
  };
  std::mt19937 rng(1);
  for (const shape& s : std::vector<shape>{{1, 1, 1, 4, 4, 8, 8, 8, 1},
                                           {2, 3, 37, 40, 24, 100, 130, 33, 7},  // wrapped ring
                                           {1, 2, 20, 64, 64, 50, 50, 50, 50},   // topk = size
                                           {1, 1, 17, 96, 20, 300, 257, 64, 32},
                                           {1, 2, 5, 16, 8, 40, 6, 6, 10}})  {  // fewer pairs than topk
    const mem::knn_memory m = filled(s.B, s.H, s.D, s.Dv, s.cap, s.pairs, s.piece, rng);
    const tensor<float, 4> q = random_tensor<4>({s.B, s.H, s.Lq, s.D}, rng);
    tensor<std::int64_t, 4> ir({s.B, s.H, s.Lq, s.topk}), fi = ir;
    tensor<float, 4> sr({s.B, s.H, s.Lq, s.topk}), sf = sr;
    mem::reference::knn_search(q, m, s.topk, ir, sr);
    mem::knn_search(q, m, s.topk, fi, sf);
    const std::string what = "Lq=" + std::to_string(s.Lq) + " D=" + std::to_string(s.D) + " size=" +
                             std::to_string(m.size()) + " topk=" + std::to_string(s.topk);
    for (std::int64_t i = 0; i < ir.size(); ++i) ASSERT_EQ(fi.data()[i], ir.data()[i]) << what << " at " << i;
    for (std::int64_t i = 0; i < sr.size(); ++i)
      if (std::isinf(sr.data()[i])) {
        EXPECT_EQ(sf.data()[i], sr.data()[i]) << what;
      } else {
        EXPECT_NEAR(sf.data()[i], sr.data()[i], 1e-5 + 1e-5 * std::abs(sr.data()[i])) << what;
      }
    tensor<float, 4> outr({s.B, s.H, s.Lq, s.Dv}), outf = outr;
    tensor<float, 3> lr({s.B, s.H, s.Lq}), lf = lr;
    mem::reference::knn_attention(q, m, s.topk, outr, lr);
    mem::knn_attention(q, m, s.topk, outf, lf);
    expect_close(outf, outr, 1e-5, 1e-4, what + ": out");
    expect_close(lf, lr, 1e-5, 1e-5, what + ": lse");
  }
}

TEST(knn, search_is_exact) {
  // Brute force: the retrieved scores are the topk largest of all stored dot products.
  std::mt19937 rng(2);
  const mem::knn_memory m = filled(1, 2, 8, 3, 64, 64, 64, rng);
  const tensor<float, 4> q = random_tensor<4>({1, 2, 6, 8}, rng);
  tensor<std::int64_t, 4> idx({1, 2, 6, 5});
  tensor<float, 4> sc({1, 2, 6, 5});
  mem::knn_search(q, m, 5, idx, sc);
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t t = 0; t < 6; ++t) {
      std::vector<double> all;
      for (std::int64_t j = 0; j < 64; ++j) {
        double dot = 0;
        for (std::int64_t c = 0; c < 8; ++c) dot += double(q(0, h, t, c)) * m.keys()(0, h, j, c);
        all.push_back(dot);
      }
      std::sort(all.rbegin(), all.rend());
      for (std::int64_t j = 0; j < 5; ++j) EXPECT_NEAR(sc(0, h, t, j), all[j], 1e-5);
    }
}

TEST(knn, empty_memory_gives_zero_and_minus_infinity) {
  mem::knn_memory m(1, 2, 4, 3, 10);
  std::mt19937 rng(3);
  const tensor<float, 4> q = random_tensor<4>({1, 2, 3, 4}, rng);
  for (bool fast : {false, true}) {
    tensor<float, 4> out({1, 2, 3, 3});
    tensor<float, 3> lse({1, 2, 3});
    std::fill(out.begin(), out.end(), 5.0f);
    if (fast) mem::knn_attention(q, m, 4, out, lse);
    else mem::reference::knn_attention(q, m, 4, out, lse);
    for (float x : out) EXPECT_EQ(x, 0.0f);
    for (float x : lse) EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
  }
}

TEST(knn, merge_with_local_attention_is_one_softmax_over_both) {
  // When topk covers every stored pair, merge(memory, local) is attention over [memory; local].
  std::mt19937 rng(4);
  const std::int64_t H = 2, Lq = 5, D = 8, Dv = 6, pairs = 12;
  const tensor<float, 4> mk = random_tensor<4>({1, H, pairs, D}, rng), mv = random_tensor<4>({1, H, pairs, Dv}, rng);
  const tensor<float, 4> q = random_tensor<4>({1, H, Lq, D}, rng), lk = random_tensor<4>({1, H, Lq, D}, rng),
                         lv = random_tensor<4>({1, H, Lq, Dv}, rng);
  mem::knn_memory m(1, H, D, Dv, 16);
  m.add(mk, mv);
  tensor<float, 4> om({1, H, Lq, Dv}), ol = om, merged = om, want = om;
  tensor<float, 3> lm({1, H, Lq}), ll = lm, lmerged = lm, lwant = lm;
  mem::knn_attention(q, m, pairs, om, lm);
  mnemo::attention::reference(q, lk, lv, ol, ll, mnemo::attention::mods::causal{});
  mnemo::attention::merge(om, lm, ol, ll, merged, lmerged);
  // All keys at once: memory keys first, then the local ones; causal over the local part only.
  tensor<float, 4> ak({1, H, pairs + Lq, D}), av({1, H, pairs + Lq, Dv});
  for (std::int64_t h = 0; h < H; ++h) {
    for (std::int64_t j = 0; j < pairs; ++j) {
      std::copy(&mk(0, h, j, 0), &mk(0, h, j, 0) + D, &ak(0, h, j, 0));
      std::copy(&mv(0, h, j, 0), &mv(0, h, j, 0) + Dv, &av(0, h, j, 0));
    }
    for (std::int64_t j = 0; j < Lq; ++j) {
      std::copy(&lk(0, h, j, 0), &lk(0, h, j, 0) + D, &ak(0, h, pairs + j, 0));
      std::copy(&lv(0, h, j, 0), &lv(0, h, j, 0) + Dv, &av(0, h, pairs + j, 0));
    }
  }
  mnemo::attention::reference(q, ak, av, want, lwant, mnemo::attention::mods::causal{});
  expect_close(merged, want, 1e-5, 1e-4, "merged out");
  expect_close(lmerged, lwant, 1e-5, 1e-5, "merged lse");
}

TEST(knn, gate_mixes_per_head) {
  std::mt19937 rng(5);
  const tensor<float, 4> a = random_tensor<4>({1, 2, 3, 4}, rng), b = random_tensor<4>({1, 2, 3, 4}, rng);
  tensor<float, 1> gate({2});
  gate(0) = 0.0f;
  gate(1) = 50.0f;  // sigmoid(50) rounds to 1 in f32
  tensor<float, 4> out({1, 2, 3, 4});
  mem::knn_gate(a, b, gate, out);
  for (std::int64_t t = 0; t < 3; ++t)
    for (std::int64_t c = 0; c < 4; ++c) {
      EXPECT_NEAR(out(0, 0, t, c), 0.5f * (a(0, 0, t, c) + b(0, 0, t, c)), 1e-6);
      EXPECT_EQ(out(0, 1, t, c), a(0, 1, t, c));
    }
}

TEST(knn, threads_do_not_change_results) {
  std::mt19937 rng(6);
  const mem::knn_memory m = filled(2, 2, 16, 16, 90, 90, 45, rng);
  const tensor<float, 4> q = random_tensor<4>({2, 2, 40, 16}, rng);
  tensor<float, 4> a({2, 2, 40, 16}), b = a;
  mem::knn_attention(q, m, 9, a, {}, {.threads = 1});
  mem::knn_attention(q, m, 9, b, {}, {.threads = 2});
  expect_close(b, a, 0, 0, "threads");
}

TEST(knn, save_load_round_trip) {
  std::mt19937 rng(7);
  const mem::knn_memory m = filled(1, 2, 6, 5, 10, 14, 4, rng);
  scratch_dir dir("knn");
  m.save(dir.file("mem_"));
  const mem::knn_memory back = mem::knn_memory::load(dir.file("mem_"));
  EXPECT_EQ(back.size(), m.size());
  EXPECT_EQ(back.total_added(), m.total_added());
  EXPECT_EQ(back.capacity(), 10);
  for (std::int64_t s = 0; s < m.size(); ++s) EXPECT_EQ(back.position(s), m.position(s));
  expect_close(back.keys(), m.keys(), 0, 0, "keys");
  expect_close(back.values(), m.values(), 0, 0, "values");
  mem::detail::save_record(dir.file("mem_ring.npy"), {11, 0, 11});
  expect_error([&] { (void)mem::knn_memory::load(dir.file("mem_")); }, {"ring.npy", "inconsistent", "capacity 10"});
}

TEST(knn, bad_inputs) {
  std::mt19937 rng(8);
  mem::knn_memory m = filled(1, 2, 4, 3, 8, 8, 8, rng);
  const tensor<float, 4> q = random_tensor<4>({1, 2, 3, 4}, rng), q_bad({1, 2, 3, 5}), v_bad({1, 2, 3, 4});
  tensor<std::int64_t, 4> idx({1, 2, 3, 2}), idx_bad({1, 2, 3, 3});
  tensor<float, 4> out({1, 2, 3, 3}), out_bad({1, 2, 3, 4});
  tensor<float, 3> lse_bad({1, 2, 4});
  expect_error([&] { mem::knn_search(q_bad, m, 2, idx, {}); }, {"q", "[1, 2, 3, 4]", "[1, 2, 3, 5]"});
  expect_error([&] { mem::knn_search(q, m, 2, idx_bad, {}); }, {"indices", "[1, 2, 3, 2]", "[1, 2, 3, 3]"});
  expect_error([&] { mem::reference::knn_search(q, m, 0, idx, {}); }, {"topk", ">= 1", "0"});
  expect_error([&] { mem::knn_attention(q, m, 2, out_bad); }, {"out", "[1, 2, 3, 3]", "[1, 2, 3, 4]"});
  expect_error([&] { mem::knn_attention(q, m, 2, out, lse_bad); }, {"lse", "[1, 2, 3]", "[1, 2, 4]"});
  expect_error([&] { mem::knn_attention(q, m, 2, out, {}, {.scale = -1.0f}); }, {"scale", ">= 0", "-1"});
  expect_error([&] { mem::knn_attention(q, m, 2, out, {}, {.threads = -3}); }, {"threads", ">= 0", "-3"});
  expect_error([&] { m.add(q, v_bad); }, {"v", "[1, 2, 3, 3]", "[1, 2, 3, 4]"});
  expect_error([&] { (void)m.position(8); }, {"slot", "[0, 8)", "8"});
  expect_error([&] { mem::knn_memory(1, 1, 4, 3, 0); }, {"capacity=0"});
  expect_error([&] { mem::knn_gate(out, out_bad, tensor<float, 1>({2}), out); }, {"out_local", "[1, 2, 3, 3]"});
}

// ---- approximate search through the IVF index (knn_ivf.hpp) ----

// Keys in `clusters` tight clusters (what k-means lists can separate), random values.
mem::knn_memory clustered_memory(std::int64_t H, std::int64_t D, std::int64_t n, std::int64_t clusters,
                                 std::mt19937& rng) {
  std::normal_distribution<float> normal;
  tensor<float, 4> centers = random_tensor<4>({1, H, clusters, D}, rng), k({1, H, n, D});
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = 0; c < D; ++c) k(0, h, i, c) = centers(0, h, i % clusters, c) + 0.05f * normal(rng);
  mem::knn_memory m(1, H, D, D, n);
  m.add(k, random_tensor<4>({1, H, n, D}, rng));
  return m;
}

// Fraction of the exact search's slots that the approximate one also returned.
double recall(const tensor<std::int64_t, 4>& approx, const tensor<std::int64_t, 4>& exact) {
  const std::int64_t rows = exact.size() / exact.extent(3), k = exact.extent(3);
  std::int64_t hit = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < k; ++j)
      for (std::int64_t i = 0; i < k; ++i) hit += approx.data()[r * k + i] == exact.data()[r * k + j] ? 1 : 0;
  return double(hit) / double(exact.size());
}

TEST(knn_ivf, recall_against_exact_search) {
  std::mt19937 rng(40);
  const std::int64_t H = 2, D = 16, n = 600, topk = 8, Lq = 20;
  const mem::knn_memory m = clustered_memory(H, D, n, 16, rng);
  mem::knn_index index;
  index.build(m, {.n_lists = 16, .iterations = 8, .seed = 3});
  const tensor<float, 4> q = random_tensor<4>({1, H, Lq, D}, rng);
  tensor<std::int64_t, 4> exact({1, H, Lq, topk}), approx({1, H, Lq, topk});
  tensor<float, 4> exact_s({1, H, Lq, topk}), approx_s({1, H, Lq, topk});
  mem::knn_search(q, m, topk, exact, exact_s);
  // Every list probed: exact search (f32 dot products instead of a GEMM: the same slots).
  mem::knn_search_ivf(q, m, index, index.n_lists(), topk, approx, approx_s);
  EXPECT_EQ(recall(approx, exact), 1.0);
  expect_close(approx_s, exact_s, 1e-5, 1e-5, "all lists: scores");
  // Fewer lists: recall rises with n_probe, and 4 of 16 lists already find most neighbours.
  double last = 0;
  for (std::int64_t n_probe : {1, 4, 16}) {
    mem::knn_search_ivf(q, m, index, n_probe, topk, approx, {});
    const double r = recall(approx, exact);
    EXPECT_GE(r, last) << "n_probe " << n_probe;
    if (n_probe == 4) {
      EXPECT_GE(r, 0.8);
    }
    last = r;
  }
  // Attention over the retrieved pairs: with every list probed, knn_attention's result.
  tensor<float, 4> out({1, H, Lq, D}), out_exact({1, H, Lq, D});
  tensor<float, 3> lse({1, H, Lq}), lse_exact({1, H, Lq});
  mem::knn_attention_ivf(q, m, index, index.n_lists(), topk, out, lse);
  mem::knn_attention(q, m, topk, out_exact, lse_exact);
  expect_close(out, out_exact, 1e-5, 1e-5, "attention out");
  expect_close(lse, lse_exact, 1e-5, 1e-5, "attention lse");
}

TEST(knn_ivf, sync_follows_the_ring_and_stale_indexes_throw) {
  std::mt19937 rng(41);
  const std::int64_t H = 1, D = 8, cap = 100, topk = 5;
  mem::knn_memory m(1, H, D, D, cap);
  m.add(random_tensor<4>({1, H, 40, D}, rng), random_tensor<4>({1, H, 40, D}, rng));
  mem::knn_index index;
  index.build(m, {.n_lists = 4});
  const tensor<float, 4> q = random_tensor<4>({1, H, 7, D}, rng);
  tensor<std::int64_t, 4> exact({1, H, 7, topk}), approx({1, H, 7, topk});
  for (std::int64_t add : {30, 50}) {  // 40 + 30: appended; + 50: the ring wraps, a rebuild
    m.add(random_tensor<4>({1, H, add, D}, rng), random_tensor<4>({1, H, add, D}, rng));
    expect_error([&] { mem::knn_search_ivf(q, m, index, 1, topk, approx, {}); }, {"stale", "sync"});
    index.sync(m);
    mem::knn_search_ivf(q, m, index, index.n_lists(), topk, approx, {});
    mem::knn_search(q, m, topk, exact, {});
    EXPECT_EQ(recall(approx, exact), 1.0) << "after adding " << add;
  }
  expect_error([&] { mem::knn_search_ivf(q, m, index, 0, topk, approx, {}); }, {"n_probe", "[1, n_lists = 4]", "0"});
  expect_error([&] { mem::knn_search_ivf(q, m, mem::knn_index{}, 1, topk, approx, {}); }, {"index is empty"});
  mem::knn_index bad;
  expect_error([&] { bad.build(mem::knn_memory(1, 1, D, D, 4)); }, {"at least one pair", "0"});
  expect_error([&] { bad.build(m, {.n_lists = 0}); }, {"n_lists", ">= 1", "0"});
}

}  // namespace
