// fuzz/common.hpp — what every mnemo libFuzzer target shares.
//
// A target decodes its shapes, strides, options and a data seed from the fuzz input, runs a fast
// path and the double-precision reference, and aborts (check() -> abort, which libFuzzer reports
// as a crash with the input saved) on any disagreement beyond tolerance, on a write outside the
// output views (canary cells around every output), or on an exception that is not mnemo::error.
// Sizes are kept small so that one input runs in well under a millisecond.
#pragma once

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"

namespace fuzz {

// Aborts with a message: libFuzzer saves the input as crash-<sha1>.
template <class... A>
[[noreturn]] void die(const char* fmt, A... a) {
  std::fprintf(stderr, "mnemo fuzz: ");
  std::fprintf(stderr, fmt, a...);
  std::fprintf(stderr, "\n");
  std::abort();
}

inline void check(bool ok, const char* what) {
  if (!ok) die("%s", what);
}

// Outcome counts per label ("accepted f32", "rejected", ...), printed at exit when the
// environment sets MNEMO_FUZZ_STATS=1 (scripts/fuzz.sh does): how many inputs reached the
// comparison and how many were rejected with mnemo::error.
class stats {
 public:
  static void count(const char* label) {
    auto& s = instance();
    for (auto& [name, n] : s.rows_)
      if (name == label) {
        ++n;
        return;
      }
    s.rows_.emplace_back(label, 1);
  }

 private:
  std::vector<std::pair<std::string, long long>> rows_;
  static stats& instance() {
    static stats s;
    return s;
  }
  ~stats() {
    const char* env = std::getenv("MNEMO_FUZZ_STATS");
    if (!env || std::string(env) != "1") return;
    for (const auto& [name, n] : rows_) std::fprintf(stderr, "mnemo fuzz stats: %s: %lld\n", name.c_str(), n);
  }
};

// A value no kernel writes by accident: fills the padding around outputs.
inline constexpr float canary = -12345.678f;

// A 4-d buffer with optional padding in every outer stride, filled with the canary; the view
// covers the logical shape only. permute_bl reads a [B, L, H, D] buffer as [B, H, L, D].
template <class T = float>
struct buffer4 {
  std::vector<T> data;
  mnemo::shape_t<4> shape{}, strides{};

  buffer4(mnemo::shape_t<4> s, std::int64_t pad, bool permute_bl) : shape(s) {
    // physical layout: [s0, s1, s2, s3] or [s0, s2, s1, s3], each row padded by `pad`
    const std::int64_t row = s[3] + pad;
    const std::int64_t inner = permute_bl ? s[1] : s[2];
    const std::int64_t outer = permute_bl ? s[2] : s[1];
    const std::int64_t mid_stride = row * inner + pad;
    const std::int64_t batch_stride = mid_stride * outer + pad;
    // at least one cell, so that an empty shape (B = 0) still gives a non-null, valid view
    data.assign(static_cast<std::size_t>(std::max<std::int64_t>(batch_stride * s[0] + pad, 1)), T(canary));
    if (permute_bl) strides = {batch_stride, row, mid_stride, 1};
    else strides = {batch_stride, mid_stride, row, 1};
  }
  mnemo::view<T, 4> view() { return {data.data(), shape, strides}; }
  mnemo::view<const T, 4> cview() const { return {data.data(), shape, strides}; }
  // Every cell outside the view still holds the canary.
  bool canaries_intact() const {
    std::vector<char> inside(data.size(), 0);
    for (std::int64_t a = 0; a < shape[0]; ++a)
      for (std::int64_t b = 0; b < shape[1]; ++b)
        for (std::int64_t c = 0; c < shape[2]; ++c)
          for (std::int64_t d = 0; d < shape[3]; ++d)
            inside[static_cast<std::size_t>(a * strides[0] + b * strides[1] + c * strides[2] + d)] = 1;
    for (std::size_t i = 0; i < data.size(); ++i)
      if (!inside[i] && !(mnemo::to_float(data[i]) == mnemo::to_float(T(canary)))) return false;
    return true;
  }
};

// The same for rank 3 (lse, gates), contiguous with a padded tail and head.
struct buffer3 {
  std::vector<float> data;
  mnemo::shape_t<3> shape{};
  static constexpr std::int64_t guard = 8;

  explicit buffer3(mnemo::shape_t<3> s) : shape(s) {
    data.assign(static_cast<std::size_t>(s[0] * s[1] * s[2] + 2 * guard), canary);
  }
  mnemo::view<float, 3> view() { return {data.data() + guard, shape}; }
  bool canaries_intact() const {
    const std::size_t n = data.size();
    for (std::size_t i = 0; i < static_cast<std::size_t>(guard); ++i)
      if (!(data[i] == canary) || !(data[n - 1 - i] == canary)) return false;
    return true;
  }
};

// |a - b| <= atol + rtol |b|, with -inf == -inf and NaN never close.
inline bool close(double a, double b, double atol, double rtol) {
  if (std::isinf(b) || std::isinf(a)) return a == b;
  return std::abs(a - b) <= atol + rtol * std::abs(b);
}

// Fills the cells of a view from a generator.
template <class T, class Gen>
void fill(mnemo::view<T, 4> v, Gen&& gen) {
  for (std::int64_t a = 0; a < v.extent(0); ++a)
    for (std::int64_t b = 0; b < v.extent(1); ++b)
      for (std::int64_t c = 0; c < v.extent(2); ++c)
        for (std::int64_t d = 0; d < v.extent(3); ++d) v(a, b, c, d) = T(gen());
}

}  // namespace fuzz
