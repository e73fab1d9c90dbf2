"""Batched serving benchmark: `minilm serve` under 1, 2, 4, 8 concurrent clients.

    python benchmarks/bench_serving.py -m MODEL [--parallel 8] [--rounds 3] [--max-tokens 64]
                                       [--requests 2] [--out results.json] [--baseline CHECKOUT]
                                       [--no-speculative]

Starts `python -m minilm.server -m MODEL --parallel N` on a free loopback port and, per round
(rounds interleave every configuration, so machine noise hits all alike):
- for C in 1, 2, 4, 8 clients, with the same prompt for every client and with different prompts:
  each client sends `--requests` streamed greedy completions of `--max-tokens` tokens (EOS
  ignored through a long budget on a random-weight checkpoint; the counts come from `usage`)
  one after another; reported: aggregate generated tokens/s (all clients' completion tokens /
  wall time), per-request latency and time to first token (TTFT);
- TTFT of a new request idle vs. while 3 other requests are decoding, with a prompt the server
  has cached (a returning prompt: one row to run) and with a new one (its whole prompt).
Prints medians over the rounds with min-max, and the issue's two ratios (4 clients vs 1
aggregate tok/s; TTFT with 3 decoding / idle). A lone greedy request speculates (prompt lookup),
which raises the 1-client figure (on random weights every draft is accepted); --no-speculative
starts the servers with speculation off, for the ratio of batching alone. Figures depend on the
machine and its load: say both when quoting them (benchmarks/README.md). On Linux the report
also gives the server threads' time on a CPU and waiting for one (run queue, from
/proc/PID/task/*/schedstat): a wait near or above the time on a CPU means other processes set
the pace, not the server.

--baseline CHECKOUT also starts the server of another checkout of minilm (e.g. a worktree of
main) beside this one and runs every configuration on both, one after the other in each round,
so before/after figures share the machine's noise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time there was a little robot who lived in a big city and",
           "The history of the printing press begins in the fifteenth century, when",
           "Write a short poem about the sea, the wind and the old lighthouse keeper:",
           "In mathematics, a prime number is a natural number greater than one that",
           "The recipe calls for two cups of flour, one egg, a pinch of salt and",
           "Dear diary, today I finally finished the long project that I started",
           "The train left the station at seven o'clock in the morning, heading",
           "Scientists have discovered a new species of frog in the rainforest that"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, parallel: int, threads: int | None, repo: Path = REPO, speculative: bool = True):
    """The server of the minilm checkout `repo` (python -m from there imports its package)."""
    port = free_port()
    cmd = [sys.executable, "-m", "minilm.server", "-m", model, "--port", str(port), "--parallel", str(parallel),
           "--log-level", "warning"] + (["--threads", str(threads)] if threads else []) + \
        ([] if speculative else ["--no-speculative"])
    log = tempfile.TemporaryFile("w+")
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server exited: {log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("server did not start in 600 s")
        time.sleep(0.2)


def sched_seconds(pid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of all live threads of process
    pid, from /proc/PID/task/*/schedstat (Linux); None where that is not readable."""
    run = wait = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as fh:
                f = fh.read().split()
        except OSError:                                   # the thread ended meanwhile
            continue
        run += int(f[0]) / 1e9
        wait += int(f[1]) / 1e9
    return run, wait


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    """A streamed greedy completion: {"ttft", "latency", "tokens"} (seconds, completion tokens)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            elif ttft is None and d["choices"] and d["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
    lat = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else lat, "latency": lat, "tokens": tokens}


def clients_run(url: str, n: int, same: bool, requests: int, max_tokens: int) -> dict:
    """n clients, each `requests` completions in a row: aggregate tok/s, latencies, TTFTs."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(c):
        for j in range(requests):
            r = one_request(url, PROMPTS[0 if same else (c + j) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(c,)) for c in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return {"tok_s": sum(r["tokens"] for r in results) / wall,
            "latency": statistics.median(r["latency"] for r in results),
            "ttft": statistics.median(r["ttft"] for r in results)}


def ttft_busy(url: str, max_tokens: int, prompt: str = PROMPTS[0]) -> float:
    """TTFT of a new request while 3 others decode (they run long enough to outlast it)."""
    done = []
    bg = [threading.Thread(target=lambda i=i: done.append(one_request(url, PROMPTS[i + 1], max_tokens * 4)))
          for i in range(3)]
    for t in bg:
        t.start()
    deadline = time.time() + 60
    while httpx.get(url + "/health", timeout=10).json().get("active", 0) < 3 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)                                   # the three are decoding now
    r = one_request(url, prompt, 1)
    for t in bg:
        t.join()
    return r["ttft"]


def fmt(xs, unit="", scale=1.0, nd=1):
    xs = [x * scale for x in xs]
    return f"{statistics.median(xs):.{nd}f}{unit} ({min(xs):.{nd}f}-{max(xs):.{nd}f})"


