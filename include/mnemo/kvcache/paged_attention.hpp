// mnemo/kvcache/paged_attention.hpp — attention for a batch of sequences straight from a
// kvcache::paged_cache, in every storage kind: f32 / f16 / bf16 pages and KIVI int8 / int4 pages.
//
//   kvcache::paged_attention(cache, seqs, q, cu_seqlens_q, out, lse, mod, options, sums);
//
// Sequence b of the batch is seqs[b]; its queries are rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1]
// - 1 of q [T, Hq, D] (packed, as attention::paged takes them), and they are its last tokens: query
// row i sits at key position length - q_len + i, so causal masks are bottom-right per sequence and
// every mod sees the sequence's own slots. Every kv head of a sequence must hold the same number of
// slots (a ragged compaction leaves heads of different lengths: attend such a cache one head at a
// time, or compact every head to one budget). out [T, Hq, Dv], lse [T, Hq] (optional), sums
// [Hq, sum_b length(seqs[b])] (optional): the column sums of the probabilities, per sequence at its
// own columns, as attention::paged defines them; options.sinks join every row's denominator.
//
// How it runs:
//   - dense pages: the cache's pool, block tables and lengths as attention::paged's paged_kv (no
//     copy), then attention::paged;
//   - KIVI pages: the split-KV engine over a source that reads each head's sealed pages as codes
//     (each page is one key group: q times the page's per-channel key scales, then the score pass
//     over its code rows; the value pass with per-token scales, kvcache/decode.hpp's kivi tile
//     helpers) and its f32 tail (the rows of the last, partly filled page) as plain rows. As in
//     attention::paged, consecutive sequences with the same number of queries, at most
//     decode_max_rows, are one engine call whose work items span (sequence, kv head, key chunk); a
//     sequence with more queries (a prefill chunk) has its keys and values dequantized once into a
//     contiguous f32 copy for attention::flash.
// Results are bit-identical for every thread count.
//
// The reference: per sequence, the keys and values paged_cache::gather returns (dequantized codes,
// tail rows as stored), attention::reference on them; the tests hold this function to it.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/paged.hpp"
#include "mnemo/attention/split_kv.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/decode.hpp"
#include "mnemo/kvcache/paged.hpp"
#include "mnemo/simd/dispatch.hpp"

