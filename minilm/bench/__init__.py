"""`minilm bench`: size, speed and quality of each quant level of one model, in one table, with
optional peers (llama.cpp, transformers) on the same weights.

Layout (no module imports one above it in this list):
    common.py   level names, speed prompt, read-bandwidth probe, peak RSS, CPU name, progress bars
    timing.py   the one timing loop (prefill pp-N, greedy decode tg-N; medians, min-max, GB/s)
    quality.py  perplexity, mean KL and top-1 agreement against the f32 reference
    engines.py  engine adapters (minilm, transformers, llama-cpp-python) and llama.cpp's llama-bench
    report.py   table, side-by-side ratios, results.json / results.md / results.png
    cli.py      run(args): the parent that runs each row in its own process; child(spec)

Per row: file size and bits/weight, load time, peak RSS, TTFT (warm) and process start -> first
logits, prefill / decode tok/s (median, min-max), decode GB/s against the machine's read bandwidth,
and quality vs f32. results.json is rewritten after each row, so Ctrl-C keeps the rows measured.
"""
from .cli import run
from .common import _bw_kernels, cpu_name, measure_bandwidth, peak_rss_mb
from .engines import count_params, decode_bytes_per_token

__all__ = ["run", "measure_bandwidth", "peak_rss_mb", "cpu_name", "decode_bytes_per_token", "count_params",
           "_bw_kernels"]
