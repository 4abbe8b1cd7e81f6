// Tests of the slot memories: memory/memformer.hpp (with the shared projected cross-attention),
// memory/lm2.hpp, memory/reactive.hpp (RxT) and memory/token_turing.hpp (TTM). Each fast path
// against its double reference on awkward sizes (L = 1, S = 1, lengths and widths that are no
// multiple of a tile, several heads, B = 2, repeated writes), facts computed here from the
// equations (one key, uniform attention, saturated gates, a slot holding [k; v] reads back v, a
// summariser with equal or one dominant logit), and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "memory/test_util.hpp"
#include "mnemo/memory/lm2.hpp"
#include "mnemo/memory/memformer.hpp"
#include "mnemo/memory/reactive.hpp"
#include "mnemo/memory/token_turing.hpp"

namespace {

using namespace memory_test;
namespace mem = mnemo::memory;
using mnemo::cview;

constexpr double atol = 2e-5, rtol = 2e-4;

// A [D, D] weight with entries of size 1/sqrt(D), so scores stay O(1).
tensor<float, 2> weight(std::int64_t D, std::mt19937& rng, float gain = 1.0f) {
  const float a = gain / std::sqrt(static_cast<float>(D));
  return random_tensor<2>({D, D}, rng, -a, a);
}

struct projections {
  tensor<float, 2> wq, wk, wv, wo;
  projections(std::int64_t D, std::mt19937& rng, float gain = 2.0f)
      : wq(weight(D, rng, gain)), wk(weight(D, rng, gain)), wv(weight(D, rng)), wo(weight(D, rng)) {}
  mem::attention_projections get() const { return {wq, wk, wv, wo}; }
};

struct shape {
  std::int64_t B, L, S, D, H;
  int threads;  // 0: the OpenMP default (few shapes: parallel regions are slow on a loaded machine)
  std::string name() const {
    return "B=" + std::to_string(B) + " L=" + std::to_string(L) + " S=" + std::to_string(S) + " D=" +
           std::to_string(D) + " H=" + std::to_string(H) + " threads=" + std::to_string(threads);
  }
};

// L = 1, S = 1, a single head of width 40, heads of width 10 and 8, lengths past one flash tile.
const std::vector<shape> shapes = {
    {1, 1, 1, 4, 1, 1}, {2, 37, 5, 40, 4, 2}, {1, 9, 70, 24, 3, 1}, {2, 130, 17, 16, 2, 2}, {1, 3, 1, 40, 1, 0}};

// x [L, D] (item b) times w [D, N] in double: the tests' own product.
std::vector<double> matmul(const std::vector<double>& x, std::int64_t L, const tensor<float, 2>& w) {
  const std::int64_t K = w.extent(0), N = w.extent(1);
  std::vector<double> y(static_cast<std::size_t>(L * N), 0.0);
  for (std::int64_t t = 0; t < L; ++t)
    for (std::int64_t k = 0; k < K; ++k)
      for (std::int64_t c = 0; c < N; ++c) y[t * N + c] += x[t * K + k] * w(k, c);
  return y;
}

// The mean over the tokens of item b of x [B, L, D], as one row.
std::vector<double> token_mean(const tensor<float, 3>& x, std::int64_t b) {
  const std::int64_t L = x.extent(1), D = x.extent(2);
  std::vector<double> m(static_cast<std::size_t>(D), 0.0);
  for (std::int64_t t = 0; t < L; ++t)
    for (std::int64_t c = 0; c < D; ++c) m[c] += x(b, t, c) / static_cast<double>(L);
  return m;
}

double sigmoid(double a) { return 1.0 / (1.0 + std::exp(-a)); }

// ---- the shared cross-attention ----

TEST(slot_cross_attention, fast_matches_reference) {
  std::mt19937 rng(1);
  for (const shape& s : shapes) {
    const projections w(s.D, rng);
    const tensor<float, 3> x = random_tensor<3>({s.B, s.L, s.D}, rng), c = random_tensor<3>({s.B, s.S, s.D}, rng);
    tensor<float, 3> ref({s.B, s.L, s.D}), fast({s.B, s.L, s.D});
    mem::reference::cross_attention(x, c, w.get(), ref, s.H, s.threads);
    mem::cross_attention(x, c, w.get(), fast, s.H, s.threads);
    expect_close(fast, ref, atol, rtol, s.name());
    // Lq and Lk swapped: the slots query the tokens.
    tensor<float, 3> ref2({s.B, s.S, s.D}), fast2({s.B, s.S, s.D});
    mem::reference::cross_attention(c, x, w.get(), ref2, s.H, 1);
    mem::cross_attention(c, x, w.get(), fast2, s.H, s.threads);
    expect_close(fast2, ref2, atol, rtol, s.name() + " swapped");
  }
}

TEST(slot_cross_attention, strided_views_are_read_in_place) {
  // Tokens that are the first D channels of a wider buffer (row stride 2 D + 3): the same result
  // as from contiguous copies, for the cross-attention and the TTM summariser.
  std::mt19937 rng(16);
  const std::int64_t B = 2, L = 11, S = 4, D = 12, W = 2 * D + 3;
  const projections w(D, rng);
  const tensor<float, 3> wide_x = random_tensor<3>({B, L, W}, rng), wide_c = random_tensor<3>({B, S, W}, rng);
  const auto x = cview(wide_x).narrow(2, 0, D), c = cview(wide_c).narrow(2, 1, D);
  tensor<float, 3> xc({B, L, D}), cc({B, S, D}), wide_out({B, L, W}), want({B, L, D});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t j = 0; j < D; ++j) {
      for (std::int64_t t = 0; t < L; ++t) xc(b, t, j) = x(b, t, j);
      for (std::int64_t t = 0; t < S; ++t) cc(b, t, j) = c(b, t, j);
    }
  mem::cross_attention(xc, cc, w.get(), want, 3);
  mem::cross_attention(x, c, w.get(), wide_out.as_view().narrow(2, 2, D), 3);
  expect_close(wide_out.as_view().narrow(2, 2, D), want, 1e-6, 1e-6, "cross_attention");
  const tensor<float, 2> w2 = random_tensor<2>({D, 3}, rng);
  tensor<float, 3> z({B, 3, D}), z_want({B, 3, D});
  mem::token_summarize(xc, {.w2 = w2}, z_want);
  mem::token_summarize(x, {.w2 = w2}, z);
  expect_close(z, z_want, 1e-6, 1e-6, "token_summarize");
}

