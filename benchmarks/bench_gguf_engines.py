"""minilm trees and llama.cpp's llama-bench on the same GGUF files, interleaved rounds.

    python benchmarks/bench_gguf_engines.py --files tl-Q4_K_M.gguf,tl-Q6_K.gguf \\
        --minilm new=.venv/bin/python,old=/path/to/old/.venv/bin/python --rounds 3 --json out.json

Per round and file, each engine runs once in turn (minilm trees: a fresh process that loads the
GGUF as it is, warms up and times `--reps` passes of a `--prompt`-token prefill from an empty
cache and `--new` decode steps after it, as benchmarks/ab_engine.py; llama.cpp: its own
`llama-bench -p PROMPT -n NEW -t THREADS -r 1` at its defaults, repacked weights on, the build
minilm's bench finds). The table gives medians over rounds with min-max and each minilm engine's
ratio to llama.cpp. llama-bench's tg test decodes from an empty context, minilm's after the
prompt (a longer attention; small next to the matmuls at this length).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.ab_engine import run_child  # noqa: E402
from minilm.bench.engines import find_llama_bench, run_llama_bench  # noqa: E402


def _cell(v):
    return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "failed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", required=True, help="comma-separated GGUF files")
    ap.add_argument("--minilm", default=f"minilm={sys.executable}",
                    help="comma-separated NAME=PYTHON of minilm trees (default: this python)")
    ap.add_argument("--no-llama", action="store_true", help="minilm engines only")
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary (default: as minilm bench finds it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    files = [Path(f) for f in a.files.split(",") if f]
    for f in files:
        if not f.is_file():
            ap.error(f"--files: no file {f}")
    engines = []
    for item in a.minilm.split(","):
        name, sep, py = item.partition("=")
        if not sep or not name or not py:
            ap.error(f"--minilm {item!r}: expected NAME=PYTHON")
        engines.append((name, os.path.abspath(py) if os.sep in py else py))   # children run elsewhere
    build = None
    if not a.no_llama:
        builds = find_llama_bench(a.llama_bench)
        if not builds:
            ap.error("no llama-bench found (benchmarks/build_llama_bench.sh builds it); or pass --no-llama")
        build = builds[0]
        engines.append(("llama.cpp", None))
    res = {f.name: {n: {"prefill": [], "decode": []} for n, _ in engines} for f in files}
    for rnd in range(a.rounds):
        for f in files:
            for name, py in engines:
                if py is None:
                    r = run_llama_bench(build, f, a.prompt, a.new, a.threads, 1, [], 1800)
                    r = ({"prefill": r["fields"]["prefill_tok_s"], "decode": r["fields"]["decode_tok_s"]}
                         if r["ok"] else {"error": r["why"]})
                else:                      # "f32" = no quant= argument: the GGUF's own types
                    r = run_child(py, str(f), "f32", a.threads, a.prompt, a.new, a.reps)
                for k in ("prefill", "decode"):
                    if k in r:
                        res[f.name][name][k].append(r[k])
                print(f"round {rnd + 1} {f.name} {name}: {r} (load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr, flush=True)
    names = [n for n, _ in engines]
    print("| file | " + " | ".join(f"{n} prefill" for n in names) + " | "
          + " | ".join(f"{n} decode" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    for fn, d in res.items():
        cells = [fn]
        for k in ("prefill", "decode"):
            ref = statistics.median(d["llama.cpp"][k]) if build and d["llama.cpp"][k] else None
            for n in names:
                c = _cell(d[n][k])
                if ref and n != "llama.cpp" and d[n][k]:
                    c += f" {statistics.median(d[n][k]) / ref:.2f}x"
                cells.append(c)
        print("| " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"threads": a.threads, "prompt": a.prompt, "new": a.new, "rounds": a.rounds,
                       "llama_bench": build["path"] if build else None, "results": res}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
