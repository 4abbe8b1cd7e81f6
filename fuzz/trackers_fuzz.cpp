// fuzz/trackers_fuzz.cpp — the decode-time KV policy trackers (h2o::decoder, tova::decoder,
// scissorhands::decoder) under sequences of append / observe / select / compact decoded from the
// input, against a shadow model of their scores kept in double.
//
// Shadow rules (the headers' formulas): h2o adds every step's probabilities summed over the query
// heads of a kv head; tova replaces every slot's score by this step's probability averaged over
// all query heads (one set of slots for all heads); scissorhands subtracts one per query head that
// gave the slot less than 1 / length. After each step:
//  * scores() equals the shadow (to f32 rounding of the sums);
//  * select(budget) keeps min(budget, length) slots per head, ascending and unique, always the
//    `recent` newest (when they fit), and no dropped older slot scores above a kept older one
//    (the top-k rule; ties either way);
//  * compact(selection) keeps exactly the selected scores, in order;
//  * a rejected call (mnemo::error: probs of the wrong shape, a budget below recent, a bad
//    selection) changes no score.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

#include "common.hpp"
#include "mnemo/kvcache/policies/h2o.hpp"
#include "mnemo/kvcache/policies/scissorhands.hpp"
#include "mnemo/kvcache/policies/tova.hpp"

