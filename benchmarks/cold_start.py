"""Where a first start goes: import, load, tokenize, first token, and per compiled function.

    python benchmarks/cold_start.py -m MODEL [--quant int4] [--rounds 3] [--profile]

Each round runs two fresh processes on the model: one with an empty Numba cache (a new
NUMBA_CACHE_DIR; cold: every kernel compiles) and one on the cache the cold one wrote (warm). A
process times its phases itself (time.perf_counter; CPU seconds from os.times beside them, since
a loaded machine stretches wall time but not CPU time): `import minilm`, `minilm.load`, encode the
prompt, the first generated token (prefill + its sampling) and the decode of the next tokens. With --profile
the cold process also records Numba's compile events (numba.core.event): per dispatcher the time
of its own compilation (typing + lowering + LLVM, its callees' compilations excluded), the part
of it spent holding the LLVM lock (LLVM optimisation and code generation), and per compiler pass
the time summed over all dispatchers.

"process" is the child process as its parent sees it: wall time, and CPU seconds of it and of
the processes it reaped (on a first run, the compile helper of kernels/compile_ahead.py, which
compiles part of the kernels beside it), the figure `/usr/bin/time` gives.

Prints a table and writes JSON (--json). Timings on a shared machine are noisy: compare variants
in one run, interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter(); c0 = sum(os.times()[:2])
prof = {}
_clk = time.thread_time if os.environ.get("COLD_PROFILE") == "1" else time.perf_counter
if os.environ.get("COLD_PROFILE") == "1":
    from numba.core import event as ev
    stack, per, passes = [], {}, {}

    class _L(ev.Listener):
        def on_start(self, e):
            if e.kind == "numba:compile":
                d = e.data["dispatcher"]
                name = getattr(d, "py_func", d).__module__ + "." + getattr(d, "py_func", d).__qualname__
                stack.append([name, _clk(), 0.0, 0.0])   # name, start, children, llvm
            elif e.kind == "numba:llvm_lock":
                self.l0 = _clk()
            elif e.kind == "numba:run_pass":
                stack.append(["pass:" + e.data["name"], _clk(), 0.0, 0.0])

        def on_end(self, e):
            if e.kind == "numba:llvm_lock":
                comp = [s for s in stack if not s[0].startswith("pass:")]
                if comp:
                    comp[-1][3] += _clk() - self.l0
                return
            if e.kind not in ("numba:compile", "numba:run_pass"):
                return
            name, s0, kids, llvm = stack.pop()
            dt = _clk() - s0
            if name.startswith("pass:"):
                passes[name[5:]] = passes.get(name[5:], 0.0) + dt - kids
                return
            r = per.setdefault(name, [0, 0.0, 0.0])
            r[0] += 1
            r[1] += dt - kids
            r[2] += llvm
            for s in reversed(stack):                # a nested compile is the enclosing one's child
                s[2] += dt
                if not s[0].startswith("pass:"):
                    break
    _lis = _L()
    for k in ("numba:compile", "numba:llvm_lock", "numba:run_pass"):
        ev.register(k, _lis)
    prof = {"per": per, "passes": passes}
    from numba.core import codegen as _cg
    libs = {}
    def _wrap(meth, idx):
        orig = getattr(_cg.JITCodeLibrary, meth)
        def f(self, *a, **k):
            t = time.thread_time()
            try:
                return orig(self, *a, **k)
            finally:
                r = libs.setdefault(self.name.split(" at 0x")[0], [0.0, 0.0, 0.0])
                r[idx] += time.thread_time() - t
        setattr(_cg.JITCodeLibrary, meth, f)
    _wrap("_optimize_functions", 0)
    _wrap("_optimize_final_module", 1)
    _wrap("_finalize_specific", 2)
    prof["libs"] = libs
ph = {}
def mark(name, t, c):
    t1 = time.perf_counter(); c1 = sum(os.times()[:2])
    ph[name] = (t1 - t, c1 - c)
    return t1, c1
import minilm
t, c = mark("import", t0, c0)
m = minilm.load(sys.argv[1], quant=(sys.argv[2] or None))
t, c = mark("load", t, c)
ids = m.tokenizer.encode("Once upon a time, in a small village,")
t, c = mark("tokenize", t, c)
it = m.generate(ids, max_new_tokens=int(sys.argv[3]), stream=True, ignore_eos=True, speculative=False)
next(it)
t, c = mark("first_token", t, c)
for _ in it:
    pass
t, c = mark("decode", t, c)
ph["decode_tok_s"] = ((int(sys.argv[3]) - 1) / ph["decode"][0], 0.0)
ph["total_to_first"] = (sum(ph[k][0] for k in ("import", "load", "tokenize", "first_token")),
                        sum(ph[k][1] for k in ("import", "load", "tokenize", "first_token")))
try:                                 # reap a compile helper still running, so that its CPU time
    while True:                      # counts in the process figure (RUSAGE_CHILDREN)
        os.wait()
except ChildProcessError:
    pass
print("COLDJSON" + json.dumps({"phases": ph, "prof": prof}))
"""


