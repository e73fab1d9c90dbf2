"""Decode GEMV (and prefill GEMM) speed of the ggml K-quant / IQ4 kernels in
minilm.kernels.ggml_quants against qmatmul's Q4_0 gemv, on a TinyLlama-sized matrix.

    python benchmarks/bench_ggml_quants.py [--n 2048] [--k 5632] [--runs 15] [--threads 2]
                                           [--types Q4_K,Q6_K] [--gemm 0]

Weights: random N x K matrix quantized once per type (numpy reference quantizer). Each timed gemv
call follows a read of a 256 MB buffer so the weights come from DRAM, not from the LLC; the figure
is the median over the runs. GB/s = bytes of the raw weight array (all scales included) / time.
--gemm M also times the M-token GEMM (median, GFLOP/s = 2*M*N*K / time; weights from cache).
GB = 1e9 bytes. Run on an otherwise idle machine: the shared VM's speed moves 10-40 % between runs.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minilm.kernels import ggml_quants as GQ  # noqa: E402
from minilm.kernels import qmatmul as Q  # noqa: E402


@numba.njit(parallel=True, cache=True)
def _flush(buf):
    s = 0.0
    for i in numba.prange(buf.shape[0]):
        s += buf[i]
    return s


def _median_time(fn, runs, flush):
    fn()
    ts = []
    for _ in range(runs):
        if flush is not None:
            flush()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="output rows N")
    ap.add_argument("--k", type=int, default=5632, help="input width K (a multiple of 256)")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(GQ.SPECS), help="comma-separated ggml type names")
    ap.add_argument("--gemm", type=int, default=0, help="also time an M-token GEMM (0: off)")
    a = ap.parse_args(argv)
    if a.k % 256:
        ap.error(f"--k {a.k} is not a multiple of 256")
    names = [t.strip() for t in a.types.split(",") if t.strip()]
    bad = [t for t in names if t not in GQ.SPECS]
    if bad:
        ap.error(f"unknown --types {bad}; known: {list(GQ.SPECS)}")
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    rng = np.random.default_rng(0)
    N, K = a.n, a.k
    w = (rng.standard_normal((N, K), dtype=np.float32) * 0.02).astype(np.float32)
    x = rng.standard_normal(K, dtype=np.float32)
    out = np.zeros(N, np.float32)
    buf = np.ones(64 << 20, np.float32)           # 256 MB, read before each timed call
    flush = (lambda: _flush(buf))

    print(f"numba {numba.__version__}, threads {numba.get_num_threads()}, W {N}x{K}, "
          f"median of {a.runs}, weights from DRAM")
    print(f"{'type':>7} {'bpw':>6} {'MB':>7} {'gemv us':>9} {'GB/s':>6} {'x Q4_0 time':>11}"
          + (f" {'gemm ms':>8} {'GFLOP/s':>8}" if a.gemm else ""))
    qs, d = Q.quantize_q4_0(w, 32)
    sc = Q.act_scratch(K)
    q4v, q4m = Q.q4_0_bound(qs, d)                 # repacked once, as a model's matrices are
    t_q40 = _median_time(lambda: q4v(x, out, sc), a.runs, flush)
    mb = (qs.nbytes + d.nbytes) / 1e6
    line = f"{'Q4_0':>7} {4.5:6.3f} {mb:7.2f} {t_q40 * 1e6:9.0f} {mb / 1e3 / t_q40:6.1f} {1.0:11.2f}"
    if a.gemm:
        X = rng.standard_normal((a.gemm, K), dtype=np.float32)
        O = np.zeros((a.gemm, N), np.float32)
        tg = _median_time(lambda: q4m(X, O), max(3, a.runs // 3), None)
        line += f" {tg * 1e3:8.1f} {2 * a.gemm * N * K / tg / 1e9:8.1f}"
    print(line, flush=True)
    for name in names:
        s = GQ.SPECS[name]
        raw = s.quantize_ref(w)
        t = _median_time(lambda: s.gemv(x, raw, out), a.runs, flush)
        mb = raw.nbytes / 1e6
        line = (f"{name:>7} {s.bits_per_weight:6.3f} {mb:7.2f} {t * 1e6:9.0f} {mb / 1e3 / t:6.1f} "
                f"{t / t_q40:11.2f}")
        if a.gemm:
            tg = _median_time(lambda: s.gemm(X, raw, O), max(3, a.runs // 3), None)
            line += f" {tg * 1e3:8.1f} {2 * a.gemm * N * K / tg / 1e9:8.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
