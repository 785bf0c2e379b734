"""Expressions in manifest values: ``"{{ var.prefix }}-web"``, ``"{{ 10 + index }}"``, ``"{{ each.value.ip }}"``.

Evaluated with Jinja2's immutable sandbox (no attribute access to Python internals, no loader, so no file
access; nothing reaches the network). A value that is exactly one ``{{ … }}`` keeps the expression's type
(``"{{ 10 + index }}"`` is the number 11); anything else is text. Undefined names are errors, never empty
strings. Operators that could build huge values are bounded.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

from jinja2 import StrictUndefined, TemplateError, Undefined, UndefinedError, nodes
from jinja2.nativetypes import NativeCodeGenerator, NativeTemplate
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_RESULT = 1_000_000  # characters or items any value an expression builds may have
MAX_ITERATIONS = 100_000  # loop iterations of one expression, all its loops together
MAX_DEPTH = 50  # nested calls (macros calling themselves)
MAX_SECONDS = 2.0  # wall time of one expression


class ExpressionError(ValueError):
    pass


class LimitExceeded(SecurityError):
    """An expression hit one of the limits above; the message names the limit."""


@dataclass
class _Budget:
    deadline: float
    iterations: int = 0
    depth: int = 0
    seen: set[int] = field(default_factory=set)

    def tick(self) -> None:
        self.iterations += 1
        if self.iterations > MAX_ITERATIONS:
            raise LimitExceeded(f"more than {MAX_ITERATIONS} loop iterations")
        if self.iterations % 1024 == 0:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"ran longer than {MAX_SECONDS:g}s")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("vmform_expression_budget", default=None)


def _current_budget() -> _Budget:
    budget = _budget.get()
    if budget is None:  # a template rendered outside evaluate() (tests): limits still hold
        budget = _Budget(time.monotonic() + MAX_SECONDS)
        _budget.set(budget)
    return budget


def _bounded_length(value: Any, what: str) -> Any:
    if isinstance(value, str | list | tuple | dict | set | bytes) and len(value) > MAX_RESULT:
        raise LimitExceeded(f"{what} would be larger than {MAX_RESULT} characters or items")
    return value


def _concat(values: Iterable[Any]) -> Any:
    """One expression keeps its value and type; several parts make text. Unlike Jinja's native_concat, text
    is never parsed again: a variable holding "123" or "[1]" stays a string. The text is bounded while it is
    built, so a loop printing large parts stops at the limit, not at the end of memory."""
    head = list(islice(values, 2))
    if not head:
        return ""
    if len(head) == 1:
        return head[0]
    parts, size = [], 0
    for part in chain(head, values):
        text = str(part)
        size += len(text)
        if size > MAX_RESULT:
            raise LimitExceeded(f"the text would be larger than {MAX_RESULT} characters")
        parts.append(text)
    return "".join(parts)


def _join(parts: Iterable[Any]) -> str:
    """``a ~ b``: bounded like any text an expression builds (doubling a string in a loop stops at the limit)."""
    texts = [str(part) for part in parts]
    if sum(len(text) for text in texts) > MAX_RESULT:
        raise LimitExceeded(f"the text would be larger than {MAX_RESULT} characters")
    return "".join(texts)


def _counted(iterable: Any) -> Iterator[Any]:
    """What every ``{% for %}`` iterates: each iteration counts against the expression's budget."""
    budget = _current_budget()
    for item in iterable:
        budget.tick()
        yield item


