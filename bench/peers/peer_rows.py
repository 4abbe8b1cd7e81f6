"""What every external peer in bench/peers shares: shapes, names, counters, timing and the JSON.

The Python side of bench/common.hpp, so a peer's rows parse, count and merge exactly like
mnemo_bench's in bench/plot (bench/README.md is the contract):

  prefill/<impl>/L:<L>/D:<D>/causal:<0|1>[/kv:<kv>]/threads:<t>/real_time   H = 8, prefill_shapes()
  decode/<impl>/Lk:<Lk>/kv:<kv>/threads:<t>/real_time                      Hq = 32, Hkv = 8, D = 128,
                                                                           Lq = 1, decode_shapes()

(kv: the storage of K and V; prefill names carry it only when it is not f32, as
bench/flash_rows.cpp's kv:f16 rows do.) FLOP/s counts 2 (D + Dv) per visible (query, key) pair
and query head (causal: Lq (Lq + 1) / 2 pairs for Lq = Lk); bytes/s counts q and out once in f32
and k and v once in their storage type.

Timing: every row runs `repetitions` repetitions of at least `min_time` seconds, all rows'
repetitions shuffled together (as mnemo_bench's --benchmark_enable_random_interleaving), each
after one warm-up call. Each repetition is an "iteration" entry of Google Benchmark's JSON; the
median and cv aggregates follow, as Google Benchmark writes them. The file's context has
"mnemo_peer": <peer>, which is how bench/plot knows the rows are external.
"""

import datetime
import json
import os
import platform
import random
import statistics
import time

# Same size switch as bench/common.hpp (prefill_shapes(), decode_shapes()).
PREFILL_LENGTHS = {"small": (256, 1024), "full": (1024, 4096), "tiny": (64,)}
DECODE_LENGTHS = {"small": (4096,), "full": (4096, 32768), "tiny": (512,)}
PREFILL_HEADS = 8
DECODE_HQ, DECODE_HKV, DECODE_D = 32, 8, 128
SIZES = sorted(PREFILL_LENGTHS)


class Problem:
    """One attention call: q [B = 1, Hq, Lq, D], k/v [1, Hkv, Lk, D], out [1, Hq, Lq, D]."""

    def __init__(self, family, Hq, Hkv, Lq, Lk, D, causal):
        self.family = family
        self.Hq, self.Hkv, self.Lq, self.Lk, self.D, self.causal = Hq, Hkv, Lq, Lk, D, causal

    def visible_pairs(self):
        if not self.causal:
            return self.Lq * self.Lk
        return sum(max(0, min(i + self.Lk - self.Lq + 1, self.Lk)) for i in range(self.Lq))

    def flops(self):
        return 2.0 * (2 * self.D) * self.Hq * self.visible_pairs()

    def bytes(self, kv_bytes_per_element=4.0):
        """q and out in f32, k and v in their storage (a quantised type's bytes include its scales)."""
        return 4.0 * self.Hq * self.Lq * 2 * self.D + kv_bytes_per_element * self.Hkv * self.Lk * 2 * self.D

    def name(self, impl, kv, threads):
        if self.family == "prefill":
            keys = f"L:{self.Lq}/D:{self.D}/causal:{int(self.causal)}" + (f"/kv:{kv}" if kv != "f32" else "")
        else:
            keys = f"Lk:{self.Lk}/kv:{kv}"
        return f"{self.family}/{impl}/{keys}/threads:{threads}/real_time"

    def label(self, kv, threads):
        return (f"B=1 Hq={self.Hq} Hkv={self.Hkv} Lq={self.Lq} Lk={self.Lk} D={self.D} Dv={self.D} "
                f"causal={int(self.causal)} kv={kv} threads={threads}")


def problems(size):
    """The prefill shapes (H = 8, D in {64, 128}, causal and not), then the decode shapes."""
    out = []
    for L in PREFILL_LENGTHS[size]:
        for D in (64, 128):
            for causal in (False, True):
                out.append(Problem("prefill", PREFILL_HEADS, PREFILL_HEADS, L, L, D, causal))
    for Lk in DECODE_LENGTHS[size]:
        out.append(Problem("decode", DECODE_HQ, DECODE_HKV, 1, Lk, DECODE_D, False))
    return out


