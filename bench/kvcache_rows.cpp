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

const bool registered = [] {
  for (kvcache::storage kind : kvcache::all_storages) {
    const std::string name = kvcache::storage_name(kind);
    register_decode("cache_" + name, name,
                    [kind](benchmark::State& state, const shape& s, int t) { cache_row(state, s, t, kind); });
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
