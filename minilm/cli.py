"""The `minilm` command: generate (and the subcommands other modules register)."""
from __future__ import annotations

import argparse
import sys

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"local model folder or Hugging Face hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--quant", default=None, help="weight format to run in (default: as stored / f32)")
    p.add_argument("--ctx", type=int, default=None, help="context length (KV cache size)")
    p.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")


def load_model(args):
    import minilm
    return minilm.load(args.model, quant=args.quant, n_ctx=args.ctx, threads=args.threads)


def cmd_generate(args) -> int:
    model = load_model(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty,
              seed=args.seed, stop=args.stop or None)
    if args.stream:
        for piece in model.generate(args.prompt, stream=True, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(model.generate(args.prompt, **kw))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minilm", description="Run small language models on the CPU.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt")
    add_model_args(g)
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("-n", "--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--stream", action="store_true", help="print tokens as they come")
    g.set_defaults(func=cmd_generate)

    # Subcommands that live with their features.
    for mod in ("minilm.cli_chat", "minilm.cli_quant", "minilm.cli_bench", "minilm.cli_export"):
        try:
            m = __import__(mod, fromlist=["add_subcommands"])
        except ImportError:
            continue
        m.add_subcommands(sub)
    return ap


def main(argv=None) -> int:
    from minilm.errors import MinilmError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (MinilmError, ValueError) as e:
        print(f"minilm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
