"""Rendering untrusted chat templates (the Jinja `chat_template` shipped with a checkpoint) with limits.

A template comes with files downloaded from anywhere, so it is treated as hostile code:

- jinja2's `ImmutableSandboxedEnvironment` (no Python internals, no mutation of the messages);
- no loader: `{% include %}`, `{% import %}`, `{% from %}` and `{% extends %}` are refused when the
  template is compiled;
- bounded work: `range()` yields at most MAX_RANGE items, all `for` loops of one render together
  run at most MAX_LOOP_ITERATIONS iterations, and the render stops after MAX_RENDER_SECONDS (the
  clock is checked on every loop iteration, call, intercepted operator and output chunk, so
  nested loops without output and exponential macro recursion stop too);
- bounded memory: `*` (string / list repetition), `+`, `~`, `**`, `%`-formatting, `str.format`,
  the padding / joining / replacing methods and filters check the size of what they would build
  before building it (MAX_STRING characters or MAX_ITEMS list items per value), the text built
  by one render is budgeted (`char_budget`), and the output stops past MAX_OUTPUT characters.

Every refusal is a `minilm.errors.TemplateError` naming the limit or the construct.
"""
from __future__ import annotations

import json
import re
import threading
import time
from functools import lru_cache

from .errors import TemplateError

MAX_RANGE = 100_000              # items of one range()
MAX_LOOP_ITERATIONS = 1_000_000  # for-loop iterations of one render, all loops together
MAX_RENDER_SECONDS = 5.0         # wall time of one render
MAX_STRING = 8 * 1024 * 1024     # characters of one string built by the template
MAX_ITEMS = 1_000_000            # items of one list / tuple built by the template
MAX_OUTPUT = 8 * 1024 * 1024     # characters of the rendered text
MIN_CHAR_BUDGET = 64 * 1024 * 1024   # characters all string operations of one render may build
_BIG_NUMBER = re.compile(r"\d{8,}")  # a width / precision of 10^7 or more in a format string


class _Limits(threading.local):
    """Per-thread state of the render in progress."""

    def __init__(self):
        self.deadline = None
        self.iterations = 0
        self.budget = MIN_CHAR_BUDGET


_state = _Limits()


def _tick() -> None:
    d = _state.deadline
    if d is not None and time.monotonic() > d:
        raise TemplateError(f"chat template: render time limit of {MAX_RENDER_SECONDS:g} s exceeded")


def _size(x) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else None


def _charge(n: int, what: str) -> None:
    """Account for a string of n characters built by the template."""
    if n > MAX_STRING:
        raise TemplateError(f"chat template: {what} would build a string of {n:,} characters "
                            f"(limit {MAX_STRING:,})")
    _state.budget -= n
    if _state.budget < 0:
        raise TemplateError("chat template: builds too much text in one render (character budget "
                            "exhausted)")


def _check_value(x, what: str):
    """A value a template operation produced: strings and lists within the limits."""
    if isinstance(x, str):
        _charge(len(x), what)
    elif isinstance(x, (list, tuple)) and len(x) > MAX_ITEMS:
        raise TemplateError(f"chat template: {what} would build a list of {len(x):,} items (limit {MAX_ITEMS:,})")
    return x


def _check_format_string(fmt: str, args, percent: bool) -> None:
    """Refuse format strings whose widths could build huge strings ('%1000000000d', '{:>{w}}')."""
    if _BIG_NUMBER.search(fmt):
        raise TemplateError("chat template: a format string with a width or precision of 10^7 or more is refused")
    dynamic = ("*" in fmt) if percent else bool(re.search(r"\{[^{}]*\{", fmt))
    if dynamic:
        vals = list(args.values()) if isinstance(args, dict) else list(args)
        for v in vals:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_STRING:
                raise TemplateError(f"chat template: format width {v} is over the limit of {MAX_STRING:,}")


def _repeat_size(left, right) -> int | None:
    for seq, n in ((left, right), (right, left)):
        if _size(seq) is not None and isinstance(n, int) and not isinstance(n, bool):
            return len(seq) * max(n, 0)
    return None


def _guarded_iter(iterable):
    """Every for-loop's iterable: counts iterations and checks the clock."""
    for item in iterable:
        _state.iterations += 1
        if _state.iterations > MAX_LOOP_ITERATIONS:
            raise TemplateError(f"chat template: loop iteration limit of {MAX_LOOP_ITERATIONS:,} "
                                "per render exceeded")
        _tick()
        yield item


def _bounded_range(*args):
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        raise TemplateError(f"chat template: range{args!r}: arguments must be integers")
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise TemplateError(f"chat template: range of {len(r):,} items is over the limit of {MAX_RANGE:,}")
    return r


