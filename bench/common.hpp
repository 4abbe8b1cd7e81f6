// bench/common.hpp — what every benchmark row shares: shapes, inputs, counters, names, sizes.
//
// Every row of mnemo_bench goes through these helpers, so rows from different files count the
// same way and parse the same way (bench/README.md is the contract for names and counters):
//
//   name      <family>/<impl>/<key>:<value>/.../threads:<t>      e.g. prefill/flash/L:1024/D:128/causal:1/threads:2
//             (Google Benchmark appends /real_time: rows are timed on the wall clock)
//   label     the full shape: "B=1 Hq=8 Hkv=8 Lq=1024 Lk=1024 D=128 Dv=128 causal=1 kv=f32 threads=2"
//   FLOP/s    2 * (D + Dv) * B * Hq * visible_pairs per iteration (4 * Lq * Lk * D * B * Hq when
//             Dv = D and nothing is masked); causal counts only the visible (query, key) pairs,
//             Lq * (Lq + 1) / 2 for Lq = Lk, i.e. the usual "half" to within 1 / L
//   bytes/s   compulsory traffic per iteration: q and out once in f32, k and v once in their
//             storage type (what a kernel cannot avoid reading or writing)
//
// Sizes: MNEMO_BENCH_SIZE=small (default: the whole binary in 2 to 3 minutes with
// scripts/bench.sh's flags, see apply_small_budget) or full (the standard shapes of DESIGN.md);
// tiny (the harness smoke test, tests/bench/: prefill L = 64 and decode Lk = 512; families
// without tiny shapes use their small ones). Thread counts:
// MNEMO_BENCH_THREADS, default "1,2".
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/random.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/dispatch.hpp"

namespace mnemo::bench {

// ---------------------------------------------------------------------------------------------
// Size switch and thread counts (read once from the environment).

enum class size_mode { small, full, tiny };

namespace detail {

[[noreturn]] inline void bad_environment(const char* var, const char* value, const char* expected) {
  std::fprintf(stderr, "mnemo_bench: %s must be %s, got '%s'\n", var, expected, value);
  std::exit(2);
}

}  // namespace detail

// MNEMO_BENCH_SIZE: "small" (default), "full" or "tiny".
inline size_mode bench_size() {
  static const size_mode mode = [] {
    const char* env = std::getenv("MNEMO_BENCH_SIZE");
    if (env == nullptr || *env == '\0' || std::string_view(env) == "small") return size_mode::small;
    if (std::string_view(env) == "full") return size_mode::full;
    if (std::string_view(env) == "tiny") return size_mode::tiny;
    detail::bad_environment("MNEMO_BENCH_SIZE", env, "'small', 'full' or 'tiny'");
  }();
  return mode;
}

inline bool full_size() { return bench_size() == size_mode::full; }
inline bool tiny_size() { return bench_size() == size_mode::tiny; }
inline const char* size_name() { return full_size() ? "full" : tiny_size() ? "tiny" : "small"; }

// Prefill length and decode cache length of the tiny size (seconds of a whole smoke run).
inline constexpr std::int64_t tiny_prefill_L = 64, tiny_decode_Lk = 512;

// MNEMO_BENCH_THREADS: comma-separated thread counts, default "1,2".
inline const std::vector<int>& thread_counts() {
  static const std::vector<int> counts = [] {
    const char* env = std::getenv("MNEMO_BENCH_THREADS");
    if (env == nullptr || *env == '\0') return std::vector<int>{1, 2};
    std::vector<int> out;
    std::stringstream ss(env);
    std::string item;
    while (std::getline(ss, item, ',')) {
      char* end = nullptr;
      const long t = std::strtol(item.c_str(), &end, 10);
      if (item.empty() || *end != '\0' || t < 1 || t > 1024)
        detail::bad_environment("MNEMO_BENCH_THREADS", env, "a comma-separated list of thread counts >= 1");
      out.push_back(static_cast<int>(t));
    }
    return out;
  }();
  return counts;
}

// ---------------------------------------------------------------------------------------------
// Shapes.

// One attention problem: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv].
struct shape {
  std::int64_t B = 1, Hq = 8, Hkv = 8, Lq = 1024, Lk = 1024, D = 128, Dv = 128;
  bool causal = false;

