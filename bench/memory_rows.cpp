// bench/memory_rows.cpp — memory-module rows (include/mnemo/memory/): every fast path next to its
// double-precision reference, at one shape per size, and the read and write halves of each module.
//
//   memory/<impl>/module:titans/L:../D:../Hd:../chunk:../threads:..   neural_memory (update + read)
//   memory/fast/module:titans_read/L:../D:../Hd:../threads:..          neural_memory_read (no update)
//   memory/<impl>/module:pkm/N:../heads:../n_keys:../knn:../threads:..  pkm_forward
//   memory/fast/module:pkm_search/...                                 pkm_search: sub-key scores, top-k, softmax
//   memory/fast/module:pkm_score/...                                  the sub-key score GEMMs of pkm_search alone
//   memory/fast/module:pkm_gather/...                                 pkm_gather: the weighted value-row reads alone
//   memory/<impl>/module:pkm_backward/...                             pkm_backward (the write: dvalues)
//   memory/<impl>/module:infini/L:../D:../S:../threads:..             infini_attention (H = 8)
//   memory/fast/module:infini_retrieve|infini_update/L:../D:../threads:..  compressive_retrieve / _update (delta)
//   memory/<impl>/module:knn/Lq:../size:../topk:../threads:..         knn_attention (H = 8, D = 64)
//   memory/fast/module:knn_add/L:../size:../threads:..                knn_memory::add of L pairs (the write)
//   memory/<impl>/module:armt/L:../M:../Dk:../threads:..              armt_update (M tokens) + armt_read (L tokens)
//   memory/fast/module:armt_update|armt_read/...                      the two halves alone
//
// impl is `fast` (the library's f32 path) or `reference` (double). Counters:
//   tokens/s  tokens (query rows for pkm and knn) processed per second: the figure to compare;
//   FLOP/s    the multiply-adds of the module's defining equations x 2, the same count for both
//             impls (so a FLOP/s ratio is a time ratio), listed per module below;
//   bytes/s   where a row is a memory read or write: the bytes of state it must touch, below.
//
// Full size (MNEMO_BENCH_SIZE=full) registers the shapes: PKM N = 4096 query rows, 4
// heads, k_dim = v_dim = 512, n_keys = 512 (262,144 value rows, 512 MiB), knn = 32; Titans
// D = 256, Hd = 512, L = 8192, chunk 1 (per token) and 64. The ratios they are for:
//   top-k share of the PKM forward = (pkm_search - pkm_score) / pkm     (target <= 0.25)
//   value-gather bandwidth         = pkm_gather bytes/s / machine/stream_read bytes/s (>= 0.5)
//   Titans chunked speed-up        = titans chunk:1 time / titans chunk:64 time (>= 5)
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>

#include "common.hpp"
#include "memory_common.hpp"
#include "mnemo/memory/compressive.hpp"
#include "mnemo/memory/knn.hpp"
#include "mnemo/memory/neural_memory.hpp"
#include "mnemo/memory/product_keys.hpp"
#include "mnemo/memory/recurrent_memory.hpp"

