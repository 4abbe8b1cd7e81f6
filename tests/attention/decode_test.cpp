// Tests for mnemo/attention/decode.hpp: split-KV decode against attention::reference (every mod,
// GQA/MQA, Lq 1..16, Lk around the chunk size, D 40..256, f16/bf16 K/V, rows with no visible key),
// bit-identical results for every thread count, strided cache views, the two-way and N-way merges
// against attention over the union of the key sets, the golden cases decode_* and attn_merge_*,
// and every argument check.
#include "mnemo/attention/decode.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/tensor.hpp"
#include "support/support.hpp"

namespace {

namespace attn = mnemo::attention;
namespace mods = mnemo::attention::mods;
using mnemo::bf16;
using mnemo::f16;
using mnemo::shape_t;
using mnemo::tensor;
using mnemo::view;

constexpr float neg_inf = -std::numeric_limits<float>::infinity();
constexpr std::int64_t C = attn::decode_chunk;

// f32 tolerance of decode against the double reference (the golden cases use the same).
constexpr double f32_atol = 2e-5, f32_rtol = 1e-4;

struct problem {
  std::int64_t B = 1, Hq = 4, Hkv = 1, Lq = 1, Lk = 1, D = 64, Dv = 64;
};

std::string describe(const problem& p) {
  return "B=" + std::to_string(p.B) + " Hq=" + std::to_string(p.Hq) + " Hkv=" + std::to_string(p.Hkv) +
         " Lq=" + std::to_string(p.Lq) + " Lk=" + std::to_string(p.Lk) + " D=" + std::to_string(p.D) +
         " Dv=" + std::to_string(p.Dv);
}

template <class T, int R>
void fill(tensor<T, R>& t, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  for (T& x : t) x = T(u(rng));
}

// Inputs with K/V in f32; q is spread to [-2, 2] so the softmax rows are not flat.
struct inputs {
  problem p;
  tensor<float, 4> q, k, v;
  inputs(const problem& pr, std::uint32_t seed)
      : p(pr), q({pr.B, pr.Hq, pr.Lq, pr.D}), k({pr.B, pr.Hkv, pr.Lk, pr.D}), v({pr.B, pr.Hkv, pr.Lk, pr.Dv}) {
    std::mt19937 rng(seed);
    fill(q, rng, -2.0f, 2.0f);
    fill(k, rng);
    fill(v, rng);
  }
};

template <class T, int R>
tensor<T, R> convert(const tensor<float, R>& x) {
  tensor<T, R> y(x.shape());
  std::transform(x.begin(), x.end(), y.begin(), [](float f) { return T(f); });
  return y;
}

struct result {
  tensor<float, 4> out;
  tensor<float, 3> lse;
  explicit result(const problem& p) : out({p.B, p.Hq, p.Lq, p.Dv}), lse({p.B, p.Hq, p.Lq}) {}
};

template <class KV, class Mod>
result run_decode(const problem& p, const tensor<float, 4>& q, const tensor<KV, 4>& k, const tensor<KV, 4>& v,
                  const Mod& mod, int threads = 0) {
  result r(p);
  attn::decode(q, k, v, r.out, r.lse, mod, attn::options{0, threads});
  return r;
}

template <class KV, class Mod>
result run_reference(const problem& p, const tensor<float, 4>& q, const tensor<KV, 4>& k, const tensor<KV, 4>& v,
                     const Mod& mod) {
  result r(p);
  attn::reference(q, k, v, r.out, r.lse, mod);
  return r;
}

// Max over elements of |got - want| / (atol + rtol |want|): <= 1 passes. -inf must match exactly
// (returns +inf otherwise); NaN never passes.
template <class T, int R>
double tolerance_used(const tensor<T, R>& got, const tensor<T, R>& want, double atol, double rtol) {
  double worst = 0;
  for (std::int64_t i = 0; i < got.size(); ++i) {
    const double g = got.data()[i], w = want.data()[i];
    if (std::isnan(g) || std::isnan(w)) return std::numeric_limits<double>::infinity();
    if (std::isinf(w) || std::isinf(g)) {
      if (g != w) return std::numeric_limits<double>::infinity();
      continue;
    }
    worst = std::max(worst, std::abs(g - w) / (atol + rtol * std::abs(w)));
  }
  return worst;
}

template <class T, int R>
double max_abs_diff(const tensor<T, R>& a, const tensor<T, R>& b) {
  double worst = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) {
    const double x = a.data()[i], y = b.data()[i];
    if (std::isinf(x) && x == y) continue;
    worst = std::max(worst, std::abs(x - y));
  }
  return worst;
}

