// tests/attention/paged_test.cpp — attention/paged.hpp (reference_paged) and attention sinks in the
// reference, against attention written out in the test (double loops over the paged layout), plus
// the argument checks.
#include "mnemo/attention/paged.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/kvcache/decode.hpp"
#include "mnemo/kvcache/paged.hpp"

namespace {

using namespace mnemo;
namespace attn = mnemo::attention;

// A batch in the paged layout with shuffled, shared and partly filled pages.
struct batch {
  std::int64_t B, T, Hq, Hkv, D, Dv, S, P, M;
  std::vector<std::int64_t> q_lens, seq_lens;
  tensor<float, 3> q;
  tensor<float, 4> k_pages, v_pages;
  tensor<std::int64_t, 2> table;
  tensor<std::int64_t, 1> lens, cu;
  tensor<float, 1> sinks;

  batch(std::vector<std::int64_t> ql, std::vector<std::int64_t> sl, std::int64_t Hq_, std::int64_t Hkv_,
        std::int64_t D_, std::int64_t page, std::uint64_t seed)
      : B(static_cast<std::int64_t>(ql.size())), Hq(Hq_), Hkv(Hkv_), D(D_), Dv(D_ + 8), S(page), q_lens(ql), seq_lens(sl),
        q({1, 1, 1}), k_pages({1, 1, 1, 1}), v_pages({1, 1, 1, 1}), table({1, 1}), lens({1}), cu({1}), sinks({Hq_}) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<float> dist;
    T = std::accumulate(ql.begin(), ql.end(), std::int64_t{0});
    M = 1;
    std::int64_t need = 0;
    for (std::int64_t len : sl) {
      M = std::max(M, (len + S - 1) / S);
      need += (len + S - 1) / S;
    }
    P = need + 3;  // pages nobody references hold random values too
    q = tensor<float, 3>({T, Hq, D});
    k_pages = tensor<float, 4>({P, S, Hkv, D});
    v_pages = tensor<float, 4>({P, S, Hkv, Dv});
    for (auto* t : {&k_pages, &v_pages})
      for (std::int64_t i = 0; i < t->size(); ++i) t->data()[i] = dist(gen);
    for (std::int64_t i = 0; i < q.size(); ++i) q.data()[i] = dist(gen);
    for (std::int64_t h = 0; h < Hq; ++h) sinks(h) = 2.0f * dist(gen);
    std::vector<std::int64_t> ids(static_cast<std::size_t>(P));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), gen);
    table = tensor<std::int64_t, 2>({B, M});
    std::fill(table.data(), table.data() + table.size(), std::int64_t{-1});
    std::size_t next = 0;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t p = 0; p < (sl[static_cast<std::size_t>(b)] + S - 1) / S; ++p) table(b, p) = ids[next++];
    if (B >= 2 && sl[0] >= S && sl[1] >= S) table(1, 0) = table(0, 0);  // a shared first page
    lens = tensor<std::int64_t, 1>({B});
    cu = tensor<std::int64_t, 1>({B + 1});
    cu(0) = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      lens(b) = sl[static_cast<std::size_t>(b)];
      cu(b + 1) = cu(b) + ql[static_cast<std::size_t>(b)];
    }
  }

  attn::paged_kv<float> kv() const { return {k_pages.as_view(), v_pages.as_view(), table.as_view(), lens.as_view()}; }
};

