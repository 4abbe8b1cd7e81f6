// python/src/paged.cpp — mnemo.kvcache.PagedCache (kvcache/paged.hpp: pages, block tables, forks,
// copy on write) and mnemo.kvcache.paged_attention (kvcache/paged_attention.hpp) from it.
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kv_common.hpp"
#include "mnemo/kvcache/paged.hpp"
#include "mnemo/kvcache/paged_attention.hpp"

namespace mnemo::py {

namespace {

using pyb::arg;
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

void bind_paged(pyb::module_& m) {
  // ---- PagedCache -------------------------------------------------------------------------------
  pyb::class_<kv::paged_cache>(m, "PagedCache",
                               "kvcache::paged_cache: a pool of fixed-size pages for many sequences, block tables, "
                               "prefix sharing by fork(), copy on write, truncate, keep_last, compact.")
      .def(pyb::init([](const std::string& kind, std::int64_t Hkv, std::int64_t D, std::int64_t Dv,
                        std::int64_t page_size, std::int64_t num_pages, std::int64_t value_group) {
             kv::paged_config cfg;
             cfg.kind = storage_of(kind, "kvcache.PagedCache");
             cfg.Hkv = Hkv;
             cfg.D = D;
             cfg.Dv = Dv;
             cfg.page_size = page_size;
             cfg.num_pages = num_pages;
             cfg.value_group = value_group;
             return kv::paged_cache(cfg);
           }),
           pyb::kw_only(), arg("kind") = "f32", arg("Hkv"), arg("D"), arg("Dv") = 0, arg("page_size") = 16,
           arg("num_pages"), arg("value_group") = 128)
      .def_property_readonly("kind", [](const kv::paged_cache& c) { return kv::storage_name(c.kind()); })
      .def_property_readonly("num_heads", &kv::paged_cache::num_heads)
      .def_property_readonly("head_dim", &kv::paged_cache::head_dim)
      .def_property_readonly("value_dim", &kv::paged_cache::value_dim)
      .def_property_readonly("page_size", &kv::paged_cache::page_size)
      .def_property_readonly("num_pages", &kv::paged_cache::num_pages)
      .def_property_readonly("free_pages", &kv::paged_cache::free_pages)
      .def_property_readonly("num_sequences", &kv::paged_cache::num_sequences)
      .def("create", &kv::paged_cache::create, "A new, empty sequence; returns its id.")
      .def("fork", &kv::paged_cache::fork, arg("parent"), "A new sequence sharing parent's pages (no copy).")
      .def("release", &kv::paged_cache::release, arg("s"))
      .def("length", &kv::paged_cache::length, arg("s"), arg("h"))
      .def("max_length", &kv::paged_cache::max_length, arg("s"))
      .def("references", &kv::paged_cache::references, arg("page"))
      .def(
          "block_table",
          [](const kv::paged_cache& c, std::int64_t s) {
            const auto t = c.block_table(s);
            const std::vector<std::int64_t> ids(t.begin(), t.end());
            return int64_array(ids.data(), ids.size());
          },
          arg("s"), "Sequence s's page ids (a copy, int64).")
      .def(
          "append",
          [](kv::paged_cache& c, std::int64_t s, pyb::handle k, pyb::handle v) {
            const char* fn = "kvcache.PagedCache.append";
            const auto kk = read(k, fn, "k").as<const float, 3>("[Hkv, n, D]");
            const auto vv = read(v, fn, "v").as<const float, 3>("[Hkv, n, Dv]");
            pyb::gil_scoped_release release;
            c.append(s, kk, vv);
          },
          arg("s"), arg("k"), arg("v"), "Appends k [Hkv, n, D], v [Hkv, n, Dv] float32 to sequence s.")
      .def("truncate", &kv::paged_cache::truncate, arg("s"), arg("n"), "Drops sequence s's last n tokens.")
      .def("keep_last", &kv::paged_cache::keep_last, arg("s"), arg("window"))
      .def(
          "compact",
          [](kv::paged_cache& c, std::int64_t s, pyb::handle kept) {
            c.compact(s, selection_of(kept, "kvcache.PagedCache.compact"));
          },
          arg("s"), arg("kept"));

  m.def(
      "paged_attention",
      [](const kv::paged_cache& c, std::vector<std::int64_t> seqs, pyb::handle q_o, pyb::handle cu_o, float scale,
         bool causal, std::int64_t window, float softcap, pyb::object sinks, int threads, std::optional<std::string> isa) {
        const char* fn = "kvcache.paged_attention";
        const auto q = read(q_o, fn, "q").as<const float, 3>("[T, Hq, D]");
        const auto cu = read(cu_o, fn, "cu_seqlens_q").as<const std::int64_t, 1>("[B + 1]");
        const attn::options opt = options_of(scale, sinks, threads, isa, fn);
        const built_mod mod = build_mod(mod_args{causal, window, softcap, pyb::none(), pyb::none(), pyb::none()}, fn);
        out_array<float, 3> out({q.extent(0), q.extent(1), c.value_dim()});
        out_array<float, 2> lse({q.extent(0), q.extent(1)});
        {
          pyb::gil_scoped_release release;
          kv::paged_attention(c, std::span<const std::int64_t>(seqs), q, cu, out.v, lse.v, mod.dyn, opt);
        }
        return pyb::make_tuple(out.array, lse.array);
      },
      arg("cache"), arg("seqs"), arg("q"), arg("cu_seqlens_q"), pyb::kw_only(), arg("scale") = 0.0f,
      arg("causal") = false, arg("window") = 0, arg("softcap") = 0.0f, arg("sinks") = pyb::none(), arg("threads") = 0,
      arg("isa") = pyb::none(),
      "kvcache::paged_attention: packed queries q [T, Hq, D] of the sequences seqs (rows cu_seqlens_q[b] .. "
      "cu_seqlens_q[b+1]-1, their newest tokens) against a PagedCache in any storage kind. Returns (out, lse).");

}

}  // namespace mnemo::py
