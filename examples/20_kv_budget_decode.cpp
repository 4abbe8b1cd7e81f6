// 20 — decode under a fixed KV memory budget: SnapKV compresses the prompt, StreamingLLM-style
// eviction keeps the cache at the budget while generating.
//
// One layer, Hq = 8 query heads over Hkv = 2 kv heads, a prompt of 1024 tokens, a budget of 128
// slots per kv head (1/8 of the prompt), the cache stored in f16:
//   prefill  the prompt attends causally to itself (FlashAttention-2). The same pass returns the
//            column sums of the last 32 queries' attention (attention::column_sums), which is all
//            SnapKV (Li et al. 2024) needs: pool them, keep the 128 best slots per head (the
//            32-query window always among them), compact the cache to those.
//   decode   each step appends its key/value; when a head exceeds the budget, StreamingLLM's rule
//            (Xiao et al. 2024) keeps the 4 attention sinks + the newest slots, and the cache
//            compacts in place. The decode kernel reads the compact f16 cache directly.
// Every step prints the cache memory and the relative error of the attention output against
// attention over the full, uncompressed history (what the budget costs in accuracy). The
// synthetic context is built so that the decode queries look for what the prompt's last queries
// looked at (a topic direction both lean on), the case SnapKV is designed for.
//
// The program fails if the cache ever holds more than the budget, or if the error leaves the
// range a budget of 1/8 should give on this context.
#include <mnemo/attention/decode.hpp>
#include <mnemo/attention/flash.hpp>
#include <mnemo/kvcache/cache.hpp>
#include <mnemo/kvcache/decode.hpp>
#include <mnemo/kvcache/policies/snapkv.hpp>
#include <mnemo/kvcache/policies/streaming_llm.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace att = mnemo::attention;
namespace kv = mnemo::kvcache;
namespace pol = mnemo::kvcache::policies;
using mnemo::tensor;

int main() {
  const std::int64_t Hq = 8, Hkv = 2, D = 64, prompt = 1024, steps = 24, budget = 128;
  const std::int64_t window = 32, n_sink = 4, total = prompt + steps;
  // Relative error a 1/8 budget stays within on this context (measured 0.03-0.52 per step).
  const double max_error = 0.75;

  std::mt19937 rng(20);
  std::normal_distribution<float> normal;
  std::vector<float> topic(D);
  for (auto& x : topic) x = normal(rng) / std::sqrt(static_cast<float>(D));
  const float lean = 24.0f;  // how strongly queries lean on the topic (and a few keys lie along it)

  // The whole history in f32: the uncompressed reference the error is measured against.
  tensor<float, 4> q({1, Hq, total, D}), k({1, Hkv, total, D}), v({1, Hkv, total, D});
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = normal(rng);
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < total; ++i)
      for (std::int64_t c = 0; c < D; ++c) q(0, h, i, c) += lean * topic[c];
  for (std::int64_t h = 0; h < Hkv; ++h)
    for (std::int64_t j = 0; j < prompt; j += 16)  // every 16th prompt token is on topic
      for (std::int64_t c = 0; c < D; ++c) k(0, h, j, c) += 0.25f * lean * topic[c];

  // Prefill: one flash pass gives the prompt's outputs and SnapKV's observation.
  const mnemo::view<const float, 4> q_prompt = mnemo::cview(q).narrow(2, 0, prompt);
  const mnemo::view<const float, 4> k_prompt = mnemo::cview(k).narrow(2, 0, prompt), v_prompt = mnemo::cview(v).narrow(2, 0, prompt);
  tensor<float, 4> out_prompt({1, Hq, prompt, D});
  tensor<float, 3> sums({1, Hq, prompt});
  att::flash<float>(q_prompt, k_prompt, v_prompt, out_prompt.as_view(), {}, att::mods::causal{}, {},
                    att::column_sums{sums.as_view(), window});
  const pol::observation obs{k_prompt[0], v_prompt[0], {}, mnemo::cview(sums)[0]};
  const kv::selection kept = pol::snapkv{window, 5}.select(obs, budget);

  kv::layer_cache cache({.kind = kv::storage::f16, .Hkv = Hkv, .capacity = prompt, .D = D});
  cache.append(k_prompt[0], v_prompt[0]);
  const std::int64_t prompt_bytes = cache.bytes();
  cache.compact(kept);
  std::printf("prefill: %lld tokens, %lld bytes in f16 -> SnapKV keeps %lld per head, %lld bytes\n",
              static_cast<long long>(prompt), static_cast<long long>(prompt_bytes), static_cast<long long>(budget),
              static_cast<long long>(cache.bytes()));

  const pol::streaming_llm evict{n_sink};
  tensor<float, 3> out({Hq, 1, D});
  tensor<float, 4> out_full({1, Hq, 1, D});
  att::decode_workspace ws;
  int failures = 0;
  std::printf("step  slots/head  cache bytes  full-history bytes  rel. error\n");
  for (std::int64_t t = prompt; t < total; ++t) {
    cache.append(mnemo::cview(k)[0].narrow(1, t, 1), mnemo::cview(v)[0].narrow(1, t, 1));
    if (pol::should_compress(cache.lengths(), budget)) cache.compact(evict.keep(cache.lengths(), budget));

    const mnemo::view<const float, 4> q_t = mnemo::cview(q).narrow(2, t, 1);
    kv::decode(cache, q_t[0], out.as_view());
    att::decode<float>(q_t, mnemo::cview(k).narrow(2, 0, t + 1), mnemo::cview(v).narrow(2, 0, t + 1), out_full.as_view(),
                       {}, att::mods::none{}, {}, ws);
    double err = 0, ref = 0;
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t c = 0; c < D; ++c) {
        err += std::pow(static_cast<double>(out(h, 0, c)) - out_full(0, h, 0, c), 2);
        ref += std::pow(static_cast<double>(out_full(0, h, 0, c)), 2);
      }
    const double rel = std::sqrt(err / ref);
    const long long full_bytes = static_cast<long long>(Hkv * (t + 1) * 2 * D * 2);  // K and V in f16
    std::printf("%4lld  %10lld  %11lld  %18lld  %10.4f\n", static_cast<long long>(t - prompt), static_cast<long long>(cache.max_length()),
                static_cast<long long>(cache.bytes()), full_bytes, rel);
    if (cache.max_length() > budget || !(rel < max_error)) ++failures;
  }
  if (failures) {
    std::printf("FAILED: %d steps over the budget or with error >= %.2f\n", failures, max_error);
    return 1;
  }
  std::printf("every step within %lld slots per head\n", static_cast<long long>(budget));
  return 0;
}
