// tests/kvcache/paged_test.cpp — kvcache/paged.hpp: the paged cache against a plain model (per
// sequence and kv head, the list of its tokens' rows and positions), under random operations,
// plus the page accounting of fork / copy on write / truncate / release and the errors.
#include "mnemo/kvcache/paged.hpp"

#include <gtest/gtest.h>

#include <cstdint>
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
// type) and positions.
struct model_seq {
  std::vector<std::vector<std::vector<float>>> k, v;  // [Hkv][slot][D]
  std::vector<std::vector<std::int64_t>> pos;         // [Hkv][slot]
  std::int64_t next = 0;
};

float round_to(storage kind, float x) {
  if (kind == storage::f16) return static_cast<float>(f16(x));
  if (kind == storage::bf16) return static_cast<float>(bf16(x));
  return x;
}

struct harness {
  paged_config cfg;
  paged_cache cache;
  std::map<paged_cache::sequence, model_seq> model;
  std::mt19937_64 gen;

  explicit harness(paged_config c, std::uint64_t seed = 1) : cfg(c), cache(c), gen(seed) {
    if (cfg.Dv == 0) cfg.Dv = cfg.D;
  }

  paged_cache::sequence create() {
    const auto s = cache.create();
    model_seq m;
    m.k.resize(static_cast<std::size_t>(cfg.Hkv));
    m.v.resize(static_cast<std::size_t>(cfg.Hkv));
    m.pos.resize(static_cast<std::size_t>(cfg.Hkv));
    model[s] = m;
    return s;
  }

  void append(paged_cache::sequence s, std::int64_t n) {
    tensor<float, 3> k({cfg.Hkv, n, cfg.D}), v({cfg.Hkv, n, cfg.Dv});
    std::normal_distribution<float> dist;
    for (std::int64_t i = 0; i < k.size(); ++i) k.data()[i] = dist(gen);
    for (std::int64_t i = 0; i < v.size(); ++i) v.data()[i] = dist(gen);
    cache.append(s, cview(k), cview(v));
    model_seq& m = model.at(s);
    for (std::int64_t h = 0; h < cfg.Hkv; ++h)
      for (std::int64_t t = 0; t < n; ++t) {
        std::vector<float> kr(static_cast<std::size_t>(cfg.D)), vr(static_cast<std::size_t>(cfg.Dv));
        for (std::int64_t c = 0; c < cfg.D; ++c) kr[static_cast<std::size_t>(c)] = round_to(cfg.kind, k(h, t, c));
        for (std::int64_t c = 0; c < cfg.Dv; ++c) vr[static_cast<std::size_t>(c)] = round_to(cfg.kind, v(h, t, c));
        m.k[static_cast<std::size_t>(h)].push_back(kr);
        m.v[static_cast<std::size_t>(h)].push_back(vr);
        m.pos[static_cast<std::size_t>(h)].push_back(m.next + t);
      }
    m.next += n;
  }

