// Tests for attention/flash.hpp and attention/flash_backward.hpp (and the tile kernels of
// simd/gemm.hpp and attention/tiles.hpp they are built from): flash against attention::reference
// on shapes around every tile edge, every mod, GQA/MQA, f16/bf16 K/V, strided inputs and fully
// masked rows; flash_backward against reference_backward, reference_backward against finite
// differences of the reference forward; a user mod with the tile members against the built-in
// one; the golden forward, decode and backward cases; and every argument check.
#include <gtest/gtest.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/flash_backward.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/simd/gemm.hpp"
#include "support/support.hpp"

namespace mnemo::attention {
namespace {

constexpr float neg_inf = -std::numeric_limits<float>::infinity();
using traits = flash_traits<>;
constexpr std::int64_t bq = traits::block_q, bk = traits::block_k;

// ---------------------------------------------------------------------------------------------
// Helpers.

template <class T, int R>
tensor<T, R> random_tensor(shape_t<R> shape, std::uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  tensor<T, R> t(shape);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  for (T& x : t) x = T(dist(gen));
  return t;
}

// Max of |got - want| / (atol + rtol |want|) over all elements; -inf must match exactly.
template <class A, class B>
double worst_ratio(const A& got, const B& want, std::int64_t n, double atol, double rtol, std::string* where) {
  double worst = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double g = got(i), w = want(i);
    double r;
    if (std::isinf(w) || std::isinf(g)) r = g == w ? 0.0 : std::numeric_limits<double>::infinity();
    else if (std::isnan(g) || std::isnan(w)) r = std::numeric_limits<double>::infinity();
    else r = std::abs(g - w) / (atol + rtol * std::abs(w));
    if (r > worst) {
      worst = r;
      *where = "element " + std::to_string(i) + ": got " + std::to_string(g) + ", want " + std::to_string(w);
    }
  }
  return worst;
}

// Element-wise |got - want| <= atol + rtol |want| over two same-shaped views (any strides).
template <class T, int R>
void expect_close(view<const T, R> got, view<const T, R> want, double atol, double rtol, const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const shape_t<R> s = got.shape();
  std::int64_t n = got.size();
  auto at = [&](const view<const T, R>& v) {
    return [&v, s](std::int64_t flat) {
      shape_t<R> idx{};
      for (int d = R - 1; d >= 0; --d) {
        idx[d] = flat % s[d];
        flat /= s[d];
      }
      std::int64_t off = 0;
      for (int d = 0; d < R; ++d) off += idx[d] * v.stride(d);
      return static_cast<double>(v.data()[off]);
    };
  };
  std::string where;
  const double worst = worst_ratio(at(got), at(want), n, atol, rtol, &where);
  EXPECT_LE(worst, 1.0) << what << ": worst " << where << " (atol " << atol << ", rtol " << rtol << ")";
}

template <class T, int R>
void expect_close(const tensor<T, R>& got, const tensor<T, R>& want, double atol, double rtol, const std::string& what) {
  expect_close<T, R>(got.as_view(), want.as_view(), atol, rtol, what);
}

double max_abs_diff(const tensor<float, 4>& a, const tensor<float, 4>& b) {
  double m = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a.data()[i]) - double(b.data()[i])));
  return m;
}

struct problem {
  std::int64_t B = 1, Hq = 2, Hkv = 1, Lq = 33, Lk = 47, D = 40, Dv = 40;
  std::string str() const {
    return "B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) +
           " Lq=" + std::to_string(Lq) + " Lk=" + std::to_string(Lk) + " D=" + std::to_string(D) +
           " Dv=" + std::to_string(Dv);
  }
};

// f32 forward tolerances: float32 products and sums against a double reference.
constexpr double fwd_atol = 2e-5, fwd_rtol = 2e-4;

// Runs flash and the reference on one random problem and compares out and lse.
template <class KV = float, class Mod = mods::none>
void check_forward(const problem& p, const Mod& mod = {}, std::uint32_t seed = 1, options opt = {},
                   float input_scale = 1.0f) {
  SCOPED_TRACE(p.str());
  auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, seed, -input_scale, input_scale);
  auto k = random_tensor<KV, 4>({p.B, p.Hkv, p.Lk, p.D}, seed + 1, -input_scale, input_scale);
  auto v = random_tensor<KV, 4>({p.B, p.Hkv, p.Lk, p.Dv}, seed + 2);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv}), ref_out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq}), ref_lse({p.B, p.Hq, p.Lq});
  reference(q, k, v, ref_out, ref_lse, mod, opt);
  flash(q, k, v, out, lse, mod, opt);
  expect_close(out, ref_out, fwd_atol, fwd_rtol, "out");
  expect_close(lse, ref_lse, fwd_atol, fwd_rtol, "lse");
}

// ---------------------------------------------------------------------------------------------
// simd/gemm.hpp tile kernels against their readable loops.

TEST(FlashGemm, MicroKernelsMatchReferenceLoops) {
  constexpr std::int64_t w = flash_traits<>::lanes;
  for (auto order : {simd::a_order::row_major, simd::a_order::col_major})
    for (auto mode : {simd::c_mode::overwrite, simd::c_mode::accumulate, simd::c_mode::rescale})
      for (std::int64_t m : {1, 5, 6, 7, 13})
        for (std::int64_t n : {w, 2 * w, 5 * w, 7 * w})
          for (std::int64_t kc : {0, 1, 17, 64}) {
            SCOPED_TRACE("m=" + std::to_string(m) + " n=" + std::to_string(n) + " kc=" + std::to_string(kc));
            const std::int64_t lda = (order == simd::a_order::row_major ? kc : m) + 3, ldb = n + 5, ldc = n + 2;
            const std::int64_t a_rows = order == simd::a_order::row_major ? m : kc;
            auto a = random_tensor<float, 1>({std::max<std::int64_t>(a_rows * lda, 1)}, 11);
            auto b = random_tensor<float, 1>({std::max<std::int64_t>(kc * ldb, 1)}, 12);
            auto alpha = random_tensor<float, 1>({m}, 13, 0.0f, 1.0f);
            auto c = random_tensor<float, 1>({m * ldc}, 14);
            tensor<float, 1> want = c;
            if (order == simd::a_order::row_major) {
              simd::gemm<simd::a_order::row_major>(m, n, kc, a.data(), lda, b.data(), ldb, c.data(), ldc, mode,
                                                   alpha.data());
              simd::reference::gemm<simd::a_order::row_major>(m, n, kc, a.data(), lda, b.data(), ldb, want.data(),
                                                              ldc, mode, alpha.data());
            } else {
              simd::gemm<simd::a_order::col_major>(m, n, kc, a.data(), lda, b.data(), ldb, c.data(), ldc, mode,
                                                   alpha.data());
              simd::reference::gemm<simd::a_order::col_major>(m, n, kc, a.data(), lda, b.data(), ldb, want.data(),
                                                              ldc, mode, alpha.data());
            }
            // the padding columns [n, ldc) are never written: they keep their input values
            expect_close(c, want, 1e-5, 1e-5, "gemm");
          }
}

