"""Causal attention of new tokens over the KV cache, with grouped-query heads.

Cache layout (one layer): k, v: [Hkv, n_ctx, W], one stored row of hd values per kv head and
position in the cache's storage type (kvrows.py: f32, f16 bits, or q8_0 blocks; the kernels
read and write rows only through its kv_put / kv_dot / kv_wsum, and compute in float32).
Query head h reads kv head h // (H / Hkv).
Scores go to a caller-provided scratch sc: f32[H, n_ctx] (one row per query head), so nothing is
allocated per call and the loops are contiguous and vectorised.

The executor runs every token of a pass, one or many, as `decode_attention` does for one: its
cached positions cut by `decode_splits` (attend_task per split and head), then `merge_parts`, so
a row of a multi-token pass has the bits of decoding that token alone. `attention` (M x H whole
rows, attend_head) is the simple parallel kernel the tests compare with.
"""

import numpy as np
from numba import njit, prange

from .activations import fexp
from .kvrows import kv_dot, kv_put, kv_wsum
from .norm import head_rmsnorm
from .rope import rope_head

_J = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")  # numpy: no zero-division checks, which block vectorisation
_JC = dict(_J, no_cpython_wrapper=True, no_cfunc_wrapper=True)   # called from compiled code only: no wrappers to compile


@njit(**_J)
def _attend(q, qo, kc, vc, g, j0, j1, hd, scale, sc, oh, cap):
    """One query head q[qo:qo+hd] over cache rows j0..j1-1 of kv head g, not normalised:
    oh[:hd] <- sum_j e_j v[g, j] with s_j = (q . k[g, j]) * scale, e_j = exp(s_j - m);
    cap > 0: s_j = cap * tanh(s_j / cap) (Gemma 2's attention soft-cap, a separate pass);
    returns (m, sum_j e_j); an empty range gives 0, (-3e38, 0). sc: f32[>= j1] scratch.
    All loops run from 0 over views (an index from a runtime start gets Numba's negative-index
    wraparound code, which stops LLVM from vectorising the loop)."""
    n = max(0, j1 - j0)
    qh = q[qo:qo + hd]
    s_ = sc[j0:j0 + n]          # [n] scores, then weights
    kg = kc[g, j0:j0 + n]       # [n, W] stored rows
    vg = vc[g, j0:j0 + n]
    mx = np.float32(-3.0e38)    # not -inf: fastmath lets LLVM assume no infinities
    for j in range(n):
        s = kv_dot(qh, kg[j])
        s *= scale
        s_[j] = s
        mx = max(mx, s)
    if cap > 0:                  # tanh is increasing: the capped max is the cap of the max
        for j in range(n):
            s_[j] = cap * np.tanh(s_[j] / cap)
        mx = cap * np.tanh(mx / cap) if n > 0 else mx
    l = np.float32(0.0)
    for j in range(n):
        e = fexp(s_[j] - mx)
        s_[j] = e
        l += e
    kv_wsum(s_, vg, oh[:hd])
    return mx, l


@njit(**_J)
def attend_head(q, qo, kc, vc, g, start, p, hd, scale, sc, out, oo, cap=np.float32(0.0)):
    """out[oo:oo+hd] <- softmax over j in [start, p] of (q[qo:qo+hd] . k[g, j]) * scale, times v[g, j].
    sc: f32[>= p+1] scratch; cap > 0: soft-capped scores (see _attend)."""
    oh = out[oo:oo + hd]
    _, l = _attend(q, qo, kc, vc, g, start, p + 1, hd, scale, sc, oh, cap)
    inv = np.float32(1.0) / l
    for i in range(hd):
        oh[i] *= inv


@njit(parallel=True, **_J)
def store_kv(qkv, kc, vc, pos0, n_heads, n_kv_heads, head_dim):
    """Store the k and v heads of qkv: f32[M, (H + 2*Hkv) * hd] into cache rows pos0..pos0+M-1."""
    M = qkv.shape[0]
    ko = n_heads * head_dim
    vo = ko + n_kv_heads * head_dim
    for t in prange(M * n_kv_heads):
        m = t // n_kv_heads
        g = t % n_kv_heads
        kv_put(kc[g, pos0 + m], qkv[m, ko + g * head_dim:ko + (g + 1) * head_dim])
        kv_put(vc[g, pos0 + m], qkv[m, vo + g * head_dim:vo + (g + 1) * head_dim])


