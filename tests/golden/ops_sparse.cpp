// Golden ops of the sparse / retrieval / landmark family: landmark_attention (README
// "landmark_attention"), in two implementations: "reference" (attention::reference_landmark_attention,
// double) and "fast" (attention::landmark_attention, f32 SIMD). Both produce `out` and `weights`.
#include <cstdint>

#include "golden/runner.hpp"
#include "mnemo/attention/landmark.hpp"

namespace {

namespace golden = mnemo::golden;
namespace attn = mnemo::attention;
using mnemo::tensor;

template <bool Reference>
golden::results landmark_attention(const golden::golden_case& c) {
  const std::int64_t B = c.dim("B"), H = c.dim("H"), L = c.dim("L"), D = c.dim("D"), Dv = c.dim("Dv");
  mnemo::detail::require(c.flag("causal"), "landmark_attention: only the causal form exists (params.causal = true)");
  const auto mem_freq = c.dim("mem_freq");
  const auto q = c.input<float, 4>("q", {B, H, L, D});
  const auto k = c.input<float, 4>("k", {B, H, L, D});
  const auto v = c.input<float, 4>("v", {B, H, L, Dv});
  const auto is_mem = c.input<std::int64_t, 1>("is_mem", {L});
  // The case's layout must be the one its params describe: a landmark after every mem_freq tokens.
  for (std::int64_t j = 0; j < L; ++j)
    mnemo::detail::require(is_mem(j) == ((j + 1) % (mem_freq + 1) == 0 ? 1 : 0),
                           "landmark_attention: is_mem does not follow params.mem_freq at position ", j);
  const auto scale = static_cast<float>(c.number("scale"));
  tensor<float, 4> out({B, H, L, Dv}), weights({B, H, L, L});
  if constexpr (Reference) attn::reference_landmark_attention(q, k, v, is_mem, out, weights, scale);
  else attn::landmark_attention(q, k, v, is_mem, out, weights, scale);
  golden::results r;
  r.add("out", mnemo::cview(out));
  r.add("weights", mnemo::cview(weights));
  return r;
}

[[maybe_unused]] const bool registered = golden::register_op("landmark_attention", "reference", landmark_attention<true>) &&
                                         golden::register_op("landmark_attention", "fast", landmark_attention<false>);

}  // namespace