def _join(items, sep: str = "") -> str:
    """`sep.join(items)` after checking the size of the result."""
    items = list(items)
    if len(items) > MAX_ITEMS:
        raise TemplateError(f"chat template: join of {len(items):,} items (limit {MAX_ITEMS:,})")
    n = len(sep) * max(len(items) - 1, 0) + sum(len(x) if isinstance(x, str) else 16 for x in items)
    _charge(n, "join")
    return sep.join(items)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if isinstance(indent, int) and not isinstance(indent, bool) and indent > 64:
        raise TemplateError(f"chat template: tojson indent={indent} is over the limit of 64")
    return _check_value(json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                   sort_keys=sort_keys), "tojson")


def _raise_exception(message):
    raise TemplateError(f"rejected by the chat template: {message}")


# str methods whose integer arguments set the size of the result
_PAD_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}
# filters whose integer arguments set the size of the result (or of a generator's output)
_SIZED_FILTERS = {"center", "indent", "batch", "slice", "wordwrap", "truncate"}


def _limited_filter(name, f):
    """A jinja2 filter with its sizes checked (arguments before the call, the result after)."""
    skip = 1 if hasattr(f, "jinja_pass_arg") else 0      # context / eval_ctx / environment first

    def wrapper(*args, **kwargs):
        _tick()
        value, rest = (args[skip] if len(args) > skip else None), list(args[skip + 1:])
        if name in _SIZED_FILTERS:
            for v in rest + list(kwargs.values()):
                if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_ITEMS:
                    raise TemplateError(f"chat template: filter {name!r} argument {v} is over the limit "
                                        f"of {MAX_ITEMS:,}")
        if name == "format" and isinstance(value, str):
            _check_format_string(value, rest + list(kwargs.values()), percent=True)
        if name == "replace" and isinstance(value, str) and len(rest) >= 2 and all(isinstance(a, str) for a in rest[:2]):
            old, new = rest[:2]
            hits = value.count(old) if old else len(value) + 1
            _charge(len(value) + hits * max(len(new) - len(old), 0), "replace")
        if name == "join" and value is not None and hasattr(value, "__iter__") and not isinstance(value, str):
            items = list(value)
            if len(items) > MAX_ITEMS:
                raise TemplateError(f"chat template: join of {len(items):,} items (limit {MAX_ITEMS:,})")
            sep = rest[0] if rest else kwargs.get("d", "")
            if isinstance(sep, str) and items:
                _charge(len(sep) * (len(items) - 1) + sum(len(x) if isinstance(x, str) else 16 for x in items),
                        "join")
            args = tuple(args[:skip]) + (items,) + tuple(rest)
        out = f(*args, **kwargs)
        if hasattr(out, "__next__"):         # generator filters (batch, slice, map...): count the items
            return _guarded_iter(out)
        return _check_value(out, f"filter {name!r}")
    wrapper.__name__ = getattr(f, "__name__", name)
    if hasattr(f, "jinja_pass_arg"):
        wrapper.jinja_pass_arg = f.jinja_pass_arg
    return wrapper


