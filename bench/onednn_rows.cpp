// bench/onednn_rows.cpp — external peer: GEMM-softmax-GEMM from oneDNN primitives (Debian's
// libdnnl-dev, oneDNN 2.6, the C++ API of /usr/include/oneapi/dnnl/dnnl.hpp).
//
//   prefill/onednn/L:../D:../causal:../threads:..   the standard prefill shapes
//   decode/onednn/Lk:../kv:f32/threads:..           the standard decode shapes
//
// What a oneDNN user writes for attention without a fused kernel, blocked over query rows exactly
// like the OpenBLAS baseline (bench/baselines.hpp, same block of 256 query rows summed over a GQA
// group), so the two rows differ only in whose GEMMs and softmax run. Per (batch, kv head, block):
//
//   S = scale * Q_blk K^T   dnnl::matmul with an output-scale attribute, batched over the G query
//                           heads of the kv head: Q_blk [G, n, D] read in place through its
//                           strides, K^T [1, D, kend] (K read through a transposed ("ba") stride
//                           pair) broadcast over the batch, only the kend keys the block can see.
//                           Decode (n = 1) folds the G heads into G rows of one [1, G, D] matrix,
//                           so K is read once per kv head, as the OpenBLAS baseline does.
//   S_ij = -inf             where the causal mask hides key j from row i (our loop)
//   P = softmax(S)          dnnl::softmax_forward along the key axis, in place
//   O_blk = P V             dnnl::matmul, written straight into out through its strides
//
// The primitives are created once per problem (outside the timed loop), one set per block
// geometry (rows per head n, visible keys kend) the problem has. oneDNN's softmax normalises, so
// no lse is produced (the OpenBLAS baseline's lse is O(Lq) logs: nothing next to the GEMMs).
//
// Threads, as in the OpenBLAS baseline: the (batch, kv head, block) items are spread over
// mnemo::parallel_for_dynamic with `threads` threads, and every primitive runs on ONE thread (it
// is created while OpenMP's thread count is 1, and runs inside the parallel region, where this
// libdnnl, built on the same GNU OpenMP runtime (libgomp), runs serially), so "threads: t" means t
// cores in every row. The alternative, one oneDNN team of t threads per primitive with the items
// in turn, pays an OpenMP fork and barrier per primitive (3 per item, 8 to 32 items per call at
// the standard shapes): on the shared 2-core Xeon this was written on (load average about 10),
// 3.0 s against 78 ms for prefill L = 1024, D = 64 at 2 threads, and 746 ms against 36 ms for
// decode Lk = 4096, as every barrier waits for a descheduled thread. Primitives are shared
// between threads: safe because each thread passes its own scratchpad (scratchpad_mode::user;
// Debian's libdnnl is built without DNNL_ENABLE_CONCURRENT_EXEC, so a library-owned scratchpad
// would be shared), its own score buffer and its own stream.
//
// Pitfall that kept this peer off for a while: dnnl::primitive_attr is a reference-counted handle,
// so `primitive_attr scaled = plain; scaled.set_output_scales(...)` also scales `plain` (they are
// one C object), and the P V matmul then multiplied the output by 1 / sqrt(D). Each attribute
// below is built on its own.
//
// Before any row runs, the peer is checked against attention::reference (causal, GQA, Lq != Lk,
// rows with no visible key, decode, several blocks, 1 and 2 threads); a disagreement stops the
// binary with a message. Built only when CMake finds libdnnl (bench/CMakeLists.txt); otherwise
// these rows are absent.
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "baselines.hpp"
#include "common.hpp"
#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::bench {
namespace {

using dims = ::dnnl::memory::dims;
using dt = ::dnnl::memory::data_type;
constexpr float minus_inf = -std::numeric_limits<float>::infinity();

// OpenMP's thread count (what oneDNN plans and runs a primitive with outside a parallel region)
// is `n` while this lives; the previous count comes back after.
class omp_threads {
 public:
#if defined(_OPENMP)
  explicit omp_threads(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~omp_threads() { omp_set_num_threads(saved_); }
#else
  explicit omp_threads(int) {}
#endif
  omp_threads(const omp_threads&) = delete;
  omp_threads& operator=(const omp_threads&) = delete;

 private:
  [[maybe_unused]] int saved_ = 1;
};

// The three primitives of one block geometry and the memory descriptors they run on.
struct block_primitives {
  ::dnnl::memory::desc q_md, k_md, s_md, v_md, o_md;  // matmul operands, [batch, rows, cols]
  ::dnnl::memory::desc p_md;                          // the scores as softmax sees them, [batch rows, kend]
  ::dnnl::memory::desc qk_scratch, pv_scratch;
  ::dnnl::matmul qk;
  ::dnnl::softmax_forward softmax;
  ::dnnl::matmul pv;
  std::string impl;  // the implementations oneDNN picked, e.g. "matmul brg:avx512_core, softmax jit:avx512_core"
};

// One thread's buffers and stream.
struct thread_state {
  ::dnnl::stream stream;
  tensor<float, 1> scores;      // [G n, kend], 64-byte aligned
  tensor<float, 1> scratchpad;  // the matmuls' scratchpads (floats only for the alignment)
};

// GEMM-softmax-GEMM over oneDNN primitives for one problem (shape, strides, mask).
class onednn_attention {
 public:
  onednn_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                   view<const float, 4> k,  // [B, Hkv, Lk, D]
                   view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                   view<float, 4> out,      // [B, Hq, Lq, Dv]
                   bool causal)
      : q_(q), k_(k), v_(v), out_(out), causal_(causal),
        d_(attention::detail::check_args("onednn_attention", q, k, v, out, view<float, 3>{}, attention::mods::none{},
                                         attention::options{})) {
    baselines::detail::require_row_strides("onednn_attention", k, v);
    qb_ = std::max<std::int64_t>(1, baselines::openblas_block_rows / d_.group());
    blocks_ = (d_.Lq + qb_ - 1) / qb_;
    // Single-threaded primitives: planned while OpenMP's count is 1 (see the note at the top).
    const omp_threads one_thread(1);
    std::size_t scratch_bytes = 0;
    for (std::int64_t blk = 0; blk < blocks_; ++blk) {
      const auto [n, kend] = geometry(blk);
      if (kend == 0 || primitives_.count({n, kend})) continue;
      const block_primitives& p = primitives_.emplace(std::pair{n, kend}, make(n, kend)).first->second;
      scratch_bytes = std::max({scratch_bytes, p.qk_scratch.get_size(), p.pv_scratch.get_size()});
    }
    scratch_floats_ = static_cast<std::int64_t>((scratch_bytes + sizeof(float) - 1) / sizeof(float));
  }

