"""Engine adapters for `minilm bench`, each measured in its own process (see cli.py).

One small interface (timing.Steppable plus load / window_logits / describe / finish) for the
engines the bench drives token by token through timing.time_loop:

    MinilmEngine           minilm.load(...) at one quant level
    TransformersEngine     Hugging Face transformers fp32 (or torch dynamic int8) on torch CPU
    LlamaCppPythonEngine   llama-cpp-python at its defaults on the GGUF minilm exports

and llama.cpp's own `llama-bench` (built by benchmarks/build_llama_bench.sh), which times itself:
`run_llama_bench` runs it on the same GGUF and `parse_llama_bench_json` reads its samples. The
llama.cpp peer prefers llama-bench; where its default configuration crashes it tries the narrowest
switch (another cached build variant, e.g. one without AMX, then `--repack 0`) and the row names
what ran and what crashed. Each measure_* function returns one result row (a dict).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import quality, timing
from .common import GGUF_TYPES, calibrated, children_peak_rss_mb, gguf_type, parse_level, peak_rss_mb


# ---- helpers about a loaded minilm model -----------------------------------------------------------
def decode_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every matrix of the plan and the lm head."""
    return model.net.weight_bytes_per_token()


def count_params(tensors: dict) -> int:
    from ..quant import Linear
    seen, n = set(), 0
    for t in tensors.values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        n += t.N * t.K if isinstance(t, Linear) else int(np.size(t))
    return n


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of a GGUF file's tensors one decode step reads: every tensor except the token
    embedding when the file has a separate output.weight (a decode step reads one embedding row;
    a tied file's embedding is the lm head and is read whole)."""
    import gguf
    r = gguf.GGUFReader(str(path))
    names = {t.name for t in r.tensors}
    n = 0
    for t in r.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        n += int(t.n_bytes)
    return n


# ---- minilm ----------------------------------------------------------------------------------------
def _calibration(spec: dict):
    """The calibration text file of a LEVEL+imatrix row (None for the others)."""
    return spec.get("calibration") if calibrated(spec["quant"]) else None


class MinilmEngine:
    engine = "minilm"

    def __init__(self, spec: dict):
        self.spec = spec
        self.level, self.embed = parse_level(spec["quant"])

    def load(self) -> dict:
        import minilm
        kv = self.spec.get("kv_quant")
        row = {"engine": "minilm", "quant": self.spec["quant"], "kv_quant": kv or "f16", "version": minilm.__version__}
        t = time.perf_counter()
        if self.spec.get("folder"):                     # a pre-quantized folder saved by a prepare step
            self.model = minilm.load(self.spec["folder"], n_ctx=self.spec["n_ctx"], threads=self.spec["threads"],
                                     kv_quant=kv)
            row["loaded_from"] = "pre-quantized folder (model.save)"
        else:
            self.model = minilm.load(self.spec["model"], quant=None if self.level == "f32" else self.level,
                                     n_ctx=self.spec["n_ctx"], threads=self.spec["threads"],
                                     embed_quant=self.embed, kv_quant=kv, calibration=_calibration(self.spec))
        row["load_s"] = time.perf_counter() - t
        self.net = self.model.net
        self.V = self.model.config.vocab_size
        return row

    def reset(self) -> None:
        self.model.reset()

    def prefill(self, ids: list[int]) -> int:
        return int(np.argmax(self.net.prefill(ids)))    # logits f32[V] of the last position

    def decode(self, tok: int) -> int:
        return int(np.argmax(self.net.decode(tok)))

    def window_logits(self, ids: list[int]) -> np.ndarray:
        return self.model.logits(ids)                   # f32 [len(ids), V]

    def describe(self) -> dict:
        m = self.model
        return {"bytes_per_token": decode_bytes_per_token(m),
                "weights_mb": sum(getattr(x, "nbytes", 0) for x in {id(v): v for v in m.tensors.values()}.values()) / 1e6,
                "kv_cache_mb": self.net.cache.nbytes / 1e6, "params": count_params(m.tensors)}

    def finish(self, row: dict) -> dict:
        """File size of this level as a pre-quantized folder (after the RSS figure: saving allocates)."""
        from ..loader import resolve
        from ..prequant import WEIGHTS, is_prequantized
        src = Path(self.spec["folder"]) if self.spec.get("folder") else resolve(self.spec["model"])
        if is_prequantized(src):
            fb = (src / WEIGHTS).stat().st_size
        else:
            with tempfile.TemporaryDirectory(prefix="minilm-bench-size-", dir=self.spec.get("tmp")) as d:
                self.model.save(d)
                fb = (Path(d) / WEIGHTS).stat().st_size
        return {"file_bytes": fb, "bits_per_weight": 8 * fb / row["params"]}


def save_level(spec: dict) -> dict:
    """The prepare step of --from-saved: quantize the level and save it as a pre-quantized folder
    (its own process, so the measuring process loads it as a deployed model is loaded)."""
    import minilm
    level, emb = parse_level(spec["quant"])
    model = minilm.load(spec["model"], quant=None if level == "f32" else level, n_ctx=16,
                        threads=spec["threads"], embed_quant=emb, calibration=_calibration(spec))
    model.save(spec["folder"])
    return {"engine": "save", "quant": spec["quant"], "folder": spec["folder"]}


# ---- transformers ----------------------------------------------------------------------------------
class TransformersEngine:
    engine = "transformers"

    def __init__(self, spec: dict):
        self.spec = spec
        self.dynamic = spec.get("quant") == "int8-dynamic"      # torch.ao dynamic int8 Linear layers

    def load(self) -> dict:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        from ..loader import resolve
        self.torch = torch
        row = {"engine": "transformers", "quant": "int8-dynamic" if self.dynamic else "fp32",
               "version": f"transformers {transformers.__version__}, torch {torch.__version__}"}
        torch.set_num_threads(self.spec["threads"] or os.cpu_count())
        self.folder = resolve(self.spec["model"])
        t = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(self.folder), dtype=torch.float32)
        except TypeError:                                  # transformers < 4.56
            model = AutoModelForCausalLM.from_pretrained(str(self.folder), torch_dtype=torch.float32)
        model.eval()
        if self.dynamic:
            try:
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            except Exception as e:  # noqa: BLE001 - no quantized engine on this CPU/build, ...
                row["note"] = f"skipped: torch dynamic int8 does not run here ({type(e).__name__}: {e})"
                return row
        row["load_s"] = time.perf_counter() - t
        self.model = model
        self.V = model.config.vocab_size
        self.past = None
        return row

    def _step(self, ids: list[int]) -> int:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def reset(self) -> None:
        self.past = None

    def prefill(self, ids: list[int]) -> int:
        self.past = None
        return self._step(ids)

    def decode(self, tok: int) -> int:
        return self._step([tok])

    def window_logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.tensor([ids])).logits[0].float().numpy()   # f32 [T, V]

    def describe(self) -> dict:
        params = sum(p.numel() for p in self.model.parameters())
        if self.dynamic:      # quantized in memory from the f32 file: no file of its own, no byte count
            return {"params": params, "note": "torch.ao quantize_dynamic(nn.Linear, qint8) of the f32 checkpoint, in memory"}
        fb = sum(f.stat().st_size for f in self.folder.glob("*.safetensors"))
        return {"params": params, "file_bytes": fb, "bits_per_weight": 8 * fb / params,
                "bytes_per_token": self.spec.get("f32_bytes_per_token"),
                "note": "file: checkpoint safetensors as stored; GB/s from minilm f32 bytes/token"}

    def finish(self, row: dict) -> dict:
        return {}


