"""f32 matrix-vector (decode) and matrix-matrix (prefill) products: out = x @ W.T.

W is stored like a torch Linear weight: [N, K] (N outputs, K inputs), float32, C-contiguous.
Quantized formats live in qmatmul.py with the same calling convention.
"""
import numpy as np
from numba import njit, prange

ROWS = 4  # rows per step of the GEMV: each loaded x[k] feeds 4 FMAs


@njit(cache=True, parallel=True, fastmath=True, nogil=True)
def gemv_f32(x, w, out):
    """x: f32[K], w: f32[N, K], out: f32[N] <- w @ x. Parallel over blocks of output rows."""
    N, K = w.shape
    nblk = (N + ROWS - 1) // ROWS
    for b in prange(nblk):
        i0 = b * ROWS
        if i0 + ROWS <= N:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for k in range(K):
                xk = x[k]
                a0 += w[i0, k] * xk
                a1 += w[i0 + 1, k] * xk
                a2 += w[i0 + 2, k] * xk
                a3 += w[i0 + 3, k] * xk
            out[i0] = a0
            out[i0 + 1] = a1
            out[i0 + 2] = a2
            out[i0 + 3] = a3
        else:
            for i in range(i0, N):
                a = np.float32(0.0)
                for k in range(K):
                    a += w[i, k] * x[k]
                out[i] = a


def gemm_f32(x, w, out):
    """x: f32[M, K], w: f32[N, K], out: f32[M, N] <- x @ w.T.

    Prefill is compute-bound: numpy's BLAS (multi-threaded, AVX-512) is the fastest f32 GEMM
    here, so the f32 path hands the whole product to it.
    """
    np.matmul(x, w.T, out=out)


def matmul_ref(x, w):
    """Reference: x @ w.T in float64, returned as float32."""
    return (np.asarray(x, np.float64) @ np.asarray(w, np.float64).T).astype(np.float32)
