"""Prompt-lookup speculative decoding (minilm/generate.py): the same tokens as plain decoding
(greedy), the same distribution (sampling), and stop strings, EOS, max_new_tokens, n_ctx and
streaming exactly as without it."""
from __future__ import annotations

import numpy as np
import pytest

import minilm
from minilm.generate import PromptLookup, generate_tokens
from minilm.sampling import Sampler

from conftest import shared_path


def _grounded(m, n_passage=60, n_lead=12):
    """A passage, then its first n_lead tokens again: the continuation can copy the passage."""
    text = shared_path("texts", "tinyshakespeare_input.txt").read_text()[3000:5000]
    ids = m.tokenizer.encode(text)[:n_passage]
    return ids + ids[:n_lead]


def _load(name, quant=None, n_ctx=256):
    return minilm.load(shared_path("models", name), quant=quant, n_ctx=n_ctx)


# One model per architecture family and the formats' kinds of kernel (float, Q4_0, a K-quant):
# every format's verify rows equal its decoded ones in test_decode_exact.py (Q8_0 too), and the
# tests below speculate on proxy-llama256 in Q4_0.
@pytest.mark.parametrize("name,quant", [
    ("proxy-llama256-shakespeare", None), ("proxy-llama256-shakespeare", "q4_k"),
    ("proxy-gemma3-shakespeare", None), ("proxy-gemma2-shakespeare", "int4"),
    ("proxy-gpt2-shakespeare", None), ("proxy-neox-shakespeare", "int4"),
    ("proxy-lfm2-shakespeare", None), ("proxy-lfm2-shakespeare", "int4"),
    ("stories260K", None)])
def test_greedy_identical_with_and_without(name, quant, untimed_drafts):
    """Greedy: token for token the same output, on a grounded prompt where drafts are proposed,
    accepted and rejected (the rejected ones roll the KV cache / LFM2 conv history back), then a
    free prompt; the counts show speculation really ran."""
    m = _load(name, quant)
    prompt = _grounded(m)
    plain = m.generate_ids(prompt, max_new_tokens=100, ignore_eos=True, speculative=False)
    spec = m.generate_ids(prompt, max_new_tokens=100, ignore_eos=True)
    assert spec == plain
    st = m.net.last_lookup
    assert st.passes > 0 and st.proposed > st.accepted > 0, vars(st)
    free = m.generate_ids([prompt[0]], max_new_tokens=60, ignore_eos=True)
    assert free == m.generate_ids([prompt[0]], max_new_tokens=60, ignore_eos=True, speculative=False)


def test_rollback_across_the_sliding_window():
    """Gemma 3 proxy (window 32): a verify pass that runs past position 32, then a rollback to
    before it and other tokens: every logit equals a fresh token-by-token decode."""
    m = _load("proxy-gemma3-shakespeare")
    net = m.net
    ids = _grounded(m, 40, 0)[:40]
    with net.busy:
        net.cache.reset()
        want = np.stack([net.decode(t).copy() for t in ids])
        net.cache.reset()
        net.prefill(ids[:29])
        net.decode_rows([ids[29], 7, 8, 9, 10, 11, 12])      # rows at positions 29..35, drafts wrong
        net.cache.truncate(30)                               # keep ids[29]; drop 7..12
        got = [net.decode_rows(ids[30:34]).copy(), *[net.decode(t).copy()[None] for t in ids[34:]]]
        net.cache.reset()
    np.testing.assert_array_equal(np.concatenate(got), want[30:])


def test_stop_eos_and_streaming_as_without():
    """A stop string and an EOS id that fall inside accepted drafts end the text where plain
    decoding ends it; streamed pieces are the same pieces."""
    m = _load("proxy-llama256-shakespeare", "int4")
    prompt = _grounded(m)
    plain_ids = m.generate_ids(prompt, max_new_tokens=80, ignore_eos=True, speculative=False)
    text = m.tokenizer.decode(plain_ids)
    stop = text[len(text) // 2: len(text) // 2 + 4]
    for kw in (dict(stop=stop), dict()):
        a = list(m.generate(prompt, max_new_tokens=80, stream=True, speculative=False, **kw))
        b = list(m.generate(prompt, max_new_tokens=80, stream=True, **kw))
        assert a == b
    eos = plain_ids[40]                                  # the first place it occurs ends both
    first = plain_ids.index(eos)
    for spec in (False, True):
        s = Sampler(m.config.vocab_size)
        got = list(generate_tokens(m, prompt, 80, s, eos_ids=[eos], speculative=spec))
        assert got == plain_ids[:first]
    # the cache holds nothing of an unused draft: a second call reusing the prefix agrees
    assert m.generate_ids(prompt, max_new_tokens=80, ignore_eos=True) == plain_ids


def test_n_ctx_edge():
    """Generation up to the last slot of the cache: drafts never run past n_ctx."""
    m = _load("proxy-llama256-shakespeare", "int4", n_ctx=100)
    prompt = _grounded(m)
    n = 100 - len(prompt)
    plain = m.generate_ids(prompt, max_new_tokens=n, ignore_eos=True, speculative=False)
    assert len(plain) == n
    assert m.generate_ids(prompt, max_new_tokens=n, ignore_eos=True) == plain
    assert m.net.cache.pos <= 100


def test_sampling_is_seeded_and_uses_the_rule():
    """With sampling, a fixed seed gives the same text twice, and drafts were verified."""
    m = _load("proxy-llama256-shakespeare", "int4")
    prompt = _grounded(m)
    kw = dict(max_new_tokens=60, ignore_eos=True, temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=5)
    a = m.generate_ids(prompt, **kw)
    assert m.net.last_lookup.passes > 0
    assert m.generate_ids(prompt, **kw) == a


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.8, top_k=3),
                                    dict(temperature=1.3, top_p=0.7, min_p=0.05),
                                    dict(temperature=1.0, repetition_penalty=1.5)])
