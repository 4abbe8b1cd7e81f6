// mnemo/kvcache/paged.hpp — a paged KV cache of one attention layer for many sequences: a pool of
// fixed-size pages, a block table and per-kv-head lengths per sequence, prefix sharing by
// reference count, copy on write, rollback and compaction.
//
// Usage (one layer; a serving loop keeps one paged_cache per layer):
//
//   kvcache::paged_cache c({.kind = kvcache::storage::f16, .Hkv = 8, .D = 128, .page_size = 16,
//                           .num_pages = 4096});
//   auto a = c.create();                 // a new, empty sequence
//   c.append(a, k_prompt, v_prompt);     // k [Hkv, n, D], v [Hkv, n, Dv] in f32
//   auto b = c.fork(a);                  // b shares a's pages (a system prompt): no copy
//   c.append(b, k_tok, v_tok);           // b's partly filled last page is copied first (copy on write)
//   c.truncate(b, 3);                    // rejected speculative tokens: drop b's last 3
//   c.compact(a, policy_selection);      // keep a policy's slots (kvcache::selection, per kv head)
//   c.keep_last(w, 4096);                // a sliding-window layer: only the last 4096 tokens stay
//   c.release(b);                        // b's pages go back to the pool when nobody else holds them
//
// Layout. Page p holds, for every kv head h, page_size consecutive slots of K [page_size, D] and
// V [page_size, Dv] — keys() is [num_pages, Hkv, page_size, D] ("HND": each head's rows of a page
// are contiguous, so a decode kernel streams page_size * D elements at a time). Slot j of head h
// of sequence s lives in page block_table(s)[(start(s) + j) / page_size], row (start(s) + j) %
// page_size; start(s) is 0 unless keep_last() dropped the oldest tokens of a sliding-window
// layer (a ring of pages: memory O(window), not O(sequence)). Every slot also
// keeps the original position of its token (positions [num_pages, Hkv, page_size]), so masks and
// RoPE stay right after compaction. Heads may hold different numbers of slots (ragged, after a
// head-adaptive compaction); the block table covers the longest head.
//
// Sharing. A page has a reference count: fork() copies the parent's block table and counts every
// page once more. A write into a page held by more than one sequence first copies the whole page
// (every head's rows or codes, scales, minimums and positions) into a fresh page for the writer
// (append into a shared partly filled last page, the seal of such a page, compaction of a shared
// sequence); pages that are full stay shared for good. release() and truncate() drop
// references; a page with none returns to the free list.
//
// Storage kinds: f32, f16 and bf16 (elements rounded to nearest even on append, as in
// layer_cache), and KIVI int8 / int4 (Liu et al. 2024; the quantizers of kvcache/quant.hpp, codes
// packed per row as layer_cache packs them: int4 two codes per byte, low nibble first):
//   keys    a page is the key group: per channel over the rows of one (page, kv head), one scale
//           and one min per channel: key_scales(), key_mins() [num_pages, Hkv, D]
//   values  per token, in groups of config.value_group consecutive channels, one scale and min
//           per token per group: value_scales(), value_mins() [num_pages, Hkv, value_groups, page_size]
//   codes   key_codes() [num_pages, Hkv, page_size, row_bytes(D)], value_codes() [..., row_bytes(Dv)]
//   tail    a head's rows of a page are quantized ("sealed") when all page_size rows of the page are
//           filled for that head; until then the rows of the sequence's last, partly filled page
//           stay in f32 in a per-sequence tail: tail_keys(s) [Hkv, page_size, D], tail_values(s)
//           [Hkv, page_size, Dv].
// With sealed = (start(s) + length(s, h)) / page_size pages of head h, slots j < quantized_length(s,
// h) = max(0, sealed * page_size - start(s)) are codes at the page and row above (key channel c:
// decode_value(code, key_mins()(p, h, c), key_scales()(p, h, c)); value channel c: the same with
// value_mins()(p, h, c / value_group, row), value_scales()(...)), the rest are rows (start(s) + j) %
// page_size of the tail. A sequence's first page after keep_last() is sealed over its rows from
// start(s) on (the rows before it belong to dropped tokens). A fork copies its parent's tail.
// Two operations quantize again what was already quantized (one more rounding of up to scale / 2):
//   truncate()  into a sealed page dequantizes that head's kept rows of the page into the tail
//               (they read back as before, without writing the page); when the page fills again
//               they are quantized again with its new rows.
//   compact()   keeps a head's pages before its first moved slot as they are and rebuilds the
//               head from that page on from the kept tokens' f32 values (dequantized codes or tail
//               rows), sealing the pages that are full: those kept tokens are quantized again.
//
// Errors: every call validates its arguments (sequence ids, shapes, lengths, the pool's free
// pages) and throws mnemo::error naming the argument before it changes anything.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <span>
#include <vector>

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/quant.hpp"
#include "mnemo/kvcache/selection.hpp"

