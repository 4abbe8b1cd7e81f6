// tests/kvcache/paged_test.cpp — kvcache/paged.hpp: the paged cache against a plain model (per
// sequence and kv head, the list of its tokens' rows and positions), under random operations,
// plus the page accounting of fork / copy on write / truncate / release and the errors.
// Quantized pages (int8 / int4) against the same model with KIVI's rounding applied through
// quant.hpp's reference functions: a head's rows of a page are quantized and read back (keys per
// channel over the page's rows, values per token) when the page fills; rows of a partly filled
// page stay exact. Every slot is read through gather() and through the public page / tail views.
#include "mnemo/kvcache/paged.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace mnemo;
using kvcache::paged_cache;
using kvcache::paged_config;
using kvcache::storage;

// What a sequence must read back: per kv head, rows of K and V (already rounded to the storage
// type, or quantized and read back once their page is sealed) and positions.
struct model_seq {
  std::vector<std::vector<std::vector<float>>> k, v;  // [Hkv][slot][D]
  std::vector<std::vector<std::int64_t>> pos;         // [Hkv][slot]
  std::int64_t next = 0;
  std::int64_t start = 0;  // rows of the first page before slot 0 (keep_last)
};

float round_to(storage kind, float x) {
  if (kind == storage::f16) return static_cast<float>(f16(x));
  if (kind == storage::bf16) return static_cast<float>(bf16(x));
  return x;
}

using rows_t = std::vector<std::vector<float>>;

// KIVI on a page's rows (the model's rows of one head in one page): keys quantized per channel over
// the rows, values per token in groups of `group` channels, both read back in place.
void kivi_round_trip(rows_t& k, rows_t& v, int bits, std::int64_t group) {
  namespace ref = kvcache::quant::reference;
  const auto n = static_cast<std::int64_t>(k.size()), D = static_cast<std::int64_t>(k[0].size());
  const auto Dv = static_cast<std::int64_t>(v[0].size()), NG = (Dv + group - 1) / group;
  std::vector<float> rows, scale(static_cast<std::size_t>(D)), min(static_cast<std::size_t>(D));
  for (const auto& r : k) rows.insert(rows.end(), r.begin(), r.end());
  const std::int64_t kb = kvcache::quant::row_bytes(bits, D), vb = kvcache::quant::row_bytes(bits, Dv);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(n * kb));
  ref::quantize_channels(rows.data(), D, n, D, bits, codes.data(), kb, scale.data(), min.data());
  for (std::int64_t t = 0; t < n; ++t)
    ref::dequantize_channels(codes.data() + t * kb, D, bits, scale.data(), min.data(),
                             k[static_cast<std::size_t>(t)].data());
  std::vector<std::uint8_t> vcodes(static_cast<std::size_t>(vb));
  std::vector<float> vscale(static_cast<std::size_t>(NG)), vmin(static_cast<std::size_t>(NG));
  for (auto& r : v) {
    ref::quantize_token(r.data(), Dv, group, bits, vcodes.data(), vscale.data(), vmin.data());
    ref::dequantize_token(vcodes.data(), Dv, group, bits, vscale.data(), vmin.data(), r.data());
  }
}

struct harness {
  paged_config cfg;
  paged_cache cache;
  std::map<paged_cache::sequence, model_seq> model;
  std::mt19937_64 gen;

  explicit harness(paged_config c, std::uint64_t seed = 1) : cfg(c), cache(c), gen(seed) {
    if (cfg.Dv == 0) cfg.Dv = cfg.D;
  }

  bool quantized() const { return kvcache::is_quantized(cfg.kind); }
  std::int64_t S() const { return cfg.page_size; }

  paged_cache::sequence create() {
    const auto s = cache.create();
    model_seq m;
    m.k.resize(static_cast<std::size_t>(cfg.Hkv));
    m.v.resize(static_cast<std::size_t>(cfg.Hkv));
    m.pos.resize(static_cast<std::size_t>(cfg.Hkv));
    model[s] = m;
    return s;
  }
  paged_cache::sequence fork(paged_cache::sequence s) {
    const auto c = cache.fork(s);
    model[c] = model.at(s);
    return c;
  }
  void release(paged_cache::sequence s) {
    cache.release(s);
    model.erase(s);
  }

