// mnemo/kvcache/policies/list.hpp — every KV policy in one list, with its default parameters.
//
// The tests, the policy benchmark (bench/kvpolicy_rows.cpp) and the tracker fuzz target read this
// list; adding a policy is its header plus one `row` line in `all()`. An entry holds:
//
//   name          the policy's name (the benchmark's row name)
//   selects       axis::slots, or axis::channels (ThinK: `budget` counts key channels per head)
//   rows          which query rows observation.attn must sum: the Lw window rows, all prompt rows
//                 (Lw = L) or the newest row (interface.hpp, attn_rows)
//   select        (observation, budget) -> selection, the policy built with its defaults for that
//                 observation (window = the observation's Lw, recent = budget / 4, ...)
//   make_tracker  (observation, budget) -> tracker: the policy's decode-time tracker after a
//                 prefill observed as `o` (empty when the policy has none)
//   plan          merging methods: (observation, budget) -> merge_plan (kept slots + folds)
//
// Defaults follow the papers' settings where the paper gives one (SnapKV's pooling kernel 5, AdaKV's
// floor 0.2, PyramidKV's beta 20, StreamingLLM's 4 sinks) and the benchmark's choices otherwise.
// A user who wants other parameters builds the policy struct directly: the list is for code that
// iterates every policy.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>
#include <type_traits>
#include <vector>

#include "mnemo/kvcache/policies/adakv.hpp"
#include "mnemo/kvcache/policies/alisa.hpp"
#include "mnemo/kvcache/policies/cam.hpp"
#include "mnemo/kvcache/policies/chunkkv.hpp"
#include "mnemo/kvcache/policies/common.hpp"
#include "mnemo/kvcache/policies/criticalkv.hpp"
#include "mnemo/kvcache/policies/dmc.hpp"
#include "mnemo/kvcache/policies/dms.hpp"
#include "mnemo/kvcache/policies/duo_attention.hpp"
#include "mnemo/kvcache/policies/expected_attention.hpp"
#include "mnemo/kvcache/policies/fastgen.hpp"
#include "mnemo/kvcache/policies/h2o.hpp"
#include "mnemo/kvcache/policies/interface.hpp"
#include "mnemo/kvcache/policies/keydiff.hpp"
#include "mnemo/kvcache/policies/keyformer.hpp"
#include "mnemo/kvcache/policies/knorm.hpp"
#include "mnemo/kvcache/policies/lagkv.hpp"
#include "mnemo/kvcache/policies/leverage.hpp"
#include "mnemo/kvcache/policies/merging.hpp"
#include "mnemo/kvcache/policies/moviechat.hpp"
#include "mnemo/kvcache/policies/pyramidkv.hpp"
#include "mnemo/kvcache/policies/qfilter.hpp"
#include "mnemo/kvcache/policies/scissorhands.hpp"
#include "mnemo/kvcache/policies/simlayerkv.hpp"
#include "mnemo/kvcache/policies/snapkv.hpp"
#include "mnemo/kvcache/policies/streaming_llm.hpp"
#include "mnemo/kvcache/policies/think.hpp"
#include "mnemo/kvcache/policies/tova.hpp"
#include "mnemo/kvcache/merge_plan.hpp"

namespace mnemo::kvcache::policies {

struct entry {
  std::string_view name;
  axis selects = axis::slots;
  attn_rows rows = attn_rows::window;
  std::function<selection(const observation&, std::int64_t)> select;
  std::function<tracker(const observation&, std::int64_t)> make_tracker;  // empty: no tracker
  // Merging methods (CaM, MergingPress, DMC, MovieChat): the merge plan whose `keep` is select's
  // selection, with the evicted slots folded into kept ones (kvcache/merge_plan.hpp; apply it with
  // kvcache::merge or reference::merge). Empty for the policies that drop.
  std::function<merge_plan(const observation&, std::int64_t)> plan;
};

namespace detail {

// A policy's own decoder type, when it is a tracker (KeyDiff's decoder reads the cache's keys at
// select and ThinK's prunes channels: neither is one).
template <class D>
concept own_tracker = requires(D& d, const D& cd, view<const float, 2> probs, const selection& sel, std::int64_t b) {
  d.compact(sel);
  { cd.lengths() } -> std::convertible_to<std::vector<std::int64_t>>;
  requires(requires { { cd.select(b) } -> std::same_as<selection>; } ||
           requires { { cd.select() } -> std::same_as<selection>; });
};

template <class P>
concept has_tracker = requires { typename P::decoder; } && own_tracker<typename P::decoder>;

// The decoder of policy p after a prefill observed as o with `budget`.
template <class P>
typename P::decoder make_decoder(const P& p, const observation& o, std::int64_t budget) {
  using D = typename P::decoder;
  const std::int64_t Hkv = o.k.extent(0);
  if constexpr (requires { { p.make_decoder(o, budget) } -> std::same_as<D>; }) {
    return p.make_decoder(o, budget);  // a decoder that needs the prefill (FastGen, DuoAttention, SimLayerKV, PyramidKV)
  } else if constexpr (std::constructible_from<D, std::int64_t, const P&>) {
    return D(Hkv, p);
  } else if constexpr (std::constructible_from<D, const P&>) {
    return D(p);
  } else if constexpr (requires { p.recent; }) {
    return D(Hkv, p.recent);
  } else {
    return D(Hkv);
  }
}

// A tracker that owns data its decoder only views (Q-Filters' fitted filters).
template <class D, class Owned>
class owning_tracker : public as_tracker<D> {
 public:
  owning_tracker(std::shared_ptr<Owned> owned, D d) : as_tracker<D>(std::move(d)), owned_(std::move(owned)) {}

