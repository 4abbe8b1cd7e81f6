// 01 — attention with masks and score mods, through the readable reference.
//
// Grouped-query attention (Ainslie et al. 2023): 8 query heads share 2 K/V heads. The mask is
// causal and bottom-right aligned, so 4 new queries attend to a 12-token prefix plus themselves
// (prefill against a cache). ALiBi (Press et al. 2022) biases each head towards recent keys.
//
// The program checks three facts that follow from the definitions, not from the code:
//   1. the causal + ALiBi output equals a softmax computed here by hand for one row;
//   2. with a sliding window of 1, every query sees only its own key, so out = v at the diagonal;
//   3. composing mods is order-sensitive exactly where the maths is: softcap then ALiBi.
#include <mnemo/mnemo.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace att = mnemo::attention;

int main() {
  const std::int64_t B = 1, Hq = 8, Hkv = 2, Lq = 4, Lk = 16, D = 32, Dv = 32;
  mnemo::tensor<float, 4> q({B, Hq, Lq, D}), k({B, Hkv, Lk, D}), v({B, Hkv, Lk, Dv}), out({B, Hq, Lq, Dv});
  mnemo::tensor<float, 3> lse({B, Hq, Lq});
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);

  // 1. Causal + ALiBi. Query row i sits at key position i + (Lk - Lq).
  const std::vector<float> slopes = att::mods::alibi_slopes(Hq);
  const att::mods::alibi alibi{mnemo::view<const float, 1>(slopes.data(), {Hq})};
  att::reference(q, k, v, out, lse, att::mods::all_of(alibi, att::mods::causal{}));

  // By hand for head 5, row 2: it reads kv head 5 / (8 / 2) = 1 and sees keys 0 .. 2 + 12.
  const std::int64_t h = 5, i = 2, hk = h / (Hq / Hkv), diag = i + (Lk - Lq);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> s(diag + 1);
  double m = -INFINITY;
  for (std::int64_t j = 0; j <= diag; ++j) {
    double dot = 0;
    for (std::int64_t c = 0; c < D; ++c) dot += double(q(0, h, i, c)) * k(0, hk, j, c);
    s[j] = scale * dot - slopes[h] * double(diag - j);
    m = std::max(m, s[j]);
  }
  double z = 0, o0 = 0;
  for (std::int64_t j = 0; j <= diag; ++j) {
    z += std::exp(s[j] - m);
    o0 += std::exp(s[j] - m) * v(0, hk, j, 0);
  }
  const double err1 = std::fabs(out(0, h, i, 0) - o0 / z) + std::fabs(lse(0, h, i) - (m + std::log(z)));
  std::printf("1. causal+ALiBi, head %ld row %ld: out[0] = %.6f (by hand %.6f), lse = %.6f (by hand %.6f)\n", h, i,
              out(0, h, i, 0), o0 / z, lse(0, h, i), m + std::log(z));

  // 2. A window of one key: each query sees exactly its diagonal key.
  att::reference(q, k, v, out, lse, att::mods::sliding_window{1});
  double err2 = 0;
  for (std::int64_t hh = 0; hh < Hq; ++hh)
    for (std::int64_t r = 0; r < Lq; ++r)
      for (std::int64_t c = 0; c < Dv; ++c)
        err2 = std::max(err2, double(std::fabs(out(0, hh, r, c) - v(0, hh / (Hq / Hkv), r + Lk - Lq, c))));
  std::printf("2. window of 1: max |out - v[diag]| = %.3g\n", err2);

  // 3. softcap then ALiBi (the flash-attention order) differs from ALiBi then softcap.
  mnemo::tensor<float, 4> out2({B, Hq, Lq, Dv});
  const att::mods::softcap cap{2.0f};
  att::reference(q, k, v, out, {}, att::mods::all_of(cap, alibi, att::mods::causal{}));
  att::reference(q, k, v, out2, {}, att::mods::all_of(alibi, cap, att::mods::causal{}));
  double diff3 = 0;
  for (std::int64_t n = 0; n < out.size(); ++n) diff3 = std::max(diff3, double(std::fabs(out.data()[n] - out2.data()[n])));
  std::printf("3. softcap->ALiBi vs ALiBi->softcap: max difference %.3g (must be > 0)\n", diff3);

  const bool ok = err1 < 1e-5 && err2 == 0 && diff3 > 1e-4;
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
