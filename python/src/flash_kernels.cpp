// python/src/flash_kernels.cpp — attention::flash for the bindings: K/V f32, f16, bf16; mods none,
// causal (mnemo::prebuilt's AVX2 / AVX-512 copies) and the runtime dyn_mod.
#include "attention_impl.hpp"
#include "mnemo/attention/flash.hpp"

namespace mnemo::py {

void run_flash(const fwd_call& c) {
  with_kv(kv_type(c, "flash"), [&]<class Tag>(Tag) {
    using KV = typename Tag::type;
    const auto k = c.k.as<const KV, 4>("[B, Hkv, Lk, D]");
    const auto v = c.v.as<const KV, 4>("[B, Hkv, Lk, Dv]");
    if constexpr (!std::is_same_v<KV, float>) {
      if (c.mod.choice == mod_choice::dyn)  // compile time: f16 / bf16 K/V only with the prebuilt-covered mods
        mnemo::detail::fail("mnemo.attention.flash: arguments k, v: float16 / bfloat16 K/V take causal or no mask only "
                            "(no window, softcap, alibi_slopes, document_ids or prefix); pass float32 K/V for those");
      pyb::gil_scoped_release release;
      const auto run = [&](const auto& mod) { timed([&] { attention::flash(c.q, k, v, c.out, c.lse, mod, c.opt, c.cs); }); };
      if (c.mod.choice == mod_choice::causal) run(attention::mods::causal{});
      else run(attention::mods::none{});
    } else {
      pyb::gil_scoped_release release;
      with_mod(c.mod, [&](const auto& mod) {
      timed([&] { attention::flash(c.q, k, v, c.out, c.lse, mod, c.opt, c.cs); });
      });
    }
  });
}

}  // namespace mnemo::py
