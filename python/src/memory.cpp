// python/src/memory.cpp — mnemo.memory: the Titans neural memory (memory/neural_memory.hpp) and the
// product-key memory (memory/product_keys.hpp), the modules the golden cases cover.
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/memory/neural_memory.hpp"
#include "mnemo/memory/product_keys.hpp"

namespace mnemo::py {

namespace {

using pyb::arg;
namespace mem = mnemo::memory;

}  // namespace

void bind_memory(pyb::module_& root) {
  auto m = root.def_submodule("memory", "Memory modules: Titans neural memory, product-key memory.");

  m.def(
      "neural_memory",
      [](pyb::handle q_o, pyb::handle k_o, pyb::handle v_o, pyb::handle theta_o, pyb::handle eta_o, pyb::handle alpha_o,
         std::vector<pyb::object> weights, std::vector<pyb::object> momenta, std::int64_t chunk_size,
         const std::string& activation, bool residual, bool reference, int threads) {
        const char* fn = "memory.neural_memory";
        const auto q = read(q_o, fn, "q").as<const float, 3>("[B, L, D]");
        const auto k = read(k_o, fn, "k").as<const float, 3>("[B, L, D]");
        const auto v = read(v_o, fn, "v").as<const float, 3>("[B, L, D]");
        const auto theta = read(theta_o, fn, "theta").as<const float, 2>("[B, L]");
        const auto eta = read(eta_o, fn, "eta").as<const float, 2>("[B, L]");
        const auto alpha = read(alpha_o, fn, "alpha").as<const float, 2>("[B, L]");
        const int depth = static_cast<int>(weights.size());
        if (depth < 1 || depth > mem::mlp_shape::max_depth)
          mnemo::detail::fail("mnemo.", fn, ": argument weights: expected a list of 1 to ", mem::mlp_shape::max_depth,
                              " weight arrays [B, in_l, out_l], got ", depth);
        if (!momenta.empty() && static_cast<int>(momenta.size()) != depth)
          mnemo::detail::fail("mnemo.", fn, ": argument momenta: expected None or ", depth, " arrays (one per weight), got ",
                              momenta.size());
        mem::activation act = mem::activation::silu;
        if (activation == "gelu") act = mem::activation::gelu;
        else if (activation != "silu")
          mnemo::detail::fail("mnemo.", fn, ": argument activation: expected 'silu' or 'gelu', got '", activation, "'");
        const std::int64_t B = q.extent(0), L = q.extent(1), D = q.extent(2);
        std::vector<view<const float, 3>> w, s;
        for (int l = 0; l < depth; ++l) {
          const std::string wn = "weights[" + std::to_string(l) + "]";
          w.push_back(read(weights[static_cast<std::size_t>(l)], fn, wn.c_str()).as<const float, 3>("[B, in_l, out_l]"));
          if (!momenta.empty()) {
            const std::string sn = "momenta[" + std::to_string(l) + "]";
            s.push_back(read(momenta[static_cast<std::size_t>(l)], fn, sn.c_str()).as<const float, 3>("[B, in_l, out_l]"));
          }
        }
        const std::int64_t hidden = depth >= 2 ? w[0].extent(2) : 0;
        mem::neural_memory_state state(B, {D, hidden, depth, act, residual});
        for (int l = 0; l < depth; ++l) {
          auto copy_in = [&](view<const float, 3> from, view<float, 3> to, const char* what) {
            if (from.shape() != to.shape())
              mnemo::detail::fail("mnemo.", fn, ": argument ", what, "[", l, "]: expected shape ", shape_string(to.shape()),
                                  ", got ", shape_string(from.shape()));
            for (std::int64_t b = 0; b < to.extent(0); ++b)
              for (std::int64_t i = 0; i < to.extent(1); ++i) std::copy_n(from.ptr(b, i, 0), to.extent(2), to.ptr(b, i, 0));
          };
          copy_in(w[static_cast<std::size_t>(l)], state.weight(l), "weights");
          if (!s.empty()) copy_in(s[static_cast<std::size_t>(l)], state.momentum(l), "momenta");
        }
        out_array<float, 3> y({B, L, D});
        const mem::neural_memory_options opt{chunk_size, threads};
        {
          pyb::gil_scoped_release release;
          if (reference) mem::reference::neural_memory(q, k, v, theta, eta, alpha, state, y.v, opt);
          else mem::neural_memory(q, k, v, theta, eta, alpha, state, y.v, opt);
        }
        pyb::list w_out, s_out;
        for (int l = 0; l < depth; ++l) {
          for (auto [t, list] : {std::pair{std::as_const(state).weight(l), &w_out}, std::pair{std::as_const(state).momentum(l), &s_out}}) {
            out_array<float, 3> a(t.shape());
            std::copy_n(t.data(), t.size(), a.v.data());
            list->append(a.array);
          }
        }
        return pyb::make_tuple(y.array, w_out, s_out);
      },
      arg("q"), arg("k"), arg("v"), arg("theta"), arg("eta"), arg("alpha"), pyb::kw_only(), arg("weights"),
      arg("momenta") = std::vector<pyb::object>{}, arg("chunk_size") = 1, arg("activation") = "silu",
      arg("residual") = true, arg("reference") = false, arg("threads") = 0,
      "Titans' neural memory (Behrouz et al. 2024): q, k, v [B, L, D], theta (learning rate), eta (momentum), alpha "
      "(forgetting) [B, L]; the memory M(x) = x + act(x W1) W2 (depth = len(weights), weights [B, in_l, out_l], "
      "momenta the same or empty: zeros). Per chunk of chunk_size tokens the gradients of ||M(k_t) - v_t||^2 at the "
      "chunk-start weights; S_t = eta_t S_{t-1} - theta_t G_t, W_t = (1 - alpha_t) W_{t-1} + S_t, y_t = M_{W_t}(q_t). "
      "Returns (y [B, L, D], final weights, final momenta).");

  m.def(
      "pkm",
      [](pyb::handle query_o, pyb::handle keys_o, pyb::handle values_o, std::int64_t knn, bool reference, int threads) {
        const char* fn = "memory.pkm";
        const auto query = read(query_o, fn, "query").as<const float, 3>("[N, heads, k_dim]");
        const auto keys = read(keys_o, fn, "keys").as<const float, 4>("[heads, 2, n_keys, k_dim / 2]");
        const auto values = read(values_o, fn, "values").as<const float, 2>("[n_keys^2, v_dim]");
        const std::int64_t N = query.extent(0), heads = query.extent(1);
        out_array<float, 2> out({N, values.extent(1)});
        out_array<std::int64_t, 3> indices({N, heads, knn});
        out_array<float, 3> weights({N, heads, knn}), scores({N, heads, knn});
        mem::pkm_options opt;
        opt.threads = threads;
        {
          pyb::gil_scoped_release release;
          if (reference) mem::reference::pkm_forward(query, keys, values, knn, out.v, indices.v, weights.v, scores.v);
          else mem::pkm_forward(query, keys, values, knn, out.v, indices.v, weights.v, scores.v, opt);
        }
        return pyb::make_tuple(out.array, indices.array, weights.array, scores.array);
      },
      arg("query"), arg("keys"), arg("values"), pyb::kw_only(), arg("knn"), arg("reference") = false,
      arg("threads") = 0,
      "Product-key memory (Lample et al. 2019): per head the top-knn of each half's sub-key scores, the knn x knn "
      "candidates (index a * n_keys + b), their top-knn, softmax; heads summed. Returns (out [N, v_dim], indices [N, "
      "heads, knn] int64, weights, scores [N, heads, knn]).");
}

}  // namespace mnemo::py
