// Tests of memory/recurrent_memory.hpp: the RMT segment recurrence against a loop written here
// (both layouts, a partial last segment, memory carried between calls), and ARMT's associative
// memory: fast against reference, facts from its equations (a stored pair reads back as
// beta v / (1 + eps), the correction does not count a known key twice), save/load, bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "memory/test_util.hpp"
#include "mnemo/memory/recurrent_memory.hpp"

namespace {

using namespace memory_test;
namespace mem = mnemo::memory;

// A block that mixes tokens, so memory must carry information: out_i = tanh(in_i + mean_j in_j).
void mixing_block(view<const float, 3> in, view<float, 3> out) {
  const std::int64_t B = in.extent(0), T = in.extent(1), D = in.extent(2);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t c = 0; c < D; ++c) {
      double mean = 0;
      for (std::int64_t t = 0; t < T; ++t) mean += in(b, t, c);
      mean /= static_cast<double>(T);
      for (std::int64_t t = 0; t < T; ++t) out(b, t, c) = static_cast<float>(std::tanh(in(b, t, c) + mean));
    }
}

TEST(rmt, forward_matches_a_hand_written_loop) {
  std::mt19937 rng(1);
  const std::int64_t B = 2, L = 23, D = 5, M = 3;
  const tensor<float, 3> x = random_tensor<3>({B, L, D}, rng), mem0 = random_tensor<3>({B, M, D}, rng);
  for (bool separate : {true, false})
    for (std::int64_t S : {1, 4, 23, 40}) {
      tensor<float, 3> memory = mem0, y({B, L, D});
      mem::rmt_forward(x, memory, mixing_block, y, {.segment_len = S, .separate_write = separate});
      // The loop, written out: [mem; seg; mem] (or [mem; seg]) -> block -> outputs and memory.
      std::vector<float> m(mem0.begin(), mem0.end());
      tensor<float, 3> want({B, L, D});
      for (std::int64_t t0 = 0; t0 < L; t0 += S) {
        const std::int64_t n = std::min(S, L - t0), T = separate ? 2 * M + n : M + n;
        tensor<float, 3> in({B, T, D}), out({B, T, D});
        for (std::int64_t b = 0; b < B; ++b)
          for (std::int64_t c = 0; c < D; ++c) {
            for (std::int64_t i = 0; i < M; ++i) {
              in(b, i, c) = m[(b * M + i) * D + c];
              if (separate) in(b, M + n + i, c) = m[(b * M + i) * D + c];
            }
            for (std::int64_t t = 0; t < n; ++t) in(b, M + t, c) = x(b, t0 + t, c);
          }
        mixing_block(in, out);
        for (std::int64_t b = 0; b < B; ++b)
          for (std::int64_t c = 0; c < D; ++c) {
            for (std::int64_t t = 0; t < n; ++t) want(b, t0 + t, c) = out(b, M + t, c);
            for (std::int64_t i = 0; i < M; ++i) m[(b * M + i) * D + c] = out(b, (separate ? M + n : 0) + i, c);
          }
      }
      const std::string what = "S=" + std::to_string(S) + " separate=" + std::to_string(separate);
      expect_close(y, want, 0, 0, what + ": y");
      expect_close(memory, mnemo::view<const float, 3>(m.data(), {B, M, D}), 0, 0, what + ": memory");
    }
}

TEST(rmt, memory_carries_between_calls) {
  std::mt19937 rng(2);
  const tensor<float, 3> x = random_tensor<3>({1, 12, 4}, rng), mem0 = random_tensor<3>({1, 2, 4}, rng);
  tensor<float, 3> m1 = mem0, m2 = mem0, y1({1, 12, 4}), y2({1, 12, 4});
  mem::rmt_forward(x, m1, mixing_block, y1, {.segment_len = 3});
  mem::rmt_forward(mnemo::cview(x).narrow(1, 0, 6), m2, mixing_block, y2.as_view().narrow(1, 0, 6), {.segment_len = 3});
  mem::rmt_forward(mnemo::cview(x).narrow(1, 6, 6), m2, mixing_block, y2.as_view().narrow(1, 6, 6), {.segment_len = 3});
  expect_close(y2, y1, 0, 0, "y");
  expect_close(m2, m1, 0, 0, "memory");
}

