// Golden ops of the attention family: attention_forward, attention_decode, attention_backward
// and attention_merge.
//
// Params (README "attention_forward"): B Hq Hkv Lq Lk D Dv scale causal window softcap alibi.
// Inputs q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv] (+ alibi_slopes [Hq] when alibi);
// outputs out [B,Hq,Lq,Dv], lse [B,Hq,Lq]. The mod follows the README's score order:
// softcap, then ALiBi, then the mask (a window w > 0 is the causal sliding window of w keys).
// attention_decode is the same op with Lq = 1.
//
// Registered paths: forward and decode through "reference", "flash" and (decode cases, Lq = 1)
// "decode"; backward through "reference" (reference_backward, out/lse from the reference) and
// "flash" (flash forward, then flash_backward); merge through attention::merge.
#include <cstdint>
#include <string>

#include "golden/runner.hpp"
#include "mnemo/attention/attention.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/flash_backward.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"

namespace {

namespace attn = mnemo::attention;
namespace mods = mnemo::attention::mods;
namespace golden = mnemo::golden;
using mnemo::tensor;
using mnemo::view;

struct attention_case {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  float scale;
  bool causal, alibi;
  std::int64_t window;
  float softcap;
  tensor<float, 4> q, k, v;  // [B, Hq, Lq, D], [B, Hkv, Lk, D], [B, Hkv, Lk, Dv]
  tensor<float, 1> slopes;   // [Hq] when alibi, else empty
};

attention_case load_attention_case(const golden::golden_case& c) {
  using mnemo::detail::require;
  attention_case a{};
  a.B = c.dim("B");
  a.Hq = c.dim("Hq");
  a.Hkv = c.dim("Hkv");
  a.Lq = c.dim("Lq");
  a.Lk = c.dim("Lk");
  a.D = c.dim("D");
  a.Dv = c.dim("Dv");
  const double scale = c.number("scale");
  require(scale > 0, "params.scale: expected > 0, got ", scale);
  a.scale = static_cast<float>(scale);
  a.causal = c.flag("causal");
  a.alibi = c.flag("alibi");
  a.window = c.dim("window");
  require(a.window == 0 || a.causal, "params.window = ", a.window,
          " needs causal: true (the cases define a window only as a causal one), got causal: false");
  const double cap = c.number("softcap");
  require(cap >= 0, "params.softcap: expected >= 0 (0 = off), got ", cap);
  a.softcap = static_cast<float>(cap);
  if (c.op() == "attention_decode") require(a.Lq == 1, "attention_decode: expected params.Lq = 1, got ", a.Lq);

  a.q = c.input<float, 4>("q", {a.B, a.Hq, a.Lq, a.D});
  a.k = c.input<float, 4>("k", {a.B, a.Hkv, a.Lk, a.D});
  a.v = c.input<float, 4>("v", {a.B, a.Hkv, a.Lk, a.Dv});
  if (a.alibi) a.slopes = c.input<float, 1>("alibi_slopes", {a.Hq});
  return a;
}

// Calls fn(mod) with the mod the case describes: all_of(softcap, alibi, mask), each part
// mods::none when off. The runtime params pick one of 12 compile-time mods.
template <class Fn>
void with_mod(const attention_case& a, Fn&& fn) {
  auto with_mask = [&](const auto& cap, const auto& bias) {
    if (a.window > 0) fn(mods::all_of(cap, bias, mods::sliding_window{a.window}));
    else if (a.causal) fn(mods::all_of(cap, bias, mods::causal{}));
    else fn(mods::all_of(cap, bias, mods::none{}));
  };
  auto with_alibi = [&](const auto& cap) {
    if (a.alibi) with_mask(cap, mods::alibi{view<const float, 1>(a.slopes.as_view())});
    else with_mask(cap, mods::none{});
  };
  if (a.softcap > 0) with_alibi(mods::softcap{a.softcap});
  else with_alibi(mods::none{});
}

// Forward through one path of attention::attend.
template <attn::path Path>
golden::results attention_forward(const golden::golden_case& c) {
  const attention_case a = load_attention_case(c);
  tensor<float, 4> out({a.B, a.Hq, a.Lq, a.Dv});
  tensor<float, 3> lse({a.B, a.Hq, a.Lq});
  with_mod(a, [&](const auto& mod) { attn::attend(a.q, a.k, a.v, out, lse, mod, {.scale = a.scale}, Path); });
  golden::results r;
  r.add("out", out);
  r.add("lse", lse);
  return r;
}

// Backward: out and lse from the forward of the same path, then dq, dk, dv.
template <bool Flash>
golden::results attention_backward(const golden::golden_case& c) {
  const attention_case a = load_attention_case(c);
  const tensor<float, 4> dout = c.input<float, 4>("dout", {a.B, a.Hq, a.Lq, a.Dv});
  tensor<float, 4> out({a.B, a.Hq, a.Lq, a.Dv}), dq({a.B, a.Hq, a.Lq, a.D}), dk({a.B, a.Hkv, a.Lk, a.D}),
      dv({a.B, a.Hkv, a.Lk, a.Dv});
  tensor<float, 3> lse({a.B, a.Hq, a.Lq});
  const attn::options opt{.scale = a.scale};
  with_mod(a, [&](const auto& mod) {
    if constexpr (Flash) {
      attn::flash(a.q, a.k, a.v, out, lse, mod, opt);
      attn::flash_backward(a.q, a.k, a.v, out, lse, dout, dq, dk, dv, mod, opt);
    } else {
      attn::reference(a.q, a.k, a.v, out, lse, mod, opt);
      attn::reference_backward(a.q, a.k, a.v, dout, dq, dk, dv, mod, opt);
    }
  });
  golden::results r;
  r.add("out", out);
  r.add("lse", lse);
  r.add("dq", dq);
  r.add("dk", dk);
  r.add("dv", dv);
  return r;
}

golden::results attention_merge(const golden::golden_case& c) {
  const std::int64_t B = c.dim("B"), Hq = c.dim("Hq"), Lq = c.dim("Lq"), Dv = c.dim("Dv");
  const auto out_a = c.input<float, 4>("out_a", {B, Hq, Lq, Dv}), out_b = c.input<float, 4>("out_b", {B, Hq, Lq, Dv});
  const auto lse_a = c.input<float, 3>("lse_a", {B, Hq, Lq}), lse_b = c.input<float, 3>("lse_b", {B, Hq, Lq});
  tensor<float, 4> out({B, Hq, Lq, Dv});
  tensor<float, 3> lse({B, Hq, Lq});
  attn::merge(out_a.as_view(), lse_a.as_view(), out_b.as_view(), lse_b.as_view(), out, lse);
  golden::results r;
  r.add("out", out);
  r.add("lse", lse);
  return r;
}

using P = attn::path;
[[maybe_unused]] const bool registered =
    golden::register_op("attention_forward", "reference", attention_forward<P::reference>) &&
    golden::register_op("attention_forward", "flash", attention_forward<P::flash>) &&
    golden::register_op("attention_decode", "reference", attention_forward<P::reference>) &&
    golden::register_op("attention_decode", "flash", attention_forward<P::flash>) &&
    golden::register_op("attention_decode", "decode", attention_forward<P::decode>) &&
    golden::register_op("attention_backward", "reference", attention_backward<false>) &&
    golden::register_op("attention_backward", "flash", attention_backward<true>) &&
    golden::register_op("attention_merge", "merge", attention_merge);

}  // namespace