def _environment():
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generator(CodeGenerator):
        def visit_Concat(self, node, frame):            # `a ~ b`: size-checked join
            self.write("environment.limited_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = _Generator
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def __init__(self):
            super().__init__(trim_blocks=True, lstrip_blocks=True, autoescape=False, optimized=False)
            self.globals.pop("lipsum", None)
            self.globals["range"] = _bounded_range
            self.globals["raise_exception"] = _raise_exception
            self.globals["strftime_now"] = lambda fmt: time.strftime(str(fmt)[:256])
            for name, f in list(self.filters.items()):
                self.filters[name] = _limited_filter(name, f)
            self.filters["tojson"] = _tojson

        # block bodies, macro bodies and {% set %}...{% endset %} are joined here
        @staticmethod
        def concat(parts):
            return _join(parts)

        def limited_concat(self, parts):
            _tick()
            return _join([str(p) for p in parts])

        def guard_iter(self, iterable):
            return _guarded_iter(iterable)

        def call_binop(self, context, operator, left, right):
            _tick()
            if operator == "*":
                n = _repeat_size(left, right)
                if n is not None and n > (MAX_STRING if isinstance(left, str) or isinstance(right, str) else MAX_ITEMS):
                    raise TemplateError(f"chat template: repetition would build {n:,} "
                                        f"{'characters' if isinstance(left, str) or isinstance(right, str) else 'items'}")
            elif operator == "+":
                a, b = _size(left), _size(right)
                if a is not None and b is not None and a + b > (MAX_STRING if isinstance(left, str) else MAX_ITEMS):
                    raise TemplateError(f"chat template: '+' would build a value of {a + b:,} items/characters")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                        right * max(abs(left).bit_length(), 1) > 65536:
                    raise TemplateError(f"chat template: {left} ** {right} is too large a number")
            elif operator == "%" and isinstance(left, str):
                _check_format_string(left, right if isinstance(right, (tuple, dict)) else (right,), percent=True)
            try:
                out = self.binop_table[operator](left, right)
            except OverflowError as e:
                raise TemplateError(f"chat template: {operator!r} overflowed ({e})") from None
            return _check_value(out, f"operator {operator!r}")

        def call(__self, __context, __obj, *args, **kwargs):   # noqa: N805 (jinja2's signature)
            _tick()
            target = getattr(__obj, "__wrapped__", __obj)
            owner = getattr(target, "__self__", None)
            name = getattr(target, "__name__", "")
            if isinstance(owner, str):
                vals = list(args) + list(kwargs.values())
                if name in _PAD_METHODS:
                    for v in vals:
                        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_STRING:
                            raise TemplateError(f"chat template: str.{name}({v}) would build more than "
                                                f"{MAX_STRING:,} characters")
                elif name in ("format", "format_map"):
                    _check_format_string(owner, kwargs if name == "format" and not args else
                                         (args[0] if name == "format_map" and args else vals), percent=False)
                elif name == "join" and args:
                    return _join(args[0], owner)
                elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
                    hits = owner.count(args[0]) if args[0] else len(owner) + 1
                    _charge(len(owner) + hits * max(len(args[1]) - len(args[0]), 0), "str.replace")
            out = super().call(__context, __obj, *args, **kwargs)
            return _check_value(out, f"call of {name or type(__obj).__name__}")

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            for kind, tag in ((nodes.Include, "include"), (nodes.Import, "import"),
                              (nodes.FromImport, "from ... import"), (nodes.Extends, "extends")):
                node = next(iter(tree.find_all(kind)), None)
                if node is not None:
                    raise TemplateError(f"chat template: {{% {tag} %}} (line {node.lineno}) is not allowed: "
                                        "a chat template cannot load other templates")
            for loop in tree.find_all(nodes.For):        # every loop counts its iterations
                loop.iter = nodes.Call(nodes.EnvironmentAttribute("guard_iter"), [loop.iter], [], None, None,
                                       lineno=loop.lineno)
            return tree

    return LimitedEnvironment()


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached); TemplateError for syntax errors and refused constructs."""
    from jinja2.exceptions import TemplateError as JinjaTemplateError
    from jinja2.exceptions import TemplateSyntaxError
    if not isinstance(source, str):
        raise TemplateError(f"chat template must be a string, got {type(source).__name__}")
    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as e:
        raise TemplateError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None
    except TemplateError:
        raise
    except (RecursionError, SyntaxError, MemoryError):
        raise TemplateError("chat template: nested too deeply to compile") from None
    except JinjaTemplateError as e:
        raise TemplateError(f"chat template: {e}") from None


def render(source: str, input_chars: int = 0, **variables) -> str:
    """Render `source` with `variables` under the limits above (TemplateError when one is hit).

    input_chars: size of the input (message contents): the character budget of the render is
    max(MIN_CHAR_BUDGET, 32 x input_chars), so long conversations are not refused."""
    from jinja2.exceptions import SecurityError, UndefinedError
    from jinja2.exceptions import TemplateError as JinjaTemplateError
    template = compile_template(source)
    saved = (_state.deadline, _state.iterations, _state.budget)
    _state.deadline = time.monotonic() + MAX_RENDER_SECONDS
    _state.iterations = 0
    _state.budget = max(MIN_CHAR_BUDGET, 32 * int(input_chars))
    out, n = [], 0
    try:
        for chunk in template.generate(**variables):
            n += len(chunk)
            if n > MAX_OUTPUT:
                raise TemplateError(f"chat template: rendered text is over the limit of {MAX_OUTPUT:,} characters")
            out.append(chunk)
            _tick()
    except TemplateError:
        raise
    except SecurityError as e:
        raise TemplateError(f"chat template: unsafe operation refused by the sandbox ({e})") from None
    except UndefinedError as e:
        raise TemplateError(f"chat template: {e}") from None
    except JinjaTemplateError as e:
        raise TemplateError(f"chat template: {e}") from None
    except RecursionError:
        raise TemplateError("chat template: recursion too deep") from None
    except MemoryError:
        raise TemplateError("chat template: out of memory while rendering") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
            OverflowError, ArithmeticError) as e:
        raise TemplateError(f"chat template: error while rendering: {type(e).__name__}: {e}") from None
    finally:
        _state.deadline, _state.iterations, _state.budget = saved
    return "".join(out)