TEST(rmt, bad_inputs) {
  tensor<float, 3> x({1, 5, 4}), m({1, 2, 4}), y({1, 5, 4}), m_bad({2, 2, 4}), in_bad({1, 8, 4});
  expect_error([&] { mem::rmt_forward(x, m, mixing_block, y, {.segment_len = 0}); }, {"segment_len", ">= 1", "0"});
  expect_error([&] { mem::rmt_forward(x, m_bad, mixing_block, y, {.segment_len = 2}); }, {"memory", "[1, 2, 4]", "[2, 2, 4]"});
  expect_error([&] { mem::rmt_assemble(m, x, in_bad); }, {"input", "[1, 9, 4]", "[1, 8, 4]"});
}

// ---- ARMT ----

struct armt_problem {
  std::int64_t B, H, M, L, Dk, Dv;
  tensor<float, 4> k, v, q;
  tensor<float, 3> beta;
  armt_problem(std::int64_t B_, std::int64_t H_, std::int64_t M_, std::int64_t L_, std::int64_t Dk_, std::int64_t Dv_,
               std::mt19937& rng)
      : B(B_), H(H_), M(M_), L(L_), Dk(Dk_), Dv(Dv_) {
    k = random_tensor<4>({B, H, M, Dk}, rng);
    v = random_tensor<4>({B, H, M, Dv}, rng);
    q = random_tensor<4>({B, H, L, Dk}, rng);
    beta = random_tensor<3>({B, H, M}, rng, 0.1f, 0.9f);
  }
};

void expect_same(const mem::associative_memory& a, const mem::associative_memory& b, double atol, double rtol,
                 const std::string& what) {
  EXPECT_EQ(a.segments(), b.segments());
  expect_close(a.matrix(), b.matrix(), atol, rtol, what + ": A");
  expect_close(a.normalizer(), b.normalizer(), atol, rtol, what + ": z");
}

TEST(armt, fast_matches_reference) {
  std::mt19937 rng(3);
  struct shape {
    std::int64_t B, H, M, L, Dk, Dv;
    int nu;
  };
  for (const shape& s : std::vector<shape>{{1, 1, 1, 1, 4, 4, 1}, {2, 3, 5, 37, 8, 24, 3}, {1, 2, 16, 9, 20, 40, 2}})
    for (bool correction : {true, false}) {
      mem::associative_memory ref(s.B, s.H, s.Dk, s.Dv, s.nu), fast(s.B, s.H, s.Dk, s.Dv, s.nu);
      const mem::armt_options opt{.correction = correction};
      for (int segment = 0; segment < 3; ++segment) {  // the first write is special (empty memory)
        const armt_problem p(s.B, s.H, s.M, s.L, s.Dk, s.Dv, rng);
        tensor<float, 4> or_({s.B, s.H, s.L, s.Dv}), of = or_;
        mem::reference::armt_read(p.q, ref, or_, opt);
        mem::armt_read(p.q, fast, of, opt);
        const std::string what = "Dk=" + std::to_string(s.Dk) + " nu=" + std::to_string(s.nu) + " segment " +
                                 std::to_string(segment) + " correction=" + std::to_string(correction);
        expect_close(of, or_, 1e-5, 1e-4, what + ": read");
        mem::reference::armt_update(p.k, p.v, p.beta, ref, opt);
        mem::armt_update(p.k, p.v, p.beta, fast, opt);
        expect_same(fast, ref, 1e-5, 1e-4, what);
      }
    }
}

