"""Value types of manifest fields: parse what a user wrote into one normalised Python value."""

from __future__ import annotations

import copy
import difflib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vmform.units import SizeSyntaxError, format_size, parse_size


class Effect(StrEnum):
    """How a change to a field reaches the host."""

    LIVE = "live"  # applied to the running object and its persistent config at once
    RESTART = "restart"  # persistent config changes now; the running object picks it up at its next restart
    REPLACE = "replace"  # the object is deleted and created again


class FieldError(ValueError):
    """A value that does not fit its type; ``path`` is relative to the value being parsed."""

    def __init__(self, message: str, path: tuple[str | int, ...] = (), at_key: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.at_key = at_key


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(raw: Any) -> str:
    if raw is None:
        return "nothing (null)"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a mapping"}.get(
        type(raw), type(raw).__name__
    )


class ValueType:
    """Base: subclasses parse a raw YAML value, describe themselves for docs, and display values."""

    def parse(self, raw: Any) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def display(self, value: Any) -> str:
        return str(value)


# Characters XML 1.0 cannot carry at all: refused at load time, never a crash at render time.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


# Absolute host paths as libvirt's schemas take them (basictypes.rng): a file is "/" and at least one more
# character (absFilePath), a directory may be "/" (absDirPath); neither holds a line break (XSD's "." does not
# match one) nor NUL.
ABSOLUTE_FILE = r"/[^\x00\n\r]+"
ABSOLUTE_DIR = r"/[^\x00\n\r]*"


@dataclass(frozen=True)
class Str(ValueType):
    pattern: str | None = None
    hint: str = ""
    max_length: int = 4096

    def parse(self, raw: Any) -> str:
        if isinstance(raw, bool) or raw is None or isinstance(raw, list | dict):
            raise FieldError(f"expected a string, got {_type_name(raw)}")
        text = str(raw)
        bad = _NOT_XML.search(text)
        if bad:
            raise FieldError(f"character U+{ord(bad.group()):04X} is not allowed here (libvirt's XML cannot hold it)")
        if len(text) > self.max_length:
            raise FieldError(f"too long ({len(text)} characters, at most {self.max_length})")
        if self.pattern and not re.fullmatch(self.pattern, text):
            raise FieldError(f"'{text}' is not valid here{': ' + self.hint if self.hint else ''}")
        return text

    def describe(self) -> str:
        return "string"

    def display(self, value: Any) -> str:
        return f'"{value}"'


# libvirt object names: no path separators, no leading dot, nothing a shell or a file name could trip on.
NAME = Str(
    pattern=r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}",
    hint="use letters, digits and _.+- (starting with a letter or digit), at most 100 characters",
)


@dataclass(frozen=True)
class Int(ValueType):
    minimum: int | None = None
    maximum: int | None = None

    def parse(self, raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise FieldError(f"expected a whole number, got {_type_name(raw)}")
        if self.minimum is not None and raw < self.minimum:
            raise FieldError(f"{raw} is too small (at least {self.minimum})")
        if self.maximum is not None and raw > self.maximum:
            raise FieldError(f"{raw} is too large (at most {self.maximum})")
        return raw

    def describe(self) -> str:
        return "integer"


@dataclass(frozen=True)
class Bool(ValueType):
    def parse(self, raw: Any) -> bool:
        if not isinstance(raw, bool):
            raise FieldError(f"expected true or false, got {_type_name(raw)}")
        return raw

    def describe(self) -> str:
        return "boolean"

    def display(self, value: Any) -> str:
        return "true" if value else "false"


@dataclass(frozen=True)
class Enum(ValueType):
    choices: tuple[str, ...]

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str) or raw not in self.choices:
            shown = raw if isinstance(raw, str) else _type_name(raw)
            hint = did_you_mean(raw, list(self.choices)) if isinstance(raw, str) else ""
            raise FieldError(f"'{shown}' is not one of {', '.join(self.choices)}{hint}")
        return raw

    def describe(self) -> str:
        return " | ".join(self.choices)

    def display(self, value: Any) -> str:
        return f'"{value}"'


