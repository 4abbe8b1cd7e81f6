// bench/kvcache_rows.cpp — decode straight from a kvcache::layer_cache in every storage kind.
//
//   decode/cache_<kind>/Lk:../kv:<kind>/threads:..   kvcache::decode at the standard decode shapes
//                                                     (Hq = 32, Hkv = 8, D = 128, Lq = 1), kind in
//                                                     f32, f16, bf16, int8, int4
//
// Counters: FLOP/s as every decode row; bytes/s counts q and out in f32 plus the bytes the cache
// actually holds (layer_cache::bytes(): codes, scales, minimums and the f32 residual window for
// int8 / int4), so it is comparable with machine/stream_read; cache_bytes_per_token is that cache
// size per token per kv head (K and V together; f16 = 4 D = 512 at D = 128). Decode is bound by
// memory, so cache_int8 / cache_int4 should beat cache_f32 by about the ratio of their bytes, as
// long as dequantizing inside the kernel keeps the compute below the memory time. All five kinds
// are registered together so their ratios come from one run.
//
//   kvcache_error/<kind>/rotation:<r>/queries:<q>/group:<g>/threads:1
//                                   output error of kvcache::decode from a quantized cache (kind
//                                   int8, int4, int2), with and without the Hadamard rotation (r in
//                                   none, hadamard: keys and values rotated, kvcache/rotation.hpp),
//                                   against the same decode from an f32 cache of the same tokens.
//                                   Synthetic keys with outlier channels: N(0, 1) with 4 of the D =
//                                   128 channels scaled 20x around an offset of one unit (the
//                                   massive channels of trained models' keys); values N(0, 1).
//                                   Queries (Hq = 32, Hkv = 8, Lq = 16 rows, Lk = 4096): iid N(0, 1)
//                                   or aligned (the keys' outlier channels scaled 4x, as queries of
//                                   trained models share them). g: tokens per key group and channels
//                                   per value group (128, the default, and KIVI's 32).
// Counters: rel_error = ||out - out_f32||_2 / ||out_f32||_2 over all heads and rows, computed once;
// the time is the quantized decode call (the rotated one includes rotating q and out).
#include <random>

#include "common.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/decode.hpp"

