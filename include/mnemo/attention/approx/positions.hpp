// mnemo/attention/approx/positions.hpp — what the sparse approximations (routing.hpp,
// probsparse.hpp, sparsek.hpp, combiner.hpp) share: a mask over gathered rows, a counter-based
// random stream, and the gathers themselves.
//
// Gathered rows. Each of these methods attends over a subset of the queries (ProbSparse's top-u
// rows, a Routing cluster) or of the keys (a Routing cluster, SPARSEK's selection). Their fast
// paths copy the subset into contiguous buffers and run attention::flash on them; the causal mask
// then compares the rows' original positions, not their indices in the buffer:
//
//   visible(h, qp, kp) = kpos[h / G][kp] <= qpos[h][qp - offset]        (causal)
//                        true                                           (not causal)
//
// qp = i + offset is how flash places gathered query row i (offset = Lk' - Lq' of the gathered
// call, mods.hpp "Positions"), so i = qp - offset. Positions ascend along each table, which lets
// the tile classifier skip tiles whose every key lies after every query (and drop the per-element
// checks where every key lies before every query).
//
// Random stream: core/random.hpp's counter_stream of (seed, work item): the same numbers on every
// platform and thread count, uniform doubles in [0, 1), integers in [0, n), normals by Box-Muller.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mnemo/attention/mods.hpp"
#include "mnemo/core/random.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::attention::approx {

// The causal mask over gathered rows (see the header). Tables are not owned.
struct position_mask {
  bool causal = false;
  const std::int64_t* qpos = nullptr;  // query positions, [Hq][ldq] (ldq = 0: one row for every head)
  std::int64_t ldq = 0;
  const std::int64_t* kpos = nullptr;  // key positions, [Hkv][ldk]; null: key index = position
  std::int64_t ldk = 0;
  std::int64_t heads = 1;   // query heads of the call (the classifier checks all of them)
  std::int64_t group = 1;   // query heads per kv head
  std::int64_t offset = 0;  // Lk - Lq of the gathered call

  std::int64_t query_at(std::int64_t h, std::int64_t qp) const { return qpos[h * ldq + (qp - offset)]; }
  std::int64_t key_at(std::int64_t h, std::int64_t kp) const { return kpos ? kpos[(h / group) * ldk + kp] : kp; }

  bool visible(std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    return !causal || key_at(h, kp) <= query_at(h, qp);
  }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    if (!causal) return tile::full;
    bool all_before = true, all_after = true;
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t first_q = query_at(h, q0), last_q = query_at(h, q1 - 1);
      all_after = all_after && key_at(h, k0) > last_q;
      all_before = all_before && key_at(h, k1 - 1) <= first_q;
    }
    return all_after ? tile::empty : all_before ? tile::full : tile::partial;
  }
};

namespace sparse_detail {

// The counter-based stream of core/random.hpp: one per (seed, work item).
using random_stream = rng::counter_stream;

// Rows idx[0 .. n) of the [L, width] matrix at src (row stride ld) into dst [n, width]
// (contiguous), each row times w[t] when w is given.
template <class T>
void gather_rows(const T* src, std::int64_t ld, std::int64_t width, const std::int64_t* idx, std::int64_t n,
                 float* dst, const float* w = nullptr) {
  for (std::int64_t t = 0; t < n; ++t) {
    const T* row = src + idx[t] * ld;
    float* out = dst + t * width;
    const float f = w ? w[t] : 1.0f;
    for (std::int64_t c = 0; c < width; ++c) out[c] = f * static_cast<float>(row[c]);
  }
}

// A [1, H, n, width] view over a contiguous buffer of H blocks of n rows.
inline view<const float, 4> as_heads(const float* p, std::int64_t H, std::int64_t n, std::int64_t width) {
  return view<const float, 4>(p, {1, H, n, width});
}

}  // namespace sparse_detail
}  // namespace mnemo::attention::approx