template <class T, int R>
bool bit_identical(const tensor<T, R>& a, const tensor<T, R>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

template <class Mod>
void expect_matches_reference(const problem& p, const Mod& mod, std::uint32_t seed, const std::string& what) {
  const inputs in(p, seed);
  const result got = run_decode(p, in.q, in.k, in.v, mod);
  const result want = run_reference(p, in.q, in.k, in.v, mod);
  EXPECT_LE(tolerance_used(got.out, want.out, f32_atol, f32_rtol), 1.0) << what << " " << describe(p) << " (out)";
  EXPECT_LE(tolerance_used(got.lse, want.lse, f32_atol, f32_rtol), 1.0) << what << " " << describe(p) << " (lse)";
}

// ---------------------------------------------------------------------------------------------
// decode against the reference

TEST(Decode, MatchesReferenceOnShapesAroundTheChunk) {
  // Lk on both sides of the chunk edges; D with and without a batch tail; MHA, GQA 2/4/8 and MQA;
  // Lq from 1 to 16 (Lq <= Lk: the causal diagonal reaches into the cache); rows per kv head
  // (G Lq) of 1, 2, 3 and more, so every score and value tile shape runs.
  const std::vector<problem> problems = {
      {1, 4, 4, 1, 1, 64, 64},       {1, 8, 2, 1, C - 1, 40, 40},  {2, 8, 1, 1, C, 128, 128},
      {1, 8, 1, 3, C + 1, 256, 256}, {1, 4, 1, 16, 2 * C + 3, 64, 64}, {1, 8, 1, 5, 3 * C - 1, 40, 24},
      {2, 16, 2, 2, 2000, 64, 64},   {1, 32, 4, 1, 3001, 128, 128}, {1, 2, 2, 7, 70, 96, 96},
      {1, 6, 3, 11, C, 33, 17},      {1, 1, 1, 1, 1, 1, 1},        {1, 3, 1, 16, C + 1, 256, 64},
      {1, 4, 2, 1, C + 1, 64, 64},   {1, 2, 2, 3, C + 2, 40, 40},  {1, 4, 4, 2, 2 * C, 128, 80},
  };
  std::uint32_t seed = 100;
  for (const problem& p : problems) {
    expect_matches_reference(p, mods::none{}, seed++, "none");
    expect_matches_reference(p, mods::causal{}, seed++, "causal");
  }
}

TEST(Decode, EveryModMatchesReference) {
  const problem p{1, 8, 2, 4, 3 * C + 17, 64, 48};
  const auto slopes_vec = mods::alibi_slopes(p.Hq);
  const view<const float, 1> slopes(slopes_vec.data(), {p.Hq});
  std::vector<std::int64_t> ids_vec(static_cast<std::size_t>(p.Lk));
  for (std::int64_t j = 0; j < p.Lk; ++j) ids_vec[static_cast<std::size_t>(j)] = j < 300 ? 0 : j < 700 ? 1 : 2;
  const view<const std::int64_t, 1> ids(ids_vec.data(), {p.Lk});
  std::uint32_t seed = 200;
  expect_matches_reference(p, mods::none{}, seed++, "none");
  expect_matches_reference(p, mods::causal{}, seed++, "causal");
  expect_matches_reference(p, mods::sliding_window{1}, seed++, "window 1");
  expect_matches_reference(p, mods::sliding_window{100}, seed++, "window 100");
  expect_matches_reference(p, mods::sliding_window{C}, seed++, "window chunk");
  expect_matches_reference(p, mods::sliding_window{C + 5}, seed++, "window chunk+5");
  expect_matches_reference(p, mods::prefix_lm{10}, seed++, "prefix_lm");
  expect_matches_reference(p, mods::all_of(mods::document{ids}, mods::causal{}), seed++, "document causal");
  expect_matches_reference(p, mods::document{ids}, seed++, "document");
  expect_matches_reference(p, mods::softcap{2.0f}, seed++, "softcap");
  expect_matches_reference(p, mods::alibi{slopes}, seed++, "alibi");
  expect_matches_reference(p, mods::all_of(mods::softcap{5.0f}, mods::alibi{slopes}, mods::causal{}), seed++,
                           "softcap alibi causal");
  expect_matches_reference(p, mods::all_of(mods::softcap{5.0f}, mods::alibi{slopes}, mods::sliding_window{300}),
                           seed++, "softcap alibi window");
}

TEST(Decode, WindowSkipsEmptyChunksAndStillMatches) {
  // Lk = 10 chunks, window 40 in the last chunk only: nine chunks are empty for every row. A NaN
  // in a key outside the window must not reach the result (those chunks are never read).
  const problem p{1, 8, 2, 2, 10 * C, 64, 64};
  inputs in(p, 300);
  in.k(0, 0, 5, 3) = std::numeric_limits<float>::quiet_NaN();
  in.v(0, 1, C + 2, 0) = std::numeric_limits<float>::quiet_NaN();
  const mods::sliding_window mod{40};
  const result got = run_decode(p, in.q, in.k, in.v, mod);
  const result want = run_reference(p, in.q, in.k, in.v, mod);
  EXPECT_LE(tolerance_used(got.out, want.out, f32_atol, f32_rtol), 1.0);
  EXPECT_LE(tolerance_used(got.lse, want.lse, f32_atol, f32_rtol), 1.0);
}

TEST(Decode, RowsThatSeeNoKeyGiveZeroAndMinusInf) {
  // Lq > Lk, causal: rows 0 .. Lq - Lk - 1 sit before the first key; a window of 2 also leaves
  // later rows with keys only partly visible.
  for (const problem p : {problem{1, 4, 2, 16, 5, 40, 40}, problem{2, 2, 1, 9, 1, 64, 32}}) {
    const inputs in(p, 400);
    for (int w = 0; w < 2; ++w) {
      const result got = w ? run_decode(p, in.q, in.k, in.v, mods::sliding_window{2})
                           : run_decode(p, in.q, in.k, in.v, mods::causal{});
      const result want = w ? run_reference(p, in.q, in.k, in.v, mods::sliding_window{2})
                            : run_reference(p, in.q, in.k, in.v, mods::causal{});
      for (std::int64_t b = 0; b < p.B; ++b)
        for (std::int64_t h = 0; h < p.Hq; ++h)
          for (std::int64_t i = 0; i < p.Lq - p.Lk; ++i) {
            EXPECT_EQ(got.lse(b, h, i), neg_inf);
            for (std::int64_t c = 0; c < p.Dv; ++c) EXPECT_EQ(got.out(b, h, i, c), 0.0f);
          }
      EXPECT_LE(tolerance_used(got.out, want.out, f32_atol, f32_rtol), 1.0) << describe(p);
      EXPECT_LE(tolerance_used(got.lse, want.lse, f32_atol, f32_rtol), 1.0) << describe(p);
    }
  }
}

TEST(Decode, EmptyCacheGivesZeroAndMinusInf) {
  // A cache with no slot used yet: a view of 0 keys into real storage.
  const problem p{1, 4, 2, 1, 0, 32, 32};
  const inputs in(p, 450);
  const tensor<float, 4> cache({1, 2, 8, 32});
  const view<const float, 4> kv = view<const float, 4>(cache).narrow(2, 0, 0);
  result got(p);
  std::fill(got.out.begin(), got.out.end(), 7.0f);
  attn::decode(in.q, kv, kv, got.out, got.lse);
  for (float x : got.out) EXPECT_EQ(x, 0.0f);
  for (float x : got.lse) EXPECT_EQ(x, neg_inf);
}

TEST(Decode, LargeLogitsDoNotOverflow) {
  // Scores of about 1e3 in every chunk: each chunk's softmax and the merge must shift by the max.
  problem p{1, 4, 1, 2, 3 * C, 64, 64};
  inputs in(p, 460);
  for (float& x : in.q) x *= 400.0f;
  const result got = run_decode(p, in.q, in.k, in.v, mods::none{});
  const result want = run_reference(p, in.q, in.k, in.v, mods::none{});
  for (float x : got.out) ASSERT_TRUE(std::isfinite(x));
  EXPECT_LE(tolerance_used(got.out, want.out, 1e-4, 1e-3), 1.0);
  EXPECT_LE(tolerance_used(got.lse, want.lse, 1e-4, 1e-4), 1.0);
}

// ---------------------------------------------------------------------------------------------
// f16 / bf16 K/V

// decode on rounded K/V may be off the exact (f32-input) answer by at most 2x what the double
// reference on the same rounded K/V is off by (STYLE.md's rule for 16-bit storage).
template <class KV, class Mod>
void expect_within_twice_reference_error(const problem& p, const Mod& mod, std::uint32_t seed) {
  const inputs in(p, seed);
  const tensor<KV, 4> k = convert<KV>(in.k), v = convert<KV>(in.v);
  const result exact = run_reference(p, in.q, in.k, in.v, mod);
  const result ref16 = run_reference(p, in.q, k, v, mod);
  const result got = run_decode(p, in.q, k, v, mod);
  const double floor = 1e-6;  // f32 rounding of the kernel itself, for inputs the rounding leaves exact
  EXPECT_LE(max_abs_diff(got.out, exact.out), 2 * max_abs_diff(ref16.out, exact.out) + floor)
      << mnemo::dtype_name<KV>() << " " << describe(p);
  EXPECT_LE(max_abs_diff(got.lse, exact.lse), 2 * max_abs_diff(ref16.lse, exact.lse) + floor)
      << mnemo::dtype_name<KV>() << " " << describe(p);
  // and it agrees with the reference on the same rounded inputs to f32 tolerance
  EXPECT_LE(tolerance_used(got.out, ref16.out, f32_atol, f32_rtol), 1.0) << describe(p);
}

TEST(Decode, HalfPrecisionKVWithinTwiceTheReferenceError) {
  const std::vector<problem> problems = {{1, 8, 2, 1, 2 * C + 1, 128, 128},
                                         {1, 4, 1, 5, C - 1, 40, 40},
                                         {1, 8, 8, 16, 700, 64, 64},
                                         {2, 8, 1, 3, 1, 256, 256}};
  std::uint32_t seed = 500;
  for (const problem& p : problems) {
    expect_within_twice_reference_error<f16>(p, mods::causal{}, seed++);
    expect_within_twice_reference_error<bf16>(p, mods::causal{}, seed++);
    expect_within_twice_reference_error<f16>(p, mods::sliding_window{100}, seed++);
    expect_within_twice_reference_error<bf16>(p, mods::softcap{3.0f}, seed++);
  }
}

// ---------------------------------------------------------------------------------------------
// threads, views, workspace

template <class KV>
void expect_same_bits_for_all_thread_counts(const problem& p, std::uint32_t seed) {
  const inputs in(p, seed);
  const tensor<KV, 4> k = convert<KV>(in.k), v = convert<KV>(in.v);
  const mods::sliding_window mod{p.Lk - 3};
  const result one = run_decode(p, in.q, k, v, mod, 1);
  for (int threads : {2, 3, 0}) {
    const result other = run_decode(p, in.q, k, v, mod, threads);
    EXPECT_TRUE(bit_identical(one.out, other.out)) << "threads=" << threads << " " << describe(p);
    EXPECT_TRUE(bit_identical(one.lse, other.lse)) << "threads=" << threads << " " << describe(p);
  }
}

TEST(Decode, BitIdenticalForEveryThreadCount) {
  expect_same_bits_for_all_thread_counts<float>({1, 8, 2, 1, 7 * C + 5, 64, 64}, 600);
  expect_same_bits_for_all_thread_counts<f16>({2, 4, 1, 4, 3 * C + 1, 40, 40}, 601);
  expect_same_bits_for_all_thread_counts<bf16>({1, 2, 2, 16, 5 * C, 128, 96}, 602);
}

TEST(Decode, ReadsStridedCacheViewsWithoutCopies) {
  // K/V live in a cache [Hkv, capacity, D] of which the first Lk slots are used; q arrives as
  // [B, Lq, Hq, D] and out goes to [B, Lq, Hq, Dv], both through permuted views; out sits inside
  // a larger buffer whose other elements must stay untouched.
  const problem p{1, 8, 2, 3, 2 * C + 9, 72, 56};
  const std::int64_t capacity = p.Lk + 100;
  const inputs in(p, 700);
  tensor<f16, 3> kc({p.Hkv, capacity, p.D}), vc({p.Hkv, capacity, p.Dv});
  std::fill(kc.begin(), kc.end(), f16(std::numeric_limits<float>::quiet_NaN()));  // unused slots: poison
  std::fill(vc.begin(), vc.end(), f16(std::numeric_limits<float>::quiet_NaN()));
  for (std::int64_t h = 0; h < p.Hkv; ++h)
    for (std::int64_t j = 0; j < p.Lk; ++j) {
      for (std::int64_t c = 0; c < p.D; ++c) kc(h, j, c) = f16(in.k(0, h, j, c));
      for (std::int64_t c = 0; c < p.Dv; ++c) vc(h, j, c) = f16(in.v(0, h, j, c));
    }
  const view<const f16, 4> k(kc.data(), {1, p.Hkv, p.Lk, p.D}, {p.Hkv * capacity * p.D, capacity * p.D, p.D, 1});
  const view<const f16, 4> v(vc.data(), {1, p.Hkv, p.Lk, p.Dv}, {p.Hkv * capacity * p.Dv, capacity * p.Dv, p.Dv, 1});
  tensor<float, 4> q_blhd({p.B, p.Lq, p.Hq, p.D});
  for (std::int64_t h = 0; h < p.Hq; ++h)
    for (std::int64_t i = 0; i < p.Lq; ++i)
      for (std::int64_t c = 0; c < p.D; ++c) q_blhd(0, i, h, c) = in.q(0, h, i, c);
  const view<const float, 4> q = view<const float, 4>(q_blhd).permute({0, 2, 1, 3});
  constexpr std::int64_t pad = 5;  // extra floats per output row, and before the first
  constexpr float sentinel = 12345.0f;
  std::vector<float> out_buf(static_cast<std::size_t>(pad + p.Lq * p.Hq * (p.Dv + pad)), sentinel);
  const view<float, 4> out =
      view<float, 4>(out_buf.data() + pad, {p.B, p.Lq, p.Hq, p.Dv}, {0, p.Hq * (p.Dv + pad), p.Dv + pad, 1})
          .permute({0, 2, 1, 3});
  tensor<float, 3> lse({p.B, p.Hq, p.Lq});
  const mods::all_of_t<mods::softcap, mods::causal> mod = mods::all_of(mods::softcap{4.0f}, mods::causal{});
  attn::decode(q, k, v, out, lse, mod);

  // Same bits as decode on contiguous copies, and within tolerance of the reference.
  const tensor<f16, 4> k16 = convert<f16>(in.k), v16 = convert<f16>(in.v);
  const result contiguous = run_decode(p, in.q, k16, v16, mod);
  const result want = run_reference(p, in.q, k16, v16, mod);
  tensor<float, 4> got({p.B, p.Hq, p.Lq, p.Dv});
  for (std::int64_t h = 0; h < p.Hq; ++h)
    for (std::int64_t i = 0; i < p.Lq; ++i)
      for (std::int64_t c = 0; c < p.Dv; ++c) got(0, h, i, c) = out(0, h, i, c);
  EXPECT_TRUE(bit_identical(got, contiguous.out));
  EXPECT_TRUE(bit_identical(lse, contiguous.lse));
  EXPECT_LE(tolerance_used(got, want.out, f32_atol, f32_rtol), 1.0);
  std::int64_t untouched = 0;
  for (float x : out_buf) untouched += x == sentinel;
  EXPECT_EQ(untouched, pad + p.Lq * p.Hq * pad);
}

TEST(Decode, ReusedWorkspaceGivesTheSameBits) {
  attn::decode_workspace ws;
  const problem big{1, 8, 2, 4, 3 * C + 7, 64, 64}, small{2, 4, 4, 1, 20, 40, 40};
  for (const problem& p : {big, small, big}) {
    const inputs in(p, 800);
    const result fresh = run_decode(p, in.q, in.k, in.v, mods::causal{});
    result reused(p);
    attn::decode<float>(in.q, in.k, in.v, reused.out, reused.lse, mods::causal{}, {}, ws);
    EXPECT_TRUE(bit_identical(fresh.out, reused.out)) << describe(p);
    EXPECT_TRUE(bit_identical(fresh.lse, reused.lse)) << describe(p);
  }
  EXPECT_GT(ws.capacity(), 0);
}

TEST(Decode, WithoutLseWritesOnlyOut) {
  const problem p{1, 4, 1, 2, C + 3, 64, 64};
  const inputs in(p, 850);
  result with(p);
  tensor<float, 4> without({p.B, p.Hq, p.Lq, p.Dv});
  attn::decode(in.q, in.k, in.v, with.out, with.lse, mods::causal{});
  attn::decode(in.q, in.k, in.v, without, {}, mods::causal{});
  EXPECT_TRUE(bit_identical(with.out, without));
}

// ---------------------------------------------------------------------------------------------
// merge

// Mod M with positions translated by (dq, dk): the attention over a sub-range of the keys then
// masks and biases exactly as the attention over all keys does.
template <class M>
struct shifted {
  M m;
  std::int64_t dq = 0, dk = 0;
  bool visible(std::int64_t qp, std::int64_t kp) const { return mods::visible(m, qp + dq, kp + dk); }
  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    return mods::score(m, s, h, qp + dq, kp + dk);
  }
  attn::tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    return mods::classify(m, q0 + dq, q1 + dq, k0 + dk, k1 + dk);
  }
};

