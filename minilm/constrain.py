"""Constrained decoding: output that always matches a JSON schema, a regex or a context-free grammar.

    model.generate(prompt, json_schema={"type": "object", ...})
    model.generate(prompt, regex=r"\\d{3}-\\d{4}")
    model.generate(prompt, grammar='start: "yes" | "no"')

The grammar engine is llguidance (Microsoft's Rust "low-level guidance" library, a small wheel
with no Python dependencies): it compiles the constraint against the model's own tokenizer.json
and, before every token, computes the set of tokens that keep the output a prefix of a valid
string. `Constraint.mask` sets every other logit to -inf before the sampler sees them (greedy and
sampled alike), and EOS is only allowed where the grammar accepts the text so far, so a finished
generation is always valid; one that runs out of `max_new_tokens` ends with
finish_reason "length" and may be cut short (callers say so).

Grammar syntax (`grammar=`): llguidance's Lark dialect (https://github.com/guidance-ai/llguidance
docs/syntax.md): rules `name: a | b`, string literals "...", regex terminals /.../, `%json {schema}`
for an embedded JSON schema; `start` is the start rule. A GBNF grammar (llama.cpp's `::=` syntax)
is converted to Lark first.

Bad input raises `ConstraintError` (a ValueError) naming the field (`json_schema`, `regex`,
`grammar`, or the name the caller passes as `param`).
"""
from __future__ import annotations

import json
import weakref

import numpy as np


class ConstraintError(ValueError):
    """An invalid schema / regex / grammar. `param` names the field (OpenAI's error.param)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = "invalid_constraint"


class IncompleteOutputWarning(UserWarning):
    """`LM.generate` under a constraint ran out of max_new_tokens before the output matched
    (the OpenAI-shaped calls say so with finish_reason "length")."""


def _llg():
    try:
        import llguidance
    except ImportError:  # a regular dependency; only a broken install lacks it
        raise ConstraintError("constrained output needs the llguidance package: pip install llguidance") from None
    return llguidance


# LLTokenizer per (tokenizer object, vocab size, eos ids): building one walks the whole
# vocabulary (tens of ms for 50k tokens), so it is made once per model.
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer, vocab_size: int, eos_ids):
    """The llguidance tokenizer for a `minilm.tokenizer.Tokenizer` (its tokenizer.json), with the
    model's vocab size (logit rows; may exceed the tokenizer's) and end-of-sequence ids."""
    llg = _llg()
    eos = sorted({int(e) for e in eos_ids if 0 <= int(e) < vocab_size})
    key = (int(vocab_size), tuple(eos))
    per = _TOKENIZERS.setdefault(tokenizer, {})
    if key not in per:
        hf = tokenizer.hf
        try:
            per[key] = llg.LLTokenizer(hf.to_str(), n_vocab=int(vocab_size), eos_token=eos or None)
        except Exception as e:   # e.g. a tokenizer type llguidance cannot read
            raise ConstraintError(f"constrained output: llguidance cannot use this tokenizer ({e})") from None
    return per[key]


# ---- turning a json_schema / regex / grammar into an llguidance grammar ------------------------
def check_json_schema(schema, param: str = "json_schema") -> dict | bool:
    """A JSON schema given as a dict (or its JSON text; True/False): checked against the JSON
    Schema meta-schema when `jsonschema` is installed. Returns the parsed schema."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"{param}: not valid JSON ({e})", param) from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"{param}: a JSON schema must be an object, got {type(schema).__name__}", param)
    try:
        import jsonschema
    except ImportError:
        return schema
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ConstraintError(f"{param}: invalid JSON schema{' at ' + where if where else ''}: {e.message}",
                              param) from None
    return schema


# Free strings and arrays (no maxLength / maxItems, pattern, format, enum or const) get a length
# bound derived from the token budget, numbers without bounds a range of +-1e9 and 3 decimals
# (else digits can run on forever), and objects with declared properties (and no
# additionalProperties) get no undeclared keys, so that a small model that never closes a string
# or keeps inventing keys still ends with a complete, valid object instead of running out of
# tokens: these only narrow the schema (every output still validates against the caller's schema).
_NUMBER_SPAN = 10 ** 9         # numbers without a bound get one this far from the other (or 0)
_NUMBER_STEP = 0.001           # ... and numbers without multipleOf get at most 3 decimals
_ARRAY_CAP = 8                  # items, for arrays without maxItems
_STRING_CAP = (8, 512)          # chars: lowest and highest bound for strings without maxLength


def _free_string(s: dict) -> bool:
    return (s.get("type") == "string" and "maxLength" not in s and not
            {"pattern", "format", "enum", "const"} & s.keys())


