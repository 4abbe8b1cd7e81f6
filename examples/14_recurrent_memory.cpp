// 14 — Recurrent memory: RMT's memory tokens and ARMT's associative memory.
//
// RMT (Bulatov, Kuratov & Burtsev, NeurIPS 2022): a long input is cut into segments; M memory
// tokens are prepended (read) and appended (write) to each segment, the block processes
// [mem; segment; mem], and the outputs at the write positions become the next segment's memory.
// ARMT (Rodkin et al. 2024): each layer also keeps an associative matrix A (with a normaliser z)
// written from its memory tokens by a delta rule, and read by every token of later segments:
//   o = phi(q) A / (z . phi(q) + eps),   A += beta phi(k)^T (v - phi(k) A / (z . phi(k) + eps)).
//
// Facts checked:
//   1. with a block that adds the mean of the segment to the write tokens and the read tokens to
//      the segment, the memory carries a running sum: after the last segment it equals the start
//      memory plus the sum of all segment means, and each segment's outputs are shifted by the
//      memory it read (a loop written here predicts every number);
//   2. ARMT: 6 segments x 4 memory tokens write 24 associations into one 96 x 16 matrix; reading
//      with the 24 keys recalls the values (mean cosine similarity > 0.6, where keys never written
//      give ~0; DPFP features are non-negative, so keys overlap and capacity is finite), the fast
//      path agrees with the double reference, and re-writing stored keys leaves z unchanged
//      (gamma = 0 for a key the memory already knows).
#include <mnemo/memory/recurrent_memory.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace mem = mnemo::memory;
using mnemo::tensor;
using mnemo::view;

int main() {
  bool ok = true;
  std::mt19937 rng(14);
  std::normal_distribution<float> normal;

  // 1. RMT with a running-sum block. M = 1 memory token, D = 3, segments of 5 over 23 tokens.
  const std::int64_t B = 1, L = 23, D = 3, M = 1, S = 5;
  tensor<float, 3> x({B, L, D}), memory({B, M, D}), y({B, L, D});
  for (float& e : x) e = normal(rng);
  for (float& e : memory) e = normal(rng);
  const std::vector<float> start(memory.begin(), memory.end());
  auto block = [&](view<const float, 3> in, view<float, 3> out) {
    const std::int64_t n = in.extent(1) - 2 * M;  // [read; segment; write]
    for (std::int64_t c = 0; c < D; ++c) {
      double mean = 0;
      for (std::int64_t t = 0; t < n; ++t) mean += in(0, M + t, c) / double(n);
      out(0, 0, c) = in(0, 0, c);
      for (std::int64_t t = 0; t < n; ++t) out(0, M + t, c) = in(0, M + t, c) + in(0, 0, c);
      out(0, M + n, c) = static_cast<float>(in(0, M + n, c) + mean);
    }
  };
  mem::rmt_forward(x, memory, block, y, {.segment_len = S});
  std::vector<double> carried(start.begin(), start.end());
  double err1 = 0;
  for (std::int64_t t0 = 0; t0 < L; t0 += S) {
    const std::int64_t n = std::min(S, L - t0);
    for (std::int64_t c = 0; c < D; ++c) {
      double mean = 0;
      for (std::int64_t t = 0; t < n; ++t) {
        err1 = std::max(err1, std::fabs(y(0, t0 + t, c) - (x(0, t0 + t, c) + carried[c])));
        mean += x(0, t0 + t, c) / double(n);
      }
      carried[c] += mean;
    }
  }
  for (std::int64_t c = 0; c < D; ++c) err1 = std::max(err1, std::fabs(memory(0, 0, c) - carried[c]));
  std::printf("1. RMT running sum over %ld segments: max error %.2e\n", long((L + S - 1) / S), err1);
  ok &= err1 < 1e-5;

  // 2. ARMT associative memory.
  const std::int64_t H = 1, Mt = 4, Dk = 16, Dv = 16, segments = 6;
  mem::associative_memory fast(1, H, Dk, Dv), ref(1, H, Dk, Dv);
  tensor<float, 4> keys({1, H, segments * Mt, Dk}), values({1, H, segments * Mt, Dv});
  for (float& e : keys) e = normal(rng);
  for (float& e : values) e = normal(rng);
  tensor<float, 3> beta({1, H, Mt});
  for (float& e : beta) e = 1.0f;
  for (std::int64_t s = 0; s < segments; ++s) {
    const auto k = mnemo::cview(keys).narrow(2, s * Mt, Mt), v = mnemo::cview(values).narrow(2, s * Mt, Mt);
    mem::armt_update(k, v, beta, fast);
    mem::reference::armt_update(k, v, beta, ref);
  }
  tensor<float, 4> read({1, H, segments * Mt, Dv}), read_ref({1, H, segments * Mt, Dv}), fresh = keys;
  for (float& e : fresh) e = normal(rng);  // keys that were never written
  auto mean_cosine = [&](const tensor<float, 4>& got) {
    double mean = 0;
    for (std::int64_t i = 0; i < segments * Mt; ++i) {
      double ab = 0, aa = 0, bb = 0;
      for (std::int64_t c = 0; c < Dv; ++c) {
        ab += double(got(0, 0, i, c)) * values(0, 0, i, c);
        aa += double(got(0, 0, i, c)) * got(0, 0, i, c);
        bb += double(values(0, 0, i, c)) * values(0, 0, i, c);
      }
      mean += ab / std::sqrt(aa * bb) / double(segments * Mt);
    }
    return mean;
  };
  mem::armt_read(keys, fast, read);
  mem::reference::armt_read(keys, ref, read_ref);
  double diff = 0;
  for (std::int64_t i = 0; i < read.size(); ++i) diff = std::max(diff, double(std::fabs(read.data()[i] - read_ref.data()[i])));
  const double stored_cos = mean_cosine(read);
  mem::armt_read(fresh, fast, read);
  const double fresh_cos = mean_cosine(read);
  std::printf("2. ARMT: %ld associations in A [%ld, %ld]: mean recall cosine %.3f (unwritten keys: %.3f); "
              "fast vs reference %.2e\n",
              long(segments * Mt), long(fast.feature_dim()), long(Dv), stored_cos, fresh_cos, diff);
  ok &= stored_cos > 0.6 && std::fabs(fresh_cos) < 0.3 && diff < 1e-4;
  const std::vector<float> z_before(fast.normalizer().data(), fast.normalizer().data() + fast.feature_dim());
  mem::armt_update(mnemo::cview(keys).narrow(2, 0, Mt), mnemo::cview(values).narrow(2, 0, Mt), beta, fast);
  double dz = 0;
  for (std::int64_t f = 0; f < fast.feature_dim(); ++f) dz = std::max(dz, double(std::fabs(fast.normalizer().data()[f] - z_before[f])));
  std::printf("   re-writing 4 stored keys changes z by at most %.2e (gamma = 0 for known keys)\n", dz);
  ok &= dz < 0.05;

  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
