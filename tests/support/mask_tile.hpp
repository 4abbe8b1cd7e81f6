// tests/support/mask_tile.hpp — a mod's mask_tile (mods.hpp: the bulk masker the tiled kernels
// call on partial tiles) against its visible(), element by element. Shared by the tests of
// mods.hpp and sparse.hpp.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "mnemo/attention/mods.hpp"

namespace mnemo::test {

// Tiles at offsets that straddle unit / layout block edges, rows at qp < 0 and qp >= L, sizes that
// are not multiples of 16 (qn, kn in {1, 5, 17, 37, 64, 70}); each tile sits in a buffer with a
// padded leading dimension and guard rows, which must stay untouched. Keys stay in [0, L); the
// query positions reach L + 67, so a mod that reads per-position data needs it that long. h: the
// query head the tiles are masked for.
template <class Mask>
void expect_mask_tile(const Mask& m, std::int64_t L, const std::string& what, std::int64_t h = 0) {
  namespace mods = mnemo::attention::mods;
  static_assert(mnemo::attention::has_mask_tile<Mask>, "the mod under test must provide mask_tile");
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  constexpr std::int64_t pad = 3, guard = 2;
  const std::int64_t sizes[] = {1, 5, 17, 37, 64, 70};
  const std::int64_t q_starts[] = {-21, -1, 0, 7, 16, 45, L - 40, L - 3};
  const std::int64_t k_starts[] = {0, 3, 16, 33, L - 37};
  std::int64_t tiles = 0, bad = 0, checked_masked = 0;
  for (std::int64_t qp0 : q_starts)
    for (std::int64_t k0 : k_starts)
      for (std::int64_t qn : sizes)
        for (std::int64_t kn : sizes) {
          if (k0 < 0 || k0 + kn > L) continue;  // keys are positions of the cache
          const std::int64_t ld = qn + pad;
          std::vector<float> buf(static_cast<std::size_t>((kn + 2 * guard) * ld));
          for (std::size_t x = 0; x < buf.size(); ++x) buf[x] = static_cast<float>(x % 1000) + 0.5f;
          const std::vector<float> before = buf;
          m.mask_tile(buf.data() + guard * ld, ld, h, qp0, qn, k0, kn);
          ++tiles;
          for (std::int64_t r = 0; r < kn + 2 * guard; ++r)
            for (std::int64_t i = 0; i < ld; ++i) {
              const std::size_t x = static_cast<std::size_t>(r * ld + i);
              const std::int64_t j = r - guard;
              const bool inside = j >= 0 && j < kn && i < qn;
              const bool want_masked = inside && !mods::visible(m, h, qp0 + i, k0 + j);
              checked_masked += want_masked;
              const float want = want_masked ? neg_inf : before[x];
              if (buf[x] != want && bad++ < 5)
                ADD_FAILURE() << what << ": tile qp0=" << qp0 << " qn=" << qn << " k0=" << k0 << " kn=" << kn
                              << ": element (key row " << j << ", query " << i << ") = " << buf[x] << ", want "
                              << want;
            }
        }
  EXPECT_EQ(bad, 0) << what;
  EXPECT_GT(tiles, 100) << what;
  EXPECT_GT(checked_masked, 0) << what << ": no tile had a masked element";
}

}  // namespace mnemo::test