namespace mnemo::kvcache {

struct paged_config {
  storage kind = storage::f32;
  std::int64_t Hkv = 1;
  std::int64_t D = 0;              // key head dim
  std::int64_t Dv = 0;             // value head dim; 0: D
  std::int64_t page_size = 16;     // slots per page, 16 .. 256
  std::int64_t num_pages = 0;      // pages in the pool
  std::int64_t value_group = 128;  // int8 / int4: channels per value group of a token; a multiple of 16, or >= Dv
};

class paged_cache {
 public:
  using sequence = std::int64_t;
  static constexpr std::int64_t min_page_size = 16, max_page_size = 256;
  static constexpr std::int32_t no_page = -1;

  explicit paged_cache(const paged_config& cfg) : cfg_(cfg) {
    constexpr const char* fn = "kvcache::paged_cache";
    using detail::require;
    if (cfg_.Dv == 0) cfg_.Dv = cfg_.D;
    require(cfg_.kind != storage::int2, fn,
            ": config.kind int2 is not supported by paged_cache (only by layer_cache); use int4 or int8");
    require(std::find(std::begin(all_storages), std::end(all_storages), cfg_.kind) != std::end(all_storages), fn,
            ": config.kind must be f32, f16, bf16, int8 or int4, got ", static_cast<int>(cfg_.kind));
    require(cfg_.Hkv >= 1, fn, ": config.Hkv must be >= 1, got ", cfg_.Hkv);
    require(cfg_.D >= 1 && cfg_.Dv >= 1, fn, ": config.D and config.Dv must be >= 1, got D=", cfg_.D, ", Dv=", cfg_.Dv);
    require(cfg_.page_size >= min_page_size && cfg_.page_size <= max_page_size, fn, ": config.page_size must be in [",
            min_page_size, ", ", max_page_size, "], got ", cfg_.page_size);
    require(cfg_.num_pages >= 1 && cfg_.num_pages <= (std::int64_t{1} << 31) - 1, fn,
            ": config.num_pages must be in [1, 2^31 - 1], got ", cfg_.num_pages);
    if (is_quantized(cfg_.kind))
      require(cfg_.value_group >= 1 &&
                  (cfg_.value_group % layer_cache::value_group_multiple == 0 || cfg_.value_group >= cfg_.Dv),
              fn, ": config.value_group must be a multiple of ", layer_cache::value_group_multiple, " or >= Dv (",
              cfg_.Dv, "), got ", cfg_.value_group);
    const std::int64_t P = cfg_.num_pages, H = cfg_.Hkv, S = cfg_.page_size;
    switch (cfg_.kind) {
      case storage::f32: kf_ = tensor<float, 4>({P, H, S, cfg_.D}), vf_ = tensor<float, 4>({P, H, S, cfg_.Dv}); break;
      case storage::f16: kh_ = tensor<f16, 4>({P, H, S, cfg_.D}), vh_ = tensor<f16, 4>({P, H, S, cfg_.Dv}); break;
      case storage::bf16: kb_ = tensor<bf16, 4>({P, H, S, cfg_.D}), vb_ = tensor<bf16, 4>({P, H, S, cfg_.Dv}); break;
      default: {
        const int bits = storage_bits(cfg_.kind);
        kcodes_ = tensor<std::uint8_t, 4>({P, H, S, quant::row_bytes(bits, cfg_.D)});
        vcodes_ = tensor<std::uint8_t, 4>({P, H, S, quant::row_bytes(bits, cfg_.Dv)});
        kscale_ = tensor<float, 3>({P, H, cfg_.D}), kmin_ = tensor<float, 3>({P, H, cfg_.D});
        vscale_ = tensor<float, 4>({P, H, groups(), S}), vmin_ = tensor<float, 4>({P, H, groups(), S});
        vgroup_.resize(static_cast<std::size_t>(2 * groups()));
      }
    }
    pos_ = tensor<std::int64_t, 3>({P, H, S});
    refs_.assign(static_cast<std::size_t>(P), 0);
    free_.reserve(static_cast<std::size_t>(P));
    for (std::int64_t p = P - 1; p >= 0; --p) free_.push_back(static_cast<std::int32_t>(p));  // page 0 first
  }

  // ---- sizes --------------------------------------------------------------------------------
  const paged_config& config() const { return cfg_; }
  storage kind() const { return cfg_.kind; }
  std::int64_t num_heads() const { return cfg_.Hkv; }
  std::int64_t head_dim() const { return cfg_.D; }
  std::int64_t value_dim() const { return cfg_.Dv; }
  std::int64_t page_size() const { return cfg_.page_size; }
  std::int64_t num_pages() const { return cfg_.num_pages; }
  std::int64_t free_pages() const { return static_cast<std::int64_t>(free_.size()); }
  // Sequences that exist (created or forked and not released).
  std::int64_t num_sequences() const {
    return std::count_if(seqs_.begin(), seqs_.end(), [](const seq_state& s) { return s.alive; });
  }
  // How many sequences hold page p (0: free).
  std::int64_t references(std::int64_t page) const {
    detail::require(page >= 0 && page < cfg_.num_pages, "kvcache::paged_cache::references: page must be in [0, ",
                    cfg_.num_pages, "), got ", page);
    return refs_[static_cast<std::size_t>(page)];
  }

