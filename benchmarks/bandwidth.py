"""Memory-bandwidth probe (STREAM-like) with numba.

Decode speed of an LLM on CPU is bound by how fast the weights stream from RAM,
so other benchmarks report their tokens/s next to the machine's bandwidth:

    from benchmarks.bandwidth import measure_bandwidth   # repo root on sys.path
    bw = measure_bandwidth()          # uses the current numba thread count
    print(bw["read_gbs"], bw["triad_gbs"])

Run directly to print figures for 1 and 2 threads:

    python -m benchmarks.bandwidth [--size-mb 1024] [--runs 7]

Definitions (GB = 1e9 bytes):
  read   parallel sum over one float32 array of size_mb MB; traffic = 1 array.
  triad  a[i] = b[i] + s*c[i] over three float32 arrays of size_mb MB each;
         traffic = 3 arrays (STREAM convention: the write-allocate read of `a`
         is not counted, so this understates the real bus traffic).
Each figure is the median of `runs` timed runs after one warm-up run.
"""

import argparse
import statistics
import time

import numba
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=True)
def _fill(a, value):
    # Parallel first touch, so pages are spread over the threads that use them.
    for i in prange(a.size):
        a[i] = value


@njit(parallel=True, cache=True, fastmath=True)
def _read_sum(a):
    # fastmath lets LLVM vectorise the float32 reduction (reassociation).
    s = np.float32(0.0)
    for i in prange(a.size):
        s += a[i]
    return s


@njit(parallel=True, cache=True, fastmath=True)
def _triad(a, b, c, scalar):
    for i in prange(a.size):
        a[i] = b[i] + scalar * c[i]


def _median_seconds(fn, runs):
    fn()  # warm-up (also triggers JIT compilation / cache load)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(threads=None, size_mb=1024, runs=7):
    """Return {'threads', 'size_mb', 'read_gbs', 'triad_gbs', 'runs'}.

    threads=None uses the current numba thread count; otherwise the count is
    set for the measurement and restored afterwards. size_mb is per array
    (triad allocates 3 arrays, so 3*size_mb MB in total). runs >= 5.
    """
    runs = max(5, int(runs))
    old_threads = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(int(threads))
    try:
        n = int(size_mb) * 1024 * 1024 // 4  # float32 elements per array
        nbytes = n * 4
        a = np.empty(n, dtype=np.float32)
        b = np.empty(n, dtype=np.float32)
        c = np.empty(n, dtype=np.float32)
        _fill(a, np.float32(0.0))
        _fill(b, np.float32(1.0))
        _fill(c, np.float32(2.0))

        t_read = _median_seconds(lambda: _read_sum(b), runs)
        t_triad = _median_seconds(lambda: _triad(a, b, c, np.float32(3.0)), runs)
        return {
            "threads": numba.get_num_threads(),
            "size_mb": int(size_mb),
            "runs": runs,
            "read_gbs": nbytes / t_read / 1e9,
            "triad_gbs": 3 * nbytes / t_triad / 1e9,
        }
    finally:
        numba.set_num_threads(old_threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description="numba memory bandwidth probe")
    ap.add_argument("--size-mb", type=int, default=1024, help="MB per array")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"numba {numba.__version__}, max threads {numba.config.NUMBA_NUM_THREADS}, "
          f"{args.size_mb} MB per array, median of {max(5, args.runs)} runs")
    print(f"{'threads':>7} {'read GB/s':>10} {'triad GB/s':>11}")
    for t in (1, 2):
        if t > numba.config.NUMBA_NUM_THREADS:
            break
        r = measure_bandwidth(threads=t, size_mb=args.size_mb, runs=args.runs)
        print(f"{r['threads']:>7} {r['read_gbs']:>10.1f} {r['triad_gbs']:>11.1f}")


if __name__ == "__main__":
    main()
