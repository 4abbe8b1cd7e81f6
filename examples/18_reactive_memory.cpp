// 18 — Reactive Transformer short-term memory: a conversation, one interaction at a time.
//
// RxT (Filipek 2025) keeps a fixed-size short-term memory STM [S, D] between interactions instead
// of re-reading the whole dialogue. Each interaction t:
//   1. the decoder answers the query X_t, reading the memory by memory cross-attention
//        r = CrossAttn(X_t, STM_{t-1})                      (mem::rxt_read)
//   2. afterwards the memory encoder turns concat(X_t, Y_t) into ED_t, and memory attention
//      writes it into the slots with a gated residual        (mem::rxt_write)
//        Update = CrossAttn(STM_{t-1}, ED_t),  G = sigmoid((STM_{t-1} + Update) W_g + b_g)
//        STM_t  = (1 - G) * STM_{t-1} + G * Update
// The cost of an interaction does not grow with the length of the conversation.
//
// The networks around the memory (decoder, encoder) are stand-ins with hand-set weights, so that
// every number can be predicted. Width D = S + 2 d: each slot has an address part (one-hot, S
// channels: the slots' learned embeddings), a key part and a value part (d = 8 channels each).
//   - The "encoder" tells a fact (k, v) addressed to slot s as the token [a_s; k; v], among filler
//     tokens [0; noise; noise] (the rest of the interaction).
//   - Memory attention: slot i queries with its address (gain 80), so it finds the fact addressed
//     to it; W_g reads the address channels of STM + Update, so the gate opens (G ~ 1) only for
//     the addressed slot (2 units of address there: 80 - 60 = +20) and stays shut elsewhere
//     (1 + 1/n units: about -12): the other slots keep their content.
//   - Memory cross-attention: the decoder's query token [0; k; 0] is compared with the slots' key
//     parts (gain 80) and reads back their value parts: the answer.
//
// Facts checked:
//   1. a fact is recalled (its value is the nearest of all values to the read) only after the
//      interaction that told it: before, the read is an average with no winner;
//   2. after 6 interactions each telling one fact, all 6 are recalled (cosine > 0.99);
//   3. a 7th interaction re-tells fact 2 with a new value: the read now returns the new value,
//      and the other five slots are unchanged (the shut gate);
//   4. every write is the convex combination of the equations: each entry of STM_t lies between
//      STM_{t-1} and Update (computed here with mem::cross_attention);
//   5. the fast path (GEMMs + flash, f32) and the double reference agree over the conversation.
#include <mnemo/memory/reactive.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace mem = mnemo::memory;
using mnemo::tensor;

