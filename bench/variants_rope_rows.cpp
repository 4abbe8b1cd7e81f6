// bench/variants_rope_rows.cpp — RoPE frequency schemes and Self-Extend (issue 19, B7 / B8).
//
//   variants/rope_<scheme>/L:../H:8/D:128/threads:t         kvcache::apply_rope on x [H, L, D] at
//       positions 0 .. L - 1, full rotary dim, half-split; scheme none, linear, dynamic, yarn,
//       llama3, longrope (the frequencies are computed once a call; the cost is the cos / sin of
//       L x D / 2 angles, one per 16 consecutive positions exact and the rest a double step, and
//       the f32 rotation of H rows per position). bytes/s counts x read and written once.
//   variants/flash_dense/L:../D:128/causal:1/threads:t      attention::flash, causal, H = 8 (the baseline)
//   variants/rope_flash/L:../D:128/causal:1/threads:t       what a RoPE model runs without Self-Extend:
//       copies of q and k rotated by apply_rope, then the causal flash
//   variants/self_extend/L:../D:128/causal:1/W:512/G:8/threads:t     attention::self_extend prefill (un-rotated
//       q and k in; four rotated copies, the neighbour pass over the band of W keys, the grouped pass
//       over the rest, the merge)
//   L = 4096 (full), 1024 (small), 64 (tiny). FLOP/s of the attention rows: the causal pairs,
//   2 (D + Dv) per pair and head, for all three (Self-Extend's band-edge tiles computed twice are
//   not counted). Ratio table:
//     bench/plot out.json --filter '^variants/(flash_dense|rope_flash|self_extend)/' --baseline flash_dense --ignore-for-baseline W,G
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/self_extend.hpp"
#include "mnemo/kvcache/rope.hpp"

namespace mnemo::bench {
namespace {

namespace kv = kvcache;

constexpr std::int64_t variants_H = 8, variants_D = 128, self_extend_window = 512, self_extend_group = 8;

std::int64_t variants_L() { return full_size() ? 4096 : tiny_size() ? tiny_prefill_L : 1024; }

std::vector<std::int64_t> positions_of(std::int64_t L) {
  std::vector<std::int64_t> p(static_cast<std::size_t>(L));
  for (std::int64_t t = 0; t < L; ++t) p[static_cast<std::size_t>(t)] = t;
  return p;
}

std::vector<double> ramp(std::int64_t n, double first, double last) {
  std::vector<double> e(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    e[static_cast<std::size_t>(i)] = first + (last - first) * static_cast<double>(i) / static_cast<double>(n - 1);
  return e;
}

// The schemes with the parameters the models ship (Llama 3.1, Qwen-style YaRN, Phi-3's LongRoPE
// lists stand-ins).
std::vector<std::pair<std::string, kv::rope>> bench_schemes() {
  return {
      {"none", {}},
      {"linear", {.scaling = kv::rope_scaling::linear, .factor = 4.0}},
      {"dynamic", {.scaling = kv::rope_scaling::dynamic, .factor = 2.0, .original_context = 2048}},
      {"yarn", {.scaling = kv::rope_scaling::yarn, .factor = 4.0, .original_context = 32768}},
      {"llama3", {.base = 500000.0, .scaling = kv::rope_scaling::llama3, .factor = 8.0, .original_context = 8192}},
      {"longrope",
       {.scaling = kv::rope_scaling::longrope, .factor = 32.0, .original_context = 4096,
        .short_factor = ramp(variants_D / 2, 1.0, 1.5), .long_factor = ramp(variants_D / 2, 1.0, 40.0)}},
  };
}

void rope_row(benchmark::State& state, const kv::rope& r, std::int64_t L, int threads) {
  tensor<float, 3> x0({variants_H, L, variants_D});
  fill_random(x0, 1);
  tensor<float, 3> x = x0;
  const auto pos = positions_of(L);
  for (auto _ : state) {
    state.PauseTiming();  // af > 1 (yarn, longrope) would grow x over many calls
    std::copy(x0.data(), x0.data() + x0.size(), x.data());
    state.ResumeTiming();
    kv::apply_rope(r, x, pos, threads);
    benchmark::DoNotOptimize(x.data());
    benchmark::ClobberMemory();
  }
  set_rate_counters(state, 0, 2.0 * static_cast<double>(x.size()) * sizeof(float));
  state.SetLabel("H=" + std::to_string(variants_H) + " L=" + std::to_string(L) + " D=" + std::to_string(variants_D) +
                 " threads=" + std::to_string(threads));
}

enum class attention_impl { flash_dense, rope_flash, self_extend };

void attention_row(benchmark::State& state, attention_impl impl, std::int64_t L, int threads) {
  const shape s = prefill_shape(L, variants_D, true, variants_H);
  attention_inputs<float> in(s);
  const attention::options opt{0, threads};
  const auto pos = positions_of(L);
  const attention::self_extend_options se{.window = self_extend_window, .group = self_extend_group};
  for (auto _ : state) {
    switch (impl) {
      case attention_impl::flash_dense:
        attention::flash(cview(in.q), in.k, in.v, in.out, in.lse, attention::mods::causal{}, opt);
        break;
      case attention_impl::rope_flash: {
        tensor<float, 4> q = in.q, k = in.k;
        kv::apply_rope({}, view<float, 3>(q.data(), {s.Hq, L, s.D}), pos, threads);
        kv::apply_rope({}, view<float, 3>(k.data(), {s.Hkv, L, s.D}), pos, threads);
        attention::flash(cview(q), k, in.v, in.out, in.lse, attention::mods::causal{}, opt);
        break;
      }
      case attention_impl::self_extend:
        attention::self_extend(in.q, in.k, in.v, in.out, in.lse, se, opt);
        break;
    }
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_attention_counters(state, s, threads);
}

const bool registered = [] {
  const std::int64_t L = variants_L();
  for (const auto& [scheme, r] : bench_schemes())
    for (int t : thread_counts())
      register_row(row_name("variants", "rope_" + scheme,
                            {{"L", std::to_string(L)},
                             {"H", std::to_string(variants_H)},
                             {"D", std::to_string(variants_D)},
                             {"threads", std::to_string(t)}}),
                   [r, L, t](benchmark::State& state) {
                     if (threads_available(state, t)) rope_row(state, r, L, t);
                   });
  for (int t : thread_counts()) {
    for (auto [impl, name] : {std::pair{attention_impl::flash_dense, "flash_dense"},
                              std::pair{attention_impl::rope_flash, "rope_flash"}})
      register_row(row_name("variants", name,
                            {{"L", std::to_string(L)},
                             {"D", std::to_string(variants_D)},
                             {"causal", "1"},
                             {"threads", std::to_string(t)}}),
                   [impl, L, t](benchmark::State& state) {
                     if (threads_available(state, t)) attention_row(state, impl, L, t);
                   });
    register_row(row_name("variants", "self_extend",
                          {{"L", std::to_string(L)},
                           {"D", std::to_string(variants_D)},
                           {"causal", "1"},
                           {"W", std::to_string(self_extend_window)},
                           {"G", std::to_string(self_extend_group)},
                           {"threads", std::to_string(t)}}),
                 [L, t](benchmark::State& state) {
                   if (threads_available(state, t)) attention_row(state, attention_impl::self_extend, L, t);
                 });
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
