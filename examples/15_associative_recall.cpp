// 15 — Multi-query associative recall: what a memory is for.
//
// A stream of P (key, value) pairs goes by once; afterwards every key is asked for again, in a
// shuffled order, and a reader must return its value. Keys and values are random unit vectors
// in D = 64 dimensions; an answer counts as recalled when, of the P stored values, the one with
// the largest dot product with the output is the right one (chance: 1 / P). Three memories,
// each fed the stream token by token, each holding a fixed 16 KiB of weights (4096 floats):
//
//   Gated DeltaNet state (Yang, Kautz & Hatamizadeh, ICLR 2025), linear/gated_delta_rule.hpp:
//     S [64, 64];  S = exp(g) S + beta k (v - S^T k)^T,  read q^T S  (g = 0, beta = 1: no decay)
//   Titans neural memory (Behrouz, Zhong & Mirrokni 2024), memory/neural_memory.hpp: an MLP
//     M(x) = silu(x W0) W1, W0 [64, 32], W1 [32, 64], one gradient step on ||M(k) - v||^2 per
//     token (theta = 0.5, no momentum: on a stream of unrelated pairs past surprise says nothing
//     about the next pair, and eta = 0.5 or 0.8 recalled less here; no forgetting). Its state
//     also holds the momentum buffer, so it is printed at twice the weights' 16 KiB;
//   kNN memory (Wu et al., ICLR 2022), memory/knn.hpp: the pairs themselves, 512 bytes each, so
//     16 KiB hold the last 32 (FIFO); exact top-1 search by q . k.
// A kNN memory sized to the whole stream is printed too: perfect recall, for bytes that grow
// with P.
//
// What the numbers show (and the program checks):
//   1. below capacity (P = 16) every memory recalls everything it was shown (>= 0.9);
//   2. the kNN memory recalls exactly min(1, 32 / P): it forgets the oldest pairs outright;
//   3. the learned memories degrade gradually instead: at P = 128, four times what the kNN
//      memory holds in the same 16 KiB of weights, both the delta rule and the Titans MLP recall
//      more than the FIFO does, since their fixed-size weights hold a superposition of every pair
//      rather than the most recent ones.
#include <mnemo/linear/gated_delta_rule.hpp>
#include <mnemo/memory/knn.hpp>
#include <mnemo/memory/neural_memory.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

namespace lin = mnemo::linear;
namespace mem = mnemo::memory;
using mnemo::tensor;

