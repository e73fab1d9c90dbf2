"""What every part of `minilm bench` shares: level names, the speed prompt, the machine's read
bandwidth probe, peak RSS, the CPU name, progress bars. Imports nothing else of minilm.bench."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .. import mixes as _mixes
from .. import quant as _quant

LEVELS = tuple(_quant.LEVELS) + tuple(_mixes.PRESETS)       # the traits table's levels, llama.cpp's mixes
CALIBRATED = "+imatrix"     # LEVEL+imatrix: quantized with importance weights from bench --calibration
EMBED_LEVELS = ("f32", "f16", "bf16", "int8", "int4")     # LEVEL@EMBED: embedding / lm-head format
# level -> the GGUF type of its layer matrices (from the traits table; int4 with groups of 64/128
# has none: ggml's Q4_0 blocks are 32)
GGUF_TYPES = {lv: _quant.FORMATS[m].ggml_name for lv, (m, _, g) in _quant.LEVELS.items()
              if _quant.FORMATS[m].ggml_name and not (m == "q4_0" and g != 32)}
GGUF_TYPES.update({"int8": "Q8_0", "int4": "Q4_0"})       # embedding spellings after '@'

PEERS = ("llama.cpp", "transformers")
# `--quant all`: every level users meet in GGUF files on the hub (llama.cpp's presets) and the
# float references, each quantized one also calibrated (LEVEL+imatrix) when --calibration is given,
# and the KV cache axis: f32 and q4_k_m weights with a q8_0 KV cache (LEVEL:kv=TYPE)
ALL_LEVELS = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_nl", "iq4_xs", "q4_0", "q3_k_m", "q2_k")
ALL_KV = ("f32:kv=q8_0", "q4_k_m:kv=q8_0")
KV_SUFFIX = ":kv="          # LEVEL:kv=TYPE: this row's KV cache type (instead of --kv-quant's)


def split_kv(spec: str) -> tuple[str, str | None]:
    """'q4_k_m:kv=q8_0' -> ('q4_k_m', 'q8_0'); 'q4_k_m' -> ('q4_k_m', None)."""
    level, sep, kv = spec.partition(KV_SUFFIX)
    return level, (kv if sep else None)


def expand_levels(specs: list[str], calibration) -> list[str]:
    """--quant's list with 'all' replaced by ALL_LEVELS (+ their LEVEL+imatrix rows when a
    calibration text is given) and ALL_KV; duplicates dropped, order kept."""
    out = []
    for q in specs:
        if q == "all":
            out += list(ALL_LEVELS)
            if calibration:
                out += [lv + CALIBRATED for lv in ALL_LEVELS if lv not in ("f32", "f16")]
            out += list(ALL_KV)
        else:
            out.append(q)
    return list(dict.fromkeys(out))


def parse_level(spec: str) -> tuple[str, str | None]:
    """'int8' -> ('int8', None); 'int8@int8' -> ('int8', 'int8') (int8 matrices, Q8_0 embedding /
    lm head: llama.cpp's Q8_0 layout byte for byte); a "+imatrix" suffix (calibrated, see
    `calibrated`) is not part of the level. Raises ValueError naming the bad part."""
    base = spec[:-len(CALIBRATED)] if calibrated(spec) else spec
    level, at, emb = base.partition("@")
    if level not in LEVELS:
        raise ValueError(f"--quant {spec}: unknown level {level!r} (choose from {', '.join(LEVELS)}; "
                         f"LEVEL@EMBED sets the embedding / lm-head format, LEVEL{CALIBRATED} quantizes "
                         "with importance weights from --calibration)")
    if at and level in _mixes.PRESETS:
        raise ValueError(f"--quant {spec}: {level} is a llama.cpp mix that chooses the embedding / "
                         "lm-head format itself ('@' does not apply)")
    if at and emb not in EMBED_LEVELS:
        raise ValueError(f"--quant {spec}: unknown embedding format {emb!r} after '@' "
                         f"(choose from {', '.join(EMBED_LEVELS)})")
    return level, (emb if at else None)


def calibrated(spec: str) -> bool:
    """Whether a level spec asks for calibrated quantization (LEVEL+imatrix)."""
    return spec.endswith(CALIBRATED)


def gguf_type(spec: str) -> str | None:
    """The GGUF type name a level exports to (lower case, as llama.cpp prints it), None if none."""
    level, emb = parse_level(spec)
    t = GGUF_TYPES.get(level)
    if t is None:
        return None
    return t.lower() + (f"@{GGUF_TYPES[emb].lower()}" if emb and emb in GGUF_TYPES else "")


def speed_prompt(V: int, n: int) -> list[int]:
    """The speed prompt: deterministic random ids (same for every level and peer)."""
    return [int(i) for i in np.random.default_rng(0).integers(3, max(4, min(V, 30000)), n)]


# ---- memory bandwidth (benchmarks/ is not installed, so the probe lives here) ----------------------
def _bw_kernels():
    from numba import njit, prange

    @njit(parallel=True, cache=True, fastmath=True)
    def fill(a, value):
        for i in prange(a.size):          # parallel first touch
            a[i] = value

    @njit(parallel=True, cache=True, fastmath=True)
    def read_sum(a):
        s = np.float32(0.0)
        for i in prange(a.size):
            s += a[i]
        return s

    @njit(parallel=True, cache=True, fastmath=True)
    def triad(a, b, c, scalar):
        for i in prange(a.size):
            a[i] = b[i] + scalar * c[i]

    return fill, read_sum, triad


def measure_bandwidth(threads=None, size_mb=512, runs=5) -> dict:
    """Read (parallel f32 sum over one array) and triad (a = b + s*c, 3 arrays of traffic) GB/s,
    medians of `runs` (>= 5) timed runs after a warm-up; GB = 1e9 bytes."""
    import numba
    fill, read_sum, triad = _bw_kernels()
    runs = max(5, int(runs))
    old = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        n = int(size_mb) * 1024 * 1024 // 4
        a, b, c = (np.empty(n, np.float32) for _ in range(3))     # f32[n] each
        fill(a, np.float32(0.0))
        fill(b, np.float32(1.0))
        fill(c, np.float32(2.0))

        def med(fn):
            fn()
            ts = []
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return statistics.median(ts)

        t_read = med(lambda: read_sum(b))
        t_triad = med(lambda: triad(a, b, c, np.float32(3.0)))
        return {"threads": numba.get_num_threads(), "size_mb": int(size_mb), "runs": runs,
                "read_gbs": 4 * n / t_read / 1e9, "triad_gbs": 3 * 4 * n / t_triad / 1e9}
    finally:
        numba.set_num_threads(old)


# ---- process and machine facts ---------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident set in MiB. Linux: VmHWM, which starts afresh at
    exec; ru_maxrss would carry over the parent's peak (Linux keeps it across fork + execve)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def children_peak_rss_mb() -> float:
    """Largest peak RSS (MiB) of the child processes this process has waited for (ru_maxrss of
    RUSAGE_CHILDREN: the external llama-bench runs of a peer row)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def progress(iterable=None, **kw):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable if iterable is not None else _NoBar()
    kw.setdefault("file", sys.stderr)
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    if os.environ.get("MINILM_BENCH_PROGRESS") == "0":
        kw["disable"] = True
    else:
        kw.setdefault("disable", None)            # off when stderr is not a terminal
    return tqdm(iterable, **kw)


class _NoBar:
    def update(self, n=1): ...
    def close(self): ...
