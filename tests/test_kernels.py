"""Every Numba kernel of minilm.kernels vs the plain-numpy `*_ref` beside it, on random inputs of
odd sizes; and one compiled signature per kernel after a real model forward."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minilm.kernels import activations as act
from minilm.kernels import attention as att
from minilm.kernels import matmul as mm
from minilm.kernels import norm, rope

from conftest import shared_path

RTOL = 1e-4


def rnd(*shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def close(got, want, rtol=RTOL, what=""):
    """max |got - want| <= rtol * max(|want|) (error relative to the output's scale)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"{what}: max err {err:.3g} > {rtol} * scale {scale:.3g}"


# ---- matmul ----------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K", [(7, 172), (1, 5), (4, 64), (9, 33), (130, 96), (513, 64)])
def test_gemv_f32(N, K):
    x, w = rnd(K, seed=1), rnd(N, K, seed=2)
    out = np.full(N, np.nan, np.float32)
    mm.gemv_f32(x, w, out)
    close(out, mm.matmul_ref(x[None], w)[0], what=f"gemv N={N} K={K}")


@pytest.mark.parametrize("M,N,K", [(5, 7, 172), (2, 1, 3), (17, 130, 64)])
def test_gemm_f32(M, N, K):
    x, w = rnd(M, K, seed=3), rnd(N, K, seed=4)
    out = np.full((M, N), np.nan, np.float32)
    mm.gemm_f32(x, w, out)
    close(out, mm.matmul_ref(x, w), what="gemm")


def test_gemm_rows_equal_gemv():
    """Each row of the float GEMM has the bits of the GEMV of that row (the 4x4 blocks, the
    M % 4 tokens and N % 4 rows left over, K % 16 columns, a non-contiguous x)."""
    for M, N, K in [(9, 14, 50), (4, 8, 576), (3, 5, 17)]:
        x, w = rnd(M, K, seed=62), rnd(N, K, seed=63)
        out = np.zeros((M, N), np.float32)
        mm.gemm_f32(x, w, out)
        for m in range(M):
            one = np.zeros(N, np.float32)
            mm.gemv_f32(x[m].copy(), w, one)
            assert np.array_equal(out[m], one), (M, N, K, m)
    xs = rnd(5, 2 * 40, seed=64)[:, ::2]
    out = np.zeros((5, 7), np.float32)
    mm.gemm_f32(xs, rnd(7, 40, seed=65), out)
    close(out, mm.matmul_ref(xs, rnd(7, 40, seed=65)), what="gemm of a strided x")


def test_gemv_into_row_view():
    """Writes into a row view of a bigger buffer (how all_logits uses it) without touching others."""
    x, w = rnd(33, seed=5), rnd(11, 33, seed=6)
    buf = np.zeros((3, 11), np.float32)
    mm.gemv_f32(x, w, buf[1])
    close(buf[1], mm.matmul_ref(x[None], w)[0], what="row view")
    assert not buf[0].any() and not buf[2].any()


# ---- norms -----------------------------------------------------------------------------------
NONE = np.zeros(0, np.float32)     # "no bias": the fused norm kernels do RMSNorm then


def need(mod, name):
    """The kernel `name` of `mod`, or skip (the kernel set is being refactored)."""
    f = getattr(mod, name, None)
    if f is None:
        pytest.skip(f"{mod.__name__}.{name} not present")
    return f


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("M,D", [(1, 64), (5, 7), (3, 172), (2, 1)])
def test_norm(M, D, kind):
    x = rnd(M, D, seed=7, scale=3.0) + (5.0 if kind == "layer" else 0.0)    # non-zero mean
    w, b = rnd(D, seed=8), rnd(D, seed=9)
    want = norm.rmsnorm_ref(x, w, 1e-5) if kind == "rms" else norm.layernorm_ref(x, w, b, 1e-5)
    out = np.full((M, D), np.nan, np.float32)
    if hasattr(norm, "norm"):                                   # fused API: b empty = RMSNorm
        norm.norm(x, w, NONE if kind == "rms" else b, 1e-5, out)
        close(out, want, what=f"norm {kind}")
        row = np.full(D, np.nan, np.float32)
        need(norm, "norm_row")(x[M - 1], w, NONE if kind == "rms" else b, 1e-5, row)
        close(row, want[M - 1], what=f"norm_row {kind}")
    elif kind == "rms":
        norm.rmsnorm(x, w, 1e-5, out)
        close(out, want, what="rmsnorm")
    else:
        norm.layernorm(x, w, b, 1e-5, out)
        close(out, want, what="layernorm")


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("M,D", [(1, 64), (4, 33)])
def test_add_norm(M, D, kind):
    f, frow = need(norm, "add_norm"), need(norm, "add_norm_row")
    x, y = rnd(M, D, seed=10, scale=2.0), rnd(M, D, seed=11)
    w, b = rnd(D, seed=12), rnd(D, seed=13)
    s = (x.astype(np.float64) + y).astype(np.float32)
    want = norm.rmsnorm_ref(s, w, 1e-6) if kind == "rms" else norm.layernorm_ref(s, w, b, 1e-6)
    bb = NONE if kind == "rms" else b
    x1, out = x.copy(), np.full((M, D), np.nan, np.float32)
    f(x1, y, w, bb, 1e-6, out)
    close(x1, s, rtol=1e-6, what="add_norm residual")
    close(out, want, what="add_norm")
    x2, row = x[0].copy(), np.full(D, np.nan, np.float32)
    frow(x2, y[0], w, bb, 1e-6, row)
    close(x2, s[0], rtol=1e-6, what="add_norm_row residual")
    close(row, want[0], what="add_norm_row")


def test_norm_in_place_and_eps():
    x, w = rnd(4, 16, seed=14, scale=1e-3), rnd(16, seed=15)
    want = norm.rmsnorm_ref(x, w, 1e-2)                 # eps dominates: tests that eps is used
    if hasattr(norm, "norm"):
        norm.norm(x, w, NONE, 1e-2, x)
    else:
        norm.rmsnorm(x, w, 1e-2, x)
    close(x, want, what="rmsnorm in place")


def _qk_norm_ref(qkv, qw, kw, H, Hkv, hd, eps):
    M = qkv.shape[0]
    want = qkv.copy()
    q = qkv[:, :H * hd].reshape(M * H, hd)
    k = qkv[:, H * hd:(H + Hkv) * hd].reshape(M * Hkv, hd)
    want[:, :H * hd] = norm.rmsnorm_ref(q, qw, eps).reshape(M, H * hd)
    want[:, H * hd:(H + Hkv) * hd] = norm.rmsnorm_ref(k, kw, eps).reshape(M, Hkv * hd)
    return want


@pytest.mark.parametrize("H,Hkv,hd,M", [(4, 2, 32, 5), (6, 6, 8, 1), (8, 2, 64, 3)])
def test_qk_rmsnorm(H, Hkv, hd, M):
    qkv = rnd(M, (H + 2 * Hkv) * hd, seed=16, scale=2.0)
    qw, kw = rnd(hd, seed=17), rnd(hd, seed=18)
    want = _qk_norm_ref(qkv, qw, kw, H, Hkv, hd, 1e-6)
    norm.qk_rmsnorm(qkv, qw, kw, H, Hkv, hd, 1e-6)
    close(qkv, want, what="qk_rmsnorm")
    np.testing.assert_array_equal(qkv[:, (H + Hkv) * hd:], want[:, (H + Hkv) * hd:])  # v untouched


def test_head_rmsnorm():
    f = need(norm, "head_rmsnorm")
    v, w = rnd(3 * 16, seed=19, scale=2.0), rnd(16, seed=20)
    want = v.copy()
    want[16:32] = norm.rmsnorm_ref(v[None, 16:32], w, 1e-6)[0]
    f(v, 16, 16, w, 1e-6)
    close(v, want, what="head_rmsnorm")
    np.testing.assert_array_equal(v[:16], want[:16])
    np.testing.assert_array_equal(v[32:], want[32:])


# ---- rope ------------------------------------------------------------------------------------
def inv_freq(rot, base=10000.0):
    return (1.0 / base ** (np.arange(0, rot, 2) / rot)).astype(np.float32)


def test_rope_tables():
    inv = inv_freq(16)
    cos, sin = rope.rope_tables(inv, 50)
    assert cos.shape == sin.shape == (50, 8) and cos.dtype == np.float32 and cos.flags.c_contiguous
    ang = np.outer(np.arange(50), inv.astype(np.float64))
    close(cos, np.cos(ang), rtol=1e-5, what="cos")
    close(sin, np.sin(ang), rtol=1e-5, what="sin")


@pytest.mark.parametrize("H,Hkv,hd,rot,M,pos0", [
    (4, 2, 32, 32, 5, 0), (4, 2, 32, 32, 5, 9), (6, 6, 8, 8, 1, 17), (4, 4, 64, 32, 3, 4),
    (8, 2, 64, 16, 1, 0), (2, 1, 32, 8, 7, 3)])
def test_rope_qk(H, Hkv, hd, rot, M, pos0):
    qkv = rnd(M, (H + 2 * Hkv) * hd, seed=20)
    inv = inv_freq(rot)
    cos, sin = rope.rope_tables(inv, pos0 + M + 3)
    pos = np.arange(pos0, pos0 + M)
    q = qkv[:, :H * hd].reshape(M, H, hd)
    k = qkv[:, H * hd:(H + Hkv) * hd].reshape(M, Hkv, hd)
    want = qkv.copy()
    want[:, :H * hd] = rope.rope_ref(q, pos, inv.astype(np.float64), rot).reshape(M, -1)
    want[:, H * hd:(H + Hkv) * hd] = rope.rope_ref(k, pos, inv.astype(np.float64), rot).reshape(M, -1)
    rope.rope_qk(qkv, pos0, cos, sin, H, Hkv, hd, rot)
    close(qkv, want, what="rope_qk")
    np.testing.assert_array_equal(qkv[:, (H + Hkv) * hd:], want[:, (H + Hkv) * hd:])  # v untouched
    if rot < hd:   # partial rotary: the tail of every head is untouched
        for h in range(H + Hkv):
            np.testing.assert_array_equal(qkv[:, h * hd + rot:(h + 1) * hd], want[:, h * hd + rot:(h + 1) * hd])


@pytest.mark.parametrize("hd,rot,p", [(32, 32, 0), (64, 16, 37), (8, 8, 5)])
def test_rope_head(hd, rot, p):
    f = need(rope, "rope_head")
    v = rnd(3 * hd, seed=22)
    inv = inv_freq(rot)
    cos, sin = rope.rope_tables(inv, p + 2)
    want = v.copy()
    want[hd:2 * hd] = rope.rope_ref(v[None, None, hd:2 * hd], np.array([p]), inv.astype(np.float64), rot)[0, 0]
    f(v, hd, p, cos, sin, rot)
    close(v, want, what="rope_head")
    np.testing.assert_array_equal(v[:hd], want[:hd])
    np.testing.assert_array_equal(v[hd + rot:], want[hd + rot:])


def test_rope_ref_is_rotate_half():
    """The reference itself: rotate-half convention, position 0 is the identity, norms kept."""
    x = rnd(3, 2, 16, seed=21).astype(np.float64)
    inv = inv_freq(16).astype(np.float64)
    y = rope.rope_ref(x, np.array([0, 1, 5]), inv, 16)
    np.testing.assert_allclose(y[0], x[0], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    c, s = np.cos(5 * inv[0]), np.sin(5 * inv[0])
    np.testing.assert_allclose(y[2, 0, 0], x[2, 0, 0] * c - x[2, 0, 8] * s, rtol=1e-5)
    np.testing.assert_allclose(y[2, 0, 8], x[2, 0, 8] * c + x[2, 0, 0] * s, rtol=1e-5)


# ---- kv store + attention ----------------------------------------------------------------------
@pytest.mark.parametrize("H,Hkv,hd,M,pos0,window", [
    (4, 4, 8, 1, 0, 0), (4, 2, 32, 5, 0, 0), (4, 2, 32, 5, 11, 0), (8, 2, 64, 1, 20, 0),
    (6, 3, 16, 7, 0, 0), (4, 1, 32, 5, 13, 4), (4, 2, 8, 1, 30, 8), (2, 2, 64, 6, 2, 3),
    (4, 4, 32, 9, 0, 1)])
def test_store_kv_and_attention(H, Hkv, hd, M, pos0, window):
    n_ctx = pos0 + M + 5
    rng = np.random.default_rng(H * 100 + M + pos0)
    kc = np.zeros((Hkv, n_ctx, hd), np.float32)
    vc = np.zeros((Hkv, n_ctx, hd), np.float32)
    kc[:, :pos0] = rng.standard_normal((Hkv, pos0, hd))          # earlier positions
    vc[:, :pos0] = rng.standard_normal((Hkv, pos0, hd))
    qkv = rng.standard_normal((M, (H + 2 * Hkv) * hd)).astype(np.float32)
    qkv[:, :H * hd] *= 2.0                                        # peakier softmax
    att.store_kv(qkv, kc, vc, pos0, H, Hkv, hd)
    kn = qkv[:, H * hd:(H + Hkv) * hd].reshape(M, Hkv, hd).transpose(1, 0, 2)
    vn = qkv[:, (H + Hkv) * hd:].reshape(M, Hkv, hd).transpose(1, 0, 2)
    np.testing.assert_array_equal(kc[:, pos0:pos0 + M], kn)
    np.testing.assert_array_equal(vc[:, pos0:pos0 + M], vn)
    assert not kc[:, pos0 + M:].any() and not vc[:, pos0 + M:].any()

    scale = np.float32(1.0 / np.sqrt(hd))
    out = np.full((M, H * hd), np.nan, np.float32)
    sc = np.full((H, kc.shape[1]), np.nan, np.float32)            # scores scratch
    att.attention(qkv, kc, vc, pos0, H, Hkv, hd, scale, window, sc, out)
    want = att.attention_ref(qkv[:, :H * hd].reshape(M, H, hd), kc[:, :pos0 + M], vc[:, :pos0 + M],
                             pos0, scale, window)
    close(out, want.reshape(M, H * hd), what="attention")


def test_attention_ref_window_and_causality():
    """The reference itself: window 1 returns v of the token's own position; a future key
    changes nothing."""
    H, hd, M = 2, 8, 4
    q = rnd(M, H, hd, seed=30)
    k, v = rnd(1, M + 2, hd, seed=31), rnd(1, M + 2, hd, seed=32)
    out = att.attention_ref(q, k, v, 2, 0.3, window=1)
    for m in range(M):
        np.testing.assert_allclose(out[m, 0], v[0, 2 + m], rtol=1e-6)
    k2 = k.copy()
    k2[0, -1] += 5.0
    np.testing.assert_allclose(att.attention_ref(q[:3], k, v, 2, 0.3), att.attention_ref(q[:3], k2, v, 2, 0.3))


@pytest.mark.parametrize("H,Hkv,hd,rot,p,window,qk", [
    (4, 2, 32, 32, 0, 0, False), (4, 2, 32, 32, 13, 0, True), (8, 2, 64, 16, 40, 0, False),
    (6, 6, 8, 8, 9, 4, False), (4, 1, 16, 0, 7, 0, False), (2, 2, 64, 32, 20, 5, True),
    (9, 3, 64, 64, 200, 0, False), (4, 2, 16, 16, 130, 70, True), (3, 1, 8, 8, 64, 0, False)])
def test_decode_attention(H, Hkv, hd, rot, p, window, qk):
    """prep_decode (q/k norm, RoPE, cache write at row p) and decode_attention (+ all heads,
    positions split across threads when there are >= 64 of them) for one token vs the references."""
    prep, dec = need(att, "prep_decode"), need(att, "decode_attention")
    n_ctx = p + 4
    rng = np.random.default_rng(p + hd)
    kc0 = np.zeros((Hkv, n_ctx, hd), np.float32)
    vc0 = np.zeros((Hkv, n_ctx, hd), np.float32)
    kc0[:, :p] = rng.standard_normal((Hkv, p, hd))
    vc0[:, :p] = rng.standard_normal((Hkv, p, hd))
    qkv0 = (2 * rng.standard_normal((H + 2 * Hkv) * hd)).astype(np.float32)
    qn = rnd(hd, seed=50) if qk else NONE
    kn = rnd(hd, seed=51) if qk else NONE
    inv = inv_freq(max(rot, 2))
    cos, sin = rope.rope_tables(inv, n_ctx)
    eps = 1e-6
    # reference: norm, rope, then attention over rows 0..p
    want = qkv0[None].copy()
    if qk:
        want = _qk_norm_ref(want, qn, kn, H, Hkv, hd, eps)
    if rot:
        heads = want[:, :(H + Hkv) * hd].reshape(1, H + Hkv, hd)
        want[:, :(H + Hkv) * hd] = rope.rope_ref(heads, np.array([p]), inv.astype(np.float64), rot).reshape(1, -1)
    want = want[0]
    k_new = want[H * hd:(H + Hkv) * hd].reshape(Hkv, hd)
    v_new = want[(H + Hkv) * hd:].reshape(Hkv, hd)
    kref, vref = kc0.copy(), vc0.copy()
    kref[:, p], vref[:, p] = k_new, v_new
    scale = 1.0 / np.sqrt(hd)
    out_want = att.attention_ref(want[:H * hd].reshape(1, H, hd), kref[:, :p + 1], vref[:, :p + 1],
                                 p, scale, window).reshape(-1)

    qkv, kc, vc = qkv0.copy(), kc0.copy(), vc0.copy()
    prep(qkv, kc, vc, p, cos, sin, qn, kn, H, Hkv, hd, rot, eps)
    close(qkv, want, what="prep_decode qkv")
    close(kc, kref, what="prep_decode k cache")
    np.testing.assert_array_equal(vc, vref)

    qkv, kc, vc = qkv0.copy(), kc0.copy(), vc0.copy()
    out = np.full(H * hd, np.nan, np.float32)
    sc = np.full((H, kc.shape[1]), np.nan, np.float32)
    part = np.full((4, H, hd + 2), np.nan, np.float32)
    dec(qkv, kc, vc, p, cos, sin, qn, kn, H, Hkv, hd, rot, eps, np.float32(scale), window, sc, part, out)
    close(out, out_want, what="decode_attention")
    close(kc, kref, what="decode_attention k cache")


def test_attend_head():
    f = need(att, "attend_head")
    hd, p = 16, 9
    q = rnd(3 * hd, seed=52, scale=2.0)
    kc, vc = rnd(2, p + 3, hd, seed=53), rnd(2, p + 3, hd, seed=54)
    out = np.full(2 * hd, np.nan, np.float32)
    sc = np.full(p + 3, np.nan, np.float32)
    f(q, hd, kc, vc, 1, 3, p, hd, np.float32(0.25), sc, out, hd)  # head 1 of q, kv group 1, rows 3..p
    s = kc[1, 3:p + 1].astype(np.float64) @ q[hd:2 * hd] * 0.25
    w = np.exp(s - s.max())
    close(out[hd:], (w / w.sum()) @ vc[1, 3:p + 1], what="attend_head")


# ---- activations -----------------------------------------------------------------------------
@pytest.mark.parametrize("M,F", [(1, 172), (5, 7), (3, 200)])
def test_silu_mul(M, F):
    gu = rnd(M, 2 * F, seed=40, scale=3.0)
    out = np.full((M, F), np.nan, np.float32)
    act.silu_mul(gu, out)
    close(out, act.silu_mul_ref(gu), what="silu_mul")


@pytest.mark.parametrize("M,F", [(1, 172), (5, 7)])
def test_gelu(M, F):
    x = rnd(M, F, seed=41, scale=3.0)
    want = act.gelu_ref(x)
    act.gelu(x)
    close(x, want, what="gelu")


def test_gelu_row_against_float64_erf():
    """gelu_row's float32 erf (ferf) against 0.5 v (1 + erf(v / sqrt 2)) in float64."""
    import math
    x = np.linspace(-9, 9, 20001).astype(np.float32)
    y = x.copy()
    act.gelu_row(y)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])
    assert np.abs(y - want).max() < 2e-6


