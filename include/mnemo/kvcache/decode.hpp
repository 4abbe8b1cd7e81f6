// mnemo/kvcache/decode.hpp — decode attention straight from a kvcache::layer_cache, in every
// storage kind, with ragged per-head lengths and GQA, without a full-precision copy of the cache.
//
// Query head h (of Hq) reads kv head hk = h / (Hq / Hkv) and attends to every slot of that head:
//   s_j = scale q . k_j,   p = softmax(s),   out = sum_j p_j v_j,   lse = log sum_j exp(s_j)
// over j in [0, length(hk)) (a head with no slot gives out = 0, lse = -inf). There is no mask: the
// cache holds exactly what the query may see (append the step's own key first).
//
// Quantized storage is read as codes and dequantized inside the dot products (KIVI, Liu et al.
// 2024, kvcache/quant.hpp). For a key group with per-channel scale a and minimum m,
//   q . k_j = sum_c q_c (m_c + a_c code_jc) = (q * a) . code_j + q . m
// so each group costs one elementwise q * a and one q . m per query row, then every key is one dot
// product of f32 with codes converted on load. For values with per-token groups (scale b_jg,
// minimum n_jg over the channels of group g),
//   sum_j p_j v_jc = sum_j (p_j b_jg) code_jc + sum_j p_j n_jg
// so the value pass is an axpy over codes with coefficient p_j b_jg, and the minimum term is one
// scalar per (row, group) added at the end. The residual window is f32 and read as such.
//
// It runs on the split-KV engine (attention/split_kv.hpp), like attention::decode, through one of
// two sources: the dense stores are a strided source over [Hkv, capacity, D] with each head's
// length; the KIVI stores are kivi_source below, whose keys come in two parts (the quantized slots,
// then the f32 residual window, itself read as a strided source), chunked separately. Work items
// are (kv head, chunk of attention::decode_chunk slots); every row's partial results merge in
// chunk order, so the result is bit-identical for every thread count. Chunk boundaries are fixed by
// the head's lengths, never by the thread count.
//
// Memory traffic per step: codes (1, 1/2 or 1/4 byte per element), per-token value scales and
// mins, per-group key scales and mins, the residual window in f32: about 0.53 x (int8), 0.28 x
// (int4) and 0.16 x (int2) of the f16 bytes at D = 128 with the default groups.
//
// Rotated caches (cache_config::rotate, kvcache/rotation.hpp): a cache that stores R k runs the
// kernel on R q (one O(D log D) transform per query row, into a buffer of Hq x Lq x D floats); one
// that stores R v turns each output row back with R^T:
//   scores (R q) . (R k) = q . k,   out = R^T sum_j p_j (R v_j) = sum_j p_j v_j
// lse and the column sums are unchanged. The sources below (dense_source, kivi_source) read the
// stored, rotated space; only the entry points rotate.
//
// Side output (kvcache::column_sums): the column sums of the final probabilities over the last
// `rows` query rows, per query head and cache slot, sums [Hq, >= max_length()] with
//   sums[h, j] = sum_{i = Lq - rows}^{Lq - 1} P[h, i, j]     j < length(hk), hk = h / (Hq / Hkv)
// and 0 for length(hk) <= j < max_length() (ragged heads); columns past max_length() are not
// touched. It is what the attention-tracking policies observe each step (H2O, TOVA, Scissorhands,
// SnapKV/PyramidKV/AdaKV windows, FastGen; kvcache/policies/), so they run on any storage kind
// without a second pass. As in attention::decode: each item copies its chunk probabilities
// p_c = exp(s - lse_c) (already in its score block after the softmax) to a per-item buffer, and the
// merging thread adds them scaled by the chunk's merge weight w_c = exp(lse_c - lse), which
// merge_row computes anyway. Cost: two passes over R x length floats beside the kernel's
// length x (D + Dv) elements; nothing of it runs when the side output is not wanted.
//
// NaN: a NaN in q (or in f32 / f16 / bf16 keys; quantized appends reject non-finite input) makes
// its rows NaN (out and lse), as in the reference, never a clean-looking or an empty row: a chunk
// with a NaN score gets a NaN partial lse and the merge propagates it. Such rows add nothing to
// the column sums.
//
// The readable reference is kvcache::reference::decode (double accumulation over the dequantized
// cache, as gathered by layer_cache::gather); the tests hold the kernel to it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/split_kv.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/quant.hpp"
#include "mnemo/prebuilt.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::kvcache {

