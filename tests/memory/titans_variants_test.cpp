// Tests of memory/titans_variants.hpp: heads_view's strides, MAC's mask (persistent and memory
// tokens visible to all, causal inside the segment) against a softmax computed here, both
// attention paths, the MAG gate, MAL as memory-then-window-attention, and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "memory/test_util.hpp"
#include "mnemo/memory/titans_variants.hpp"

namespace {

using namespace memory_test;
namespace mem = mnemo::memory;

TEST(titans_variants, heads_view_reads_b_l_hd_as_b_h_l_d) {
  tensor<float, 3> x({2, 3, 8});
  for (std::int64_t i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(i);
  const view<float, 4> h = mem::heads_view(x.as_view(), 4);
  EXPECT_EQ(h.shape(), (mnemo::shape_t<4>{2, 4, 3, 2}));
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t hh = 0; hh < 4; ++hh)
      for (std::int64_t t = 0; t < 3; ++t)
        for (std::int64_t c = 0; c < 2; ++c) EXPECT_EQ(h(b, hh, t, c), x(b, t, hh * 2 + c));
  expect_error([&] { (void)mem::heads_view(x.as_view(), 3); }, {"H", "divide", "8", "H=3"});
}

TEST(titans_variants, mac_attends_to_persistent_memory_and_causal_segment) {
  std::mt19937 rng(1);
  const std::int64_t B = 2, H = 2, Ls = 5, D = 8, Dv = 6, Np = 3, Lm = 4;
  const auto q = random_tensor<4>({B, H, Ls, D}, rng), k = random_tensor<4>({B, H, Ls, D}, rng),
             v = random_tensor<4>({B, H, Ls, Dv}, rng), mk = random_tensor<4>({B, H, Lm, D}, rng),
             mv = random_tensor<4>({B, H, Lm, Dv}, rng);
  const auto pk = random_tensor<3>({H, Np, D}, rng), pv = random_tensor<3>({H, Np, Dv}, rng);
  for (bool ref : {true, false}) {
    tensor<float, 4> out({B, H, Ls, Dv});
    tensor<float, 3> lse({B, H, Ls});
    mem::mac_attention(q, k, v, pk, pv, mk, mv, out, lse, {.reference = ref});
    const double scale = 1.0 / std::sqrt(double(D));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t i = 0; i < Ls; ++i) {
          // Visible: every persistent and memory token, and segment tokens 0..i.
          std::vector<std::pair<const float*, const float*>> kv;
          for (std::int64_t j = 0; j < Np; ++j) kv.push_back({&pk(h, j, 0), &pv(h, j, 0)});
          for (std::int64_t j = 0; j < Lm; ++j) kv.push_back({&mk(b, h, j, 0), &mv(b, h, j, 0)});
          for (std::int64_t j = 0; j <= i; ++j) kv.push_back({&k(b, h, j, 0), &v(b, h, j, 0)});
          std::vector<double> s;
          double m = -1e300, z = 0;
          for (auto& [kk, vv] : kv) {
            double dot = 0;
            for (std::int64_t c = 0; c < D; ++c) dot += double(q(b, h, i, c)) * kk[c];
            s.push_back(scale * dot);
            m = std::max(m, s.back());
          }
          std::vector<double> o(Dv, 0.0);
          for (std::size_t j = 0; j < kv.size(); ++j) {
            const double p = std::exp(s[j] - m);
            z += p;
            for (std::int64_t c = 0; c < Dv; ++c) o[c] += p * kv[j].second[c];
          }
          for (std::int64_t c = 0; c < Dv; ++c) EXPECT_NEAR(out(b, h, i, c), o[c] / z, 1e-5) << "reference=" << ref;
          EXPECT_NEAR(lse(b, h, i), m + std::log(z), 1e-5);
        }
  }
}

