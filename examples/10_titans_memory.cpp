// 10 — Titans neural memory: an MLP that learns key -> value associations at test time.
//
// Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time" (2024). The memory is
// M(x) = x + silu(x W1) W2. Each token (k_t, v_t) is a gradient step on ||M(k_t) - v_t||^2 with
// momentum ("surprise") and forgetting:
//   S_t = eta_t S_{t-1} - theta_t grad,   W_t = (1 - alpha_t) W_{t-1} + S_t,   y_t = M_{W_t}(q_t).
//
// The program streams 8 associations v = tanh(k R), each shown 12 times, and checks facts that
// follow from the equations, not from the code:
//   1. the memory learns: the recall error of the 8 pairs drops by more than 10x;
//   2. the chunked update (gradients of a chunk at its start weights, Titans sec. 3.2) and the
//      per-token update both learn, and the fast f32 path agrees with the double reference;
//   3. the state is explicit: saved, loaded and continued, it gives the same answers;
//   4. ATLAS's Omega rule (loss over the last c tokens) runs on the same state type.
#include <mnemo/memory/neural_memory.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace mem = mnemo::memory;
using mnemo::tensor;

namespace {

constexpr std::int64_t D = 16, Hd = 32, pairs = 8, repeats = 12, L = pairs * repeats;

struct stream {
  tensor<float, 3> k{{1, L, D}}, v{{1, L, D}};
  tensor<float, 2> theta{{1, L}}, eta{{1, L}}, alpha{{1, L}};
  tensor<float, 3> keys{{1, pairs, D}}, values{{1, pairs, D}};
};

stream make_stream() {
  stream s;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  std::vector<float> R(D * D);
  for (float& x : R) x = normal(rng) / std::sqrt(float(D));
  for (std::int64_t p = 0; p < pairs; ++p) {
    double norm = 0;
    for (std::int64_t c = 0; c < D; ++c) norm += std::pow(s.keys(0, p, c) = normal(rng), 2);
    for (std::int64_t c = 0; c < D; ++c) s.keys(0, p, c) /= static_cast<float>(std::sqrt(norm));  // unit keys
    for (std::int64_t c = 0; c < D; ++c) {
      double x = 0;
      for (std::int64_t i = 0; i < D; ++i) x += s.keys(0, p, i) * R[i * D + c];
      s.values(0, p, c) = static_cast<float>(std::tanh(2 * x));
    }
  }
  for (std::int64_t t = 0; t < L; ++t) {
    for (std::int64_t c = 0; c < D; ++c) {
      s.k(0, t, c) = s.keys(0, t % pairs, c);
      s.v(0, t, c) = s.values(0, t % pairs, c);
    }
    s.theta(0, t) = 0.1f;  // learning rate
    s.eta(0, t) = 0.6f;    // momentum
    s.alpha(0, t) = 0.0f;  // no forgetting: everything here is worth keeping
  }
  return s;
}

mem::neural_memory_state fresh_memory(std::int64_t omega = 1) {
  mem::neural_memory_state st(1, {D, Hd, 2, mem::activation::silu, true}, omega);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  for (int l = 0; l < 2; ++l)
    for (std::int64_t i = 0; i < st.weight(l).size(); ++i) st.weight(l).data()[i] = normal(rng);
  return st;
}

// Mean over the pairs of ||M(k) - v||^2.
double recall_error(const mem::neural_memory_state& st, const stream& s) {
  tensor<float, 3> y({1, pairs, D});
  mem::neural_memory_read(s.keys, st, y);
  double e = 0;
  for (std::int64_t i = 0; i < y.size(); ++i) e += std::pow(y.data()[i] - s.values.data()[i], 2);
  return e / pairs;
}

}  // namespace

int main() {
  const stream s = make_stream();
  tensor<float, 3> y({1, L, D}), y_ref({1, L, D});
  bool ok = true;

  // 1. Per-token learning (q = k: each token reads its own association after the update).
  mem::neural_memory_state per_token = fresh_memory();
  const double before = recall_error(per_token, s);
  mem::neural_memory(s.k, s.k, s.v, s.theta, s.eta, s.alpha, per_token, y);
  const double after = recall_error(per_token, s);
  std::printf("1. per-token: recall error %.3g -> %.3g\n", before, after);
  ok &= after < before / 10;

  // 2. Chunks of 8 tokens (one pass over the 8 pairs per chunk); fast path against the reference.
  mem::neural_memory_state chunked = fresh_memory(), chunked_ref = fresh_memory();
  mem::neural_memory(s.k, s.k, s.v, s.theta, s.eta, s.alpha, chunked, y, {.chunk_size = pairs});
  mem::reference::neural_memory(s.k, s.k, s.v, s.theta, s.eta, s.alpha, chunked_ref, y_ref, {.chunk_size = pairs});
  double diff = 0;
  for (std::int64_t i = 0; i < y.size(); ++i) diff = std::max(diff, double(std::fabs(y.data()[i] - y_ref.data()[i])));
  const double chunk_error = recall_error(chunked, s);
  std::printf("2. chunk of 8: recall error %.3g -> %.3g; max |fast - reference| over y = %.2e\n", before, chunk_error,
              diff);
  ok &= chunk_error < before / 10 && diff < 1e-4;

  // 3. Save, load, continue: the same outputs as continuing the original.
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "mnemo_example_10";
  std::filesystem::create_directories(dir);
  const std::string prefix = (dir / "titans_").string();
  per_token.save(prefix);
  mem::neural_memory_state loaded = mem::neural_memory_state::load(prefix);
  tensor<float, 3> y1({1, L, D}), y2({1, L, D});
  mem::neural_memory(s.k, s.k, s.v, s.theta, s.eta, s.alpha, per_token, y1);
  mem::neural_memory(s.k, s.k, s.v, s.theta, s.eta, s.alpha, loaded, y2);
  bool same = true;
  for (std::int64_t i = 0; i < y1.size(); ++i) same &= y1.data()[i] == y2.data()[i];
  std::filesystem::remove_all(dir);
  std::printf("3. saved to %s*.npy, loaded, continued: %s\n", prefix.c_str(), same ? "identical" : "DIFFERENT");
  ok &= same;

  // 4. Omega rule over the last 4 tokens (ATLAS): each step fits a window of associations.
  mem::neural_memory_state omega = fresh_memory(4);
  mem::neural_memory(s.k, s.k, s.v, s.theta, s.eta, s.alpha, omega, y);
  const double omega_error = recall_error(omega, s);
  std::printf("4. Omega window 4: recall error %.3g -> %.3g\n", before, omega_error);
  ok &= omega_error < before / 10;

  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
