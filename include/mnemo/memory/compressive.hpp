// mnemo/memory/compressive.hpp — compressive memory of Infini-attention (Munkhdalai, Faruqui &
// Gopal, "Leave No Context Behind: Efficient Infinite Context Transformers with
// Infini-attention", 2024).
//
// Per (batch, head) a memory matrix M [Dk, Dv] and a normaliser z [Dk]; sigma(x) = elu(x) + 1 > 0
// elementwise. A sequence is processed in segments of S tokens; for segment s:
//   A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})                retrieval, before the update
//   linear: M_s = M_{s-1} + sigma(K)^T V
//   delta:  M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))
//   z_s = z_{s-1} + sum_t sigma(K_t)
//   A_dot = softmax(scale Q K^T + causal mask) V                  local attention inside the segment
//   A = sigmoid(beta_h) A_mem + (1 - sigmoid(beta_h)) A_dot       learned gate, one scalar per head
// An empty memory (z = 0, the start) retrieves 0: since sigma > 0, sigma(q) . z = 0 only when z = 0,
// and the quotient is then defined as 0 instead of 0/0 (likewise the delta rule's correction).
//
// Shapes: q, k [B, H, L, Dk], v [B, H, L, Dv], beta [H] (gate logits), out [B, H, L, Dv];
// state M [B, H, Dk, Dv], z [B, H, Dk]. The last segment may be shorter; a sequence fed in pieces
// that end on segment boundaries gives the result of one call.
//
// Paths: reference::* run the memory in double and the local attention through
// attention::reference; the fast path runs the memory in f32 with Eigen GEMMs (sigma(Q) M,
// sigma(K)^T V) and the local attention through attention::flash.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"

namespace mnemo::memory {

enum class compressive_rule { linear, delta };

struct compressive_options {
  std::int64_t segment_len = 0;  // S; 0: the whole input is one segment
  compressive_rule update = compressive_rule::linear;
  float scale = 0;  // local attention; 0: 1 / sqrt(Dk)
  int threads = 0;  // 0: the OpenMP default
};

// M [B, H, Dk, Dv] and z [B, H, Dk], zero at the start.
class compressive_state {
 public:
  compressive_state() = default;
  compressive_state(std::int64_t B, std::int64_t H, std::int64_t Dk, std::int64_t Dv)
      : m_({B, H, Dk, Dv}), z_({B, H, Dk}) {
    mnemo::detail::require(B >= 1 && H >= 1 && Dk >= 1 && Dv >= 1,
                           "compressive_state: B, H, Dk, Dv must be >= 1, got B=", B, ", H=", H, ", Dk=", Dk,
                           ", Dv=", Dv);
  }

  std::int64_t batch() const { return m_.extent(0); }
  std::int64_t heads() const { return m_.extent(1); }
  std::int64_t key_dim() const { return m_.extent(2); }
  std::int64_t value_dim() const { return m_.extent(3); }
  bool empty() const { return m_.size() == 0; }

  view<float, 4> memory() { return m_; }  // [B, H, Dk, Dv]
  view<const float, 4> memory() const { return m_; }
  view<float, 3> normalizer() { return z_; }  // [B, H, Dk]
  view<const float, 3> normalizer() const { return z_; }

  // <prefix>M.npy, <prefix>z.npy
  void save(const std::string& prefix) const {
    mnemo::detail::require(!empty(), "compressive_state::save: the state is empty");
    npy::save(detail::npy_path(prefix, "M"), m_);
    npy::save(detail::npy_path(prefix, "z"), z_);
  }
  static compressive_state load(const std::string& prefix) {
    compressive_state s;
    s.m_ = npy::load<float, 4>(detail::npy_path(prefix, "M"));
    s.z_ = detail::load_checked<3>(detail::npy_path(prefix, "z"), {s.m_.extent(0), s.m_.extent(1), s.m_.extent(2)});
    return s;
  }

