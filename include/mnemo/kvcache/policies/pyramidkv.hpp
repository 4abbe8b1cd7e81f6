// mnemo/kvcache/policies/pyramidkv.hpp — PyramidKV: SnapKV with budgets shrinking up the layers.
//
// Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
// Funneling" (2024). Lower layers attend broadly, upper layers to a few tokens, so the budget
// decreases linearly with depth at the same average. With m layers, an average budget b and the
// observation window w (kept in every layer), the paper's non-window budgets form an arithmetic
// sequence
//
//   top    k_{m-1} = (b - w) / beta
//   bottom k_0     = 2 (b - w) - k_{m-1}
//   layer  k_l     = k_0 - (k_0 - k_{m-1}) l / (m - 1),     budget_l = w + k_l
//
// (mean over l: b). With the paper's beta = 20 the top layer gets 1/20 of the average's non-window
// share: at small budgets little more than the window (on all-MiniLM-L6-v2 at a 25% budget its
// relative output error was 1.15). So every layer's share is floored at `min_share` of the
// average's, k_{m-1} >= min_share (b - w): the sequence above with beta capped at 1 / min_share
// (the same straight line, flatter; the average is unchanged). min_share = 0 is the paper's.
// The shares are rounded so that they sum to exactly m (b - w) (largest remainders first, ties
// to the lower layer, which keeps the sequence non-increasing), and when b > w every layer gets
// at least one slot beyond its window (taken from the largest share).
//
// Within a layer the selection is SnapKV's (snapkv.hpp).
//
// Decoding (pyramidkv::decoder): SnapKV's decoder (a sliding window of the last w steps'
// attention) re-selecting with the layer's own budget on overflow, so every layer keeps the
// pyramid shape while generating. Per step the cost of snapkv::decoder.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"
#include "mnemo/kvcache/policies/snapkv.hpp"

namespace mnemo::kvcache::policies {

struct pyramidkv {
  static constexpr std::string_view name = "pyramidkv";
  snapkv base{};
  double beta = 20;        // ratio of the bottom layer's extra budget to the top layer's (the paper's)
  double min_share = 0.2;  // every layer's non-window budget >= min_share x the average's (0: the paper's)

  // Per-layer budgets of `layers` layers averaging exactly `average_budget` (>= window), top
  // layer last; every layer keeps more than the window when the average does.
  std::vector<std::int64_t> layer_budgets(std::int64_t layers, std::int64_t average_budget) const {
    constexpr const char* fn = "kvcache::policies::pyramidkv::layer_budgets";
    detail::require(layers >= 1, fn, ": layers must be >= 1, got ", layers);
    detail::require(beta >= 1, fn, ": beta must be >= 1, got ", beta);
    detail::require(min_share >= 0 && min_share <= 1, fn, ": min_share must be in [0, 1], got ", min_share);
    detail::check_budget(fn, average_budget, base.window, " (the observation window is kept in every layer)");
    const std::int64_t extra = average_budget - base.window;
    const double e = static_cast<double>(extra);
    const double b = min_share > 0 ? std::min(beta, 1.0 / min_share) : beta;
    const double top = e / b, bottom = 2 * e - top;
    std::vector<std::int64_t> k(static_cast<std::size_t>(layers));
    std::vector<std::pair<double, std::int64_t>> remainder;  // (fraction, layer)
    std::int64_t given = 0;
    for (std::int64_t l = 0; l < layers; ++l) {
      const double x =
          layers == 1 ? e : bottom - (bottom - top) * static_cast<double>(l) / static_cast<double>(layers - 1);
      const double f = std::floor(x);
      k[static_cast<std::size_t>(l)] = static_cast<std::int64_t>(f);
      given += static_cast<std::int64_t>(f);
      remainder.push_back({x - f, l});
    }
    std::stable_sort(remainder.begin(), remainder.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
    for (std::size_t i = 0; given < layers * extra && i < remainder.size(); ++i, ++given)
      ++k[static_cast<std::size_t>(remainder[i].second)];
    // At least one slot beyond the window per layer: the zero shares sit at the top; each takes
    // one from the last of the largest shares, which keeps the sequence non-increasing.
    for (std::int64_t l = layers - 1; extra >= 1 && l >= 0 && k[static_cast<std::size_t>(l)] == 0; --l) {
      std::size_t from = 0;
      for (std::size_t i = 0; i < k.size(); ++i)
        if (k[i] >= k[from]) from = i;
      --k[from];
      ++k[static_cast<std::size_t>(l)];
    }
    for (auto& x : k) x += base.window;
    return k;
  }

  // The selection of layer o.layer of o.layers (observation as for snapkv); `budget` is the
  // average over the layers.
  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::pyramidkv::select";
    detail::require(o.layer >= 0 && o.layer < o.layers, fn, ": observation.layer must be in [0, layers = ", o.layers,
                    "), got ", o.layer);
    return base.select(o, layer_budgets(o.layers, budget)[static_cast<std::size_t>(o.layer)]);
  }

  class decoder;
  // The decoder that continues this policy's prefill of `o` at `budget` (policies/list.hpp's trackers).
  decoder make_decoder(const observation& o, std::int64_t budget) const;

  // Decode-time state of layer `layer` of `layers`: snapkv::decoder with that layer's budget.
  class decoder : public snapkv::decoder {
   public:
    decoder(std::int64_t Hkv, const pyramidkv& p, std::int64_t layer, std::int64_t layers, std::int64_t average_budget)
        : snapkv::decoder(Hkv, p.base), budget_(budget_of(p, layer, layers, average_budget)) {}

    // This layer's budget (slots per kv head).
    std::int64_t budget() const { return budget_; }
    // Whether a head holds more than the layer's budget.
    bool should_compress() const { return policies::should_compress(lengths(), budget_); }
    // The layer's kept set: snapkv::decoder::select with the layer's budget.
    selection select() const { return snapkv::decoder::select(budget_); }

   private:
    static std::int64_t budget_of(const pyramidkv& p, std::int64_t layer, std::int64_t layers, std::int64_t average) {
      detail::require(layer >= 0 && layer < layers, "kvcache::policies::pyramidkv::decoder: layer must be in [0, layers = ",
                      layers, "), got ", layer);
      return p.layer_budgets(layers, average)[static_cast<std::size_t>(layer)];
    }
    std::int64_t budget_;
  };
};

// The observation's layer, with its share of the average budget.
inline pyramidkv::decoder pyramidkv::make_decoder(const observation& o, std::int64_t budget) const {
  return decoder(o.k.extent(0), *this, o.layer, o.layers, budget);
}

}  // namespace mnemo::kvcache::policies
