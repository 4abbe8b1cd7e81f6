// tests/memory/test_util.hpp — what the tests of include/mnemo/memory/ share: random tensors,
// tolerance comparisons, error expectations, the golden-case loop and scratch folders.
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

// EXPECT that every element satisfies |got - want| <= atol + rtol |want| (as the golden rule).
template <class G, class W>
void expect_close(const G& got, const W& want, double atol, double rtol, const std::string& what) {
  const auto g = mnemo::cview(got);
  const auto w = mnemo::cview(want);
  ASSERT_EQ(g.shape(), w.shape()) << what;
  ASSERT_TRUE(g.is_contiguous() && w.is_contiguous()) << what;
  std::int64_t bad = 0, worst = -1;
  double worst_ratio = 0;
  for (std::int64_t i = 0; i < g.size(); ++i) {
    const double a = g.data()[i], b = w.data()[i];
    const double tol = atol + rtol * std::abs(b);
    const double err = std::abs(a - b);
    if (!(err <= tol)) {
      ++bad;
      if (!(err / tol <= worst_ratio)) {
        worst_ratio = err / tol;
        worst = i;
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << g.size() << " elements differ; worst at flat index " << worst
                    << ": got " << (worst >= 0 ? g.data()[worst] : 0.0f) << ", want "
                    << (worst >= 0 ? w.data()[worst] : 0.0f);
}

// Expects fn() to throw mnemo::error whose message contains every one of `parts`.
template <class Fn>
void expect_error(Fn&& fn, std::initializer_list<const char*> parts) {
  try {
    fn();
    ADD_FAILURE() << "expected mnemo::error mentioning " << *parts.begin();
  } catch (const mnemo::error& e) {
    const std::string msg = e.what();
    for (const char* part : parts) EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
  }
}

// Runs every golden case of `op` through both paths and compares by the README's rule.
inline void check_golden(const std::string& op) {
  namespace fs = std::filesystem;
  namespace mg = mnemo::memory_golden;
  const fs::path dir = MNEMO_GOLDEN_DIR;
  if (!fs::exists(dir / "README.md")) GTEST_SKIP() << "golden cases not found at " << dir;
  std::vector<fs::path> cases;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_directory() && fs::exists(e.path() / "meta.json")) cases.push_back(e.path());
  std::sort(cases.begin(), cases.end());
  int ran = 0;
  for (const auto& path : cases) {
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

// A fresh scratch folder under the system temp dir, removed at scope exit.
struct scratch_dir {
  std::filesystem::path path;
  explicit scratch_dir(const std::string& name) {
    path = std::filesystem::temp_directory_path() /
           ("mnemo_memory_" + name + "_" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(path);
  }
  ~scratch_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string prefix(const std::string& p) const { return (path / p).string(); }
};

}  // namespace memory_test