TEST(slot_cross_attention, one_key_returns_its_projected_value) {
  // One key: every softmax weight is 1, so out_t = (c Wv) Wo for every query t.
  std::mt19937 rng(2);
  const std::int64_t D = 12, L = 7;
  const projections w(D, rng);
  const tensor<float, 3> x = random_tensor<3>({1, L, D}, rng), c = random_tensor<3>({1, 1, D}, rng);
  const std::vector<double> want = matmul(matmul(std::vector<double>(c.begin(), c.end()), 1, w.wv), 1, w.wo);
  for (bool fast : {false, true}) {
    tensor<float, 3> out({1, L, D});
    fast ? mem::cross_attention(x, c, w.get(), out, 3) : mem::reference::cross_attention(x, c, w.get(), out, 3);
    for (std::int64_t t = 0; t < L; ++t)
      for (std::int64_t j = 0; j < D; ++j) EXPECT_NEAR(out(0, t, j), want[j], 1e-5) << "fast=" << fast;
  }
}

// Slots [k_i; v_i] with orthonormal k_i, projections that compare the query's first half with the
// keys' first half (sharply: gain 80) and return the slots' second half: reading [k_j; 0] returns
// [0; v_j]. The associative-recall use of every attention-read slot memory.
struct kv_slots {
  static constexpr std::int64_t d = 8, D = 2 * d, S = 5;
  static constexpr float gain = 80.0f;
  tensor<float, 3> memory{{1, S, D}}, queries{{1, S, D}};
  tensor<float, 2> wq{{D, D}}, wk{{D, D}}, wv{{D, D}}, wo{{D, D}};
  std::vector<std::vector<float>> values;
  explicit kv_slots(std::mt19937& rng) {
    for (auto* t : {&memory, &queries}) std::fill(t->begin(), t->end(), 0.0f);
    for (auto* t : {&wq, &wk, &wv, &wo}) std::fill(t->begin(), t->end(), 0.0f);
    std::uniform_real_distribution<float> u(-1, 1);
    for (std::int64_t i = 0; i < S; ++i) {
      memory(0, i, i) = 1.0f;  // k_i = e_i
      queries(0, S - 1 - i, i) = 1.0f;  // the queries ask in reverse order
      values.emplace_back();
      for (std::int64_t c = 0; c < d; ++c) values.back().push_back(memory(0, i, d + c) = u(rng));
    }
    for (std::int64_t c = 0; c < d; ++c) {
      wq(c, c) = gain;
      wk(c, c) = 1.0f;
      wv(d + c, d + c) = 1.0f;
    }
    for (std::int64_t c = 0; c < D; ++c) wo(c, c) = 1.0f;
  }
  mem::attention_projections get() const { return {wq, wk, wv, wo}; }
  // |out_t - factor [0; v_{S-1-t}]| at most.
  double error(const tensor<float, 3>& out, double factor) const {
    double e = 0;
    for (std::int64_t t = 0; t < S; ++t)
      for (std::int64_t c = 0; c < D; ++c) {
        const double want = c < d ? 0.0 : factor * values[S - 1 - t][c - d];
        e = std::max(e, std::fabs(out(0, t, c) - want));
      }
    return e;
  }
};

