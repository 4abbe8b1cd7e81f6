// Reentrancy and determinism.
//
//  * Every family called from several std::threads at once (each with its own outputs, and where
//    the API has one, its own workspace or state; read-only inputs shared) gives results
//    bit-identical to one serial call. The kernels keep no mutable global state, so this holds
//    whatever the interleaving; scripts/tsan.sh runs this file under ThreadSanitizer.
//  * Split-KV decode (and flash, and the linear family) are bit-identical across thread counts
//    1, 2, 3, 4 (DESIGN.md: fixed chunk boundaries and merge order).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/linear/gated_delta_rule.hpp"
#include "mnemo/linear/simple_gla.hpp"
#include "mnemo/memory/compressive.hpp"
#include "mnemo/memory/knn.hpp"
#include "mnemo/memory/product_keys.hpp"
#include "support/support.hpp"

namespace {

using namespace mnemo;
namespace att = mnemo::attention;
namespace lin = mnemo::linear;
namespace mem = mnemo::memory;

constexpr int caller_threads = 4;  // std::threads calling at once
constexpr int calls_per_thread = 3;

using mnemo::test::fill_uniform;

template <class T, int R>
bool bit_identical(const tensor<T, R>& a, const tensor<T, R>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

// Runs `call(slot)` once serially into slot 0, then from caller_threads threads at once, each
// into its own slot, calls_per_thread times; every slot must equal slot 0 bit for bit.
// make_slot() creates one slot's outputs; equal(a, b) compares two slots.
template <class Slot>
void expect_reentrant(std::function<Slot()> make_slot, std::function<void(Slot&)> call,
                      std::function<bool(const Slot&, const Slot&)> equal) {
  Slot serial = make_slot();
  call(serial);
  std::vector<Slot> slots;
  for (int t = 0; t < caller_threads; ++t) slots.push_back(make_slot());
  std::vector<int> mismatches(caller_threads, 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < caller_threads; ++t)
    pool.emplace_back([&, t] {
      for (int c = 0; c < calls_per_thread; ++c) {
        call(slots[t]);
        if (!equal(slots[t], serial)) ++mismatches[t];
      }
    });
  for (auto& th : pool) th.join();
  for (int t = 0; t < caller_threads; ++t) EXPECT_EQ(mismatches[t], 0) << "caller thread " << t;
}

struct attention_inputs {
  std::int64_t B = 1, Hq = 8, Hkv = 2, Lq = 33, Lk = 1500, D = 40, Dv = 24;
  tensor<float, 4> q{{B, Hq, Lq, D}}, k{{B, Hkv, Lk, D}}, v{{B, Hkv, Lk, Dv}};
  tensor<f16, 4> k16{{B, Hkv, Lk, D}}, v16{{B, Hkv, Lk, Dv}};
  attention_inputs() {
    fill_uniform(q, -1, 1, 1);
    fill_uniform(k, -1, 1, 2);
    fill_uniform(v, -1, 1, 3);
    for (std::int64_t i = 0; i < k.size(); ++i) k16.data()[i] = f16(k.data()[i]);
    for (std::int64_t i = 0; i < v.size(); ++i) v16.data()[i] = f16(v.data()[i]);
  }
  // the last `rows` query rows, as a decode step sees them
  view<const float, 4> q_rows(std::int64_t rows) const { return cview(q).narrow(2, Lq - rows, rows); }
};

struct out_lse {
  tensor<float, 4> out;
  tensor<float, 3> lse;
  att::decode_workspace ws;
};
bool same(const out_lse& a, const out_lse& b) { return bit_identical(a.out, b.out) && bit_identical(a.lse, b.lse); }

TEST(Concurrency, FlashFromSeveralThreads) {
  const attention_inputs in;
  for (int inner : {1, 2}) {
    SCOPED_TRACE(inner);
    expect_reentrant<out_lse>(
        [&] { return out_lse{tensor<float, 4>({in.B, in.Hq, in.Lq, in.Dv}), tensor<float, 3>({in.B, in.Hq, in.Lq}), {}}; },
        [&](out_lse& s) { att::flash(in.q, in.k, in.v, s.out, s.lse, att::mods::causal{}, {.threads = inner}); }, same);
  }
}

TEST(Concurrency, DecodeFromSeveralThreadsWithOwnWorkspaces) {
  const attention_inputs in;
  expect_reentrant<out_lse>(
      [&] { return out_lse{tensor<float, 4>({in.B, in.Hq, 4, in.Dv}), tensor<float, 3>({in.B, in.Hq, 4}), {}}; },
      [&](out_lse& s) {
        att::decode<f16>(in.q_rows(4), in.k16, in.v16, s.out, s.lse, att::mods::none{}, {.threads = 2}, s.ws);
      },
      same);
}

TEST(Concurrency, MergeFromSeveralThreads) {
  const attention_inputs in;
  out_lse a{tensor<float, 4>({in.B, in.Hq, 4, in.Dv}), tensor<float, 3>({in.B, in.Hq, 4}), {}};
  out_lse b{tensor<float, 4>({in.B, in.Hq, 4, in.Dv}), tensor<float, 3>({in.B, in.Hq, 4}), {}};
  att::decode<f16>(in.q_rows(4), cview(in.k16).narrow(2, 0, 700), cview(in.v16).narrow(2, 0, 700), a.out, a.lse);
  att::decode<f16>(in.q_rows(4), cview(in.k16).narrow(2, 700, 800), cview(in.v16).narrow(2, 700, 800), b.out, b.lse);
  expect_reentrant<out_lse>(
      [&] { return out_lse{tensor<float, 4>({in.B, in.Hq, 4, in.Dv}), tensor<float, 3>({in.B, in.Hq, 4}), {}}; },
      [&](out_lse& s) { att::merge(cview(a.out), cview(a.lse), cview(b.out), cview(b.lse), s.out, s.lse, 2); }, same);
}

TEST(Concurrency, DecodeIsBitIdenticalAcrossThreadCounts) {
  // 1500 keys = 3 decode chunks; GQA group 4; 1 and 4 query rows; f32 and f16 caches.
  const attention_inputs in;
  for (std::int64_t rows : {1, 4}) {
    out_lse first{tensor<float, 4>({in.B, in.Hq, rows, in.Dv}), tensor<float, 3>({in.B, in.Hq, rows}), {}};
    out_lse first16 = {tensor<float, 4>({in.B, in.Hq, rows, in.Dv}), tensor<float, 3>({in.B, in.Hq, rows}), {}};
    for (int threads = 1; threads <= 4; ++threads) {
      out_lse s{tensor<float, 4>({in.B, in.Hq, rows, in.Dv}), tensor<float, 3>({in.B, in.Hq, rows}), {}};
      out_lse s16{tensor<float, 4>({in.B, in.Hq, rows, in.Dv}), tensor<float, 3>({in.B, in.Hq, rows}), {}};
      att::decode<float>(in.q_rows(rows), in.k, in.v, s.out, s.lse, att::mods::none{}, {.threads = threads}, s.ws);
      att::decode<f16>(in.q_rows(rows), in.k16, in.v16, s16.out, s16.lse, att::mods::none{}, {.threads = threads}, s16.ws);
      if (threads == 1) {
        first = std::move(s);
        first16 = std::move(s16);
        continue;
      }
      EXPECT_TRUE(same(s, first)) << "f32, rows " << rows << ", threads " << threads;
      EXPECT_TRUE(same(s16, first16)) << "f16, rows " << rows << ", threads " << threads;
    }
  }
}

TEST(Concurrency, FlashIsBitIdenticalAcrossThreadCounts) {
  const attention_inputs in;
  out_lse first{tensor<float, 4>({in.B, in.Hq, in.Lq, in.Dv}), tensor<float, 3>({in.B, in.Hq, in.Lq}), {}};
  att::flash(in.q, in.k, in.v, first.out, first.lse, att::mods::causal{}, {.threads = 1});
  for (int threads = 2; threads <= 4; ++threads) {
    out_lse s{tensor<float, 4>({in.B, in.Hq, in.Lq, in.Dv}), tensor<float, 3>({in.B, in.Hq, in.Lq}), {}};
    att::flash(in.q, in.k, in.v, s.out, s.lse, att::mods::causal{}, {.threads = threads});
    EXPECT_TRUE(same(s, first)) << "threads " << threads;
  }
}

struct linear_inputs {
  std::int64_t B = 2, H = 3, L = 70, Dk = 16, Dv = 12;
  tensor<float, 4> q{{B, H, L, Dk}}, k{{B, H, L, Dk}}, v{{B, H, L, Dv}};
  tensor<float, 3> g{{B, H, L}}, beta{{B, H, L}};
  linear_inputs() {
    fill_uniform(q, -1, 1, 10);
    fill_uniform(k, -1, 1, 11);
    fill_uniform(v, -1, 1, 12);
    fill_uniform(g, -0.3f, 0, 13);
    fill_uniform(beta, 0, 1, 14);
  }
};

struct o_state {
  tensor<float, 4> o, state;
};
bool same_os(const o_state& a, const o_state& b) { return bit_identical(a.o, b.o) && bit_identical(a.state, b.state); }

TEST(Concurrency, LinearFromSeveralThreads) {
  const linear_inputs in;
  for (lin::form f : {lin::form::chunked, lin::form::recurrent}) {
    lin::options opt;
    opt.path = f;
    opt.use_qk_l2norm = true;
    opt.threads = 2;
    expect_reentrant<o_state>(
        [&] { return o_state{tensor<float, 4>({in.B, in.H, in.L, in.Dv}), tensor<float, 4>({in.B, in.H, in.Dk, in.Dv})}; },
        [&](o_state& s) {
          std::fill(s.state.begin(), s.state.end(), 0.0f);  // each call starts from the zero state
          lin::gated_delta_rule(in.q, in.k, in.v, cview(in.g), cview(in.beta), s.o, s.state, opt);
        },
        same_os);
  }
}

TEST(Concurrency, LinearStepFromSeveralThreads) {
  const linear_inputs in;
  const view<const float, 3> q(in.q.data(), {in.B, in.H, in.Dk}, {in.H * in.L * in.Dk, in.L * in.Dk, 1});
  const view<const float, 3> k(in.k.data(), {in.B, in.H, in.Dk}, {in.H * in.L * in.Dk, in.L * in.Dk, 1});
  const view<const float, 3> v(in.v.data(), {in.B, in.H, in.Dv}, {in.H * in.L * in.Dv, in.L * in.Dv, 1});
  tensor<float, 2> g({in.B, in.H});  // token 0's gates: a [B, H] view must be contiguous in H
  for (std::int64_t b = 0; b < in.B; ++b)
    for (std::int64_t h = 0; h < in.H; ++h) g(b, h) = in.g(b, h, 0);
  expect_reentrant<o_state>(
      [&] { return o_state{tensor<float, 4>({in.B, in.H, 1, in.Dv}), tensor<float, 4>({in.B, in.H, in.Dk, in.Dv})}; },
      [&](o_state& s) {
        std::fill(s.state.begin(), s.state.end(), 0.5f);
        const view<float, 3> o(s.o.data(), {in.B, in.H, in.Dv});
        lin::simple_gla_step(q, k, v, cview(g), o, s.state, {.threads = 1});
      },
      same_os);
}

TEST(Concurrency, LinearIsBitIdenticalAcrossThreadCounts) {
  const linear_inputs in;
  lin::options opt;
  opt.use_qk_l2norm = true;
  o_state first{tensor<float, 4>({in.B, in.H, in.L, in.Dv}), tensor<float, 4>({in.B, in.H, in.Dk, in.Dv})};
  opt.threads = 1;
  lin::gated_delta_rule(in.q, in.k, in.v, cview(in.g), cview(in.beta), first.o, first.state, opt);
  for (int threads = 2; threads <= 4; ++threads) {
    opt.threads = threads;
    o_state s{tensor<float, 4>({in.B, in.H, in.L, in.Dv}), tensor<float, 4>({in.B, in.H, in.Dk, in.Dv})};
    lin::gated_delta_rule(in.q, in.k, in.v, cview(in.g), cview(in.beta), s.o, s.state, opt);
    EXPECT_TRUE(same_os(s, first)) << "threads " << threads;
  }
}

TEST(Concurrency, MemoryModulesFromSeveralThreads) {
  const std::int64_t B = 1, H = 2, L = 24, D = 8, Dv = 6;
  tensor<float, 4> q({B, H, L, D}), k({B, H, L, D}), v({B, H, L, Dv});
  fill_uniform(q, -1, 1, 20);
  fill_uniform(k, -1, 1, 21);
  fill_uniform(v, -1, 1, 22);
  tensor<float, 1> beta({H});
  {  // Infini-attention: each caller owns its state; inputs shared
    SCOPED_TRACE("infini_attention");
    struct slot {
      tensor<float, 4> out;
      mem::compressive_state state;
    };
    expect_reentrant<slot>(
        [&] { return slot{tensor<float, 4>({B, H, L, Dv}), mem::compressive_state(B, H, D, Dv)}; },
        [&](slot& s) {
          s.state = mem::compressive_state(B, H, D, Dv);
          mem::infini_attention(q, k, v, beta, s.state, s.out, {.segment_len = 8, .threads = 2});
        },
        [](const slot& a, const slot& b) {
          return bit_identical(a.out, b.out) && std::memcmp(a.state.memory().data(), b.state.memory().data(),
                                                            a.state.memory().size() * sizeof(float)) == 0;
        });
  }
  {  // kNN memory: one memory read by every caller at once
    SCOPED_TRACE("knn_attention");
    mem::knn_memory m(B, H, D, Dv, 64);
    m.add(k, v);
    expect_reentrant<out_lse>([&] { return out_lse{tensor<float, 4>({B, H, L, Dv}), tensor<float, 3>({B, H, L}), {}}; },
                              [&](out_lse& s) { mem::knn_attention(q, m, 5, s.out, s.lse, {.threads = 2}); }, same);
  }
  {  // product keys: shared keys and values
    SCOPED_TRACE("pkm_forward");
    const std::int64_t N = 9, n_keys = 8, v_dim = 5, knn = 4;
    tensor<float, 3> query({N, H, D});
    tensor<float, 4> keys({H, 2, n_keys, D / 2});
    tensor<float, 2> values({n_keys * n_keys, v_dim});
    fill_uniform(query, -1, 1, 23);
    fill_uniform(keys, -1, 1, 24);
    fill_uniform(values, -1, 1, 25);
    struct slot {
      tensor<float, 2> out;
      tensor<std::int64_t, 3> idx;
      tensor<float, 3> w;
    };
    expect_reentrant<slot>(
        [&] { return slot{tensor<float, 2>({N, v_dim}), tensor<std::int64_t, 3>({N, H, knn}), tensor<float, 3>({N, H, knn})}; },
        [&](slot& s) { mem::pkm_forward(query, keys, values, knn, s.out, s.idx, s.w, {}, {.threads = 2}); },
        [](const slot& a, const slot& b) {
          return bit_identical(a.out, b.out) && bit_identical(a.idx, b.idx) && bit_identical(a.w, b.w);
        });
  }
}

}  // namespace