  std::int64_t length(sequence s, std::int64_t h) const {
    const seq_state& st = get("kvcache::paged_cache::length", s);
    return st.length[check_head("kvcache::paged_cache::length", h)];
  }
  std::int64_t max_length(sequence s) const {
    const seq_state& st = get("kvcache::paged_cache::max_length", s);
    return *std::max_element(st.length.begin(), st.length.end());
  }
  // Position the next append to s gives its first token (one past the newest appended).
  std::int64_t next_position(sequence s) const { return get("kvcache::paged_cache::next_position", s).next_position; }
  // Rows of s's first page before its slot 0 (tokens dropped by keep_last): slot j of s is row
  // (start(s) + j) % page_size of page block_table(s)[(start(s) + j) / page_size].
  std::int64_t start(sequence s) const { return get("kvcache::paged_cache::start", s).start; }
  // Page ids of s's slots [ceil((start + max_length) / page_size)].
  std::span<const std::int32_t> block_table(sequence s) const {
    const seq_state& st = get("kvcache::paged_cache::block_table", s);
    return {st.pages.data(), st.pages.size()};
  }
  // The original position of slot j of head h of sequence s.
  std::int64_t position(sequence s, std::int64_t h, std::int64_t j) const {
    constexpr const char* fn = "kvcache::paged_cache::position";
    const seq_state& st = get(fn, s);
    const std::size_t hi = check_head(fn, h);
    detail::require(j >= 0 && j < st.length[hi], fn, ": slot must be in [0, ", st.length[hi], ") for head ", h, ", got ",
                    j);
    return pos_(page_of(st, j), h, row_of(st, j));
  }

  // The pool, for kernels: [num_pages, Hkv, page_size, D] / [..., Dv] of the cache's element type
  // (f32, f16, bf16; the quantized kinds have the views below).
  template <class T>
  view<const T, 4> keys() const {
    return cview(store_of<T>(true));
  }
  template <class T>
  view<const T, 4> values() const {
    return cview(store_of<T>(false));
  }
  view<const std::int64_t, 3> positions() const { return cview(pos_); }

  // ---- quantized pages (int8 / int4; every call throws for f32, f16, bf16) -------------------

  // Value groups of a token: ceil(Dv / value_group).
  std::int64_t value_groups() const {
    require_quantized("kvcache::paged_cache::value_groups");
    return groups();
  }
  // Slots [0, quantized_length(s, h)) of head h are codes, the rest rows of tail_keys/values(s).
  std::int64_t quantized_length(sequence s, std::int64_t h) const {
    constexpr const char* fn = "kvcache::paged_cache::quantized_length";
    require_quantized(fn);
    const seq_state& st = get(fn, s);
    return sealed_length(st, static_cast<std::int64_t>(check_head(fn, h)));
  }
  view<const std::uint8_t, 4> key_codes() const {  // [num_pages, Hkv, page_size, row_bytes(D)]
    require_quantized("kvcache::paged_cache::key_codes");
    return cview(kcodes_);
  }
  view<const float, 3> key_scales() const {  // [num_pages, Hkv, D]
    require_quantized("kvcache::paged_cache::key_scales");
    return cview(kscale_);
  }
  view<const float, 3> key_mins() const {  // [num_pages, Hkv, D]
    require_quantized("kvcache::paged_cache::key_mins");
    return cview(kmin_);
  }
  view<const std::uint8_t, 4> value_codes() const {  // [num_pages, Hkv, page_size, row_bytes(Dv)]
    require_quantized("kvcache::paged_cache::value_codes");
    return cview(vcodes_);
  }
  view<const float, 4> value_scales() const {  // [num_pages, Hkv, value_groups, page_size]
    require_quantized("kvcache::paged_cache::value_scales");
    return cview(vscale_);
  }
  view<const float, 4> value_mins() const {  // [num_pages, Hkv, value_groups, page_size]
    require_quantized("kvcache::paged_cache::value_mins");
    return cview(vmin_);
  }
  // The f32 rows of s's last, partly filled page of every head: slot j >= quantized_length(s, h)
  // is row (start(s) + j) % page_size.
  view<const float, 3> tail_keys(sequence s) const {  // [Hkv, page_size, D]
    constexpr const char* fn = "kvcache::paged_cache::tail_keys";
    require_quantized(fn);
    return cview(get(fn, s).tail_k);
  }
  view<const float, 3> tail_values(sequence s) const {  // [Hkv, page_size, Dv]
    constexpr const char* fn = "kvcache::paged_cache::tail_values";
    require_quantized(fn);
    return cview(get(fn, s).tail_v);
  }

  // ---- sequences ----------------------------------------------------------------------------

