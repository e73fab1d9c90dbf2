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


# Free strings, keys, arrays and numbers of a schema get bounds derived from the token budget,
# and objects with declared properties get no undeclared keys, so that a small model that never
# closes a string, keeps inventing keys or writes digits forever still ends with a complete, valid
# value instead of running out of tokens. Every change only narrows the schema (each output still
# validates against the caller's schema). `uniqueItems`, which the grammar engine cannot express,
# becomes a narrowing too: the array is held to minItems (at least 1) items and item j is drawn
# from the j-th of disjoint parts of the item schema (`_distinct_parts`: enum values, number
# ranges, string lengths); other item schemas are refused with a ConstraintError (an output that
# might repeat an item is never given).
_NUMBER_SPAN = 10 ** 9         # numbers without a bound get one this far from the other (or 0)
_NUMBER_STEP = 0.001           # ... and numbers without multipleOf get at most 3 decimals
_ARRAY_CAP = 8                  # items, for arrays without maxItems (fewer when items are big)
_STRING_CAP = (8, 512)          # chars: lowest and highest bound for strings without maxLength
_PATTERN_MIN = 32               # chars: lowest bound for strings with a pattern / an open format
_KEY_PATTERN = "^[A-Za-z0-9_]{1,16}$"   # keys of objects that take any keys
# formats whose strings have a bounded length anyway
_BOUNDED_FORMATS = {"date", "uuid", "ipv4", "ipv6", "full-date"}   # (times: any number of decimals)
_ANY_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}


def _open_pattern(p) -> bool:
    """Whether regex text `p` may match strings of any length (an unbounded quantifier)."""
    import re
    return not isinstance(p, str) or bool(re.search(r"(?<!\\)[*+]|\{\d*,\}", p))


def _has_type(s: dict, name: str) -> bool:
    """Whether s's "type" is `name` or a list holding it (["string", "null"])."""
    t = s.get("type")
    return t == name or (isinstance(t, list) and name in t)


def _free_string(s: dict, patterns: bool = True) -> bool:
    """A string schema whose length has no bound (with patterns: also open patterns / formats)."""
    if not _has_type(s, "string") or "maxLength" in s or {"enum", "const"} & s.keys():
        return False
    if "pattern" in s or "format" in s:
        return patterns and ("pattern" not in s or _open_pattern(s["pattern"])) and \
            s.get("format") not in _BOUNDED_FORMATS
    return True


def _subschemas(s: dict):
    """(schema, multiplicity) of the direct sub-schemas of s."""
    for k in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(s.get(k), dict):
            for v in s[k].values():
                yield v, (min(s.get("maxProperties", 4), 4) if k == "patternProperties" else 1)
    for k in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(s.get(k), list):
            for v in s[k]:
                yield v, 1
    for k in ("additionalProperties", "not", "if", "then", "else"):
        if isinstance(s.get(k), dict):
            yield s[k], 1
    if isinstance(s.get("items"), dict):
        yield s["items"], min(s.get("maxItems", _ARRAY_CAP), _ARRAY_CAP)


