// Tests for attention/score_terms.hpp: each score term against a plain double implementation
// written here from the paper's equations (explicit scores, softmax, output), against the
// reference attention with the mod, and the fast paths (flash at the best and the scalar ISA
// level, flash_backward, split-KV decode) against the reference, on awkward shapes (L = 1, L
// around the tile, Lq != Lk, Lq > Lk with fully masked rows, GQA). FoX's backward against its
// double chain rule and finite differences; every validate() message.
#include "mnemo/attention/score_terms.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "support/support.hpp"

namespace mnemo::attention {
namespace {

using test::expect_close;
using test::expect_error;
using test::random_tensor;

constexpr double neg_inf = -std::numeric_limits<double>::infinity();
constexpr std::int64_t bq = flash_traits<>::block_q, bk = flash_traits<>::block_k;
constexpr double fwd_atol = 3e-5, fwd_rtol = 3e-4, bwd_atol = 1e-4, bwd_rtol = 2e-3;

struct problem {
  std::int64_t B = 1, Hq = 2, Hkv = 1, Lq = 33, Lk = 47, D = 40, Dv = 40;
  std::string str() const {
    return "B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) +
           " Lq=" + std::to_string(Lq) + " Lk=" + std::to_string(Lk) + " D=" + std::to_string(D) +
           " Dv=" + std::to_string(Dv);
  }
};

struct inputs {
  tensor<float, 4> q, k, v, dout;
  inputs(const problem& p, std::uint32_t seed)
      : q(random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.D}, seed)),
        k(random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.D}, seed + 1)),
        v(random_tensor<float, 4>({p.B, p.Hkv, p.Lk, p.Dv}, seed + 2)),
        dout(random_tensor<float, 4>({p.B, p.Hq, p.Lq, p.Dv}, seed + 3)) {}
};

// Score of (b, h, row i, key j) from the scaled dot product, or nullopt where masked.
using score_fn = std::function<std::optional<double>(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j,
                                                     double s)>;

// Plain attention in double from explicit scores (no mod, no kernel): out and lse.
void plain_attention(const problem& p, const inputs& in, const score_fn& f, tensor<double, 4>& out,
                     tensor<double, 3>& lse) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(p.D));
  const std::int64_t G = p.Hq / p.Hkv;
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t h = 0; h < p.Hq; ++h)
      for (std::int64_t i = 0; i < p.Lq; ++i) {
        std::vector<double> s(p.Lk, neg_inf);
        double m = neg_inf;
        for (std::int64_t j = 0; j < p.Lk; ++j) {
          double dot = 0;
          for (std::int64_t c = 0; c < p.D; ++c) dot += double(in.q(b, h, i, c)) * in.k(b, h / G, j, c);
          if (const auto x = f(b, h, i, j, scale * dot)) s[j] = *x;
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (std::int64_t c = 0; c < p.Dv; ++c) out(b, h, i, c) = 0;
        if (m == neg_inf) {
          lse(b, h, i) = neg_inf;
          continue;
        }
        for (std::int64_t j = 0; j < p.Lk; ++j) {
          if (s[j] == neg_inf) continue;
          const double e = std::exp(s[j] - m);
          sum += e;
          for (std::int64_t c = 0; c < p.Dv; ++c) out(b, h, i, c) += e * in.v(b, h / G, j, c);
        }
        for (std::int64_t c = 0; c < p.Dv; ++c) out(b, h, i, c) /= sum;
        lse(b, h, i) = m + std::log(sum);
      }
}

template <int R>
tensor<double, R> to_double(const tensor<float, R>& t) {
  tensor<double, R> d(t.shape());
  for (std::int64_t i = 0; i < t.size(); ++i) d.data()[i] = t.data()[i];
  return d;
}

