// mnemo/attention/paged.hpp — attention for a batch of sequences of different lengths whose keys
// and values live in a paged KV pool (vLLM's / FlashInfer's serving layout), in one call.
//
// Layout (../shared/golden's attention_paged):
//   q            [T, Hq, D]      the query tokens of the B sequences, packed; sequence b owns rows
//                                cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 (q_len_b of them)
//   cu_seqlens_q [B + 1]         int64, starts at 0, non-decreasing
//   k_pages      [num_pages, page_size, Hkv, D]   key j of sequence b is
//   v_pages      [num_pages, page_size, Hkv, Dv]  k_pages[block_table[b, j / page_size], j % page_size]
//   block_table  [B, max_pages]  int64 page ids (entries past a sequence's pages are not read)
//   seq_lens     [B]             int64 keys of each sequence (cached tokens and the new ones)
//   out          [T, Hq, Dv],  lse [T, Hq] (optional)
//   sums         [Hq, sum_b seq_lens[b]] (optional): column sums of the probabilities for the
//                decode-time KV policies (H2O, TOVA trackers): sums[h, k0_b + j] = sum over the
//                query rows i of sequence b of P[i, j], with k0_b = seq_lens[0] + .. + seq_lens[b-1]
//                (keys packed in sequence order; a sequence without queries gets 0)
// Any strides with a contiguous innermost dimension: kvcache::paged_cache's pool
// ([num_pages, Hkv, page_size, D]) is passed as its permute({0, 2, 1, 3}).
//
// How it runs (attention::paged). Consecutive sequences with the same number of queries, at most
// decode_max_rows (a batch of decode steps, or of speculative verifications of k draft tokens),
// are one call of the split-KV engine (split_kv.hpp) over a paged source: the source walks each
// sequence's block table and hands the engine's score and value passes runs of consecutive rows
// inside a page, so the tile loops read the pages where they lie, in any storage type, with every
// mod and sinks; each sequence's queries sit at its own last positions (the source's
// query_offset). Work items span (sequence, kv head, key chunk), so a batch that mixes a 100-token
// and a 100,000-token sequence keeps both threads busy. A sequence with more queries (a chunk of a
// prefill) gathers its keys and values once into a contiguous workspace and runs attention::flash
// on it: one extra pass over its K/V, beside the Lq x Lk work of the prefill itself. Results are
// bit-identical for every thread count.
//
// Semantics: per sequence, attention::reference with Lq = q_len_b and Lk = seq_lens[b]: the queries
// are the sequence's last q_len_b tokens, so causal masks are bottom-right per sequence (query row
// i of the sequence sits at key position i + seq_lens[b] - q_len_b), every mod sees the sequence's
// own positions, and options.sinks join every row's denominator. A sequence with q_len_b = 0 has
// no rows; one with seq_lens[b] = 0 gives out 0 and lse = sink (or -inf).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/attention/split_kv.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::attention {

// The paged keys and values of a batch (see the header).
template <class KV>
struct paged_kv {
  view<const KV, 4> k_pages;                 // [num_pages, page_size, Hkv, D]
  view<const KV, 4> v_pages;                 // [num_pages, page_size, Hkv, Dv]
  view<const std::int64_t, 2> block_table;   // [B, max_pages]
  view<const std::int64_t, 1> seq_lens;      // [B]
  // [B] or empty (all 0): rows of a sequence's first page before its key 0 (kvcache::paged_cache::
  // start after keep_last): key j is row (start + j) % page_size of page (start + j) / page_size.
  view<const std::int64_t, 1> seq_starts = {};
};

// The validated sizes of one paged call.
struct paged_dims {
  std::int64_t B, T, Hq, Hkv, D, Dv, num_pages, page_size, max_pages;
  float scale;
};

