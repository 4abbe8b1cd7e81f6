// bench/memory_rows.cpp — memory-module rows (include/mnemo/memory/): every fast path next to its
// double-precision reference, at one shape per size.
//
//   memory/<impl>/module:titans/L:../D:../Hd:../chunk:../threads:..   neural_memory (update + read)
//   memory/<impl>/module:pkm/N:../heads:../n_keys:../knn:../threads:..  pkm_forward
//   memory/<impl>/module:pkm_backward/N:../.../threads:..             pkm_backward
//   memory/<impl>/module:infini/L:../D:../S:../threads:..             infini_attention (H = 8)
//   memory/<impl>/module:knn/Lq:../size:../topk:../threads:..         knn_attention (H = 8, D = 64)
//   memory/<impl>/module:armt/L:../M:../Dk:../threads:..              armt_update (M tokens) + armt_read (L tokens)
//
// impl is `fast` (the library's f32 path) or `reference` (double). Counters:
//   tokens/s  tokens (query rows for pkm and knn) processed per second: the figure to compare;
//   FLOP/s    the multiply-adds of the module's defining equations x 2, the same count for both
//             impls (so a FLOP/s ratio is a time ratio), listed per module below.
#include <cstdint>
#include <memory>
#include <string>

#include "common.hpp"
#include "mnemo/memory/compressive.hpp"
#include "mnemo/memory/knn.hpp"
#include "mnemo/memory/neural_memory.hpp"
#include "mnemo/memory/product_keys.hpp"
#include "mnemo/memory/recurrent_memory.hpp"

namespace mnemo::bench {
namespace {

namespace mem = mnemo::memory;

void set_token_counters(benchmark::State& state, double tokens, double flops, const std::string& label) {
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  set_rate_counters(state, flops, 0);
  state.SetLabel(label);
}

template <class Body>
void add_row(const std::string& impl, const std::string& module,
             std::initializer_list<std::pair<std::string_view, std::string>> keys, Body body) {
  for (int t : thread_counts()) {
    std::string name = row_name("memory", impl, {{"module", module}});
    for (const auto& [k, v] : keys) append_param(name, k, v);
    append_param(name, "threads", std::to_string(t));
    register_row(name, [body, t](benchmark::State& state) {
      if (threads_available(state, t)) body(state, t);
    });
  }
}

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
  double flops() const { return 2.0 * static_cast<double>(N * heads) * static_cast<double>(n_keys * k_dim + knn * v_dim); }
  std::string label(int threads) const {
    return "N=" + std::to_string(N) + " heads=" + std::to_string(heads) + " k_dim=" + std::to_string(k_dim) +
           " n_keys=" + std::to_string(n_keys) + " v_dim=" + std::to_string(v_dim) + " knn=" + std::to_string(knn) +
           " threads=" + std::to_string(threads);
  }
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

const bool registered = [] {
  const bool full = full_size();
  for (const char* impl : {"fast", "reference"}) {
    const bool ref = std::string(impl) == "reference";
    {  // Titans: the reference is a per-token double loop, registered at the small shape only.
      const std::int64_t L = full ? 1024 : 256, D = full ? 128 : 64, Hd = 2 * D;
      for (std::int64_t chunk : {1, 16}) {
        if (ref && full) continue;
        add_row(impl, "titans",
                {{"L", std::to_string(L)}, {"D", std::to_string(D)}, {"Hd", std::to_string(Hd)}, {"chunk", std::to_string(chunk)}},
                [=](benchmark::State& st, int t) { titans_row(st, t, L, D, Hd, chunk, ref); });
      }
    }
    {
      const std::int64_t N = full ? 1024 : 256, n_keys = full ? 512 : 256;
      auto in = std::make_shared<pkm_inputs>(N, 4, 256, n_keys, 256, 32);
      const std::initializer_list<std::pair<std::string_view, std::string>> keys = {
          {"N", std::to_string(N)}, {"heads", "4"}, {"n_keys", std::to_string(n_keys)}, {"knn", "32"}};
      add_row(impl, "pkm", keys, [=](benchmark::State& st, int t) { pkm_row(st, t, *in, ref); });
      add_row(impl, "pkm_backward", keys, [=](benchmark::State& st, int t) { pkm_backward_row(st, t, *in, ref); });
    }
    {
      const std::int64_t L = full ? 4096 : 1024, D = full ? 128 : 64, S = 256;
      add_row(impl, "infini", {{"L", std::to_string(L)}, {"D", std::to_string(D)}, {"S", std::to_string(S)}},
              [=](benchmark::State& st, int t) { infini_row(st, t, L, D, S, ref); });
    }
    {
      const std::int64_t Lq = 256, size = full ? 65536 : 8192;
      add_row(impl, "knn", {{"Lq", std::to_string(Lq)}, {"size", std::to_string(size)}, {"topk", "32"}},
              [=](benchmark::State& st, int t) { knn_row(st, t, Lq, size, 32, ref); });
    }
    {
      const std::int64_t L = full ? 2048 : 512, M = 16, Dk = 64;
      add_row(impl, "armt", {{"L", std::to_string(L)}, {"M", std::to_string(M)}, {"Dk", std::to_string(Dk)}},
              [=](benchmark::State& st, int t) { armt_row(st, t, L, M, Dk, ref); });
    }
  }
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
