// Tests for mnemo/attention/landmark.hpp: the grouped softmax (reference and fast path) on the
// golden cases landmark_attention*, fast against reference on random shapes and irregular landmark
// layouts (landmark at position 0, adjacent landmarks, no landmark, L = 1), weights that sum to one,
// the inference form landmark_decode against attention::reference restricted to the retrieved blocks
// and the window, "all blocks" equal to dense attention, and every argument check.
#include "mnemo/attention/landmark.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "golden/runner.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/tensor.hpp"

namespace {

namespace attn = mnemo::attention;
using mnemo::tensor;
using mnemo::view;

constexpr double atol = 2e-5, rtol = 1e-4;

template <class T, int R>
void fill(tensor<T, R>& t, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  for (T& x : t) x = T(u(rng));
}

template <int R>
void expect_close(view<const float, R> got, view<const float, R> want, double a, double r, const char* what) {
  ASSERT_EQ(got.shape(), want.shape());
  const std::int64_t n = got.size();
  for (std::int64_t i = 0; i < n; ++i) {
    const double w = want.data()[i];
    if (std::isinf(w)) {
      EXPECT_EQ(got.data()[i], want.data()[i]) << what << " at " << i;
      continue;
    }
    ASSERT_LE(std::fabs(got.data()[i] - w), a + r * std::fabs(w)) << what << " at " << i;
  }
}

TEST(LandmarkAttention, GoldenCasesBothPaths) {
  int seen = 0;
  for (const char* name : {"landmark_attention", "landmark_attention_b2"}) {
    const std::filesystem::path dir = std::filesystem::path(MNEMO_GOLDEN_DIR) / name;
    if (!std::filesystem::exists(dir / "meta.json")) continue;
    ++seen;
    const mnemo::golden::golden_case c(dir);
    const std::int64_t B = c.dim("B"), H = c.dim("H"), L = c.dim("L"), D = c.dim("D"), Dv = c.dim("Dv");
    const auto q = c.input<float, 4>("q", {B, H, L, D});
    const auto k = c.input<float, 4>("k", {B, H, L, D});
    const auto v = c.input<float, 4>("v", {B, H, L, Dv});
    const auto is_mem = c.input<std::int64_t, 1>("is_mem", {L});
    const auto want_out = mnemo::npy::load<float, 4>((dir / "out.npy").string());
    const auto want_w = mnemo::npy::load<float, 4>((dir / "weights.npy").string());
    const auto scale = static_cast<float>(c.number("scale"));
    for (bool reference : {true, false}) {
      SCOPED_TRACE(std::string(name) + (reference ? " reference" : " fast"));
      tensor<float, 4> out({B, H, L, Dv}), w({B, H, L, L});
      if (reference) attn::reference_landmark_attention(q, k, v, is_mem, out, w, scale);
      else attn::landmark_attention(q, k, v, is_mem, out, w, scale);
      expect_close<4>(out, want_out, c.atol(), c.rtol(), "out");
      expect_close<4>(w, want_w, c.atol(), c.rtol(), "weights");
    }
  }
  if (seen == 0) GTEST_SKIP() << "golden cases not found under " << MNEMO_GOLDEN_DIR;
}

// Fast vs reference for one landmark layout.
void check_fast(std::int64_t B, std::int64_t H, std::int64_t D, std::int64_t Dv, const std::vector<std::int64_t>& mem,
                std::uint32_t seed) {
  const auto L = static_cast<std::int64_t>(mem.size());
  SCOPED_TRACE(::testing::Message() << "L=" << L << " D=" << D << " Dv=" << Dv);
  std::mt19937 rng(seed);
  tensor<float, 4> q({B, H, L, D}), k({B, H, L, D}), v({B, H, L, Dv});
  fill(q, rng, -2.0f, 2.0f);
  fill(k, rng);
  fill(v, rng);
  tensor<std::int64_t, 1> is_mem({L});
  std::copy(mem.begin(), mem.end(), is_mem.begin());
  tensor<float, 4> out({B, H, L, Dv}), w({B, H, L, L}), ref({B, H, L, Dv}), ref_w({B, H, L, L});
  attn::reference_landmark_attention(q, k, v, is_mem, ref, ref_w);
  attn::landmark_attention(q, k, v, is_mem, out, w);
  expect_close<4>(out, ref, atol, rtol, "out");
  expect_close<4>(w, ref_w, atol, rtol, "weights");
  // Each row's weights sum to one, unless its top group is empty (a landmark at position 0) or it
  // reaches an earlier block without regular tokens (that landmark's mass is dropped).
  for (std::int64_t i = 0; i < L; ++i) {
    double sum = 0;
    for (std::int64_t j = 0; j < L; ++j) {
      sum += ref_w(0, 0, i, j);
      if (j > i || mem[static_cast<std::size_t>(j)]) {
        EXPECT_EQ(w(0, 0, i, j), 0.0f) << "landmarks and future keys get weight 0: row " << i << " key " << j;
      }
    }
    bool has_empty_block = false;
    for (std::int64_t j = 1; j < i; ++j) has_empty_block |= mem[static_cast<std::size_t>(j)] && mem[static_cast<std::size_t>(j - 1)];
    has_empty_block |= mem[0] && i > 0;
    if (!has_empty_block && !(i == 0 && mem[0])) {
      EXPECT_NEAR(sum, 1.0, 1e-5) << "row " << i;  // float weights, summed in double
    }
  }
}

TEST(LandmarkAttention, FastMatchesReference) {
  auto every = [](std::int64_t L, std::int64_t f) {
    std::vector<std::int64_t> m(static_cast<std::size_t>(L));
    for (std::int64_t j = 0; j < L; ++j) m[static_cast<std::size_t>(j)] = (j + 1) % (f + 1) == 0;
    return m;
  };
  check_fast(1, 2, 40, 24, every(37, 5), 1);
  check_fast(2, 1, 96, 96, every(64, 15), 2);
  check_fast(1, 1, 16, 8, every(1, 3), 3);
  check_fast(1, 1, 16, 8, std::vector<std::int64_t>(20, 0), 4);                     // no landmark: plain causal
  check_fast(1, 1, 33, 17, {1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0}, 5);    // irregular, empty blocks
}

TEST(LandmarkAttention, NoLandmarkIsCausalAttention) {
  std::mt19937 rng(6);
  const std::int64_t L = 29, D = 32;
  tensor<float, 4> q({1, 2, L, D}), k({1, 2, L, D}), v({1, 2, L, D});
  fill(q, rng);
  fill(k, rng);
  fill(v, rng);
  tensor<std::int64_t, 1> is_mem({L});
  tensor<float, 4> out({1, 2, L, D}), dense({1, 2, L, D});
  attn::landmark_attention(q, k, v, is_mem, out);
  attn::reference(q, k, v, dense, {}, attn::mods::causal{});
  expect_close<4>(out, dense, atol, rtol, "out");
}

TEST(LandmarkAttention, BadArgumentsThrow) {
  tensor<float, 4> q({1, 2, 10, 8}), k({1, 2, 10, 8}), v({1, 2, 10, 4}), out({1, 2, 10, 4});
  tensor<std::int64_t, 1> is_mem({10}), short_mem({9});
  EXPECT_NO_THROW(attn::landmark_attention(q, k, v, is_mem, out));
  EXPECT_THROW(attn::landmark_attention(q, k, v, short_mem, out), mnemo::error);
  is_mem(3) = 2;
  EXPECT_THROW(attn::landmark_attention(q, k, v, is_mem, out), mnemo::error);
  EXPECT_THROW(attn::reference_landmark_attention(q, k, v, is_mem, out), mnemo::error);
  is_mem(3) = 1;
  tensor<float, 4> k2({1, 2, 10, 6}), out2({1, 2, 10, 8}), w({1, 2, 10, 9});
  EXPECT_THROW(attn::landmark_attention(q, k2, v, is_mem, out), mnemo::error);
  EXPECT_THROW(attn::landmark_attention(q, k, v, is_mem, out2), mnemo::error);
  EXPECT_THROW(attn::landmark_attention(q, k, v, is_mem, out, w), mnemo::error);
  EXPECT_THROW(attn::landmark_attention(q, k, v, is_mem, out, {}, std::nanf("")), mnemo::error);
  EXPECT_THROW(attn::landmark_attention(q, k, v, is_mem, out, {}, 0.0f, -1), mnemo::error);
}

// landmark_decode vs attention::reference over the selected blocks' keys and the window.
void check_decode(std::int64_t Hq, std::int64_t Hkv, std::int64_t Lk, std::int64_t D, std::int64_t block,
                  std::int64_t blocks, std::int64_t window, std::uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "Hq=" << Hq << " Hkv=" << Hkv << " Lk=" << Lk << " block=" << block
                                    << " blocks=" << blocks << " window=" << window);
  std::mt19937 rng(seed);
  const std::int64_t n_blocks = Lk / block;
  tensor<float, 4> q({1, Hq, 1, D}), k({1, Hkv, Lk, D}), v({1, Hkv, Lk, D}), lm({1, Hkv, n_blocks, D});
  fill(q, rng, -2.0f, 2.0f);
  fill(k, rng);
  fill(v, rng);
  fill(lm, rng);
  tensor<float, 4> out({1, Hq, 1, D}), want({1, Hq, 1, D}), ref({1, Hq, 1, D});
  tensor<float, 3> lse({1, Hq, 1}), want_lse({1, Hq, 1}), ref_lse({1, Hq, 1});
  tensor<std::int64_t, 3> sel({1, Hq, blocks}), ref_sel({1, Hq, blocks});
  attn::landmark_options opt;
  opt.blocks = blocks;
  opt.window = window;
  attn::landmark_decode<float>(q, k, v, lm, block, out, lse, opt, sel);
  attn::reference_landmark_decode<float>(q, k, v, lm, block, ref, ref_lse, ref_sel, opt);
  const std::int64_t limit = std::max<std::int64_t>(0, Lk - window);
  for (std::int64_t h = 0; h < Hq; ++h) {
    std::vector<std::int64_t> chosen;
    for (std::int64_t i = 0; i < blocks; ++i)
      if (sel(0, h, i) >= 0) chosen.push_back(sel(0, h, i));
    attn::sparse_decode_detail::reference_over_keys<float>(q, k, v, want, want_lse, 0, h, h / (Hq / Hkv),
                                                           attn::sparse_decode_detail::key_set(chosen, block, limit, Lk),
                                                           static_cast<float>(1.0 / std::sqrt(double(D))));
  }
  expect_close<4>(out, want, atol, rtol, "out vs mask of the selection");
  expect_close<3>(lse, want_lse, atol, rtol, "lse vs mask of the selection");
  for (std::int64_t i = 0; i < sel.size(); ++i) EXPECT_EQ(sel.data()[i], ref_sel.data()[i]) << "selection " << i;
  expect_close<4>(out, ref, atol, rtol, "out vs reference_landmark_decode");
}

