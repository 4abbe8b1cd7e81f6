// bench/variants_terms_rows.cpp — the score terms of attention/score_terms.hpp in flash, beside
// plain flash at the same shape (H = 8, causal, L from the prefill sizes, D = 64 and 128):
//
//   variants/flash/L:../D:../causal:1/threads:..                plain flash with the causal mask
//   variants/forgetting/...                                     FoX gate (mods::forgetting)
//   variants/forgetting_backward/...                            forgetting_backward (dq, dk, dv, d log f)
//   variants/flash_backward/...                                 plain causal flash_backward, to compare
//                                                               (both D = 64, L <= 1024)
//   variants/temperature/...                                    per-query x per-head temperature, causal
//   variants/relative_xl/...                                    Transformer-XL terms (N = L, u, v), causal
//   variants/relative_shaw/...                                  Shaw's clipped terms (k = 16), causal
//   variants/alibi_two_sided/...                                two-sided ALiBi slopes, causal
//
// FLOP/s count what plain flash counts (2 (D + Dv) per visible pair; backward rows 2 (3 D + 2 Dv)),
// so a row's rate against variants/flash is its speed relative to dense flash.
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/flash_backward.hpp"
#include "mnemo/attention/score_terms.hpp"

namespace mnemo::bench {
namespace {

// Per-row extra inputs of the terms (made outside the timing).
struct term_inputs {
  tensor<float, 3> log_f;    // [1, Hq, L]
  tensor<float, 2> tq;       // [Hq, L]
  tensor<float, 1> th;       // [Hq]
  tensor<float, 3> r_xl;     // [Hq, L, D]
  tensor<float, 3> r_shaw;   // [1, 33, D]
  tensor<float, 2> u, vb;    // [Hq, D]
  std::vector<float> slopes, ahead;