def thread_counts(text):
    """'1,2' -> [1, 2]; ValueError unless every count is >= 1."""
    counts = [int(t) for t in text.split(",") if t.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"thread counts must be >= 1, got '{text}'")
    return counts


class Row:
    """One timed row: `call` makes one attention call at the row's thread count (`setup`, if
    given, runs before each repetition, e.g. to set the thread count); `times` (seconds per
    call) and `iterations` get one entry per repetition. `counters` are numbers bench/plot shows
    in its counters column."""

    def __init__(self, name, label, flops, bytes_, call, setup=None, note="", counters=None):
        self.name, self.label, self.flops, self.bytes = name, label, flops, bytes_
        self.call, self.setup, self.note = call, setup, note  # note: shown in the log line
        self.counters = counters or {}  # the row's own figures (e.g. rel_error), in every entry
        self.times, self.iterations = [], []

    def repetition(self, min_time):
        if self.setup is not None:
            self.setup()
        self.call()  # warm-up
        n, elapsed = 0, 0.0
        start = time.perf_counter()
        while elapsed < min_time or n == 0:
            self.call()
            n += 1
            elapsed = time.perf_counter() - start
        self.times.append(elapsed / n)
        self.iterations.append(n)


def run_interleaved(rows, repetitions, min_time, seed):
    """Every row's repetitions, shuffled together with a fixed seed."""
    schedule = [r for r in rows for _ in range(repetitions)]
    random.Random(seed).shuffle(schedule)
    for r in schedule:
        r.repetition(min_time)


def _entry(row, run_type, seconds, iterations, repetition_index=None, aggregate=None):
    e = {
        "name": row.name if aggregate is None else f"{row.name}_{aggregate}",
        "run_name": row.name,
        "run_type": run_type,
        "repetitions": len(row.times),
        "threads": 1,
        "iterations": iterations,
        "real_time": seconds * 1e3,
        "cpu_time": seconds * 1e3,
        "time_unit": "ms",
        "label": row.label,
    }
    if aggregate == "cv":  # Google Benchmark writes the cv as a fraction, unitless
        e["aggregate_name"], e["aggregate_unit"] = "cv", "percentage"
        e["real_time"] = e["cpu_time"] = seconds
        return e
    if aggregate is not None:
        e["aggregate_name"] = aggregate
    else:
        e["repetition_index"] = repetition_index
    e["FLOP/s"] = row.flops / seconds
    e["bytes/s"] = row.bytes / seconds
    e.update(row.counters)
    return e


def benchmark_entries(rows, log=print):
    """Google Benchmark's "benchmarks" list for the timed rows (iterations, median, cv), in row
    order, and one line per row to `log`."""
    benchmarks = []
    for family_index, r in enumerate(rows):
        entries = [_entry(r, "iteration", t, n, i) for i, (t, n) in enumerate(zip(r.times, r.iterations))]
        median = statistics.median(r.times)
        mean = statistics.fmean(r.times)
        cv = statistics.pstdev(r.times) / mean if mean > 0 else 0.0
        entries.append(_entry(r, "aggregate", median, len(r.times), aggregate="median"))
        entries.append(_entry(r, "aggregate", cv, len(r.times), aggregate="cv"))
        for e in entries:
            e["family_index"], e["per_family_instance_index"] = family_index, 0
        benchmarks += entries
        log(f"{r.name:<60} {median * 1e3:10.3f} ms  {r.flops / median / 1e9:8.2f} GFLOP/s"
            f"  {r.bytes / median / 1e9:7.2f} GB/s" + (f"  [{r.note}]" if r.note else ""))
    return benchmarks


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path, peer, size, executable, rows, context, log=print):
    """The peer's Google-Benchmark-shaped JSON: the machine and run context (mnemo_cpu, mnemo_size,
    mnemo_peer = `peer`, then `context`: the peer's version keys and ISA) and the rows."""
    full_context = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_name": platform.node(),
        "executable": os.path.abspath(executable),
        "num_cpus": os.cpu_count(),
        "mnemo_cpu": cpu_model(),
        "mnemo_size": size,
        "mnemo_peer": peer,
        "python_version": platform.python_version(),
        "library_build_type": "release",
    }
    full_context.update(context)
    benchmarks = benchmark_entries(rows, log)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"context": full_context, "benchmarks": benchmarks}, f, indent=1)
    log(f"{peer}: wrote {path}")
