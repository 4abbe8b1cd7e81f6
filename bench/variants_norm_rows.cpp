// bench/variants_norm_rows.cpp — attention variants with another normaliser (issue 19, A1-A2),
// each beside dense flash at the same shape in the same run:
//
//   variants/flash/pass:fwd/L:../D:../causal:../threads:..      attention::flash (the softmax baseline)
//   variants/sigmoid/pass:fwd/...                               attention::sigmoid_attention (sigmoid.hpp)
//   variants/clipped/pass:fwd/...                               attention::clipped_softmax_attention
//                                                               (clipped.hpp; zeta 1, gamma -0.03: two
//                                                               score passes, about 1.5x flash's work)
//   variants/flash/pass:bwd/...                                 attention::flash_backward
//   variants/sigmoid/pass:bwd/...                               attention::sigmoid_attention_backward
//
// Shapes: B = 1, H = 8, causal and not; small: L = 2048, D = 64; full: L = 4096, D = 64 and 128;
// tiny: L = 64. FLOP/s counts what the softmax row counts at the same shape (forward 2 (D + Dv) per visible
// pair and head, backward 2 (3 D + 2 Dv)), so the counters of one shape compare as times do; the
// clipped row's second score pass and the backward rows' recomputation are not counted.
#include <string>

#include "common.hpp"
#include "mnemo/attention/clipped.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/flash_backward.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/sigmoid.hpp"

namespace mnemo::bench {
namespace {

// The clip of the clipped rows: the paper's zeta = 1 and gamma = -alpha / T with alpha = 2 at a
// training length T = 64 (a weight below 1/32 of the row becomes 0; at L = 4096 nearly all do).
constexpr attention::clipped_softmax bench_clip{1.0f, -0.03f};

enum class impl { flash, sigmoid, clipped };

const char* impl_name(impl i) {
  switch (i) {
    case impl::flash: return "flash";
    case impl::sigmoid: return "sigmoid";
    case impl::clipped: return "clipped";
  }
  return "?";
}

std::vector<shape> variant_shapes() {
  std::vector<shape> out;
  // Small: L = 2048 (a single-thread backward iteration takes about 2 s there; 8.8 s at 4096).
  const std::int64_t L = tiny_size() ? tiny_prefill_L : full_size() ? 4096 : 2048;
  for (std::int64_t D : full_size() ? std::vector<std::int64_t>{64, 128} : std::vector<std::int64_t>{64})
    for (bool causal : {false, true}) out.push_back(prefill_shape(L, D, causal));
  return out;
}

std::string variant_name(impl i, bool backward, const shape& s, int threads) {
  return row_name("variants", impl_name(i),
                  {{"pass", backward ? "bwd" : "fwd"},
                   {"L", std::to_string(s.Lq)},
                   {"D", std::to_string(s.D)},
                   {"causal", s.causal ? "1" : "0"},
                   {"threads", std::to_string(threads)}});
}

template <class Mod>
void forward_loop(benchmark::State& state, impl i, attention_inputs<float>& in, const Mod& mod,
                  const attention::options& opt) {
  for (auto _ : state) {
    switch (i) {
      case impl::flash: attention::flash(cview(in.q), in.k, in.v, in.out, in.lse, mod, opt); break;
      case impl::sigmoid: attention::sigmoid_attention(cview(in.q), in.k, in.v, in.out, mod, opt); break;
      case impl::clipped:
        attention::clipped_softmax_attention(cview(in.q), in.k, in.v, in.out, in.lse, bench_clip, mod, opt);
        break;
    }
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
}

void forward_row(benchmark::State& state, impl i, const shape& s, int threads) {
  attention_inputs<float> in(s);
  const attention::options opt{0, threads};
  if (s.causal) forward_loop(state, i, in, attention::mods::causal{}, opt);
  else forward_loop(state, i, in, attention::mods::none{}, opt);
  set_attention_counters(state, s, threads);
}

// The backward's inputs; flash's out and lse come from one forward outside the timing.
struct backward_inputs {
  attention_inputs<float> fwd;
  tensor<float, 4> dout, dq, dk, dv;
  explicit backward_inputs(const shape& s)
      : fwd(s),
        dout({s.B, s.Hq, s.Lq, s.Dv}),
        dq({s.B, s.Hq, s.Lq, s.D}),
        dk({s.B, s.Hkv, s.Lk, s.D}),
        dv({s.B, s.Hkv, s.Lk, s.Dv}) {
    fill_random(dout, 4);
  }
};

template <class Mod>
void backward_loop(benchmark::State& state, impl i, backward_inputs& in, const Mod& mod,
                   const attention::options& opt) {
  auto& f = in.fwd;
  if (i == impl::flash) attention::flash(cview(f.q), f.k, f.v, f.out, f.lse, mod, opt);
  for (auto _ : state) {
    if (i == impl::flash)
      attention::flash_backward(cview(f.q), cview(f.k), cview(f.v), cview(f.out), cview(f.lse), cview(in.dout),
                                in.dq, in.dk, in.dv, mod, opt);
    else
      attention::sigmoid_attention_backward(cview(f.q), cview(f.k), cview(f.v), cview(in.dout), in.dq, in.dk, in.dv,
                                            mod, opt);
    benchmark::DoNotOptimize(in.dq.data());
    benchmark::ClobberMemory();
  }
}

void backward_row(benchmark::State& state, impl i, const shape& s, int threads) {
  backward_inputs in(s);
  const attention::options opt{0, threads};
  if (s.causal) backward_loop(state, i, in, attention::mods::causal{}, opt);
  else backward_loop(state, i, in, attention::mods::none{}, opt);
  const double flops = 2.0 * static_cast<double>(3 * s.D + 2 * s.Dv) * static_cast<double>(s.B * s.Hq) * s.visible_pairs();
  set_rate_counters(state, flops, s.bytes(sizeof(float)) * 2);
  state.SetLabel(s.label() + " kv=f32 threads=" + std::to_string(threads));
}

const bool registered = [] {
  for (impl i : {impl::flash, impl::sigmoid, impl::clipped})
    register_rows(
        variant_shapes(), [i](const shape& s, int t) { return variant_name(i, false, s, t); },
        [i](benchmark::State& state, const shape& s, int t) { forward_row(state, i, s, t); },
        [](const shape&) { return true; });
  for (impl i : {impl::flash, impl::sigmoid})
    register_rows(
        variant_shapes(), [i](const shape& s, int t) { return variant_name(i, true, s, t); },
        [i](benchmark::State& state, const shape& s, int t) { backward_row(state, i, s, t); },
        [](const shape&) { return true; });
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
