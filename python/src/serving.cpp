// python/src/serving.cpp — mnemo.attention.paged (packed variable-length queries against a paged
// K/V pool), mnemo.attention.sigmoid (sigmoid attention), mnemo.attention.landmark (landmark
// attention), mnemo.kvcache.apply_rope (rotary embedding with the context-extension schemes).
#include <optional>
#include <span>
#include <string>

#include "common.hpp"
#include "mnemo/attention/landmark.hpp"
#include "mnemo/attention/paged.hpp"
#include "mnemo/attention/sigmoid.hpp"
#include "mnemo/kvcache/rope.hpp"

namespace mnemo::py {

namespace {

using pyb::arg;
namespace attn = mnemo::attention;

kvcache::rope_scaling scheme_of(const std::string& s) {
  if (s == "default" || s == "none") return kvcache::rope_scaling::none;
  if (s == "linear") return kvcache::rope_scaling::linear;
  if (s == "dynamic") return kvcache::rope_scaling::dynamic;
  if (s == "yarn") return kvcache::rope_scaling::yarn;
  if (s == "llama3") return kvcache::rope_scaling::llama3;
  if (s == "longrope") return kvcache::rope_scaling::longrope;
  mnemo::detail::fail("mnemo.kvcache.apply_rope: argument scheme: expected default, linear, dynamic, yarn, llama3 or "
                      "longrope, got '", s, "'");
}

}  // namespace

void bind_serving(pyb::module_& root) {
  auto m = pyb::reinterpret_borrow<pyb::module_>(root.attr("attention"));

  m.def(
      "paged",
      [](pyb::handle q_o, pyb::handle cu_o, pyb::handle kp_o, pyb::handle vp_o, pyb::handle bt_o, pyb::handle sl_o,
         pyb::handle starts_o, float scale, bool causal, std::int64_t window, float softcap, pyb::object sinks_o,
         bool reference, int threads, std::optional<std::string> isa) {
        const char* fn = "attention.paged";
        const auto q = read(q_o, fn, "q").as<const float, 3>("[T, Hq, D]");
        const auto cu = read(cu_o, fn, "cu_seqlens_q").as<const std::int64_t, 1>("[B + 1]");
        const auto kp = read(kp_o, fn, "k_pages").as<const float, 4>("[num_pages, page_size, Hkv, D]");
        const auto vp = read(vp_o, fn, "v_pages").as<const float, 4>("[num_pages, page_size, Hkv, Dv]");
        const auto bt = read(bt_o, fn, "block_table").as<const std::int64_t, 2>("[B, max_pages]");
        const auto sl = read(sl_o, fn, "seq_lens").as<const std::int64_t, 1>("[B]");
        const auto st = read(starts_o, fn, "seq_starts").maybe<const std::int64_t, 1>("[B]");
        attn::options opt;
        opt.scale = scale;
        opt.threads = threads;
        opt.isa = isa_of(isa);
        opt.sinks = read(sinks_o, fn, "sinks").maybe<const float, 1>("[Hq]");
        const built_mod mod = build_mod(mod_args{causal, window, softcap, pyb::none(), pyb::none(), pyb::none()}, fn);
        const attn::paged_kv<float> kv{kp, vp, bt, sl, st};
        out_array<float, 3> out({q.extent(0), q.extent(1), vp.extent(3)});
        out_array<float, 2> lse({q.extent(0), q.extent(1)});
        {
          pyb::gil_scoped_release release;
          if (reference) attn::reference_paged(q, cu, kv, out.v, lse.v, mod.dyn, opt);
          else attn::paged(q, cu, kv, out.v, lse.v, mod.dyn, opt);
        }
        return pyb::make_tuple(out.array, lse.array);
      },
      arg("q"), arg("cu_seqlens_q"), arg("k_pages"), arg("v_pages"), arg("block_table"), arg("seq_lens"),
      pyb::kw_only(), arg("seq_starts") = pyb::none(), arg("scale") = 0.0f, arg("causal") = false, arg("window") = 0,
      arg("softcap") = 0.0f, arg("sinks") = pyb::none(), arg("reference") = false, arg("threads") = 0,
      arg("isa") = pyb::none(),
      "attention::paged: packed queries q [T, Hq, D] of B sequences (rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1, "
      "the sequence's last tokens) against pages k_pages [P, page_size, Hkv, D], v_pages [P, page_size, Hkv, Dv] "
      "(vLLM's NHD layout) through block_table [B, max_pages] int64 and seq_lens [B] int64. Returns (out [T, Hq, Dv], "
      "lse [T, Hq]). reference=True: attention::reference_paged (double).");

  m.def(
      "sigmoid",
      [](pyb::handle q_o, pyb::handle k_o, pyb::handle v_o, float bias, float scale, bool causal, std::int64_t window,
         bool reference, int threads, std::optional<std::string> isa) {
        const char* fn = "attention.sigmoid";
        const auto q = read(q_o, fn, "q").as<const float, 4>("[B, Hq, Lq, D]");
        const auto k = read(k_o, fn, "k").as<const float, 4>("[B, Hkv, Lk, D]");
        const auto v = read(v_o, fn, "v").as<const float, 4>("[B, Hkv, Lk, Dv]");
        attn::options opt;
        opt.scale = scale;
        opt.threads = threads;
        opt.isa = isa_of(isa);
        const built_mod mod = build_mod(mod_args{causal, window, 0.0f, pyb::none(), pyb::none(), pyb::none()}, fn);
        out_array<float, 4> out({q.extent(0), q.extent(1), q.extent(2), v.extent(3)});
        {
          pyb::gil_scoped_release release;
          if (reference) attn::reference_sigmoid_attention(q, k, v, out.v, mod.dyn, opt, bias);
          else attn::sigmoid_attention(q, k, v, out.v, mod.dyn, opt, bias);
        }
        return out.array;
      },
      arg("q"), arg("k"), arg("v"), pyb::kw_only(), arg("bias"), arg("scale") = 0.0f, arg("causal") = false,
      arg("window") = 0, arg("reference") = false, arg("threads") = 0, arg("isa") = pyb::none(),
      "Sigmoid attention (Ramapuram et al. 2024): out_i = sum_visible sigmoid(scale q_i.k_j + bias) v_j, no "
      "normaliser. Returns out [B, Hq, Lq, Dv].");

  m.def(
      "landmark",
      [](pyb::handle q_o, pyb::handle k_o, pyb::handle v_o, pyb::handle is_mem_o, float scale, bool weights,
         bool reference, int threads) {
        const char* fn = "attention.landmark";
        const auto q = read(q_o, fn, "q").as<const float, 4>("[B, H, L, D]");
        const auto k = read(k_o, fn, "k").as<const float, 4>("[B, H, L, D]");
        const auto v = read(v_o, fn, "v").as<const float, 4>("[B, H, L, Dv]");
        const auto is_mem = read(is_mem_o, fn, "is_mem").as<const std::int64_t, 1>("[L]");
        out_array<float, 4> out({q.extent(0), q.extent(1), q.extent(2), v.extent(3)});
        pyb::object w_py = pyb::none();
        view<float, 4> w;
        if (weights || reference) {
          out_array<float, 4> wa({q.extent(0), q.extent(1), q.extent(2), k.extent(2)});
          w_py = wa.array;
          w = wa.v;
        }
        {
          pyb::gil_scoped_release release;
          if (reference) attn::reference_landmark_attention(q, k, v, is_mem, out.v, w, scale);
          else attn::landmark_attention(q, k, v, is_mem, out.v, w, scale, threads);
        }
        return pyb::make_tuple(out.array, w_py);
      },
      arg("q"), arg("k"), arg("v"), arg("is_mem"), pyb::kw_only(), arg("scale") = 0.0f, arg("weights") = false,
      arg("reference") = false, arg("threads") = 0,
      "Landmark attention (Mohtashami & Jaggi 2023), causal grouped softmax: is_mem [L] int64 marks the landmark "
      "tokens. Returns (out [B, H, L, Dv], weights [B, H, L, L] or None).");

  auto kv = pyb::reinterpret_borrow<pyb::module_>(root.attr("kvcache"));
  kv.def(
      "apply_rope",
      [](pyb::handle x_o, pyb::handle pos_o, std::int64_t rotary_dim, double base, const std::string& layout,
         const std::string& scheme, double factor, std::int64_t original_max_position_embeddings,
         std::int64_t seq_len, double beta_fast, double beta_slow, double attention_factor, double low_freq_factor,
         double high_freq_factor, bool reference, int threads) {
        const char* fn = "kvcache.apply_rope";
        const auto x = read(x_o, fn, "x").as<const float, 4>("[B, H, L, D]");
        const auto pos = read(pos_o, fn, "positions").as<const std::int64_t, 1>("[L]");
        kvcache::rope r;
        r.dim = rotary_dim;
        r.base = base;
        if (layout == "half") r.layout = kvcache::rope_layout::half_split;
        else if (layout == "interleaved") r.layout = kvcache::rope_layout::interleaved;
        else mnemo::detail::fail("mnemo.", fn, ": argument layout: expected 'half' or 'interleaved', got '", layout, "'");
        r.scaling = scheme_of(scheme);
        r.factor = factor;
        r.original_context = original_max_position_embeddings;
        r.seq_len = seq_len;
        r.beta_fast = beta_fast;
        r.beta_slow = beta_slow;
        r.attention_factor = attention_factor;
        r.low_freq_factor = low_freq_factor;
        r.high_freq_factor = high_freq_factor;
        const std::int64_t B = x.extent(0), H = x.extent(1), L = x.extent(2), D = x.extent(3);
        if (pos.extent(0) != L)
          mnemo::detail::fail("mnemo.", fn, ": argument positions: expected shape [L] = [", L, "], got [", pos.extent(0), "]");
        if (!pos.is_contiguous() && L > 1)
          mnemo::detail::fail("mnemo.", fn, ": argument positions: expected a contiguous array");
        out_array<float, 4> y({B, H, L, D});
        for (std::int64_t b = 0; b < B; ++b)
          for (std::int64_t h = 0; h < H; ++h)
            for (std::int64_t l = 0; l < L; ++l) std::copy_n(x.ptr(b, h, l), D, y.v.ptr(b, h, l));
        const view<float, 3> rows(y.v.data(), {B * H, L, D});
        const std::span<const std::int64_t> p(pos.data(), static_cast<std::size_t>(L));
        {
          pyb::gil_scoped_release release;
          if (reference) kvcache::reference::apply_rope(r, rows, p);
          else kvcache::apply_rope(r, rows, p, threads);
        }
        return y.array;
      },
      arg("x"), arg("positions"), pyb::kw_only(), arg("rotary_dim") = 0, arg("base") = 10000.0,
      arg("layout") = "half", arg("scheme") = "default", arg("factor") = 1.0,
      arg("original_max_position_embeddings") = 0, arg("seq_len") = 0, arg("beta_fast") = 32.0,
      arg("beta_slow") = 1.0, arg("attention_factor") = 0.0, arg("low_freq_factor") = 1.0,
      arg("high_freq_factor") = 4.0, arg("reference") = false, arg("threads") = 0,
      "kvcache::apply_rope: x [B, H, L, D] rotated to positions [L] int64 (a new array). rotary_dim 0: all of D. "
      "layout 'half' (NeoX / Hugging Face rotate_half) or 'interleaved' (GPT-J); scheme default | linear | dynamic | "
      "yarn | llama3 | longrope with Hugging Face's parameters; attention_factor 0: the scheme's own.");
}

}  // namespace mnemo::py
