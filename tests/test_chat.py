"""minilm.chat: templates (sandboxed, fallback, BOS), message validation, OpenAI shapes, multi-turn
KV prefix reuse. Needs the test models in ../shared/models (skipped without them)."""
import threading
from pathlib import Path

import pytest

import minilm
from minilm import chat as C

from conftest import SHARED

MODELS = SHARED / "models"
STORIES = MODELS / "stories260K"
QWEN = MODELS / "proxy-qwen2-shakespeare"
needs_models = pytest.mark.skipif(not (STORIES / "config.json").exists() or not (QWEN / "config.json").exists(),
                                  reason=f"test models not found in {MODELS} (../shared/models beside the repo)")

MSGS = [{"role": "system", "content": "You are a storyteller."},
        {"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module", params=["stories260K", "proxy-qwen2-shakespeare"])
def model(request):
    if not (MODELS / request.param / "config.json").exists():
        pytest.skip(f"test model {request.param} not found in {MODELS}")
    return minilm.load(str(MODELS / request.param))


@pytest.fixture(scope="module")
def stories():
    if not (STORIES / "config.json").exists():
        pytest.skip(f"test model stories260K not found in {MODELS}")
    return minilm.load(str(STORIES))


# ---- validation and templates (no model weights needed beyond a tokenizer) ------------------
@pytest.mark.parametrize("messages, param, words", [
    ("hi", "messages", "list"),
    ([], "messages", "at least one"),
    (["hi"], "messages[0]", "object"),
    ([{"content": "x"}], "messages[0].role", "missing"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "x"}], "messages[1].role", "unknown role 'bot'"),
    ([{"role": "user"}], "messages[0].content", "missing"),
    ([{"role": "user", "content": 3}], "messages[0].content", "string"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "messages[0].content", "string"),
])
def test_validate_messages(messages, param, words):
    with pytest.raises(ValueError) as e:
        C.validate_messages(messages)
    assert e.value.param == param
    assert str(e.value).startswith(param) and words in str(e.value)


class _Tok:
    bos_token, eos_token = "<s>", "</s>"

    def __init__(self, template=None):
        self.config = {"chat_template": template} if template else {}


def test_fallback_template_is_chatml():
    text = C.render_chat(_Tok(), MSGS)
    assert text == ("<|im_start|>system\nYou are a storyteller.<|im_end|>\n"
                    "<|im_start|>user\nTell me a story about a cat.<|im_end|>\n<|im_start|>assistant\n")
    assert not C.render_chat(_Tok(), MSGS, add_generation_prompt=False).endswith("assistant\n")


def test_template_variables_and_raise_exception():
    t = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
         "{{ raise_exception('no system role') }}{% endif %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}"
         "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    assert C.render_chat(_Tok(t), MSGS[1:]) == "<s>[user]Tell me a story about a cat.</s>[assistant]"
    with pytest.raises(ValueError, match="no system role") as e:
        C.render_chat(_Tok(t), MSGS)
    assert e.value.param == "messages"


@pytest.mark.parametrize("evil", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",       # immutable sandbox
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
])
def test_template_is_sandboxed(evil):
    with pytest.raises(ValueError) as e:
        C.render_chat(_Tok(evil), MSGS)
    assert e.value.param == "messages"


