// mnemo/kvcache/rotation.hpp — the randomized Hadamard rotation of the KV cache (QuaRot-style).
//
// Quantizing a vector with a few outlier channels wastes the levels of every group that holds
// one: the group's range is set by the outlier. An orthogonal rotation R spreads each outlier over
// many channels before quantization, and attention does not notice it:
//   scores     (R q) . (R k) = q . k                    (R^T R = I)
//   values     sum_j p_j (R v_j) = R out,  out = R^T (sum_j p_j R v_j)
// (QuaRot, Ashkboos et al. 2024; llama.cpp rotates its quantized KV cache the same way). The
// cache stores R k (and R v), the decode kernel rotates each query row once (O(D log D), beside
// the O(Lk D) of the attention) and rotates the output back; everything the cache hands out as
// f32 (gather, keys(), values()) is rotated back too, so policies and users see the original space.
//
// R is a randomized Walsh-Hadamard transform: a fixed random sign per channel, then the
// normalised Walsh-Hadamard matrix H_b / sqrt(b) on each block of b channels,
//   R = blockdiag(H_b / sqrt(b), ..., H_b / sqrt(b)) diag(s),   s_c in {-1, +1} from the seed,
//   H_1 = [1],  H_2b = [[H_b, H_b], [H_b, -H_b]]                 (Sylvester; H_b = H_b^T, H_b^2 = b I)
// with b the largest power of two dividing the head dim (D = 128: one block of 128; D = 96: three
// of 32; D = 48: three of 16; D = 72: nine of 8). A head dim whose power-of-two part is below
// hadamard_min_block is rejected: its blocks would spread an outlier over too few channels to
// help (an outlier's amplitude drops by sqrt(b)). The random signs keep a structured input (an
// outlier pattern that happens to match a Hadamard row) from staying concentrated after H.
//
// Numerics: both directions scale by 1 / sqrt(b) before the log2(b) butterfly stages
// (x_j, x_j+len) -> (x_j + x_j+len, x_j - x_j+len) (the forward transform folds the signs into
// that scaling; the inverse applies them after the stages), so every intermediate is a sum of at
// most b inputs / sqrt(b): inputs with |x| <= rotation_max_magnitude(limit, b) stay below limit, in either
// direction, even on dequantized rows (the cache's bound for rotated storage, see cache.hpp).
// A round trip R^T R x returns x to about log2(b) f32 roundings. Rotating keys in f32 storage
// therefore changes decode outputs only by float rounding; in quantized storage what changes is
// the rounding error of the codes.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/random.hpp"

namespace mnemo::kvcache {

// Which rotation a cache applies before storing keys and values.
enum class rotation { none, hadamard };

inline const char* rotation_name(rotation r) { return r == rotation::hadamard ? "hadamard" : "none"; }

// The smallest Hadamard block a head dim may have (its largest power-of-two divisor): every head
// dim in use (64, 80, 96, 112, 128, 256, also 40, 48, 72) is a multiple of 8.
inline constexpr std::int64_t hadamard_min_block = 8;

// The largest |x| a rotation with blocks of b takes when the result must stay below `limit`
// (see the header): limit / b.
constexpr float rotation_max_magnitude(float limit, std::int64_t b) { return limit / static_cast<float>(b); }

// The rotation options of a cache (kvcache::cache_config::rotate).
// KIVI's per-channel key groups already give each outlier channel its own range, and the extreme
// values of a channel (the keys that score highest on it) are stored exactly (they are the group's
// min and max); rotating the keys trades that for one step size across all channels. What the
// rotation removes is the score error sum_c q_c (rounding error of k_c), whose variance is
// sum_c q_c^2 step_c^2 / 12: large when the queries are large on the keys' outlier channels (as in
// trained models), about unchanged when they are independent of them. Measured (bench/kvcache_rows.cpp,
// kvcache_error rows: D = 128, 4 key channels at 20x with an offset, Lk = 4096, groups of 128), output
// rel_error unrotated -> rotated: queries 4x on those channels int8 0.021 -> 0.0096, int4 0.335 ->
// 0.157, int2 1.17 -> 0.82; independent queries int8 0.012 -> 0.013, int4 0.221 -> 0.216, int2 1.07
// -> 1.12. On all-MiniLM-L6-v2's Q, K, V (bench/real_attention, 6 layers, D = 32; its keys have no
// outlier channels: per-channel std 0.83 .. 1.22) rotation moved int4's output error by about 1%
// (0.0909 -> 0.0920 at groups of 128, 0.0654 -> 0.0651 at 32) and int2's by at most 3%. Values are
// quantized per token, where an outlier channel sets the step of its whole group; rotation
// removes that. Keys and values can be rotated separately.
struct rotation_options {
  rotation kind = rotation::none;
  bool keys = true;                         // rotate the keys (and the queries to match)
  bool values = true;                       // rotate the values (and the output back)
  std::uint64_t seed = 0x9e3779b97f4a7c15;  // of the sign diagonal
};

// The Hadamard block of a head dim n: its largest power-of-two divisor.
constexpr std::int64_t hadamard_block(std::int64_t n) { return n > 0 ? n & -n : 0; }

// R of one head dim (see the header). Default-constructed: the identity on nothing (dim() = 0).
class hadamard_rotation {
 public:
  hadamard_rotation() = default;

