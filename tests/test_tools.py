"""Tool calls (minilm/tools.py): the per-family parsers, checking tools / tool_choice, and through
a live `minilm serve` with the openai client: a forced (`required` / named) call returns
arguments valid against the tool's schema, streamed as tool-call deltas, and a round trip
(call -> tool result -> answer) works. The proxies' context is 256 tokens: the server runs with
--ctx 1024 so a tool list and a round trip fit."""
import json
import re

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="pip install 'minilm[test]' (jsonschema)")
pytest.importorskip("llguidance", reason="llguidance not installed")

from test_constrain import PROXY  # noqa: E402

from minilm.tools import FORMATS, CallStream, ToolError, check_tool_choice, check_tools, format_for, tool_signature  # noqa: E402

from conftest import SHARED  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add numbers",
    "parameters": {"type": "object", "properties": {
        "values": {"type": "array", "items": {"type": "number"}, "minItems": 2},
        "options": {"type": "object", "properties": {"round": {"type": "boolean"}}, "required": ["round"]}},
        "required": ["values", "options"]}}}
TOOLS = [WEATHER, ADD]
SCHEMA = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSGS = [{"role": "system", "content": "You help with tools."},
        {"role": "user", "content": "What is the weather in Paris?"}]


# ---- parsing, per family ---------------------------------------------------------------------------
HERMES_TEMPLATE = "...{{ '<tool_call>' }}..."             # what Qwen2.5/Qwen3/Hermes/SmolLM3 templates contain
LLAMA3_TEMPLATE = "<|start_header_id|>ipython<|end_header_id|> {\"name\": ..., \"parameters\": ...} <|python_tag|>"


def test_format_table_detects_families():
    assert format_for(HERMES_TEMPLATE).name == "hermes"
    assert format_for(LLAMA3_TEMPLATE).name == "llama3_json"
    assert format_for(None).name == "hermes"                # the fallback template's format
    assert {f.name for f in FORMATS} >= {"hermes", "llama3_json"}