TEST(FlashGemm, SoftmaxColumnsMatchReferenceLoops) {
  constexpr std::int64_t w = flash_traits<>::lanes;
  const std::int64_t n = 3 * w, kn = 37, lds = n + w;
  auto s = random_tensor<float, 1>({kn * lds}, 21, -5.0f, 5.0f);
  // column 0 fully masked, column 1 masked in half its keys, column 2 sees a key only at the end
  for (std::int64_t j = 0; j < kn; ++j) {
    s(j * lds + 0) = neg_inf;
    if (j % 2) s(j * lds + 1) = neg_inf;
    if (j + 1 < kn) s(j * lds + 2) = neg_inf;
  }
  auto m = random_tensor<float, 1>({n}, 22, -2.0f, 2.0f);
  m(0) = neg_inf;
  m(2) = neg_inf;
  auto l = random_tensor<float, 1>({n}, 23, 0.5f, 3.0f);
  l(0) = 0.0f;
  l(2) = 0.0f;
  tensor<float, 1> s2 = s, m2 = m, l2 = l, alpha({n}), alpha2({n});
  simd::online_softmax_columns(s.data(), lds, kn, n, m.data(), l.data(), alpha.data());
  simd::reference::online_softmax_columns(s2.data(), lds, kn, n, m2.data(), l2.data(), alpha2.data());
  expect_close(s, s2, 1e-7, 1e-6, "p");
  expect_close(m, m2, 0, 0, "m");
  expect_close(l, l2, 1e-7, 1e-6, "l");
  expect_close(alpha, alpha2, 1e-7, 1e-6, "alpha");
  EXPECT_EQ(m(0), neg_inf);
  EXPECT_EQ(l(0), 0.0f);
  for (std::int64_t j = 0; j < kn; ++j) EXPECT_EQ(s(j * lds + 0), 0.0f);

  // probabilities from lse (one column with lse = -inf) and the softmax gradient
  auto s3 = random_tensor<float, 1>({kn * lds}, 24, -5.0f, 5.0f);
  auto lse = random_tensor<float, 1>({n}, 25, 3.0f, 6.0f);
  lse(1) = neg_inf;
  tensor<float, 1> s4 = s3;
  simd::probs_from_lse_columns(s3.data(), lds, kn, n, lse.data());
  simd::reference::probs_from_lse_columns(s4.data(), lds, kn, n, lse.data());
  expect_close(s3, s4, 1e-7, 1e-6, "p from lse");
  for (std::int64_t j = 0; j < kn; ++j) EXPECT_EQ(s3(j * lds + 1), 0.0f);

  auto dp = random_tensor<float, 1>({kn * lds}, 26);
  auto g = random_tensor<float, 1>({kn * lds}, 27, 0.0f, 1.0f);
  auto delta = random_tensor<float, 1>({n}, 28);
  tensor<float, 1> dp2 = dp, dp3 = dp, dp4 = dp;
  simd::softmax_grad_columns(s3.data(), dp.data(), lds, kn, n, delta.data(), 0.3f, g.data());
  simd::reference::softmax_grad_columns(s3.data(), dp2.data(), lds, kn, n, delta.data(), 0.3f, g.data());
  expect_close(dp, dp2, 1e-7, 1e-6, "dS with f'");
  simd::softmax_grad_columns(s3.data(), dp3.data(), lds, kn, n, delta.data(), 0.3f);
  simd::reference::softmax_grad_columns(s3.data(), dp4.data(), lds, kn, n, delta.data(), 0.3f);
  expect_close(dp3, dp4, 1e-7, 1e-6, "dS");
}

TEST(FlashGemm, ScoreModColumnsMatchScalarMods) {
  constexpr std::int64_t w = flash_traits<>::lanes;
  const std::int64_t n = 3 * w, kn = 29, lds = n + w;
  // scores from tiny to far beyond the cap, both signs, and exact zeros
  auto s = random_tensor<float, 1>({kn * lds}, 31, -80.0f, 80.0f);
  for (std::int64_t j = 0; j < kn; ++j) {
    s(j * lds + 0) = 0.0f;
    s(j * lds + 1) = 1e-4f * static_cast<float>(j - 14);
  }
  auto g = random_tensor<float, 1>({kn * lds}, 32, 0.5f, 1.5f);
  tensor<float, 1> s_ref = s, g_ref = g, s_mod = s;
  simd::softcap_columns(s.data(), g.data(), lds, kn, n, 20.0f);
  simd::reference::softcap_columns(s_ref.data(), g_ref.data(), lds, kn, n, 20.0f);
  const mods::softcap cap{20.0f};
  for (std::int64_t j = 0; j < kn; ++j)
    for (std::int64_t i = 0; i < n; ++i) s_mod(j * lds + i) = cap.score(s_mod(j * lds + i), 0, i, j);
  // a few float ulps of the cap in absolute terms (what a softmax sees), tight relative elsewhere
  expect_close(s, s_ref, 20.0 * 4e-7, 2e-6, "softcap vs reference loop");
  expect_close(s, s_mod, 20.0 * 4e-7, 2e-6, "softcap vs mods::softcap");
  expect_close(g, g_ref, 4e-7, 2e-6, "softcap derivative");
  for (std::int64_t j = 0; j < kn; ++j) EXPECT_EQ(s(j * lds + 0), 0.0f);

  auto a = random_tensor<float, 1>({kn * lds}, 33, -5.0f, 5.0f);
  tensor<float, 1> a_ref = a, a_mod = a;
  const std::int64_t qp0 = 1000, k0 = 990;
  simd::alibi_columns(a.data(), lds, kn, n, 0.125f, qp0, k0);
  simd::reference::alibi_columns(a_ref.data(), lds, kn, n, 0.125f, qp0, k0);
  const std::vector<float> slope{0.125f};
  const mods::alibi alibi{view<const float, 1>(slope.data(), {1})};
  for (std::int64_t j = 0; j < kn; ++j)
    for (std::int64_t i = 0; i < n; ++i) a_mod(j * lds + i) = alibi.score(a_mod(j * lds + i), 0, qp0 + i, k0 + j);
  expect_close(a, a_ref, 1e-6, 1e-6, "alibi vs reference loop");
  expect_close(a, a_mod, 1e-6, 1e-6, "alibi vs mods::alibi");
}

