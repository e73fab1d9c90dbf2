"""Chat on top of `LM`: chat templates, message validation, and OpenAI-shaped completions.

    model = minilm.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    model.chat([{"role": "user", "content": "Hi!"}], max_tokens=64)          # -> str
    for piece in model.chat(messages, stream=True): print(piece, end="")     # -> str pieces
    model.create_chat_completion(messages)        # -> {"object": "chat.completion", ...}
    model.create_completion("Once upon a time")   # -> {"object": "text_completion", ...}

Chat templates: the Jinja `chat_template` of tokenizer_config.json is rendered in jinja2's
`ImmutableSandboxedEnvironment` (a template is untrusted input: no attribute access to Python
internals, no mutation of the messages), with `messages`, `bos_token`, `eos_token`,
`add_generation_prompt` and the `raise_exception(msg)` helper, as transformers does. A checkpoint
without a template gets `FALLBACK_CHAT_TEMPLATE` (ChatML: `<|im_start|>role\\n...<|im_end|>\\n`);
then `<|im_end|>` is also a stop string. A rendered text that already starts with the BOS string
is encoded without adding another one (never a double BOS).

Multi-turn: the prompt of turn N+1 begins with the text of turn N's prompt and answer, so
`generate_tokens` reuses the KV cache for that shared prefix (only the new turn is prefilled).

An `LM` is not thread-safe: one generation at a time (the server queues requests).
"""
from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import TemplateError
from .generate import TextStream, generate_tokens
from .sampling import Sampler
from .tokenizer import check_text

ROLES = ("system", "user", "assistant", "tool")

#: Used for checkpoints whose tokenizer_config.json has no `chat_template` (ChatML, as in
#: transformers' old default). The tokenizer adds BOS as it does for any text.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FALLBACK_STOP = ["<|im_end|>", "<|im_start|>"]
# end-of-turn tokens of common templates: when the template uses one and the vocabulary has it
# as a single token, generation also stops at that token id.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

DEFAULT_TEMPERATURE = 0.7
MAX_STOP = 4


class RequestError(ValueError):
    """Invalid chat/completion arguments. `param` names the field (OpenAI's error.param);
    `code` is a short machine-readable reason (e.g. 'context_length_exceeded')."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


# ---- messages and templates ------------------------------------------------------------------
def validate_messages(messages) -> list[dict]:
    """Check `messages` (a non-empty list of {"role", "content": str} dicts); raise RequestError
    naming the field, e.g. "messages[1].role: unknown role 'bot'"."""
    if not isinstance(messages, (list, tuple)):
        raise RequestError(f"messages: expected a list of messages, got {type(messages).__name__}",
                           "messages")
    if not messages:
        raise RequestError("messages: must contain at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where}: expected an object with 'role' and 'content', "
                               f"got {type(m).__name__}", where)
        role = m.get("role")
        if "role" not in m:
            raise RequestError(f"{where}.role: missing", f"{where}.role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})",
                               f"{where}.role")
        if role == "assistant" and m.get("tool_calls") is not None:
            # an assistant turn that called tools: content may be null (as the API returns it)
            from .tools import ToolError, check_tool_calls
            try:
                calls = check_tool_calls(m["tool_calls"], f"{where}.tool_calls")
            except ToolError as e:
                raise RequestError(str(e), e.param) from None
            if m.get("content") is not None and not isinstance(m["content"], str):
                raise RequestError(f"{where}.content: must be a string or null, got "
                                   f"{type(m['content']).__name__}", f"{where}.content")
            out.append({**m, "content": m.get("content") or "", "tool_calls": calls})
            continue
        if role == "tool" and m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise RequestError(f"{where}.tool_call_id: must be a string", f"{where}.tool_call_id")
        if "content" not in m:
            raise RequestError(f"{where}.content: missing", f"{where}.content")
        if not isinstance(m["content"], str):
            raise RequestError(f"{where}.content: must be a string, got {type(m['content']).__name__}",
                               f"{where}.content")
        try:
            check_text(m["content"], f"{where}.content")
        except ValueError as e:
            raise RequestError(str(e), f"{where}.content", "invalid_unicode") from None
        out.append(dict(m))
    return out


class ChatTemplateError(TemplateError, RequestError):
    """The chat template failed or hit a limit (a minilm TemplateError; the server answers 400)."""

    def __init__(self, message: str):
        RequestError.__init__(self, message, "messages", "invalid_chat_template")


def _compile(template: str):
    """The template compiled in minilm.chat_template's limited sandbox (cached there)."""
    from .chat_template import compile_template
    try:
        return compile_template(template)
    except TemplateError as e:
        raise ChatTemplateError(str(e)) from None


