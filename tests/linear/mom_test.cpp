// Tests of mnemo/linear/mom.hpp: the fast path (both member forms) against reference::mom on awkward
// sizes, per-token and per-head routers, with and without a shared memory; independent checks
// against the plain members (M = 1, top_k = 1; top_k = M with equal logits; the shared memory);
// ties; a memory that receives no token; pieces and steps; bf16 inputs; the boundary checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "mnemo/linear/mom.hpp"
#include "support/support.hpp"

namespace {

using mnemo::bf16;
using mnemo::tensor;
using mnemo::view;
using mnemo::test::expect_error;
namespace linear = mnemo::linear;
namespace members = mnemo::linear::mom_members;

// f32 kernels against the double reference (as tests/linear/test_util.hpp's f32_tol).
constexpr double tol = 2e-5;

// q, per-memory k, v, g, beta for M routed memories and one shared one (index M), logits, a state.
struct problem {
  std::int64_t B, H, L, Dk, Dv, M;
  bool per_head;
  tensor<float, 4> q;
  std::vector<tensor<float, 4>> k, v;     // M + 1
  std::vector<tensor<float, 3>> g, beta;  // M + 1
  tensor<float, 4> logits;                // [B, Hr, L, M]
  tensor<float, 4> state0;                // [B, H (M + 1), Dk, Dv]: with the shared slot; see states()

  std::vector<linear::mom_memory<float>> memories() const {
    std::vector<linear::mom_memory<float>> out;
    for (std::int64_t m = 0; m < M; ++m) out.push_back({k[m], v[m], g[m], beta[m]});
    return out;
  }
  linear::mom_memory<float> shared() const { return {k[M], v[M], g[M], beta[M]}; }
  linear::mom_router router(std::int64_t top_k) const {
    if (per_head) return {cview(logits), top_k};
    const view<const float, 3> per_token(logits.data(), {B, L, M});
    return {per_token, top_k};
  }
  // The initial state of a call with or without the shared memory: [B, H (M + S), Dk, Dv].
  tensor<float, 4> states(bool with_shared) const {
    const std::int64_t S = with_shared ? 1 : 0;
    tensor<float, 4> s({B, H * (M + S), Dk, Dv});
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t m = 0; m < M + S; ++m)
          std::copy_n(state0.as_view().ptr(b, h * (M + 1) + m), Dk * Dv, s.as_view().ptr(b, h * (M + S) + m));
    return s;
  }
};

problem make_problem(std::int64_t B, std::int64_t H, std::int64_t L, std::int64_t Dk, std::int64_t Dv, std::int64_t M,
                     bool per_head, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f), gate(-0.5f, -0.01f), beta(0.05f, 1.0f), logit(-2.0f, 2.0f);
  problem p{B, H, L, Dk, Dv, M, per_head, tensor<float, 4>({B, H, L, Dk}), {}, {}, {}, {},
            tensor<float, 4>({B, per_head ? H : 1, L, M}), tensor<float, 4>({B, H * (M + 1), Dk, Dv})};
  for (float& x : p.q) x = unit(rng);
  for (std::int64_t m = 0; m <= M; ++m) {
    p.k.emplace_back(mnemo::shape_t<4>{B, H, L, Dk});
    p.v.emplace_back(mnemo::shape_t<4>{B, H, L, Dv});
    p.g.emplace_back(mnemo::shape_t<3>{B, H, L});
    p.beta.emplace_back(mnemo::shape_t<3>{B, H, L});
    for (float& x : p.k[m]) x = unit(rng);
    for (float& x : p.v[m]) x = unit(rng);
    for (float& x : p.g[m]) x = gate(rng);
    for (float& x : p.beta[m]) x = beta(rng);
  }
  for (float& x : p.logits) x = logit(rng);
  for (float& x : p.state0) x = 0.1f * unit(rng);
  return p;
}

enum class impl { reference, chunked, recurrent, automatic };

linear::options with_path(linear::options opt, impl i) {
  opt.path = i == impl::chunked     ? linear::form::chunked
             : i == impl::recurrent ? linear::form::recurrent
                                    : linear::form::automatic;
  return opt;
}

struct outputs {
  tensor<float, 4> o, state;
};

