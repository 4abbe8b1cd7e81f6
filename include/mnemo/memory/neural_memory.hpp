// mnemo/memory/neural_memory.hpp — Titans neural memory: an MLP trained at test time (Behrouz,
// Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time", 2024), with ATLAS's Omega rule
// as an option (Behrouz et al., "ATLAS: Learning to Optimally Memorize the Context at Test
// Time", 2025).
//
// Memory. M_W(x) = x + mlp_W(x) (residual optional), x a row vector of D features, mlp of depth
// 1 to 4 without biases: z_0 = x W_0, z_l = act(z_{l-1}) W_l, mlp(x) = z_{depth-1}; W_0 [D, Hd],
// W_l [Hd, Hd], W_{depth-1} [Hd, D] (depth 1: one [D, D] matrix, no activation); act = SiLU or GELU.
//
// Loss (Titans' associative memory loss), summed over the D features:
//   loss_t(W) = || M_W(k_t) - v_t ||^2
// Omega rule (ATLAS, with unit weights gamma): the loss of token t is taken over the last
// c tokens, sum_{i = t-c+1}^{t} loss_i(W); c = 1 is Titans. Tokens before the call come from the
// state's history, so a sequence fed in pieces gives the result of one call.
//
// Update (Titans sec. 3.1), per token t, with data-dependent theta_t >= 0 (learning rate),
// eta_t in [0, 1] (momentum) and alpha_t in [0, 1] (forgetting):
//   G_t = d loss_t / dW           (at the chunk-start weights, see below)
//   S_t = eta_t S_{t-1} - theta_t G_t            momentary + past surprise
//   W_t = (1 - alpha_t) W_{t-1} + S_t            forgetting
//   y_t = M_{W_t}(q_t)                           the read comes after the token's update
// Chunks (Titans sec. 3.2, "parallelizing the long-term memory training"): tokens are cut into
// chunks of C; chunk c covers [cC, min((c+1)C, L)), the last one may be shorter. Every G_t of a
// chunk is taken at the weights of the chunk start; momentum and decay still run per token.
// C = 1 is the per-token recurrence. (golden/README.md "titans_memory" fixes these choices.)
//
// Gradient (hand-derived, checked against finite differences in the tests): with z_l the
// pre-activations for input k, x_0 = k, x_l = act(z_{l-1}), r = 2 (M(k) - v):
//   delta_{depth-1} = r,   delta_{l-1} = (delta_l W_l^T) o act'(z_{l-1}),   dW_l = x_l^T delta_l
// (each token's gradient is rank one per layer).
//
// Fast path (chunked, GEMM-shaped). Within a chunk the gradients are taken at the start weights
// W^0, S^0 and each is rank one, so for a chunk row t and key i (i over the chunk's tokens and,
// with Omega, the c - 1 before it)
//   S_t = E_t S^0 - sum_i c_ti x_i^T delta_i,   W_t = P_t W^0 + F_t S^0 - sum_i d_ti x_i^T delta_i
// with E_t = prod_{j<=t} eta_j, P_t = prod_{j<=t} (1 - alpha_j), F_t = (1 - alpha_t) F_{t-1} + E_t,
// c_ti = eta_t c_{t-1,i} + theta_t [i in the window of t], d_ti = (1 - alpha_t) d_{t-1,i} + c_ti.
// Reading a query row through layer l then needs no materialised W_t:
//   z^q_t = P_t x^q_t W^0 + F_t x^q_t S^0 - sum_i d_ti (x^q_t . x_i) delta_i
// i.e. per chunk and layer: two GEMMs with the start weights, one [n, nk] score GEMM masked by D,
// one [n, nk] x [nk, out] GEMM; the weights are formed once, at the chunk end.
//
// Shapes: q, k, v [B, L, D]; theta, eta, alpha [B, L]; y [B, L, D]. The state holds B independent
// memories: weights and momenta [B, in_l, out_l] per layer (the golden cases' W1 [B, D, Hd],
// W2 [B, Hd, D]) and the Omega history [B, c-1, D] of keys and values.
//
// Numerics: the reference runs in double; the fast path in f32 (Eigen GEMMs, SIMD activations).
// The recurrences for c, d, E, P, F multiply factors in order (no division by a cumulative
// product), so a momentum or retention of 0 is exact and nothing overflows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"

