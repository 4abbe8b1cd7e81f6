// fuzz/memory_fuzz.cpp — the memory modules' fast paths against their double-precision references,
// on shapes, options and data decoded from the input:
//  * Infini-attention (memory::infini_attention, compressive.hpp): out and the state after the
//    call (M and z, carried over a second call) against memory::reference::infini_attention, for
//    the linear and the delta rule, one segment or several;
//  * kNN memory (knn.hpp): a FIFO memory filled by add() (wrapping around its capacity), then
//    knn_attention against reference::knn_attention — compared only when the reference's k-th and
//    (k+1)-th scores are apart by more than f32 rounding, since either slot may be taken on a tie;
//  * product-key memory (product_keys.hpp): pkm_forward's indices in range and distinct, weights a
//    softmax of its scores, out = sum over heads of weights x values (checked in double from the
//    fast path's own selection), and its best score equal to the reference's.
// Every output sits in a buffer with canary cells around it; an exception other than mnemo::error,
// a write outside an output, or a disagreement aborts.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <span>
#include <vector>

#include "common.hpp"
#include "mnemo/memory/compressive.hpp"
#include "mnemo/memory/knn.hpp"
#include "mnemo/memory/product_keys.hpp"

namespace {

using namespace mnemo;
namespace mem = mnemo::memory;

// Values of a normal distribution times 2^e, e decoded from the input (big and small magnitudes).
struct source {
  std::mt19937 rng;
  std::normal_distribution<float> normal;
  float scale;
  float operator()() { return scale * normal(rng); }
};

// Up to 2^3: sigma(k) = e^k of keys near -48 (2^3 x 6 sigma) is still a normal f32. Below that the
// state M, z itself (f32 by contract) holds subnormals of a few bits, and the two paths' roundings
// of them, not the paths, decide the quotients (tests/memory/compressive_test.cpp holds the fast
// path to the reference for queries near -100, where only the feature rows are extreme).
source make_source(FuzzedDataProvider& in) {
  const std::uint32_t seed = in.ConsumeIntegral<std::uint32_t>();
  const int e = in.ConsumeIntegralInRange<int>(-6, 3);
  return {std::mt19937(seed), {}, std::ldexp(1.0f, e)};
}

void compare(const char* what, const float* got, const float* want, std::int64_t n, double atol, double rtol) {
  for (std::int64_t i = 0; i < n; ++i)
    if (!fuzz::close(got[i], want[i], atol, rtol)) fuzz::die("%s[%lld]: %.9g, reference %.9g", what, static_cast<long long>(i), got[i], want[i]);
}

// Largest |x| of a view's cells (tolerances scale with it).
template <class V>
double largest(const V& v) {
  double m = 0;
  for (std::int64_t a = 0; a < v.extent(0); ++a)
    for (std::int64_t b = 0; b < v.extent(1); ++b)
      for (std::int64_t c = 0; c < v.extent(2); ++c)
        for (std::int64_t d = 0; d < v.extent(3); ++d) m = std::max(m, std::abs(static_cast<double>(v(a, b, c, d))));
  return m;
}

// Copies a 4-d view into a contiguous vector (for comparisons).
template <class V>
std::vector<float> flat(const V& v) {
  std::vector<float> out;
  for (std::int64_t a = 0; a < v.extent(0); ++a)
    for (std::int64_t b = 0; b < v.extent(1); ++b)
      for (std::int64_t c = 0; c < v.extent(2); ++c)
        for (std::int64_t d = 0; d < v.extent(3); ++d) out.push_back(v(a, b, c, d));
  return out;
}

void infini(FuzzedDataProvider& in) {
  const std::int64_t B = in.ConsumeIntegralInRange<std::int64_t>(1, 2), H = in.ConsumeIntegralInRange<std::int64_t>(1, 3);
  const std::int64_t L = in.ConsumeIntegralInRange<std::int64_t>(1, 40), Dk = in.ConsumeIntegralInRange<std::int64_t>(1, 20);
  const std::int64_t Dv = in.ConsumeIntegralInRange<std::int64_t>(1, 20), pad = in.ConsumeIntegralInRange<std::int64_t>(0, 3);
  mem::compressive_options opt;
  opt.segment_len = in.ConsumeIntegralInRange<std::int64_t>(0, L);
  opt.update = in.ConsumeBool() ? mem::compressive_rule::delta : mem::compressive_rule::linear;
  opt.threads = in.ConsumeIntegralInRange<int>(1, 3);
  source gen = make_source(in);
  fuzz::buffer4<float> q({B, H, L, Dk}, pad, in.ConsumeBool()), k({B, H, L, Dk}, pad, false), v({B, H, L, Dv}, pad, false);
  fuzz::fill(q.view(), gen), fuzz::fill(k.view(), gen), fuzz::fill(v.view(), gen);
  tensor<float, 1> beta({H});
  for (std::int64_t h = 0; h < H; ++h) beta(h) = 2.0f * gen.normal(gen.rng);
  mem::compressive_state state(B, H, Dk, Dv), want_state(B, H, Dk, Dv);
  // Two calls: the second starts from the state the first left.
  for (int call = 0; call < 2; ++call) {
    fuzz::buffer4<float> out({B, H, L, Dv}, pad, false), want({B, H, L, Dv}, 0, false);
    mem::reference::infini_attention(q.cview(), k.cview(), v.cview(), beta.as_view(), want_state, want.view(), opt);
    mem::infini_attention(q.cview(), k.cview(), v.cview(), beta.as_view(), state, out.view(), opt);
    fuzz::check(out.canaries_intact(), "infini_attention wrote outside out");
    // The delta rule's memory grows with every segment: tolerances relative to what was stored.
    const double m = std::max({largest(want_state.memory()), largest(want.cview()), 1e-30});
    const std::vector<float> got_o = flat(out.cview()), want_o = flat(want.cview());
    compare("infini out", got_o.data(), want_o.data(), static_cast<std::int64_t>(got_o.size()), 2e-4 * m, 2e-3);
    const std::vector<float> got_m = flat(state.memory()), want_m = flat(want_state.memory());
    compare("infini M", got_m.data(), want_m.data(), static_cast<std::int64_t>(got_m.size()), 2e-4 * m, 2e-3);
    const view<const float, 3> z = state.normalizer(), wz = want_state.normalizer();
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h) compare("infini z", z.ptr(b, h, 0), wz.ptr(b, h, 0), Dk, 1e-4 * largest(k.cview()) * L, 1e-4);
  }
  fuzz::stats::count("infini compared");
}

