// python/src/attention.cpp — mnemo.attention: reference, flash, decode, attend (the forward
// passes, with the mods as keyword parameters), flash_backward / reference_backward, merge.
//
// Shapes (DESIGN.md): q [B, Hq, Lq, D] f32, k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (f32; flash,
// decode and reference also f16 / bf16), out [B, Hq, Lq, Dv], lse [B, Hq, Lq].
#include <optional>
#include <string>
#include <tuple>

#include "attention_impl.hpp"
#include "mnemo/attention/flash_backward.hpp"
#include "mnemo/attention/merge.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/attention/split_kv.hpp"

namespace mnemo::py {

namespace {

using pyb::arg;
namespace attn = mnemo::attention;

struct fwd_kwargs {
  mod_args mods;
  float scale = 0;
  pyb::object sinks = pyb::none();
  int threads = 0;
  std::optional<std::string> isa;
};

attn::options options_of(const fwd_kwargs& kw, const char* fn) {
  attn::options opt;
  opt.scale = kw.scale;
  opt.threads = kw.threads;
  opt.isa = isa_of(kw.isa);
  opt.sinks = read(kw.sinks, fn, "sinks").maybe<const float, 1>("[Hq]");
  return opt;
}

enum class kernel { reference, flash, decode };

void run_reference(const fwd_call& c) {
  with_kv(kv_type(c, "reference"), [&]<class Tag>(Tag) {
    using KV = typename Tag::type;
    const auto k = c.k.as<const KV, 4>("[B, Hkv, Lk, D]");
    const auto v = c.v.as<const KV, 4>("[B, Hkv, Lk, Dv]");
    dyn_mod mod = c.mod.dyn;  // one instantiation: none and causal are dyn_mod's own cases
    pyb::gil_scoped_release release;
    timed([&] { attn::reference(c.q, k, v, c.out, c.lse, mod, c.opt, c.cs); });
  });
}

// The forward of `kn`: returns (out, lse) or (out, lse, column_sums).
pyb::object forward(kernel kn, const char* fn, pyb::handle q_obj, pyb::handle k_obj, pyb::handle v_obj,
                    pyb::handle out_obj, pyb::handle lse_obj, const fwd_kwargs& kw,
                    const std::optional<std::int64_t>& column_sums_rows) {
  fwd_call c;
  c.q = read(q_obj, fn, "q").as<const float, 4>("[B, Hq, Lq, D]");
  c.k = read(k_obj, fn, "k");
  c.v = read(v_obj, fn, "v");
  if (!c.k.present) c.k.fail("expected an array [B, Hkv, Lk, D], got None");
  if (!c.v.present) c.v.fail("expected an array [B, Hkv, Lk, Dv], got None");
  if (c.k.rank() != 4) c.k.fail("expected a 4-d array [B, Hkv, Lk, D], got shape " + c.k.shape_text());
  if (c.v.rank() != 4) c.v.fail("expected a 4-d array [B, Hkv, Lk, Dv], got shape " + c.v.shape_text());
  const std::int64_t B = c.q.extent(0), Hq = c.q.extent(1), Lq = c.q.extent(2), Lk = c.k.shape[2], Dv = c.v.shape[3];
  auto [out_py, out] = output<float, 4>(out_obj, fn, "out", {B, Hq, Lq, Dv}, "[B, Hq, Lq, Dv]");
  auto [lse_py, lse] = output<float, 3>(lse_obj, fn, "lse", {B, Hq, Lq}, "[B, Hq, Lq]");
  c.out = out;
  c.lse = lse;
  c.opt = options_of(kw, fn);
  c.mod = build_mod(kw.mods, fn);
  pyb::object sums_py = pyb::none();
  if (column_sums_rows) {
    if (*column_sums_rows < 0)
      mnemo::detail::fail("mnemo.", fn, ": argument column_sums: expected None, 0 (all rows) or n >= 1 (the last n rows), got ",
                          *column_sums_rows);
    out_array<float, 3> s({B, Hq, Lk});
    sums_py = s.array;
    c.cs = attn::column_sums{s.v, *column_sums_rows};
  }
  switch (kn) {
    case kernel::reference: run_reference(c); break;
    case kernel::flash: run_flash(c); break;
    case kernel::decode: run_decode(c); break;
  }
  if (column_sums_rows) return pyb::make_tuple(out_py, lse_py, sums_py);
  return pyb::make_tuple(out_py, lse_py);
}

// The keyword parameters every forward takes, in one place.
#define MNEMO_PY_FWD_PARAMS                                                                                         \
  pyb::handle q, pyb::handle k, pyb::handle v, pyb::handle out, pyb::handle lse, float scale, bool causal,          \
      std::int64_t window, float softcap, pyb::object alibi_slopes, pyb::object document_ids, pyb::object prefix,   \
      pyb::object sinks, std::optional<std::int64_t> column_sums, int threads, std::optional<std::string> isa
#define MNEMO_PY_FWD_KWARGS                                                                                         \
  fwd_kwargs { mod_args{causal, window, softcap, alibi_slopes, document_ids, prefix}, scale, sinks, threads, isa }
#define MNEMO_PY_FWD_ARGS                                                                                           \
  arg("q"), arg("k"), arg("v"), pyb::kw_only(), arg("out") = pyb::none(), arg("lse") = pyb::none(),                \
      arg("scale") = 0.0f, arg("causal") = false, arg("window") = 0, arg("softcap") = 0.0f,                          \
      arg("alibi_slopes") = pyb::none(), arg("document_ids") = pyb::none(), arg("prefix") = pyb::none(),            \
      arg("sinks") = pyb::none(), arg("column_sums") = pyb::none(), arg("threads") = 0, arg("isa") = pyb::none()

constexpr const char* fwd_doc = R"(
q [B, Hq, Lq, D] float32; k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] float32 (or float16 / bfloat16, both
the same dtype). Returns (out [B, Hq, Lq, Dv], lse [B, Hq, Lq]) as float32 arrays, or writes the
given out= / lse= arrays in place and returns them. Inputs are read where they lie (no copy):
any strides with a contiguous innermost axis.

Mods (keyword parameters; DESIGN.md's score order: scale, softcap, ALiBi, mask, softmax):
  scale         0: 1/sqrt(D)
  causal        bottom-right causal (query i sits at key position i + Lk - Lq)
  window        > 0: the causal sliding window of `window` keys ending at the diagonal
  softcap       > 0: s = softcap * tanh(s / softcap)
  alibi_slopes  [Hq] float32: s -= slope_h * |qp - kp|
  document_ids  [Lk] int64, non-decreasing: a query sees keys of its own document only (Lq <= Lk)
  prefix        int: prefix-LM, keys < prefix visible to every query, later keys causally
  sinks         [Hq] float32: one extra logit per query head in the softmax denominator (gpt-oss)
column_sums: None, or 0 (every row) / n (the last n rows): also return the column sums of the
probabilities [B, Hq, Lk] (what SnapKV-style KV policies read).
threads: 0 = the OpenMP default. isa: None (best; $MNEMO_ISA), "scalar", "sse", "avx2", "avx512".
The GIL is released while the kernel runs.)";

pyb::tuple backward(bool reference, pyb::handle q_obj, pyb::handle k_obj, pyb::handle v_obj, pyb::handle out_obj,
                    pyb::handle lse_obj, pyb::handle dout_obj, const fwd_kwargs& kw, bool want_dsinks) {
  const char* fn = reference ? "reference_backward" : "flash_backward";
  const auto q = read(q_obj, fn, "q").as<const float, 4>("[B, Hq, Lq, D]");
  const auto k = read(k_obj, fn, "k").as<const float, 4>("[B, Hkv, Lk, D]");
  const auto v = read(v_obj, fn, "v").as<const float, 4>("[B, Hkv, Lk, Dv]");
  const auto dout = read(dout_obj, fn, "dout").as<const float, 4>("[B, Hq, Lq, Dv]");
  view<const float, 4> out;
  view<const float, 3> lse;
  if (!reference) {
    out = read(out_obj, fn, "out").as<const float, 4>("[B, Hq, Lq, Dv] (the forward's out)");
    lse = read(lse_obj, fn, "lse").as<const float, 3>("[B, Hq, Lq] (the forward's lse)");
  }
  const attn::options opt = options_of(kw, fn);
  const built_mod m = build_mod(kw.mods, fn);
  out_array<float, 4> dq(q.shape()), dk(k.shape()), dv(v.shape());
  pyb::object dsinks_py = pyb::none();
  view<float, 1> dsinks;
  if (want_dsinks) {
    out_array<float, 1> ds({q.extent(1)});
    dsinks_py = ds.array;
    dsinks = ds.v;
  }
  {
    pyb::gil_scoped_release release;
    if (reference) {
      attn::reference_backward(q, k, v, dout, dq.v, dk.v, dv.v, m.dyn, opt, dsinks);
    } else {
      with_mod(m, [&](const auto& mod) { attn::flash_backward(q, k, v, out, lse, dout, dq.v, dk.v, dv.v, mod, opt, dsinks); });
    }
  }
  if (want_dsinks) return pyb::make_tuple(dq.array, dk.array, dv.array, dsinks_py);
  return pyb::make_tuple(dq.array, dk.array, dv.array);
}

}  // namespace

