"""Every weight format's row kernels, the GEMV and the GEMM the executor runs, against their numpy
references: one small shape per format that reaches every code path of its kernels (full and
partial row groups, chunk and block tails, every Q4_0 group size, the K-quant GEMM's full and last
token pass). The multi-token rows must equal the one-token rows bit for bit (decode-exact).

Designed for scripts/check_aarch64.sh, where each compile costs ~15x its native time under qemu:
it calls the serial row-group kernels (what kernels/executor.py calls: one compile each), not the
public parallel wrappers (qmatmul.gemv_q8_0, ggml's spec.gemv, ...: a parallel region compiled
around each; those are tested on x86 by test_qmatmul / test_ggml_quants, the generic path with
MINILM_SIMD=generic). The check runs this file on cortex-a76 (the sdot path) and cortex-a72 (the
fallback); natively it is a quick part of the suite.
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from minilm.kernels import executor as E
from minilm.kernels import ggml_quants as GQ
from minilm.kernels import qmatmul as Q
from minilm.kernels.matmul import gemm_float_groups, gemv_float_groups
from minilm.quant import FORMATS, quantize_act_ref

from conftest import dot_tol, random_raw

M = 3                       # tokens of the multi-row pass (the K-quant GEMM: see ggml below)


def _rows_equal_gemv(gemv_rows, gemm_rows):
    """Multi-token rows must be decode's rows bit for bit."""
    np.testing.assert_array_equal(gemm_rows, gemv_rows)


# ---- f32 / f16 / bf16: matmul.gemv_float_groups / gemm_float_groups -------------------------------
# KIND must be a compile-time constant (as in the executor's dispatch): one small caller per kind.
@njit(cache=True)
def _gemv_rows_f32(X, w, out, g0, g1):
    for m in range(X.shape[0]):
        gemv_float_groups(X[m], w, out[m], 0, g0, g1)


@njit(cache=True)
def _gemv_rows_f16(X, w, out, g0, g1):
    for m in range(X.shape[0]):
        gemv_float_groups(X[m], w, out[m], 1, g0, g1)


@njit(cache=True)
def _gemv_rows_bf16(X, w, out, g0, g1):
    for m in range(X.shape[0]):
        gemv_float_groups(X[m], w, out[m], 2, g0, g1)


@njit(cache=True)
def _gemm_rows_f32(X, w, out, g0, g1):
    gemm_float_groups(X, w, out, 0, X.shape[0], g0, g1)


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16"])
def test_float_rows(fmt):
    rng = np.random.default_rng(1)
    N, K = 7, 200                   # a full and a partial row group; K % 16 = 8 (masked tail)
    w = rng.standard_normal((N, K)).astype(np.float32)
    X = rng.standard_normal((M, K)).astype(np.float32)
    stored = FORMATS[fmt].pack(w, 1)["w"]
    wd = FORMATS[fmt].unpack({"w": stored}).astype(np.float64)
    one = np.full((M, N), np.nan, np.float32)
    rows = {"f32": _gemv_rows_f32, "f16": _gemv_rows_f16, "bf16": _gemv_rows_bf16}[fmt]
    rows(X, stored if fmt == "f32" else stored.view(np.uint16), one, 0, 2)
    ref = X.astype(np.float64) @ wd.T
    assert np.abs(one - ref).max() <= 1e-5 * np.abs(ref).max()
    if fmt == "f32":                # f16 / bf16 rows are widened to an f32 tile for the GEMM
        many = np.full((M, N), np.nan, np.float32)
        _gemm_rows_f32(X, stored, many, 0, 2)
        _rows_equal_gemv(one, many)


