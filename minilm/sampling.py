"""Next-token choice from logits: greedy or temperature / top-k / top-p / min-p sampling,
with a repetition penalty (the transformers definition)."""
from __future__ import annotations

import numpy as np

from .kernels.activations import softmax


def check_params(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """Raise ValueError naming the first invalid parameter."""
    def bad(name, v, why):
        raise ValueError(f"{name}={v!r}: {why}")
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                    ("repetition_penalty", repetition_penalty)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            bad(name, v, "must be a finite number")
    if temperature < 0:
        bad("temperature", temperature, "must be >= 0 (0 = greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        bad("top_k", top_k, "must be an integer >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        bad("top_p", top_p, "must be in (0, 1]")
    if not 0 <= min_p < 1:
        bad("min_p", min_p, "must be in [0, 1)")
    if repetition_penalty <= 0:
        bad("repetition_penalty", repetition_penalty, "must be > 0 (1 = off)")


class Sampler:
    def __init__(self, vocab_size, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0, seed=None):
        check_params(temperature, top_k, top_p, min_p, repetition_penalty)
        self.temperature, self.top_k, self.top_p, self.min_p = float(temperature), int(top_k), float(top_p), float(min_p)
        self.penalty = float(repetition_penalty)
        self.rng = np.random.default_rng(seed)
        self.probs = np.zeros(vocab_size, np.float32)       # scratch
        self.work = np.zeros(vocab_size, np.float32)

    def __call__(self, logits: np.ndarray, history) -> int:
        """logits: f32[V] (not modified); history: ids seen so far (for the penalty)."""
        x = self.work
        np.copyto(x, logits)
        if self.penalty != 1.0 and len(history):
            h = np.unique(np.asarray(history, dtype=np.int64))
            v = x[h]
            x[h] = np.where(v < 0, v * self.penalty, v / self.penalty)
        if self.temperature == 0.0:
            return int(np.argmax(x))
        x /= self.temperature
        if self.top_k and self.top_k < len(x):
            kth = np.partition(x, -self.top_k)[-self.top_k]
            x[x < kth] = -np.inf
        softmax(x, self.probs)
        p = self.probs
        if self.min_p > 0.0:
            p[p < self.min_p * p.max()] = 0.0
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = int(np.searchsorted(cum, self.top_p * cum[-1])) + 1  # smallest set reaching top_p
            p[order[keep:]] = 0.0
        p = p / p.sum(dtype=np.float64)
        return int(self.rng.choice(len(p), p=p))
