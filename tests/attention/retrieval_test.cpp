// Tests for mnemo/attention/retrieval.hpp: the IVF index (every key in exactly one list, exhaustive
// probing equal to brute-force search before and after add, recall on clustered keys, a k-means
// objective that does not grow with iterations, results independent of the thread count),
// retrieval_decode against attention::reference restricted to the retrieved keys and the window
// (GQA, f16 cache, windows inside and beyond the cache), exhaustive probing against the exact-search
// reference_retrieval_decode, "everything retrieved" equal to dense attention, and argument checks.
#include "mnemo/attention/retrieval.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "mnemo/attention/reference.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/tensor.hpp"

namespace {

namespace attn = mnemo::attention;
using mnemo::f16;
using mnemo::tensor;
using mnemo::view;

constexpr double atol = 2e-5, rtol = 1e-4;

template <class T, int R>
void fill(tensor<T, R>& t, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  for (T& x : t) x = T(u(rng));
}

template <int R>
void expect_close(view<const float, R> got, view<const float, R> want, const char* what) {
  ASSERT_EQ(got.shape(), want.shape());
  for (std::int64_t i = 0; i < got.size(); ++i) {
    const double w = want.data()[i];
    if (std::isinf(w)) {
      EXPECT_EQ(got.data()[i], want.data()[i]) << what << " at " << i;
      continue;
    }
    ASSERT_LE(std::fabs(got.data()[i] - w), atol + rtol * std::fabs(w)) << what << " at " << i;
  }
}

// N keys [N, D] around `clusters` centroids (unit-variance centroids, noise `sigma`).
tensor<float, 2> clustered(std::int64_t N, std::int64_t D, std::int64_t clusters, float sigma, std::mt19937& rng,
                           tensor<float, 2>* centers = nullptr) {
  std::normal_distribution<float> normal;
  tensor<float, 2> c({clusters, D}), x({N, D});
  for (float& e : c) e = normal(rng);
  std::uniform_int_distribution<std::int64_t> pick(0, clusters - 1);
  for (std::int64_t i = 0; i < N; ++i) {
    const std::int64_t m = pick(rng);
    for (std::int64_t d = 0; d < D; ++d) x(i, d) = c(m, d) + sigma * normal(rng);
  }
  if (centers) *centers = c;
  return x;
}

std::vector<std::int64_t> ids_of(const std::vector<attn::ivf_hit>& hits) {
  std::vector<std::int64_t> ids;
  for (const auto& h : hits) ids.push_back(h.id);
  return ids;
}

TEST(IvfIndex, ListsPartitionTheKeysAndExhaustiveSearchIsExact) {
  std::mt19937 rng(1);
  const std::int64_t N = 600, D = 24;
  tensor<float, 2> centers;
  const tensor<float, 2> keys = clustered(N + 100, D, 8, 0.3f, rng, &centers);
  attn::ivf_index index;
  index.build(mnemo::cview(keys).narrow(0, 0, N), 8, 10, 7);
  std::vector<int> seen(static_cast<std::size_t>(N), 0);
  for (std::int64_t l = 0; l < index.n_lists(); ++l)
    for (std::int64_t id : index.list(l)) ++seen[static_cast<std::size_t>(id)];
  for (std::int64_t i = 0; i < N; ++i) ASSERT_EQ(seen[static_cast<std::size_t>(i)], 1) << "key " << i;
  tensor<float, 1> q({D});
  fill(q, rng, -2.0f, 2.0f);
  EXPECT_EQ(ids_of(index.search(q.data(), 8, 20)), attn::reference_exact_search(mnemo::cview(keys).narrow(0, 0, N), q.data(), 20));
  index.add(mnemo::cview(keys).narrow(0, N, 100));
  EXPECT_EQ(index.size(), N + 100);
  EXPECT_EQ(index.search(mnemo::cview(q), 8, 20), attn::reference_exact_search(keys, q.data(), 20));
  // Only ids below max_id count.
  for (const auto& h : index.search(q.data(), 8, 50, 123)) EXPECT_LT(h.id, 123);
}

TEST(IvfIndex, FewProbesRecallTheTopKeysOfClusteredData) {
  std::mt19937 rng(2);
  const std::int64_t N = 2000, D = 32, clusters = 16;
  tensor<float, 2> centers;
  const tensor<float, 2> keys = clustered(N, D, clusters, 0.25f, rng, &centers);
  attn::ivf_index index;
  index.build(keys, 32, 10, 3);
  std::normal_distribution<float> normal;
  double recall = 0;
  const int queries = 20;
  for (int t = 0; t < queries; ++t) {
    std::vector<float> q(static_cast<std::size_t>(D));
    for (std::int64_t d = 0; d < D; ++d) q[static_cast<std::size_t>(d)] = 2.0f * centers(t % clusters, d) + 0.2f * normal(rng);
    recall += attn::search_recall(ids_of(index.search(q.data(), 8, 64)), attn::reference_exact_search(keys, q.data(), 16));
  }
  // A query near one centroid has its best keys in that cluster, whose keys sit in a few lists.
  EXPECT_GE(recall / queries, 0.9);
}

TEST(IvfIndex, KMeansObjectiveDoesNotGrowWithIterationsAndIgnoresThreads) {
  std::mt19937 rng(3);
  const tensor<float, 2> keys = clustered(500, 16, 12, 0.5f, rng);
  double previous = std::numeric_limits<double>::infinity();
  for (int it : {0, 1, 2, 5, 10}) {
    attn::ivf_index index;
    index.build(keys, 10, it, 11);  // 500 <= 10 * train_per_list: trained on every key
    EXPECT_LE(index.inertia(), previous * (1 + 1e-6)) << "iterations " << it;
    previous = index.inertia();
  }
  attn::ivf_index one, two;
  one.build(keys, 10, 5, 11, 1);
  two.build(keys, 10, 5, 11, 2);
  for (std::int64_t l = 0; l < 10; ++l) EXPECT_EQ(one.list(l), two.list(l));
}

struct problem {
  std::int64_t B = 1, Hq = 4, Hkv = 2, Lk = 300, D = 40, Dv = 24, n_lists = 8, n_probe = 3, top_k = 20, window = 0;
};

template <class KV>
void check_decode(const problem& p, std::uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "Hq=" << p.Hq << " Hkv=" << p.Hkv << " Lk=" << p.Lk << " top_k=" << p.top_k
                                    << " window=" << p.window);
  std::mt19937 rng(seed);
  tensor<float, 4> q({p.B, p.Hq, 1, p.D});
  tensor<KV, 4> k({p.B, p.Hkv, p.Lk, p.D}), v({p.B, p.Hkv, p.Lk, p.Dv});
  fill(q, rng, -2.0f, 2.0f);
  fill(k, rng);
  fill(v, rng);
  attn::retrieval_index_options iopt;
  iopt.n_lists = p.n_lists;
  const std::int64_t indexed = std::max<std::int64_t>(1, p.Lk - p.window);
  const auto index = attn::retrieval_index::build(mnemo::cview(k).narrow(2, 0, indexed), iopt);
  attn::retrieval_options opt;
  opt.n_probe = p.n_probe;
  opt.top_k = p.top_k;
  opt.window = p.window;
  tensor<float, 4> out({p.B, p.Hq, 1, p.Dv}), want({p.B, p.Hq, 1, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, 1}), want_lse({p.B, p.Hq, 1});
  tensor<std::int64_t, 3> ids({p.B, p.Hq, p.top_k});
  attn::retrieval_decode(q, k, v, index, out, lse, opt, ids);
  const std::int64_t limit = std::max<std::int64_t>(0, p.Lk - p.window);
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t h = 0; h < p.Hq; ++h) {
      std::vector<char> keep(static_cast<std::size_t>(p.Lk), 0);
      for (std::int64_t i = 0; i < p.top_k; ++i) {
        const std::int64_t id = ids(b, h, i);
        if (id < 0) continue;
        ASSERT_LT(id, limit) << "retrieved keys lie below Lk - window";
        keep[static_cast<std::size_t>(id)] = 1;
      }
      for (std::int64_t j = limit; j < p.Lk; ++j) keep[static_cast<std::size_t>(j)] = 1;
      attn::sparse_decode_detail::reference_over_keys<KV>(q, mnemo::cview(k), mnemo::cview(v), want, want_lse, b, h,
                                                          h / (p.Hq / p.Hkv), keep,
                                                          static_cast<float>(1.0 / std::sqrt(double(p.D))));
    }
  expect_close<4>(out, want, "out");
  expect_close<3>(lse, want_lse, "lse");
}

