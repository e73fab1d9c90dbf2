"""Constrained output (minilm/constrain.py): json_schema / regex / grammar in `generate`, and
`response_format` through a live `minilm serve` with the official openai client; every output is
validated with `jsonschema` against the schema the caller gave."""
import json
import re
import warnings

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="pip install 'minilm[test]' (jsonschema)")
pytest.importorskip("llguidance", reason="llguidance not installed")

from minilm.constrain import ConstraintError, IncompleteOutputWarning, bound_schema  # noqa: E402

PROXY = "proxy-qwen3-shakespeare"

# several shapes of schema: nested objects, arrays, enums, numbers with bounds, required fields
SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
     "required": ["name", "age", "email"]},
    {"type": "object", "properties": {
        "title": {"type": "string", "minLength": 3, "maxLength": 20},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                 "minItems": 1, "maxItems": 3},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
     "required": ["title", "tags", "score"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer", "exclusiveMinimum": 0},
            "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"]}},
                 "required": ["id", "address"]},
        "points": {"type": "array", "items": {"type": "object", "properties": {
            "x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}},
        "active": {"type": "boolean"},
        "kind": {"enum": ["a", "b", 3, None]}},
     "required": ["user", "points", "active", "kind"]},
    {"type": "array", "items": {"type": "integer", "minimum": 10, "maximum": 99}, "minItems": 2, "maxItems": 4},
    {"anyOf": [{"type": "object", "properties": {"ok": {"const": True}}, "required": ["ok"]},
               {"type": "object", "properties": {"error": {"type": "string", "maxLength": 12}},
                "required": ["error"]}]},
]


@pytest.fixture(scope="module")
def model(shared_model):
    return shared_model(PROXY)          # one load per session (test_constrain and test_embed share it)


# ---- in-process --------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_generate_json_schema_validates_greedy_sampled_and_streamed(model, i):
    schema = SCHEMAS[i]
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.95, seed=7 + i)):
        text = model.generate("KING: speak", max_new_tokens=150, json_schema=schema, **kw)
        jsonschema.validate(json.loads(text), schema)
        streamed = "".join(model.generate("KING: speak", max_new_tokens=150, json_schema=schema,
                                          stream=True, **kw))
        assert streamed == text


def test_regex_and_grammars(model):
    out = model.generate("ROMEO:", max_new_tokens=20, regex=r"[0-9]{3}-[A-Z]{2,4}", temperature=0.8, seed=1)
    assert re.fullmatch(r"[0-9]{3}-[A-Z]{2,4}", out), out
    lark = 'start: greet " " name "!"\ngreet: "hello" | "goodbye"\nname: /[a-z]{2,6}/'
    out = model.generate("ROMEO:", max_new_tokens=20, grammar=lark, temperature=0.9, seed=2)
    assert re.fullmatch(r"(hello|goodbye) [a-z]{2,6}!", out), out
    gbnf = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'
    out = model.generate("ROMEO:", max_new_tokens=20, grammar=gbnf)
    assert re.fullmatch(r"(yes|no) [0-9]{1,2}", out), out


def test_budget_too_small_is_a_prefix_and_says_so(model):
    schema = SCHEMAS[2]
    with pytest.warns(IncompleteOutputWarning, match="ran out"):
        text = model.generate("KING:", max_new_tokens=5, json_schema=schema)
    assert text.startswith("{") and len(text) > 1
    r = model.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
                                     response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert r["choices"][0]["finish_reason"] == "length"
    r = model.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=150, temperature=0,
                                     response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert r["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), schema)


def test_eos_only_where_the_grammar_accepts(model):
    # the model's first choice would be to stop (a tiny model); a grammar needing 3 digits forbids it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            out = model.generate("x", max_new_tokens=10, regex=r"[0-9]{3}", temperature=1.5, seed=seed)
            assert re.fullmatch(r"[0-9]{3}", out)


def test_mask_hook_leaves_generation_unchanged_without_constraint(model):
    a = model.generate("ROMEO:", max_new_tokens=12)
    model.generate("ROMEO:", max_new_tokens=12, json_schema={"type": "object"})
    assert model.generate("ROMEO:", max_new_tokens=12) == a


def test_bound_schema_only_narrows():
    s = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "number"}},
                                          "c": {"type": "string", "maxLength": 3}}, "required": ["a"]}
    b = bound_schema(s, 100)
    assert s["properties"]["a"] == {"type": "string"}                 # the caller's schema is untouched
    assert b["properties"]["a"]["maxLength"] >= 8 and b["properties"]["c"]["maxLength"] == 3
    assert 1 <= b["properties"]["b"]["maxItems"] <= 8 and b["additionalProperties"] is False
    nb = b["properties"]["b"]["items"]
    assert nb["minimum"] < 0 < nb["maximum"] and nb["multipleOf"] == 0.001
    keep = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["z"]}
    assert "additionalProperties" not in bound_schema(keep, 100)     # 'z' must stay possible