// Optional side output of decode, see the header. Default: not wanted.
struct column_sums {
  view<float, 2> sums;    // [Hq, >= max_length()]; empty: not wanted
  std::int64_t rows = 0;  // the last `rows` query rows contribute; 0: all Lq rows

  bool wanted() const { return !sums.empty(); }
  // The first query row that contributes.
  std::int64_t first_row(std::int64_t Lq) const { return rows == 0 ? 0 : Lq - rows; }
};

namespace decode_detail {

// The sizes of one call, validated once.
inline attention::dims check_args(const char* fn, const layer_cache& c, view<const float, 3> q, view<float, 3> out,
                                  view<float, 2> lse, const attention::options& opt, const column_sums& cs) {
  using mnemo::detail::require;
  require(c.capacity() >= 1, fn, ": the cache is not configured (default-constructed layer_cache)");
  mnemo::detail::require_data(fn, "q", q, " [Hq, Lq, D]");
  mnemo::detail::require_data(fn, "out", out, " [Hq, Lq, Dv]");
  const std::int64_t Hq = q.extent(0), Lq = q.extent(1), Hkv = c.num_heads(), D = c.head_dim(), Dv = c.value_dim();
  require(q.extent(2) == D, fn, ": q.shape[2] must be the cache's D = ", D, ", got ", q.extent(2));
  require(Hq >= 1 && Hq % Hkv == 0, fn, ": q.shape[0] (Hq) must be a positive multiple of the cache's Hkv = ", Hkv,
          ", got ", Hq);
  require(Lq <= attention::decode_max_rows, fn, ": q.shape[1] (Lq) must be <= ", attention::decode_max_rows,
          " (attention::decode_max_rows), got ", Lq);
  mnemo::detail::require_shape(fn, "out", out, {Hq, Lq, Dv}, " [Hq, Lq, Dv]");
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, {Hq, Lq}, " [Hq, Lq]");
  require(std::isfinite(opt.scale), fn, ": options.scale must be finite, got ", opt.scale);
  require(opt.threads >= 0, fn, ": options.threads must be >= 0, got ", opt.threads);
  if (!opt.sinks.empty()) mnemo::detail::require_shape(fn, "options.sinks", opt.sinks, {Hq}, " [Hq]");
  if (cs.wanted()) {
    require(cs.sums.extent(0) == Hq && cs.sums.extent(1) >= c.max_length(), fn,
            ": column_sums.sums must have shape [Hq = ", Hq, ", >= max_length() = ", c.max_length(), "], got ",
            shape_string(cs.sums.shape()));
    require(cs.rows >= 0 && cs.rows <= Lq, fn, ": column_sums.rows must be in [0, Lq = ", Lq, "] (0: all rows), got ",
            cs.rows);
  }
  // Aliasing (docs/errors.md): no output overlaps q or another output.
  using mnemo::detail::require_disjoint;
  require_disjoint(fn, "out", out, "q", q);
  require_disjoint(fn, "lse", lse, "q", q);
  require_disjoint(fn, "lse", lse, "out", out);
  require_disjoint(fn, "column_sums.sums", cs.sums, "q", q);
  require_disjoint(fn, "column_sums.sums", cs.sums, "out", out);
  require_disjoint(fn, "column_sums.sums", cs.sums, "lse", lse);
  const float scale = opt.scale != 0 ? opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  return {1, Hq, Hkv, Lq, c.max_length(), D, Dv, scale};
}

}  // namespace decode_detail