@njit(parallel=True, **_J)
def attention(qkv, kc, vc, pos0, n_heads, n_kv_heads, head_dim, scale, window, sc, out):
    """out: f32[M, H * hd] <- softmax(q k^T * scale) v for each new token and query head.

    qkv: f32[M, (H + 2*Hkv) * hd] (only the q part is read); kc, vc: [Hkv, n_ctx, W] stored rows
    (kvrows.py) already holding positions 0..pos0+M-1; sc: f32[H, n_ctx] scratch. Parallel over
    heads. Token m (position p = pos0 + m) sees positions max(0, p - window + 1) .. p (window = 0: all).
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
        kv_put(kc[g, p], qkv[ko + g * hd:ko + (g + 1) * hd])
        kv_put(vc[g, p], qkv[vo + g * hd:vo + (g + 1) * hd])


@njit(**_JC)
def attend_part(q, qo, kc, vc, g, j0, j1, hd, scale, sc, part, cap):
    """A flash-decoding split of one query head over rows j0..j1-1: part[:hd] <- sum_j e_j v_j,
    part[hd] <- max_j s_j, part[hd+1] <- sum_j e_j (see _attend)."""
    mx, l = _attend(q, qo, kc, vc, g, j0, j1, hd, scale, sc, part[:hd], cap)
    part[hd] = mx
    part[hd + 1] = l


@njit(parallel=True, **_J)
def decode_attention(qkv, kc, vc, p, cos, sin, qn, kn, n_heads, n_kv_heads, hd, rot, eps, scale, window, sc,
                     part, out):
    """One new token at position p: prep_decode (q/k norm, RoPE, cache write), then attention of
    all heads over rows start..p, split by position across the threads (flash-decoding: each
    split keeps its own max and sum, merged at the end), so any number of heads and any context
    length keep both cores busy. qkv: f32[(H+2Hkv) hd]; sc: f32[H, n_ctx] scratch; part:
    f32[S, H, hd + 2] scratch, S = the number of threads; out: f32[H hd]."""
    prep_decode(qkv, kc, vc, p, cos, sin, qn, kn, n_heads, n_kv_heads, hd, rot, eps)
    _, ns, _ = decode_splits(p, window, part.shape[0])
    for t in prange(ns * n_heads):
        attend_task(qkv, kc, vc, p, window, n_heads, n_kv_heads, hd, scale, sc[t % n_heads], part, t)
    merge_parts(part, ns, n_heads, hd, out)


@njit(**_JC)
def decode_splits(p, window, S):
    """(start, ns, chunk): the token at p attends rows start..p, cut into ns <= S splits of
    chunk rows (>= 32 rows each). Every pass (decode, prefill, a verify pass of several tokens)
    splits a token's rows this way, so a token's attention has the same bits in all of them."""
    start = max(0, p - window + 1) if window > 0 else 0
    T = p + 1 - start
    ns = max(1, min(S, T // 32))
    return start, ns, (T + ns - 1) // ns


@njit(**_JC)
def attend_task(q, kc, vc, p, window, n_heads, n_kv_heads, hd, scale, sc, part, t, cap=np.float32(0.0)):
    """Task t of S * H for the token at position p (query q: f32[>= H hd]): split t // H of
    query head t % H (attend_part into part[split, head]; part: f32[S, H, hd + 2]), nothing for
    a split past the token's ns (decode_splits). sc: f32[>= p + 1] scratch of this task only."""
    sp = t // n_heads
    h = t % n_heads
    start, ns, chunk = decode_splits(p, window, part.shape[0])
    if sp >= ns:
        return
    j0 = start + sp * chunk
    j1 = min(p + 1, j0 + chunk)
    attend_part(q, h * hd, kc, vc, h // (n_heads // n_kv_heads), j0, j1, hd, scale, sc, part[sp, h], cap)


@njit(**_JC)
def merge_parts(part, ns, n_heads, hd, out):
    """out: f32[H hd] <- the softmax-weighted sums of ns flash-decoding splits part[:ns]
    (each: sum of e*v, max, sum of e), rescaled to the common max."""
    for h in range(n_heads):
        m = np.float32(-3.0e38)
        for sp in range(ns):
            m = max(m, part[sp, h, hd])
        l = np.float32(0.0)
        oh = out[h * hd:(h + 1) * hd]
        for i in range(hd):
            oh[i] = 0.0
        for sp in range(ns):
            f = fexp(part[sp, h, hd] - m)
            l += f * part[sp, h, hd + 1]
            ph = part[sp, h]
            for i in range(hd):
                oh[i] += f * ph[i]
        inv = np.float32(1.0) / l
        for i in range(hd):
            oh[i] *= inv


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