def report(label: str, raw: dict, ttft: dict, counts) -> None:
    print(f"\n{label}")
    print("| clients | prompts | aggregate tok/s | per-request latency s | TTFT ms |")
    print("|---|---|---|---|---|")
    for c in counts:
        for same in (True, False):
            rs = raw[f"{c}{'s' if same else 'd'}"]
            print(f"| {c} | {'same' if same else 'different'} | {fmt([r['tok_s'] for r in rs])} | "
                  f"{fmt([r['latency'] for r in rs], nd=2)} | {fmt([r['ttft'] for r in rs], scale=1000, nd=0)} |")
    for kind in ("cached", "new"):
        idle, busy = ttft[kind + " idle"], ttft[kind + " busy"]
        print(f"TTFT ({kind} prompt) idle {fmt(idle, ' ms', 1000, 0)}; with 3 decoding {fmt(busy, ' ms', 1000, 0)}; "
              f"ratio (medians) {statistics.median(busy) / statistics.median(idle):.2f}")
    if 1 in counts and 4 in counts:
        for same in (True, False):
            k = "s" if same else "d"
            r1 = statistics.median(r["tok_s"] for r in raw[f"1{k}"])
            r4 = statistics.median(r["tok_s"] for r in raw[f"4{k}"])
            print(f"4 clients / 1 client aggregate tok/s ({'same' if same else 'different'} prompts): {r4 / r1:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client per configuration")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--ttft-rounds", type=int, default=1, help="TTFT measurements of each kind per round")
    ap.add_argument("--baseline", default=None, help="another minilm checkout to run beside this one")
    ap.add_argument("--out", default=None, help="write the raw figures as JSON here")
    ap.add_argument("--no-speculative", action="store_true",
                    help="start the servers with --no-speculative (every checkout must have the option)")
    a = ap.parse_args(argv)
    counts = [int(c) for c in a.clients.split(",") if c]
    repos = {"this checkout": REPO}
    if a.baseline:
        base = Path(a.baseline).resolve()
        if not (base / "minilm" / "server.py").is_file():
            raise SystemExit(f"--baseline {a.baseline}: not a minilm checkout (no minilm/server.py)")
        repos = {f"this checkout ({REPO})": REPO, f"baseline ({base})": base}
    servers = {}
    try:
        for label, repo in repos.items():
            servers[label] = start_server(a.model, a.parallel, a.threads, repo, not a.no_speculative)
            one_request(servers[label][1], PROMPTS[0], 8)              # warm up (compiles on a cold cache)
        sched0 = {lb: sched_seconds(proc.pid) for lb, (proc, _, _) in servers.items()}
        raw = {lb: {f"{c}{'s' if same else 'd'}": [] for c in counts for same in (True, False)} for lb in servers}
        ttft = {lb: {k: [] for k in ("cached idle", "cached busy", "new idle", "new busy")} for lb in servers}
        n = 0
        for rnd in range(a.rounds):
            for c in counts:
                for same in (True, False):
                    for lb, (_, url, _) in servers.items():
                        raw[lb][f"{c}{'s' if same else 'd'}"].append(clients_run(url, c, same, a.requests, a.max_tokens))
            for _ in range(a.ttft_rounds):
                for lb, (_, url, _) in servers.items():
                    t = ttft[lb]
                    t["cached idle"].append(one_request(url, PROMPTS[0], 1)["ttft"])
                    t["cached busy"].append(ttft_busy(url, a.max_tokens))
                    n += 1                                             # prompts no server has seen
                    t["new idle"].append(one_request(url, f"Take {n}, idle. " + PROMPTS[0], 1)["ttft"])
                    t["new busy"].append(ttft_busy(url, a.max_tokens, f"Take {n}, busy. " + PROMPTS[0]))
            print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr, flush=True)
        sched1 = {lb: sched_seconds(proc.pid) for lb, (proc, _, _) in servers.items()}
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    load = os.getloadavg()
    print(f"model {a.model}, --parallel {a.parallel}, {a.rounds} rounds, {a.requests} x {a.max_tokens} tokens "
          f"per client, speculation {'off' if a.no_speculative else 'on'}; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for lb in servers:
        report(lb, raw[lb], ttft[lb], counts)
        s0, s1 = sched0[lb], sched1[lb]
        if s0 is not None and s1 is not None:
            run, wait = s1[0] - s0[0], s1[1] - s0[1]
            print(f"server threads (those alive at the end): {run:.1f} s on a CPU, {wait:.1f} s waiting for one")
    if a.out:
        Path(a.out).write_text(json.dumps({"raw": raw, "ttft": ttft, "load": load, "args": vars(a),
                                               "sched": {"start": sched0, "end": sched1}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
