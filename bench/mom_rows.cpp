// bench/mom_rows.cpp — rows of the Mixture of Memories (include/mnemo/linear/mom.hpp).
//
//   mom/mom/member:<m>/L:<L>/H:8/D:128/M:4/top_k:2/threads:1     linear::mom, M = 4 routed memories, no
//                                                               shared memory, one router per token
//                                                               (random logits), member m in
//                                                               {linear_attn, gated_delta_rule}
//   mom/member/member:<m>/L:<L>/H:8/D:128/threads:1              the member alone (its chunked form) on
//                                                               the same L tokens: `--baseline member`
//
// B = 1, Dk = Dv = D = 128, f32, the members' default chunk sizes; full: L = 8192, small: 2048,
// tiny: 64. Counters: `tokens/s` = H L per iteration, and `FLOP/s` counted as bench/linear_rows.cpp
// counts the member's chunked form, summed over the memories' subsequences (memory m's n_m
// tokens in chunks of the member's default size; sum n_m = top_k L), so a MoM row's FLOP rate is
// comparable with its member's: the gathers, the weighted scatter and the routing are the
// difference. (The count repeats linear_rows.cpp's formula: that file keeps it in its own
// anonymous namespace.)
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/linear/mom.hpp"

namespace mnemo::bench {
namespace {

constexpr std::int64_t heads = 8, head_dim = 128, memories = 4, top_k = 2;

// Gates and betas as linear_rows.cpp's: log-decays in [-0.1, 0], beta in [0.05, 1].
constexpr float gate_lo = -0.1f, beta_lo = 0.05f;

std::int64_t mom_L() { return full_size() ? 8192 : tiny_size() ? tiny_prefill_L : 2048; }

// linear_rows.cpp's count of the chunked algorithm's FLOPs for one head over n tokens in chunks of C.
double chunked_flops(bool delta, std::int64_t n_tokens, std::int64_t C) {
  double total = 0;
  const double dk = static_cast<double>(head_dim), dv = static_cast<double>(head_dim);
  for (std::int64_t t0 = 0; t0 < n_tokens; t0 += C) {
    const double n = static_cast<double>(std::min(C, n_tokens - t0));
    total += delta ? 6 * n * dk * dv + n * (n + 1) * (dk + dv) + n * (n - 1) * (dk + dv)
                   : 4 * n * dk * dv + n * (n + 1) * (dk + dv);
  }
  return total;
}

struct mom_inputs {
  tensor<float, 4> q, o, state;                   // [1, H, L, D], [1, H, L, D], [1, H M, D, D]
  std::vector<tensor<float, 4>> k, v;             // M x [1, H, L, D]
  std::vector<tensor<float, 3>> g, beta;          // M x [1, H, L]
  tensor<float, 3> logits;                        // [1, L, M]
  std::vector<linear::mom_memory<float>> mems;

  explicit mom_inputs(std::int64_t L)
      : q({1, heads, L, head_dim}), o({1, heads, L, head_dim}), state({1, heads * memories, head_dim, head_dim}),
        logits({1, L, memories}) {
    fill_random(q, 31);
    fill_random(logits, 32, -2.0f, 2.0f);
    for (std::int64_t m = 0; m < memories; ++m) {
      k.emplace_back(shape_t<4>{1, heads, L, head_dim});
      v.emplace_back(shape_t<4>{1, heads, L, head_dim});
      g.emplace_back(shape_t<3>{1, heads, L});
      beta.emplace_back(shape_t<3>{1, heads, L});
      fill_random(k[m], 40 + m);
      fill_random(v[m], 50 + m);
      fill_random(g[m], 60 + m, gate_lo, 0.0f);
      fill_random(beta[m], 70 + m, beta_lo, 1.0f);
    }
    for (std::int64_t m = 0; m < memories; ++m) mems.push_back({k[m], v[m], g[m], beta[m]});
  }

