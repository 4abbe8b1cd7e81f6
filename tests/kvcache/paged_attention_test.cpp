// kvcache::paged_attention: a batch of sequences of a paged cache, every storage kind, against
// attention::reference on each sequence's keys and values as paged_cache::gather returns them
// (dequantized codes and f32 tail rows for the KIVI kinds).
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "mnemo/attention/reference.hpp"
#include "mnemo/kvcache/paged.hpp"
#include "mnemo/kvcache/paged_attention.hpp"
#include "support/support.hpp"

namespace mnemo {
namespace {

namespace attn = attention;
namespace kv = kvcache;
using test::expect_close;
using test::expect_error;

constexpr std::int64_t Hkv = 2, Hq = 6, D = 64, Dv = 48;

tensor<float, 3> normal(std::int64_t a, std::int64_t b, std::int64_t c, std::uint32_t seed) {
  tensor<float, 3> t({a, b, c});
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  for (std::int64_t i = 0; i < t.size(); ++i) t.data()[i] = dist(gen);
  return t;
}

// A pool with sequences of awkward lengths: empty, inside one page, across pages, longer than a
// decode chunk (512 keys), a fork that diverged from its parent, and one truncated into a full
// page (for the KIVI kinds: a sealed page unsealed again).
struct batch {
  kv::paged_cache c;
  std::vector<kv::paged_cache::sequence> seqs;

  static kv::paged_config config(kv::storage kind, std::int64_t page) {
    kv::paged_config cfg{.kind = kind, .Hkv = Hkv, .D = D, .Dv = Dv, .page_size = page, .num_pages = 160};
    cfg.value_group = 16;  // three value groups per token
    return cfg;
  }

  batch(kv::storage kind, std::int64_t page) : c(config(kind, page)) {
    std::uint32_t seed = 10;
    auto append = [&](kv::paged_cache::sequence s, std::int64_t n) {
      for (std::int64_t t0 = 0; t0 < n; t0 += 37) {  // in pieces that straddle page ends
        const std::int64_t m = std::min<std::int64_t>(37, n - t0);
        const tensor<float, 3> k = normal(Hkv, m, D, ++seed), v = normal(Hkv, m, Dv, ++seed);
        c.append(s, cview(k), cview(v));
      }
    };
    for (std::int64_t n : {0, 5, 40, 700, 130}) {
      seqs.push_back(c.create());
      append(seqs.back(), n);
    }
    seqs.push_back(c.fork(seqs[3]));  // shares the 700 tokens, then its own 9
    append(seqs.back(), 9);
    append(seqs[3], 3);               // the parent goes on too
    c.truncate(seqs[4], 7);           // 130 -> 123: back into a full page
  }
};

// Per-sequence reference: attention::reference on the gathered keys and values.
template <class Mod>
void reference(const kv::paged_cache& c, std::span<const kv::paged_cache::sequence> seqs, const tensor<float, 3>& q,
               const tensor<std::int64_t, 1>& cu, tensor<float, 3>& out, tensor<float, 2>& lse, tensor<float, 2>* sums,
               const Mod& mod, const attn::options& opt) {
  std::int64_t k0 = 0;
  for (std::size_t b = 0; b < seqs.size(); ++b) {
    const std::int64_t L = c.length(seqs[b], 0), q0 = cu(static_cast<std::int64_t>(b));
    const std::int64_t Lq = cu(static_cast<std::int64_t>(b) + 1) - q0;
    tensor<float, 4> q4({1, Hq, Lq, D}), k4({1, Hkv, L, D}), v4({1, Hkv, L, Dv}), o4({1, Hq, Lq, Dv});
    tensor<float, 3> l3({1, Hq, Lq}), cs({1, Hq, L});
    std::vector<std::int64_t> slots(static_cast<std::size_t>(L));
    for (std::int64_t j = 0; j < L; ++j) slots[static_cast<std::size_t>(j)] = j;
    for (std::int64_t h = 0; h < Hkv && L > 0; ++h)
      c.gather(seqs[b], h, slots, view<float, 2>(k4.as_view().ptr(0, h, 0, 0), {L, D}, {D, 1}),
               view<float, 2>(v4.as_view().ptr(0, h, 0, 0), {L, Dv}, {Dv, 1}));
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < Lq; ++i) std::copy_n(q.as_view().ptr(q0 + i, h, 0), D, q4.as_view().ptr(0, h, i, 0));
    if (Lq > 0) {
      if (L == 0) {
        for (std::int64_t h = 0; h < Hq; ++h)
          for (std::int64_t i = 0; i < Lq; ++i) std::fill_n(o4.as_view().ptr(0, h, i, 0), Dv, 0.0f), l3(0, h, i) = attn::sink_of(opt, h);
      } else {
        attn::reference(cview(q4), cview(k4), cview(v4), o4.as_view(), l3.as_view(), mod, opt,
                        attn::column_sums{cs.as_view(), 0});
      }
    }
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < Lq; ++i) {
        std::copy_n(o4.as_view().ptr(0, h, i, 0), Dv, out.as_view().ptr(q0 + i, h, 0));
        lse(q0 + i, h) = l3(0, h, i);
      }
    if (sums)
      for (std::int64_t h = 0; h < Hq; ++h)
        for (std::int64_t j = 0; j < L; ++j) (*sums)(h, k0 + j) = Lq > 0 ? cs(0, h, j) : 0.0f;
    k0 += L;
  }
}