TEST(FlashGemm, SubnormalProbabilitiesAreFlushedToZero) {
  constexpr std::int64_t w = flash_traits<>::lanes;
  const std::int64_t n = w, kn = 3, lds = n;
  // per column: the max 0, one score whose exp is subnormal (-95), one still normal (-80)
  tensor<float, 1> s({kn * lds}), m({n}), l({n}), alpha({n});
  for (std::int64_t i = 0; i < n; ++i) {
    s(0 * lds + i) = 0.0f;
    s(1 * lds + i) = -95.0f;
    s(2 * lds + i) = -80.0f;
    m(i) = -std::numeric_limits<float>::infinity();
  }
  simd::online_softmax_columns(s.data(), lds, kn, n, m.data(), l.data(), alpha.data());
  for (std::int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(s(0 * lds + i), 1.0f);
    EXPECT_EQ(s(1 * lds + i), 0.0f) << "exp(-95) is subnormal: flushed";
    EXPECT_GT(s(2 * lds + i), 0.0f) << "exp(-80) is a normal float: kept";
    EXPECT_EQ(alpha(i), 0.0f);
  }
  tensor<float, 1> lse({n});
  for (std::int64_t i = 0; i < n; ++i) {
    s(0 * lds + i) = 3.0f;
    s(1 * lds + i) = 3.0f - 95.0f;
    s(2 * lds + i) = 3.0f - 80.0f;
    lse(i) = 3.0f;
  }
  simd::probs_from_lse_columns(s.data(), lds, kn, n, lse.data());
  for (std::int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(s(0 * lds + i), 1.0f);
    EXPECT_EQ(s(1 * lds + i), 0.0f);
    EXPECT_GT(s(2 * lds + i), 0.0f);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward against the reference.

TEST(FlashForward, SizesAroundTileEdges) {
  const std::vector<std::int64_t> Ls = {1, bq - 1, bq, bq + 1, 2 * bk + 3};
  for (std::int64_t Lq : Ls)
    for (std::int64_t Lk : {std::int64_t{1}, bk - 1, bk, bk + 1, 2 * bk + 5}) {
      check_forward(problem{1, 2, 1, Lq, Lk, 40, 40}, mods::none{}, 3);
      check_forward(problem{1, 2, 2, Lq, Lk, 64, 64}, mods::causal{}, 4);
    }
}

TEST(FlashForward, HeadDims) {
  for (std::int64_t D : {16, 40, 64, 80, 96, 128, 256}) {
    check_forward(problem{1, 2, 1, 70, 90, D, D}, mods::none{}, 5);
    check_forward(problem{1, 1, 1, 70, 70, D, D}, mods::causal{}, 6);
  }
  check_forward(problem{1, 2, 2, 50, 70, 40, 24});   // Dv < D, Dv not a multiple of the width
  check_forward(problem{1, 2, 2, 50, 70, 64, 128});  // Dv > D
  check_forward(problem{1, 1, 1, 20, 30, 3, 5});     // tiny head dims still work
}

TEST(FlashForward, LongSequence) {
  check_forward(problem{1, 1, 1, 1000, 1000, 40, 40}, mods::causal{}, 7);
  check_forward(problem{1, 1, 1, 37, 1000, 64, 64}, mods::none{}, 8);
}

TEST(FlashForward, GroupedQueryAndMultiQuery) {
  for (std::int64_t ratio : {1, 4, 8}) {
    check_forward(problem{2, 8, 8 / ratio, 67, 67, 64, 64}, mods::causal{}, 9);
    check_forward(problem{1, 8, 8 / ratio, 1, 300, 40, 40}, mods::none{}, 10);  // decode-like
  }
  check_forward(problem{1, 6, 1, 50, 77, 32, 32});  // MQA, 6 heads on one kv head
}

TEST(FlashForward, LqDiffersFromLk) {
  check_forward(problem{1, 2, 1, 30, 150, 40, 40}, mods::causal{}, 11);   // prefill against a cache
  check_forward(problem{1, 2, 1, 150, 30, 40, 40}, mods::none{}, 12);     // Lq > Lk
  check_forward(problem{1, 2, 1, 150, 30, 40, 40}, mods::causal{}, 13);   // Lq > Lk: empty rows
  check_forward(problem{2, 4, 2, 100, 1, 64, 64}, mods::causal{}, 14);    // one key
}

// A mask without block classification: every tile is partial.
struct dilated_causal {
  bool visible(std::int64_t qp, std::int64_t kp) const { return kp <= qp && (qp - kp) % 3 == 0; }
};

// A mask with its own tile classifier.
struct band {
  std::int64_t width = 70;
  bool visible(std::int64_t qp, std::int64_t kp) const { return kp <= qp + width && kp >= qp - width; }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    if (k0 > q1 - 1 + width || k1 - 1 < q0 - width) return tile::empty;
    if (k0 >= q1 - 1 - width && k1 - 1 <= q0 + width) return tile::full;
    return tile::partial;
  }
};

// A nonlinear user score mod with its derivative (so it also works in the backward pass).
struct quadratic_score {
  template <class S>
  S score(S s, std::int64_t h, std::int64_t, std::int64_t) const {
    return s - S(0.05) * s * s + S(0.01) * static_cast<S>(h);
  }
  template <class S>
  S score_derivative(S s, std::int64_t, std::int64_t, std::int64_t) const {
    return S(1) - S(0.1) * s;
  }
};

// A user score mod without a derivative: forward only.
struct position_bias {
  template <class S>
  S score(S s, std::int64_t, std::int64_t qp, std::int64_t kp) const {
    return s + S(0.002) * static_cast<S>((qp * 7 + kp * 3) % 11);
  }
};

// Every row whose position is even sees nothing.
struct odd_rows_only {
  bool visible(std::int64_t qp, std::int64_t kp) const { return qp % 2 != 0 && kp <= qp; }
};

// A per-head mask (the head-aware visible of mods.hpp): head h sees the 16 (h + 1) keys ending at
// its diagonal. No block(), so every tile is partial and masked per element for its head.
struct head_window {
  bool visible(std::int64_t h, std::int64_t qp, std::int64_t kp) const { return kp <= qp && qp - kp < 16 * (h + 1); }
};

// Nothing is visible to anyone.
struct nothing_visible {
  bool visible(std::int64_t, std::int64_t) const { return false; }
  tile block(std::int64_t, std::int64_t, std::int64_t, std::int64_t) const { return tile::empty; }
};

TEST(FlashForward, EveryMod) {
  const problem p{1, 4, 2, 150, 170, 40, 40};
  const auto slopes = mods::alibi_slopes(p.Hq);
  const view<const float, 1> sl(slopes.data(), {p.Hq});
  std::vector<std::int64_t> ids(p.Lk);
  for (std::int64_t j = 0; j < p.Lk; ++j) ids[j] = j < 40 ? 0 : j < 41 ? 1 : j < 120 ? 2 : 3;
  const view<const std::int64_t, 1> doc_ids(ids.data(), {p.Lk});

  check_forward(p, mods::causal{});
  check_forward(p, mods::sliding_window{33});
  check_forward(p, mods::sliding_window{1});
  check_forward(p, mods::alibi{sl});
  check_forward(p, mods::softcap{2.0f}, 1, {}, 3.0f);  // scores of a few units: the cap bites
  check_forward(p, mods::document{doc_ids});
  check_forward(p, mods::all_of(mods::document{doc_ids}, mods::causal{}));
  check_forward(p, mods::prefix_lm{100});
  check_forward(p, mods::prefix_lm{0});
  check_forward(p, dilated_causal{});
  check_forward(p, band{});
  check_forward(p, quadratic_score{});
  check_forward(p, position_bias{});
  check_forward(p, mods::all_of(mods::softcap{5.0f}, mods::alibi{sl}, mods::sliding_window{50}), 2, {}, 3.0f);
  check_forward(p, mods::all_of(mods::sliding_window{90}, mods::prefix_lm{30}, band{}, quadratic_score{}));
  check_forward(p, odd_rows_only{});
  check_forward(p, head_window{});
  check_forward(p, mods::all_of(mods::alibi{sl}, head_window{}, mods::causal{}));
  // Unions of masks: a window plus a shared prefix, a window plus whole documents, old-form parts.
  check_forward(p, mods::any_of(mods::sliding_window{20}, mods::prefix_lm{30}));
  check_forward(p, mods::any_of(mods::sliding_window{8}, mods::all_of(mods::document{doc_ids}, mods::causal{})));
  check_forward(p, mods::all_of(mods::softcap{2.0f}, mods::alibi{sl}, mods::any_of(band{}, dilated_causal{})), 3, {},
                3.0f);
  check_forward(p, mods::any_of(head_window{}, mods::prefix_lm{5}));
}

TEST(FlashForward, FullyMaskedRowsGiveZeroAndMinusInf) {
  const problem p{1, 2, 1, 150, 70, 64, 64};  // Lq > Lk causal: the first 80 rows see no key
  auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, 30);
  auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, 31);
  auto v = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.Dv}, 32);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  for (float& x : out) x = std::numeric_limits<float>::quiet_NaN();  // every element must be written
  flash(q, k, v, out, lse, mods::causal{});
  for (std::int64_t h = 0; h < p.Hq; ++h)
    for (std::int64_t i = 0; i < p.Lq; ++i) {
      const bool empty = i < p.Lq - p.Lk;
      EXPECT_EQ(lse(0, h, i) == neg_inf, empty) << "h=" << h << " i=" << i;
      for (std::int64_t c = 0; c < p.Dv; ++c) {
        ASSERT_FALSE(std::isnan(out(0, h, i, c))) << "h=" << h << " i=" << i << " c=" << c;
        if (empty) {
          ASSERT_EQ(out(0, h, i, c), 0.0f) << "h=" << h << " i=" << i << " c=" << c;
        }
      }
    }
  // a mask that empties rows inside partial tiles, next to rows that see keys
  tensor<float, 4> out2({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse2({p.B, p.Hq, p.Lq});
  flash(q, k, v, out2, lse2, odd_rows_only{});
  for (std::int64_t i = 0; i < p.Lq; ++i) {
    const std::int64_t qp = i + p.Lk - p.Lq;
    const bool empty = qp < 0 || qp % 2 == 0;
    EXPECT_EQ(lse2(0, 0, i) == neg_inf, empty) << "i=" << i;
    if (empty) {
      EXPECT_EQ(out2(0, 0, i, 0), 0.0f) << "i=" << i;
    }
  }
  // no row sees any key
  flash(q, k, v, out, lse, nothing_visible{});
  for (float x : out) ASSERT_EQ(x, 0.0f);
  for (float x : lse) ASSERT_EQ(x, neg_inf);
}

TEST(FlashForward, StridedBLHDLayoutWithoutCopies) {
  // [B, L, H, D] buffers with padded rows (row stride H * (D + 3)), read as [B, H, L, D] views.
  const std::int64_t B = 2, Hq = 4, Hkv = 2, Lq = 70, Lk = 90, D = 48, Dv = 32, pad = 3;
  auto make = [&](std::int64_t L, std::int64_t H, std::int64_t E, std::uint32_t seed, tensor<float, 4>& buf) {
    buf = random_tensor<float, 4>({B, L, H, E + pad}, seed);
    return view<float, 4>(buf.data(), {B, L, H, E}, {L * H * (E + pad), H * (E + pad), E + pad, 1})
        .permute({0, 2, 1, 3});
  };
  tensor<float, 4> qb, kb, vb, ob;
  const auto q = make(Lq, Hq, D, 40, qb);
  const auto k = make(Lk, Hkv, D, 41, kb);
  const auto v = make(Lk, Hkv, Dv, 42, vb);
  const auto out = make(Lq, Hq, Dv, 43, ob);
  const tensor<float, 4> ob_before = ob;
  tensor<float, 4> ref_out({B, Hq, Lq, Dv});
  tensor<float, 3> lse({B, Hq, Lq}), ref_lse({B, Hq, Lq});
  const view<const float, 4> cq = q, ck = k, cv = v;
  reference(cq, ck, cv, ref_out, ref_lse, mods::causal{});
  flash(cq, ck, cv, out, lse, mods::causal{});
  expect_close<float, 4>(out, ref_out.as_view(), fwd_atol, fwd_rtol, "strided out");
  expect_close(lse, ref_lse, fwd_atol, fwd_rtol, "lse");
  // nothing outside the view was written: the padding keeps its values
  for (std::int64_t i = 0; i < ob.size(); ++i)
    if (i % (Dv + pad) >= Dv) {
      ASSERT_EQ(ob.data()[i], ob_before.data()[i]) << "padding element " << i;
    }
}

TEST(FlashForward, ResultDoesNotDependOnThreadCount) {
  const problem p{2, 4, 2, 150, 170, 64, 64};
  auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, 50);
  auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, 51);
  auto v = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.Dv}, 52);
  tensor<float, 4> o1({p.B, p.Hq, p.Lq, p.Dv}), o2({p.B, p.Hq, p.Lq, p.Dv});
  options one, two;
  one.threads = 1;
  two.threads = 2;
  flash(q, k, v, o1, {}, mods::causal{}, one);
  flash(q, k, v, o2, {}, mods::causal{}, two);
  EXPECT_EQ(max_abs_diff(o1, o2), 0.0);
}