namespace mnemo::memory {

// The MLP of a neural memory.
struct mlp_shape {
  std::int64_t dim = 0;     // D: input and output features
  std::int64_t hidden = 0;  // Hd: hidden width (depth >= 2)
  int depth = 2;            // weight matrices, 1 to 4
  activation act = activation::silu;
  bool residual = true;  // M(x) = x + mlp(x)

  static constexpr int max_depth = 4;

  std::int64_t in(int l) const { return l == 0 ? dim : hidden; }
  std::int64_t out(int l) const { return l == depth - 1 ? dim : hidden; }

  void validate(const char* fn) const {
    using mnemo::detail::require;
    require(depth >= 1 && depth <= max_depth, fn, ": mlp_shape.depth must be in [1, ", max_depth, "], got ", depth);
    require(dim >= 1, fn, ": mlp_shape.dim must be >= 1, got ", dim);
    require(depth == 1 || hidden >= 1, fn, ": mlp_shape.hidden must be >= 1 for depth ", depth, ", got ", hidden);
  }
};

struct neural_memory_options {
  std::int64_t chunk_size = 1;  // C: gradients of a chunk at its start weights; 1 = per token
  int threads = 0;              // threads over the batch; 0: the OpenMP default
};

// The explicit state of B neural memories: weights, momenta and the Omega history.
class neural_memory_state {
 public:
  neural_memory_state() = default;

  // Zero weights and momenta; omega_window = c >= 1 (1: Titans' per-token loss).
  neural_memory_state(std::int64_t B, const mlp_shape& shape, std::int64_t omega_window = 1)
      : B_(B), shape_(shape), omega_(omega_window) {
    constexpr const char* fn = "neural_memory_state";
    shape.validate(fn);
    mnemo::detail::require(B >= 1, fn, ": B must be >= 1, got ", B);
    mnemo::detail::require(omega_window >= 1, fn, ": omega_window must be >= 1, got ", omega_window);
    for (int l = 0; l < shape.depth; ++l) {
      w_.emplace_back(shape_t<3>{B, shape.in(l), shape.out(l)});
      s_.emplace_back(shape_t<3>{B, shape.in(l), shape.out(l)});
    }
    hist_k_ = tensor<float, 3>({B, omega_window - 1, shape.dim});
    hist_v_ = tensor<float, 3>({B, omega_window - 1, shape.dim});
  }

  std::int64_t batch() const { return B_; }
  const mlp_shape& shape() const { return shape_; }
  int depth() const { return shape_.depth; }
  std::int64_t omega_window() const { return omega_; }
  bool empty() const { return B_ == 0; }

  view<float, 3> weight(int l) { return w_.at(static_cast<std::size_t>(l)); }        // [B, in_l, out_l]
  view<const float, 3> weight(int l) const { return w_.at(static_cast<std::size_t>(l)); }
  view<float, 3> momentum(int l) { return s_.at(static_cast<std::size_t>(l)); }      // [B, in_l, out_l]
  view<const float, 3> momentum(int l) const { return s_.at(static_cast<std::size_t>(l)); }

  // The last history_len() keys and values seen (at most omega_window - 1), oldest first.
  std::int64_t history_len() const { return hist_len_; }
  view<float, 3> history_keys() { return hist_k_.as_view().narrow(1, 0, hist_len_); }    // [B, len, D]
  view<float, 3> history_values() { return hist_v_.as_view().narrow(1, 0, hist_len_); }  // [B, len, D]
  view<const float, 3> history_keys() const { return hist_k_.as_view().narrow(1, 0, hist_len_); }
  view<const float, 3> history_values() const { return hist_v_.as_view().narrow(1, 0, hist_len_); }
  void set_history_len(std::int64_t n) {
    mnemo::detail::require(n >= 0 && n <= omega_ - 1, "neural_memory_state::set_history_len: expected n in [0, ",
                           omega_ - 1, "], got ", n);
    hist_len_ = n;
  }

