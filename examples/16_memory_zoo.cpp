// 16 — The memory zoo: every memory module of mnemo on one associative-recall task.
//
// The task of 15_associative_recall.cpp: a stream of P (key, value) pairs goes by once, then every
// key is asked for again in a shuffled order; an answer counts as recalled when, of the P values,
// the one nearest (largest cosine; the values are unit vectors) to the read is the right one
// (chance: 1 / P). Keys and values: random unit vectors, D = 64. Every memory is sized to hold
// N = 64 pairs (64 slots, rows or cached embeddings; the fixed-size matrices of the learned
// memories are what their shape gives), and its state is printed in floats. Reads that are
// attention use scale 30: an exact match scores 30, a random key about 30 / sqrt(D) = 3.75.
//
//   module                  header                         how a pair is written / read here
//   Titans neural memory    neural_memory.hpp              one gradient step of an MLP [64, 64, 64] per pair
//   Infini-attention        compressive.hpp                delta rule into M [Dk, Dv], z (keys scaled by 32)
//   ARMT                    recurrent_memory.hpp           delta rule into A [2 nu Dk, Dv] (nu = 1), z
//   kNN memory              knn.hpp                        FIFO of N pairs, exact top-1
//   Transformer-XL          segment_recurrence.hpp         kv_memory push of N pairs, xl_read
//   Compressive Transformer compressive_transformer.hpp    n_m = 32 raw + n_cm = 32 mean-pooled (c = 2)
//   LaMemo                  lamemo.hpp                     look-ahead memory of N tokens, lamemo_read
//   CAMELoT                 camelot.hpp                    N slots, novelty insert, LRU replacement
//   RETRO database          retro.hpp                      N chunks (key, 1-token payload), top-1
//   MEMORYLLM pool          memoryllm.hpp                  N slots [k; v], one random slot dropped per pair
//   M+                      memoryllm.hpp                  the same pool, dropped slots kept in a kNN store
//   HMT memory cache        hmt.hpp                        the last N embeddings [k; v], hmt_recall
//   RxT short-term memory   reactive.hpp                   N slots [a_s; k; v], addressed gated writes
//   Memformer               memformer.hpp                  N slots [a_s; k; v], addressed slot attention
// Not in the race (printed as n/a):
//   LM2 (lm2.hpp): its input gate g_in = sigmoid(mean_t(E_t) W_in) is one vector shared by every
//     slot, so a write cannot go to one slot and leave the others: no selective write.
//   Token Turing Machines (token_turing.hpp): the read's importance weights depend on each token
//     alone (no query-key product), so finding a key is the processing unit's job, not the memory's.
//   Product-key memory (product_keys.hpp): its values are parameters learned by backpropagation;
//     there is no write of a pair at inference.
//
// The slot memories (RxT, Memformer) are driven as in 18_reactive_memory.cpp: a slot is
// [a_s; k; v] (a_s one-hot over the N slots, width N + 2 D), pair t is written to slot t mod N, the
// write projections compare addresses and the read projections compare key parts, with hand-set
// weights (a trained network would have to learn them).
//
// What the table shows (and the program checks):
//   1. the exact stores (kNN, Transformer-XL, LaMemo, CAMELoT, RETRO, HMT, RxT, Memformer) recall
//      exactly min(1, N / P): everything below capacity, then only the newest N (CAMELoT's random
//      keys are never similar enough to consolidate, so its LRU replacement is a FIFO);
//   2. M+ recalls everything (its long-term store holds every dropped slot);
//   3. MEMORYLLM forgets even below capacity: a pair written u updates ago survives with
//      probability (1 - 1/N)^u, and its recall is within 0.1 of the mean of that over the stream;
//   4. the Compressive Transformer recalls everything below its raw capacity n_m (P = 16), and at
//      least its n_m raw pairs beyond; the pooled rows add some (a query matches the mean of two
//      keys and reads the mean of two values: right half the time);
//   5. the learned memories (Titans, Infini-attention, ARMT) recall >= 0.9 at P = 16;
//   6. they degrade gradually instead of forgetting outright: at P = 256 Titans and ARMT recall
//      more than the exact stores' 0.25 (Infini-attention, with half the floats, does not).
#include <mnemo/memory/camelot.hpp>
#include <mnemo/memory/compressive.hpp>
#include <mnemo/memory/compressive_transformer.hpp>
#include <mnemo/memory/hmt.hpp>
#include <mnemo/memory/knn.hpp>
#include <mnemo/memory/lamemo.hpp>
#include <mnemo/memory/memformer.hpp>
#include <mnemo/memory/memoryllm.hpp>
#include <mnemo/memory/neural_memory.hpp>
#include <mnemo/memory/reactive.hpp>
#include <mnemo/memory/recurrent_memory.hpp>
#include <mnemo/memory/retro.hpp>
#include <mnemo/memory/segment_recurrence.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <iterator>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace mem = mnemo::memory;
using mnemo::tensor;
using mnemo::view;

