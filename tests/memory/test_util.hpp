// tests/memory/test_util.hpp — what the tests of include/mnemo/memory/ share: random tensors from
// a generator, the golden-case loop, and (from tests/support/) tolerance comparisons, error
// expectations and scratch folders.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "golden/runner.hpp"
#include "memory/golden_ops.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "support/support.hpp"

namespace memory_test {

using mnemo::tensor;
using mnemo::view;

// Uniform values in [lo, hi].
template <int R>
tensor<float, R> random_tensor(mnemo::shape_t<R> shape, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  tensor<float, R> t(shape);
  std::uniform_real_distribution<float> u(lo, hi);
  for (float& x : t) x = u(rng);
  return t;
}

using mnemo::test::expect_close;  // |got - want| <= atol + rtol |want|, as the golden rule
using mnemo::test::expect_error;

// Runs every golden case of `op` through both paths and compares by the README's rule.
inline void check_golden(const std::string& op) {
  namespace fs = std::filesystem;
  namespace mg = mnemo::memory_golden;
  if (!mnemo::test::golden_available()) GTEST_SKIP() << "golden cases not found at " << mnemo::test::golden_dir();
  int ran = 0;
  for (const fs::path& path : mnemo::test::golden_cases()) {
    const mnemo::golden::golden_case c(path);
    if (c.op() != op) continue;
    ++ran;
    for (mg::path p : {mg::path::reference, mg::path::fast}) {
      const mnemo::golden::results got = mg::run(c, p);
      for (const std::string& name : c.outputs()) {
        const mnemo::npy::array* g = got.find(name);
        ASSERT_NE(g, nullptr) << c.name() << ": output " << name << " not produced";
        const auto cmp = mnemo::golden::compare(name, *g, c.expected(name), c.atol(), c.rtol());
        EXPECT_TRUE(cmp.ok) << c.name() << " [" << mg::path_name(p) << "] " << cmp.failure;
      }
    }
  }
  EXPECT_GT(ran, 0) << "no golden case of op " << op;
}

using mnemo::test::scratch_dir;

}  // namespace memory_test