// Reference attention over the keys [j0, j1) of `in`, positions as in the full attention.
template <class M>
result part_reference(const inputs& in, std::int64_t j0, std::int64_t j1, const M& m) {
  const problem& p = in.p;
  result r(p);
  const view<const float, 4> k = view<const float, 4>(in.k).narrow(2, j0, j1 - j0);
  const view<const float, 4> v = view<const float, 4>(in.v).narrow(2, j0, j1 - j0);
  // Sub-attention positions: query row i at i + (j1 - j0) - Lq, key j at j - j0.
  const shifted<M> mod{m, p.Lk - (j1 - j0), j0};
  attn::reference(in.q, k, v, r.out, r.lse, mod);
  return r;
}

TEST(Merge, TwoPartsEqualAttentionOverTheUnion) {
  const problem p{1, 8, 2, 5, 300, 40, 40};
  const inputs in(p, 900);
  const auto slopes_vec = mods::alibi_slopes(p.Hq);
  const auto mod = mods::all_of(mods::alibi{view<const float, 1>(slopes_vec.data(), {p.Hq})}, mods::causal{});
  const result whole = run_reference(p, in.q, in.k, in.v, mod);
  std::mt19937 rng(901);
  std::vector<std::int64_t> splits = {0, p.Lk, p.Lk - 2};  // empty a, empty b, b empty for early rows
  for (int t = 0; t < 4; ++t) splits.push_back(std::uniform_int_distribution<std::int64_t>(1, p.Lk - 1)(rng));
  for (std::int64_t split : splits) {
    const result a = part_reference(in, 0, split, mod), b = part_reference(in, split, p.Lk, mod);
    result merged(p);
    attn::merge(a.out, a.lse, b.out, b.lse, merged.out, merged.lse);
    EXPECT_LE(tolerance_used(merged.out, whole.out, 1e-5, 1e-5), 1.0) << "split " << split;
    EXPECT_LE(tolerance_used(merged.lse, whole.lse, 1e-5, 1e-5), 1.0) << "split " << split;
    // In place, into a's buffers: the same bits.
    result inplace = a;
    attn::merge(inplace.out, inplace.lse, b.out, b.lse, inplace.out, inplace.lse);
    EXPECT_TRUE(bit_identical(inplace.out, merged.out)) << "split " << split;
    EXPECT_TRUE(bit_identical(inplace.lse, merged.lse)) << "split " << split;
    // ... and into b's.
    result inplace_b = b;
    attn::merge(a.out, a.lse, inplace_b.out, inplace_b.lse, inplace_b.out, inplace_b.lse);
    EXPECT_TRUE(bit_identical(inplace_b.out, merged.out)) << "split " << split;
  }
}

