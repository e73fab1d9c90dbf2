"""The OpenAI-compatible server, run for real (`python -m minilm.server`) on a free loopback port:
the official `openai` client, greedy answers equal to `model.chat` in-process, a bounded load test,
bad input, auth, and client disconnects. Needs ../shared/models and the server extra + openai."""
import concurrent.futures as cf
import json
import time
from pathlib import Path

import pytest

for _mod in ("fastapi", "uvicorn", "openai", "httpx"):
    pytest.importorskip(_mod, reason=f"{_mod} not installed (pip install 'minilm[server]' openai httpx)")

import httpx  # noqa: E402
import openai  # noqa: E402

import minilm  # noqa: E402
import minilm.chat  # noqa: E402,F401  (attaches LM.chat etc. if lm.py does not define them)

from conftest import SHARED, ServerProcess, free_port  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
MODELS = SHARED / "models"
KEY = "sk-test-minilm"
MSGS = [{"role": "system", "content": "You are a storyteller."},
        {"role": "user", "content": "Tell me a story about a cat."}]


class Server(ServerProcess):
    def __init__(self, name, api_key=None):
        path = MODELS / name
        if not (path / "config.json").exists():
            pytest.skip(f"test model {name} not found in {MODELS} (../shared/models beside the repo)")
        super().__init__(path, ["--api-key", api_key] if api_key else [], wait_s=60)
        self.name, self.key = name, api_key
        self.model = minilm.load(str(path))       # the same model in-process, for the expected answers
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0, timeout=60)

    def headers(self):
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post(self, path, body=None, content=None, **kw):
        return httpx.post(self.url + path, json=body, content=content, timeout=60,
                          headers={**self.headers(), **kw.pop("headers", {})}, **kw)

    def health(self):
        return httpx.get(self.url + "/health", timeout=10).json()

    def rss_kb(self):
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None



@pytest.fixture(scope="module")
def stories():
    s = Server("stories260K", api_key=KEY)
    yield s
    s.stop()
    assert s.proc.returncode is not None


@pytest.fixture(scope="module")
def qwen():
    s = Server("proxy-qwen2-shakespeare")
    yield s
    s.stop()


@pytest.fixture(params=["stories", "qwen"])
def server(request):
    return request.getfixturevalue(request.param)


# ---- the openai client -----------------------------------------------------------------------
def test_models_and_health(server):
    assert server.health()["status"] == "ok"
    ids = [m.id for m in server.client.models.list().data]
    assert ids == [server.name]


