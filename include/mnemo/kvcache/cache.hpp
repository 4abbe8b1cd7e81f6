// mnemo/kvcache/cache.hpp — the KV cache of one attention layer, in f32, f16, bf16 or quantized
// int8 / int4 / int2 storage, optionally Hadamard-rotated, with ragged per-kv-head lengths.
//
// Usage (one layer; kvcache::cache holds one layer_cache per layer):
//
//   kvcache::layer_cache c({.kind = kvcache::storage::int4, .Hkv = 8, .capacity = 4096, .D = 128});
//   c.append(k_new, v_new);                    // k_new [Hkv, n, D], v_new [Hkv, n, Dv] in f32
//   kvcache::decode(c, q, out, lse);           // kvcache/decode.hpp: q [Hq, Lq, D] against every slot
//   c.compact(policy_selection);               // kvcache::selection: kept slots of every kv head
//   c.gather(h, slots, k_rows, v_rows);        // dequantized f32 copies of some slots of head h
//
// Layout. Per kv head h, slots [0, length(h)) hold tokens in the order they were appended (after
// compaction: the kept ones, in their old order); each slot remembers the token's original
// position (`positions(h)`, set by append, carried by compaction) and the position its key is
// rotated to (`rotary_positions(h)`, equal to the position unless kvcache/rope.hpp re-rotated it).
// Heads have their own lengths (ragged), so a head-adaptive budget frees slots in that head only.
//
//   storage::f32 / f16 / bf16   K [Hkv, capacity, D] and V [Hkv, capacity, Dv] of that type.
//   storage::int8 / int4 / int2 KIVI (Liu et al. 2024): slots [0, quantized_length(h)) quantized,
//                               the rest in an f32 residual window of the most recent tokens.
//     keys    per channel over groups of tokens: group i of head h covers key_group_lengths(h)[i]
//             consecutive slots and has scale/min per channel (key_scales(h), key_mins(h) [groups, D])
//     values  per token, in groups of quant.value_group channels (value_scales/mins [Hkv, NG, capacity])
//     codes   packed rows [Hkv, capacity, row_bytes] (kvcache/quant.hpp)
//     residual the newest tokens in f32 ([Hkv, quant.residual, D]); when a head's window reaches
//             quant.residual tokens, its oldest quant.key_group tokens become one quantized group.
//   Compaction keeps every kept token's codes and its group's scale/min as they are: kept tokens of
//   a group stay one (shorter) group, empty groups disappear. Compaction is therefore exact in every
//   storage kind: a kept token reads back bit-identical before and after.
//
// Memory: bytes() counts what the stored tokens occupy (codes, scales, minimums, residual rows;
// not the position bookkeeping, the same 16 bytes per slot in every kind). With the default
// groups (128 tokens per key group, 128 channels per value group) at D = Dv = 128 a quantized token
// of one head takes, in bytes, int8: 2 * 128 + 2 * 4 * 128 / 128 + 2 * 4 = 272 (0.53 x f16's 512),
// int4: 2 * 64 + 8 + 8 = 144 (0.28 x f16), int2: 2 * 32 + 8 + 8 = 80 (0.16 x f16), plus the f32
// residual window.
//
// Rotation (config.rotate, kvcache/rotation.hpp): with rotation::hadamard the cache stores R k (with
// rotate.keys) and R v (with rotate.values) in every storage kind, R a randomized Walsh-Hadamard transform over
// blocks of the head dim; kvcache::decode rotates the queries to match (scores unchanged in exact
// arithmetic) and rotates the output back. Everything handed out as f32 (gather, keys(), values())
// is rotated back; the raw storage accessors (dense_keys, key_codes, residual_keys, ...) are in the
// rotated space. Spreading outlier channels over a block before quantization lowers the error of
// the quantized kinds when the queries weigh the outlier channels (kvcache/rotation.hpp has the
// measurements). A rotating cache takes, in every kind, only finite keys and values with |x| <=
// quant::max_magnitude / (the Hadamard block of D or Dv), so that neither R nor R^T overflows:
// append, set_keys and set_slots throw mnemo::error otherwise (an f32 cache that does not rotate
// stores non-finite rows as given).
//
// Errors: every public call validates its arguments and throws mnemo::error naming the argument,
// what was expected and what it got, before changing anything.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/quant.hpp"
#include "mnemo/kvcache/rotation.hpp"
#include "mnemo/kvcache/selection.hpp"
#include "mnemo/simd/load.hpp"

namespace mnemo::kvcache {

// How K and V are stored.
enum class storage { f32, f16, bf16, int8, int4, int2 };

inline const char* storage_name(storage s) {
  switch (s) {
    case storage::f32: return "f32";
    case storage::f16: return "f16";
    case storage::bf16: return "bf16";
    case storage::int8: return "int8";
    case storage::int4: return "int4";
    case storage::int2: return "int2";
  }
  return "?";
}

inline bool is_quantized(storage s) { return s == storage::int8 || s == storage::int4 || s == storage::int2; }

// Bits per code of a quantized kind (0 for f32 / f16 / bf16).
inline int storage_bits(storage s) {
  return s == storage::int8 ? 8 : s == storage::int4 ? 4 : s == storage::int2 ? 2 : 0;
}

// The storage kind of a K/V element type.
template <class T>
inline constexpr storage storage_of = std::is_same_v<T, float> ? storage::f32
                                      : std::is_same_v<T, f16> ? storage::f16
                                                               : storage::bf16;

// Every storage kind of both stores (layer_cache and kvcache/paged.hpp's paged_cache), for loops in
// tests, benchmarks and examples.
inline constexpr storage all_storages[] = {storage::f32, storage::f16, storage::bf16, storage::int8, storage::int4};
// Every storage kind of layer_cache: all_storages and int2 (KIVI 2-bit, which paged_cache rejects).
inline constexpr storage layer_storages[] = {storage::f32,  storage::f16,  storage::bf16,
                                             storage::int8, storage::int4, storage::int2};

// Grouping of the quantized kinds (ignored by f32 / f16 / bf16).
struct quant_options {
  std::int64_t key_group = 128;    // tokens per key group (one scale/min per channel per group)
  std::int64_t value_group = 128;  // channels per value group of a token; a multiple of 16, or >= Dv
  std::int64_t residual = 128;     // f32 window of recent tokens; >= key_group
};

struct cache_config {
  storage kind = storage::f32;
  std::int64_t Hkv = 1;
  std::int64_t capacity = 0;  // slots per kv head
  std::int64_t D = 0;         // key head dim
  std::int64_t Dv = 0;        // value head dim; 0: D
  quant_options quant = {};
  rotation_options rotate = {};  // rotation::hadamard: store R k (and R v), see the header
};

class layer_cache {
 public:
  // SIMD width the value groups must be a multiple of, so that no batch straddles two groups.
  static constexpr std::int64_t value_group_multiple = 16;

