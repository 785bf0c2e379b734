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


class _CodeGenerator(NativeCodeGenerator):
    def _output_const_repr(self, group: Iterable[Any]) -> str:
        items = list(group)
        if len(items) == 1:  # a lone constant ({{ 3 }}, {{ [1] }}) keeps its type, as any lone expression
            return repr(items[0])
        return repr("".join(str(item) for item in items))


class _Template(NativeTemplate):
    environment_class: type[_Environment]  # type: ignore[assignment]  # NativeTemplate's own would parse text again (native_concat)


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    template_class = _Template
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


_Template.environment_class = _Environment


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
