// mnemo/attention/sparse.hpp — block-sparse attention: block layouts, the classic sparse patterns,
// their explicit element masks, and the mod that runs them through attention::flash.
//
// A sparse pattern is a mask over (query position qp, key position kp), both on the key axis
// (mods.hpp: query row i sits at qp = i + Lk - Lq). The patterns here are mods with an exact
// `visible(h, qp, kp)` (the paper's definition: the explicit element mask) and a `block()`
// classifier, so they can be passed to any kernel directly. For speed, a pattern is compiled once
// into a block_layout:
//
//   block_layout   query blocks of block_q positions x key blocks of block_k positions over
//                  [0, length)^2. CSR: row_ptr [n_qb + 1], cols [nnz] (key blocks of each query
//                  block, strictly increasing), full [nnz] (1: every element visible, 0: partial,
//                  the element mask decides). Blocks not listed are empty.
//   block_sparse   the mod {&layout, element}: a listed full block is visible, a listed partial
//                  block is visible where `element` is, everything else is masked. block() reads a
//                  dense byte map of the block states (n_qb * n_kb bytes: 16 KiB at L = 8192 with
//                  64 x 64 blocks), so a flash tile is classified in O(blocks it overlaps): one
//                  lookup when the layout block is a multiple of the tile, (64 / b)^2 when it is a
//                  divisor b; partial blocks are refined with element's own block() on their
//                  intersection with the tile.
//
// Patterns (u(p) = p / unit is the unit of a position; unit = 1 gives the token-level pattern
// of the paper, unit = 64 the block-sparse form of DeepSpeed's / Triton's sparsity configs):
//
//   strided          Sparse Transformer (Child et al. 2019) strided: causal, and with d = u(qp) - u(kp)
//                    d < stride (the local part A1) or d % stride == 0 (the strided part A2)
//   fixed            Sparse Transformer fixed: causal, and u(qp) / stride == u(kp) / stride (A1) or
//                    u(kp) % stride >= stride - summary (the summary cells, A2)
//   longformer       Longformer (Beltagy et al. 2020) local window + global tokens: visible if
//                    |qp - kp| <= window / 2 (causal: qp - window < kp <= qp), or qp or kp is a
//                    global token (causal: and kp <= qp)
//   bigbird          BigBird ITC (Zaheer et al. 2020), in blocks: the first `globals` blocks attend
//                    everywhere and are attended by all, a window of `window` blocks centred on the
//                    diagonal, and `random` blocks per query block drawn from a seed
//   dilated_window   Longformer dilated sliding window: causal, the `window` keys
//                    qp, qp - dilation, ..., qp - (window - 1) dilation
//   user layouts     any CSR given to block_layout's constructor, with any element mod
//                    (mods::none: listed blocks are fully visible; mods::causal: ...)
//
// element_mask(mask, length) materialises any of them as a [length, length] byte mask and
// dense_mask is the mod that reads one: the tests run attention::reference with it.
//
// Two kernels run a layout:
//   flash(q, k, v, out, lse, block_sparse{&layout, element})   flash visits every key tile of a
//       query tile, skips the empty ones after one block() call, runs full tiles as dense ones and
//       masks partial ones with the mod's mask_tile (below). Its tiles are 64 x 64, so a layout of
//       smaller blocks costs the fraction of 64 x 64 tiles it touches, not its density.
//   sparse::attention(q, k, v, out, lse, block_sparse{...})    the layout-driven kernel: per query
//       block (cut to <= 64 rows) it visits exactly the listed key blocks, gathered in chunks of up
//       to 64 keys, so it costs about the density also for 16 x 16 blocks.
//
// mask_tile(s, ld, h, qp0, qn, k0, kn) (the contract of mods.hpp): every mod here masks a whole
// key-major tile in runs (per key row the visible queries are an interval or a few, computed
// arithmetically) instead of qn * kn visible() calls; the tiled kernels call it on partial tiles.
//
// Cost (bench/sparse_rows.cpp, L = 8192, D = 64, 1 thread, AVX-512, time / dense flash time in
// one run, target d + 0.1). Layouts of whole 64 x 64 blocks track d through flash: random 0.056 /
// 0.109 / 0.261 / 0.513 at d = 0.047 / 0.10 / 0.25 / 0.50, strided 0.137 (d = 0.119), fixed 0.133
// (d = 0.121), BigBird 0.084 (d = 0.077). 16 x 16 random blocks: sparse::attention 0.163 at
// d = 0.10 and 0.35 - 0.40 at d = 0.25 (two runs), flash 2.9 / 3.2. Longformer 0.32 (d = 0.127)
// and dilated window 0.50 (d = 0.125) are no longer paid in visible() (mask_tile is 0.7% of the
// Longformer profile) but in simd::online_softmax_columns: exp of a masked score clamps -inf to
// -104 and underflows through a subnormal, a microcode assist per vector (44% of the profile).
// With that exp argument clamped to 0 before the call (a one-line change in simd/gemm.hpp, measured
// on a patched copy): Longformer 0.137, dilated 0.17, flash on 16 x 16 blocks 0.82 - 1.0; with
// mask_tile removed again, Longformer 0.25 - 0.27.
#pragma once

#include <algorithm>
#include <bit>
#include <concepts>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/tiles.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/random.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/gemm.hpp"

