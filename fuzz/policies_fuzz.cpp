// fuzz/policies_fuzz.cpp — every entry of the KV policy list (kvcache/policies/list.hpp): its
// prefill select on observations decoded from the input (any shape the interface admits, empty
// caches, budgets below, at and above the length, causal or not, flags, layers), then its decode
// tracker under append / observe / select / compact.
//
// Checked, beside what ASan and UBSan catch:
//  * a call either returns or throws mnemo::error (nothing else);
//  * a selection has one row per kv head, ascending unique slots inside the head's length (key
//    channels inside D for ThinK), and a prefill selection of a single layer at most
//    Hkv * min(budget, L) slots in all (head-adaptive policies are ragged; none exceeds the
//    layer's budget);
//  * a tracker's lengths follow its appends and compactions exactly, and a rejected call changes
//    none of them.
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "common.hpp"
#include "mnemo/kvcache/policies/list.hpp"

namespace {

using namespace mnemo;
namespace pol = mnemo::kvcache::policies;

// budget < 0: no cap (a tracker may hold a budget of its own: PyramidKV's layer budget).
void check_selection(const char* policy, const kvcache::selection& sel, const std::vector<std::int64_t>& length,
                     std::int64_t budget) {
  fuzz::check(sel.num_heads() == static_cast<std::int64_t>(length.size()), "selection has the wrong number of heads");
  try {
    kvcache::validate("policies_fuzz", sel, length);
  } catch (const mnemo::error& err) {
    fuzz::die("%s returned an invalid selection: %s", policy, err.what());
  }
  std::int64_t cap = 0;
  for (std::int64_t n : length) cap += std::min(budget, n);
  if (budget >= 0 && sel.total_kept() > cap)
    fuzz::die("%s keeps %lld slots, more than the %lld of Hkv = %zu heads * min(budget = %lld, L)", policy,
              static_cast<long long>(sel.total_kept()), static_cast<long long>(cap), length.size(),
              static_cast<long long>(budget));
}

void run_tracker(const char* name, FuzzedDataProvider& in, pol::tracker& t, std::int64_t Hkv, std::int64_t G, std::int64_t D,
                 std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<std::int64_t> len = t.lengths();
  fuzz::check(len.size() == static_cast<std::size_t>(Hkv), "tracker has the wrong number of heads");
  std::vector<float> key(static_cast<std::size_t>(D));
  const int steps = in.ConsumeIntegralInRange<int>(0, 40);
  for (int step = 0; step < steps && in.remaining_bytes() > 0; ++step) {
    const int op = in.ConsumeIntegralInRange<int>(0, 3);
    try {
      if (op == 0) {  // one new slot on one head (or on every head)
        const std::int64_t h = in.ConsumeIntegralInRange<std::int64_t>(-1, Hkv - 1);
        for (std::int64_t hh = h < 0 ? 0 : h; hh < (h < 0 ? Hkv : h + 1); ++hh) {
          for (float& x : key) x = normal(rng);
          t.append({hh, key.data(), D, in.ConsumeBool(), in.ConsumeBool(), normal(rng)});
          ++len[static_cast<std::size_t>(hh)];
        }
      } else if (op == 1) {  // one step's probabilities over every head's slots
        const std::int64_t n = std::max<std::int64_t>(1, *std::max_element(len.begin(), len.end()));
        tensor<float, 2> p({Hkv * G, n});
        for (auto& x : p) x = uniform(rng);
        t.observe(p);
      } else if (op == 2) {
        const std::int64_t budget = in.ConsumeIntegralInRange<std::int64_t>(-1, 30);
        const kvcache::selection sel = t.select(budget);
        check_selection(name, sel, len, -1);
        if (in.ConsumeBool()) {
          t.compact(sel);
          for (std::size_t h = 0; h < len.size(); ++h) len[h] = sel.kept(static_cast<std::int64_t>(h));
        }
      } else {  // compact to a random subset, sometimes out of range
        kvcache::selection sel;
        for (std::int64_t h = 0; h < Hkv; ++h) {
          std::vector<std::int64_t> keep;
          for (std::int64_t j = 0; j < len[static_cast<std::size_t>(h)]; ++j)
            if (in.ConsumeBool()) keep.push_back(j);
          sel.heads.push_back(keep);
        }
        if (in.ConsumeIntegralInRange<int>(0, 15) == 0) sel.heads[0].push_back(len[0] + 3);
        t.compact(sel);
        for (std::size_t h = 0; h < len.size(); ++h) len[h] = sel.kept(static_cast<std::int64_t>(h));
      }
      fuzz::stats::count("tracker step");
    } catch (const mnemo::error&) {
      fuzz::stats::count("tracker step rejected");
    }
    fuzz::check(t.lengths() == len, "tracker lengths differ from its appends and compactions");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const auto& list = pol::all();
  const pol::entry& e = list[in.ConsumeIntegralInRange<std::size_t>(0, list.size() - 1)];
  const std::int64_t Hkv = in.ConsumeIntegralInRange<std::int64_t>(1, 3), G = in.ConsumeIntegralInRange<std::int64_t>(1, 3);
  const std::int64_t L = in.ConsumeIntegralInRange<std::int64_t>(0, 48), D = in.ConsumeIntegralInRange<std::int64_t>(1, 12);
  const std::int64_t Dv = in.ConsumeIntegralInRange<std::int64_t>(1, 8);
  const std::int64_t Lw = L == 0 ? 0 : in.ConsumeIntegralInRange<std::int64_t>(1, L);
  std::mt19937 rng(in.ConsumeIntegral<std::uint32_t>());
  std::normal_distribution<float> normal(0.0f, in.ConsumeBool() ? 1.0f : 8.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  tensor<float, 3> k({Hkv, L, D}), v({Hkv, L, Dv}), q({Hkv * G, Lw, D});
  tensor<float, 2> attn({Hkv * G, L});
  for (auto* t : {&k, &v, &q})
    for (auto& x : *t) x = normal(rng);
  for (auto& x : attn) x = uniform(rng) * static_cast<float>(std::max<std::int64_t>(Lw, 1)) / static_cast<float>(std::max<std::int64_t>(L, 1));
  std::vector<std::uint8_t> special(static_cast<std::size_t>(L)), punct(static_cast<std::size_t>(L));
  for (std::int64_t j = 0; j < L; ++j) {
    special[static_cast<std::size_t>(j)] = in.ConsumeIntegralInRange<int>(0, 7) == 0;
    punct[static_cast<std::size_t>(j)] = in.ConsumeIntegralInRange<int>(0, 4) == 0;
  }
  pol::observation o{k, v, q, attn};
  if (in.ConsumeBool()) o.special = special;
  if (in.ConsumeBool()) o.punct = punct;
  o.layers = in.ConsumeIntegralInRange<std::int64_t>(1, 4);
  o.layer = in.ConsumeIntegralInRange<std::int64_t>(0, o.layers);  // layers itself is out of range
  o.causal = in.ConsumeBool();
  const std::int64_t budget = in.ConsumeIntegralInRange<std::int64_t>(-1, L + 5);
  const bool channels = e.selects == pol::axis::channels;
  try {
    const kvcache::selection sel = e.select(o, budget);
    if (budget < 0) fuzz::die("%s accepted a negative budget", e.name.data());
    // With several layers a layer's share of the average budget may exceed it (PyramidKV's bottom
    // layers): the cap holds for a single layer.
    check_selection(e.name.data(), sel, std::vector<std::int64_t>(static_cast<std::size_t>(Hkv), channels ? D : L),
                    o.layers == 1 ? budget : -1);
    fuzz::stats::count("select");
  } catch (const mnemo::error&) {
    fuzz::stats::count("select rejected");
  }
  if (e.make_tracker) {
    pol::tracker t;
    try {
      t = e.make_tracker(o, std::max<std::int64_t>(budget, 0));
    } catch (const mnemo::error&) {
      fuzz::stats::count("tracker rejected");
      return 0;
    }
    run_tracker(e.name.data(), in, t, Hkv, G, D, rng);
  }
  return 0;
}