 private:
  tensor<float, 4> m_;
  tensor<float, 3> z_;
};

namespace detail {

struct compressive_dims {
  std::int64_t B, H, L, Dk, Dv;
};

inline compressive_dims check_state(const char* fn, const compressive_state& state) {
  mnemo::detail::require(!state.empty(), fn, ": state is empty (default-constructed)");
  return {state.batch(), state.heads(), 0, state.key_dim(), state.value_dim()};
}

inline compressive_dims check_retrieve(const char* fn, const view<const float, 4>& q, const compressive_state& state,
                                       const view<float, 4>& out, int threads) {
  compressive_dims d = check_state(fn, state);
  d.L = q.extent(2);
  mnemo::detail::require_shape(fn, "q", q, {d.B, d.H, d.L, d.Dk}, " [B, H, L, Dk] (B, H, Dk from the state)");
  mnemo::detail::require_shape(fn, "out", out, {d.B, d.H, d.L, d.Dv}, " [B, H, L, Dv]");
  check_threads(fn, threads);
  return d;
}

inline compressive_dims check_update(const char* fn, const view<const float, 4>& k, const view<const float, 4>& v,
                                     const compressive_state& state, int threads) {
  compressive_dims d = check_state(fn, state);
  d.L = k.extent(2);
  mnemo::detail::require_shape(fn, "k", k, {d.B, d.H, d.L, d.Dk}, " [B, H, L, Dk] (B, H, Dk from the state)");
  mnemo::detail::require_shape(fn, "v", v, {d.B, d.H, d.L, d.Dv}, " [B, H, L, Dv]");
  check_threads(fn, threads);
  return d;
}

inline compressive_dims check_infini(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                                     const view<const float, 4>& v, const view<const float, 1>& beta,
                                     const compressive_state& state, const view<float, 4>& out,
                                     const compressive_options& opt) {
  compressive_dims d = check_update(fn, k, v, state, opt.threads);
  mnemo::detail::require_shape(fn, "q", q, {d.B, d.H, d.L, d.Dk}, " [B, H, L, Dk]");
  mnemo::detail::require_shape(fn, "beta", beta, {d.H}, " [H]");
  mnemo::detail::require_shape(fn, "out", out, {d.B, d.H, d.L, d.Dv}, " [B, H, L, Dv]");
  mnemo::detail::require(opt.segment_len >= 0, fn, ": options.segment_len must be >= 0 (0: one segment), got ",
                         opt.segment_len);
  mnemo::detail::require(std::isfinite(opt.scale), fn, ": options.scale must be finite, got ", opt.scale);
  return d;
}

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Segment boundaries: S tokens each, the last one shorter; S = 0 means one segment.
inline std::int64_t segment_size(std::int64_t S, std::int64_t L) { return S > 0 ? S : std::max<std::int64_t>(L, 1); }

}  // namespace detail

namespace reference {

// out = sigma(q) M / (sigma(q) z), 0 where the memory is empty; in double.
inline void compressive_retrieve(view<const float, 4> q,  // [B, H, L, Dk]
                                 const compressive_state& state,
                                 view<float, 4> out,  // [B, H, L, Dv]
                                 int threads = 0) {
  const auto d = detail::check_retrieve("memory::reference::compressive_retrieve", q, state, out, threads);
  const view<const float, 4> M = state.memory();
  const view<const float, 3> z = state.normalizer();
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    std::vector<double> sq(static_cast<std::size_t>(d.Dk));
    for (std::int64_t t = 0; t < d.L; ++t) {
      double den = 0;
      for (std::int64_t i = 0; i < d.Dk; ++i) {
        sq[i] = detail::elu_plus_one(static_cast<double>(q(b, h, t, i)));
        den += sq[i] * z(b, h, i);
      }
      for (std::int64_t c = 0; c < d.Dv; ++c) {
        double num = 0;
        for (std::int64_t i = 0; i < d.Dk; ++i) num += sq[i] * M(b, h, i, c);
        out(b, h, t, c) = den > 0 ? static_cast<float>(num / den) : 0.0f;
      }
    }
  }, threads);
}

