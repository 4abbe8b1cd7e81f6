// mnemo/memory/token_turing.hpp — the memory of Token Turing Machines (Ryoo, Gopalakrishnan,
// Kahatapitiya, Xiao, Rao, Stone, Lu, Ibarz & Arnab, "Token Turing Machines", CVPR 2023), read
// and written by TokenLearner summarisation (Ryoo, Piergiovanni, Arnab, Dehghani & Angelova,
// "TokenLearner: What Can 8 Learned Tokens Do for Images and Videos?", NeurIPS 2021).
//
// Summarisation S_k: N tokens X [N, D] -> k tokens Z [k, D]. Output token i is a weighted sum of
// the inputs with importance weights that sum to 1 over the token axis:
//   A     = mlp(X) [N, k]                      A = act(X W1) W2, or X W2 without the hidden layer
//   alpha = softmax over the N rows of A, per column i
//   z_i   = sum_j alpha_ji x_j,  i.e. Z = alpha^T X
// The TTM step at time t, memory M_t [m, D], input I_t [n, D]:
//   read:    Z_t     = S_r([M_t; I_t])                 r tokens for the processing unit
//   process: O_t     = Process(Z_t)                    the caller's network ([r, D] -> [p, D])
//   write:   M_{t+1} = S_m([M_t; O_t; I_t])            m tokens: the new memory
//   output:  O_t
// The read and the write have their own importance MLP. [.; .] concatenates along the token
// axis. Position embeddings that tell memory, output and input tokens apart belong to the caller
// (added to the tokens before the call). The importance of a token depends on that token alone
// (no query-key product), so a content lookup of a key among the memory tokens is the
// processing unit's job, not the read's.
//
// Shapes: memory [B, m, D] (the state, owned by the caller, updated in place by ttm_write), input
// [B, n, D], read tokens [B, r, D], processed [B, p, D]; importance weights w1 [D, Hd] (or empty)
// and w2 [Hd, k] (or [D, k]): k = r for the read, k = m for the write.
// Paths: reference:: in double; the fast path: Eigen GEMMs for the importance MLP and for
// alpha^T X, a SIMD column softmax, f32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"
#include "mnemo/simd/math.hpp"