def test_verify_keeps_the_distribution(params):
    """Sampler.verify in isolation on a 6-token vocabulary: for every draft (likely, unlikely,
    removed by top-k / top-p), the drawn tokens follow `distribution` (chi-square, 20000 draws,
    fixed seed), and greedy verify is the argmax."""
    logits = np.array([2.0, 1.5, 0.3, -0.5, 1.0, -2.0], np.float32)
    history = [0, 4]
    s = Sampler(6, seed=1234, **params)
    p = s.distribution(logits, history)
    n = 20000
    for draft in range(6):
        counts = np.bincount([s.verify(logits, history, draft) for _ in range(n)], minlength=6)
        assert counts[p == 0].sum() == 0, (draft, counts, p)
        e = n * p[p > 0]
        chi2 = float(((counts[p > 0] - e) ** 2 / e).sum())
        assert chi2 < 25.0, (draft, counts, e, chi2)        # dof <= 5: p-value ~1e-4
    g = Sampler(6)
    assert all(g.verify(logits, history, d) == 0 for d in range(6))


def test_prompt_lookup_drafts_the_longest_match():
    """The most recent earlier occurrence of the longest suffix (3, 2, 1 tokens) gives the
    draft, as long as the expected-value rule picks, within the caller's limit."""
    ids = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 1, 2, 3]
    pl = PromptLookup(ids, timed=False)
    pl.hits[2] = [9.0, 1.0]                      # 3-token matches: 90 % of drafted tokens accepted
    assert pl.p(3) == pytest.approx(0.9) and pl.best_k(0.9, 12)[0] == 4
    assert pl.draft(10) == [4, 9, 2, 3]          # "1 2 3" at 0: followed by 4 9 2 3 (k = 4)
    pl.result(4, 4)
    assert pl.p(3) > 0.9 and (pl.proposed, pl.accepted) == (4, 4)
    ids += [8]                                   # "2 3 8", "3 8", "8": never seen before
    assert pl.draft(10) == []
    ids += [7, 1, 2]                             # "7 1 2" at 9: followed by 3 8 7 1 2
    assert pl.draft(2) == [3, 8]                 # limited by the caller
    assert pl.draft(0) == []


def test_best_k_weighs_acceptance_against_row_cost():
    """A draft of k yields 1 + p + ... + p^k tokens for 1 + c k steps: none while p <= c, longer
    drafts as p grows or rows get cheaper."""
    pl = PromptLookup([1, 2, 3], timed=False)
    assert pl.row_cost == PromptLookup.ROW_COST == 0.4
    assert pl.best_k(0.4, 12) == (0, 1.0) and pl.best_k(0.3, 12)[0] == 0
    ks = [pl.best_k(p, 12)[0] for p in (0.5, 0.7, 0.9, 0.97)]
    assert ks == sorted(ks) and ks[0] >= 1 and ks[-1] > ks[0]
    k, gain = pl.best_k(0.9, 12)
    assert gain == pytest.approx(sum(0.9 ** j for j in range(k + 1)) / (1 + 0.4 * k))
    assert pl.best_k(0.9, 2)[0] == 2             # the limit
    pl.row_cost = 0.05                           # a busy machine: a row is almost free
    assert pl.best_k(0.9, 12)[0] > k


def test_prompt_lookup_pauses_and_probes_when_no_draft_pays():
    """A match whose drafts are not accepted often enough pauses drafting (doubling), then a
    one-token probe checks whether that changed; a draft that pays resets the pause."""
    ids = [5, 1, 6, 2, 7, 1]                     # only "1" (at 1) matches: a 1-token match
    pl = PromptLookup(ids, timed=False)
    assert pl.p(1) < pl.row_cost                 # the prior: 1-token matches do not pay
    assert [pl.draft(10) for _ in range(3)] == [[], [], [6]]   # no pay: pause 1, then a probe
    assert pl.probes == 1
    pl.result(1, 0)
    assert [pl.draft(10) for _ in range(4)] == [[], [], [], [6]]   # pause 2, then a probe
    pl.result(1, 1)                              # accepted, but one probe does not make it pay:
    assert pl.backoff == 4 and pl.draft(10) == []    # the pauses keep doubling
    pl.hits[0] = [9.0, 1.0]                      # 1-token matches accepted 90 %: a draft pays
    pl.pause = 0
    assert pl.draft(10) != [] and pl.backoff == 1    # and the pause starts again at 1
    assert (pl.proposed, pl.accepted, pl.probes) == (2, 1, 2)


