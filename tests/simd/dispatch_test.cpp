// tests/simd/dispatch_test.cpp — simd/dispatch.hpp: level names, the CPU level, forcing a level,
// and the dispatching kernels giving the reference's answer at every level this machine runs.
#include "mnemo/simd/dispatch.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/decode.hpp"

namespace {

using namespace mnemo;
using simd::level;

// Every level this machine and build can run, lowest first.
std::vector<level> runnable_levels() {
  std::vector<level> out;
  for (level l : {level::scalar, level::sse, level::avx2, level::avx512})
    if (static_cast<int>(l) <= static_cast<int>(simd::cpu_level()) && simd::active_level(l) == l) out.push_back(l);
  return out;
}

template <class Tensor>
void fill(Tensor& t, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> dist;
  for (std::int64_t i = 0; i < t.size(); ++i) t.data()[i] = dist(gen);
}

TEST(Dispatch, LevelNamesRoundTrip) {
  for (level l : {level::scalar, level::sse, level::avx2, level::avx512})
    EXPECT_EQ(simd::parse_level(simd::level_name(l)), l);
  EXPECT_EQ(simd::parse_level(""), level::automatic);
  EXPECT_EQ(simd::parse_level("auto"), level::automatic);
  EXPECT_EQ(simd::parse_level("sse2"), level::sse);
  try {
    simd::parse_level("avx1024", "options.isa");
    FAIL() << "expected mnemo::error";
  } catch (const mnemo::error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("options.isa"), std::string::npos) << msg;
    EXPECT_NE(msg.find("avx1024"), std::string::npos) << msg;
  }
}

TEST(Dispatch, LevelOfArch) {
  EXPECT_EQ(simd::level_of<simd::scalar_arch>(), level::scalar);
#if XSIMD_WITH_AVX512BW
  EXPECT_EQ(simd::level_of<xsimd::avx512bw>(), level::avx512);
#endif
#if XSIMD_WITH_FMA3_AVX2
  EXPECT_EQ(simd::level_of<xsimd::fma3<xsimd::avx2>>(), level::avx2);
#endif
  EXPECT_EQ(simd::level_of<xsimd::sse2>(), level::sse);
}

TEST(Dispatch, AutomaticRunsTheBestCompiledLevelTheCpuHas) {
  if (simd::env_level() != level::automatic) GTEST_SKIP() << "MNEMO_ISA is set";
  const level expect = static_cast<int>(simd::compiled_level) <= static_cast<int>(simd::cpu_level())
                           ? simd::compiled_level
                           : simd::cpu_level();
  // The build's own level is always compiled in (and the CPU must run it for the binary to start).
  EXPECT_EQ(simd::active_level(), simd::vectorized<simd::default_arch> ? expect : level::scalar);
  EXPECT_EQ(simd::active_level(level::scalar), level::scalar);
}

TEST(Dispatch, ForcingALevelTheCpuLacksThrows) {
  if (simd::cpu_level() == level::avx512) GTEST_SKIP() << "this CPU runs every level";
  EXPECT_THROW(simd::active_level(level::avx512), mnemo::error);
}

// Flash forward, flash backward and split-KV decode at every runnable level against the reference.
TEST(Dispatch, KernelsAgreeWithTheReferenceAtEveryLevel) {
  const std::int64_t B = 1, Hq = 4, Hkv = 2, Lq = 37, Lk = 101, D = 40;
  tensor<float, 4> q({B, Hq, Lq, D}), k({B, Hkv, Lk, D}), v({B, Hkv, Lk, D});
  fill(q, 1);
  fill(k, 2);
  fill(v, 3);
  tensor<float, 4> ref_out({B, Hq, Lq, D}), out({B, Hq, Lq, D});
  tensor<float, 3> ref_lse({B, Hq, Lq}), lse({B, Hq, Lq});
  const attention::mods::causal mod{};
  attention::reference(cview(q), cview(k), cview(v), ref_out, ref_lse, mod);

  tensor<float, 4> q1({B, Hq, 1, D}), out1({B, Hq, 1, D}), ref1({B, Hq, 1, D});
  fill(q1, 4);
  attention::reference(cview(q1), cview(k), cview(v), ref1, view<float, 3>{}, mod);

  for (level l : runnable_levels()) {
    SCOPED_TRACE(simd::level_name(l));
    attention::options opt;
    opt.isa = l;
    attention::flash(cview(q), cview(k), cview(v), out, lse, mod, opt);
    for (std::int64_t i = 0; i < out.size(); ++i)
      ASSERT_NEAR(out.data()[i], ref_out.data()[i], 1e-5f + 1e-4f * std::abs(ref_out.data()[i])) << i;
    for (std::int64_t i = 0; i < lse.size(); ++i) ASSERT_NEAR(lse.data()[i], ref_lse.data()[i], 1e-4f) << i;
    attention::decode(cview(q1), cview(k), cview(v), out1, view<float, 3>{}, mod, opt);
    for (std::int64_t i = 0; i < out1.size(); ++i)
      ASSERT_NEAR(out1.data()[i], ref1.data()[i], 1e-5f + 1e-4f * std::abs(ref1.data()[i])) << i;
  }
}

TEST(Dispatch, CacheDecodeAgreesAcrossLevels) {
  kvcache::cache_config cfg;
  cfg.kind = kvcache::storage::int8;
  cfg.Hkv = 2;
  cfg.capacity = 300;
  cfg.D = 40;
  cfg.Dv = 40;
  kvcache::layer_cache c(cfg);
  tensor<float, 3> k({2, 300, 40}), v({2, 300, 40}), q({8, 1, 40}), out({8, 1, 40});
  std::vector<float> first;
  fill(k, 5);
  fill(v, 6);
  fill(q, 7);
  c.append(k, v);
  for (level l : runnable_levels()) {
    SCOPED_TRACE(simd::level_name(l));
    attention::options opt;
    opt.isa = l;
    kvcache::decode(c, cview(q), out, view<float, 2>{}, opt);
    if (first.empty()) {
      first.assign(out.data(), out.data() + out.size());
      continue;
    }
    for (std::int64_t i = 0; i < out.size(); ++i)
      ASSERT_NEAR(out.data()[i], first[i], 1e-5f + 1e-4f * std::abs(first[i])) << i;
  }
}

}  // namespace
