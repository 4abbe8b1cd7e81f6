"""The Python API beyond the golden cases: errors, zero-copy strided inputs and outputs, the mods
the golden cases do not cover (against an independent NumPy attention), f16 K/V, the caches, the
policy list, the linear steps, the GIL, and PyTorch's SDPA when torch is installed."""
import threading
import time

import numpy as np
import pytest

import mnemo

A = mnemo.attention
rng = np.random.default_rng(1234)


def randn(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def np_attention(q, k, v, scale=None, mask=None, softcap=0.0, alibi=None, sinks=None):
    """Independent float64 attention: q [B,Hq,Lq,D], k/v [B,Hkv,Lk,*]; mask(i_pos, j) -> bool [Lq, Lk]."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = scale or 1.0 / np.sqrt(D)
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    s = scale * np.einsum("bhid,bhjd->bhij", q, k)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    qp = np.arange(Lq)[:, None] + (Lk - Lq)
    kp = np.arange(Lk)[None, :]
    if alibi is not None:
        s = s - alibi.astype(np.float64)[None, :, None, None] * np.abs(qp - kp)[None, None]
    if mask is not None:
        s = np.where(mask(qp, kp)[None, None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, sinks.astype(np.float64)[None, :, None, None])
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True)
    if sinks is not None:
        den = den + np.exp(sinks.astype(np.float64)[None, :, None, None] - m)
    p = np.where(den > 0, e / np.where(den > 0, den, 1), 0.0)
    out = np.einsum("bhij,bhjd->bhid", p, v)
    with np.errstate(divide="ignore"):
        lse = (np.log(den) + m)[..., 0]
    return out, lse


# ---- errors ------------------------------------------------------------------------------------

def test_error_is_value_error_with_message():
    assert issubclass(mnemo.Error, ValueError)
    q, k, v = randn(1, 6, 4, 8), randn(1, 4, 5, 8), randn(1, 4, 5, 8)
    with pytest.raises(mnemo.Error, match=r"attention::flash: q\.shape\[1\] \(Hq\) must be a multiple of k\.shape\[1\] \(Hkv\), got Hq=6, Hkv=4"):
        A.flash(q, k, v)


@pytest.mark.parametrize("fn", [A.flash, A.decode, A.reference])
def test_error_names_dtype_argument(fn):
    q, k, v = randn(1, 2, 1, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8)
    with pytest.raises(mnemo.Error, match=r"argument q: expected dtype float32, got float64"):
        fn(q.astype(np.float64), k, v)
    with pytest.raises(mnemo.Error, match=r"argument q: expected a 4-d array \[B, Hq, Lq, D\], got 3-d"):
        fn(q[0], k, v)
    with pytest.raises(mnemo.Error, match=r"arguments k and v: expected one dtype"):
        fn(q, k, v.astype(np.float16))


def test_error_innermost_axis_and_non_arrays():
    q = randn(1, 2, 3, 8)
    k = randn(1, 2, 8, 5).transpose(0, 1, 3, 2)  # D not contiguous
    with pytest.raises(mnemo.Error, match=r"attention\.flash: argument k: the innermost axis must be contiguous"):
        A.flash(q, k, k)
    with pytest.raises(mnemo.Error, match=r"argument q: expected a numpy array or a CPU torch tensor, got list"):
        A.flash(q.tolist(), k, k)
    with pytest.raises(mnemo.Error, match=r"argument window: expected >= 0"):
        A.flash(q, randn(1, 2, 5, 8), randn(1, 2, 5, 8), window=-1)
    with pytest.raises(mnemo.Error, match=r"alibi\.slopes must have shape \[Hq\]"):
        A.flash(q, randn(1, 2, 5, 8), randn(1, 2, 5, 8), alibi_slopes=np.ones(3, np.float32), causal=True)
    with pytest.raises(mnemo.Error, match=r"argument out: is an output: expected a writable array"):
        out = np.zeros((1, 2, 3, 8), np.float32)
        out.flags.writeable = False
        A.flash(q, randn(1, 2, 5, 8), randn(1, 2, 5, 8), out=out)
    with pytest.raises(mnemo.Error, match=r"q\.shape\[2\] \(Lq\) must be <= 16"):
        A.decode(randn(1, 2, 17, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8))
    with pytest.raises(mnemo.Error, match=r"argument name: expected one of linear_attn, retention"):
        mnemo.linear.run("nope", randn(1, 1, 4, 8), randn(1, 1, 4, 8), randn(1, 1, 4, 8))
    with pytest.raises(mnemo.Error, match=r"kvcache::policies::find: name must be one of"):
        mnemo.kvcache.policies.select("nope", randn(2, 10, 8), 4)
    with pytest.raises(mnemo.Error, match=r"argument isa: expected one of scalar, sse, avx2, avx512|mnemo: isa"):
        A.flash(q, randn(1, 2, 5, 8), randn(1, 2, 5, 8), isa="avx9")


# ---- zero copy ------------------------------------------------------------------------------------

def test_strided_views_are_read_in_place():
    B, L, H, D = 2, 37, 4, 16
    x = randn(B, L, 3 * H, D)  # a fused [B, L, 3H, D] projection: q, k, v are strided views of it
    q = x[:, :, 0:H].transpose(0, 2, 1, 3)  # [B, H, L, D], no copy
    k = x[:, :, H:2 * H].transpose(0, 2, 1, 3)
    v = x[:, :, 2 * H:].transpose(0, 2, 1, 3)
    assert not q.flags.c_contiguous and np.shares_memory(q, x)
    out, lse = A.flash(q, k, v, causal=True)
    want, want_lse = np_attention(q, k, v, mask=lambda i, j: j <= i)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=1e-5)
    # Same kernel on C-order copies: bit-identical.
    out_c, lse_c = A.flash(*(np.ascontiguousarray(t) for t in (q, k, v)), causal=True)
    assert np.array_equal(out, out_c) and np.array_equal(lse, lse_c)


def test_no_copy_proved_by_aliasing_check():
    # k is a strided view into buf; out= another view into buf overlapping k's memory. mnemo refuses
    # out overlapping k, which it can only see if k reached it where it lies (a copy would not overlap).
    buf = randn(1, 8, 2, 16)  # [B, L, H, D]
    k = buf.transpose(0, 2, 1, 3)  # [B, H, L, D]
    q = randn(1, 2, 8, 16)
    out_alias = buf.transpose(0, 2, 1, 3)  # the same memory as k
    with pytest.raises(mnemo.Error, match=r"out.*overlap|overlap.*out"):
        A.flash(q, k, k, out=out_alias)


def test_out_written_in_place_through_a_strided_view():
    B, L, H, D = 1, 9, 3, 8
    q, k, v = randn(B, H, L, D), randn(B, H, L, D), randn(B, H, L, D)
    out_buf = np.full((B, L, H, D), np.nan, np.float32)  # the model's [B, L, H, D] layout
    lse_buf = np.full((B, 2 * H, L), np.nan, np.float32)  # every other head row: strided, innermost contiguous
    out_view = out_buf.transpose(0, 2, 1, 3)
    out, lse = A.flash(q, k, v, causal=True, out=out_view, lse=lse_buf[:, ::2])
    with pytest.raises(mnemo.Error, match=r"argument lse: the innermost axis must be contiguous"):
        A.flash(q, k, v, lse=np.zeros((B, L, H), np.float32).transpose(0, 2, 1))
    assert out is out_view
    assert np.isfinite(out_buf).all()
    want, want_lse = np_attention(q, k, v, mask=lambda i, j: j <= i)
    np.testing.assert_allclose(out_buf.transpose(0, 2, 1, 3), want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse_buf[:, ::2], want_lse, atol=2e-5, rtol=1e-5)
    assert np.isnan(lse_buf[:, 1::2]).all()  # the rows between were not touched


# ---- mods beyond the golden cases, against NumPy ------------------------------------------------

@pytest.mark.parametrize("kernel", ["flash", "reference", "decode"])
def test_document_prefix_and_sinks(kernel):
    fn = getattr(A, kernel)
    Lq = 5 if kernel == "decode" else 23
    Lk = 23
    q, k, v = randn(2, 4, Lq, 16), randn(2, 2, Lk, 16), randn(2, 2, Lk, 12)
    ids = np.repeat(np.arange(4), [6, 1, 9, 7]).astype(np.int64)
    out, lse = fn(q, k, v, document_ids=ids, causal=True)
    want, want_lse = np_attention(q, k, v, mask=lambda i, j: (j <= i) & (ids[np.clip(i, 0, Lk - 1)] == ids[j]))
    np.testing.assert_allclose(out, want, atol=3e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, want_lse, atol=3e-5, rtol=1e-5)
    out, lse = fn(q, k, v, prefix=7)
    want, want_lse = np_attention(q, k, v, mask=lambda i, j: (j < 7) | (j <= i))
    np.testing.assert_allclose(out, want, atol=3e-5, rtol=1e-4)
    sinks = randn(4)
    out, lse = fn(q, k, v, window=4, softcap=5.0, sinks=sinks, alibi_slopes=np.float32([0.5, 0.25, 0.125, 0.0625]))
    want, want_lse = np_attention(q, k, v, mask=lambda i, j: (j <= i) & (i - j < 4), softcap=5.0,
                                  alibi=np.float32([0.5, 0.25, 0.125, 0.0625]), sinks=sinks)
    np.testing.assert_allclose(out, want, atol=3e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, want_lse, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["flash", "decode"])
def test_f16_kv(kernel):
    q = randn(1, 4, 3, 32)
    k, v = randn(1, 2, 70, 32).astype(np.float16), randn(1, 2, 70, 32).astype(np.float16)
    out, lse = getattr(A, kernel)(q, k, v, causal=True)
    want, want_lse = np_attention(q, k.astype(np.float32), v.astype(np.float32), mask=lambda i, j: j <= i)
    np.testing.assert_allclose(out, want, atol=3e-5, rtol=1e-4)
    with pytest.raises(mnemo.Error, match=r"float16 / bfloat16 K/V take causal or no mask only"):
        getattr(A, kernel)(q, k, v, window=3)


def test_backward_matches_finite_differences_of_numpy():
    q, k, v = randn(1, 2, 6, 8), randn(1, 1, 9, 8), randn(1, 1, 9, 8)
    dout = randn(1, 2, 6, 8)
    out, lse = A.flash(q, k, v, causal=True, softcap=3.0)
    dq, dk, dv = A.flash_backward(q, k, v, out, lse, dout, causal=True, softcap=3.0)

    def loss(qq):
        o, _ = np_attention(qq, k, v, mask=lambda i, j: j <= i, softcap=3.0)
        return float((o * dout).sum())

    eps = 1e-3
    num = np.zeros_like(q, dtype=np.float64)
    for idx in [(0, 0, 0, 0), (0, 1, 5, 7), (0, 0, 3, 2)]:
        e = np.zeros_like(q, dtype=np.float64)
        e[idx] = eps
        num[idx] = (loss(q + e) - loss(q - e)) / (2 * eps)
        assert abs(num[idx] - dq[idx]) < 2e-3, (idx, num[idx], dq[idx])


def test_merge_of_two_halves_equals_the_whole():
    q, k, v = randn(1, 2, 4, 8), randn(1, 2, 20, 8), randn(1, 2, 20, 8)
    oa, la = A.flash(q, k[:, :, :11], v[:, :, :11])
    ob, lb = A.flash(q, k[:, :, 11:], v[:, :, 11:])
    out, lse = A.merge(oa, la, ob, lb)
    want, want_lse = np_attention(q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=1e-5)


# ---- caches and policies ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["f32", "f16", "int8"])
def test_layer_cache_decode_matches_attention(kind):
    Hkv, Hq, D, n = 2, 4, 32, 150
    c = mnemo.kvcache.LayerCache(kind=kind, Hkv=Hkv, capacity=256, D=D)
    k, v = randn(Hkv, n, D), randn(Hkv, n, D)
    c.append(k[:, :100], v[:, :100])
    c.append(k[:, 100:], v[:, 100:])
    assert c.lengths == [n, n]
    q = randn(Hq, 1, D)
    out, lse = mnemo.kvcache.decode(c, q)
    want, want_lse = np_attention(q[None], k[None], v[None])
    tol = 2e-5 if kind == "f32" else 3e-2
    np.testing.assert_allclose(out, want[0], atol=tol, rtol=tol)
    kept = [np.arange(0, n, 2), np.arange(1, n, 3)]
    c.compact(kept)
    assert c.lengths == [len(kept[0]), len(kept[1])]
    np.testing.assert_array_equal(c.positions(1), kept[1])


def test_paged_cache_attention_matches_dense():
    Hkv, Hq, D = 2, 4, 16
    pc = mnemo.kvcache.PagedCache(Hkv=Hkv, D=D, page_size=16, num_pages=32)
    a = pc.create()
    k, v = randn(Hkv, 40, D), randn(Hkv, 40, D)
    pc.append(a, k, v)
    b = pc.fork(a)
    kb, vb = randn(Hkv, 3, D), randn(Hkv, 3, D)
    pc.append(b, kb, vb)
    q = randn(2, Hq, D)
    out, lse = mnemo.kvcache.paged_attention(pc, [a, b], q, np.array([0, 1, 2], np.int64), causal=True)
    wa, _ = np_attention(q[0][None, :, None], k[None], v[None])
    wb, _ = np_attention(q[1][None, :, None], np.concatenate([k, kb], 1)[None], np.concatenate([v, vb], 1)[None])
    np.testing.assert_allclose(out[0], wa[0, :, 0], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(out[1], wb[0, :, 0], atol=2e-5, rtol=1e-4)


def test_every_policy_of_the_list_selects():
    Hkv, Hq, L, D, Lw = 2, 4, 96, 16, 8
    k, v, qall = randn(Hkv, L, D), randn(Hkv, L, D), randn(Hq, L, D)
    names = mnemo.kvcache.policies.names()
    assert len(names) >= 20 and "snapkv" in names and "think" in names
    for name in names:
        info = mnemo.kvcache.policies.info(name)
        rows = {"window": Lw, "all": L, "last": 1}[info["attn_rows"]]
        q = qall[:, L - rows:]
        _, _, sums = A.flash(qall[None], k[None], k[None], causal=True, column_sums=rows)
        budget = 6 if info["selects"] == "channels" else 24
        sel = mnemo.kvcache.policies.select(name, k, budget, v=v, q=q, attn=sums[0],
                                            special=np.zeros(L, np.uint8), punct=np.zeros(L, np.uint8))
        assert len(sel) == Hkv, name
        bound = D if info["selects"] == "channels" else L
        for row in sel:
            assert row.dtype == np.int64 and np.all(np.diff(row) > 0) and (row.size == 0 or (row[0] >= 0 and row[-1] < bound)), name
        total = sum(r.size for r in sel)
        assert total <= budget * Hkv + Hkv, (name, total)  # head-adaptive policies share the total budget


# ---- linear family --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", mnemo.linear.names())
def test_linear_steps_continue_the_sequence(name):
    info = mnemo.linear.member_info(name)
    B, H, L, Dk, Dv = 1, 2, 7, 8, 6
    q, k, v = randn(B, H, L, Dk), randn(B, H, L, Dk), randn(B, H, L, Dv)
    kw = {}
    if info["gate"] == "head":
        kw["gamma"] = np.float32([0.9, 0.8])
    elif info["gate"] == "scalar":
        kw["g"] = -np.abs(randn(B, H, L)) * 0.1
    elif info["gate"] == "channel":
        kw["g"] = -np.abs(randn(B, H, L, Dk)) * 0.1
    if info["beta"]:
        kw["beta"] = rng.uniform(0.1, 0.9, (B, H, L)).astype(np.float32)
    if info["other_inputs"]:  # rwkv7's a, b
        kw["a"] = randn(B, H, L, Dk) * 0.1
        kw["b"] = randn(B, H, L, Dk) * 0.1
    if info["beta"] or name == "rwkv7":
        q, k = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    o_ref, s_ref = mnemo.linear.run(name, q, k, v, reference=True, **kw)
    o, s = mnemo.linear.run(name, q, k, v, form="chunked", chunk_size=4, **kw)
    np.testing.assert_allclose(o, o_ref, atol=1e-4, rtol=1e-3)
    state = np.zeros((B, H, Dk, Dv), np.float32)
    for t in range(L):
        # per-token slices of [B, H, L] gates are strided on their innermost axis: made contiguous
        kt = {n: (x if n == "gamma" else np.ascontiguousarray(x[:, :, t])) for n, x in kw.items()}
        ot = mnemo.linear.step(name, q[:, :, t], k[:, :, t], v[:, :, t], state, **kt)
        np.testing.assert_allclose(ot, o_ref[:, :, t], atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(state, s_ref, atol=1e-4, rtol=1e-3)


# ---- the GIL --------------------------------------------------------------------------------------

def test_gil_released_during_kernels():
    q, k, v = randn(1, 8, 512, 64), randn(1, 8, 512, 64), randn(1, 8, 512, 64)
    done = threading.Event()
    def work():
        A.reference(q, k, v, causal=True, threads=1)
        done.set()
    t = threading.Thread(target=work)
    ticks = 0
    t0 = time.perf_counter()
    t.start()
    while not done.is_set():
        ticks += 1
    t.join()
    elapsed = time.perf_counter() - t0
    # With the GIL held for the whole call this thread could not count at all while it ran.
    assert elapsed > 0.05 and ticks > 1000, (elapsed, ticks)


# ---- PyTorch ------------------------------------------------------------------------------------

def test_torch_sdpa():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed: the comparison with torch.nn.functional.scaled_dot_product_attention "
                    "was not run (pip install torch into the venv to run it)")
    F = torch.nn.functional
    q, k, v = (torch.randn(2, 4, n, 32) for n in (33, 33, 33))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out, _ = A.flash(q, k, v, causal=True)  # CPU torch tensors, read in place
    np.testing.assert_allclose(out, want.numpy(), atol=2e-5, rtol=1e-4)
    # A [B, L, H, D] tensor used as [B, H, L, D] without a copy.
    x = torch.randn(2, 33, 4, 32)
    xq = x.permute(0, 2, 1, 3)
    out, _ = A.flash(xq, xq, xq)
    want = F.scaled_dot_product_attention(xq, xq, xq)
    np.testing.assert_allclose(out, want.numpy(), atol=2e-5, rtol=1e-4)
    kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
    out, _ = A.flash(q, kb, vb, causal=True)
    want = F.scaled_dot_product_attention(q, kb.float(), vb.float(), is_causal=True)
    np.testing.assert_allclose(out, want.numpy(), atol=2e-5, rtol=1e-4)
