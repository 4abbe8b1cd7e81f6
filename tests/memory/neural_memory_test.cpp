// Tests of memory/neural_memory.hpp: the hand-derived gradient against finite differences, the
// fast chunked path against the double reference on awkward shapes (depth 1-4, SiLU/GELU,
// residual or not, chunks that divide L or not, Omega windows), the golden titans_* cases,
// pieces, threads, save/load and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "memory/test_util.hpp"
#include "mnemo/memory/neural_memory.hpp"

namespace {

using namespace memory_test;
namespace mem = mnemo::memory;

// A random problem: weights ~ U(-w, w), small momenta, inputs in [-1, 1], gates in their ranges.
struct titans_problem {
  std::int64_t B, L, D;
  tensor<float, 3> q, k, v;
  tensor<float, 2> theta, eta, alpha;
  mem::neural_memory_state state;

  titans_problem(std::int64_t B_, std::int64_t L_, const mem::mlp_shape& s, std::int64_t omega, std::uint32_t seed)
      : B(B_), L(L_), D(s.dim), state(B_, s, omega) {
    std::mt19937 rng(seed);
    q = random_tensor<3>({B, L, D}, rng);
    k = random_tensor<3>({B, L, D}, rng);
    v = random_tensor<3>({B, L, D}, rng);
    theta = random_tensor<2>({B, L}, rng, 0.0f, 0.05f);
    eta = random_tensor<2>({B, L}, rng, 0.5f, 0.95f);
    alpha = random_tensor<2>({B, L}, rng, 0.0f, 0.1f);
    const float w = 1.0f / std::sqrt(static_cast<float>(std::max(s.dim, s.hidden)));
    for (int l = 0; l < s.depth; ++l) {
      auto W = random_tensor<3>({B, s.in(l), s.out(l)}, rng, -w, w);
      auto S = random_tensor<3>({B, s.in(l), s.out(l)}, rng, -0.01f, 0.01f);
      std::copy(W.begin(), W.end(), state.weight(l).data());
      std::copy(S.begin(), S.end(), state.momentum(l).data());
    }
  }
};

void expect_same_state(const mem::neural_memory_state& got, const mem::neural_memory_state& want, double atol,
                       double rtol, const std::string& what) {
  for (int l = 0; l < want.depth(); ++l) {
    tensor<float, 3> gw({want.batch(), want.shape().in(l), want.shape().out(l)}), ww = gw, gs = gw, ws = gw;
    std::copy(got.weight(l).data(), got.weight(l).data() + gw.size(), gw.data());
    std::copy(want.weight(l).data(), want.weight(l).data() + gw.size(), ww.data());
    std::copy(got.momentum(l).data(), got.momentum(l).data() + gw.size(), gs.data());
    std::copy(want.momentum(l).data(), want.momentum(l).data() + gw.size(), ws.data());
    expect_close(gw, ww, atol, rtol, what + ": W" + std::to_string(l));
    expect_close(gs, ws, atol, rtol, what + ": S" + std::to_string(l));
  }
}

// ---- gradient ----

TEST(neural_memory, gradient_matches_finite_differences) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int depth = 1; depth <= mem::mlp_shape::max_depth; ++depth)
    for (mem::activation act : {mem::activation::silu, mem::activation::gelu})
      for (bool residual : {true, false}) {
        const mem::mlp_shape s{5, 7, depth, act, residual};
        mem::reference::mlp m(s), g(s);
        for (auto& w : m.w)
          for (double& x : w) x = 0.6 * u(rng);
        std::vector<double> k(5), v(5);
        for (double& x : k) x = u(rng);
        for (double& x : v) x = u(rng);
        mem::reference::add_loss_gradient(m, k.data(), v.data(), g);
        const double h = 1e-5;
        double worst = 0;
        for (int l = 0; l < depth; ++l)
          for (std::size_t i = 0; i < m.w[l].size(); ++i) {
            mem::reference::mlp plus = m, minus = m, unused(s);
            plus.w[l][i] += h;
            minus.w[l][i] -= h;
            const double fd = (mem::reference::add_loss_gradient(plus, k.data(), v.data(), unused) -
                               mem::reference::add_loss_gradient(minus, k.data(), v.data(), unused)) /
                              (2 * h);
            // Central differences in double: truncation ~h^2 |f'''| ~ 1e-10, rounding ~1e-11.
            worst = std::max(worst, std::abs(fd - g.w[l][i]) / (1e-8 + 1e-6 * std::abs(fd)));
          }
        EXPECT_LE(worst, 1.0) << "depth " << depth << " " << mem::activation_name(act) << " residual " << residual;
      }
}

