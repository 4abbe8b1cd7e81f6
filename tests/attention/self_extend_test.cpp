// Tests for mnemo/attention/self_extend.hpp: the double reference against an independent
// computation from the paper's position equations (each pair's q and k rotated by
// kvcache::reference::apply_rope to its neighbour or grouped positions, then a softmax); the fast
// two-pass form against the reference on awkward shapes (L = 1, L off the tile, Lq != Lk, Lq > Lk
// rows with no key, GQA, W = 1, W >= Lk, G = 1, YaRN's attention factor, interleaved and partial
// rotary, sinks, decode-sized Lq); keys given already rotated (a cache's keys: af not applied
// twice); G = 1 and W >= Lk as plain causal RoPE attention; the beyond_window mask against its
// visible(); and the argument checks.
#include "mnemo/attention/self_extend.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "support/support.hpp"

namespace {

namespace at = mnemo::attention;
namespace kv = mnemo::kvcache;
using mnemo::tensor;
using mnemo::view;
using mnemo::test::expect_close;
using mnemo::test::expect_error;
using mnemo::test::random_tensor;

struct shape {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv, W, G;
};

std::string name(const shape& s) {
  return "B" + std::to_string(s.B) + " Hq" + std::to_string(s.Hq) + " Hkv" + std::to_string(s.Hkv) + " Lq" +
         std::to_string(s.Lq) + " Lk" + std::to_string(s.Lk) + " D" + std::to_string(s.D) + " Dv" +
         std::to_string(s.Dv) + " W" + std::to_string(s.W) + " G" + std::to_string(s.G);
}

// floor(a / b) for b > 0.
std::int64_t floor_div(std::int64_t a, std::int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// One row vector x [D] rotated to position p by the kvcache reference (double inside).
std::vector<double> rotated(const kv::rope& r, const float* x, std::int64_t D, std::int64_t p) {
  tensor<float, 3> t({1, 1, D});
  for (std::int64_t c = 0; c < D; ++c) t(0, 0, c) = x[c];
  kv::reference::apply_rope(r, t, std::vector<std::int64_t>{p});
  return std::vector<double>(t.data(), t.data() + D);
}

// Self-Extend from the paper's equations, pair by pair: distance d = qp - kp < W uses positions
// (qp, kp), else (floor(qp / G) + W - floor(W / G), floor(kp / G)); causal softmax in double.
void independent(const shape& s, const kv::rope& r, const tensor<float, 4>& q, const tensor<float, 4>& k,
                 const tensor<float, 4>& v, tensor<float, 4>& out, tensor<float, 3>& lse) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
  for (std::int64_t b = 0; b < s.B; ++b)
    for (std::int64_t h = 0; h < s.Hq; ++h) {
      const std::int64_t hk = h / (s.Hq / s.Hkv);
      for (std::int64_t i = 0; i < s.Lq; ++i) {
        const std::int64_t qp = i + s.Lk - s.Lq;
        std::vector<double> sc;
        for (std::int64_t j = 0; j <= std::min(qp, s.Lk - 1); ++j) {
          const bool near = qp - j < s.W;
          const std::int64_t pq = near ? qp : floor_div(qp, s.G) + s.W - s.W / s.G, pk = near ? j : floor_div(j, s.G);
          const auto a = rotated(r, q.data() + ((b * s.Hq + h) * s.Lq + i) * s.D, s.D, pq);
          const auto c = rotated(r, k.data() + ((b * s.Hkv + hk) * s.Lk + j) * s.D, s.D, pk);
          double dot = 0;
          for (std::int64_t e = 0; e < s.D; ++e) dot += a[static_cast<std::size_t>(e)] * c[static_cast<std::size_t>(e)];
          sc.push_back(scale * dot);
        }
        if (sc.empty()) {
          for (std::int64_t e = 0; e < s.Dv; ++e) out(b, h, i, e) = 0;
          lse(b, h, i) = -std::numeric_limits<float>::infinity();
          continue;
        }
        double m = sc[0], sum = 0;
        for (double x : sc) m = std::max(m, x);
        std::vector<double> acc(static_cast<std::size_t>(s.Dv));
        for (std::size_t j = 0; j < sc.size(); ++j) {
          const double p = std::exp(sc[j] - m);
          sum += p;
          for (std::int64_t e = 0; e < s.Dv; ++e) acc[static_cast<std::size_t>(e)] += p * v(b, hk, static_cast<std::int64_t>(j), e);
        }
        for (std::int64_t e = 0; e < s.Dv; ++e) out(b, h, i, e) = static_cast<float>(acc[static_cast<std::size_t>(e)] / sum);
        lse(b, h, i) = static_cast<float>(m + std::log(sum));
      }
    }
}

struct inputs {
  tensor<float, 4> q, k, v;
};

inputs make_inputs(const shape& s, std::uint32_t seed) {
  return {random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.D}, seed, -2.0f, 2.0f),
          random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.D}, seed + 1, -2.0f, 2.0f),
          random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, seed + 2)};
}

const kv::rope yarn_partial{.dim = 16, .scaling = kv::rope_scaling::yarn, .factor = 4.0, .original_context = 32};

