"""The batched server (minilm/batch.py behind `minilm serve --parallel N`), run for real: under
concurrent clients every greedy answer equals the one the request gets alone in-process,
whatever joins or leaves mid-flight; a cancelled stream does not change the others; a
constrained (json_schema) request inside a batch; more requests than --parallel wait their turn.
Uses the `openai` client where installed, plain HTTP otherwise."""
import concurrent.futures as cf
import json
import time

import pytest

for _mod in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_mod, reason=f"{_mod} not installed (pip install 'minilm[server]' httpx)")

import httpx  # noqa: E402

import minilm  # noqa: E402

from conftest import ServerProcess, shared_path  # noqa: E402

try:
    import openai
except ImportError:       # plain HTTP below
    openai = None

PARALLEL = 4
PROMPTS = ["Once upon a time", "Tom and his dog went to the park. They", "Lily had a red ball",
           "The sun was hot and the birds", "One day a little girl named Sue found a big box in the garden",
           "Ben", "The cat sat on the mat and looked at the moon. It was very big and", "A bird"]


@pytest.fixture(scope="module")
def srv():
    path = shared_path("models", "stories260K")
    s = ServerProcess(path, ["--parallel", str(PARALLEL)], wait_s=120)
    s.model = minilm.load(str(path))
    yield s
    s.stop()


def _health(s):
    return httpx.get(s.url + "/health", timeout=10).json()


