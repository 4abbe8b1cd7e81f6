// Tests for attention/topk.hpp (the selection primitive itself: tests/simd/select_test.cpp): top-k
// attention and Loki against their double references and against
// attention::reference with the equivalent selection as an explicit mask (GQA, Lq != Lk, causal
// prefill rows, rows that see nothing, f16 K/V); top_k >= visible keys against the dense golden
// cases; the Loki basis (orthonormal, variance ordered, finds a planted subspace); every check.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mnemo/attention/reference.hpp"
#include "mnemo/attention/sparse.hpp"
#include "mnemo/attention/topk.hpp"
#include "mnemo/core/npy.hpp"

namespace mnemo::attention {
namespace {

template <class T, int R>
tensor<T, R> random_tensor(shape_t<R> shape, std::uint32_t seed) {
  tensor<T, R> t(shape);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (T& x : t) x = T(dist(gen));
  return t;
}

template <class F>
void expect_error(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "expected mnemo::error containing '" << *parts.begin() << "'";
  } catch (const mnemo::error& e) {
    for (const char* p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Top-k attention and Loki.

struct shape {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv, top_k;
};

const std::vector<shape> shapes = {
    {1, 8, 2, 1, 1000, 128, 128, 64},  // decode, GQA 4
    {1, 4, 4, 37, 37, 40, 40, 5},      // causal prefill rows: early rows see fewer than k keys
    {1, 4, 1, 20, 300, 64, 32, 17},    // MQA, Lq < Lk, Dv != D
    {2, 2, 2, 30, 20, 32, 32, 4},      // Lq > Lk: the first 10 rows see nothing
};

// Selection scores in double for one row: scale * q . k (Loki: over the first `rank` rotated
// coordinates), -inf where the causal mask hides the key.
std::vector<double> row_scores(const tensor<float, 4>& q, const tensor<float, 4>& k, std::int64_t b, std::int64_t h,
                               std::int64_t hk, std::int64_t i, std::int64_t qp, double scale, std::int64_t dims,
                               const loki_basis* basis) {
  const std::int64_t Lk = k.extent(2), D = k.extent(3);
  std::vector<double> qr(static_cast<std::size_t>(D));
  for (std::int64_t c = 0; c < D; ++c) {
    if (!basis) {
      qr[c] = q(b, h, i, c);
      continue;
    }
    double x = 0;
    for (std::int64_t e = 0; e < D; ++e) x += double(basis->components(hk, c, e)) * q(b, h, i, e);
    qr[c] = x;
  }
  std::vector<double> s(static_cast<std::size_t>(Lk), -std::numeric_limits<double>::infinity());
  for (std::int64_t j = 0; j <= std::min(qp, Lk - 1); ++j) {
    double x = 0;
    for (std::int64_t c = 0; c < dims; ++c) x += qr[c] * k(b, hk, j, c);
    s[j] = scale * x;
  }
  return s;
}

// The selected row is a top-k of s up to `tol` (ties within tol may go either way), of the right
// size, ascending, -1 padded.
void expect_valid_selection(const std::int64_t* sel, std::int64_t top_k, const std::vector<double>& s, double tol,
                            const std::string& what) {
  std::int64_t visible = 0;
  for (double x : s) visible += std::isfinite(x);
  const std::int64_t n = std::min(top_k, visible);
  std::set<std::int64_t> chosen;
  for (std::int64_t t = 0; t < top_k; ++t) {
    if (t < n) {
      ASSERT_GE(sel[t], 0) << what;
      ASSERT_LT(sel[t], static_cast<std::int64_t>(s.size())) << what;
      EXPECT_TRUE(std::isfinite(s[sel[t]])) << what << ": selected a hidden key " << sel[t];
      if (t) {
        EXPECT_LT(sel[t - 1], sel[t]) << what;
      }
      chosen.insert(sel[t]);
    } else {
      EXPECT_EQ(sel[t], -1) << what;
    }
  }
  double worst_in = std::numeric_limits<double>::infinity(), best_out = -std::numeric_limits<double>::infinity();
  for (std::int64_t j = 0; j < static_cast<std::int64_t>(s.size()); ++j) {
    if (chosen.count(j)) worst_in = std::min(worst_in, s[j]);
    else best_out = std::max(best_out, s[j]);
  }
  if (n > 0) {
    EXPECT_GE(worst_in, best_out - tol) << what << ": not a top-k";
  }
}

// out/lse of the fast path equal attention::reference over exactly the selected keys of each
// (batch, head, row), the selection given to it as an explicit element mask.
void expect_matches_masked_reference(const tensor<float, 4>& q, const tensor<float, 4>& k, const tensor<float, 4>& v,
                                     const tensor<float, 4>& out, const tensor<float, 3>& lse,
                                     const tensor<std::int64_t, 4>& selected, float scale, const std::string& what) {
  const std::int64_t B = q.extent(0), Hq = q.extent(1), Lq = q.extent(2), Hkv = k.extent(1), Lk = k.extent(2);
  const std::int64_t top_k = selected.extent(3), G = Hq / Hkv;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hq; ++h) {
      tensor<std::uint8_t, 2> mask({Lk, Lk});
      for (std::int64_t i = 0; i < Lq; ++i) {
        const std::int64_t qp = i + Lk - Lq;
        for (std::int64_t t = 0; t < top_k; ++t)
          if (selected(b, h, i, t) >= 0) mask(qp, selected(b, h, i, t)) = 1;
      }
      tensor<float, 4> want({1, 1, Lq, v.extent(3)});
      tensor<float, 3> want_lse({1, 1, Lq});
      const view<const float, 4> qv = cview(q).narrow(0, b, 1).narrow(1, h, 1);
      const view<const float, 4> kv = cview(k).narrow(0, b, 1).narrow(1, h / G, 1);
      const view<const float, 4> vv = cview(v).narrow(0, b, 1).narrow(1, h / G, 1);
      reference(qv, kv, vv, want.as_view(), want_lse.as_view(), sparse::dense_mask{mask.as_view()}, options{scale, 1});
      for (std::int64_t i = 0; i < Lq; ++i) {
        for (std::int64_t c = 0; c < v.extent(3); ++c)
          EXPECT_NEAR(out(b, h, i, c), want(0, 0, i, c), 1e-5 + 1e-4 * std::abs(want(0, 0, i, c)))
              << what << " b=" << b << " h=" << h << " i=" << i;
        if (std::isinf(want_lse(0, 0, i))) {
          EXPECT_EQ(lse(b, h, i), want_lse(0, 0, i)) << what;
        } else {
          EXPECT_NEAR(lse(b, h, i), want_lse(0, 0, i), 1e-5 + 1e-4 * std::abs(want_lse(0, 0, i))) << what;
        }
      }
    }
}

TEST(TopKAttention, ExactSelectionAndMaskedReference) {
  std::uint32_t seed = 10;
  for (const shape& s : shapes) {
    const auto q = random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.D}, seed++);
    const auto k = random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.D}, seed++);
    const auto v = random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, seed++);
    tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv}), ref_out({s.B, s.Hq, s.Lq, s.Dv});
    tensor<float, 3> lse({s.B, s.Hq, s.Lq}), ref_lse({s.B, s.Hq, s.Lq});
    tensor<std::int64_t, 4> sel({s.B, s.Hq, s.Lq, s.top_k}), ref_sel({s.B, s.Hq, s.Lq, s.top_k});
    const std::string what = "Lq=" + std::to_string(s.Lq) + " Lk=" + std::to_string(s.Lk);
    topk_attention(cview(q), cview(k), cview(v), s.top_k, out.as_view(), lse.as_view(), sel.as_view(), mods::causal{},
                   options{0, 2});
    reference_topk_attention(cview(q), cview(k), cview(v), s.top_k, ref_out.as_view(), ref_lse.as_view(),
                             ref_sel.as_view(), mods::causal{});
    const double scale = 1.0 / std::sqrt(double(s.D));
    std::int64_t same = 0, rows = 0;
    for (std::int64_t b = 0; b < s.B; ++b)
      for (std::int64_t h = 0; h < s.Hq; ++h)
        for (std::int64_t i = 0; i < s.Lq; ++i) {
          const auto sc = row_scores(q, k, b, h, h / (s.Hq / s.Hkv), i, i + s.Lk - s.Lq, scale, s.D, nullptr);
          expect_valid_selection(sel.as_view().ptr(b, h, i), s.top_k, sc, 1e-5, what);
          bool eq = std::equal(sel.as_view().ptr(b, h, i), sel.as_view().ptr(b, h, i) + s.top_k, ref_sel.as_view().ptr(b, h, i));
          ++rows;
          same += eq;
          if (!eq) continue;
          for (std::int64_t c = 0; c < s.Dv; ++c)
            EXPECT_NEAR(out(b, h, i, c), ref_out(b, h, i, c), 1e-5 + 1e-4 * std::abs(ref_out(b, h, i, c))) << what;
          if (std::isinf(ref_lse(b, h, i))) {
            EXPECT_EQ(lse(b, h, i), ref_lse(b, h, i)) << what;
          } else {
            EXPECT_NEAR(lse(b, h, i), ref_lse(b, h, i), 1e-5 + 1e-4 * std::abs(ref_lse(b, h, i))) << what;
          }
        }
    EXPECT_GE(same, rows * 95 / 100) << what << ": f32 and double selections differ in more than near-ties";
    expect_matches_masked_reference(q, k, v, out, lse, sel, 0, what);
  }
}