def test_prompt_lookup_measures_the_row_cost():
    """Greedy (timed): a plain step is timed first; a verify pass of k + 1 rows over the plain
    steps' time gives the cost of a row, which sets how long drafts are (or stops them)."""
    ids = [1, 2, 3, 4, 9, 8, 7, 6, 5, 1, 2, 3]
    pl = PromptLookup(ids)
    pl.hits[2] = [9.0, 1.0]
    assert pl.draft(10) == []                    # no plain step timed yet: decode plainly
    pl.timed_step(0.010)                         # plain steps: 10 ms
    k = len(pl.draft(10))
    assert k == 4
    pl.result(k, 0, seconds=0.010 * (1 + 0.1 * k))   # a row costs 0.1 of a step
    assert pl.row_cost == pytest.approx(0.1)     # the first pass replaces the prior (0.4)
    for t in (0.010, 0.5, 0.010):                # plain steps: their median (10 ms), not a
        pl.timed_step(t)                         # descheduled one's 500 ms
    for _ in range(3):
        pl.result(k, 0, seconds=0.010 * (1 + 0.2 * k))   # rows at 0.2 of a step
    pl.result(k, 0, seconds=1.0)                 # one pass descheduled: the median holds
    assert pl.row_cost == pytest.approx(0.2)
    pl.hits[2] = [9.0, 1.0]
    assert len(pl.draft(12)) > k                 # cheaper rows: longer drafts
    for _ in range(PromptLookup.RECENT):
        pl.result(4, 0, seconds=0.010 * 10)      # a row costs more than a step
    assert pl.row_cost > 1.0
    pl.hits[2] = [9.0, 1.0]
    assert pl.draft(12) == []                    # not even a draft accepted whole pays now:
    assert pl.pause == PromptLookup.BACKOFF_MAX  # a long pause (then a probe re-measures)


def test_row_cost_carries_over_to_the_next_generation(monkeypatch):
    """A timed PromptLookup starts from the previous one's figures (the model on this machine),
    so where rows cost more than a step it pauses at once instead of probing first; an untimed
    one (sampling) does not take them."""
    ids = [1, 2, 3, 4, 9, 8, 7, 6, 5, 1, 2, 3]
    a = PromptLookup(ids)
    a.timed_step(0.010)
    a.hits[2] = [9.0, 1.0]
    a.draft(10)
    a.result(4, 0, seconds=0.010 * 10)           # rows at 2.25 steps
    b = PromptLookup(list(ids), before=a)
    assert b.row_cost == a.row_cost > 1.0 and list(b.plain) == [0.010]
    b.hits[2] = [9.0, 1.0]
    assert b.draft(10) == [] and b.pause == PromptLookup.BACKOFF_MAX and b.passes == 0
    for _ in range(10):
        b.draft(10)
    b2 = PromptLookup(list(ids), before=b)       # no draft can pay: b's pause goes on (a probe
    assert b2.pause == b.pause == PromptLookup.BACKOFF_MAX - 10   # every 64 tokens, not never)
    c = PromptLookup(list(ids), timed=False, before=a)
    assert c.row_cost == PromptLookup.ROW_COST and not c.plain
    m = _load("proxy-llama256-shakespeare", "int4")
    seen = []
    init = PromptLookup.__init__

    def spy(self, ids, timed=True, before=None):
        seen.append(before)
        init(self, ids, timed, before)
    monkeypatch.setattr(PromptLookup, "__init__", spy)
    m.generate_ids(_grounded(m), max_new_tokens=30)
    first = m.net.last_lookup
    m.generate_ids(_grounded(m), max_new_tokens=30)
    assert seen[-1] is first and m.net.last_lookup is not first   # the model's previous one


def test_sampled_drafting_does_not_depend_on_timings():
    """With sampling, drafting decides which random draws are taken: it must follow the text
    alone (a seed gives the same text on a busy machine), so the timings are greedy-only."""
    ids = [1, 2, 3, 4, 9, 1, 2, 3]
    pl = PromptLookup(ids, timed=False)
    pl.timed_step(0.001)
    pl.hits[2] = [9.0, 1.0]
    assert pl.draft(10) == [4, 9, 1, 2]
    pl.result(4, 4, seconds=10.0)                # far slower than a plain step: ignored
    assert pl.row_cost == PromptLookup.ROW_COST and pl.draft(10) != []
    m = _load("proxy-llama256-shakespeare", "int4")
    m.generate_ids(_grounded(m), max_new_tokens=4, temperature=0.7, seed=1)
    assert m.net.last_lookup.timed is False
    m.generate_ids(_grounded(m), max_new_tokens=4)
    assert m.net.last_lookup.timed is True


def test_speculative_argument_checked():
    m = _load("stories260K")
    with pytest.raises(ValueError, match="speculative"):
        m.generate("Once", max_new_tokens=2, speculative="yes")
    with pytest.raises(ValueError, match="speculative"):
        m.create_completion("Once", max_tokens=2, speculative=1)