namespace mnemo::kvcache {

namespace paged_attention_detail {

using sequence = paged_cache::sequence;

// The validated sizes of one call.
struct sizes {
  std::int64_t B, T, Hq, Hkv, D, Dv;
  float scale;
};

template <class Mod>
sizes check_args(const char* fn, const paged_cache& c, std::span<const sequence> seqs, view<const float, 3> q,
                 view<const std::int64_t, 1> cu_seqlens_q, view<float, 3> out, view<float, 2> lse, const Mod& mod,
                 const attention::options& opt, view<float, 2> sums) {
  using mnemo::detail::require;
  using mnemo::detail::require_shape;
  const auto B = static_cast<std::int64_t>(seqs.size());
  const std::int64_t T = q.extent(0), Hq = q.extent(1), Hkv = c.num_heads(), D = c.head_dim(), Dv = c.value_dim();
  require(Hq >= 1 && Hq % Hkv == 0, fn, ": q.shape[1] (Hq) must be a positive multiple of the cache's Hkv = ", Hkv,
          ", got ", Hq);
  require_shape(fn, "q", q, {T, Hq, D}, " [T, Hq, D] (D from the cache)");
  require_shape(fn, "cu_seqlens_q", cu_seqlens_q, {B + 1}, " [B + 1] (B = seqs.size())");
  require_shape(fn, "out", out, {T, Hq, Dv}, " [T, Hq, Dv] (Dv from the cache)");
  if (!lse.empty()) require_shape(fn, "lse", lse, {T, Hq}, " [T, Hq]");
  require(std::isfinite(opt.scale), fn, ": options.scale must be finite, got ", opt.scale);
  require(opt.threads >= 0, fn, ": options.threads must be >= 0, got ", opt.threads);
  if (!opt.sinks.empty()) require_shape(fn, "options.sinks", opt.sinks, {Hq}, " [Hq]");
  require(cu_seqlens_q(0) == 0, fn, ": cu_seqlens_q[0] must be 0, got ", cu_seqlens_q(0));
  std::int64_t keys = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    const sequence s = seqs[static_cast<std::size_t>(b)];
    const std::int64_t q0 = cu_seqlens_q(b), q1 = cu_seqlens_q(b + 1);
    require(q1 >= q0 && q1 <= T, fn, ": cu_seqlens_q must be non-decreasing and end at most at T = ", T,
            ", got cu_seqlens_q[", b, "] = ", q0, ", cu_seqlens_q[", b + 1, "] = ", q1);
    const std::int64_t len = c.length(s, 0);  // throws for a sequence that does not exist
    for (std::int64_t h = 1; h < Hkv; ++h)
      require(c.length(s, h) == len, fn, ": every kv head of seqs[", b, "] (sequence ", s,
              ") must hold the same number of slots, got ", len, " in head 0 and ", c.length(s, h), " in head ", h);
    attention::mods::validate(mod, fn, Hq, q1 - q0, len);
    keys += len;
  }
  require(cu_seqlens_q(B) == T, fn, ": cu_seqlens_q[B] must be T = q.shape[0] = ", T, ", got ", cu_seqlens_q(B));
  if (!sums.empty()) {
    require_shape(fn, "sums", sums, {Hq, keys}, " [Hq, sum of the sequences' lengths]");
    mnemo::detail::require_disjoint(fn, "sums", sums, "out", out);
    mnemo::detail::require_disjoint(fn, "sums", sums, "lse", lse);
    mnemo::detail::require_disjoint(fn, "sums", sums, "q", q);
    mnemo::detail::require_disjoint(fn, "out", out, "q", q, "; with sums wanted out may not be q, not even in place");
  }
  const float scale = opt.scale != 0 ? opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  return {B, T, Hq, Hkv, D, Dv, scale};
}

// Dense pages: the batch as attention::paged's paged_kv over the cache's pool.
template <class T, class Mod, class TuArch>
void dense(const paged_cache& c, std::span<const sequence> seqs, view<const float, 3> q,
           view<const std::int64_t, 1> cu_seqlens_q, view<float, 3> out, view<float, 2> lse, const Mod& mod,
           const attention::options& opt, view<float, 2> sums, attention::decode_workspace* ws) {
  const auto B = static_cast<std::int64_t>(seqs.size());
  std::int64_t max_pages = 1;
  for (sequence s : seqs) max_pages = std::max<std::int64_t>(max_pages, static_cast<std::int64_t>(c.block_table(s).size()));
  tensor<std::int64_t, 2> table({B, max_pages});
  tensor<std::int64_t, 1> lens({B}), starts({B});
  std::fill_n(table.data(), table.size(), std::int64_t{0});
  for (std::int64_t b = 0; b < B; ++b) {
    const sequence s = seqs[static_cast<std::size_t>(b)];
    const auto pages = c.block_table(s);
    for (std::size_t p = 0; p < pages.size(); ++p) table(b, static_cast<std::int64_t>(p)) = pages[p];
    lens(b) = c.length(s, 0);
    starts(b) = c.start(s);
  }
  const attention::paged_kv<T> kv{c.keys<T>().permute({0, 2, 1, 3}), c.values<T>().permute({0, 2, 1, 3}), cview(table),
                                  cview(lens), cview(starts)};
  attention::paged<T, Mod, TuArch>(q, cu_seqlens_q, kv, out, lse, mod, opt, sums, ws);
}

// The KIVI pages of sequences seqs[b0 .. b0 + n) as a split-KV source. Part 0 of group (b, hk) is
// the head's sealed slots [0, quantized_length), read page by page (a page is a key group); part 1
// its tail slots, f32 rows of the sequence's tail.
template <int Bits>
struct kivi_pages_source {
  static constexpr bool per_row_keys = false;
  static constexpr bool row_tiled = true;

  const paged_cache* c;
  const sequence* seqs;
  std::int64_t b0, Lq;

  sequence seq(std::int64_t b) const { return seqs[b0 + b]; }
  std::int64_t length(std::int64_t b) const { return c->length(seq(b), 0); }
  std::int64_t query_offset(std::int64_t b) const { return length(b) - Lq; }
  attention::split_kv::key_parts parts(std::int64_t b, std::int64_t hk) const {
    const std::int64_t ql = c->quantized_length(seq(b), hk);
    return {2, {ql, c->length(seq(b), hk) - ql}};
  }
  std::int64_t scratch_floats(const attention::split_kv::plan& pl) const {
    return kivi::scratch::sizes_of(pl, c->value_groups()).total();
  }