namespace paged_detail {

template <class KV>
paged_dims check_args(const char* fn, view<const float, 3> q, view<const std::int64_t, 1> cu_seqlens_q,
                      const paged_kv<KV>& kv, view<float, 3> out, view<float, 2> lse, const options& opt,
                      view<float, 2> sums = {}) {
  static_assert(is_kv_type_v<KV>, "attention::paged: K/V elements must be float, mnemo::f16 or mnemo::bf16");
  using mnemo::detail::require;
  using mnemo::detail::require_shape;
  const std::int64_t T = q.extent(0), Hq = q.extent(1), D = q.extent(2);
  const std::int64_t num_pages = kv.k_pages.extent(0), page_size = kv.k_pages.extent(1), Hkv = kv.k_pages.extent(2);
  const std::int64_t Dv = kv.v_pages.extent(3), B = kv.seq_lens.extent(0), max_pages = kv.block_table.extent(1);
  require(D >= 1 && Dv >= 1, fn, ": head dims must be >= 1, got D=", D, ", Dv=", Dv);
  require(Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0, fn, ": q.shape[1] (Hq) must be a positive multiple of ",
          "k_pages.shape[2] (Hkv), got Hq=", Hq, ", Hkv=", Hkv);
  require(page_size >= 1, fn, ": k_pages.shape[1] (page_size) must be >= 1, got ", page_size);
  require_shape(fn, "k_pages", kv.k_pages, {num_pages, page_size, Hkv, D}, " [num_pages, page_size, Hkv, D] (D from q)");
  require_shape(fn, "v_pages", kv.v_pages, {num_pages, page_size, Hkv, Dv}, " [num_pages, page_size, Hkv, Dv]");
  require_shape(fn, "block_table", kv.block_table, {B, max_pages}, " [B, max_pages] (B from seq_lens)");
  require_shape(fn, "cu_seqlens_q", cu_seqlens_q, {B + 1}, " [B + 1] (B from seq_lens)");
  if (!kv.seq_starts.empty()) require_shape(fn, "seq_starts", kv.seq_starts, {B}, " [B] (B from seq_lens)");
  require_shape(fn, "out", out, {T, Hq, Dv}, " [T, Hq, Dv]");
  if (!lse.empty()) require_shape(fn, "lse", lse, {T, Hq}, " [T, Hq]");
  require(std::isfinite(opt.scale), fn, ": options.scale must be finite, got ", opt.scale);
  require(opt.threads >= 0, fn, ": options.threads must be >= 0, got ", opt.threads);
  if (!opt.sinks.empty()) require_shape(fn, "options.sinks", opt.sinks, {Hq}, " [Hq]");
  require(cu_seqlens_q(0) == 0, fn, ": cu_seqlens_q[0] must be 0, got ", cu_seqlens_q(0));
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t q0 = cu_seqlens_q(b), q1 = cu_seqlens_q(b + 1), len = kv.seq_lens(b);
    const std::int64_t start = kv.seq_starts.empty() ? 0 : kv.seq_starts(b);
    require(q1 >= q0 && q1 <= T, fn, ": cu_seqlens_q must be non-decreasing and end at most at T = ", T,
            ", got cu_seqlens_q[", b, "] = ", q0, ", cu_seqlens_q[", b + 1, "] = ", q1);
    require(start >= 0 && start < page_size, fn, ": seq_starts[", b, "] must be in [0, page_size = ", page_size,
            "), got ", start);
    require(len >= 0 && len <= max_pages * page_size - start, fn, ": seq_lens[", b,
            "] must be in [0, max_pages * page_size - seq_starts[b] = ", max_pages * page_size - start, "], got ", len);
    for (std::int64_t p = 0; p < (start + len + page_size - 1) / page_size; ++p) {
      const std::int64_t id = kv.block_table(b, p);
      require(id >= 0 && id < num_pages, fn, ": block_table[", b, ", ", p, "] must be a page id in [0, ", num_pages,
              ") (sequence ", b, " has ", len, " keys), got ", id);
    }
  }
  require(cu_seqlens_q(B) == T, fn, ": cu_seqlens_q[B] must be T = q.shape[0] = ", T, ", got ", cu_seqlens_q(B));
  if (!sums.empty()) {
    std::int64_t keys = 0;
    for (std::int64_t b = 0; b < B; ++b) keys += kv.seq_lens(b);
    require_shape(fn, "sums", sums, {Hq, keys}, " [Hq, sum of seq_lens]");
    mnemo::detail::require_disjoint(fn, "sums", sums, "out", out);
    mnemo::detail::require_disjoint(fn, "sums", sums, "lse", lse);
    mnemo::detail::require_disjoint(fn, "sums", sums, "q", q);
    mnemo::detail::require_disjoint(fn, "out", out, "q", q, "; with sums wanted out may not be q, not even in place");
    mnemo::detail::require_disjoint(fn, "sums", sums, "k_pages", kv.k_pages);
    mnemo::detail::require_disjoint(fn, "sums", sums, "v_pages", kv.v_pages);
  }
  const float scale = opt.scale != 0 ? opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  return {B, T, Hq, Hkv, D, Dv, num_pages, page_size, max_pages, scale};
}