TEST(Merge, BothPartsEmptyGiveZeroAndMinusInfNeverNaN) {
  const problem p{1, 2, 1, 3, 4, 16, 16};
  result a(p), b(p), merged(p);
  std::fill(a.lse.begin(), a.lse.end(), neg_inf);
  std::fill(b.lse.begin(), b.lse.end(), neg_inf);
  std::fill(merged.out.begin(), merged.out.end(), 3.0f);
  attn::merge(a.out, a.lse, b.out, b.lse, merged.out, merged.lse);
  for (float x : merged.out) EXPECT_EQ(x, 0.0f);
  for (float x : merged.lse) EXPECT_EQ(x, neg_inf);
  // An empty part's out is never read: even NaN there gets weight 0.
  std::fill(b.out.begin(), b.out.end(), std::numeric_limits<float>::quiet_NaN());
  std::fill(a.lse.begin(), a.lse.end(), 0.5f);
  std::fill(a.out.begin(), a.out.end(), 2.0f);
  attn::merge(a.out, a.lse, b.out, b.lse, merged.out, merged.lse);
  for (float x : merged.out) EXPECT_EQ(x, 2.0f);
  for (float x : merged.lse) EXPECT_EQ(x, 0.5f);
}

TEST(Merge, ManyPartsEqualAttentionOverTheUnion) {
  const problem p{2, 4, 4, 6, 500, 32, 24};
  const inputs in(p, 1000);
  const mods::sliding_window mod{120};
  const result whole = run_reference(p, in.q, in.k, in.v, mod);
  std::mt19937 rng(1001);
  for (int n_parts : {1, 2, 5, 9}) {
    std::vector<std::int64_t> cuts = {0, p.Lk};
    for (int c = 1; c < n_parts; ++c) cuts.push_back(std::uniform_int_distribution<std::int64_t>(0, p.Lk)(rng));
    if (n_parts > 2) cuts.push_back(cuts.back());  // an empty part
    std::sort(cuts.begin(), cuts.end());
    std::vector<result> parts;
    for (std::size_t c = 0; c + 1 < cuts.size(); ++c) parts.push_back(part_reference(in, cuts[c], cuts[c + 1], mod));
    std::vector<view<const float, 4>> outs;
    std::vector<view<const float, 3>> lses;
    for (const result& r : parts) {
      outs.push_back(r.out);
      lses.push_back(r.lse);
    }
    result merged(p);
    attn::merge(outs, lses, merged.out, merged.lse);
    EXPECT_LE(tolerance_used(merged.out, whole.out, 1e-5, 1e-5), 1.0) << n_parts << " parts";
    EXPECT_LE(tolerance_used(merged.lse, whole.lse, 1e-5, 1e-5), 1.0) << n_parts << " parts";
    // In place into the first part, and with several threads: the same bits.
    result inplace = parts[0];
    outs[0] = inplace.out;
    lses[0] = inplace.lse;
    attn::merge(outs, lses, inplace.out, inplace.lse, 3);
    EXPECT_TRUE(bit_identical(inplace.out, merged.out)) << n_parts << " parts";
    EXPECT_TRUE(bit_identical(inplace.lse, merged.lse)) << n_parts << " parts";
  }
  result none(p);
  std::fill(none.out.begin(), none.out.end(), 1.0f);
  attn::merge(std::span<const view<const float, 4>>{}, std::span<const view<const float, 3>>{}, none.out, none.lse);
  for (float x : none.out) EXPECT_EQ(x, 0.0f);
  for (float x : none.lse) EXPECT_EQ(x, neg_inf);
}