  // Quantized kinds: block-table entries [from, to) of head h are full: quantize and read back their rows.
  void seal(model_seq& m, std::size_t h, std::int64_t from, std::int64_t to) {
    for (std::int64_t q = from; q < to; ++q) {
      const std::int64_t j0 = std::max<std::int64_t>(0, q * S() - m.start), j1 = (q + 1) * S() - m.start;
      rows_t k(m.k[h].begin() + j0, m.k[h].begin() + j1), v(m.v[h].begin() + j0, m.v[h].begin() + j1);
      kivi_round_trip(k, v, kvcache::storage_bits(cfg.kind), cfg.value_group);
      std::copy(k.begin(), k.end(), m.k[h].begin() + j0);
      std::copy(v.begin(), v.end(), m.v[h].begin() + j0);
    }
  }
  std::int64_t sealed_pages(const model_seq& m, std::size_t h) const {
    return (m.start + static_cast<std::int64_t>(m.k[h].size())) / S();
  }

  void append(paged_cache::sequence s, std::int64_t n) {
    tensor<float, 3> k({cfg.Hkv, n, cfg.D}), v({cfg.Hkv, n, cfg.Dv});
    std::normal_distribution<float> dist;
    for (std::int64_t i = 0; i < k.size(); ++i) k.data()[i] = dist(gen);
    for (std::int64_t i = 0; i < v.size(); ++i) v.data()[i] = dist(gen);
    cache.append(s, cview(k), cview(v));
    model_seq& m = model.at(s);
    for (std::int64_t h = 0; h < cfg.Hkv; ++h) {
      const auto hi = static_cast<std::size_t>(h);
      const std::int64_t sealed = sealed_pages(m, hi);
      for (std::int64_t t = 0; t < n; ++t) {
        std::vector<float> kr(static_cast<std::size_t>(cfg.D)), vr(static_cast<std::size_t>(cfg.Dv));
        for (std::int64_t c = 0; c < cfg.D; ++c) kr[static_cast<std::size_t>(c)] = round_to(cfg.kind, k(h, t, c));
        for (std::int64_t c = 0; c < cfg.Dv; ++c) vr[static_cast<std::size_t>(c)] = round_to(cfg.kind, v(h, t, c));
        m.k[hi].push_back(kr);
        m.v[hi].push_back(vr);
        m.pos[hi].push_back(m.next + t);
      }
      if (quantized()) seal(m, hi, sealed, sealed_pages(m, hi));
    }
    m.next += n;
  }

  void truncate(paged_cache::sequence s, std::int64_t n) {
    cache.truncate(s, n);
    model_seq& m = model.at(s);
    for (std::size_t h = 0; h < m.k.size(); ++h) {
      const auto keep = m.k[h].size() - static_cast<std::size_t>(n);
      m.k[h].resize(keep), m.v[h].resize(keep), m.pos[h].resize(keep);
    }
    m.next -= n;
  }

  void keep_last(paged_cache::sequence s, std::int64_t window) {
    cache.keep_last(s, window);
    model_seq& m = model.at(s);
    if (static_cast<std::int64_t>(m.k[0].size()) <= window) return;
    const auto drop = static_cast<std::ptrdiff_t>(static_cast<std::int64_t>(m.k[0].size()) - window);
    for (std::size_t h = 0; h < m.k.size(); ++h) {
      m.k[h].erase(m.k[h].begin(), m.k[h].begin() + drop);
      m.v[h].erase(m.v[h].begin(), m.v[h].begin() + drop);
      m.pos[h].erase(m.pos[h].begin(), m.pos[h].begin() + drop);
    }
    m.start = (m.start + drop) % S();
  }

