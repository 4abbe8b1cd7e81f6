// bench/kvpolicy_real_rows.cpp — every KV policy of the policy list on a real model's attention.
//
//   kvpolicy_real/<policy>/budget:<pct>/threads:1
//       all-MiniLM-L6-v2's Q, K, V (bench/real_attention/minilm_dump.sh: 6 layers x 12 heads,
//       head dim 32, L = 512 tokens of a licence text, non-causal; read from $MNEMO_REAL_ATTENTION,
//       default build/real_attention). Per layer, the policy observes the last Lw = 32 positions as
//       its window (observation.q, the column sums of their attention, causal = false, the token's
//       special and punctuation flags, layer l of 6) and keeps `budget` = pct% of the 512 slots per
//       head; those same 32 rows are then answered over the kept slots.
//       Counters, over every layer, head and query row:
//         rel_error     sqrt(sum ||o_kept - o_full||^2 / sum ||o_full||^2), o_kept = attention over
//                       the kept slots (renormalised softmax), o_full over all 512
//         kept_mass     mean share of the full attention probabilities on the kept slots
//         rel_error_l<l>  the same error on layer l alone (PyramidKV gives each layer its own budget)
//       Rows "oracle" (per head, the true top keys by mean attention of the 32 rows) and "random"
//       (uniform random slots, fixed seed) bound the policies. Merging methods (the entry's plan)
//       answer over their kept slots' merged keys and values (kvcache::reference::merge); their
//       kept_mass counts the kept slots only. ThinK keeps every slot and prunes
//       key channels to pct% of D (its kept_mass is 1). Row time: the policy's select over the
//       6 layers (the prefill's compression cost).
//   kvcache_real/<kind>/rotate:<none|hadamard>/threads:1   quantized caches on the same data (below).
//   Without the data the rows are skipped with the command that makes it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/decode.hpp"
#include "mnemo/kvcache/merge_plan.hpp"
#include "mnemo/kvcache/policies/list.hpp"

namespace mnemo::bench {
namespace {

namespace pol = kvcache::policies;

constexpr std::int64_t real_window = 32;

struct real_layer {
  tensor<float, 3> q, k, v;            // [H, L, Dh]
  tensor<float, 3> p_window;           // [H, Lw, L] full attention probabilities of the window rows
  tensor<float, 3> o_full;             // [H, Lw, Dh] their outputs over every slot
  tensor<float, 2> sums_window, sums_all, sums_last;  // [H, L]
};

struct real_data {
  std::vector<real_layer> layers;
  std::vector<std::uint8_t> special, punct;
  std::int64_t H = 0, L = 0, D = 0;
  std::string error;  // non-empty: the data could not be read
};

std::string data_dir() {
  const char* env = std::getenv("MNEMO_REAL_ATTENTION");
  return env && *env ? env : "build/real_attention";
}

// softmax(scale q_i . k_j) over j, in double, for one head; out p[L].
void probs_row(const float* q, const tensor<float, 3>& k, std::int64_t h, std::int64_t L, std::int64_t D, double* p) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  double m = -INFINITY;
  for (std::int64_t j = 0; j < L; ++j) {
    double s = 0;
    for (std::int64_t c = 0; c < D; ++c) s += static_cast<double>(q[c]) * k(h, j, c);
    p[j] = scale * s;
    m = std::max(m, p[j]);
  }
  double z = 0;
  for (std::int64_t j = 0; j < L; ++j) z += p[j] = std::exp(p[j] - m);
  for (std::int64_t j = 0; j < L; ++j) p[j] /= z;
}

const real_data& get_data() {
  static const std::unique_ptr<real_data> data = [] {
    auto d = std::make_unique<real_data>();
    const std::filesystem::path dir = data_dir();
    if (!std::filesystem::exists(dir / "q_0.npy")) {
      d->error = "no real attention data in " + dir.string() + ": run bench/real_attention/minilm_dump.sh";
      return d;
    }
    try {
      for (int l = 0;; ++l) {
        const auto file = [&](const char* what) { return (dir / (what + std::to_string(l) + ".npy")).string(); };
        if (!std::filesystem::exists(file("q_"))) break;
        real_layer layer{npy::load<float, 3>(file("q_")), npy::load<float, 3>(file("k_")), npy::load<float, 3>(file("v_")),
                         {}, {}, {}, {}, {}};
        d->H = layer.k.extent(0);
        d->L = layer.k.extent(1);
        d->D = layer.k.extent(2);
        const std::int64_t H = d->H, L = d->L, D = d->D, Lw = real_window;
        layer.p_window = tensor<float, 3>({H, Lw, L});
        layer.o_full = tensor<float, 3>({H, Lw, D});
        layer.sums_window = tensor<float, 2>({H, L});
        layer.sums_all = tensor<float, 2>({H, L});
        layer.sums_last = tensor<float, 2>({H, L});
        std::vector<double> p(static_cast<std::size_t>(L));
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t i = 0; i < L; ++i) {
            probs_row(&layer.q(h, i, 0), layer.k, h, L, D, p.data());
            for (std::int64_t j = 0; j < L; ++j) layer.sums_all(h, j) += static_cast<float>(p[static_cast<std::size_t>(j)]);
            if (i == L - 1)
              for (std::int64_t j = 0; j < L; ++j) layer.sums_last(h, j) = static_cast<float>(p[static_cast<std::size_t>(j)]);
            if (i < L - Lw) continue;
            const std::int64_t w = i - (L - Lw);
            for (std::int64_t j = 0; j < L; ++j) {
              layer.p_window(h, w, j) = static_cast<float>(p[static_cast<std::size_t>(j)]);
              layer.sums_window(h, j) += static_cast<float>(p[static_cast<std::size_t>(j)]);
            }
            for (std::int64_t c = 0; c < D; ++c) {
              double o = 0;
              for (std::int64_t j = 0; j < L; ++j) o += p[static_cast<std::size_t>(j)] * layer.v(h, j, c);
              layer.o_full(h, w, c) = static_cast<float>(o);
            }
          }
        d->layers.push_back(std::move(layer));
      }
      for (const char* name : {"special", "punct"}) {
        const tensor<std::int64_t, 1> f = npy::load<std::int64_t, 1>((dir / (std::string(name) + ".npy")).string());
        auto& out = std::string(name) == "special" ? d->special : d->punct;
        for (std::int64_t j = 0; j < f.extent(0); ++j) out.push_back(f(j) != 0 ? 1 : 0);
      }
    } catch (const mnemo::error& e) {
      d->error = std::string("reading ") + dir.string() + ": " + e.what();
    }
    return d;
  }();
  return *data;
}