void bind_attention(pyb::module_& root) {
  auto m = root.def_submodule("attention", "Softmax attention: reference, flash, decode, attend, backward, merge.");
  m.attr("decode_max_rows") = attn::decode_max_rows;

  m.def(
      "reference",
      [](MNEMO_PY_FWD_PARAMS) {
        return forward(kernel::reference, "attention.reference", q, k, v, out, lse, MNEMO_PY_FWD_KWARGS, column_sums);
      },
      MNEMO_PY_FWD_ARGS,
      (std::string("attention::reference: double-precision attention, one row at a time (the one to trust).") + fwd_doc)
          .c_str());
  m.def(
      "flash",
      [](MNEMO_PY_FWD_PARAMS) {
        return forward(kernel::flash, "attention.flash", q, k, v, out, lse, MNEMO_PY_FWD_KWARGS, column_sums);
      },
      MNEMO_PY_FWD_ARGS,
      (std::string("attention::flash: the tiled FlashAttention-2 forward (prefill).") + fwd_doc).c_str());
  m.def(
      "decode",
      [](MNEMO_PY_FWD_PARAMS) {
        return forward(kernel::decode, "attention.decode", q, k, v, out, lse, MNEMO_PY_FWD_KWARGS, column_sums);
      },
      MNEMO_PY_FWD_ARGS,
      (std::string("attention::decode: split-KV decode for Lq <= decode_max_rows (16) query rows.") + fwd_doc).c_str());
  m.def(
      "attend",
      [](MNEMO_PY_FWD_PARAMS, const std::string& path) {
        kernel kn = kernel::flash;
        if (path == "auto" || path == "automatic") {
          const auto qa = read(q, "attention.attend", "q");
          kn = qa.rank() == 4 && qa.shape[2] <= attn::decode_max_rows ? kernel::decode : kernel::flash;
        }
        else if (path == "reference") kn = kernel::reference;
        else if (path == "flash") kn = kernel::flash;
        else if (path == "decode") kn = kernel::decode;
        else
          mnemo::detail::fail("mnemo.attention.attend: argument path: expected 'auto', 'reference', 'flash' or 'decode', got '",
                              path, "'");
        return forward(kn, "attention.attend", q, k, v, out, lse, MNEMO_PY_FWD_KWARGS, column_sums);
      },
      MNEMO_PY_FWD_ARGS, arg("path") = "auto",
      (std::string("attention::attend: the automatic choice (decode for Lq <= 16, flash otherwise), or "
                   "path='reference' | 'flash' | 'decode'.") +
       fwd_doc)
          .c_str());

  m.def(
      "flash_backward",
      [](pyb::handle q, pyb::handle k, pyb::handle v, pyb::handle out, pyb::handle lse, pyb::handle dout, float scale,
         bool causal, std::int64_t window, float softcap, pyb::object alibi_slopes, pyb::object document_ids,
         pyb::object prefix, pyb::object sinks, bool dsinks, int threads, std::optional<std::string> isa) {
        const std::optional<std::int64_t> column_sums;
        (void)column_sums;
        return backward(false, q, k, v, out, lse, dout, MNEMO_PY_FWD_KWARGS, dsinks);
      },
      arg("q"), arg("k"), arg("v"), arg("out"), arg("lse"), arg("dout"), pyb::kw_only(), arg("scale") = 0.0f,
      arg("causal") = false, arg("window") = 0, arg("softcap") = 0.0f, arg("alibi_slopes") = pyb::none(),
      arg("document_ids") = pyb::none(), arg("prefix") = pyb::none(), arg("sinks") = pyb::none(),
      arg("dsinks") = false, arg("threads") = 0, arg("isa") = pyb::none(),
      "attention::flash_backward: gradients (dq, dk, dv) of sum(out * dout) from the forward's out and lse "
      "(float32 K/V); dk, dv summed over each kv head's query heads. dsinks=True also returns the sinks' "
      "gradient [Hq]. The same mod keywords as the forward.");
  m.def(
      "reference_backward",
      [](pyb::handle q, pyb::handle k, pyb::handle v, pyb::handle dout, float scale, bool causal, std::int64_t window,
         float softcap, pyb::object alibi_slopes, pyb::object document_ids, pyb::object prefix, pyb::object sinks,
         bool dsinks, int threads, std::optional<std::string> isa) {
        return backward(true, q, k, v, pyb::none(), pyb::none(), dout, MNEMO_PY_FWD_KWARGS, dsinks);
      },
      arg("q"), arg("k"), arg("v"), arg("dout"), pyb::kw_only(), arg("scale") = 0.0f, arg("causal") = false,
      arg("window") = 0, arg("softcap") = 0.0f, arg("alibi_slopes") = pyb::none(), arg("document_ids") = pyb::none(),
      arg("prefix") = pyb::none(), arg("sinks") = pyb::none(), arg("dsinks") = false, arg("threads") = 0,
      arg("isa") = pyb::none(),
      "attention::reference_backward: the double-precision gradients (dq, dk, dv[, dsinks]).");

  m.def(
      "merge",
      [](pyb::handle out_a, pyb::handle lse_a, pyb::handle out_b, pyb::handle lse_b, pyb::handle out, pyb::handle lse,
         int threads) {
        const char* fn = "attention.merge";
        const auto oa = read(out_a, fn, "out_a").as<const float, 4>("[B, Hq, Lq, Dv]");
        const auto la = read(lse_a, fn, "lse_a").as<const float, 3>("[B, Hq, Lq]");
        const auto ob = read(out_b, fn, "out_b").as<const float, 4>("[B, Hq, Lq, Dv]");
        const auto lb = read(lse_b, fn, "lse_b").as<const float, 3>("[B, Hq, Lq]");
        auto [out_py, o] = output<float, 4>(out, fn, "out", oa.shape(), "[B, Hq, Lq, Dv]");
        auto [lse_py, l] = output<float, 3>(lse, fn, "lse", la.shape(), "[B, Hq, Lq]");
        {
          pyb::gil_scoped_release release;
          attn::merge(oa, la, ob, lb, o, l, threads);
        }
        return pyb::make_tuple(out_py, lse_py);
      },
      arg("out_a"), arg("lse_a"), arg("out_b"), arg("lse_b"), pyb::kw_only(), arg("out") = pyb::none(),
      arg("lse") = pyb::none(), arg("threads") = 0,
      "attention::merge: two partial attentions over disjoint key ranges -> (out, lse) over all keys. "
      "An empty part (lse = -inf) has weight 0.");

  root.def("last_kernel_ns", [] { return last_kernel_ns(); },
           "The kernel's own wall time (ns) of the last attention forward call, timed inside the binding "
           "with the GIL released: the call overhead is the Python-side time minus this.");
}

}  // namespace mnemo::py