TEST(titans_variants, mag_gates_window_attention_with_memory) {
  std::mt19937 rng(2);
  const std::int64_t B = 1, H = 2, L = 9, D = 4;
  const auto q = random_tensor<4>({B, H, L, D}, rng), k = random_tensor<4>({B, H, L, D}, rng),
             v = random_tensor<4>({B, H, L, D}, rng), m = random_tensor<4>({B, H, L, D}, rng),
             g = random_tensor<4>({B, H, L, D}, rng, -3.0f, 3.0f);
  tensor<float, 4> out({B, H, L, D}), swa({B, H, L, D});
  mem::memory_as_gate(q, k, v, 3, m, g, out);
  mnemo::attention::reference(q, k, v, swa, {}, mnemo::attention::mods::sliding_window{3});
  for (std::int64_t i = 0; i < out.size(); ++i) {
    const double w = 1.0 / (1.0 + std::exp(-double(g.data()[i])));
    EXPECT_NEAR(out.data()[i], w * swa.data()[i] + (1 - w) * m.data()[i], 1e-5);
  }
}

TEST(titans_variants, mal_is_memory_then_window_attention) {
  std::mt19937 rng(3);
  const std::int64_t B = 1, L = 10, D = 8, H = 2;
  const mem::mlp_shape s{D, 16, 2, mem::activation::silu, true};
  const auto q = random_tensor<3>({B, L, D}, rng), k = random_tensor<3>({B, L, D}, rng),
             v = random_tensor<3>({B, L, D}, rng);
  const auto theta = random_tensor<2>({B, L}, rng, 0.0f, 0.1f), eta = random_tensor<2>({B, L}, rng, 0.5f, 0.9f),
             alpha = random_tensor<2>({B, L}, rng, 0.0f, 0.1f);
  const auto w1 = random_tensor<3>({B, D, 16}, rng, -0.3f, 0.3f);
  mem::neural_memory_state a(B, s), b(B, s);
  std::copy(w1.begin(), w1.end(), a.weight(0).data());
  std::copy(w1.begin(), w1.end(), b.weight(0).data());
  // Projection: q = k = v = y in heads layout.
  auto project = [&](view<const float, 3> y, view<float, 4> aq, view<float, 4> ak, view<float, 4> av) {
    const view<const float, 4> yh = mem::heads_view(y, H);
    for (std::int64_t hh = 0; hh < H; ++hh)
      for (std::int64_t t = 0; t < L; ++t)
        for (std::int64_t c = 0; c < D / H; ++c) aq(0, hh, t, c) = ak(0, hh, t, c) = av(0, hh, t, c) = yh(0, hh, t, c);
  };
  tensor<float, 4> out({B, H, L, D / H});
  mem::memory_as_layer(q, k, v, theta, eta, alpha, a, project, H, D / H, D / H, 4, out, {.chunk_size = 3});
  tensor<float, 3> y({B, L, D});
  mem::reference::neural_memory(q, k, v, theta, eta, alpha, b, y, {.chunk_size = 3});
  tensor<float, 4> want({B, H, L, D / H});
  const view<const float, 4> yh = mem::heads_view(mnemo::cview(y), H);
  mnemo::attention::reference(yh, yh, yh, want.as_view(), {}, mnemo::attention::mods::sliding_window{4});
  expect_close(out, want, 1e-4, 1e-3, "mal");
}

TEST(titans_variants, bad_inputs) {
  tensor<float, 4> q({1, 2, 3, 4}), v({1, 2, 3, 5}), out({1, 2, 3, 5}), mk({1, 2, 2, 4}), mv({1, 2, 2, 5});
  tensor<float, 3> pk({2, 1, 4}), pv({2, 1, 5}), pk_bad({3, 1, 4});
  expect_error([&] { mem::mac_attention(q, q, v, pk_bad, pv, mk, mv, out); }, {"persistent_k", "[2, 1, 4]", "[3, 1, 4]"});
  expect_error([&] { mem::mac_attention(q, q, v, pk, pv, mk, mk, out); }, {"memory_v", "[1, 2, 2, 5]", "[1, 2, 2, 4]"});
  expect_error([&] { mem::mag_combine(out, q, out, out); }, {"mem", "[1, 2, 3, 5]", "[1, 2, 3, 4]"});
  expect_error([&] { mem::memory_as_gate(q, q, v, 0, out, out, out); }, {"sliding_window.size", "> 0", "0"});
}

}  // namespace
