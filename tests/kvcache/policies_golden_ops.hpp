// tests/kvcache/policies_golden_ops.hpp — the kv_* golden ops (README "KV-cache selection
// policies") run through kvcache/policies, shared by tests/golden/ops_kvcache.cpp (mnemo_golden)
// and tests/kvcache/policies_test.cpp.
//
// The policies work on one batch element (a cache is one sequence); the cases' batch dimension
// is a loop here. The attention statistics come from the attention pass's side output
// (attention::column_sums) of either the flash kernel, the split-KV decode kernel (TOVA: one
// query row) or the double-precision reference, so each path is checked against the golden
// selections.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "golden/runner.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/kvcache/policies.hpp"

namespace mnemo::kv_golden {

namespace pol = kvcache::policies;

// Where the attention column sums come from.
enum class path { flash, decode, reference };
inline const char* path_name(path p) { return p == path::flash ? "flash" : p == path::decode ? "decode" : "reference"; }

inline std::vector<std::string> ops() {
  return {"kv_streaming_llm", "kv_snapkv", "kv_observed_attention", "kv_tova", "kv_knorm", "kv_qfilter", "kv_think"};
}
// Ops whose scores need attention probabilities (the others run once, path-independent).
inline bool uses_attention(const std::string& op) {
  return op == "kv_snapkv" || op == "kv_observed_attention" || op == "kv_tova";
}

// sums [B, Hq, L]: column sums of the causal attention of q [B, Hq, L, D] over k, of the last
// `rows` query rows (0: all). decode runs the last `rows` rows only (rows <= decode_max_rows).
inline tensor<float, 3> column_sums(path p, const tensor<float, 4>& q, const tensor<float, 4>& k, std::int64_t rows) {
  const std::int64_t B = q.extent(0), Hq = q.extent(1), L = q.extent(2), D = q.extent(3);
  tensor<float, 3> sums({B, Hq, L});
  const attention::column_sums cs{sums.as_view(), rows};
  if (p == path::decode) {
    mnemo::detail::require(rows >= 1 && rows <= attention::decode_max_rows, "kv golden: decode path needs 1 <= rows <= ",
                           attention::decode_max_rows, ", got ", rows);
    const view<const float, 4> qw = cview(q).narrow(2, L - rows, rows);
    tensor<float, 4> out({B, Hq, rows, D});
    attention::decode(qw, k, k, out.as_view(), {}, attention::mods::causal{}, {}, attention::column_sums{sums.as_view(), 0});
    return sums;
  }
  tensor<float, 4> out({B, Hq, L, D});
  if (p == path::flash) attention::flash(cview(q), k, k, out.as_view(), {}, attention::mods::causal{}, {}, cs);
  else attention::reference(cview(q), k, k, out.as_view(), {}, attention::mods::causal{}, {}, cs);
  return sums;
}

// kept [B, Hkv, n] from a selection per batch element (n equal over heads and batches).
inline tensor<std::int64_t, 3> kept_tensor(const std::vector<kvcache::selection>& sel) {
  const auto B = static_cast<std::int64_t>(sel.size()), H = sel[0].num_heads(), n = sel[0].kept(0);
  tensor<std::int64_t, 3> kept({B, H, n});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      mnemo::detail::require(sel[static_cast<std::size_t>(b)].kept(h) == n, "kv golden: head ", h, " of batch ", b,
                             " keeps ", sel[static_cast<std::size_t>(b)].kept(h), " slots, head 0 of batch 0 keeps ", n);
      std::copy_n(sel[static_cast<std::size_t>(b)].heads[static_cast<std::size_t>(h)].begin(), n, &kept(b, h, 0));
    }
  return kept;
}

// kvpress fills the SnapKV / TOVA window with (max over the whole score tensor, every batch
// element included) + 1; per batch element the policies use their own max. Same kept sets.
inline void global_window_fill(tensor<float, 3>& scores, std::int64_t window) {
  const std::int64_t B = scores.extent(0), H = scores.extent(1), L = scores.extent(2);
  float top = -std::numeric_limits<float>::infinity();
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t j = 0; j < L - window; ++j) top = std::max(top, scores(b, h, j));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t j = L - window; j < L; ++j) scores(b, h, j) = top + 1.0f;
}

