// python/src/kvcache.cpp — mnemo.kvcache: LayerCache (dense / KIVI-quantized, one layer), decode from
// it. PagedCache and paged_attention are paged.cpp, the policies policies.cpp: three TUs that
// compile in parallel (the cache decodes over every storage kind are the heaviest part).
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kv_common.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/decode.hpp"

namespace mnemo::py {

namespace {

using pyb::arg;
namespace kv = mnemo::kvcache;
namespace attn = mnemo::attention;

attn::options options_of(float scale, pyb::object sinks, int threads, const std::optional<std::string>& isa,
                         const char* fn) {
  attn::options opt;
  opt.scale = scale;
  opt.threads = threads;
  opt.isa = isa_of(isa);
  opt.sinks = read(sinks, fn, "sinks").maybe<const float, 1>("[Hq]");
  return opt;
}

}  // namespace

void bind_kvcache(pyb::module_& root) {
  auto m = root.def_submodule("kvcache", "KV caches (dense, quantized, paged), decode from them, RoPE, KV policies.");

  // ---- LayerCache -------------------------------------------------------------------------------
  pyb::class_<kv::layer_cache>(m, "LayerCache",
                               "kvcache::layer_cache: the KV cache of one attention layer, K [Hkv, capacity, D] and V "
                               "[Hkv, capacity, Dv] in f32, f16, bf16 or KIVI int8 / int4 / int2, per-head lengths.")
      .def(pyb::init([](const std::string& kind, std::int64_t Hkv, std::int64_t capacity, std::int64_t D,
                        std::int64_t Dv, std::int64_t key_group, std::int64_t value_group, std::int64_t residual,
                        bool rotate) {
             kv::cache_config cfg;
             cfg.kind = storage_of(kind, "kvcache.LayerCache");
             cfg.Hkv = Hkv;
             cfg.capacity = capacity;
             cfg.D = D;
             cfg.Dv = Dv;
             cfg.quant = {key_group, value_group, residual};
             if (rotate) cfg.rotate.kind = kv::rotation::hadamard;
             return kv::layer_cache(cfg);
           }),
           pyb::kw_only(), arg("kind") = "f32", arg("Hkv"), arg("capacity"), arg("D"), arg("Dv") = 0,
           arg("key_group") = 128, arg("value_group") = 128, arg("residual") = 128, arg("rotate") = false)
      .def_property_readonly("kind", [](const kv::layer_cache& c) { return kv::storage_name(c.kind()); })
      .def_property_readonly("num_heads", &kv::layer_cache::num_heads)
      .def_property_readonly("capacity", &kv::layer_cache::capacity)
      .def_property_readonly("head_dim", &kv::layer_cache::head_dim)
      .def_property_readonly("value_dim", &kv::layer_cache::value_dim)
      .def_property_readonly("lengths", &kv::layer_cache::lengths)
      .def_property_readonly("max_length", &kv::layer_cache::max_length)
      .def_property_readonly("next_position", &kv::layer_cache::next_position)
      .def("length", &kv::layer_cache::length, arg("h"))
      .def("bytes", &kv::layer_cache::bytes, "Bytes the stored tokens occupy.")
      .def(
          "positions",
          [](const kv::layer_cache& c, std::int64_t h) {
            const auto p = c.positions(h);
            return int64_array(p.data(), p.size());
          },
          arg("h"), "The original positions of head h's slots (a copy).")
      .def(
          "append",
          [](kv::layer_cache& c, pyb::handle k, pyb::handle v, pyb::handle positions) {
            const char* fn = "kvcache.LayerCache.append";
            const auto kk = read(k, fn, "k").as<const float, 3>("[Hkv, n, D]");
            const auto vv = read(v, fn, "v").as<const float, 3>("[Hkv, n, Dv]");
            if (positions.is_none()) {
              pyb::gil_scoped_release release;
              c.append(kk, vv);
            } else {
              const auto p = read(positions, fn, "positions").as<const std::int64_t, 1>("[n]");
              std::vector<std::int64_t> pv(static_cast<std::size_t>(p.extent(0)));
              for (std::int64_t i = 0; i < p.extent(0); ++i) pv[static_cast<std::size_t>(i)] = p(i);
              pyb::gil_scoped_release release;
              c.append(kk, vv, pv);
            }
          },
          arg("k"), arg("v"), arg("positions") = pyb::none(),
          "Appends n tokens to every kv head: k [Hkv, n, D], v [Hkv, n, Dv] float32 (positions [n] int64: the "
          "tokens' original positions; default next_position .. + n).")
      .def("clear", &kv::layer_cache::clear)
      .def(
          "compact", [](kv::layer_cache& c, pyb::handle kept) { c.compact(selection_of(kept, "kvcache.LayerCache.compact")); },
          arg("kept"), "Keeps the given slots of every head (a list of ascending int64 index arrays, one per kv head).")
      .def(
          "keys", [](const kv::layer_cache& c) { return copy_out(c.keys()); },
          "The keys as float32 [Hkv, max_length, D] (dequantized, rotated back; a copy).")
      .def(
          "values", [](const kv::layer_cache& c) { return copy_out(c.values()); },
          "The values as float32 [Hkv, max_length, Dv] (a copy).");

  m.def(
      "decode",
      [](const kv::layer_cache& c, pyb::handle q_o, pyb::handle out_o, pyb::handle lse_o, float scale, bool causal,
         std::int64_t window, float softcap, pyb::object alibi_slopes, pyb::object sinks, bool column_sums, int threads,
         std::optional<std::string> isa) {
        const char* fn = "kvcache.decode";
        const auto q = read(q_o, fn, "q").as<const float, 3>("[Hq, Lq, D]");
        auto [out_py, out] = output<float, 3>(out_o, fn, "out", {q.extent(0), q.extent(1), c.value_dim()}, "[Hq, Lq, Dv]");
        auto [lse_py, lse] = output<float, 2>(lse_o, fn, "lse", {q.extent(0), q.extent(1)}, "[Hq, Lq]");
        const attn::options opt = options_of(scale, sinks, threads, isa, fn);
        const built_mod mod = build_mod(mod_args{causal, window, softcap, alibi_slopes, pyb::none(), pyb::none()}, fn);
        pyb::object sums_py = pyb::none();
        kv::column_sums cs;
        if (column_sums) {
          out_array<float, 2> s({q.extent(0), c.max_length()});
          sums_py = s.array;
          cs.sums = s.v;
        }
        {
          pyb::gil_scoped_release release;
          attn::decode_workspace ws;
          if (mod.choice == mod_choice::none) kv::decode(c, q, out, lse, opt, ws, cs);
          else kv::decode(c, q, out, lse, mod.dyn, opt, ws, cs);
        }
        if (column_sums) return pyb::make_tuple(out_py, lse_py, sums_py);
        return pyb::make_tuple(out_py, lse_py);
      },
      arg("cache"), arg("q"), pyb::kw_only(), arg("out") = pyb::none(), arg("lse") = pyb::none(), arg("scale") = 0.0f,
      arg("causal") = false, arg("window") = 0, arg("softcap") = 0.0f, arg("alibi_slopes") = pyb::none(),
      arg("sinks") = pyb::none(), arg("column_sums") = false, arg("threads") = 0, arg("isa") = pyb::none(),
      "kvcache::decode: q [Hq, Lq, D] (Lq <= 16, the newest tokens) against every slot of its kv head, in any "
      "storage kind. Returns (out [Hq, Lq, Dv], lse [Hq, Lq][, column sums [Hq, max_length]]). Without a mod it "
      "runs mnemo::prebuilt's AVX2 / AVX-512 kernel when linked; mods see key j at slot j.");


  bind_paged(m);
  bind_policies(m);
}

}  // namespace mnemo::py
