// mnemo/kvcache/policies/fastgen.hpp — FastGen-style adaptive per-head choice.
//
// Ge et al., "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs" (ICLR
// 2024). Profiling the prompt's attention, each head gets the cheapest of a few structural
// policies that still recovers a fraction T of its attention mass:
//
//   C_special        special tokens (e.g. BOS, role markers)
//   C_punct          C_special + punctuation
//   C_local          C_punct + the `local` most recent tokens
//   C_frequency      C_local + the highest accumulated attention up to the budget
//   recovery(C)      = sum_{j in C} a_j / sum_j a_j,     a = the head's attention column sums
//   choice(h)        = the first C in that order with recovery >= T (C_frequency if none does)
//
// Every set is capped at the budget (special tokens first, then punctuation, then the newest,
// then the most attended), so heads keep different numbers of slots (ragged) and a head whose
// attention is structural keeps few. a = observation.attn summed over the group (column sums of
// all prompt rows: attention::column_sums with rows = 0). Prefill only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct fastgen {
  enum class choice { special, punct, local, frequency };

  double recovery = 0.95;     // T
  double local_fraction = 0.5;  // the local window as a fraction of the budget

  struct plan {
    selection kept;
    std::vector<choice> per_head;  // [Hkv]
  };

  // special, punct: [L] flags of the prompt's tokens (1 = special / punctuation), may be empty.
  plan select(const observation& o, std::int64_t budget, std::span<const std::uint8_t> special,
              std::span<const std::uint8_t> punct) const {
    constexpr const char* fn = "kvcache::policies::fastgen::select";
    const obs_dims d = detail::check(fn, o, false, true);
    detail::check_budget(fn, budget);
    detail::require(recovery > 0 && recovery <= 1, fn, ": recovery must be in (0, 1], got ", recovery);
    detail::require(local_fraction >= 0 && local_fraction <= 1, fn, ": local_fraction must be in [0, 1], got ",
                    local_fraction);
    for (auto [flags, name] : {std::pair{special, "special"}, std::pair{punct, "punct"}})
      detail::require(flags.empty() || static_cast<std::int64_t>(flags.size()) == d.L, fn, ": ", name,
                      " must be empty or hold L = ", d.L, " flags, got ", flags.size());
    const std::int64_t keep = std::min(budget, d.L);
    const auto local = static_cast<std::int64_t>(local_fraction * static_cast<double>(keep));
    plan out;
    std::vector<double> a(static_cast<std::size_t>(d.L));
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
      double total = 0;
      for (std::int64_t j = 0; j < d.L; ++j) {
        double s = 0;
        for (std::int64_t g = 0; g < d.group(); ++g) s += o.attn(hk * d.group() + g, j);
        a[static_cast<std::size_t>(j)] = s;
        total += s;
      }
      std::vector<std::uint8_t> in(static_cast<std::size_t>(d.L), 0);
      std::int64_t count = 0;
      double got = 0;
      auto add = [&](std::int64_t j) {
        if (count >= keep || in[static_cast<std::size_t>(j)]) return;
        in[static_cast<std::size_t>(j)] = 1;
        ++count;
        got += a[static_cast<std::size_t>(j)];
      };
      auto enough = [&] { return total <= 0 || got >= recovery * total; };
      choice c = choice::special;
      for (std::int64_t j = 0; j < d.L && !special.empty(); ++j)
        if (special[static_cast<std::size_t>(j)]) add(j);
      if (!enough()) {
        c = choice::punct;
        for (std::int64_t j = 0; j < d.L && !punct.empty(); ++j)
          if (punct[static_cast<std::size_t>(j)]) add(j);
      }
      if (!enough()) {
        c = choice::local;
        for (std::int64_t j = std::max<std::int64_t>(0, d.L - local); j < d.L; ++j) add(j);
      }
      if (!enough()) {
        c = choice::frequency;
        std::vector<std::int64_t> order(static_cast<std::size_t>(d.L));
        for (std::int64_t j = 0; j < d.L; ++j) order[static_cast<std::size_t>(j)] = j;
        std::stable_sort(order.begin(), order.end(),
                         [&](std::int64_t x, std::int64_t y) { return a[static_cast<std::size_t>(x)] > a[static_cast<std::size_t>(y)]; });
        for (std::int64_t j : order) {
          if (count >= keep || enough()) break;
          add(j);
        }
      }
      std::vector<std::int64_t> row;
      for (std::int64_t j = 0; j < d.L; ++j)
        if (in[static_cast<std::size_t>(j)]) row.push_back(j);
      out.kept.heads.push_back(std::move(row));
      out.per_head.push_back(c);
    }
    return out;
  }
};

}  // namespace mnemo::kvcache::policies