TEST(LandmarkDecode, MatchesReferenceOverSelectedBlocks) {
  check_decode(4, 2, 100, 40, 8, 3, 0, 1);
  check_decode(8, 1, 257, 64, 16, 4, 37, 2);   // a partial last block without a landmark
  check_decode(2, 2, 50, 40, 5, 3, 100, 3);    // window beyond the cache
  check_decode(4, 4, 64, 33, 4, 20, 9, 4);     // more blocks than candidates
}

TEST(LandmarkDecode, AllBlocksIsDenseAttention) {
  std::mt19937 rng(7);
  const std::int64_t Lk = 96, D = 32, block = 8;
  tensor<float, 4> q({1, 4, 1, D}), k({1, 2, Lk, D}), v({1, 2, Lk, D}), lm({1, 2, Lk / block, D});
  fill(q, rng, -2.0f, 2.0f);
  fill(k, rng);
  fill(v, rng);
  fill(lm, rng);
  tensor<float, 4> out({1, 4, 1, D}), dense({1, 4, 1, D});
  attn::landmark_options opt;
  opt.blocks = Lk / block;
  opt.window = 5;
  attn::landmark_decode<float>(q, k, v, lm, block, out, {}, opt);
  attn::reference(q, k, v, dense);
  expect_close<4>(out, dense, atol, rtol, "out");
}