TEST(TopKAttention, HalfPrecisionKV) {
  const shape s{1, 4, 2, 3, 500, 64, 64, 32};
  const auto q = random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.D}, 1);
  const auto k = random_tensor<f16, 4>({s.B, s.Hkv, s.Lk, s.D}, 2);
  const auto v = random_tensor<f16, 4>({s.B, s.Hkv, s.Lk, s.Dv}, 3);
  tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv}), ref({s.B, s.Hq, s.Lq, s.Dv});
  tensor<std::int64_t, 4> sel({s.B, s.Hq, s.Lq, s.top_k}), ref_sel({s.B, s.Hq, s.Lq, s.top_k});
  topk_attention(cview(q), cview(k), cview(v), s.top_k, out.as_view(), {}, sel.as_view(), mods::causal{});
  reference_topk_attention(cview(q), cview(k), cview(v), s.top_k, ref.as_view(), {}, ref_sel.as_view(), mods::causal{});
  std::int64_t rows_equal = 0;
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t i = 0; i < s.Lq; ++i) {
      const bool eq = std::equal(sel.as_view().ptr(0, h, i), sel.as_view().ptr(0, h, i) + s.top_k, ref_sel.as_view().ptr(0, h, i));
      rows_equal += eq;
      for (std::int64_t c = 0; eq && c < s.Dv; ++c) EXPECT_NEAR(out(0, h, i, c), ref(0, h, i, c), 1e-5 + 1e-4 * std::abs(ref(0, h, i, c)));
    }
  EXPECT_GE(rows_equal, s.Hq * s.Lq - 1);
}

