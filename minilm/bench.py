"""`minilm bench`: size, speed and quality of each quant level of one model, in one table.

For every quant level (each in its own process, so load time and peak RSS are that level's alone):

    file size     bytes of model.minilm.safetensors when the level is saved as a pre-quantized folder
                  (model.save into a temp folder), and bits per weight = 8 * bytes / parameters
    load          seconds in minilm.load (quantizing included when the checkpoint is not pre-quantized)
    peak RSS      VmHWM (MiB) of the level's process after load + prefill + decode (before the quality pass)
    TTFT          warm: median seconds to prefill the prompt and get the first token's logits;
                  cold ("start"): process start -> first logits (imports, load, Numba compile/cache load)
    prefill/decode tokens/s: median of --runs runs (min-max shown) of a --prompt-tokens prompt and
                  --new-tokens greedy decode steps
    GB/s          weight bytes one decode step reads * decode tok/s, next to the machine's read
                  bandwidth (numba parallel sum, measured once) -> "% of bw"
    quality       vs f32 on --text, over non-overlapping windows of --ctx tokens (BOS first when the
                  tokenizer has one), up to --quality-tokens: perplexity, mean KL(P_f32 || P_level)
                  of the next-token distributions, and top-1 agreement with f32 (the measures
                  llama.cpp's perplexity tool reports with --kl-divergence). f32 log-probs are
                  computed once and kept in a temp .npy that every level is compared against.

Peers (optional, never a dependency): transformers fp32 (torch) and llama.cpp (llama-cpp-python, on a
GGUF export of the same weights by minilm.gguf_io). A peer that cannot run gives a row with a note.

results.json is rewritten after each row, so Ctrl-C keeps the rows already measured.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BUILTIN_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife. However little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
    "he is considered as the rightful property of some one or other of their daughters. \"My dear Mr. "
    "Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is let at last?\" Mr. "
    "Bennet replied that he had not. \"But it is,\" returned she; \"for Mrs. Long has just been here, and "
    "she told me all about it.\" Mr. Bennet made no answer. \"Do you not want to know who has taken it?\" "
    "cried his wife impatiently. \"You want to tell me, and I have no objection to hearing it.\" This was "
    "invitation enough. Once upon a time there was a little girl named Lily. She loved to play outside in "
    "the park with her ball. One day, she saw a big dog near the tree. The dog was friendly and wagged "
    "its tail. Lily threw the ball and the dog ran to get it. They played together all afternoon, and "
    "when the sun went down, Lily went home happy and told her mother about her new friend."
)   # Pride and Prejudice (public domain, Project Gutenberg #1342), ch. 1, + a TinyStories-style paragraph

LEVELS = ("f32", "f16", "bf16", "int8", "int4", "int4-g64", "int4-g128")
GGUF_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
PEERS = ("llama.cpp", "transformers")


# ---- memory bandwidth (moved here from benchmarks/bandwidth.py: benchmarks/ is not installed) --------
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
    medians of `runs` (>= 5) timed runs after a warm-up; GB = 1e9 bytes. Same as benchmarks/bandwidth.py."""
    import numba
    fill, read_sum, triad = _bw_kernels()
    runs = max(5, int(runs))
    old = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        n = int(size_mb) * 1024 * 1024 // 4
        a, b, c = (np.empty(n, np.float32) for _ in range(3))
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


# ---- helpers ---------------------------------------------------------------------------------------
def decode_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every layer matrix and the lm head."""
    return model.net.weight_bytes_per_token()


def count_params(tensors: dict) -> int:
    from .quant import Linear
    seen, n = set(), 0
    for t in tensors.values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        n += t.N * t.K if isinstance(t, Linear) else int(np.size(t))
    return n


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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _progress(iterable=None, **kw):
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


def windows(ids: list[int], ctx: int, limit: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping windows of ctx tokens over ids[:limit] (BOS first when the tokenizer has one)."""
    ids = ids[:limit]
    step = ctx - 1 if bos is not None else ctx
    out = []
    for a in range(0, len(ids), step):
        w = ([bos] if bos is not None else []) + ids[a:a + step]
        if len(w) >= 2:
            out.append(w)
    return out