def run_child(model, quant, cache_dir, profile, extra_env=None, tokens=16):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, COLD_PROFILE="1" if profile else "0")
    env.update(extra_env or {})
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, "-c", _CHILD, model, quant or "", str(tokens)], env=env, capture_output=True,
                       text=True, cwd=tempfile.gettempdir())   # not the repo: import the installed minilm
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)      # the process and what it reaped (a compile helper)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("COLDJSON")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"cold_start: the child process failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    out = json.loads(line[8:])
    out["process_wall"] = wall
    out["process_cpu"] = cpu
    out["stderr"] = [ln for ln in p.stderr.splitlines() if ln.startswith("minilm:")]
    return out


def _fmt_phases(r):
    ph = r["phases"]
    return "  ".join(f"{k} {ph[k][0]:.2f}s ({ph[k][1]:.2f} cpu)" for k in
                     ("import", "load", "tokenize", "first_token", "decode", "total_to_first")) + \
        f"  decode {ph['decode_tok_s'][0]:.1f} tok/s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--quant", default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="per-dispatcher compile times (cold runs)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated (decode tok/s over all but the first)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rounds = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="minilm-numba-") as cache:
            cold = run_child(args.model, args.quant, cache, args.profile, tokens=args.tokens)
            warm = run_child(args.model, args.quant, cache, False, tokens=args.tokens)
        print(f"round {i + 1} cold: {_fmt_phases(cold)}  process {cold['process_wall']:.2f}s ({cold['process_cpu']:.2f} cpu)", flush=True)
        print(f"round {i + 1} warm: {_fmt_phases(warm)}  process {warm['process_wall']:.2f}s ({warm['process_cpu']:.2f} cpu)", flush=True)
        for ln in cold["stderr"]:
            print(f"  cold stderr: {ln}")
        if args.profile:
            per = cold["prof"]["per"]
            tot = sum(v[1] for v in per.values())
            llvm = sum(v[2] for v in per.values())
            print(f"  compiles: {sum(v[0] for v in per.values())} in {tot:.2f}s self time, "
                  f"{llvm:.2f}s of it holding the LLVM lock")
            for name, (n, t, lv) in sorted(per.items(), key=lambda kv: -kv[1][1])[:args.top]:
                print(f"    {t:7.2f}s  llvm {lv:6.2f}s  x{n:<3d} {name}")
            libs = cold["prof"]["libs"]
            tl = [sum(v[i] for v in libs.values()) for i in range(3)]
            print(f"  LLVM per code library (thread CPU s): function passes {tl[0]:.2f}, module passes {tl[1]:.2f},"
                  f" machine code {tl[2]:.2f}")
            for name, v in sorted(libs.items(), key=lambda kv: -sum(kv[1]))[:12]:
                print(f"    {v[0]:6.2f} {v[1]:6.2f} {v[2]:6.2f}  {name[:90]}")
            passes = cold["prof"]["passes"]
            print("  passes (self time, all dispatchers):")
            for name, t in sorted(passes.items(), key=lambda kv: -kv[1])[:8]:
                print(f"    {t:7.2f}s  {name}")
        rounds.append({"cold": cold, "warm": warm})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "quant": args.quant, "rounds": rounds,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "loadavg": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
