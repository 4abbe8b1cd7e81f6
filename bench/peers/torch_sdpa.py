"""External peer: PyTorch's CPU scaled_dot_product_attention at mnemo_bench's shapes.

Run through bench/peers/torch_sdpa.sh (it makes the virtual environment with torch); by hand:

  python bench/peers/torch_sdpa.py --size small --threads 1,2 --out results/x/torch_sdpa.json

Writes Google-Benchmark-shaped JSON that bench/plot merges into the same tables and charts as
mnemo_bench's rows (context "mnemo_peer": "torch_sdpa", so the plot marks it external):

  prefill/torch_sdpa/L:<L>/D:<D>/causal:<0|1>/threads:<t>/real_time   H = 8, as prefill_shapes()
  decode/torch_sdpa/Lk:<Lk>/kv:f32/threads:<t>/real_time              Hq = 32, Hkv = 8 (enable_gqa),
                                                                      D = 128, Lq = 1, as decode_shapes()

Shapes, thread counts and counters follow bench/common.hpp and bench/README.md: FLOP/s counts
2 (D + Dv) per visible (query, key) pair and query head (causal: Lq (Lq + 1) / 2 pairs for
Lq = Lk), bytes/s counts q and out once in f32 and k and v once. Inputs are f32, uniform in
[-1, 1]. torch's is_causal is top-left aligned; every shape here has Lq = Lk or Lq = 1 without a
mask, where that is the same as mnemo's bottom-right mask.

Timing: torch.inference_mode(), torch.set_num_threads(t) for the row, wall clock; every row runs
`--repetitions` repetitions of at least `--min-time` seconds, all rows' repetitions shuffled
together (as mnemo_bench's --benchmark_enable_random_interleaving), after one warm-up call.
Each repetition is an "iteration" entry; the median and cv aggregates follow, as Google
Benchmark writes them. The label names the SDPA backend torch picked (flash = its fused CPU
flash-attention kernel, math = the unfused composite).
"""

import argparse
import datetime
import json
import os
import platform
import random
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# Same size switch as bench/common.hpp (prefill_shapes(), decode_shapes()).
PREFILL_LENGTHS = {"small": (256, 1024), "full": (1024, 4096), "tiny": (64,)}
DECODE_LENGTHS = {"small": (4096,), "full": (4096, 32768), "tiny": (512,)}
PREFILL_HEADS = 8
DECODE_HQ, DECODE_HKV, DECODE_D = 32, 8, 128

# SDPBackend indices returned by torch._fused_sdp_choice (torch/nn/attention/__init__.py).
BACKEND_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


class Problem:
    """One SDPA call: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]."""

    def __init__(self, name_keys, family, Hq, Hkv, Lq, Lk, D, causal):
        self.family, self.name_keys = family, name_keys
        self.Hq, self.Hkv, self.Lq, self.Lk, self.D, self.causal = Hq, Hkv, Lq, Lk, D, causal

    def visible_pairs(self):
        if not self.causal:
            return self.Lq * self.Lk
        return sum(max(0, min(i + self.Lk - self.Lq + 1, self.Lk)) for i in range(self.Lq))

    def flops(self):
        return 2.0 * (2 * self.D) * self.Hq * self.visible_pairs()

    def bytes(self):
        return 4.0 * (self.Hq * self.Lq * 2 * self.D + self.Hkv * self.Lk * 2 * self.D)

    def name(self, threads):
        return f"{self.family}/torch_sdpa/{self.name_keys}/threads:{threads}/real_time"

    def label(self, threads, backend):
        return (f"B=1 Hq={self.Hq} Hkv={self.Hkv} Lq={self.Lq} Lk={self.Lk} D={self.D} Dv={self.D} "
                f"causal={int(self.causal)} kv=f32 threads={threads} backend={backend}")


def problems(size):
    out = []
    for L in PREFILL_LENGTHS[size]:
        for D in (64, 128):
            for causal in (False, True):
                out.append(Problem(f"L:{L}/D:{D}/causal:{int(causal)}", "prefill",
                                   PREFILL_HEADS, PREFILL_HEADS, L, L, D, causal))
    for Lk in DECODE_LENGTHS[size]:
        out.append(Problem(f"Lk:{Lk}/kv:f32", "decode", DECODE_HQ, DECODE_HKV, 1, Lk, DECODE_D, False))
    return out


