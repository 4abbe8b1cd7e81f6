// bench/kvpolicy_rows.cpp — the KV-policy evaluation harness and the per-step bookkeeping rows.
//
//   kvpolicy/<policy>/budget:<pct>/context:<kind>/threads:1
//       Every policy of the policy list (kvcache/policies/list.hpp: the entry's select with its
//       defaults, on the attention rows the entry asks for) at 10, 25 and 50% of a synthetic context of L tokens
//       (Hq = 8, Hkv = 2, D = Dv = 64; L = 2048 small, 8192 full, 256 tiny), compressed at
//       prefill from the observation the policy reads (attention::column_sums of the prefill's
//       flash pass, the last 32 queries, the keys), then one decode query against the kept cache.
//       Row time: one decode step over the kept cache (attention::decode per kv head, ragged heads
//       included, with the step's column sums when the policy's tracker reads attention, plus that
//       tracker's observe (the list's make_tracker: SnapKV's window ring, H2O's accumulated
//       attention, ...). Counters (computed once, outside the timing):
//         rel_error         ||o_kept - o_full|| / ||o_full|| of the decode query, all heads
//         needle_retention  fraction of the needle slots kept (context:needle); elsewhere the
//                           fraction of the 16 keys the decode query attends to most
//         bytes_kept        bytes of the kept K and V in f32 (ThinK: kept key channels only)
//         mass_top1pct, mass_top10pct, mass_planted   (policy "full" only) the decode query's
//                           attention share on the top 1% / 10% of the keys and on the planted keys
//       policy "full" (budget:100) is the uncompressed cache: rel_error 0, its time the baseline.
//   Contexts (kind), each built so a policy can be right or wrong for a known reason. Every query
//   also has a random, query-specific content part (logit std 1 over all keys): diffuse attention
//   no policy can predict, the error floor. Values are uniform [-1, 1] (zero mean), so the planted
//   keys must be kept to reproduce the output. Strengths are in logits (q . k / sqrt(D)), chosen
//   for realistic concentration, not for any policy. Measured at L = 2048 (decode query, mean over
//   the 8 heads; "planted" = share of the planted keys):
//       sinks    the first 4 keys are low-norm keys on a sink channel that every query (prompt and
//                decode) prefers by 3.1 .. 4.4 logits (per head) over its newest key, plus ALiBi-style
//                recency (exp(-distance / 128)) for the rest: StreamingLLM's picture (Xiao et al.).
//                planted (4 sinks) 0.45 (per-head logits set for 0.3 .. 0.6), top 1% 0.62, top 10% 0.93
//       local    recency alone, exp(-distance / 128) for every query: last 64 keys 0.38,
//                top 1% 0.34, top 10% 0.87
//       needle   8 needle keys spread over the middle half; only the question (the last 8 prompt
//                queries) and the decode query match them (+9 logits): needles 0.94, top 1% 0.95,
//                top 10% 0.98. Policies that do not read the question's attention cannot know them.
//       repeat   the prompt repeats a 64-token segment (copies differ by 10% noise); every query is
//                an induction head: at position i it matches the copies of element (i + 1) % 64
//                (+7 logits), so the decode query wants an element the observation window did not
//                look at (the window's targets are its neighbours): its 32 copies 0.91, top 1% 0.62,
//                top 10% 0.96.
//       cluster  keys belong to 16 random topics (clusters, scattered over the context; values =
//                the topic's value centre + noise); prompt queries follow a topic per 256-token
//                segment and the decode query continues the last one (+5.5 logits): its cluster
//                (~128 keys) 0.89, top 1% 0.56, top 10% 0.94.
//
//   kvpolicy_step/<policy>/Lk:<Lk>/threads:1   the decode-time bookkeeping of one step at the
//       standard decode shape (Hq = 32, Hkv = 8, D = 128) for every tracker of the policy list
//       (through the erased pol::tracker, as a serving loop would hold it): append one slot per kv
//       head, observe the step's probabilities, and every 64 steps select + compact the tracker
//       back to Lk - 64 (amortised); snapkv (also PyramidKV's and AdaKV's tracker) keeps its 32-step
//       window ring, fastgen its accumulated attention (every head's choice from a small prefill profile). kvpolicy_step/decode_sums/... is attention::decode with the column sums at the
//       same shape (the kernel the bookkeeping rides on): the target is bookkeeping <= 10% of it.
//       kvpolicy_step/cache_int4{,_sums}/... is kvcache::decode on an int4 cache without / with its
//       column-sums side output (kvcache::column_sums): what the side output costs the quantized
//       kernel that trackers on a quantized cache ride on.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/decode.hpp"
#include "mnemo/kvcache/merge_plan.hpp"
#include "mnemo/kvcache/policies.hpp"
#include "mnemo/kvcache/policies/list.hpp"