class _CodeGenerator(NativeCodeGenerator):
    def _output_const_repr(self, group: Iterable[Any]) -> str:
        items = list(group)
        if len(items) == 1:  # a lone constant ({{ 3 }}, {{ [1] }}) keeps its type, as any lone expression
            return repr(items[0])
        return repr("".join(str(item) for item in items))

    def visit_For(self, node: nodes.For, frame: Any) -> None:  # noqa: N802 - Jinja's visitor naming
        node.iter = nodes.Call(nodes.EnvironmentAttribute("vmform_counted"), [node.iter], [], None, None)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:  # noqa: N802 - Jinja's visitor naming
        self.write("environment.vmform_join((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


# Widths and precisions in printf-style and str.format specs: '%0999999999d', '{:>999999999}'.
_PRINTF_WIDTH = re.compile(r"%[-+ #0]*(\d+|\*)?(?:\.(\d+|\*))?")
_FORMAT_WIDTH = re.compile(r"[:<>^=+\- #0,_]\s*(\d{7,})|\.(\d{7,})")
# Methods and filters whose integer arguments are the size of what they build.
_WIDTH_ARGUMENTS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap", "truncate"})


def _check_format_widths(template: Any, printf: bool) -> None:
    if not isinstance(template, str):
        return
    numbers = ([n for match in _PRINTF_WIDTH.finditer(template) for n in match.groups() if n and n != "*"] if printf
               else [n for match in _FORMAT_WIDTH.finditer(template) for n in match.groups() if n])
    for number in numbers:
        if int(number) > MAX_RESULT:
            raise LimitExceeded(f"a format width of {number} would build a value larger than {MAX_RESULT} characters")


def _check_arguments(name: str, target: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Refuse a call that would build a huge value, before it runs."""
    numbers = [value for value in (*args, *kwargs.values()) if isinstance(value, int) and not isinstance(value, bool)]
    if name in _WIDTH_ARGUMENTS and any(abs(number) > MAX_RESULT for number in numbers):
        raise LimitExceeded(f"{name}() with a width over {MAX_RESULT} would build a value too large")
    if name in ("format", "format_map"):
        _check_format_widths(target, printf=False)
    if name == "replace" and isinstance(target, str) and len(args) >= 2 and isinstance(args[1], str):
        old, new = str(args[0]), args[1]
        count = target.count(old) if old else len(target) + 1
        if len(target) + count * max(0, len(new) - len(old)) > MAX_RESULT:
            raise LimitExceeded(f"replace() would build a value larger than {MAX_RESULT} characters")
    if name == "join":
        items = args[0] if isinstance(target, str) and args else target
        separator = target if isinstance(target, str) else next((a for a in args if isinstance(a, str)), "")
        if isinstance(items, list | tuple):
            total = sum(len(str(item)) for item in items) + len(separator) * max(0, len(items) - 1)
            if total > MAX_RESULT:
                raise LimitExceeded(f"join() would build a value larger than {MAX_RESULT} characters")


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that refuses huge arguments before it runs and huge results after (Jinja calls filters
    directly, not through ``Environment.call``)."""

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        values = [a for a in args if not hasattr(a, "environment") and type(a).__name__ != "EvalContext"]
        target = values[0] if values else None
        _check_arguments(name, target, tuple(values[1:]), kwargs)
        return _bounded_length(function(*args, **kwargs), f"the {name} filter's result")

    return bounded


class _Template(NativeTemplate):
    environment_class: type[_Environment]  # type: ignore[assignment]  # NativeTemplate's own would parse text again (native_concat)


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    template_class = _Template
    concat = staticmethod(_concat)  # type: ignore[assignment]
    # Intercepted operators are also never folded at compile time, where no limit could apply.
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    vmform_counted = staticmethod(_counted)
    vmform_join = staticmethod(_join)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _bounded_filter(name, function) for name, function in self.filters.items()}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 256:
            raise LimitExceeded("an exponent over 256")
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, str | list | tuple) and isinstance(times, int) and len(sequence) * times > MAX_RESULT:
                    raise LimitExceeded(f"the result would be larger than {MAX_RESULT} characters or items")
        if operator == "%":
            _check_format_widths(left, printf=True)
            stars = isinstance(left, str) and "*" in left and isinstance(right, tuple)
            if stars and any(isinstance(v, int) and abs(v) > MAX_RESULT for v in right):  # '%*d' % (10**9, 1)
                raise LimitExceeded(f"a format width over {MAX_RESULT} would build a value too large")
        sequences = isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple)
        if operator == "+" and sequences and len(left) + len(right) > MAX_RESULT:
            raise LimitExceeded(f"the result would be larger than {MAX_RESULT} characters or items")
        return _bounded_length(super().call_binop(context, operator, left, right), "the result")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        budget = _current_budget()
        budget.check_time()
        method = getattr(__obj, "__wrapped__", __obj)
        _check_arguments(getattr(method, "__name__", ""), getattr(method, "__self__", None), args, kwargs)
        if budget.depth >= MAX_DEPTH:
            raise LimitExceeded(f"calls nested deeper than {MAX_DEPTH} (a macro calling itself?)")
        budget.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return _bounded_length(result, "the call's result")


_Template.environment_class = _Environment