namespace mnemo::bench {
namespace {

void cache_row(benchmark::State& state, const shape& s, int threads, kvcache::storage kind) {
  kvcache::cache_config cfg;
  cfg.kind = kind;
  cfg.Hkv = s.Hkv;
  cfg.capacity = s.Lk;
  cfg.D = s.D;
  cfg.Dv = s.Dv;
  kvcache::layer_cache c(cfg);
  {
    // Filled in slices of 4096 tokens, so the f32 staging stays small next to the cache.
    constexpr std::int64_t slice = 4096;
    for (std::int64_t t0 = 0; t0 < s.Lk; t0 += slice) {
      const std::int64_t n = std::min(slice, s.Lk - t0);
      tensor<float, 3> k({s.Hkv, n, s.D}), v({s.Hkv, n, s.Dv});
      fill_random(k, 2 + static_cast<std::uint64_t>(t0));
      fill_random(v, 3 + static_cast<std::uint64_t>(t0));
      c.append(k, v);
    }
  }
  tensor<float, 3> q({s.Hq, s.Lq, s.D}), out({s.Hq, s.Lq, s.Dv});
  tensor<float, 2> lse({s.Hq, s.Lq});
  fill_random(q, 1);
  attention::decode_workspace ws;
  const attention::options opt{0, threads};
  for (auto _ : state) {
    kvcache::decode(c, q, out, lse, opt, ws);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double qo = static_cast<double>(s.Hq * s.Lq * (s.D + s.Dv)) * sizeof(float);
  set_rate_counters(state, s.flops(), qo + static_cast<double>(c.bytes()));
  state.counters["cache_bytes_per_token"] = static_cast<double>(c.bytes()) / static_cast<double>(s.Hkv * s.Lk);
  std::string label = s.label();
  label.append(" kv=").append(kvcache::storage_name(kind)).append(" threads=").append(std::to_string(threads));
  state.SetLabel(label);
}

// The synthetic problem of the kvcache_error rows (see the header).
struct error_problem {
  static constexpr std::int64_t Hq = 32, Hkv = 8, Lq = attention::decode_max_rows, Lk = 4096, D = 128;
  static constexpr std::int64_t outlier_channels = 4;
  static constexpr float key_scale = 20.0f, key_offset = 1.0f, aligned_query_scale = 4.0f;
  tensor<float, 3> k{{Hkv, Lk, D}}, v{{Hkv, Lk, D}}, q{{Hq, Lq, D}};

  explicit error_problem(bool aligned) {
    std::mt19937 rng(17);
    std::normal_distribution<float> normal;
    for (float& x : k) x = normal(rng);
    for (float& x : v) x = normal(rng);
    for (float& x : q) x = normal(rng);
    scale_outliers(k, key_scale, key_offset);
    if (aligned) scale_outliers(q, aligned_query_scale, 0.0f);
  }
  static void scale_outliers(tensor<float, 3>& t, float scale, float offset) {
    for (std::int64_t h = 0; h < t.extent(0); ++h)
      for (std::int64_t j = 0; j < t.extent(1); ++j)
        for (std::int64_t c = 0; c < outlier_channels; ++c) {
          float& x = t(h, j, (c * 37 + 5) % D);  // spread over the head dim
          x = scale * (x + offset);
        }
  }
};

void error_row(benchmark::State& state, kvcache::storage kind, kvcache::rotation rot, bool aligned, std::int64_t group) {
  using P = error_problem;
  const P p(aligned);
  kvcache::cache_config cfg;
  cfg.Hkv = P::Hkv;
  cfg.capacity = P::Lk;
  cfg.D = P::D;
  kvcache::layer_cache exact(cfg);
  cfg.kind = kind;
  cfg.quant = {group, group, std::max<std::int64_t>(group, 128)};
  cfg.rotate.kind = rot;
  kvcache::layer_cache c(cfg);
  exact.append(p.k, p.v);
  c.append(p.k, p.v);
  tensor<float, 3> want({P::Hq, P::Lq, P::D}), out({P::Hq, P::Lq, P::D});
  kvcache::decode(exact, p.q, want);
  kvcache::decode(c, p.q, out);
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < out.size(); ++i) {
    const double d = static_cast<double>(out.data()[i]) - want.data()[i];
    num += d * d;
    den += static_cast<double>(want.data()[i]) * want.data()[i];
  }
  attention::decode_workspace ws;
  const attention::options opt{0, 1};
  for (auto _ : state) {
    kvcache::decode(c, p.q, out, {}, opt, ws);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["rel_error"] = den > 0 ? std::sqrt(num / den) : 0.0;
  state.SetLabel(std::string(kvcache::storage_name(kind)) + " rotation=" + kvcache::rotation_name(rot) +
                 (aligned ? " queries=aligned" : " queries=iid") + " group=" + std::to_string(group));
}

const bool registered = [] {
  for (kvcache::storage kind : kvcache::all_storages) {
    const std::string name = kvcache::storage_name(kind);
    register_decode("cache_" + name, name,
                    [kind](benchmark::State& state, const shape& s, int t) { cache_row(state, s, t, kind); });
  }
  for (kvcache::storage kind : {kvcache::storage::int8, kvcache::storage::int4, kvcache::storage::int2})
    for (std::int64_t group : {128, 32})
      for (bool aligned : {false, true})
        for (kvcache::rotation rot : {kvcache::rotation::none, kvcache::rotation::hadamard})
          register_row(row_name("kvcache_error", kvcache::storage_name(kind),
                                {{"rotation", kvcache::rotation_name(rot)},
                                 {"queries", aligned ? "aligned" : "iid"},
                                 {"group", std::to_string(group)},
                                 {"threads", "1"}}),
                       [=](benchmark::State& st) { error_row(st, kind, rot, aligned, group); });
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