@pytest.mark.parametrize("row", [act.gelu_row, act.gelu_tanh_row])
def test_gelu_rows_same_bits_however_sliced(row):
    """The executor applies GELU to each matmul task's rows: decode and prefill cut a row at other
    places, so a value must get the same bits in the vector loop and in its scalar remainder."""
    rng = np.random.default_rng(43)
    x = (rng.standard_normal(3001) * rng.choice([0.01, 1.0, 5.0, 100.0], 3001)).astype(np.float32)
    whole = x.copy()
    row(whole)
    for _ in range(100):
        a, b = sorted(rng.integers(0, x.shape[0] + 1, 2))
        z = x.copy()
        row(z[:a])
        row(z[a:b])
        row(z[b:])
        assert np.array_equal(z.view(np.int32), whole.view(np.int32)), (a, b)


@pytest.mark.parametrize("M,F", [(1, 172), (5, 7)])
def test_gelu_tanh(M, F):
    x = rnd(M, F, seed=42, scale=3.0)
    want = act.gelu_tanh_ref(x)
    act.gelu_tanh(x)
    close(x, want, what="gelu_tanh")


@pytest.mark.parametrize("name", ["silu_mul_row", "gelu_row", "gelu_tanh_row"])
def test_row_activations(name):
    f = need(act, name)
    if name == "silu_mul_row":
        gu = rnd(2 * 37, seed=44, scale=3.0)
        out = np.full(37, np.nan, np.float32)
        f(gu, out)
        close(out, act.silu_mul_ref(gu[None])[0], what=name)
    else:
        x = rnd(37, seed=45, scale=3.0)
        want = (act.gelu_ref if name == "gelu_row" else act.gelu_tanh_ref)(x[None])[0]
        f(x)
        close(x, want, what=name)


