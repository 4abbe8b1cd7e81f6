// python/src/module.cpp — the module mnemo._core: the exception, array reading, build info, and
// the registration of the other TUs' bindings.
#include <Python.h>

#include <cstdint>
#include <string>

#include "common.hpp"
#include "mnemo/prebuilt.hpp"

namespace mnemo::py {

namespace {

// The element type of a buffer-protocol format string ("<f", "=e", "l", ...).
dt buffer_type(const char* format, Py_ssize_t itemsize) {
  std::string f = format ? format : "B";
  if (!f.empty() && (f[0] == '<' || f[0] == '@' || f[0] == '=' || f[0] == '!' || f[0] == '>')) {
    if (f[0] == '>' || f[0] == '!') return dt::other;  // big endian
    f = f.substr(1);
  }
  if (f == "f" && itemsize == 4) return dt::f32;
  if (f == "e" && itemsize == 2) return dt::f16;
  if ((f == "l" || f == "q") && itemsize == 8) return dt::i64;
  if (f == "B" && itemsize == 1) return dt::u8;
  return dt::other;
}

dt torch_type(const std::string& s) {
  if (s == "torch.float32") return dt::f32;
  if (s == "torch.float16") return dt::f16;
  if (s == "torch.bfloat16") return dt::bf16;
  if (s == "torch.int64") return dt::i64;
  if (s == "torch.uint8") return dt::u8;
  return dt::other;
}

// The dtype's name from the buffer format, without asking numpy (str(array.dtype) takes ~40 us
// in numpy 2.4: more than the rest of a call).
std::string type_text_of(const char* format, Py_ssize_t itemsize) {
  std::string f = format ? format : "B";
  if (!f.empty() && (f[0] == '<' || f[0] == '@' || f[0] == '=' || f[0] == '!' || f[0] == '>')) f = f.substr(1);
  if (f == "f") return "float32";
  if (f == "d") return "float64";
  if (f == "e") return "float16";
  if (f == "g") return "longdouble";
  if (f == "?") return "bool";
  if (f == "b") return "int8";
  if (f == "B") return "uint8";
  if (f == "h") return "int16";
  if (f == "H") return "uint16";
  if (f == "i" || ((f == "l") && itemsize == 4)) return "int32";
  if (f == "I") return "uint32";
  if (f == "l" || f == "q") return "int64";
  if (f == "L" || f == "Q") return "uint64";
  return "buffer format '" + f + "'";
}

}  // namespace

in_arg read(pyb::handle obj, const char* fn, const char* name) {
  in_arg a;
  a.fn = fn;
  a.name = name;
  if (obj.is_none()) return a;
  a.present = true;
  // numpy arrays (and other strided buffers) first: the common case, and three failed hasattr calls
  // (each an AttributeError raised and cleared) cost microseconds. torch tensors have no buffer protocol.
  if (PyObject_CheckBuffer(obj.ptr())) {
    Py_buffer b;
    if (PyObject_GetBuffer(obj.ptr(), &b, PyBUF_RECORDS_RO) != 0) {
      PyErr_Clear();
      a.fail("the object's buffer cannot be read as a strided array");
    }
    a.data = b.buf;
    a.type = buffer_type(b.format, b.itemsize);
    a.writable = !b.readonly;
    for (int i = 0; i < b.ndim; ++i) {
      a.shape.push_back(b.shape[i]);
      const std::int64_t st = b.strides[i];
      a.strides.push_back(st % b.itemsize == 0 ? st / b.itemsize : -1);
    }
    a.type_text = type_text_of(b.format, b.itemsize);
    PyBuffer_Release(&b);  // the object (alive for the whole call) keeps the memory
    return a;
  }
  if (pyb::hasattr(obj, "data_ptr") && pyb::hasattr(obj, "stride") && pyb::hasattr(obj, "device")) {  // torch
    const std::string device = pyb::str(obj.attr("device").attr("type")).cast<std::string>();
    if (device != "cpu") a.fail("expected a CPU tensor, got one on device '" + device + "' (call .cpu() first)");
    a.type_text = pyb::str(obj.attr("dtype")).cast<std::string>();
    a.type = torch_type(a.type_text);
    a.data = reinterpret_cast<void*>(obj.attr("data_ptr")().cast<std::uintptr_t>());
    for (auto s : obj.attr("shape")) a.shape.push_back(s.cast<std::int64_t>());
    for (auto s : obj.attr("stride")()) a.strides.push_back(s.cast<std::int64_t>());
    return a;
  }
  a.fail(std::string("expected a numpy array or a CPU torch tensor, got ") +
         pyb::str(pyb::type::handle_of(obj).attr("__name__")).cast<std::string>() + " (nothing is converted: use np.asarray(x, np.float32))");
}

template <class T>
std::pair<pyb::object, T*> new_array(const std::vector<std::int64_t>& shape) {
  static pyb::object* empty = new pyb::object(pyb::module_::import("numpy").attr("empty"));  // never destroyed
  static pyb::object* dtype = new pyb::object(pyb::module_::import("numpy").attr(
      std::is_same_v<T, float> ? "float32" : std::is_same_v<T, std::int64_t> ? "int64" : "uint8"));
  pyb::tuple s(shape.size());
  for (std::size_t i = 0; i < shape.size(); ++i) s[i] = pyb::int_(shape[i]);
  pyb::object a = (*empty)(s, *dtype);
  Py_buffer b;
  if (PyObject_GetBuffer(a.ptr(), &b, PyBUF_SIMPLE) != 0) throw pyb::error_already_set();
  T* p = static_cast<T*>(b.buf);
  PyBuffer_Release(&b);
  return {std::move(a), p};
}

template std::pair<pyb::object, float*> new_array<float>(const std::vector<std::int64_t>&);
template std::pair<pyb::object, std::int64_t*> new_array<std::int64_t>(const std::vector<std::int64_t>&);

}  // namespace mnemo::py

PYBIND11_MODULE(_core, m) {
  namespace pyb = pybind11;
  m.doc() = "mnemo's C++ kernels (header-only C++20 library), bound with pybind11. Use the package mnemo.";
  // mnemo::error (a std::invalid_argument) -> mnemo.Error, a ValueError carrying the message.
  pyb::register_exception<mnemo::error>(m, "Error", PyExc_ValueError);

  m.def(
      "build_info",
      [] {
        pyb::dict d;
        d["arch"] = MNEMO_PY_ARCH_NAME;
        d["prebuilt"] = static_cast<bool>(MNEMO_PY_PREBUILT) && mnemo::prebuilt::linked;
        d["compiled_level"] = mnemo::simd::level_name(mnemo::simd::level_of<mnemo::simd::default_arch>());
        d["cpu_level"] = mnemo::simd::level_name(mnemo::simd::cpu_level());
#if defined(_OPENMP)
        d["openmp"] = true;
#else
        d["openmp"] = false;
#endif
        return d;
      },
      "How the extension was built: its baseline arch, whether mnemo::prebuilt (AVX2/AVX-512 flash, decode "
      "and cache decode) is linked, the level its own TUs compile, and the CPU's level.");

  mnemo::py::bind_attention(m);
  mnemo::py::bind_kvcache(m);
  mnemo::py::bind_serving(m);
  mnemo::py::bind_linear(m);
  mnemo::py::bind_memory(m);
}
