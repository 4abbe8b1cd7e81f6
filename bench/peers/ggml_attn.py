"""External peer: ggml's CPU attention (the kernels llama.cpp runs) at mnemo_bench's shapes.

Run through bench/peers/ggml_attn.sh (it makes the virtual environment and builds ggml-python,
whose ctypes module `ggml` exposes ggml's C API); by hand:

  python bench/peers/ggml_attn.py --size small --threads 1,2 --out results/x/ggml_attn.json
  python bench/peers/ggml_attn.py --size full --check-only --out /dev/null   # only the reference checks

Two implementations, each one ggml graph computed by ggml_graph_compute on the CPU backend:

  ggml_flash    ggml_flash_attn_ext(q, k, v, mask, scale): llama.cpp's path with flash attention on
                (GGML_PREC_F32 set as llama.cpp sets it; ggml picks its tiled, one-chunk or split-KV
                kernel by shape and storage).
  ggml_matmul   the graph llama.cpp builds without flash attention: kq = mul_mat(k, q) (GGML_PREC_F32),
                soft_max_ext in place (llama.cpp's allocator runs it in place) with scale and mask,
                kqv = mul_mat(v^T, kq) with V stored transposed as llama.cpp's cache stores it then,
                and the permute + cont that merges the heads.

Rows (bench/peers/peer_rows.py builds names, counters and JSON exactly like torch_sdpa.py's):

  prefill/<impl>/L:<L>/D:<D>/causal:<0|1>[/kv:f16]/threads:<t>/real_time   H = 8, K/V f32 and f16
  decode/<impl>/Lk:<Lk>/kv:<kv>/threads:<t>/real_time                      Hq = 32, Hkv = 8, D = 128,
      kv f32, f16 (both impls), q8_0, q4_0 (ggml_flash only: llama.cpp needs flash attention for a
      quantised V cache)

q is f32 [1, H, L, D] (ggml's ne = [D, L, H, 1]), k and v are stored as kv says, the causal mask
is bottom-right (the same as top-left here: Lq = Lk) and is passed as llama.cpp passes it (f16
for flash, f32 for soft_max_ext; 0 or -inf); non-causal rows pass no mask. Inputs are uniform
in [-1, 1] (NumPy, fixed seed per shape), the same for every impl and storage of a shape.

Correctness: before anything is timed, every row computes once and its output is compared with a
NumPy float64 reference, softmax(q k^T * scale + mask) v, on the same rounded inputs (K and V as
stored: f16-rounded, or q8_0/q4_0 quantised by ggml_quantize_chunk and decoded here). The error is
||out - ref|| / ||ref|| over the whole output; a row above its storage's tolerance (TOLERANCE) is
not timed and not reported, and the run exits non-zero. A wrong layout or mask gives errors near 1.

Threads: each row's plan is ggml_graph_plan(graph, t) and the row checks that the plan holds t.
ggml is built with OpenMP (its default), so a compute runs `#pragma omp parallel num_threads(t)`;
OMP_DYNAMIC is forced off so OpenMP cannot hand out fewer, and after the check call of a t-thread
row the process must hold at least t threads.

Memory: inputs and outputs per graph; the [Lk, Lq, H] scores of the matmul graphs (512 MiB at
L = 4096) share one buffer, as the work buffers of all plans do (one graph runs at a time).
"""

import argparse
import ctypes
import os
import re
import sys

os.environ["OMP_DYNAMIC"] = "false"  # before libgomp is loaded by `import ggml`

import numpy as np  # noqa: E402
import ggml  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_rows  # noqa: E402  (bench/peers/peer_rows.py, beside this file)

KV_TYPES = {"f32": ggml.GGML_TYPE_F32, "f16": ggml.GGML_TYPE_F16,
            "q8_0": ggml.GGML_TYPE_Q8_0, "q4_0": ggml.GGML_TYPE_Q4_0}
PREFILL_KV = ("f32", "f16")
DECODE_KV = {"ggml_flash": ("f32", "f16", "q8_0", "q4_0"), "ggml_matmul": ("f32", "f16")}
IMPLS = ("ggml_flash", "ggml_matmul")

# Largest ||out - ref|| / ||ref|| accepted, per K/V storage. The reference reads the stored values,
# so what is left is ggml's own rounding. f32: none to speak of (measured <= 4e-6). f16: ggml's
# one-chunk and split-KV flash kernels (decode, and prefill shapes too small to tile) accumulate
# P V in f16, an error that grows with the keys one thread sums: measured 3.4e-3 at Lk = 512,
# 9.2e-3 at 4096, 2.6e-2 at 32768 (one thread); the matmul graph rounds q and P to f16: <= 5.3e-4.
# q8_0 / q4_0: q is rounded to q8_0 for the dot products: 1.3e-3. A wrong layout, head mapping or
# mask gives errors near 1; the scale, mask and layout code is the same for every storage, so the
# tight f32 tolerance is what catches a subtle mistake there.
TOLERANCE = {"f32": 1e-4, "f16": 1e-1, "q8_0": 2e-2, "q4_0": 2e-2}