TEST(RetrievalDecode, MatchesReferenceOverRetrievedKeys) {
  check_decode<float>(problem{}, 1);
  check_decode<float>(problem{2, 8, 1, 257, 64, 64, 16, 4, 33, 37}, 2);
  check_decode<float>(problem{1, 4, 4, 100, 33, 17, 4, 1, 500, 10}, 3);  // fewer candidates than top_k
  check_decode<float>(problem{1, 2, 2, 60, 40, 40, 4, 2, 8, 56}, 4);     // window covers most of the cache
}

TEST(RetrievalDecode, F16Cache) { check_decode<f16>(problem{1, 8, 2, 400, 128, 128, 8, 3, 64, 32}, 5); }

TEST(RetrievalDecode, ExhaustiveProbingMatchesExactSearchReference) {
  std::mt19937 rng(6);
  const std::int64_t Hq = 4, Hkv = 2, Lk = 257, D = 40, window = 17, top_k = 24;
  tensor<float, 4> q({1, Hq, 1, D}), k({1, Hkv, Lk, D}), v({1, Hkv, Lk, D});
  fill(q, rng, -2.0f, 2.0f);
  fill(k, rng);
  fill(v, rng);
  attn::retrieval_index_options iopt;
  iopt.n_lists = 6;
  const auto index = attn::retrieval_index::build(mnemo::cview(k).narrow(2, 0, Lk - window), iopt);
  attn::retrieval_options opt;
  opt.n_probe = 6;
  opt.top_k = top_k;
  opt.window = window;
  tensor<float, 4> out({1, Hq, 1, D}), ref({1, Hq, 1, D});
  tensor<float, 3> lse({1, Hq, 1}), ref_lse({1, Hq, 1});
  tensor<std::int64_t, 3> ids({1, Hq, top_k}), ref_ids({1, Hq, top_k});
  attn::retrieval_decode(q, k, v, index, out, lse, opt, ids);
  attn::reference_retrieval_decode<float>(q, k, v, ref, ref_lse, opt, ref_ids);
  for (std::int64_t i = 0; i < ids.size(); ++i) EXPECT_EQ(ids.data()[i], ref_ids.data()[i]) << i;
  expect_close<4>(out, ref, "out");
  expect_close<3>(lse, ref_lse, "lse");
}

