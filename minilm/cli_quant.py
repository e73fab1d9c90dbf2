"""`minilm quantize` and `minilm info`."""
from __future__ import annotations

import time

from .cli_common import add_model_args, load_model


def cmd_quantize(args) -> int:
    from .loader import load
    t = time.perf_counter()
    model = load(args.model, quant=args.quant, group_size=args.group_size, embed_quant=args.embed_quant, n_ctx=16)
    model.save(args.output)
    print(model.summary())
    print(f"wrote {args.output} in {time.perf_counter() - t:.1f} s")
    return 0


def cmd_info(args) -> int:
    model = load_model(args)
    print(model.summary())
    return 0


def add_subcommands(sub) -> None:
    q = sub.add_parser("quantize", help="write a pre-quantized model folder")
    q.add_argument("-m", "--model", required=True, help="source checkpoint (folder or hub id)")
    q.add_argument("--quant", required=True, help="int8, int4, int4-g64, int4-g128, f16, bf16, f32")
    q.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128], help="int4 group size")
    q.add_argument("--embed-quant", default=None, help="format of embedding/lm head (default: int8 for int4)")
    q.add_argument("-o", "--output", required=True, help="output folder")
    q.set_defaults(func=cmd_quantize)
    i = sub.add_parser("info", help="show a model's tensor types, sizes and KV cache size")
    add_model_args(i)
    i.set_defaults(func=cmd_info)