# ---- Q8_0 / Q4_0: qmatmul's row kernels through the executor's entry points --------------------
def _act(x, G):
    """The executor's activation quantizer for Q8_0 and Q4_0 (any group size G: the same natural-
    order blocks), and the exact numpy model of what the kernel then computes with (int8 values *
    block scales)."""
    K = x.shape[0]
    xq, xd, xs = np.empty(K, np.int8), np.empty(K // 32, np.float32), np.empty(K // 32, np.float32)
    Q._quantize_act_q8v(x, xq, xd, xs)
    rq, rd = quantize_act_ref(x)
    return xq, xd, xs, (rq.astype(np.float64) * rd.astype(np.float64)[:, None]).reshape(-1)


# (format, G, K): Q8_0 rows take 64-byte chunks in pairs, an odd chunk and a 32-byte tail block
# (K = 7 blocks); Q4_0's il16 GEMV takes 32-weight blocks in pairs and an odd last block (G=32:
# 15 and 13 blocks, G=64: 14, G=128: 12; G > 32 repacked as 32-blocks with repeated scales)
Q_CASES = [("q8_0", None, 224), ("q8_0", None, 64), ("q4_0", 32, 480), ("q4_0", 32, 416),
           ("q4_0", 64, 448), ("q4_0", 128, 384)]


@pytest.mark.parametrize("fmt,G,K", Q_CASES)
def test_q8_0_q4_0_rows(fmt, G, K):
    rng = np.random.default_rng(K)
    N = 7 if fmt == "q8_0" else 37           # Q4_0: two 16-row groups and a group of 5 rows
    w = rng.standard_normal((N, K)).astype(np.float32)
    w[0, ::7] *= 40.0                                       # outliers: extreme scales and values
    X = rng.standard_normal((M, K)).astype(np.float32)
    X[:, -32:] *= 100.0                                     # large values in the tail chunk
    if fmt == "q8_0":                 # the numpy quantizers: the Numba ones are a76-int4's part of the check
        qs, d = Q.quantize_q8_0_ref(w)
        wd = Q.dequantize_q8_0_ref(qs, d).astype(np.float64)
        rows, rows_m = E._q8_groups, E._q8_groups_rows
        ng = 2
    else:
        qs, d = Q.quantize_q4_0_ref(w, G)
        qs[-1, :] = 0xF0                                    # nibbles 0 and 15: -8*d and +7*d
        wd = Q.dequantize_q4_0_ref(qs, d).astype(np.float64)
        rows, rows_m = E._q4_groups, E._q4_groups_rows    # on the il16 layout, every group size
        qs, d = Q.repack_q4_0(qs, d)
        ng = qs.shape[0]
    du = d.view(np.uint16)
    acts = [_act(X[m], G) for m in range(M)]
    one = np.full((M, N), np.nan, np.float32)
    for m, (xq, xd, xs, xdeq) in enumerate(acts):
        rows(xq, xd, xs, qs, du, one[m], 0, ng)
        ref = wd @ xdeq                                     # the kernel's exact model, in float64
        assert (np.abs(one[m] - ref) <= 2e-6 * (np.abs(wd) @ np.abs(xdeq)) + 1e-30).all(), (m, one[m], ref)
    XQ, XD, XS = (np.stack([a[i] for a in acts]) for i in range(3))
    many = np.full((M, N), np.nan, np.float32)
    rows_m(XQ, XD, XS, qs, du, many, M, 0, ng)
    _rows_equal_gemv(one, many)


# ---- ggml formats: the executor's kernels of each TypeSpec (Q4_K: its repacked layout) -------------
@pytest.mark.parametrize("name", list(GQ.SPECS))
def test_ggml_rows(name):
    s = GQ.SPECS[name]
    rng = np.random.default_rng(6)
    N = 13                                                  # 3 full row groups and one row
    K = 3 * s.block if s.block == 256 else 15 * s.block     # 256-blocks: 3; 32-blocks: an odd count
    Mg = 9                                                  # the K-quant GEMM: a full 8-token pass and one
    X = rng.standard_normal((Mg, K)).astype(np.float32)
    for raw in (s.quantize_ref(rng.standard_normal((N, K)).astype(np.float32)), random_raw(s, N, K, rng)):
        ex = s.repack(raw) if s.repack is not None else raw
        XQ, XD, XS = GQ.act_scratch(K, Mg)
        for m in range(Mg):
            s.act_quant(X[m], XQ[m], XD[m], XS[m])
        one = np.full((Mg, N), np.nan, np.float32)
        ng = (N + 3) // 4
        for m in range(Mg):
            s.exec_gemv_groups(XQ[m], XD[m], XS[m], ex, one[m], 0, ng)
            ref = np.array([s.dot_ref(raw[r], X[m]) for r in range(N)])
            assert np.all(np.abs(one[m] - ref) <= dot_tol(s, raw, X[m])), (m, one[m], ref)
        many = np.full((Mg, N), np.nan, np.float32)
        s.exec_gemm_groups(XQ, XD, XS, ex, many, Mg, 0, ng)
        _rows_equal_gemv(one, many)