  // One attention call over `threads` threads (0 = OpenMP's default).
  void operator()(int threads) {
    const int t = resolve_threads(threads);
    while (static_cast<int>(states_.size()) < std::max(t, thread_index() + 1)) {
      states_.push_back({::dnnl::stream(engine_), tensor<float, 1>({d_.group() * std::min(qb_, d_.Lq) * d_.Lk}),
                         tensor<float, 1>({std::max<std::int64_t>(scratch_floats_, 1)})});
    }
    // With t = 1 parallel_for runs outside any parallel region, where oneDNN would start a team
    // of OpenMP's default size: one thread, as at creation.
    const omp_threads one_thread(1);
    parallel_for_dynamic(
        d_.B * d_.Hkv * blocks_, [&](std::int64_t item) { run_block(item, states_[thread_index()]); }, t);
  }

  // The implementations oneDNN picked (e.g. "brg:avx512_core"), for the JSON context.
  std::string implementations() const {
    return primitives_.empty() ? std::string() : primitives_.begin()->second.impl;
  }

 private:
  // Rows per head and visible keys of block `blk`.
  std::pair<std::int64_t, std::int64_t> geometry(std::int64_t blk) const {
    const std::int64_t i0 = blk * qb_, n = std::min(qb_, d_.Lq - i0);
    return {n, visible_keys(i0 + n - 1)};
  }
  // Keys query row i sees under the bottom-right causal mask (all Lk without it).
  std::int64_t visible_keys(std::int64_t i) const {
    return causal_ ? baselines::detail::causal_visible_keys(i, d_.offset(), d_.Lk) : d_.Lk;
  }

