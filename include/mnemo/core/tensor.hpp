// mnemo/core/tensor.hpp — strided views and owning, 64-byte aligned tensors.
//
//   view<T, R>    non-owning, rank R <= 4, shape and strides in std::int64_t (element units).
//                 The innermost dimension is always contiguous (stride 1); the outer strides
//                 are free, so a [B, L, H, D] buffer is read as [B, H, L, D] through
//                 `permute({0, 2, 1, 3})` without a copy.
//   tensor<T, R>  owning, row-major, zero-initialised, 64-byte aligned; converts to a view.
//
// A default-constructed view is empty (null data): entry points use that for "no such
// output" (for example an lse that the caller does not want). A zero-size tensor owns no buffer
// either, so a required argument with null data is accepted when it has no elements, exactly like
// a zero-size view of real memory (detail::require_data). overlaps() and same_view() state the
// aliasing rules of the entry points (docs/errors.md).
#pragma once

#include <algorithm>
#include <array>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include "mnemo/core/error.hpp"

namespace mnemo {

template <int R>
using shape_t = std::array<std::int64_t, R>;

// "[2, 8, 37, 64]"
template <std::size_t R>
std::string shape_string(const std::array<std::int64_t, R>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < R; ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

namespace detail {

// Bytes of a row-major array of `shape` with `item`-byte elements; throws mnemo::error naming
// `what` and the shape if the count does not fit in std::int64_t. The product of the non-zero
// extents must fit even when another extent is 0: strides multiply the inner extents.
template <std::size_t R>
std::int64_t checked_bytes(const char* what, const std::array<std::int64_t, R>& shape, std::size_t item) {
  std::int64_t n = static_cast<std::int64_t>(item);
  bool empty = false;
  for (std::size_t i = 0; i < R; ++i) {
    if (shape[i] == 0) {
      empty = true;
      continue;
    }
    if (__builtin_mul_overflow(n, shape[i], &n))
      fail(what, ": shape ", shape_string(shape), " of ", item, "-byte elements needs more than 2^63 bytes");
  }
  return empty ? 0 : n;
}

}  // namespace detail

// Row-major strides of a contiguous array of this shape.
template <std::size_t R>
constexpr std::array<std::int64_t, R> contiguous_strides(const std::array<std::int64_t, R>& shape) {
  std::array<std::int64_t, R> st{};
  std::int64_t acc = 1;
  for (std::size_t i = R; i-- > 0;) {
    st[i] = acc;
    acc *= shape[i];
  }
  return st;
}

template <class T, int R>
class view {
  static_assert(R >= 1 && R <= 4, "mnemo::view supports ranks 1 to 4");

 public:
  using value_type = T;
  static constexpr int rank = R;

  view() = default;

  // Contiguous row-major view of `shape` at `data`.
  view(T* data, shape_t<R> shape) : view(data, shape, contiguous_strides(shape)) {}

  // Strided view; strides are in elements, the innermost must be 1.
  view(T* data, shape_t<R> shape, shape_t<R> strides) : data_(data), shape_(shape), strides_(strides) {
    for (int i = 0; i < R; ++i)  // extents first: a negative extent also makes contiguous strides negative
      if (shape_[i] < 0)  // message built only on failure: views are made in kernels' outer loops
        detail::fail("view: shape[", i, "] must be >= 0, got ", shape_[i], " in shape ", shape_string(shape_));
    for (int i = 0; i < R; ++i)
      detail::require(strides_[i] >= 0, "view: stride[", i, "] must be >= 0, got ", strides_[i]);
    detail::require(strides_[R - 1] == 1, "view: innermost dimension must be contiguous: expected stride[",
                    R - 1, "] = 1, got ", strides_[R - 1]);
  }

  // view<T> -> view<const T>
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  view(const view<U, R>& other)  // NOLINT(google-explicit-constructor): mirrors T* -> const T*
      : data_(other.data()), shape_(other.shape()), strides_(other.strides()) {}

  T* data() const { return data_; }
  const shape_t<R>& shape() const { return shape_; }
  const shape_t<R>& strides() const { return strides_; }
  std::int64_t extent(int i) const { return shape_[i]; }
  std::int64_t stride(int i) const { return strides_[i]; }
  bool empty() const { return data_ == nullptr; }

  std::int64_t size() const {
    std::int64_t n = 1;
    for (auto e : shape_) n *= e;
    return n;
  }

  bool is_contiguous() const { return strides_ == contiguous_strides(shape_); }

  template <class... I>
  T* ptr(I... idx) const {
    static_assert(sizeof...(I) <= R, "view::ptr: more indices than the view's rank");
    std::int64_t off = 0;
    int d = 0;
    ((assert(static_cast<std::int64_t>(idx) >= 0 && static_cast<std::int64_t>(idx) < shape_[d]),
      off += static_cast<std::int64_t>(idx) * strides_[d++]),
     ...);
    return data_ + off;
  }

  template <class... I>
  T& operator()(I... idx) const {
    static_assert(sizeof...(I) == R, "view::operator(): give exactly one index per dimension");
    return *ptr(idx...);
  }

  // Drop the first dimension at index i: view<T, R-1>.
  view<T, (R > 1 ? R - 1 : 1)> operator[](std::int64_t i) const {
    static_assert(R > 1, "view::operator[] needs rank >= 2");
    assert(i >= 0 && i < shape_[0]);
    shape_t<(R > 1 ? R - 1 : 1)> s{}, st{};
    for (int d = 1; d < R; ++d) {
      s[d - 1] = shape_[d];
      st[d - 1] = strides_[d];
    }
    return {data_ + i * strides_[0], s, st};
  }

  // The sub-range [start, start + len) of dimension `dim`.
  view narrow(int dim, std::int64_t start, std::int64_t len) const {
    detail::require(dim >= 0 && dim < R, "view::narrow: dim must be in [0, ", R, "), got ", dim);
    // len <= extent - start, not start + len <= extent: the sum of two huge values overflows.
    if (start < 0 || len < 0 || start > shape_[dim] || len > shape_[dim] - start) {
      if (start >= 0 && len > std::numeric_limits<std::int64_t>::max() - start)
        detail::fail("view::narrow: range start ", start, " + len ", len, " overflows, out of bounds for extent ",
                     shape_[dim], " of dimension ", dim);
      detail::fail("view::narrow: range [", start, ", ", start + len, ") out of bounds for extent ", shape_[dim],
                   " of dimension ", dim);
    }
    view out = *this;
    out.data_ = data_ + start * strides_[dim];
    out.shape_[dim] = len;
    return out;
  }

  // Reorder dimensions: result dimension i is this view's dimension perm[i].
  // The innermost dimension must stay innermost (it is the contiguous one).
  view permute(std::array<int, R> perm) const {
    detail::require(perm[R - 1] == R - 1, "view::permute: the innermost dimension must stay last, got perm[",
                    R - 1, "] = ", perm[R - 1]);
    view out = *this;
    std::array<bool, R> seen{};
    for (int i = 0; i < R; ++i) {
      detail::require(perm[i] >= 0 && perm[i] < R && !seen[perm[i]], "view::permute: not a permutation");
      seen[perm[i]] = true;
      out.shape_[i] = shape_[perm[i]];
      out.strides_[i] = strides_[perm[i]];
    }
    return out;
  }

 private:
  T* data_ = nullptr;
  shape_t<R> shape_{};
  shape_t<R> strides_{};
};

// Owning, zero-initialised, 64-byte aligned, row-major.
template <class T, int R>
class tensor {
  static_assert(std::is_trivially_copyable_v<T>, "mnemo::tensor holds trivially copyable element types");

 public:
  static constexpr std::size_t alignment = 64;
  using value_type = T;
  static constexpr int rank = R;

  tensor() = default;
  explicit tensor(shape_t<R> shape) : shape_(shape) {
    for (int i = 0; i < R; ++i)
      detail::require(shape[i] >= 0, "tensor: shape[", i, "] must be >= 0, got ", shape[i]);
    allocate();
  }
  tensor(const tensor& o) : shape_(o.shape_) {
    allocate();
    if (size()) std::memcpy(data_, o.data_, bytes());
  }
  tensor(tensor&& o) noexcept : data_(std::exchange(o.data_, nullptr)), shape_(o.shape_) { o.shape_ = {}; }
  tensor& operator=(tensor o) noexcept {
    std::swap(data_, o.data_);
    std::swap(shape_, o.shape_);
    return *this;
  }
  ~tensor() { release(); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  const shape_t<R>& shape() const { return shape_; }
  std::int64_t extent(int i) const { return shape_[i]; }
  std::int64_t size() const {
    std::int64_t n = 1;
    for (auto e : shape_) n *= e;
    return n;
  }
  std::size_t bytes() const { return static_cast<std::size_t>(size()) * sizeof(T); }

  T* begin() { return data_; }
  T* end() { return data_ + size(); }
  const T* begin() const { return data_; }
  const T* end() const { return data_ + size(); }

  template <class... I>
  T& operator()(I... idx) {
    return data_[offset(idx...)];
  }
  template <class... I>
  const T& operator()(I... idx) const {
    return data_[offset(idx...)];
  }

  view<T, R> as_view() { return {data_, shape_}; }
  view<const T, R> as_view() const { return {data_, shape_}; }
  operator view<T, R>() { return as_view(); }              // NOLINT(google-explicit-constructor)
  operator view<const T, R>() const { return as_view(); }  // NOLINT(google-explicit-constructor)

 private:
  // Throws mnemo::error (never a null buffer) when the size overflows or the memory is not there.
  void allocate() {
    const std::int64_t n = detail::checked_bytes("tensor", shape_, sizeof(T));
    if (n == 0) return;
    const std::size_t rounded = (static_cast<std::size_t>(n) + alignment - 1) / alignment * alignment;
    try {
      data_ = static_cast<T*>(::operator new(rounded, std::align_val_t{alignment}));
    } catch (const std::bad_alloc&) {
      detail::fail("tensor: cannot allocate ", rounded, " bytes for shape ", shape_string(shape_));
    }
    std::memset(static_cast<void*>(data_), 0, rounded);
  }
  void release() {
    if (data_) ::operator delete(static_cast<void*>(data_), std::align_val_t{alignment});
    data_ = nullptr;
  }

  template <class... I>
  std::int64_t offset(I... idx) const {
    static_assert(sizeof...(I) == R, "tensor::operator(): give exactly one index per dimension");
    std::int64_t off = 0;
    int d = 0;
    ((assert(static_cast<std::int64_t>(idx) >= 0 && static_cast<std::int64_t>(idx) < shape_[d]),
      off = off * shape_[d++] + static_cast<std::int64_t>(idx)),
     ...);
    return off;
  }

  T* data_ = nullptr;
  shape_t<R> shape_{};
};

// A view of const elements of a tensor or a view: lets entry points accept either.
template <class T, int R>
view<const T, R> cview(const view<T, R>& v) {
  return v;
}
template <class T, int R>
view<const T, R> cview(const tensor<T, R>& t) {
  return t.as_view();
}

// Element type (without const) of anything cview accepts.
template <class X>
using element_t = std::remove_const_t<typename decltype(cview(std::declval<const X&>()))::value_type>;

// Whether two views share any memory: their byte ranges, from the first element to the end of
// the last, intersect. A null or zero-size view overlaps nothing. The test is on ranges, so two
// interleaved views of one buffer (q and k of a packed [B, L, 3, H, D] qkv tensor) overlap.
template <class A, int RA, class B, int RB>
bool overlaps(const view<A, RA>& a, const view<B, RB>& b) {
  auto range = [](const auto& v) -> std::pair<std::uintptr_t, std::uintptr_t> {
    if (v.data() == nullptr || v.size() == 0) return {0, 0};
    std::int64_t last = 0;
    for (int i = 0; i < std::remove_reference_t<decltype(v)>::rank; ++i) last += (v.extent(i) - 1) * v.stride(i);
    const auto first = reinterpret_cast<std::uintptr_t>(v.data());
    return {first, first + static_cast<std::uintptr_t>(last + 1) * sizeof(*v.data())};
  };
  const auto [a0, a1] = range(a);
  const auto [b0, b1] = range(b);
  return a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1;
}

// Whether two views are the same elements in the same order: one data pointer, shape and strides.
template <class A, class B, int R>
bool same_view(const view<A, R>& a, const view<B, R>& b) {
  return sizeof(A) == sizeof(B) && static_cast<const void*>(a.data()) == static_cast<const void*>(b.data()) &&
         a.shape() == b.shape() && a.strides() == b.strides();
}

namespace detail {

// Boundary check for an argument that must be there: a null view is accepted only when it has no
// elements (a zero-size tensor owns no buffer), so a zero-size tensor and a zero-size view of some
// memory follow one rule. `dims` names the dimensions, e.g. " [B, Hq, Lq, D]".
template <class T, int R>
void require_data(const char* fn, const char* name, const view<T, R>& v, const char* dims = "") {
  if (v.empty() && v.size() != 0)
    fail(fn, ": ", name, dims, " must be a view of memory, got a null view of shape ", shape_string(v.shape()));
}

// Boundary check of an aliasing rule: `a` and `b` must not share memory (overlaps() above).
// `note` may add what is allowed instead, e.g. "; out may be q itself (in place)".
template <class A, int RA, class B, int RB>
void require_disjoint(const char* fn, const char* name_a, const view<A, RA>& a, const char* name_b,
                      const view<B, RB>& b, const char* note = "") {
  if (overlaps(a, b))
    fail(fn, ": ", name_a, " ", shape_string(a.shape()), " and ", name_b, " ", shape_string(b.shape()),
         " must not overlap in memory, got overlapping views", note, " (docs/errors.md, aliasing)");
}

// Boundary check used by entry points: `name` has exactly `want` as its shape.
template <class T, int R>
void require_shape(const char* fn, const char* name, const view<T, R>& v, const std::type_identity_t<shape_t<R>>& want,
                   const char* dims = "") {
  if (v.shape() != want)  // the message is built only on failure: this runs on every kernel call
    detail::fail(fn, ": ", name, " must have shape ", shape_string(want), dims, ", got ", shape_string(v.shape()));
}

}  // namespace detail
}  // namespace mnemo
