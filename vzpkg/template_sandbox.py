"""The jinja2 environment templates render in: sandboxed (no host code) and bounded in size.

A template is data from elsewhere (`vzpkg validate` of a downloaded one, a build), so rendering it must not take
the host's memory. jinja's immutable sandbox stops code execution and caps range() at 100000 items; it does not
stop an expression from asking for a huge string: `'x'.ljust(10**9)`, `'{:>999999999}'.format(1)`,
`'%999999999d' % 1`, `'x'|indent(10**9)`, doubling a namespace attribute in a loop, a macro whose loops yield
text 10**10 times. Three bounds close that, each failing as the template's one-line error (FILE:LINE: ...):

  VALUE_MAX   the characters (items) one operation may build: checked *before* it runs for everything whose
              result size follows from its arguments (*, **, +, %, ~, str.ljust/rjust/center/zfill/expandtabs/
              replace/join/translate/format/format_map, the filters center/indent/format/replace/join/wordwrap/
              batch/slice/tojson, lipsum).
  OUTPUT_MAX  the characters of one rendered text: the template's output and every buffer jinja fills (macro,
              {% set %} and {% filter %} blocks), counted as they grow (a piece counts at least PIECE: a loop
              that yields one character 10**10 times must not fill a list with 10**10 references either).
  BUDGET      the characters all calls, filters and operations of one render may produce together, charged after
              each: what stops `range(100000)|map('upper')` of a large string from building 100000 copies.
"""

from __future__ import annotations

import functools
import re
import types
from typing import Any

VALUE_MAX = 1 << 20
OUTPUT_MAX = 8 << 20
BUDGET = 32 << 20
PIECE = 8

