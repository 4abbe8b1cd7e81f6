// mnemo/attention/attention.hpp — the one place that chooses which attention kernel runs.
//
//   attention::attend(q, k, v, out, lse, mod, opt)                      // automatic choice
//   attention::attend(q, k, v, out, lse, mod, opt, path::reference)    // force the reference
//
// Every path computes the same function (DESIGN.md conventions); they differ in speed only:
//   reference  double-precision, one row at a time: the one to trust (reference.hpp)
//   flash      tiled online softmax (FlashAttention-2), for prefill (flash.hpp)
//   decode     split-KV over fixed key chunks with an exact merge, for Lq <= decode_max_rows
//              against a long cache (decode.hpp)
// The automatic rule: decode when the query block is small enough for it (Lq <= 16), flash
// otherwise. To check a surprising result, pass path::reference: one argument, same call.
#pragma once

#include <cstdint>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/error.hpp"

namespace mnemo::attention {

enum class path { automatic, reference, flash, decode };

// The path `automatic` resolves to for Lq query rows.
inline path choose_path(std::int64_t Lq) { return Lq <= decode_max_rows ? path::decode : path::flash; }

template <class KV, class Mod = mods::none>
void attend(view<const float, 4> q,   // [B, Hq, Lq, D]
            view<const KV, 4> k,      // [B, Hkv, Lk, D]
            view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
            view<float, 4> out,       // [B, Hq, Lq, Dv]
            view<float, 3> lse = {},  // [B, Hq, Lq] or empty
            const Mod& mod = {}, const options& opt = {}, path p = path::automatic) {
  if (p == path::automatic) p = choose_path(q.extent(2));
  switch (p) {
    case path::reference: reference<KV, Mod>(q, k, v, out, lse, mod, opt); return;
    case path::decode: decode<KV, Mod>(q, k, v, out, lse, mod, opt); return;
    case path::flash:
    case path::automatic: flash<KV, Mod>(q, k, v, out, lse, mod, opt); return;
  }
  mnemo::detail::fail("attention::attend: p must be path::automatic, reference, flash or decode, got ",
                      static_cast<int>(p));
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = mods::none>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void attend(view<const float, 4> q, const K& k, const V& v, view<float, 4> out, view<float, 3> lse = {},
            const Mod& mod = {}, const options& opt = {}, path p = path::automatic) {
  attend<element_t<K>, Mod>(q, cview(k), cview(v), out, lse, mod, opt, p);
}

}  // namespace mnemo::attention