// The linear or delta update of M and z with the tokens k, v (one segment); in double.
inline void compressive_update(view<const float, 4> k,  // [B, H, L, Dk]
                               view<const float, 4> v,  // [B, H, L, Dv]
                               compressive_state& state, compressive_rule rule = compressive_rule::linear,
                               int threads = 0) {
  const auto d = detail::check_update("memory::reference::compressive_update", k, v, state, threads);
  const view<float, 4> Ms = state.memory();
  const view<float, 3> zs = state.normalizer();
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const view<float, 2> M = Ms[b][h];
    float* z = zs.ptr(b, h);
    std::vector<double> m(static_cast<std::size_t>(d.Dk * d.Dv)), zn(z, z + d.Dk), sk(static_cast<std::size_t>(d.Dk));
    for (std::int64_t i = 0; i < d.Dk; ++i)
      for (std::int64_t c = 0; c < d.Dv; ++c) m[i * d.Dv + c] = M(i, c);
    const std::vector<double> m0 = m, z0 = zn;
    for (std::int64_t t = 0; t < d.L; ++t) {
      double den = 0;
      for (std::int64_t i = 0; i < d.Dk; ++i) {
        sk[i] = detail::elu_plus_one(static_cast<double>(k(b, h, t, i)));
        den += sk[i] * z0[i];
      }
      for (std::int64_t c = 0; c < d.Dv; ++c) {
        double target = v(b, h, t, c);
        if (rule == compressive_rule::delta && den > 0) {  // minus what M_{s-1} already returns for k_t
          double num = 0;
          for (std::int64_t i = 0; i < d.Dk; ++i) num += sk[i] * m0[i * d.Dv + c];
          target -= num / den;
        }
        for (std::int64_t i = 0; i < d.Dk; ++i) m[i * d.Dv + c] += sk[i] * target;
      }
      for (std::int64_t i = 0; i < d.Dk; ++i) zn[i] += sk[i];
    }
    for (std::int64_t i = 0; i < d.Dk; ++i) {
      z[i] = static_cast<float>(zn[i]);
      for (std::int64_t c = 0; c < d.Dv; ++c) M(i, c) = static_cast<float>(m[i * d.Dv + c]);
    }
  }, threads);
}

// Infini-attention over the whole input, segment by segment (see the header).
inline void infini_attention(view<const float, 4> q,     // [B, H, L, Dk]
                             view<const float, 4> k,     // [B, H, L, Dk]
                             view<const float, 4> v,     // [B, H, L, Dv]
                             view<const float, 1> beta,  // [H] gate logits
                             compressive_state& state,   // in and out
                             view<float, 4> out,         // [B, H, L, Dv]
                             const compressive_options& opt = {}) {
  const auto d = detail::check_infini("memory::reference::infini_attention", q, k, v, beta, state, out, opt);
  const std::int64_t S = detail::segment_size(opt.segment_len, d.L);
  tensor<float, 4> mem({d.B, d.H, std::min(S, d.L), d.Dv});
  for (std::int64_t s0 = 0; s0 < d.L; s0 += S) {
    const std::int64_t n = std::min(S, d.L - s0);
    const auto qs = q.narrow(2, s0, n), ks = k.narrow(2, s0, n), vs = v.narrow(2, s0, n);
    const auto os = out.narrow(2, s0, n), ms = mem.as_view().narrow(2, 0, n);
    attention::reference(qs, ks, vs, os, {}, attention::mods::causal{}, {.scale = opt.scale, .threads = opt.threads});
    compressive_retrieve(qs, state, ms, opt.threads);
    for (std::int64_t b = 0; b < d.B; ++b)
      for (std::int64_t h = 0; h < d.H; ++h) {
        const double g = detail::sigmoid(beta(h));
        for (std::int64_t t = 0; t < n; ++t)
          for (std::int64_t c = 0; c < d.Dv; ++c) os(b, h, t, c) = static_cast<float>(g * ms(b, h, t, c) + (1 - g) * os(b, h, t, c));
      }
    compressive_update(ks, vs, state, opt.update, opt.threads);
  }
}

}  // namespace reference

