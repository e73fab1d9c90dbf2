"""Batched generation for the server: one scheduler thread owns the model and advances every
active sequence by one token per weight pass.

    sched = Scheduler(model, parallel=4)
    for tok in sched.tokens(model, prompt_ids, max_new_tokens, sampler, eos_ids, constraint=state):
        ...                          # from any thread: generate_tokens' arguments and results

Each request is a sequence with its own KV-cache slot (1..parallel; slot 0 stays the library's,
so `LM.generate` and friends keep working beside the server), its own `TokenChooser` (sampler,
output constraint, EOS, budget) and an output queue that its request thread reads. The loop:

1. admit waiting sequences first-in first-out while a slot is free: the free slot holding the
   longest prefix of the prompt (a returning conversation lands where its previous turn is
   cached), else the one free the longest; the cached prefix is kept (`reuse_prefix`);
2. one step, holding `net.busy` (library calls on the same model take turns with steps): one
   pass over the weights (`Transformer.decode_rows`) with one token of every decoding sequence
   and the next prompt chunks of the sequences still reading theirs, oldest first (at most
   PROMPT_CHUNK rows while others decode, so their inter-token latency stays bounded), so a new
   request starts while the others decode. The pass that ends a prompt runs without the decode
   rows (they run in the next pass; never two passes in a row): each extra row costs a new
   request's first token time (TTFT), and the decode rows would only have saved their own wait.
   (Models whose RoPE depends on the sequence length run a prompt chunk with `prefill_chunks`,
   then the decode rows.) A greedy sequence that decodes on its own speculates as
   `generate_tokens` does: its prompt-lookup draft rides in its pass and is verified there
   (sampled ones do not: their seeded text would depend on when they ran alone). Not beside other
   rows: today each extra row of a pass costs ~0.45 of a one-row step, so draft rows beside
   others' decode rows cost about what they could save (benchmarks/README.md);
3. sequences that finished (EOS, budget, constraint, stop string seen by the reader) or were
   cancelled (client gone) leave and free their slot; the others are not disturbed.

A sequence's tokens are exactly those it gets alone (greedy): every row of a pass is
bit-identical to that token decoded alone, whatever else shares the pass.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

from .generate import PromptLookup, TokenChooser, check_room, check_speculative, reuse_prefix

_END = object()
DEFAULT_MAX_PARALLEL = 8       # default --parallel: at most this many, fewer if memory is short
PROMPT_CHUNK = 64              # prompt rows per pass while other sequences decode (their latency bound)


def default_parallel(model, available: int | None = None) -> tuple[int, str]:
    """(number of concurrent sequences that fits, a sentence saying why): half the memory
    available now, divided by one slot's KV cache at the model's n_ctx, at most
    DEFAULT_MAX_PARALLEL (a 1-slot minimum)."""
    from .loader import available_memory
    per = model.net.cache.slot_nbytes
    avail = available_memory() if available is None else available
    if avail is None:
        return DEFAULT_MAX_PARALLEL, f"{per / 2**20:.0f} MiB of KV cache per sequence (n_ctx={model.n_ctx}); " \
                                     "free memory unknown"
    n = max(1, min(DEFAULT_MAX_PARALLEL, avail // 2 // max(per, 1)))
    return int(n), (f"{per / 2**20:.0f} MiB of KV cache per sequence at n_ctx={model.n_ctx}, "
                    f"{avail / 2**30:.1f} GiB available (budget: half)")


def check_parallel(model, n, available: int | None = None) -> int:
    """--parallel N: an integer >= 1 whose KV cache fits in the available memory."""
    from .errors import ResourceLimitError
    from .loader import available_memory
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"parallel={n!r}: must be an integer >= 1")
    per = model.net.cache.slot_nbytes
    avail = available_memory() if available is None else available
    if avail is not None and n * per > avail:
        raise ResourceLimitError(
            f"parallel={n}: {n} sequences need {n * per:,} bytes of KV cache ({per:,} each at "
            f"n_ctx={model.n_ctx}) but only {avail:,} bytes are available; parallel <= {max(1, avail // per)} "
            f"fits (or load the model with a smaller n_ctx)")
    return n


def start_thread(target, name: str) -> threading.Thread:
    """Start a daemon thread running target() with the calling thread's Numba thread count:
    Numba's setting is per thread, so a new thread would otherwise run the kernels with the
    default count whatever `load(threads=...)` / `--threads` set."""
    try:
        import numba
        n = numba.get_num_threads()
    except Exception:                    # numba unusable here: the kernels will say so themselves
        n = None

    def run():
        if n:
            import numba
            numba.set_num_threads(n)
        target()
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


class Seq:
    """One request's sequence: prompt, chooser, slot, next token, and the queue its reader reads."""

    def __init__(self, ids, chooser: TokenChooser, cancel, spec: PromptLookup | None = None):
        self.ids = ids
        self.chooser = chooser
        self.spec = spec                     # prompt-lookup drafts (speculative decoding) or None
        self.cancel = cancel                 # threading.Event or None: the client went away
        self.out: queue.SimpleQueue = queue.SimpleQueue()   # token ids, then _END or an exception
        self.slot = -1
        self.todo = None                     # prompt ids still to run (mixed passes)
        self.prefill = None                  # or: Transformer.prefill_chunks iterator (length-dependent RoPE)
        self.next_tok = None                 # the token to decode next
        self.closed = False                  # the reader stopped reading

    def gone(self) -> bool:
        return self.closed or (self.cancel is not None and self.cancel.is_set())