@dataclass(frozen=True)
class Size(ValueType):
    minimum: int = 0
    multiple: int = 1  # libvirt keeps memory in KiB: anything finer would never converge

    def parse(self, raw: Any) -> int:
        if raw is None or isinstance(raw, list | dict | float):
            raise FieldError(f"expected a size such as 512MiB or 20GiB, got {_type_name(raw)}")
        try:
            size = parse_size(raw)
        except SizeSyntaxError as exc:
            raise FieldError(str(exc)) from None
        if size < self.minimum:
            raise FieldError(f"{format_size(size)} is too small (at least {format_size(self.minimum)})")
        if size % self.multiple:
            raise FieldError(f"{raw} is not a whole number of {format_size(self.multiple)}")
        return size

    def describe(self) -> str:
        return "size (e.g. 512MiB, 20GiB)"

    def display(self, value: Any) -> str:
        return format_size(value)


@dataclass(frozen=True)
class Mac(ValueType):
    def parse(self, raw: Any) -> str:
        if isinstance(raw, int) and not isinstance(raw, bool):
            # YAML 1.1 reads an unquoted 52:54:00:12:34:56 as a base-60 number.
            raise FieldError('a MAC address must be quoted, e.g. mac: "52:54:00:12:34:56"')
        text = Str().parse(raw).lower()
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", text):
            raise FieldError(f"'{raw}' is not a MAC address like 52:54:00:12:34:56")
        if int(text[:2], 16) & 1:
            raise FieldError(f"'{raw}' is a multicast MAC address; the first octet must be even")
        return text

    def describe(self) -> str:
        return "MAC address"


@dataclass(frozen=True)
class IPv4Interface(ValueType):
    """An address with its prefix, ``10.40.0.1/24``: the host's address on a network."""

    def parse(self, raw: Any) -> str:
        text = Str().parse(raw)
        try:
            iface = ipaddress.IPv4Interface(text)
        except ValueError:
            raise FieldError(f"'{text}' is not an IPv4 address with prefix like 10.40.0.1/24") from None
        if "/" not in text:
            raise FieldError(f"'{text}' needs a prefix length, e.g. {text}/24")
        if iface.ip == iface.network.network_address or iface.ip == iface.network.broadcast_address:
            raise FieldError(f"'{text}' is the network's own or broadcast address, not a host address")
        return str(iface)

    def describe(self) -> str:
        return "IPv4 address/prefix"


@dataclass(frozen=True)
class IPv4Address(ValueType):
    def parse(self, raw: Any) -> str:
        text = Str().parse(raw)
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise FieldError(f"'{text}' is not an IPv4 address") from None

    def describe(self) -> str:
        return "IPv4 address"


@dataclass(frozen=True)
class Ref(ValueType):
    """The name of another resource of the manifests; the graph gets an edge from it."""

    kind: str

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str) or not raw:
            raise FieldError(f"expected the name of a {self.kind}, got {_type_name(raw)}")
        return raw

    def describe(self) -> str:
        return f"name of a {self.kind}"


@dataclass(frozen=True)
class ListOf(ValueType):
    item: ValueType
    max_items: int = 256
    min_items: int = 0

    def parse(self, raw: Any) -> list[Any]:
        if not isinstance(raw, list):
            raise FieldError(f"expected a list, got {_type_name(raw)}")
        if len(raw) < self.min_items:
            raise FieldError(f"needs at least {self.min_items} {'entry' if self.min_items == 1 else 'entries'}")
        if len(raw) > self.max_items:
            raise FieldError(f"too many entries ({len(raw)}, at most {self.max_items})")
        values: list[Any] = []
        problems: list[FieldError] = []
        for index, entry in enumerate(raw):
            try:
                values.append(self.item.parse(entry))
            except FieldErrors as exc:
                problems.extend(FieldError(p.message, (index, *p.path), p.at_key) for p in exc.errors)
            except FieldError as exc:
                problems.append(FieldError(exc.message, (index, *exc.path), exc.at_key))
        if problems:
            raise FieldErrors(problems)
        return values

    def describe(self) -> str:
        return f"list of {self.item.describe()}"