  // Writes <prefix>config.npy (int64: B, D, Hd, depth, act, residual, omega, history_len),
  // <prefix>W<l>.npy, <prefix>S<l>.npy, <prefix>history_k.npy, <prefix>history_v.npy.
  void save(const std::string& prefix) const {
    mnemo::detail::require(!empty(), "neural_memory_state::save: the state is empty");
    detail::save_record(detail::npy_path(prefix, "config"),
                        {B_, shape_.dim, shape_.hidden, shape_.depth, static_cast<std::int64_t>(shape_.act),
                         shape_.residual ? 1 : 0, omega_, hist_len_});
    for (int l = 0; l < shape_.depth; ++l) {
      npy::save(detail::npy_path(prefix, "W", l), w_[l]);
      npy::save(detail::npy_path(prefix, "S", l), s_[l]);
    }
    npy::save(detail::npy_path(prefix, "history_k"), hist_k_);
    npy::save(detail::npy_path(prefix, "history_v"), hist_v_);
  }

  static neural_memory_state load(const std::string& prefix) {
    constexpr std::int64_t fields = 8;
    const auto c = detail::load_record(detail::npy_path(prefix, "config"), fields);
    mnemo::detail::require(c[4] == 0 || c[4] == 1, "neural_memory_state::load: ", prefix,
                           "config.npy: activation must be 0 (silu) or 1 (gelu), got ", c[4]);
    mnemo::detail::require(c[3] >= 1 && c[3] <= mlp_shape::max_depth, "neural_memory_state::load: ", prefix,
                           "config.npy: depth must be in [1, ", mlp_shape::max_depth, "], got ", c[3]);
    const mlp_shape shape{c[1], c[2], static_cast<int>(c[3]), static_cast<activation>(c[4]), c[5] != 0};
    neural_memory_state s(c[0], shape, c[6]);
    for (int l = 0; l < shape.depth; ++l) {
      const shape_t<3> want{s.B_, shape.in(l), shape.out(l)};
      s.w_[l] = detail::load_checked<3>(detail::npy_path(prefix, "W", l), want);
      s.s_[l] = detail::load_checked<3>(detail::npy_path(prefix, "S", l), want);
    }
    const shape_t<3> hist{s.B_, s.omega_ - 1, shape.dim};
    s.hist_k_ = detail::load_checked<3>(detail::npy_path(prefix, "history_k"), hist);
    s.hist_v_ = detail::load_checked<3>(detail::npy_path(prefix, "history_v"), hist);
    s.set_history_len(c[7]);
    return s;
  }

 private:
  std::int64_t B_ = 0;
  mlp_shape shape_{};
  std::int64_t omega_ = 1;
  std::vector<tensor<float, 3>> w_, s_;
  tensor<float, 3> hist_k_, hist_v_;  // [B, omega - 1, D], the first hist_len_ rows valid
  std::int64_t hist_len_ = 0;
};

namespace detail {

// Boundary checks of neural_memory / reference::neural_memory; returns L.
inline std::int64_t check_neural_memory(const char* fn, const view<const float, 3>& q, const view<const float, 3>& k,
                                        const view<const float, 3>& v, const view<const float, 2>& theta,
                                        const view<const float, 2>& eta, const view<const float, 2>& alpha,
                                        const neural_memory_state& state, const view<float, 3>& y,
                                        const neural_memory_options& opt) {
  using mnemo::detail::require;
  require(!state.empty(), fn, ": state is empty (default-constructed)");
  const std::int64_t B = state.batch(), D = state.shape().dim, L = q.extent(1);
  mnemo::detail::require_shape(fn, "q", q, {B, L, D}, " [B, L, D] (B, D from the state)");
  mnemo::detail::require_shape(fn, "k", k, {B, L, D}, " [B, L, D]");
  mnemo::detail::require_shape(fn, "v", v, {B, L, D}, " [B, L, D]");
  mnemo::detail::require_shape(fn, "theta", theta, {B, L}, " [B, L]");
  mnemo::detail::require_shape(fn, "eta", eta, {B, L}, " [B, L]");
  mnemo::detail::require_shape(fn, "alpha", alpha, {B, L}, " [B, L]");
  mnemo::detail::require_shape(fn, "y", y, {B, L, D}, " [B, L, D]");
  require(opt.chunk_size >= 1, fn, ": options.chunk_size must be >= 1, got ", opt.chunk_size);
  check_threads(fn, opt.threads);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < L; ++t) {
      const float th = theta(b, t), et = eta(b, t), al = alpha(b, t);
      require(std::isfinite(th) && th >= 0, fn, ": theta[", b, ", ", t, "] must be finite and >= 0, got ", th);
      require(et >= 0 && et <= 1, fn, ": eta[", b, ", ", t, "] must be in [0, 1], got ", et);
      require(al >= 0 && al <= 1, fn, ": alpha[", b, ", ", t, "] must be in [0, 1], got ", al);
    }
  return L;
}

inline void check_read(const char* fn, const view<const float, 3>& x, const neural_memory_state& state,
                       const view<float, 3>& y, int threads) {
  mnemo::detail::require(!state.empty(), fn, ": state is empty (default-constructed)");
  const std::int64_t B = state.batch(), D = state.shape().dim;
  mnemo::detail::require_shape(fn, "x", x, {B, x.extent(1), D}, " [B, L, D] (B, D from the state)");
  mnemo::detail::require_shape(fn, "y", y, {B, x.extent(1), D}, " [B, L, D]");
  check_threads(fn, threads);
}

// Stores the last min(c - 1, len + L) keys/values of [history; this call] as the new history.
inline void update_history(neural_memory_state& state, const view<const float, 3>& k, const view<const float, 3>& v) {
  const std::int64_t c = state.omega_window();
  if (c == 1) return;
  const std::int64_t B = state.batch(), D = state.shape().dim, L = k.extent(1), old = state.history_len();
  const std::int64_t keep = std::min(c - 1, old + L);
  state.set_history_len(c - 1);  // the full buffer, so that rows up to c - 2 can be written
  view<float, 3> hk = state.history_keys(), hv = state.history_values();
  std::vector<float> rows(static_cast<std::size_t>(2 * keep * D));
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t r = 0; r < keep; ++r) {  // position p of the concatenation, p < old: history
      const std::int64_t p = old + L - keep + r;
      const float* ks = p < old ? hk.ptr(b, p) : k.ptr(b, p - old);
      const float* vs = p < old ? hv.ptr(b, p) : v.ptr(b, p - old);
      std::copy(ks, ks + D, rows.data() + r * D);
      std::copy(vs, vs + D, rows.data() + (keep + r) * D);
    }
    for (std::int64_t r = 0; r < keep; ++r) {
      std::copy(rows.data() + r * D, rows.data() + (r + 1) * D, hk.ptr(b, r));
      std::copy(rows.data() + (keep + r) * D, rows.data() + (keep + r + 1) * D, hv.ptr(b, r));
    }
  }
  state.set_history_len(keep);
}

}  // namespace detail