TEST(slot_memories, a_slot_holding_key_and_value_reads_back_the_value) {
  std::mt19937 rng(3);
  const kv_slots kv(rng);
  const tensor<float, 2> zero({kv_slots::D, kv_slots::D});
  tensor<float, 2> w_out = zero;
  std::fill(w_out.begin(), w_out.end(), 0.0f);  // LM2's output gate sigmoid(0) = 1/2
  for (bool fast : {false, true}) {
    tensor<float, 3> out({1, kv_slots::S, kv_slots::D});
    const mem::memformer_weights mf{.read = kv.get()};
    fast ? mem::memformer_read(kv.queries, kv.memory, mf, out)
         : mem::reference::memformer_read(kv.queries, kv.memory, mf, out);
    EXPECT_LT(kv.error(out, 1.0), 1e-5) << "memformer fast=" << fast;
    const mem::rxt_weights rx{.read = kv.get()};
    fast ? mem::rxt_read(kv.queries, kv.memory, rx, out) : mem::reference::rxt_read(kv.queries, kv.memory, rx, out);
    EXPECT_LT(kv.error(out, 1.0), 1e-5) << "rxt fast=" << fast;
    const mem::lm2_weights lm{.read = kv.get(), .w_out = w_out};
    fast ? mem::lm2_read(kv.queries, kv.memory, lm, out) : mem::reference::lm2_read(kv.queries, kv.memory, lm, out);
    EXPECT_LT(kv.error(out, 0.5), 1e-5) << "lm2 fast=" << fast;
  }
}

// ---- Memformer ----

struct memformer_problem {
  projections read, write;
  tensor<float, 2> bias;
  memformer_problem(std::int64_t S, std::int64_t D, std::mt19937& rng)
      : read(D, rng), write(D, rng), bias(random_tensor<2>({S, D}, rng, -0.5f, 0.5f)) {}
  mem::memformer_weights get(bool with_bias) const {
    return {read.get(), write.get(), with_bias ? cview(bias) : mnemo::view<const float, 2>{}};
  }
};

TEST(memformer, fast_matches_reference) {
  std::mt19937 rng(4);
  for (const shape& s : shapes)
    for (bool with_bias : {false, true})
      for (bool normalize : {true, false}) {
        const memformer_problem p(s.S, s.D, rng);
        const mem::memformer_options opt{.heads = s.H, .normalize = normalize, .threads = s.threads};
        tensor<float, 3> ref = random_tensor<3>({s.B, s.S, s.D}, rng), fast = ref;
        const std::string what =
            s.name() + " bias=" + std::to_string(with_bias) + " normalize=" + std::to_string(normalize);
        for (int step = 0; step < 2; ++step) {
          const tensor<float, 3> h = random_tensor<3>({s.B, s.L, s.D}, rng);
          tensor<float, 3> r_ref({s.B, s.L, s.D}), r_fast({s.B, s.L, s.D});
          mem::reference::memformer_read(h, ref, p.get(with_bias), r_ref, opt);
          mem::memformer_read(h, fast, p.get(with_bias), r_fast, opt);
          expect_close(r_fast, r_ref, atol, rtol, what + ": read " + std::to_string(step));
          mem::reference::memformer_write(h, ref, p.get(with_bias), opt);
          mem::memformer_write(h, fast, p.get(with_bias), opt);
          expect_close(fast, ref, atol, rtol, what + ": write " + std::to_string(step));
        }
      }
}