def log_softmax(lg: np.ndarray) -> np.ndarray:
    lg = lg.astype(np.float64)
    m = lg.max(1, keepdims=True)
    return lg - (np.log(np.exp(lg - m).sum(1, keepdims=True)) + m)


class QualityAccumulator:
    """Compare log-probs window by window against the f32 reference (a [positions, V] f32 .npy)."""

    def __init__(self, ref_path: Path, n_pos: int, V: int):
        self.ref_path = ref_path
        self.write = not ref_path.exists()
        if self.write:
            self.ref = np.lib.format.open_memmap(ref_path, mode="w+", dtype=np.float32, shape=(n_pos, V))
        else:
            self.ref = np.load(ref_path, mmap_mode="r")
            if self.ref.shape != (n_pos, V):
                raise ValueError(f"reference {ref_path} has shape {self.ref.shape}, expected {(n_pos, V)}")
        self.pos = 0
        self.nll = 0.0
        self.kl: list[np.ndarray] = []
        self.agree = 0

    def add(self, window: list[int], logits: np.ndarray) -> None:
        T = len(window) - 1
        lp = log_softmax(np.asarray(logits)[:T])                      # [T, V] f64
        if self.write:
            self.ref[self.pos:self.pos + T] = lp.astype(np.float32)
        ref = np.asarray(self.ref[self.pos:self.pos + T], dtype=np.float64)
        if self.write:
            lp = lp.astype(np.float32).astype(np.float64)             # the reference is stored in f32
        tgt = np.asarray(window[1:])
        self.nll -= float(lp[np.arange(T), tgt].sum())
        self.kl.append((np.exp(ref) * (ref - lp)).sum(1))
        self.agree += int((ref.argmax(1) == lp.argmax(1)).sum())
        self.pos += T

    def result(self) -> dict:
        if self.write:
            self.ref.flush()
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        n = max(self.pos, 1)
        return {"ppl": math.exp(self.nll / n), "kl_mean": float(kl.mean()) if kl.size else float("nan"),
                "kl_p99": float(np.percentile(kl, 99)) if kl.size else float("nan"),
                "top1_agree_pct": 100.0 * self.agree / n, "quality_positions": self.pos}


def speed_prompt(V: int, n: int) -> list[int]:
    """The speed prompt: deterministic random ids (same for every level and peer)."""
    return [int(i) for i in np.random.default_rng(0).integers(3, max(4, min(V, 30000)), n)]


# ---- one minilm level (runs in its own process) -----------------------------------------------------
def measure_level(spec: dict) -> dict:
    t_start = spec["t_start"]
    import minilm
    from .loader import resolve
    q = spec["quant"]
    row = {"engine": "minilm", "quant": q, "version": minilm.__version__}
    t = time.perf_counter()
    model = minilm.load(spec["model"], quant=None if q == "f32" else q, n_ctx=spec["n_ctx"],
                        threads=spec["threads"])
    row["load_s"] = time.perf_counter() - t
    if spec.get("ref_only"):                         # just the f32 reference log-probs
        row.update(quality_minilm(model, spec))
        return row
    net = model.net
    ids = spec["prompt_ids"]
    V = model.config.vocab_size
    ids = [i % V for i in ids]
    model.reset()
    net.prefill(ids)                                  # first token in this process (JIT compile / cache load)
    row["start_to_first_token_s"] = time.time() - t_start
    prefill, decode, ttft = [], [], []
    bar = _progress(total=spec["runs"], desc=f"{q} speed", unit="run")
    for _ in range(spec["runs"]):
        model.reset()
        t = time.perf_counter()
        logits = net.prefill(ids)
        tok = int(np.argmax(logits))
        dt = time.perf_counter() - t
        ttft.append(dt)
        prefill.append(len(ids) / dt)
        t = time.perf_counter()
        for _ in range(spec["new_tokens"]):
            tok = int(np.argmax(net.decode(tok)))
        decode.append(spec["new_tokens"] / (time.perf_counter() - t))
        bar.update(1)
    bar.close()
    model.reset()
    row["peak_rss_mb"] = peak_rss_mb()
    bpt = decode_bytes_per_token(model)
    row.update(ttft_s=statistics.median(ttft),
               prefill_tok_s=statistics.median(prefill), prefill_min=min(prefill), prefill_max=max(prefill),
               decode_tok_s=statistics.median(decode), decode_min=min(decode), decode_max=max(decode),
               bytes_per_token=bpt, decode_gb_s=bpt * statistics.median(decode) / 1e9,
               weights_mb=sum(getattr(x, "nbytes", 0) for x in {id(v): v for v in model.tensors.values()}.values()) / 1e6,
               kv_cache_mb=net.cache.nbytes / 1e6, params=count_params(model.tensors))
    if spec.get("quality"):
        row.update(quality_minilm(model, spec))
    # file size of this level as a pre-quantized folder (after the RSS figure: saving may allocate)
    src = resolve(spec["model"])
    from .prequant import WEIGHTS, is_prequantized
    if is_prequantized(src):
        row["file_bytes"] = (src / WEIGHTS).stat().st_size
    else:
        with tempfile.TemporaryDirectory(prefix="minilm-bench-size-", dir=spec.get("tmp")) as d:
            model.save(d)
            row["file_bytes"] = (Path(d) / WEIGHTS).stat().st_size
    row["bits_per_weight"] = 8 * row["file_bytes"] / row["params"]
    return row


