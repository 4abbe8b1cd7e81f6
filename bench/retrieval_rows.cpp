// bench/retrieval_rows.cpp — selective decode rows: Quest pages, IVF retrieval attention and
// landmark blocks, against dense split-KV decode on the same cache in the same run.
//
//   decode/dense/Lk:../kv:f32/threads:..       attention::decode over every key (the baseline)
//   decode/quest/Lk:../kv:f32/threads:..       attention::quest_decode, pages of 16, 112 pages + window 256
//   decode/quest_p32/Lk:../kv:f32/threads:..   the same with pages of 32, 56 pages + window 256
//   decode/retrieval/Lk:../kv:f32/threads:..   attention::retrieval_decode, top 1792 keys + window 256
//   decode/landmark/Lk:../kv:f32/threads:..    attention::landmark_decode, blocks of 64, 28 blocks + window 256
//
// Every selective row attends to 2048 keys per query head (selection + window). Shape: the standard
// decode heads (Hq = 32, Hkv = 8, D = Dv = 128, Lq = 1, f32 K/V); Lk in {32768, 131072} (small) or
// {8192, 32768, 65536, 131072} (full). Run `bench/plot --baseline dense` for the speedups.
//
// Counters (computed once per shape, outside the timed loop):
//   rel_error  ||out - out_dense||_2 / ||out_dense||_2 over all heads
//   recall256  mean over query heads of the fraction of the true top-256 keys (exact q . k over all
//              Lk keys) that the row attends to (its selection plus the window)
//   build_ms   one-time cost of the row's index, not part of the decode time: page min/max (quest),
//              k-means + list assignment (retrieval), landmark keys (landmark); 0 for dense
//   FLOP/s, bytes/s as every decode row (for the dense count: a ratio of FLOP/s is a time ratio)
//
// The cache: clustered synthetic keys, built to have the two structures real key caches show
// (semantic clustering and locality; e.g. Liu et al. 2024, RetrievalAttention; Tang et al. 2024,
// Quest). Per kv head: 512 topic centroids c_t ~ N(0, I_D) and a shared offset mu ~ N(0, I_D) (key
// caches carry a large common component); the sequence is cut into segments of 16 .. 240 tokens
// (uniform), each on a topic drawn uniformly, and k_j = mu + c_t(j) + eps_j with eps_j ~ N(0, I_D)
// (noise as large as the centroid: the within-topic spread is wide). Values v_j ~ U(-1, 1). A query
// head mixes two topics that occur in the context, q = 0.8 c_a + 0.4 c_b + 0.5 eps: so its
// attention spreads over a few hundred keys of two topics in several segments, with a tail over the
// rest (scaled scores about 9.1 +- 1.0 for topic a, 4.5 for b, 0 +- 1.5 elsewhere). Landmark keys,
// which a trained model would produce, are synthesized as the mean key of each block.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "common.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/landmark.hpp"
#include "mnemo/attention/quest.hpp"
#include "mnemo/attention/retrieval.hpp"

