// Golden ops of attention for serving: attention_sinks (a per-query-head sink logit in the softmax
// denominator, options.sinks) and attention_paged (packed variable-length queries against a paged
// KV pool, attention/paged.hpp).
//
// attention_sinks params: B Hq Hkv Lq Lk D Dv scale causal window softcap; inputs q k v sinks [Hq].
// attention_paged params: B T Hq Hkv D Dv num_pages page_size max_pages scale causal window softcap
// sinks; inputs q [T,Hq,D], k_pages, v_pages, block_table, seq_lens, cu_seqlens_q (+ sinks [Hq]).
// The mod follows the README's order: softcap, then the mask (a window w > 0 is the causal
// sliding window of w keys).
//
// Registered paths: attention_sinks through "reference" and "flash" (options.sinks);
// attention_paged through "reference" (attention::reference_paged) and "paged" (attention::paged).
#include <cstdint>
#include <string>

#include "golden/runner.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/paged.hpp"
#include "mnemo/attention/reference.hpp"

namespace {

namespace attn = mnemo::attention;
namespace mods = mnemo::attention::mods;
namespace golden = mnemo::golden;
using mnemo::tensor;
using mnemo::view;

struct mod_params {
  bool causal;
  std::int64_t window;
  float softcap;
};

mod_params load_mod(const golden::golden_case& c) {
  using mnemo::detail::require;
  mod_params m{c.flag("causal"), c.dim("window"), static_cast<float>(c.number("softcap"))};
  require(m.window == 0 || m.causal, "params.window = ", m.window, " needs causal: true");
  require(m.softcap >= 0, "params.softcap: expected >= 0 (0 = off), got ", m.softcap);
  return m;
}

// Calls fn(mod) with all_of(softcap, mask), each part mods::none when off.
template <class Fn>
void with_mod(const mod_params& m, Fn&& fn) {
  auto with_mask = [&](const auto& cap) {
    if (m.window > 0) fn(mods::all_of(cap, mods::sliding_window{m.window}));
    else if (m.causal) fn(mods::all_of(cap, mods::causal{}));
    else fn(mods::all_of(cap, mods::none{}));
  };
  if (m.softcap > 0) with_mask(mods::softcap{m.softcap});
  else with_mask(mods::none{});
}

enum class sinks_path { reference, flash };

template <sinks_path Path>
golden::results attention_sinks(const golden::golden_case& c) {
  const std::int64_t B = c.dim("B"), Hq = c.dim("Hq"), Hkv = c.dim("Hkv"), Lq = c.dim("Lq"), Lk = c.dim("Lk"),
                     D = c.dim("D"), Dv = c.dim("Dv");
  const auto q = c.input<float, 4>("q", {B, Hq, Lq, D});
  const auto k = c.input<float, 4>("k", {B, Hkv, Lk, D});
  const auto v = c.input<float, 4>("v", {B, Hkv, Lk, Dv});
  const auto sinks = c.input<float, 1>("sinks", {Hq});
  attn::options opt;
  opt.scale = static_cast<float>(c.number("scale"));
  opt.sinks = sinks.as_view();
  tensor<float, 4> out({B, Hq, Lq, Dv});
  tensor<float, 3> lse({B, Hq, Lq});
  with_mod(load_mod(c), [&](const auto& mod) {
    if constexpr (Path == sinks_path::flash) attn::flash(mnemo::cview(q), k, v, out, lse, mod, opt);
    else attn::reference(q, k, v, out, lse, mod, opt);
  });
  golden::results r;
  r.add("out", out);
  r.add("lse", lse);
  return r;
}

template <bool Fast>
golden::results attention_paged(const golden::golden_case& c) {
  const std::int64_t B = c.dim("B"), T = c.dim("T"), Hq = c.dim("Hq"), Hkv = c.dim("Hkv"), D = c.dim("D"),
                     Dv = c.dim("Dv"), P = c.dim("num_pages"), S = c.dim("page_size"), M = c.dim("max_pages");
  const auto q = c.input<float, 3>("q", {T, Hq, D});
  const auto k_pages = c.input<float, 4>("k_pages", {P, S, Hkv, D});
  const auto v_pages = c.input<float, 4>("v_pages", {P, S, Hkv, Dv});
  const auto block_table = c.input<std::int64_t, 2>("block_table", {B, M});
  const auto seq_lens = c.input<std::int64_t, 1>("seq_lens", {B});
  const auto cu = c.input<std::int64_t, 1>("cu_seqlens_q", {B + 1});
  tensor<float, 1> sinks({0});
  attn::options opt;
  opt.scale = static_cast<float>(c.number("scale"));
  if (c.flag("sinks")) {
    sinks = c.input<float, 1>("sinks", {Hq});
    opt.sinks = sinks.as_view();
  }
  const attn::paged_kv<float> kv{k_pages.as_view(), v_pages.as_view(), block_table.as_view(), seq_lens.as_view()};
  tensor<float, 3> out({T, Hq, Dv});
  tensor<float, 2> lse({T, Hq});
  with_mod(load_mod(c), [&](const auto& mod) {
    if constexpr (Fast) attn::paged(q.as_view(), cu.as_view(), kv, out, lse, mod, opt);
    else attn::reference_paged(q.as_view(), cu.as_view(), kv, out, lse, mod, opt);
  });
  golden::results r;
  r.add("out", out);
  r.add("lse", lse);
  return r;
}

[[maybe_unused]] const bool registered =
    golden::register_op("attention_sinks", "reference", attention_sinks<sinks_path::reference>) &&
    golden::register_op("attention_sinks", "flash", attention_sinks<sinks_path::flash>) &&
    golden::register_op("attention_paged", "reference", attention_paged<false>) &&
    golden::register_op("attention_paged", "paged", attention_paged<true>);

}  // namespace
