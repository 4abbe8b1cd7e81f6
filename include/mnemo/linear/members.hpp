// mnemo/linear/members.hpp — the member table of the linear family: every member named once, with
// what the tests, the benchmarks, the fuzzer and the golden runner need to run it without naming it.
//
// A member is a small struct (a row): its name, how it decays the state (gate), whether it has the
// delta rule's beta, whether it takes options.map / options.normalize (features), whether it reads
// inputs of other kinds (other_inputs), its default chunk, which of the inputs below it reads and in
// what order (args), and the functions that run it:
//
//   struct gla {
//     static constexpr const char* name = "gla";              // its golden op and bench op name
//     static constexpr gate_kind gate = gate_kind::channel;   // reads gk [B, H, L, Dk]
//     static constexpr bool beta = false, features = false, other_inputs = false;
//     static constexpr std::int64_t default_chunk = default_chunk_size;
//     static auto args(const auto& in) { return std::tuple(in.gk); }  // the arguments after q, k, v
//     static constexpr auto run = [](const auto&... a) { linear::gla(a...); };   // options.path: the form
//     static constexpr auto reference = [](const auto&... a) { linear::reference::gla(a...); };
//     static constexpr auto step = [](const auto&... a) { linear::gla_step(a...); };  // both forms
//   };
//
// Consumers iterate all_members (for_each, visit by index) or take a row as a value, and call it
// through run_member / reference_member / step_member (below) with q, k, v, the inputs, o and the
// state; the row's traits say which tests apply and which inputs to fill.
//
// Adding a member: its header, its row here (include the header above) and its name appended to
// all_members. Its functions must take (q, k, v, <args>, o, state, options) and its step
// (q, k, v, <one-token args>, o, state[, state_out], options), as every member here does. With only
// the input kinds below, that is all: the tests (tests/linear/test_util.hpp), the benchmark rows
// (bench/linear_rows.cpp), the fuzzer, the golden runner and the extremes test pick it up.
//
// A member with an input of a new kind (as RWKV-7's a and b [B, H, L, Dk], beside its per-channel
// log-decay, which is gk): add a field to member_inputs and token_inputs and to narrow() below,
// return it from args() (rwkv7: std::tuple(in.gk, in.a, in.b)) and set other_inputs = true. The
// consumers that build inputs field by field (test_util.hpp's problem, bench/linear_rows.cpp, the
// fuzzer, the extremes test) each fill the new field in a line or two; the golden runner leaves such
// a member out (tests/linear/golden_ops.hpp reads the inputs of the golden cases, which have none of
// it); the identities the extremes test checks for the gated and delta members (a gate of -inf
// resets the state, a gate of 0 is linear attention) skip rows with other_inputs. gate and beta keep
// their meaning (RWKV-7: channel, no beta). The new fields are f32 views, so through the table such a
// member runs on f32 q, k, v only when it wants them in q's element type (rwkv7 does; test_util.hpp's
// bf16 check leaves it to the member's own test).
//
// A member whose state is not [B, H, Df, Dv (+1)] or whose inputs are not q, k, v (Mamba-2's x, dt,
// B, C; MoM's router) needs a row whose run/reference/step adapt member_inputs to its own call, or
// stays out of all_members with its own tests.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "mnemo/core/tensor.hpp"
#include "mnemo/linear/common.hpp"
#include "mnemo/linear/delta_rule.hpp"
#include "mnemo/linear/gated_delta_rule.hpp"
#include "mnemo/linear/gla.hpp"
#include "mnemo/linear/kda.hpp"
#include "mnemo/linear/linear_attn.hpp"
#include "mnemo/linear/retention.hpp"
#include "mnemo/linear/rwkv7.hpp"
#include "mnemo/linear/simple_gla.hpp"

