// bench/memory_common.hpp — what the memory-module rows share (memory_rows.cpp,
// memory_segment_rows.cpp, memory_slot_rows.cpp, memory_retrieval_rows.cpp):
//
//   add_row(impl, module, {{key, value}, ...}, body)
//       registers memory/<impl>/module:<module>/<key>:<value>/.../threads:<t> for every thread
//       count of thread_counts(); body(state, t) runs the row (skipped when t threads are not
//       available);
//   set_token_counters(state, tokens, flops, label)
//       tokens/s (tokens per iteration: the figure the memory rows compare), FLOP/s (flops per
//       iteration, no bytes) and the label.
#pragma once

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include "common.hpp"

namespace mnemo::bench {

inline void set_token_counters(benchmark::State& state, double tokens, double flops, const std::string& label) {
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  set_rate_counters(state, flops, 0);
  state.SetLabel(label);
}

template <class Body>
void add_row(const std::string& impl, const std::string& module,
             std::initializer_list<std::pair<std::string_view, std::string>> keys, Body body) {
  for (int t : thread_counts()) {
    std::string name = row_name("memory", impl, {{"module", module}});
    for (const auto& [k, v] : keys) append_param(name, k, v);
    append_param(name, "threads", std::to_string(t));
    register_row(name, [body, t](benchmark::State& state) {
      if (threads_available(state, t)) body(state, t);
    });
  }
}

}  // namespace mnemo::bench
