// 02 — prefill a prompt with FlashAttention, then decode token by token from a growing KV cache.
//
// This is the loop of every LLM server, for one layer:
//   prefill: the prompt's P queries attend causally to its P keys in one tiled pass
//            (FlashAttention-2, Dao 2023): O(P) memory, no P x P score matrix.
//   decode:  each new token appends its key and value to the cache, then its single query
//            attends to everything cached so far (split-KV / Flash-Decoding: the keys are cut
//            into fixed chunks handled in parallel and merged exactly through their lse).
// The cache is one buffer [B, Hkv, capacity, D]; decode reads its first `len` slots through a
// strided view, no copy. Here the cache is stored in f16, as servers do to halve its bytes.
//
// Every step is checked against the double-precision reference run on the same (f16-rounded)
// keys and values; the program fails if any output is off by more than a float32 tolerance.
#include <mnemo/attention/decode.hpp>
#include <mnemo/attention/flash.hpp>
#include <mnemo/attention/reference.hpp>

#include <cmath>
#include <cstdio>
#include <random>

namespace att = mnemo::attention;
using mnemo::f16;

namespace {

double max_abs_diff(mnemo::view<const float, 4> a, mnemo::view<const float, 4> b) {
  double m = 0;
  for (std::int64_t h = 0; h < a.extent(1); ++h)
    for (std::int64_t i = 0; i < a.extent(2); ++i)
      for (std::int64_t c = 0; c < a.extent(3); ++c) m = std::max(m, double(std::fabs(a(0, h, i, c) - b(0, h, i, c))));
  return m;
}

}  // namespace

int main() {
  const std::int64_t Hq = 8, Hkv = 2, D = 64, prompt = 300, steps = 40, capacity = prompt + steps;
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;

  // The KV cache of one layer, and the prompt's queries.
  mnemo::tensor<f16, 4> k_cache({1, Hkv, capacity, D}), v_cache({1, Hkv, capacity, D});
  mnemo::tensor<float, 4> q_prompt({1, Hq, prompt, D}), out_prompt({1, Hq, prompt, D}), want_prompt({1, Hq, prompt, D});
  for (float& x : q_prompt) x = normal(rng);
  for (std::int64_t h = 0; h < Hkv; ++h)
    for (std::int64_t j = 0; j < capacity; ++j)
      for (std::int64_t c = 0; c < D; ++c) {
        k_cache(0, h, j, c) = f16(normal(rng));
        v_cache(0, h, j, c) = f16(normal(rng));
      }
  // The cache's first `len` slots as [1, Hkv, len, D] views (strided: slot stride D, head stride capacity * D).
  auto cached = [&](const mnemo::tensor<f16, 4>& cache, std::int64_t len) { return cache.as_view().narrow(2, 0, len); };

  // Prefill: causal flash attention over the prompt.
  att::flash(q_prompt, cached(k_cache, prompt), cached(v_cache, prompt), out_prompt, {}, att::mods::causal{});
  att::reference(q_prompt, cached(k_cache, prompt), cached(v_cache, prompt), want_prompt, {}, att::mods::causal{});
  double worst = max_abs_diff(out_prompt, want_prompt);
  std::printf("prefill: %ld tokens, max |flash - reference| = %.3g\n", prompt, worst);

  // Decode: one new token per step. (Its key/value are already in slot `len - 1`; a model would
  // write them there from its projections now.)
  mnemo::tensor<float, 4> q_tok({1, Hq, 1, D}), out_tok({1, Hq, 1, D}), want_tok({1, Hq, 1, D});
  for (std::int64_t t = 0; t < steps; ++t) {
    const std::int64_t len = prompt + t + 1;
    for (float& x : q_tok) x = normal(rng);
    att::decode(q_tok, cached(k_cache, len), cached(v_cache, len), out_tok, {}, att::mods::causal{});
    att::reference(q_tok, cached(k_cache, len), cached(v_cache, len), want_tok, {}, att::mods::causal{});
    const double err = max_abs_diff(out_tok, want_tok);
    worst = std::max(worst, err);
    if (t % 10 == 0 || t == steps - 1) std::printf("decode step %2ld: %ld cached tokens, max |decode - reference| = %.3g\n", t, len, err);
  }

  const bool ok = worst < 1e-4;
  std::printf("%s (worst error %.3g)\n", ok ? "ok" : "FAILED", worst);
  return ok ? 0 : 1;
}
