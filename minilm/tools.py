"""Tool (function) calls in the OpenAI shape: checking `tools` / `tool_choice`, rendering them
through the chat template, constraining a forced call, and parsing calls from the model's text.

    r = model.create_chat_completion(messages, tools=[{"type": "function", "function": {
            "name": "get_weather", "description": "...",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}],
        tool_choice="auto")            # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    r["choices"][0]["message"]["tool_calls"]   # [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]
    r["choices"][0]["finish_reason"]           # "tool_calls"

The tools go to the chat template as `tools` (the templates of Qwen2.5/Qwen3, Llama 3.x, SmolLM3
and Hermes-style models render them); a checkpoint without a template gets a ChatML template
with Hermes-style tool blocks (`TOOLS_FALLBACK_TEMPLATE`). Each model family writes calls in its
own format; `FORMATS` is the table of those formats (how to recognise the family from its
template, where a call starts in the text, how to parse it, how to write a forced call as a
grammar). With tool_choice "required" or a named function, the output is constrained (see
minilm/constrain.py) to one call in the family's format whose arguments match the tool's
`parameters` schema, so even a tiny model produces a valid call.

Tool results come back as {"role": "tool", "tool_call_id": ..., "content": ...} messages; the
assistant message that made the calls ({"role": "assistant", "content": None, "tool_calls": [...]})
is accepted in `messages` as the API returned it.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Callable

from .constrain import ConstraintError, bound_schema, check_json_schema

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ToolError(ValueError):
    """Invalid tools / tool_choice / tool messages; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = "invalid_tools"


# ---- checking the request ----------------------------------------------------------------------
def check_tools(tools) -> list[dict]:
    """The OpenAI `tools` list, checked: each {"type": "function", "function": {"name",
    "description"?, "parameters"? (a JSON schema of an object)}}. Returns normalized copies
    (parameters default to an empty object schema)."""
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ToolError(f"tools: expected a list of tools, got {type(tools).__name__}", "tools")
    out, names = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise ToolError(f"{where}: expected an object, got {type(t).__name__}", where)
        if t.get("type", "function") != "function":
            raise ToolError(f"{where}.type: only 'function' tools are supported, got {t.get('type')!r}",
                            f"{where}.type")
        f = t.get("function")
        if not isinstance(f, dict):
            raise ToolError(f"{where}.function: missing or not an object", f"{where}.function")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name: must be 1-64 letters, digits, '_', '-' or '.', "
                            f"got {name!r}", f"{where}.function.name")
        if name in names:
            raise ToolError(f"{where}.function.name: duplicate tool name {name!r}", f"{where}.function.name")
        names.add(name)
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"{where}.function.description: must be a string", f"{where}.function.description")
        p = f"{where}.function.parameters"
        params = f.get("parameters", {"type": "object", "properties": {}})
        try:
            params = check_json_schema(params, p)
        except ConstraintError as e:
            raise ToolError(str(e), p) from None
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolError(f"{p}: must be a JSON schema of an object (type 'object')", p)
        _check_compiles(params, p)
        fn = {"name": name}
        if desc is not None:
            fn["description"] = desc
        fn["parameters"] = params
        out.append({"type": "function", "function": fn})
    return out


def _check_compiles(schema: dict, param: str) -> None:
    """Raise ToolError when the grammar engine cannot compile `schema`."""
    import llguidance as llg
    try:
        g = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    except ValueError as e:
        raise ToolError(f"{param}: {e}", param) from None
    err = llg.LLMatcher.validate_grammar(g)
    if err and not err.startswith("WARNING"):
        raise ToolError(f"{param}: cannot be compiled: {err.strip()}", param)