  // Quantized kinds: pages before a head's first moved slot stay; from that page on the kept rows
  // (as they read back) are quantized again where their page is full.
  void compact(paged_cache::sequence s, const kvcache::selection& sel) {
    cache.compact(s, sel);
    model_seq& m = model.at(s);
    for (std::size_t h = 0; h < m.k.size(); ++h) {
      const auto& keep = sel.heads[h];
      std::int64_t moved = 0;
      while (moved < static_cast<std::int64_t>(keep.size()) && keep[static_cast<std::size_t>(moved)] == moved) ++moved;
      model_seq old = m;
      m.k[h].clear(), m.v[h].clear(), m.pos[h].clear();
      for (std::int64_t j : keep) {
        m.k[h].push_back(old.k[h][static_cast<std::size_t>(j)]);
        m.v[h].push_back(old.v[h][static_cast<std::size_t>(j)]);
        m.pos[h].push_back(old.pos[h][static_cast<std::size_t>(j)]);
      }
      if (quantized()) seal(m, h, (m.start + moved) / S(), sealed_pages(m, h));
    }
  }

  // Slot j of head h through the public page and tail views of a quantized cache.
  void read_views(paged_cache::sequence s, std::int64_t h, std::int64_t j, std::vector<float>& k,
                  std::vector<float>& v) const {
    using kvcache::quant::decode_value, kvcache::quant::get_code;
    const std::int64_t start = cache.start(s), p = cache.block_table(s)[static_cast<std::size_t>((start + j) / S())];
    const std::int64_t r = (start + j) % S();
    const int bits = kvcache::storage_bits(cfg.kind);
    k.resize(static_cast<std::size_t>(cfg.D)), v.resize(static_cast<std::size_t>(cfg.Dv));
    const bool sealed = j < cache.quantized_length(s, h);
    const auto kc = cache.key_codes(), vc = cache.value_codes();
    const auto ks = cache.key_scales(), km = cache.key_mins();
    const auto vs = cache.value_scales(), vm = cache.value_mins();
    const auto tk = cache.tail_keys(s), tv = cache.tail_values(s);
    for (std::int64_t c = 0; c < cfg.D; ++c)
      k[static_cast<std::size_t>(c)] =
          sealed ? decode_value(get_code(kc.ptr(p, h, r), bits, c), km(p, h, c), ks(p, h, c)) : tk(h, r, c);
    for (std::int64_t c = 0; c < cfg.Dv; ++c) {
      const std::int64_t g = c / cfg.value_group;
      v[static_cast<std::size_t>(c)] =
          sealed ? decode_value(get_code(vc.ptr(p, h, r), bits, c), vm(p, h, g, r), vs(p, h, g, r)) : tv(h, r, c);
    }
  }