namespace mnemo::attention::sparse {

namespace detail {

// p / b for p >= 0, by a shift when b is a power of two (per-element checks call this).
inline std::int64_t unit_of(std::int64_t p, std::int64_t b) {
  return std::has_single_bit(static_cast<std::uint64_t>(b)) ? p >> std::countr_zero(static_cast<std::uint64_t>(b))
                                                            : p / b;
}
inline std::int64_t mod_of(std::int64_t p, std::int64_t b) {
  return std::has_single_bit(static_cast<std::uint64_t>(b)) ? p & (b - 1) : p % b;
}

// Tile classification accumulated over pieces: empty if every piece is empty, full if every piece
// is full, partial otherwise.
struct tile_acc {
  bool any = false, all = true;
  void add(tile t) {
    any = any || t != tile::empty;
    all = all && t == tile::full;
  }
  bool decided() const { return any && !all; }  // partial, whatever comes next
  tile result() const { return !any ? tile::empty : all ? tile::full : tile::partial; }
};

// Rows with qp outside [0, length) see nothing: clip [q0, q1) to the layout; `clipped` rows make
// a tile at best partial.
struct clip {
  std::int64_t q0, q1;
  bool clipped, none;
};
inline clip clip_rows(std::int64_t q0, std::int64_t q1, std::int64_t length) {
  const std::int64_t a = std::max<std::int64_t>(q0, 0), b = std::min(q1, length);
  return {a, b, a != q0 || b != q1, a >= b};
}

// Classification of [q0, q1) x [k0, k1) for a pattern defined on units of `block` positions,
// visible iff unit_visible(u(qp), u(kp)) (and kp <= qp when causal). Loops over the unit pairs
// the tile overlaps: O(1) when the unit is at least the tile, tile^2 / block^2 otherwise.
template <class UnitVisible>
tile unit_block(std::int64_t block, bool causal, std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1,
                UnitVisible&& unit_visible) {
  if (q1 <= 0) return tile::empty;
  tile_acc acc;
  if (q0 < 0) {
    q0 = 0;
    acc.all = false;
  }
  if (causal && k0 > q1 - 1) return tile::empty;
  const std::int64_t u_q0 = unit_of(q0, block), u_q1 = unit_of(q1 - 1, block);
  const std::int64_t u_k0 = unit_of(k0, block), u_k1 = unit_of(k1 - 1, block);
  for (std::int64_t I = u_q0; I <= u_q1; ++I) {
    for (std::int64_t J = u_k0; J <= u_k1; ++J) {
      if (causal && J > I) {  // above the diagonal: nothing from here on in this row
        acc.all = false;
        break;
      }
      if (!unit_visible(I, J)) {
        acc.all = false;
      } else {
        const std::int64_t a0 = std::max(q0, I * block), a1 = std::min(q1, (I + 1) * block);
        const std::int64_t b0 = std::max(k0, J * block), b1 = std::min(k1, (J + 1) * block);
        acc.add(causal ? mods::causal{}.block(a0, a1, b0, b1) : tile::full);
      }
      if (acc.decided()) return tile::partial;
    }
  }
  return acc.result();
}

// ---- Bulk tile masking (mask_tile, mods.hpp). Tiles are key-major, as flash computes them
// (S^T = K Q^T): s[j * ld + i] holds key k0 + j against the query at qp0 + i. mask_tile writes
// -inf exactly where visible(h, qp0 + i, k0 + j) is false and touches nothing else, in runs along
// i: per key row the visible queries form one interval (window, causal, a layout block) or a short
// list of them, so a row costs a few fills (mods::fill_masked) instead of qn visible() calls.

// The length of patterns defined on every position >= 0 (strided, fixed); rows_in computes
// length - qp0, which must not overflow.
inline constexpr std::int64_t unbounded = std::numeric_limits<std::int64_t>::max() / 2;


// The rows of a tile whose query position lies in [0, length): [lo, hi) of [0, qn).
struct row_range {
  std::int64_t lo, hi;
};
inline row_range rows_in(std::int64_t qp0, std::int64_t qn, std::int64_t length) {
  const std::int64_t lo = mods::clamp_to(-qp0, 0, qn);
  return {lo, mods::clamp_to(length - qp0, lo, qn)};
}

// Masks the rows outside [r.lo, r.hi) over all kn keys.
inline void mask_outside_rows(float* s, std::int64_t ld, std::int64_t qn, std::int64_t kn, row_range r) {
  mods::fill_masked_rect(s, ld, 0, r.lo, 0, kn);
  mods::fill_masked_rect(s, ld, r.hi, qn, 0, kn);
}

// mask_tile of a pattern on units of `unit` positions (visible iff unit_visible(u(qp), u(kp)),
// kp <= qp when causal, qp in [0, length)): per key row, one run per query unit.
template <class UnitVisible>
void unit_mask_tile(std::int64_t unit, bool causal, std::int64_t length, float* s, std::int64_t ld, std::int64_t qp0,
                    std::int64_t qn, std::int64_t k0, std::int64_t kn, UnitVisible&& unit_visible) {
  const row_range r = rows_in(qp0, qn, length);
  mask_outside_rows(s, ld, qn, kn, r);
  for (std::int64_t j = 0; j < kn; ++j) {
    float* row = s + j * ld;
    const std::int64_t kp = k0 + j, J = unit_of(kp, unit);
    std::int64_t i = r.lo;
    if (causal) {
      i = mods::clamp_to(kp - qp0, r.lo, r.hi);
      mods::fill_masked(row, r.lo, i);
    }
    while (i < r.hi) {
      const std::int64_t I = unit_of(qp0 + i, unit), end = std::min(r.hi, (I + 1) * unit - qp0);
      if (!unit_visible(I, J)) mods::fill_masked(row, i, end);
      i = end;
    }
  }
}

inline void require_positive(const char* fn, const char* name, std::int64_t value) {
  mnemo::detail::require(value > 0, fn, ": ", name, " must be > 0, got ", value);
}


}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Block layout.

enum class block_state : std::uint8_t { empty = 0, partial = 1, full = 2 };

class block_layout {
 public:
  block_layout() = default;