def _subschemas(s: dict):
    """(schema, multiplicity) of the direct sub-schemas of s."""
    for k in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(s.get(k), dict):
            for v in s[k].values():
                yield v, 1
    for k in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(s.get(k), list):
            for v in s[k]:
                yield v, 1
    for k in ("additionalProperties", "not", "if", "then", "else"):
        if isinstance(s.get(k), dict):
            yield s[k], 1
    if isinstance(s.get("items"), dict):
        yield s["items"], min(s.get("maxItems", _ARRAY_CAP), _ARRAY_CAP)


def bound_schema(schema, max_tokens: int):
    """A copy of `schema` where free strings get maxLength and free arrays maxItems, chosen so
    that the whole output fits in about max_tokens tokens (assuming >= 2 characters a token), and
    objects with declared properties (all required ones declared) get additionalProperties false."""
    import copy
    if not isinstance(schema, dict):
        return schema
    schema = copy.deepcopy(schema)

    def walk(s, mult, visit):
        if not isinstance(s, dict):
            return
        visit(s, mult)
        for sub, k in _subschemas(s):
            walk(sub, mult * k, visit)

    n = [0]

    def count(s, mult):
        if _free_string(s):
            n[0] += mult

    def arrays(s, mult):
        if s.get("type") == "array" and "maxItems" not in s:
            s["maxItems"] = max(int(s.get("minItems", 0)) if isinstance(s.get("minItems"), int) else 0,
                                _ARRAY_CAP)
    def closed(s, mult):          # declared properties only (as OpenAI's strict mode asks)
        props = s.get("properties")
        if isinstance(props, dict) and props and not {"additionalProperties", "patternProperties",
                                                      "unevaluatedProperties"} & s.keys() \
                and set(s.get("required", [])) <= set(props):
            s["additionalProperties"] = False
    def numbers(s, mult):         # bounded digits: range +-1e9 around a given bound, 3 decimals
        t = s.get("type")
        if t not in ("number", "integer") or {"enum", "const"} & s.keys():
            return
        lo = s.get("minimum", s.get("exclusiveMinimum"))
        hi = s.get("maximum", s.get("exclusiveMaximum"))
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        if not num(lo) and not num(hi):
            s["minimum"], s["maximum"] = -_NUMBER_SPAN, _NUMBER_SPAN
        elif not num(hi):
            s["maximum"] = lo + _NUMBER_SPAN
        elif not num(lo):
            s["minimum"] = hi - _NUMBER_SPAN
        if t == "number" and "multipleOf" not in s:
            s["multipleOf"] = _NUMBER_STEP
    walk(schema, 1, closed)
    walk(schema, 1, numbers)
    walk(schema, 1, arrays)
    walk(schema, 1, count)
    cap = int(np.clip(2 * max_tokens // (2 * n[0] + 1), *_STRING_CAP))

    def strings(s, mult):
        if _free_string(s):
            s["maxLength"] = max(cap, int(s.get("minLength", 0)) if isinstance(s.get("minLength"), int) else 0)
    walk(schema, 1, strings)
    return schema


def _looks_like_gbnf(text: str) -> bool:
    return "::=" in text


def grammar_spec(json_schema=None, regex=None, grammar=None, param: str | None = None,
                 max_tokens: int | None = None) -> str | None:
    """The llguidance grammar (a JSON string) for at most one of the three, or None.
    max_tokens: the token budget, for `bound_schema` (None: schema as given)."""
    llg = _llg()
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"{' and '.join(given)}: give only one constraint", param or given[1])
    if not given:
        return None
    kind = given[0]
    p = param or kind
    if kind == "json_schema":
        schema = check_json_schema(json_schema, p)
        if max_tokens is not None:
            schema = bound_schema(schema, max_tokens)
        try:
            return llg.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False,
                                              "item_separator": ", ", "key_separator": ": "})
        except ValueError as e:
            raise ConstraintError(f"{p}: {e}", p) from None
    if kind == "regex":
        if not isinstance(regex, str) or not regex:
            raise ConstraintError(f"{p}: must be a non-empty string (a regular expression)", p)
        return llg.LLMatcher.grammar_from_regex(regex)
    if not isinstance(grammar, str) or not grammar.strip():
        raise ConstraintError(f"{p}: must be a non-empty string (a Lark or GBNF grammar)", p)
    text = grammar
    if _looks_like_gbnf(text):
        from llguidance.gbnf_to_lark import any_to_lark
        try:
            text = any_to_lark(text)
        except Exception as e:
            raise ConstraintError(f"{p}: cannot read the GBNF grammar ({e})", p) from None
    return llg.LLMatcher.grammar_from_lark(text)