namespace {

constexpr std::int64_t S = 6, d = 8, D = S + 2 * d;  // slots; key and value widths; model width
constexpr std::int64_t filler = 4;                    // filler tokens per encoded interaction
constexpr float gain = 80.0f;                         // sharpness of the address and key matches
constexpr float gate_weight = 40.0f, gate_bias = -60.0f;

std::int64_t key_at(std::int64_t c) { return S + c; }
std::int64_t value_at(std::int64_t c) { return S + d + c; }

tensor<float, 2> zeros(std::int64_t r, std::int64_t c) {
  tensor<float, 2> t({r, c});
  std::fill(t.begin(), t.end(), 0.0f);
  return t;
}

struct model {
  tensor<float, 2> rq = zeros(D, D), rk = zeros(D, D), rv = zeros(D, D), wq = zeros(D, D), wk = zeros(D, D),
                   wv = zeros(D, D), eye = zeros(D, D), wg = zeros(D, D);
  tensor<float, 1> bg{{D}};
  model() {
    for (std::int64_t c = 0; c < D; ++c) eye(c, c) = 1.0f;
    for (std::int64_t c = 0; c < d; ++c) {
      rq(key_at(c), key_at(c)) = gain;  // read: query key part . slot key part
      rk(key_at(c), key_at(c)) = 1.0f;
      rv(value_at(c), value_at(c)) = 1.0f;  // ... returns the slot's value part
    }
    for (std::int64_t a = 0; a < S; ++a) {
      wq(a, a) = gain;  // write: slot address . token address
      wk(a, a) = 1.0f;
      for (std::int64_t c = 0; c < D; ++c) wg(a, c) = gate_weight;  // the gate reads the address mass
    }
    std::fill(bg.begin(), bg.end(), gate_bias);
  }
  mem::rxt_weights weights() const { return {{rq, rk, rv, eye}, {wq, wk, eye, eye}, wg, bg}; }
};

struct fact {
  std::vector<float> key, value;
};

// The encoded interaction that tells `f` to slot s: [a_s; k; v] and filler tokens [0; noise; noise].
tensor<float, 3> encode(const fact& f, std::int64_t s, std::mt19937& rng) {
  std::normal_distribution<float> noise(0.0f, 0.5f);
  tensor<float, 3> ed({1, 1 + filler, D});
  std::fill(ed.begin(), ed.end(), 0.0f);
  ed(0, 0, s) = 1.0f;
  for (std::int64_t c = 0; c < d; ++c) {
    ed(0, 0, key_at(c)) = f.key[c];
    ed(0, 0, value_at(c)) = f.value[c];
    for (std::int64_t t = 1; t <= filler; ++t) {
      ed(0, t, key_at(c)) = noise(rng);
      ed(0, t, value_at(c)) = noise(rng);
    }
  }
  return ed;
}

// The decoder asks for the facts: one query token [0; k; 0] per fact.
tensor<float, 3> questions(const std::vector<fact>& facts) {
  tensor<float, 3> x({1, static_cast<std::int64_t>(facts.size()), D});
  std::fill(x.begin(), x.end(), 0.0f);
  for (std::size_t j = 0; j < facts.size(); ++j)
    for (std::int64_t c = 0; c < d; ++c) x(0, static_cast<std::int64_t>(j), key_at(c)) = facts[j].key[c];
  return x;
}

double cosine(const float* a, const std::vector<float>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (std::int64_t c = 0; c < d; ++c) {
    ab += double(a[c]) * b[c];
    aa += double(a[c]) * a[c];
    bb += double(b[c]) * b[c];
  }
  return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : 0.0;
}

// Index of the value (of `facts`) nearest to the value part of the read row, by cosine.
std::int64_t answer(const tensor<float, 3>& read, std::int64_t row, const std::vector<fact>& facts) {
  std::int64_t best = 0;
  for (std::size_t j = 1; j < facts.size(); ++j)
    if (cosine(&read(0, row, value_at(0)), facts[j].value) > cosine(&read(0, row, value_at(0)), facts[best].value))
      best = static_cast<std::int64_t>(j);
  return best;
}

}  // namespace

