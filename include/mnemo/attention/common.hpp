// mnemo/attention/common.hpp — argument checks and shapes shared by every attention kernel.
//
// Shapes (DESIGN.md): q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv],
// out [B, Hq, Lq, Dv], lse [B, Hq, Lq] (optional: an empty view means "not wanted").
// Query head h reads kv head h / (Hq / Hkv).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "mnemo/attention/mods.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/dispatch.hpp"

namespace mnemo::attention {

// Options every attention entry point takes.
struct options {
  float scale = 0;  // 0: 1 / sqrt(D)
  int threads = 0;  // 0: the OpenMP default
  simd::level isa = simd::level::automatic;  // force an ISA level (simd/dispatch.hpp); automatic: $MNEMO_ISA or the best
  // Attention sinks [Hq] (gpt-oss, flash-attention's learnable_sink): one logit per query head that
  // joins every row's softmax denominator and carries no value: lse = log(sum_visible exp(s) +
  // exp(sink)), p = exp(s - lse), so a row's weights sum to less than 1; a row that sees no key
  // gets out = 0 and lse = sink. Used as given: not scaled, not soft-capped. Empty: no sinks.
  view<const float, 1> sinks = {};
};

// The sink of query head h (-inf without sinks: exp(-inf) = 0 joins nothing).
inline float sink_of(const options& opt, std::int64_t h) {
  return opt.sinks.empty() ? -std::numeric_limits<float>::infinity() : opt.sinks(h);
}

// The validated sizes of one call.
struct dims {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  float scale;
  std::int64_t group() const { return Hq / Hkv; }    // query heads per kv head
  std::int64_t offset() const { return Lk - Lq; }   // query row i sits at position i + offset
};

namespace detail {

// The aliasing rule of every attention entry point (docs/errors.md): every query row reads all of
// k and v, so out and lse must not overlap them; out may be q itself, in place (each query row is
// read before its output row is written), but must not overlap q otherwise; lse overlaps nothing.
// Views overlap when their memory ranges do (mnemo::overlaps). Only checked when out is an output
// (the backward passes take the forward's out as a const input).
template <class Q, class KV, class O>
void check_aliasing(const char* fn, const view<Q, 4>& q, const view<const KV, 4>& k, const view<const KV, 4>& v,
                    const view<O, 4>& out, const view<float, 3>& lse) {
  using mnemo::detail::require_disjoint;
  if constexpr (!std::is_const_v<O>) {
    require_disjoint(fn, "out", out, "k", k);
    require_disjoint(fn, "out", out, "v", v);
    if (!same_view(out, q)) require_disjoint(fn, "out", out, "q", q, "; out may be q itself (the same view), in place");
    require_disjoint(fn, "lse", lse, "out", out);
  }
  require_disjoint(fn, "lse", lse, "q", q);
  require_disjoint(fn, "lse", lse, "k", k);
  require_disjoint(fn, "lse", lse, "v", v);
}

template <class Q, class KV, class O, class Mod>
dims check_args(const char* fn, const view<Q, 4>& q, const view<const KV, 4>& k, const view<const KV, 4>& v,
                const view<O, 4>& out, const view<float, 3>& lse, const Mod& mod, const options& opt) {
  static_assert(is_kv_type_v<KV>, "attention: K/V elements must be float, mnemo::f16 or mnemo::bf16");
  using mnemo::detail::require;
  // Zero-size arguments are valid (B, Lq or Lk = 0; a zero-size tensor has no buffer); a null view
  // with elements is not.
  mnemo::detail::require_data(fn, "q", q, " [B, Hq, Lq, D]");
  mnemo::detail::require_data(fn, "k", k, " [B, Hkv, Lk, D]");
  mnemo::detail::require_data(fn, "v", v, " [B, Hkv, Lk, Dv]");
  mnemo::detail::require_data(fn, "out", out, " [B, Hq, Lq, Dv]");
  const std::int64_t B = q.extent(0), Hq = q.extent(1), Lq = q.extent(2), D = q.extent(3);
  const std::int64_t Hkv = k.extent(1), Lk = k.extent(2), Dv = v.extent(3);
  require(D >= 1 && Dv >= 1, fn, ": head dims q.shape[3] (D) and v.shape[3] (Dv) must be >= 1, got D=", D, ", Dv=", Dv,
          " (q ", shape_string(q.shape()), ", v ", shape_string(v.shape()), ")");
  require(Hq >= 1 && Hkv >= 1, fn, ": head counts q.shape[1] (Hq) and k.shape[1] (Hkv) must be >= 1, got Hq=", Hq,
          ", Hkv=", Hkv);
  mnemo::detail::require_shape(fn, "k", k, {B, Hkv, Lk, D}, " [B, Hkv, Lk, D] (B and D from q)");
  mnemo::detail::require_shape(fn, "v", v, {B, Hkv, Lk, Dv}, " [B, Hkv, Lk, Dv] (B, Hkv, Lk from k)");
  require(Hq % Hkv == 0, fn, ": q.shape[1] (Hq) must be a multiple of k.shape[1] (Hkv), got Hq=", Hq,
          ", Hkv=", Hkv);
  mnemo::detail::require_shape(fn, "out", out, {B, Hq, Lq, Dv}, " [B, Hq, Lq, Dv]");
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, {B, Hq, Lq}, " [B, Hq, Lq]");
  require(std::isfinite(opt.scale), fn, ": options.scale must be finite, got ", opt.scale);
  require(opt.threads >= 0, fn, ": options.threads must be >= 0, got ", opt.threads);
  if (!opt.sinks.empty()) mnemo::detail::require_shape(fn, "options.sinks", opt.sinks, {Hq}, " [Hq]");
  mods::validate(mod, fn, Hq, Lq, Lk);
  check_aliasing(fn, q, k, v, out, lse);
  const float scale = opt.scale != 0 ? opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  return {B, Hq, Hkv, Lq, Lk, D, Dv, scale};
}

}  // namespace detail
}  // namespace mnemo::attention
