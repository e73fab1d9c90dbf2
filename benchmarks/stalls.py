"""Decode stalls: over R runs, the slowest decode run against the median (issue 11: >= 0.8x), on
the machine as it is and beside one other busy process, for minilm and for llama.cpp's own
`llama-bench` (its -r runs, per-run figures from its JSON) as the reference.

    python benchmarks/stalls.py -m MODEL [--quant int4] [--gguf FILE.gguf] [--runs 5] \\
        [--new 64] [--prompt 128] [--busy 0,1] [--threads 2] [--json out.json]

minilm: one fresh process per setting (load, warm up, then R runs of a --prompt-token prefill
from an empty cache and --new decode steps; a run's figure is its decode tok/s). llama.cpp:
`llama-bench -p 0 -n NEW -d PROMPT -r R` (decode of NEW tokens after a PROMPT-token context;
built by benchmarks/build_llama_bench.sh, or LLAMA_BENCH=path). --busy 1 starts `python -c
"while 1: pass"` (nice 0) beside the measured process, as a user's other work would be, and
stops it afterwards. The table gives per setting and engine the median, the slowest and the
fastest run and slowest / median; the machine's load average is printed, since other work on
a shared machine is a busy process this script did not start.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.ab_engine import run_child  # noqa: E402


def _llama_bench() -> Path | None:
    p = os.environ.get("LLAMA_BENCH")
    if p:
        return Path(p)
    for c in sorted(Path.home().glob(".cache/minilm/llama.cpp-*/build/bin/llama-bench")):
        return c
    return None


def minilm_runs(python, model, quant, threads, prompt, new, runs) -> list:
    """Decode tok/s of each of `runs` runs in one fresh process (benchmarks/ab_engine.py's child:
    load, warm up, then per run a `prompt`-token prefill from an empty cache and `new` decode steps)."""
    out = run_child(python, model, quant, threads, prompt, new, runs)
    if "error" in out:
        raise SystemExit(f"stalls: the minilm process failed: {out['error']}")
    return out["decode_runs"]


def llama_runs(bench, gguf, threads, prompt, new, runs) -> list:
    cmd = [str(bench), "-m", gguf, "-p", "0", "-n", str(new), "-d", str(prompt), "-r", str(runs), "-t", str(threads),
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"stalls: llama-bench failed (rc {out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    rows = json.loads(out.stdout)
    return [float(x) for x in rows[0]["samples_ts"]]


class Busy:
    """`python -c "while 1: pass"` at nice 0 while the block runs (n = 0: nothing)."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def summary(runs: list) -> dict:
    med = statistics.median(runs)
    return {"runs": runs, "median": med, "min": min(runs), "max": max(runs), "slowest_ratio": min(runs) / med}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True, help="minilm model (folder, hub id or .gguf)")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--gguf", default=None, help="the same weights as a GGUF for llama-bench (omit: minilm only)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--busy", default="0,1", help="busy processes beside the measured one, per setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", default=sys.executable, help="python of the minilm tree")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.runs < 2:
        ap.error("--runs must be at least 2 (a slowest run against the median)")
    bench = _llama_bench() if args.gguf else None
    if args.gguf and (bench is None or not bench.exists()):
        raise SystemExit("stalls: no llama-bench (benchmarks/build_llama_bench.sh, or LLAMA_BENCH=path)")
    res = []
    for nb in (int(b) for b in args.busy.split(",")):
        with Busy(nb):
            la = os.getloadavg()[0]
            row = {"busy": nb, "load": la,
                   "minilm": summary(minilm_runs(args.python, args.model, args.quant, args.threads, args.prompt,
                                                 args.new, args.runs))}
            if bench is not None:
                row["llama.cpp"] = summary(llama_runs(bench, args.gguf, args.threads, args.prompt, args.new,
                                                      args.runs))
        res.append(row)
        for eng in ("minilm", "llama.cpp"):
            if eng in row:
                s = row[eng]
                print(f"busy {nb} (load {la:.1f}) {eng:9s} decode tok/s median {s['median']:.1f} slowest "
                      f"{s['min']:.1f} fastest {s['max']:.1f} slowest/median {s['slowest_ratio']:.2f}  runs "
                      + " ".join(f"{x:.1f}" for x in s["runs"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "quant": args.quant, "gguf": args.gguf, "results": res,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, f, indent=1)


if __name__ == "__main__":
    main()