namespace detail {

// sigma(x) = elu(x) + 1 of the rows [0, n) of one (b, h) into dst [n, D].
template <class Arch>
void elu_rows(const view<const float, 4>& x, std::int64_t b, std::int64_t h, std::int64_t n, matrix& dst) {
  const std::int64_t D = x.extent(3);
  for (std::int64_t t = 0; t < n; ++t) {
    const float* src = x.ptr(b, h, t);
    float* row = dst.row(t).data();
    for (std::int64_t i = 0; i < D; ++i) row[i] = elu_plus_one<Arch>(src[i]);
  }
}

// The same rows scaled so that each row's largest entry is 1: sigma(x) / max_i sigma(x_i), that
// is exp(x - max x) when every x <= 0. The quotients sigma(x) M / (sigma(x) z) do not change, and
// they no longer underflow: sigma(-100) = e^-100 is below f32's range, and 1 / (sigma(q) . z) of
// a subnormal denominator was +inf (found by fuzz/memory_fuzz.cpp: q and k near -100 gave -inf
// where the reference, in double, gave -8.3).
template <class Arch>
void elu_rows_scaled(const view<const float, 4>& x, std::int64_t b, std::int64_t h, std::int64_t n, matrix& dst) {
  const std::int64_t D = x.extent(3);
  for (std::int64_t t = 0; t < n; ++t) {
    const float* src = x.ptr(b, h, t);
    float* row = dst.row(t).data();
    const float m = *std::max_element(src, src + D);
    for (std::int64_t i = 0; i < D; ++i)
      row[i] = m > 0 ? elu_plus_one<Arch>(src[i]) / (m + 1.0f) : simd::exp<Arch>(src[i] - m);
  }
}

// num / den of a scaled feature row (den > 0 when the memory holds anything; 0 for an empty one).
inline float quotient(float num, float den) { return den > 0 ? num / den : 0.0f; }

// One (b, h): out rows = sigma(Q) M / (sigma(Q) z), then (gate g) g * that + (1 - g) * out
// when `blend`, else the retrieval alone.
template <class Arch>
void retrieve_head(const view<const float, 4>& q, const compressive_state& state, const view<float, 4>& out,
                   std::int64_t b, std::int64_t h, bool blend, float g, matrix& sq, matrix& num) {
  const std::int64_t L = q.extent(2), Dk = q.extent(3), Dv = out.extent(3);
  elu_rows_scaled<Arch>(q, b, h, L, sq);
  const cmap M(state.memory().ptr(b, h), Dk, Dv);
  const Eigen::Map<const Eigen::VectorXf> z(state.normalizer().ptr(b, h), Dk);
  gemm<accumulate::assign>(num.topRows(L), sq.topRows(L), M);
  for (std::int64_t t = 0; t < L; ++t) {
    const float den = sq.row(t).dot(z);
    float* o = out.ptr(b, h, t);
    for (std::int64_t c = 0; c < Dv; ++c)
      o[c] = blend ? g * quotient(num(t, c), den) + (1 - g) * o[c] : quotient(num(t, c), den);
  }
}

// One (b, h): the linear or delta update with the rows of k, v.
// The delta rule reads M_{s-1} with the scaled rows (in sk, before they are replaced by sigma(K)).
template <class Arch>
void update_head(const view<const float, 4>& k, const view<const float, 4>& v, compressive_state& state,
                 compressive_rule rule, std::int64_t b, std::int64_t h, matrix& sk, matrix& target, matrix& old) {
  const std::int64_t L = k.extent(2), Dk = k.extent(3), Dv = v.extent(3);
  map M(state.memory().ptr(b, h), Dk, Dv);
  Eigen::Map<Eigen::VectorXf> z(state.normalizer().ptr(b, h), Dk);
  for (std::int64_t t = 0; t < L; ++t) std::copy(v.ptr(b, h, t), v.ptr(b, h, t) + Dv, target.row(t).data());
  if (rule == compressive_rule::delta) {
    elu_rows_scaled<Arch>(k, b, h, L, sk);
    gemm<accumulate::assign>(old.topRows(L), sk.topRows(L), M);  // what M_{s-1} returns for each k_t, before division
    for (std::int64_t t = 0; t < L; ++t) {
      const float den = sk.row(t).dot(z);
      for (std::int64_t c = 0; c < Dv; ++c) target(t, c) -= quotient(old(t, c), den);
    }
  }
  elu_rows<Arch>(k, b, h, L, sk);
  gemm<accumulate::add>(M, sk.topRows(L).transpose(), target.topRows(L));
  z += sk.topRows(L).colwise().sum().transpose();
}

}  // namespace detail