namespace mnemo::linear {

// How a member decays its state.
enum class gate_kind {
  none,     // no decay
  head,     // a fixed decay per head, gamma [H] in (0, 1] (retention)
  scalar,   // a log-gate per head and step, g [B, H, L], <= 0
  channel,  // a log-gate per key channel, gk [B, H, L, Dk], <= 0
};

// Every kind of input beside q, k, v, o and the state, for a whole sequence. A member reads the
// ones its args() names; the others may be empty.
struct member_inputs {
  view<const float, 1> gamma;  // [H]            gate_kind::head
  view<const float, 3> g;      // [B, H, L]      gate_kind::scalar
  view<const float, 4> gk;     // [B, H, L, Dk]  gate_kind::channel
  view<const float, 3> beta;   // [B, H, L]      beta
  view<const float, 4> a, b;   // [B, H, L, Dk]  RWKV-7's rank-one read and write vectors (f32 q, k, v only)
};

// The same for one token (the *_step functions).
struct token_inputs {
  view<const float, 1> gamma;  // [H]
  view<const float, 2> g;      // [B, H]
  view<const float, 3> gk;     // [B, H, Dk]
  view<const float, 2> beta;   // [B, H]
  view<const float, 3> a, b;   // [B, H, Dk]
};

// Tokens [t0, t0 + n) of every per-token input (gamma is per head and stays whole). Empty views
// stay empty.
inline member_inputs narrow(const member_inputs& in, std::int64_t t0, std::int64_t n) {
  auto cut = [&](const auto& x) { return x.empty() ? x : x.narrow(2, t0, n); };
  return {in.gamma, cut(in.g), cut(in.gk), cut(in.beta), cut(in.a), cut(in.b)};
}

// ---- the rows ----------------------------------------------------------------------------------

namespace members {

struct linear_attn {
  static constexpr const char* name = "linear_attn";
  static constexpr gate_kind gate = gate_kind::none;
  static constexpr bool beta = false, features = true, other_inputs = false;
  static constexpr std::int64_t default_chunk = default_chunk_size;
  static auto args(const auto&) { return std::tuple(); }
  static constexpr auto run = [](const auto&... a) { linear::linear_attn(a...); };
  static constexpr auto reference = [](const auto&... a) { linear::reference::linear_attn(a...); };
  static constexpr auto step = [](const auto&... a) { linear::linear_attn_step(a...); };
};

struct retention {
  static constexpr const char* name = "retention";
  static constexpr gate_kind gate = gate_kind::head;
  static constexpr bool beta = false, features = false, other_inputs = false;
  static constexpr std::int64_t default_chunk = default_chunk_size;
  static auto args(const auto& in) { return std::tuple(in.gamma); }
  static constexpr auto run = [](const auto&... a) { linear::retention(a...); };
  static constexpr auto reference = [](const auto&... a) { linear::reference::retention(a...); };
  static constexpr auto step = [](const auto&... a) { linear::retention_step(a...); };
};

struct simple_gla {
  static constexpr const char* name = "simple_gla";
  static constexpr gate_kind gate = gate_kind::scalar;
  static constexpr bool beta = false, features = false, other_inputs = false;
  static constexpr std::int64_t default_chunk = default_chunk_size;
  static auto args(const auto& in) { return std::tuple(in.g); }
  static constexpr auto run = [](const auto&... a) { linear::simple_gla(a...); };
  static constexpr auto reference = [](const auto&... a) { linear::reference::simple_gla(a...); };
  static constexpr auto step = [](const auto&... a) { linear::simple_gla_step(a...); };
};

struct gla {
  static constexpr const char* name = "gla";
  static constexpr gate_kind gate = gate_kind::channel;
  static constexpr bool beta = false, features = false, other_inputs = false;
  static constexpr std::int64_t default_chunk = default_chunk_size;
  static auto args(const auto& in) { return std::tuple(in.gk); }
  static constexpr auto run = [](const auto&... a) { linear::gla(a...); };
  static constexpr auto reference = [](const auto&... a) { linear::reference::gla(a...); };
  static constexpr auto step = [](const auto&... a) { linear::gla_step(a...); };
};

struct delta_rule {
  static constexpr const char* name = "delta_rule";
  static constexpr gate_kind gate = gate_kind::none;
  static constexpr bool beta = true, features = false, other_inputs = false;
  static constexpr std::int64_t default_chunk = delta_default_chunk_size;
  static auto args(const auto& in) { return std::tuple(in.beta); }
  static constexpr auto run = [](const auto&... a) { linear::delta_rule(a...); };
  static constexpr auto reference = [](const auto&... a) { linear::reference::delta_rule(a...); };
  static constexpr auto step = [](const auto&... a) { linear::delta_rule_step(a...); };
};

struct gated_delta_rule {
  static constexpr const char* name = "gated_delta_rule";
  static constexpr gate_kind gate = gate_kind::scalar;
  static constexpr bool beta = true, features = false, other_inputs = false;
  static constexpr std::int64_t default_chunk = delta_default_chunk_size;
  static auto args(const auto& in) { return std::tuple(in.g, in.beta); }
  static constexpr auto run = [](const auto&... a) { linear::gated_delta_rule(a...); };
  static constexpr auto reference = [](const auto&... a) { linear::reference::gated_delta_rule(a...); };
  static constexpr auto step = [](const auto&... a) { linear::gated_delta_rule_step(a...); };
};

struct kda {
  static constexpr const char* name = "kda";
  static constexpr gate_kind gate = gate_kind::channel;
  static constexpr bool beta = true, features = false, other_inputs = false;
  static constexpr std::int64_t default_chunk = delta_default_chunk_size;
  static auto args(const auto& in) { return std::tuple(in.gk, in.beta); }
  static constexpr auto run = [](const auto&... a) { linear::kda(a...); };
  static constexpr auto reference = [](const auto&... a) { linear::reference::kda(a...); };
  static constexpr auto step = [](const auto&... a) { linear::kda_step(a...); };
};

// RWKV-7's generalized delta rule: the per-channel log-decay is gk; a and b are of q's element type
// (f32 here: member_inputs holds f32 views), and options.use_qk_l2norm is rejected.
struct rwkv7 {
  static constexpr const char* name = "rwkv7";
  static constexpr gate_kind gate = gate_kind::channel;
  static constexpr bool beta = false, features = false, other_inputs = true;
  static constexpr std::int64_t default_chunk = rwkv7_default_chunk_size;
  static auto args(const auto& in) { return std::tuple(in.gk, in.a, in.b); }
  static constexpr auto run = [](const auto&... a) { linear::rwkv7(a...); };
  static constexpr auto reference = [](const auto&... a) { linear::reference::rwkv7(a...); };
  static constexpr auto step = [](const auto&... a) { linear::rwkv7_step(a...); };
};

}  // namespace members

// A list of rows: for_each(f) calls f(M{}) for each, visit(i, f) for the i-th.
template <class... Ms>
struct member_list {
  static constexpr std::size_t size = sizeof...(Ms);
  static constexpr std::array<const char*, size> names = {Ms::name...};
  template <class M>
  static constexpr bool contains = (std::is_same_v<M, Ms> || ...);