  // Every live sequence reads back its model, and the pages add up.
  void check() {
    std::vector<std::int64_t> refs(static_cast<std::size_t>(cfg.num_pages), 0);
    for (auto& [s, m] : model) {
      SCOPED_TRACE("sequence " + std::to_string(s));
      ASSERT_EQ(cache.next_position(s), m.next);
      std::int64_t longest = 0;
      for (std::int64_t h = 0; h < cfg.Hkv; ++h) {
        const auto n = static_cast<std::int64_t>(m.k[static_cast<std::size_t>(h)].size());
        longest = std::max(longest, n);
        ASSERT_EQ(cache.length(s, h), n);
        std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
        std::iota(slots.begin(), slots.end(), 0);
        tensor<float, 2> k({n, cfg.D}), v({n, cfg.Dv});
        cache.gather(s, h, slots, k, v);
        for (std::int64_t j = 0; j < n; ++j) {
          ASSERT_EQ(cache.position(s, h, j), m.pos[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)]);
          for (std::int64_t c = 0; c < cfg.D; ++c)
            ASSERT_EQ(k(j, c), m.k[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)][static_cast<std::size_t>(c)])
                << "head " << h << " slot " << j;
          for (std::int64_t c = 0; c < cfg.Dv; ++c)
            ASSERT_EQ(v(j, c), m.v[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)][static_cast<std::size_t>(c)]);
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
  const auto b = t.cache.fork(a);
  t.model[b] = t.model.at(a);
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
  t.cache.release(a);
  t.model.erase(a);
  t.check();  // b still reads the shared prefix
}

TEST(PagedCache, TruncateRollsBackAndFreesPages) {
  harness t({storage::f16, 2, 8, 8, 16, 8});
  const auto a = t.create();
  t.append(a, 33);  // 3 pages
  t.cache.truncate(a, 4);  // speculative tokens rejected
  for (auto& rows : t.model.at(a).k) rows.resize(29);
  for (auto& rows : t.model.at(a).v) rows.resize(29);
  for (auto& rows : t.model.at(a).pos) rows.resize(29);
  t.model.at(a).next = 29;
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
  const auto b = t.cache.fork(a);  // compaction of a must not change b
  t.model[b] = t.model.at(a);
  kvcache::selection sel;
  sel.heads = {{0, 1, 2, 3, 17, 30, 49}, {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 33}};
  t.cache.compact(a, sel);
  model_seq& m = t.model.at(a);
  for (std::size_t h = 0; h < 2; ++h) {
    model_seq old = m;
    m.k[h].clear(), m.v[h].clear(), m.pos[h].clear();
    for (std::int64_t j : sel.heads[h]) {
      m.k[h].push_back(old.k[h][static_cast<std::size_t>(j)]);
      m.v[h].push_back(old.v[h][static_cast<std::size_t>(j)]);
      m.pos[h].push_back(old.pos[h][static_cast<std::size_t>(j)]);
    }
  }
  t.check();
  EXPECT_EQ(t.cache.block_table(a).size(), 2u);  // the longest head keeps 18 slots
  t.append(a, 3);                                // ragged heads append at their own ends
  t.check();
}

TEST(PagedCache, RandomOperationsMatchTheModel) {
  for (std::int64_t page_size : {16, 32}) {
    harness t({storage::f32, 2, 12, 4, page_size, 40}, 7 + static_cast<std::uint64_t>(page_size));
    std::uniform_int_distribution<int> op(0, 5);
    std::vector<paged_cache::sequence> live{t.create()};
    for (int step = 0; step < 300; ++step) {
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
          if (live.size() < 6) {
            const auto c = t.cache.fork(s);
            t.model[c] = t.model.at(s);
            live.push_back(c);
          }
          break;
        case 3: {
          const std::int64_t n = std::min<std::int64_t>(t.cache.length(s, 0), static_cast<std::int64_t>(t.gen() % 5));
          t.cache.truncate(s, n);
          for (std::size_t h = 0; h < 2; ++h) {
            auto& m = t.model.at(s);
            const auto keep = m.k[h].size() - static_cast<std::size_t>(n);
            m.k[h].resize(keep), m.v[h].resize(keep), m.pos[h].resize(keep);
          }
          t.model.at(s).next -= n;
          break;
        }
        case 4:
          if (live.size() > 1) {
            t.cache.release(s);
            t.model.erase(s);
            live.erase(std::find(live.begin(), live.end(), s));
          }
          break;
        default: {  // keep every other slot of head 0, everything of head 1
          kvcache::selection sel;
          sel.heads.resize(2);
          for (std::int64_t j = 0; j < t.cache.length(s, 0); j += 2) sel.heads[0].push_back(j);
          for (std::int64_t j = 0; j < t.cache.length(s, 1); ++j) sel.heads[1].push_back(j);
          if (t.cache.free_pages() < static_cast<std::int64_t>(t.cache.block_table(s).size())) break;
          t.cache.compact(s, sel);
          auto& m = t.model.at(s);
          model_seq old = m;
          m.k[0].clear(), m.v[0].clear(), m.pos[0].clear();
          for (std::int64_t j : sel.heads[0]) {
            m.k[0].push_back(old.k[0][static_cast<std::size_t>(j)]);
            m.v[0].push_back(old.v[0][static_cast<std::size_t>(j)]);
            m.pos[0].push_back(old.pos[0][static_cast<std::size_t>(j)]);
          }
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
    t.cache.keep_last(a, window);
    model_seq& m = t.model.at(a);
    for (std::size_t h = 0; h < 2; ++h)
      if (m.k[h].size() > window) {
        const auto drop = static_cast<std::ptrdiff_t>(m.k[h].size() - window);
        m.k[h].erase(m.k[h].begin(), m.k[h].begin() + drop);
        m.v[h].erase(m.v[h].begin(), m.v[h].begin() + drop);
        m.pos[h].erase(m.pos[h].begin(), m.pos[h].begin() + drop);
      }
    most_pages = std::max(most_pages, t.cache.num_pages() - t.cache.free_pages());
    if (step % 37 == 0) ASSERT_NO_FATAL_FAILURE(t.check());
  }
  t.check();
  EXPECT_GT(t.cache.next_position(a), 1500);
  EXPECT_LE(most_pages, (window + page - 1) / page + 1);  // 8 pages for a 100-token window
  // A fork of a windowed sequence shares its ring and slides on its own.
  const auto b = t.cache.fork(a);
  t.model[b] = t.model.at(a);
  t.append(b, 20);
  t.cache.keep_last(b, window);
  for (std::size_t h = 0; h < 2; ++h) {
    model_seq& m = t.model.at(b);
    const auto drop = static_cast<std::ptrdiff_t>(m.k[h].size() - window);
    m.k[h].erase(m.k[h].begin(), m.k[h].begin() + drop);
    m.v[h].erase(m.v[h].begin(), m.v[h].begin() + drop);
    m.pos[h].erase(m.pos[h].begin(), m.pos[h].begin() + drop);
  }
  t.check();
}

TEST(PagedCache, ErrorsNameTheArgumentAndChangeNothing) {
  expect_error([] { paged_cache c({storage::int8, 1, 8, 8, 16, 4}); }, "config.kind");
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
