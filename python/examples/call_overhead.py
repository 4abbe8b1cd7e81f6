"""Call overhead of the Python bindings: one decode step at Lk = 4096 (DESIGN.md's decode shape,
Hq = 32, Hkv = 8, D = 128, f32 K/V, B = 1) timed from Python, against the kernel's own time measured
inside the binding around the C++ call (mnemo.last_kernel_ns(), GIL released).

  python python/examples/call_overhead.py [--lk 4096] [--calls 300] [--threads 1]

overhead = median over calls of (Python-side time - kernel time), divided by the median kernel time. The issue's target is
under 5 %. The Python-side time includes argument parsing, the zero-copy reads of q, k, v, the output
allocation (np.empty), the GIL release and the tuple returned.
"""
import argparse
import time

import numpy as np

import mnemo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lk", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    Hq, Hkv, D = 32, 8, 128
    q = rng.standard_normal((1, Hq, 1, D), dtype=np.float32)
    k = rng.standard_normal((1, Hkv, args.lk, D), dtype=np.float32).astype(args.dtype)
    v = rng.standard_normal((1, Hkv, args.lk, D), dtype=np.float32).astype(args.dtype)
    dec = mnemo.attention.decode
    for _ in range(20):
        dec(q, k, v, causal=True, threads=args.threads)
    py, kern = [], []
    for _ in range(args.calls):
        t0 = time.perf_counter_ns()
        dec(q, k, v, causal=True, threads=args.threads)
        py.append(time.perf_counter_ns() - t0)
        kern.append(mnemo.last_kernel_ns())
    diff = np.median(np.asarray(py) - np.asarray(kern))  # per call: robust to a slow call
    py, kern = np.median(py), np.median(kern)
    print(f"decode Lk={args.lk} Hq={Hq} Hkv={Hkv} D={D} {args.dtype} threads={args.threads} "
          f"build={mnemo.build_info()}")
    print(f"python-side {py / 1e3:.1f} us, kernel {kern / 1e3:.1f} us (medians); overhead per call "
          f"(median of python-side - kernel) {diff / 1e3:.1f} us = {100 * diff / kern:.2f} % of the kernel")


if __name__ == "__main__":
    main()