TEST(FlashForward, CustomScale) {
  options opt;
  opt.scale = 0.05f;
  check_forward(problem{1, 2, 2, 20, 33, 40, 40}, mods::none{}, 60, opt);
  opt.scale = -0.3f;
  check_forward(problem{1, 2, 2, 20, 33, 40, 40}, mods::causal{}, 61, opt);
}

// f16/bf16 K/V: flash must be as close to the exact (f32 K/V) answer as the reference run on the
// same rounded K/V, within 2x its error (plus a float32 atol), and close to that reference run.
template <class KV>
void check_half_kv(const problem& p, std::uint32_t seed) {
  SCOPED_TRACE(p.str() + " kv=" + dtype_name<KV>());
  auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, seed);
  auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, seed + 1);
  auto v = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.Dv}, seed + 2);
  tensor<KV, 4> kh(k.shape()), vh(v.shape());
  for (std::int64_t i = 0; i < k.size(); ++i) kh.data()[i] = KV(k.data()[i]);
  for (std::int64_t i = 0; i < v.size(); ++i) vh.data()[i] = KV(v.data()[i]);
  const shape_t<4> os{p.B, p.Hq, p.Lq, p.Dv};
  tensor<float, 4> exact(os), ref_half(os), flash_half(os);
  reference(q, k, v, exact, {}, mods::causal{});
  reference(q, kh, vh, ref_half, {}, mods::causal{});
  flash(q, kh, vh, flash_half, {}, mods::causal{});
  const double ref_err = max_abs_diff(ref_half, exact), flash_err = max_abs_diff(flash_half, exact);
  EXPECT_GT(ref_err, 0.0);  // the rounding is visible, so the comparison means something
  EXPECT_LE(flash_err, 2.0 * ref_err + fwd_atol) << "reference error " << ref_err;
  expect_close(flash_half, ref_half, fwd_atol, fwd_rtol, "flash vs reference on the same rounded K/V");
}