 private:
  std::shared_ptr<Owned> owned_;
};

// The observation window's length: Lw of o.q when given, else 32 (SnapKV's default) capped at L.
inline std::int64_t window_of(const observation& o) {
  if (!o.q.empty()) return o.q.extent(1);
  return std::min<std::int64_t>(32, o.k.empty() ? 0 : o.k.extent(1));
}

// The identity output projection w_o [Hq, Dv, Dv]: CriticalKV's value term becomes ||v_j||_1
// when the model's projection is not at hand.
inline tensor<float, 3> identity_projection(const observation& o) {
  const std::int64_t Hq = o.q.empty() ? o.attn.extent(0) : o.q.extent(0), Dv = o.v.extent(2);
  tensor<float, 3> w({Hq, Dv, Dv});
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t c = 0; c < Dv; ++c) w(h, c, c) = 1.0f;
  return w;
}

// DMS's eviction logits stand in for the model's (which the paper trains): z_j = log(uniform
// share / a_j), a_j = slot j's share of its group's attention sums, so a slot attended less
// than uniformly is marked (z > 0). [Hkv, L].
inline tensor<float, 2> attention_logits(const observation& o) {
  const obs_dims d = check("kvcache::policies::attention_logits", o, false, true);
  tensor<float, 2> z({d.Hkv, d.L});
  for (std::int64_t h = 0; h < d.Hkv; ++h) {
    double total = 0;
    for (std::int64_t g = 0; g < d.group(); ++g)
      for (std::int64_t j = 0; j < d.L; ++j) total += o.attn(h * d.group() + g, j);
    for (std::int64_t j = 0; j < d.L; ++j) {
      double a = 0;
      for (std::int64_t g = 0; g < d.group(); ++g) a += o.attn(h * d.group() + g, j);
      const double share = total > 0 ? a / total : 1.0 / static_cast<double>(d.L);
      z(h, j) = static_cast<float>(std::log((1.0 / static_cast<double>(d.L)) / std::max(share, 1e-30)));
    }
  }
  return z;
}

}  // namespace detail

// The entry of policy P built by make(o, budget) -> P.
template <prefill_policy P, class Make>
entry row(std::string_view name, Make make, attn_rows rows = attn_rows::window, axis selects = axis::slots) {
  entry e{name, selects, rows, {}, {}, {}};
  e.select = [make](const observation& o, std::int64_t budget) { return make(o, budget).select(o, budget); };
  if constexpr (requires(const P& p, const observation& o, std::int64_t b) {
                  { p.plan(o, b) } -> std::same_as<merge_plan>;
                })
    e.plan = [make](const observation& o, std::int64_t budget) { return make(o, budget).plan(o, budget); };
  if constexpr (detail::has_tracker<P>)
    e.make_tracker = [make](const observation& o, std::int64_t budget) {
      return erase(detail::make_decoder(make(o, budget), o, budget));
    };
  return e;
}

