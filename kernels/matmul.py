"""f32 matrix-vector (decode) and matrix-matrix (prefill) products: out = x @ W.T.

W is stored like a torch Linear weight: [N, K] (N outputs, K inputs), float32, C-contiguous.
Quantized formats live in qmatmul.py with the same calling convention.
"""
import numba
import numpy as np
from numba import njit, prange

from .simd import _blk_fma16, _hsum16, _prefetch, _ptr_add, _stack_f32


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False, inline="always")
def gemv_float_groups(x, w, out, KIND, g0, g1):
    """Row groups g0..g1-1 (rows 4g..4g+3) of out[N] = w @ x for w f32[N,K] (KIND 0) or fp16/bf16 bits u16[N,K]
    (KIND 1/2): 16 f32 lanes per row in registers, one horizontal sum per row; software prefetch
    of the rows two groups ahead (the hardware prefetcher alone leaves the convert+FMA loop
    waiting on memory)."""
    N, K = w.shape
    K16 = K // 16 * 16
    for g in range(g0, g1):
        r0 = g * 4
        accp = _stack_f32(64)
        acc = numba.carray(accp, 64)
        for i in range(64):
            acc[i] = 0.0
        nr = min(4, N - r0)
        if nr == 4:
            a1 = _ptr_add(accp, 16)
            a2 = _ptr_add(accp, 32)
            a3 = _ptr_add(accp, 48)
            o0 = r0 * K
            PF = o0 + 8 * K
            for k0 in range(0, K16, 16):
                if KIND == 0:
                    for i in range(4):
                        _prefetch(w, PF + 4 * k0 + 16 * i)
                else:
                    _prefetch(w, PF + 4 * k0)
                    _prefetch(w, PF + 4 * k0 + 32)
                _blk_fma16(accp, w, o0 + k0, x, k0, 16, KIND)
                _blk_fma16(a1, w, o0 + K + k0, x, k0, 16, KIND)
                _blk_fma16(a2, w, o0 + 2 * K + k0, x, k0, 16, KIND)
                _blk_fma16(a3, w, o0 + 3 * K + k0, x, k0, 16, KIND)
        else:
            for rr in range(nr):
                ap = _ptr_add(accp, 16 * rr)
                for k0 in range(0, K16, 16):
                    _blk_fma16(ap, w, (r0 + rr) * K + k0, x, k0, 16, KIND)
        for rr in range(nr):
            if K16 < K:                 # the last K % 16 columns: a masked block, no scalar loop
                _blk_fma16(_ptr_add(accp, 16 * rr), w, (r0 + rr) * K + K16, x, K16, K - K16, KIND)
            out[r0 + rr] = _hsum16(accp, rr * 16)


