"""Every golden op of ../shared/golden (README.md there) through the Python API.

OPS maps an op name to {implementation label: function(case) -> {output name: array}}, as
tests/golden/ops_*.cpp do for the C++ runner. A case is a Case (meta.json + lazily loaded .npy).
"""
import json
import math
from pathlib import Path

import numpy as np

import mnemo

A = mnemo.attention
KV = mnemo.kvcache
LIN = mnemo.linear
MEM = mnemo.memory


class Case:
    def __init__(self, folder):
        self.dir = Path(folder)
        self.name = self.dir.name
        meta = json.loads((self.dir / "meta.json").read_text())
        self.op = meta["op"]
        self.p = meta["params"]
        self.inputs = meta["inputs"]
        self.outputs = meta["outputs"]
        self.atol = float(meta["atol"])
        self.rtol = float(meta["rtol"])
        self._cache = {}

    def __getitem__(self, name):
        if name not in self._cache:
            self._cache[name] = np.load(self.dir / (name + ".npy"))
        return self._cache[name]

    def has(self, name):
        return name in self.inputs

    def opt(self, name):
        return self[name] if self.has(name) else None


def compare(name, got, want, atol, rtol):
    """The README's rule; returns '' or the failure text."""
    got = np.asarray(got)
    if want.dtype == np.int64:
        if got.dtype != np.int64:
            return f"{name}: dtype {got.dtype}, want int64"
        if got.shape != want.shape:
            return f"{name}: shape {got.shape}, want {want.shape}"
        bad = np.flatnonzero(got.ravel() != want.ravel())
        return "" if bad.size == 0 else f"{name}: {bad.size} of {want.size} indices differ (first at {bad[0]})"
    if got.shape != want.shape:
        return f"{name}: shape {got.shape}, want {want.shape}"
    g = got.astype(np.float64).ravel()
    w = want.astype(np.float64).ravel()
    fin = np.isfinite(w)
    nonfinite_bad = ~fin & ~((g == w) | (np.isnan(w) & np.isnan(g)))
    with np.errstate(invalid="ignore"):
        err = np.abs(g - w)
        tol = atol + rtol * np.abs(w)
        finite_bad = fin & ~(err <= tol)
    bad = np.flatnonzero(nonfinite_bad | finite_bad)
    if bad.size == 0:
        return ""
    i = bad[0]
    idx = np.unravel_index(i, want.shape)
    return f"{name}{list(idx)}: got {g[i]!r}, want {w[i]!r}; {bad.size} of {w.size} elements wrong"


# ---- attention ----------------------------------------------------------------------------------

def mod_kwargs(c, alibi=True):
    p = c.p
    kw = dict(scale=float(p["scale"]), causal=bool(p["causal"]), window=int(p.get("window", 0)),
              softcap=float(p.get("softcap", 0.0)))
    if alibi and p.get("alibi"):
        kw["alibi_slopes"] = c["alibi_slopes"]
    return kw


def attention_forward(kernel):
    def run(c):
        fn = {"reference": A.reference, "flash": A.flash, "decode": A.decode}[kernel] if kernel != "attend" else A.attend
        out, lse = fn(c["q"], c["k"], c["v"], **mod_kwargs(c))
        return {"out": out, "lse": lse}
    return run


def attention_backward(flash):
    def run(c):
        kw = mod_kwargs(c)
        q, k, v, dout = c["q"], c["k"], c["v"], c["dout"]
        if flash:
            out, lse = A.flash(q, k, v, **kw)
            dq, dk, dv = A.flash_backward(q, k, v, out, lse, dout, **kw)
        else:
            out, lse = A.reference(q, k, v, **kw)
            dq, dk, dv = A.reference_backward(q, k, v, dout, **kw)
        return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    return run


def attention_merge(c):
    out, lse = A.merge(c["out_a"], c["lse_a"], c["out_b"], c["lse_b"])
    return {"out": out, "lse": lse}


def attention_sinks(kernel):
    def run(c):
        fn = {"reference": A.reference, "flash": A.flash, "decode": A.decode}[kernel]
        if kernel == "decode" and c.p["Lq"] > A.decode_max_rows:
            fn = A.flash
        out, lse = fn(c["q"], c["k"], c["v"], sinks=c["sinks"], **mod_kwargs(c, alibi=False))
        return {"out": out, "lse": lse}
    return run


def attention_paged(reference):
    def run(c):
        p = c.p
        out, lse = A.paged(c["q"], c["cu_seqlens_q"], c["k_pages"], c["v_pages"], c["block_table"], c["seq_lens"],
                           scale=float(p["scale"]), causal=bool(p["causal"]), window=int(p["window"]),
                           softcap=float(p["softcap"]), sinks=c["sinks"] if p["sinks"] else None,
                           reference=reference)
        return {"out": out, "lse": lse}
    return run


