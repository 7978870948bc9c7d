"""Chat templates, rendered with bounds: a model's template is code from whoever made the model.

Hugging Face chat templates are Jinja programs. jinja2's sandbox keeps them from Python's internals, but
not from running long or building huge strings: ``{% for i in range(100000) %}{% for j in range(100000) %}``
hangs for minutes, ``"x" * 10**10`` or a string doubled in a loop exhausts memory. :class:`ChatTemplate`
renders with three bounds, each a :class:`ChatTemplateError` (a ValueError) that names the file:

- **steps**: every line and call of Python run while rendering (template code and the filters it calls)
  counts, through a per-thread trace function, so no loop or recursion runs past :data:`MAX_STEPS` (and
  :data:`STEPS_PER_MESSAGE` per message); the wall clock is checked with it (:data:`MAX_SECONDS`).
- **size**: the operators and methods that build a string or list larger than their inputs in one call
  (``*``, ``**``, ``+``, ``%``, ``~``, ``join``, ``replace``, ``center``, format widths, ...) are checked
  *before* they run, against :data:`MAX_CHARS`.
- **output**: the rendered text is streamed and stopped at :data:`MAX_CHARS`.

A real template renders a conversation in thousands of steps and milliseconds, far inside the bounds (the trace
function makes rendering about ten times slower: under 0.1 s for a thousand messages). What the bounds do not
reach is one C-level operation on a crafted value that none of the checks above sizes (comparing two deeply
shared nested lists with ``==``, say); only rendering in a separate process with CPU and memory limits would.
:meth:`ChatTemplate.check` renders a one-message conversation, so that a template with a syntax error, one that
raises (``raise_exception``) or one that does not finish is refused when the model is compiled or its tokenizer
loaded, not at the first chat request.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

MAX_STEPS = 5_000_000  # lines and calls of Python per render (a real template: thousands)...
STEPS_PER_MESSAGE = 5_000  # ... plus this per message (SmolLM2's template: about 270)
MAX_SECONDS = 10.0
MAX_CHARS = 1 << 24  # characters (or items) of any one value built, and of the output: 16 Mi
MAX_POWER_BITS = 4096  # an integer ``**`` result past this many bits is not a chat format's arithmetic

#: The conversation :meth:`ChatTemplate.check` renders: one a chat template must accept.
PROBE_MESSAGES = ({"role": "user", "content": "Hello!"},)


class ChatTemplateError(ValueError):
    """A chat template that cannot be compiled, raised an error, or passed a bound while rendering."""


class _Stop(BaseException):
    """Raised inside a render when a bound is passed. A BaseException, so that no ``except Exception`` in jinja's
    runtime (attribute lookup falls back on several) swallows it and carries on."""


class _Sizes:
    """The size of values as text would take them: characters of strings plus one per item, nested.

    Memoized by object for the whole render (the immutable sandbox cannot change a list or dict once built, and
    the memo keeps each object alive, so its id stays its own), so a list holding one list twice, doubled sixty
    times, costs sixty entries, not 2**60 visits; the walk stops as soon as it passes :data:`MAX_CHARS`."""

    def __init__(self):
        self._memo: dict[int, tuple[Any, int]] = {}

    def of(self, value: Any) -> int:
        if isinstance(value, str):
            return len(value)
        if not isinstance(value, (list, tuple, dict)):
            return 1
        known = self._memo.get(id(value))
        if known is not None:
            return known[1]
        size = len(value)
        for item in (value.items() if isinstance(value, dict) else value):
            size += self.of(item)
            if size > MAX_CHARS:
                break
        self._memo[id(value)] = (value, size)
        return size

    def check(self, what: str, *values: Any, base: int = 0) -> None:
        size = base
        for value in values:
            if size > MAX_CHARS:
                break
            size += self.of(value)
        if size > MAX_CHARS:
            raise _Stop(f"{what} of more than {MAX_CHARS:,} characters/items")


class _Render(threading.local):
    """The render in progress on this thread (its sizes), for the checks the environment calls."""

    sizes: _Sizes | None = None


_current = _Render()


def _sizes() -> _Sizes:
    return _current.sizes or _Sizes()  # outside a render (jinja folding constants while compiling): a fresh one


_WIDE_FORMAT = re.compile(r"\d{8,}|\*")  # a width or precision of 8+ digits, or one taken from the arguments


def _check_format(template: str, *args: Any) -> None:
    if _WIDE_FORMAT.search(template):
        raise _Stop("a format width or precision that large (or given as '*') is not allowed in a chat template")
    _sizes().check("a formatted string", *args, base=len(template))


def _check_binop(operator: str, left: Any, right: Any) -> None:
    sizes = _sizes()
    if operator == "*":
        for sequence, times in ((left, right), (right, left)):
            if isinstance(sequence, (str, list, tuple)) and isinstance(times, int) and times > 1:
                sizes.check(f"{type(sequence).__name__} * {times}", base=sizes.of(sequence) * times)
    elif operator == "+":
        sizes.check("a concatenation", left, right)
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * math.log2(abs(left)) > MAX_POWER_BITS:
            raise _Stop(f"{left} ** {right} has more than {MAX_POWER_BITS} bits")
    elif operator == "%" and isinstance(left, str):
        _check_format(left, right)


def _check_str_method(name: str, target: str, args: tuple, kwargs: dict) -> tuple:
    """Size checks for the ``str`` methods whose result can be much larger than their inputs; returns the
    arguments to call with (``join``'s iterable, consumed here, becomes a list)."""
    if name == "join" and args:
        items = list(args[0])
        _sizes().check("a joined string", *items, base=len(target) * max(len(items) - 1, 0))
        return (items, *args[1:])
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _sizes().check(f"str.{name}({args[0]})", base=args[0])
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = target.count(args[0]) if args[0] else len(target) + 1
        _sizes().check("str.replace", base=len(target) + hits * max(len(args[1]) - len(args[0]), 0))
    elif name == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else kwargs.get("tabsize", 8)
        _sizes().check("str.expandtabs", base=len(target) + target.count("\t") * max(int(tab), 0))
    return args


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to a size-checked join (jinja's own ``str_join`` cannot be intercepted)."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with the size checks, the filters and the globals chat templates use."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        # optimized=False: jinja would otherwise evaluate constant expressions while compiling, outside the step
        # budget (`[1]|batch(10**8, 'x')` is a constant)
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                         finalize=self._finalize, optimized=False)
        self.concat = self.bounded_concat  # the buffers of macros, {% set %} blocks and {% call %}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.filters["tojson"] = _tojson
        self._bound_filters()

    @staticmethod
    def _finalize(value: Any) -> Any:
        """Every ``{{ value }}``: a list or dict printed must not be larger as text than the limit."""
        if isinstance(value, (list, tuple, dict)):
            _sizes().check("a printed value", value)
        return value

    def bounded_concat(self, items: Iterable[Any]) -> str:
        items = list(items)
        _sizes().check("a concatenated string", *items)
        return "".join(map(str, items))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        target = getattr(__obj, "__self__", None)
        if isinstance(target, str):
            args = _check_str_method(getattr(__obj, "__name__", ""), target, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any):
        """``"...".format(...)`` and ``format_map``: the format string's widths and the arguments' size checked."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        def run(*args, **kwargs):
            _check_format(value.__self__, *args, *kwargs.values())
            return wrapped(*args, **kwargs)
        return run

    def _bound_filters(self) -> None:
        """Every filter refuses a list or dict too large as text (most print their value); those that can build a
        much larger string than they are given are checked before they run."""
        filters = self.filters

        def join(value, d="", attribute=None):
            items = list(value)
            _sizes().check("a joined string", *items, base=len(str(d)) * max(len(items) - 1, 0))
            return (items,)

        def indent(value, width=4, *args, **kwargs):
            pad = width if isinstance(width, int) else len(str(width))
            _sizes().check("an indented string", base=len(str(value)) * (1 + max(pad, 0)))

        def replace(value, old, new, count=None):
            _check_str_method("replace", str(value), (str(old), str(new)), {})

        def total(iterable, attribute=None, start=0):
            items = list(iterable)
            _sizes().check("a sum", start, *items)
            return (items,)

        growing: dict[str, Callable[..., Any]] = {"join": join, "indent": indent, "replace": replace, "sum": total,
                   "center": lambda value, width=80: _sizes().check(f"center({width})", base=int(width)),
                   "batch": lambda value, linecount, fill_with=None: _sizes().check(
                       f"batch({linecount})", base=int(linecount) if fill_with is not None else 0),
                   "format": lambda value, *args, **kwargs: _check_format(str(value), *args, *kwargs.values())}
        for name, original in list(filters.items()):
            filters[name] = _checked_filter(original, growing.get(name))


def _checked_filter(original: Callable[..., Any], check: Callable[..., Any] | None) -> Callable[..., Any]:
    """``original`` with its value's size checked (and ``check`` run on its arguments; a tuple it returns replaces
    the leading ones: an iterator it consumed, as a list)."""
    mark = getattr(original, "jinja_pass_arg", None)  # jinja's pass_context / pass_eval_context / ...
    passes = 1 if mark is not None else 0

    def run(*args, **kwargs):
        head, rest = args[:passes], args[passes:]
        if rest and isinstance(rest[0], (list, tuple, dict)):
            _sizes().check("a filtered value", rest[0])
        if check is not None:
            replaced = check(*rest, **kwargs)
            if isinstance(replaced, tuple):
                rest = replaced + rest[len(replaced):]
        return original(*head, *rest, **kwargs)
    if mark is not None:
        setattr(run, "jinja_pass_arg", mark)  # the mark jinja reads to pass the context
    return run


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    pad = indent if isinstance(indent, int) else len(str(indent or ""))
    if pad > 64:
        raise _Stop(f"tojson indent {indent!r} is not a chat format's")
    _sizes().check("a JSON string", base=_sizes().of(value) * (2 + pad))
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _StepBudget:
    """A trace function (per thread) that stops after ``MAX_STEPS`` lines and calls, or ``MAX_SECONDS``."""

    def __init__(self, limit: int):
        self.steps, self.limit = 0, limit
        self.deadline = time.monotonic() + MAX_SECONDS

    def __call__(self, frame, event, arg):
        self.steps += 1
        if self.steps > self.limit:
            raise _Stop(f"passed {self.limit:,} steps (a loop or recursion that large is not a chat format)")
        if not self.steps & 0xFFF and time.monotonic() > self.deadline:
            raise _Stop(f"took more than {MAX_SECONDS:g} s")
        return self


@contextlib.contextmanager
def _bounded(origin: str, doing: str, steps: int):
    """Run the block (compiling or rendering a template) inside the bounds; every failure becomes one
    :class:`ChatTemplateError` line naming ``origin``."""
    budget, previous = _StepBudget(steps), sys.gettrace()
    _current.sizes = _Sizes()
    sys.settrace(budget)
    try:
        yield
    except _Stop as stop:
        raise ChatTemplateError(f"{origin}: chat template stopped while {doing}: {stop}") from None
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"{origin}: chat template syntax error on line {error.lineno}: "
                                f"{_one_line(error.message or error)}") from None
    except jinja2.TemplateError as error:  # raise_exception(...), undefined names used as values, ...
        raise ChatTemplateError(f"{origin}: chat template raised an error: {_one_line(error)}") from None
    except RecursionError:
        raise ChatTemplateError(f"{origin}: chat template recursed too deeply while {doing}") from None
    except MemoryError:
        raise ChatTemplateError(f"{origin}: chat template ran out of memory while {doing}") from None
    except Exception as error:  # noqa: BLE001 (a template's own TypeError, ZeroDivisionError, ...)
        raise ChatTemplateError(f"{origin}: chat template failed while {doing}: {type(error).__name__}: "
                                f"{_one_line(error)}") from None
    finally:
        sys.settrace(previous)
        _current.sizes = None
        logger.debug("%s: chat template %s in %d steps", origin, doing, budget.steps)


def _one_line(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ChatTemplate:
    """One chat template, compiled once; ``origin`` (the file it came from) is named in every error."""

    def __init__(self, source: str, origin: str):
        self.origin = origin
        if not isinstance(source, str):
            raise ChatTemplateError(f"{origin}: the chat template is a {type(source).__name__}, not a string")
        environment = _BoundedEnvironment()
        with _bounded(origin, "compiling", MAX_STEPS):  # jinja evaluates constant output while compiling
            self._template = environment.from_string(source)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The conversation as the template writes it (``variables``: ``bos_token``, ``eos_token``, ...)."""
        parts, size = [], 0
        with _bounded(self.origin, "rendering", MAX_STEPS + STEPS_PER_MESSAGE * len(messages)):
            for chunk in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **variables):
                size += len(chunk)
                if size > MAX_CHARS:
                    raise _Stop(f"the output passed {MAX_CHARS:,} characters")
                parts.append(chunk)
        return "".join(parts)

    def check(self, **variables: Any) -> str:
        """Render :data:`PROBE_MESSAGES` (with the generation prompt): what every use of the template needs."""
        try:
            return self.render([dict(m) for m in PROBE_MESSAGES], add_generation_prompt=True, **variables)
        except ChatTemplateError as error:
            raise ChatTemplateError(f"{error} (rendering a one-message conversation)") from None
