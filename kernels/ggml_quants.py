"""ggml's Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL and IQ4_XS weight formats: numpy references and
Numba kernels working directly on the raw ggml bytes.

Storage: `raw: uint8[N, (K // block) * type_size]` per matrix, exactly the bytes of a GGUF tensor
(row r of W is row r of raw), so a GGUF file can be memory-mapped and run without conversion.
`SPECS[name]` (a TypeSpec) holds, per type: the ggml enum value, block / type sizes (asserted
against gguf-py's GGML_QUANT_SIZES), bits per weight, the activation block type ggml's vec_dot
uses, and the callables:
  quantize_ref(w f32[N,K], qw f32[K] | None) -> uint8[N, row_bytes]   numpy, ggml's *_ref scale search
  dequantize_ref(raw uint8[N, row_bytes], K) -> f32[N, K]            numpy, equal to gguf-py's bit for bit
  quantize_act_ref(x f32[K]) -> (xq int8[K], xd f32[..], xs f32[..]) numpy, what act_quant writes
  dot_ref(raw_row uint8[row_bytes], x f32[K]) -> float                numpy, ggml vec_dot semantics
  act_quant(x, xq, xd, xs)                   Numba: the activation quantizer (see below)
  gemv_groups(xq, xd, xs, raw, out, g0, g1)  Numba: out[4*g0 : min(4*g1, N)] of W @ x, from the
                                             quantized activation; no prange, no allocation,
                                             safe to run concurrently on disjoint row groups
  gemv(x, raw, out), gemm(x[M,K], raw, out[M,N])   convenience wrappers (quantize + prange)

Activation blocks (what ggml's vec_dot_type is for each weight type) and the scratch slots that
act_quant_<kind>(x f32[K], xq int8[K], xd f32[>=K//32], xs f32[>=K//16]) fills:
  q8_0 (Q5_0, IQ4_NL): blocks of 32, d = amax/127 rounded to fp16 (ggml stores it as fp16),
        q = roundf(x / d_f32).   xq = q;  xd[b] = fp16(d) of block b;  xs[b] = sum(q of block b)
        (an integer, exact in f32: the Q5_0 kernel's -16 offset).
  q8_1 (Q4_1, Q5_1): as q8_0, and xs[b] = fp16(d_f32 * sum(q of block b)) (ggml's `s`, used
        with the weight block's min m: dot = d*xd*sum(q*xq) + m*s).
  q8_K (all K-quants, IQ4_XS): blocks of 256, iscale = -127/max (max = the element of largest
        |x|), q = min(127, nearest_int(iscale*x)), d = 1/iscale kept in f32.
        xd[b] = d of super-block b (K//256 slots); xs[j] = sum(q of the 16-group j) (ggml's
        bsums, K//16 slots; used for the mins of Q2_K/Q4_K/Q5_K and the offsets of Q3_K/Q6_K).

Dot products (ggml's vec_dot, written as integer sums): per block / sub-block the kernel forms the
exact int32 sum of (weight integer) * (activation int8), combines the sub-blocks of a super-block
with their integer scales into one int32, and applies the float scales once per super-block:
  32-blocks:   acc += d_w * xd * isum  (+ m_w * s for Q4_1/Q5_1)
  K-quants:    acc += xd * (d_w * isum - dmin_w * msum)   (msum = sum_j min_j * bsum_j)
dot_ref computes the same integer sums in numpy, so the fast kernels agree with it to float32
rounding (order of the float additions only).

Where this follows ggml and where not:
  * quantize_ref reproduces ggml's quantize_row_*_ref (Q4_1/Q5_0/Q5_1 byte-identical to gguf-py's
    quantizer, which is ggml's; the K-quants and IQ4 run ggml's make_qx_quants / make_q3_quants /
    make_qkx2_quants / iq4 scale searches, vectorised over blocks, so bytes may differ from
    llama-quantize's in rare float-rounding cases but the layout is ggml's). With importance
    weights qw (per input column, as an imatrix) every type uses ggml's weight
    qw * sqrt(sigma2 + x^2) in the same searches (ggml's imatrix path additionally uses
    make_qkx3_quants / make_qp_quants for the K-quants' scales; not reproduced).
  * The activation quantizers follow ggml's *_ref code (roundf, 1/d). ggml's x86 runtime q8_0 /
    q8_1 path rounds half to even and multiplies by 127/amax: it can differ from the reference
    by one step on an exact tie or a one-ulp multiplier difference (rare; both are "ggml").

Kernel design and what inspect_asm showed (2-vCPU Xeon with AVX-512 VNNI, numba 0.68 / llvmlite 0.50):
  * Plain Numba integer loops are not enough. Written as `s = int32(s + int32(u) * int32(xq))`
    LLVM gives vpmovzxbd/vpmovsxbd + vpmaddwd/vpdpwssd (no vpdpbusd); with an int64-typed
    accumulator it widens to vpmovsxbq/vpmuldq; table lookups (IQ4) and per-lane shifts (the
    Q5 high bits) stayed scalar; byte-unpacking loops into a stack buffer cost ~30 ns per 256
    weights on their own (Q6_K 57, Q5_0/Q5_1 106 ns per 256 weights in cache).
  * 32-block types (Q4_1, Q5_0, Q5_1): each 32-weight block is unpacked in LLVM IR
    (intrinsic _dpnf: byte shift + mask; the qh bits by a byte shuffle and a mask test)
    straight into vpdpbusd ymm (u8 weights x s8 activations), converted per
    block and fma'd into two f32 accumulators (even / odd blocks: one chain is latency-bound),
    one row at a time, the row 2 rows ahead prefetched. Unsigned weights need an offset for the
    signed formats: Q5_0's -16 comes off through the block sums (xs).
  * IQ4_NL (_nl_tile, section "IQ4_NL: tiles"): tiles of 4 rows x 4 tokens (the GEMV: x 1
    token), a pair of 32-blocks per zmm: each row's pair unpacked once (vpshufb of the table
    + 128), each token's 64 activation bytes and scales loaded once for the 4 rows; per (row,
    token) one vpdpbusd from the offset -128 * sum(xq) (exact int32 lanes), one d * xd product
    and one fma. In cache, 1 thread, M = 128 (ns per row, token and 256 weights): GEMM 8.5 ->
    2.7-3.4 (the 32-block row per token before), GEMV 7.4 -> 4.8.
  * K-quants and IQ4_XS (_ksb / _ksb_mt, section "K-quant super-blocks" below): a whole
    256-super-block per step. GEMV: 4 rows per pass (the 4 activation zmm and the Q8_K block
    sums loaded once for the 4 rows); each row's weights unpacked with zmm vector ops in the
    activation's order, the 6-bit / 8-bit sub-block scales unpacked as vectors and applied
    inside the integer dot (vpmaddubsw u8 x s8 -> i16 pairs, then vpdpwssd with the scales as
    i16 lanes), the mins (Q2_K, Q4_K, Q5_K) and offsets (Q3_K -4, Q6_K -32: one vpmaddwd of the
    i16 scales with the i16 block sums) in int32 lanes, one float fma per super-block and row
    (with mins: 8 lanes of the weight sums and 8 of the min sums in one vector, scaled by
    [xd*d] * 8 + [xd*dmin] * 8), one horizontal sum per row. Bit fields (nibbles, Q6_K's and
    Q2_K/Q3_K's 2-bit fields) come out of a 32-byte broadcast by one vgf2p8affineqb per 64 bytes
    (a bit matrix per qword: shift and mask per 16-byte lane). Q4_K/Q5_K pair their pieces: one
    register holds the first 16 weights of 4 sub-blocks, a second the last 16, so the two
    vpmaddubsw results add in i16 before one vpdpwssd with the 4 scales (3 multiplies per 128
    weights instead of 4; the activation is rearranged to match once per super-block and shared
    by the rows), and their 12 scale/min bytes unpack as <4 x i32> word ops. IQ4_XS unpacks
    |table value| (<= 127) and moves the sign onto the activation (one byte blend per piece and
    (row, token) from x and -x, -x built once per token), so its pairs fit i16 and it takes the
    K-quants' vpmaddubsw + vpdpwssd with its scales as i16 lanes (was vpdpbusd of table + 128, a
    -128 bias and a vpmulld by the scales: GEMM 2.9 -> 2.0 ns per row, token and 256 weights).
    Q3_K / Q6_K keep -offset * scale as i16 lanes (|.| <= 4096), so their offset term is one
    vpmaddwd per (row, token). The 4 rows' bytes 16 rows ahead are prefetched as a linear stream (as
    qmatmul's Q4_0). GEMM (prefill, gemm_<type>_groups): per pass 8 tokens (then 4, then 1) x 2
    rows (Q4_K/Q5_K: x 4 rows, the rearranged activation shared by them), each super-block
    unpacked once for the tokens; the per-(row, token) integer sums and float step are the
    GEMV's code, so prefill is bit-identical to decode.
  * Q4_K runs in the executor from a repacked copy built at load (repack_q4_k, section "Repacked
    Q4_K"; Linear.exec_arrays): 4 rows' super-blocks side by side as one linear stream, nibbles
    stored in the paired order, scales and mins as bytes, the 4 rows' d/dmin converted and
    multiplied by xd once; same integer lanes and float steps, so the bits of the ggml-layout
    kernels. The file keeps ggml's layout; TypeSpec.repack / exec_*_groups name the layout.
  * inspect_asm of gemv_q4_k_groups: vpmaddubsw + vpdpwssd on zmm, prefetcht0, no vpmovsxbq
    (asserted by tests/test_ggml_quants.py::test_vnni_asm).
  * Cost: see benchmarks/README.md ("ggml K-quant kernels") for the before/after figures.
  * Without AVX512-VNNI/VL (or MINILM_SIMD=generic|avx2): generic IR (zext/sext, mul, adds; a
    select chain for the IQ4 table) that any LLVM target compiles; tested by forcing it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import llvmlite.ir as ir
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .qmatmul import _blk_amax
from .simd import _h2f

QK_K = 256
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                   dtype=np.int8)   # ggml's kvalues_iq4nl
GROUP_MAX_EPS = np.float32(1e-15)

_JIT = dict(cache=True, nogil=True, fastmath=True, error_model="numpy", boundscheck=False)
# Activation quantizers: no reciprocal / reassociation flags, so 1/d, -127/max and the roundings
# are the IEEE operations of the numpy reference (the fast kernels must see the same int8 values).
_AJIT = dict(cache=True, nogil=True, fastmath={"nnan", "ninf", "nsz"}, error_model="numpy",
             boundscheck=False)
_PJIT = dict(_JIT, parallel=True)


# --------------------------------------------------------------------------------------------
# numpy helpers
# --------------------------------------------------------------------------------------------

def _f16r(a):
    """float32 values rounded to fp16 (as ggml's GGML_FP32_TO_FP16), returned as float32."""
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


def _f16b(a):
    """float32[n] -> uint8[n, 2], the little-endian fp16 bytes."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32).astype(np.float16)).view(np.uint8).reshape(-1, 2)


def _rd16(blocks, off):
    """fp16 at byte offset off of each block -> float32[nb]."""
    return np.ascontiguousarray(blocks[:, off:off + 2]).view(np.float16)[:, 0].astype(np.float32)


def _nearest_int(v):
    """ggml's nearest_int: round half to even in float32."""
    return np.rint(np.asarray(v, dtype=np.float32)).astype(np.int32)


def _roundf(v):
    """C roundf (half away from zero), exact for float32 inputs (done in float64)."""
    v = np.asarray(v, dtype=np.float64)
    return np.trunc(v + np.copysign(0.5, v))


def _check_w(w, block, name):
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{name} quantize: expected a 2-D weight [N, K], got shape {w.shape}")
    if w.shape[1] == 0 or w.shape[1] % block != 0:
        raise ValueError(f"{name} quantize: K={w.shape[1]} is not a positive multiple of the "
                         f"block size {block}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ValueError(f"{name} quantize: weight contains NaN or Inf")
    return w


def _check_qw(qw, K, name):
    if qw is None:
        return None
    qw = np.ascontiguousarray(qw, dtype=np.float32).reshape(-1)
    if qw.shape[0] != K:
        raise ValueError(f"{name} quantize: importance weights qw have {qw.shape[0]} entries, "
                         f"expected K={K}")
    if not np.isfinite(qw).all() or (qw < 0).any():
        raise ValueError(f"{name} quantize: importance weights qw must be finite and >= 0")
    return qw


def _check_raw(raw, K, spec):
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"{spec.name}: raw must be uint8[N, row_bytes], got {raw.dtype}{list(raw.shape)}")
    if K <= 0 or K % spec.block != 0:
        raise ValueError(f"{spec.name}: K={K} is not a positive multiple of the block size {spec.block}")
    rb = K // spec.block * spec.type_size
    if raw.shape[1] != rb:
        raise ValueError(f"{spec.name}: raw has {raw.shape[1]} bytes per row, K={K} needs {rb} "
                         f"({K // spec.block} blocks of {spec.type_size} bytes)")
    return raw


# --------------------------------------------------------------------------------------------
# ggml's scale searches (vectorised over many blocks at once: x f32[nb, n])
# --------------------------------------------------------------------------------------------

def _abs_argmax_val(x):
    """The element of largest |x| per row (first one on ties), float32[nb]."""
    i = np.abs(x).argmax(axis=1)
    return np.take_along_axis(x, i[:, None], axis=1)[:, 0]


def make_qx_quants(x, nmax, rmse_type, qw=None):
    """ggml make_qx_quants: symmetric scale search. x f32[nb, n] -> (scale f32[nb], L int32[nb, n]
    in [0, 2*nmax)). rmse_type 0: plain; 1: weights x^2 (or qw) and 18 trial scales."""
    x = x.astype(np.float32)
    mx = _abs_argmax_val(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    safe = np.where(zero, np.float32(1), mx)
    iscale = (np.float32(-nmax) / safe).astype(np.float32)

    def lq(isc):
        return np.clip(_nearest_int(isc[:, None] * x), -nmax, nmax - 1).astype(np.float32)

    L = lq(iscale)
    if rmse_type == 0:
        scale = (np.float32(1) / iscale).astype(np.float32)
    else:
        w = qw if qw is not None else x * x
        sumlx = (w * x * L).sum(axis=1, dtype=np.float32)
        suml2 = (w * L * L).sum(axis=1, dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0)).astype(np.float32)
        best = scale * sumlx
        for i_s in range(-9, 10):
            if i_s == 0:
                continue
            isc = (-(np.float32(nmax) + np.float32(0.1) * np.float32(i_s)) / safe).astype(np.float32)
            Lt = lq(isc)
            slx = (w * x * Lt).sum(axis=1, dtype=np.float32)
            sl2 = (w * Lt * Lt).sum(axis=1, dtype=np.float32)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            with np.errstate(divide="ignore", invalid="ignore"):
                sc = np.where(sl2 != 0, slx / sl2, np.float32(0)).astype(np.float32)
            L = np.where(better[:, None], Lt, L)
            scale = np.where(better, sc, scale)
            best = np.where(better, sc * slx, best)
    scale = np.where(zero, np.float32(0), scale).astype(np.float32)
    L = np.where(zero[:, None], 0, L.astype(np.int32) + nmax)
    return scale, L.astype(np.int32)


def make_q3_quants(x, nmax):
    """ggml make_q3_quants with do_rmse: x f32[nb, n] -> (scale, L in [0, 2*nmax))."""
    x = x.astype(np.float32)
    nb, n = x.shape
    mx = _abs_argmax_val(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    safe = np.where(zero, np.float32(1), mx)
    iscale = (np.float32(-nmax) / safe).astype(np.float32)
    L = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float32)
    w = x * x
    sumlx = (w * x * L).sum(axis=1, dtype=np.float32)
    suml2 = (w * L * L).sum(axis=1, dtype=np.float32)
    for _ in range(5):   # ggml stops early when nothing changed; further passes change nothing
        for i in range(n):
            xi, wi, Li = x[:, i], w[:, i], L[:, i]
            slx = sumlx - wi * xi * Li
            sl2 = suml2 - wi * Li * Li
            with np.errstate(divide="ignore", invalid="ignore"):
                newl = np.clip(_nearest_int(np.where(slx > 0, xi * sl2 / slx, 0)), -nmax, nmax - 1)
            newl = newl.astype(np.float32)
            slx2 = slx + wi * xi * newl
            sl22 = sl2 + wi * newl * newl
            ok = (slx > 0) & (newl != Li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(ok, newl, Li)
            sumlx = np.where(ok, slx2, sumlx).astype(np.float32)
            suml2 = np.where(ok, sl22, suml2).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(zero | (suml2 == 0), np.float32(0), sumlx / suml2).astype(np.float32)
    L = np.where(zero[:, None], 0, L.astype(np.int32) + nmax)
    return scale, L.astype(np.int32)


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """ggml make_qkx2_quants: asymmetric (scale, min) search. x, w f32[nb, n] ->
    (scale f32[nb], the_min f32[nb] (>= 0: value = scale*L - the_min), L int32[nb, n] in [0, nmax])."""
    x = x.astype(np.float32)
    w = w.astype(np.float32)
    mn = np.minimum(x.min(axis=1), np.float32(0))
    mx = x.max(axis=1)
    sum_w = w.sum(axis=1, dtype=np.float32)
    sum_x = (w * x).sum(axis=1, dtype=np.float32)
    flat = mx == mn
    rng = np.where(flat, np.float32(1), mx - mn).astype(np.float32)

    def err(scale, mnv, L):
        diff = scale[:, None] * L + mnv[:, None] - x
        diff = np.abs(diff) if use_mad else diff * diff
        return (w * diff).sum(axis=1, dtype=np.float32)

    iscale = (np.float32(nmax) / rng).astype(np.float32)
    scale = (np.float32(1) / iscale).astype(np.float32)
    L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(np.float32)
    best = err(scale, mn, L)
    for i_s in range(nstep + 1):
        isc = ((np.float32(rmin) + np.float32(rdelta) * np.float32(i_s) + np.float32(nmax)) / rng).astype(np.float32)
        La = np.clip(_nearest_int(isc[:, None] * (x - mn[:, None])), 0, nmax).astype(np.float32)
        sum_l = (w * La).sum(axis=1, dtype=np.float32)
        sum_l2 = (w * La * La).sum(axis=1, dtype=np.float32)
        sum_xl = (w * La * x).sum(axis=1, dtype=np.float32)
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            ts = ((sum_w * sum_xl - sum_x * sum_l) / D).astype(np.float32)
            tm = ((sum_l2 * sum_x - sum_l * sum_xl) / D).astype(np.float32)
            pos = tm > 0
            tm = np.where(pos, np.float32(0), tm)
            ts = np.where(pos, sum_xl / sum_l2, ts).astype(np.float32)
        ok = D > 0
        ts = np.where(ok, ts, 0).astype(np.float32)
        tm = np.where(ok, tm, 0).astype(np.float32)
        cur = err(ts, tm, La)
        better = ok & (cur < best)
        L = np.where(better[:, None], La, L)
        best = np.where(better, cur, best)
        scale = np.where(better, ts, scale)
        mn = np.where(better, tm, mn)
    scale = np.where(flat, np.float32(0), scale).astype(np.float32)
    L = np.where(flat[:, None], 0, L)
    return scale, (-mn).astype(np.float32), L.astype(np.int32)


def _best_index_iq4(v):
    """ggml best_index_int8 over KVALUES: index of the nearest value (the lower one on ties)."""
    kv = KVALUES.astype(np.float32)
    idx = np.searchsorted(kv, v, side="right")       # kv[idx-1] <= v < kv[idx] (ggml's mu)
    idx = np.clip(idx, 1, 15)
    lo = kv[idx - 1]
    hi = kv[idx]
    pick_lo = (v - lo) < (hi - v)
    out = np.where(pick_lo, idx - 1, idx)
    out = np.where(v <= kv[0], 0, out)
    out = np.where(v >= kv[15], 15, out)
    return out.astype(np.int32)


def _weights_imatrix(xb, qwb):
    """ggml's importance weight qw * sqrt(sigma2 + x^2), sigma2 = 2*mean(x^2) of the row block."""
    sigma2 = np.float32(2) * (xb * xb).mean(axis=1, dtype=np.float32)
    return (qwb * np.sqrt(sigma2[:, None] + xb * xb)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Per-type numpy references: block decoders (integer parts), quantizers
# --------------------------------------------------------------------------------------------
# _dec_<type>(blocks uint8[nb, type_size]) -> dict with the integer weight values "q" (int32[nb,
# block], offsets applied: what the dot product multiplies with the int8 activations), the sub-
# block integer scales "sc" / mins "mn" (int32[nb, nsub]) and the float scales "d" / "dmin" /
# "m" (f32[nb]).

def _nib(b):
    return (b & 0x0F).astype(np.int32), (b >> 4).astype(np.int32)


def _dec_q4_1(bl):
    lo, hi = _nib(bl[:, 4:20])
    return dict(q=np.concatenate([lo, hi], axis=1), d=_rd16(bl, 0), m=_rd16(bl, 2))


def _q5_high(qh_bytes):
    qh = np.ascontiguousarray(qh_bytes).view("<u4")[:, 0]
    return ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)


def _dec_q5_0(bl):
    lo, hi = _nib(bl[:, 6:22])
    q = np.concatenate([lo, hi], axis=1) | (_q5_high(bl[:, 2:6]) << 4)
    return dict(q=q - 16, d=_rd16(bl, 0))


def _dec_q5_1(bl):
    lo, hi = _nib(bl[:, 8:24])
    q = np.concatenate([lo, hi], axis=1) | (_q5_high(bl[:, 4:8]) << 4)
    return dict(q=q, d=_rd16(bl, 0), m=_rd16(bl, 2))


def _dec_iq4_nl(bl):
    lo, hi = _nib(bl[:, 2:18])
    return dict(q=KVALUES[np.concatenate([lo, hi], axis=1)].astype(np.int32), d=_rd16(bl, 0))


def _crumbs(qs, nb):
    """2-bit fields: qs uint8[nb, 64] -> int32[nb, 256], element 128h + 32s + l = bits 2s of qs[32h + l]."""
    q = (qs.reshape(nb, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    return q.reshape(nb, 256).astype(np.int32)


def _dec_q2_k(bl):
    nb = bl.shape[0]
    sc = bl[:, 0:16]
    return dict(q=_crumbs(bl[:, 16:80], nb), sc=(sc & 0x0F).astype(np.int32),
                mn=(sc >> 4).astype(np.int32), d=_rd16(bl, 80), dmin=_rd16(bl, 82))


def _q3_scales(s):
    """Q3_K's 12 scale bytes -> int32[nb, 16] (6-bit, minus 32)."""
    nb = s.shape[0]
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1).astype(np.int32)
    j = np.arange(16)
    high = ((s[:, 8 + (j % 4)] >> (2 * (j // 4)).astype(np.uint8)) & 3).astype(np.int32)
    return (low | (high << 4)).reshape(nb, 16) - 32


def _dec_q3_k(bl):
    nb = bl.shape[0]
    low = _crumbs(bl[:, 32:96], nb)
    e = np.arange(256)
    hbit = ((bl[:, e % 32] >> (e // 32).astype(np.uint8)) & 1).astype(np.int32)
    return dict(q=low + 4 * hbit - 4, sc=_q3_scales(bl[:, 96:108]), d=_rd16(bl, 108))


def _k4_scale_min(s):
    """The 12-byte 6-bit scale/min packing of Q4_K/Q5_K -> (sc int32[nb, 8], mn int32[nb, 8])."""
    s = s.astype(np.int32)
    sc = np.empty((s.shape[0], 8), np.int32)
    mn = np.empty((s.shape[0], 8), np.int32)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _nib256(qs, nb):
    """qs uint8[nb, 128] -> int32[nb, 256]: sub-block 2c = low nibbles of qs[32c:32c+32], 2c+1 = high."""
    q = qs.reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(nb, 256).astype(np.int32)


def _dec_q4_k(bl):
    nb = bl.shape[0]
    sc, mn = _k4_scale_min(bl[:, 4:16])
    return dict(q=_nib256(bl[:, 16:144], nb), sc=sc, mn=mn, d=_rd16(bl, 0), dmin=_rd16(bl, 2))


def _dec_q5_k(bl):
    nb = bl.shape[0]
    sc, mn = _k4_scale_min(bl[:, 4:16])
    e = np.arange(256)
    hbit = ((bl[:, 16 + e % 32] >> (e // 32).astype(np.uint8)) & 1).astype(np.int32)
    return dict(q=_nib256(bl[:, 48:176], nb) | (hbit << 4), sc=sc, mn=mn, d=_rd16(bl, 0),
                dmin=_rd16(bl, 2))


def _dec_q6_k(bl):
    nb = bl.shape[0]
    ql = bl[:, 0:128].reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(nb, 256).astype(np.int32)      # 128h + 64t + 32u + l = nibble t of ql[64h+32u+l]
    qh = _crumbs(bl[:, 128:192], nb)
    return dict(q=(ql | (qh << 4)) - 32, sc=bl[:, 192:208].view(np.int8).astype(np.int32),
                d=_rd16(bl, 208))


def _dec_iq4_xs(bl):
    nb = bl.shape[0]
    sh = np.ascontiguousarray(bl[:, 2:4]).view("<u2")[:, 0].astype(np.int32)
    sl = bl[:, 4:8].astype(np.int32)
    j = np.arange(8)
    ls = ((sl[:, j // 2] >> (4 * (j % 2))) & 0x0F) | (((sh[:, None] >> (2 * j)) & 3) << 4)
    lo, hi = _nib(bl[:, 8:136].reshape(nb, 8, 16))
    q = np.concatenate([lo, hi], axis=2).reshape(nb, 256)
    return dict(q=KVALUES[q].astype(np.int32), sc=ls - 32, d=_rd16(bl, 0))


def _dequant_blocks(name, bl):
    """float32[nb, block], computed in gguf-py's order (bit-identical to gguf.quants.dequantize)."""
    t = _DEC[name](bl)
    q = t["q"].astype(np.float32)
    nb = bl.shape[0]
    if name in ("Q4_1", "Q5_1"):
        return t["d"][:, None] * q + t["m"][:, None]
    if name in ("Q5_0", "IQ4_NL"):
        return t["d"][:, None] * q
    nsub = t["sc"].shape[1]
    sub = 256 // nsub
    dl = (t["d"][:, None] * t["sc"].astype(np.float32))[:, :, None]
    qq = q.reshape(nb, nsub, sub)
    if "mn" in t:
        ml = (t["dmin"][:, None] * t["mn"].astype(np.float32))[:, :, None]
        return (dl * qq - ml).reshape(nb, 256)
    return (dl * qq).reshape(nb, 256)


# ---- quantizers (blocks f32[nb, block], qwb f32[nb, block] | None) -> uint8[nb, type_size] ----

def _pack_nib32(q):
    """int[nb, 32] in 0..15 -> uint8[nb, 16]: byte l = q[l] | q[16+l] << 4."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _qh32(q):
    """bit 4 of q int[nb, 32] -> uint8[nb, 4] (little-endian uint32, bit l = element l)."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.ascontiguousarray(bits.sum(axis=1, dtype=np.uint32)).view(np.uint8).reshape(-1, 4)


def _q_affine(x, qwb, nmax):
    """Scale and min of a 32-block with offsets (Q4_1/Q5_1): ggml's min/max reference, or with
    importance weights a make_qkx2_quants search on qw * sqrt(sigma2 + x^2)."""
    if qwb is not None:
        d, mneg, L = make_qkx2_quants(x, _weights_imatrix(x, qwb), nmax, -0.9, 0.05, 36, False)
        d = _f16r(d)
        m = _f16r(-mneg)
        with np.errstate(divide="ignore", invalid="ignore"):
            L = np.where(d[:, None] > 0, np.clip(_nearest_int((x - m[:, None]) / d[:, None]), 0, nmax), 0)
        return d, m, L
    mn = x.min(axis=1)
    mx = x.max(axis=1)
    d = ((mx - mn) / np.float32(nmax)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idd = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    L = np.clip(np.trunc((x - mn[:, None]) * idd[:, None] + np.float32(0.5)), 0, nmax).astype(np.int32)
    return d, mn, L


def _quant_q4_1(x, qwb):
    d, m, L = _q_affine(x, qwb, 15)
    return np.concatenate([_f16b(d), _f16b(m), _pack_nib32(L)], axis=1)


def _quant_q5_1(x, qwb):
    d, m, L = _q_affine(x, qwb, 31)
    return np.concatenate([_f16b(d), _f16b(m), _qh32(L), _pack_nib32(L & 0x0F)], axis=1)


def _quant_q5_0(x, qwb):
    if qwb is not None:
        d, L = make_qx_quants(x, 16, 1, _weights_imatrix(x, qwb))
    else:
        mx = _abs_argmax_val(x)
        d = (mx / np.float32(-16)).astype(np.float32)
        with np.errstate(divide="ignore"):
            idd = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        L = np.minimum(31, np.trunc(x * idd[:, None] + np.float32(16.5))).astype(np.int32)
    return np.concatenate([_f16b(d), _qh32(L), _pack_nib32(L & 0x0F)], axis=1)


def _iq4_search(xb, wb, ntry):
    """quantize_row_iq4_nl_impl's per-32 block scale search: xb, wb f32[nb, 32] -> scale f32[nb]."""
    kv = KVALUES.astype(np.float32)
    mx = _abs_argmax_val(xb)
    zero = np.abs(mx) < GROUP_MAX_EPS
    safe = np.where(zero, np.float32(1), mx)

    def sums(idv):
        q = kv[_best_index_iq4(idv[:, None] * xb)]
        return (wb * q * xb).sum(axis=1, dtype=np.float32), (wb * q * q).sum(axis=1, dtype=np.float32)

    d = (-safe / kv[0]).astype(np.float32)
    sqx, sq2 = sums((np.float32(1) / d).astype(np.float32))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sq2 > 0, sqx / sq2, 0).astype(np.float32)
    best = d * sqx
    for itry in range(-ntry, ntry + 1):
        sqx, sq2 = sums(((np.float32(itry) + kv[0]) / safe).astype(np.float32))
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            dn = np.where(sq2 > 0, sqx / sq2, 0).astype(np.float32)
        d = np.where(better, dn, d)
        best = np.where(better, dn * sqx, best)
    return np.where(zero, np.float32(0), d).astype(np.float32)


def _iq4_weights(x, qwb):
    return _weights_imatrix(x, qwb) if qwb is not None else x * x


def _quant_iq4_nl(x, qwb):
    d = _iq4_search(x, _iq4_weights(x, qwb), 7)
    dh = _f16r(d)
    with np.errstate(divide="ignore"):
        idd = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    L = _best_index_iq4(idd[:, None] * x)
    return np.concatenate([_f16b(dh), _pack_nib32(L)], axis=1)


def _quant_iq4_xs(x, qwb):
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    sigma2 = (np.float32(2) / 256) * (x * x).sum(axis=1, dtype=np.float32)
    if qwb is not None:
        wts = (qwb.reshape(nb * 8, 32) * np.sqrt(np.repeat(sigma2, 8)[:, None] + xs * xs)).astype(np.float32)
    else:
        wts = xs * xs
    sc = _iq4_search(xs, wts, 7).reshape(nb, 8)
    iam = np.abs(sc).argmax(axis=1)
    max_scale = np.take_along_axis(sc, iam[:, None], axis=1)[:, 0]
    d = (-max_scale / np.float32(32)).astype(np.float32)
    dh = _f16r(d)
    with np.errstate(divide="ignore"):
        idd = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    ls = np.clip(_nearest_int(idd[:, None] * sc), -32, 31)
    dl = (d[:, None] * ls.astype(np.float32)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idl = np.where(dl != 0, np.float32(1) / dl, np.float32(0)).astype(np.float32)
    L = _best_index_iq4(idl.reshape(-1, 1) * xs).reshape(nb, 8, 32)
    u = ls + 32
    sl = ((u[:, 0::2] & 0x0F) | ((u[:, 1::2] & 0x0F) << 4)).astype(np.uint8)        # [nb, 4]
    shv = ((u >> 4) << (2 * np.arange(8))).sum(axis=1).astype("<u2")
    qs = (L[:, :, :16] | (L[:, :, 16:] << 4)).astype(np.uint8).reshape(nb, 128)
    return np.concatenate([_f16b(dh), np.ascontiguousarray(shv).view(np.uint8).reshape(nb, 2), sl, qs], axis=1)


def _pack_crumbs(L):
    """int[nb, 256] in 0..3 -> uint8[nb, 64]: qs[32h + l] = L[128h+l] | L[128h+32+l] << 2 | ..."""
    nb = L.shape[0]
    q = L.reshape(nb, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).astype(np.uint8).reshape(nb, 64)


def _requant_affine(x, d, dm, nmax):
    """L = nearest_int((x + dm) / d) clamped to [0, nmax], 0 where d == 0 (ggml's second pass)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.clip(_nearest_int((x + dm[..., None]) / d[..., None]), 0, nmax)
    return np.where(d[..., None] != 0, L, 0)


def _quant_q2_k(x, qwb):
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16)
    w = _weights_imatrix(xs, qwb.reshape(nb * 16, 16)) if qwb is not None else np.abs(xs)
    sc, mn, _ = make_qkx2_quants(xs, w, 3, -0.5, 0.1, 15, True)
    sc = sc.reshape(nb, 16)
    mn = mn.reshape(nb, 16)
    ms = sc.max(axis=1)
    mm = mn.max(axis=1)
    with np.errstate(divide="ignore"):
        isc = np.where(ms > 0, np.float32(15) / ms, 0).astype(np.float32)
        imn = np.where(mm > 0, np.float32(15) / mm, 0).astype(np.float32)
    ls = _nearest_int(isc[:, None] * sc)
    lm = _nearest_int(imn[:, None] * mn)
    d = np.where(ms > 0, _f16r(ms / np.float32(15)), 0).astype(np.float32)
    dmin = np.where(mm > 0, _f16r(mm / np.float32(15)), 0).astype(np.float32)
    L = _requant_affine(x.reshape(nb, 16, 16), d[:, None] * ls, dmin[:, None] * lm, 3).reshape(nb, 256)
    return np.concatenate([(ls | (lm << 4)).astype(np.uint8), _pack_crumbs(L), _f16b(d), _f16b(dmin)], axis=1)


def _quant_q3_k(x, qwb):
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16)
    if qwb is not None:
        sc, _ = make_qx_quants(xs, 4, 1, _weights_imatrix(xs, qwb.reshape(nb * 16, 16)))
    else:
        sc, _ = make_q3_quants(xs, 4)
    sc = sc.reshape(nb, 16)
    mx = _abs_argmax_val(sc)
    has = mx != 0
    with np.errstate(divide="ignore"):
        isc = np.where(has, np.float32(-32) / np.where(has, mx, 1), 0).astype(np.float32)
    ls = np.clip(_nearest_int(isc[:, None] * sc), -32, 31) + 32
    with np.errstate(divide="ignore"):
        d = np.where(has, _f16r(np.float32(1) / np.where(has, isc, 1)), 0).astype(np.float32)
    s = np.zeros((nb, 12), np.uint8)
    s[:, 0:8] = (ls[:, 0:8] & 0x0F) | ((ls[:, 8:16] & 0x0F) << 4)
    hi = ls >> 4
    for j in range(16):
        s[:, 8 + j % 4] |= (hi[:, j] << (2 * (j // 4))).astype(np.uint8)
    dl = d[:, None] * (ls - 32).astype(np.float32)                        # [nb, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.clip(_nearest_int(x.reshape(nb, 16, 16) / dl[:, :, None]), -4, 3) + 4
    L = np.where(dl[:, :, None] != 0, L, 4).reshape(nb, 256)   # ggml leaves those L at their first-pass value; 4 = 0
    return np.concatenate([*_codes_q3_k(L), s, _f16b(d)], axis=1)


def _codes_q3_k(L):
    """Q3_K codes int[nb, 256] in 0..7 -> (hmask uint8[nb, 32], qs uint8[nb, 64])."""
    nb = L.shape[0]
    hm = (L > 3).reshape(nb, 8, 32).astype(np.uint8)
    hmask = (hm << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return hmask, _pack_crumbs(np.where(L > 3, L - 4, L))


def _pack_k4_scales(ls, lm):
    """6-bit sc/min int[nb, 8] -> the 12 bytes of Q4_K/Q5_K."""
    nb = ls.shape[0]
    s = np.zeros((nb, 12), np.int32)
    s[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    s[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return s.astype(np.uint8)


def _quant_k45(x, qwb, nmax, rmin, nstep):
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    if qwb is not None:
        w = _weights_imatrix(xs, qwb.reshape(nb * 8, 32))
    else:
        av = np.sqrt((xs * xs).sum(axis=1, dtype=np.float32) / np.float32(32))
        w = av[:, None] + np.abs(xs)
    sc, mn, _ = make_qkx2_quants(xs, w, nmax, rmin, 0.1, nstep, False)
    sc = sc.reshape(nb, 8)
    mn = mn.reshape(nb, 8)
    ms = sc.max(axis=1)
    mm = mn.max(axis=1)
    isc = np.where(ms > 0, np.float32(63) / np.where(ms > 0, ms, 1), 0).astype(np.float32)
    imn = np.where(mm > 0, np.float32(63) / np.where(mm > 0, mm, 1), 0).astype(np.float32)
    ls = np.minimum(63, _nearest_int(isc[:, None] * sc))
    lm = np.minimum(63, _nearest_int(imn[:, None] * mn))
    d = _f16r(ms / np.float32(63))
    dmin = _f16r(mm / np.float32(63))
    L = _requant_affine(x.reshape(nb, 8, 32), d[:, None] * ls, dmin[:, None] * lm, nmax)
    return d, dmin, _pack_k4_scales(ls, lm), L.reshape(nb, 256)


def _pack_nib256(L):
    """int[nb, 256] in 0..15 -> uint8[nb, 128]: qs[32c + l] = L[64c + l] | L[64c + 32 + l] << 4."""
    nb = L.shape[0]
    q = L.reshape(nb, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).astype(np.uint8).reshape(nb, 128)


def _quant_q4_k(x, qwb):
    d, dmin, s, L = _quant_k45(x, qwb, 15, -1.0, 20)
    return np.concatenate([_f16b(d), _f16b(dmin), s, _pack_nib256(L)], axis=1)


def _quant_q5_k(x, qwb):
    d, dmin, s, L = _quant_k45(x, qwb, 31, -0.5, 15)
    return np.concatenate([_f16b(d), _f16b(dmin), s, *_codes_q5_k(L)], axis=1)


def _codes_q5_k(L):
    """Q5_K codes int[nb, 256] in 0..31 -> (qh uint8[nb, 32], qs uint8[nb, 128])."""
    hb = (L >> 4).reshape(L.shape[0], 8, 32).astype(np.uint8)
    qh = (hb << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return qh, _pack_nib256(L & 0x0F)


def _quant_q6_k(x, qwb):
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16)
    w = _weights_imatrix(xs, qwb.reshape(nb * 16, 16)) if qwb is not None else None
    sc, _ = make_qx_quants(xs, 32, 1, w)
    sc = sc.reshape(nb, 16)
    mx = _abs_argmax_val(sc)
    has = np.abs(mx) >= GROUP_MAX_EPS
    isc = np.where(has, np.float32(-128) / np.where(has, mx, 1), 0).astype(np.float32)
    d = np.where(has, _f16r(np.float32(1) / np.where(has, isc, 1)), 0).astype(np.float32)
    ls = np.minimum(127, _nearest_int(isc[:, None] * sc))
    dl = d[:, None] * ls.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.clip(_nearest_int(x.reshape(nb, 16, 16) / dl[:, :, None]), -32, 31) + 32
    L = np.where(dl[:, :, None] != 0, L, 32).reshape(nb, 256)
    return np.concatenate([*_codes_q6_k(L), ls.astype(np.int8).view(np.uint8), _f16b(d)], axis=1)


def _codes_q6_k(L):
    """Q6_K codes int[nb, 256] in 0..63 -> (ql uint8[nb, 128], qh uint8[nb, 64])."""
    nb = L.shape[0]
    L = L.reshape(nb, 2, 4, 32)
    ql = np.empty((nb, 2, 64), np.uint8)
    ql[:, :, :32] = (L[:, :, 0] & 0x0F) | ((L[:, :, 2] & 0x0F) << 4)
    ql[:, :, 32:] = (L[:, :, 1] & 0x0F) | ((L[:, :, 3] & 0x0F) << 4)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).astype(np.uint8)
    return ql.reshape(nb, 128), qh.reshape(nb, 64)


_DEC = {"Q4_1": _dec_q4_1, "Q5_0": _dec_q5_0, "Q5_1": _dec_q5_1, "IQ4_NL": _dec_iq4_nl,
        "Q2_K": _dec_q2_k, "Q3_K": _dec_q3_k, "Q4_K": _dec_q4_k, "Q5_K": _dec_q5_k,
        "Q6_K": _dec_q6_k, "IQ4_XS": _dec_iq4_xs}
_QUANT = {"Q4_1": _quant_q4_1, "Q5_0": _quant_q5_0, "Q5_1": _quant_q5_1, "IQ4_NL": _quant_iq4_nl,
          "Q2_K": _quant_q2_k, "Q3_K": _quant_q3_k, "Q4_K": _quant_q4_k, "Q5_K": _quant_q5_k,
          "Q6_K": _quant_q6_k, "IQ4_XS": _quant_iq4_xs}

# The formats whose values are an affine grid, value = s * q + o with integer q in [lo, hi] (s, o
# per sub-block: what _dequant_blocks computes), and where their codes sit in a block:
# name -> (lo, hi, (byte offset, packer of the stored codes q - lo ...)). A quantizer that chooses
# the codes itself (GPTQ, calibrate.gptq_linear) keeps a block's scales and writes its codes.
_CODES = {"Q4_1": (0, 15, (4, _pack_nib32)),
          "Q5_0": (-16, 15, (2, _qh32, lambda u: _pack_nib32(u & 0x0F))),
          "Q5_1": (0, 31, (4, _qh32, lambda u: _pack_nib32(u & 0x0F))),
          "Q2_K": (0, 3, (16, _pack_crumbs)),
          "Q3_K": (-4, 3, (0, lambda u: _codes_q3_k(u)[0], lambda u: _codes_q3_k(u)[1])),
          "Q4_K": (0, 15, (16, _pack_nib256)),
          "Q5_K": (0, 31, (16, lambda u: _codes_q5_k(u)[0], lambda u: _codes_q5_k(u)[1])),
          "Q6_K": (-32, 31, (0, lambda u: _codes_q6_k(u)[0], lambda u: _codes_q6_k(u)[1]))}


def _grid_blocks(name, bl):
    """The affine grid of blocks bl uint8[nb, type_size] of a _CODES format: (s, o f32[nb, block],
    q int32[nb, block] the stored codes), value = s * q + o as _dequant_blocks computes it."""
    t = _DEC[name](bl)
    nb = bl.shape[0]
    q = t["q"]
    if "sc" not in t:                                          # 32-blocks: one d (and m)
        s = np.repeat(t["d"][:, None], q.shape[1], axis=1)
        o = np.repeat(t["m"][:, None], q.shape[1], axis=1) if "m" in t else np.zeros_like(s)
        return s, o, q
    sub = 256 // t["sc"].shape[1]
    s = np.repeat(t["d"][:, None] * t["sc"].astype(np.float32), sub, axis=1)
    o = (-np.repeat(t["dmin"][:, None] * t["mn"].astype(np.float32), sub, axis=1) if "mn" in t
         else np.zeros_like(s))
    return s.reshape(nb, 256), o.reshape(nb, 256), q


def _set_codes(name, bl, q):
    """Blocks bl with their codes replaced by q int[nb, block] (in [lo, hi]); scales kept."""
    lo, hi, (off, *packers) = _CODES[name]
    q = np.asarray(q)
    if q.min(initial=lo) < lo or q.max(initial=hi) > hi:
        raise ValueError(f"{name}: codes outside [{lo}, {hi}]")
    out = np.array(bl, np.uint8)
    for part in (p(q - lo) for p in packers):
        out[:, off:off + part.shape[1]] = part
        off += part.shape[1]
    return out


# --------------------------------------------------------------------------------------------
# Activation quantizers (numpy reference)
# --------------------------------------------------------------------------------------------

def _check_x(x, block, what):
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if x.shape[0] == 0 or x.shape[0] % block != 0:
        raise ValueError(f"{what}: activation length {x.shape[0]} is not a positive multiple of {block}")
    return x


def quantize_act_q8_0_ref(x):
    """x f32[K] -> (xq int8[K], xd f32[K//32] (fp16-rounded d), xs f32[K//32] (sum of q per block))."""
    x = _check_x(x, 32, "q8_0")
    b = x.reshape(-1, 32)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idd = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = _roundf((b * idd[:, None]).astype(np.float32)).astype(np.int32)
    return q.astype(np.int8).reshape(-1), _f16r(d), q.sum(axis=1).astype(np.float32)


def quantize_act_q8_1_ref(x):
    """x f32[K] -> (xq int8[K], xd f32[K//32] (fp16 d), xs f32[K//32] (fp16 of d * sum(q)))."""
    x = _check_x(x, 32, "q8_1")
    b = x.reshape(-1, 32)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idd = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = _roundf((b * idd[:, None]).astype(np.float32)).astype(np.int32)
    s = _f16r(np.float32(1) * q.sum(axis=1).astype(np.float32) * d)
    return q.astype(np.int8).reshape(-1), _f16r(d), s


def quantize_act_q8_k_ref(x):
    """x f32[K] -> (xq int8[K], xd f32[K//256] (d, f32), xs f32[K//16] (bsums))."""
    x = _check_x(x, QK_K, "q8_K")
    b = x.reshape(-1, QK_K)
    mx = _abs_argmax_val(b)
    zero = mx == 0
    with np.errstate(divide="ignore"):
        isc = np.where(zero, 0, np.float32(-127) / np.where(zero, 1, mx)).astype(np.float32)
    q = np.minimum(127, _nearest_int(isc[:, None] * b))
    d = np.where(zero, 0, np.float32(1) / np.where(zero, 1, isc)).astype(np.float32)
    return (q.astype(np.int8).reshape(-1), d,
            q.reshape(-1, 16).sum(axis=1).astype(np.float32))


_ACT_REF = {"q8_0": quantize_act_q8_0_ref, "q8_1": quantize_act_q8_1_ref, "q8_K": quantize_act_q8_k_ref}


def _dot_ref(name, raw_row, x):
    spec = SPECS[name]
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    raw_row = np.asarray(raw_row, dtype=np.uint8).reshape(1, -1)
    K = x.shape[0]
    _check_raw(raw_row, K, spec)
    xq, xd, xs = _ACT_REF[spec.act](x)
    t = _DEC[name](raw_row.reshape(-1, spec.type_size))
    q = t["q"]                                               # int32[nb, block]
    nb = q.shape[0]
    if spec.block == 32:
        isum = (q * xq.reshape(nb, 32).astype(np.int32)).sum(axis=1)     # exact int32
        terms = t["d"] * xd * isum.astype(np.float32)
        if "m" in t:
            terms = terms + t["m"] * xs
    else:
        nsub = t["sc"].shape[1]
        sub = 256 // nsub
        si = (q * xq.reshape(nb, 256).astype(np.int32)).reshape(nb, nsub, sub).sum(axis=2)
        isum = (t["sc"] * si).sum(axis=1).astype(np.float32)
        terms = t["d"] * isum
        if "mn" in t:
            bs = xs.reshape(nb, 16)
            if nsub == 8:
                bs = bs.reshape(nb, 8, 2).sum(axis=2)
            msum = (t["mn"].astype(np.float32) * bs).sum(axis=1, dtype=np.float32)
            terms = terms - t["dmin"] * msum
        terms = xd * terms
    acc = np.float32(0)
    for v in terms.astype(np.float32):
        acc = np.float32(acc + v)
    return float(acc)


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------

@intrinsic
def _to_f16(typingctx, x):
    """float32 -> nearest fp16 (round to nearest even) -> float32 (fptrunc half, fpext)."""
    def codegen(ctx, builder, sig, args):
        h = builder.fptrunc(args[0], ir.HalfType())
        return builder.fpext(h, ir.FloatType())
    return types.float32(types.float32), codegen


# x and raw are typed read-only (a mutable array converts to it): weights memory-mapped read-only
# from a GGUF file and writable arrays both match the one signature. A format's kernels compile for
# it on the format's first use (compile_format), not at import: a model compiles only its formats.
_RO_F32_1D = types.Array(types.float32, 1, "C", readonly=True)
_RO_U8_2D = types.Array(types.uint8, 2, "C", readonly=True)
_AQ_SIG = types.void(_RO_F32_1D, types.int8[::1], types.float32[::1], types.float32[::1])


@njit(**_AJIT)
def _q8_blocks(x, xq, xd, xs):
    """Shared body of q8_0/q8_1: xq, xd[b] = fp16(d); returns nothing, xs[b] = sum(q)."""
    nb = x.shape[0] // 32
    for b in range(nb):
        k0 = b * 32
        amax = np.float32(0.0)
        for i in range(32):
            amax = max(amax, abs(x[k0 + i]))
        d = amax / np.float32(127.0)
        idd = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        s = 0
        for i in range(32):
            v = np.float64(x[k0 + i] * idd)      # the f32 product, then exact roundf in f64
            q = np.int32(np.trunc(v + (0.5 if v >= 0 else -0.5)))
            xq[k0 + i] = np.int8(q)
            s += q
        xd[b] = _to_f16(d)
        xs[b] = np.float32(s)


@njit(**_AJIT)
def act_quant_q8_0(x, xq, xd, xs):
    """q8_0 activation blocks (see the module docstring for the slots)."""
    _q8_blocks(x, xq, xd, xs)


@njit(**_AJIT)
def act_quant_q8_1(x, xq, xd, xs):
    """q8_1 activation blocks: as q8_0, xs[b] = fp16(d * sum(q)) with the f32 d."""
    nb = x.shape[0] // 32
    for b in range(nb):
        k0 = b * 32
        amax = np.float32(0.0)
        for i in range(32):
            amax = max(amax, abs(x[k0 + i]))
        d = amax / np.float32(127.0)
        idd = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        s = 0
        for i in range(32):
            v = np.float64(x[k0 + i] * idd)
            q = np.int32(np.trunc(v + (0.5 if v >= 0 else -0.5)))
            xq[k0 + i] = np.int8(q)
            s += q
        xd[b] = _to_f16(d)
        xs[b] = _to_f16(np.float32(s) * d)


@njit(**_AJIT)
def act_quant_q8_k(x, xq, xd, xs):
    """q8_K activation blocks: xd[b] = d (f32) per 256, xs[j] = bsums per 16."""
    nb = x.shape[0] // 256
    for b in range(nb):
        xb = x[b * 256:(b + 1) * 256]
        qb = xq[b * 256:(b + 1) * 256]
        # mx = the element of largest |x|, the first one on ties (ggml's loop): +amax or -amax,
        # whichever occurs, and only where both do a scalar scan finds which comes first (the
        # scalar argmax loop and per-byte stores were most of the quantizer's time)
        amax = np.float32(0.0)
        for k in range(8):
            amax = max(amax, _blk_amax(xb, 32 * k))
        npos = 0
        for i in range(256):
            npos += xb[i] == amax
        mx = amax if npos > 0 else -amax
        if npos > 0:
            nneg = 0
            for i in range(256):
                nneg += xb[i] == -amax
            if nneg > 0:
                for i in range(256):
                    if abs(xb[i]) == amax:
                        mx = xb[i]
                        break
        if amax == 0:
            xd[b] = 0.0
            for i in range(256):
                qb[i] = 0
            for j in range(16):
                xs[b * 16 + j] = 0.0
            continue
        isc = np.float32(-127.0) / mx
        for i in range(256):
            qb[i] = np.int8(min(np.int32(127), np.int32(np.rint(isc * xb[i]))))
        for j in range(16):
            s = np.int32(0)
            for i in range(16):
                s += np.int32(qb[16 * j + i])
            xs[b * 16 + j] = np.float32(s)
        xd[b] = np.float32(1.0) / isc


# ---- SIMD building blocks (LLVM IR) --------------------------------------------------------
# _dpnf(facc, scale, row, ro, qho, KIND, x, xo)   32-blocks from 16 nibble bytes (KIND 0 plain,
#     1 with the Q5 qh bits): facc[0:8] (f32) += f32(dot4(...)) * scale
# "vnni": vpdpbusd ymm and pshufb; "generic": widening IR any LLVM target lowers (zext/sext, mul,
# adds; a select chain for the table), chosen when the CPU lacks AVX512-VNNI/VL or with
# MINILM_SIMD=generic|avx2 (as kernels/qmatmul.py; use a fresh NUMBA_CACHE_DIR with it).

import os as _os  # noqa: E402

import llvmlite.binding as _llvm  # noqa: E402
from numba.core import cgutils  # noqa: E402

from .simd import EXACT, _elem_ptr, _prefetch, _ptr_add, _stack_f32  # noqa: E402

try:
    _FEAT = _llvm.get_host_cpu_features()
except Exception:  # pragma: no cover
    _FEAT = {}
SIMD = "vnni" if all(_FEAT.get(f, False) for f in ("avx512vnni", "avx512vl", "avx512bw")) else "generic"
_FORCE = _os.environ.get("MINILM_SIMD", "")
if _FORCE not in ("", "generic", "avx2"):
    raise ValueError(f"MINILM_SIMD={_FORCE!r}: must be 'generic' or 'avx2' (or unset)")
if _FORCE:
    SIMD = "generic"

_I8T = ir.IntType(8)
_I32T = ir.IntType(32)
_F32T = ir.FloatType()
_V32I8 = ir.VectorType(_I8T, 32)
_V16I8 = ir.VectorType(_I8T, 16)
_V8I32 = ir.VectorType(_I32T, 8)
_V32I32 = ir.VectorType(_I32T, 32)
_V8F32 = ir.VectorType(_F32T, 8)
_KV128 = [int(v) + 128 for v in KVALUES]


def _shuf(builder, a, b, idx):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32T, len(idx)), list(idx)))


def _dot4(builder, wv, xv):
    """<32 x u8> . <32 x s8> -> <8 x i32>, lane i = sum over bytes 4i..4i+3."""
    if SIMD == "vnni":
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [_V8I32] * 3),
                                           "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(f, [ir.Constant(_V8I32, [0] * 8),
                                builder.bitcast(wv, _V8I32), builder.bitcast(xv, _V8I32)])
    p = builder.mul(builder.zext(wv, _V32I32), builder.sext(xv, _V32I32))
    parts = [_shuf(builder, p, p, [4 * i + k for i in range(8)]) for k in range(4)]
    return builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))


def _load32(ctx, builder, aty, arr, off):
    p = _elem_ptr(ctx, builder, aty, arr, off, _I8T)
    return builder.load(builder.bitcast(p, _V32I8.as_pointer()), align=1)


def _i32(builder, v):
    w = v.type.width
    return v if w == 32 else (builder.trunc(v, _I32T) if w > 32 else builder.sext(v, _I32T))


def _splat8(builder, v, n=32):
    """A scalar (any int width) as <n x i8> (truncated)."""
    vt = ir.VectorType(_I8T, n)
    b = v if v.type.width == 8 else builder.trunc(v, _I8T)
    e = builder.insert_element(ir.Constant(vt, None), b, ir.Constant(_I32T, 0))
    return _shuf(builder, e, e, [0] * n)


def _nib32(ctx, builder, sig, args, i, kind):
    """32 weights of a 32-block from its 16 nibble bytes at row[ro:] (args i, i+1; i+2 = qho):
    kind 0: [lo nibbles, hi nibbles]; 1: | bit l of the little-endian u32 at row[qho:] << 4 (Q5)."""
    row, ro, qho = args[i:i + 3]
    p = _elem_ptr(ctx, builder, sig.args[i], row, ro, _I8T)
    v = builder.load(builder.bitcast(p, _V16I8.as_pointer()), align=1)
    lo = builder.and_(v, ir.Constant(_V16I8, [15] * 16))
    hi = builder.lshr(v, ir.Constant(_V16I8, [4] * 16))
    u = _shuf(builder, lo, hi, list(range(32)))
    if kind == 1:
        v4t = ir.VectorType(_I8T, 4)
        qp = _elem_ptr(ctx, builder, sig.args[i], row, qho, _I8T)
        qh = builder.load(builder.bitcast(qp, v4t.as_pointer()), align=1)
        qb = _shuf(builder, qh, qh, [l >> 3 for l in range(32)])
        hit = builder.icmp_unsigned("!=", builder.and_(qb, ir.Constant(_V32I8, [1 << (l & 7) for l in range(32)])),
                                    ir.Constant(_V32I8, [0] * 32))
        u = builder.or_(u, builder.select(hit, ir.Constant(_V32I8, [16] * 32), ir.Constant(_V32I8, [0] * 32)))
    return u


def _acc_f32(builder, accp, d, scale):
    v = builder.insert_element(ir.Constant(_V8F32, None), scale, ir.Constant(_I32T, 0))
    v = _shuf(builder, v, v, [0] * 8)
    ap = builder.bitcast(accp, _V8F32.as_pointer())
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8F32, [_V8F32] * 3), "llvm.fma.v8f32")
    builder.store(builder.call(fma, [builder.sitofp(d, _V8F32), v, builder.load(ap, align=4)]), ap, align=4)


@intrinsic
def _dpnf(typingctx, accp, scale, row, ro, qho, KIND, x, xo):
    """facc[0:8] (f32) += f32(dot4(_nib32(row, ro, qho, KIND), x[xo:xo+32])) * scale (32-blocks)."""
    if not isinstance(KIND, types.IntegerLiteral):
        return None
    kind = KIND.literal_value

    def codegen(ctx, builder, sig, args):
        u = _nib32(ctx, builder, sig, args, 2, kind)
        d = _dot4(builder, u, _load32(ctx, builder, sig.args[6], args[6], args[7]))
        _acc_f32(builder, args[0], d, args[1])
        return ir.Constant(_I8T, 0)
    return types.int8(accp, scale, row, ro, qho, KIND, x, xo), codegen


@intrinsic
def _hsum8f(typingctx, accp):
    def codegen(ctx, builder, sig, args):
        v = builder.load(builder.bitcast(args[0], _V8F32.as_pointer()), align=4)
        n = 8
        while n > 1:
            h = n // 2
            v = builder.fadd(_shuf(builder, v, v, list(range(h))), _shuf(builder, v, v, list(range(h, n))), flags=EXACT)
            n = h
        return builder.extract_element(v, ir.Constant(_I32T, 0))
    return types.float32(accp), codegen


# ---- K-quant super-blocks, several rows at once (LLVM IR) -----------------------------------
# _ksb(accp, raw, qoff, rb, xq, xd, xs, i, pfo, NR, KIND): super-block i (256 weights) of the NR
# rows that start at byte qoff of raw (row stride rb bytes); per row r two f32 accumulators of 16
# lanes on the stack, accp[32r : 32r+16] (main) and accp[32r+16 : 32r+32] (the K-quant mins):
#     main += f32(isum lanes) * (xd[i] * d_r),   mins += f32(msum lanes) * (xd[i] * dmin_r)
# and out[r] = sum(main) - sum(mins) at the end. Layout of the work per super-block:
#   * the 256 activation bytes are 4 zmm loads (x[64p : 64p+64]) shared by all NR rows, and the
#     Q8_K block sums xs[16i : 16i+16] are converted to int32 once (the mins and the offsets);
#   * each row's 256 weights are unpacked with vector ops into 4 x 64 unsigned bytes in the
#     activation's order (no shuffles of x: e.g. Q4_K's 32 bytes qs[32c:] give [low nibbles,
#     high nibbles] = sub-blocks 2c, 2c+1 = x[64c : 64c+64]);
#   * the sub-block scales (unpacked as vectors, not per element) multiply the integer sums
#     inside the dot product: vpmaddubsw (u8 x s8 -> pairs of i16; every format's
#     |u0*x0 + u1*x1| <= 2*63*128 fits) then vpdpwssd with the scales as i16 lanes (i32 lanes
#     += p16 * scale). IQ4_XS: |table value| (<= 127) against x with the table's sign
#     (_XV.signed), so its pairs fit i16 as well;
#   * offsets (Q3_K -4, Q6_K -32) come off lane-wise in int32: acc starts at sum(-off * sc * bsum)
#     (one vpmaddwd of the i16 lanes -off * sc with the block sums).
# "generic" (no AVX512-VNNI/BW): the same sums with widening integer IR any LLVM target compiles.

_I16T = ir.IntType(16)
_I64T = ir.IntType(64)
_V64I8 = ir.VectorType(_I8T, 64)
_V8I8 = ir.VectorType(_I8T, 8)
_V4I8 = ir.VectorType(_I8T, 4)
_V32I16 = ir.VectorType(_I16T, 32)
_V16I16 = ir.VectorType(_I16T, 16)
_V8I16 = ir.VectorType(_I16T, 8)
_V16I32 = ir.VectorType(_I32T, 16)
_V64I32 = ir.VectorType(_I32T, 64)
_V16F32 = ir.VectorType(_F32T, 16)
_KTS = {10: 84, 11: 110, 12: 144, 13: 176, 14: 210, 23: 136,   # ggml type -> bytes per super-block
        112: 148}                                                # Q4_K repacked (see "Repacked Q4_K")
_RP_KINDS = (112,)


def _cv(vals, ty=_I8T):
    """A constant vector (i8 values given as 0..255 or signed)."""
    if ty is _I8T:
        vals = [v - 256 if v > 127 else v for v in vals]
    return ir.Constant(ir.VectorType(ty, len(vals)), list(vals))


def _cat(builder, a, b):
    n = a.type.count
    return _shuf(builder, a, b, list(range(2 * n)))


def _dot4_64(builder, acc, u, x):
    """acc <16 x i32> + per lane k: sum(u[4k:4k+4] (u8) * x[4k:4k+4] (s8)) (vpdpbusd zmm)."""
    if SIMD == "vnni":
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16I32, [_V16I32] * 3),
                                           "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(f, [acc, builder.bitcast(u, _V16I32), builder.bitcast(x, _V16I32)])
    p = builder.mul(builder.zext(u, _V64I32), builder.sext(x, _V64I32))
    parts = [_shuf(builder, p, p, [4 * i + k for i in range(16)]) for k in range(4)]
    return builder.add(acc, builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3])))


def _mdot(builder, acc, u, x, sc16):
    """acc <16 x i32> + per lane k: sum_{b<4} u[4k+b] * x[4k+b] * sc16[(4k+b)//2] (u u8, x s8,
    sc16 <32 x i16>, equal in lanes 2k and 2k+1 for every caller): vpmaddubsw + vpdpwssd."""
    if SIMD == "vnni":
        f1 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I16, [_V64I8, _V64I8]),
                                            "llvm.x86.avx512.pmaddubs.w.512")
        f2 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16I32, [_V16I32] * 3),
                                            "llvm.x86.avx512.vpdpwssd.512")
        p = builder.call(f1, [u, x])
        return builder.call(f2, [acc, builder.bitcast(p, _V16I32), builder.bitcast(sc16, _V16I32)])
    d = _dot4_64(builder, ir.Constant(_V16I32, [0] * 16), u, x)
    s = builder.sext(_shuf(builder, sc16, sc16, [2 * k for k in range(16)]), _V16I32)
    return builder.add(acc, builder.mul(d, s))


def _mdot2(builder, acc, ua, xa, ub, xb, sc16):
    """acc + per lane k: sum over 4 bytes of ua*xa*sc16 + ub*xb*sc16 (as _mdot): the two
    vpmaddubsw results add in i16 (every caller's |pair sum| <= 2*2*31*127 < 2^15), then one
    vpdpwssd with the scales."""
    if SIMD == "vnni":
        f1 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I16, [_V64I8, _V64I8]),
                                            "llvm.x86.avx512.pmaddubs.w.512")
        f2 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16I32, [_V16I32] * 3),
                                            "llvm.x86.avx512.vpdpwssd.512")
        p = builder.add(builder.call(f1, [ua, xa]), builder.call(f1, [ub, xb]))
        return builder.call(f2, [acc, builder.bitcast(p, _V16I32), builder.bitcast(sc16, _V16I32)])
    return _mdot(builder, _mdot(builder, acc, ua, xa, sc16), ub, xb, sc16)


