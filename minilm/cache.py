"""The KV cache: preallocated buffers sized from the context length, written in place.

Storage types (`kv_quant`; the row layouts are kernels/kvrows.py, the attention maths is float32):
    f16    fp16 values (the default): half of f32's bytes
    q8_0   int8 values + one fp16 scale per 32 values of a head row (ggml Q8_0 style): 8.5 bits
    f32    float32, exactly the values the model computed
The buffers are anonymous memory maps with transparent huge pages refused (`lazy_zeros`): the
operating system maps their 4 KiB pages only as positions are written, so resident memory grows
with the context used, not with n_ctx. (np.zeros asks for huge pages on large arrays: the first
token then touched one 2 MiB page in each [layer, kv head] plane, the whole cache when a plane is
that small, e.g. 189 MB resident for SmolLM2-135M's n_ctx 8192 after one token.)

Sequence slots: the arrays have a slot axis (k, v: [L, n_slots, Hkv, n_ctx, W]) so that one
forward pass can advance several sequences at once (the server's batched decode); each slot has
its own `pos` and `tokens`. `KVCache` itself is slot 0 (what `Transformer.cache` is and what the
library's calls use: its `k`, `v`, `conv` are slot 0's arrays); `cache.slots[i]` is slot i's view
with the same fields. A model starts with one slot; `resize_slots(n)` adds more.

LFM2's convolution layers keep their state beside it: `conv` f32[n_conv, n_ctx, D] holds the
convolution input (B * x) of every cached position, so a convolution at position p reads rows
p - Lc + 1 .. p, and truncating the cache to any n (prefix reuse across turns) leaves exactly the
state of position n: nothing is rolled, nothing needs recomputing. It costs D floats per position
and conv layer, as much as one attention layer's k and v with 2 Hkv hd = D."""
from __future__ import annotations

import mmap

import numpy as np

from .errors import ContextOverflowError

KV_QUANTS = ("f16", "q8_0", "f32")          # the first is the default
DEFAULT_KV_QUANT = KV_QUANTS[0]
_KV_DTYPE = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8}   # uint16: fp16 bits


def check_kv_quant(kv_quant) -> str:
    """The KV storage type to use: None -> the default; anything not in KV_QUANTS -> ValueError."""
    if kv_quant is None:
        return DEFAULT_KV_QUANT
    if not isinstance(kv_quant, str) or kv_quant.lower() not in KV_QUANTS:
        raise ValueError(f"kv_quant={kv_quant!r}: must be one of {', '.join(KV_QUANTS)} "
                         f"(the KV cache's storage type; default {DEFAULT_KV_QUANT})")
    return kv_quant.lower()


def kv_row_bytes(kv_quant: str, head_dim: int) -> int:
    """Bytes of one cached row (one position's k or v of one kv head)."""
    if kv_quant == "q8_0":
        from .kernels.kvrows import q8_row_width
        return q8_row_width(head_dim)
    return head_dim * np.dtype(_KV_DTYPE[kv_quant]).itemsize


def lazy_zeros(shape: tuple, dtype) -> np.ndarray:
    """A zeroed writable array whose pages are mapped only when first written (4 KiB pages: no
    transparent huge pages where the OS has the advice). Empty shapes get np.zeros."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    if n == 0:
        return np.zeros(shape, dt)
    buf = mmap.mmap(-1, n)                                   # anonymous, zero-filled on first touch
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dt).reshape(shape)           # the array keeps the map alive


class SlotCache:
    """One sequence slot of a KVCache: k, v: [L, Hkv, n_ctx, W] views of the shared arrays (rows
    in the cache's storage type); `pos` = number of positions filled; `tokens` = their ids."""

    def __init__(self, store: "KVCache", index: int):
        self.store = store
        self.index = index
        self.n_ctx = store.n_ctx
        self.pos = 0
        self.tokens: list[int] = []
        self.kv_long = False       # LongRoPE: the cached keys were rotated with the long factors

    @property
    def k(self) -> np.ndarray:
        return self.store.k_all[:, self.index]

    @property
    def v(self) -> np.ndarray:
        return self.store.v_all[:, self.index]

    @property
    def conv(self) -> np.ndarray:
        return self.store.conv_all[:, self.index]

    @property
    def nbytes(self) -> int:
        """Bytes of this slot's arrays."""
        return self.store.slot_nbytes

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


class KVCache(SlotCache):
    """The cache of all slots; as a SlotCache it is slot 0. k_all, v_all: [L, n_slots, Hkv, n_ctx,
    W] rows of hd values in the `kv_quant` storage type (f32: f32[.., hd], f16: uint16 fp16 bits
    [.., hd], q8_0: int8[.., hd + 2 ceil(hd/32)]; kernels/kvrows.py); conv_all: f32[n_conv,
    n_slots, n_ctx, D]; `slots[i]`: slot i (slots[0] is self)."""

    def __init__(self, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int, n_conv: int = 0,
                 conv_dim: int = 0, n_slots: int = 1, kv_quant: str | None = None):
        self.n_ctx = n_ctx
        self.kv_quant = check_kv_quant(kv_quant)
        self.head_dim = head_dim
        self._shape = (n_layers, n_kv_heads, n_ctx, head_dim, n_conv, conv_dim)
        self._alloc(n_slots)
        super().__init__(self, 0)
        self.slots: list[SlotCache] = [self] + [SlotCache(self, i) for i in range(1, n_slots)]

    def _alloc(self, n_slots: int) -> None:
        L, Hkv, n_ctx, hd, n_conv, D = self._shape
        dt = _KV_DTYPE[self.kv_quant]
        W = kv_row_bytes(self.kv_quant, hd) // np.dtype(dt).itemsize
        self.k_all = lazy_zeros((L, n_slots, Hkv, n_ctx, W), dt)
        self.v_all = lazy_zeros((L, n_slots, Hkv, n_ctx, W), dt)
        self.conv_all = lazy_zeros((n_conv, n_slots, n_ctx, D), np.float32)   # LFM2: conv inputs per position

    @property
    def n_slots(self) -> int:
        return self.k_all.shape[1]

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot's arrays."""
        return (self.k_all.nbytes + self.v_all.nbytes + self.conv_all.nbytes) // self.n_slots

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache (every slot)."""
        return self.k_all.nbytes + self.v_all.nbytes + self.conv_all.nbytes

    def resize_slots(self, n_slots: int) -> None:
        """Reallocate for n_slots sequence slots, keeping the contents of the slots that remain
        (slot 0 always does). The owner re-points what holds the old arrays (Transformer.set_slots)."""
        if isinstance(n_slots, bool) or not isinstance(n_slots, (int, np.integer)) or n_slots < 1:
            raise ValueError(f"n_slots={n_slots!r}: must be an integer >= 1")
        if n_slots == self.n_slots:
            return
        old = (self.k_all, self.v_all, self.conv_all)
        keep = min(n_slots, self.n_slots)
        self._alloc(int(n_slots))
        for new, a in zip((self.k_all, self.v_all, self.conv_all), old):
            new[:, :keep] = a[:, :keep]
        self.slots = self.slots[:keep] + [SlotCache(self, i) for i in range(keep, n_slots)]