def test_gelu_refs_differ():
    """erf GELU and tanh GELU are different functions (a swapped table would show up)."""
    x = np.linspace(-4, 4, 101, dtype=np.float32)[None]
    assert np.abs(act.gelu_ref(x) - act.gelu_tanh_ref(x)).max() > 1e-4


def test_fexp_accuracy_and_range():
    """The vectorisable exp used by attention, SwiGLU, gelu_new and softmax: <= 3e-7 relative
    error over the float32 range, clamped (not inf/NaN/0) outside it, exact at 0."""
    x = np.concatenate([np.linspace(-87, 88.3, 200_001), rnd(10_000, seed=46, scale=10.0),
                        [0.0, -1e-30, 1e-30, 88.3, -87.3]]).astype(np.float32)
    out = np.empty_like(x)
    act.fexp_array(x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.abs(out / ref - 1).max() < 3e-7
    assert out[np.argmax(x == 0)] == 1.0
    big = np.array([100.0, 1e30, -100.0, -1e30], np.float32)
    ob = np.empty_like(big)
    act.fexp_array(big, ob)
    assert np.isfinite(ob).all() and ob[0] > 1e38 and 0 < ob[2] < 2e-38


@pytest.mark.parametrize("V", [1, 7, 512, 32000])
def test_softmax(V):
    x = rnd(V, seed=43, scale=5.0)
    out = np.zeros(V, np.float32)
    act.softmax(x, out)
    close(out, act.softmax_ref(x), what="softmax")
    assert abs(float(out.sum(dtype=np.float64)) - 1.0) < 1e-5


def test_softmax_neg_inf_and_large():
    x = np.array([1000.0, -np.inf, 999.0, -np.inf], np.float32)
    out = np.zeros(4, np.float32)
    act.softmax(x, out)
    assert out[1] == 0.0 and out[3] == 0.0 and np.isfinite(out).all()
    close(out, act.softmax_ref(x), what="softmax large")


# ---- one compiled signature per kernel after a model forward -----------------------------------
SIG_SCRIPT = textwrap.dedent("""
    import json, sys
    import numba, numba.core.registry
    import minilm
    from minilm.kernels import matmul, norm, attention, rope, activations, executor
    tasks = {}
    for folder in sys.argv[1:]:
        m = minilm.load(folder, n_ctx=64)
        m.logits([1, 5, 9, 13, 20])                              # prefill (M > 1)
        m.generate_ids([1, 5, 9], 4, ignore_eos=True)           # prefill + decode
        m.generate("Once", max_new_tokens=3)
        t = executor._task(numba.typeof(m.net.lowered.fs))      # _task of this plan's step kinds
        tasks["_task " + t.py_func.__qualname__] = t
    sigs = {}
    for mod in (matmul, norm, attention, rope, activations, executor):
        for name, f in list(vars(mod).items()) + (list(tasks.items()) if mod is executor else []):
            if isinstance(f, numba.core.registry.CPUDispatcher):
                # the executor is compiled per fs (formats and step kinds of a plan): one signature per fs
                # (_mm_task / _quant_task too: they compile only when the cache does not hold _task)
                fs_arg = 0 if name.startswith("_task ") else {"run_plan_jit": 2, "_mm_task": 0, "_quant_task": 0}.get(name)
                sigs[name] = [str(s) if fs_arg is None else str(s[:fs_arg] + s[fs_arg + 1:]) + " per fs " + str(s[fs_arg])
                              for s in f.signatures]
    print(json.dumps(sigs))
""")
# kernels of the brief (old names, or their fused replacements) that a forward must compile
# what Python calls: the executor (the row kernels are compiled into it, and when it comes from the
# on-disk cache they are not compiled on their own at all) and the lm head's GEMV
MUST_COMPILE = [("run_plan_jit",), ("gemv_f32",)]


def test_one_signature_per_kernel_after_forward():
    """A fresh process runs prefill, decode and logits on Llama, Qwen3, GPT-2 and NeoX; every
    kernel compiled must have exactly one type signature (no accidental recompiles from
    int/float/array-layout differences between call sites)."""
    folders = [str(shared_path("models", n)) for n in
               ("stories260K", "proxy-qwen3-shakespeare", "proxy-gpt2-shakespeare", "proxy-neox-shakespeare")]
    r = subprocess.run([sys.executable, "-c", SIG_SCRIPT, *folders], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sigs = json.loads(r.stdout.strip().splitlines()[-1])
    for names in MUST_COMPILE:
        assert any(sigs.get(n) for n in names), f"none of {names} was compiled by a forward: {sorted(sigs)}"
    assert any(v for k, v in sigs.items() if k.startswith("_task ")), f"no _task compiled: {sorted(sigs)}"
    for k, s in sigs.items():
        per_fs = [x.split(" per fs ")[1] for x in s if " per fs " in x]
        if per_fs:                  # the executor: one signature per fs (the models' step kinds differ)
            assert len(set(per_fs)) == len(s), f"{k} compiled twice for one fs: {s}"
            assert len({x.split(' per fs ')[0] for x in s}) == 1, f"{k}: other arguments' types differ: {s}"
        else:
            assert len(s) <= 1, f"{k} compiled for {len(s)} signatures: {s}"
