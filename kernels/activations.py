"""MLP activations and softmax."""
import math

import numpy as np
from numba import njit, prange

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@njit(cache=True, fastmath=True, nogil=True)
def silu_mul_row(gu, out):
    """SwiGLU of one token. gu: f32[2F] (gate then up), out: f32[F] <- silu(gate) * up."""
    F = out.shape[0]
    for i in range(F):
        g = gu[i]
        out[i] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * gu[F + i]


@njit(cache=True, parallel=True, fastmath=True, nogil=True)
def silu_mul(gu, out):
    """SwiGLU. gu: f32[M, 2F] (gate in [:, :F], up in [:, F:]), out: f32[M, F] <- silu(gate) * up."""
    for m in prange(gu.shape[0]):
        silu_mul_row(gu[m], out[m])


@njit(cache=True, nogil=True)
def gelu_row(x):
    """Exact (erf) GELU, in place on f32[F]."""
    for i in range(x.shape[0]):
        v = x[i]
        x[i] = np.float32(0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))


@njit(cache=True, nogil=True)
def gelu_tanh_row(x):
    """tanh-approximated GELU (GPT-2's gelu_new), in place on f32[F]."""
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        x[i] = np.float32(0.5 * v * (1.0 + math.tanh(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v))))


@njit(cache=True, parallel=True, nogil=True)
def gelu(x):
    """Exact GELU in place on f32[M, F]."""
    for m in prange(x.shape[0]):
        gelu_row(x[m])


@njit(cache=True, parallel=True, nogil=True)
def gelu_tanh(x):
    """gelu_new in place on f32[M, F]."""
    for m in prange(x.shape[0]):
        gelu_tanh_row(x[m])


@njit(cache=True, nogil=True)   # no fastmath: x may hold -inf (masked by top-k), which fastmath assumes away
def softmax(x, out):
    """x, out: f32[V]. Numerically stable softmax (max subtracted); -inf entries give 0."""
    mx = -np.inf
    for i in range(x.shape[0]):
        if x[i] > mx:
            mx = x[i]
    s = 0.0
    for i in range(x.shape[0]):
        e = math.exp(x[i] - mx)
        out[i] = e
        s += e
    inv = 1.0 / s
    for i in range(x.shape[0]):
        out[i] *= inv


def silu_mul_ref(gu):
    gu = np.asarray(gu, np.float64)
    F = gu.shape[1] // 2
    g, u = gu[:, :F], gu[:, F:]
    return (g / (1 + np.exp(-g)) * u).astype(np.float32)


def gelu_ref(x):
    from math import erf
    x = np.asarray(x, np.float64)
    return (0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2)))).astype(np.float32)


def gelu_tanh_ref(x):
    x = np.asarray(x, np.float64)
    return (0.5 * x * (1 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))).astype(np.float32)


def softmax_ref(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return (e / e.sum()).astype(np.float32)
