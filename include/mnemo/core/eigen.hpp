// mnemo/core/eigen.hpp — views over Eigen matrices, maps and refs (no copy).
//
// A row-major Eigen object becomes view<T, 2> {rows, cols}. A column-major one has its
// contiguous dimension along rows, so it becomes the transposed view {cols, rows}: element
// (c, r) of the view is m(r, c). A vector becomes view<T, 1>. The innermost stride must be 1.
//
//   Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> m(37, 64);
//   mnemo::view<float, 2> v = mnemo::as_view(m);   // [37, 64]
#pragma once

#include <Eigen/Core>
#include <type_traits>

#include "mnemo/core/tensor.hpp"

namespace mnemo {

template <class Derived>
auto as_view(Eigen::PlainObjectBase<Derived>& m) {
  using T = typename Derived::Scalar;
  if constexpr (Derived::IsVectorAtCompileTime) {
    return view<T, 1>(m.data(), {m.size()});
  } else if constexpr (Derived::IsRowMajor) {
    return view<T, 2>(m.data(), {m.rows(), m.cols()});
  } else {
    return view<T, 2>(m.data(), {m.cols(), m.rows()});
  }
}

template <class Derived>
auto as_view(const Eigen::PlainObjectBase<Derived>& m) {
  using T = const typename Derived::Scalar;
  if constexpr (Derived::IsVectorAtCompileTime) {
    return view<T, 1>(m.data(), {m.size()});
  } else if constexpr (Derived::IsRowMajor) {
    return view<T, 2>(m.data(), {m.rows(), m.cols()});
  } else {
    return view<T, 2>(m.data(), {m.cols(), m.rows()});
  }
}

// Eigen::Map and Eigen::Ref (any strides whose inner stride is 1). A Map's constness is
// shallow, as in Eigen: a writable map (even a temporary one) gives a writable view, a map of
// const data gives a view of const.
template <class Derived>
auto as_view(const Eigen::MapBase<Derived, Eigen::ReadOnlyAccessors>& m) {
  using Plain = typename Derived::Scalar;
  using Scalar = std::conditional_t<bool(Eigen::internal::is_lvalue<Derived>::value), Plain, const Plain>;
  detail::require(m.innerStride() == 1, "as_view: the Eigen object's inner stride must be 1, got ",
                  m.innerStride());
  if constexpr (Derived::IsVectorAtCompileTime) {
    return view<Scalar, 1>(const_cast<Scalar*>(m.data()), {m.size()});
  } else if constexpr (Derived::IsRowMajor) {
    return view<Scalar, 2>(const_cast<Scalar*>(m.data()), {m.rows(), m.cols()}, {m.outerStride(), 1});
  } else {
    return view<Scalar, 2>(const_cast<Scalar*>(m.data()), {m.cols(), m.rows()}, {m.outerStride(), 1});
  }
}

}  // namespace mnemo
