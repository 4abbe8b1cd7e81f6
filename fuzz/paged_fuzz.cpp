// fuzz/paged_fuzz.cpp — kvcache::paged_cache under sequences of create / fork / append / truncate /
// keep_last / compact / release decoded from the input, then attention::paged (dense pages) or
// kvcache::paged_attention (KIVI int8 / int4 pages) over every live sequence against
// attention::reference_paged.
//
// A shadow model keeps every live sequence's tokens per kv head (stored values, positions). After
// each operation:
//  * every live sequence reads back (gather, positions) as its shadow, in every storage kind
//    (f32 exact, f16 / bf16 rounded; int8 / int4 within a few quantization steps of the value
//    range, since truncate and compact may quantize a token again);
//  * a rejected call (mnemo::error: bad ids, lengths, selections, an exhausted pool) changes no
//    live sequence;
//  * pages are conserved: the pool's free pages plus the distinct pages the live sequences hold
//    equal num_pages (no leak, no page freed while held).
// At the end one attention::paged call over all live sequences (kvcache::paged_attention for the
// KIVI kinds), each with its own query count (0 to 20: decode, verify and prefill-chunk paths), a
// fuzzed mod and sinks, must match reference_paged to f32 rounding (column sums too; for KIVI the
// reference reads the keys and values paged_cache::gather returns) and leave the canaries around
// out intact.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <set>
#include <type_traits>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/paged.hpp"
#include "mnemo/kvcache/paged.hpp"
#include "mnemo/kvcache/paged_attention.hpp"

namespace {

using namespace mnemo;
namespace kv = mnemo::kvcache;
namespace attn = mnemo::attention;

struct token {
  std::int64_t position;
  std::vector<float> k, v;
};
using shadow_seq = std::vector<std::vector<token>>;  // [Hkv][slots]

float stored(kv::storage kind, float x) {
  if (kind == kv::storage::f16) return to_float(f16(x));
  if (kind == kv::storage::bf16) return to_float(bf16(x));
  return x;
}

// How far a read-back element may be from what was appended: 0 for f32, the rounding of f16 /
// bf16 (stored() applies it), and for the KIVI kinds a few quantization steps of the range of
// uniform(-1, 1) inputs (a step is 2 / (2^bits - 1); each requantization by truncate or compact
// adds at most half a step, and a sequence goes through few of them in one input).
float tolerance(kv::storage kind) {
  if (kind == kv::storage::int8) return 8.0f * 2.0f / 255.0f;
  if (kind == kv::storage::int4) return 8.0f * 2.0f / 15.0f;
  return 0.0f;
}

void check_sequence(const kv::paged_cache& c, std::int64_t s, const shadow_seq& want) {
  const std::int64_t D = c.head_dim(), Dv = c.value_dim();
  const float tol = tolerance(c.kind());
  for (std::int64_t h = 0; h < c.num_heads(); ++h) {
    const auto& w = want[static_cast<std::size_t>(h)];
    const std::int64_t n = c.length(s, h);
    fuzz::check(n == static_cast<std::int64_t>(w.size()), "length differs from the shadow model");
    std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) slots[static_cast<std::size_t>(i)] = i;
    std::vector<float> k(static_cast<std::size_t>(std::max<std::int64_t>(n * D, 1)));
    std::vector<float> v(static_cast<std::size_t>(std::max<std::int64_t>(n * Dv, 1)));
    c.gather(s, h, slots, view<float, 2>(k.data(), {n, D}), view<float, 2>(v.data(), {n, Dv}));
    for (std::int64_t i = 0; i < n; ++i) {
      const token& t = w[static_cast<std::size_t>(i)];
      fuzz::check(c.position(s, h, i) == t.position, "position differs from the shadow model");
      for (std::int64_t e = 0; e < D; ++e)
        fuzz::check(std::abs(k[static_cast<std::size_t>(i * D + e)] - stored(c.kind(), t.k[static_cast<std::size_t>(e)])) <= tol,
                    "key differs from the shadow model");
      for (std::int64_t e = 0; e < Dv; ++e)
        fuzz::check(std::abs(v[static_cast<std::size_t>(i * Dv + e)] - stored(c.kind(), t.v[static_cast<std::size_t>(e)])) <= tol,
                    "value differs from the shadow model");
    }
  }
}

