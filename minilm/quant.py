"""Weight formats as data: one table from format name to its storage and its kernels.

A `Linear` holds one weight matrix W [N, K] in some format and computes out = x @ W.T with the
format's GEMV (decode, one row of x) or GEMM (prefill, many rows). It can also hand out rows of
W as float32, which is how token embeddings are looked up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .kernels import matmul as _mm


@dataclass(frozen=True)
class Format:
    name: str
    bits_per_weight: float
    pack: Callable          # f32[N, K] -> dict of arrays (reference, used when writing)
    gemv: Callable          # (x f32[K], *arrays, out f32[N])
    gemm: Callable          # (x f32[M, K], *arrays, out f32[M, N])
    rows: Callable          # (arrays, ids, out f32[len(ids), K]): dequantized rows (embeddings)
    block: int = 1          # K must be a multiple of this


FORMATS: dict[str, Format] = {
    "f32": Format("f32", 32.0,
                  pack=lambda w: {"w": np.ascontiguousarray(w, dtype=np.float32)},
                  gemv=_mm.gemv_f32, gemm=_mm.gemm_f32,
                  rows=lambda a, ids, out: np.take(a["w"], ids, axis=0, out=out)),
}


class Linear:
    """W [N, K] stored in `fmt`; arrays are C-contiguous (possibly memory-mapped)."""

    __slots__ = ("fmt", "N", "K", "arrays", "_args", "_gemv", "_gemm")

    def __init__(self, fmt: str, N: int, K: int, arrays: dict):
        self.fmt, self.N, self.K, self.arrays = fmt, N, K, arrays
        f = FORMATS[fmt]
        self._args = tuple(arrays.values())
        self._gemv, self._gemm = f.gemv, f.gemm

    @classmethod
    def from_f32(cls, w: np.ndarray, fmt: str = "f32") -> "Linear":
        N, K = w.shape
        return cls(fmt, N, K, FORMATS[fmt].pack(w))

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        """x: f32[M, K] -> out: f32[M, N]."""
        if x.shape[0] == 1:
            self._gemv(x[0], *self._args, out[0])
        else:
            self._gemm(x, *self._args, out)

    def rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        """out: f32[len(ids), K] <- rows `ids` of W as float32 (embedding lookup)."""
        FORMATS[self.fmt].rows(self.arrays, ids, out)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())
