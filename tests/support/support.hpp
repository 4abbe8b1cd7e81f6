// tests/support/support.hpp — the helpers the tests share, one copy each (STYLE.md, "Tests share
// tests/support/"):
//
//   fill_uniform(t, lo, hi, seed)        uniform random values into a tensor (any element type)
//   random_tensor<T, R>(shape, seed)     a new tensor of them
//   compare(got, want, atol, rtol)       elementwise |got - want| <= atol + rtol |want| (inf == inf of
//                                        the same sign, NaN only against NaN), the worst element,
//                                        the max abs difference and the NMSE
//   expect_close(got, want, atol, rtol)  a GoogleTest check of compare() with a readable failure
//   max_abs_diff(a, b)                   the largest |a - b|
//   expect_error(fn, {parts})            fn() throws mnemo::error (nothing else) whose message holds
//                                        every part: the entry point, the argument, the values
//   golden_cases(op)                     the case folders of ../shared/golden (optionally of one op)
//   scratch_dir                          a fresh temporary folder, removed with its files at scope exit
//
// Header-only; tests/CMakeLists.txt puts tests/ on every test's include path, so a test includes
// "support/support.hpp".
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::test {

// ------------------------------------------------------------------------------------------------
// Random data

// Uniform values in [lo, hi) into every element of t, from a fixed seed.
template <class T, int R>
void fill_uniform(tensor<T, R>& t, float lo, float hi, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  for (auto& x : t) x = T(u(rng));
}

// A new tensor of `shape` with uniform values in [lo, hi).
template <class T, int R>
tensor<T, R> random_tensor(shape_t<R> shape, std::uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  tensor<T, R> t(shape);
  fill_uniform(t, lo, hi, seed);
  return t;
}

// ------------------------------------------------------------------------------------------------
// Comparisons

// What compare() found.
struct comparison {
  std::int64_t count = 0;   // elements compared
  std::int64_t bad = 0;     // elements outside atol + rtol |want|
  std::int64_t worst = -1;  // flat index of the worst one (largest error / tolerance), -1 if none
  double worst_got = 0, worst_want = 0;
  double max_abs = 0;  // largest |got - want| over the finite pairs
  double nmse = 0;     // sum (got - want)^2 / sum want^2 over the finite pairs (0 if want is all 0)

  bool ok() const { return bad == 0; }
  std::string describe() const {
    std::ostringstream os;
    os << bad << " of " << count << " elements outside tolerance";
    if (worst >= 0) os << "; worst at flat index " << worst << ": got " << worst_got << ", want " << worst_want;
    os << "; max |diff| " << max_abs << ", NMSE " << nmse;
    return os.str();
  }
};

namespace detail {

// Calls f(flat index, element) for every element of a view in row-major order.
template <class T, int R, class F>
void for_each_element(const view<T, R>& v, F&& f) {
  if (v.size() == 0) return;
  shape_t<R> idx{};
  for (std::int64_t flat = 0; flat < v.size(); ++flat) {
    std::int64_t off = 0;
    for (int d = 0; d < R; ++d) off += idx[d] * v.stride(d);
    f(flat, v.data()[off]);
    for (int d = R - 1; d >= 0; --d) {
      if (++idx[d] < v.extent(d)) break;
      idx[d] = 0;
    }
  }
}

template <class T, int R>
std::vector<double> to_doubles(const view<T, R>& v) {
  std::vector<double> out;
  out.reserve(static_cast<std::size_t>(v.size()));
  for_each_element(v, [&](std::int64_t, const auto& x) {
    if constexpr (std::is_arithmetic_v<std::remove_cvref_t<decltype(x)>>) out.push_back(static_cast<double>(x));
    else out.push_back(static_cast<double>(static_cast<float>(x)));  // f16, bf16
  });
  return out;
}

}  // namespace detail

// Elementwise got against want: |got - want| <= atol + rtol |want|. Equal infinities match, and
// NaN matches only NaN. got and want are tensors or views of the same shape (any strides).
template <class G, class W>
comparison compare(const G& got, const W& want, double atol, double rtol) {
  const auto gv = cview(got);
  const auto wv = cview(want);
  comparison c;
  if (gv.shape() != wv.shape()) {
    c.bad = c.count = std::max<std::int64_t>(1, gv.size());
    return c;
  }
  const std::vector<double> g = detail::to_doubles(gv), w = detail::to_doubles(wv);
  double worst_ratio = -1, err2 = 0, ref2 = 0;
  c.count = static_cast<std::int64_t>(g.size());
  for (std::size_t i = 0; i < g.size(); ++i) {
    const double a = g[i], b = w[i];
    bool ok;
    double ratio;
    if (std::isnan(a) || std::isnan(b)) {
      ok = std::isnan(a) && std::isnan(b);
      ratio = ok ? 0 : std::numeric_limits<double>::infinity();
    } else if (std::isinf(a) || std::isinf(b)) {
      ok = a == b;
      ratio = ok ? 0 : std::numeric_limits<double>::infinity();
    } else {
      const double err = std::abs(a - b), tol = atol + rtol * std::abs(b);
      ok = err <= tol;
      ratio = tol > 0 ? err / tol : (err > 0 ? std::numeric_limits<double>::infinity() : 0);
      c.max_abs = std::max(c.max_abs, err);
      err2 += (a - b) * (a - b);
      ref2 += b * b;
    }
    if (!ok) ++c.bad;
    if (!ok && ratio > worst_ratio) {
      worst_ratio = ratio;
      c.worst = static_cast<std::int64_t>(i);
      c.worst_got = a;
      c.worst_want = b;
    }
  }
  c.nmse = ref2 > 0 ? err2 / ref2 : err2;
  return c;
}

// GoogleTest check: got within atol + rtol |want| everywhere (compare()).
template <class G, class W>
void expect_close(const G& got, const W& want, double atol, double rtol, const std::string& what = "") {
  ASSERT_EQ(cview(got).shape(), cview(want).shape()) << what << ": shapes differ";
  const comparison c = compare(got, want, atol, rtol);
  EXPECT_TRUE(c.ok()) << what << ": " << c.describe();
}

// The largest |a - b| of two tensors or views of the same shape (NaN if either holds a NaN).
template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  const std::vector<double> x = detail::to_doubles(cview(a)), y = detail::to_doubles(cview(b));
  double m = 0;
  for (std::size_t i = 0; i < x.size() && i < y.size(); ++i) {
    const double d = std::abs(x[i] - y[i]);
    if (std::isnan(d)) return d;
    m = std::max(m, d);
  }
  return m;
}