class Constraint:
    """A compiled constraint for one model: `start()` gives the per-generation state."""

    def __init__(self, model, spec: str, param: str, eos_ids=None):
        llg = _llg()
        self.vocab_size = int(model.config.vocab_size)
        eos = list(model.eos_token_ids if eos_ids is None else eos_ids)
        self.tok = ll_tokenizer(model.tokenizer, self.vocab_size, eos)
        self.eos_ids = eos
        self.spec = spec
        self.param = param
        err = llg.LLMatcher.validate_grammar(spec, self.tok)
        if err and not err.startswith("WARNING"):
            raise ConstraintError(f"{param}: cannot be compiled: {err.strip()}", param)

    def start(self) -> "ConstraintState":
        return ConstraintState(self)


def compile_constraint(model, json_schema=None, regex=None, grammar=None, param: str | None = None,
                       eos_ids=None, max_tokens: int | None = None) -> Constraint | None:
    """Check and compile at most one of json_schema / regex / grammar for `model`; None if none given.
    eos_ids: the ids that end the generation (default: the model's EOS ids); max_tokens: the
    token budget that bounds free strings and arrays of a json_schema (`bound_schema`)."""
    spec = grammar_spec(json_schema, regex, grammar, param, max_tokens)
    if spec is None:
        return None
    kind = "json_schema" if json_schema is not None else "regex" if regex is not None else "grammar"
    return Constraint(model, spec, param or kind, eos_ids)


def _apply_bitmask_py(logits, bits, out):
    """out f32[V] = logits f32[V] where bit i of bits u32[ceil(V/32)] is set, else -inf; returns
    how many tokens are allowed."""
    n = 0
    for w in range(bits.shape[0]):
        b = bits[w]
        base = w * 32
        m = min(32, out.shape[0] - base)
        if b == 0:                                   # most words: nothing allowed
            out[base:base + m] = -np.inf
            continue
        for j in range(m):
            if (b >> np.uint32(j)) & np.uint32(1):
                out[base + j] = logits[base + j]
                n += 1
            else:
                out[base + j] = -np.inf
    return n


try:
    import numba
    _apply_bitmask = numba.njit(cache=True, nogil=True)(_apply_bitmask_py)
except ImportError:  # numba is a dependency; keep the module importable without it
    _apply_bitmask = None


class ConstraintState:
    """One generation under a constraint.

    mask(logits f32[V]) -> f32[V]: a copy with the tokens the grammar forbids next set to -inf.
    advance(tok): feed the chosen token; `done` turns True once the grammar can take no more
    tokens (the text is complete), `accepting` when the text so far is a complete match."""

    def __init__(self, c: Constraint):
        llg = _llg()
        self.c = c
        self.m = llg.LLMatcher(c.tok, c.spec, log_level=0)
        if self.m.is_error():
            raise ConstraintError(f"{c.param}: {self.m.get_error()}", c.param)
        V = c.vocab_size
        self.words = (V + 31) // 32
        self.bits = np.zeros(self.words, np.uint32)            # u32[ceil(V/32)]: bit i = token allowed
        self.out = np.zeros(V, np.float32)                     # f32[V]: masked logits
        self.done = False

    @property
    def accepting(self) -> bool:
        return bool(self.m.is_accepting())

    def mask(self, logits: np.ndarray) -> np.ndarray:
        m = self.m
        m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        if m.is_error():
            raise RuntimeError(f"{self.c.param}: the grammar engine failed: {m.get_error()}")
        V = len(self.out)
        if _apply_bitmask is not None:
            n = _apply_bitmask(logits[:V], self.bits, self.out)
        else:
            allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[:V].astype(bool)
            np.copyto(self.out, logits[:V])
            np.putmask(self.out, ~allowed, -np.inf)
            n = int(allowed.sum())
        if n == 0:
            raise RuntimeError(f"{self.c.param}: no token can continue the output (grammar dead end)")
        return self.out

    def allowed(self, tok: int) -> bool:
        """Whether the last mask allowed token `tok`."""
        return 0 <= tok < len(self.out) and bool((int(self.bits[tok >> 5]) >> (tok & 31)) & 1)

    def pick_allowed(self, tok: int) -> int:
        """`tok` if the last mask allowed it, else the best allowed token (a guard against a
        sampler that returns a masked id, e.g. when every allowed logit underflowed)."""
        return tok if self.allowed(tok) else int(np.argmax(self.out))

    def advance(self, tok: int) -> None:
        if not self.m.consume_token(int(tok)):
            raise RuntimeError(f"{self.c.param}: token {tok} rejected by the grammar: {self.m.get_error()}")
        self.done = bool(self.m.is_stopped())
