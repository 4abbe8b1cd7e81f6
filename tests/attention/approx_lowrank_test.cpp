// Tests for the low-rank / scan attention approximations of attention/approx/: Nyströmformer
// (nystrom.hpp), Performer / FAVOR+ (performer.hpp), Scatterbrain (scatterbrain.hpp) and Aaren
// (aaren.hpp), plus the shared helpers of approx/common.hpp.
//   - each fast path against its own double reference on awkward shapes (L = 1, L not a multiple of
//     the landmarks / chunk / bucket / block, D odd, Lq != Lk, GQA), tight tolerance;
//   - the approximation against exact attention (attention::reference): the error falls as the knob
//     grows (landmarks, features) and is within a stated bound on a smooth case;
//   - exactness limits: Nyström with m = L landmarks, Scatterbrain with one bucket (every key exact),
//     Aaren against causal attention (attention::flash with the causal mask, the query repeated);
//   - every argument check.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <vector>

#include "mnemo/attention/approx/aaren.hpp"
#include "mnemo/attention/approx/nystrom.hpp"
#include "mnemo/attention/approx/performer.hpp"
#include "mnemo/attention/approx/scatterbrain.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/reference.hpp"
#include "support/support.hpp"

namespace {

namespace attn = mnemo::attention;
namespace approx = mnemo::attention::approx;
using mnemo::cview;
using mnemo::tensor;
using mnemo::view;
using mnemo::test::expect_close;
using mnemo::test::expect_error;
using mnemo::test::random_tensor;

// One problem: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv].
struct shape {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
};

struct problem {
  tensor<float, 4> q, k, v;
  problem(const shape& s, std::uint32_t seed, float lo = -1.0f, float hi = 1.0f)
      : q(random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.D}, seed, lo, hi)),
        k(random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.D}, seed + 1, lo, hi)),
        v(random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, seed + 2)) {}
  tensor<float, 4> out() const { return tensor<float, 4>({q.extent(0), q.extent(1), q.extent(2), v.extent(3)}); }
  tensor<float, 4> exact(bool causal = false) const {
    tensor<float, 4> o = out();
    if (causal) attn::reference(cview(q), k, v, o.as_view(), {}, attn::mods::causal{});
    else attn::reference(cview(q), k, v, o.as_view());
    return o;
  }
};