// Attention written out over the paged layout: causal (bottom-right per sequence), optional
// softcap, optional sinks; double precision.
void expected(const batch& x, float scale, float cap, bool with_sinks, tensor<float, 3>& out, tensor<float, 2>& lse) {
  for (std::int64_t b = 0; b < x.B; ++b) {
    const std::int64_t Lq = x.q_lens[static_cast<std::size_t>(b)], Lk = x.seq_lens[static_cast<std::size_t>(b)];
    for (std::int64_t i = 0; i < Lq; ++i)
      for (std::int64_t h = 0; h < x.Hq; ++h) {
        const std::int64_t t = x.cu(b) + i, hk = h / (x.Hq / x.Hkv), diag = i + Lk - Lq;
        std::vector<double> s;
        std::vector<std::int64_t> keys;
        for (std::int64_t j = 0; j <= diag && j < Lk; ++j) {
          const std::int64_t page = x.table(b, j / x.S), row = j % x.S;
          double dot = 0;
          for (std::int64_t c = 0; c < x.D; ++c) dot += double(x.q(t, h, c)) * x.k_pages(page, row, hk, c);
          double sc = scale * dot;
          if (cap > 0) sc = cap * std::tanh(sc / cap);
          s.push_back(sc);
          keys.push_back(j);
        }
        double m = with_sinks ? double(x.sinks(h)) : -INFINITY;
        for (double v : s) m = std::max(m, v);
        double l = with_sinks ? std::exp(double(x.sinks(h)) - m) : 0.0;
        for (double v : s) l += std::exp(v - m);
        for (std::int64_t c = 0; c < x.Dv; ++c) {
          double o = 0;
          for (std::size_t n = 0; n < s.size(); ++n) {
            const std::int64_t j = keys[n];
            o += std::exp(s[n] - m) / l * x.v_pages(x.table(b, j / x.S), j % x.S, hk, c);
          }
          out(t, h, c) = static_cast<float>(o);
        }
        lse(t, h) = s.empty() && !with_sinks ? -INFINITY : static_cast<float>(m + std::log(l));
      }
  }
}

void expect_close(const float* got, const float* want, std::int64_t n, const char* what) {
  for (std::int64_t i = 0; i < n; ++i) {
    if (std::isinf(want[i])) {
      ASSERT_EQ(got[i], want[i]) << what << " " << i;
      continue;
    }
    ASSERT_NEAR(got[i], want[i], 2e-6f + 2e-5f * std::abs(want[i])) << what << " " << i;
  }
}

TEST(PagedReference, MixedBatchWithSharedShuffledPagesAndSinks) {
  for (bool with_sinks : {false, true})
    for (float cap : {0.0f, 5.0f}) {
      SCOPED_TRACE(std::string("sinks=") + (with_sinks ? "1" : "0") + " softcap=" + std::to_string(cap));
      // decode, a speculative verify of 4, a chunk of a prefill, a fresh prefill, an empty sequence
      const batch x({1, 4, 7, 19, 0}, {37, 300, 40, 19, 5}, 8, 2, 40, 16, 3);
      attn::options opt;
      opt.scale = 0.2f;
      if (with_sinks) opt.sinks = x.sinks.as_view();
      tensor<float, 3> out({x.T, x.Hq, x.Dv}), want({x.T, x.Hq, x.Dv});
      tensor<float, 2> lse({x.T, x.Hq}), want_lse({x.T, x.Hq});
      expected(x, opt.scale, cap, with_sinks, want, want_lse);
      if (cap > 0)
        attn::reference_paged(cview(x.q), cview(x.cu), x.kv(), out, lse,
                              attn::mods::all_of(attn::mods::softcap{cap}, attn::mods::causal{}), opt);
      else
        attn::reference_paged(cview(x.q), cview(x.cu), x.kv(), out, lse, attn::mods::causal{}, opt);
      expect_close(out.data(), want.data(), out.size(), "out");
      expect_close(lse.data(), want_lse.data(), lse.size(), "lse");
    }
}

TEST(PagedReference, ReadsAPagedCachePoolThroughAPermutedView) {
  kvcache::paged_cache c({kvcache::storage::f32, 2, 24, 24, 16, 8});
  const auto s = c.create();
  tensor<float, 3> k({2, 45, 24}), v({2, 45, 24});
  std::mt19937 gen(5);
  std::normal_distribution<float> dist;
  for (auto* t : {&k, &v})
    for (std::int64_t i = 0; i < t->size(); ++i) t->data()[i] = dist(gen);
  c.append(s, cview(k), cview(v));
  tensor<std::int64_t, 2> table({1, 3});
  for (std::int64_t p = 0; p < 3; ++p) table(0, p) = c.block_table(s)[static_cast<std::size_t>(p)];
  tensor<std::int64_t, 1> lens({1}), cu({2});
  lens(0) = 45, cu(0) = 0, cu(1) = 2;
  tensor<float, 3> q({2, 4, 24}), out({2, 4, 24});
  for (std::int64_t i = 0; i < q.size(); ++i) q.data()[i] = dist(gen);
  const attn::paged_kv<float> kv{c.keys<float>().permute({0, 2, 1, 3}), c.values<float>().permute({0, 2, 1, 3}),
                                 table.as_view(), lens.as_view()};
  attn::reference_paged(cview(q), cview(cu), kv, out, {}, attn::mods::causal{});
  // The same through attention::reference on contiguous [1, Hkv, 45, D] tensors.
  tensor<float, 4> q4({1, 4, 2, 24}), k4({1, 2, 45, 24}), v4({1, 2, 45, 24}), o4({1, 4, 2, 24});
  for (std::int64_t h = 0; h < 4; ++h)
    for (std::int64_t i = 0; i < 2; ++i)
      for (std::int64_t e = 0; e < 24; ++e) q4(0, h, i, e) = q(i, h, e);
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t j = 0; j < 45; ++j)
      for (std::int64_t e = 0; e < 24; ++e) k4(0, h, j, e) = k(h, j, e), v4(0, h, j, e) = v(h, j, e);
  attn::reference(cview(q4), cview(k4), cview(v4), o4, {}, attn::mods::causal{});
  for (std::int64_t h = 0; h < 4; ++h)
    for (std::int64_t i = 0; i < 2; ++i)
      for (std::int64_t e = 0; e < 24; ++e) ASSERT_EQ(out(i, h, e), o4(0, h, i, e));
}

