// 12 — Infini-attention: local attention plus a fixed-size compressive memory of everything before.
//
// Munkhdalai, Faruqui & Gopal, "Leave No Context Behind: Efficient Infinite Context Transformers
// with Infini-attention" (2024). Per head, M [Dk, Dv] and z [Dk] summarise all earlier segments:
//   A_mem = sigma(Q) M / (sigma(Q) z),  sigma = elu + 1
//   M += sigma(K)^T V                       (linear)  or  sigma(K)^T (V - sigma(K) M / sigma(K) z)  (delta)
//   out = sigmoid(beta) A_mem + (1 - sigmoid(beta)) softmax-attention within the segment
//
// The 1024 tokens repeat 16 key -> value facts; a "needle" fact occurs once, in the first of 16
// segments. Facts checked:
//   1. the state is 32 x 32 + 32 floats per head whatever the length;
//   2. the first segment sees an empty memory: its output is (1 - sigmoid(beta)) x local attention;
//   3. the fast path (flash + GEMMs) agrees with the double reference;
//   4. after all 1024 tokens the memory recalls the repeated facts (mean cosine similarity > 0.7
//      with the delta rule), better than the linear rule, which re-adds a fact at each of its ~64
//      repetitions where the delta rule adds only what the memory does not already return; the
//      needle, seen once, is not recalled: a 32 x 32 memory has room for a few dozen facts.
#include <mnemo/attention/reference.hpp>
#include <mnemo/memory/compressive.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace mem = mnemo::memory;
using mnemo::tensor;

namespace {

constexpr std::int64_t H = 1, L = 1024, S = 64, Dk = 32, Dv = 32, facts = 16, needle = 10;

double cosine(const float* a, const float* b, std::int64_t n) {
  double ab = 0, aa = 0, bb = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    ab += double(a[i]) * b[i];
    aa += double(a[i]) * a[i];
    bb += double(b[i]) * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

}  // namespace

int main() {
  std::mt19937 rng(12);
  std::normal_distribution<float> normal;
  tensor<float, 4> q({1, H, L, Dk}), k({1, H, L, Dk}), v({1, H, L, Dv}), out({1, H, L, Dv}), out_ref({1, H, L, Dv});
  for (float& x : q) x = normal(rng);
  // The stream repeats a vocabulary of `facts` associations; the needle (token 10) occurs once.
  // Keys are sparse and sharp (sigma(k) large on a few channels) so the associations stay separable.
  tensor<float, 2> vocab_k({facts + 1, Dk}), vocab_v({facts + 1, Dv});
  for (std::int64_t f = 0; f <= facts; ++f) {
    for (std::int64_t c = 0; c < Dk; ++c) vocab_k(f, c) = std::uniform_int_distribution<int>(0, 7)(rng) == 0 ? 3.0f : -3.0f;
    for (std::int64_t c = 0; c < Dv; ++c) vocab_v(f, c) = normal(rng);
  }
  for (std::int64_t t = 0; t < L; ++t) {
    const std::int64_t f = t == needle ? facts : std::uniform_int_distribution<std::int64_t>(0, facts - 1)(rng);
    std::copy(&vocab_k(f, 0), &vocab_k(f, 0) + Dk, &k(0, 0, t, 0));
    std::copy(&vocab_v(f, 0), &vocab_v(f, 0) + Dv, &v(0, 0, t, 0));
  }
  tensor<float, 1> beta({H});
  beta(0) = 0.0f;  // an even mix
  bool ok = true;

  // 1-3. The whole sequence, fast and reference.
  mem::compressive_state st(1, H, Dk, Dv), st_ref(1, H, Dk, Dv);
  const mem::compressive_options opt{.segment_len = S, .update = mem::compressive_rule::delta};
  mem::infini_attention(q, k, v, beta, st, out, opt);
  mem::reference::infini_attention(q, k, v, beta, st_ref, out_ref, opt);
  std::printf("1. %ld tokens summarised in M [%ld, %ld] + z [%ld] per head\n", long(L), long(st.key_dim()),
              long(st.value_dim()), long(st.key_dim()));

  tensor<float, 4> local({1, H, S, Dv});
  const auto first = [](const tensor<float, 4>& x) { return mnemo::cview(x).narrow(2, 0, S); };
  mnemo::attention::reference(first(q), first(k), first(v), local.as_view(), {}, mnemo::attention::mods::causal{});
  double err2 = 0;
  for (std::int64_t t = 0; t < S; ++t)
    for (std::int64_t c = 0; c < Dv; ++c) err2 = std::max(err2, double(std::fabs(out(0, 0, t, c) - 0.5f * local(0, 0, t, c))));
  std::printf("2. first segment = (1 - sigmoid(0)) x local attention: max error %.2e\n", err2);
  ok &= err2 < 1e-5;

  double err3 = 0;
  for (std::int64_t i = 0; i < out.size(); ++i) err3 = std::max(err3, double(std::fabs(out.data()[i] - out_ref.data()[i])));
  std::printf("3. fast vs reference: max |out diff| = %.2e\n", err3);
  ok &= err3 < 1e-4;

  // 4. Recall every fact from the final memory, delta rule vs linear rule.
  mem::compressive_state lin(1, H, Dk, Dv);
  mem::infini_attention(q, k, v, beta, lin, out, {.segment_len = S, .update = mem::compressive_rule::linear});
  tensor<float, 4> key({1, H, 1, Dk}), got({1, H, 1, Dv});
  auto recall = [&](const mem::compressive_state& m, std::int64_t f) {
    std::copy(&vocab_k(f, 0), &vocab_k(f, 0) + Dk, key.data());
    mem::compressive_retrieve(key, m, got);
    return cosine(got.data(), &vocab_v(f, 0), Dv);
  };
  double delta_mean = 0, linear_mean = 0;
  for (std::int64_t f = 0; f < facts; ++f) {
    delta_mean += recall(st, f) / facts;
    linear_mean += recall(lin, f) / facts;
  }
  const double needle_delta = recall(st, facts);
  std::printf("4. recall of the repeated facts, mean cosine: %.3f (delta rule) vs %.3f (linear)\n", delta_mean,
              linear_mean);
  std::printf("   the needle, seen once in segment 0: cosine %.3f (a 32 x 32 memory holds a few dozen facts)\n",
              needle_delta);
  ok &= delta_mean > 0.7 && delta_mean > linear_mean && needle_delta < delta_mean;

  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
