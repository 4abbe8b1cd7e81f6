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
// page once more. A write into a page held by more than one sequence first copies it into a
// fresh page for the writer (append into a shared partly filled last page, compaction of a
// shared sequence); pages that are full stay shared for good. release() and truncate() drop
// references; a page with none returns to the free list.
//
// Storage kinds: f32, f16 and bf16 (elements rounded to nearest even on append, as in
// layer_cache). Quantized pages (KIVI int8 / int4 with per-page scales) are not here yet: the
// constructor rejects those kinds.
//
// Errors: every call validates its arguments (sequence ids, shapes, lengths, the pool's free
// pages) and throws mnemo::error naming the argument before it changes anything.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/selection.hpp"

namespace mnemo::kvcache {

struct paged_config {
  storage kind = storage::f32;
  std::int64_t Hkv = 1;
  std::int64_t D = 0;           // key head dim
  std::int64_t Dv = 0;          // value head dim; 0: D
  std::int64_t page_size = 16;  // slots per page, 16 .. 256
  std::int64_t num_pages = 0;   // pages in the pool
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
    require(!is_quantized(cfg_.kind), fn, ": config.kind must be f32, f16 or bf16 (quantized pages are not supported ",
            "yet), got ", storage_name(cfg_.kind));
    require(cfg_.Hkv >= 1, fn, ": config.Hkv must be >= 1, got ", cfg_.Hkv);
    require(cfg_.D >= 1 && cfg_.Dv >= 1, fn, ": config.D and config.Dv must be >= 1, got D=", cfg_.D, ", Dv=", cfg_.Dv);
    require(cfg_.page_size >= min_page_size && cfg_.page_size <= max_page_size, fn, ": config.page_size must be in [",
            min_page_size, ", ", max_page_size, "], got ", cfg_.page_size);
    require(cfg_.num_pages >= 1 && cfg_.num_pages <= (std::int64_t{1} << 31) - 1, fn,
            ": config.num_pages must be in [1, 2^31 - 1], got ", cfg_.num_pages);
    const std::int64_t P = cfg_.num_pages, H = cfg_.Hkv, S = cfg_.page_size;
    switch (cfg_.kind) {
      case storage::f32: kf_ = tensor<float, 4>({P, H, S, cfg_.D}), vf_ = tensor<float, 4>({P, H, S, cfg_.Dv}); break;
      case storage::f16: kh_ = tensor<f16, 4>({P, H, S, cfg_.D}), vh_ = tensor<f16, 4>({P, H, S, cfg_.Dv}); break;
      default: kb_ = tensor<bf16, 4>({P, H, S, cfg_.D}), vb_ = tensor<bf16, 4>({P, H, S, cfg_.Dv}); break;
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

  // The pool, for kernels: [num_pages, Hkv, page_size, D] / [..., Dv] of the cache's element type.
  template <class T>
  view<const T, 4> keys() const {
    return cview(store_of<T>(true));
  }
  template <class T>
  view<const T, 4> values() const {
    return cview(store_of<T>(false));
  }
  view<const std::int64_t, 3> positions() const { return cview(pos_); }

  // ---- sequences ----------------------------------------------------------------------------

  // A new, empty sequence.
  sequence create() {
    seq_state st;
    st.alive = true;
    st.length.assign(static_cast<std::size_t>(cfg_.Hkv), 0);
    return add(std::move(st));
  }

  // A new sequence with parent's tokens: it holds the parent's pages (no copy); the first write
  // into a page both hold copies that page for the writer.
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

  // Appends n tokens to every kv head of s at positions next_position(s) .. + n.
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
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) {
      std::int64_t& len = st.length[static_cast<std::size_t>(h)];
      for (std::int64_t t = 0; t < n; ++t, ++len) {
        const std::int64_t p = page_of(st, len), r = row_of(st, len);
        write_row(p, h, r, k.ptr(h, t), v.ptr(h, t));
        pos_(p, h, r) = st.next_position + t;
      }
    }
    st.next_position += n;
  }

  // Drops the last n tokens of every kv head of s (rejected speculative tokens); the next append
  // continues at the first dropped position. Pages nobody uses any more return to the pool.
  void truncate(sequence s, std::int64_t n) {
    constexpr const char* fn = "kvcache::paged_cache::truncate";
    seq_state& st = get(fn, s);
    const std::int64_t shortest = *std::min_element(st.length.begin(), st.length.end());
    detail::require(n >= 0 && n <= shortest, fn, ": n must be in [0, ", shortest,
                    "] (the shortest head of the sequence), got ", n);
    for (std::int64_t& len : st.length) len -= n;
    st.next_position -= n;
    shrink(st);
  }