// Runs `run(out, lse, path, isa)` for every path (reference, flash at the best level and at
// scalar, decode when Lq allows) and compares with the plain result.
template <class Run>
void check_paths(const problem& p, const tensor<double, 4>& want_out, const tensor<double, 3>& want_lse, Run&& run,
                 double atol = fwd_atol, double rtol = fwd_rtol) {
  struct mode {
    path pa;
    simd::level isa;
    const char* name;
  };
  std::vector<mode> modes = {{path::reference, simd::level::automatic, "reference"},
                             {path::flash, simd::level::automatic, "flash"},
                             {path::flash, simd::level::scalar, "flash scalar"}};
  if (p.Lq <= decode_max_rows) modes.push_back({path::decode, simd::level::automatic, "decode"});
  for (const mode& m : modes) {
    tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
    tensor<float, 3> lse({p.B, p.Hq, p.Lq});
    run(out.as_view(), lse.as_view(), m.pa, m.isa);
    expect_close(to_double(out), want_out, atol, rtol, std::string(m.name) + " out");
    expect_close(to_double(lse), want_lse, atol, rtol, std::string(m.name) + " lse");
  }
}

std::vector<problem> shapes() {
  return {
      {1, 2, 1, 1, 1, 16, 16},                 // L = 1
      {2, 4, 2, 70, 70, 40, 24},               // B = 2, GQA 2, Lq = Lk not a tile multiple
      {1, 2, 2, 33, 130, 64, 64},              // Lq < Lk (prefill with a cache)
      {1, 4, 1, 50, 20, 32, 32},               // Lq > Lk: the first rows see nothing (causal)
      {1, 2, 1, bq + 1, bk + 1, 40, 40},       // one past the tile
      {1, 8, 2, 5, 300, 64, 64},               // decode-like, GQA 4
  };
}

// ---------------------------------------------------------------------------------------------
// FoX.

tensor<float, 3> random_log_f(const problem& p, std::uint32_t seed, float lo = -0.5f, float hi = -0.001f) {
  return random_tensor<float, 3>({p.B, p.Hq, p.Lk}, seed, lo, hi);
}

// FoX scores from the paper: s + sum_{l = j+1 .. qp} log f_l, causal.
score_fn fox_scores(const problem& p, const tensor<float, 3>& log_f) {
  return [&p, &log_f](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j, double s) -> std::optional<double> {
    const std::int64_t qp = i + p.Lk - p.Lq;
    if (j > qp) return std::nullopt;
    double decay = 0;
    for (std::int64_t l = j + 1; l <= qp; ++l) decay += log_f(b, h, l);
    return s + decay;
  };
}

TEST(Forgetting, ForwardMatchesPlainOnEveryPath) {
  std::uint32_t seed = 10;
  for (const problem& p : shapes()) {
    SCOPED_TRACE(p.str());
    const inputs in(p, seed);
    const tensor<float, 3> log_f = random_log_f(p, seed + 7);
    tensor<double, 4> want({p.B, p.Hq, p.Lq, p.Dv});
    tensor<double, 3> want_lse({p.B, p.Hq, p.Lq});
    plain_attention(p, in, fox_scores(p, log_f), want, want_lse);
    check_paths(p, want, want_lse, [&](view<float, 4> out, view<float, 3> lse, path pa, simd::level isa) {
      options opt;
      opt.isa = isa;
      forgetting_attention<float>(cview(in.q), cview(in.k), cview(in.v), cview(log_f), out, lse, opt, pa);
    });
    seed += 10;
  }
}

TEST(Forgetting, FullyMaskedRowsGiveZeroAndMinusInf) {
  const problem p{1, 2, 1, 40, 10, 16, 16};
  const inputs in(p, 3);
  const tensor<float, 3> log_f = random_log_f(p, 4);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  forgetting_attention<float>(cview(in.q), cview(in.k), cview(in.v), cview(log_f), out, lse, {}, path::flash);
  for (std::int64_t h = 0; h < p.Hq; ++h)
    for (std::int64_t i = 0; i < p.Lq - p.Lk; ++i) {
      EXPECT_EQ(lse(0, h, i), -std::numeric_limits<float>::infinity());
      for (std::int64_t c = 0; c < p.Dv; ++c) EXPECT_EQ(out(0, h, i, c), 0.0f);
    }
}

// Strong forgetting (F down to -900): the tile anchor keeps f32 errors relative to F_qp - F_kp.
TEST(Forgetting, LargeCumulativeGatesStayAccurate) {
  const problem p{1, 2, 1, 300, 300, 32, 32};
  const inputs in(p, 5);
  const tensor<float, 3> log_f = random_log_f(p, 6, -5.0f, -1.0f);
  tensor<double, 4> want({p.B, p.Hq, p.Lq, p.Dv});
  tensor<double, 3> want_lse({p.B, p.Hq, p.Lq});
  plain_attention(p, in, fox_scores(p, log_f), want, want_lse);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  forgetting_attention<float>(cview(in.q), cview(in.k), cview(in.v), cview(log_f), out, lse, {}, path::flash);
  expect_close(to_double(out), want, 2e-5, 2e-4, "out");
  expect_close(to_double(lse), want_lse, 2e-5, 2e-5, "lse");
}

