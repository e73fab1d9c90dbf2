"""An OpenAI-compatible local HTTP server for one model (FastAPI + uvicorn: `pip install minilm[server]`).

    minilm serve -m PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--parallel N] [--no-speculative]

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(`"stream": true` -> server-sent events `data: {...}\\n\\n` ending with `data: [DONE]\\n\\n`;
`response_format`, `tools` / `tool_choice` as in OpenAI's API), POST /v1/embeddings.

Requests are validated before they are queued; a bad one gets a 4xx with an OpenAI-style body
{"error": {"message", "type": "invalid_request_error", "param", "code"}}. Generation is batched
(minilm/batch.py): one scheduler thread advances up to `parallel` requests together, one token
each per pass over the weights, each in its own KV-cache slot; new requests join between steps
(first-in first-out; beyond `parallel` they wait), finished ones leave. Each answer is the one the
request gets alone (greedy), never mixed with another's. A greedy request decoding alone
speculates by prompt lookup (same text; off with `--no-speculative`, or per request with minilm's
field `"speculative": false`). A client that disconnects stops its generation at the next step. Embeddings run one at a time on a worker thread.
"""
import asyncio
import contextlib
import hmac
import json
import queue
import threading
import time

from .batch import start_thread
from .chat import RequestError, chat_completion_from, completion_from, model_id, prepare_chat, prepare_completion
from .errors import MinilmError

MAX_BODY = 1 << 20        # bytes
MAX_HEADERS = 16 << 10    # bytes of request line + headers (uvicorn's h11 limit and our own check)
_DONE = object()


def _error(status: int, message: str, param=None, code=None, type_="invalid_request_error"):
    from fastapi.responses import JSONResponse
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": type_, "param": param, "code": code}})


class _Job:
    """One request's generation: `make()` -> iterable of items, produced in the worker thread
    and handed to the event loop through an asyncio queue."""

    def __init__(self, loop, make):
        self.loop, self.make = loop, make
        self.cancel = threading.Event()
        self.cancelled = False      # stopped early because the client went away
        self.out: asyncio.Queue = asyncio.Queue()

    def _put(self, item):
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def run(self):
        if self.cancel.is_set():
            return self._put(_DONE)
        try:
            for item in self.make(self.cancel):
                if self.cancel.is_set():
                    break
                self._put(item)
        except Exception as e:  # reported to that request only; the worker goes on
            self._put(e)
        self.cancelled = self.cancel.is_set()
        self._put(_DONE)


