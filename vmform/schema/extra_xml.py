"""The `xml:` section of domains and networks: everything of libvirt's XML that no curated field covers,
written one-to-one in YAML through the generic mapping (schema/generic.py).

* Loading: the section must be a mapping the generic mapping accepts for the kind's root element; it is
  stored in canonical form (what the mapping reads back from the XML it builds), so ints, bools and
  strings a user wrote compare equal to what libvirt prints.
* Rendering and updates: merged into the document after the curated fields (``merge_into``).
* Diff: "what the manifest states is on the host". Every key the section names must match the live
  document; libvirt's additions (defaults, addresses, aliases, auto-added controllers) are not
  differences. A list matches when its items match, in order, a subsequence of the live list.
* Values pass through one normalisation table (``NORMALISERS``) before they are compared.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from vmform.schema.types import FieldError, FieldErrors, FieldSpec, ValueType
from vmform.schema.xmlbind import Element, XmlBinding
from vmform.units import libvirt_to_bytes

# Top-level keys the section may not set: vmform itself owns them.
RESERVED = {
    "domain": {"name": "the libvirt name comes from the manifest key (or name:)",
               "metadata": "vmform keeps its ownership record there"},
    "network": {"name": "the libvirt name comes from the manifest key (or name:)",
                "metadata": "vmform keeps its ownership record there"},
    "pool": {"name": "the libvirt name comes from the manifest key (or name:)",
             "uuid": "vmform gives the pool its UUID and records it in its ledger"},
}


def _generic() -> Any:
    from vmform.schema import generic  # loads libvirt's RNG schemas on first use

    return generic


@dataclass(frozen=True)
class ExtraXml(ValueType):
    """A mapping that mirrors the rest of a libvirt document."""

    kind: str

    def parse(self, raw: Any) -> dict[str, Any]:
        generic = _generic()
        if not isinstance(raw, Mapping):
            raise FieldError("expected a mapping of libvirt XML elements and attributes")
        problems = [FieldError(f"'{key}' cannot be set here: {why}", (key,), True)
                    for key, why in RESERVED.get(self.kind, {}).items() if key in raw]
        if problems:
            raise FieldErrors(problems)
        try:
            element = generic.data_to_element(raw, self.kind)
            return dict(generic.element_to_data(element, self.kind))
        except generic.SchemaUnavailable as exc:
            raise FieldError(f"libvirt's XML schemas are needed to check this section: {exc}") from None

    def describe(self) -> str:
        return f"libvirt {self.kind} XML as YAML"


@dataclass(frozen=True)
class ExtraXmlBinding(XmlBinding):
    kind: str

    def read(self, root: Element) -> Any:
        return None  # compared by projection against the stated keys only (see changes())

    def write(self, root: Element, value: Any) -> None:
        if value:
            _generic().merge_into(root, value, self.kind)


def foreign_paths(data: Any) -> list[tuple[str | int, ...]]:
    """Where the section holds XML outside libvirt's namespace (refused without allow: [foreign_xml])."""
    return list(_generic().foreign_namespaces(data)) if data else []


def document_data(root: Element | None, kind: str) -> dict[str, Any] | None:
    """The generic data of a live document; parts libvirt's own schema does not know are dropped."""
    if root is None:
        return None
    generic = _generic()
    try:
        return dict(generic.element_to_data(root, kind))
    except generic.FieldErrors:
        return dict(generic.element_to_data(_schema_clean(root, kind), kind))


def _schema_clean(root: Element, kind: str) -> Element:
    """A copy of root without the elements and attributes the schema rejects (newer libvirt output)."""
    generic = _generic()
    clean = copy.deepcopy(root)
    for _ in range(50):
        try:
            generic.element_to_data(clean, kind)
            return clean
        except generic.FieldErrors as exc:
            for problem in exc.errors:
                _drop(clean, problem.path)
    return clean


def _drop(root: Element, path: tuple[str | int, ...]) -> None:
    node = root
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        found = node.find(part)
        if found is None:
            return
        node = found
    last = path[-1] if path else None
    if isinstance(last, str):
        if last in node.attrib:
            del node.attrib[last]
        elif node.find(last) is not None:
            node.remove(node.find(last))


# ------------------------------------------------------------------------------------ normalisation

def _amount(value: Mapping[str, Any]) -> int | None:
    """A scaled amount: an element's text or its size attribute, in its unit (libvirt prints KiB)."""
    number = value.get("_text", value.get("size"))
    try:
        return libvirt_to_bytes(str(number).strip(), value.get("unit"), "KiB")
    except (TypeError, ValueError):
        return None


def _is_scaled(key: str, value: Any) -> bool:
    """<memory unit='MiB'>512</memory>, <page size='2' unit='M'/>: amounts libvirt rewrites into KiB."""
    if not isinstance(value, Mapping):
        return False
    if "_text" in value:
        return key in SCALED_UNIT_ELEMENTS
    return "size" in value and "unit" in value