  // Every live sequence reads back its model, and the pages add up.
  void check() {
    std::vector<std::int64_t> refs(static_cast<std::size_t>(cfg.num_pages), 0);
    for (auto& [s, m] : model) {
      SCOPED_TRACE("sequence " + std::to_string(s));
      ASSERT_EQ(cache.next_position(s), m.next);
      ASSERT_EQ(cache.start(s), m.start);
      std::int64_t longest = 0;
      for (std::int64_t h = 0; h < cfg.Hkv; ++h) {
        const auto hi = static_cast<std::size_t>(h);
        const auto n = static_cast<std::int64_t>(m.k[hi].size());
        longest = std::max(longest, n);
        ASSERT_EQ(cache.length(s, h), n);
        if (quantized()) {
          ASSERT_EQ(cache.quantized_length(s, h), std::max<std::int64_t>(0, sealed_pages(m, hi) * S() - m.start));
        }
        std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
        std::iota(slots.begin(), slots.end(), 0);
        tensor<float, 2> k({n, cfg.D}), v({n, cfg.Dv});
        cache.gather(s, h, slots, k, v);
        std::vector<float> kr, vr;
        for (std::int64_t j = 0; j < n; ++j) {
          const auto ji = static_cast<std::size_t>(j);
          ASSERT_EQ(cache.position(s, h, j), m.pos[hi][ji]);
          if (quantized()) read_views(s, h, j, kr, vr);
          for (std::int64_t c = 0; c < cfg.D; ++c) {
            ASSERT_EQ(k(j, c), m.k[hi][ji][static_cast<std::size_t>(c)]) << "head " << h << " slot " << j;
            if (quantized()) {
              ASSERT_EQ(kr[static_cast<std::size_t>(c)], k(j, c)) << "views, head " << h << " slot " << j;
            }
          }
          for (std::int64_t c = 0; c < cfg.Dv; ++c) {
            ASSERT_EQ(v(j, c), m.v[hi][ji][static_cast<std::size_t>(c)]) << "head " << h << " slot " << j;
            if (quantized()) {
              ASSERT_EQ(vr[static_cast<std::size_t>(c)], v(j, c)) << "views, head " << h << " slot " << j;
            }
          }
        }
      }
      const auto table = cache.block_table(s);
      ASSERT_EQ(static_cast<std::int64_t>(table.size()), (cache.start(s) + longest + cfg.page_size - 1) / cfg.page_size);
      for (std::int32_t p : table) ++refs[static_cast<std::size_t>(p)];
    }
    std::int64_t used = 0;
    for (std::int64_t p = 0; p < cfg.num_pages; ++p) {
      ASSERT_EQ(cache.references(p), refs[static_cast<std::size_t>(p)]) << "page " << p;
      used += refs[static_cast<std::size_t>(p)] > 0;
    }
    ASSERT_EQ(cache.free_pages() + used, cfg.num_pages);
  }
};

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    FAIL() << "expected mnemo::error mentioning '" << needle << "'";
  } catch (const mnemo::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(PagedCache, AppendAcrossPagesReadsBackEveryKind) {
  for (storage kind : {storage::f32, storage::f16, storage::bf16}) {
    SCOPED_TRACE(kvcache::storage_name(kind));
    harness t({kind, 3, 40, 24, 16, 20});
    const auto a = t.create(), b = t.create();
    t.append(a, 1);
    t.append(b, 37);
    t.append(a, 16);
    t.append(a, 15);  // a: 32 slots = exactly 2 pages
    t.append(b, 1);
    t.check();
    EXPECT_EQ(t.cache.block_table(a).size(), 2u);
    EXPECT_EQ(t.cache.block_table(b).size(), 3u);
  }
}

TEST(PagedCache, ForkSharesPagesAndCopiesOnWrite) {
  harness t({storage::f32, 2, 8, 8, 16, 10});
  const auto a = t.create();
  t.append(a, 40);  // pages: 16 + 16 + 8
  const std::int64_t free_before = t.cache.free_pages();
  const auto b = t.fork(a);
  EXPECT_EQ(t.cache.free_pages(), free_before);  // no copy
  for (std::int32_t p : t.cache.block_table(a)) EXPECT_EQ(t.cache.references(p), 2);
  t.check();
  t.append(b, 3);  // writes into the shared, partly filled third page: b gets its own copy
  EXPECT_EQ(t.cache.free_pages(), free_before - 1);
  EXPECT_EQ(t.cache.block_table(a)[0], t.cache.block_table(b)[0]);  // full pages stay shared
  EXPECT_EQ(t.cache.block_table(a)[1], t.cache.block_table(b)[1]);
  EXPECT_NE(t.cache.block_table(a)[2], t.cache.block_table(b)[2]);
  t.append(a, 5);  // a's third page is its own again: written in place
  EXPECT_EQ(t.cache.free_pages(), free_before - 1);
  t.check();
  t.release(a);
  t.check();  // b still reads the shared prefix
}

TEST(PagedCache, TruncateRollsBackAndFreesPages) {
  harness t({storage::f16, 2, 8, 8, 16, 8});
  const auto a = t.create();
  t.append(a, 33);   // 3 pages
  t.truncate(a, 4);  // speculative tokens rejected
  t.check();
  EXPECT_EQ(t.cache.block_table(a).size(), 2u);
  t.append(a, 2);  // continues at position 29
  t.check();
  EXPECT_EQ(t.cache.position(a, 1, 29), 29);
}

TEST(PagedCache, CompactKeepsRaggedSelectionsAndPositions) {
  harness t({storage::bf16, 2, 8, 8, 16, 12});
  const auto a = t.create();
  t.append(a, 50);
  t.fork(a);  // compaction of a must not change its fork
  kvcache::selection sel;
  sel.heads = {{0, 1, 2, 3, 17, 30, 49}, {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 33}};
  t.compact(a, sel);
  t.check();
  EXPECT_EQ(t.cache.block_table(a).size(), 2u);  // the longest head keeps 18 slots
  t.append(a, 3);                                // ragged heads append at their own ends
  t.check();
}

// Random create / fork / append / truncate / release / compact / keep_last against the model, in
// a dense and both quantized kinds (page sizes 16, 32, 48; quantized: D != Dv, an odd D).
TEST(PagedCache, RandomOperationsMatchTheModel) {
  const paged_config configs[] = {{storage::f32, 2, 12, 4, 16, 40},
                                  {storage::f32, 2, 12, 4, 32, 40},
                                  {.kind = storage::int8, .Hkv = 2, .D = 40, .Dv = 24, .page_size = 16, .num_pages = 40,
                                   .value_group = 16},
                                  {.kind = storage::int4, .Hkv = 2, .D = 40, .Dv = 24, .page_size = 48, .num_pages = 40,
                                   .value_group = 16}};
  for (const paged_config& cfg : configs) {
    SCOPED_TRACE(std::string(kvcache::storage_name(cfg.kind)) + ", page_size " + std::to_string(cfg.page_size));
    const std::int64_t page_size = cfg.page_size;
    const int steps = kvcache::is_quantized(cfg.kind) ? 150 : 300;
    harness t(cfg, 7 + static_cast<std::uint64_t>(page_size));
    std::uniform_int_distribution<int> op(0, 6);
    std::vector<paged_cache::sequence> live{t.create()};
    for (int step = 0; step < steps; ++step) {
      const auto s = live[static_cast<std::size_t>(t.gen() % live.size())];
      const std::int64_t need_pages = t.cache.free_pages();
      switch (op(t.gen)) {
        case 0:
        case 1: {
          const std::int64_t n = 1 + static_cast<std::int64_t>(t.gen() % 20);
          if ((t.cache.max_length(s) + n) / page_size + 2 <= need_pages) t.append(s, n);
          break;
        }
        case 2:
          if (live.size() < 6) live.push_back(t.fork(s));
          break;
        case 3:
          t.truncate(s, std::min<std::int64_t>(t.cache.length(s, 0), static_cast<std::int64_t>(t.gen() % 5)));
          break;
        case 4:
          if (live.size() > 1) {
            t.release(s);
            live.erase(std::find(live.begin(), live.end(), s));
          }
          break;
        case 5:
          if (t.cache.length(s, 0) == t.cache.length(s, 1))
            t.keep_last(s, 1 + static_cast<std::int64_t>(t.gen() % (2 * static_cast<std::uint64_t>(page_size))));
          break;
        default: {  // keep every other slot of head 0, everything of head 1
          kvcache::selection sel;
          sel.heads.resize(2);
          for (std::int64_t j = 0; j < t.cache.length(s, 0); j += 2) sel.heads[0].push_back(j);
          for (std::int64_t j = 0; j < t.cache.length(s, 1); ++j) sel.heads[1].push_back(j);
          if (t.cache.free_pages() < static_cast<std::int64_t>(t.cache.block_table(s).size())) break;
          t.compact(s, sel);
        }
      }
      ASSERT_NO_FATAL_FAILURE(t.check()) << "step " << step;
    }
  }
}

// A sliding-window layer keeps a ring of pages: memory bounded by the window, whatever the length.
TEST(PagedCache, KeepLastHoldsOnlyTheWindow) {
  constexpr std::int64_t window = 100, page = 16;
  harness t({storage::f32, 2, 8, 8, page, 12});
  const auto a = t.create();
  std::int64_t most_pages = 0;
  for (int step = 0; step < 400; ++step) {  // 400 steps of 1..7 tokens: ~1600 tokens through 12 pages
    t.append(a, 1 + step % 7);
    t.keep_last(a, window);
    most_pages = std::max(most_pages, t.cache.num_pages() - t.cache.free_pages());
    if (step % 37 == 0) {
      ASSERT_NO_FATAL_FAILURE(t.check());
    }
  }
  t.check();
  EXPECT_GT(t.cache.next_position(a), 1500);
  EXPECT_LE(most_pages, (window + page - 1) / page + 1);  // 8 pages for a 100-token window
  // A fork of a windowed sequence shares its ring and slides on its own.
  const auto b = t.fork(a);
  t.append(b, 20);
  t.keep_last(b, window);
  t.check();
}

// ---- quantized pages -------------------------------------------------------------------------

// int8 and int4 at D != Dv with an odd D and value groups smaller than Dv (page size 16), and at
// D = Dv with one value group (value_group 128 >= Dv, page size 48).
std::vector<paged_config> quantized_configs(std::int64_t num_pages) {
  std::vector<paged_config> out;
  for (storage kind : {storage::int8, storage::int4}) {
    out.push_back(
        {.kind = kind, .Hkv = 2, .D = 40, .Dv = 24, .page_size = 16, .num_pages = num_pages, .value_group = 16});
    out.push_back({.kind = kind, .Hkv = 2, .D = 64, .Dv = 64, .page_size = 48, .num_pages = num_pages});
  }
  return out;
}

std::string describe(const paged_config& c) {
  return std::string(kvcache::storage_name(c.kind)) + " D " + std::to_string(c.D) + " Dv " + std::to_string(c.Dv) +
         " page_size " + std::to_string(c.page_size);
}

TEST(PagedCacheQuantized, AppendAcrossPagesSealsFullPages) {
  for (const paged_config& cfg : quantized_configs(12)) {
    SCOPED_TRACE(describe(cfg));
    harness t(cfg);
    const std::int64_t S = cfg.page_size;
    const auto a = t.create(), b = t.create();
    t.append(a, 1);
    t.append(b, 2 * S + 5);
    EXPECT_EQ(t.cache.quantized_length(a, 0), 0);  // one row: all in the tail
    EXPECT_EQ(t.cache.quantized_length(b, 1), 2 * S);
    t.append(a, S);
    t.append(a, S - 1);  // exactly 2 pages: both sealed, the tail empty
    t.append(b, 1);
    t.check();
    EXPECT_EQ(t.cache.quantized_length(a, 1), 2 * S);
    EXPECT_EQ(t.cache.block_table(a).size(), 2u);
    EXPECT_EQ(t.cache.value_groups(), (cfg.Dv + cfg.value_group - 1) / cfg.value_group);
    EXPECT_EQ(t.cache.key_codes().extent(3), kvcache::quant::row_bytes(kvcache::storage_bits(cfg.kind), cfg.D));
    EXPECT_EQ(t.cache.value_scales().extent(2), t.cache.value_groups());
    EXPECT_EQ(t.cache.tail_keys(a).extent(1), S);
  }
}

// Copy on write of quantized pages: an append into, or a seal of, a shared page copies the whole
// page; a truncation into a shared sealed page writes only the tail.
TEST(PagedCacheQuantized, ForkCopiesOnWriteAndLeavesTheParent) {
  for (const paged_config& cfg : quantized_configs(10)) {
    SCOPED_TRACE(describe(cfg));
    harness t(cfg);
    const std::int64_t S = cfg.page_size;
    const auto a = t.create();
    t.append(a, 2 * S + S / 2);  // two sealed pages, a half-filled third
    const std::int64_t free_before = t.cache.free_pages();
    const auto b = t.fork(a);
    EXPECT_EQ(t.cache.free_pages(), free_before);
    for (std::int32_t p : t.cache.block_table(a)) EXPECT_EQ(t.cache.references(p), 2);
    t.check();               // b reads a's tail (a copy)
    t.append(b, 3);          // into the shared third page: copied
    t.append(b, S / 2 - 3);  // b's copy fills and is sealed
    t.append(a, 1);          // a's third page is its own again
    EXPECT_EQ(t.cache.free_pages(), free_before - 1);
    EXPECT_EQ(t.cache.block_table(a)[1], t.cache.block_table(b)[1]);
    EXPECT_NE(t.cache.block_table(a)[2], t.cache.block_table(b)[2]);
    t.check();
    t.truncate(b, S + 4);  // into the shared sealed second page: no copy, b's third page returns
    EXPECT_EQ(t.cache.free_pages(), free_before);
    EXPECT_EQ(t.cache.references(t.cache.block_table(a)[1]), 2);
    EXPECT_EQ(t.cache.quantized_length(b, 0), S);
    t.check();
    t.append(b, 6);  // seals the second page: b's own copy first, a keeps its codes
    EXPECT_NE(t.cache.block_table(a)[1], t.cache.block_table(b)[1]);
    EXPECT_EQ(t.cache.references(t.cache.block_table(a)[0]), 2);
    EXPECT_EQ(t.cache.references(t.cache.block_table(a)[1]), 1);
    t.check();
    t.release(a);
    t.check();
    t.release(b);
    EXPECT_EQ(t.cache.free_pages(), cfg.num_pages);  // every page back in the pool
  }
}

TEST(PagedCacheQuantized, TruncateIntoASealedPageKeepsItsReadBack) {
  for (const paged_config& cfg : quantized_configs(6)) {
    SCOPED_TRACE(describe(cfg));
    harness t(cfg);
    const std::int64_t S = cfg.page_size;
    const auto a = t.create();
    t.append(a, 2 * S + 3);
    t.truncate(a, 8);  // 2 S - 5 slots: the second page's kept rows move (dequantized) to the tail
    EXPECT_EQ(t.cache.quantized_length(a, 0), S);
    EXPECT_EQ(t.cache.block_table(a).size(), 2u);
    t.check();
    t.append(a, 7);  // the second page fills again: quantized with its new rows
    t.check();
    EXPECT_EQ(t.cache.quantized_length(a, 1), 2 * S);
  }
}

// keep_last drops whole pages; the first page stays sealed over rows that are no slots any more.
// After a truncation below the first page's end (start > 0, no sealed page) the tail holds rows
// start .. start + length - 1, and the page seals over its rows from start on.
TEST(PagedCacheQuantized, KeepLastThenTruncate) {
  for (const paged_config& cfg : quantized_configs(8)) {
    SCOPED_TRACE(describe(cfg));
    harness t(cfg);
    const std::int64_t S = cfg.page_size, window = S + S / 4;
    const auto a = t.create();
    for (int step = 0; step < 12; ++step) {
      t.append(a, 1 + (step * 5) % 11);
      t.keep_last(a, window);
    }
    t.check();
    t.append(a, S - (t.cache.start(a) + window) % S);  // the tail's page fills
    t.keep_last(a, window);
    ASSERT_GT(t.cache.start(a), 0);
    t.truncate(a, window - (S - t.cache.start(a)) / 2);  // into the first page: nothing sealed
    EXPECT_EQ(t.cache.quantized_length(a, 0), 0);
    t.check();
    t.append(a, S);  // seals the first page from start on
    EXPECT_GT(t.cache.quantized_length(a, 0), 0);
    t.check();
  }
}

// Ragged compaction: a head's pages before its first moved slot stay, the rest are rebuilt.
TEST(PagedCacheQuantized, CompactRaggedHeadsRequantizes) {
  for (const paged_config& cfg : quantized_configs(12)) {
    SCOPED_TRACE(describe(cfg));
    harness t(cfg);
    const std::int64_t S = cfg.page_size;
    const auto a = t.create();
    t.append(a, 3 * S + 2);
    const auto b = t.fork(a);  // compaction of a must not change b
    kvcache::selection sel;
    sel.heads.resize(2);
    for (std::int64_t j = 0; j < 3 * S + 2; ++j) {
      if (j < S + 3 || j % 3 == 0) sel.heads[0].push_back(j);  // the first page stays, the rest thins out
      if (j < S || j % 2 == 1) sel.heads[1].push_back(j);      // the first page stays, then odd slots
    }
    const std::int64_t free_before = t.cache.free_pages();
    t.compact(a, sel);  // pages 1 .. 3 are written: copied; page 3 then falls off the end (2 S + 1 slots)
    EXPECT_EQ(t.cache.block_table(a)[0], t.cache.block_table(b)[0]);
    EXPECT_NE(t.cache.block_table(a)[1], t.cache.block_table(b)[1]);
    EXPECT_EQ(t.cache.free_pages(), free_before - 2);
    EXPECT_EQ(t.cache.length(a, 1), 2 * S + 1);
    t.check();
    t.append(a, S);  // the heads seal at their own page ends
    t.check();
    sel.heads = {{}, {}};  // keep only a prefix of each head: a cut into a sealed page, nothing moves
    for (std::int64_t j = 0; j < S + 2; ++j) sel.heads[0].push_back(j);
    for (std::int64_t j = 0; j < t.cache.length(a, 1) - 1; ++j) sel.heads[1].push_back(j);
    t.compact(a, sel);
    t.check();
    t.release(b);
    t.check();
  }
}

TEST(PagedCacheQuantized, Errors) {
  const paged_config ok = quantized_configs(4)[0];
  paged_config c = ok;
  c.value_group = 20;  // not a multiple of 16, < Dv = 24
  expect_error([&] { paged_cache p(c); }, "config.value_group must be a multiple of 16 or >= Dv (24), got 20");
  c.value_group = 0;
  expect_error([&] { paged_cache p(c); }, "config.value_group");
  c = ok;
  c.kind = static_cast<storage>(9);
  expect_error([&] { paged_cache p(c); }, "config.kind");
  c = ok;
  c.kind = storage::f32;
  c.value_group = 20;  // ignored by the dense kinds
  paged_cache dense(c);
  const auto s = dense.create();
  expect_error([&] { dense.value_groups(); }, "kvcache::paged_cache::value_groups: the cache stores f32");
  expect_error([&] { dense.quantized_length(s, 0); }, "kvcache::paged_cache::quantized_length");
  expect_error([&] { dense.key_codes(); }, "kvcache::paged_cache::key_codes");
  expect_error([&] { dense.key_scales(); }, "kvcache::paged_cache::key_scales");
  expect_error([&] { dense.key_mins(); }, "kvcache::paged_cache::key_mins");
  expect_error([&] { dense.value_codes(); }, "kvcache::paged_cache::value_codes");
  expect_error([&] { dense.value_scales(); }, "kvcache::paged_cache::value_scales");
  expect_error([&] { dense.value_mins(); }, "kvcache::paged_cache::value_mins");
  expect_error([&] { dense.tail_keys(s); }, "kvcache::paged_cache::tail_keys");
  expect_error([&] { dense.tail_values(s); }, "kvcache::paged_cache::tail_values");

  harness t(ok);
  const auto a = t.create();
  t.append(a, 3);
  expect_error([&] { t.cache.keys<float>(); }, "the cache stores int8, not f32");
  tensor<float, 3> k({2, 1, ok.D}), v({2, 1, ok.Dv});
  k(1, 0, 5) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { t.cache.append(a, cview(k), cview(v)); }, "k must be finite");
  expect_error([&] { t.cache.quantized_length(a, 2); }, "kv head");
  t.check();  // nothing changed
}

