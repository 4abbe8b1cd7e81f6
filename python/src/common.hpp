// python/src/common.hpp — what every binding TU shares: arrays in (zero copy) and out, the
// runtime mod, the GIL.
//
// Inputs. A NumPy array (any object with the buffer protocol that numpy sees as an ndarray) or a
// CPU torch tensor is read where it lies: its data pointer, shape and strides become a
// mnemo::view<T, R> without a copy and without a dtype conversion (no forcecast). Strides may be
// anything mnemo's views accept: non-negative, in whole elements, the innermost one 1 — so a
// [B, L, H, D] array transposed to [B, H, L, D] (np.transpose / torch.permute) is passed as it is.
// Anything else (wrong dtype, wrong rank, a non-contiguous innermost axis, a negative stride, a
// GPU tensor) raises mnemo.Error naming the function and the argument.
//
// Outputs are allocated as C-order NumPy arrays and returned; the attention entry points also take
// out= / lse= arrays (any accepted strides) and write them in place.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "mnemo/attention/mods.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/dispatch.hpp"

namespace mnemo::py {

namespace pyb = pybind11;

enum class dt { f32, f16, bf16, i64, u8, other };

inline const char* dt_name(dt d) {
  switch (d) {
    case dt::f32: return "float32";
    case dt::f16: return "float16";
    case dt::bf16: return "bfloat16";
    case dt::i64: return "int64";
    case dt::u8: return "uint8";
    default: return "another dtype";
  }
}

template <class T>
constexpr dt dt_of() {
  if constexpr (std::is_same_v<T, float>) return dt::f32;
  else if constexpr (std::is_same_v<T, f16>) return dt::f16;
  else if constexpr (std::is_same_v<T, bf16>) return dt::bf16;
  else if constexpr (std::is_same_v<T, std::int64_t>) return dt::i64;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return dt::u8;
  else return dt::other;
}

// One array argument, as read from Python: pointer, dtype, shape and strides in elements.
struct in_arg {
  const char* fn = "";
  const char* name = "";
  bool present = false;
  void* data = nullptr;
  dt type = dt::other;
  std::string type_text;
  bool writable = true;
  std::vector<std::int64_t> shape, strides;  // strides in elements (-1: not a whole element)

  int rank() const { return static_cast<int>(shape.size()); }

  [[noreturn]] void fail(const std::string& what) const {
    mnemo::detail::fail("mnemo.", fn, ": argument ", name, ": ", what);
  }

  template <class T, int R>
  view<T, R> as(const char* dims) const {
    using E = std::remove_const_t<T>;
    if (!present) fail(std::string("expected an array ") + dims + ", got None");
    if (type != dt_of<E>())
      fail(std::string("expected dtype ") + dt_name(dt_of<E>()) + ", got " + type_text +
           " (nothing is converted: pass a " + dt_name(dt_of<E>()) + " array)");
    if (rank() != R)
      fail("expected a " + std::to_string(R) + "-d array " + dims + ", got " + std::to_string(rank()) + "-d shape " +
           shape_text());
    if constexpr (!std::is_const_v<T>)
      if (!writable) fail("is an output: expected a writable array, got a read-only one");
    shape_t<R> s{}, st{};
    for (int i = 0; i < R; ++i) {
      s[i] = shape[i];
      if (strides[i] < 0 && shape[i] > 1)
        fail("expected non-negative strides in whole elements, got strides (elements) " + strides_text() +
             " (make it np.ascontiguousarray first)");
      st[i] = strides[i];
    }
    // A size-1 innermost axis may report any stride; a size-0 array has no element to reach.
    if (R > 0 && (s[R - 1] <= 1)) st[R - 1] = 1;
    if (R > 0 && st[R - 1] != 1)
      fail("the innermost axis must be contiguous (stride 1 element), got strides (elements) " + strides_text() +
           " for shape " + shape_text() + " (make it np.ascontiguousarray first)");
    // An axis of extent <= 1 is never stepped: give it the C-order stride, so that a view of
    // contiguous memory is seen as contiguous whatever stride the producer reported there.
    std::int64_t inner = 1;
    for (int i = R - 1; i >= 0; --i) {
      if (s[i] <= 1) st[i] = inner;
      inner *= s[i] > 0 ? s[i] : 1;
    }
    return view<T, R>(static_cast<T*>(data), s, st);
  }

  // An optional argument: an empty view when None.
  template <class T, int R>
  view<T, R> maybe(const char* dims) const {
    if (!present) return {};
    return as<T, R>(dims);
  }