void knn(FuzzedDataProvider& in) {
  const std::int64_t B = in.ConsumeIntegralInRange<std::int64_t>(1, 2), H = in.ConsumeIntegralInRange<std::int64_t>(1, 2);
  const std::int64_t D = in.ConsumeIntegralInRange<std::int64_t>(1, 24), Dv = in.ConsumeIntegralInRange<std::int64_t>(1, 16);
  const std::int64_t cap = in.ConsumeIntegralInRange<std::int64_t>(1, 64), Lq = in.ConsumeIntegralInRange<std::int64_t>(1, 20);
  const std::int64_t topk = in.ConsumeIntegralInRange<std::int64_t>(0, 70);  // 0 is rejected; past the size, missing entries
  mem::knn_options opt;
  opt.threads = in.ConsumeIntegralInRange<int>(1, 3);
  source gen = make_source(in);
  mem::knn_memory memory(B, H, D, Dv, cap);
  const int adds = in.ConsumeIntegralInRange<int>(1, 3);
  for (int a = 0; a < adds; ++a) {
    const std::int64_t L = in.ConsumeIntegralInRange<std::int64_t>(0, 50);
    tensor<float, 4> k({B, H, L, D}), v({B, H, L, Dv});
    for (float& x : std::span(k.data(), static_cast<std::size_t>(k.size()))) x = gen();
    for (float& x : std::span(v.data(), static_cast<std::size_t>(v.size()))) x = gen();
    memory.add(cview(k), cview(v));
  }
  fuzz::buffer4<float> q({B, H, Lq, D}, 1, in.ConsumeBool()), out({B, H, Lq, Dv}, 2, false), want({B, H, Lq, Dv}, 0, false);
  fuzz::fill(q.view(), gen);
  fuzz::buffer3 lse({B, H, Lq}), want_lse({B, H, Lq});
  try {
    mem::knn_attention(q.cview(), memory, topk, out.view(), lse.view(), opt);
  } catch (const mnemo::error&) {
    fuzz::check(topk < 1, "knn_attention rejected a topk >= 1");
    fuzz::stats::count("knn rejected");
    return;
  }
  fuzz::check(topk >= 1, "knn_attention accepted topk 0");
  fuzz::check(out.canaries_intact() && lse.canaries_intact(), "knn_attention wrote outside its outputs");
  mem::reference::knn_attention(q.cview(), memory, topk, want.view(), want_lse.view(), opt);
  // Ties at the k-th score: the two paths may keep different slots. Compare only rows whose k-th
  // and (k+1)-th reference scores are apart.
  const double scale = opt.scale != 0 ? opt.scale : 1.0 / std::sqrt(static_cast<double>(D));
  const double vmax = std::max(largest(memory.values()), 1e-30);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      double kk = 0;  // the largest |key| of this head's memory
      for (std::int64_t j = 0; j < memory.size(); ++j)
        for (std::int64_t c = 0; c < D; ++c) kk = std::max(kk, std::abs(static_cast<double>(memory.keys()(b, h, j, c))));
      for (std::int64_t i = 0; i < Lq; ++i) {
        std::vector<double> s;
        double qq = 0;
        for (std::int64_t c = 0; c < D; ++c) qq += static_cast<double>(q.cview()(b, h, i, c)) * q.cview()(b, h, i, c);
        for (std::int64_t j = 0; j < memory.size(); ++j) {
          double dot = 0;
          for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(q.cview()(b, h, i, c)) * memory.keys()(b, h, j, c);
          s.push_back(scale * dot);
        }
        std::sort(s.begin(), s.end(), std::greater<>());
        const double margin = 1e-5 * scale * std::sqrt(qq) * kk * std::sqrt(static_cast<double>(D)) + 1e-30;
        if (topk < memory.size() && s[static_cast<std::size_t>(topk - 1)] - s[static_cast<std::size_t>(topk)] <= margin) {
          fuzz::stats::count("knn row skipped (tie at k)");
          continue;
        }
        for (std::int64_t c = 0; c < Dv; ++c)
          if (!fuzz::close(out.cview()(b, h, i, c), want.cview()(b, h, i, c), 1e-4 * vmax, 1e-3))
            fuzz::die("knn out (%lld %lld %lld %lld): %.9g, reference %.9g", static_cast<long long>(b), static_cast<long long>(h),
                      static_cast<long long>(i), static_cast<long long>(c), out.cview()(b, h, i, c), want.cview()(b, h, i, c));
        const float gl = lse.view()(b, h, i), wl = want_lse.view()(b, h, i);
        if (!fuzz::close(gl, wl, 1e-4 * (1 + std::abs(wl)), 1e-5)) fuzz::die("knn lse: %.9g, reference %.9g", gl, wl);
      }
    }
  fuzz::stats::count("knn compared");
}

