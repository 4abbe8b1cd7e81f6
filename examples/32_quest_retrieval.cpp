// 32 — Quest page selection and IVF retrieval attention: decode over 2048 of 16384 cached keys.
//
// Quest (Tang et al., ICML 2024) keeps, for every page of 16 keys, the elementwise min and max of
// its keys; sum_c max(q_c min_c, q_c max_c) bounds q . k over the page, so a decode step reads the
// small page summaries, picks the pages with the highest bounds and attends exactly to them.
// RetrievalAttention (Liu et al. 2024) instead clusters the keys (k-means, an inverted-file index),
// probes the lists whose centroids best match q and attends to the best keys found. Both add the
// most recent keys (a local window) and combine the two parts exactly with attention::merge.
//
// The cache: keys around 64 topic centroids, in segments of consecutive tokens (a topic lasts
// 16..240 tokens), k = mu + c_topic + noise; the query mixes two topics of the context.
//
// Facts checked:
//   1. the bound holds: every key's score is at most its page's bound;
//   2. Quest with every page is exactly dense attention; with 112 pages + a 256-key window it finds
//      >= 90% of the true top-64 keys and is much closer to dense attention than the window alone;
//   3. IVF search probing every list is exact (equal to brute-force search), and retrieval attention
//      probing 8 of 64 lists finds >= 90% of the true top-64 keys;
//   4. a decode loop: the page summaries and the index follow the growing cache (update / add).
#include <mnemo/attention/decode.hpp>
#include <mnemo/attention/quest.hpp>
#include <mnemo/attention/reference.hpp>
#include <mnemo/attention/retrieval.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace att = mnemo::attention;
using mnemo::tensor;