// Rows [q0, q0 + n Lq) of a [T, H, D] tensor as [n, H, Lq, D] (n sequences of Lq rows each; no
// copy): how each kernel below sees q and out.
template <class T>
view<T, 4> rows_of(view<T, 3> x, std::int64_t q0, std::int64_t n, std::int64_t Lq) {
  return {x.ptr(q0), {n, x.extent(1), Lq, x.extent(2)}, {Lq * x.stride(0), x.stride(1), x.stride(0), 1}};
}

// The lse of n sequences of Lq rows each from row q0, computed as [n, H, Lq] (a view's innermost
// dimension is contiguous, which these rows of [T, H] are not), into lse [T, H]: a buffer of the
// right size (empty when lse is), and the copy back.
inline tensor<float, 3> lse_buffer(view<float, 2> lse, std::int64_t n, std::int64_t Lq) {
  return tensor<float, 3>({n, lse.empty() ? 0 : lse.extent(1), lse.empty() ? 0 : Lq});
}
inline void put_lse(const tensor<float, 3>& buffer, view<float, 2> lse, std::int64_t q0) {
  if (lse.empty()) return;
  const std::int64_t Lq = buffer.extent(2);
  for (std::int64_t b = 0; b < buffer.extent(0); ++b)
    for (std::int64_t h = 0; h < buffer.extent(1); ++h)
      for (std::int64_t i = 0; i < Lq; ++i) lse(q0 + b * Lq + i, h) = buffer(b, h, i);
}

}  // namespace paged_detail

// The reference: for every sequence, its keys and values gathered from the pages into contiguous
// f32 tensors and attention::reference on its rows (double precision), with the same mod and
// options. Short and slow by design; the tests hold the fast path to it.
template <class KV, class Mod = mods::none>
void reference_paged(view<const float, 3> q,                   // [T, Hq, D]
                     view<const std::int64_t, 1> cu_seqlens_q,  // [B + 1]
                     const paged_kv<KV>& kv,
                     view<float, 3> out,       // [T, Hq, Dv]
                     view<float, 2> lse = {},  // [T, Hq] or empty
                     const Mod& mod = {}, const options& opt = {},
                     view<float, 2> sums = {}) {  // [Hq, sum of seq_lens] or empty
  constexpr const char* fn = "attention::reference_paged";
  const paged_dims d = paged_detail::check_args(fn, q, cu_seqlens_q, kv, out, lse, opt, sums);
  options inner = opt;
  inner.scale = d.scale;
  if (!sums.empty())
    for (std::int64_t h = 0; h < d.Hq; ++h) std::fill_n(sums.ptr(h, 0), sums.extent(1), 0.0f);
  std::int64_t k0 = 0;  // the sequence's first column of sums
  for (std::int64_t b = 0; b < d.B; k0 += kv.seq_lens(b), ++b) {
    const std::int64_t q0 = cu_seqlens_q(b), Lq = cu_seqlens_q(b + 1) - q0, Lk = kv.seq_lens(b);
    const std::int64_t start = kv.seq_starts.empty() ? 0 : kv.seq_starts(b);
    if (Lq == 0) continue;
    tensor<float, 4> k({1, d.Hkv, Lk, d.D}), v({1, d.Hkv, Lk, d.Dv});
    for (std::int64_t j = 0; j < Lk; ++j) {
      const std::int64_t page = kv.block_table(b, (start + j) / d.page_size), row = (start + j) % d.page_size;
      for (std::int64_t h = 0; h < d.Hkv; ++h) {
        for (std::int64_t c = 0; c < d.D; ++c) k(0, h, j, c) = to_float(kv.k_pages(page, row, h, c));
        for (std::int64_t c = 0; c < d.Dv; ++c) v(0, h, j, c) = to_float(kv.v_pages(page, row, h, c));
      }
    }
    const view<const float, 4> qb = paged_detail::rows_of(q, q0, 1, Lq);
    const view<float, 4> ob = paged_detail::rows_of(out, q0, 1, Lq);
    tensor<float, 3> lb = paged_detail::lse_buffer(lse, 1, Lq);
    if (Lk == 0) {  // no key: out 0, lse = sink (or -inf)
      for (std::int64_t h = 0; h < d.Hq; ++h)
        for (std::int64_t i = 0; i < Lq; ++i) {
          for (std::int64_t c = 0; c < d.Dv; ++c) ob(0, h, i, c) = 0.0f;
          if (!lse.empty()) lb(0, h, i) = sink_of(opt, h);
        }
    } else {
      tensor<float, 3> cs({1, d.Hq, sums.empty() ? 0 : Lk});
      reference(qb, cview(k), cview(v), ob, lb.as_view(), mod, inner, column_sums{cs.as_view(), 0});
      if (!sums.empty())
        for (std::int64_t h = 0; h < d.Hq; ++h) std::copy_n(cs.as_view().ptr(0, h, 0), Lk, sums.ptr(h, k0));
    }
    paged_detail::put_lse(lb, lse, q0);
  }
}