// ---------------------------------------------------------------------------------------------
// golden cases

std::filesystem::path golden_dir() {
  const char* env = std::getenv("MNEMO_GOLDEN_DIR");
  return env && *env ? std::filesystem::path(env) : std::filesystem::path(MNEMO_GOLDEN_DIR);
}

std::vector<std::filesystem::path> golden_cases(const std::string& op) {
  std::vector<std::filesystem::path> cases;
  if (!std::filesystem::exists(golden_dir())) return cases;
  for (const auto& entry : std::filesystem::directory_iterator(golden_dir())) {
    const auto meta = entry.path() / "meta.json";
    if (!std::filesystem::exists(meta)) continue;
    std::ifstream f(meta);
    if (nlohmann::json::parse(f).at("op") == op) cases.push_back(entry.path());
  }
  std::sort(cases.begin(), cases.end());
  return cases;
}

nlohmann::json read_meta(const std::filesystem::path& dir) {
  std::ifstream f(dir / "meta.json");
  return nlohmann::json::parse(f);
}

template <int R>
tensor<float, R> load(const std::filesystem::path& dir, const char* name) {
  return mnemo::npy::load<float, R>((dir / (std::string(name) + ".npy")).string());
}

TEST(Golden, DecodeCases) {
  const auto cases = golden_cases("attention_decode");
  ASSERT_GE(cases.size(), 4u) << "golden decode cases not found under " << golden_dir();
  for (const auto& dir : cases) {
    const auto meta = read_meta(dir);
    const auto& prm = meta.at("params");
    const double atol = meta.at("atol"), rtol = meta.at("rtol");
    const auto q = load<4>(dir, "q"), k = load<4>(dir, "k"), v = load<4>(dir, "v");
    const auto want_out = load<4>(dir, "out");
    const auto want_lse = load<3>(dir, "lse");
    ASSERT_TRUE(prm.at("causal").get<bool>()) << dir;
    ASSERT_EQ(prm.at("softcap").get<double>(), 0.0) << dir << ": softcap decode cases are not wired here";
    ASSERT_FALSE(prm.at("alibi").get<bool>()) << dir << ": alibi decode cases are not wired here";
    const attn::options opt{prm.at("scale").get<float>(), 0};
    tensor<float, 4> out(want_out.shape());
    tensor<float, 3> lse(want_lse.shape());
    const std::int64_t window = prm.at("window");
    if (window > 0) attn::decode(q, k, v, out, lse, mods::sliding_window{window}, opt);
    else attn::decode(q, k, v, out, lse, mods::causal{}, opt);
    EXPECT_LE(tolerance_used(out, want_out, atol, rtol), 1.0) << dir.filename();
    EXPECT_LE(tolerance_used(lse, want_lse, atol, rtol), 1.0) << dir.filename();
  }
}

