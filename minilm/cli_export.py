"""`minilm export`: write a model as a GGUF file for llama.cpp."""
from __future__ import annotations

import time


def cmd_export(args) -> int:
    from .gguf_io import QUANTS, export_gguf
    from .loader import load
    t = time.perf_counter()
    if args.quant is not None and args.quant not in QUANTS:
        if args.quant.startswith("int4-g"):
            raise ValueError(f"--quant {args.quant}: GGUF has no Q4_0 with group {args.quant[6:]}; "
                             "only int4 (group 32) maps to Q4_0")
        raise ValueError(f"--quant {args.quant}: GGUF export supports {', '.join(QUANTS)}")
    model = load(args.model, quant=args.quant, n_ctx=16, threads=args.threads, calibration=args.calibration,
                 imatrix=args.imatrix)
    out = export_gguf(model, args.gguf, args.quant)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {model.quant}) in {time.perf_counter() - t:.1f} s")
    return 0


def add_subcommands(sub) -> None:
    e = sub.add_parser("export", help="write a GGUF file that llama.cpp loads")
    e.add_argument("-m", "--model", required=True, help="source model (folder, hub id, or .gguf)")
    e.add_argument("--gguf", required=True, metavar="OUT.gguf", help="output GGUF file")
    e.add_argument("--quant", default=None,
                   help="tensor types: f32, f16, bf16, int8 (Q8_0), int4 (Q4_0, group 32), ggml's formats "
                        "(q6_k, iq4_nl, ...) or llama.cpp's mixes (q4_k_m, q3_k_m, q2_k, ...); "
                        "default: as loaded (a pre-quantized folder keeps its types)")
    e.add_argument("--calibration", default=None, metavar="FILE", help="text for importance weights (imatrix)")
    e.add_argument("--imatrix", default=None, metavar="FILE", help="importance weights: llama-imatrix's file (GGUF or .dat) or quantize --save-imatrix's")
    e.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
    e.set_defaults(func=cmd_export)