TEST(FlashForward, HalfPrecisionKeysAndValues) {
  for (const problem& p : {problem{1, 4, 2, 70, 130, 64, 64}, problem{1, 2, 1, 33, 65, 40, 24}}) {
    check_half_kv<f16>(p, 70);
    check_half_kv<bf16>(p, 71);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct grads {
  tensor<float, 4> dq, dk, dv;
  explicit grads(const problem& p)
      : dq({p.B, p.Hq, p.Lq, p.D}), dk({p.B, p.Hkv, p.Lk, p.D}), dv({p.B, p.Hkv, p.Lk, p.Dv}) {}
};

// f32 backward tolerances: products and sums over up to Lq * group terms in float32.
constexpr double bwd_atol = 5e-5, bwd_rtol = 1e-3;

template <class Mod = mods::none>
void check_backward(const problem& p, const Mod& mod = {}, std::uint32_t seed = 1, float input_scale = 1.0f) {
  SCOPED_TRACE(p.str());
  auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, seed, -input_scale, input_scale);
  auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, seed + 1, -input_scale, input_scale);
  auto v = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.Dv}, seed + 2);
  auto dout = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.Dv}, seed + 3);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  flash(q, k, v, out, lse, mod);
  grads fast(p), ref(p);
  for (tensor<float, 4>* g : {&fast.dq, &fast.dk, &fast.dv})  // every element must be written
    std::fill(g->begin(), g->end(), std::numeric_limits<float>::quiet_NaN());
  flash_backward(q, k, v, out, lse, dout, fast.dq, fast.dk, fast.dv, mod);
  reference_backward(q, k, v, dout, ref.dq, ref.dk, ref.dv, mod);
  expect_close(fast.dq, ref.dq, bwd_atol, bwd_rtol, "dq");
  expect_close(fast.dk, ref.dk, bwd_atol, bwd_rtol, "dk");
  expect_close(fast.dv, ref.dv, bwd_atol, bwd_rtol, "dv");
}

TEST(FlashBackward, SizesAroundTileEdges) {
  for (std::int64_t Lq : {std::int64_t{1}, bq - 1, bq + 1})
    for (std::int64_t Lk : {std::int64_t{1}, bk, bk + 1}) {
      check_backward(problem{1, 2, 1, Lq, Lk, 40, 40}, mods::none{}, 80);
      check_backward(problem{1, 2, 2, Lq, Lk, 64, 64}, mods::causal{}, 81);
    }
}

TEST(FlashBackward, HeadDimsAndGroups) {
  check_backward(problem{1, 2, 2, 50, 70, 40, 24}, mods::none{}, 82);
  check_backward(problem{1, 2, 2, 50, 70, 96, 128}, mods::causal{}, 83);
  check_backward(problem{1, 8, 2, 70, 90, 64, 64}, mods::causal{}, 84);
  check_backward(problem{2, 8, 1, 40, 60, 32, 32}, mods::none{}, 85);
  check_backward(problem{1, 4, 4, 100, 40, 48, 48}, mods::causal{}, 86);  // Lq > Lk: empty rows
}

TEST(FlashBackward, EveryMod) {
  const problem p{1, 4, 2, 90, 110, 40, 40};
  const auto slopes = mods::alibi_slopes(p.Hq);
  const view<const float, 1> sl(slopes.data(), {p.Hq});
  std::vector<std::int64_t> ids(p.Lk);
  for (std::int64_t j = 0; j < p.Lk; ++j) ids[j] = j < 30 ? 0 : j < 75 ? 1 : 2;
  const view<const std::int64_t, 1> doc_ids(ids.data(), {p.Lk});
  check_backward(p, mods::sliding_window{20});
  check_backward(p, mods::alibi{sl});
  check_backward(p, mods::softcap{2.0f}, 1, 3.0f);
  check_backward(p, mods::all_of(mods::document{doc_ids}, mods::causal{}));
  check_backward(p, mods::prefix_lm{40});
  check_backward(p, dilated_causal{});
  check_backward(p, band{});
  check_backward(p, quadratic_score{});
  check_backward(p, odd_rows_only{});
  check_backward(p, head_window{});
  check_backward(p, mods::all_of(mods::softcap{3.0f}, mods::any_of(mods::sliding_window{10}, mods::prefix_lm{25})),
                 1, 3.0f);
  check_backward(p, mods::all_of(mods::softcap{4.0f}, mods::alibi{sl}, mods::sliding_window{30}), 2, 3.0f);
  static_assert(backward_supported<mods::all_of_t<mods::softcap, mods::alibi, mods::causal>>);
  static_assert(backward_supported<quadratic_score>);
  static_assert(!backward_supported<position_bias>, "a score mod without score_derivative has no backward");
  static_assert(!backward_supported<mods::all_of_t<mods::causal, position_bias>>);
}

// A user's copy of mods::softcap written to the whole mod contract of mods.hpp: score, its
// derivative, the tile-level score_tile and validate. Kernels hold no switch on the built-in
// type, so this copy takes the built-in's vector path: the results agree bit for bit (the
// per-element fallback, std::tanh per score, would not).
struct user_softcap {
  float cap = 0;

  template <class S>
  S score(S s, std::int64_t, std::int64_t, std::int64_t) const {
    using std::tanh;
    return static_cast<S>(cap) * tanh(s / static_cast<S>(cap));
  }
  template <class S>
  S score_derivative(S s, std::int64_t, std::int64_t, std::int64_t) const {
    using std::tanh;
    const S t = tanh(s / static_cast<S>(cap));
    return S(1) - t * t;
  }
  template <class Arch>
  void score_tile(float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t, std::int64_t nq, std::int64_t,
                  std::int64_t, std::int64_t) const {
    simd::softcap_columns<Arch>(s, g, ld, kn, nq, cap);
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t) const {
    mnemo::detail::require(cap > 0, fn, ": user_softcap.cap must be > 0, got ", cap);
  }
};