TEST(armt, a_stored_pair_reads_back) {
  // Empty memory, one token: A = beta phi(k)^T v, z = phi(k) with |phi(k)| = 1, so reading at
  // q = k gives beta v / (1 + eps). Writing the same key again: gamma = clip(1 - (1 + eps), 0, 1)
  // = 0 leaves z alone, and vbar = beta v / (1 + eps) is subtracted from v.
  std::mt19937 rng(4);
  const armt_problem p(1, 1, 1, 1, 6, 5, rng);
  for (bool fast : {false, true}) {
    mem::associative_memory m(1, 1, 6, 5);
    const mem::armt_options opt{};
    auto update = [&] { fast ? mem::armt_update(p.k, p.v, p.beta, m, opt) : mem::reference::armt_update(p.k, p.v, p.beta, m, opt); };
    update();
    tensor<float, 4> out({1, 1, 1, 5});
    fast ? mem::armt_read(p.k, m, out, opt) : mem::reference::armt_read(p.k, m, out, opt);
    const double b = p.beta(0, 0, 0), eps = opt.eps;
    for (std::int64_t c = 0; c < 5; ++c) EXPECT_NEAR(out(0, 0, 0, c), b * p.v(0, 0, 0, c) / (1 + eps), 1e-5);
    const std::vector<float> z1(m.normalizer().data(), m.normalizer().data() + m.feature_dim());
    update();
    for (std::int64_t f = 0; f < m.feature_dim(); ++f) EXPECT_NEAR(m.normalizer().data()[f], z1[f], 1e-6);
    fast ? mem::armt_read(p.k, m, out, opt) : mem::reference::armt_read(p.k, m, out, opt);
    for (std::int64_t c = 0; c < 5; ++c) {  // A grew by beta phi^T (v - beta v / (1 + eps))
      const double want = (b + b * (1 - b / (1 + eps))) * p.v(0, 0, 0, c) / (1 + eps);
      EXPECT_NEAR(out(0, 0, 0, c), want, 1e-5);
    }
  }
}

TEST(armt, zero_key_contributes_nothing) {
  std::mt19937 rng(5);
  armt_problem p(1, 1, 2, 1, 4, 3, rng);
  for (std::int64_t c = 0; c < 4; ++c) p.k(0, 0, 1, c) = 0.0f;
  for (bool fast : {false, true})
    for (int rep = 0; rep < 2; ++rep) {
      mem::associative_memory m(1, 1, 4, 3);
      if (rep) m.set_segments(1);  // the corrected path too
      fast ? mem::armt_update(p.k, p.v, p.beta, m) : mem::reference::armt_update(p.k, p.v, p.beta, m);
      for (std::int64_t i = 0; i < m.matrix().size(); ++i) EXPECT_TRUE(std::isfinite(m.matrix().data()[i]));
      for (std::int64_t f = 0; f < m.feature_dim(); ++f) EXPECT_TRUE(std::isfinite(m.normalizer().data()[f]));
    }
}

TEST(armt, save_load_round_trip) {
  std::mt19937 rng(6);
  const armt_problem p(2, 2, 3, 1, 5, 4, rng);
  mem::associative_memory m(2, 2, 5, 4, 2);
  mem::armt_update(p.k, p.v, p.beta, m);
  mem::armt_update(p.k, p.v, p.beta, m);
  scratch_dir dir("armt");
  m.save(dir.file("layer0_"));
  const mem::associative_memory back = mem::associative_memory::load(dir.file("layer0_"));
  EXPECT_EQ(back.nu(), 2);
  EXPECT_EQ(back.key_dim(), 5);
  expect_same(back, m, 0, 0, "loaded");
  mem::detail::save_record(dir.file("layer0_config.npy"), {5, 3, 2});
  expect_error([&] { (void)mem::associative_memory::load(dir.file("layer0_")); }, {"A.npy", "30", "20"});
}

TEST(armt, bad_inputs) {
  std::mt19937 rng(7);
  const armt_problem p(1, 2, 3, 4, 5, 6, rng);
  mem::associative_memory m(1, 2, 5, 6);
  tensor<float, 4> out({1, 2, 4, 6}), q_bad({1, 2, 4, 4});
  tensor<float, 3> beta_bad({1, 2, 4});
  expect_error([&] { mem::armt_read(q_bad, m, out); }, {"q", "[1, 2, 4, 5]", "[1, 2, 4, 4]"});
  expect_error([&] { mem::armt_update(p.k, p.v, beta_bad, m); }, {"beta", "[1, 2, 3]", "[1, 2, 4]"});
  expect_error([&] { mem::reference::armt_update(p.k, q_bad, p.beta, m); }, {"v", "[1, 2, 3, 6]", "[1, 2, 4, 4]"});
  expect_error([&] { mem::armt_read(p.q, m, out, {.eps = 0.0f}); }, {"eps", "> 0", "0"});
  expect_error([&] { mem::armt_read(p.q, m, out, {.threads = -1}); }, {"threads", ">= 0", "-1"});
  expect_error([&] { mem::associative_memory(1, 1, 4, 3, 0); }, {"nu=0"});
  mem::associative_memory empty;
  expect_error([&] { mem::armt_read(p.q, empty, out); }, {"memory", "empty"});
}

}  // namespace