def _int(v, default=0) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _est_tokens(s, depth: int = 0) -> int:
    """A rough size in tokens of a short value of schema s (for sizing array caps)."""
    if not isinstance(s, dict) or depth > 6:
        return 4
    if "const" in s or "enum" in s:
        vals = [s["const"]] if "const" in s else s["enum"] if isinstance(s["enum"], list) else [0]
        return 1 + max(len(json.dumps(v)) for v in vals) // 2 if vals else 2
    subs = [b for k in ("anyOf", "oneOf") for b in (s.get(k) or []) if isinstance(s.get(k), list)]
    if subs:
        return max(_est_tokens(b, depth + 1) for b in subs)
    t = s.get("type")
    if t == "object" or isinstance(s.get("properties"), dict):
        props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
        return 2 + sum(3 + len(k) // 3 + _est_tokens(v, depth + 1) for k, v in props.items())
    if t == "array":
        return 2 + max(_int(s.get("minItems")), 1) * (1 + _est_tokens(s.get("items"), depth + 1))
    if t == "string":
        return 2 + min(_int(s.get("maxLength"), 8), 16) // 2
    return {"number": 6, "integer": 5, "boolean": 2, "null": 2}.get(t, 4)


def _inclusive(s: dict) -> None:
    """Exclusive bounds that are multiples of the step (multipleOf, 1 for integers) -> inclusive
    bounds one step in (the same values; llguidance 1.9 lets 0 through exclusiveMinimum 0 when an
    exclusiveMaximum is also given)."""
    step = 1 if _has_type(s, "integer") and not _has_type(s, "number") and "multipleOf" not in s \
        else s.get("multipleOf")
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if not num(step) or step <= 0:
        return
    for ex, inc, sign in (("exclusiveMinimum", "minimum", 1), ("exclusiveMaximum", "maximum", -1)):
        v = s.get(ex)
        if num(v) and abs(v / step - round(v / step)) < 1e-9:
            w = (round(v / step) + sign) * step
            w = int(round(w)) if isinstance(step, int) or float(w).is_integer() else round(w, 12)
            if inc not in s or (s[inc] < w if sign > 0 else s[inc] > w):
                s[inc] = w
            del s[ex]


def _close_all_of(s: dict) -> None:
    """An object made of allOf branches that each declare some properties: every branch (and s)
    gets the union of the declared keys (the others as {}) and additionalProperties false, so
    the object holds only declared keys (a narrowing; the branches' schemas still all apply)."""
    parts = [s] + list(s["allOf"])
    if not all(isinstance(b, dict) for b in parts):
        return
    if any({"additionalProperties", "patternProperties", "unevaluatedProperties", "propertyNames",
            "anyOf", "oneOf", "$ref"} & b.keys() for b in parts):
        return
    keys, req = {}, set()
    for b in parts:
        if "properties" in b and not isinstance(b["properties"], dict):
            return
        keys.update({k: None for k in b.get("properties") or {}})
        req.update(b.get("required") or [])
    if not keys or not req <= set(keys):
        return
    for b in parts:
        b["properties"] = {**{k: {} for k in keys}, **(b.get("properties") or {})}
        b["additionalProperties"] = False


def _distinct_parts(item, n: int):
    """n schemas, each narrower than `item`, no two of which share a value (an enum split n
    ways, a bounded number range cut in n, strings of n disjoint length windows, the two
    booleans); None when `item` is not one of those (or n < 2: nothing to keep apart)."""
    if not isinstance(item, dict) or n < 2 or {"anyOf", "oneOf", "allOf", "$ref", "not"} & item.keys():
        return None
    if "const" in item:
        return None
    if isinstance(item.get("enum"), list):
        vals, seen = [], set()
        for v in item["enum"]:
            if json.dumps(v, sort_keys=True) not in seen:
                seen.add(json.dumps(v, sort_keys=True))
                vals.append(v)
        return [{**item, "enum": vals[j::n]} for j in range(n)] if len(vals) >= n else None
    t = item.get("type")
    if t == "boolean":
        return [{**item, "const": b} for b in (False, True)] if n == 2 else None
    if t == "integer" and "multipleOf" not in item:
        lo = item.get("minimum", item["exclusiveMinimum"] + 1 if _int(item.get("exclusiveMinimum"), None) is not None else None)
        hi = item.get("maximum", item["exclusiveMaximum"] - 1 if _int(item.get("exclusiveMaximum"), None) is not None else None)
        if not (isinstance(lo, int) and isinstance(hi, int)) or hi - lo + 1 < n:
            return None
        w = (hi - lo + 1) // n
        base = {k: v for k, v in item.items() if k not in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")}
        return [{**base, "minimum": lo + j * w, "maximum": hi if j == n - 1 else lo + (j + 1) * w - 1} for j in range(n)]
    if t == "number":
        import math
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        step = item.get("multipleOf", _NUMBER_STEP)
        lo, hi = item.get("minimum"), item.get("maximum")
        if not (num(lo) and num(hi) and num(step)) or {"exclusiveMinimum", "exclusiveMaximum"} & item.keys():
            return None
        k_lo, k_hi = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)    # the step grid in [lo, hi]
        w = (k_hi - k_lo + 1) // n
        if w < 1:
            return None
        at = lambda k: round(k * step, 12)
        return [{**item, "minimum": max(lo, at(k_lo + j * w)),
                 "maximum": hi if j == n - 1 else min(hi, at(k_lo + (j + 1) * w - 1))} for j in range(n)]
    if isinstance(item.get("properties"), dict):       # objects: apart by one property, made required
        req = item.get("required") if isinstance(item.get("required"), list) else []
        for k in sorted(item["properties"], key=lambda k: k not in req):
            parts = _distinct_parts(item["properties"][k], n)
            if parts is not None:
                return [{**item, "properties": {**item["properties"], k: part},
                         "required": req + ([k] if k not in req else [])} for part in parts]
        return None
    if t == "string" and not {"pattern", "format"} & item.keys():
        lo = _int(item.get("minLength"))
        hi = _int(item.get("maxLength"), lo + 8 * n - 1)
        w = (hi - lo + 1) // n
        if w < 1:
            return None
        return [{**item, "minLength": lo + j * w, "maxLength": hi if j == n - 1 else lo + (j + 1) * w - 1}
                for j in range(n)]
    return None


def bound_schema(schema, max_tokens: int, patterns: bool = True):
    """A copy of `schema` narrowed to fit in about max_tokens tokens: free strings get maxLength
    (with patterns=True also strings with an open pattern or format, at least _PATTERN_MIN),
    arrays maxItems, numbers a range and 3 decimals, objects that take any keys short keys and
    scalar values (at most 4 unless minProperties says more), objects with declared properties
    (all required ones declared) additionalProperties false."""
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

    open_ = set()                 # ids of allOf branches: each declares only part of the keys

    def closed(s, mult):          # declared properties only (as OpenAI's strict mode asks)
        props = s.get("properties")
        if isinstance(s.get("allOf"), list):
            open_.update(id(b) for b in s["allOf"])
            _close_all_of(s)
        if id(s) in open_ or "allOf" in s or \
                {"patternProperties", "unevaluatedProperties", "propertyNames"} & s.keys():
            return
        if isinstance(props, dict) and props:
            if s.get("additionalProperties") is not False and set(s.get("required", [])) <= set(props) \
                    and _int(s.get("minProperties")) <= len(props):
                s["additionalProperties"] = False
        elif s.get("type") == "object" and s.get("additionalProperties") is not False and "properties" not in s:
            # any keys: short identifier keys (a free key is an endless string for a small model)
            extra = s.get("additionalProperties")
            s["patternProperties"] = {_KEY_PATTERN: extra if isinstance(extra, dict) else dict(_ANY_SCALAR)}
            s["additionalProperties"] = False
            if "maxProperties" not in s:
                s["maxProperties"] = max(_int(s.get("minProperties")), 4)

    def numbers(s, mult):         # bounded digits: range +-1e9 around a given bound, 3 decimals
        t = "number" if _has_type(s, "number") else "integer" if _has_type(s, "integer") else None
        if t is None or {"enum", "const"} & s.keys():
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
        _inclusive(s)

    def arrays(s, mult):          # at most _ARRAY_CAP items, fewer when an item is big
        if s.get("type") != "array" and "items" not in s:
            return
        lo = _int(s.get("minItems"))
        if s.pop("uniqueItems", False):
            n = min(_int(s.get("maxItems"), 1 << 30), max(lo, 1))
            parts = None if "prefixItems" in s else _distinct_parts(s.get("items"), n)
            if parts is None:           # refuse rather than give output that may not validate
                raise ConstraintError("uniqueItems: cannot be enforced for these items (supported: items "
                                      "with an enum, bounded numbers or integers, strings, booleans, or "
                                      "objects with such a required property); drop uniqueItems")
            s["prefixItems"], s["items"], s["minItems"] = parts, False, n
            s["maxItems"] = n
        if "maxItems" not in s:
            fit = max_tokens // (3 * _est_tokens(s.get("items")))
            s["maxItems"] = max(lo, min(_ARRAY_CAP, max(fit, 1)))

    walk(schema, 1, closed)
    walk(schema, 1, numbers)
    walk(schema, 1, arrays)
    n = [0]

    def count(s, mult):
        if _free_string(s, patterns):
            n[0] += mult
    walk(schema, 1, count)
    # about 1 character a token: a small model on a byte-level BPE spells odd strings bytewise
    cap = int(np.clip(max_tokens // (n[0] + 1), *_STRING_CAP))

    def strings(s, mult):
        if _free_string(s, patterns):
            lo = _PATTERN_MIN if ("pattern" in s or "format" in s) else 0
            s["maxLength"] = max(cap, lo, _int(s.get("minLength")))
    walk(schema, 1, strings)
    return schema


def _looks_like_gbnf(text: str) -> bool:
    return "::=" in text


def grammar_spec(json_schema=None, regex=None, grammar=None, param: str | None = None,
                 max_tokens: int | None = None, patterns: bool = True) -> str | None:
    """The llguidance grammar (a JSON string) for at most one of the three, or None.
    max_tokens: the token budget, for `bound_schema` (None: schema as given); patterns: whether
    it also bounds strings with an open pattern / format."""
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
            try:
                schema = bound_schema(schema, max_tokens, patterns)
            except ConstraintError as e:
                raise ConstraintError(f"{p}: {e}", p) from None
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
    try:
        return Constraint(model, spec, param or kind, eos_ids)
    except ConstraintError as e:
        if json_schema is None or max_tokens is None or "nsatisfiable" not in str(e):
            raise
    # a pattern / format whose shortest match is longer than the length bound: bound those less
    for patterns, budget in ((False, max_tokens), (False, None)):
        try:
            return Constraint(model, grammar_spec(json_schema, param=param, max_tokens=budget, patterns=patterns),
                              param or kind, eos_ids)
        except ConstraintError as e:
            if budget is None or "nsatisfiable" not in str(e):
                raise


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