template <class UserMod, class BuiltInMod>
void expect_same_as_built_in(const problem& p, const UserMod& user, const BuiltInMod& built_in) {
  SCOPED_TRACE(p.str());
  static_assert(has_score_tile<UserMod, simd::default_arch> && has_score_derivative<UserMod>);
  auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, 110, -3.0f, 3.0f);
  auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, 111, -3.0f, 3.0f);
  auto v = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.Dv}, 112);
  auto dout = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.Dv}, 113);
  tensor<float, 4> out_u({p.B, p.Hq, p.Lq, p.Dv}), out_b({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse_u({p.B, p.Hq, p.Lq}), lse_b({p.B, p.Hq, p.Lq});
  flash(q, k, v, out_u, lse_u, user);
  flash(q, k, v, out_b, lse_b, built_in);
  EXPECT_EQ(max_abs_diff(out_u, out_b), 0.0) << "forward out";
  for (std::int64_t i = 0; i < lse_u.size(); ++i) ASSERT_EQ(lse_u.data()[i], lse_b.data()[i]) << "lse " << i;
  grads gu(p), gb(p);
  flash_backward(q, k, v, out_b, lse_b, dout, gu.dq, gu.dk, gu.dv, user);
  flash_backward(q, k, v, out_b, lse_b, dout, gb.dq, gb.dk, gb.dv, built_in);
  EXPECT_EQ(max_abs_diff(gu.dq, gb.dq), 0.0) << "dq";
  EXPECT_EQ(max_abs_diff(gu.dk, gb.dk), 0.0) << "dk";
  EXPECT_EQ(max_abs_diff(gu.dv, gb.dv), 0.0) << "dv";
  check_forward(p, user, 114, {}, 3.0f);  // and both against the reference
  check_backward(p, user, 115, 3.0f);
}

TEST(FlashMods, UserModWithTileMembersRunsTheBuiltInPath) {
  const problem p{1, 4, 2, 90, 110, 40, 40};
  const auto slopes = mods::alibi_slopes(p.Hq);
  const view<const float, 1> sl(slopes.data(), {p.Hq});
  expect_same_as_built_in(p, user_softcap{2.0f}, mods::softcap{2.0f});
  expect_same_as_built_in(p, mods::all_of(user_softcap{4.0f}, mods::alibi{sl}, mods::causal{}),
                          mods::all_of(mods::softcap{4.0f}, mods::alibi{sl}, mods::causal{}));
}

// sum(out * dout) of the double-precision reference forward (out rounded to float).
template <class Mod>
double loss(const tensor<float, 4>& q, const tensor<float, 4>& k, const tensor<float, 4>& v,
            const tensor<float, 4>& dout, const Mod& mod) {
  tensor<float, 4> out(dout.shape());
  reference(q, k, v, out, {}, mod);
  double s = 0;
  for (std::int64_t i = 0; i < out.size(); ++i) s += double(out.data()[i]) * double(dout.data()[i]);
  return s;
}

// d loss / d x[i] by central differences, with the perturbation as actually stored in float.
double central_difference(tensor<float, 4>& x, std::int64_t i, const std::function<double()>& f) {
  constexpr float step = 1.0f / 64;
  const float x0 = x.data()[i];
  x.data()[i] = x0 + step;
  const float up = x.data()[i];
  const double f_up = f();
  x.data()[i] = x0 - step;
  const float down = x.data()[i];
  const double f_down = f();
  x.data()[i] = x0;
  return (f_up - f_down) / (double(up) - double(down));
}

template <class Mod>
void check_finite_differences(const problem& p, const Mod& mod, float input_scale) {
  SCOPED_TRACE(p.str());
  auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, 90, -input_scale, input_scale);
  auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, 91, -input_scale, input_scale);
  auto v = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.Dv}, 92);
  auto dout = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.Dv}, 93);
  grads ref(p);
  reference_backward(q, k, v, dout, ref.dq, ref.dk, ref.dv, mod);
  const std::function<double()> f = [&] { return loss(q, k, v, dout, mod); };
  // The loss is a sum of float-rounded outputs: its noise (~1e-7 per term) over the step 2/64
  // bounds how well a difference quotient can agree; the O(step^2) truncation term is smaller.
  constexpr double atol = 2e-4, rtol = 2e-3;
  for (auto [x, g, name] : {std::tuple{&q, &ref.dq, "dq"}, std::tuple{&k, &ref.dk, "dk"}, std::tuple{&v, &ref.dv, "dv"}})
    for (std::int64_t i = 0; i < x->size(); i += 3) {
      const double fd = central_difference(*x, i, f);
      EXPECT_NEAR(g->data()[i], fd, atol + rtol * std::abs(fd)) << name << "[" << i << "]";
    }
}

TEST(FlashBackward, ReferenceMatchesFiniteDifferences) {
  const problem p{1, 2, 1, 5, 7, 4, 3};
  const auto slopes = mods::alibi_slopes(p.Hq);
  const view<const float, 1> sl(slopes.data(), {p.Hq});
  check_finite_differences(p, mods::none{}, 1.0f);
  check_finite_differences(p, mods::causal{}, 1.0f);
  check_finite_differences(p, mods::all_of(mods::softcap{1.5f}, mods::alibi{sl}, mods::sliding_window{4}), 3.0f);
  check_finite_differences(p, quadratic_score{}, 2.0f);
}

// Attention sinks (options.sinks) in the backward: flash_backward (from the forward's lse, which
// includes the sinks) against reference_backward, dsinks included; the reference's gradients
// (q, k, v and the sinks) against central differences of the reference forward with sinks.
TEST(FlashBackward, SinksMatchTheReferenceAndFiniteDifferences) {
  for (const problem& p : {problem{2, 4, 2, 70, 130, 40, 24}, problem{1, 2, 1, 5, 7, 4, 3}}) {
    SCOPED_TRACE(p.str());
    auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, 110), k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, 111);
    auto v = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.Dv}, 112), dout = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.Dv}, 113);
    tensor<float, 1> sinks = random_tensor<float, 1>({p.Hq}, 114, -1.0f, 2.0f);
    options opt;
    opt.sinks = sinks.as_view();
    // Window 4, Lq > Lk - 4 somewhere: some rows see few keys, so the sink weighs in.
    const auto mod = mods::sliding_window{4};
    tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
    tensor<float, 3> lse({p.B, p.Hq, p.Lq});
    flash(q, k, v, out, lse, mod, opt);
    grads fast(p), ref(p);
    tensor<float, 1> ds_fast({p.Hq}), ds_ref({p.Hq});
    flash_backward(q, k, v, out, lse, dout, fast.dq, fast.dk, fast.dv, mod, opt, ds_fast.as_view());
    reference_backward(q, k, v, dout, ref.dq, ref.dk, ref.dv, mod, opt, ds_ref.as_view());
    expect_close(fast.dq, ref.dq, bwd_atol, bwd_rtol, "dq");
    expect_close(fast.dk, ref.dk, bwd_atol, bwd_rtol, "dk");
    expect_close(fast.dv, ref.dv, bwd_atol, bwd_rtol, "dv");
    expect_close(ds_fast, ds_ref, bwd_atol, bwd_rtol, "dsinks");
    // Without the sinks the gradients differ (the test would not see a backward that ignores them).
    grads plain(p);
    reference_backward(q, k, v, dout, plain.dq, plain.dk, plain.dv, mod);
    EXPECT_GT(max_abs_diff(plain.dq, ref.dq), 1e-3);
    if (p.Lq > 5) continue;
    const std::function<double()> f = [&] {
      tensor<float, 4> o(dout.shape());
      reference(q, k, v, o, {}, mod, opt);
      double sum = 0;
      for (std::int64_t i = 0; i < o.size(); ++i) sum += double(o.data()[i]) * double(dout.data()[i]);
      return sum;
    };
    constexpr double atol = 2e-4, rtol = 2e-3;
    for (auto [x, g, name] : {std::tuple{&q, &ref.dq, "dq"}, std::tuple{&k, &ref.dk, "dk"}, std::tuple{&v, &ref.dv, "dv"}})
      for (std::int64_t i = 0; i < x->size(); i += 3)
        EXPECT_NEAR(g->data()[i], central_difference(*x, i, f), atol + rtol * std::abs(g->data()[i])) << name << "[" << i << "]";
    for (std::int64_t h = 0; h < p.Hq; ++h) {
      constexpr float step = 1.0f / 64;
      const float s0 = sinks(h);
      sinks(h) = s0 + step;
      const double up = f();
      sinks(h) = s0 - step;
      const double down = f();
      sinks(h) = s0;
      const double fd = (up - down) / (2.0 * step);
      EXPECT_NEAR(ds_ref(h), fd, atol + rtol * std::abs(fd)) << "dsinks[" << h << "]";
    }
  }
  // dsinks without options.sinks is an error naming the argument.
  const problem p{1, 2, 1, 3, 5, 4, 4};
  auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, 1), k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, 2);
  auto v = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.Dv}, 3), dout = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.Dv}, 4);
  grads g(p);
  tensor<float, 1> ds({p.Hq});
  EXPECT_THROW(reference_backward(q, k, v, dout, g.dq, g.dk, g.dv, mods::none{}, {}, ds.as_view()), mnemo::error);
}

