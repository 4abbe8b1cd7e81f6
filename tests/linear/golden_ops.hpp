// tests/linear/golden_ops.hpp — the linear family's golden cases (../shared/golden, README
// "Linear / gated linear attention"), run by one of our implementations.
//
// Used by tests/golden/ops_linear.cpp (registers every op with the runner, mnemo_golden: run()
// compiles every member of linear::all_members) and by the GoogleTest files of tests/linear/ (which
// check the same cases case by case: run_member() compiles only the member they test).
//
// Params: B H L Dk Dv scale has_initial_state (+ use_qk_l2norm for the delta rules and kda, + gamma [H]
// for retention). Inputs q k v (+ g) (+ beta) (+ h0 when has_initial_state); outputs o, ht.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "golden/runner.hpp"
#include "mnemo/linear/members.hpp"

namespace mnemo::linear_golden {

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

// The ops: one per member of linear::all_members, named as the member, except the members with
// other_inputs (members.hpp), whose inputs run_member does not read (no golden case has them).
inline const std::vector<std::string>& ops() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    linear::all_members::for_each([&](auto m) {
      if (!m.other_inputs) n.push_back(m.name);
    });
    return n;
  }();
  return names;
}

// Chunk size of the chunked runs: smaller than every golden L, and not a divisor of most of them,
// so the cases cover full chunks and a partial last chunk.
inline constexpr std::int64_t golden_chunk = 16;

// Runs case `c` of member M's op with implementation `i`; returns o and ht. The inputs follow the
// row's gate and beta: gamma from params (gate_kind::head), g [B, H, L] (scalar) or [B, H, L, Dk]
// (channel), beta [B, H, L] and the use_qk_l2norm flag (beta).
template <class M>
golden::results run_member(M m, const golden::golden_case& c, impl i) {
  using mnemo::detail::require;
  static_assert(!M::other_inputs, "linear golden ops: read the member's other inputs here");
  const std::int64_t B = c.dim("B"), H = c.dim("H"), L = c.dim("L"), Dk = c.dim("Dk"), Dv = c.dim("Dv");
  const double scale = c.number("scale");
  require(scale > 0, "params.scale: expected > 0, got ", scale);

  linear::options opt;
  opt.scale = static_cast<float>(scale);
  opt.chunk_size = golden_chunk;
  opt.path = i == impl::chunked ? linear::form::chunked : linear::form::recurrent;
  if (M::beta) opt.use_qk_l2norm = c.flag("use_qk_l2norm");

  const auto q = c.input<float, 4>("q", {B, H, L, Dk});
  const auto k = c.input<float, 4>("k", {B, H, L, Dk});
  const auto v = c.input<float, 4>("v", {B, H, L, Dv});
  tensor<float, 4> o({B, H, L, Dv});
  tensor<float, 4> ht({B, H, Dk, Dv});
  if (c.flag("has_initial_state")) ht = c.input<float, 4>("h0", {B, H, Dk, Dv});

  tensor<float, 1> gamma;
  tensor<float, 3> g, beta;
  tensor<float, 4> gk;
  if (M::gate == linear::gate_kind::head) {
    const auto& gp = c.params().at("gamma");
    require(gp.is_array() && static_cast<std::int64_t>(gp.size()) == H, "params.gamma: expected ", H,
            " numbers (one per head), got ", gp.dump());
    gamma = tensor<float, 1>({H});
    for (std::int64_t h = 0; h < H; ++h) gamma(h) = gp[static_cast<std::size_t>(h)].get<float>();
  }
  if (M::gate == linear::gate_kind::scalar) g = c.input<float, 3>("g", {B, H, L});
  if (M::gate == linear::gate_kind::channel) gk = c.input<float, 4>("g", {B, H, L, Dk});
  if (M::beta) beta = c.input<float, 3>("beta", {B, H, L});
  const linear::member_inputs in{gamma, g, gk, beta, {}, {}};  // no a, b: no row here has other inputs

  if (i == impl::reference)
    linear::reference_member(m, q, k, v, in, o, ht, opt);
  else
    linear::run_member(m, q, k, v, in, o, ht, opt);
  golden::results r;
  r.add("o", o);
  r.add("ht", ht);
  return r;
}

// Runs case `c` (whose op is one of ops()) with implementation `i`: every member is compiled. A
// template, so the test files that include this header (and call run_member for their member) do
// not compile every member too: as an inline function its body instantiated all seven in each
// (+4 s of the 24 s compile of tests/linear/kda_test.cpp).
template <class Members = linear::all_members>
golden::results run(const golden::golden_case& c, impl i) {
  golden::results r;
  bool found = false;
  Members::for_each([&](auto m) {
    if constexpr (!decltype(m)::other_inputs) {
      if (c.op() != decltype(m)::name) return;
      r = run_member(m, c, i);
      found = true;
    }
  });
  if (!found) mnemo::detail::fail("linear golden ops: unknown op '", c.op(), "'");
  return r;
}

}  // namespace mnemo::linear_golden