TEST(memformer, uniform_slot_attention_then_bmn) {
  // Wq = 0: every score is 0, so slot i averages its own value and the L token values:
  //   m'_i = ((m_i + sum_t h_t) / (L + 1)) Wv Wo,  then m''_i = (m'_i + b_i) / ||m'_i + b_i||.
  std::mt19937 rng(5);
  const std::int64_t S = 3, L = 6, D = 10;
  memformer_problem p(S, D, rng);
  std::fill(p.write.wq.begin(), p.write.wq.end(), 0.0f);
  const tensor<float, 3> m0 = random_tensor<3>({1, S, D}, rng), h = random_tensor<3>({1, L, D}, rng);
  for (bool fast : {false, true}) {
    tensor<float, 3> m = m0;
    const mem::memformer_options opt{.heads = 2};
    fast ? mem::memformer_write(h, m, p.get(true), opt) : mem::reference::memformer_write(h, m, p.get(true), opt);
    const std::vector<double> hm = token_mean(h, 0);
    for (std::int64_t i = 0; i < S; ++i) {
      std::vector<double> avg(static_cast<std::size_t>(D));
      for (std::int64_t c = 0; c < D; ++c) avg[c] = (m0(0, i, c) + L * hm[c]) / static_cast<double>(L + 1);
      std::vector<double> want = matmul(matmul(avg, 1, p.write.wv), 1, p.write.wo);
      double n2 = 0;
      for (std::int64_t c = 0; c < D; ++c) n2 += (want[c] += p.bias(i, c)) * want[c];
      for (std::int64_t c = 0; c < D; ++c) EXPECT_NEAR(m(0, i, c), want[c] / std::sqrt(n2), 1e-5) << "fast=" << fast;
    }
  }
}

TEST(memformer, addressed_writes_store_pairs_the_read_recalls) {
  // Width D = S + 2 d: slot address (one-hot), key, value. Slot i starts as [a_i; 0; 0]. The write
  // compares addresses (gain 80): a segment token [2 a_s; k; v] scores twice what slot s's own key
  // scores, so slot s takes the token; every other slot's own key wins over the segment (the
  // retention of the slot attention), so it keeps its content. Without BMN's normalisation slot s
  // becomes [2 a_s; k; v] exactly (to e^-17); with it, the same direction. The read compares the
  // query's key part with the slots' key parts and returns their value parts.
  constexpr std::int64_t S = 4, d = 6, D = S + 2 * d, filler = 3;
  constexpr float gain = 80.0f;
  std::mt19937 rng(15);
  std::normal_distribution<float> normal;
  auto zeros = [](std::int64_t r, std::int64_t c) {
    tensor<float, 2> t({r, c});
    std::fill(t.begin(), t.end(), 0.0f);
    return t;
  };
  tensor<float, 2> wq = zeros(D, D), wk = zeros(D, D), eye = zeros(D, D), rq = zeros(D, D), rk = zeros(D, D),
                   rv = zeros(D, D);
  for (std::int64_t c = 0; c < D; ++c) eye(c, c) = 1.0f;
  for (std::int64_t a = 0; a < S; ++a) {
    wq(a, a) = gain;
    wk(a, a) = 1.0f;
  }
  for (std::int64_t c = 0; c < d; ++c) {
    rq(S + c, S + c) = gain;
    rk(S + c, S + c) = 1.0f;
    rv(S + d + c, S + d + c) = 1.0f;
  }
  const mem::memformer_weights w{{rq, rk, rv, eye}, {wq, wk, eye, eye}, {}};
  std::vector<std::vector<float>> keys(S, std::vector<float>(d, 0.0f)), values(S);
  tensor<float, 3> queries({1, S, D});
  std::fill(queries.begin(), queries.end(), 0.0f);
  for (std::int64_t j = 0; j < S; ++j) {
    keys[j][j] = 1.0f;
    queries(0, j, S + j) = 1.0f;
    for (std::int64_t c = 0; c < d; ++c) values[j].push_back(normal(rng));
  }
  for (bool fast : {false, true})
    for (bool normalize : {false, true}) {
      const mem::memformer_options opt{.normalize = normalize};
      tensor<float, 3> memory({1, S, D});
      std::fill(memory.begin(), memory.end(), 0.0f);
      for (std::int64_t i = 0; i < S; ++i) memory(0, i, i) = 1.0f;
      for (std::int64_t s = 0; s < S; ++s) {
        tensor<float, 3> seg({1, 1 + filler, D});
        std::fill(seg.begin(), seg.end(), 0.0f);
        seg(0, 0, s) = 2.0f;
        for (std::int64_t c = 0; c < d; ++c) {
          seg(0, 0, S + c) = keys[s][c];
          seg(0, 0, S + d + c) = values[s][c];
          for (std::int64_t t = 1; t <= filler; ++t) seg(0, t, S + c) = seg(0, t, S + d + c) = normal(rng);
        }
        const tensor<float, 3> before = memory;
        fast ? mem::memformer_write(seg, memory, w, opt) : mem::reference::memformer_write(seg, memory, w, opt);
        if (normalize) continue;
        for (std::int64_t i = 0; i < S; ++i)
          for (std::int64_t c = 0; c < D; ++c)
            EXPECT_NEAR(memory(0, i, c), i == s ? seg(0, 0, c) : before(0, i, c), 1e-5)
                << "fast=" << fast << " write " << s << " slot " << i;
      }
      tensor<float, 3> out({1, S, D});
      fast ? mem::memformer_read(queries, memory, w, out, opt)
           : mem::reference::memformer_read(queries, memory, w, out, opt);
      for (std::int64_t j = 0; j < S; ++j) {
        double ab = 0, aa = 0, bb = 0;
        for (std::int64_t c = 0; c < d; ++c) {
          ab += double(out(0, j, S + d + c)) * values[j][c];
          aa += double(out(0, j, S + d + c)) * out(0, j, S + d + c);
          bb += double(values[j][c]) * values[j][c];
        }
        EXPECT_GT(ab / std::sqrt(aa * bb), 0.99) << "fast=" << fast << " normalize=" << normalize << " pair " << j;
      }
    }
}