// A smooth case: rows that vary slowly with position (a few low-frequency sinusoids per channel),
// which is what landmark means and low-rank kernels approximate well.
problem smooth_problem(std::int64_t L, std::int64_t D, std::uint32_t seed) {
  problem p({1, 1, 1, L, L, D, D}, seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> phase(0.0f, 2.0f * std::numbers::pi_v<float>), freq(0.5f, 2.0f);
  for (tensor<float, 4>* t : {&p.q, &p.k, &p.v})
    for (std::int64_t c = 0; c < D; ++c) {
      const float f = freq(rng), ph = phase(rng);
      for (std::int64_t i = 0; i < L; ++i)
        (*t)(0, 0, i, c) = std::sin(2.0f * std::numbers::pi_v<float> * f * static_cast<float>(i) / static_cast<float>(L) + ph);
    }
  return p;
}

const std::vector<shape> awkward_shapes = {
    {1, 1, 1, 1, 1, 8, 8},       // L = 1
    {1, 2, 2, 37, 37, 16, 16},   // L not a multiple of anything
    {2, 4, 2, 19, 45, 7, 5},     // GQA 2, Lq != Lk, D and Dv odd
    {1, 3, 1, 131, 131, 9, 12},  // MQA, past one Performer chunk (128)
};

constexpr double tight_atol = 2e-5, tight_rtol = 2e-4;

// ------------------------------------------------------------------------------------------------
// common.hpp

TEST(ApproxCommon, OrthogonalFeaturesAreDeterministicAndOrthogonalInBlocks) {
  const auto w = approx::orthogonal_features(20, 8, 7), again = approx::orthogonal_features(20, 8, 7);
  EXPECT_EQ(mnemo::test::max_abs_diff(w, again), 0.0);
  EXPECT_GT(mnemo::test::max_abs_diff(w, approx::orthogonal_features(20, 8, 8)), 0.0);
  for (std::int64_t blk = 0; blk < 20; blk += 8)
    for (std::int64_t i = blk; i < std::min<std::int64_t>(blk + 8, 20); ++i)
      for (std::int64_t j = blk; j < i; ++j) {
        double dot = 0, ni = 0, nj = 0;
        for (std::int64_t c = 0; c < 8; ++c) dot += w(i, c) * w(j, c), ni += w(i, c) * w(i, c), nj += w(j, c) * w(j, c);
        EXPECT_NEAR(dot / std::sqrt(ni * nj), 0.0, 1e-5) << "rows " << i << ", " << j;
      }
}

TEST(ApproxCommon, RelativeError) {
  tensor<float, 2> a({2, 2}), b({2, 2});
  for (std::int64_t i = 0; i < 4; ++i) b.data()[i] = 1.0f, a.data()[i] = i == 0 ? 3.0f : 1.0f;
  EXPECT_DOUBLE_EQ(approx::relative_error(a, b), 1.0);  // ||(2,0,0,0)|| / ||(1,1,1,1)||
  EXPECT_EQ(approx::relative_error(b, b), 0.0);
}

// ------------------------------------------------------------------------------------------------
// Performer / FAVOR+

TEST(Performer, FastMatchesReference) {
  std::uint32_t seed = 10;
  for (const shape& s : awkward_shapes)
    for (bool causal : {false, true})
      for (std::int64_t m : {1, 33}) {
        const problem p(s, seed += 3);
        const approx::performer_options opt{m, 5, causal};
        auto got = p.out(), want = p.out();
        approx::performer(cview(p.q), cview(p.k), cview(p.v), got.as_view(), opt);
        approx::reference::performer(cview(p.q), cview(p.k), cview(p.v), want.as_view(), opt);
        expect_close(got, want, tight_atol, tight_rtol,
                     "Lq=" + std::to_string(s.Lq) + " Lk=" + std::to_string(s.Lk) + " m=" + std::to_string(m) +
                         " causal=" + std::to_string(causal));
      }
}

TEST(Performer, CausalRowsThatSeeNoKeyAreZero) {
  const problem p({1, 1, 1, 40, 20, 8, 8}, 3);  // bottom-right: rows 0..19 see no key
  auto got = p.out(), want = p.out();
  approx::performer(cview(p.q), cview(p.k), cview(p.v), got.as_view(), {16, 0, true});
  approx::reference::performer(cview(p.q), cview(p.k), cview(p.v), want.as_view(), {16, 0, true});
  expect_close(got, want, tight_atol, tight_rtol);
  for (std::int64_t i = 0; i < 20; ++i) EXPECT_EQ(got(0, 0, i, 0), 0.0f);
  // The prefix-sum form reaches every key at the last row: it equals the non-causal estimate.
  auto full = p.out();
  approx::performer(cview(p.q), cview(p.k), cview(p.v), full.as_view(), {16, 0, false});
  for (std::int64_t c = 0; c < 8; ++c) EXPECT_NEAR(got(0, 0, 39, c), full(0, 0, 39, c), 1e-5);
}

// Error against exact attention, averaged over `seeds` feature draws.
template <class Run>
double mean_error(const problem& p, const tensor<float, 4>& exact, int seeds, Run run) {
  double sum = 0;
  for (int s = 0; s < seeds; ++s) {
    auto o = p.out();
    run(o.as_view(), static_cast<std::uint64_t>(s));
    sum += approx::relative_error(o, exact);
  }
  return sum / seeds;
}

// The error measure is relative to ||exact out||, which is small for random values under a nearly
// uniform softmax; inputs in [-0.5, 0.5] (scaled scores of std ~0.08 at D = 16) keep the case smooth.
// Measured (mean of 4 feature seeds): m = 8, 32, 128, 512 -> 0.27, 0.13, 0.05, 0.03 (non-causal).
TEST(Performer, ErrorFallsWithFeatures) {
  const problem p({1, 2, 2, 200, 200, 16, 16}, 21, -0.5f, 0.5f);
  for (bool causal : {false, true}) {
    const auto exact = p.exact(causal);
    std::vector<double> err;
    for (std::int64_t m : {8, 32, 128, 512})
      err.push_back(mean_error(p, exact, 4, [&](view<float, 4> o, std::uint64_t seed) {
        approx::performer(cview(p.q), cview(p.k), cview(p.v), o, {m, seed, causal});
      }));
    for (std::size_t i = 1; i < err.size(); ++i) EXPECT_LT(err[i], err[i - 1]) << "m index " << i << " causal " << causal;
    // Monte Carlo: the error falls like 1 / sqrt(m); 512 features are within 6% here.
    EXPECT_LT(err.back(), 0.06) << "causal " << causal;
  }
}

// ------------------------------------------------------------------------------------------------
// Scatterbrain

TEST(Scatterbrain, FastMatchesReference) {
  std::uint32_t seed = 40;
  for (const shape& s : awkward_shapes)
    for (std::int64_t buckets : {1, 2, 6})
      for (std::int64_t m : {1, 24}) {
        const problem p(s, seed += 3);
        const approx::scatterbrain_options opt{m, buckets, 9};
        auto got = p.out(), want = p.out();
        approx::scatterbrain(cview(p.q), cview(p.k), cview(p.v), got.as_view(), opt);
        approx::reference::scatterbrain(cview(p.q), cview(p.k), cview(p.v), want.as_view(), opt);
        expect_close(got, want, tight_atol, tight_rtol,
                     "Lq=" + std::to_string(s.Lq) + " buckets=" + std::to_string(buckets) + " m=" + std::to_string(m));
      }
}

TEST(Scatterbrain, OneBucketIsExactAttention) {
  for (const shape& s : awkward_shapes) {
    const problem p(s, 77);
    auto got = p.out();
    approx::scatterbrain(cview(p.q), cview(p.k), cview(p.v), got.as_view(), {16, 1, 3});
    expect_close(got, p.exact(), 1e-5, 1e-4, "Lq=" + std::to_string(s.Lq));
  }
}

TEST(Scatterbrain, ErrorFallsWithFeaturesAndBeatsPerformer) {
  const problem p({1, 2, 2, 200, 200, 16, 16}, 23, -0.5f, 0.5f);
  const auto exact = p.exact();
  std::vector<double> err;
  for (std::int64_t m : {8, 32, 128, 512}) {
    err.push_back(mean_error(p, exact, 4, [&](view<float, 4> o, std::uint64_t seed) {
      approx::scatterbrain(cview(p.q), cview(p.k), cview(p.v), o, {m, 4, seed});
    }));
    const double performer = mean_error(p, exact, 4, [&](view<float, 4> o, std::uint64_t seed) {
      approx::performer(cview(p.q), cview(p.k), cview(p.v), o, {m, seed});
    });
    EXPECT_LT(err.back(), performer) << "m=" << m;  // the exact sparse part only removes error
  }
  for (std::size_t i = 1; i < err.size(); ++i) EXPECT_LT(err[i], err[i - 1]) << "m index " << i;
  EXPECT_LT(err.back(), 0.06);
}

// ------------------------------------------------------------------------------------------------
// Nyströmformer

TEST(Nystrom, FastMatchesReference) {
  std::uint32_t seed = 60;
  for (const shape& s : awkward_shapes)
    for (std::int64_t m : {1, 4, 7})
      for (int iterations : {0, 6}) {
        if (m > std::min(s.Lq, s.Lk)) continue;
        const problem p(s, seed += 3);
        const approx::nystrom_options opt{m, iterations};
        auto got = p.out(), want = p.out();
        approx::nystrom(cview(p.q), cview(p.k), cview(p.v), got.as_view(), opt);
        approx::reference::nystrom(cview(p.q), cview(p.k), cview(p.v), want.as_view(), opt);
        expect_close(got, want, tight_atol, tight_rtol,
                     "Lq=" + std::to_string(s.Lq) + " m=" + std::to_string(m) + " it=" + std::to_string(iterations));
      }
}

TEST(Nystrom, AllLandmarksIsExactUpToThePseudoInverse) {
  for (std::int64_t L : {1, 5, 16}) {
    const problem p({1, 2, 2, L, L, 8, 8}, 81);
    const auto exact = p.exact();
    auto got = p.out();
    approx::nystrom(cview(p.q), cview(p.k), cview(p.v), got.as_view(), {L, 30});  // converged
    expect_close(got, exact, 1e-5, 1e-4, "L=" + std::to_string(L));
    // The paper's 6 iterations leave a residual of the iteration, still small here.
    approx::nystrom(cview(p.q), cview(p.k), cview(p.v), got.as_view(), {L});
    EXPECT_LT(approx::relative_error(got, exact), 0.05) << "L=" << L;
  }
}

TEST(Nystrom, ErrorFallsWithLandmarksOnASmoothCase) {
  const problem p = smooth_problem(256, 16, 5);
  const auto exact = p.exact();
  std::vector<double> err;
  for (std::int64_t m : {2, 8, 32, 128}) {
    auto o = p.out();
    approx::nystrom(cview(p.q), cview(p.k), cview(p.v), o.as_view(), {m, 12});
    err.push_back(approx::relative_error(o, exact));
  }
  for (std::size_t i = 1; i < err.size(); ++i) EXPECT_LT(err[i], err[i - 1]) << "m index " << i;
  EXPECT_LT(err[2], 0.02);  // 32 landmarks on a smooth sequence of 256
}

// ------------------------------------------------------------------------------------------------
// Aaren

struct aaren_shape {
  std::int64_t B, Hq, Hkv, L, D, Dv;
};

const std::vector<aaren_shape> aaren_shapes = {
    {1, 1, 1, 1, 8, 8}, {1, 2, 1, 37, 7, 5}, {2, 4, 2, 100, 16, 16}, {1, 2, 2, 300, 9, 12}};

TEST(Aaren, ScanMatchesTheRecurrence) {
  std::uint32_t seed = 90;
  for (const aaren_shape& s : aaren_shapes)
    for (std::int64_t block : {1, 3, 32, 256}) {
      const auto q = random_tensor<float, 3>({s.B, s.Hq, s.D}, seed += 3, -2.0f, 2.0f);
      const auto k = random_tensor<float, 4>({s.B, s.Hkv, s.L, s.D}, seed + 1, -2.0f, 2.0f);
      const auto v = random_tensor<float, 4>({s.B, s.Hkv, s.L, s.Dv}, seed + 2);
      tensor<float, 4> got({s.B, s.Hq, s.L, s.Dv}), want({s.B, s.Hq, s.L, s.Dv});
      tensor<float, 3> lg({s.B, s.Hq, s.L}), lw({s.B, s.Hq, s.L});
      const approx::aaren_options opt{block};
      approx::aaren(cview(q), cview(k), cview(v), got.as_view(), lg.as_view(), opt);
      approx::reference::aaren(cview(q), cview(k), cview(v), want.as_view(), lw.as_view(), opt);
      const std::string what = "L=" + std::to_string(s.L) + " block=" + std::to_string(block);
      expect_close(got, want, tight_atol, tight_rtol, what);
      expect_close(lg, lw, tight_atol, tight_rtol, what + " lse");
    }
}

TEST(Aaren, EqualsCausalAttentionWithTheQueryAtEveryRow) {
  for (const aaren_shape& s : aaren_shapes) {
    const auto q = random_tensor<float, 3>({s.B, s.Hq, s.D}, 5, -2.0f, 2.0f);
    const auto k = random_tensor<float, 4>({s.B, s.Hkv, s.L, s.D}, 6, -2.0f, 2.0f);
    const auto v = random_tensor<float, 4>({s.B, s.Hkv, s.L, s.Dv}, 7);
    tensor<float, 4> rows({s.B, s.Hq, s.L, s.D});
    for (std::int64_t b = 0; b < s.B; ++b)
      for (std::int64_t h = 0; h < s.Hq; ++h)
        for (std::int64_t t = 0; t < s.L; ++t)
          for (std::int64_t c = 0; c < s.D; ++c) rows(b, h, t, c) = q(b, h, c);
    tensor<float, 4> got({s.B, s.Hq, s.L, s.Dv}), want({s.B, s.Hq, s.L, s.Dv});
    tensor<float, 3> lg({s.B, s.Hq, s.L}), lw({s.B, s.Hq, s.L});
    approx::aaren(cview(q), cview(k), cview(v), got.as_view(), lg.as_view(), {16});
    attn::flash(cview(rows), k, v, want.as_view(), lw.as_view(), attn::mods::causal{});
    expect_close(got, want, 1e-5, 1e-4, "L=" + std::to_string(s.L));
    expect_close(lg, lw, 1e-5, 1e-4, "L=" + std::to_string(s.L) + " lse");
  }
}

// ------------------------------------------------------------------------------------------------
// Argument checks

TEST(ApproxArguments, BadArgumentsThrow) {
  const problem p({1, 2, 1, 16, 16, 8, 8}, 1);
  auto o = p.out();
  const view<float, 4> out = o.as_view();
  tensor<float, 4> wrong({1, 2, 16, 7});
  expect_error([&] { approx::performer(cview(p.q), cview(p.k), cview(p.v), out, {0}); },
               {"approx::performer", "features", "got 0"});
  expect_error([&] { approx::performer(cview(p.q), cview(p.k), cview(p.v), wrong.as_view()); },
               {"approx::performer", "out", "[1, 2, 16, 8]", "[1, 2, 16, 7]"});
  expect_error([&] { approx::reference::performer(cview(p.q), cview(p.k), cview(p.v), out, {-3}); },
               {"approx::reference::performer", "features", "-3"});
  expect_error([&] { approx::scatterbrain(cview(p.q), cview(p.k), cview(p.v), out, {8, 3}); },
               {"approx::scatterbrain", "buckets", "got 3"});
  expect_error([&] { approx::scatterbrain(cview(p.q), cview(p.k), cview(p.v), out, {0, 2}); },
               {"approx::scatterbrain", "features", "got 0"});
  expect_error([&] { approx::scatterbrain(cview(p.q), cview(p.k), cview(p.q), out); },
               {"approx::scatterbrain", "v"});  // v must be [B, Hkv, Lk, Dv] with Hkv from k
  expect_error([&] { approx::nystrom(cview(p.q), cview(p.k), cview(p.v), out, {17}); },
               {"approx::nystrom", "landmarks", "min(Lq, Lk) = 16", "got 17"});
  expect_error([&] { approx::nystrom(cview(p.q), cview(p.k), cview(p.v), out, {0}); },
               {"approx::nystrom", "landmarks", "got 0"});
  expect_error([&] { approx::reference::nystrom(cview(p.q), cview(p.k), cview(p.v), out, {4, -1}); },
               {"approx::reference::nystrom", "pinv_iterations", "-1"});
  expect_error([&] { approx::performer(cview(p.q), cview(p.k), cview(p.v), out, {8, 0, false, std::nanf("")}); },
               {"approx::performer", "scale"});
  tensor<float, 4> shared({1, 2, 16, 8});  // out over memory that k also reads
  const view<const float, 4> k_in_shared(shared.data(), {1, 1, 16, 8});
  expect_error([&] { approx::nystrom(cview(p.q), k_in_shared, cview(p.v), shared.as_view()); },
               {"approx::nystrom", "out", "k"});
  // Aaren
  const auto q3 = random_tensor<float, 3>({1, 2, 8}, 3);
  tensor<float, 3> lse({1, 2, 16}), lse_bad({1, 2, 15});
  expect_error([&] { approx::aaren(cview(q3), cview(p.k), cview(p.v), out, {}, {0}); },
               {"approx::aaren", "block", "got 0"});
  expect_error([&] { approx::aaren(cview(q3), cview(p.k), cview(p.v), out, lse_bad.as_view()); },
               {"approx::aaren", "lse", "[1, 2, 16]", "[1, 2, 15]"});
  tensor<float, 4> short_out({1, 2, 15, 8});
  expect_error([&] { approx::aaren(cview(q3), cview(p.k), cview(p.v), short_out.as_view(), lse.as_view()); },
               {"approx::aaren", "out.shape[2]", "L = k.shape[2] = 16", "got 15"});
  const auto q3_bad = random_tensor<float, 3>({1, 2, 5}, 3);
  expect_error([&] { approx::reference::aaren(cview(q3_bad), cview(p.k), cview(p.v), out); },
               {"approx::reference::aaren", "k", "[1, 1, 16, 5]"});
}

}  // namespace