  // fn and what name the caller and the dimension in an error ("config.D").
  hadamard_rotation(std::int64_t n, std::uint64_t seed, const char* fn = "kvcache::hadamard_rotation",
                    const char* what = "n")
      : n_(n), b_(hadamard_block(n)) {
    detail::require(n >= 1 && b_ >= hadamard_min_block, fn, ": the Hadamard rotation needs ", what,
                    " to be a multiple of ", hadamard_min_block,
                    " (hadamard_min_block; the block is the largest power of two dividing it), got ", n);
    inv_sqrt_b_ = static_cast<float>(1.0 / std::sqrt(static_cast<double>(b_)));
    sign_.resize(static_cast<std::size_t>(n));
    std::uint64_t state = seed;
    for (std::int64_t c = 0; c < n; ++c) sign_[static_cast<std::size_t>(c)] = (rng::splitmix64(state) >> 63) ? -1.0f : 1.0f;
  }

  std::int64_t dim() const { return n_; }
  std::int64_t block() const { return b_; }
  // s_c of channel c (+1 or -1).
  float sign(std::int64_t c) const { return sign_[static_cast<std::size_t>(c)]; }

  // x <- R x, x [dim()].
  void forward(float* x) const {
    for (std::int64_t c = 0; c < n_; ++c) x[c] *= sign_[static_cast<std::size_t>(c)] * inv_sqrt_b_;
    for (std::int64_t c0 = 0; c0 < n_; c0 += b_) butterflies(x + c0);
  }
  // x <- R^T x = R^-1 x, x [dim()].
  void inverse(float* x) const {
    for (std::int64_t c = 0; c < n_; ++c) x[c] *= inv_sqrt_b_;
    for (std::int64_t c0 = 0; c0 < n_; c0 += b_) butterflies(x + c0);
    for (std::int64_t c = 0; c < n_; ++c) x[c] *= sign_[static_cast<std::size_t>(c)];
  }

 private:
  // x <- H_b x (unnormalised), in log2(b) stages of contiguous butterflies (the inner loop
  // vectorises for len >= the SIMD width).
  void butterflies(float* x) const {
    for (std::int64_t len = 1; len < b_; len *= 2)
      for (std::int64_t i = 0; i < b_; i += 2 * len)
        for (std::int64_t j = i; j < i + len; ++j) {
          const float a = x[j], c = x[j + len];
          x[j] = a + c;
          x[j + len] = a - c;
        }
  }

  std::int64_t n_ = 0, b_ = 0;
  float inv_sqrt_b_ = 0;     // 1 / sqrt(b)
  std::vector<float> sign_;  // s_c
};

namespace reference {

// R x in double, straight from the definition R[i][c] = s_c (-1)^popcount(i & c) / sqrt(b) inside
// a block (the entries of the Sylvester matrix), for the tests.
inline std::vector<double> rotate(const hadamard_rotation& r, const float* x) {
  const std::int64_t n = r.dim(), b = r.block();
  std::vector<double> y(static_cast<std::size_t>(n), 0.0);
  for (std::int64_t c0 = 0; c0 < n; c0 += b)
    for (std::int64_t i = 0; i < b; ++i) {
      double s = 0;
      for (std::int64_t c = 0; c < b; ++c) {
        const int parity = __builtin_popcountll(static_cast<unsigned long long>(i & c)) & 1;
        s += (parity ? -1.0 : 1.0) * static_cast<double>(r.sign(c0 + c)) * x[c0 + c];
      }
      y[static_cast<std::size_t>(c0 + i)] = s / std::sqrt(static_cast<double>(b));
    }
  return y;
}

}  // namespace reference

}  // namespace mnemo::kvcache
