"""Two minilm trees side by side: prefill and decode tok/s of the same checkpoint, interleaved
rounds (A, B, A, B, ...) so that both see the same machine. Used for before/after tables.

    python benchmarks/ab_engine.py --a /path/to/old/.venv/bin/python --b python \\
        --model /tmp/ckpt/smollm2-135m --quant f32,int8,int4 --rounds 3 --json ab.json

Each round starts a fresh process per tree (load, warm up, then `--reps` timed passes of a
`--prompt`-token prefill from an empty cache and `--new` decode steps after it) and keeps the
medians; the table shows the median over rounds with the min-max. Only the engine API both
trees share is used (minilm.load, LM.net.prefill / decode / cache).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, numpy as np, minilm
model, quant, threads, P, N, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
m = minilm.load(model, quant=None if quant == "f32" else quant, threads=threads, n_ctx=P + N + 8)
net = m.net
ids = np.random.default_rng(0).integers(3, min(m.config.vocab_size, 30000), P + N).astype(np.int64)
net.cache.reset(); net.prefill(ids[:8]); [net.decode(int(t)) for t in ids[8:12]]   # warm up
pre, dec = [], []
for _ in range(reps):
    net.cache.reset()
    t = time.perf_counter(); net.prefill(ids[:P]); pre.append(P / (time.perf_counter() - t))
    t = time.perf_counter()
    for tok in ids[P:P + N]:
        net.decode(int(tok))
    dec.append(N / (time.perf_counter() - t))
print("RESULT" + json.dumps({"prefill": float(np.median(pre)), "decode": float(np.median(dec)), "decode_runs": dec}))
"""


def run_child(py, model, quant, threads, P, N, reps):
    r = subprocess.run([py, "-c", CHILD, os.path.abspath(model), quant, str(threads), str(P), str(N), str(reps)],
                       capture_output=True, text=True, timeout=3600, cwd=tempfile.gettempdir())  # no ./minilm on the path
    line = [s for s in r.stdout.splitlines() if s.startswith("RESULT")]
    if r.returncode or not line:
        return {"error": r.stderr.strip().splitlines()[-1:] or ["?"]}
    return json.loads(line[-1][6:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="python of tree A (before)")
    ap.add_argument("--b", required=True, help="python of tree B (after)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", default="f32,int8,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = {}
    for q in a.quant.split(","):
        for rnd in range(a.rounds):
            for tag, py in (("A", a.a), ("B", a.b)):
                r = run_child(py, a.model, q, a.threads, a.prompt, a.new, a.reps)
                res.setdefault(q, {}).setdefault(tag, []).append(r)
                print(f"{q} round {rnd + 1} {tag}: {r}", file=sys.stderr, flush=True)
    print("| quant | A prefill tok/s | B prefill tok/s | B/A | A decode tok/s | B decode tok/s | B/A |")
    print("|---|---|---|---|---|---|---|")
    for q, d in res.items():
        cells = [q]
        for key in ("prefill", "decode"):
            meds = []
            for tag in ("A", "B"):
                v = [r[key] for r in d[tag] if key in r]
                if not v:
                    cells.append("failed")
                    meds.append(None)
                    continue
                meds.append(statistics.median(v))
                cells.append(f"{meds[-1]:.1f} ({min(v):.1f}-{max(v):.1f})")
            cells.append(f"{meds[1] / meds[0]:.2f}x" if None not in meds else "")
        print("| " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "threads": a.threads, "prompt": a.prompt, "new": a.new, "rounds": res}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