  template <class F>
  static void for_each(F&& f) {
    (f(Ms{}), ...);
  }
  template <class F>
  static void visit(std::size_t index, F&& f) {
    std::size_t i = 0;
    ((i++ == index ? void(f(Ms{})) : void()), ...);
  }
};

// The table: the members in order (the fuzzer decodes a member as its index here; append new ones).
using all_members = member_list<members::linear_attn, members::retention, members::simple_gla, members::gla,
                                members::delta_rule, members::gated_delta_rule, members::kda, members::rwkv7>;

// Member M's fast path on q, k, v [B, H, L, Dk / Dv]; options.path picks the form.
template <class M, class Q, class K, class V>
void run_member(M, const Q& q, const K& k, const V& v, const member_inputs& in, view<float, 4> o,
                view<float, 4> state, const options& opt) {
  std::apply([&](const auto&... x) { M::run(q, k, v, x..., o, state, opt); }, M::args(in));
}

// Member M's double-precision reference.
template <class M, class Q, class K, class V>
void reference_member(M, const Q& q, const K& k, const V& v, const member_inputs& in, view<float, 4> o,
                      view<float, 4> state, const options& opt) {
  std::apply([&](const auto&... x) { M::reference(q, k, v, x..., o, state, opt); }, M::args(in));
}

// One token of member M (q, k [B, H, Dk], v and o [B, H, Dv]), in place.
template <class M, class Q, class K, class V>
void step_member(M, const Q& q, const K& k, const V& v, const token_inputs& in, view<float, 3> o,
                 view<float, 4> state, const options& opt) {
  std::apply([&](const auto&... x) { M::step(q, k, v, x..., o, state, opt); }, M::args(in));
}

// One token out of place: reads state_in, writes state_out (the same view, or disjoint).
template <class M, class Q, class K, class V>
void step_member(M, const Q& q, const K& k, const V& v, const token_inputs& in, view<float, 3> o,
                 view<const float, 4> state_in, view<float, 4> state_out, const options& opt) {
  std::apply([&](const auto&... x) { M::step(q, k, v, x..., o, state_in, state_out, opt); }, M::args(in));
}

}  // namespace mnemo::linear