  // The primitives of a block with n rows per head and kend visible keys: a batch of G heads of
  // n rows, or with one row per head (decode) one matrix of G rows.
  block_primitives make(std::int64_t n, std::int64_t kend) const {
    const std::int64_t G = d_.group();
    const bool fold = n == 1;
    const std::int64_t batch = fold ? 1 : G, rows = fold ? G : n;
    const std::int64_t q_row = fold ? q_.stride(1) : q_.stride(2), o_row = fold ? out_.stride(1) : out_.stride(2);
    block_primitives p;
    p.q_md = {{batch, rows, d_.D}, dt::f32, dims{q_.stride(1), q_row, 1}};
    p.k_md = {{1, d_.D, kend}, dt::f32, dims{k_.stride(1), 1, k_.stride(2)}};  // K^T
    p.s_md = {{batch, rows, kend}, dt::f32, dims{rows * kend, kend, 1}};
    p.p_md = {{batch * rows, kend}, dt::f32, dims{kend, 1}};
    p.v_md = {{1, kend, d_.Dv}, dt::f32, dims{v_.stride(1), v_.stride(2), 1}};
    p.o_md = {{batch, rows, d_.Dv}, dt::f32, dims{out_.stride(1), o_row, 1}};

    // Two separate attributes (a copy of a primitive_attr would share the output scale).
    ::dnnl::primitive_attr qk_attr, pv_attr;
    qk_attr.set_scratchpad_mode(::dnnl::scratchpad_mode::user);
    qk_attr.set_output_scales(0, {d_.scale});
    pv_attr.set_scratchpad_mode(::dnnl::scratchpad_mode::user);
    const ::dnnl::matmul::primitive_desc qk_pd(::dnnl::matmul::desc(p.q_md, p.k_md, p.s_md), qk_attr, engine_);
    const ::dnnl::matmul::primitive_desc pv_pd(::dnnl::matmul::desc(p.s_md, p.v_md, p.o_md), pv_attr, engine_);
    // oneDNN 2.6's softmax takes no attribute, so no user scratchpad: it must need none (a
    // library-owned one would be shared between the threads).
    constexpr int key_axis = 1;
    const ::dnnl::softmax_forward::primitive_desc softmax_pd(
        ::dnnl::softmax_forward::desc(::dnnl::prop_kind::forward_inference, p.p_md, key_axis), engine_);
    mnemo::detail::require(softmax_pd.scratchpad_desc().get_size() == 0,
                           "onednn_attention: oneDNN's softmax must need no scratchpad, it asks for ",
                           softmax_pd.scratchpad_desc().get_size(), " bytes");
    p.qk = ::dnnl::matmul(qk_pd);
    p.softmax = ::dnnl::softmax_forward(softmax_pd);
    p.pv = ::dnnl::matmul(pv_pd);
    p.qk_scratch = qk_pd.scratchpad_desc();
    p.pv_scratch = pv_pd.scratchpad_desc();
    p.impl = std::string("matmul ") + qk_pd.impl_info_str() + ", softmax " + softmax_pd.impl_info_str();
    return p;
  }

  void run_block(std::int64_t item, thread_state& ts) {
    const std::int64_t b = item / (d_.Hkv * blocks_), hk = (item / blocks_) % d_.Hkv, blk = item % blocks_;
    const std::int64_t G = d_.group(), i0 = blk * qb_;
    const auto [n, kend] = geometry(blk);
    if (kend == 0) {  // no row of the block sees a key: out = 0
      zero_rows(b, hk, i0, n);
      return;
    }
    const block_primitives& p = primitives_.at({n, kend});
    float* s = ts.scores.data();

    // The memory objects wrap the caller's buffers (no copies).
    const ::dnnl::memory q_mem(p.q_md, engine_, const_cast<float*>(q_.ptr(b, hk * G, i0)));
    const ::dnnl::memory k_mem(p.k_md, engine_, const_cast<float*>(k_.ptr(b, hk)));
    const ::dnnl::memory v_mem(p.v_md, engine_, const_cast<float*>(v_.ptr(b, hk)));
    const ::dnnl::memory s_mem(p.s_md, engine_, s);
    const ::dnnl::memory p_mem(p.p_md, engine_, s);
    const ::dnnl::memory o_mem(p.o_md, engine_, out_.ptr(b, hk * G, i0));
    const ::dnnl::memory qk_pad(p.qk_scratch, engine_, ts.scratchpad.data());
    const ::dnnl::memory pv_pad(p.pv_scratch, engine_, ts.scratchpad.data());

    p.qk.execute(ts.stream, {{DNNL_ARG_SRC, q_mem}, {DNNL_ARG_WEIGHTS, k_mem}, {DNNL_ARG_DST, s_mem},
                             {DNNL_ARG_SCRATCHPAD, qk_pad}});
    // Causal mask inside the block (score row g n + r is head g, query i0 + r); a row that sees
    // no key gets finite scores here (a softmax over -inf only would be NaN) and out = 0 below.
    std::int64_t blind_rows = 0;  // the block's first rows that see no key
    if (causal_) {
      for (std::int64_t g = 0; g < G; ++g)
        for (std::int64_t r = 0; r < n; ++r) {
          const std::int64_t seen = visible_keys(i0 + r);
          float* row = s + (g * n + r) * kend;
          std::fill(row + seen, row + kend, seen == 0 ? 0.0f : minus_inf);
        }
      while (blind_rows < n && visible_keys(i0 + blind_rows) == 0) ++blind_rows;
    }
    p.softmax.execute(ts.stream, {{DNNL_ARG_SRC, p_mem}, {DNNL_ARG_DST, p_mem}});
    p.pv.execute(ts.stream, {{DNNL_ARG_SRC, s_mem}, {DNNL_ARG_WEIGHTS, v_mem}, {DNNL_ARG_DST, o_mem},
                             {DNNL_ARG_SCRATCHPAD, pv_pad}});
    ts.stream.wait();
    zero_rows(b, hk, i0, blind_rows);
  }