class Row:
    def __init__(self, problem, threads, seed):
        self.problem, self.threads = problem, threads
        gen = torch.Generator().manual_seed(seed)
        p = problem

        def uniform(*shape):
            return torch.rand(*shape, generator=gen) * 2 - 1

        self.q = uniform(1, p.Hq, p.Lq, p.D)
        self.k = uniform(1, p.Hkv, p.Lk, p.D)
        self.v = uniform(1, p.Hkv, p.Lk, p.D)
        self.gqa = p.Hq != p.Hkv
        try:
            choice = torch._fused_sdp_choice(self.q, self.k, self.v, None, 0.0, p.causal, enable_gqa=self.gqa)
            self.backend = BACKEND_NAMES.get(int(choice), str(int(choice)))
        except (AttributeError, TypeError, RuntimeError):
            self.backend = "unknown"
        self.times = []  # seconds per iteration, one entry per repetition
        self.iterations = []

    def call(self):
        return F.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=self.problem.causal,
                                              enable_gqa=self.gqa)

    def repetition(self, min_time):
        torch.set_num_threads(self.threads)
        self.call()  # warm-up at this thread count
        n, elapsed = 0, 0.0
        start = time.perf_counter()
        while elapsed < min_time or n == 0:
            self.call()
            n += 1
            elapsed = time.perf_counter() - start
        self.times.append(elapsed / n)
        self.iterations.append(n)


def entry(row, run_type, seconds, iterations, repetition_index=None, aggregate=None):
    p = row.problem
    name = p.name(row.threads)
    e = {
        "name": name if aggregate is None else f"{name}_{aggregate}",
        "run_name": name,
        "run_type": run_type,
        "repetitions": len(row.times),
        "threads": 1,
        "iterations": iterations,
        "real_time": seconds * 1e3,
        "cpu_time": seconds * 1e3,
        "time_unit": "ms",
        "label": p.label(row.threads, row.backend),
    }
    if aggregate == "cv":  # Google Benchmark writes the cv as a fraction, unitless
        e["aggregate_name"], e["aggregate_unit"] = "cv", "percentage"
        e["real_time"] = e["cpu_time"] = seconds
        return e
    if aggregate is not None:
        e["aggregate_name"] = aggregate
    else:
        e["repetition_index"] = repetition_index
    e["FLOP/s"] = p.flops() / seconds
    e["bytes/s"] = p.bytes() / seconds
    return e


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(PREFILL_LENGTHS), default=os.environ.get("MNEMO_BENCH_SIZE") or "small")
    parser.add_argument("--threads", default=os.environ.get("MNEMO_BENCH_THREADS") or "1,2",
                        help="comma-separated thread counts (default: MNEMO_BENCH_THREADS or 1,2)")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per repetition (default 0.1)")
    parser.add_argument("--filter", default="", help="only rows whose name matches this regular expression (re.search)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t]
    if not threads or min(threads) < 1 or args.repetitions < 1:
        parser.error("--threads needs counts >= 1 and --repetitions >= 1")

    rows = [Row(p, t, args.seed) for p in problems(args.size) for t in threads]
    pattern = re.compile(args.filter)
    rows = [r for r in rows if pattern.search(r.problem.name(r.threads))]
    schedule = [r for r in rows for _ in range(args.repetitions)]
    random.Random(args.seed).shuffle(schedule)
    print(f"torch_sdpa: torch {torch.__version__}, {len(rows)} rows x {args.repetitions} repetitions "
          f"of >= {args.min_time} s, size {args.size}", flush=True)
    with torch.inference_mode():
        for r in schedule:
            r.repetition(args.min_time)

    benchmarks = []
    for family_index, r in enumerate(rows):
        entries = [entry(r, "iteration", t, n, i) for i, (t, n) in enumerate(zip(r.times, r.iterations))]
        median = statistics.median(r.times)
        mean = statistics.fmean(r.times)
        cv = statistics.pstdev(r.times) / mean if mean > 0 else 0.0
        entries.append(entry(r, "aggregate", median, len(r.times), aggregate="median"))
        entries.append(entry(r, "aggregate", cv, len(r.times), aggregate="cv"))
        for e in entries:
            e["family_index"], e["per_family_instance_index"] = family_index, 0
        benchmarks += entries
        print(f"{r.problem.name(r.threads):<60} {median * 1e3:10.3f} ms  {r.problem.flops() / median / 1e9:8.2f} GFLOP/s"
              f"  {r.problem.bytes() / median / 1e9:7.2f} GB/s  [{r.backend}]", flush=True)

    context = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_name": platform.node(),
        "executable": os.path.abspath(__file__),
        "num_cpus": os.cpu_count(),
        "mnemo_cpu": cpu_model(),
        "mnemo_isa": f"torch cpu capability {torch.backends.cpu.get_cpu_capability()}",
        "mnemo_size": args.size,
        "mnemo_peer": "torch_sdpa",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "library_build_type": "release",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"context": context, "benchmarks": benchmarks}, f, indent=1)
    print(f"torch_sdpa: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
