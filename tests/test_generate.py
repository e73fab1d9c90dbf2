"""Generation on the shared models: greedy, seeded sampling, stop strings, streaming, EOS,
KV-cache reuse (perplexity against the goldens: test_golden.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import minilm
from minilm.generate import TextStream

from conftest import GOLDEN_MODELS, shared_path, write_checkpoint

STORIES = "stories260K"
GPT2 = "proxy-gpt2-shakespeare"
PROMPT = "Once upon a time, there was a little"


def golden(name):
    return json.loads(shared_path("golden", f"{name}.json").read_text())


@pytest.fixture(scope="module")
def stories(shared_model):
    return shared_model(STORIES)


@pytest.fixture(scope="module")
def gpt2(shared_model):
    return shared_model(GPT2)


# ---- greedy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_greedy_matches_golden(shared_model, name):
    m, g = shared_model(name), golden(name)
    for case in g["cases"][:2]:
        assert m.encode_prompt(case["prompt"]) == case["input_ids"]
        ids = m.generate_ids(case["prompt"], g["greedy_new_tokens"])
        assert ids == case["greedy_new_ids"]
        text = m.generate(case["prompt"], max_new_tokens=g["greedy_new_tokens"])
        # the continuation keeps its leading space: prompt + text is the decoded whole
        assert case["prompt"] + text == m.tokenizer.decode(case["input_ids"] + ids)
        assert text.strip() == case["greedy_text"].strip()


def test_greedy_is_default(stories):
    a = stories.generate(PROMPT, max_new_tokens=20)
    b = stories.generate(PROMPT, max_new_tokens=20, temperature=0.0)
    c = stories.generate(PROMPT, max_new_tokens=20, temperature=0, seed=123)
    assert a == b == c and len(a) > 20


def test_greedy_equals_argmax_of_logits(stories):
    """generate (prefill + decode with the cache) == argmax over full-sequence logits."""
    ids = stories.encode_prompt(PROMPT)
    got = stories.generate_ids(ids, 12, ignore_eos=True)
    seq = list(ids)
    for _ in range(12):
        seq.append(int(np.argmax(stories.logits(seq)[-1])))
    assert got == seq[len(ids):]


# ---- sampling ----------------------------------------------------------------------------------
def test_same_seed_same_text(stories, gpt2):
    for m in (stories, gpt2):
        a = m.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=7)
        b = m.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=7)
        assert a == b


def test_different_seed_different_text(stories):
    texts = {stories.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=s) for s in range(5)}
    assert len(texts) >= 3          # 5 seeds at temperature 1 give (at least mostly) distinct text


def test_unseeded_sampling_runs(stories):
    assert len(stories.generate_ids(PROMPT, 5, temperature=1.0, ignore_eos=True)) == 5


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999, top_k=0)])
def test_degenerate_sampling_is_greedy(stories, kw):
    greedy = stories.generate_ids(PROMPT, 20, ignore_eos=True)
    for seed in (0, 1):
        assert stories.generate_ids(PROMPT, 20, ignore_eos=True, temperature=1.0, seed=seed, **kw) == greedy


def test_sampling_filters_change_output(stories):
    base = [stories.generate_ids(PROMPT, 30, temperature=1.5, seed=s, ignore_eos=True) for s in range(3)]
    topk = [stories.generate_ids(PROMPT, 30, temperature=1.5, seed=s, top_k=3, ignore_eos=True) for s in range(3)]
    assert base != topk


def test_repetition_penalty_changes_greedy(stories):
    a = stories.generate_ids(PROMPT, 40, ignore_eos=True)
    b = stories.generate_ids(PROMPT, 40, ignore_eos=True, repetition_penalty=1.5)
    assert a != b
    assert len(set(b)) >= len(set(a))


def test_max_new_tokens_zero(stories):
    assert stories.generate(PROMPT, max_new_tokens=0) == ""
    assert stories.generate_ids(PROMPT, 0) == []


# ---- stop strings ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def greedy_with_boundaries(stories):
    """The greedy continuation and the character offsets of its token boundaries."""
    n = 30
    full = stories.generate(PROMPT, max_new_tokens=n)
    bounds = [len(stories.generate(PROMPT, max_new_tokens=k)) for k in range(1, n)]
    for k, b in enumerate(bounds):
        assert full.startswith(stories.generate(PROMPT, max_new_tokens=k + 1))
    return full, bounds, n


def _spanning_stop(full, bounds):
    """A 4-char stop string that straddles a token boundary (2 chars each side) and first occurs
    there."""
    for b in bounds[3:]:
        s = full[b - 2:b + 2]
        if len(s) == 4 and s.strip() == s and full.find(s) == b - 2 and b - 2 not in bounds:
            return s, b - 2
    pytest.fail(f"no token-spanning stop string found in {full!r}")


def test_stop_string_spanning_tokens(stories, greedy_with_boundaries):
    full, bounds, n = greedy_with_boundaries
    s, at = _spanning_stop(full, bounds)
    out = stories.generate(PROMPT, max_new_tokens=n, stop=s)
    assert out == full[:at], (s, out, full)
    assert s not in out
    pieces = list(stories.generate(PROMPT, max_new_tokens=n, stop=s, stream=True))
    assert "".join(pieces) == out
    assert all(pieces)
    # as a list, with a string that never occurs
    assert stories.generate(PROMPT, max_new_tokens=n, stop=["@@@", s]) == full[:at]


def test_stop_string_earliest_wins(stories, greedy_with_boundaries):
    full, bounds, n = greedy_with_boundaries
    s, at = _spanning_stop(full, bounds)
    early = full[3:6]
    i = full.find(early)
    out = stories.generate(PROMPT, max_new_tokens=n, stop=[s, early])
    assert out == full[:i]
    assert "".join(stories.generate(PROMPT, max_new_tokens=n, stop=[s, early], stream=True)) == out


def test_stop_string_absent_and_at_start(stories, greedy_with_boundaries):
    full, bounds, n = greedy_with_boundaries
    assert stories.generate(PROMPT, max_new_tokens=n, stop="@@@") == full
    assert "".join(stories.generate(PROMPT, max_new_tokens=n, stop="@@@", stream=True)) == full
    assert stories.generate(PROMPT, max_new_tokens=n, stop=full[:3]) == ""


def test_stop_string_with_sampling(gpt2):
    for seed in range(4):
        full = gpt2.generate("ROMEO:\n", max_new_tokens=40, temperature=1.0, seed=seed)
        s = full[10:13]
        if not s.strip():
            continue
        out = gpt2.generate("ROMEO:\n", max_new_tokens=40, temperature=1.0, seed=seed, stop=s)
        assert out == full[:full.find(s)]
        pcs = list(gpt2.generate("ROMEO:\n", max_new_tokens=40, temperature=1.0, seed=seed, stop=s, stream=True))
        assert "".join(pcs) == out


# ---- streaming ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, seed=3), dict(temperature=0.8, seed=11, top_p=0.9)])
@pytest.mark.parametrize("name", [STORIES, GPT2])
def test_stream_concatenates_to_text(shared_model, name, kw):
    m = shared_model(name)
    text = m.generate(PROMPT, max_new_tokens=40, **kw)
    pieces = list(m.generate(PROMPT, max_new_tokens=40, stream=True, **kw))
    assert "".join(pieces) == text
    assert len(pieces) > 5 and all(isinstance(p, str) and p for p in pieces)


def test_stream_no_replacement_char_when_sampling_multibyte(gpt2):
    """Sampling hot over many seeds gives curly quotes and other non-ASCII output; whenever the
    final text is valid UTF-8 (no U+FFFD), no streamed piece may hold one either."""
    multibyte = 0
    for seed in range(30):
        kw = dict(max_new_tokens=40, temperature=1.5, seed=seed)
        text = gpt2.generate("Café ", **kw)
        pieces = list(gpt2.generate("Café ", stream=True, **kw))
        assert "".join(pieces) == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), (seed, pieces)
            multibyte += any(ord(c) > 127 for c in text)
    assert multibyte >= 2


@pytest.mark.parametrize("name,text", [(GPT2, "Café – “né” €"), (STORIES, "a €5 café ☃ b")])
def test_textstream_holds_split_characters(shared_model, name, text):
    """Tokens that each carry part of a UTF-8 character (byte-level BPE bytes, or sentencepiece
    byte-fallback <0xE2><0x82><0xAC>) are streamed without U+FFFD and add up to the text."""
    m = shared_model(name)
    tok = m.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "test text has no split characters"
    prompt = tok.encode("Hello", add_special_tokens=True)
    ts = TextStream(tok, prompt, [])
    pieces = [ts.push(i) for i in ids] + [ts.finish()]
    assert not any("\ufffd" in p for p in pieces), pieces
    assert "".join(pieces) == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert "".join(pieces).strip() == text


@pytest.mark.parametrize("name", [STORIES, GPT2, "proxy-qwen3-shakespeare"])
def test_textstream_long_stream_equals_whole_decode(shared_model, name):
    """A long stream settles its text as it goes (it does not decode the whole continuation per
    token); what it emits must still be exactly the continuation decoded in one piece after the
    prompt, for generated text and for random ids (byte tokens that split characters)."""
    tok = shared_model(name).tokenizer
    prompt = tok.encode("Hello", add_special_tokens=True)
    rng = np.random.default_rng(0)
    text_ids = tok.encode(" Café – “né” €5 ☃ the end. " * 12, add_special_tokens=False)
    # random whole-character tokens (a random run of byte tokens is not valid UTF-8, and its
    # decoded text changes as bytes arrive: no stream can emit that early)
    whole_chars = [i for i in rng.integers(0, tok.vocab_size, 1200) if "\ufffd" not in tok.decode([int(i)])]
    for ids in (text_ids, [int(i) for i in whole_chars[:400]]):
        ts = TextStream(tok, prompt, [])
        pieces = [ts.push(i) for i in ids] + [ts.finish()]
        whole = tok.decode(prompt[-4:] + ids)[len(tok.decode(prompt[-4:])):]
        assert "".join(pieces) == whole
        assert len(ts.tail) < 40          # the settled part is not decoded again


def test_textstream_stop_across_split_character(gpt2):
    tok = gpt2.tokenizer
    ids = tok.encode("the café is open", add_special_tokens=False)
    ts = TextStream(tok, tok.encode("Hi"), ["é is"])
    out = ""
    for i in ids:
        out += ts.push(i)
        if ts.done:
            break
    assert ts.done and out == "the caf"


# ---- EOS ---------------------------------------------------------------------------------------
def test_ignore_eos_false_output_is_prefix(stories, gpt2):
    for m in (stories, gpt2):
        for seed in range(3):
            a = m.generate_ids(PROMPT, 40, temperature=1.2, seed=seed)
            b = m.generate_ids(PROMPT, 40, temperature=1.2, seed=seed, ignore_eos=True)
            assert b[:len(a)] == a
            assert len(a) == 40 or b[len(a)] in m.eos_token_ids


def _eos_model(tmp_path, eos_in, where):
    cfg = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=96,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    folder = tmp_path / f"eos{where}"
    if where == "config":
        cfg["eos_token_id"] = eos_in
    write_checkpoint(folder, cfg, tokenizer="gpt2", std=0.3, seed=5)
    if where == "generation_config":
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eos_in]}))
    return minilm.load(str(folder), n_ctx=64)


@pytest.mark.parametrize("where", ["config", "generation_config"])
def test_stops_at_eos(tmp_path, where):
    """The 6th greedy token of a random model is made its EOS: generation stops right before it
    (also when the EOS id comes from generation_config.json)."""
    m0 = _eos_model(tmp_path, 2, "base")
    prompt = [5, 17, 99, 300, 42]
    toks = m0.generate_ids(prompt, 20, ignore_eos=True)
    k = next(i for i in range(3, 20) if toks[i] not in toks[:i])
    m = _eos_model(tmp_path, toks[k], where)
    assert toks[k] in m.eos_token_ids
    assert m.generate_ids(prompt, 20) == toks[:k]
    assert m.generate_ids(prompt, 20, ignore_eos=True) == toks
    text = m.generate(prompt, max_new_tokens=20)
    assert text == m.generate(prompt, max_new_tokens=k)
    assert "".join(m.generate(prompt, max_new_tokens=20, stream=True)) == text


# ---- KV cache reuse ----------------------------------------------------------------------------
def test_generate_twice_same_result(stories, gpt2):
    for m in (stories, gpt2):
        a = m.generate(PROMPT, max_new_tokens=25)
        b = m.generate(PROMPT, max_new_tokens=25)
        assert a == b
        c = m.generate(PROMPT, max_new_tokens=25, temperature=1.0, seed=4)
        d = m.generate(PROMPT, max_new_tokens=25, temperature=1.0, seed=4)
        assert c == d


def test_prefix_reuse_gives_fresh_result(stories):
    """A prompt that extends (or shares only part of) the previous call's context gives the same
    tokens as a fresh greedy loop over full-sequence logits."""
    p1 = stories.encode_prompt(PROMPT)
    out1 = stories.generate_ids(p1, 10, ignore_eos=True)
    for p2 in (p1 + out1[:4], p1 + out1 + [300, 301], p1[:5] + [400, 401], p1[:1] + [3]):
        got = stories.generate_ids(p2, 8, ignore_eos=True)
        seq = list(p2)
        for _ in range(8):
            seq.append(int(np.argmax(stories.logits(seq)[-1])))
        stories.generate_ids(p1, 10, ignore_eos=True)          # leave another context cached
        assert got == seq[len(p2):], p2


def test_logits_independent_of_prior_generate(stories):
    ids = stories.encode_prompt("Tom and his dog went to the park")
    a = stories.logits(ids).copy()
    stories.generate("Lily wanted to", max_new_tokens=30, temperature=1.0, seed=1)
    b = stories.logits(ids)
    stories.generate_ids(ids, 5)                           # same prefix cached
    c = stories.logits(ids)
    scale = float(np.abs(a).max())
    assert np.abs(a - b).max() <= 1e-6 * scale and np.abs(a - c).max() <= 1e-6 * scale
    # and generate is not changed by logits (the cache is reset, not corrupted)
    g1 = stories.generate_ids(ids, 8, ignore_eos=True)
    stories.logits(ids[:3])
    assert stories.generate_ids(ids, 8, ignore_eos=True) == g1
