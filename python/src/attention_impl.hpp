// python/src/attention_impl.hpp — one forward attention call, as the kernel TUs take it
// (flash_kernels.cpp, decode_kernels.cpp, attention.cpp for the reference): so that each kernel's
// instantiations compile in a TU of their own (in parallel, and a change to one recompiles one).
#pragma once

#include <chrono>
#include <cstdint>

#include "common.hpp"
#include "mnemo/attention/common.hpp"
#include "mnemo/attention/reference.hpp"

namespace mnemo::py {

struct fwd_call {
  view<const float, 4> q;
  in_arg k, v;  // read as f32, f16 or bf16 by the kernel TU
  view<float, 4> out;
  view<float, 3> lse;
  attention::options opt;
  attention::column_sums cs;
  built_mod mod;
};

// K/V's element type (k and v must agree), or mnemo.Error.
inline dt kv_type(const fwd_call& c, const char* fn) {
  if (c.k.type != c.v.type)
    mnemo::detail::fail("mnemo.", fn, ": arguments k and v: expected one dtype, got k ", c.k.type_text, " and v ",
                        c.v.type_text);
  if (c.k.type != dt::f32 && c.k.type != dt::f16 && c.k.type != dt::bf16)
    c.k.fail("expected dtype float32, float16 or bfloat16, got " + c.k.type_text);
  return c.k.type;
}

// Calls f(type_tag<KV>{}) for K/V's element type.
template <class T>
struct type_tag {
  using type = T;
};
template <class F>
void with_kv(dt t, F&& f) {
  switch (t) {
    case dt::f16: return f(type_tag<f16>{});
    case dt::bf16: return f(type_tag<bf16>{});
    default: return f(type_tag<float>{});
  }
}

// The kernel's own wall time of the last call (for the call-overhead measurement, mnemo._core.last_kernel_ns).
inline std::int64_t& last_kernel_ns() {
  static std::int64_t ns = 0;
  return ns;
}

template <class F>
void timed(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  last_kernel_ns() = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
}

void run_flash(const fwd_call& c);   // flash_kernels.cpp
void run_decode(const fwd_call& c);  // decode_kernels.cpp

}  // namespace mnemo::py