  // f(j, page, row, run) for the runs of sealed keys [j0, j0 + n) of entry b inside one page each.
  template <class F>
  void runs(std::int64_t b, std::int64_t j0, std::int64_t n, F&& f) const {
    const std::int64_t S = c->page_size(), first = c->start(seq(b));
    const auto table = c->block_table(seq(b));
    for (std::int64_t j = 0; j < n;) {
      const std::int64_t slot = first + j0 + j, row = slot % S, run = std::min(S - row, n - j);
      f(j, static_cast<std::int64_t>(table[static_cast<std::size_t>(slot / S)]), row, run);
      j += run;
    }
  }
  // The tail row of tail key j0 (slot quantized_length + j0); the tail keys are consecutive rows.
  std::int64_t tail_row(const attention::split_kv::key_block& kb) const {
    const sequence s = seq(kb.b);
    return (c->start(s) + c->quantized_length(s, kb.hk) + kb.j0) % c->page_size();
  }

  template <class Arch, int RowTile>
  void scores(const attention::split_kv::plan& pl, const attention::split_kv::key_block& kb, const float* qs, float* s,
              float* scratch) const {
    const std::int64_t D = pl.d.D, hk = kb.hk;
    if (kb.part == 1) {
      const std::int64_t r0 = tail_row(kb);
      const attention::split_kv::element_rows<Arch, float> rows{c->tail_keys(seq(kb.b)).ptr(hk, r0), D, D};
      const attention::split_kv::element_rows<Arch, float> next{c->tail_values(seq(kb.b)).ptr(hk, r0), pl.d.Dv, pl.d.Dv};
      attention::split_kv::score_pass<Arch, RowTile>(pl.R, pl.Rpad, qs, pl.Dpad, D, rows, kb.n, nullptr, s,
                                                     attention::decode_chunk, next);
      return;
    }
    const kivi::scratch w = kivi::scratch::split(pl, c->value_groups(), scratch);
    const auto kc = c->key_codes(), vc = c->value_codes();
    const auto vscale = c->value_scales(), vmin = c->value_mins();
    // The runs of the block first, so that each one can prefetch the start of the next: the score
    // pass prefetches a fixed distance ahead inside its run only, and a run ends at a page end.
    struct run_at {
      std::int64_t j, page, row, n;
    };
    std::array<run_at, attention::decode_chunk / paged_cache::min_page_size + 2> at;
    std::size_t count = 0;
    runs(kb.b, kb.j0, kb.n, [&](std::int64_t j, std::int64_t page, std::int64_t row, std::int64_t run) {
      at[count++] = {j, page, row, run};
    });
    for (std::size_t i = 0; i < count; ++i) {
      const run_at& r = at[i];
      if (i + 1 < count) {
        const run_at& next = at[i + 1];
        const std::int64_t ahead = std::min(next.n, attention::split_kv::prefetch_keys);
        attention::split_kv::prefetch(kc.ptr(next.page, hk, next.row), ahead * kc.stride(2));
        attention::split_kv::prefetch(vc.ptr(next.page, hk, next.row), ahead * vc.stride(2));
      }
      for (std::int64_t g = 0; g < c->value_groups(); ++g) {  // the value pass's scales and minimums
        attention::split_kv::prefetch(vscale.ptr(r.page, hk, g, r.row), r.n * static_cast<std::int64_t>(sizeof(float)));
        attention::split_kv::prefetch(vmin.ptr(r.page, hk, g, r.row), r.n * static_cast<std::int64_t>(sizeof(float)));
      }
      kivi::group_scores<Arch, RowTile, Bits>(pl, w, qs, c->key_scales().ptr(r.page, hk, 0), c->key_mins().ptr(r.page, hk, 0),
                                              kc.ptr(r.page, hk, r.row), kc.stride(2), vc.ptr(r.page, hk, r.row),
                                              vc.stride(2), r.n, s + r.j);
    }
  }