  // A new, empty sequence.
  sequence create() {
    seq_state st;
    st.alive = true;
    st.length.assign(static_cast<std::size_t>(cfg_.Hkv), 0);
    if (is_quantized(cfg_.kind)) {
      st.tail_k = tensor<float, 3>({cfg_.Hkv, cfg_.page_size, cfg_.D});
      st.tail_v = tensor<float, 3>({cfg_.Hkv, cfg_.page_size, cfg_.Dv});
    }
    return add(std::move(st));
  }

  // A new sequence with parent's tokens: it holds the parent's pages (no copy) and a copy of the
  // parent's tail; the first write into a page both hold copies that page for the writer.
  sequence fork(sequence parent) {
    seq_state st = get("kvcache::paged_cache::fork", parent);
    for (std::int32_t p : st.pages) ++refs_[static_cast<std::size_t>(p)];
    return add(std::move(st));
  }

  // Drops s and its references to its pages.
  void release(sequence s) {
    seq_state& st = get("kvcache::paged_cache::release", s);
    for (std::int32_t p : st.pages) unref(p);
    st = seq_state{};
  }

  // ---- writes -------------------------------------------------------------------------------

  // Appends n tokens to every kv head of s at positions next_position(s) .. + n. Quantized kinds
  // take finite values with |x| <= quant::max_magnitude, and seal every page a head fills.
  void append(sequence s, view<const float, 3> k,  // [Hkv, n, D]
              view<const float, 3> v) {            // [Hkv, n, Dv]
    constexpr const char* fn = "kvcache::paged_cache::append";
    using detail::require;
    seq_state& st = get(fn, s);
    const std::int64_t n = k.extent(1);
    detail::require_shape(fn, "k", k, {cfg_.Hkv, n, cfg_.D}, " [Hkv, n, D] (Hkv, D from the cache)");
    detail::require_shape(fn, "v", v, {cfg_.Hkv, n, cfg_.Dv}, " [Hkv, n, Dv] (n from k)");
    if (n == 0) return;
    require(st.next_position <= INT64_MAX - n, fn, ": positions would overflow: next position ", st.next_position,
            " + n = ", n);
    if (is_quantized(cfg_.kind)) quant::require_quantizable(fn, k, v);
    // Pages the longest head needs after the append, and the copies of shared pages it writes into.
    const std::int64_t S = cfg_.page_size;
    std::int64_t need = 0;
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) {
      const std::int64_t len = st.length[static_cast<std::size_t>(h)];
      need = std::max(need, (st.start + len + n + S - 1) / S);
    }
    const std::int64_t have = static_cast<std::int64_t>(st.pages.size());
    std::int64_t copies = 0;
    for (std::int64_t i = first_written_page(st); i < have; ++i)
      if (refs_[static_cast<std::size_t>(st.pages[static_cast<std::size_t>(i)])] > 1) ++copies;
    require(need - have + copies <= free_pages(), fn, ": the pool is out of pages: the append needs ", need - have + copies,
            ", ", free_pages(), " are free (num_pages = ", cfg_.num_pages, ")");

