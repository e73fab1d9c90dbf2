"""The KV cache's storage types: the one place that knows how a cached head row is stored.

A cached row holds one position's k (or v) of one kv head: hd values, stored as
    f32    float32[hd]
    f16    uint16[hd]                 fp16 bits (round to nearest even on write)
    q8_0   int8[hd + 2 * nb]          ggml Q8_0 style, nb = ceil(hd / 32) blocks of (up to) 32
                                      values: the int8 values, then each block's fp16 scale d
                                      (amax / 127) as two bytes, little-endian; value = d * q
The attention kernels call only these three helpers on a row; Numba compiles one copy of each
kernel per storage dtype (float32 / uint16 / int8), and the maths around them stays float32:
    kv_put(row, src)        row <- src (f32[hd]) in the row's storage type
    kv_dot(q, row)          sum_i q[i] * value[i]    (q: f32[hd])
    kv_axpy(w, row, out)    out[i] += w * value[i]   (out: f32[hd])
    kv_wsum(w, rows, out)   out[i] = sum_j w[j] * value_j[i], j in order (rows[j] one row each):
                            out zeroed, then kv_axpy of each row in turn, with the same bits
Each placeholder's Python body is the numpy reference of the same operation (the tests compare
the kernels against them).
"""
import numpy as np
from numba import types
from numba.extending import overload, register_jitable

from .simd import _blk_axpy16, _blk_store16, _f2h, _h2f, _stack_f32, _zero16

QK = 32                                   # values per q8_0 block
_OV = dict(fastmath=True, error_model="numpy")


def q8_row_width(hd: int) -> int:
    """Bytes of one q8_0 row of hd values: hd int8 values + one fp16 scale per block of 32."""
    return hd + 2 * ((hd + QK - 1) // QK)


# ---- numpy references (also the Python bodies of the helpers) ----------------------------------
def encode_rows(x: np.ndarray, dtype) -> np.ndarray:
    """x f32[..., hd] -> rows in the storage type of `dtype` (float32, uint16 = f16, int8 = q8_0)."""
    x = np.asarray(x, np.float32)
    dt = np.dtype(dtype)
    if dt == np.float32:
        return x.copy()
    if dt == np.uint16:
        return x.astype(np.float16).view(np.uint16)
    if dt != np.int8:
        raise ValueError(f"KV row dtype {dt}: not a KV storage type (float32, uint16, int8)")
    hd = x.shape[-1]
    nb = (hd + QK - 1) // QK
    out = np.zeros(x.shape[:-1] + (q8_row_width(hd),), np.int8)
    for b in range(nb):
        i0, i1 = b * QK, min(hd, (b + 1) * QK)
        blk = x[..., i0:i1]
        d = np.abs(blk).max(-1) / np.float32(127.0)                        # [...] f32
        inv = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, 1), 0).astype(np.float32)
        q = np.trunc(blk * inv[..., None] + np.copysign(np.float32(0.5), blk))  # round half away from 0
        out[..., i0:i1] = np.clip(q, -127, 127).astype(np.int8)
        out[..., hd + 2 * b:hd + 2 * b + 2] = d.astype(np.float16)[..., None].view(np.int8)
    return out


def decode_rows(rows: np.ndarray, hd: int) -> np.ndarray:
    """Stored rows [..., W] -> their values f32[..., hd]."""
    rows = np.asarray(rows)
    if rows.dtype == np.float32:
        return rows[..., :hd].copy()
    if rows.dtype == np.uint16:
        return rows[..., :hd].view(np.float16).astype(np.float32)
    nb = (hd + QK - 1) // QK
    d = np.ascontiguousarray(rows[..., hd:hd + 2 * nb]).view(np.float16).astype(np.float32)   # [..., nb]
    return rows[..., :hd].astype(np.float32) * np.repeat(d, QK, axis=-1)[..., :hd]


def kv_put(row, src):
    """row <- src f32[hd] stored in row's type (reference)."""
    row[...] = encode_rows(src, row.dtype)


def kv_dot(q, row):
    """sum_i q[i] * value[i] of a stored row (reference)."""
    return np.float32(np.dot(q.astype(np.float64), decode_rows(row, q.shape[0]).astype(np.float64)))


def kv_axpy(w, row, out):
    """out += w * value of a stored row (reference)."""
    out += np.float32(w) * decode_rows(row, out.shape[0])


def kv_wsum(w, rows, out):
    """out <- sum_j w[j] * value of rows[j], accumulated in the order j (reference)."""
    out[...] = 0.0
    for j in range(len(w)):
        kv_axpy(w[j], rows[j], out)


# ---- the compiled helpers ------------------------------------------------------------------------
@register_jitable(**_OV)
def _q8_scale(row, hd, b):
    """fp16 scale of q8_0 block b of a row (two little-endian bytes after the hd values)."""
    lo = np.uint16(np.uint8(row[hd + 2 * b]))
    hi = np.uint16(np.uint8(row[hd + 2 * b + 1]))
    return _h2f(lo | (hi << np.uint16(8)))


