"""Where a decode step's time goes: wall time per kernel call, summed per token.

    python benchmarks/profile_decode.py --model /tmp/ckpt/smollm2-135m --quant int4 [--threads 2 --pos 128]

Prints the decode time per token as minilm runs it (decode_step: one Numba call and one
parallel region per token, where the model allows), then the same token through the general
per-kernel forward (minilm.model.FUSED_DECODE = False) with timers around Linear.__call__,
attention, norms and SwiGLU (Python-side wall time, so each row includes that call's Numba
dispatch and parallel launch: the overhead decode_step removes).
"""
import argparse
import collections
import statistics
import time

import numpy as np

import minilm
from minilm import model as M
from minilm import quant


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pos", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()

    def setup():
        lm = minilm.load(a.model, quant=a.quant, n_ctx=a.pos + 2 * a.steps + 16, threads=a.threads)
        lm.net.prefill(list(np.random.default_rng(0).integers(3, min(30000, lm.config.vocab_size), a.pos)))
        for _ in range(4):
            lm.net.decode(5)
        return lm.net

    net = setup()
    fused = net._fused is not None

    def run():
        ts = []
        for _ in range(a.steps):
            t = time.perf_counter()
            net.decode(5)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3
    print(f"decode ms/token (median of {a.steps}){' with decode_step' if fused else ''}: {run():.3f}")
    M.FUSED_DECODE = False
    net = setup()
    print(f"decode ms/token through the per-kernel forward: {run():.3f}")

    acc = collections.defaultdict(list)

    def timed(key, f):
        def g(*args, **kw):
            t = time.perf_counter()
            r = f(*args, **kw)
            acc[key(args)].append(time.perf_counter() - t)
            return r
        return g
    quant.Linear.__call__ = timed(lambda s: f"matmul {s[0].fmt} {s[0].N}x{s[0].K}", quant.Linear.__call__)
    M.Transformer._attention = timed(lambda s: "attention (rope, cache, attend)", M.Transformer._attention)
    M.Transformer._add_norm = timed(lambda s: "add + norm", M.Transformer._add_norm)
    M.Transformer._norm = timed(lambda s: "norm", M.Transformer._norm)
    M.silu_mul_row = timed(lambda s: "silu * up", M.silu_mul_row)
    print(f"... with timers: {run():.3f}\n")
    total = 0.0
    print(f"{'call':40s} {'calls/token':>11s} {'ms/token':>9s} {'us/call':>9s}")
    for k, v in sorted(acc.items(), key=lambda kv: -sum(kv[1])):
        ms = sum(v) / a.steps * 1e3
        total += ms
        print(f"{k:40s} {len(v) / a.steps:11.1f} {ms:9.3f} {statistics.median(v) * 1e6:9.1f}")
    print(f"{'sum':40s} {'':11s} {total:9.3f}")


if __name__ == "__main__":
    main()