int main() {
  bool ok = true;
  std::mt19937 rng(18);
  std::normal_distribution<float> normal;
  const model net;
  const mem::rxt_weights w = net.weights();

  // Six facts with orthonormal keys (the unit vectors of the key part) and random values.
  std::vector<fact> facts(S);
  for (std::int64_t j = 0; j < S; ++j) {
    facts[j].key.assign(d, 0.0f);
    facts[j].key[j] = 1.0f;
    for (std::int64_t c = 0; c < d; ++c) facts[j].value.push_back(normal(rng));
  }
  // The initial STM: each slot holds its address and nothing else.
  tensor<float, 3> stm({1, S, D}), stm_ref({1, S, D});
  std::fill(stm.begin(), stm.end(), 0.0f);
  for (std::int64_t i = 0; i < S; ++i) stm(0, i, i) = 1.0f;
  stm_ref = stm;
  const tensor<float, 3> ask = questions(facts);
  tensor<float, 3> read({1, S, D});

  // Interactions 1..6: the decoder is asked every fact (reading the STM), then the interaction
  // that tells fact t is written into slot t.
  std::printf("interaction  facts recalled before the write -> after\n");
  double worst_between = 0;
  for (std::int64_t t = 0; t < S; ++t) {
    mem::rxt_read(ask, stm, w, read);
    const bool before = answer(read, t, facts) == t && cosine(&read(0, t, value_at(0)), facts[t].value) > 0.9;
    const tensor<float, 3> ed = encode(facts[t], t, rng);
    tensor<float, 3> update({1, S, D});
    mem::cross_attention(stm, ed, w.write, update);  // Update = CrossAttn(STM_{t-1}, ED_t), for fact 4
    const tensor<float, 3> previous = stm;
    mem::rxt_write(ed, stm, w);
    mem::reference::rxt_write(ed, stm_ref, w);
    for (std::int64_t i = 0; i < stm.size(); ++i) {  // 4. STM_t between STM_{t-1} and Update
      const float lo = std::min(previous.data()[i], update.data()[i]),
                  hi = std::max(previous.data()[i], update.data()[i]);
      worst_between = std::max({worst_between, double(lo - stm.data()[i]), double(stm.data()[i] - hi)});
    }
    mem::rxt_read(ask, stm, w, read);
    std::int64_t recalled = 0;
    for (std::int64_t j = 0; j < S; ++j)
      recalled += answer(read, j, facts) == j && cosine(&read(0, j, value_at(0)), facts[j].value) > 0.99;
    const bool after = answer(read, t, facts) == t && cosine(&read(0, t, value_at(0)), facts[t].value) > 0.99;
    std::printf("  %ld          fact %ld: %s -> %s   (%ld of %ld facts recalled)\n", long(t + 1), long(t + 1),
                before ? "recalled" : "unknown ", after ? "recalled" : "unknown ", long(recalled), long(S));
    ok &= !before && after && recalled == t + 1;  // 1.
  }
  ok &= worst_between < 1e-6;
  std::printf("every write between STM_{t-1} and Update: worst excess %.1e\n", worst_between);

  // 2. All six facts.
  mem::rxt_read(ask, stm, w, read);
  double worst_cos = 1;
  for (std::int64_t j = 0; j < S; ++j)
    worst_cos = std::min(worst_cos, cosine(&read(0, j, value_at(0)), facts[j].value));
  std::printf("after %ld interactions: lowest recall cosine %.4f\n", long(S), worst_cos);
  ok &= worst_cos > 0.99;

  // 3. Interaction 7 re-tells fact 2 (slot 1) with a new value.
  const tensor<float, 3> before_update = stm;
  fact changed = facts[1];
  for (float& e : changed.value) e = normal(rng);
  const tensor<float, 3> ed = encode(changed, 1, rng);
  mem::rxt_write(ed, stm, w);
  mem::reference::rxt_write(ed, stm_ref, w);
  mem::rxt_read(ask, stm, w, read);
  const double new_cos = cosine(&read(0, 1, value_at(0)), changed.value);
  double others = 0;
  for (std::int64_t i = 0; i < S; ++i)
    for (std::int64_t c = 0; c < D; ++c)
      if (i != 1) others = std::max(others, double(std::fabs(stm(0, i, c) - before_update(0, i, c))));
  std::printf("interaction 7 changes fact 2: recall cosine with the new value %.4f; other slots moved by %.1e\n",
              new_cos, others);
  ok &= new_cos > 0.99 && others < 1e-3;

  // 5. The fast path against the double reference, over the whole conversation.
  double diff = 0;
  for (std::int64_t i = 0; i < stm.size(); ++i)
    diff = std::max(diff, double(std::fabs(stm.data()[i] - stm_ref.data()[i])));
  tensor<float, 3> read_ref({1, S, D});
  mem::reference::rxt_read(ask, stm_ref, w, read_ref);
  for (std::int64_t i = 0; i < read.size(); ++i)
    diff = std::max(diff, double(std::fabs(read.data()[i] - read_ref.data()[i])));
  std::printf("fast vs reference over 7 interactions: max difference %.1e\n", diff);
  ok &= diff < 1e-4;

  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
