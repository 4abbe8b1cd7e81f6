// mnemo/memory/recurrent_memory.hpp — segment recurrence with memory tokens (RMT: Bulatov,
// Kuratov & Burtsev, "Recurrent Memory Transformer", NeurIPS 2022) and the associative memory of
// ARMT (Rodkin, Kuratov, Bulatov & Burtsev, "Associative Recurrent Memory Transformer", 2024).
//
// RMT. A long input x [B, L, D] is cut into segments of S tokens (the last may be shorter). M
// memory tokens [B, M, D] carry state from segment to segment through a user-supplied block (any
// callable: a transformer, a test stub):
//   in  = [mem; x_seg; mem]            read memory, the segment, write memory (decoder layout)
//   out = block(in)                    [B, M + n + M, D]
//   y_seg = out[M : M + n],  mem = out[M + n :]
// With separate_write = false (the encoder layout of the paper) in = [mem; x_seg] and the new
// memory is out[: M].
//
// ARMT. Each layer keeps an associative matrix A [F, Dv] and a normaliser z [F] per head, F =
// 2 nu Dk, with phi(x) = DPFP_nu(x) / ||DPFP_nu(x)|| (memory/common.hpp; ARMT uses nu = 3). After a
// segment, the layer's M output memory tokens give keys k_i, values v_i and gates beta_i in (0, 1)
// (the layer's projections, supplied by the caller), and the memory learns them by a delta rule:
//   vbar_i  = phi(k_i) A / (z . phi(k_i) + eps)                    what A already returns for k_i
//   gamma_i = clip(1 - (z . phi(k_i) + eps) / |phi(k_i)|^2, 0, 1)  how new k_i is (1 without correction)
//   A += sum_i beta_i phi(k_i)^T (v_i - vbar_i),   z += sum_i gamma_i phi(k_i)
// On the first segment (an empty memory) vbar = 0 and gamma = 1. Every token of the next segment
// reads  o_t = phi(q_t) A / (z . phi(q_t) + eps)  (added to its hidden state by the layer). All
// memory tokens of a segment are written against the same A_{s-1}, z_{s-1}, as in the authors'
// code (RodkinIvan/associative-recurrent-memory-transformer, modeling_amt/language_modeling.py).
//
// Shapes: ARMT q [B, H, L, Dk], k [B, H, M, Dk], v [B, H, M, Dv], beta [B, H, M], out [B, H, L,
// Dv]; state A [B, H, F, Dv], z [B, H, F].
// Paths: reference::armt_* in double; the fast path in f32 with Eigen GEMMs. The RMT helpers are
// plumbing (copies and the caller's block), one version only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"

namespace mnemo::memory {

// ---------------------------------------------------------------------------------------------
// RMT segment recurrence.

struct rmt_options {
  std::int64_t segment_len = 0;  // S >= 1
  bool separate_write = true;    // [mem; seg; mem] (decoder) or [mem; seg] (encoder)
};

// Tokens of the block's input for a segment of n tokens and M memory tokens.
inline std::int64_t rmt_block_len(std::int64_t M, std::int64_t n, bool separate_write = true) {
  return separate_write ? M + n + M : M + n;
}

// input = [memory; segment; memory] (or [memory; segment]).
inline void rmt_assemble(view<const float, 3> memory,   // [B, M, D]
                         view<const float, 3> segment,  // [B, n, D]
                         view<float, 3> input,          // [B, M + n (+ M), D]
                         bool separate_write = true) {
  constexpr const char* fn = "memory::rmt_assemble";
  const std::int64_t B = memory.extent(0), M = memory.extent(1), D = memory.extent(2), n = segment.extent(1);
  mnemo::detail::require_shape(fn, "segment", segment, {B, n, D}, " [B, n, D] (B, D from memory)");
  mnemo::detail::require_shape(fn, "input", input, {B, rmt_block_len(M, n, separate_write), D},
                               separate_write ? " [B, M + n + M, D]" : " [B, M + n, D]");
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t i = 0; i < M; ++i) {
      std::copy(memory.ptr(b, i), memory.ptr(b, i) + D, input.ptr(b, i));
      if (separate_write) std::copy(memory.ptr(b, i), memory.ptr(b, i) + D, input.ptr(b, M + n + i));
    }
    for (std::int64_t t = 0; t < n; ++t) std::copy(segment.ptr(b, t), segment.ptr(b, t) + D, input.ptr(b, M + t));
  }
}