// With top_k >= every visible key, top-k attention is dense attention: the golden cases.
TEST(TopKAttention, GoldenDenseWhenKCoversAllKeys) {
  const std::filesystem::path dir = MNEMO_GOLDEN_DIR;
  if (!std::filesystem::exists(dir / "attn_fwd_causal")) GTEST_SKIP() << "no golden cases at " << dir;
  for (const char* name : {"attn_fwd_causal", "attn_fwd_gqa_causal", "decode_gqa_d128", "attn_fwd_masked_rows"}) {
    const std::filesystem::path c = dir / name;
    std::ifstream meta(c / "meta.json");
    const auto j = nlohmann::json::parse(meta);
    ASSERT_TRUE(j["params"]["causal"].get<bool>()) << name;
    const auto q = npy::load<float, 4>((c / "q.npy").string());
    const auto k = npy::load<float, 4>((c / "k.npy").string());
    const auto v = npy::load<float, 4>((c / "v.npy").string());
    const auto want = npy::load<float, 4>((c / "out.npy").string());
    const auto want_lse = npy::load<float, 3>((c / "lse.npy").string());
    const double atol = j["atol"], rtol = j["rtol"];
    tensor<float, 4> out(want.shape());
    tensor<float, 3> lse(want_lse.shape());
    topk_attention(cview(q), cview(k), cview(v), k.extent(2), out.as_view(), lse.as_view(), {}, mods::causal{},
                   options{j["params"]["scale"].get<float>(), 2});
    for (std::int64_t i = 0; i < out.size(); ++i)
      EXPECT_NEAR(out.data()[i], want.data()[i], atol + rtol * std::abs(want.data()[i])) << name;
    for (std::int64_t i = 0; i < lse.size(); ++i) {
      if (std::isinf(want_lse.data()[i])) {
        EXPECT_EQ(lse.data()[i], want_lse.data()[i]) << name;
      } else {
        EXPECT_NEAR(lse.data()[i], want_lse.data()[i], atol + rtol * std::abs(want_lse.data()[i])) << name;
      }
    }
  }
}