// A sliding-window layer on a ring of pages (keep_last) gives the attention of the full sequence
// with the window mask.
TEST(PagedReference, WindowLayerOnARingOfPagesMatchesTheFullSequence) {
  constexpr std::int64_t W = 50, L = 333, Hkv = 2, Hq = 4, D = 16;
  kvcache::paged_cache c({kvcache::storage::f32, Hkv, D, D, 16, 6});
  const auto s = c.create();
  tensor<float, 3> k({Hkv, L, D}), v({Hkv, L, D});
  std::mt19937 gen(3);
  std::normal_distribution<float> dist;
  for (auto* t : {&k, &v})
    for (std::int64_t i = 0; i < t->size(); ++i) t->data()[i] = dist(gen);
  for (std::int64_t t0 = 0; t0 < L; t0 += 9) {
    const std::int64_t n = std::min<std::int64_t>(9, L - t0);
    c.append(s, k.as_view().narrow(1, t0, n), v.as_view().narrow(1, t0, n));
    c.keep_last(s, W + 2);  // the 3 queries below: the first one's window starts 2 tokens earlier
  }
  const auto table_span = c.block_table(s);
  tensor<std::int64_t, 2> table({1, static_cast<std::int64_t>(table_span.size())});
  for (std::size_t p = 0; p < table_span.size(); ++p) table(0, static_cast<std::int64_t>(p)) = table_span[p];
  tensor<std::int64_t, 1> lens({1}), starts({1}), cu({2});
  lens(0) = W + 2, starts(0) = c.start(s), cu(0) = 0, cu(1) = 3;
  tensor<float, 3> q({3, Hq, D}), out({3, Hq, D});
  for (std::int64_t i = 0; i < q.size(); ++i) q.data()[i] = dist(gen);
  const attn::paged_kv<float> kv{c.keys<float>().permute({0, 2, 1, 3}), c.values<float>().permute({0, 2, 1, 3}),
                                 table.as_view(), lens.as_view(), starts.as_view()};
  attn::reference_paged(cview(q), cview(cu), kv, out, {}, attn::mods::sliding_window{W});
  // The full sequence, the last 3 tokens as queries, window W.
  tensor<float, 4> q4({1, Hq, 3, D}), k4({1, Hkv, L, D}), v4({1, Hkv, L, D}), o4({1, Hq, 3, D});
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < 3; ++i)
      for (std::int64_t e = 0; e < D; ++e) q4(0, h, i, e) = q(i, h, e);
  for (std::int64_t h = 0; h < Hkv; ++h)
    for (std::int64_t j = 0; j < L; ++j)
      for (std::int64_t e = 0; e < D; ++e) k4(0, h, j, e) = k(h, j, e), v4(0, h, j, e) = v(h, j, e);
  attn::reference(cview(q4), cview(k4), cview(v4), o4, {}, attn::mods::sliding_window{W});
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < 3; ++i)
      for (std::int64_t e = 0; e < D; ++e) ASSERT_NEAR(out(i, h, e), o4(0, h, i, e), 1e-6f) << h << " " << i;
  EXPECT_LE(c.num_pages() - c.free_pages(), 5);  // ceil(52 / 16) + 1
}