  explicit term_inputs(const shape& s)
      : log_f({1, s.Hq, s.Lk}),
        tq({s.Hq, s.Lq}),
        th({s.Hq}),
        r_xl({s.Hq, s.Lk, s.D}),
        r_shaw({1, 2 * shaw_k + 1, s.D}),
        u({s.Hq, s.D}),
        vb({s.Hq, s.D}),
        slopes(attention::mods::alibi_slopes(s.Hq)),
        ahead(slopes) {
    fill_random(log_f, 11);
    for (float& x : log_f) x = -0.05f * (x + 1.5f);  // log f in [-0.125, -0.025]
    fill_random(tq, 12);
    for (float& x : tq) x = 1.0f + 0.5f * x;
    fill_random(th, 13);
    for (float& x : th) x = 1.0f + 0.5f * x;
    fill_random(r_xl, 14);
    fill_random(r_shaw, 15);
    fill_random(u, 16);
    fill_random(vb, 17);
    for (float& x : ahead) x *= 0.5f;
  }
  static constexpr std::int64_t shaw_k = 16;
};

enum class term { none, forgetting, temperature, relative_xl, relative_shaw, alibi_two_sided };

template <class Mod>
void time_flash(benchmark::State& state, attention_inputs<float>& in, const Mod& mod, const attention::options& opt) {
  for (auto _ : state) {
    attention::flash(cview(in.q), in.k, in.v, in.out, in.lse, mod, opt);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
}

void forward_row(benchmark::State& state, const shape& s, int threads, term t) {
  attention_inputs<float> in(s);
  term_inputs x(s);
  const attention::options opt{0, threads};
  namespace mods = attention::mods;
  switch (t) {
    case term::none: time_flash(state, in, mods::causal{}, opt); break;
    case term::forgetting: time_flash(state, in, mods::forgetting(cview(x.log_f)[0]), opt); break;
    case term::temperature:
      time_flash(state, in,
                 mods::all_of(mods::query_temperature{cview(x.tq), 0}, mods::head_temperature{cview(x.th)},
                              mods::causal{}),
                 opt);
      break;
    case term::relative_xl:
      time_flash(state, in,
                 mods::all_of(mods::relative_position(cview(in.q)[0], cview(in.k)[0], cview(x.r_xl), cview(x.u),
                                                      cview(x.vb), 0),
                              mods::causal{}),
                 opt);
      break;
    case term::relative_shaw:
      time_flash(state, in,
                 mods::all_of(mods::relative_position(cview(in.q)[0], cview(in.k)[0], cview(x.r_shaw), {}, {},
                                                      -term_inputs::shaw_k),
                              mods::causal{}),
                 opt);
      break;
    case term::alibi_two_sided: {
      const mods::alibi_two_sided m{view<const float, 1>(x.slopes.data(), {s.Hq}),
                                    view<const float, 1>(x.ahead.data(), {s.Hq})};
      time_flash(state, in, mods::all_of(m, mods::causal{}), opt);
      break;
    }
  }
  set_attention_counters(state, s, threads);
}

void backward_row(benchmark::State& state, const shape& s, int threads, bool fox) {
  attention_inputs<float> in(s);
  term_inputs x(s);
  tensor<float, 4> dout({s.B, s.Hq, s.Lq, s.Dv}), dq({s.B, s.Hq, s.Lq, s.D}), dk({s.B, s.Hkv, s.Lk, s.D}),
      dv({s.B, s.Hkv, s.Lk, s.Dv});
  tensor<float, 3> dlog_f({s.B, s.Hq, s.Lk});
  fill_random(dout, 4);
  const attention::options opt{0, threads};
  if (fox) {
    attention::forgetting_attention<float>(cview(in.q), cview(in.k), cview(in.v), cview(x.log_f), in.out, in.lse, opt,
                                           attention::path::flash);
    for (auto _ : state) {
      attention::forgetting_backward(cview(in.q), cview(in.k), cview(in.v), cview(x.log_f), cview(in.out),
                                     cview(in.lse), cview(dout), dq, dk, dv, dlog_f, opt);
      benchmark::DoNotOptimize(dlog_f.data());
      benchmark::ClobberMemory();
    }
  } else {
    attention::flash(cview(in.q), in.k, in.v, in.out, in.lse, attention::mods::causal{}, opt);
    for (auto _ : state) {
      attention::flash_backward(cview(in.q), cview(in.k), cview(in.v), cview(in.out), cview(in.lse), cview(dout), dq,
                                dk, dv, attention::mods::causal{}, opt);
      benchmark::DoNotOptimize(dq.data());
      benchmark::ClobberMemory();
    }
  }
  const double flops = 2.0 * static_cast<double>(3 * s.D + 2 * s.Dv) * static_cast<double>(s.B * s.Hq) * s.visible_pairs();
  set_rate_counters(state, flops, s.bytes(sizeof(float)) * 2);
  state.SetLabel(s.label() + " kv=f32 threads=" + std::to_string(threads));
}

std::string variants_name(const char* impl, const shape& s, int threads) {
  return row_name("variants", impl,
                  {{"L", std::to_string(s.Lq)},
                   {"D", std::to_string(s.D)},
                   {"causal", "1"},
                   {"threads", std::to_string(threads)}});
}

// The prefill shapes with the causal mask (the terms are causal here: FoX needs it).
std::vector<shape> causal_shapes() {
  std::vector<shape> out;
  for (const shape& s : prefill_shapes())
    if (s.causal) out.push_back(s);
  return out;
}

const bool registered = [] {
  const std::vector<std::pair<const char*, term>> forwards = {
      {"flash", term::none},
      {"forgetting", term::forgetting},
      {"temperature", term::temperature},
      {"relative_xl", term::relative_xl},
      {"relative_shaw", term::relative_shaw},
      {"alibi_two_sided", term::alibi_two_sided}};
  for (const auto& [impl, t] : forwards)
    register_rows(
        causal_shapes(), [impl = impl](const shape& s, int th) { return variants_name(impl, s, th); },
        [t = t](benchmark::State& state, const shape& s, int th) { forward_row(state, s, th, t); },
        [](const shape&) { return true; });
  for (bool fox : {false, true})
    register_rows(
        causal_shapes(),
        [fox](const shape& s, int th) { return variants_name(fox ? "forgetting_backward" : "flash_backward", s, th); },
        [fox](benchmark::State& state, const shape& s, int th) { backward_row(state, s, th, fox); },
        // at L = 4096 one backward iteration takes over 4 s on one core: L <= 1024 only
        [](const shape& s) { return s.D == 64 && s.Lq <= 1024; });
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