// ---- LM2 ----

struct lm2_problem {
  projections read, write;
  tensor<float, 2> w_out, w_in, w_forget;
  lm2_problem(std::int64_t D, std::mt19937& rng)
      : read(D, rng), write(D, rng), w_out(weight(D, rng)), w_in(weight(D, rng)), w_forget(weight(D, rng)) {}
  mem::lm2_weights get() const { return {read.get(), w_out, write.get(), w_in, w_forget}; }
};

TEST(lm2, fast_matches_reference) {
  std::mt19937 rng(6);
  for (const shape& s : shapes) {
    const lm2_problem p(s.D, rng);
    const mem::lm2_options opt{.heads = s.H, .threads = s.threads};
    tensor<float, 3> ref = random_tensor<3>({s.B, s.S, s.D}, rng), fast = ref;
    for (int step = 0; step < 3; ++step) {
      const tensor<float, 3> x = random_tensor<3>({s.B, s.L, s.D}, rng);
      tensor<float, 3> r_ref({s.B, s.L, s.D}), r_fast({s.B, s.L, s.D});
      mem::reference::lm2_read(x, ref, p.get(), r_ref, opt);
      mem::lm2_read(x, fast, p.get(), r_fast, opt);
      expect_close(r_fast, r_ref, atol, rtol, s.name() + ": read " + std::to_string(step));
      mem::reference::lm2_write(x, ref, p.get(), opt);
      mem::lm2_write(x, fast, p.get(), opt);
      expect_close(fast, ref, atol, rtol, s.name() + ": write " + std::to_string(step));
    }
  }
}

TEST(lm2, half_open_gates_and_uniform_write_attention) {
  // W_in = W_forget = 0: both gates are 1/2; write Wq = 0: every slot reads the token mean,
  // E_mem = mean(x) Wv Wo. So M' = tanh(E_mem) / 2 + M / 2 (the same candidate in every slot).
  std::mt19937 rng(7);
  const std::int64_t S = 4, L = 5, D = 8;
  lm2_problem p(D, rng);
  for (auto* t : {&p.w_in, &p.w_forget, &p.write.wq}) std::fill(t->begin(), t->end(), 0.0f);
  const tensor<float, 3> m0 = random_tensor<3>({1, S, D}, rng), x = random_tensor<3>({1, L, D}, rng);
  const std::vector<double> e = matmul(matmul(token_mean(x, 0), 1, p.write.wv), 1, p.write.wo);
  for (bool fast : {false, true}) {
    tensor<float, 3> m = m0;
    fast ? mem::lm2_write(x, m, p.get(), {.heads = 2}) : mem::reference::lm2_write(x, m, p.get(), {.heads = 2});
    for (std::int64_t i = 0; i < S; ++i)
      for (std::int64_t c = 0; c < D; ++c)
        EXPECT_NEAR(m(0, i, c), 0.5 * std::tanh(e[c]) + 0.5 * m0(0, i, c), 1e-5) << "fast=" << fast;
  }
}

TEST(lm2, output_gate_scales_the_read) {
  // out = sigmoid(E_mem W_out) * E_mem: with W_out = a I the gate of channel c is sigmoid(a e_c).
  std::mt19937 rng(8);
  const std::int64_t D = 6, L = 4, S = 3;
  lm2_problem p(D, rng);
  std::fill(p.w_out.begin(), p.w_out.end(), 0.0f);
  for (std::int64_t c = 0; c < D; ++c) p.w_out(c, c) = 3.0f;
  const tensor<float, 3> x = random_tensor<3>({1, L, D}, rng), m = random_tensor<3>({1, S, D}, rng);
  tensor<float, 3> e({1, L, D}), out({1, L, D});
  mem::reference::cross_attention(x, m, p.read.get(), e);
  mem::lm2_read(x, m, p.get(), out);
  for (std::int64_t t = 0; t < L; ++t)
    for (std::int64_t c = 0; c < D; ++c) EXPECT_NEAR(out(0, t, c), sigmoid(3.0 * e(0, t, c)) * e(0, t, c), 1e-5);
}