# ---- llama.cpp through llama-cpp-python ------------------------------------------------------------
def _no_extra_bufts(llama_cpp) -> None:
    """Turn off llama.cpp's extra buffer types (AMX / repacked weights) in llama-cpp-python's
    default model params. Used only after the default configuration crashed in this row's first
    attempt (the row then says so): it also turns repacking off, a handicap."""
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


class LlamaCppPythonEngine:
    engine = "llama.cpp"

    def __init__(self, spec: dict, gguf: Path):
        self.spec, self.gguf = spec, gguf

    def load(self) -> dict:
        import llama_cpp
        self.llama_cpp = llama_cpp
        ver = getattr(llama_cpp, "__version__", "?")
        threads = self.spec["threads"] or os.cpu_count()
        n_ctx = max(self.spec["n_ctx"], 16)
        self.kw = dict(model_path=str(self.gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                       n_batch=min(512, n_ctx), verbose=False)
        handicap = bool(self.spec.get("no_extra_bufts"))
        if handicap:
            _no_extra_bufts(llama_cpp)
        cfg = (f"llama-cpp-python {ver} (installed build), "
               + ("use_extra_bufts=False: repacked weights OFF because the default crashed in a first attempt"
                  if handicap else "its defaults (extra buffer types / repacked weights on)")
               + f", {threads} threads, n_batch {self.kw['n_batch']}; timing: minilm bench loop over Llama.eval")
        t = time.perf_counter()
        self.llm = llama_cpp.Llama(logits_all=False, **self.kw)
        row = {"version": f"llama-cpp-python {ver}", "config": cfg, "load_s": time.perf_counter() - t}
        self.V = self.llm.n_vocab()
        return row

    def _last_argmax(self) -> int:   # logits of the last evaluated token (llm.scores only with logits_all)
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.V,))))

    def reset(self) -> None:
        self.llm.reset()

    def prefill(self, ids: list[int]) -> int:
        self.llm.eval(ids)
        return self._last_argmax()

    def decode(self, tok: int) -> int:
        self.llm.eval([tok])
        return self._last_argmax()

    def quality_scorer(self) -> Callable[[list[int]], np.ndarray]:
        del self.llm
        llm = self.llama_cpp.Llama(logits_all=True, **self.kw)

        def window_logits(w):
            llm.reset()
            llm.eval(w)
            return np.array(llm.scores[:len(w)])     # f32 [T, V]
        return window_logits