TEST(neural_memory, loss_is_sum_of_squares_of_the_error) {
  // Depth 1 without residual is the linear memory M(x) = x W: the loss and gradient by hand.
  const mem::mlp_shape s{3, 0, 1, mem::activation::silu, false};
  mem::reference::mlp m(s), g(s);
  for (std::size_t i = 0; i < m.w[0].size(); ++i) m.w[0][i] = 0.1 * static_cast<double>(i) - 0.3;
  const double k[3] = {1.0, -2.0, 0.5}, v[3] = {0.25, 1.0, -1.0};
  double e[3] = {}, loss = 0;
  for (int j = 0; j < 3; ++j) {
    for (int i = 0; i < 3; ++i) e[j] += k[i] * m.w[0][i * 3 + j];
    e[j] -= v[j];
    loss += e[j] * e[j];
  }
  EXPECT_NEAR(mem::reference::add_loss_gradient(m, k, v, g), loss, 1e-12);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_NEAR(g.w[0][i * 3 + j], 2 * k[i] * e[j], 1e-12);
}

// ---- fast path against the reference ----

struct config {
  std::int64_t B, L, D, Hd;
  int depth;
  mem::activation act;
  bool residual;
  std::int64_t chunk, omega;
};

void check_fast(const config& c, std::uint32_t seed) {
  const mem::mlp_shape s{c.D, c.Hd, c.depth, c.act, c.residual};
  titans_problem ref(c.B, c.L, s, c.omega, seed), fast(c.B, c.L, s, c.omega, seed);
  tensor<float, 3> y_ref({c.B, c.L, c.D}), y_fast({c.B, c.L, c.D});
  const mem::neural_memory_options opt{.chunk_size = c.chunk};
  mem::reference::neural_memory(ref.q, ref.k, ref.v, ref.theta, ref.eta, ref.alpha, ref.state, y_ref, opt);
  mem::neural_memory(fast.q, fast.k, fast.v, fast.theta, fast.eta, fast.alpha, fast.state, y_fast, opt);
  const std::string what = "B=" + std::to_string(c.B) + " L=" + std::to_string(c.L) + " D=" + std::to_string(c.D) +
                           " Hd=" + std::to_string(c.Hd) + " depth=" + std::to_string(c.depth) + " " +
                           mem::activation_name(c.act) + " residual=" + std::to_string(c.residual) +
                           " chunk=" + std::to_string(c.chunk) + " omega=" + std::to_string(c.omega);
  expect_close(y_fast, y_ref, 1e-4, 1e-3, what + ": y");
  expect_same_state(fast.state, ref.state, 1e-5, 1e-3, what);
  EXPECT_EQ(fast.state.history_len(), ref.state.history_len());
}

TEST(neural_memory, fast_matches_reference_depth_and_activation) {
  std::uint32_t seed = 10;
  for (int depth = 1; depth <= 4; ++depth)
    for (mem::activation act : {mem::activation::silu, mem::activation::gelu})
      check_fast({2, 13, 12, 20, depth, act, depth % 2 == 0, 4, 1}, ++seed);
}

TEST(neural_memory, fast_matches_reference_awkward_shapes) {
  std::uint32_t seed = 100;
  const mem::activation silu = mem::activation::silu;
  for (const config& c : std::vector<config>{
           {1, 1, 16, 32, 2, silu, true, 1, 1},     // one token
           {1, 37, 20, 40, 2, silu, true, 16, 1},   // partial last chunk
           {1, 37, 20, 40, 2, silu, true, 37, 1},   // one chunk = L
           {1, 37, 20, 40, 2, silu, true, 64, 1},   // chunk > L
           {2, 30, 40, 96, 2, silu, true, 8, 1},    // D = 40, Hd = 96
           {1, 25, 7, 5, 3, silu, false, 1, 1},     // per token, hidden < D
           {1, 29, 9, 11, 2, silu, true, 1, 4},     // Omega per token
           {2, 29, 9, 11, 2, silu, true, 6, 3},     // Omega chunked, window < chunk
           {1, 23, 8, 8, 2, silu, true, 3, 7},      // Omega window > chunk
       })
    check_fast(c, ++seed);
}

