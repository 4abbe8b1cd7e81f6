// mnemo/core/random.hpp — the library's one seeded random source: SplitMix64 (Steele, Lea, Flood
// 2014, "Fast splittable pseudorandom number generators"). std:: distributions are implementation-
// defined, so every seeded draw of mnemo (BigBird's random blocks, the rotation's signs, the
// approximations' features, centroids and samples) comes from here and is the same on every
// platform, standard library and thread count.
//
//   splitmix64(state)        the next output of the sequential generator (state advances by the
//                            golden gamma 0x9e3779b97f4a7c15, then the output is scrambled)
//   mix(x)                   the output for state x: splitmix64 of a copy, a stateless hash
//   counter_stream(seed, id) draw n of stream (seed, id) is mix(mix(seed ^ mix(id)) + n): streams
//                            per work item, independent of the order the items run in
//   gaussian_stream(seed)    N(0, 1) by Box-Muller on the sequential generator, pairs cached
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

namespace mnemo::rng {

inline constexpr std::uint64_t golden_gamma = 0x9e3779b97f4a7c15ull;

inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += golden_gamma);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline std::uint64_t mix(std::uint64_t x) { return splitmix64(x); }

// 53 random bits as a double in [0, 1).
inline double to_unit(std::uint64_t bits) { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

class counter_stream {
 public:
  counter_stream(std::uint64_t seed, std::uint64_t id) : base_(mix(seed ^ mix(id))) {}
  std::uint64_t next() { return mix(base_ + counter_++); }
  double uniform() { return to_unit(next()); }  // [0, 1)
  std::int64_t below(std::int64_t n) {          // [0, n), n >= 1 (bias below 2^-53 n)
    return std::min(n - 1, static_cast<std::int64_t>(uniform() * static_cast<double>(n)));
  }
  double normal() {  // Box-Muller, one of the pair
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }

 private:
  std::uint64_t base_, counter_ = 0;
};

class gaussian_stream {
 public:
  explicit gaussian_stream(std::uint64_t seed) : state_(seed ^ 0x6a09e667f3bcc909ull) {}

  double next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    // Uniforms in (0, 1]: 53 random bits plus one half-step, so log never sees 0.
    const double u1 = to_unit(splitmix64(state_)) + 0x1.0p-54;
    const double u2 = to_unit(splitmix64(state_)) + 0x1.0p-54;
    const double r = std::sqrt(-2.0 * std::log(u1)), t = 2.0 * std::numbers::pi * u2;
    spare_ = r * std::sin(t);
    has_spare_ = true;
    return r * std::cos(t);
  }

 private:
  std::uint64_t state_;
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace mnemo::rng