class FieldErrors(FieldError):
    """Several problems inside one compound value."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(e.message for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class Removal:
    """What a field without a default becomes when the manifest stated it the last time vmform wrote the object
    (its last-applied record, vmform/lastapplied.py) and no longer does: the binding writes ``value`` (None: the
    element or attribute goes; a list field: no items). A field without a Removal is left as it is on the
    host (unmanaged from then on); ``doc`` says, for docs/MANIFEST.md, what removing the line does."""

    doc: str
    value: Any = None


@dataclass(frozen=True)
class FieldSpec:
    """One managed field. ``default`` is what vmform writes when the manifest is silent; with no default,
    an unset field is left to libvirt and never compared."""

    name: str
    type: ValueType
    doc: str
    effect: Effect = Effect.RESTART
    xml: str = ""  # where it lives in libvirt's XML, for docs
    default: Any = None
    required: bool = False
    effect_doc: str = ""  # when the effect depends on the values (e.g. live within the maximum)
    binding: Any = None  # an xmlbind.XmlBinding; None for fields read through the API (state, autostart)
    compare: bool = True  # False: written at create, never diffed (libvirt keeps or rewrites it)
    # When libvirt rewrites a value into an equal one (a machine alias into its versioned name): (live, desired)
    same: Any = None
    sensitive: bool = False  # compared and shown by digest and size only (vmform.sensitive); show --sensitive prints it
    # The default vmform applies is recorded on the object when it is created, and an existing object keeps the
    # default it was created with: a newer vmform with another default never plans a change to it.
    pinned: bool = False
    default_doc: str = ""  # for docs, when the default is computed from other values (bind)
    removal: Removal | None = None  # no default: what removing the line from the manifest does (three-way)


@dataclass(frozen=True)
class Obj(ValueType):
    """A mapping with declared keys."""

    fields: tuple[FieldSpec, ...]
    shorthand: str | None = None  # a bare string means {shorthand: string}
    extra_keys: tuple[str, ...] = field(default=())

    def spec(self, name: str) -> FieldSpec | None:
        for spec in self.fields:
            if spec.name == name:
                return spec
        return None

    def parse(self, raw: Any) -> dict[str, Any]:
        if self.shorthand and isinstance(raw, str):
            raw = {self.shorthand: raw}
        if not isinstance(raw, Mapping):
            raise FieldError(f"expected a mapping, got {_type_name(raw)}")
        return parse_fields(self.fields, raw, self.extra_keys)

    def describe(self) -> str:
        return "mapping"


def parse_fields(specs: tuple[FieldSpec, ...], raw: Mapping[str, Any], extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Parse a mapping against its field specs; every problem is collected with its relative path."""
    known = {spec.name: spec for spec in specs}
    values: dict[str, Any] = {}
    problems: list[FieldError] = []
    for key in raw:
        if key not in known and key not in extra_keys:
            hint = did_you_mean(str(key), [*known, *extra_keys])
            problems.append(FieldError(f"unknown key '{key}'{hint}", (key,), at_key=True))
    for spec in specs:
        if spec.name not in raw or raw[spec.name] is None and not spec.required:
            if spec.required:
                problems.append(FieldError(f"'{spec.name}' is required ({spec.doc})"))
            elif spec.default is not None:
                values[spec.name] = copy.deepcopy(spec.default)  # never share a default list between resources
            continue
        try:
            values[spec.name] = spec.type.parse(raw[spec.name])
        except FieldErrors as exc:
            problems.extend(FieldError(p.message, (spec.name, *p.path), p.at_key) for p in exc.errors)
        except FieldError as exc:
            problems.append(FieldError(exc.message, (spec.name, *exc.path), exc.at_key))
    if problems:
        raise FieldErrors(problems)
    return values