  // A valid empty cache that holds nothing: one kv head of capacity 0 (length(0) = max_length() = 0),
  // to be assigned a configured cache later (std::vector<layer_cache>(n)). Appending to it and
  // decoding from it throw mnemo::error ("not configured").
  layer_cache() : length_(1, 0), qlength_(1, 0) {}

  explicit layer_cache(const cache_config& cfg) : cfg_(cfg) {
    constexpr const char* fn = "kvcache::layer_cache";
    using detail::require;
    if (cfg_.Dv == 0) cfg_.Dv = cfg_.D;
    require(cfg_.Hkv >= 1, fn, ": config.Hkv must be >= 1, got ", cfg_.Hkv);
    require(cfg_.capacity >= 1, fn, ": config.capacity must be >= 1, got ", cfg_.capacity);
    require(cfg_.D >= 1 && cfg_.Dv >= 1, fn, ": config.D and config.Dv must be >= 1, got D=", cfg_.D, ", Dv=", cfg_.Dv);
    switch (cfg_.kind) {
      case storage::f32:
      case storage::f16:
      case storage::bf16: break;
      case storage::int8:
      case storage::int4:
      case storage::int2: {
        const quant_options& q = cfg_.quant;
        require(q.key_group >= 1, fn, ": config.quant.key_group must be >= 1, got ", q.key_group);
        require(q.residual >= q.key_group, fn, ": config.quant.residual must be >= key_group (", q.key_group,
                "), got ", q.residual);
        require(q.value_group >= 1 && (q.value_group % value_group_multiple == 0 || q.value_group >= cfg_.Dv), fn,
                ": config.quant.value_group must be a multiple of ", value_group_multiple, " or >= Dv (", cfg_.Dv,
                "), got ", q.value_group);
        break;
      }
      default: detail::fail(fn, ": config.kind is not a storage kind: ", static_cast<int>(cfg_.kind));
    }
    switch (cfg_.rotate.kind) {
      case rotation::none: break;
      case rotation::hadamard:
        if (cfg_.rotate.keys) krot_ = hadamard_rotation(cfg_.D, cfg_.rotate.seed, fn, "config.D");
        if (cfg_.rotate.values) vrot_ = hadamard_rotation(cfg_.Dv, cfg_.rotate.seed, fn, "config.Dv");
        break;
      default: detail::fail(fn, ": config.rotate.kind is not a rotation: ", static_cast<int>(cfg_.rotate.kind));
    }
    try {
      allocate();
    } catch (const error& e) {  // a size that overflows or memory that is not there (core/tensor.hpp)
      detail::fail(fn, ": config (Hkv = ", cfg_.Hkv, ", capacity = ", cfg_.capacity, ", D = ", cfg_.D, ", Dv = ", cfg_.Dv,
                   ", ", storage_name(cfg_.kind), ") cannot be allocated: ", e.what());
    }
  }

 private:
  // The buffers of a validated configuration. tensor throws mnemo::error on a size that overflows or
  // a failed allocation; the per-head vectors are sized after the tensors.
  void allocate() {
    const std::int64_t H = cfg_.Hkv, C = cfg_.capacity, D = cfg_.D, Dv = cfg_.Dv;
    pos_ = tensor<std::int64_t, 2>({H, C});
    rot_ = tensor<std::int64_t, 2>({H, C});
    if (cfg_.kind == storage::f32) kf_ = tensor<float, 3>({H, C, D}), vf_ = tensor<float, 3>({H, C, Dv});
    if (cfg_.kind == storage::f16) kh_ = tensor<f16, 3>({H, C, D}), vh_ = tensor<f16, 3>({H, C, Dv});
    if (cfg_.kind == storage::bf16) kb_ = tensor<bf16, 3>({H, C, D}), vb_ = tensor<bf16, 3>({H, C, Dv});
    if (is_quantized(cfg_.kind)) {
      const int bits = storage_bits(cfg_.kind);
      kcodes_ = tensor<std::uint8_t, 3>({H, C, quant::row_bytes(bits, D)});
      vcodes_ = tensor<std::uint8_t, 3>({H, C, quant::row_bytes(bits, Dv)});
      vscale_ = tensor<float, 3>({H, value_groups(), C});
      vmin_ = tensor<float, 3>({H, value_groups(), C});
      rk_ = tensor<float, 3>({H, cfg_.quant.residual, D});
      rv_ = tensor<float, 3>({H, cfg_.quant.residual, Dv});
      kscale_.assign(static_cast<std::size_t>(H), {});
      kmin_.assign(static_cast<std::size_t>(H), {});
      glen_.assign(static_cast<std::size_t>(H), {});
    }
    length_.assign(static_cast<std::size_t>(H), 0);
    qlength_.assign(static_cast<std::size_t>(H), 0);
  }

 public:

  // ---- sizes --------------------------------------------------------------------------------
  storage kind() const { return cfg_.kind; }
  const cache_config& config() const { return cfg_; }
  std::int64_t num_heads() const { return cfg_.Hkv; }
  std::int64_t capacity() const { return cfg_.capacity; }
  std::int64_t head_dim() const { return cfg_.D; }
  std::int64_t value_dim() const { return cfg_.Dv; }
  // Whether keys (values) are stored rotated, and their rotation (dim() = 0 when not).
  bool rotates_keys() const { return krot_.dim() > 0; }
  bool rotates_values() const { return vrot_.dim() > 0; }
  const hadamard_rotation& key_rotation() const { return krot_; }
  const hadamard_rotation& value_rotation() const { return vrot_; }
  std::int64_t length(std::int64_t h) const { return length_[check_head("kvcache::layer_cache::length", h)]; }
  const std::vector<std::int64_t>& lengths() const { return length_; }
  std::int64_t max_length() const { return *std::max_element(length_.begin(), length_.end()); }
  std::int64_t total_length() const {
    std::int64_t n = 0;
    for (std::int64_t l : length_) n += l;
    return n;
  }
  // Position the next append without explicit positions gives its first token.
  std::int64_t next_position() const { return next_position_; }
  // Positions are below this (so next_position() = the largest + 1 fits in std::int64_t).
  static constexpr std::int64_t max_position = std::numeric_limits<std::int64_t>::max();