namespace paged_detail {

// The keys and values of the sequences [b0, b0 + B) of a batch in the pool, read in runs of
// consecutive rows of a page. The engine's batch entry b is sequence b0 + b, whose Lq queries sit
// at its last positions (query_offset).
template <class KV>
struct paged_source {
  static constexpr bool per_row_keys = false;
  static constexpr bool row_tiled = true;

  view<const KV, 4> k_pages;  // [num_pages, page_size, Hkv, D]
  view<const KV, 4> v_pages;  // [num_pages, page_size, Hkv, Dv]
  const paged_kv<KV>* kv;     // block tables, lengths and starts
  std::int64_t b0, Lq;        // first sequence; queries per sequence

  std::int64_t length(std::int64_t b) const { return kv->seq_lens(b0 + b); }
  std::int64_t start(std::int64_t b) const { return kv->seq_starts.empty() ? 0 : kv->seq_starts(b0 + b); }
  std::int64_t query_offset(std::int64_t b) const { return length(b) - Lq; }
  split_kv::key_parts parts(std::int64_t b, std::int64_t) const { return {1, {length(b)}}; }
  // Two tables of decode_chunk row pointers (2 floats each): the chunk's K and V rows, wherever
  // their pages are.
  static constexpr std::int64_t table_floats = decode_chunk * static_cast<std::int64_t>(sizeof(const KV*) / sizeof(float));
  std::int64_t scratch_floats(const split_kv::plan&) const { return 2 * table_floats; }

  // f(j, page, row, run) for the runs of keys [j0, j0 + n) of entry b inside one page each.
  template <class F>
  void runs(std::int64_t b, std::int64_t j0, std::int64_t n, F&& f) const {
    const std::int64_t S = k_pages.extent(1), first = start(b);
    const std::int64_t* table = kv->block_table.ptr(b0 + b);
    for (std::int64_t j = 0; j < n;) {
      const std::int64_t slot = first + j0 + j, row = slot % S, run = std::min(S - row, n - j);
      f(j, table[slot / S], row, run);
      j += run;
    }
  }

  // The rows of keys [j0, j0 + n) of entry b of `pool` (k_pages or v_pages), into the table.
  const KV* const* row_table(const view<const KV, 4>& pool, const split_kv::key_block& kb, float* scratch) const {
    const KV** table = reinterpret_cast<const KV**>(scratch);  // 64-byte aligned, decode_chunk entries
    runs(kb.b, kb.j0, kb.n, [&](std::int64_t j, std::int64_t page, std::int64_t row, std::int64_t run) {
      const KV* first = pool.ptr(page, row, kb.hk);
      for (std::int64_t t = 0; t < run; ++t) table[j + t] = first + t * pool.stride(1);
    });
    return table;
  }

