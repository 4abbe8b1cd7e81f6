// fuzz/merge_fuzz.cpp — attention::merge (2-way, in place, and N-way) and attention::decode.
//
// Two properties, chosen by the first byte:
//  * exactness: keys cut into N contiguous parts (some empty) at positions from the input; the
//    reference over each part, merged N-way and by a chain of in-place 2-way merges, equals the
//    reference over all keys (and decode over all keys equals it too);
//  * arbitrary partials: (out, lse) parts with lse anywhere in [-1e4, 1e4] or -inf, merged, equal
//    a double-precision merge written here from the formula (decode.hpp's header); a row whose
//    parts are all -inf gives out = 0, lse = -inf.
// Shape mismatches must throw mnemo::error. Nothing is written outside out and lse.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/reference.hpp"

namespace {

using namespace mnemo;
constexpr float minus_inf = -std::numeric_limits<float>::infinity();

void check_row_close(const char* what, float got_lse, float want_lse, const float* got, const float* want,
                     std::int64_t Dv, double tol) {
  if (std::isinf(want_lse)) {
    fuzz::check(got_lse == want_lse, "merged lse of an all-empty row is not -inf");
    for (std::int64_t e = 0; e < Dv; ++e) fuzz::check(got[e] == 0.0f, "merged out of an all-empty row is not 0");
    return;
  }
  if (!fuzz::close(got_lse, want_lse, tol, 1e-6)) fuzz::die("%s: lse %.9g, want %.9g", what, got_lse, want_lse);
  for (std::int64_t e = 0; e < Dv; ++e)
    if (!fuzz::close(got[e], want[e], tol, 1e-5)) fuzz::die("%s: out[%lld] %.9g, want %.9g", what, (long long)e, got[e], want[e]);
}

void exactness(FuzzedDataProvider& in) {
  const std::int64_t B = in.ConsumeIntegralInRange<std::int64_t>(1, 2), Hkv = in.ConsumeIntegralInRange<std::int64_t>(1, 2);
  const std::int64_t Hq = Hkv * in.ConsumeIntegralInRange<std::int64_t>(1, 4), Lq = in.ConsumeIntegralInRange<std::int64_t>(1, 4);
  const std::int64_t Lk = in.ConsumeIntegralInRange<std::int64_t>(0, 1100), D = in.ConsumeIntegralInRange<std::int64_t>(1, 24);
  const std::int64_t Dv = in.ConsumeIntegralInRange<std::int64_t>(1, 24);
  const int parts = in.ConsumeIntegralInRange<int>(0, 6);
  std::vector<std::int64_t> cuts{0, Lk};
  for (int p = 1; p < parts; ++p) cuts.push_back(in.ConsumeIntegralInRange<std::int64_t>(0, Lk));
  std::sort(cuts.begin(), cuts.end());
  std::mt19937 rng(in.ConsumeIntegral<std::uint32_t>());
  std::uniform_real_distribution<float> uni(-2.0f, 2.0f);
  auto gen = [&] { return uni(rng); };

  fuzz::buffer4<float> q({B, Hq, Lq, D}, 0, false), k({B, Hkv, Lk, D}, 1, true), v({B, Hkv, Lk, Dv}, 1, false);
  fuzz::fill(q.view(), gen);
  fuzz::fill(k.view(), gen);
  fuzz::fill(v.view(), gen);
  fuzz::buffer4<float> want({B, Hq, Lq, Dv}, 0, false);
  fuzz::buffer3 want_lse({B, Hq, Lq});
  attention::reference<float>(q.cview(), k.cview(), v.cview(), want.view(), want_lse.view());

  const std::size_t n = cuts.size() - 1;
  std::vector<fuzz::buffer4<float>> outs;
  std::vector<fuzz::buffer3> lses;
  for (std::size_t p = 0; p < n; ++p) {
    outs.emplace_back(shape_t<4>{B, Hq, Lq, Dv}, 0, false);
    lses.emplace_back(shape_t<3>{B, Hq, Lq});
    const std::int64_t s = cuts[p], len = cuts[p + 1] - cuts[p];
    attention::reference<float>(q.cview(), k.cview().narrow(2, s, len), v.cview().narrow(2, s, len), outs[p].view(),
                                lses[p].view());
  }
  std::vector<view<const float, 4>> ov;
  std::vector<view<const float, 3>> lv;
  for (std::size_t p = 0; p < n; ++p) {
    ov.push_back(outs[p].cview());
    lv.push_back(lses[p].view());
  }
  fuzz::buffer4<float> merged({B, Hq, Lq, Dv}, 2, true);
  fuzz::buffer3 merged_lse({B, Hq, Lq});
  attention::merge(std::span<const view<const float, 4>>(ov), std::span<const view<const float, 3>>(lv), merged.view(),
                   merged_lse.view());
  fuzz::check(merged.canaries_intact() && merged_lse.canaries_intact(), "merge wrote outside out or lse");

  // Chain of in-place 2-way merges into part 0.
  for (std::size_t p = 1; p < n; ++p)
    attention::merge(outs[0].cview(), lses[0].view(), outs[p].cview(), lses[p].view(), outs[0].view(), lses[0].view());

  fuzz::buffer4<float> dec({B, Hq, Lq, Dv}, 0, false);
  fuzz::buffer3 dec_lse({B, Hq, Lq});
  attention::decode<float>(q.cview(), k.cview(), v.cview(), dec.view(), dec_lse.view());

  fuzz::stats::count("exactness: parts merged and decode compared");
  const double tol = 2e-5 * (1.0 + 4.0 * static_cast<double>(D));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < Lq; ++i) {
        const float* w = want.view().ptr(b, h, i);
        const float wl = want_lse.view()(b, h, i);
        check_row_close("N-way merge", merged_lse.view()(b, h, i), wl, merged.view().ptr(b, h, i), w, Dv, tol);
        if (n > 0)
          check_row_close("2-way merge chain", lses[0].view()(b, h, i), wl, outs[0].view().ptr(b, h, i), w, Dv, tol);
        check_row_close("decode", dec_lse.view()(b, h, i), wl, dec.view().ptr(b, h, i), w, Dv, tol);
      }
}