class _XV(list):
    """An activation super-block's 4 zmm (xv[p] = x[64p : 64p+64]) and, built once and shared by
    the rows, the paired layout of _ksb_unpack's Q4_K/Q5_K halves: half(H, j) = 16-byte lane k
    is x of sub-block 4H+k, weights 16j .. 16j+15."""
    def __init__(self, builder, xs):
        super().__init__(xs)
        self.builder, self.cache = builder, {}

    def half(self, H, j):
        if (H, j) not in self.cache:
            a, b = self[2 * H], self[2 * H + 1]
            l0, l1 = 16 * j, 32 + 16 * j
            idx = [l0 + t for t in range(16)] + [l1 + t for t in range(16)]
            self.cache[(H, j)] = _shuf(self.builder, a, b, idx + [64 + i for i in idx])
        return self.cache[(H, j)]

    def signed(self, p, neg):
        """xv[p] with the bytes where neg (<64 x i1>) is set negated (IQ4_XS); -xv[p] built once
        and shared by the rows (q8_K values are in [-127, 127]: the negation is exact)."""
        if ("neg", p) not in self.cache:
            self.cache[("neg", p)] = self.builder.sub(_cv([0] * 64), self[p])
        return self.builder.select(neg, self.cache[("neg", p)], self[p])


