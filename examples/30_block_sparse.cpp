// 30 — block-sparse attention: the Sparse Transformer, Longformer and BigBird patterns run through
// FlashAttention by skipping the tiles their layout leaves empty.
//
// A sparse pattern says which keys each query may see. Written at token level it is a mask; for
// speed it is compiled into a block layout (which 64 x 64 blocks hold any visible pair, and which
// hold only visible pairs), so the flash kernel skips empty tiles outright, runs full tiles with no
// per-element check, and masks only the partial ones:
//   Sparse Transformer strided (Child et al. 2019): a local window of l blocks plus every l-th
//     block before it, causal — each query reaches any earlier token in two hops.
//   Longformer (Beltagy et al. 2020): a sliding window of w tokens plus a few global tokens that
//     see and are seen by everyone.
//   BigBird (Zaheer et al. 2020): a window of 3 blocks, global blocks, and r random blocks per
//     query block, drawn from a seed.
// For each, the program prints the layout's density (fraction of blocks kept) and checks flash
// with the layout against the double-precision reference given the same pattern as an explicit
// element mask. Last, BigBird on 16-token blocks runs through sparse::attention, the kernel that
// visits only the listed blocks (flash's 64 x 64 tiles would compute nearly every tile for it).
// It fails if any output differs by more than a float32 tolerance.
#include <mnemo/attention/flash.hpp>
#include <mnemo/attention/reference.hpp>
#include <mnemo/attention/sparse.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>

namespace att = mnemo::attention;
namespace sp = mnemo::attention::sparse;

namespace {

constexpr std::int64_t H = 4, L = 1024, D = 64, block = 64;

// flash over the layout vs reference over the explicit mask; returns the largest difference.
template <class Pattern>
double run(const char* name, const Pattern& pattern, const mnemo::tensor<float, 4>& q,
           const mnemo::tensor<float, 4>& k, const mnemo::tensor<float, 4>& v, std::int64_t layout_block = block,
           bool layout_kernel = false) {
  const sp::block_layout layout = sp::layout_of(pattern, L, layout_block, layout_block);
  mnemo::tensor<float, 4> out({1, H, L, D}), want({1, H, L, D});
  if (layout_kernel) sp::attention(q, k, v, out, {}, sp::block_sparse{&layout, pattern});
  else att::flash(q, k, v, out, {}, sp::block_sparse{&layout, pattern});

  const mnemo::tensor<std::uint8_t, 2> mask = sp::element_mask(pattern, L);
  att::reference(q, k, v, want, {}, sp::dense_mask{mask.as_view()});

  std::int64_t full = 0;
  for (std::uint8_t f : layout.full()) full += f;
  double worst = 0;
  for (std::int64_t i = 0; i < out.size(); ++i) worst = std::max(worst, double(std::fabs(out.data()[i] - want.data()[i])));
  std::printf("%-22s density %.3f (%ld of %ld blocks, %ld full)  max |flash - reference| = %.2g\n", name,
              layout.density(), layout.nnz(), layout.n_qb() * layout.n_kb(), full, worst);
  return worst;
}

}  // namespace

int main() {
  std::mt19937 rng(30);
  std::normal_distribution<float> normal;
  mnemo::tensor<float, 4> q({1, H, L, D}), k({1, H, L, D}), v({1, H, L, D});
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);

  double worst = 0;
  // Strided with l = 4 blocks of 64 tokens.
  worst = std::max(worst, run("sparse transformer", sp::strided{block, 4}, q, k, v));
  // Fixed: attend within your group of 4 blocks, and to the last block of every group.
  worst = std::max(worst, run("sparse fixed", sp::fixed{block, 4, 1}, q, k, v));
  // Longformer: 129-token window (64 each side) and two global tokens, the first and one in the middle.
  worst = std::max(worst, run("longformer", sp::make_longformer(L, 129, {0, L / 2}), q, k, v));
  // BigBird: 3-block window, 1 global block, 2 random blocks per query block.
  worst = std::max(worst, run("bigbird", sp::make_bigbird(L, block, 3, 1, 2, /*seed=*/7), q, k, v));
  // BigBird on 16-token blocks (16 x 16 layout), through the layout-driven kernel.
  constexpr std::int64_t small_block = 16;
  worst = std::max(worst, run("bigbird 16, layout", sp::make_bigbird(L, small_block, 3, 1, 2, /*seed=*/7), q, k, v,
                              small_block, true));

  const double tolerance = 1e-4;
  if (!(worst <= tolerance)) {
    std::printf("FAILED: difference %.3g above %.1g\n", worst, tolerance);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