TEST(neural_memory, read_matches_reference) {
  const mem::mlp_shape s{12, 24, 3, mem::activation::gelu, true};
  titans_problem p(2, 9, s, 1, 7);
  tensor<float, 3> y_ref({2, 9, 12}), y_fast({2, 9, 12});
  mem::reference::neural_memory_read(p.q, p.state, y_ref);
  mem::neural_memory_read(p.q, p.state, y_fast);
  expect_close(y_fast, y_ref, 1e-5, 1e-4, "read");
}

TEST(neural_memory, read_comes_after_the_update) {
  // y_t of the update call equals a plain read of q_t with the weights after token t: run one
  // token at a time and read with the state in between.
  const mem::mlp_shape s{6, 10, 2, mem::activation::silu, true};
  titans_problem whole(1, 5, s, 1, 3), steps(1, 5, s, 1, 3);
  tensor<float, 3> y({1, 5, 6});
  mem::neural_memory(whole.q, whole.k, whole.v, whole.theta, whole.eta, whole.alpha, whole.state, y);
  for (std::int64_t t = 0; t < 5; ++t) {
    auto sl3 = [&](tensor<float, 3>& x) { return view<const float, 3>(x.as_view().narrow(1, t, 1)); };
    auto sl2 = [&](tensor<float, 2>& x) { return view<const float, 2>(x.as_view().narrow(1, t, 1)); };
    tensor<float, 3> yt({1, 1, 6}), rt({1, 1, 6});
    mem::neural_memory(sl3(steps.q), sl3(steps.k), sl3(steps.v), sl2(steps.theta), sl2(steps.eta), sl2(steps.alpha),
                       steps.state, yt);
    mem::neural_memory_read(sl3(steps.q), steps.state, rt);
    for (std::int64_t j = 0; j < 6; ++j) {
      EXPECT_NEAR(yt(0, 0, j), y(0, t, j), 1e-5);
      EXPECT_NEAR(rt(0, 0, j), y(0, t, j), 1e-5);
    }
  }
}

TEST(neural_memory, pieces_equal_one_call) {
  // Splitting at a chunk boundary continues exactly: momentum, weights and the Omega history.
  const mem::mlp_shape s{8, 16, 2, mem::activation::silu, true};
  for (auto use_fast : {false, true}) {
    titans_problem one(2, 24, s, 3, 5), two(2, 24, s, 3, 5);
    tensor<float, 3> y1({2, 24, 8}), y2({2, 24, 8});
    const mem::neural_memory_options opt{.chunk_size = 4};
    auto run = [&](titans_problem& p, std::int64_t t0, std::int64_t n, tensor<float, 3>& y) {
      auto s3 = [&](tensor<float, 3>& x) { return x.as_view().narrow(1, t0, n); };
      auto s2 = [&](tensor<float, 2>& x) { return view<const float, 2>(x.as_view().narrow(1, t0, n)); };
      const view<const float, 3> q = s3(p.q), k = s3(p.k), v = s3(p.v);
      if (use_fast) mem::neural_memory(q, k, v, s2(p.theta), s2(p.eta), s2(p.alpha), p.state, s3(y), opt);
      else mem::reference::neural_memory(q, k, v, s2(p.theta), s2(p.eta), s2(p.alpha), p.state, s3(y), opt);
    };
    run(one, 0, 24, y1);
    run(two, 0, 8, y2);
    run(two, 8, 4, y2);
    run(two, 12, 12, y2);
    expect_close(y2, y1, 1e-5, 1e-4, use_fast ? "fast pieces" : "reference pieces");
    expect_same_state(two.state, one.state, 1e-6, 1e-5, "pieces");
  }
}

