// 03 — Gated DeltaNet as a streaming associative memory.
//
// Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025) keeps a fixed-size state S [Dk, Dv] and,
// for every token, decays it by exp(g_t) and then corrects it towards the new pair:
//   S' = exp(g_t) S;   S = S' + beta_t k_t (v_t - S'^T k_t)^T;   o_t = q_t^T S
// With beta = 1 and a unit key, the correction replaces whatever S held for k_t by v_t: the state
// is a key -> value memory whose size does not grow with the sequence.
//
// The program streams one long sequence through mnemo::linear::gated_delta_rule in pieces, the
// state carried from piece to piece, as a server would feed a long document:
//   1. 8 associations k_i -> v_i are written (beta = 1, orthonormal keys in 16 "memory" channels);
//   2. 30,000 distractor tokens follow: random keys in the other 48 channels, random values and
//      betas, and a gate that stays almost open (g = -1e-6 per token);
//   3. association 3 is rewritten with a new value half-way through the distractors;
//   4. the 8 keys are queried one token at a time with gated_delta_rule_step (beta = 0: read
//      only), after the prefill.
// It checks, from the definitions rather than the code:
//   a. every association is recalled: o = exp(sum of the gates since its write) v_i, cosine > 0.999
//      and relative error < 1e-3; association 3 returns its new value and not its old one (the
//      delta rule replaces, where plain linear attention would return the sum of both values);
//   b. the streamed outputs equal one call over the whole sequence (to float tolerance);
//   c. a single g = -inf token (a reset) before the queries erases the memory: every read is 0.
#include <mnemo/linear/gated_delta_rule.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace lin = mnemo::linear;
using mnemo::tensor;
using mnemo::view;

namespace {

constexpr std::int64_t Dk = 64, Dv = 32;
constexpr std::int64_t memory_channels = 16;  // keys of the associations live here ...
constexpr std::int64_t n_assoc = 8;           // ... the distractors' keys in the other 48
constexpr std::int64_t n_distract = 30000;
constexpr std::int64_t rewritten = 3;  // the association that gets a new value mid-stream
constexpr float open_gate = -1e-6f;    // log-decay of a distractor token: decay 0.999999
constexpr std::int64_t piece = 1000;   // tokens per streamed call

struct sequence {
  std::int64_t L;
  tensor<float, 4> q, k, v;  // [1, 1, L, Dk], [1, 1, L, Dk], [1, 1, L, Dv]
  tensor<float, 3> g, beta;  // [1, 1, L]
  std::vector<std::vector<float>> keys, values;  // the associations (values[rewritten] is the new one)
  std::vector<float> old_value;                   // the first value of association `rewritten`
  std::int64_t rewrite_at;                        // token of the rewrite
};

std::vector<float> unit(std::vector<float> x) {
  double n = 0;
  for (float e : x) n += double(e) * e;
  for (float& e : x) e = static_cast<float>(e / std::sqrt(n));
  return x;
}

// The prefill: the writes, then the distractors with one rewrite among them. (The queries come
// later, as steps.)
sequence make_sequence() {
  std::mt19937 rng(2024);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(0.1f, 0.9f);
  sequence s;
  s.L = n_assoc + n_distract + 1;
  s.q = tensor<float, 4>({1, 1, s.L, Dk});
  s.k = tensor<float, 4>({1, 1, s.L, Dk});
  s.v = tensor<float, 4>({1, 1, s.L, Dv});
  s.g = tensor<float, 3>({1, 1, s.L});
  s.beta = tensor<float, 3>({1, 1, s.L});

  // Orthonormal association keys in the memory channels (Gram-Schmidt on random vectors).
  for (std::int64_t i = 0; i < n_assoc; ++i) {
    std::vector<float> key(Dk, 0.0f);
    for (std::int64_t c = 0; c < memory_channels; ++c) key[c] = normal(rng);
    for (const auto& prev : s.keys) {
      double dot = 0;
      for (std::int64_t c = 0; c < Dk; ++c) dot += double(key[c]) * prev[c];
      for (std::int64_t c = 0; c < Dk; ++c) key[c] -= static_cast<float>(dot * prev[c]);
    }
    s.keys.push_back(unit(key));
    std::vector<float> value(Dv);
    for (float& e : value) e = normal(rng);
    s.values.push_back(value);
  }
  auto put = [&](std::int64_t t, const std::vector<float>& key, const std::vector<float>& value, float g, float beta) {
    std::copy(key.begin(), key.end(), s.k.data() + t * Dk);
    std::copy(key.begin(), key.end(), s.q.data() + t * Dk);  // the output of a write token is not used
    std::copy(value.begin(), value.end(), s.v.data() + t * Dv);
    s.g(0, 0, t) = g;
    s.beta(0, 0, t) = beta;
  };
  std::int64_t t = 0;
  for (std::int64_t i = 0; i < n_assoc; ++i) put(t++, s.keys[i], s.values[i], 0.0f, 1.0f);
  s.rewrite_at = n_assoc + n_distract / 2;
  for (std::int64_t j = 0; j < n_distract + 1; ++j) {
    if (t == s.rewrite_at) {
      std::vector<float> value(Dv);
      for (float& e : value) e = normal(rng);
      s.old_value = s.values[rewritten];
      s.values[rewritten] = value;
      put(t++, s.keys[rewritten], value, open_gate, 1.0f);
      continue;
    }
    std::vector<float> key(Dk, 0.0f), value(Dv);
    for (std::int64_t c = memory_channels; c < Dk; ++c) key[c] = normal(rng);
    for (float& e : value) e = normal(rng);
    put(t++, unit(key), value, open_gate, uniform(rng));
  }
  return s;
}

// The queries: token i reads key i and writes nothing (beta = 0, g = 0).
void query_all(const sequence& s, view<float, 4> state, const lin::options& opt, std::vector<std::vector<float>>& out) {
  tensor<float, 3> q({1, 1, Dk}), k({1, 1, Dk}), v({1, 1, Dv}), o({1, 1, Dv});
  tensor<float, 2> g({1, 1}), beta({1, 1});  // zeros: no decay, no write
  for (std::int64_t i = 0; i < n_assoc; ++i) {
    std::copy(s.keys[i].begin(), s.keys[i].end(), q.data());
    lin::gated_delta_rule_step(q, k, v, g, beta, o, state, opt);
    out.emplace_back(o.begin(), o.end());
  }
}

}  // namespace