def check_tool_choice(tool_choice, tools: list[dict]):
    """-> "none" | "auto" | "required" | a tool name (forced). Default: "auto" with tools."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolError(f"tool_choice: unknown value {tool_choice!r} (expected 'none', 'auto', "
                            f"'required' or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}})",
                            "tool_choice")
        if tool_choice != "none" and not tools:
            raise ToolError(f"tool_choice={tool_choice!r} needs a non-empty 'tools' list", "tool_choice")
        return tool_choice
    if isinstance(tool_choice, dict):
        f = tool_choice.get("function")
        name = f.get("name") if isinstance(f, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError("tool_choice: expected {\"type\": \"function\", \"function\": {\"name\": ...}}",
                            "tool_choice")
        known = [t["function"]["name"] for t in tools]
        if name not in known:
            raise ToolError(f"tool_choice.function.name: unknown tool {name!r} (tools: "
                            f"{', '.join(known) or 'none given'})", "tool_choice")
        return name
    raise ToolError(f"tool_choice: expected a string or an object, got {type(tool_choice).__name__}",
                    "tool_choice")


def check_tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's `tool_calls` (as the API returns them), checked; for templates the
    arguments are also given as a dict (`function.arguments` parsed from its JSON text)."""
    if not isinstance(calls, (list, tuple)) or not calls:
        raise ToolError(f"{where}: must be a non-empty list of tool calls", where)
    out = []
    for j, c in enumerate(calls):
        w = f"{where}[{j}]"
        if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
            raise ToolError(f"{w}: expected {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                            f"\"arguments\"}}}}", w)
        f = c["function"]
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise ToolError(f"{w}.function.name: must be a non-empty string", f"{w}.function.name")
        args = f.get("arguments", "{}")
        if isinstance(args, str):
            try:
                parsed = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ToolError(f"{w}.function.arguments: not valid JSON ({e})", f"{w}.function.arguments") from None
        elif isinstance(args, dict):
            parsed = args
        else:
            raise ToolError(f"{w}.function.arguments: must be a JSON string", f"{w}.function.arguments")
        if c.get("id") is not None and not isinstance(c["id"], str):
            raise ToolError(f"{w}.id: must be a string", f"{w}.id")
        out.append({"id": c.get("id") or new_call_id(), "type": "function",
                    "function": {"name": f["name"], "arguments": parsed}})
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- the fallback template ---------------------------------------------------------------------
def _type_of(s, depth: int = 0) -> str:
    """A JSON schema as a short TypeScript-like type: string, number, "a"|"b", T[], {k?: T}."""
    if not isinstance(s, dict):
        return "any"
    if "enum" in s and isinstance(s["enum"], list):
        return "|".join(json.dumps(v) for v in s["enum"]) or "never"
    if "const" in s:
        return json.dumps(s["const"])
    for k in ("anyOf", "oneOf"):
        if isinstance(s.get(k), list):
            return "|".join(_type_of(x, depth) for x in s[k])
    t = s.get("type")
    if isinstance(t, list):
        return "|".join(_type_of({**s, "type": x}, depth) for x in t)
    if t == "array":
        inner = _type_of(s.get("items"), depth)
        return f"({inner})[]" if "|" in inner else f"{inner}[]"
    if t == "object" or "properties" in s:
        if depth > 4:
            return "object"
        return "{" + _fields(s, depth + 1) + "}"
    return {"string": "string", "number": "number", "integer": "integer", "boolean": "boolean",
            "null": "null"}.get(t, "any")


def _fields(s: dict, depth: int) -> str:
    req = set(s.get("required", []))
    out = []
    for k, v in (s.get("properties") or {}).items():
        d = v.get("description") if isinstance(v, dict) else None
        out.append(f"{k}{'' if k in req else '?'}: {_type_of(v, depth)}" + (f" /* {d} */" if d else ""))
    return ", ".join(out)


def tool_signature(tool: dict) -> str:
    """One line per tool for the fallback template: `name(arg: type, opt?: type) - description`
    (a compact form: the small models that lack a template also have small contexts)."""
    f = tool.get("function", tool) if isinstance(tool, dict) else {}
    sig = f"{f.get('name')}({_fields(f.get('parameters') or {}, 1)})"
    return sig + (f" - {f['description']}" if f.get("description") else "")


#: ChatML with Hermes-style tool calls (the call format of Qwen2.5 and Hermes templates), tools
#: listed as one-line signatures (`tool_signature`) so small contexts keep room, for checkpoints
#: without a chat template when tools or tool calls are in play.
TOOLS_FALLBACK_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "Tools:{{ '\\n' }}{% for sig in tool_signatures %}{{ sig }}{{ '\\n' }}{% endfor %}"
    "To call one, answer <tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call><|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools and loop.first %}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "<|im_start|>assistant\n{% if message['content'] %}{{ message['content'] }}\n{% endif %}"
    "{% for call in message['tool_calls'] %}<tool_call>\n"
    "{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": {{ call['function']['arguments'] | tojson }}}"
    "\n</tool_call>{% if not loop.last %}\n{% endif %}{% endfor %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] or '' }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---- the formats of the model families ---------------------------------------------------------
def _json_prefix(text: str):
    """(object, end index) of the JSON value at the start of `text` (after spaces), or (None, 0)."""
    s = text.lstrip()
    try:
        obj, end = json.JSONDecoder().raw_decode(s)
    except json.JSONDecodeError:
        return None, 0
    return obj, end + (len(text) - len(s))


