"""The sampler on synthetic logits: each step (repetition penalty, temperature, top-k, top-p,
min-p) and their order against hand-computed distributions, exactly which tokens have zero
probability, and that the draws follow `Sampler.distribution`."""
from __future__ import annotations

import numpy as np
import pytest

from minilm.sampling import Sampler

e = np.exp


def f32(*values) -> np.ndarray:
    return np.array(values, np.float32)                      # f32[V], as the model returns logits


def dist(logits, history=(), **kw) -> np.ndarray:
    return Sampler(len(logits), **{"temperature": 1.0, **kw}).distribution(logits, history)


def softmax64(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    w = np.where(np.isneginf(x), 0.0, e(x - x.max()))
    return w / w.sum()


def check(got: np.ndarray, want) -> None:
    """Same zero set exactly; the nonzero probabilities to float64 rounding."""
    want = np.asarray(want, np.float64)
    assert got.dtype == np.float64 and got.shape == want.shape
    assert np.flatnonzero(got == 0).tolist() == np.flatnonzero(want == 0).tolist(), (got, want)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert abs(got.sum() - 1.0) < 1e-12


# ---- each step alone ------------------------------------------------------------------------
def test_plain_softmax():
    check(dist(f32(2, 1, 0, -1, -np.inf)), np.array([e(2), e(1), 1, e(-1), 0]) / (e(2) + e(1) + 1 + e(-1)))


def test_temperature_divides_the_logits():
    want = np.array([e(4), e(2), 1, e(-2)]) / (e(4) + e(2) + 1 + e(-2))          # logits / 0.5
    check(dist(f32(2, 1, 0, -1), temperature=0.5), want)
    want = np.array([e(1), e(0.5), 1, e(-0.5)]) / (e(1) + e(0.5) + 1 + e(-0.5))  # logits / 2
    check(dist(f32(2, 1, 0, -1), temperature=2.0), want)
    check(dist(f32(2, 1, 0, -1), temperature=1e-310), [1, 0, 0, 0])             # no overflow: greedy
    check(dist(f32(2, 1, 2, -np.inf), temperature=1e-310), [0.5, 0, 0.5, 0])


def test_greedy_is_one_hot_at_the_first_argmax():
    check(dist(f32(1, 3, 3, 0), temperature=0.0), [0, 1, 0, 0])
    s = Sampler(4, temperature=0.0, top_k=1, top_p=0.1, min_p=0.5)
    assert s(f32(1, 3, 3, 0), []) == 1
    check(s.distribution(f32(1, 3, 3, 0)), [0, 1, 0, 0])


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = f32(2, 3, 0, 2, 1, 2)
    want = np.array([e(2), e(3), 0, e(2), 0, e(2)]) / (e(3) + 3 * e(2))          # k=2: 3 and all the 2s
    check(dist(logits, top_k=2), want)
    check(dist(logits, top_k=1), [0, 1, 0, 0, 0, 0])
    want = np.array([e(2), e(3), 0, e(2), e(1), e(2)]) / (e(3) + 3 * e(2) + e(1))
    check(dist(logits, top_k=5), want)
    check(dist(logits, top_k=6), softmax64(logits))                               # k >= V: off
    check(dist(logits, top_k=100), softmax64(logits))
    check(dist(f32(2, 2, 1), top_k=1), [0.5, 0.5, 0])                             # tie at the top


def test_top_p_keeps_the_smallest_set_reaching_it():
    p = np.array([0.15, 0.5, 0.05, 0.3])
    logits = np.log(p).astype(np.float32)
    q = softmax64(logits)                                   # p as the f32 logits give it
    # 0.5 (nothing above: kept), 0.3 (0.5 above < 0.7: kept), 0.15 (0.8 above: removed)
    check(dist(logits, top_p=0.7), np.array([0, q[1], 0, q[3]]) / (q[1] + q[3]))
    check(dist(logits, top_p=0.9), np.array([q[0], q[1], 0, q[3]]) / (q[0] + q[1] + q[3]))
    check(dist(logits, top_p=0.4), [0, 1, 0, 0])
    check(dist(logits, top_p=1e-6), [0, 1, 0, 0])
    check(dist(logits, top_p=1.0), q)


def test_top_p_exactly_on_a_cumulative_boundary():
    # Eight equal logits: probabilities are exactly 1/8 and their running sums exact, so top_p=0.5
    # is reached by exactly 4 tokens. Equal probabilities rank by token id (lower first).
    logits = np.zeros(8, np.float32)
    check(dist(logits, top_p=0.5), [0.25] * 4 + [0] * 4)
    check(dist(logits, top_p=0.5 + 1e-9), [0.2] * 5 + [0] * 3)
    check(dist(logits, top_p=0.5 - 1e-9), [0.25] * 4 + [0] * 4)
    check(dist(logits, top_p=0.125), [1] + [0] * 7)
    logits[5] = -np.inf                                     # 7 tokens of 1/7: the masked one stays 0
    check(dist(logits, top_p=3 / 7 + 1e-9), [0.25] * 4 + [0] * 4)


def top_p_by_full_sort(p: np.ndarray, top_p: float) -> np.ndarray:
    """The definition, on the whole vocabulary: keep a token when the mass ranked above it (most
    likely first, equal probabilities by token id) is < top_p."""
    order = np.argsort(-p, kind="stable")
    above = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    q = p.copy()
    q[order[above >= top_p]] = 0
    return q / q.sum()


@pytest.mark.parametrize("scale, top_p", [(4.0, 0.9), (4.0, 0.3), (0.5, 0.9), (0.01, 0.95)])
def test_top_p_on_a_large_vocabulary(scale, top_p):
    # V = 8192: a peaked distribution has its nucleus among the 1024 most likely tokens (the
    # sampler then sorts only those), a flat one does not (it sorts everything); same answer.
    logits = (np.random.default_rng(5).standard_normal(8192) * scale).astype(np.float32)
    check(dist(logits, top_p=top_p), top_p_by_full_sort(softmax64(logits), top_p))


def test_top_p_on_a_large_vocabulary_of_ties():
    logits = np.zeros(4096, np.float32)                     # p = 2^-12 exactly, all tied
    check(dist(logits, top_p=0.5), [2 ** -11] * 2048 + [0] * 2048)
    logits[:3000] = 1.0                                     # 3000 tied at the top, more than 1024
    q = softmax64(logits)
    check(dist(logits, top_p=0.5), top_p_by_full_sort(q, 0.5))
    assert np.flatnonzero(dist(logits, top_p=0.5)).tolist() == list(range(int(np.ceil(0.5 / q[0]))))


def test_min_p_is_relative_to_the_largest_probability():
    # 50 tokens at logit 0 and 50 at log(0.4): every probability is below 0.015, so an absolute
    # threshold of 0.5 would remove everything; relative to the max (1/70) it removes the 0.4s.
    logits = np.array([0.0] * 50 + [np.log(0.4)] * 50, np.float32)
    check(dist(logits, min_p=0.5), [1 / 50] * 50 + [0] * 50)
    check(dist(logits, min_p=0.3), softmax64(logits))
    check(dist(logits + 7.0, min_p=0.5), [1 / 50] * 50 + [0] * 50)     # a shift changes nothing
    q = softmax64(f32(1, 0, 2, -1))
    keep = q >= 0.3 * q.max()                                            # e^0/e^2 = 0.135 < 0.3
    check(dist(f32(1, 0, 2, -1), min_p=0.3), np.where(keep, q, 0) / q[keep].sum())


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = f32(2.0, -1.0, 0.5, 0.0, -3.0)
    history = [0, 1, 1, 3, 0]                               # repeats count once
    check(dist(logits, history, repetition_penalty=2.0), softmax64([1.0, -2.0, 0.5, 0.0, -3.0]))
    check(dist(logits, history, repetition_penalty=0.5), softmax64([4.0, -0.5, 0.5, 0.0, -3.0]))
    check(dist(logits, [], repetition_penalty=2.0), softmax64(logits))
    check(dist(logits, history, repetition_penalty=1.0), softmax64(logits))
    # greedy takes the penalized argmax
    s = Sampler(2, temperature=0.0, repetition_penalty=2.0)
    assert s(f32(2.0, 1.5), [0]) == 1 and s(f32(2.0, 1.5), [1]) == 0
    check(s.distribution(f32(2.0, 1.5), [0]), [0, 1])
    check(Sampler(2, temperature=0.0, repetition_penalty=2.0).distribution(f32(-1.0, -1.5), [0]), [0, 1])


# ---- the order of the steps -----------------------------------------------------------------
def test_temperature_comes_before_top_p():
    # T=1: 0.665 + 0.245 -> top_p 0.8 keeps two tokens; T=0.5 sharpens to 0.867, which alone reaches 0.8.
    logits = f32(2, 1, 0)
    check(dist(logits, top_p=0.8), np.array([e(2), e(1), 0]) / (e(2) + e(1)))
    check(dist(logits, top_p=0.8, temperature=0.5), [1, 0, 0])


def test_top_k_comes_before_top_p():
    # top-k 2 renormalizes 0.4, 0.3 to 0.571, 0.429: the first alone reaches top_p 0.5.
    # (top-p first would keep 0.4 and 0.3.)
    logits = np.log([0.4, 0.3, 0.2, 0.1]).astype(np.float32)
    check(dist(logits, top_k=2, top_p=0.5), [1, 0, 0, 0])


def test_top_p_comes_before_min_p():
    # transformers: top-p then min-p. 0.5, 0.3, 0.1, 0.1 with top_p 0.6 keeps 0.5 and 0.3 (0.625,
    # 0.375); min_p 0.3 of 0.625 then removes nothing. (min-p first would leave 0.625, 0.375 and
    # top-p would then keep only the first.)
    logits = np.log([0.5, 0.3, 0.1, 0.1]).astype(np.float32)
    q = softmax64(logits)
    check(dist(logits, top_p=0.6, min_p=0.3), np.array([q[0], q[1], 0, 0]) / (q[0] + q[1]))


def test_all_steps_together():
    logits = f32(3.0, -0.5, 2.5, 1.0, -2.0, 0.0, 2.875, -1.0)                # exact in f32
    history = [0, 4, 7]
    kw = dict(repetition_penalty=1.5, temperature=0.7, top_k=5, top_p=0.9, min_p=0.1)
    x = np.array([2.0, -0.5, 2.5, 1.0, -3.0, 0.0, 2.875, -1.5]) / 0.7     # 1: penalty (ids 0, 4, 7), 2: T
    x[x < np.sort(x)[-5]] = -np.inf                                       # 3: top-k 5
    p = softmax64(x)
    order = np.argsort(-p, kind="stable")
    above = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    p[order[above >= 0.9]] = 0                                            # 4: top-p 0.9
    p /= p.sum()
    p[p < 0.1 * p.max()] = 0                                              # 5: min-p 0.1
    p /= p.sum()
    got = dist(logits, history, **kw)
    check(got, p)
    assert np.flatnonzero(got).tolist() == [0, 2, 6]                      # written out, not only computed


# ---- the draws --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=3),
                                dict(temperature=1.2, top_p=0.8, min_p=0.05, repetition_penalty=1.3)])
