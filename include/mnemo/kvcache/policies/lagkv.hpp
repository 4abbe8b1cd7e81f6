// mnemo/kvcache/policies/lagkv.hpp — LagKV: score tokens against the next chunk of the cache,
// attention-free.
//
// Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important"
// (2025). A token matters when its key / value stands out from what follows it. After n_sink
// sinks, the slots are cut into chunks of `lag`: c_0 = [n_sink, n_sink + lag), c_1, ..., c_{m-1}
// (m = floor((L - n_sink) / lag) full chunks), and chunk c_i is scored against chunk c_{i+1}, its
// lag reference. For X = K (then V) of one kv head, channel c, slot j in c_i:
//
//   min_c = min_{t in c_{i+1}} X[t, c],   max_c = max_{t in c_{i+1}} X[t, c]
//   Xn[j, c] = (X[j, c] - min_c) / (max_c - min_c)                 (a constant reference channel,
//                                                                   max_c = min_c, divides by 1)
//   sigma_X(j) = std_c Xn[j, c]                                   (unbiased, over the D channels; 0 if D = 1)
//   s_j = softmax_{t in c_i}(sigma_K)(j) + v_weight softmax_{t in c_i}(sigma_V)(j)
//
// (the reference code, AI-Lab-China-Merchants-Bank/LagKV lag_kv.py, and kvpress's LagKVPress:
// softmax within each chunk; kvpress halves the sum, the same ranking). Chunks c_0 .. c_{m-2} are
// scored; the sinks and the tail [n_sink + (m - 1) lag, L) (the last full chunk, which has no
// reference, and the partial one after it) are always kept. When L < n_sink + 2 lag no chunk has a
// reference and the kept set is the sinks and the newest slots.
//
// Kept set with b slots per kv head: each scored chunk keeps its top slots by s_j, the chunks
// sharing b - n_sink - |tail| equally (the paper keeps a fixed fraction of every chunk; the first
// chunks take the remainder of the division, one slot each). Written as one ranking for
// top_budget (kvpress's rank scores, kvpress's `cross_scoring = false`):
//
//   scores: sink 2;  tail slot j: 1 + (j - tail_start + 1) / (|tail| + 1)  (newest higher);
//           chunk slot j: rank_j / lag, rank_j = number of slots of its chunk with a lower s
//           (ties: the lower slot ranks lower)
//   kept  = top_budget(scores, b)
//
// so when b < n_sink + |tail| the sinks come first and then the newest tail slots (kvpress scores
// sinks and tail alike, keeping the oldest tail slots first).
// Needs observation.k and observation.v only. Decoding: the rule needs nothing but the cache's K
// and V, so a decoder re-runs select on the cache's views on overflow; no per-step state.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string_view>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct lagkv {
  static constexpr std::string_view name = "lagkv";

  std::int64_t n_sink = 4;  // kvpress's default (16 in the LagKV code)
  std::int64_t lag = 128;   // chunk size (kvpress's default; 1024 in the LagKV code)
  double v_weight = 1.0;    // weight of the values' score (score_v_ratio)

  // The chunk layout of L slots: the number of scored chunks (the first starts at n_sink) and the
  // first slot of the always-kept tail (L when L <= n_sink).
  struct layout {
    std::int64_t chunks = 0, tail = 0;
  };
  layout chunks_of(std::int64_t L) const {
    if (L <= n_sink) return {0, L};
    const std::int64_t m = (L - n_sink) / lag;
    const std::int64_t scored = std::max<std::int64_t>(0, m - 1);
    return {scored, n_sink + scored * lag};
  }

  // s_j of every scored slot [Hkv, L] (the equations above); sinks and tail get +inf.
  void raw_scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::lagkv::raw_scores";
    const obs_dims d = check_obs(fn, o);
    detail::check_scores(fn, out, d.Hkv, d.L);
    raw(o, d, out);
  }

  // The ranking [Hkv, L] of the header (sinks, newest tail, then equal shares of the chunks).
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::lagkv::scores";
    const obs_dims d = check_obs(fn, o);
    detail::check_scores(fn, out, d.Hkv, d.L);
    raw(o, d, out);
    const layout c = chunks_of(d.L);
    std::vector<std::int64_t> order(static_cast<std::size_t>(lag));
    std::vector<float> rank(static_cast<std::size_t>(lag));
    for (std::int64_t h = 0; h < d.Hkv; ++h) {
      for (std::int64_t i = 0; i < c.chunks; ++i) {
        const std::int64_t s0 = n_sink + i * lag;
        std::iota(order.begin(), order.end(), std::int64_t{0});
        std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return out(h, s0 + a) < out(h, s0 + b); });
        for (std::int64_t r = 0; r < lag; ++r)
          rank[static_cast<std::size_t>(order[static_cast<std::size_t>(r)])] = static_cast<float>(r) / static_cast<float>(lag);
        for (std::int64_t t = 0; t < lag; ++t) out(h, s0 + t) = rank[static_cast<std::size_t>(t)];
      }
      const std::int64_t tail_len = d.L - c.tail;
      for (std::int64_t j = 0; j < d.L; ++j) {
        if (j < std::min(n_sink, d.L)) out(h, j) = 2.0f;
        else if (j >= c.tail)
          out(h, j) = 1.0f + static_cast<float>(j - c.tail + 1) / static_cast<float>(tail_len + 1);
      }
    }
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::lagkv::select";
    const obs_dims d = check_obs(fn, o);
    detail::check_budget(fn, budget);
    if (d.L == 0) return selection{rows_of_nothing(d.Hkv)};
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    return top_budget(s, budget);
  }

 private:
  static std::vector<std::vector<std::int64_t>> rows_of_nothing(std::int64_t Hkv) {
    return std::vector<std::vector<std::int64_t>>(static_cast<std::size_t>(Hkv));
  }

  obs_dims check_obs(const char* fn, const observation& o) const {
    const obs_dims d = detail::check(fn, o, false, false);
    detail::require(!o.v.empty(), fn, ": observation.v [Hkv, L, Dv] must be a non-empty view (LagKV scores keys and values)");
    detail::require(n_sink >= 0, fn, ": n_sink must be >= 0, got ", n_sink);
    detail::require(lag >= 1, fn, ": lag must be >= 1, got ", lag);
    detail::require(v_weight >= 0, fn, ": v_weight must be >= 0, got ", v_weight);
    return d;
  }

  // sigma of every slot of chunk [s0, s0 + lag) of one head of x [Hkv, L, D] against the next chunk.
  void chunk_sigma(view<const float, 3> x, std::int64_t h, std::int64_t s0, std::vector<double>& sigma) const {
    const std::int64_t D = x.extent(2);
    std::vector<double> lo(static_cast<std::size_t>(D), std::numeric_limits<double>::infinity());
    std::vector<double> hi(static_cast<std::size_t>(D), -std::numeric_limits<double>::infinity());
    for (std::int64_t t = s0 + lag; t < s0 + 2 * lag; ++t) {
      const float* row = x.ptr(h, t);
      for (std::int64_t c = 0; c < D; ++c) {
        lo[static_cast<std::size_t>(c)] = std::min(lo[static_cast<std::size_t>(c)], static_cast<double>(row[c]));
        hi[static_cast<std::size_t>(c)] = std::max(hi[static_cast<std::size_t>(c)], static_cast<double>(row[c]));
      }
    }
    sigma.assign(static_cast<std::size_t>(lag), 0.0);
    if (D < 2) return;
    for (std::int64_t t = 0; t < lag; ++t) {
      const float* row = x.ptr(h, s0 + t);
      double mean = 0, sq = 0;
      for (std::int64_t c = 0; c < D; ++c) {
        const double range = hi[static_cast<std::size_t>(c)] - lo[static_cast<std::size_t>(c)];
        mean += (row[c] - lo[static_cast<std::size_t>(c)]) / (range > 0 ? range : 1.0);
      }
      mean /= static_cast<double>(D);
      for (std::int64_t c = 0; c < D; ++c) {
        const double range = hi[static_cast<std::size_t>(c)] - lo[static_cast<std::size_t>(c)];
        const double z = (row[c] - lo[static_cast<std::size_t>(c)]) / (range > 0 ? range : 1.0) - mean;
        sq += z * z;
      }
      sigma[static_cast<std::size_t>(t)] = std::sqrt(sq / static_cast<double>(D - 1));
    }
  }

  static void softmax(std::vector<double>& x) {
    const double m = *std::max_element(x.begin(), x.end());
    double sum = 0;
    for (double& v : x) sum += (v = std::exp(v - m));
    for (double& v : x) v /= sum;
  }

  void raw(const observation& o, const obs_dims& d, view<float, 2> out) const {
    const layout c = chunks_of(d.L);
    std::vector<double> sk, sv;
    for (std::int64_t h = 0; h < d.Hkv; ++h) {
      for (std::int64_t j = 0; j < d.L; ++j) out(h, j) = detail::keep_always;
      for (std::int64_t i = 0; i < c.chunks; ++i) {
        const std::int64_t s0 = n_sink + i * lag;
        chunk_sigma(o.k, h, s0, sk);
        chunk_sigma(o.v, h, s0, sv);
        softmax(sk);
        softmax(sv);
        for (std::int64_t t = 0; t < lag; ++t)
          out(h, s0 + t) = static_cast<float>(sk[static_cast<std::size_t>(t)] + v_weight * sv[static_cast<std::size_t>(t)]);
      }
    }
  }
};

}  // namespace mnemo::kvcache::policies