template <class Member>
void call(impl i, const problem& p, std::int64_t top_k, bool shared, std::int64_t t0, std::int64_t n,
          const view<float, 4>& o, const view<float, 4>& state, linear::options opt) {
  std::vector<linear::mom_memory<float>> mems;
  for (const auto& m : p.memories())
    mems.push_back({m.k.narrow(2, t0, n), m.v.narrow(2, t0, n), m.g.narrow(2, t0, n), m.beta.narrow(2, t0, n)});
  linear::mom_memory<float> sh;
  if (shared) {
    const auto s = p.shared();
    sh = {s.k.narrow(2, t0, n), s.v.narrow(2, t0, n), s.g.narrow(2, t0, n), s.beta.narrow(2, t0, n)};
  }
  const linear::mom_router whole = p.router(top_k);
  const linear::mom_router r(whole.logits.narrow(2, t0, n), top_k);
  const auto q = cview(p.q).narrow(2, t0, n);
  if (i == impl::reference)
    linear::reference::mom<Member>(q, mems, sh, r, o.narrow(2, t0, n), state, opt);
  else
    linear::mom<Member>(q, mems, sh, r, o.narrow(2, t0, n), state, with_path(opt, i));
}

template <class Member>
outputs run(impl i, const problem& p, std::int64_t top_k, bool shared, linear::options opt = {}) {
  outputs r{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.states(shared)};
  call<Member>(i, p, top_k, shared, 0, p.L, r.o, r.state, opt);
  return r;
}

template <class Member>
linear::options member_options() {
  linear::options opt;
  opt.chunk_size = 16;
  opt.use_qk_l2norm = Member::uses_beta;  // the delta rules expect unit keys
  return opt;
}

struct shape_case {
  std::int64_t B, H, L, Dk, Dv, M, top_k;
};

template <class Member>
void check_forms(const std::vector<shape_case>& shapes = {
                     {1, 1, 1, 16, 16, 3, 2}, {2, 3, 37, 12, 10, 4, 2}, {1, 2, 1000, 8, 8, 4, 2}, {1, 2, 40, 9, 16, 5, 1}}) {
  std::uint32_t seed = 1;
  for (const shape_case& s : shapes)
    for (bool per_head : {false, true})
      for (bool shared : {false, true}) {
        if (s.L == 1000 && per_head) continue;  // the time budget: one per-head run of each other size
        const problem p = make_problem(s.B, s.H, s.L, s.Dk, s.Dv, s.M, per_head, seed++);
        const linear::options opt = member_options<Member>();
        const outputs want = run<Member>(impl::reference, p, s.top_k, shared, opt);
        for (impl i : {impl::chunked, impl::recurrent, impl::automatic}) {
          const outputs got = run<Member>(i, p, s.top_k, shared, opt);
          const std::string what = std::string(Member::name) + " impl " + std::to_string(static_cast<int>(i)) +
                                   " L=" + std::to_string(s.L) + " M=" + std::to_string(s.M) +
                                   " top_k=" + std::to_string(s.top_k) + (per_head ? " per-head" : " per-token") +
                                   (shared ? " shared" : "");
          mnemo::test::expect_close(got.o, want.o, tol, tol, what + " o");
          mnemo::test::expect_close(got.state, want.state, tol, tol, what + " state");
        }
      }
}

TEST(mom, linear_attn_matches_reference) { check_forms<members::linear_attn>(); }
TEST(mom, gated_delta_rule_matches_reference) { check_forms<members::gated_delta_rule>(); }
TEST(mom, simple_gla_and_delta_rule_match_reference) {
  check_forms<members::simple_gla>({{2, 3, 37, 12, 10, 4, 2}});
  check_forms<members::delta_rule>({{2, 3, 37, 12, 10, 4, 2}});
}

// The routing itself: highest logits first, ties to the lower index, softmax over the selected.
TEST(mom, select) {
  const float logits[] = {1.0f, 3.0f, 3.0f, 0.5f};
  std::int64_t sel[3];
  float w[3];
  linear::mom_select(logits, 4, 2, sel, w);
  EXPECT_EQ(sel[0], 1);
  EXPECT_EQ(sel[1], 2);
  EXPECT_FLOAT_EQ(w[0], 0.5f);
  EXPECT_FLOAT_EQ(w[1], 0.5f);
  linear::mom_select(logits, 4, 3, sel, w);
  EXPECT_EQ(sel[2], 0);
  const double e = std::exp(-2.0);
  EXPECT_NEAR(w[0], 1 / (2 + e), 1e-7);
  EXPECT_NEAR(w[2], e / (2 + e), 1e-7);
  linear::mom_select(logits, 4, 1, sel, w);
  EXPECT_EQ(sel[0], 1);
  EXPECT_EQ(w[0], 1.0f);
}

