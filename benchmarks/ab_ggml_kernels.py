"""The ggml block-format kernels of two trees side by side in one process, interleaved rounds:
kernels/ggml_quants.py of an OLD tree (loaded as a second module) against this tree's, with
qmatmul's Q4_0 as the yardstick.

    python benchmarks/ab_ggml_kernels.py --old /path/to/old/tree --types Q4_K,Q6_K \\
        [--shapes 2048x5632,5632x2048] [--rounds 5] [--gemm 64] [--threads 2]

Per shape N x K: each type quantized once (this tree's quantize_ref); per round every kernel in
turn: the GEMV with the weights from DRAM (a 256 MB read before the call; GB/s = weight bytes /
time), the GEMV again from cache (ns per weight), the M-token GEMM (GFLOP/s = 2*M*N*K / time).
Medians over the rounds. The old module imports this tree's kernels/simd.py (its relative imports
resolve to the installed package), so only the ggml kernels differ.

    python benchmarks/ab_ggml_kernels.py --old /path/to/old/tree --short [--calls 100]

--short: for a loaded machine, where a call of milliseconds is preempted and medians drift:
one thread, the `gemv_<type>_groups` kernel on W 256 x 2048 in cache and `gemm_<type>_groups`
on W 16 x 5632 against 128 tokens (X from L2), each the minimum over --calls rounds of 3 short
calls (10-100 us), the two trees interleaved; qmatmul's Q4_0 GEMV (with its activation
quantization) as the per-weight yardstick.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_ggml_quants import _flush  # noqa: E402
from minilm.kernels import ggml_quants as NEW  # noqa: E402
from minilm.kernels import qmatmul as Q  # noqa: E402


def _load_old(tree):
    path = os.path.join(tree, "kernels", "ggml_quants.py")
    if not os.path.isfile(path):
        raise SystemExit(f"--old {tree}: no kernels/ggml_quants.py there")
    spec = importlib.util.spec_from_file_location("minilm.kernels.ggml_quants_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="root of the old tree")
    ap.add_argument("--types", default=",".join(NEW.SPECS))
    ap.add_argument("--shapes", default="2048x5632,5632x2048", help="comma-separated NxK")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gemm", type=int, default=64, help="tokens of the GEMM")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--short", action="store_true", help="minimum-of-many short calls, 1 thread (see above)")
    ap.add_argument("--calls", type=int, default=100, help="--short: rounds of 3 calls per kernel")
    a = ap.parse_args(argv)
    names = [t for t in a.types.split(",") if t]
    bad = [t for t in names if t not in NEW.SPECS]
    if bad:
        ap.error(f"unknown --types {bad}; known: {list(NEW.SPECS)}")
    old = _load_old(a.old)
    if a.short:
        return _short(old, names, a.calls)
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    buf = np.ones(64 << 20, np.float32)
    rng = np.random.default_rng(0)

    def timed(fn, flush):
        if flush:
            _flush(buf)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for shape in a.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        w = rng.standard_normal((N, K), dtype=np.float32) * np.float32(0.02)
        x = rng.standard_normal(K, dtype=np.float32)
        X = rng.standard_normal((a.gemm, K), dtype=np.float32)
        out = np.zeros(N, np.float32)
        O = np.zeros((a.gemm, N), np.float32)
        qs, d = Q.quantize_q4_0(w, 32)
        sc = Q.act_scratch(K)
        q4v, q4m = Q.q4_0_bound(qs, d)             # repacked once, as a model's matrices are
        items = [("Q4_0", "", lambda: q4v(x, out, sc), lambda: q4m(X, O),
                  qs.nbytes + d.nbytes)]
        for n in names:
            raw = NEW.SPECS[n].quantize_ref(w)
            for tag, mod in (("old", old), ("new", NEW)):
                s = mod.SPECS[n]
                items.append((n, tag, (lambda s=s, raw=raw: s.gemv(x, raw, out)),
                              (lambda s=s, raw=raw: s.gemm(X, raw, O)), raw.nbytes))
        for it in items:            # compile / warm
            it[2]()
            it[3]()
        T = {it[:2]: ([], [], []) for it in items}
        for _ in range(a.rounds):
            for name, tag, fv, fg, _nb in items:
                T[(name, tag)][0].append(timed(fv, True))
                T[(name, tag)][1].append(timed(fv, False))
                T[(name, tag)][2].append(timed(fg, False))
        print(f"\nW {N}x{K}, {a.rounds} rounds interleaved, threads {numba.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.1f}")
        print("| type | tree | GEMV from DRAM us | GB/s | GEMV in cache ns/weight | "
              f"GEMM M={a.gemm} ms | GFLOP/s |")
        print("|---|---|---|---|---|---|---|")
        for name, tag, _fv, _fg, nb in items:
            td, tc, tg = (statistics.median(v) for v in T[(name, tag)])
            print(f"| {name} | {tag} | {td * 1e6:.0f} | {nb / 1e9 / td:.1f} | {tc * 1e9 / (N * K):.3f} | "
                  f"{tg * 1e3:.1f} | {2 * a.gemm * N * K / tg / 1e9:.1f} |", flush=True)


def _short(old, names, calls):
    numba.set_num_threads(1)
    mods = {"old": old, "new": NEW}
    rng = np.random.default_rng(0)

    def tmin(fs, n):
        best = {k: float("inf") for k in fs}
        for _ in range(n):
            for k, f in fs.items():
                for _ in range(3):
                    t0 = time.perf_counter()
                    f()
                    best[k] = min(best[k], time.perf_counter() - t0)
        return best

    N, K = 256, 2048                       # GEMV: W[N, K] in cache
    Ng, Kg, M = 16, 5632, 128              # GEMM: W[Ng, Kg] against M tokens
    w = rng.standard_normal((N, K), dtype=np.float32) * np.float32(0.02)
    x = rng.standard_normal(K, dtype=np.float32)
    wg = rng.standard_normal((Ng, Kg), dtype=np.float32) * np.float32(0.02)
    X = rng.standard_normal((M, Kg), dtype=np.float32)
    out = np.zeros(N, np.float32)          # [N]
    O = np.zeros((M, Ng), np.float32)      # [M, Ng]
    qs, d = Q.quantize_q4_0(w, 32)
    sc = Q.act_scratch(K)
    q4v = Q.q4_0_bound(qs, d)[0]                 # repacked once, as a model's matrices are
    q40 = tmin({"q4_0": lambda: q4v(x, out, sc)}, calls)["q4_0"]
    print(f"1 thread, load average {os.getloadavg()[0]:.1f}; GEMV W {N}x{K} in cache, us (min); Q4_0 "
          f"(qmatmul, with its activation quantization) {q40 * 1e6:.1f} us; GEMM W {Ng}x{Kg}, M={M}, GFLOP/s (best)")
    print("| type | GEMV old us | GEMV new us | new/old time | new vs Q4_0 per weight | GEMM old GFLOP/s | "
          "GEMM new GFLOP/s | GEMM new/old |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        s = NEW.SPECS[n]
        if s.block != 256:
            continue                       # the 32-block types have no _groups GEMM of this shape
        raw, rawg = s.quantize_ref(w), s.quantize_ref(wg)
        xq, xd, xs = np.zeros(K, np.int8), np.zeros(K // 32, np.float32), np.zeros(K // 16, np.float32)
        s.act_quant(x, xq, xd, xs)
        XQ = np.zeros((M, Kg), np.int8)                 # [M, Kg]
        XD = np.zeros((M, Kg // 32), np.float32)        # [M, Kg/32]
        XS = np.zeros((M, Kg // 16), np.float32)        # [M, Kg/16]
        for i in range(M):
            s.act_quant(X[i], XQ[i], XD[i], XS[i])
        gv = {k: (lambda f=getattr(m, f"gemv_{n.lower()}_groups"): f(xq, xd, xs, raw, out, 0, N // 4))
              for k, m in mods.items()}
        gm = {k: (lambda f=getattr(m, f"gemm_{n.lower()}_groups"): f(XQ, XD, XS, rawg, O, M, 0, Ng // 4))
              for k, m in mods.items()}
        for f in list(gv.values()) + list(gm.values()):
            f()
        bv, bg = tmin(gv, calls), tmin(gm, max(1, calls // 3))
        fl = 2 * M * Ng * Kg
        print(f"| {n} | {bv['old'] * 1e6:.1f} | {bv['new'] * 1e6:.1f} | {bv['new'] / bv['old']:.2f}x | "
              f"{bv['new'] / q40:.2f}x | {fl / bg['old'] / 1e9:.0f} | {fl / bg['new'] / 1e9:.0f} | "
              f"{bg['old'] / bg['new']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    main()
