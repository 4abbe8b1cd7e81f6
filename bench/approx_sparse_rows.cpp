// bench/approx_sparse_rows.cpp — the sparse approximations of attention/approx/ beside dense flash,
// with each one's error against exact attention.
//
//   approx_sparse/flash_dense/L:../threads:t   attention::flash, causal (the baseline)
//   approx_sparse/routing/L:../threads:t       Routing, C = sqrt(L) clusters (the k-means state
//                                              trained by 4 update steps on the inputs, untimed)
//   approx_sparse/probsparse/L:../threads:t    Informer ProbSparse, factor 5 (u = 5 ceil(ln L)
//                                              rows, 5 ceil(ln L) sampled keys), causal (the
//                                              cumulative mean for the other rows)
//   approx_sparse/sparsek/L:../threads:t       SPARSEK, k = 512 keys, prefill window 64,   scores
//                                              z_j = w . k_j with w = the head's mean query (a
//                                              stand-in for the trained scoring network)
//   approx_sparse/combiner/L:../threads:t      Combiner-Fixed, block = sqrt(L), mean summaries
//
// Shape: B = 1, H = 2 (Hq = Hkv), D = Dv = 64, causal, L in {4096, 16384} (full; small: 4096;
// tiny: 256). At 16384 every row runs once (a dense iteration is seconds on a 2-core machine).
// Inputs: 64 random unit "topic" directions per head; every token has a random topic, and its
// query and key are gain * topic + N(0, 0.5^2) noise, gain = sqrt(6 sqrt(D)): scaled same-topic
// scores near 6, others near 0 +- 0.9 (topics are random directions), so attention is peaked on the ~L/64 keys of a query's topic (random
// uniform inputs give nearly flat attention, where every sparse method looks bad). A key's value is
// its topic's value (uniform in [-1, 1]) plus uniform noise of 0.5, so the exact output is about the
// value of the query's topic (with i.i.d. values it is a near-zero average, and any subset of keys
// gives a relative error near 1).
// Counter rel_error = ||out - exact|| / ||exact|| over the last 512 query rows, exact from
// attention::flash on those rows (computed once per L, untimed); FLOP/s on the dense row only.
//   bench/plot out.json --filter '^approx_sparse/' --baseline flash_dense
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/approx/combiner.hpp"
#include "mnemo/attention/approx/positions.hpp"
#include "mnemo/attention/approx/probsparse.hpp"
#include "mnemo/attention/approx/routing.hpp"
#include "mnemo/attention/approx/sparsek.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"

namespace mnemo::bench {
namespace {

namespace ap = attention::approx;

constexpr std::int64_t approx_H = 2, approx_D = 64, approx_topics = 64, error_rows = 512;
constexpr double noise = 0.5;  // per component, against the topic's gain
constexpr std::int64_t sparsek_window = 64, sparsek_k = 512, routing_steps = 4;

std::vector<std::int64_t> lengths() {
  if (tiny_size()) return {256};
  // 16384 at the full size only: its dense rows take about 20 s of the small run on 2 Zen 1 cores.
  return full_size() ? std::vector<std::int64_t>{4096, 16384} : std::vector<std::int64_t>{4096};
}

std::int64_t isqrt(std::int64_t L) { return static_cast<std::int64_t>(std::lround(std::sqrt(static_cast<double>(L)))); }

// Inputs, the exact output of the last rows, and each method's state, built once per L.
struct inputs {
  std::int64_t L;
  tensor<float, 4> q, k, v, exact;  // exact: [1, H, rows, D] for the last `rows` queries
  std::int64_t rows;
  ap::routing_state routing;
  tensor<float, 3> z;  // SPARSEK scores [1, H, L]

  explicit inputs(std::int64_t L_)
      : L(L_), q({1, approx_H, L_, approx_D}), k(q.shape()), v(q.shape()), rows(std::min(error_rows, L_)) {
    const double gain = std::sqrt(6.0 * std::sqrt(static_cast<double>(approx_D)));
    tensor<float, 2> topic_value({approx_topics, approx_D});
    fill_random(topic_value, 3);
    for (std::int64_t h = 0; h < approx_H; ++h) {
      ap::sparse_detail::random_stream rng(11, static_cast<std::uint64_t>(h));
      std::vector<double> topic(static_cast<std::size_t>(approx_topics * approx_D));
      for (std::int64_t t = 0; t < approx_topics; ++t) {
        double n2 = 0;
        for (std::int64_t e = 0; e < approx_D; ++e) n2 += std::pow(topic[t * approx_D + e] = rng.normal(), 2);
        for (std::int64_t e = 0; e < approx_D; ++e) topic[t * approx_D + e] /= std::sqrt(n2);
      }
      for (tensor<float, 4>* x : {&q, &k})
        for (std::int64_t i = 0; i < L; ++i) {
          const std::int64_t t = rng.below(approx_topics);
          for (std::int64_t e = 0; e < approx_D; ++e)
            (*x)(0, h, i, e) = static_cast<float>(gain * topic[t * approx_D + e] + noise * rng.normal());
          if (x == &k)  // the key's value: its topic's value plus noise
            for (std::int64_t e = 0; e < approx_D; ++e)
              v(0, h, i, e) = static_cast<float>(topic_value(t, e) + noise * (2.0 * rng.uniform() - 1.0));
        }
    }
    exact = tensor<float, 4>({1, approx_H, rows, approx_D});
    attention::flash(cview(q).narrow(2, L - rows, rows), k, v, exact.as_view(), {}, attention::mods::causal{});
    routing = ap::routing_init(approx_H, isqrt(L), approx_D, 5);
    for (std::int64_t s = 0; s < routing_steps; ++s) ap::routing_update(routing, cview(q), cview(k), 0.0f);
    // SPARSEK scores: w = the mean query of the head.
    z = tensor<float, 3>({1, approx_H, L});
    tensor<float, 2> w({approx_H, approx_D});
    for (std::int64_t h = 0; h < approx_H; ++h)
      for (std::int64_t e = 0; e < approx_D; ++e) {
        double s = 0;
        for (std::int64_t i = 0; i < L; ++i) s += q(0, h, i, e);
        w(h, e) = static_cast<float>(s / static_cast<double>(L));
      }
    ap::sparsek_scores(cview(k), cview(w), z.as_view());
  }