// Runs the whole input through `block` segment by segment (see the header). `memory` is read at
// the start and holds the last segment's memory at the end. block(in, out) is called with
// view<const float, 3> in and view<float, 3> out of shape [B, rmt_block_len(M, n), D].
template <class Block>
void rmt_forward(view<const float, 3> x,  // [B, L, D]
                 view<float, 3> memory,   // [B, M, D], in and out
                 Block&& block,
                 view<float, 3> y,  // [B, L, D]
                 const rmt_options& opt) {
  constexpr const char* fn = "memory::rmt_forward";
  const std::int64_t B = x.extent(0), L = x.extent(1), D = x.extent(2), M = memory.extent(1), S = opt.segment_len;
  mnemo::detail::require(S >= 1, fn, ": options.segment_len must be >= 1, got ", S);
  mnemo::detail::require_shape(fn, "memory", memory, {B, M, D}, " [B, M, D] (B, D from x)");
  mnemo::detail::require_shape(fn, "y", y, {B, L, D}, " [B, L, D]");
  const std::int64_t cap = rmt_block_len(M, std::min(S, L), opt.separate_write);
  tensor<float, 3> in({B, cap, D}), out({B, cap, D});
  for (std::int64_t t0 = 0; t0 < L; t0 += S) {
    const std::int64_t n = std::min(S, L - t0), len = rmt_block_len(M, n, opt.separate_write);
    const view<float, 3> iv = in.as_view().narrow(1, 0, len), ov = out.as_view().narrow(1, 0, len);
    rmt_assemble(memory, x.narrow(1, t0, n), iv, opt.separate_write);
    block(view<const float, 3>(iv), ov);
    const std::int64_t write = opt.separate_write ? M + n : 0;
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t t = 0; t < n; ++t) std::copy(ov.ptr(b, M + t), ov.ptr(b, M + t) + D, y.ptr(b, t0 + t));
      for (std::int64_t i = 0; i < M; ++i) std::copy(ov.ptr(b, write + i), ov.ptr(b, write + i) + D, memory.ptr(b, i));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ARMT associative memory.

struct armt_options {
  float eps = 1e-5f;        // in every denominator z . phi + eps, as the authors' code
  bool correction = true;   // gamma as above; false: gamma = 1
  int threads = 0;          // 0: the OpenMP default
};

// A [B, H, F, Dv], z [B, H, F] with F = 2 nu Dk, and the number of segments written.
class associative_memory {
 public:
  associative_memory() = default;
  associative_memory(std::int64_t B, std::int64_t H, std::int64_t Dk, std::int64_t Dv, int nu = 3)
      : nu_(nu), dk_(Dk), a_({B, H, 2 * nu * Dk, Dv}), z_({B, H, 2 * nu * Dk}) {
    mnemo::detail::require(B >= 1 && H >= 1 && Dk >= 1 && Dv >= 1 && nu >= 1,
                           "associative_memory: B, H, Dk, Dv, nu must be >= 1, got B=", B, ", H=", H, ", Dk=", Dk,
                           ", Dv=", Dv, ", nu=", nu);
  }

  std::int64_t batch() const { return a_.extent(0); }
  std::int64_t heads() const { return a_.extent(1); }
  std::int64_t key_dim() const { return dk_; }
  std::int64_t feature_dim() const { return a_.extent(2); }
  std::int64_t value_dim() const { return a_.extent(3); }
  int nu() const { return nu_; }
  std::int64_t segments() const { return segments_; }
  bool empty() const { return a_.size() == 0; }

  view<float, 4> matrix() { return a_; }  // [B, H, F, Dv]
  view<const float, 4> matrix() const { return a_; }
  view<float, 3> normalizer() { return z_; }  // [B, H, F]
  view<const float, 3> normalizer() const { return z_; }
  void set_segments(std::int64_t n) {
    mnemo::detail::require(n >= 0, "associative_memory::set_segments: expected n >= 0, got ", n);
    segments_ = n;
  }

  // <prefix>A.npy, <prefix>z.npy, <prefix>config.npy (int64: Dk, nu, segments).
  void save(const std::string& prefix) const {
    mnemo::detail::require(!empty(), "associative_memory::save: the memory is empty");
    npy::save(detail::npy_path(prefix, "A"), a_);
    npy::save(detail::npy_path(prefix, "z"), z_);
    detail::save_record(detail::npy_path(prefix, "config"), {dk_, nu_, segments_});
  }
  static associative_memory load(const std::string& prefix) {
    const auto c = detail::load_record(detail::npy_path(prefix, "config"), 3);
    const tensor<float, 4> a = npy::load<float, 4>(detail::npy_path(prefix, "A"));
    mnemo::detail::require(c[0] >= 1 && c[1] >= 1 && a.extent(2) == 2 * c[0] * c[1], "associative_memory::load: ",
                           prefix, "A.npy: expected shape[2] = 2 nu Dk = ", 2 * c[0] * c[1], " (Dk=", c[0],
                           ", nu=", c[1], "), got ", a.extent(2));
    associative_memory m(a.extent(0), a.extent(1), c[0], a.extent(3), static_cast<int>(c[1]));
    m.a_ = a;
    m.z_ = detail::load_checked<3>(detail::npy_path(prefix, "z"), {a.extent(0), a.extent(1), a.extent(2)});
    m.set_segments(c[2]);
    return m;
  }

 private:
  int nu_ = 3;
  std::int64_t dk_ = 0;
  tensor<float, 4> a_;
  tensor<float, 3> z_;
  std::int64_t segments_ = 0;
};

namespace detail {

struct armt_dims {
  std::int64_t B, H, L, Dk, F, Dv;
};

inline armt_dims check_armt_state(const char* fn, const associative_memory& mem, const armt_options& opt) {
  mnemo::detail::require(!mem.empty(), fn, ": the memory is empty (default-constructed)");
  mnemo::detail::require(std::isfinite(opt.eps) && opt.eps > 0, fn, ": options.eps must be finite and > 0, got ",
                         opt.eps);
  check_threads(fn, opt.threads);
  return {mem.batch(), mem.heads(), 0, mem.key_dim(), mem.feature_dim(), mem.value_dim()};
}

inline armt_dims check_armt_read(const char* fn, const view<const float, 4>& q, const associative_memory& mem,
                                 const view<float, 4>& out, const armt_options& opt) {
  armt_dims d = check_armt_state(fn, mem, opt);
  d.L = q.extent(2);
  mnemo::detail::require_shape(fn, "q", q, {d.B, d.H, d.L, d.Dk}, " [B, H, L, Dk] (B, H, Dk from the memory)");
  mnemo::detail::require_shape(fn, "out", out, {d.B, d.H, d.L, d.Dv}, " [B, H, L, Dv]");
  return d;
}

inline armt_dims check_armt_update(const char* fn, const view<const float, 4>& k, const view<const float, 4>& v,
                                   const view<const float, 3>& beta, const associative_memory& mem,
                                   const armt_options& opt) {
  armt_dims d = check_armt_state(fn, mem, opt);
  d.L = k.extent(2);
  mnemo::detail::require_shape(fn, "k", k, {d.B, d.H, d.L, d.Dk}, " [B, H, M, Dk] (B, H, Dk from the memory)");
  mnemo::detail::require_shape(fn, "v", v, {d.B, d.H, d.L, d.Dv}, " [B, H, M, Dv]");
  mnemo::detail::require_shape(fn, "beta", beta, {d.B, d.H, d.L}, " [B, H, M]");
  return d;
}

// phi(x) = DPFP_nu(x) / max(|DPFP_nu(x)|, tiny) into out [F]; returns |phi(x)|^2 (1, or 0 for x = 0).
template <class T>
T armt_phi(const float* x, std::int64_t Dk, int nu, T* out) {
  // F.normalize's floor on the norm: a zero feature vector stays zero instead of 0/0.
  constexpr double min_norm = 1e-12;
  dpfp(x, Dk, nu, out);
  const std::int64_t F = 2 * nu * Dk;
  T ss = 0;
  for (std::int64_t i = 0; i < F; ++i) ss += out[i] * out[i];
  const T norm = std::max<T>(std::sqrt(ss), static_cast<T>(min_norm));
  T n2 = 0;
  for (std::int64_t i = 0; i < F; ++i) {
    out[i] /= norm;
    n2 += out[i] * out[i];
  }
  return n2;
}

}  // namespace detail

namespace reference {

// o_t = phi(q_t) A / (z . phi(q_t) + eps), in double.
inline void armt_read(view<const float, 4> q,  // [B, H, L, Dk]
                      const associative_memory& mem,
                      view<float, 4> out,  // [B, H, L, Dv]
                      const armt_options& opt = {}) {
  const auto d = detail::check_armt_read("memory::reference::armt_read", q, mem, out, opt);
  const view<const float, 4> A = mem.matrix();
  const view<const float, 3> z = mem.normalizer();
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    std::vector<double> phi(static_cast<std::size_t>(d.F));
    for (std::int64_t t = 0; t < d.L; ++t) {
      detail::armt_phi(q.ptr(b, h, t), d.Dk, mem.nu(), phi.data());
      double den = opt.eps;
      for (std::int64_t f = 0; f < d.F; ++f) den += z(b, h, f) * phi[f];
      for (std::int64_t c = 0; c < d.Dv; ++c) {
        double num = 0;
        for (std::int64_t f = 0; f < d.F; ++f) num += phi[f] * A(b, h, f, c);
        out(b, h, t, c) = static_cast<float>(num / den);
      }
    }
  }, opt.threads);
}