  // Original positions of head h's slots [length(h)].
  std::span<const std::int64_t> positions(std::int64_t h) const {
    const std::size_t i = check_head("kvcache::layer_cache::positions", h);
    return {pos_.data() + h * cfg_.capacity, static_cast<std::size_t>(length_[i])};
  }
  // Positions the keys of head h are rotated to [length(h)] (kvcache/rope.hpp).
  std::span<const std::int64_t> rotary_positions(std::int64_t h) const {
    const std::size_t i = check_head("kvcache::layer_cache::rotary_positions", h);
    return {rot_.data() + h * cfg_.capacity, static_cast<std::size_t>(length_[i])};
  }

  // ---- append -------------------------------------------------------------------------------

  // Appends n tokens to every kv head at positions next_position() .. + n.
  template <class Arch = simd::default_arch>
  void append(view<const float, 3> k,  // [Hkv, n, D]
              view<const float, 3> v) {  // [Hkv, n, Dv]
    const std::int64_t n = k.extent(1);
    detail::require(n <= max_position - next_position_, "kvcache::layer_cache::append: n = ", n,
                    " tokens at next_position() = ", next_position_, " pass the largest position ", max_position);
    std::vector<std::int64_t> p(static_cast<std::size_t>(std::max<std::int64_t>(n, 0)));
    for (std::size_t i = 0; i < p.size(); ++i) p[i] = next_position_ + static_cast<std::int64_t>(i);
    append<Arch>(k, v, p);
  }

