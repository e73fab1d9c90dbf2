"""Benchmark of the quantized / 16-bit matmul kernels in minilm.kernels.qmatmul.

    python benchmarks/bench_kernels.py [--runs 15] [--quick]

1. STREAM-like read bandwidth (parallel numba sum over a 1 GB float32 array, median of runs).
2. Decode GEMV for each format and shape: median time, GB/s (bytes of weights + scales read
   per call / time) and % of the measured read bandwidth. Before each timed call a 512 MB
   buffer is read so the weights come from DRAM, not from the (large, 300 MB on the test VM)
   LLC. A plain f32 gemv (this file only) is shown for comparison.
3. Prefill GEMM (M=128): GFLOP/s = 2*M*N*K / time.
GB = 1e9 bytes.

    python benchmarks/bench_kernels.py --q4 [--runs 9] [--groups 32,64,128]

Q4_0 decode GEMV only, for a shared machine: each round measures the read bandwidth (1 GB sum)
and then every shape, so bandwidth and kernels see the same background load. Large shapes:
one call per round after reading 128 MB (weights from DRAM), GB/s = (qs + d bytes) / time.
Small (SmolLM2-135M, cache-resident) shapes: median of 30 back-to-back calls per round, in us.
Reported: medians over the rounds, and GB/s as a fraction of the median bandwidth.
Run with OMP_WAIT_POLICY=PASSIVE in the environment (set below if absent).
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
from minilm.bench import _bw_kernels, measure_bandwidth  # noqa: E402

_fill, _read_sum, _ = _bw_kernels()
from minilm.kernels import qmatmul as Q  # noqa: E402

SHAPES = [(5632, 2048), (2048, 5632), (1536, 576), (576, 1536), (49152, 576)]


from minilm.kernels.matmul import gemv_f32  # noqa: E402  (the engine's f32 GEMV, for comparison)


def _time(fn, runs, flush=None):
    fn()
    ts = []
    for _ in range(runs):
        if flush is not None:
            flush()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def make_formats(N, K, rng):
    w = (rng.standard_normal((N, K), dtype=np.float32) * 0.02).astype(np.float32)
    q8 = Q.quantize_q8_0(w)
    q4 = Q.quantize_q4_0(w, 32)
    q4g128 = Q.quantize_q4_0(w, 128) if K % 128 == 0 else None
    f16 = w.astype(np.float16)
    bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)
    fm = {
        "q8_0": (Q.gemv_q8_0, Q.gemm_q8_0, q8, q8[0].nbytes + q8[1].nbytes),
        "q4_0": (*_q4_on(q4), q4, q4[0].nbytes + q4[1].nbytes),
        "f16": (Q.gemv_f16, Q.gemm_f16, (f16,), f16.nbytes),
        "bf16": (Q.gemv_bf16, Q.gemm_bf16, (bf16,), bf16.nbytes),
        "f32": (gemv_f32, None, (w,), w.nbytes),
    }
    if q4g128 is not None:
        fm["q4_0/128"] = (*_q4_on(q4g128), q4g128, q4g128[0].nbytes + q4g128[1].nbytes)
    return fm


def _q4_on(q4):
    """gemv(x, qs, d, out) / gemm(X, qs, d, out) on Q4_0 arrays repacked once (Q.q4_0_bound): the
    public gemv_q4_0 repacks on every call."""
    gv, gm = Q.q4_0_bound(*q4)
    return (lambda x, qs, d, out: gv(x, out)), (lambda X, qs, d, out: gm(X, out))


Q4_LARGE = [(5632, 2048), (2048, 5632), (32000, 2048)]
Q4_SMALL = [(1536, 576), (576, 1536), (960, 576), (576, 576)]


def bench_q4(runs=9, groups=(32, 64, 128)):
    def bw_once(buf):
        t0 = time.perf_counter()
        _read_sum(buf)
        return buf.nbytes / (time.perf_counter() - t0) / 1e9

    buf = np.empty(1024 * 1024 * 1024 // 4, np.float32)
    _fill(buf, np.float32(1.0))
    flush = buf[: 128 * 1024 * 1024 // 4]
    bw_once(buf)
    rng = np.random.default_rng(0)
    data = {}
    for N, K in Q4_LARGE + Q4_SMALL:
        w = rng.standard_normal((N, K), dtype=np.float32) * np.float32(0.02)
        for G in groups:
            if K % G == 0:
                qs, d = Q.quantize_q4_0(w, G)
                data[(N, K, G)] = (qs, d, Q.q4_0_bound(qs, d)[0])
    xs = {K: rng.standard_normal(K, dtype=np.float32) for _, K in Q4_LARGE + Q4_SMALL}
    outs = {N: np.empty(N, np.float32) for N, _ in Q4_LARGE + Q4_SMALL}
    for (N, K, G), (qs, d, gv) in data.items():
        gv(xs[K], outs[N])                            # compile / load from cache
    res = {k: [] for k in data}
    bws = []
    for _ in range(runs):
        bws.append(bw_once(buf))
        for (N, K, G), (qs, d, gv) in data.items():
            x, out = xs[K], outs[N]
            if (N, K) in Q4_LARGE:
                _read_sum(flush)
                t0 = time.perf_counter()
                gv(x, out)
                res[(N, K, G)].append((qs.nbytes + d.nbytes) / (time.perf_counter() - t0) / 1e9)
            else:
                ts = []
                for _ in range(30):
                    t0 = time.perf_counter()
                    gv(x, out)
                    ts.append(time.perf_counter() - t0)
                res[(N, K, G)].append(statistics.median(ts) * 1e6)
    bw = statistics.median(bws)
    print(f"numba {numba.__version__}, threads {numba.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, {runs} rounds")
    print(f"read bandwidth: median {bw:.1f} GB/s (min {min(bws):.1f}, max {max(bws):.1f})")
    for (N, K, G), v in res.items():
        m = statistics.median(v)
        if (N, K) in Q4_LARGE:
            print(f"q4_0 G={G:<3} {N:>6}x{K:<5} {m:6.1f} GB/s  {100 * m / bw:4.0f}% of bw")
        else:
            nb = data[(N, K, G)][0].nbytes + data[(N, K, G)][1].nbytes
            print(f"q4_0 G={G:<3} {N:>6}x{K:<5} {m:6.1f} us    ({nb / m / 1e3:.1f} GB/s, in cache)")
    return bw, res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--M", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="fewer runs, no flush")
    ap.add_argument("--q4", action="store_true", help="Q4_0 gemv vs bandwidth, interleaved")
    ap.add_argument("--groups", default="32,64,128", help="Q4_0 group sizes for --q4")
    args = ap.parse_args(argv)
    if args.q4:
        bench_q4(args.runs if args.runs != 15 else 9, tuple(int(g) for g in args.groups.split(",")))
        return
    t_start = time.time()
    bw = measure_bandwidth(size_mb=1024, runs=7)["read_gbs"]
    print(f"numba {numba.__version__}, threads {numba.get_num_threads()}, "
          f"layer {os.environ.get('NUMBA_THREADING_LAYER', 'default')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"read bandwidth (1 GB, median of 7): {bw:.1f} GB/s")

    flush_buf = np.empty(512 * 1024 * 1024 // 4, np.float32)
    _fill(flush_buf, np.float32(1.0))
    flush = None if args.quick else (lambda: _read_sum(flush_buf))
    runs = 5 if args.quick else args.runs

    rng = np.random.default_rng(0)
    print(f"\n{'shape NxK':>12} {'format':>9} {'MB':>7} {'gemv us':>9} {'GB/s':>7} {'%bw':>6}"
          f" {'gemm M=' + str(args.M) + ' GFLOP/s':>20}")
    for N, K in SHAPES:
        fm = make_formats(N, K, rng)
        x = rng.standard_normal(K, dtype=np.float32)
        X = rng.standard_normal((args.M, K), dtype=np.float32)
        out = np.empty(N, np.float32)
        OUT = np.empty((args.M, N), np.float32)
        for name, (gemv, gemm, arrs, nbytes) in fm.items():
            t = _time(lambda: gemv(x, *arrs, out), runs, flush)
            gbs = nbytes / t / 1e9
            gf = ""
            if gemm is not None:
                tg = _time(lambda: gemm(X, *arrs, OUT), 3)
                gf = f"{2.0 * args.M * N * K / tg / 1e9:.1f}"
            print(f"{N:>6}x{K:<5} {name:>9} {nbytes / 1e6:>7.1f} {t * 1e6:>9.0f} {gbs:>7.1f}"
                  f" {100 * gbs / bw:>5.0f}% {gf:>20}")
    print(f"\n(total {time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