namespace reference {

// Double-precision decode over the dequantized cache: q [Hq, Lq, D], out [Hq, Lq, Dv], lse [Hq, Lq]
// (may be empty). The scale defaults to 1 / sqrt(D), as in the kernel.
// cs: the optional column sums (see the header).
inline void decode(const layer_cache& c, view<const float, 3> q, view<float, 3> out, view<float, 2> lse = {},
                   const attention::options& opt = {}, const column_sums& cs = {}) {
  const attention::dims d = decode_detail::check_args("kvcache::reference::decode", c, q, out, lse, opt, cs);
  const std::int64_t G = d.group(), first_summed = cs.first_row(d.Lq);
  if (cs.wanted())
    for (std::int64_t h = 0; h < d.Hq; ++h) std::fill_n(cs.sums.ptr(h, 0), c.max_length(), 0.0f);
  for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
    const std::int64_t n = c.length(hk);
    std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
    for (std::int64_t j = 0; j < n; ++j) slots[static_cast<std::size_t>(j)] = j;
    tensor<float, 2> k({n, d.D}), v({n, d.Dv});
    if (n > 0) c.gather(hk, slots, k, v);
    for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h)
      for (std::int64_t i = 0; i < d.Lq; ++i) {
        std::vector<double> s(static_cast<std::size_t>(n));
        double m = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < n; ++j) {
          double dot = 0;
          for (std::int64_t e = 0; e < d.D; ++e) dot += static_cast<double>(q(h, i, e)) * k(j, e);
          s[static_cast<std::size_t>(j)] = dot * d.scale;
          m = std::max(m, s[static_cast<std::size_t>(j)]);
          if (std::isnan(dot)) m = dot;  // std::max drops NaN; a NaN score makes the row NaN
        }
        if (std::isnan(m)) {
          for (std::int64_t e = 0; e < d.Dv; ++e) out(h, i, e) = std::numeric_limits<float>::quiet_NaN();
          if (!lse.empty()) lse(h, i) = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        double l = 0;
        for (double& x : s) l += (x = std::exp(x - m));
        if (cs.wanted() && i >= first_summed)
          for (std::int64_t j = 0; j < n; ++j) cs.sums(h, j) += static_cast<float>(s[static_cast<std::size_t>(j)] / l);
        for (std::int64_t e = 0; e < d.Dv; ++e) {
          double o = 0;
          for (std::int64_t j = 0; j < n; ++j) o += s[static_cast<std::size_t>(j)] * v(j, e);
          out(h, i, e) = n > 0 ? static_cast<float>(o / l) : 0.0f;
        }
        if (!lse.empty())
          lse(h, i) = n > 0 ? static_cast<float>(m + std::log(l)) : -std::numeric_limits<float>::infinity();
      }
  }
}

}  // namespace reference

namespace decode_detail {

using attention::decode_chunk;
using attention::split_kv::key_block;
using attention::split_kv::key_parts;
using attention::split_kv::lanes;
using attention::split_kv::plan;
using attention::split_kv::round_up;

// Where the fused kernels read codes in the pair order of quant::load_code_pair (a permutation
// inside each block of 2W channels): keys over [0, key_pairs), values over [0, value_pairs); the
// channels after that in natural order. Values of int4 use the pair order only when no 2W block
// straddles two value groups.
template <class Arch>
std::int64_t key_pairs(std::int64_t D) {
  constexpr std::int64_t W = lanes<Arch>;
  return simd::vectorized<Arch> ? D / (2 * W) * (2 * W) : 0;
}
template <class Arch, int Bits>
std::int64_t value_pairs(std::int64_t Dv, std::int64_t VG) {
  using attention::split_kv::value_tile;
  constexpr std::int64_t W = lanes<Arch>, tile = value_tile<Arch>::slices * W;
  static_assert(value_tile<Arch>::slices % 2 == 0, "value_pairs: a value tile must hold whole pairs of batches");
  if (!simd::vectorized<Arch> || (Bits == 4 && VG % (2 * W) != 0 && VG < Dv)) return 0;
  return Dv / tile * tile;
}

// Index, inside its 2W block, where channel offset i of the block is stored in pair order.
template <int Bits>
constexpr std::int64_t pair_slot(std::int64_t i, std::int64_t W) {
  if constexpr (Bits != 4) return i;
  else return i % 2 == 0 ? i / 2 : W + i / 2;
}

// Rows of int8 / int4 / int2 codes (keys or values) for the engine's score and value passes: `stride`
// bytes apart, `len` channels used, channels [0, pairs) read in pair order.
template <class Arch, int Bits>
struct code_rows {
  using elem = std::uint8_t;
  static constexpr bool has_pairs = true;
  const std::uint8_t* base;
  std::int64_t stride;
  std::int64_t len;
  std::int64_t pairs;