// The plain member on memory m's inputs over every token, from state slot m of p.state0.
template <class Member>
outputs plain(const problem& p, std::int64_t m, impl i) {
  outputs r{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), tensor<float, 4>({p.B, p.H, p.Dk, p.Dv})};
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t h = 0; h < p.H; ++h)
      std::copy_n(p.state0.as_view().ptr(b, h * (p.M + 1) + m), p.Dk * p.Dv, r.state.as_view().ptr(b, h));
  linear::options opt = with_path(member_options<Member>(), i);
  if constexpr (Member::uses_beta) {
    if (i == impl::reference)
      linear::reference::gated_delta_rule(p.q, p.k[m], p.v[m], p.g[m], p.beta[m], r.o, r.state, opt);
    else
      linear::gated_delta_rule(p.q, p.k[m], p.v[m], p.g[m], p.beta[m], r.o, r.state, opt);
  } else {
    if (i == impl::reference)
      linear::reference::linear_attn(p.q, p.k[m], p.v[m], r.o, r.state, opt);
    else
      linear::linear_attn(p.q, p.k[m], p.v[m], r.o, r.state, opt);
  }
  return r;
}

// M = 1, top_k = 1, no shared memory: the plain member, by every path.
template <class Member>
void check_single_memory() {
  const problem p = make_problem(2, 2, 45, 12, 8, 1, false, 51);
  for (impl i : {impl::reference, impl::chunked, impl::recurrent}) {
    const outputs got = run<Member>(i, p, 1, false, member_options<Member>());
    const outputs want = plain<Member>(p, 0, i == impl::reference ? impl::reference : impl::chunked);
    mnemo::test::expect_close(got.o, want.o, tol, tol, std::string(Member::name) + " M = 1 o");
    mnemo::test::expect_close(got.state, want.state, tol, tol, std::string(Member::name) + " M = 1 state");
  }
}
TEST(mom, single_memory_is_the_member) {
  check_single_memory<members::linear_attn>();
  check_single_memory<members::gated_delta_rule>();
}

// top_k = M with equal logits: every memory sees every token with weight 1 / M, so o is the mean of
// the M plain members, plus the shared memory's output with weight 1.
template <class Member>
void check_all_memories() {
  problem p = make_problem(1, 2, 50, 8, 12, 3, false, 53);
  std::fill(p.logits.begin(), p.logits.end(), 0.25f);
  for (bool shared : {false, true})
    for (impl i : {impl::reference, impl::chunked}) {
      const outputs got = run<Member>(i, p, p.M, shared, member_options<Member>());
      tensor<float, 4> want({p.B, p.H, p.L, p.Dv});
      std::fill(want.begin(), want.end(), 0.0f);
      for (std::int64_t m = 0; m <= p.M; ++m) {
        if (m == p.M && !shared) break;
        const outputs one = plain<Member>(p, m, impl::reference);
        const float w = m == p.M ? 1.0f : 1.0f / static_cast<float>(p.M);
        for (std::int64_t e = 0; e < want.size(); ++e) want.data()[e] += w * one.o.data()[e];
        for (std::int64_t h = 0; h < p.H; ++h)
          mnemo::test::expect_close(got.state.as_view()[0][h * (p.M + (shared ? 1 : 0)) + m], one.state.as_view()[0][h],
                                    tol, tol, std::string(Member::name) + " top_k = M state");
      }
      mnemo::test::expect_close(got.o, want, tol, tol, std::string(Member::name) + " top_k = M o");
    }
}
TEST(mom, every_memory_with_equal_logits) {
  check_all_memories<members::linear_attn>();
  check_all_memories<members::gated_delta_rule>();
}

// Equal logits and top_k = 1: the tie goes to memory 0, so memories 1 and 2 keep their states
// exactly (bit for bit) and o is memory 0's member output.
TEST(mom, ties_pick_the_lowest_index_and_idle_memories_keep_their_state) {
  problem p = make_problem(1, 2, 33, 8, 8, 3, true, 55);
  std::fill(p.logits.begin(), p.logits.end(), -1.0f);
  for (impl i : {impl::reference, impl::chunked, impl::recurrent}) {
    const outputs got = run<members::gated_delta_rule>(i, p, 1, false, member_options<members::gated_delta_rule>());
    const outputs want = plain<members::gated_delta_rule>(p, 0, impl::reference);
    mnemo::test::expect_close(got.o, want.o, tol, tol, "ties o");
    const tensor<float, 4> before = p.states(false);
    for (std::int64_t h = 0; h < p.H; ++h)
      for (std::int64_t m : {1, 2}) {
        const auto a = got.state.as_view()[0][h * p.M + m], b = before.as_view()[0][h * p.M + m];
        EXPECT_TRUE(std::equal(a.data(), a.data() + p.Dk * p.Dv, b.data())) << "idle memory " << m << " head " << h;
      }
  }
}