  template <class Arch, int RowTile>
  void scores(const split_kv::plan& pl, const split_kv::key_block& kb, const float* qs, float* s, float* scratch) const {
    const split_kv::pointer_rows<Arch, KV> rows(row_table(k_pages, kb, scratch), pl.d.D);
    const split_kv::pointer_rows<Arch, KV> next(row_table(v_pages, kb, scratch + table_floats), pl.d.Dv);  // prefetched beside K
    split_kv::score_pass<Arch, RowTile>(pl.R, pl.Rpad, qs, pl.Dpad, pl.d.D, rows, kb.n, nullptr, s, decode_chunk, next);
  }
  // The V row table scores() built for this block (the engine runs values(kb) right after
  // scores(kb) on the same scratch).
  template <class Arch>
  void values(const split_kv::plan& pl, const split_kv::key_block& kb, const float* p, float* acc, float* scratch) const {
    const split_kv::pointer_rows<Arch, KV> rows(reinterpret_cast<const KV* const*>(scratch + table_floats), pl.d.Dv);
    split_kv::value_pass<Arch>(pl.R, p, 1, pl.d.Dv, decode_chunk, pl.d.Dv, pl.Dvpad, rows, kb.n, acc);
  }
};

// Sequences [b0, b0 + n) at Arch, each with Lq <= decode_max_rows queries and at least one key,
// their rows consecutive from q0: one engine call, whose work items span (sequence, kv head, key
// chunk), so a long sequence beside short ones keeps every thread busy.
template <class Arch, class KV, class Mod>
void decode_run(const paged_dims& pd, view<const float, 3> q, const paged_kv<KV>& kv, std::int64_t b0, std::int64_t n,
                std::int64_t q0, std::int64_t Lq, view<float, 3> out, view<float, 2> lse, const Mod& mod,
                const options& opt, decode_workspace& ws, view<float, 2> sums, std::int64_t k0) {
  std::int64_t Lk = 0;  // the longest sequence: the engine's dims (each entry has its own offset)
  for (std::int64_t b = b0; b < b0 + n; ++b) Lk = std::max(Lk, kv.seq_lens(b));
  const dims d{n, pd.Hq, pd.Hkv, Lq, Lk, pd.D, pd.Dv, pd.scale};
  const paged_source<KV> src{kv.k_pages, kv.v_pages, &kv, b0, Lq};
  // Column sums: the engine's [n, Hq, Lk] (each entry's keys at their index), copied out packed.
  tensor<float, 3> cs({n, pd.Hq, sums.empty() ? 0 : Lk});
  const split_kv::sums_out so{cs.as_view(), 0, sums.empty() ? 0 : Lk};
  tensor<float, 3> lb = lse_buffer(lse, n, Lq);
  split_kv::attend<Arch>(d, src, rows_of(q, q0, n, Lq), rows_of(out, q0, n, Lq), lb.as_view(), mod, opt.threads, ws, so,
                         opt.sinks);
  put_lse(lb, lse, q0);
  if (!sums.empty())
    for (std::int64_t b = 0; b < n; k0 += src.length(b), ++b)
      for (std::int64_t h = 0; h < pd.Hq; ++h) std::copy_n(cs.as_view().ptr(b, h, 0), src.length(b), sums.ptr(h, k0));
}

// One sequence with more than decode_max_rows queries (a prefill chunk): its keys and values
// gathered once into a contiguous copy, then attention::flash.
template <class Arch, class KV, class Mod>
void prefill(const paged_dims& pd, view<const float, 3> q, const paged_kv<KV>& kv, std::int64_t b, std::int64_t q0,
             std::int64_t Lq, view<float, 3> out, view<float, 2> lse, const Mod& mod, const options& opt,
             view<float, 2> sums, std::int64_t k0) {
  const std::int64_t Lk = kv.seq_lens(b);
  const dims d{1, pd.Hq, pd.Hkv, Lq, Lk, pd.D, pd.Dv, pd.scale};
  tensor<KV, 4> k({1, pd.Hkv, Lk, pd.D}), v({1, pd.Hkv, Lk, pd.Dv});
  const paged_source<KV> src{kv.k_pages, kv.v_pages, &kv, b, Lq};
  parallel_for(
      pd.Hkv,
      [&](std::int64_t hk) {
        src.runs(0, 0, Lk, [&](std::int64_t j, std::int64_t page, std::int64_t row, std::int64_t run) {
          for (std::int64_t t = 0; t < run; ++t) {
            std::copy_n(kv.k_pages.ptr(page, row + t, hk), pd.D, &k(0, hk, j + t, 0));
            std::copy_n(kv.v_pages.ptr(page, row + t, hk), pd.Dv, &v(0, hk, j + t, 0));
          }
        });
      },
      opt.threads);
  options inner = opt;
  inner.scale = pd.scale;
  tensor<float, 3> cs({1, pd.Hq, sums.empty() ? 0 : Lk});
  tensor<float, 3> lb = lse_buffer(lse, 1, Lq);
  flash_detail::forward<KV, Mod, Arch>(d, rows_of(q, q0, 1, Lq), cview(k), cview(v), rows_of(out, q0, 1, Lq),
                                       lb.as_view(), mod, inner, column_sums{cs.as_view(), 0});
  put_lse(lb, lse, q0);
  if (!sums.empty())
    for (std::int64_t h = 0; h < pd.Hq; ++h) std::copy_n(cs.as_view().ptr(0, h, 0), Lk, sums.ptr(h, k0));
}

}  // namespace paged_detail