  const std::uint8_t* row(std::int64_t j) const { return base + j * stride; }
  code_rows from(std::int64_t j) const { return {row(j), stride, len, pairs}; }  // rows j, j + 1, ...
  std::int64_t row_bytes() const { return stride; }
  std::int64_t pair_end() const { return pairs; }
  simd::fbatch<Arch> load(const std::uint8_t* p, std::int64_t c) const { return quant::load_codes<Arch, Bits>(p, c); }
  simd::fbatch<Arch> load_partial(const std::uint8_t* p, std::int64_t c, std::int64_t n) const {
    return quant::load_codes_partial<Arch, Bits>(p, c, n);
  }
  void load_pair(const std::uint8_t* p, std::int64_t c, simd::fbatch<Arch>& first, simd::fbatch<Arch>& second) const {
    quant::load_code_pair<Arch, Bits>(p, c, first, second);
  }
  float dot(const float* q, const std::uint8_t* p, std::int64_t n) const { return quant::dot_codes<Arch, Bits>(q, p, n); }
  void axpy(float a, const std::uint8_t* p, std::int64_t c0, std::int64_t c1, float* acc) const {
    for (std::int64_t c = c0; c < c1; ++c) acc[c] += a * static_cast<float>(quant::get_code(p, Bits, c));
  }
};

// A [n0, n1, n2] view as [1, n0, n1, n2] (empty stays empty).
template <class T>
view<T, 4> one_batch(view<T, 3> x) {
  if (x.empty()) return {};
  return {x.data(), {1, x.extent(0), x.extent(1), x.extent(2)}, {x.extent(0) * x.stride(0), x.stride(0), x.stride(1), 1}};
}
template <class T>
view<T, 3> one_batch(view<T, 2> x) {
  if (x.empty()) return {};
  return {x.data(), {1, x.extent(0), x.extent(1)}, {x.extent(0) * x.stride(0), x.stride(0), 1}};
}

// The dense store of kind T as a source: [Hkv, capacity, D] viewed as [1, Hkv, capacity, D],
// each head's length from the cache.
template <class T>
attention::split_kv::strided_source<T> dense_source(const layer_cache& c) {
  return {one_batch(c.dense_keys<T>()), one_batch(c.dense_values<T>()), c.lengths()};
}

}  // namespace decode_detail

// The KIVI tile work both KIVI sources share (this file's kivi_source over a layer_cache, and
// kvcache/paged_attention.hpp's over quantized pages): scores of a run of keys of one key group,
// and the value pass over a run of value code rows, with the per-slot scratch they use.
namespace kivi {

using attention::split_kv::plan;
inline constexpr std::int64_t decode_chunk = attention::decode_chunk;

// Per-slot scratch: qk [Rpad, Dpad] q * key scale of the current key group in pair order (padding
// stays zero), bias [Rpad] q . key min (padding rows zero), coef [R, NG, decode_chunk] p * value
// scale, msum [R, NG] sum_j p * value min, row [Dvpad] one output row while it is put back in
// channel order.
struct scratch {
  float *qk, *bias, *coef, *msum, *row;

