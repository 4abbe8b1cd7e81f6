// mnemo/linear/common.hpp — what every member of the linear-attention family shares: options,
// boundary checks, row preparation (f32, L2 norm, feature maps), state access, decay tables,
// the (batch, head) loop and a GEMM wrapper.
//
// Conventions (DESIGN.md "Linear / recurrent conventions", ../shared/golden/README.md):
//   q, k [B, H, L, Dk], v [B, H, L, Dv], o [B, H, L, Dv], state S [B, H, Dk, Dv] in and out.
//   Every member writes the state first and then reads it:   o_t = (scale q_t)^T S_t,
//   scale = Dk^-0.5 unless options.scale says otherwise. Gates are log-decays g <= 0
//   (decay = exp(g)): one per head and step [B, H, L] or one per key channel [B, H, L, Dk].
//
// The state is updated in place (it holds S_L when the call returns), so a long input can be fed
// in pieces and a one-token call (or `*_step`) continues a prefill. An empty `state` view
// means "start from zero, do not return the final state". Every `*_step` also has an out-of-place
// form (read state_in, write state_out, the same view or disjoint) for the slots of a
// linear::state_ring, which rolls the state back by n tokens for speculative decoding
// (state_ring.hpp; helpers at the end of this file).
//
// Which kernel runs is chosen in one place, detail::choose_form(): `options.path` forces
// form::recurrent (one token at a time, what decode uses) or form::chunked (chunkwise-parallel,
// GEMM-shaped, the prefill path); form::automatic takes the recurrent form below
// `recurrent_below` tokens. Every member also has `reference::<member>`, the double-precision
// recurrence the tests trust.
//
// Numerics: inputs may be float, f16 or bf16 (q, k, v of one type); everything is computed in
// f32 (references in double); gates, beta and the state are f32.
// Decay products over a token range (j, t] are always formed as a sum of the log-gates in that
// exact range, accumulated in order (a prefix, a suffix or a running row), never as the
// difference of two cumulative sums: gates are <= 0, so every partial sum has one sign and no
// cancellation, and a gate of -inf makes the sums that cross it -inf and their exp exactly 0,
// with no (-inf) - (-inf) = NaN anywhere. (The one bounded exception is GLA under weak
// decay, whole chunks or diagonal sub-blocks, gla.hpp: finite factors exp(+-b), |b| <= 20.)
//
// NaN (gates, beta and gamma reject it with mnemo::error; q, k and v are data and propagate it):
// a NaN in q_t reaches o_t only, since q never enters the state. A NaN in k_t or v_t enters the
// state, so o_t and every later output of its (batch, head) are NaN: never a clean-looking row
// after it. Outputs before t are untouched in the recurrent form and the reference; the chunked
// form keeps every chunk before t's untouched but may also make the earlier tokens of t's own
// chunk NaN, because its intra-chunk products multiply the causally masked (zero) weights by the
// NaN (0 * NaN = NaN). Keeping them clean would need triangular products in place of the square
// GEMM tiles. Checked for every member in tests/reliability/extremes_test.cpp.
//
// Threads: (batch, head) pairs are independent and go to mnemo::parallel_for. The chunked
// kernels use Eigen's GEMM, which would start its own OpenMP team when called outside a parallel
// region (Eigen/src/Core/products/Parallelizer.h: omp_get_num_threads() == 1 and enough work).
// for_each_head() and gemm() keep it single-threaded, so a call never uses more threads than
// asked for (an oversubscribed Eigen team, spinning at its barriers, made a one-thread call 100x
// slower on this 2-core machine).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/serial_gemm.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/gemm.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::linear {

// Which kernel runs (see detail::choose_form).
enum class form { automatic, recurrent, chunked };

// Feature map phi applied to q and k (linear_attn only).
//   identity      phi(x) = x
//   elu_plus_one  phi(x) = elu(x) + 1                 (Katharopoulos et al., 2020)
//   relu          phi(x) = max(x, 0)
//   taylor2       phi(x) = [1, x / Dk^(1/4), vec(x x^T) / (sqrt(2) Dk^(1/2))], 1 + Dk + Dk^2 features,
//                 so phi(q).phi(k) = 1 + q.k/sqrt(Dk) + (q.k)^2/(2 Dk), the second-order Taylor
//                 expansion of exp(q.k/sqrt(Dk)) (Based, Arora et al., 2024, its TaylorExp map)
enum class feature_map { identity, elu_plus_one, relu, taylor2 };

struct options {
  float scale = 0;               // 0: Dk^-0.5 (1 for feature_map::taylor2, which carries its own 1/sqrt(Dk))
  std::int64_t chunk_size = 0;   // tokens per chunk of the chunked form; 0: the member's default (below)
  form path = form::automatic;   // force the recurrent or the chunked kernel
  int threads = 0;               // threads over (batch, head); 0: the OpenMP default
  bool use_qk_l2norm = false;    // replace q and k by x / sqrt(sum x^2 + 1e-6) first (fla's use_qk_l2norm_in_kernel)
  feature_map map = feature_map::identity;  // linear_attn only
  bool normalize = false;  // linear_attn only: o_t = num_t / (den_t + eps), see linear_attn.hpp
};

