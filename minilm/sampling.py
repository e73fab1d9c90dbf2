"""Next-token choice from logits: greedy, or sampling with temperature / top-k / top-p / min-p,
and a repetition penalty.

The steps run in the order transformers' `generate` applies its logits processors, each with
transformers' definition:

1. repetition penalty: every token id seen so far (prompt and generated) has its logit divided
   by `repetition_penalty` when positive, multiplied by it when negative (0 stays 0);
2. temperature: logits / temperature (temperature 0: greedy, the argmax of step 1, first index
   on ties; steps 3-5 never remove the most likely token, so they do not change it);
3. top-k: tokens whose logit is below the k-th largest are removed; every token tied with the
   k-th is kept (so more than k may remain);
4. top-p: the smallest set of most likely tokens whose probability reaches top_p is kept, i.e. a
   token stays when the probability of the tokens ranked above it is < top_p (a set reaching
   exactly top_p is enough); tokens of equal probability rank by token id, lower first;
5. min-p: tokens with probability < min_p * (the largest probability) are removed, on the
   distribution left after top-p;

and the token is drawn from what remains, renormalized. `Sampler.distribution` returns that
final distribution, so each step can be checked against a hand-computed one. Probabilities are
computed in float64 from the float32 logits.
"""
from __future__ import annotations

import numpy as np

_TOP_P_SORT = 1024        # top-p sorts at most this many candidates when they hold the nucleus