class Scheduler:
    """The thread that runs every sequence of a model (see the module docstring)."""

    def __init__(self, model, parallel: int, chunk: int = PROMPT_CHUNK, first_alone: bool = True):
        """chunk: prompt rows per pass while other sequences decode; first_alone: a pass that
        ends a prompt runs without the decode rows (see _mixed_step)."""
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r}: must be an integer >= 1")
        self.model, self.net = model, model.net
        self.parallel = parallel
        with self.net.busy:
            self.net.set_slots(parallel + 1)          # slot 0: the library's
        self.free = collections.deque(range(1, parallel + 1))   # free slots, longest-free first
        self.waiting: collections.deque = collections.deque()
        self.active: list[Seq] = []
        self.cv = threading.Condition()
        self.steps = self.decoded = 0                 # passes run, tokens decoded in batches
        self.mixed = 0                                # passes with prompt rows beside decode rows
        self.drafted = self.accepted = 0              # speculative draft tokens: verified, accepted
        self.reused = 0                               # prompt tokens found in a slot's cache
        self.chunk, self.first_alone = chunk, first_alone
        self.held = False                             # the decoding sequences sat out the last pass
        self._stop = False
        self.t = start_thread(self._loop, "minilm-scheduler")

    # ---- the readers' side ---------------------------------------------------------------
    def tokens(self, model, prompt_ids, max_new_tokens, sampler, eos_ids=(), ignore_eos=False, constraint=None,
               cancel=None, speculative=True):
        """generate_tokens' arguments and results, generated by the scheduler: yields the new token
        ids; closing the iterator (or setting `cancel`) takes the sequence out at the next step.
        speculative: draft by prompt lookup while this is the only sequence decoding, greedy
        requests only (off under a constraint and with a length-dependent RoPE): the tokens are
        those of plain decoding. A sampled request would draw other (equally distributed) tokens
        whenever it happened to decode alone, so its seed would no longer fix its text."""
        if model is not self.model:
            raise ValueError("Scheduler.tokens: this scheduler runs another model")
        check_speculative(speculative)
        check_room(model, prompt_ids, max_new_tokens)
        ch = TokenChooser(prompt_ids, max_new_tokens, sampler, eos_ids, ignore_eos, constraint, model.n_ctx)
        spec = PromptLookup(ch.history) if speculative and constraint is None and sampler.temperature == 0.0 \
            and not self.net.length_dependent_rope else None
        seq = Seq(list(prompt_ids), ch, cancel, spec)
        return self._read(seq)

    def _read(self, seq: Seq):
        with self.cv:
            self.waiting.append(seq)
            self.cv.notify()
        try:
            while True:
                try:
                    item = seq.out.get(timeout=0.25)
                except queue.Empty:
                    if seq.gone():
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            seq.closed = True
            with self.cv:
                self.cv.notify()

    def pending(self) -> int:
        """Sequences waiting for a slot or running."""
        with self.cv:
            return len(self.waiting) + len(self.active)

    def stop(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()

    # ---- the scheduler thread ------------------------------------------------------------
    def _loop(self):
        while True:
            with self.cv:
                while not self._stop and not self.active and not any(not q.gone() for q in self.waiting):
                    self.waiting.clear()                      # only abandoned ones were left
                    self.cv.wait()
                if self._stop:
                    for q in list(self.waiting) + self.active:
                        q.out.put(_END)
                    return
                admit = []
                while self.waiting and self.free:
                    q = self.waiting.popleft()
                    if q.gone():
                        q.out.put(_END)
                        continue
                    q.slot = self._pick_slot(q.ids)
                    admit.append(q)
            with self.net.busy:
                for q in admit:
                    self._start(q)
                self._step()

    def _pick_slot(self, ids) -> int:
        """The free slot holding the longest prefix of ids, else the one free the longest."""
        slots = self.net.cache.slots
        best, n = self.free[0], 0
        for s in self.free:
            c = slots[s].common_prefix(ids)
            if c > n:
                best, n = s, c
        self.free.remove(best)
        return best

    def _start(self, q: Seq):
        try:
            cache = self.net.cache.slots[q.slot]
            keep = reuse_prefix(self.net, cache, q.ids)
            self.reused += keep
            if self.net.length_dependent_rope:
                q.prefill = self.net.prefill_chunks(q.ids[keep:], q.slot)
            else:
                q.todo = q.ids[keep:]
        except Exception as e:
            self._fail(q, e)
            return
        self.active.append(q)

    def _finish(self, q: Seq, item=_END):
        # the slot is free (and q no longer active) before the reader sees the end: a follow-up
        # request sent the moment an answer ends finds its prefix in that slot
        if q in self.active:
            self.active.remove(q)
        if q.slot >= 0:
            with self.cv:
                self.free.append(q.slot)
            q.slot = -1
        q.out.put(item)

    def _fail(self, q: Seq, e: BaseException):
        self._finish(q, e)

    def _emit(self, q: Seq, logits):
        """Choose q's next token from its logits and hand it to the reader."""
        try:
            tok = q.chooser.choose(logits)
        except Exception as e:                         # that request fails; the others go on
            self._fail(q, e)
            return
        if tok is None:
            self._finish(q)
            return
        q.out.put(tok)
        if q.chooser.left == 0:
            self._finish(q)
        else:
            q.next_tok = tok

    def _step(self):
        for q in [q for q in self.active if q.gone()]:
            self._finish(q)
        if not self.net.length_dependent_rope:
            self._mixed_step()
            return
        reading = next((q for q in self.active if q.prefill is not None), None)
        if reading is not None:                        # one chunk of the oldest prompt
            try:
                logits = next(reading.prefill)
            except Exception as e:
                self._fail(reading, e)
                logits = None
            if logits is not None:
                reading.prefill = None
                self._emit(reading, logits)
        batch = [q for q in self.active if q.prefill is None and q.next_tok is not None]
        if not batch:
            return
        toks = [q.next_tok for q in batch]
        slots = [q.slot for q in batch]
        for q in batch:
            q.next_tok = None
        try:
            out = self.net.decode_rows(toks, slots)    # [B, V]
        except Exception as e:                         # nothing sensible to continue: all fail
            for q in batch:
                self._fail(q, e)
            return
        self.steps += 1
        self.decoded += len(batch)
        for b, q in enumerate(batch):
            self._emit(q, out[b])

    def _mixed_step(self):
        """One pass (`Transformer.decode_rows`): the next prompt chunks of the sequences still
        reading theirs (oldest first; at most `chunk` rows while others decode, so their
        inter-token latency stays bounded) and one token of every decoding sequence. A pass that
        ends a prompt (gives a new request its first token) runs without the decode rows, so
        they do not delay that token, unless the decoding sequences sat out the previous pass
        too (they never wait two passes in a row). A sequence decoding on its own (no other row
        in the pass) speculates: its prompt-lookup draft rides in the pass (`_emit_verified`).
        Every row is bit-identical to decoding it alone, so how prompts are cut and rows grouped
        does not change any answer."""
        net = self.net
        decode = [q for q in self.active if q.todo is None and q.next_tok is not None]
        budget = net.state.rows - len(decode)
        if decode:
            budget = min(budget, self.chunk)
        feed = []                                     # (sequence, prompt rows it runs now)
        for q in self.active:
            if q.todo is not None and budget > 0:
                k = min(len(q.todo), budget)
                feed.append((q, k))
                budget -= k
        held = bool(decode) and self.first_alone and not self.held and any(k == len(q.todo) for q, k in feed)
        if held:
            decode = []                               # they run in the next pass
        self.held = held
        toks, slots, rows, outs = [], [], [], []      # rows: which rows' logits; outs: whose
        for q, k in feed:
            toks += q.todo[:k]
            slots += [q.slot] * k
            q.todo = q.todo[k:]
            if not q.todo:
                q.todo = None
                rows.append(len(toks) - 1)
                outs.append(q)
        for q in decode:
            toks.append(q.next_tok)
            slots.append(q.slot)
            rows.append(len(toks) - 1)
            outs.append(q)
            q.next_tok = None
        draft = []
        solo = decode[0] if len(decode) == 1 and not feed and decode[0].spec is not None else None
        if solo is not None:                          # the only row: speculate as generate_tokens does
            ch = solo.chooser
            draft = solo.spec.draft(min(ch.left - 1, net.cache.n_ctx - len(ch.history), net.state.rows - 1))
            toks += draft
            slots += [solo.slot] * len(draft)
            rows += list(range(len(toks) - len(draft), len(toks)))
        if not toks:
            return
        t0 = time.perf_counter()
        try:
            logits = net.decode_rows(toks, slots, rows)   # [len(rows), V]
        except Exception as e:                         # nothing sensible to continue: all fail
            for q in {q for q, _ in feed} | set(outs):
                self._fail(q, e)
            return
        seconds = time.perf_counter() - t0
        self.steps += 1
        self.decoded += len(decode)
        self.mixed += bool(decode) and bool(feed)
        if draft:
            self._emit_verified(solo, logits, draft, seconds)
            return
        if solo is not None:
            solo.spec.timed_step(seconds)
        for i, q in enumerate(outs):
            self._emit(q, logits[i])

    def _emit_verified(self, q: Seq, logits, draft, seconds: float):
        """A verify pass of q's next token and `draft` (logits [1 + k, V], row j after draft[j - 1]):
        choose tokens while they agree with the draft (greedy: identical to decoding one by one),
        hand them to the reader, and roll q's KV cache back past the rejected draft tokens."""
        ch, cache = q.chooser, self.net.cache.slots[q.slot]
        accepted, tok, end = 0, None, None
        for j in range(len(draft) + 1):
            try:
                tok = ch.choose(logits[j], draft[j] if j < len(draft) else None)
            except Exception as e:                    # that request fails; the others go on
                end = e
                break
            if tok is None:                           # EOS, or nothing left
                end = _END
                break
            q.out.put(tok)
            self.decoded += j > 0
            if ch.left == 0:
                end = _END
                break
            if j == len(draft) or tok != draft[j]:
                break
            accepted += 1
        q.spec.passes += 1
        q.spec.result(len(draft), accepted, seconds)
        self.drafted += len(draft)
        self.accepted += accepted
        cache.truncate(min(cache.common_prefix(ch.history), len(ch.history) - 1))   # past the rejected draft
        if end is not None:
            self._finish(q, end)
        else:
            q.next_tok = tok                          # all but this one are in the cache