    unshare_from(st, first_written_page(st));
    while (static_cast<std::int64_t>(st.pages.size()) < need) st.pages.push_back(take_page());
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h)
      for (std::int64_t t = 0; t < n; ++t) put_slot(st, h, k.ptr(h, t), v.ptr(h, t), st.next_position + t);
    st.next_position += n;
  }

  // Drops the last n tokens of every kv head of s (rejected speculative tokens); the next append
  // continues at the first dropped position. Pages nobody uses any more return to the pool.
  // Quantized kinds: a head cut inside a sealed page has its kept rows of that page dequantized
  // into the tail (see the header).
  void truncate(sequence s, std::int64_t n) {
    constexpr const char* fn = "kvcache::paged_cache::truncate";
    seq_state& st = get(fn, s);
    const std::int64_t shortest = *std::min_element(st.length.begin(), st.length.end());
    detail::require(n >= 0 && n <= shortest, fn, ": n must be in [0, ", shortest,
                    "] (the shortest head of the sequence), got ", n);
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) {
      std::int64_t& len = st.length[static_cast<std::size_t>(h)];
      if (is_quantized(cfg_.kind)) unseal(st, h, len - n);
      len -= n;
    }
    st.next_position -= n;
    shrink(st);
  }

  // A sliding-window layer keeps only its window: drops the oldest tokens of s so that at most
  // `window` remain in every kv head; whole pages that fall out of the window go back to the pool,
  // so the sequence holds at most ceil(window / page_size) + 1 pages however long it runs. The
  // kept slots renumber from 0 (keys keep their original positions; masks and ALiBi depend on
  // distances only). A step that attends with Lq queries needs window + Lq - 1 tokens (its first
  // query's window starts Lq - 1 tokens earlier): keep_last(s, window) suffices for decode steps.
  // Needs every head of s at the same length (no ragged compaction). Quantized kinds: nothing is
  // requantized (sealed pages and the tail stay where they are).
  void keep_last(sequence s, std::int64_t window) {
    constexpr const char* fn = "kvcache::paged_cache::keep_last";
    seq_state& st = get(fn, s);
    detail::require(window >= 1, fn, ": window must be >= 1, got ", window);
    const std::int64_t len = st.length[0];
    detail::require(std::all_of(st.length.begin(), st.length.end(), [&](std::int64_t l) { return l == len; }), fn,
                    ": every kv head of sequence ", s, " must hold the same number of slots (it was compacted per head)");
    if (len <= window) return;
    const std::int64_t drop = len - window;
    st.start += drop;
    for (std::int64_t& l : st.length) l = window;
    const std::int64_t gone = st.start / cfg_.page_size;  // leading pages with no kept slot
    for (std::int64_t i = 0; i < gone; ++i) unref(st.pages[static_cast<std::size_t>(i)]);
    st.pages.erase(st.pages.begin(), st.pages.begin() + gone);
    st.start -= gone * cfg_.page_size;
  }

  // Keeps the slots sel.heads[h] of every head h of s, in their order (a KV policy's decision);
  // the kept slots move to the front, their positions with them. Shared pages are copied first.
  // Quantized kinds rebuild each head from the page of its first moved slot on (see the header).
  void compact(sequence s, const selection& sel) {
    constexpr const char* fn = "kvcache::paged_cache::compact";
    seq_state& st = get(fn, s);
    validate(fn, sel, st.length);
    // Only pages that receive a moved slot are written; copy the shared ones among them.
    std::int64_t first = static_cast<std::int64_t>(st.pages.size());
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) {
      const auto& keep = sel.heads[static_cast<std::size_t>(h)];
      const std::int64_t moved = first_moved(keep);
      if (moved < static_cast<std::int64_t>(keep.size())) first = std::min(first, (st.start + moved) / cfg_.page_size);
    }
    std::int64_t copies = 0;
    for (std::int64_t i = first; i < static_cast<std::int64_t>(st.pages.size()); ++i)
      if (refs_[static_cast<std::size_t>(st.pages[static_cast<std::size_t>(i)])] > 1) ++copies;
    detail::require(copies <= free_pages(), fn, ": the pool is out of pages: compaction copies ", copies,
                    " shared pages, ", free_pages(), " are free");
    unshare_from(st, first);
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) {
      const auto& keep = sel.heads[static_cast<std::size_t>(h)];
      if (is_quantized(cfg_.kind)) {
        compact_quantized(st, h, keep);
        continue;
      }
      for (std::size_t i = 0; i < keep.size(); ++i) {  // ascending: a source is never overwritten before it is read
        const std::int64_t from = keep[i], to = static_cast<std::int64_t>(i);
        if (from == to) continue;
        const std::int64_t pf = page_of(st, from), pt = page_of(st, to), rf = row_of(st, from), rt = row_of(st, to);
        copy_row(pf, h, rf, pt, h, rt);
        pos_(pt, h, rt) = pos_(pf, h, rf);
      }
      st.length[static_cast<std::size_t>(h)] = static_cast<std::int64_t>(keep.size());
    }
    shrink(st);
  }

  // f32 copies of slots `slots` of head h of s: k_out [n, D], v_out [n, Dv] (quantized kinds:
  // sealed slots dequantized, the rest the tail's rows).
  void gather(sequence s, std::int64_t h, std::span<const std::int64_t> slots, view<float, 2> k_out,
              view<float, 2> v_out) const {
    constexpr const char* fn = "kvcache::paged_cache::gather";
    const seq_state& st = get(fn, s);
    const std::size_t hi = check_head(fn, h);
    const auto n = static_cast<std::int64_t>(slots.size());
    detail::require_shape(fn, "k_out", k_out, {n, cfg_.D}, " [n, D]");
    detail::require_shape(fn, "v_out", v_out, {n, cfg_.Dv}, " [n, Dv]");
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t j = slots[static_cast<std::size_t>(i)];
      detail::require(j >= 0 && j < st.length[hi], fn, ": slots[", i, "] must be in [0, ", st.length[hi], "), got ", j);
    }
    for (std::int64_t i = 0; i < n; ++i)
      read_slot(st, h, slots[static_cast<std::size_t>(i)], k_out.ptr(i), v_out.ptr(i));
  }

 private:
  struct seq_state {
    bool alive = false;
    std::vector<std::int32_t> pages;   // block table
    std::vector<std::int64_t> length;  // [Hkv]
    std::int64_t start = 0;            // rows of the first page before slot 0 (dropped by keep_last)
    std::int64_t next_position = 0;
    tensor<float, 3> tail_k, tail_v;   // int8 / int4: [Hkv, page_size, D / Dv] rows not sealed yet
  };

  sequence add(seq_state st) {
    for (std::size_t i = 0; i < seqs_.size(); ++i)
      if (!seqs_[i].alive) {
        seqs_[i] = std::move(st);
        return static_cast<sequence>(i);
      }
    seqs_.push_back(std::move(st));
    return static_cast<sequence>(seqs_.size() - 1);
  }

  const seq_state& get(const char* fn, sequence s) const {
    detail::require(s >= 0 && s < static_cast<sequence>(seqs_.size()) && seqs_[static_cast<std::size_t>(s)].alive, fn,
                    ": sequence ", s, " does not exist (ids come from create() or fork(); released ones are gone)");
    return seqs_[static_cast<std::size_t>(s)];
  }
  seq_state& get(const char* fn, sequence s) {
    return const_cast<seq_state&>(static_cast<const paged_cache&>(*this).get(fn, s));
  }

  std::size_t check_head(const char* fn, std::int64_t h) const {
    detail::require(h >= 0 && h < cfg_.Hkv, fn, ": kv head must be in [0, ", cfg_.Hkv, "), got ", h);
    return static_cast<std::size_t>(h);
  }

  void require_quantized(const char* fn) const {
    detail::require(is_quantized(cfg_.kind), fn, ": the cache stores ", storage_name(cfg_.kind),
                    ", not int8 or int4 (quantized pages)");
  }

  // Page and row of slot `slot` (slots count from the sequence's first kept token, `start` rows
  // into its first page).
  std::int64_t page_of(const seq_state& st, std::int64_t slot) const {
    return st.pages[static_cast<std::size_t>((st.start + slot) / cfg_.page_size)];
  }
  std::int64_t row_of(const seq_state& st, std::int64_t slot) const { return (st.start + slot) % cfg_.page_size; }

  // The first block-table entry an append writes into: the shortest head's current page.
  std::int64_t first_written_page(const seq_state& st) const {
    return (st.start + *std::min_element(st.length.begin(), st.length.end())) / cfg_.page_size;
  }

  // The first index i with keep[i] != i (keep.size() if none): the first slot compaction moves.
  static std::int64_t first_moved(const std::vector<std::int64_t>& keep) {
    std::int64_t i = 0;
    while (i < static_cast<std::int64_t>(keep.size()) && keep[static_cast<std::size_t>(i)] == i) ++i;
    return i;
  }

  std::int32_t take_page() {
    const std::int32_t p = free_.back();
    free_.pop_back();
    refs_[static_cast<std::size_t>(p)] = 1;
    return p;
  }
  void unref(std::int32_t p) {
    if (--refs_[static_cast<std::size_t>(p)] == 0) free_.push_back(p);
  }

  // Copies every shared page of st's block table from entry `first` on into a page of its own:
  // every buffer of the pool is [num_pages, ...], so a page is one contiguous block of each.
  void unshare_from(seq_state& st, std::int64_t first) {
    const auto copy_page = [&](auto& t, std::int32_t from, std::int32_t to) {
      const std::int64_t block = t.size() / cfg_.num_pages;
      std::copy_n(t.data() + from * block, block, t.data() + to * block);
    };
    for (std::size_t i = static_cast<std::size_t>(std::max<std::int64_t>(first, 0)); i < st.pages.size(); ++i) {
      const std::int32_t old = st.pages[i];
      if (refs_[static_cast<std::size_t>(old)] <= 1) continue;
      const std::int32_t fresh = take_page();
      switch (cfg_.kind) {
        case storage::f32: copy_page(kf_, old, fresh), copy_page(vf_, old, fresh); break;
        case storage::f16: copy_page(kh_, old, fresh), copy_page(vh_, old, fresh); break;
        case storage::bf16: copy_page(kb_, old, fresh), copy_page(vb_, old, fresh); break;
        default:
          copy_page(kcodes_, old, fresh), copy_page(kscale_, old, fresh), copy_page(kmin_, old, fresh);
          copy_page(vcodes_, old, fresh), copy_page(vscale_, old, fresh), copy_page(vmin_, old, fresh);
      }
      copy_page(pos_, old, fresh);
      unref(old);
      st.pages[i] = fresh;
    }
  }

  // Returns the block-table entries past the longest head to the pool.
  void shrink(seq_state& st) {
    const std::int64_t longest = *std::max_element(st.length.begin(), st.length.end());
    const auto keep = static_cast<std::size_t>((st.start + longest + cfg_.page_size - 1) / cfg_.page_size);
    while (st.pages.size() > keep) {
      unref(st.pages.back());
      st.pages.pop_back();
    }
  }

  template <class T>
  const tensor<T, 4>& store_of(bool key) const {
    static_assert(is_kv_type_v<T>, "paged_cache: the element type must be float, f16 or bf16");
    detail::require(storage_of<T> == cfg_.kind, "kvcache::paged_cache::keys/values: the cache stores ",
                    storage_name(cfg_.kind), ", not ", storage_name(storage_of<T>));
    if constexpr (std::is_same_v<T, float>) return key ? kf_ : vf_;
    else if constexpr (std::is_same_v<T, f16>) return key ? kh_ : vh_;
    else return key ? kb_ : vb_;
  }

  template <class T>
  static void put(T* dst, const float* src, std::int64_t n) {
    for (std::int64_t c = 0; c < n; ++c) dst[c] = T(src[c]);
  }
  template <class T>
  static void get_row(const T* src, float* dst, std::int64_t n) {
    for (std::int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(src[c]);
  }

  // ---- quantized pages ------------------------------------------------------------------------

  std::int64_t groups() const { return (cfg_.Dv + cfg_.value_group - 1) / cfg_.value_group; }

  // Slots of head h in sealed pages: max(0, sealed * page_size - start), sealed = (start + length) / page_size.
  std::int64_t sealed_length(const seq_state& st, std::int64_t h) const {
    const std::int64_t S = cfg_.page_size, sealed = (st.start + st.length[static_cast<std::size_t>(h)]) / S;
    return std::max<std::int64_t>(0, sealed * S - st.start);
  }

  // Quantizes head h's tail rows of block-table entry q (full) into its page: rows from start on
  // in the sequence's first page, all rows in the others.
  void seal(seq_state& st, std::int64_t h, std::int64_t q) {
    const std::int64_t S = cfg_.page_size, D = cfg_.D, Dv = cfg_.Dv, VG = cfg_.value_group, NG = groups();
    const std::int64_t p = st.pages[static_cast<std::size_t>(q)], r0 = std::max<std::int64_t>(0, st.start - q * S);
    const int bits = storage_bits(cfg_.kind);
    quant::reference::quantize_channels(&st.tail_k(h, r0, 0), D, S - r0, D, bits, &kcodes_(p, h, r0, 0),
                                        kcodes_.extent(3), &kscale_(p, h, 0), &kmin_(p, h, 0));
    float* sc = vgroup_.data();
    float* mn = sc + NG;
    for (std::int64_t r = r0; r < S; ++r) {
      quant::reference::quantize_token(&st.tail_v(h, r, 0), Dv, VG, bits, &vcodes_(p, h, r, 0), sc, mn);
      for (std::int64_t g = 0; g < NG; ++g) vscale_(p, h, g, r) = sc[g], vmin_(p, h, g, r) = mn[g];
    }
  }

  // Row r of head h of page p, dequantized: k [D], v [Dv].
  void read_sealed(std::int64_t p, std::int64_t h, std::int64_t r, float* k, float* v) const {
    const int bits = storage_bits(cfg_.kind);
    quant::reference::dequantize_channels(&kcodes_(p, h, r, 0), cfg_.D, bits, &kscale_(p, h, 0), &kmin_(p, h, 0), k);
    const std::uint8_t* codes = &vcodes_(p, h, r, 0);
    const std::int64_t VG = cfg_.value_group;
    for (std::int64_t c = 0; c < cfg_.Dv; ++c)
      v[c] = quant::decode_value(quant::get_code(codes, bits, c), vmin_(p, h, c / VG, r), vscale_(p, h, c / VG, r));
  }

  // Head h of st shrinks to `len` slots: if that cuts inside a sealed page, the kept rows of the
  // page go (dequantized) into the tail; the page itself is not written.
  void unseal(seq_state& st, std::int64_t h, std::int64_t len) {
    const std::int64_t S = cfg_.page_size, q = (st.start + len) / S;
    if (q >= (st.start + st.length[static_cast<std::size_t>(h)]) / S) return;  // that page was not sealed
    const std::int64_t p = st.pages[static_cast<std::size_t>(q)];
    for (std::int64_t r = std::max<std::int64_t>(0, st.start - q * S); r < st.start + len - q * S; ++r)
      read_sealed(p, h, r, &st.tail_k(h, r, 0), &st.tail_v(h, r, 0));
  }

  // Slot j of head h of st as f32: k [D], v [Dv].
  void read_slot(const seq_state& st, std::int64_t h, std::int64_t j, float* k, float* v) const {
    const std::int64_t p = page_of(st, j), r = row_of(st, j);
    switch (cfg_.kind) {
      case storage::f32: read_row(kf_, vf_, p, h, r, k, v); break;
      case storage::f16: read_row(kh_, vh_, p, h, r, k, v); break;
      case storage::bf16: read_row(kb_, vb_, p, h, r, k, v); break;
      default:
        if (j < sealed_length(st, h)) {
          read_sealed(p, h, r, k, v);
        } else {
          std::copy_n(&st.tail_k(h, r, 0), cfg_.D, k);
          std::copy_n(&st.tail_v(h, r, 0), cfg_.Dv, v);
        }
    }
  }

  // Appends one token (k [D], v [Dv], position) to head h of st, whose pages are in place and
  // not shared from the written one on; quantized kinds seal the page it fills.
  void put_slot(seq_state& st, std::int64_t h, const float* k, const float* v, std::int64_t position) {
    std::int64_t& len = st.length[static_cast<std::size_t>(h)];
    const std::int64_t p = page_of(st, len), r = row_of(st, len);
    switch (cfg_.kind) {
      case storage::f32: put(&kf_(p, h, r, 0), k, cfg_.D), put(&vf_(p, h, r, 0), v, cfg_.Dv); break;
      case storage::f16: put(&kh_(p, h, r, 0), k, cfg_.D), put(&vh_(p, h, r, 0), v, cfg_.Dv); break;
      case storage::bf16: put(&kb_(p, h, r, 0), k, cfg_.D), put(&vb_(p, h, r, 0), v, cfg_.Dv); break;
      default: std::copy_n(k, cfg_.D, &st.tail_k(h, r, 0)), std::copy_n(v, cfg_.Dv, &st.tail_v(h, r, 0));
    }
    pos_(p, h, r) = position;
    ++len;
    const std::int64_t end = st.start + len;
    if (is_quantized(cfg_.kind) && end % cfg_.page_size == 0) seal(st, h, end / cfg_.page_size - 1);
  }

  // Quantized compaction of head h (the pages from its first moved slot's page on are st's own): the
  // slots before that page stay as they are; the kept tokens from there on are read as f32 and
  // appended again (sealing the pages they fill).
  void compact_quantized(seq_state& st, std::int64_t h, const std::vector<std::int64_t>& keep) {
    const std::int64_t S = cfg_.page_size, D = cfg_.D, Dv = cfg_.Dv, m = static_cast<std::int64_t>(keep.size());
    const std::int64_t moved = first_moved(keep), j0 = std::max<std::int64_t>(0, (st.start + moved) / S * S - st.start);
    std::vector<float> k(static_cast<std::size_t>((m - j0) * D)), v(static_cast<std::size_t>((m - j0) * Dv));
    std::vector<std::int64_t> position(static_cast<std::size_t>(m - j0));
    for (std::int64_t i = j0; i < m; ++i) {
      const std::int64_t from = keep[static_cast<std::size_t>(i)];
      const auto o = static_cast<std::size_t>(i - j0);
      read_slot(st, h, from, k.data() + o * D, v.data() + o * Dv);
      position[o] = pos_(page_of(st, from), h, row_of(st, from));
    }
    st.length[static_cast<std::size_t>(h)] = j0;
    for (std::int64_t i = j0; i < m; ++i) {
      const auto o = static_cast<std::size_t>(i - j0);
      if (i < moved) {  // not moved: its position is in place, and it never fills its page (slot `moved`, or
                        // the head's end, is in the same page), so only the tail is written (the page may be shared)
        const std::int64_t r = row_of(st, i);
        std::copy_n(k.data() + o * D, D, &st.tail_k(h, r, 0)), std::copy_n(v.data() + o * Dv, Dv, &st.tail_v(h, r, 0));
        ++st.length[static_cast<std::size_t>(h)];
      } else {
        put_slot(st, h, k.data() + o * D, v.data() + o * Dv, position[o]);
      }
    }
  }

  void copy_row(std::int64_t pf, std::int64_t hf, std::int64_t rf, std::int64_t pt, std::int64_t ht, std::int64_t rt) {
    auto copy = [&](auto& k, auto& v) {
      std::copy_n(&k(pf, hf, rf, 0), cfg_.D, &k(pt, ht, rt, 0));
      std::copy_n(&v(pf, hf, rf, 0), cfg_.Dv, &v(pt, ht, rt, 0));
    };
    switch (cfg_.kind) {
      case storage::f32: copy(kf_, vf_); break;
      case storage::f16: copy(kh_, vh_); break;
      default: copy(kb_, vb_); break;
    }
  }
  template <class T>
  void read_row(const tensor<T, 4>& k, const tensor<T, 4>& v, std::int64_t p, std::int64_t h, std::int64_t r, float* ko,
                float* vo) const {
    get_row(&k(p, h, r, 0), ko, cfg_.D);
    get_row(&v(p, h, r, 0), vo, cfg_.Dv);
  }

  paged_config cfg_;
  tensor<float, 4> kf_, vf_;
  tensor<f16, 4> kh_, vh_;
  tensor<bf16, 4> kb_, vb_;
  tensor<std::uint8_t, 4> kcodes_, vcodes_;  // int8 / int4: [num_pages, Hkv, page_size, row bytes of D / Dv]
  tensor<float, 3> kscale_, kmin_;           // [num_pages, Hkv, D]
  tensor<float, 4> vscale_, vmin_;           // [num_pages, Hkv, value_groups, page_size]
  tensor<std::int64_t, 3> pos_;              // [num_pages, Hkv, page_size] original positions
  std::vector<std::int32_t> refs_;           // [num_pages]
  std::vector<std::int32_t> free_;           // free page ids (a stack)
  std::vector<float> vgroup_;                // int8 / int4: [2, value_groups] one token's value scales, minimums
  std::vector<seq_state> seqs_;
};

}  // namespace mnemo::kvcache
