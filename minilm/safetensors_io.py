"""Memory-mapped safetensors reading (and writing) with errors that name the file and tensor.

A safetensors file is: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data.
We parse the header ourselves and hand out `np.memmap` views, so nothing is read into memory
until a kernel touches it and no second copy of the weights is ever made.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from .errors import ModelLoadError

# safetensors dtype -> numpy dtype. BF16 has no numpy dtype: it is exposed as raw uint16 bits.
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
}
NP_TO_ST = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
            np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
            np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16",
            np.dtype(np.uint32): "U32", np.dtype(np.bool_): "BOOL"}


class SafetensorsFile:
    """One .safetensors file: `names`, `dtype(name)` ('F32', 'BF16', ...), `get(name)` -> memmap view."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ModelLoadError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise ModelLoadError(f"{self.path}: corrupt safetensors header "
                                         f"(header length {n} but file is {size} bytes)")
                raw = f.read(n)
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: file not found") from None
        except IsADirectoryError:
            raise ModelLoadError(f"{path}: is a directory, expected a .safetensors file") from None
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        try:
            header = json.loads(raw.decode("utf-8").rstrip(" "))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{self.path}: corrupt safetensors header ({e})") from None
        except RecursionError:
            raise ModelLoadError(f"{self.path}: corrupt safetensors header (nested too deeply)") from None
        if not isinstance(header, dict):
            raise ModelLoadError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{self.path}: corrupt safetensors header (__metadata__ is not an object)")
        self.metadata: dict = meta
        self._data_start = 8 + n
        self._entries = {}
        data_len = size - self._data_start
        spans = []
        for name, e in header.items():
            if not isinstance(e, dict) or not all(k in e for k in ("dtype", "shape", "data_offsets")):
                raise ModelLoadError(f"{self.path}: tensor {name!r} has a malformed header entry "
                                     "(needs dtype, shape and data_offsets)")
            dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if not isinstance(dt, str) or dt not in DTYPES:
                raise ModelLoadError(f"{self.path}: tensor {name!r} has unsupported dtype {dt!r}")
            if not isinstance(shape, list) or len(shape) > 8 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in shape):
                raise ModelLoadError(f"{self.path}: tensor {name!r}: shape {shape!r} must be a list of "
                                     "non-negative integers")
            if not isinstance(offs, list) or len(offs) != 2 or not all(
                    isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs):
                raise ModelLoadError(f"{self.path}: tensor {name!r}: data_offsets {offs!r} must be two "
                                     "non-negative integers [begin, end]")
            b, end = offs
            nbytes = math.prod(shape) * np.dtype(DTYPES[dt]).itemsize
            if end - b != nbytes:
                raise ModelLoadError(f"{self.path}: tensor {name!r}: data_offsets {b}..{end} do not "
                                     f"match shape {shape} of {dt}")
            if end > data_len:
                raise ModelLoadError(f"{self.path}: truncated file: tensor {name!r} ends at byte "
                                     f"{self._data_start + end} but the file has {size} bytes")
            if nbytes:
                spans.append((b, end, name))
            self._entries[name] = (dt, tuple(shape), b)
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ModelLoadError(f"{self.path}: tensors {n0!r} (bytes {b0}..{e0}) and {n1!r} "
                                     f"(bytes {b1}..{e1}) overlap: corrupt or hostile file")

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> str:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """A memory-mapped view of tensor `name` (BF16 as raw uint16 bits).

        Each tensor gets its own mapping, so a tensor that is converted and dropped (quantized
        while loading) is unmapped at once and its pages leave the process's resident set.
        The mapping is copy-on-write: writeable arrays (one Numba signature for mapped and
        in-memory weights) whose pages stay shared with the page cache as nobody writes them.
        """
        dt, shape, off = self._entries[name]
        npdt = np.dtype(DTYPES[dt])
        start = self._data_start + off
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, npdt)
        if start % npdt.itemsize:       # unaligned data: read a copy (safetensors aligns to 8)
            with open(self.path, "rb") as f:
                f.seek(start)
                return np.frombuffer(f.read(int(np.prod(shape)) * npdt.itemsize), npdt).reshape(shape).copy()
        return np.asarray(np.memmap(self.path, dtype=npdt, mode="c", offset=start, shape=tuple(shape)))


# Elements checked per step by `check_finite`: bounds the temporaries of the rare slow path.
_CHECK_CHUNK = 1 << 22


def check_finite(a: np.ndarray, where: str, bf16: bool = False) -> None:
    """Raise NonFiniteWeightsError naming `where` if float array `a` holds a NaN or Inf.

    One pass: a float32 sum per chunk (NaN and Inf propagate into it; a finite sum proves the
    chunk finite). Only a non-finite sum looks at elements (to name the first bad one, or to clear
    a finite chunk whose sum merely overflowed). bf16=True: `a` is raw bfloat16 bits (uint16).
    """
    from .errors import NonFiniteWeightsError
    flat = a.reshape(-1)
    for s in range(0, flat.size, _CHECK_CHUNK):
        c = flat[s:s + _CHECK_CHUNK]
        if bf16:
            bad = np.flatnonzero((c & 0x7F80) == 0x7F80)
        else:
            if np.isfinite(np.sum(c, dtype=np.float32 if c.dtype.itemsize <= 4 else np.float64)):
                continue
            bad = np.flatnonzero(~np.isfinite(c))
        if bad.size:
            i = s + int(bad[0])
            v = (flat[i:i + 1].astype(np.uint32) << 16).view(np.float32)[0] if bf16 else flat[i]
            idx = np.unravel_index(i, a.shape) if a.ndim else ()
            raise NonFiniteWeightsError(
                f"{where}: holds non-finite values (first: {float(v)} at index {list(map(int, idx))}); "
                "the weights are corrupt "
                "(load with check_weights=False or MINILM_NO_WEIGHT_CHECK=1 to skip this check)")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bits -> float32 (exact: bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_f32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        return bf16_to_f32(arr)
    return np.asarray(arr, dtype=np.float32)


def save_file(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """Write a safetensors file, one tensor at a time (no concatenated copy in memory)."""
    header, off = {}, 0
    items = list(tensors.items())
    for name, a in items:
        a = np.asarray(a)
        if a.dtype not in NP_TO_ST:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": NP_TO_ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-(len(h) + 8) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, a in items:
            f.write(np.ascontiguousarray(a).tobytes(order="C"))
    os.replace(tmp, path)
