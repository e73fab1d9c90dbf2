"""RMSNorm and LayerNorm over the last axis of a 2-D array [M, D]."""
import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath=True, nogil=True)
def rmsnorm(x, w, eps, out):
    """x: f32[M, D], w: f32[D], out: f32[M, D] <- x / sqrt(mean(x^2) + eps) * w."""
    M, D = x.shape
    for m in prange(M):
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[m, i] * x[m, i]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        for i in range(D):
            out[m, i] = x[m, i] * r * w[i]


@njit(cache=True, parallel=True, fastmath=True, nogil=True)
def layernorm(x, w, b, eps, out):
    """x: f32[M, D], w, b: f32[D], out: f32[M, D] <- (x - mean) / sqrt(var + eps) * w + b."""
    M, D = x.shape
    for m in prange(M):
        s = np.float32(0.0)
        for i in range(D):
            s += x[m, i]
        mu = s / np.float32(D)
        v = np.float32(0.0)
        for i in range(D):
            d = x[m, i] - mu
            v += d * d
        r = np.float32(1.0) / np.sqrt(v / np.float32(D) + np.float32(eps))
        for i in range(D):
            out[m, i] = (x[m, i] - mu) * r * w[i] + b[i]


@njit(cache=True, parallel=True, fastmath=True, nogil=True)
def qk_rmsnorm(qkv, qw, kw, n_heads, n_kv_heads, head_dim, eps):
    """Qwen3 per-head RMSNorm, in place on the q and k heads of qkv: f32[M, (H + 2*Hkv) * hd].

    qw, kw: f32[hd]. The v heads (after the k heads) are left alone.
    """
    M = qkv.shape[0]
    nh = n_heads + n_kv_heads
    for t in prange(M * nh):
        m = t // nh
        h = t % nh
        w = qw if h < n_heads else kw
        o = h * head_dim
        ss = np.float32(0.0)
        for i in range(head_dim):
            ss += qkv[m, o + i] * qkv[m, o + i]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(head_dim) + np.float32(eps))
        for i in range(head_dim):
            qkv[m, o + i] = qkv[m, o + i] * r * w[i]


def rmsnorm_ref(x, w, eps):
    x = np.asarray(x, np.float64)
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def layernorm_ref(x, w, b, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + eps) * w + b).astype(np.float32)
