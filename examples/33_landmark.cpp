// 33 — Landmark attention: grouped softmax in training, block retrieval at inference.
//
// Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for
// Transformers" (NeurIPS 2023). A landmark token closes every block of 16 regular tokens. In the
// training form a query attends with one softmax over the regular tokens of its own block and the
// landmarks of earlier blocks; the probability a landmark receives is shared among its block's
// tokens by a softmax inside that block (the "grouped softmax"). So the landmark learns to stand
// for its block, and at inference the landmark keys alone decide which blocks to load: a query
// scores every landmark, retrieves the top blocks from the cache and attends to them plus the
// recent tokens.
//
// Here the landmark keys are untrained stand-ins (each block's mean key, plus the landmark tokens'
// own random keys in the training form), and a "passkey" block is planted far back in the context.
//
// Facts checked:
//   1. training form: the fast path equals the double reference; every row's weights sum to 1; a
//      token of an earlier block gets (its landmark's probability) x (its in-block softmax);
//   2. inference: the passkey block is among the 2 blocks retrieved by its landmark score, and the
//      output is much closer to dense attention than the local window alone;
//   3. retrieving every block is exactly dense attention.
#include <mnemo/attention/decode.hpp>
#include <mnemo/attention/landmark.hpp>
#include <mnemo/attention/reference.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace att = mnemo::attention;
using mnemo::tensor;

namespace {

constexpr std::int64_t block = 16, blocks = 12, L = blocks * (block + 1), D = 32;

double max_diff(const tensor<float, 4>& a, const tensor<float, 4>& b) {
  double m = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a.data()[i] - b.data()[i])));
  return m;
}

}  // namespace

int main() {
  std::mt19937 rng(33);
  std::normal_distribution<float> normal;
  bool ok = true;

  // 1. Training form over L = 12 x (16 + 1) tokens: a landmark after every 16 regular tokens.
  tensor<float, 4> q({1, 1, L, D}), k({1, 1, L, D}), v({1, 1, L, D});
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);
  tensor<std::int64_t, 1> is_mem({L});
  for (std::int64_t j = 0; j < L; ++j) is_mem(j) = (j + 1) % (block + 1) == 0;
  tensor<float, 4> out({1, 1, L, D}), ref({1, 1, L, D}), w({1, 1, L, L});
  att::landmark_attention(q, k, v, is_mem, out, w);
  att::reference_landmark_attention(q, k, v, is_mem, ref);
  double worst_sum = 0;
  for (std::int64_t i = 0; i < L; ++i) {
    double s = 0;
    for (std::int64_t j = 0; j < L; ++j) s += w(0, 0, i, j);
    worst_sum = std::max(worst_sum, std::fabs(s - 1));
  }
  // Row i = the last token; key j = 3 (block 0, whose landmark sits at position 16).
  const std::int64_t i = L - 2, j = 3, lm = block;
  const float scale = 1.0f / std::sqrt(float(D));
  auto s = [&](std::int64_t a, std::int64_t b) {
    double d = 0;
    for (std::int64_t c = 0; c < D; ++c) d += double(q(0, 0, a, c)) * k(0, 0, b, c);
    return scale * d;
  };
  double z_top = 0, z_block = 0;
  for (std::int64_t t = 0; t <= i; ++t)  // top group of row i: its block's tokens, earlier landmarks
    if ((is_mem(t) && t < i) || (!is_mem(t) && t > i - (i % (block + 1)) - 1)) z_top += std::exp(s(i, t));
  for (std::int64_t t = 0; t < block; ++t) z_block += std::exp(s(i, t));
  const double by_hand = std::exp(s(i, lm)) / z_top * std::exp(s(i, j)) / z_block;
  std::printf("1. grouped softmax: fast vs reference %.1e; max |row sum - 1| %.1e; w[%ld][%ld] = %.6f, "
              "P(landmark) x in-block softmax = %.6f\n",
              max_diff(out, ref), worst_sum, long(i), long(j), w(0, 0, i, j), by_hand);
  ok &= max_diff(out, ref) < 1e-5 && worst_sum < 1e-5 && std::fabs(w(0, 0, i, j) - by_hand) < 1e-6;

  // 2. Inference: a cache of 4096 regular tokens in blocks of 16 (256 landmarks); block 37 holds a
  //    "passkey" aligned with the query. Landmark keys: each block's mean key.
  constexpr std::int64_t Lk = 4096, n_blocks = Lk / block, Hq = 2, passkey = 37, window = 64;
  tensor<float, 4> kc({1, 1, Lk, D}), vc({1, 1, Lk, D}), qd({1, Hq, 1, D}), lmk({1, 1, n_blocks, D});
  for (auto* t : {&kc, &vc, &qd})
    for (float& x : *t) x = normal(rng);
  for (std::int64_t t = passkey * block; t < (passkey + 1) * block; ++t)
    for (std::int64_t c = 0; c < D; ++c) kc(0, 0, t, c) = 0.5f * kc(0, 0, t, c) + 1.5f * qd(0, t % Hq, 0, c);
  for (std::int64_t b = 0; b < n_blocks; ++b)
    for (std::int64_t t = b * block; t < (b + 1) * block; ++t)
      for (std::int64_t c = 0; c < D; ++c) lmk(0, 0, b, c) += kc(0, 0, t, c) / block;
  att::landmark_options opt;
  opt.blocks = 2;
  opt.window = window;
  tensor<std::int64_t, 3> sel({1, Hq, opt.blocks});
  tensor<float, 4> od({1, Hq, 1, D}), dense({1, Hq, 1, D}), local({1, Hq, 1, D});
  att::landmark_decode<float>(qd, kc, vc, lmk, block, od, {}, opt, sel);
  att::decode(qd, kc, vc, dense);
  att::decode(qd, kc, vc, local, {}, att::mods::sliding_window{window});
  bool found = true;
  for (std::int64_t h = 0; h < Hq; ++h) found &= sel(0, h, 0) == passkey || sel(0, h, 1) == passkey;
  std::printf("2. retrieved blocks: head 0 {%ld, %ld}, head 1 {%ld, %ld} (passkey block %ld); "
              "max |out - dense| %.3f, window alone %.3f\n",
              long(sel(0, 0, 0)), long(sel(0, 0, 1)), long(sel(0, 1, 0)), long(sel(0, 1, 1)), long(passkey),
              max_diff(od, dense), max_diff(local, dense));
  ok &= found && max_diff(od, dense) < max_diff(local, dense) / 4;

  // 3. Every block retrieved: dense attention.
  opt.blocks = n_blocks;
  att::landmark_decode<float>(qd, kc, vc, lmk, block, od, {}, opt);
  std::printf("3. all %ld blocks: max |out - dense| %.1e\n", long(n_blocks), max_diff(od, dense));
  ok &= max_diff(od, dense) < 1e-5;

  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
