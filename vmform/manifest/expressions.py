"""Expressions in manifest values: ``"{{ var.prefix }}-web"``, ``"{{ 10 + index }}"``, ``"{{ each.value.ip }}"``.

Evaluated with Jinja2's immutable sandbox (no attribute access to Python internals, no loader, so no file
access; nothing reaches the network). A value that is exactly one ``{{ … }}`` keeps the expression's type
(``"{{ 10 + index }}"`` is the number 11); anything else is text. Undefined names are errors, never empty
strings. Operators that could build huge values are bounded.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from itertools import chain, islice
from typing import Any

from jinja2 import StrictUndefined, TemplateError, Undefined, UndefinedError
from jinja2.nativetypes import NativeCodeGenerator, NativeTemplate
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_RESULT = 1_000_000  # characters or items an operator may build


class ExpressionError(ValueError):
    pass


def _concat(values: Iterable[Any]) -> Any:
    """One expression keeps its value and type; several parts make text. Unlike Jinja's native_concat, text
    is never parsed again: a variable holding "123" or "[1]" stays a string."""
    head = list(islice(values, 2))
    if not head:
        return ""
    if len(head) == 1:
        return head[0]
    return "".join(str(part) for part in chain(head, values))


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = NativeCodeGenerator
    template_class = NativeTemplate
    concat = staticmethod(_concat)  # type: ignore[assignment]
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 256:
            raise SecurityError("exponent too large")
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, str | list | tuple) and isinstance(times, int) and len(sequence) * times > MAX_RESULT:
                    raise SecurityError("the result would be too large")
        return super().call_binop(context, operator, left, right)


@functools.lru_cache(maxsize=1)
def _environment() -> _Environment:
    return _Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def has_expression(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def evaluate(text: str, context: Mapping[str, Any]) -> Any:
    """The value of one manifest string; raises ExpressionError with a message for the user."""
    try:
        template = _environment().from_string(text)
        result = template.render(dict(context))
    except SecurityError as exc:
        raise ExpressionError(f"expression refused by the sandbox ({exc}): {text!r}") from None
    except TemplateError as exc:
        raise ExpressionError(f"expression error ({_message(exc.message or type(exc).__name__)}): {text!r}") from None
    except (ArithmeticError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise ExpressionError(f"expression error ({exc}): {text!r}") from None
    _check_defined(result, text)
    if isinstance(result, str) and len(result) > MAX_RESULT:
        raise ExpressionError(f"expression result is too large: {text!r}")
    return result


def _message(text: str) -> str:
    return (text.replace("'vmform.manifest.variables.Recorder object' has no attribute", "no variable")
            .replace("'vmform.manifest.expressions._Kind object' has no attribute", "no such resource:"))


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
        return self.reader.attributes(f"{self.kind}.{key}")

    def __contains__(self, key: object) -> bool:
        return f"{self.kind}.{key}" in self.reader.declared


class ResourceReader:
    """What expressions may read of other resources: their name, address and values as written (after
    their own expressions), and a volume's path. Reading one records a graph edge."""

    def __init__(self, manifests: Any, declared: set[str], address: str, position: Any,
                 runtime: dict[str, dict[str, Any]] | None = None) -> None:
        self.manifests, self.declared, self.address, self.position = manifests, declared, address, position
        self.runtime = runtime or {}  # what the host reports, by address (outputs: a domain's state, ips)
        self.read: list[str] = []

    def namespaces(self) -> dict[str, Any]:
        return {kind: _Kind(self, kind) for kind in KINDS_READABLE}

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
            pool = self.attributes(f"pool.{resource.values.get('pool')}")
            if pool.get("path"):
                values["path"] = f"{pool['path'].rstrip('/')}/{resource.libvirt_name}"
        return values