// ---- RxT ----

struct rxt_problem {
  projections read, write;
  tensor<float, 2> w_gate;
  tensor<float, 1> b_gate;
  rxt_problem(std::int64_t D, std::mt19937& rng)
      : read(D, rng), write(D, rng), w_gate(weight(D, rng)), b_gate(random_tensor<1>({D}, rng)) {}
  mem::rxt_weights get(bool with_bias = true) const {
    return {read.get(), write.get(), w_gate, with_bias ? cview(b_gate) : mnemo::view<const float, 1>{}};
  }
};

TEST(rxt, fast_matches_reference) {
  std::mt19937 rng(9);
  for (const shape& s : shapes)
    for (bool with_bias : {true, false}) {
      const rxt_problem p(s.D, rng);
      const mem::rxt_options opt{.heads = s.H, .threads = s.threads};
      tensor<float, 3> ref = random_tensor<3>({s.B, s.S, s.D}, rng), fast = ref;
      for (int step = 0; step < 3; ++step) {
        const tensor<float, 3> x = random_tensor<3>({s.B, s.L, s.D}, rng);
        const tensor<float, 3> ed = random_tensor<3>({s.B, s.L + step, s.D}, rng);  // L_ed != L
        tensor<float, 3> r_ref({s.B, s.L, s.D}), r_fast({s.B, s.L, s.D});
        mem::reference::rxt_read(x, ref, p.get(with_bias), r_ref, opt);
        mem::rxt_read(x, fast, p.get(with_bias), r_fast, opt);
        const std::string what = s.name() + " bias=" + std::to_string(with_bias) + " step " + std::to_string(step);
        expect_close(r_fast, r_ref, atol, rtol, what + ": read");
        mem::reference::rxt_write(ed, ref, p.get(with_bias), opt);
        mem::rxt_write(ed, fast, p.get(with_bias), opt);
        expect_close(fast, ref, atol, rtol, what + ": write");
      }
    }
}

TEST(rxt, saturated_gate_keeps_or_replaces) {
  // W_g = 0, b_g = -/+ 40: G = 0 keeps STM exactly (to f32), G = 1 replaces it by Update; with the
  // write's Wq = 0 every slot's Update is mean(ED) Wv Wo.
  std::mt19937 rng(10);
  const std::int64_t S = 3, L = 9, D = 8;
  rxt_problem p(D, rng);
  for (auto* t : {&p.w_gate, &p.write.wq}) std::fill(t->begin(), t->end(), 0.0f);
  const tensor<float, 3> stm0 = random_tensor<3>({1, S, D}, rng), ed = random_tensor<3>({1, L, D}, rng);
  const std::vector<double> update = matmul(matmul(token_mean(ed, 0), 1, p.write.wv), 1, p.write.wo);
  for (bool fast : {false, true})
    for (float b : {-40.0f, 40.0f}) {
      std::fill(p.b_gate.begin(), p.b_gate.end(), b);
      tensor<float, 3> stm = stm0;
      fast ? mem::rxt_write(ed, stm, p.get(), {.heads = 4}) : mem::reference::rxt_write(ed, stm, p.get(), {.heads = 4});
      for (std::int64_t i = 0; i < S; ++i)
        for (std::int64_t c = 0; c < D; ++c)
          EXPECT_NEAR(stm(0, i, c), b < 0 ? stm0(0, i, c) : update[c], 1e-5) << "fast=" << fast << " b=" << b;
    }
}

// ---- Token Turing Machines ----

struct ttm_problem {
  tensor<float, 2> r1, r2, m1, m2;
  bool mlp;
  ttm_problem(std::int64_t D, std::int64_t Hd, std::int64_t r, std::int64_t m, bool mlp_, std::mt19937& rng)
      : r1(random_tensor<2>({D, Hd}, rng)), r2(random_tensor<2>({mlp_ ? Hd : D, r}, rng)),
        m1(random_tensor<2>({D, Hd}, rng)), m2(random_tensor<2>({mlp_ ? Hd : D, m}, rng)), mlp(mlp_) {}
  mem::ttm_weights get() const {
    using v2 = mnemo::view<const float, 2>;
    return {{mlp ? cview(r1) : v2{}, r2}, {mlp ? cview(m1) : v2{}, m2}};
  }
};