  template <class Arch>
  void values(const attention::split_kv::plan& pl, const attention::split_kv::key_block& kb, const float* p, float* acc,
              float* scratch) const {
    const std::int64_t Dv = pl.d.Dv, hk = kb.hk;
    if (kb.part == 1) {
      const attention::split_kv::element_rows<Arch, float> rows{c->tail_values(seq(kb.b)).ptr(hk, tail_row(kb)), Dv, Dv};
      attention::split_kv::value_pass<Arch>(pl.R, p, 1, Dv, attention::decode_chunk, Dv, pl.Dvpad, rows, kb.n, acc);
      return;
    }
    const std::int64_t NG = c->value_groups(), VG = c->config().value_group;
    const kivi::scratch w = kivi::scratch::split(pl, NG, scratch);
    const auto vc = c->value_codes();
    const auto vscale = c->value_scales(), vmin = c->value_mins();
    kivi::begin_values(pl, w, NG);
    runs(kb.b, kb.j0, kb.n, [&](std::int64_t j, std::int64_t page, std::int64_t row, std::int64_t run) {
      kivi::run_values<Arch, Bits>(pl, w, NG, VG, p + j, vc.ptr(page, hk, row), vc.stride(2), vscale.ptr(page, hk, 0, row),
                                   vmin.ptr(page, hk, 0, row), vscale.stride(2), run, acc);
    });
    kivi::finish_values<Arch, Bits>(pl, w, NG, VG, acc);
  }
};

// Sequences seqs[b0 .. b0 + n), Lq <= decode_max_rows queries each and at least one key, their
// rows consecutive from q0: one engine call.
template <class Arch, int Bits, class Mod>
void kivi_run(const sizes& z, const paged_cache& c, std::span<const sequence> seqs, view<const float, 3> q,
              std::int64_t b0, std::int64_t n, std::int64_t q0, std::int64_t Lq, view<float, 3> out, view<float, 2> lse,
              const Mod& mod, const attention::options& opt, attention::decode_workspace& ws, view<float, 2> sums,
              std::int64_t k0) {
  const kivi_pages_source<Bits> src{&c, seqs.data(), b0, Lq};
  std::int64_t Lk = 0;  // the longest sequence: the engine's dims (each entry has its own offset)
  for (std::int64_t b = 0; b < n; ++b) Lk = std::max(Lk, src.length(b));
  const attention::dims d{n, z.Hq, z.Hkv, Lq, Lk, z.D, z.Dv, z.scale};
  tensor<float, 3> cs({n, z.Hq, sums.empty() ? 0 : Lk});
  const attention::split_kv::sums_out so{cs.as_view(), 0, sums.empty() ? 0 : Lk};
  tensor<float, 3> lb = attention::paged_detail::lse_buffer(lse, n, Lq);
  attention::split_kv::attend<Arch>(d, src, attention::paged_detail::rows_of(q, q0, n, Lq),
                                    attention::paged_detail::rows_of(out, q0, n, Lq), lb.as_view(), mod, opt.threads, ws,
                                    so, opt.sinks);
  attention::paged_detail::put_lse(lb, lse, q0);
  if (!sums.empty())
    for (std::int64_t b = 0; b < n; k0 += src.length(b), ++b)
      for (std::int64_t h = 0; h < z.Hq; ++h) std::copy_n(cs.as_view().ptr(b, h, 0), src.length(b), sums.ptr(h, k0));
}

// One sequence with more than decode_max_rows queries: its keys and values dequantized once into
// contiguous f32 tensors, then attention::flash.
template <class Arch, class Mod>
void kivi_prefill(const sizes& z, const paged_cache& c, sequence s, view<const float, 3> q, std::int64_t q0,
                  std::int64_t Lq, view<float, 3> out, view<float, 2> lse, const Mod& mod, const attention::options& opt,
                  view<float, 2> sums, std::int64_t k0) {
  const std::int64_t Lk = c.length(s, 0);
  tensor<float, 4> k({1, z.Hkv, Lk, z.D}), v({1, z.Hkv, Lk, z.Dv});
  std::vector<std::int64_t> slots(static_cast<std::size_t>(Lk));
  for (std::int64_t j = 0; j < Lk; ++j) slots[static_cast<std::size_t>(j)] = j;
  for (std::int64_t h = 0; h < z.Hkv; ++h) {
    const view<float, 2> kh(k.as_view().ptr(0, h, 0, 0), {Lk, z.D}, {z.D, 1});
    const view<float, 2> vh(v.as_view().ptr(0, h, 0, 0), {Lk, z.Dv}, {z.Dv, 1});
    c.gather(s, h, slots, kh, vh);
  }
  const attention::dims d{1, z.Hq, z.Hkv, Lq, Lk, z.D, z.Dv, z.scale};
  attention::options inner = opt;
  inner.scale = z.scale;
  tensor<float, 3> cs({1, z.Hq, sums.empty() ? 0 : Lk});
  tensor<float, 3> lb = attention::paged_detail::lse_buffer(lse, 1, Lq);
  attention::flash_detail::forward<float, Mod, Arch>(d, attention::paged_detail::rows_of(q, q0, 1, Lq), cview(k), cview(v),
                                                     attention::paged_detail::rows_of(out, q0, 1, Lq), lb.as_view(), mod,
                                                     inner, attention::column_sums{cs.as_view(), 0});
  attention::paged_detail::put_lse(lb, lse, q0);
  if (!sums.empty())
    for (std::int64_t h = 0; h < z.Hq; ++h) std::copy_n(cs.as_view().ptr(0, h, 0), Lk, sums.ptr(h, k0));
}

template <int Bits, class Mod, class TuArch>
void kivi(const sizes& z, const paged_cache& c, std::span<const sequence> seqs, view<const float, 3> q,
          view<const std::int64_t, 1> cu_seqlens_q, view<float, 3> out, view<float, 2> lse, const Mod& mod,
          const attention::options& opt, view<float, 2> sums, attention::decode_workspace* ws) {
  attention::decode_workspace own;
  attention::decode_workspace& w = ws ? *ws : own;
  if (!sums.empty())
    for (std::int64_t h = 0; h < z.Hq; ++h) std::fill_n(sums.ptr(h, 0), sums.extent(1), 0.0f);
  std::vector<std::int64_t> k0(static_cast<std::size_t>(z.B) + 1, 0);  // each sequence's first column of sums
  for (std::int64_t b = 0; b < z.B; ++b)
    k0[static_cast<std::size_t>(b) + 1] = k0[static_cast<std::size_t>(b)] + c.length(seqs[static_cast<std::size_t>(b)], 0);
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    for (std::int64_t b = 0; b < z.B;) {
      const std::int64_t q0 = cu_seqlens_q(b), Lq = cu_seqlens_q(b + 1) - q0, kb = k0[static_cast<std::size_t>(b)];
      const sequence s = seqs[static_cast<std::size_t>(b)];
      if (Lq == 0) {
        ++b;
        continue;
      }
      if (c.length(s, 0) == 0) {  // no key: out 0, lse = sink (or -inf)
        for (std::int64_t i = 0; i < Lq; ++i)
          for (std::int64_t h = 0; h < z.Hq; ++h) {
            std::fill_n(out.ptr(q0 + i, h), z.Dv, 0.0f);
            if (!lse.empty()) lse(q0 + i, h) = attention::sink_of(opt, h);
          }
        ++b;
        continue;
      }
      if (Lq > attention::decode_max_rows) {
        kivi_prefill<Arch>(z, c, s, q, q0, Lq, out, lse, mod, opt, sums, kb);
        ++b;
        continue;
      }
      // The run of following sequences with as many queries and some keys: one engine call.
      std::int64_t n = 1;
      while (b + n < z.B && cu_seqlens_q(b + n + 1) - cu_seqlens_q(b + n) == Lq &&
             c.length(seqs[static_cast<std::size_t>(b + n)], 0) > 0)
        ++n;
      kivi_run<Arch, Bits>(z, c, seqs, q, b, n, q0, Lq, out, lse, mod, opt, w, sums, kb);
      b += n;
    }
  });
}

}  // namespace paged_attention_detail