  // out = 0 on the first `rows` rows of the block at query i0, for every head of kv head hk.
  void zero_rows(std::int64_t b, std::int64_t hk, std::int64_t i0, std::int64_t rows) {
    for (std::int64_t g = 0; g < d_.group(); ++g)
      for (std::int64_t r = 0; r < rows; ++r) {
        float* row = out_.ptr(b, hk * d_.group() + g, i0 + r);
        std::fill(row, row + d_.Dv, 0.0f);
      }
  }

  view<const float, 4> q_, k_, v_;
  view<float, 4> out_;
  bool causal_;
  attention::dims d_;
  std::int64_t qb_ = 1, blocks_ = 0, scratch_floats_ = 0;
  ::dnnl::engine engine_{::dnnl::engine::kind::cpu, 0};
  std::map<std::pair<std::int64_t, std::int64_t>, block_primitives> primitives_;  // by (n, kend)
  std::vector<thread_state> states_;  // one per thread
};

void onednn_row(benchmark::State& state, const shape& s, int threads) {
  attention_inputs<float> in(s);
  onednn_attention attend(in.q, in.k, in.v, in.out, s.causal);
  attend(threads);  // the per-thread buffers and streams come into being outside the timed loop
  for (auto _ : state) {
    attend(threads);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_attention_counters(state, s, threads);
}

// Worst |got - want| / (atol + rtol |want|) over out (the peer gives no lse); NaN is infinitely wrong.
double worst_out_error(const tensor<float, 4>& got, const tensor<float, 4>& want) {
  constexpr double atol = 1e-5, rtol = 1e-4;
  double worst = 0;
  for (std::int64_t i = 0; i < want.size(); ++i) {
    const double err =
        std::abs(static_cast<double>(got.data()[i]) - want.data()[i]) / (atol + rtol * std::abs(want.data()[i]));
    worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : std::max(worst, err);
  }
  return worst;
}

// Checks the peer against attention::reference; returns the implementations oneDNN picked.
std::string self_check() {
  const std::vector<shape> shapes = {
      {2, 4, 2, 37, 53, 40, 24, false},     // GQA 2, Lq != Lk, awkward sizes
      {2, 4, 2, 37, 53, 40, 24, true},      // causal, bottom-right aligned
      {1, 8, 1, 70, 20, 64, 64, true},      // MQA; Lq > Lk: the first 50 rows see no key
      {1, 32, 8, 1, 300, 128, 128, false},  // decode, GQA 4 (heads folded into rows)
      {1, 32, 8, 1, 300, 128, 128, true},   // decode under the causal mask: sees every key
      {1, 2, 2, 300, 300, 96, 96, true},    // several blocks per head, causal
      {1, 2, 2, 300, 300, 96, 96, false},   // several blocks per head, last one shorter
  };
  std::string impls;
  for (const shape& s : shapes) {
    attention_inputs<float> want(s, 7);
    if (s.causal) attention::reference(cview(want.q), want.k, want.v, want.out, want.lse, attention::mods::causal{});
    else attention::reference(cview(want.q), want.k, want.v, want.out, want.lse);
    for (int t : {1, 2}) {
      attention_inputs<float> got(s, 7);
      onednn_attention attend(got.q, got.k, got.v, got.out, s.causal);
      // Twice: a second call must not depend on what the first left in the buffers.
      for (int call = 0; call < 2; ++call) {
        std::fill(got.out.data(), got.out.data() + got.out.size(), std::numeric_limits<float>::quiet_NaN());
        attend(t);
        const double err = worst_out_error(got.out, want.out);
        if (!(err <= 1.0)) {
          std::fprintf(stderr,
                       "mnemo_bench: self-check failed: peer 'onednn' disagrees with attention::reference on %s "
                       "threads=%d call=%d (worst error %.3g x tolerance). No figures are reported for a wrong "
                       "peer.\n",
                       s.label().c_str(), t, call, err);
          std::exit(1);
        }
      }
      if (impls.empty()) impls = attend.implementations();
    }
  }
  return impls;
}

const bool registered = [] {
  const std::string impls = self_check();
  const ::dnnl::version_t* version = ::dnnl::version();
  benchmark::AddCustomContext("onednn_version", std::to_string(version->major) + "." + std::to_string(version->minor) +
                                                    "." + std::to_string(version->patch));
  benchmark::AddCustomContext("onednn_impl", impls);
  register_prefill("onednn", onednn_row);
  register_decode("onednn", "f32", onednn_row);
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