struct fox_grads {
  tensor<float, 4> dq, dk, dv;
  tensor<float, 3> dlog_f;
  explicit fox_grads(const problem& p)
      : dq({p.B, p.Hq, p.Lq, p.D}), dk({p.B, p.Hkv, p.Lk, p.D}), dv({p.B, p.Hkv, p.Lk, p.Dv}), dlog_f({p.B, p.Hq, p.Lk}) {}
};

void check_fox_backward(const problem& p, std::uint32_t seed, const std::vector<float>& sinks = {}) {
  SCOPED_TRACE(p.str());
  const inputs in(p, seed);
  const tensor<float, 3> log_f = random_log_f(p, seed + 7);
  options opt;
  if (!sinks.empty()) opt.sinks = view<const float, 1>(sinks.data(), {static_cast<std::int64_t>(sinks.size())});
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  forgetting_attention<float>(cview(in.q), cview(in.k), cview(in.v), cview(log_f), out, lse, opt, path::flash);
  fox_grads fast(p), ref(p);
  for (auto* t : {&fast.dq, &fast.dk, &fast.dv}) std::fill(t->begin(), t->end(), std::nanf(""));
  std::fill(fast.dlog_f.begin(), fast.dlog_f.end(), std::nanf(""));
  tensor<float, 1> ds_fast({sinks.empty() ? 0 : p.Hq});
  forgetting_backward(cview(in.q), cview(in.k), cview(in.v), cview(log_f), cview(out), cview(lse), cview(in.dout),
                      fast.dq, fast.dk, fast.dv, fast.dlog_f, opt,
                      sinks.empty() ? view<float, 1>{} : ds_fast.as_view());
  reference_forgetting_backward(cview(in.q), cview(in.k), cview(in.v), cview(log_f), cview(in.dout), ref.dq, ref.dk,
                                ref.dv, ref.dlog_f, opt);
  expect_close(fast.dq, ref.dq, bwd_atol, bwd_rtol, "dq");
  expect_close(fast.dk, ref.dk, bwd_atol, bwd_rtol, "dk");
  expect_close(fast.dv, ref.dv, bwd_atol, bwd_rtol, "dv");
  expect_close(fast.dlog_f, ref.dlog_f, bwd_atol, bwd_rtol, "dlog_f");
  // dq, dk, dv also from the library's reference backward with the mod, one batch entry at a time
  for (std::int64_t b = 0; b < p.B; ++b) {
    const problem pb{1, p.Hq, p.Hkv, p.Lq, p.Lk, p.D, p.Dv};
    fox_grads r(pb);
    reference_backward(cview(in.q).narrow(0, b, 1), cview(in.k).narrow(0, b, 1), cview(in.v).narrow(0, b, 1),
                       cview(in.dout).narrow(0, b, 1), r.dq.as_view(), r.dk.as_view(), r.dv.as_view(),
                       mods::forgetting(cview(log_f)[b]), opt);
    expect_close(r.dq, ref.dq.as_view().narrow(0, b, 1), bwd_atol, bwd_rtol, "reference_backward dq");
    expect_close(r.dk, ref.dk.as_view().narrow(0, b, 1), bwd_atol, bwd_rtol, "reference_backward dk");
  }
  if (!sinks.empty()) {
    tensor<float, 1> ds_ref({p.Hq});
    tensor<float, 4> dq2({p.B, p.Hq, p.Lq, p.D}), dk2({p.B, p.Hkv, p.Lk, p.D}), dv2({p.B, p.Hkv, p.Lk, p.Dv});
    std::fill(ds_ref.begin(), ds_ref.end(), 0.0f);
    for (std::int64_t b = 0; b < p.B; ++b) {
      tensor<float, 1> one({p.Hq});
      reference_backward(cview(in.q).narrow(0, b, 1), cview(in.k).narrow(0, b, 1), cview(in.v).narrow(0, b, 1),
                         cview(in.dout).narrow(0, b, 1), dq2.as_view().narrow(0, b, 1), dk2.as_view().narrow(0, b, 1),
                         dv2.as_view().narrow(0, b, 1), mods::forgetting(cview(log_f)[b]), opt, one.as_view());
      for (std::int64_t h = 0; h < p.Hq; ++h) ds_ref(h) += one(h);
    }
    expect_close(ds_fast, ds_ref, bwd_atol, bwd_rtol, "dsinks");
  }
}

