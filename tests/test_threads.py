"""A model shared between threads: calls are serialized, never interleaved; two models used from
two threads at once share no scratch memory. Every threaded answer equals the single-thread one."""
from __future__ import annotations

import threading

import pytest

import minilm

from conftest import shared_path

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed", "KING HENRY:"]


def _run_threads(jobs):
    """jobs: list of callables; run them all at once, return their results (re-raising errors)."""
    out, errs = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def work(i, f):
        try:
            start.wait()
            out[i] = f()
        except BaseException as e:        # noqa: BLE001 - reported below
            errs.append(e)
    ts = [threading.Thread(target=work, args=(i, f)) for i, f in enumerate(jobs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=600)
        assert not t.is_alive(), "a generate thread did not finish (deadlock?)"
    if errs:
        raise errs[0]
    return out


@pytest.fixture(scope="module")
def qwen3():
    return minilm.load(shared_path("models", "proxy-qwen3-shakespeare"), n_ctx=256)


@pytest.mark.parametrize("n", [2, 4])
def test_threads_on_one_model(qwen3, n):
    m = qwen3
    want = {p: m.generate(p, max_new_tokens=24) for p in PROMPTS[:n]}
    got = _run_threads([lambda p=p: m.generate(p, max_new_tokens=24) for p in PROMPTS[:n]])
    assert got == [want[p] for p in PROMPTS[:n]]
    # streamed generations from several threads: each stream is whole and right
    got = _run_threads([lambda p=p: "".join(m.generate(p, max_new_tokens=24, stream=True)) for p in PROMPTS[:n]])
    assert got == [want[p] for p in PROMPTS[:n]]
    # logits calls interleaved with generations
    ids = m.tokenizer.encode(PROMPTS[0])
    ref = m.logits(ids)
    got = _run_threads([lambda: m.logits(ids), lambda: m.generate(PROMPTS[1], max_new_tokens=24)])
    assert (got[0] == ref).all() and got[1] == want[PROMPTS[1]]


def test_two_models_in_two_threads(qwen3):
    """Different models (and formats: the int4 one uses the quantized kernels' scratch) run at the
    same time from two threads, each with its own run state."""
    a = qwen3
    b = minilm.load(shared_path("models", "proxy-qwen3-shakespeare"), quant="int4", n_ctx=256)
    c = minilm.load(shared_path("models", "proxy-qwen2-shakespeare"), quant="int8", n_ctx=256)
    want = [a.generate(PROMPTS[0], max_new_tokens=32), b.generate(PROMPTS[1], max_new_tokens=32),
            c.generate(PROMPTS[2], max_new_tokens=32)]
    for _ in range(2):
        got = _run_threads([lambda: a.generate(PROMPTS[0], max_new_tokens=32),
                            lambda: b.generate(PROMPTS[1], max_new_tokens=32),
                            lambda: c.generate(PROMPTS[2], max_new_tokens=32)])
        assert got == want


def test_same_thread_reentry_is_an_error_not_a_deadlock(qwen3):
    m = qwen3
    want = m.generate(PROMPTS[0], max_new_tokens=8)
    g = m.generate(PROMPTS[0], max_new_tokens=8, stream=True)
    next(g)                                          # the stream holds the model
    with pytest.raises(minilm.MinilmError, match="close"):
        m.logits([1, 2, 3])
    g.close()                                        # released: the model works again
    assert m.generate(PROMPTS[0], max_new_tokens=8) == want