// Keys with a planted low-rank structure: k = sum_r z_r sigma_r u_r + noise, u_r orthonormal.
tensor<float, 4> low_rank_keys(std::int64_t B, std::int64_t H, std::int64_t L, std::int64_t D, std::int64_t rank,
                               std::uint32_t seed, tensor<float, 2>* directions = nullptr) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  // Orthonormal directions by Gram-Schmidt of random vectors.
  std::vector<std::vector<double>> u;
  for (std::int64_t r = 0; r < rank; ++r) {
    std::vector<double> x(D);
    for (double& e : x) e = normal(gen);
    for (const auto& p : u) {
      double d = 0;
      for (std::int64_t c = 0; c < D; ++c) d += x[c] * p[c];
      for (std::int64_t c = 0; c < D; ++c) x[c] -= d * p[c];
    }
    double nrm = 0;
    for (double e : x) nrm += e * e;
    for (double& e : x) e /= std::sqrt(nrm);
    u.push_back(x);
  }
  if (directions) {
    *directions = tensor<float, 2>({rank, D});
    for (std::int64_t r = 0; r < rank; ++r)
      for (std::int64_t c = 0; c < D; ++c) (*directions)(r, c) = static_cast<float>(u[r][c]);
  }
  tensor<float, 4> k({B, H, L, D});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t j = 0; j < L; ++j) {
        for (std::int64_t c = 0; c < D; ++c) k(b, h, j, c) = 0.05f * normal(gen);
        for (std::int64_t r = 0; r < rank; ++r) {
          const float z = normal(gen) * std::pow(0.7f, static_cast<float>(r)) * 2.0f;
          for (std::int64_t c = 0; c < D; ++c) k(b, h, j, c) += z * static_cast<float>(u[r][c]);
        }
      }
  return k;
}

TEST(Loki, CalibrationFindsThePlantedSubspace) {
  const std::int64_t D = 48, rank = 6;
  tensor<float, 2> u;
  const auto keys = low_rank_keys(2, 2, 400, D, rank, 5, &u);
  const loki_basis basis = loki_calibrate(cview(keys));
  ASSERT_EQ(basis.heads(), 2);
  ASSERT_EQ(basis.dim(), D);
  for (std::int64_t h = 0; h < 2; ++h) {
    for (std::int64_t a = 0; a < D; ++a) {
      for (std::int64_t b = 0; b < D; ++b) {
        double d = 0;
        for (std::int64_t c = 0; c < D; ++c) d += double(basis.components(h, a, c)) * basis.components(h, b, c);
        EXPECT_NEAR(d, a == b ? 1.0 : 0.0, 1e-5);
      }
      if (a) {
        EXPECT_GE(basis.variance(h, a - 1), basis.variance(h, a));
      }
    }
    // Every planted direction lies (almost) in the span of the first `rank` components.
    for (std::int64_t r = 0; r < rank; ++r) {
      double in_span = 0;
      for (std::int64_t a = 0; a < rank; ++a) {
        double d = 0;
        for (std::int64_t c = 0; c < D; ++c) d += double(basis.components(h, a, c)) * u(r, c);
        in_span += d * d;
      }
      EXPECT_GT(in_span, 0.99) << "direction " << r;
    }
  }
  // loki_rotate = k P^T, in double.
  tensor<float, 4> k_rot(keys.shape());
  loki_rotate(cview(keys), basis, k_rot.as_view());
  for (std::int64_t j = 0; j < 400; j += 37)
    for (std::int64_t a = 0; a < D; ++a) {
      double d = 0;
      for (std::int64_t c = 0; c < D; ++c) d += double(basis.components(1, a, c)) * keys(1, 1, j, c);
      EXPECT_NEAR(k_rot(1, 1, j, a), d, 1e-4);
    }
}

