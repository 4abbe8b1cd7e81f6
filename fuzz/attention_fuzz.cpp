// fuzz/attention_fuzz.cpp — attention::flash, attention::decode and attention::attend against
// attention::reference on shapes, strides, mods, GQA ratios, dtypes, scales and thread counts
// decoded from the input.
//
// Property: for every input, either every path throws mnemo::error (decode alone may also throw
// for Lq > decode_max_rows), or every path returns the reference's out and lse within an f32
// tolerance derived from the score magnitude; a row the reference leaves without a visible key
// gets out = 0 and lse = -inf exactly, a row whose reference is NaN (a NaN in q or k that it
// sees; some inputs carry one) is NaN in out and lse; nothing is written outside out and lse.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/attention.hpp"

namespace {

using namespace mnemo;
namespace mods = mnemo::attention::mods;

struct case_shape {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  std::int64_t q_pad, kv_pad, out_pad;
  bool q_perm, kv_perm, out_perm;
  float amp;  // inputs uniform in [-amp, amp]
  attention::options opt;
  std::uint32_t seed;
  int nan_in = 0;  // 0: finite inputs; 1: one NaN in q; 2: one NaN in k
};

// Reference-path cost cap: B * Hq * Lq * Lk * (D + Dv) multiply-adds per input.
constexpr std::int64_t max_work = 1 << 21;

case_shape decode_shape(FuzzedDataProvider& in) {
  case_shape c{};
  c.B = in.ConsumeIntegralInRange<std::int64_t>(0, 2);
  c.Hkv = in.ConsumeIntegralInRange<std::int64_t>(1, 3);
  const std::int64_t group = in.ConsumeIntegralInRange<std::int64_t>(1, 4);
  c.Hq = c.Hkv * group + (in.ConsumeIntegralInRange<int>(0, 15) == 0 ? 1 : 0);  // sometimes not a multiple
  c.Lq = in.ConsumeIntegralInRange<std::int64_t>(0, 20);
  // Mostly short caches; sometimes several decode chunks (512 keys).
  c.Lk = in.ConsumeBool() ? in.ConsumeIntegralInRange<std::int64_t>(0, 70)
                          : in.ConsumeIntegralInRange<std::int64_t>(0, 1100);
  c.D = in.ConsumeIntegralInRange<std::int64_t>(0, 48);  // 0: a bad head dim
  c.Dv = in.ConsumeIntegralInRange<std::int64_t>(1, 48);
  c.q_pad = in.ConsumeIntegralInRange<std::int64_t>(0, 3);
  c.kv_pad = in.ConsumeIntegralInRange<std::int64_t>(0, 3);
  c.out_pad = in.ConsumeIntegralInRange<std::int64_t>(0, 3);
  c.q_perm = in.ConsumeBool();
  c.kv_perm = in.ConsumeBool();
  c.out_perm = in.ConsumeBool();
  constexpr float amps[] = {0.5f, 1.0f, 2.0f, 6.0f};
  c.amp = amps[in.ConsumeIntegralInRange<int>(0, 3)];
  constexpr float scales[] = {0.0f, 0.0f, 0.05f, 0.3f, 1.0f, -0.5f, 3.0f, std::numeric_limits<float>::infinity()};
  c.opt.scale = scales[in.ConsumeIntegralInRange<int>(0, 7)];
  c.opt.threads = in.ConsumeIntegralInRange<int>(0, 3);
  c.seed = in.ConsumeIntegral<std::uint32_t>();
  const int nan_pick = in.ConsumeIntegralInRange<int>(0, 7);  // 1 in 4 inputs with a NaN
  c.nan_in = nan_pick == 1 ? 1 : nan_pick == 2 ? 2 : 0;
  // Keep the reference fast: shrink the cache until the case fits the work cap.
  while (c.Lk > 1 && c.B * c.Hq * c.Lq * c.Lk * (c.D + c.Dv) > max_work) c.Lk /= 2;
  return c;
}

template <class KV, class Mod>
void run_case(const case_shape& c, const Mod& mod) {
  std::mt19937 rng(c.seed);
  std::uniform_real_distribution<float> uni(-c.amp, c.amp);
  auto gen = [&] { return uni(rng); };

  fuzz::buffer4<float> q({c.B, c.Hq, c.Lq, c.D}, c.q_pad, c.q_perm);
  fuzz::buffer4<KV> k({c.B, c.Hkv, c.Lk, c.D}, c.kv_pad, c.kv_perm);
  fuzz::buffer4<KV> v({c.B, c.Hkv, c.Lk, c.Dv}, c.kv_pad, c.kv_perm);
  fuzz::fill(q.view(), gen);
  fuzz::fill(k.view(), gen);
  fuzz::fill(v.view(), gen);
  // One NaN in q or k (not v: a NaN value times a masked key's zero weight is NaN in the fast
  // paths, which skip no masked key inside a partial tile; the reference skips them).
  if (c.nan_in == 1 && c.B * c.Hq * c.Lq * c.D > 0)
    q.view()(c.B - 1, rng() % c.Hq, rng() % c.Lq, rng() % c.D) = std::numeric_limits<float>::quiet_NaN();
  if (c.nan_in == 2 && c.B * c.Hkv * c.Lk * c.D > 0)
    k.view()(0, rng() % c.Hkv, rng() % c.Lk, rng() % c.D) = KV(std::numeric_limits<float>::quiet_NaN());

  fuzz::buffer4<float> out_ref({c.B, c.Hq, c.Lq, c.Dv}, 0, false);
  fuzz::buffer3 lse_ref({c.B, c.Hq, c.Lq});
  bool ref_threw = false;
  try {
    attention::reference<KV, Mod>(q.cview(), k.cview(), v.cview(), out_ref.view(), lse_ref.view(), mod, c.opt);
  } catch (const mnemo::error&) {
    ref_threw = true;
  }

  // Score bound |s| <= |scale| D amp^2 (+ softcap/ALiBi only shrink or shift it): f32 dot
  // products and exp carry a few ulp of it.
  const double scale = c.opt.scale != 0 ? std::abs(c.opt.scale) : 1.0 / std::sqrt(static_cast<double>(std::max<std::int64_t>(c.D, 1)));
  const double smax = scale * static_cast<double>(c.D) * c.amp * c.amp;
  const double eps_s = 2e-6 * (smax + 1.0);
  const double out_tol = 8 * eps_s * c.amp + 1e-5 * c.amp;

  enum { flash_path, decode_path, attend_path };
  for (int p = flash_path; p <= attend_path; ++p) {
    fuzz::buffer4<float> out({c.B, c.Hq, c.Lq, c.Dv}, c.out_pad, c.out_perm);
    fuzz::buffer3 lse({c.B, c.Hq, c.Lq});
    bool threw = false;
    try {
      if (p == flash_path) attention::flash<KV, Mod>(q.cview(), k.cview(), v.cview(), out.view(), lse.view(), mod, c.opt);
      else if (p == decode_path) {
        static attention::decode_workspace ws;  // reused across inputs: exercises its growth
        attention::decode<KV, Mod>(q.cview(), k.cview(), v.cview(), out.view(), lse.view(), mod, c.opt, ws);
      } else {
        attention::attend<KV, Mod>(q.cview(), k.cview(), v.cview(), out.view(), lse.view(), mod, c.opt);
      }
    } catch (const mnemo::error&) {
      threw = true;
    }
    if (ref_threw) {
      fuzz::check(threw, "a fast path accepted an input the reference rejected");
      if (p == flash_path) fuzz::stats::count("rejected by every path (mnemo::error)");
      continue;
    }
    if (threw) {
      fuzz::check(p == decode_path && c.Lq > attention::decode_max_rows,
                  "a fast path rejected an input the reference accepted");
      continue;
    }
    static const char* const accepted[] = {"flash compared", "decode compared", "attend compared"};
    fuzz::stats::count(accepted[p]);
    fuzz::check(out.canaries_intact(), "write outside the out view");
    fuzz::check(lse.canaries_intact(), "write outside the lse view");
    auto o = out.view();
    auto ro = out_ref.view();
    auto l = lse.view();
    auto rl = lse_ref.view();
    bool nan_rows = false;
    for (std::int64_t b = 0; b < c.B; ++b)
      for (std::int64_t h = 0; h < c.Hq; ++h)
        for (std::int64_t i = 0; i < c.Lq; ++i) {
          const float want_lse = rl(b, h, i);
          if (std::isnan(want_lse)) {  // the row saw a NaN score: NaN on every path, never clean
            fuzz::check(std::isnan(l(b, h, i)), "lse of a row with a NaN score is not NaN");
            for (std::int64_t e = 0; e < c.Dv; ++e)
              fuzz::check(std::isnan(o(b, h, i, e)), "out of a row with a NaN score is not NaN");
            nan_rows = true;
            continue;
          }
          if (std::isinf(want_lse)) {
            fuzz::check(l(b, h, i) == want_lse, "lse of a fully masked row is not -inf");
            for (std::int64_t e = 0; e < c.Dv; ++e)
              fuzz::check(o(b, h, i, e) == 0.0f, "out of a fully masked row is not 0");
            continue;
          }
          if (!fuzz::close(l(b, h, i), want_lse, 8 * eps_s, 1e-5))
            fuzz::die("path %d: lse[%lld,%lld,%lld] = %.9g, reference %.9g", p, (long long)b, (long long)h,
                      (long long)i, l(b, h, i), want_lse);
          for (std::int64_t e = 0; e < c.Dv; ++e)
            if (!fuzz::close(o(b, h, i, e), ro(b, h, i, e), out_tol, 1e-5))
              fuzz::die("path %d: out[%lld,%lld,%lld,%lld] = %.9g, reference %.9g (tol %.3g)", p, (long long)b,
                        (long long)h, (long long)i, (long long)e, o(b, h, i, e), ro(b, h, i, e), out_tol);
        }
    static const char* const with_nan[] = {"flash compared with NaN rows", "decode compared with NaN rows",
                                           "attend compared with NaN rows"};
    if (nan_rows) fuzz::stats::count(with_nan[p]);
  }
}

// Mods that need data (slopes, document ids) keep it alive for the call.
template <class KV>
void run_mods(FuzzedDataProvider& in, const case_shape& c, bool all_mods) {
  const int which = in.ConsumeIntegralInRange<int>(0, all_mods ? 4 : 1);
  const std::int64_t param = in.ConsumeIntegralInRange<std::int64_t>(-1, c.Lk + 2);
  std::vector<float> slopes = attention::mods::alibi_slopes(c.Hq);
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0) slopes.push_back(0.5f);  // wrong length: an error
  std::vector<std::int64_t> ids(static_cast<std::size_t>(c.Lk));
  {
    std::int64_t doc = 0;
    for (auto& id : ids) {
      if (in.ConsumeIntegralInRange<int>(0, 7) == 0) ++doc;
      id = doc;
    }
    if (!ids.empty() && in.ConsumeIntegralInRange<int>(0, 15) == 0) ids.front() = doc + 1;  // decreasing: an error
  }
  const float cap = in.ConsumeIntegralInRange<int>(0, 7) == 0 ? 0.0f : in.ConsumeFloatingPointInRange<float>(0.25f, 30.0f);  // 0: an error
  const mods::alibi alibi{{slopes.data(), {static_cast<std::int64_t>(slopes.size())}}};
  const mods::document document{{ids.data(), {static_cast<std::int64_t>(ids.size())}}};
  const auto composed = mods::all_of(mods::softcap{cap}, alibi, mods::sliding_window{param});
  if (!all_mods) {  // the 16-bit storage types: one mod each that reaches every kernel branch
    if (which == 0) return run_case<KV>(c, mods::causal{});
    return run_case<KV>(c, composed);
  }
  switch (which) {
    case 0: return run_case<KV>(c, mods::none{});
    case 1: return run_case<KV>(c, mods::causal{});
    case 2: return run_case<KV>(c, composed);
    case 3: return run_case<KV>(c, mods::prefix_lm{param});
    default: return run_case<KV>(c, document);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const int dtype = in.ConsumeIntegralInRange<int>(0, 2);
  const case_shape c = decode_shape(in);
  // f32 with five mods (none; causal; softcap + ALiBi + sliding window composed, which also carries
  // each of the three mods' own checks; prefix-LM; document); f16 and bf16 with causal and the
  // composed mod. Every instantiation costs compile time, and the smoke run must stay within CI's
  // budget: these seven reach every kernel branch (empty/partial/full tiles, score mods, masks).
  if (dtype == 0) run_mods<float>(in, c, true);
  else if (dtype == 1) run_mods<mnemo::f16>(in, c, false);
  else run_mods<mnemo::bf16>(in, c, false);
  return 0;
}