namespace mnemo::bench {
namespace {

namespace pol = kvcache::policies;
namespace attn = attention;

// ---------------------------------------------------------------------------------------------
// Synthetic contexts.
//
// Channel layout of every q and k (D = 64): channel 0 carries position (ALiBi-style recency),
// channel 1 is the sink channel (sinks ride on a few massive channels: Sun et al., "Massive
// Activations in LLMs", 2024), channels [2, 64) hold the content. Logits are q . k / sqrt(D); a
// structure is planted with a strength stated in logits.

constexpr std::int64_t ctx_Hq = 8, ctx_Hkv = 2, ctx_D = 64, ctx_window = 32, ctx_sinks = 4, ctx_needles = 8;
constexpr std::int64_t ctx_top = 16;       // keys of the decode query counted when there is no needle
constexpr std::int64_t repeat_period = 64, clusters = 16;
constexpr std::int64_t position_channel = 0, sink_channel = 1, content_first = 2;
constexpr std::int64_t question = 8;       // needle: the last prompt tokens (the question) also match it
constexpr std::int64_t topic_segment = 256;  // cluster: the prompt's queries change topic every 256 tokens
// Every query has a query-specific random part: a logit spread of this standard deviation over all
// keys, the diffuse attention no policy can predict (the error floor of a compressed cache).
constexpr double diffuse_logit_std = 1.0;
// Recency: key j carries position_scale (j - L) / L on the position channel and every query the
// same constant, so logit(i, j) = const(i) - (i - j) / recency_tokens for every query i at once
// (softmax ignores const(i)): ALiBi's linear bias (Press et al., ICLR 2022), attention decaying as
// exp(-distance / recency_tokens). A rotary construction with the 8 planes D = 64 can spare was
// tried first: its sum of cosines re-phases far away (0.75 of the peak logit at distance > 300).
constexpr double recency_tokens = 128;
constexpr float position_scale = 0.25f;  // keeps the position channel's share of ||k|| below 1%
constexpr float sink_key_shrink = 0.25f;  // sink keys' content is 4x smaller: low-norm sink keys (Devoto et al.)
constexpr float repeat_jitter = 0.1f;      // repeat: each copy of the period differs by this much noise
constexpr float cluster_value_noise = 0.5f;  // cluster: values = the cluster's value centre + this much noise
// Planted strengths (logits), the "temperature" of each context, chosen (and measured below) so
// the planted keys take the share of the decode query's attention that real heads give them.
// sinks: logit of a sink over the newest key, per query head, linear across the heads (sink share
// 30% .. 60% against the recency mass, about recency_tokens e^(diffuse_logit_std^2 / 2) newest-key units)
constexpr double sink_logit_lo = 3.1, sink_logit_hi = 4.4;
constexpr double needle_logit = 9.0;
constexpr double repeat_logit = 7.0;        // induction: a copy of the next element of the period
constexpr double cluster_logit = 5.5;

std::int64_t ctx_L() { return full_size() ? 8192 : tiny_size() ? 256 : 2048; }

struct context {
  std::string kind;
  std::int64_t L = 0;
  tensor<float, 4> q, k, v;            // prefill: [1, Hq, L, D], [1, Hkv, L, D], [1, Hkv, L, D]
  tensor<float, 4> q_dec;              // [1, Hq, 1, D] the later (decode) query, at position L
  tensor<float, 2> sums_window;        // [Hq, L] column sums of the last ctx_window prefill rows
  tensor<float, 2> sums_all;           // [Hq, L] column sums of all prefill rows
  tensor<float, 2> sums_last;          // [Hq, L] the last prefill row's probabilities
  tensor<float, 4> out_full;           // [1, Hq, 1, D] decode output over the full cache
  std::vector<std::int64_t> important; // needle slots, or the decode query's top keys
  // The decode query's attention over the full cache, mean over its heads:
  double mass_top1 = 0, mass_top10 = 0;  // share of the top 1% / 10% of the keys
  double mass_planted = 0;               // share of the planted keys (below)
};

// Unit direction in the content channels (seeded).
std::vector<float> direction(std::uint64_t seed) {
  std::vector<float> u(static_cast<std::size_t>(ctx_D), 0.0f);
  double n = 0;
  for (std::int64_t c = content_first; c < ctx_D; ++c) {
    const float x = random_uniform(seed, static_cast<std::uint64_t>(c));
    u[static_cast<std::size_t>(c)] = x;
    n += static_cast<double>(x) * x;
  }
  for (auto& x : u) x = static_cast<float>(x / std::sqrt(n));
  return u;
}

// Attention share of the top `n` entries of p[0, L).
double top_share(const float* p, std::int64_t L, std::int64_t n) {
  std::vector<float> s(p, p + L);
  std::partial_sort(s.begin(), s.begin() + n, s.end(), std::greater<>());
  double top = 0, all = 0;
  for (std::int64_t j = 0; j < L; ++j) (j < n ? top : all) += s[static_cast<std::size_t>(j)];
  return top / (top + all);
}

std::unique_ptr<context> build_context(const std::string& kind) {
  auto ctx = std::make_unique<context>();
  const std::int64_t L = ctx_L(), D = ctx_D, G = ctx_Hq / ctx_Hkv;
  const double sqrt_D = std::sqrt(static_cast<double>(D));
  ctx->kind = kind;
  ctx->L = L;
  ctx->q = tensor<float, 4>({1, ctx_Hq, L, D});
  ctx->k = tensor<float, 4>({1, ctx_Hkv, L, D});
  ctx->v = tensor<float, 4>({1, ctx_Hkv, L, D});
  ctx->q_dec = tensor<float, 4>({1, ctx_Hq, 1, D});
  std::fill_n(ctx->q.data(), ctx->q.size(), 0.0f);
  std::fill_n(ctx->k.data(), ctx->k.size(), 0.0f);
  std::fill_n(ctx->q_dec.data(), ctx->q_dec.size(), 0.0f);
  fill_random(ctx->v, 13);
  auto add = [&](float* x, const std::vector<float>& u, double a) {
    for (std::int64_t c = 0; c < D; ++c) x[c] += static_cast<float>(a) * u[static_cast<std::size_t>(c)];
  };
  // Query row i (i = L: the decode query) of query head h.
  auto query = [&](std::int64_t h, std::int64_t i) { return i == L ? &ctx->q_dec(0, h, 0, 0) : &ctx->q(0, h, i, 0); };

  // Content: uniform [-1, 1] keys; queries scaled so q . k / sqrt(D) has std diffuse_logit_std
  // (a product of two U[-1, 1] has variance 1/9).
  const auto n_content = static_cast<double>(D - content_first);
  const double q_noise = diffuse_logit_std * sqrt_D * 3 / std::sqrt(n_content);
  for (std::int64_t h = 0; h < ctx_Hkv; ++h)
    for (std::int64_t j = 0; j < L; ++j)
      for (std::int64_t c = content_first; c < D; ++c)
        ctx->k(0, h, j, c) = random_uniform(12, static_cast<std::uint64_t>((h * L + j) * D + c));
  for (std::int64_t h = 0; h < ctx_Hq; ++h)
    for (std::int64_t i = 0; i <= L; ++i)
      for (std::int64_t c = content_first; c < D; ++c)
        query(h, i)[c] = static_cast<float>(q_noise) * random_uniform(11, static_cast<std::uint64_t>((h * (L + 1) + i) * D + c));

  // Recency (above); keys listed in `anchored` sit at the newest position (no distance penalty).
  auto plant_recency = [&](const std::vector<std::int64_t>& anchored) {
    for (std::int64_t h = 0; h < ctx_Hkv; ++h)
      for (std::int64_t j = 0; j < L; ++j)
        ctx->k(0, h, j, position_channel) = position_scale * static_cast<float>(j - L) / static_cast<float>(L);
    for (std::int64_t h = 0; h < ctx_Hkv; ++h)
      for (std::int64_t j : anchored) ctx->k(0, h, j, position_channel) = 0.0f;
    const double slope = sqrt_D * static_cast<double>(L) / (recency_tokens * position_scale);
    for (std::int64_t h = 0; h < ctx_Hq; ++h)
      for (std::int64_t i = 0; i <= L; ++i) query(h, i)[position_channel] = static_cast<float>(slope);
  };

  std::vector<std::int64_t> planted;  // keys that carry the context's structure
  if (kind == "sinks") {  // sinks + recency: the pattern StreamingLLM was built on (Xiao et al., Fig. 2)
    for (std::int64_t j = 0; j < ctx_sinks; ++j) planted.push_back(j);
    for (std::int64_t h = 0; h < ctx_Hkv; ++h)
      for (std::int64_t j = 0; j < ctx_sinks; ++j) {
        for (std::int64_t c = content_first; c < D; ++c) ctx->k(0, h, j, c) *= sink_key_shrink;
        ctx->k(0, h, j, sink_channel) = 1.0f;
      }
    for (std::int64_t h = 0; h < ctx_Hq; ++h) {
      const double s = sink_logit_lo + (sink_logit_hi - sink_logit_lo) * static_cast<double>(h) / (ctx_Hq - 1);
      // The sink sits at the newest position (anchored below); the query's sink channel takes the
      // distance back out, so every query i sees the sinks s logits above its newest key i.
      for (std::int64_t i = 0; i <= L; ++i)
        query(h, i)[sink_channel] = static_cast<float>((s + static_cast<double>(i - L) / recency_tokens) * sqrt_D);
    }
    plant_recency(planted);
  } else if (kind == "local") {
    plant_recency({});
    for (std::int64_t j = L - L / 32; j < L; ++j) planted.push_back(j);
  } else if (kind == "needle") {  // only the question (last prompt tokens) and the decode query match it
    const std::vector<float> needle = direction(16);
    const double b = 4;  // needle keys' extent along the needle direction
    for (std::int64_t n = 0; n < ctx_needles; ++n) planted.push_back(L / 4 + n * (L / 2) / ctx_needles);
    for (std::int64_t h = 0; h < ctx_Hkv; ++h)
      for (std::int64_t j : planted) add(&ctx->k(0, h, j, 0), needle, b);
    for (std::int64_t h = 0; h < ctx_Hq; ++h)
      for (std::int64_t i = L - question; i <= L; ++i) add(query(h, i), needle, needle_logit * sqrt_D / b);
  } else if (kind == "repeat") {  // the prompt repeats a 64-token segment; queries act as induction heads
    for (std::int64_t h = 0; h < ctx_Hkv; ++h)
      for (std::int64_t j = repeat_period; j < L; ++j)
        for (std::int64_t c = content_first; c < D; ++c) {
          const auto n = static_cast<std::uint64_t>((h * L + j) * D + c);
          ctx->k(0, h, j, c) = ctx->k(0, h, j % repeat_period, c) + repeat_jitter * random_uniform(17, n);
          ctx->v(0, h, j, c) = ctx->v(0, h, j % repeat_period, c) + repeat_jitter * random_uniform(18, n);
        }
    // The query at i (element i % P) looks for the element after it, (i + 1) % P.
    for (std::int64_t h = 0; h < ctx_Hq; ++h)
      for (std::int64_t i = 0; i <= L; ++i) {
        const float* target = &ctx->k(0, h / G, (i + 1) % repeat_period, 0);
        double nn = 0;
        for (std::int64_t c = content_first; c < D; ++c) nn += static_cast<double>(target[c]) * target[c];
        for (std::int64_t c = content_first; c < D; ++c) query(h, i)[c] += static_cast<float>(repeat_logit * sqrt_D / nn) * target[c];
      }
    for (std::int64_t j = (L + 1) % repeat_period; j < L; j += repeat_period) planted.push_back(j);
  } else if (kind == "cluster") {  // keys from 16 topics; the prompt's queries move through topics
    const double b = 3;  // keys' extent along their cluster centre
    auto cluster_of_key = [](std::int64_t j) {
      return static_cast<std::int64_t>(random_uniform(19, static_cast<std::uint64_t>(j), 0.0f, 1.0f) * clusters) % clusters;
    };
    auto cluster_of_query = [&](std::int64_t i) {  // the decode query continues the last segment's topic
      return static_cast<std::int64_t>(random_uniform(20, static_cast<std::uint64_t>(std::min(i, L - 1) / topic_segment), 0.0f, 1.0f) * clusters) % clusters;
    };
    std::vector<std::vector<float>> centre, value_centre;
    for (std::int64_t c = 0; c < clusters; ++c) {
      centre.push_back(direction(100 + static_cast<std::uint64_t>(c)));
      std::vector<float> vc(static_cast<std::size_t>(D));
      for (std::int64_t e = 0; e < D; ++e) vc[static_cast<std::size_t>(e)] = random_uniform(200 + static_cast<std::uint64_t>(c), static_cast<std::uint64_t>(e));
      value_centre.push_back(std::move(vc));
    }
    for (std::int64_t h = 0; h < ctx_Hkv; ++h)
      for (std::int64_t j = 0; j < L; ++j) {
        const auto c = static_cast<std::size_t>(cluster_of_key(j));
        add(&ctx->k(0, h, j, 0), centre[c], b);
        for (std::int64_t e = 0; e < D; ++e)
          ctx->v(0, h, j, e) = value_centre[c][static_cast<std::size_t>(e)] + cluster_value_noise * ctx->v(0, h, j, e);
      }
    for (std::int64_t h = 0; h < ctx_Hq; ++h)
      for (std::int64_t i = 0; i <= L; ++i) add(query(h, i), centre[static_cast<std::size_t>(cluster_of_query(i))], cluster_logit * sqrt_D / b);
    for (std::int64_t j = 0; j < L; ++j)
      if (cluster_of_key(j) == cluster_of_query(L)) planted.push_back(j);
  }

  // The observation, from the attention pass itself.
  tensor<float, 4> out({1, ctx_Hq, L, D});
  tensor<float, 3> sums({1, ctx_Hq, L});
  auto pass = [&](std::int64_t rows, tensor<float, 2>& dst) {
    attn::flash(cview(ctx->q), ctx->k, ctx->v, out.as_view(), {}, attn::mods::causal{}, {0, 1},
                attn::column_sums{sums.as_view(), rows});
    dst = tensor<float, 2>({ctx_Hq, L});
    std::copy_n(sums.data(), sums.size(), dst.data());
  };
  pass(ctx_window, ctx->sums_window);
  pass(0, ctx->sums_all);
  pass(1, ctx->sums_last);

  ctx->out_full = tensor<float, 4>({1, ctx_Hq, 1, D});
  tensor<float, 3> dec_sums({1, ctx_Hq, L});
  attn::decode<float>(ctx->q_dec, ctx->k, ctx->v, ctx->out_full.as_view(), {}, attn::mods::none{}, {0, 1},
                      attn::column_sums{dec_sums.as_view(), 0});
  for (std::int64_t h = 0; h < ctx_Hq; ++h) {
    const float* p = &dec_sums(0, h, 0);
    ctx->mass_top1 += top_share(p, L, std::max<std::int64_t>(1, L / 100)) / ctx_Hq;
    ctx->mass_top10 += top_share(p, L, std::max<std::int64_t>(1, L / 10)) / ctx_Hq;
    for (std::int64_t j : planted) ctx->mass_planted += p[j] / ctx_Hq;
  }
  if (kind == "needle") {
    ctx->important = planted;
  } else {  // the keys the decode query attends to most (summed over heads)
    std::vector<std::pair<float, std::int64_t>> mass;
    for (std::int64_t j = 0; j < L; ++j) {
      float m = 0;
      for (std::int64_t h = 0; h < ctx_Hq; ++h) m += dec_sums(0, h, j);
      mass.emplace_back(-m, j);
    }
    std::partial_sort(mass.begin(), mass.begin() + ctx_top, mass.end());
    for (std::int64_t i = 0; i < ctx_top; ++i) ctx->important.push_back(mass[static_cast<std::size_t>(i)].second);
  }
  return ctx;
}

const context& get_context(const std::string& kind) {
  static std::map<std::string, std::unique_ptr<context>> cache;
  auto& c = cache[kind];
  if (!c) c = build_context(kind);
  return *c;
}

// ---------------------------------------------------------------------------------------------
// One policy's decision on a context: the policy list's entry (kvcache/policies/list.hpp) with
// its defaults, on the observation whose attention rows it asks for.

struct decision {
  kvcache::selection kept;
  tensor<float, 3> k;                 // keys the decode reads ([Hkv, L, D]; ThinK: pruned channels)
  std::int64_t key_channels = ctx_D;  // channels stored per key
  pol::tracker tracker;               // the policy's decode-time tracker (may be empty)
  std::optional<kvcache::reference::merged_kv> merged;  // merging methods: the kept slots' merged K/V
};

decision decide(const std::string& policy, const context& ctx, std::int64_t budget) {
  const std::int64_t L = ctx.L;
  const view<const float, 3> k = cview(ctx.k)[0], v = cview(ctx.v)[0];
  const view<const float, 3> qw = cview(ctx.q)[0].narrow(1, L - ctx_window, ctx_window);
  decision d;
  d.k = tensor<float, 3>({ctx_Hkv, L, ctx_D});
  std::copy_n(ctx.k.data(), ctx.k.size(), d.k.data());
  if (policy == "full") {
    d.kept = kvcache::top_budget(ctx.sums_window.as_view().narrow(0, 0, ctx_Hkv), L);
    return d;
  }
  const pol::entry& e = pol::find(policy);
  const tensor<float, 2>& sums = e.rows == pol::attn_rows::all    ? ctx.sums_all
                                 : e.rows == pol::attn_rows::last ? ctx.sums_last
                                                                  : ctx.sums_window;
  static const std::vector<std::uint8_t> special = [] {  // the sinks are the context's special tokens
    std::vector<std::uint8_t> f(static_cast<std::size_t>(get_context("local").L), 0);
    std::fill_n(f.begin(), ctx_sinks, std::uint8_t{1});
    return f;
  }();
  pol::observation o{k, v, qw, sums};
  o.special = std::span<const std::uint8_t>(special).first(static_cast<std::size_t>(L));
  o.layer = 4;  // PyramidKV: the middle layer of 8 (its budget is the average)
  o.layers = 8;
  if (e.selects == pol::axis::channels) {  // ThinK: keep budget / L of the key channels, every slot
    const std::int64_t keep = std::max<std::int64_t>(1, ctx_D * budget / L);
    pol::think::prune(k, e.select(o, keep), d.k.as_view());
    d.kept = kvcache::top_budget(ctx.sums_window.as_view().narrow(0, 0, ctx_Hkv), L);
    d.key_channels = keep;
    return d;
  }
  const std::int64_t b = e.name == "pyramidkv" ? std::max(budget, ctx_window) : budget;  // >= its window
  if (e.plan) {  // a merging method: the kept slots hold the merged keys and values
    const kvcache::merge_plan plan = e.plan(o, b);
    d.kept = plan.keep;
    d.merged = kvcache::reference::merge(plan, k, v);
  } else {
    d.kept = e.select(o, b);
  }
  if (e.make_tracker) d.tracker = e.make_tracker(o, b);
  return d;
}

// The kept cache, one compact [1, 1, n_h, D] K/V pair per kv head (heads may be ragged).
struct kept_cache {
  std::vector<tensor<float, 4>> k, v;
};

kept_cache gather(const context& ctx, const decision& d) {
  kept_cache c;
  for (std::int64_t h = 0; h < ctx_Hkv; ++h) {
    const auto& rows = d.kept.heads[static_cast<std::size_t>(h)];
    const auto n = static_cast<std::int64_t>(rows.size());
    tensor<float, 4> kh({1, 1, n, ctx_D}), vh({1, 1, n, ctx_D});
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t j = rows[static_cast<std::size_t>(i)];
      std::copy_n(d.merged ? &d.merged->k(h, i, 0) : &d.k(h, j, 0), ctx_D, &kh(0, 0, i, 0));
      std::copy_n(d.merged ? &d.merged->v(h, i, 0) : &ctx.v(0, h, j, 0), ctx_D, &vh(0, 0, i, 0));
    }
    c.k.push_back(std::move(kh));
    c.v.push_back(std::move(vh));
  }
  return c;
}

// One decode step over the kept cache: out [1, Hq, 1, D]; sums [1, G, max n] per head when wanted.
void decode_kept(const context& ctx, const kept_cache& c, tensor<float, 4>& out, tensor<float, 3>* sums,
                 attn::decode_workspace& ws) {
  constexpr std::int64_t G = ctx_Hq / ctx_Hkv;
  for (std::int64_t h = 0; h < ctx_Hkv; ++h) {
    const std::int64_t n = c.k[static_cast<std::size_t>(h)].extent(2);
    const view<const float, 4> q = cview(ctx.q_dec).narrow(1, h * G, G);
    const view<float, 4> o = out.as_view().narrow(1, h * G, G);
    if (n == 0) {
      for (std::int64_t g = 0; g < G; ++g) std::fill_n(o.ptr(0, g, 0), ctx_D, 0.0f);
      continue;
    }
    attn::column_sums cs{};
    if (sums) cs = {sums->as_view().narrow(1, h * G, G).narrow(2, 0, n), 0};
    attn::decode<float>(q, cview(c.k[static_cast<std::size_t>(h)]), cview(c.v[static_cast<std::size_t>(h)]), o, {},
                        attn::mods::none{}, {0, 1}, ws, cs);
  }
}

void policy_row(benchmark::State& state, const std::string& policy, std::int64_t pct, const std::string& kind) {
  const context& ctx = get_context(kind);
  const std::int64_t budget = ctx.L * pct / 100;
  decision d = decide(policy, ctx, budget);
  const kept_cache c = gather(ctx, d);
  tensor<float, 4> out({1, ctx_Hq, 1, ctx_D});
  tensor<float, 3> sums({1, ctx_Hq, ctx.L});
  attn::decode_workspace ws;

  decode_kept(ctx, c, out, nullptr, ws);
  double err = 0, ref = 0;
  for (std::int64_t i = 0; i < out.size(); ++i) {
    err += std::pow(static_cast<double>(out.data()[i]) - ctx.out_full.data()[i], 2);
    ref += std::pow(static_cast<double>(ctx.out_full.data()[i]), 2);
  }
  double retained = 0;
  for (std::int64_t h = 0; h < ctx_Hkv; ++h) {
    const auto& row = d.kept.heads[static_cast<std::size_t>(h)];
    for (std::int64_t j : ctx.important) retained += std::binary_search(row.begin(), row.end(), j) ? 1 : 0;
  }
  const double bytes = static_cast<double>(d.kept.total_kept()) * static_cast<double>(d.key_channels + ctx_D) * sizeof(float);

  // The timed decode step: the kernel over the kept cache and, when the policy's tracker reads
  // attention, the step's column sums feeding it (window ring, accumulated attention, ...).
  const bool tracks = d.tracker && d.tracker.observes();
  if (d.tracker)
    for (std::int64_t h = 0; h < ctx_Hkv; ++h)
      for (std::int64_t j : d.kept.heads[static_cast<std::size_t>(h)])
        d.tracker.append({h, &d.k(h, j, 0), ctx_D, j < ctx_sinks, false});
  for (auto _ : state) {
    decode_kept(ctx, c, out, tracks ? &sums : nullptr, ws);
    if (tracks) d.tracker.observe(cview(sums)[0]);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["rel_error"] = ref > 0 ? std::sqrt(err / ref) : 0.0;
  state.counters["needle_retention"] = retained / static_cast<double>(ctx_Hkv * static_cast<std::int64_t>(ctx.important.size()));
  state.counters["bytes_kept"] = bytes;
  if (policy == "full") {  // how concentrated the decode query's attention is on this context
    state.counters["mass_top1pct"] = ctx.mass_top1;
    state.counters["mass_top10pct"] = ctx.mass_top10;
    state.counters["mass_planted"] = ctx.mass_planted;
  }
  state.SetLabel("L=" + std::to_string(ctx.L) + " Hq=8 Hkv=2 D=64 budget=" + std::to_string(budget) + " context=" + kind);
}

// ---------------------------------------------------------------------------------------------
// Per-step bookkeeping at the standard decode shape.

constexpr std::int64_t step_every = 64;  // compress every 64 steps

struct step_shape {
  std::int64_t Hq = 32, Hkv = 8, D = 128, Lk = 0;
};

// Runs `step(i)` each iteration and `compress()` every step_every iterations.
template <class Tracker>
void bookkeeping_row(benchmark::State& state, const step_shape& s, Tracker& tr, const std::function<void(std::int64_t)>& step,
                     const std::function<void()>& compress) {
  std::int64_t i = 0;
  for (auto _ : state) {
    step(i);
    if (++i % step_every == 0) compress();
  }
  (void)tr;
  state.SetLabel("Hq=" + std::to_string(s.Hq) + " Hkv=" + std::to_string(s.Hkv) + " D=" + std::to_string(s.D) +
                 " Lk=" + std::to_string(s.Lk) + " every=" + std::to_string(step_every));
}

// probs [Hq, columns]: a fixed probability row standing in for the step's column sums.
tensor<float, 2> step_probs(const step_shape& s, std::int64_t columns) {
  tensor<float, 2> p({s.Hq, columns});
  fill_random(p, 21, 0.0f, 2.0f / static_cast<float>(s.Lk));
  return p;
}

// ragged: the selection may give one head more than base slots (AdaKV's head-adaptive budgets,
// up to the whole layer's), so the probabilities cover the longest head can grow to.
template <class Decoder, class Append, class Observe, class Select>
void run_tracker(benchmark::State& state, const step_shape& s, Decoder& dec, Append append, Observe observe, Select select,
                 bool ragged = false) {
  const std::int64_t base = s.Lk - step_every;
  for (std::int64_t h = 0; h < s.Hkv; ++h)
    for (std::int64_t j = 0; j < base; ++j) append(h, j);
  const tensor<float, 2> probs = step_probs(s, ragged ? base * s.Hkv + step_every : s.Lk);
  std::int64_t t = base;
  bookkeeping_row(
      state, s, dec,
      [&](std::int64_t) {
        for (std::int64_t h = 0; h < s.Hkv; ++h) append(h, t);
        ++t;
        observe(cview(probs));
      },
      [&] {
        dec.compact(select(base));
        t = base;
      });
}

// The tracker of the list's entry, made after a small random prefill (64 slots) at the step's
// head shape: the row times the bookkeeping of the decode steps, not that prefill.
void step_row(benchmark::State& state, const std::string& policy, const step_shape& s) {
  tensor<float, 2> key({1, s.D});
  fill_random(key, 31);
  if (policy == "streaming_llm") {  // no tracker: the kept set follows from the lengths alone
    std::vector<std::int64_t> len(static_cast<std::size_t>(s.Hkv), s.Lk - step_every);
    const pol::streaming_llm p{ctx_sinks};
    bookkeeping_row(
        state, s, p, [&](std::int64_t) { for (auto& n : len) ++n; },
        [&] {
          const kvcache::selection sel = p.keep(len, s.Lk - step_every);
          for (std::size_t h = 0; h < len.size(); ++h) len[h] = static_cast<std::int64_t>(sel.heads[h].size());
          benchmark::DoNotOptimize(sel.heads.data());
        });
    return;
  }
  const pol::entry& e = pol::find(policy);
  constexpr std::int64_t L0 = 64, Lw0 = 32;
  tensor<float, 3> k0({s.Hkv, L0, s.D}), q0({s.Hq, Lw0, s.D});
  tensor<float, 2> a0({s.Hq, L0});
  fill_random(k0, 41);
  fill_random(q0, 43);
  fill_random(a0, 47, 0.0f, 2.0f * Lw0 / L0);
  pol::tracker t = e.make_tracker(pol::observation{k0, {}, q0, a0}, s.Lk - step_every);
  const bool observes = t.observes();
  run_tracker(state, s, t, [&](std::int64_t h, std::int64_t) { t.append({h, key.data(), s.D}); },
              [&](view<const float, 2> p) {
                if (observes) t.observe(p);
              },
              [&](std::int64_t b) { return t.select(b); }, e.name == "adakv");
}

void decode_sums_row(benchmark::State& state, const step_shape& s) {
  const shape sh = decode_shape(s.Lk, s.Hq, s.Hkv, s.D);
  attention_inputs<float> in(sh);
  tensor<float, 3> sums({1, s.Hq, s.Lk});
  attn::decode_workspace ws;
  for (auto _ : state) {
    attn::decode<float>(in.q, in.k, in.v, in.out, in.lse, attn::mods::none{}, {0, 1}, ws,
                        attn::column_sums{sums.as_view(), 0});
    benchmark::DoNotOptimize(sums.data());
    benchmark::ClobberMemory();
  }
  set_attention_counters(state, sh, 1);
}

void cache_sums_row(benchmark::State& state, const step_shape& s, bool sums_wanted) {
  kvcache::layer_cache c({.kind = kvcache::storage::int4, .Hkv = s.Hkv, .capacity = s.Lk, .D = s.D});
  constexpr std::int64_t slice = 4096;  // filled in slices, so the f32 staging stays small
  for (std::int64_t t0 = 0; t0 < s.Lk; t0 += slice) {
    const std::int64_t n = std::min(slice, s.Lk - t0);
    tensor<float, 3> k({s.Hkv, n, s.D}), v({s.Hkv, n, s.D});
    fill_random(k, 2 + static_cast<std::uint64_t>(t0));
    fill_random(v, 3 + static_cast<std::uint64_t>(t0));
    c.append(k, v);
  }
  tensor<float, 3> q({s.Hq, 1, s.D}), out({s.Hq, 1, s.D});
  tensor<float, 2> sums({s.Hq, s.Lk});
  fill_random(q, 1);
  attn::decode_workspace ws;
  const kvcache::column_sums cs = sums_wanted ? kvcache::column_sums{sums.as_view(), 0} : kvcache::column_sums{};
  for (auto _ : state) {
    kvcache::decode(c, q, out, {}, {0, 1}, ws, cs);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetLabel("Hq=" + std::to_string(s.Hq) + " Hkv=" + std::to_string(s.Hkv) + " D=" + std::to_string(s.D) +
                 " Lk=" + std::to_string(s.Lk) + " kv=int4" + (sums_wanted ? " column_sums" : ""));
}

const bool registered = [] {
  std::vector<std::string> policies;
  for (const pol::entry& e : pol::all()) policies.emplace_back(e.name);
  for (const std::string kind : {"sinks", "local", "needle", "repeat", "cluster"}) {
    register_row(row_name("kvpolicy", "full", {{"budget", "100"}, {"context", kind}, {"threads", "1"}}),
                 [kind](benchmark::State& st) { policy_row(st, "full", 100, kind); })
        ->Unit(benchmark::kMicrosecond);
    for (const std::string& p : policies)
      for (std::int64_t pct : {10, 25, 50})
        register_row(row_name("kvpolicy", p, {{"budget", std::to_string(pct)}, {"context", kind}, {"threads", "1"}}),
                     [p, pct, kind](benchmark::State& st) { policy_row(st, p, pct, kind); })
            ->Unit(benchmark::kMicrosecond);
  }
  for (const shape& d : decode_shapes()) {
    const step_shape s{d.Hq, d.Hkv, d.D, d.Lk};
    const std::string Lk = std::to_string(d.Lk);
    register_row(row_name("kvpolicy_step", "decode_sums", {{"Lk", Lk}, {"threads", "1"}}),
                 [s](benchmark::State& st) { decode_sums_row(st, s); });
    for (const bool wanted : {false, true})
      register_row(row_name("kvpolicy_step", wanted ? "cache_int4_sums" : "cache_int4", {{"Lk", Lk}, {"threads", "1"}}),
                   [s, wanted](benchmark::State& st) { cache_sums_row(st, s, wanted); });
    register_row(row_name("kvpolicy_step", "streaming_llm", {{"Lk", Lk}, {"threads", "1"}}),
                 [s](benchmark::State& st) { step_row(st, "streaming_llm", s); });
    for (const pol::entry& e : pol::all())
      if (e.make_tracker) {
        const std::string p(e.name);
        register_row(row_name("kvpolicy_step", p, {{"Lk", Lk}, {"threads", "1"}}),
                     [p, s](benchmark::State& st) { step_row(st, p, s); });
      }
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