def quality_minilm(model, spec: dict) -> dict:
    qs = spec["quality"]
    wins = qs["windows"]
    acc = QualityAccumulator(Path(qs["ref"]), qs["positions"], model.config.vocab_size)
    for w in _progress(wins, desc=f"{spec['quant']} quality", unit="win"):
        acc.add(w, model.logits(w))
    return acc.result()


# ---- peers (each in its own process too) ------------------------------------------------------------
def measure_transformers(spec: dict) -> dict:
    t_start = spec["t_start"]
    dynamic = spec.get("quant") == "int8-dynamic"      # torch.ao dynamic int8 Linear layers
    row = {"engine": "transformers", "quant": "int8-dynamic" if dynamic else "fp32"}
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        row["note"] = f"skipped: {e} (pip install torch transformers; see benchmarks/README.md)"
        return row
    from .loader import resolve
    row["version"] = f"transformers {transformers.__version__}, torch {torch.__version__}"
    torch.set_num_threads(spec["threads"] or os.cpu_count())
    folder = resolve(spec["model"])
    t = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except TypeError:                                  # transformers < 4.56
        model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    model.eval()
    if dynamic:
        try:
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        except Exception as e:  # noqa: BLE001 - no quantized engine on this CPU/build, ...
            row["note"] = f"skipped: torch dynamic int8 does not run here ({type(e).__name__}: {e})"
            return row
    row["load_s"] = time.perf_counter() - t
    V = model.config.vocab_size
    prompt = torch.tensor([[i % V for i in spec["prompt_ids"]]])

    def one_run():
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(spec["new_tokens"]):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            return t1 - t0, time.perf_counter() - t1

    with torch.inference_mode():
        model(input_ids=prompt[:, :1])
    row["start_to_first_token_s"] = time.time() - t_start
    ttft, dec = [], []
    for _ in _progress(range(spec["runs"]), desc="transformers speed", unit="run"):
        p, d = one_run()
        ttft.append(p)
        dec.append(spec["new_tokens"] / d)
    n = len(spec["prompt_ids"])
    pre = [n / x for x in ttft]
    params = sum(p.numel() for p in model.parameters())
    row.update(peak_rss_mb=peak_rss_mb(), ttft_s=statistics.median(ttft),
               prefill_tok_s=statistics.median(pre), prefill_min=min(pre), prefill_max=max(pre),
               decode_tok_s=statistics.median(dec), decode_min=min(dec), decode_max=max(dec),
               bytes_per_token=spec.get("f32_bytes_per_token"), params=params,
               file_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")))
    if dynamic:           # quantized in memory from the f32 file: no file of its own, no byte count
        row.update(bytes_per_token=None, file_bytes=None)
        row["note"] = "torch.ao quantize_dynamic(nn.Linear, qint8) of the f32 checkpoint, in memory"
    else:
        row["bits_per_weight"] = 8 * row["file_bytes"] / params
        row["note"] = "file: checkpoint safetensors as stored; GB/s from minilm f32 bytes/token"
    if row["bytes_per_token"]:
        row["decode_gb_s"] = row["bytes_per_token"] * row["decode_tok_s"] / 1e9
    qs = spec.get("quality")
    if qs and Path(qs["ref"]).exists():
        acc = QualityAccumulator(Path(qs["ref"]), qs["positions"], V)
        for w in _progress(qs["windows"], desc="transformers quality", unit="win"):
            with torch.inference_mode():
                lg = model(input_ids=torch.tensor([w])).logits[0].float().numpy()
            acc.add(w, lg)
        row.update(acc.result())
    return row


def _no_extra_bufts(llama_cpp) -> None:
    """Turn off llama.cpp's extra buffer types (AMX / repacked weights): on CPUs that report AMX
    where the OS or sandbox has not enabled the tile state (this machine), a native build dies of
    SIGILL on Q8_0/Q4_0. This also turns off Q4_0 weight repacking, so llama.cpp's Q4_0 measured
    here is its plain kernel."""
    import llama_cpp.llama as L
    default = L.llama_cpp.llama_model_default_params
    if getattr(default, "_minilm_patched", False):
        return

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p
    params._minilm_patched = True
    L.llama_cpp.llama_model_default_params = params


def measure_llamacpp(spec: dict) -> dict:
    t_start = spec["t_start"]
    q = spec["quant"]
    row = {"engine": "llama.cpp", "quant": GGUF_TYPES.get(q, q).lower()}
    try:
        import llama_cpp
    except ImportError as e:
        row["note"] = f"skipped: llama-cpp-python not importable ({e}); pip install llama-cpp-python"
        return row
    row["version"] = f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}"
    try:
        from .gguf_io import export_gguf
    except ImportError as e:
        row["note"] = f"skipped: minilm.gguf_io.export_gguf not available ({e})"
        return row
    from .loader import resolve
    with tempfile.TemporaryDirectory(prefix="minilm-bench-gguf-", dir=spec.get("tmp")) as d:
        path = Path(d) / f"model-{q}.gguf"
        try:
            try:
                export_gguf(str(resolve(spec["model"])), str(path), q, verbose=False)
            except TypeError:
                export_gguf(str(resolve(spec["model"])), str(path), q)
        except Exception as e:
            row["note"] = f"skipped: GGUF export as {q} failed ({type(e).__name__}: {e})"
            return row
        row["file_bytes"] = path.stat().st_size
        threads = spec["threads"] or os.cpu_count()
        n_ctx = max(spec["n_ctx"], 16)
        kw = dict(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                  n_batch=min(512, n_ctx), verbose=False)
        _no_extra_bufts(llama_cpp)
        t = time.perf_counter()
        llm = llama_cpp.Llama(logits_all=False, **kw)
        row["load_s"] = time.perf_counter() - t
        V = llm.n_vocab()
        ids = [i % V for i in spec["prompt_ids"]]

        def last_argmax():      # logits of the last evaluated token (llm.scores is only kept with logits_all)
            return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(V,))))

        llm.reset()
        llm.eval(ids)
        last_argmax()
        row["start_to_first_token_s"] = time.time() - t_start
        ttft, dec = [], []
        for _ in _progress(range(spec["runs"]), desc=f"llama.cpp {q} speed", unit="run"):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            tok = last_argmax()
            ttft.append(time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(spec["new_tokens"]):
                llm.eval([tok])
                tok = last_argmax()
            dec.append(spec["new_tokens"] / (time.perf_counter() - t))
        pre = [len(ids) / x for x in ttft]
        row.update(peak_rss_mb=peak_rss_mb(), ttft_s=statistics.median(ttft),
                   prefill_tok_s=statistics.median(pre), prefill_min=min(pre), prefill_max=max(pre),
                   decode_tok_s=statistics.median(dec), decode_min=min(dec), decode_max=max(dec),
                   note="wall clock of Llama.eval loops (argmax in Python); GB/s from minilm bytes/token of the level")
        if spec.get("bytes_per_token"):
            row["bytes_per_token"] = spec["bytes_per_token"]
            row["decode_gb_s"] = row["bytes_per_token"] * row["decode_tok_s"] / 1e9
        params = spec.get("params")
        if params:
            row["params"] = params
            row["bits_per_weight"] = 8 * row["file_bytes"] / params
        qs = spec.get("quality")
        if qs and Path(qs["ref"]).exists():
            del llm
            llm = llama_cpp.Llama(logits_all=True, **kw)
            acc = QualityAccumulator(Path(qs["ref"]), qs["positions"], V)
            for w in _progress(qs["windows"], desc=f"llama.cpp {q} quality", unit="win"):
                llm.reset()
                llm.eval(w)
                acc.add(w, np.array(llm.scores[:len(w)]))
            row.update(acc.result())
    return row


def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        fn = {"minilm": measure_level, "transformers": measure_transformers,
              "llama.cpp": measure_llamacpp}[spec["engine"]]
        row = fn(spec)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        import traceback
        traceback.print_exc()
        row = {"engine": spec["engine"], "quant": spec.get("quant"), "note": f"failed: {type(e).__name__}: {e}"}
    Path(spec["result"]).write_text(json.dumps(row))
    return 0


# ---- the parent: orchestrates, writes results -------------------------------------------------------
COLUMNS = [  # (key, header, format)
    ("engine", "engine", "{}"), ("quant", "quant", "{}"), ("file_mb", "file MB", "{:.2f}"),
    ("bits_per_weight", "bits/w", "{:.2f}"), ("load_s", "load s", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MiB", "{:.0f}"), ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("start_to_first_token_s", "start->1st s", "{:.2f}"),
    ("prefill", "prefill tok/s (min-max)", None), ("decode", "decode tok/s (min-max)", None),
    ("decode_gb_s", "GB/s", "{:.2f}"), ("pct_of_bw", "% of bw", "{:.0f}"),
    ("ppl", "PPL", "{:.3f}"), ("kl_mean", "KL mean", "{:.4g}"), ("top1_agree_pct", "top-1 %", "{:.1f}"),
    ("version", "version", "{}"), ("note", "note", "{}"),
]


def _fmt_range(r, key):
    if r.get(f"{key}_tok_s") is None:
        return ""
    v, lo, hi = r[f"{key}_tok_s"], r[f"{key}_min"], r[f"{key}_max"]
    p = 1 if v >= 10 else 2
    return f"{v:.{p}f} ({lo:.{p}f}-{hi:.{p}f})"


def cells(r: dict) -> list[str]:
    out = []
    for key, _, f in COLUMNS:
        if key in ("prefill", "decode"):
            out.append(_fmt_range(r, key))
            continue
        v = r.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            out.append("")
        else:
            out.append(f.format(v))
    return out


def _derive(r: dict, bw: float) -> dict:
    if r.get("file_bytes"):
        r["file_mb"] = r["file_bytes"] / 1e6
    if r.get("ttft_s") is not None:
        r["ttft_ms"] = 1000 * r["ttft_s"]
    if r.get("decode_gb_s") and bw:
        r["pct_of_bw"] = 100 * r["decode_gb_s"] / bw
        r["ceiling_tok_s"] = bw * 1e9 / r["bytes_per_token"]
    return r


def render_table(rows, markdown=False) -> str:
    heads = [h for _, h, _ in COLUMNS]
    body = [cells(r) for r in rows]
    keep = [i for i in range(len(heads)) if i < 2 or any(b[i] for b in body) or heads[i] not in ("version", "note")]
    heads = [heads[i] for i in keep]
    body = [[b[i] for i in keep] for b in body]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    w = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    w = [min(x, 60) for x in w]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(heads))]
    lines += ["  ".join(b[i].ljust(w[i]) for i in range(len(heads))) for b in body]
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    use_kl = any(r.get("kl_mean") is not None and math.isfinite(r["kl_mean"]) for r in rows)
    ykey, ylabel = ("kl_mean", "mean KL vs f32 (nats/token)") if use_kl else ("ppl", "perplexity")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = {"minilm": ("o", "C0"), "llama.cpp": ("s", "C1"), "transformers": ("^", "C2")}
    ys = [r[ykey] for r in rows if r.get(ykey) is not None and math.isfinite(r[ykey])]
    for ax, (xkey, xlabel) in zip(axes, [("decode_tok_s", "decode tokens/s (median)"), ("file_mb", "file size (MB)")]):
        seen = set()
        for r in rows:
            x, y = r.get(xkey), r.get(ykey)
            if x is None or y is None or not math.isfinite(y):
                continue
            m, c = markers.get(r["engine"], ("x", "k"))
            y = max(y, 0.0) if use_kl else y        # a -1e-9 KL is rounding
            ax.scatter([x], [y], marker=m, color=c, s=60, label=None if r["engine"] in seen else r["engine"])
            seen.add(r["engine"])
            off = {"minilm": (5, 5), "llama.cpp": (5, -12), "transformers": (-30, 8)}.get(r["engine"], (5, 5))
            ax.annotate(r["quant"], (x, y), textcoords="offset points", xytext=off, fontsize=8, color=c)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if use_kl and ys:
            pos = [y for y in ys if y > 0]
            ax.set_yscale("symlog", linthresh=(min(pos) / 2) if pos else 1e-6)
        ax.grid(alpha=0.3)
        if seen:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_child(spec: dict, work: Path, name: str) -> dict:
    sp, rp = work / f"{name}.spec.json", work / f"{name}.result.json"
    spec = dict(spec, result=str(rp), t_start=time.time())
    sp.write_text(json.dumps(spec))
    if rp.exists():
        rp.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "minilm.bench", "--child", str(sp)])
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if rp.exists():
        return json.loads(rp.read_text())
    q = spec.get("quant")
    if spec["engine"] == "llama.cpp":
        q = GGUF_TYPES.get(q, q).lower()
    why = f"exit code {rc}"
    if rc < 0:
        import signal
        try:
            why = f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            pass
    return {"engine": spec["engine"], "quant": q, "note": f"failed: process {why}"}