TEST(Golden, MergeCases) {
  const auto cases = golden_cases("attention_merge");
  ASSERT_GE(cases.size(), 2u) << "golden merge cases not found under " << golden_dir();
  for (const auto& dir : cases) {
    const auto meta = read_meta(dir);
    const double atol = meta.at("atol"), rtol = meta.at("rtol");
    const auto out_a = load<4>(dir, "out_a"), out_b = load<4>(dir, "out_b");
    const auto lse_a = load<3>(dir, "lse_a"), lse_b = load<3>(dir, "lse_b");
    const auto want_out = load<4>(dir, "out");
    const auto want_lse = load<3>(dir, "lse");
    tensor<float, 4> out(want_out.shape());
    tensor<float, 3> lse(want_lse.shape());
    attn::merge(out_a, lse_a, out_b, lse_b, out, lse);
    EXPECT_LE(tolerance_used(out, want_out, atol, rtol), 1.0) << dir.filename();
    EXPECT_LE(tolerance_used(lse, want_lse, atol, rtol), 1.0) << dir.filename();
    // The N-way merge with two parts agrees.
    const std::vector<view<const float, 4>> outs = {out_a, out_b};
    const std::vector<view<const float, 3>> lses = {lse_a, lse_b};
    tensor<float, 4> out_n(want_out.shape());
    tensor<float, 3> lse_n(want_lse.shape());
    attn::merge(outs, lses, out_n, lse_n);
    EXPECT_LE(tolerance_used(out_n, want_out, atol, rtol), 1.0) << dir.filename();
    EXPECT_LE(tolerance_used(lse_n, want_lse, atol, rtol), 1.0) << dir.filename();
  }
}

