"""Decode speed with each KV cache storage type (f32, f16, q8_0) at a long cached context, side by
side in one process, interleaved rounds (medians with min-max).

    python benchmarks/bench_kv.py --model /tmp/ckpt/smollm2-135m --quant int4 --ctx 1024,2048 --rounds 5

Each round and context, for each type in turn: the cache is set to `ctx` filled positions (their
content does not change the work: every decode step reads all of them) and `--new` decode steps
are timed. Also prints the KV bytes per position of each type.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import minilm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", default=None)
    ap.add_argument("--kv", default="f32,f16,q8_0")
    ap.add_argument("--ctx", default="1024,2048", help="comma-separated cached positions")
    ap.add_argument("--new", type=int, default=32, help="timed decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args()
    kvs = a.kv.split(",")
    ctxs = [int(c) for c in a.ctx.split(",")]
    n_ctx = max(ctxs) + a.new + 1
    models = {kv: minilm.load(a.model, quant=a.quant, n_ctx=n_ctx, kv_quant=kv, threads=a.threads) for kv in kvs}
    rng = np.random.default_rng(0)
    V = next(iter(models.values())).config.vocab_size
    for kv, m in models.items():                              # fill the whole cache once (pages in)
        m.net.cache.k[...] = 0
        m.net.cache.v[...] = 0
        m.net.cache.reset()
        m.net.prefill(rng.integers(3, V, 4))
    res = {(kv, c): [] for kv in kvs for c in ctxs}
    for _ in range(a.rounds):
        for c in ctxs:
            for kv, m in models.items():
                cache = m.net.cache
                cache.truncate(0)
                cache.pos, cache.tokens = c, [0] * c              # c filled positions
                toks = rng.integers(3, V, a.new)
                m.net.decode(int(toks[0]))                        # warm
                t = time.perf_counter()
                for tok in toks[1:]:
                    m.net.decode(int(tok))
                res[(kv, c)].append((a.new - 1) / (time.perf_counter() - t))
    print(f"{'KV':6} {'bytes/pos':>9} " + " ".join(f"{'decode tok/s @' + str(c):>26}" for c in ctxs))
    for kv, m in models.items():
        per = m.net.cache.nbytes / m.n_ctx
        cells = []
        for c in ctxs:
            v = res[(kv, c)]
            cells.append(f"{statistics.median(v):8.1f} ({min(v):.1f}-{max(v):.1f})".rjust(26))
        print(f"{kv:6} {per:9.0f} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