def _call_from(obj, names) -> dict | None:
    """{"name", "arguments": dict} from a parsed call object, or None when it is not a call of a
    known tool with object arguments."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": args}


def _parse_tagged(open_tag: str, close_tag: str):
    def parse(text: str, names):
        calls, content, pos = [], [], 0
        while True:
            i = text.find(open_tag, pos)
            if i < 0:
                content.append(text[pos:])
                break
            content.append(text[pos:i])
            j = text.find(close_tag, i + len(open_tag))
            body = text[i + len(open_tag): j if j >= 0 else len(text)]
            obj, _ = _json_prefix(body)
            c = _call_from(obj, names)
            if c is None:                       # not a call we can use: keep it as text
                content.append(text[i: j + len(close_tag) if j >= 0 else len(text)])
            else:
                calls.append(c)
            if j < 0:
                break
            pos = j + len(close_tag)
        return "".join(content).strip(), calls
    return parse


def _parse_llama3(text: str, names):
    """Llama 3.x: the whole answer is `{"name": ..., "parameters": {...}}` (optionally after
    <|python_tag|>, several separated by ';')."""
    s = text.strip()
    if s.startswith("<|python_tag|>"):
        s = s[len("<|python_tag|>"):]
    calls, rest = [], s
    while rest.strip():
        obj, end = _json_prefix(rest)
        c = _call_from(obj, names)
        if c is None:
            return text.strip(), []
        calls.append(c)
        rest = rest[end:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:]
        elif rest:
            return text.strip(), []
    return "", calls


@dataclass(frozen=True)
class ToolFormat:
    name: str
    detect: Callable[[str], bool]         # the chat template text -> is this family's format
    starts: tuple                         # text that starts a call (streaming holds it back)
    at_start_only: bool                   # calls only at the very start of the answer
    parse: Callable                       # (text, tool names) -> (content, [{"name", "arguments"}])
    prefix: str                           # forced call: text before the call object
    suffix: str                           # ... and after it
    args_key: str                         # "arguments" | "parameters"


FORMATS: list[ToolFormat] = [
    # Qwen2.5 / Qwen3 / Hermes / SmolLM3: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
    ToolFormat("hermes", lambda t: "<tool_call>" in t, ("<tool_call>",), False,
               _parse_tagged("<tool_call>", "</tool_call>"), "<tool_call>\n", "\n</tool_call>", "arguments"),
    # Llama 3.1 / 3.2 / 3.3 JSON tool calling
    ToolFormat("llama3_json", lambda t: "<|start_header_id|>" in t and ("<|python_tag|>" in t or "parameters" in t),
               ("<|python_tag|>", "{"), True, _parse_llama3, "", "", "parameters"),
]
DEFAULT_FORMAT = FORMATS[0]


def format_for(template: str | None) -> ToolFormat:
    """The call format of the family whose chat template is `template` (None: the fallback,
    Hermes-style)."""
    if template:
        for f in FORMATS:
            if f.detect(template):
                return f
    return DEFAULT_FORMAT


def call_grammar(fmt: ToolFormat, tools: list[dict], choice: str, max_tokens: int | None,
                 patterns: bool = True) -> str:
    """A Lark grammar (llguidance syntax) for exactly one call in `fmt`: of tool `choice`, or of
    any tool when choice == "required", with arguments matching its parameters schema (narrowed
    by `constrain.bound_schema(.., max_tokens, patterns)` unless max_tokens is None)."""
    alts = []
    for t in tools:
        f = t["function"]
        if choice != "required" and f["name"] != choice:
            continue
        params = f["parameters"] if max_tokens is None else bound_schema(f["parameters"], max_tokens, patterns)
        alts.append({"type": "object", "properties": {"name": {"const": f["name"]}, fmt.args_key: params},
                     "required": ["name", fmt.args_key], "additionalProperties": False})
    schema = alts[0] if len(alts) == 1 else {"anyOf": alts}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                       "key_separator": ": "}}
    lit = lambda s: json.dumps(s)
    parts = ([lit(fmt.prefix)] if fmt.prefix else []) + ["call"] + ([lit(fmt.suffix)] if fmt.suffix else [])
    return f"start: {' '.join(parts)}\ncall: %json {json.dumps(schema)}\n"


def openai_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls -> OpenAI message.tool_calls (arguments as JSON text)."""
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


class CallStream:
    """Streams an answer's text while holding back anything that may be a tool call: `push(piece)`
    returns the text safe to show now; `finish()` returns what is left and the calls."""

    def __init__(self, fmt: ToolFormat, names):
        self.fmt, self.names = fmt, list(names)
        self.text = ""
        self.sent = 0              # chars of text already shown
        self.holding = False       # a call has started: keep everything from here for finish()
        self.free = False          # at_start_only formats: the answer did not start with a call

    def _hold_from(self):
        """(index from which the text must be held back or None, whether a whole marker is there)."""
        t = self.text
        if self.fmt.at_start_only:
            s = t.lstrip()
            if any(s.startswith(m) for m in self.fmt.starts):
                return 0, True
            if not s or any(m.startswith(s) for m in self.fmt.starts):
                return 0, False
            self.free = True
            return None, False
        best = None
        for m in self.fmt.starts:
            i = t.find(m, max(0, self.sent - len(m)))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, True)
            for k in range(min(len(m) - 1, len(t)), 0, -1):     # the tail may start a marker
                if t.endswith(m[:k]):
                    if best is None or len(t) - k < best[0]:
                        best = (len(t) - k, False)
                    break
        return best if best is not None else (None, False)

    def push(self, piece: str) -> str:
        self.text += piece
        if self.holding:
            return ""
        h, whole = (None, False) if self.free else self._hold_from()
        end = len(self.text) if h is None else max(h, self.sent)
        self.holding = whole
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def finish(self):
        """(text not yet shown that belongs to the content, the whole content or None, calls)."""
        content, calls = self.fmt.parse(self.text, self.names)
        if not calls:
            return self.text[self.sent:], (self.text or None), []
        shown = self.text[:self.sent]
        rest = content[len(shown):] if content.startswith(shown) else ""
        return rest, (content or None), calls
