"""What every `minilm` subcommand shares: the default model, the model arguments and loading.

Its own module so that cli.py can import the subcommand modules (cli_chat, cli_quant, ...) and they
can use these helpers without importing cli.py back (no import cycle)."""
from __future__ import annotations

import argparse

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1 (a clear usage error otherwise)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: must be a positive integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s}: must be a positive integer")
    return v


def add_model_args(p: argparse.ArgumentParser, quant_help: str = "weight format to run in, e.g. int8, int4 "
                                                                 "(default: as stored / f32)") -> None:
    """-m/--model, --quant, --ctx, --kv-quant, -t/--threads."""
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help="local model folder or Hugging Face hub id (default: %(default)s)")
    p.add_argument("--quant", default=None, help=quant_help)
    p.add_argument("--ctx", type=positive_int, default=None,
                   help="context length (KV cache size; default: the model's maximum, capped by free memory)")
    add_kv_quant_arg(p)
    p.add_argument("-t", "--threads", type=positive_int, default=None, help="kernel threads (default: all cores)")


def add_kv_quant_arg(p: argparse.ArgumentParser) -> None:
    """--kv-quant: the KV cache's storage type (minilm.load's kv_quant)."""
    from .cache import DEFAULT_KV_QUANT, KV_QUANTS
    p.add_argument("--kv-quant", default=None, choices=KV_QUANTS,
                   help=f"KV cache storage (default {DEFAULT_KV_QUANT}): f16, q8_0 (int8 + a scale per 32 values, "
                        "about half of f16), f32")


def load_model(args):
    """minilm.load from the arguments of add_model_args."""
    from .loader import load
    return load(args.model, quant=args.quant, n_ctx=args.ctx, threads=args.threads, kv_quant=args.kv_quant)