// L2 normalisation x / sqrt(sum x^2 + l2norm_eps), as fla's l2norm and the golden cases.
inline constexpr float l2norm_eps = 1e-6f;

// Eps of linear_attn's normalised read, o = num / (den + eps): 1e-6, as in fast-transformers'
// LinearAttention (Katharopoulos et al.'s reference code).
inline constexpr float normalize_eps = 1e-6f;

// Default chunk sizes (options.chunk_size = 0), the fastest at B = 1, H = 8, L = 8192,
// Dk = Dv = 128, one thread (bench rows linear/chunked/op:.../chunk:C, C = 8 to 128): 32 for
// linear_attn, retention, simple_gla and gla (16 is as fast for linear_attn and gla, 10-13% slower
// for retention and simple_gla; 64 is 3-12% slower) and 16 for the delta rules (32 is 4-8% slower, 64
// 18-19%: their solve and their two triangles grow with the chunk). Larger chunks put more work
// in the C x C triangles, smaller ones make the state GEMMs (C x Dk x Dv) too thin to run at speed.
// (Measured with Eigen's products. With the SIMD products, chunk_products below, chunks of 16, 24
// and 32 ran within 3% of each other in CPU time for linear_attn, simple_gla and gla, on a machine
// too loaded to rank them more finely; 48 and 64 were 3-12% slower.)
inline constexpr std::int64_t default_chunk_size = 32;
inline constexpr std::int64_t delta_default_chunk_size = 16;

// automatic: fewer tokens than this run the recurrent form. At B = 1, H = 8, Dk = Dv = 128, one
// thread (bench rows linear/<form>/op:.../L:1..8), the recurrent form is 1.4-1.7x faster for one
// token and 1.1-1.4x for two; at 4 tokens the chunked one is as fast (linear_attn, gla) or up to
// 1.4x faster (the others), at 8 tokens 1.5-1.9x.
inline constexpr std::int64_t recurrent_below = 4;

// Rows of the state for Dk input channels: Dk, or 1 + Dk + Dk^2 for taylor2.
inline std::int64_t feature_dim(feature_map map, std::int64_t Dk) {
  return map == feature_map::taylor2 ? 1 + Dk + Dk * Dk : Dk;
}

inline const char* feature_map_name(feature_map map) {
  switch (map) {
    case feature_map::identity: return "identity";
    case feature_map::elu_plus_one: return "elu_plus_one";
    case feature_map::relu: return "relu";
    case feature_map::taylor2: return "taylor2";
  }
  return "?";
}

