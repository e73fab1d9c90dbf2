"""Importance-weighted quantization from a calibration text (llama.cpp's imatrix, in minilm).

    collect_imatrix(model, text)   run the float model over the text in chunks (each from position
                                   0, as llama-imatrix does) with the plan's `stats` steps
                                   (plan.with_stats: every matmul input adds its column sums of
                                   x^2; the lm head's input is summed here from the final-normed
                                   rows) -> {matrix name: f32[K] mean of x^2 per input column}
    quantize_model(model, quant, imatrix)   the model's float matrices quantized to `quant` (a
                                   level or a mix preset) with those weights as every format's qw
    save_imatrix / load_imatrix    a safetensors file of the vectors (canonical matrix names)

A tied embedding takes the lm head's statistics (the matrix is the head's); an untied token
embedding is a lookup table (no matmul input) and is quantized unweighted, as llama.cpp does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import ModelLoadError

CHUNK = 512           # tokens per calibration chunk (llama-imatrix's default context)
MAX_TOKENS = 8192     # tokens read from the text at most


def calibration_text(text_or_path) -> str:
    """A calibration text: a path to a UTF-8 text file, or the text itself (a str that is not
    an existing file). Errors name the file."""
    if isinstance(text_or_path, os.PathLike) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                                 and len(text_or_path) < 4096 and Path(text_or_path).is_file()):
        p = Path(text_or_path)
        if not p.is_file():
            raise ValueError(f"calibration file {p}: not found")
        try:
            return p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"calibration file {p}: cannot be read as UTF-8 text ({e})") from None
    if not isinstance(text_or_path, str):
        raise ValueError(f"calibration={text_or_path!r}: must be a text or a path to a text file")
    return text_or_path


def collect_imatrix(model, text: str, max_tokens: int = MAX_TOKENS, chunk: int = CHUNK) -> dict:
    """{canonical matrix name: f32[K] mean of x^2 over the calibration tokens} for every matrix
    of the float `model` (an `LM`) run over `text` (see the module docstring)."""
    from .model import Transformer
    ids = model.tokenizer.encode(text)[:max_tokens]
    chunk = min(chunk, model.config.max_position_embeddings)
    if len(ids) < 2:
        raise ValueError(f"calibration text gives {len(ids)} token(s); it needs at least 2 (use a longer text)")
    net = Transformer(model.config, model.tensors, min(chunk, len(ids)), stats=True)
    D = model.config.hidden_size
    head = np.zeros(D, np.float64)
    for a in range(0, len(ids), chunk):
        part = np.asarray(ids[a:a + chunk], np.int64)
        net.cache.reset()
        for b in range(0, len(part), net.state.rows):
            h = net.forward(part[b:b + net.state.rows], len(part))   # [rows, D], final-normed
            head += (h.astype(np.float64) ** 2).sum(0)                # the lm head's input
    n = float(len(ids))
    out = {name: (v / n).astype(np.float32) for name, v in net.stats.items()}
    head_name = "output" if "output" in model.tensors else "tok_embd"
    out[head_name] = (head / n).astype(np.float32)
    return out


def quantize_model(model, quant: str | None, imatrix: dict | None, n_ctx: int | None = None,
                   group_size: int | None = None, embed_quant: str | None = None):
    """A new `LM`: the float `model`'s tensors in the formats of `quant`, each matrix quantized
    with its imatrix vector as importance weights (None: unweighted)."""
    from .loader import build_lm
    from .quant import Linear
    from .sources import convert, level_target
    cfg = model.config
    for name, t in model.tensors.items():
        if isinstance(t, Linear) and t.fmt not in ("f32", "f16", "bf16"):
            raise ValueError(f"calibration needs a float model: tensor {name} is {t.fmt}; "
                             "calibrate the original checkpoint")
    target = level_target(cfg, quant, group_size, embed_quant)
    imatrix = imatrix or {}
    tensors = {}
    for name, t in model.tensors.items():
        tensors[name] = convert(t, name, target.fmt(name), target.group, model.source, qw=imatrix.get(name))
    return build_lm(cfg, tensors, model.tokenizer, n_ctx or model.n_ctx, source=model.source,
                    quant=target.level, group_size=target.group)


def save_imatrix(imatrix: dict, path, n_tokens: int | None = None) -> Path:
    """Write the vectors as a safetensors file (metadata: minilm.imatrix, tokens)."""
    from .safetensors_io import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"minilm.imatrix": json.dumps({"version": 1, "tokens": n_tokens})}
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in imatrix.items()}, path, metadata=meta)
    return path


def load_imatrix(path, cfg) -> dict:
    """Read an imatrix file written by `save_imatrix`, checked against the model `cfg`: every
    vector names a matrix of the model, has its input width, finite values >= 0."""
    from .safetensors_io import SafetensorsFile
    from .weights import canonical_shapes, is_matrix
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"imatrix file {path}: not found")
    try:
        f = SafetensorsFile(path)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a file that is no safetensors at all
        raise ModelLoadError(f"imatrix file {path}: not a minilm imatrix (safetensors) file ({e})") from None
    shapes = canonical_shapes(cfg)
    out = {}
    for name in f.names:
        if name not in shapes or not is_matrix(name):
            raise ModelLoadError(f"imatrix file {path}: vector {name!r} names no matrix of this model "
                                 f"({cfg.model_type}, {cfg.n_layers} layers)")
        K = shapes[name][1]
        if f.dtype(name) != "F32" or tuple(f.shape(name)) != (K,):
            raise ModelLoadError(f"imatrix file {path}: vector {name!r} is {f.dtype(name)}{list(f.shape(name))}, "
                                 f"expected F32[{K}] (the matrix's input width)")
        v = np.asarray(f.get(name), np.float32)
        if not np.isfinite(v).all() or (v < 0).any():
            raise ModelLoadError(f"imatrix file {path}: vector {name!r} has values that are not finite and >= 0")
        out[name] = v
    return out
