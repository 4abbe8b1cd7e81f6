// fuzz/linear_fuzz.cpp — the linear-attention family (every member of its table,
// linear::all_members in mnemo/linear/members.hpp: linear_attn, retention, simple_gla, gla,
// delta_rule, gated_delta_rule, kda, rwkv7): recurrent form, chunked form and a two-piece chunked
// run (state carried across the split, the second piece read through narrowed views) against the
// double-precision reference, on shapes, chunk sizes, gates, feature maps and initial states
// decoded from the input.
//
// Property: either every path throws mnemo::error, or every path returns the reference's o and
// final state within tolerance; nothing is written outside o and the state.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "common.hpp"
#include "mnemo/linear/members.hpp"

namespace {

using namespace mnemo;
namespace lin = mnemo::linear;

// A member is its index in linear::all_members. The first n_decoded (the six the corpus was first
// written for) are drawn from one byte; the ones after them are decoded from the last of those
// (gated_delta_rule) with one more byte read last, whose lowest set bit picks the member (bit 0
// kda, bit 1 rwkv7, ...; see LLVMFuzzerTestOneInput), so the corpus and the regression inputs of
// the six, and of kda, decode as they always did.
using members = lin::all_members;
constexpr int n_members = static_cast<int>(members::size);
constexpr int n_decoded = 6;
static_assert(n_members >= n_decoded, "linear_fuzz: the corpus decodes the first six members of all_members");
enum run_kind { reference_run, recurrent_run, chunked_run };

constexpr float minus_inf = -std::numeric_limits<float>::infinity();

struct inputs {
  std::int64_t B, H, L, Dk, Dv, Df, Ds;
  int m;  // index in members
  lin::options opt;
  fuzz::buffer4<float> q, k, v;
  std::vector<float> g, beta, gamma;  // [B, H, L (, Dk)], [B, H, L], [H]
  std::vector<float> state0;          // [B, H, Df, Ds] or empty
  bool with_state;
  std::vector<float> a, b;  // [B, H, L, Dk] RWKV-7's
};

// Calls member m in the given form on tokens [t0, t0 + n).
void call(const inputs& in, run_kind kind, std::int64_t t0, std::int64_t n, view<float, 4> o, view<float, 4> state) {
  lin::options opt = in.opt;
  if (kind == recurrent_run) opt.path = lin::form::recurrent;
  if (kind == chunked_run) opt.path = lin::form::chunked;
  const view<const float, 4> q = in.q.cview().narrow(2, t0, n), k = in.k.cview().narrow(2, t0, n),
                             v = in.v.cview().narrow(2, t0, n);
  const view<const float, 3> g3 = view<const float, 3>(in.g.data(), {in.B, in.H, in.L}).narrow(2, t0, n);
  const view<const float, 4> g4 = view<const float, 4>(in.g.data(), {in.B, in.H, in.L, in.Dk}).narrow(2, t0, n);
  const view<const float, 3> beta = view<const float, 3>(in.beta.data(), {in.B, in.H, in.L}).narrow(2, t0, n);
  const view<const float, 1> gamma(in.gamma.data(), {static_cast<std::int64_t>(in.gamma.size())});
  const view<const float, 4> a = view<const float, 4>(in.a.data(), {in.B, in.H, in.L, in.Dk}).narrow(2, t0, n);
  const view<const float, 4> b = view<const float, 4>(in.b.data(), {in.B, in.H, in.L, in.Dk}).narrow(2, t0, n);
  const lin::member_inputs inputs{gamma, g3, g4, beta, a, b};
  members::visit(static_cast<std::size_t>(in.m), [&](auto m) {
    if (kind == reference_run)
      lin::reference_member(m, q, k, v, inputs, o, state, opt);
    else
      lin::run_member(m, q, k, v, inputs, o, state, opt);
  });
}

// A trait of member m (its row of the table).
bool has_features(int m) {
  bool r = false;
  members::visit(static_cast<std::size_t>(m), [&](auto row) { r = row.features; });
  return r;
}
bool has_beta(int m) {
  bool r = false;
  members::visit(static_cast<std::size_t>(m), [&](auto row) { r = row.beta; });
  return r;
}
// rwkv7 rejects options.use_qk_l2norm (RWKV-7 normalises its keys before forming a and b).
bool takes_qk_l2norm(int m) {
  bool r = true;
  members::visit(static_cast<std::size_t>(m),
                 [&](auto row) { r = !std::is_same_v<decltype(row), lin::members::rwkv7>; });
  return r;
}

struct result {
  bool threw = false;
  fuzz::buffer4<float> o, state;
  result(const inputs& in)
      : o({in.B, in.H, in.L, in.Dv}, 1, false), state({in.B, in.H, in.Df, in.Ds}, 1, false) {
    if (!in.with_state) return;
    auto s = state.view();
    std::size_t i = 0;
    for (std::int64_t a = 0; a < in.B; ++a)
      for (std::int64_t b = 0; b < in.H; ++b)
        for (std::int64_t c = 0; c < in.Df; ++c)
          for (std::int64_t d = 0; d < in.Ds; ++d) s(a, b, c, d) = in.state0[i++];
  }
};

// One run over all tokens, or two pieces [0, split) and [split, L) with the state carried.
result run(const inputs& in, run_kind kind, std::int64_t split) {
  result r(in);
  // Without an initial state the split run still needs one to carry: start from zeros.
  if (!in.with_state && split > 0) {
    auto s = r.state.view();
    for (std::int64_t a = 0; a < in.B; ++a)
      for (std::int64_t b = 0; b < in.H; ++b)
        for (std::int64_t c = 0; c < in.Df; ++c)
          for (std::int64_t d = 0; d < in.Ds; ++d) s(a, b, c, d) = 0.0f;
  }
  const bool carry = in.with_state || split > 0;
  const view<float, 4> state = carry ? r.state.view() : view<float, 4>{};
  try {
    if (split > 0) {
      call(in, kind, 0, split, r.o.view().narrow(2, 0, split), state);
      call(in, kind, split, in.L - split, r.o.view().narrow(2, split, in.L - split), state);
    } else {
      call(in, kind, 0, in.L, r.o.view(), state);
    }
  } catch (const mnemo::error&) {
    r.threw = true;
  }
  return r;
}

double max_abs(const fuzz::buffer4<float>& b) {
  double m = 0;
  for (float x : b.data)
    if (x != fuzz::canary) m = std::max(m, static_cast<double>(std::abs(x)));
  return m;
}

void compare(const char* what, const fuzz::buffer4<float>& got, const fuzz::buffer4<float>& want, double tol) {
  fuzz::check(got.canaries_intact(), "write outside o or the state");
  for (std::size_t i = 0; i < got.data.size(); ++i) {
    const double a = got.data[i], b = want.data[i];
    if (std::isnan(b) && std::isnan(a)) continue;
    if (!(std::abs(a - b) <= tol)) fuzz::die("%s: element %zu = %.9g, reference %.9g (tol %.3g)", what, i, a, b, tol);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider fdp(data, size);
  int m = fdp.ConsumeIntegralInRange<int>(0, n_decoded - 1);
  const std::int64_t B = fdp.ConsumeIntegralInRange<std::int64_t>(0, 2);
  const std::int64_t H = fdp.ConsumeIntegralInRange<std::int64_t>(1, 3);
  const std::int64_t L = fdp.ConsumeIntegralInRange<std::int64_t>(0, 70);
  lin::options opt;
  if (has_features(m)) {
    opt.map = static_cast<lin::feature_map>(fdp.ConsumeIntegralInRange<int>(0, 3));
    // Normalising needs positive features (elu + 1, or taylor2 whose dot product is
    // 1 + s + s^2 / 2 > 0); with identity or relu the denominator can cancel to ~0 and the
    // comparison would measure that cancellation, not the kernel.
    opt.normalize = fdp.ConsumeBool() &&
                    (opt.map == lin::feature_map::elu_plus_one || opt.map == lin::feature_map::taylor2);
  }
  const std::int64_t Dk = opt.map == lin::feature_map::taylor2 ? fdp.ConsumeIntegralInRange<std::int64_t>(1, 5)
                                                               : fdp.ConsumeIntegralInRange<std::int64_t>(0, 20);
  const std::int64_t Dv = fdp.ConsumeIntegralInRange<std::int64_t>(1, 20);
  opt.chunk_size = fdp.ConsumeIntegralInRange<std::int64_t>(-1, 40);
  opt.threads = fdp.ConsumeIntegralInRange<int>(0, 2);
  // The delta rules are contractions only for unit keys (|1 - beta| <= 1 with |k| = 1).
  opt.use_qk_l2norm = has_beta(m) || fdp.ConsumeBool();
  constexpr float scales[] = {0.0f, 0.0f, 0.1f, 1.0f, std::numeric_limits<float>::quiet_NaN()};
  opt.scale = scales[fdp.ConsumeIntegralInRange<int>(0, 4)];
  const bool with_state = fdp.ConsumeBool();
  const std::int64_t split = L > 1 ? fdp.ConsumeIntegralInRange<std::int64_t>(1, L - 1) : 0;
  const int bad = fdp.ConsumeIntegralInRange<int>(0, 15);  // 0: a positive gate, 1: beta out of range, 2: gamma 0
  std::mt19937 rng(fdp.ConsumeIntegral<std::uint32_t>());
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f), unit(0.0f, 1.0f);

  const std::int64_t Df = lin::feature_dim(opt.map, std::max<std::int64_t>(Dk, 0));
  const std::int64_t Ds = opt.normalize ? Dv + 1 : Dv;
  inputs in{B, H, L, Dk, Dv, Df, Ds, m, opt,
            fuzz::buffer4<float>({B, H, L, std::max<std::int64_t>(Dk, 0)}, fdp.ConsumeIntegralInRange<int>(0, 2), fdp.ConsumeBool()),
            fuzz::buffer4<float>({B, H, L, std::max<std::int64_t>(Dk, 0)}, 0, false),
            fuzz::buffer4<float>({B, H, L, Dv}, 0, fdp.ConsumeBool()),
            {}, {}, {}, {}, with_state, {}, {}};
  // The members after the first six (kda, rwkv7, ...): a gated_delta_rule input with one more byte,
  // read last, so the corpus and the regression inputs of the six decode as before (an exhausted
  // provider reads 0: gated_delta_rule itself). Its lowest set bit i picks member n_decoded + i,
  // gated_delta_rule when there is no such member: bit 0 is kda exactly as the ConsumeBool that
  // first decoded it, and a member appended later takes inputs that decoded to gated_delta_rule.
  // Their per-channel gates are the [B, H, L, Dk] cells of in.g, as GLA's. rwkv7 rejects the
  // options.use_qk_l2norm forced above for gated_delta_rule: cleared for it.
  if (m == n_decoded - 1 && n_members > n_decoded) {
    const unsigned byte = fdp.ConsumeIntegral<std::uint8_t>();
    const int bit = byte == 0 ? 8 : std::countr_zero(byte);
    if (bit < n_members - n_decoded) m = n_decoded + bit;
    in.m = m;
    if (!takes_qk_l2norm(m)) in.opt.use_qk_l2norm = false;
  }
  auto gen = [&] { return uni(rng); };
  fuzz::fill(in.q.view(), gen);
  fuzz::fill(in.k.view(), gen);
  fuzz::fill(in.v.view(), gen);
  // Log-gates in [-3, 0], with exact 0 (no decay) and -inf (full reset) sprinkled in.
  // At least one cell, as in fuzz::buffer4: with B or H = 0 an empty vector's null data() would be
  // offset by view::narrow (UBSan pointer-overflow, fuzz/regressions/linear_fuzz/narrow_null_data).
  in.g.resize(static_cast<std::size_t>(std::max<std::int64_t>(B * H * L * std::max<std::int64_t>(Dk, 1), 1)));
  for (auto& x : in.g) {
    const int pick = static_cast<int>(rng() % 16);
    x = pick == 0 ? 0.0f : pick == 1 ? minus_inf : -3.0f * unit(rng);
  }
  in.beta.resize(static_cast<std::size_t>(std::max<std::int64_t>(B * H * L, 1)));
  for (auto& x : in.beta) x = 2.0f * unit(rng);
  in.gamma.resize(static_cast<std::size_t>(H));
  for (auto& x : in.gamma) x = 1.0f - 0.5f * unit(rng);
  if (bad == 0 && !in.g.empty()) in.g[rng() % in.g.size()] = 0.5f;
  if (bad == 1 && !in.beta.empty()) in.beta[rng() % in.beta.size()] = 2.5f;
  if (bad == 2) in.gamma[0] = 0.0f;
  if (with_state) {
    in.state0.resize(static_cast<std::size_t>(B * H * Df * Ds));
    for (auto& x : in.state0) x = 0.5f * uni(rng);
    // normalize: the key-sum column of a reachable state is positive
    if (opt.normalize)
      for (std::size_t i = static_cast<std::size_t>(Ds - 1); i < in.state0.size(); i += static_cast<std::size_t>(Ds))
        in.state0[i] = std::abs(in.state0[i]) + 0.1f;
  }
  // RWKV-7's a = -kk, b = kk * iclr: kk a unit vector per token, iclr in [0, 1] per channel (a
  // transition that does not expand). Drawn last, so the inputs of the other members are as before.
  const std::int64_t Dk0 = std::max<std::int64_t>(Dk, 0);
  in.a.resize(static_cast<std::size_t>(std::max<std::int64_t>(B * H * L * Dk0, 1)));
  in.b.resize(in.a.size());
  for (std::int64_t r = 0; r < B * H * L; ++r) {
    float* ar = in.a.data() + r * Dk0;
    float* br = in.b.data() + r * Dk0;
    double ss = 0;
    for (std::int64_t c = 0; c < Dk0; ++c) {
      ar[c] = uni(rng);
      ss += static_cast<double>(ar[c]) * ar[c];
    }
    for (std::int64_t c = 0; c < Dk0; ++c) {
      const float kk = static_cast<float>(ar[c] / std::sqrt(ss + 1e-12));
      ar[c] = -kk;
      br[c] = kk * unit(rng);
    }
  }

  const result want = run(in, reference_run, 0);
  static const std::vector<std::string> labels = [] {  // "<member> compared", then "<member> rejected"
    std::vector<std::string> l;
    for (const char* outcome : {" compared", " rejected"})
      for (const char* name : members::names) l.push_back(std::string(name) + outcome);
    return l;
  }();
  fuzz::stats::count(labels[static_cast<std::size_t>((want.threw ? n_members : 0) + m)].c_str());
  const double tol_o = 1e-4 * (1.0 + max_abs(want.o)), tol_s = 1e-4 * (1.0 + max_abs(want.state));
  const result runs[] = {run(in, recurrent_run, 0), run(in, chunked_run, 0), run(in, chunked_run, split),
                         run(in, recurrent_run, split)};
  const char* names[] = {"recurrent", "chunked", "chunked in two pieces", "recurrent in two pieces"};
  for (int r = 0; r < 4; ++r) {
    if (want.threw) {  // the checks are per call: a rejected whole means a rejected piece
      fuzz::check(runs[r].threw, "a fast path accepted an input the reference rejected");
      continue;
    }
    fuzz::check(!runs[r].threw, "a fast path rejected an input the reference accepted");
    char what[64];
    std::snprintf(what, sizeof what, "member %d %s: o", m, names[r]);
    compare(what, runs[r].o, want.o, tol_o);
    if (in.with_state) {  // without one the reference returns no final state to compare with
      std::snprintf(what, sizeof what, "member %d %s: state", m, names[r]);
      compare(what, runs[r].state, want.state, tol_s);
    }
  }
  return 0;
}
