// mnemo/kvcache/rope.hpp — rotary position embeddings (RoPE) with the context-extension frequency
// schemes, and re-rotation of cached keys.
//
// RoPE (Su et al. 2021, "RoFormer") rotates pairs of channels of a query or key at position p by
// angles p * inv_freq[i], i in [0, rd / 2), rd = the rotary dim:
//   (x_a, x_b) -> af * (x_a cos(p f_i) - x_b sin(p f_i),  x_b cos(p f_i) + x_a sin(p f_i))
// Which channels pair up is the layout:
//   interleaved  (a, b) = (2i, 2i + 1)            (the paper, GPT-J, Meta's original Llama)
//   half_split   (a, b) = (i, i + rd / 2)         (GPT-NeoX, Hugging Face Llama / Mistral / Qwen)
// Only the first rd channels rotate (partial rotary, GPT-NeoX's rotary_pct); the rest pass
// unchanged (never multiplied by af).
//
// Frequencies (rope::scaling; the formulas of Hugging Face's rope init functions, which the
// golden op `rope_scaled` pins down), with d_i = base^(-2i / rd), O = original_context:
//   none      f_i = d_i                                                    (Su et al.)
//   linear    f_i = d_i / factor                       (position interpolation, Chen et al. 2023)
//   dynamic   d_i with base' = base (factor S / O - (factor - 1))^(rd / (rd - 2)), S = max(seq_len, O)
//             (dynamic NTK, bloc97 / Hugging Face's dynamic_rope_update)
//   yarn      corr(r) = rd ln(O / (2 pi r)) / (2 ln base); low = max(floor(corr(beta_fast)), 0),
//             high = min(ceil(corr(beta_slow)), rd - 1) (no floor / ceil when !truncate; high +=
//             0.001 if they are equal); ramp_i = clamp((i - low) / (high - low), 0, 1);
//             f_i = (d_i / factor) ramp_i + d_i (1 - ramp_i);
//             af = 0.1 ln(factor) + 1 (1 when factor <= 1)       (Peng et al. 2023, "YaRN")
//   llama3    wl_i = 2 pi / d_i: wl_i > O / low_freq_factor: d_i / factor; wl_i < O / high_freq_factor:
//             d_i; between: (1 - s) d_i / factor + s d_i, s = (O / wl_i - low_freq_factor) /
//             (high_freq_factor - low_freq_factor)                              (Llama 3.1)
//   longrope  f_i = d_i / e_i, e = long_factor when seq_len > O, else short_factor (rd / 2 each);
//             af = sqrt(1 + ln(factor) / ln(O)) (1 when factor <= 1), factor = the extended
//             context / O                        (Ding et al. 2024, "LongRoPE"; Phi-3)
// attention_factor > 0 replaces the scheme's af (any scheme; e.g. DeepSeek's mscale ratio).
// seq_len (dynamic, longrope): the sequence length the frequencies are for; 0 in apply_rope means
// max(positions) + 1 (Hugging Face's dynamic update). Where af goes (golden README, Choices 16):
// cos and sin are multiplied by it and the same op is applied to q and to k, so the rotated part of
// a q.k logit carries af^2 and nothing scales the softmax again.
//
// Since the rotations of one pair compose, R(p') = R(p' - p) R(p): a key cached at rotary position p
// moves to p' by one more rotation of p' - p, by the angles alone: the key already carries af,
// which re-rotation therefore never applies again. After compaction a policy may want kept keys at
// their compacted positions (StreamingLLM, Xiao et al. 2023, "positions within the cache"): rerotate
// does that, and records the new rotary positions in the cache (layer_cache::rotary_positions; the
// original positions stay as they were). rerotate(c, from, to, ...) also changes the frequencies
// (a dynamic scheme whose seq_len grew, LongRoPE crossing O): angle to_p f'_i - from_p f_i, scale
// af' / af. For int8 / int4 storage the quantized keys are dequantized, rotated and quantized again
// per group (adding at most half a step of the new group's scale).
//
// Numerics: frequencies and angles in double (positions of millions of tokens keep their fraction),
// cos / sin in double rounded to f32 (consecutive positions: one exact angle per 16 positions and a
// double-precision rotation step between, 15 steps adding < 1e-14 rad), the rotation itself in f32.
// The reference does everything in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <numbers>
#include <span>
#include <utility>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/simd/arch.hpp"