TEST(Loki, MatchesReferenceAndMaskedDense) {
  std::uint32_t seed = 40;
  for (const shape& s : shapes) {
    const std::int64_t rank = std::max<std::int64_t>(4, s.D / 4);
    const auto q = random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.D}, seed++);
    const auto k = low_rank_keys(s.B, s.Hkv, s.Lk, s.D, 8, seed++);
    const auto v = random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, seed++);
    const loki_basis basis = loki_calibrate(cview(k));
    tensor<float, 4> k_rot(k.shape()), k_low({s.B, s.Hkv, s.Lk, rank});
    loki_rotate(cview(k), basis, k_rot.as_view(), k_low.as_view());
    tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv}), ref_out({s.B, s.Hq, s.Lq, s.Dv});
    tensor<float, 3> lse({s.B, s.Hq, s.Lq}), ref_lse({s.B, s.Hq, s.Lq});
    tensor<std::int64_t, 4> sel({s.B, s.Hq, s.Lq, s.top_k}), ref_sel({s.B, s.Hq, s.Lq, s.top_k});
    const std::string what = "loki Lq=" + std::to_string(s.Lq) + " Lk=" + std::to_string(s.Lk);
    loki_attention(cview(q), cview(k_rot), cview(k_low), cview(v), basis, s.top_k, out.as_view(), lse.as_view(),
                   sel.as_view(), mods::causal{}, options{0, 2});
    reference_loki_attention(cview(q), cview(k_rot), cview(k_low), cview(v), basis, s.top_k, ref_out.as_view(),
                             ref_lse.as_view(), ref_sel.as_view(), mods::causal{});
    const double scale = 1.0 / std::sqrt(double(s.D));
    std::int64_t same = 0, rows = 0;
    for (std::int64_t b = 0; b < s.B; ++b)
      for (std::int64_t h = 0; h < s.Hq; ++h)
        for (std::int64_t i = 0; i < s.Lq; ++i) {
          const std::int64_t hk = h / (s.Hq / s.Hkv);
          const auto approx = row_scores(q, k_rot, b, h, hk, i, i + s.Lk - s.Lq, scale, rank, &basis);
          expect_valid_selection(sel.as_view().ptr(b, h, i), s.top_k, approx, 1e-5, what);
          const bool eq = std::equal(sel.as_view().ptr(b, h, i), sel.as_view().ptr(b, h, i) + s.top_k, ref_sel.as_view().ptr(b, h, i));
          ++rows;
          same += eq;
          for (std::int64_t c = 0; eq && c < s.Dv; ++c)
            EXPECT_NEAR(out(b, h, i, c), ref_out(b, h, i, c), 1e-5 + 1e-4 * std::abs(ref_out(b, h, i, c))) << what;
        }
    EXPECT_GE(same, rows * 95 / 100) << what;
    // Exact attention over the chosen keys, with the original keys.
    expect_matches_masked_reference(q, k, v, out, lse, sel, 0, what);
  }
}

TEST(Loki, FullRankSelectsTheExactTopK) {
  const shape s{1, 4, 2, 2, 600, 64, 64, 40};
  const auto q = random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.D}, 3);
  const auto k = low_rank_keys(s.B, s.Hkv, s.Lk, s.D, 8, 4);
  const auto v = random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, 5);
  const loki_basis basis = loki_calibrate(cview(k));
  tensor<float, 4> k_rot(k.shape()), k_low(k.shape()), out({s.B, s.Hq, s.Lq, s.Dv});
  loki_rotate(cview(k), basis, k_rot.as_view(), k_low.as_view());
  tensor<std::int64_t, 4> sel({s.B, s.Hq, s.Lq, s.top_k});
  loki_attention(cview(q), cview(k_rot), cview(k_low), cview(v), basis, s.top_k, out.as_view(), {}, sel.as_view(),
                 mods::causal{});
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t i = 0; i < s.Lq; ++i) {
      const auto exact = row_scores(q, k, 0, h, h / 2, i, i + s.Lk - s.Lq, 0.125, s.D, nullptr);
      expect_valid_selection(sel.as_view().ptr(0, h, i), s.top_k, exact, 1e-5, "full rank");
    }
}

