// 04 — A whole Mamba-2 layer from mnemo's pieces: prefill, then decoding one token at a time.
//
// The Mamba-2 block (Dao & Gu, "Transformers are SSMs", ICML 2024) maps tokens u_t [d_model] by
//   [z, xBC, dt] = W_in u_t                       one input projection, split three ways
//   xBC          = silu(causal_conv1d(xBC))         depthwise, width 4, over x, B and C together
//   [x, B, C]    = xBC                              x: H heads of P channels; B, C: N states (G = 1)
//   y            = SSD(x, dt, A, B, C, D), times silu(z)     linear::mamba2 with dt_softplus, dt_bias
//   y            = rmsnorm(y) w_norm                the norm after the gate (mamba's RMSNormGated)
//   out_t        = W_out y_t
// where SSD is, per head h: S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T,  y_t = C_t^T S_t + D_h x_t.
// mnemo runs the two recurrent parts (causal_conv1d, mamba2) and their one-token steps; the
// projections and the norm are plain loops here (a GEMM and a row norm in an engine).
//
// The program builds a small random layer and checks, against the same layer written out as one
// loop over tokens in double (every state kept by hand):
//   a. one prefill call over all L tokens (chunked mamba2) gives the same outputs;
//   b. a prefill of the first L0 tokens, then causal_conv1d_step + mamba2_step for each later token
//      (the conv and SSD states carried from the prefill) gives the same outputs again.
#include <mnemo/linear/causal_conv1d.hpp>
#include <mnemo/linear/mamba2.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace lin = mnemo::linear;
using mnemo::tensor;
using mnemo::view;

