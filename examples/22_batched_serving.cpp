// examples/22_batched_serving.cpp — continuous batching over a paged KV cache.
//
// What a serving engine does with one attention layer, step by step:
//   - requests arrive at different steps with prompts of different lengths; each starts as a
//     fork() of a shared system prompt (its pages are shared by reference count, not copied);
//   - every step, one attention::paged call serves every active sequence: a prefill chunk for a
//     newcomer (its whole prompt), one decode token for most, and a speculative verify of 4 draft
//     tokens for some, after which the rejected drafts are rolled back with truncate();
//   - each sequence keeps an H2O budget (heavy hitters + recent tokens): the call's column sums
//     feed the policy's tracker, and a sequence over its budget is compacted in place;
//   - finished requests release() their pages back to the pool.
// Every step is checked against per-sequence dense attention (attention::reference, double) over
// a plain copy of what the cache should hold, outputs and column sums; the program fails (exit
// code 1) on any mismatch and on pages that leak.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "mnemo/attention/attention.hpp"
#include "mnemo/attention/paged.hpp"
#include "mnemo/kvcache/paged.hpp"
#include "mnemo/kvcache/policies/h2o.hpp"

using namespace mnemo;
namespace attn = mnemo::attention;
namespace kv = mnemo::kvcache;

namespace {

constexpr std::int64_t Hkv = 2, Hq = 8, D = 32, page = 16, budget = 72, recent = 8, draft = 4;

// The model's projections, stood in for by deterministic random vectors of a token.
std::vector<float> vec(std::uint64_t seed, std::int64_t n) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> dist;
  std::vector<float> x(static_cast<std::size_t>(n));
  for (float& e : x) e = dist(gen);
  return x;
}

// What one sequence's cache should hold: K/V rows per kv head as stored (rounded to f16).
struct dense_copy {
  std::vector<std::vector<float>> k = std::vector<std::vector<float>>(Hkv), v = std::vector<std::vector<float>>(Hkv);
  std::int64_t length() const { return static_cast<std::int64_t>(k[0].size()) / D; }
  void append(const tensor<float, 3>& kn, const tensor<float, 3>& vn) {
    for (std::int64_t h = 0; h < Hkv; ++h)
      for (std::int64_t t = 0; t < kn.extent(1); ++t)
        for (std::int64_t c = 0; c < D; ++c) {
          k[h].push_back(to_float(f16(kn(h, t, c))));
          v[h].push_back(to_float(f16(vn(h, t, c))));
        }
  }
  void truncate(std::int64_t n) {
    for (std::int64_t h = 0; h < Hkv; ++h) k[h].resize(k[h].size() - n * D), v[h].resize(v[h].size() - n * D);
  }
  void compact(const kv::selection& sel) {
    for (std::int64_t h = 0; h < Hkv; ++h) {
      std::vector<float> kk, vv;
      for (std::int64_t j : sel.heads[static_cast<std::size_t>(h)]) {
        kk.insert(kk.end(), k[h].begin() + j * D, k[h].begin() + (j + 1) * D);
        vv.insert(vv.end(), v[h].begin() + j * D, v[h].begin() + (j + 1) * D);
      }
      k[h] = kk, v[h] = vv;
    }
  }
};

struct request {
  request(std::int64_t id_, std::int64_t arrive_, std::int64_t prompt_, std::int64_t generate_)
      : id(id_), arrive(arrive_), prompt(prompt_), generate(generate_) {}
  std::int64_t id, arrive, prompt, generate;
  kv::paged_cache::sequence seq = -1;
  std::int64_t produced = 0;  // tokens generated so far
  std::int64_t next_token = 0;
  dense_copy copy;
  kv::policies::h2o::decoder tracker{Hkv, recent};
  bool active() const { return seq >= 0; }
};

// K/V of n new tokens of request r ([Hkv, n, D] each).
void tokens(const request& r, std::int64_t first, std::int64_t n, tensor<float, 3>& k, tensor<float, 3>& v) {
  k = tensor<float, 3>({Hkv, n, D});
  v = tensor<float, 3>({Hkv, n, D});
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t h = 0; h < Hkv; ++h) {
      const auto kt = vec(1000003 * r.id + 7919 * (first + t) + 2 * h, D), vt = vec(1000003 * r.id + 7919 * (first + t) + 2 * h + 1, D);
      std::copy(kt.begin(), kt.end(), k.as_view().ptr(h, t));
      std::copy(vt.begin(), vt.end(), v.as_view().ptr(h, t));
    }
}

}  // namespace