TEST(SelfExtend, ReferenceMatchesThePaperPositions) {
  const std::vector<shape> shapes = {{1, 2, 1, 9, 9, 16, 8, 3, 2}, {1, 2, 2, 4, 11, 12, 5, 4, 3}, {1, 1, 1, 6, 4, 8, 4, 2, 4}};
  for (const kv::rope& r : {kv::rope{}, yarn_partial, kv::rope{.dim = 6, .layout = kv::rope_layout::interleaved}})
    for (const shape& s : shapes) {
      if (r.dim > s.D) continue;
      SCOPED_TRACE(name(s) + " rope dim " + std::to_string(r.dim));
      const inputs in = make_inputs(s, 3);
      tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv}), want(out.shape());
      tensor<float, 3> lse({s.B, s.Hq, s.Lq}), want_lse(lse.shape());
      at::reference_self_extend(in.q, in.k, in.v, out, lse, {.window = s.W, .group = s.G, .rope = r});
      independent(s, r, in.q, in.k, in.v, want, want_lse);
      expect_close(out, want, 1e-6, 1e-6, "out");
      expect_close(lse, want_lse, 1e-6, 1e-6, "lse");
    }
}

TEST(SelfExtend, FastMatchesReference) {
  const std::vector<shape> shapes = {
      {1, 1, 1, 1, 1, 16, 8, 4, 2},          // L = 1
      {1, 2, 1, 77, 77, 32, 24, 16, 4},      // L off the tile, GQA
      {2, 4, 2, 130, 130, 16, 16, 1, 3},     // W = 1: every earlier key grouped
      {1, 2, 2, 50, 200, 32, 32, 24, 8},     // prefill against a cache (Lq < Lk)
      {1, 3, 1, 40, 25, 16, 8, 7, 2},        // Lq > Lk: the first rows see no key
      {1, 2, 1, 3, 300, 64, 64, 32, 16},     // decode-sized Lq: the split-KV engine
      {1, 2, 2, 1, 129, 32, 32, 200, 4},     // W >= Lk: neighbour pass only
      {1, 2, 1, 70, 70, 16, 16, 8, 1},       // G = 1
  };
  for (const kv::rope& r : {kv::rope{}, yarn_partial, kv::rope{.dim = 8, .layout = kv::rope_layout::interleaved}})
    for (const shape& s : shapes) {
      SCOPED_TRACE(name(s) + " rope dim " + std::to_string(r.dim));
      const inputs in = make_inputs(s, 5);
      tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv}), want(out.shape());
      tensor<float, 3> lse({s.B, s.Hq, s.Lq}), want_lse(lse.shape());
      const at::self_extend_options se{.window = s.W, .group = s.G, .rope = r};
      at::self_extend(in.q, in.k, in.v, out, lse, se);
      at::reference_self_extend(in.q, in.k, in.v, want, want_lse, se);
      expect_close(out, want, 2e-5, 2e-5, "out");
      expect_close(lse, want_lse, 2e-5, 2e-5, "lse");
      tensor<float, 4> out2(out.shape());
      at::self_extend(in.q, in.k, in.v, out2, {}, se);  // lse not wanted
      expect_close(out2, out, 0, 0, "out without lse");
    }
}

TEST(SelfExtend, KeysAlreadyRotatedGiveTheSameResult) {
  // A cache holds keys rotated to their positions (with YaRN's af); decode over them must equal
  // the last row of the un-rotated prefill (af once).
  const shape s{1, 4, 2, 65, 65, 32, 16, 12, 5};
  const inputs in = make_inputs(s, 7);
  const at::self_extend_options se{.window = s.W, .group = s.G, .rope = yarn_partial};
  tensor<float, 4> k_rot = in.k;
  const view<float, 3> rows(k_rot.data(), {s.B * s.Hkv, s.Lk, s.D});
  std::vector<std::int64_t> pos(static_cast<std::size_t>(s.Lk));
  for (std::int64_t j = 0; j < s.Lk; ++j) pos[static_cast<std::size_t>(j)] = j;
  kv::rope r = yarn_partial;
  r.seq_len = s.Lk;
  kv::apply_rope(r, rows, pos);
  at::self_extend_options se_rot = se;
  se_rot.keys_rotated = true;
  tensor<float, 4> full({s.B, s.Hq, s.Lq, s.Dv});
  at::self_extend(in.q, in.k, in.v, full, {}, se);
  for (const bool fast : {true, false}) {
    tensor<float, 4> all(full.shape());
    if (fast) at::self_extend(in.q, k_rot, in.v, all, {}, se_rot);
    else at::reference_self_extend(in.q, k_rot, in.v, all, {}, se_rot);
    expect_close(all, full, 2e-5, 2e-5, fast ? "prefill fast" : "prefill reference");
  }
  // decode: the last query row alone
  tensor<float, 4> q_last({s.B, s.Hq, 1, s.D}), out({s.B, s.Hq, 1, s.Dv});
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t c = 0; c < s.D; ++c) q_last(0, h, 0, c) = in.q(0, h, s.Lq - 1, c);
  at::self_extend(q_last, k_rot, in.v, out, {}, se_rot);
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t c = 0; c < s.Dv; ++c) EXPECT_NEAR(out(0, h, 0, c), full(0, h, s.Lq - 1, c), 2e-5);
}