template <class KV, class Mod>
void check_attention(const kv::paged_cache& c, const std::vector<std::int64_t>& live, FuzzedDataProvider& in,
                     std::mt19937& rng, const Mod& mod) {
  const std::int64_t Hkv = c.num_heads(), G = in.ConsumeIntegralInRange<std::int64_t>(1, 3), Hq = Hkv * G;
  const std::int64_t D = c.head_dim(), Dv = c.value_dim(), B = static_cast<std::int64_t>(live.size());
  std::normal_distribution<float> dist;
  std::vector<std::int64_t> q_len(static_cast<std::size_t>(B));
  std::int64_t T = 0, keys = 0, max_pages = 1;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t s = live[static_cast<std::size_t>(b)];
    q_len[static_cast<std::size_t>(b)] = in.ConsumeIntegralInRange<std::int64_t>(0, 20);
    T += q_len[static_cast<std::size_t>(b)];
    keys += c.max_length(s);
    max_pages = std::max<std::int64_t>(max_pages, static_cast<std::int64_t>(c.block_table(s).size()));
  }
  tensor<std::int64_t, 2> table({B, max_pages});
  tensor<std::int64_t, 1> lens({B}), starts({B}), cu({B + 1});
  std::fill_n(table.data(), table.size(), std::int64_t{0});
  cu(0) = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t s = live[static_cast<std::size_t>(b)];
    const auto pages = c.block_table(s);
    for (std::size_t p = 0; p < pages.size(); ++p) table(b, static_cast<std::int64_t>(p)) = pages[p];
    lens(b) = c.max_length(s);
    starts(b) = c.start(s);
    cu(b + 1) = cu(b) + q_len[static_cast<std::size_t>(b)];
  }
  tensor<float, 3> q({T, Hq, D});
  for (auto& x : q) x = dist(rng);
  tensor<float, 1> sinks({Hq});
  for (auto& x : sinks) x = dist(rng);
  attn::options opt;
  opt.threads = in.ConsumeIntegralInRange<int>(1, 3);
  if (in.ConsumeBool()) opt.sinks = sinks.as_view();
  // The pool of the reference: the cache's own pages, or for the KIVI kinds each sequence's
  // gathered keys and values as one f32 page of its own (what kvcache::paged_attention must match).
  constexpr bool kivi = std::is_same_v<KV, std::uint8_t>;
  using RefKV = std::conditional_t<kivi, float, KV>;
  tensor<float, 4> kg({kivi ? B : 0, 1, Hkv, D}), vg({kivi ? B : 0, 1, Hkv, Dv});
  tensor<std::int64_t, 2> own({kivi ? B : 0, 1});
  if constexpr (kivi) {
    std::int64_t longest = 1;
    for (std::int64_t b = 0; b < B; ++b) longest = std::max(longest, lens(b));
    kg = tensor<float, 4>({B, longest, Hkv, D}), vg = tensor<float, 4>({B, longest, Hkv, Dv});
    for (std::int64_t b = 0; b < B; ++b) {
      own(b, 0) = b;
      starts(b) = 0;
      std::vector<std::int64_t> slots(static_cast<std::size_t>(lens(b)));
      for (std::int64_t j = 0; j < lens(b); ++j) slots[static_cast<std::size_t>(j)] = j;
      for (std::int64_t h = 0; h < Hkv; ++h)
        c.gather(live[static_cast<std::size_t>(b)], h, slots, view<float, 2>(&kg(b, 0, h, 0), {lens(b), D}, {Hkv * D, 1}),
                 view<float, 2>(&vg(b, 0, h, 0), {lens(b), Dv}, {Hkv * Dv, 1}));
    }
  }
  const attn::paged_kv<RefKV> pool = [&] {
    if constexpr (kivi) return attn::paged_kv<float>{cview(kg), cview(vg), cview(own), cview(lens), cview(starts)};
    else return attn::paged_kv<KV>{c.keys<KV>().permute({0, 2, 1, 3}), c.values<KV>().permute({0, 2, 1, 3}), cview(table),
                                   cview(lens), cview(starts)};
  }();
  // out with guard cells before and after.
  constexpr std::int64_t guard = 16;
  std::vector<float> out_buf(static_cast<std::size_t>(T * Hq * Dv + 2 * guard), fuzz::canary);
  const view<float, 3> out(out_buf.data() + guard, {T, Hq, Dv});
  tensor<float, 3> ref({T, Hq, Dv});
  tensor<float, 2> lse({T, Hq}), ref_lse({T, Hq}), sums({Hq, keys}), ref_sums({Hq, keys});
  try {
    attn::reference_paged(cview(q), cview(cu), pool, ref.as_view(), ref_lse.as_view(), mod, opt, ref_sums.as_view());
  } catch (const mnemo::error&) {
    fuzz::stats::count("attention rejected");
    return;
  }
  if constexpr (kivi) kv::paged_attention(c, live, cview(q), cview(cu), out, lse.as_view(), mod, opt, sums.as_view());
  else attn::paged(cview(q), cview(cu), pool, out, lse.as_view(), mod, opt, sums.as_view());
  for (std::int64_t i = 0; i < guard; ++i)
    fuzz::check(out_buf[static_cast<std::size_t>(i)] == fuzz::canary &&
                    out_buf[out_buf.size() - 1 - static_cast<std::size_t>(i)] == fuzz::canary,
                "attention wrote outside out");
  auto close = [](float got, float want, const char* what) {
    if (std::isinf(want) || std::isnan(want)) {
      if (!(got == want || (std::isnan(got) && std::isnan(want)))) fuzz::die("%s: got %.9g, want %.9g", what, got, want);
      return;
    }
    if (!(std::abs(got - want) <= 2e-5f + 2e-4f * std::abs(want))) fuzz::die("%s: got %.9g, want %.9g", what, got, want);
  };
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < Hq; ++h) {
      for (std::int64_t e = 0; e < Dv; ++e) close(out(t, h, e), ref(t, h, e), "out");
      close(lse(t, h), ref_lse(t, h), "lse");
    }
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t j = 0; j < keys; ++j) close(sums(h, j), ref_sums(h, j), "column sums");
  fuzz::stats::count("attention compared");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  constexpr kv::storage kinds[] = {kv::storage::f32, kv::storage::f16, kv::storage::bf16, kv::storage::int8,
                                   kv::storage::int4};
  kv::paged_config cfg;
  cfg.kind = kinds[in.ConsumeIntegralInRange<int>(0, 4)];
  cfg.value_group = in.ConsumeBool() ? 16 : in.ConsumeIntegralInRange<std::int64_t>(1, 40);  // not a multiple of 16: rejected unless >= Dv
  cfg.Hkv = in.ConsumeIntegralInRange<std::int64_t>(1, 3);
  cfg.D = in.ConsumeIntegralInRange<std::int64_t>(1, 20);
  cfg.Dv = in.ConsumeIntegralInRange<std::int64_t>(0, 20);
  cfg.page_size = in.ConsumeBool() ? 16 : in.ConsumeIntegralInRange<std::int64_t>(15, 40);  // 15: rejected
  cfg.num_pages = in.ConsumeIntegralInRange<std::int64_t>(0, 24);
  std::optional<kv::paged_cache> cache;
  try {
    cache.emplace(cfg);
  } catch (const mnemo::error&) {
    fuzz::stats::count("config rejected");
    return 0;
  }
  kv::paged_cache& c = *cache;
  fuzz::stats::count(kv::storage_name(cfg.kind));
  const std::int64_t D = c.head_dim(), Dv = c.value_dim();
  std::mt19937 rng(in.ConsumeIntegral<std::uint32_t>());
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<shadow_seq> shadow;  // by sequence id; empty: released or never made
  std::vector<std::int64_t> next_pos;
  auto live = [&] {
    std::vector<std::int64_t> ids;
    for (std::size_t s = 0; s < shadow.size(); ++s)
      if (!shadow[s].empty()) ids.push_back(static_cast<std::int64_t>(s));
    return ids;
  };
  auto pick = [&]() -> std::int64_t {  // a live id, sometimes a bad one
    const auto ids = live();
    if (ids.empty() || in.ConsumeIntegralInRange<int>(0, 15) == 0) return in.ConsumeIntegralInRange<std::int64_t>(-1, 40);
    return ids[in.ConsumeIntegralInRange<std::size_t>(0, ids.size() - 1)];
  };
  auto track = [&](std::int64_t s) {
    if (static_cast<std::int64_t>(shadow.size()) <= s) shadow.resize(static_cast<std::size_t>(s) + 1), next_pos.resize(static_cast<std::size_t>(s) + 1);
  };

  const int steps = in.ConsumeIntegralInRange<int>(1, 16);
  for (int step = 0; step < steps && in.remaining_bytes() > 0; ++step) {
    const std::vector<shadow_seq> before = shadow;
    const int op = in.ConsumeIntegralInRange<int>(0, 6);
    try {
      if (op == 0) {  // create
        const std::int64_t s = c.create();
        track(s);
        shadow[static_cast<std::size_t>(s)] = shadow_seq(static_cast<std::size_t>(cfg.Hkv));
        next_pos[static_cast<std::size_t>(s)] = 0;
        fuzz::stats::count("create");
      } else if (op == 1) {  // fork
        const std::int64_t p = pick();
        const std::int64_t s = c.fork(p);
        track(s);
        shadow[static_cast<std::size_t>(s)] = shadow[static_cast<std::size_t>(p)];
        next_pos[static_cast<std::size_t>(s)] = next_pos[static_cast<std::size_t>(p)];
        fuzz::stats::count("fork");
      } else if (op == 2 || op == 3) {  // append n tokens (sometimes with a bad shape)
        const std::int64_t s = pick(), n = in.ConsumeIntegralInRange<std::int64_t>(0, 40);
        const bool bad = in.ConsumeIntegralInRange<int>(0, 15) == 0;
        tensor<float, 3> k({cfg.Hkv, n, D}), v({cfg.Hkv, n, Dv + (bad ? 1 : 0)});
        for (auto& x : k) x = uni(rng);
        for (auto& x : v) x = uni(rng);
        c.append(s, cview(k), cview(v));
        fuzz::check(!bad, "append accepted a value of the wrong head dim");
        auto& sh = shadow[static_cast<std::size_t>(s)];
        for (std::int64_t h = 0; h < cfg.Hkv; ++h)
          for (std::int64_t t = 0; t < n; ++t)
            sh[static_cast<std::size_t>(h)].push_back(
                {next_pos[static_cast<std::size_t>(s)] + t, std::vector<float>(&k(h, t, 0), &k(h, t, 0) + D),
                 std::vector<float>(&v(h, t, 0), &v(h, t, 0) + Dv)});
        next_pos[static_cast<std::size_t>(s)] += n;
        fuzz::stats::count("append");
      } else if (op == 4) {  // truncate
        const std::int64_t s = pick(), n = in.ConsumeIntegralInRange<std::int64_t>(-1, 30);
        c.truncate(s, n);
        for (auto& head : shadow[static_cast<std::size_t>(s)]) head.resize(head.size() - static_cast<std::size_t>(n));
        next_pos[static_cast<std::size_t>(s)] -= n;
        fuzz::stats::count("truncate");
      } else if (op == 5) {  // compact to a random ascending subset of each head (sometimes invalid)
        const std::int64_t s = pick();
        kv::selection sel;
        const bool known = s >= 0 && s < static_cast<std::int64_t>(shadow.size()) && !shadow[static_cast<std::size_t>(s)].empty();
        for (std::int64_t h = 0; known && h < cfg.Hkv; ++h) {
          std::vector<std::int64_t> keep;
          for (std::int64_t i = 0; i < c.length(s, h); ++i)
            if (in.ConsumeBool()) keep.push_back(i);
          sel.heads.push_back(keep);
        }
        if (in.ConsumeIntegralInRange<int>(0, 15) == 0 && !sel.heads.empty()) sel.heads[0].push_back(1000);
        c.compact(s, sel);
        auto& sh = shadow[static_cast<std::size_t>(s)];
        for (std::size_t h = 0; h < sh.size(); ++h) {
          std::vector<token> kept;
          for (std::int64_t i : sel.heads[h]) kept.push_back(sh[h][static_cast<std::size_t>(i)]);
          sh[h] = std::move(kept);
        }
        fuzz::stats::count("compact");
      } else {  // release, or keep_last on a sequence whose heads are even
        const std::int64_t s = pick();
        if (in.ConsumeBool()) {
          c.release(s);
          shadow[static_cast<std::size_t>(s)].clear();
          fuzz::stats::count("release");
        } else {
          const std::int64_t w = in.ConsumeIntegralInRange<std::int64_t>(0, 50);
          c.keep_last(s, w);
          for (auto& head : shadow[static_cast<std::size_t>(s)])
            if (static_cast<std::int64_t>(head.size()) > w) head.erase(head.begin(), head.end() - w);
          fuzz::stats::count("keep_last");
        }
      }
    } catch (const mnemo::error&) {
      shadow = before;
      fuzz::stats::count("rejected step");
    }
    // Every live sequence reads back as its shadow; pages are conserved.
    std::set<std::int32_t> held;
    for (std::int64_t s : live()) {
      check_sequence(c, s, shadow[static_cast<std::size_t>(s)]);
      for (std::int32_t p : c.block_table(s)) held.insert(p);
    }
    fuzz::check(static_cast<std::int64_t>(held.size()) + c.free_pages() == c.num_pages(), "pages leaked or double freed");
  }

  // One batched attention call over the live sequences whose heads are even (ragged heads after
  // a head-wise compaction have no single length).
  std::vector<std::int64_t> even;
  for (std::int64_t s : live()) {
    bool same = true;
    for (std::int64_t h = 1; h < cfg.Hkv; ++h) same = same && c.length(s, h) == c.length(s, 0);
    if (same) even.push_back(s);
  }
  if (even.empty() || in.remaining_bytes() == 0) return 0;
  const int which = in.ConsumeIntegralInRange<int>(0, 3);
  auto run = [&](const auto& mod) {
    if (cfg.kind == kv::storage::f32) check_attention<float>(c, even, in, rng, mod);
    else if (cfg.kind == kv::storage::f16) check_attention<f16>(c, even, in, rng, mod);
    else if (cfg.kind == kv::storage::bf16) check_attention<bf16>(c, even, in, rng, mod);
    else check_attention<std::uint8_t>(c, even, in, rng, mod);  // KIVI: kvcache::paged_attention
  };
  if (which == 0) run(attn::mods::none{});
  else if (which == 1) run(attn::mods::causal{});
  else if (which == 2) run(attn::mods::sliding_window{in.ConsumeIntegralInRange<std::int64_t>(1, 40)});
  else run(attn::mods::all_of(attn::mods::softcap{5.0f}, attn::mods::causal{}));
  return 0;
}