// A memory the router never picks (a large negative logit) keeps its state; the others change.
TEST(mom, unrouted_memory_keeps_its_state) {
  problem p = make_problem(2, 3, 70, 8, 8, 4, false, 57);
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t t = 0; t < p.L; ++t) p.logits(b, 0, t, 2) = -1e30f;
  for (impl i : {impl::reference, impl::chunked}) {
    const outputs got = run<members::linear_attn>(i, p, 2, true);
    const tensor<float, 4> before = p.states(true);
    for (std::int64_t b = 0; b < p.B; ++b)
      for (std::int64_t h = 0; h < p.H; ++h)
        for (std::int64_t m = 0; m <= p.M; ++m) {
          const auto a = got.state.as_view()[b][h * (p.M + 1) + m], c = before.as_view()[b][h * (p.M + 1) + m];
          EXPECT_EQ(std::equal(a.data(), a.data() + p.Dk * p.Dv, c.data()), m == 2) << "memory " << m;
        }
  }
}

// Pieces of uneven lengths through the state == one call; then steps after a prefill == one call.
TEST(mom, pieces_and_steps) {
  using member = members::gated_delta_rule;
  for (bool per_head : {false, true}) {
    const problem p = make_problem(2, 2, 90, 12, 8, 3, per_head, 59);
    const linear::options opt = member_options<member>();
    const outputs whole = run<member>(impl::chunked, p, 2, true, opt);
    for (impl i : {impl::chunked, impl::recurrent, impl::automatic}) {
      outputs parts{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.states(true)};
      std::int64_t t0 = 0;
      for (std::int64_t n : {37, 1, 16, 5, 31}) {
        call<member>(i, p, 2, true, t0, n, parts.o, parts.state, opt);
        t0 += n;
      }
      ASSERT_EQ(t0, p.L);
      mnemo::test::expect_close(parts.o, whole.o, tol, tol, "pieces o");
      mnemo::test::expect_close(parts.state, whole.state, tol, tol, "pieces state");
    }
    outputs inc{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.states(true)};
    const std::int64_t prefill = p.L - 4;
    call<member>(impl::chunked, p, 2, true, 0, prefill, inc.o, inc.state, opt);
    for (std::int64_t t = prefill; t < p.L; ++t) {
      auto tok3 = [&](const tensor<float, 4>& x) {
        return view<const float, 3>(x.as_view().ptr(0, 0, t), {x.extent(0), x.extent(1), x.extent(3)},
                                    {x.extent(1) * x.extent(2) * x.extent(3), x.extent(2) * x.extent(3), 1});
      };
      auto tok2 = [&](const tensor<float, 3>& x) {  // a copy: a [B, H] view would have stride L inside
        tensor<float, 2> y({x.extent(0), x.extent(1)});
        for (std::int64_t b = 0; b < x.extent(0); ++b)
          for (std::int64_t h = 0; h < x.extent(1); ++h) y(b, h) = x(b, h, t);
        return y;
      };
      std::vector<tensor<float, 2>> keep;
      auto token = [&](std::int64_t m) {
        keep.push_back(tok2(p.g[m]));
        keep.push_back(tok2(p.beta[m]));
        return linear::mom_token<float>{tok3(p.k[m]), tok3(p.v[m]), keep[keep.size() - 2], keep.back()};
      };
      keep.reserve(2 * (p.M + 1));
      std::vector<linear::mom_token<float>> mems;
      for (std::int64_t m = 0; m < p.M; ++m) mems.push_back(token(m));
      const linear::mom_token<float> sh = token(p.M);
      tensor<float, 3> logits({p.B, p.per_head ? p.H : 1, p.M});
      for (std::int64_t b = 0; b < p.B; ++b)
        for (std::int64_t h = 0; h < logits.extent(1); ++h)
          for (std::int64_t m = 0; m < p.M; ++m) logits(b, h, m) = p.logits(b, h, t, m);
      const view<float, 3> o(inc.o.as_view().ptr(0, 0, t), {p.B, p.H, p.Dv}, {p.H * p.L * p.Dv, p.L * p.Dv, 1});
      if (per_head)
        linear::mom_step<member>(tok3(p.q), mems, sh, linear::mom_token_router(cview(logits), 2), o, inc.state, opt);
      else
        linear::mom_step<member>(tok3(p.q), mems, sh,
                                 linear::mom_token_router(view<const float, 2>(logits.data(), {p.B, p.M}), 2), o,
                                 inc.state, opt);
    }
    mnemo::test::expect_close(inc.o, whole.o, tol, tol, "steps o");
    mnemo::test::expect_close(inc.state, whole.state, tol, tol, "steps state");
  }
}

