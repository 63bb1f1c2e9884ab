"""Bounds on rendering a chat template, which comes with the model and may be hostile or broken.

Jinja's sandbox keeps a template away from the interpreter, but not from memory or time: `'x' * 10**10`
builds a 10 GB string, two nested loops can run for hours. Here:
- `*` and `**` are refused before they would build a string or list longer than MAX_CHARS or an integer
  wider than MAX_INT_BITS, and so is a filter or method given a number past MAX_CHARS (`center`, `ljust`);
- every value the template builds (by an operator, `~`, a filter or a method) is checked against
  MAX_CHARS as it is made, so a value doubled in a loop stops at the limit;
- the rendered text is counted as it is produced and stops at MAX_CHARS;
- every `for` loop checks the clock as it goes (loops are the only way a template runs long) and stops
  after MAX_SECONDS.
Each is a TemplateLimit naming the bound.
"""

from __future__ import annotations

import functools
import time
from contextvars import ContextVar

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_CHARS = 8 * 2**20  # 8 Mi characters: far more than any model's context window holds
MAX_SECONDS = 5.0  # DeepSeek's templates render a long conversation in milliseconds
MAX_INT_BITS = 1 << 16
_deadline: ContextVar[tuple[float, float]] = ContextVar("template_deadline", default=(float("inf"), 0.0))


class TemplateLimit(Exception):
    pass


def check_size(value):
    """`value`, unless it is a string or list longer than MAX_CHARS."""
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_CHARS:
        raise TemplateLimit(f"it built a value of {len(value):,} characters (the limit is {MAX_CHARS:,})")
    return value


def _refuse_big_numbers(values):
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_CHARS:
            raise TemplateLimit(f"it asked for a size of {v:,} (the limit is {MAX_CHARS:,})")


def _bounded(func):
    """A filter that refuses sizes past the limit in its arguments (not in the value it filters) and in
    its result. Jinja's pass_context / pass_environment marks are kept by functools.wraps."""
    value_at = 2 if hasattr(func, "jinja_pass_arg") else 1

    @functools.wraps(func)
    def bounded(*args, **kwargs):
        _refuse_big_numbers(args[value_at:])
        _refuse_big_numbers(kwargs.values())
        return check_size(func(*args, **kwargs))

    return bounded


def _too_big(operator: str, left, right) -> bool:
    """Whether `left operator right` would build a string or list longer than MAX_CHARS, or an integer
    wider than MAX_INT_BITS."""
    if isinstance(left, int) and isinstance(right, int):
        bits = max(abs(left), 2).bit_length()
        return (bits * right if operator == "**" else bits + right.bit_length()) > MAX_INT_BITS
    if operator == "*" and isinstance(left, int):
        left, right = right, left
    return operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int) \
        and len(left) * right > MAX_CHARS


def paced(iterable):
    """The items of a template's `for` loop, while time is left."""
    end, seconds = _deadline.get()
    for i, item in enumerate(iterable):
        if not i & 1023 and time.monotonic() > end:
            raise TemplateLimit(f"it ran past the time limit of {seconds:g} s")
        yield item


class _BoundedCode(CodeGenerator):
    """`a ~ b` compiled as check_size(a ~ b), and `for x in items` as `for x in paced(items)`."""

    def visit_Concat(self, node, frame):
        self.write("environment.check_size(")
        super().visit_Concat(node, frame)
        self.write(")")

    def visit_For(self, node, frame):
        node.iter = nodes.Call(nodes.EnvironmentAttribute("paced"), [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "+", "%"])  # also keeps them from being folded when compiled
    code_generator_class = _BoundedCode

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filters = {name: _bounded(f) for name, f in self.filters.items()}

    check_size = staticmethod(check_size)
    paced = staticmethod(paced)

    def call_binop(self, context, operator, left, right):
        if _too_big(operator, left, right):
            raise TemplateLimit(f"`{operator}` would build a value past the limit of {MAX_CHARS:,} characters")
        return check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        _refuse_big_numbers(args)
        _refuse_big_numbers(kwargs.values())
        return check_size(super().call(__context, __obj, *args, **kwargs))


def render_bounded(template, max_chars: int = MAX_CHARS, max_seconds: float = MAX_SECONDS, **context) -> str:
    """template.render(**context), within the bounds."""
    pieces, size = [], 0
    token = _deadline.set((time.monotonic() + max_seconds, max_seconds))
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > max_chars:
                raise TemplateLimit(f"it rendered more than the limit of {max_chars:,} characters")
            pieces.append(piece)
    finally:
        _deadline.reset(token)
    return "".join(pieces)