# ---- llama.cpp's own llama-bench -------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("MINILM_CACHE") or Path.home() / ".cache" / "minilm")


def _version_key(v: str):
    return tuple(int(x) if x.isdigit() else 0 for x in v.split("."))


def find_llama_bench(explicit: str | None = None) -> list[dict]:
    """llama-bench builds to try, best first: --llama-bench PATH / $MINILM_LLAMA_BENCH if given
    (only that one), else the builds of benchmarks/build_llama_bench.sh in the cache: the default
    variant of the newest llama-cpp-python version first, then its other variants."""
    path = explicit or os.environ.get("MINILM_LLAMA_BENCH")
    if path:
        p = Path(path).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise FileNotFoundError(f"--llama-bench {path}: no executable file there")
        info = {}
        if (p.parent.parent / "build-info.json").is_file():
            info = json.loads((p.parent.parent / "build-info.json").read_text())
        return [{"path": str(p), "info": info}]
    builds = []
    for d in cache_root().glob("llama.cpp-*"):
        b, bi = d / "bin" / "llama-bench", d / "build-info.json"
        if b.is_file() and os.access(b, os.X_OK) and bi.is_file():
            try:
                info = json.loads(bi.read_text())
            except (OSError, ValueError):
                continue
            builds.append({"path": str(b), "info": info})
    builds.sort(key=lambda b: (b["info"].get("variant", "default") != "default",
                               tuple(-x for x in _version_key(b["info"].get("llama_cpp_python", "0")))))
    return builds


def describe_build(build: dict) -> str:
    """'llama.cpp 0c1e570 (llama-cpp-python 0.3.36 sdist), build default: GGML_NATIVE=ON' or the path."""
    info = build.get("info") or {}
    if not info:
        return f"llama-bench at {build['path']}"
    flags = [a[2:] for a in info.get("cmake_args", []) if a.startswith("-DGGML_")]
    return (f"llama.cpp {str(info.get('llama_cpp_commit', '?'))[:7]} (llama-cpp-python {info.get('llama_cpp_python', '?')} "
            f"sdist), build '{info.get('variant', 'default')}': {' '.join(flags)}")