namespace detail {

template <class T>
inline constexpr bool is_input_type_v = std::is_same_v<T, float> || std::is_same_v<T, f16> || std::is_same_v<T, bf16>;

// The element type of q, k and v, which must agree.
template <class Q, class K, class V>
struct input_type {
  using type = element_t<Q>;
  static_assert(std::is_same_v<type, element_t<K>> && std::is_same_v<type, element_t<V>>,
                "linear: q, k and v must have the same element type (float, mnemo::f16 or mnemo::bf16)");
};
template <class Q, class K, class V>
using input_t = typename input_type<Q, K, V>::type;

// Row-major f32 matrix: the chunk workspaces.
using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The validated sizes of one call.
struct dims {
  std::int64_t B, H, L, Dk, Dv;
  std::int64_t Df;  // rows of the state: feature_dim(map, Dk)
  std::int64_t Ds;  // columns of the state: Dv, or Dv + 1 with normalize (the last column is the key sum)
  float scale;
  feature_map map;
  bool l2norm;
  bool normalize;
};

// Checks q, k, v, o, state and the options shared by every member. `features`: whether the member
// accepts options.map and options.normalize (linear_attn).
template <class T>
dims check_common(const char* fn, const view<const T, 4>& q, const view<const T, 4>& k, const view<const T, 4>& v,
                  const view<float, 4>& o, const view<float, 4>& state, const options& opt, bool features) {
  static_assert(is_input_type_v<T>, "linear: q, k and v elements must be float, mnemo::f16 or mnemo::bf16");
  using mnemo::detail::require;
  using mnemo::detail::require_shape;
  // Zero-size arguments are valid (B, H or L = 0; a zero-size tensor has no buffer); a null view
  // with elements is not.
  mnemo::detail::require_data(fn, "q", q, " [B, H, L, Dk]");
  mnemo::detail::require_data(fn, "k", k, " [B, H, L, Dk]");
  mnemo::detail::require_data(fn, "v", v, " [B, H, L, Dv]");
  mnemo::detail::require_data(fn, "o", o, " [B, H, L, Dv]");
  const std::int64_t B = q.extent(0), H = q.extent(1), L = q.extent(2), Dk = q.extent(3), Dv = v.extent(3);
  require(Dk >= 1 && Dv >= 1, fn, ": head dims must be >= 1, got Dk=", Dk, " (q.shape[3]), Dv=", Dv, " (v.shape[3])");
  require_shape(fn, "k", k, {B, H, L, Dk}, " [B, H, L, Dk] (from q)");
  require_shape(fn, "v", v, {B, H, L, Dv}, " [B, H, L, Dv] (B, H, L from q)");
  require_shape(fn, "o", o, {B, H, L, Dv}, " [B, H, L, Dv]");
  require(opt.chunk_size >= 0, fn, ": options.chunk_size must be >= 0 (0: the default), got ", opt.chunk_size);
  require(opt.threads >= 0, fn, ": options.threads must be >= 0, got ", opt.threads);
  require(std::isfinite(opt.scale), fn, ": options.scale must be finite, got ", opt.scale);
  require(opt.path == form::automatic || opt.path == form::recurrent || opt.path == form::chunked, fn,
          ": options.path must be automatic, recurrent or chunked, got ", static_cast<int>(opt.path));
  if (!features) {
    require(opt.map == feature_map::identity, fn, ": options.map must be identity (feature maps are for linear_attn), got ",
            feature_map_name(opt.map));
    require(!opt.normalize, fn, ": options.normalize must be false (normalisation is for linear_attn), got true");
  }
  const std::int64_t Df = feature_dim(opt.map, Dk);
  const std::int64_t Ds = opt.normalize ? Dv + 1 : Dv;
  if (!state.empty())
    require_shape(fn, "state", state, {B, H, Df, Ds},
                  opt.normalize ? " [B, H, Df, Dv + 1] (normalize: the last column holds the key sum)" : " [B, H, Dk, Dv]");
  // Aliasing (docs/errors.md): the chunked form reads a chunk's q, k and v after it has written
  // rows of o, and form::automatic picks the form by L, so for every form o overlaps no input and
  // the state (read and written) overlaps neither o nor an input.
  using mnemo::detail::require_disjoint;
  require_disjoint(fn, "o", o, "q", q);
  require_disjoint(fn, "o", o, "k", k);
  require_disjoint(fn, "o", o, "v", v);
  require_disjoint(fn, "state", state, "o", o);
  require_disjoint(fn, "state", state, "q", q);
  require_disjoint(fn, "state", state, "k", k);
  require_disjoint(fn, "state", state, "v", v);
  const double default_scale = opt.map == feature_map::taylor2 ? 1.0 : 1.0 / std::sqrt(static_cast<double>(Dk));
  const float scale = opt.scale != 0 ? opt.scale : static_cast<float>(default_scale);
  return {B, H, L, Dk, Dv, Df, Ds, scale, opt.map, opt.use_qk_l2norm, opt.normalize};
}

// True when every x[i] <= 0 (so none is NaN). Tested on the bit patterns, +0 = 0x00000000 and
// -0 .. -inf = 0x80000000 .. 0xFF800000 (the negative NaNs lie above), because GCC left the float
// compare `ok &= x[i] <= 0` scalar (vcomiss per element: 12% of a chunked GLA call at H = 8,
// L = 8192, Dk = 128 went into checking its gates); the integer form vectorises.
inline bool all_nonpositive(const float* x, std::int64_t n) {
  constexpr std::uint32_t negative_zero = 0x80000000u, negative_inf = 0xFF800000u;
  std::uint32_t bad = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(x[i]);
    bad |= static_cast<std::uint32_t>(u != 0) & static_cast<std::uint32_t>(u - negative_zero > negative_inf - negative_zero);
  }
  return bad == 0;
}

// g [B, H, L]: every log-decay <= 0 and not NaN (-inf is allowed: decay 0).
inline void check_scalar_gate(const char* fn, const view<const float, 3>& g, const dims& d) {
  mnemo::detail::require_data(fn, "g", g, " [B, H, L]");
  mnemo::detail::require_shape(fn, "g", g, {d.B, d.H, d.L}, " [B, H, L]");
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.H; ++h) {
      if (d.L == 0 || all_nonpositive(g.ptr(b, h), d.L)) continue;
      for (std::int64_t t = 0; t < d.L; ++t)
        mnemo::detail::require(g(b, h, t) <= 0.0f, fn, ": g (log-decay) must be <= 0 and not NaN, got g[", b, ", ",
                               h, ", ", t, "] = ", g(b, h, t));
    }
}

// g [B, H, L, Dk]: every log-decay <= 0 and not NaN.
inline void check_channel_gate(const char* fn, const view<const float, 4>& g, const dims& d) {
  mnemo::detail::require_data(fn, "g", g, " [B, H, L, Dk]");
  mnemo::detail::require_shape(fn, "g", g, {d.B, d.H, d.L, d.Dk}, " [B, H, L, Dk]");
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.H; ++h)
      for (std::int64_t t = 0; t < d.L; ++t) {
        const float* row = g.ptr(b, h, t);
        if (all_nonpositive(row, d.Dk)) continue;
        for (std::int64_t c = 0; c < d.Dk; ++c)
          mnemo::detail::require(row[c] <= 0.0f, fn, ": g (log-decay) must be <= 0 and not NaN, got g[", b, ", ", h,
                                 ", ", t, ", ", c, "] = ", row[c]);
      }
}

