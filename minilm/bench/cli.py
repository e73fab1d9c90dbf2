"""`minilm bench` orchestration: validate the arguments, measure the bandwidth once, run every
(engine, level) in its own process (`python -m minilm.bench --child SPEC`, so load time and peak RSS
are that row's alone), and write the report after every row."""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import report
from .common import (
    GGUF_TYPES,
    PEERS,
    calibrated,
    cpu_name,
    expand_levels,
    gguf_type,
    measure_bandwidth,
    parse_level,
    progress,
    speed_prompt,
    split_kv,
)

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


# ---- the child process ------------------------------------------------------------------------------
def child(spec_path: str) -> int:
    """Measure one row (python -m minilm.bench --child SPEC); the row goes to spec['result']."""
    from .engines import measure
    spec = json.loads(Path(spec_path).read_text())
    result = Path(spec["result"])

    def checkpoint(row: dict) -> None:        # the row so far, kept if a later stage kills the process
        result.write_text(json.dumps(row))

    try:
        row = measure(spec, checkpoint)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a failed row is a row with a note, the run goes on
        import traceback
        traceback.print_exc()
        row = {"engine": spec["engine"], "quant": spec.get("quant"), "note": f"failed: {type(e).__name__}: {e}"}
    result.write_text(json.dumps(row))
    return 0


def _signal_name(rc: int) -> str:
    if rc >= 0:
        return f"exit code {rc}"
    try:
        return f"killed by {signal.Signals(-rc).name}"
    except ValueError:
        return f"killed by signal {-rc}"


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
    row = json.loads(rp.read_text()) if rp.exists() else None
    if rc == 0 and row is not None:
        return row
    why = _signal_name(rc)
    if row is None:
        q = spec.get("quant")
        if spec["engine"] == "llama.cpp":
            q = gguf_type(q) or q
        return {"engine": spec["engine"], "quant": q, "note": f"failed: process {why}"}
    stage = row.pop("stage", None)
    if stage == "llama-cpp-python defaults" and rc < 0:
        # llama.cpp's default (extra buffer types: AMX / repacked weights) crashed this process: run
        # again with them off, and say so in the row
        retry = _run_child(dict(spec, no_extra_bufts=True), work, name + "-no-extra-bufts")
        retry["note"] = (f"llama-cpp-python at its defaults {why}; this row ran with use_extra_bufts=False "
                         "(repacked weights off)" + (f"; {retry['note']}" if retry.get("note") else ""))
        return retry
    if stage and row.get("decode_tok_s"):        # the speed columns were measured, a later stage died
        row["note"] = (row.get("note", "") + f"; {stage} failed: process {why}").lstrip("; ")
        return row
    return {"engine": row.get("engine", spec["engine"]), "quant": row.get("quant"),
            "note": f"failed: process {why}" + (f" during {stage}" if stage else "")}


# ---- the parent -------------------------------------------------------------------------------------
def _jobs(levels: list[str], peers: list[str], from_saved: bool,
          kvs: tuple[str, ...] = ("f16",)) -> list[tuple[str, str, str | None]]:
    """(engine, level, KV storage type of a minilm row) in run order: f32 weights with an f32 KV
    cache first when asked for (that row writes the quality reference). A level written
    LEVEL:kv=TYPE runs once, with that KV type; the others once per type of `kvs`."""
    order = (["f32"] if "f32" in levels else []) + [q for q in levels if q != "f32"]
    kvs = (["f32"] if "f32" in kvs else []) + [k for k in kvs if k != "f32"]
    jobs, saving = [], set()
    for spec in order:
        q, own_kv = split_kv(spec)
        if from_saved and q != "f32" and q not in saving:
            jobs.append(("save", q, None))
            saving.add(q)
        jobs += [("minilm", q, kv) for kv in ([own_kv] if own_kv else kvs)]
    if "llama.cpp" in peers:
        gg = list(dict.fromkeys(q for q, _ in map(split_kv, order)
                                if parse_level(q)[0] in GGUF_TYPES and not calibrated(q)))
        jobs += [("llama.cpp", q, None) for q in (gg or ["f32"])]
    if "transformers" in peers:
        jobs.append(("transformers", "fp32", None))
        if any(parse_level(q)[0] == "int8" for q in order):      # torch's own int8, where it runs
            jobs.append(("transformers", "int8-dynamic", None))
    return jobs


