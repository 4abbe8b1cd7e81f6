// Golden ops of the linear family: one per member of the member table, linear::all_members
// (mnemo/linear/members.hpp: linear_attn, retention, simple_gla, gla, delta_rule, gated_delta_rule,
// kda; README "Linear / gated linear attention"; not rwkv7, which has no golden cases: the rows with
// other inputs are left out, tests/linear/golden_ops.hpp), each in three implementations:
// "recurrent" and "chunked" (the two forms of include/mnemo/linear/, forced through
// options.path; the chunked runs use 16-token chunks so every case has several chunks and most a
// partial last one) and "reference" (the double-precision recurrences).
// The case-by-case plumbing is tests/linear/golden_ops.hpp, shared with tests/linear/*_test.cpp.
#include <string>

#include "golden/runner.hpp"
#include "linear/golden_ops.hpp"

namespace {

namespace golden = mnemo::golden;
namespace lg = mnemo::linear_golden;

bool register_all() {
  for (const std::string& op : lg::ops())
    for (lg::impl i : {lg::impl::recurrent, lg::impl::chunked, lg::impl::reference})
      golden::register_op(op, lg::impl_name(i), [i](const golden::golden_case& c) { return lg::run(c, i); });
  return true;
}

[[maybe_unused]] const bool registered = register_all();

}  // namespace