// beta [B, H, L] in [0, 2] (see delta_rule.hpp for why 2).
inline constexpr float beta_max = 2.0f;

inline void check_beta(const char* fn, const view<const float, 3>& beta, const dims& d) {
  mnemo::detail::require_data(fn, "beta", beta, " [B, H, L]");
  mnemo::detail::require_shape(fn, "beta", beta, {d.B, d.H, d.L}, " [B, H, L]");
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.H; ++h)
      for (std::int64_t t = 0; t < d.L; ++t) {
        const float x = beta(b, h, t);
        mnemo::detail::require(x >= 0.0f && x <= beta_max, fn, ": beta must be in [0, ", beta_max, "], got beta[", b,
                               ", ", h, ", ", t, "] = ", x);
      }
}

// Tokens per chunk: options.chunk_size, or the member's default when it is 0.
inline std::int64_t chunk_size(const options& opt, std::int64_t member_default) {
  return opt.chunk_size > 0 ? opt.chunk_size : member_default;
}

// The path one call takes; the one place where it is decided.
inline form choose_form(const options& opt, std::int64_t L) {
  if (opt.path != form::automatic) return opt.path;
  return L < recurrent_below ? form::recurrent : form::chunked;
}

// Runs body(i) for i in [0, n): over threads with parallel_for, or serially with Eigen's own GEMM
// threading switched off when `eigen` is set (core/serial_gemm.hpp).
template <class Body>
void for_each_head(std::int64_t n, int threads, bool eigen, Body&& body) {
  mnemo::detail::for_each_item(n, threads, eigen, std::forward<Body>(body));
}

// dst = lhs * rhs, or dst += lhs * rhs with Accumulate, on the calling thread only.
template <bool Accumulate, class Dst, class Lhs, class Rhs>
void gemm(Dst&& dst, const Lhs& lhs, const Rhs& rhs) {
  using mnemo::detail::accumulate;
  mnemo::detail::gemm<Accumulate ? accumulate::add : accumulate::assign>(std::forward<Dst>(dst), lhs, rhs);
}

// One (batch, head) slice of every tensor of a call: rows are tokens.
template <class T>
struct head_views {
  view<const T, 2> q, k;  // [L, Dk]
  view<const T, 2> v;     // [L, Dv]
  view<float, 2> o;       // [L, Dv]
  view<float, 2> state;   // [Df, Ds] or empty

  head_views(const view<const T, 4>& q4, const view<const T, 4>& k4, const view<const T, 4>& v4,
             const view<float, 4>& o4, const view<float, 4>& s4, std::int64_t b, std::int64_t h)
      : q(q4[b][h]), k(k4[b][h]), v(v4[b][h]), o(o4[b][h]) {
    if (!s4.empty()) state = s4[b][h];
  }
};

// Prepares one q or k row: to f32, optional L2 norm, feature map, times `mult`.
// out [Df]; scratch [Dk] (used by taylor2 only).
template <class Arch, class T>
void prepare_row(const T* x, const dims& d, float mult, float* out, float* scratch) {
  float* f = d.map == feature_map::taylor2 ? scratch : out;
  simd::convert<Arch>(x, f, d.Dk);
  if (d.l2norm) {
    const float ss = simd::dot<Arch>(f, f, d.Dk);
    simd::scale<Arch>(1.0f / std::sqrt(ss + l2norm_eps), f, d.Dk);
  }
  switch (d.map) {
    case feature_map::identity: break;
    case feature_map::elu_plus_one:
      for (std::int64_t c = 0; c < d.Dk; ++c) f[c] = f[c] > 0.0f ? f[c] + 1.0f : simd::exp<Arch>(f[c]);
      break;
    case feature_map::relu:
      for (std::int64_t c = 0; c < d.Dk; ++c) f[c] = std::max(f[c], 0.0f);
      break;
    case feature_map::taylor2: {
      const double dk = static_cast<double>(d.Dk);
      const float first = static_cast<float>(1.0 / std::sqrt(std::sqrt(dk)));  // Dk^(-1/4)
      const float second = static_cast<float>(1.0 / std::sqrt(2.0 * dk));      // 1 / (sqrt(2) Dk^(1/2))
      out[0] = 1.0f;
      for (std::int64_t c = 0; c < d.Dk; ++c) out[1 + c] = f[c] * first;
      float* quad = out + 1 + d.Dk;
      for (std::int64_t i = 0; i < d.Dk; ++i) {
        const float fi = f[i] * second;
        for (std::int64_t j = 0; j < d.Dk; ++j) quad[i * d.Dk + j] = fi * f[j];
      }
      break;
    }
  }
  if (mult != 1.0f) simd::scale<Arch>(mult, out, d.Df);
}

// Rows [t0, t0 + n) of a [L, Dk] head view, prepared, into rows of `dst` (n x Df).
template <class Arch, class T>
void prepare_rows(const view<const T, 2>& src, std::int64_t t0, std::int64_t n, const dims& d, float mult, matrix& dst,
                  float* scratch) {
  for (std::int64_t i = 0; i < n; ++i) prepare_row<Arch>(src.ptr(t0 + i), d, mult, dst.row(i).data(), scratch);
}