// A processing unit: out_t = tanh(read_t + 1) for the p = r tokens.
void process(mnemo::view<const float, 3> in, mnemo::view<float, 3> out) {
  for (std::int64_t b = 0; b < in.extent(0); ++b)
    for (std::int64_t t = 0; t < in.extent(1); ++t)
      for (std::int64_t c = 0; c < in.extent(2); ++c) out(b, t, c) = std::tanh(in(b, t, c) + 1.0f);
}

TEST(ttm, fast_matches_reference) {
  std::mt19937 rng(11);
  struct tshape {
    std::int64_t B, m, n, r, D, Hd;
  };
  for (const tshape& s : std::vector<tshape>{{1, 1, 1, 1, 4, 3}, {2, 10, 37, 4, 40, 17}, {1, 96, 200, 16, 24, 64}})
    for (bool mlp : {false, true})
      for (mem::activation act : {mem::activation::gelu, mem::activation::silu}) {
        if (!mlp && act == mem::activation::silu) continue;
        const ttm_problem p(s.D, s.Hd, s.r, s.m, mlp, rng);
        const mem::ttm_options opt{.act = act};
        const std::string what = "m=" + std::to_string(s.m) + " n=" + std::to_string(s.n) + " D=" +
                                 std::to_string(s.D) + " mlp=" + std::to_string(mlp) + " " + mem::activation_name(act);
        tensor<float, 3> ref = random_tensor<3>({s.B, s.m, s.D}, rng), fast = ref;
        for (int step = 0; step < 2; ++step) {
          const tensor<float, 3> in = random_tensor<3>({s.B, s.n, s.D}, rng);
          tensor<float, 3> z_ref({s.B, s.r, s.D}), z_fast({s.B, s.r, s.D});
          mem::reference::ttm_read(ref, in, p.get(), z_ref, opt);
          mem::ttm_read(fast, in, p.get(), z_fast, opt);
          expect_close(z_fast, z_ref, atol, rtol, what + ": read");
          tensor<float, 3> o_ref({s.B, s.r, s.D}), o_fast({s.B, s.r, s.D});
          mem::ttm_step(ref, in, p.get(), process, o_ref, opt, true);
          mem::ttm_step(fast, in, p.get(), process, o_fast, opt);
          expect_close(o_fast, o_ref, atol, rtol, what + ": step output");
          expect_close(fast, ref, atol, rtol, what + ": memory after step " + std::to_string(step));
        }
      }
}

TEST(ttm, step_is_read_process_write) {
  std::mt19937 rng(12);
  const std::int64_t m = 5, n = 7, r = 3, D = 6;
  const ttm_problem p(D, 4, r, m, true, rng);
  const tensor<float, 3> m0 = random_tensor<3>({1, m, D}, rng), in = random_tensor<3>({1, n, D}, rng);
  tensor<float, 3> stepped = m0, out({1, r, D});
  mem::ttm_step(stepped, in, p.get(), process, out);
  tensor<float, 3> by_hand = m0, z({1, r, D}), o({1, r, D});
  mem::ttm_read(by_hand, in, p.get(), z);
  process(z, o);
  mem::ttm_write(by_hand, o, in, p.get());
  expect_close(out, o, 0, 0, "output");
  expect_close(stepped, by_hand, 0, 0, "memory");
}

TEST(ttm, summaries_from_equal_and_dominant_logits) {
  // w2 = 0: every weight is 1/N, each output token is the token mean. A token whose logit for
  // output i exceeds the others by 50 gets weight 1 - O(e^-50): output i copies it.
  std::mt19937 rng(13);
  const std::int64_t N = 9, D = 5, k = 2;
  tensor<float, 3> x = random_tensor<3>({1, N, D}, rng);
  tensor<float, 2> w2({D, k});
  std::fill(w2.begin(), w2.end(), 0.0f);
  for (bool fast : {false, true}) {
    tensor<float, 3> out({1, k, D});
    fast ? mem::token_summarize(x, {.w2 = w2}, out) : mem::reference::token_summarize(x, {.w2 = w2}, out);
    const std::vector<double> mean = token_mean(x, 0);
    for (std::int64_t i = 0; i < k; ++i)
      for (std::int64_t c = 0; c < D; ++c) EXPECT_NEAR(out(0, i, c), mean[c], 1e-6) << "fast=" << fast;
  }
  for (std::int64_t t = 0; t < N; ++t) x(0, t, 0) = t == 6 ? 50.0f : 0.0f;
  w2(0, 1) = 1.0f;  // output 1 looks at channel 0; output 0 stays the mean
  for (bool fast : {false, true}) {
    tensor<float, 3> out({1, k, D});
    fast ? mem::token_summarize(x, {.w2 = w2}, out) : mem::reference::token_summarize(x, {.w2 = w2}, out);
    for (std::int64_t c = 0; c < D; ++c) EXPECT_NEAR(out(0, 1, c), x(0, 6, c), 1e-6) << "fast=" << fast;
  }
}