// Every policy, in the benchmark's order.
inline const std::vector<entry>& all() {
  static const std::vector<entry> list = [] {
    using D = const observation&;
    using B = std::int64_t;
    std::vector<entry> l;
    l.push_back(row<streaming_llm>("streaming_llm", [](D, B b) { return streaming_llm{std::min<B>(4, b)}; }));
    l.push_back(row<h2o>("h2o", [](D, B b) { return h2o{b / 4}; }, attn_rows::all));
    l.push_back(row<scissorhands>("scissorhands", [](D, B b) { return scissorhands{b / 4}; }));
    l.push_back(row<tova>("tova", [](D, B) { return tova{}; }, attn_rows::last));
    l.push_back(row<snapkv>("snapkv", [](D o, B) { return snapkv{detail::window_of(o), 5}; }));
    l.push_back(row<pyramidkv>("pyramidkv", [](D o, B) { return pyramidkv{snapkv{detail::window_of(o), 5}, 20}; }));
    l.push_back(row<adakv>("adakv", [](D o, B) { return adakv{snapkv{detail::window_of(o), 5}, 0.2}; }));
    l.push_back(row<keyformer>("keyformer", [](D, B b) { return keyformer{b / 4, 1.0f, 1}; }));
    l.push_back(row<knorm>("knorm", [](D, B) { return knorm{}; }));
    l.push_back(row<keydiff>("keydiff", [](D, B) { return keydiff{}; }));
    {  // Q-Filters: filters fitted on the observation window's queries (the paper fits them offline)
      entry e{"qfilter", axis::slots, attn_rows::window, {}, {}, {}};
      e.select = [](const observation& o, std::int64_t budget) {
        const tensor<float, 2> f = qfilter::fit(o.q, o.k.extent(0));
        return qfilter{f}.select(o, budget);
      };
      e.make_tracker = [](const observation& o, std::int64_t) {
        auto f = std::make_shared<tensor<float, 2>>(qfilter::fit(o.q, o.k.extent(0)));
        using T = detail::owning_tracker<qfilter::decoder, tensor<float, 2>>;
        qfilter::decoder d{qfilter{*f}};
        return tracker(T(f, std::move(d)), false);
      };
      l.push_back(std::move(e));
    }
    l.push_back(row<think>("think", [](D, B) { return think{}; }, attn_rows::window, axis::channels));
    // FastGen profiles the observation window like SnapKV (the paper profiles the whole prompt:
    // attn_rows::all; on real attention the window's profile decides better, bench/README.md).
    l.push_back(row<fastgen>("fastgen", [](D, B) { return fastgen{}; }));
    l.push_back(row<alisa>("alisa", [](D o, B) { return alisa{0.5, detail::window_of(o)}; }));
    l.push_back(row<expected_attention>("expected_attention", [](D, B) { return expected_attention{}; }));
    {  // CriticalKV / CriticalAdaKV: the identity projection when the model's w_o is not at hand
      for (const bool ada : {false, true}) {
        entry e{ada ? "critical_adakv" : "criticalkv", axis::slots, attn_rows::window, {}, {}, {}};
        e.select = [ada](const observation& o, std::int64_t budget) {
          const tensor<float, 3> w = detail::identity_projection(o);
          const snapkv base{detail::window_of(o), 5};
          if (ada) return critical_adakv<snapkv>{base, w}.select(o, budget);
          return criticalkv<snapkv>{base, w}.select(o, budget);
        };
        l.push_back(std::move(e));
      }
    }
    l.push_back(row<leverage>("leverage", [](D, B) { return leverage{}; }));
    l.push_back(row<chunkkv<snapkv>>("chunkkv", [](D o, B) { return chunkkv<snapkv>{snapkv{detail::window_of(o), 5}}; }));
    l.push_back(row<duo_attention>("duo_attention", [](D, B b) {
      duo_attention p;
      p.n_sink = std::min<B>(4, b);
      p.recent = std::max<B>(0, b / 2 - p.n_sink);
      return p;
    }));
    l.push_back(row<simlayerkv>("simlayerkv", [](D, B b) {
      simlayerkv p;
      p.n_initial = std::min<B>(4, b);
      p.recent = std::max<B>(0, b / 2 - p.n_initial);
      return p;
    }));
    l.push_back(row<lagkv>("lagkv", [](D o, B) {
      lagkv p;
      p.lag = std::clamp<std::int64_t>(o.k.extent(1) / 16, 4, 128);  // at least 16 chunks
      return p;
    }));
    {  // DMS: eviction logits from the attention (detail::attention_logits) in place of the model's
      entry e{"dms", axis::slots, attn_rows::window, {}, {}, {}};
      e.select = [](const observation& o, std::int64_t budget) {
        const tensor<float, 2> z = detail::attention_logits(o);
        dms p;
        p.window = std::max<std::int64_t>(1, budget / 2);
        p.logits = z;
        return p.select(o, budget);
      };
      e.make_tracker = [](const observation& o, std::int64_t budget) {
        dms p;
        p.window = std::max<std::int64_t>(1, budget / 2);
        return erase(dms::decoder(o.k.extent(0), p));
      };
      l.push_back(std::move(e));
    }
    // Merging: evicted tokens folded into kept ones (entry::plan).
    l.push_back(row<cam>("cam", [](D, B b) { return cam{b / 4}; }, attn_rows::all));
    l.push_back(row<merging<snapkv>>("merging", [](D o, B) { return merging<snapkv>{snapkv{detail::window_of(o), 5}}; }));
    l.push_back(row<dmc>("dmc", [](D, B) { return dmc{}; }));
    l.push_back(row<moviechat>("moviechat", [](D, B) { return moviechat{}; }));
    return l;
  }();
  return list;
}

// The entry named `name`; throws mnemo::error listing the names when there is none.
inline const entry& find(std::string_view name) {
  for (const entry& e : all())
    if (e.name == name) return e;
  std::string names;
  for (const entry& e : all()) names += (names.empty() ? "" : ", ") + std::string(e.name);
  detail::fail("kvcache::policies::find: name must be one of ", names, ", got '", std::string(name), "'");
}

}  // namespace mnemo::kvcache::policies
