"""Repacked Q4_K against ggml's layout, one process, the two kernels interleaved.

    python benchmarks/repack_ab.py [--rounds 12] [--stream-mb 184]

1. In cache, 1 thread: gemv_q4_k_groups (ggml bytes) against gemv_q4_k_rp_groups (repack_q4_k's
   layout) on W 256 x 2048 (minimum over 200 calls) and 5632 x 2048, and the two GEMMs.
2. Streaming, 2 threads: one GEMV over --stream-mb MB of Q4_K rows (past every cache, as decode
   reads its weights), split over 2 threads as the executor splits a matmul; minimum and median
   over --rounds. Both checks assert the two layouts give the same bits.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numba
import numpy as np
from numba import njit, prange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minilm.kernels import ggml_quants as gq  # noqa: E402

S = gq.SPECS["Q4_K"]


@njit(parallel=True)
def _old_par(xq, xd, xs, raw, out, nt):
    ng = (raw.shape[0] + 3) // 4
    for t in prange(nt):
        gq.gemv_q4_k_groups(xq, xd, xs, raw, out, t * ng // nt, (t + 1) * ng // nt)


@njit(parallel=True)
def _new_par(xq, xd, xs, raw, out, nt):
    ng = (raw.shape[0] + 3) // 4
    for t in prange(nt):
        gq.gemv_q4_k_rp_groups(xq, xd, xs, raw, out, t * ng // nt, (t + 1) * ng // nt)


def _data(N, K, M, rng):
    base = S.quantize_ref(rng.standard_normal((min(N, 256), K)).astype(np.float32))
    raw = np.ascontiguousarray(np.tile(base, (-(-N // base.shape[0]), 1))[:N])
    X = rng.standard_normal((M, K)).astype(np.float32)
    XQ, XD, XS = gq.act_scratch(K, M)
    for t in range(M):
        S.act_quant(X[t], XQ[t], XD[t], XS[t])
    return raw, gq.repack_q4_k(raw), XQ, XD, XS


def in_cache(N, K, reps, M):
    raw, rp, XQ, XD, XS = _data(N, K, M, np.random.default_rng(0))
    ng = (N + 3) // 4
    o, O = np.zeros((2, N), np.float32), np.zeros((2, M, N), np.float32)
    res = {k: [] for k in ("gemv old", "gemv new", "gemm old", "gemm new")}
    for _ in range(reps):
        for i, (k, f, a) in enumerate((("gemv old", S.gemv_groups, raw), ("gemv new", gq.gemv_q4_k_rp_groups, rp))):
            t = time.perf_counter()
            f(XQ[0], XD[0], XS[0], a, o[i], 0, ng)
            res[k].append(time.perf_counter() - t)
        for i, (k, f, a) in enumerate((("gemm old", S.gemm_groups, raw), ("gemm new", gq.gemm_q4_k_rp_groups, rp))):
            t = time.perf_counter()
            f(XQ, XD, XS, a, O[i], M, 0, ng)
            res[k].append(time.perf_counter() - t)
    assert np.array_equal(o[0], o[1]) and np.array_equal(O[0], O[1])
    for k, v in res.items():
        v = np.array(v)
        unit = f"{2 * M * N * K / v.min() / 1e9:.1f} GFLOP/s (M={M})" if "gemm" in k else f"{v.min() * 1e9 / (N * K):.4f} ns/w"
        print(f"  {N} x {K} {k}: min {v.min() * 1e6:.1f} us, median {np.median(v) * 1e6:.1f} us, {unit}")


def stream(mb, rounds):
    K = 2048
    N = int(mb * 1e6) // (K // 256 * 144) // 256 * 256
    raw, rp, XQ, XD, XS = _data(N, K, 1, np.random.default_rng(1))
    o = np.zeros((2, N), np.float32)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    _old_par(XQ[0], XD[0], XS[0], raw, o[0], 2)
    _new_par(XQ[0], XD[0], XS[0], rp, o[1], 2)
    assert np.array_equal(o[0], o[1])
    res = {"old": [], "new": []}
    for _ in range(rounds):
        for i, (k, f, a) in enumerate((("old", _old_par, raw), ("new", _new_par, rp))):
            t = time.perf_counter()
            f(XQ[0], XD[0], XS[0], a, o[i], 2)
            res[k].append(time.perf_counter() - t)
    for k, v in res.items():
        v = np.array(v)
        print(f"  stream {raw.nbytes / 1e6:.0f} MB, 2 threads, {k}: min {v.min() * 1e3:.1f} ms, median "
              f"{np.median(v) * 1e3:.1f} ms (max {v.max() * 1e3:.1f}); {raw.nbytes / v.min() / 1e9:.1f} GB/s of ggml bytes")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--stream-mb", type=float, default=184.0)
    a = ap.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f}")
    in_cache(256, 2048, 200, 16)
    in_cache(5632, 2048, 15, 64)
    stream(a.stream_mb, a.rounds)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