// ---- bad input ----

TEST(slot_memories, bad_inputs) {
  std::mt19937 rng(14);
  const std::int64_t B = 1, L = 4, S = 3, D = 6;
  const memformer_problem mf(S, D, rng);
  const lm2_problem lm(D, rng);
  const rxt_problem rx(D, rng);
  tensor<float, 3> x = random_tensor<3>({B, L, D}, rng), m = random_tensor<3>({B, S, D}, rng), out({B, L, D});
  tensor<float, 3> x_bad({2, L, D}), out_bad({B, L + 1, D});
  tensor<float, 2> w_bad({D, D + 1}), bias_bad({S + 1, D});
  tensor<float, 1> b_bad({D - 1});

  expect_error([&] { mem::cross_attention(x, m, mf.read.get(), out, 4); },
               {"cross_attention", "heads", "divide D = 6", "4"});
  expect_error([&] { mem::memformer_read(x_bad, m, mf.get(true), out); },
               {"memformer_read", "x", "[1, L >= 1, 6]", "[2, 4, 6]"});
  expect_error([&] { mem::memformer_read(x, m, mf.get(true), out_bad); }, {"out", "[1, 4, 6]", "[1, 5, 6]"});
  mem::memformer_weights mw = mf.get(true);
  mw.bias = bias_bad;
  expect_error([&] { mem::memformer_write(x, m, mw, {}); }, {"memformer_write", "weights.bias", "[3, 6]", "[4, 6]"});
  mw = mf.get(true);
  mw.write.wv = w_bad;
  expect_error([&] { mem::reference::memformer_write(x, m, mw, {}); }, {"weights.write.wv", "[6, 6]", "[6, 7]"});
  expect_error([&] { mem::memformer_write(x, m, mf.get(false), {.threads = -1}); }, {"threads", ">= 0", "-1"});

  mem::lm2_weights lw = lm.get();
  lw.w_forget = w_bad;
  expect_error([&] { mem::lm2_write(x, m, lw); }, {"lm2_write", "weights.w_forget", "[6, 6]", "[6, 7]"});
  lw = lm.get();
  lw.w_out = {};
  expect_error([&] { mem::reference::lm2_read(x, m, lw, out); }, {"lm2_read", "weights.w_out", "[6, 6]"});
  expect_error([&] { mem::lm2_read(x, m, lm.get(), out, {.heads = 0}); }, {"heads", "0"});

  mem::rxt_weights rw = rx.get();
  rw.b_gate = b_bad;
  expect_error([&] { mem::rxt_write(x, m, rw); }, {"rxt_write", "weights.b_gate", "[6]", "[5]"});
  expect_error([&] { mem::rxt_write(x_bad, m, rx.get()); }, {"rxt_write", "ed", "[2, 4, 6]"});
  expect_error([&] { mem::reference::rxt_read(x, m, rx.get(), out_bad); }, {"rxt_read", "out", "[1, 5, 6]"});

  const ttm_problem tp(D, 5, 2, S, true, rng);
  mem::ttm_weights tw = tp.get();
  tensor<float, 3> z({B, 2, D}), z_bad({B, 3, D});
  expect_error([&] { mem::ttm_read(m, x, tw, z_bad); }, {"token_summarize", "out", "[1, 2, 6]", "[1, 3, 6]"});
  tw.read.w2 = w_bad;
  expect_error([&] { mem::ttm_read(m, x, tw, z); }, {"weights.w2", "[5, k >= 1]", "[6, 7]"});
  tw = tp.get();
  tw.read.w1 = {};
  expect_error([&] { mem::reference::ttm_read(m, x, tw, z); }, {"weights.w2", "[6, k >= 1]", "(D)", "[5, 2]"});
  expect_error([&] { mem::ttm_write(m, z, x_bad, tp.get()); }, {"ttm_write", "[1, n, 6]", "[2, 4, 6]"});
  tensor<float, 3> empty_memory({B, 0, D});
  expect_error([&] { mem::ttm_read(empty_memory, x, tp.get(), z); }, {"ttm_read", "memory", "[1, 0, 6]"});
}

}  // namespace
