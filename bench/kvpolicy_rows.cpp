// bench/kvpolicy_rows.cpp — the KV-policy evaluation harness and the per-step bookkeeping rows.
//
//   kvpolicy/<policy>/budget:<pct>/context:<kind>/threads:1
//       Every policy of kvcache/policies at 10, 25 and 50% of a synthetic context of L tokens
//       (Hq = 8, Hkv = 2, D = Dv = 64; L = 2048 small, 8192 full, 256 tiny), compressed at
//       prefill from the observation the policy reads (attention::column_sums of the prefill's
//       flash pass, the last 32 queries, the keys), then one decode query against the kept cache.
//       Row time: one decode step over the kept cache (attention::decode per kv head, ragged heads
//       included, with the step's column sums when the policy tracks attention, plus the policy's
//       decode-time bookkeeping: its own decoder's observe for SnapKV / PyramidKV / AdaKV (window
//       ring) and FastGen (accumulated attention), an H2O-style accumulation for the others). Counters (computed once, outside the timing):
//         rel_error         ||o_kept - o_full|| / ||o_full|| of the decode query, all heads
//         needle_retention  fraction of the needle slots kept (context:needle); elsewhere the
//                           fraction of the 16 keys the decode query attends to most
//         bytes_kept        bytes of the kept K and V in f32 (ThinK: kept key channels only)
//       policy "full" (budget:100) is the uncompressed cache: rel_error 0, its time the baseline.
//   Contexts (kind), each built so a policy can be right or wrong for a known reason:
//       sinks    the first 4 keys align with every query (attention sinks)
//       local    keys align with the queries more the closer they are to the end (local decay)
//       needle   8 needle keys in the middle that only the decode query matches (retrieval)
//       repeat   the keys repeat with period 64; the decode query matches one element of the period
//       cluster  keys from 16 clusters; the decode query sits near one cluster centre
//
//   kvpolicy_step/<policy>/Lk:<Lk>/threads:1   the decode-time bookkeeping of one step at the
//       standard decode shape (Hq = 32, Hkv = 8, D = 128): append one slot per kv head, observe
//       the step's probabilities, and every 64 steps select + compact the tracker back to Lk - 64
//       (amortised); snapkv (also PyramidKV's and AdaKV's tracker) keeps its 32-step window ring,
//       fastgen its accumulated attention. kvpolicy_step/decode_sums/... is attention::decode with the column sums at the
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
#include <string>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/decode.hpp"
#include "mnemo/kvcache/policies.hpp"