TEST(Forgetting, BackwardMatchesChainRule) {
  check_fox_backward({1, 2, 1, 37, 37, 40, 40}, 20);
  check_fox_backward({2, 4, 2, 70, 90, 32, 24}, 30);  // GQA 2, Lq < Lk
  check_fox_backward({1, 4, 4, 50, 20, 16, 16}, 40);  // Lq > Lk: empty rows
  check_fox_backward({1, 8, 2, 1, 1, 16, 16}, 50);    // L = 1, GQA 4
  check_fox_backward({1, 2, 1, bq + 1, bk + 1, 64, 64}, 60);
  check_fox_backward({1, 4, 2, 40, 40, 32, 32}, 70, {0.5f, -1.0f, 2.0f, 0.0f});  // attention sinks
}

// sum(out * dout) in double from the plain implementation, for finite differences.
double fox_loss(const problem& p, const inputs& in, const tensor<float, 3>& log_f) {
  tensor<double, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<double, 3> lse({p.B, p.Hq, p.Lq});
  plain_attention(p, in, fox_scores(p, log_f), out, lse);
  double loss = 0;
  for (std::int64_t i = 0; i < out.size(); ++i) loss += out.data()[i] * in.dout.data()[i];
  return loss;
}

TEST(Forgetting, GradientsMatchFiniteDifferences) {
  const problem p{1, 2, 1, 6, 9, 4, 3};
  inputs in(p, 80);
  tensor<float, 3> log_f = random_log_f(p, 81, -0.8f, -0.2f);
  fox_grads ref(p);
  reference_forgetting_backward(cview(in.q), cview(in.k), cview(in.v), cview(log_f), cview(in.dout), ref.dq, ref.dk,
                                ref.dv, ref.dlog_f);
  const float eps = 1e-2f;
  for (std::int64_t h = 0; h < p.Hq; ++h)
    for (std::int64_t l = 0; l < p.Lk; ++l) {
      const float x = log_f(0, h, l);
      log_f(0, h, l) = x + eps;
      const double up = fox_loss(p, in, log_f);
      log_f(0, h, l) = x - eps;
      const double down = fox_loss(p, in, log_f);
      log_f(0, h, l) = x;
      const double fd = (up - down) / (double(x + eps) - double(x - eps));
      EXPECT_NEAR(ref.dlog_f(0, h, l), fd, 2e-4 + 1e-3 * std::abs(fd)) << "d log f [" << h << ", " << l << "]";
    }
  for (std::int64_t c = 0; c < p.D; ++c) {  // a few of dq and dk through the same loss
    const float x = in.q(0, 1, 4, c);
    in.q(0, 1, 4, c) = x + eps;
    const double up = fox_loss(p, in, log_f);
    in.q(0, 1, 4, c) = x - eps;
    const double down = fox_loss(p, in, log_f);
    in.q(0, 1, 4, c) = x;
    const double fd = (up - down) / (double(x + eps) - double(x - eps));
    EXPECT_NEAR(ref.dq(0, 1, 4, c), fd, 2e-4 + 1e-3 * std::abs(fd)) << "dq channel " << c;
  }
}

