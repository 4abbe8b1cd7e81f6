// 21 — one layer's KV cache in five storage kinds: f32, f16, bf16, and KIVI-style int8 / int4.
//
// The same 2048 tokens go into each cache; one decode step (32 query heads over 8 kv heads, GQA)
// then reads each cache directly: quantized codes are dequantized inside the kernel, never copied
// out in full precision (kvcache/decode.hpp). KIVI (Liu et al. 2024) quantizes keys per channel
// (groups of 128 tokens share a scale and minimum per channel, so outlier channels keep their own
// range) and values per token, and keeps the newest tokens in an f32 residual window.
//
// Printed per kind: the cache's bytes (and the ratio to f16), and the largest difference of the
// attention output from the f32 cache's. The program fails if int4 is not below 0.3 x the f16
// bytes, int8 below 0.55 x, or if the errors do not grow as bits are removed.
//
// Then the int4 cache decodes under a budget with H2O (Zhang et al. 2023): each step's kernel also
// returns the column sums of its probabilities per cache slot (kvcache::column_sums), which the
// H2O tracker accumulates; when a head overflows, the tracker picks the heavy hitters + recent
// slots and the cache and the tracker compact together. No second attention pass, no f32 copy.
// The program fails if a head ever holds more than the budget or the sums are not probabilities.
#include <mnemo/kvcache/cache.hpp>
#include <mnemo/kvcache/decode.hpp>
#include <mnemo/kvcache/policies/h2o.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

namespace kv = mnemo::kvcache;

int main() {
  const std::int64_t Hq = 32, Hkv = 8, D = 128, tokens = 2048;
  std::mt19937 rng(21);
  std::normal_distribution<float> normal;
  mnemo::tensor<float, 3> k({Hkv, tokens, D}), v({Hkv, tokens, D}), q({Hq, 1, D});
  for (float& x : k) x = normal(rng);
  for (float& x : v) x = normal(rng);
  for (float& x : q) x = normal(rng);

  mnemo::tensor<float, 3> exact({Hq, 1, D});
  double bytes[5] = {}, err[5] = {};
  for (kv::storage kind : kv::all_storages) {
    kv::layer_cache cache({.kind = kind, .Hkv = Hkv, .capacity = tokens, .D = D});
    cache.append(k, v);  // positions 0 .. tokens - 1
    mnemo::tensor<float, 3> out({Hq, 1, D});
    kv::decode(cache, q, out);
    if (kind == kv::storage::f32) exact = out;
    const int i = static_cast<int>(kind);
    bytes[i] = static_cast<double>(cache.bytes());
    for (std::int64_t e = 0; e < out.size(); ++e) err[i] = std::max(err[i], double(std::fabs(out.data()[e] - exact.data()[e])));
  }
  const double f16 = bytes[static_cast<int>(kv::storage::f16)];
  std::printf("%-5s %12s %8s %14s\n", "kind", "bytes", "x f16", "max |out - f32|");
  for (kv::storage kind : kv::all_storages) {
    const int i = static_cast<int>(kind);
    std::printf("%-5s %12.0f %8.3f %14.3g\n", kv::storage_name(kind), bytes[i], bytes[i] / f16, err[i]);
  }

  const int i8 = static_cast<int>(kv::storage::int8), i4 = static_cast<int>(kv::storage::int4);
  bool ok = bytes[i4] <= 0.3 * f16 && bytes[i8] <= 0.55 * f16 && err[static_cast<int>(kv::storage::f16)] < err[i8] &&
            err[i8] < err[i4] && err[i4] < 0.1;

  // int4 + H2O under a budget of 3/4 of the prompt, the recent 64 slots always kept.
  const std::int64_t budget = tokens * 3 / 4, recent = 64, steps = 16;
  kv::layer_cache cache({.kind = kv::storage::int4, .Hkv = Hkv, .capacity = tokens + 1, .D = D});
  cache.append(k, v);
  kv::policies::h2o::decoder tracker(Hkv, recent);
  for (std::int64_t h = 0; h < Hkv; ++h)
    for (std::int64_t j = 0; j < tokens; ++j) tracker.append(h);
  mnemo::attention::decode_workspace ws;
  mnemo::tensor<float, 3> k_new({Hkv, 1, D}), v_new({Hkv, 1, D}), out({Hq, 1, D});
  mnemo::tensor<float, 2> sums({Hq, tokens + 1});
  double worst_total = 0;
  for (std::int64_t step = 0; step < steps; ++step) {
    for (float& x : k_new) x = normal(rng);
    for (float& x : v_new) x = normal(rng);
    for (float& x : q) x = normal(rng);
    cache.append(k_new, v_new);
    for (std::int64_t h = 0; h < Hkv; ++h) tracker.append(h);
    kv::decode(cache, q, out, {}, {}, ws, kv::column_sums{sums.as_view(), 0});
    for (std::int64_t h = 0; h < Hq; ++h) {  // each query head's probabilities sum to 1
      double total = 0;
      for (std::int64_t j = 0; j < cache.max_length(); ++j) total += sums(h, j);
      worst_total = std::max(worst_total, std::fabs(total - 1.0));
    }
    tracker.observe(sums.as_view().narrow(1, 0, cache.max_length()));
    if (kv::policies::should_compress(cache.lengths(), budget)) {
      const kv::selection keep = tracker.select(budget);
      cache.compact(keep);
      tracker.compact(keep);
    }
    ok = ok && cache.max_length() <= budget;
  }
  ok = ok && worst_total < 1e-4;
  std::printf("int4 + H2O: %lld steps, %lld slots per head (budget %lld), %.0f bytes, sums within %.1e of 1\n",
              static_cast<long long>(steps), static_cast<long long>(cache.max_length()), static_cast<long long>(budget),
              static_cast<double>(cache.bytes()), worst_total);
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