namespace {

using namespace mnemo;
namespace pol = mnemo::kvcache::policies;

enum class kind { h2o, tova, scissorhands };

using shadow = std::vector<std::vector<double>>;  // [Hkv][slots]

template <class Tracker>
void check_scores(const Tracker& t, const shadow& want) {
  for (std::size_t h = 0; h < want.size(); ++h) {
    const std::vector<float>& got = t.scores(static_cast<std::int64_t>(h));
    fuzz::check(got.size() == want[h].size(), "tracker length differs from the shadow model");
    for (std::size_t j = 0; j < got.size(); ++j)
      if (!(std::abs(got[j] - want[h][j]) <= 1e-4 + 1e-5 * std::abs(want[h][j])))
        fuzz::die("head %zu slot %zu: score %.9g, shadow %.9g", h, j, got[j], want[h][j]);
  }
}

void check_selection(const kvcache::selection& sel, const shadow& s, std::int64_t budget, std::int64_t recent) {
  fuzz::check(sel.num_heads() == static_cast<std::int64_t>(s.size()), "selection has the wrong number of heads");
  for (std::size_t h = 0; h < s.size(); ++h) {
    const auto& keep = sel.heads[h];
    const std::int64_t L = static_cast<std::int64_t>(s[h].size());
    fuzz::check(static_cast<std::int64_t>(keep.size()) == std::min(budget, L), "selection does not keep min(budget, L)");
    std::vector<char> kept(static_cast<std::size_t>(L), 0);
    for (std::size_t i = 0; i < keep.size(); ++i) {
      fuzz::check(keep[i] >= 0 && keep[i] < L, "selected slot out of range");
      fuzz::check(i == 0 || keep[i] > keep[i - 1], "selection not ascending and unique");
      kept[static_cast<std::size_t>(keep[i])] = 1;
    }
    const std::int64_t first_recent = std::max<std::int64_t>(0, L - recent);
    for (std::int64_t j = first_recent; j < L && budget >= recent; ++j)
      fuzz::check(kept[static_cast<std::size_t>(j)], "a recent slot was dropped");
    // Top-k among the older slots: no dropped one above a kept one (1e-6: f32 vs double sums).
    double lowest_kept = INFINITY, highest_dropped = -INFINITY;
    for (std::int64_t j = 0; j < first_recent; ++j) {
      const double v = s[h][static_cast<std::size_t>(j)];
      if (kept[static_cast<std::size_t>(j)]) lowest_kept = std::min(lowest_kept, v);
      else highest_dropped = std::max(highest_dropped, v);
    }
    if (!(highest_dropped <= lowest_kept + 1e-4 + 1e-5 * std::abs(lowest_kept)))
      fuzz::die("head %zu: dropped a slot of score %.9g, kept one of %.9g", h, highest_dropped, lowest_kept);
  }
}

template <class Tracker>
void run(FuzzedDataProvider& in, Tracker& t, kind k, std::int64_t Hkv, std::int64_t recent) {
  std::mt19937 rng(in.ConsumeIntegral<std::uint32_t>());
  const std::int64_t G = in.ConsumeIntegralInRange<std::int64_t>(1, 3), Hq = Hkv * G;
  shadow s(static_cast<std::size_t>(Hkv));
  const int steps = in.ConsumeIntegralInRange<int>(1, 24);
  for (int step = 0; step < steps && in.remaining_bytes() > 0; ++step) {
    const int op = in.ConsumeIntegralInRange<int>(0, 3);
    const shadow before = s;
    try {
      if (op == 0) {  // append n slots to every head (tova: one set for all heads)
        const std::int64_t n = in.ConsumeIntegralInRange<std::int64_t>(0, 20);
        for (std::int64_t h = 0; h < Hkv; ++h)
          for (std::int64_t j = 0; j < n; ++j) {
            if constexpr (std::is_same_v<Tracker, pol::tova::decoder>) t.append(h);
            else t.append(h, 0.0f);
            s[static_cast<std::size_t>(h)].push_back(0.0);
          }
      } else if (op == 1) {  // observe one step's probabilities (sometimes of the wrong shape)
        std::int64_t L = 0;
        for (const auto& row : s) L = std::max<std::int64_t>(L, static_cast<std::int64_t>(row.size()));
        const int bad = in.ConsumeIntegralInRange<int>(0, 15);  // 0: too few columns, 1: Hq not a multiple
        const std::int64_t rows = bad == 1 ? Hq + 1 : Hq, cols = bad == 0 && L > 0 ? L - 1 : L + in.ConsumeIntegralInRange<std::int64_t>(0, 3);
        tensor<float, 2> p({rows, std::max<std::int64_t>(cols, 1)});
        std::uniform_real_distribution<float> uni(0.0f, 1.0f);
        for (auto& x : p) x = uni(rng);
        const view<const float, 2> probs(p.data(), {rows, cols}, {p.extent(1), 1});
        t.observe(probs);
        fuzz::check(!(bad == 1 && Hkv > 1) || rows % Hkv == 0, "observe accepted Hq not a multiple of Hkv");
        fuzz::check(!(bad == 0 && L > 0), "observe accepted probs with fewer columns than slots");
        const std::int64_t g = rows / Hkv;
        for (std::int64_t h = 0; h < Hkv; ++h) {
          auto& row = s[static_cast<std::size_t>(h)];
          const std::int64_t n = static_cast<std::int64_t>(row.size());
          for (std::int64_t j = 0; j < n; ++j) {
            if (k == kind::h2o) {
              for (std::int64_t q = 0; q < g; ++q) row[static_cast<std::size_t>(j)] += p(h * g + q, j);
            } else if (k == kind::scissorhands) {
              for (std::int64_t q = 0; q < g; ++q) row[static_cast<std::size_t>(j)] -= p(h * g + q, j) < 1.0f / n ? 1.0 : 0.0;
            } else {
              double mean = 0;
              for (std::int64_t q = 0; q < rows; ++q) mean += static_cast<double>(1.0f / rows) * p(q, j);
              row[static_cast<std::size_t>(j)] = mean;
            }
          }
        }
      } else if (op == 2) {  // select, checked against the shadow
        const std::int64_t budget = in.ConsumeIntegralInRange<std::int64_t>(-1, 40);
        const kvcache::selection sel = t.select(budget);
        check_selection(sel, s, budget, k == kind::tova ? 0 : recent);
      } else {  // compact to a random subset (sometimes invalid)
        kvcache::selection sel;
        for (std::int64_t h = 0; h < Hkv; ++h) {
          std::vector<std::int64_t> keep;
          const bool same = k == kind::tova && h > 0;
          if (same) keep = sel.heads[0];
          else
            for (std::int64_t j = 0; j < static_cast<std::int64_t>(s[static_cast<std::size_t>(h)].size()); ++j)
              if (in.ConsumeBool()) keep.push_back(j);
          sel.heads.push_back(keep);
        }
        if (in.ConsumeIntegralInRange<int>(0, 15) == 0 && !sel.heads.empty()) sel.heads[0].push_back(999);
        t.compact(sel);
        for (std::size_t h = 0; h < s.size(); ++h) {
          std::vector<double> kept;
          for (std::int64_t j : sel.heads[h]) kept.push_back(s[h][static_cast<std::size_t>(j)]);
          s[h] = std::move(kept);
        }
      }
      fuzz::stats::count(op == 0 ? "append" : op == 1 ? "observe" : op == 2 ? "select checked" : "compact");
    } catch (const mnemo::error&) {
      s = before;
      fuzz::stats::count("rejected step");
    }
    check_scores(t, s);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const kind k = static_cast<kind>(in.ConsumeIntegralInRange<int>(0, 2));
  const std::int64_t Hkv = in.ConsumeIntegralInRange<std::int64_t>(1, 3), recent = in.ConsumeIntegralInRange<std::int64_t>(0, 6);
  if (k == kind::h2o) {
    pol::h2o::decoder t(Hkv, recent);
    run(in, t, k, Hkv, recent);
  } else if (k == kind::tova) {
    pol::tova::decoder t(Hkv);
    run(in, t, k, Hkv, 0);
  } else {
    pol::scissorhands::decoder t(Hkv, recent);
    run(in, t, k, Hkv, recent);
  }
  return 0;
}
