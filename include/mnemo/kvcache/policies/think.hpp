// mnemo/kvcache/policies/think.hpp — ThinK: prune key channels, not tokens.
//
// Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning" (2024). Query-key products
// concentrate on few channels; a channel c of kv head h contributes to the window queries' logits
// roughly in proportion to
//
//   score_h,c = (mean over the window queries and the group's query heads of q_c^2)
//             x (mean over all L keys of k_c^2)
//   kept      = the `budget` channels of highest score (ascending); the others are zeroed
//
// (kvpress's ThinKPress: the product of the two mean squares, a separable form of ||q_c k_c||.)
// Returns the kept channels as a selection over channels (selection.heads[h] = kept channel
// indices) and writes the pruned keys (k with the dropped channels set to 0). Channels, not
// tokens: it composes with any token policy. Golden: kv_think, kv_think_b2.
//
// Decoding (think::decoder): the channel set chosen at prefill stays; every new key has the same
// channels zeroed before it is appended (O(D) per token), so the whole cache keeps one channel set
// per head and q . k over it equals q restricted to the kept channels . k.
#pragma once

#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct think {
  static constexpr std::string_view name = "think";

  // scores [Hkv, D] from observation.q [Hq, window, D] and observation.k [Hkv, L, D].
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::think::scores";
    const obs_dims d = detail::check(fn, o, true, false);
    detail::require(!out.empty(), fn, ": scores [Hkv, D] must be a non-empty view");
    detail::require_shape(fn, "scores", out, {d.Hkv, d.D}, " [Hkv, D]");
    const std::int64_t G = d.group();
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk)
      for (std::int64_t c = 0; c < d.D; ++c) {
        double qq = 0, kk = 0;
        for (std::int64_t g = 0; g < G; ++g)
          for (std::int64_t i = 0; i < d.Lw; ++i) qq += static_cast<double>(o.q(hk * G + g, i, c)) * o.q(hk * G + g, i, c);
        for (std::int64_t j = 0; j < d.L; ++j) kk += static_cast<double>(o.k(hk, j, c)) * o.k(hk, j, c);
        out(hk, c) = static_cast<float>(qq / static_cast<double>(G * d.Lw) * (kk / static_cast<double>(d.L)));
      }
  }

  // The kept key channels of every kv head (ascending): `budget` channels of D. ThinK selects
  // channels, not slots (policy_traits<think>::selects is channels): apply it with prune.
  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::think::select";
    const obs_dims d = detail::check(fn, o, true, false);
    detail::require(budget >= 0 && budget <= d.D, fn, ": budget (key channels kept) must be in [0, D = ", d.D, "], got ",
                    budget);
    tensor<float, 2> s({d.Hkv, d.D});
    scores(o, s);
    return top_budget(s, budget);
  }

  // k_out [Hkv, L, D] = k with the channels `channels` does not keep set to 0 (k_out may be k).
  static void prune(view<const float, 3> k, const selection& channels, view<float, 3> k_out) {
    constexpr const char* fn = "kvcache::policies::think::prune";
    detail::require(!k.empty() && !k_out.empty(), fn, ": k and k_out must be non-empty views");
    detail::require_shape(fn, "k_out", k_out, k.shape(), " (the shape of k)");
    validate(fn, channels, std::vector<std::int64_t>(static_cast<std::size_t>(k.extent(0)), k.extent(2)));
    for (std::int64_t h = 0; h < k.extent(0); ++h) {
      const auto& kept = channels.heads[static_cast<std::size_t>(h)];
      for (std::int64_t j = 0; j < k.extent(1); ++j) {
        std::size_t next = 0;
        for (std::int64_t c = 0; c < k.extent(2); ++c) {
          const bool keep = next < kept.size() && kept[next] == c;
          if (keep) ++next;
          k_out(h, j, c) = keep ? k(h, j, c) : 0.0f;
        }
      }
    }
  }

  // Decode-time state: the prefill's kept channels, applied to every new key.
  class decoder {
   public:
    // channels: think::select's result for a cache of Hkv heads and head dim D.
    decoder(selection channels, std::int64_t D) : channels_(std::move(channels)) {
      detail::require(channels_.num_heads() >= 1, "kvcache::policies::think::decoder: channels must hold at least one head");
      validate("kvcache::policies::think::decoder", channels_,
               std::vector<std::int64_t>(static_cast<std::size_t>(channels_.num_heads()), D));
      D_ = D;
    }
    const selection& channels() const { return channels_; }
    // Zeroes the pruned channels of new keys k [Hkv, n, D] in place (before layer_cache::append).
    void apply(view<float, 3> k) const {
      constexpr const char* fn = "kvcache::policies::think::decoder::apply";
      detail::require(!k.empty(), fn, ": k [Hkv, n, D] must be a non-empty view");
      detail::require(k.extent(0) == channels_.num_heads() && k.extent(2) == D_, fn, ": k must have shape [Hkv = ",
                      channels_.num_heads(), ", n, D = ", D_, "], got ", shape_string(k.shape()));
      prune(k, channels_, k);
    }

   private:
    selection channels_;
    std::int64_t D_ = 0;
  };
};

}  // namespace mnemo::kvcache::policies