namespace reference {

// One memory's weights in double: w[l] is [in_l, out_l] row-major.
struct mlp {
  mlp_shape shape;
  std::vector<std::vector<double>> w;

  explicit mlp(const mlp_shape& s) : shape(s), w(static_cast<std::size_t>(s.depth)) {
    for (int l = 0; l < s.depth; ++l) w[l].assign(static_cast<std::size_t>(s.in(l) * s.out(l)), 0.0);
  }
};

// The memory b of a state's weights (momentum = false) or momenta (true), in double.
inline mlp from_state(const neural_memory_state& state, std::int64_t b, bool momentum = false) {
  mlp m(state.shape());
  for (int l = 0; l < state.depth(); ++l) {
    const view<const float, 3> t = momentum ? state.momentum(l) : state.weight(l);
    const std::int64_t n = t.extent(1) * t.extent(2);
    for (std::int64_t i = 0; i < n; ++i) m.w[l][i] = t.ptr(b)[i];
  }
  return m;
}

inline void to_state(const mlp& m, neural_memory_state& state, std::int64_t b, bool momentum = false) {
  for (int l = 0; l < state.depth(); ++l) {
    const view<float, 3> t = momentum ? state.momentum(l) : state.weight(l);
    const std::int64_t n = t.extent(1) * t.extent(2);
    for (std::int64_t i = 0; i < n; ++i) t.ptr(b)[i] = static_cast<float>(m.w[l][i]);
  }
}

// y = M(x) for one row x of D features.
inline std::vector<double> forward(const mlp& m, const double* x) {
  const mlp_shape& s = m.shape;
  std::vector<double> in(x, x + s.dim), z;
  for (int l = 0; l < s.depth; ++l) {
    z.assign(static_cast<std::size_t>(s.out(l)), 0.0);
    for (std::int64_t i = 0; i < s.in(l); ++i)
      for (std::int64_t j = 0; j < s.out(l); ++j) z[j] += in[i] * m.w[l][i * s.out(l) + j];
    if (l + 1 < s.depth) {
      in.resize(z.size());
      for (std::size_t j = 0; j < z.size(); ++j) in[j] = detail::act_value(s.act, z[j]);
    }
  }
  if (s.residual)
    for (std::int64_t j = 0; j < s.dim; ++j) z[j] += x[j];
  return z;
}

// loss = ||M(k) - v||^2 (summed over features); adds d loss / dW_l to grad.w[l]; returns loss.
inline double add_loss_gradient(const mlp& m, const double* k, const double* v, mlp& grad) {
  const mlp_shape& s = m.shape;
  std::vector<std::vector<double>> x(static_cast<std::size_t>(s.depth)), z(static_cast<std::size_t>(s.depth));
  x[0].assign(k, k + s.dim);
  for (int l = 0; l < s.depth; ++l) {  // forward, keeping every layer's input and pre-activation
    z[l].assign(static_cast<std::size_t>(s.out(l)), 0.0);
    for (std::int64_t i = 0; i < s.in(l); ++i)
      for (std::int64_t j = 0; j < s.out(l); ++j) z[l][j] += x[l][i] * m.w[l][i * s.out(l) + j];
    if (l + 1 < s.depth) {
      x[l + 1].resize(z[l].size());
      for (std::size_t j = 0; j < z[l].size(); ++j) x[l + 1][j] = detail::act_value(s.act, z[l][j]);
    }
  }
  double loss = 0;
  std::vector<double> delta(static_cast<std::size_t>(s.dim));  // r = 2 (M(k) - v)
  for (std::int64_t j = 0; j < s.dim; ++j) {
    const double e = z[s.depth - 1][j] + (s.residual ? k[j] : 0.0) - v[j];
    loss += e * e;
    delta[j] = 2 * e;
  }
  for (int l = s.depth - 1; l >= 0; --l) {  // dW_l = x_l^T delta_l; delta_{l-1} = (delta_l W_l^T) o act'(z_{l-1})
    for (std::int64_t i = 0; i < s.in(l); ++i)
      for (std::int64_t j = 0; j < s.out(l); ++j) grad.w[l][i * s.out(l) + j] += x[l][i] * delta[j];
    if (l == 0) break;
    std::vector<double> prev(static_cast<std::size_t>(s.in(l)), 0.0);
    for (std::int64_t i = 0; i < s.in(l); ++i) {
      for (std::int64_t j = 0; j < s.out(l); ++j) prev[i] += delta[j] * m.w[l][i * s.out(l) + j];
      prev[i] *= detail::act_derivative(s.act, z[l - 1][i]);
    }
    delta = std::move(prev);
  }
  return loss;
}

// y = M(x) with the state's current weights, no update.
inline void neural_memory_read(view<const float, 3> x,  // [B, L, D]
                               const neural_memory_state& state,
                               view<float, 3> y,  // [B, L, D]
                               int threads = 0) {
  detail::check_read("memory::reference::neural_memory_read", x, state, y, threads);
  const std::int64_t D = state.shape().dim;
  parallel_for(state.batch(), [&](std::int64_t b) {
    const mlp w = from_state(state, b);
    std::vector<double> row(static_cast<std::size_t>(D));
    for (std::int64_t t = 0; t < x.extent(1); ++t) {
      for (std::int64_t j = 0; j < D; ++j) row[j] = x(b, t, j);
      const std::vector<double> out = forward(w, row.data());
      for (std::int64_t j = 0; j < D; ++j) y(b, t, j) = static_cast<float>(out[j]);
    }
  }, threads);
}

// The Titans update and read, token by token in double, exactly as in the header equations.
inline void neural_memory(view<const float, 3> q,      // [B, L, D]
                          view<const float, 3> k,      // [B, L, D]
                          view<const float, 3> v,      // [B, L, D]
                          view<const float, 2> theta,  // [B, L] learning rate >= 0
                          view<const float, 2> eta,    // [B, L] momentum in [0, 1]
                          view<const float, 2> alpha,  // [B, L] forgetting in [0, 1]
                          neural_memory_state& state,  // in and out
                          view<float, 3> y,            // [B, L, D]
                          const neural_memory_options& opt = {}) {
  const std::int64_t L = detail::check_neural_memory("memory::reference::neural_memory", q, k, v, theta, eta, alpha,
                                                      state, y, opt);
  const mlp_shape& s = state.shape();
  const std::int64_t D = s.dim, C = opt.chunk_size, c = state.omega_window(), H = state.history_len();
  const view<const float, 3> hk = std::as_const(state).history_keys(), hv = std::as_const(state).history_values();
  parallel_for(state.batch(), [&](std::int64_t b) {
    mlp w = from_state(state, b), m = from_state(state, b, true);
    auto row = [&](std::int64_t p, bool value) {  // token p of [history; call], p < 0: history
      const float* src = p < 0 ? (value ? hv : hk).ptr(b, H + p) : (value ? v : k).ptr(b, p);
      return std::vector<double>(src, src + D);
    };
    for (std::int64_t t0 = 0; t0 < L; t0 += C) {
      const mlp w0 = w;  // every gradient of the chunk at its start weights
      for (std::int64_t t = t0; t < std::min(L, t0 + C); ++t) {
        mlp g(s);
        for (std::int64_t p = std::max(t - c + 1, -H); p <= t; ++p) {
          const std::vector<double> kp = row(p, false), vp = row(p, true);
          add_loss_gradient(w0, kp.data(), vp.data(), g);
        }
        for (int l = 0; l < s.depth; ++l)
          for (std::size_t i = 0; i < g.w[l].size(); ++i) {
            m.w[l][i] = eta(b, t) * m.w[l][i] - theta(b, t) * g.w[l][i];
            w.w[l][i] = (1.0 - alpha(b, t)) * w.w[l][i] + m.w[l][i];
          }
        std::vector<double> qt(q.ptr(b, t), q.ptr(b, t) + D);
        const std::vector<double> out = forward(w, qt.data());
        for (std::int64_t j = 0; j < D; ++j) y(b, t, j) = static_cast<float>(out[j]);
      }
    }
    to_state(w, state, b);
    to_state(m, state, b, true);
  }, opt.threads);
  detail::update_history(state, k, v);
}

}  // namespace reference

