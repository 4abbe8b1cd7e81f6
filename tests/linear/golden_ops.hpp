// tests/linear/golden_ops.hpp — the linear family's golden cases (../shared/golden, README
// "Linear / gated linear attention"), run by one of our implementations.
//
// Used by tests/golden/ops_linear.cpp (registers every op with the runner, mnemo_golden) and by
// the GoogleTest files of tests/linear/ (which check the same cases case by case).
//
// Params: B H L Dk Dv scale has_initial_state (+ use_qk_l2norm for the delta rules and kda, + gamma [H]
// for retention). Inputs q k v (+ g) (+ beta) (+ h0 when has_initial_state); outputs o, ht.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "golden/runner.hpp"
#include "mnemo/linear/delta_rule.hpp"
#include "mnemo/linear/gated_delta_rule.hpp"
#include "mnemo/linear/gla.hpp"
#include "mnemo/linear/kda.hpp"
#include "mnemo/linear/linear_attn.hpp"
#include "mnemo/linear/retention.hpp"
#include "mnemo/linear/simple_gla.hpp"

namespace mnemo::linear_golden {

// The members, and which of them this translation unit compiles. Each member instantiates its
// reference and both fast forms at several element types; a test file that defines
// MNEMO_LINEAR_TEST_MEMBERS (a comma-separated list of member names, before its includes) builds
// only those, so the six linear test executables do not each compile all six members (CI compile
// time). mnemo_golden defines nothing and builds all of them.
enum class member { linear_attn, retention, simple_gla, gla, delta_rule, gated_delta_rule, kda };

constexpr bool built(member m) {
#ifdef MNEMO_LINEAR_TEST_MEMBERS
  using enum member;
  for (member b : {MNEMO_LINEAR_TEST_MEMBERS})
    if (b == m) return true;
  return false;
#else
  (void)m;
  return true;
#endif
}

// Which of our implementations runs a case.
enum class impl { reference, recurrent, chunked };

inline const char* impl_name(impl i) {
  switch (i) {
    case impl::reference: return "reference";
    case impl::recurrent: return "recurrent";
    case impl::chunked: return "chunked";
  }
  return "?";
}

inline const std::vector<std::string>& ops() {
  static const std::vector<std::string> names = {"linear_attn", "retention", "simple_gla",
                                                 "gla",         "delta_rule", "gated_delta_rule", "kda"};
  return names;
}

// Chunk size of the chunked runs: smaller than every golden L, and not a divisor of most of them,
// so the cases cover full chunks and a partial last chunk.
inline constexpr std::int64_t golden_chunk = 16;

// Runs case `c` (whose op is one of ops()) with implementation `i`; returns o and ht.
inline golden::results run(const golden::golden_case& c, impl i) {
  using mnemo::detail::require;
  const std::string& op = c.op();
  const std::int64_t B = c.dim("B"), H = c.dim("H"), L = c.dim("L"), Dk = c.dim("Dk"), Dv = c.dim("Dv");
  const double scale = c.number("scale");
  require(scale > 0, "params.scale: expected > 0, got ", scale);

  linear::options opt;
  opt.scale = static_cast<float>(scale);
  opt.chunk_size = golden_chunk;
  opt.path = i == impl::chunked ? linear::form::chunked : linear::form::recurrent;
  if (op == "delta_rule" || op == "gated_delta_rule" || op == "kda") opt.use_qk_l2norm = c.flag("use_qk_l2norm");

  const auto q = c.input<float, 4>("q", {B, H, L, Dk});
  const auto k = c.input<float, 4>("k", {B, H, L, Dk});
  const auto v = c.input<float, 4>("v", {B, H, L, Dv});
  tensor<float, 4> o({B, H, L, Dv});
  tensor<float, 4> ht({B, H, Dk, Dv});
  if (c.flag("has_initial_state")) ht = c.input<float, 4>("h0", {B, H, Dk, Dv});
  const bool ref = i == impl::reference;

  // `if constexpr` keeps the members this file does not build from being compiled at all.
  auto not_built = [&] { mnemo::detail::fail("linear golden ops: op '", op, "' is not built in this executable"); };
  if (op == "linear_attn") {
    if constexpr (built(member::linear_attn)) {
      ref ? linear::reference::linear_attn(q, k, v, o, ht, opt) : linear::linear_attn(q, k, v, o, ht, opt);
    } else {
      not_built();
    }
  } else if (op == "retention") {
    if constexpr (built(member::retention)) {
      const auto& gp = c.params().at("gamma");
      require(gp.is_array() && static_cast<std::int64_t>(gp.size()) == H, "params.gamma: expected ", H,
              " numbers (one per head), got ", gp.dump());
      tensor<float, 1> gamma({H});
      for (std::int64_t h = 0; h < H; ++h) gamma(h) = gp[static_cast<std::size_t>(h)].get<float>();
      ref ? linear::reference::retention(q, k, v, gamma, o, ht, opt) : linear::retention(q, k, v, gamma, o, ht, opt);
    } else {
      not_built();
    }
  } else if (op == "simple_gla") {
    if constexpr (built(member::simple_gla)) {
      const auto g = c.input<float, 3>("g", {B, H, L});
      ref ? linear::reference::simple_gla(q, k, v, g, o, ht, opt) : linear::simple_gla(q, k, v, g, o, ht, opt);
    } else {
      not_built();
    }
  } else if (op == "gla") {
    if constexpr (built(member::gla)) {
      const auto g = c.input<float, 4>("g", {B, H, L, Dk});
      ref ? linear::reference::gla(q, k, v, g, o, ht, opt) : linear::gla(q, k, v, g, o, ht, opt);
    } else {
      not_built();
    }
  } else if (op == "delta_rule") {
    if constexpr (built(member::delta_rule)) {
      const auto beta = c.input<float, 3>("beta", {B, H, L});
      ref ? linear::reference::delta_rule(q, k, v, beta, o, ht, opt) : linear::delta_rule(q, k, v, beta, o, ht, opt);
    } else {
      not_built();
    }
  } else if (op == "gated_delta_rule") {
    if constexpr (built(member::gated_delta_rule)) {
      const auto g = c.input<float, 3>("g", {B, H, L});
      const auto beta = c.input<float, 3>("beta", {B, H, L});
      ref ? linear::reference::gated_delta_rule(q, k, v, g, beta, o, ht, opt)
          : linear::gated_delta_rule(q, k, v, g, beta, o, ht, opt);
    } else {
      not_built();
    }
  } else if (op == "kda") {
    if constexpr (built(member::kda)) {
      const auto g = c.input<float, 4>("g", {B, H, L, Dk});
      const auto beta = c.input<float, 3>("beta", {B, H, L});
      ref ? linear::reference::kda(q, k, v, g, beta, o, ht, opt) : linear::kda(q, k, v, g, beta, o, ht, opt);
    } else {
      not_built();
    }
  } else {
    mnemo::detail::fail("linear golden ops: unknown op '", op, "'");
  }
  golden::results r;
  r.add("o", o);
  r.add("ht", ht);
  return r;
}

}  // namespace mnemo::linear_golden
