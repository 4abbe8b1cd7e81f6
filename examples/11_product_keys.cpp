// 11 — Product-key memory: a million-slot-style lookup that scores only 2 sqrt(N) sub-keys.
//
// Lample et al., "Large Memory Layers with Product Keys" (NeurIPS 2019). A memory of n_keys^2
// value rows is addressed by two sets of n_keys sub-keys: each query half picks its top-knn
// sub-keys, the knn^2 pairs are scored by the sum of their halves, and the best knn pairs are
// read with softmax weights. Here n_keys = 64 (4096 slots), 4 heads, knn = 8.
//
// Facts checked (from the definitions, not the code):
//   1. a query built from sub-keys a and b of head 0 selects slot a * n_keys + b first;
//   2. the fast path (GEMM scores, SIMD partial top-k, pruned candidates) selects exactly the
//      slots of the double reference (full sorts over all knn^2 candidates);
//   3. the backward trains the memory: gradient steps on the touched value rows (and the
//      sub-keys) cut a regression loss by 10x, touching a small fraction of the 4096 rows.
#include <mnemo/memory/product_keys.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <vector>

namespace mem = mnemo::memory;
using mnemo::tensor;

int main() {
  const std::int64_t N = 32, heads = 4, k_dim = 32, half = k_dim / 2, n_keys = 64, v_dim = 24, knn = 8;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  tensor<float, 3> query({N, heads, k_dim});
  tensor<float, 4> keys({heads, 2, n_keys, half});
  tensor<float, 2> values({n_keys * n_keys, v_dim});
  for (float& x : query) x = normal(rng);
  for (float& x : keys) x = normal(rng) / std::sqrt(float(half));
  for (float& x : values) x = 0.1f * normal(rng);
  tensor<float, 2> out({N, v_dim}), out_ref({N, v_dim});
  tensor<std::int64_t, 3> idx({N, heads, knn}), idx_ref({N, heads, knn});
  tensor<float, 3> w({N, heads, knn}), w_ref({N, heads, knn});
  bool ok = true;

  // 1. Query row 0, head 0 = 10 x [sub-key 5 of half 0, sub-key 42 of half 1].
  for (std::int64_t c = 0; c < half; ++c) {
    query(0, 0, c) = 10 * keys(0, 0, 5, c);
    query(0, 0, half + c) = 10 * keys(0, 1, 42, c);
  }
  mem::pkm_forward(query, keys, values, knn, out, idx, w);
  std::printf("1. planted query selects slot %ld (want %ld) with weight %.3f\n", long(idx(0, 0, 0)), long(5 * n_keys + 42),
              w(0, 0, 0));
  ok &= idx(0, 0, 0) == 5 * n_keys + 42;

  // 2. Fast path against the reference.
  mem::reference::pkm_forward(query, keys, values, knn, out_ref, idx_ref, w_ref);
  bool same = true;
  double diff = 0;
  for (std::int64_t i = 0; i < idx.size(); ++i) same &= idx.data()[i] == idx_ref.data()[i];
  for (std::int64_t i = 0; i < out.size(); ++i) diff = std::max(diff, double(std::fabs(out.data()[i] - out_ref.data()[i])));
  std::printf("2. fast vs reference: indices %s, max |out diff| = %.2e\n", same ? "identical" : "DIFFERENT", diff);
  ok &= same && diff < 1e-5;

  // 3. Learn targets: loss = 0.5 |out - target|^2, plain SGD on values and sub-keys.
  tensor<float, 2> target({N, v_dim}), dout({N, v_dim}), dvalues({n_keys * n_keys, v_dim});
  tensor<float, 3> dquery({N, heads, k_dim});
  tensor<float, 4> dkeys({heads, 2, n_keys, half});
  for (float& x : target) x = normal(rng);
  auto loss = [&] {
    mem::pkm_forward(query, keys, values, knn, out, idx, w);
    double l = 0;
    for (std::int64_t i = 0; i < out.size(); ++i) {
      dout.data()[i] = out.data()[i] - target.data()[i];
      l += 0.5 * dout.data()[i] * dout.data()[i];
    }
    return l / N;
  };
  const double first = loss();
  const float lr = 0.5f;
  std::set<std::int64_t> touched;
  double last = first;
  for (int step = 0; step < 60; ++step) {
    std::fill(dvalues.begin(), dvalues.end(), 0.0f);
    mem::pkm_backward(query, keys, values, idx, w, dout, dquery, dkeys, dvalues);
    for (std::int64_t i : idx) {
      touched.insert(i);
      for (std::int64_t c = 0; c < v_dim; ++c) values(i, c) -= lr * dvalues(i, c);
      std::fill(&dvalues(i, 0), &dvalues(i, 0) + v_dim, 0.0f);  // each touched row once per step
    }
    for (std::int64_t i = 0; i < keys.size(); ++i) keys.data()[i] -= 0.05f * dkeys.data()[i];
    last = loss();
  }
  std::printf("3. 60 SGD steps: loss %.4f -> %.4f, %zu of %ld value rows ever touched\n", first, last, touched.size(),
              long(n_keys * n_keys));
  ok &= last < first / 10 && static_cast<std::int64_t>(touched.size()) < n_keys * n_keys / 2;

  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