  std::string shape_text() const { return list_text(shape); }
  std::string strides_text() const { return list_text(strides); }
  static std::string list_text(const std::vector<std::int64_t>& v) {
    std::string s = "(";
    for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + (v.size() == 1 ? ",)" : ")");
  }
};

// Reads obj (None, a numpy array or a CPU torch tensor) without copying it.
in_arg read(pyb::handle obj, const char* fn, const char* name);

// A new C-order numpy array (np.empty) of element type T and shape s, and its data. Made through
// numpy's Python API and read back through the buffer protocol, never through pybind11's numpy.h:
// Debian 12's pybind11 2.10 reads numpy's dtype struct directly and gets numpy 2's wrong.
template <class T>
std::pair<pyb::object, T*> new_array(const std::vector<std::int64_t>& shape);

template <class T, int R>
struct out_array {
  pyb::object array;
  view<T, R> v;
  explicit out_array(const shape_t<R>& s) {
    auto [a, p] = new_array<T>(std::vector<std::int64_t>(s.begin(), s.end()));
    array = std::move(a);
    v = view<T, R>(p, s);
  }
};

// A new 1-d int64 array holding `values`.
inline pyb::object int64_array(const std::int64_t* values, std::size_t n) {
  auto [a, p] = new_array<std::int64_t>({static_cast<std::int64_t>(n)});
  std::copy_n(values, n, p);
  return a;
}

// The output argument `obj` when given (written in place: checked like any input, and writable),
// else a new array of shape s. Returns the Python object to hand back and the view to write.
template <class T, int R>
std::pair<pyb::object, view<T, R>> output(pyb::handle obj, const char* fn, const char* name, const shape_t<R>& s,
                                          const char* dims) {
  if (obj.is_none()) {
    out_array<T, R> o(s);
    return {o.array, o.v};
  }
  const in_arg a = read(obj, fn, name);
  return {pyb::reinterpret_borrow<pyb::object>(obj), a.as<T, R>(dims)};
}

// options.isa from a Python string (None: automatic).
inline simd::level isa_of(const std::optional<std::string>& isa) {
  return isa ? simd::parse_level(*isa, "mnemo: isa") : simd::level::automatic;
}

// ---- the runtime mod ------------------------------------------------------------------------
//
// attend / flash / decode / reference take the mods as keyword parameters. The common cases (no
// mask, causal) run with mnemo's own mods::none and mods::causal (the instantiations mnemo::prebuilt
// covers at AVX2 / AVX-512); every other combination runs one instantiation, dyn_mod: the built-in
// mods chosen at run time, composed as all_of(softcap, alibi, mask, document) — the golden order
// (scale, softcap, ALiBi, mask). Its members call the built-in mods' own members (block, mask_tile,
// score_tile), so the masks are still classified per tile and applied in runs, with one switch per
// tile instead of one template per combination.

namespace am = mnemo::attention::mods;
using mnemo::attention::tile;

struct dyn_mod {
  enum class mask_kind { none, causal, window, prefix } mask = mask_kind::none;
  am::sliding_window window{};
  am::prefix_lm prefix{};
  bool has_doc = false;
  am::document doc{};
  bool has_cap = false;
  am::softcap cap{};
  bool has_alibi = false;
  am::alibi alibi{};

  bool visible(std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    bool ok = true;
    switch (mask) {
      case mask_kind::none: break;
      case mask_kind::causal: ok = kp <= qp; break;
      case mask_kind::window: ok = window.visible(h, qp, kp); break;
      case mask_kind::prefix: ok = prefix.visible(h, qp, kp); break;
    }
    return ok && (!has_doc || doc.visible(h, qp, kp));
  }
  tile mask_block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    switch (mask) {
      case mask_kind::none: return tile::full;
      case mask_kind::causal: return am::causal{}.block(q0, q1, k0, k1);
      case mask_kind::window: return window.block(q0, q1, k0, k1);
      case mask_kind::prefix: return prefix.block(q0, q1, k0, k1);
    }
    return tile::partial;
  }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    const tile a = mask_block(q0, q1, k0, k1);
    if (!has_doc || a == tile::empty) return a;
    const tile b = doc.block(q0, q1, k0, k1);
    if (b == tile::empty) return b;
    return a == tile::full && b == tile::full ? tile::full : tile::partial;
  }
  void mask_tile(float* s, std::int64_t ld, std::int64_t h, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    const tile a = mask_block(qp0, qp0 + qn, k0, k0 + kn);
    if (a == tile::empty) return am::fill_masked_rect(s, ld, 0, qn, 0, kn);
    if (a == tile::partial) {
      switch (mask) {
        case mask_kind::none: break;
        case mask_kind::causal: am::causal{}.mask_tile(s, ld, h, qp0, qn, k0, kn); break;
        case mask_kind::window: window.mask_tile(s, ld, h, qp0, qn, k0, kn); break;
        case mask_kind::prefix: prefix.mask_tile(s, ld, h, qp0, qn, k0, kn); break;
      }
    }
    if (has_doc) {
      const tile b = doc.block(qp0, qp0 + qn, k0, k0 + kn);
      if (b == tile::empty) am::fill_masked_rect(s, ld, 0, qn, 0, kn);
      else if (b == tile::partial) doc.mask_tile(s, ld, h, qp0, qn, k0, kn);
    }
  }
  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    if (has_cap) s = cap.score(s, h, qp, kp);
    if (has_alibi) s = alibi.score(s, h, qp, kp);
    return s;
  }
  template <class S>
  S score_derivative(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    return has_cap ? cap.score_derivative(s, h, qp, kp) : S(1);  // ALiBi is additive: d/ds = 1
  }
  template <class Arch>
  void score_tile(float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t qn, std::int64_t nq,
                  std::int64_t h, std::int64_t qp0, std::int64_t k0) const {
    if (has_cap) cap.score_tile<Arch>(s, g, ld, kn, qn, nq, h, qp0, k0);
    if (has_alibi) alibi.score_tile<Arch>(s, g, ld, kn, qn, nq, h, qp0, k0);
  }
  void validate(const char* fn, std::int64_t Hq, std::int64_t Lq, std::int64_t Lk) const {
    if (mask == mask_kind::window) window.validate(fn, Hq, Lq, Lk);
    if (mask == mask_kind::prefix) prefix.validate(fn, Hq, Lq, Lk);
    if (has_doc) doc.validate(fn, Hq, Lq, Lk);
    if (has_cap) cap.validate(fn, Hq, Lq, Lk);
    if (has_alibi) alibi.validate(fn, Hq, Lq, Lk);
  }
};