// out = sigma(q) M / (sigma(q) z) (f32, GEMM); same contract as reference::compressive_retrieve.
template <class Arch = simd::default_arch>
void compressive_retrieve(view<const float, 4> q,  // [B, H, L, Dk]
                          const compressive_state& state,
                          view<float, 4> out,  // [B, H, L, Dv]
                          int threads = 0) {
  const auto d = detail::check_retrieve("memory::compressive_retrieve", q, state, out, threads);
  detail::for_each_item(d.B * d.H, threads, true, [&](std::int64_t bh) {
    detail::matrix sq(d.L, d.Dk), num(d.L, d.Dv);
    detail::retrieve_head<Arch>(q, state, out, bh / d.H, bh % d.H, false, 0.0f, sq, num);
  });
}

// The linear or delta update (f32, GEMM); same contract as reference::compressive_update.
template <class Arch = simd::default_arch>
void compressive_update(view<const float, 4> k,  // [B, H, L, Dk]
                        view<const float, 4> v,  // [B, H, L, Dv]
                        compressive_state& state, compressive_rule rule = compressive_rule::linear,
                        int threads = 0) {
  const auto d = detail::check_update("memory::compressive_update", k, v, state, threads);
  detail::for_each_item(d.B * d.H, threads, true, [&](std::int64_t bh) {
    detail::matrix sk(d.L, d.Dk), target(d.L, d.Dv), old(d.L, d.Dv);
    detail::update_head<Arch>(k, v, state, rule, bh / d.H, bh % d.H, sk, target, old);
  });
}

// Infini-attention (f32 fast path: attention::flash for the local part, GEMMs for the memory).
template <class Arch = simd::default_arch>
void infini_attention(view<const float, 4> q,     // [B, H, L, Dk]
                      view<const float, 4> k,     // [B, H, L, Dk]
                      view<const float, 4> v,     // [B, H, L, Dv]
                      view<const float, 1> beta,  // [H] gate logits
                      compressive_state& state,   // in and out
                      view<float, 4> out,         // [B, H, L, Dv]
                      const compressive_options& opt = {}) {
  const auto d = detail::check_infini("memory::infini_attention", q, k, v, beta, state, out, opt);
  const std::int64_t S = detail::segment_size(opt.segment_len, d.L);
  for (std::int64_t s0 = 0; s0 < d.L; s0 += S) {
    const std::int64_t n = std::min(S, d.L - s0);
    const auto qs = q.narrow(2, s0, n), ks = k.narrow(2, s0, n), vs = v.narrow(2, s0, n);
    const auto os = out.narrow(2, s0, n);
    attention::flash<float, attention::mods::causal, Arch>(qs, ks, vs, os, {}, attention::mods::causal{},
                                                           {.scale = opt.scale, .threads = opt.threads});
    detail::for_each_item(d.B * d.H, opt.threads, true, [&](std::int64_t bh) {
      const std::int64_t b = bh / d.H, h = bh % d.H;
      detail::matrix x(n, d.Dk), y(n, d.Dv), old(n, d.Dv);
      const float g = static_cast<float>(detail::sigmoid(beta(h)));
      detail::retrieve_head<Arch>(qs, state, os, b, h, true, g, x, y);
      detail::update_head<Arch>(ks, vs, state, opt.update, b, h, x, y, old);
    });
  }
}

}  // namespace mnemo::memory
