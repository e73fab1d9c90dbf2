"""Pre-quantized model folders: `model.save(dir)` writes one, `minilm.load(dir)` maps it back.

Layout of the folder:
    config.json, tokenizer.json, tokenizer_config.json, generation_config.json   (copied)
    minilm.json                  {"format": "minilm", "format_version": 1, "quant", "group_size", "tensors"}
    model.minilm.safetensors     canonical tensors: matrices as "<name>.<array>" (e.g. "l0.wqkv.qs",
                                 "l0.wqkv.d"), everything else as "<name>" in f32; the same JSON in
                                 its __metadata__.
Loading memory-maps the file: nothing is requantized and the original weights are not read.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .errors import ModelLoadError
from .quant import Linear
from .safetensors_io import SafetensorsFile, save_file

FORMAT_VERSION = 1
MARKER = "minilm.json"
WEIGHTS = "model.minilm.safetensors"
COPY = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
        "special_tokens_map.json", "tokenizer.model"]


def is_prequantized(folder: Path) -> bool:
    return (folder / MARKER).exists()


def save(model, out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    src = Path(model.source)
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: cannot save over the folder the model was loaded from")
    out.mkdir(parents=True, exist_ok=True)
    tensors, info = {}, {}
    for name, t in model.tensors.items():
        if isinstance(t, Linear):
            if name == "output" and t is model.tensors["tok_embd"]:
                continue
            info[name] = {"fmt": t.fmt, "N": t.N, "K": t.K, "Kp": t.Kp, "arrays": list(t.arrays)}
            for k, a in t.arrays.items():
                tensors[f"{name}.{k}"] = a
        else:
            tensors[name] = np.ascontiguousarray(t, np.float32)
    meta = {"format": "minilm", "format_version": FORMAT_VERSION, "quant": model.quant,
            "group_size": model.group_size, "tensors": info}
    save_file(tensors, out / WEIGHTS, metadata={"minilm": json.dumps(meta)})
    (out / MARKER).write_text(json.dumps(meta, indent=1))
    for f in COPY:
        if (src / f).exists() and src.resolve() != out.resolve():
            shutil.copyfile(src / f, out / f)
    return out


def load_tensors(folder: Path) -> tuple[dict, dict]:
    """-> (canonical tensors with memory-mapped arrays, metadata)."""
    try:
        meta = json.loads((folder / MARKER).read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{folder / MARKER}: not valid JSON ({e})") from None
    v = meta.get("format_version")
    if meta.get("format") != "minilm" or not isinstance(v, int):
        raise ModelLoadError(f"{folder / MARKER}: not a minilm pre-quantized model description")
    if v > FORMAT_VERSION:
        raise ModelLoadError(f"{folder}: written by a newer minilm (format version {v}; this minilm "
                             f"reads up to {FORMAT_VERSION}): upgrade minilm or re-quantize the original checkpoint")
    f = SafetensorsFile(folder / WEIGHTS)
    tensors = {}
    info = meta["tensors"]
    for name, ti in info.items():
        try:
            arrays = {k: f.get(f"{name}.{k}") for k in ti["arrays"]}
        except KeyError as e:
            raise ModelLoadError(f"{folder / WEIGHTS}: tensor {e.args[0]!r} is missing") from None
        tensors[name] = Linear(ti["fmt"], ti["N"], ti["K"], arrays, ti["Kp"])
    for n in f.names:
        base = n.rsplit(".", 1)[0]
        if base not in info and n not in info:
            tensors[n] = f.get(n)
    return tensors, meta
