"""Prompt-lookup speculative decoding: decode tok/s with and without it, and the verify pass cost.

    python benchmarks/bench_speculative.py                      # the shared proxies, f32 and int4
    python benchmarks/bench_speculative.py --verify-cost /tmp/ckpt/smollm2-135m /tmp/ckpt/tinyllama-1.1b

Part 1 (trained proxies in ../shared/models): greedy decoding of a grounded prompt (a passage of
a public-domain text, then its first 16 tokens again: the continuation can copy the passage)
and of a free one (those 16 tokens alone), with and without speculation, interleaved in every
round (minilm.bench.timing.speculation); medians, the acceptance rate, and a check that both
produced the same tokens.

Part 2 (--verify-cost, random-weight checkpoints of real shapes, int4: random weights give no
natural acceptance): the time of one verify pass of M = k + 1 tokens against one decode step,
interleaved, medians of --rounds; a draft of k tokens pays when more than (pass / decode - 1)
of them are accepted on average.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import minilm
from minilm.bench.timing import speculation

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
PROXIES = ["proxy-llama256-shakespeare", "proxy-qwen3-shakespeare", "proxy-gemma3-shakespeare",
           "proxy-gpt2-shakespeare", "proxy-neox-shakespeare", "proxy-lfm2-shakespeare"]


def prompts(m, text: str, n_passage: int) -> dict:
    try:
        ids = m.tokenizer.encode(text)[:n_passage]
    except ValueError:          # a random-weight checkpoint whose tokenizer outgrows its vocabulary
        ids = [int(i) for i in np.random.default_rng(0).integers(3, m.config.vocab_size, n_passage)]
    return {"grounded": ids + ids[:16], "free": ids[:16]}


def same_tokens(m, ids, n) -> bool:
    a = m.generate_ids(ids, max_new_tokens=n, ignore_eos=True, speculative=False)
    return a == m.generate_ids(ids, max_new_tokens=n, ignore_eos=True)


def part1(args) -> None:
    text = (SHARED / "texts" / args.text).read_text()[args.offset:args.offset + 4000]
    print("| model | quant | grounded plain tok/s | grounded spec tok/s | x | accept % | CPU ms/token plain / spec | "
          "free plain | free spec | x | CPU ms/token plain / spec | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for q in args.quant.split(","):
            m = minilm.load(SHARED / "models" / name, quant=None if q == "f32" else q, n_ctx=256)
            p = prompts(m, text, args.passage)
            m.generate_ids(p["free"], max_new_tokens=4)                       # compile
            r = speculation(m, p, args.new_tokens, args.rounds)
            ok = all(same_tokens(m, ids, args.new_tokens) for ids in p.values())
            print(f"| {name} | {q} | {r['plain_grounded_tok_s']:.0f} | {r['spec_grounded_tok_s']:.0f} | "
                  f"{r['spec_x_grounded']:.2f} | {r['spec_grounded_accept_pct']:.0f} | "
                  f"{r['plain_grounded_cpu_ms']:.3f} / {r['spec_grounded_cpu_ms']:.3f} | {r['plain_free_tok_s']:.0f} | "
                  f"{r['spec_free_tok_s']:.0f} | {r['spec_x_free']:.3f} | "
                  f"{r['plain_free_cpu_ms']:.3f} / {r['spec_free_cpu_ms']:.3f} | {ok} |", flush=True)


def part2(args) -> None:
    ks = [int(k) for k in args.ks.split(",")]
    print("| checkpoint | quant | decode ms | " + " | ".join(f"M={k + 1} pass / decode" for k in ks) + " |")
    print("|---|---|---|" + "---|" * len(ks))
    for folder in args.verify_cost:
        m = minilm.load(folder, quant=args.verify_quant, n_ctx=512)
        net = m.net
        ctx = list(range(100, 100 + args.context))
        times = {k: [] for k in [0, *ks]}
        with net.busy:
            for r in range(args.rounds + 1):                                  # round 0: warm-up
                for k in [0, *ks]:
                    net.cache.reset()
                    net.prefill(ctx)
                    t = time.perf_counter()
                    for _ in range(args.reps):
                        if k == 0:
                            net.decode(7)
                        else:
                            net.decode_rows(list(range(7, 8 + k)))
                        net.cache.truncate(len(ctx))
                    if r:
                        times[k].append((time.perf_counter() - t) / args.reps)
        dec = statistics.median(times[0])
        cells = [f"{statistics.median(times[k]) / dec:.2f} ({min(times[k]) / dec:.2f}-{max(times[k]) / dec:.2f})"
                 for k in ks]
        print(f"| {Path(folder).name} | {args.verify_quant} | {1000 * dec:.1f} | " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=PROXIES)
    ap.add_argument("--quant", default="f32,int4")
    ap.add_argument("--text", default="alice_in_wonderland_pg11.txt")
    ap.add_argument("--offset", type=int, default=20000)
    ap.add_argument("--passage", type=int, default=120)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--verify-cost", nargs="*", default=None, metavar="CHECKPOINT")
    ap.add_argument("--verify-quant", default="int4")
    ap.add_argument("--ks", default="1,2,4,8,12")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, numpy {np.__version__}, "
          f"minilm {minilm.__version__}", file=sys.stderr)
    if args.verify_cost is not None:
        part2(args)
    else:
        part1(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
