// tests/golden/runner.hpp — plumbing of the golden runner (mnemo_golden): case loading, the
// comparison rule of ../shared/golden/README.md, and the registry that families plug into.
//
// A family adds tests/golden/ops_<family>.cpp that registers one function per (op, path):
//
//   golden::results linear_attn_chunked(const golden::golden_case& c) {
//     const auto B = c.dim("B"), H = c.dim("H"), L = c.dim("L"), Dk = c.dim("Dk"), Dv = c.dim("Dv");
//     const auto q = c.input<float, 4>("q", {B, H, L, Dk});       // dtype, rank and shape checked
//     ...
//     golden::results r;
//     r.add("o", o);                                               // every output meta.json lists
//     r.add("ht", ht);
//     return r;
//   }
//   [[maybe_unused]] const bool registered = golden::register_op("linear_attn", "chunked", linear_attn_chunked);
//
// One op may have several implementations ("reference", "flash", "decode", ...); the runner
// runs and reports each on its own line. An op without any implementation is skipped.
//
// Comparison (README "Comparison rule"): float outputs pass when |got - want| <= atol + rtol |want|
// elementwise (in double); a non-finite golden value must be matched exactly at the same
// position (lse = -inf on rows that see no key); int64 outputs must be identical.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::golden {

namespace fs = std::filesystem;

// Largest size parameter a case may give: far above any real case, small enough that products
// of a few of them cannot overflow int64 before a shape check catches them.
inline constexpr std::int64_t max_param_dim = std::int64_t{1} << 31;

namespace detail {

// Tensor names become file names: plain identifiers only, so no name reaches outside its folder.
inline bool is_plain_name(const std::string& s) {
  if (s.empty()) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  });
}

inline std::vector<std::string> name_list(const nlohmann::json& meta, const char* key) {
  mnemo::detail::require(meta.contains(key) && meta[key].is_array(), "meta.json: '", key,
                         "' must be an array of tensor names");
  std::vector<std::string> names;
  for (const auto& n : meta[key]) {
    mnemo::detail::require(n.is_string() && is_plain_name(n.get<std::string>()), "meta.json: '", key,
                           "' entries must be plain names ([A-Za-z0-9_]+), got ", n.dump());
    names.push_back(n.get<std::string>());
  }
  return names;
}

inline double tolerance(const nlohmann::json& meta, const char* key) {
  mnemo::detail::require(meta.contains(key) && meta[key].is_number(), "meta.json: '", key, "' must be a number");
  const double t = meta[key].get<double>();
  mnemo::detail::require(std::isfinite(t) && t >= 0, "meta.json: '", key, "' must be finite and >= 0, got ", t);
  return t;
}

inline std::string index_string(std::int64_t flat, const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> idx(shape.size());
  for (std::size_t d = shape.size(); d-- > 0;) {
    idx[d] = shape[d] ? flat % shape[d] : 0;
    flat = shape[d] ? flat / shape[d] : 0;
  }
  std::string s = "[";
  for (std::size_t d = 0; d < idx.size(); ++d) s += (d ? ", " : "") + std::to_string(idx[d]);
  return s + "]";
}

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t d = 0; d < shape.size(); ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
  return s + "]";
}

inline std::string number_string(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", x);
  return buf;
}

// Element i of a float array (float32 or float16) as double.
inline double float_at(const npy::array& a, std::int64_t i) {
  if (a.type == npy::dtype::float16) {
    std::uint16_t b = 0;
    std::memcpy(&b, a.bytes.data() + i * 2, 2);
    return static_cast<double>(static_cast<float>(f16::from_bits(b)));
  }
  float f = 0;
  std::memcpy(&f, a.bytes.data() + i * 4, 4);
  return f;
}

inline std::int64_t int_at(const npy::array& a, std::int64_t i) {
  std::int64_t v = 0;
  std::memcpy(&v, a.bytes.data() + i * 8, 8);
  return v;
}

}  // namespace detail