struct kind_case {
  kv::storage kind;
  std::int64_t page;
};

class PagedAttention : public ::testing::TestWithParam<kind_case> {};

// Decode rows (1 query), speculative verifies (3), a prefill chunk (20 > decode_max_rows) and a
// sequence without queries, with and without a causal mask, sinks and column sums.
TEST_P(PagedAttention, MatchesTheReferencePerSequence) {
  const kind_case k = GetParam();
  batch x(k.kind, k.page);
  const std::int64_t qlen[] = {2, 1, 3, 1, 20, 0};
  tensor<std::int64_t, 1> cu({7});
  cu(0) = 0;
  for (std::int64_t b = 0; b < 6; ++b) cu(b + 1) = cu(b) + qlen[b];
  const std::int64_t T = cu(6);
  const tensor<float, 3> q = normal(T, Hq, D, 99);
  std::int64_t keys = 0;
  for (auto s : x.seqs) keys += x.c.length(s, 0);
  tensor<float, 1> sinks({Hq});
  for (std::int64_t h = 0; h < Hq; ++h) sinks(h) = 0.25f * static_cast<float>(h) - 0.5f;
  for (int variant = 0; variant < 2; ++variant) {
    SCOPED_TRACE(variant == 0 ? "no mask" : "causal, sinks, column sums");
    attn::options opt;
    if (variant == 1) opt.sinks = cview(sinks);
    tensor<float, 3> out({T, Hq, Dv}), want({T, Hq, Dv});
    tensor<float, 2> lse({T, Hq}), want_lse({T, Hq}), sums({Hq, keys}), want_sums({Hq, keys});
    if (variant == 0) {
      kv::paged_attention(x.c, x.seqs, cview(q), cview(cu), out.as_view(), lse.as_view(), attn::mods::none{}, opt);
      reference(x.c, x.seqs, q, cu, want, want_lse, nullptr, attn::mods::none{}, opt);
    } else {
      kv::paged_attention(x.c, x.seqs, cview(q), cview(cu), out.as_view(), lse.as_view(), attn::mods::causal{}, opt,
                          sums.as_view());
      reference(x.c, x.seqs, q, cu, want, want_lse, &want_sums, attn::mods::causal{}, opt);
      expect_close(sums, want_sums, 1e-6, 1e-4, "sums");
    }
    expect_close(out, want, 2e-5, 1e-4, "out");
    expect_close(lse, want_lse, 2e-5, 1e-5, "lse");
    // Bit-identical for every thread count.
    for (int threads : {1, 3}) {
      tensor<float, 3> again({T, Hq, Dv});
      opt.threads = threads;
      if (variant == 0) kv::paged_attention(x.c, x.seqs, cview(q), cview(cu), again.as_view(), {}, attn::mods::none{}, opt);
      else kv::paged_attention(x.c, x.seqs, cview(q), cview(cu), again.as_view(), {}, attn::mods::causal{}, opt);
      for (std::int64_t i = 0; i < out.size(); ++i) ASSERT_EQ(again.data()[i], out.data()[i]) << "threads " << threads;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, PagedAttention,
                         ::testing::Values(kind_case{kv::storage::f16, 16}, kind_case{kv::storage::int8, 16},
                                           kind_case{kv::storage::int8, 48}, kind_case{kv::storage::int4, 32}),
                         [](const auto& info) {
                           return std::string(kv::storage_name(info.param.kind)) + "_page" + std::to_string(info.param.page);
                         });

TEST(PagedAttentionErrors, NameTheArgument) {
  batch x(kv::storage::int8, 16);
  tensor<std::int64_t, 1> cu({7});
  for (std::int64_t b = 0; b < 7; ++b) cu(b) = b;
  tensor<float, 3> q({6, Hq, D}), out({6, Hq, Dv}), bad_q({6, Hq, D + 1});
  expect_error([&] { kv::paged_attention(x.c, x.seqs, cview(bad_q), cview(cu), out.as_view()); },
               {"kvcache::paged_attention", "q", "D from the cache"});
  tensor<std::int64_t, 1> short_cu({3});
  expect_error([&] { kv::paged_attention(x.c, x.seqs, cview(q), cview(short_cu), out.as_view()); },
               {"kvcache::paged_attention", "cu_seqlens_q", "[B + 1]"});
  tensor<std::int64_t, 1> sums_cu({7});
  tensor<float, 2> sums({Hq, 3});
  expect_error([&] { kv::paged_attention(x.c, x.seqs, cview(q), cview(cu), out.as_view(), {}, attn::mods::none{}, {}, sums.as_view()); },
               {"kvcache::paged_attention", "sums", "sum of the sequences' lengths"});
}

}  // namespace
}  // namespace mnemo
