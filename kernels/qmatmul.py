"""Quantized / 16-bit weight formats and their matmul kernels (Numba, CPU).

Weights W are [N, K] (N output rows, K input features, like torch Linear.weight).
Activations are float32.

Formats (in-memory arrays; d arrays are np.float16):
  Q8_0 : qs int8[N, K],       d float16[N, K//32]      value = qs * d          (ggml Q8_0)
  Q4_0 : qs uint8[N, K//2],   d float16[N, K//G]       value = (nib - 8) * d   (ggml Q4_0, G=32/64/128)
         per group of G: byte j holds element j (low nibble) and j+G/2 (high nibble).
  F16  : w float16[N, K]
  BF16 : w uint16[N, K]  (raw bf16 bits)

Public API
  quantize_q8_0_ref(w) / quantize_q8_0(w)            -> (qs, d)
  quantize_q4_0_ref(w, group) / quantize_q4_0(w, group) -> (qs, d)
  dequantize_q8_0_ref(qs, d) / dequantize_q4_0_ref(qs, d) -> f32[N, K]
  gemv_q8_0(x, qs, d, out)   gemv_q4_0(x, qs, d, out)   gemv_f16(x, w, out)   gemv_bf16(x, w, out)
  gemm_q8_0(x, qs, d, out)   gemm_q4_0(x, qs, d, out)   gemm_f16(x, w, out)   gemm_bf16(x, w, out)
  quantize_act_q8(x, xq, xd, xs)  (ggml-style Q8 activation quantizer, also used inside the gemvs)

DESIGN NOTES (measured on the 2-vCPU Xeon, AVX-512 + VNNI; DRAM read ~29 GB/s idle)
  * Pure float formulation (int8 -> f32 convert + FMA, 4 rows share each x load) reached only
    ~10-11 GB/s: the loop is compute-bound (vpmovsxbd + vcvtdq2ps + vfmadd per 8 weights, plus a
    horizontal sum per 32-block), and the two vCPUs behave like one core for ALU throughput.
    Integer formulations written as scalar Numba code either widen to i64 (vpmovsxbq) or end up
    with vpmulld; LLVM never formed vpmaddwd/vpdpbusd from them.
  * Chosen design (ggml-like): the Q8_0/Q4_0 gemvs quantize x once per call to int8 per 32-block
    (xq, scale xd, and xs = 8*xd*sum(xq) for the Q4 offset) and compute each 32-element block with
    an explicit LLVM intrinsic emitted through numba.extending.intrinsic:
        Q8_0: u = |w|, s = sign(w)*x ; vpdpbusd(0, u, s) -> 8 x i32 ; cvt ; fma into 8 f32 lanes
        Q4_0: nibbles (0..15) are already unsigned: vpdpbusd(0, nib, x) ; result - xs handled
              per block in scalar.
    The 8 float lanes per row live in a stack buffer (alloca) that LLVM promotes to ymm registers,
    so there is no horizontal sum per block, only one per row. 4 rows per inner iteration.
    Without AVX512-VNNI the same code uses vpmaddubsw + vpmaddwd (AVX2).
    This matches ggml's numerics (activations rounded to int8 per block; relative dot error
    ~1e-3); results are compared exactly against a numpy model of that in the tests.
  * asm evidence (gemv_q8_0.kernel.inspect_asm): hot loop has vpdpbusd %ymm, vcvtdq2ps %ymm,
    vfmadd231ps %ymm; no vpmovsxbq. (LLVM prefers 256-bit vectors on this CPU, hence ymm.)
    F16/BF16 gemvs: float path; f16 -> f32 via fpext half (vcvtph2ps ymm), bf16 via shift;
    vfmadd231ps ymm.
  * fp16 scales: Numba has no float16 type on CPU, so the thin Python wrappers pass
    d.view(np.uint16) and the kernels convert with an fpext-half intrinsic. Scales are
    applied per block in float32.
  * Prefill GEMM: dequantize chunks of rows to a module-cached f32 scratch with a parallel Numba
    kernel, then matmul.gemm_f32_cols (a register-blocked Numba GEMM) into out[:, n0:n1]:
    numpy's OpenBLAS threads and Numba's OpenMP threads spin against each other on 2 cores.
  * Parallel runtime: with numba's OpenMP layer (libgomp) and its default wait policy a
    prange launch cost ~8 ms on this VM; OMP_WAIT_POLICY=PASSIVE brings it to ~5 us. This module
    sets os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE') at import (effective only if no
    numba parallel kernel has run yet in the process). The engine should set it early too.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llvmlite.binding as _llvm  # noqa: E402
import llvmlite.ir as ir  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from .matmul import gemm_f32_cols as _gemm_f32_cols  # noqa: E402

QK = 32  # activation / Q8_0 block size

_JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)
_PJIT = dict(_JIT, parallel=True)

try:
    _FEATURES = _llvm.get_host_cpu_features()
    _HAS_VNNI = bool(_FEATURES.get("avx512vnni", False)) and bool(_FEATURES.get("avx512vl", False))
except Exception:  # pragma: no cover
    _HAS_VNNI = False


# --------------------------------------------------------------------------------------------
# Reference quantizers (numpy, exact)
# --------------------------------------------------------------------------------------------

def _check_w(w, group):
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if w.shape[1] % group != 0:
        raise ValueError(f"K={w.shape[1]} is not a multiple of the block size {group}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf")
    return w


def quantize_q8_0_ref(w):
    """f32[N,K] -> (qs int8[N,K], d float16[N,K//32]). ggml quantize_row_q8_0_ref."""
    w = _check_w(w, QK)
    N, K = w.shape
    b = w.reshape(N, K // QK, QK)
    amax = np.abs(b).max(axis=2)                           # [N, K//32]
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idd = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    v = b * idd[:, :, None]
    q = np.trunc(v + np.copysign(np.float32(0.5), v))      # roundf: half away from zero
    # (v + 0.5 rounded in float32 matches roundf except for values just below .5; do it exactly)
    q = np.where(np.abs(v - np.trunc(v)) == np.float32(0.5), q, np.round(v))
    return q.astype(np.int8).reshape(N, K), d.astype(np.float16)


def dequantize_q8_0_ref(qs, d):
    N, K = qs.shape
    return (qs.reshape(N, K // QK, QK).astype(np.float32)
            * d.astype(np.float32)[:, :, None]).reshape(N, K)


def quantize_q4_0_ref(w, group=32):
    """f32[N,K] -> (qs uint8[N,K//2], d float16[N,K//group]). ggml quantize_row_q4_0_ref."""
    if group not in (32, 64, 128):
        raise ValueError(f"group must be 32, 64 or 128, got {group}")
    w = _check_w(w, group)
    N, K = w.shape
    G = group
    b = w.reshape(N, K // G, G)
    idx = np.abs(b).argmax(axis=2)                         # first index of the largest |x|
    mx = np.take_along_axis(b, idx[:, :, None], axis=2)[:, :, 0]
    d = (mx / np.float32(-8.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idd = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    v = b * idd[:, :, None] + np.float32(8.5)              # float32 like ggml
    q = np.minimum(np.int32(15), v.astype(np.int32)).astype(np.uint8)   # (int) truncation
    lo = q[:, :, : G // 2]
    hi = q[:, :, G // 2:]
    qs = (lo | (hi << 4)).astype(np.uint8).reshape(N, K // 2)
    return qs, d.astype(np.float16)


def dequantize_q4_0_ref(qs, d):
    N = qs.shape[0]
    K = qs.shape[1] * 2
    G = K // d.shape[1]
    b = qs.reshape(N, K // G, G // 2)
    lo = (b & 0x0F).astype(np.int32) - 8
    hi = (b >> 4).astype(np.int32) - 8
    q = np.concatenate([lo, hi], axis=2).astype(np.float32)   # [N, K//G, G]
    return (q * d.astype(np.float32)[:, :, None]).reshape(N, K)


# --------------------------------------------------------------------------------------------
# LLVM intrinsics
# --------------------------------------------------------------------------------------------

@intrinsic
def _h2f(typingctx, h):
    """uint16 fp16 bits -> float32 (fpext half; vectorises to vcvtph2ps)."""
    def codegen(ctx, builder, sig, args):
        v = builder.trunc(args[0], ir.IntType(16)) if args[0].type.width != 16 else args[0]
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())
    return types.float32(h), codegen


@intrinsic
def _bf2f(typingctx, h):
    """uint16 bf16 bits -> float32 (zext, shl 16, bitcast)."""
    def codegen(ctx, builder, sig, args):
        v = builder.zext(args[0], ir.IntType(32)) if args[0].type.width < 32 else args[0]
        v = builder.shl(v, ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(h), codegen


@intrinsic
def _stack_f32(typingctx, n):
    """Pointer to n float32 on the stack (n literal). alloca in the entry block of the
    function (the parfor body), promoted to registers by LLVM when accessed whole."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def codegen(ctx, builder, sig, args):
        ptr = cgutils.alloca_once(builder, ir.ArrayType(ir.FloatType(), size))
        return builder.bitcast(ptr, ir.FloatType().as_pointer())
    return types.CPointer(types.float32)(n), codegen


def _elem_ptr(ctx, builder, aty, arr, off, elty):
    data = ctx.make_array(aty)(ctx, builder, arr).data
    p = builder.gep(data, [off])
    return builder.bitcast(p, elty.as_pointer())


_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_V32I8 = ir.VectorType(_I8, 32)
_V16I8 = ir.VectorType(_I8, 16)
_V8I32 = ir.VectorType(_I32, 8)
_V16I16 = ir.VectorType(_I16, 16)
_V8F32 = ir.VectorType(_F32, 8)


def _udot(builder, u, s):
    """u: <32 x i8> unsigned, s: <32 x i8> signed -> <8 x i32> sums of 4 adjacent products."""
    m = builder.module
    if _HAS_VNNI:
        f = cgutils.get_or_insert_function(
            m, ir.FunctionType(_V8I32, [_V8I32, _V8I32, _V8I32]), "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(f, [ir.Constant(_V8I32, None),
                                builder.bitcast(u, _V8I32), builder.bitcast(s, _V8I32)])
    f1 = cgutils.get_or_insert_function(
        m, ir.FunctionType(_V16I16, [_V32I8, _V32I8]), "llvm.x86.avx2.pmadd.ub.sw")
    f2 = cgutils.get_or_insert_function(
        m, ir.FunctionType(_V8I32, [_V16I16, _V16I16]), "llvm.x86.avx2.pmadd.wd")
    p16 = builder.call(f1, [u, s])
    return builder.call(f2, [p16, ir.Constant(_V16I16, [1] * 16)])


def _acc_fma(builder, accp, p32, scale):
    """acc[0:8] += float(p32) * scale   (acc float32* on the stack)."""
    vp = builder.bitcast(accp, _V8F32.as_pointer())
    a = builder.load(vp, align=4)
    f = builder.sitofp(p32, _V8F32)
    sc = builder.insert_element(ir.Constant(_V8F32, None), scale, ir.Constant(_I32, 0))
    sc = builder.shuffle_vector(sc, ir.Constant(_V8F32, None), ir.Constant(_V8I32, [0] * 8))
    prod = builder.fmul(f, sc, flags=["fast"])
    builder.store(builder.fadd(a, prod, flags=["fast"]), vp, align=4)


@intrinsic
def _blk_q8(typingctx, accp, qs, qoff, xq, xoff, scale):
    """acc[0:8] += scale * lanes(dot(qs[qoff:qoff+32] int8, xq[xoff:xoff+32] int8))."""
    def codegen(ctx, builder, sig, args):
        accp_, qs_, qoff_, xq_, xoff_, scale_ = args
        w = builder.load(_elem_ptr(ctx, builder, sig.args[1], qs_, qoff_, _V32I8), align=1)
        x = builder.load(_elem_ptr(ctx, builder, sig.args[3], xq_, xoff_, _V32I8), align=1)
        zero = ir.Constant(_V32I8, None)
        neg = builder.icmp_signed("<", w, zero)
        u = builder.select(neg, builder.sub(zero, w), w)            # |w|
        s = builder.select(neg, builder.sub(zero, x), x)            # sign(w) * x
        _acc_fma(builder, accp_, _udot(builder, u, s), scale_)
        return ir.Constant(ir.IntType(8), 0)
    return types.int8(accp, qs, qoff, xq, xoff, scale), codegen


@intrinsic
def _blk_q4_32(typingctx, accp, qs, qoff, xq, xoff, scale):
    """G=32 block: 16 bytes at qs[qoff]; low nibbles = elements 0..15, high = 16..31.
    acc[0:8] += scale * lanes(dot(nibbles (0..15), xq[xoff:xoff+32]))."""
    def codegen(ctx, builder, sig, args):
        accp_, qs_, qoff_, xq_, xoff_, scale_ = args
        b = builder.load(_elem_ptr(ctx, builder, sig.args[1], qs_, qoff_, _V16I8), align=1)
        lo = builder.and_(b, ir.Constant(_V16I8, [15] * 16))
        hi = builder.lshr(b, ir.Constant(_V16I8, [4] * 16))
        u = builder.shuffle_vector(lo, hi, ir.Constant(_V8I32.__class__(_I32, 32), list(range(32))))
        x = builder.load(_elem_ptr(ctx, builder, sig.args[3], xq_, xoff_, _V32I8), align=1)
        _acc_fma(builder, accp_, _udot(builder, u, x), scale_)
        return ir.Constant(ir.IntType(8), 0)
    return types.int8(accp, qs, qoff, xq, xoff, scale), codegen


@intrinsic
def _blk_q4_wide(typingctx, accp, qs, qoff, hi, xq, xoff, scale):
    """G=64/128 chunk: 32 bytes at qs[qoff]; take the low (hi=0) or high (hi=1) nibbles as 32
    consecutive elements. acc[0:8] += scale * lanes(dot(nibbles, xq[xoff:xoff+32]))."""
    def codegen(ctx, builder, sig, args):
        accp_, qs_, qoff_, hi_, xq_, xoff_, scale_ = args
        b = builder.load(_elem_ptr(ctx, builder, sig.args[1], qs_, qoff_, _V32I8), align=1)
        sh = builder.trunc(builder.mul(hi_, ir.Constant(hi_.type, 4)), _I8)
        shv = builder.insert_element(ir.Constant(_V32I8, None), sh, ir.Constant(_I32, 0))
        shv = builder.shuffle_vector(shv, ir.Constant(_V32I8, None), ir.Constant(ir.VectorType(_I32, 32), [0] * 32))
        u = builder.and_(builder.lshr(b, shv), ir.Constant(_V32I8, [15] * 32))
        x = builder.load(_elem_ptr(ctx, builder, sig.args[4], xq_, xoff_, _V32I8), align=1)
        _acc_fma(builder, accp_, _udot(builder, u, x), scale_)
        return ir.Constant(ir.IntType(8), 0)
    return types.int8(accp, qs, qoff, hi, xq, xoff, scale), codegen


# --------------------------------------------------------------------------------------------
# Fast (Numba) quantizers, bit-identical to the references
# --------------------------------------------------------------------------------------------

@njit(**dict(_PJIT, fastmath=False))
def _quantize_q8_0_kernel(w, qs, d):
    # w f32[N,K], qs int8[N,K] out, d uint16-view-of-f16 is not used: d f32[N,K//32] out
    N, K = w.shape
    nb = K // 32
    for r in prange(N):
        for b in range(nb):
            k0 = b * 32
            amax = np.float32(0.0)
            for i in range(32):
                a = abs(w[r, k0 + i])
                if a > amax:
                    amax = a
            dd = amax / np.float32(127.0)
            idd = np.float32(1.0) / dd if dd != 0 else np.float32(0.0)
            d[r, b] = dd
            for i in range(32):
                v = w[r, k0 + i] * idd
                t = np.float32(np.trunc(v))
                if abs(v - t) == np.float32(0.5):
                    q = t + (np.float32(1.0) if v > 0 else np.float32(-1.0))   # away from zero
                else:
                    q = np.float32(np.round(v))
                qs[r, k0 + i] = np.int8(q)


def quantize_q8_0(w):
    """Fast parallel Q8_0 quantizer; bit-identical to quantize_q8_0_ref."""
    w = _check_w(w, QK)
    N, K = w.shape
    qs = np.empty((N, K), np.int8)
    d = np.empty((N, K // QK), np.float32)
    _quantize_q8_0_kernel(w, qs, d)
    return qs, d.astype(np.float16)


@njit(**dict(_PJIT, fastmath=False))
def _quantize_q4_0_kernel(w, G, qs, d):
    # w f32[N,K], qs uint8[N,K//2] out, d f32[N,K//G] out
    N, K = w.shape
    ng = K // G
    h = G // 2
    for r in prange(N):
        for g in range(ng):
            k0 = g * G
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for i in range(G):
                v = w[r, k0 + i]
                if abs(v) > amax:
                    amax = abs(v)
                    mx = v
            dd = mx / np.float32(-8.0)
            idd = np.float32(1.0) / dd if dd != 0 else np.float32(0.0)
            d[r, g] = dd
            for j in range(h):
                q0 = np.int32(w[r, k0 + j] * idd + np.float32(8.5))
                q1 = np.int32(w[r, k0 + j + h] * idd + np.float32(8.5))
                q0 = min(15, q0)
                q1 = min(15, q1)
                qs[r, (k0 >> 1) + j] = np.uint8(q0 | (q1 << 4))


def quantize_q4_0(w, group=32):
    """Fast parallel Q4_0 quantizer; bit-identical to quantize_q4_0_ref."""
    if group not in (32, 64, 128):
        raise ValueError(f"group must be 32, 64 or 128, got {group}")
    w = _check_w(w, group)
    N, K = w.shape
    qs = np.empty((N, K // 2), np.uint8)
    d = np.empty((N, K // group), np.float32)
    _quantize_q4_0_kernel(w, group, qs, d)
    return qs, d.astype(np.float16)


# --------------------------------------------------------------------------------------------
# Activation quantization (ggml Q8 of x, per 32-block)
# --------------------------------------------------------------------------------------------

@njit(**_JIT)
def quantize_act_q8(x, xq, xd, xs):
    """x f32[K] -> xq int8[K], xd f32[K//32] (scale), xs f32[K//32] (= 8*xd*sum(xq) for Q4_0).
    d = amax/127, q = round(x/d)."""
    nb = x.shape[0] // 32
    for b in range(nb):
        k0 = b * 32
        amax = np.float32(0.0)
        for i in range(32):
            amax = max(amax, abs(x[k0 + i]))
        dd = amax / np.float32(127.0)
        idd = np.float32(1.0) / dd if dd != 0 else np.float32(0.0)
        s = 0
        for i in range(32):
            q = np.int32(np.round(x[k0 + i] * idd))
            xq[k0 + i] = np.int8(q)
            s += q
        xd[b] = dd
        xs[b] = np.float32(8.0) * dd * np.float32(s)


# --------------------------------------------------------------------------------------------
# GEMV kernels (decode). Parallel over groups of 4 rows; 8 f32 lanes per row on the stack.
# --------------------------------------------------------------------------------------------

@njit(**_PJIT)
def _gemv_q8_0_kernel(x, xq, xd, xs, qs, d, out):
    # x f32[K]; scratch xq int8[K], xd f32[K//32], xs f32[K//32]; qs int8[N,K]; d u16[N,K//32]
    N, K = qs.shape
    nb = K // 32
    quantize_act_q8(x, xq, xd, xs)
    ng = (N + 3) // 4
    for g in prange(ng):
        r0 = g * 4
        accp = _stack_f32(32)           # 4 rows x 8 f32 lanes
        acc = numba.carray(accp, 32)
        for i in range(32):
            acc[i] = 0.0
        if r0 + 4 <= N:
            # full group: 4 unrolled rows so the 4 accumulators stay in ymm registers
            a1 = _ptr_add(accp, 8)
            a2 = _ptr_add(accp, 16)
            a3 = _ptr_add(accp, 24)
            o0 = r0 * K
            for b in range(nb):
                dx = xd[b]
                o = b * 32
                _blk_q8(accp, qs, o0 + o, xq, o, _h2f(d[r0, b]) * dx)
                _blk_q8(a1, qs, o0 + K + o, xq, o, _h2f(d[r0 + 1, b]) * dx)
                _blk_q8(a2, qs, o0 + 2 * K + o, xq, o, _h2f(d[r0 + 2, b]) * dx)
                _blk_q8(a3, qs, o0 + 3 * K + o, xq, o, _h2f(d[r0 + 3, b]) * dx)
            nr = 4
        else:
            nr = N - r0
            for rr in range(nr):
                r = r0 + rr
                for b in range(nb):
                    _blk_q8(_ptr_add(accp, rr * 8), qs, r * K + b * 32, xq, b * 32, _h2f(d[r, b]) * xd[b])
        for rr in range(nr):
            s = np.float32(0.0)
            for i in range(8):
                s += acc[rr * 8 + i]
            out[r0 + rr] = s


@njit(**_PJIT)
def _gemv_q4_0_kernel(x, xq, xd, xs, qs, d, out):
    # x f32[K]; scratch xq int8[K], xd f32[K//32], xs f32[K//32]; qs u8[N,K//2]; d u16[N,K//G]
    # row value = sum_blocks dw*dx*dot(nib, xq) - sum_blocks dw*xs   (nib - 8 folded into xs)
    N = qs.shape[0]
    KB = qs.shape[1]           # bytes per row = K//2
    K = KB * 2
    ng_w = d.shape[1]
    G = K // ng_w
    cpg = G // 32              # x blocks per weight group
    half_blocks = G // 64      # x blocks in the low-nibble half of a group (G >= 64)
    nb = K // 32
    quantize_act_q8(x, xq, xd, xs)
    ngr = (N + 3) // 4
    for g in prange(ngr):
        r0 = g * 4
        accp = _stack_f32(32)
        acc = numba.carray(accp, 32)
        for i in range(32):
            acc[i] = 0.0
        c0 = np.float32(0.0)
        c1 = np.float32(0.0)
        c2 = np.float32(0.0)
        c3 = np.float32(0.0)
        if r0 + 4 <= N:
            a1 = _ptr_add(accp, 8)
            a2 = _ptr_add(accp, 16)
            a3 = _ptr_add(accp, 24)
            o0 = r0 * KB
            if G == 32:
                for b in range(nb):
                    dx = xd[b]
                    sx = xs[b]
                    o = b * 16
                    ox = b * 32
                    w0 = _h2f(d[r0, b])
                    w1 = _h2f(d[r0 + 1, b])
                    w2 = _h2f(d[r0 + 2, b])
                    w3 = _h2f(d[r0 + 3, b])
                    _blk_q4_32(accp, qs, o0 + o, xq, ox, w0 * dx)
                    _blk_q4_32(a1, qs, o0 + KB + o, xq, ox, w1 * dx)
                    _blk_q4_32(a2, qs, o0 + 2 * KB + o, xq, ox, w2 * dx)
                    _blk_q4_32(a3, qs, o0 + 3 * KB + o, xq, ox, w3 * dx)
                    c0 += w0 * sx
                    c1 += w1 * sx
                    c2 += w2 * sx
                    c3 += w3 * sx
            else:
                for gw in range(ng_w):
                    w0 = _h2f(d[r0, gw])
                    w1 = _h2f(d[r0 + 1, gw])
                    w2 = _h2f(d[r0 + 2, gw])
                    w3 = _h2f(d[r0 + 3, gw])
                    for c in range(cpg):
                        b = gw * cpg + c                   # x block index
                        hi = 1 if c >= half_blocks else 0
                        o = gw * (G // 2) + (c - hi * half_blocks) * 32   # byte offset in row
                        ox = b * 32
                        dx = xd[b]
                        sx = xs[b]
                        _blk_q4_wide(accp, qs, o0 + o, hi, xq, ox, w0 * dx)
                        _blk_q4_wide(a1, qs, o0 + KB + o, hi, xq, ox, w1 * dx)
                        _blk_q4_wide(a2, qs, o0 + 2 * KB + o, hi, xq, ox, w2 * dx)
                        _blk_q4_wide(a3, qs, o0 + 3 * KB + o, hi, xq, ox, w3 * dx)
                        c0 += w0 * sx
                        c1 += w1 * sx
                        c2 += w2 * sx
                        c3 += w3 * sx
            nr = 4
        else:
            # tail rows (< 4), one at a time; corrections in c0..c2
            nr = N - r0
            for rr in range(nr):
                r = r0 + rr
                ap = _ptr_add(accp, rr * 8)
                cc = np.float32(0.0)
                for b in range(nb):
                    gw = b // cpg
                    c = b - gw * cpg
                    dw = _h2f(d[r, gw])
                    if G == 32:
                        _blk_q4_32(ap, qs, r * KB + b * 16, xq, b * 32, dw * xd[b])
                    else:
                        hi = 1 if c >= half_blocks else 0
                        o = gw * (G // 2) + (c - hi * half_blocks) * 32
                        _blk_q4_wide(ap, qs, r * KB + o, hi, xq, b * 32, dw * xd[b])
                    cc += dw * xs[b]
                if rr == 0:
                    c0 = cc
                elif rr == 1:
                    c1 = cc
                else:
                    c2 = cc
        for rr in range(nr):
            s = np.float32(0.0)
            for i in range(8):
                s += acc[rr * 8 + i]
            if rr == 0:
                s -= c0
            elif rr == 1:
                s -= c1
            elif rr == 2:
                s -= c2
            else:
                s -= c3
            out[r0 + rr] = s


@intrinsic
def _ptr_add(typingctx, p, n):
    def codegen(ctx, builder, sig, args):
        return builder.gep(args[0], [args[1]])
    return p(p, n), codegen


@njit(**_PJIT)
def _gemv_f16_kernel(x, w, out):
    # x f32[K], w u16[N,K] (fp16 bits), out f32[N]
    N, K = w.shape
    ng = (N + 3) // 4
    for g in prange(ng):
        r0 = g * 4
        if r0 + 4 <= N:
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for k in range(K):
                xv = x[k]
                s0 += _h2f(w[r0, k]) * xv
                s1 += _h2f(w[r0 + 1, k]) * xv
                s2 += _h2f(w[r0 + 2, k]) * xv
                s3 += _h2f(w[r0 + 3, k]) * xv
            out[r0] = s0
            out[r0 + 1] = s1
            out[r0 + 2] = s2
            out[r0 + 3] = s3
        else:
            for r in range(r0, N):
                s = np.float32(0.0)
                for k in range(K):
                    s += _h2f(w[r, k]) * x[k]
                out[r] = s


@njit(**_PJIT)
def _gemv_bf16_kernel(x, w, out):
    # x f32[K], w u16[N,K] (bf16 bits), out f32[N]
    N, K = w.shape
    ng = (N + 3) // 4
    for g in prange(ng):
        r0 = g * 4
        if r0 + 4 <= N:
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for k in range(K):
                xv = x[k]
                s0 += _bf2f(w[r0, k]) * xv
                s1 += _bf2f(w[r0 + 1, k]) * xv
                s2 += _bf2f(w[r0 + 2, k]) * xv
                s3 += _bf2f(w[r0 + 3, k]) * xv
            out[r0] = s0
            out[r0 + 1] = s1
            out[r0 + 2] = s2
            out[r0 + 3] = s3
        else:
            for r in range(r0, N):
                s = np.float32(0.0)
                for k in range(K):
                    s += _bf2f(w[r, k]) * x[k]
                out[r] = s


# Activation scratch for the quantized gemvs, cached per K (not shared between Python threads
# calling concurrently with the same K; pass your own via gemv_q8_0(..., scratch=...) then).
_ACT_SCRATCH = {}


def act_scratch(K):
    """(xq int8[K], xd f32[K//32], xs f32[K//32]) scratch for the quantized gemvs."""
    s = _ACT_SCRATCH.get(K)
    if s is None:
        s = (np.empty(K, np.int8), np.empty(K // 32, np.float32), np.empty(K // 32, np.float32))
        _ACT_SCRATCH[K] = s
    return s


def gemv_q8_0(x, qs, d, out, scratch=None):
    """out[N] = W @ x, W Q8_0 (qs int8[N,K], d float16[N,K//32]); x f32[K] contiguous."""
    xq, xd, xs = scratch if scratch is not None else act_scratch(x.shape[0])
    _gemv_q8_0_kernel(x, xq, xd, xs, qs, d.view(np.uint16), out)


def gemv_q4_0(x, qs, d, out, scratch=None):
    """out[N] = W @ x, W Q4_0 (qs uint8[N,K//2], d float16[N,K//G], G=32/64/128)."""
    xq, xd, xs = scratch if scratch is not None else act_scratch(x.shape[0])
    _gemv_q4_0_kernel(x, xq, xd, xs, qs, d.view(np.uint16), out)


def gemv_f16(x, w, out):
    """out[N] = W @ x, W float16[N,K]."""
    _gemv_f16_kernel(x, w.view(np.uint16), out)


gemv_bf16 = _gemv_bf16_kernel   # (x f32[K], w uint16[N,K] bf16 bits, out f32[N]); no wrapper needed

gemv_q8_0.kernel = _gemv_q8_0_kernel
gemv_q4_0.kernel = _gemv_q4_0_kernel
gemv_f16.kernel = _gemv_f16_kernel


# --------------------------------------------------------------------------------------------
# Dequantize-rows kernels (for prefill GEMM): rows [n0, n1) -> tile f32[n1-n0, K]
# --------------------------------------------------------------------------------------------

@njit(**_PJIT)
def _deq_q8_0_rows(qs, d, n0, n1, tile):
    K = qs.shape[1]
    for i in prange(n1 - n0):
        r = n0 + i
        for b in range(K // 32):
            s = _h2f(d[r, b])
            for j in range(32):
                tile[i, b * 32 + j] = np.float32(qs[r, b * 32 + j]) * s


@njit(**_PJIT)
def _deq_q4_0_rows(qs, d, n0, n1, tile):
    KB = qs.shape[1]
    K = KB * 2
    G = K // d.shape[1]
    h = G // 2
    for i in prange(n1 - n0):
        r = n0 + i
        for g in range(d.shape[1]):
            s = _h2f(d[r, g])
            for j in range(h):
                bt = np.int32(qs[r, g * h + j])
                tile[i, g * G + j] = np.float32((bt & 15) - 8) * s
                tile[i, g * G + h + j] = np.float32((bt >> 4) - 8) * s


@njit(**_PJIT)
def _deq_f16_rows(w, n0, n1, tile):
    K = w.shape[1]
    for i in prange(n1 - n0):
        for k in range(K):
            tile[i, k] = _h2f(w[n0 + i, k])


@njit(**_PJIT)
def _deq_bf16_rows(w, n0, n1, tile):
    K = w.shape[1]
    for i in prange(n1 - n0):
        for k in range(K):
            tile[i, k] = _bf2f(w[n0 + i, k])


GEMM_TILE_ROWS = 256
_TILE_SCRATCH = {}


def _tile(K):
    t = _TILE_SCRATCH.get(K)
    if t is None:
        t = np.empty((GEMM_TILE_ROWS, K), np.float32)
        _TILE_SCRATCH[K] = t
    return t


def _gemm_tiled(x, out, N, K, deq):
    # x f32[M,K], out f32[M,N]; deq(n0, n1, tile) fills tile[:n1-n0] with rows n0..n1 of W
    tile = _tile(K)
    for n0 in range(0, N, GEMM_TILE_ROWS):
        n1 = min(N, n0 + GEMM_TILE_ROWS)
        t = tile[: n1 - n0]
        deq(n0, n1, t)
        _gemm_f32_cols(x, t, out, n0)     # Numba GEMM: no BLAS thread pool fighting Numba's


def gemm_q8_0(x, qs, d, out):
    """out[M,N] = x[M,K] @ W.T, W Q8_0."""
    du = d.view(np.uint16)
    _gemm_tiled(x, out, qs.shape[0], qs.shape[1], lambda a, b, t: _deq_q8_0_rows(qs, du, a, b, t))


def gemm_q4_0(x, qs, d, out):
    """out[M,N] = x[M,K] @ W.T, W Q4_0 (G = K // d.shape[1])."""
    du = d.view(np.uint16)
    _gemm_tiled(x, out, qs.shape[0], qs.shape[1] * 2, lambda a, b, t: _deq_q4_0_rows(qs, du, a, b, t))


def gemm_f16(x, w, out):
    """out[M,N] = x[M,K] @ W.T, W float16[N,K]."""
    wu = w.view(np.uint16)
    _gemm_tiled(x, out, w.shape[0], w.shape[1], lambda a, b, t: _deq_f16_rows(wu, a, b, t))


def gemm_bf16(x, w, out):
    """out[M,N] = x[M,K] @ W.T, W uint16[N,K] bf16 bits."""
    _gemm_tiled(x, out, w.shape[0], w.shape[1], lambda a, b, t: _deq_bf16_rows(w, a, b, t))
