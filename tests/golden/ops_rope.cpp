// Golden op of the rotary embedding (README "rope_scaled"): x [B, H, L, D] rotated to positions
// [L] with the scheme's frequencies and attention factor, half-split pairs on the first
// rotary_dim channels. Two implementations: "reference" (kvcache::reference::apply_rope, double)
// and "fast" (kvcache::apply_rope, f32 rotation). The [B, H] heads are one [B * H] axis.
#include <cstdint>
#include <string>

#include "golden/runner.hpp"
#include "mnemo/kvcache/rope.hpp"

namespace {

namespace golden = mnemo::golden;
namespace kv = mnemo::kvcache;
using mnemo::tensor;
using mnemo::view;

enum class path { reference, fast };

kv::rope_scaling scheme_of(const std::string& s) {
  if (s == "default") return kv::rope_scaling::none;
  if (s == "linear") return kv::rope_scaling::linear;
  if (s == "dynamic") return kv::rope_scaling::dynamic;
  if (s == "yarn") return kv::rope_scaling::yarn;
  if (s == "llama3") return kv::rope_scaling::llama3;
  if (s == "longrope") return kv::rope_scaling::longrope;
  mnemo::detail::fail("params.scheme: expected default, linear, dynamic, yarn, llama3 or longrope, got ", s);
}

golden::results rope_scaled(const golden::golden_case& c, path p) {
  const auto B = c.dim("B"), H = c.dim("H"), L = c.dim("L"), D = c.dim("D");
  const auto& params = c.params();
  const std::string layout = params.at("layout").get<std::string>();
  mnemo::detail::require(layout == "half" || layout == "interleaved",
                         "params.layout: expected half or interleaved, got ", layout);
  const auto given = [&](const char* key) { return params.contains(key) && !params.at(key).is_null(); };
  kv::rope r;
  r.dim = c.dim("rotary_dim");
  r.base = c.number("base");
  r.layout = layout == "half" ? kv::rope_layout::half_split : kv::rope_layout::interleaved;
  r.scaling = scheme_of(params.at("scheme").get<std::string>());
  if (given("factor")) r.factor = c.number("factor");
  if (given("original_max_position_embeddings")) r.original_context = c.dim("original_max_position_embeddings");
  if (given("seq_len")) r.seq_len = c.dim("seq_len");
  if (given("beta_fast")) r.beta_fast = c.number("beta_fast");
  if (given("beta_slow")) r.beta_slow = c.number("beta_slow");
  if (given("attention_factor")) r.attention_factor = c.number("attention_factor");
  if (given("low_freq_factor")) r.low_freq_factor = c.number("low_freq_factor");
  if (given("high_freq_factor")) r.high_freq_factor = c.number("high_freq_factor");
  tensor<float, 4> y = c.input<float, 4>("x", {B, H, L, D});
  const auto positions = c.input<std::int64_t, 1>("positions", {L});
  const std::span<const std::int64_t> pos(positions.data(), static_cast<std::size_t>(L));
  const view<float, 3> rows(y.data(), {B * H, L, D});
  if (p == path::reference) kv::reference::apply_rope(r, rows, pos);
  else kv::apply_rope(r, rows, pos);
  golden::results out;
  out.add("y", y);
  return out;
}

[[maybe_unused]] const bool registered_reference =
    golden::register_op("rope_scaled", "reference", [](const golden::golden_case& c) { return rope_scaled(c, path::reference); });
[[maybe_unused]] const bool registered_fast =
    golden::register_op("rope_scaled", "fast", [](const golden::golden_case& c) { return rope_scaled(c, path::fast); });

}  // namespace