TEST(LandmarkDecode, BadArgumentsThrow) {
  tensor<float, 4> q({1, 4, 1, 8}), k({1, 2, 32, 8}), v({1, 2, 32, 8}), out({1, 4, 1, 8});
  tensor<float, 4> lm({1, 2, 4, 8}), lm_many({1, 2, 5, 8}), lm_d({1, 2, 4, 6});
  EXPECT_NO_THROW(attn::landmark_decode<float>(q, k, v, lm, 8, out));
  EXPECT_THROW(attn::landmark_decode<float>(q, k, v, lm, 0, out), mnemo::error);
  EXPECT_THROW(attn::landmark_decode<float>(q, k, v, lm_many, 8, out), mnemo::error);  // 5 * 8 > Lk
  EXPECT_THROW(attn::landmark_decode<float>(q, k, v, lm_d, 8, out), mnemo::error);
  attn::landmark_options opt;
  opt.blocks = 0;
  EXPECT_THROW(attn::landmark_decode<float>(q, k, v, lm, 8, out, {}, opt), mnemo::error);
  tensor<float, 4> q2({1, 4, 2, 8}), out2({1, 4, 2, 8});
  EXPECT_THROW(attn::landmark_decode<float>(q2, k, v, lm, 8, out2), mnemo::error);
  EXPECT_THROW(attn::reference_landmark_decode<float>(q, k, v, lm_many, 8, out, {}, {}), mnemo::error);
}

}  // namespace