def attention_sigmoid(reference):
    def run(c):
        p = c.p
        out = A.sigmoid(c["q"], c["k"], c["v"], bias=float(p["bias"]), scale=float(p["scale"]),
                        causal=bool(p["causal"]), window=int(p["window"]), reference=reference)
        return {"out": out}
    return run


def landmark_attention(reference):
    def run(c):
        out, w = A.landmark(c["q"], c["k"], c["v"], c["is_mem"], scale=float(c.p["scale"]), weights=True,
                            reference=reference)
        return {"out": out, "weights": w}
    return run


# ---- linear family, state-space front-ends --------------------------------------------------------

def linear_member(form):
    def run(c):
        p = c.p
        info = LIN.member_info(c.op)
        kw = dict(scale=float(p["scale"]))
        if form == "reference":
            kw["reference"] = True
        else:
            kw["form"] = form
            kw["chunk_size"] = 16
        if info["gate"] == "head":
            kw["gamma"] = np.asarray(p["gamma"], np.float32)
        elif info["gate"] in ("scalar", "channel"):
            kw["g"] = c["g"]
        if info["beta"]:
            kw["beta"] = c["beta"]
            kw["use_qk_l2norm"] = bool(p["use_qk_l2norm"])
        if p["has_initial_state"]:
            kw["h0"] = c["h0"]
        o, ht = LIN.run(c.op, c["q"], c["k"], c["v"], **kw)
        return {"o": o, "ht": ht}
    return run


def causal_conv1d(reference):
    def run(c):
        p = c.p
        y, fin = LIN.causal_conv1d(c["x"], c["weight"], bias=c.opt("bias") if p["bias"] else None,
                                   initial_states=c.opt("initial_states") if p["has_initial_states"] else None,
                                   activation=p["activation"], reference=reference)
        return {"y": y, "final_states": fin}
    return run


def selective_scan(reference):
    def run(c):
        p = c.p
        y, last = LIN.selective_scan(c["u"], c["delta"], c["A"], c["Bm"], c["Cm"],
                                     D=c["D"] if p["has_D"] else None, z=c["z"] if p["has_z"] else None,
                                     delta_bias=c["delta_bias"] if p["has_delta_bias"] else None,
                                     h0=c["h0"] if p["has_initial_state"] else None,
                                     delta_softplus=bool(p["delta_softplus"]), reference=reference)
        return {"y": y, "last_state": last}
    return run


def rope_scaled(reference):
    def run(c):
        p = c.p

        def given(key, default):
            return p[key] if p.get(key) is not None else default

        y = KV.apply_rope(c["x"], c["positions"], rotary_dim=int(p["rotary_dim"]), base=float(p["base"]),
                          layout=p["layout"], scheme=p["scheme"], factor=float(given("factor", 1.0)),
                          original_max_position_embeddings=int(given("original_max_position_embeddings", 0)),
                          seq_len=int(given("seq_len", 0)), beta_fast=float(given("beta_fast", 32.0)),
                          beta_slow=float(given("beta_slow", 1.0)),
                          attention_factor=float(given("attention_factor", 0.0)),
                          low_freq_factor=float(given("low_freq_factor", 1.0)),
                          high_freq_factor=float(given("high_freq_factor", 4.0)), reference=reference)
        return {"y": y}
    return run


# ---- memory --------------------------------------------------------------------------------------

def titans(reference):
    def run(c):
        p = c.p
        assert p["activation"] == "silu" and p["loss"] == "sum_sq" and p["read"] == "after_update" and not p["bias"]
        y, w, s = MEM.neural_memory(c["q"], c["k"], c["v"], c["theta"], c["eta"], c["alpha"],
                                    weights=[c["W1"], c["W2"]], momenta=[c["S1"], c["S2"]],
                                    chunk_size=int(p["chunk_size"]), residual=bool(p["residual"]),
                                    reference=reference)
        return {"y": y, "W1_out": w[0], "W2_out": w[1], "S1_out": s[0], "S2_out": s[1]}
    return run


def pkm(reference):
    def run(c):
        assert c.p["score_softmax"] and c.p["heads_reduction"] == "sum"
        out, idx, w, s = MEM.pkm(c["query"], c["keys"], c["values"], knn=int(c.p["knn"]), reference=reference)
        return {"out": out, "indices": idx, "weights": w, "scores": s}
    return run