_JUSTIFY = frozenset({"ljust", "rjust", "center", "zfill"})
_PERCENT_SPEC = re.compile(rb"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class TooLarge(OverflowError):
    """A template asked for more than the bounds above."""


def weight(value: Any, _memo: dict[int, int] | None = None) -> int:
    """About how many characters str(VALUE) has, containers counted with every repeated element (a list of 1000
    references to one long string is as large as its text)."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if value is None or isinstance(value, (bool, float, complex)):
        return 24
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    memo = {} if _memo is None else _memo
    key = id(value)
    if key in memo:
        return memo[key]
    memo[key] = 0  # a cycle prints as '...'
    attrs = _namespace_attrs(value)
    if attrs is not None:
        value = attrs
    if isinstance(value, dict):
        total = sum(weight(k, memo) + weight(v, memo) + 4 for k, v in value.items()) + 2
    elif isinstance(value, (list, tuple, set, frozenset)):
        total = sum(weight(v, memo) + 2 for v in value) + 2
    else:
        total = 64  # an object of its own (Undefined, a cycler, a generator): a short repr
    memo[key] = total
    return total


def _namespace_attrs(value: Any) -> dict | None:
    """The attributes of a jinja `namespace()` (its repr shows them all)."""
    try:
        attrs = object.__getattribute__(value, "_Namespace__attrs")
    except AttributeError:
        return None
    return attrs if isinstance(attrs, dict) else None


def _cap(size: int, what: str) -> int:
    if size > VALUE_MAX:
        raise TooLarge(f"{what} would make {size} characters: too large for a template (at most {VALUE_MAX})")
    return size


def _width(n: Any, what: str) -> None:
    if isinstance(n, int):
        _cap(n, what)


def percent_size(fmt: str | bytes, args: Any) -> int:
    """An upper bound of len(FMT % ARGS): the format, its widths and precisions, and what its arguments print
    as (a mapping's values once per conversion, as each may be named again)."""
    raw = fmt.encode("utf-8", "surrogatepass") if isinstance(fmt, str) else bytes(fmt)
    specs = _PERCENT_SPEC.findall(raw)
    size = len(fmt)
    star = False
    for width, precision in specs:
        for n in (width, precision):
            if n == b"*":
                star = True
            elif n:
                size += int(n)
    if isinstance(args, dict):
        size += len(specs) * max((weight(v) for v in args.values()), default=0)
    else:
        items = args if isinstance(args, tuple) else (args,)
        size += sum(weight(v) for v in items)
        if star:  # a '*' width or precision is one of the arguments
            size += sum(abs(v) for v in items if isinstance(v, int) and not isinstance(v, bool))
    return size


def _replace_size(s: str | bytes, old: Any, new: Any, count: Any = -1) -> int:
    if not isinstance(old, type(s)) or not isinstance(new, type(s)):
        return len(s)  # the call itself raises TypeError
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(0, len(new) - len(old))


def _spec_size(spec: str) -> int:
    """Widths and precisions in a format spec ('>20', '0=12.3f'): what they can add to a field."""
    return sum(int(n) for n in re.findall(r"\d+", spec))


def _bounded_str_method(env: Any, owner: str | bytes, method: Any) -> Any:
    """A wrapper of OWNER.METHOD that checks the result's size before calling it."""
    name = method.__name__

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        what = f"{type(owner).__name__}.{name}()"
        if name in _JUSTIFY and args:
            _width(args[0], what)
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(tab, int):
                _cap(len(owner) * max(tab, 1), what)
        elif name == "replace":
            _cap(_replace_size(owner, *args[:3], **kwargs), what)
        elif name == "join" and len(args) == 1:
            items = list(args[0])
            _cap(len(owner) * max(len(items) - 1, 0) + sum(weight(i) for i in items), what)
            args = (items,)
        elif name == "translate" and args and isinstance(args[0], dict):
            longest = max((weight(v) for v in args[0].values() if v is not None), default=1)
            _cap(len(owner) * max(longest, 1), what)
        result = method(*args, **kwargs)
        env.charge(result)
        return result

    return functools.update_wrapper(wrapper, method)


def _formatter_class(base: type) -> type:
    class Bounded(base):  # type: ignore[misc, valid-type]
        """str.format / format_map: each field's width and the whole result within VALUE_MAX."""

        def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
            self._total = len(format_string)
            return super().vformat(format_string, args, kwargs)

        def format_field(self, value: Any, format_spec: str) -> Any:
            self._total += _spec_size(format_spec) + weight(value)
            _cap(self._total, "str.format()")
            return super().format_field(value, format_spec)

    return Bounded


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 (jinja's names)
    from jinja2.utils import generate_lorem_ipsum

    if isinstance(n, int) and isinstance(max, int):
        _cap(n * max * 16, "lipsum()")
    return generate_lorem_ipsum(n, html, min, max)


def _filters(env: Any) -> dict[str, Any]:
    """jinja's filters, each charging what it returns to the budget; the ones whose result can be far larger than
    their input check their arguments first."""
    from jinja2 import filters as jf
    from jinja2 import pass_environment, pass_eval_context

    def center(value: Any, width: int = 80) -> str:
        _width(width, "center")
        return jf.do_center(value, width)

    def indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        text = str(s)
        _cap(len(text) + (text.count("\n") + 1) * max(pad, 0), "indent")
        return jf.do_indent(s, width, first, blank)

    def format_(value: Any, *args: Any, **kwargs: Any) -> str:
        _cap(percent_size(str(value), kwargs or args), "format")
        return jf.do_format(value, *args, **kwargs)

    @pass_eval_context
    def replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
        _cap(_replace_size(str(s), str(old), str(new), -1 if count is None else count), "replace")
        return jf.do_replace(eval_ctx, s, old, new, count)

    @pass_eval_context
    def join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        items = list(value)
        _cap(len(str(d)) * max(len(items) - 1, 0) + sum(weight(i) for i in items), "join")
        return jf.sync_do_join(eval_ctx, items, d, attribute)

    @pass_environment
    def wordwrap(environment: Any, s: str, width: int = 79, break_long_words: bool = True,
                 wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
        wrap = environment.newline_sequence if wrapstring is None else wrapstring
        text = str(s)
        lines = len(text) // max(width, 1) + sum(text.count(c) for c in " \t\n-") + 1 if isinstance(width, int) \
            else len(text)
        _cap(len(text) + lines * len(str(wrap)), "wordwrap")
        return jf.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)

    def batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
        _width(linecount, "batch")
        return jf.do_batch(value, linecount, fill_with)

    def slice_(value: Any, slices: int, fill_with: Any = None) -> Any:
        _width(slices, "slice")
        return jf.sync_do_slice(value, slices, fill_with)

    @pass_eval_context
    def tojson(eval_ctx: Any, value: Any, indent: Any = None) -> Any:
        pad = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        if pad > 16:
            raise TooLarge(f"tojson indent {pad}: too large for a template (at most 16)")
        return jf.do_tojson(eval_ctx, value, indent)

    filters = dict(env.filters)
    filters.update(center=center, indent=indent, format=format_, replace=replace, join=join, wordwrap=wordwrap,
                   batch=batch, slice=slice_, tojson=tojson)

    def charged(f: Any) -> Any:
        @functools.wraps(f)  # (keeps jinja's pass_context/pass_eval_context/pass_environment mark)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = f(*args, **kwargs)
            env.charge(result)
            return result

        return wrapper

    return {name: charged(f) for name, f in filters.items()}


class BoundedBuffer(list):
    """The list jinja collects a macro's or a block's output in, counting the characters appended."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def append(self, item: Any) -> None:
        self.size += max(len(item) if isinstance(item, str) else weight(item), PIECE)
        if self.size > OUTPUT_MAX:
            raise TooLarge(f"the output of a macro or block would exceed {OUTPUT_MAX} characters: too large for a "
                           f"template")
        super().append(item)

    def extend(self, items: Any) -> None:
        for item in items:
            self.append(item)


@functools.cache
def sandbox_class() -> type:
    """jinja2's immutable sandbox with the bounds of this module."""
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter

    class BoundedCodeGenerator(CodeGenerator):
        def buffer(self, frame: Any) -> None:
            frame.buffer = self.temporary_identifier()
            self.writeline(f"{frame.buffer} = environment.bounded_buffer()")

        @optimizeconst
        def visit_Concat(self, node: Any, frame: Any) -> None:  # `a ~ b`: sized before it is joined
            self.write("environment.bounded_concat(context, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    formatter = _formatter_class(SandboxedFormatter)
    escape_formatter = _formatter_class(SandboxedEscapeFormatter)

    class Sandbox(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(finalize=self._finalize, **kwargs)
            self.budget = BUDGET
            self.filters = _filters(self)
            self.globals["lipsum"] = _lipsum

        def charge(self, result: Any) -> None:
            self.budget -= weight(result)
            if self.budget < 0:
                raise TooLarge(f"the template builds more than {BUDGET} characters in all: too large for a "
                               f"template")

        def _finalize(self, value: Any) -> Any:  # every {{ ... }} before it becomes text
            _cap(weight(value), "this expression's text")
            self.charge(value)
            return value

        @staticmethod
        def bounded_buffer() -> BoundedBuffer:
            return BoundedBuffer()

        def bounded_concat(self, context: Any, items: tuple) -> Any:
            from jinja2.runtime import markup_join, str_join

            _cap(sum(weight(i) for i in items), "'~'")
            result = (markup_join if context.eval_ctx.autoescape else str_join)(items)
            self.charge(result)
            return result

        def concat(self, parts: Any) -> str:  # type: ignore[override]
            """The whole output (and jinja's other joins of yielded text), counted while it is produced."""
            out: list[str] = []
            size = 0
            for part in parts:
                size += max(len(part), PIECE)
                if size > OUTPUT_MAX:
                    err = TooLarge(f"the output would exceed {OUTPUT_MAX} characters: too large for a template")
                    err.lineno = _template_line(parts)  # type: ignore[attr-defined]
                    raise err
                out.append(part)
            return "".join(out)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and isinstance(left, int) and abs(left) > 1 \
                    and (right > 64 or left.bit_length() * right > VALUE_MAX):
                raise OverflowError(f"{left} ** {right} is too large for a template")
            if operator == "*":
                if isinstance(left, int) and isinstance(right, int):
                    _cap((left.bit_length() + right.bit_length()) // 3, "'*'")
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and weight(seq) * n > VALUE_MAX:
                        raise OverflowError(f"a sequence of {len(seq)} * {n} items is too large for a template")
            elif operator == "+" and isinstance(left, (str, bytes, list, tuple)):
                _cap(weight(left) + weight(right), "'+'")
            elif operator == "%" and isinstance(left, (str, bytes)):
                _cap(percent_size(left, right), "'%'")
            result = super().call_binop(context, operator, left, right)
            self.charge(result)
            return result

        def wrap_str_format(self, value: Any) -> Any:
            """Methods of strings are wrapped at access (as jinja does for format), so that a method handed on
            uncalled is bounded too."""
            if not isinstance(value, (types.MethodType, types.BuiltinMethodType)):
                return None
            owner = getattr(value, "__self__", None)
            if not isinstance(owner, (str, bytes)):
                return None
            name = value.__name__
            if name in ("format", "format_map") and isinstance(owner, str):
                from markupsafe import Markup

                fmt = formatter(self) if not isinstance(owner, Markup) else escape_formatter(self, escape=owner.escape)
                is_map = name == "format_map"

                def format_(*args: Any, **kwargs: Any) -> str:
                    if is_map:
                        if kwargs or len(args) != 1:
                            raise TypeError("format_map() takes exactly one argument")
                        args, kwargs = (), args[0]
                    result = type(owner)(fmt.vformat(owner, args, kwargs))
                    self.charge(result)
                    return result

                return functools.update_wrapper(format_, value)
            if name in _JUSTIFY or name in ("expandtabs", "replace", "join", "translate"):
                return _bounded_str_method(self, owner, value)
            return None

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's)
            result = super().call(__context, __obj, *args, **kwargs)
            __self.charge(result)
            return result

    return Sandbox


def _template_line(gen: Any) -> int | None:
    """The template line a render generator (and what it delegates to) stands at."""
    line = None
    while gen is not None:
        frame = getattr(gen, "gi_frame", None)
        if frame is not None:
            template = frame.f_globals.get("__jinja_template__")
            if template is not None:
                line = template.get_corresponding_lineno(frame.f_lineno)
        gen = getattr(gen, "gi_yieldfrom", None)
    return line
