// mnemo/core/npy.hpp — read and write NumPy .npy files.
//
// So that tensors dumped from PyTorch/NumPy (`np.save`) can be used directly, and results can
// be read back in Python. Reads format versions 1.0, 2.0 and 3.0, little-endian, C order;
// writes version 1.0. Anything else (big-endian, Fortran order, another dtype, a truncated
// file) throws mnemo::error naming the file, the expected and the actual value.
//
//   auto q = mnemo::npy::load<float, 4>("q.npy");   // tensor<float, 4>, rank and dtype checked
//   mnemo::npy::save("out.npy", out.as_view());
//
// Dtypes. load() reads the dtypes NumPy writes by default for its common arrays:
//
//   '<f4' float32   '<f2' float16   '<f8' float64 (NumPy's default float)
//   '<i8' int64 (NumPy's default int on Linux/macOS)   '<i4' int32
//   '|u1' uint8     '|b1' bool (one byte, 0 or 1)
//
// and refuses the rest (big-endian '>..', other widths, complex, strings, objects, structured)
// with a message that lists the accepted ones. as<T, R>() / load<T, R>() convert to the element
// type asked for when no information beyond rounding is lost, and refuse otherwise:
//
//   T = float          reads f4 (exact), f2 (exact), f8 (rounded to nearest float32, ties to
//                      even; a finite value beyond float's range rounds to +-max or +-inf as
//                      IEEE rounding says, NaN stays NaN)
//   T = double         reads f8, f4, f2 (exact)
//   T = mnemo::f16     reads f2 only (asking for f16 from f4/f8 is refused: round explicitly)
//   T = std::int64_t   reads i8, i4, u1, b1 (exact)
//   T = std::int32_t   reads i4, u1, b1 (exact; i8 is refused, it may not fit)
//   T = std::uint8_t   reads u1, b1 (exact)
//
// A float file is never read as integers nor the reverse. save() writes the element type's own
// dtype (float '<f4', double '<f8', f16 '<f2', int64 '<i8', int32 '<i4', uint8 '|u1').
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::npy {

enum class dtype { float32, float16, int64, float64, int32, uint8, bool8 };

// Every dtype load() reads, in the order its error messages list them.
inline constexpr dtype all_dtypes[] = {dtype::float32, dtype::float16, dtype::float64, dtype::int64,
                                       dtype::int32,   dtype::uint8,   dtype::bool8};

inline const char* descr(dtype t) {
  switch (t) {
    case dtype::float32: return "<f4";
    case dtype::float16: return "<f2";
    case dtype::int64: return "<i8";
    case dtype::float64: return "<f8";
    case dtype::int32: return "<i4";
    case dtype::uint8: return "|u1";
    case dtype::bool8: return "|b1";
  }
  return "?";
}

inline std::size_t item_size(dtype t) {
  switch (t) {
    case dtype::int64:
    case dtype::float64: return 8;
    case dtype::float32:
    case dtype::int32: return 4;
    case dtype::float16: return 2;
    case dtype::uint8:
    case dtype::bool8: return 1;
  }
  return 0;
}

// The dtype a tensor<T> is saved as.
template <class T>
constexpr dtype dtype_of() {
  if constexpr (std::is_same_v<T, float>) return dtype::float32;
  else if constexpr (std::is_same_v<T, f16>) return dtype::float16;
  else if constexpr (std::is_same_v<T, double>) return dtype::float64;
  else if constexpr (std::is_same_v<T, std::int32_t>) return dtype::int32;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return dtype::uint8;
  else {
    static_assert(std::is_same_v<T, std::int64_t>,
                  "npy supports float, double, mnemo::f16, std::int64_t, std::int32_t and std::uint8_t elements");
    return dtype::int64;
  }
}

// Whether as<T, R>() reads a file of dtype `t` (the table in the header comment).
template <class T>
constexpr bool reads(dtype t) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
    return t == dtype::float32 || t == dtype::float16 || t == dtype::float64;
  else if constexpr (std::is_same_v<T, f16>) return t == dtype::float16;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return t == dtype::int64 || t == dtype::int32 || t == dtype::uint8 || t == dtype::bool8;
  else if constexpr (std::is_same_v<T, std::int32_t>) return t == dtype::int32 || t == dtype::uint8 || t == dtype::bool8;
  else {
    static_assert(std::is_same_v<T, std::uint8_t>, "npy reads into float, double, mnemo::f16, std::int64_t, std::int32_t or std::uint8_t");
    return t == dtype::uint8 || t == dtype::bool8;
  }
}