  // Tokens routed to each memory (what the FLOP count needs).
  std::vector<std::int64_t> routed_tokens() const {
    std::vector<std::int64_t> n(memories, 0), sel(top_k);
    std::vector<float> w(top_k);
    for (std::int64_t t = 0; t < logits.extent(1); ++t) {
      linear::mom_select(logits.as_view().ptr(0, t), memories, top_k, sel.data(), w.data());
      for (std::int64_t s : sel) ++n[s];
    }
    return n;
  }
};

template <class Member>
void set_mom_counters(benchmark::State& state, std::int64_t L, double flops, const char* what) {
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(heads * L), benchmark::Counter::kIsIterationInvariantRate);
  set_rate_counters(state, flops, 0);
  state.SetLabel("B=1 H=" + std::to_string(heads) + " L=" + std::to_string(L) + " Dk=" + std::to_string(head_dim) +
                 " Dv=" + std::to_string(head_dim) + " member=" + Member::name + " " + what + " threads=1");
}

template <class Member>
constexpr std::int64_t member_chunk() {
  return Member::uses_beta ? linear::delta_default_chunk_size : linear::default_chunk_size;
}

template <class Member>
void mom_row(benchmark::State& state, std::int64_t L) {
  mom_inputs in(L);
  linear::options opt;
  opt.threads = 1;
  opt.use_qk_l2norm = Member::uses_beta;  // as linear_rows.cpp runs the delta rules
  const linear::mom_router router(in.logits, top_k);
  for (auto _ : state) {
    std::fill(in.state.begin(), in.state.end(), 0.0f);
    linear::mom<Member>(in.q, in.mems, {}, router, in.o, in.state, opt);
    benchmark::DoNotOptimize(in.o.data());
    benchmark::ClobberMemory();
  }
  double flops = 0;
  for (std::int64_t n : in.routed_tokens())
    flops += static_cast<double>(heads) * chunked_flops(Member::uses_beta, n, member_chunk<Member>());
  set_mom_counters<Member>(state, L, flops,
                           ("M=" + std::to_string(memories) + " top_k=" + std::to_string(top_k)).c_str());
}

// The member alone on memory 0's inputs over the same L tokens, through MoM's own member call.
template <class Member>
void member_row(benchmark::State& state, std::int64_t L) {
  mom_inputs in(L);
  linear::options opt;
  opt.threads = 1;
  opt.path = linear::form::chunked;
  opt.use_qk_l2norm = Member::uses_beta;
  const view<float, 4> s(in.state.data(), {1, heads, head_dim, head_dim});
  for (auto _ : state) {
    std::fill(in.state.begin(), in.state.end(), 0.0f);
    Member::template run<simd::default_arch>(in.q, in.k[0], in.v[0], in.g[0], in.beta[0], in.o, s, opt);
    benchmark::DoNotOptimize(in.o.data());
    benchmark::ClobberMemory();
  }
  set_mom_counters<Member>(state, L, heads * chunked_flops(Member::uses_beta, L, member_chunk<Member>()), "alone");
}

template <class Member>
void register_member_rows(std::int64_t L) {
  const std::string Ls = std::to_string(L), Hs = std::to_string(heads), Ds = std::to_string(head_dim);
  register_row(row_name("mom", "mom",
                        {{"member", Member::name}, {"L", Ls}, {"H", Hs}, {"D", Ds}, {"M", std::to_string(memories)},
                         {"top_k", std::to_string(top_k)}, {"threads", "1"}}),
               [=](benchmark::State& st) { mom_row<Member>(st, L); });
  register_row(row_name("mom", "member", {{"member", Member::name}, {"L", Ls}, {"H", Hs}, {"D", Ds}, {"threads", "1"}}),
               [=](benchmark::State& st) { member_row<Member>(st, L); });
}

const bool registered = [] {
  register_member_rows<linear::mom_members::gated_delta_rule>(mom_L());
  register_member_rows<linear::mom_members::linear_attn>(mom_L());
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