def test_draws_follow_the_distribution(kw):
    logits = f32(1.0, 0.2, -0.5, 2.0, 0.7, -3.0, 1.5, 0.0)
    history = [3, 3, 5]
    s = Sampler(8, seed=1234, **kw)
    p = s.distribution(logits, history)
    n = 20000
    counts = np.bincount([s(logits, history) for _ in range(n)], minlength=8)
    assert (counts[p == 0] == 0).all(), (counts, p)                       # removed tokens never drawn
    sd = np.sqrt(p * (1 - p) / n)                                         # binomial standard deviation
    assert (np.abs(counts / n - p) <= 5 * sd + 1e-12).all(), (counts / n, p)


def test_same_seed_same_draws_and_logits_untouched():
    logits = f32(1.0, 0.2, -0.5, 2.0, 0.7)
    before = logits.copy()
    a = Sampler(5, temperature=1.0, seed=7)
    b = Sampler(5, temperature=1.0, seed=7)
    assert [a(logits, []) for _ in range(50)] == [b(logits, []) for _ in range(50)]
    a.distribution(logits, [0, 1])
    Sampler(5, temperature=1.0, repetition_penalty=2.0)(logits, [0, 3])
    np.testing.assert_array_equal(logits, before)


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("logits, history, match", [
    (np.zeros(4, np.float32), [], r"logits: expected .*shape \(5,\)"),
    (np.zeros((1, 5), np.float32), [], r"logits: expected"),
    (np.zeros(5, np.int64), [], r"logits: expected a float array"),
    (f32(0, np.nan, 0, 0, 0), [], r"logits: 1 NaN or \+inf values \(first at token 1\)"),
    (f32(0, 0, np.inf, 0, 0), [], r"logits: 1 NaN or \+inf values \(first at token 2\)"),
    (np.full(5, -np.inf, np.float32), [], r"logits: every token is -inf"),
    (np.zeros(5, np.float32), [1, 5], r"history: token id 5 outside the vocabulary \[0, 5\)"),
    (np.zeros(5, np.float32), [-1, 2], r"history: token id -1 outside"),
])
def test_bad_input_is_named(logits, history, match):
    for temperature in (0.0, 1.0):
        s = Sampler(5, temperature=temperature, repetition_penalty=1.5)
        with pytest.raises(ValueError, match=match):
            s(logits, history)
        with pytest.raises(ValueError, match=match):
            s.distribution(logits, history)


@pytest.mark.parametrize("kw, name", [(dict(vocab_size=0), "vocab_size"), (dict(vocab_size=2.5), "vocab_size"),
                                      (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
                                      (dict(min_p=1.0), "min_p"), (dict(temperature=-1.0), "temperature"),
                                      (dict(repetition_penalty=0.0), "repetition_penalty")])
def test_bad_parameters_are_named(kw, name):
    with pytest.raises(ValueError, match=name):
        Sampler(**{"vocab_size": 8, **kw})
