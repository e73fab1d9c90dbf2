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


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False, inline="always")
def _fma_4tok(accp, w, wo, x, xo, Kx, KIND):
    """The 16-lane accumulators accp[0:64] of one weight row and 4 tokens (rows of x Kx apart)
    += a block of 16 columns: one weight load (and conversion) feeds 4 FMAs."""
    _blk_fma16(accp, w, wo, x, xo, 16, KIND)
    _blk_fma16(_ptr_add(accp, 16), w, wo, x, xo + Kx, 16, KIND)
    _blk_fma16(_ptr_add(accp, 32), w, wo, x, xo + 2 * Kx, 16, KIND)
    _blk_fma16(_ptr_add(accp, 48), w, wo, x, xo + 3 * Kx, 16, KIND)


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False, inline="always")
def gemm_float_groups(x, w, out, KIND, M, g0, g1):
    """Row groups g0..g1-1 (rows 4g..4g+3) of out[:M] = x[:M] @ w.T, x f32[>= M, >= K] C-contiguous
    (addressed as rows Kx apart, as the gemv addresses its x),
    w as in gemv_float_groups. Every (row, token) is computed exactly as gemv_float_groups
    computes it (16 lanes, FMAs in column order, the same masked tail and horizontal sum), so a
    multi-token pass has decode's bits; 4 rows x 4 tokens at a time (16 accumulators in
    registers, each weight block loaded once for 4 tokens), the last M % 4 tokens by the gemv."""
    N, K = w.shape
    Kx = x.shape[1]
    K16 = K // 16 * 16
    for g in range(g0, g1):
        r0 = 4 * g
        m0 = 0
        if r0 + 4 <= N:
            accp = _stack_f32(256)
            acc = numba.carray(accp, 256)
            while m0 + 4 <= M:
                for i in range(256):
                    acc[i] = 0.0
                xo = m0 * Kx
                for k0 in range(0, K16, 16):
                    _fma_4tok(accp, w, r0 * K + k0, x, xo + k0, Kx, KIND)
                    _fma_4tok(_ptr_add(accp, 64), w, (r0 + 1) * K + k0, x, xo + k0, Kx, KIND)
                    _fma_4tok(_ptr_add(accp, 128), w, (r0 + 2) * K + k0, x, xo + k0, Kx, KIND)
                    _fma_4tok(_ptr_add(accp, 192), w, (r0 + 3) * K + k0, x, xo + k0, Kx, KIND)
                for rr in range(4):
                    for t in range(4):
                        if K16 < K:          # the last K % 16 columns: the gemv's masked block
                            _blk_fma16(_ptr_add(accp, 64 * rr + 16 * t), w, (r0 + rr) * K + K16, x,
                                       xo + t * Kx + K16, K - K16, KIND)
                        out[m0 + t, r0 + rr] = _hsum16(accp, 64 * rr + 16 * t)
                m0 += 4
        for m in range(m0, M):
            gemv_float_groups(x[m], w, out[m], KIND, g, g + 1)


@njit(cache=True, parallel=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)
def gemm_float(x, w, out, KIND):
    """out[M, N] = x @ w.T for w f32[N,K] (KIND 0) or fp16/bf16 bits u16[N,K] (KIND 1/2): each row
    of out exactly as gemv_float computes it for that row of x (gemm_float_groups), so the
    logits of a multi-token pass equal decoding its tokens one by one; parallel over groups of
    4 weight rows. A strided x is copied first (the row kernels address x as rows Kx apart)."""
    xc = np.ascontiguousarray(x)
    for g in prange((w.shape[0] + 3) // 4):
        gemm_float_groups(xc, w, out, KIND, xc.shape[0], g, g + 1)


@njit(cache=True, nogil=True, error_model="numpy")
def gemm_f32(x, w, out):
    """x: f32[M, K], w: f32[N, K], out: f32[M, N] <- x @ w.T (several tokens: the lm head over
    the rows of a pass); each row bit-identical to gemv_f32 of it."""
    gemm_float(x, w, out, 0)


def matmul_ref(x, w):
    """Reference: x @ w.T in float64, returned as float32."""
    return (np.asarray(x, np.float64) @ np.asarray(w, np.float64).T).astype(np.float32)
