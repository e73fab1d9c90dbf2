"""The KV cache: preallocated float32 buffers sized from the context length, written in place.

LFM2's convolution layers keep their state beside it: `conv` f32[n_conv, n_ctx, D] holds the
convolution input (B * x) of every cached position, so a convolution at position p reads rows
p - Lc + 1 .. p, and truncating the cache to any n (prefix reuse across turns) leaves exactly the
state of position n: nothing is rolled, nothing needs recomputing. It costs D floats per position
and conv layer, as much as one attention layer's k and v with 2 Hkv hd = D."""
from __future__ import annotations

import numpy as np

from .errors import ContextOverflowError


class KVCache:
    """k, v: f32[L, Hkv, n_ctx, hd]. `pos` = number of positions filled; `tokens` = their ids."""

    def __init__(self, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int, n_conv: int = 0,
                 conv_dim: int = 0):
        self.n_ctx = n_ctx
        self.k = np.zeros((n_layers, n_kv_heads, n_ctx, head_dim), np.float32)
        self.v = np.zeros((n_layers, n_kv_heads, n_ctx, head_dim), np.float32)
        self.conv = np.zeros((n_conv, n_ctx, conv_dim), np.float32)   # LFM2: conv inputs per position
        self.pos = 0
        self.tokens: list[int] = []

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.conv.nbytes

    def reset(self) -> None:
        self.pos = 0
        self.tokens = []

    def check_room(self, n_new: int) -> None:
        if self.pos + n_new > self.n_ctx:
            raise ContextOverflowError(
                f"context overflow: {self.pos} cached + {n_new} new tokens > n_ctx={self.n_ctx} "
                f"(load the model with a larger n_ctx, or shorten the prompt)")

    def common_prefix(self, ids) -> int:
        """How many leading ids are already in the cache (for prefix reuse across calls)."""
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n

    def truncate(self, n: int) -> None:
        """Forget positions n.. (their rows are overwritten by the next writes)."""
        self.pos = min(self.pos, n)
        del self.tokens[n:]