namespace mnemo::kvcache {

enum class rope_layout { interleaved, half_split };

// The frequency scheme (see the header): Hugging Face's rope_type names.
enum class rope_scaling { none, linear, dynamic, yarn, llama3, longrope };

inline const char* rope_scaling_name(rope_scaling s) {
  switch (s) {
    case rope_scaling::none: return "none";
    case rope_scaling::linear: return "linear";
    case rope_scaling::dynamic: return "dynamic";
    case rope_scaling::yarn: return "yarn";
    case rope_scaling::llama3: return "llama3";
    case rope_scaling::longrope: return "longrope";
  }
  return "?";
}

// The first three members are the original rope{dim, base, layout}; the rest default to plain RoPE.
struct rope {
  std::int64_t dim = 0;  // rotated channels (even); 0: all of D
  double base = 10000.0;
  rope_layout layout = rope_layout::half_split;
  rope_scaling scaling = rope_scaling::none;
  double factor = 1.0;                // linear, dynamic, yarn, llama3; longrope: extended context / O
  std::int64_t original_context = 0;  // O: dynamic, yarn, llama3, longrope
  std::int64_t seq_len = 0;           // dynamic, longrope; 0: max(positions) + 1 in apply_rope
  double beta_fast = 32.0, beta_slow = 1.0;  // yarn
  bool truncate = true;                      // yarn: floor / ceil the correction range
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  std::vector<double> short_factor = {}, long_factor = {};  // longrope: rd / 2 rescale factors each
  double attention_factor = 0.0;  // > 0: af as given; 0: the scheme's (yarn, longrope; else 1)
};

// The frequencies a rope resolves to for head dim D.
struct rope_frequencies {
  std::int64_t dim = 0;           // rotated channels
  std::vector<double> inv_freq;   // [dim / 2]
  double attention_factor = 1.0;  // af, on the rotated channels
};

namespace rope_detail {

// Validated rotary dim for head dim D, and every parameter the scheme reads.
inline std::int64_t rotary_dim(const char* fn, const rope& r, std::int64_t D) {
  using detail::require;
  const std::int64_t dim = r.dim == 0 ? D : r.dim;
  require(dim >= 2 && dim <= D && dim % 2 == 0, fn, ": rope.dim must be even and in [2, D = ", D, "], got ", dim);
  require(std::isfinite(r.base) && r.base > 0, fn, ": rope.base must be finite and > 0, got ", r.base);
  const char* s = rope_scaling_name(r.scaling);
  require(std::isfinite(r.attention_factor) && r.attention_factor >= 0, fn,
          ": rope.attention_factor must be finite and >= 0 (0: the scheme's), got ", r.attention_factor);
  require(r.seq_len >= 0, fn, ": rope.seq_len must be >= 0 (0: max(positions) + 1), got ", r.seq_len);
  if (r.scaling == rope_scaling::none) return dim;
  require(std::isfinite(r.factor) && r.factor > 0, fn, ": rope.factor must be finite and > 0 for scaling ", s,
          ", got ", r.factor);
  if (r.scaling == rope_scaling::linear) return dim;
  require(r.original_context >= 1, fn, ": rope.original_context must be >= 1 for scaling ", s, ", got ",
          r.original_context);
  if (r.scaling == rope_scaling::yarn) {
    require(std::isfinite(r.beta_slow) && r.beta_slow > 0 && std::isfinite(r.beta_fast) && r.beta_fast >= r.beta_slow,
            fn, ": rope.beta_fast >= rope.beta_slow > 0 (finite) for scaling yarn, got beta_fast ", r.beta_fast,
            ", beta_slow ", r.beta_slow);
    require(r.base != 1.0, fn, ": rope.base must not be 1 for scaling yarn (ln base divides), got ", r.base);
  }
  if (r.scaling == rope_scaling::llama3)
    require(std::isfinite(r.low_freq_factor) && r.low_freq_factor > 0 && std::isfinite(r.high_freq_factor) &&
                r.high_freq_factor > r.low_freq_factor,
            fn, ": rope.high_freq_factor > rope.low_freq_factor > 0 (finite) for scaling llama3, got low ",
            r.low_freq_factor, ", high ", r.high_freq_factor);
  if (r.scaling == rope_scaling::longrope) {
    require(static_cast<std::int64_t>(r.short_factor.size()) == dim / 2 &&
                static_cast<std::int64_t>(r.long_factor.size()) == dim / 2,
            fn, ": rope.short_factor and rope.long_factor must have rotary dim / 2 = ", dim / 2,
            " entries for scaling longrope, got ", r.short_factor.size(), " and ", r.long_factor.size());
    for (const auto* list : {&r.short_factor, &r.long_factor})
      for (double e : *list)
        require(std::isfinite(e) && e > 0, fn, ": rope.short_factor / long_factor entries must be finite and > 0, got ",
                e);
  }
  return dim;
}

// The frequencies for sequence length `seq_len` (dynamic, longrope; the others ignore it), on a
// validated rope.
inline rope_frequencies frequencies(const rope& r, std::int64_t dim, std::int64_t seq_len) {
  const std::int64_t half = dim / 2;
  const double rd = static_cast<double>(dim), O = static_cast<double>(r.original_context);
  rope_frequencies f{dim, std::vector<double>(static_cast<std::size_t>(half)), 1.0};
  double base = r.base;
  if (r.scaling == rope_scaling::dynamic) {
    const double S = std::max(static_cast<double>(seq_len), O);
    // i = 0 has f = 1 whatever base' is (rd = 2 would make the exponent infinite).
    base = dim > 2 ? r.base * std::pow(r.factor * S / O - (r.factor - 1.0), rd / (rd - 2.0)) : r.base;
  }
  for (std::int64_t i = 0; i < half; ++i)
    f.inv_freq[static_cast<std::size_t>(i)] = i == 0 ? 1.0 : std::pow(base, -2.0 * static_cast<double>(i) / rd);
  auto& inv = f.inv_freq;
  switch (r.scaling) {
    case rope_scaling::none:
    case rope_scaling::dynamic: break;
    case rope_scaling::linear:
      for (double& x : inv) x /= r.factor;
      break;
    case rope_scaling::yarn: {
      const auto corr = [&](double rot) {
        return rd * std::log(O / (2.0 * std::numbers::pi * rot)) / (2.0 * std::log(r.base));
      };
      double low = corr(r.beta_fast), high = corr(r.beta_slow);
      if (r.truncate) low = std::floor(low), high = std::ceil(high);
      low = std::max(low, 0.0);
      high = std::min(high, rd - 1.0);
      if (low == high) high += 0.001;
      for (std::int64_t i = 0; i < half; ++i) {
        const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
        double& x = inv[static_cast<std::size_t>(i)];
        x = (x / r.factor) * ramp + x * (1.0 - ramp);
      }
      f.attention_factor = r.factor <= 1.0 ? 1.0 : 0.1 * std::log(r.factor) + 1.0;
      break;
    }
    case rope_scaling::llama3: {
      const double low_wl = O / r.low_freq_factor, high_wl = O / r.high_freq_factor;
      for (double& x : inv) {
        const double wl = 2.0 * std::numbers::pi / x;
        if (wl > low_wl) {
          x /= r.factor;
        } else if (!(wl < high_wl)) {
          const double s = (O / wl - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
          x = (1.0 - s) * x / r.factor + s * x;
        }
      }
      break;
    }
    case rope_scaling::longrope: {
      const auto& e = static_cast<double>(seq_len) > O ? r.long_factor : r.short_factor;
      for (std::int64_t i = 0; i < half; ++i) inv[static_cast<std::size_t>(i)] /= e[static_cast<std::size_t>(i)];
      f.attention_factor = r.factor <= 1.0 ? 1.0 : std::sqrt(1.0 + std::log(r.factor) / std::log(O));
      break;
    }
  }
  if (r.attention_factor > 0) f.attention_factor = r.attention_factor;
  return f;
}

// seq_len of apply_rope: the rope's, else max(positions) + 1.
inline std::int64_t resolve_seq_len(const rope& r, std::span<const std::int64_t> positions) {
  if (r.seq_len > 0) return r.seq_len;
  std::int64_t m = 0;
  for (std::int64_t p : positions) m = std::max(m, p);
  return m == std::numeric_limits<std::int64_t>::max() ? m : m + 1;
}

// Channels (a, b) of pair i.
inline std::int64_t first(rope_layout l, std::int64_t /*dim*/, std::int64_t i) { return l == rope_layout::interleaved ? 2 * i : i; }
inline std::int64_t second(rope_layout l, std::int64_t dim, std::int64_t i) {
  return l == rope_layout::interleaved ? 2 * i + 1 : i + dim / 2;
}

// cos / sin of angles p f_i (times `scale`) in f32.
inline void angles(std::span<const double> inv_freq, double p, double scale, float* cs, float* sn) {
  for (std::size_t i = 0; i < inv_freq.size(); ++i) {
    const double a = p * inv_freq[i];
    cs[i] = static_cast<float>(scale * std::cos(a));
    sn[i] = static_cast<float>(scale * std::sin(a));
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

// Positions per parallel block of apply_rope, and the exact-angle period inside a run of
// consecutive positions (the rest take one double rotation step from the previous position).
inline constexpr std::int64_t block_positions = 64, exact_every = 16;

// Rotates rows t in [t0, t1) of x [H, L, D] (every head) to positions[t]: f32 cos / sin from
// double angles, consecutive positions by a double step (see the header's numerics).
template <class Arch>
void rotate_block(const rope_frequencies& f, rope_layout layout, view<float, 3> x, std::span<const std::int64_t> positions,
                  std::int64_t t0, std::int64_t t1) {
  const std::size_t half = f.inv_freq.size();
  std::vector<double> c(half), s(half), c1(half), s1(half);
  std::vector<float> cs(half), sn(half);
  for (std::size_t i = 0; i < half; ++i) c1[i] = std::cos(f.inv_freq[i]), s1[i] = std::sin(f.inv_freq[i]);
  for (std::int64_t t = t0; t < t1; ++t) {
    const std::int64_t p = positions[static_cast<std::size_t>(t)];
    const bool step = t > t0 && (t - t0) % exact_every != 0 && p - 1 == positions[static_cast<std::size_t>(t - 1)];
    for (std::size_t i = 0; i < half; ++i) {
      if (step) {
        const double cn = c[i] * c1[i] - s[i] * s1[i];
        s[i] = s[i] * c1[i] + c[i] * s1[i];
        c[i] = cn;
      } else {
        const double a = static_cast<double>(p) * f.inv_freq[i];
        c[i] = std::cos(a), s[i] = std::sin(a);
      }
      cs[i] = static_cast<float>(f.attention_factor * c[i]);
      sn[i] = static_cast<float>(f.attention_factor * s[i]);
    }
    for (std::int64_t h = 0; h < x.extent(0); ++h) rotate<Arch>(layout, f.dim, cs.data(), sn.data(), x.ptr(h, t));
  }
}

}  // namespace rope_detail

// The validated rotary dim of `r` for head dim D (every parameter of its scheme checked); errors
// name `fn`.
inline std::int64_t rotary_dim(const rope& r, std::int64_t D, const char* fn = "kvcache::rotary_dim") {
  return rope_detail::rotary_dim(fn, r, D);
}

// The channels (a, b) of rotation pair i, i in [0, dim / 2), in layout l.
inline std::pair<std::int64_t, std::int64_t> rope_channels(rope_layout l, std::int64_t dim, std::int64_t i) {
  return {rope_detail::first(l, dim, i), rope_detail::second(l, dim, i)};
}

// The frequencies and attention factor `r` resolves to for head dim D at sequence length seq_len
// (dynamic and longrope read it; 0: r.seq_len). Validates r.
inline rope_frequencies frequencies(const rope& r, std::int64_t D, std::int64_t seq_len = 0) {
  constexpr const char* fn = "kvcache::frequencies";
  const std::int64_t dim = rope_detail::rotary_dim(fn, r, D);
  detail::require(seq_len >= 0, fn, ": seq_len must be >= 0, got ", seq_len);
  return rope_detail::frequencies(r, dim, seq_len > 0 ? seq_len : r.seq_len);
}

namespace reference {

// x [H, L, D] in place: row (h, t) rotated to positions[t], in double.
inline void apply_rope(const rope& r, view<float, 3> x, std::span<const std::int64_t> positions) {
  const std::int64_t D = x.extent(2), dim = rope_detail::rotary_dim("kvcache::reference::apply_rope", r, D);
  const rope_frequencies f = rope_detail::frequencies(r, dim, rope_detail::resolve_seq_len(r, positions));
  for (std::int64_t h = 0; h < x.extent(0); ++h)
    for (std::int64_t t = 0; t < x.extent(1); ++t)
      for (std::int64_t i = 0; i < dim / 2; ++i) {
        const double ang = static_cast<double>(positions[static_cast<std::size_t>(t)]) * f.inv_freq[static_cast<std::size_t>(i)];
        float& xa = x(h, t, rope_detail::first(r.layout, dim, i));
        float& xb = x(h, t, rope_detail::second(r.layout, dim, i));
        const double a = xa, b = xb;
        xa = static_cast<float>(f.attention_factor * (a * std::cos(ang) - b * std::sin(ang)));
        xb = static_cast<float>(f.attention_factor * (b * std::cos(ang) + a * std::sin(ang)));
      }
}

}  // namespace reference

// x [H, L, D] in place: row (h, t) rotated to position positions[t] (queries or keys before they
// are cached), with r's frequencies and attention factor. The angles are computed once per
// position and shared by the H heads; blocks of 64 positions run in parallel.
template <class Arch = simd::default_arch>
void apply_rope(const rope& r, view<float, 3> x, std::span<const std::int64_t> positions, int threads = 0) {
  constexpr const char* fn = "kvcache::apply_rope";
  detail::require(!x.empty(), fn, ": x must be a non-empty view");
  const std::int64_t D = x.extent(2), dim = rope_detail::rotary_dim(fn, r, D);
  detail::require(static_cast<std::int64_t>(positions.size()) == x.extent(1), fn,
                  ": positions must have x.shape[1] = ", x.extent(1), " entries, got ", positions.size());
  detail::require(threads >= 0, fn, ": threads must be >= 0, got ", threads);
  const rope_frequencies f = rope_detail::frequencies(r, dim, rope_detail::resolve_seq_len(r, positions));
  const std::int64_t L = x.extent(1), blocks = (L + rope_detail::block_positions - 1) / rope_detail::block_positions;
  parallel_for(
      blocks,
      [&](std::int64_t blk) {
        const std::int64_t t0 = blk * rope_detail::block_positions;
        rope_detail::rotate_block<Arch>(f, r.layout, x, positions, t0, std::min(L, t0 + rope_detail::block_positions));
      },
      threads);
}

// Re-rotates every key of the cache from its rotary position, under the frequencies of `from`, to
// target(h, j) (kv head h, slot j) under those of `to`, and records the new rotary positions. The
// keys must have been rotated with `from`. from and to must pair the same channels (dim, layout);
// dynamic and longrope need an explicit seq_len (their frequencies depend on it). The keys keep
// their attention factor when from and to have the same frequencies, and change it by
// af(to) / af(from) otherwise.
template <class Arch = simd::default_arch, class Target>
  requires std::invocable<Target&, std::int64_t, std::int64_t>
void rerotate(layer_cache& c, const rope& from, const rope& to, Target&& target) {
  constexpr const char* fn = "kvcache::rerotate";
  const std::int64_t D = c.head_dim(), dim = rope_detail::rotary_dim(fn, from, D);
  detail::require(rope_detail::rotary_dim(fn, to, D) == dim && to.layout == from.layout, fn,
                  ": the target rope must pair the same channels as the source (dim ", dim, ", layout ",
                  from.layout == rope_layout::half_split ? "half_split" : "interleaved", ")");
  for (const rope* r : {&from, &to})
    detail::require(r->seq_len > 0 || (r->scaling != rope_scaling::dynamic && r->scaling != rope_scaling::longrope),
                    fn, ": rope.seq_len must be > 0 for scaling ", rope_scaling_name(r->scaling),
                    " (its frequencies depend on it), got ", r->seq_len);
  const rope_frequencies ff = rope_detail::frequencies(from, dim, from.seq_len),
                         ft = rope_detail::frequencies(to, dim, to.seq_len);
  const bool same = ff.inv_freq == ft.inv_freq && ff.attention_factor == ft.attention_factor;
  const double scale = same ? 1.0 : ft.attention_factor / ff.attention_factor;
  const std::size_t half = static_cast<std::size_t>(dim / 2);
  std::vector<float> cs(half), sn(half);
  for (std::int64_t h = 0; h < c.num_heads(); ++h) {
    const std::int64_t n = c.length(h);
    if (n == 0) continue;
    std::vector<std::int64_t> slots(static_cast<std::size_t>(n)), rot(static_cast<std::size_t>(n));
    for (std::int64_t j = 0; j < n; ++j) slots[static_cast<std::size_t>(j)] = j;
    tensor<float, 2> k({n, D}), v({n, c.value_dim()});
    c.gather<Arch>(h, slots, k, v);
    const auto old = c.rotary_positions(h);
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int64_t to_p = target(h, j), from_p = old[static_cast<std::size_t>(j)];
      rot[static_cast<std::size_t>(j)] = to_p;
      if (same) {
        if (to_p == from_p) continue;
        rope_detail::angles(ff.inv_freq, static_cast<double>(to_p - from_p), 1.0, cs.data(), sn.data());
      } else {
        for (std::size_t i = 0; i < half; ++i) {
          const double a = static_cast<double>(to_p) * ft.inv_freq[i] - static_cast<double>(from_p) * ff.inv_freq[i];
          cs[i] = static_cast<float>(scale * std::cos(a));
          sn[i] = static_cast<float>(scale * std::sin(a));
        }
      }
      rope_detail::rotate<Arch>(from.layout, dim, cs.data(), sn.data(), &k(j, 0));
    }
    c.set_keys<Arch>(h, k, rot);
  }
}

// Re-rotates every key of the cache, rotated with `r`, to target(h, j) under the same frequencies.
template <class Arch = simd::default_arch, class Target>
  requires std::invocable<Target&, std::int64_t, std::int64_t>
void rerotate(layer_cache& c, const rope& r, Target&& target) {
  rerotate<Arch>(c, r, r, target);
}

// Re-rotates every kept key to its slot index: the compacted positions 0 .. length(h) - 1.
template <class Arch = simd::default_arch>
void rerotate(layer_cache& c, const rope& r) {
  rerotate<Arch>(c, r, r, [](std::int64_t, std::int64_t j) { return j; });
}

// The same from the frequencies of `from` to those of `to` (see the general form above).
template <class Arch = simd::default_arch>
void rerotate(layer_cache& c, const rope& from, const rope& to) {
  rerotate<Arch>(c, from, to, [](std::int64_t, std::int64_t j) { return j; });
}

}  // namespace mnemo::kvcache