int main() {
  const sequence s = make_sequence();
  lin::options opt;
  opt.scale = 1.0f;  // read S^T q exactly (the default would scale q by Dk^-0.5)

  // Stream the prefill in pieces; the state carries everything between calls.
  tensor<float, 4> state({1, 1, Dk, Dv}), o({1, 1, s.L, Dv});
  for (std::int64_t t0 = 0; t0 < s.L; t0 += piece) {
    const std::int64_t n = std::min(piece, s.L - t0);
    lin::gated_delta_rule(cview(s.q).narrow(2, t0, n), cview(s.k).narrow(2, t0, n), cview(s.v).narrow(2, t0, n),
                          cview(s.g).narrow(2, t0, n), cview(s.beta).narrow(2, t0, n), o.as_view().narrow(2, t0, n),
                          state, opt);
  }
  std::vector<std::vector<float>> recalled;
  query_all(s, state, opt, recalled);

  // a. Recall: the expected read is exp(sum of the gates after the write) v_i.
  bool ok = true;
  std::printf("assoc  written at  decay since   cosine     rel. error\n");
  for (std::int64_t i = 0; i < n_assoc; ++i) {
    const std::int64_t written = i == rewritten ? s.rewrite_at : i;
    double log_decay = 0;
    for (std::int64_t t = written + 1; t < s.L; ++t) log_decay += s.g(0, 0, t);
    const double decay = std::exp(log_decay);
    double dot = 0, nr = 0, nv = 0, err = 0;
    for (std::int64_t c = 0; c < Dv; ++c) {
      const double want = decay * s.values[i][c], got = recalled[i][c];
      dot += got * want;
      nr += got * got;
      nv += want * want;
      err += (got - want) * (got - want);
    }
    const double cosine = dot / std::sqrt(nr * nv), rel = std::sqrt(err / nv);
    std::printf("%5lld  %10lld  %11.6f  %9.6f  %10.2e\n", static_cast<long long>(i), static_cast<long long>(written),
                decay, cosine, rel);
    ok &= cosine > 0.999 && rel < 1e-3;
  }

  // The rewritten association no longer holds its old value (plain linear attention, which only
  // adds, would read old + new; its cosine with the old value would be about 0.7).
  double dot_old = 0, n_old = 0, n_new = 0;
  for (std::int64_t c = 0; c < Dv; ++c) {
    dot_old += double(recalled[rewritten][c]) * s.old_value[c];
    n_old += double(s.old_value[c]) * s.old_value[c];
    n_new += double(recalled[rewritten][c]) * recalled[rewritten][c];
  }
  const double cos_old = dot_old / std::sqrt(n_old * n_new);
  std::printf("association %lld after its rewrite: cosine with its old value %.3f\n", static_cast<long long>(rewritten),
              cos_old);
  ok &= std::abs(cos_old) < 0.5;

  // b. One call over the whole sequence gives the same outputs and state.
  tensor<float, 4> state_once({1, 1, Dk, Dv}), o_once({1, 1, s.L, Dv});
  lin::gated_delta_rule(s.q, s.k, s.v, s.g, s.beta, o_once, state_once, opt);
  double max_diff = 0, max_o = 0;
  for (std::int64_t i = 0; i < o.size(); ++i) {
    max_diff = std::max(max_diff, double(std::abs(o.data()[i] - o_once.data()[i])));
    max_o = std::max(max_o, double(std::abs(o_once.data()[i])));
  }
  for (std::int64_t i = 0; i < state.size(); ++i)
    max_diff = std::max(max_diff, double(std::abs(state.data()[i] - state_once.data()[i])));
  std::printf("streamed in %lld-token pieces vs one call: max |diff| %.2e (outputs up to %.2f)\n",
              static_cast<long long>(piece), max_diff, max_o);
  ok &= max_diff <= 1e-4 * std::max(1.0, max_o);

  // c. A reset token (g = -inf, nothing written) wipes the memory.
  tensor<float, 3> q1({1, 1, Dk}), k1({1, 1, Dk}), v1({1, 1, Dv}), o1({1, 1, Dv});
  tensor<float, 2> g1({1, 1}), beta1({1, 1});
  g1(0, 0) = -INFINITY;
  lin::gated_delta_rule_step(q1, k1, v1, g1, beta1, o1, state, opt);
  std::vector<std::vector<float>> after_reset;
  query_all(s, state, opt, after_reset);
  double max_after = 0;
  for (const auto& r : after_reset)
    for (float e : r) max_after = std::max(max_after, double(std::abs(e)));
  std::printf("after a g = -inf token: max |read| %.2e\n", max_after);
  ok &= max_after == 0.0;

  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