TEST(Forgetting, BadInputs) {
  const problem p{2, 2, 1, 8, 8, 8, 8};
  const inputs in(p, 90);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  const tensor<float, 3> wrong_len = random_tensor<float, 3>({p.B, p.Hq, p.Lk + 1}, 1, -1.0f, -0.1f);
  expect_error([&] { forgetting_attention<float>(cview(in.q), cview(in.k), cview(in.v), cview(wrong_len), out, lse); },
               {"attention::decode", "forgetting.log_f must have shape [Hq, Lk] = [2, 8]", "got [2, 9]"});
  const tensor<float, 3> wrong_batch = random_tensor<float, 3>({1, p.Hq, p.Lk}, 1, -1.0f, -0.1f);
  expect_error([&] { forgetting_attention<float>(cview(in.q), cview(in.k), cview(in.v), cview(wrong_batch), out, lse); },
               {"attention::forgetting_attention", "log_f.shape[0] must be the batch size B = 2", "got 1"});
  tensor<float, 3> positive = random_tensor<float, 3>({p.B, p.Hq, p.Lk}, 1, -1.0f, -0.1f);
  positive(1, 1, 3) = 0.25f;
  expect_error([&] { forgetting_attention<float>(cview(in.q), cview(in.k), cview(in.v), cview(positive), out, lse); },
               {"forgetting.log_f must be finite and <= 0", "0.25", "at [1, 3]"});
  positive(1, 1, 3) = std::nanf("");
  expect_error([&] { forgetting_attention<float>(cview(in.q), cview(in.k), cview(in.v), cview(positive), out, lse); },
               {"forgetting.log_f must be finite and <= 0", "at [1, 3]"});
  fox_grads g(p);
  const tensor<float, 3> log_f = random_tensor<float, 3>({p.B, p.Hq, p.Lk}, 1, -1.0f, -0.1f);
  tensor<float, 3> bad_dlog({p.B, p.Hq, p.Lk + 2});
  expect_error(
      [&] {
        forgetting_backward(cview(in.q), cview(in.k), cview(in.v), cview(log_f), cview(out), cview(lse),
                            cview(in.dout), g.dq, g.dk, g.dv, bad_dlog);
      },
      {"attention::forgetting_backward", "dlog_f", "[2, 2, 8]"});
  expect_error(
      [&] {
        forgetting_backward(cview(in.q), cview(in.k), cview(in.v), cview(log_f), cview(out), view<const float, 3>{},
                            cview(in.dout), g.dq, g.dk, g.dv, g.dlog_f);
      },
      {"attention::forgetting_backward", "lse must be the forward's lse"});
  expect_error(
      [&] {
        reference_forgetting_backward(cview(in.q), cview(in.k), cview(in.v), cview(wrong_len), cview(in.dout), g.dq,
                                      g.dk, g.dv, g.dlog_f);
      },
      {"attention::reference_forgetting_backward", "forgetting.log_f must have shape"});
}

// ---------------------------------------------------------------------------------------------
// Temperatures.

template <class Mod>
void check_mod_backward(const problem& p, const Mod& mod, std::uint32_t seed) {
  SCOPED_TRACE(p.str());
  const inputs in(p, seed);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  flash(cview(in.q), in.k, in.v, out, lse, mod);
  tensor<float, 4> dq({p.B, p.Hq, p.Lq, p.D}), dk({p.B, p.Hkv, p.Lk, p.D}), dv({p.B, p.Hkv, p.Lk, p.Dv});
  tensor<float, 4> rq({p.B, p.Hq, p.Lq, p.D}), rk({p.B, p.Hkv, p.Lk, p.D}), rv({p.B, p.Hkv, p.Lk, p.Dv});
  for (auto* t : {&dq, &dk, &dv}) std::fill(t->begin(), t->end(), std::nanf(""));
  flash_backward(cview(in.q), cview(in.k), cview(in.v), cview(out), cview(lse), cview(in.dout), dq.as_view(),
                 dk.as_view(), dv.as_view(), mod);
  reference_backward(cview(in.q), cview(in.k), cview(in.v), cview(in.dout), rq.as_view(), rk.as_view(), rv.as_view(),
                     mod);
  expect_close(dq, rq, bwd_atol, bwd_rtol, "dq");
  expect_close(dk, rk, bwd_atol, bwd_rtol, "dk");
  expect_close(dv, rv, bwd_atol, bwd_rtol, "dv");
}

