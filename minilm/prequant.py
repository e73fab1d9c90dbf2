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
from .jsonfile import read_json_object
from .quant import FORMATS, Linear
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


# format -> arrays of a Linear: (name, safetensors dtype, shape from (N, Kp, group))
def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_meta(folder: Path) -> dict:
    """minilm.json, checked: an object with format, format_version, a known quant label, a group
    size and a `tensors` object of {fmt, N, K, Kp, arrays} entries."""
    from .mixes import PRESETS
    from .quant import LEVELS, is_level
    path = folder / MARKER
    meta = read_json_object(path)
    v = meta.get("format_version")
    if meta.get("format") != "minilm" or not _int(v):
        raise ModelLoadError(f"{path}: not a minilm pre-quantized model description "
                             "(needs \"format\": \"minilm\" and an integer \"format_version\")")
    if v > FORMAT_VERSION:
        raise ModelLoadError(f"{folder}: written by a newer minilm (format version {v}; this minilm "
                             f"reads up to {FORMAT_VERSION}): upgrade minilm or re-quantize the original checkpoint")
    if v < 1:
        raise ModelLoadError(f"{path}: format_version {v} is not valid")
    q = meta.get("quant")
    if not is_level(q):
        raise ModelLoadError(f"{path}: quant {q!r} is not a known quantization level "
                             f"(known: {', '.join(LEVELS)}, {', '.join(PRESETS)})")
    g = meta.get("group_size")
    if not _int(g) or g not in (32, 64, 128):
        raise ModelLoadError(f"{path}: group_size {g!r} must be 32, 64 or 128")
    info = meta.get("tensors")
    if not isinstance(info, dict):
        raise ModelLoadError(f"{path}: \"tensors\" must be an object (tensor name -> format), "
                             f"got {type(info).__name__}")
    for name, ti in info.items():
        where = f"{path}: tensors[{name!r}]"
        if not isinstance(ti, dict):
            raise ModelLoadError(f"{where}: must be an object with fmt, N, K, Kp, arrays")
        fmt = ti.get("fmt")
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise ModelLoadError(f"{where}: unknown tensor format {fmt!r} (known: {', '.join(FORMATS)})")
        for k in ("N", "K", "Kp"):
            if not _int(ti.get(k)) or ti[k] < 1:
                raise ModelLoadError(f"{where}: {k}={ti.get(k)!r} must be a positive integer")
        want = list(FORMATS[fmt].arrays)
        if not isinstance(ti.get("arrays"), list) or sorted(ti["arrays"]) != sorted(want):
            raise ModelLoadError(f"{where}: arrays={ti.get('arrays')!r}, expected {want} for format {fmt}")
    return meta


def load_tensors(folder: Path, cfg=None, check_weights: bool = True) -> tuple[dict, dict]:
    """-> (canonical tensors with memory-mapped arrays, metadata): `plan_tensors` then every
    tensor of `iter_tensors`."""
    meta = read_meta(folder)
    plan = plan_tensors(folder, cfg, meta)
    return {name: get() for name, get in iter_tensors(plan, check_weights)}, meta


