// Golden ops of the KV-cache policies: kv_streaming_llm, kv_snapkv, kv_observed_attention,
// kv_tova, kv_knorm, kv_qfilter, kv_think (README "KV-cache selection policies"), through
// kvcache/policies. Ops that score with attention probabilities run once per source of the
// attention column sums: "flash", "reference", and "decode" for TOVA (one query row); the
// others run once ("policy"). The plumbing is tests/kvcache/policies_golden_ops.hpp, shared with
// tests/kvcache/policies_test.cpp.
#include <string>

#include "golden/runner.hpp"
#include "kvcache/policies_golden_ops.hpp"

namespace {

namespace golden = mnemo::golden;
namespace kg = mnemo::kv_golden;

bool register_all() {
  for (const std::string& op : kg::ops()) {
    if (!kg::uses_attention(op)) {
      golden::register_op(op, "policy", [](const golden::golden_case& c) { return kg::run(c, kg::path::reference); });
      continue;
    }
    for (kg::path p : {kg::path::flash, kg::path::reference, kg::path::decode}) {
      if (p == kg::path::decode && op != "kv_tova") continue;
      golden::register_op(op, kg::path_name(p), [p](const golden::golden_case& c) { return kg::run(c, p); });
    }
  }
  return true;
}

[[maybe_unused]] const bool registered = register_all();

}  // namespace