def _lower(value: str) -> str:
    return value.lower()


# Where libvirt rewrites a value it was given into an equal one, by element or attribute name. Amounts
# with units are handled by _is_scaled/_amount.
NORMALISERS: dict[str, Any] = {
    "address": _lower,  # MAC addresses are printed lower-case
    "uuid": _lower,
}
# Values libvirt drops when it defines the object, by (element, key), with the condition on the element's
# stated values: stating them is harmless, and their absence on the host is not a difference.
DROPPED_BY_LIBVIRT: dict[tuple[str, str], Any] = {
    ("bootmenu", "timeout"): lambda element: element.get("enable") == "no",  # a disabled menu has no timeout
}
SCALED_UNIT_ELEMENTS = {"memory", "currentMemory", "maxMemory", "size", "capacity", "allocation", "hard_limit",
                        "soft_limit", "swap_hard_limit", "min_guarantee", "node", "requested", "current", "limit"}


def normalise(key: str, value: Any) -> Any:
    if isinstance(value, str):
        rule = NORMALISERS.get(key.lstrip("@"))
        return rule(value) if rule else value
    return value


# ---------------------------------------------------------------------------------------- compare

def _matches(desired: Any, live: Any, key: str = "") -> bool:
    if _is_scaled(key, desired):
        if not isinstance(live, Mapping) or _amount(desired) != _amount(live):
            return False
        desired = {k: v for k, v in desired.items() if k not in ("_text", "size", "unit")}
    if isinstance(desired, str) and isinstance(live, Mapping) and "_text" in live:
        return normalise(key, desired) == normalise(key, live["_text"])  # the text of an element with attributes
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return not desired and live == ""  # an empty element
        return all(_matches(v, live[k], k) if k in live else _dropped(key, k, desired) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and _subsequence(desired, live, key)
    return normalise(key, desired) == normalise(key, live)


def matches(stated: Any, live: Any, key: str = "") -> bool:
    """Whether a live value holds everything a stated one says (libvirt's additions are not differences)."""
    return _matches(stated, live, key)


def _dropped(element: str, key: str, stated: Mapping[str, Any]) -> bool:
    rule = DROPPED_BY_LIBVIRT.get((element, key.lstrip("@")))
    return bool(rule and rule(stated))


def _subsequence(desired: list[Any], live: list[Any], key: str) -> bool:
    position = 0
    for item in desired:
        while position < len(live) and not _matches(item, live[position], key):
            position += 1
        if position == len(live):
            return False
        position += 1
    return True


def changes(desired: Mapping[str, Any], live: Mapping[str, Any] | None,
            path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any, Any]]:
    """(path, live value, desired value) for each stated value the live document does not have."""
    live = live or {}
    for key, value in desired.items():
        current = live.get(key)
        if _matches(value, current, key) or (key not in live and path and _dropped(str(path[-1]), key, desired)):
            continue
        if isinstance(value, Mapping) and isinstance(current, Mapping) and not _is_scaled(key, value):
            yield from changes(value, current, (*path, key))
        else:
            yield (*path, key), current, value


def path_text(path: tuple[str | int, ...]) -> str:
    return "xml." + ".".join(str(p) for p in path)


# -------------------------------------------------------------------------------------- overlaps

# Defaults that must yield to the xml: section together with the field they are bounded by.
YIELDS_WITH = {("domain", "max_memory"): "memory", ("domain", "max_vcpus"): "vcpus"}


def owned_paths(data: Any, kind: str) -> list[tuple[str, ...]]:
    """The parts of a document the section sets outright (see generic.owned_paths)."""
    return list(_generic().owned_paths(data, kind))


def regions(spec: FieldSpec, kind: str) -> list[tuple[str, ...]]:
    """Where a curated field writes, from its declaration's ``xml`` (``devices/disk[@device='disk']``,
    ``os/type/@arch``, ``vcpu/text()``; ``domain/@type`` is the root's attribute), in the form of
    ``owned_paths``: ``("devices", "disk")``, ``("os", "type", "@arch")``, ``("vcpu", "_text")``."""
    found = []
    for part in spec.xml.split(","):
        text = part.strip()
        while "[" in text:
            start = text.index("[")
            depth, end = 0, start
            for end in range(start, len(text)):
                depth += {"[": 1, "]": -1}.get(text[end], 0)
                if depth == 0:
                    break
            text = text[:start] + text[end + 1:]
        steps = [s for s in text.split("/") if s]
        if len(steps) > 1 and steps[0] == kind and steps[1].startswith("@"):
            steps = steps[1:]  # an attribute of the document's root
        steps = ["_text" if s == "text()" else s for s in steps]
        if steps:
            found.append(tuple(steps))
    return found


def overlap(owned: tuple[str, ...], region: tuple[str, ...]) -> bool:
    shorter = min(len(owned), len(region))
    return owned[:shorter] == region[:shorter]
