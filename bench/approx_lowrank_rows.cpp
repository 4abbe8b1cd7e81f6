// bench/approx_lowrank_rows.cpp — the low-rank / scan approximations of attention/approx/ beside
// dense flash, with each one's error against exact attention.
//
//   approx_lowrank/flash_dense/L:../threads:t         attention::flash, no mask (baseline of the
//                                                     non-causal rows)
//   approx_lowrank/nystrom/L:../threads:t             Nyströmformer, m = 64 landmarks, 6 Newton-Schulz steps
//   approx_lowrank/performer/L:../threads:t           Performer / FAVOR+, m = 256 orthogonal features
//   approx_lowrank/scatterbrain/L:../threads:t        Scatterbrain, m = 256 features, 16 LSH buckets
//   approx_lowrank/flash_dense_causal/L:../threads:t  attention::flash with the causal mask (baseline
//                                                     of the causal rows)
//   approx_lowrank/performer_causal/L:../threads:t    Performer, m = 256, prefix sums
//   approx_lowrank/flash_aaren_causal/L:../threads:t  attention::flash, causal, with one query per head
//                                                     repeated at every row (what Aaren computes)
//   approx_lowrank/aaren/L:../threads:t               Aaren, the blocked prefix scan (exact: its
//                                                     rel_error is float rounding)
//
// Shape: B = 1, H = 2 (Hq = Hkv), D = Dv = 64, L in {4096, 16384} (full; small: 4096; tiny: 256). At
// 16384 every row runs once (a dense iteration is seconds on a 2-core machine). Inputs: smooth
// sequences, every channel of q, k and v a sinusoid of position, x[i, c] = a sin(2 pi f_c i / L + p_c)
// with f_c uniform in [0.5, 4], p_c in [0, 2 pi), a = 0.5 for q and k (scaled scores up to ~1) and 1
// for v: the regime landmark and low-rank methods are made for (bench/approx_sparse_rows.cpp uses
// peaked, topic-clustered inputs, the sparse methods' regime). Uniform random q, k, v in [-1, 1] were
// tried first: attention is then nearly flat, the exact output is the mean of L random values
// (tiny), and every approximation measured rel_error 0.90-0.93 at L = 4096, which says nothing.
// Scatterbrain's 16 buckets: at 64, queries and keys of these inputs hardly ever share a bucket
// (rel_error equal to Performer's at L = 2048; 16 buckets: 0.15 against 0.17, 2 buckets: 0.12).
// Aaren's query per head is q's last row of that head.
// Counter rel_error = ||out - exact|| / ||exact|| over the last 512 query rows, exact from
// attention::flash on those rows with the row's own mask (computed once per L, untimed; the causal
// mask is bottom-right aligned, so the last rows alone are exact); FLOP/s on the dense rows only.
//   bench/plot out.json --filter '^approx_lowrank/' --baseline flash_dense
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/approx/aaren.hpp"
#include "mnemo/attention/approx/nystrom.hpp"
#include "mnemo/attention/approx/performer.hpp"
#include "mnemo/attention/approx/scatterbrain.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"

namespace mnemo::bench {
namespace {

namespace ap = attention::approx;

constexpr std::int64_t lr_H = 2, lr_D = 64, error_rows = 512;
constexpr std::int64_t nystrom_landmarks = 64, favor_features = 256, lsh_buckets = 16, aaren_block = 256;

std::vector<std::int64_t> lengths() {
  if (tiny_size()) return {256};
  // 16384 at the full size only: its dense rows take about 20 s of the small run on 2 Zen 1 cores.
  return full_size() ? std::vector<std::int64_t>{4096, 16384} : std::vector<std::int64_t>{4096};
}

// Inputs and the exact outputs of the last rows (non-causal, causal, Aaren's), built once per L.
struct inputs {
  std::int64_t L, rows;
  tensor<float, 4> q, k, v, rep;              // rep: each head's learned query at every row [1, H, L, D]
  tensor<float, 3> q1;                        // Aaren's query [1, H, D]
  tensor<float, 4> exact, exact_causal, exact_aaren;  // [1, H, rows, D]

  explicit inputs(std::int64_t L_)
      : L(L_), rows(std::min(error_rows, L_)), q({1, lr_H, L_, lr_D}), k(q.shape()), v(q.shape()), rep(q.shape()),
        q1({1, lr_H, lr_D}), exact({1, lr_H, rows, lr_D}), exact_causal(exact.shape()), exact_aaren(exact.shape()) {
    std::uint64_t n = 0;
    for (tensor<float, 4>* x : {&q, &k, &v}) {
      const double amplitude = x == &v ? 1.0 : 0.5;
      for (std::int64_t h = 0; h < lr_H; ++h)
        for (std::int64_t c = 0; c < lr_D; ++c) {
          const double f = random_uniform(7, n++, 0.5f, 4.0f), p = random_uniform(7, n++, 0.0f, 6.2831853f);
          for (std::int64_t i = 0; i < L; ++i)
            (*x)(0, h, i, c) = static_cast<float>(amplitude * std::sin(6.283185307179586 * f * static_cast<double>(i) /
                                                                       static_cast<double>(L) + p));
        }
    }
    for (std::int64_t h = 0; h < lr_H; ++h)
      for (std::int64_t c = 0; c < lr_D; ++c) {
        q1(0, h, c) = q(0, h, L - 1, c);
        for (std::int64_t i = 0; i < L; ++i) rep(0, h, i, c) = q1(0, h, c);
      }
    attention::flash(cview(q).narrow(2, L - rows, rows), k, v, exact.as_view());
    attention::flash(cview(q).narrow(2, L - rows, rows), k, v, exact_causal.as_view(), {}, attention::mods::causal{});
    attention::flash(cview(rep).narrow(2, L - rows, rows), k, v, exact_aaren.as_view(), {}, attention::mods::causal{});
  }

