// A consumer built for a baseline ISA (-march=x86-64-v2: no AVX2) that links mnemo::prebuilt: the
// dispatching kernels must still run at the CPU's best level, and agree with the reference.
// The headers of the kernels it calls (the umbrella header is the find_package consumer's).
#include <mnemo/attention/decode.hpp>
#include <mnemo/attention/flash.hpp>
#include <mnemo/attention/reference.hpp>
#include <mnemo/prebuilt.hpp>

#include <cmath>
#include <cstdio>
#include <random>

namespace att = mnemo::attention;

int main() {
  static_assert(!mnemo::simd::detail::is_avx2<mnemo::simd::default_arch>,
                "baseline_isa.cpp must be compiled for a baseline below AVX2 (-march=x86-64-v2)");
  const mnemo::simd::level cpu = mnemo::simd::cpu_level(), running = mnemo::simd::active_level();
  const mnemo::simd::level want = mnemo::simd::resolve_level(mnemo::simd::level::automatic);
  std::printf("compiled for %s, CPU has %s, dispatching kernels run at %s\n",
              mnemo::simd::level_name(mnemo::simd::compiled_level), mnemo::simd::level_name(cpu),
              mnemo::simd::level_name(running));
  bool ok = running == want;

  std::mt19937 gen(7);
  std::normal_distribution<float> dist;
  mnemo::tensor<float, 4> q({1, 4, 33, 64}), k({1, 2, 70, 64}), v({1, 2, 70, 64}), out({1, 4, 33, 64}),
      ref({1, 4, 33, 64});
  for (auto* t : {&q, &k, &v})
    for (std::int64_t i = 0; i < t->size(); ++i) t->data()[i] = dist(gen);
  att::reference(q, k, v, ref, {}, att::mods::causal{});
  att::flash(mnemo::cview(q), k, v, out, {}, att::mods::causal{});
  float worst = 0;
  for (std::int64_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::fabs(out.data()[i] - ref.data()[i]));
  mnemo::tensor<float, 4> q1({1, 4, 1, 64}), o1({1, 4, 1, 64}), r1({1, 4, 1, 64});
  for (std::int64_t i = 0; i < q1.size(); ++i) q1.data()[i] = dist(gen);
  att::reference(q1, k, v, r1, {}, att::mods::none{});
  att::decode(mnemo::cview(q1), k, v, o1);
  for (std::int64_t i = 0; i < o1.size(); ++i) worst = std::max(worst, std::fabs(o1.data()[i] - r1.data()[i]));
  ok = ok && worst < 1e-4f;
  std::printf("max |flash, decode - reference| = %g: %s\n", worst, ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