TEST(Temperature, PerQueryAndPerHeadOnEveryPath) {
  std::uint32_t seed = 100;
  for (problem p : shapes()) {
    p.B = 1;  // per-query temperatures are one batch entry's (attend_per_batch below for B > 1)
    SCOPED_TRACE(p.str());
    const inputs in(p, seed);
    const tensor<float, 2> tq = random_tensor<float, 2>({p.Hq, p.Lq}, seed + 5, 0.3f, 3.0f);
    const tensor<float, 1> th = random_tensor<float, 1>({p.Hq}, seed + 6, 0.3f, 3.0f);
    const mods::query_temperature qt{cview(tq), p.Lk - p.Lq};
    const mods::head_temperature ht{cview(th)};
    const auto mod = mods::all_of(qt, ht, mods::causal{});
    tensor<double, 4> want({p.B, p.Hq, p.Lq, p.Dv});
    tensor<double, 3> want_lse({p.B, p.Hq, p.Lq});
    plain_attention(
        p, in,
        [&](std::int64_t, std::int64_t h, std::int64_t i, std::int64_t j, double s) -> std::optional<double> {
          if (j > i + p.Lk - p.Lq) return std::nullopt;
          return s * tq(h, i) * th(h);
        },
        want, want_lse);
    check_paths(p, want, want_lse, [&](view<float, 4> out, view<float, 3> lse, path pa, simd::level isa) {
      options opt;
      opt.isa = isa;
      attend(cview(in.q), in.k, in.v, out, lse, mod, opt, pa);
    });
    check_mod_backward(p, mod, seed + 1);
    check_mod_backward(p, mods::all_of(mods::softcap{5.0f}, qt), seed + 2);  // non-causal, composed
    seed += 10;
  }
}

TEST(Temperature, PerBatchEntries) {
  const problem p{3, 4, 2, 20, 45, 32, 32};
  const inputs in(p, 110);
  const tensor<float, 3> t = random_tensor<float, 3>({p.B, p.Hq, p.Lq}, 111, 0.5f, 2.0f);
  tensor<double, 4> want({p.B, p.Hq, p.Lq, p.Dv});
  tensor<double, 3> want_lse({p.B, p.Hq, p.Lq});
  plain_attention(
      p, in,
      [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t, double s) -> std::optional<double> {
        return s * t(b, h, i);
      },
      want, want_lse);
  check_paths(p, want, want_lse, [&](view<float, 4> out, view<float, 3> lse, path pa, simd::level isa) {
    options opt;
    opt.isa = isa;
    attend_per_batch<float>(
        cview(in.q), cview(in.k), cview(in.v), out, lse,
        [&](std::int64_t b) { return mods::query_temperature{cview(t)[b], p.Lk - p.Lq}; }, opt, pa);
  });
}

TEST(Temperature, BadInputs) {
  const problem p{1, 2, 1, 4, 6, 8, 8};
  const inputs in(p, 120);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  const tensor<float, 2> t = random_tensor<float, 2>({p.Hq, p.Lq}, 1, 0.5f, 2.0f);
  expect_error([&] { flash(cview(in.q), in.k, in.v, out, {}, mods::query_temperature{cview(t), 0}); },
               {"attention::flash", "query_temperature.offset must be Lk - Lq = 2", "got 0"});
  const tensor<float, 2> t_wrong = random_tensor<float, 2>({p.Hq, p.Lq + 1}, 1, 0.5f, 2.0f);
  expect_error([&] { flash(cview(in.q), in.k, in.v, out, {}, mods::query_temperature{cview(t_wrong), 2}); },
               {"query_temperature.t must have shape [Hq, Lq] = [2, 4]", "got [2, 5]"});
  tensor<float, 2> t_zero = random_tensor<float, 2>({p.Hq, p.Lq}, 1, 0.5f, 2.0f);
  t_zero(1, 2) = 0.0f;
  expect_error([&] { decode(cview(in.q), in.k, in.v, out, {}, mods::query_temperature{cview(t_zero), 2}); },
               {"attention::decode", "query_temperature.t must be finite and > 0", "at [1, 2]"});
  const tensor<float, 1> th({3});
  expect_error([&] { flash(cview(in.q), in.k, in.v, out, {}, mods::head_temperature{cview(th)}); },
               {"head_temperature.t must have shape [Hq] = [2]", "got [3]"});
  tensor<float, 1> th2({2});
  th2(0) = 1.0f;
  th2(1) = -1.0f;
  expect_error([&] { flash(cview(in.q), in.k, in.v, out, {}, mods::head_temperature{cview(th2)}); },
               {"head_temperature.t must be finite and > 0", "-1", "at [1]"});
}

// ---------------------------------------------------------------------------------------------
// Relative position terms.