def _complete(s, body):
    """A completion (streamed or not) -> its text, through the openai client when installed."""
    if openai is not None:
        cl = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        if body.get("stream"):
            return "".join(c.choices[0].text for c in cl.completions.create(model="x", **body))
        return cl.completions.create(model="x", **body).choices[0].text
    if body.get("stream"):
        text = ""
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text
    r = httpx.post(s.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _chat(s, body):
    if openai is not None:
        cl = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        return cl.chat.completions.create(model="x", **body).choices[0].message.content
    r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_eight_clients_get_their_lone_answers(srv):
    """8 concurrent clients (2x --parallel: half wait in the queue), 3 requests each, prompts of
    different lengths and max_tokens from 3 to 48 (sequences join and leave mid-flight), streamed
    and not: every answer equals the in-process greedy answer."""
    jobs = [(c, j) for c in range(8) for j in range(3)]
    bodies = {cj: {"prompt": PROMPTS[(cj[0] + cj[1]) % len(PROMPTS)], "max_tokens": 3 + (7 * cj[0] + 13 * cj[1]) % 46,
                   "temperature": 0, "stream": (cj[0] + cj[1]) % 2 == 1} for cj in jobs}
    want = {cj: srv.model.create_completion(b["prompt"], max_tokens=b["max_tokens"], temperature=0)["choices"][0]["text"]
            for cj, b in bodies.items()}
    served0 = _health(srv)["served"]

    def client(c):
        return {(c, j): _complete(srv, bodies[c, j]) for j in range(3)}

    got = {}
    with cf.ThreadPoolExecutor(8) as ex:
        for r in ex.map(client, range(8)):
            got.update(r)
    assert got == want
    h = _health(srv)
    assert h["parallel"] == PARALLEL and h["served"] - served0 == len(jobs) and h["queued"] == 0


def test_cancelled_stream_leaves_the_others_alone(srv):
    """Four long streamed requests; one client hangs up after two chunks: the other three
    answers are still exactly their lone answers, and all four requests end. (Whether the hang-up
    beats the end of a 400-token answer of this tiny model is timing; test_batch.py cancels a
    sequence in the scheduler deterministically.)"""
    bodies = [{"prompt": PROMPTS[i], "max_tokens": 400 if i == 0 else 60, "temperature": 0, "stream": True}
              for i in range(4)]
    want = [srv.model.create_completion(b["prompt"], max_tokens=b["max_tokens"], temperature=0)["choices"][0]["text"]
            for b in bodies]
    before = _health(srv)

    def quitter():
        with httpx.stream("POST", srv.url + "/v1/completions", json=bodies[0], timeout=60) as r:
            lines = r.iter_lines()
            next(lines), next(lines)            # read a little, then hang up

    with cf.ThreadPoolExecutor(4) as ex:
        q = ex.submit(quitter)
        others = [ex.submit(_complete, srv, b) for b in bodies[1:]]
        q.result()
        assert [f.result() for f in others] == want[1:]
    deadline = time.time() + 20
    while (h := _health(srv))["served"] < before["served"] + 4 and time.time() < deadline:
        time.sleep(0.05)
    assert h["served"] == before["served"] + 4 and h["active"] == 0


def test_constrained_request_inside_a_batch(srv):
    """A response_format json_schema chat request decoded together with three free ones: its
    answer is the in-process constrained answer (valid JSON of the schema), theirs unchanged."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    msgs = [{"role": "user", "content": "Who is Lily? Answer in JSON."}]
    want_c = srv.model.create_chat_completion(msgs, max_tokens=40, temperature=0,
                                              response_format=rf)["choices"][0]["message"]["content"]
    free = [{"prompt": PROMPTS[i], "max_tokens": 30, "temperature": 0} for i in range(3)]
    want_f = [srv.model.create_completion(b["prompt"], max_tokens=30, temperature=0)["choices"][0]["text"]
              for b in free]
    with cf.ThreadPoolExecutor(4) as ex:
        fs = [ex.submit(_complete, srv, b) for b in free]
        c = ex.submit(_chat, srv, {"messages": msgs, "max_tokens": 40, "temperature": 0, "response_format": rf})
        assert [f.result() for f in fs] == want_f
        got = c.result()
    assert got == want_c
    obj = json.loads(got)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)


def test_seeded_sampling_in_a_batch_is_reproducible(srv):
    """Sampled requests with seeds keep their own random streams: each equals the in-process
    answer with the same seed while others decode beside it."""
    bodies = [{"prompt": PROMPTS[i], "max_tokens": 20, "temperature": 0.9, "seed": 100 + i} for i in range(4)]
    want = [srv.model.create_completion(b["prompt"], max_tokens=20, temperature=0.9, seed=b["seed"],
                                        speculative=False)["choices"][0]["text"]     # the server speculates greedy requests only
            for b in bodies]
    with cf.ThreadPoolExecutor(4) as ex:
        assert list(ex.map(lambda b: _complete(srv, b), bodies)) == want


SPEC_PROMPT = "Once upon a time, there was a little girl named Lily. She liked to play. Once upon a time, there was"


def _text(s, body):
    """A plain-HTTP completion's text (the openai client refuses minilm's extra fields)."""
    r = httpx.post(s.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_speculation_can_be_turned_off_per_request(srv):
    """A lone greedy request speculates (prompt lookup) unless it sends "speculative": false; the
    text is the same either way; a speculative that is not a boolean is a 400 naming it."""
    body = {"prompt": SPEC_PROMPT, "max_tokens": 60, "temperature": 0}
    want = srv.model.create_completion(SPEC_PROMPT, max_tokens=60, temperature=0, speculative=False)["choices"][0]["text"]
    d0 = _health(srv)["drafted_tokens"]
    assert _text(srv, {**body, "speculative": False}) == want
    d1 = _health(srv)["drafted_tokens"]
    assert d1 == d0
    assert _text(srv, body) == want
    assert _health(srv)["drafted_tokens"] > d1
    r = httpx.post(srv.url + "/v1/completions", json={**body, "speculative": "no"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculative", r.text


def test_no_speculative_server():
    """`--no-speculative`: no request drafts, and a request cannot turn it back on."""
    path = shared_path("models", "stories260K")
    s = ServerProcess(path, ["--parallel", "2", "--no-speculative"], wait_s=120)
    try:
        model = minilm.load(str(path))
        want = model.create_completion(SPEC_PROMPT, max_tokens=60, temperature=0, speculative=False)["choices"][0]["text"]
        body = {"prompt": SPEC_PROMPT, "max_tokens": 60, "temperature": 0}
        assert _text(s, body) == want
        assert _text(s, {**body, "speculative": True}) == want
        assert _health(s)["drafted_tokens"] == 0
    finally:
        s.stop()


def test_parallel_is_checked():
    """--parallel 0 is refused by the command line; an impossible one names the memory."""
    import subprocess
    import sys

    from conftest import REPO
    path = shared_path("models", "stories260K")
    r = subprocess.run([sys.executable, "-m", "minilm.server", "-m", str(path), "--parallel", "0"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0 and "--parallel" in r.stderr
    from minilm.batch import check_parallel
    from minilm.errors import ResourceLimitError
    m = minilm.load(str(path), n_ctx=64)
    with pytest.raises(ResourceLimitError, match="parallel=1000: .* bytes are available"):
        check_parallel(m, 1000, available=10 * m.net.cache.slot_nbytes)
    with pytest.raises(ValueError, match="parallel=0"):
        check_parallel(m, 0)