pol::observation observe(const real_data& d, std::size_t l, pol::attn_rows rows) {
  const real_layer& layer = d.layers[l];
  const tensor<float, 2>& sums = rows == pol::attn_rows::all    ? layer.sums_all
                                 : rows == pol::attn_rows::last ? layer.sums_last
                                                                : layer.sums_window;
  pol::observation o{layer.k, layer.v, cview(layer.q).narrow(1, d.L - real_window, real_window), sums};
  o.special = d.special;
  o.punct = d.punct;
  o.layer = static_cast<std::int64_t>(l);
  o.layers = static_cast<std::int64_t>(d.layers.size());
  o.causal = false;
  return o;
}

// Accumulates the error and the kept mass of one layer's selection (or, for channel pruning,
// of keys with the unkept channels zeroed: every slot kept).
struct quality {
  double err = 0, ref = 0, mass = 0;
  std::int64_t rows = 0;
  std::vector<double> layer_err, layer_ref;

  void add(const real_data& d, std::size_t l, const kvcache::selection& kept, const kvcache::selection* channels,
           const kvcache::reference::merged_kv* merged = nullptr) {
    const real_layer& layer = d.layers[l];
    const std::int64_t L = d.L, D = d.D, Lw = real_window;
    if (layer_err.size() < d.layers.size()) {
      layer_err.assign(d.layers.size(), 0.0);
      layer_ref.assign(d.layers.size(), 0.0);
    }
    std::vector<double> p(static_cast<std::size_t>(L)), o(static_cast<std::size_t>(D));
    tensor<float, 3> pruned;
    if (channels) {
      pruned = tensor<float, 3>({d.H, L, D});
      pol::think::prune(layer.k, *channels, pruned.as_view());
    }
    for (std::int64_t h = 0; h < d.H; ++h) {
      const auto& slots = kept.heads[static_cast<std::size_t>(h)];
      for (std::int64_t w = 0; w < Lw; ++w) {
        double m = 0;
        std::fill(o.begin(), o.end(), 0.0);
        if (channels) {
          probs_row(&layer.q(h, L - Lw + w, 0), pruned, h, L, D, p.data());
          m = 1;
          for (std::int64_t j = 0; j < L; ++j)
            for (std::int64_t c = 0; c < D; ++c) o[static_cast<std::size_t>(c)] += p[static_cast<std::size_t>(j)] * layer.v(h, j, c);
        } else if (merged) {  // attention over the kept slots' merged keys and values
          for (std::int64_t j : slots) m += layer.p_window(h, w, j);
          const auto n = static_cast<std::int64_t>(slots.size());
          const double scale = 1.0 / std::sqrt(static_cast<double>(D));
          double top = -INFINITY, z = 0;
          for (std::int64_t i = 0; i < n; ++i) {
            double s = 0;
            for (std::int64_t c = 0; c < D; ++c) s += static_cast<double>(layer.q(h, L - Lw + w, c)) * merged->k(h, i, c);
            p[static_cast<std::size_t>(i)] = scale * s;
            top = std::max(top, scale * s);
          }
          for (std::int64_t i = 0; i < n; ++i) z += p[static_cast<std::size_t>(i)] = std::exp(p[static_cast<std::size_t>(i)] - top);
          for (std::int64_t i = 0; i < n; ++i)
            for (std::int64_t c = 0; c < D; ++c)
              o[static_cast<std::size_t>(c)] += p[static_cast<std::size_t>(i)] / z * merged->v(h, i, c);
        } else {
          for (std::int64_t j : slots) m += layer.p_window(h, w, j);
          for (std::int64_t j : slots)
            for (std::int64_t c = 0; c < D; ++c)
              o[static_cast<std::size_t>(c)] += m > 0 ? layer.p_window(h, w, j) / m * layer.v(h, j, c) : 0.0;
        }
        double e = 0, r = 0;
        for (std::int64_t c = 0; c < D; ++c) {
          e += std::pow(o[static_cast<std::size_t>(c)] - layer.o_full(h, w, c), 2);
          r += std::pow(static_cast<double>(layer.o_full(h, w, c)), 2);
        }
        err += e;
        ref += r;
        layer_err[l] += e;
        layer_ref[l] += r;
        mass += m;
        ++rows;
      }
    }
  }
};

