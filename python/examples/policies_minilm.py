"""KV policies on a real model's attention, from Python: all-MiniLM-L6-v2's Q, K, V (the dump the
KV-policy benchmark uses, bench/real_attention/minilm_dump.sh: 6 layers x 12 heads, head dim 32,
L = 512 tokens, non-causal), every slot policy of mnemo's policy list at several budgets.

As bench/kvpolicy_real_rows.cpp measures it: per layer the policy observes the last Lw = 32 positions
(their queries, the column sums of their attention, causal=False, the special / punctuation flags,
layer l of 6) and keeps budget% of the 512 slots per head; the same 32 rows are then answered over the
kept slots and compared with the answer over all 512:

  rel_error = sqrt(sum ||o_kept - o_full||^2 / sum ||o_full||^2)

The merging methods (cam, merging, dmc, moviechat) are answered here over their kept slots as they are,
without folding the evicted tokens in (bench/kvpolicy_real_rows.cpp applies their merge plans).
Every kernel call is mnemo's (attention.flash for the column sums and the answers over the kept slots,
kvcache.policies.select for the selection); NumPy only gathers rows.

  python python/examples/policies_minilm.py [--data build/real_attention] [--budgets 5,10,20,40]
                                            [--plot minilm_policies.png]

Without matplotlib the table is printed and no figure is written.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import mnemo

WINDOW = 32


def load(data):
    d = Path(data)
    if not (d / "q_0.npy").exists():
        sys.exit(f"no MiniLM dump in {d}: run bench/real_attention/minilm_dump.sh first")
    layers = []
    l = 0
    while (d / f"q_{l}.npy").exists():
        layers.append(tuple(np.load(d / f"{x}_{l}.npy") for x in "qkv"))
        l += 1
    special = np.load(d / "special.npy").astype(np.uint8) if (d / "special.npy").exists() else None
    punct = np.load(d / "punct.npy").astype(np.uint8) if (d / "punct.npy").exists() else None
    return layers, special, punct


def answer(q, k, v, kept):
    """The window rows q [H, Lw, D] over the kept slots of each head (non-causal): [H, Lw, D]."""
    out = np.empty((q.shape[0], q.shape[1], v.shape[2]), np.float32)
    for h, slots in enumerate(kept):
        o, _ = mnemo.attention.flash(q[None, h:h + 1], k[None, h:h + 1, slots], v[None, h:h + 1, slots])
        out[h] = o[0, 0]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("MNEMO_REAL_ATTENTION", "build/real_attention"))
    ap.add_argument("--budgets", default="5,10,20,40", help="percent of the slots kept per head")
    ap.add_argument("--policies", default="", help="comma-separated names (default: every slot policy)")
    ap.add_argument("--plot", default="minilm_policies.png", help="figure path ('' for none)")
    ap.add_argument("--json", default="", help="also write the results as JSON here")
    args = ap.parse_args()

    layers, special, punct = load(args.data)
    H, L, D = layers[0][0].shape
    budgets = [int(b) for b in args.budgets.split(",")]
    names = [n for n in (args.policies.split(",") if args.policies else mnemo.kvcache.policies.names())
             if mnemo.kvcache.policies.info(n)["selects"] == "slots"]

    # Per layer: the full answer of the window rows and the column sums each policy's rows need.
    prep = []
    for (q, k, v) in layers:
        qw = q[:, L - WINDOW:]  # a strided view: no copy
        o_full, _ = mnemo.attention.flash(qw[None], k[None], v[None])
        sums = {}
        for rows, qq in (("window", qw), ("all", q), ("last", q[:, L - 1:])):
            _, _, s = mnemo.attention.flash(qq[None], k[None], k[None], column_sums=0)
            sums[rows] = s[0]
        prep.append((q, k, v, qw, o_full[0], sums))

    results = {}
    print(f"MiniLM-L6: {len(layers)} layers x {H} heads, L = {L}, D = {D}; window {WINDOW} rows; rel_error")
    print(f"{'policy':<20}" + "".join(f"{b:>9}%" for b in budgets) + "   select ms")
    for name in names:
        info = mnemo.kvcache.policies.info(name)
        row, t_sel = [], 0.0
        for pct in budgets:
            budget = max(1, L * pct // 100)
            num = den = 0.0
            for l, (q, k, v, qw, o_full, sums) in enumerate(prep):
                t0 = time.perf_counter()
                kept = mnemo.kvcache.policies.select(name, k, budget, v=v, q=qw, attn=sums[info["attn_rows"]],
                                                     special=special, punct=punct, layer=l, layers=len(layers),
                                                     causal=False)
                t_sel += time.perf_counter() - t0
                o = answer(qw, k, v, kept)
                num += float(((o - o_full) ** 2).sum())
                den += float((o_full ** 2).sum())
            row.append(np.sqrt(num / den))
        results[name] = row
        print(f"{name:<20}" + "".join(f"{e:>10.4f}" for e in row) + f"   {1e3 * t_sel / len(budgets):9.1f}")

    if args.json:
        Path(args.json).write_text(json.dumps({"budgets_pct": budgets, "rel_error": results}, indent=1))
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no figure (pip install matplotlib)")
            return
        fig, ax = plt.subplots(figsize=(8, 5))
        best = sorted(results, key=lambda n: results[n][len(budgets) // 2])
        for name in best:
            ax.plot(budgets, results[name], marker="o", lw=1.2 if name in best[:6] else 0.6,
                    alpha=1.0 if name in best[:6] else 0.45, label=name)
        ax.set_xlabel("KV budget (% of 512 slots kept per head)")
        ax.set_ylabel("relative error of the window rows' output")
        ax.set_yscale("log")
        ax.set_title("KV policies on all-MiniLM-L6-v2 (mnemo from Python)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