void arbitrary_partials(FuzzedDataProvider& in) {
  const std::int64_t B = in.ConsumeIntegralInRange<std::int64_t>(1, 2), Hq = in.ConsumeIntegralInRange<std::int64_t>(1, 3);
  const std::int64_t Lq = in.ConsumeIntegralInRange<std::int64_t>(1, 3), Dv = in.ConsumeIntegralInRange<std::int64_t>(1, 40);
  const std::size_t n = in.ConsumeIntegralInRange<std::size_t>(0, 5);
  const int bad = in.ConsumeIntegralInRange<int>(0, 15);  // 0: one part has the wrong shape, 1: lses count differs
  std::vector<fuzz::buffer4<float>> outs;
  std::vector<fuzz::buffer3> lses;
  for (std::size_t p = 0; p < n; ++p) {
    const std::int64_t dv = bad == 0 && p == 0 ? Dv + 1 : Dv;
    outs.emplace_back(shape_t<4>{B, Hq, Lq, dv}, 0, false);
    lses.emplace_back(shape_t<3>{B, Hq, Lq});
    for (auto& x : outs[p].data) x = in.ConsumeFloatingPointInRange<float>(-100.0f, 100.0f);
    auto l = lses[p].view();
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < Hq; ++h)
        for (std::int64_t i = 0; i < Lq; ++i)
          l(b, h, i) = in.ConsumeIntegralInRange<int>(0, 3) == 0 ? minus_inf : in.ConsumeFloatingPointInRange<float>(-1e4f, 1e4f);
  }
  std::vector<view<const float, 4>> ov;
  std::vector<view<const float, 3>> lv;
  for (std::size_t p = 0; p < n; ++p) {
    ov.push_back(outs[p].cview());
    lv.push_back(lses[p].view());
  }
  if (bad == 1) lv.push_back(lv.empty() ? view<const float, 3>{} : lv.back());
  fuzz::buffer4<float> merged({B, Hq, Lq, Dv}, 1, false);
  fuzz::buffer3 merged_lse({B, Hq, Lq});
  try {
    attention::merge(std::span<const view<const float, 4>>(ov), std::span<const view<const float, 3>>(lv),
                     merged.view(), merged_lse.view());
  } catch (const mnemo::error&) {
    fuzz::check((bad == 0 && n > 0) || bad == 1, "merge rejected well-formed parts");
    fuzz::stats::count("arbitrary partials: rejected (mnemo::error)");
    return;
  }
  fuzz::check(!((bad == 0 && n > 0) || bad == 1), "merge accepted malformed parts");
  fuzz::check(merged.canaries_intact() && merged_lse.canaries_intact(), "merge wrote outside out or lse");
  fuzz::stats::count("arbitrary partials: merged and compared");
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < Lq; ++i) {
        double m = -std::numeric_limits<double>::infinity();
        for (std::size_t p = 0; p < n; ++p) m = std::max<double>(m, lv[p](b, h, i));
        std::vector<double> acc(static_cast<std::size_t>(Dv), 0.0);
        double sum = 0;
        if (!std::isinf(m))
          for (std::size_t p = 0; p < n; ++p) {
            const double w = std::exp(static_cast<double>(lv[p](b, h, i)) - m);
            sum += w;
            for (std::int64_t e = 0; e < Dv; ++e) acc[e] += w * ov[p](b, h, i, e);
          }
        std::vector<float> want(static_cast<std::size_t>(Dv), 0.0f);
        for (std::int64_t e = 0; e < Dv && sum > 0; ++e) want[e] = static_cast<float>(acc[e] / sum);
        const float want_lse = std::isinf(m) ? minus_inf : static_cast<float>(m + std::log(sum));
        // |out| <= 100; the weights carry f32 exp error (1 ulp) and one division
        check_row_close("merge of arbitrary partials", merged_lse.view()(b, h, i), want_lse,
                        merged.view().ptr(b, h, i), want.data(), Dv, 1e-3 * (1.0 + std::abs(want_lse) * 1e-3));
      }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  if (in.ConsumeBool()) exactness(in);
  else arbitrary_partials(in);
  return 0;
}