// Rows [t0, t0 + n) of v to f32 into `dst` (n x Ds); with normalize, column Dv is 1.
template <class Arch, class T>
void load_values(const view<const T, 2>& v, std::int64_t t0, std::int64_t n, const dims& d, matrix& dst) {
  for (std::int64_t i = 0; i < n; ++i) {
    float* row = dst.row(i).data();
    simd::convert<Arch>(v.ptr(t0 + i), row, d.Dv);
    if (d.normalize) row[d.Dv] = 1.0f;
  }
}

// One output row from a state-shaped row (Ds values): copies Dv values, or divides them by the
// key-sum column with normalize.
inline void store_output(const float* row, const dims& d, float* out) {
  if (d.normalize) {
    const float inv = 1.0f / (row[d.Dv] + normalize_eps);
    for (std::int64_t c = 0; c < d.Dv; ++c) out[c] = row[c] * inv;
  } else {
    std::copy(row, row + d.Dv, out);
  }
}

// The (b, h) state [Df, Ds] as an Eigen matrix the kernels update in place: the caller's rows
// themselves (no copy in or out, which for a one-token step would cost as much as the step), or
// `zero`, sized and zeroed, when the call has no state.
using state_map = Eigen::Map<matrix, Eigen::Unaligned, Eigen::OuterStride<>>;

inline state_map map_state(const view<float, 2>& state, std::int64_t rows, std::int64_t cols, matrix& zero) {
  if (state.empty()) {
    zero.setZero(rows, cols);
    return {zero.data(), rows, cols, Eigen::OuterStride<>(cols)};
  }
  return {state.data(), rows, cols, Eigen::OuterStride<>(state.stride(0))};
}

// ---- one token of the recurrent form ---------------------------------------------------------
//
// Every member's recurrent step is, per token, over the state S [Df, Ds]:
//   u   = v                                  (linear attention, retention, the GLAs)
//   u   = beta (v - a S^T k)                 (the delta rules; a = the scalar decay or 1)
//   u   = beta (v - S^T kr)                  (KDA: kr = e o k, the per-row decays folded into the key)
//   S_i = a_i S_i + k_i u                    (a_i: 1, one scalar decay a, or a per-row decay e_i)
//   out = q^T S                              (q already scaled)
// The columns are independent, so the kernel walks S in column blocks of up to recurrent_vecs
// vectors with the block of u (and of out) in registers: each element of S is loaded, updated,
// stored and multiplied into out in one pass, and the delta rules' S^T k reads the block just
// before its update, from L1 (a block is Df x 64 floats, 32 KiB at Df = 128). A decoding step is
// then one read-modify-write pass over the state: at B = 1, H = 32, Dk = Dv = 128, one thread, the
// previous loop of simd::scale / axpy / axpy calls per row (and a separate S^T k pass for the delta
// rules) took 1.5x (linear_attn) to 2.6x (gated_delta_rule) the time of a plain pass S = a S + b
// (bench rows linear/step, linear/rmw_pass).
inline constexpr int recurrent_vecs = 4;

struct token_decay {
  float a = 1.0f;                 // scalar decay of every row
  const float* rows = nullptr;    // [Df] per-row decays, or null
  float at(std::int64_t i) const { return rows ? rows[i] : a; }
};

// The readable loop (and the no-SIMD path) over columns [c0, c1).
inline void recurrent_token_columns(const float* src, std::int64_t ldsrc, float* s, std::int64_t lds, std::int64_t Df,
                                    std::int64_t c0, std::int64_t c1, const float* q, const float* k, const float* kr,
                                    const float* v, const float* beta, token_decay decay, float* out) {
  for (std::int64_t c = c0; c < c1; ++c) {
    float u = v[c];
    if (beta) {
      float w = 0;
      for (std::int64_t i = 0; i < Df; ++i) w += src[i * ldsrc + c] * kr[i];
      u = *beta * (v[c] - decay.a * w);
    }
    float acc = 0;
    for (std::int64_t i = 0; i < Df; ++i) {
      const float x = decay.at(i) * src[i * ldsrc + c] + k[i] * u;
      s[i * lds + c] = x;
      acc += q[i] * x;
    }
    out[c] = acc;
  }
}