class Worker:
    """A single thread that runs jobs one at a time, first come first served (embeddings); `start`
    runs a job on a thread of its own (a generation, whose tokens come from the scheduler).
    Counts the jobs served and cancelled."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.busy = False
        self.served = 0
        self.cancelled = 0
        self.running = 0            # jobs on threads of their own
        self._count = threading.Lock()
        self.t = start_thread(self._loop, "minilm-worker")

    def _loop(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            self.busy = True
            try:
                job.run()
            finally:
                self.busy = False
                self._done(job)

    def _done(self, job: _Job):
        with self._count:
            self.served += 1
            self.cancelled += job.cancelled

    def submit(self, job: _Job) -> _Job:
        self.q.put(job)
        return job

    def start(self, job: _Job) -> _Job:
        def run():
            try:
                job.run()
            finally:
                with self._count:
                    self.running -= 1
                self._done(job)
        with self._count:
            self.running += 1
        threading.Thread(target=run, name="minilm-request", daemon=True).start()
        return job

    def pending(self) -> int:
        return self.q.qsize() + int(self.busy) + self.running

    def stop(self):
        self.q.put(None)


_SAMPLING = {"top_k", "min_p", "repetition_penalty"}
_EXTRAS = _SAMPLING | {"speculative"}     # minilm's request fields beyond OpenAI's (checked in chat.prepare)


def find_surrogate(x, where: str = "", depth: int = 0):
    """The path (e.g. 'messages[0].content') of the first string in a parsed JSON body that holds
    a lone surrogate ('\\ud800' escapes parse to one; it is not valid Unicode), else None."""
    if isinstance(x, str):
        if not x.isascii():
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        return None
    if depth > 64:
        return None
    if isinstance(x, dict):
        for k, v in x.items():
            p = find_surrogate(k, where or "body", depth + 1)
            if p is not None:
                return p
            p = find_surrogate(v, f"{where}.{k}" if where else str(k), depth + 1)
            if p is not None:
                return p
    elif isinstance(x, list):
        for i, v in enumerate(x):
            p = find_surrogate(v, f"{where}[{i}]", depth + 1)
            if p is not None:
                return p
    return None


def _gen_args(body: dict, default_max):
    """OpenAI request fields -> chat.prepare keywords (types are checked there)."""
    kw = {}
    mt = body.get("max_completion_tokens", body.get("max_tokens", default_max))
    kw["max_tokens"] = mt
    for k in ("temperature", "top_p"):
        if body.get(k) is not None:
            kw[k] = body[k]
    kw["stop"] = body.get("stop")
    kw["seed"] = body.get("seed")
    for k in _EXTRAS:
        if body.get(k) is not None:
            kw[k] = body[k]
    n = body.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise RequestError(f"n={n!r}: only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream={stream!r}: must be a boolean", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise RequestError("stream_options: must be an object", "stream_options")
    m = body.get("model")
    if m is not None and not isinstance(m, str):
        raise RequestError("model: must be a string", "model")
    return kw, stream, bool(so.get("include_usage"))


# request fields for constrained output and tools, passed through to chat.prepare_* as they are
# (checked there): response_format everywhere; tools / tool_choice for chat
_CONSTRAINT_FIELDS = {"chat": ("response_format", "tools", "tool_choice"), "completion": ("response_format",)}


def _constraint_args(body: dict, kind: str) -> dict:
    return {k: body[k] for k in _CONSTRAINT_FIELDS[kind] if body.get(k) is not None}


class _HeaderLimit:
    """ASGI middleware: 431 for a request whose request line + headers exceed `limit` bytes
    (whatever HTTP server runs the app; `serve` also sets uvicorn's h11 limit)."""

    def __init__(self, app, limit: int = MAX_HEADERS):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http":
            n = len(scope.get("raw_path") or scope.get("path", "").encode("utf-8", "replace")) + \
                len(scope.get("query_string") or b"") + \
                sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())
            if n > self.limit:
                body = json.dumps({"error": {"message": f"request headers of {n} bytes are over the limit "
                                             f"of {self.limit} bytes", "type": "invalid_request_error",
                                             "param": None, "code": "headers_too_large"}}).encode()
                await send({"type": "http.response.start", "status": 431,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def create_app(model, api_key: str | None = None, name: str | None = None, max_body: int = MAX_BODY,
               max_headers: int = MAX_HEADERS, parallel: int | None = None, speculative: bool = True):
    """The FastAPI app serving `model` (an `LM`). parallel: how many requests are generated
    together (None: what fits the machine, `batch.default_parallel`); speculative: False turns
    prompt-lookup speculation off for every request (`--no-speculative`), else a request may turn
    it off for itself (`"speculative": false`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .batch import Scheduler, check_parallel, default_parallel
    from .generate import check_speculative
    check_speculative(speculative)
    name = name or model_id(model)
    parallel = default_parallel(model)[0] if parallel is None else check_parallel(model, parallel)
    worker = Worker()
    sched = Scheduler(model, parallel)
    spec_on = speculative

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()
        sched.stop()

    app = FastAPI(title="minilm", version="0.1.0", lifespan=lifespan)
    app.add_middleware(_HeaderLimit, limit=max_headers)
    app.state.worker = worker
    app.state.scheduler = sched
    app.state.model = model
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), type_="invalid_request_error",
                      code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return _error(400, f"invalid request: {exc}")

    @app.exception_handler(Exception)
    async def _any_error(request, exc):   # never crash on a request
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")

    def auth_error(request: Request):
        if not api_key:
            return None
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            return _error(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                          type_="invalid_request_error", code="invalid_api_key")
        return None

    async def authed_json(request: Request):
        """(body, None) for an authorised request with a valid JSON body, else (None, error response)."""
        if (e := auth_error(request)) is not None:
            return None, e
        return await read_json(request)

    async def read_json(request: Request):
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                if int(cl) > max_body:
                    return None, _error(413, f"request body of {cl} bytes is over the limit of {max_body} bytes",
                                        code="request_too_large")
            except ValueError:
                return None, _error(400, "bad Content-Length header", code="invalid_request")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > max_body:
                return None, _error(413, f"request body is over the limit of {max_body} bytes",
                                    code="request_too_large")
        try:
            body = json.loads(bytes(buf))
        except (ValueError, UnicodeDecodeError) as e:
            return None, _error(400, f"request body is not valid JSON ({e})", code="invalid_json")
        except RecursionError:
            return None, _error(400, "request body is not valid JSON (nested too deeply)", code="invalid_json")
        if not isinstance(body, dict):
            return None, _error(400, "request body must be a JSON object", code="invalid_json")
        bad = find_surrogate(body)
        if bad is not None:
            return None, _error(400, f"{bad}: invalid Unicode (a lone surrogate such as \\ud800); text must "
                                "be valid UTF-8", bad, "invalid_unicode")
        return body, None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "queued": worker.pending(), "served": worker.served,
                "cancelled": worker.cancelled, "parallel": sched.parallel, "active": sched.pending(),
                "decode_steps": sched.steps, "decoded_tokens": sched.decoded, "reused_prompt_tokens": sched.reused,
                "drafted_tokens": sched.drafted, "accepted_draft_tokens": sched.accepted, "speculative": spec_on}

    @app.get("/v1/models")
    async def models(request: Request):
        if (e := auth_error(request)) is not None:
            return e
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "minilm"}]}

    def source(cancel, speculative):
        """The token source of one request: the scheduler, which stops it once `cancel` is set."""
        return lambda *a, **kw: sched.tokens(*a, cancel=cancel, speculative=spec_on and speculative, **kw)

    async def run(request: Request, kind: str):
        body, err = await authed_json(request)
        if err is not None:
            return err
        try:
            if kind == "chat":
                if "messages" not in body:
                    raise RequestError("messages: required", "messages")
                kw, stream, usage = _gen_args(body, None)
                kw.update(_constraint_args(body, "chat"))
                p = prepare_chat(model, body["messages"], **kw)
                make = lambda cancel: chat_completion_from(p, name, stream, usage, cancel, source(cancel, p.speculative))
            else:
                if "prompt" not in body:
                    raise RequestError("prompt: required", "prompt")
                kw, stream, usage = _gen_args(body, 16)
                kw.update(_constraint_args(body, "completion"))
                p = prepare_completion(model, body["prompt"], **kw)
                make = lambda cancel: completion_from(p, name, stream, usage, cancel, source(cancel, p.speculative))
        except RequestError as e:            # includes chat template errors
            return _error(400, str(e), e.param, e.code)
        except (ValueError, TypeError, MinilmError) as e:   # anything else the engine refuses
            return _error(400, str(e))

        def items(cancel):
            r = make(cancel)
            return r if stream else [r]

        job = worker.start(_Job(asyncio.get_running_loop(), items))
        if not stream:
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(job.out.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancel.set()
                            return JSONResponse(status_code=499, content={})
                        continue
                    if isinstance(item, Exception):
                        return _error(500, f"generation failed: {type(item).__name__}: {item}",
                                      type_="server_error")
                    if item is _DONE:
                        return _error(500, "generation produced no result", type_="server_error")
                    return item
            finally:
                job.cancel.set()       # no-op when finished; stops work if this task is cancelled

        async def events():
            n = 0
            try:
                while True:
                    item = await job.out.get()
                    n += 1
                    if n % 8 == 0 and await request.is_disconnected():
                        break
                    if item is _DONE:
                        break
                    if isinstance(item, Exception):
                        err = {"error": {"message": f"generation failed: {type(item).__name__}: {item}",
                                         "type": "server_error", "param": None, "code": None}}
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                    yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()       # client gone (generator closed/cancelled) -> stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "completion")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        """OpenAI embeddings: `input` a string, a list of strings, a list of token ids or a list
        of such lists; optional `encoding_format` "float" (default) or "base64"; minilm extras
        `pooling` ("mean" | "last") and `normalize` (default true)."""
        from .embed import EmbeddingError, embed_ids, encode_inputs
        body, err = await authed_json(request)
        if err is not None:
            return err
        try:
            if "input" not in body:
                raise EmbeddingError("input: required", "input")
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise EmbeddingError(f"encoding_format={fmt!r}: expected 'float' or 'base64'", "encoding_format")
            pooling = body.get("pooling") or "mean"
            normalize = body.get("normalize", True)
            if body.get("dimensions") is not None:
                raise EmbeddingError("dimensions: not supported (the size is the model's hidden size)",
                                     "dimensions")
            m = body.get("model")
            if m is not None and not isinstance(m, str):
                raise EmbeddingError("model: must be a string", "model")
            ids = encode_inputs(model, body["input"])
            if pooling not in ("mean", "last"):
                raise EmbeddingError(f"pooling={pooling!r}: expected 'mean' or 'last'", "pooling")
            if not isinstance(normalize, bool):
                raise EmbeddingError(f"normalize={normalize!r}: must be true or false", "normalize")
        except EmbeddingError as e:
            return _error(400, str(e), e.param, e.code)

        def items(cancel):
            import base64
            vecs = embed_ids(model, ids, pooling, normalize)           # f32[n, D]
            n_tok = sum(len(x) for x in ids)
            data = [{"object": "embedding", "index": i,
                     "embedding": v.tolist() if fmt == "float" else base64.b64encode(v.tobytes()).decode()}
                    for i, v in enumerate(vecs)]
            return [{"object": "list", "data": data, "model": name,
                     "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}]

        job = worker.submit(_Job(asyncio.get_running_loop(), items))   # shares the model: queued
        try:
            item = await job.out.get()
            if isinstance(item, Exception):
                return _error(500, f"embedding failed: {type(item).__name__}: {item}", type_="server_error")
            if item is _DONE:
                return _error(500, "embedding produced no result", type_="server_error")
            return item
        finally:
            job.cancel.set()

    return app


def serve(model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          name: str | None = None, log_level: str = "info", max_body: int = MAX_BODY,
          parallel: int | None = None, speculative: bool = True) -> None:
    """Run the server until interrupted. parallel: requests generated together (None: what fits);
    speculative: False turns prompt-lookup speculation off (create_app)."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("minilm serve needs the server extra: pip install 'minilm[server]'") from None
    import sys

    from .batch import check_parallel, default_parallel
    if parallel is None:
        parallel, why = default_parallel(model)
        print(f"minilm serve: {parallel} requests at a time (--parallel default: {why})", file=sys.stderr, flush=True)
    else:
        check_parallel(model, parallel)
        print(f"minilm serve: {parallel} requests at a time (--parallel {parallel}; "
              f"{model.net.cache.slot_nbytes / 2**20:.0f} MiB of KV cache each)", file=sys.stderr, flush=True)
    app = create_app(model, api_key=api_key, name=name, max_body=max_body, parallel=parallel, speculative=speculative)
    # h11 (pure Python, always installed with uvicorn) enforces a limit on the request line and
    # headers; the app's middleware checks them again.
    uvicorn.run(app, host=host, port=port, log_level=log_level, http="h11",
                h11_max_incomplete_event_size=MAX_HEADERS)


if __name__ == "__main__":   # python -m minilm.server -m PATH ... (same options as `minilm serve`)
    import sys

    from .cli_chat import main
    raise SystemExit(main(["serve", *sys.argv[1:]]))
