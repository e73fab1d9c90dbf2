"""`minilm quantize` and `minilm info`."""
from __future__ import annotations

import time

from .cli_common import add_model_args, load_model


def cmd_quantize(args) -> int:
    from .loader import load, load_calibrated, open_source
    t = time.perf_counter()
    if args.calibration is None and args.imatrix is None:
        if args.save_imatrix:
            raise ValueError("--save-imatrix needs --calibration FILE (the text to collect the statistics from)")
        model = load(args.model, quant=args.quant, group_size=args.group_size, embed_quant=args.embed_quant, n_ctx=16)
    else:
        src = open_source(args.model)
        if args.save_imatrix and not str(args.save_imatrix).endswith(".safetensors"):
            from .imatrix_io import gguf_names
            gguf_names(src.config)          # llama.cpp's names exist for this model: fails before any work
        model, imat = load_calibrated(src, args.quant, 16, args.group_size, args.embed_quant,
                                      args.calibration, args.imatrix)
        if args.save_imatrix:
            from .calibrate import save_imatrix
            out = save_imatrix(imat, args.save_imatrix, cfg=model.config, dataset=str(args.calibration))
            print(f"wrote the imatrix to {out}")
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
    q.add_argument("--quant", required=True,
                   help="int8, int4, int4-g64, int4-g128, f16, bf16, f32, ggml's formats (q8_0, q4_0, q6_k, "
                        "iq4_nl, iq4_xs, ...) or llama.cpp's mixes (q4_k_m, q4_k_s, q5_k_m, q5_k_s, q3_k_m, "
                        "q3_k_s, q3_k_l, q2_k)")
    q.add_argument("--calibration", default=None, metavar="FILE",
                   help="UTF-8 text to collect importance weights from (imatrix): every matrix is "
                        "quantized weighting its input columns by their mean squared activation")
    q.add_argument("--imatrix", default=None, metavar="FILE",
                   help="importance weights: a file of llama.cpp's llama-imatrix (GGUF or legacy .dat) or of "
                        "--save-imatrix")
    q.add_argument("--save-imatrix", default=None, metavar="FILE",
                   help="write the statistics --calibration collected: FILE.gguf (or any other suffix) as "
                        "llama.cpp's GGUF imatrix (llama-quantize --imatrix reads it), FILE.dat as its legacy "
                        "format, FILE.safetensors as minilm's")
    q.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128], help="int4 group size")
    q.add_argument("--embed-quant", default=None, help="format of embedding/lm head (default: int8 for int4)")
    q.add_argument("-o", "--output", required=True, help="output folder")
    q.set_defaults(func=cmd_quantize)
    i = sub.add_parser("info", help="show a model's tensor types, sizes and KV cache size")
    add_model_args(i)
    i.set_defaults(func=cmd_info)