// NaN (header comment): in the k of a memory the token is not routed to, it is never read; in the
// k of the memory it is routed to, it reaches that token's output and every later one that reads
// the memory, and no output of a token that does not read it.
TEST(mom, nan_in_keys) {
  problem p = make_problem(1, 1, 30, 8, 8, 2, false, 69);
  for (std::int64_t t = 0; t < p.L; ++t) {  // memory 0 on even tokens, memory 1 on odd ones
    p.logits(0, 0, t, 0) = t % 2 == 0 ? 1.0f : -1.0f;
    p.logits(0, 0, t, 1) = -p.logits(0, 0, t, 0);
  }
  const std::int64_t bad = 10;
  p.k[1](0, 0, bad, 3) = std::numeric_limits<float>::quiet_NaN();  // token 10 goes to memory 0
  for (impl i : {impl::reference, impl::recurrent, impl::chunked}) {
    const outputs clean = run<members::linear_attn>(i, p, 1, false);
    for (float x : clean.o) ASSERT_TRUE(std::isfinite(x)) << "unrouted NaN was read, impl " << static_cast<int>(i);
  }
  p.k[0](0, 0, bad, 3) = std::numeric_limits<float>::quiet_NaN();
  const outputs got = run<members::linear_attn>(impl::recurrent, p, 1, false);
  for (std::int64_t t = 0; t < p.L; ++t)
    EXPECT_EQ(std::isnan(got.o(0, 0, t, 0)), t >= bad && t % 2 == 0) << "token " << t;
}

// 1 and 2 threads give the same bits, with either router.
TEST(mom, threads) {
  for (bool per_head : {false, true}) {
    const problem p = make_problem(2, 3, 40, 8, 8, 3, per_head, 67);
    linear::options opt = member_options<members::gated_delta_rule>();
    opt.threads = 1;
    const outputs one = run<members::gated_delta_rule>(impl::chunked, p, 2, true, opt);
    opt.threads = 2;
    const outputs two = run<members::gated_delta_rule>(impl::chunked, p, 2, true, opt);
    EXPECT_TRUE(std::equal(one.o.begin(), one.o.end(), two.o.begin())) << "per_head " << per_head;
    EXPECT_TRUE(std::equal(one.state.begin(), one.state.end(), two.state.begin())) << "per_head " << per_head;
  }
}

// An empty state view starts from zero; L = 0 leaves the state as it was.
TEST(mom, empty_state_and_empty_sequence) {
  problem p = make_problem(1, 2, 20, 8, 8, 3, false, 61);
  std::fill(p.state0.begin(), p.state0.end(), 0.0f);
  const outputs want = run<members::linear_attn>(impl::chunked, p, 2, true);
  tensor<float, 4> o({p.B, p.H, p.L, p.Dv});
  call<members::linear_attn>(impl::chunked, p, 2, true, 0, p.L, o, {}, {});
  EXPECT_TRUE(std::equal(o.begin(), o.end(), want.o.begin()));
  tensor<float, 4> state = want.state;
  call<members::linear_attn>(impl::chunked, p, 2, true, 0, 0, o, state, {});
  EXPECT_TRUE(std::equal(state.begin(), state.end(), want.state.begin()));
}