@functools.lru_cache(maxsize=1)
def _environment() -> _Environment:
    return _Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def has_expression(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


@functools.lru_cache(maxsize=4096)
def _compiled(text: str) -> _Template:
    """One compilation per distinct text: 500 ``count:`` instances of one manifest share their templates."""
    return _environment().from_string(text)  # type: ignore[return-value]


def evaluate(text: str, context: Mapping[str, Any]) -> Any:
    """The value of one manifest string; raises ExpressionError with a message for the user."""
    token = _budget.set(_Budget(time.monotonic() + MAX_SECONDS))
    try:
        template = _compiled(text)
        result = template.render(dict(context))
    except LimitExceeded as exc:
        raise ExpressionError(f"expression stopped at a limit ({exc}): {_shown(text)}") from None
    except RecursionError:
        raise ExpressionError(f"expression stopped at a limit (calls nested too deep): {_shown(text)}") from None
    except MemoryError:
        raise ExpressionError(f"expression stopped at a limit (out of memory): {_shown(text)}") from None
    except SecurityError as exc:
        raise ExpressionError(f"expression refused by the sandbox ({exc}): {text!r}") from None
    except TemplateError as exc:
        raise ExpressionError(f"expression error ({_message(exc.message or type(exc).__name__)}): {text!r}") from None
    except (ArithmeticError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise ExpressionError(f"expression error ({exc}): {text!r}") from None
    finally:
        _budget.reset(token)
    _check_defined(result, text)
    if isinstance(result, str) and len(result) > MAX_RESULT:
        raise ExpressionError(f"expression result is too large: {text!r}")
    return result


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 200 else repr(text[:200]) + "…"


def _message(text: str) -> str:
    return (text.replace("'vmform.manifest.variables.Recorder object' has no attribute", "no variable")
            .replace("'vmform.manifest.expressions._Kind object' has no attribute", "no such resource:")
            .replace("'vmform.manifest.expressions._Modules object' has no attribute", "no such module:"))


def _check_defined(value: Any, text: str) -> None:
    """A native result may carry an undefined name instead of failing: make it fail."""
    if isinstance(value, Undefined):
        try:
            str(value)
        except SecurityError as exc:
            raise ExpressionError(f"expression refused by the sandbox ({exc}): {text!r}") from None
        except UndefinedError as exc:
            raise ExpressionError(f"expression error ({_message(exc.message or '')}): {text!r}") from None
        raise ExpressionError(f"expression error (undefined value): {text!r}")
    if isinstance(value, dict):
        for item in value.values():
            _check_defined(item, text)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_defined(item, text)


def evaluate_tree(value: Any, context: Mapping[str, Any], path: tuple[str | int, ...] = ()
                  ) -> tuple[Any, list[tuple[tuple[str | int, ...], str]]]:
    """Every string with an expression in a YAML value replaced by its value; errors as (path, message)."""
    errors: list[tuple[tuple[str | int, ...], str]] = []

    def walk(node: Any, where: tuple[str | int, ...]) -> Any:
        if has_expression(node):
            try:
                return evaluate(node, context)
            except ExpressionError as exc:
                errors.append((where, str(exc)))
                return node
        if isinstance(node, dict):
            return {key: walk(item, (*where, key)) for key, item in node.items()}
        if isinstance(node, list):
            return [walk(item, (*where, number)) for number, item in enumerate(node)]
        return node

    return walk(value, path), errors


class NotReady(Exception):  # noqa: N818 - a signal, not an error: evaluate it later
    """An expression read a resource that is declared but not loaded yet."""

    def __init__(self, address: str, wanted: str, position: Any) -> None:
        super().__init__(wanted)
        self.address, self.wanted, self.position = address, wanted, position


KINDS_READABLE = ("network", "pool", "volume", "cloudinit", "domain")


class _Kind(dict):  # type: ignore[type-arg]
    """``volume`` in an expression: volume.base (or volume["disk[0]"]) is that resource's attributes."""

    def __init__(self, reader: ResourceReader, kind: str) -> None:
        super().__init__()
        self.reader, self.kind = reader, kind

    def __getitem__(self, key: str) -> Any:
        return self.reader.attributes(self.reader.find(self.kind, key))

    def __contains__(self, key: object) -> bool:
        return self.reader.find(self.kind, str(key), missing_ok=True) != ""


class _Modules(dict):  # type: ignore[type-arg]
    """``module`` in an expression: module.web is that module's outputs; module.workers["a"] (or
    module.workers[0]) one instance's of a module used with for_each (or count)."""

    def __init__(self, reader: ResourceReader) -> None:
        super().__init__()
        self.reader = reader

    def __getitem__(self, name: str) -> Any:
        from vmform.model import scoped_address

        address = scoped_address(self.reader.module, f"module.{name}")
        modules = self.reader.manifests.modules
        if address in modules:
            return self.reader.module_outputs(address)
        instances = {a: i for a, i in modules.items() if a.startswith(address + "[") and a.count(".") == address.count(".")}
        if not instances:
            raise KeyError(f"module.{name}")
        return _ModuleInstances(self.reader, address, instances)

    def __contains__(self, name: object) -> bool:
        try:
            self[str(name)]
        except KeyError:
            return False
        return True


class _ModuleInstances(dict):  # type: ignore[type-arg]
    """The instances of a module used with count or for_each: by index or key, each its outputs."""

    def __init__(self, reader: ResourceReader, address: str, instances: dict[str, Any]) -> None:
        super().__init__()
        self.reader, self.address = reader, address
        for full in instances:
            inside = full[len(address) + 1:-1]
            key: Any = int(inside) if inside.isdigit() else inside.strip('"')
            dict.__setitem__(self, key, reader.module_outputs(full))


class ResourceReader:
    """What expressions may read of other resources: their name, address and values as written (after
    their own expressions), and a volume's path; and modules' outputs. Reading one records a graph edge.
    Names are looked for from inside ``module`` (see vmform.model.enclosing)."""

    def __init__(self, manifests: Any, declared: set[str], address: str, position: Any,
                 runtime: dict[str, dict[str, Any]] | None = None, module: tuple[str, ...] = ()) -> None:
        self.manifests, self.declared, self.address, self.position = manifests, declared, address, position
        self.runtime = runtime or {}  # what the host reports, by address (outputs: a domain's state, ips)
        self.module = module
        self.read: list[str] = []

    def namespaces(self) -> dict[str, Any]:
        return {**{kind: _Kind(self, kind) for kind in KINDS_READABLE}, "module": _Modules(self)}

    def find(self, kind: str, key: str, module: tuple[str, ...] | None = None, missing_ok: bool = False) -> str:
        """The address a name means from inside ``module`` (default: the reader's)."""
        from vmform.model import enclosing, scoped_address

        for scope in enclosing(self.module if module is None else module):
            address = scoped_address(scope, f"{kind}.{key}")
            if address in self.manifests.resources or address in self.declared:
                return address
        if missing_ok:
            return ""
        raise KeyError(f"{kind}.{key}")

    def attributes(self, address: str) -> dict[str, Any]:
        resource = self.manifests.resources.get(address)
        if resource is None:
            if address in self.declared:
                raise NotReady(self.address, address, self.position)
            raise KeyError(address)
        if address not in self.read:
            self.read.append(address)
        values = {key: value for key, value in resource.values.items() if key not in ("lifecycle", "depends_on")}
        values.update(name=resource.libvirt_name, address=address)
        values.update(self.runtime.get(address, {}))
        if resource.kind.name == "volume":
            pool = self.attributes(self.find("pool", str(resource.values.get("pool")), resource.module))
            if pool.get("path"):
                values["path"] = f"{pool['path'].rstrip('/')}/{resource.libvirt_name}"
        return values

    def module_outputs(self, address: str) -> dict[str, Any]:
        """A module instance's outputs, evaluated in the module (an output that fails is an undefined value
        carrying why, so only an expression that uses it fails)."""
        from vmform.manifest.variables import Recorder

        instance = self.manifests.modules[address]
        if not instance.loaded:
            raise NotReady(self.address, address, self.position)
        if instance.failed:
            return {name: StrictUndefined(hint=f"{address} has mistakes in its inputs") for name in instance.outputs}
        values: dict[str, Any] = {}
        for name, spec in instance.outputs.items():
            inner = ResourceReader(self.manifests, self.declared, self.address, self.position, self.runtime,
                                   instance.module)
            value, errors = evaluate_tree(spec.value, {"var": Recorder(instance.variables), **inner.namespaces()})
            self.read.extend(read for read in inner.read if read not in self.read)
            values[name] = StrictUndefined(hint=f"output '{name}' of {address}: {errors[0][1]}") if errors else value
        return values