def test_chat_completion_equals_in_process(server):
    want = server.model.chat(MSGS, max_tokens=12, temperature=0)
    r = server.client.chat.completions.create(model=server.name, messages=MSGS, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streamed_chat_completion_equals_in_process(server):
    want = server.model.chat(MSGS, max_tokens=12, temperature=0)
    chunks = list(server.client.chat.completions.create(model=server.name, messages=MSGS, max_tokens=12,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    usage = list(server.client.chat.completions.create(model=server.name, messages=MSGS, max_tokens=12, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))[-1].usage
    assert usage.completion_tokens == 12


def test_sse_wire_format(stories):
    with httpx.stream("POST", stories.url + "/v1/chat/completions", headers=stories.headers(), timeout=30,
                      json={"messages": MSGS, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_completion_equals_in_process(server):
    want = server.model.create_completion("Once upon a time", max_tokens=10, temperature=0)["choices"][0]["text"]
    r = server.client.completions.create(model=server.name, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want
    s = server.client.completions.create(model=server.name, prompt="Once upon a time", max_tokens=10,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s) == want


# ---- load ------------------------------------------------------------------------------------
def test_concurrent_clients_get_complete_correct_answers(stories):
    """8 clients x 6 requests at once, streamed and not: each answer equals its own in-process
    greedy answer (nothing lost or mixed between requests); the server stays healthy, memory flat."""
    n_clients, n_req = 8, 6
    jobs = [(c, j) for c in range(n_clients) for j in range(n_req)]
    msgs = {cj: [{"role": "user", "content": f"Client {cj[0]} asks question {cj[1]}: who is Lily?"}] for cj in jobs}
    want = {cj: stories.model.chat(m, max_tokens=8, temperature=0) for cj, m in msgs.items()}
    served0, rss0 = stories.health()["served"], stories.rss_kb()

    def client(c):
        cl = openai.OpenAI(base_url=stories.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        out = {}
        for j in range(n_req):
            if j % 2:
                s = cl.chat.completions.create(model="x", messages=msgs[c, j], max_tokens=8, temperature=0, stream=True)
                out[c, j] = "".join(ch.choices[0].delta.content or "" for ch in s)
            else:
                out[c, j] = cl.chat.completions.create(model="x", messages=msgs[c, j], max_tokens=8,
                                                       temperature=0).choices[0].message.content
        return out

    t0 = time.time()
    got = {}
    with cf.ThreadPoolExecutor(n_clients) as ex:
        for r in ex.map(client, range(n_clients)):
            got.update(r)
    dt = time.time() - t0
    assert got == want
    h = stories.health()
    assert h["status"] == "ok" and h["served"] - served0 == len(jobs) and h["queued"] == 0
    rss1 = stories.rss_kb()
    print(f"\n{len(jobs)} requests from {n_clients} clients in {dt:.2f} s; server RSS {rss0} -> {rss1} kB")
    if rss0 and rss1:
        assert rss1 - rss0 < 64 * 1024


def test_client_disconnect_stops_generation(stories):
    before = stories.health()
    with httpx.stream("POST", stories.url + "/v1/chat/completions", headers=stories.headers(), timeout=30,
                      json={"messages": MSGS, "max_tokens": 400, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines), next(lines)        # read a little, then hang up
    deadline = time.time() + 20
    while (h := stories.health())["served"] == before["served"] and time.time() < deadline:
        time.sleep(0.05)
    assert h["served"] == before["served"] + 1, "the abandoned request never finished"
    print(f"\ndisconnected stream cancelled: {h['cancelled'] - before['cancelled']}")
    # and the server keeps serving
    r = stories.post("/v1/chat/completions", {"messages": MSGS, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200


# ---- bad input -------------------------------------------------------------------------------
LONG = "the cat sat on the mat " * 400


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/chat/completions", b'{"messages": [', 400, None, "invalid_json"),
    ("/v1/chat/completions", b'[1, 2]', 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": "x"}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages[0].role", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content", None),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": -5}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 10 ** 12}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": "ten"}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"messages": MSGS, "temperature": -1}, 400, "temperature", None),
    ("/v1/chat/completions", {"messages": MSGS, "top_p": 0}, 400, "top_p", None),
    ("/v1/chat/completions", {"messages": MSGS, "top_p": 1.5}, 400, "top_p", None),
    ("/v1/chat/completions", {"messages": MSGS, "stop": 7}, 400, "stop", None),
    ("/v1/chat/completions", {"messages": MSGS, "n": 3}, 400, "n", None),
    ("/v1/chat/completions", {"messages": MSGS, "stream": "yes"}, 400, "stream", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x" * (1 << 20)}, 413, None, "request_too_large"),
])
def test_bad_requests(stories, path, body, status, param, code):
    if isinstance(body, bytes):
        r = stories.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = stories.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    if code:
        assert err["code"] == code
    if param:
        assert param.split("[")[0] in err["message"]


def test_bad_requests_through_openai_client(stories):
    with pytest.raises(openai.BadRequestError) as e:
        stories.client.chat.completions.create(model="x", messages=[{"role": "bot", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"


def test_api_key(stories):
    body = {"messages": MSGS, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(stories.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(stories.url + "/v1/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stories.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert stories.post("/v1/chat/completions", body).status_code == 200


def test_unknown_route_and_still_healthy(stories):
    r = httpx.get(stories.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    assert stories.proc.poll() is None and stories.health()["status"] == "ok"
    r = stories.post("/v1/chat/completions", {"messages": MSGS, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == \
        stories.model.chat(MSGS, max_tokens=3, temperature=0)