  // CSR layout over positions [0, length) on both axes. `full` may be empty: every listed block
  // is full. Throws mnemo::error naming the offending entry for wrong sizes, out-of-range or
  // unsorted (or repeated) key blocks.
  block_layout(std::int64_t length, std::int64_t block_q, std::int64_t block_k, std::vector<std::int64_t> row_ptr,
               std::vector<std::int64_t> cols, std::vector<std::uint8_t> full = {})
      : length_(length), block_q_(block_q), block_k_(block_k), row_ptr_(std::move(row_ptr)), cols_(std::move(cols)),
        full_(std::move(full)) {
    constexpr const char* fn = "sparse::block_layout";
    using mnemo::detail::require;
    require(length >= 1, fn, ": length must be >= 1, got ", length);
    detail::require_positive(fn, "block_q", block_q);
    detail::require_positive(fn, "block_k", block_k);
    n_qb_ = (length + block_q - 1) / block_q;
    n_kb_ = (length + block_k - 1) / block_k;
    const auto nnz = static_cast<std::int64_t>(cols_.size());
    require(static_cast<std::int64_t>(row_ptr_.size()) == n_qb_ + 1, fn, ": row_ptr must have n_qb + 1 = ", n_qb_ + 1,
            " entries (n_qb = ceil(length / block_q) = ceil(", length, " / ", block_q, ")), got ", row_ptr_.size());
    require(row_ptr_[0] == 0, fn, ": row_ptr[0] must be 0, got ", row_ptr_[0]);
    require(row_ptr_[n_qb_] == nnz, fn, ": row_ptr[n_qb] = row_ptr[", n_qb_, "] must equal cols.size() = ", nnz,
            ", got ", row_ptr_[n_qb_]);
    if (full_.empty()) full_.assign(cols_.size(), 1);
    require(static_cast<std::int64_t>(full_.size()) == nnz, fn, ": full must be empty or have cols.size() = ", nnz,
            " entries, got ", full_.size());
    for (std::int64_t qb = 0; qb < n_qb_; ++qb)
      require(row_ptr_[qb] <= row_ptr_[qb + 1], fn, ": row_ptr must be non-decreasing, got row_ptr[", qb,
              "] = ", row_ptr_[qb], " > row_ptr[", qb + 1, "] = ", row_ptr_[qb + 1]);
    map_.assign(static_cast<std::size_t>(n_qb_ * n_kb_), static_cast<std::uint8_t>(block_state::empty));
    for (std::int64_t qb = 0; qb < n_qb_; ++qb) {
      for (std::int64_t e = row_ptr_[qb]; e < row_ptr_[qb + 1]; ++e) {
        const std::int64_t kb = cols_[e];
        if (kb < 0 || kb >= n_kb_)
          mnemo::detail::fail(fn, ": cols[", e, "] (query block ", qb, ") must be a key block in [0, n_kb) = [0, ",
                              n_kb_, "), got ", kb);
        if (e > row_ptr_[qb] && kb <= cols_[e - 1])
          mnemo::detail::fail(fn, ": the key blocks of query block ", qb,
                              " must be strictly increasing (sorted, no repeats), got cols[", e - 1, "] = ",
                              cols_[e - 1], " then cols[", e, "] = ", kb);
        require(full_[e] <= 1, fn, ": full[", e, "] must be 0 or 1, got ", int{full_[e]});
        map_[qb * n_kb_ + kb] = static_cast<std::uint8_t>(full_[e] ? block_state::full : block_state::partial);
      }
    }
  }

  std::int64_t length() const { return length_; }
  std::int64_t block_q() const { return block_q_; }
  std::int64_t block_k() const { return block_k_; }
  std::int64_t n_qb() const { return n_qb_; }
  std::int64_t n_kb() const { return n_kb_; }
  std::int64_t nnz() const { return static_cast<std::int64_t>(cols_.size()); }
  const std::vector<std::int64_t>& row_ptr() const { return row_ptr_; }
  const std::vector<std::int64_t>& cols() const { return cols_; }
  const std::vector<std::uint8_t>& full() const { return full_; }
  // Fraction of the n_qb x n_kb blocks that are listed.
  double density() const { return static_cast<double>(nnz()) / static_cast<double>(n_qb_ * n_kb_); }

  block_state state(std::int64_t qb, std::int64_t kb) const {
    return static_cast<block_state>(map_[static_cast<std::size_t>(qb * n_kb_ + kb)]);
  }
  std::int64_t q_block_of(std::int64_t qp) const { return detail::unit_of(qp, block_q_); }
  std::int64_t k_block_of(std::int64_t kp) const { return detail::unit_of(kp, block_k_); }

 private:
  std::int64_t length_ = 0, block_q_ = 1, block_k_ = 1, n_qb_ = 0, n_kb_ = 0;
  std::vector<std::int64_t> row_ptr_{0}, cols_;
  std::vector<std::uint8_t> full_;
  std::vector<std::uint8_t> map_;  // [n_qb, n_kb] block_state
};

// The layout of any mask mod at the given block sizes: every block the mask's block() does not
// call empty is listed, full where it calls it full. O(n_qb * n_kb) block() calls.
template <class Mask>
block_layout layout_of(const Mask& mask, std::int64_t length, std::int64_t block_q, std::int64_t block_k) {
  constexpr const char* fn = "sparse::layout_of";
  mnemo::detail::require(length >= 1, fn, ": length must be >= 1, got ", length);
  detail::require_positive(fn, "block_q", block_q);
  detail::require_positive(fn, "block_k", block_k);
  const std::int64_t n_qb = (length + block_q - 1) / block_q, n_kb = (length + block_k - 1) / block_k;
  std::vector<std::int64_t> row_ptr{0}, cols;
  std::vector<std::uint8_t> full;
  for (std::int64_t qb = 0; qb < n_qb; ++qb) {
    const std::int64_t q0 = qb * block_q, q1 = std::min(length, q0 + block_q);
    for (std::int64_t kb = 0; kb < n_kb; ++kb) {
      const std::int64_t k0 = kb * block_k, k1 = std::min(length, k0 + block_k);
      const tile t = mods::classify(mask, q0, q1, k0, k1);
      if (t == tile::empty) continue;
      cols.push_back(kb);
      full.push_back(t == tile::full ? 1 : 0);
    }
    row_ptr.push_back(static_cast<std::int64_t>(cols.size()));
  }
  return {length, block_q, block_k, std::move(row_ptr), std::move(cols), std::move(full)};
}

// ---------------------------------------------------------------------------------------------
// The mod.

// Block-sparse mask: listed full blocks visible, listed partial blocks where `element` is visible,
// the rest masked. The layout must outlive every call that uses the mod; its length must be Lk.
template <class Element = mods::none>
struct block_sparse {
  static_assert(!has_score<Element>,
                "sparse::block_sparse: the element mod must be a mask only; compose score mods outside with "
                "mods::all_of(block_sparse{...}, mods::softcap{...})");

