"""Probe: a row-interleaved Q4_0 layout (16 rows side by side) against minilm's current Q4_0 kernels.

    python benchmarks/interleave_probe.py [--rounds 10] [--stream-mb 184] [--asm]

Nothing in kernels/ or minilm/ changes: the layout, its repacker, its kernels and its numpy
reference live here (group size 32 only: the int4 level's group size is 32, see minilm/quant.py).

Layout ("il16"): rows in groups of 16; per group and 32-weight block, 256 bytes = 4 pieces of 64
bytes, piece p = bytes 4p..4p+3 of the block's 16 bytes for each of the 16 rows side by side (row r
at bytes 4r..4r+3). Low nibbles of piece p are elements 4p..4p+3 of each row, high nibbles
16+4p..16+4p+3 (ggml's Q4_0 byte order inside a block is kept). Scales: the 16 rows' fp16 d of a
block side by side (32 bytes), one vcvtph2ps gives them as one f32 vector.
  qs_il uint8[N/16, nb*256], d_il uint16[N/16, nb*16]        (nb = K/32; the same bytes as Q4_0)

Kernel step per group, block and token (one emitter, _il_emit, for the GEMV and the T-token tile):
  i32 lanes = bias + sum_p vpdpbusd(lo_p, bcast4(xq[32b+4p:])) + vpdpbusd(hi_p, bcast4(xq[32b+16+4p:]))
  acc(16 rows) = fma(f32(lanes), d_w(16 rows) * d_x, acc)                    (one float step per 16 rows)
bias = -8 * sum(xq of the block) in every lane, so the lanes are exactly sum((nib - 8) * xq), the
same integers as minilm's kernel; only the float order differs (one 32-weight sum per row and
block, scaled and accumulated in block order; minilm: 16 partial lanes per row, then a tree sum).
Each weight block is loaded and unpacked once for the T tokens of a tile; every (row, token) gets
the same operations in the same order, so the tile's rows equal the GEMV's bit for bit (asserted).

Measured, in one process and interleaved (A, B, A, B ...) against minilm's Q4_0 row kernels (the
executor's pair from executor._q4_kernels((32,)), as tests/test_row_kernels.py reaches them):
1. In cache, 1 thread, W 256 x 2048: GEMV (1 token) and 2, 3, 4 tokens, minimum over many calls.
2. Streaming, 2 threads (then 1): K = 5632 and K = 2048 (the TinyLlama FFN shapes) with rows
   repeated to --stream-mb MB of Q4_0 bytes (past every cache, as decode reads its weights), split
   over the threads as the executor splits a matmul; GEMV GB/s and 2, 3, 4 tokens; wall minimum
   and median, and the median CPU time of the process (less disturbed on a loaded machine).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import llvmlite.ir as ir
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minilm.kernels import executor as E  # noqa: E402
from minilm.kernels import qmatmul as Q  # noqa: E402
from minilm.kernels.simd import _I8, _I16, _I32, _V16F32, _V16I32, EXACT, _prefetch, _splat_idx, _stack_f32  # noqa: E402

R = 16                      # rows interleaved (one zmm of i32 lanes)
_JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)
_V64I8 = ir.VectorType(_I8, 64)


# ---- layout and numpy reference ------------------------------------------------------------------
def repack_il16(qs, d):
    """Q4_0 G=32 (qs uint8[N, K/2], d float16[N, K/32]) -> (qs_il uint8[N/16, nb*256], d_il uint16[N/16, nb*16])."""
    N, KB = qs.shape
    nb = KB // 16
    if N % R or d.shape != (N, nb):
        raise ValueError(f"il16 needs N % 16 == 0 and group 32, got qs {qs.shape}, d {d.shape}")
    q = qs.reshape(N // R, R, nb, 4, 4).transpose(0, 2, 3, 1, 4)       # [g, b, piece, row, byte]
    dd = d.view(np.uint16).reshape(N // R, R, nb).transpose(0, 2, 1)    # [g, b, row]
    return (np.ascontiguousarray(q).reshape(N // R, nb * 256),
            np.ascontiguousarray(dd).reshape(N // R, nb * R))


def il16_dot_ref(qs_il, d_il, xq, xd):
    """out f32[N] of the layout's kernel, from the interleaved bytes: per row the exact integer sum of
    each block, then acc = fma(f32(isum), f32(d_w * d_x), acc) in block order (the fma emulated in
    float64: exact product, one rounding of the sum to float64, then to float32)."""
    G, nbb = qs_il.shape
    nb = nbb // 256
    v = qs_il.reshape(G, nb, 4, R, 4)
    lo = (v & 15).astype(np.int64) - 8                                   # element 4p + j
    hi = (v >> 4).astype(np.int64) - 8                                   # element 16 + 4p + j
    x = xq.astype(np.int64).reshape(nb, 2, 4, 4)                         # [b, half, piece, byte]
    isum = (np.einsum("gbprj,bpj->grb", lo, x[:, 0]) + np.einsum("gbprj,bpj->grb", hi, x[:, 1]))
    dw = d_il.view(np.float16).reshape(G, nb, R).transpose(0, 2, 1).astype(np.float32)
    sc = dw * xd.astype(np.float32)[None, None, :]                       # float32 products
    acc = np.zeros((G, R), np.float32)
    for b in range(nb):
        acc = (isum[:, :, b].astype(np.float32).astype(np.float64) * sc[:, :, b].astype(np.float64)
               + acc.astype(np.float64)).astype(np.float32)
    return acc.reshape(-1)


# ---- the one emitter -----------------------------------------------------------------------------
def _il_emit(builder, accp, qp, qoff, dp, doff, toks, b, nblk):
    """Blocks b .. b+nblk-1 of one 16-row group (bytes from qp + qoff, scales from dp + doff, both
    at block b) against each token of toks ((xq i8*, xd f32*, xs f32*) with xs = -128*sum(xq), the
    Q8 activation quantizer's): acc[16j : 16j+16] of token j holds the 16 rows."""
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

            def bcast(k):
                w = builder.load(builder.gep(xb, [ir.Constant(i64, k)]), align=1)
                s = builder.insert_element(ir.Constant(_V16I32, None), w, ir.Constant(_I32, 0))
                return builder.bitcast(_splat_idx(builder, s, [0] * 16), _V64I8)
            bias = builder.ashr(builder.fptosi(builder.load(builder.gep(xsp, [bi])), _I32), ir.Constant(_I32, 4))
            bias = builder.insert_element(ir.Constant(_V16I32, None), bias, ir.Constant(_I32, 0))
            ia = _splat_idx(builder, bias, [0] * 16)                 # -8 * sum(xq): exact
            ib = ir.Constant(_V16I32, [0] * 16)
            for p in range(4):                                       # two independent chains
                ia = Q._udot512(builder, ia, los[p], bcast(p))
                ib = Q._udot512(builder, ib, his[p], bcast(4 + p))
            xd = builder.insert_element(ir.Constant(_V16F32, None), builder.load(builder.gep(xdp, [bi])),
                                        ir.Constant(_I32, 0))
            sc = builder.fmul(dw, _splat_idx(builder, xd, [0] * 16), flags=EXACT)
            a = builder.load(aps[j], align=4)
            a = Q._fma(builder, builder.sitofp(builder.add(ia, ib), _V16F32), sc, a)
            builder.store(a, aps[j], align=4)


def _lit(*a):
    return all(isinstance(x, types.IntegerLiteral) for x in a)


@intrinsic
def _il_rows(typingctx, accp, qs, qoff, d, doff, xq, xd, xs, b, NB):
    """GEMV step: blocks b .. b+NB-1 of a group, one token (xq/xd/xs 1-D)."""
    if not _lit(NB):
        return None
    nblk = NB.literal_value

    def codegen(ctx, builder, sig, args):
        toks = Q._tokens(ctx, builder, sig, args, 5, None, 1)
        _il_emit(builder, args[0], Q._row_base(ctx, builder, sig.args[1], args[1], None, _I8), args[2],
                 Q._row_base(ctx, builder, sig.args[3], args[3], None, _I16), args[4], toks, args[8], nblk)
        return ir.Constant(_I8, 0)
    return types.int8(accp, qs, qoff, d, doff, xq, xd, xs, b, NB), codegen


@intrinsic
def _il_tile(typingctx, accp, qs, qoff, d, doff, XQ, XD, XS, m0, b, T):
    """Tile step: block b of a group for the T tokens m0 .. m0+T-1 of XQ/XD/XS [M, ...]."""
    if not _lit(T):
        return None
    ntok = T.literal_value

    def codegen(ctx, builder, sig, args):
        toks = Q._tokens(ctx, builder, sig, args, 5, args[8], ntok)
        _il_emit(builder, args[0], Q._row_base(ctx, builder, sig.args[1], args[1], None, _I8), args[2],
                 Q._row_base(ctx, builder, sig.args[3], args[3], None, _I16), args[4], toks, args[9], 1)
        return ir.Constant(_I8, 0)
    return types.int8(accp, qs, qoff, d, doff, XQ, XD, XS, m0, b, T), codegen


PFD = 4096                  # software prefetch distance in bytes of the group stream


@njit(**_JIT)
def il_gemv_groups(xq, xd, xs, qs, d, out, g0, g1):
    """out[16g : 16g+16] for groups g0..g1-1, one token (activations from _quantize_act_q8v)."""
    nb = d.shape[1] // R
    for g in range(g0, g1):
        accp = _stack_f32(16)
        acc = numba.carray(accp, 16)
        for i in range(16):
            acc[i] = 0.0
        q0 = g * nb * 256
        d0 = g * nb * R
        for b2 in range(nb // 2):
            for i in range(8):
                _prefetch(qs, q0 + 512 * b2 + PFD + 64 * i)
            _il_rows(accp, qs, q0 + 512 * b2, d, d0 + 32 * b2, xq, xd, xs, 2 * b2, 2)
        if nb % 2:
            _il_rows(accp, qs, q0 + 256 * (nb - 1), d, d0 + R * (nb - 1), xq, xd, xs, nb - 1, 1)
        for i in range(16):
            out[16 * g + i] = acc[i]


def _il_pass(T):
    NACC = 16 * T

    @njit(**dict(_JIT, inline="always"))
    def run(XQ, XD, XS, qs, d, out, m0, g):
        nb = d.shape[1] // R
        accp = _stack_f32(NACC)
        acc = numba.carray(accp, NACC)
        for i in range(NACC):
            acc[i] = 0.0
        q0 = g * nb * 256
        d0 = g * nb * R
        for b in range(nb):
            if m0 == 0:
                for i in range(4):
                    _prefetch(qs, q0 + 256 * b + PFD + 64 * i)
            _il_tile(accp, qs, q0 + 256 * b, d, d0 + R * b, XQ, XD, XS, m0, b, T)
        for j in range(T):
            for i in range(16):
                out[m0 + j, 16 * g + i] = acc[16 * j + i]
    return run


_P4, _P3, _P2, _P1 = _il_pass(4), _il_pass(3), _il_pass(2), _il_pass(1)


@njit(**_JIT)
def il_gemm_groups(XQ, XD, XS, qs, d, out, M, g0, g1):
    """out[:M, 16g : 16g+16] for groups g0..g1-1: tiles of 4 tokens, then one of 3, 2 or 1."""
    for g in range(g0, g1):
        m = 0
        while m + 4 <= M:
            _P4(XQ, XD, XS, qs, d, out, m, g)
            m += 4
        r = M - m
        if r == 3:
            _P3(XQ, XD, XS, qs, d, out, m, g)
        elif r == 2:
            _P2(XQ, XD, XS, qs, d, out, m, g)
        elif r == 1:
            _P1(XQ, XD, XS, qs, d, out, m, g)


# ---- benchmark -------------------------------------------------------------------------------------
CUR_GEMV, CUR_GEMM = E._q4_kernels((32,))


@njit(parallel=True)
def _cur_par(XQ, XD, XS, qs, d, out, M, nt):
    ng = (qs.shape[0] + 3) // 4
    for t in prange(nt):
        if M == 1:
            CUR_GEMV(XQ[0], XD[0], XS[0], qs, d, out[0], t * ng // nt, (t + 1) * ng // nt)
        else:
            CUR_GEMM(XQ, XD, XS, qs, d, out, M, t * ng // nt, (t + 1) * ng // nt)


@njit(parallel=True)
def _il_par(XQ, XD, XS, qs, d, out, M, nt):
    ng = qs.shape[0]
    for t in prange(nt):
        if M == 1:
            il_gemv_groups(XQ[0], XD[0], XS[0], qs, d, out[0], t * ng // nt, (t + 1) * ng // nt)
        else:
            il_gemm_groups(XQ, XD, XS, qs, d, out, M, t * ng // nt, (t + 1) * ng // nt)


def _data(N, K, M, rng):
    """Q4_0 G=32 rows (256 random rows repeated to N), both layouts, and M tokens' activations for
    both (minilm's permuted Q4 quantizer; the Q8 quantizer in natural order for il16: same values)."""
    base_qs, base_d = Q.quantize_q4_0_ref(rng.standard_normal((min(N, 256), K)).astype(np.float32), 32)
    rep = -(-N // base_qs.shape[0])
    qs = np.ascontiguousarray(np.tile(base_qs, (rep, 1))[:N])
    d = np.ascontiguousarray(np.tile(base_d, (rep, 1))[:N])
    X = rng.standard_normal((M, K)).astype(np.float32)
    X[:, :32] *= 50.0
    nb = K // 32
    A4 = (np.empty((M, K), np.int8), np.empty((M, nb), np.float32), np.empty((M, nb), np.float32))
    A8 = (np.empty((M, K), np.int8), np.empty((M, nb), np.float32), np.empty((M, nb), np.float32))
    for m in range(M):
        Q._quantize_act_q4(X[m], 32, A4[0][m], A4[1][m], A4[2][m])
        Q._quantize_act_q8v(X[m], A8[0][m], A8[1][m], A8[2][m])
    assert np.array_equal(A4[1], A8[1])
    qi, di = repack_il16(qs, d)
    return qs, d.view(np.uint16), qi, di, A4, A8


def check(N=64, K=2048 + 32 * 5):
    """Bits and closeness: il16 GEMV == il16 tiles (M = 1..9) bit for bit; il16 == its numpy
    reference; il16 against minilm's current Q4_0 rows (same integer sums, other float order)."""
    rng = np.random.default_rng(3)
    qs, du, qi, di, A4, A8 = _data(N, K, 9, rng)
    M = 9
    one = np.empty((M, N), np.float32)
    cur = np.empty((M, N), np.float32)
    for m in range(M):
        il_gemv_groups(A8[0][m], A8[1][m], A8[2][m], qi, di, one[m], 0, N // R)
        CUR_GEMV(A4[0][m], A4[1][m], A4[2][m], qs, du, cur[m], 0, N // 4)
    for Mt in range(1, M + 1):
        many = np.full((Mt, N), np.nan, np.float32)
        il_gemm_groups(A8[0], A8[1], A8[2], qi, di, many, Mt, 0, N // R)
        np.testing.assert_array_equal(many, one[:Mt])
    ref_diff, cur_rel, cur_abs = 0.0, 0.0, 0.0
    wd = Q.dequantize_q4_0_ref(qs, du.view(np.float16)).astype(np.float64)
    for m in range(M):
        ref = il16_dot_ref(qi, di, A8[0][m], A8[1][m])
        xdeq = A8[0][m].astype(np.float64) * np.repeat(A8[1][m].astype(np.float64), 32)
        mag = np.abs(wd) @ np.abs(xdeq)
        ref_diff = max(ref_diff, float((np.abs(one[m] - ref) / mag).max()))
        cur_rel = max(cur_rel, float((np.abs(one[m] - cur[m]) / mag).max()))
        cur_abs = max(cur_abs, float((np.abs(one[m] - cur[m]) / np.abs(cur[m])).max()))
        exact = wd @ xdeq
        assert (np.abs(one[m] - exact) <= 2e-6 * mag).all()
    assert ref_diff <= 1e-7, ref_diff
    assert cur_rel <= 1e-6, cur_rel
    print(f"check N={N} K={K}: il16 GEMV == tiles M=1..9 bit for bit; il16 vs numpy reference max "
          f"|diff|/(|w|.|x|) {ref_diff:.2e}; il16 vs current Q4_0 rows max |diff|/(|w|.|x|) {cur_rel:.2e}, "
          f"max |diff|/|current| {cur_abs:.2e} ({(one != cur).mean() * 100:.0f}% of outputs differ in bits)")


def _time(f, args):
    """(wall, CPU) seconds of one call; CPU time (all threads of the process) is what a loaded machine
    disturbs least: time spent descheduled is not counted, memory stalls are. With 2 threads the
    worker thread's time reaches the process clock at timer ticks: read the 1-thread CPU figures."""
    t, c = time.perf_counter(), time.process_time()
    f(*args)
    return time.perf_counter() - t, time.process_time() - c


def _run_ab(N, K, reps, threads, label):
    qs, du, qi, di, A4, A8 = _data(N, K, 4, np.random.default_rng(0))
    numba.set_num_threads(threads)
    outs = {L: np.zeros((4, N), np.float32) for L in ("cur", "il16")}
    res = {(L, M): [] for L in ("cur", "il16") for M in (1, 2, 3, 4)}
    calls = {"cur": (_cur_par, qs, du, A4), "il16": (_il_par, qi, di, A8)}
    for M in (1, 2, 3, 4):                   # compile / warm
        for L, (f, a, b, A) in calls.items():
            f(A[0], A[1], A[2], a, b, outs[L], M, threads)
    for _ in range(reps):
        for M in (1, 2, 3, 4):
            for L, (f, a, b, A) in calls.items():
                res[L, M].append(_time(f, (A[0], A[1], A[2], a, b, outs[L], M, threads)))
    nbytes = qs.nbytes + du.nbytes
    print(f"{label}: W {N} x {K} ({nbytes / 1e6:.1f} MB of Q4_0 bytes), {threads} thread(s), {reps} rounds")
    wall = {k: np.array([w for w, _ in v]) for k, v in res.items()}
    cpu = {k: np.array([c for _, c in v]) for k, v in res.items()}
    for L in ("cur", "il16"):
        w1, c1 = wall[L, 1], cpu[L, 1]
        print(f"  {L:5s} GEMV wall min {w1.min() * 1e6:8.1f} us (median {np.median(w1) * 1e6:.1f}, max {w1.max() * 1e6:.1f}), "
              f"{w1.min() * 1e9 / (N * K):.4f} ns/w, {nbytes / w1.min() / 1e9:.1f} GB/s (median {nbytes / np.median(w1) / 1e9:.1f}); "
              f"CPU median {np.median(c1) * 1e6:.1f} us")
        print("        T=2,3,4 / T=1: wall min" + "".join(f" {wall[L, M].min() / w1.min():.2f}" for M in (2, 3, 4))
              + ", wall median" + "".join(f" {np.median(wall[L, M]) / np.median(w1):.2f}" for M in (2, 3, 4))
              + ", CPU median" + "".join(f" {np.median(cpu[L, M]) / np.median(c1):.2f}" for M in (2, 3, 4)))
    for M in (1, 4):
        print(f"  il16/cur, T={M}: wall min {wall['il16', M].min() / wall['cur', M].min():.2f}x, wall median "
              f"{np.median(wall['il16', M]) / np.median(wall['cur', M]):.2f}x, CPU median "
              f"{np.median(cpu['il16', M]) / np.median(cpu['cur', M]):.2f}x")


def _hot_loop(fn, *args):
    """Instructions of the basic block of fn (a cached function compiled afresh without the cache:
    Numba has no asm of cached code) that holds the most vpdpbusd: the hot loop."""
    f = fn if type(fn._cache).__name__ == "NullCache" else njit(**dict(_JIT, cache=False))(fn.py_func)
    f.compile(tuple(numba.typeof(a) for a in args))
    lines = [ln.strip() for ln in f.inspect_asm(f.signatures[0]).splitlines()]
    # the hot loop: the basic block (label to backward jump) holding the most vpdpbusd
    blocks, cur = [], []
    for ln in lines:
        if ln.startswith(".LBB") and ln.endswith(":"):
            blocks.append(cur)
            cur = [ln]
        else:
            cur.append(ln)
    blocks.append(cur)
    hot = max(blocks, key=lambda b: sum("vpdpbusd" in x for x in b))
    back = [i for i, x in enumerate(hot) if x.startswith("j") and x.split()[-1] + ":" == hot[0]]
    hot = hot[: back[0] + 1] if back else hot             # up to the jump back to the loop's label
    return [x for x in hot if x and not x.startswith((".", "#"))]


def asm_report():
    qs, du, qi, di, A4, A8 = _data(32, 2048, 4, np.random.default_rng(0))
    out = np.zeros(32, np.float32)
    out4 = np.zeros((4, 32), np.float32)
    res = {}
    for name, fn, args in (("il16 GEMV (il_gemv_groups)", il_gemv_groups, (A8[0][0], A8[1][0], A8[2][0], qi, di, out, 0, 2)),
                           ("il16 4-token tile (il_gemm_groups)", il_gemm_groups,
                            (A8[0], A8[1], A8[2], qi, di, out4, 4, 0, 2)),
                           ("current GEMV (executor _q4_kernels rows)", CUR_GEMV,
                            (A4[0][0], A4[1][0], A4[2][0], qs, du, out, 0, 8))):
        ins = _hot_loop(fn, *args)
        count = lambda s: sum(s in x for x in ins)  # noqa: E731
        print(f"asm, hot loop of {name}: {len(ins)} instructions, {count('vpdpbusd')} vpdpbusd, "
              f"{count('zmm')} with zmm, {count('vcvtph2ps')} vcvtph2ps, {count('vcvtdq2ps')} vcvtdq2ps, "
              f"{count('vfmadd')} vfmadd, {count('prefetch')} prefetch, {count('rsp')} touching the stack "
              f"(spills), {count('{1to16}')} embedded broadcasts")
        res[name] = ins
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--stream-mb", type=float, default=184.0)
    ap.add_argument("--asm", action="store_true", help="print the hot loop")
    a = ap.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f}, numba threads {numba.config.NUMBA_NUM_THREADS}")
    check()
    for name, ins in asm_report().items():
        if a.asm:
            print(name + ":\n" + "\n".join("    " + x for x in ins))
    _run_ab(256, 2048, 200, 1, "in cache")
    for K in (5632, 2048):
        N = int(a.stream_mb * 1e6 / (K * 0.5625)) // 256 * 256
        for th in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}, reverse=True):
            _run_ab(N, K, a.rounds, th, "streaming")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
