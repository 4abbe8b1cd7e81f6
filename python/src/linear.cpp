// python/src/linear.cpp — mnemo.linear: every member of the linear family's member table
// (linear/members.hpp: linear_attn, retention, simple_gla, gla, delta_rule, gated_delta_rule, kda,
// rwkv7) by name, in both forms (recurrent, chunked) and the double-precision reference, with the
// state in and out, and the one-token steps; causal_conv1d and selective_scan (Mamba-1).
#include <optional>
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/linear/causal_conv1d.hpp"
#include "mnemo/linear/members.hpp"
#include "mnemo/linear/selective_scan.hpp"

namespace mnemo::py {

namespace {

using pyb::arg;
namespace lin = mnemo::linear;

lin::form form_of(const std::string& s, const char* fn) {
  if (s == "auto" || s == "automatic") return lin::form::automatic;
  if (s == "recurrent") return lin::form::recurrent;
  if (s == "chunked") return lin::form::chunked;
  mnemo::detail::fail("mnemo.", fn, ": argument form: expected 'auto', 'recurrent' or 'chunked', got '", s, "'");
}

lin::feature_map map_of(const std::string& s, const char* fn) {
  if (s == "identity") return lin::feature_map::identity;
  if (s == "elu_plus_one") return lin::feature_map::elu_plus_one;
  if (s == "relu") return lin::feature_map::relu;
  if (s == "taylor2") return lin::feature_map::taylor2;
  mnemo::detail::fail("mnemo.", fn, ": argument feature_map: expected identity, elu_plus_one, relu or taylor2, got '", s, "'");
}

std::string member_names() {
  std::string n;
  lin::all_members::for_each([&](auto m) { n += (n.empty() ? "" : ", ") + std::string(decltype(m)::name); });
  return n;
}

// Calls f(M{}) for the member named `name`, or mnemo.Error.
template <class F>
void with_member(const std::string& name, const char* fn, F&& f) {
  bool found = false;
  lin::all_members::for_each([&](auto m) {
    if (!found && name == decltype(m)::name) {
      found = true;
      f(m);
    }
  });
  if (!found) mnemo::detail::fail("mnemo.", fn, ": argument name: expected one of ", member_names(), ", got '", name, "'");
}

struct lin_kwargs {
  float scale;
  std::int64_t chunk_size;
  std::string form;
  bool use_qk_l2norm;
  std::string feature_map;
  bool normalize;
  int threads;
};

lin::options options_of(const lin_kwargs& kw, const char* fn) {
  lin::options opt;
  opt.scale = kw.scale;
  opt.chunk_size = kw.chunk_size;
  opt.path = form_of(kw.form, fn);
  opt.use_qk_l2norm = kw.use_qk_l2norm;
  opt.map = map_of(kw.feature_map, fn);
  opt.normalize = kw.normalize;
  opt.threads = kw.threads;
  return opt;
}

// The state: h0 given -> a copy in a new array (the op writes the final state there); else zeros.
// state= given -> that array, updated in place.
std::pair<pyb::object, view<float, 4>> state_of(const char* fn, pyb::handle h0, pyb::handle state, const shape_t<4>& s) {
  if (!state.is_none()) {
    if (!h0.is_none()) mnemo::detail::fail("mnemo.", fn, ": arguments h0 and state: pass one of them (state is updated in place)");
    return output<float, 4>(state, fn, "state", s, "[B, H, Dk, Dv]");
  }
  out_array<float, 4> st(s);
  std::fill_n(st.v.data(), st.v.size(), 0.0f);
  if (!h0.is_none()) {
    const auto h = read(h0, fn, "h0").as<const float, 4>("[B, H, Dk, Dv]");
    if (h.shape() != s)
      mnemo::detail::fail("mnemo.", fn, ": argument h0: expected shape ", shape_string(s), " [B, H, Dk, Dv], got ",
                          shape_string(h.shape()));
    for (std::int64_t b = 0; b < s[0]; ++b)
      for (std::int64_t hh = 0; hh < s[1]; ++hh)
        for (std::int64_t i = 0; i < s[2]; ++i) std::copy_n(h.ptr(b, hh, i), s[3], st.v.ptr(b, hh, i));
  }
  return {st.array, st.v};
}

}  // namespace

void bind_linear(pyb::module_& root) {
  auto m = root.def_submodule("linear", "The linear-attention family, causal_conv1d and selective_scan.");

  m.def(
      "names",
      [] {
        std::vector<std::string> n;
        lin::all_members::for_each([&](auto mm) { n.emplace_back(decltype(mm)::name); });
        return n;
      },
      "The members of the linear family, in the member table's order.");
  m.def(
      "member_info",
      [](const std::string& name) {
        pyb::dict d;
        with_member(name, "linear.member_info", [&](auto mm) {
          using M = decltype(mm);
          constexpr const char* gates[] = {"none", "head", "scalar", "channel"};
          d["name"] = std::string(M::name);
          d["gate"] = gates[static_cast<int>(M::gate)];
          d["beta"] = M::beta;
          d["features"] = M::features;
          d["other_inputs"] = M::other_inputs;
          d["default_chunk"] = M::default_chunk;
        });
        return d;
      },
      arg("name"),
      "A member's traits: gate 'none' | 'head' (gamma [H]) | 'scalar' (g [B, H, L]) | 'channel' (g [B, H, L, Dk]); "
      "beta (beta [B, H, L]); features (feature_map, normalize); other_inputs (rwkv7's a, b [B, H, L, Dk]).");

  m.def(
      "run",
      [](const std::string& name, pyb::handle q_o, pyb::handle k_o, pyb::handle v_o, pyb::handle gamma_o, pyb::handle g_o,
         pyb::handle beta_o, pyb::handle a_o, pyb::handle b_o, pyb::handle h0, pyb::handle state_o, bool reference,
         float scale, std::int64_t chunk_size, std::string form, bool use_qk_l2norm, std::string feature_map,
         bool normalize, int threads) {
        const char* fn = "linear.run";
        const auto q = read(q_o, fn, "q").as<const float, 4>("[B, H, L, Dk]");
        const auto k = read(k_o, fn, "k").as<const float, 4>("[B, H, L, Dk]");
        const auto v = read(v_o, fn, "v").as<const float, 4>("[B, H, L, Dv]");
        const lin::options opt =
            options_of({scale, chunk_size, form, use_qk_l2norm, feature_map, normalize, threads}, fn);
        const std::int64_t B = q.extent(0), H = q.extent(1), L = q.extent(2), Dk = q.extent(3), Dv = v.extent(3);
        lin::member_inputs in;
        in.gamma = read(gamma_o, fn, "gamma").maybe<const float, 1>("[H]");
        in.beta = read(beta_o, fn, "beta").maybe<const float, 3>("[B, H, L]");
        in.a = read(a_o, fn, "a").maybe<const float, 4>("[B, H, L, Dk]");
        in.b = read(b_o, fn, "b").maybe<const float, 4>("[B, H, L, Dk]");
        const in_arg g = read(g_o, fn, "g");
        out_array<float, 4> o({B, H, L, Dv});
        auto [state_py, state] = state_of(fn, h0, state_o, {B, H, Dk, Dv});
        with_member(name, fn, [&](auto mm) {
          using M = decltype(mm);
          if constexpr (M::gate == lin::gate_kind::scalar) in.g = g.maybe<const float, 3>("[B, H, L] (a log-gate per head and step)");
          if constexpr (M::gate == lin::gate_kind::channel) in.gk = g.maybe<const float, 4>("[B, H, L, Dk] (a log-gate per key channel)");
          if constexpr (M::gate == lin::gate_kind::none || M::gate == lin::gate_kind::head)
            if (g.present) g.fail(std::string("member ") + M::name + " takes no g");
          pyb::gil_scoped_release release;
          if (reference) lin::reference_member(mm, q, k, v, in, o.v, state, opt);
          else lin::run_member(mm, q, k, v, in, o.v, state, opt);
        });
        return pyb::make_tuple(o.array, state_py);
      },
      arg("name"), arg("q"), arg("k"), arg("v"), pyb::kw_only(), arg("gamma") = pyb::none(), arg("g") = pyb::none(),
      arg("beta") = pyb::none(), arg("a") = pyb::none(), arg("b") = pyb::none(), arg("h0") = pyb::none(),
      arg("state") = pyb::none(), arg("reference") = false, arg("scale") = 0.0f, arg("chunk_size") = 0,
      arg("form") = "auto", arg("use_qk_l2norm") = false, arg("feature_map") = "identity", arg("normalize") = false,
      arg("threads") = 0,
      "Member `name` of the linear family on q, k [B, H, L, Dk], v [B, H, L, Dv] (head-first), with its gate "
      "(gamma [H], g [B, H, L] or [B, H, L, Dk]), beta [B, H, L], rwkv7's a, b. The state starts at h0 [B, H, Dk, "
      "Dv] (default zeros) or at state= (updated in place). Every member writes S_t then reads o_t = (scale q_t)^T "
      "S_t. form: 'auto' | 'recurrent' | 'chunked' (chunk_size 0: the member's default); reference=True: the "
      "double-precision recurrence. Returns (o [B, H, L, Dv], final state [B, H, Dk, Dv]).");

  m.def(
      "step",
      [](const std::string& name, pyb::handle q_o, pyb::handle k_o, pyb::handle v_o, pyb::handle state_o,
         pyb::handle gamma_o, pyb::handle g_o, pyb::handle beta_o, pyb::handle a_o, pyb::handle b_o, float scale,
         bool use_qk_l2norm, std::string feature_map, bool normalize, int threads) {
        const char* fn = "linear.step";
        const auto q = read(q_o, fn, "q").as<const float, 3>("[B, H, Dk]");
        const auto k = read(k_o, fn, "k").as<const float, 3>("[B, H, Dk]");
        const auto v = read(v_o, fn, "v").as<const float, 3>("[B, H, Dv]");
        const auto state = read(state_o, fn, "state").as<float, 4>("[B, H, Dk, Dv] (updated in place)");
        const lin::options opt = options_of({scale, 0, "auto", use_qk_l2norm, feature_map, normalize, threads}, fn);
        lin::token_inputs in;
        in.gamma = read(gamma_o, fn, "gamma").maybe<const float, 1>("[H]");
        in.beta = read(beta_o, fn, "beta").maybe<const float, 2>("[B, H]");
        in.a = read(a_o, fn, "a").maybe<const float, 3>("[B, H, Dk]");
        in.b = read(b_o, fn, "b").maybe<const float, 3>("[B, H, Dk]");
        const in_arg g = read(g_o, fn, "g");
        out_array<float, 3> o({q.extent(0), q.extent(1), v.extent(2)});
        with_member(name, fn, [&](auto mm) {
          using M = decltype(mm);
          if constexpr (M::gate == lin::gate_kind::scalar) in.g = g.maybe<const float, 2>("[B, H]");
          if constexpr (M::gate == lin::gate_kind::channel) in.gk = g.maybe<const float, 3>("[B, H, Dk]");
          pyb::gil_scoped_release release;
          lin::step_member(mm, q, k, v, in, o.v, state, opt);
        });
        return o.array;
      },
      arg("name"), arg("q"), arg("k"), arg("v"), arg("state"), pyb::kw_only(), arg("gamma") = pyb::none(),
      arg("g") = pyb::none(), arg("beta") = pyb::none(), arg("a") = pyb::none(), arg("b") = pyb::none(),
      arg("scale") = 0.0f, arg("use_qk_l2norm") = false, arg("feature_map") = "identity", arg("normalize") = false,
      arg("threads") = 0,
      "One token of member `name`: q, k [B, H, Dk], v [B, H, Dv], the one-token gate / beta / a / b; state [B, H, "
      "Dk, Dv] is updated in place. Returns o [B, H, Dv].");

  m.def(
      "causal_conv1d",
      [](pyb::handle x_o, pyb::handle w_o, pyb::handle bias_o, pyb::handle init_o, const std::string& activation,
         bool reference, int threads) {
        const char* fn = "linear.causal_conv1d";
        const auto x = read(x_o, fn, "x").as<const float, 3>("[B, Dm, L]");
        const auto w = read(w_o, fn, "weight").as<const float, 2>("[Dm, W]");
        const auto bias = read(bias_o, fn, "bias").maybe<const float, 1>("[Dm]");
        lin::conv1d_options opt;
        if (activation == "silu") opt.activation = lin::conv_activation::silu;
        else if (activation != "none")
          mnemo::detail::fail("mnemo.", fn, ": argument activation: expected 'none' or 'silu', got '", activation, "'");
        opt.threads = threads;
        const std::int64_t B = x.extent(0), Dm = x.extent(1), L = x.extent(2), W = w.extent(1);
        out_array<float, 3> y({B, Dm, L});
        out_array<float, 3> fin({B, Dm, W >= 1 ? W - 1 : 0});
        const auto init = read(init_o, fn, "initial_states").maybe<const float, 3>("[B, Dm, W-1]");
        {
          pyb::gil_scoped_release release;
          if (reference) lin::reference::causal_conv1d(x, w, bias, y.v, init, fin.v, opt);
          else lin::causal_conv1d(x, w, bias, y.v, init, fin.v, opt);
        }
        return pyb::make_tuple(y.array, fin.array);
      },
      arg("x"), arg("weight"), pyb::kw_only(), arg("bias") = pyb::none(), arg("initial_states") = pyb::none(),
      arg("activation") = "none", arg("reference") = false, arg("threads") = 0,
      "Causal depthwise conv1d (causal-conv1d's convention: weight[:, W-1] multiplies the current input): x [B, Dm, "
      "L], weight [Dm, W], bias [Dm], initial_states [B, Dm, W-1]; activation 'none' or 'silu' after the bias. "
      "Returns (y [B, Dm, L], final_states [B, Dm, W-1]: the last W-1 raw inputs).");

  m.def(
      "selective_scan",
      [](pyb::handle u_o, pyb::handle delta_o, pyb::handle A_o, pyb::handle B_o, pyb::handle C_o, pyb::handle D_o,
         pyb::handle z_o, pyb::handle db_o, pyb::handle h0_o, bool delta_softplus, bool reference, int threads) {
        const char* fn = "linear.selective_scan";
        const auto u = read(u_o, fn, "u").as<const float, 3>("[B, Dm, L]");
        const auto delta = read(delta_o, fn, "delta").as<const float, 3>("[B, Dm, L]");
        const auto A = read(A_o, fn, "A").as<const float, 2>("[Dm, N]");
        const auto Bm = read(B_o, fn, "Bm").as<const float, 4>("[B, G, N, L]");
        const auto Cm = read(C_o, fn, "Cm").as<const float, 4>("[B, G, N, L]");
        const auto D = read(D_o, fn, "D").maybe<const float, 1>("[Dm]");
        const auto z = read(z_o, fn, "z").maybe<const float, 3>("[B, Dm, L]");
        const auto db = read(db_o, fn, "delta_bias").maybe<const float, 1>("[Dm]");
        const std::int64_t Bn = u.extent(0), Dm = u.extent(1), L = u.extent(2), N = A.extent(1);
        out_array<float, 3> y({Bn, Dm, L});
        out_array<float, 3> state({Bn, Dm, N});
        std::fill_n(state.v.data(), state.v.size(), 0.0f);
        if (!h0_o.is_none()) {
          const auto h0 = read(h0_o, fn, "h0").as<const float, 3>("[B, Dm, N]");
          if (h0.shape() != state.v.shape())
            mnemo::detail::fail("mnemo.", fn, ": argument h0: expected shape ", shape_string(state.v.shape()),
                                " [B, Dm, N], got ", shape_string(h0.shape()));
          for (std::int64_t b = 0; b < Bn; ++b)
            for (std::int64_t d = 0; d < Dm; ++d) std::copy_n(h0.ptr(b, d, 0), N, state.v.ptr(b, d, 0));
        }
        const lin::selective_scan_options opt{delta_softplus, threads};
        {
          pyb::gil_scoped_release release;
          if (reference) lin::reference::selective_scan(u, delta, A, Bm, Cm, D, z, db, y.v, state.v, opt);
          else lin::selective_scan(u, delta, A, Bm, Cm, D, z, db, y.v, state.v, opt);
        }
        return pyb::make_tuple(y.array, state.array);
      },
      arg("u"), arg("delta"), arg("A"), arg("Bm"), arg("Cm"), pyb::kw_only(), arg("D") = pyb::none(),
      arg("z") = pyb::none(), arg("delta_bias") = pyb::none(), arg("h0") = pyb::none(), arg("delta_softplus") = false,
      arg("reference") = false, arg("threads") = 0,
      "Mamba-1's selective scan: u, delta [B, Dm, L], A [Dm, N], Bm, Cm [B, G, N, L], D [Dm], z [B, Dm, L], "
      "delta_bias [Dm], h0 [B, Dm, N]. Returns (y [B, Dm, L], last_state [B, Dm, N]).");
}

}  // namespace mnemo::py