namespace {

constexpr std::int64_t d_model = 24, H = 4, P = 8, N = 16, W = 4;  // one group of B and C
constexpr std::int64_t d_inner = H * P, conv_dim = d_inner + 2 * N;    // x, B, C
constexpr std::int64_t n_proj = d_inner + conv_dim + H;                // z, xBC, dt
constexpr std::int64_t L = 80, L0 = 53;                                // tokens; prefill of L0
constexpr double norm_eps = 1e-5;

struct layer {
  std::vector<float> w_in, w_out;  // [n_proj, d_model], [d_model, d_inner]
  tensor<float, 2> conv_w{{conv_dim, W}};
  tensor<float, 1> conv_b{{conv_dim}}, A{{H}}, D{{H}}, dt_bias{{H}}, w_norm{{d_inner}};
};

layer make_layer() {
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  layer m;
  const float s_in = 1.0f / std::sqrt(float(d_model)), s_out = 1.0f / std::sqrt(float(d_inner));
  for (std::int64_t i = 0; i < n_proj * d_model; ++i) m.w_in.push_back(s_in * u(rng));
  for (std::int64_t i = 0; i < d_model * d_inner; ++i) m.w_out.push_back(s_out * u(rng));
  for (float& w : m.conv_w) w = 0.5f * u(rng);
  for (float& b : m.conv_b) b = 0.1f * u(rng);
  for (std::int64_t h = 0; h < H; ++h) {
    m.A(h) = -std::exp(1.5f * (u(rng) + 1.0f));  // A = -exp(A_log), A_log in [0, 3]
    m.D(h) = 1.0f + 0.5f * u(rng);
    m.dt_bias(h) = -2.0f + u(rng);  // softplus(dt_bias) about 0.05 .. 0.3
  }
  for (float& w : m.w_norm) w = 1.0f + 0.1f * u(rng);
  return m;
}

// proj [n_proj] = W_in u.
void project(const layer& m, const float* u, double* proj) {
  for (std::int64_t r = 0; r < n_proj; ++r) {
    double acc = 0;
    for (std::int64_t c = 0; c < d_model; ++c) acc += double(m.w_in[r * d_model + c]) * u[c];
    proj[r] = acc;
  }
}

// out [d_model] = W_out rmsnorm(y) for the gated SSD output y [d_inner].
void finish(const layer& m, const double* y, double* out) {
  double ss = 0;
  for (std::int64_t c = 0; c < d_inner; ++c) ss += y[c] * y[c];
  const double inv = 1.0 / std::sqrt(ss / d_inner + norm_eps);
  for (std::int64_t r = 0; r < d_model; ++r) {
    double acc = 0;
    for (std::int64_t c = 0; c < d_inner; ++c) acc += double(m.w_out[r * d_inner + c]) * y[c] * inv * m.w_norm(c);
    out[r] = acc;
  }
}

double silu(double x) { return x / (1.0 + std::exp(-x)); }

// The layer as the equations read: one token at a time, in double, with its two states by hand.
std::vector<double> layer_by_hand(const layer& m, const std::vector<float>& u) {
  std::vector<double> out(L * d_model), proj(n_proj), xbc(conv_dim), y(d_inner);
  std::vector<double> window(conv_dim * W, 0.0);  // the last W conv inputs of each channel
  std::vector<double> S(H * N * P, 0.0);          // per head [N, P]
  for (std::int64_t t = 0; t < L; ++t) {
    project(m, &u[t * d_model], proj.data());
    const double* z = proj.data();
    const double* dt_raw = proj.data() + d_inner + conv_dim;
    for (std::int64_t c = 0; c < conv_dim; ++c) {
      double* win = &window[c * W];
      std::rotate(win, win + 1, win + W);
      win[W - 1] = proj[d_inner + c];
      double acc = m.conv_b(c);
      for (std::int64_t j = 0; j < W; ++j) acc += double(m.conv_w(c, j)) * win[j];
      xbc[c] = silu(acc);
    }
    const double *x = xbc.data(), *B = x + d_inner, *C = B + N;
    for (std::int64_t h = 0; h < H; ++h) {
      const double a = dt_raw[h] + m.dt_bias(h), dt = std::max(a, 0.0) + std::log1p(std::exp(-std::abs(a)));
      const double decay = std::exp(dt * m.A(h));
      double* s = &S[h * N * P];
      for (std::int64_t p = 0; p < P; ++p) {
        double acc = m.D(h) * x[h * P + p];
        for (std::int64_t n = 0; n < N; ++n) {
          s[n * P + p] = decay * s[n * P + p] + B[n] * dt * x[h * P + p];
          acc += C[n] * s[n * P + p];
        }
        y[h * P + p] = acc * silu(z[h * P + p]);
      }
    }
    finish(m, y.data(), &out[t * d_model]);
  }
  return out;
}

// The layer on mnemo: a prefill of tokens [0, L0) through causal_conv1d and mamba2, then one
// causal_conv1d_step and mamba2_step per token from L0 on (L0 = L: prefill only).
std::vector<double> layer_with_mnemo(const layer& m, const std::vector<float>& u, std::int64_t prefill) {
  std::vector<double> out(L * d_model), proj(n_proj), y(d_inner);
  // The projection of the prefill, channels first as causal_conv1d takes it ([1, conv_dim, L0]),
  // z and dt in the SSD's [1, H, L0, P] and [1, H, L0].
  tensor<float, 3> xbc_in({1, conv_dim, prefill}), xbc({1, conv_dim, prefill}), dt({1, H, prefill});
  tensor<float, 4> z({1, H, prefill, P});
  for (std::int64_t t = 0; t < prefill; ++t) {
    project(m, &u[t * d_model], proj.data());
    for (std::int64_t c = 0; c < d_inner; ++c) z(0, c / P, t, c % P) = float(proj[c]);
    for (std::int64_t c = 0; c < conv_dim; ++c) xbc_in(0, c, t) = float(proj[d_inner + c]);
    for (std::int64_t h = 0; h < H; ++h) dt(0, h, t) = float(proj[d_inner + conv_dim + h]);
  }
  tensor<float, 3> conv_state({1, conv_dim, W - 1});  // the last W - 1 inputs, carried to the steps
  tensor<float, 4> ssd_state({1, H, N, P});           // S per head, carried to the steps
  lin::causal_conv1d(xbc_in, m.conv_w, m.conv_b, xbc, {}, conv_state, {lin::conv_activation::silu});
  // The conv output is [channels, L]; the SSD reads x [H, L, P] and B, C [G, L, N] (token rows).
  tensor<float, 4> x({1, H, prefill, P}), Bm({1, 1, prefill, N}), Cm({1, 1, prefill, N}), ys({1, H, prefill, P});
  for (std::int64_t t = 0; t < prefill; ++t) {
    for (std::int64_t c = 0; c < d_inner; ++c) x(0, c / P, t, c % P) = xbc(0, c, t);
    for (std::int64_t n = 0; n < N; ++n) {
      Bm(0, 0, t, n) = xbc(0, d_inner + n, t);
      Cm(0, 0, t, n) = xbc(0, d_inner + N + n, t);
    }
  }
  lin::mamba2_options opt;
  opt.dt_softplus = true;
  lin::mamba2(x, dt, m.A, Bm, Cm, m.D, z, m.dt_bias, ys, ssd_state, opt);
  for (std::int64_t t = 0; t < prefill; ++t) {
    for (std::int64_t c = 0; c < d_inner; ++c) y[c] = ys(0, c / P, t, c % P);
    finish(m, y.data(), &out[t * d_model]);
  }
  // Decoding: per token the projection, one conv step, one SSD step.
  tensor<float, 2> xbc1_in({1, conv_dim}), xbc1({1, conv_dim}), dt1({1, H});
  tensor<float, 3> z1({1, H, P}), x1({1, H, P}), B1({1, 1, N}), C1({1, 1, N}), y1({1, H, P});
  for (std::int64_t t = prefill; t < L; ++t) {
    project(m, &u[t * d_model], proj.data());
    for (std::int64_t c = 0; c < d_inner; ++c) z1(0, c / P, c % P) = float(proj[c]);
    for (std::int64_t c = 0; c < conv_dim; ++c) xbc1_in(0, c) = float(proj[d_inner + c]);
    for (std::int64_t h = 0; h < H; ++h) dt1(0, h) = float(proj[d_inner + conv_dim + h]);
    lin::causal_conv1d_step(xbc1_in, m.conv_w, m.conv_b, xbc1, conv_state, {lin::conv_activation::silu});
    for (std::int64_t c = 0; c < d_inner; ++c) x1(0, c / P, c % P) = xbc1(0, c);
    for (std::int64_t n = 0; n < N; ++n) {
      B1(0, 0, n) = xbc1(0, d_inner + n);
      C1(0, 0, n) = xbc1(0, d_inner + N + n);
    }
    lin::mamba2_step(x1, dt1, m.A, B1, C1, m.D, z1, m.dt_bias, y1, ssd_state, opt);
    for (std::int64_t c = 0; c < d_inner; ++c) y[c] = y1(0, c / P, c % P);
    finish(m, y.data(), &out[t * d_model]);
  }
  return out;
}

// max |a - b| / max |b|.
double relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

}  // namespace

int main() {
  const layer m = make_layer();
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> u(L * d_model);
  for (float& e : u) e = normal(rng);

  const std::vector<double> want = layer_by_hand(m, u);
  const double prefill_err = relative_error(layer_with_mnemo(m, u, L), want);
  const double decode_err = relative_error(layer_with_mnemo(m, u, L0), want);
  std::printf("Mamba-2 layer: d_model=%lld, H=%lld heads of P=%lld, N=%lld, conv width %lld, L=%lld\n",
              static_cast<long long>(d_model), static_cast<long long>(H), static_cast<long long>(P),
              static_cast<long long>(N), static_cast<long long>(W), static_cast<long long>(L));
  std::printf("a. one prefill call of %lld tokens vs the layer by hand:     max rel. error %.2e\n",
              static_cast<long long>(L), prefill_err);
  std::printf("b. prefill of %lld tokens + %lld steps vs the layer by hand: max rel. error %.2e\n",
              static_cast<long long>(L0), static_cast<long long>(L - L0), decode_err);
  constexpr double tolerance = 1e-4;  // f32 kernels against a double loop
  const bool ok = prefill_err < tolerance && decode_err < tolerance;
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