  const block_layout* layout = nullptr;
  Element element{};

  bool visible(std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    if (qp < 0 || qp >= layout->length()) return false;
    switch (layout->state(layout->q_block_of(qp), layout->k_block_of(kp))) {
      case block_state::full: return true;
      case block_state::partial: return mods::visible(element, h, qp, kp);
      default: return false;
    }
  }

  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    const detail::clip c = detail::clip_rows(q0, q1, layout->length());
    if (c.none) return tile::empty;
    detail::tile_acc acc;
    acc.all = !c.clipped;
    const std::int64_t bq = layout->block_q(), bk = layout->block_k();
    const std::int64_t qb0 = layout->q_block_of(c.q0), qb1 = layout->q_block_of(c.q1 - 1);
    const std::int64_t kb0 = layout->k_block_of(k0), kb1 = layout->k_block_of(k1 - 1);
    for (std::int64_t qb = qb0; qb <= qb1; ++qb) {
      for (std::int64_t kb = kb0; kb <= kb1; ++kb) {
        const block_state st = layout->state(qb, kb);
        if (st == block_state::partial) {
          acc.add(mods::classify(element, std::max(c.q0, qb * bq), std::min(c.q1, (qb + 1) * bq),
                                 std::max(k0, kb * bk), std::min(k1, (kb + 1) * bk)));
        } else {
          acc.add(st == block_state::full ? tile::full : tile::empty);
        }
        if (acc.decided()) return tile::partial;
      }
    }
    return acc.result();
  }

  // -inf over a key-major tile where visible() is false (mods.hpp's mask_tile): one rectangle
  // per layout block the tile overlaps — nothing for a full block, a fill for an empty one, the
  // element's own mask for a partial one. A 64 x 64 tile over 16 x 16 blocks is 16 rectangles.
  void mask_tile(float* s, std::int64_t ld, std::int64_t h, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    const detail::row_range r = detail::rows_in(qp0, qn, layout->length());
    detail::mask_outside_rows(s, ld, qn, kn, r);
    const std::int64_t bq = layout->block_q(), bk = layout->block_k();
    for (std::int64_t j0 = 0, j1; j0 < kn; j0 = j1) {
      const std::int64_t kb = layout->k_block_of(k0 + j0);
      j1 = std::min(kn, (kb + 1) * bk - k0);
      for (std::int64_t i0 = r.lo, i1; i0 < r.hi; i0 = i1) {
        const std::int64_t qb = layout->q_block_of(qp0 + i0);
        i1 = std::min(r.hi, (qb + 1) * bq - qp0);
        switch (layout->state(qb, kb)) {
          case block_state::full: break;
          case block_state::partial:
            mods::mask_tile(element, s + j0 * ld + i0, ld, h, qp0 + i0, i1 - i0, k0 + j0, j1 - j0);
            break;
          default: mods::fill_masked_rect(s, ld, i0, i1, j0, j1);
        }
      }
    }
  }

  void validate(const char* fn, std::int64_t Hq, std::int64_t Lq, std::int64_t Lk) const {
    mnemo::detail::require(layout != nullptr, fn, ": block_sparse.layout must point to a block_layout, got null");
    mnemo::detail::require(layout->length() == Lk, fn, ": block_sparse.layout.length() must equal Lk = ", Lk,
                           ", got ", layout->length());
    mods::validate(element, fn, Hq, Lq, Lk);
  }
};

template <class Element>
block_sparse(const block_layout*, Element) -> block_sparse<Element>;

// ---------------------------------------------------------------------------------------------
// Layout-driven kernel.

namespace detail {

// One piece of a key chunk: keys [k0, k0 + kn) of one listed layout block, at row `row` of the
// chunk's score tile.
struct key_piece {
  std::int64_t k0, kn, row;
  bool partial;
};

// Register blocking of the score GEMM when a query tile is one SIMD vector wide (16-query blocks
// on AVX-512): the default 6 x 4 blocking degenerates to 6 accumulators, too few to hide the FMA
// latency (4 cycles, 2 ports: 8 in flight), and its 4-row tail to 4. 8 rows x 1 vector keeps 8
// FMAs in flight. Measured (L = 8192, D = 64, 16 x 16 random blocks at d = 0.25, 1 AVX-512 core):
// see the header figures.
struct narrow_blocking {
  static constexpr int mr = 8;
  static constexpr int nv = 1;
};

template <class KV, class Element, class Arch>
struct layout_plan {
  using traits = flash_traits<Arch>;
  static constexpr std::int64_t w = traits::lanes;
  // At most flash's tile of queries and keys per step, so the score tile and its operands stay in
  // L1/L2 as in flash (flash_traits); a layout block larger than that is cut into pieces.
  static constexpr std::int64_t max_rows = traits::block_q, chunk_keys = traits::block_k;

  const dims& d;
  view<const float, 4> q;
  view<const KV, 4> k, v;
  view<float, 4> out;
  view<float, 3> lse;
  const block_sparse<Element>& mod;

  const block_layout& lay = *mod.layout;
  std::int64_t G = d.group(), dvp = tiles::round_up(d.Dv, w);
  std::int64_t tile_rows = std::min(lay.block_q(), max_rows), tq = tiles::round_up(tile_rows, w);
  std::int64_t subtiles = (lay.block_q() + tile_rows - 1) / tile_rows;
  static constexpr bool k_direct = std::is_same_v<KV, float>;  // K rows are the GEMM's A operand: any stride
  bool v_direct = std::is_same_v<KV, float> && d.Dv % w == 0;    // V rows feed whole vectors of B
  tiles::workspace_layout ws{};
  std::int64_t at_qt = ws.take(G * d.D * tq), at_o = ws.take(G * tq * dvp), at_m = ws.take(G * tq),
               at_l = ws.take(G * tq), at_s = ws.take(chunk_keys * tq), at_alpha = ws.take(tq),
               at_k = k_direct ? 0 : ws.take(chunk_keys * d.D), at_v = v_direct ? 0 : ws.take(chunk_keys * dvp);