def parse_llama_bench_json(text: str, n_prompt: int, n_gen: int) -> dict:
    """llama-bench -o json output -> row fields. Per test it gives avg_ts / stddev_ts and the
    per-repetition samples_ts; the row's median and min-max are taken from samples_ts (so they mean
    what the other rows' do) and avg_ts / stddev_ts are kept as llama-bench reports them."""
    try:
        tests = json.loads(text)
    except ValueError as e:
        raise ValueError(f"llama-bench output is not JSON ({e}): {text[:200]!r}") from None
    if not isinstance(tests, list):
        raise ValueError(f"llama-bench JSON: expected a list of tests, got {type(tests).__name__}")
    pp = [t for t in tests if t.get("n_prompt") == n_prompt and t.get("n_gen") == 0]
    tg = [t for t in tests if t.get("n_gen") == n_gen and t.get("n_prompt") == 0]
    if not pp or not tg:
        raise ValueError(f"llama-bench JSON: no pp{n_prompt} and tg{n_gen} tests in "
                         f"{[(t.get('n_prompt'), t.get('n_gen')) for t in tests]}")
    pp, tg = pp[0], tg[0]
    row = {}
    for key, t in (("prefill", pp), ("decode", tg)):
        s = t.get("samples_ts") or []
        if not s:
            raise ValueError(f"llama-bench JSON: test {key} has no samples_ts")
        row.update(timing.summarize(s, key))
    pp_ns = pp.get("samples_ns") or []
    row["ttft_s"] = statistics.median(pp_ns) / 1e9 if pp_ns else n_prompt / row["prefill_tok_s"]
    row["llama_bench"] = {
        k: pp.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type", "model_size",
                               "model_n_params", "n_threads", "n_batch", "n_ubatch", "type_k", "flash_attn",
                               "use_mmap", "repack", "n_depth")}
    row["llama_bench"].update(pp_avg_ts=pp.get("avg_ts"), pp_stddev_ts=pp.get("stddev_ts"),
                              tg_avg_ts=tg.get("avg_ts"), tg_stddev_ts=tg.get("stddev_ts"),
                              repetitions=len(tg.get("samples_ts") or []), tg_n_depth=tg.get("n_depth"))
    return row


def _num(v) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else "?"


def run_llama_bench(build: dict, gguf: Path, n_prompt: int, n_gen: int, threads: int, runs: int,
                    extra: list[str], timeout_s: float) -> dict:
    """One llama-bench invocation. {'ok': True, 'fields': ..., 'cmd': ...} or {'ok': False, 'why': ...}."""
    cmd = [build["path"], "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
           "-r", str(runs), "-o", "json", *extra]
    shown = " ".join(["llama-bench", *cmd[1:]]).replace(str(gguf), gguf.name)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "cmd": shown, "why": f"no result within {timeout_s:.0f} s (killed)"}
    except OSError as e:
        return {"ok": False, "cmd": shown, "why": f"could not start ({e})"}
    if p.returncode != 0:
        if p.returncode < 0:
            import signal
            try:
                why = f"killed by {signal.Signals(-p.returncode).name}"
            except ValueError:
                why = f"killed by signal {-p.returncode}"
        else:
            why = f"exit code {p.returncode}"
        tail = " | ".join(l.strip() for l in p.stderr.strip().splitlines()[-3:])
        return {"ok": False, "cmd": shown, "why": why + (f" ({tail[:300]})" if tail else ""),
                "signal": p.returncode < 0}
    try:
        fields = parse_llama_bench_json(p.stdout, n_prompt, n_gen)
    except ValueError as e:
        return {"ok": False, "cmd": shown, "why": str(e)}
    return {"ok": True, "cmd": shown, "fields": fields}


def _llama_bench_attempts(builds: list[dict]) -> list[tuple[dict, list[str], str]]:
    """(build, extra args, what this configuration is) in the order tried: the first build at
    llama.cpp's defaults; then each other cached variant at its defaults (e.g. a build without
    AMX: repacked AVX-512 weights still on); last, the first build with --repack 0."""
    first = builds[0]
    out = [(first, [], "its defaults (repacked weights on)")]
    for b in builds[1:]:
        out.append((b, [], "its defaults (repacked weights on)"))
    out.append((first, ["--repack", "0"], "--repack 0: repacked weights OFF"))
    return out