def chat_template_of(tokenizer) -> str | None:
    """The checkpoint's template (tokenizer_config.json `chat_template`; a named list picks
    'default'), or None."""
    t = (getattr(tokenizer, "config", None) or {}).get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t
                 if isinstance(d, dict) and isinstance(d.get("name"), (str, type(None)))}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t.strip() else None


def _uses_tools(messages, tools) -> bool:
    return bool(tools) or any(isinstance(m, dict) and m.get("tool_calls") for m in messages)


def render_chat(tokenizer, messages, add_generation_prompt: bool = True, template: str | None = None,
                tools=None) -> str:
    """The prompt text for `messages` (validated) through the chat template (or the fallback),
    rendered with limits (minilm.chat_template); a failure is a ChatTemplateError naming it.
    tools: checked OpenAI tools (minilm.tools.check_tools), passed to the template as `tools`."""
    from .chat_template import render
    messages = validate_messages(messages)
    if not (template or chat_template_of(tokenizer)) and _uses_tools(messages, tools):
        from .tools import TOOLS_FALLBACK_TEMPLATE
        template = TOOLS_FALLBACK_TEMPLATE
    template = template or chat_template_of(tokenizer) or FALLBACK_CHAT_TEMPLATE
    extra = {"tools": tools} if tools else {}
    size = sum(len(m["content"]) for m in messages)
    if tools:
        import json

        from .tools import TOOLS_FALLBACK_TEMPLATE, tool_signature
        size += len(json.dumps(tools))
        if template == TOOLS_FALLBACK_TEMPLATE:             # lists the tools as one-line signatures
            extra["tool_signatures"] = [tool_signature(t) for t in tools]
    try:
        return render(template, input_chars=size,
                      messages=messages, add_generation_prompt=add_generation_prompt, **extra,
                      bos_token=getattr(tokenizer, "bos_token", None) or "",
                      eos_token=getattr(tokenizer, "eos_token", None) or "")
    except TemplateError as e:
        msg = str(e)
        if msg.startswith("rejected by the chat template: "):    # the template's raise_exception()
            msg = "messages: " + msg
        raise ChatTemplateError(msg) from None


def encode_chat(model, messages, add_generation_prompt: bool = True, tools=None):
    """(prompt ids, extra stop strings, extra stop token ids) for a conversation."""
    tok = model.tokenizer
    template = chat_template_of(tok)
    text = render_chat(tok, messages, add_generation_prompt, template, tools)
    bos = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos):
        ids = tok.encode(text, add_special_tokens=False)      # the template wrote the BOS itself
        b = tok.bos_token_id
        while b is not None and len(ids) >= 2 and ids[0] == b and ids[1] == b:
            ids = ids[1:]
    else:
        ids = tok.encode(text)
    used = template or FALLBACK_CHAT_TEMPLATE
    if not template and _uses_tools(messages, tools):
        from .tools import TOOLS_FALLBACK_TEMPLATE
        used = TOOLS_FALLBACK_TEMPLATE
    stop_ids = []
    for s in _TURN_END_TOKENS:
        if s in used:
            i = tok.token_to_id(s) if hasattr(tok, "token_to_id") else None
            if i is not None:
                stop_ids.append(int(i))
    stop = [] if template else list(FALLBACK_STOP)
    return ids, stop, stop_ids


