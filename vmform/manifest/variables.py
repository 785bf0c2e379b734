"""Variables: declared with a type (and maybe a default) in vmform.toml ([variables.NAME]) or a manifest
(``variables:``), set from vmform.toml ([vars]), var files (-var-file), -var NAME=VALUE (or typed values a
program passes, as the Ansible module's ``variables``) and VMFORM_VAR_NAME, each later source overriding the
earlier ones. Undeclared or ill-typed values are errors naming their source.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vmform.errors import Position

TYPES = {
    "string": (str,), "number": (int, float), "bool": (bool,), "list": (list,), "map": (dict,), "any": (object,),
}
ENV_PREFIX = "VMFORM_VAR_"


@dataclass(frozen=True)
class Declaration:
    name: str
    type: str
    position: Position
    default: Any = None
    has_default: bool = False
    description: str = ""
    sensitive: bool = False


@dataclass
class VariableInputs:
    """What the user set from outside the manifests (the CLI, the environment, the Ansible module)."""

    files: list[Path] = field(default_factory=list)  # -var-file, in order
    assignments: list[str] = field(default_factory=list)  # -var NAME=VALUE, in order
    environ: Mapping[str, str] | None = None  # default: os.environ
    values: Mapping[str, Any] = field(default_factory=dict)  # typed values from a program (the Ansible module)


class Recorder(dict[str, Any]):
    """The ``var`` namespace of expressions; remembers which variables an expression read."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def parse_declaration(name: str, raw: Any, position: Position) -> tuple[Declaration | None, str | None]:
    """A declaration from its mapping ({type, default, description, sensitive}); or an error message."""
    if not isinstance(raw, Mapping):
        raw = {"default": raw}  # `name: value` declares with a default and its type
    unknown = set(raw) - {"type", "default", "description", "sensitive"}
    if unknown:
        return None, f"variable '{name}': unknown key '{sorted(unknown)[0]}' (type, default, description, sensitive)"
    type_name = raw.get("type") or (_type_of(raw["default"]) if "default" in raw else "any")
    if type_name not in TYPES:
        return None, f"variable '{name}': type '{type_name}' is not one of {', '.join(TYPES)}"
    declaration = Declaration(name, type_name, position, raw.get("default"), "default" in raw,
                              str(raw.get("description") or ""), bool(raw.get("sensitive", False)))
    if declaration.has_default and not type_matches(type_name, declaration.default):
        return None, f"variable '{name}': default {declaration.default!r} is not a {type_name}"
    return declaration, None


def _type_of(value: Any) -> str:
    for name in ("bool", "number", "string", "list", "map"):
        if type_matches(name, value):
            return name
    return "any"


def type_matches(type_name: str, value: Any) -> bool:
    if type_name == "number" and isinstance(value, bool):
        return False
    return isinstance(value, TYPES[type_name])


def resolve(declarations: Mapping[str, Declaration], project_values: Mapping[str, Any], project_file: str,
            inputs: VariableInputs | None) -> tuple[dict[str, Any], list[tuple[str, Position | None]]]:
    """The value of every declared variable, and errors as (message, position)."""
    inputs = inputs or VariableInputs()
    values: dict[str, Any] = {}
    errors: list[tuple[str, Position | None]] = []

    def assign(name: str, value: Any, source: str, position: Position | None = None) -> None:
        declaration = declarations.get(name)
        if declaration is None:
            hint = _close(name, list(declarations))
            errors.append((f"{source}: no variable '{name}' is declared{hint}", position))
        elif not type_matches(declaration.type, value):
            errors.append((f"{source}: variable '{name}' must be a {declaration.type}, got {value!r}", position))
        else:
            values[name] = value

    for name, value in project_values.items():
        assign(str(name), value, f"{project_file} [vars]")
    for path in inputs.files:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            errors.append((f"-var-file {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}", None))
            continue
        if data is None:
            continue
        if not isinstance(data, Mapping):
            errors.append((f"-var-file {path}: expected a mapping of variable names to values", None))
            continue
        for name, value in data.items():
            assign(str(name), value, f"-var-file {path}")
    for assignment in inputs.assignments:
        name, sep, text = assignment.partition("=")
        if not sep or not name:
            errors.append((f"-var {assignment!r}: expected NAME=VALUE", None))
            continue
        assign(name, _scalar(text, declarations.get(name)), f"-var {name}")
    for name, value in inputs.values.items():
        assign(str(name), value, f"variable {name}")
    environ = inputs.environ if inputs.environ is not None else os.environ
    for key, text in environ.items():
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):] in declarations:
            name = key[len(ENV_PREFIX):]
            assign(name, _scalar(text, declarations[name]), f"environment {key}")
    for name, declaration in declarations.items():
        if name not in values:
            if declaration.has_default:
                values[name] = declaration.default
            else:
                errors.append((f"variable '{name}' has no value: set it (-var {name}=…, a -var-file, [vars] in "
                               f"{project_file}, or {ENV_PREFIX}{name}) or give it a default", declaration.position))
    return values, errors


def _scalar(text: str, declaration: Declaration | None) -> Any:
    """A value given as text: a string variable takes it as it is; others read it as YAML (3, true, [a])."""
    if declaration is not None and declaration.type == "string":
        return text
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _close(name: str, names: list[str]) -> str:
    from vmform.schema.types import did_you_mean

    return did_you_mean(name, names)