# ---- one llama.cpp row -----------------------------------------------------------------------------
def export_gguf_for(spec: dict, d: Path) -> Path:
    from ..gguf_io import export_gguf
    from ..loader import resolve
    level, emb = parse_level(spec["quant"])
    if emb is not None:
        raise ValueError(f"{spec['quant']}: the GGUF export writes each level's default embedding format, "
                         "so there is no GGUF of this layout to compare with")
    path = d / f"model-{level}.gguf"
    try:
        export_gguf(str(resolve(spec["model"])), str(path), level, verbose=False)
    except TypeError:
        export_gguf(str(resolve(spec["model"])), str(path), level)
    return path


def measure_llamacpp(spec: dict, checkpoint: Callable[[dict], None]) -> dict:
    """llama.cpp on the GGUF of this level: llama-bench (its own timing) where a build is found,
    else llama-cpp-python through the timing loop; quality through llama-cpp-python when installed.
    checkpoint(row) stores the row so far (a crash in a later stage keeps it)."""
    q = spec["quant"]
    row = {"engine": "llama.cpp", "quant": gguf_type(q) or q}
    try:
        builds = find_llama_bench(spec.get("llama_bench"))
    except FileNotFoundError as e:
        row["note"] = f"failed: {e}"
        return row
    try:
        import llama_cpp  # noqa: F401
        have_py = True
    except ImportError:
        have_py = False
    if not builds and not have_py:
        row["note"] = ("skipped: no llama-bench (build it with benchmarks/build_llama_bench.sh, or pass "
                       "--llama-bench PATH) and llama-cpp-python is not installed")
        return row
    if parse_level(q)[0] not in GGUF_TYPES:
        row["note"] = f"skipped: {q} has no GGUF type"
        return row
    threads = spec["threads"] or os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="minilm-bench-gguf-", dir=spec.get("tmp")) as d:
        try:
            path = export_gguf_for(spec, Path(d))
        except Exception as e:  # noqa: BLE001 - any export failure is this row's note
            row["note"] = f"skipped: GGUF export as {q} failed ({type(e).__name__}: {e})"
            return row
        row["file_bytes"] = path.stat().st_size
        row["bytes_per_token"] = gguf_bytes_per_token(path)
        if spec.get("params"):
            row["params"] = spec["params"]
            row["bits_per_weight"] = 8 * row["file_bytes"] / spec["params"]
        n_prompt, n_gen = len(spec["prompt_ids"]), spec["new_tokens"]
        if builds:
            crashed = []
            for build, extra, what in _llama_bench_attempts(builds):
                r = run_llama_bench(build, path, n_prompt, n_gen, threads, spec["runs"], extra,
                                    timeout_s=spec.get("llama_bench_timeout", 1800))
                if r["ok"]:
                    f = r["fields"]
                    lb = f["llama_bench"]
                    row.update(f)
                    row["version"] = f"llama.cpp {lb.get('build_commit') or '?'} (llama-bench)"
                    row["config"] = (f"{describe_build(build)}; {what} (its JSON: repack {lb.get('repack')}, "
                                     f"{lb.get('n_threads')} threads, flash_attn {lb.get('flash_attn')}); "
                                     f"`{r['cmd']}`; timing: llama-bench's own "
                                     f"(median and min-max of its {lb['repetitions']} samples; its avg ± "
                                     f"stddev {_num(lb['tg_avg_ts'])} ± {_num(lb['tg_stddev_ts'])} tg tok/s "
                                     "in the JSON)")
                    if crashed:
                        row["config"] += "; NOT llama.cpp's default: " + "; ".join(crashed)
                    row["timing"] = "llama-bench"
                    row["peak_rss_mb"] = children_peak_rss_mb()
                    row["llama_bench_cmd"] = r["cmd"]
                    break
                crashed.append(f"{describe_build(build)} with {what} failed: {r['why']}")
                if not r.get("signal"):     # not a crash of a code path: a switch will not help
                    break
            if not row.get("decode_tok_s"):
                row["note"] = "failed: llama-bench: " + "; ".join(crashed)
                return row
            row["note"] = (f"decode = llama-bench tg{n_gen} (from an empty context; minilm decodes after the "
                           f"{n_prompt}-token prompt), prefill = pp{n_prompt}; GB/s from the GGUF's bytes/token; "
                           "peak RSS of the llama-bench process")
        else:
            row["stage"] = "llama-cpp-python defaults" if not spec.get("no_extra_bufts") else "llama-cpp-python no_extra_bufts"
            checkpoint(row)                  # a SIGILL kills this process: the parent retries, then says so
            eng = LlamaCppPythonEngine(spec, path)
            row.update(eng.load())
            ids = [i % eng.V for i in spec["prompt_ids"]]
            row["start_to_first_token_s"] = timing.first_token(eng, ids, spec["t_start"])
            row.update(timing.time_loop(eng, ids, n_gen, spec["runs"], desc=f"llama.cpp {q} speed"))
            row["peak_rss_mb"] = peak_rss_mb()
            row.pop("stage")
            row["note"] = "GB/s from the GGUF's bytes/token"
        row["decode_gb_s"] = timing.gb_s(row["bytes_per_token"], row["decode_tok_s"])
        qs = spec.get("quality")
        if qs and Path(qs["ref"]).exists():
            if not have_py:
                row["note"] += "; no quality columns: they need llama-cpp-python (not installed)"
            else:
                row["stage"] = "llama-cpp-python quality"
                checkpoint(row)
                eng = LlamaCppPythonEngine(dict(spec), path)
                eng.load()
                row.update(quality.score(eng.quality_scorer(), qs, eng.V, desc=f"llama.cpp {q} quality"))
                row.pop("stage")
                if builds:
                    row["note"] += "; quality columns from llama-cpp-python at its defaults on the same GGUF"
    return row


