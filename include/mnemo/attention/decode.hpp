// mnemo/attention/decode.hpp — split-KV decode: a few queries (one decode step, or the draft
// tokens of speculative verification) against a long K/V cache in strided views.
//
// It is the split-KV engine (split_kv.hpp: fixed chunks of decode_chunk keys, softmax per chunk,
// the fixed-order merge of merge.hpp, column sums) over the strided-view source: K/V elements in
// f32, f16 or bf16, any view whose innermost dimension is contiguous. The result is bit-identical
// for every thread count. This header also brings in attention::merge (merge.hpp), which older
// code found here.
//
// The readable reference is attention::reference (reference.hpp): decode takes the same arguments
// and must agree with it to f32 rounding, so a surprising result is checked by calling it instead.
//
// Shapes: q [B, Hq, Lq, D] f32 with Lq <= decode_max_rows, k [B, Hkv, Lk, D] and v [B, Hkv, Lk, Dv]
// in f32, f16 or bf16, out [B, Hq, Lq, Dv], lse [B, Hq, Lq] (optional). Only the innermost
// dimension must be contiguous: K/V may be a cache [Hkv, capacity, D] narrowed to its first Lk
// slots and viewed as [1, Hkv, Lk, D] — nothing is copied. Positions, masks and score pipeline are
// those of attention::reference (mods.hpp): query row i sits at key position i + Lk - Lq.
//
// Side output (column_sums, reference.hpp): the column sums of the final probabilities over the
// last `rows` query rows, computed by the engine from the probabilities it already has.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/merge.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/attention/split_kv.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/prebuilt.hpp"
#include "mnemo/simd/dispatch.hpp"

namespace mnemo::attention {

// ---------------------------------------------------------------------------------------------
// Public API.

namespace decode_detail {

// The engine over strided views at one Arch (validated arguments, B and Lq > 0).
template <class Arch, class KV, class Mod>
void run(const dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v, view<float, 4> out,
         view<float, 3> lse, const Mod& mod, int threads, decode_workspace& ws, const column_sums& cs,
         view<const float, 1> sinks) {
  const split_kv::strided_source<KV> src{k, v, {}};
  const split_kv::sums_out sums{cs.sums, cs.first_row(d.Lq), d.Lk};
  split_kv::attend<Arch>(d, src, q, out, lse, mod, threads, ws, sums, sinks);
}

}  // namespace decode_detail

// Split-KV decode: attention of Lq <= decode_max_rows query rows against Lk keys, the same result
// as attention::reference (to f32 rounding) and bit-identical for every options.threads.
// K/V elements may be float, f16 or bf16; any view with a contiguous innermost dimension works.
template <class KV, class Mod = mods::none, class TuArch = simd::default_arch>
void decode(view<const float, 4> q,   // [B, Hq, Lq, D]
            view<const KV, 4> k,      // [B, Hkv, Lk, D]
            view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
            view<float, 4> out,       // [B, Hq, Lq, Dv]
            view<float, 3> lse,       // [B, Hq, Lq] or empty
            const Mod& mod, const options& opt, decode_workspace& ws,
            const column_sums& cs = {}) {  // optional side output, see the header
  constexpr const char* fn = "attention::decode";
  const dims d = detail::check_args(fn, q, k, v, out, lse, mod, opt);
  mnemo::detail::require(d.Lq <= decode_max_rows, fn, ": q.shape[2] (Lq) must be <= ", decode_max_rows,
                         " (decode_max_rows; use a prefill kernel for more rows), got ", d.Lq);
  detail::check_column_sums(fn, d, cs, q, k, v, out, lse);
  if (d.B == 0 || d.Lq == 0) {  // no row: nothing attended
    if (cs.wanted() && d.Lk > 0)
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h) std::fill_n(cs.sums.ptr(b, h, 0), d.Lk, 0.0f);
    return;
  }
  if constexpr (prebuilt::covers<KV, Mod>) {  // a program built below the CPU's level (prebuilt.hpp)
    const simd::level want = simd::resolve_level(opt.isa);
    if (prebuilt::above<TuArch>(want))
      return prebuilt::at_level(want, [&]<class Arch>() {
        prebuilt::decode<Arch, KV, Mod>(d, q, k, v, out, lse, mod, opt, ws, cs);
      });
  }
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() { decode_detail::run<Arch>(d, q, k, v, out, lse, mod, opt.threads, ws, cs, opt.sinks); });
}

// As above, with a workspace of its own (allocated for this call).
template <class KV, class Mod = mods::none, class TuArch = simd::default_arch>
void decode(view<const float, 4> q,   // [B, Hq, Lq, D]
            view<const KV, 4> k,      // [B, Hkv, Lk, D]
            view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
            view<float, 4> out,       // [B, Hq, Lq, Dv]
            view<float, 3> lse = {},  // [B, Hq, Lq] or empty
            const Mod& mod = {}, const options& opt = {}, const column_sums& cs = {}) {
  decode_workspace ws;
  decode<KV, Mod, TuArch>(q, k, v, out, lse, mod, opt, ws, cs);
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = mods::none, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void decode(view<const float, 4> q, const K& k, const V& v, view<float, 4> out, view<float, 3> lse = {},
            const Mod& mod = {}, const options& opt = {}, const column_sums& cs = {}) {
  decode<element_t<K>, Mod, TuArch>(q, cview(k), cview(v), out, lse, mod, opt, cs);
}

}  // namespace mnemo::attention
