"""Rotary position embeddings in the rotate-half layout Hugging Face checkpoints use.

For each head, the first `rot` dims are rotated (rot < head_dim: partial rotary, as GPT-NeoX):
    x1 = x[:rot/2], x2 = x[rot/2:rot]
    x1' = x1*cos - x2*sin ;  x2' = x2*cos + x1*sin
cos/sin come from tables [n_pos, rot/2] built once from the config (rope_scaling included).
"""
import numpy as np
from numba import njit, prange

_J = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")  # numpy: no zero-division checks, which block vectorisation


@njit(**_J)
def rope_head(v, o, p, cos, sin, rot):
    """Rotate v[o:o+rot] in place for position p."""
    half = rot // 2
    for i in range(half):
        c = cos[p, i]
        s = sin[p, i]
        x1 = v[o + i]
        x2 = v[o + half + i]
        v[o + i] = x1 * c - x2 * s
        v[o + half + i] = x2 * c + x1 * s


@njit(parallel=True, **_J)
def rope_qk(qkv, pos0, cos, sin, n_heads, n_kv_heads, head_dim, rot):
    """In place on the q and k heads of qkv: f32[M, (H + 2*Hkv) * hd]; token m is at pos0 + m.

    cos, sin: f32[n_pos, rot/2].
    """
    M = qkv.shape[0]
    nh = n_heads + n_kv_heads
    for t in prange(M * nh):
        m = t // nh
        rope_head(qkv[m], (t % nh) * head_dim, pos0 + m, cos, sin, rot)


def rope_tables(inv_freq, n_pos):
    """cos, sin: f32[n_pos, rot/2] for positions 0..n_pos-1 (float32 products, as transformers)."""
    t = np.arange(n_pos, dtype=np.float32)
    f = np.outer(t, inv_freq.astype(np.float32)).astype(np.float32)
    return np.ascontiguousarray(np.cos(f), dtype=np.float32), np.ascontiguousarray(np.sin(f), dtype=np.float32)


def rope_ref(x, positions, inv_freq, rot):
    """Reference on x: [M, n_heads, hd] (any heads), positions: [M]."""
    x = np.asarray(x, np.float64).copy()
    ang = np.outer(positions, inv_freq)[:, None, :]          # [M, 1, rot/2]
    c, s = np.cos(ang), np.sin(ang)
    half = rot // 2
    x1, x2 = x[..., :half].copy(), x[..., half:rot].copy()
    x[..., :half] = x1 * c - x2 * s
    x[..., half:rot] = x2 * c + x1 * s
    return x.astype(np.float32)
