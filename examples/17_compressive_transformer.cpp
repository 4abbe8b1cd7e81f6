// 17 — Compressive Transformer: a FIFO memory of past keys/values plus a compressed memory of the
// ones that fell out of it.
//
// Rae, Potapenko, Jayakumar, Hillier & Lillicrap, "Compressive Transformers for Long-Range Sequence
// Modelling" (ICLR 2020). Per step, a segment h of L tokens:
//   out    = attention of h over [cm; m; h], causal within h
//   m, old = the last n_m of [m; h], and what fell out
//   cm     = the last n_cm of [cm; f_c(old)]       f_c: compress by rate c (pool, conv, most-used)
//   L_attn = || attn(h, old) - attn(h, f_c(old)) ||^2    the loss that trains f_c
// so a layer sees n_m raw and c * n_cm compressed past tokens for the cost of n_m + n_cm rows.
//
// Six segments of 8 tokens, n_m = 8, n_cm = 8, c = 2. Tokens 0 and 1 hold a "needle": a sharp key
// and a value; the last query of segment 3 asks for it. Facts checked:
//   1. the state stays n_m + n_cm rows per head, whatever the length;
//   2. the fast path (attention::flash, GEMM conv, SIMD top-k) agrees with the double reference,
//      for every compression function;
//   3. at segment 3 the needle has left m (which holds segment 2) and lives on, pooled, in cm: the
//      query recovers its value; without a compressed memory (n_cm = 0, Transformer-XL's memory)
//      it is gone;
//   4. L_attn: 0 for a lossless f_c (rate 1), the same for a conv whose kernel is the mean
//      (W_i = I / c) as for mean pooling: the learned conv contains pooling as a special case.
#include <mnemo/memory/compressive_transformer.hpp>

#include <cmath>
#include <cstdio>
#include <random>

namespace mem = mnemo::memory;
using mnemo::tensor;

namespace {

constexpr std::int64_t H = 2, D = 16, L = 8, segments = 6, n_m = 8, n_cm = 8, c = 2, T = L * segments;
constexpr std::int64_t asker = 4 * L - 1;  // the last query of segment 3

double cosine(const float* a, const float* b, std::int64_t n) {
  double ab = 0, aa = 0, bb = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    ab += double(a[i]) * b[i];
    aa += double(a[i]) * a[i];
    bb += double(b[i]) * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

mnemo::view<const float, 4> seg(const tensor<float, 4>& x, std::int64_t s) { return mnemo::cview(x).narrow(2, s * L, L); }

}  // namespace

int main() {
  std::mt19937 rng(17);
  std::normal_distribution<float> normal;
  tensor<float, 4> q({1, H, T, D}), k({1, H, T, D}), v({1, H, T, D});
  for (float& x : q) x = 0.3f * normal(rng);
  for (float& x : k) x = 0.3f * normal(rng);
  for (float& x : v) x = normal(rng);
  // The needle: tokens 0 and 1 share a sharp key along channel 0 and one value; the asker's query
  // points the same way (score 6 * 6 / sqrt(16) = 9 against about 0 for the other keys).
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t j = 0; j < D; ++j) {
      k(0, h, 0, j) = k(0, h, 1, j) = j == 0 ? 6.0f : 0.0f;
      v(0, h, 1, j) = v(0, h, 0, j);
      q(0, h, asker, j) = j == 0 ? 6.0f : 0.0f;
    }
  bool ok = true;

  // 1-2. Every compression function, fast and reference, segment by segment.
  tensor<float, 3> wk({c, D, D}), wv({c, D, D});
  for (float& x : wk) x = 0.2f * normal(rng);
  for (float& x : wv) x = 0.2f * normal(rng);
  for (mem::compression f :
       {mem::compression::mean_pool, mem::compression::max_pool, mem::compression::conv, mem::compression::most_used}) {
    const mem::compressive_transformer_options opt{.rate = c, .function = f, .conv_keys = wk, .conv_values = wv};
    mem::compressive_transformer_memory fast(1, H, n_m, n_cm, D, D), ref = fast;
    tensor<float, 4> out({1, H, L, D}), out_ref({1, H, L, D});
    double err = 0;
    for (std::int64_t s = 0; s < segments; ++s) {
      mem::compressive_transformer_attention(seg(q, s), seg(k, s), seg(v, s), fast, out, opt);
      mem::reference::compressive_transformer_attention(seg(q, s), seg(k, s), seg(v, s), ref, out_ref, opt);
      for (std::int64_t i = 0; i < out.size(); ++i) err = std::max(err, double(std::fabs(out.data()[i] - out_ref.data()[i])));
    }
    std::printf("%-9s after %ld tokens: m %ld rows, cm %ld rows per head; fast vs reference max |diff| %.1e\n",
                mem::compression_name(f), long(T), long(fast.memory_size()), long(fast.compressed_size()), err);
    ok &= fast.memory_size() == n_m && fast.compressed_size() == n_cm && err < 1e-4;
  }

  // 3. The needle, asked for at segment 3: with cm, and with m alone.
  for (std::int64_t cm_rows : {n_cm, std::int64_t{0}}) {
    mem::compressive_transformer_memory memory(1, H, n_m, cm_rows, D, D);
    tensor<float, 4> out({1, H, L, D});
    for (std::int64_t s = 0; s <= 3; ++s)
      mem::compressive_transformer_attention(seg(q, s), seg(k, s), seg(v, s), memory, out, {.rate = c});
    const double cos = cosine(&out(0, 0, L - 1, 0), &v(0, 0, 0, 0), D);
    std::printf("3. n_cm = %ld: the needle (tokens 0-1) asked for at token %ld: cosine with its value %.3f\n",
                long(cm_rows), long(asker), cos);
    ok &= cm_rows > 0 ? cos > 0.95 : cos < 0.75;  // a blend of the ~24 visible values, not the needle
  }

  // 4. L_attn of segment 1's eviction (segment 0's tokens), asked by segment 1's queries.
  const auto old_k = seg(k, 0), old_v = seg(v, 0), qs = seg(q, 1);
  tensor<float, 3> mean_kernel({c, D, D});
  for (std::int64_t i = 0; i < c; ++i)
    for (std::int64_t j = 0; j < D; ++j) mean_kernel(i, j, j) = 1.0f / c;
  const auto loss = [&](mem::compressive_transformer_options o) {
    const std::int64_t n = (L + o.rate - 1) / o.rate;
    tensor<float, 4> ck({1, H, n, D}), cv({1, H, n, D});
    mem::compress_memories(old_k, old_v, {}, o, ck, cv);
    return mem::attention_reconstruction_loss(qs, old_k, old_v, ck, cv, o);
  };
  const double lossless = loss({.rate = 1}), mean = loss({.rate = c}),
               max = loss({.rate = c, .function = mem::compression::max_pool}),
               conv = loss({.rate = c, .function = mem::compression::conv, .conv_keys = mean_kernel, .conv_values = mean_kernel});
  std::printf("4. L_attn: rate 1 %.2e, mean pool %.4f, max pool %.4f, conv with the mean kernel %.4f\n", lossless, mean,
              max, conv);
  ok &= lossless < 1e-10 && mean > 0 && std::fabs(conv - mean) < 1e-5 * (1 + mean);

  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
