"""`minilm bench`: size, load time, peak RSS, TTFT, prefill/decode speed and quality vs f32 per quant
level, with optional peers on the same weights (the code is in minilm/bench/)."""
from __future__ import annotations


def cmd_bench(args) -> int:
    from .bench import run
    return run(args)


def add_subcommands(sub) -> None:
    b = sub.add_parser(
        "bench", help="benchmark quant levels: size, speed, memory and quality vs f32 (peers: llama.cpp, transformers)",
        description="Each quant level runs in its own process. Prints one table and writes "
                    "DIR/results.json (rewritten after each row: Ctrl-C keeps what was measured), "
                    "DIR/results.md and DIR/results.png. Quality (perplexity, mean KL vs f32, top-1 "
                    "agreement) is measured on --text; without it, on a small built-in paragraph. "
                    "--peers llama.cpp runs llama.cpp's own llama-bench at its defaults on the GGUF minilm "
                    "exports (build it once with benchmarks/build_llama_bench.sh), or llama-cpp-python "
                    "where no llama-bench is found; the row names the configuration that ran.")
    b.add_argument("-m", "--model", required=True, help="model folder or hub id")
    b.add_argument("--quant", default="f32,f16,int8,int4,int4-g128",
                   help="comma-separated levels (default: f32,f16,int8,int4,int4-g128; all: every level below, each also +imatrix with --calibration, and KV q8_0 rows), also ggml's formats and "
                        "llama.cpp's mixes (q8_0,q6_k,q5_k_m,q4_k_m,iq4_nl,iq4_xs,q4_0,q3_k_m,q2_k); LEVEL@EMBED "
                        "sets the embedding / lm-head format, e.g. int8@int8 = llama.cpp's Q8_0 layout byte for "
                        "byte; LEVEL+imatrix quantizes with importance weights from --calibration; LEVEL:kv=q8_0 runs that "
                        "row with that KV cache type")
    b.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibration text for LEVEL+imatrix levels (e.g. q4_k_m+imatrix): importance-weighted "
                        "quantization; use a text distinct from --text")
    b.add_argument("--kv-quant", default="f16",
                   help="comma-separated KV cache storage types for the minilm rows: f16, q8_0, f32 (default "
                        "f16); each level runs once per type. The quality reference is f32 weights with an f32 "
                        "KV cache, so `--quant f32 --kv-quant f16,q8_0` shows the KV cache's own KL cost")
    b.add_argument("--text", default=None,
                   help="UTF-8 text file for the quality columns (default: a short built-in paragraph)")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
    b.add_argument("--runs", type=int, default=5,
                   help="timed runs per level (llama-bench -r); medians and min-max reported (default 5)")
    b.add_argument("--ctx", type=int, default=None,
                   help="quality window length in tokens (default: min(max positions, 512))")
    b.add_argument("--quality-tokens", type=int, default=2048,
                   help="text tokens scored for quality (0: skip the quality columns)")
    b.add_argument("--peers", default="", help="comma-separated: llama.cpp,transformers (optional)")
    b.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="llama-bench binary for the llama.cpp peer (default: $MINILM_LLAMA_BENCH, else the "
                        "builds of benchmarks/build_llama_bench.sh under ~/.cache/minilm)")
    b.add_argument("--from-saved", action="store_true",
                   help="save each level as a pre-quantized folder first and measure loading that folder "
                        "(the deployed case: no quantizing in the measured process)")
    b.add_argument("--bw-size-mb", type=int, default=512, help="array size of the bandwidth probe")
    b.add_argument("-o", "--out", default="bench_results", help="output folder (default: bench_results)")
    b.set_defaults(func=cmd_bench)