namespace mnemo::bench {
namespace {

namespace mem = mnemo::memory;

// ---- Titans: per token the key's forward (2P), backward (4P), the query's read (2P) and the
// momentum and decay updates (4P), P = 2 D Hd parameters of the depth-2 memory: 12 P x 2 FLOP.
void titans_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t D, std::int64_t Hd,
                std::int64_t chunk, bool reference) {
  const mem::mlp_shape s{D, Hd, 2, mem::activation::silu, true};
  tensor<float, 3> q({1, L, D}), k({1, L, D}), v({1, L, D}), y({1, L, D});
  tensor<float, 2> theta({1, L}), eta({1, L}), alpha({1, L});
  fill_random(q, 1);
  fill_random(k, 2);
  fill_random(v, 3);
  fill_random(theta, 4, 0.0f, 0.01f);
  fill_random(eta, 5, 0.8f, 0.95f);
  fill_random(alpha, 6, 0.0f, 0.01f);
  mem::neural_memory_state st(1, s);
  const float w = 1.0f / static_cast<float>(D);
  tensor<float, 3> w0({1, D, Hd}), w1({1, Hd, D});
  fill_random(w0, 7, -w, w);
  fill_random(w1, 8, -w, w);
  const mem::neural_memory_options opt{.chunk_size = chunk, .threads = threads};
  for (auto _ : state) {
    state.PauseTiming();  // every iteration starts from the same memory
    std::copy(w0.begin(), w0.end(), st.weight(0).data());
    std::copy(w1.begin(), w1.end(), st.weight(1).data());
    std::fill(st.momentum(0).data(), st.momentum(0).data() + w0.size(), 0.0f);
    std::fill(st.momentum(1).data(), st.momentum(1).data() + w1.size(), 0.0f);
    state.ResumeTiming();
    if (reference) mem::reference::neural_memory(q, k, v, theta, eta, alpha, st, y, opt);
    else mem::neural_memory(q, k, v, theta, eta, alpha, st, y, opt);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double P = 2.0 * static_cast<double>(D * Hd);
  set_token_counters(state, static_cast<double>(L), 2.0 * 12.0 * P * static_cast<double>(L),
                     "B=1 L=" + std::to_string(L) + " D=" + std::to_string(D) + " Hd=" + std::to_string(Hd) +
                         " chunk=" + std::to_string(chunk) + " threads=" + std::to_string(threads));
}

// The read alone, y = M(x) with fixed weights: per token the forward of the MLP, 2P multiply-adds.
// bytes/s: the weights the read must load, once per call.
void titans_read_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t D, std::int64_t Hd) {
  const mem::mlp_shape s{D, Hd, 2, mem::activation::silu, true};
  tensor<float, 3> x({1, L, D}), y({1, L, D});
  fill_random(x, 1);
  mem::neural_memory_state st(1, s);
  const float w = 1.0f / static_cast<float>(D);
  tensor<float, 3> w0({1, D, Hd}), w1({1, Hd, D});
  fill_random(w0, 7, -w, w);
  fill_random(w1, 8, -w, w);
  std::copy(w0.begin(), w0.end(), st.weight(0).data());
  std::copy(w1.begin(), w1.end(), st.weight(1).data());
  for (auto _ : state) {
    mem::neural_memory_read(x, st, y, threads);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double P = 2.0 * static_cast<double>(D * Hd);
  set_token_counters(state, static_cast<double>(L), 2.0 * P * static_cast<double>(L),
                     "B=1 L=" + std::to_string(L) + " D=" + std::to_string(D) + " Hd=" + std::to_string(Hd) +
                         " threads=" + std::to_string(threads));
  state.counters["bytes/s"] = benchmark::Counter(P * sizeof(float), benchmark::Counter::kIsIterationInvariantRate);
}

// ---- PKM: per row and head the sub-key scores (n_keys x k_dim) and the value reads (knn x v_dim).
struct pkm_inputs {
  std::int64_t N, heads, k_dim, n_keys, v_dim, knn;
  tensor<float, 3> query, weights;
  tensor<float, 4> keys;
  tensor<float, 2> values, out;
  tensor<std::int64_t, 3> indices;
  pkm_inputs(std::int64_t N_, std::int64_t heads_, std::int64_t k_dim_, std::int64_t n_keys_, std::int64_t v_dim_,
             std::int64_t knn_)
      : N(N_), heads(heads_), k_dim(k_dim_), n_keys(n_keys_), v_dim(v_dim_), knn(knn_),
        query({N, heads, k_dim}), weights({N, heads, knn}), keys({heads, 2, n_keys, k_dim / 2}),
        values({n_keys * n_keys, v_dim}), out({N, v_dim}), indices({N, heads, knn}) {
    fill_random(query, 11);
    fill_random(keys, 12);
    fill_random(values, 13);
  }
  double score_flops() const { return 2.0 * static_cast<double>(N * heads) * static_cast<double>(n_keys * k_dim); }
  double gather_flops() const { return 2.0 * static_cast<double>(N * heads) * static_cast<double>(knn * v_dim); }
  double flops() const { return score_flops() + gather_flops(); }
  // The value rows a lookup reads: knn rows of v_dim f32 per query row and head (rows chosen twice
  // are counted twice: each is read again).
  double gather_bytes() const { return static_cast<double>(N * heads * knn * v_dim) * sizeof(float); }
  std::string label(int threads) const {
    return "N=" + std::to_string(N) + " heads=" + std::to_string(heads) + " k_dim=" + std::to_string(k_dim) +
           " n_keys=" + std::to_string(n_keys) + " v_dim=" + std::to_string(v_dim) + " knn=" + std::to_string(knn) +
           " threads=" + std::to_string(threads);
  }
};

// The inputs of one PKM shape, built on first use (the full shape's value table is 512 MiB, so
// it is not allocated unless a row of that shape runs) and shared by its rows.
class pkm_shape {
 public:
  pkm_shape(std::int64_t N, std::int64_t heads, std::int64_t k_dim, std::int64_t n_keys, std::int64_t v_dim,
            std::int64_t knn)
      : N_(N), heads_(heads), k_dim_(k_dim), n_keys_(n_keys), v_dim_(v_dim), knn_(knn) {}
  pkm_inputs& get() {
    if (!in_) in_ = std::make_unique<pkm_inputs>(N_, heads_, k_dim_, n_keys_, v_dim_, knn_);
    return *in_;
  }

 private:
  std::int64_t N_, heads_, k_dim_, n_keys_, v_dim_, knn_;
  std::unique_ptr<pkm_inputs> in_;
};

void pkm_row(benchmark::State& state, int threads, pkm_inputs& in, bool reference) {
  const mem::pkm_options opt{.threads = threads};
  for (auto _ : state) {
    if (reference) mem::reference::pkm_forward(in.query, in.keys, in.values, in.knn, in.out, in.indices, in.weights, {}, opt);
    else mem::pkm_forward(in.query, in.keys, in.values, in.knn, in.out, in.indices, in.weights, {}, opt);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_token_counters(state, static_cast<double>(in.N), in.flops(), in.label(threads));
  state.counters["bytes/s"] = benchmark::Counter(in.gather_bytes(), benchmark::Counter::kIsIterationInvariantRate);
}

// The search alone (pkm_search): sub-key score GEMMs, top-k of each half, best pairs, softmax.
void pkm_search_row(benchmark::State& state, int threads, pkm_inputs& in) {
  const mem::pkm_options opt{.threads = threads};
  for (auto _ : state) {
    mem::pkm_search(in.query, in.keys, in.knn, in.indices, in.weights, {}, opt);
    benchmark::DoNotOptimize(in.weights.data());
    benchmark::ClobberMemory();
  }
  set_token_counters(state, static_cast<double>(in.N), in.score_flops(), in.label(threads));
}

// The sub-key score GEMMs of pkm_search alone, with its blocks, staging and threads (the top-k
// share of the forward is (pkm_search - pkm_score) / pkm).
void pkm_score_row(benchmark::State& state, int threads, pkm_inputs& in) {
  const mem::detail::pkm_dims d{in.N, in.heads, in.k_dim, in.k_dim / 2, in.n_keys, in.v_dim, in.knn};
  const std::int64_t blocks = (d.N + mem::detail::pkm_row_block - 1) / mem::detail::pkm_row_block;
  const view<const float, 3> query = in.query;
  const view<const float, 4> keys = in.keys;
  for (auto _ : state) {
    mnemo::detail::for_each_item(blocks, threads, true, [&](std::int64_t blk) {
      const std::int64_t n0 = blk * mem::detail::pkm_row_block, rows = std::min(mem::detail::pkm_row_block, d.N - n0);
      mem::detail::pkm_workspace ws(d, rows);
      for (std::int64_t h = 0; h < d.heads; ++h)
        for (int part = 0; part < 2; ++part) {
          mem::detail::pkm_subkey_scores(query, keys, d, n0, rows, h, part, false, ws);
          benchmark::DoNotOptimize(ws.s.data());
        }
    });
    benchmark::ClobberMemory();
  }
  set_token_counters(state, static_cast<double>(in.N), in.score_flops(), in.label(threads));
}

// The value read alone (pkm_gather) with the indices and weights of a search: bytes/s is the
// figure to hold against machine/stream_read.
void pkm_gather_row(benchmark::State& state, int threads, pkm_inputs& in) {
  mem::pkm_search(in.query, in.keys, in.knn, in.indices, in.weights, {}, {.threads = threads});
  for (auto _ : state) {
    mem::pkm_gather(in.values, in.indices, in.weights, in.out, threads);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_token_counters(state, static_cast<double>(in.N), in.gather_flops(), in.label(threads));
  state.counters["bytes/s"] = benchmark::Counter(in.gather_bytes(), benchmark::Counter::kIsIterationInvariantRate);
}

// Backward: the same products once more for dquery / dkeys and dvalues (2 x the forward's count).
void pkm_backward_row(benchmark::State& state, int threads, pkm_inputs& in, bool reference) {
  const mem::pkm_options opt{.threads = threads};
  mem::pkm_forward(in.query, in.keys, in.values, in.knn, in.out, in.indices, in.weights, {}, opt);
  tensor<float, 2> dout({in.N, in.v_dim}), dvalues({in.n_keys * in.n_keys, in.v_dim});
  tensor<float, 3> dquery({in.N, in.heads, in.k_dim});
  tensor<float, 4> dkeys({in.heads, 2, in.n_keys, in.k_dim / 2});
  fill_random(dout, 14);
  for (auto _ : state) {
    if (reference)
      mem::reference::pkm_backward(in.query, in.keys, in.values, in.indices, in.weights, dout, dquery, dkeys, dvalues, opt);
    else mem::pkm_backward(in.query, in.keys, in.values, in.indices, in.weights, dout, dquery, dkeys, dvalues, opt);
    benchmark::DoNotOptimize(dquery.data());
    benchmark::ClobberMemory();
  }
  set_token_counters(state, static_cast<double>(in.N), 2.0 * in.flops(), in.label(threads));
}

// ---- Infini-attention: per (head, token) the local causal attention over (S + 1) / 2 keys on
// average (2 (D + Dv) per pair), the retrieval sigma(q) M (Dk Dv) and the update sigma(k)^T v (Dk Dv).
void infini_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t D, std::int64_t S, bool reference) {
  constexpr std::int64_t H = 8;
  tensor<float, 4> q({1, H, L, D}), k({1, H, L, D}), v({1, H, L, D}), out({1, H, L, D});
  tensor<float, 1> beta({H});
  fill_random(q, 21);
  fill_random(k, 22);
  fill_random(v, 23);
  const mem::compressive_options opt{.segment_len = S, .update = mem::compressive_rule::delta, .threads = threads};
  for (auto _ : state) {
    mem::compressive_state st(1, H, D, D);  // a fresh memory every iteration (allocation: 8 x D^2 floats)
    if (reference) mem::reference::infini_attention(q, k, v, beta, st, out, opt);
    else mem::infini_attention(q, k, v, beta, st, out, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double per_token = 2.0 * (2.0 * D) * (static_cast<double>(S) + 1) / 2 + 2.0 * 2.0 * static_cast<double>(D * D);
  set_token_counters(state, static_cast<double>(L), per_token * static_cast<double>(H * L),
                     "H=8 L=" + std::to_string(L) + " D=" + std::to_string(D) + " S=" + std::to_string(S) +
                         " threads=" + std::to_string(threads));
}

// The two halves of the compressive memory alone (H = 8, Dk = Dv = D, one segment of L tokens):
// retrieve sigma(Q) M / (sigma(Q) z) and the delta update. FLOP: Dk Dv multiply-adds per token for
// the retrieval, 2 Dk Dv for the update (the correction's read, then the write); bytes/s: the
// state M read (retrieve) or read and written (update).
void infini_part_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t D, bool update) {
  constexpr std::int64_t H = 8;
  tensor<float, 4> q({1, H, L, D}), k({1, H, L, D}), v({1, H, L, D}), out({1, H, L, D});
  fill_random(q, 21);
  fill_random(k, 22);
  fill_random(v, 23);
  mem::compressive_state st(1, H, D, D);
  mem::compressive_update(k, v, st, mem::compressive_rule::delta, threads);  // a non-empty memory
  for (auto _ : state) {
    if (update) mem::compressive_update(k, v, st, mem::compressive_rule::delta, threads);
    else mem::compressive_retrieve(q, st, out, threads);
    benchmark::DoNotOptimize(st.memory().data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double state_bytes = static_cast<double>(H * D * D) * sizeof(float);
  set_token_counters(state, static_cast<double>(L), (update ? 4.0 : 2.0) * static_cast<double>(H * L * D * D),
                     "H=8 L=" + std::to_string(L) + " D=" + std::to_string(D) + " threads=" + std::to_string(threads));
  state.counters["bytes/s"] =
      benchmark::Counter((update ? 2.0 : 1.0) * state_bytes, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- kNN memory: per (head, query) the search over every stored key (D) and attention over topk
// pairs (D + Dv).
void knn_row(benchmark::State& state, int threads, std::int64_t Lq, std::int64_t size, std::int64_t topk, bool reference) {
  constexpr std::int64_t H = 8, D = 64;
  mem::knn_memory memory(1, H, D, D, size);
  tensor<float, 4> k({1, H, size, D}), v({1, H, size, D}), q({1, H, Lq, D}), out({1, H, Lq, D});
  tensor<float, 3> lse({1, H, Lq});
  fill_random(k, 31);
  fill_random(v, 32);
  fill_random(q, 33);
  memory.add(k, v);
  const mem::knn_options opt{.threads = threads};
  for (auto _ : state) {
    if (reference) mem::reference::knn_attention(q, memory, topk, out, lse, opt);
    else mem::knn_attention(q, memory, topk, out, lse, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * static_cast<double>(H * Lq) * static_cast<double>(size * D + topk * 2 * D);
  set_token_counters(state, static_cast<double>(Lq), flops,
                     "H=8 D=64 Lq=" + std::to_string(Lq) + " size=" + std::to_string(size) + " topk=" +
                         std::to_string(topk) + " threads=" + std::to_string(threads));
}

// The write of the kNN memory: knn_memory::add of L pairs per head (H = 8, D = Dv = 64) into a
// full ring of `size` slots. bytes/s: the keys and values copied in.
void knn_add_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t size) {
  constexpr std::int64_t H = 8, D = 64;
  mem::knn_memory memory(1, H, D, D, size);
  tensor<float, 4> k({1, H, L, D}), v({1, H, L, D});
  fill_random(k, 34);
  fill_random(v, 35);
  while (memory.size() < size) memory.add(k, v);
  for (auto _ : state) {
    memory.add(k, v);
    benchmark::ClobberMemory();
  }
  set_token_counters(state, static_cast<double>(L), 0,
                     "H=8 D=64 L=" + std::to_string(L) + " size=" + std::to_string(size) + " threads=" +
                         std::to_string(threads));
  state.counters["bytes/s"] =
      benchmark::Counter(2.0 * static_cast<double>(H * L * D) * sizeof(float), benchmark::Counter::kIsIterationInvariantRate);
}

// ---- ARMT: the write of M memory tokens (vbar and the update: 2 F Dv each) and the read of L
// tokens (F Dv each), F = 6 Dk (DPFP, nu = 3).
void armt_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t M, std::int64_t Dk, bool reference) {
  constexpr std::int64_t H = 4, Dv = 64;
  tensor<float, 4> k({1, H, M, Dk}), v({1, H, M, Dv}), q({1, H, L, Dk}), out({1, H, L, Dv});
  tensor<float, 3> beta({1, H, M});
  fill_random(k, 41);
  fill_random(v, 42);
  fill_random(q, 43);
  fill_random(beta, 44, 0.1f, 0.9f);
  mem::associative_memory am(1, H, Dk, Dv);
  const mem::armt_options opt{.threads = threads};
  mem::armt_update(k, v, beta, am, opt);  // a non-empty memory, so the delta rule's correction runs
  for (auto _ : state) {
    if (reference) {
      mem::reference::armt_update(k, v, beta, am, opt);
      mem::reference::armt_read(q, am, out, opt);
    } else {
      mem::armt_update(k, v, beta, am, opt);
      mem::armt_read(q, am, out, opt);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double F = 6.0 * static_cast<double>(Dk);
  set_token_counters(state, static_cast<double>(L + M), 2.0 * H * F * Dv * static_cast<double>(2 * M + L),
                     "H=4 L=" + std::to_string(L) + " M=" + std::to_string(M) + " Dk=" + std::to_string(Dk) +
                         " Dv=64 threads=" + std::to_string(threads));
}

// The two halves of ARMT alone: the write of M memory tokens (2 F Dv each) or the read of L
// tokens (F Dv each), H = 4, F = 6 Dk, Dv = 64.
void armt_part_row(benchmark::State& state, int threads, std::int64_t L, std::int64_t M, std::int64_t Dk, bool update) {
  constexpr std::int64_t H = 4, Dv = 64;
  tensor<float, 4> k({1, H, M, Dk}), v({1, H, M, Dv}), q({1, H, L, Dk}), out({1, H, L, Dv});
  tensor<float, 3> beta({1, H, M});
  fill_random(k, 41);
  fill_random(v, 42);
  fill_random(q, 43);
  fill_random(beta, 44, 0.1f, 0.9f);
  mem::associative_memory am(1, H, Dk, Dv);
  const mem::armt_options opt{.threads = threads};
  mem::armt_update(k, v, beta, am, opt);
  for (auto _ : state) {
    if (update) mem::armt_update(k, v, beta, am, opt);
    else mem::armt_read(q, am, out, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double F = 6.0 * static_cast<double>(Dk);
  const std::int64_t tokens = update ? M : L;
  set_token_counters(state, static_cast<double>(tokens), 2.0 * H * F * Dv * static_cast<double>((update ? 2 : 1) * tokens),
                     "H=4 L=" + std::to_string(L) + " M=" + std::to_string(M) + " Dk=" + std::to_string(Dk) +
                         " Dv=64 threads=" + std::to_string(threads));
}

const bool registered = [] {
  const bool full = full_size();
  for (const char* impl : {"fast", "reference"}) {
    const bool ref = std::string(impl) == "reference";
    {  // Titans: the reference is a per-token double loop, registered at the small shape only.
      const std::int64_t L = full ? 8192 : 256, D = full ? 256 : 64, Hd = 2 * D;
      for (std::int64_t chunk : {1, 16, 64}) {
        if (ref && (full || chunk == 64)) continue;
        if (full && chunk == 16) continue;
        add_row(impl, "titans",
                {{"L", std::to_string(L)}, {"D", std::to_string(D)}, {"Hd", std::to_string(Hd)}, {"chunk", std::to_string(chunk)}},
                [=](benchmark::State& st, int t) { titans_row(st, t, L, D, Hd, chunk, ref); });
      }
      if (!ref)
        add_row(impl, "titans_read", {{"L", std::to_string(L)}, {"D", std::to_string(D)}, {"Hd", std::to_string(Hd)}},
                [=](benchmark::State& st, int t) { titans_read_row(st, t, L, D, Hd); });
    }
    {  // PKM: the reference (double, full sorts) at the small shape only.
      const std::int64_t N = full ? 4096 : 256, n_keys = full ? 512 : 256, dim = full ? 512 : 256;
      auto in = std::make_shared<pkm_shape>(N, 4, dim, n_keys, dim, 32);
      const std::initializer_list<std::pair<std::string_view, std::string>> keys = {
          {"N", std::to_string(N)}, {"heads", "4"}, {"n_keys", std::to_string(n_keys)}, {"knn", "32"}};
      if (!(ref && full)) {
        add_row(impl, "pkm", keys, [=](benchmark::State& st, int t) { pkm_row(st, t, in->get(), ref); });
        add_row(impl, "pkm_backward", keys, [=](benchmark::State& st, int t) { pkm_backward_row(st, t, in->get(), ref); });
      }
      if (!ref) {
        add_row(impl, "pkm_search", keys, [=](benchmark::State& st, int t) { pkm_search_row(st, t, in->get()); });
        add_row(impl, "pkm_score", keys, [=](benchmark::State& st, int t) { pkm_score_row(st, t, in->get()); });
        add_row(impl, "pkm_gather", keys, [=](benchmark::State& st, int t) { pkm_gather_row(st, t, in->get()); });
      }
    }
    {
      const std::int64_t L = full ? 4096 : 1024, D = full ? 128 : 64, S = 256;
      add_row(impl, "infini", {{"L", std::to_string(L)}, {"D", std::to_string(D)}, {"S", std::to_string(S)}},
              [=](benchmark::State& st, int t) { infini_row(st, t, L, D, S, ref); });
      if (!ref)
        for (bool update : {false, true})
          add_row(impl, update ? "infini_update" : "infini_retrieve", {{"L", std::to_string(S)}, {"D", std::to_string(D)}},
                  [=](benchmark::State& st, int t) { infini_part_row(st, t, S, D, update); });
    }
    {
      const std::int64_t Lq = 256, size = full ? 65536 : 8192;
      add_row(impl, "knn", {{"Lq", std::to_string(Lq)}, {"size", std::to_string(size)}, {"topk", "32"}},
              [=](benchmark::State& st, int t) { knn_row(st, t, Lq, size, 32, ref); });
      if (!ref)
        add_row(impl, "knn_add", {{"L", std::to_string(Lq)}, {"size", std::to_string(size)}},
                [=](benchmark::State& st, int t) { knn_add_row(st, t, Lq, size); });
    }
    {
      const std::int64_t L = full ? 2048 : 512, M = 16, Dk = 64;
      const std::initializer_list<std::pair<std::string_view, std::string>> keys = {
          {"L", std::to_string(L)}, {"M", std::to_string(M)}, {"Dk", std::to_string(Dk)}};
      add_row(impl, "armt", keys, [=](benchmark::State& st, int t) { armt_row(st, t, L, M, Dk, ref); });
      if (!ref)
        for (bool update : {false, true})
          add_row(impl, update ? "armt_update" : "armt_read", keys,
                  [=](benchmark::State& st, int t) { armt_part_row(st, t, L, M, Dk, update); });
    }
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