TEST(neural_memory, threads_do_not_change_results) {
  const mem::mlp_shape s{10, 14, 2, mem::activation::silu, true};
  titans_problem a(3, 17, s, 2, 9), b(3, 17, s, 2, 9);
  tensor<float, 3> ya({3, 17, 10}), yb({3, 17, 10});
  mem::neural_memory(a.q, a.k, a.v, a.theta, a.eta, a.alpha, a.state, ya, {.chunk_size = 5, .threads = 1});
  mem::neural_memory(b.q, b.k, b.v, b.theta, b.eta, b.alpha, b.state, yb, {.chunk_size = 5, .threads = 2});
  expect_close(yb, ya, 0, 0, "threads");
}

TEST(neural_memory, zero_gates_freeze_or_clear) {
  // theta = 0, eta = 0, alpha = 0: S becomes 0 and W stays; alpha = 1: W becomes S.
  const mem::mlp_shape s{4, 6, 2, mem::activation::silu, true};
  titans_problem p(1, 3, s, 1, 2);
  const mem::neural_memory_state before = p.state;
  std::fill(p.theta.begin(), p.theta.end(), 0.0f);
  std::fill(p.eta.begin(), p.eta.end(), 0.0f);
  std::fill(p.alpha.begin(), p.alpha.end(), 0.0f);
  tensor<float, 3> y({1, 3, 4});
  mem::neural_memory(p.q, p.k, p.v, p.theta, p.eta, p.alpha, p.state, y, {.chunk_size = 2});
  for (int l = 0; l < 2; ++l)
    for (std::int64_t i = 0; i < p.state.weight(l).size(); ++i) {
      EXPECT_EQ(p.state.weight(l).data()[i], before.weight(l).data()[i]);
      EXPECT_EQ(p.state.momentum(l).data()[i], 0.0f);
    }
  std::fill(p.alpha.begin(), p.alpha.end(), 1.0f);
  mem::neural_memory(p.q, p.k, p.v, p.theta, p.eta, p.alpha, p.state, y);
  for (int l = 0; l < 2; ++l)
    for (std::int64_t i = 0; i < p.state.weight(l).size(); ++i) EXPECT_EQ(p.state.weight(l).data()[i], 0.0f);
}

// ---- golden ----

TEST(neural_memory, golden) { check_golden("titans_memory"); }

// ---- state ----

TEST(neural_memory, save_load_round_trip) {
  const mem::mlp_shape s{6, 9, 3, mem::activation::gelu, false};
  titans_problem p(2, 11, s, 4, 21), q(2, 11, s, 4, 21);
  tensor<float, 3> y({2, 11, 6});
  mem::neural_memory(p.q, p.k, p.v, p.theta, p.eta, p.alpha, p.state, y, {.chunk_size = 3});
  scratch_dir dir("titans");
  p.state.save(dir.file("mem_"));
  mem::neural_memory_state loaded = mem::neural_memory_state::load(dir.file("mem_"));
  EXPECT_EQ(loaded.batch(), 2);
  EXPECT_EQ(loaded.shape().dim, 6);
  EXPECT_EQ(loaded.shape().hidden, 9);
  EXPECT_EQ(loaded.depth(), 3);
  EXPECT_EQ(loaded.shape().act, mem::activation::gelu);
  EXPECT_FALSE(loaded.shape().residual);
  EXPECT_EQ(loaded.omega_window(), 4);
  EXPECT_EQ(loaded.history_len(), 3);
  expect_same_state(loaded, p.state, 0, 0, "loaded");
  // Continuing from the loaded state is continuing from the original.
  tensor<float, 3> y1({2, 11, 6}), y2({2, 11, 6});
  mem::neural_memory(q.q, q.k, q.v, q.theta, q.eta, q.alpha, p.state, y1, {.chunk_size = 3});
  mem::neural_memory(q.q, q.k, q.v, q.theta, q.eta, q.alpha, loaded, y2, {.chunk_size = 3});
  expect_close(y2, y1, 0, 0, "continued");
}