// The accepted dtypes of T, as a message lists them: "'<f4', '<f2', '<f8'".
template <class T>
std::string reads_list() {
  std::string s;
  for (dtype t : all_dtypes)
    if (reads<T>(t)) s += (s.empty() ? "'" : ", '") + std::string(descr(t)) + "'";
  return s;
}

namespace detail {

// Element i of raw little-endian bytes of dtype `t`, converted to T (reads<T>(t) holds).
template <class T>
T element(const std::byte* p, dtype t) {
  auto get = [p](auto x) {
    std::memcpy(&x, p, sizeof x);
    return x;
  };
  if constexpr (std::is_same_v<T, f16>) {
    return f16::from_bits(get(std::uint16_t{}));
  } else if constexpr (std::is_floating_point_v<T>) {
    switch (t) {
      case dtype::float32: return static_cast<T>(get(float{}));
      case dtype::float16: return static_cast<T>(static_cast<float>(f16::from_bits(get(std::uint16_t{}))));
      default: {
        const double x = get(double{});
        if constexpr (std::is_same_v<T, float>) {
          // Round to nearest. A finite double beyond float's range is converted by hand (the cast
          // is undefined there): below max + half an ulp (2^103) it rounds to max, else to inf.
          constexpr double max = std::numeric_limits<float>::max();
          if (std::isfinite(x) && std::abs(x) > max) {
            const float r = std::abs(x) < max + std::ldexp(1.0, 103) ? std::numeric_limits<float>::max()
                                                                     : std::numeric_limits<float>::infinity();
            return x > 0 ? r : -r;
          }
          return static_cast<float>(x);
        } else {
          return x;
        }
      }
    }
  } else {
    switch (t) {
      case dtype::int64: return static_cast<T>(get(std::int64_t{}));
      case dtype::int32: return static_cast<T>(get(std::int32_t{}));
      case dtype::uint8: return static_cast<T>(get(std::uint8_t{}));
      default: return static_cast<T>(get(std::uint8_t{}) != 0 ? 1 : 0);
    }
  }
}

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, f16>) return "mnemo::f16";
  else if constexpr (std::is_same_v<T, std::int64_t>) return "std::int64_t";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "std::int32_t";
  else return "std::uint8_t";
}

}  // namespace detail

// A loaded .npy file: its dtype, its shape and its raw little-endian bytes.
struct array {
  std::string path;
  dtype type = dtype::float32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;

  std::int64_t size() const {
    std::int64_t n = 1;
    for (auto e : shape) n *= e;
    return n;
  }

  // Copies into a tensor<T, R>, converting as the header comment's table says; throws if the
  // dtype cannot be read as T or the rank differs.
  template <class T, int R>
  tensor<T, R> as() const {
    mnemo::detail::require(reads<T>(type), "npy: ", path, ": expected dtype ", reads_list<T>(), " (read as ",
                           detail::type_name<T>(), "), got ", descr(type));
    mnemo::detail::require(static_cast<int>(shape.size()) == R, "npy: ", path, ": expected rank ", R, ", got rank ",
                    shape.size());
    shape_t<R> s{};
    for (int i = 0; i < R; ++i) s[i] = shape[i];
    tensor<T, R> t(s);
    if (type == dtype_of<T>()) {
      if (t.size()) std::memcpy(t.data(), bytes.data(), t.bytes());
    } else {
      const std::size_t item = item_size(type);
      for (std::int64_t i = 0; i < t.size(); ++i)
        t.data()[i] = detail::element<T>(bytes.data() + static_cast<std::size_t>(i) * item, type);
    }
    return t;
  }
};