// The mod parameters as Python passes them.
struct mod_args {
  bool causal = false;
  std::int64_t window = 0;
  float softcap = 0;
  pyb::object alibi_slopes = pyb::none();
  pyb::object document_ids = pyb::none();
  pyb::object prefix = pyb::none();
};

// Which instantiation runs: plain (mods::none), causal (mods::causal) or the runtime dyn_mod.
enum class mod_choice { none, causal, dyn };

struct built_mod {
  mod_choice choice = mod_choice::none;
  dyn_mod dyn;
};

inline built_mod build_mod(const mod_args& a, const char* fn) {
  built_mod m;
  auto& d = m.dyn;
  if (a.window < 0) mnemo::detail::fail("mnemo.", fn, ": argument window: expected >= 0 (0 = no window), got ", a.window);
  if (!(a.softcap >= 0)) mnemo::detail::fail("mnemo.", fn, ": argument softcap: expected >= 0 (0 = off), got ", a.softcap);
  const bool has_prefix = !a.prefix.is_none();
  if (has_prefix && (a.causal || a.window > 0))
    mnemo::detail::fail("mnemo.", fn, ": argument prefix: a prefix-LM mask is causal after the prefix already; "
                        "pass it without causal=True or window");
  if (a.window > 0) {
    d.mask = dyn_mod::mask_kind::window;
    d.window.size = a.window;
  } else if (has_prefix) {
    d.mask = dyn_mod::mask_kind::prefix;
    d.prefix.prefix = a.prefix.cast<std::int64_t>();
  } else if (a.causal) {
    d.mask = dyn_mod::mask_kind::causal;
  }
  if (!a.document_ids.is_none()) {
    d.has_doc = true;
    d.doc.ids = read(a.document_ids, fn, "document_ids").as<const std::int64_t, 1>("[Lk]");
  }
  if (a.softcap > 0) {
    d.has_cap = true;
    d.cap.cap = a.softcap;
  }
  if (!a.alibi_slopes.is_none()) {
    d.has_alibi = true;
    d.alibi.slopes = read(a.alibi_slopes, fn, "alibi_slopes").as<const float, 1>("[Hq]");
  }
  const bool extra = d.has_doc || d.has_cap || d.has_alibi || d.mask == dyn_mod::mask_kind::window ||
                     d.mask == dyn_mod::mask_kind::prefix;
  m.choice = extra ? mod_choice::dyn : d.mask == dyn_mod::mask_kind::causal ? mod_choice::causal : mod_choice::none;
  return m;
}

// Calls f(mod) with the instantiation m chose.
template <class F>
decltype(auto) with_mod(const built_mod& m, F&& f) {
  switch (m.choice) {
    case mod_choice::none: return f(am::none{});
    case mod_choice::causal: return f(am::causal{});
    case mod_choice::dyn: break;
  }
  return f(m.dyn);
}

// Binding registration of each TU.
void bind_attention(pyb::module_& m);
void bind_serving(pyb::module_& m);
void bind_kvcache(pyb::module_& m);
void bind_linear(pyb::module_& m);
void bind_memory(pyb::module_& m);

}  // namespace mnemo::py
