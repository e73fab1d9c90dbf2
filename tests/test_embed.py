"""Embeddings (minilm/embed.py): `model.embed` in-process (shape, norm, pooling, chunking, the
cache left clean, errors) and `POST /v1/embeddings` through the openai client, equal to
`model.embed` in-process."""
import base64

import numpy as np
import pytest
from test_constrain import PROXY

from minilm.embed import EmbeddingError

TEXTS = ["To be, or not to be, that is the question.", "My kingdom for a horse!", "a"]


@pytest.fixture(scope="module")
def model(shared_model):
    return shared_model(PROXY)          # one load per session (test_constrain and test_embed share it)


def _reference(model, text, pooling):
    """Pooled hidden states computed one token at a time through forward (no chunking)."""
    ids = model.tokenizer.encode(text)
    model.net.cache.reset()
    hs = np.stack([model.net.forward(np.array([t], np.int64), rope_end=len(ids))[0].copy() for t in ids])  # [T, D]
    model.net.cache.reset()
    v = hs.mean(0) if pooling == "mean" else hs[-1]
    return v / np.linalg.norm(v)


def test_embed_shape_norm_pooling_and_independence(model):
    D = model.config.hidden_size
    e = model.embed(TEXTS)
    assert e.shape == (3, D) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    for i, t in enumerate(TEXTS):           # batched == one at a time (each from position 0)
        np.testing.assert_allclose(model.embed(t)[0], e[i], atol=1e-5)
        np.testing.assert_allclose(e[i], _reference(model, t, "mean"), atol=1e-4)
    last = model.embed(TEXTS, pooling="last")
    np.testing.assert_allclose(last[1], _reference(model, TEXTS[1], "last"), atol=1e-4)
    assert not np.allclose(last, e)
    raw = model.embed(TEXTS, normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), e, atol=1e-5)
    ids = model.tokenizer.encode(TEXTS[0])
    np.testing.assert_allclose(model.embed([ids])[0], e[0], atol=1e-6)
    assert e[0] @ e[1] < 0.9999


def test_long_inputs_run_in_chunks(model):
    long = " ".join(["Once more unto the breach, dear friends."] * 12)
    n = len(model.tokenizer.encode(long))
    assert 100 < n <= model.n_ctx
    full = model.embed(long)
    rows = model.net.state.rows
    try:
        model.net.state.rows = 7               # forward in chunks of 7 rows: same vectors
        chunked = model.embed(long)
    finally:
        model.net.state.rows = rows
    np.testing.assert_allclose(chunked, full, atol=1e-5)


def test_generation_after_embed_is_unaffected(model):
    a = model.generate("ROMEO:", max_new_tokens=10)
    model.embed(["ROMEO: something else entirely", "x"])
    assert model.generate("ROMEO:", max_new_tokens=10) == a


@pytest.mark.parametrize("inp, param, what", [
    ([], "input", "empty"),
    (["ok", ""], "input[1]", "empty string"),
    (["ok", "word " * 400], "input[1]", "longer than the model's context"),
    ([[1, 2], [5, 99999]], "input[1]", "outside"),
    ([["a"]], "input[0]", "expected"),
    (7, "input", "expected"),
])
def test_bad_input_names_the_index(model, inp, param, what):
    with pytest.raises(EmbeddingError, match=what) as e:
        model.embed(inp)
    assert e.value.param == param and str(e.value).startswith(param)
    with pytest.raises(EmbeddingError, match="pooling"):
        model.embed("x", pooling="max")


@pytest.fixture(scope="module")
def server(live_servers):
    return live_servers(PROXY)          # the one test_constrain uses


def test_server_embeddings_equal_in_process(server, model):
    r = server.client.embeddings.create(model="x", input=TEXTS)
    assert [d.index for d in r.data] == [0, 1, 2] and r.object == "list"
    got = np.array([d.embedding for d in r.data], np.float32)
    assert got.shape == (3, model.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, model.embed(TEXTS), atol=1e-5)
    n = sum(len(model.tokenizer.encode(t)) for t in TEXTS)
    assert r.usage.prompt_tokens == n and r.usage.total_tokens == n
    one = server.client.embeddings.create(model="x", input=TEXTS[1])
    np.testing.assert_allclose(one.data[0].embedding, got[1], atol=1e-6)
    # the openai client asks for base64 by default when numpy is present; also plain floats and ids
    b = server.post("/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"}).json()
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), np.float32), got[0], atol=1e-6)
    ids = model.tokenizer.encode(TEXTS[2])
    r = server.post("/v1/embeddings", {"input": [ids], "encoding_format": "float", "pooling": "last"})
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], model.embed([ids], pooling="last")[0], atol=1e-5)


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": ["fine", "word " * 400]}, "input[1]"),
    ({"input": ["fine", ""]}, "input[1]"),
    ({}, "input"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "pooling": "max"}, "pooling"),
])
def test_server_bad_embedding_input_is_400(server, body, param):
    r = server.post("/v1/embeddings", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]
    assert server.healthy()
