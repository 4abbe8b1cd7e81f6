// mnemo/attention/reference.hpp — the readable reference attention.
//
//   s_ij  = mods(scale * q_i . k_j)            score mods in composition order (softcap, ALiBi, ...)
//   P_ij  = exp(s_ij - lse_i) over the keys j visible to i, 0 elsewhere
//   lse_i = log sum_{j visible} exp(s_ij)       natural log, includes ALiBi biases
//           [+ exp(sink_h)]                     with attention sinks (options.sinks, common.hpp)
//   out_i = sum_j P_ij v_j
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv],
// lse [B, Hq, Lq] (optional). Query head h reads kv head h / (Hq / Hkv) (GQA/MQA). Query row i
// sits at key position i + (Lk - Lq): causal masks are bottom-right aligned.
//
// Optional side output (every attention entry point: reference, flash, decode): the column sums
// of the softmax probabilities over the last `rows` query rows of each query head,
//   sums[b, h, j] = sum_{i = Lq - rows}^{Lq - 1} P[b, h, i, j]          (rows = 0: all Lq rows)
// the statistic attention-based KV policies score with (H2O, TOVA, SnapKV observation windows;
// kvcache/policies/), so they need no second attention pass. A masked pair contributes 0; a row
// that sees no key contributes nothing.
//
// Numerics: every product, sum and exponential in double, rounded to float once at the end;
// scores are shifted by their row maximum before exp, so logits of +-1e4 do not overflow.
// A row that sees no key gets out = 0 and lse = -inf, never NaN.
//
// This is the path the tests trust; it is slow by design (O(Lq * Lk) doubles per row, one
// row at a time). Use it to check a surprising result: swap `flash` for `reference`.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::attention {

// The side output described above. Default: not wanted.
struct column_sums {
  view<float, 3> sums;    // [B, Hq, Lk]; empty: not wanted
  std::int64_t rows = 0;  // the last `rows` query rows contribute; 0: all Lq rows

  bool wanted() const { return !sums.empty(); }
  // The first query row that contributes.
  std::int64_t first_row(std::int64_t Lq) const { return rows == 0 ? 0 : Lq - rows; }
};

namespace detail {

// Shape, row count and aliasing of a wanted side output against the validated call. The sums
// are computed from q after out is written (flash: a second sweep), so with the side output out
// must not be q, not even in place; the sums overlap no other argument.
template <class KV>
void check_column_sums(const char* fn, const dims& d, const column_sums& cs, const view<const float, 4>& q,
                       const view<const KV, 4>& k, const view<const KV, 4>& v, const view<float, 4>& out,
                       const view<float, 3>& lse) {
  using mnemo::detail::require_disjoint;
  if (!cs.wanted()) return;
  mnemo::detail::require_shape(fn, "column_sums.sums", cs.sums, {d.B, d.Hq, d.Lk}, " [B, Hq, Lk]");
  mnemo::detail::require(cs.rows >= 0 && cs.rows <= d.Lq, fn, ": column_sums.rows must be in [0, Lq = ", d.Lq,
                         "] (0: all rows), got ", cs.rows);
  require_disjoint(fn, "out", out, "q", q, "; with column_sums wanted out may not be q, not even in place");
  require_disjoint(fn, "column_sums.sums", cs.sums, "q", q);
  require_disjoint(fn, "column_sums.sums", cs.sums, "k", k);
  require_disjoint(fn, "column_sums.sums", cs.sums, "v", v);
  require_disjoint(fn, "column_sums.sums", cs.sums, "out", out);
  require_disjoint(fn, "column_sums.sums", cs.sums, "lse", lse);
}

}  // namespace detail