# ---- one minilm / transformers row ----------------------------------------------------------------
def measure_driven(engine, spec: dict) -> dict:
    """An engine the bench drives itself: load, first token, the timing loop, quality, file size."""
    row = engine.load()
    if str(row.get("note", "")).startswith("skipped"):
        return row
    V = engine.V
    ids = [i % V for i in spec["prompt_ids"]]
    if not spec.get("ref_only"):
        row["start_to_first_token_s"] = timing.first_token(engine, ids, spec["t_start"])
        row.update(timing.time_loop(engine, ids, spec["new_tokens"], spec["runs"],
                                    desc=f"{engine.engine} {spec['quant']} speed"))
        row["peak_rss_mb"] = peak_rss_mb()
        row.update(engine.describe())
        row["decode_gb_s"] = timing.gb_s(row.get("bytes_per_token"), row["decode_tok_s"])
        if engine.engine == "minilm" and spec.get("spec_prompts"):
            row.update(timing.speculation(engine.model, {k: [i % V for i in v] for k, v in spec["spec_prompts"].items()},
                                          spec["new_tokens"], spec["runs"]))
    qs = spec.get("quality")
    if qs and (engine.engine == "minilm" or Path(qs["ref"]).exists()):
        row.update(quality.score(engine.window_logits, qs, V, desc=f"{engine.engine} {spec['quant']} quality"))
    if not spec.get("ref_only"):
        row.update(engine.finish(row))
    return row


def measure(spec: dict, checkpoint: Callable[[dict], None]) -> dict:
    """One result row for spec['engine'] (run in the child process)."""
    e = spec["engine"]
    if e == "minilm":
        return measure_driven(MinilmEngine(spec), spec)
    if e == "save":
        return save_level(spec)
    if e == "transformers":
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as err:
            return {"engine": "transformers", "quant": spec.get("quant"),
                    "note": f"skipped: {err} (pip install torch==2.13.0 transformers; see benchmarks/README.md)"}
        return measure_driven(TransformersEngine(spec), spec)
    if e == "llama.cpp":
        return measure_llamacpp(spec, checkpoint)
    raise ValueError(f"unknown engine {e!r}")