@pytest.mark.parametrize("template, text, content, calls", [
    (HERMES_TEMPLATE, 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Oslo"})]),
    (HERMES_TEMPLATE, '<tool_call>{"name": "add", "arguments": "{\\"values\\": [1, 2]}"}</tool_call>\n'
                      '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>',
     "", [("add", {"values": [1, 2]}), ("get_weather", {})]),
    (HERMES_TEMPLATE, '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', None, []),
    (HERMES_TEMPLATE, 'no call here', "no call here", []),
    (LLAMA3_TEMPLATE, '{"name": "get_weather", "parameters": {"city": "Rome"}}', "", [("get_weather", {"city": "Rome"})]),
    (LLAMA3_TEMPLATE, '<|python_tag|>{"name": "add", "parameters": {"values": [1]}}; {"name": "get_weather", "parameters": {}}',
     "", [("add", {"values": [1]}), ("get_weather", {})]),
    (LLAMA3_TEMPLATE, 'It is {"name": "x"} maybe', 'It is {"name": "x"} maybe', []),
])
def test_parse_calls(template, text, content, calls):
    fmt = format_for(template)
    got_content, got = fmt.parse(text, ["get_weather", "add"])
    assert [(c["name"], c["arguments"]) for c in got] == calls
    if content is not None:
        assert got_content == content


def test_call_stream_holds_back_calls_only():
    fmt = format_for(HERMES_TEMPLATE)
    cs = CallStream(fmt, ["get_weather"])
    pieces = ["Sure", ", one", " moment <tool", "_call>\n{\"name\": \"get_weather\",", " \"arguments\": {}}\n</tool_call>"]
    shown = "".join(cs.push(p) for p in pieces)
    rest, content, calls = cs.finish()
    assert shown + rest == "Sure, one moment " and content == "Sure, one moment" and calls[0]["name"] == "get_weather"
    cs = CallStream(fmt, ["get_weather"])
    shown = "".join(cs.push(p) for p in ["a <b>", " c <tool", "box"])
    rest, content, calls = cs.finish()
    assert shown + rest == "a <b> c <toolbox" and not calls


def test_check_tools_and_tool_choice_errors():
    assert check_tools(TOOLS)[0]["function"]["name"] == "get_weather"
    assert check_tool_choice(None, check_tools(TOOLS)) == "auto" and check_tool_choice(None, []) == "none"
    bad = [
        ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": 5}}}}}],
         "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}], "tools[0].function.parameters"),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        ("get_weather", "tools"),
    ]
    for tools, param in bad:
        with pytest.raises(ToolError) as e:
            check_tools(tools)
        assert e.value.param == param and param in str(e.value)
    for choice in ("sometimes", {"type": "function", "function": {"name": "nope"}}, {"type": "function"}, 3):
        with pytest.raises(ToolError, match="tool_choice"):
            check_tool_choice(choice, check_tools(TOOLS))
    with pytest.raises(ToolError, match="tool_choice"):
        check_tool_choice("required", [])


def test_signature_is_compact_and_complete():
    s = tool_signature(check_tools([ADD])[0])
    assert s == ('add(values: number[], options: {round: boolean}) - Add numbers')
    s = tool_signature(check_tools([WEATHER])[0])
    assert 'unit: "celsius"|"fahrenheit"' in s and "days?: integer" in s and "City name" in s


def test_named_choice_shows_only_that_tool():

    import minilm
    from minilm.chat import prepare_chat
    path = SHARED / "models" / "proxy-qwen3-shakespeare"
    if not (path / "config.json").exists():
        pytest.skip("proxy-qwen3-shakespeare not found")
    m = minilm.load(str(path), n_ctx=1024)
    text = lambda p: m.tokenizer.decode(p.ids)
    both = text(prepare_chat(m, MSGS, tools=TOOLS, tool_choice="required", max_tokens=8))
    named = text(prepare_chat(m, MSGS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                              max_tokens=8))
    assert "get_weather" in both and "add(" in both
    assert "get_weather" not in named and "add(" in named


# ---- through the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(live_servers):
    return live_servers(PROXY, ctx=1024)


def _check_call(tc, names=("get_weather", "add")):
    assert tc.type == "function" and tc.id and tc.function.name in names
    args = json.loads(tc.function.arguments)
    jsonschema.validate(args, SCHEMA[tc.function.name])
    return args


def test_required_and_named_calls_have_valid_arguments(server):
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        r = server.client.chat.completions.create(model="x", messages=MSGS, tools=TOOLS, tool_choice="required",
                                                  max_tokens=200, **kw)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        _check_call(c.message.tool_calls[0])
        r = server.client.chat.completions.create(
            model="x", messages=MSGS, tools=TOOLS, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "add"}}, **kw)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls"
        assert [tc.function.name for tc in c.message.tool_calls] == ["add"]
        _check_call(c.message.tool_calls[0])


def test_streamed_tool_call_deltas(server):
    stream = server.client.chat.completions.create(
        model="x", messages=MSGS, tools=TOOLS, max_tokens=200, stream=True, temperature=0.8, seed=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls, finish = {}, None
    for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or []:
            e = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            e["id"] = tc.id or e["id"]
            e["name"] += (tc.function.name or "") if tc.function else ""
            e["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMA["get_weather"])


def test_tool_round_trip(server):
    r = server.client.chat.completions.create(model="x", messages=MSGS, tools=TOOLS, tool_choice="required",
                                              max_tokens=200, temperature=0)
    msg = r.choices[0].message
    call = msg.tool_calls[0]
    _check_call(call)
    history = MSGS + [msg.model_dump(exclude_none=False),                 # content None, as returned
                      {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21, "sky": "clear"})}]
    r2 = server.client.chat.completions.create(model="x", messages=history, tools=TOOLS, max_tokens=24,
                                               temperature=0)
    c = r2.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    assert c.message.content or c.message.tool_calls
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens                  # the call and result were rendered
    # tool_choice none: plain text, no parsing; auto on a tiny model: whatever it says, well-formed
    r3 = server.client.chat.completions.create(model="x", messages=history, tools=TOOLS, tool_choice="none",
                                               max_tokens=8, temperature=0)
    assert r3.choices[0].message.tool_calls is None and r3.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                          "properties": {"a": {"type": "wrong"}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "nope"}}]}, "tools[0].function.parameters"),
    ({"tools": "x"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages[2].tool_calls[0].function.arguments"),
    ({"messages": MSGS + [{"role": "assistant", "content": None}]}, "messages[2].content"),
])
def test_bad_tools_are_400_naming_the_field(server, body, param):
    r = server.post("/v1/chat/completions", {"messages": MSGS, "max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert re.sub(r"\[\d+\].*", "", param) in err["message"]
    assert server.healthy()