void pkm(FuzzedDataProvider& in) {
  const std::int64_t N = in.ConsumeIntegralInRange<std::int64_t>(1, 6), heads = in.ConsumeIntegralInRange<std::int64_t>(1, 3);
  const std::int64_t half = in.ConsumeIntegralInRange<std::int64_t>(1, 12), n_keys = in.ConsumeIntegralInRange<std::int64_t>(1, 12);
  const std::int64_t v_dim = in.ConsumeIntegralInRange<std::int64_t>(1, 16);
  const std::int64_t knn = in.ConsumeIntegralInRange<std::int64_t>(0, n_keys + 1);  // 0 and > n_keys are rejected
  mem::pkm_options opt;
  opt.query_norm = in.ConsumeBool();
  opt.threads = in.ConsumeIntegralInRange<int>(1, 3);
  source gen = make_source(in);
  tensor<float, 3> query({N, heads, 2 * half});
  tensor<float, 4> keys({heads, 2, n_keys, half});
  tensor<float, 2> values({n_keys * n_keys, v_dim});
  for (std::int64_t i = 0; i < query.size(); ++i) query.data()[i] = gen();
  for (std::int64_t i = 0; i < keys.size(); ++i) keys.data()[i] = gen();
  for (std::int64_t i = 0; i < values.size(); ++i) values.data()[i] = gen();
  const std::int64_t kk = std::max<std::int64_t>(knn, 1);
  fuzz::buffer4<float> out({1, 1, N, v_dim}, 2, false);
  fuzz::buffer3 weights({N, heads, kk}), scores({N, heads, kk});
  // indices: int64 cells between guards of a value no index has
  constexpr std::int64_t guard = 8, marker = -777;
  std::vector<std::int64_t> index_cells(static_cast<std::size_t>(N * heads * kk + 2 * guard), marker);
  const view<float, 2> o(out.view().ptr(0, 0, 0), {N, v_dim}, {out.strides[2], 1});
  const view<float, 3> w = weights.view(), s = scores.view();
  const view<std::int64_t, 3> idx(index_cells.data() + guard, {N, heads, kk});
  try {
    mem::pkm_forward(cview(query), cview(keys), cview(values), knn, o, idx, w, s, opt);
  } catch (const mnemo::error&) {
    fuzz::check(knn < 1 || knn > n_keys, "pkm_forward rejected a valid knn");
    fuzz::stats::count("pkm rejected");
    return;
  }
  fuzz::check(knn >= 1 && knn <= n_keys, "pkm_forward accepted a knn outside [1, n_keys]");
  bool guards = true;
  for (std::int64_t i = 0; i < guard; ++i)
    guards = guards && index_cells[static_cast<std::size_t>(i)] == marker && index_cells[index_cells.size() - 1 - static_cast<std::size_t>(i)] == marker;
  fuzz::check(out.canaries_intact() && weights.canaries_intact() && scores.canaries_intact() && guards,
              "pkm_forward wrote outside its outputs");
  std::vector<double> sum(static_cast<std::size_t>(N * v_dim), 0.0);
  double vmax = 1e-30;
  for (std::int64_t i = 0; i < values.size(); ++i) vmax = std::max(vmax, std::abs(static_cast<double>(values.data()[i])));
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t h = 0; h < heads; ++h) {
      double wsum = 0, smax = -INFINITY;
      for (std::int64_t j = 0; j < knn; ++j) smax = std::max(smax, static_cast<double>(s(n, h, j)));
      for (std::int64_t j = 0; j < knn; ++j) {
        const std::int64_t id = idx(n, h, j);
        fuzz::check(id >= 0 && id < n_keys * n_keys, "pkm index out of range");
        for (std::int64_t j2 = 0; j2 < j; ++j2) fuzz::check(idx(n, h, j2) != id, "pkm index selected twice");
        const double want_w = std::exp(static_cast<double>(s(n, h, j)) - smax);
        wsum += want_w;
        for (std::int64_t c = 0; c < v_dim; ++c) sum[static_cast<std::size_t>(n * v_dim + c)] += static_cast<double>(w(n, h, j)) * values(id, c);
      }
      for (std::int64_t j = 0; j < knn; ++j) {
        const double want_w = std::exp(static_cast<double>(s(n, h, j)) - smax) / wsum;
        if (!fuzz::close(w(n, h, j), want_w, 1e-5, 1e-4)) fuzz::die("pkm weight %.9g, softmax of its scores %.9g", w(n, h, j), want_w);
      }
    }
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < v_dim; ++c)
      if (!fuzz::close(o(n, c), sum[static_cast<std::size_t>(n * v_dim + c)], 1e-5 * vmax * heads, 1e-4))
        fuzz::die("pkm out %.9g, sum of its weights x values %.9g", o(n, c), sum[static_cast<std::size_t>(n * v_dim + c)]);
  // The best score is the reference's (no tie question there).
  tensor<float, 2> ro({N, v_dim});
  tensor<std::int64_t, 3> ri({N, heads, knn});
  tensor<float, 3> rw({N, heads, knn}), rs({N, heads, knn});
  mem::reference::pkm_forward(cview(query), cview(keys), cview(values), knn, ro, ri, rw, rs, opt);
  double kmax = 0;  // the largest |sub-key|
  for (std::int64_t i = 0; i < keys.size(); ++i) kmax = std::max(kmax, std::abs(static_cast<double>(keys.data()[i])));
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t h = 0; h < heads; ++h) {
      double best = -INFINITY, want = -INFINITY, qmax = 0;
      for (std::int64_t j = 0; j < knn; ++j) best = std::max(best, static_cast<double>(s(n, h, j))), want = std::max(want, static_cast<double>(rs(n, h, j)));
      for (std::int64_t c = 0; c < 2 * half; ++c) qmax = std::max(qmax, std::abs(static_cast<double>(query(n, h, c))));
      const double atol = 1e-5 * 2 * half * (opt.query_norm ? 1.0 : qmax) * kmax + 1e-30;
      if (!fuzz::close(best, want, atol, 1e-5)) fuzz::die("pkm best score %.9g, reference %.9g", best, want);
    }
  fuzz::stats::count("pkm compared");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  try {
    switch (in.ConsumeIntegralInRange<int>(0, 2)) {
      case 0: infini(in); break;
      case 1: knn(in); break;
      default: pkm(in); break;
    }
  } catch (const mnemo::error&) {
    fuzz::stats::count("rejected");
  }
  return 0;
}