namespace mnemo::bench {
namespace {

namespace attn = mnemo::attention;

// Attended keys per query head and their split: selection + window.
constexpr std::int64_t budget = 2048, window = 256, selected_keys = budget - window;
constexpr std::int64_t landmark_block = 64;
constexpr std::int64_t topics = 512, min_segment = 16, max_segment = 240;
constexpr std::int64_t n_lists = 512, n_probe = 12, kmeans_iterations = 6;
constexpr std::int64_t recall_k = 256;

std::vector<std::int64_t> lengths() {
  return full_size() ? std::vector<std::int64_t>{8192, 32768, 65536, 131072} : std::vector<std::int64_t>{32768, 131072};
}

// One cache and query set, with the dense result and the exact top-256 of every query head.
struct world {
  shape s;
  tensor<float, 4> q, k, v;
  tensor<float, 4> dense;                            // [1, Hq, 1, Dv]
  std::vector<std::vector<std::int64_t>> truth;      // per query head: true top-256 keys
  // The retrieval index, built once on first use (k-means takes seconds) and its build time.
  std::unique_ptr<attn::retrieval_index> index;
  double index_ms = 0;
};

std::unique_ptr<world> make_world(std::int64_t Lk) {
  auto w = std::make_unique<world>();
  w->s = decode_shape(Lk);
  const shape& s = w->s;
  w->q = tensor<float, 4>({1, s.Hq, 1, s.D});
  w->k = tensor<float, 4>({1, s.Hkv, Lk, s.D});
  w->v = tensor<float, 4>({1, s.Hkv, Lk, s.Dv});
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (std::int64_t hk = 0; hk < s.Hkv; ++hk) {
    std::vector<float> c(static_cast<std::size_t>(topics * s.D)), mu(static_cast<std::size_t>(s.D));
    for (float& x : c) x = normal(rng);
    for (float& x : mu) x = normal(rng);
    std::vector<std::int64_t> topic_of(static_cast<std::size_t>(Lk));
    std::uniform_int_distribution<std::int64_t> seg(min_segment, max_segment), pick(0, topics - 1);
    for (std::int64_t j = 0; j < Lk;) {
      const std::int64_t t = pick(rng), n = std::min(seg(rng), Lk - j);
      for (std::int64_t i = 0; i < n; ++i) topic_of[static_cast<std::size_t>(j + i)] = t;
      j += n;
    }
    for (std::int64_t j = 0; j < Lk; ++j) {
      const float* ct = c.data() + topic_of[static_cast<std::size_t>(j)] * s.D;
      for (std::int64_t d = 0; d < s.D; ++d) w->k(0, hk, j, d) = mu[static_cast<std::size_t>(d)] + ct[d] + normal(rng);
      for (std::int64_t d = 0; d < s.Dv; ++d) w->v(0, hk, j, d) = uniform(rng);
    }
    std::uniform_int_distribution<std::int64_t> pos(0, Lk - 1);
    for (std::int64_t g = 0; g < s.Hq / s.Hkv; ++g) {
      const std::int64_t h = hk * (s.Hq / s.Hkv) + g;
      const float* ca = c.data() + topic_of[static_cast<std::size_t>(pos(rng))] * s.D;
      const float* cb = c.data() + topic_of[static_cast<std::size_t>(pos(rng))] * s.D;
      for (std::int64_t d = 0; d < s.D; ++d) w->q(0, h, 0, d) = 0.8f * ca[d] + 0.4f * cb[d] + 0.5f * normal(rng);
    }
  }
  w->dense = tensor<float, 4>({1, s.Hq, 1, s.Dv});
  attn::decode(w->q, w->k, w->v, w->dense);
  const auto kv = cview(w->k);
  for (std::int64_t h = 0; h < s.Hq; ++h)
    w->truth.push_back(attn::reference_exact_search(kv[0][h / (s.Hq / s.Hkv)], w->q.as_view().ptr(0, h, 0), recall_k));
  return w;
}

// The world of each Lk, built on first use (generation and the exact top-256 take seconds).
world& world_for(std::int64_t Lk) {
  static std::map<std::int64_t, std::unique_ptr<world>> worlds;
  auto& w = worlds[Lk];
  if (!w) w = make_world(Lk);
  return *w;
}

double rel_error(const tensor<float, 4>& out, const tensor<float, 4>& dense) {
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < out.size(); ++i) {
    const double d = static_cast<double>(out.data()[i]) - dense.data()[i];
    num += d * d;
    den += static_cast<double>(dense.data()[i]) * dense.data()[i];
  }
  return std::sqrt(num / den);
}

// Mean recall of the true top-256 over query heads; attended(h) lists head h's attended keys.
template <class Attended>
double mean_recall(const world& w, Attended&& attended) {
  double sum = 0;
  for (std::int64_t h = 0; h < w.s.Hq; ++h) sum += attn::search_recall(attended(h), w.truth[static_cast<std::size_t>(h)]);
  return sum / static_cast<double>(w.s.Hq);
}

// Window keys plus the keys of the listed blocks of `block` keys (ids < 0 skipped).
std::vector<std::int64_t> block_keys(const tensor<std::int64_t, 3>& sel, std::int64_t h, std::int64_t block,
                                     std::int64_t Lk) {
  std::vector<std::int64_t> keys;
  for (std::int64_t i = 0; i < sel.extent(2); ++i) {
    const std::int64_t p = sel(0, h, i);
    for (std::int64_t j = p * block; p >= 0 && j < std::min((p + 1) * block, Lk - window); ++j) keys.push_back(j);
  }
  for (std::int64_t j = Lk - window; j < Lk; ++j) keys.push_back(j);
  return keys;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

void finish(benchmark::State& state, const world& w, int threads, double err, double recall, double build_ms,
            const char* config) {
  set_attention_counters(state, w.s, threads);
  state.counters["rel_error"] = err;
  state.counters["recall256"] = recall;
  state.counters["build_ms"] = build_ms;
  std::string label = w.s.label();
  label.append(" kv=f32 threads=").append(std::to_string(threads)).append(" ").append(config);
  state.SetLabel(label);
}

void dense_row(benchmark::State& state, std::int64_t Lk, int threads) {
  world& w = world_for(Lk);
  tensor<float, 4> out({1, w.s.Hq, 1, w.s.Dv});
  attn::decode_workspace ws;
  const attn::options opt{0, threads};
  for (auto _ : state) {
    attn::decode<float>(w.q, w.k, w.v, out, {}, attn::mods::none{}, opt, ws);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  finish(state, w, threads, rel_error(out, w.dense), 1.0, 0.0, "all keys");
}

template <std::int64_t page_size>
void quest_row(benchmark::State& state, std::int64_t Lk, int threads) {
  world& w = world_for(Lk);
  const auto t0 = std::chrono::steady_clock::now();
  const auto pages = attn::quest_pages::build(w.k, page_size);
  const double build_ms = ms_since(t0);
  attn::quest_options opt;
  opt.blocks = selected_keys / page_size;
  opt.window = window;
  opt.threads = threads;
  tensor<float, 4> out({1, w.s.Hq, 1, w.s.Dv});
  tensor<std::int64_t, 3> sel({1, w.s.Hq, opt.blocks});
  attn::quest_decode(w.q, w.k, w.v, pages, out, {}, opt, sel);
  const double recall = mean_recall(w, [&](std::int64_t h) { return block_keys(sel, h, page_size, Lk); });
  const double err = rel_error(out, w.dense);
  for (auto _ : state) {
    attn::quest_decode(w.q, w.k, w.v, pages, out, {}, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const std::string config = "page=" + std::to_string(page_size) + " pages=" + std::to_string(opt.blocks) + " window=256";
  finish(state, w, threads, err, recall, build_ms, config.c_str());
}

void retrieval_row(benchmark::State& state, std::int64_t Lk, int threads) {
  world& w = world_for(Lk);
  attn::retrieval_index_options iopt;
  iopt.n_lists = n_lists;
  iopt.iterations = kmeans_iterations;
  iopt.threads = threads;
  // The index covers the keys outside the window (keys join it when they leave the window). Built
  // once per cache, with the thread count of the first row that needs it.
  if (!w.index) {
    const auto t0 = std::chrono::steady_clock::now();
    w.index = std::make_unique<attn::retrieval_index>(
        attn::retrieval_index::build(cview(w.k).narrow(2, 0, Lk - window), iopt));
    w.index_ms = ms_since(t0);
  }
  const attn::retrieval_index& index = *w.index;
  const double build_ms = w.index_ms;
  attn::retrieval_options opt;
  opt.n_probe = n_probe;
  opt.top_k = selected_keys;
  opt.window = window;
  opt.threads = threads;
  tensor<float, 4> out({1, w.s.Hq, 1, w.s.Dv});
  tensor<std::int64_t, 3> ids({1, w.s.Hq, opt.top_k});
  attn::retrieval_decode(w.q, w.k, w.v, index, out, {}, opt, ids);
  const double recall = mean_recall(w, [&](std::int64_t h) {
    std::vector<std::int64_t> keys;
    for (std::int64_t i = 0; i < opt.top_k; ++i)
      if (ids(0, h, i) >= 0) keys.push_back(ids(0, h, i));
    for (std::int64_t j = Lk - window; j < Lk; ++j) keys.push_back(j);
    return keys;
  });
  const double err = rel_error(out, w.dense);
  for (auto _ : state) {
    attn::retrieval_decode(w.q, w.k, w.v, index, out, {}, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  finish(state, w, threads, err, recall, build_ms, "lists=512 probe=12 top_k=1792 window=256");
}

void landmark_row(benchmark::State& state, std::int64_t Lk, int threads) {
  world& w = world_for(Lk);
  const std::int64_t n_blocks = Lk / landmark_block;
  const auto t0 = std::chrono::steady_clock::now();
  tensor<float, 4> lm({1, w.s.Hkv, n_blocks, w.s.D});
  for (std::int64_t hk = 0; hk < w.s.Hkv; ++hk)
    for (std::int64_t b = 0; b < n_blocks; ++b)
      for (std::int64_t j = b * landmark_block; j < (b + 1) * landmark_block; ++j)
        simd::axpy(1.0f / landmark_block, w.k.as_view().ptr(0, hk, j), lm.as_view().ptr(0, hk, b), w.s.D);
  const double build_ms = ms_since(t0);
  attn::landmark_options opt;
  opt.blocks = selected_keys / landmark_block;
  opt.window = window;
  opt.threads = threads;
  tensor<float, 4> out({1, w.s.Hq, 1, w.s.Dv});
  tensor<std::int64_t, 3> sel({1, w.s.Hq, opt.blocks});
  attn::landmark_decode<float>(w.q, w.k, w.v, lm, landmark_block, out, {}, opt, sel);
  const double recall = mean_recall(w, [&](std::int64_t h) { return block_keys(sel, h, landmark_block, Lk); });
  const double err = rel_error(out, w.dense);
  for (auto _ : state) {
    attn::landmark_decode<float>(w.q, w.k, w.v, lm, landmark_block, out, {}, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  finish(state, w, threads, err, recall, build_ms, "block=64 blocks=28 window=256 landmark=block mean");
}

const bool registered = [] {
  using row_fn = void (*)(benchmark::State&, std::int64_t, int);
  const std::pair<const char*, row_fn> rows[] = {
      {"dense", dense_row}, {"quest", quest_row<16>}, {"quest_p32", quest_row<32>}, {"retrieval", retrieval_row}, {"landmark", landmark_row}};
  for (std::int64_t Lk : lengths())
    for (const auto& [impl, fn] : rows)
      for (int t : thread_counts())
        register_row(decode_name(impl, decode_shape(Lk), "f32", t), [Lk, t, fn = fn](benchmark::State& state) {
          if (threads_available(state, t)) fn(state, Lk, t);
        });
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
