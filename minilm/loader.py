"""`minilm.load`: a local folder, a hub id, a hub-cache snapshot or a GGUF file -> a ready `LM`.

`open_source` picks the checkpoint source (sources.py: Hugging Face folder, pre-quantized folder,
GGUF file); `load_source` does the common part once for all of them: n_ctx and the memory guard,
every tensor checked before any is built, conversion to the target formats, `LM(...)`."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .config import MAX_POSITIONS, Config
from .errors import ModelLoadError, ResourceLimitError
from .kernels import compile_ahead
from .kernels.executor import never_ran as executor_never_ran
from .sources import GGUFSource, HFSource, PrequantSource, Source, convert

DEFAULT_CTX = 4096       # the default n_ctx when the machine's free memory is unknown
MIN_CTX = 512            # the default n_ctx never goes below min(this, the model's maximum)
CTX_MARGIN = 256 << 20   # bytes the default n_ctx leaves free besides the weights and the context
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


def resolve(path_or_id: str) -> Path:
    """Local folder as is; otherwise a hub id through huggingface-hub (cache, HF_HUB_OFFLINE)."""
    p = Path(os.path.expanduser(str(path_or_id)))
    if p.is_dir():
        return p
    if p.exists():
        raise ModelLoadError(f"{p}: expected a model folder (config.json, tokenizer.json, *.safetensors)")
    s = str(path_or_id)
    looks_local = s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s
    if looks_local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", s):
        raise ModelLoadError(f"{s}: model folder not found")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - it is a dependency
        raise ModelLoadError(f"{s}: not a local folder, and huggingface-hub is not installed") from None
    try:
        return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated...
        raise ModelLoadError(
            f"{s}: not a local folder and not available from the Hugging Face hub or its cache "
            f"({type(e).__name__}); pass a local folder with -m/--model, e.g. ./models/SmolLM2-135M-Instruct") from None


# ---- memory ------------------------------------------------------------------------------------
def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None                      # absent, or "max" (no limit)


def cgroup_room() -> int | None:
    """Bytes this process's cgroup may still allocate (limit - usage), or None without a limit.
    cgroup v2 or v1's memory controller, at the process's own group (/proc/self/cgroup) or the root."""
    v2 = v1 = ""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            for line in f:
                _, ctrl, path = (line.rstrip("\n").split(":", 2) + ["", ""])[:3]
                if ctrl == "":
                    v2 = path
                elif "memory" in ctrl.split(","):
                    v1 = path
    except OSError:
        pass
    v2, v1 = v2.rstrip("/"), v1.rstrip("/")
    for lim, use in ((f"/sys/fs/cgroup{v2}/memory.max", f"/sys/fs/cgroup{v2}/memory.current"),
                     ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                     (f"/sys/fs/cgroup/memory{v1}/memory.limit_in_bytes",
                      f"/sys/fs/cgroup/memory{v1}/memory.usage_in_bytes"),
                     ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(lim)
        if limit is not None and limit < 1 << 60:            # v1 writes "no limit" as a huge number
            return max(0, limit - (_read_int(use) or 0))
    return None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable; sysconf elsewhere), and
    no more than the cgroup limit leaves (containers), or None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    room = cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def context_bytes(cfg: Config, n_ctx: int, kv_quant: str | None = None) -> tuple[int, int, int]:
    """(total, per_position, fixed) bytes that a context of n_ctx positions allocates: the KV cache
    (2 x layers x kv_heads x n_ctx rows of head_dim values in kv_quant's storage), RoPE tables and
    attention scores per position, and the run buffers (prefill chunk rows, logits) that do not
    grow with n_ctx."""
    from .cache import check_kv_quant, kv_row_bytes
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * kv_row_bytes(check_kv_quant(kv_quant), cfg.head_dim)
    per = kv + 4 * cfg.n_heads + 8 * cfg.rotary_dim + 8
    rows = min(n_ctx, 256)
    F = cfg.intermediate_size
    fixed = 4 * rows * (5 * cfg.hidden_size + cfg.q_dim * 2 + 2 * cfg.kv_dim + 3 * F) + 12 * cfg.vocab_size
    return per * n_ctx + fixed, per, fixed


def check_context_memory(cfg: Config, n_ctx: int, available: int | None = None, kv_quant: str | None = None) -> None:
    """Raise ResourceLimitError before allocating when n_ctx's buffers would not fit in memory."""
    from .cache import check_kv_quant, kv_row_bytes
    kv_quant = check_kv_quant(kv_quant)
    total, per, fixed = context_bytes(cfg, n_ctx, kv_quant)
    avail = available_memory() if available is None else available
    if n_ctx <= MAX_POSITIONS and (avail is None or total <= avail):
        return
    fit = MAX_POSITIONS if avail is None else min(MAX_POSITIONS, max(0, (avail - fixed) // per))
    if avail is None:
        avail = fixed + per * MAX_POSITIONS
    if fit == 0:
        raise ResourceLimitError(f"this model's run buffers alone need {fixed:,} bytes but only {avail:,} "
                                 "bytes of memory are available (vocab_size / intermediate_size too large)")
    row = kv_row_bytes(kv_quant, cfg.head_dim)
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * n_ctx * row
    raise ResourceLimitError(
        f"n_ctx={n_ctx}: the KV cache would need {kv:,} bytes ({kv / 2**30:.1f} GiB: 2 x {cfg.n_layers} "
        f"layers x {cfg.n_kv_heads} kv heads x {n_ctx} positions x {row} bytes per {kv_quant} row of "
        f"{cfg.head_dim} values), {total:,} bytes with the run buffers, but only {avail:,} bytes "
        f"({avail / 2**30:.1f} GiB) are available; n_ctx <= {fit} fits in this machine's memory")


def default_n_ctx(cfg: Config, kv_quant: str, weight_bytes: int, available: int | None) -> tuple[int, str]:
    """(n_ctx, why) when the caller gives none: the model's max_position_embeddings, capped by what
    `available` bytes of memory leave for the context after the weights and CTX_MARGIN, never
    below min(MIN_CTX, the maximum); with `available` unknown, min(maximum, DEFAULT_CTX).
    A pure function of its arguments (the loader passes available_memory() measured before it
    mapped the weights)."""
    mx = cfg.max_position_embeddings
    if available is None:
        n = min(mx, DEFAULT_CTX)
        return n, f"n_ctx {n} (model max {mx}; free memory unknown)"
    _, per, fixed = context_bytes(cfg, mx, kv_quant)
    fit = (available - weight_bytes - CTX_MARGIN - fixed) // per
    if fit >= mx:
        return mx, f"n_ctx {mx} (the model's max_position_embeddings; fits in free memory)"
    floor = min(mx, MIN_CTX)
    if fit <= floor:
        return floor, (f"n_ctx {floor} (model max {mx}; the floor: free memory, {available / 2**20:,.0f} MiB, "
                       f"leaves less)")
    n = max(floor, fit // 256 * 256)                         # a round number
    return n, f"n_ctx {n} (model max {mx}; limited by free memory, {available / 2**20:,.0f} MiB available)"


def check_n_ctx(cfg: Config, n_ctx, where) -> int | None:
    """The caller's KV cache length, type-checked; None stays None (the loader then picks
    `default_n_ctx`). `check_context_memory` checks a given one against the machine's memory."""
    if n_ctx is None:
        return None
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
        raise ValueError(f"n_ctx={n_ctx!r}: must be a positive integer")
    n_ctx = int(n_ctx)
    if cfg.learned_pos and n_ctx > cfg.max_position_embeddings:
        raise ValueError(f"n_ctx={n_ctx} exceeds this model's {cfg.max_position_embeddings} learned positions")
    return n_ctx


def weight_check_enabled(check_weights) -> bool:
    """check_weights=None follows the environment (MINILM_NO_WEIGHT_CHECK=1 turns the check off)."""
    if check_weights is None:
        return os.environ.get("MINILM_NO_WEIGHT_CHECK", "").strip().lower() not in ("1", "true", "yes", "on")
    if not isinstance(check_weights, bool):
        raise ValueError(f"check_weights={check_weights!r}: must be True, False or None")
    return check_weights


def build_lm(cfg: Config, tensors: dict, tok, n_ctx: int, **kw):
    """`LM(...)`, with an allocation failure reported as ResourceLimitError (never a raw MemoryError)."""
    from .lm import LM
    try:
        return LM(cfg, tensors, tok, n_ctx=n_ctx, **kw)
    except MemoryError:
        total, _, _ = context_bytes(cfg, n_ctx, kw.get("kv_quant"))
        raise ResourceLimitError(f"n_ctx={n_ctx}: out of memory while allocating the KV cache and run "
                                 f"buffers ({total:,} bytes); pass a smaller n_ctx") from None


def check_load_args(quant=None, threads=None, group_size=None, embed_quant=None, check_weights=None) -> bool:
    """Type-check `load`'s options, set the kernel threads; -> whether to check weights for NaN/Inf."""
    if threads is not None:
        import numba
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r}: must be a positive integer")
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if quant is not None and not isinstance(quant, str):
        raise ValueError(f"quant={quant!r}: must be a string such as 'int8' or 'int4'")
    if embed_quant is not None and not isinstance(embed_quant, str):
        raise ValueError(f"embed_quant={embed_quant!r}: must be a string such as 'f16' or 'int8'")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise ValueError(f"group_size={group_size!r}: must be 32, 64 or 128")
    return weight_check_enabled(check_weights)


def open_source(path_or_id, check_weights: bool = True) -> Source:
    """The checkpoint source for a path or hub id: a `.gguf` file, a pre-quantized folder
    (model.save), or a Hugging Face folder (local, hub id, hub-cache snapshot)."""
    from .prequant import is_prequantized
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"path_or_id={path_or_id!r}: must be a folder path or a hub id (str)")
    p = Path(os.path.expanduser(str(path_or_id)))
    if str(path_or_id).lower().endswith(".gguf") and p.is_file():
        return GGUFSource(p, check_weights)
    folder = resolve(path_or_id)
    if is_prequantized(folder):
        return PrequantSource(folder, check_weights)
    return HFSource(folder, check_weights)


def load_source(src: Source, quant: str | None = None, n_ctx: int | None = None, group_size: int | None = None,
                embed_quant: str | None = None, kv_quant: str | None = None):
    """The common part of loading, for any source: n_ctx, the formats to load with, every tensor
    checked against the config and the memory guard before anything is allocated, then the
    tensors one at a time in their target formats, the tokenizer and the `LM`. Without an n_ctx,
    `default_n_ctx` picks one from the memory available before loading and the weights' bytes."""
    from .cache import check_kv_quant
    cfg = src.config
    kv_quant = check_kv_quant(kv_quant)
    n_ctx = check_n_ctx(cfg, n_ctx, src.where)
    target = src.target(quant, group_size, embed_quant)
    src.check()                                            # names, types, shapes: before any work
    note = ""
    if n_ctx is not None:
        check_context_memory(cfg, n_ctx, kv_quant=kv_quant)
        note = f"n_ctx {n_ctx} (as given)"
    avail = available_memory()
    tok = src.tokenizer()
    tensors = {}
    for name, get in src.tensors():                        # one tensor at a time: streaming
        tensors[name] = convert(get(), name, target.fmt(name), target.group, src.where)
    if n_ctx is None:
        weights = sum({id(t): t.nbytes for t in tensors.values()}.values())
        n_ctx, note = default_n_ctx(cfg, kv_quant, weights, avail)
    return build_lm(cfg, tensors, tok, n_ctx, source=src.where, quant=target.level, group_size=target.group,
                    kv_quant=kv_quant, n_ctx_note=note)


def load(path_or_id, quant: str | None = None, n_ctx: int | None = None, threads: int | None = None,
         group_size: int | None = None, embed_quant: str | None = None, check_weights: bool | None = None,
         kv_quant: str | None = None, calibration=None, imatrix=None):
    """Load a Hugging Face checkpoint (config.json + tokenizer.json + *.safetensors), a
    pre-quantized folder (model.save) or a llama.cpp GGUF file (llama, qwen2, qwen3).

    quant: None/'f32' keeps float32 weights (16-bit checkpoints are converted); 'f16', 'bf16'
        (16-bit storage, f32 compute), 'int8' (ggml Q8_0), 'int4' (ggml Q4_0; embeddings and lm
        head stay int8), 'int4-g64', 'int4-g128'. A pre-quantized folder loads as saved, a GGUF
        file with its stored types (a float GGUF can be quantized while loading).
    group_size: int4 group size (32, 64, 128); embed_quant: format of embedding / lm head.
    n_ctx: KV cache length. Default: the model's max_position_embeddings, capped by what the
        memory available at load (MemAvailable, and the cgroup limit) leaves after the weights
        and a margin (`default_n_ctx`; the summary says which and why). A given n_ctx that would
        not fit in the available memory is refused with `ResourceLimitError` saying what fits.
    kv_quant: the KV cache's storage type: 'f16' (default), 'q8_0' (int8 + a scale per 32
        values), 'f32'. Attention computes in float32 whichever is stored.
    threads: Numba threads for the kernels (default: all cores).
    check_weights: float weights are checked for NaN/Inf while loading (one pass over the mapped
        data; `NonFiniteWeightsError` names the file and tensor). False skips the check for files
        you trust; None (default) checks unless the environment sets MINILM_NO_WEIGHT_CHECK=1.
    calibration: a text (or a path to a UTF-8 text file) to quantize with importance weights:
        the float model runs over it and every matrix is quantized weighting its input columns
        by their mean squared activation (llama.cpp's imatrix; minilm/calibrate.py).
    imatrix: instead of calibration, those statistics from a file (`minilm quantize
        --save-imatrix`) or a dict {matrix name: f32[K]}.
    """
    check = check_load_args(quant, threads, group_size, embed_quant, check_weights)
    # A first start (no model ever ran on this Numba cache): the compile helper process starts
    # now and imports while the weights load (kernels/compile_ahead.py); the model's first forward
    # gives it its jobs, or lets it go when there is nothing to compile.
    helper = compile_ahead.spawn() if executor_never_ran() else None
    try:
        if calibration is None and imatrix is None:
            lm = load_source(open_source(path_or_id, check), quant, n_ctx, group_size, embed_quant, kv_quant)
        else:
            lm = load_calibrated(open_source(path_or_id, check), quant, n_ctx, group_size, embed_quant,
                                 calibration, imatrix, kv_quant)[0]
    except BaseException:
        if helper is not None:
            helper.close()
        raise
    lm.net.adopt_helper(helper)
    return lm


def load_calibrated(src: Source, quant, n_ctx, group_size, embed_quant, calibration, imatrix,
                    kv_quant=None):
    """`load` with importance weights: the source in f32, the imatrix (collected from the
    calibration text, or read), then the matrices quantized with it. -> (LM, imatrix)."""
    from . import calibrate
    if calibration is not None and imatrix is not None:
        raise ValueError("pass calibration= (a text to collect the statistics from) or imatrix= (saved "
                         "statistics), not both")
    if isinstance(src, PrequantSource):
        raise ValueError(f"{src.where} is already quantized; calibration needs the float checkpoint")
    src.target(quant, group_size, embed_quant)             # a bad quant fails before any work
    text = calibrate.calibration_text(calibration) if calibration is not None else None
    imat = None
    if imatrix is not None:                                 # checked before the model is loaded
        imat = imatrix if isinstance(imatrix, dict) else calibrate.load_imatrix(imatrix, src.config)
    f32 = load_source(src, None, min(src.config.max_position_embeddings, calibrate.CHUNK))
    if text is not None:
        imat = calibrate.collect_imatrix(f32, text, full=calibrate.hessian_bytes(f32) <= calibrate.GPTQ_MAX_BYTES)
    n_ctx = check_n_ctx(f32.config, n_ctx, src.where)
    if n_ctx is not None:
        check_context_memory(f32.config, n_ctx, kv_quant=kv_quant)
    return quantize_loaded(f32, quant, imat, n_ctx, group_size, embed_quant, kv_quant), imat


def quantize_loaded(model, quant: str | None, imatrix: dict | None = None, n_ctx: int | None = None,
                    group_size: int | None = None, embed_quant: str | None = None, kv_quant: str | None = None,
                    formats: dict | None = None):
    """A new `LM` of a loaded float `model` quantized to `quant` with importance weights
    (calibrate.quantize_tensors; imatrix None: unweighted). n_ctx None: `default_n_ctx` for the
    quantized weights and the memory available now. formats: per-matrix formats that win over the
    level's (calibrate.quantize_tensors)."""
    from . import calibrate
    from .cache import check_kv_quant
    kv_quant = check_kv_quant(kv_quant)
    tensors, target = calibrate.quantize_tensors(model, quant, imatrix, group_size, embed_quant, formats)
    note = f"n_ctx {n_ctx} (as given)"
    if n_ctx is None:
        weights = sum({id(t): t.nbytes for t in tensors.values()}.values())
        n_ctx, note = default_n_ctx(model.config, kv_quant, weights, available_memory())
    return build_lm(model.config, tensors, model.tokenizer, n_ctx, source=model.source, quant=target.level,
                    group_size=target.group, kv_quant=kv_quant, n_ctx_note=note)