  std::int64_t items() const { return d.B * d.Hkv * lay.n_qb() * subtiles; }

  void run(std::int64_t item, float* work) const {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    // The last query blocks first (causal layouts list the most key blocks there).
    const std::int64_t per_head = lay.n_qb() * subtiles;
    const std::int64_t t = per_head - 1 - item % per_head, hk = item / per_head % d.Hkv, b = item / per_head / d.Hkv;
    const std::int64_t qb = t / subtiles, sub = t % subtiles;
    // Query positions of this tile, as rows of q (row i sits at qp = i + offset).
    const std::int64_t qp_lo = qb * lay.block_q() + sub * tile_rows;
    const std::int64_t qp_hi = std::min({qp_lo + tile_rows, (qb + 1) * lay.block_q(), d.Lk});
    const std::int64_t i0 = std::max<std::int64_t>(qp_lo - d.offset(), 0), i1 = qp_hi - d.offset();
    if (i0 >= i1) return;
    const std::int64_t qn = i1 - i0, nq = tiles::round_up(qn, w), qp0 = i0 + d.offset();
    float* s = work + at_s;
    float* alpha = work + at_alpha;
    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g;
      tiles::pack_transposed(q.ptr(b, h, i0), q.stride(2), qn, nq, d.D, d.scale, work + at_qt + g * d.D * tq,
                                    tq);
      std::fill_n(work + at_o + g * tq * dvp, qn * dvp, 0.0f);
      std::fill_n(work + at_m + g * tq, nq, neg_inf);
      std::fill_n(work + at_l + g * tq, nq, 0.0f);
    }

    // Walk the query block's listed key blocks in chunks of at most chunk_keys keys.
    const std::int64_t e_end = lay.row_ptr()[qb + 1];
    std::int64_t e = lay.row_ptr()[qb], next_k = -1;  // next_k: where a cut block continues
    key_piece pieces[chunk_keys];
    while (e < e_end) {
      std::int64_t n_pieces = 0, rows = 0;
      while (e < e_end && rows < chunk_keys) {
        const std::int64_t kb = lay.cols()[e];
        const std::int64_t b0 = kb * lay.block_k(), b1 = std::min(b0 + lay.block_k(), d.Lk);
        const std::int64_t k0 = next_k >= 0 ? next_k : b0, kn = std::min(b1 - k0, chunk_keys - rows);
        pieces[n_pieces++] = {k0, kn, rows, lay.full()[e] == 0};
        rows += kn;
        if (k0 + kn < b1) {
          next_k = k0 + kn;
        } else {
          next_k = -1;
          ++e;
        }
      }
      // K and V rows of every piece: in place, or converted into the chunk's buffers.
      auto k_rows = [&](const key_piece& pc) -> std::pair<const float*, std::int64_t> {
        if constexpr (std::is_same_v<KV, float>) return {k.ptr(b, hk, pc.k0), k.stride(2)};
        else return {work + at_k + pc.row * d.D, d.D};
      };
      auto v_rows = [&](const key_piece& pc) -> std::pair<const float*, std::int64_t> {
        if constexpr (std::is_same_v<KV, float>) {
          if (v_direct) return {v.ptr(b, hk, pc.k0), v.stride(2)};
        }
        return {work + at_v + pc.row * dvp, dvp};
      };
      for (std::int64_t p = 0; p < n_pieces; ++p) {
        const key_piece& pc = pieces[p];
        for (std::int64_t j = 0; j < pc.kn; ++j) {
          if (!k_direct) tiles::to_f32<Arch>(k.ptr(b, hk, pc.k0 + j), work + at_k + (pc.row + j) * d.D, d.D);
          if (!v_direct) tiles::to_f32<Arch>(v.ptr(b, hk, pc.k0 + j), work + at_v + (pc.row + j) * dvp, d.Dv);
        }
      }
      for (std::int64_t g = 0; g < G; ++g) {
        const std::int64_t h = hk * G + g;
        const float* qt = work + at_qt + g * d.D * tq;
        float* o = work + at_o + g * tq * dvp;
        for (std::int64_t p = 0; p < n_pieces; ++p) {
          const key_piece& pc = pieces[p];
          const auto [kp, ldk] = k_rows(pc);
          if (nq == w)
            simd::gemm<simd::a_order::row_major, Arch, narrow_blocking>(pc.kn, nq, d.D, kp, ldk, qt, tq,
                                                                        s + pc.row * tq, tq, simd::c_mode::overwrite);
          else
            simd::gemm<simd::a_order::row_major, Arch>(pc.kn, nq, d.D, kp, ldk, qt, tq, s + pc.row * tq, tq,
                                                       simd::c_mode::overwrite);
          if (pc.partial) mods::mask_tile(mod.element, s + pc.row * tq, tq, h, qp0, qn, pc.k0, pc.kn);
        }
        simd::online_softmax_columns<Arch>(s, tq, rows, nq, work + at_m + g * tq, work + at_l + g * tq, alpha);
        for (std::int64_t p = 0; p < n_pieces; ++p) {
          const key_piece& pc = pieces[p];
          const auto [vp, ldv] = v_rows(pc);
          simd::gemm<simd::a_order::col_major, Arch>(qn, dvp, pc.kn, s + pc.row * tq, tq, vp, ldv, o, dvp,
                                                     p == 0 ? simd::c_mode::rescale : simd::c_mode::accumulate, alpha);
        }
      }
    }

    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g;
      const float* o = work + at_o + g * tq * dvp;
      const float* m = work + at_m + g * tq;
      const float* l = work + at_l + g * tq;
      for (std::int64_t i = 0; i < qn; ++i) {
        float* oi = out.ptr(b, h, i0 + i);
        if (l[i] == 0.0f) {  // no visible key
          std::fill_n(oi, d.Dv, 0.0f);
          if (!lse.empty()) lse(b, h, i0 + i) = neg_inf;
          continue;
        }
        const float inv = 1.0f / l[i];
        for (std::int64_t c = 0; c < d.Dv; ++c) oi[c] = o[i * dvp + c] * inv;
        if (!lse.empty()) lse(b, h, i0 + i) = m[i] + std::log(l[i]);
      }
    }
  }
};

}  // namespace detail

