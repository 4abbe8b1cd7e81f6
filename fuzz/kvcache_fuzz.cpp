// fuzz/kvcache_fuzz.cpp — kvcache::layer_cache under sequences of append / compact decoded from
// the input, in every storage kind (f32, f16, bf16, int8, int4 with fuzzed group sizes).
//
// A shadow model keeps every head's tokens (original f32 rows and positions). After each step:
//  * gather of every slot returns the shadow's rows: exactly (f32), the rounded value (f16,
//    bf16), or within one quantization step of the input range (int8, int4);
//  * positions(h) equals the shadow's positions;
//  * compaction is exact: a kept slot reads back bit-identical before and after;
//  * a rejected call (mnemo::error: capacity, shapes, bad selections, bad configs) leaves the
//    cache unchanged, bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "common.hpp"
#include "mnemo/kvcache/cache.hpp"

namespace {

using namespace mnemo;
namespace kv = mnemo::kvcache;

struct token {
  std::int64_t position;
  std::vector<float> k, v;
};

// Every slot of every head, dequantized, plus the positions: the observable state.
struct snapshot {
  std::vector<std::vector<float>> k, v;
  std::vector<std::vector<std::int64_t>> pos;
  bool operator==(const snapshot& o) const {
    auto bits_equal = [](const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
      if (a.size() != b.size()) return false;
      for (std::size_t i = 0; i < a.size(); ++i)
        if (a[i].size() != b[i].size() || std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0)
          return false;
      return true;
    };
    return bits_equal(k, o.k) && bits_equal(v, o.v) && pos == o.pos;
  }
};

snapshot take(const kv::layer_cache& c) {
  snapshot s;
  for (std::int64_t h = 0; h < c.num_heads(); ++h) {
    const std::int64_t n = c.length(h);
    std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) slots[static_cast<std::size_t>(i)] = i;
    std::vector<float> k(static_cast<std::size_t>(std::max<std::int64_t>(n * c.head_dim(), 1)));
    std::vector<float> v(static_cast<std::size_t>(std::max<std::int64_t>(n * c.value_dim(), 1)));
    c.gather(h, slots, view<float, 2>(k.data(), {n, c.head_dim()}), view<float, 2>(v.data(), {n, c.value_dim()}));
    k.resize(static_cast<std::size_t>(n * c.head_dim()));
    v.resize(static_cast<std::size_t>(n * c.value_dim()));
    s.k.push_back(std::move(k));
    s.v.push_back(std::move(v));
    const auto p = c.positions(h);
    s.pos.emplace_back(p.begin(), p.end());
  }
  return s;
}

float stored(kv::storage kind, float x) {
  if (kind == kv::storage::f16) return to_float(f16(x));
  if (kind == kv::storage::bf16) return to_float(bf16(x));
  return x;
}