def run(args) -> int:
    import minilm

    from ..cache import check_kv_quant
    from ..config import Config
    from ..loader import resolve
    from ..tokenizer import Tokenizer

    calibration = getattr(args, "calibration", None)
    levels = expand_levels([q.strip() for q in args.quant.split(",") if q.strip()], calibration)
    if not levels:
        raise ValueError("--quant: no level given")

    def kv_type(k: str, where: str) -> str:
        try:
            return check_kv_quant(k)
        except ValueError:
            raise ValueError(f"{where}: not a KV cache type (choose from f16, q8_0, f32)") from None

    for q in levels:
        level, kv = split_kv(q)
        parse_level(level)                             # raises, naming the bad level
        if kv is not None:
            kv_type(kv, f"--quant {q}")
    kvs = [kv_type(k.strip(), f"--kv-quant {k.strip()}")
           for k in (getattr(args, "kv_quant", None) or "f16").split(",") if k.strip()]
    if not kvs:
        raise ValueError("--kv-quant: no KV cache type given")
    if any(calibrated(split_kv(q)[0]) for q in levels):
        if not calibration:
            raise ValueError(f"--quant {','.join(q for q in levels if calibrated(split_kv(q)[0]))}: calibrated levels need "
                             "--calibration FILE (a text distinct from --text)")
        if not Path(calibration).is_file():
            raise ValueError(f"--calibration {calibration}: file not found")
    peers = [p.strip() for p in (args.peers or "").split(",") if p.strip()]
    for p in peers:
        if p not in PEERS:
            raise ValueError(f"--peers {p}: unknown peer (choose from {', '.join(PEERS)})")
    for k in ("prompt_tokens", "new_tokens", "runs"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1")
    if args.quality_tokens < 0:
        raise ValueError("--quality-tokens must be >= 0")
    if args.bw_size_mb < 1:
        raise ValueError("--bw-size-mb must be >= 1")
    llama_bench = getattr(args, "llama_bench", None)
    if llama_bench and not (Path(llama_bench).is_file() and os.access(llama_bench, os.X_OK)):
        raise ValueError(f"--llama-bench {llama_bench}: no executable file there")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = resolve(args.model)
    cfg = Config.from_file(folder / "config.json")
    tok = Tokenizer(folder, cfg.bos_token_id, cfg.eos_token_ids)
    V = cfg.vocab_size
    max_pos = cfg.max_position_embeddings
    ctx = args.ctx or min(max_pos, 512)
    speed_len = max(args.prompt_tokens, 32) + 16 + args.new_tokens + 2   # the grounded speculative prompt
    if cfg.learned_pos and max(ctx, speed_len) > max_pos:
        raise ValueError(f"this model has {max_pos} learned positions: --ctx {ctx} / prompt+new "
                         f"{speed_len} must fit")
    n_ctx = max(ctx, speed_len)

    # quality text -> windows
    notes = []
    if "all" in args.quant.split(",") and not calibration:
        notes.append("--quant all without --calibration: no LEVEL+imatrix rows")
    if args.text:
        text, text_name = Path(args.text).read_text(encoding="utf-8", errors="replace"), str(args.text)
    else:
        text, text_name = BUILTIN_TEXT, "built-in paragraph (pass --text FILE for a real measurement)"
    qual = None
    if args.quality_tokens > 0:
        from .quality import windows
        ids = tok.encode(text[: args.quality_tokens * 16], add_special_tokens=False)
        n_bad = sum(1 for i in ids if i >= V)
        if n_bad:
            notes.append(f"{n_bad} text token ids >= vocab_size {V} dropped (tokenizer/model mismatch)")
            ids = [i for i in ids if i < V]
        bos = tok.bos_token_id if tok.bos_token_id is not None and tok.bos_token_id < V else None
        wins = windows(ids, ctx, args.quality_tokens, bos)
        if wins:
            qual = {"windows": wins, "positions": sum(len(w) - 1 for w in wins), "ctx": ctx}
    prompt_ids = speed_prompt(V, args.prompt_tokens)
    # speculative decoding columns: a grounded prompt (a passage of the text, then its start
    # again: the continuation can copy it) and a free one (the text's start alone)
    n_pass = max(args.prompt_tokens, 32)
    passage = [i for i in tok.encode(text[:n_pass * 16], add_special_tokens=False) if i < V][:n_pass]
    spec_prompts = {"grounded": passage + passage[:16], "free": passage[:16]} if len(passage) >= 32 else None
    if spec_prompts is None:
        notes.append("the text gives fewer than 32 tokens: no speculative decoding columns")

    import numba
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    bar = progress(total=1, desc="bandwidth", unit="probe")
    bwr = measure_bandwidth(threads=threads, size_mb=args.bw_size_mb, runs=5)
    bar.update(1)
    bar.close()
    bw = bwr["read_gbs"]
    meta = {"model": str(args.model), "model_folder": str(folder), "model_type": cfg.model_type,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "threads": threads, "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "minilm": minilm.__version__, "bandwidth": bwr,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
            "text": text_name, "calibration": str(calibration) if calibration else None, "ctx": ctx, "quality_tokens": args.quality_tokens,
            "quality_positions": qual["positions"] if qual else 0, "notes": notes,
            "from_saved": bool(getattr(args, "from_saved", False)), "reference": "f32 weights, f32 KV cache",
            "kv_quants": kvs, "complete": False}
    print(f"model {args.model} ({cfg.model_type}), {threads} threads, CPU {meta['cpu']}\n"
          f"read bandwidth {bw:.1f} GB/s (numba parallel sum, {args.bw_size_mb} MB, median of 5)\n"
          f"speed: {args.prompt_tokens}-token prompt + {args.new_tokens} decode steps, medians of {args.runs} runs; "
          f"quality: {meta['quality_positions']} positions of {text_name} in windows of {ctx}"
          + "".join(f"\nnote: {n}" for n in notes), file=sys.stderr)

    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="minilm-bench-"))
    base = {"model": str(folder), "threads": args.threads, "n_ctx": n_ctx, "prompt_ids": prompt_ids,
            "new_tokens": args.new_tokens, "runs": args.runs, "llama_bench": llama_bench,
            "spec_prompts": spec_prompts, "calibration": str(calibration) if calibration else None}
    if qual:
        base["quality"] = dict(qual, ref=str(tmp / "f32_logprobs.npy"))

    jobs = _jobs(levels, peers, meta["from_saved"], tuple(kvs))
    interrupted = False
    try:
        if qual and not any(e == "minilm" and q == "f32" and kv == "f32" for e, q, kv in jobs):
            # the reference alone (not a row)
            print("computing the f32 reference for the quality columns", file=sys.stderr)
            r = _run_child(dict(base, engine="minilm", quant="f32", kv_quant="f32", ref_only=True), tmp, "ref")
            if r.get("note"):
                raise RuntimeError(f"f32 reference failed: {r['note']}")
        f32_bpt, params, saved = None, None, {}
        for engine, q, kv in progress(jobs, desc="levels", unit="level", leave=True):
            spec = dict(base, engine=engine, quant=q, kv_quant=kv, tmp=str(tmp), f32_bytes_per_token=f32_bpt,
                        params=params)
            if engine == "save":
                d = tmp / f"saved-{q}"
                r = _run_child(dict(spec, folder=str(d)), tmp, f"save-{q}")
                if r.get("note"):
                    rows.append(dict(r, engine="minilm"))
                    report.write_json(out, meta, rows)
                else:
                    saved[q] = str(d)
                continue
            if engine == "minilm" and meta["from_saved"] and q != "f32":
                if q not in saved:
                    continue                     # its save step failed: that row says why
                spec["folder"] = saved[q]
            r = report.derive(_run_child(spec, tmp, f"{engine}-{q}" + (f"-kv{kv}" if kv else "")), bw)
            if engine == "minilm" and q == "f32":
                f32_bpt = r.get("bytes_per_token")
            if engine == "minilm":
                params = params or r.get("params")
            rows.append(r)
            report.write_json(out, meta, rows)
            print(f"{engine} {q}" + (f" (KV {kv})" if kv else "") + ": " + (r["note"] if str(r.get("note", "")).startswith(("failed", "skipped"))
                                       else "done"), file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: keeping the rows measured so far", file=sys.stderr)
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    meta["complete"] = not interrupted
    meta["side_by_side"] = report.side_by_side(rows)
    written = [report.write_json(out, meta, rows), report.write_markdown(out, meta, rows, interrupted)]
    title = (f"{Path(str(args.model)).name}: {threads} threads, {meta['cpu']}, read bw {bw:.1f} GB/s; "
             f"quality on {Path(text_name).name if args.text else 'built-in text'} ({meta['quality_positions']} tokens)")
    try:
        report.plot(rows, out / "results.png", title)
        written.append(out / "results.png")
    except ImportError:
        print("matplotlib is not installed: no results.png (pip install 'minilm[plots]')", file=sys.stderr)
    print(report.render_table(rows))
    sbs = report.render_side_by_side(report.side_by_side(rows))
    if sbs:
        print("\nminilm / llama.cpp (medians):\n" + sbs)
    print("wrote " + ", ".join(str(p) for p in written))
    return 130 if interrupted else 0
