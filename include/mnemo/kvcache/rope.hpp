// mnemo/kvcache/rope.hpp — rotary position embeddings (RoPE) and re-rotation of cached keys.
//
// RoPE (Su et al. 2021, "RoFormer") rotates pairs of channels of a query or key at position p by
// angles p * theta_i, theta_i = base^(-2 i / dim), i in [0, dim / 2):
//   (x_a, x_b) -> (x_a cos(p theta_i) - x_b sin(p theta_i),  x_b cos(p theta_i) + x_a sin(p theta_i))
// Which channels pair up is the layout:
//   interleaved  (a, b) = (2i, 2i + 1)            (the paper, GPT-J, Meta's original Llama)
//   half_split   (a, b) = (i, i + dim / 2)        (GPT-NeoX, Hugging Face Llama / Mistral / Qwen)
// Only the first `dim` channels rotate (partial rotary, e.g. GPT-NeoX's rotary_pct); the rest pass.
//
// Since the rotations of one pair compose, R(p') = R(p' - p) R(p): a key cached at rotary position p
// moves to p' by one more rotation of p' - p. After compaction a policy may want kept keys at their
// compacted positions (StreamingLLM, Xiao et al. 2023, "positions within the cache"): rerotate does
// that, and records the new rotary positions in the cache (layer_cache::rotary_positions; the
// original positions stay as they were). For int8 / int4 storage the quantized keys are dequantized,
// rotated and quantized again per group (adding at most half a step of the new group's scale).
//
// Numerics: angles in double (positions of millions of tokens keep their fraction), cos / sin in
// double rounded to f32, the rotation itself in f32. The reference does everything in double.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/simd/arch.hpp"