// The mask defaults agree: with every key selected (top_k = Lk, and for Loki the full rank),
// top-k and Loki attention called without a mod equal attention::reference called without one
// (no mask), on prefill rows where a causal default would differ.
TEST(TopKAttention, DefaultMaskIsNoMaskLikeTheReference) {
  const std::int64_t Hq = 4, Hkv = 2, L = 13, D = 16;
  const auto q = random_tensor<float, 4>({1, Hq, L, D}, 71);
  const auto k = random_tensor<float, 4>({1, Hkv, L, D}, 72);
  const auto v = random_tensor<float, 4>({1, Hkv, L, D}, 73);
  tensor<float, 4> want({1, Hq, L, D}), got({1, Hq, L, D}), causal({1, Hq, L, D});
  reference(cview(q), cview(k), cview(v), want.as_view());
  topk_attention(cview(q), cview(k), cview(v), L, got.as_view());
  double worst = 0;
  for (std::int64_t i = 0; i < want.size(); ++i) worst = std::max(worst, double(std::abs(got.data()[i] - want.data()[i])));
  EXPECT_LT(worst, 1e-5) << "topk_attention's default mask";
  reference(cview(q), cview(k), cview(v), causal.as_view(), {}, mods::causal{});
  double apart = 0;
  for (std::int64_t i = 0; i < want.size(); ++i) apart = std::max(apart, double(std::abs(causal.data()[i] - want.data()[i])));
  EXPECT_GT(apart, 1e-2) << "the case must tell a causal default from none";
  const loki_basis basis = loki_calibrate(cview(k));
  tensor<float, 4> k_rot(k.shape()), k_low({1, Hkv, L, D});
  loki_rotate(cview(k), basis, k_rot.as_view(), k_low.as_view());
  loki_attention(cview(q), cview(k_rot), cview(k_low), cview(v), basis, L, got.as_view());
  worst = 0;
  for (std::int64_t i = 0; i < want.size(); ++i) worst = std::max(worst, double(std::abs(got.data()[i] - want.data()[i])));
  EXPECT_LT(worst, 1e-4) << "loki_attention's default mask";
}

TEST(TopKErrors, Arguments) {
  const auto q = random_tensor<float, 4>({1, 2, 3, 16}, 1);
  const auto k = random_tensor<float, 4>({1, 1, 20, 16}, 2);
  tensor<float, 4> out({1, 2, 3, 16});
  tensor<std::int64_t, 4> sel({1, 2, 3, 5});
  expect_error([&] { topk_attention(cview(q), cview(k), cview(k), 0, out.as_view()); }, {"attention::topk_attention", "top_k", ">= 1", "got 0"});
  expect_error([&] { topk_attention(cview(q), cview(k), cview(k), 4, out.as_view(), {}, sel.as_view()); },
               {"selected", "[1, 2, 3, 4]"});
  expect_error([&] { reference_topk_attention(cview(q), cview(k), cview(k), 0, out.as_view()); }, {"reference_topk_attention", "got 0"});
  const tensor<float, 4> bad_k({1, 1, 20, 8});
  expect_error([&] { topk_attention(cview(q), cview(bad_k), cview(bad_k), 4, out.as_view()); }, {"k", "[B, Hkv, Lk, D]"});

  const loki_basis basis = loki_calibrate(cview(k));
  const tensor<float, 4> low({1, 1, 20, 4}), wide({1, 1, 20, 17}), short_low({1, 1, 19, 4});
  expect_error([&] { loki_attention(cview(q), cview(k), view<const float, 4>{}, cview(k), basis, 4, out.as_view()); },
               {"k_low", "non-empty"});
  expect_error([&] { loki_attention(cview(q), cview(k), cview(wide), cview(k), basis, 4, out.as_view()); },
               {"k_low.shape[3]", "[1, 16]", "got 17"});
  expect_error([&] { loki_attention(cview(q), cview(k), cview(short_low), cview(k), basis, 4, out.as_view()); },
               {"k_low", "[1, 1, 20, 4]"});
  expect_error([&] { reference_loki_attention(cview(q), cview(k), cview(wide), cview(k), basis, 4, out.as_view()); },
               {"k_low.shape[3]", "got 17"});
  expect_error([&] { loki_attention(cview(q), cview(k), cview(low), cview(k), basis, 0, out.as_view()); },
               {"top_k", "got 0"});
  const loki_basis other = loki_calibrate(cview(random_tensor<float, 4>({1, 2, 20, 16}, 3)));
  expect_error([&] { loki_attention(cview(q), cview(k), cview(low), cview(k), other, 4, out.as_view()); },
               {"basis.components", "[1, 16, 16]", "got [2, 16, 16]"});
  tensor<float, 4> k_rot({1, 1, 19, 16});
  expect_error([&] { loki_rotate(cview(k), basis, k_rot.as_view()); }, {"loki_rotate", "k_rot", "[1, 1, 20, 16]"});
  expect_error([&] { loki_rotate(cview(k), other, k_rot.as_view()); }, {"loki_rotate", "basis.components"});
  tensor<float, 4> good_rot({1, 1, 20, 16}), bad_low({1, 1, 20, 17});
  expect_error([&] { loki_rotate(cview(k), basis, good_rot.as_view(), bad_low.as_view()); }, {"k_low.shape[3]", "got 17"});
  expect_error([&] { loki_calibrate(view<const float, 4>{}); }, {"loki_calibrate", "non-empty"});
}

}  // namespace
}  // namespace mnemo::attention
