"""Token generation on top of the transformer: prompt prefix reuse, sampling, stop conditions,
and UTF-8-safe streaming detokenization."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .errors import ContextOverflowError
from .sampling import Sampler, check_params

# How many prompt tokens are decoded together with the continuation so that its first piece
# keeps its leading space (sentencepiece decoders strip the space of a text's first token).
_CTX_TOKENS = 4


def check_seed(seed) -> int | None:
    """seed: None or an integer >= 0 (ValueError naming the parameter otherwise)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0 or seed >= 1 << 128:
        raise ValueError(f"seed={seed!r}: must be None or an integer in [0, 2**128)")
    return int(seed)


def check_stop(stop) -> list[str]:
    """stop: None, a non-empty string, or a list/tuple of non-empty strings (valid Unicode)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop={stop!r}: must be a non-empty string or a list of non-empty strings")
    from .tokenizer import check_text
    for i, s in enumerate(stop):
        check_text(s, f"stop[{i}]")
    return list(stop)


def check_generate_args(max_new_tokens, stop, seed=None, **sampling):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
    stop = check_stop(stop)
    check_seed(seed)
    for name, v in sampling.items():       # ints beyond float range reach np.isfinite as objects
        if name != "top_k" and isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2 ** 53:
            raise ValueError(f"{name}={v!r}: must be a finite number of a sensible size")
    check_params(**sampling)
    return stop


def check_room(model, prompt_ids, max_new_tokens) -> None:
    """Raise before any work if the prompt is empty or prompt + max_new_tokens exceeds n_ctx."""
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token (or a tokenizer with a BOS token)")
    n_ctx = model.net.cache.n_ctx
    if len(prompt_ids) + max_new_tokens > n_ctx:
        raise ContextOverflowError(
            f"context overflow: prompt of {len(prompt_ids)} tokens + max_new_tokens={max_new_tokens} "
            f"> n_ctx={n_ctx}")


def generate_tokens(model, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                    eos_ids=(), ignore_eos=False, constraint=None) -> Iterator[int]:
    """Yield new token ids. Reuses the cached prefix shared with the previous call. Holds the
    model (net.busy) from the first token to the last: concurrent generations on one model run
    one after the other, never interleaved.
    constraint: a `minilm.constrain.ConstraintState` (or None): masks the logits before every
    token (EOS only where the grammar accepts) and ends the generation once the grammar is done."""
    net = model.net
    with net.busy:
        check_room(model, prompt_ids, max_new_tokens)
        yield from _generate(net, prompt_ids, max_new_tokens, sampler, eos_ids, ignore_eos, constraint)


def reuse_prefix(net, cache, prompt_ids) -> int:
    """Truncate `cache` (a KV-cache slot) to the longest prefix it shares with prompt_ids that can
    be kept, and return its length: at least one prompt token is re-run (for its logits), and
    nothing is kept when the RoPE frequencies depend on the sequence length (dynamic NTK)."""
    keep = min(cache.common_prefix(prompt_ids), len(prompt_ids) - 1)
    if net.rope_depends_on_length(len(prompt_ids)):
        keep = 0           # dynamic NTK RoPE: cached keys were rotated for a shorter sequence
    cache.truncate(keep)
    return keep


class TokenChooser:
    """One sequence's choice of its next tokens from logits: sampling, the output constraint, EOS
    and the token budget. `choose(logits)` returns the next token, or None when the sequence ends
    there (EOS, or nothing left); after a token, `left == 0` means it was the last one (the
    budget, a completed constraint, or a full context), so no decode step for it is needed.
    Used by `generate_tokens` and by the server's batched scheduler alike."""

    def __init__(self, prompt_ids, max_new_tokens, sampler, eos_ids=(), ignore_eos=False, constraint=None,
                 n_ctx=None):
        self.sampler, self.constraint, self.ignore_eos = sampler, constraint, ignore_eos
        self.eos = set(eos_ids)
        self.history = list(prompt_ids)
        self.left = max_new_tokens
        self.n_ctx = n_ctx

    def choose(self, logits) -> int | None:
        if self.left <= 0:
            return None
        self.left -= 1
        c = self.constraint
        if c is None:
            tok = self.sampler(logits, self.history)
        else:
            tok = c.pick_allowed(self.sampler(c.mask(logits), self.history))
            c.advance(tok)
        if tok in self.eos and not self.ignore_eos:
            self.left = 0
            return None
        self.history.append(tok)
        if (c is not None and c.done) or (self.n_ctx is not None and len(self.history) >= self.n_ctx):
            self.left = 0          # complete (without EOS ids the grammar ends it), or no room left
        return tok


def _generate(net, prompt_ids, max_new_tokens, sampler, eos_ids, ignore_eos, constraint=None):
    cache = net.cache
    keep = reuse_prefix(net, cache, prompt_ids)
    logits = net.prefill(prompt_ids[keep:])
    ch = TokenChooser(prompt_ids, max_new_tokens, sampler, eos_ids, ignore_eos, constraint, cache.n_ctx)
    while (tok := ch.choose(logits)) is not None:
        yield tok
        if ch.left == 0:
            return
        logits = net.decode(tok)


class TextStream:
    """Turns token ids into text pieces: never splits a UTF-8 character (holds back a trailing
    U+FFFD until the rest of its bytes arrive) and never emits text that may start a stop string."""

    def __init__(self, tokenizer, prompt_ids, stop):
        self.tok = tokenizer
        self.ctx = list(prompt_ids[-_CTX_TOKENS:])
        self.ctx_text = tokenizer.decode(self.ctx)
        self.ids: list[int] = []
        self.stop = stop
        self.sent = 0          # chars of the continuation already emitted
        self.done = False

    def text(self) -> str:
        full = self.tok.decode(self.ctx + self.ids)
        if full.startswith(self.ctx_text):
            return full[len(self.ctx_text):]
        return self.tok.decode(self.ids)

    def push(self, tok: int) -> str:
        """Add a token; return the new safe-to-show text (may be ''). Sets done on a stop string."""
        self.ids.append(tok)
        t = self.text()
        for s in self.stop:
            i = t.find(s, max(0, self.sent - len(s) + 1))
            if i >= 0:
                t = t[:i]
                self.done = True
        if not self.done:
            if t.endswith("\ufffd"):
                return ""                       # incomplete multi-byte character: wait
            hold = 0
            for s in self.stop:                 # the tail may be the start of a stop string
                for k in range(min(len(s) - 1, len(t)), 0, -1):
                    if t.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            t = t[:len(t) - hold]
        piece = t[self.sent:] if len(t) > self.sent else ""
        self.sent = max(self.sent, len(t))
        return piece

    def finish(self) -> str:
        """Flush what was held back for a possible stop string once generation ends."""
        if self.done:
            return ""
        t = self.text()
        piece = t[self.sent:]
        self.sent = len(t)
        return piece