# schemas where a tiny model writes forever unless the bounds hold it: an open pattern, a
# date-time (any number of decimals), an email, any keys, uniqueItems, big array items
HARD = [
    {"type": "object", "properties": {"s": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                                      "t": {"type": "string", "format": "date-time"},
                                      "e": {"type": "string", "format": "email"}}, "required": ["s", "t", "e"]},
    {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]},
                                               "uniqueItems": True, "minItems": 2}}, "required": ["tags"]},
    {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "ok": {"type": "boolean"}, "name": {"type": "string"}}, "required": ["id", "ok", "name"]}},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"type": "object", "properties": {"b": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
                "required": ["b"]}]},
]


@pytest.mark.parametrize("i", range(len(HARD)))
def test_hard_schemas_finish_within_the_context(model, i):
    # no max_tokens: the budget is what is left of the proxy's 256-token context
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=i)):
        r = model.create_chat_completion([{"role": "user", "content": "JSON please"}], **kw,
                                         response_format={"type": "json_schema", "json_schema": {"name": "h", "schema": HARD[i]}})
        c = r["choices"][0]
        assert c["finish_reason"] == "stop", c["message"]["content"]
        jsonschema.validate(json.loads(c["message"]["content"]), HARD[i])


def test_unfittable_bounds_fall_back_to_the_schema_as_given(model):
    schema = {"type": "object", "properties": {"x": {"type": "string", "pattern": "^y{600}y*$"}}, "required": ["x"]}
    with pytest.warns(IncompleteOutputWarning):            # compiles; needs more than 12 tokens
        assert model.generate("x", max_new_tokens=12, json_schema=schema).startswith('{"x": "y')


@pytest.mark.parametrize("kw, param, what", [
    (dict(json_schema={"type": "strin"}), "json_schema", "invalid JSON schema"),
    (dict(json_schema={"type": "object", "properties": {"a": {"minimum": "x"}}}), "json_schema", "minimum"),
    (dict(json_schema="{not json"), "json_schema", "not valid JSON"),
    (dict(json_schema=[1, 2]), "json_schema", "must be an object"),
    (dict(regex="a(b"), "regex", "cannot be compiled"),
    (dict(regex=""), "regex", "non-empty"),
    (dict(grammar="start: undefined_rule"), "grammar", "cannot be compiled"),
    (dict(grammar="root ::= (("), "grammar", "GBNF"),
    (dict(regex="a", grammar='start: "a"'), "grammar", "only one"),
    (dict(json_schema={"type": "array", "uniqueItems": True, "minItems": 2,
                       "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}), "json_schema", "uniqueItems"),
])
def test_bad_constraints_name_the_field(model, kw, param, what):
    with pytest.raises(ConstraintError, match=re.escape(param) + ".*" + re.escape(what)) as e:
        model.generate("x", max_new_tokens=4, **kw)
    assert e.value.param == param


# ---- through the server, with the openai client ----------------------------------------------------
@pytest.fixture(scope="module")
def server(live_servers):
    return live_servers(PROXY)          # the session's server of this proxy (test_embed uses it too)


MSGS = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Describe a knight."}]


def test_server_response_format_json_schema(server):
    for i, schema in enumerate(SCHEMAS):
        for kw in (dict(temperature=0), dict(temperature=1.0, seed=i)):
            r = server.client.chat.completions.create(
                model="x", messages=MSGS, max_tokens=160,
                response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                        "strict": True}}, **kw)
            c = r.choices[0]
            assert c.finish_reason == "stop", (schema, c.message.content)
            jsonschema.validate(json.loads(c.message.content), schema)


def test_server_streamed_json_schema_and_json_object(server):
    schema = SCHEMAS[1]
    stream = server.client.chat.completions.create(
        model="x", messages=MSGS, max_tokens=160, temperature=0.7, seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)
    r = server.client.chat.completions.create(model="x", messages=MSGS, max_tokens=160, temperature=0,
                                              response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = server.client.completions.create(model="x", prompt="KING:", max_tokens=40, temperature=0,
                                         extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                             "name": "s", "schema": SCHEMAS[3]}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS[3])


def test_server_streamed_budget_too_small_says_length(server):
    schema = SCHEMAS[2]
    stream = server.client.chat.completions.create(
        model="x", messages=MSGS, max_tokens=6, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    chunks = [ch for ch in stream if ch.choices]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "length" and text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("rf, param", [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "a"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "required": "a"}}},
     "response_format.json_schema.schema"),
    ("json", "response_format"),
])
def test_server_bad_response_format_is_400(server, rf, param):
    r = server.post("/v1/chat/completions", {"messages": MSGS, "max_tokens": 8, "response_format": rf})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[0] in err["message"] and err["type"] == "invalid_request_error"
    assert server.healthy()