  struct sizes {
    std::int64_t qk, bias, coef, msum, row;
    std::int64_t total() const { return qk + bias + coef + msum + row; }
  };
  static sizes sizes_of(const plan& pl, std::int64_t NG) {
    using attention::split_kv::round_up;
    constexpr std::int64_t align = 64 / sizeof(float);
    return {round_up(pl.Rpad * pl.Dpad, align), round_up(pl.Rpad, align), round_up(pl.R * NG * decode_chunk, align),
            round_up(pl.R * NG, align), round_up(pl.Dvpad, align)};
  }
  static scratch split(const plan& pl, std::int64_t NG, float* base) {
    const sizes z = sizes_of(pl, NG);
    scratch w{base, nullptr, nullptr, nullptr, nullptr};
    w.bias = w.qk + z.qk;
    w.coef = w.bias + z.bias;
    w.msum = w.coef + z.coef;
    w.row = w.msum + z.msum;
    return w;
  }
};

// Scores of n keys of one key group (per-channel scale and min [D]) into s[r * decode_chunk + j]:
// qk = q * scale in the loader's pair order and bias = q . min, then the score pass over the key
// code rows kc (ks bytes apart), with the value code rows vc (vs apart) prefetched beside them.
template <class Arch, int RowTile, int Bits>
void group_scores(const plan& pl, const scratch& w, const float* qs, const float* scale, const float* min,
                  const std::uint8_t* kc, std::int64_t ks, const std::uint8_t* vc, std::int64_t vs, std::int64_t n,
                  float* s) {
  constexpr std::int64_t W = attention::split_kv::lanes<Arch>;
  const std::int64_t D = pl.d.D, Pk = decode_detail::key_pairs<Arch>(D);
  for (std::int64_t r = 0; r < pl.R; ++r) {
    const float* qr = qs + r * pl.Dpad;
    float* out = w.qk + r * pl.Dpad;
    for (std::int64_t e0 = 0; e0 < Pk; e0 += 2 * W)
      for (std::int64_t i = 0; i < 2 * W; ++i) out[e0 + decode_detail::pair_slot<Bits>(i, W)] = qr[e0 + i] * scale[e0 + i];
    for (std::int64_t e = Pk; e < D; ++e) out[e] = qr[e] * scale[e];
    w.bias[r] = simd::dot<Arch>(qr, min, D);
  }
  const decode_detail::code_rows<Arch, Bits> rows{kc, ks, D, Pk};
  const decode_detail::code_rows<Arch, Bits> next{vc, vs, pl.d.Dv, 0};  // value codes, prefetched beside K
  attention::split_kv::score_pass<Arch, RowTile>(pl.R, pl.Rpad, w.qk, pl.Dpad, D, rows, n, w.bias, s, decode_chunk, next);
}

// Adds sum_j p_j b_jg code_j (pair order, no minimum term) for n keys whose value code rows start
// at vc (vs bytes apart) into acc, and sum_j p_j n_jg into w.msum; the scales and minimums of key
// j of group g are vscale[g * gs + j], vmin[g * gs + j]. p: the probabilities of these keys, row r
// at p[r * decode_chunk]. w.msum starts at zero for a block (begin_values); finish_values then
// adds it and puts acc back in channel order.
template <class Arch, int Bits>
void run_values(const plan& pl, const scratch& w, std::int64_t NG, std::int64_t VG, const float* p,
                const std::uint8_t* vc, std::int64_t vs, const float* vscale, const float* vmin, std::int64_t gs,
                std::int64_t n, float* acc) {
  for (std::int64_t r = 0; r < pl.R; ++r) {
    const float* pr = p + r * decode_chunk;
    for (std::int64_t g = 0; g < NG; ++g) {
      const float* sc = vscale + g * gs;
      float* cr = w.coef + (r * NG + g) * decode_chunk;
      for (std::int64_t j = 0; j < n; ++j) cr[j] = pr[j] * sc[j];
      w.msum[r * NG + g] += simd::dot<Arch>(pr, vmin + g * gs, n);
    }
  }
  const std::int64_t Pv = decode_detail::value_pairs<Arch, Bits>(pl.d.Dv, VG);
  const decode_detail::code_rows<Arch, Bits> rows{vc, vs, pl.d.Dv, Pv};
  attention::split_kv::value_pass<Arch>(pl.R, w.coef, NG, VG, decode_chunk, pl.d.Dv, pl.Dvpad, rows, n, acc);
}

inline void begin_values(const plan& pl, const scratch& w, std::int64_t NG) { std::fill_n(w.msum, pl.R * NG, 0.0f); }

template <class Arch, int Bits>
void finish_values(const plan& pl, const scratch& w, std::int64_t NG, std::int64_t VG, float* acc) {
  constexpr std::int64_t W = attention::split_kv::lanes<Arch>;
  const std::int64_t Dv = pl.d.Dv, Pv = decode_detail::value_pairs<Arch, Bits>(Dv, VG);
  for (std::int64_t r = 0; r < pl.R; ++r) {
    float* o = acc + r * pl.Dvpad;
    if (Bits == 4 && Pv > 0) {  // pair order -> channel order
      std::copy(o, o + Pv, w.row);
      for (std::int64_t e0 = 0; e0 < Pv; e0 += 2 * W)
        for (std::int64_t i = 0; i < 2 * W; ++i) o[e0 + i] = w.row[e0 + decode_detail::pair_slot<Bits>(i, W)];
    }
    for (std::int64_t e = 0; e < Dv; ++e) o[e] += w.msum[r * NG + e / VG];
  }
}

}  // namespace kivi