struct relpos_case {
  std::int64_t Hr, N, min_distance;
  bool with_biases, causal;
  const char* name;
};

TEST(RelativePosition, ShawAndTransformerXLOnEveryPath) {
  std::uint32_t seed = 200;
  for (const problem& p : shapes()) {
    const inputs in(p, seed);
    for (const relpos_case& rc : {relpos_case{1, 9, -4, false, false, "Shaw k=4"},
                                  relpos_case{p.Hq, p.Lk, 0, true, true, "Transformer-XL"},
                                  relpos_case{p.Hq, 7, 0, true, true, "Transformer-XL, table of 7 (clamped)"},
                                  relpos_case{1, 2 * (p.Lk + p.Lq) + 1, -(p.Lk + p.Lq), true, false,
                                              "every distance, both biases"}}) {
      SCOPED_TRACE(p.str() + " " + rc.name);
      const tensor<float, 3> r = random_tensor<float, 3>({rc.Hr, rc.N, p.D}, seed + 3);
      const tensor<float, 2> u = random_tensor<float, 2>({p.Hq, p.D}, seed + 4);
      const tensor<float, 2> vb = random_tensor<float, 2>({p.Hq, p.D}, seed + 5);
      const view<const float, 2> uu = rc.with_biases ? cview(u) : view<const float, 2>{};
      const view<const float, 2> vv = rc.with_biases ? cview(vb) : view<const float, 2>{};
      const double scale = 1.0 / std::sqrt(static_cast<double>(p.D));
      const std::int64_t G = p.Hq / p.Hkv;
      tensor<double, 4> want({p.B, p.Hq, p.Lq, p.Dv});
      tensor<double, 3> want_lse({p.B, p.Hq, p.Lq});
      plain_attention(
          p, in,
          [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j, double s) -> std::optional<double> {
            const std::int64_t qp = i + p.Lk - p.Lq;
            if (rc.causal && j > qp) return std::nullopt;
            const std::int64_t n = std::clamp<std::int64_t>(qp - j - rc.min_distance, 0, rc.N - 1);
            const std::int64_t hr = rc.Hr == 1 ? 0 : h;
            double extra = 0;
            for (std::int64_t c = 0; c < p.D; ++c) {
              extra += double(in.q(b, h, i, c)) * r(hr, n, c);
              if (rc.with_biases) extra += double(u(h, c)) * in.k(b, h / G, j, c) + double(vb(h, c)) * r(hr, n, c);
            }
            return s + scale * extra;
          },
          want, want_lse);
      check_paths(p, want, want_lse, [&](view<float, 4> out, view<float, 3> lse, path pa, simd::level isa) {
        options opt;
        opt.isa = isa;
        if (rc.causal)
          relative_position_attention(cview(in.q), cview(in.k), cview(in.v), cview(r), uu, vv, rc.min_distance, out,
                                      lse, mods::causal{}, opt, pa);
        else
          relative_position_attention(cview(in.q), cview(in.k), cview(in.v), cview(r), uu, vv, rc.min_distance, out,
                                      lse, mods::none{}, opt, pa);
      });
    }
    seed += 10;
  }
}

TEST(RelativePosition, BadInputs) {
  const problem p{1, 4, 2, 5, 9, 8, 8};
  const inputs in(p, 220);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  const tensor<float, 3> r({2, 5, p.D}), r_ok({1, 5, p.D}), r_bad_d({1, 5, p.D + 1});
  const tensor<float, 2> u_bad({p.Hq, p.D + 2}), v_bad({p.Hq + 1, p.D});
  auto run = [&](const tensor<float, 3>& rr, view<const float, 2> u, view<const float, 2> v) {
    relative_position_attention(cview(in.q), cview(in.k), cview(in.v), cview(rr), u, v, 0, out);
  };
  expect_error([&] { run(r, {}, {}); }, {"relative_position.r must have shape [1 or Hq = 4, N >= 1, D = 8]", "got [2, 5, 8]"});
  expect_error([&] { run(r_bad_d, {}, {}); }, {"relative_position.r must have shape", "got [1, 5, 9]"});
  expect_error([&] { run(r_ok, cview(u_bad), {}); }, {"relative_position.u must be empty or have shape [Hq, D] = [4, 8]", "got [4, 10]"});
  expect_error([&] { run(r_ok, {}, cview(v_bad)); }, {"relative_position.v must be empty or have shape [Hq, D] = [4, 8]", "got [5, 8]"});
  // a mod built for other lengths than the call's
  const mods::relative_position other(cview(in.q)[0], cview(in.k)[0].narrow(1, 0, 7), cview(r_ok), {}, {}, 0);
  expect_error([&] { flash(cview(in.q), in.k, in.v, out, {}, other); },
               {"attention::flash", "relative_position.k must have shape [Hkv, Lk, D] = [Hkv, 9, 8]", "got [2, 7, 8]"});
  const mods::relative_position none;
  expect_error([&] { flash(cview(in.q), in.k, in.v, out, {}, none); }, {"relative_position needs q"});
}