def run(args) -> int:
    import minilm
    from .config import Config
    from .loader import resolve
    from .tokenizer import Tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [q.strip() for q in args.quant.split(",") if q.strip()]
    for q in levels:
        if q not in LEVELS:
            raise ValueError(f"--quant {q}: unknown level (choose from {', '.join(LEVELS)})")
    peers = [p.strip() for p in (args.peers or "").split(",") if p.strip()]
    for p in peers:
        if p not in PEERS:
            raise ValueError(f"--peers {p}: unknown peer (choose from {', '.join(PEERS)})")
    for k in ("prompt_tokens", "new_tokens", "runs"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1")
    folder = resolve(args.model)
    cfg = Config.from_file(folder / "config.json")
    tok = Tokenizer(folder, cfg.bos_token_id, cfg.eos_token_ids)
    V = cfg.vocab_size
    max_pos = cfg.max_position_embeddings
    ctx = args.ctx or min(max_pos, 512)
    speed_len = args.prompt_tokens + args.new_tokens + 1
    if cfg.learned_pos and max(ctx, speed_len) > max_pos:
        raise ValueError(f"this model has {max_pos} learned positions: --ctx {ctx} / prompt+new "
                         f"{speed_len} must fit")
    n_ctx = max(ctx, speed_len)

    # quality text -> windows
    notes = []
    if args.text:
        text, text_name = Path(args.text).read_text(encoding="utf-8", errors="replace"), str(args.text)
    else:
        text, text_name = BUILTIN_TEXT, "built-in paragraph (pass --text FILE for a real measurement)"
    quality = None
    if args.quality_tokens > 0:
        ids = tok.encode(text[: args.quality_tokens * 16], add_special_tokens=False)
        n_bad = sum(1 for i in ids if i >= V)
        if n_bad:
            notes.append(f"{n_bad} text token ids >= vocab_size {V} dropped (tokenizer/model mismatch)")
            ids = [i for i in ids if i < V]
        bos = tok.bos_token_id if tok.bos_token_id is not None and tok.bos_token_id < V else None
        wins = windows(ids, ctx, args.quality_tokens, bos)
        if wins:
            quality = {"windows": wins, "positions": sum(len(w) - 1 for w in wins), "ctx": ctx}
    prompt_ids = speed_prompt(V, args.prompt_tokens)

    import numba
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    bar = _progress(total=1, desc="bandwidth", unit="probe")
    bwr = measure_bandwidth(threads=threads, size_mb=args.bw_size_mb, runs=5)
    bar.update(1)
    bar.close()
    bw = bwr["read_gbs"]
    meta = {"model": str(args.model), "model_folder": str(folder), "model_type": cfg.model_type,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "threads": threads, "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "minilm": minilm.__version__, "bandwidth": bwr,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
            "text": text_name, "ctx": ctx, "quality_tokens": args.quality_tokens,
            "quality_positions": quality["positions"] if quality else 0, "notes": notes,
            "reference": "f32", "complete": False}
    print(f"model {args.model} ({cfg.model_type}), {threads} threads, CPU {meta['cpu']}\n"
          f"read bandwidth {bw:.1f} GB/s (numba parallel sum, {args.bw_size_mb} MB, median of 5)\n"
          f"speed: {args.prompt_tokens}-token prompt + {args.new_tokens} decode steps, medians of {args.runs} runs; "
          f"quality: {meta['quality_positions']} positions of {text_name} in windows of {ctx}"
          + "".join(f"\nnote: {n}" for n in notes), file=sys.stderr)

    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="minilm-bench-"))
    base = {"model": str(folder), "threads": args.threads, "n_ctx": n_ctx, "prompt_ids": prompt_ids,
            "new_tokens": args.new_tokens, "runs": args.runs}
    if quality:
        base["quality"] = dict(quality, ref=str(tmp / "f32_logprobs.npy"))

    def save(complete=False):
        meta["complete"] = complete
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    order = (["f32"] if "f32" in levels else []) + [q for q in levels if q != "f32"]
    jobs = [("minilm", q) for q in order]
    jobs += [("llama.cpp", q) for q in order if q in GGUF_TYPES and "llama.cpp" in peers]
    if "llama.cpp" in peers and not any(q in GGUF_TYPES for q in order):
        jobs.append(("llama.cpp", "f32"))
    if "transformers" in peers:
        jobs.append(("transformers", "fp32"))
        if any(q.startswith("int8") for q in order):      # torch's own int8, where it runs
            jobs.append(("transformers", "int8-dynamic"))
    interrupted = False
    try:
        if quality and "f32" not in levels:      # the reference alone (not a row)
            print("computing the f32 reference for the quality columns", file=sys.stderr)
            r = _run_child(dict(base, engine="minilm", quant="f32", ref_only=True), tmp, "ref")
            if r.get("note"):
                raise RuntimeError(f"f32 reference failed: {r['note']}")
        f32_bpt = None
        params = None
        bpt = {}
        for engine, q in _progress(jobs, desc="levels", unit="level", leave=True):
            spec = dict(base, engine=engine, quant=q, tmp=str(tmp), f32_bytes_per_token=f32_bpt, params=params,
                        bytes_per_token=bpt.get(q))
            r = _derive(_run_child(spec, tmp, f"{engine}-{q}"), bw)
            if engine == "minilm" and q == "f32":
                f32_bpt = r.get("bytes_per_token")
            if engine == "minilm":
                params = params or r.get("params")
                bpt[q] = r.get("bytes_per_token")
            rows.append(r)
            save()
            print(f"{engine} {q}: " + (r["note"] if str(r.get("note", "")).startswith(("failed", "skipped"))
                                       else "done"), file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: keeping the rows measured so far", file=sys.stderr)
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    save(complete=not interrupted)
    title = (f"{Path(str(args.model)).name}: {threads} threads, {meta['cpu']}, read bw {bw:.1f} GB/s; "
             f"quality on {Path(text_name).name if args.text else 'built-in text'} ({meta['quality_positions']} tokens)")
    md = [f"### minilm bench: {args.model}", "",
          f"{meta['date']}, CPU {meta['cpu']} ({meta['cpu_count']} logical), {threads} threads, "
          f"read bandwidth {bw:.1f} GB/s; prompt {args.prompt_tokens} tokens, {args.new_tokens} decode steps, "
          f"median of {args.runs} runs (min-max); quality vs f32 over {meta['quality_positions']} positions of "
          f"{text_name}, windows of {ctx}." + (" **Interrupted: partial.**" if interrupted else ""), "",
          render_table(rows, markdown=True), ""]
    md += [f"note: {n}" for n in notes]
    (out / "results.md").write_text("\n".join(md) + "\n")
    written = [out / "results.json", out / "results.md"]
    try:
        plot(rows, out / "results.png", title)
        written.append(out / "results.png")
    except ImportError:
        print("matplotlib is not installed: no results.png (pip install 'minilm[plots]')", file=sys.stderr)
    print(render_table(rows))
    print("wrote " + ", ".join(str(p) for p in written))
    return 130 if interrupted else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2]))
    sys.exit("usage: minilm bench ... (python -m minilm.bench is the per-level worker)")
