// Tests for mnemo/core/parallel.hpp: every index is visited exactly once, whatever the thread
// count, the schedule or the nesting.
#include "mnemo/core/parallel.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace {

// Visit counts of [0, n) after running `run(n, body)`.
template <class Run>
std::vector<int> visits(std::int64_t n, Run&& run) {
  auto counts = std::make_unique<std::atomic<int>[]>(static_cast<std::size_t>(n > 0 ? n : 1));
  for (std::int64_t i = 0; i < n; ++i) counts[i] = 0;
  run(n, [&](std::int64_t i) {
    if (i >= 0 && i < n) counts[i].fetch_add(1, std::memory_order_relaxed);
  });
  std::vector<int> out(static_cast<std::size_t>(n > 0 ? n : 0));
  for (std::int64_t i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = counts[i].load();
  return out;
}

TEST(ParallelFor, EachIndexExactlyOnce) {
  for (int threads : {1, 2, 0}) {
    for (std::int64_t n : {1, 2, 3, 37, 1000}) {
      const auto st = visits(n, [&](std::int64_t m, auto body) { mnemo::parallel_for(m, body, threads); });
      const auto dy = visits(n, [&](std::int64_t m, auto body) { mnemo::parallel_for_dynamic(m, body, threads); });
      for (std::int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(st[static_cast<std::size_t>(i)], 1) << "static, threads=" << threads << " n=" << n << " i=" << i;
        ASSERT_EQ(dy[static_cast<std::size_t>(i)], 1) << "dynamic, threads=" << threads << " n=" << n << " i=" << i;
      }
    }
  }
}

TEST(ParallelFor, EmptyAndNegativeRangesCallNothing) {
  std::atomic<int> calls{0};
  for (int threads : {1, 2, 0}) {
    mnemo::parallel_for(0, [&](std::int64_t) { ++calls; }, threads);
    mnemo::parallel_for(-5, [&](std::int64_t) { ++calls; }, threads);
    mnemo::parallel_for_dynamic(0, [&](std::int64_t) { ++calls; }, threads);
  }
  EXPECT_EQ(calls.load(), 0);
}

TEST(ParallelFor, NestedCallsRunSeriallyAndCoverEverything) {
  constexpr std::int64_t outer = 6, inner = 50;
  std::vector<std::atomic<int>> counts(outer * inner);
  mnemo::parallel_for(
      outer,
      [&](std::int64_t o) {
        mnemo::parallel_for(inner, [&](std::int64_t i) { counts[static_cast<std::size_t>(o * inner + i)]++; }, 2);
      },
      2);
  for (const auto& c : counts) EXPECT_EQ(c.load(), 1);
}

TEST(ParallelFor, ThreadIndexIsWithinTheThreadCount) {
  for (int threads : {1, 2, 0}) {
    const int t = mnemo::resolve_threads(threads);
    EXPECT_GE(t, 1);
    std::atomic<int> out_of_range{0};
    mnemo::parallel_for(
        100,
        [&](std::int64_t) {
          const int id = mnemo::thread_index();
          if (id < 0 || id >= t) ++out_of_range;
        },
        threads);
    EXPECT_EQ(out_of_range.load(), 0) << "threads=" << threads;
  }
#if defined(_OPENMP)
  EXPECT_EQ(mnemo::resolve_threads(3), 3);
  EXPECT_EQ(mnemo::resolve_threads(0), omp_get_max_threads());
#else
  EXPECT_EQ(mnemo::resolve_threads(3), 1);
#endif
  EXPECT_EQ(mnemo::thread_index(), 0);  // outside any parallel region
}

TEST(ParallelFor, StaticScheduleGivesEachThreadOneContiguousRun) {
  // parallel.hpp promises a static hand-out in index order: each thread gets one block of
  // consecutive items and walks it upwards.
  constexpr std::int64_t n = 64;
  const int t = mnemo::resolve_threads(2);
  std::vector<std::vector<std::int64_t>> seen(static_cast<std::size_t>(t));
  mnemo::parallel_for(n, [&](std::int64_t i) { seen[static_cast<std::size_t>(mnemo::thread_index())].push_back(i); }, 2);
  std::int64_t total = 0;
  for (const auto& s : seen) {
    total += static_cast<std::int64_t>(s.size());
    for (std::size_t j = 1; j < s.size(); ++j) EXPECT_EQ(s[j], s[j - 1] + 1);
  }
  EXPECT_EQ(total, n);
}

}  // namespace
