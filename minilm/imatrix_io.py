"""llama.cpp's importance-matrix files, read and written (`calibrate.load_imatrix` /
`save_imatrix` dispatch here by content and suffix).

Two layouts, as llama.cpp 0c1e570 writes and reads them (tools/imatrix/imatrix.cpp,
common/imatrix-loader.cpp, tools/quantize/quantize.cpp):

  GGUF (llama-imatrix's default): metadata general.type = "imatrix", imatrix.datasets (string
      array), imatrix.chunk_count, imatrix.chunk_size (u32); per matrix two F32 tensors
      "<tensor>.in_sum2" (ggml [K, n_mat]: sums of x^2 per input column) and "<tensor>.counts"
      ([1, n_mat]: the rows summed); llama-quantize uses in_sum2 / counts (a count of 0: no data).
  legacy .dat (--output-format dat): little-endian int32 n_entries, then per entry int32 name
      length, the name, int32 ncall, int32 nval, f32[nval] values = mean x^2 * ncall; then
      optionally int32 chunk count, int32 length and the dataset name. llama-quantize divides
      the values by ncall.

<tensor> is llama.cpp's tensor name ("blk.3.attn_q.weight"); minilm's canonical matrices map to
them through `sources.gguf_layout` (the one name table, GGUF_NAMES): a fused matrix (wqkv,
w_gate_up) is several GGUF tensors with the same input, so it is written once per part and read
from the first part the file has. A file is untrusted input: every count and size is checked
against the file's length and the model before anything is allocated, and errors name the file
and the entry or field.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from .errors import ModelLoadError

SUM2, COUNTS = ".in_sum2", ".counts"
MAX_NAME = 1024              # bytes of a tensor name in a legacy file at most (ggml's GGML_MAX_NAME is 64)


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def is_safetensors(path: Path) -> bool:
    """A safetensors file: u64 header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


# ---- names -------------------------------------------------------------------------------------------
def gguf_names(cfg, present=None) -> dict[str, list[str]]:
    """{canonical matrix name: its llama.cpp tensor names} for the model `cfg` (the matrices only:
    an imatrix weighs matrix inputs). present: the names a file holds (split vs fused q/k/v)."""
    from .sources import GGUF_ARCH_OF, gguf_layout
    from .weights import is_matrix
    arch = GGUF_ARCH_OF.get(cfg.model_type)
    if arch is None:
        raise ModelLoadError(f"llama.cpp imatrix files name tensors as llama.cpp does, and llama.cpp has no "
                             f"architecture for model_type {cfg.model_type!r} (use minilm's .safetensors imatrix)")
    return {canon: [p.gguf for p in parts] for canon, parts in gguf_layout(cfg, arch, present).items()
            if is_matrix(canon) and parts and parts[0].K is not None}


def _to_canonical(path: Path, entries: dict[str, np.ndarray], cfg) -> dict:
    """{llama.cpp name: f32[K] mean x^2} -> {canonical name: f32[K]}, checked against `cfg`: an
    entry that names no matrix of the model, or has another width, is an error naming it."""
    from .weights import canonical_shapes
    names = gguf_names(cfg, present=set(entries))
    owner = {g: canon for canon, gs in names.items() for g in gs}
    shapes = canonical_shapes(cfg)
    out = {}
    for g, v in entries.items():
        canon = owner.get(g)
        if canon is None:
            raise ModelLoadError(f"imatrix file {path}: entry {g!r} names no matrix of this model "
                                 f"({cfg.model_type}, {cfg.n_layers} layers)")
        K = shapes[canon][1]
        if v.shape != (K,):
            raise ModelLoadError(f"imatrix file {path}: entry {g!r} has {v.size} values, expected {K} "
                                 f"(the input width of {g})")
        if not np.isfinite(v).all() or (v < 0).any():
            raise ModelLoadError(f"imatrix file {path}: entry {g!r} has values that are not finite and >= 0")
        if canon not in out or g == names[canon][0]:
            out[canon] = v
    if not out:
        raise ModelLoadError(f"imatrix file {path}: no entries")
    return out