// The KIVI store of a cache (int8, int4 or int2) as a split-KV source. Part 0 of a head is its quantized
// slots [0, quantized_length(h)), read as codes and dequantized inside the dot products (see the
// header); part 1 its f32 residual window, a strided source of its own.
template <int Bits>
class kivi_source {
  using key_block = attention::split_kv::key_block;
  using key_parts = attention::split_kv::key_parts;
  using plan = attention::split_kv::plan;

 public:
  static constexpr bool per_row_keys = false;
  static constexpr bool row_tiled = true;

  explicit kivi_source(const layer_cache& c)
      : c_(&c),
        residual_{decode_detail::one_batch(c.residual_keys()), decode_detail::one_batch(c.residual_values()), {}},
        starts_(static_cast<std::size_t>(c.num_heads())) {
    for (std::int64_t hk = 0; hk < c.num_heads(); ++hk) {
      auto& st = starts_[static_cast<std::size_t>(hk)];
      st.assign(1, 0);
      for (std::int64_t l : c.key_group_lengths(hk)) st.push_back(st.back() + l);
    }
  }

  key_parts parts(std::int64_t, std::int64_t hk) const {
    return {2, {c_->quantized_length(hk), c_->residual_length(hk)}};
  }

  std::int64_t scratch_floats(const plan& pl) const { return kivi::scratch::sizes_of(pl, c_->value_groups()).total(); }

  template <class Arch, int RowTile>
  void scores(const plan& pl, const key_block& kb, const float* qs, float* s, float* scratch) const {
    if (kb.part == 1) return residual_.template scores<Arch, RowTile>(pl, kb, qs, s, nullptr);
    const kivi::scratch w = kivi::scratch::split(pl, c_->value_groups(), scratch);
    const std::int64_t D = pl.d.D, hk = kb.hk;
    const std::vector<std::int64_t>& start = starts_[static_cast<std::size_t>(hk)];
    const std::uint8_t* kc = c_->key_codes().ptr(hk, 0);
    const std::int64_t ks = c_->key_codes().stride(1);
    const std::uint8_t* vc = c_->value_codes().ptr(hk, 0);
    const std::int64_t vs = c_->value_codes().stride(1);
    // The value pass's per-token scales and minimums of this block: 2 NG short streams beside the
    // codes, which the hardware prefetchers would otherwise pick up late.
    for (std::int64_t gg = 0; gg < c_->value_groups(); ++gg) {
      attention::split_kv::prefetch(c_->value_scales().ptr(hk, gg, kb.j0), kb.n * static_cast<std::int64_t>(sizeof(float)));
      attention::split_kv::prefetch(c_->value_mins().ptr(hk, gg, kb.j0), kb.n * static_cast<std::int64_t>(sizeof(float)));
    }
    // One key group piece at a time.
    std::int64_t g = static_cast<std::int64_t>(std::upper_bound(start.begin(), start.end(), kb.j0) - start.begin()) - 1;
    for (std::int64_t a = kb.j0; a < kb.j0 + kb.n; ++g) {
      const std::int64_t b = std::min(kb.j0 + kb.n, start[static_cast<std::size_t>(g) + 1]);
      kivi::group_scores<Arch, RowTile, Bits>(pl, w, qs, c_->key_scales(hk).data() + g * D, c_->key_mins(hk).data() + g * D,
                                              kc + a * ks, ks, vc + a * vs, vs, b - a, s + (a - kb.j0));
      a = b;
    }
  }