namespace detail {

// The fast path's workspace for one memory: sized once per call for chunks of C tokens and an
// Omega window of c, so nothing is allocated inside the chunk loop.
struct titans_workspace {
  std::int64_t C, nk;                 // chunk rows, key rows (C + c - 1)
  std::vector<matrix> x;              // x[l] [nk, in_l]: layer inputs of the keys (x[0] = k)
  std::vector<matrix> z;              // z[l] [nk, out_l]: pre-activations of the keys
  std::vector<matrix> dact;           // dact[l] [nk, out_l]: act'(z[l]) (l < depth - 1)
  std::vector<matrix> delta;          // delta[l] [nk, out_l]: d loss / d z[l]
  std::vector<matrix> xq;             // xq[l] [C, in_l]: layer inputs of the queries
  matrix vk;                          // [nk, D] the keys' target values
  matrix zq, tq, sd;                  // [C, width], [C, width], [nk, width]
  matrix cm, dm, sq;                  // [C, nk] coefficients c, d and masked query-key scores
  std::vector<float> e, p, f;         // [C] E_t, P_t, F_t

  titans_workspace(const mlp_shape& s, std::int64_t chunk, std::int64_t omega)
      : C(chunk), nk(chunk + omega - 1), e(chunk), p(chunk), f(chunk) {
    const std::int64_t width = std::max(s.dim, s.hidden);
    for (int l = 0; l < s.depth; ++l) {
      x.emplace_back(nk, s.in(l));
      z.emplace_back(nk, s.out(l));
      dact.emplace_back(nk, s.out(l));
      delta.emplace_back(nk, s.out(l));
      xq.emplace_back(C, s.in(l));
    }
    vk.resize(nk, s.dim);
    zq.resize(C, width);
    tq.resize(C, width);
    sd.resize(nk, width);
    cm.resize(C, nk);
    dm.resize(C, nk);
    sq.resize(C, nk);
  }
};

// One chunk of memory b: tokens [t0, t0 + n), keys from position t0 - m0 (history when < 0).
template <class Arch>
void titans_chunk(const mlp_shape& s, titans_workspace& ws, std::int64_t b, std::int64_t t0, std::int64_t n,
                  std::int64_t m0, std::int64_t omega, const view<const float, 3>& q, const view<const float, 3>& k,
                  const view<const float, 3>& v, const view<const float, 3>& hk, const view<const float, 3>& hv,
                  const view<const float, 2>& theta, const view<const float, 2>& eta, const view<const float, 2>& alpha,
                  std::vector<map>& w, std::vector<map>& mom, const view<float, 3>& y) {
  const std::int64_t D = s.dim, nk = m0 + n, H = hk.extent(1), last = s.depth - 1;
  // 1. Stage the keys and values: m0 earlier tokens, then the chunk.
  for (std::int64_t i = 0; i < nk; ++i) {
    const std::int64_t p = t0 - m0 + i;
    const float* ks = p < 0 ? hk.ptr(b, H + p) : k.ptr(b, p);
    const float* vs = p < 0 ? hv.ptr(b, H + p) : v.ptr(b, p);
    std::copy(ks, ks + D, ws.x[0].row(i).data());
    std::copy(vs, vs + D, ws.vk.row(i).data());
  }
  // 2. Forward of the keys at the start weights, then r = 2 (M(k) - v) and the deltas.
  for (int l = 0; l <= last; ++l) {
    gemm<accumulate::assign>(ws.z[l].topRows(nk), ws.x[l].topRows(nk), w[l]);
    if (l < last) activate<Arch>(s.act, ws.z[l].data(), ws.x[l + 1].data(), ws.dact[l].data(), nk * s.out(l));
  }
  auto r = ws.delta[last].topRows(nk);
  r = ws.z[last].topRows(nk) - ws.vk.topRows(nk);
  if (s.residual) r += ws.x[0].topRows(nk);
  r *= 2.0f;
  for (int l = last; l > 0; --l) {
    gemm<accumulate::assign>(ws.delta[l - 1].topRows(nk), ws.delta[l].topRows(nk), w[l].transpose());
    ws.delta[l - 1].topRows(nk).array() *= ws.dact[l - 1].topRows(nk).array();
  }
  // 3. Scan coefficients: E, P, F per row; c and d per (row, key).
  auto cm = ws.cm.topLeftCorner(n, nk);
  auto dm = ws.dm.topLeftCorner(n, nk);
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t pos = t0 + t;
    const float et = eta(b, pos), th = theta(b, pos), at = 1.0f - alpha(b, pos);
    ws.e[t] = (t ? ws.e[t - 1] : 1.0f) * et;
    ws.p[t] = (t ? ws.p[t - 1] : 1.0f) * at;
    ws.f[t] = (t ? at * ws.f[t - 1] : 0.0f) + ws.e[t];
    for (std::int64_t i = 0; i < nk; ++i) {
      const std::int64_t p = t0 - m0 + i;
      const float in_window = (p <= pos && p > pos - omega) ? th : 0.0f;
      cm(t, i) = (t ? et * cm(t - 1, i) : 0.0f) + in_window;
      dm(t, i) = (t ? at * dm(t - 1, i) : 0.0f) + cm(t, i);
    }
  }
  // 4. Read the queries through W_t without forming it.
  for (std::int64_t t = 0; t < n; ++t) std::copy(q.ptr(b, t0 + t), q.ptr(b, t0 + t) + D, ws.xq[0].row(t).data());
  for (int l = 0; l <= last; ++l) {
    const std::int64_t out = s.out(l);
    auto zq = ws.zq.topLeftCorner(n, out);
    auto tq = ws.tq.topLeftCorner(n, out);
    auto sq = ws.sq.topLeftCorner(n, nk);
    const auto xq = ws.xq[l].topRows(n);
    gemm<accumulate::assign>(zq, xq, w[l]);
    gemm<accumulate::assign>(tq, xq, mom[l]);
    for (std::int64_t t = 0; t < n; ++t) zq.row(t) = ws.p[t] * zq.row(t) + ws.f[t] * tq.row(t);
    gemm<accumulate::assign>(sq, xq, ws.x[l].topRows(nk).transpose());
    sq.array() *= dm.array();
    gemm<accumulate::subtract>(zq, sq, ws.delta[l].topRows(nk));
    if (l < last) {
      for (std::int64_t t = 0; t < n; ++t) activate<Arch>(s.act, zq.row(t).data(), ws.xq[l + 1].row(t).data(), nullptr, out);
    } else {
      for (std::int64_t t = 0; t < n; ++t) {
        float* yt = y.ptr(b, t0 + t);
        for (std::int64_t j = 0; j < D; ++j) yt[j] = zq(t, j) + (s.residual ? ws.xq[0](t, j) : 0.0f);
      }
    }
  }
  // 5. The weights and momenta at the chunk end (row n - 1).
  for (int l = 0; l <= last; ++l) {
    const std::int64_t out = s.out(l);
    auto sd = ws.sd.topLeftCorner(nk, out);
    const auto xt = ws.x[l].topRows(nk).transpose();
    w[l] = ws.p[n - 1] * w[l] + ws.f[n - 1] * mom[l];
    sd = dm.row(n - 1).transpose().asDiagonal() * ws.delta[l].topRows(nk);
    gemm<accumulate::subtract>(w[l], xt, sd);
    mom[l] *= ws.e[n - 1];
    sd = cm.row(n - 1).transpose().asDiagonal() * ws.delta[l].topRows(nk);
    gemm<accumulate::subtract>(mom[l], xt, sd);
  }
}

}  // namespace detail

