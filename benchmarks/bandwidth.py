"""Memory-bandwidth probe (STREAM-like) with numba.

Decode speed of an LLM on CPU is bound by how fast the weights stream from RAM,
so other benchmarks report their tokens/s next to the machine's bandwidth:

    from minilm.bench import measure_bandwidth     # (also re-exported here)
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

import numba

from minilm.bench import measure_bandwidth  # noqa: F401  (the one implementation, installed with minilm)


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