TEST(SelfExtend, GroupOneAndWideWindowArePlainCausalRope) {
  const shape s{1, 2, 1, 90, 90, 16, 16, 10, 1};
  const inputs in = make_inputs(s, 9);
  tensor<float, 4> q = in.q, k = in.k;
  std::vector<std::int64_t> pos(90);
  for (std::int64_t j = 0; j < 90; ++j) pos[static_cast<std::size_t>(j)] = j;
  kv::apply_rope(kv::rope{}, view<float, 3>(q.data(), {2, 90, 16}), pos);
  kv::apply_rope(kv::rope{}, view<float, 3>(k.data(), {1, 90, 16}), pos);
  tensor<float, 4> want({1, 2, 90, 16}), got(want.shape());
  at::reference(q, k, in.v, want, {}, at::mods::causal{});
  at::self_extend(in.q, in.k, in.v, got, {}, {.window = 10, .group = 1});
  expect_close(got, want, 2e-5, 2e-5, "G = 1");
  at::self_extend(in.q, in.k, in.v, got, {}, {.window = 90, .group = 7});
  expect_close(got, want, 2e-5, 2e-5, "W = Lk");
  // and a real grouping changes the result
  at::self_extend(in.q, in.k, in.v, got, {}, {.window = 10, .group = 4});
  EXPECT_GT(mnemo::test::max_abs_diff(got, want), 1e-3);
}

TEST(SelfExtend, SinksJoinTheDenominatorOnce) {
  const shape s{1, 2, 1, 70, 60, 16, 16, 9, 3};
  const inputs in = make_inputs(s, 11);
  const tensor<float, 1> sinks = random_tensor<float, 1>({2}, 12, -1.0f, 3.0f);
  at::options opt;
  opt.sinks = sinks;
  tensor<float, 4> out({1, 2, 70, 16}), want(out.shape());
  tensor<float, 3> lse({1, 2, 70}), want_lse(lse.shape());
  const at::self_extend_options se{.window = 9, .group = 3};
  at::self_extend(in.q, in.k, in.v, out, lse, se, opt);
  at::reference_self_extend(in.q, in.k, in.v, want, want_lse, se, opt);
  expect_close(out, want, 2e-5, 2e-5, "out");
  expect_close(lse, want_lse, 2e-5, 2e-5, "lse");
  EXPECT_EQ(lse(0, 1, 0), sinks(1));  // row 0 sits at qp = -10: no key, lse = the sink
}

TEST(SelfExtend, BeyondWindowMaskAgreesWithVisible) {
  for (std::int64_t size : {1, 5, 64, 100}) {
    const at::mods::beyond_window m{size};
    const std::int64_t qp0 = 37, qn = 45, k0 = 10, kn = 70, ld = 48;
    std::vector<float> s(static_cast<std::size_t>(kn * ld), 0.0f);
    m.mask_tile(s.data(), ld, 0, qp0, qn, k0, kn);
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < qn; ++i)
        ASSERT_EQ(s[static_cast<std::size_t>(j * ld + i)] == 0.0f, m.visible(0, qp0 + i, k0 + j)) << size << " " << i << " " << j;
    const at::tile t = m.block(qp0, qp0 + qn, k0, k0 + kn);
    bool any = false, all = true;
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < qn; ++i) any |= m.visible(0, qp0 + i, k0 + j), all &= m.visible(0, qp0 + i, k0 + j);
    EXPECT_EQ(t == at::tile::empty, !any);
    EXPECT_EQ(t == at::tile::full, all);
  }
}

TEST(SelfExtend, BadArgumentsThrow) {
  const shape s{1, 2, 1, 4, 4, 8, 8, 2, 2};
  const inputs in = make_inputs(s, 1);
  tensor<float, 4> out({1, 2, 4, 8});
  expect_error([&] { at::self_extend(in.q, in.k, in.v, out, {}, {.window = 0}); },
               {"attention::self_extend", "window", ">= 1", "got 0"});
  expect_error([&] { at::self_extend(in.q, in.k, in.v, out, {}, {.group = -1}); },
               {"attention::self_extend", "group", ">= 1", "got -1"});
  expect_error([&] { at::self_extend(in.q, in.k, in.v, out, {}, {.rope = {.dim = 3}}); }, {"rope.dim", "got 3"});
  expect_error([&] { at::reference_self_extend(in.q, in.k, in.v, out, {}, {.rope = {.scaling = kv::rope_scaling::linear, .factor = 0.0}}); },
               {"attention::reference_self_extend", "rope.factor", "got 0"});
  tensor<float, 4> bad_out({1, 2, 3, 8});
  expect_error([&] { at::self_extend(in.q, in.k, in.v, bad_out, {}, {}); }, {"attention::self_extend", "out"});
}

}  // namespace