def _pshufb64(builder, tab, idx):
    """tab[idx] per byte (idx 0..15, tab <16 x i8>): vpshufb zmm, or a select chain."""
    if SIMD == "vnni":
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V64I8, [_V64I8] * 2),
                                           "llvm.x86.avx512.pshuf.b.512")
        return builder.call(f, [_shuf(builder, tab, tab, list(range(16)) * 4), idx])
    r = ir.Constant(_V64I8, [0] * 64)
    for t in range(16):
        kv = _shuf(builder, tab, tab, [t] * 64)
        r = builder.select(builder.icmp_unsigned("==", idx, _cv([t] * 64)), kv, r)
    return r


_GFNI = SIMD == "vnni" and bool(_FEAT.get("gfni", False))


def _affine_qword(r, m, sh):
    """The GF(2) 8x8 bit matrix (vgf2p8affineqb's qword) of the byte map b -> ((b >> r) & m) << sh:
    output bit i is input bit i - sh + r where mask bit i - sh is set (byte 7 - i of the qword
    selects the input bits of output bit i)."""
    q = 0
    for i in range(8):
        j = i - sh
        if 0 <= j < 8 and (m >> j) & 1 and j + r < 8:
            q |= (1 << (j + r)) << (8 * (7 - i))
    return q


def _fields64(builder, v, lo, hi, lanes=None):
    """<64 x i8>: bytes 0..31 are ((v >> r) & m) << sh with (r, m, sh) = lo, bytes 32..63 with hi;
    or per 16-byte lane k with lanes[k] (one vgf2p8affineqb with a matrix per qword; shifts and
    masks in the generic IR)."""
    if lanes is None:
        lanes = [lo, lo, hi, hi]
    if _GFNI:
        qw = [_affine_qword(*lanes[k // 2]) for k in range(8)]
        mat = ir.Constant(_V64I8, [((q >> (8 * b)) & 0xFF) - (256 if (q >> (8 * b)) & 0x80 else 0)
                                   for q in qw for b in range(8)])
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V64I8, [_V64I8, _V64I8, _I8T]),
                                           "llvm.x86.vgf2p8affineqb.512")
        return builder.call(f, [v, mat, ir.Constant(_I8T, 0)])
    t = builder.lshr(v, _cv([f[0] for f in lanes for _ in range(16)]))
    t = builder.and_(t, _cv([f[1] for f in lanes for _ in range(16)]))
    return builder.shl(t, _cv([f[2] for f in lanes for _ in range(16)]))


def _bcast32(builder, ld, off):
    """32 bytes at off in both halves of a <64 x i8> (vbroadcasti64x4 from memory)."""
    q = ld(off, _V32I8)
    return _cat(builder, q, q)


def _bitset(builder, v, mask, val):
    """val where (v & mask) != 0, else 0 (per byte; <64 x i8>)."""
    hit = builder.icmp_unsigned("!=", builder.and_(v, _cv(mask)), _cv([0] * 64))
    return builder.select(hit, _cv([val] * 64), _cv([0] * 64))


def _k4_scales(builder, s):
    """Q4_K/Q5_K's 12 packed bytes (s <16 x i8>, bytes 0..11) -> (sc <8 x i8>, mn <8 x i8>), as
    32-bit lane ops on the words w0, w1, w2: sc0..3 = w0 & 0x3f.., mn0..3 = w1 & 0x3f..,
    sc4..7 = (w2 & 0x0f..) | ((w0 >> 2) & 0x30..), mn4..7 = ((w2 >> 4) & 0x0f..) | ((w1 >> 2) & 0x30..)."""
    v4 = ir.VectorType(_I32T, 4)
    w = builder.bitcast(s, v4)
    a = _shuf(builder, w, w, [0, 1, 2, 2])
    b = _shuf(builder, w, w, [0, 1, 0, 1])
    lo = builder.and_(builder.lshr(a, _cv([0, 0, 0, 4], _I32T)),
                      _cv([0x3f3f3f3f, 0x3f3f3f3f, 0x0f0f0f0f, 0x0f0f0f0f], _I32T))
    hi = builder.and_(builder.lshr(b, _cv([2] * 4, _I32T)), _cv([0, 0, 0x30303030, 0x30303030], _I32T))
    r = builder.bitcast(builder.or_(lo, hi), _V16I8)       # [sc0..3, mn0..3, sc4..7, mn4..7]
    return (_shuf(builder, r, r, [0, 1, 2, 3, 8, 9, 10, 11]), _shuf(builder, r, r, [4, 5, 6, 7, 12, 13, 14, 15]))


def _ksb_unpack(builder, kind, ld, h16, base):
    """One row's super-block at byte base, unpacked for any number of activation rows:
    dict(pieces=[(u <64 x u8>, scale lanes, p)] (x[64p : 64p+64] pairs with u), d, dmin | None,
    mn (mins: <8 x i32> per 32-sub-block or <16 x i32> per 16-group) | None, osc (<16 x i16>
    -offset * scale of the offset formats: Q6_K -32 sc, Q3_K -4 sc, |.| <= 4096) | None; IQ4_XS's
    pieces carry a 4th item, the bytes whose activation is negated (_XV.signed)."""
    def at(k):
        return builder.add(base, ir.Constant(_I64T, k))

    def sc_lanes(sc, first):
        """<32 x i16> of 16-group scales first..first+3 (8 i16 lanes = 16 bytes each)."""
        return _shuf(builder, sc, sc, [first + k // 8 for k in range(32)])

    U = dict(pieces=[], pairs=[], d=None, dmin=None, mn=None, osc=None)
    if kind in (12, 13):                                  # Q4_K, Q5_K
        U["d"], U["dmin"] = h16(at(0)), h16(at(2))
        sc8, mn8 = _k4_scales(builder, ld(at(4), _V16I8))
        sc16 = builder.zext(sc8, _V8I16)
        qo = 16 if kind == 12 else 48
        if kind == 13:
            qh = ld(at(16), _V32I8)
        # Half H (sub-blocks 4H..4H+3) as two registers whose 16-byte lane k holds 16 weights of
        # sub-block 4H+k: A the first 16 (l < 16), B the last 16; their vpmaddubsw pair sums
        # add in i16 (|sum| <= 4*31*127) before one vpdpwssd with the 4 scales (_ksb_dot).
        nib = [(0, 15, 0), (4, 15, 0)] * 2
        for H in range(2):
            q = ld(at(qo + 64 * H), _V64I8)                # lanes: qs[64H:][16k:16k+16]
            ab = []
            for half in range(2):
                l0 = 16 * half                            # [Q.l(half), Q.l(half), Q.l(half+2), Q.l(half+2)]
                src = _shuf(builder, q, q, [l0 + b for b in range(16)] * 2 + [32 + l0 + b for b in range(16)] * 2)
                u = _fields64(builder, src, None, None, nib)
                if kind == 13:
                    h = _shuf(builder, qh, qh, [l0 + b for b in range(16)] * 4)
                    u = builder.or_(u, _bitset(builder, h, [1 << (4 * H + b // 16) for b in range(64)], 16))
                ab.append(u)
            U["pairs"].append((ab[0], ab[1], _shuf(builder, sc16, sc16, [4 * H + k // 8 for k in range(32)]), H))
        U["mn"] = builder.zext(mn8, _V8I32)
        return U
    if kind == 14:                                        # Q6_K: (ql | qh << 4) - 32
        U["d"] = h16(at(208))
        s = ld(at(192), _V16I8)
        sc = builder.sext(s, _V16I16)
        U["osc"] = builder.sub(_cv([0] * 16, _I16T), builder.shl(sc, _cv([5] * 16, _I16T)))   # -32 sc
        for h in range(2):
            ql = ld(at(64 * h), _V64I8)
            qb = _bcast32(builder, ld, at(128 + 32 * h))   # 2-bit fields 0, 1 | 2, 3 -> bits 4-5
            ua = builder.or_(builder.and_(ql, _cv([15] * 64)), _fields64(builder, qb, (0, 3, 4), (2, 3, 4)))
            ub = builder.or_(builder.lshr(ql, _cv([4] * 64)), _fields64(builder, qb, (4, 3, 4), (6, 3, 4)))
            U["pieces"] += [(ua, sc_lanes(sc, 8 * h), 2 * h), (ub, sc_lanes(sc, 8 * h + 4), 2 * h + 1)]
        return U
    if kind in (10, 11):                                  # Q2_K, Q3_K: 2-bit fields (+ Q3_K's hmask bit)
        if kind == 10:
            U["d"], U["dmin"] = h16(at(80)), h16(at(82))
            s = ld(at(0), _V16I8)
            sc = builder.zext(builder.and_(s, _cv([15] * 16)), _V16I16)
            U["mn"] = builder.zext(builder.lshr(s, _cv([4] * 16)), _V16I32)
            qo = 16
        else:
            U["d"] = h16(at(108))
            s = ld(at(94), _V16I8)                       # bytes 2..13 are the 12 scale bytes
            a8 = _shuf(builder, s, s, list(range(2, 10)))
            lo = _cat(builder, builder.and_(a8, _cv([15] * 8)), builder.lshr(a8, _cv([4] * 8)))
            b4 = _shuf(builder, s, s, [10, 11, 12, 13])
            hs = [builder.and_(builder.lshr(b4, _cv([2 * t] * 4)), _cv([3] * 4)) for t in range(4)]
            hi = _cat(builder, _cat(builder, hs[0], hs[1]), _cat(builder, hs[2], hs[3]))
            s8 = builder.sub(builder.or_(lo, builder.shl(hi, _cv([4] * 16))), _cv([32] * 16))
            sc = builder.sext(s8, _V16I16)
            U["osc"] = builder.sub(_cv([0] * 16, _I16T), builder.shl(sc, _cv([2] * 16, _I16T)))   # -4 sc
            hm = ld(at(0), _V32I8)
            hz = _cat(builder, hm, hm)
            qo = 32
        for h in range(2):
            qb = _bcast32(builder, ld, at(qo + 32 * h))
            ua = _fields64(builder, qb, (0, 3, 0), (2, 3, 0))
            ub = _fields64(builder, qb, (4, 3, 0), (6, 3, 0))
            if kind == 11:
                ua = builder.or_(ua, _bitset(builder, hz, [1 << 4 * h] * 32 + [2 << 4 * h] * 32, 4))
                ub = builder.or_(ub, _bitset(builder, hz, [4 << 4 * h] * 32 + [8 << 4 * h] * 32, 4))
            U["pieces"] += [(ua, sc_lanes(sc, 8 * h), 2 * h), (ub, sc_lanes(sc, 8 * h + 4), 2 * h + 1)]
        return U
    # IQ4_XS: |table value| (u8, <= 127) with the sign moved onto the activation (_XV.signed: x or
    # -x per byte, where the table index < 8 is a negative value), so the vpmaddubsw pairs fit i16
    # (2 * 127 * 127) and the sub-block scales go in as i16 lanes (vpdpwssd), as the K-quants
    U["d"] = h16(at(0))
    sh = builder.zext(builder.load(builder.bitcast(ld.ptr(at(2)), _I16T.as_pointer()), align=1), _I32T)
    sl4 = ld(at(4), _V4I8)
    sl = builder.zext(_shuf(builder, sl4, sl4, [0, 0, 1, 1, 2, 2, 3, 3]), _V8I32)
    slv = builder.and_(builder.lshr(sl, _cv([0, 4] * 4, _I32T)), _cv([15] * 8, _I32T))
    shs = _shuf(builder, builder.insert_element(ir.Constant(_V8I32, None), sh, ir.Constant(_I32T, 0)),
                ir.Constant(_V8I32, None), [0] * 8)
    shv = builder.and_(builder.lshr(shs, _cv([2 * j for j in range(8)], _I32T)), _cv([3] * 8, _I32T))
    ls = builder.trunc(builder.sub(builder.or_(slv, builder.shl(shv, _cv([4] * 8, _I32T))), _cv([32] * 8, _I32T)), _V8I16)
    tab = _cv([abs(int(v)) for v in KVALUES])
    for p in range(4):
        q = ld(at(8 + 32 * p), _V32I8)
        lo = builder.and_(q, _cv([15] * 32))
        hi = builder.lshr(q, _cv([4] * 32))
        idx = _shuf(builder, lo, hi, list(range(16)) + list(range(32, 48)) + list(range(16, 32)) + list(range(48, 64)))
        neg = builder.icmp_unsigned("<", idx, _cv([8] * 64))
        U["pieces"].append((_pshufb64(builder, tab, idx), _shuf(builder, ls, ls, [2 * p] * 16 + [2 * p + 1] * 16), p, neg))
    return U


def _ksb_unpack_rp(builder, kind, ld, cbase, r, nr):
    """Row r of a repacked chunk (super-block i of nr rows at byte cbase; layout: "Repacked Q4_K"),
    unpacked as _ksb_unpack unpacks ggml's bytes, into the same lanes: no byte shuffles (the
    nibbles are stored in the paired order), no 6-bit scale unpacking (stored as bytes), d and
    dmin of the row as one <2 x half> load."""
    def at(k):
        return builder.add(cbase, ir.Constant(_I64T, k))
    U = dict(pieces=[], pairs=[], d=None, dmin=None, mn=None, osc=None)
    hv = builder.fpext(ld(at(144 * nr + 4 * r), ir.VectorType(ir.HalfType(), 2)), ir.VectorType(_F32T, 2))
    U["dv"] = _shuf(builder, hv, hv, [0] * 8 + [1] * 8)          # [d] * 8 + [dmin] * 8
    sc16 = builder.zext(ld(at(128 * nr + 16 * r), _V8I8), _V8I16)
    U["mn"] = builder.zext(ld(at(128 * nr + 16 * r + 8), _V8I8), _V8I32)
    for H in range(2):
        v = ld(at(128 * r + 64 * H), _V64I8)                     # lane k: sub-block 4H+k, l | l+16 << 4
        ua = builder.and_(v, _cv([15] * 64))
        ub = _fields64(builder, v, (4, 15, 0), (4, 15, 0))
        U["pairs"].append((ua, ub, _shuf(builder, sc16, sc16, [4 * H + k // 8 for k in range(32)]), H))
    return U


def _pmaddwd16(builder, a, b):
    """<16 x i16> . <16 x i16> -> <8 x i32>, lane k = a[2k]*b[2k] + a[2k+1]*b[2k+1] (vpmaddwd ymm)."""
    if SIMD == "vnni":
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [_V16I16, _V16I16]),
                                           "llvm.x86.avx2.pmadd.wd")
        return builder.call(f, [a, b])
    p = builder.mul(builder.sext(a, _V16I32), builder.sext(b, _V16I32))
    return builder.add(_shuf(builder, p, p, list(range(0, 16, 2))), _shuf(builder, p, p, list(range(1, 16, 2))))


def _ksb_dot(builder, U, xv, bs, p8, bs16):
    """The integer sums of an unpacked super-block (_ksb_unpack) with one activation row's
    super-block (xv: its 4 zmm, bs <16 x i32> block sums, p8 <8 x i32> pair sums, bs16 the block
    sums as <16 x i16>): (isum <16 x i32>, msum <8 x i32> | None)."""
    zero16 = ir.Constant(_V16I32, [0] * 16)
    if U["osc"] is not None:          # the offset: acc starts at sum(-off * sc * bsum) (lanes 0..7)
        acc = _cat(builder, _pmaddwd16(builder, U["osc"], bs16), ir.Constant(_V8I32, [0] * 8))
    else:
        acc = zero16
    for u, sc16, p, *neg in U["pieces"]:
        acc = _mdot(builder, acc, u, xv.signed(p, neg[0]) if neg else xv[p], sc16)
    for ua, ub, sc16, H in U["pairs"]:
        acc = _mdot2(builder, acc, ua, xv.half(H, 0), ub, xv.half(H, 1), sc16)
    msum = None
    if U["mn"] is not None:
        if U["mn"].type.count == 8:
            msum = builder.mul(U["mn"], p8)
        else:
            m16 = builder.mul(U["mn"], bs)
            msum = builder.add(_shuf(builder, m16, m16, list(range(8))), _shuf(builder, m16, m16, list(range(8, 16))))
    return acc, msum


class _RawLoader:
    """Loads from the raw bytes (ld(off, vty)); ptr(off) is the i8 pointer."""
    def __init__(self, ctx, builder, aty, arr):
        self.ctx, self.builder, self.aty, self.arr = ctx, builder, aty, arr

    def ptr(self, off):
        return _elem_ptr(self.ctx, self.builder, self.aty, self.arr, off, _I8T)

    def __call__(self, off, vty):
        return self.builder.load(self.builder.bitcast(self.ptr(off), vty.as_pointer()), align=1)


def _ksb_common(ctx, builder, raw_aty, raw_):
    ld = _RawLoader(ctx, builder, raw_aty, raw_)

    def h16(off):
        h = builder.load(builder.bitcast(ld.ptr(off), ir.HalfType().as_pointer()), align=1)
        return builder.fpext(h, _F32T)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F32, [_V16F32] * 3), "llvm.fma.v16f32")

    def acc_into(accp, k, isum, msum, xdi, U):
        """The one float step per super-block, accp[k : k+16] += f32(v) * sv: without mins
        v = isum, sv = xd*d; with mins v = [isum lanes i + i+8 (8), msum (8)], sv = [xd*d (8),
        xd*dmin (8)] (_kout takes sum(lanes 0..7) - sum(lanes 8..15))."""
        if "sv" in U:                 # the caller's xd * dv (the same products, taken for NR rows at once)
            sv = U["sv"]
        else:
            if "dv" not in U:         # [d] * 16 or [d] * 8 + [dmin] * 8, once per unpacked super-block
                e = builder.insert_element(ir.Constant(_V16F32, None), U["d"], ir.Constant(_I32T, 0))
                if U["mn"] is None:
                    U["dv"] = _shuf(builder, e, e, [0] * 16)
                else:
                    e = builder.insert_element(e, U["dmin"], ir.Constant(_I32T, 1))
                    U["dv"] = _shuf(builder, e, e, [0] * 8 + [1] * 8)
            x1 = builder.insert_element(ir.Constant(_V16F32, None), xdi, ir.Constant(_I32T, 0))
            sv = builder.fmul(_shuf(builder, x1, x1, [0] * 16), U["dv"], flags=EXACT)
        if msum is None:
            v = isum
        else:
            v = _cat(builder, builder.add(_shuf(builder, isum, isum, list(range(8))),
                                          _shuf(builder, isum, isum, list(range(8, 16)))), msum)
        ap = builder.bitcast(builder.gep(accp, [ir.Constant(_I32T, k)]), _V16F32.as_pointer())
        builder.store(builder.call(fma, [builder.sitofp(v, _V16F32), sv, builder.load(ap, align=4)]), ap, align=4)

    def act(aty_q, xq_, aty_s, xs_, aty_d, xd_, xo, so, do):
        """One activation row's super-block: (4 zmm of xq from xo, bs, p8, xd)."""
        xv = _XV(builder, [builder.load(_elem_ptr(ctx, builder, aty_q, xq_, builder.add(xo, ir.Constant(_I64T, 64 * p)),
                                                _V64I8), align=1) for p in range(4)])
        bs = builder.fptosi(builder.load(_elem_ptr(ctx, builder, aty_s, xs_, so, _V16F32), align=4), _V16I32)
        p8 = builder.add(_shuf(builder, bs, bs, list(range(0, 16, 2))), _shuf(builder, bs, bs, list(range(1, 16, 2))))
        return (xv, bs, p8, builder.trunc(bs, _V16I16),
                builder.load(_elem_ptr(ctx, builder, aty_d, xd_, do, _F32T), align=4))
    return ld, h16, acc_into, act


def _prefetch_lines(builder, ld, off, n):
    pf = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_I8T.as_pointer(), _I32T, _I32T, _I32T]), "llvm.prefetch.p0")
    for k in range(n):
        builder.call(pf, [ld.ptr(builder.add(off, ir.Constant(_I64T, 64 * k))), ir.Constant(_I32T, 0),
                          ir.Constant(_I32T, 3), ir.Constant(_I32T, 1)])


def _as64(builder, v):
    return builder.sext(v, _I64T) if v.type.width < 64 else v


@intrinsic
def _ksb(typingctx, accp, raw, qoff, rb, xq, xd, xs, i, pfo, NR, KIND):
    """GEMV: super-block i of NR rows (see the section comment); prefetches NR*type_size bytes of
    raw from byte pfo on (the caller maps super-blocks onto a linear stream ahead)."""
    if not (isinstance(NR, types.IntegerLiteral) and isinstance(KIND, types.IntegerLiteral)):
        return None
    nr, kind = NR.literal_value, KIND.literal_value
    if kind not in _KTS:
        return None
    ts = _KTS[kind]

    def codegen(ctx, builder, sig, args):
        accp_, raw_, qoff_, rb_, xq_, xd_, xs_, i_, pfo_ = args[:9]
        i64 = _as64(builder, i_)
        ld, h16, acc_into, act = _ksb_common(ctx, builder, sig.args[1], raw_)
        _prefetch_lines(builder, ld, pfo_, (nr * ts + 63) // 64)
        xv, bs, p8, bs16, xdi = act(sig.args[4], xq_, sig.args[6], xs_, sig.args[5], xd_,
                                    builder.mul(i64, ir.Constant(_I64T, 256)), builder.mul(i64, ir.Constant(_I64T, 16)), i64)
        chunk = builder.add(qoff_, builder.mul(i64, ir.Constant(_I64T, nr * ts)))   # repacked: NR rows' chunk
        if kind in _RP_KINDS:         # the NR rows' [d, dmin] as one load and convert, times xd once
            hv = builder.fpext(ld(builder.add(chunk, ir.Constant(_I64T, 144 * nr)), ir.VectorType(ir.HalfType(), 2 * nr)),
                               ir.VectorType(_F32T, 2 * nr))
            x1 = builder.insert_element(ir.Constant(ir.VectorType(_F32T, 2 * nr), None), xdi, ir.Constant(_I32T, 0))
            svv = builder.fmul(_shuf(builder, x1, x1, [0] * (2 * nr)), hv, flags=EXACT)
        for r in range(nr):
            if kind in _RP_KINDS:
                U = _ksb_unpack_rp(builder, kind, ld, chunk, r, nr)
                U["sv"] = _shuf(builder, svv, svv, [2 * r] * 8 + [2 * r + 1] * 8)   # = xd * [d]*8 + [dmin]*8
            else:
                base = builder.add(builder.add(qoff_, builder.mul(rb_, ir.Constant(_I64T, r))),
                                   builder.mul(i64, ir.Constant(_I64T, ts)))
                U = _ksb_unpack(builder, kind, ld, h16, base)
            isum, msum = _ksb_dot(builder, U, xv, bs, p8, bs16)
            acc_into(accp_, 16 * r, isum, msum, xdi, U)
        return ir.Constant(_I8T, 0)
    return types.int8(accp, raw, qoff, rb, xq, xd, xs, i, pfo, NR, KIND), codegen


@intrinsic
def _ksb_mt(typingctx, accp, raw, roff, rb, XQ, XD, XS, t0, i, NT, NR, KIND):
    """GEMM: super-block i of NR rows (at bytes roff, roff + rb, ... of raw) against the
    activation rows t0 .. t0+NT-1 of XQ/XD/XS (2-D): each row is unpacked once, then per token
    the activation is loaded (and rearranged) once for the NR rows, and per (row, token) exactly
    the integer sums and float step of _ksb (so decode and prefill agree bit for bit);
    accp[16(NR t + r) :][:16] is the accumulator of row r and token t0+t."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (NT, NR, KIND)):
        return None
    nt, nr, kind = NT.literal_value, NR.literal_value, KIND.literal_value
    if kind not in _KTS or any(a.layout != "C" for a in (XQ, XD, XS)):
        return None
    ts = _KTS[kind]

    def codegen(ctx, builder, sig, args):
        accp_, raw_, roff_, rb_, XQ_, XD_, XS_, t0_, i_ = args[:9]
        i64 = _as64(builder, i_)
        t064 = _as64(builder, t0_)
        ld, h16, acc_into, act = _ksb_common(ctx, builder, sig.args[1], raw_)
        if kind in _RP_KINDS:
            chunk = builder.add(roff_, builder.mul(i64, ir.Constant(_I64T, nr * ts)))
            Us = [_ksb_unpack_rp(builder, kind, ld, chunk, r, nr) for r in range(nr)]
        else:
            base = builder.add(roff_, builder.mul(i64, ir.Constant(_I64T, ts)))
            Us = [_ksb_unpack(builder, kind, ld, h16, builder.add(base, builder.mul(rb_, ir.Constant(_I64T, r))))
                  for r in range(nr)]
        aq = ctx.make_array(sig.args[4])(ctx, builder, XQ_)
        ad = ctx.make_array(sig.args[5])(ctx, builder, XD_)
        as_ = ctx.make_array(sig.args[6])(ctx, builder, XS_)
        kq = builder.extract_value(aq.shape, 1)            # row strides in elements (C-contiguous rows)
        kd = builder.extract_value(ad.shape, 1)
        ks = builder.extract_value(as_.shape, 1)
        for t in range(nt):
            tt = builder.add(t064, ir.Constant(_I64T, t))
            xo = builder.add(builder.mul(tt, kq), builder.mul(i64, ir.Constant(_I64T, 256)))
            so = builder.add(builder.mul(tt, ks), builder.mul(i64, ir.Constant(_I64T, 16)))
            do = builder.add(builder.mul(tt, kd), i64)
            xv, bs, p8, bs16, xdi = act(sig.args[4], XQ_, sig.args[6], XS_, sig.args[5], XD_, xo, so, do)
            for r, U in enumerate(Us):
                isum, msum = _ksb_dot(builder, U, xv, bs, p8, bs16)
                acc_into(accp_, 16 * (nr * t + r), isum, msum, xdi, U)
        return ir.Constant(_I8T, 0)
    return types.int8(accp, raw, roff, rb, XQ, XD, XS, t0, i, NT, NR, KIND), codegen


@intrinsic
def _kout(typingctx, accp, off, KIND):
    """A row's result from its 16 f32 accumulator lanes at accp[off:]: sum(lanes 0..7) -
    sum(lanes 8..15) for the formats with mins (Q2_K, Q4_K, Q5_K), else the sum of all 16
    (shuffle trees flagged simd.EXACT: the same tree in the GEMV and the GEMM, wherever inlined)."""
    if not isinstance(KIND, types.IntegerLiteral):
        return None
    mins = KIND.literal_value in (10, 12, 13, 112)

    def tree(builder, v, n):
        while n > 1:
            h = n // 2
            v = builder.fadd(_shuf(builder, v, v, list(range(h))), _shuf(builder, v, v, list(range(h, n))), flags=EXACT)
            n = h
        return builder.extract_element(v, ir.Constant(_I32T, 0))

    def codegen(ctx, builder, sig, args):
        p = builder.bitcast(builder.gep(args[0], [args[1]]), _V16F32.as_pointer())
        v = builder.load(p, align=4)
        if not mins:
            return tree(builder, v, 16)
        return builder.fsub(tree(builder, _shuf(builder, v, v, list(range(8))), 8),
                            tree(builder, _shuf(builder, v, v, list(range(8, 16))), 8), flags=EXACT)
    return types.float32(accp, off, KIND), codegen


@njit(**dict(_JIT, inline="always"))
def _k_groups(xq, xd, xs, raw, out, g0, g1, KIND, TS):
    """Row groups g0..g1-1 (4 rows each) of a K-quant gemv: per group one pass over the
    super-blocks with the 4 rows together (_ksb), the rows 16 ahead prefetched as a linear stream."""
    N = raw.shape[0]
    rb = raw.shape[1]
    nsb = rb // TS
    PF = 16 * rb
    accp = _stack_f32(64)                 # 4 rows x 16 f32 lanes
    acc = numba.carray(accp, 64)
    for g in range(g0, g1):
        r0 = 4 * g
        for k in range(64):
            acc[k] = 0.0
        q0 = r0 * rb
        if r0 + 4 <= N:
            for i in range(nsb):
                _ksb(accp, raw, q0, rb, xq, xd, xs, i, q0 + PF + 4 * TS * i, 4, KIND)
            nr = 4
        else:
            nr = N - r0
            for rr in range(nr):
                for i in range(nsb):
                    _ksb(_ptr_add(accp, 16 * rr), raw, q0 + rr * rb, rb, xq, xd, xs, i, q0 + PF + TS * i, 1, KIND)
        for rr in range(nr):
            out[r0 + rr] = _kout(accp, 16 * rr, KIND)


_MT = 8       # tokens per pass of the K-quant GEMM (one unpacked super-block serves them all)


@njit(**dict(_JIT, inline="always"))
def _k_gemm_pass(XQ, XD, XS, raw, out, t0, r, rb, nsb, accp, acc, NT, NR, KIND):
    """out[t0 : t0+NT, r : r+NR] by one pass over the rows' super-blocks (_ksb_mt)."""
    for k in range(16 * NT * NR):
        acc[k] = 0.0
    for i in range(nsb):
        _ksb_mt(accp, raw, r * rb, rb, XQ, XD, XS, t0, i, NT, NR, KIND)
    for t in range(NT):
        for rr in range(NR):
            out[t0 + t, r + rr] = _kout(accp, 16 * (NR * t + rr), KIND)


@njit(**dict(_JIT, inline="always"))
def _k_gemm_groups(XQ, XD, XS, raw, out, M, g0, g1, KIND, TS, NR):
    """Row groups g0..g1-1 of out[:M] = X[:M] @ W.T (K-quants): per NR rows (4: Q4_K/Q5_K, whose
    paired activation layout is then built once per token for the 4 rows; 2: the others: 2 rows
    share each token's activation loads and offset sums, 1.2-1.4x the GEMM speed of 1 row; 4 rows
    of these formats measured no faster than 1, their unpacked super-blocks spill) and
    block of _MT tokens one pass over the rows' super-blocks, each unpacked once for the _MT
    tokens (_ksb_mt); then a block of 4 tokens and single tokens for the rest; a last group of
    fewer than 4 rows one row and token at a time. Per (row, token) the same arithmetic as
    _k_groups."""
    N = raw.shape[0]
    rb = raw.shape[1]
    nsb = rb // TS
    accp = _stack_f32(512)                # _MT (8) tokens x up to 4 rows x 16 f32 lanes
    acc = numba.carray(accp, 512)
    for g in range(g0, g1):
        if 4 * g + 4 <= N:
            for r in range(4 * g, 4 * g + 4, NR):
                m4 = 0
                for t0 in range(0, M - _MT + 1, _MT):
                    _k_gemm_pass(XQ, XD, XS, raw, out, t0, r, rb, nsb, accp, acc, _MT, NR, KIND)
                    m4 = t0 + _MT
                if M - m4 >= 4:
                    _k_gemm_pass(XQ, XD, XS, raw, out, m4, r, rb, nsb, accp, acc, 4, NR, KIND)
                    m4 += 4
                for t0 in range(m4, M):
                    _k_gemm_pass(XQ, XD, XS, raw, out, t0, r, rb, nsb, accp, acc, 1, NR, KIND)
        else:
            for rr in range(4 * g, N):
                for t0 in range(M):
                    _k_gemm_pass(XQ, XD, XS, raw, out, t0, rr, rb, nsb, accp, acc, 1, 1, KIND)


# ---- IQ4_NL: tiles of rows x tokens (LLVM IR) -----------------------------------------------
# _nl_tile(accp, raw, roff, rb, XQ, XD, XS, t0, b, pfo, NT, NR, NB, PF): blocks b .. b+NB-1 (NB 2:
# a pair of 32-blocks in one zmm; 1: a last odd block, lanes 0..7) of the NR rows at bytes roff,
# roff + rb, .. of raw against the tokens t0 .. t0+NT-1 of the q8_0 slots (2-D; 1-D: one token).
#   * per row, once for the NT tokens: the pair's 2 x 16 nibble bytes become 64 unsigned bytes of
#     the table + 128 (one vpshufb zmm), its two fp16 scales [d0] * 8 + [d1] * 8;
#   * per token, once for the NR rows: the 64 activation bytes, [xd_b] * 8 + [xd_b+1] * 8 and the
#     offset -128 * sum(xq of the block) (xs: lane 0 of each block's 8 lanes);
#   * per (row, token): one vpdpbusd from the offset (the int32 lanes sum to sum(kv * xq) exactly),
#     one product d * xd (EXACT: IEEE, no reassociation) and one fma into 16 f32 lanes at
#     accp[16 (NR t + r):] (lanes 0..7 even blocks, 8..15 odd blocks); out = _kout's 16-lane tree.
# The GEMV is this tile with NT = 1, so every (row, token) of a GEMM has the GEMV's bits.

@intrinsic
def _nl_tile(typingctx, accp, raw, roff, rb, XQ, XD, XS, t0, b, pfo, NT, NR, NB, PF):
    lits = (NT, NR, NB, PF)
    if not all(isinstance(a, types.IntegerLiteral) for a in lits):
        return None
    nt, nr, nbk, npf = (a.literal_value for a in lits)
    if nbk not in (1, 2) or any(a.layout != "C" or a.ndim != XQ.ndim for a in (XQ, XD, XS)):
        return None

    def codegen(ctx, builder, sig, args):
        accp_, raw_, roff_, rb_, XQ_, XD_, XS_, t0_, b_, pfo_ = args[:10]
        b64 = _as64(builder, b_)
        ld = _RawLoader(ctx, builder, sig.args[1], raw_)
        if npf:
            _prefetch_lines(builder, ld, pfo_, npf)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F32, [_V16F32] * 3), "llvm.fma.v16f32")
        tab = _cv(_KV128)
        f2 = ir.VectorType(_F32T, 2)
        lanes2 = [0] * 8 + [1] * 8
        # rows: u (64 x u8) and d lanes
        Us = []
        for r in range(nr):
            o = builder.add(builder.add(roff_, builder.mul(rb_, ir.Constant(_I64T, r))),
                            builder.mul(b64, ir.Constant(_I64T, 18)))
            q0 = ld(builder.add(o, ir.Constant(_I64T, 2)), _V16I8)
            h0 = builder.load(builder.bitcast(ld.ptr(o), ir.HalfType().as_pointer()), align=1)
            if nbk == 2:
                q1 = ld(builder.add(o, ir.Constant(_I64T, 20)), _V16I8)
                h1 = builder.load(builder.bitcast(ld.ptr(builder.add(o, ir.Constant(_I64T, 18))),
                                                  ir.HalfType().as_pointer()), align=1)
            else:
                q1 = ir.Constant(_V16I8, [0] * 16)
                h1 = ir.Constant(ir.HalfType(), 0.0)
            v = _cat(builder, q0, q1)
            lo = builder.and_(v, _cv([15] * 32))
            hi = builder.lshr(v, _cv([4] * 32))
            idx = _shuf(builder, lo, hi, list(range(16)) + list(range(32, 48)) + list(range(16, 32)) + list(range(48, 64)))
            u = _pshufb64(builder, tab, idx)
            hv = builder.insert_element(ir.Constant(ir.VectorType(ir.HalfType(), 2), None), h0, ir.Constant(_I32T, 0))
            hv = builder.insert_element(hv, h1, ir.Constant(_I32T, 1))
            dv = builder.fpext(hv, f2)
            Us.append((u, _shuf(builder, dv, dv, lanes2)))

        def stride(k):
            if sig.args[4 + k].ndim == 1:
                return ir.Constant(_I64T, 0)
            a = ctx.make_array(sig.args[4 + k])(ctx, builder, args[4 + k])
            return builder.extract_value(a.shape, 1)
        kq, kd, ks = stride(0), stride(1), stride(2)
        t064 = _as64(builder, t0_)
        for t in range(nt):
            tt = builder.add(t064, ir.Constant(_I64T, t))
            xo = builder.add(builder.mul(tt, kq), builder.mul(b64, ir.Constant(_I64T, 32)))
            if nbk == 2:
                x = builder.load(_elem_ptr(ctx, builder, sig.args[4], XQ_, xo, _V64I8), align=1)
            else:
                x = _cat(builder, builder.load(_elem_ptr(ctx, builder, sig.args[4], XQ_, xo, _V32I8), align=1),
                         ir.Constant(_V32I8, [0] * 32))

            def two(k, kk):
                p = builder.add(builder.mul(tt, kk), b64)
                a0 = builder.load(_elem_ptr(ctx, builder, sig.args[4 + k], args[4 + k], p, _F32T), align=4)
                e = builder.insert_element(ir.Constant(f2, None), a0, ir.Constant(_I32T, 0))
                if nbk == 2:
                    a1 = builder.load(_elem_ptr(ctx, builder, sig.args[4 + k], args[4 + k],
                                                builder.add(p, ir.Constant(_I64T, 1)), _F32T), align=4)
                else:
                    a1 = ir.Constant(_F32T, 0.0)
                return builder.insert_element(e, a1, ir.Constant(_I32T, 1))
            xdv = two(1, kd)
            xdv = _shuf(builder, xdv, xdv, lanes2)
            sv = builder.mul(builder.fptosi(two(2, ks), ir.VectorType(_I32T, 2)), _cv([-128, -128], _I32T))
            bias = _shuf(builder, sv, ir.Constant(ir.VectorType(_I32T, 2), [0, 0]), [0] + [2] * 7 + [1] + [2] * 7)
            for r, (u, dv) in enumerate(Us):
                isum = _dot4_64(builder, bias, u, x)
                sc = builder.fmul(dv, xdv, flags=EXACT)
                ap = builder.bitcast(builder.gep(accp_, [ir.Constant(_I32T, 16 * (nr * t + r))]), _V16F32.as_pointer())
                builder.store(builder.call(fma, [builder.sitofp(isum, _V16F32), sc, builder.load(ap, align=4)]), ap, align=4)
        return ir.Constant(_I8T, 0)
    return types.int8(accp, raw, roff, rb, XQ, XD, XS, t0, b, pfo, NT, NR, NB, PF), codegen


@njit(**dict(_JIT, inline="always"))
def _nl_pass(XQ, XD, XS, raw, accp, acc, t0, q0, rb, nb, pf, NT, NR, PF):
    """accp[: 16 NT NR] = the lanes of rows at bytes q0, q0 + rb, .. (NR) and tokens t0 .. t0+NT-1
    over the row's nb blocks (pairs, then a last odd block); PF lines prefetched per pair from
    byte pf on (a linear stream of 4 * 36 bytes per pair)."""
    for k in range(16 * NT * NR):
        acc[k] = 0.0
    np2 = nb // 2 * 2
    for b in range(0, np2, 2):
        _nl_tile(accp, raw, q0, rb, XQ, XD, XS, t0, b, pf + 72 * b, NT, NR, 2, PF)
    if nb > np2:
        _nl_tile(accp, raw, q0, rb, XQ, XD, XS, t0, np2, 0, NT, NR, 1, 0)


@njit(**_JIT)
def gemv_iq4_nl_groups(xq, xd, xs, raw, out, g0, g1):
    """IQ4_NL: rows 4*g0 .. min(4*g1, N)-1 of W @ x, activation in q8_0 slots (_nl_tile, 4 rows
    per pass, the rows 16 ahead prefetched as a linear stream)."""
    N = raw.shape[0]
    rb = raw.shape[1]
    nb = rb // 18
    accp = _stack_f32(64)
    acc = numba.carray(accp, 64)
    for g in range(g0, g1):
        r0 = 4 * g
        q0 = r0 * rb
        if r0 + 4 <= N:
            _nl_pass(xq, xd, xs, raw, accp, acc, 0, q0, rb, nb, q0 + 16 * rb, 1, 4, 3)
            for rr in range(4):
                out[r0 + rr] = _kout(accp, 16 * rr, 20)
        else:
            for r in range(r0, N):
                _nl_pass(xq, xd, xs, raw, accp, acc, 0, r * rb, rb, nb, 0, 1, 1, 0)
                out[r] = _kout(accp, 0, 20)


_NL_NT = 4    # tokens per IQ4_NL GEMM pass
_NL_NR = 4    # rows per IQ4_NL GEMM pass


@njit(**_JIT)
def gemm_iq4_nl_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """IQ4_NL: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T: tiles of 4 rows x _NL_NT
    tokens (then single tokens), each block pair unpacked once per tile; per (row, token) the
    GEMV's arithmetic (_nl_tile)."""
    N = raw.shape[0]
    rb = raw.shape[1]
    nb = rb // 18
    accp = _stack_f32(256)                # up to 4 tokens x 4 rows x 16 f32 lanes
    acc = numba.carray(accp, 256)
    for g in range(g0, g1):
        r0 = 4 * g
        if r0 + 4 <= N:
            m4 = 0
            for t0 in range(0, M - _NL_NT + 1, _NL_NT):
                _nl_pass(XQ, XD, XS, raw, accp, acc, t0, r0 * rb, rb, nb, 0, _NL_NT, _NL_NR, 0)
                for t in range(_NL_NT):
                    for rr in range(_NL_NR):
                        out[t0 + t, r0 + rr] = _kout(accp, 16 * (_NL_NR * t + rr), 20)
                m4 = t0 + _NL_NT
            for t0 in range(m4, M):
                _nl_pass(XQ, XD, XS, raw, accp, acc, t0, r0 * rb, rb, nb, 0, 1, 4, 0)
                for rr in range(4):
                    out[t0, r0 + rr] = _kout(accp, 16 * rr, 20)
        else:
            for r in range(r0, N):
                for t0 in range(M):
                    _nl_pass(XQ, XD, XS, raw, accp, acc, t0, r * rb, rb, nb, 0, 1, 1, 0)
                    out[t0, r] = _kout(accp, 0, 20)


# ---- row dot products: row uint8[row_bytes], activation slots -> f32 ------------------------
# Weights are unpacked to unsigned bytes (u8 x s8 products for vpdpbusd); a format's offset
# (Q5_0 -16, Q3_K -4, Q6_K -32, IQ4 table + 128) is taken off with the activation block sums.

@njit(**_JIT)
def _u16(row, o):
    return np.uint16(row[o]) | (np.uint16(row[o + 1]) << np.uint16(8))


@njit(**_JIT)
def _facc_zero(fp):
    a = numba.carray(fp, 8)
    for i in range(8):
        a[i] = 0.0


# 32-block rows: even and odd blocks go to two f32 accumulators (two fma chains: one chain is
# latency-bound at ~4 cycles per block). Their scalar float chains (the offset's `corr`, the final
# sums) are compiled without reassociation or contraction (_AJIT's flags, see simd.EXACT): LLVM
# inlines a row into the GEMV and into the GEMM, and with fast-math it ordered them differently
# there on the generic path (IQ4_NL prefill rows one ulp off decode's; tests/test_row_kernels.py).
_RJIT = _AJIT

@njit(**_RJIT)
def _row_q4_1(row, xq, xd, xs, pfd):
    nb = row.shape[0] // 20
    fp = _stack_f32(16)
    _facc_zero(fp)
    _facc_zero(_ptr_add(fp, 8))
    corr = np.float32(0.0)
    for b in range(nb):
        o = 20 * b
        _prefetch(row, o + pfd)
        _dpnf(_ptr_add(fp, 8 * (b & 1)), _h2f(_u16(row, o)) * xd[b], row, o + 4, o, 0, xq, 32 * b)
        corr += _h2f(_u16(row, o + 2)) * xs[b]          # the min: m * (ggml's s = xd * sum(xq))
    return (_hsum8f(fp) + _hsum8f(_ptr_add(fp, 8))) + corr


@njit(**_RJIT)
def _row_q5_1(row, xq, xd, xs, pfd):
    nb = row.shape[0] // 24
    fp = _stack_f32(16)
    _facc_zero(fp)
    _facc_zero(_ptr_add(fp, 8))
    corr = np.float32(0.0)
    for b in range(nb):
        o = 24 * b
        _prefetch(row, o + pfd)
        _dpnf(_ptr_add(fp, 8 * (b & 1)), _h2f(_u16(row, o)) * xd[b], row, o + 8, o + 4, 1, xq, 32 * b)
        corr += _h2f(_u16(row, o + 2)) * xs[b]
    return (_hsum8f(fp) + _hsum8f(_ptr_add(fp, 8))) + corr


@njit(**_RJIT)
def _row_q5_0(row, xq, xd, xs, pfd):
    nb = row.shape[0] // 22
    fp = _stack_f32(16)
    _facc_zero(fp)
    _facc_zero(_ptr_add(fp, 8))
    corr = np.float32(0.0)
    for b in range(nb):
        o = 22 * b
        _prefetch(row, o + pfd)
        sc = _h2f(_u16(row, o)) * xd[b]
        _dpnf(_ptr_add(fp, 8 * (b & 1)), sc, row, o + 6, o + 2, 1, xq, 32 * b)
        corr += sc * xs[b]                  # the -16 offset: 16 * d * xd * sum(xq)
    return (_hsum8f(fp) + _hsum8f(_ptr_add(fp, 8))) + np.float32(-16.0) * corr


# ---- row-group kernels (what the executor calls) and prange wrappers ------------------------
# gemv_<type>_groups(xq, xd, xs, raw, out, g0, g1): out[r] = W[r] . x for r in 4*g0 .. min(4*g1, N)-1,
# from the activation slots filled by act_quant_<kind>. No allocation, no prange, no shared state:
# concurrent calls on disjoint row groups are safe.

_GSIG = types.void(types.int8[::1], types.float32[::1], types.float32[::1], _RO_U8_2D,
                  types.float32[::1], types.int64, types.int64)
_GGSIG = types.void(types.int8[:, ::1], types.float32[:, ::1], types.float32[:, ::1], _RO_U8_2D,
                   types.float32[:, ::1], types.int64, types.int64, types.int64)
_GEMM_GROUPS = 4      # row groups (16 weight rows) per GEMM task: reused from L1/L2 across tokens
_PF_ROWS = 2          # software prefetch distance in rows (each block loop prefetches its bytes
                      # in row r + _PF_ROWS: without it the hardware prefetcher does not run far
                      # enough ahead and memory time adds to compute time)


@njit(**_JIT)
def gemv_q4_1_groups(xq, xd, xs, raw, out, g0, g1):
    """Q4_1: rows 4*g0 .. min(4*g1, N)-1 of W @ x, activation in q8_1 slots."""
    N = raw.shape[0]
    r1 = min(4 * g1, N)
    for r in range(4 * g0, r1):
        pfd = _PF_ROWS * raw.shape[1] if r + _PF_ROWS < N else 0
        out[r] = _row_q4_1(raw[r], xq, xd, xs, pfd)


@njit(**_PJIT)
def _gemv_par_q4_1(x, raw, out, xq, xd, xs):
    act_quant_q8_1(x, xq, xd, xs)
    ng = (raw.shape[0] + 3) // 4
    for g in prange(ng):
        gemv_q4_1_groups(xq, xd, xs, raw, out, g, g + 1)


@njit(**_JIT)
def gemm_q4_1_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """Q4_1: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T, one token at a time."""
    for g in range(g0, g1):          # the 4 rows stay in L1 across the tokens
        for m in range(M):
            gemv_q4_1_groups(XQ[m], XD[m], XS[m], raw, out[m], g, g + 1)


@njit(**_PJIT)
def _gemm_par_q4_1(x, raw, out, xq, xd, xs):
    M = x.shape[0]
    for t in prange(M):
        act_quant_q8_1(x[t], xq[t], xd[t], xs[t])
    ng = (raw.shape[0] + 3) // 4
    nt = (ng + _GEMM_GROUPS - 1) // _GEMM_GROUPS
    for task in prange(nt):
        g0 = task * _GEMM_GROUPS
        gemm_q4_1_groups(xq, xd, xs, raw, out, M, g0, min(g0 + _GEMM_GROUPS, ng))


@njit(**_JIT)
def gemv_q5_0_groups(xq, xd, xs, raw, out, g0, g1):
    """Q5_0: rows 4*g0 .. min(4*g1, N)-1 of W @ x, activation in q8_0 slots."""
    N = raw.shape[0]
    r1 = min(4 * g1, N)
    for r in range(4 * g0, r1):
        pfd = _PF_ROWS * raw.shape[1] if r + _PF_ROWS < N else 0
        out[r] = _row_q5_0(raw[r], xq, xd, xs, pfd)


@njit(**_PJIT)
def _gemv_par_q5_0(x, raw, out, xq, xd, xs):
    act_quant_q8_0(x, xq, xd, xs)
    ng = (raw.shape[0] + 3) // 4
    for g in prange(ng):
        gemv_q5_0_groups(xq, xd, xs, raw, out, g, g + 1)


@njit(**_JIT)
def gemm_q5_0_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """Q5_0: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T, one token at a time."""
    for g in range(g0, g1):          # the 4 rows stay in L1 across the tokens
        for m in range(M):
            gemv_q5_0_groups(XQ[m], XD[m], XS[m], raw, out[m], g, g + 1)


@njit(**_PJIT)
def _gemm_par_q5_0(x, raw, out, xq, xd, xs):
    M = x.shape[0]
    for t in prange(M):
        act_quant_q8_0(x[t], xq[t], xd[t], xs[t])
    ng = (raw.shape[0] + 3) // 4
    nt = (ng + _GEMM_GROUPS - 1) // _GEMM_GROUPS
    for task in prange(nt):
        g0 = task * _GEMM_GROUPS
        gemm_q5_0_groups(xq, xd, xs, raw, out, M, g0, min(g0 + _GEMM_GROUPS, ng))


@njit(**_JIT)
def gemv_q5_1_groups(xq, xd, xs, raw, out, g0, g1):
    """Q5_1: rows 4*g0 .. min(4*g1, N)-1 of W @ x, activation in q8_1 slots."""
    N = raw.shape[0]
    r1 = min(4 * g1, N)
    for r in range(4 * g0, r1):
        pfd = _PF_ROWS * raw.shape[1] if r + _PF_ROWS < N else 0
        out[r] = _row_q5_1(raw[r], xq, xd, xs, pfd)


@njit(**_PJIT)
def _gemv_par_q5_1(x, raw, out, xq, xd, xs):
    act_quant_q8_1(x, xq, xd, xs)
    ng = (raw.shape[0] + 3) // 4
    for g in prange(ng):
        gemv_q5_1_groups(xq, xd, xs, raw, out, g, g + 1)


@njit(**_JIT)
def gemm_q5_1_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """Q5_1: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T, one token at a time."""
    for g in range(g0, g1):          # the 4 rows stay in L1 across the tokens
        for m in range(M):
            gemv_q5_1_groups(XQ[m], XD[m], XS[m], raw, out[m], g, g + 1)


@njit(**_PJIT)
def _gemm_par_q5_1(x, raw, out, xq, xd, xs):
    M = x.shape[0]
    for t in prange(M):
        act_quant_q8_1(x[t], xq[t], xd[t], xs[t])
    ng = (raw.shape[0] + 3) // 4
    nt = (ng + _GEMM_GROUPS - 1) // _GEMM_GROUPS
    for task in prange(nt):
        g0 = task * _GEMM_GROUPS
        gemm_q5_1_groups(xq, xd, xs, raw, out, M, g0, min(g0 + _GEMM_GROUPS, ng))


@njit(**_PJIT)
def _gemv_par_iq4_nl(x, raw, out, xq, xd, xs):
    act_quant_q8_0(x, xq, xd, xs)
    ng = (raw.shape[0] + 3) // 4
    for g in prange(ng):
        gemv_iq4_nl_groups(xq, xd, xs, raw, out, g, g + 1)


@njit(**_PJIT)
def _gemm_par_iq4_nl(x, raw, out, xq, xd, xs):
    M = x.shape[0]
    for t in prange(M):
        act_quant_q8_0(x[t], xq[t], xd[t], xs[t])
    ng = (raw.shape[0] + 3) // 4
    nt = (ng + _GEMM_GROUPS - 1) // _GEMM_GROUPS
    for task in prange(nt):
        g0 = task * _GEMM_GROUPS
        gemm_iq4_nl_groups(xq, xd, xs, raw, out, M, g0, min(g0 + _GEMM_GROUPS, ng))


@njit(**_JIT)
def gemv_q2_k_groups(xq, xd, xs, raw, out, g0, g1):
    """Q2_K: rows 4*g0 .. min(4*g1, N)-1 of W @ x, activation in q8_K slots."""
    _k_groups(xq, xd, xs, raw, out, g0, g1, 10, 84)


@njit(**_PJIT)
def _gemv_par_q2_k(x, raw, out, xq, xd, xs):
    act_quant_q8_k(x, xq, xd, xs)
    ng = (raw.shape[0] + 3) // 4
    for g in prange(ng):
        gemv_q2_k_groups(xq, xd, xs, raw, out, g, g + 1)


@njit(**_JIT)
def gemm_q2_k_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """Q2_K: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T, activations in q8_K slots (2-D)."""
    _k_gemm_groups(XQ, XD, XS, raw, out, M, g0, g1, 10, 84, 2)


@njit(**_PJIT)
def _gemm_par_q2_k(x, raw, out, xq, xd, xs):
    M = x.shape[0]
    for t in prange(M):
        act_quant_q8_k(x[t], xq[t], xd[t], xs[t])
    ng = (raw.shape[0] + 3) // 4
    nt = (ng + _GEMM_GROUPS - 1) // _GEMM_GROUPS
    for task in prange(nt):
        g0 = task * _GEMM_GROUPS
        gemm_q2_k_groups(xq, xd, xs, raw, out, M, g0, min(g0 + _GEMM_GROUPS, ng))


@njit(**_JIT)
def gemv_q3_k_groups(xq, xd, xs, raw, out, g0, g1):
    """Q3_K: rows 4*g0 .. min(4*g1, N)-1 of W @ x, activation in q8_K slots."""
    _k_groups(xq, xd, xs, raw, out, g0, g1, 11, 110)


@njit(**_PJIT)
def _gemv_par_q3_k(x, raw, out, xq, xd, xs):
    act_quant_q8_k(x, xq, xd, xs)
    ng = (raw.shape[0] + 3) // 4
    for g in prange(ng):
        gemv_q3_k_groups(xq, xd, xs, raw, out, g, g + 1)


@njit(**_JIT)
def gemm_q3_k_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """Q3_K: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T, activations in q8_K slots (2-D)."""
    _k_gemm_groups(XQ, XD, XS, raw, out, M, g0, g1, 11, 110, 2)


@njit(**_PJIT)
def _gemm_par_q3_k(x, raw, out, xq, xd, xs):
    M = x.shape[0]
    for t in prange(M):
        act_quant_q8_k(x[t], xq[t], xd[t], xs[t])
    ng = (raw.shape[0] + 3) // 4
    nt = (ng + _GEMM_GROUPS - 1) // _GEMM_GROUPS
    for task in prange(nt):
        g0 = task * _GEMM_GROUPS
        gemm_q3_k_groups(xq, xd, xs, raw, out, M, g0, min(g0 + _GEMM_GROUPS, ng))


@njit(**_JIT)
def gemv_q4_k_groups(xq, xd, xs, raw, out, g0, g1):
    """Q4_K: rows 4*g0 .. min(4*g1, N)-1 of W @ x, activation in q8_K slots."""
    _k_groups(xq, xd, xs, raw, out, g0, g1, 12, 144)


@njit(**_PJIT)
def _gemv_par_q4_k(x, raw, out, xq, xd, xs):
    act_quant_q8_k(x, xq, xd, xs)
    ng = (raw.shape[0] + 3) // 4
    for g in prange(ng):
        gemv_q4_k_groups(xq, xd, xs, raw, out, g, g + 1)


@njit(**_JIT)
def gemm_q4_k_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """Q4_K: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T, activations in q8_K slots (2-D)."""
    _k_gemm_groups(XQ, XD, XS, raw, out, M, g0, g1, 12, 144, 4)


@njit(**_PJIT)
def _gemm_par_q4_k(x, raw, out, xq, xd, xs):
    M = x.shape[0]
    for t in prange(M):
        act_quant_q8_k(x[t], xq[t], xd[t], xs[t])
    ng = (raw.shape[0] + 3) // 4
    nt = (ng + _GEMM_GROUPS - 1) // _GEMM_GROUPS
    for task in prange(nt):
        g0 = task * _GEMM_GROUPS
        gemm_q4_k_groups(xq, xd, xs, raw, out, M, g0, min(g0 + _GEMM_GROUPS, ng))


# ---- Repacked Q4_K (the executor's in-memory layout, built at load from ggml's bytes) ---------
# raw uint8[N, nsb * 148] (nsb = K / 256). Each full group of 4 rows (rows 4g .. 4g+3, the rows a
# GEMV pass and a GEMM pass take together) is stored chunk by chunk: bytes 4g*rb' + 592 i ... hold
# super-block i of the 4 rows side by side, so the group is one linear stream:
#     [0, 512)    qs of row r at 128 r: byte 64H + 16k + b = weight b of sub-block 4H+k (low
#                 nibble) | weight 16+b of the same sub-block << 4 (high nibble): one zmm load per
#                 half gives _ksb_unpack's two paired registers by a mask and a shift
#     [512, 576)  row r at 16 r: its 8 sub-block scales then its 8 mins, one byte each (6-bit values)
#     [576, 592)  row r at 4 r: d, dmin (fp16, as ggml)
# Rows past the last full group are stored one by one in the same layout with 1 row per chunk
# (148 bytes per super-block). The integer lanes and the float step are exactly _ksb's on ggml's
# bytes, so results are bit-identical to gemv_q4_k_groups / gemm_q4_k_groups.

_RP_ROWS = 4


@njit(**_JIT)
def _repack_q4_k_rows(raw, out, n4):
    """raw uint8[N, nsb*144] (ggml) -> out uint8[N, nsb*148] (the layout above): rows < n4 in
    chunks of 4 rows, the rest one row per chunk. Byte loops: one pass, no temporaries."""
    N = raw.shape[0]
    nsb = raw.shape[1] // 144
    rbo = nsb * 148
    flat = out.reshape(-1)
    for r in range(N):
        if r < n4:
            nr, rr = 4, r % 4
        else:
            nr, rr = 1, 0
        g0 = r - rr
        for i in range(nsb):
            s = i * 144
            o = g0 * rbo + i * nr * 148
            for k in range(4):                                    # d, dmin
                flat[o + nr * 144 + 4 * rr + k] = raw[r, s + k]
            q = o + nr * 128 + 16 * rr                            # 8 scales, 8 mins (6 bits each)
            for j in range(4):
                flat[q + j] = raw[r, s + 4 + j] & 63
                flat[q + 8 + j] = raw[r, s + 8 + j] & 63
                flat[q + 4 + j] = (raw[r, s + 12 + j] & 15) | ((raw[r, s + 4 + j] >> 6) << 4)
                flat[q + 12 + j] = (raw[r, s + 12 + j] >> 4) | ((raw[r, s + 8 + j] >> 6) << 4)
            qo = o + 128 * rr
            for sb in range(8):                                   # sub-block sb: nibble sb & 1 of qs[32 (sb >> 1):]
                c = 16 + 32 * (sb >> 1)
                sh = 4 * (sb & 1)
                for b in range(16):
                    lo = (raw[r, s + c + b] >> sh) & 15
                    hi = (raw[r, s + c + 16 + b] >> sh) & 15
                    flat[qo + 16 * sb + b] = lo | (hi << 4)


def repack_q4_k(raw, out=None):
    """ggml Q4_K rows uint8[N, nsb*144] -> the repacked layout uint8[N, nsb*148] (above);
    out: optional destination. unrepack_q4_k (numpy) is its inverse and its test reference."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] == 0 or raw.shape[1] % 144:
        raise ValueError(f"Q4_K: raw must be uint8[N, K/256 * 144], got {raw.dtype}{list(raw.shape)}")
    N, rb = raw.shape
    if out is None:
        out = np.empty((N, rb // 144 * 148), np.uint8)
    _repack_q4_k_rows(np.ascontiguousarray(raw), out, N // _RP_ROWS * _RP_ROWS)
    return out


def unrepack_q4_k(rp, rows=None):
    """Inverse of repack_q4_k: uint8[N, nsb*148] -> ggml's Q4_K bytes uint8[N, nsb*144], or only
    those of `rows` (int[n], 0 <= row < N) as uint8[n, nsb*144] (what an embedding lookup needs)."""
    if rows is not None:
        rows = np.asarray(rows, np.int64).reshape(-1)
        N, rb = rp.shape
        n4 = N // _RP_ROWS * _RP_ROWS
        out = np.empty((rows.shape[0], rb // 148 * 144), np.uint8)
        full = rows < n4
        if full.any():                        # the rows' whole groups, then the rows among them
            g = rows[full] // _RP_ROWS
            grp = rp[:n4].reshape(n4 // _RP_ROWS, _RP_ROWS * rb)[g].reshape(-1, rb)
            out[full] = unrepack_q4_k(grp)[_RP_ROWS * np.arange(g.shape[0]) + rows[full] % _RP_ROWS]
        for j in np.nonzero(~full)[0]:        # past the last full group: single-row chunks
            out[j] = unrepack_q4_k(rp[rows[j]:rows[j] + 1])[0]
        return out
    N, rb = rp.shape
    nsb = rb // 148
    n4 = N // _RP_ROWS * _RP_ROWS
    q = np.empty((N, nsb, 128), np.uint8)
    sm = np.empty((N, nsb, 16), np.uint8)
    dd = np.empty((N, nsb, 4), np.uint8)
    for a, b, nr in ((0, n4, _RP_ROWS), (n4, N, 1)):
        if b > a:
            ch = rp[a:b].reshape((b - a) // nr, nsb, nr * 148)
            for o, w, dst in ((0, 128, q), (128, 16, sm), (144, 4, dd)):
                dst[a:b] = ch[:, :, o * nr:(o + w) * nr].reshape((b - a) // nr, nsb, nr, w).transpose(0, 2, 1, 3) \
                    .reshape(b - a, nsb, w)
    q = q.reshape(N, nsb, 8, 16)
    w = np.concatenate([q & 15, q >> 4], axis=3)                         # [.., sub-block, l]
    L = w.reshape(N * nsb, 256)
    out = np.empty((N, nsb, 144), np.uint8)
    out[:, :, 0:4] = dd
    out[:, :, 4:16] = _pack_k4_scales(sm[:, :, :8].reshape(-1, 8).astype(np.int32),
                                      sm[:, :, 8:].reshape(-1, 8).astype(np.int32)).reshape(N, nsb, 12)
    out[:, :, 16:] = _pack_nib256(L).reshape(N, nsb, 128)
    return out.reshape(N, nsb * 144)


@njit(**_JIT)
def gemv_q4_k_rp_groups(xq, xd, xs, raw, out, g0, g1):
    """Q4_K, repacked layout (repack_q4_k): rows 4*g0 .. min(4*g1, N)-1 of W @ x, q8_K slots;
    bit-identical to gemv_q4_k_groups on the ggml bytes."""
    _k_groups(xq, xd, xs, raw, out, g0, g1, 112, 148)


@njit(**_JIT)
def gemm_q4_k_rp_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """Q4_K, repacked layout: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T (2-D q8_K slots);
    per (row, token) the bits of gemv_q4_k_rp_groups."""
    _k_gemm_groups(XQ, XD, XS, raw, out, M, g0, g1, 112, 148, 4)


@njit(**_JIT)
def gemv_q5_k_groups(xq, xd, xs, raw, out, g0, g1):
    """Q5_K: rows 4*g0 .. min(4*g1, N)-1 of W @ x, activation in q8_K slots."""
    _k_groups(xq, xd, xs, raw, out, g0, g1, 13, 176)


@njit(**_PJIT)
def _gemv_par_q5_k(x, raw, out, xq, xd, xs):
    act_quant_q8_k(x, xq, xd, xs)
    ng = (raw.shape[0] + 3) // 4
    for g in prange(ng):
        gemv_q5_k_groups(xq, xd, xs, raw, out, g, g + 1)


@njit(**_JIT)
def gemm_q5_k_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """Q5_K: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T, activations in q8_K slots (2-D)."""
    _k_gemm_groups(XQ, XD, XS, raw, out, M, g0, g1, 13, 176, 4)


@njit(**_PJIT)
def _gemm_par_q5_k(x, raw, out, xq, xd, xs):
    M = x.shape[0]
    for t in prange(M):
        act_quant_q8_k(x[t], xq[t], xd[t], xs[t])
    ng = (raw.shape[0] + 3) // 4
    nt = (ng + _GEMM_GROUPS - 1) // _GEMM_GROUPS
    for task in prange(nt):
        g0 = task * _GEMM_GROUPS
        gemm_q5_k_groups(xq, xd, xs, raw, out, M, g0, min(g0 + _GEMM_GROUPS, ng))


@njit(**_JIT)
def gemv_q6_k_groups(xq, xd, xs, raw, out, g0, g1):
    """Q6_K: rows 4*g0 .. min(4*g1, N)-1 of W @ x, activation in q8_K slots."""
    _k_groups(xq, xd, xs, raw, out, g0, g1, 14, 210)


@njit(**_PJIT)
def _gemv_par_q6_k(x, raw, out, xq, xd, xs):
    act_quant_q8_k(x, xq, xd, xs)
    ng = (raw.shape[0] + 3) // 4
    for g in prange(ng):
        gemv_q6_k_groups(xq, xd, xs, raw, out, g, g + 1)


@njit(**_JIT)
def gemm_q6_k_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """Q6_K: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T, activations in q8_K slots (2-D)."""
    _k_gemm_groups(XQ, XD, XS, raw, out, M, g0, g1, 14, 210, 2)


@njit(**_PJIT)
def _gemm_par_q6_k(x, raw, out, xq, xd, xs):
    M = x.shape[0]
    for t in prange(M):
        act_quant_q8_k(x[t], xq[t], xd[t], xs[t])
    ng = (raw.shape[0] + 3) // 4
    nt = (ng + _GEMM_GROUPS - 1) // _GEMM_GROUPS
    for task in prange(nt):
        g0 = task * _GEMM_GROUPS
        gemm_q6_k_groups(xq, xd, xs, raw, out, M, g0, min(g0 + _GEMM_GROUPS, ng))


@njit(**_JIT)
def gemv_iq4_xs_groups(xq, xd, xs, raw, out, g0, g1):
    """IQ4_XS: rows 4*g0 .. min(4*g1, N)-1 of W @ x, activation in q8_K slots."""
    _k_groups(xq, xd, xs, raw, out, g0, g1, 23, 136)


@njit(**_PJIT)
def _gemv_par_iq4_xs(x, raw, out, xq, xd, xs):
    act_quant_q8_k(x, xq, xd, xs)
    ng = (raw.shape[0] + 3) // 4
    for g in prange(ng):
        gemv_iq4_xs_groups(xq, xd, xs, raw, out, g, g + 1)


@njit(**_JIT)
def gemm_iq4_xs_groups(XQ, XD, XS, raw, out, M, g0, g1):
    """IQ4_XS: rows 4*g0 .. min(4*g1, N)-1 of out[:M] = X[:M] @ W.T, activations in q8_K slots (2-D)."""
    _k_gemm_groups(XQ, XD, XS, raw, out, M, g0, g1, 23, 136, 2)


@njit(**_PJIT)
def _gemm_par_iq4_xs(x, raw, out, xq, xd, xs):
    M = x.shape[0]
    for t in prange(M):
        act_quant_q8_k(x[t], xq[t], xd[t], xs[t])
    ng = (raw.shape[0] + 3) // 4
    nt = (ng + _GEMM_GROUPS - 1) // _GEMM_GROUPS
    for task in prange(nt):
        g0 = task * _GEMM_GROUPS
        gemm_iq4_xs_groups(xq, xd, xs, raw, out, M, g0, min(g0 + _GEMM_GROUPS, ng))


# --------------------------------------------------------------------------------------------
# Python layer: wrappers with checks, TypeSpec table
# --------------------------------------------------------------------------------------------

_ACT_SLOTS = {"q8_0": 32, "q8_1": 32, "q8_K": 256}   # elements per xd slot


def act_scratch(K, M=None):
    """Scratch for act_quant_*: (xq int8[K], xd f32[K//32], xs f32[K//16]) (with a leading M
    dimension when M is given); large enough for every activation kind."""
    lead = () if M is None else (M,)
    return (np.zeros(lead + (K,), np.int8), np.zeros(lead + (K // 32,), np.float32),
            np.zeros(lead + (max(K // 16, 1),), np.float32))


@dataclass(frozen=True)
class TypeSpec:
    """One ggml weight format (see the module docstring for the callables' contracts)."""
    name: str                  # ggml type name, e.g. "Q4_K"
    ggml_type: int             # ggml's enum value (GGMLQuantizationType)
    block: int                 # elements per block (32 or 256)
    type_size: int             # bytes per block
    bits_per_weight: float     # 8 * type_size / block
    act: str                   # activation block type of ggml's vec_dot: "q8_0", "q8_1" or "q8_K"
    quantize_ref: Callable     # (w f32[N, K], qw f32[K] | None = None) -> uint8[N, row_bytes]
    dequantize_ref: Callable   # (raw uint8[N, row_bytes], K) -> f32[N, K]
    quantize_act_ref: Callable  # (x f32[K]) -> (xq int8[K], xd f32[..], xs f32[..])
    dot_ref: Callable          # (raw_row uint8[row_bytes], x f32[K]) -> float
    act_quant: Callable        # Numba (x, xq, xd, xs)
    gemv_groups: Callable      # Numba (xq, xd, xs, raw, out, g0, g1)
    gemm_groups: Callable      # Numba (XQ[M, K], XD, XS, raw, out[M, N], M, g0, g1): M tokens at once
    gemv: Callable             # (x f32[K], raw, out f32[N]) -> out
    gemm: Callable             # (x f32[M, K], raw, out f32[M, N]) -> out
    # The executor's in-memory layout: repack (raw ggml bytes uint8[N, row_bytes] -> uint8[N, ..])
    # builds it once per matrix at load (None: the executor runs the ggml bytes as they are), and
    # exec_gemv_groups / exec_gemm_groups (signatures of gemv_groups / gemm_groups) run it.
    repack: Callable | None = None
    unrepack: Callable | None = None   # (repacked uint8[N, ..], rows=None) -> ggml's bytes (of those rows)
    exec_gemv_groups: Callable | None = None
    exec_gemm_groups: Callable | None = None
    # Formats with an affine grid (_CODES; not the IQ4 ones): grid (raw, K) -> (s, o f32[N, K],
    # q int32[N, K]) with value = s * q + o, and codes (raw, q int[N, K]) -> raw with those codes
    # and its scales kept; limits (lo, hi) of q. For quantizers that choose the codes (GPTQ).
    grid: Callable | None = None
    codes: Callable | None = None
    limits: tuple | None = None

    def row_bytes(self, K):
        if K <= 0 or K % self.block != 0:
            raise ValueError(f"{self.name}: K={K} is not a positive multiple of the block size {self.block}")
        return K // self.block * self.type_size


def compile_format(spec, executor=False) -> None:
    """Compile (or load from Numba's cache) the format's activation quantizer and row kernels for
    their one signature each (read-only x / raw; writable arrays convert), then stop them compiling
    for other types. Called on a format's first use (the executor with executor=True: the kernels
    of its in-memory layout; gemv / gemm below: those of ggml's bytes)."""
    g, gg = (spec.exec_gemv_groups, spec.exec_gemm_groups) if executor else (spec.gemv_groups, spec.gemm_groups)
    for f, sig in ((spec.act_quant, _AQ_SIG), (g, _GSIG), (gg, _GGSIG)):
        if f._can_compile:
            f.compile(sig)
            f.disable_compile()


def _make_spec(name, ggml_type, block, type_size, act, act_quant, groups, ggroups, gemv_par, gemm_par):
    def quantize_ref(w, qw=None):
        w = _check_w(w, block, name)
        N, K = w.shape
        qw = _check_qw(qw, K, name)
        x = w.reshape(-1, block)
        qwb = None if qw is None else np.broadcast_to(qw.reshape(1, K), (N, K)).reshape(-1, block)
        b = _QUANT[name](x, qwb)
        assert b.shape == (x.shape[0], type_size) and b.dtype == np.uint8
        return np.ascontiguousarray(b).reshape(N, K // block * type_size)

    def dequantize_ref(raw, K):
        raw = _check_raw(raw, K, spec)
        N = raw.shape[0]
        bl = np.ascontiguousarray(raw).reshape(-1, type_size)
        return _dequant_blocks(name, bl).astype(np.float32).reshape(N, K)

    def dot_ref(raw_row, x):
        return _dot_ref(name, raw_row, x)

    def _args(x, raw, out, two_d):
        x = np.asarray(x)
        if x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != (2 if two_d else 1):
            raise ValueError(f"{name}: x must be C-contiguous float32 {'[M, K]' if two_d else '[K]'}, "
                             f"got {x.dtype}{list(x.shape)}")
        K = x.shape[-1]
        raw = _check_raw(raw, K, spec)
        if not raw.flags.c_contiguous:
            raise ValueError(f"{name}: raw must be C-contiguous")
        want = (x.shape[0], raw.shape[0]) if two_d else (raw.shape[0],)
        if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != want
                or not out.flags.c_contiguous):
            raise ValueError(f"{name}: out must be C-contiguous float32{list(want)}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: activation contains NaN or Inf")
        return x, raw, K

    def gemv(x, raw, out):
        x, raw, K = _args(x, raw, out, False)
        compile_format(spec)
        gemv_par(x, raw, out, *act_scratch(K))
        return out

    def gemm(x, raw, out):
        x, raw, K = _args(x, raw, out, True)
        compile_format(spec)
        gemm_par(x, raw, out, *act_scratch(K, x.shape[0]))
        return out

    def grid(raw, K):
        raw = _check_raw(raw, K, spec)
        N = raw.shape[0]
        return tuple(a.reshape(N, K) for a in _grid_blocks(name, np.ascontiguousarray(raw).reshape(-1, type_size)))

    def codes(raw, q):
        raw = np.asarray(raw)
        N = raw.shape[0]
        K = raw.shape[1] // type_size * block
        q = np.asarray(q).reshape(-1, block)
        bl = _set_codes(name, np.ascontiguousarray(raw).reshape(-1, type_size), q)
        return np.ascontiguousarray(bl).reshape(N, K // block * type_size)

    rp = _REPACKED.get(name)
    affine = name in _CODES
    spec = TypeSpec(name, ggml_type, block, type_size, 8.0 * type_size / block, act, quantize_ref,
                    dequantize_ref, _ACT_REF[act], dot_ref, act_quant, groups, ggroups, gemv, gemm,
                    *(rp or (None, None, groups, ggroups)), grid=grid if affine else None,
                    codes=codes if affine else None, limits=_CODES[name][:2] if affine else None)
    return spec


_ACT_KERNEL = {"q8_0": act_quant_q8_0, "q8_1": act_quant_q8_1, "q8_K": act_quant_q8_k}
# formats the executor runs in a repacked layout: name -> (repack, unrepack, exec_gemv_groups, exec_gemm_groups)
_REPACKED = {"Q4_K": (repack_q4_k, unrepack_q4_k, gemv_q4_k_rp_groups, gemm_q4_k_rp_groups)}

# name, ggml enum, block, type_size, act
_TABLE = [
    ("Q4_1", 3, 32, 20, "q8_1"),
    ("Q5_0", 6, 32, 22, "q8_0"),
    ("Q5_1", 7, 32, 24, "q8_1"),
    ("Q2_K", 10, 256, 84, "q8_K"),
    ("Q3_K", 11, 256, 110, "q8_K"),
    ("Q4_K", 12, 256, 144, "q8_K"),
    ("Q5_K", 13, 256, 176, "q8_K"),
    ("Q6_K", 14, 256, 210, "q8_K"),
    ("IQ4_NL", 20, 32, 18, "q8_0"),
    ("IQ4_XS", 23, 256, 136, "q8_K"),
]

SPECS: dict[str, TypeSpec] = {}
for _name, _gt, _blk, _ts, _act in _TABLE:
    _t = _name.lower()
    SPECS[_name] = _make_spec(_name, _gt, _blk, _ts, _act, _ACT_KERNEL[_act], globals()[f"gemv_{_t}_groups"],
                              globals()[f"gemm_{_t}_groups"],
                              globals()[f"_gemv_par_{_t}"], globals()[f"_gemm_par_{_t}"])


def _check_against_gguf():
    """Block sizes and enum values against gguf-py's table, when gguf-py is installed."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:      # gguf-py is optional at run time; the tests require it
        return
    for s in SPECS.values():
        gt = GGMLQuantizationType[s.name]
        if int(gt) != s.ggml_type or tuple(GGML_QUANT_SIZES[gt]) != (s.block, s.type_size):
            raise AssertionError(f"{s.name}: (type {s.ggml_type}, block {s.block}, {s.type_size} bytes) "
                                 f"disagrees with gguf-py ({int(gt)}, {GGML_QUANT_SIZES[gt]})")


_check_against_gguf()
