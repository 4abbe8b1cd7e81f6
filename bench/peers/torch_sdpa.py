"""External peer: PyTorch's CPU scaled_dot_product_attention at mnemo_bench's shapes.

Run through bench/peers/torch_sdpa.sh (it makes the virtual environment with torch); by hand:

  python bench/peers/torch_sdpa.py --size small --threads 1,2 --out results/x/torch_sdpa.json

Writes Google-Benchmark-shaped JSON that bench/plot merges into the same tables and charts as
mnemo_bench's rows (context "mnemo_peer": "torch_sdpa", so the plot marks it external):

  prefill/torch_sdpa/L:<L>/D:<D>/causal:<0|1>/threads:<t>/real_time   H = 8, as prefill_shapes()
  decode/torch_sdpa/Lk:<Lk>/kv:f32/threads:<t>/real_time              Hq = 32, Hkv = 8 (enable_gqa),
                                                                      D = 128, Lq = 1, as decode_shapes()

  serving/torch_sdpa_padded/B:16/tokens:<N>/kv:<f32|f16>/threads:<t>/real_time
      the batch of bench/serving_rows.cpp (16 decode steps over sequences of 512 to 32768 keys;
      small: 64 to 4096) as a user without a varlen kernel writes it: K/V padded to the longest
      sequence, [16, Hkv, Lmax, D], and a boolean mask hiding the padding. bytes/s counts the
      same compulsory traffic as mnemo's row (the real tokens), so the two rates compare times.

Shapes, names, counters, timing and the JSON are bench/peers/peer_rows.py's (the same as
bench/common.hpp's). Inputs are f32, uniform in [-1, 1]. torch's is_causal is top-left aligned;
every shape here has Lq = Lk or Lq = 1 without a mask, where that is the same as mnemo's
bottom-right mask.

Timing: torch.inference_mode(), torch.set_num_threads(t) before each repetition of a row, wall
clock. The label names the SDPA backend torch picked (flash = its fused CPU flash-attention
kernel, math = the unfused composite).
"""

import argparse
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_rows  # noqa: E402  (bench/peers/peer_rows.py, beside this file)

# SDPBackend indices returned by torch._fused_sdp_choice (torch/nn/attention/__init__.py).
BACKEND_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def make_row(p, threads, seed):
    """The row of problem `p` at `threads` threads: q [1, Hq, Lq, D], k/v [1, Hkv, Lk, D] in f32."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(*shape):
        return torch.rand(*shape, generator=gen) * 2 - 1

    q, k, v = uniform(1, p.Hq, p.Lq, p.D), uniform(1, p.Hkv, p.Lk, p.D), uniform(1, p.Hkv, p.Lk, p.D)
    gqa = p.Hq != p.Hkv
    try:
        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, p.causal, enable_gqa=gqa)
        backend = BACKEND_NAMES.get(int(choice), str(int(choice)))
    except (AttributeError, TypeError, RuntimeError):
        backend = "unknown"

    def call():
        return F.scaled_dot_product_attention(q, k, v, is_causal=p.causal, enable_gqa=gqa)

    return peer_rows.Row(p.name("torch_sdpa", "f32", threads), f"{p.label('f32', threads)} backend={backend}",
                         p.flops(), p.bytes(), call, setup=lambda: torch.set_num_threads(threads), note=backend)


_padded_inputs = {}


def serving_lengths(size):
    """The 16 sequence lengths of bench/serving_rows.cpp's paged_batch rows."""
    lo, hi = {"full": (512, 32768), "tiny": (16, 256)}.get(size, (64, 4096))
    return [int(round(lo * (hi / lo) ** (i / 15.0))) for i in range(16)]


def make_padded_row(size, kv, threads, seed):
    """One decode step of 16 sequences of different lengths, padded to the longest, with a mask."""
    Hq, Hkv, D = 32, 8, 128
    lengths = serving_lengths(size)
    lmax, tokens = max(lengths), sum(lengths)
    if (size, kv) not in _padded_inputs:  # shared by the thread counts (4.3 GB of K/V at f32, full size)
        dtype = torch.float16 if kv == "f16" else torch.float32
        gen = torch.Generator().manual_seed(seed)
        q = (torch.rand(16, Hq, 1, D, generator=gen) * 2 - 1).to(dtype)
        k = (torch.rand(16, Hkv, lmax, D, generator=gen) * 2 - 1).to(dtype)
        v = (torch.rand(16, Hkv, lmax, D, generator=gen) * 2 - 1).to(dtype)
        mask = torch.arange(lmax)[None, :] < torch.tensor(lengths)[:, None]  # [16, Lmax], True = attend
        _padded_inputs[(size, kv)] = (q, k, v, mask[:, None, None, :])
    q, k, v, mask = _padded_inputs[(size, kv)]

    def call():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    kv_bytes = 2 if kv == "f16" else 4
    bytes_ = tokens * Hkv * 2 * D * kv_bytes + 16 * Hq * 2 * D * 4
    name = f"serving/torch_sdpa_padded/B:16/tokens:{tokens}/kv:{kv}/threads:{threads}"
    label = f"B=16 tokens={tokens} padded_to={lmax} kv={kv} threads={threads}"
    return peer_rows.Row(name, label, 4.0 * tokens * Hq * D, bytes_, call,
                         setup=lambda: torch.set_num_threads(threads), note="padded")


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
    args = parser.parse_args(argv)
    try:
        threads = peer_rows.thread_counts(args.threads)
    except ValueError as e:
        parser.error(str(e))
    if args.repetitions < 1:
        parser.error("--repetitions must be >= 1")

    pattern = re.compile(args.filter)
    rows = [make_row(p, t, args.seed) for p in peer_rows.problems(args.size) for t in threads
            if pattern.search(p.name("torch_sdpa", "f32", t))]
    rows += [make_padded_row(args.size, kv, t, args.seed) for kv in ("f32", "f16") for t in threads
             if pattern.search(f"serving/torch_sdpa_padded/B:16/kv:{kv}/threads:{t}")]
    print(f"torch_sdpa: torch {torch.__version__}, {len(rows)} rows x {args.repetitions} repetitions "
          f"of >= {args.min_time} s, size {args.size}", flush=True)
    with torch.inference_mode():
        peer_rows.run_interleaved(rows, args.repetitions, args.min_time, args.seed)
    peer_rows.write_json(args.out, "torch_sdpa", args.size, __file__, rows, {
        "mnemo_isa": f"torch cpu capability {torch.backends.cpu.get_cpu_capability()}",
        "torch_version": torch.__version__,
    }, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
