// tests/attention/attention_test.cpp — attention::attend: every path gives the reference's answer,
// and automatic picks decode for small query blocks, flash otherwise.
#include "mnemo/attention/attention.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace att = mnemo::attention;
using mnemo::tensor;

namespace {

void fill(tensor<float, 4>& t, std::mt19937& rng) {
  std::normal_distribution<float> n;
  for (float& x : t) x = n(rng);
}

// Max |a - b| over all elements, and whether non-finite values sit at the same places.
double max_diff(const tensor<float, 3>& a, const tensor<float, 3>& b) {
  double m = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) {
    if (std::isinf(b.data()[i])) {
      EXPECT_EQ(a.data()[i], b.data()[i]) << "element " << i;
      continue;
    }
    m = std::max(m, double(std::fabs(a.data()[i] - b.data()[i])));
  }
  return m;
}
double max_diff(const tensor<float, 4>& a, const tensor<float, 4>& b) {
  double m = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a.data()[i] - b.data()[i])));
  return m;
}

}  // namespace

TEST(Attend, EveryPathMatchesTheReference) {
  std::mt19937 rng(11);
  for (std::int64_t Lq : {1, 5, 16, 17, 70}) {
    const std::int64_t B = 2, Hq = 4, Hkv = 2, Lk = 90, D = 40, Dv = 24;
    tensor<float, 4> q({B, Hq, Lq, D}), k({B, Hkv, Lk, D}), v({B, Hkv, Lk, Dv});
    fill(q, rng), fill(k, rng), fill(v, rng);
    tensor<float, 4> want({B, Hq, Lq, Dv});
    tensor<float, 3> want_lse({B, Hq, Lq});
    const auto mod = att::mods::sliding_window{33};
    att::reference(q, k, v, want, want_lse, mod);
    for (att::path p : {att::path::automatic, att::path::reference, att::path::flash, att::path::decode}) {
      if (p == att::path::decode && Lq > att::decode_max_rows) {
        tensor<float, 4> out({B, Hq, Lq, Dv});
        EXPECT_THROW(att::attend(q, k, v, out, {}, mod, {}, p), mnemo::error);
        continue;
      }
      tensor<float, 4> out({B, Hq, Lq, Dv});
      tensor<float, 3> lse({B, Hq, Lq});
      att::attend(q, k, v, out, lse, mod, {}, p);
      EXPECT_LT(max_diff(out, want), 2e-5) << "Lq=" << Lq << " path=" << int(p);
      EXPECT_LT(max_diff(lse, want_lse), 2e-5) << "Lq=" << Lq << " path=" << int(p);
    }
  }
}

TEST(Attend, AutomaticRule) {
  EXPECT_EQ(att::choose_path(1), att::path::decode);
  EXPECT_EQ(att::choose_path(att::decode_max_rows), att::path::decode);
  EXPECT_EQ(att::choose_path(att::decode_max_rows + 1), att::path::flash);
}