inline golden::results run(const golden::golden_case& c, path p) {
  const std::string& op = c.op();
  const std::int64_t B = c.dim("B"), Hkv = c.dim("Hkv"), L = c.dim("L"), D = c.dim("D");
  const auto k = c.input<float, 4>("k", {B, Hkv, L, D});
  const std::int64_t budget = c.dim("budget");
  golden::results r;
  std::vector<kvcache::selection> sel;

  if (op == "kv_think") {
    const std::int64_t Hq = c.dim("Hq"), window = c.dim("window");
    const auto q = c.input<float, 4>("q", {B, Hq, L, D});
    const pol::think policy{};
    const std::int64_t kept_channels = D - c.dim("n_pruned");
    tensor<float, 3> scores({B, Hkv, D});
    tensor<float, 4> k_out({B, Hkv, L, D});
    for (std::int64_t b = 0; b < B; ++b) {
      const pol::observation o{cview(k)[b], {}, cview(q)[b].narrow(1, L - window, window), {}};
      policy.scores(o, scores.as_view()[b]);
      sel.push_back(policy.select(o, kept_channels));
      pol::think::prune(cview(k)[b], sel.back(), k_out.as_view()[b]);
    }
    r.add("scores", scores);
    r.add("kept", kept_tensor(sel));
    r.add("k_out", k_out);
    return r;
  }

  tensor<float, 3> scores({B, Hkv, L});
  tensor<float, 3> sums;
  tensor<float, 2> filters;
  if (uses_attention(op)) {
    const std::int64_t Hq = c.dim("Hq");
    const auto q = c.input<float, 4>("q", {B, Hq, L, D});
    const std::int64_t rows = op == "kv_snapkv" ? c.dim("window") : op == "kv_tova" ? 1 : 0;
    sums = column_sums(p, q, k, rows);
  }
  if (op == "kv_qfilter") filters = c.input<float, 2>("q_filter", {Hkv, D});
  for (std::int64_t b = 0; b < B; ++b) {
    const pol::observation o{cview(k)[b], {}, {}, sums.size() ? cview(sums)[b] : view<const float, 2>{}};
    const view<float, 2> out = scores.as_view()[b];
    if (op == "kv_streaming_llm") {
      const pol::streaming_llm policy{c.dim("n_sink")};
      mnemo::detail::require(c.dim("n_sink") + c.dim("window") == budget, "kv_streaming_llm: budget must be n_sink + window");
      policy.scores(o, budget, out);
      sel.push_back(policy.select(o, budget));
    } else if (op == "kv_snapkv") {
      const pol::snapkv policy{c.dim("window"), c.dim("kernel_size")};
      policy.scores(o, out);
      sel.push_back(policy.select(o, budget));
    } else if (op == "kv_observed_attention") {
      const pol::h2o policy{};
      policy.scores(o, out);
      sel.push_back(policy.select(o, budget));
    } else if (op == "kv_tova") {
      const pol::tova policy{};
      policy.scores(o, out);
      sel.push_back(policy.select(o, budget));
    } else if (op == "kv_knorm") {
      const pol::knorm policy{};
      policy.scores(o, out);
      sel.push_back(policy.select(o, budget));
    } else if (op == "kv_qfilter") {
      const pol::qfilter policy{filters.as_view()};
      policy.scores(o, out);
      sel.push_back(policy.select(o, budget));
    } else {
      mnemo::detail::fail("kv golden: unknown op '", op, "'");
    }
  }
  if (op == "kv_snapkv") global_window_fill(scores, c.dim("window"));
  if (op == "kv_tova") global_window_fill(scores, 1);
  r.add("scores", scores);
  r.add("kept", kept_tensor(sel));
  return r;
}

}  // namespace mnemo::kv_golden
