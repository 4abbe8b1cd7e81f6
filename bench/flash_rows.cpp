// bench/flash_rows.cpp — FlashAttention-2 rows (attention/flash.hpp).
//
//   prefill/flash/L:../D:../causal:../threads:..          attention::flash, f32 K/V, at the standard
//                                                          prefill shapes (H = 8, L, D, causal and not)
//   prefill/flash/L:../D:../causal:../kv:f16/threads:..    the same with f16 K/V (compared with the f32
//                                                          baselines: the plot accepts rows that differ
//                                                          only in kv)
//   backward/flash/L:../D:../causal:../threads:..         attention::flash_backward (dq, dk, dv)
//   backward/reference/L:../D:../causal:../threads:..     attention::reference_backward (small size, L = 256)
//
// FLOP/s: forward rows count 2 (D + Dv) per visible (query, key) pair and query head, like every
// prefill row (bench/README.md): 4 Lq Lk D H without a mask, about half with the causal one.
// Backward rows count the five products of FlashAttention-2's backward per visible pair,
// S = Q K^T, dP = dO V^T, dV += P^T dO, dQ += dS K, dK += dS^T Q: 2 (3 D + 2 Dv) FLOP. (The kernel
// recomputes S and dP once more for its dQ pass, so that no two threads add into the same
// gradient; that extra work is not counted.)
#include <string>

#include "common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/flash_backward.hpp"
#include "mnemo/attention/mods.hpp"

namespace mnemo::bench {
namespace {

template <class Mod, class KV>
void run_flash(benchmark::State& state, attention_inputs<KV>& in, const Mod& mod, const attention::options& opt) {
  for (auto _ : state) {
    attention::flash(cview(in.q), in.k, in.v, in.out, in.lse, mod, opt);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
}

template <class KV>
void flash_row(benchmark::State& state, const shape& s, int threads) {
  attention_inputs<KV> in(s);
  const attention::options opt{0, threads};
  if (s.causal) run_flash(state, in, attention::mods::causal{}, opt);
  else run_flash(state, in, attention::mods::none{}, opt);
  set_attention_counters(state, s, threads, dtype_name<KV>(), sizeof(KV));
}

// Inputs of a backward row: the forward's out and lse are computed once, outside the timing.
struct backward_inputs {
  attention_inputs<float> fwd;
  tensor<float, 4> dout, dq, dk, dv;

  backward_inputs(const shape& s, bool causal)
      : fwd(s),
        dout({s.B, s.Hq, s.Lq, s.Dv}),
        dq({s.B, s.Hq, s.Lq, s.D}),
        dk({s.B, s.Hkv, s.Lk, s.D}),
        dv({s.B, s.Hkv, s.Lk, s.Dv}) {
    fill_random(dout, 4);
    if (causal) attention::flash(cview(fwd.q), fwd.k, fwd.v, fwd.out, fwd.lse, attention::mods::causal{});
    else attention::flash(cview(fwd.q), fwd.k, fwd.v, fwd.out, fwd.lse, attention::mods::none{});
  }
};

double backward_flops(const shape& s) {
  return 2.0 * static_cast<double>(3 * s.D + 2 * s.Dv) * static_cast<double>(s.B * s.Hq) * s.visible_pairs();
}

template <class Mod>
void run_backward(benchmark::State& state, backward_inputs& in, const Mod& mod, const attention::options& opt,
                  bool reference) {
  for (auto _ : state) {
    if (reference)
      attention::reference_backward(cview(in.fwd.q), cview(in.fwd.k), cview(in.fwd.v), cview(in.dout), in.dq, in.dk,
                                    in.dv, mod, opt);
    else
      attention::flash_backward(cview(in.fwd.q), cview(in.fwd.k), cview(in.fwd.v), cview(in.fwd.out),
                                cview(in.fwd.lse), cview(in.dout), in.dq, in.dk, in.dv, mod, opt);
    benchmark::DoNotOptimize(in.dq.data());
    benchmark::ClobberMemory();
  }
}

void backward_row(benchmark::State& state, const shape& s, int threads, bool reference) {
  backward_inputs in(s, s.causal);
  const attention::options opt{0, threads};
  if (s.causal) run_backward(state, in, attention::mods::causal{}, opt, reference);
  else run_backward(state, in, attention::mods::none{}, opt, reference);
  // traffic: the forward's inputs and outputs read once, the three gradients written once
  const double bytes = s.bytes(sizeof(float)) * 2;
  set_rate_counters(state, backward_flops(s), bytes);
  state.SetLabel(s.label() + " kv=f32 threads=" + std::to_string(threads));
}

constexpr std::int64_t reference_backward_max_L = 256;

std::string backward_name(const char* impl, const shape& s, int threads) {
  return row_name("backward", impl,
                  {{"L", std::to_string(s.Lq)},
                   {"D", std::to_string(s.D)},
                   {"causal", s.causal ? "1" : "0"},
                   {"threads", std::to_string(threads)}});
}

// prefill/flash/.../kv:f16/threads:t — the standard prefill name with the kv key before threads.
std::string prefill_kv_name(const shape& s, int threads, const char* kv) {
  std::string name = prefill_name("flash", s, threads);
  const std::string tail = "/threads:" + std::to_string(threads);
  return name.substr(0, name.size() - tail.size()) + "/kv:" + kv + tail;
}

const bool registered = [] {
  register_prefill("flash", flash_row<float>);
  register_rows(
      prefill_shapes(), [](const shape& s, int t) { return prefill_kv_name(s, t, "f16"); }, flash_row<f16>,
      [](const shape&) { return true; });
  register_rows(
      prefill_shapes(), [](const shape& s, int t) { return backward_name("flash", s, t); },
      [](benchmark::State& state, const shape& s, int t) { backward_row(state, s, t, false); },
      [](const shape& s) { return s.D == 128; });
  // The double-precision reference backward does about three times the reference forward's work
  // (about 0.3 s an iteration at L = 256): registered only for the small size's L = 256.
  register_rows(
      prefill_shapes(), [](const shape& s, int t) { return backward_name("reference", s, t); },
      [](benchmark::State& state, const shape& s, int t) { backward_row(state, s, t, true); },
      [](const shape& s) { return s.D == 128 && s.Lq <= reference_backward_max_L; });
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