  static const inputs& get(std::int64_t L) {
    static std::map<std::int64_t, std::unique_ptr<inputs>> cache;
    auto& p = cache[L];
    if (!p) p = std::make_unique<inputs>(L);
    return *p;
  }

  // ||out - exact|| / ||exact|| over the last rows.
  double rel_error(const tensor<float, 4>& out) const {
    double e = 0, r = 0;
    for (std::int64_t h = 0; h < approx_H; ++h)
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t c = 0; c < approx_D; ++c) {
          const double want = exact(0, h, i, c), got = out(0, h, L - rows + i, c);
          e += (got - want) * (got - want);
          r += want * want;
        }
    return std::sqrt(e / r);
  }
};

using method = void (*)(const inputs&, tensor<float, 4>&, int threads);

void run_flash(const inputs& in, tensor<float, 4>& out, int threads) {
  attention::options o;
  o.threads = threads;
  attention::flash(cview(in.q), in.k, in.v, out.as_view(), {}, attention::mods::causal{}, o);
}
void run_routing(const inputs& in, tensor<float, 4>& out, int threads) {
  attention::options o;
  o.threads = threads;
  ap::routing_attention(cview(in.q), cview(in.k), cview(in.v), in.routing, true, out.as_view(), {}, o);
}
void run_probsparse(const inputs& in, tensor<float, 4>& out, int threads) {
  attention::options o;
  o.threads = threads;
  ap::probsparse_options p;
  p.causal = true;
  p.seed = 1;
  ap::probsparse_attention(cview(in.q), cview(in.k), cview(in.v), out.as_view(), p, {}, o);
}
void run_sparsek(const inputs& in, tensor<float, 4>& out, int threads) {
  attention::options o;
  o.threads = threads;
  const ap::sparsek_options p{sparsek_k, true, sparsek_window};
  ap::sparsek_attention(cview(in.q), cview(in.k), cview(in.v), cview(in.z), p, out.as_view(), {}, o);
}
void run_combiner(const inputs& in, tensor<float, 4>& out, int threads) {
  attention::options o;
  o.threads = threads;
  ap::combiner_attention(cview(in.q), cview(in.k), cview(in.v), {isqrt(in.L), true}, out.as_view(), {}, o);
}

void row(benchmark::State& state, std::int64_t L, method m, bool dense, int threads) {
  const inputs& in = inputs::get(L);
  tensor<float, 4> out({1, approx_H, L, approx_D});
  for (auto _ : state) {
    m(in, out, threads);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  if (dense) {
    const double pairs = static_cast<double>(L) * static_cast<double>(L + 1) / 2.0;
    set_rate_counters(state, 4.0 * approx_D * approx_H * pairs, 0);
  }
  state.counters["rel_error"] = in.rel_error(out);
  state.SetLabel("B=1 Hq=2 Hkv=2 Lq=" + std::to_string(L) + " Lk=" + std::to_string(L) + " D=64 Dv=64 causal=1");
}

const bool registered = [] {
  const std::vector<std::pair<const char*, method>> methods = {{"flash_dense", run_flash},
                                                               {"routing", run_routing},
                                                               {"probsparse", run_probsparse},
                                                               {"sparsek", run_sparsek},
                                                               {"combiner", run_combiner}};
  for (std::int64_t L : lengths())
    for (int t : thread_counts())
      for (const auto& [impl, m] : methods) {
        const bool dense = std::string(impl) == "flash_dense";
        auto* r = register_row(row_name("approx_sparse", impl, {{"L", std::to_string(L)}, {"threads", std::to_string(t)}}),
                               [L, m = m, dense, t](benchmark::State& st) {
                                 if (threads_available(st, t)) row(st, L, m, dense, t);
                               });
        if (L >= 16384) r->Iterations(1)->Repetitions(1);
      }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