def check_params(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """Raise ValueError naming the first invalid parameter."""
    def bad(name, v, why):
        raise ValueError(f"{name}={v!r}: {why}")
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                    ("repetition_penalty", repetition_penalty)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
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
    """sampler(logits f32[V], history) -> next token id; see the module docstring for the steps."""

    def __init__(self, vocab_size, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0, seed=None):
        check_params(temperature, top_k, top_p, min_p, repetition_penalty)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r}: must be a positive integer")
        self.vocab_size = int(vocab_size)
        self.temperature, self.top_k, self.top_p, self.min_p = float(temperature), int(top_k), float(top_p), float(min_p)
        self.penalty = float(repetition_penalty)
        self.rng = np.random.default_rng(seed)
        self.work = np.zeros(self.vocab_size, np.float64)       # scratch: the processed logits f64[V]

    # ---- steps -----------------------------------------------------------------------------
    def _check_logits(self, logits) -> np.ndarray:
        x = np.asarray(logits)
        if x.shape != (self.vocab_size,) or x.dtype.kind != "f":
            raise ValueError(f"logits: expected a float array of shape ({self.vocab_size},) (the vocabulary), "
                             f"got {x.dtype} {x.shape}")
        return x

    @staticmethod
    def _bad_logits(x: np.ndarray):
        """ValueError for NaN / +inf logits or all -inf (None when x is usable; -inf alone masks a token)."""
        bad = np.flatnonzero(np.isnan(x) | (x == np.inf))
        if len(bad):
            return ValueError(f"logits: {len(bad)} NaN or +inf values (first at token {bad[0]}): "
                              "the model produced non-finite numbers")
        if np.isneginf(x).all():
            return ValueError("logits: every token is -inf; there is nothing to choose from")
        return None

    def _argmax(self, x: np.ndarray) -> int:
        i = int(np.argmax(x))
        if not np.isfinite(x[i]) and (err := self._bad_logits(x)):   # argmax finds a NaN first; O(1) otherwise
            raise err
        return i

    def _penalized(self, x: np.ndarray, history) -> np.ndarray:
        """Step 1 into the f64 scratch: x f32[V] -> f64[V]."""
        w = self.work
        np.copyto(w, x)
        if self.penalty != 1.0 and len(history):
            h = np.unique(np.asarray(history, dtype=np.int64))   # int64[n], sorted
            if h[0] < 0 or h[-1] >= self.vocab_size:
                raise ValueError(f"history: token id {h[0] if h[0] < 0 else h[-1]} outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            v = w[h]
            w[h] = np.where(v < 0, v * self.penalty, v / self.penalty)
        return w

    def _probs(self, x: np.ndarray) -> np.ndarray:
        """Steps 2-5 on penalized logits x f64[V] (overwritten) -> probabilities f64[V], sum 1."""
        if not np.isfinite(x).all() and (err := self._bad_logits(x)):
            raise err
        V = len(x)
        x -= x.max()                  # first: with a tiny temperature, x <= 0 can only overflow to -inf
        with np.errstate(over="ignore"):                             # (probability 0: it tends to greedy)
            x /= self.temperature
        if 0 < self.top_k < V:
            kth = np.partition(x, V - self.top_k)[V - self.top_k]   # the k-th largest
            x[x < kth] = -np.inf
        p = np.exp(x, out=x)                                         # in the scratch, no new arrays
        p /= p.sum()
        if self.top_p < 1.0:
            cand = np.flatnonzero(p)                                 # int64[n]: after top-k, n <= k (+ ties)
            if len(cand) > _TOP_P_SORT:
                # Sorting the whole vocabulary costs ~5-10 ms per token (V = 49152). The tokens at
                # least as likely as the _TOP_P_SORT-th (ties included) come first in the full
                # order; when their mass already exceeds top_p, every token outside them is removed
                # and the ranking inside them is the same, so sorting them gives the same answer.
                thr = np.partition(p, V - _TOP_P_SORT)[V - _TOP_P_SORT]
                top = np.flatnonzero(p >= thr)
                if p[top].sum() > self.top_p + 1e-9:                 # margin: summation order
                    cand = top
            order = cand[np.argsort(-p[cand], kind="stable")]        # most likely first, ties by id
            above = np.zeros(len(order))                             # f64[n]: mass ranked above each token
            np.cumsum(p[order[:-1]], out=above[1:])
            keep = int(np.searchsorted(above, self.top_p, side="left"))   # those with above < top_p
            kept = order[:keep]
            q = np.zeros_like(p)                                     # f64[V]: the tokens not in cand go too
            q[kept] = p[kept]
            p = q / q.sum()
        if self.min_p > 0.0:
            p[p < self.min_p * p.max()] = 0.0
            p /= p.sum()
        return p

    # ---- public ----------------------------------------------------------------------------
    def distribution(self, logits: np.ndarray, history=()) -> np.ndarray:
        """The probabilities f64[V] the next token is drawn from (one-hot at the argmax when
        temperature is 0), for logits f[V] and the ids seen so far."""
        x = self._penalized(self._check_logits(logits), history)
        if self.temperature == 0.0:
            p = np.zeros(self.vocab_size, np.float64)
            p[self._argmax(x)] = 1.0
            return p
        return self._probs(x).copy()

    def __call__(self, logits: np.ndarray, history) -> int:
        """logits: f32[V] (not modified); history: ids seen so far (for the penalty)."""
        x = self._check_logits(logits)
        if self.temperature == 0.0:
            return self._argmax(x if self.penalty == 1.0 else self._penalized(x, history))
        return self._draw(self._probs(self._penalized(x, history)))

    def verify(self, logits: np.ndarray, history, draft: int) -> int:
        """The next token when a deterministic drafter proposed `draft` for it (speculative
        decoding, minilm/generate.py). Greedy: the argmax, exactly as __call__. Sampling, with p
        the final distribution (`distribution`): `draft` with probability p(draft), otherwise a
        token drawn from p without `draft`, renormalized; so the token is distributed as p,
        whatever was drafted (speculative sampling's rule for a one-hot proposal)."""
        x = self._check_logits(logits)
        if self.temperature == 0.0:
            return self(x, history)
        p = self._probs(self._penalized(x, history))
        if self.rng.random() < p[draft]:
            return int(draft)
        p[draft] = 0.0                  # p(draft) < 1 here, so some other token has mass
        return self._draw(p)

    def _draw(self, p: np.ndarray) -> int:
        """A token drawn from the weights p f64[V] (not necessarily summing to 1)."""
        support = np.flatnonzero(p)                                  # int64[n]: the tokens left
        cdf = np.cumsum(p if len(support) == len(p) else p[support])   # f64[n]
        i = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), len(support) - 1)
        return int(support[i])