// Per head, the `budget` slots of highest mean attention of the window rows (the oracle).
kvcache::selection oracle(const real_layer& layer, std::int64_t budget) {
  return kvcache::top_budget(layer.sums_window, budget);
}

kvcache::selection random_slots(std::int64_t H, std::int64_t L, std::int64_t budget, std::mt19937& rng) {
  kvcache::selection sel;
  std::vector<std::int64_t> all(static_cast<std::size_t>(L));
  for (std::int64_t h = 0; h < H; ++h) {
    std::iota(all.begin(), all.end(), std::int64_t{0});
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<std::int64_t> row(all.begin(), all.begin() + std::min(budget, L));
    std::sort(row.begin(), row.end());
    sel.heads.push_back(std::move(row));
  }
  return sel;
}

void real_row(benchmark::State& state, const std::string& policy, std::int64_t pct) {
  const real_data& d = get_data();
  if (!d.error.empty()) {
    state.SkipWithError(d.error.c_str());
    return;
  }
  const std::int64_t budget = d.L * pct / 100;
  const pol::entry* e = policy == "oracle" || policy == "random" ? nullptr : &pol::find(policy);
  const bool channels = e && e->selects == pol::axis::channels;
  const std::int64_t b = channels ? std::max<std::int64_t>(1, d.D * pct / 100) : budget;
  std::mt19937 rng(12345);
  std::vector<kvcache::selection> sel(d.layers.size());
  std::vector<kvcache::merge_plan> plans(d.layers.size());
  auto decide = [&] {
    rng.seed(12345);  // the same random selection every iteration
    for (std::size_t l = 0; l < d.layers.size(); ++l) {
      if (!e) sel[l] = policy == "oracle" ? oracle(d.layers[l], budget) : random_slots(d.H, d.L, budget, rng);
      else if (e->plan) sel[l] = (plans[l] = e->plan(observe(d, l, e->rows), b)).keep;
      else sel[l] = e->select(observe(d, l, e->rows), b);
    }
  };
  for (auto _ : state) {
    decide();
    benchmark::DoNotOptimize(sel.data());
  }
  quality qa;
  for (std::size_t l = 0; l < d.layers.size(); ++l) {
    if (channels) {
      const kvcache::selection every = kvcache::top_budget(d.layers[l].sums_window, d.L);
      qa.add(d, l, every, &sel[l]);
    } else if (e && e->plan) {
      const kvcache::reference::merged_kv merged = kvcache::reference::merge(plans[l], d.layers[l].k, d.layers[l].v);
      qa.add(d, l, sel[l], nullptr, &merged);
    } else {
      qa.add(d, l, sel[l], nullptr);
    }
  }
  state.counters["rel_error"] = qa.ref > 0 ? std::sqrt(qa.err / qa.ref) : 0.0;
  state.counters["kept_mass"] = qa.rows ? qa.mass / static_cast<double>(qa.rows) : 0.0;
  for (std::size_t l = 0; l < qa.layer_err.size(); ++l)
    state.counters["rel_error_l" + std::to_string(l)] = qa.layer_ref[l] > 0 ? std::sqrt(qa.layer_err[l] / qa.layer_ref[l]) : 0.0;
  state.SetLabel("all-MiniLM-L6-v2 layers=" + std::to_string(d.layers.size()) + " H=" + std::to_string(d.H) +
                 " L=" + std::to_string(d.L) + " D=" + std::to_string(d.D) + " window=32 budget=" + std::to_string(b) +
                 (channels ? " (key channels)" : ""));
}

