"""MLP activations, softmax, and a vectorisable float32 exp.

Numba's `math.exp` / `np.exp` on float32 is a scalar libm call (no SVML in a plain numba
install), about 20 ns each: it dominated decode attention (one exp per head and cached position)
and SwiGLU. `fexp` is the Cephes expf polynomial with a bit-built 2^n, written so that LLVM
inlines and vectorises it inside the callers' loops (vfmadd/vscalef-free: only fma, round,
convert, shift).
"""
import math

import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


_EXP_C = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
          5.0000001201e-1)


@intrinsic
def fexp(typingctx, x):
    """exp(x) for float32 x, max relative error ~2e-7 (Cephes expf); x is clamped to
    [-87.33, 88.37] (so 2^n stays a normal float: exp(-87.33) ~ 1.2e-38, not 0;
    exp(88.37) ~ 2.4e38, not inf). Emitted as inline LLVM IR (a Numba function is not always
    inlined, and a call blocks vectorisation): n = floor(x log2e + 1/2), r = x - n ln2 (Cody-Waite
    in two parts, with no 'reassoc' flag so they are not folded), p(r) the degree-7
    polynomial, times 2^n built in the exponent bits."""
    if not isinstance(x, types.Float):
        return None

    def codegen(ctx, builder, sig, args):
        f32 = ir.FloatType()
        i32 = ir.IntType(32)
        fl = ["nnan", "ninf", "nsz", "contract"]
        v = args[0]
        if v.type != f32:
            v = builder.fptrunc(v, f32)

        def C(c):
            return ir.Constant(f32, c)
        m = builder.module
        fmax = cgutils.get_or_insert_function(m, ir.FunctionType(f32, [f32, f32]), "llvm.maxnum.f32")
        fmin = cgutils.get_or_insert_function(m, ir.FunctionType(f32, [f32, f32]), "llvm.minnum.f32")
        floor = cgutils.get_or_insert_function(m, ir.FunctionType(f32, [f32]), "llvm.floor.f32")
        v = builder.call(fmin, [builder.call(fmax, [v, C(-87.33)]), C(88.37)])
        n = builder.call(floor, [builder.fadd(builder.fmul(v, C(1.44269504), flags=fl), C(0.5), flags=fl)])
        r = builder.fsub(v, builder.fmul(n, C(0.693359375), flags=fl), flags=fl)
        r = builder.fadd(r, builder.fmul(n, C(2.12194440e-4), flags=fl), flags=fl)
        p = C(_EXP_C[0])
        for c in _EXP_C[1:]:
            p = builder.fadd(builder.fmul(p, r, flags=fl), C(c), flags=fl)
        p = builder.fadd(builder.fadd(builder.fmul(p, builder.fmul(r, r, flags=fl), flags=fl), r, flags=fl),
                         C(1.0), flags=fl)
        e = builder.shl(builder.add(builder.fptosi(n, i32), ir.Constant(i32, 127)), ir.Constant(i32, 23))
        res = builder.fmul(p, builder.bitcast(e, f32), flags=fl)
        return res if sig.return_type == types.float32 else builder.fpext(res, ctx.get_value_type(sig.return_type))
    return types.float32(x), codegen


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def fexp_array(x, out):
    """out[i] = fexp(x[i]) (tests and benchmarks)."""
    for i in range(x.shape[0]):
        out[i] = fexp(x[i])


# erf for float32 as a rational function of x^2 (Eigen's / XLA's generic_fast_erf_float): x
# clamped to [-4, 4] (erf is +-1 in float32 beyond), odd numerator over even denominator; max
# absolute error 4.5e-7 against math.erf. Plain arithmetic, so LLVM inlines and vectorises it.
_ERF_A = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_B = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


# No contraction or reciprocal flags: a value computes the same bits in the vector loop and its
# scalar remainder, so any cut of a row into slices (decode's and prefill's matmul tasks apply
# GELU to their own rows) gives the bits of the whole row. "nnan"/"ninf" let the clamp vectorise.
_ELEMENTWISE = {"nnan", "ninf", "nsz"}


@njit(cache=True, inline="always", fastmath=_ELEMENTWISE, nogil=True, error_model="numpy")
def ferf(v):
    """erf(v) for float32 v (see _ERF_A)."""
    x = min(max(v, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = np.float32(_ERF_A[0])
    for a in _ERF_A[1:]:
        p = p * x2 + np.float32(a)
    q = np.float32(_ERF_B[0])
    for b in _ERF_B[1:]:
        q = q * x2 + np.float32(b)
    return x * p / q


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def silu_mul_row(gu, out):
    """SwiGLU of one token. gu: f32[2F] (gate then up), out: f32[F] <- silu(gate) * up."""
    F = out.shape[0]
    for i in range(F):
        g = gu[i]
        out[i] = g / (np.float32(1.0) + fexp(-g)) * gu[F + i]


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def gelu_mul_row(gu, out):
    """GeGLU of one token (Gemma). gu: f32[2F] (gate then up), out: f32[F] <- gelu_tanh(gate) * up."""
    F = out.shape[0]
    c = np.float32(-2.0 * SQRT_2_OVER_PI)
    for i in range(F):
        g = gu[i]
        out[i] = g / (np.float32(1.0) + fexp(c * (g + np.float32(0.044715) * g * g * g))) * gu[F + i]


@njit(cache=True, parallel=True, fastmath=True, nogil=True, error_model="numpy")
def silu_mul(gu, out):
    """SwiGLU. gu: f32[M, 2F] (gate in [:, :F], up in [:, F:]), out: f32[M, F] <- silu(gate) * up."""
    for m in prange(gu.shape[0]):
        silu_mul_row(gu[m], out[m])


@njit(cache=True, fastmath=_ELEMENTWISE, nogil=True, error_model="numpy")
def gelu_row(x):
    """Exact (erf) GELU, in place on f32[F]: 0.5 v (1 + erf(v / sqrt 2)) in float32 with `ferf`,
    which vectorises (math.erf is a scalar libm call, ~3.6 ns a value: 136 us of a Pythia-160M
    decode token, 12 layers x 3072, on one thread). Within 1.4e-6 of the float64 formula."""
    r = np.float32(1.0 / math.sqrt(2.0))
    for i in range(x.shape[0]):
        v = x[i]
        x[i] = np.float32(0.5) * v * (np.float32(1.0) + ferf(v * r))


@njit(cache=True, nogil=True, fastmath=_ELEMENTWISE, error_model="numpy")
def gelu_tanh_row(x):
    """tanh-approximated GELU (GPT-2's gelu_new), in place on f32[F]."""
    # 0.5 v (1 + tanh(u)) == v * sigmoid(2u) == v / (1 + exp(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3)
    c = np.float32(-2.0 * SQRT_2_OVER_PI)
    for i in range(x.shape[0]):
        v = x[i]
        x[i] = v / (np.float32(1.0) + fexp(c * (v + np.float32(0.044715) * v * v * v)))


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
        e = fexp(x[i] - mx) if x[i] > -np.inf else np.float32(0.0)
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