// One case folder: its meta.json, and its tensors loaded on demand.
class golden_case {
 public:
  // Parses `dir`/meta.json; throws mnemo::error if it is missing or malformed.
  explicit golden_case(fs::path dir) : dir_(std::move(dir)), name_(dir_.filename().string()) {
    const fs::path meta_path = dir_ / "meta.json";
    std::ifstream f(meta_path);
    mnemo::detail::require(f.good(), "cannot open ", meta_path.string());
    nlohmann::json meta;
    try {
      meta = nlohmann::json::parse(f);
    } catch (const std::exception& e) {  // a JSON syntax error, or a read error (meta.json is a folder)
      mnemo::detail::fail("meta.json cannot be parsed: ", e.what());
    }
    mnemo::detail::require(meta.is_object(), "meta.json must hold an object, got ", meta.type_name());
    mnemo::detail::require(meta.contains("op") && meta["op"].is_string(), "meta.json: 'op' must be a string");
    op_ = meta["op"].get<std::string>();
    mnemo::detail::require(meta.contains("params") && meta["params"].is_object(),
                           "meta.json: 'params' must be an object");
    params_ = meta["params"];
    inputs_ = detail::name_list(meta, "inputs");
    outputs_ = detail::name_list(meta, "outputs");
    mnemo::detail::require(!outputs_.empty(), "meta.json: 'outputs' is empty: nothing to compare");
    atol_ = detail::tolerance(meta, "atol");
    rtol_ = detail::tolerance(meta, "rtol");
  }

  const fs::path& dir() const { return dir_; }
  const std::string& name() const { return name_; }
  const std::string& op() const { return op_; }
  const nlohmann::json& params() const { return params_; }
  const std::vector<std::string>& inputs() const { return inputs_; }
  const std::vector<std::string>& outputs() const { return outputs_; }
  double atol() const { return atol_; }
  double rtol() const { return rtol_; }

  bool has_param(const std::string& key) const { return params_.contains(key); }

  // A size parameter: an integer in [0, max_param_dim].
  std::int64_t dim(const std::string& key) const {
    const auto& p = param(key);
    mnemo::detail::require(p.is_number_integer(), "params.", key, ": expected an integer, got ", p.dump());
    const bool in_range = p.is_number_unsigned() ? p.get<std::uint64_t>() <= static_cast<std::uint64_t>(max_param_dim)
                                                 : p.get<std::int64_t>() >= 0 && p.get<std::int64_t>() <= max_param_dim;
    mnemo::detail::require(in_range, "params.", key, ": expected an integer in [0, ", max_param_dim, "], got ",
                           p.dump());
    return p.get<std::int64_t>();
  }

  // A finite number.
  double number(const std::string& key) const {
    const auto& p = param(key);
    mnemo::detail::require(p.is_number(), "params.", key, ": expected a number, got ", p.dump());
    const double x = p.get<double>();
    mnemo::detail::require(std::isfinite(x), "params.", key, ": expected a finite number, got ", p.dump());
    return x;
  }

  bool flag(const std::string& key) const {
    const auto& p = param(key);
    mnemo::detail::require(p.is_boolean(), "params.", key, ": expected true or false, got ", p.dump());
    return p.get<bool>();
  }

  bool has_input(const std::string& name) const {
    return std::find(inputs_.begin(), inputs_.end(), name) != inputs_.end();
  }

  // The input `name` (which meta.json must list) as a tensor<T, R> of exactly `shape`.
  template <class T, int R>
  tensor<T, R> input(const std::string& name, const shape_t<R>& shape) const {
    mnemo::detail::require(has_input(name), "meta.json does not list input '", name, "'");
    tensor<T, R> t = npy::load<T, R>((dir_ / (name + ".npy")).string());
    mnemo::detail::require(t.shape() == shape, "input ", name, ": expected shape ", mnemo::shape_string(shape),
                           " from params, got ", mnemo::shape_string(t.shape()));
    return t;
  }