// Attention of a batch of sequences over a paged KV pool (see the header): the same result as
// reference_paged to f32 rounding, at the ISA level options.isa asks for.
template <class KV, class Mod = mods::none, class TuArch = simd::default_arch>
void paged(view<const float, 3> q,                   // [T, Hq, D]
           view<const std::int64_t, 1> cu_seqlens_q,  // [B + 1]
           const paged_kv<KV>& kv,
           view<float, 3> out,       // [T, Hq, Dv]
           view<float, 2> lse = {},  // [T, Hq] or empty
           const Mod& mod = {}, const options& opt = {},
           view<float, 2> sums = {},  // [Hq, sum of seq_lens] or empty: column sums (see the header)
           decode_workspace* ws = nullptr) {
  constexpr const char* fn = "attention::paged";
  const paged_dims d = paged_detail::check_args(fn, q, cu_seqlens_q, kv, out, lse, opt, sums);
  for (std::int64_t b = 0; b < d.B; ++b) {
    const std::int64_t Lq = cu_seqlens_q(b + 1) - cu_seqlens_q(b);
    mods::validate(mod, fn, d.Hq, Lq, kv.seq_lens(b));
  }
  decode_workspace own;
  decode_workspace& w = ws ? *ws : own;
  if (!sums.empty())
    for (std::int64_t h = 0; h < d.Hq; ++h) std::fill_n(sums.ptr(h, 0), sums.extent(1), 0.0f);
  std::vector<std::int64_t> k0(static_cast<std::size_t>(d.B) + 1, 0);  // each sequence's first column of sums
  for (std::int64_t b = 0; b < d.B; ++b) k0[static_cast<std::size_t>(b) + 1] = k0[static_cast<std::size_t>(b)] + kv.seq_lens(b);
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    for (std::int64_t b = 0; b < d.B;) {
      const std::int64_t q0 = cu_seqlens_q(b), Lq = cu_seqlens_q(b + 1) - q0, kb = k0[static_cast<std::size_t>(b)];
      if (Lq == 0) {
        ++b;
        continue;
      }
      if (kv.seq_lens(b) == 0) {  // no key: out 0, lse = sink (or -inf)
        for (std::int64_t i = 0; i < Lq; ++i)
          for (std::int64_t h = 0; h < d.Hq; ++h) {
            std::fill_n(out.ptr(q0 + i, h), d.Dv, 0.0f);
            if (!lse.empty()) lse(q0 + i, h) = sink_of(opt, h);
          }
        ++b;
        continue;
      }
      if (Lq > decode_max_rows) {
        paged_detail::prefill<Arch>(d, q, kv, b, q0, Lq, out, lse, mod, opt, sums, kb);
        ++b;
        continue;
      }
      // The run of following sequences with as many queries and some keys: one engine call.
      std::int64_t n = 1;
      while (b + n < d.B && cu_seqlens_q(b + n + 1) - cu_seqlens_q(b + n) == Lq && kv.seq_lens(b + n) > 0) ++n;
      paged_detail::decode_run<Arch>(d, q, kv, b, n, q0, Lq, out, lse, mod, opt, w, sums, kb);
      b += n;
    }
  });
}

}  // namespace mnemo::attention