  // Appends n tokens with the given original positions to every kv head.
  template <class Arch = simd::default_arch>
  void append(view<const float, 3> k,  // [Hkv, n, D]
              view<const float, 3> v,  // [Hkv, n, Dv]
              std::span<const std::int64_t> positions) {  // [n]
    constexpr const char* fn = "kvcache::layer_cache::append";
    using detail::require;
    require(cfg_.capacity >= 1, fn, ": the cache is not configured (default-constructed layer_cache)");
    detail::require_data(fn, "k", k, " [Hkv, n, D]");
    detail::require_data(fn, "v", v, " [Hkv, n, Dv]");
    const std::int64_t n = k.extent(1);
    detail::require_shape(fn, "k", k, {cfg_.Hkv, n, cfg_.D}, " [Hkv, n, D] (Hkv, D from the cache)");
    detail::require_shape(fn, "v", v, {cfg_.Hkv, n, cfg_.Dv}, " [Hkv, n, Dv] (n from k)");
    require(static_cast<std::int64_t>(positions.size()) == n, fn, ": positions must have n = ", n,
            " entries, got ", positions.size());
    for (std::size_t t = 0; t < positions.size(); ++t)  // next_position() = the largest + 1 must fit
      require(positions[t] < max_position, fn, ": positions[", t, "] must be < ", max_position,
              " (next_position() is the largest position + 1), got ", positions[t]);
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h)
      require(n <= cfg_.capacity - length_[static_cast<std::size_t>(h)], fn, ": kv head ", h, " holds ",
              length_[static_cast<std::size_t>(h)], " tokens; ", n, " more exceed the capacity ", cfg_.capacity,
              " (compact first)");
    if (is_quantized(cfg_.kind)) quant::require_quantizable(fn, k, v);
    require_rotatable(fn, k, v);
    if (n == 0) return;
    std::vector<float> kr(static_cast<std::size_t>(rotates_keys() ? cfg_.D : 0));
    std::vector<float> vr(static_cast<std::size_t>(rotates_values() ? cfg_.Dv : 0));
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) {
      for (std::int64_t t = 0; t < n; ++t) {
        const std::int64_t slot = length_[static_cast<std::size_t>(h)];
        pos_(h, slot) = positions[static_cast<std::size_t>(t)];
        rot_(h, slot) = positions[static_cast<std::size_t>(t)];
        write_slot<Arch>(h, slot, rotated(krot_, k.ptr(h, t), kr), rotated(vrot_, v.ptr(h, t), vr));
        ++length_[static_cast<std::size_t>(h)];
        if (is_quantized(cfg_.kind) && residual_length(h) == cfg_.quant.residual) flush<Arch>(h);
      }
    }
    next_position_ = std::max(next_position_, *std::max_element(positions.begin(), positions.end()) + 1);
  }

  // Empties every head (the allocation stays).
  void clear() {
    std::fill(length_.begin(), length_.end(), 0);
    std::fill(qlength_.begin(), qlength_.end(), 0);
    for (auto& g : glen_) g.clear();
    for (auto& s : kscale_) s.clear();
    for (auto& s : kmin_) s.clear();
    next_position_ = 0;
  }

  // ---- gather -------------------------------------------------------------------------------

  // Rows i of k and v: the (dequantized) key and value of head h's slot slots[i].
  template <class Arch = simd::default_arch>
  void gather(std::int64_t h, std::span<const std::int64_t> slots,
              view<float, 2> k,        // [n, D]
              view<float, 2> v) const {  // [n, Dv]
    constexpr const char* fn = "kvcache::layer_cache::gather";
    const std::size_t hi = check_head(fn, h);
    const std::int64_t n = static_cast<std::int64_t>(slots.size());
    detail::require_data(fn, "k", k, " [slots.size(), D]");
    detail::require_data(fn, "v", v, " [slots.size(), Dv]");
    detail::require_shape(fn, "k", k, {n, cfg_.D}, " [slots.size(), D]");
    detail::require_shape(fn, "v", v, {n, cfg_.Dv}, " [slots.size(), Dv]");
    for (std::int64_t i = 0; i < n; ++i)
      detail::require(slots[static_cast<std::size_t>(i)] >= 0 && slots[static_cast<std::size_t>(i)] < length_[hi], fn,
                      ": slots[", i, "] must be in [0, ", length_[hi], ") (length of head ", h, "), got ",
                      slots[static_cast<std::size_t>(i)]);
    std::vector<std::int64_t> start = group_starts(h);
    for (std::int64_t i = 0; i < n; ++i) read_slot<Arch>(h, slots[static_cast<std::size_t>(i)], start, k.ptr(i), v.ptr(i));
  }

  // Every head's keys, dequantized: [Hkv, max_length(), D], rows past length(h) zero.
  template <class Arch = simd::default_arch>
  tensor<float, 3> keys() const {
    return dense_copy<Arch>(true);
  }
  // Every head's values, dequantized: [Hkv, max_length(), Dv], rows past length(h) zero.
  template <class Arch = simd::default_arch>
  tensor<float, 3> values() const {
    return dense_copy<Arch>(false);
  }

  // ---- compaction ---------------------------------------------------------------------------

  // Keeps, in every head h, exactly the slots sel.heads[h] (ascending), moved to the front in
  // order; their keys, values, positions (and quantization groups) move together.
  void compact(const selection& sel) {
    validate("kvcache::layer_cache::compact", sel, length_);
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) {
      const auto& kept = sel.heads[static_cast<std::size_t>(h)];
      if (is_quantized(cfg_.kind)) compact_quantized(h, kept);
      else
        for (std::size_t i = 0; i < kept.size(); ++i) move_slot(h, kept[i], static_cast<std::int64_t>(i));
      length_[static_cast<std::size_t>(h)] = static_cast<std::int64_t>(kept.size());
    }
  }

  // ---- rewriting keys (kvcache/rope.hpp re-rotation) ------------------------------------------

  // Replaces every key of head h by k [length(h), D] and records the positions they are rotated to.
  // Quantized kinds requantize each key group with its own range (one more rounding of scale / 2).
  template <class Arch = simd::default_arch>
  void set_keys(std::int64_t h, view<const float, 2> k,  // [length(h), D]
                std::span<const std::int64_t> rotary) {  // [length(h)]
    constexpr const char* fn = "kvcache::layer_cache::set_keys";
    const std::size_t hi = check_head(fn, h);
    detail::require(!k.empty() || length_[hi] == 0, fn, ": k must be a non-empty view");
    if (length_[hi] == 0) return;
    detail::require_shape(fn, "k", k, {length_[hi], cfg_.D}, " [length(h), D]");
    detail::require(static_cast<std::int64_t>(rotary.size()) == length_[hi], fn, ": rotary must have length(h) = ",
                    length_[hi], " entries, got ", rotary.size());
    if (is_quantized(cfg_.kind))
      for (std::int64_t j = 0; j < length_[hi]; ++j)
        for (std::int64_t c = 0; c < cfg_.D; ++c)
          detail::require(quant::quantizable(k(j, c)), fn, ": k must be finite with |k| <= ", quant::max_magnitude,
                          " (quant::max_magnitude) for quantized storage, got ", k(j, c), " at [", j, ", ", c, "]");
    require_rotatable(fn, view<const float, 3>(k.data(), {1, k.extent(0), k.extent(1)}, {0, k.stride(0), 1}), {});
    tensor<float, 2> kr;  // the rotated keys, when the cache rotates them
    if (rotates_keys()) {
      kr = tensor<float, 2>({length_[hi], cfg_.D});
      for (std::int64_t j = 0; j < length_[hi]; ++j) {
        std::memcpy(&kr(j, 0), k.ptr(j), static_cast<std::size_t>(cfg_.D) * sizeof(float));
        krot_.forward(&kr(j, 0));
      }
      k = kr.as_view();
    }
    for (std::int64_t j = 0; j < length_[hi]; ++j) rot_(h, j) = rotary[static_cast<std::size_t>(j)];
    switch (cfg_.kind) {
      case storage::f32: set_dense_keys<Arch>(kf_, h, k); break;
      case storage::f16: set_dense_keys<Arch>(kh_, h, k); break;
      case storage::bf16: set_dense_keys<Arch>(kb_, h, k); break;
      default: {
        const int bits = storage_bits(cfg_.kind);
        std::int64_t s = 0;
        for (std::size_t g = 0; g < glen_[hi].size(); ++g) {
          quant::reference::quantize_channels(k.ptr(s), k.stride(0), glen_[hi][g], cfg_.D, bits,
                                              kcodes_.data() + slot_offset(kcodes_, h, s), kcodes_.extent(2),
                                              kscale_[hi].data() + g * cfg_.D, kmin_[hi].data() + g * cfg_.D);
          s += glen_[hi][g];
        }
        for (std::int64_t j = s; j < length_[hi]; ++j) std::memcpy(&rk_(h, j - s, 0), k.ptr(j), cfg_.D * sizeof(float));
      }
    }
  }

  // ---- rewriting slots (kvcache/merge.hpp: merged tokens) ---------------------------------------

  // Replaces the keys (unless k is empty) and the values (unless v is empty) of head h's slots
  // `slots` (strictly ascending) by the rows of k [n, D] and v [n, Dv], n = slots.size(); positions
  // and rotary positions stay; a rotating cache stores the rows rotated, as append does. f16 / bf16
  // round to nearest even. int8 / int4 / int2: a quantized value row is requantized alone (its
  // per-token groups, as a flush would); every key group that holds a rewritten slot is requantized
  // over all its slots with the range of its new keys (so the group's other keys get one more
  // rounding of at most half a step); residual rows are stored as given.
  template <class Arch = simd::default_arch>
  void set_slots(std::int64_t h, std::span<const std::int64_t> slots,
                 view<const float, 2> k,    // [n, D] or empty: keys unchanged
                 view<const float, 2> v) {  // [n, Dv] or empty: values unchanged
    constexpr const char* fn = "kvcache::layer_cache::set_slots";
    const std::size_t hi = check_head(fn, h);
    const auto n = static_cast<std::int64_t>(slots.size());
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t s = slots[static_cast<std::size_t>(i)];
      detail::require(s >= 0 && s < length_[hi], fn, ": slots[", i, "] must be in [0, ", length_[hi], ") (length of head ",
                      h, "), got ", s);
      if (i > 0 && !(s > slots[static_cast<std::size_t>(i - 1)]))
        detail::fail(fn, ": slots must be strictly ascending: index ", i, " is ", s, " after ",
                     slots[static_cast<std::size_t>(i - 1)]);
    }
    if (!k.empty()) detail::require_shape(fn, "k", k, {n, cfg_.D}, " [slots.size(), D]");
    if (!v.empty()) detail::require_shape(fn, "v", v, {n, cfg_.Dv}, " [slots.size(), Dv]");
    if (is_quantized(cfg_.kind))
      for (int which = 0; which < 2; ++which) {
        const view<const float, 2>& x = which ? v : k;
        if (!x.empty())
          for (std::int64_t i = 0; i < n; ++i)
            for (std::int64_t c = 0; c < x.extent(1); ++c)
              detail::require(quant::quantizable(x(i, c)), fn, ": ", which ? "v" : "k", " must be finite with |",
                              which ? "v" : "k", "| <= ", quant::max_magnitude,
                              " (quant::max_magnitude) for quantized storage, got ", x(i, c), " at [", i, ", ", c, "]");
      }
    auto as_3d = [n](view<const float, 2> x, std::int64_t W) {  // [1, n, W] over the rows of x
      return x.empty() ? view<const float, 3>{} : view<const float, 3>(x.data(), {1, n, W}, {0, x.stride(0), 1});
    };
    require_rotatable(fn, as_3d(k, cfg_.D), as_3d(v, cfg_.Dv));
    if (n == 0) return;
    const std::int64_t D = cfg_.D, Dv = cfg_.Dv;
    tensor<float, 2> kr, vr;  // the rows rotated, when the cache stores them rotated
    if (rotates_keys() && !k.empty()) {
      kr = tensor<float, 2>({n, D});
      for (std::int64_t i = 0; i < n; ++i) {
        std::memcpy(&kr(i, 0), k.ptr(i), static_cast<std::size_t>(D) * sizeof(float));
        krot_.forward(&kr(i, 0));
      }
      k = kr.as_view();
    }
    if (rotates_values() && !v.empty()) {
      vr = tensor<float, 2>({n, Dv});
      for (std::int64_t i = 0; i < n; ++i) {
        std::memcpy(&vr(i, 0), v.ptr(i), static_cast<std::size_t>(Dv) * sizeof(float));
        vrot_.forward(&vr(i, 0));
      }
      v = vr.as_view();
    }
    auto put = [&]<class T>(tensor<T, 3>& kt, tensor<T, 3>& vt) {
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t s = slots[static_cast<std::size_t>(i)];
        if (!k.empty()) simd::convert<Arch>(k.ptr(i), kt.data() + slot_offset(kt, h, s), D);
        if (!v.empty()) simd::convert<Arch>(v.ptr(i), vt.data() + slot_offset(vt, h, s), Dv);
      }
    };
    switch (cfg_.kind) {
      case storage::f32: put(kf_, vf_); return;
      case storage::f16: put(kh_, vh_); return;
      case storage::bf16: put(kb_, vb_); return;
      default: break;
    }
    const int bits = storage_bits(cfg_.kind);
    const std::int64_t nq = qlength_[hi], NG = value_groups();
    if (!v.empty()) {
      std::vector<float> scale(static_cast<std::size_t>(NG)), min(static_cast<std::size_t>(NG));
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t s = slots[static_cast<std::size_t>(i)];
        if (s >= nq) {
          std::memcpy(&rv_(h, s - nq, 0), v.ptr(i), static_cast<std::size_t>(Dv) * sizeof(float));
          continue;
        }
        quant::reference::quantize_token(v.ptr(i), Dv, cfg_.quant.value_group, bits,
                                         vcodes_.data() + slot_offset(vcodes_, h, s), scale.data(), min.data());
        for (std::int64_t g = 0; g < NG; ++g) {
          vscale_(h, g, s) = scale[static_cast<std::size_t>(g)];
          vmin_(h, g, s) = min[static_cast<std::size_t>(g)];
        }
      }
    }
    if (!k.empty()) {
      const std::vector<std::int64_t> start = group_starts(h);
      std::vector<float> rows, other(static_cast<std::size_t>(Dv));
      std::size_t i = 0;
      for (std::size_t g = 0; g + 1 < start.size(); ++g) {  // the key groups holding a rewritten slot
        const std::int64_t s0 = start[g], s1 = start[g + 1];
        if (i == slots.size() || slots[i] >= s1) continue;
        rows.resize(static_cast<std::size_t>((s1 - s0) * D));
        for (std::int64_t s = s0; s < s1; ++s) {
          float* row = rows.data() + (s - s0) * D;
          if (i < slots.size() && slots[i] == s)
            std::memcpy(row, k.ptr(static_cast<std::int64_t>(i++)), static_cast<std::size_t>(D) * sizeof(float));
          else
            read_stored_slot<Arch>(h, s, start, row, other.data());  // as stored: rotated with the cache
        }
        quant::reference::quantize_channels(rows.data(), D, s1 - s0, D, bits, kcodes_.data() + slot_offset(kcodes_, h, s0),
                                            kcodes_.extent(2), kscale_[hi].data() + static_cast<std::int64_t>(g) * D,
                                            kmin_[hi].data() + static_cast<std::int64_t>(g) * D);
      }
      for (; i < slots.size(); ++i)  // residual rows
        std::memcpy(&rk_(h, slots[i] - nq, 0), k.ptr(static_cast<std::int64_t>(i)),
                    static_cast<std::size_t>(D) * sizeof(float));
    }
  }

  // ---- memory -------------------------------------------------------------------------------

  // Bytes the stored tokens occupy (see the header: codes, scales, minimums, residual rows).
  std::int64_t bytes() const {
    std::int64_t total = 0;
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) total += head_bytes(h);
    return total;
  }
  // Bytes of head h's tokens.
  std::int64_t head_bytes(std::int64_t h) const {
    const std::size_t hi = check_head("kvcache::layer_cache::head_bytes", h);
    const std::int64_t D = cfg_.D, Dv = cfg_.Dv, len = length_[hi];
    constexpr auto f = static_cast<std::int64_t>(sizeof(float));
    switch (cfg_.kind) {
      case storage::f32: return len * (D + Dv) * f;
      case storage::f16:
      case storage::bf16: return len * (D + Dv) * static_cast<std::int64_t>(sizeof(f16));
      default: {
        const std::int64_t nq = qlength_[hi], groups = static_cast<std::int64_t>(glen_[hi].size());
        return nq * (kcodes_.extent(2) + vcodes_.extent(2) + 2 * value_groups() * f) + groups * 2 * D * f +
               (len - nq) * (D + Dv) * f;
      }
    }
  }
  // Bytes allocated for K/V (at full capacity, with the quantized kinds' key groups counted as
  // allocated so far), excluding positions.
  std::int64_t allocated_bytes() const {
    std::int64_t groups = 0;
    for (const auto& s : kscale_) groups += static_cast<std::int64_t>(s.capacity()) * 2;
    return static_cast<std::int64_t>(kf_.bytes() + vf_.bytes() + kh_.bytes() + vh_.bytes() + kb_.bytes() + vb_.bytes() +
                                     kcodes_.bytes() + vcodes_.bytes() + vscale_.bytes() + vmin_.bytes() + rk_.bytes() +
                                     rv_.bytes()) +
           groups * static_cast<std::int64_t>(sizeof(float));
  }

  // ---- raw storage, for kernels (kvcache/decode.hpp) -------------------------------------------

  // f32 / f16 / bf16: K [Hkv, capacity, D], V [Hkv, capacity, Dv]; throws unless kind() stores T.
  template <class T>
  view<const T, 3> dense_keys() const {
    require_kind<T>("kvcache::layer_cache::dense_keys");
    return dense<T>(true).as_view();
  }
  template <class T>
  view<const T, 3> dense_values() const {
    require_kind<T>("kvcache::layer_cache::dense_values");
    return dense<T>(false).as_view();
  }

  // int8 / int4 (empty views and spans otherwise).
  std::int64_t quantized_length(std::int64_t h) const {
    return qlength_[check_head("kvcache::layer_cache::quantized_length", h)];
  }
  std::int64_t residual_length(std::int64_t h) const { return length(h) - quantized_length(h); }
  std::int64_t value_groups() const { return (cfg_.Dv + cfg_.quant.value_group - 1) / cfg_.quant.value_group; }
  view<const std::uint8_t, 3> key_codes() const { return kcodes_.as_view(); }    // [Hkv, capacity, row_bytes(D)]
  view<const std::uint8_t, 3> value_codes() const { return vcodes_.as_view(); }  // [Hkv, capacity, row_bytes(Dv)]
  view<const float, 3> value_scales() const { return vscale_.as_view(); }        // [Hkv, value_groups, capacity]
  view<const float, 3> value_mins() const { return vmin_.as_view(); }            // [Hkv, value_groups, capacity]
  view<const float, 3> residual_keys() const { return rk_.as_view(); }           // [Hkv, residual, D]
  view<const float, 3> residual_values() const { return rv_.as_view(); }         // [Hkv, residual, Dv]
  // Lengths of head h's key groups (they tile [0, quantized_length(h)) in order).
  std::span<const std::int64_t> key_group_lengths(std::int64_t h) const {
    return glen_.empty() ? std::span<const std::int64_t>{} : glen_[check_head("kvcache::layer_cache::key_group_lengths", h)];
  }
  // Per key group, per channel: [groups, D] row-major.
  std::span<const float> key_scales(std::int64_t h) const {
    return kscale_.empty() ? std::span<const float>{} : kscale_[check_head("kvcache::layer_cache::key_scales", h)];
  }
  std::span<const float> key_mins(std::int64_t h) const {
    return kmin_.empty() ? std::span<const float>{} : kmin_[check_head("kvcache::layer_cache::key_mins", h)];
  }

 private:
  std::size_t check_head(const char* fn, std::int64_t h) const {
    detail::require(h >= 0 && h < cfg_.Hkv, fn, ": kv head h must be in [0, ", cfg_.Hkv, "), got ", h);
    return static_cast<std::size_t>(h);
  }

  template <class T>
  void require_kind(const char* fn) const {
    detail::require(cfg_.kind == storage_of<T> && !is_quantized(cfg_.kind), fn, ": the cache stores ",
                    storage_name(cfg_.kind), ", not ", storage_name(storage_of<T>));
  }

  template <class T>
  const tensor<T, 3>& dense(bool key) const {
    if constexpr (std::is_same_v<T, float>) return key ? kf_ : vf_;
    else if constexpr (std::is_same_v<T, f16>) return key ? kh_ : vh_;
    else return key ? kb_ : vb_;
  }
  template <class T>
  tensor<T, 3>& dense(bool key) {
    return const_cast<tensor<T, 3>&>(static_cast<const layer_cache*>(this)->dense<T>(key));
  }

  template <class T>
  static std::int64_t slot_offset(const tensor<T, 3>& t, std::int64_t h, std::int64_t slot) {
    return (h * t.extent(1) + slot) * t.extent(2);
  }

  // Start slot of every key group of head h, plus quantized_length(h) at the end.
  std::vector<std::int64_t> group_starts(std::int64_t h) const {
    std::vector<std::int64_t> start(1, 0);
    if (!glen_.empty())
      for (std::int64_t l : glen_[static_cast<std::size_t>(h)]) start.push_back(start.back() + l);
    return start;
  }

  // A new token's k [D], v [Dv] into `slot` (the next one) of head h.
  template <class Arch>
  void write_slot(std::int64_t h, std::int64_t slot, const float* k, const float* v) {
    const std::int64_t D = cfg_.D, Dv = cfg_.Dv;
    auto put = [&]<class T>(tensor<T, 3>& kt, tensor<T, 3>& vt) {
      simd::convert<Arch>(k, kt.data() + slot_offset(kt, h, slot), D);
      simd::convert<Arch>(v, vt.data() + slot_offset(vt, h, slot), Dv);
    };
    switch (cfg_.kind) {
      case storage::f32: put(kf_, vf_); break;
      case storage::f16: put(kh_, vh_); break;
      case storage::bf16: put(kb_, vb_); break;
      default: {
        const std::int64_t r = slot - qlength_[static_cast<std::size_t>(h)];
        std::memcpy(&rk_(h, r, 0), k, D * sizeof(float));
        std::memcpy(&rv_(h, r, 0), v, Dv * sizeof(float));
      }
    }
  }

  // The oldest key_group residual tokens of head h become one quantized group.
  template <class Arch>
  void flush(std::int64_t h) {
    const std::size_t hi = static_cast<std::size_t>(h);
    const std::int64_t G = cfg_.quant.key_group, D = cfg_.D, Dv = cfg_.Dv, nq = qlength_[hi];
    const std::int64_t VG = cfg_.quant.value_group;
    kscale_[hi].resize(kscale_[hi].size() + static_cast<std::size_t>(D));
    kmin_[hi].resize(kmin_[hi].size() + static_cast<std::size_t>(D));
    glen_[hi].push_back(G);
    const int bits = storage_bits(cfg_.kind);
    quant::reference::quantize_channels(&rk_(h, 0, 0), D, G, D, bits, kcodes_.data() + slot_offset(kcodes_, h, nq),
                                        kcodes_.extent(2), kscale_[hi].data() + kscale_[hi].size() - D,
                                        kmin_[hi].data() + kmin_[hi].size() - D);
    const std::int64_t NG = value_groups();
    std::vector<float> scale(static_cast<std::size_t>(NG)), min(static_cast<std::size_t>(NG));
    for (std::int64_t t = 0; t < G; ++t) {
      std::uint8_t* codes = vcodes_.data() + slot_offset(vcodes_, h, nq + t);
      switch (bits) {
        case 8: quant::quantize_token<Arch, 8>(&rv_(h, t, 0), Dv, VG, codes, scale.data(), min.data()); break;
        case 4: quant::quantize_token<Arch, 4>(&rv_(h, t, 0), Dv, VG, codes, scale.data(), min.data()); break;
        default: quant::quantize_token<Arch, 2>(&rv_(h, t, 0), Dv, VG, codes, scale.data(), min.data());
      }
      for (std::int64_t g = 0; g < NG; ++g) {
        vscale_(h, g, nq + t) = scale[static_cast<std::size_t>(g)];
        vmin_(h, g, nq + t) = min[static_cast<std::size_t>(g)];
      }
    }
    const std::int64_t rest = length_[hi] - nq - G;
    if (rest > 0) {  // &rk_(h, G, 0) is one past the window when residual == key_group
      std::memmove(&rk_(h, 0, 0), &rk_(h, G, 0), static_cast<std::size_t>(rest * D) * sizeof(float));
      std::memmove(&rv_(h, 0, 0), &rv_(h, G, 0), static_cast<std::size_t>(rest * Dv) * sizeof(float));
    }
    qlength_[hi] = nq + G;
  }

  // Head h's slot into k [D], v [Dv] as f32, rotated back; start = group_starts(h).
  template <class Arch>
  void read_slot(std::int64_t h, std::int64_t slot, const std::vector<std::int64_t>& start, float* k, float* v) const {
    read_stored_slot<Arch>(h, slot, start, k, v);
    if (rotates_keys()) krot_.inverse(k);
    if (rotates_values()) vrot_.inverse(v);
  }

  // Head h's slot into k [D], v [Dv] as f32, as stored (rotated when the cache rotates).
  template <class Arch>
  void read_stored_slot(std::int64_t h, std::int64_t slot, const std::vector<std::int64_t>& start, float* k,
                        float* v) const {
    const std::int64_t D = cfg_.D, Dv = cfg_.Dv;
    auto get = [&]<class T>(const tensor<T, 3>& kt, const tensor<T, 3>& vt) {
      simd::convert<Arch>(kt.data() + slot_offset(kt, h, slot), k, D);
      simd::convert<Arch>(vt.data() + slot_offset(vt, h, slot), v, Dv);
    };
    switch (cfg_.kind) {
      case storage::f32: get(kf_, vf_); break;
      case storage::f16: get(kh_, vh_); break;
      case storage::bf16: get(kb_, vb_); break;
      default: {
        const std::size_t hi = static_cast<std::size_t>(h);
        const std::int64_t nq = qlength_[hi];
        if (slot >= nq) {
          std::memcpy(k, &rk_(h, slot - nq, 0), D * sizeof(float));
          std::memcpy(v, &rv_(h, slot - nq, 0), Dv * sizeof(float));
          return;
        }
        const int bits = storage_bits(cfg_.kind);
        const auto g = static_cast<std::int64_t>(std::upper_bound(start.begin(), start.end(), slot) - start.begin()) - 1;
        quant::reference::dequantize_channels(kcodes_.data() + slot_offset(kcodes_, h, slot), D, bits,
                                              kscale_[hi].data() + g * D, kmin_[hi].data() + g * D, k);
        const std::uint8_t* codes = vcodes_.data() + slot_offset(vcodes_, h, slot);
        const std::int64_t VG = cfg_.quant.value_group;
        for (std::int64_t c = 0; c < Dv; ++c)  // reference::dequantize_token with this slot's [NG] column
          v[c] = quant::decode_value(quant::get_code(codes, bits, c), vmin_(h, c / VG, slot), vscale_(h, c / VG, slot));
      }
    }
  }

  template <class Arch>
  tensor<float, 3> dense_copy(bool key) const {
    const std::int64_t W = key ? cfg_.D : cfg_.Dv;
    tensor<float, 3> out({cfg_.Hkv, max_length(), W});
    std::vector<float> other(static_cast<std::size_t>(key ? cfg_.Dv : cfg_.D));
    for (std::int64_t h = 0; h < cfg_.Hkv; ++h) {
      const std::vector<std::int64_t> start = group_starts(h);
      for (std::int64_t j = 0; j < length_[static_cast<std::size_t>(h)]; ++j) {
        float* row = &out(h, j, 0);
        if (key) read_slot<Arch>(h, j, start, row, other.data());
        else read_slot<Arch>(h, j, start, other.data(), row);
      }
    }
    return out;
  }

  // Dense kinds: slot `from` of head h to slot `to` <= from (rows never overlap).
  void move_slot(std::int64_t h, std::int64_t from, std::int64_t to) {
    if (from == to) return;
    pos_(h, to) = pos_(h, from);
    rot_(h, to) = rot_(h, from);
    auto mv = [&]<class T>(tensor<T, 3>& t) {
      std::memcpy(t.data() + slot_offset(t, h, to), t.data() + slot_offset(t, h, from),
                  static_cast<std::size_t>(t.extent(2)) * sizeof(T));
    };
    switch (cfg_.kind) {
      case storage::f32: mv(kf_), mv(vf_); break;
      case storage::f16: mv(kh_), mv(vh_); break;
      case storage::bf16: mv(kb_), mv(vb_); break;
      default:
        mv(kcodes_), mv(vcodes_);
        for (std::int64_t g = 0; g < vscale_.extent(1); ++g) {
          vscale_(h, g, to) = vscale_(h, g, from);
          vmin_(h, g, to) = vmin_(h, g, from);
        }
    }
  }

  // Quantized kinds: kept slots of each key group stay in that group (its scale/min unchanged);
  // empty groups are dropped; kept residual rows move to the front of the residual window.
  void compact_quantized(std::int64_t h, const std::vector<std::int64_t>& kept) {
    const std::size_t hi = static_cast<std::size_t>(h);
    const std::int64_t D = cfg_.D, nq = qlength_[hi];
    std::size_t i = 0;
    std::int64_t dst = 0, start = 0, groups = 0;
    for (std::size_t g = 0; g < glen_[hi].size(); ++g) {
      const std::int64_t end = start + glen_[hi][g];
      std::int64_t count = 0;
      for (; i < kept.size() && kept[i] < end; ++i, ++count) move_slot(h, kept[i], dst++);
      if (count > 0) {
        if (groups != static_cast<std::int64_t>(g)) {
          std::memcpy(kscale_[hi].data() + groups * D, kscale_[hi].data() + g * D, D * sizeof(float));
          std::memcpy(kmin_[hi].data() + groups * D, kmin_[hi].data() + g * D, D * sizeof(float));
        }
        glen_[hi][static_cast<std::size_t>(groups++)] = count;
      }
      start = end;
    }
    glen_[hi].resize(static_cast<std::size_t>(groups));
    kscale_[hi].resize(static_cast<std::size_t>(groups * D));
    kmin_[hi].resize(static_cast<std::size_t>(groups * D));
    qlength_[hi] = dst;
    for (std::int64_t r = 0; i < kept.size(); ++i, ++r) {  // residual slots: row kept[i] - nq -> row r
      const std::int64_t from = kept[i] - nq, to_slot = dst + r;
      pos_(h, to_slot) = pos_(h, kept[i]);
      rot_(h, to_slot) = rot_(h, kept[i]);
      if (from != r) {
        std::memcpy(&rk_(h, r, 0), &rk_(h, from, 0), D * sizeof(float));
        std::memcpy(&rv_(h, r, 0), &rv_(h, from, 0), cfg_.Dv * sizeof(float));
      }
    }
  }

  template <class Arch, class T>
  void set_dense_keys(tensor<T, 3>& kt, std::int64_t h, view<const float, 2> k) {
    for (std::int64_t j = 0; j < k.extent(0); ++j) simd::convert<Arch>(k.ptr(j), kt.data() + slot_offset(kt, h, j), cfg_.D);
  }

  // With rotation, every kind takes |x| <= quant::max_magnitude / (the Hadamard block) only: then
  // neither the transform nor its inverse overflows (kvcache/rotation.hpp), and the rotated rows
  // stay within what the quantizers take. k [Hkv, n, D], v [Hkv, n, Dv] (may be empty).
  void require_rotatable(const char* fn, view<const float, 3> k, view<const float, 3> v) const {
    if (rotates_keys())
      quant::require_bounded(fn, "k", k, rotation_max_magnitude(quant::max_magnitude, krot_.block()),
                             " (quant::max_magnitude / the Hadamard block of D) for rotated storage");
    if (rotates_values() && !v.empty())
      quant::require_bounded(fn, "v", v, rotation_max_magnitude(quant::max_magnitude, vrot_.block()),
                             " (quant::max_magnitude / the Hadamard block of Dv) for rotated storage");
  }

  // x [r.dim()] rotated into buf, or x itself when r is not set.
  static const float* rotated(const hadamard_rotation& r, const float* x, std::vector<float>& buf) {
    if (r.dim() == 0) return x;
    std::copy_n(x, r.dim(), buf.data());
    r.forward(buf.data());
    return buf.data();
  }

  cache_config cfg_{};
  hadamard_rotation krot_, vrot_;               // dim() = 0: not rotated
  std::vector<std::int64_t> length_, qlength_;  // [Hkv] tokens held, of which quantized
  std::int64_t next_position_ = 0;
  tensor<std::int64_t, 2> pos_, rot_;  // [Hkv, capacity]
  tensor<float, 3> kf_, vf_;
  tensor<f16, 3> kh_, vh_;
  tensor<bf16, 3> kb_, vb_;
  tensor<std::uint8_t, 3> kcodes_, vcodes_;               // [Hkv, capacity, row bytes]
  tensor<float, 3> vscale_, vmin_;                        // [Hkv, value_groups, capacity]
  tensor<float, 3> rk_, rv_;                              // [Hkv, residual, D / Dv]
  std::vector<std::vector<float>> kscale_, kmin_;         // [Hkv][groups * D]
  std::vector<std::vector<std::int64_t>> glen_;           // [Hkv][groups]
};