// Block-sparse attention driven by the layout: each query block visits exactly its listed key
// blocks (CSR order), gathered into chunks of up to 64 keys, instead of every 64 x 64 tile of
// flash that a listed block touches. The same result as flash(q, k, v, out, lse, mod, opt) to
// float32 accuracy (the same online softmax, a different grouping of keys); what differs is the
// work: flash computes whole 64 x 64 tiles, so a layout of 16 x 16 blocks at density d costs it
// about the fraction of 64 x 64 tiles touched (1 - (1 - d)^16: 0.99 at d = 0.25), while this
// kernel computes tiles of block_q queries x the listed keys, i.e. about d. Prefer flash for
// layouts of 64-multiples (its tiles are then exactly the blocks) and for score mods; prefer
// this one for small blocks (bench/sparse_rows.cpp: block_sparse_csr rows). Query rows at
// qp < 0 (Lq > Lk) see nothing: out = 0, lse = -inf. Runs at the ISA level options.isa asks for
// (simd/dispatch.hpp), like flash.
template <class KV, class Element = mods::none, class TuArch = simd::default_arch>
void attention(view<const float, 4> q,   // [B, Hq, Lq, D]
               view<const KV, 4> k,      // [B, Hkv, Lk, D]
               view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
               view<float, 4> out,       // [B, Hq, Lq, Dv]
               view<float, 3> lse,       // [B, Hq, Lq] or empty
               const block_sparse<Element>& mod, const options& opt = {}) {
  constexpr const char* fn = "sparse::attention";
  const dims d = attention::detail::check_args(fn, q, k, v, out, lse, mod, opt);
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  for (std::int64_t b = 0; b < d.B; ++b)  // rows before the key axis
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t i = 0; i < std::min(-d.offset(), d.Lq); ++i) {
        std::fill_n(out.ptr(b, h, i), d.Dv, 0.0f);
        if (!lse.empty()) lse(b, h, i) = neg_inf;
      }
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    const detail::layout_plan<KV, Element, Arch> plan{d, q, k, v, out, lse, mod};
    tiles::run_items(plan.items(), plan.ws.total, opt.threads, [&](std::int64_t item, float* work) { plan.run(item, work); });
  });
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Element>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void attention(view<const float, 4> q, const K& k, const V& v, view<float, 4> out, view<float, 3> lse,
               const block_sparse<Element>& mod, const options& opt = {}) {
  attention<element_t<K>, Element>(q, cview(k), cview(v), out, lse, mod, opt);
}

// ---------------------------------------------------------------------------------------------
// Patterns (each an exact element mask with a block classifier).

// Sparse Transformer, strided (Child et al. 2019, A1 u A2), on units of `unit` positions.
struct strided {
  std::int64_t unit = 1;    // positions per unit (1: the token-level pattern)
  std::int64_t stride = 1;  // l, in units

  bool unit_visible(std::int64_t I, std::int64_t J) const {
    const std::int64_t d = I - J;
    return d < stride || detail::mod_of(d, stride) == 0;
  }
  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const {
    return kp <= qp && unit_visible(detail::unit_of(qp, unit), detail::unit_of(kp, unit));
  }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    return detail::unit_block(unit, true, q0, q1, k0, k1, [this](std::int64_t I, std::int64_t J) {
      return unit_visible(I, J);
    });
  }
  void mask_tile(float* s, std::int64_t ld, std::int64_t, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    detail::unit_mask_tile(unit, true, detail::unbounded, s, ld, qp0, qn, k0, kn,
                           [this](std::int64_t I, std::int64_t J) { return unit_visible(I, J); });
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t) const {
    detail::require_positive(fn, "strided.unit", unit);
    detail::require_positive(fn, "strided.stride", stride);
  }
};

// Sparse Transformer, fixed (Child et al. 2019): the unit's own stride-aligned group (A1) and the
// last `summary` units of every group (A2), causal.
struct fixed {
  std::int64_t unit = 1;     // positions per unit
  std::int64_t stride = 1;   // l, in units
  std::int64_t summary = 1;  // c, in units, 1 <= c <= l

  bool unit_visible(std::int64_t I, std::int64_t J) const {
    return I / stride == J / stride || J % stride >= stride - summary;
  }
  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const {
    return kp <= qp && unit_visible(detail::unit_of(qp, unit), detail::unit_of(kp, unit));
  }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    return detail::unit_block(unit, true, q0, q1, k0, k1, [this](std::int64_t I, std::int64_t J) {
      return unit_visible(I, J);
    });
  }
  void mask_tile(float* s, std::int64_t ld, std::int64_t, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    detail::unit_mask_tile(unit, true, detail::unbounded, s, ld, qp0, qn, k0, kn,
                           [this](std::int64_t I, std::int64_t J) { return unit_visible(I, J); });
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t) const {
    detail::require_positive(fn, "fixed.unit", unit);
    detail::require_positive(fn, "fixed.stride", stride);
    mnemo::detail::require(summary >= 1 && summary <= stride, fn, ": fixed.summary must be in [1, stride] = [1, ",
                           stride, "], got ", summary);
  }
};

// Longformer: local window plus global tokens (build with make_longformer).
struct longformer {
  std::int64_t length = 0;
  std::int64_t window = 1;  // causal: the `window` keys ending at the diagonal; else |qp - kp| <= window / 2
  bool causal = false;
  std::vector<std::uint8_t> is_global;        // [length]
  std::vector<std::int64_t> globals_before;   // [length + 1]: global tokens in [0, p)
  std::vector<std::int64_t> global_positions;  // the global tokens, ascending