TEST(PagedCache, ErrorsNameTheArgumentAndChangeNothing) {
    expect_error([] { paged_cache c({storage::f32, 1, 8, 8, 8, 4}); }, "config.page_size");
  expect_error([] { paged_cache c({storage::f32, 1, 8, 8, 512, 4}); }, "config.page_size");
  expect_error([] { paged_cache c({storage::f32, 0, 8, 8, 16, 4}); }, "config.Hkv");
  expect_error([] { paged_cache c({storage::f32, 1, 8, 8, 16, 0}); }, "config.num_pages");

  harness t({storage::f32, 2, 8, 8, 16, 2});
  const auto a = t.create();
  t.append(a, 20);
  expect_error([&] { t.cache.length(5, 0); }, "sequence 5");
  expect_error([&] { t.cache.length(a, 2); }, "kv head");
  tensor<float, 3> k({2, 20, 8}), v({2, 20, 8}), bad({3, 1, 8});
  expect_error([&] { t.cache.append(a, cview(bad), cview(v)); }, "k");
  expect_error([&] { t.cache.append(a, cview(k), cview(v)); }, "out of pages");  // 40 slots need 3 pages
  t.check();  // nothing changed
  expect_error([&] { t.cache.truncate(a, 21); }, "n must be in [0, 20]");
  kvcache::selection sel;
  sel.heads = {{3, 2}, {0}};
  expect_error([&] { t.cache.compact(a, sel); }, "ascending");
  sel.heads = {{0}};
  expect_error([&] { t.cache.compact(a, sel); }, "selection.heads.size()");
  t.check();
  t.cache.release(a);
  expect_error([&] { t.cache.append(a, cview(k), cview(v)); }, "does not exist");
  expect_error([&] { t.cache.references(2); }, "page");
  EXPECT_EQ(t.cache.free_pages(), 2);
}

}  // namespace