  // A sliding-window layer keeps only its window: drops the oldest tokens of s so that at most
  // `window` remain in every kv head; whole pages that fall out of the window go back to the pool,
  // so the sequence holds at most ceil(window / page_size) + 1 pages however long it runs. The
  // kept slots renumber from 0 (keys keep their original positions; masks and ALiBi depend on
  // distances only). A step that attends with Lq queries needs window + Lq - 1 tokens (its first
  // query's window starts Lq - 1 tokens earlier): keep_last(s, window) suffices for decode steps.
  // Needs every head of s at the same length (no ragged compaction).
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
  void compact(sequence s, const selection& sel) {
    constexpr const char* fn = "kvcache::paged_cache::compact";
    seq_state& st = get(fn, s);
    validate(fn, sel, st.length);
    // Only pages that receive a moved slot are written; copy the shared ones among them.
    std::int64_t first = static_cast<std::int64_t>(st.pages.size());
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) {
      const auto& keep = sel.heads[static_cast<std::size_t>(h)];
      for (std::size_t i = 0; i < keep.size(); ++i)
        if (keep[i] != static_cast<std::int64_t>(i)) {
          first = std::min<std::int64_t>(first, (st.start + static_cast<std::int64_t>(i)) / cfg_.page_size);
          break;
        }
    }
    std::int64_t copies = 0;
    for (std::int64_t i = first; i < static_cast<std::int64_t>(st.pages.size()); ++i)
      if (refs_[static_cast<std::size_t>(st.pages[static_cast<std::size_t>(i)])] > 1) ++copies;
    detail::require(copies <= free_pages(), fn, ": the pool is out of pages: compaction copies ", copies,
                    " shared pages, ", free_pages(), " are free");
    unshare_from(st, first);
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) {
      const auto& keep = sel.heads[static_cast<std::size_t>(h)];
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

  // f32 copies of slots `slots` of head h of s: k_out [n, D], v_out [n, Dv].
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
      const std::int64_t p = page_of(st, j), r = row_of(st, j);
      switch (cfg_.kind) {
        case storage::f32: read_row(kf_, vf_, p, h, r, k_out.ptr(i), v_out.ptr(i)); break;
        case storage::f16: read_row(kh_, vh_, p, h, r, k_out.ptr(i), v_out.ptr(i)); break;
        default: read_row(kb_, vb_, p, h, r, k_out.ptr(i), v_out.ptr(i)); break;
      }
    }
  }

 private:
  struct seq_state {
    bool alive = false;
    std::vector<std::int32_t> pages;   // block table
    std::vector<std::int64_t> length;  // [Hkv]
    std::int64_t start = 0;            // rows of the first page before slot 0 (dropped by keep_last)
    std::int64_t next_position = 0;
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

  std::int32_t take_page() {
    const std::int32_t p = free_.back();
    free_.pop_back();
    refs_[static_cast<std::size_t>(p)] = 1;
    return p;
  }
  void unref(std::int32_t p) {
    if (--refs_[static_cast<std::size_t>(p)] == 0) free_.push_back(p);
  }

  // Copies every shared page of st's block table from entry `first` on into a page of its own.
  void unshare_from(seq_state& st, std::int64_t first) {
    for (std::size_t i = static_cast<std::size_t>(std::max<std::int64_t>(first, 0)); i < st.pages.size(); ++i) {
      const std::int32_t old = st.pages[i];
      if (refs_[static_cast<std::size_t>(old)] <= 1) continue;
      const std::int32_t fresh = take_page();
      for (std::int64_t h = 0; h < cfg_.Hkv; ++h)
        for (std::int64_t r = 0; r < cfg_.page_size; ++r) {
          copy_row(old, h, r, fresh, h, r);
          pos_(fresh, h, r) = pos_(old, h, r);
        }
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

  void write_row(std::int64_t p, std::int64_t h, std::int64_t r, const float* k, const float* v) {
    switch (cfg_.kind) {
      case storage::f32: put(&kf_(p, h, r, 0), k, cfg_.D), put(&vf_(p, h, r, 0), v, cfg_.Dv); break;
      case storage::f16: put(&kh_(p, h, r, 0), k, cfg_.D), put(&vh_(p, h, r, 0), v, cfg_.Dv); break;
      default: put(&kb_(p, h, r, 0), k, cfg_.D), put(&vb_(p, h, r, 0), v, cfg_.Dv); break;
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
  tensor<std::int64_t, 3> pos_;         // [num_pages, Hkv, page_size] original positions
  std::vector<std::int32_t> refs_;      // [num_pages]
  std::vector<std::int32_t> free_;      // free page ids (a stack)
  std::vector<seq_state> seqs_;
};

}  // namespace mnemo::kvcache