// ---------------------------------------------------------------------------------------------
// bad input

using mnemo::test::expect_error;

TEST(Decode, RejectsBadArguments) {
  const problem p{1, 4, 2, 2, 10, 8, 8};
  const inputs in(p, 1100);
  result r(p);
  const auto run = [&](auto&& q, auto&& k, auto&& v, auto&& out, auto&& lse, const auto& mod, attn::options opt = {}) {
    return [&, opt] { attn::decode(q, k, v, out, lse, mod, opt); };
  };
  tensor<float, 4> q17({1, 4, 17, 8}), out17({1, 4, 17, 8});
  tensor<float, 4> k17({1, 2, 17, 8}), v17({1, 2, 17, 8});
  expect_error(run(q17, k17, v17, out17, view<float, 3>{}, mods::causal{}), {"Lq", "16", "17"});
  tensor<float, 4> k_bad_d({1, 2, 10, 9});
  expect_error(run(in.q, k_bad_d, in.v, r.out, r.lse, mods::none{}), {"k", "[1, 2, 10, 8]", "[1, 2, 10, 9]"});
  tensor<float, 4> v_bad_l({1, 2, 11, 8});
  expect_error(run(in.q, in.k, v_bad_l, r.out, r.lse, mods::none{}), {"v", "[1, 2, 10, 8]", "[1, 2, 11, 8]"});
  tensor<float, 4> k3({1, 3, 10, 8}), v3({1, 3, 10, 8});
  expect_error(run(in.q, k3, v3, r.out, r.lse, mods::none{}), {"Hq", "Hkv", "Hq=4", "Hkv=3"});
  tensor<float, 4> out_bad({1, 4, 2, 7});
  expect_error(run(in.q, in.k, in.v, out_bad, r.lse, mods::none{}), {"out", "[1, 4, 2, 8]", "[1, 4, 2, 7]"});
  tensor<float, 3> lse_bad({1, 4, 3});
  expect_error(run(in.q, in.k, in.v, r.out, lse_bad, mods::none{}), {"lse", "[1, 4, 2]", "[1, 4, 3]"});
  expect_error(run(in.q, in.k, in.v, r.out, r.lse, mods::none{}, attn::options{std::numeric_limits<float>::infinity(), 0}),
               {"scale", "finite", "inf"});
  expect_error(run(in.q, in.k, in.v, r.out, r.lse, mods::none{}, attn::options{0, -1}), {"threads", ">= 0", "-1"});
  expect_error(run(in.q, in.k, in.v, r.out, r.lse, mods::sliding_window{0}), {"sliding_window.size", "> 0", "0"});
  const std::vector<float> slopes(3, 0.5f);
  expect_error(run(in.q, in.k, in.v, r.out, r.lse, mods::alibi{view<const float, 1>(slopes.data(), {3})}),
               {"alibi.slopes", "[4]", "[3]"});
  expect_error([&] { attn::decode(view<const float, 4>{}, in.k, in.v, r.out, r.lse); }, {"q.shape[3] (D)", "D=0"});
  // Every message names the entry point.
  expect_error(run(q17, k17, v17, out17, view<float, 3>{}, mods::causal{}), {"attention::decode"});
}