int main() {
  kv::paged_cache cache({.kind = kv::storage::f16, .Hkv = Hkv, .D = D, .page_size = page, .num_pages = 256});
  // The shared system prompt: 40 tokens, computed once.
  request system{0, 0, 40, 0};
  system.seq = cache.create();
  {
    tensor<float, 3> k, v;
    tokens(system, 0, system.prompt, k, v);
    cache.append(system.seq, cview(k), cview(v));
    system.copy.append(k, v);
  }
  std::vector<request> reqs = {{1, 0, 9, 30}, {2, 0, 23, 12}, {3, 1, 3, 45}, {4, 2, 17, 8},
                               {5, 3, 30, 25}, {6, 5, 1, 60}, {7, 6, 12, 20}, {8, 8, 40, 35}};
  double max_out_err = 0, max_sum_err = 0;
  std::int64_t steps = 0, verifies = 0, rolled_back = 0, compactions = 0, max_pages_used = 0;
  for (std::int64_t step = 0;; ++step) {
    // Admit the requests that arrive now; retire the finished ones.
    for (request& r : reqs) {
      if (r.arrive == step) {
        r.seq = cache.fork(system.seq);
        r.copy = system.copy;
        for (std::int64_t h = 0; h < Hkv; ++h)
          for (std::int64_t j = 0; j < system.prompt; ++j) r.tracker.append(h);
      }
      if (r.active() && r.produced >= r.generate) {
        cache.release(r.seq);
        r.seq = -2;  // done
      }
    }
    std::vector<request*> batch;
    for (request& r : reqs)
      if (r.active()) batch.push_back(&r);
    if (batch.empty()) {
      if (std::all_of(reqs.begin(), reqs.end(), [](const request& r) { return r.seq == -2; })) break;
      continue;
    }
    ++steps;

    // Each sequence's new tokens this step: its prompt, 1 decode token, or 4 drafts to verify.
    const std::int64_t B = static_cast<std::int64_t>(batch.size());
    std::vector<std::int64_t> q_len(B);
    std::vector<char> is_prompt(B), is_verify(B);
    for (std::int64_t b = 0; b < B; ++b) {
      request& r = *batch[b];
      const bool fresh = r.copy.length() == system.prompt && r.next_token == 0;
      const bool verify = !fresh && r.id % 2 == 1 && step % 3 == 0;
      q_len[b] = fresh ? r.prompt : verify ? draft : 1;
      is_prompt[b] = fresh, is_verify[b] = verify;
      tensor<float, 3> k, v;
      tokens(r, r.next_token, q_len[b], k, v);
      cache.append(r.seq, cview(k), cview(v));
      r.copy.append(k, v);
      for (std::int64_t h = 0; h < Hkv; ++h)
        for (std::int64_t t = 0; t < q_len[b]; ++t) r.tracker.append(h);
    }
    max_pages_used = std::max(max_pages_used, cache.num_pages() - cache.free_pages());

    // The batch in attention::paged's layout: packed queries, block tables, lengths.
    std::int64_t T = 0, keys = 0, max_pages = 1;
    for (std::int64_t b = 0; b < B; ++b) {
      T += q_len[b];
      keys += batch[b]->copy.length();
      max_pages = std::max<std::int64_t>(max_pages, static_cast<std::int64_t>(cache.block_table(batch[b]->seq).size()));
    }
    tensor<float, 3> q({T, Hq, D}), out({T, Hq, D});
    tensor<std::int64_t, 2> table({B, max_pages});
    tensor<std::int64_t, 1> cu({B + 1}), lens({B});
    tensor<float, 2> sums({Hq, keys});
    std::fill_n(table.data(), table.size(), std::int64_t{0});
    cu(0) = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      const request& r = *batch[b];
      const auto pages = cache.block_table(r.seq);
      for (std::size_t p = 0; p < pages.size(); ++p) table(b, static_cast<std::int64_t>(p)) = pages[p];
      lens(b) = r.copy.length();
      cu(b + 1) = cu(b) + q_len[b];
      for (std::int64_t i = 0; i < q_len[b]; ++i) {
        const auto qi = vec(77 * r.id + 1000 * (r.next_token + i) + 5, Hq * D);
        std::copy(qi.begin(), qi.end(), &q(cu(b) + i, 0, 0));
      }
    }
    const attn::paged_kv<f16> pool{cache.keys<f16>().permute({0, 2, 1, 3}), cache.values<f16>().permute({0, 2, 1, 3}),
                                   cview(table), cview(lens)};
    attn::paged(cview(q), cview(cu), pool, out.as_view(), {}, attn::mods::causal{}, {}, sums.as_view());

    // Check every sequence against dense attention over its copy, then advance it.
    std::int64_t k0 = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      request& r = *batch[b];
      const std::int64_t L = r.copy.length(), Lq = q_len[b];
      tensor<float, 4> q4({1, Hq, Lq, D}), k4({1, Hkv, L, D}), v4({1, Hkv, L, D}), o4({1, Hq, Lq, D});
      tensor<float, 3> cs({1, Hq, L});
      for (std::int64_t h = 0; h < Hq; ++h)
        for (std::int64_t i = 0; i < Lq; ++i) std::copy_n(&q(cu(b) + i, h, 0), D, &q4(0, h, i, 0));
      for (std::int64_t h = 0; h < Hkv; ++h) {
        std::copy(r.copy.k[h].begin(), r.copy.k[h].end(), &k4(0, h, 0, 0));
        std::copy(r.copy.v[h].begin(), r.copy.v[h].end(), &v4(0, h, 0, 0));
      }
      attn::reference(cview(q4), cview(k4), cview(v4), o4.as_view(), {}, attn::mods::causal{}, {},
                      attn::column_sums{cs.as_view(), 0});
      for (std::int64_t h = 0; h < Hq; ++h) {
        for (std::int64_t i = 0; i < Lq; ++i)
          for (std::int64_t c = 0; c < D; ++c)
            max_out_err = std::max<double>(max_out_err, std::abs(out(cu(b) + i, h, c) - o4(0, h, i, c)));
        for (std::int64_t j = 0; j < L; ++j) max_sum_err = std::max<double>(max_sum_err, std::abs(sums(h, k0 + j) - cs(0, h, j)));
      }
      // H2O: this step's attention, then a compaction when over budget.
      const view<const float, 2> probs(&sums(0, k0), {Hq, L}, {keys, 1});
      r.tracker.observe(probs);
      k0 += L;
      // A verify accepts the first (id + step) % 4 drafts and rolls the others back.
      std::int64_t accepted = Lq;
      if (is_verify[b]) {
        accepted = (r.id + step) % draft;
        const std::int64_t rejected = draft - accepted;
        cache.truncate(r.seq, rejected);
        r.copy.truncate(rejected);
        kv::selection keep;
        for (std::int64_t h = 0; h < Hkv; ++h) {
          keep.heads.emplace_back(static_cast<std::size_t>(r.tracker.length(h) - rejected));
          for (std::size_t j = 0; j < keep.heads.back().size(); ++j) keep.heads.back()[j] = static_cast<std::int64_t>(j);
        }
        r.tracker.compact(keep);
        ++verifies;
        rolled_back += rejected;
      }
      r.next_token += accepted;
      if (!is_prompt[b]) r.produced += accepted;
      if (kv::policies::should_compress(r.tracker.lengths(), budget)) {
        const kv::selection sel = r.tracker.select(budget);
        cache.compact(r.seq, sel);
        r.copy.compact(sel);
        r.tracker.compact(sel);
        ++compactions;
      }
    }
  }
  cache.release(system.seq);
  std::printf("22_batched_serving: %lld steps, 8 requests, %lld verifies (%lld drafts rolled back), %lld H2O compactions\n",
              static_cast<long long>(steps), static_cast<long long>(verifies), static_cast<long long>(rolled_back),
              static_cast<long long>(compactions));
  std::printf("  max |out - dense| = %.2e, max |column sums - dense| = %.2e, pages in use at most %lld of %lld, "
              "free at the end %lld\n",
              max_out_err, max_sum_err, static_cast<long long>(max_pages_used), static_cast<long long>(cache.num_pages()),
              static_cast<long long>(cache.free_pages()));
  const bool ok = max_out_err < 1e-4 && max_sum_err < 1e-4 && cache.free_pages() == cache.num_pages() && verifies > 0 &&
                  compactions > 0;
  std::printf("%s\n", ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