@njit(cache=True, parallel=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)
def gemv_float(x, w, out, KIND):
    """out[N] = w @ x for w f32[N,K] (KIND 0) or fp16/bf16 bits u16[N,K] (KIND 1/2), parallel
    over groups of 4 rows (gemv_float_groups, inlined)."""
    for g in prange((w.shape[0] + 3) // 4):
        gemv_float_groups(x, w, out, KIND, g, g + 1)


@njit(cache=True, nogil=True, error_model="numpy")
def gemv_f32(x, w, out):
    """x: f32[K], w: f32[N, K], out: f32[N] <- w @ x. Parallel over blocks of 4 output rows."""
    gemv_float(x, w, out, 0)


@njit(cache=True, parallel=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)
def gemm_float(x, w, out, KIND):
    """out[M, N] = x @ w.T for w f32[N,K] (KIND 0) or fp16/bf16 bits u16[N,K] (KIND 1/2): each row
    of out exactly as gemv_float computes it for that row of x (the same lanes, the same sum), so
    the logits of a multi-token pass equal decoding its tokens one by one; parallel over groups
    of 4 weight rows, which stay in L1 while the tokens pass."""
    for g in prange((w.shape[0] + 3) // 4):
        for m in range(x.shape[0]):
            gemv_float_groups(x[m], w, out[m], KIND, g, g + 1)


@njit(cache=True, nogil=True, error_model="numpy")
def gemm_f32(x, w, out):
    """x: f32[M, K], w: f32[N, K], out: f32[M, N] <- x @ w.T (several tokens: the lm head over
    the rows of a pass); each row bit-identical to gemv_f32 of it."""
    gemm_float(x, w, out, 0)


@njit(cache=True, parallel=True, fastmath=True, nogil=True, error_model="numpy")
def gemm_f32_cols(x, w, out, n0):
    """out[:, n0:n0+N] <- x @ w.T for x: f32[M, K], w: f32[N, K] (a tile of a bigger W),
    parallel over blocks of 4 weight rows (gemm_f32_block)."""
    for b in prange((w.shape[0] + 3) // 4):
        gemm_f32_block(x, w, out, b * 4, n0)


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy", inline="always")
def gemm_f32_block(x, w, out, i0, n0):
    """Rows i0..i0+3 of w (fewer at the end): out[:M, n0+i0 ..] <- x[:M] @ w[i0:i0+4].T, for
    x: f32[M, >=K] (only the first K = w.shape[1] columns are read), w: f32[N, K].

    Register-blocked 4 weight rows x 4 tokens: 16 accumulators, each loaded x[m, k] and
    w[n, k] feeds 4 FMAs. The 4 weight rows stay in L1 while all M tokens stream past them.
    A Numba kernel rather than numpy's BLAS: BLAS threads and Numba's OpenMP threads spin
    against each other on a 2-core machine, which costs more than BLAS gains.
    """
    M = x.shape[0]
    N, K = w.shape
    if i0 + 4 <= N:
        m0 = 0
        while m0 + 4 <= M:
            a00 = a01 = a02 = a03 = np.float32(0.0)
            a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = np.float32(0.0)
            a30 = a31 = a32 = a33 = np.float32(0.0)
            for k in range(K):
                w0 = w[i0, k]
                w1 = w[i0 + 1, k]
                w2 = w[i0 + 2, k]
                w3 = w[i0 + 3, k]
                x0 = x[m0, k]
                x1 = x[m0 + 1, k]
                x2 = x[m0 + 2, k]
                x3 = x[m0 + 3, k]
                a00 += x0 * w0
                a01 += x0 * w1
                a02 += x0 * w2
                a03 += x0 * w3
                a10 += x1 * w0
                a11 += x1 * w1
                a12 += x1 * w2
                a13 += x1 * w3
                a20 += x2 * w0
                a21 += x2 * w1
                a22 += x2 * w2
                a23 += x2 * w3
                a30 += x3 * w0
                a31 += x3 * w1
                a32 += x3 * w2
                a33 += x3 * w3
            out[m0, n0 + i0] = a00
            out[m0, n0 + i0 + 1] = a01
            out[m0, n0 + i0 + 2] = a02
            out[m0, n0 + i0 + 3] = a03
            out[m0 + 1, n0 + i0] = a10
            out[m0 + 1, n0 + i0 + 1] = a11
            out[m0 + 1, n0 + i0 + 2] = a12
            out[m0 + 1, n0 + i0 + 3] = a13
            out[m0 + 2, n0 + i0] = a20
            out[m0 + 2, n0 + i0 + 1] = a21
            out[m0 + 2, n0 + i0 + 2] = a22
            out[m0 + 2, n0 + i0 + 3] = a23
            out[m0 + 3, n0 + i0] = a30
            out[m0 + 3, n0 + i0 + 1] = a31
            out[m0 + 3, n0 + i0 + 2] = a32
            out[m0 + 3, n0 + i0 + 3] = a33
            m0 += 4
        for m in range(m0, M):
            for i in range(i0, i0 + 4):
                a = np.float32(0.0)
                for k in range(K):
                    a += x[m, k] * w[i, k]
                out[m, n0 + i] = a
    else:
        for i in range(i0, N):
            for m in range(M):
                a = np.float32(0.0)
                for k in range(K):
                    a += x[m, k] * w[i, k]
                out[m, n0 + i] = a


def matmul_ref(x, w):
    """Reference: x @ w.T in float64, returned as float32."""
    return (np.asarray(x, np.float64) @ np.asarray(w, np.float64).T).astype(np.float32)