// bf16 q, k, v (with the shared memory, whose inputs are converted whole): against the reference
// on the same rounded values.
TEST(mom, bf16_inputs) {
  using member = members::gated_delta_rule;
  const problem p = make_problem(1, 2, 41, 16, 8, 3, false, 63);
  problem rounded = p;
  auto round = [](const tensor<float, 4>& x, tensor<float, 4>& back) {
    tensor<bf16, 4> y(x.shape());
    for (std::int64_t e = 0; e < x.size(); ++e) {
      y.data()[e] = bf16(x.data()[e]);
      back.data()[e] = static_cast<float>(y.data()[e]);
    }
    return y;
  };
  const tensor<bf16, 4> q = round(p.q, rounded.q);
  std::vector<tensor<bf16, 4>> k, v;
  for (std::int64_t m = 0; m <= p.M; ++m) {
    k.push_back(round(p.k[m], rounded.k[m]));
    v.push_back(round(p.v[m], rounded.v[m]));
  }
  const linear::options opt = member_options<member>();
  const outputs want = run<member>(impl::reference, rounded, 2, true, opt);
  std::vector<linear::mom_memory<bf16>> mems;
  for (std::int64_t m = 0; m < p.M; ++m) mems.push_back({k[m], v[m], p.g[m], p.beta[m]});
  const linear::mom_memory<bf16> sh{k[p.M], v[p.M], p.g[p.M], p.beta[p.M]};
  outputs got{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.states(true)};
  linear::mom<member>(q, mems, sh, p.router(2), got.o, got.state, opt);
  mnemo::test::expect_close(got.o, want.o, tol, tol, "bf16 o");
  mnemo::test::expect_close(got.state, want.state, tol, tol, "bf16 state");
}

TEST(mom, bad_inputs) {
  using member = members::gated_delta_rule;
  const problem p = make_problem(1, 2, 10, 8, 6, 3, false, 65);
  const auto mems = p.memories();
  tensor<float, 4> o({1, 2, 10, 6}), state = p.states(false);
  for (const char* fn : {"linear::mom", "linear::reference::mom"}) {
    const bool ref = std::string(fn) == "linear::reference::mom";
    auto go = [&](std::span<const linear::mom_memory<float>> ms, const linear::mom_memory<float>& sh,
                  const linear::mom_router& r, view<float, 4> st) {
      if (ref)
        linear::reference::mom<member>(p.q, ms, sh, r, o, st);
      else
        linear::mom<member>(p.q, ms, sh, r, o, st);
    };
    expect_error([&] { go({}, {}, p.router(1), {}); }, {fn, "memories must hold M >= 1 routed memories, got M = 0"});
    expect_error([&] { go(mems, {}, p.router(0), state); }, {fn, "top_k must be in [1, M = 3], got 0"});
    expect_error([&] { go(mems, {}, p.router(4), state); }, {fn, "top_k must be in [1, M = 3], got 4"});
    const tensor<float, 3> two({1, 10, 2});
    expect_error([&] { go(mems, {}, linear::mom_router(two, 1), state); },
                 {fn, "router logits must have shape [1, 10, 3] [B, L, M]", "got [1, 10, 2]"});
    const tensor<float, 4> three_heads({1, 3, 10, 3});
    expect_error([&] { go(mems, {}, linear::mom_router(three_heads, 1), state); },
                 {fn, "one router per token ([B, L, M]) or per head", "H = 2), got 3 router heads"});
    tensor<float, 3> nan_logits({1, 10, 3});
    std::fill(nan_logits.begin(), nan_logits.end(), 0.0f);
    nan_logits(0, 7, 1) = std::numeric_limits<float>::quiet_NaN();
    expect_error([&] { go(mems, {}, linear::mom_router(nan_logits, 1), state); },
                 {fn, "router logits must be finite, got logits[0, 7, 1] = nan"});
    nan_logits(0, 7, 1) = std::numeric_limits<float>::infinity();
    expect_error([&] { go(mems, {}, linear::mom_router(nan_logits, 1), state); }, {fn, "logits[0, 7, 1] = inf"});
    expect_error([&] { go(mems, p.shared(), p.router(1), state); },
                 {fn, "state must have shape [1, 8, 8, 6]", "got [1, 6, 8, 6]"});
    auto bad = mems;
    const tensor<float, 4> k9({1, 2, 10, 9});
    bad[1].k = k9;
    expect_error([&] { go(bad, {}, p.router(1), state); },
                 {fn, ": memories[1]: k must have shape [1, 2, 10, 8]", "got [1, 2, 10, 9]"});
    bad = mems;
    tensor<float, 3> g = p.g[2];
    g(0, 1, 4) = 0.5f;
    bad[2].g = g;
    expect_error([&] { go(bad, {}, p.router(1), state); },
                 {fn, ": memories[2]: g (log-decay) must be <= 0 and not NaN, got g[0, 1, 4] = 0.5"});
    linear::mom_memory<float> sh = p.shared();
    sh.beta = {};
    expect_error([&] { go(mems, sh, p.router(1), {}); }, {fn, ": shared memory: beta must have shape [1, 2, 10]"});
    expect_error([&] { go(mems, {}, p.router(1), o); }, {fn, "state must have shape [1, 6, 8, 6]"});
  }
}

}  // namespace