  bool global(std::int64_t p) const { return is_global[static_cast<std::size_t>(p)] != 0; }
  std::int64_t globals_in(std::int64_t a, std::int64_t b) const {
    return globals_before[static_cast<std::size_t>(b)] - globals_before[static_cast<std::size_t>(a)];
  }
  // Allowed qp - kp of the local window.
  std::int64_t diff_lo() const { return causal ? 0 : -(window / 2); }
  std::int64_t diff_hi() const { return causal ? window - 1 : window / 2; }

  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const {
    if (qp < 0 || qp >= length || (causal && kp > qp)) return false;
    const std::int64_t d = qp - kp;
    return (d >= diff_lo() && d <= diff_hi()) || global(qp) || global(kp);
  }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    const detail::clip c = detail::clip_rows(q0, q1, length);
    if (c.none) return tile::empty;
    const tile ct = causal ? mods::causal{}.block(c.q0, c.q1, k0, k1) : tile::full;
    if (ct == tile::empty) return tile::empty;
    const std::int64_t dmin = c.q0 - (k1 - 1), dmax = c.q1 - 1 - k0;
    const bool band_any = dmax >= diff_lo() && dmin <= diff_hi();
    const bool band_all = dmin >= diff_lo() && dmax <= diff_hi();
    const std::int64_t gq = globals_in(c.q0, c.q1), gk = globals_in(k0, k1);
    if (!band_any && gq == 0 && gk == 0) return tile::empty;
    const bool all = band_all || gq == c.q1 - c.q0 || gk == k1 - k0;
    return !c.clipped && ct == tile::full && all ? tile::full : tile::partial;
  }
  // Per key row kp: rows above the diagonal (causal) masked; a global key is seen by the rest; else
  // the band i in [kp + diff_lo, kp + diff_hi] - qp0 stays and the two runs beside it are masked
  // except at global queries (the tile's few global rows, found once per tile).
  void mask_tile(float* s, std::int64_t ld, std::int64_t, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    const detail::row_range r = detail::rows_in(qp0, qn, length);
    detail::mask_outside_rows(s, ld, qn, kn, r);
    const auto g0 = std::lower_bound(global_positions.begin(), global_positions.end(), qp0 + r.lo);
    const auto g1 = std::lower_bound(g0, global_positions.end(), qp0 + r.hi);
    // row[i] = -inf on [a, b) except at global queries
    auto fill_non_global = [&](float* row, std::int64_t a, std::int64_t b) {
      for (auto g = g0; g != g1 && a < b; ++g) {
        const std::int64_t gi = *g - qp0;
        if (gi < a) continue;
        if (gi >= b) break;
        mods::fill_masked(row, a, gi);
        a = gi + 1;
      }
      mods::fill_masked(row, a, b);
    };
    for (std::int64_t j = 0; j < kn; ++j) {
      float* row = s + j * ld;
      const std::int64_t kp = k0 + j;
      const std::int64_t c = causal ? mods::clamp_to(kp - qp0, r.lo, r.hi) : r.lo;
      mods::fill_masked(row, r.lo, c);
      if (global(kp)) continue;
      const std::int64_t b0 = mods::clamp_to(kp + diff_lo() - qp0, c, r.hi);
      const std::int64_t b1 = mods::clamp_to(kp + diff_hi() + 1 - qp0, b0, r.hi);
      fill_non_global(row, c, b0);
      fill_non_global(row, b1, r.hi);
    }
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t Lk) const {
    mnemo::detail::require(length == Lk, fn, ": longformer.length must equal Lk = ", Lk, ", got ", length);
  }
};

// Longformer pattern over `length` positions with global token positions `globals` (any order).
inline longformer make_longformer(std::int64_t length, std::int64_t window, const std::vector<std::int64_t>& globals,
                                  bool causal = false) {
  constexpr const char* fn = "sparse::make_longformer";
  mnemo::detail::require(length >= 1, fn, ": length must be >= 1, got ", length);
  detail::require_positive(fn, "window", window);
  longformer p{length, window, causal, std::vector<std::uint8_t>(static_cast<std::size_t>(length), 0), {}, {}};
  for (std::size_t i = 0; i < globals.size(); ++i) {
    const std::int64_t g = globals[i];
    if (g < 0 || g >= length)
      mnemo::detail::fail(fn, ": globals[", i, "] must be a position in [0, length) = [0, ", length, "), got ", g);
    p.is_global[static_cast<std::size_t>(g)] = 1;
  }
  p.globals_before.assign(static_cast<std::size_t>(length) + 1, 0);
  for (std::int64_t j = 0; j < length; ++j)
    p.globals_before[static_cast<std::size_t>(j) + 1] = p.globals_before[static_cast<std::size_t>(j)] + p.is_global[static_cast<std::size_t>(j)];
  for (std::int64_t j = 0; j < length; ++j)
    if (p.global(j)) p.global_positions.push_back(j);
  return p;
}

// BigBird ITC in blocks (build with make_bigbird).
struct bigbird {
  std::int64_t length = 0;
  std::int64_t unit = 1;     // positions per block
  std::int64_t window = 1;   // blocks in the window, centred: |I - J| <= window / 2
  std::int64_t globals = 0;  // the first `globals` blocks are global
  bool causal = false;       // additionally kp <= qp (random blocks then drawn from J <= I)
  std::vector<std::int64_t> random_ptr;   // [n_blocks + 1]
  std::vector<std::int64_t> random_cols;  // random key blocks of each query block, ascending

  bool unit_visible(std::int64_t I, std::int64_t J) const {
    if (I < globals || J < globals || (I > J ? I - J : J - I) <= window / 2) return true;
    const auto b = random_cols.begin() + random_ptr[static_cast<std::size_t>(I)];
    const auto e = random_cols.begin() + random_ptr[static_cast<std::size_t>(I) + 1];
    return std::binary_search(b, e, J);
  }
  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const {
    if (qp < 0 || qp >= length || (causal && kp > qp)) return false;
    return unit_visible(detail::unit_of(qp, unit), detail::unit_of(kp, unit));
  }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    const detail::clip c = detail::clip_rows(q0, q1, length);
    if (c.none) return tile::empty;
    const tile t = detail::unit_block(unit, causal, c.q0, c.q1, k0, k1,
                                      [this](std::int64_t I, std::int64_t J) { return unit_visible(I, J); });
    return c.clipped && t == tile::full ? tile::partial : t;
  }
  void mask_tile(float* s, std::int64_t ld, std::int64_t, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    detail::unit_mask_tile(unit, causal, length, s, ld, qp0, qn, k0, kn,
                           [this](std::int64_t I, std::int64_t J) { return unit_visible(I, J); });
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t Lk) const {
    mnemo::detail::require(length == Lk, fn, ": bigbird.length must equal Lk = ", Lk, ", got ", length);
  }
};

