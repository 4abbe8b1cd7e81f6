// bench/decode_rows.cpp — split-KV decode rows.
//
//   decode/split_kv/Lk:../kv:{f32,f16,bf16}/threads:..   attention::decode at the standard decode
//                                                         shapes (Hq = 32, Hkv = 8, D = 128, Lq = 1)
//
// Decode reads every K and V element once and does 4 FLOP per element per query head of the
// group, so it is bound by memory: its bytes/s (the compulsory K/V traffic, bench/README.md) is
// the figure to hold against machine/stream_read at the same thread count, and kv:f16 / kv:bf16
// should run close to twice as fast as kv:f32 (half the bytes). The f32 baselines
// (decode/{reference,eigen,openblas}) are registered by baselines_bench.cpp at the same shapes.
#include "common.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/mods.hpp"

namespace mnemo::bench {
namespace {

template <class KV>
void split_kv_row(benchmark::State& state, const shape& s, int threads) {
  attention_inputs<KV> in(s);
  attention::decode_workspace ws;  // as an inference loop would keep it across steps
  const attention::options opt{0, threads};
  for (auto _ : state) {
    attention::decode<KV>(in.q, in.k, in.v, in.out, in.lse, attention::mods::none{}, opt, ws);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_attention_counters(state, s, threads, dtype_name<KV>(), sizeof(KV));
}

const bool registered = [] {
  register_decode("split_kv", "f32", split_kv_row<float>);
  register_decode("split_kv", "f16", split_kv_row<f16>);
  register_decode("split_kv", "bf16", split_kv_row<bf16>);
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
