"""The executor's repacked Q4_K layout (ggml_quants.repack_q4_k, Linear.exec_arrays): the repack is
lossless, its kernels give the bits of the ggml-layout kernels (same integer lanes, same float
steps) and so agree with the numpy reference dot product, prefill rows equal decode rows bit for
bit, partial row groups and odd N work, and a model runs it."""
from __future__ import annotations

import numpy as np
import pytest

from minilm.kernels import ggml_quants as GQ
from minilm.quant import FORMATS, Linear

from conftest import dot_tol, random_raw

S = GQ.SPECS["Q4_K"]


def _raws(N, K, rng):
    return (S.quantize_ref(rng.standard_normal((N, K)).astype(np.float32)), random_raw(S, N, K, rng))


def _act(X):
    M, K = X.shape
    XQ, XD, XS = GQ.act_scratch(K, M)
    for m in range(M):
        S.act_quant(X[m], XQ[m], XD[m], XS[m])
    return XQ, XD, XS


def test_spec_names_the_repack():
    assert S.repack is GQ.repack_q4_k
    assert S.exec_gemv_groups is GQ.gemv_q4_k_rp_groups and S.exec_gemm_groups is GQ.gemm_q4_k_rp_groups
    q6 = GQ.SPECS["Q6_K"]
    if q6.repack is None:                         # formats without a repack run ggml's bytes
        assert q6.exec_gemv_groups is q6.gemv_groups and q6.exec_gemm_groups is q6.gemm_groups


