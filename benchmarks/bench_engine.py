"""minilm speed: prefill and decode tokens/s, time to first token, peak RSS, GB/s vs the ceiling.

    python benchmarks/bench_engine.py --model /tmp/ckpt/smollm2-135m --threads 2 [--quant f32,int8,int4]
        [--prompt-tokens 128 --new-tokens 64 --runs 3] [--transformers] [--json FILE]

Each quant level is first written as a pre-quantized folder (`minilm quantize`), then measured in
its own process loading that folder, as a deployed model is (so peak RSS and start-up time are
that level's alone, and the second process finds the Numba cache warm); the machine's read
bandwidth is measured once in the parent. The bandwidth ceiling for decode is
(weight bytes read per token) / (measured bandwidth): every matrix of every layer plus the lm head.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from minilm.bench import decode_bytes_per_token, measure_bandwidth, peak_rss_mb  # noqa: E402


def one(args) -> dict:
    """Measure one quant level in this process; print a JSON line."""
    import numpy as np
    t0 = time.perf_counter()
    import minilm
    model = minilm.load(args.model, n_ctx=args.prompt_tokens + args.new_tokens + 8, threads=args.threads)
    load_s = time.perf_counter() - t0
    V = model.config.vocab_size
    ids = [int(i) for i in np.random.default_rng(0).integers(3, min(V, 30000), args.prompt_tokens)]
    net = model.net
    # first token ever in this process: includes Numba compile or cache load
    model.reset()
    t = time.perf_counter()
    net.prefill(ids)
    ttft_first = time.perf_counter() - t + load_s
    prefill, decode = [], []
    for _ in range(args.runs):
        model.reset()
        t = time.perf_counter()
        logits = net.prefill(ids)
        prefill.append(args.prompt_tokens / (time.perf_counter() - t))
        tok = int(np.argmax(logits))
        t = time.perf_counter()
        for _ in range(args.new_tokens):
            tok = int(np.argmax(net.decode(tok)))
        decode.append(args.new_tokens / (time.perf_counter() - t))
    bpt = decode_bytes_per_token(model)
    dec = float(np.median(decode))
    return {"quant": args.quant, "load_s": load_s, "start_to_first_token_s": ttft_first,
            "prefill_tok_s": float(np.median(prefill)), "prefill_min": min(prefill), "prefill_max": max(prefill),
            "decode_tok_s": dec, "decode_min": min(decode), "decode_max": max(decode),
            "bytes_per_token": bpt, "decode_gb_s": bpt * dec / 1e9,
            "weights_mb": sum(getattr(t, "nbytes", 0) for t in model.tensors.values()) / 1e6,
            "kv_cache_mb": net.cache.nbytes / 1e6,
            "peak_rss_mb": peak_rss_mb()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", default="f32", help="comma-separated levels (f32,int8,int4,...); "
                    "LEVEL@EMBED sets the embedding/lm-head format, e.g. int8@int8 = llama.cpp's Q8_0 layout")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--transformers", action="store_true", help="also run the transformers fp32 peer")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(args)))
        return 0

    bw = measure_bandwidth(threads=args.threads, size_mb=512, runs=5)["read_gbs"]
    print(f"read bandwidth, {args.threads} threads: {bw:.1f} GB/s (median)")
    rows = []
    import tempfile
    tmp = tempfile.TemporaryDirectory(prefix="minilm-bench-")
    for q in args.quant.split(","):
        path = args.model
        if q != "f32":
            path = str(Path(tmp.name) / q)
            level, _, emb = q.partition("@")            # "int8@int8": int8 with a Q8_0 embedding/head
            extra = ["--embed-quant", emb] if emb else []
            subprocess.run([sys.executable, "-m", "minilm.cli", "quantize", "-m", args.model, "--quant", level,
                            "-o", path, *extra], check=True, capture_output=True)
        cmd = [sys.executable, __file__, "--one", "--model", path, "--quant", q,
               "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
        if not line:
            print(f"{q}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(line[0][7:])
        r["ceiling_tok_s"] = bw * 1e9 / r["bytes_per_token"]
        r["pct_of_ceiling"] = 100 * r["decode_tok_s"] / r["ceiling_tok_s"]
        rows.append(r)
    peer = None
    if args.transformers:
        pj = Path("/tmp/minilm_bench_tf.json")
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_transformers.py"), "--model", args.model,
                        "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                        "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--json", str(pj)],
                       capture_output=True, text=True)
        if pj.exists():
            peer = json.loads(pj.read_text())
    hdr = f"{'quant':8} {'weights MB':>10} {'prefill tok/s':>14} {'decode tok/s':>13} {'GB/s':>6} {'ceiling tok/s':>14} {'% ceil':>7} {'1st token s':>11} {'peak RSS MB':>11}"
    print(f"\nmodel {args.model}, {args.threads} threads, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"medians of {args.runs} runs")
    print(hdr)
    for r in rows:
        print(f"{r['quant']:8} {r['weights_mb']:10.0f} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
              f"{r['decode_gb_s']:6.1f} {r['ceiling_tok_s']:14.1f} {r['pct_of_ceiling']:6.0f}% "
              f"{r['start_to_first_token_s']:11.2f} {r['peak_rss_mb']:11.0f}")
    if peer:
        print(f"transformers fp32 (torch {peer.get('torch_version')}): prefill {peer.get('prefill_tok_s', 0):.1f} tok/s, "
              f"decode {peer.get('decode_tok_s', 0):.1f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_gb_s": bw, "rows": rows, "transformers": peer}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
