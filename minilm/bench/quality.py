"""Quality against the f32 reference: perplexity, mean KL(P_f32 || P_level) and top-1 agreement over
non-overlapping windows of a text (the measures llama.cpp's `perplexity --kl-divergence` reports).
The f32 log-probs are computed once and kept in a [positions, V] f32 .npy every level reads."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from .common import progress


def windows(ids: list[int], ctx: int, limit: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping windows of ctx tokens over ids[:limit] (BOS first when the tokenizer has one)."""
    ids = ids[:limit]
    step = ctx - 1 if bos is not None else ctx
    if step < 1:
        raise ValueError(f"--ctx {ctx}: a quality window needs at least 2 tokens")
    out = []
    for a in range(0, len(ids), step):
        w = ([bos] if bos is not None else []) + ids[a:a + step]
        if len(w) >= 2:
            out.append(w)
    return out


def log_softmax(lg: np.ndarray) -> np.ndarray:
    """f32/f64 [T, V] logits -> f64 [T, V] log-probs."""
    lg = lg.astype(np.float64)
    m = lg.max(1, keepdims=True)
    return lg - (np.log(np.exp(lg - m).sum(1, keepdims=True)) + m)


class QualityAccumulator:
    """Compare log-probs window by window against the f32 reference (a [positions, V] f32 .npy).
    The first engine to run (minilm f32) writes the reference; the others read it."""

    def __init__(self, ref_path: Path, n_pos: int, V: int):
        self.ref_path = ref_path
        self.write = not ref_path.exists()
        if self.write:
            self.ref = np.lib.format.open_memmap(ref_path, mode="w+", dtype=np.float32, shape=(n_pos, V))
        else:
            self.ref = np.load(ref_path, mmap_mode="r")          # f32 [n_pos, V]
            if self.ref.shape != (n_pos, V):
                raise ValueError(f"reference {ref_path} has shape {self.ref.shape}, expected {(n_pos, V)}")
        self.pos = 0
        self.nll = 0.0
        self.kl: list[np.ndarray] = []
        self.agree = 0

    def add(self, window: list[int], logits: np.ndarray) -> None:
        """logits: [>= len(window) - 1, V] for the window's positions."""
        T = len(window) - 1
        lp = log_softmax(np.asarray(logits)[:T])                      # f64 [T, V]
        if self.write:
            self.ref[self.pos:self.pos + T] = lp.astype(np.float32)
        ref = np.asarray(self.ref[self.pos:self.pos + T], dtype=np.float64)   # f64 [T, V]
        if self.write:
            lp = lp.astype(np.float32).astype(np.float64)             # the reference is stored in f32
        tgt = np.asarray(window[1:])
        self.nll -= float(lp[np.arange(T), tgt].sum())
        self.kl.append((np.exp(ref) * (ref - lp)).sum(1))
        self.agree += int((ref.argmax(1) == lp.argmax(1)).sum())
        self.pos += T

    def result(self) -> dict:
        if self.write:
            self.ref.flush()
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        n = max(self.pos, 1)
        return {"ppl": math.exp(self.nll / n), "kl_mean": float(kl.mean()) if kl.size else float("nan"),
                "kl_p99": float(np.percentile(kl, 99)) if kl.size else float("nan"),
                "top1_agree_pct": 100.0 * self.agree / n, "quality_positions": self.pos}


def score(window_logits: Callable[[list[int]], np.ndarray], qs: dict, V: int, desc: str) -> dict:
    """Run every window of the quality spec through window_logits (ids -> f32 [len(ids), V]) and
    compare with the f32 reference."""
    acc = QualityAccumulator(Path(qs["ref"]), qs["positions"], V)
    for w in progress(qs["windows"], desc=desc, unit="win"):
        acc.add(w, window_logits(w))
    return acc.result()