# ---- GGUF --------------------------------------------------------------------------------------------
def read_gguf(path: Path, cfg) -> dict:
    """A llama.cpp GGUF imatrix -> {canonical name: f32[K] mean x^2 per input column}."""
    from .sources import GGUFMeta, open_gguf, tensor_dims
    r = open_gguf(path)
    m = GGUFMeta(r, path)
    kind = m.str_("general.type")
    if kind != "imatrix":
        raise ModelLoadError(f"imatrix file {path}: a GGUF file whose general.type is {kind!r}, not 'imatrix' "
                             "(a model file? pass the imatrix written by llama-imatrix)")
    for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
        if m.get(key) is None:                       # llama-quantize refuses such a file too
            raise ModelLoadError(f"imatrix file {path}: GGUF metadata {key!r} is missing")
        m.int_(key)
    sums, counts = {}, {}
    for t in r.tensors:
        name = str(t.name)
        for suffix, into in ((SUM2, sums), (COUNTS, counts)):
            if name.endswith(suffix):
                if t.tensor_type.name != "F32":
                    raise ModelLoadError(f"imatrix file {path}: tensor {name!r} is {t.tensor_type.name}, must be F32")
                dims = tensor_dims(t, path)
                if len(dims) > 2:
                    raise ModelLoadError(f"imatrix file {path}: tensor {name!r} has dimensions {dims}, expected 2")
                into[name[:-len(suffix)]] = (dims, np.asarray(t.data, np.float32).reshape(-1))
    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise ModelLoadError(f"imatrix file {path}: entry {name!r} has {SUM2 if name in sums else COUNTS} "
                                 f"but no {COUNTS if name in sums else SUM2} tensor")
        (sd, s), (cd, c) = sums[name], counts[name]
        n_mat = sd[1] if len(sd) == 2 else 1
        if n_mat != 1 or c.size != 1 or (len(cd) == 2 and cd[0] != 1):
            raise ModelLoadError(f"imatrix file {path}: entry {name!r} has {n_mat} matrices ({name}{SUM2} {sd}, "
                                 f"{name}{COUNTS} {cd}); minilm's models have one per tensor (no experts)")
        n = float(c[0])
        if not math.isfinite(n) or n < 0:
            raise ModelLoadError(f"imatrix file {path}: {name}{COUNTS} is {n}, must be a count >= 0")
        if n == 0:        # no data for this tensor: llama-quantize quantizes it unweighted, so do we
            continue
        if not np.isfinite(s).all():
            raise ModelLoadError(f"imatrix file {path}: {name}{SUM2} has values that are not finite")
        entries[name] = (s.astype(np.float64) / n).astype(np.float32)
    return _to_canonical(path, entries, cfg)


def _llama_rows(imatrix: dict, cfg) -> list:
    """[(llama.cpp tensor name, f32[K] mean x^2)] of `imatrix` in llama-imatrix's order (sorted
    names); a fused matrix gives one row per llama.cpp tensor, a covariance its diagonal."""
    names = gguf_names(cfg)
    rows = []
    for canon, v in imatrix.items():
        if canon not in names:
            raise ValueError(f"imatrix {canon!r}: no matrix of this model has that name")
        v = np.diagonal(v) if v.ndim == 2 else v
        rows += [(g, v) for g in names[canon]]
    return sorted(rows, key=lambda r: r[0])