// y = M(x) with the state's current weights, no update (f32, GEMMs).
template <class Arch = simd::default_arch>
void neural_memory_read(view<const float, 3> x,  // [B, L, D]
                        const neural_memory_state& state,
                        view<float, 3> y,  // [B, L, D]
                        int threads = 0) {
  detail::check_read("memory::neural_memory_read", x, state, y, threads);
  const mlp_shape& s = state.shape();
  const std::int64_t L = x.extent(1), width = std::max(s.dim, s.hidden);
  detail::for_each_item(state.batch(), threads, true, [&](std::int64_t b) {
    detail::matrix in(L, width), out(L, width);
    for (std::int64_t t = 0; t < L; ++t) std::copy(x.ptr(b, t), x.ptr(b, t) + s.dim, in.row(t).data());
    for (int l = 0; l < s.depth; ++l) {
      const detail::cmap wl(state.weight(l).ptr(b), s.in(l), s.out(l));
      detail::gemm<detail::accumulate::assign>(out.leftCols(s.out(l)), in.leftCols(s.in(l)), wl);
      if (l + 1 < s.depth)
        for (std::int64_t t = 0; t < L; ++t)
          detail::activate<Arch>(s.act, out.row(t).data(), in.row(t).data(), nullptr, s.out(l));
    }
    for (std::int64_t t = 0; t < L; ++t) {
      float* yt = y.ptr(b, t);
      for (std::int64_t j = 0; j < s.dim; ++j) yt[j] = out(t, j) + (s.residual ? x(b, t, j) : 0.0f);
    }
  });
}