namespace {

constexpr std::int64_t Hq = 4, Hkv = 1, Lk = 16384, D = 64, topics = 64, window = 256, top = 64;

double rel_error(const tensor<float, 4>& a, const tensor<float, 4>& b) {
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) {
    num += double(a.data()[i] - b.data()[i]) * (a.data()[i] - b.data()[i]);
    den += double(b.data()[i]) * b.data()[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

int main() {
  std::mt19937 rng(32);
  std::normal_distribution<float> normal;
  std::vector<float> c(topics * D), mu(D);
  for (float& x : c) x = normal(rng);
  for (float& x : mu) x = normal(rng);
  tensor<float, 4> k({1, Hkv, Lk + 64, D}), v({1, Hkv, Lk + 64, D}), q({1, Hq, 1, D});
  std::vector<std::int64_t> topic(Lk + 64);
  for (std::int64_t j = 0; j < Lk + 64;) {
    const std::int64_t t = rng() % topics, n = 16 + rng() % 225;
    for (std::int64_t i = j; i < std::min<std::int64_t>(j + n, Lk + 64); ++i) topic[i] = t;
    j += n;
  }
  for (std::int64_t j = 0; j < Lk + 64; ++j)
    for (std::int64_t d = 0; d < D; ++d) {
      k(0, 0, j, d) = mu[d] + c[topic[j] * D + d] + normal(rng);
      v(0, 0, j, d) = normal(rng);
    }
  for (std::int64_t h = 0; h < Hq; ++h) {
    const std::int64_t a = topic[rng() % Lk], b = topic[rng() % Lk];
    for (std::int64_t d = 0; d < D; ++d) q(0, h, 0, d) = 0.8f * c[a * D + d] + 0.4f * c[b * D + d] + 0.5f * normal(rng);
  }
  const auto cache = mnemo::cview(k).narrow(2, 0, Lk), values = mnemo::cview(v).narrow(2, 0, Lk);
  bool ok = true;

  // Dense attention and the true top-64 keys of every head (the quality yardsticks).
  tensor<float, 4> dense({1, Hq, 1, D}), out({1, Hq, 1, D});
  att::decode(q, cache, values, dense);
  std::vector<std::vector<std::int64_t>> truth;
  for (std::int64_t h = 0; h < Hq; ++h) truth.push_back(att::reference_exact_search(cache[0][0], &q(0, h, 0, 0), top));

  // 1. Page summaries and the bound.
  const auto pages = att::quest_pages::build(cache, 16);
  bool bound_holds = true;
  for (std::int64_t p = 0; p < pages.pages(); ++p)
    for (std::int64_t j = p * 16; j < (p + 1) * 16; ++j) {
      double u = 0, s = 0;
      for (std::int64_t d = 0; d < D; ++d) {
        u += std::max(q(0, 0, 0, d) * pages.min(0, 0, p)[d], q(0, 0, 0, d) * pages.max(0, 0, p)[d]);
        s += double(q(0, 0, 0, d)) * cache(0, 0, j, d);
      }
      bound_holds &= s <= u + 1e-3;
    }
  std::printf("1. %ld pages of 16 keys; q . k <= page bound for every key: %s\n", long(pages.pages()),
              bound_holds ? "yes" : "NO");
  ok &= bound_holds;

  // 2. Quest decode: every page (exact), then 112 pages + the window (2048 keys of 16384).
  att::quest_options all;
  all.blocks = pages.pages();
  att::quest_decode(q, cache, values, pages, out, {}, all);
  const double exact = rel_error(out, dense);
  att::quest_options opt;
  opt.blocks = 112;
  opt.window = window;
  tensor<std::int64_t, 3> sel({1, Hq, opt.blocks});
  att::quest_decode(q, cache, values, pages, out, {}, opt, sel);
  const double quest_err = rel_error(out, dense);
  double recall = 0;
  for (std::int64_t h = 0; h < Hq; ++h) {
    std::vector<std::int64_t> keys;
    for (std::int64_t i = 0; i < opt.blocks; ++i)
      for (std::int64_t j = sel(0, h, i) * 16; j < std::min((sel(0, h, i) + 1) * 16, Lk - window); ++j) keys.push_back(j);
    for (std::int64_t j = Lk - window; j < Lk; ++j) keys.push_back(j);
    recall += att::search_recall(keys, truth[h]) / Hq;
  }
  tensor<float, 4> local({1, Hq, 1, D});
  att::decode(q, cache, values, local, {}, att::mods::sliding_window{window});
  const double window_err = rel_error(local, dense);
  std::printf("2. Quest: all pages rel. error %.1e; 112 pages + window: recall of top-%ld %.3f, rel. error %.3f "
              "(window alone %.3f)\n", exact, long(top), recall, quest_err, window_err);
  ok &= exact < 1e-5 && recall >= 0.9 && quest_err < window_err / 2;

  // 3. Retrieval attention over an IVF index of the keys outside the window.
  att::retrieval_index_options iopt;
  iopt.n_lists = 64;
  auto index = att::retrieval_index::build(cache.narrow(2, 0, Lk - window), iopt);
  const auto exhaustive = index.at(0, 0).search(mnemo::cview(q)[0][0][0], 64, top);
  const auto exact_ids = att::reference_exact_search(cache[0][0].narrow(0, 0, Lk - window), &q(0, 0, 0, 0), top);
  att::retrieval_options ropt;
  ropt.n_probe = 8;
  ropt.top_k = 1792;
  ropt.window = window;
  tensor<std::int64_t, 3> ids({1, Hq, ropt.top_k});
  att::retrieval_decode(q, cache, values, index, out, {}, ropt, ids);
  double rrecall = 0;
  for (std::int64_t h = 0; h < Hq; ++h) {
    std::vector<std::int64_t> keys(&ids(0, h, 0), &ids(0, h, 0) + ropt.top_k);
    for (std::int64_t j = Lk - window; j < Lk; ++j) keys.push_back(j);
    rrecall += att::search_recall(keys, truth[h]) / Hq;
  }
  std::printf("3. IVF, all 64 lists probed = brute force: %s; 8 lists: recall of top-%ld %.3f, rel. error %.3f\n",
              exhaustive == exact_ids ? "yes" : "NO", long(top), rrecall, rel_error(out, dense));
  ok &= exhaustive == exact_ids && rrecall >= 0.9;

  // 4. Decode loop: 64 more tokens. Pages follow the cache; keys join the index as they leave the
  //    window. Exhaustive retrieval then still equals exact search over the grown cache.
  att::quest_pages grown = pages;
  for (std::int64_t t = 1; t <= 64; ++t) {
    const auto kt = mnemo::cview(k).narrow(2, 0, Lk + t), vt = mnemo::cview(v).narrow(2, 0, Lk + t);
    grown.update(kt);
    index.add(mnemo::cview(k).narrow(2, Lk + t - window - 1, 1));
    if (t == 64) {
      ropt.n_probe = 64;
      tensor<float, 4> want({1, Hq, 1, D});
      att::retrieval_decode(q, kt, vt, index, out, {}, ropt);
      att::reference_retrieval_decode<float>(q, kt, vt, want, {}, ropt);
      const double diff = rel_error(out, want);
      std::printf("4. after 64 steps: %ld keys indexed, %ld pages; exhaustive retrieval vs exact search: %.1e\n",
                  long(index.size()), long(grown.pages()), diff);
      ok &= diff < 1e-5 && grown.pages() == (Lk + 64) / 16;
    }
  }
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
