"""Multi-row passes: per-row positions and KV-cache slots in one executor pass.

`Transformer.decode_rows` (the one multi-row entry point: batched decode, speculative verify
passes, prompt chunks beside decode rows) gives rows bit-identical to each sequence decoded alone
(np.array_equal of the logits) for a quantized model, an f32 model, a 16-bit model with a
zero-padded matrix and LFM2 (per-slot convolution history); slot 0 stays the library's; bad
arguments are refused. The scheduler in-process: sequences joining while others decode (their
prompts cut into chunks beside the decode rows) get their lone answers. The server side (the
scheduler under concurrent clients) is tests/test_server_batch.py."""
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, shared_path

CHECK = r"""
import sys
import numpy as np
import minilm
path, quant = sys.argv[1], sys.argv[2]
m = minilm.load(path, quant=None if quant == "f32" else quant, n_ctx=160)
net = m.net
net.set_slots(5)
rng = np.random.default_rng(0)
V = m.config.vocab_size
lens = (3, 40, 70, 9)              # 70 + steps > 64: two attention splits on two threads
prompts = [[int(t) for t in rng.integers(0, V, n)] for n in lens]
steps = 6
feeds = [[int(t) for t in rng.integers(0, V, steps)] for _ in lens]
alone = []                          # each sequence alone on slot 0: prefill, then decode
for p, f in zip(prompts, feeds):
    net.cache.reset()
    first = net.prefill(p).copy()
    alone.append([first] + [net.decode(t).copy() for t in f])
for i, p in enumerate(prompts):     # the same sequences on slots 4, 3, 2, 1 (not in order)
    first = net.prefill(p, slot=4 - i)
    assert np.array_equal(first, alone[i][0]), ("prefill", i)
net.cache.reset()
bad = 0
done = [0] * 4                      # tokens decoded per sequence
step = 0
while min(done) < steps:            # sequence 1 sits out every other step: batches differ
    seqs = [i for i in range(4) if done[i] < steps and (i != 1 or step % 2 == 0)]
    seqs = seqs or [i for i in range(4) if done[i] < steps]
    # sequence 2 runs 2 consecutive tokens in one pass on even steps (a verify pass beside the
    # others' decode rows); odd steps ask for the logits of some rows only
    take = {i: min(2 if i == 2 and step % 2 == 0 else 1, steps - done[i]) for i in seqs}
    toks = [feeds[i][done[i] + j] for i in seqs for j in range(take[i])]
    slots = [4 - i for i in seqs for j in range(take[i])]
    who = [(i, done[i] + j + 1) for i in seqs for j in range(take[i])]
    rows = list(range(len(toks))) if step % 2 == 0 else list(range(0, len(toks), 2))
    out = net.decode_rows(np.array(toks, np.int64), slots, None if step % 2 == 0 else rows)
    for b, r in enumerate(rows):
        i, k = who[r]
        if not np.array_equal(out[b], alone[i][k]):
            bad += 1
            print("MISMATCH step", step, "seq", i, np.abs(out[b] - alone[i][k]).max())
    for i in seqs:
        done[i] += take[i]
    step += 1
assert net.cache.pos == 0 and all(net.cache.slots[4 - i].pos == lens[i] + steps for i in range(4))
print("BAD", bad)
"""

CASES = [("proxy-qwen3-shakespeare", "int4"), ("proxy-qwen3-shakespeare", "f32"),
         ("stories260K", "f16"), ("proxy-lfm2-shakespeare", "f32"), ("proxy-lfm2-shakespeare", "int8"),
         ("proxy-gemma2-shakespeare", "f32")]


