// python/src/kv_common.hpp — what kvcache.cpp and policies.cpp share: storage kinds and
// selections (per-head index lists) between Python and C++.
#pragma once

#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/selection.hpp"

namespace mnemo::py {

namespace kv = mnemo::kvcache;

inline kv::storage storage_of(const std::string& s, const char* fn) {
  for (kv::storage k : kv::layer_storages)
    if (s == kv::storage_name(k)) return k;
  mnemo::detail::fail("mnemo.", fn, ": argument kind: expected f32, f16, bf16, int8, int4 or int2, got '", s, "'");
}

// A selection from Python: a sequence of per-head int64 index arrays (or lists).
inline kv::selection selection_of(pyb::handle obj, const char* fn) {
  kv::selection sel;
  for (auto row : obj) {
    std::vector<std::int64_t> r;
    if (PyObject_CheckBuffer(row.ptr())) {
      const auto a = read(row, fn, "kept").as<const std::int64_t, 1>("[kept_h] (one per kv head)");
      for (std::int64_t i = 0; i < a.extent(0); ++i) r.push_back(a(i));
    } else {
      r = row.cast<std::vector<std::int64_t>>();
    }
    sel.heads.push_back(std::move(r));
  }
  return sel;
}

inline pyb::list selection_to_py(const kv::selection& sel) {
  pyb::list l;
  for (const auto& row : sel.heads) l.append(int64_array(row.data(), row.size()));
  return l;
}

// A new numpy array holding a copy of tensor t.
template <int R>
inline pyb::object copy_out(const tensor<float, R>& t) {
  out_array<float, R> a(t.shape());
  std::copy_n(t.data(), t.size(), a.v.data());
  return a.array;
}

void bind_policies(pyb::module_& kvcache_module);  // policies.cpp
void bind_paged(pyb::module_& kvcache_module);     // paged.cpp

}  // namespace mnemo::py