namespace detail {

inline std::string header_value(const std::string& header, const std::string& key, const std::string& path) {
  const auto k = header.find("'" + key + "'");
  mnemo::detail::require(k != std::string::npos, "npy: ", path, ": header has no '", key, "' entry: ", header);
  auto p = header.find(':', k);
  mnemo::detail::require(p != std::string::npos, "npy: ", path, ": malformed header: ", header);
  ++p;
  while (p < header.size() && header[p] == ' ') ++p;
  if (p < header.size() && header[p] == '(') {
    const auto e = header.find(')', p);
    mnemo::detail::require(e != std::string::npos, "npy: ", path, ": unterminated shape tuple: ", header);
    return header.substr(p, e - p + 1);
  }
  if (p < header.size() && header[p] == '\'') {
    const auto e = header.find('\'', p + 1);
    mnemo::detail::require(e != std::string::npos, "npy: ", path, ": unterminated string: ", header);
    return header.substr(p + 1, e - p - 1);
  }
  auto e = header.find_first_of(",}", p);
  return header.substr(p, e - p);
}

// The 'shape' entry: a Python tuple of non-negative integers, "()", "(12,)", "(2, 3)": one comma
// between entries (and an optional one after the last), spaces anywhere between tokens.
inline std::vector<std::int64_t> parse_shape(const std::string& tuple, const std::string& path) {
  mnemo::detail::require(tuple.size() >= 2 && tuple.front() == '(' && tuple.back() == ')', "npy: ", path,
                         ": header 'shape' must be a tuple such as (2, 3), got ", tuple);
  std::vector<std::int64_t> shape;
  const std::size_t end = tuple.size() - 1;  // the closing ')'
  std::size_t i = 1;                         // past '('
  const auto skip_spaces = [&] {
    while (i < end && tuple[i] == ' ') ++i;
  };
  skip_spaces();
  while (i < end) {
    std::int64_t v = 0;
    bool digits = false;
    while (i < end && tuple[i] >= '0' && tuple[i] <= '9') {
      mnemo::detail::require(v < (std::int64_t{1} << 56), "npy: ", path, ": dimension too large in shape ", tuple);
      v = v * 10 + (tuple[i] - '0');
      ++i;
      digits = true;
    }
    if (i < end && tuple[i] == 'L') ++i;  // Python 2 longs
    mnemo::detail::require(digits, "npy: ", path, ": malformed shape ", tuple, " (expected a dimension at offset ", i,
                           ")");
    shape.push_back(v);
    skip_spaces();
    if (i == end) break;
    mnemo::detail::require(tuple[i] == ',', "npy: ", path, ": malformed shape ", tuple, " (expected ',' or ')' at offset ",
                           i, ")");
    ++i;
    skip_spaces();
  }
  return shape;
}

}  // namespace detail