// ---------------------------------------------------------------------------------------------
// Two-sided (non-causal) ALiBi.

TEST(AlibiTwoSided, NonCausalOnEveryPathAndBackward) {
  std::uint32_t seed = 300;
  for (const problem& p : shapes()) {
    SCOPED_TRACE(p.str());
    const inputs in(p, seed);
    const std::vector<float> behind = mods::alibi_slopes(p.Hq);
    const tensor<float, 1> ahead = random_tensor<float, 1>({p.Hq}, seed + 3, 0.0f, 0.5f);
    for (bool symmetric : {true, false}) {
      const mods::alibi_two_sided mod{view<const float, 1>(behind.data(), {p.Hq}),
                                      symmetric ? view<const float, 1>{} : cview(ahead)};
      tensor<double, 4> want({p.B, p.Hq, p.Lq, p.Dv});
      tensor<double, 3> want_lse({p.B, p.Hq, p.Lq});
      plain_attention(
          p, in,
          [&](std::int64_t, std::int64_t h, std::int64_t i, std::int64_t j, double s) -> std::optional<double> {
            const std::int64_t d = i + p.Lk - p.Lq - j;
            return d >= 0 ? s - double(behind[h]) * d : s - double(symmetric ? behind[h] : ahead(h)) * -d;
          },
          want, want_lse);
      check_paths(p, want, want_lse, [&](view<float, 4> out, view<float, 3> lse, path pa, simd::level isa) {
        options opt;
        opt.isa = isa;
        attend(cview(in.q), in.k, in.v, out, lse, mod, opt, pa);
      });
      check_mod_backward(p, mod, seed + 1);
      if (symmetric) {  // the same function as mods::alibi
        tensor<float, 4> a({p.B, p.Hq, p.Lq, p.Dv}), b({p.B, p.Hq, p.Lq, p.Dv});
        flash(cview(in.q), in.k, in.v, a, {}, mod);
        flash(cview(in.q), in.k, in.v, b, {}, mods::alibi{view<const float, 1>(behind.data(), {p.Hq})});
        expect_close(a, b, 1e-6, 1e-5, "two-sided symmetric vs mods::alibi");
      }
    }
    seed += 10;
  }
}

TEST(AlibiTwoSided, BadInputs) {
  const problem p{1, 2, 1, 4, 6, 8, 8};
  const inputs in(p, 320);
  tensor<float, 4> out({p.B, p.Hq, p.Lq, p.Dv});
  const std::vector<float> s3(3, 0.5f), s2{0.5f, std::numeric_limits<float>::infinity()};
  expect_error([&] { flash(cview(in.q), in.k, in.v, out, {}, mods::alibi_two_sided{view<const float, 1>(s3.data(), {3}), {}}); },
               {"alibi_two_sided.slopes must have shape [Hq] = [2]", "got [3]"});
  const std::vector<float> ok(2, 0.5f);
  expect_error(
      [&] {
        flash(cview(in.q), in.k, in.v, out, {},
              mods::alibi_two_sided{view<const float, 1>(ok.data(), {2}), view<const float, 1>(s3.data(), {3})});
      },
      {"alibi_two_sided.ahead must be empty or have shape [Hq] = [2]", "got [3]"});
  expect_error(
      [&] {
        flash(cview(in.q), in.k, in.v, out, {},
              mods::alibi_two_sided{view<const float, 1>(ok.data(), {2}), view<const float, 1>(s2.data(), {2})});
      },
      {"alibi_two_sided.ahead must be finite", "at [1]"});
}

}  // namespace
}  // namespace mnemo::attention