TEST(ReferenceSinks, RowsWithoutKeysGetTheSinkAndWeightsSumBelowOne) {
  // Lq > Lk causal: the first rows see no key.
  tensor<float, 4> q({1, 2, 5, 8}), k({1, 1, 3, 8}), v({1, 1, 3, 8}), out({1, 2, 5, 8});
  tensor<float, 3> lse({1, 2, 5});
  for (std::int64_t i = 0; i < q.size(); ++i) q.data()[i] = 0.1f * static_cast<float>(i % 7);
  for (std::int64_t i = 0; i < k.size(); ++i) k.data()[i] = 0.2f * static_cast<float>(i % 5);
  std::fill(v.data(), v.data() + v.size(), 1.0f);  // out = the sum of the row's weights
  tensor<float, 1> sinks({2});
  sinks(0) = 1.5f, sinks(1) = -std::numeric_limits<float>::infinity();  // head 1: a sink that is no sink
  attn::options opt;
  opt.sinks = sinks.as_view();
  attn::reference(cview(q), cview(k), cview(v), out, lse, attn::mods::causal{}, opt);
  tensor<float, 4> plain({1, 2, 5, 8});
  tensor<float, 3> plain_lse({1, 2, 5});
  attn::reference(cview(q), cview(k), cview(v), plain, plain_lse, attn::mods::causal{});
  for (std::int64_t i = 0; i < 2; ++i) {  // rows 0, 1 see nothing
    EXPECT_EQ(out(0, 0, i, 0), 0.0f);
    EXPECT_EQ(lse(0, 0, i), 1.5f);
    EXPECT_EQ(lse(0, 1, i), -std::numeric_limits<float>::infinity());
  }
  for (std::int64_t i = 2; i < 5; ++i) {
    // weights sum to exp(lse_plain - lse) < 1, and lse = log(exp(lse_plain) + exp(sink))
    const double want_lse = std::log(std::exp(double(plain_lse(0, 0, i))) + std::exp(1.5));
    EXPECT_NEAR(lse(0, 0, i), want_lse, 1e-6);
    EXPECT_NEAR(out(0, 0, i, 3), std::exp(double(plain_lse(0, 0, i)) - want_lse), 1e-6);
    EXPECT_EQ(lse(0, 1, i), plain_lse(0, 1, i));
    EXPECT_EQ(out(0, 1, i, 3), plain(0, 1, i, 3));
  }
}

// Flash with sinks against the reference with sinks: awkward sizes, GQA, masked rows, column sums.
TEST(FlashSinks, MatchTheReferenceWithColumnSums) {
  struct shape {
    std::int64_t Hq, Hkv, Lq, Lk, D;
  };
  std::mt19937 gen(11);
  std::normal_distribution<float> dist;
  for (const shape& sh : {shape{4, 1, 37, 101, 40}, shape{8, 2, 70, 50, 64}, shape{2, 2, 1, 1000, 96}}) {
    SCOPED_TRACE("Lq=" + std::to_string(sh.Lq) + " Lk=" + std::to_string(sh.Lk));
    tensor<float, 4> q({1, sh.Hq, sh.Lq, sh.D}), k({1, sh.Hkv, sh.Lk, sh.D}), v({1, sh.Hkv, sh.Lk, sh.D});
    for (auto* t : {&q, &k, &v})
      for (std::int64_t i = 0; i < t->size(); ++i) t->data()[i] = dist(gen);
    tensor<float, 1> sinks({sh.Hq});
    for (std::int64_t h = 0; h < sh.Hq; ++h) sinks(h) = 3.0f * dist(gen);
    attn::options opt;
    opt.sinks = sinks.as_view();
    tensor<float, 4> out({1, sh.Hq, sh.Lq, sh.D}), ref({1, sh.Hq, sh.Lq, sh.D});
    tensor<float, 3> lse({1, sh.Hq, sh.Lq}), ref_lse({1, sh.Hq, sh.Lq}), sums({1, sh.Hq, sh.Lk}),
        ref_sums({1, sh.Hq, sh.Lk});
    const attn::column_sums cs{sums.as_view(), 0}, ref_cs{ref_sums.as_view(), 0};
    attn::reference(cview(q), cview(k), cview(v), ref, ref_lse, attn::mods::causal{}, opt, ref_cs);
    attn::flash(cview(q), cview(k), cview(v), out, lse, attn::mods::causal{}, opt, cs);
    expect_close(out.data(), ref.data(), out.size(), "out");
    expect_close(lse.data(), ref_lse.data(), lse.size(), "lse");
    for (std::int64_t i = 0; i < sums.size(); ++i)
      ASSERT_NEAR(sums.data()[i], ref_sums.data()[i], 1e-5f + 1e-4f * ref_sums.data()[i]) << i;
  }
}