// The Titans update and read (f32 fast path, chunked GEMM form; see the header). Same contract
// as reference::neural_memory.
template <class Arch = simd::default_arch>
void neural_memory(view<const float, 3> q,      // [B, L, D]
                   view<const float, 3> k,      // [B, L, D]
                   view<const float, 3> v,      // [B, L, D]
                   view<const float, 2> theta,  // [B, L] learning rate >= 0
                   view<const float, 2> eta,    // [B, L] momentum in [0, 1]
                   view<const float, 2> alpha,  // [B, L] forgetting in [0, 1]
                   neural_memory_state& state,  // in and out
                   view<float, 3> y,            // [B, L, D]
                   const neural_memory_options& opt = {}) {
  const std::int64_t L = detail::check_neural_memory("memory::neural_memory", q, k, v, theta, eta, alpha, state, y,
                                                      opt);
  if (L == 0) return;
  const mlp_shape& s = state.shape();
  const std::int64_t C = std::min(opt.chunk_size, L), c = state.omega_window(), H = state.history_len();
  const view<const float, 3> hk = std::as_const(state).history_keys(), hv = std::as_const(state).history_values();
  detail::for_each_item(state.batch(), opt.threads, true, [&](std::int64_t b) {
    detail::titans_workspace ws(s, C, c);
    std::vector<detail::map> w, mom;
    for (int l = 0; l < s.depth; ++l) {
      w.emplace_back(state.weight(l).ptr(b), s.in(l), s.out(l));
      mom.emplace_back(state.momentum(l).ptr(b), s.in(l), s.out(l));
    }
    for (std::int64_t t0 = 0; t0 < L; t0 += C) {
      const std::int64_t n = std::min(C, L - t0), m0 = std::min(c - 1, t0 + H);
      detail::titans_chunk<Arch>(s, ws, b, t0, n, m0, c, q, k, v, hk, hv, theta, eta, alpha, w, mom, y);
    }
  });
  detail::update_history(state, k, v);
}

}  // namespace mnemo::memory