namespace mnemo::bench {
namespace {

namespace pol = kvcache::policies;
namespace attn = attention;

// ---------------------------------------------------------------------------------------------
// Synthetic contexts.

constexpr std::int64_t ctx_Hq = 8, ctx_Hkv = 2, ctx_D = 64, ctx_window = 32, ctx_sinks = 4, ctx_needles = 8;
constexpr std::int64_t ctx_top = 16;       // keys of the decode query counted when there is no needle
constexpr std::int64_t repeat_period = 64, clusters = 16;
constexpr float signal = 3.0f;             // strength of the planted structure (in key units)

std::int64_t ctx_L() { return full_size() ? 8192 : tiny_size() ? 256 : 2048; }

struct context {
  std::string kind;
  std::int64_t L = 0;
  tensor<float, 4> q, k, v;            // prefill: [1, Hq, L, D], [1, Hkv, L, D], [1, Hkv, L, D]
  tensor<float, 4> q_dec;              // [1, Hq, 1, D] the later (decode) query
  tensor<float, 2> sums_window;        // [Hq, L] column sums of the last ctx_window prefill rows
  tensor<float, 2> sums_all;           // [Hq, L] column sums of all prefill rows
  tensor<float, 2> sums_last;          // [Hq, L] the last prefill row's probabilities
  tensor<float, 4> out_full;           // [1, Hq, 1, D] decode output over the full cache
  std::vector<std::int64_t> important; // needle slots, or the decode query's top keys
};

// Unit direction shared by the queries of a context (the "topic").
std::vector<float> direction(std::uint64_t seed) {
  std::vector<float> u(static_cast<std::size_t>(ctx_D));
  double n = 0;
  for (std::int64_t c = 0; c < ctx_D; ++c) n += std::pow(u[static_cast<std::size_t>(c)] = random_uniform(seed, static_cast<std::uint64_t>(c)), 2);
  for (auto& x : u) x = static_cast<float>(x / std::sqrt(n));
  return u;
}

std::unique_ptr<context> build_context(const std::string& kind) {
  auto ctx = std::make_unique<context>();
  const std::int64_t L = ctx_L(), D = ctx_D;
  ctx->kind = kind;
  ctx->L = L;
  ctx->q = tensor<float, 4>({1, ctx_Hq, L, D});
  ctx->k = tensor<float, 4>({1, ctx_Hkv, L, D});
  ctx->v = tensor<float, 4>({1, ctx_Hkv, L, D});
  ctx->q_dec = tensor<float, 4>({1, ctx_Hq, 1, D});
  fill_random(ctx->q, 11);
  fill_random(ctx->k, 12);
  fill_random(ctx->v, 13);
  fill_random(ctx->q_dec, 14);
  const std::vector<float> topic = direction(15), needle = direction(16);
  auto add = [&](float* x, const std::vector<float>& u, float a) {
    for (std::int64_t c = 0; c < D; ++c) x[c] += a * u[static_cast<std::size_t>(c)];
  };
  // Every query leans on the topic direction, so keys along it get attention.
  for (std::int64_t h = 0; h < ctx_Hq; ++h) {
    for (std::int64_t i = 0; i < L; ++i) add(&ctx->q(0, h, i, 0), topic, signal);
    add(&ctx->q_dec(0, h, 0, 0), topic, signal);
  }
  for (std::int64_t h = 0; h < ctx_Hkv; ++h) {
    if (kind == "sinks") {
      for (std::int64_t j = 0; j < ctx_sinks; ++j) add(&ctx->k(0, h, j, 0), topic, 2 * signal);
    } else if (kind == "local") {
      const double decay = static_cast<double>(L) / 16;
      for (std::int64_t j = 0; j < L; ++j) add(&ctx->k(0, h, j, 0), topic, signal * static_cast<float>(std::exp(-(L - 1 - j) / decay)));
    } else if (kind == "needle") {
      for (std::int64_t n = 0; n < ctx_needles; ++n) add(&ctx->k(0, h, L / 4 + n * (L / 2) / ctx_needles, 0), needle, 4 * signal);
    } else if (kind == "repeat") {
      for (std::int64_t j = repeat_period; j < L; ++j)
        for (std::int64_t c = 0; c < D; ++c) {
          ctx->k(0, h, j, c) = ctx->k(0, h, j % repeat_period, c);
          ctx->v(0, h, j, c) = ctx->v(0, h, j % repeat_period, c);
        }
    } else if (kind == "cluster") {
      for (std::int64_t j = 0; j < L; ++j) {
        const std::vector<float> centre = direction(100 + static_cast<std::uint64_t>(j % clusters));
        for (std::int64_t c = 0; c < D; ++c) ctx->k(0, h, j, c) *= 0.3f;
        add(&ctx->k(0, h, j, 0), centre, signal);
      }
    }
  }
  if (kind == "needle")
    for (std::int64_t h = 0; h < ctx_Hq; ++h) add(&ctx->q_dec(0, h, 0, 0), needle, 2 * signal);
  if (kind == "repeat")  // the decode query asks for the 7th element of the period
    for (std::int64_t h = 0; h < ctx_Hq; ++h)
      for (std::int64_t c = 0; c < D; ++c) ctx->q_dec(0, h, 0, c) += signal * ctx->k(0, h / (ctx_Hq / ctx_Hkv), 7, c);
  if (kind == "cluster")
    for (std::int64_t h = 0; h < ctx_Hq; ++h) add(&ctx->q_dec(0, h, 0, 0), direction(100 + 5), 2 * signal);

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
  if (kind == "needle") {
    for (std::int64_t n = 0; n < ctx_needles; ++n) ctx->important.push_back(L / 4 + n * (L / 2) / ctx_needles);
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
// One policy's decision on a context.

struct decision {
  kvcache::selection kept;
  tensor<float, 3> k;                  // keys the decode reads ([Hkv, L, D]; ThinK: pruned channels)
  std::int64_t key_channels = ctx_D;   // channels stored per key
  bool tracks_attention = false;       // needs the step's column sums
  std::vector<pol::fastgen::choice> per_head;  // FastGen's per-head choice
};

decision decide(const std::string& policy, const context& ctx, std::int64_t budget) {
  const std::int64_t L = ctx.L;
  const view<const float, 3> k = cview(ctx.k)[0], v = cview(ctx.v)[0];
  const view<const float, 3> qw = cview(ctx.q)[0].narrow(1, L - ctx_window, ctx_window);
  decision d;
  d.k = tensor<float, 3>({ctx_Hkv, L, ctx_D});
  std::copy_n(ctx.k.data(), ctx.k.size(), d.k.data());
  const pol::observation win{k, v, qw, ctx.sums_window}, all{k, v, qw, ctx.sums_all}, last{k, v, qw, ctx.sums_last};
  if (policy == "full") {
    d.kept = kvcache::top_budget(ctx.sums_window.as_view().narrow(0, 0, ctx_Hkv), L);
  } else if (policy == "streaming_llm") {
    d.kept = pol::streaming_llm{ctx_sinks}.select(win, budget);
  } else if (policy == "h2o") {
    d.kept = pol::h2o{budget / 4}.select(all, budget);
    d.tracks_attention = true;
  } else if (policy == "scissorhands") {
    d.kept = pol::scissorhands{budget / 4}.select(win, budget);
    d.tracks_attention = true;
  } else if (policy == "tova") {
    d.kept = pol::tova{}.select(last, budget);
    d.tracks_attention = true;
  } else if (policy == "snapkv") {
    d.kept = pol::snapkv{ctx_window, 5}.select(win, budget);
    d.tracks_attention = true;
  } else if (policy == "pyramidkv") {  // the middle layer of 8 (its budget is the average)
    d.kept = pol::pyramidkv{pol::snapkv{ctx_window, 5}, 20}.select(win, 4, 8, std::max(budget, ctx_window));
    d.tracks_attention = true;
  } else if (policy == "adakv") {
    d.kept = pol::adakv{pol::snapkv{ctx_window, 5}, 0.2}.select(win, budget);
    d.tracks_attention = true;
  } else if (policy == "keyformer") {
    d.kept = pol::keyformer{budget / 4, 1.0f, 1}.select(win, budget);
    d.tracks_attention = true;
  } else if (policy == "knorm") {
    d.kept = pol::knorm{}.select(win, budget);
  } else if (policy == "keydiff") {
    d.kept = pol::keydiff{}.select(win, budget);
  } else if (policy == "qfilter") {
    const tensor<float, 2> f = pol::qfilter::fit(qw, ctx_Hkv);
    d.kept = pol::qfilter{f}.select(win, budget);
  } else if (policy == "think") {  // channels, not tokens: keep budget/L of the key channels
    const std::int64_t keep = std::max<std::int64_t>(1, ctx_D * budget / L);
    const kvcache::selection ch = pol::think{ctx_D - keep}.select(win);
    pol::think::prune(k, ch, d.k.as_view());
    d.kept = kvcache::top_budget(ctx.sums_window.as_view().narrow(0, 0, ctx_Hkv), L);
    d.key_channels = keep;
  } else if (policy == "fastgen") {
    std::vector<std::uint8_t> special(static_cast<std::size_t>(L), 0);
    for (std::int64_t j = 0; j < ctx_sinks; ++j) special[static_cast<std::size_t>(j)] = 1;
    const pol::fastgen::plan plan = pol::fastgen{}.select(all, budget, special, {});
    d.kept = plan.kept;
    d.per_head = plan.per_head;
    d.tracks_attention = true;
  } else if (policy == "alisa") {
    d.kept = pol::alisa{0.5, ctx_window}.select(win, budget);
    d.tracks_attention = true;
  }
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
      std::copy_n(&d.k(h, rows[static_cast<std::size_t>(i)], 0), ctx_D, &kh(0, 0, i, 0));
      std::copy_n(&ctx.v(0, h, rows[static_cast<std::size_t>(i)], 0), ctx_D, &vh(0, 0, i, 0));
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
  const decision d = decide(policy, ctx, budget);
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

  // The timed decode step: the kernel over the kept cache and, for attention-tracking
  // policies, the step's column sums feeding the policy's decoder (window ring, accumulated
  // attention) or an H2O-style tracker (one add per slot and head).
  pol::h2o::decoder tracker(ctx_Hkv);
  pol::snapkv::decoder window(ctx_Hkv, pol::snapkv{ctx_window, 5});
  std::unique_ptr<pol::fastgen::decoder> fg;
  if (policy == "fastgen") fg = std::make_unique<pol::fastgen::decoder>(pol::fastgen{}, d.per_head);
  const bool windowed = policy == "snapkv" || policy == "pyramidkv" || policy == "adakv";
  for (std::int64_t h = 0; h < ctx_Hkv; ++h)
    for (std::int64_t j = 0; j < d.kept.kept(h); ++j) {
      tracker.append(h);
      window.append(h);
      if (fg) fg->append(h, false, false);
    }
  for (auto _ : state) {
    decode_kept(ctx, c, out, d.tracks_attention ? &sums : nullptr, ws);
    if (windowed) window.observe(cview(sums)[0]);
    else if (fg) fg->observe(cview(sums)[0]);
    else if (d.tracks_attention) tracker.observe(cview(sums)[0]);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["rel_error"] = ref > 0 ? std::sqrt(err / ref) : 0.0;
  state.counters["needle_retention"] = retained / static_cast<double>(ctx_Hkv * static_cast<std::int64_t>(ctx.important.size()));
  state.counters["bytes_kept"] = bytes;
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

// probs [Hq, Lk]: a fixed probability row standing in for the step's column sums.
tensor<float, 2> step_probs(const step_shape& s) {
  tensor<float, 2> p({s.Hq, s.Lk});
  fill_random(p, 21, 0.0f, 2.0f / static_cast<float>(s.Lk));
  return p;
}

template <class Decoder, class Append, class Observe, class Select>
void run_tracker(benchmark::State& state, const step_shape& s, Decoder& dec, Append append, Observe observe, Select select) {
  const std::int64_t base = s.Lk - step_every;
  for (std::int64_t h = 0; h < s.Hkv; ++h)
    for (std::int64_t j = 0; j < base; ++j) append(h, j);
  const tensor<float, 2> probs = step_probs(s);
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

void step_row(benchmark::State& state, const std::string& policy, const step_shape& s) {
  tensor<float, 2> key({1, s.D});
  fill_random(key, 31);
  auto no_observe = [](view<const float, 2>) {};
  if (policy == "streaming_llm") {
    std::vector<std::int64_t> len(static_cast<std::size_t>(s.Hkv), s.Lk - step_every);
    const pol::streaming_llm p{ctx_sinks};
    bookkeeping_row(
        state, s, p, [&](std::int64_t) { for (auto& n : len) ++n; },
        [&] {
          const kvcache::selection sel = p.keep(len, s.Lk - step_every);
          for (std::size_t h = 0; h < len.size(); ++h) len[h] = static_cast<std::int64_t>(sel.heads[h].size());
          benchmark::DoNotOptimize(sel.heads.data());
        });
  } else if (policy == "h2o") {
    pol::h2o::decoder dec(s.Hkv, 64);
    run_tracker(state, s, dec, [&](std::int64_t h, std::int64_t) { dec.append(h); },
                [&](view<const float, 2> p) { dec.observe(p); }, [&](std::int64_t b) { return dec.select(b); });
  } else if (policy == "tova") {
    pol::tova::decoder dec(s.Hkv);
    run_tracker(state, s, dec, [&](std::int64_t h, std::int64_t) { dec.append(h); },
                [&](view<const float, 2> p) { dec.observe(p); }, [&](std::int64_t b) { return dec.select(b); });
  } else if (policy == "scissorhands") {
    pol::scissorhands::decoder dec(s.Hkv, 64);
    run_tracker(state, s, dec, [&](std::int64_t h, std::int64_t) { dec.append(h); },
                [&](view<const float, 2> p) { dec.observe(p); }, [&](std::int64_t b) { return dec.select(b); });
  } else if (policy == "keyformer") {
    pol::keyformer::decoder dec(s.Hkv, pol::keyformer{64, 1.0f, 1});
    run_tracker(state, s, dec, [&](std::int64_t h, std::int64_t) { dec.append(h); },
                [&](view<const float, 2> p) { dec.observe(p); }, [&](std::int64_t b) { return dec.select(b); });
  } else if (policy == "alisa") {
    pol::alisa::decoder dec(s.Hkv, pol::alisa{0.5, 8});
    run_tracker(state, s, dec, [&](std::int64_t h, std::int64_t) { dec.append(h); },
                [&](view<const float, 2> p) { dec.observe(p); }, [&](std::int64_t b) { return dec.select(b); });
  } else if (policy == "snapkv") {
    pol::snapkv::decoder dec(s.Hkv, pol::snapkv{ctx_window, 5});
    run_tracker(state, s, dec, [&](std::int64_t h, std::int64_t) { dec.append(h); },
                [&](view<const float, 2> p) { dec.observe(p); }, [&](std::int64_t b) { return dec.select(b); });
  } else if (policy == "adakv") {
    pol::adakv::decoder dec(s.Hkv, pol::adakv{pol::snapkv{ctx_window, 5}, 0.2});
    run_tracker(state, s, dec, [&](std::int64_t h, std::int64_t) { dec.append(h); },
                [&](view<const float, 2> p) { dec.observe(p); }, [&](std::int64_t b) { return dec.select(b); });
  } else if (policy == "fastgen") {  // every head on the costliest choice (frequency)
    pol::fastgen::decoder dec(pol::fastgen{}, std::vector<pol::fastgen::choice>(static_cast<std::size_t>(s.Hkv),
                                                                                  pol::fastgen::choice::frequency));
    run_tracker(state, s, dec, [&](std::int64_t h, std::int64_t) { dec.append(h, false, false); },
                [&](view<const float, 2> p) { dec.observe(p); }, [&](std::int64_t b) { return dec.select(b); });
  } else if (policy == "knorm") {
    pol::knorm::decoder dec(s.Hkv);
    run_tracker(state, s, dec, [&](std::int64_t h, std::int64_t) { dec.append(h, key.data(), s.D); }, no_observe,
                [&](std::int64_t b) { return dec.select(b, ctx_sinks, 64); });
  }
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
  const std::vector<std::string> policies = {"streaming_llm", "h2o",   "scissorhands", "tova",    "snapkv",
                                             "pyramidkv",     "adakv", "keyformer",    "knorm",   "keydiff",
                                             "qfilter",       "think", "fastgen",      "alisa"};
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
    for (const std::string p :
         {"streaming_llm", "h2o", "tova", "scissorhands", "keyformer", "alisa", "knorm", "snapkv", "adakv", "fastgen"})
      register_row(row_name("kvpolicy_step", p, {{"Lk", Lk}, {"threads", "1"}}),
                   [p, s](benchmark::State& st) { step_row(st, p, s); });
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