// Split-KV decode (strided views and the cache) with sinks against the reference with sinks, with
// column sums, over several chunks.
TEST(DecodeSinks, MatchTheReferenceWithColumnSums) {
  std::mt19937 gen(13);
  std::normal_distribution<float> dist;
  const std::int64_t Hq = 8, Hkv = 2, Lk = 1300, D = 64;
  for (std::int64_t Lq : {1, 3}) {
    SCOPED_TRACE("Lq=" + std::to_string(Lq));
    tensor<float, 4> q({1, Hq, Lq, D}), k({1, Hkv, Lk, D}), v({1, Hkv, Lk, D});
    for (auto* t : {&q, &k, &v})
      for (std::int64_t i = 0; i < t->size(); ++i) t->data()[i] = dist(gen);
    tensor<float, 1> sinks({Hq});
    for (std::int64_t h = 0; h < Hq; ++h) sinks(h) = 4.0f * dist(gen);
    attn::options opt;
    opt.sinks = sinks.as_view();
    tensor<float, 4> out({1, Hq, Lq, D}), ref({1, Hq, Lq, D});
    tensor<float, 3> lse({1, Hq, Lq}), ref_lse({1, Hq, Lq}), sums({1, Hq, Lk}), ref_sums({1, Hq, Lk});
    attn::reference(cview(q), cview(k), cview(v), ref, ref_lse, attn::mods::causal{}, opt, {ref_sums.as_view(), 0});
    attn::decode(cview(q), cview(k), cview(v), out, lse, attn::mods::causal{}, opt, {sums.as_view(), 0});
    expect_close(out.data(), ref.data(), out.size(), "out");
    expect_close(lse.data(), ref_lse.data(), lse.size(), "lse");
    for (std::int64_t i = 0; i < sums.size(); ++i)
      ASSERT_NEAR(sums.data()[i], ref_sums.data()[i], 1e-5f + 1e-4f * ref_sums.data()[i]) << i;
    if (Lq != 1) continue;
    // The same keys from an f32 layer_cache: kvcache::decode has no mask; Lq = 1 sees every key.
    kvcache::cache_config cfg;
    cfg.Hkv = Hkv, cfg.capacity = Lk, cfg.D = D;
    kvcache::layer_cache c(cfg);
    tensor<float, 3> k3({Hkv, Lk, D}), v3({Hkv, Lk, D}), q3({Hq, 1, D}), o3({Hq, 1, D});
    std::copy_n(k.data(), k.size(), k3.data());
    std::copy_n(v.data(), v.size(), v3.data());
    std::copy_n(q.data(), q.size(), q3.data());
    c.append(cview(k3), cview(v3));
    tensor<float, 2> l3({Hq, 1});
    kvcache::decode(c, cview(q3), o3, l3, opt);
    expect_close(o3.data(), ref.data(), o3.size(), "cache out");
    expect_close(l3.data(), ref_lse.data(), l3.size(), "cache lse");
  }
}