inline array load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  mnemo::detail::require(f.good(), "npy: cannot open '", path, "'");
  char magic[8] = {};
  f.read(magic, 8);
  mnemo::detail::require(f.gcount() == 8 && std::memcmp(magic, "\x93NUMPY", 6) == 0, "npy: ", path,
                         ": not a .npy file (expected the magic \\x93NUMPY)");
  const int major = static_cast<unsigned char>(magic[6]);
  mnemo::detail::require(major >= 1 && major <= 3, "npy: ", path, ": expected format version 1, 2 or 3, got ",
                         major);
  std::uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2] = {};
    f.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4] = {};
    f.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<std::uint32_t>(b[3]) << 24);
  }
  mnemo::detail::require(f.good() && header_len < (1u << 24), "npy: ", path, ": truncated or oversized header");
  std::string header(header_len, '\0');
  f.read(header.data(), header_len);
  mnemo::detail::require(static_cast<std::uint32_t>(f.gcount()) == header_len, "npy: ", path, ": truncated header");

  array a;
  a.path = path;
  const std::string d = detail::header_value(header, "descr", path);
  bool known = false;
  std::string accepted;
  for (dtype t : all_dtypes) {
    accepted += (accepted.empty() ? "'" : ", '") + std::string(descr(t)) + "'";
    if (d == descr(t)) {
      a.type = t;
      known = true;
    }
  }
  if (!known)
    mnemo::detail::fail("npy: ", path, ": expected dtype one of ", accepted,
                        " (little-endian; float32, float16, float64, int64, int32, uint8, bool), got '", d, "'");
  const std::string fo = detail::header_value(header, "fortran_order", path);
  mnemo::detail::require(fo.find("False") != std::string::npos, "npy: ", path,
                         ": expected fortran_order False (C order), got ", fo);
  a.shape = detail::parse_shape(detail::header_value(header, "shape", path), path);

  std::string shape_text = "(";
  for (auto e : a.shape) shape_text += std::to_string(e) + ",";
  shape_text += ")";

  // Size the data from the bytes actually left in the file before allocating anything, so a
  // corrupt shape can neither overflow the element count nor ask for a huge buffer.
  const auto data_start = f.tellg();
  f.seekg(0, std::ios::end);
  const std::uint64_t available = static_cast<std::uint64_t>(f.tellg() - data_start);
  f.seekg(data_start);
  const std::uint64_t item = item_size(a.type);
  // The product of the non-zero extents must fit in int64 bytes even when another extent is 0:
  // views and tensors multiply all extents (sizes, strides) in int64.
  std::uint64_t nonzero = 1;
  bool overflow = false, empty = false;
  for (auto e : a.shape) {
    const auto ue = static_cast<std::uint64_t>(e);
    if (ue == 0) {
      empty = true;
      continue;
    }
    if (nonzero > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / item / ue) overflow = true;
    else nonzero *= ue;
  }
  const std::uint64_t count = empty ? 0 : nonzero;
  mnemo::detail::require(!overflow && count * item <= available, "npy: ", path, ": truncated data: shape ",
                         shape_text, " needs ", overflow ? std::string("over 2^63") : std::to_string(count * item),
                         " data bytes, got ", available);
  const std::size_t n = static_cast<std::size_t>(count * item);
  a.bytes.resize(n);
  if (n) f.read(reinterpret_cast<char*>(a.bytes.data()), static_cast<std::streamsize>(n));
  mnemo::detail::require(static_cast<std::size_t>(f.gcount()) == n || n == 0, "npy: ", path,
                         ": truncated data: shape ", shape_text, " needs ", n, " data bytes, got ", f.gcount());
  return a;
}

// Loads `path` as a tensor<T, R>, checking dtype and rank.
template <class T, int R>
tensor<T, R> load(const std::string& path) {
  return load(path).template as<T, R>();
}

// Writes a (possibly strided) view as a C-order .npy, format 1.0.
template <class T, int R>
void save(const std::string& path, view<const T, R> v) {
  std::string header = std::string("{'descr': '") + descr(dtype_of<T>()) + "', 'fortran_order': False, 'shape': (";
  for (int i = 0; i < R; ++i) header += std::to_string(v.extent(i)) + (R == 1 ? "," : i + 1 < R ? ", " : "");
  header += "), }";
  const std::size_t preamble = 10;
  std::size_t total = preamble + header.size() + 1;  // + '\n'
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';

  std::ofstream f(path, std::ios::binary);
  mnemo::detail::require(f.good(), "npy: cannot open '", path, "' for writing");
  f.write("\x93NUMPY\x01\x00", 8);
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  f.write(reinterpret_cast<const char*>(len), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));

  // Innermost rows are contiguous; walk the outer indices.
  const std::int64_t row = v.extent(R - 1);
  std::int64_t rows = 1;
  for (int i = 0; i < R - 1; ++i) rows *= v.extent(i);
  for (std::int64_t r = 0; r < rows && row > 0; ++r) {
    std::int64_t rem = r, off = 0;
    for (int i = R - 2; i >= 0; --i) {
      off += (rem % v.extent(i)) * v.stride(i);
      rem /= v.extent(i);
    }
    f.write(reinterpret_cast<const char*>(v.data() + off), static_cast<std::streamsize>(row * sizeof(T)));
  }
  mnemo::detail::require(f.good(), "npy: write to '", path, "' failed");
}

template <class T, int R>
void save(const std::string& path, view<T, R> v) {
  save(path, view<const T, R>(v));
}

template <class T, int R>
void save(const std::string& path, const tensor<T, R>& t) {
  save(path, t.as_view());
}

}  // namespace mnemo::npy