TEST(neural_memory, load_rejects_bad_files) {
  scratch_dir dir("titans_bad");
  expect_error([&] { (void)mem::neural_memory_state::load(dir.file("missing_")); }, {"cannot open", "config"});
  const mem::mlp_shape s{4, 5, 2, mem::activation::silu, true};
  mem::neural_memory_state st(1, s);
  st.save(dir.file("a_"));
  mnemo::npy::save(dir.file("a_W1.npy"), tensor<float, 3>({1, 4, 4}));
  expect_error([&] { (void)mem::neural_memory_state::load(dir.file("a_")); }, {"W1", "[1, 5, 4]", "[1, 4, 4]"});
}

// ---- bad input ----

TEST(neural_memory, bad_inputs) {
  const mem::mlp_shape s{4, 5, 2, mem::activation::silu, true};
  titans_problem p(2, 3, s, 1, 4);
  tensor<float, 3> y({2, 3, 4}), y_bad({2, 3, 5}), q_bad({1, 3, 4});
  tensor<float, 2> g_bad({2, 2});
  auto call = [&](auto&&... args) { mem::neural_memory(args...); };
  expect_error([&] { call(q_bad, p.k, p.v, p.theta, p.eta, p.alpha, p.state, y); }, {"q", "[2, 3, 4]", "[1, 3, 4]"});
  expect_error([&] { call(p.q, p.k, p.v, p.theta, p.eta, p.alpha, p.state, y_bad); }, {"y", "[2, 3, 4]", "[2, 3, 5]"});
  expect_error([&] { call(p.q, p.k, p.v, g_bad, p.eta, p.alpha, p.state, y); }, {"theta", "[2, 3]", "[2, 2]"});
  expect_error([&] { call(p.q, p.k, p.v, p.theta, g_bad, p.alpha, p.state, y); }, {"eta", "[2, 3]", "[2, 2]"});
  expect_error([&] { call(p.q, p.k, p.v, p.theta, p.eta, g_bad, p.state, y); }, {"alpha", "[2, 3]", "[2, 2]"});
  expect_error([&] { mem::neural_memory(p.q, p.k, p.v, p.theta, p.eta, p.alpha, p.state, y, {.chunk_size = 0}); },
               {"chunk_size", ">= 1", "0"});
  expect_error([&] { mem::neural_memory(p.q, p.k, p.v, p.theta, p.eta, p.alpha, p.state, y, {.threads = -1}); },
               {"threads", ">= 0", "-1"});
  p.eta(1, 2) = 1.5f;
  expect_error([&] { call(p.q, p.k, p.v, p.theta, p.eta, p.alpha, p.state, y); }, {"eta[1, 2]", "[0, 1]", "1.5"});
  p.eta(1, 2) = 0.5f;
  p.alpha(0, 1) = -0.25f;
  expect_error([&] { mem::reference::neural_memory(p.q, p.k, p.v, p.theta, p.eta, p.alpha, p.state, y); },
               {"alpha[0, 1]", "[0, 1]", "-0.25"});
  p.alpha(0, 1) = 0.f;
  p.theta(0, 0) = -1.0f;
  expect_error([&] { call(p.q, p.k, p.v, p.theta, p.eta, p.alpha, p.state, y); }, {"theta[0, 0]", ">= 0", "-1"});
  mem::neural_memory_state empty;
  expect_error([&] { call(p.q, p.k, p.v, p.theta, p.eta, p.alpha, empty, y); }, {"state", "empty"});
  expect_error([&] { mem::neural_memory_read(q_bad, p.state, y); }, {"x", "[2, 3, 4]", "[1, 3, 4]"});
  expect_error([&] { mem::neural_memory_state(1, {4, 5, 5}); }, {"depth", "[1, 4]", "5"});
  expect_error([&] { mem::neural_memory_state(1, {0, 5, 2}); }, {"dim", ">= 1", "0"});
  expect_error([&] { mem::neural_memory_state(1, {4, 0, 2}); }, {"hidden", ">= 1", "0"});
  expect_error([&] { mem::neural_memory_state(0, {4, 5, 2}); }, {"B", ">= 1", "0"});
  expect_error([&] { mem::neural_memory_state(1, {4, 5, 2}, 0); }, {"omega_window", ">= 1", "0"});
}

}  // namespace
