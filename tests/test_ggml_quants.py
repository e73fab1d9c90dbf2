"""ggml K-quant / IQ4 formats (minilm.kernels.ggml_quants), looped over SPECS as ggml's
test-quantize-fns does: sizes against gguf-py, dequantization bit-identical to gguf-py,
round-trip and dot-product errors under ggml's thresholds, the Numba kernels against the numpy
references, and bad input."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="gguf-py (pip install gguf) is the layout reference")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from minilm.kernels import ggml_quants as GQ  # noqa: E402

from conftest import dot_tol, random_raw  # noqa: E402

NAMES = list(GQ.SPECS)
EXPECTED = ["Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]

# ggml tests/test-quantize-fns.cpp: error = sqrt(sum sq err) / n on 0.1 + 2*cos(i + offset)
MAX_QUANTIZATION_TOTAL_ERROR = 0.002
MAX_QUANTIZATION_TOTAL_ERROR_2BITS = 0.0075
MAX_QUANTIZATION_TOTAL_ERROR_3BITS = 0.0040
MAX_DOT_PRODUCT_ERROR = 0.02
MAX_DOT_PRODUCT_ERROR_LOWBIT = 0.04
TOTAL_ERR = {"Q2_K": MAX_QUANTIZATION_TOTAL_ERROR_2BITS, "Q3_K": MAX_QUANTIZATION_TOTAL_ERROR_3BITS}
DOT_ERR = {"Q2_K": MAX_DOT_PRODUCT_ERROR_LOWBIT, "Q3_K": MAX_DOT_PRODUCT_ERROR_LOWBIT}
# RMSE of quantize -> dequantize on N(0, 1) weights (measured here + ~10 %): catches a weaker
# scale search that ggml's loose total-error thresholds would let through
GAUSS_RMSE = {"Q4_1": 0.085, "Q5_0": 0.048, "Q5_1": 0.041, "Q2_K": 0.32, "Q3_K": 0.175,
              "Q4_K": 0.081, "Q5_K": 0.040, "Q6_K": 0.020, "IQ4_NL": 0.084, "IQ4_XS": 0.085}
def ggml_data(n, offset):
    i = np.arange(n, dtype=np.float32)
    return (np.float32(0.1) + np.float32(2) * np.cos(i + np.float32(offset))).astype(np.float32)


def test_specs_table():
    assert NAMES == EXPECTED
    for name, s in GQ.SPECS.items():
        gt = GGMLQuantizationType[name]
        assert s.name == name and s.ggml_type == int(gt)
        assert (s.block, s.type_size) == tuple(GGML_QUANT_SIZES[gt])
        assert s.bits_per_weight == pytest.approx(8 * s.type_size / s.block)
        assert s.act == ("q8_K" if s.block == 256 else ("q8_1" if name in ("Q4_1", "Q5_1") else "q8_0"))
        assert s.act_quant is {"q8_0": GQ.act_quant_q8_0, "q8_1": GQ.act_quant_q8_1,
                               "q8_K": GQ.act_quant_q8_k}[s.act]


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_matches_gguf(name):
    s = GQ.SPECS[name]
    gt = GGMLQuantizationType[name]
    rng = np.random.default_rng(1)
    N, K = 5, 2 * 256
    raw = random_raw(s, N, K, rng)
    assert np.array_equal(s.dequantize_ref(raw, K), gguf_dequantize(raw, gt).reshape(N, K))
    w = rng.standard_normal((N, K)).astype(np.float32)
    q = s.quantize_ref(w)
    assert q.shape == (N, s.row_bytes(K)) and q.dtype == np.uint8
    assert np.array_equal(s.dequantize_ref(q, K), gguf_dequantize(q, gt).reshape(N, K))


@pytest.mark.parametrize("name", ["Q4_1", "Q5_0", "Q5_1"])
def test_simple_quantizers_equal_gguf_bytes(name):
    # gguf-py implements ggml's quantize_row_*_ref for these: ours gives the same bytes
    w = np.random.default_rng(2).standard_normal((3, 512)).astype(np.float32)
    ref = gguf_quantize(w, GGMLQuantizationType[name])
    assert np.array_equal(GQ.SPECS[name].quantize_ref(w), ref.reshape(3, -1))


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_error(name):
    s = GQ.SPECS[name]
    n = 32 * 128
    x = ggml_data(n, 0.0)
    d = s.dequantize_ref(s.quantize_ref(x.reshape(1, n)), n)[0]
    total = np.sqrt(np.sum((d.astype(np.float64) - x) ** 2)) / n
    assert total < TOTAL_ERR.get(name, MAX_QUANTIZATION_TOTAL_ERROR), total
    w = np.random.default_rng(3).standard_normal((8, 1024)).astype(np.float32)
    rmse = np.sqrt(np.mean((s.dequantize_ref(s.quantize_ref(w), 1024) - w) ** 2))
    assert rmse < GAUSS_RMSE[name], rmse
    # zero rows and constant rows survive (zero scales, no NaN)
    z = np.zeros((2, 256), np.float32)
    z[1] = 0.5
    dz = s.dequantize_ref(s.quantize_ref(z), 256)
    assert np.isfinite(dz).all() and np.all(dz[0] == 0)
    assert np.abs(dz[1] - 0.5).max() < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_importance_weights_lower_weighted_error(name):
    s = GQ.SPECS[name]
    rng = np.random.default_rng(4)
    K = 1024
    w = rng.standard_normal((16, K)).astype(np.float32)
    qw = np.exp(rng.standard_normal(K) * 1.5).astype(np.float32)      # skewed column importance
    e0 = ((s.dequantize_ref(s.quantize_ref(w), K) - w) ** 2 * qw).mean()
    e1 = ((s.dequantize_ref(s.quantize_ref(w, qw), K) - w) ** 2 * qw).mean()
    assert e1 < e0, (e1, e0)
    with pytest.raises(ValueError, match="importance weights"):
        s.quantize_ref(w, qw[:-1])


@pytest.mark.parametrize("name", NAMES)
def test_dot_ref_vs_float(name):
    s = GQ.SPECS[name]
    n = 32 * 128
    x = ggml_data(n, 0.0)
    y = ggml_data(n, 1.0)
    got = s.dot_ref(s.quantize_ref(x.reshape(1, n))[0], y)
    err = abs(got - float(np.dot(x.astype(np.float64), y))) / n
    assert err < DOT_ERR.get(name, MAX_DOT_PRODUCT_ERROR), err


@pytest.mark.parametrize("act", ["q8_0", "q8_1", "q8_K"])
def test_act_quant_kernel_matches_ref(act):
    kern = {"q8_0": GQ.act_quant_q8_0, "q8_1": GQ.act_quant_q8_1, "q8_K": GQ.act_quant_q8_k}[act]
    ref = {"q8_0": GQ.quantize_act_q8_0_ref, "q8_1": GQ.quantize_act_q8_1_ref,
           "q8_K": GQ.quantize_act_q8_k_ref}[act]
    rng = np.random.default_rng(5)
    K = 768
    x = (rng.standard_normal(K) * np.exp(rng.standard_normal(K))).astype(np.float32)
    x[:256] = 0.0                                              # an all-zero block / super-block
    x[300] = np.float32(127 * 0.5)                             # ties: roundf vs round-half-even
    xq, xd, xs = GQ.act_scratch(K)
    kern(x, xq, xd, xs)
    rq, rd, rs = ref(x)
    assert np.array_equal(xq, rq)
    assert np.array_equal(xd[:rd.shape[0]], rd)
    assert np.array_equal(xs[:rs.shape[0]], rs)
    if act == "q8_K":   # ggml's bsums
        assert np.array_equal(rs, rq.astype(np.int32).reshape(-1, 16).sum(axis=1))


def test_act_quant_q8_k_sign_of_the_largest():
    """q8_K's scale takes the sign of the element of largest |x|, the first one where +m and -m
    both occur (ggml's loop): the kernel finds it by a vector max and a scan only on such ties."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        x = rng.standard_normal(1024).astype(np.float32)
        m = np.float32(8.0)
        i, j = rng.choice(256, 2, replace=False)
        x[i], x[j] = m, -m                                      # block 0: both signs, either order
        x[256:512] = -np.abs(x[256:512])                        # block 1: all negative
        x[512 + trial] = -m                                     # block 2: one negative max
        x[768:] = np.round(x[768:])                             # block 3: many equal |x|
        xq, xd, xs = GQ.act_scratch(1024)
        GQ.act_quant_q8_k(x, xq, xd, xs)
        rq, rd, rs = GQ.quantize_act_q8_k_ref(x)
        assert np.array_equal(xq, rq) and np.array_equal(xd[:4], rd) and np.array_equal(xs[:64], rs)
        assert (xd[0] > 0) == (i > j)                           # d = max / -127: the first of the pair decides


@pytest.mark.parametrize("name", NAMES)
def test_kernels_match_dot_ref(name):
    s = GQ.SPECS[name]
    rng = np.random.default_rng(6)
    N, K, M = 13, 3 * 256, 3                                  # odd N: a partial row group
    X = rng.standard_normal((M, K)).astype(np.float32)
    for raw in (s.quantize_ref(rng.standard_normal((N, K)).astype(np.float32)), random_raw(s, N, K, rng)):
        ref = np.array([[s.dot_ref(raw[r], X[m]) for r in range(N)] for m in range(M)])
        out = np.full(N, np.nan, np.float32)
        s.gemv(X[0], raw, out)
        assert np.all(np.abs(out - ref[0]) <= dot_tol(s, raw, X[0]))
        O = np.full((M, N), np.nan, np.float32)
        s.gemm(X, raw, O)
        for m in range(M):
            assert np.all(np.abs(O[m] - ref[m]) <= dot_tol(s, raw, X[m]))
        # the executor's entry point: row groups 1..2 only (rows 4..11), nothing else written
        xq, xd, xs = GQ.act_scratch(K)
        s.act_quant(X[1], xq, xd, xs)
        part = np.full(N, np.nan, np.float32)
        s.gemv_groups(xq, xd, xs, raw, part, 1, 3)
        assert np.all(np.isnan(part[:4])) and np.all(np.isnan(part[12:]))
        assert np.all(np.abs(part[4:12] - ref[1][4:12]) <= dot_tol(s, raw[4:12], X[1]))
        s.gemv_groups(xq, xd, xs, raw, part, 3, 4)             # the last group: row 12 only
        assert abs(part[12] - ref[1][12]) <= dot_tol(s, raw[12:13], X[1])[0]


@pytest.mark.parametrize("name", ["Q4_K", "IQ4_NL"])
def test_read_only_memory_map(name, tmp_path):
    """GGUF tensors are memory-mapped read-only: the kernels take them as they are."""
    s = GQ.SPECS[name]
    rng = np.random.default_rng(8)
    N, K = 6, 512
    raw = s.quantize_ref(rng.standard_normal((N, K)).astype(np.float32))
    raw.tofile(tmp_path / "w.bin")
    mm = np.memmap(tmp_path / "w.bin", dtype=np.uint8, mode="r", shape=raw.shape)
    X = rng.standard_normal((2, K)).astype(np.float32)
    X.setflags(write=False)
    ref = np.array([[s.dot_ref(raw[r], X[m]) for r in range(N)] for m in range(2)])
    out = np.zeros(N, np.float32)
    s.gemv(X[0], mm, out)
    assert np.all(np.abs(out - ref[0]) <= dot_tol(s, raw, X[0]))
    O = np.zeros((2, N), np.float32)
    s.gemm(X, mm, O)
    assert np.all(np.abs(O - ref) <= np.stack([dot_tol(s, raw, X[m]) for m in range(2)]))
    xq, xd, xs = GQ.act_scratch(K)
    s.act_quant(X[1], xq, xd, xs)
    part = np.zeros(N, np.float32)
    s.gemv_groups(xq, xd, xs, mm, part, 0, 2)
    assert np.all(np.abs(part - ref[1]) <= dot_tol(s, raw, X[1]))
    assert np.array_equal(s.dequantize_ref(mm, K), s.dequantize_ref(raw, K))


@pytest.mark.parametrize("name", ["Q4_K", "IQ4_NL"])
def test_bad_input(name):
    s = GQ.SPECS[name]
    K = 256
    raw = s.quantize_ref(np.ones((4, K), np.float32))
    out = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="bytes per row"):
        s.gemv(np.ones(2 * K, np.float32), raw, out)
    with pytest.raises(ValueError, match="bytes per row"):
        s.dequantize_ref(raw[:, :-1], K)
    with pytest.raises(ValueError, match="out must be"):
        s.gemv(np.ones(K, np.float32), raw, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="x must be"):
        s.gemv(np.ones(K, np.float64), raw, out)
    with pytest.raises(ValueError, match="NaN"):
        s.gemv(np.full(K, np.nan, np.float32), raw, out)
    with pytest.raises(ValueError, match="multiple of the block size"):
        s.quantize_ref(np.ones((2, 200), np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        s.quantize_ref(np.full((2, K), np.inf, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        s.quantize_ref(np.ones(K, np.float32))


SUBPROCESS_SCRIPT = r"""
import re, sys
import numpy as np
from minilm.kernels import ggml_quants as GQ
mode = sys.argv[1]
assert GQ.SIMD == ("generic" if mode == "generic" else "vnni"), GQ.SIMD
names = ["Q5_0", "Q3_K", "Q4_K", "Q6_K", "IQ4_XS"] if mode == "generic" else ["Q4_K"]   # one type per code path
rng = np.random.default_rng(7)
N, K = 9, 512
worst = 0.0
for name in names:
    s = GQ.SPECS[name]
    raw = s.quantize_ref(rng.standard_normal((N, K)).astype(np.float32))
    x = rng.standard_normal(K).astype(np.float32)
    ref = np.array([s.dot_ref(raw[r], x) for r in range(N)])
    out = np.zeros(N, np.float32)
    s.gemv(x, raw, out)
    scale = np.abs(s.dequantize_ref(raw, K)) @ np.abs(x)
    worst = max(worst, float(np.max(np.abs(out - ref) / scale)))
    if mode == "asm":
        f = s.gemv_groups
        asm = f.inspect_asm(f.signatures[0])
        ins = set(re.findall(r"^\s+([a-z][a-z0-9]+)", asm, re.M))
        print("ASM", name, "vpmaddubsw" in ins and "vpdpwssd" in ins, "vpmovsxbq" in ins, "%zmm" in asm,
              "prefetcht0" in ins)
print(worst)
"""


def _run_fresh(mode, tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("MINILM_SIMD", None)
    if mode == "generic":
        env["MINILM_SIMD"] = "generic"
    r = subprocess.run([sys.executable, "-c", SUBPROCESS_SCRIPT, mode], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()


def test_generic_path_matches_dot_ref(tmp_path):
    """The kernels built without x86 instructions (generic LLVM IR: widening multiplies, a select
    chain for the IQ4 table; what a CPU without AVX512-VNNI or a non-x86 CPU compiles) compute
    the same sums. Fresh process and Numba cache: the cache does not know about MINILM_SIMD."""
    lines = _run_fresh("generic", tmp_path)
    assert float(lines[-1]) < 1e-5


def test_vnni_asm(tmp_path):
    """On an AVX512-VNNI CPU the K-quant gemv's hot loop is vpmaddubsw + vpdpwssd (the sub-block
    scales inside the integer dot) on zmm registers with software prefetch, and nothing widens
    int8 to int64 (vpmovsxbq)."""
    if GQ.SIMD != "vnni":
        pytest.skip("this CPU has no AVX512-VNNI/VL")
    lines = _run_fresh("asm", tmp_path)
    assert float(lines[-1]) < 1e-5
    asm = [ln.split() for ln in lines if ln.startswith("ASM")]
    assert asm == [["ASM", "Q4_K", "True", "False", "True", "True"]], lines
