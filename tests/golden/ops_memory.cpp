// Golden ops of the memory modules: titans_memory (memory/neural_memory.hpp) and pkm
// (memory/product_keys.hpp), each in two implementations, "reference" (double) and "fast" (f32).
// The case-by-case plumbing is tests/memory/golden_ops.hpp, shared with tests/memory/*_test.cpp.
#include <string>

#include "golden/runner.hpp"
#include "memory/golden_ops.hpp"

namespace {

namespace golden = mnemo::golden;
namespace mg = mnemo::memory_golden;

bool register_all() {
  for (const std::string& op : mg::ops())
    for (mg::path p : {mg::path::reference, mg::path::fast})
      golden::register_op(op, mg::path_name(p), [p](const golden::golden_case& c) { return mg::run(c, p); });
  return true;
}

[[maybe_unused]] const bool registered = register_all();

}  // namespace