namespace reference_detail {

// One query row i of head h (b, h, i): scores, softmax and output in double, out/lse written
// (lse may be null). `s` is a scratch row of Lk doubles, `acc` one of Dv; on return s holds the
// row's scores (-inf where masked). Returns the row's shift m and normaliser sum (exp(s_j - m) /
// sum is P_ij), with sum = 0 for a NaN or empty row. flash (flash.hpp) recomputes here a row whose
// f32 result overflowed.
struct row_result {
  double m, sum;
};

template <class KV, class Mod>
row_result row(const dims& d, const float* qi, view<const KV, 4> k, view<const KV, 4> v, const Mod& mod, float sink,
               std::int64_t b, std::int64_t h, std::int64_t i, double* s, double* acc, float* oi, float* lse_i) {
  constexpr double minus_inf = -std::numeric_limits<double>::infinity();
  const std::int64_t hk = h / d.group(), qp = i + d.offset();
  double m = minus_inf;
  for (std::int64_t j = 0; j < d.Lk; ++j) {
    if (!mods::visible(mod, h, qp, j)) {
      s[j] = minus_inf;
      continue;
    }
    const KV* kj = k.ptr(b, hk, j);
    double dot = 0;
    for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(qi[c]) * static_cast<double>(to_float(kj[c]));
    s[j] = mods::score(mod, static_cast<double>(d.scale) * dot, h, qp, j);
    m = std::max(m, s[j]);
    if (std::isnan(s[j])) m = s[j];  // std::max drops NaN; a NaN score makes the row NaN
  }
  if (std::isnan(m)) {  // NaN in q, k or a mod: propagate (never a clean-looking row)
    for (std::int64_t c = 0; c < d.Dv; ++c) oi[c] = std::numeric_limits<float>::quiet_NaN();
    if (lse_i) *lse_i = std::numeric_limits<float>::quiet_NaN();
    return {m, 0.0};
  }
  if (m == minus_inf) {  // no visible key: out 0, lse = the sink (or -inf)
    for (std::int64_t c = 0; c < d.Dv; ++c) oi[c] = 0.0f;
    if (lse_i) *lse_i = sink;
    return {m, 0.0};
  }
  m = std::max(m, static_cast<double>(sink));  // the sink joins the denominator (exp(-inf) = 0 without one)
  double sum = std::exp(static_cast<double>(sink) - m);
  std::fill(acc, acc + d.Dv, 0.0);
  for (std::int64_t j = 0; j < d.Lk; ++j) {
    if (s[j] == minus_inf) continue;
    const double p = std::exp(s[j] - m);
    sum += p;
    const KV* vj = v.ptr(b, hk, j);
    for (std::int64_t c = 0; c < d.Dv; ++c) acc[c] += p * static_cast<double>(to_float(vj[c]));
  }
  for (std::int64_t c = 0; c < d.Dv; ++c) oi[c] = static_cast<float>(acc[c] / sum);
  if (lse_i) *lse_i = static_cast<float>(m + std::log(sum));
  return {m, sum};
}

// One (batch, query head): all Lq rows, and the head's column sums when wanted. `s` is a scratch
// row of Lk doubles.
template <class KV, class Mod>
void heads(const dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v, view<float, 4> out,
           view<float, 3> lse, const Mod& mod, const options& opt, std::int64_t b, std::int64_t h,
           std::vector<double>& s, const column_sums& cs) {
  const float sink = sink_of(opt, h);
  std::vector<double> acc(static_cast<std::size_t>(d.Dv));
  std::vector<double> colsum(cs.wanted() ? static_cast<std::size_t>(d.Lk) : 0);
  const std::int64_t first_summed = cs.first_row(d.Lq);
  for (std::int64_t i = 0; i < d.Lq; ++i) {
    const row_result r = row(d, q.ptr(b, h, i), k, v, mod, sink, b, h, i, s.data(), acc.data(), out.ptr(b, h, i),
                             lse.empty() ? nullptr : lse.ptr(b, h, i));
    if (cs.wanted() && i >= first_summed && r.sum > 0)
      for (std::int64_t j = 0; j < d.Lk; ++j)
        if (s[j] != -std::numeric_limits<double>::infinity()) colsum[j] += std::exp(s[j] - r.m) / r.sum;
  }
  if (cs.wanted())
    for (std::int64_t j = 0; j < d.Lk; ++j) cs.sums(b, h, j) = static_cast<float>(colsum[j]);
}

}  // namespace reference_detail

// Reference attention. K/V elements may be float, f16 or bf16.
template <class KV, class Mod = mods::none>
void reference(view<const float, 4> q,   // [B, Hq, Lq, D]
               view<const KV, 4> k,      // [B, Hkv, Lk, D]
               view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
               view<float, 4> out,       // [B, Hq, Lq, Dv]
               view<float, 3> lse = {},  // [B, Hq, Lq] or empty
               const Mod& mod = {}, const options& opt = {},
               const column_sums& cs = {}) {  // optional side output, see the header
  constexpr const char* fn = "attention::reference";
  const dims d = detail::check_args(fn, q, k, v, out, lse, mod, opt);
  detail::check_column_sums(fn, d, cs, q, k, v, out, lse);
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        std::vector<double> s(static_cast<std::size_t>(d.Lk));
        reference_detail::heads(d, q, k, v, out, lse, mod, opt, bh / d.Hq, bh % d.Hq, s, cs);
      },
      opt.threads);
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = mods::none>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void reference(view<const float, 4> q, const K& k, const V& v, view<float, 4> out, view<float, 3> lse = {},
               const Mod& mod = {}, const options& opt = {}, const column_sums& cs = {}) {
  reference<element_t<K>, Mod>(q, cview(k), cview(v), out, lse, mod, opt, cs);
}

}  // namespace mnemo::attention
