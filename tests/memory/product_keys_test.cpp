// Tests of memory/product_keys.hpp: the fast lookup against the double reference (identical
// indices) on awkward shapes, the golden pkm_* cases, the backward against finite differences of
// an independently written loss, the fast backward against the reference one, sparse value
// gradients, query normalisation and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "memory/test_util.hpp"
#include "mnemo/memory/product_keys.hpp"

namespace {

using namespace memory_test;
namespace mem = mnemo::memory;

struct pkm_problem {
  std::int64_t N, heads, k_dim, n_keys, v_dim, knn;
  tensor<float, 3> query;   // [N, heads, k_dim]
  tensor<float, 4> keys;    // [heads, 2, n_keys, k_dim / 2]
  tensor<float, 2> values;  // [n_keys^2, v_dim]

  pkm_problem(std::int64_t N_, std::int64_t heads_, std::int64_t k_dim_, std::int64_t n_keys_, std::int64_t v_dim_,
              std::int64_t knn_, std::uint32_t seed)
      : N(N_), heads(heads_), k_dim(k_dim_), n_keys(n_keys_), v_dim(v_dim_), knn(knn_) {
    std::mt19937 rng(seed);
    query = random_tensor<3>({N, heads, k_dim}, rng);
    keys = random_tensor<4>({heads, 2, n_keys, k_dim / 2}, rng);
    values = random_tensor<2>({n_keys * n_keys, v_dim}, rng);
  }
};

struct pkm_result {
  tensor<float, 2> out;
  tensor<std::int64_t, 3> indices;
  tensor<float, 3> weights, scores;
};

pkm_result lookup(const pkm_problem& p, bool fast, const mem::pkm_options& opt = {}) {
  pkm_result r{tensor<float, 2>({p.N, p.v_dim}), tensor<std::int64_t, 3>({p.N, p.heads, p.knn}),
               tensor<float, 3>({p.N, p.heads, p.knn}), tensor<float, 3>({p.N, p.heads, p.knn})};
  if (fast) mem::pkm_forward(p.query, p.keys, p.values, p.knn, r.out, r.indices, r.weights, r.scores, opt);
  else mem::reference::pkm_forward(p.query, p.keys, p.values, p.knn, r.out, r.indices, r.weights, r.scores, opt);
  return r;
}

// ---- forward ----

TEST(pkm, fast_matches_reference) {
  struct shape {
    std::int64_t N, heads, k_dim, n_keys, v_dim, knn;
  };
  std::uint32_t seed = 1;
  for (const shape& s : std::vector<shape>{{1, 1, 2, 1, 1, 1},       // the smallest memory
                                           {7, 1, 16, 16, 20, 4},    // golden-like
                                           {37, 4, 40, 13, 24, 13},  // knn = n_keys
                                           {70, 2, 96, 37, 33, 1},   // knn = 1, more rows than a block
                                           {33, 3, 64, 50, 17, 32}})
    for (bool norm : {false, true}) {
      const pkm_problem p(s.N, s.heads, s.k_dim, s.n_keys, s.v_dim, s.knn, ++seed);
      const pkm_result ref = lookup(p, false, {.query_norm = norm}), fast = lookup(p, true, {.query_norm = norm});
      const std::string what = "N=" + std::to_string(s.N) + " heads=" + std::to_string(s.heads) +
                               " n_keys=" + std::to_string(s.n_keys) + " knn=" + std::to_string(s.knn) +
                               " norm=" + std::to_string(norm);
      for (std::int64_t i = 0; i < ref.indices.size(); ++i)
        ASSERT_EQ(fast.indices.data()[i], ref.indices.data()[i]) << what << " at flat index " << i;
      expect_close(fast.scores, ref.scores, 1e-5, 1e-5, what + ": scores");
      expect_close(fast.weights, ref.weights, 1e-6, 1e-5, what + ": weights");
      expect_close(fast.out, ref.out, 1e-5, 1e-5, what + ": out");
    }
}

TEST(pkm, outputs_are_sorted_softmaxed_and_distinct) {
  const pkm_problem p(9, 3, 24, 11, 5, 6, 3);
  const pkm_result r = lookup(p, true);
  for (std::int64_t n = 0; n < p.N; ++n)
    for (std::int64_t h = 0; h < p.heads; ++h) {
      double wsum = 0;
      for (std::int64_t j = 0; j < p.knn; ++j) {
        wsum += r.weights(n, h, j);
        if (j) {
          EXPECT_GE(r.scores(n, h, j - 1), r.scores(n, h, j));
        }
        for (std::int64_t i = 0; i < j; ++i) EXPECT_NE(r.indices(n, h, i), r.indices(n, h, j));
        // The score is the sum of the two sub-key scores of the flattened index.
        const std::int64_t i1 = r.indices(n, h, j) / p.n_keys, i2 = r.indices(n, h, j) % p.n_keys;
        double s = 0;
        for (std::int64_t c = 0; c < p.k_dim / 2; ++c)
          s += double(p.query(n, h, c)) * p.keys(h, 0, i1, c) + double(p.query(n, h, p.k_dim / 2 + c)) * p.keys(h, 1, i2, c);
        EXPECT_NEAR(r.scores(n, h, j), s, 1e-5);
      }
      EXPECT_NEAR(wsum, 1.0, 1e-5);
    }
}

TEST(pkm, selects_the_best_of_all_n_keys_squared) {
  // Brute force over every memory slot: the selected scores are the knn largest full scores.
  const pkm_problem p(5, 2, 12, 9, 3, 5, 8);
  const pkm_result r = lookup(p, true);
  for (std::int64_t n = 0; n < p.N; ++n)
    for (std::int64_t h = 0; h < p.heads; ++h) {
      std::vector<double> all;
      for (std::int64_t a = 0; a < p.n_keys; ++a)
        for (std::int64_t b = 0; b < p.n_keys; ++b) {
          double s = 0;
          for (std::int64_t c = 0; c < p.k_dim / 2; ++c)
            s += double(p.query(n, h, c)) * p.keys(h, 0, a, c) + double(p.query(n, h, p.k_dim / 2 + c)) * p.keys(h, 1, b, c);
          all.push_back(s);
        }
      std::sort(all.rbegin(), all.rend());
      for (std::int64_t j = 0; j < p.knn; ++j) EXPECT_NEAR(r.scores(n, h, j), all[j], 1e-5);
    }
}

TEST(pkm, query_norm_ignores_the_query_scale) {
  pkm_problem p(6, 2, 16, 10, 4, 3, 12);
  const pkm_result a = lookup(p, true, {.query_norm = true});
  for (float& x : p.query) x *= 3.0f;
  const pkm_result b = lookup(p, true, {.query_norm = true});
  for (std::int64_t i = 0; i < a.indices.size(); ++i) EXPECT_EQ(a.indices.data()[i], b.indices.data()[i]);
  expect_close(b.weights, a.weights, 1e-6, 1e-5, "weights");
}

TEST(pkm, threads_do_not_change_results) {
  const pkm_problem p(70, 2, 32, 20, 16, 8, 5);
  const pkm_result a = lookup(p, true, {.threads = 1}), b = lookup(p, true, {.threads = 2});
  expect_close(b.out, a.out, 0, 0, "out");
  for (std::int64_t i = 0; i < a.indices.size(); ++i) EXPECT_EQ(a.indices.data()[i], b.indices.data()[i]);
}

TEST(pkm, golden) { check_golden("pkm"); }

// ---- backward ----

// sum(out * dout) in double with the selection held fixed (the function whose gradient the
// backward computes), written from the header equations independently of product_keys.hpp.
double fixed_selection_loss(const std::vector<double>& query, const std::vector<double>& keys,
                            const std::vector<double>& values, const pkm_problem& p, const pkm_result& r,
                            const tensor<float, 2>& dout, bool norm) {
  const std::int64_t half = p.k_dim / 2;
  double loss = 0;
  for (std::int64_t n = 0; n < p.N; ++n)
    for (std::int64_t h = 0; h < p.heads; ++h) {
      double qh[2][64];
      for (int part = 0; part < 2; ++part) {
        double ss = 0;
        for (std::int64_t c = 0; c < half; ++c) ss += std::pow(query[(n * p.heads + h) * p.k_dim + part * half + c], 2);
        const double r0 = norm ? std::sqrt(ss + mem::pkm_norm_eps) : 1.0;
        for (std::int64_t c = 0; c < half; ++c) qh[part][c] = query[(n * p.heads + h) * p.k_dim + part * half + c] / r0;
      }
      std::vector<double> s(p.knn);
      double m = -1e300, z = 0;
      for (std::int64_t j = 0; j < p.knn; ++j) {
        const std::int64_t idx = r.indices(n, h, j), sub[2] = {idx / p.n_keys, idx % p.n_keys};
        s[j] = 0;
        for (int part = 0; part < 2; ++part)
          for (std::int64_t c = 0; c < half; ++c)
            s[j] += qh[part][c] * keys[((h * 2 + part) * p.n_keys + sub[part]) * half + c];
        m = std::max(m, s[j]);
      }
      for (std::int64_t j = 0; j < p.knn; ++j) z += std::exp(s[j] - m);
      for (std::int64_t j = 0; j < p.knn; ++j) {
        double dv = 0;
        for (std::int64_t c = 0; c < p.v_dim; ++c) dv += values[r.indices(n, h, j) * p.v_dim + c] * dout(n, c);
        loss += std::exp(s[j] - m) / z * dv;
      }
    }
  return loss;
}

TEST(pkm, backward_matches_finite_differences) {
  for (bool norm : {false, true}) {
    const pkm_problem p(4, 2, 10, 6, 5, 4, norm ? 31 : 30);
    const pkm_result r = lookup(p, false, {.query_norm = norm});
    std::mt19937 rng(2);
    const tensor<float, 2> dout = random_tensor<2>({p.N, p.v_dim}, rng);
    tensor<float, 3> dq({p.N, p.heads, p.k_dim});
    tensor<float, 4> dk({p.heads, 2, p.n_keys, p.k_dim / 2});
    tensor<float, 2> dv({p.n_keys * p.n_keys, p.v_dim});
    mem::reference::pkm_backward(p.query, p.keys, p.values, r.indices, r.weights, dout, dq, dk, dv, {.query_norm = norm});
    std::vector<double> q(p.query.begin(), p.query.end()), k(p.keys.begin(), p.keys.end()),
        v(p.values.begin(), p.values.end());
    const double h = 1e-6;
    auto check = [&](std::vector<double>& x, const float* grad, const char* name) {
      double worst = 0;
      for (std::size_t i = 0; i < x.size(); ++i) {
        const double x0 = x[i];
        x[i] = x0 + h;
        const double up = fixed_selection_loss(q, k, v, p, r, dout, norm);
        x[i] = x0 - h;
        const double down = fixed_selection_loss(q, k, v, p, r, dout, norm);
        x[i] = x0;
        const double fd = (up - down) / (2 * h);
        // grad is f32: its rounding (6e-8 relative) dominates the central difference error.
        worst = std::max(worst, std::abs(fd - grad[i]) / (1e-6 + 1e-5 * std::abs(fd)));
      }
      EXPECT_LE(worst, 1.0) << name << " norm=" << norm;
    };
    check(q, dq.data(), "dquery");
    check(k, dk.data(), "dkeys");
    check(v, dv.data(), "dvalues");
  }
}

TEST(pkm, fast_backward_matches_reference) {
  std::uint32_t seed = 40;
  for (bool norm : {false, true})
    for (int threads : {1, 2}) {
      const pkm_problem p(37, 3, 40, 13, 70, 5, ++seed);
      const pkm_result r = lookup(p, true, {.query_norm = norm});
      std::mt19937 rng(seed);
      const tensor<float, 2> dout = random_tensor<2>({p.N, p.v_dim}, rng);
      tensor<float, 3> dq_ref({p.N, p.heads, p.k_dim}), dq({p.N, p.heads, p.k_dim});
      tensor<float, 4> dk_ref({p.heads, 2, p.n_keys, p.k_dim / 2}), dk = dk_ref;
      tensor<float, 2> dv_ref({p.n_keys * p.n_keys, p.v_dim}), dv = dv_ref;
      for (float* x : {dk.data(), dk_ref.data()}) std::fill(x, x + dk.size(), 9.0f);  // overwritten
      const mem::pkm_options opt{.query_norm = norm, .threads = threads};
      mem::reference::pkm_backward(p.query, p.keys, p.values, r.indices, r.weights, dout, dq_ref, dk_ref, dv_ref, opt);
      mem::pkm_backward(p.query, p.keys, p.values, r.indices, r.weights, dout, dq, dk, dv, opt);
      expect_close(dq, dq_ref, 1e-5, 1e-4, "dquery");
      expect_close(dk, dk_ref, 1e-5, 1e-4, "dkeys");
      expect_close(dv, dv_ref, 1e-6, 1e-5, "dvalues");
    }
}

TEST(pkm, value_gradient_touches_selected_rows_only_and_accumulates) {
  const pkm_problem p(3, 2, 8, 7, 4, 3, 50);
  const pkm_result r = lookup(p, true);
  std::mt19937 rng(3);
  const tensor<float, 2> dout = random_tensor<2>({p.N, p.v_dim}, rng);
  tensor<float, 3> dq({p.N, p.heads, p.k_dim});
  tensor<float, 4> dk({p.heads, 2, p.n_keys, p.k_dim / 2});
  tensor<float, 2> once({p.n_keys * p.n_keys, p.v_dim}), twice = once;
  const float sentinel = 7.0f;
  std::fill(once.begin(), once.end(), sentinel);
  std::fill(twice.begin(), twice.end(), sentinel);
  mem::pkm_backward(p.query, p.keys, p.values, r.indices, r.weights, dout, dq, dk, once);
  mem::pkm_backward(p.query, p.keys, p.values, r.indices, r.weights, dout, dq, dk, twice);
  mem::pkm_backward(p.query, p.keys, p.values, r.indices, r.weights, dout, dq, dk, twice);
  std::vector<bool> touched(static_cast<std::size_t>(p.n_keys * p.n_keys), false);
  for (std::int64_t i : r.indices) touched[i] = true;
  for (std::int64_t row = 0; row < p.n_keys * p.n_keys; ++row)
    for (std::int64_t c = 0; c < p.v_dim; ++c) {
      if (!touched[row]) {
        EXPECT_EQ(once(row, c), sentinel);
        EXPECT_EQ(twice(row, c), sentinel);
      } else {
        EXPECT_NEAR(twice(row, c) - sentinel, 2 * (once(row, c) - sentinel), 1e-5);
      }
    }
}

// ---- bad input ----

TEST(pkm, search_and_gather_are_the_two_halves_of_forward) {
  // pkm_search gives the reference's indices without reading values; pkm_gather of its result
  // gives the forward's output (the same f32 additions in the same order: exactly equal).
  // n_keys = 64, knn = 8 takes topk's bound-and-filter path; 70 rows span two row blocks.
  for (bool norm : {false, true}) {
    const pkm_problem p(70, 3, 24, 64, 19, 8, norm ? 91 : 90);
    const pkm_result ref = lookup(p, false, {.query_norm = norm}), fast = lookup(p, true, {.query_norm = norm});
    tensor<std::int64_t, 3> idx({p.N, p.heads, p.knn});
    tensor<float, 3> w({p.N, p.heads, p.knn}), sc({p.N, p.heads, p.knn});
    mem::pkm_search(p.query, p.keys, p.knn, idx, w, sc, {.query_norm = norm});
    for (std::int64_t i = 0; i < idx.size(); ++i) ASSERT_EQ(idx.data()[i], ref.indices.data()[i]) << "norm=" << norm << " at " << i;
    expect_close(sc, ref.scores, 1e-5, 1e-5, "search scores");
    expect_close(w, ref.weights, 1e-6, 1e-5, "search weights");
    tensor<float, 2> out({p.N, p.v_dim});
    mem::pkm_gather(p.values, idx, w, out, 2);
    for (std::int64_t i = 0; i < out.size(); ++i) ASSERT_EQ(out.data()[i], fast.out.data()[i]) << "norm=" << norm << " at " << i;
    expect_close(out, ref.out, 1e-5, 1e-5, "gather vs reference out");
  }
}

TEST(pkm, search_and_gather_bad_inputs) {
  const pkm_problem p(4, 2, 8, 6, 5, 3, 61);
  pkm_result r = lookup(p, true);
  tensor<std::int64_t, 3> idx_bad({4, 2, 2});
  tensor<float, 3> w_bad({4, 1, 3});
  tensor<float, 2> out_bad({4, 4});
  expect_error([&] { mem::pkm_search(p.query, p.keys, 3, idx_bad, r.weights); }, {"indices", "[4, 2, 3]", "[4, 2, 2]"});
  expect_error([&] { mem::pkm_search(p.query, p.keys, 3, r.indices, w_bad); }, {"weights", "[4, 2, 3]", "[4, 1, 3]"});
  expect_error([&] { mem::pkm_search(p.query, p.keys, 9, r.indices, r.weights); }, {"knn", "[1, n_keys = 6]", "9"});
  expect_error([&] { mem::pkm_gather(p.values, r.indices, w_bad, r.out); }, {"weights", "[4, 2, 3]", "[4, 1, 3]"});
  expect_error([&] { mem::pkm_gather(p.values, r.indices, r.weights, out_bad); }, {"out", "[4, 5]", "[4, 4]"});
  expect_error([&] { mem::pkm_gather(p.values, r.indices, r.weights, r.out, -1); }, {"threads", ">= 0", "-1"});
  r.indices(2, 0, 1) = 36;
  expect_error([&] { mem::pkm_gather(p.values, r.indices, r.weights, r.out); },
               {"indices[2, 0, 1]", "[0, values.shape[0] = 36)", "36"});
}

TEST(pkm, bad_inputs) {
  const pkm_problem p(4, 2, 8, 6, 5, 3, 60);
  pkm_result r = lookup(p, true);
  tensor<float, 3> odd_query({4, 2, 7});
  tensor<float, 4> keys_bad({2, 2, 6, 3});
  tensor<float, 2> values_bad({35, 5}), out_bad({4, 6});
  tensor<std::int64_t, 3> idx_bad({4, 2, 2});
  auto fwd = [&](auto&&... a) { mem::pkm_forward(a...); };
  expect_error([&] { fwd(odd_query, p.keys, p.values, 3, r.out, r.indices, r.weights); }, {"k_dim", "even", "7"});
  expect_error([&] { fwd(p.query, keys_bad, p.values, 3, r.out, r.indices, r.weights); },
               {"keys", "[2, 2, 6, 4]", "[2, 2, 6, 3]"});
  expect_error([&] { fwd(p.query, p.keys, values_bad, 3, r.out, r.indices, r.weights); }, {"values", "36", "35"});
  expect_error([&] { fwd(p.query, p.keys, p.values, 7, r.out, r.indices, r.weights); }, {"knn", "[1, n_keys = 6]", "7"});
  expect_error([&] { fwd(p.query, p.keys, p.values, 0, r.out, r.indices, r.weights); }, {"knn", "0"});
  expect_error([&] { fwd(p.query, p.keys, p.values, 3, out_bad, r.indices, r.weights); }, {"out", "[4, 5]", "[4, 6]"});
  expect_error([&] { fwd(p.query, p.keys, p.values, 3, r.out, idx_bad, r.weights); }, {"indices", "[4, 2, 3]", "[4, 2, 2]"});
  expect_error([&] { mem::reference::pkm_forward(p.query, p.keys, p.values, 3, r.out, r.indices, r.weights, {}, {.threads = -2}); },
               {"threads", ">= 0", "-2"});
  tensor<float, 3> dq({4, 2, 8});
  tensor<float, 4> dk({2, 2, 6, 4});
  tensor<float, 2> dv({36, 5}), dout({4, 5}), dout_bad({3, 5});
  auto bwd = [&](auto&&... a) { mem::pkm_backward(a...); };
  expect_error([&] { bwd(p.query, p.keys, p.values, r.indices, r.weights, dout_bad, dq, dk, dv); }, {"dout", "[4, 5]", "[3, 5]"});
  expect_error([&] { bwd(p.query, p.keys, p.values, r.indices, r.weights, dout, dq, keys_bad, dv); },
               {"dkeys", "[2, 2, 6, 4]", "[2, 2, 6, 3]"});
  r.indices(1, 1, 2) = 36;
  expect_error([&] { bwd(p.query, p.keys, p.values, r.indices, r.weights, dout, dq, dk, dv); },
               {"indices[1, 1, 2]", "[0, n_keys^2 = 36)", "36"});
  r.indices(1, 1, 2) = -1;
  expect_error([&] { mem::reference::pkm_backward(p.query, p.keys, p.values, r.indices, r.weights, dout, dq, dk, dv); },
               {"indices[1, 1, 2]", "-1"});
}

}  // namespace
