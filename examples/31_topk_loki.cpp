// 31 — top-k attention and Loki: attend to the few keys that matter, and find them cheaply.
//
// Decode attention over a long cache spends its time reading every key and value. When a query's
// softmax mass sits on a few keys, attending only to its top-k keys (Gupta et al. 2021) changes
// little. Exact top-k still scores every key; Loki (Singhania et al. 2024) observes that keys live
// near a low-dimensional subspace, so:
//   1. calibrate: PCA of keys from a prompt gives a basis, ordered by variance;
//   2. store keys rotated into that basis (and their first r coordinates contiguously);
//   3. score every key with only r of D coordinates, keep the top k;
//   4. attend exactly (all D coordinates) to those k keys.
// Here the keys have a decaying spectrum in a random basis (as real heads' keys do). The program
// reports, against dense attention: the recall of the true top-64 keys and the output error, for
// exact top-k and for Loki at r = 16 and r = 32 of D = 128, and checks each fast path against its
// double-precision reference. It fails if a fast path disagrees with its reference or Loki's recall
// collapses.
#include <mnemo/attention/decode.hpp>
#include <mnemo/attention/topk.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

namespace att = mnemo::attention;
using mnemo::tensor;

namespace {

constexpr std::int64_t Hq = 8, Hkv = 2, Lk = 4096, D = 128, top_k = 256, truth_k = 64;

// Keys (or queries) with spectrum sigma_c = gain * 2 * 0.93^c along the columns of `basis`.
tensor<float, 4> spectrum(std::int64_t H, std::int64_t L, float gain, const std::vector<float>& basis, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  tensor<float, 4> x({1, H, L, D});
  std::vector<float> z(D);
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t j = 0; j < L; ++j) {
      for (std::int64_t c = 0; c < D; ++c) z[c] = gain * 2.0f * std::pow(0.93f, float(c)) * normal(rng);
      for (std::int64_t e = 0; e < D; ++e) {
        float s = 0;
        for (std::int64_t c = 0; c < D; ++c) s += basis[e * D + c] * z[c];
        x(0, h, j, e) = s;
      }
    }
  return x;
}

// A random orthonormal basis (Gram-Schmidt), row e column c.
std::vector<float> random_basis(std::mt19937& rng) {
  std::normal_distribution<double> normal;
  std::vector<double> b(D * D);
  for (double& x : b) x = normal(rng);
  for (std::int64_t c = 0; c < D; ++c) {
    for (std::int64_t p = 0; p < c; ++p) {
      double dot = 0;
      for (std::int64_t e = 0; e < D; ++e) dot += b[e * D + c] * b[e * D + p];
      for (std::int64_t e = 0; e < D; ++e) b[e * D + c] -= dot * b[e * D + p];
    }
    double n = 0;
    for (std::int64_t e = 0; e < D; ++e) n += b[e * D + c] * b[e * D + c];
    for (std::int64_t e = 0; e < D; ++e) b[e * D + c] /= std::sqrt(n);
  }
  return {b.begin(), b.end()};
}

double rel_error(const tensor<float, 4>& a, const tensor<float, 4>& b) {
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) {
    num += std::pow(double(a.data()[i]) - b.data()[i], 2);
    den += std::pow(double(b.data()[i]), 2);
  }
  return std::sqrt(num / den);
}

double recall(const tensor<std::int64_t, 4>& selected, const tensor<std::int64_t, 4>& truth) {
  double hit = 0;
  for (std::int64_t h = 0; h < Hq; ++h) {
    const std::int64_t* s = &selected(0, h, 0, 0);
    for (std::int64_t t = 0; t < truth_k; ++t) hit += std::binary_search(s, s + top_k, truth(0, h, 0, t));
  }
  return hit / double(Hq * truth_k);
}

double max_diff(const tensor<float, 4>& a, const tensor<float, 4>& b) {
  double m = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a.data()[i] - b.data()[i])));
  return m;
}

}  // namespace

int main() {
  std::mt19937 rng(31);
  const std::vector<float> basis = random_basis(rng);
  const tensor<float, 4> k = spectrum(Hkv, Lk, 1.0f, basis, rng);
  const tensor<float, 4> q = spectrum(Hq, 1, 5.0f, basis, rng);  // one decode step
  tensor<float, 4> v({1, Hkv, Lk, D});
  std::normal_distribution<float> normal;
  for (float& x : v) x = normal(rng);

  // Dense decode, and the true top-64 keys of each head (exact top-k selection).
  tensor<float, 4> dense({1, Hq, 1, D}), out({1, Hq, 1, D}), want({1, Hq, 1, D});
  att::decode(q, k, v, dense);
  tensor<std::int64_t, 4> truth({1, Hq, 1, truth_k}), sel({1, Hq, 1, top_k});
  att::topk_attention(q, k, v, truth_k, out, {}, truth, att::mods::causal{});

  // Exact top-k attention.
  att::topk_attention(q, k, v, top_k, out, {}, sel, att::mods::causal{});
  att::reference_topk_attention(q, k, v, top_k, want, {}, {}, att::mods::causal{});
  double worst_vs_reference = max_diff(out, want);
  std::printf("top-%ld of %ld keys:      recall@%ld %.3f   error vs dense %.3f\n", top_k, Lk, truth_k, recall(sel, truth),
              rel_error(out, dense));

  // Loki: calibrate on the first 1024 keys (the "prompt"), rotate the cache, select in r dims.
  const att::loki_basis pca = att::loki_calibrate(mnemo::cview(k).narrow(2, 0, 1024));
  std::printf("PCA: the first 16 of %ld directions hold %.0f%% of the key variance\n", D, [&] {
    double head = 0, all = 0;
    for (std::int64_t c = 0; c < D; ++c) (c < 16 ? head : all) += pca.variance(0, c);
    return 100 * head / (head + all);
  }());
  tensor<float, 4> k_rot(k.shape());
  double loki_recall_32 = 0;
  for (std::int64_t r : {16, 32}) {
    tensor<float, 4> k_low({1, Hkv, Lk, r});
    att::loki_rotate(k, pca, k_rot, k_low);
    att::loki_attention(q, k_rot, k_low, v, pca, top_k, out, {}, sel, att::mods::causal{});
    att::reference_loki_attention(q, k_rot, k_low, v, pca, top_k, want, {}, {}, att::mods::causal{});
    worst_vs_reference = std::max(worst_vs_reference, max_diff(out, want));
    const double rc = recall(sel, truth);
    if (r == 32) loki_recall_32 = rc;
    std::printf("loki r=%2ld, top-%ld:      recall@%ld %.3f   error vs dense %.3f\n", r, top_k, truth_k, rc,
                rel_error(out, dense));
  }

  const double tolerance = 1e-4, min_recall = 0.9;
  if (!(worst_vs_reference <= tolerance) || !(loki_recall_32 >= min_recall)) {
    std::printf("FAILED: fast path vs reference %.3g (tolerance %.1g), loki recall %.3f (minimum %.2f)\n",
                worst_vs_reference, tolerance, loki_recall_32, min_recall);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