// BigBird over `length` positions in blocks of `unit` positions: `window` blocks around the diagonal (odd: window / 2 each
// side), the first `globals` blocks global, and for every other query block min(random, free)
// distinct random key blocks among those not already global or in the window (and J <= I when
// causal), drawn with splitmix64 from `seed` (the same on every platform).
inline bigbird make_bigbird(std::int64_t length, std::int64_t unit, std::int64_t window, std::int64_t globals,
                            std::int64_t random, std::uint64_t seed, bool causal = false) {
  constexpr const char* fn = "sparse::make_bigbird";
  mnemo::detail::require(length >= 1, fn, ": length must be >= 1, got ", length);
  detail::require_positive(fn, "unit", unit);
  detail::require_positive(fn, "window", window);
  mnemo::detail::require(globals >= 0, fn, ": globals must be >= 0, got ", globals);
  mnemo::detail::require(random >= 0, fn, ": random must be >= 0, got ", random);
  const std::int64_t n = (length + unit - 1) / unit;
  bigbird p{length, unit, window, globals, causal, {0}, {}};
  std::uint64_t state = seed;
  std::vector<std::int64_t> free;
  for (std::int64_t I = 0; I < n; ++I) {
    free.clear();
    if (I >= globals) {
      for (std::int64_t J = globals; J < (causal ? I + 1 : n); ++J)
        if ((I > J ? I - J : J - I) > window / 2) free.push_back(J);
    }
    const std::int64_t take = std::min<std::int64_t>(random, static_cast<std::int64_t>(free.size()));
    for (std::int64_t t = 0; t < take; ++t) {  // partial Fisher-Yates
      const auto left = static_cast<std::uint64_t>(free.size()) - static_cast<std::uint64_t>(t);
      const auto pick = static_cast<std::size_t>(t) + static_cast<std::size_t>(rng::splitmix64(state) % left);
      std::swap(free[static_cast<std::size_t>(t)], free[pick]);
    }
    std::sort(free.begin(), free.begin() + take);
    p.random_cols.insert(p.random_cols.end(), free.begin(), free.begin() + take);
    p.random_ptr.push_back(static_cast<std::int64_t>(p.random_cols.size()));
  }
  return p;
}

// Longformer's dilated sliding window, causal: keys qp - t * dilation for t in [0, window).
struct dilated_window {
  std::int64_t window = 1;
  std::int64_t dilation = 1;

  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const {
    const std::int64_t d = qp - kp;
    return d >= 0 && d <= (window - 1) * dilation && detail::mod_of(d, dilation) == 0;
  }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    const std::int64_t span = (window - 1) * dilation;
    const std::int64_t dmin = std::max<std::int64_t>(q0 - (k1 - 1), 0), dmax = std::min(q1 - 1 - k0, span);
    if (dmin > dmax) return tile::empty;
    // some d in [dmin, dmax] must be a multiple of the dilation
    if ((dmin + dilation - 1) / dilation * dilation > dmax) return tile::empty;
    const bool all = dilation == 1 && q0 - (k1 - 1) >= 0 && q1 - 1 - k0 <= span;
    return all ? tile::full : tile::partial;
  }
  // Per key row kp the visible queries are qp = kp + t * dilation, t < window: outside
  // [kp, kp + span] - qp0 everything is masked, inside the dilation - 1 rows between two visible ones.
  void mask_tile(float* s, std::int64_t ld, std::int64_t, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    const std::int64_t span = (window - 1) * dilation;
    for (std::int64_t j = 0; j < kn; ++j) {
      float* row = s + j * ld;
      const std::int64_t a = k0 + j - qp0;  // row of qp = kp
      const std::int64_t first = mods::clamp_to(a, 0, qn), last = mods::clamp_to(a + span + 1, first, qn);
      mods::fill_masked(row, 0, first);
      mods::fill_masked(row, last, qn);
      if (dilation == 1) continue;
      std::int64_t i = a + (first - a + dilation - 1) / dilation * dilation;  // first visible row >= first
      mods::fill_masked(row, first, std::min(i, last));
      for (; i < last; i += dilation) mods::fill_masked(row, i + 1, std::min(i + dilation, last));
    }
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t) const {
    detail::require_positive(fn, "dilated_window.window", window);
    detail::require_positive(fn, "dilated_window.dilation", dilation);
  }
};

// ---------------------------------------------------------------------------------------------
// Explicit element masks.

// mask(qp, kp) = 1 where `m` makes key kp visible to the query at position qp of head h, for
// qp, kp in [0, length): the pattern as a dense [length, length] byte matrix.
template <class Mask>
tensor<std::uint8_t, 2> element_mask(const Mask& m, std::int64_t length, std::int64_t h = 0) {
  mnemo::detail::require(length >= 1, "sparse::element_mask: length must be >= 1, got ", length);
  tensor<std::uint8_t, 2> out({length, length});
  for (std::int64_t qp = 0; qp < length; ++qp)
    for (std::int64_t kp = 0; kp < length; ++kp) out(qp, kp) = mods::visible(m, h, qp, kp) ? 1 : 0;
  return out;
}

// The mod of an explicit mask: key kp is visible to the query at qp iff mask(qp, kp) != 0 (rows at
// qp < 0 see nothing). mask is [Lk, Lk], indexed by positions on the key axis.
struct dense_mask {
  view<const std::uint8_t, 2> mask;  // [Lk, Lk]

  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const { return qp >= 0 && mask(qp, kp) != 0; }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t Lk) const {
    mnemo::detail::require(!mask.empty() && mask.extent(0) == Lk && mask.extent(1) == Lk, fn,
                           ": dense_mask.mask must have shape [Lk, Lk] = [", Lk, ", ", Lk, "], got [", mask.extent(0),
                           ", ", mask.extent(1), "]");
  }
};

}  // namespace mnemo::attention::sparse