namespace {

constexpr std::int64_t D = 64;                       // key and value width
constexpr std::int64_t state_floats = D * D;         // the 16 KiB budget, in floats
constexpr std::int64_t titans_hidden = state_floats / (2 * D);  // W0 [D, 32] + W1 [32, D] = 4096
constexpr std::int64_t pair_floats = 2 * D;          // one stored (k, v) pair
constexpr std::int64_t knn_capacity = state_floats / pair_floats;  // 32 pairs
constexpr float titans_theta = 0.5f, titans_eta = 0.0f;

struct task {
  std::int64_t P;
  tensor<float, 3> keys, values;   // [1, P, D] unit rows, in stream order
  std::vector<std::int64_t> order;  // the query order: a permutation of [0, P)
};

task make_task(std::int64_t P, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  task t{P, tensor<float, 3>({1, P, D}), tensor<float, 3>({1, P, D}), std::vector<std::int64_t>(P)};
  for (auto* x : {&t.keys, &t.values})
    for (std::int64_t i = 0; i < P; ++i) {
      double n = 0;
      for (std::int64_t c = 0; c < D; ++c) n += double((*x)(0, i, c) = normal(rng)) * (*x)(0, i, c);
      for (std::int64_t c = 0; c < D; ++c) (*x)(0, i, c) = static_cast<float>((*x)(0, i, c) / std::sqrt(n));
    }
  std::iota(t.order.begin(), t.order.end(), 0);
  std::shuffle(t.order.begin(), t.order.end(), rng);
  return t;
}

// Fraction of queries whose output is closest (by dot product) to the right value of the P.
double accuracy(const task& t, const tensor<float, 3>& out) {  // out [1, P, D], row j answers order[j]
  std::int64_t hits = 0;
  for (std::int64_t j = 0; j < t.P; ++j) {
    std::int64_t best = 0;
    double best_dot = -1e30;
    for (std::int64_t i = 0; i < t.P; ++i) {
      double dot = 0;
      for (std::int64_t c = 0; c < D; ++c) dot += double(out(0, j, c)) * t.values(0, i, c);
      if (dot > best_dot) {
        best_dot = dot;
        best = i;
      }
    }
    hits += best == t.order[j] ? 1 : 0;
  }
  return double(hits) / double(t.P);
}

tensor<float, 3> queries(const task& t) {  // [1, P, D]: the keys in query order
  tensor<float, 3> q({1, t.P, D});
  for (std::int64_t j = 0; j < t.P; ++j)
    std::copy(&t.keys(0, t.order[j], 0), &t.keys(0, t.order[j], 0) + D, &q(0, j, 0));
  return q;
}

// Gated DeltaNet: the P writes (beta = 1, g = 0), then the P reads (beta = 0: nothing written),
// one call over the whole sequence [writes; reads] with the state carried through.
double recall_gated_delta(const task& t) {
  const std::int64_t L = 2 * t.P;
  tensor<float, 4> q({1, 1, L, D}), k({1, 1, L, D}), v({1, 1, L, D}), o({1, 1, L, D}), state({1, 1, D, D});
  tensor<float, 3> g({1, 1, L}), beta({1, 1, L});
  const tensor<float, 3> qs = queries(t);
  for (std::int64_t i = 0; i < t.P; ++i) {
    std::copy(&t.keys(0, i, 0), &t.keys(0, i, 0) + D, &k(0, 0, i, 0));
    std::copy(&t.values(0, i, 0), &t.values(0, i, 0) + D, &v(0, 0, i, 0));
    beta(0, 0, i) = 1.0f;
    std::copy(&qs(0, i, 0), &qs(0, i, 0) + D, &q(0, 0, t.P + i, 0));
  }
  lin::gated_delta_rule(q, k, v, g, beta, o, state, {.scale = 1.0f});
  tensor<float, 3> out({1, t.P, D});
  for (std::int64_t j = 0; j < t.P; ++j) std::copy(&o(0, 0, t.P + j, 0), &o(0, 0, t.P + j, 0) + D, &out(0, j, 0));
  return accuracy(t, out);
}

// Titans: one test-time gradient step per pair (chunk 1), then M(q) for every query.
double recall_titans(const task& t, std::int64_t& bytes) {
  const mem::mlp_shape shape{D, titans_hidden, 2, mem::activation::silu, false};
  mem::neural_memory_state state(1, shape);
  std::mt19937 rng(99);  // small random start: a zero MLP has zero gradients through silu's W1
  std::normal_distribution<float> normal(0.0f, 0.1f);
  for (int l = 0; l < 2; ++l)
    for (std::int64_t i = 0; i < state.weight(l).extent(1) * state.weight(l).extent(2); ++i)
      state.weight(l).data()[i] = normal(rng);
  tensor<float, 2> theta({1, t.P}), eta({1, t.P}), alpha({1, t.P});
  std::fill(theta.begin(), theta.end(), titans_theta);
  std::fill(eta.begin(), eta.end(), titans_eta);
  tensor<float, 3> y({1, t.P, D}), out({1, t.P, D});
  mem::neural_memory(t.keys, t.keys, t.values, theta, eta, alpha, state, y);
  mem::neural_memory_read(queries(t), state, out);
  bytes = 2 * state_floats * static_cast<std::int64_t>(sizeof(float));  // weights + momenta
  return accuracy(t, out);
}

// kNN memory of `capacity` pairs: add the stream, then retrieve the top-1 value per query.
double recall_knn(const task& t, std::int64_t capacity) {
  mem::knn_memory memory(1, 1, D, D, capacity);
  const tensor<float, 3> qs = queries(t);
  tensor<float, 4> k({1, 1, t.P, D}), v({1, 1, t.P, D}), q({1, 1, t.P, D}), out({1, 1, t.P, D});
  std::copy(t.keys.begin(), t.keys.end(), k.begin());
  std::copy(t.values.begin(), t.values.end(), v.begin());
  std::copy(qs.begin(), qs.end(), q.begin());
  memory.add(k, v);
  mem::knn_attention(q, memory, 1, out);
  tensor<float, 3> o({1, t.P, D});
  std::copy(out.begin(), out.end(), o.begin());
  return accuracy(t, o);
}

}  // namespace

int main() {
  constexpr std::int64_t kib = 1024;
  const std::int64_t gdn_bytes = state_floats * static_cast<std::int64_t>(sizeof(float));
  const std::int64_t knn_bytes = knn_capacity * pair_floats * static_cast<std::int64_t>(sizeof(float));
  std::int64_t titans_bytes = 0;
  std::printf("recall accuracy after streaming P pairs once (D = %ld; chance = 1/P)\n", long(D));
  std::printf("%6s %22s %22s %22s %22s\n", "P", "gated DeltaNet", "Titans MLP", "kNN, 32 pairs", "kNN, all P pairs");
  bool ok = true;
  double gdn_at_128 = 0, titans_at_128 = 0, knn_at_128 = 0;
  for (std::int64_t P : {16, 32, 64, 128, 256}) {
    const task t = make_task(P, static_cast<std::uint32_t>(1000 + P));
    const double gdn = recall_gated_delta(t), titans = recall_titans(t, titans_bytes);
    const double knn = recall_knn(t, knn_capacity), knn_all = recall_knn(t, P);
    const std::int64_t all_bytes = P * pair_floats * static_cast<std::int64_t>(sizeof(float));
    std::printf("%6ld %8.3f (%3ld KiB)     %8.3f (%3ld KiB)     %8.3f (%3ld KiB)     %8.3f (%3ld KiB)\n", long(P), gdn,
                long(gdn_bytes / kib), titans, long(titans_bytes / kib), knn, long(knn_bytes / kib), knn_all,
                long(all_bytes / kib));
    const double fifo = std::min(1.0, double(knn_capacity) / double(P));
    ok &= std::fabs(knn - fifo) < 1e-9 && knn_all == 1.0;  // 2.
    if (P == 16) ok &= gdn >= 0.9 && titans >= 0.9;         // 1.
    if (P == 128) {
      gdn_at_128 = gdn;
      titans_at_128 = titans;
      knn_at_128 = knn;
    }
  }
  std::printf("P = 128: gated DeltaNet %.3f, Titans MLP %.3f, kNN FIFO %.3f, each with 16 KiB of weights\n",
              gdn_at_128, titans_at_128, knn_at_128);
  ok &= gdn_at_128 > knn_at_128 && titans_at_128 > knn_at_128;  // 3.
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
