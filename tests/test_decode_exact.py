"""Every row of a multi-token pass is bit-identical to decoding that token alone.

Speculative decoding verifies drafted tokens with one pass over several rows and keeps a token
only when it is the one plain decoding would have produced; that needs the logits of row m of a
pass to equal, bit for bit, the logits of decoding token m on its own (kernels/executor.py:
attention splits each token's cached positions as decode does, the float matmuls run each token
with the gemv's arithmetic). Checked for every weight format in quant.FORMATS (as layer matrices
and as the lm head), for sliding-window models (Gemma 2 / Gemma 3 proxies, window 32) past their
window, for the LFM2 convolution and for GPT-2 / NeoX, at lengths where decode splits a token's
positions across the threads.
"""
from __future__ import annotations

import numpy as np
import pytest

import minilm
from minilm.lm import LM
from minilm.quant import FORMATS, Linear

from conftest import shared_path


def _decoded(net, ids) -> np.ndarray:
    """f32[len(ids), V]: each token decoded alone (M = 1) from an empty cache."""
    net.cache.reset()
    return np.stack([net.decode(int(t)).copy() for t in ids])


def _check_exact(m, ids, verify_at=(3, 70, 101)):
    """A whole-prompt pass and short verify-like passes (4 rows on top of a cache) against
    token-by-token decoding: np.array_equal at every position."""
    net = m.net
    ids = np.asarray(ids, np.int64)
    with net.busy:
        one = _decoded(net, ids)
        net.cache.reset()
        full = net.all_logits(ids)
        bad = [i for i in range(len(ids)) if not np.array_equal(full[i], one[i])]
        assert not bad, (f"{len(bad)} of {len(ids)} rows of the prefill pass differ from decoding, first at "
                         f"{bad[0]} (max |diff| {np.abs(full[bad[0]] - one[bad[0]]).max():.3g})")
        for a in verify_at:                        # a pass of 4 tokens after `a` cached ones
            net.cache.reset()
            net.prefill(ids[:a])
            rows = net.all_logits(ids[a:a + 4])
            for i in range(len(rows)):
                assert np.array_equal(rows[i], one[a + i]), f"verify pass at {a}: row {i} differs from decoding"
        net.cache.reset()


def _text_ids(m, n):
    text = shared_path("texts", "tinyshakespeare_input.txt").read_text()[2000:6000]
    ids = m.tokenizer.encode(text)[:n]
    assert len(ids) == n
    return ids


def test_every_format_as_layer_matrix_and_head():
    """proxy-llama256 (every width a multiple of 256) with its matrices spread over all the
    formats of quant.FORMATS (one executor compile for all of them) and the lm head, in turn,
    in f32 / f16 / bf16 / q8_0 / q4_0 / a K-quant: 130-token prompt, prefill == decode."""
    folder = shared_path("models", "proxy-llama256-shakespeare")
    base = minilm.load(folder, n_ctx=160)
    names = list(FORMATS)
    mats = sorted(k for k, t in base.tensors.items() if isinstance(t, Linear) and k not in ("tok_embd", "output"))
    assert len(mats) >= len(names) - 1, mats
    tensors = dict(base.tensors)
    for i, k in enumerate(mats):                   # every format on at least one layer matrix
        w = base.tensors[k].arrays["w"]
        tensors[k] = Linear.quantize(w, names[i % len(names)], name=k)
    used = {tensors[k].fmt for k in mats}
    assert used == set(names), set(names) - used
    ids = _text_ids(base, 130)
    head_w = base.tensors.get("output", base.tensors["tok_embd"]).arrays["w"]
    for head in ("f32", "f16", "bf16", "q8_0", "q4_0", "q6_k"):
        t = dict(tensors, output=Linear.quantize(head_w, head, name="output"))
        m = LM(base.config, t, base.tokenizer, n_ctx=160)
        if head == "f32":
            _check_exact(m, ids)                   # the layer matrices, attention split across threads
        else:
            # a head's rows do not depend on the position: 43 tokens (a prefill of 10 blocks of
            # 4 rows and 3 more) and two 4-row verify passes check its prefill against its decode
            _check_exact(m, ids[:43], verify_at=(3, 33))


# f32 on every model; int4 on Gemma 2 (soft-caps, window) and LFM2 (the conv, its f32 history table
# beside Q4_0 matrices): Q4_0's rows, beside every other format, are checked above; int4 on
# stories260K: its FFN width 172 ends in a Q4_0 row group of 12 rows (16-row groups, the rest padding).
@pytest.mark.parametrize("name,quant", [(n, None) for n in ("proxy-gemma3-shakespeare", "proxy-gemma2-shakespeare",
                                                           "proxy-lfm2-shakespeare", "proxy-gpt2-shakespeare",
                                                           "proxy-neox-shakespeare")]
                         + [("proxy-gemma2-shakespeare", "int4"), ("proxy-lfm2-shakespeare", "int4"),
                            ("stories260K", "int4")])
def test_prefill_equals_decode(name, quant):
    """Sliding windows (32) crossed many times, Gemma 2's soft-caps, LFM2's convolution,
    learned positions and parallel residuals: 180 tokens, prefill == decode."""
    m = minilm.load(shared_path("models", name), quant=quant, n_ctx=256)
    _check_exact(m, _text_ids(m, 180), verify_at=(3, 31, 64, 150))