// One column block of NV vectors starting at column c0. OutOfPlace: read src, write s; else read
// and write s (src unused), so the compiler sees that a row's loads and stores are the same memory
// (with two pointers that may alias it orders them: 3-6% slower steps at B = 1, H = 32, D = 128).
template <int NV, bool OutOfPlace, class Arch>
void recurrent_token_block(const float* src, std::int64_t ldsrc, float* s, std::int64_t lds, std::int64_t Df,
                           std::int64_t c0, const float* q, const float* k, const float* kr, const float* v,
                           const float* beta, token_decay decay, float* out) {
  using batch = simd::fbatch<Arch>;
  constexpr std::int64_t w = simd::width<Arch>;
  batch u[NV], acc[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) {
    u[j] = simd::load<Arch>(v + c0 + j * w);
    acc[j] = batch(0.0f);
  }
  if (beta) {  // u = beta (v - a S^T kr), acc doubles as the S^T kr accumulator
    for (std::int64_t i = 0; i < Df; ++i) {
      const float* row = OutOfPlace ? src + i * ldsrc + c0 : s + i * lds + c0;
      const batch ki(kr[i]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[j] = simd::detail::fmadd(ki, simd::load<Arch>(row + j * w), acc[j]);
    }
    const batch b(*beta), a(decay.a);
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      u[j] = b * (u[j] - a * acc[j]);
      acc[j] = batch(0.0f);
    }
  }
  for (std::int64_t i = 0; i < Df; ++i) {
    float* row = s + i * lds + c0;
    const float* in = OutOfPlace ? src + i * ldsrc + c0 : row;
    const batch ki(k[i]), qi(q[i]), ai(decay.at(i));
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      const batch x = simd::detail::fmadd(ki, u[j], ai * simd::load<Arch>(in + j * w));
      simd::store(row + j * w, x);
      acc[j] = simd::detail::fmadd(qi, x, acc[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) simd::store(out + c0 + j * w, acc[j]);
}

// The column blocks of recurrent_token (below); returns the first column they leave to the scalar loop.
template <bool OutOfPlace, class Arch>
[[gnu::always_inline]] inline std::int64_t recurrent_token_blocks(const float* src, std::int64_t ldsrc, float* s,
                                                                  std::int64_t lds, std::int64_t Df, std::int64_t Ds,
                                                                  const float* q, const float* k, const float* kr,
                                                                  const float* v, const float* beta, token_decay decay,
                                                                  float* out) {
  constexpr std::int64_t w = simd::width<Arch>;
  std::int64_t c = 0;
  for (; c + recurrent_vecs * w <= Ds; c += recurrent_vecs * w)
    recurrent_token_block<recurrent_vecs, OutOfPlace, Arch>(src, ldsrc, s, lds, Df, c, q, k, kr, v, beta, decay, out);
  for (; c + w <= Ds; c += w)
    recurrent_token_block<1, OutOfPlace, Arch>(src, ldsrc, s, lds, Df, c, q, k, kr, v, beta, decay, out);
  return c;
}

// One token over the whole state (see above): beta null for the non-delta members. kr: the key
// the delta correction reads (S^T kr), null for k itself. src: the state the token reads, with
// row stride ldsrc, when it is not s (an out-of-place step: read src, write s, the same traffic as
// in place); null for s itself. Always inlined: each member's call then compiles only the branches
// it takes (the out-of-line function cost gla's step 3% at B = 1, H = 32, D = 128).
template <class Arch>
[[gnu::always_inline]] inline void recurrent_token(float* s, std::int64_t lds, std::int64_t Df, std::int64_t Ds,
                                                   const float* q, const float* k, const float* v, const float* beta,
                                                   token_decay decay, float* out, const float* kr = nullptr,
                                                   const float* src = nullptr, std::int64_t ldsrc = 0) {
  if (!kr) kr = k;
  const bool separate = src != nullptr && src != s;
  if (!separate) {
    src = s;
    ldsrc = lds;
  }
  std::int64_t c = 0;
  if constexpr (simd::vectorized<Arch>) {
    c = separate ? recurrent_token_blocks<true, Arch>(src, ldsrc, s, lds, Df, Ds, q, k, kr, v, beta, decay, out)
                 : recurrent_token_blocks<false, Arch>(src, ldsrc, s, lds, Df, Ds, q, k, kr, v, beta, decay, out);
  }
  recurrent_token_columns(src, ldsrc, s, lds, Df, c, Ds, q, k, kr, v, beta, decay, out);
}

// ---- SIMD chunk products -------------------------------------------------------------------
//
// The chunked forms spend their time in the same three products per chunk of n tokens:
//   O = diag(alpha_o) (Qr S) + A V        Qr [n, Df] the rows that read the state, A [n, n] lower
//   S = diag(alpha_s) S + Kw^T V          Kw [n, Df] the rows that write it
// Through Eigen every product packs both operands first: in the chunked linear_attn at H = 8,
// L = 8192, Dk = Dv = 128, chunk 32, one thread, perf put 27% of the time in Eigen's packing
// routines and 44% in its kernel. simd::gemm reads B (S or V) where it lies and broadcasts A, so
// nothing is packed, and the products go column block by column block (nv vectors of Ds) so a
// block of S (128 x 64 floats = 32 KiB) stays in L1 from its read to its update. The triangle A V
// goes in row blocks of the micro-kernel's height whose reduction stops at the block's last row.
// Runs where the SIMD layer is on and Ds is a multiple of the vector width; the Eigen products
// stay the path otherwise.
template <class Arch>
bool simd_chunks(std::int64_t Ds) {
  return simd::vectorized<Arch> && Ds % simd::width<Arch> == 0;
}

// A row-major f32 block: its first element and its row stride.
struct crows {
  const float* p;
  std::int64_t ld;
};
struct rows {
  float* p;
  std::int64_t ld;
};

// O (mode)= A V with A [n, n] lower triangular (zero above the diagonal) over w columns, in row
// blocks of the micro-kernel's height whose reduction stops at the block's last row; the short
// block (n % mr rows) goes first, where its reduction is short. alpha [n] null: O += A V, else
// O = diag(alpha) O + A V.
template <class Arch>
void lower_product(std::int64_t n, std::int64_t w, crows a, crows v, rows o, const float* alpha) {
  constexpr std::int64_t mr = simd::gemm_blocking<Arch>::mr;
  for (std::int64_t i0 = 0, m = n % mr != 0 ? n % mr : mr; i0 < n; i0 += m, m = mr)
    simd::gemm<simd::a_order::row_major, Arch>(m, w, i0 + m, a.p + i0 * a.ld, a.ld, v.p, v.ld, o.p + i0 * o.ld, o.ld,
                                              alpha ? simd::c_mode::rescale : simd::c_mode::accumulate,
                                              alpha ? alpha + i0 : nullptr);
}

// The products above for one chunk. a must be zero above the diagonal; alpha_o [n] and
// alpha_s [Df] may be null (no rescale). s [Df, Ds] with row stride lds.
template <class Arch>
void chunk_products(std::int64_t n, std::int64_t Df, std::int64_t Ds, crows qr, crows a, crows kw, crows v, rows o,
                    float* s, std::int64_t lds, const float* alpha_o, const float* alpha_s) {
  using simd::a_order;
  using simd::c_mode;
  constexpr std::int64_t cb = simd::gemm_blocking<Arch>::nv * simd::width<Arch>;
  for (std::int64_t j0 = 0; j0 < Ds; j0 += cb) {
    const std::int64_t w = std::min(cb, Ds - j0);
    simd::gemm<a_order::row_major, Arch>(n, w, Df, qr.p, qr.ld, s + j0, lds, o.p + j0, o.ld, c_mode::overwrite);
    lower_product<Arch>(n, w, a, {v.p + j0, v.ld}, {o.p + j0, o.ld}, alpha_o);
    simd::gemm<a_order::col_major, Arch>(Df, w, n, kw.p, kw.ld, v.p + j0, v.ld, s + j0, lds,
                                         alpha_s ? c_mode::rescale : c_mode::accumulate, alpha_s);
  }
}

// Decay tables of one chunk with one log-gate per token, g[0 .. n):
//   decay(t, j) = exp(sum_{j < s <= t} g_s)  for j <= t  (lower triangle of an n x n matrix; 1 on the diagonal)
//   prefix[t]   = exp(sum_{s <= t} g_s)      decay of the chunk's initial state at token t
//   suffix[j]   = exp(sum_{j < s < n} g_s)   decay from token j to the end of the chunk
// Row t of the log table is row t-1 plus g_t (so each entry is a sum over its exact range, in order).
template <class Arch>
void scalar_decay_tables(const float* g, std::int64_t n, matrix& decay, float* prefix, float* suffix) {
  decay(0, 0) = 0.0f;
  for (std::int64_t t = 1; t < n; ++t) {
    const float* prev = decay.row(t - 1).data();
    float* row = decay.row(t).data();
    for (std::int64_t j = 0; j < t; ++j) row[j] = prev[j] + g[t];
    row[t] = 0.0f;
  }
  float acc = 0.0f;
  for (std::int64_t t = 0; t < n; ++t) {
    acc += g[t];
    prefix[t] = acc;
  }
  for (std::int64_t t = 0; t < n; ++t) simd::exp_sum<Arch>(decay.row(t).data(), t + 1, 0.0f);
  simd::exp_sum<Arch>(prefix, n, 0.0f);
  std::copy(decay.row(n - 1).data(), decay.row(n - 1).data() + n, suffix);
}

// ---- references (double) -------------------------------------------------------------------

// One q or k row prepared in double: L2 norm, feature map, times mult.
template <class T>
std::vector<double> reference_row(const T* x, const dims& d, double mult) {
  std::vector<double> f(static_cast<std::size_t>(d.Dk));
  for (std::int64_t c = 0; c < d.Dk; ++c) f[c] = static_cast<double>(to_float(x[c]));
  if (d.l2norm) {
    double ss = 0;
    for (double e : f) ss += e * e;
    const double inv = 1.0 / std::sqrt(ss + static_cast<double>(l2norm_eps));
    for (double& e : f) e *= inv;
  }
  std::vector<double> out;
  switch (d.map) {
    case feature_map::identity: out = f; break;
    case feature_map::elu_plus_one:
      for (double e : f) out.push_back(e > 0 ? e + 1 : std::exp(e));
      break;
    case feature_map::relu:
      for (double e : f) out.push_back(std::max(e, 0.0));
      break;
    case feature_map::taylor2: {
      const double dk = static_cast<double>(d.Dk);
      out.push_back(1.0);
      for (double e : f) out.push_back(e / std::sqrt(std::sqrt(dk)));
      for (double a : f)
        for (double b : f) out.push_back(a * b / std::sqrt(2.0 * dk));
      break;
    }
  }
  for (double& e : out) e *= mult;
  return out;
}

// A v row in double (with the trailing 1 of normalize).
template <class T>
std::vector<double> reference_values(const T* x, const dims& d) {
  std::vector<double> out(static_cast<std::size_t>(d.Ds), 1.0);
  for (std::int64_t c = 0; c < d.Dv; ++c) out[c] = static_cast<double>(to_float(x[c]));
  return out;
}

// The (b, h) state as Df x Ds doubles (row-major), zeros when there is none.
inline std::vector<double> reference_load_state(const view<float, 2>& state, const dims& d) {
  std::vector<double> s(static_cast<std::size_t>(d.Df * d.Ds), 0.0);
  if (!state.empty())
    for (std::int64_t i = 0; i < d.Df; ++i)
      for (std::int64_t c = 0; c < d.Ds; ++c) s[i * d.Ds + c] = state(i, c);
  return s;
}

inline void reference_store_state(const std::vector<double>& s, const dims& d, const view<float, 2>& state) {
  if (state.empty()) return;
  for (std::int64_t i = 0; i < d.Df; ++i)
    for (std::int64_t c = 0; c < d.Ds; ++c) state(i, c) = static_cast<float>(s[i * d.Ds + c]);
}

// o_t = q_t^T S (q already scaled), normalised as store_output does.
inline void reference_read(const std::vector<double>& q, const std::vector<double>& s, const dims& d, float* out) {
  std::vector<double> acc(static_cast<std::size_t>(d.Ds), 0.0);
  for (std::int64_t i = 0; i < d.Df; ++i)
    for (std::int64_t c = 0; c < d.Ds; ++c) acc[c] += q[i] * s[i * d.Ds + c];
  const double den = d.normalize ? acc[d.Dv] + static_cast<double>(normalize_eps) : 1.0;
  for (std::int64_t c = 0; c < d.Dv; ++c) out[c] = static_cast<float>(acc[c] / den);
}

// ---- one-token views for the *_step entry points -------------------------------------------

// [B, H, D] -> [B, H, 1, D] (a null view keeps its shape: zero-size inputs follow the rule of
// check_common)
template <class T>
view<T, 4> token_view(const view<T, 3>& x) {
  return {x.data(), {x.extent(0), x.extent(1), 1, x.extent(2)}, {x.stride(0), x.stride(1), x.extent(2), 1}};
}

// [B, H] -> [B, H, 1]
template <class T>
view<T, 3> token_view(const view<T, 2>& x) {
  return {x.data(), {x.extent(0), x.extent(1), 1}, {x.stride(0), x.stride(1), 1}};
}

// ---- out-of-place steps (speculative decoding, state_ring.hpp) ------------------------------
//
// Every member's *_step has a second form that reads state_in and writes state_out: the same
// memory traffic as in place (recurrent_token reads each row from state_in and stores it to
// state_out), so the slots of a linear::state_ring keep the last states without a copy. Its head
// kernels take the source as a template flag (FromSrc), so the in-place form compiles exactly as
// before (recurrent_token's notes: a possibly aliasing second pointer cost the steps 2-6%).

// The checks of an out-of-place step (q4 ... o4: the token views): check_common with state_out as
// the state, which must be given; state_in of state_out's shape and disjoint from o; state_in and
// state_out the same view (an in-place step) or disjoint.
template <class T>
dims check_step_states(const char* fn, const view<const T, 4>& q4, const view<const T, 4>& k4,
                       const view<const T, 4>& v4, const view<float, 4>& o4, const view<const float, 4>& state_in,
                       const view<float, 4>& state_out, const options& opt, bool features) {
  using mnemo::detail::require_data;
  using mnemo::detail::require_disjoint;
  using mnemo::detail::require_shape;
  const char* shape_note = features ? " [B, H, Df, Dv (+1)]" : " [B, H, Dk, Dv]";
  require_data(fn, "state_out", state_out, shape_note);
  const dims d = check_common<T>(fn, q4, k4, v4, o4, state_out, opt, features);
  require_data(fn, "state_in", state_in, shape_note);
  require_shape(fn, "state_in", state_in, {d.B, d.H, d.Df, d.Ds}, " (state_out's shape)");
  require_disjoint(fn, "o", o4, "state_in", state_in);
  if (!same_view(state_in, state_out))
    require_disjoint(fn, "state_out", state_out, "state_in", state_in, "; they may be the same view (in place)");
  return d;
}

// Runs head(hv, b, h, src) over every (batch, head) of an out-of-place step: hv.state is
// state_out[b][h], src is state_in[b][h].
template <class T, class Head>
void for_each_step_head(const dims& d, const view<const T, 4>& q4, const view<const T, 4>& k4,
                        const view<const T, 4>& v4, const view<float, 4>& o4, const view<const float, 4>& state_in,
                        const view<float, 4>& state_out, int threads, Head&& head) {
  for_each_head(d.B * d.H, threads, false, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const head_views<T> hv(q4, k4, v4, o4, state_out, b, h);
    head(hv, b, h, state_in[b][h]);
  });
}

}  // namespace detail
}  // namespace mnemo::linear
