// mnemo/kvcache/policies/pyramidkv.hpp — PyramidKV: SnapKV with budgets shrinking up the layers.
//
// Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
// Funneling" (2024). Lower layers attend broadly, upper layers to a few tokens, so the budget
// decreases linearly with depth at the same average. With m layers, an average budget b and the
// observation window w (kept in every layer), the non-window budgets form an arithmetic sequence
//
//   top    k_{m-1} = (b - w) / beta
//   bottom k_0     = 2 (b - w) - k_{m-1}
//   layer  k_l     = k_0 - (k_0 - k_{m-1}) l / (m - 1),     budget_l = w + k_l
//
// (mean over l: b). Within a layer the selection is SnapKV's (snapkv.hpp).
//
// Decoding (pyramidkv::decoder): SnapKV's decoder (a sliding window of the last w steps'
// attention) re-selecting with the layer's own budget on overflow, so every layer keeps the
// pyramid shape while generating. Per step the cost of snapkv::decoder.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"
#include "mnemo/kvcache/policies/snapkv.hpp"

namespace mnemo::kvcache::policies {

struct pyramidkv {
  static constexpr std::string_view name = "pyramidkv";
  snapkv base{};
  double beta = 20;  // ratio of the bottom layer's extra budget to the top layer's

  // Per-layer budgets of `layers` layers averaging `average_budget` (rounded down; >= window).
  std::vector<std::int64_t> layer_budgets(std::int64_t layers, std::int64_t average_budget) const {
    constexpr const char* fn = "kvcache::policies::pyramidkv::layer_budgets";
    detail::require(layers >= 1, fn, ": layers must be >= 1, got ", layers);
    detail::require(beta >= 1, fn, ": beta must be >= 1, got ", beta);
    detail::check_budget(fn, average_budget, base.window, " (the observation window is kept in every layer)");
    const double extra = static_cast<double>(average_budget - base.window);
    const double top = extra / beta, bottom = 2 * extra - top;
    std::vector<std::int64_t> out;
    for (std::int64_t l = 0; l < layers; ++l) {
      const double k = layers == 1 ? extra : bottom - (bottom - top) * static_cast<double>(l) / static_cast<double>(layers - 1);
      out.push_back(base.window + static_cast<std::int64_t>(std::floor(k)));
    }
    return out;
  }

  // The selection of layer o.layer of o.layers (observation as for snapkv); `budget` is the
  // average over the layers.
  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::pyramidkv::select";
    detail::require(o.layer >= 0 && o.layer < o.layers, fn, ": observation.layer must be in [0, layers = ", o.layers,
                    "), got ", o.layer);
    return base.select(o, layer_budgets(o.layers, budget)[static_cast<std::size_t>(o.layer)]);
  }

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

}  // namespace mnemo::kvcache::policies