  template <class Arch>
  void values(const plan& pl, const key_block& kb, const float* p, float* acc, float* scratch) const {
    if (kb.part == 1) return residual_.template values<Arch>(pl, kb, p, acc, nullptr);
    const std::int64_t NG = c_->value_groups(), VG = c_->config().quant.value_group, hk = kb.hk, j0 = kb.j0;
    const kivi::scratch w = kivi::scratch::split(pl, NG, scratch);
    const auto& scales = c_->value_scales();
    kivi::begin_values(pl, w, NG);
    kivi::run_values<Arch, Bits>(pl, w, NG, VG, p, c_->value_codes().ptr(hk, j0), c_->value_codes().stride(1),
                                 scales.ptr(hk, 0, j0), c_->value_mins().ptr(hk, 0, j0), scales.stride(1), kb.n, acc);
    kivi::finish_values<Arch, Bits>(pl, w, NG, VG, acc);
  }

 private:
  const layer_cache* c_;
  attention::split_kv::strided_source<float> residual_;  // [1, Hkv, residual, D | Dv]
  std::vector<std::vector<std::int64_t>> starts_;        // per head: start slot of every key group, then quantized_length
};

namespace decode_detail {

// The engine over the cache's store at one Arch (validated arguments, Lq > 0).
template <class Arch, class Mod = attention::mods::none>
void run(const attention::dims& d, const layer_cache& c, view<const float, 3> q, view<float, 3> out, view<float, 2> lse,
         int threads, attention::decode_workspace& ws, const column_sums& cs, view<const float, 1> sinks,
         const Mod& mod = {}) {
  const attention::split_kv::sums_out sums{one_batch(cs.sums), cs.first_row(d.Lq), c.max_length()};
  const auto q4 = one_batch(q);
  const auto out4 = one_batch(out);
  const auto lse3 = one_batch(lse);
  auto attend = [&](const auto& src) {
    attention::split_kv::attend<Arch>(d, src, q4, out4, lse3, mod, threads, ws, sums, sinks);
  };
  switch (c.kind()) {
    case storage::f32: attend(dense_source<float>(c)); break;
    case storage::f16: attend(dense_source<f16>(c)); break;
    case storage::bf16: attend(dense_source<bf16>(c)); break;
    case storage::int8: attend(kivi_source<8>(c)); break;
    case storage::int4: attend(kivi_source<4>(c)); break;
    case storage::int2: attend(kivi_source<2>(c)); break;
  }
}

// The queries in the cache's key space: q itself, or R q row by row in buf when the cache rotates
// its keys. q [Hq, Lq, D].
inline view<const float, 3> rotate_queries(const layer_cache& c, view<const float, 3> q, tensor<float, 3>& buf) {
  if (!c.rotates_keys()) return q;
  const std::int64_t Hq = q.extent(0), Lq = q.extent(1), D = q.extent(2);
  buf = tensor<float, 3>({Hq, Lq, D});
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lq; ++i) {
      std::copy_n(q.ptr(h, i), D, &buf(h, i, 0));
      c.key_rotation().forward(&buf(h, i, 0));
    }
  return buf.as_view();
}

// Output rows back from the cache's value space (R^T), when the cache rotates its values.
// out [Hq, Lq, Dv].
inline void unrotate_output(const layer_cache& c, view<float, 3> out) {
  if (!c.rotates_values()) return;
  for (std::int64_t h = 0; h < out.extent(0); ++h)
    for (std::int64_t i = 0; i < out.extent(1); ++i) c.value_rotation().inverse(out.ptr(h, i));
}

}  // namespace decode_detail