def _run(script, name, quant):
    """stdout of `script` run in a fresh process on shared model `name` at `quant` (it must exit 0)."""
    r = subprocess.run([sys.executable, "-c", script, str(shared_path("models", name)), quant],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("name,quant", CASES)
def test_decode_rows_equal_lone_decodes(name, quant):
    """Four sequences of different lengths (one past the 64 positions where decode attention
    splits in two) decoded together on slots 1-4, one of them two tokens a pass on every other
    step, some passes returning the logits of a subset of rows: every row's logits equal that
    sequence's lone prefill + decode on slot 0, bit for bit."""
    assert "BAD 0" in _run(CHECK, name, quant)


def test_decode_rows_refuses_bad_arguments(shared_model):
    m = shared_model("stories260K", n_ctx=64)
    net = m.net
    with net.busy:
        net.set_slots(3)
        try:
            for toks, slots, rows, what in (([1], [3], None, "in \\[0, 3\\)"), ([1, 2], [1], None, "one length"),
                                            ([10 ** 6], [1], None, "vocab_size"), ([], [], None, "one length"),
                                            ([1, 2], 1, [1, 0], "increasing"), ([1, 2], 1, [2], "increasing"),
                                            ([1.5], 1, None, "integer"), ([1], True, None, "integer")):
                with pytest.raises(ValueError, match=what):
                    net.decode_rows(np.array(toks), slots, rows)
            assert all(net.cache.slots[i].pos == 0 for i in range(3))     # nothing ran
            net.cache.slots[2].pos = 63                 # a slot with room for one: two rows overflow
            with pytest.raises(Exception, match="context overflow"):
                net.decode_rows(np.array([1, 2], np.int64), 2)
            with pytest.raises(Exception, match="context overflow"):
                net.decode_rows(np.array([1, 2, 3], np.int64), [1, 2, 2])
            assert net.cache.slots[1].pos == 0
        finally:
            net.set_slots(1)
    assert net.cache.n_slots == 1 and len(net.cache.slots) == 1


def test_slot_zero_is_the_library_cache(shared_model):
    """More slots keep slot 0's contents: a prompt cached before set_slots is still reused."""
    m = shared_model("stories260K", n_ctx=64)
    net = m.net
    a = m.generate("Once upon a time", max_new_tokens=6)
    with net.busy:
        tokens, pos = list(net.cache.tokens), net.cache.pos
        k0 = net.cache.k[:, :, :pos].copy()
        net.set_slots(4)
        assert net.cache.tokens == tokens and net.cache.pos == pos
        assert np.array_equal(net.cache.k[:, :, :pos], k0)
        assert net.cache.k.shape == (net.cache.k_all.shape[0],) + net.cache.k_all.shape[2:]
        assert net.cache.nbytes == 4 * net.cache.slot_nbytes
    try:
        assert m.generate("Once upon a time", max_new_tokens=6) == a
    finally:
        with net.busy:
            net.set_slots(1)


def test_scheduler_reuses_a_slots_prefix_and_matches_generate(shared_model):
    """The scheduler in-process: two sequences at once give generate()'s greedy tokens; a
    follow-up prompt that extends the first lands on the slot holding it (its prefix is reused,
    though that slot is not the longest free) and still gives generate()'s tokens."""
    from minilm.batch import Scheduler
    from minilm.sampling import Sampler
    m = shared_model("stories260K", n_ctx=256)
    V = m.config.vocab_size
    p1, p2 = m.tokenizer.encode("Once upon a time"), m.tokenizer.encode("Tom had a big red ball")
    want1, want2 = m.generate_ids(p1, 12), m.generate_ids(p2, 9)
    sched = Scheduler(m, 3)
    try:
        a, b = sched.tokens(m, p1, 12, Sampler(V)), sched.tokens(m, p2, 9, Sampler(V))
        got1, got2 = [next(a)], [next(b)]             # both in flight together
        for x in a:
            got1.append(x)
            got2 += [y for y in [next(b, None)] if y is not None]
        got2 += list(b)
        assert got1 == want1 and got2 == want2
        follow = p1 + want1 + m.tokenizer.encode(" and then", add_special_tokens=False)
        before = sched.reused
        assert list(sched.tokens(m, follow, 6, Sampler(V))) == m.generate_ids(follow, 6)
        assert sched.reused - before >= len(p1) + len(want1) - 1   # all but (at most) the last token
        # a sequence closed by its reader leaves; the one beside it is not disturbed
        a, b = sched.tokens(m, p1, 30, Sampler(V)), sched.tokens(m, p2, 30, Sampler(V))
        next(a), next(a)
        first = next(b)
        a.close()
        assert [first] + list(b) == m.generate_ids(p2, 30)
        deadline = time.time() + 10
        while sched.pending() and time.time() < deadline:
            time.sleep(0.01)
        assert sched.pending() == 0 and sorted(sched.free) == [1, 2, 3]
    finally:
        sched.stop()
        with m.net.busy:
            m.net.set_slots(1)


def test_scheduler_with_longrope_crossing_its_original_context(shared_model):
    """Phi-3's LongRoPE switches factors past 64 positions (the cache is re-run then): the
    scheduler's two-pass steps (prefill_chunks, decode_rows running such rows alone) still give
    each of two sequences generate()'s greedy tokens while both cross position 64."""
    from minilm.batch import Scheduler
    from minilm.sampling import Sampler
    m = shared_model("proxy-phi3-shakespeare", n_ctx=160)
    assert m.net.length_dependent_rope
    V = m.config.vocab_size
    p1 = m.tokenizer.encode("First Citizen: Before we proceed any further, hear me speak.")
    p2 = m.tokenizer.encode("ROMEO: But soft, what light through yonder window breaks? It is the east")
    n = 70 - min(len(p1), len(p2))
    want = [m.generate_ids(p1, n, ignore_eos=True), m.generate_ids(p2, n, ignore_eos=True)]
    sched = Scheduler(m, 2)
    try:
        a, b = sched.tokens(m, p1, n, Sampler(V), ignore_eos=True), sched.tokens(m, p2, n, Sampler(V), ignore_eos=True)
        got = [[], []]
        for x in a:                                   # both in flight together
            got[0].append(x)
            got[1] += [y for y in [next(b, None)] if y is not None]
        got[1] += list(b)
        assert got == want
    finally:
        sched.stop()
        with m.net.busy:
            m.net.set_slots(1)


JOIN = r"""
import sys
import minilm
from minilm.batch import Scheduler
from minilm.sampling import Sampler
path, quant = sys.argv[1], sys.argv[2]
m = minilm.load(path, quant=None if quant == "f32" else quant, n_ctx=256)
V = m.config.vocab_size
enc = m.tokenizer.encode
pa, pb = enc("First Citizen: Before we proceed"), enc("ROMEO: But soft")
pc = enc("KING HENRY: So shaken as we are, so wan with care, find we a time for frighted peace to pant")
want = [m.generate_ids(p, n, ignore_eos=True, speculative=False) for p, n in ((pa, 200), (pb, 200), (pc, 12))]
for first_alone in (True, False):
    sched = Scheduler(m, 3, chunk=8, first_alone=first_alone)
    with m.net.busy:
        for slot in m.net.cache.slots[1:]:
            slot.reset()                                    # no prefix of the last round to reuse
    try:
        a = sched.tokens(m, pa, 200, Sampler(V), ignore_eos=True)
        b = sched.tokens(m, pb, 200, Sampler(V), ignore_eos=True)
        got = [[next(a), next(a)], [next(b), next(b)]]      # both decoding now
        mixed = sched.mixed
        c = list(sched.tokens(m, pc, 12, Sampler(V), ignore_eos=True))   # joins: chunks of 8 beside them
        got[0] += list(a)
        got[1] += list(b)
        print("first_alone", first_alone, "mixed passes", sched.mixed - mixed, "prompt", len(pc))
        assert sched.mixed - mixed >= len(pc) // 8 - 1, ("the prompt did not run beside the decode rows",
                                                        sched.mixed - mixed, len(pc))
        assert got + [c] == want, (got, c, want)
    finally:
        sched.stop()
print("OK")
"""


@pytest.mark.parametrize("name,quant", [("proxy-qwen3-shakespeare", "int4"), ("proxy-lfm2-shakespeare", "int8")])
def test_request_joining_while_others_decode_gets_its_lone_answer(name, quant):
    """A request whose prompt (several chunks of 8 rows) runs in the passes of two decoding
    sequences, its last chunk alone or beside them (both policies): all three get their lone
    greedy tokens; LFM2's convolution state stays per sequence."""
    assert "OK" in _run(JOIN, name, quant)


def test_scheduler_speculates_while_one_sequence_decodes(shared_model, untimed_drafts):
    """A sequence decoding alone drafts by prompt lookup and verifies the drafts in its pass:
    its greedy tokens are those of plain decoding (some drafts accepted, some rolled back);
    with two sequences decoding, they still get their lone answers; speculative=False and
    sampled requests draft nothing (a seeded request's text stays its text)."""
    from minilm.batch import Scheduler
    from minilm.sampling import Sampler
    m = shared_model("stories260K", n_ctx=256)
    V = m.config.vocab_size
    p1 = m.tokenizer.encode("Once upon a time, there was a little girl named Lily. She liked to play. "
                            "Once upon a time, there was")
    p2 = m.tokenizer.encode("Tom had a big red ball")
    want1 = m.generate_ids(p1, 80, ignore_eos=True, speculative=False)
    want2 = m.generate_ids(p2, 30, ignore_eos=True, speculative=False)
    sched = Scheduler(m, 2)
    try:
        assert list(sched.tokens(m, p1, 80, Sampler(V), ignore_eos=True)) == want1
        assert sched.accepted > 0 and sched.drafted > sched.accepted     # accepted and rejected drafts
        a, b = sched.tokens(m, p1, 80, Sampler(V), ignore_eos=True), sched.tokens(m, p2, 30, Sampler(V), ignore_eos=True)
        got1, got2 = [next(a)], [next(b)]
        for x in a:
            got1.append(x)
            got2 += [y for y in [next(b, None)] if y is not None]
        got2 += list(b)
        assert got1 == want1 and got2 == want2
        before = sched.drafted
        assert list(sched.tokens(m, p1, 80, Sampler(V), ignore_eos=True, speculative=False)) == want1
        sampled = m.generate_ids(p1, 40, ignore_eos=True, speculative=False, temperature=0.9, seed=5)
        assert list(sched.tokens(m, p1, 40, Sampler(V, temperature=0.9, seed=5), ignore_eos=True)) == sampled
        assert sched.drafted == before                  # sampled requests do not speculate (seeded text)
        with pytest.raises(ValueError, match="speculative"):
            list(sched.tokens(m, p1, 8, Sampler(V), speculative=1))
    finally:
        sched.stop()
        with m.net.busy:
            m.net.set_slots(1)