  // The golden value of output `name` (which meta.json must list).
  npy::array expected(const std::string& name) const {
    mnemo::detail::require(std::find(outputs_.begin(), outputs_.end(), name) != outputs_.end(),
                           "meta.json does not list output '", name, "'");
    npy::array a = npy::load((dir_ / (name + ".npy")).string());
    return a;
  }

 private:
  const nlohmann::json& param(const std::string& key) const {
    mnemo::detail::require(params_.contains(key), "params has no '", key, "'");
    return params_[key];
  }

  fs::path dir_;
  std::string name_, op_;
  nlohmann::json params_;
  std::vector<std::string> inputs_, outputs_;
  double atol_ = 0, rtol_ = 0;
};

// The named outputs an implementation produced, held as .npy arrays (dtype, shape, C-order bytes).
class results {
 public:
  template <class T, int R>
  void add(const std::string& name, view<const T, R> v) {
    mnemo::detail::require(!arrays_.count(name), "output '", name, "' added twice");
    npy::array a;
    a.path = name;
    a.type = npy::dtype_of<T>();
    a.shape.assign(v.shape().begin(), v.shape().end());
    a.bytes.resize(static_cast<std::size_t>(v.size()) * sizeof(T));
    const std::int64_t row = v.extent(R - 1);
    const std::int64_t rows = row ? v.size() / row : 0;
    for (std::int64_t r = 0; r < rows; ++r) {  // innermost rows are contiguous; walk the outer indices
      std::int64_t rem = r, off = 0;
      for (int d = R - 2; d >= 0; --d) {
        off += (rem % v.extent(d)) * v.stride(d);
        rem /= v.extent(d);
      }
      std::memcpy(a.bytes.data() + r * row * static_cast<std::int64_t>(sizeof(T)), v.data() + off,
                  static_cast<std::size_t>(row) * sizeof(T));
    }
    arrays_.emplace(name, std::move(a));
  }
  template <class T, int R>
  void add(const std::string& name, view<T, R> v) {
    add(name, view<const T, R>(v));
  }
  template <class T, int R>
  void add(const std::string& name, const tensor<T, R>& t) {
    add(name, t.as_view());
  }

  const npy::array* find(const std::string& name) const {
    const auto it = arrays_.find(name);
    return it == arrays_.end() ? nullptr : &it->second;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& [k, _] : arrays_) n.push_back(k);
    return n;
  }

 private:
  std::map<std::string, npy::array> arrays_;
};

// One output compared with its golden value.
struct comparison {
  bool ok = true;
  double max_err = 0;    // max |got - want| over the elements with a finite golden value
  double max_ratio = 0;  // max |got - want| / (atol + rtol |want|): <= 1 passes
  std::string failure;   // on failure: which element, got, want, and how many failed
};