ALIGNMENT = 64  # bytes, for the shared score and work buffers


class Arena:
    """One byte buffer shared by every graph (one graph computes at a time), grown on demand."""

    def __init__(self):
        self.buffer, self.address = None, 0

    def ensure(self, size):
        """At least `size` bytes; a new buffer moves `address` (plans are bound again before use)."""
        if self.buffer is None or self.buffer.size < size + ALIGNMENT:
            self.buffer = np.empty(size + ALIGNMENT, dtype=np.uint8)
            self.address = self.buffer.ctypes.data + (-self.buffer.ctypes.data) % ALIGNMENT


def quantise(values, kv):
    """(bytes of `values` stored as `kv` in ggml's layout, the values those bytes hold, float64)."""
    if kv == "f32":
        return values.tobytes(), values.astype(np.float64)
    if kv == "f16":
        rounded = values.astype(np.float16)
        return rounded.tobytes(), rounded.astype(np.float64)
    rows = values.reshape(-1, values.shape[-1])
    row_bytes = ggml.ggml_row_size(KV_TYPES[kv], rows.shape[1])
    out = np.empty(rows.shape[0] * row_bytes, dtype=np.uint8)
    src = np.ascontiguousarray(rows, dtype=np.float32)
    written = ggml.ggml_quantize_chunk(KV_TYPES[kv], src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                       out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    assert written == out.size, f"ggml_quantize_chunk wrote {written} bytes, expected {out.size}"
    return out.tobytes(), dequantise(out, kv).reshape(values.shape)


def dequantise(raw, kv):
    """ggml's q8_0 / q4_0 blocks of 32 values (f16 scale d, then the quants) decoded to float64:
    q8_0 x = d * q (int8); q4_0 x = d * (nibble - 8), low nibbles are values 0..15, high 16..31."""
    if kv == "q8_0":
        blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "i1", 32)]))
        return (blocks["d"].astype(np.float64)[:, None] * blocks["qs"]).reshape(-1)
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]))
    nibbles = np.concatenate([(blocks["qs"] & 0x0F).astype(np.int8) - 8, (blocks["qs"] >> 4).astype(np.int8) - 8], axis=1)
    return (blocks["d"].astype(np.float64)[:, None] * nibbles).reshape(-1)


