"""RMSNorm and LayerNorm over the last axis.

Each norm has a row kernel (serial: decode calls it directly, a parallel launch costs more than
one row of work) and a parallel driver over the rows of a [M, D] array (prefill).
`add_norm*` fuse the residual add with the next norm: x += y; out = norm(x).
"""
import numpy as np
from numba import njit, prange

_J = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")  # numpy: no zero-division checks, which block vectorisation


@njit(**_J)
def norm_row(x, w, b, eps, out):
    """x, out: f32[D]; w: f32[D]; b: f32[D] for LayerNorm, or f32[0] for RMSNorm."""
    D = x.shape[0]
    if b.shape[0] == 0:
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[i] * x[i]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        for i in range(D):
            out[i] = x[i] * r * w[i]
    else:
        s = np.float32(0.0)
        for i in range(D):
            s += x[i]
        mu = s / np.float32(D)
        v = np.float32(0.0)
        for i in range(D):
            d = x[i] - mu
            v += d * d
        r = np.float32(1.0) / np.sqrt(v / np.float32(D) + np.float32(eps))
        for i in range(D):
            out[i] = (x[i] - mu) * r * w[i] + b[i]


@njit(**_J)
def add_norm_row(x, y, w, b, eps, out):
    """x += y (residual), then out = norm(x). All f32[D] (b may be f32[0]: RMSNorm)."""
    for i in range(x.shape[0]):
        x[i] += y[i]
    norm_row(x, w, b, eps, out)


@njit(parallel=True, **_J)
def norm(x, w, b, eps, out):
    """x, out: f32[M, D]. RMSNorm when b is empty, else LayerNorm."""
    for m in prange(x.shape[0]):
        norm_row(x[m], w, b, eps, out[m])


@njit(parallel=True, **_J)
def add_norm(x, y, w, b, eps, out):
    """x, y, out: f32[M, D]: x += y; out = norm(x)."""
    for m in prange(x.shape[0]):
        add_norm_row(x[m], y[m], w, b, eps, out[m])


@njit(**_J)
def head_rmsnorm(v, o, hd, w, eps):
    """In place RMSNorm of v[o:o+hd] with weight w: f32[hd] (Qwen3 q/k norm)."""
    ss = np.float32(0.0)
    for i in range(hd):
        ss += v[o + i] * v[o + i]
    r = np.float32(1.0) / np.sqrt(ss / np.float32(hd) + np.float32(eps))
    for i in range(hd):
        v[o + i] = v[o + i] * r * w[i]


@njit(parallel=True, **_J)
def qk_rmsnorm(qkv, qw, kw, n_heads, n_kv_heads, head_dim, eps):
    """Qwen3 per-head RMSNorm, in place on the q and k heads of qkv: f32[M, (H + 2*Hkv) * hd]."""
    M = qkv.shape[0]
    nh = n_heads + n_kv_heads
    for t in prange(M * nh):
        m = t // nh
        h = t % nh
        head_rmsnorm(qkv[m], h * head_dim, head_dim, qw if h < n_heads else kw, eps)


def rmsnorm_ref(x, w, eps):
    x = np.asarray(x, np.float64)
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def layernorm_ref(x, w, b, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + eps) * w + b).astype(np.float32)
