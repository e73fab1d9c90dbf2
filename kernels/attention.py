"""Causal attention of new tokens over the KV cache, with grouped-query heads.

Cache layout (one layer): k, v: f32[Hkv, n_ctx, hd]. Query head h reads kv head h // (H / Hkv).
Scores go to a caller-provided scratch sc: f32[H, n_ctx] (one row per query head), so nothing is
allocated per call and the loops are contiguous and vectorised.

Prefill uses the parallel kernels (store_kv, attention over M x H). Decode (one token) uses
`decode_attention`, one serial call that does q/k-norm, RoPE, the cache write and all heads:
for short contexts a parallel launch costs more than the work. Long contexts use
`prep_decode` + the parallel `attention`.
"""

import numpy as np
from numba import njit, prange

from .activations import fexp
from .norm import head_rmsnorm
from .rope import rope_head

_J = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")  # numpy: no zero-division checks, which block vectorisation


@njit(**_J)
def attend_head(q, qo, kc, vc, g, start, p, hd, scale, sc, out, oo):
    """out[oo:oo+hd] <- softmax over j in [start, p] of (q[qo:qo+hd] . k[g, j]) * scale, times v[g, j].

    Two passes over a scores row sc: f32[>= p+1] (scratch): the dot products and the weighted
    sum of v rows are plain contiguous loops over hd that LLVM vectorises.
    """
    qh = q[qo:qo + hd]          # 1-D views: LLVM vectorises these loops, not the offset indexing
    oh = out[oo:oo + hd]
    mx = np.float32(-3.0e38)   # not -inf: fastmath lets LLVM assume no infinities
    for j in range(start, p + 1):
        k = kc[g, j]
        s = np.float32(0.0)
        for i in range(hd):
            s += qh[i] * k[i]
        s *= scale
        sc[j] = s
        if s > mx:
            mx = s
    l = np.float32(0.0)
    for j in range(start, p + 1):
        e = fexp(sc[j] - mx)
        sc[j] = e
        l += e
    for i in range(hd):
        oh[i] = 0.0
    for j in range(start, p + 1):
        w = sc[j]
        v = vc[g, j]
        for i in range(hd):
            oh[i] += w * v[i]
    inv = np.float32(1.0) / l
    for i in range(hd):
        oh[i] *= inv


@njit(parallel=True, **_J)
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


@njit(parallel=True, **_J)
def attention(qkv, kc, vc, pos0, n_heads, n_kv_heads, head_dim, scale, window, sc, out):
    """out: f32[M, H * hd] <- softmax(q k^T * scale) v for each new token and query head.

    qkv: f32[M, (H + 2*Hkv) * hd] (only the q part is read); kc, vc: f32[Hkv, n_ctx, hd] already
    holding positions 0..pos0+M-1; sc: f32[H, n_ctx] scratch. Parallel over heads. Token m
    (position p = pos0 + m) sees positions max(0, p - window + 1) .. p (window = 0: all).
    """
    M = qkv.shape[0]
    group = n_heads // n_kv_heads
    for h in prange(n_heads):
        for m in range(M):
            p = pos0 + m
            start = max(0, p - window + 1) if window > 0 else 0
            attend_head(qkv[m], h * head_dim, kc, vc, h // group, start, p, head_dim, scale, sc[h],
                        out[m], h * head_dim)


@njit(**_J)
def prep_decode(qkv, kc, vc, p, cos, sin, qn, kn, n_heads, n_kv_heads, hd, rot, eps):
    """One token: q/k RMSNorm (when qn is non-empty), RoPE (when rot > 0), write k, v at row p.
    qkv: f32[(H + 2*Hkv) * hd]."""
    nh = n_heads + n_kv_heads
    for h in range(nh):
        o = h * hd
        if qn.shape[0] > 0:
            head_rmsnorm(qkv, o, hd, qn if h < n_heads else kn, eps)
        if rot > 0:
            rope_head(qkv, o, p, cos, sin, rot)
    ko = n_heads * hd
    vo = ko + n_kv_heads * hd
    for g in range(n_kv_heads):
        for i in range(hd):
            kc[g, p, i] = qkv[ko + g * hd + i]
            vc[g, p, i] = qkv[vo + g * hd + i]


@njit(**_J)
def decode_attention(qkv, kc, vc, p, cos, sin, qn, kn, n_heads, n_kv_heads, hd, rot, eps, scale, window, sc, out):
    """prep_decode, then attention of all heads, serially. qkv: f32[(H+2Hkv) hd], out: f32[H hd]."""
    prep_decode(qkv, kc, vc, p, cos, sin, qn, kn, n_heads, n_kv_heads, hd, rot, eps)
    group = n_heads // n_kv_heads
    start = max(0, p - window + 1) if window > 0 else 0
    for h in range(n_heads):
        attend_head(qkv, h * hd, kc, vc, h // group, start, p, hd, scale, sc[h], out, h * hd)


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
