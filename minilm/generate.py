"""Token generation on top of the transformer: prompt prefix reuse, sampling, stop conditions,
and UTF-8-safe streaming detokenization."""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Iterator

import numpy as np

from .errors import ContextOverflowError
from .sampling import Sampler, check_params

# How many prompt tokens are decoded together with the continuation so that its first piece
# keeps its leading space (sentencepiece decoders strip the space of a text's first token).
_CTX_TOKENS = 4
_TAIL_TOKENS = 16     # TextStream: tokens decoded again on every push (at most twice this)


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


def check_speculative(speculative) -> bool:
    if not isinstance(speculative, bool):
        raise ValueError(f"speculative={speculative!r}: must be True or False")
    return speculative


def generate_tokens(model, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                    eos_ids=(), ignore_eos=False, constraint=None, speculative=True) -> Iterator[int]:
    """Yield new token ids. Reuses the cached prefix shared with the previous call. Holds the
    model (net.busy) from the first token to the last: concurrent generations on one model run
    one after the other, never interleaved.
    constraint: a `minilm.constrain.ConstraintState` (or None): masks the logits before every
    token (EOS only where the grammar accepts) and ends the generation once the grammar is done.
    speculative: draft tokens by prompt lookup and verify them in one pass (`PromptLookup`); the
    tokens are the same as without (greedy: identical; sampling: the same distribution). Off
    under a constraint (the grammar masks each position from the tokens before it)."""
    net = model.net
    check_speculative(speculative)
    with net.busy:
        check_room(model, prompt_ids, max_new_tokens)
        yield from _generate(net, prompt_ids, max_new_tokens, sampler, eos_ids, ignore_eos, constraint,
                             speculative and constraint is None)


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

    def choose(self, logits, draft: int | None = None) -> int | None:
        """draft: a speculative draft token these logits were computed after (Sampler.verify
        keeps it with its probability: the same distribution as sampling; greedy: the argmax)."""
        if self.left <= 0:
            return None
        self.left -= 1
        c = self.constraint
        if c is None and draft is not None:
            tok = self.sampler.verify(logits, self.history, draft)
        elif c is None:
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