// The delta-rule write of M memory tokens (k, v, beta) against the memory before the call, in double.
inline void armt_update(view<const float, 4> k,     // [B, H, M, Dk]
                        view<const float, 4> v,     // [B, H, M, Dv]
                        view<const float, 3> beta,  // [B, H, M] in (0, 1)
                        associative_memory& mem, const armt_options& opt = {}) {
  const auto d = detail::check_armt_update("memory::reference::armt_update", k, v, beta, mem, opt);
  const bool first = mem.segments() == 0;
  const view<float, 4> As = mem.matrix();
  const view<float, 3> zs = mem.normalizer();
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    std::vector<double> a0(static_cast<std::size_t>(d.F * d.Dv)), z0(static_cast<std::size_t>(d.F));
    for (std::int64_t f = 0; f < d.F; ++f) {
      z0[f] = zs(b, h, f);
      for (std::int64_t c = 0; c < d.Dv; ++c) a0[f * d.Dv + c] = As(b, h, f, c);
    }
    std::vector<double> a = a0, z = z0, phi(static_cast<std::size_t>(d.F));
    for (std::int64_t i = 0; i < d.L; ++i) {
      const double n2 = detail::armt_phi(k.ptr(b, h, i), d.Dk, mem.nu(), phi.data());
      double den = opt.eps;
      for (std::int64_t f = 0; f < d.F; ++f) den += z0[f] * phi[f];
      double gamma = 1;
      if (!first && opt.correction) gamma = n2 > 0 ? std::clamp(1.0 - den / n2, 0.0, 1.0) : 0.0;
      for (std::int64_t c = 0; c < d.Dv; ++c) {
        double vbar = 0;
        if (!first) {
          for (std::int64_t f = 0; f < d.F; ++f) vbar += phi[f] * a0[f * d.Dv + c];
          vbar /= den;
        }
        const double delta = beta(b, h, i) * (v(b, h, i, c) - vbar);
        for (std::int64_t f = 0; f < d.F; ++f) a[f * d.Dv + c] += phi[f] * delta;
      }
      for (std::int64_t f = 0; f < d.F; ++f) z[f] += gamma * phi[f];
    }
    for (std::int64_t f = 0; f < d.F; ++f) {
      zs(b, h, f) = static_cast<float>(z[f]);
      for (std::int64_t c = 0; c < d.Dv; ++c) As(b, h, f, c) = static_cast<float>(a[f * d.Dv + c]);
    }
  }, opt.threads);
  mem.set_segments(mem.segments() + 1);
}

}  // namespace reference