namespace mnemo::memory {

// The importance MLP of one summariser to k tokens.
struct token_learner_weights {
  view<const float, 2> w1 = {};  // [D, Hd] hidden layer, or empty: linear importance X w2
  view<const float, 2> w2 = {};  // [Hd, k] (or [D, k] without w1): one logit per output token
};

struct ttm_options {
  activation act = activation::gelu;  // of the importance MLP's hidden layer
  int threads = 0;                    // 0: the OpenMP default
};

struct ttm_weights {
  token_learner_weights read = {};   // S_r: k = r read tokens
  token_learner_weights write = {};  // S_m: k = m, the memory size
};

namespace detail {

// Checks x [B, N, D], w and out [B, k, D]; returns k.
inline std::int64_t check_summarize(const char* fn, const char* name, const view<const float, 3>& x,
                                    const token_learner_weights& w, const view<float, 3>* out, int threads) {
  const std::int64_t B = x.extent(0), N = x.extent(1), D = x.extent(2);
  mnemo::detail::require(B >= 1 && N >= 1 && D >= 1, fn,
                         ": the tokens must have shape [B, N, D] with B, N, D >= 1, got ", shape_string(x.shape()));
  const std::string n(name);
  std::int64_t in = D;
  if (!w.w1.empty()) {
    mnemo::detail::require(w.w1.extent(0) == D && w.w1.extent(1) >= 1, fn, ": ", n, ".w1 must have shape [", D,
                           ", Hd >= 1] (D from the tokens), got ", shape_string(w.w1.shape()));
    in = w.w1.extent(1);
  }
  mnemo::detail::require(!w.w2.empty() && w.w2.extent(0) == in && w.w2.extent(1) >= 1, fn, ": ", n,
                         ".w2 must have shape [", in, ", k >= 1] (", w.w1.empty() ? "D" : "Hd from w1", "), got ",
                         shape_string(w.w2.shape()));
  const std::int64_t k = w.w2.extent(1);
  if (out) mnemo::detail::require_shape(fn, "out", *out, {B, k, D}, " [B, k, D] (k = w2's columns)");
  check_threads(fn, threads);
  return k;
}

// [B, sum N_p, D]: the parts concatenated along the token axis.
inline tensor<float, 3> concat_tokens(const char* fn, std::initializer_list<view<const float, 3>> parts) {
  const view<const float, 3>& first = *parts.begin();
  const std::int64_t B = first.extent(0), D = first.extent(2);
  std::int64_t N = 0;
  for (const auto& p : parts) {
    mnemo::detail::require(p.extent(0) == B && p.extent(2) == D, fn, ": every token set must have shape [", B,
                           ", n, ", D, "] (B, D from memory), got ", shape_string(p.shape()));
    N += p.extent(1);
  }
  tensor<float, 3> x({B, N, D});
  for (std::int64_t b = 0; b < B; ++b) {
    std::int64_t t0 = 0;
    for (const auto& p : parts)
      for (std::int64_t t = 0; t < p.extent(1); ++t, ++t0) std::copy(p.ptr(b, t), p.ptr(b, t) + D, &x(b, t0, 0));
  }
  return x;
}

inline void check_memory(const char* fn, const view<const float, 3>& memory) {
  mnemo::detail::require(memory.extent(0) >= 1 && memory.extent(1) >= 1 && memory.extent(2) >= 1, fn,
                         ": memory must have shape [B, m, D] with B, m, D >= 1, got ", shape_string(memory.shape()));
}

}  // namespace detail

namespace reference {

// out = alpha^T x with alpha = softmax over tokens of the importance MLP (see the header), in double.
inline void token_summarize(view<const float, 3> x,  // [B, N, D]
                            const token_learner_weights& w,
                            view<float, 3> out,  // [B, k, D]
                            const ttm_options& opt = {}) {
  const std::int64_t k =
      detail::check_summarize("memory::reference::token_summarize", "weights", x, w, &out, opt.threads);
  const std::int64_t N = x.extent(1), D = x.extent(2);
  parallel_for(x.extent(0), [&](std::int64_t b) {
    std::vector<double> a(static_cast<std::size_t>(N * k), 0.0);
    for (std::int64_t t = 0; t < N; ++t) {
      std::vector<double> hid(x.ptr(b, t), x.ptr(b, t) + D);
      if (!w.w1.empty()) {
        std::vector<double> z(static_cast<std::size_t>(w.w1.extent(1)), 0.0);
        for (std::int64_t c = 0; c < D; ++c)
          for (std::int64_t j = 0; j < w.w1.extent(1); ++j) z[j] += hid[c] * w.w1(c, j);
        for (double& e : z) e = detail::act_value(opt.act, e);
        hid = z;
      }
      for (std::size_t c = 0; c < hid.size(); ++c)
        for (std::int64_t i = 0; i < k; ++i) a[t * k + i] += hid[c] * w.w2(static_cast<std::int64_t>(c), i);
    }
    for (std::int64_t i = 0; i < k; ++i) {
      double m = -std::numeric_limits<double>::infinity(), z = 0;
      for (std::int64_t t = 0; t < N; ++t) m = std::max(m, a[t * k + i]);
      for (std::int64_t t = 0; t < N; ++t) z += a[t * k + i] = std::exp(a[t * k + i] - m);
      for (std::int64_t c = 0; c < D; ++c) {
        double acc = 0;
        for (std::int64_t t = 0; t < N; ++t) acc += a[t * k + i] * x(b, t, c);
        out(b, i, c) = static_cast<float>(acc / z);
      }
    }
  }, opt.threads);
}

// Z = S_r([memory; input]), in double.
inline void ttm_read(view<const float, 3> memory,  // [B, m, D]
                     view<const float, 3> input,   // [B, n, D]
                     const ttm_weights& w,
                     view<float, 3> out,  // [B, r, D]
                     const ttm_options& opt = {}) {
  constexpr const char* fn = "memory::reference::ttm_read";
  detail::check_memory(fn, memory);
  token_summarize(detail::concat_tokens(fn, {memory, input}), w.read, out, opt);
}

// memory <- S_m([memory; processed; input]), in double.
inline void ttm_write(view<float, 3> memory,           // [B, m, D] in and out
                      view<const float, 3> processed,  // [B, p, D]
                      view<const float, 3> input,      // [B, n, D]
                      const ttm_weights& w, const ttm_options& opt = {}) {
  constexpr const char* fn = "memory::reference::ttm_write";
  detail::check_memory(fn, memory);
  const tensor<float, 3> x = detail::concat_tokens(fn, {memory, processed, input});
  token_summarize(x, w.write, memory, opt);
}

}  // namespace reference

// out = alpha^T x (f32: GEMMs and a column softmax); same contract as reference::token_summarize.
template <class Arch = simd::default_arch>
void token_summarize(view<const float, 3> x,  // [B, N, D]
                     const token_learner_weights& w,
                     view<float, 3> out,  // [B, k, D]
                     const ttm_options& opt = {}) {
  const std::int64_t k = detail::check_summarize("memory::token_summarize", "weights", x, w, &out, opt.threads);
  const std::int64_t N = x.extent(1), D = x.extent(2);
  detail::for_each_item(x.extent(0), opt.threads, true, [&](std::int64_t b) {
    const view<const float, 2> xb{x.ptr(b), {N, D}, {N > 1 ? x.stride(1) : D, 1}};
    detail::matrix a(N, k);
    if (w.w1.empty()) {
      detail::gemm<detail::accumulate::assign>(a, detail::as_matrix(xb), detail::as_matrix(w.w2));
    } else {
      detail::matrix hid(N, w.w1.extent(1));
      detail::gemm<detail::accumulate::assign>(hid, detail::as_matrix(xb), detail::as_matrix(w.w1));
      detail::activate<Arch>(opt.act, hid.data(), hid.data(), nullptr, hid.size());
      detail::gemm<detail::accumulate::assign>(a, hid, detail::as_matrix(w.w2));
    }
    // Softmax down each column, as row passes (rows are contiguous).
    std::vector<float> m(static_cast<std::size_t>(k), detail::minus_inf), z(static_cast<std::size_t>(k), 0.0f);
    for (std::int64_t t = 0; t < N; ++t)
      for (std::int64_t i = 0; i < k; ++i) m[i] = std::max(m[i], a(t, i));
    for (std::int64_t t = 0; t < N; ++t)
      for (std::int64_t i = 0; i < k; ++i) z[i] += a(t, i) = simd::exp<Arch>(a(t, i) - m[i]);
    for (std::int64_t t = 0; t < N; ++t)
      for (std::int64_t i = 0; i < k; ++i) a(t, i) /= z[i];
    const view<float, 2> ob{out.ptr(b), {k, D}, {k > 1 ? out.stride(1) : D, 1}};
    auto o = detail::as_matrix(ob);
    detail::gemm<detail::accumulate::assign>(o, a.transpose(), detail::as_matrix(xb));
  });
}

// Z = S_r([memory; input]) (f32); same contract as reference::ttm_read.
template <class Arch = simd::default_arch>
void ttm_read(view<const float, 3> memory,  // [B, m, D]
              view<const float, 3> input,   // [B, n, D]
              const ttm_weights& w,
              view<float, 3> out,  // [B, r, D]
              const ttm_options& opt = {}) {
  constexpr const char* fn = "memory::ttm_read";
  detail::check_memory(fn, memory);
  token_summarize<Arch>(detail::concat_tokens(fn, {memory, input}), w.read, out, opt);
}

// memory <- S_m([memory; processed; input]) (f32); same contract as reference::ttm_write.
template <class Arch = simd::default_arch>
void ttm_write(view<float, 3> memory,           // [B, m, D] in and out
               view<const float, 3> processed,  // [B, p, D]
               view<const float, 3> input,      // [B, n, D]
               const ttm_weights& w, const ttm_options& opt = {}) {
  constexpr const char* fn = "memory::ttm_write";
  detail::check_memory(fn, memory);
  const tensor<float, 3> x = detail::concat_tokens(fn, {memory, processed, input});
  token_summarize<Arch>(x, w.write, memory, opt);
}

// One TTM step: read r tokens, process(read [B, r, D] as view<const float, 3>, output [B, p, D]
// as view<float, 3>) (the caller's processing unit, any callable), write the memory from
// [memory; output; input]. Runs the fast path, or the reference when `use_reference`.
template <class Process>
void ttm_step(view<float, 3> memory,       // [B, m, D] in and out
              view<const float, 3> input,  // [B, n, D]
              const ttm_weights& w, Process&& process,
              view<float, 3> output,  // [B, p, D]
              const ttm_options& opt = {}, bool use_reference = false) {
  constexpr const char* fn = "memory::ttm_step";
  detail::check_memory(fn, memory);
  const std::int64_t r = detail::check_summarize(fn, "weights.read", memory, w.read, nullptr, opt.threads);
  mnemo::detail::require(output.extent(0) == memory.extent(0) && output.extent(2) == memory.extent(2), fn,
                         ": output must have shape [", memory.extent(0), ", p, ", memory.extent(2),
                         "] (B, D from memory), got ", shape_string(output.shape()));
  tensor<float, 3> read({memory.extent(0), r, memory.extent(2)});
  if (use_reference) reference::ttm_read(memory, input, w, read, opt);
  else ttm_read(memory, input, w, read, opt);
  process(view<const float, 3>(cview(read)), output);
  if (use_reference) reference::ttm_write(memory, output, input, w, opt);
  else ttm_write(memory, output, input, w, opt);
}

}  // namespace mnemo::memory