// The caches of every layer of a model (one layer_cache each, the same configuration).
class cache {
 public:
  cache() = default;
  cache(std::int64_t layers, const cache_config& cfg) {
    detail::require(layers >= 1, "kvcache::cache: layers must be >= 1, got ", layers);
    layers_.reserve(static_cast<std::size_t>(layers));
    for (std::int64_t l = 0; l < layers; ++l) layers_.emplace_back(cfg);
  }
  std::int64_t num_layers() const { return static_cast<std::int64_t>(layers_.size()); }
  layer_cache& layer(std::int64_t l) { return layers_[check(l)]; }
  const layer_cache& layer(std::int64_t l) const { return layers_[check(l)]; }
  layer_cache& operator[](std::int64_t l) { return layer(l); }
  const layer_cache& operator[](std::int64_t l) const { return layer(l); }
  std::int64_t bytes() const {
    std::int64_t b = 0;
    for (const auto& c : layers_) b += c.bytes();
    return b;
  }

 private:
  std::size_t check(std::int64_t l) const {
    detail::require(l >= 0 && l < num_layers(), "kvcache::cache::layer: l must be in [0, ", num_layers(), "), got ", l);
    return static_cast<std::size_t>(l);
  }
  std::vector<layer_cache> layers_;
};

}  // namespace mnemo::kvcache