def write_gguf(path: Path, imatrix: dict, cfg, n_tokens: int, chunk: int, datasets: list[str]) -> Path:
    """Write `imatrix` ({canonical name: f32[K] mean x^2, or f32[K, K] covariance: its diagonal})
    as llama-imatrix's GGUF: sums = mean * n_tokens, counts = n_tokens."""
    from .sources import gguf_module
    gguf = gguf_module()
    w = gguf.GGUFWriter(str(path), "")
    w.kv_data[0].pop("general.architecture", None)      # an imatrix file has none (as llama-imatrix's)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", max(1, -(-n_tokens // chunk)))
    w.add_uint32("imatrix.chunk_size", chunk)
    for g, v in _llama_rows(imatrix, cfg):
        w.add_tensor(g + COUNTS, np.full((1, 1), n_tokens, np.float32))
        w.add_tensor(g + SUM2, (np.asarray(v, np.float64) * n_tokens).astype(np.float32).reshape(1, -1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- legacy .dat -------------------------------------------------------------------------------------
def read_legacy(path: Path, cfg) -> dict:
    """A llama.cpp legacy (.dat) imatrix -> {canonical name: f32[K] mean x^2 per input column}."""
    data = path.read_bytes()
    size, pos = len(data), 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise ModelLoadError(f"imatrix file {path}: truncated: {what} needs {n} bytes at byte {pos}, "
                                 f"the file has {size}")
        b = data[pos:pos + n]
        pos += n
        return b

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count")
    if n_entries < 1 or n_entries * 16 > size:         # an entry takes at least 16 bytes
        raise ModelLoadError(f"imatrix file {path}: entry count {n_entries} does not fit a file of {size} bytes "
                             "(not a llama.cpp imatrix .dat file?)")
    entries = {}
    for i in range(n_entries):
        n = i32(f"entry {i + 1}'s name length")
        if not 0 < n <= MAX_NAME:
            raise ModelLoadError(f"imatrix file {path}: entry {i + 1} has a name length of {n} bytes "
                                 f"(expected 1 to {MAX_NAME}; not a llama.cpp imatrix .dat file?)")
        try:
            name = take(n, f"entry {i + 1}'s name").decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"imatrix file {path}: entry {i + 1}'s name is not UTF-8") from None
        ncall, nval = i32(f"entry {name!r}'s ncall"), i32(f"entry {name!r}'s value count")
        if nval < 1 or 4 * nval > size - pos:
            raise ModelLoadError(f"imatrix file {path}: entry {name!r} has a value count of {nval}, which the "
                                 f"{size - pos} bytes left cannot hold")
        if ncall < 0:
            raise ModelLoadError(f"imatrix file {path}: entry {name!r} has ncall {ncall}, must be >= 0")
        if name in entries:
            raise ModelLoadError(f"imatrix file {path}: entry {name!r} appears twice")
        v = np.frombuffer(take(4 * nval, f"entry {name!r}'s values"), "<f4").astype(np.float32)
        if not np.isfinite(v).all():
            raise ModelLoadError(f"imatrix file {path}: entry {name!r} has values that are not finite")
        entries[name] = v / ncall if ncall > 0 else v     # as llama-quantize: values / ncall
    if pos != size:                     # optional trailer: chunk count, dataset name
        i32("the chunk count")
        if pos != size:
            n = i32("the dataset name length")
            if n < 0 or pos + n != size:
                raise ModelLoadError(f"imatrix file {path}: dataset name length {n} does not match the "
                                     f"{size - pos} bytes left at the end")
    return _to_canonical(path, entries, cfg)


def write_legacy(path: Path, imatrix: dict, cfg, n_tokens: int, chunk: int, dataset: str) -> Path:
    """Write `imatrix` as llama-imatrix's legacy .dat file (values = mean * ncall, ncall = the
    chunks the statistics came from)."""
    ncall = max(1, -(-n_tokens // chunk))
    rows = _llama_rows(imatrix, cfg)
    out = [struct.pack("<i", len(rows))]
    for g, v in rows:
        b = g.encode()
        out += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, v.size),
                (np.asarray(v, np.float64) * ncall).astype("<f4").tobytes()]
    d = dataset.encode()
    out += [struct.pack("<ii", ncall, len(d)), d]
    path.write_bytes(b"".join(out))
    return path