TEST(Merge, RejectsBadArguments) {
  const problem p{1, 2, 3, 3, 4, 8, 8};
  result a(p), b(p), r(p);
  tensor<float, 4> out_bad({1, 2, 3, 9});
  tensor<float, 3> lse_bad({1, 2, 4});
  expect_error([&] { attn::merge(a.out, a.lse, out_bad, b.lse, r.out, r.lse); },
               {"attention::merge", "out_b", "[1, 2, 3, 8]", "[1, 2, 3, 9]"});
  expect_error([&] { attn::merge(a.out, lse_bad, b.out, b.lse, r.out, r.lse); }, {"lse_a", "[1, 2, 3]", "[1, 2, 4]"});
  expect_error([&] { attn::merge(a.out, a.lse, b.out, lse_bad, r.out, r.lse); }, {"lse_b", "[1, 2, 3]", "[1, 2, 4]"});
  expect_error([&] { attn::merge(a.out, a.lse, b.out, b.lse, out_bad, r.lse); }, {"out", "[1, 2, 3, 8]", "[1, 2, 3, 9]"});
  expect_error([&] { attn::merge(a.out, a.lse, b.out, b.lse, r.out, lse_bad); }, {"lse", "[1, 2, 3]", "[1, 2, 4]"});
  expect_error([&] { attn::merge(a.out, a.lse, b.out, b.lse, r.out, r.lse, -2); }, {"threads", ">= 0", "-2"});
  expect_error([&] { attn::merge(view<const float, 4>{}, a.lse, b.out, b.lse, r.out, r.lse); },
               {"lse_a must have shape [0, 0, 0] [B, Hq, Lq] (from out_a), got [1, 2, 3]"});
  expect_error([&] { attn::merge(view<const float, 4>(nullptr, {1, 2, 3, 8}), a.lse, b.out, b.lse, r.out, r.lse); },
               {"attention::merge: out_a [B, Hq, Lq, Dv] must be a view of memory", "[1, 2, 3, 8]"});

  const std::vector<view<const float, 4>> outs = {a.out, b.out};
  const std::vector<view<const float, 3>> one_lse = {a.lse};
  expect_error([&] { attn::merge(outs, one_lse, r.out, r.lse); }, {"outs", "lses", "2", "1"});
  const std::vector<view<const float, 4>> outs_bad = {a.out, out_bad};
  const std::vector<view<const float, 3>> lses = {a.lse, b.lse};
  expect_error([&] { attn::merge(outs_bad, lses, r.out, r.lse); }, {"outs[1]", "[1, 2, 3, 8]", "[1, 2, 3, 9]"});
  const std::vector<view<const float, 3>> lses_bad = {lse_bad, b.lse};
  expect_error([&] { attn::merge(outs, lses_bad, r.out, r.lse); }, {"lses[0]", "[1, 2, 3]", "[1, 2, 4]"});
  expect_error([&] { attn::merge(outs, lses, r.out, lse_bad); }, {"lse", "[1, 2, 3]", "[1, 2, 4]"});
  expect_error([&] { attn::merge(outs, lses, r.out, r.lse, -1); }, {"threads", ">= 0", "-1"});
}

}  // namespace