def reference(p, q, k, v):
    """softmax(q k^T * scale + mask) v in float64, q [Hq, Lq, D], k/v [Hkv, Lk, D] -> [Hq, Lq, D];
    query head h reads kv head h / (Hq / Hkv); the causal mask is bottom-right aligned."""
    scale = 1.0 / np.sqrt(p.D)
    group = p.Hq // p.Hkv
    out = np.empty((p.Hq, p.Lq, p.D))
    visible = None
    if p.causal:
        visible = np.arange(p.Lk)[None, :] <= np.arange(p.Lq)[:, None] + (p.Lk - p.Lq)
    for h in range(p.Hq):
        s = (q[h].astype(np.float64) @ k[h // group].T) * scale
        if visible is not None:
            s = np.where(visible, s, -np.inf)
        s = np.exp(s - s.max(axis=1, keepdims=True))
        out[h] = (s @ v[h // group]) / s.sum(axis=1, keepdims=True)
    return out


class Graph:
    """One attention call of problem `p` as a ggml graph in its own context, inputs filled in."""

    def __init__(self, p, impl, kv, k_bytes, v_bytes, q, scores):
        self.p, self.impl, self.kv = p, impl, kv
        kv_type = KV_TYPES[kv]
        H, L, D = p.Hq, p.Lq, p.D
        kv_row = ggml.ggml_row_size(kv_type, D)
        mask_bytes = p.Lk * p.Lq * (2 if impl == "ggml_flash" else 4) if p.causal else 0
        data_bytes = 4 * D * L * H * 3 + 2 * kv_row * p.Lk * p.Hkv + ggml.ggml_row_size(kv_type, p.Lk) * D * p.Hkv \
            + mask_bytes
        params = ggml.ggml_init_params(mem_size=data_bytes + 32 * ggml.ggml_tensor_overhead()
                                       + ggml.ggml_graph_overhead() + (1 << 20), mem_buffer=None)
        self.ctx = ggml.ggml_init(params)
        if not self.ctx:
            raise MemoryError(f"ggml_init failed for {data_bytes} bytes")
        ctx = self.ctx
        self.q = ggml.ggml_new_tensor_4d(ctx, ggml.GGML_TYPE_F32, D, L, H, 1)
        self.k = ggml.ggml_new_tensor_4d(ctx, kv_type, D, p.Lk, p.Hkv, 1)
        fill(self.q, q.tobytes())
        fill(self.k, k_bytes)
        scale = 1.0 / float(np.sqrt(D))
        if impl == "ggml_flash":
            self.v = ggml.ggml_new_tensor_4d(ctx, kv_type, D, p.Lk, p.Hkv, 1)
            fill(self.v, v_bytes)
            mask = self.mask(ggml.GGML_TYPE_F16, np.float16) if p.causal else None
            out = ggml.ggml_flash_attn_ext(ctx, self.q, self.k, self.v, mask, scale, 0.0, 0.0)
            ggml.ggml_flash_attn_ext_set_prec(out, ggml.GGML_PREC_F32)
        else:
            self.v = ggml.ggml_new_tensor_4d(ctx, kv_type, p.Lk, D, p.Hkv, 1)  # V^T: [Lk, D, Hkv]
            fill(self.v, v_bytes)
            mask = self.mask(ggml.GGML_TYPE_F32, np.float32) if p.causal else None
            ggml.ggml_set_no_alloc(ctx, True)  # the scores live in the shared buffer
            kq = ggml.ggml_mul_mat(ctx, self.k, self.q)  # [Lk, Lq, Hq]
            ggml.ggml_set_no_alloc(ctx, False)
            kq.contents.data = scores.address
            ggml.ggml_mul_mat_set_prec(kq, ggml.GGML_PREC_F32)
            kq = ggml.ggml_soft_max_ext_inplace(ctx, kq, mask, scale, 0.0)
            kqv = ggml.ggml_mul_mat(ctx, self.v, kq)  # [D, Lq, Hq]
            out = ggml.ggml_cont_2d(ctx, ggml.ggml_permute(ctx, kqv, 0, 2, 1, 3), D * H, L)  # [D * Hq, Lq]
        self.out = out
        self.graph = ggml.ggml_new_graph(ctx)
        ggml.ggml_build_forward_expand(self.graph, out)
        self.plans = {}

    def mask(self, ggml_type, dtype):
        """[Lk, Lq] additive mask: 0 where key j is visible to query i (bottom-right), else -inf."""
        p = self.p
        visible = np.arange(p.Lk)[None, :] <= np.arange(p.Lq)[:, None] + (p.Lk - p.Lq)
        tensor = ggml.ggml_new_tensor_4d(self.ctx, ggml_type, p.Lk, p.Lq, 1, 1)
        fill(tensor, np.where(visible, 0.0, -np.inf).astype(dtype).tobytes())
        return tensor

    @staticmethod
    def scores_bytes(p, impl):
        return 4 * p.Lk * p.Lq * p.Hq if impl == "ggml_matmul" else 0

    def plan(self, threads, work):
        """The compute plan at `threads` threads, its work buffer in `work`."""
        plan = ggml.ggml_graph_plan(self.graph, threads, None)
        if plan.n_threads != threads:
            raise RuntimeError(f"ggml_graph_plan holds {plan.n_threads} threads, asked for {threads}")
        work.ensure(plan.work_size)
        self.plans[threads] = plan
        self.bind(work)

    def bind(self, work):
        for plan in self.plans.values():
            plan.work_data = ctypes.cast(work.address, ctypes.POINTER(ctypes.c_uint8))

    def compute(self, threads):
        status = ggml.ggml_graph_compute(self.graph, ctypes.byref(self.plans[threads]))
        if status != ggml.GGML_STATUS_SUCCESS:
            raise RuntimeError(f"ggml_graph_compute returned {status}")

    def output(self):
        """The result as [Hq, Lq, D] (flash writes [D, Hq, Lq], the matmul graph [D * Hq, Lq])."""
        p = self.p
        n = p.D * p.Hq * p.Lq
        flat = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.out.contents.data))
        return flat.reshape(p.Lq, p.Hq, p.D).transpose(1, 0, 2)

    def bytes_per_kv_element(self):
        return ggml.ggml_row_size(KV_TYPES[self.kv], 32 * self.p.D) / (32.0 * self.p.D)


def fill(tensor, data):
    size = ggml.ggml_nbytes(tensor)
    if size != len(data):
        raise ValueError(f"tensor holds {size} bytes, the data {len(data)}")
    ctypes.memmove(tensor.contents.data, data, size)


def process_threads():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=peer_rows.SIZES, default=os.environ.get("MNEMO_BENCH_SIZE") or "small")
    parser.add_argument("--threads", default=os.environ.get("MNEMO_BENCH_THREADS") or "1,2",
                        help="comma-separated thread counts (default: MNEMO_BENCH_THREADS or 1,2)")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per repetition (default 0.1)")
    parser.add_argument("--filter", default="", help="only rows whose name matches this regular expression (re.search)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check-only", action="store_true",
                        help="compare every row with the reference and stop: nothing is timed or written")
    args = parser.parse_args(argv)
    try:
        threads = peer_rows.thread_counts(args.threads)
    except ValueError as e:
        parser.error(str(e))
    if args.repetitions < 1:
        parser.error("--repetitions must be >= 1")
    limit = os.environ.get("OMP_THREAD_LIMIT")
    if limit and limit.isdigit() and int(limit) < max(threads):
        parser.error(f"OMP_THREAD_LIMIT={limit} is below the largest thread count {max(threads)}")

    version = ggml.ggml_version().decode()
    print(f"ggml_attn: ggml {version} (ggml-python {ggml.__version__}), size {args.size}, threads {threads}", flush=True)
    pattern = re.compile(args.filter)
    plan = []  # (problem index, problem, [(impl, kv, threads)])
    for index, p in enumerate(peer_rows.problems(args.size)):
        wanted = [(impl, kv, t) for impl in IMPLS for kv in (PREFILL_KV if p.family == "prefill" else DECODE_KV[impl])
                  for t in threads if pattern.search(p.name(impl, kv, t))]
        if wanted:
            plan.append((index, p, wanted))
    scores, work = Arena(), Arena()
    scores.ensure(max([Graph.scores_bytes(p, impl) for _, p, wanted in plan for impl, _, _ in wanted], default=0))
    graphs, rows, failures = [], [], []
    for index, p, wanted in plan:
        rng = np.random.default_rng([args.seed, index])
        q = rng.uniform(-1, 1, (p.Hq, p.Lq, p.D)).astype(np.float32)
        k = rng.uniform(-1, 1, (p.Hkv, p.Lk, p.D)).astype(np.float32)
        v = rng.uniform(-1, 1, (p.Hkv, p.Lk, p.D)).astype(np.float32)
        for kv in dict.fromkeys(kv for _, kv, _ in wanted):
            k_bytes, k_stored = quantise(k, kv)
            v_bytes, v_stored = quantise(v, kv)
            ref = reference(p, q, k_stored, v_stored)
            for impl in dict.fromkeys(i for i, x, _ in wanted if x == kv):
                v_input = v_bytes
                if impl == "ggml_matmul":  # V^T, as llama.cpp's cache holds V without flash attention
                    v_input = quantise(np.ascontiguousarray(v.transpose(0, 2, 1)), kv)[0]
                graph = Graph(p, impl, kv, k_bytes, v_input, q, scores)
                graphs.append(graph)
                for t in [t for i, x, t in wanted if i == impl and x == kv]:
                    name = p.name(impl, kv, t)
                    graph.plan(t, work)
                    graph.compute(t)
                    held = process_threads()
                    if held is not None and held < t:
                        raise RuntimeError(f"{name}: the process holds {held} threads after a {t}-thread compute")
                    error = float(np.linalg.norm(graph.output() - ref) / np.linalg.norm(ref))
                    ok = np.isfinite(error) and error <= TOLERANCE[kv]
                    print(f"  check {name:<62} ||out - ref|| / ||ref|| = {error:.2e} "
                          f"({'ok' if ok else 'WRONG'}, tolerance {TOLERANCE[kv]:.0e})", flush=True)
                    if not ok:
                        failures.append(name)
                        continue
                    rows.append(peer_rows.Row(name, p.label(kv, t), p.flops(), p.bytes(graph.bytes_per_kv_element()),
                                              lambda graph=graph, t=t: graph.compute(t), counters={"rel_error": error}))
    for graph in graphs:  # the work buffer may have grown since a graph's plans were bound
        graph.bind(work)
    if args.check_only:
        print(f"ggml_attn: {len(rows)} rows match the reference, {len(failures)} do not", flush=True)
        return 1 if failures else 0
    print(f"ggml_attn: {len(rows)} rows checked against the float64 reference; timing {args.repetitions} "
          f"repetitions of >= {args.min_time} s each", flush=True)
    peer_rows.run_interleaved(rows, args.repetitions, args.min_time, args.seed)
    peer_rows.write_json(args.out, "ggml_attn", args.size, __file__, rows, {
        "mnemo_isa": "ggml cpu " + " ".join(name for name, has in (
            ("avx512", ggml.ggml_cpu_has_avx512()), ("avx2", ggml.ggml_cpu_has_avx2()), ("f16c", ggml.ggml_cpu_has_f16c()),
            ("fma", ggml.ggml_cpu_has_fma())) if has),
        "ggml_version": version,
        "ggml_python_version": ggml.__version__,
    }, log=lambda line: print(line, flush=True))
    if failures:
        print(f"ggml_attn: {len(failures)} rows gave a wrong result and were left out: {', '.join(failures)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
