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
    (xq, scale xd, and a per-block integer bias xs) and compute 64-byte chunks of 4 rows with
    explicit LLVM IR emitted through numba.extending.intrinsic (_q8_rows, _q4_rows).
  * Q8_0 gemv (zmm): u = w ^ 0x80 (= w + 128 as an unsigned byte) so vpdpbusd(bias, u, xq) needs
    no per-row sign work; the accumulator starts at bias = -128*sum(xq of the block) (one lane
    per block), so the i32 lanes are exactly sum(w*xq). Per row and 64 bytes (2 blocks): vpxor
    with the load folded in, vpdpbusd, vcvtdq2ps, vpermps of the per-block scales, vfmadd into 16
    f32 lanes that stay in a zmm register; one horizontal sum per row. (The first design, |w| and
    sign(w)*x per 32-byte block in ymm with scalar scale handling, ran ~14 instructions per row
    and block and stayed near 10 GB/s per core even from L2.)
  * Q4_0 (zmm), the "il16" layout (repack_q4_0, built at load by Linear.exec_arrays; files keep
    ggml's bytes): rows in groups of 16, per group and 32-weight block 256 bytes = 4 pieces of 64
    bytes, piece p = bytes 4p..4p+3 of the block of each of the 16 rows side by side, then the 16
    rows' fp16 scales of the block side by side (G = 64 / 128 stored as 32-blocks with repeated
    scales). Per block and token: 8 vpdpbusd of an unpacked piece (vpand / vpsrlw+vpand) with a
    broadcast 4-byte activation piece (embedded {1to16} broadcast), two chains, the first seeded
    with the bias -8*sum(xq) (xs/16 of the Q8 activation quantizer, natural order), so the 16 i32
    lanes are the 16 rows' exact sums of (nib-8)*xq; then one vcvtdq2ps, one d_w(16 rows)*d_x
    product and one FMA for 16 rows; no horizontal sums. asm per 1024 weights x 1 token: 70
    instructions against the former 4-row layout's 111 (16 vpdpbusd both); in cache the GEMV took
    0.70-0.82x the former time, an extra token of a tile 0.30-0.38 of a one-token pass (was
    0.53-0.63): benchmarks/README.md, "interleave probe" (the probe's script is in git history,
    commit 6be54ac). The last group's rows past N are zeros at repack and never stored.
    Integer sums equal the former kernel's; the float order differs (per row one sum per block,
    scaled and accumulated in block order), ~2e-7 of |w|.|x|.
  * Software prefetch (prefetcht0, 8 rows ahead for Q8_0 and the float GEMV, 4 KB of the group stream for Q4_0): the quantized loops do enough
    arithmetic per byte that, without it, the hardware prefetcher does not run far enough ahead
    and memory time adds to compute time: from DRAM on 2 threads Q8_0 went from 10.9 to ~18
    GB/s and Q4_0 from 12.6 to ~17-19 GB/s (the f32 GEMV gets ~20; the read probe ~20-22).
  * asm evidence (gemv_q8_0.kernel.inspect_asm): hot loop has vpxorq (mem), vpdpbusd %zmm,
    vcvtdq2ps %zmm, vpermps, vfmadd213ps %zmm, prefetcht0; no vpmovsxbq.
    F16/BF16/F32 gemvs: matmul.gemv_float, 16 f32 lanes per row via simd._blk_fma16 (f16 ->
    f32 by fpext half = vcvtph2ps, bf16 by a shift), with the same prefetch.
  * Without AVX512-VNNI: SIMD = "avx2" (vpmaddubsw + vpmaddwd for Q4_0, whose pair sums fit
    int16; Q8_0's u reaches 255, so it takes the widening path) or "generic" (plain widening
    integer IR that any LLVM target lowers, e.g. aarch64; Q4_0 there: _dot4_lanes, lane-exact,
    NEON widening multiplies, not sdot, see _dot_bcast4). Both are tested (MINILM_SIMD).
  * fp16 scales: Numba has no float16 type on CPU, so the thin Python wrappers pass
    d.view(np.uint16) and the kernels convert with an fpext-half intrinsic. Scales are
    applied per block in float32.
  * Prefill GEMM, Q8_0/Q4_0 (also verify passes and batched decode): every token's activations
    quantized like the gemv's, then tiles of 4 weight rows (Q4_0: one 16-row group) x T tokens
    (T = 4: see "GEMM kernels" below) that load and unpack each 64-byte chunk once for the T tokens,
    the rows reused from L1 across tiles. The GEMV and the tiles are emitted by one function per
    format (_q4_emit, _q8_emit) with explicit FMAs and EXACT-flagged scale products, so every
    (row, token) has the same operations in the same order whatever the tile: each row of a
    GEMM equals the GEMV of that token bit for bit (a multi-token pass gives decode's logits).
    F16/BF16 (and f32): matmul.gemm_float, the gemv's row groups per token, so every row equals
    the gemv of it bit for bit (a multi-token pass gives decode's logits); a Numba kernel, since
    numpy's OpenBLAS threads and Numba's OpenMP threads spin against each other on 2 cores.
  * Parallel runtime: with numba's OpenMP layer (libgomp) and its default wait policy a
    prange launch cost ~8 ms on this VM under load; minilm/__init__.py bounds the spin
    (GOMP_SPINCOUNT) before any kernel runs.
"""



import os  # noqa: E402

import llvmlite.binding as _llvm  # noqa: E402
import llvmlite.ir as ir  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from .matmul import gemm_float as _gemm_float  # noqa: E402
from .matmul import gemv_float as _gemv_float  # noqa: E402
from .simd import (  # noqa: E402,F401
    _F32,
    _I8,
    _I16,
    _I32,
    _V16F32,
    _V16I32,
    EXACT,
    _bf2f,
    _elem_ptr,
    _h2f,
    _hsum16,
    _masked_load,
    _prefetch,
    _ptr_add,
    _splat_idx,
    _stack_f32,
)

QK = 32  # activation / Q8_0 block size

_JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)
_PJIT = dict(_JIT, parallel=True)

try:
    _FEATURES = _llvm.get_host_cpu_features()
except Exception:  # pragma: no cover
    _FEATURES = {}
# Integer dot-product instructions the quantized kernels are built with: "vnni" (AVX512-VNNI
# vpdpbusd), "avx2" (vpmaddubsw/vpmaddwd) or "generic" (widening LLVM IR: any CPU, e.g. aarch64).
# MINILM_SIMD=generic|avx2 forces a lower level (tests; use with a fresh NUMBA_CACHE_DIR, as
# Numba's cache does not know about this switch).
if _FEATURES.get("avx512vnni", False) and _FEATURES.get("avx512bw", False):
    SIMD = "vnni"
elif _FEATURES.get("avx2", False):
    SIMD = "avx2"
else:
    SIMD = "generic"
_FORCE = os.environ.get("MINILM_SIMD", "")
if _FORCE not in ("", "generic", "avx2"):
    raise ValueError(f"MINILM_SIMD={_FORCE!r}: must be 'generic' or 'avx2' (or unset)")
if _FORCE == "generic" or (_FORCE == "avx2" and SIMD == "vnni"):
    SIMD = _FORCE


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

_V32I8 = ir.VectorType(_I8, 32)
_V16I8 = ir.VectorType(_I8, 16)
_V8I32 = ir.VectorType(_I32, 8)
_V16I16 = ir.VectorType(_I16, 16)


def _udot(builder, u, s):
    """AVX2: u <32 x i8> unsigned, s <32 x i8> signed -> <8 x i32> sums of 4 adjacent products
    (vpmaddubsw saturates pairs at int16: callers must keep |u0*s0 + u1*s1| <= 32767)."""
    m = builder.module
    f1 = cgutils.get_or_insert_function(
        m, ir.FunctionType(_V16I16, [_V32I8, _V32I8]), "llvm.x86.avx2.pmadd.ub.sw")
    f2 = cgutils.get_or_insert_function(
        m, ir.FunctionType(_V8I32, [_V16I16, _V16I16]), "llvm.x86.avx2.pmadd.wd")
    p16 = builder.call(f1, [u, s])
    return builder.call(f2, [p16, ir.Constant(_V16I16, [1] * 16)])


_V64I8 = ir.VectorType(_I8, 64)


def _udot512(builder, acc, u, s, wide=False):
    """acc <16 x i32> + sums of 4 adjacent products of u <64 x i8> (unsigned) and s (signed).
    AVX512-VNNI: one vpdpbusd. AVX2: two vpmaddubsw + vpmaddwd halves, exact only while pair
    sums fit int16 (Q4_0: |nib * x| pairs <= 2*15*127); wide=True (Q8_0: u up to 255) and
    other CPUs (e.g. aarch64): plain widening integer IR, which LLVM lowers to the target's
    own instructions (with LLVM >= 22 a partial reduce-add, see _dot4_partial: sdot on ARM CPUs
    with the dot product; each 16-byte group's sum then lies in the group's first lane)."""
    m = builder.module
    if SIMD == "vnni":
        f = cgutils.get_or_insert_function(
            m, ir.FunctionType(_V16I32, [_V16I32] * 3), "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(f, [acc, builder.bitcast(u, _V16I32), builder.bitcast(s, _V16I32)])
    if SIMD == "avx2" and not wide:
        parts = []
        for h in range(2):
            idx = ir.Constant(ir.VectorType(_I32, 32), list(range(32 * h, 32 * h + 32)))
            uh = builder.shuffle_vector(u, ir.Constant(_V64I8, None), idx)
            sh = builder.shuffle_vector(s, ir.Constant(_V64I8, None), idx)
            parts.append(_udot(builder, uh, sh))
        cat = builder.shuffle_vector(parts[0], parts[1], ir.Constant(_V16I32, list(range(16))))
        return builder.add(acc, cat)
    if _PARTIAL_REDUCE:
        return _dot4_partial(builder, acc, u, s)
    return _dot4_lanes(builder, acc, u, s)


def _dot4_lanes(builder, acc, u, s):
    """acc <16 x i32> + per lane L: sum_j u[4L+j] * s[4L+j] (u unsigned, s signed bytes), lane for
    lane in plain widening IR (multiply, then add the 4 products of each lane): any LLVM target
    lowers it (aarch64: smull/smlal widening NEON multiplies plus zip/uzp shuffles, never sdot)."""
    v64 = ir.VectorType(_I32, 64)
    prod = builder.mul(builder.zext(u, v64), builder.sext(s, v64))
    for j in range(4):
        acc = builder.add(acc, _splat_idx(builder, prod, [4 * L + j for L in range(16)]))
    return acc


# The generic path's dot product as llvm.vector.partial.reduce.add (LLVM >= 22; older LLVM keeps
# the shuffle-add form above): AArch64 lowers it to sdot when the CPU has the ARMv8.2 dot product
# (cortex-a76, Pi 5) and to smull + saddw NEON code when it has not (cortex-a72, Pi 4); any other
# target gets a correct expansion. The shuffle-add form became smull + ~40 zip/uzp/trn per 64
# bytes and never sdot. No target intrinsic, so no CPU is ever asked for an instruction it lacks.
_PARTIAL_REDUCE = _llvm.llvm_version_info >= (22,)
_V4I32 = ir.VectorType(_I32, 4)


def _dot4_partial(builder, acc, u, s):
    """acc <16 x i32> + u <64 x i8> (unsigned) . s <64 x i8> (signed) per 16-byte group: lanes
    4g..4g+3 together gain sum(u[16g:16g+16] * s[16g:16g+16]); how that sum is split over the 4
    lanes is the target's choice (sdot: 4 adjacent bytes per lane as vpdpbusd; the NEON fallback:
    bytes i, i+4, i+8, i+12), and LLVM chose differently in the GEMV's and the GEMM's inlined
    copies (cortex-a76: GEMM rows off the GEMV's in the last bits). So each group's exact integer
    sum is moved into lane 4g and lanes 4g+1..4g+3 are 0 before any float work: every caller gives
    the 4 lanes of a group one scale (a group lies in one 32-byte block), and the float step then
    sees the same lanes at every call site.
    sdot multiplies signed bytes, so u goes in as w = u ^ 0x80 = u - 128 (signed) and
    128 * sum(s) is added back: exact for every u in 0..255. For Q8_0 (u = q ^ 0x80) the two xors
    cancel and w is the weight itself; sum(s) depends only on the activations, so LLVM computes it
    once for all rows of a chunk."""
    m = builder.module
    v16 = ir.VectorType(_I32, 16)
    pr = cgutils.get_or_insert_function(m, ir.FunctionType(_V4I32, [_V4I32, v16]),
                                        "llvm.vector.partial.reduce.add.v4i32.v16i32")
    red = cgutils.get_or_insert_function(m, ir.FunctionType(_I32, [_V4I32]), "llvm.vector.reduce.add.v4i32")
    w = builder.xor(u, ir.Constant(_V64I8, [-128] * 64))
    zero4 = ir.Constant(_V4I32, [0] * 4)
    seven = ir.Constant(_V4I32, [7] * 4)
    parts = []
    for g in range(4):
        idx = list(range(16 * g, 16 * g + 16))
        sg = builder.sext(_splat_idx(builder, s, idx), v16)
        wg = builder.sext(_splat_idx(builder, w, idx), v16)
        a = _splat_idx(builder, acc, list(range(4 * g, 4 * g + 4)))
        a = builder.call(pr, [a, builder.mul(wg, sg)])
        a = builder.add(a, builder.shl(builder.call(pr, [zero4, sg]), seven))
        # the group's sum into its first lane, 0 in the other three (exact integer work): how
        # LLVM split it over the 4 lanes may differ between two inlined copies of this kernel
        # (the GEMV's and the GEMM's), and the float step after it (convert, scale, add per
        # lane) would round the two splits differently
        a = builder.insert_element(zero4, builder.call(red, [a]), ir.Constant(_I32, 0))
        parts.append(a)
    lo = builder.shuffle_vector(parts[0], parts[1], ir.Constant(ir.VectorType(_I32, 8), list(range(8))))
    hi = builder.shuffle_vector(parts[2], parts[3], ir.Constant(ir.VectorType(_I32, 8), list(range(8))))
    return builder.shuffle_vector(lo, hi, ir.Constant(v16, list(range(16))))


_V32F32 = ir.VectorType(_F32, 32)
_V32I32 = ir.VectorType(_I32, 32)


@intrinsic
def _blk_amax(typingctx, x, k0):
    """max(|x[k0:k0+32]|) (exact, any order)."""
    def codegen(ctx, builder, sig, args):
        v = builder.load(_elem_ptr(ctx, builder, sig.args[0], args[0], args[1], _V32F32), align=4)
        fa = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32F32, [_V32F32]),
                                            "llvm.fabs.v32f32")
        fm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_V32F32]),
                                            "llvm.vector.reduce.fmax.v32f32")
        return builder.call(fm, [builder.call(fa, [v])])
    return types.float32(x, k0), codegen


@intrinsic
def _blk_quant_store(typingctx, x, k0, idd, xq, ba, bb):
    """q = int32(rint(x[k0+i] * idd)) for i < 32 (== np.int32(np.round(x * idd)) in Numba);
    xq[ba + i] = q[i] (i < 16), xq[bb + i] = q[i] (i >= 16). Returns sum(q)."""
    def codegen(ctx, builder, sig, args):
        x_, k0_, idd_, xq_, ba_, bb_ = args
        v = builder.load(_elem_ptr(ctx, builder, sig.args[0], x_, k0_, _V32F32), align=4)
        sc = builder.insert_element(ir.Constant(_V32F32, None), idd_, ir.Constant(_I32, 0))
        sc = _splat_idx(builder, sc, [0] * 32)
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32F32, [_V32F32]),
                                              "llvm.rint.v32f32")
        q = builder.fptosi(builder.call(rint, [builder.fmul(v, sc)]), _V32I32)
        red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_V32I32]),
                                             "llvm.vector.reduce.add.v32i32")
        tot = builder.call(red, [q])
        q8 = builder.trunc(q, ir.VectorType(_I8, 32))
        lo = _splat_idx(builder, q8, list(range(16)))
        hi = _splat_idx(builder, q8, list(range(16, 32)))
        builder.store(lo, _elem_ptr(ctx, builder, sig.args[3], xq_, ba_, _V16I8), align=1)
        builder.store(hi, _elem_ptr(ctx, builder, sig.args[3], xq_,
                                    builder.add(bb_, ir.Constant(bb_.type, 16)), _V16I8), align=1)
        return tot
    return types.int32(x, k0, idd, xq, ba, bb), codegen


def _fma(builder, a, b, c):
    """a * b + c with one rounding (llvm.fma): an explicit FMA, so the result does not depend on
    whether LLVM contracts an fmul + fadd where the kernel is inlined (GEMV and GEMM call sites
    must give the same bits)."""
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3),
                                       f"llvm.fma.v{a.type.count}f32")
    return builder.call(f, [a, b, c])


def _row_base(ctx, builder, aty, arr, m, elty):
    """Pointer (elty*) to the start of row m of a 2-D array, or to the data of a 1-D array (m None):
    the activations of token m of a GEMM tile, or the GEMV's one token."""
    a = ctx.make_array(aty)(ctx, builder, arr)
    p = a.data
    if m is not None:
        stride = cgutils.unpack_tuple(builder, a.strides, 2)[0]
        m = builder.sext(m, stride.type) if m.type.width < stride.type.width else m
        p = builder.gep(builder.bitcast(p, _I8.as_pointer()), [builder.mul(m, stride)])
    return builder.bitcast(p, elty.as_pointer())


def _tokens(ctx, builder, sig, args, ixq, m0, ntok):
    """(xq i8*, xd f32*, xs f32*) of each token of a tile: args ixq, ixq+1, ixq+2 are the
    activation arrays (1-D for the GEMV: ntok == 1, m0 None; 2-D [M, K] for the GEMM: rows
    m0 .. m0+ntok-1)."""
    toks = []
    for j in range(ntok):
        m = None if m0 is None else builder.add(m0, ir.Constant(m0.type, j))
        toks.append(tuple(_row_base(ctx, builder, sig.args[ixq + i], args[ixq + i], m, ty)
                          for i, ty in enumerate((_I8, _F32, _F32))))
    return toks


# Q4_0 in the executor's layout "il16" (repack_q4_0): rows in groups of Q4_R = 16; per group and
# 32-weight block, 256 bytes = 4 pieces of 64 bytes, piece p = bytes 4p..4p+3 of the block's 16
# bytes for each of the 16 rows side by side (row r at bytes 4r..4r+3); low nibbles of piece p are
# elements 4p..4p+3 of each row, high nibbles 16+4p..16+4p+3 (ggml's G = 32 byte order inside a
# block). Scales: the 16 rows' fp16 d of the block side by side (32 bytes). G = 64 / 128 matrices
# are stored as G = 32 blocks (nibbles reordered, each group's scale repeated per block: the same
# values, 4.5 instead of 4.25 / 4.125 bits per weight in memory); the file keeps ggml's bytes.
# One vpdpbusd of an unpacked piece with a broadcast 4-byte activation piece gives the 16 rows'
# partial sums in the 16 i32 lanes, so after 8 of them (two chains, the first seeded with the bias
# -8 * sum(xq of the block)) the lanes are the 16 rows' exact sums of (nib - 8) * xq; then one
# convert, one d_w(16 rows) * d_x product and one FMA serve 16 rows. No horizontal sums.
Q4_R = 16


def _dot_bcast4(builder, acc, u, xw):
    """acc <16 x i32> + per lane L: sum_j u[4L+j] * byte j of xw (u <64 x i8> unsigned nibbles,
    xw i32: 4 signed activation bytes, the same for every lane). Lane-exact on every path (each
    lane is one row of the il16 layout): vpdpbusd (VNNI); vpmaddubsw + vpmaddwd (AVX2: pairs of
    nibble * int8 products fit int16); elsewhere (aarch64 ...) _dot4_lanes."""
    s = builder.insert_element(ir.Constant(_V16I32, None), xw, ir.Constant(_I32, 0))
    s = builder.bitcast(_splat_idx(builder, s, [0] * 16), _V64I8)
    if SIMD == "vnni" or SIMD == "avx2":
        return _udot512(builder, acc, u, s)
    # not _udot512's partial reduce (sdot on ARM CPUs with the dot product): which products land
    # in which lane is the target's choice there, and here every lane is a row
    return _dot4_lanes(builder, acc, u, s)


def _q4_emit(builder, accp, qp, qoff, dp, doff, toks, b, nblk):
    """Blocks b .. b+nblk-1 of one 16-row il16 group (bytes from qp + qoff, scales from dp + doff,
    both at block b) against each token of toks ((xq i8*, xd f32*, xs f32*) from _quantize_act_q8v,
    xs = -128 * sum(xq)): acc[16j : 16j+16] of token j holds the 16 rows:
      acc = fma(f32(bias + sum_p dot(lo_p, x[32b+4p:]) + sum_p dot(hi_p, x[32b+16+4p:])), d_w * d_x, acc)
    Each block is loaded and unpacked once for all tokens; every (row, token) gets the same
    operations in the same order whatever the number of tokens (explicit FMA, product flagged
    EXACT), so a GEMM tile gives the GEMV's bits."""
    i64 = qoff.type
    b64 = builder.sext(b, i64) if b.type.width < 64 else b
    m15 = ir.Constant(_V64I8, [15] * 64)
    m4 = ir.Constant(_V64I8, [4] * 64)
    aps = [builder.bitcast(builder.gep(accp, [ir.Constant(_I32, 16 * j)]), _V16F32.as_pointer())
           for j in range(len(toks))]
    for i in range(nblk):
        bi = builder.add(b64, ir.Constant(i64, i))
        dh = builder.load(builder.bitcast(builder.gep(dp, [builder.add(doff, ir.Constant(i64, 16 * i))]),
                                          ir.VectorType(_I16, 16).as_pointer()), align=2)
        dw = builder.fpext(builder.bitcast(dh, ir.VectorType(ir.HalfType(), 16)), _V16F32)
        los, his = [], []
        for p in range(4):
            v = builder.load(builder.bitcast(builder.gep(qp, [builder.add(qoff, ir.Constant(i64, 256 * i + 64 * p))]),
                                             _V64I8.as_pointer()), align=1)
            los.append(builder.and_(v, m15))
            his.append(builder.and_(builder.lshr(v, m4), m15))
        for j, (xqp, xdp, xsp) in enumerate(toks):
            xb = builder.bitcast(builder.gep(xqp, [builder.mul(bi, ir.Constant(i64, 32))]), _I32.as_pointer())
            bias = builder.ashr(builder.fptosi(builder.load(builder.gep(xsp, [bi])), _I32), ir.Constant(_I32, 4))
            bias = builder.insert_element(ir.Constant(_V16I32, None), bias, ir.Constant(_I32, 0))
            ia = _splat_idx(builder, bias, [0] * 16)                 # -8 * sum(xq): exact
            ib = ir.Constant(_V16I32, [0] * 16)
            for p in range(4):                                       # two independent chains
                ia = _dot_bcast4(builder, ia, los[p], builder.load(builder.gep(xb, [ir.Constant(i64, p)]), align=1))
                ib = _dot_bcast4(builder, ib, his[p], builder.load(builder.gep(xb, [ir.Constant(i64, 4 + p)]), align=1))
            xd = builder.insert_element(ir.Constant(_V16F32, None), builder.load(builder.gep(xdp, [bi])),
                                        ir.Constant(_I32, 0))
            sc = builder.fmul(dw, _splat_idx(builder, xd, [0] * 16), flags=EXACT)
            a = builder.load(aps[j], align=4)
            a = _fma(builder, builder.sitofp(builder.add(ia, ib), _V16F32), sc, a)
            builder.store(a, aps[j], align=4)


def _lit(*a):
    return all(isinstance(x, types.IntegerLiteral) for x in a)


@intrinsic
def _q4_rows(typingctx, accp, qs, qoff, d, doff, xq, xd, xs, b, NB):
    """The Q4_0 GEMV's step (see _q4_emit): blocks b .. b+NB-1 of a 16-row group whose bytes start
    at qoff of qs and whose scales start at doff of d, one token (xq/xd/xs 1-D); acc[0:16]."""
    if not _lit(NB):
        return None
    nblk = NB.literal_value

    def codegen(ctx, builder, sig, args):
        toks = _tokens(ctx, builder, sig, args, 5, None, 1)
        _q4_emit(builder, args[0], _row_base(ctx, builder, sig.args[1], args[1], None, _I8), args[2],
                 _row_base(ctx, builder, sig.args[3], args[3], None, _I16), args[4], toks, args[8], nblk)
        return ir.Constant(_I8, 0)
    return types.int8(accp, qs, qoff, d, doff, xq, xd, xs, b, NB), codegen


@intrinsic
def _q4_tile(typingctx, accp, qs, qoff, d, doff, XQ, XD, XS, m0, b, T):
    """The Q4_0 GEMM's step: block b of a 16-row group (as _q4_rows) for the T tokens m0 .. m0+T-1
    of XQ/XD/XS [M, ...]; acc[16j : 16j+16] for token m0 + j. The block is loaded and unpacked
    once for the T tokens."""
    if not _lit(T):
        return None
    ntok = T.literal_value

    def codegen(ctx, builder, sig, args):
        toks = _tokens(ctx, builder, sig, args, 5, args[8], ntok)
        _q4_emit(builder, args[0], _row_base(ctx, builder, sig.args[1], args[1], None, _I8), args[2],
                 _row_base(ctx, builder, sig.args[3], args[3], None, _I16), args[4], toks, args[9], 1)
        return ir.Constant(_I8, 0)
    return types.int8(accp, qs, qoff, d, doff, XQ, XD, XS, m0, b, T), codegen



def _q8_emit(builder, accp, qp, qoff, K, toks, c, dp, doff, nbv, nr, nch):
    """Q8_0 chunks c .. c+nch-1 (64 bytes = 2 blocks of a row each; nbv valid blocks in all,
    nbv == 2*nch unless it is the row's last, partial chunk) of nr rows (bytes from qp + qoff, row
    stride K; fp16 scales from dp + doff, row stride K/32) against each token of toks; lanes of
    token j, row r at accp[16 (j nr + r) : +16]:
        acc += d_w*d_x(lane) * f32(vpdpbusd(bias, w ^ 0x80, xq))
    w ^ 0x80 = w + 128 as an unsigned byte, so the i32 lanes hold sum(w*xq) + 128*sum(xq); the
    accumulator starts at bias = -128 * sum(xq of the block) (xs, one lane per block), so they
    are exactly sum(w*xq). Per row and 64 bytes: load, vpxor, then per token vpdpbusd,
    vcvtdq2ps, vfmadd (and one fp16 scale convert per nch chunks). Lanes 0-7 belong to the
    chunk's first block, 8-15 to its second. Loads past nbv blocks are masked (nothing read past
    a row). As in _q4_emit, each (row, token) gets the same operations for any number of tokens."""
    i64 = qoff.type

    def lit64(v):
        return ir.Constant(i64, v)

    def as64(v):
        return builder.sext(v, i64) if v.type.width < 64 else v
    c64, nbv64, K64 = as64(c), as64(nbv), as64(K)
    nbl = 2 * nch
    boff = builder.mul(c64, lit64(2))
    tokd = []
    for xqp, xdp, xsp in toks:
        xdv = _masked_load(builder, builder.gep(xdp, [boff]), ir.VectorType(_F32, nbl), nbv64, 4)
        xsv = _masked_load(builder, builder.gep(xsp, [boff]), ir.VectorType(_F32, nbl), nbv64, 4)
        bv = builder.fptosi(xsv, ir.VectorType(_I32, nbl))    # exact: |bias| <= 128*32*127
        bz = builder.shuffle_vector(bv, ir.Constant(bv.type, None),
                                    ir.Constant(ir.VectorType(_I32, nbl + 1), list(range(nbl + 1))))
        bz = builder.insert_element(bz, ir.Constant(_I32, 0), ir.Constant(_I32, nbl))
        chunks = []
        for ch in range(nch):
            nbytes = builder.mul(builder.sub(nbv64, lit64(2 * ch)), lit64(32))     # 32 or 64 (or more)
            xo = builder.mul(builder.add(c64, lit64(ch)), lit64(64))
            xv = _masked_load(builder, builder.gep(xqp, [xo]), _V64I8, nbytes, 1)
            seed = _splat_idx(builder, bz, [2 * ch if L == 0 else (2 * ch + 1 if L == 8 else nbl)
                                            for L in range(16)])
            xdl = _splat_idx(builder, xdv, [2 * ch] * 8 + [2 * ch + 1] * 8)     # d_x per lane
            chunks.append((xv, seed, xdl))
        tokd.append((xdv, chunks))
    flip = ir.Constant(_V64I8, [-128] * 64)
    nbr = builder.udiv(K64, lit64(32))
    for r in range(nr):
        do = builder.add(as64(doff), builder.mul(lit64(r), nbr))
        dh = _masked_load(builder, builder.gep(dp, [do]), ir.VectorType(_I16, nbl), nbv64, 2)
        dw = builder.fpext(builder.bitcast(dh, ir.VectorType(ir.HalfType(), nbl)),
                           ir.VectorType(_F32, nbl))
        aps = [builder.bitcast(builder.gep(accp, [ir.Constant(_I32, 16 * (j * nr + r))]),
                               _V16F32.as_pointer()) for j in range(len(toks))]
        accs = [builder.load(ap, align=4) for ap in aps]
        sv = builder.fmul(dw, tokd[0][0], flags=EXACT) if len(toks) == 1 else None   # as in _q4_emit
        for ch in range(nch):
            nbytes = builder.mul(builder.sub(nbv64, lit64(2 * ch)), lit64(32))
            qo = builder.add(qoff, builder.add(builder.mul(lit64(r), K64), lit64(64 * ch)))
            v = _masked_load(builder, builder.gep(qp, [qo]), _V64I8, nbytes, 1)
            u = builder.xor(v, flip)
            dwl = _splat_idx(builder, dw, [2 * ch] * 8 + [2 * ch + 1] * 8)          # d_w per lane
            for j, (_, chunks) in enumerate(tokd):
                xv, seed, xdl = chunks[ch]
                p = _udot512(builder, seed, u, xv, wide=True)
                if sv is not None:
                    sc = _splat_idx(builder, sv, [2 * ch] * 8 + [2 * ch + 1] * 8)
                else:
                    sc = builder.fmul(dwl, xdl, flags=EXACT)                    # d_w * d_x per lane
                accs[j] = _fma(builder, builder.sitofp(p, _V16F32), sc, accs[j])
        for ap, a in zip(aps, accs):
            builder.store(a, ap, align=4)


@intrinsic
def _q8_rows(typingctx, accp, qs, qoff, K, xq, xd, xs, c, d, doff, nbv, NR, NCH):
    """The Q8_0 GEMV's step (see _q8_emit): chunks c .. c+NCH-1 of NR rows starting at byte qoff
    of qs (row stride K) and element doff of d (row stride K//32), one token (xq/xd/xs 1-D);
    acc[16r:16r+16] for row r."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (NR, NCH)):
        return None
    nr, nch = NR.literal_value, NCH.literal_value

    def codegen(ctx, builder, sig, args):
        accp_, qs_, qoff_, K_, _, _, _, c_, d_, doff_, nbv_ = args[:11]
        toks = _tokens(ctx, builder, sig, args, 4, None, 1)
        _q8_emit(builder, accp_, _row_base(ctx, builder, sig.args[1], qs_, None, _I8), qoff_, K_, toks,
                 c_, _row_base(ctx, builder, sig.args[8], d_, None, _I16), doff_, nbv_, nr, nch)
        return ir.Constant(_I8, 0)
    return types.int8(accp, qs, qoff, K, xq, xd, xs, c, d, doff, nbv, NR, NCH), codegen


@intrinsic
def _q8_tile(typingctx, accp, qs, qoff, K, XQ, XD, XS, m0, c, d, doff, nbv, T):
    """The Q8_0 GEMM's step: chunk c of 4 rows (as _q8_rows with NR = 4, NCH = 1) for the T tokens
    m0 .. m0+T-1 of XQ/XD/XS [M, ...]; acc[16 (4j + r) : +16] for token m0 + j, row r."""
    if not isinstance(T, types.IntegerLiteral):
        return None
    ntok = T.literal_value

    def codegen(ctx, builder, sig, args):
        accp_, qs_, qoff_, K_, _, _, _, m0_, c_, d_, doff_, nbv_ = args[:12]
        toks = _tokens(ctx, builder, sig, args, 4, m0_, ntok)
        _q8_emit(builder, accp_, _row_base(ctx, builder, sig.args[1], qs_, None, _I8), qoff_, K_, toks,
                 c_, _row_base(ctx, builder, sig.args[9], d_, None, _I16), doff_, nbv_, 4, 1)
        return ir.Constant(_I8, 0)
    return types.int8(accp, qs, qoff, K, XQ, XD, XS, m0, c, d, doff, nbv, T), codegen

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

@njit(**_JIT)
def _quantize_act_q8v(x, xq, xd, xs):
    """quantize_act_q8's int8 values and scales (identical arithmetic, vectorised), with
    xs[b] = -128 * sum(xq of block b) (an integer, exact in float32): the Q8_0 gemv's bias."""
    nb = x.shape[0] // 32
    for b in range(nb):
        k0 = b * 32
        amax = _blk_amax(x, k0)
        dd = amax / np.float32(127.0)
        idd = np.float32(1.0) / dd if dd != 0 else np.float32(0.0)
        s = _blk_quant_store(x, k0, idd, xq, k0, k0)
        xd[b] = dd
        xs[b] = np.float32(-128.0) * np.float32(s)


def _groups(full, part):
    """Row groups g0..g1-1 (rows 4g..4g+3) of a GEMV from its full- and partial-group steps: per
    row 16 f32 lanes on the stack, one horizontal sum."""

    @njit(**dict(_JIT, inline="always"))
    def groups(xq, xd, xs, qs, d, out, g0, g1):
        N = qs.shape[0]
        for gr in range(g0, g1):
            r0 = gr * 4
            accp = _stack_f32(64)           # 4 rows x 16 f32 lanes
            acc = numba.carray(accp, 64)
            for i in range(64):
                acc[i] = 0.0
            nr = min(4, N - r0)
            if nr == 4:
                full(xq, xd, xs, qs, d, accp, r0)
            else:
                part(xq, xd, xs, qs, d, accp, r0, nr)
            for rr in range(nr):
                out[r0 + rr] = _hsum16(accp, rr * 16)
    return groups


@njit(**dict(_JIT, inline="always"))
def _q8_gemv_full(xq, xd, xs, qs, d, accp, r0):
    """The Q8_0 GEMV's 4 rows at r0 into 16 f32 lanes per row at accp (see _q8_emit)."""
    K = qs.shape[1]
    nb = K // 32
    nc = nb // 2                # full 64-byte chunks
    tb = nb - 2 * nc            # blocks in the last, partial chunk (0 or 1)
    q0 = r0 * K
    d0 = r0 * nb
    PF = q0 + 8 * K             # prefetch 2 groups (8 rows) ahead, 512 bytes per step
    for c2 in range(nc // 2):
        c = 2 * c2
        for i in range(8):
            _prefetch(qs, PF + 256 * c + 64 * i)
        _q8_rows(accp, qs, q0 + 64 * c, K, xq, xd, xs, c, d, d0 + 2 * c, 4, 4, 2)
    if nc % 2:
        c = nc - 1
        _q8_rows(accp, qs, q0 + 64 * c, K, xq, xd, xs, c, d, d0 + 2 * c, 2, 4, 1)
    if tb:
        _q8_rows(accp, qs, q0 + 64 * nc, K, xq, xd, xs, nc, d, d0 + 2 * nc, tb, 4, 1)


@njit(**dict(_JIT, inline="always"))
def _q8_gemv_part(xq, xd, xs, qs, d, accp, r0, nr):
    """The Q8_0 GEMV's last nr < 4 rows, from r0."""
    K = qs.shape[1]
    nb = K // 32
    nc = nb // 2
    tb = nb - 2 * nc
    q0 = r0 * K
    d0 = r0 * nb
    for rr in range(nr):
        ap = _ptr_add(accp, rr * 16)
        for c in range(nc):
            _q8_rows(ap, qs, q0 + rr * K + 64 * c, K, xq, xd, xs, c, d, d0 + rr * nb + 2 * c, 2, 1, 1)
        if tb:
            _q8_rows(ap, qs, q0 + rr * K + 64 * nc, K, xq, xd, xs, nc, d, d0 + rr * nb + 2 * nc, tb, 1, 1)


gemv_q8_0_groups = _groups(_q8_gemv_full, _q8_gemv_part)
gemv_q8_0_groups.__doc__ = """Row groups g0..g1-1 (rows 4g..4g+3) of the Q8_0 gemv, on activations already quantized
    by _quantize_act_q8v. Per row: 16 f32 lanes accumulated over 64-byte chunks (see _q8_emit),
    one horizontal sum."""


@njit(**_PJIT)
def _gemv_q8_0_kernel(x, xq, xd, xs, qs, d, out):
    # x f32[K]; scratch xq int8[K], xd f32[K//32], xs f32[K//32]; qs int8[N,K]; d u16[N,K//32]
    _quantize_act_q8v(x, xq, xd, xs)
    for gr in prange((qs.shape[0] + 3) // 4):
        gemv_q8_0_groups(xq, xd, xs, qs, d, out, gr, gr + 1)


def repack_q4_0(qs, d):
    """ggml Q4_0 (qs uint8[N, K/2], d float16[N, K/G], G = 32/64/128) -> the kernels' il16 layout
    (qi uint8[NG, nb*256], di uint16[NG, nb*16]; NG = ceil(N/16), nb = K/32; see Q4_R): rows past
    N are zero (scale 0: their outputs are 0 and never stored). The same weights and scales."""
    qs = np.asarray(qs)
    d = np.asarray(d)
    N, KB = qs.shape
    K = 2 * KB
    if d.ndim != 2 or d.shape[0] != N or d.shape[1] == 0 or K % d.shape[1] or K // d.shape[1] not in (32, 64, 128):
        raise ValueError(f"Q4_0 arrays do not fit: qs {qs.shape}, d {d.shape} (group size must be 32, 64 or 128)")
    G = K // d.shape[1]
    nb = K // 32
    NG = -(-N // Q4_R)
    if G != 32:                                      # nibbles to G = 32 block order
        b = qs.reshape(N, K // G, G // 2)
        q = np.concatenate([b & 15, b >> 4], axis=2).reshape(N, nb, 32)
        qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(N, KB)
    qp = np.zeros((NG * Q4_R, KB), np.uint8)
    qp[:N] = qs
    dp = np.zeros((NG * Q4_R, nb), np.uint16)
    dp[:N] = np.repeat(d.view(np.uint16), G // 32, axis=1)
    qi = qp.view(np.uint32).reshape(NG, Q4_R, nb, 4).transpose(0, 2, 3, 1)   # [g, b, piece, row] of 4 bytes
    di = dp.reshape(NG, Q4_R, nb).transpose(0, 2, 1)                   # [g, b, row]
    return (np.ascontiguousarray(qi).view(np.uint8).reshape(NG, nb * 256),
            np.ascontiguousarray(di).reshape(NG, nb * Q4_R))


def unrepack_q4_0(qi, di, N, G, rows=None):
    """repack_q4_0's inverse: ggml's (qs uint8[n, K/2], d float16[n, K/G]) of rows `rows` (all N
    when None), from the il16 arrays."""
    NG, nbb = qi.shape
    nb = nbb // 256
    rows = np.arange(N) if rows is None else np.asarray(rows).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= N):
        raise IndexError(f"row ids must lie in 0..{N - 1}")
    q = qi.view(np.uint32).reshape(NG, nb, 4, Q4_R)[rows // Q4_R, :, :, rows % Q4_R]   # [n, b, piece] of 4 bytes
    qs = np.ascontiguousarray(q).view(np.uint8).reshape(rows.size, nb * 16)
    dd = di.reshape(NG, nb, Q4_R)[rows // Q4_R, :, rows % Q4_R]               # [n, b]
    if G != 32:
        b = qs.reshape(rows.size, nb, 16)
        v = np.concatenate([b & 15, b >> 4], axis=2).reshape(rows.size, nb * 32 // G, G)
        qs = (v[:, :, :G // 2] | (v[:, :, G // 2:] << 4)).reshape(rows.size, nb * 16)
        dd = dd[:, ::G // 32]
    return np.ascontiguousarray(qs), np.ascontiguousarray(dd).view(np.float16)


Q4_PF = 4096                # software prefetch distance, bytes of the (one) stream of groups


@njit(**dict(_JIT, inline="always"))
def gemv_q4_0_groups(xq, xd, xs, qs, d, out, g0, g1):
    """out[16g : 16g+16] (rows < out.shape[0]) for the il16 groups g0..g1-1 of a Q4_0 matrix
    (repack_q4_0's qs, d), one token quantized by _quantize_act_q8v: 16 rows in the 16 f32 lanes
    of one register, blocks in order (see _q4_emit)."""
    nb = d.shape[1] // Q4_R
    N = out.shape[0]
    for g in range(g0, g1):
        accp = _stack_f32(16)
        acc = numba.carray(accp, 16)
        for i in range(16):
            acc[i] = 0.0
        q0 = g * nb * 256
        d0 = g * nb * Q4_R
        for b2 in range(nb // 2):
            for i in range(8):
                _prefetch(qs, q0 + 512 * b2 + Q4_PF + 64 * i)
            _q4_rows(accp, qs, q0 + 512 * b2, d, d0 + 32 * b2, xq, xd, xs, 2 * b2, 2)
        if nb % 2:
            _q4_rows(accp, qs, q0 + 256 * (nb - 1), d, d0 + Q4_R * (nb - 1), xq, xd, xs, nb - 1, 1)
        for i in range(min(16, N - 16 * g)):
            out[16 * g + i] = acc[i]


@njit(**_PJIT)
def _gemv_q4_0_kernel(x, xq, xd, xs, qs, d, out):
    # x f32[K]; scratch xq int8[K], xd f32[K//32], xs f32[K//32]; qs u8[NG, K*8], d u16[NG, K/2]
    # (repack_q4_0's layout); out f32[N]
    _quantize_act_q8v(x, xq, xd, xs)
    for g in prange(qs.shape[0]):
        gemv_q4_0_groups(xq, xd, xs, qs, d, out, g, g + 1)



@njit(**_JIT)
def _gemv_f16_kernel(x, w, out):
    # x f32[K], w u16[N,K] (fp16 bits), out f32[N]
    _gemv_float(x, w, out, 1)


@njit(**_JIT)
def _gemv_bf16_kernel(x, w, out):
    # x f32[K], w u16[N,K] (bf16 bits), out f32[N]
    _gemv_float(x, w, out, 2)


def act_scratch(K):
    """New (xq int8[K], xd f32[K//32], xs f32[K//32]) scratch for the quantized gemvs. The
    caller owns it (a Linear keeps one; the executor's run state has its own): no scratch is
    shared between models or threads."""
    return np.zeros(K, np.int8), np.zeros(K // 32, np.float32), np.zeros(K // 32, np.float32)


def gemv_q8_0(x, qs, d, out, scratch=None):
    """out[N] = W @ x, W Q8_0 (qs int8[N,K], d float16[N,K//32]); x f32[K] contiguous."""
    xq, xd, xs = scratch if scratch is not None else act_scratch(x.shape[0])
    _gemv_q8_0_kernel(x, xq, xd, xs, qs, d.view(np.uint16), out)


def gemv_q4_0(x, qs, d, out, scratch=None):
    """out[N] = W @ x, W Q4_0 in ggml's arrays (qs uint8[N,K//2], d float16[N,K//G], G=32/64/128),
    repacked to the kernel's layout on every call (tests, one-off use): a Linear repacks once
    (Linear.exec_arrays) and calls gemv_q4_0.kernel on repack_q4_0's arrays."""
    xq, xd, xs = scratch if scratch is not None else act_scratch(x.shape[0])
    _gemv_q4_0_kernel(x, xq, xd, xs, *repack_q4_0(qs, d), out)


def gemv_bound(fmt, arrays):
    """(kernel, pre) such that kernel(x, *pre, out) == gemv_<fmt>(x, *arrays, out): the dtype
    views and the activation scratch resolved once (per matrix, at load), not on every token."""
    if fmt == "q8_0":
        qs, d = arrays
        return _gemv_q8_0_kernel, (*act_scratch(qs.shape[1]), qs, d.view(np.uint16))
    if fmt == "q4_0":               # arrays: repack_q4_0's (qi, di)
        qi, di = arrays
        return _gemv_q4_0_kernel, (*act_scratch(qi.shape[1] // 8), qi, di)
    if fmt == "f16":
        return _gemv_f16_kernel, (arrays[0].view(np.uint16),)
    if fmt == "bf16":
        return _gemv_bf16_kernel, (arrays[0],)
    raise ValueError(f"no bound gemv for format {fmt!r}")


def gemv_f16(x, w, out):
    """out[N] = W @ x, W float16[N,K]."""
    _gemv_f16_kernel(x, w.view(np.uint16), out)


gemv_bf16 = _gemv_bf16_kernel   # (x f32[K], w uint16[N,K] bf16 bits, out f32[N]); no wrapper needed

gemv_q8_0.kernel = gemv_q8_0_kernel = _gemv_q8_0_kernel   # the Numba kernels themselves:
gemv_q4_0.kernel = gemv_q4_0_kernel = _gemv_q4_0_kernel   # (x, xq, xd, xs, qi, di, out): repack_q4_0's
gemv_f16.kernel = _gemv_f16_kernel


# --------------------------------------------------------------------------------------------
# GEMM kernels (prefill, verify passes, batched decode): 4 weight rows x T tokens per pass
# --------------------------------------------------------------------------------------------
# A tile of T tokens loads and unpacks each 64-byte weight chunk of a group of 4 rows once for
# all T tokens (_q4_tile / _q8_tile); every (row, token) gets the GEMV's operations in the GEMV's
# order (same emitter, explicit FMAs), so each output equals the GEMV of that token bit for bit.
# Tile sizes (measured, 1 thread, 2026-11-29, 2-core Zen 4 under load 4; CPU time per call
# against the same kernel on one token, SmolLM2 1536x576 / TinyLlama 5632x2048, M = 128):
# Q4_0 (il16 layout: 16 rows x 1 block per step, one zmm accumulator per token): T = 4, no
# spills (the interleave probe, benchmarks/README.md: in cache 4 tokens cost 1.9-2.0 one-token passes);
# Q8_0 T = 4: 16 accumulators, 65-66 / 67-68 (T = 3: 69-75 / 71-72; per-token GEMV: 84 / 85).
# The M % T tail tokens take the same code with T = 2 and T = 1.
# The 4 rows of a group stay in L1 across its tiles; the rows a few groups ahead are prefetched
# during the group's first tile. Rows past the last whole group (N % 4) take the GEMV per token
# (Q8_0; Q4_0's groups of 16 are padded at repack_q4_0, only the rows < N are stored).
Q4_T = 4
Q8_T = 4


def _q8_pass(T):
    """One tile: tokens m0..m0+T-1 of the group of 4 rows at r0, Q8_0."""
    NACC = 64 * T

    @njit(**dict(_JIT, inline="always"))
    def run(XQ, XD, XS, qs, d, out, m0, r0, pf):
        K = qs.shape[1]
        nb = K // 32
        nc = nb // 2                # full 64-byte chunks
        tb = nb - 2 * nc            # blocks in the last, partial chunk (0 or 1)
        accp = _stack_f32(NACC)
        acc = numba.carray(accp, NACC)
        for i in range(NACC):
            acc[i] = 0.0
        q0 = r0 * K
        d0 = r0 * nb
        PF = q0 + 8 * K                    # 2 groups (8 rows) ahead
        for c in range(nc):
            if pf:
                for i in range(4):
                    _prefetch(qs, PF + i * K + 64 * c)
            _q8_tile(accp, qs, q0 + 64 * c, K, XQ, XD, XS, m0, c, d, d0 + 2 * c, 2, T)
        if tb:
            _q8_tile(accp, qs, q0 + 64 * nc, K, XQ, XD, XS, m0, nc, d, d0 + 2 * nc, tb, T)
        for j in range(T):
            for r in range(4):
                out[m0 + j, r0 + r] = _hsum16(accp, 16 * (4 * j + r))
    return run


def _tiled(pt, p2, p1, part, T):
    """Row groups g0..g1-1 of M tokens: tiles of T tokens (pt), then 2 (p2) and 1 (p1) for the
    rest; a group past the last whole one takes the GEMV's partial-group step (part) per token."""

    @njit(**dict(_JIT, inline="always"))
    def groups(XQ, XD, XS, qs, d, out, M, g0, g1):
        N = qs.shape[0]
        for gr in range(g0, g1):
            r0 = 4 * gr
            if r0 + 4 <= N:
                m = 0
                while m + T <= M:
                    pt(XQ, XD, XS, qs, d, out, m, r0, m == 0)
                    m += T
                if m + 2 <= M:
                    p2(XQ, XD, XS, qs, d, out, m, r0, m == 0)
                    m += 2
                if m < M:
                    p1(XQ, XD, XS, qs, d, out, m, r0, m == 0)
            else:
                nr = N - r0
                for m in range(M):
                    accp = _stack_f32(64)
                    acc = numba.carray(accp, 64)
                    for i in range(64):
                        acc[i] = 0.0
                    part(XQ[m], XD[m], XS[m], qs, d, accp, r0, nr)
                    for rr in range(nr):
                        out[m, r0 + rr] = _hsum16(accp, rr * 16)
    return groups


def _q4_pass(T):
    """One tile: tokens m0..m0+T-1 of the 16-row il16 group g (rows < out.shape[1] stored)."""
    NACC = 16 * T

    @njit(**dict(_JIT, inline="always"))
    def run(XQ, XD, XS, qs, d, out, m0, g):
        nb = d.shape[1] // Q4_R
        N = out.shape[1]
        accp = _stack_f32(NACC)
        acc = numba.carray(accp, NACC)
        for i in range(NACC):
            acc[i] = 0.0
        q0 = g * nb * 256
        d0 = g * nb * Q4_R
        for b in range(nb):
            if m0 == 0:
                for i in range(4):
                    _prefetch(qs, q0 + 256 * b + Q4_PF + 64 * i)
            _q4_tile(accp, qs, q0 + 256 * b, d, d0 + Q4_R * b, XQ, XD, XS, m0, b, T)
        nr = min(16, N - 16 * g)
        for j in range(T):
            for i in range(nr):
                out[m0 + j, 16 * g + i] = acc[16 * j + i]
    return run


_Q4P4, _Q4P3, _Q4P2, _Q4P1 = _q4_pass(4), _q4_pass(3), _q4_pass(2), _q4_pass(1)


@njit(**dict(_JIT, inline="always"))
def gemm_q4_0_groups(XQ, XD, XS, qs, d, out, M, g0, g1):
    """out[:M, 16g : 16g+16] (rows < out.shape[1]) for the il16 groups g0..g1-1 of a Q4_0 matrix,
    tokens quantized by _quantize_act_q8v (XQ/XD/XS rows): tiles of Q4_T = 4 tokens, then one of
    3, 2 or 1; every out[m] equals gemv_q4_0_groups of token m bit for bit."""
    for g in range(g0, g1):
        m = 0
        while m + Q4_T <= M:
            _Q4P4(XQ, XD, XS, qs, d, out, m, g)
            m += Q4_T
        r = M - m
        if r == 3:
            _Q4P3(XQ, XD, XS, qs, d, out, m, g)
        elif r == 2:
            _Q4P2(XQ, XD, XS, qs, d, out, m, g)
        elif r == 1:
            _Q4P1(XQ, XD, XS, qs, d, out, m, g)



gemm_q8_0_groups = _tiled(_q8_pass(Q8_T), _q8_pass(2), _q8_pass(1), _q8_gemv_part, Q8_T)
gemm_q8_0_groups.__doc__ = """Row groups g0..g1-1 of out[:M] = x[:M] @ W.T, W Q8_0, on activations quantized per token
    by _quantize_act_q8v; every out[m] equals gemv_q8_0_groups of token m bit for bit."""


@njit(**_PJIT)
def _gemm_q8_0_kernel(x, XQ, XD, XS, qs, d, out):
    # x f32[M,K]; scratch XQ int8[>=M,K], XD/XS f32[>=M,K//32]; qs int8[N,K]; d u16[N,K//32]
    M = x.shape[0]
    for m in range(M):
        _quantize_act_q8v(x[m], XQ[m], XD[m], XS[m])
    for gr in prange((qs.shape[0] + 3) // 4):
        gemm_q8_0_groups(XQ, XD, XS, qs, d, out, M, gr, gr + 1)


@njit(**_PJIT)
def _gemm_q4_0_kernel(x, XQ, XD, XS, qs, d, out):
    # x f32[M,K]; scratch XQ int8[>=M,K], XD/XS f32[>=M,K//32]; qs, d: repack_q4_0's; out f32[M,N]
    M = x.shape[0]
    for m in range(M):
        _quantize_act_q8v(x[m], XQ[m], XD[m], XS[m])
    for g in prange(qs.shape[0]):
        gemm_q4_0_groups(XQ, XD, XS, qs, d, out, M, g, g + 1)


def _gemm_act(M, K):
    """Per-token activation scratch (XQ, XD, XS), allocated per call (prefill, not per token)."""
    return np.empty((M, K), np.int8), np.empty((M, K // 32), np.float32), np.empty((M, K // 32), np.float32)


def gemm_q8_0(x, qs, d, out):
    """out[M,N] = x[M,K] @ W.T, W Q8_0: each token's activations quantized to int8 per block
    (as in the gemv and in ggml), then tiles of 4 weight rows x 4 tokens that unpack each weight
    chunk once (gemm_q8_0_groups); every row equals the gemv of that token bit for bit."""
    _gemm_q8_0_kernel(x, *_gemm_act(x.shape[0], qs.shape[1]), qs, d.view(np.uint16), out)


def gemm_q4_0(x, qs, d, out):
    """out[M,N] = x[M,K] @ W.T, W Q4_0 in ggml's arrays (G = K // d.shape[1]), repacked on every
    call as gemv_q4_0; gemm_q4_0.kernel(x, XQ, XD, XS, qi, di, out) runs on repack_q4_0's arrays."""
    _gemm_q4_0_kernel(x, *_gemm_act(x.shape[0], 2 * qs.shape[1]), *repack_q4_0(qs, d), out)


gemm_q4_0.kernel = _gemm_q4_0_kernel


def q4_0_bound(qs, d):
    """(gemv(x, out, scratch=None), gemm(X, out)) on ggml's Q4_0 arrays repacked once here: what
    gemv_q4_0 / gemm_q4_0 compute, without their per-call repack (benchmarks, a matrix used many
    times outside a Linear)."""
    qi, di = repack_q4_0(qs, d)
    K = 2 * qs.shape[1]

    def gemv(x, out, scratch=None):
        _gemv_q4_0_kernel(x, *(scratch if scratch is not None else act_scratch(K)), qi, di, out)

    def gemm(X, out):
        _gemm_q4_0_kernel(X, *_gemm_act(X.shape[0], K), qi, di, out)
    return gemv, gemm


@njit(**_JIT)
def _gemm_f16_kernel(x, w, out):
    # x f32[M,K], w u16[N,K] (fp16 bits), out f32[M,N]
    _gemm_float(x, w, out, 1)


@njit(**_JIT)
def _gemm_bf16_kernel(x, w, out):
    # x f32[M,K], w u16[N,K] (bf16 bits), out f32[M,N]
    _gemm_float(x, w, out, 2)


def gemm_f16(x, w, out):
    """out[M,N] = x[M,K] @ W.T, W float16[N,K]; each row bit-identical to gemv_f16 of it."""
    _gemm_f16_kernel(x, w.view(np.uint16), out)


gemm_bf16 = _gemm_bf16_kernel   # (x f32[M,K], w uint16[N,K] bf16 bits, out f32[M,N]); each row as gemv_bf16
