"""`minilm.load`: a local folder, a hub id, or a hub-cache snapshot -> a ready `LM`."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .config import Config
from .errors import ModelLoadError
from .quant import Linear
from .weights import CheckpointReader, iter_canonical

MATRICES = re.compile(r"^(tok_embd|output|l\d+\.(wqkv|wo|w_gate_up|w_up|w_down))$")
DEFAULT_CTX = 4096
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


def read_generation_config(folder: Path) -> dict:
    p = folder / "generation_config.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{p}: not valid JSON ({e})") from None


def load(path_or_id, quant: str | None = None, n_ctx: int | None = None, threads: int | None = None,
         group_size: int | None = None, embed_quant: str | None = None):
    """Load a Hugging Face checkpoint (config.json + tokenizer.json + *.safetensors).

    quant: None/'f32' keeps float32 weights (16-bit checkpoints are converted); 'f16', 'bf16'
        (16-bit storage, f32 compute), 'int8' (ggml Q8_0), 'int4' (ggml Q4_0; embeddings and lm
        head stay int8), 'int4-g64', 'int4-g128'. A pre-quantized folder (model.save) loads as saved.
    group_size: int4 group size (32, 64, 128); embed_quant: format of embedding / lm head.
    n_ctx: KV cache length (default min(max_position_embeddings, 4096));
    threads: Numba threads for the kernels (default: all cores).
    """
    from .lm import LM
    from .tokenizer import Tokenizer

    if threads is not None:
        import numba
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r}: must be a positive integer")
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if str(path_or_id).lower().endswith(".gguf") and Path(os.path.expanduser(str(path_or_id))).is_file():
        from .gguf_io import load_gguf                     # a single llama.cpp GGUF file
        return load_gguf(os.path.expanduser(str(path_or_id)), quant=quant, n_ctx=n_ctx)
    folder = resolve(path_or_id)
    cfg = Config.from_file(folder / "config.json")
    gen = read_generation_config(folder)
    eos = gen.get("eos_token_id")
    for e in (eos if isinstance(eos, list) else [eos]):
        if e is not None and int(e) not in cfg.eos_token_ids:
            cfg.eos_token_ids.append(int(e))
    if n_ctx is None:
        n_ctx = min(cfg.max_position_embeddings, DEFAULT_CTX)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx={n_ctx!r}: must be a positive integer")
    if cfg.learned_pos and n_ctx > cfg.max_position_embeddings:
        raise ValueError(f"n_ctx={n_ctx} exceeds this model's {cfg.max_position_embeddings} learned positions")
    from . import prequant
    from .quant import parse_level

    if prequant.is_prequantized(folder):
        tensors, meta = prequant.load_tensors(folder)
        if quant not in (None, meta["quant"]):
            raise ValueError(f"quant={quant!r}: {folder} is already quantized as {meta['quant']}; "
                             "load the original checkpoint to quantize it differently")
        level, group = meta["quant"], meta["group_size"]
    else:
        mat_fmt, emb_fmt, group = parse_level(quant, group_size, embed_quant)
        level = quant or "f32"
        reader = CheckpointReader(folder)
        tensors = {}
        for name, get in iter_canonical(reader, cfg):      # one tensor at a time: streaming
            a = get()
            if MATRICES.match(name):
                fmt = emb_fmt if name in ("tok_embd", "output") else mat_fmt
                tensors[name] = Linear.quantize(a, fmt, group, name=name)
            else:
                tensors[name] = np.ascontiguousarray(a, dtype=np.float32)
            del a
    tok = Tokenizer(folder, cfg.bos_token_id, cfg.eos_token_ids)
    return LM(cfg, tensors, tok, n_ctx=n_ctx, source=str(folder), quant=level, group_size=group)