# ---- arguments -------------------------------------------------------------------------------
def _number(name, v, lo=None, lo_open=False, hi=None):
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2 ** 53:
        raise RequestError(f"{name}={v!r}: must be a finite number of a sensible size", name)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
        raise RequestError(f"{name}={v!r}: must be a finite number", name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise RequestError(f"{name}={v!r}: must be {'>' if lo_open else '>='} {lo}", name)
    if hi is not None and v > hi:
        raise RequestError(f"{name}={v!r}: must be <= {hi}", name)
    return float(v)


def check_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP or \
            not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"stop={stop!r}: must be a non-empty string or a list of at most "
                           f"{MAX_STOP} non-empty strings", "stop")
    return list(stop)


@dataclass
class Prepared:
    """A validated request: prompt ids and generation settings; `run()` generates."""
    model: object
    ids: list[int]
    max_tokens: int
    sampling: dict
    stop: list[str]
    stop_ids: list[int] = field(default_factory=list)
    constraint: object = None        # minilm.constrain.Constraint: the output must match it
    tools: object = None             # ToolSetup: parse tool calls from the answer
    speculative: bool = True         # prompt-lookup speculative decoding (minilm/generate.py)

    def run(self, cancel=None, source=None) -> "Generation":
        return Generation(self, cancel, source)


def prepare(model, ids, max_tokens, temperature, top_p, stop, seed, extra_stop=(), stop_ids=(),
            top_k=0, min_p=0.0, repetition_penalty=1.0, prompt_param="messages", speculative=True) -> Prepared:
    """Validate the generation arguments against the model and the prompt length."""
    n_ctx = model.n_ctx
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)):
            raise RequestError(f"max_tokens={max_tokens!r}: must be an integer", "max_tokens")
        if max_tokens < 1:
            raise RequestError(f"max_tokens={max_tokens}: must be >= 1", "max_tokens")
        if max_tokens > n_ctx:
            raise RequestError(f"max_tokens={max_tokens}: larger than the model's context of "
                               f"{n_ctx} tokens", "max_tokens")
    temperature = _number("temperature", temperature, lo=0)
    top_p = _number("top_p", top_p, lo=0, lo_open=True, hi=1)
    min_p = _number("min_p", min_p, lo=0)
    if min_p >= 1:
        raise RequestError(f"min_p={min_p!r}: must be < 1", "min_p")
    repetition_penalty = _number("repetition_penalty", repetition_penalty, lo=0, lo_open=True)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise RequestError(f"top_k={top_k!r}: must be an integer >= 0", "top_k")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise RequestError(f"seed={seed!r}: must be an integer >= 0", "seed")
    stop = check_stop(stop)
    if not isinstance(speculative, bool):
        raise RequestError(f"speculative={speculative!r}: must be true or false", "speculative")
    if not ids:
        raise RequestError(f"{prompt_param}: the prompt is empty (no tokens)", prompt_param)
    if len(ids) >= n_ctx:
        raise RequestError(f"{prompt_param}: the prompt is {len(ids)} tokens, the model's context is "
                           f"{n_ctx} tokens (at least one must be left to generate); shorten it",
                           prompt_param, "context_length_exceeded")
    room = n_ctx - len(ids)
    max_tokens = room if max_tokens is None else min(int(max_tokens), room)
    sampling = dict(temperature=temperature, top_k=int(top_k), top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, seed=None if seed is None else int(seed))
    return Prepared(model, list(ids), max_tokens, sampling,
                    stop + [s for s in extra_stop if s not in stop], list(stop_ids), speculative=speculative)


