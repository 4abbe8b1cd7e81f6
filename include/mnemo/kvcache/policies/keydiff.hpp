// mnemo/kvcache/policies/keydiff.hpp — keep the keys least similar to the average key.
//
// Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
// Resource-Constrained Environments" (2025): keys that point away from the bulk of the keys are
// the distinctive ones attention picks out, so with the anchor a_h = mean_j k_j of a head,
//
//   score_j = -cos(k_j, a_h) = -(k_j . a_h) / (||k_j|| ||a_h||)       (higher = more distinct)
//
// Needs the keys only, no attention. Decoding: the anchor is a running sum (O(D) per appended
// key); the scores depend on the current anchor, so they are computed when the cache is
// compressed (O(L D) per compression, amortised over the steps between compressions).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct keydiff {
  // A key of zero norm (or a zero anchor) has cosine 0.
  static float score_of(const float* k, const double* anchor, std::int64_t D) {
    double dot = 0, kk = 0, aa = 0;
    for (std::int64_t c = 0; c < D; ++c) {
      dot += k[c] * anchor[c];
      kk += static_cast<double>(k[c]) * k[c];
      aa += anchor[c] * anchor[c];
    }
    const double den = std::sqrt(kk * aa);
    return den > 0 ? static_cast<float>(-dot / den) : 0.0f;
  }

  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::keydiff::scores";
    const obs_dims d = detail::check(fn, o, false, false);
    detail::check_scores(fn, out, d.Hkv, d.L);
    std::vector<double> anchor(static_cast<std::size_t>(d.D));
    for (std::int64_t h = 0; h < d.Hkv; ++h) {
      std::fill(anchor.begin(), anchor.end(), 0.0);
      for (std::int64_t j = 0; j < d.L; ++j)
        for (std::int64_t c = 0; c < d.D; ++c) anchor[static_cast<std::size_t>(c)] += o.k(h, j, c);
      for (std::int64_t j = 0; j < d.L; ++j) out(h, j) = score_of(o.k.ptr(h, j), anchor.data(), d.D);
    }
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::keydiff::select";
    const obs_dims d = detail::check(fn, o, false, false);
    detail::check_budget(fn, budget);
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    return top_budget(s, budget);
  }

  // Decode-time state: the running key sum per head. select() reads the keys of the current
  // slots, k [Hkv, >= max length, D] (the cache's dense keys), and scores them against it.
  class decoder {
   public:
    decoder(std::int64_t Hkv, std::int64_t D)
        : D_(D), sum_(static_cast<std::size_t>(Hkv * D)), len_(static_cast<std::size_t>(Hkv)) {}
    void append(std::int64_t h, const float* k) {
      for (std::int64_t c = 0; c < D_; ++c) sum_[static_cast<std::size_t>(h * D_ + c)] += k[c];
      ++len_[static_cast<std::size_t>(h)];
    }
    selection select(view<const float, 3> k, std::int64_t budget, std::int64_t sinks = 0, std::int64_t recent = 0) const {
      constexpr const char* fn = "kvcache::policies::keydiff::decoder::select";
      detail::check_budget(fn, budget, sinks + recent, " (sinks + recent)");
      detail::require(!k.empty() && k.extent(0) == num_heads() && k.extent(2) == D_, fn, ": k must have shape [Hkv = ",
                      num_heads(), ", L, D = ", D_, "], got ", shape_string(k.shape()));
      selection sel;
      std::vector<float> s, scratch;
      for (std::int64_t h = 0; h < num_heads(); ++h) {
        const std::int64_t n = len_[static_cast<std::size_t>(h)];
        detail::require(k.extent(1) >= n, fn, ": k.shape[1] must be >= length(", h, ") = ", n);
        s.resize(static_cast<std::size_t>(n));
        for (std::int64_t j = 0; j < n; ++j) s[static_cast<std::size_t>(j)] = score_of(k.ptr(h, j), &sum_[static_cast<std::size_t>(h * D_)], D_);
        sel.heads.push_back(detail::top_row_forced(s.data(), n, budget, sinks, recent, scratch));
      }
      return sel;
    }
    // Removes the keys that compaction drops from the running sum: k [Hkv, >= L, D] before compaction.
    void compact(view<const float, 3> k, const selection& sel) {
      validate("kvcache::policies::keydiff::decoder::compact", sel, len_);
      for (std::int64_t h = 0; h < num_heads(); ++h) {
        const auto& kept = sel.heads[static_cast<std::size_t>(h)];
        std::size_t next = 0;
        for (std::int64_t j = 0; j < len_[static_cast<std::size_t>(h)]; ++j) {
          if (next < kept.size() && kept[next] == j) {
            ++next;
            continue;
          }
          for (std::int64_t c = 0; c < D_; ++c) sum_[static_cast<std::size_t>(h * D_ + c)] -= k(h, j, c);
        }
        len_[static_cast<std::size_t>(h)] = static_cast<std::int64_t>(kept.size());
      }
    }
    std::int64_t num_heads() const { return static_cast<std::int64_t>(len_.size()); }
    const std::vector<std::int64_t>& lengths() const { return len_; }

   private:
    std::int64_t D_;
    std::vector<double> sum_;  // [Hkv, D]
    std::vector<std::int64_t> len_;
  };
};

}  // namespace mnemo::kvcache::policies