// The fast path against the reference: decode steps, speculative verifies, a prefill chunk longer
// than decode_max_rows, a fresh prefill, a sequence without queries and one without keys in one
// batch, runs of consecutive sequences with as many queries (one engine call each, their
// lengths from 2 to 700) among them; f32, f16 and bf16 pages; causal, window + softcap (f32),
// sinks; bit-identical for 1, 2 and 3 threads.
template <class KV>
void check_paged_fast_path(std::uint64_t seed) {
  const batch x({1, 1, 4, 4, 23, 19, 0, 1, 1, 1, 2, 2}, {37, 600, 300, 4, 70, 19, 5, 700, 0, 17, 2, 33}, 8, 2, 40,
                16, seed);
  tensor<KV, 4> kp({x.P, x.S, x.Hkv, x.D}), vp({x.P, x.S, x.Hkv, x.Dv});
  for (std::int64_t i = 0; i < kp.size(); ++i) kp.data()[i] = KV(x.k_pages.data()[i]);
  for (std::int64_t i = 0; i < vp.size(); ++i) vp.data()[i] = KV(x.v_pages.data()[i]);
  const attn::paged_kv<KV> kv{kp.as_view(), vp.as_view(), x.table.as_view(), x.lens.as_view()};
  for (int variant = 0; variant < 3; ++variant) {
    // The window + softcap variant runs on f32 pages only: a mod acts on scores, whatever the
    // storage, and each (type, mod) pair is three more instantiations of the engine and flash.
    if (variant == 1 && !std::is_same_v<KV, float>) continue;
    SCOPED_TRACE("variant " + std::to_string(variant));
    attn::options opt;
    opt.scale = 0.15f;
    if (variant == 2) opt.sinks = x.sinks.as_view();
    tensor<float, 3> out({x.T, x.Hq, x.Dv}), ref({x.T, x.Hq, x.Dv});
    tensor<float, 2> lse({x.T, x.Hq}), ref_lse({x.T, x.Hq});
    const std::int64_t keys = std::accumulate(x.seq_lens.begin(), x.seq_lens.end(), std::int64_t{0});
    tensor<float, 2> sums({x.Hq, keys}), ref_sums({x.Hq, keys});
    auto run = [&](auto&& f) {
      if constexpr (std::is_same_v<KV, float>)
        if (variant == 1) return f(attn::mods::all_of(attn::mods::softcap{8.0f}, attn::mods::sliding_window{50}));
      f(attn::mods::causal{});
    };
    run([&](const auto& mod) { attn::reference_paged(cview(x.q), cview(x.cu), kv, ref, ref_lse, mod, opt, ref_sums); });
    std::vector<float> first;
    for (int threads : {1, 2, 3}) {
      opt.threads = threads;
      std::fill_n(sums.data(), sums.size(), -1.0f);  // every column is written
      run([&](const auto& mod) { attn::paged(cview(x.q), cview(x.cu), kv, out, lse, mod, opt, sums); });
      expect_close(out.data(), ref.data(), out.size(), "out");
      expect_close(lse.data(), ref_lse.data(), lse.size(), "lse");
      expect_close(sums.data(), ref_sums.data(), sums.size(), "column sums");
      if (first.empty()) first.assign(out.data(), out.data() + out.size());
      else
        for (std::int64_t i = 0; i < out.size(); ++i) ASSERT_EQ(out.data()[i], first[static_cast<std::size_t>(i)]) << i;
    }
  }
}

TEST(Paged, FastPathMatchesTheReferenceF32) { check_paged_fast_path<float>(21); }
TEST(Paged, FastPathMatchesTheReferenceF16) { check_paged_fast_path<f16>(22); }
TEST(Paged, FastPathMatchesTheReferenceBf16) { check_paged_fast_path<bf16>(23); }

TEST(PagedReference, ErrorsNameTheArgument) {
  const batch x({1, 2}, {20, 9}, 4, 2, 16, 16, 9);
  tensor<float, 3> out({x.T, x.Hq, x.Dv});
  auto call = [&](attn::paged_kv<float> kv, view<const std::int64_t, 1> cu) {
    attn::reference_paged(cview(x.q), cu, kv, out, {}, attn::mods::causal{});
  };
  auto expect = [](auto&& f, const std::string& needle) {
    try {
      f();
      FAIL() << "expected mnemo::error mentioning " << needle;
    } catch (const mnemo::error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  tensor<std::int64_t, 1> cu_bad({3});
  cu_bad(0) = 0, cu_bad(1) = 2, cu_bad(2) = 1;
  expect([&] { call(x.kv(), cview(cu_bad)); }, "cu_seqlens_q");
  tensor<std::int64_t, 2> table = x.table;
  table(0, 1) = x.P;  // a page id past the pool
  expect([&] { call({x.k_pages.as_view(), x.v_pages.as_view(), table.as_view(), x.lens.as_view()}, cview(x.cu)); },
         "block_table[0, 1]");
  tensor<std::int64_t, 1> lens = x.lens;
  lens(1) = x.M * x.S + 1;
  expect([&] { call({x.k_pages.as_view(), x.v_pages.as_view(), x.table.as_view(), lens.as_view()}, cview(x.cu)); },
         "seq_lens[1]");
  tensor<float, 1> sinks({3});
  attn::options opt;
  opt.sinks = sinks.as_view();
  expect([&] { attn::reference_paged(cview(x.q), cview(x.cu), x.kv(), out, {}, attn::mods::causal{}, opt); },
         "options.sinks");
}

}  // namespace