namespace detail {

// phi of the L rows of one (b, h) into rows of dst [L, F]; n2[t] = |phi|^2.
inline void armt_phi_rows(const view<const float, 4>& x, std::int64_t b, std::int64_t h, int nu, matrix& dst,
                          std::vector<float>& n2) {
  const std::int64_t L = x.extent(2), Dk = x.extent(3);
  for (std::int64_t t = 0; t < L; ++t) n2[t] = armt_phi(x.ptr(b, h, t), Dk, nu, dst.row(t).data());
}

}  // namespace detail

// o_t = phi(q_t) A / (z . phi(q_t) + eps) (f32, GEMM); same contract as reference::armt_read.
template <class Arch = simd::default_arch>
void armt_read(view<const float, 4> q,  // [B, H, L, Dk]
               const associative_memory& mem,
               view<float, 4> out,  // [B, H, L, Dv]
               const armt_options& opt = {}) {
  const auto d = detail::check_armt_read("memory::armt_read", q, mem, out, opt);
  detail::for_each_item(d.B * d.H, opt.threads, true, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    detail::matrix phi(d.L, d.F), num(d.L, d.Dv);
    std::vector<float> n2(static_cast<std::size_t>(d.L));
    detail::armt_phi_rows(q, b, h, mem.nu(), phi, n2);
    const detail::cmap A(mem.matrix().ptr(b, h), d.F, d.Dv);
    const Eigen::Map<const Eigen::VectorXf> z(mem.normalizer().ptr(b, h), d.F);
    detail::gemm<detail::accumulate::assign>(num, phi, A);
    for (std::int64_t t = 0; t < d.L; ++t) {
      const float inv = 1.0f / (phi.row(t).dot(z) + opt.eps);
      float* o = out.ptr(b, h, t);
      for (std::int64_t c = 0; c < d.Dv; ++c) o[c] = num(t, c) * inv;
    }
  });
}