@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 8, 13, 17])
def test_repack_roundtrip(N):
    rng = np.random.default_rng(N)
    for K in (256, 768):
        for raw in _raws(N, K, rng):
            rp = GQ.repack_q4_k(raw)
            assert rp.shape == (N, K // 256 * 148) and rp.dtype == np.uint8
            assert np.array_equal(GQ.unrepack_q4_k(rp), raw)


def test_repack_chunks_of_1024_rows():
    """repack works through 1024 rows at a time: a remainder of full groups and single rows past
    the first chunk lands where the kernels read it."""
    rng = np.random.default_rng(3)
    raw = random_raw(S, 1030, 256, rng)
    rp = GQ.repack_q4_k(raw)
    assert np.array_equal(GQ.unrepack_q4_k(rp), raw)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    XQ, XD, XS = _act(x)
    a, b = np.zeros(1030, np.float32), np.zeros(1030, np.float32)
    S.gemv_groups(XQ[0], XD[0], XS[0], raw, a, 0, 258)
    GQ.gemv_q4_k_rp_groups(XQ[0], XD[0], XS[0], rp, b, 0, 258)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("N,K", [(13, 768), (4, 256), (3, 512), (17, 256), (64, 2048)])
def test_repacked_kernels_bit_identical(N, K):
    """gemv: the bits of the ggml-layout kernel and within float rounding of dot_ref; gemm: every
    (row, token) the gemv's bits, for M covering the 8-, 4- and 1-token passes."""
    rng = np.random.default_rng(N * K)
    ng = (N + 3) // 4
    for raw in _raws(N, K, rng):
        rp = GQ.repack_q4_k(raw)
        M = 13
        X = rng.standard_normal((M, K)).astype(np.float32)
        XQ, XD, XS = _act(X)
        dec = np.full((M, N), np.nan, np.float32)
        for m in range(M):
            old = np.full(N, np.nan, np.float32)
            S.gemv_groups(XQ[m], XD[m], XS[m], raw, old, 0, ng)
            GQ.gemv_q4_k_rp_groups(XQ[m], XD[m], XS[m], rp, dec[m], 0, ng)
            assert np.array_equal(dec[m], old)
        ref = np.array([S.dot_ref(raw[r], X[0]) for r in range(N)])
        assert np.all(np.abs(dec[0] - ref) <= dot_tol(S, raw, X[0]))
        for Mt in (1, 3, 4, 8, 12, 13):
            O = np.full((Mt, N), np.nan, np.float32)
            GQ.gemm_q4_k_rp_groups(XQ, XD, XS, rp, O, Mt, 0, ng)
            assert np.array_equal(O, dec[:Mt])
            O2 = np.full((Mt, N), np.nan, np.float32)
            S.gemm_groups(XQ, XD, XS, raw, O2, Mt, 0, ng)
            assert np.array_equal(O, O2)


def test_repacked_row_groups_write_only_their_rows():
    rng = np.random.default_rng(11)
    N, K = 13, 512
    raw = random_raw(S, N, K, rng)
    rp = GQ.repack_q4_k(raw)
    X = rng.standard_normal((5, K)).astype(np.float32)
    XQ, XD, XS = _act(X)
    full = np.zeros(N, np.float32)
    GQ.gemv_q4_k_rp_groups(XQ[0], XD[0], XS[0], rp, full, 0, 4)
    part = np.full(N, np.nan, np.float32)
    GQ.gemv_q4_k_rp_groups(XQ[0], XD[0], XS[0], rp, part, 1, 3)
    assert np.all(np.isnan(part[:4])) and np.all(np.isnan(part[12:]))
    assert np.array_equal(part[4:12], full[4:12])
    GQ.gemv_q4_k_rp_groups(XQ[0], XD[0], XS[0], rp, part, 3, 4)          # the last group: row 12 only
    assert part[12] == full[12]
    O = np.full((5, N), np.nan, np.float32)
    GQ.gemm_q4_k_rp_groups(XQ, XD, XS, rp, O, 5, 3, 4)
    assert np.all(np.isnan(O[:, :12])) and O[0, 12] == full[12]


def test_repack_bad_input():
    with pytest.raises(ValueError, match="Q4_K: raw must be"):
        GQ.repack_q4_k(np.zeros((4, 145), np.uint8))
    with pytest.raises(ValueError, match="Q4_K: raw must be"):
        GQ.repack_q4_k(np.zeros(144, np.uint8))
    with pytest.raises(ValueError, match="Q4_K: raw must be"):
        GQ.repack_q4_k(np.zeros((4, 144), np.float32))


@pytest.mark.parametrize("mode", ["r", "c"])
def test_linear_exec_arrays_from_a_map(tmp_path, mode):
    """Linear.exec_arrays builds the repack once; the GGUF-like mapping (read-only, or copy-on-write
    as minilm maps GGUF files) it came from is handed back to the file (MADV_DONTNEED), and the
    Linear's ggml bytes and the mapping still read the same afterwards."""
    rng = np.random.default_rng(5)
    N, K = 9, 512
    raw = S.quantize_ref(rng.standard_normal((N, K)).astype(np.float32))
    pad = np.zeros(8192, np.uint8)                      # the tensor starts mid-page, as in a GGUF
    with open(tmp_path / "w.bin", "wb") as f:
        f.write(pad[:5000].tobytes() + raw.tobytes() + pad.tobytes())
    mm = np.memmap(tmp_path / "w.bin", dtype=np.uint8, mode=mode)
    view = mm[5000:5000 + raw.size].reshape(raw.shape)
    lin = Linear("q4_k", N, K, {"raw": view})
    e = lin.exec_arrays()
    assert e is lin.exec_arrays() and np.array_equal(e, GQ.repack_q4_k(raw))
    assert np.array_equal(np.asarray(lin.arrays["raw"]), raw) and lin._arrays is None
    assert np.array_equal(view, raw)
    w, _ = FORMATS["q4_k"].row_arrays(lin)
    assert w is e
    q6 = Linear("q6_k", 4, 256, {"raw": GQ.SPECS["Q6_K"].quantize_ref(np.ones((4, 256), np.float32))})
    if GQ.SPECS["Q6_K"].repack is None:
        assert q6.exec_arrays() is q6.arrays["raw"]


def test_release_mapped_drops_exactly_the_whole_pages(tmp_path):
    """_release_mapped hands the whole pages inside a view of a copy-on-write mapping back to the
    file (MADV_DONTNEED): private writes there are dropped and the file's bytes read back, while
    the partial pages at the view's edges, and arrays that are not mappings, are left alone."""
    import mmap

    from minilm.quant import _release_mapped
    page = mmap.PAGESIZE
    data = np.arange(5 * page, dtype=np.uint32).astype(np.uint8)
    (tmp_path / "f.bin").write_bytes(data.tobytes())
    mm = np.memmap(tmp_path / "f.bin", dtype=np.uint8, mode="c")
    lo, hi = 100, 3 * page + 7                       # whole pages inside: [page, 3 * page)
    view = mm[lo:hi]
    view[:] = 0                                      # private copies of pages 0..3
    _release_mapped(view)
    expect = data[lo:hi].copy()
    expect[:page - lo] = 0                           # first partial page keeps the write
    expect[3 * page - lo:] = 0                       # so does the last partial page
    assert np.array_equal(np.asarray(view), expect)
    plain = np.zeros(3 * page, np.uint8)
    _release_mapped(plain)                           # not a mapping: untouched, no error
    assert not plain.any()


def test_generic_path_repacked(tmp_path):
    """The repacked kernels built as generic LLVM IR (no AVX512 intrinsics) give the same bits as
    the generic ggml-layout kernels."""
    script = r"""
import numpy as np
from minilm.kernels import ggml_quants as GQ
assert GQ.SIMD == "generic"
S = GQ.SPECS["Q4_K"]
rng = np.random.default_rng(2)
N, K, M = 9, 512, 5
raw = S.quantize_ref(rng.standard_normal((N, K)).astype(np.float32))
rp = GQ.repack_q4_k(raw)
XQ, XD, XS = GQ.act_scratch(K, M)
X = rng.standard_normal((M, K)).astype(np.float32)
for m in range(M):
    S.act_quant(X[m], XQ[m], XD[m], XS[m])
a, b = np.zeros((M, N), np.float32), np.zeros((M, N), np.float32)
S.gemm_groups(XQ, XD, XS, raw, a, M, 0, 3)
GQ.gemm_q4_k_rp_groups(XQ, XD, XS, rp, b, M, 0, 3)
o = np.zeros(N, np.float32)
GQ.gemv_q4_k_rp_groups(XQ[0], XD[0], XS[0], rp, o, 0, 3)
print(bool(np.array_equal(a, b) and np.array_equal(o, b[0])))
"""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), MINILM_SIMD="generic")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "True"


