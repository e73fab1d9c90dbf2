"""The `minilm` command: generate here; the other subcommands live with their features
(cli_chat: chat, serve; cli_quant: quantize, info; cli_bench: bench; cli_export: export).

Every subcommand module is imported explicitly: a broken one fails loudly at start-up. They
import their optional dependencies (fastapi, matplotlib, gguf, ...) only when their command
runs, and say which extra to install when one is missing."""
from __future__ import annotations

import argparse
import sys

from . import cli_bench, cli_chat, cli_export, cli_quant
from .cli_common import DEFAULT_MODEL, add_model_args, load_model

__all__ = ["DEFAULT_MODEL", "add_model_args", "load_model", "build_parser", "main"]


def cmd_generate(args) -> int:
    model = load_model(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty,
              seed=args.seed, stop=args.stop or None, speculative=not args.no_speculative)
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
    cli_chat.add_speculative_arg(g)
    g.set_defaults(func=cmd_generate)

    for m in (cli_chat, cli_quant, cli_bench, cli_export):     # subcommands that live with their features
        m.add_subcommands(sub)
    return ap


def main(argv=None) -> int:
    from .errors import MinilmError

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