@overload(kv_put, jit_options=_OV)
def _kv_put(row, src):
    dt = row.dtype
    if dt == types.float32:
        def put_f32(row, src):
            for i in range(src.shape[0]):
                row[i] = src[i]
        return put_f32
    if dt == types.uint16:
        def put_f16(row, src):
            for i in range(src.shape[0]):
                row[i] = _f2h(src[i])
        return put_f16
    if dt == types.int8:
        def put_q8(row, src):
            hd = src.shape[0]
            for b in range((hd + 31) // 32):
                i0 = b * 32
                i1 = min(hd, i0 + 32)
                amax = np.float32(0.0)
                for i in range(i0, i1):
                    amax = max(amax, abs(src[i]))
                d = amax / np.float32(127.0)
                inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
                for i in range(i0, i1):
                    v = src[i] * inv
                    r = np.float32(int(abs(v) + np.float32(0.5)))          # round half away from 0
                    row[i] = np.int8(min(r, np.float32(127.0)) if v >= 0 else -min(r, np.float32(127.0)))
                h = np.uint16(_f2h(d))
                row[hd + 2 * b] = np.int8(h & np.uint16(0xFF))
                row[hd + 2 * b + 1] = np.int8(h >> np.uint16(8))
        return put_q8
    return None


@overload(kv_dot, jit_options=_OV)
def _kv_dot(q, row):
    dt = row.dtype
    if dt == types.float32:
        def dot_f32(q, row):
            s = np.float32(0.0)
            for i in range(q.shape[0]):
                s += q[i] * row[i]
            return s
        return dot_f32
    if dt == types.uint16:
        def dot_f16(q, row):
            s = np.float32(0.0)
            for i in range(q.shape[0]):
                s += q[i] * _h2f(row[i])
            return s
        return dot_f16
    if dt == types.int8:
        def dot_q8(q, row):
            hd = q.shape[0]
            s = np.float32(0.0)
            for b in range((hd + 31) // 32):
                i0 = b * 32
                n = min(hd - i0, 32)
                qb = q[i0:i0 + n]          # views from 0: no negative-index wraparound in the loop
                rb = row[i0:i0 + n]
                a = np.float32(0.0)
                for i in range(n):
                    a += qb[i] * np.float32(rb[i])
                s += a * _q8_scale(row, hd, b)
            return s
        return dot_q8
    return None


@overload(kv_axpy, jit_options=_OV)
def _kv_axpy(w, row, out):
    dt = row.dtype
    if dt == types.float32:
        def axpy_f32(w, row, out):
            for i in range(out.shape[0]):
                out[i] += w * row[i]
        return axpy_f32
    if dt == types.uint16:
        def axpy_f16(w, row, out):
            for i in range(out.shape[0]):
                out[i] += w * _h2f(row[i])
        return axpy_f16
    if dt == types.int8:
        def axpy_q8(w, row, out):
            hd = out.shape[0]
            for b in range((hd + 31) // 32):
                i0 = b * 32
                n = min(hd - i0, 32)
                wd = w * _q8_scale(row, hd, b)
                ob = out[i0:i0 + n]
                rb = row[i0:i0 + n]
                for i in range(n):
                    ob[i] += wd * np.float32(rb[i])
        return axpy_q8
    return None


@overload(kv_wsum, jit_options=_OV)
def _kv_wsum(w, rows, out):
    """16 values of out at a time, their accumulators in a register over all the rows, each
    value's sum in the order j with kv_axpy's multiply-add: out[i] += w * value[i] over a row at
    a time keeps out in memory, and a 64-byte store each row that the next row's load waits for
    cost as much as the rest of the attention (the vector is stored in two halves, which the
    load cannot take from the store buffer)."""
    dt = rows.dtype
    if dt == types.float32 or dt == types.uint16:
        def wsum(w, rows, out):
            hd = out.shape[0]
            rs = rows.strides[0] // rows.itemsize
            accp = _stack_f32(16)
            for i0 in range(0, hd, 16):
                nv = min(16, hd - i0)
                _zero16(accp)
                for j in range(w.shape[0]):
                    _blk_axpy16(accp, w[j], rows, j * rs + i0, nv)
                _blk_store16(accp, out, i0, nv)
        return wsum
    if dt == types.int8:
        def wsum_q8(w, rows, out):
            hd = out.shape[0]
            rs = rows.strides[0] // rows.itemsize
            accp = _stack_f32(16)
            for i0 in range(0, hd, 16):      # a 16-value chunk lies in one block of 32
                nv = min(16, hd - i0)
                b = i0 // 32
                _zero16(accp)
                for j in range(w.shape[0]):
                    _blk_axpy16(accp, w[j] * _q8_scale(rows[j], hd, b), rows, j * rs + i0, nv)
                _blk_store16(accp, out, i0, nv)
        return wsum_q8
    return None