// The README's rule, applied to output `name`.
inline comparison compare(const std::string& name, const npy::array& got, const npy::array& want, double atol,
                          double rtol) {
  comparison c;
  auto fail = [&](std::string why) {
    c.ok = false;
    c.failure = name + ": " + std::move(why);
    return c;
  };
  const bool want_int = want.type == npy::dtype::int64, got_int = got.type == npy::dtype::int64;
  if (want_int != got_int)
    return fail(std::string("dtype ") + npy::descr(got.type) + ", want " + npy::descr(want.type));
  if (got.shape != want.shape)
    return fail("shape " + detail::shape_string(got.shape) + ", want " + detail::shape_string(want.shape));
  for (const npy::array* a : {&got, &want})
    if (a->bytes.size() != static_cast<std::size_t>(a->size()) * npy::item_size(a->type))
      return fail("holds " + std::to_string(a->bytes.size()) + " bytes, its shape needs " +
                  std::to_string(static_cast<std::size_t>(a->size()) * npy::item_size(a->type)));

  constexpr double inf = std::numeric_limits<double>::infinity();
  const std::int64_t n = want.size();
  std::int64_t n_bad = 0, worst = -1;
  double worst_ratio = -1;
  for (std::int64_t i = 0; i < n; ++i) {
    bool bad = false;
    double ratio = 0;  // |got - want| / tolerance; inf for a mismatch that no tolerance covers
    if (want_int) {
      bad = detail::int_at(got, i) != detail::int_at(want, i);
      ratio = bad ? inf : 0;
    } else {
      const double g = detail::float_at(got, i), w = detail::float_at(want, i);
      if (!std::isfinite(w)) {
        bad = std::isnan(w) ? !std::isnan(g) : g != w;
        ratio = bad ? inf : 0;
      } else {
        const double err = std::abs(g - w);  // NaN or inf when got is not finite
        const double tol = atol + rtol * std::abs(w);
        bad = !(err <= tol);
        ratio = !std::isfinite(err) ? inf : tol > 0 ? err / tol : err > 0 ? inf : 0;
        if (std::isfinite(err)) c.max_err = std::max(c.max_err, err);
        c.max_ratio = std::max(c.max_ratio, ratio);
      }
    }
    if (bad) {
      ++n_bad;
      if (ratio > worst_ratio) {
        worst_ratio = ratio;
        worst = i;
      }
    }
  }
  if (n_bad == 0) return c;

  const std::string at = name + detail::index_string(worst, want.shape);
  c.ok = false;
  if (want_int) {
    c.failure = at + ": got " + std::to_string(detail::int_at(got, worst)) + ", want " +
                std::to_string(detail::int_at(want, worst));
  } else {
    const double g = detail::float_at(got, worst), w = detail::float_at(want, worst);
    c.failure = at + ": got " + detail::number_string(g) + ", want " + detail::number_string(w);
    if (std::isfinite(w) && std::isfinite(g))
      c.failure += " (|diff| " + detail::number_string(std::abs(g - w)) + " > tol " +
                   detail::number_string(atol + rtol * std::abs(w)) + ")";
  }
  c.failure += "; " + std::to_string(n_bad) + " of " + std::to_string(n) + " elements wrong";
  return c;
}

// ---- registry --------------------------------------------------------------------------------

using op_fn = std::function<results(const golden_case&)>;

struct implementation {
  std::string op;
  std::string label;  // which path: "reference", "flash", "decode", ...
  op_fn fn;
};

struct registry {
  std::vector<implementation> impls;
  std::vector<std::string> errors;  // registration mistakes, reported as failures by the runner
};

inline registry& global_registry() {
  static registry r;  // a function-local static: safe to use from other TUs' static initialisers
  return r;
}

// Registers `fn` as the implementation `label` of `op`. Returns true, so that a file can register
// from a namespace-scope initialiser. Registering the same (op, label) twice is recorded as an
// error that the runner reports as a failure.
inline bool register_op(std::string op, std::string label, op_fn fn) {
  auto& r = global_registry();
  for (const auto& i : r.impls)
    if (i.op == op && i.label == label) {
      r.errors.push_back("op '" + op + "' [" + label + "] is registered twice");
      return true;
    }
  if (!fn) {
    r.errors.push_back("op '" + op + "' [" + label + "] is registered with an empty function");
    return true;
  }
  r.impls.push_back({std::move(op), std::move(label), std::move(fn)});
  return true;
}

// The implementations of `op`, sorted by label (so the output does not depend on link order).
inline std::vector<const implementation*> implementations_of(const std::string& op) {
  std::vector<const implementation*> out;
  for (const auto& i : global_registry().impls)
    if (i.op == op) out.push_back(&i);
  std::sort(out.begin(), out.end(), [](const auto* a, const auto* b) { return a->label < b->label; });
  return out;
}

}  // namespace mnemo::golden