// Attention of the sequences seqs of a paged cache, any storage kind (see the header): the same
// result as attention::reference on each sequence's gathered keys and values to f32 rounding, at
// the ISA level options.isa asks for.
template <class Mod = attention::mods::none, class TuArch = simd::default_arch>
void paged_attention(const paged_cache& c, std::span<const paged_cache::sequence> seqs,
                     view<const float, 3> q,                   // [T, Hq, D]
                     view<const std::int64_t, 1> cu_seqlens_q,  // [B + 1], B = seqs.size()
                     view<float, 3> out,                        // [T, Hq, Dv]
                     view<float, 2> lse = {},                   // [T, Hq] or empty
                     const Mod& mod = {}, const attention::options& opt = {},
                     view<float, 2> sums = {},  // [Hq, sum of the lengths] or empty: column sums
                     attention::decode_workspace* ws = nullptr) {
  namespace pd = paged_attention_detail;
  constexpr const char* fn = "kvcache::paged_attention";
  const pd::sizes z = pd::check_args(fn, c, seqs, q, cu_seqlens_q, out, lse, mod, opt, sums);
  switch (c.kind()) {
    case storage::f32: return pd::dense<float, Mod, TuArch>(c, seqs, q, cu_seqlens_q, out, lse, mod, opt, sums, ws);
    case storage::f16: return pd::dense<f16, Mod, TuArch>(c, seqs, q, cu_seqlens_q, out, lse, mod, opt, sums, ws);
    case storage::bf16: return pd::dense<bf16, Mod, TuArch>(c, seqs, q, cu_seqlens_q, out, lse, mod, opt, sums, ws);
    case storage::int8: return pd::kivi<8, Mod, TuArch>(z, c, seqs, q, cu_seqlens_q, out, lse, mod, opt, sums, ws);
    case storage::int4: return pd::kivi<4, Mod, TuArch>(z, c, seqs, q, cu_seqlens_q, out, lse, mod, opt, sums, ws);
    case storage::int2: break;  // paged_cache rejects int2 at construction
  }
}

}  // namespace mnemo::kvcache
