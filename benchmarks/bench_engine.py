"""minilm speed of pre-quantized folders: a thin wrapper over `minilm bench --from-saved`.

    python benchmarks/bench_engine.py --model /tmp/ckpt/smollm2-135m --threads 2 [--quant f32,int8,int4]
        [--prompt-tokens 128 --new-tokens 64 --runs 5] [--transformers] [--llama-cpp] [--json FILE]

Each quant level is first written as a pre-quantized folder (model.save in its own process), then
measured in its own process loading that folder, as a deployed model is (so peak RSS and start-up
time are that level's alone). No quality pass. `LEVEL@EMBED` sets the embedding / lm-head format,
e.g. int8@int8 = llama.cpp's Q8_0 layout. Everything else (the timing loop, GB/s against the read
bandwidth, the peers) is `minilm bench`'s; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", default="f32", help="comma-separated levels (f32,int8,int4,int8@int8,...)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--transformers", action="store_true", help="also run the transformers fp32 peer")
    ap.add_argument("--llama-cpp", action="store_true", help="also run the llama.cpp peer (llama-bench)")
    ap.add_argument("--json", default=None, help="copy results.json here")
    ap.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    args = ap.parse_args(argv)

    from minilm.cli import main as minilm_main
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-engine-"))
    peers = [p for p, on in (("llama.cpp", args.llama_cpp), ("transformers", args.transformers)) if on]
    rc = minilm_main(["bench", "-m", args.model, "--quant", args.quant, "-t", str(args.threads),
                      "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                      "--runs", str(args.runs), "--quality-tokens", "0", "--from-saved",
                      "--peers", ",".join(peers), "--out", str(out)])
    if args.json and (out / "results.json").exists():
        Path(args.json).write_text(json.dumps(json.loads((out / "results.json").read_text()), indent=1))
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