TEST(FlashBackward, ResultDoesNotDependOnThreadCount) {
  const problem p{1, 4, 2, 100, 130, 40, 40};
  auto q = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, 95);
  auto k = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, 96);
  auto v = random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.Dv}, 97);
  auto dout = random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.Dv}, 98);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  flash(q, k, v, out, lse, mods::causal{});
  grads a(p), b(p);
  options one, two;
  one.threads = 1;
  two.threads = 2;
  flash_backward(q, k, v, out, lse, dout, a.dq, a.dk, a.dv, mods::causal{}, one);
  flash_backward(q, k, v, out, lse, dout, b.dq, b.dk, b.dv, mods::causal{}, two);
  EXPECT_EQ(max_abs_diff(a.dq, b.dq), 0.0);
  EXPECT_EQ(max_abs_diff(a.dk, b.dk), 0.0);
  EXPECT_EQ(max_abs_diff(a.dv, b.dv), 0.0);
}

TEST(FlashBackward, StridedBLHDLayout) {
  const std::int64_t B = 1, Hq = 4, Hkv = 2, Lq = 70, Lk = 90, D = 32, Dv = 40;
  auto blhd = [](tensor<float, 4>& buf) { return buf.as_view().permute({0, 2, 1, 3}); };
  auto q = random_tensor<float, 4>({B, Lq, Hq, D}, 100), k = random_tensor<float, 4>({B, Lk, Hkv, D}, 101);
  auto v = random_tensor<float, 4>({B, Lk, Hkv, Dv}, 102), dout = random_tensor<float, 4>({B, Lq, Hq, Dv}, 103);
  tensor<float, 4> out({B, Lq, Hq, Dv}), dq({B, Lq, Hq, D}), dk({B, Lk, Hkv, D}), dv({B, Lk, Hkv, Dv});
  tensor<float, 3> lse({B, Hq, Lq});
  const view<const float, 4> cq = blhd(q), ck = blhd(k), cv = blhd(v), cdout = blhd(dout);
  flash(cq, ck, cv, blhd(out), lse, mods::causal{});
  flash_backward(cq, ck, cv, view<const float, 4>(blhd(out)), lse, cdout, blhd(dq), blhd(dk), blhd(dv), mods::causal{});
  const problem p{B, Hq, Hkv, Lq, Lk, D, Dv};
  grads ref(p);
  reference_backward(cq, ck, cv, cdout, ref.dq, ref.dk, ref.dv, mods::causal{});
  expect_close<float, 4>(blhd(dq), ref.dq.as_view(), bwd_atol, bwd_rtol, "dq");
  expect_close<float, 4>(blhd(dk), ref.dk.as_view(), bwd_atol, bwd_rtol, "dk");
  expect_close<float, 4>(blhd(dv), ref.dv.as_view(), bwd_atol, bwd_rtol, "dv");
}

// ---------------------------------------------------------------------------------------------
// Golden cases (../shared/golden): attention_forward, attention_decode, attention_backward.

std::filesystem::path golden_dir() { return MNEMO_GOLDEN_DIR; }

nlohmann::json read_meta(const std::filesystem::path& dir) {
  std::ifstream in(dir / "meta.json");
  return nlohmann::json::parse(in);
}

