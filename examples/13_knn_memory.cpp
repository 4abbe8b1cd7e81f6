// 13 — Memorizing Transformers: local attention plus exact kNN retrieval from past segments.
//
// Wu, Rabe, Hutchins & Szegedy, "Memorizing Transformers" (ICLR 2022). A long input is read in
// segments of 64 tokens. Each segment attends causally to itself and retrieves, per query, the
// topk (key, value) pairs of earlier segments from an external FIFO memory; after the segment its
// own pairs are added. The two results combine either by the paper's learned gate per head or
// exactly, through (out, lse) and attention::merge, as one softmax over both key sets.
//
// Facts checked:
//   1. with topk = everything stored, the exact merge equals full causal attention over the whole
//      input (so retrieval is the only approximation);
//   2. with topk = 32 of up to 448 stored pairs the output stays close to full attention, because
//      softmax mass concentrates on the best-matching keys (error well below the one of dropping
//      the memory altogether);
//   3. a "needle" pair planted in the first segment is retrieved first by a query aimed at it 7
//      segments later, and the gate mixes the two branches as sigmoid(g) / (1 - sigmoid(g)).
#include <mnemo/attention/decode.hpp>
#include <mnemo/attention/reference.hpp>
#include <mnemo/memory/knn.hpp>

#include <cmath>
#include <cstdio>
#include <random>

namespace mem = mnemo::memory;
namespace att = mnemo::attention;
using mnemo::tensor;
using mnemo::view;

namespace {

constexpr std::int64_t H = 2, S = 64, segments = 8, L = S * segments, D = 32;

// Runs the segments with kNN memory of `topk` pairs per query (0: no memory), exact merge.
tensor<float, 4> run(const tensor<float, 4>& q, const tensor<float, 4>& k, const tensor<float, 4>& v, std::int64_t topk) {
  tensor<float, 4> out({1, H, L, D});
  mem::knn_memory memory(1, H, D, D, L);
  tensor<float, 4> local({1, H, S, D}), retrieved({1, H, S, D});
  tensor<float, 3> lse_local({1, H, S}), lse_mem({1, H, S});
  for (std::int64_t s0 = 0; s0 < L; s0 += S) {
    auto seg = [&](const tensor<float, 4>& x) { return mnemo::cview(x).narrow(2, s0, S); };
    att::reference(seg(q), seg(k), seg(v), local.as_view(), lse_local.as_view(), att::mods::causal{});
    const view<float, 4> o = out.as_view().narrow(2, s0, S);
    if (topk > 0) {
      mem::knn_attention(seg(q), memory, topk, retrieved, lse_mem);
      att::merge(retrieved, lse_mem, local, lse_local, o, {});  // empty memory: lse = -inf, weight 0
    } else {
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t t = 0; t < S; ++t) std::copy(&local(0, h, t, 0), &local(0, h, t, 0) + D, o.ptr(0, h, t));
    }
    memory.add(seg(k), seg(v));
  }
  return out;
}

double max_diff(const tensor<float, 4>& a, const tensor<float, 4>& b) {
  double d = 0;
  for (std::int64_t i = 0; i < a.size(); ++i) d = std::max(d, double(std::fabs(a.data()[i] - b.data()[i])));
  return d;
}

}  // namespace

int main() {
  std::mt19937 rng(13);
  std::normal_distribution<float> normal;
  tensor<float, 4> q({1, H, L, D}), k({1, H, L, D}), v({1, H, L, D});
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = 2.0f * normal(rng);  // peaked attention, as trained models have
  bool ok = true;

  tensor<float, 4> full({1, H, L, D});
  att::reference(q, k, v, full, {}, att::mods::causal{});

  // 1. Retrieve everything stored: exact.
  const double exact = max_diff(run(q, k, v, L), full);
  std::printf("1. topk = all stored pairs: max |out - full attention| = %.2e\n", exact);
  ok &= exact < 5e-5;

  // 2. topk = 32 versus no memory at all.
  const double top32 = max_diff(run(q, k, v, 32), full), none = max_diff(run(q, k, v, 0), full);
  std::printf("2. topk = 32: max error %.3f; without the memory: %.3f\n", top32, none);
  ok &= top32 < none / 4;

  // 3. A needle: key 5 of head 0 in segment 0, and a query aimed at it in the last segment.
  mem::knn_memory memory(1, H, D, D, L);
  memory.add(mnemo::cview(k).narrow(2, 0, L - S), mnemo::cview(v).narrow(2, 0, L - S));
  tensor<float, 4> probe({1, H, 1, D});
  for (std::int64_t c = 0; c < D; ++c) probe(0, 0, 0, c) = 3.0f * k(0, 0, 5, c);
  tensor<std::int64_t, 4> idx({1, H, 1, 4});
  mem::knn_search(probe, memory, 4, idx, {});
  std::printf("3. needle query retrieves the pair at position %ld first (planted at 5)\n",
              long(memory.position(idx(0, 0, 0, 0))));
  ok &= memory.position(idx(0, 0, 0, 0)) == 5;
  tensor<float, 4> out_mem({1, H, 1, D}), out_local({1, H, 1, D}), mixed({1, H, 1, D});
  for (std::int64_t i = 0; i < out_local.size(); ++i) out_local.data()[i] = 1.0f;
  mem::knn_attention(probe, memory, 4, out_mem);
  tensor<float, 1> gate({H});  // gate logits: head 0 trusts the memory (sigmoid(2) = 0.88)
  gate(0) = 2.0f;
  gate(1) = -2.0f;
  mem::knn_gate(out_mem, out_local, gate, mixed);
  const double g = 1.0 / (1.0 + std::exp(-2.0));
  const double want = g * out_mem(0, 0, 0, 0) + (1 - g) * 1.0;
  std::printf("   gate: head 0 out[0] = %.4f (sigmoid(2) mix: %.4f)\n", mixed(0, 0, 0, 0), want);
  ok &= std::fabs(mixed(0, 0, 0, 0) - want) < 1e-5;

  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