void check_against_shadow(const kv::layer_cache& c, const snapshot& s, const std::vector<std::vector<token>>& shadow) {
  const kv::storage kind = c.kind();
  // Inputs are in [-1, 1]: one quantization step of that range, the largest error of a
  // round-to-nearest code (half a step) with margin for the scale's own rounding.
  const float tol = kind == kv::storage::int8 ? 2.0f / 255 : kind == kv::storage::int4 ? 2.0f / 15 : 0.0f;
  for (std::size_t h = 0; h < shadow.size(); ++h) {
    fuzz::check(s.pos[h].size() == shadow[h].size(), "length differs from the shadow model");
    for (std::size_t i = 0; i < shadow[h].size(); ++i) {
      fuzz::check(s.pos[h][i] == shadow[h][i].position, "position differs from the shadow model");
      const std::int64_t D = c.head_dim(), Dv = c.value_dim();
      for (std::int64_t e = 0; e < D; ++e) {
        const float want = stored(kind, shadow[h][i].k[static_cast<std::size_t>(e)]);
        const float got = s.k[h][i * static_cast<std::size_t>(D) + static_cast<std::size_t>(e)];
        if (!(std::abs(got - want) <= tol)) fuzz::die("head %zu slot %zu key[%lld] = %.9g, stored %.9g (kind %d)", h, i, (long long)e, got, want, int(kind));
      }
      for (std::int64_t e = 0; e < Dv; ++e) {
        const float want = stored(kind, shadow[h][i].v[static_cast<std::size_t>(e)]);
        const float got = s.v[h][i * static_cast<std::size_t>(Dv) + static_cast<std::size_t>(e)];
        if (!(std::abs(got - want) <= tol)) fuzz::die("head %zu slot %zu value[%lld] = %.9g, stored %.9g (kind %d)", h, i, (long long)e, got, want, int(kind));
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  kv::cache_config cfg;
  cfg.kind = kv::all_storages[in.ConsumeIntegralInRange<int>(0, 4)];
  cfg.Hkv = in.ConsumeIntegralInRange<std::int64_t>(0, 3);
  cfg.capacity = in.ConsumeIntegralInRange<std::int64_t>(0, 80);
  cfg.D = in.ConsumeIntegralInRange<std::int64_t>(0, 20);
  cfg.Dv = in.ConsumeIntegralInRange<std::int64_t>(0, 20);
  cfg.quant.key_group = in.ConsumeIntegralInRange<std::int64_t>(0, 16);
  constexpr std::int64_t value_groups[] = {16, 32, 1000, 7};  // 7: not a multiple of 16, an error unless >= Dv
  cfg.quant.value_group = value_groups[in.ConsumeIntegralInRange<int>(0, 3)];
  cfg.quant.residual = cfg.quant.key_group + in.ConsumeIntegralInRange<std::int64_t>(-2, 16);
  kv::layer_cache c;
  try {
    c = kv::layer_cache(cfg);
  } catch (const mnemo::error&) {
    fuzz::stats::count("config rejected");
    return 0;
  }
  fuzz::stats::count("config accepted");
  std::mt19937 rng(in.ConsumeIntegral<std::uint32_t>());
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<std::vector<token>> shadow(static_cast<std::size_t>(cfg.Hkv));
  std::int64_t next_position = 0;
  const std::int64_t D = c.head_dim(), Dv = c.value_dim();

  const int steps = in.ConsumeIntegralInRange<int>(1, 12);
  for (int step = 0; step < steps && in.remaining_bytes() > 0; ++step) {
    const snapshot before = take(c);
    bool threw = false;
    if (in.ConsumeBool()) {  // append n tokens (past capacity: an error)
      const std::int64_t n = in.ConsumeIntegralInRange<std::int64_t>(0, 24);
      const bool bad_shape = in.ConsumeIntegralInRange<int>(0, 15) == 0;
      tensor<float, 3> k({cfg.Hkv, n, D + (bad_shape ? 1 : 0)}), v({cfg.Hkv, n, Dv});
      for (auto& x : k) x = uni(rng);
      for (auto& x : v) x = uni(rng);
      try {
        c.append(cview(k), cview(v));
      } catch (const mnemo::error&) {
        threw = true;
      }
      if (!threw) {
        fuzz::check(!bad_shape, "append accepted a key of the wrong head dim");
        for (std::int64_t h = 0; h < cfg.Hkv; ++h)
          for (std::int64_t t = 0; t < n; ++t)
            shadow[static_cast<std::size_t>(h)].push_back(
                {next_position + t, std::vector<float>(k.as_view()[h][t].data(), k.as_view()[h][t].data() + D),
                 std::vector<float>(v.as_view()[h][t].data(), v.as_view()[h][t].data() + Dv)});
        next_position += n;
        fuzz::stats::count("append");
      }
    } else {  // compact to a random ascending subset of each head (sometimes invalid)
      kv::selection sel;
      for (std::int64_t h = 0; h < cfg.Hkv; ++h) {
        std::vector<std::int64_t> keep;
        for (std::int64_t i = 0; i < c.length(h); ++i)
          if (in.ConsumeBool()) keep.push_back(i);
        sel.heads.push_back(keep);
      }
      const int bad = in.ConsumeIntegralInRange<int>(0, 15);  // 0: out of range, 1: not ascending, 2: head count
      if (bad == 0 && !sel.heads.empty()) sel.heads[0].push_back(c.length(0) + 3);
      if (bad == 1 && !sel.heads.empty() && sel.heads[0].size() >= 1) sel.heads[0].push_back(sel.heads[0].front());
      if (bad == 2) sel.heads.emplace_back();
      try {
        c.compact(sel);
      } catch (const mnemo::error&) {
        threw = true;
      }
      if (!threw) {
        for (std::size_t h = 0; h < shadow.size(); ++h) {
          std::vector<token> kept;
          for (std::int64_t i : sel.heads[h]) kept.push_back(shadow[h][static_cast<std::size_t>(i)]);
          shadow[h] = std::move(kept);
        }
        // exactness: each kept slot reads back as it did before the compaction
        const snapshot after = take(c);
        for (std::size_t h = 0; h < sel.heads.size(); ++h)
          for (std::size_t i = 0; i < sel.heads[h].size(); ++i) {
            const auto old = static_cast<std::size_t>(sel.heads[h][i]);
            fuzz::check(std::memcmp(&after.k[h][i * D], &before.k[h][old * D], D * sizeof(float)) == 0 &&
                            std::memcmp(&after.v[h][i * Dv], &before.v[h][old * Dv], Dv * sizeof(float)) == 0,
                        "a kept slot changed in compaction");
          }
        fuzz::stats::count("compact");
      }
    }
    const snapshot now = take(c);
    if (threw) {
      fuzz::stats::count("rejected step");
      fuzz::check(now == before, "a rejected call changed the cache");
    }
    check_against_shadow(c, now, shadow);
  }
  return 0;
}
