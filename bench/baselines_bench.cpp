// bench/baselines_bench.cpp — the baseline rows, and the machine rows that turn any figure into
// a fraction of what this machine can do.
//
//   prefill/{reference,eigen,openblas}/L:../D:../causal:../threads:..   standard prefill shapes
//   decode/{reference,eigen,openblas}/Lk:../kv:f32/threads:..            standard decode shapes
//   machine/sgemm/N:2048/threads:..         cblas_sgemm C = A B, N x N x N: the GEMM peak (FLOP/s)
//   machine/stream_read/MiB:../threads:..   sum of a large float array: the read bandwidth (bytes/s)
//
// The reference runs only where reference_affordable() says so (it is double precision, one row
// at a time, by design). Before any row runs, both baselines are checked against
// attention::reference on small shapes (causal, GQA, Lq != Lk, rows with no visible key); a
// disagreement stops the binary with a message, so no figure is ever reported for a wrong baseline.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "baselines.hpp"
#include "common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"

namespace mnemo::bench {
namespace {

// ---------------------------------------------------------------------------------------------
// Attention rows.

template <class Run>
void attention_row(benchmark::State& state, const shape& s, int threads, Run&& run) {
  attention_inputs<float> in(s);
  for (auto _ : state) {
    run(in, threads);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_attention_counters(state, s, threads);
}

void reference_row(benchmark::State& state, const shape& s, int threads) {
  attention_row(state, s, threads, [&](attention_inputs<float>& in, int t) {
    const attention::options opt{0, t};
    if (s.causal) attention::reference(cview(in.q), in.k, in.v, in.out, in.lse, attention::mods::causal{}, opt);
    else attention::reference(cview(in.q), in.k, in.v, in.out, in.lse, attention::mods::none{}, opt);
  });
}

void eigen_row(benchmark::State& state, const shape& s, int threads) {
  attention_row(state, s, threads, [&](attention_inputs<float>& in, int t) {
    baselines::eigen_attention(in.q, in.k, in.v, in.out, in.lse, s.causal, {0, t});
  });
}

void openblas_row(benchmark::State& state, const shape& s, int threads) {
  attention_row(state, s, threads, [&](attention_inputs<float>& in, int t) {
    baselines::openblas_attention(in.q, in.k, in.v, in.out, in.lse, s.causal, {0, t});
  });
}

// ---------------------------------------------------------------------------------------------
// Machine rows.

// sgemm at the size where OpenBLAS is near its peak on one or two cores.
constexpr std::int64_t sgemm_n = 2048;

void sgemm_row(benchmark::State& state, int threads) {
  const std::int64_t n = sgemm_n;
  tensor<float, 2> a({n, n}), b({n, n}), c({n, n});
  fill_random(a, 11);
  fill_random(b, 12);
  const baselines::detail::openblas_threads gemm_threads(threads);
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(n), static_cast<int>(n),
                static_cast<int>(n), 1.0f, a.data(), static_cast<int>(n), b.data(), static_cast<int>(n), 0.0f,
                c.data(), static_cast<int>(n));
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  set_rate_counters(state, flops, 0);
  state.SetLabel(std::string("N=").append(std::to_string(n)).append(" threads=").append(std::to_string(threads)));
}

// Read bandwidth: far larger than any cache (L3 here is 480 MiB shared with other guests, so
// the full size is 1 GiB; the small one, 256 MiB, is mostly past it too).
constexpr std::int64_t mib = std::int64_t{1} << 20;
std::int64_t stream_mib() { return full_size() ? 1024 : 256; }

// Floats summed per step into independent accumulators: 128 = eight AVX-512 or sixteen AVX2
// registers, enough independent adds to hide the add latency, so memory is the only limit.
constexpr std::int64_t stream_lanes = 128;

// Sum of p[0, n) with stream_lanes independent partial sums (the compiler turns the lane loop
// into vector adds for whatever ISA the build targets; no reassociation of one long sum needed).
float sum_floats(const float* p, std::int64_t n) {
  float acc[stream_lanes] = {};
  std::int64_t i = 0;
  for (; i + stream_lanes <= n; i += stream_lanes)
    for (std::int64_t l = 0; l < stream_lanes; ++l) acc[l] += p[i + l];
  for (; i < n; ++i) acc[0] += p[i];
  float total = 0;
  for (float a : acc) total += a;
  return total;
}

// One array shared by the stream rows, allocated and written once (writing 1 GiB at every
// setup would cost more than the row).
const tensor<float, 1>& stream_array() {
  static const tensor<float, 1> array = [] {
    tensor<float, 1> t({stream_mib() * mib / static_cast<std::int64_t>(sizeof(float))});
    constexpr std::int64_t pattern = 7;
    float* p = t.data();
    const std::int64_t n = t.size();
    parallel_for(n / mib + 1, [&](std::int64_t chunk) {
      const std::int64_t end = std::min(n, (chunk + 1) * mib);
      for (std::int64_t i = chunk * mib; i < end; ++i) p[i] = static_cast<float>(i % pattern);
    });
    return t;
  }();
  return array;
}

void stream_row(benchmark::State& state, int threads) {
  const tensor<float, 1>& array = stream_array();
  const std::int64_t n = array.size();
  const int t = resolve_threads(threads);
  std::vector<float> partial(static_cast<std::size_t>(t));
  for (auto _ : state) {
    parallel_for(
        t,
        [&](std::int64_t part) {
          const std::int64_t begin = n * part / t, end = n * (part + 1) / t;
          partial[static_cast<std::size_t>(part)] = sum_floats(array.data() + begin, end - begin);
        },
        t);
    float total = 0;
    for (float s : partial) total += s;
    benchmark::DoNotOptimize(total);
  }
  set_rate_counters(state, 0, static_cast<double>(array.bytes()));
  state.SetLabel(
      std::string("MiB=").append(std::to_string(stream_mib())).append(" threads=").append(std::to_string(threads)));
}

// ---------------------------------------------------------------------------------------------
// Self-check: both baselines against attention::reference, before anything is measured.

using attention_fn = void (*)(const attention_inputs<float>&, attention_inputs<float>&, bool, int);

// Worst |got - want| / (atol + rtol |want|) over out and lse; an infinity (lse = -inf for a row
// with no visible key) must match exactly, and a NaN anywhere counts as infinitely wrong.
double worst_error(const attention_inputs<float>& got, const attention_inputs<float>& want) {
  constexpr double atol = 1e-5, rtol = 1e-4;
  constexpr double infinitely_wrong = std::numeric_limits<double>::infinity();
  double worst = 0;
  auto compare = [&](const float* g, const float* w, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) {
      double err = 0;
      if (std::isinf(w[i]) || std::isinf(g[i])) err = g[i] == w[i] ? 0 : infinitely_wrong;
      else err = std::abs(static_cast<double>(g[i]) - w[i]) / (atol + rtol * std::abs(w[i]));
      worst = std::isnan(err) ? infinitely_wrong : std::max(worst, err);
    }
  };
  compare(got.out.data(), want.out.data(), want.out.size());
  compare(got.lse.data(), want.lse.data(), want.lse.size());
  return worst;
}

void self_check(const char* name, attention_fn run) {
  const std::vector<shape> shapes = {
      {2, 4, 2, 37, 53, 40, 24, false},   // GQA 2, Lq != Lk, awkward sizes
      {2, 4, 2, 37, 53, 40, 24, true},    // causal, bottom-right aligned
      {1, 8, 1, 70, 20, 64, 64, true},    // MQA; Lq > Lk: the first 50 rows see no key
      {1, 32, 8, 1, 300, 128, 128, false},  // decode, GQA 4
      {1, 2, 2, 150, 150, 96, 96, true},  // several blocks per head
  };
  for (const shape& s : shapes) {
    attention_inputs<float> want(s, 7);
    if (s.causal) attention::reference(cview(want.q), want.k, want.v, want.out, want.lse, attention::mods::causal{});
    else attention::reference(cview(want.q), want.k, want.v, want.out, want.lse);
    for (int t : {1, 2}) {
      attention_inputs<float> got(s, 7);
      run(got, got, s.causal, t);
      const double err = worst_error(got, want);
      if (!(err <= 1.0)) {
        std::fprintf(stderr,
                     "mnemo_bench: self-check failed: baseline '%s' disagrees with attention::reference on %s "
                     "threads=%d (worst error %.3g x tolerance). No figures are reported for a wrong baseline.\n",
                     name, s.label().c_str(), t, err);
        std::exit(1);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Registration (at static initialisation, before benchmark_main's main runs).

const bool registered = [] {
  self_check("eigen", [](const attention_inputs<float>& in, attention_inputs<float>& out, bool causal, int t) {
    baselines::eigen_attention(in.q, in.k, in.v, out.out, out.lse, causal, {0, t});
  });
  self_check("openblas", [](const attention_inputs<float>& in, attention_inputs<float>& out, bool causal, int t) {
    baselines::openblas_attention(in.q, in.k, in.v, out.out, out.lse, causal, {0, t});
    // Tiny blocks too: many blocks per head, several heads per block.
    attention_inputs<float> small_blocks = out;
    baselines::openblas_attention(in.q, in.k, in.v, small_blocks.out, small_blocks.lse, causal, {0, t}, 3);
    if (worst_error(small_blocks, out) > 1.0) {
      std::fprintf(stderr, "mnemo_bench: self-check failed: openblas_attention depends on its block size\n");
      std::exit(1);
    }
  });

  benchmark::AddCustomContext("mnemo_cpu", cpu_model());
  benchmark::AddCustomContext("mnemo_isa", isa_name());
  benchmark::AddCustomContext("mnemo_size", size_name());
  benchmark::AddCustomContext("mnemo_openmp", resolve_threads(2) >= 2 ? "on" : "off");
  benchmark::AddCustomContext("openblas_config", openblas_get_config());

  register_prefill("reference", reference_row, reference_affordable);
  register_prefill("eigen", eigen_row);
  register_prefill("openblas", openblas_row);
  register_decode("reference", "f32", reference_row, reference_affordable);
  register_decode("eigen", "f32", eigen_row);
  register_decode("openblas", "f32", openblas_row);

  for (int t : thread_counts())
    register_row(row_name("machine", "sgemm", {{"N", std::to_string(sgemm_n)}, {"threads", std::to_string(t)}}),
                 [t](benchmark::State& state) { sgemm_row(state, t); });
  for (int t : thread_counts())
    register_row(row_name("machine", "stream_read", {{"MiB", std::to_string(stream_mib())}, {"threads", std::to_string(t)}}),
                 [t](benchmark::State& state) {
                   if (threads_available(state, t)) stream_row(state, t);
                 });
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