@needs_models
def test_no_double_bos(stories):
    tok = stories.tokenizer
    assert tok.bos_token == "<s>"
    tok.config = dict(tok.config, chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    try:
        ids, _, _ = C.encode_chat(stories, [{"role": "user", "content": "Hello"}])
    finally:
        tok.config.pop("chat_template")
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    ids2, stop, _ = C.encode_chat(stories, [{"role": "user", "content": "Hello"}])      # fallback template
    assert ids2[0] == tok.bos_token_id and ids2[1] != tok.bos_token_id
    assert "<|im_end|>" in stop


# ---- generation ------------------------------------------------------------------------------
@needs_models
def test_chat_greedy_stream_and_shapes(model):
    text = model.chat(MSGS, max_tokens=12, temperature=0)
    assert isinstance(text, str) and text
    assert "".join(model.chat(MSGS, max_tokens=12, temperature=0, stream=True)) == text

    r = model.create_chat_completion(MSGS, max_tokens=12, temperature=0)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    assert isinstance(r["created"], int) and r["model"] == Path(model.source).name
    ch = r["choices"][0]
    assert ch["message"] == {"role": "assistant", "content": text}
    assert ch["finish_reason"] == "length"
    u = r["usage"]
    assert u["prompt_tokens"] == len(C.encode_chat(model, MSGS)[0]) and u["completion_tokens"] == 12
    assert u["total_tokens"] == u["prompt_tokens"] + 12

    chunks = list(model.create_chat_completion(MSGS, max_tokens=12, temperature=0, stream=True, include_usage=True))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-2]["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == u


@needs_models
def test_stop_string_gives_finish_reason_stop(model):
    text = model.chat(MSGS, max_tokens=20, temperature=0)
    cut = text.strip()[:3] if len(text.strip()) >= 6 else None
    if not cut:
        pytest.skip("greedy answer too short")
    stop = text[text.index(cut) + 1:][:2] or cut
    r = model.create_chat_completion(MSGS, max_tokens=20, temperature=0, stop=[stop])
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"]["content"] == text[:text.index(stop)]


@needs_models
def test_create_completion(model):
    r = model.create_completion("Once upon a time", max_tokens=8, temperature=0)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert r["choices"][0]["text"] == model.generate("Once upon a time", max_new_tokens=8)
    assert r["choices"][0]["finish_reason"] in ("stop", "length")
    assert r["usage"]["prompt_tokens"] == len(model.tokenizer.encode("Once upon a time"))
    pieces = list(model.create_completion("Once upon a time", max_tokens=8, temperature=0, stream=True))
    assert "".join(p["choices"][0]["text"] for p in pieces) == r["choices"][0]["text"]
    assert pieces[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]


@needs_models
def test_seeded_sampling_reproducible(stories):
    a = stories.chat(MSGS, max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    assert a == stories.chat(MSGS, max_tokens=10, temperature=0.9, top_p=0.9, seed=7)


@needs_models
@pytest.mark.parametrize("kw, param", [
    (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=10 ** 9), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"), (dict(temperature=-0.1), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(stop=""), "stop"), (dict(stop=[1]), "stop"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"), (dict(seed=-3), "seed"),
])
def test_bad_arguments_name_the_field(stories, kw, param):
    with pytest.raises(ValueError) as e:
        stories.chat(MSGS, **kw)
    assert e.value.param == param and param in str(e.value)


@needs_models
def test_prompt_longer_than_context_is_refused(stories):
    long = [{"role": "user", "content": "the cat sat on the mat " * 200}]
    with pytest.raises(ValueError) as e:
        stories.chat(long, max_tokens=4)
    assert e.value.param == "messages" and e.value.code == "context_length_exceeded"
    with pytest.raises(ValueError) as e:
        stories.create_completion("the cat sat on the mat " * 200)
    assert e.value.param == "prompt"


@needs_models
def test_max_tokens_is_capped_by_the_context(stories):
    ids = stories.tokenizer.encode("Once upon a time " * 200)[:stories.n_ctx - 3]
    r = stories.create_completion(ids, max_tokens=stories.n_ctx, temperature=0)
    assert r["usage"]["total_tokens"] <= stories.n_ctx and r["usage"]["completion_tokens"] <= 3


@needs_models
def test_cancel_stops_generation(stories):
    ev = threading.Event()
    g = C.prepare_completion(stories, "Once upon a time", max_tokens=200, temperature=0).run(cancel=ev)
    for i, _ in enumerate(g):
        if i == 1:
            ev.set()
    assert g.finish_reason == "cancelled" and g.completion_tokens < 20


@needs_models
def test_multi_turn_reuses_the_kv_cache(stories):
    """Turn N+1's prompt starts with turn N's prompt + answer tokens, so only the new turn is
    prefilled. Prints the time-to-first-token of turn 5 with the cache against a cold cache."""
    m = stories
    m.reset()
    hist = [{"role": "system", "content": "You are a storyteller who tells short stories."}]
    prev_len = 0
    for turn in range(5):
        hist.append({"role": "user", "content": f"Tell me part {turn + 1} of the story about Lily and her dog."})
        p = C.prepare_chat(m, hist, max_tokens=16, temperature=0)
        reused = m.net.cache.common_prefix(p.ids)
        g = p.run()
        answer = "".join(g)
        if turn:
            assert reused >= prev_len, f"turn {turn + 1}: reused {reused} of the previous {prev_len} prompt tokens"
        hist.append({"role": "assistant", "content": answer})
        prev_len = len(p.ids)
    warm_ttft, n_prompt = g.first_token_s, len(p.ids)
    # the same turn-5 prompt on a cold cache (best of 2 each)
    cold = []
    for _ in range(2):
        m.reset()
        gc = p.run()
        assert "".join(gc) == answer
        cold.append(gc.first_token_s)
    warm = []
    for _ in range(2):
        m.net.cache.truncate(reused)            # the state turn 5 found
        gw = p.run()
        assert "".join(gw) == answer
        warm.append(gw.first_token_s)
    print(f"\nturn 5: prompt {n_prompt} tokens, {reused} reused from the cache; time to first token "
          f"{min(warm) * 1e3:.1f} ms with reuse vs {min(cold) * 1e3:.1f} ms cold "
          f"(saving {(1 - min(warm) / min(cold)) * 100:.0f}%)")
    assert reused > 0 and warm_ttft is not None