  static const inputs& get(std::int64_t L) {
    static std::map<std::int64_t, std::unique_ptr<inputs>> cache;
    auto& p = cache[L];
    if (!p) p = std::make_unique<inputs>(L);
    return *p;
  }
};

enum class truth { plain, causal, aaren };

using method = void (*)(const inputs&, tensor<float, 4>&, int threads);

void run_flash(const inputs& in, tensor<float, 4>& out, int threads) {
  attention::options o;
  o.threads = threads;
  attention::flash(cview(in.q), in.k, in.v, out.as_view(), {}, attention::mods::none{}, o);
}
void run_flash_causal(const inputs& in, tensor<float, 4>& out, int threads) {
  attention::options o;
  o.threads = threads;
  attention::flash(cview(in.q), in.k, in.v, out.as_view(), {}, attention::mods::causal{}, o);
}
void run_flash_aaren(const inputs& in, tensor<float, 4>& out, int threads) {
  attention::options o;
  o.threads = threads;
  attention::flash(cview(in.rep), in.k, in.v, out.as_view(), {}, attention::mods::causal{}, o);
}
void run_nystrom(const inputs& in, tensor<float, 4>& out, int threads) {
  ap::nystrom_options o;
  o.landmarks = nystrom_landmarks;
  o.threads = threads;
  ap::nystrom(cview(in.q), cview(in.k), cview(in.v), out.as_view(), o);
}
template <bool Causal>
void run_performer(const inputs& in, tensor<float, 4>& out, int threads) {
  ap::performer_options o;
  o.features = favor_features;
  o.causal = Causal;
  o.threads = threads;
  ap::performer(cview(in.q), cview(in.k), cview(in.v), out.as_view(), o);
}
void run_scatterbrain(const inputs& in, tensor<float, 4>& out, int threads) {
  ap::scatterbrain_options o;
  o.features = favor_features;
  o.buckets = lsh_buckets;
  o.threads = threads;
  ap::scatterbrain(cview(in.q), cview(in.k), cview(in.v), out.as_view(), o);
}
void run_aaren(const inputs& in, tensor<float, 4>& out, int threads) {
  ap::aaren_options o;
  o.block = aaren_block;
  o.threads = threads;
  ap::aaren(cview(in.q1), cview(in.k), cview(in.v), out.as_view(), {}, o);
}

void row(benchmark::State& state, std::int64_t L, method m, truth t, bool dense, int threads) {
  const inputs& in = inputs::get(L);
  tensor<float, 4> out({1, lr_H, L, lr_D});
  for (auto _ : state) {
    m(in, out, threads);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const bool causal = t != truth::plain;
  if (dense) {
    const double pairs = causal ? static_cast<double>(L) * static_cast<double>(L + 1) / 2.0
                                : static_cast<double>(L) * static_cast<double>(L);
    set_rate_counters(state, 4.0 * lr_D * lr_H * pairs, 0);
  }
  const tensor<float, 4>& want = t == truth::plain ? in.exact : t == truth::causal ? in.exact_causal : in.exact_aaren;
  state.counters["rel_error"] = ap::relative_error(cview(out).narrow(2, L - in.rows, in.rows), cview(want));
  state.SetLabel("B=1 Hq=2 Hkv=2 Lq=" + std::to_string(L) + " Lk=" + std::to_string(L) + " D=64 Dv=64 causal=" +
                 (causal ? "1" : "0") + " threads=" + std::to_string(threads));
}

struct entry {
  const char* impl;
  method m;
  truth t;
  bool dense;
};

const bool registered = [] {
  const std::vector<entry> methods = {{"flash_dense", run_flash, truth::plain, true},
                                      {"nystrom", run_nystrom, truth::plain, false},
                                      {"performer", run_performer<false>, truth::plain, false},
                                      {"scatterbrain", run_scatterbrain, truth::plain, false},
                                      {"flash_dense_causal", run_flash_causal, truth::causal, true},
                                      {"performer_causal", run_performer<true>, truth::causal, false},
                                      {"flash_aaren_causal", run_flash_aaren, truth::aaren, true},
                                      {"aaren", run_aaren, truth::aaren, false}};
  for (std::int64_t L : lengths())
    for (int t : thread_counts())
      for (const entry& e : methods) {
        auto* r = register_row(row_name("approx_lowrank", e.impl, {{"L", std::to_string(L)}, {"threads", std::to_string(t)}}),
                               [L, e, t](benchmark::State& st) {
                                 if (threads_available(st, t)) row(st, L, e.m, e.t, e.dense, t);
                               });
        if (L >= 16384) r->Iterations(1)->Repetitions(1);
      }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
