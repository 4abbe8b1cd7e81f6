// bench/serving_rows.cpp — attention over a paged KV pool, as a serving engine calls it.
//
//   serving/paged_batch/B:16/tokens:<N>/page:<S>/kv:{f32,f16}/threads:..
//       one decode step (Lq = 1 per sequence) of 16 sequences whose lengths are spread
//       geometrically from 512 to 32768 (133,640 tokens; small size: 64 to 4096), Hq = 32,
//       Hkv = 8, D = 128, pages of S tokens at shuffled ids in kvcache::paged_cache's layout
//       ([num_pages, Hkv, S, D]: each head's rows of a page contiguous): one attention::paged call.
//   serving/paged_single/Lk:<Lk>/page:<S>/kv:..      one sequence of Lk keys in pages, to hold
//       against decode/split_kv at the same Lk (the same kernel over contiguous K/V).
//   serving/cache_batch/B:16/tokens:<N>/page:<S>/kv:{f16,int8,int4}/threads:..
//       the batch of paged_batch held by a kvcache::paged_cache (appended round-robin in slices of
//       512 tokens, so the sequences' pages interleave) and attended with kvcache::paged_attention:
//       the serving path for every storage kind. bytes/s counts what the cache holds for those
//       tokens (codes, per-page key scales and minimums, per-token value scales and minimums, the
//       f32 tails of partly filled pages).
//
// Both are memory-bound like decode: bytes/s counts the compulsory K/V traffic (every key and
// value once, in its storage type) plus q and out, the figure to hold against machine/stream_read
// at the same thread count.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/paged.hpp"
#include "mnemo/kvcache/paged.hpp"
#include "mnemo/kvcache/paged_attention.hpp"

namespace mnemo::bench {
namespace {

constexpr std::int64_t Hq = 32, Hkv = 8, D = 128;

// A paged pool holding sequences of the given lengths, each at shuffled page ids, and their
// decode-step queries.
template <class KV>
struct paged_batch {
  std::int64_t S, B, tokens = 0;
  tensor<KV, 4> k_pages, v_pages;  // [P, Hkv, S, D], as kvcache::paged_cache holds them
  tensor<std::int64_t, 2> table;   // [B, max_pages]
  tensor<std::int64_t, 1> lens, cu;
  tensor<float, 3> q, out;  // [B, Hq, D]
  tensor<float, 2> lse;     // [B, Hq]

  paged_batch(const std::vector<std::int64_t>& lengths, std::int64_t page)
      : S(page), B(static_cast<std::int64_t>(lengths.size())), k_pages({0, 0, 0, 0}), v_pages({0, 0, 0, 0}),
        table({0, 0}), lens({B}), cu({B + 1}), q({B, Hq, D}), out({B, Hq, D}), lse({B, Hq}) {
    std::int64_t pages = 0, max_pages = 1;
    for (std::int64_t len : lengths) {
      tokens += len;
      pages += (len + S - 1) / S;
      max_pages = std::max(max_pages, (len + S - 1) / S);
    }
    k_pages = tensor<KV, 4>({pages, Hkv, S, D});
    v_pages = tensor<KV, 4>({pages, Hkv, S, D});
    fill_random(k_pages, 11);
    fill_random(v_pages, 12);
    fill_random(q, 13);
    std::vector<std::int64_t> ids(static_cast<std::size_t>(pages));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937_64(14));
    table = tensor<std::int64_t, 2>({B, max_pages});
    std::fill_n(table.data(), table.size(), std::int64_t{0});
    std::size_t next = 0;
    cu(0) = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      lens(b) = lengths[static_cast<std::size_t>(b)];
      cu(b + 1) = b + 1;
      for (std::int64_t p = 0; p < (lens(b) + S - 1) / S; ++p) table(b, p) = ids[next++];
    }
  }
  attention::paged_kv<KV> kv() const {
    return {cview(k_pages).permute({0, 2, 1, 3}), cview(v_pages).permute({0, 2, 1, 3}), cview(table), cview(lens)};
  }
  double bytes() const {
    return static_cast<double>(tokens * Hkv * 2 * D) * sizeof(KV) + static_cast<double>(B * Hq * 2 * D) * sizeof(float);
  }
};

// 16 lengths from `lo` to `hi`, geometrically spaced, rounded to integers (not to pages).
std::vector<std::int64_t> spread(std::int64_t lo, std::int64_t hi) {
  std::vector<std::int64_t> out;
  for (int i = 0; i < 16; ++i)
    out.push_back(std::llround(static_cast<double>(lo) * std::pow(static_cast<double>(hi) / lo, i / 15.0)));
  return out;
}