// Decode from a cache: q [Hq, Lq] rows (Lq <= attention::decode_max_rows) against every slot of
// their kv head, in any storage kind; the result agrees with kvcache::reference::decode to f32
// rounding and is bit-identical for every options.threads. Reads options.scale, .threads, .isa and
// .sinks. A rotated cache gets R q and gives back R^T out (see the header).
// cs: the optional column sums per cache slot (see the header).
template <class TuArch = simd::default_arch>
void decode(const layer_cache& c,
            view<const float, 3> q,   // [Hq, Lq, D]
            view<float, 3> out,       // [Hq, Lq, Dv]
            view<float, 2> lse,       // [Hq, Lq] or empty
            const attention::options& opt, attention::decode_workspace& ws,
            const column_sums& cs = {}) {  // sums [Hq, >= max_length()] or empty
  const attention::dims d = decode_detail::check_args("kvcache::decode", c, q, out, lse, opt, cs);
  if (d.Lq == 0) {  // no row: nothing attended
    if (cs.wanted())
      for (std::int64_t h = 0; h < d.Hq; ++h) std::fill_n(cs.sums.ptr(h, 0), c.max_length(), 0.0f);
    return;
  }
  tensor<float, 3> rotated_q;
  const view<const float, 3> qs = decode_detail::rotate_queries(c, q, rotated_q);
  if constexpr (prebuilt::linked) {  // a program built below the CPU's level (prebuilt.hpp)
    const simd::level want = simd::resolve_level(opt.isa);
    if (prebuilt::above<TuArch>(want)) {
      prebuilt::at_level(want, [&]<class Arch>() { prebuilt::cache_decode<Arch>(d, c, qs, out, lse, opt, ws, cs); });
      return decode_detail::unrotate_output(c, out);
    }
  }
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() { decode_detail::run<Arch>(d, c, qs, out, lse, opt.threads, ws, cs, opt.sinks); });
  decode_detail::unrotate_output(c, out);
}

// Decode with a mask or score mod (attention/mods.hpp: causal, sliding_window, softcap, alibi,
// document, prefix_lm, all_of / any_of of them, or a user mod): the mod sees key j at its slot
// index j and query row i at max_length() - Lq + i (the queries are the newest tokens): with every
// head at one length, attention::reference over the cache's gathered keys and values with that
// mod. After a compaction slots are no longer token positions (layer_cache::position has those);
// a window or ALiBi then counts slots.
template <class Mod, class TuArch = simd::default_arch>
  requires(!std::is_same_v<Mod, attention::options>)
void decode(const layer_cache& c,
            view<const float, 3> q,   // [Hq, Lq, D]
            view<float, 3> out,       // [Hq, Lq, Dv]
            view<float, 2> lse,       // [Hq, Lq] or empty
            const Mod& mod, const attention::options& opt, attention::decode_workspace& ws,
            const column_sums& cs = {}) {  // sums [Hq, >= max_length()] or empty
  constexpr const char* fn = "kvcache::decode";
  const attention::dims d = decode_detail::check_args(fn, c, q, out, lse, opt, cs);
  attention::mods::validate(mod, fn, d.Hq, d.Lq, d.Lk);
  if (d.Lq == 0) {
    if (cs.wanted())
      for (std::int64_t h = 0; h < d.Hq; ++h) std::fill_n(cs.sums.ptr(h, 0), c.max_length(), 0.0f);
    return;
  }
  tensor<float, 3> rotated_q;
  const view<const float, 3> qs = decode_detail::rotate_queries(c, q, rotated_q);
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    decode_detail::run<Arch>(d, c, qs, out, lse, opt.threads, ws, cs, opt.sinks, mod);
  });
  decode_detail::unrotate_output(c, out);
}

// As above, with a workspace of its own.
template <class TuArch = simd::default_arch>
void decode(const layer_cache& c,
            view<const float, 3> q,       // [Hq, Lq, D]
            view<float, 3> out,           // [Hq, Lq, Dv]
            view<float, 2> lse = {},      // [Hq, Lq] or empty
            const attention::options& opt = {},
            const column_sums& cs = {}) {  // sums [Hq, >= max_length()] or empty
  attention::decode_workspace ws;
  decode<TuArch>(c, q, out, lse, opt, ws, cs);
}

}  // namespace mnemo::kvcache
