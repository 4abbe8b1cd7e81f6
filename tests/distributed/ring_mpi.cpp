// tests/distributed/ring_mpi.cpp — ring attention (forward, backward) and sharded decode over MPI,
// run by ctest under mpirun with 2 and 4 ranks (tests/CMakeLists.txt). Not a *_test.cpp: it has
// its own main() (MPI_Init), and only rank 0 prints; every rank runs every test (the calls are
// collective) and the program fails if any rank fails.
//
// Oracles: every rank builds the whole problem from the same seed and computes the answer in one
// process with the double-precision references (attention::reference, reference_backward); its
// own rows of that answer are what the distributed result must match. Bit-identity: two runs of
// the same call give the same bytes, every rank gets the same decode result, and the gather
// reduction equals attention::merge of the same partials in one process, bit for bit.
#include <mpi.h>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "mnemo/attention/flash_backward.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/distributed/ring_attention.hpp"
#include "mnemo/distributed/sharded_decode.hpp"
#include "support/support.hpp"

namespace {

using namespace mnemo;
using attention::mods::causal;
using attention::mods::none;
using attention::mods::sliding_window;
using distributed::shard;

int rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int ranks() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// This rank's rows of a global [B, H, L, D] tensor, in the order of the shard's segments.
template <class T>
tensor<T, 4> rows_of(const tensor<T, 4>& g, const shard& s) {
  const auto sh = g.shape();
  tensor<T, 4> out({sh[0], sh[1], s.rows(), sh[3]});
  for (std::int64_t b = 0; b < sh[0]; ++b)
    for (std::int64_t h = 0; h < sh[1]; ++h) {
      std::int64_t row = 0;
      for (const auto& seg : s.segments)
        for (std::int64_t j = 0; j < seg.length; ++j, ++row)
          std::copy_n(&g(b, h, seg.start + j, 0), sh[3], &out(b, h, row, 0));
    }
  return out;
}
tensor<float, 3> rows_of(const tensor<float, 3>& g, const shard& s) {
  const auto sh = g.shape();
  tensor<float, 3> out({sh[0], sh[1], s.rows()});
  for (std::int64_t b = 0; b < sh[0]; ++b)
    for (std::int64_t h = 0; h < sh[1]; ++h) {
      std::int64_t row = 0;
      for (const auto& seg : s.segments)
        for (std::int64_t j = 0; j < seg.length; ++j, ++row) out(b, h, row) = g(b, h, seg.start + j);
    }
  return out;
}

template <class T, int R>
bool same_bytes(const tensor<T, R>& a, const tensor<T, R>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0;
}

// True on every rank iff ok on every rank.
bool all_ranks(bool ok) {
  int mine = ok ? 1 : 0, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

struct problem {
  std::int64_t B, Hq, Hkv, L, D, Dv;
};

enum class layout { contiguous, zigzag };

shard make_shard(layout l, std::int64_t L) {
  return l == layout::contiguous ? distributed::contiguous_shard(L, rank(), ranks())
                                 : distributed::zigzag_shard(L, rank(), ranks());
}

template <class Mod>
void check_backward(const problem& p, layout lay, const Mod& mod, std::int64_t progress_rows, std::uint32_t seed);

// Forward: ring against the double reference over the whole sequence, and the same bytes twice.
template <class Mod>
void check_forward(const problem& p, layout lay, const Mod& mod, std::int64_t progress_rows, std::uint32_t seed,
                   view<const float, 1> sinks = {}) {
  const auto q = test::random_tensor<float, 4>({p.B, p.Hq, p.L, p.D}, seed);
  const auto k = test::random_tensor<float, 4>({p.B, p.Hkv, p.L, p.D}, seed + 1);
  const auto v = test::random_tensor<float, 4>({p.B, p.Hkv, p.L, p.Dv}, seed + 2);
  attention::options opt;
  opt.threads = 1;
  opt.sinks = sinks;
  tensor<float, 4> want_out({p.B, p.Hq, p.L, p.Dv});
  tensor<float, 3> want_lse({p.B, p.Hq, p.L});
  attention::reference(cview(q), k, v, want_out, want_lse, mod, opt);

  const shard s = make_shard(lay, p.L);
  const auto ql = rows_of(q, s), kl = rows_of(k, s), vl = rows_of(v, s);
  distributed::ring_options ro;
  ro.attention = opt;
  ro.progress_rows = progress_rows;
  tensor<float, 4> out({p.B, p.Hq, s.rows(), p.Dv}), out2({p.B, p.Hq, s.rows(), p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, s.rows()}), lse2({p.B, p.Hq, s.rows()});
  distributed::stats st;
  distributed::ring_attention(MPI_COMM_WORLD, s, cview(ql), kl, vl, out, lse, mod, ro, &st);
  distributed::ring_attention(MPI_COMM_WORLD, s, cview(ql), kl, vl, out2, lse2, mod, ro);
  test::expect_close(out, rows_of(want_out, s), 2e-5, 2e-5, "out");
  test::expect_close(lse, rows_of(want_lse, s), 2e-5, 2e-5, "lse");
  EXPECT_TRUE(same_bytes(out, out2) && same_bytes(lse, lse2)) << "two runs differ";
  EXPECT_EQ(st.steps, ranks());
}

TEST(ring_attention, forward_matches_reference) {
  const std::int64_t N = ranks();
  for (layout lay : {layout::contiguous, layout::zigzag}) {
    SCOPED_TRACE(lay == layout::contiguous ? "contiguous" : "zigzag");
    check_forward({1, 2, 1, 37, 16, 16}, lay, none{}, 2048, 1);
    check_forward({2, 4, 2, 100, 40, 24}, lay, causal{}, 2048, 2);  // GQA 2, D != Dv
    check_forward({1, 2, 2, 97, 16, 16}, lay, causal{}, 5, 3);       // pieces of 5 rows between polls
    check_forward({1, 1, 1, 64 * N + 3, 16, 16}, lay, sliding_window{19}, 0, 4);
    check_forward({1, 1, 1, 1, 8, 8}, lay, causal{}, 2048, 5);  // L = 1: ranks without rows
    check_forward({1, 2, 1, N + 1, 8, 8}, lay, causal{}, 2048, 6);
  }
}

// f16 K/V travel the ring as f16 (half the bytes); the oracle is the reference on the same rounded
// values in f32.
TEST(ring_attention, f16_kv_forward) {
  const std::int64_t L = 61, D = 16;
  const auto q = test::random_tensor<float, 4>({1, 2, L, D}, 71);
  auto k = test::random_tensor<float, 4>({1, 1, L, D}, 72);
  auto v = test::random_tensor<float, 4>({1, 1, L, D}, 73);
  tensor<f16, 4> kh({1, 1, L, D}), vh({1, 1, L, D});
  for (std::int64_t i = 0; i < k.size(); ++i) {
    kh.data()[i] = f16(k.data()[i]);
    vh.data()[i] = f16(v.data()[i]);
    k.data()[i] = static_cast<float>(kh.data()[i]);
    v.data()[i] = static_cast<float>(vh.data()[i]);
  }
  tensor<float, 4> want({1, 2, L, D});
  tensor<float, 3> want_lse({1, 2, L});
  attention::reference(cview(q), k, v, want, want_lse, causal{});
  const shard s = make_shard(layout::zigzag, L);
  const auto ql = rows_of(q, s);
  const auto kl = rows_of(kh, s), vl = rows_of(vh, s);
  tensor<float, 4> out({1, 2, s.rows(), D});
  tensor<float, 3> lse({1, 2, s.rows()});
  distributed::stats st;
  distributed::ring_attention(MPI_COMM_WORLD, s, cview(ql), kl, vl, out, lse, causal{}, {}, &st);
  test::expect_close(out, rows_of(want, s), 2e-5, 2e-5, "out");
  test::expect_close(lse, rows_of(want_lse, s), 2e-5, 2e-5, "lse");
  // The blocks sent: those of ranks r, r - 1, ..., r - N + 2, K and V in f16 (2 bytes per element).
  std::int64_t sent = 0;
  for (int step = 0; step + 1 < ranks(); ++step) {
    const int src = (rank() - step + ranks()) % ranks();
    sent += distributed::zigzag_shard(L, src, ranks()).rows() * 2 * D * 2;
  }
  EXPECT_EQ(st.bytes_sent, sent);
}

// A score mod that reads positions (ALiBi: s -= slope |qp - kp|) with the causal mask: the
// per-tile score path (score_tile) and, in the backward, its derivative, at global positions.
TEST(ring_attention, alibi_causal_forward_and_backward) {
  const std::vector<float> slopes = attention::mods::alibi_slopes(2);
  const auto mod = attention::mods::all_of(attention::mods::alibi{view<const float, 1>(slopes.data(), {2})}, causal{});
  check_forward({1, 2, 1, 53, 16, 16}, layout::zigzag, mod, 6, 8);
  check_backward({1, 2, 1, 53, 16, 16}, layout::contiguous, mod, 2048, 9);
}

TEST(ring_attention, forward_with_sinks) {
  const std::vector<float> sinks{0.5f, -1.0f};
  check_forward({1, 2, 1, 41, 16, 16}, layout::zigzag, causal{}, 2048, 7, view<const float, 1>(sinks.data(), {2}));
}

// A property computed without attention: with V all ones every visible row's output is exactly 1
// and, under causal at global positions, the first token's lse is its own scaled score.
TEST(ring_attention, causal_positions_are_global) {
  const std::int64_t L = 29, D = 8;
  const auto q = test::random_tensor<float, 4>({1, 1, L, D}, 11);
  const auto k = test::random_tensor<float, 4>({1, 1, L, D}, 12);
  tensor<float, 4> v({1, 1, L, D});
  std::fill_n(v.data(), v.size(), 1.0f);
  const shard s = make_shard(layout::zigzag, L);
  const auto ql = rows_of(q, s), kl = rows_of(k, s), vl = rows_of(v, s);
  tensor<float, 4> out({1, 1, s.rows(), D});
  tensor<float, 3> lse({1, 1, s.rows()});
  distributed::ring_attention(MPI_COMM_WORLD, s, cview(ql), kl, vl, out, lse, causal{});
  for (std::int64_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out.data()[i], 1.0f, 1e-6f);
  std::int64_t row = 0;
  for (const auto& seg : s.segments)
    for (std::int64_t j = 0; j < seg.length; ++j, ++row)
      if (seg.start + j == 0) {
        double dot = 0;
        for (std::int64_t c = 0; c < D; ++c) dot += double(q(0, 0, 0, c)) * k(0, 0, 0, c);
        EXPECT_NEAR(lse(0, 0, row), dot / std::sqrt(double(D)), 1e-5);
      }
}

// Backward: ring against reference_backward over the whole sequence.
template <class Mod>
void check_backward(const problem& p, layout lay, const Mod& mod, std::int64_t progress_rows, std::uint32_t seed) {
  const auto q = test::random_tensor<float, 4>({p.B, p.Hq, p.L, p.D}, seed);
  const auto k = test::random_tensor<float, 4>({p.B, p.Hkv, p.L, p.D}, seed + 1);
  const auto v = test::random_tensor<float, 4>({p.B, p.Hkv, p.L, p.Dv}, seed + 2);
  const auto dout = test::random_tensor<float, 4>({p.B, p.Hq, p.L, p.Dv}, seed + 3);
  attention::options opt;
  opt.threads = 1;
  tensor<float, 4> dq({p.B, p.Hq, p.L, p.D}), dk({p.B, p.Hkv, p.L, p.D}), dv({p.B, p.Hkv, p.L, p.Dv});
  attention::reference_backward(cview(q), cview(k), cview(v), cview(dout), dq, dk, dv, mod, opt);

  const shard s = make_shard(lay, p.L);
  const auto ql = rows_of(q, s), kl = rows_of(k, s), vl = rows_of(v, s), dol = rows_of(dout, s);
  distributed::ring_options ro;
  ro.attention = opt;
  ro.progress_rows = progress_rows;
  const std::int64_t n = s.rows();
  tensor<float, 4> out({p.B, p.Hq, n, p.Dv});
  tensor<float, 3> lse({p.B, p.Hq, n});
  distributed::ring_attention(MPI_COMM_WORLD, s, cview(ql), kl, vl, out, lse, mod, ro);
  tensor<float, 4> gq({p.B, p.Hq, n, p.D}), gk({p.B, p.Hkv, n, p.D}), gv({p.B, p.Hkv, n, p.Dv});
  tensor<float, 4> gq2 = gq, gk2 = gk, gv2 = gv;
  distributed::stats st;
  distributed::ring_attention_backward(MPI_COMM_WORLD, s, cview(ql), cview(kl), cview(vl), cview(out), cview(lse),
                                       cview(dol), gq, gk, gv, mod, ro, &st);
  distributed::ring_attention_backward(MPI_COMM_WORLD, s, cview(ql), cview(kl), cview(vl), cview(out), cview(lse),
                                       cview(dol), gq2, gk2, gv2, mod, ro);
  test::expect_close(gq, rows_of(dq, s), 5e-5, 5e-5, "dq");
  test::expect_close(gk, rows_of(dk, s), 5e-5, 5e-5, "dk");
  test::expect_close(gv, rows_of(dv, s), 5e-5, 5e-5, "dv");
  EXPECT_TRUE(same_bytes(gq, gq2) && same_bytes(gk, gk2) && same_bytes(gv, gv2)) << "two runs differ";
}

TEST(ring_attention, backward_matches_reference) {
  for (layout lay : {layout::contiguous, layout::zigzag}) {
    SCOPED_TRACE(lay == layout::contiguous ? "contiguous" : "zigzag");
    check_backward({1, 2, 1, 45, 16, 16}, lay, none{}, 2048, 21);
    check_backward({2, 4, 2, 83, 40, 24}, lay, causal{}, 2048, 22);  // GQA, D != Dv
    check_backward({1, 2, 2, 70, 16, 16}, lay, causal{}, 9, 23);      // pieces of 9 rows
    check_backward({1, 1, 1, 2, 8, 8}, lay, causal{}, 2048, 24);      // fewer rows than ranks (N = 4)
  }
}

// Sharded decode over views: each rank holds a contiguous run of keys.
template <class Mod>
void check_decode(std::int64_t B, std::int64_t Hq, std::int64_t Hkv, std::int64_t Lq, std::int64_t L,
                  std::int64_t D, const Mod& mod, std::uint32_t seed) {
  const auto q = test::random_tensor<float, 4>({B, Hq, Lq, D}, seed);
  const auto k = test::random_tensor<float, 4>({B, Hkv, L, D}, seed + 1);
  const auto v = test::random_tensor<float, 4>({B, Hkv, L, D}, seed + 2);
  attention::options opt;
  opt.threads = 1;
  tensor<float, 4> want_out({B, Hq, Lq, D});
  tensor<float, 3> want_lse({B, Hq, Lq});
  attention::reference(cview(q), k, v, want_out, want_lse, mod, opt);
  const shard s = distributed::contiguous_shard(L, rank(), ranks());
  const auto kl = rows_of(k, s), vl = rows_of(v, s);
  for (auto how : {distributed::reduction::ordered_op, distributed::reduction::gather}) {
    tensor<float, 4> out({B, Hq, Lq, D}), out2({B, Hq, Lq, D});
    tensor<float, 3> lse({B, Hq, Lq}), lse2({B, Hq, Lq});
    distributed::sharded_decode(MPI_COMM_WORLD, cview(q), kl, vl, out, lse, mod, opt, how);
    distributed::sharded_decode(MPI_COMM_WORLD, cview(q), kl, vl, out2, lse2, mod, opt, how);
    test::expect_close(out, want_out, 2e-5, 2e-5, "out");
    test::expect_close(lse, want_lse, 2e-5, 2e-5, "lse");
    EXPECT_TRUE(same_bytes(out, out2) && same_bytes(lse, lse2)) << "two runs differ";
    // Every rank holds the same bytes: rank 0's result broadcast and compared.
    tensor<float, 4> root = out;
    MPI_Bcast(root.data(), static_cast<int>(root.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    EXPECT_TRUE(all_ranks(same_bytes(root, out))) << "ranks disagree";
  }
}

TEST(sharded_decode, matches_reference) {
  check_decode(1, 4, 1, 1, 1000, 32, none{}, 31);  // MQA
  check_decode(2, 8, 2, 3, 37, 40, causal{}, 32);  // a few draft rows: causal at global positions
  check_decode(1, 2, 2, 1, 3, 16, none{}, 33);     // fewer keys than ranks (N = 4): an empty rank
  check_decode(1, 2, 1, 2, 300, 16, sliding_window{50}, 34);  // the window lies on the last rank(s)
}

// reduction::gather merges in rank order exactly as attention::merge does in one process.
TEST(sharded_decode, gather_equals_single_process_merge) {
  const std::int64_t Hq = 4, L = 333, D = 24, N = ranks();
  const auto q = test::random_tensor<float, 4>({1, Hq, 1, D}, 41);
  const auto k = test::random_tensor<float, 4>({1, 2, L, D}, 42);
  const auto v = test::random_tensor<float, 4>({1, 2, L, D}, 43);
  attention::options opt;
  opt.threads = 1;
  std::vector<tensor<float, 4>> outs;
  std::vector<tensor<float, 3>> lses;
  for (int r = 0; r < N; ++r) {
    const shard s = distributed::contiguous_shard(L, r, static_cast<int>(N));
    const auto kl = rows_of(k, s), vl = rows_of(v, s);
    outs.emplace_back(shape_t<4>{1, Hq, 1, D});
    lses.emplace_back(shape_t<3>{1, Hq, 1});
    attention::decode(cview(q), kl, vl, outs.back(), lses.back(), none{}, opt);
  }
  std::vector<view<const float, 4>> ov(outs.begin(), outs.end());
  std::vector<view<const float, 3>> lv(lses.begin(), lses.end());
  tensor<float, 4> want({1, Hq, 1, D});
  tensor<float, 3> want_lse({1, Hq, 1});
  attention::merge(std::span<const view<const float, 4>>(ov), std::span<const view<const float, 3>>(lv), want,
                   want_lse);
  tensor<float, 4> out = outs[static_cast<std::size_t>(rank())];
  tensor<float, 3> lse = lses[static_cast<std::size_t>(rank())];
  distributed::combine(MPI_COMM_WORLD, out, lse, distributed::reduction::gather);
  EXPECT_TRUE(same_bytes(out, want) && same_bytes(lse, want_lse));
}

// The [Hq, Lq, Dv] combine (the shape of kvcache::decode's output) on strided views: the rows of
// a [Lq, Hq, Dv] buffer seen through permute, as a cache's decode may write them.
TEST(sharded_decode, combine_of_cache_shaped_rows) {
  const std::int64_t Hq = 4, Lq = 2, L = 257, D = 32;
  const auto q = test::random_tensor<float, 4>({1, Hq, Lq, D}, 51);
  const auto k = test::random_tensor<float, 4>({1, 2, L, D}, 52);
  const auto v = test::random_tensor<float, 4>({1, 2, L, D}, 53);
  tensor<float, 4> want({1, Hq, Lq, D});
  tensor<float, 3> want_lse({1, Hq, Lq});
  attention::reference(cview(q), k, v, want, want_lse);  // no mask: every query sees every key
  const shard s = distributed::contiguous_shard(L, rank(), ranks());
  const auto kl = rows_of(k, s), vl = rows_of(v, s);
  tensor<float, 3> buf({Lq, Hq, D});  // [Lq, Hq, Dv] storage
  tensor<float, 2> lbuf({Hq, Lq});
  const view<float, 3> out = buf.as_view().permute({1, 0, 2});  // [Hq, Lq, Dv] through strides
  const view<float, 4> out4(out.data(), {1, Hq, Lq, D}, {0, out.stride(0), out.stride(1), 1});
  const view<float, 2> lse = lbuf.as_view();
  tensor<float, 3> lse_local({1, Hq, Lq});
  attention::options opt;
  opt.threads = 1;
  attention::decode(cview(q), kl, vl, out4, lse_local, none{}, opt);
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lq; ++i) lse(h, i) = lse_local(0, h, i);
  distributed::combine(MPI_COMM_WORLD, out, lse);
  for (std::int64_t h = 0; h < Hq; ++h)
    for (std::int64_t i = 0; i < Lq; ++i) {
      EXPECT_NEAR(lse(h, i), want_lse(0, h, i), 2e-5);
      for (std::int64_t c = 0; c < D; ++c) EXPECT_NEAR(out(h, i, c), want(0, h, i, c), 2e-5);
    }
}

TEST(distributed, layouts) {
  // contiguous and zig-zag tile [0, L) with sizes differing by at most one
  for (int N : {1, 2, 3, 4})
    for (std::int64_t L : {0, 1, 7, 64}) {
      std::vector<int> seen(static_cast<std::size_t>(L), 0);
      for (int r = 0; r < N; ++r) {
        for (const shard& s : {distributed::contiguous_shard(L, r, N), distributed::zigzag_shard(L, r, N)})
          for (const auto& g : s.segments)
            for (std::int64_t j = 0; j < g.length; ++j) ++seen[static_cast<std::size_t>(g.start + j)];
        EXPECT_LE(distributed::zigzag_shard(L, r, N).rows(), (L + N - 1) / N + 1);
      }
      for (int x : seen) EXPECT_EQ(x, 2);  // once per layout
    }
  const shard z = distributed::zigzag_shard(16, 1, 4);
  ASSERT_EQ(z.segments.size(), 2u);
  EXPECT_EQ(z.segments[0].start, 2);
  EXPECT_EQ(z.segments[1].start, 12);
  test::expect_error([] { distributed::zigzag_shard(10, 4, 4); }, {"distributed::zigzag_shard", "rank", "[0, 4)", "4"});
}

TEST(distributed, bad_arguments_fail_on_every_rank) {
  const std::int64_t L = 20, D = 8;
  const shard s = distributed::contiguous_shard(L, rank(), ranks());
  const auto q = test::random_tensor<float, 4>({1, 1, s.rows(), D}, 61);
  tensor<float, 4> out({1, 1, s.rows(), D});
  // q rows that do not match the layout, on rank 0 only: rank 0 names the argument, the others
  // name rank 0.
  const shard wrong = rank() == 0 ? shard{{{s.segments[0].start, s.segments[0].length}}} : s;
  const auto q_bad = test::random_tensor<float, 4>({1, 1, s.rows() + (rank() == 0 ? 1 : 0), D}, 62);
  tensor<float, 4> out_bad({1, 1, q_bad.extent(2), D});
  if (rank() == 0)
    test::expect_error([&] { distributed::ring_attention(MPI_COMM_WORLD, wrong, cview(q_bad), q, q, out_bad); },
                       {"distributed::ring_attention", "q.shape[2]", std::to_string(s.rows())});
  else
    test::expect_error([&] { distributed::ring_attention(MPI_COMM_WORLD, wrong, cview(q_bad), q, q, out_bad); },
                       {"distributed::ring_attention", "rank 0"});
  // segments that do not tile [0, L): every rank holds [0, rows)
  const shard overlap{{{0, s.rows()}}};
  if (ranks() > 1)
    test::expect_error([&] { distributed::ring_attention(MPI_COMM_WORLD, overlap, cview(q), q, q, out); },
                       {"distributed::ring_attention", "layout", "tile [0, L)"});
  distributed::ring_options ro;
  ro.progress_rows = -1;
  test::expect_error([&] { distributed::ring_attention(MPI_COMM_WORLD, s, cview(q), q, q, out, {}, none{}, ro); },
                     {"progress_rows", ">= 0", "-1"});
  // combine: lse of the wrong shape
  tensor<float, 4> o({1, 2, 1, D});
  tensor<float, 3> l({1, 3, 1});
  test::expect_error([&] { distributed::combine(MPI_COMM_WORLD, o, l); }, {"distributed::combine", "lse", "[1, 2, 1]"});
  // Hq that differs between ranks (collective shape check)
  if (ranks() > 1) {
    tensor<float, 4> o2({1, rank() == 0 ? 2 : 3, 1, D});
    tensor<float, 3> l2({1, o2.extent(1), 1});
    test::expect_error([&] { distributed::combine(MPI_COMM_WORLD, o2, l2); }, {"Hq", "same on every rank"});
  }
}

// Prints a failed check of a rank other than 0, with the rank.
struct failure_printer : ::testing::EmptyTestEventListener {
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::printf("[rank %d] %s:%d: failure\n%s\n", rank(), r.file_name() ? r.file_name() : "?", r.line_number(),
                  r.summary());
  }
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (rank() != 0) {  // one full report, from rank 0; the other ranks print only their failures
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new failure_printer);
  }
  const int mine = RUN_ALL_TESTS();
  int worst = 0;
  MPI_Allreduce(&mine, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank() == 0 && worst != mine) std::printf("ring_mpi: a test failed on another rank\n");
  MPI_Finalize();
  return worst;
}