template <class KV>
void paged_row(benchmark::State& state, const std::vector<std::int64_t>& lengths, std::int64_t page, int threads) {
  paged_batch<KV> in(lengths, page);
  attention::decode_workspace ws;
  attention::options opt;
  opt.threads = threads;
  for (auto _ : state) {
    attention::paged<KV>(cview(in.q), cview(in.cu), in.kv(), in.out.as_view(), in.lse.as_view(),
                         attention::mods::none{}, opt, {}, &ws);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_rate_counters(state, 4.0 * static_cast<double>(in.tokens * Hq * D), in.bytes());
  state.SetLabel("B=" + std::to_string(in.B) + " tokens=" + std::to_string(in.tokens) + " page=" +
                 std::to_string(page) + " kv=" + dtype_name<KV>() + " threads=" + std::to_string(threads));
}

template <class KV>
void register_kv(const char* kv) {
  const std::int64_t lo = full_size() ? 512 : tiny_size() ? 16 : 64, hi = full_size() ? 32768 : tiny_size() ? 256 : 4096;
  const std::vector<std::int64_t> batch = spread(lo, hi);
  const std::int64_t tokens = std::accumulate(batch.begin(), batch.end(), std::int64_t{0});
  for (const std::int64_t page : {16, 128})
    for (int t : thread_counts()) {
      register_row(row_name("serving", "paged_batch",
                            {{"B", "16"}, {"tokens", std::to_string(tokens)}, {"page", std::to_string(page)},
                             {"kv", kv}, {"threads", std::to_string(t)}}),
                   [batch, page, t](benchmark::State& state) {
                     if (threads_available(state, t)) paged_row<KV>(state, batch, page, t);
                   });
      for (const shape& s : decode_shapes())
        register_row(row_name("serving", "paged_single",
                              {{"Lk", std::to_string(s.Lk)}, {"page", std::to_string(page)}, {"kv", kv},
                               {"threads", std::to_string(t)}}),
                     [Lk = s.Lk, page, t](benchmark::State& state) {
                       if (threads_available(state, t)) paged_row<KV>(state, {Lk}, page, t);
                     });
    }
}

// The bytes a paged cache of `kind` holds for sequences of these lengths (see the header).
double cache_bytes(kvcache::storage kind, const std::vector<std::int64_t>& lengths, std::int64_t S, std::int64_t VG) {
  double total = 0;
  constexpr double f = sizeof(float);
  for (std::int64_t len : lengths) {
    if (!kvcache::is_quantized(kind)) {
      total += static_cast<double>(len * Hkv * 2 * D) * (kind == kvcache::storage::f32 ? 4.0 : 2.0);
      continue;
    }
    const std::int64_t sealed = len / S * S, tail = len - sealed, NG = (D + VG - 1) / VG;
    const std::int64_t row = kind == kvcache::storage::int8 ? D : (D + 1) / 2;
    total += static_cast<double>(Hkv) * (static_cast<double>(sealed) * (2.0 * static_cast<double>(row) + 2.0 * static_cast<double>(NG) * f) +
                                         static_cast<double>(sealed / S) * 2.0 * D * f + static_cast<double>(tail) * 2.0 * D * f);
  }
  return total;
}

void cache_row(benchmark::State& state, const std::vector<std::int64_t>& lengths, std::int64_t page,
               kvcache::storage kind, int threads) {
  const auto B = static_cast<std::int64_t>(lengths.size());
  std::int64_t pages = 0, tokens = 0;
  for (std::int64_t len : lengths) pages += (len + page - 1) / page, tokens += len;
  kvcache::paged_config cfg{.kind = kind, .Hkv = Hkv, .D = D, .Dv = D, .page_size = page, .num_pages = pages};
  kvcache::paged_cache c(cfg);
  std::vector<kvcache::paged_cache::sequence> seqs;
  for (std::int64_t b = 0; b < B; ++b) seqs.push_back(c.create());
  constexpr std::int64_t slice = 512;
  for (std::int64_t t0 = 0; t0 < lengths.back(); t0 += slice)
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = std::min(slice, lengths[static_cast<std::size_t>(b)] - t0);
      if (n <= 0) continue;
      tensor<float, 3> k({Hkv, n, D}), v({Hkv, n, D});
      fill_random(k, static_cast<std::uint64_t>(100 + 2 * b + t0));
      fill_random(v, static_cast<std::uint64_t>(101 + 2 * b + t0));
      c.append(seqs[static_cast<std::size_t>(b)], cview(k), cview(v));
    }
  tensor<float, 3> q({B, Hq, D}), out({B, Hq, D});
  tensor<float, 2> lse({B, Hq});
  tensor<std::int64_t, 1> cu({B + 1});
  for (std::int64_t b = 0; b <= B; ++b) cu(b) = b;
  fill_random(q, 13);
  attention::decode_workspace ws;
  attention::options opt;
  opt.threads = threads;
  for (auto _ : state) {
    kvcache::paged_attention(c, seqs, cview(q), cview(cu), out.as_view(), lse.as_view(), attention::mods::none{}, opt, {},
                             &ws);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_rate_counters(state, 4.0 * static_cast<double>(tokens * Hq * D),
                    cache_bytes(kind, lengths, page, cfg.value_group) + static_cast<double>(B * Hq * 2 * D) * sizeof(float));
  state.SetLabel("B=" + std::to_string(B) + " tokens=" + std::to_string(tokens) + " page=" + std::to_string(page) +
                 " kv=" + kvcache::storage_name(kind) + " threads=" + std::to_string(threads));
}

void register_cache_rows() {
  const std::int64_t lo = full_size() ? 512 : tiny_size() ? 16 : 64, hi = full_size() ? 32768 : tiny_size() ? 256 : 4096;
  const std::vector<std::int64_t> batch = spread(lo, hi);
  const std::int64_t tokens = std::accumulate(batch.begin(), batch.end(), std::int64_t{0});
  for (const kvcache::storage kind : {kvcache::storage::f16, kvcache::storage::int8, kvcache::storage::int4})
    for (int t : thread_counts()) {
      const std::int64_t page = 128;
      register_row(row_name("serving", "cache_batch",
                            {{"B", "16"}, {"tokens", std::to_string(tokens)}, {"page", std::to_string(page)},
                             {"kv", kvcache::storage_name(kind)}, {"threads", std::to_string(t)}}),
                   [batch, page, kind, t](benchmark::State& state) {
                     if (threads_available(state, t)) cache_row(state, batch, page, kind, t);
                   });
    }
}

const bool registered = [] {
  register_kv<float>("f32");
  register_kv<f16>("f16");
  register_cache_rows();
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