// kvcache_real/<kind>/rotate:<none|hadamard>/threads:1: the same 32 window rows answered by
// kvcache::decode over a cache holding all 512 slots of every layer in `kind` (KIVI int8/int4/int2:
// key groups of 32 tokens, one value group per token, a residual window of the newest 32 tokens in
// f32), with or without the randomized Hadamard rotation of keys and values (kvcache/rotation.hpp).
// Counter rel_error against the exact f32 output (o_full, double). Row time: the decode of the 32
// rows over the 6 layers. MiniLM's keys have no outlier channels (largest channel mean |k| over the
// median channel's: 1.6-1.9 per layer, against 20x and more in LLM keys), so the rotation has
// nothing to spread here (one run: int4 0.068 unrotated, 0.071 rotated); bench/kvcache_rows.cpp's
// kvcache_error rows show it on outlier keys.
void cache_row(benchmark::State& state, kvcache::storage kind, kvcache::rotation rot) {
  const real_data& d = get_data();
  if (!d.error.empty()) {
    state.SkipWithError(d.error.c_str());
    return;
  }
  const std::int64_t Lw = real_window, half = Lw / 2;
  std::vector<kvcache::layer_cache> caches;
  for (const real_layer& layer : d.layers) {
    kvcache::cache_config cfg{kind, d.H, d.L, d.D, d.D, {32, 128, 32}, {}};
    cfg.rotate.kind = rot;
    caches.emplace_back(cfg);
    caches.back().append(layer.k, layer.v);
  }
  std::vector<tensor<float, 3>> out(d.layers.size(), tensor<float, 3>({d.H, Lw, d.D}));
  attention::decode_workspace ws;
  auto run = [&] {
    for (std::size_t l = 0; l < d.layers.size(); ++l)
      for (std::int64_t r0 = 0; r0 < Lw; r0 += half)  // decode takes up to 16 rows a call
        kvcache::decode(caches[l], cview(d.layers[l].q).narrow(1, d.L - Lw + r0, half), out[l].as_view().narrow(1, r0, half),
                        {}, attention::options{}, ws);
  };
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(out.data());
  }
  double err = 0, ref = 0;
  for (std::size_t l = 0; l < d.layers.size(); ++l)
    for (std::int64_t h = 0; h < d.H; ++h)
      for (std::int64_t w = 0; w < Lw; ++w)
        for (std::int64_t c = 0; c < d.D; ++c) {
          err += std::pow(static_cast<double>(out[l](h, w, c)) - d.layers[l].o_full(h, w, c), 2);
          ref += std::pow(static_cast<double>(d.layers[l].o_full(h, w, c)), 2);
        }
  state.counters["rel_error"] = ref > 0 ? std::sqrt(err / ref) : 0.0;
  state.SetLabel(std::string("all-MiniLM-L6-v2 kv=") + kvcache::storage_name(kind) + " rotate=" + kvcache::rotation_name(rot) +
                 " key_group=32 residual=32 L=" + std::to_string(d.L));
}

const bool registered = [] {
  std::vector<std::string> policies = {"oracle", "random"};
  for (const pol::entry& e : pol::all()) policies.emplace_back(e.name);
  for (const std::string& p : policies)
    for (std::int64_t pct : {10, 25, 50})
      register_row(row_name("kvpolicy_real", p, {{"budget", std::to_string(pct)}, {"threads", "1"}}),
                   [p, pct](benchmark::State& st) { real_row(st, p, pct); })
          ->Unit(benchmark::kMillisecond);
  for (const kvcache::storage kind : {kvcache::storage::f16, kvcache::storage::int8, kvcache::storage::int4, kvcache::storage::int2})
    for (const kvcache::rotation rot : {kvcache::rotation::none, kvcache::rotation::hadamard})
      register_row(row_name("kvcache_real", kvcache::storage_name(kind), {{"rotate", kvcache::rotation_name(rot)}, {"threads", "1"}}),
                   [kind, rot](benchmark::State& st) { cache_row(st, kind, rot); })
          ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