  // (query, key) pairs that take part: all of them, or under the bottom-right causal mask
  // (query i sees key j iff j <= i + Lk - Lq) only the visible ones.
  double visible_pairs() const {
    if (!causal) return static_cast<double>(Lq) * static_cast<double>(Lk);
    double pairs = 0;
    for (std::int64_t i = 0; i < Lq; ++i) pairs += static_cast<double>(std::clamp<std::int64_t>(i + Lk - Lq + 1, 0, Lk));
    return pairs;
  }
  // q.k (2 D per pair) and p.v (2 Dv per pair), per query head.
  double flops() const { return 2.0 * static_cast<double>(D + Dv) * static_cast<double>(B * Hq) * visible_pairs(); }
  // Compulsory traffic: q and out in f32, k and v in their storage type.
  double bytes(std::size_t kv_bytes) const {
    const double qo = static_cast<double>(B * Hq * Lq * (D + Dv)) * sizeof(float);
    const double kv = static_cast<double>(B * Hkv * Lk * (D + Dv)) * static_cast<double>(kv_bytes);
    return qo + kv;
  }
  std::string label() const {
    std::ostringstream os;
    os << "B=" << B << " Hq=" << Hq << " Hkv=" << Hkv << " Lq=" << Lq << " Lk=" << Lk << " D=" << D << " Dv=" << Dv
       << " causal=" << (causal ? 1 : 0);
    return os.str();
  }
};

inline shape prefill_shape(std::int64_t L, std::int64_t D, bool causal, std::int64_t H = 8) {
  return {1, H, H, L, L, D, D, causal};
}
inline shape decode_shape(std::int64_t Lk, std::int64_t Hq = 32, std::int64_t Hkv = 8, std::int64_t D = 128) {
  return {1, Hq, Hkv, 1, Lk, D, D, false};
}

// Standard prefill shapes (DESIGN.md): H = 8, L in {1024, 4096}, D in {64, 128}, causal and not.
// Small: L in {256, 1024}; 256 is where the double-precision reference still runs in a blink.
inline std::vector<shape> prefill_shapes() {
  const std::vector<std::int64_t> Ls = full_size()   ? std::vector<std::int64_t>{1024, 4096}
                                       : tiny_size() ? std::vector<std::int64_t>{tiny_prefill_L}
                                                     : std::vector<std::int64_t>{256, 1024};
  std::vector<shape> out;
  for (std::int64_t L : Ls)
    for (std::int64_t D : {64, 128})
      for (bool causal : {false, true}) out.push_back(prefill_shape(L, D, causal));
  return out;
}

// Standard decode shapes (DESIGN.md): Hq = 32, Hkv = 8, D = 128, Lq = 1, Lk in {4096, 32768}.
// Small: Lk = 4096 only.
inline std::vector<shape> decode_shapes() {
  const std::vector<std::int64_t> Lks = full_size()   ? std::vector<std::int64_t>{4096, 32768}
                                        : tiny_size() ? std::vector<std::int64_t>{tiny_decode_Lk}
                                                      : std::vector<std::int64_t>{4096};
  std::vector<shape> out;
  for (std::int64_t Lk : Lks) out.push_back(decode_shape(Lk));
  return out;
}

// The double-precision reference runs one row at a time by design; rows are registered for it
// only up to this much work (multiply-adds, B * Hq * visible_pairs * (D + Dv)). Small: prefill
// L = 256 and decode Lk = 4096 (at most 70 ms an iteration on the 2-core Xeon this was sized on);
// full: up to prefill L = 1024 (about 1 s an iteration there) and decode Lk = 32768.
inline bool reference_affordable(const shape& s) {
  constexpr double small_budget = 1 << 28, full_budget = 1u << 31;
  const double work = static_cast<double>(s.B * s.Hq) * s.visible_pairs() * static_cast<double>(s.D + s.Dv);
  return work <= (full_size() ? full_budget : small_budget);
}

// ---------------------------------------------------------------------------------------------
// Deterministic inputs.

// Element n of the stream `seed`: uniform in [lo, hi] (splitmix64 of the index, so the values do
// not depend on fill order).
inline float random_uniform(std::uint64_t seed, std::uint64_t n, float lo = -1.0f, float hi = 1.0f) {
  const double u = rng::to_unit(rng::mix((seed + n) * rng::golden_gamma));  // [0, 1)
  return lo + static_cast<float>(u) * (hi - lo);
}

// Fills a contiguous tensor with uniform values in [lo, hi], rounded to its element type.
template <class T, int R>
void fill_random(tensor<T, R>& t, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  T* p = t.data();
  const std::int64_t n = t.size();
  for (std::int64_t i = 0; i < n; ++i) p[i] = T(random_uniform(seed, static_cast<std::uint64_t>(i), lo, hi));
}

// Storage-type name used in row names and labels.
template <class T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, f16>) return "f16";
  else if constexpr (std::is_same_v<T, bf16>) return "bf16";
  else static_assert(sizeof(T) == 0, "dtype_name: unknown element type");
}