def test_vnni_asm_repacked(tmp_path):
    """The repacked GEMV's loop: vpmaddubsw + vpdpwssd on zmm, prefetch, no byte permutes
    (vpermb: the nibbles are stored in the kernel's order) and no int8 -> int64 widening."""
    if GQ.SIMD != "vnni":
        pytest.skip("this CPU has no AVX512-VNNI/VL")
    script = r"""
import re
from minilm.kernels import ggml_quants as GQ
GQ.compile_format(GQ.SPECS["Q4_K"], executor=True)
f = GQ.gemv_q4_k_rp_groups
asm = f.inspect_asm(f.signatures[0])
ins = set(re.findall(r"^\s+([a-z][a-z0-9]+)", asm, re.M))
print("vpmaddubsw" in ins, "vpdpwssd" in ins, "%zmm" in asm, "prefetcht0" in ins, "vpermb" in ins, "vpmovsxbq" in ins)
"""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("MINILM_SIMD", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True", "True", "True", "True", "False", "False"], r.stdout


def test_linear_in_memory_bytes_kept_once():
    """An in-memory Q4_K matrix (a fused q/k/v or gate/up, or quantized at load) is held once
    after the repack: arrays["raw"], nbytes, the embedding rows and Linear.__call__ give what
    they gave before, from the repacked copy."""
    rng = np.random.default_rng(9)
    N, K = 13, 512
    w = rng.standard_normal((N, K)).astype(np.float32)
    lin = Linear.quantize(w, "q4_k")
    raw = lin.arrays["raw"].copy()
    nb = lin.nbytes
    x = rng.standard_normal((3, K)).astype(np.float32)
    before1, beforeM = np.zeros((1, N), np.float32), np.zeros((3, N), np.float32)
    lin(x[:1], before1)
    lin(x, beforeM)
    e = lin.exec_arrays()
    assert lin._arrays is None and lin._args is None            # the ggml copy is not kept
    assert np.array_equal(lin.arrays["raw"], raw) and lin.nbytes == nb
    ids = np.array([12, 0, 5, 12, 3, 11])
    rows = np.zeros((ids.shape[0], K), np.float32)
    lin.rows(ids, rows)
    assert np.array_equal(rows, S.dequantize_ref(raw, K)[ids])
    assert np.array_equal(GQ.unrepack_q4_k(e, ids), raw[ids])
    after1, afterM = np.zeros((1, N), np.float32), np.zeros((3, N), np.float32)
    lin(x[:1], after1)
    lin(x, afterM)
    assert np.array_equal(after1, before1) and np.array_equal(afterM, beforeM)