def plan_tensors(folder: Path, cfg=None, meta: dict | None = None) -> tuple:
    """Check the folder's tensors from the headers alone, before any array is mapped -> a plan
    for `iter_tensors`.

    With `cfg` (the folder's Config), every tensor the config implies must be present with the
    dtype and shape its format implies (q8_0 `qs` int8[N, Kp] and `d` f16[N, Kp/32]; q4_0 `qs`
    uint8[N, Kp/2] and `d` f16[N, Kp/G]; f32/f16 `w`; bf16 `w` uint16; vectors f32), and nothing
    else."""
    from .weights import canonical_shapes, is_matrix
    meta = read_meta(folder) if meta is None else meta
    info = meta["tensors"]
    f = SafetensorsFile(folder / WEIGHTS)
    path = f.path

    def need(name, dt, shape):
        if name not in f:
            raise ModelLoadError(f"{path}: tensor {name!r} is missing")
        if f.dtype(name) != dt or tuple(f.shape(name)) != tuple(shape):
            raise ModelLoadError(f"{path}: tensor {name!r} is {f.dtype(name)}{list(f.shape(name))}, "
                                 f"expected {dt}{list(shape)}")

    expect = canonical_shapes(cfg) if cfg is not None else None
    plan = {}                                   # name -> ("linear", fmt, N, K, Kp, G) | ("vec", shape)
    names = expect if expect is not None else {**{n: None for n in info},
                                               **{n: None for n in f.names if n.rsplit(".", 1)[0] not in info}}
    for name, shape in names.items():
        if expect is not None and is_matrix(name):
            ti = info.get(name)
            if ti is None:
                raise ModelLoadError(f"{folder / MARKER}: tensor {name!r} (shape {list(shape)} from "
                                     "config.json) is missing from \"tensors\"")
            fmt, N, K, Kp = ti["fmt"], ti["N"], ti["K"], ti["Kp"]
            if (N, K) != tuple(shape):
                raise ModelLoadError(f"{folder / MARKER}: tensor {name!r} is [{N}, {K}], expected "
                                     f"{list(shape)} from config.json")
        elif name in info:
            ti = info[name]
            fmt, N, K, Kp = ti["fmt"], ti["N"], ti["K"], ti["Kp"]
        else:
            if expect is not None:
                need(name, "F32", shape)
            elif name not in f:
                raise ModelLoadError(f"{path}: tensor {name!r} is missing")
            plan[name] = ("vec",)
            continue
        blk = FORMATS[fmt].block
        G = 32
        if fmt == "q4_0":
            dn = f"{name}.d"
            G = Kp // f.shape(dn)[1] if dn in f and len(f.shape(dn)) == 2 and f.shape(dn)[1] else 0
            if G not in (32, 64, 128) or Kp % G:
                raise ModelLoadError(f"{path}: tensor {dn!r} has shape {list(f.shape(dn)) if dn in f else None}: "
                                     f"not a Q4_0 scale array for Kp={Kp} (group 32, 64 or 128)")
            blk = G
        if Kp < K or Kp % blk or Kp - K >= blk:
            raise ModelLoadError(f"{folder / MARKER}: tensor {name!r}: Kp={Kp} is not K={K} padded to "
                                 f"a multiple of {blk} ({fmt})")
        for a, dt, shp in FORMATS[fmt].stored(N, Kp, G):
            need(f"{name}.{a}", dt, shp)
        plan[name] = ("linear", fmt, N, K, Kp)
    if expect is not None:
        extra = [n for n in info if n not in expect] + [
            n for n in f.names if n not in expect and n.rsplit(".", 1)[0] not in expect]
        if extra:
            raise ModelLoadError(f"{path}: tensor {extra[0]!r} is not part of the model config.json "
                                 f"describes ({cfg.n_layers} layers, {cfg.model_type}): the folder and its "
                                 "config do not match")

    return f, plan


def iter_tensors(planned: tuple, check_weights: bool = True):
    """(canonical name, loader) pairs; a loader maps its tensor (a `Linear` of memory-mapped
    arrays, or an f32 vector). check_weights: float arrays (vectors, f32/f16/bf16 matrices, the
    Q8_0/Q4_0 scales) are checked for NaN/Inf."""
    from .safetensors_io import check_finite
    f, plan = planned
    path = f.path

    def get(name, pl):
        if pl[0] == "vec":
            a = f.get(name)
            if check_weights:
                check_finite(a, f"{path}: tensor {name!r}")
            return a
        _, fmt, N, K, Kp = pl
        arrays = {a: f.get(f"{name}.{a}") for a in FORMATS[fmt].arrays}
        if check_weights:
            for a, arr in arrays.items():
                if a in ("w", "d"):
                    check_finite(arr, f"{path}: tensor {name + '.' + a!r}", bf16=fmt == "bf16")
        return Linear(fmt, N, K, arrays, Kp)

    for name, pl in plan.items():
        yield name, lambda name=name, pl=pl: get(name, pl)