// The delta-rule write (f32, GEMM); same contract as reference::armt_update.
template <class Arch = simd::default_arch>
void armt_update(view<const float, 4> k,     // [B, H, M, Dk]
                 view<const float, 4> v,     // [B, H, M, Dv]
                 view<const float, 3> beta,  // [B, H, M] in (0, 1)
                 associative_memory& mem, const armt_options& opt = {}) {
  const auto d = detail::check_armt_update("memory::armt_update", k, v, beta, mem, opt);
  const bool first = mem.segments() == 0;
  detail::for_each_item(d.B * d.H, opt.threads, true, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    detail::matrix phi(d.L, d.F), delta(d.L, d.Dv);
    std::vector<float> n2(static_cast<std::size_t>(d.L)), gamma(static_cast<std::size_t>(d.L), 1.0f);
    detail::armt_phi_rows(k, b, h, mem.nu(), phi, n2);
    detail::map A(mem.matrix().ptr(b, h), d.F, d.Dv);
    Eigen::Map<Eigen::VectorXf> z(mem.normalizer().ptr(b, h), d.F);
    if (!first) detail::gemm<detail::accumulate::assign>(delta, phi, A);  // phi(k_i) A, divided below into vbar_i
    for (std::int64_t i = 0; i < d.L; ++i) {
      const float den = first ? 0.0f : phi.row(i).dot(z) + opt.eps;
      if (!first && opt.correction) gamma[i] = n2[i] > 0 ? std::clamp(1.0f - den / n2[i], 0.0f, 1.0f) : 0.0f;
      const float bi = beta(b, h, i);
      for (std::int64_t c = 0; c < d.Dv; ++c)
        delta(i, c) = bi * (v(b, h, i, c) - (first ? 0.0f : delta(i, c) / den));
    }
    detail::gemm<detail::accumulate::add>(A, phi.transpose(), delta);
    z.noalias() += phi.transpose() * Eigen::Map<const Eigen::VectorXf>(gamma.data(), d.L);
  });
  mem.set_segments(mem.segments() + 1);
}

}  // namespace mnemo::memory
