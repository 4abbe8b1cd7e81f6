// Golden op attention_sigmoid (README "attention_sigmoid"): out_i = sum_{visible j}
// sigmoid(scale q_i.k_j + bias) v_j, no normaliser, masked keys contribute 0.
//
// Params: B Hq Hkv Lq Lk D Dv scale bias causal window. Inputs q [B,Hq,Lq,D], k [B,Hkv,Lk,D],
// v [B,Hkv,Lk,Dv]; output out [B,Hq,Lq,Dv]. The mask follows attention_forward: causal
// bottom-right, a window w > 0 is the causal sliding window of w keys (always with causal).
//
// Registered paths: "reference" (attention::reference_sigmoid_attention, double) and "fast"
// (attention::sigmoid_attention, the tiled f32 kernel at the dispatched ISA level).
#include <cstdint>

#include "golden/runner.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/sigmoid.hpp"

namespace {

namespace attn = mnemo::attention;
namespace mods = mnemo::attention::mods;
namespace golden = mnemo::golden;
using mnemo::tensor;

template <bool Reference>
golden::results attention_sigmoid(const golden::golden_case& c) {
  using mnemo::detail::require;
  const std::int64_t B = c.dim("B"), Hq = c.dim("Hq"), Hkv = c.dim("Hkv"), Lq = c.dim("Lq"), Lk = c.dim("Lk"),
                     D = c.dim("D"), Dv = c.dim("Dv"), window = c.dim("window");
  const double scale = c.number("scale"), bias = c.number("bias");
  require(scale > 0, "params.scale: expected > 0, got ", scale);
  const bool causal = c.flag("causal");
  require(window == 0 || causal, "params.window = ", window,
          " needs causal: true (the cases define a window only as a causal one), got causal: false");
  const auto q = c.input<float, 4>("q", {B, Hq, Lq, D});
  const auto k = c.input<float, 4>("k", {B, Hkv, Lk, D});
  const auto v = c.input<float, 4>("v", {B, Hkv, Lk, Dv});
  tensor<float, 4> out({B, Hq, Lq, Dv});
  const attn::options opt{.scale = static_cast<float>(scale)};
  const float b = static_cast<float>(bias);
  auto run = [&](const auto& mod) {
    if constexpr (Reference) attn::reference_sigmoid_attention(q, k, v, out, mod, opt, b);
    else attn::sigmoid_attention(q, k, v, out, mod, opt, b);
  };
  if (window > 0) run(mods::sliding_window{window});
  else if (causal) run(mods::causal{});
  else run(mods::none{});
  golden::results r;
  r.add("out", out);
  return r;
}

[[maybe_unused]] const bool registered =
    golden::register_op("attention_sigmoid", "reference", attention_sigmoid<true>) &&
    golden::register_op("attention_sigmoid", "fast", attention_sigmoid<false>);

}  // namespace
