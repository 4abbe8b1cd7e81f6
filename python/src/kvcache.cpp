// python/src/kvcache.cpp — mnemo.kvcache: LayerCache (dense / KIVI-quantized, one layer), decode from
// it, PagedCache (pages, block tables, forks) and paged_attention from it, and the KV policies of
// mnemo's policy list (kvcache/policies/list.hpp) by name, plus the scores of the policies the golden
// cases cover.
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/decode.hpp"
#include "mnemo/kvcache/paged.hpp"
#include "mnemo/kvcache/paged_attention.hpp"
#include "mnemo/kvcache/policies.hpp"
#include "mnemo/kvcache/policies/list.hpp"

namespace mnemo::py {

namespace {

using pyb::arg;
namespace kv = mnemo::kvcache;
namespace pol = mnemo::kvcache::policies;
namespace attn = mnemo::attention;

kv::storage storage_of(const std::string& s, const char* fn) {
  for (kv::storage k : kv::layer_storages)
    if (s == kv::storage_name(k)) return k;
  mnemo::detail::fail("mnemo.", fn, ": argument kind: expected f32, f16, bf16, int8, int4 or int2, got '", s, "'");
}

// A selection from Python: a sequence of per-head int64 index arrays (or lists).
kv::selection selection_of(pyb::handle obj, const char* fn) {
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

pyb::list selection_to_py(const kv::selection& sel) {
  pyb::list l;
  for (const auto& row : sel.heads) l.append(int64_array(row.data(), row.size()));
  return l;
}

attn::options options_of(float scale, pyb::object sinks, int threads, const std::optional<std::string>& isa,
                         const char* fn) {
  attn::options opt;
  opt.scale = scale;
  opt.threads = threads;
  opt.isa = isa_of(isa);
  opt.sinks = read(sinks, fn, "sinks").maybe<const float, 1>("[Hq]");
  return opt;
}

// The observation of a policy call, from Python arrays (each optional but k).
struct observation_args {
  pol::observation o;
  std::vector<std::uint8_t> special, punct;
};

observation_args observation_of(const char* fn, pyb::handle k, pyb::handle v, pyb::handle q, pyb::handle attn_sums,
                                pyb::handle special, pyb::handle punct, std::int64_t layer, std::int64_t layers,
                                bool causal) {
  observation_args a;
  a.o.k = read(k, fn, "k").as<const float, 3>("[Hkv, L, D]");
  a.o.v = read(v, fn, "v").maybe<const float, 3>("[Hkv, L, Dv]");
  a.o.q = read(q, fn, "q").maybe<const float, 3>("[Hq, Lw, D]");
  a.o.attn = read(attn_sums, fn, "attn").maybe<const float, 2>("[Hq, L]");
  auto flags = [&](pyb::handle obj, const char* name, std::vector<std::uint8_t>& out) {
    if (obj.is_none()) return;
    const in_arg f = read(obj, fn, name);
    if (f.type == dt::u8) {
      const auto x = f.as<const std::uint8_t, 1>("[L]");
      for (std::int64_t i = 0; i < x.extent(0); ++i) out.push_back(x(i));
    } else {
      const auto x = f.as<const std::int64_t, 1>("[L] (uint8 or int64 flags)");
      for (std::int64_t i = 0; i < x.extent(0); ++i) out.push_back(x(i) != 0);
    }
  };
  flags(special, "special", a.special);
  flags(punct, "punct", a.punct);
  a.o.special = a.special;
  a.o.punct = a.punct;
  a.o.layer = layer;
  a.o.layers = layers;
  a.o.causal = causal;
  return a;
}

// A new numpy array holding a copy of tensor t.
template <int R>
pyb::object copy_out(const tensor<float, R>& t) {
  out_array<float, R> a(t.shape());
  std::copy_n(t.data(), t.size(), a.v.data());
  return a.array;
}

const char* axis_name(pol::axis a) { return a == pol::axis::slots ? "slots" : "channels"; }
const char* rows_name(pol::attn_rows r) {
  return r == pol::attn_rows::window ? "window" : r == pol::attn_rows::all ? "all" : "last";
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

  // ---- policies ---------------------------------------------------------------------------------
  auto p = m.def_submodule("policies", "KV-cache policies: every entry of mnemo's policy list by name "
                                       "(kvcache/policies/list.hpp), and the scores of the kvpress-style ones.");
  p.def(
      "names", [] {
        std::vector<std::string> n;
        for (const auto& e : pol::all()) n.emplace_back(e.name);
        return n;
      },
      "The names of every policy in the list, in the benchmark's order.");
  p.def(
      "info",
      [](const std::string& name) {
        const pol::entry& e = pol::find(name);
        pyb::dict d;
        d["name"] = std::string(e.name);
        d["selects"] = axis_name(e.selects);
        d["attn_rows"] = rows_name(e.rows);
        d["has_tracker"] = static_cast<bool>(e.make_tracker);
        d["merges"] = static_cast<bool>(e.plan);
        return d;
      },
      arg("name"),
      "What a policy selects ('slots' or 'channels': ThinK's budget counts key channels), which query rows its attn "
      "must sum ('window': the Lw rows of q, 'all': every prompt row, 'last': the newest), and whether it has a "
      "decode tracker / merges evicted tokens.");
  p.def(
      "select",
      [](const std::string& name, pyb::handle k, std::int64_t budget, pyb::handle v, pyb::handle q, pyb::handle attn_sums,
         pyb::handle special, pyb::handle punct, std::int64_t layer, std::int64_t layers, bool causal) {
        const pol::entry& e = pol::find(name);
        const observation_args a =
            observation_of("kvcache.policies.select", k, v, q, attn_sums, special, punct, layer, layers, causal);
        kv::selection sel;
        {
          pyb::gil_scoped_release release;
          sel = e.select(a.o, budget);
        }
        return selection_to_py(sel);
      },
      arg("name"), arg("k"), arg("budget"), pyb::kw_only(), arg("v") = pyb::none(), arg("q") = pyb::none(),
      arg("attn") = pyb::none(), arg("special") = pyb::none(), arg("punct") = pyb::none(), arg("layer") = 0,
      arg("layers") = 1, arg("causal") = true,
      "The policy `name` of the list, with its default parameters, on one layer's prefill: k [Hkv, L, D] "
      "(post-RoPE), v [Hkv, L, Dv], q [Hq, Lw, D] (the observation window: the last Lw queries), attn [Hq, L] "
      "(column sums of those rows' attention: attention.flash(..., causal=True, column_sums=Lw)[2][b]), FastGen's "
      "special / punct flags [L], PyramidKV's layer of layers. Returns the kept slot indices per kv head (ascending "
      "int64 arrays); for 'think' the kept key channels.");

  p.def(
      "scores",
      [](const std::string& name, pyb::handle k, pyb::handle q, pyb::handle attn_sums, std::int64_t budget,
         std::int64_t n_sink, std::int64_t window, std::int64_t kernel_size, pyb::handle filters) {
        const char* fn = "kvcache.policies.scores";
        observation_args a = observation_of(fn, k, pyb::none(), q, attn_sums, pyb::none(), pyb::none(), 0, 1, true);
        const std::int64_t Hkv = a.o.k.extent(0), L = a.o.k.extent(1), D = a.o.k.extent(2);
        tensor<float, 2> f;
        if (name == "think") {
          out_array<float, 2> s({Hkv, D});
          pol::think{}.scores(a.o, s.v);
          return pyb::object(s.array);
        }
        out_array<float, 2> s({Hkv, L});
        if (name == "streaming_llm") pol::streaming_llm{n_sink}.scores(a.o, budget, s.v);
        else if (name == "snapkv") pol::snapkv{window, kernel_size}.scores(a.o, s.v);
        else if (name == "h2o") pol::h2o{}.scores(a.o, s.v);
        else if (name == "tova") pol::tova{}.scores(a.o, s.v);
        else if (name == "knorm") pol::knorm{}.scores(a.o, s.v);
        else if (name == "qfilter") {
          const auto fv = read(filters, fn, "filters").as<const float, 2>("[Hkv, D]");
          pol::qfilter{fv}.scores(a.o, s.v);
        } else {
          mnemo::detail::fail("mnemo.", fn, ": argument name: expected streaming_llm, snapkv, h2o, tova, knorm, qfilter "
                              "or think, got '", name, "'");
        }
        return pyb::object(s.array);
      },
      arg("name"), arg("k"), pyb::kw_only(), arg("q") = pyb::none(), arg("attn") = pyb::none(), arg("budget") = 0,
      arg("n_sink") = 4, arg("window") = 32, arg("kernel_size") = 5, arg("filters") = pyb::none(),
      "Per-slot scores [Hkv, L] (higher = keep) of the kvpress-style policies with explicit parameters: "
      "streaming_llm (n_sink, budget), snapkv (window, kernel_size; attn = the window rows' column sums), h2o "
      "(observed attention; attn over every row), tova (attn of the last row), knorm, qfilter (filters [Hkv, D]); "
      "think: channel scores [Hkv, D] from q [Hq, window, D].");
  p.def(
      "top_budget",
      [](pyb::handle scores, std::int64_t budget) {
        const auto s = read(scores, "kvcache.policies.top_budget", "scores").as<const float, 2>("[Hkv, L]");
        return selection_to_py(kv::top_budget(s, budget));
      },
      arg("scores"), arg("budget"), "Per head: the min(budget, L) indices with the largest scores, ascending.");
  p.def(
      "think_prune",
      [](pyb::handle k, pyb::handle kept) {
        const char* fn = "kvcache.policies.think_prune";
        const auto kk = read(k, fn, "k").as<const float, 3>("[Hkv, L, D]");
        out_array<float, 3> out(kk.shape());
        pol::think::prune(kk, selection_of(kept, fn), out.v);
        return out.array;
      },
      arg("k"), arg("kept"), "ThinK: k [Hkv, L, D] with the channels not in kept (per head) set to 0 (a new array).");
  p.def(
      "qfilter_fit",
      [](pyb::handle q, std::int64_t Hkv) {
        const auto qq = read(q, "kvcache.policies.qfilter_fit", "q").as<const float, 3>("[Hq, Lw, D]");
        const tensor<float, 2> f = pol::qfilter::fit(qq, Hkv);
        return copy_out(f);
      },
      arg("q"), arg("Hkv"), "Q-Filters: the filters [Hkv, D] fitted on the queries q [Hq, Lw, D].");
}

}  // namespace mnemo::py