class Generation:
    """Iterate for the text pieces; afterwards `finish_reason` ('stop' | 'length', or 'cancelled'
    when `cancel` — a threading.Event — was set), `prompt_tokens`, `completion_tokens`, `text`.
    source: what produces the token ids, with generate_tokens' arguments (default: generate_tokens
    itself, with the request's `speculative`; the server's batched scheduler passes its own)."""

    def __init__(self, p: Prepared, cancel=None, source=None):
        self.p = p
        self.cancel = cancel
        # the library's own generation speculates when asked; the server's scheduler advances
        # each of its sequences one token per batched step
        self.source = source or functools.partial(generate_tokens, speculative=p.speculative)
        self.prompt_tokens = len(p.ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self.first_token_s: float | None = None     # seconds from the start to the first new token

    def __iter__(self) -> Iterator[str]:
        p, m = self.p, self.p.model
        sampler = Sampler(m.config.vocab_size, **p.sampling)
        eos = list(m.eos_token_ids) + [i for i in p.stop_ids if i not in m.eos_token_ids]
        t0 = time.perf_counter()
        state = p.constraint.start() if p.constraint is not None else None
        self.constraint_state = state
        toks = self.source(m, p.ids, p.max_tokens, sampler, eos, constraint=state)
        # under a constraint the grammar decides where the text ends: stop strings could cut a
        # valid output short, so they are not applied
        ts = TextStream(m.tokenizer, p.ids, [] if state is not None else p.stop)
        try:
            for t in toks:
                if self.first_token_s is None:
                    self.first_token_s = time.perf_counter() - t0
                self.completion_tokens += 1
                piece = ts.push(t)
                if piece:
                    self.text += piece
                    yield piece
                if ts.done:
                    self.finish_reason = "stop"
                    return
                if self.cancel is not None and self.cancel.is_set():
                    self.finish_reason = "cancelled"
                    return
            tail = ts.finish()
            if tail:
                self.text += tail
                yield tail
            self.finish_reason = "length" if self.completion_tokens >= p.max_tokens else "stop"
            if state is not None:
                if state.done:                      # complete even if it used the last token
                    self.finish_reason = "stop"
        finally:
            toks.close()

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class ToolSetup:
    """How to find tool calls in an answer: the family's format, the tool names, tool_choice."""
    fmt: object
    names: list
    choice: str


def check_response_format(rf):
    """OpenAI `response_format` -> (JSON schema or None, the param it came from)."""
    if rf is None:
        return None, None
    if not isinstance(rf, dict):
        raise RequestError(f"response_format: expected an object like {{\"type\": \"json_object\"}}, got "
                           f"{type(rf).__name__}", "response_format")
    t = rf.get("type")
    if t == "text":
        return None, None
    if t == "json_object":
        if rf.get("schema") is not None:           # llama.cpp's spelling of a schema here
            return rf["schema"], "response_format.schema"
        return {"type": "object"}, "response_format"
    if t == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise RequestError("response_format.json_schema: required, an object with 'name' and 'schema'",
                               "response_format.json_schema")
        if "schema" not in js:
            raise RequestError("response_format.json_schema.schema: required (the JSON schema)",
                               "response_format.json_schema.schema")
        return js["schema"], "response_format.json_schema.schema"
    raise RequestError(f"response_format.type: unknown type {t!r} (expected 'text', 'json_object' or "
                       f"'json_schema')", "response_format.type")


def _attach_constraint(model, p: Prepared, json_schema=None, regex=None, grammar=None, param=None) -> None:
    """Compile a json_schema / regex / grammar for the prepared request (errors name `param`)."""
    from .constrain import ConstraintError, compile_constraint
    eos = list(model.eos_token_ids) + [i for i in p.stop_ids if i not in model.eos_token_ids]
    try:
        p.constraint = compile_constraint(model, json_schema, regex, grammar, param, eos_ids=eos,
                                          max_tokens=p.max_tokens)
    except ConstraintError as e:
        raise RequestError(str(e), e.param, e.code) from None


def prepare_chat(model, messages, max_tokens=None, temperature=DEFAULT_TEMPERATURE, top_p=1.0, stop=None,
                 seed=None, tools=None, tool_choice=None, response_format=None, json_schema=None,
                 regex=None, grammar=None, **sampling) -> Prepared:
    from .tools import ToolError, call_grammar, check_tool_choice, check_tools, format_for
    try:
        tools = check_tools(tools)
        choice = check_tool_choice(tool_choice, tools)
    except ToolError as e:
        raise RequestError(str(e), e.param, e.code) from None
    rf_schema, rf_param = check_response_format(response_format)
    given = [k for k, v in (("response_format", rf_schema), ("json_schema", json_schema), ("regex", regex),
                            ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise RequestError(f"{' and '.join(given)}: give only one output constraint", given[1])
    if given and choice not in ("none", "auto"):
        raise RequestError(f"tool_choice={tool_choice!r} forces a tool call; it cannot be combined with "
                           f"{given[0]}", "tool_choice")
    # a named tool_choice shows the template only that tool (the output is held to a call of it;
    # on a small context the other tools' descriptions would only take room)
    shown = [] if choice == "none" else tools if choice in ("auto", "required") else \
        [t for t in tools if t["function"]["name"] == choice]
    ids, extra_stop, stop_ids = encode_chat(model, messages, tools=shown or None)
    p = prepare(model, ids, max_tokens, temperature, top_p, stop, seed, extra_stop, stop_ids,
                prompt_param="messages", **sampling)
    if rf_schema is not None:
        _attach_constraint(model, p, json_schema=rf_schema, param=rf_param)
    elif given:
        _attach_constraint(model, p, json_schema, regex, grammar)
    if shown:
        fmt = format_for(chat_template_of(model.tokenizer))
        p.tools = ToolSetup(fmt, [t["function"]["name"] for t in tools], choice)
        if choice != "auto":              # "required" or a tool name: constrain to one valid call
            import llguidance

            from .constrain import Constraint, ConstraintError
            eos = list(model.eos_token_ids) + [i for i in p.stop_ids if i not in model.eos_token_ids]
            # bounded arguments first; less bounded where a pattern's shortest match does not fit
            for patterns, budget in ((True, p.max_tokens), (False, p.max_tokens), (False, None)):
                spec = llguidance.LLMatcher.grammar_from_lark(call_grammar(fmt, tools, choice, budget, patterns))
                try:
                    p.constraint = Constraint(model, spec, "tools", eos)
                    break
                except ConstraintError as e:
                    if budget is None or "nsatisfiable" not in str(e):
                        raise RequestError(str(e), e.param, e.code) from None
    return p


def prepare_completion(model, prompt, max_tokens=16, temperature=DEFAULT_TEMPERATURE, top_p=1.0, stop=None,
                       seed=None, response_format=None, json_schema=None, regex=None, grammar=None,
                       **sampling) -> Prepared:
    p = _prepare_completion(model, prompt, max_tokens, temperature, top_p, stop, seed, **sampling)
    rf_schema, rf_param = check_response_format(response_format)
    given = [k for k, v in (("response_format", rf_schema), ("json_schema", json_schema), ("regex", regex),
                            ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise RequestError(f"{' and '.join(given)}: give only one output constraint", given[1])
    if rf_schema is not None:
        _attach_constraint(model, p, json_schema=rf_schema, param=rf_param)
    elif given:
        _attach_constraint(model, p, json_schema, regex, grammar)
    return p


def _prepare_completion(model, prompt, max_tokens, temperature, top_p, stop, seed, **sampling) -> Prepared:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = model.tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
        V = model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise RequestError(f"prompt: token id {bad[0]} outside [0, {V})", "prompt")
        ids = [int(t) for t in prompt]
    else:
        raise RequestError("prompt: must be a string (or one list of token ids)", "prompt")
    return prepare(model, ids, max_tokens, temperature, top_p, stop, seed, prompt_param="prompt", **sampling)


# ---- the public functions (attached to LM as methods) ----------------------------------------
def model_id(model) -> str:
    return getattr(model, "model_id", None) or Path(str(getattr(model, "source", "") or "minilm")).name or "minilm"


def chat(model, messages, max_tokens: int | None = None, temperature: float = DEFAULT_TEMPERATURE,
         top_p: float = 1.0, stop=None, stream: bool = False, seed: int | None = None, **sampling):
    """Answer a conversation: `messages` = [{"role": "system"|"user"|"assistant"|"tool",
    "content": str}, ...]. Returns the assistant's text, or with stream=True an iterator of text
    pieces. max_tokens=None: up to the end of the context. Greedy when temperature == 0.
    Extra keywords: top_k, min_p, repetition_penalty, speculative (False: no speculative
    decoding). Raises RequestError (a ValueError) naming the bad argument."""
    g = prepare_chat(model, messages, max_tokens, temperature, top_p, stop, seed, **sampling).run()
    return iter(g) if stream else "".join(g)


def _new_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def create_chat_completion(model, messages, max_tokens: int | None = None,
                           temperature: float = DEFAULT_TEMPERATURE, top_p: float = 1.0, stop=None,
                           stream: bool = False, seed: int | None = None, include_usage: bool = False,
                           **sampling):
    """OpenAI-shaped chat completion: a "chat.completion" dict, or with stream=True an iterator
    of "chat.completion.chunk" dicts (first delta has the role, last has finish_reason; with
    include_usage an extra final chunk with empty choices and `usage`)."""
    p = prepare_chat(model, messages, max_tokens, temperature, top_p, stop, seed, **sampling)
    return chat_completion_from(p, model_id(model), stream, include_usage)


def chat_completion_from(p: Prepared, name: str, stream: bool = False, include_usage: bool = False,
                         cancel=None, source=None):
    cid, created = _new_id("chatcmpl"), int(time.time())
    g = p.run(cancel, source)
    if not stream:
        text = "".join(g)
        message, finish = {"role": "assistant", "content": text}, g.finish_reason
        if p.tools is not None:
            from .tools import openai_calls
            content, calls = p.tools.fmt.parse(text, p.tools.names)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": openai_calls(calls)}
                finish = "tool_calls"
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": g.usage()}

    def chunk(delta, finish=None):
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def chunks():
        yield chunk({"role": "assistant", "content": ""})
        if p.tools is None:
            for piece in g:
                yield chunk({"content": piece})
            yield chunk({}, g.finish_reason)
        else:                         # text streams until a call may start; calls come at the end
            from .tools import CallStream, openai_calls
            cs = CallStream(p.tools.fmt, p.tools.names)
            for piece in g:
                out = cs.push(piece)
                if out:
                    yield chunk({"content": out})
            rest, _, calls = cs.finish()
            if rest:
                yield chunk({"content": rest})
            for i, c in enumerate(openai_calls(calls)):
                f = c["function"]
                yield chunk({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                             "function": {"name": f["name"], "arguments": ""}}]})
                yield chunk({"tool_calls": [{"index": i, "function": {"arguments": f["arguments"]}}]})
            yield chunk({}, "tool_calls" if calls else g.finish_reason)
        if include_usage:
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                   "choices": [], "usage": g.usage()}
    return chunks()


def create_completion(model, prompt, max_tokens: int | None = 16, temperature: float = DEFAULT_TEMPERATURE,
                      top_p: float = 1.0, stop=None, stream: bool = False, seed: int | None = None,
                      include_usage: bool = False, **sampling):
    """OpenAI-shaped text completion of `prompt` (a string, or a list of token ids): a
    "text_completion" dict with choices[0].text, or with stream=True an iterator of chunks."""
    p = prepare_completion(model, prompt, max_tokens, temperature, top_p, stop, seed, **sampling)
    return completion_from(p, model_id(model), stream, include_usage)


def completion_from(p: Prepared, name: str, stream: bool = False, include_usage: bool = False, cancel=None,
                    source=None):
    cid, created = _new_id("cmpl"), int(time.time())
    g = p.run(cancel, source)

    def body(text, finish):
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if not stream:
        text = "".join(g)
        return {**body(text, g.finish_reason), "usage": g.usage()}

    def chunks():
        for piece in g:
            yield body(piece, None)
        yield body("", g.finish_reason)
        if include_usage:
            yield {"id": cid, "object": "text_completion", "created": created, "model": name,
                   "choices": [], "usage": g.usage()}
    return chunks()