TEST(RetrievalDecode, EverythingRetrievedIsDenseAttention) {
  std::mt19937 rng(7);
  const std::int64_t Lk = 150, D = 32;
  tensor<float, 4> q({1, 4, 1, D}), k({1, 1, Lk, D}), v({1, 1, Lk, D});
  fill(q, rng, -2.0f, 2.0f);
  fill(k, rng);
  fill(v, rng);
  attn::retrieval_index_options iopt;
  iopt.n_lists = 5;
  const auto index = attn::retrieval_index::build(k, iopt);
  attn::retrieval_options opt;
  opt.n_probe = 5;
  opt.top_k = Lk;
  opt.window = 10;
  tensor<float, 4> out({1, 4, 1, D}), dense({1, 4, 1, D});
  attn::retrieval_decode(q, k, v, index, out, {}, opt);
  attn::reference(q, k, v, dense);
  expect_close<4>(out, dense, "out");
}

TEST(RetrievalDecode, BadArgumentsThrow) {
  tensor<float, 4> q({1, 4, 1, 8}), k({1, 2, 40, 8}), v({1, 2, 40, 8}), out({1, 4, 1, 8});
  attn::retrieval_index_options iopt;
  iopt.n_lists = 4;
  const auto index = attn::retrieval_index::build(k, iopt);
  attn::retrieval_options opt;
  opt.n_probe = 2;
  opt.top_k = 8;
  EXPECT_NO_THROW(attn::retrieval_decode(q, k, v, index, out, {}, opt));
  auto bad = opt;
  bad.n_probe = 5;  // > n_lists
  EXPECT_THROW(attn::retrieval_decode(q, k, v, index, out, {}, bad), mnemo::error);
  bad = opt;
  bad.top_k = 0;
  EXPECT_THROW(attn::retrieval_decode(q, k, v, index, out, {}, bad), mnemo::error);
  bad = opt;
  bad.window = -2;
  EXPECT_THROW(attn::retrieval_decode(q, k, v, index, out, {}, bad), mnemo::error);
  EXPECT_THROW(attn::retrieval_decode(q, k, v, attn::retrieval_index{}, out, {}, opt), mnemo::error);
  EXPECT_THROW(attn::retrieval_decode(q, mnemo::cview(k).narrow(2, 0, 30), mnemo::cview(v).narrow(2, 0, 30), index, out,
                                      {}, opt),
               mnemo::error);  // index holds more keys than the cache
  tensor<float, 4> q2({1, 4, 2, 8}), out2({1, 4, 2, 8});
  EXPECT_THROW(attn::retrieval_decode(q2, k, v, index, out2, {}, opt), mnemo::error);
  tensor<std::int64_t, 3> ids({1, 4, 7});
  EXPECT_THROW(attn::retrieval_decode(q, k, v, index, out, {}, opt, ids), mnemo::error);
  attn::ivf_index ivf;
  tensor<float, 2> keys({10, 8});
  EXPECT_THROW(ivf.build(keys, 0, 3, 1), mnemo::error);
  EXPECT_THROW(ivf.build(keys, 11, 3, 1), mnemo::error);
  EXPECT_THROW(ivf.build(keys, 2, -1, 1), mnemo::error);
  EXPECT_THROW(ivf.search(keys.data(), 1, 1), mnemo::error);  // not built
  ivf.build(keys, 2, 3, 1);
  EXPECT_THROW(ivf.search(keys.data(), 3, 1), mnemo::error);
  EXPECT_THROW(ivf.search(keys.data(), 1, 0), mnemo::error);
  tensor<float, 2> wrong({3, 7});
  EXPECT_THROW(ivf.add(wrong), mnemo::error);
  tensor<float, 4> k_wrong({1, 2, 5, 7});
  attn::retrieval_index grown = index;
  EXPECT_THROW(grown.add(k_wrong), mnemo::error);
}

}  // namespace
