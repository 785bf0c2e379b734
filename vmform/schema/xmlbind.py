"""Bindings between a field's normalised value and its place in libvirt's XML.

A binding reads the value from a parsed libvirt document and writes it into one, in place, so the
same declaration builds new XML (render) and patches live XML (update) without disturbing the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from lxml import etree

from vmform.units import libvirt_to_bytes

# lxml ships no type information of its own; elements are typed loosely.
Element: TypeAlias = Any


def ensure(root: Element, path: str) -> Element:
    """The element at a simple slash path under root, created (with its parents) when missing."""
    node = root
    for part in path.split("/"):
        found = node.find(part)
        if found is None:
            found = etree.SubElement(node, part)
        node = found
    return node


def remove(root: Element, path: str) -> None:
    node = root.find(path)
    if node is not None:
        parent = node.getparent()
        assert parent is not None
        parent.remove(node)


class XmlBinding:
    def read(self, root: Element) -> Any:
        raise NotImplementedError

    def write(self, root: Element, value: Any) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Text(XmlBinding):
    path: str
    to_value: Callable[[str], Any] = str
    to_text: Callable[[Any], str] = str

    def read(self, root: Element) -> Any:
        node = root.find(self.path)
        if node is None or node.text is None:
            return None
        return self.to_value(node.text)  # exact: whitespace a user wrote is part of the value

    def write(self, root: Element, value: Any) -> None:
        if value is None:
            remove(root, self.path)
        else:
            ensure(root, self.path).text = self.to_text(value)


@dataclass(frozen=True)
class Attr(XmlBinding):
    path: str  # "." for root
    attr: str
    to_value: Callable[[str], Any] = str
    to_text: Callable[[Any], str] = str

    def read(self, root: Element) -> Any:
        node = root if self.path == "." else root.find(self.path)
        if node is None or node.get(self.attr) is None:
            return None
        return self.to_value(node.get(self.attr))  # type: ignore[arg-type]

    def write(self, root: Element, value: Any) -> None:
        if value is None:
            node = root if self.path == "." else root.find(self.path)
            if node is not None and self.attr in node.attrib:
                del node.attrib[self.attr]
                if node is not root and not node.attrib and len(node) == 0 and not (node.text or "").strip():
                    remove(root, self.path)  # an element that only carried the attribute (<mtu size=…/>) goes too
            return
        node = root if self.path == "." else ensure(root, self.path)
        node.set(self.attr, self.to_text(value))


@dataclass(frozen=True)
class SizeText(XmlBinding):
    """A libvirt size element (``<memory unit='KiB'>``); written in KiB, read in any unit."""

    path: str
    unit: str = "KiB"
    default_unit: str = "KiB"

    def read(self, root: Element) -> Any:
        node = root.find(self.path)
        if node is None or node.text is None:
            return None
        return libvirt_to_bytes(node.text.strip(), node.get("unit"), self.default_unit)

    def write(self, root: Element, value: Any) -> None:
        if value is None:
            remove(root, self.path)
            return
        node = ensure(root, self.path)
        if self.unit == "bytes":
            node.set("unit", "bytes")
            node.text = str(value)
        else:
            node.set("unit", "KiB")
            node.text = str(-(-value // 1024))  # libvirt rounds up to KiB as well


def yes_no(value: str) -> bool:
    return value == "yes"


def to_yes_no(value: bool) -> str:
    return "yes" if value else "no"