// Inputs and outputs of one attention row, filled deterministically (q, k, v from `seed`).
template <class KV = float>
struct attention_inputs {
  tensor<float, 4> q;    // [B, Hq, Lq, D]
  tensor<KV, 4> k;       // [B, Hkv, Lk, D]
  tensor<KV, 4> v;       // [B, Hkv, Lk, Dv]
  tensor<float, 4> out;  // [B, Hq, Lq, Dv]
  tensor<float, 3> lse;  // [B, Hq, Lq]

  explicit attention_inputs(const shape& s, std::uint64_t seed = 1)
      : q({s.B, s.Hq, s.Lq, s.D}),
        k({s.B, s.Hkv, s.Lk, s.D}),
        v({s.B, s.Hkv, s.Lk, s.Dv}),
        out({s.B, s.Hq, s.Lq, s.Dv}),
        lse({s.B, s.Hq, s.Lq}) {
    fill_random(q, seed);
    fill_random(k, seed + 1);
    fill_random(v, seed + 2);
  }
};

// ---------------------------------------------------------------------------------------------
// Counters, labels, names.

// FLOP/s and bytes/s from per-iteration counts (either may be 0: that counter is left out).
inline void set_rate_counters(benchmark::State& state, double flops_per_iteration, double bytes_per_iteration) {
  if (flops_per_iteration > 0)
    state.counters["FLOP/s"] = benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
  if (bytes_per_iteration > 0)
    state.counters["bytes/s"] = benchmark::Counter(bytes_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
}

// The uniform counters and label of an attention row.
inline void set_attention_counters(benchmark::State& state, const shape& s, int threads,
                                   const char* kv = "f32", std::size_t kv_bytes = sizeof(float)) {
  set_rate_counters(state, s.flops(), s.bytes(kv_bytes));
  std::string label = s.label();
  label.append(" kv=").append(kv).append(" threads=").append(std::to_string(threads));
  state.SetLabel(label);
}

// Appends "/<key>:<value>" to a row name. (Appending piece by piece also keeps GCC 12 quiet: its
// -Wrestrict misfires on `"literal" + std::string&&`.)
inline void append_param(std::string& name, std::string_view key, std::string_view value) {
  name.append("/").append(key).append(":").append(value);
}

// "<family>/<impl>/<key>:<value>/..."; keys and values must not contain '/' or ':'.
inline std::string row_name(std::string_view family, std::string_view impl,
                            std::initializer_list<std::pair<std::string_view, std::string>> params) {
  std::string name(family);
  name.append("/").append(impl);
  for (const auto& [key, value] : params) append_param(name, key, value);
  return name;
}

// prefill/<impl>/L:<L>/D:<D>/causal:<0|1>/threads:<t> (Lq:/Lk: instead of L: when they differ,
// Dv: when it differs from D, Hq:/Hkv: when not the standard 8/8, B: when not 1).
inline std::string prefill_name(std::string_view impl, const shape& s, int threads) {
  std::string name = row_name("prefill", impl, {});
  auto add = [&](std::string_view key, std::int64_t value) { append_param(name, key, std::to_string(value)); };
  if (s.B != 1) add("B", s.B);
  if (s.Hq != 8 || s.Hkv != 8) {
    add("Hq", s.Hq);
    add("Hkv", s.Hkv);
  }
  if (s.Lq == s.Lk) add("L", s.Lq);
  else {
    add("Lq", s.Lq);
    add("Lk", s.Lk);
  }
  add("D", s.D);
  if (s.Dv != s.D) add("Dv", s.Dv);
  add("causal", s.causal ? 1 : 0);
  add("threads", threads);
  return name;
}

// decode/<impl>/Lk:<Lk>/kv:<f32|f16|bf16>/threads:<t> (the standard Hq = 32, Hkv = 8, D = 128,
// Lq = 1; keys are added where a shape differs from that).
inline std::string decode_name(std::string_view impl, const shape& s, std::string_view kv, int threads) {
  std::string name = row_name("decode", impl, {});
  auto add = [&](std::string_view key, std::int64_t value) { append_param(name, key, std::to_string(value)); };
  if (s.B != 1) add("B", s.B);
  if (s.Hq != 32 || s.Hkv != 8) {
    add("Hq", s.Hq);
    add("Hkv", s.Hkv);
  }
  if (s.Lq != 1) add("Lq", s.Lq);
  add("Lk", s.Lk);
  if (s.D != 128) add("D", s.D);
  if (s.Dv != s.D) add("Dv", s.Dv);
  append_param(name, "kv", kv);
  add("threads", threads);
  return name;
}

// ---------------------------------------------------------------------------------------------
// Registration.

// The small size's time budget (scripts/bench.sh with no flags: at most about 4 minutes of run on
// 2 cores, 3 repetitions of >= 0.03 s; measured 2 min 10 s for 580 rows, 2026-11-24). Two kinds of row are cut short there, by name, so that no
// rows file needs to know:
//   - the double-precision references (impl `reference`): one repetition. They are the slowest
//     rows by far (0.15 to 2.9 s an iteration at the small shapes, 2-core Xeon, 2026-11-24) and
//     their time is a curiosity next to the kernels', not a ratio anyone quotes.
//   - kvpolicy rows: a fixed count of iterations, one repetition. Their figures are quality
//     counters computed once per call; 215 rows whose every call recompresses a context spent 45 s
//     in Google Benchmark's iteration-count search alone at one repetition.
// Google Benchmark appends the setting to the name (".../threads:1/repeats:1",
// ".../iterations:64/repeats:1"); bench/plot drops those tokens. Other sizes are left alone.
inline constexpr int small_slow_repetitions = 1;
inline constexpr benchmark::IterationCount small_kvpolicy_iterations = 64;

namespace detail {

inline void apply_small_budget(benchmark::internal::Benchmark* row, std::string_view name) {
  if (bench_size() != size_mode::small) return;
  const std::size_t slash = name.find('/');
  const std::string_view family = name.substr(0, slash);
  const std::string_view rest = slash == std::string_view::npos ? std::string_view{} : name.substr(slash + 1);
  const std::string_view impl = rest.substr(0, rest.find('/'));
  if (family == "kvpolicy") row->Iterations(small_kvpolicy_iterations)->Repetitions(small_slow_repetitions);
  else if (impl == "reference") row->Repetitions(small_slow_repetitions);
}

}  // namespace detail

// Registers one row, timed on the wall clock (threaded kernels: the main thread's CPU time
// would say nothing), reported in milliseconds.
template <class Fn>
benchmark::internal::Benchmark* register_row(const std::string& name, Fn&& fn) {
  benchmark::internal::Benchmark* row = benchmark::RegisterBenchmark(name.c_str(), std::forward<Fn>(fn))
                                            ->UseRealTime()
                                            ->Unit(benchmark::kMillisecond);
  detail::apply_small_budget(row, name);
  return row;
}

// A row body for one shape at one thread count.
using shape_row = std::function<void(benchmark::State&, const shape&, int threads)>;

// Skips the row (with a message in the output) when this build cannot run `threads` threads.
inline bool threads_available(benchmark::State& state, int threads) {
  if (resolve_threads(threads) >= threads) return true;
  state.SkipWithError("this build has no OpenMP: only 1 thread");
  return false;
}

// One row per shape in `shapes` (those `keep` accepts) and per thread count, named by `name`.
template <class Name, class Keep>
void register_rows(const std::vector<shape>& shapes, Name&& name, const shape_row& body, Keep&& keep) {
  for (const shape& s : shapes) {
    if (!keep(s)) continue;
    for (int t : thread_counts())
      register_row(name(s, t), [s, t, body](benchmark::State& state) {
        if (threads_available(state, t)) body(state, s, t);
      });
  }
}

// prefill/<impl>/... rows over prefill_shapes() x thread_counts().
inline void register_prefill(std::string impl, const shape_row& body,
                             std::function<bool(const shape&)> keep = [](const shape&) { return true; }) {
  register_rows(prefill_shapes(), [&](const shape& s, int t) { return prefill_name(impl, s, t); }, body, keep);
}

// decode/<impl>/.../kv:<kv>/... rows over decode_shapes() x thread_counts().
inline void register_decode(std::string impl, std::string kv, const shape_row& body,
                            std::function<bool(const shape&)> keep = [](const shape&) { return true; }) {
  register_rows(decode_shapes(), [&](const shape& s, int t) { return decode_name(impl, s, kv, t); }, body, keep);
}

// ---------------------------------------------------------------------------------------------
// Machine description (goes into the JSON context, so plots can say what they ran on).

inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        std::string model = line.substr(colon + 1);
        model.erase(0, model.find_first_not_of(" \t"));
        return model;
      }
    }
  }
  return "unknown";
}

// The ISA level the dispatching kernels (flash, split-KV and cache decode) run at in this run,
// after MNEMO_ISA (simd/dispatch.hpp), and the one the binary was compiled for (MNEMO_ARCH), e.g.
// "avx2 (forced by MNEMO_ISA; compiled for avx512)". Kernels that do not dispatch yet run at the
// compiled level.
inline std::string isa_name() {
  std::string isa = simd::level_name(simd::active_level());
  if (simd::env_level() != simd::level::automatic) isa += " (forced by MNEMO_ISA)";
  isa += std::string("; compiled for ") + simd::level_name(simd::compiled_level);
#if defined(MNEMO_NO_SIMD)
  isa += " (MNEMO_NO_SIMD: scalar paths)";
#endif
  return isa;
}

}  // namespace mnemo::bench