class PromptLookup:
    """Draft tokens for speculative decoding by prompt lookup (no draft model): the tokens that
    followed the most recent earlier occurrence of the text's last n tokens (n = 3, then 2, 1),
    in the prompt and the generated text, as an index of n-grams -> where their follower is.

    Whether to draft, and how many tokens (k), is an expected-value choice made per draft:
      - p[n], the chance that a drafted token from an n-token match is accepted (given the ones
        before it were), is estimated per match length n from the drafts so far (accepted
        tokens / (accepted tokens + rejections), decayed so the estimate follows the text; a
        prior until then). Grounded text gives long matches whose drafts are accepted; free
        prose gives mostly 1-token matches that are not.
      - c, the cost of one extra row of a verify pass in plain decode steps: measured as it runs
        (greedy only, `timed`: a pass of k + 1 rows over the median of the last plain steps, with
        a plain step first and again after every REPLAIN drafts; c is the median of the last
        passes' figures, robust to a descheduled thread on a busy machine) and ROW_COST until
        then. It varies widely between machines and loads: on an idle core an extra row of a tiny model
        costs most of a step, on a busy machine a step is mostly waiting and a row is nearly free.
    A draft of k tokens then yields 1 + p + ... + p^k tokens on average for 1 + c k steps; the k
    with the best ratio is drafted if that ratio beats plain decoding by MARGIN. When no draft
    pays, drafting pauses for `backoff` tokens (doubling up to BACKOFF_MAX, back to 1 once a
    draft pays) and then probes with a one-token draft, so a change in the text (a passage
    starts being copied) is noticed while text whose drafts do not pay runs as plain decoding
    at almost no cost. Where rows cost so much that not even a draft accepted whole would pay
    (a tiny model on an idle core), the pause is BACKOFF_MAX at once: a probe then only
    re-measures the row cost.

    With sampling (`timed` False) c stays ROW_COST: whether a draft is made changes which random
    draws are taken, so it must depend on the text alone, or a seed would give different text on
    a busy machine. `proposed` / `accepted` count drafted tokens, `passes` the verify passes,
    `probes` the one-token probe drafts."""
    N = 3
    K_MAX = 12
    BACKOFF_MAX = 64
    ROW_COST = 0.4               # an extra verify row in plain steps, until measured (SmolLM2 int4: 0.3-0.45)
    PRIOR = (0.25, 0.45, 0.6)    # p for a 1-, 2-, 3-token match before any draft of it, ...
    PRIOR_WEIGHT = 2.0           # ... worth this many drafted tokens
    DECAY = 0.9                  # per draft: older drafts of that match length count less
    MARGIN = 1.05                # expected tokens per step a draft must reach (plain: 1)
    REPLAIN = 32                 # timed: a plain step after this many drafts (the step's time drifts)
    RECENT = 7                   # timed: c is the median over this many passes, each over the median
    C_MAX = 4.0                  #   of as many plain steps (one descheduled thread is not the rule)

    def __init__(self, ids: list[int], timed: bool = True, before: "PromptLookup | None" = None):
        """before: the model's previous generation's PromptLookup (or None): a timed one carries
        its plain-step and row-cost figures over (properties of the model on this machine, not
        of the text), so a generation does not start by re-measuring them with a probe; where
        they say no draft can pay, its pause goes on too."""
        self.ids = ids                      # the text so far (the caller appends to it)
        self.index: list[dict] = [{} for _ in range(self.N)]   # n-gram (n = 1..N) -> follower position
        self.done = 0                       # followers ids[:done] are indexed
        # per match length n: decayed (accepted tokens, rejections) of its drafts, prior included
        self.hits = [[p * self.PRIOR_WEIGHT, (1.0 - p) * self.PRIOR_WEIGHT] for p in self.PRIOR]
        self.row_cost = self.ROW_COST       # c: an extra verify row in plain steps
        self.plain: deque = deque(maxlen=self.RECENT)   # seconds of the last plain steps
        self.costs: deque = deque(maxlen=self.RECENT)   # c of the last verify passes
        self.k = self.n = 0                 # the last draft's length and match length
        self.pause, self.backoff, self.probe = 0, 1, False
        self.since_plain = 0                # drafts since the last timed plain step
        self.proposed = self.accepted = self.passes = self.probes = 0
        self.timed = timed                  # may the timings decide (greedy only)
        if timed and before is not None and before.timed and before.costs:
            self.plain.extend(before.plain)
            self.costs.extend(before.costs)
            self.row_cost = statistics.median(self.costs)
            if self.best_k(1.0, self.K_MAX)[1] < self.MARGIN:
                self.pause, self.probe = before.pause, before.probe   # its long pause goes on: a
                # probe every BACKOFF_MAX tokens across short generations, not none at all

    def p(self, n: int) -> float:
        """Estimated chance that a token drafted from an n-token match is accepted."""
        a, r = self.hits[n - 1]
        return a / (a + r)

    def best_k(self, p: float, limit: int) -> tuple[int, float]:
        """(k, expected tokens per plain step) of the best draft of 1..limit tokens."""
        best, gain, e, pj = 0, 1.0, 1.0, 1.0
        for k in range(1, limit + 1):
            pj *= p
            e += pj                          # 1 + p + ... + p^k tokens ...
            g = e / (1.0 + self.row_cost * k)   # ... for 1 + c k steps
            if g > gain:
                best, gain = k, g
        return best, gain

    def timed_step(self, seconds: float) -> None:
        """A plain decode step took `seconds`."""
        self.plain.append(seconds)
        self.since_plain = 0

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that may follow the text (empty: decode plainly)."""
        if self.pause > 0:
            self.pause -= 1
            self.probe = self.pause == 0     # after the pause: a one-token probe if no draft pays
            return []
        if self.timed and (not self.plain or self.since_plain >= self.REPLAIN):
            return []                        # a plain step to time (the caller reports it)
        ids, L = self.ids, len(self.ids)
        for i in range(max(self.done, 1), L):           # index the followers added since
            for n in range(1, min(self.N, i) + 1):
                self.index[n - 1][tuple(ids[i - n:i])] = i
        self.done = L
        if limit <= 0:
            return []
        for n in range(min(self.N, L - 1), 0, -1):
            i = self.index[n - 1].get(tuple(ids[L - n:]))
            if i is not None:
                break
        else:
            return []
        k, gain = self.best_k(self.p(n), min(limit, self.K_MAX, L - i))
        if gain < self.MARGIN:
            if not self.probe:               # no draft pays: pause, then probe
                if self.best_k(1.0, self.K_MAX)[1] < self.MARGIN:
                    self.backoff = self.BACKOFF_MAX   # rows cost so much that not even drafts
                self.pause = self.backoff             # accepted whole would pay: a long pause
                self.backoff = min(self.BACKOFF_MAX, 2 * self.backoff)
                return []
            k = 1
            self.probes += 1
        else:
            self.backoff = 1                 # it pays: the next pause starts short again
        self.probe = False
        self.k, self.n = k, n
        self.since_plain += 1
        return ids[i:i + k]

    def result(self, drafted: int, accepted: int, seconds: float = 0.0) -> None:
        """Learn from a verify pass of `drafted` tokens (the last draft) of which `accepted` were
        accepted, which took `seconds`."""
        self.proposed += drafted
        self.accepted += accepted
        if self.n:
            h = self.hits[self.n - 1]
            h[0] = self.DECAY * h[0] + accepted
            h[1] = self.DECAY * h[1] + (accepted < drafted)
        if self.timed and seconds > 0.0 and self.plain and drafted > 0:
            c = (seconds / statistics.median(self.plain) - 1.0) / drafted
            self.costs.append(min(max(c, 0.0), self.C_MAX))
            self.row_cost = statistics.median(self.costs)


def _generate(net, prompt_ids, max_new_tokens, sampler, eos_ids, ignore_eos, constraint=None, speculative=False):
    cache = net.cache
    keep = reuse_prefix(net, cache, prompt_ids)
    logits = net.prefill(prompt_ids[keep:])
    ch = TokenChooser(prompt_ids, max_new_tokens, sampler, eos_ids, ignore_eos, constraint, cache.n_ctx)
    history = ch.history                    # the text so far (the chooser appends each token)
    spec = PromptLookup(history, timed=sampler.temperature == 0.0, before=net.last_lookup) if speculative else None
    if spec is not None:
        net.last_lookup = spec              # its counts (`minilm bench`, tests), its figures (the next one)
    pending: list = []      # [(drafted token, logits after it)] of the last verify pass, in order
    drafted = 0             # tokens in that pass's draft
    pass_s = 0.0            # seconds that pass took
    try:
        while (tok := ch.choose(logits, pending[0][0] if pending else None)) is not None:
            yield tok
            if ch.left == 0:
                return
            if pending:
                if pending[0][0] == tok:           # drafted and accepted: its pass gave the next logits
                    logits = pending.pop(0)[1]
                    if not pending:
                        spec.result(drafted, drafted, pass_s)
                    continue
                spec.result(drafted, drafted - len(pending), pass_s)
                pending = []
                cache.truncate(len(history) - 1)   # forget the rejected draft (tok is not in the cache)
            # a draft of at most the tokens still wanted after the next one, within n_ctx
            limit = min(ch.left - 1, cache.n_ctx - len(history), net.state.rows - 1)
            draft = spec.draft(limit) if spec is not None else []
            if draft and net.rope_depends_on_length(len(history) + len(draft)):
                draft = []                         # RoPE would change with the length: decode plainly
            if not draft:
                if spec is None:
                    logits = net.decode(tok)
                else:
                    t0 = time.perf_counter()
                    logits = net.decode(tok)
                    spec.timed_step(time.perf_counter() - t0)
                continue
            spec.passes += 1
            t0 = time.perf_counter()
            rows = net.decode_rows([tok, *draft])  # [1 + len(draft), V]: row j follows draft[j - 1]
            pass_s = time.perf_counter() - t0
            logits = rows[0]
            pending = list(zip(draft, rows[1:]))
            drafted = len(draft)
    finally:
        if pending:                                # stopped inside a draft: keep only what was used
            cache.truncate(cache.common_prefix(history))


class TextStream:
    """Turns token ids into text pieces: never splits a UTF-8 character (holds back a trailing
    U+FFFD until the rest of its bytes arrive) and never emits text that may start a stop string."""

    def __init__(self, tokenizer, prompt_ids, stop):
        self.tok = tokenizer
        self.ctx = list(prompt_ids[-_CTX_TOKENS:])   # left context of the undecided tail
        self.ctx_text = tokenizer.decode(self.ctx)
        self.ids: list[int] = []
        self.tail: list[int] = []    # ids after the settled text (decoded again each token)
        self.settled = ""             # text of the continuation up to the tail
        self.stop = stop
        self.sent = 0          # chars of the continuation already emitted
        self.done = False

    def _decode_after(self, ctx, ctx_text, ids) -> str:
        full = self.tok.decode(ctx + ids)
        if full.startswith(ctx_text):
            return full[len(ctx_text):]
        return self.tok.decode(ids)

    def text(self) -> str:
        """The continuation's text so far. Only the last tokens (the tail) are decoded again per
        token: once the tail is long, its head is settled when decoding it with its left
        context gives the same text as decoding everything (so a long stream costs O(1) per
        token instead of decoding the whole continuation each time)."""
        t = self._decode_after(self.ctx, self.ctx_text, self.tail)
        whole = self.settled + t
        if len(self.tail) >= 2 * _TAIL_TOKENS:
            self._settle(t)
        return whole

    def _settle(self, t):
        head, rest = self.tail[:-_TAIL_TOKENS], self.tail[-_TAIL_TOKENS:]
        h = self._decode_after(self.ctx, self.ctx_text, head)
        ctx = (self.ctx + head)[-_CTX_TOKENS:]
        ctx_text = self.tok.decode(ctx)
        if (h.endswith("\ufffd") or not t.startswith(h)
                or self._decode_after(ctx, ctx_text, rest) != t[len(h):]):
            return                   # not separable here (a character or word still open): later
        self.settled += h
        self.ctx, self.ctx_text, self.tail = ctx, ctx_text, rest

    def push(self, tok: int) -> str:
        """Add a token; return the new safe-to-show text (may be ''). Sets done on a stop string."""
        self.ids.append(tok)
        self.tail.append(tok)
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
