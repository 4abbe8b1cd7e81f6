// python/src/policies.cpp — mnemo.kvcache.policies: every KV policy of mnemo's policy list
// (kvcache/policies/list.hpp) by name, and the scores of the kvpress-style policies the golden cases
// cover, with explicit parameters.
#include <string>
#include <vector>

#include "kv_common.hpp"
#include "mnemo/kvcache/policies.hpp"
#include "mnemo/kvcache/policies/list.hpp"

namespace mnemo::py {

namespace {

using pyb::arg;
namespace pol = mnemo::kvcache::policies;

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

const char* axis_name(pol::axis a) { return a == pol::axis::slots ? "slots" : "channels"; }
const char* rows_name(pol::attn_rows r) {
  return r == pol::attn_rows::window ? "window" : r == pol::attn_rows::all ? "all" : "last";
}

}  // namespace

void bind_policies(pyb::module_& m) {
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
