"""Causal attention of new tokens over the KV cache, with grouped-query heads.

Cache layout (one layer): k, v: f32[Hkv, n_ctx, hd]. Query head h reads kv head h // (H / Hkv).
Softmax is computed online (running max and sum, as flash-attention does), so no score buffer
is needed for any prompt length and nothing is allocated per call.
"""
import math

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath=True, nogil=True)
def store_kv(qkv, kc, vc, pos0, n_heads, n_kv_heads, head_dim):
    """Copy the k and v heads of qkv: f32[M, (H + 2*Hkv) * hd] into cache rows pos0..pos0+M-1."""
    M = qkv.shape[0]
    ko = n_heads * head_dim
    vo = ko + n_kv_heads * head_dim
    for t in prange(M * n_kv_heads):
        m = t // n_kv_heads
        g = t % n_kv_heads
        for i in range(head_dim):
            kc[g, pos0 + m, i] = qkv[m, ko + g * head_dim + i]
            vc[g, pos0 + m, i] = qkv[m, vo + g * head_dim + i]


@njit(cache=True, parallel=True, fastmath=True, nogil=True)
def attention(qkv, kc, vc, pos0, n_heads, n_kv_heads, head_dim, scale, window, out):
    """out: f32[M, H * hd] <- softmax(q k^T * scale) v for each new token and query head.

    qkv: f32[M, (H + 2*Hkv) * hd] (only the q part is read); kc, vc: f32[Hkv, n_ctx, hd] already
    holding positions 0..pos0+M-1. Token m (position p = pos0 + m) sees positions
    max(0, p - window + 1) .. p (window = 0: all).
    """
    M = qkv.shape[0]
    group = n_heads // n_kv_heads
    for t in prange(M * n_heads):
        m = t // n_heads
        h = t % n_heads
        g = h // group
        p = pos0 + m
        start = 0
        if window > 0 and p - window + 1 > 0:
            start = p - window + 1
        qo = h * head_dim
        oo = h * head_dim
        for i in range(head_dim):
            out[m, oo + i] = 0.0
        mx = -np.inf
        l = np.float32(0.0)
        for j in range(start, p + 1):
            s = np.float32(0.0)
            for i in range(head_dim):
                s += qkv[m, qo + i] * kc[g, j, i]
            s *= scale
            if s > mx:
                corr = np.float32(math.exp(mx - s))
                l *= corr
                for i in range(head_dim):
                    out[m, oo + i] *= corr
                mx = s
            e = np.float32(math.exp(s - mx))
            l += e
            for i in range(head_dim):
                out[m, oo + i] += e * vc[g, j, i]
        inv = np.float32(1.0) / l
        for i in range(head_dim):
            out[m, oo + i] *= inv


def attention_ref(q, k, v, pos0, scale, window=0):
    """Reference. q: [M, H, hd]; k, v: [Hkv, T, hd] with T >= pos0 + M. Returns [M, H, hd]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    M, H, hd = q.shape
    group = H // k.shape[0]
    out = np.zeros((M, H, hd))
    for m in range(M):
        p = pos0 + m
        lo = max(0, p - window + 1) if window else 0
        for h in range(H):
            s = k[h // group, lo:p + 1] @ q[m, h] * scale
            w = np.exp(s - s.max())
            out[m, h] = (w / w.sum()) @ v[h // group, lo:p + 1]
    return out.astype(np.float32)
