// tests/memory/golden_ops.hpp — the golden ops of the memory modules, shared by the golden runner
// (tests/golden/ops_memory.cpp) and the module tests (tests/memory/*_test.cpp):
//
//   titans_memory  (README "titans_memory")  paths "reference" and "fast" of memory/neural_memory.hpp
//   pkm            (README "pkm")            paths "reference" and "fast" of memory/product_keys.hpp
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "golden/runner.hpp"
#include "mnemo/memory/neural_memory.hpp"
#include "mnemo/memory/product_keys.hpp"

namespace mnemo::memory_golden {

namespace golden = mnemo::golden;
namespace mem = mnemo::memory;
using mnemo::tensor;
using mnemo::view;

enum class path { reference, fast };

inline const char* path_name(path p) { return p == path::reference ? "reference" : "fast"; }

inline void require_param(const golden::golden_case& c, const std::string& key, const std::string& want) {
  const auto& p = c.params();
  mnemo::detail::require(p.contains(key) && p[key].is_string() && p[key].get<std::string>() == want, "params.", key,
                         ": this op supports \"", want, "\" only, got ", p.contains(key) ? p[key].dump() : "nothing");
}

// titans_memory: M(x) = x + silu(x W1) W2, momentum, decay, chunked gradients, read after update.
inline golden::results titans(const golden::golden_case& c, path p) {
  const std::int64_t B = c.dim("B"), L = c.dim("L"), D = c.dim("D"), Hd = c.dim("Hd"), C = c.dim("chunk_size");
  require_param(c, "activation", "silu");
  require_param(c, "loss", "sum_sq");
  require_param(c, "read", "after_update");
  mnemo::detail::require(!c.flag("bias"), "params.bias: biases are not supported, got true");
  const bool residual = c.flag("residual");
  const auto q = c.input<float, 3>("q", {B, L, D}), k = c.input<float, 3>("k", {B, L, D}),
             v = c.input<float, 3>("v", {B, L, D});
  const auto theta = c.input<float, 2>("theta", {B, L}), eta = c.input<float, 2>("eta", {B, L}),
             alpha = c.input<float, 2>("alpha", {B, L});
  const auto W1 = c.input<float, 3>("W1", {B, D, Hd}), W2 = c.input<float, 3>("W2", {B, Hd, D});
  const auto S1 = c.input<float, 3>("S1", {B, D, Hd}), S2 = c.input<float, 3>("S2", {B, Hd, D});

  mem::neural_memory_state state(B, {D, Hd, 2, mem::activation::silu, residual});
  std::copy(W1.begin(), W1.end(), state.weight(0).data());
  std::copy(W2.begin(), W2.end(), state.weight(1).data());
  std::copy(S1.begin(), S1.end(), state.momentum(0).data());
  std::copy(S2.begin(), S2.end(), state.momentum(1).data());
  tensor<float, 3> y({B, L, D});
  const mem::neural_memory_options opt{.chunk_size = C};
  if (p == path::reference) mem::reference::neural_memory(q, k, v, theta, eta, alpha, state, y, opt);
  else mem::neural_memory(q, k, v, theta, eta, alpha, state, y, opt);

  golden::results r;
  r.add("y", y);
  r.add("W1_out", std::as_const(state).weight(0));
  r.add("W2_out", std::as_const(state).weight(1));
  r.add("S1_out", std::as_const(state).momentum(0));
  r.add("S2_out", std::as_const(state).momentum(1));
  return r;
}

// pkm: multi-head product-key lookup, heads summed, outputs sorted by score.
inline golden::results pkm(const golden::golden_case& c, path p) {
  const std::int64_t N = c.dim("N"), heads = c.dim("heads"), k_dim = c.dim("k_dim"), n_keys = c.dim("n_keys"),
                     v_dim = c.dim("v_dim"), knn = c.dim("knn");
  mnemo::detail::require(c.flag("score_softmax"), "params.score_softmax: only true is supported");
  require_param(c, "heads_reduction", "sum");
  const auto query = c.input<float, 3>("query", {N, heads, k_dim});
  const auto keys = c.input<float, 4>("keys", {heads, 2, n_keys, k_dim / 2});
  const auto values = c.input<float, 2>("values", {n_keys * n_keys, v_dim});
  tensor<float, 2> out({N, v_dim});
  tensor<std::int64_t, 3> indices({N, heads, knn});
  tensor<float, 3> weights({N, heads, knn}), scores({N, heads, knn});
  if (p == path::reference) mem::reference::pkm_forward(query, keys, values, knn, out, indices, weights, scores);
  else mem::pkm_forward(query, keys, values, knn, out, indices, weights, scores);
  golden::results r;
  r.add("out", out);
  r.add("indices", indices);
  r.add("weights", weights);
  r.add("scores", scores);
  return r;
}

inline golden::results run(const golden::golden_case& c, path p) {
  if (c.op() == "titans_memory") return titans(c, p);
  if (c.op() == "pkm") return pkm(c, p);
  mnemo::detail::fail("memory_golden: unknown op '", c.op(), "'");
}

inline std::vector<std::string> ops() { return {"titans_memory", "pkm"}; }

}  // namespace mnemo::memory_golden