std::vector<std::filesystem::path> golden_cases(const std::vector<std::string>& ops) {
  std::vector<std::filesystem::path> out;
  if (!std::filesystem::exists(golden_dir())) return out;
  for (const auto& e : std::filesystem::directory_iterator(golden_dir())) {
    if (!std::filesystem::exists(e.path() / "meta.json")) continue;
    const std::string op = read_meta(e.path())["op"];
    if (std::find(ops.begin(), ops.end(), op) != ops.end()) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Calls f(mod) with the case's mods composed in the golden order: softcap, ALiBi, then the mask.
template <class F>
void with_golden_mod(const nlohmann::json& p, view<const float, 1> slopes, F&& f) {
  const bool causal = p["causal"];
  const std::int64_t window = p["window"];
  const float cap = p["softcap"];
  const bool alibi = p["alibi"];
  auto mask_step = [&](auto... score_parts) {
    if (window > 0) f(mods::all_of(score_parts..., mods::sliding_window{window}));
    else if (causal) f(mods::all_of(score_parts..., mods::causal{}));
    else f(mods::all_of(score_parts...));
  };
  auto alibi_step = [&](auto... parts) {
    if (alibi) mask_step(parts..., mods::alibi{slopes});
    else mask_step(parts...);
  };
  if (cap > 0) alibi_step(mods::softcap{cap});
  else alibi_step();
}

TEST(FlashGolden, ForwardAndDecodeCases) {
  const auto cases = golden_cases({"attention_forward", "attention_decode"});
  if (cases.empty()) GTEST_SKIP() << "no golden cases at " << golden_dir();
  EXPECT_EQ(cases.size(), 22u);
  for (const auto& dir : cases) {
    SCOPED_TRACE(dir.filename().string());
    const auto meta = read_meta(dir);
    const auto& p = meta["params"];
    const auto q = npy::load<float, 4>((dir / "q.npy").string());
    const auto k = npy::load<float, 4>((dir / "k.npy").string());
    const auto v = npy::load<float, 4>((dir / "v.npy").string());
    const auto want_out = npy::load<float, 4>((dir / "out.npy").string());
    const auto want_lse = npy::load<float, 3>((dir / "lse.npy").string());
    tensor<float, 1> slopes({p["Hq"].get<std::int64_t>()});
    if (p["alibi"]) slopes = npy::load<float, 1>((dir / "alibi_slopes.npy").string());
    options opt;
    opt.scale = p["scale"].get<float>();
    tensor<float, 4> out(want_out.shape());
    tensor<float, 3> lse(want_lse.shape());
    with_golden_mod(p, slopes.as_view(), [&](const auto& mod) { flash(q, k, v, out, lse, mod, opt); });
    const double atol = meta["atol"], rtol = meta["rtol"];
    expect_close(out, want_out, atol, rtol, "out");
    expect_close(lse, want_lse, atol, rtol, "lse");
  }
}

TEST(FlashGolden, BackwardCases) {
  const auto cases = golden_cases({"attention_backward"});
  if (cases.empty()) GTEST_SKIP() << "no golden cases at " << golden_dir();
  EXPECT_EQ(cases.size(), 4u);
  for (const auto& dir : cases) {
    SCOPED_TRACE(dir.filename().string());
    const auto meta = read_meta(dir);
    const auto& p = meta["params"];
    auto load4 = [&](const char* name) { return npy::load<float, 4>((dir / (std::string(name) + ".npy")).string()); };
    const auto q = load4("q"), k = load4("k"), v = load4("v"), dout = load4("dout");
    const auto want_out = load4("out"), want_dq = load4("dq"), want_dk = load4("dk"), want_dv = load4("dv");
    const auto want_lse = npy::load<float, 3>((dir / "lse.npy").string());
    tensor<float, 1> slopes({p["Hq"].get<std::int64_t>()});
    if (p["alibi"]) slopes = npy::load<float, 1>((dir / "alibi_slopes.npy").string());
    options opt;
    opt.scale = p["scale"].get<float>();
    const double atol = meta["atol"], rtol = meta["rtol"];
    tensor<float, 4> out(want_out.shape()), dq(want_dq.shape()), dk(want_dk.shape()), dv(want_dv.shape());
    tensor<float, 4> rdq(want_dq.shape()), rdk(want_dk.shape()), rdv(want_dv.shape());
    tensor<float, 3> lse(want_lse.shape());
    with_golden_mod(p, slopes.as_view(), [&](const auto& mod) {
      flash(q, k, v, out, lse, mod, opt);
      flash_backward(q, k, v, out, lse, dout, dq, dk, dv, mod, opt);
      reference_backward(q, k, v, dout, rdq, rdk, rdv, mod, opt);
    });
    expect_close(out, want_out, atol, rtol, "out");
    expect_close(lse, want_lse, atol, rtol, "lse");
    expect_close(dq, want_dq, atol, rtol, "flash dq");
    expect_close(dk, want_dk, atol, rtol, "flash dk");
    expect_close(dv, want_dv, atol, rtol, "flash dv");
    expect_close(rdq, want_dq, atol, rtol, "reference dq");
    expect_close(rdk, want_dk, atol, rtol, "reference dk");
    expect_close(rdv, want_dv, atol, rtol, "reference dv");
  }
}

// ---------------------------------------------------------------------------------------------
// Bad input: every check throws mnemo::error naming the argument.

using mnemo::test::expect_error;

TEST(FlashErrors, ForwardArguments) {
  tensor<float, 4> q({1, 4, 10, 16}), k({1, 2, 12, 16}), v({1, 2, 12, 8}), out({1, 4, 10, 8});
  tensor<float, 3> lse({1, 4, 10});
  const std::string fn = "attention::flash";
  expect_error([&] { flash(q, k, v, view<float, 4>{}, lse); }, {fn, "out must have shape [1, 4, 10, 8]", "got [0, 0, 0, 0]"});
  expect_error([&] { flash(q, tensor<float, 4>({1, 2, 12, 15}), v, out, lse); }, {fn, "k must have shape", "[1, 2, 12, 16]"});
  expect_error([&] { flash(q, k, tensor<float, 4>({1, 2, 11, 8}), out, lse); }, {fn, "v must have shape", "[1, 2, 11, 8]"});
  expect_error([&] { flash(q, tensor<float, 4>({1, 3, 12, 16}), tensor<float, 4>({1, 3, 12, 8}), out, lse); },
               {fn, "Hq", "Hkv=3"});
  expect_error([&] { flash(q, k, v, tensor<float, 4>({1, 4, 10, 9}), lse); }, {fn, "out must have shape", "[1, 4, 10, 8]"});
  expect_error([&] { flash(q, k, v, out, tensor<float, 3>({1, 4, 11})); }, {fn, "lse must have shape", "[1, 4, 11]"});
  options bad_scale;
  bad_scale.scale = std::numeric_limits<float>::infinity();
  expect_error([&] { flash(q, k, v, out, lse, mods::none{}, bad_scale); }, {fn, "options.scale"});
  options bad_threads;
  bad_threads.threads = -1;
  expect_error([&] { flash(q, k, v, out, lse, mods::none{}, bad_threads); }, {fn, "options.threads", "-1"});
  expect_error([&] { flash(q, k, v, out, lse, mods::sliding_window{0}); }, {fn, "sliding_window.size", "0"});
  expect_error([&] { flash(q, k, v, out, lse, mods::softcap{0.0f}); }, {fn, "softcap.cap"});
  const std::vector<float> slopes(3, 0.5f);
  expect_error([&] { flash(q, k, v, out, lse, mods::alibi{view<const float, 1>(slopes.data(), {3})}); },
               {fn, "alibi.slopes", "[4]", "[3]"});
  const std::vector<std::int64_t> ids(11, 0);
  expect_error([&] { flash(q, k, v, out, lse, mods::document{view<const std::int64_t, 1>(ids.data(), {11})}); },
               {fn, "document.ids", "[12]", "[11]"});
  expect_error([&] { flash(q, k, v, out, lse, mods::prefix_lm{-1}); }, {fn, "prefix_lm.prefix", "-1"});
  // f16 K/V go through the same checks
  tensor<f16, 4> kh({1, 2, 12, 16}), vh({1, 2, 13, 8});
  expect_error([&] { flash(q, kh, vh, out, lse); }, {fn, "v must have shape"});
}

TEST(FlashErrors, BackwardArguments) {
  tensor<float, 4> q({1, 4, 10, 16}), k({1, 2, 12, 16}), v({1, 2, 12, 8}), out({1, 4, 10, 8}), dout({1, 4, 10, 8});
  tensor<float, 4> dq({1, 4, 10, 16}), dk({1, 2, 12, 16}), dv({1, 2, 12, 8});
  tensor<float, 3> lse({1, 4, 10});
  const std::string fn = "attention::flash_backward";
  auto call = [&](view<const float, 3> l, view<const float, 4> dO, view<float, 4> gq, view<float, 4> gk,
                  view<float, 4> gv) { flash_backward(q, k, v, out, l, dO, gq, gk, gv); };
  EXPECT_NO_THROW(call(lse, dout, dq, dk, dv));
  expect_error([&] { call({}, dout, dq, dk, dv); }, {fn, "lse", "empty"});
  expect_error([&] { call(tensor<float, 3>({1, 4, 9}), dout, dq, dk, dv); }, {fn, "lse must have shape", "[1, 4, 9]"});
  expect_error([&] { call(lse, tensor<float, 4>({1, 4, 10, 7}), dq, dk, dv); }, {fn, "dout must have shape", "[1, 4, 10, 7]"});
  tensor<float, 4> bad_dq({1, 4, 10, 15}), bad_dk({1, 2, 11, 16}), bad_dv({1, 1, 12, 8});
  expect_error([&] { call(lse, dout, bad_dq, dk, dv); }, {fn, "dq must have shape", "[1, 4, 10, 15]"});
  expect_error([&] { call(lse, dout, dq, bad_dk, dv); }, {fn, "dk must have shape", "[1, 2, 11, 16]"});
  expect_error([&] { call(lse, dout, dq, dk, bad_dv); }, {fn, "dv must have shape", "[1, 1, 12, 8]"});
  expect_error([&] { call(lse, dout, view<float, 4>{}, dk, dv); }, {fn, "non-empty"});
  expect_error([&] { flash_backward(q, tensor<float, 4>({1, 2, 12, 17}), v, out, lse, dout, dq, dk, dv); },
               {fn, "k must have shape"});
  expect_error([&] { flash_backward(q, k, v, tensor<float, 4>({1, 4, 10, 9}), lse, dout, dq, dk, dv); },
               {fn, "out must have shape"});
  expect_error([&] { flash_backward(q, k, v, out, lse, dout, dq, dk, dv, mods::sliding_window{-2}); },
               {fn, "sliding_window.size"});
  expect_error([&] { reference_backward(q, k, v, dout, dq, dk, bad_dv); },
               {"attention::reference_backward", "dv must have shape"});
}

}  // namespace
}  // namespace mnemo::attention
