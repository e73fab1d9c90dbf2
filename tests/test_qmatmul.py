"""Tests for minilm.kernels.qmatmul: quantizers, ggml byte layout, gemv/gemm kernels."""

import numpy as np
import pytest

from minilm.kernels import qmatmul as Q

RNG = np.random.default_rng(1234)


def _w(N, K, scale=1.0, seed=0):
    return (np.random.default_rng(seed).standard_normal((N, K)) * scale).astype(np.float32)


def _act_deq(x):
    """Model of the activation quantization done inside the quantized gemvs."""
    K = x.shape[0]
    xq = np.empty(K, np.int8)
    xd = np.empty(K // 32, np.float32)
    xs = np.empty(K // 32, np.float32)
    Q.quantize_act_q8(x, xq, xd, xs)
    return xq, xd, xs, xq.astype(np.float64) * np.repeat(xd, 32).astype(np.float64)


def _blk_amax(x):
    return np.repeat(np.abs(x.reshape(-1, 32)).max(axis=1), 32).astype(np.float64)


def _bf16(w):
    return (w.view(np.uint32) >> 16).astype(np.uint16)


def _bf16_deq(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- quantizers


@pytest.mark.parametrize("N,K", [(1, 32), (7, 64), (33, 576), (64, 1536)])
def test_q8_fast_equals_ref(N, K):
    w = _w(N, K, 0.05, seed=N)
    w[0, :32] = 0.0                      # all-zero block
    w[-1, 5] = 1e4                       # one huge outlier
    qs, d = Q.quantize_q8_0_ref(w)
    qs2, d2 = Q.quantize_q8_0(w)
    assert qs.dtype == np.int8 and qs.shape == (N, K)
    assert d.dtype == np.float16 and d.shape == (N, K // 32)
    assert np.array_equal(qs, qs2)
    assert np.array_equal(d.view(np.uint16), d2.view(np.uint16))


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("N,K", [(1, 128), (7, 256), (33, 1536)])
def test_q4_fast_equals_ref(N, K, G):
    w = _w(N, K, 0.05, seed=K + G)
    w[0, :G] = 0.0
    w[-1, 3] = -1e4
    qs, d = Q.quantize_q4_0_ref(w, G)
    qs2, d2 = Q.quantize_q4_0(w, G)
    assert qs.dtype == np.uint8 and qs.shape == (N, K // 2)
    assert d.dtype == np.float16 and d.shape == (N, K // G)
    assert np.array_equal(qs, qs2)
    assert np.array_equal(d.view(np.uint16), d2.view(np.uint16))


def test_q8_rounding_half_away_from_zero():
    # amax = 127 -> d = 1, values x.5 must round away from zero (roundf)
    row = np.zeros(32, np.float32)
    row[0] = 127.0
    row[1:5] = [0.5, -0.5, 2.5, -2.5]
    qs, d = Q.quantize_q8_0_ref(row[None])
    assert float(d[0, 0]) == 1.0
    assert list(qs[0, :5]) == [127, 1, -1, 3, -3]
    assert np.array_equal(Q.quantize_q8_0(row[None])[0], qs)


def test_zero_blocks():
    w = np.zeros((3, 128), np.float32)
    for quant in (Q.quantize_q8_0_ref, Q.quantize_q8_0):
        qs, d = quant(w)
        assert not qs.any() and not d.astype(np.float32).any()
    for G in (32, 64, 128):
        qs, d = Q.quantize_q4_0(w, G)
        assert (qs == 0x88).all() and not d.astype(np.float32).any()   # nibble 8 == value 0
        assert not Q.dequantize_q4_0_ref(qs, d).any()


def test_outlier_block():
    w = _w(2, 64, 0.01)
    w[1, 40] = 100.0
    qs, d = Q.quantize_q8_0(w)
    back = Q.dequantize_q8_0_ref(qs, d)
    assert abs(back[1, 40] - 100.0) < 0.05              # the outlier itself survives
    assert np.abs(back[0] - w[0]).max() < 0.01 / 127 * 4 + 1e-6  # other rows unaffected
    qs4, d4 = Q.quantize_q4_0(w, 32)
    back4 = Q.dequantize_q4_0_ref(qs4, d4)
    assert abs(back4[1, 40] - 100.0) < 0.1              # max maps exactly to q=0 -> -8*d


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_raises(bad):
    w = _w(2, 64)
    w[1, 7] = bad
    for f in (Q.quantize_q8_0_ref, Q.quantize_q8_0,
              lambda a: Q.quantize_q4_0_ref(a, 32), lambda a: Q.quantize_q4_0(a, 64)):
        with pytest.raises(ValueError):
            f(w)


def test_bad_k_raises():
    with pytest.raises(ValueError):
        Q.quantize_q8_0(_w(2, 48))
    with pytest.raises(ValueError):
        Q.quantize_q4_0_ref(_w(2, 96), 64)
    with pytest.raises(ValueError):
        Q.quantize_q4_0(_w(2, 64), 48)


def test_roundtrip_rmse():
    # N(0,1) data; measured: Q8_0 0.0053, Q4_0/32 0.086, /64 0.095, /128 0.103 (x std)
    w = _w(64, 4096, 1.0, seed=7)
    rmse8 = np.sqrt(np.mean((Q.dequantize_q8_0_ref(*Q.quantize_q8_0(w)) - w) ** 2))
    assert rmse8 < 0.0065
    for G, lim in ((32, 0.095), (64, 0.105), (128, 0.115)):
        rmse4 = np.sqrt(np.mean((Q.dequantize_q4_0_ref(*Q.quantize_q4_0(w, G)) - w) ** 2))
        assert 0.05 < rmse4 < lim, (G, rmse4)


def test_dot_product_error():
    # end-to-end error of the quantized gemv vs the exact f32 product (weights + activation
    # quantization), relative to the output RMS. Measured ~0.008 (Q8_0), ~0.10 (Q4_0).
    N, K = 256, 2048
    w = _w(N, K, 1.0, seed=3)
    x = np.random.default_rng(4).standard_normal(K).astype(np.float32)
    exact = w.astype(np.float64) @ x
    rms = np.sqrt(np.mean(exact ** 2))
    out = np.empty(N, np.float32)
    Q.gemv_q8_0(x, *Q.quantize_q8_0(w), out)
    assert np.sqrt(np.mean((out - exact) ** 2)) / rms < 0.009
    Q.gemv_q4_0(x, *Q.quantize_q4_0(w, 32), out)
    assert np.sqrt(np.mean((out - exact) ** 2)) / rms < 0.1


# ---------------------------------------------------------------- ggml byte layout


def test_ggml_q8_0_block_bytes():
    row = np.arange(32, dtype=np.float32)[None]          # 0..31
    qs, d = Q.quantize_q8_0_ref(row)
    # d = 31/127 -> fp16 0x33CF (0.24414...) ; q_i = roundf(i * 127/31)
    assert d.view(np.uint16)[0, 0] == np.float16(31 / 127).view(np.uint16)
    blk = d[0, :1].tobytes() + qs[0].tobytes()           # ggml block_q8_0: {ggml_half d; int8 qs[32]}
    assert len(blk) == 34
    assert blk[:2] == np.float16(31.0 / 127.0).tobytes()
    # by hand: 1*4.0968 = 4.10 -> 4 ; 2 -> 8.19 -> 8 ; 3 -> 12.29 -> 12 ; 31 -> 127
    assert list(blk[2:6]) == [0, 4, 8, 12]
    assert blk[-1] == 127


def test_ggml_q4_0_block_bytes():
    row = np.arange(32, dtype=np.float32)[None]          # 0..31; max |x| = 31 -> d = -31/8
    qs, d = Q.quantize_q4_0_ref(row, 32)
    blk = d[0, :1].tobytes() + qs[0].tobytes()           # ggml block_q4_0: {ggml_half d; uint8 qs[16]}
    assert len(blk) == 18
    assert blk[:2] == np.float16(-31.0 / 8.0).tobytes()
    # id = -8/31; q = min(15, int(x*id + 8.5)):
    #   x=0 -> 8 ; x=16 -> int(-4.129+8.5)=4 ; byte0 = 8 | 4<<4 = 0x48
    #   x=1 -> int(8.242)=8 ; x=17 -> int(4.113)=4 ; byte1 = 0x48
    #   x=2 -> int(7.984)=7 ; x=18 -> int(3.855)=3 ; byte2 = 0x37
    #   x=15 -> int(4.629)=4 ; x=31 -> int(0.5)=0 ; byte15 = 0x04
    assert list(blk[2:5]) == [0x48, 0x48, 0x37]
    assert blk[17] == 0x04


# ---------------------------------------------------------------- kernels

SHAPES = [(1, 32), (7, 64), (172, 576), (9, 1536), (65, 256)]


@pytest.mark.parametrize("N,K", SHAPES)
def test_gemv_q8_0(N, K):
    w = _w(N, K, 0.1, seed=N * K)
    x = RNG.standard_normal(K).astype(np.float32)
    qs, d = Q.quantize_q8_0(w)
    out = np.full(N, np.nan, np.float32)
    Q.gemv_q8_0(x, qs, d, out)
    _, _, _, xdeq = _act_deq(x)
    ref = Q.dequantize_q8_0_ref(qs, d).astype(np.float64) @ xdeq   # exact model of the kernel
    scale = np.abs(ref).max() + 1e-30
    assert np.abs(out - ref).max() / scale < 2e-6
    wd = Q.dequantize_q8_0_ref(qs, d).astype(np.float64)
    exact = wd @ x                                   # vs unquantized activation: error is
    bound = np.abs(wd) @ _blk_amax(x) / 254.0        # at most sum|w| * (half an int8 step)
    assert (np.abs(out - exact) <= bound + 1e-6).all()


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("N,K", SHAPES)
def test_gemv_q4_0(N, K, G):
    if K % G:
        pytest.skip("K not a multiple of G")
    w = _w(N, K, 0.1, seed=N * K + G)
    x = RNG.standard_normal(K).astype(np.float32)
    qs, d = Q.quantize_q4_0(w, G)
    out = np.full(N, np.nan, np.float32)
    Q.gemv_q4_0(x, qs, d, out)
    _, _, _, xdeq = _act_deq(x)
    ref = Q.dequantize_q4_0_ref(qs, d).astype(np.float64) @ xdeq
    scale = np.abs(ref).max() + 1e-30
    assert np.abs(out - ref).max() / scale < 5e-6
    wd = Q.dequantize_q4_0_ref(qs, d).astype(np.float64)
    exact = wd @ x
    bound = np.abs(wd) @ _blk_amax(x) / 254.0
    assert (np.abs(out - exact) <= bound + 1e-6).all()


@pytest.mark.parametrize("N,K", SHAPES)
def test_gemv_f16_bf16(N, K):
    w = _w(N, K, 0.1, seed=N + K)
    x = RNG.standard_normal(K).astype(np.float32)
    out = np.full(N, np.nan, np.float32)
    wh = w.astype(np.float16)
    Q.gemv_f16(x, wh, out)
    ref = wh.astype(np.float64) @ x
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
    wb = _bf16(w)
    Q.gemv_bf16(x, wb, out)
    ref = _bf16_deq(wb).astype(np.float64) @ x
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("M", [1, 5, 130])
@pytest.mark.parametrize("N,K", [(7, 64), (300, 128), (172, 576)])
def test_gemm_all_formats(M, N, K):
    w = _w(N, K, 0.1, seed=M + N)
    x = RNG.standard_normal((M, K)).astype(np.float32)
    out = np.full((M, N), np.nan, np.float32)
    cases = [
        (Q.gemm_f16, (w.astype(np.float16),), lambda a: a.astype(np.float32)),
        (Q.gemm_bf16, (_bf16(w),), _bf16_deq),
    ]
    for gemm, arrs, deq in cases:
        out[:] = np.nan
        gemm(x, *arrs, out)
        ref = x.astype(np.float64) @ deq(*arrs).astype(np.float64).T
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5, gemm.__name__
    # quantized: each token's activations are quantized as in the gemv (the exact model of the
    # kernel), and every row equals the gemv of that token
    xdeq = np.stack([_act_deq(x[m])[3] for m in range(M)])                 # [M, K] f64
    for gemm, gemv, arrs, deq in [
            (Q.gemm_q8_0, Q.gemv_q8_0, Q.quantize_q8_0(w), Q.dequantize_q8_0_ref),
            (Q.gemm_q4_0, Q.gemv_q4_0, Q.quantize_q4_0(w, 32), Q.dequantize_q4_0_ref),
            (Q.gemm_q4_0, Q.gemv_q4_0, Q.quantize_q4_0(w, 64), Q.dequantize_q4_0_ref)]:
        out[:] = np.nan
        gemm(x, *arrs, out)
        wd = deq(*arrs).astype(np.float64)
        ref = xdeq @ wd.T
        assert np.abs(out - ref).max() / np.abs(ref).max() < 5e-6, gemm.__name__
        bound = np.stack([np.abs(wd) @ _blk_amax(x[m]) / 254.0 for m in range(M)])
        assert (np.abs(out - x.astype(np.float64) @ wd.T) <= bound + 1e-6).all(), gemm.__name__
        row = np.empty(N, np.float32)
        for m in sorted({0, M - 1}):
            gemv(x[m], *arrs, row)
            np.testing.assert_array_equal(out[m], row)


def test_q4_0_repack_layout_and_group_sizes():
    """repack_q4_0 (the executor's il16 layout, any group size: 16 rows side by side per 32-weight
    block) and unrepack_q4_0 give back ggml's bytes exactly, all rows or some; the layout's bytes
    are where the docs say; the il16 GEMM rows equal the GEMV bit for bit for G = 64 and 128 and
    a row count that is not a multiple of 16; a group size outside 32/64/128 is refused."""
    N, K, M = 21, 256, 6
    w = _w(N, K, 0.1, seed=3)
    X = RNG.standard_normal((M, K)).astype(np.float32)
    for G in (32, 64, 128):
        qs, d = Q.quantize_q4_0(w, G)
        qi, di = Q.repack_q4_0(qs, d)
        assert qi.shape == (2, K // 32 * 256) and di.shape == (2, K // 32 * 16)
        q2, d2 = Q.unrepack_q4_0(qi, di, N, G)
        assert np.array_equal(q2, qs) and np.array_equal(d2.view(np.uint16), d.view(np.uint16))
        ids = np.array([20, 0, 17, 5])
        q3, d3 = Q.unrepack_q4_0(qi, di, N, G, ids)
        assert np.array_equal(q3, qs[ids]) and np.array_equal(d3.view(np.uint16), d.view(np.uint16)[ids])
        codes = np.concatenate([qs.reshape(N, K // G, G // 2) & 15, qs.reshape(N, K // G, G // 2) >> 4],
                               axis=2).reshape(N, K)
        r, b, p, j = 17, 3, 2, 1                 # row 17 = row 1 of group 1; block 3, piece 2, byte 1
        byte = qi[1, 256 * b + 64 * p + 4 * 1 + j]
        assert byte & 15 == codes[r, 32 * b + 4 * p + j] and byte >> 4 == codes[r, 32 * b + 16 + 4 * p + j]
        assert di[1, 16 * b + 1] == d.view(np.uint16)[r, 32 * b // G]
        assert not qi[1, :].reshape(-1, 4, 16, 4)[:, :, 5:].any()     # rows 21..31: zero padding
        out = np.full((M, N), np.nan, np.float32)
        Q.gemm_q4_0(X, qs, d, out)
        row = np.empty(N, np.float32)
        for m in range(M):
            Q.gemv_q4_0(X[m], qs, d, row)
            np.testing.assert_array_equal(out[m], row)
    with pytest.raises(ValueError, match="group size"):
        Q.repack_q4_0(np.zeros((4, 24), np.uint8), np.zeros((4, 1), np.float16))



def test_single_signature():
    K, N = 128, 9
    w = _w(N, K)
    x = RNG.standard_normal(K).astype(np.float32)
    out = np.empty(N, np.float32)
    X = RNG.standard_normal((3, K)).astype(np.float32)
    OUT = np.empty((3, N), np.float32)
    for G in (32, 64, 128):
        Q.gemv_q4_0(x, *Q.quantize_q4_0(w, G), out)
        Q.gemm_q4_0(X, *Q.quantize_q4_0(w, G), OUT)
    Q.gemv_q8_0(x, *Q.quantize_q8_0(w), out)
    Q.gemv_f16(x, w.astype(np.float16), out)
    Q.gemv_bf16(x, _bf16(w), out)
    Q.gemm_q8_0(X, *Q.quantize_q8_0(w), OUT)
    Q.gemm_f16(X, w.astype(np.float16), OUT)
    Q.gemm_bf16(X, _bf16(w), OUT)
    Q.quantize_act_q8(x, *Q.act_scratch(K))    # also called directly (inside the gemv it may come from cache)
    kernels = [Q.gemv_q8_0.kernel, Q.gemv_q4_0.kernel, Q.gemv_f16.kernel, Q.gemv_bf16,
               Q._gemm_q8_0_kernel, Q._gemm_q4_0_kernel, Q._gemm_f16_kernel, Q._gemm_bf16_kernel,
               Q.quantize_act_q8]
    for k in kernels:
        assert len(k.signatures) == 1, (k, k.signatures)


# ---------------------------------------------------------------- Q4_0 gemv internals


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("N,K", [(4, 128), (5, 160), (8, 192), (3, 224), (6, 2048), (13, 5632)])
def test_gemv_q4_0_chunk_tails(N, K, G):
    # odd block counts (the GEMV's single last block), row tails (N % 16: padded groups), and extreme
    # nibbles / scales
    if K % G:
        pytest.skip("K not a multiple of G")
    w = _w(N, K, 1.0, seed=N + K + G)
    w[0, ::7] *= 40.0
    qs, d = Q.quantize_q4_0(w, G)
    qs[-1, :] = 0xF0 if N % 2 else 0x0F       # nibbles 0 and 15 (values -8*d and +7*d)
    x = np.random.default_rng(N).standard_normal(K).astype(np.float32)
    x[-32:] *= 100.0                            # large values in the last (tail) chunk
    out = np.full(N, np.nan, np.float32)
    Q.gemv_q4_0(x, qs, d, out)
    _, _, _, xdeq = _act_deq(x)
    wd = Q.dequantize_q4_0_ref(qs, d).astype(np.float64)
    ref = wd @ xdeq
    # float32 accumulation: error bounded relative to sum |w * x| (large cancelling terms here)
    assert (np.abs(out - ref) <= 2e-6 * (np.abs(wd) @ np.abs(xdeq))).all()
    out2 = np.full(N, np.nan, np.float32)       # same result through a caller-owned scratch
    Q.gemv_q4_0(x, qs, d, out2, scratch=(np.empty(K, np.int8), np.empty(K // 32, np.float32),
                                         np.empty(K // 32, np.float32)))
    assert np.array_equal(out, out2)


# ---------------------------------------------------------------- other CPUs' code paths

FALLBACK_SCRIPT = r"""
import numpy as np
from minilm.kernels import qmatmul as Q
assert Q.SIMD == "{simd}", Q.SIMD
rng = np.random.default_rng(7)
worst = 0.0
for N, K in [(13, 96), (8, 576), (5, 160)]:
    w = rng.standard_normal((N, K)).astype(np.float32)
    w[0, :32] = 127.0                    # Q8 values at +-127 (pair sums beyond int16 for u = w + 128)
    w[1, :32] = -127.0
    x = (rng.standard_normal(K) * 50).astype(np.float32)
    xq, xd, xs = np.empty(K, np.int8), np.empty(K // 32, np.float32), np.empty(K // 32, np.float32)
    Q.quantize_act_q8(x, xq, xd, xs)
    xdeq = xq.astype(np.float64) * np.repeat(xd, 32)
    for fmt in ("q8", "q4"):
        qs, d = Q.quantize_q8_0(w) if fmt == "q8" else Q.quantize_q4_0(w, 32)
        wd = (Q.dequantize_q8_0_ref if fmt == "q8" else Q.dequantize_q4_0_ref)(qs, d).astype(np.float64)
        out = np.full(N, np.nan, np.float32)
        (Q.gemv_q8_0 if fmt == "q8" else Q.gemv_q4_0)(x, qs, d, out)
        ref = wd @ xdeq
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
        # the GEMM (tiles of several tokens) gives every token the GEMV's bits on this path too
        X = np.stack([x, x[::-1].copy(), x * 3, -x, x + 1])
        OUT = np.full((5, N), np.nan, np.float32)
        (Q.gemm_q8_0 if fmt == "q8" else Q.gemm_q4_0)(X, qs, d, OUT)
        for m in range(5):
            (Q.gemv_q8_0 if fmt == "q8" else Q.gemv_q4_0)(X[m], qs, d, out)
            assert np.array_equal(OUT[m], out), (fmt, N, K, m)
print(worst)
"""


@pytest.mark.parametrize("simd", ["generic", "avx2"])
def test_gemv_fallback_paths(simd, tmp_path):
    """The quantized GEMVs built without AVX512-VNNI (MINILM_SIMD=avx2: vpmaddubsw, which
    saturates, so Q8_0 takes the widening path) and without any x86 instruction (generic IR: what
    a Raspberry Pi or any non-x86 CPU compiles) give the same results as the kernel model. Run
    in a fresh process with an empty Numba cache (the cache does not know about the switch), and
    their GEMMs equal their GEMVs bit for bit."""
    import os
    import subprocess
    import sys
    if simd == "avx2" and Q.SIMD == "generic":
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, MINILM_SIMD=simd, NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT.replace("{simd}", simd)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 5e-6