# ---- KV policies ---------------------------------------------------------------------------------

POLICY_OF = {"kv_streaming_llm": "streaming_llm", "kv_snapkv": "snapkv", "kv_observed_attention": "h2o",
             "kv_tova": "tova", "kv_knorm": "knorm", "kv_qfilter": "qfilter", "kv_think": "think"}


def kv_policy(path):
    """path: where the attention column sums come from ('flash', 'reference', 'decode'), or 'policy'."""
    def run(c):
        p = c.p
        k = c["k"]
        B, Hkv, L, D = k.shape
        budget = int(p["budget"])
        name = POLICY_OF[c.op]
        if c.op == "kv_think":
            q = c["q"]
            w = int(p["window"])
            kept_channels = D - int(p["n_pruned"])
            scores, kept, k_out = [], [], []
            for b in range(B):
                s = KV.policies.scores("think", k[b], q=q[b, :, L - w:])
                sel = KV.policies.top_budget(s, kept_channels)
                scores.append(s)
                kept.append(np.stack(sel))
                k_out.append(KV.policies.think_prune(k[b], sel))
            return {"scores": np.stack(scores), "kept": np.stack(kept), "k_out": np.stack(k_out)}
        sums = None
        if c.op in ("kv_snapkv", "kv_observed_attention", "kv_tova"):
            q = c["q"]
            rows = int(p["window"]) if c.op == "kv_snapkv" else 1 if c.op == "kv_tova" else 0
            if path == "decode":
                qw = q[:, :, L - rows:]  # a strided view, no copy
                _, _, sums = A.decode(qw, k, k, causal=True, column_sums=0)
            else:
                fn = A.flash if path == "flash" else A.reference
                _, _, sums = fn(q, k, k, causal=True, column_sums=rows)
        scores = np.zeros((B, Hkv, L), np.float32)
        kept = []
        for b in range(B):
            kw = dict(attn=sums[b] if sums is not None else None, budget=budget)
            if c.op == "kv_streaming_llm":
                assert int(p["n_sink"]) + int(p["window"]) == budget
                kw["n_sink"] = int(p["n_sink"])
            if c.op == "kv_snapkv":
                kw["window"] = int(p["window"])
                kw["kernel_size"] = int(p["kernel_size"])
            if c.op == "kv_qfilter":
                kw["filters"] = c["q_filter"]
            scores[b] = KV.policies.scores(name, k[b], **kw)
            kept.append(np.stack(KV.policies.top_budget(scores[b], budget)))
        # kvpress fills the SnapKV / TOVA window with the max over the whole tensor + 1.
        w = int(p["window"]) if c.op == "kv_snapkv" else 1 if c.op == "kv_tova" else 0
        if w:
            scores[:, :, L - w:] = scores[:, :, :L - w].max() + 1.0
        return {"scores": scores, "kept": np.stack(kept)}
    return run


LINEAR_OPS = ["linear_attn", "retention", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda"]

OPS = {
    "attention_forward": {k: attention_forward(k) for k in ("reference", "flash", "attend")},
    "attention_decode": {k: attention_forward(k) for k in ("reference", "flash", "decode", "attend")},
    "attention_backward": {"reference": attention_backward(False), "flash": attention_backward(True)},
    "attention_merge": {"merge": attention_merge},
    "attention_sinks": {k: attention_sinks(k) for k in ("reference", "flash", "decode")},
    "attention_paged": {"reference": attention_paged(True), "paged": attention_paged(False)},
    "attention_sigmoid": {"reference": attention_sigmoid(True), "fast": attention_sigmoid(False)},
    "landmark_attention": {"reference": landmark_attention(True), "fast": landmark_attention(False)},
    "causal_conv1d": {"reference": causal_conv1d(True), "fast": causal_conv1d(False)},
    "selective_scan": {"reference": selective_scan(True), "fast": selective_scan(False)},
    "rope_scaled": {"reference": rope_scaled(True), "fast": rope_scaled(False)},
    "titans_memory": {"reference": titans(True), "fast": titans(False)},
    "pkm": {"reference": pkm(True), "fast": pkm(False)},
}
for _op in LINEAR_OPS:
    OPS[_op] = {f: linear_member(f) for f in ("recurrent", "chunked", "reference")}
for _op in POLICY_OF:
    if _op in ("kv_snapkv", "kv_observed_attention"):
        OPS[_op] = {p: kv_policy(p) for p in ("flash", "reference")}
    elif _op == "kv_tova":
        OPS[_op] = {p: kv_policy(p) for p in ("flash", "reference", "decode")}
    else:
        OPS[_op] = {"policy": kv_policy("policy")}