// ------------------------------------------------------------------------------------------------
// Errors

// Expects fn() to throw mnemo::error, not another exception and not nothing, with a message that
// contains every one of `parts` (the entry point, the argument it names, expected and actual
// values). Returns the message ("" if nothing matching was thrown) for further checks.
template <class Fn>
std::string expect_error(Fn&& fn, std::initializer_list<std::string> parts) {
  std::string first = parts.size() ? *parts.begin() : std::string();
  try {
    fn();
  } catch (const mnemo::error& e) {
    const std::string msg = e.what();
    for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected mnemo::error mentioning '" << first << "', got another exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected mnemo::error mentioning '" << first << "', nothing was thrown";
  return "";
}

// ------------------------------------------------------------------------------------------------
// Golden cases

// The golden case folders (each with a meta.json) under MNEMO_GOLDEN_DIR, sorted; with `op`, only
// the cases whose meta.json names that op. Empty when the folder is not there (tests skip then:
// see golden_available()).
#ifdef MNEMO_GOLDEN_DIR
inline std::filesystem::path golden_dir() { return MNEMO_GOLDEN_DIR; }
#else
inline std::filesystem::path golden_dir() { return {}; }
#endif

inline bool golden_available() { return std::filesystem::exists(golden_dir() / "README.md"); }

inline std::vector<std::filesystem::path> golden_cases(const std::string& op = "") {
  namespace fs = std::filesystem;
  std::vector<fs::path> cases;
  if (!golden_available()) return cases;
  for (const auto& e : fs::directory_iterator(golden_dir())) {
    if (!e.is_directory() || !fs::exists(e.path() / "meta.json")) continue;
    if (!op.empty()) {
      // meta.json holds "op": "<name>"; matched textually so this header needs no JSON library.
      std::ifstream f(e.path() / "meta.json");
      const std::string meta((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      if (meta.find("\"op\": \"" + op + "\"") == std::string::npos && meta.find("\"op\":\"" + op + "\"") == std::string::npos)
        continue;
    }
    cases.push_back(e.path());
  }
  std::sort(cases.begin(), cases.end());
  return cases;
}

// ------------------------------------------------------------------------------------------------
// Files

// A fresh folder under the system temp dir, removed with everything in it at scope exit.
class scratch_dir {
 public:
  explicit scratch_dir(const std::string& name = "test") {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() /
            ("mnemo_" + name + "_" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~scratch_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  scratch_dir(const scratch_dir&) = delete;
  scratch_dir& operator=(const scratch_dir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

}  // namespace mnemo::test
