// Golden ops of the state-space front-ends (README "causal_conv1d" and "selective_scan: Mamba-1"),
// each in three implementations: "reference" (the double-precision loops), "fast" (the SIMD path)
// and "step" (the one-token step of the fast path, token by token from the initial state, so
// every case also checks that steps continue each other exactly like the full op).
#include <algorithm>
#include <cstdint>
#include <string>

#include "golden/runner.hpp"
#include "mnemo/linear/causal_conv1d.hpp"
#include "mnemo/linear/selective_scan.hpp"

namespace {

namespace golden = mnemo::golden;
namespace linear = mnemo::linear;
using mnemo::tensor;
using mnemo::view;

enum class path { reference, fast, step };

// [B, C, L] -> the [B, C] column of token t (a copy: the step takes contiguous rows).
template <int R>
tensor<float, R - 1> column(const tensor<float, R>& x, std::int64_t t) {
  static_assert(R == 3 || R == 4, "column: rank 3 or 4");
  mnemo::shape_t<R - 1> s{};
  for (int i = 0; i < R - 1; ++i) s[i] = x.extent(i);
  tensor<float, R - 1> out(s);
  const std::int64_t L = x.extent(R - 1);
  for (std::int64_t i = 0; i < out.size(); ++i) out.data()[i] = x.data()[i * L + t];
  return out;
}

template <int R>
void set_column(tensor<float, R>& x, std::int64_t t, const tensor<float, R - 1>& col) {
  const std::int64_t L = x.extent(R - 1);
  for (std::int64_t i = 0; i < col.size(); ++i) x.data()[i * L + t] = col.data()[i];
}

golden::results causal_conv1d(const golden::golden_case& c, path p) {
  const auto B = c.dim("B"), Dm = c.dim("Dm"), L = c.dim("L"), W = c.dim("W");
  const auto x = c.input<float, 3>("x", {B, Dm, L});
  const auto weight = c.input<float, 2>("weight", {Dm, W});
  tensor<float, 1> bias;
  if (c.flag("bias")) bias = c.input<float, 1>("bias", {Dm});
  const std::string act = c.params().at("activation").get<std::string>();
  mnemo::detail::require(act == "none" || act == "silu", "params.activation: expected none or silu, got ", act);
  const linear::conv1d_options opt{act == "silu" ? linear::conv_activation::silu : linear::conv_activation::none};
  tensor<float, 3> state({B, Dm, W - 1});  // initial states in, final states out
  if (c.flag("has_initial_states")) state = c.input<float, 3>("initial_states", {B, Dm, W - 1});
  tensor<float, 3> y({B, Dm, L});
  const view<const float, 1> b = bias.size() ? view<const float, 1>(bias) : view<const float, 1>{};
  switch (p) {
    case path::reference: linear::reference::causal_conv1d(x, weight, b, y, state, state, opt); break;
    case path::fast: linear::causal_conv1d(x, weight, b, y, state, state, opt); break;
    case path::step:
      for (std::int64_t t = 0; t < L; ++t) {
        tensor<float, 2> yt({B, Dm});
        linear::causal_conv1d_step(column(x, t), weight, b, yt, state, opt);
        set_column(y, t, yt);
      }
      break;
  }
  golden::results r;
  r.add("y", y);
  r.add("final_states", state);
  return r;
}

golden::results selective_scan(const golden::golden_case& c, path p) {
  const auto B = c.dim("B"), Dm = c.dim("Dm"), N = c.dim("N"), L = c.dim("L"), G = c.dim("G");
  const auto u = c.input<float, 3>("u", {B, Dm, L});
  const auto delta = c.input<float, 3>("delta", {B, Dm, L});
  const auto A = c.input<float, 2>("A", {Dm, N});
  const auto Bm = c.input<float, 4>("Bm", {B, G, N, L});
  const auto Cm = c.input<float, 4>("Cm", {B, G, N, L});
  tensor<float, 1> D, delta_bias;
  tensor<float, 3> z;
  if (c.flag("has_D")) D = c.input<float, 1>("D", {Dm});
  if (c.flag("has_z")) z = c.input<float, 3>("z", {B, Dm, L});
  if (c.flag("has_delta_bias")) delta_bias = c.input<float, 1>("delta_bias", {Dm});
  tensor<float, 3> state({B, Dm, N});
  if (c.flag("has_initial_state")) state = c.input<float, 3>("h0", {B, Dm, N});
  const linear::selective_scan_options opt{c.flag("delta_softplus")};
  auto maybe = [](const auto& t) {
    using V = decltype(mnemo::cview(t));
    return t.size() ? mnemo::cview(t) : V{};
  };
  tensor<float, 3> y({B, Dm, L});
  switch (p) {
    case path::reference:
      linear::reference::selective_scan(u, delta, A, Bm, Cm, maybe(D), maybe(z), maybe(delta_bias), y, state, opt);
      break;
    case path::fast:
      linear::selective_scan(u, delta, A, Bm, Cm, maybe(D), maybe(z), maybe(delta_bias), y, state, opt);
      break;
    case path::step:
      for (std::int64_t t = 0; t < L; ++t) {
        tensor<float, 2> yt({B, Dm}), zt = z.size() ? column(z, t) : tensor<float, 2>{};
        linear::selective_scan_step(column(u, t), column(delta, t), A, column(Bm, t), column(Cm, t), maybe(D),
                                    maybe(zt), maybe(delta_bias), yt, state, opt);
        set_column(y, t, yt);
      }
      break;
  }
  golden::results r;
  r.add("y", y);
  r.add("last_state", state);
  return r;
}

bool register_all() {
  for (path p : {path::reference, path::fast, path::step}) {
    const char* name = p == path::reference ? "reference" : p == path::fast ? "fast" : "step";
    golden::register_op("causal_conv1d", name, [p](const golden::golden_case& c) { return causal_conv1d(c, p); });
    golden::register_op("selective_scan", name, [p](const golden::golden_case& c) { return selective_scan(c, p); });
  }
  return true;
}

[[maybe_unused]] const bool registered = register_all();

}  // namespace