namespace {

constexpr std::int64_t D = 64;      // key and value width
constexpr std::int64_t N = 64;      // pairs (slots, rows) every memory is sized for
constexpr float sharp = 30.0f;      // attention scale of the reads: exact match 30, random key ~3.75
constexpr std::int64_t ct_raw = 32, ct_compressed = 32, ct_rate = 2;  // Compressive Transformer: n_m, n_cm, c
constexpr std::int64_t segment = 16;                                  // pairs per step of it and of LaMemo
constexpr std::int64_t mplus_store = 1024, mplus_topk = 4;            // M+'s long-term store and its read
constexpr std::int64_t slot_width = N + 2 * D;                        // RxT / Memformer slot [a_s; k; v]
constexpr std::int64_t rxt_filler = 4;  // zero tokens beside the fact in RxT's encoded interaction
constexpr float gate_weight = 40.0f, gate_bias = -60.0f;  // RxT's gate: open at 2 units of address, shut at 1.2
// Infini-attention's sigma = elu + 1 of a unit key (entries ~ 1/8) is ~1 everywhere: every key
// looks alike. Its keys and queries are scaled by 32 before the memory (recall at P = 16: 0.06
// unscaled, 0.25 at 8, 0.69 at 16, 0.94 at 32 and at 64), the part a trained projection plays.
constexpr float infini_key_gain = 32.0f;
constexpr int threads = 1;  // every call on one thread: the example runs beside the test suite
constexpr std::int64_t P_values[] = {16, 64, 256};

struct task {
  std::int64_t P;
  tensor<float, 3> keys, values;    // [1, P, D] unit rows, in stream order
  std::vector<std::int64_t> order;  // the query order: a permutation of [0, P)
};

task make_task(std::int64_t P, std::uint32_t seed) {  // as in 15_associative_recall.cpp
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

const float* key(const task& t, std::int64_t i) { return &t.keys(0, i, 0); }
const float* value(const task& t, std::int64_t i) { return &t.values(0, i, 0); }
const float* query(const task& t, std::int64_t j) { return key(t, t.order[j]); }  // query j asks for pair order[j]

// Fraction of queries j whose answer (row j of out, `stride` floats apart, D channels from `at`) is
// nearest by cosine to value order[j] of the P; the values are unit rows, so cosine ranks as the dot.
double accuracy(const task& t, const float* out, std::int64_t stride) {
  std::int64_t hits = 0;
  for (std::int64_t j = 0; j < t.P; ++j) {
    std::int64_t best = 0;
    double best_dot = -1e30;
    for (std::int64_t i = 0; i < t.P; ++i) {
      double dot = 0;
      for (std::int64_t c = 0; c < D; ++c) dot += double(out[j * stride + c]) * value(t, i)[c];
      if (dot > best_dot) {
        best_dot = dot;
        best = i;
      }
    }
    hits += best == t.order[j] ? 1 : 0;
  }
  return double(hits) / double(t.P);
}

// Rows as [1, 1, n, width] tensors: the keys, the values, the queries (keys in query order).
tensor<float, 4> rows4(const task& t, const float* (*row)(const task&, std::int64_t)) {
  tensor<float, 4> x({1, 1, t.P, D});
  for (std::int64_t i = 0; i < t.P; ++i) std::copy(row(t, i), row(t, i) + D, &x(0, 0, i, 0));
  return x;
}

// [k; v] (or [k; 0] when v is null) into a row of width 2 D.
void pack(float* dst, const float* k, const float* v) {
  std::copy(k, k + D, dst);
  if (v) std::copy(v, v + D, dst + D);
  else std::fill(dst + D, dst + 2 * D, 0.0f);
}

tensor<float, 2> zeros(std::int64_t r, std::int64_t c) {
  tensor<float, 2> x({r, c});
  std::fill(x.begin(), x.end(), 0.0f);
  return x;
}

// ---------------------------------------------------------------------------------------------
// The learned memories: a fixed-size matrix absorbs every pair.

// Titans: one test-time gradient step per pair (theta = 0.5, no momentum, no forgetting: the
// settings of 15_associative_recall.cpp), then M(q) for every query. W0 [D, N], W1 [N, D].
double recall_titans(const task& t) {
  const mem::mlp_shape shape{D, N, 2, mem::activation::silu, false};
  mem::neural_memory_state state(1, shape);
  std::mt19937 rng(99);  // small random start: a zero MLP has zero gradients through silu's W1
  std::normal_distribution<float> normal(0.0f, 0.1f);
  for (int l = 0; l < 2; ++l)
    for (std::int64_t i = 0; i < state.weight(l).extent(1) * state.weight(l).extent(2); ++i)
      state.weight(l).data()[i] = normal(rng);
  tensor<float, 2> theta({1, t.P}), eta({1, t.P}), alpha({1, t.P});
  std::fill(theta.begin(), theta.end(), 0.5f);
  std::fill(eta.begin(), eta.end(), 0.0f);
  std::fill(alpha.begin(), alpha.end(), 0.0f);
  tensor<float, 3> y({1, t.P, D}), out({1, t.P, D}), q({1, t.P, D});
  for (std::int64_t j = 0; j < t.P; ++j) std::copy(query(t, j), query(t, j) + D, &q(0, j, 0));
  mem::neural_memory(t.keys, t.keys, t.values, theta, eta, alpha, state, y);
  mem::neural_memory_read(q, state, out);
  return accuracy(t, out.data(), D);
}

// Infini-attention's compressive memory, delta rule, one pair per update (segments of 1 token).
double recall_infini(const task& t) {
  mem::compressive_state state(1, 1, D, D);
  tensor<float, 4> k = rows4(t, key), q = rows4(t, query);
  const tensor<float, 4> v = rows4(t, value);
  for (float& x : k) x *= infini_key_gain;
  for (float& x : q) x *= infini_key_gain;
  tensor<float, 4> out({1, 1, t.P, D});
  for (std::int64_t i = 0; i < t.P; ++i)
    mem::compressive_update(k.as_view().narrow(2, i, 1), v.as_view().narrow(2, i, 1), state,
                            mem::compressive_rule::delta, threads);
  mem::compressive_retrieve(q, state, out, threads);
  return accuracy(t, out.data(), D);
}

// ARMT's associative matrix (nu = 1: F = 2 D features), delta rule with beta = 1, one pair per segment.
double recall_armt(const task& t) {
  mem::associative_memory state(1, 1, D, D, 1);
  const tensor<float, 4> k = rows4(t, key), v = rows4(t, value), q = rows4(t, query);
  tensor<float, 3> beta({1, 1, 1});
  beta(0, 0, 0) = 1.0f;
  tensor<float, 4> out({1, 1, t.P, D});
  for (std::int64_t i = 0; i < t.P; ++i)
    mem::armt_update(k.as_view().narrow(2, i, 1), v.as_view().narrow(2, i, 1), beta, state, {.threads = threads});
  mem::armt_read(q, state, out, {.threads = threads});
  return accuracy(t, out.data(), D);
}

// ---------------------------------------------------------------------------------------------
// The stores of pairs: exact rows, read by search or by attention.

double recall_knn(const task& t) {
  mem::knn_memory store(1, 1, D, D, N);
  tensor<float, 4> out({1, 1, t.P, D});
  store.add(rows4(t, key), rows4(t, value));
  mem::knn_attention(rows4(t, query), store, 1, out, {}, {.threads = threads});
  return accuracy(t, out.data(), D);
}

double recall_xl(const task& t) {
  mem::kv_memory m(1, 1, N, D, D);
  tensor<float, 4> out({1, 1, t.P, D});
  m.push(rows4(t, key), rows4(t, value));
  mem::xl_read(rows4(t, query), m, out, {.scale = sharp, .threads = threads});
  return accuracy(t, out.data(), D);
}

// Segments of 16 pairs, so that each eviction has groups of c rows to pool (one pair per step
// would evict one row at a time, and a group of one row is kept as it is).
double recall_compressive_transformer(const task& t) {
  mem::compressive_transformer_memory m(1, 1, ct_raw, ct_compressed, D, D);
  const tensor<float, 4> k = rows4(t, key), v = rows4(t, value);
  tensor<float, 4> seg_out({1, 1, segment, D}), out({1, 1, t.P, D});
  for (std::int64_t s = 0; s < t.P; s += segment) {
    const auto ks = k.as_view().narrow(2, s, segment), vs = v.as_view().narrow(2, s, segment);
    const mem::compressive_transformer_options opt{
        .rate = ct_rate, .function = mem::compression::mean_pool, .scale = sharp, .threads = threads};
    mem::compressive_transformer_attention(ks, ks, vs, m, seg_out, opt);  // the keys as the segment's queries
  }
  mem::compressive_transformer_read(rows4(t, query), m, out, {.scale = sharp, .threads = threads});
  return accuracy(t, out.data(), D);
}

double recall_lamemo(const task& t) {
  mem::lamemo_memory m(1, 1, N, D, D);
  const tensor<float, 4> k = rows4(t, key), v = rows4(t, value);
  tensor<float, 4> seg_out({1, 1, segment, D}), out({1, 1, t.P, D});
  for (std::int64_t s = 0; s < t.P; s += segment) {
    const auto ks = k.as_view().narrow(2, s, segment), vs = v.as_view().narrow(2, s, segment);
    mem::lamemo_attention(ks, ks, vs, m, seg_out, {.scale = sharp, .threads = threads});
  }
  mem::lamemo_read(rows4(t, query), m, out, {.scale = sharp, .threads = threads});
  return accuracy(t, out.data(), D);
}

double recall_camelot(const task& t) {
  mem::camelot_memory m(1, 1, N, D, D);
  tensor<float, 4> out({1, 1, t.P, D});
  mem::camelot_write(rows4(t, key), rows4(t, value), m, {.threshold = 0.9f, .threads = threads});
  mem::camelot_read(rows4(t, query), m, out, {}, {.scale = sharp, .threads = threads});
  return accuracy(t, out.data(), D);
}

double recall_retro(const task& t) {
  mem::retro_database db(D, 1, D, N);
  tensor<float, 2> q({t.P, D}), out({t.P, D});
  tensor<std::int64_t, 2> slots({t.P, 1});
  for (std::int64_t j = 0; j < t.P; ++j) std::copy(query(t, j), query(t, j) + D, &q(j, 0));
  db.add(view<const float, 2>(t.keys.data(), {t.P, D}), view<const float, 3>(t.values.data(), {t.P, 1, D}));
  db.retrieve(q, slots, threads);
  db.gather(slots, out);
  return accuracy(t, out.data(), D);
}

// MEMORYLLM: the pool holds [k; v] rows; each pair is one self-update of K = 1 (a random slot
// drops out); the read queries with [k; 0] and answers with the value half. M+ (long_term > 0)
// keeps the dropped slots in a kNN store and reads both.
double recall_memoryllm(const task& t, std::int64_t long_term) {
  mem::memory_pool pool(1, N, 2 * D, long_term, 1);
  const mem::memoryllm_options opt{.update_len = 1, .heads = 1, .scale = sharp, .threads = threads};
  tensor<float, 3> h({1, 1, 2 * D});
  for (std::int64_t i = 0; i < t.P; ++i) {
    pack(h.data(), key(t, i), value(t, i));
    mem::memoryllm_update(h, pool, opt);
  }
  tensor<float, 4> q({1, 1, t.P, 2 * D}), out({1, 1, t.P, 2 * D});
  for (std::int64_t j = 0; j < t.P; ++j) pack(&q(0, 0, j, 0), query(t, j), nullptr);
  if (long_term > 0) mem::mplus_read(q, pool, mplus_topk, out, {}, opt);
  else mem::memoryllm_read(q, pool, out, {}, opt);
  return accuracy(t, out.data() + D, 2 * D);
}

// HMT: the cache holds the last N memory embeddings [k; v]; W_q = W_k = [I; 0] compare key halves.
double recall_hmt(const task& t) {
  tensor<float, 2> w = zeros(2 * D, D);
  for (std::int64_t c = 0; c < D; ++c) w(c, c) = 1.0f;
  mem::hmt_memory cache(1, N, w, w);
  tensor<float, 2> m({1, 2 * D}), out({t.P, 2 * D});
  for (std::int64_t i = 0; i < t.P; ++i) {
    pack(m.data(), key(t, i), value(t, i));
    cache.append(m);
  }
  for (std::int64_t j = 0; j < t.P; ++j) {  // one summary per batch row and call
    pack(m.data(), query(t, j), nullptr);
    mem::hmt_recall(m, cache, view<float, 2>(&out(j, 0), {1, 2 * D}), {.scale = sharp, .threads = threads});
  }
  return accuracy(t, out.data() + D, 2 * D);
}

// ---------------------------------------------------------------------------------------------
// The slot memories: slot s is [a_s; k; v], width N + 2 D. The projections are hand-set: the
// write compares addresses, the read compares key parts and returns value parts; `gain` makes
// either comparison score 30 after the cross-attention's 1 / sqrt(width).

struct slot_weights {
  const float gain = sharp * static_cast<float>(std::sqrt(double(slot_width)));
  tensor<float, 2> rq = zeros(slot_width, slot_width), rk = zeros(slot_width, slot_width),
                   rv = zeros(slot_width, slot_width), wq = zeros(slot_width, slot_width),
                   wk = zeros(slot_width, slot_width), eye = zeros(slot_width, slot_width),
                   wg = zeros(slot_width, slot_width);
  tensor<float, 1> bg{{slot_width}};
  slot_weights() {
    for (std::int64_t c = 0; c < slot_width; ++c) eye(c, c) = 1.0f;
    for (std::int64_t c = 0; c < D; ++c) {
      rq(N + c, N + c) = gain;  // read: query key part . slot key part
      rk(N + c, N + c) = 1.0f;
      rv(N + D + c, N + D + c) = 1.0f;  // ... returns the slot's value part
    }
    for (std::int64_t a = 0; a < N; ++a) {
      wq(a, a) = gain;  // write: slot address . token address
      wk(a, a) = 1.0f;
      for (std::int64_t c = 0; c < slot_width; ++c) wg(a, c) = gate_weight;  // RxT's gate reads the address mass
    }
    std::fill(bg.begin(), bg.end(), gate_bias);
  }
};

tensor<float, 3> initial_slots() {  // slot s = [a_s; 0; 0]
  tensor<float, 3> m({1, N, slot_width});
  std::fill(m.begin(), m.end(), 0.0f);
  for (std::int64_t s = 0; s < N; ++s) m(0, s, s) = 1.0f;
  return m;
}

// The token that writes pair i: [address a_{i mod N}; k_i; v_i], rows after it zero.
void fact_token(float* row, const task& t, std::int64_t i, float address) {
  std::fill(row, row + slot_width, 0.0f);
  row[i % N] = address;
  std::copy(key(t, i), key(t, i) + D, row + N);
  std::copy(value(t, i), value(t, i) + D, row + N + D);
}

tensor<float, 3> slot_queries(const task& t) {  // [0; q; 0]
  tensor<float, 3> x({1, t.P, slot_width});
  std::fill(x.begin(), x.end(), 0.0f);
  for (std::int64_t j = 0; j < t.P; ++j) std::copy(query(t, j), query(t, j) + D, &x(0, j, N));
  return x;
}

// RxT: the encoded interaction is the fact token and rxt_filler zero tokens; the gate opens only
// on the addressed slot (address mass 2 there, 1 + 1 / (1 + filler) elsewhere).
double recall_rxt(const task& t) {
  const slot_weights net;
  const mem::rxt_weights w{{net.rq, net.rk, net.rv, net.eye}, {net.wq, net.wk, net.eye, net.eye}, net.wg, net.bg};
  tensor<float, 3> stm = initial_slots(), ed({1, 1 + rxt_filler, slot_width}), out({1, t.P, slot_width});
  std::fill(ed.begin(), ed.end(), 0.0f);
  for (std::int64_t i = 0; i < t.P; ++i) {
    fact_token(ed.data(), t, i, 1.0f);
    mem::rxt_write(ed, stm, w, {.threads = threads});
  }
  mem::rxt_read(slot_queries(t), stm, w, out, {.threads = threads});
  return accuracy(t, out.data() + N + D, slot_width);
}

// Memformer: slot i attends over [its own slot; the token]; the token's address 2 a_s outscores
// slot s's own address, every other slot's own address outscores the token (retention). BMN
// (the default normalize = true) keeps each slot at unit length: a written slot is
// [2 a_s; k; v] / sqrt(6), so a rewrite still wins (address score 2 * 2 / sqrt(6) against
// (2 / sqrt(6))^2) and the read's key match scores 30 / sqrt(6) ~ 12 instead of 30.
double recall_memformer(const task& t) {
  const slot_weights net;
  const mem::memformer_weights w{{net.rq, net.rk, net.rv, net.eye}, {net.wq, net.wk, net.eye, net.eye}, {}};
  tensor<float, 3> slots = initial_slots(), token({1, 1, slot_width}), out({1, t.P, slot_width});
  for (std::int64_t i = 0; i < t.P; ++i) {
    fact_token(token.data(), t, i, 2.0f);
    mem::memformer_write(token, slots, w, {.threads = threads});
  }
  mem::memformer_read(slot_queries(t), slots, w, out, {.threads = threads});
  return accuracy(t, out.data() + N + D, slot_width);
}

// ---------------------------------------------------------------------------------------------

enum class expect { fifo, everything, survival, compressed, learned, learned_below };  // the checks 1.-6.

struct module {
  const char* name;
  std::int64_t floats;  // the state, in floats
  expect rule;
  std::function<double(const task&)> recall;
};

// MEMORYLLM: the mean over the stream of (1 - 1/N)^u, u = updates since the pair was written.
double expected_survival(std::int64_t P) {
  double s = 0;
  for (std::int64_t u = 0; u < P; ++u) s += std::pow(1.0 - 1.0 / double(N), double(u));
  return s / double(P);
}

// The checks 1.-6. of the header for one module at one P.
bool as_expected(expect rule, std::int64_t P, double r) {
  const double fifo = std::min(1.0, double(N) / double(P)), one_pair = 1.0 / double(P);
  const bool below = P == P_values[0], far_beyond = P == P_values[std::size(P_values) - 1];
  switch (rule) {
    case expect::fifo: return std::fabs(r - fifo) < 0.5 * one_pair;                  // 1. the same count
    case expect::everything: return r == 1.0;                                          // 2.
    case expect::survival: return std::fabs(r - expected_survival(P)) < 0.1;           // 3.
    case expect::compressed: return P <= ct_raw ? r == 1.0 : r >= double(ct_raw) / double(P);  // 4.
    case expect::learned: return below ? r >= 0.9 : far_beyond ? r > fifo : true;      // 5. and 6.
    case expect::learned_below: return !below || r >= 0.9;                             // 5.
  }
  return false;
}

}  // namespace

int main() {
  constexpr std::int64_t pair = 2 * D;
  const std::vector<module> zoo = {
      {"Titans neural memory", 2 * (D * N + N * D), expect::learned, recall_titans},  // weights + momenta
      {"Infini-attention (delta)", D * D + D, expect::learned_below, recall_infini},
      {"ARMT (nu = 1)", 2 * D * D + 2 * D, expect::learned, recall_armt},
      {"kNN memory", N * pair, expect::fifo, recall_knn},
      {"Transformer-XL", N * pair, expect::fifo, recall_xl},
      {"Compressive Transformer", (ct_raw + ct_compressed) * pair + ct_raw, expect::compressed,
       recall_compressive_transformer},
      {"LaMemo", N * (D + pair + D + 1), expect::fifo, recall_lamemo},  // q, k, v, o, lse
      {"CAMELoT", N * (pair + 2 * 2), expect::fifo, recall_camelot},     // + int64 counts, last use
      {"RETRO database", N * pair, expect::fifo, recall_retro},
      {"MEMORYLLM pool", N * pair, expect::survival, [](const task& t) { return recall_memoryllm(t, 0); }},
      {"M+ (pool + long-term)", N * pair + 2 * mplus_store * pair, expect::everything,  // store: keys = values
       [](const task& t) { return recall_memoryllm(t, mplus_store); }},
      {"HMT memory cache", N * (pair + D), expect::fifo, recall_hmt},  // embeddings + their keys
      {"RxT short-term memory", N * slot_width, expect::fifo, recall_rxt},
      {"Memformer", N * slot_width, expect::fifo, recall_memformer},
  };
  std::vector<task> tasks;
  for (std::int64_t P : P_values) tasks.push_back(make_task(P, static_cast<std::uint32_t>(1000 + P)));

  std::printf("recall after streaming P pairs once (D = %ld, memories sized for N = %ld pairs; chance = 1/P)\n",
              long(D), long(N));
  std::printf("%-26s %9s", "module", "floats");
  for (std::int64_t P : P_values) std::printf("   P = %-4ld", long(P));
  std::printf("\n");
  bool ok = true;
  for (const module& m : zoo) {
    std::printf("%-26s %9ld", m.name, long(m.floats));
    std::string why;
    for (const task& t : tasks) {
      const double r = m.recall(t);
      std::printf("   %8.3f", r);
      const bool good = as_expected(m.rule, t.P, r);
      if (!good) why += " (P = " + std::to_string(t.P) + " unexpected)";
      ok &= good;
    }
    std::printf("%s\n", why.c_str());
  }
  std::printf("%-26s %9s   n/a (no selective write: one input gate shared by every slot)\n", "LM2", "-");
  std::printf("%-26s %9s   n/a (lookup is the processing unit's job: importance has no query)\n",
              "Token Turing Machine", "-");
  std::printf("%-26s %9s   n/a (values are learned by backpropagation: no write at inference)\n",
              "Product-key memory", "-");
  std::printf("MEMORYLLM expected survival (1/P) sum_u (1 - 1/N)^u:");
  for (std::int64_t P : P_values) std::printf(" %.3f", expected_survival(P));
  std::printf("\n%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