namespace mnemo::kvcache {

enum class rope_layout { interleaved, half_split };

struct rope {
  std::int64_t dim = 0;  // rotated channels (even); 0: all of D
  double base = 10000.0;
  rope_layout layout = rope_layout::half_split;
};

namespace rope_detail {

// Validated rotary dim for head dim D.
inline std::int64_t rotary_dim(const char* fn, const rope& r, std::int64_t D) {
  const std::int64_t dim = r.dim == 0 ? D : r.dim;
  detail::require(dim >= 2 && dim <= D && dim % 2 == 0, fn, ": rope.dim must be even and in [2, D = ", D, "], got ",
                  dim);
  detail::require(std::isfinite(r.base) && r.base > 0, fn, ": rope.base must be finite and > 0, got ", r.base);
  return dim;
}

// Channels (a, b) of pair i.
inline std::int64_t first(rope_layout l, std::int64_t /*dim*/, std::int64_t i) { return l == rope_layout::interleaved ? 2 * i : i; }
inline std::int64_t second(rope_layout l, std::int64_t dim, std::int64_t i) {
  return l == rope_layout::interleaved ? 2 * i + 1 : i + dim / 2;
}

inline double theta(const rope& r, std::int64_t dim, std::int64_t i) {
  return std::pow(r.base, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
}

// cos / sin of angle p theta_i for i in [0, dim / 2), in f32.
inline void angles(const rope& r, std::int64_t dim, double p, float* cs, float* sn) {
  for (std::int64_t i = 0; i < dim / 2; ++i) {
    const double a = p * theta(r, dim, i);
    cs[i] = static_cast<float>(std::cos(a));
    sn[i] = static_cast<float>(std::sin(a));
  }
}

// Rotates x [D] by the angles (f32): the loops are contiguous in both layouts' pair index, so the
// compiler vectorises the half-split one; interleaved pairs are adjacent and stay scalar. (A
// template on Arch like every vectorised function, so TUs built for different ISAs keep their own.)
template <class Arch>
void rotate(rope_layout l, std::int64_t dim, const float* cs, const float* sn, float* x) {
  const std::int64_t half = dim / 2;
  if (l == rope_layout::half_split) {
    float* xa = x;
    float* xb = x + half;
    for (std::int64_t i = 0; i < half; ++i) {
      const float a = xa[i], b = xb[i];
      xa[i] = a * cs[i] - b * sn[i];
      xb[i] = b * cs[i] + a * sn[i];
    }
  } else {
    for (std::int64_t i = 0; i < half; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1];
      x[2 * i] = a * cs[i] - b * sn[i];
      x[2 * i + 1] = b * cs[i] + a * sn[i];
    }
  }
}

}  // namespace rope_detail

namespace reference {

// x [H, L, D] in place: row (h, t) rotated to positions[t], in double.
inline void apply_rope(const rope& r, view<float, 3> x, std::span<const std::int64_t> positions) {
  const std::int64_t D = x.extent(2), dim = rope_detail::rotary_dim("kvcache::reference::apply_rope", r, D);
  for (std::int64_t h = 0; h < x.extent(0); ++h)
    for (std::int64_t t = 0; t < x.extent(1); ++t)
      for (std::int64_t i = 0; i < dim / 2; ++i) {
        const double ang = static_cast<double>(positions[static_cast<std::size_t>(t)]) * rope_detail::theta(r, dim, i);
        float& xa = x(h, t, rope_detail::first(r.layout, dim, i));
        float& xb = x(h, t, rope_detail::second(r.layout, dim, i));
        const double a = xa, b = xb;
        xa = static_cast<float>(a * std::cos(ang) - b * std::sin(ang));
        xb = static_cast<float>(b * std::cos(ang) + a * std::sin(ang));
      }
}

}  // namespace reference

// x [H, L, D] in place: row (h, t) rotated to position positions[t] (queries or keys before they
// are cached). The angles are computed once per position and shared by the H heads.
template <class Arch = simd::default_arch>
void apply_rope(const rope& r, view<float, 3> x, std::span<const std::int64_t> positions) {
  constexpr const char* fn = "kvcache::apply_rope";
  detail::require(!x.empty(), fn, ": x must be a non-empty view");
  const std::int64_t D = x.extent(2), dim = rope_detail::rotary_dim(fn, r, D);
  detail::require(static_cast<std::int64_t>(positions.size()) == x.extent(1), fn,
                  ": positions must have x.shape[1] = ", x.extent(1), " entries, got ", positions.size());
  std::vector<float> cs(static_cast<std::size_t>(dim / 2)), sn(static_cast<std::size_t>(dim / 2));
  for (std::int64_t t = 0; t < x.extent(1); ++t) {
    rope_detail::angles(r, dim, static_cast<double>(positions[static_cast<std::size_t>(t)]), cs.data(), sn.data());
    for (std::int64_t h = 0; h < x.extent(0); ++h) rope_detail::rotate<Arch>(r.layout, dim, cs.data(), sn.data(), x.ptr(h, t));
  }
}

// Re-rotates every key of the cache from its rotary position to target(h, j) (kv head h, slot j)
// and records the new rotary positions. The keys must have been rotated with `r`.
template <class Arch = simd::default_arch, class Target>
void rerotate(layer_cache& c, const rope& r, Target&& target) {
  constexpr const char* fn = "kvcache::rerotate";
  const std::int64_t D = c.head_dim(), dim = rope_detail::rotary_dim(fn, r, D);
  std::vector<float> cs(static_cast<std::size_t>(dim / 2)), sn(static_cast<std::size_t>(dim / 2));
  for (std::int64_t h = 0; h < c.num_heads(); ++h) {
    const std::int64_t n = c.length(h);
    if (n == 0) continue;
    std::vector<std::int64_t> slots(static_cast<std::size_t>(n)), rot(static_cast<std::size_t>(n));
    for (std::int64_t j = 0; j < n; ++j) slots[static_cast<std::size_t>(j)] = j;
    tensor<float, 2> k({n, D}), v({n, c.value_dim()});
    c.gather<Arch>(h, slots, k, v);
    const auto old = c.rotary_positions(h);
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int64_t to = target(h, j);
      rot[static_cast<std::size_t>(j)] = to;
      if (to == old[static_cast<std::size_t>(j)]) continue;
      rope_detail::angles(r, dim, static_cast<double>(to - old[static_cast<std::size_t>(j)]), cs.data(), sn.data());
      rope_detail::rotate<Arch>(r.layout, dim, cs.data(), sn.data(), &k(j, 0));
    }
    c.set_keys<Arch>(h, k, rot);
  }
}

// Re-rotates every kept key to its slot index: the compacted positions 0 .. length(h) - 1.
template <class Arch = simd::default_arch>
void rerotate(layer_cache& c, const rope& r) {
  rerotate<Arch>(c, r, [](std::int64_t, std::int64_t j) { return j; });
}

}  // namespace mnemo::kvcache
