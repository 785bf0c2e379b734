"""The `xslt:` escape hatch for ported configurations (Terraform users patch libvirt XML this way).

The stylesheet runs last over the document vmform renders (and over the persistent XML on updates), with
lxml's XSLT and no access to files or the network. It must be idempotent: running it over its own output
changes nothing. That makes it checkable against the host: the host holds what the stylesheet says when
running it over the host's XML changes nothing; when it would, the plan shows what it would change.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree

from vmform.schema.types import FieldError, ValueType
from vmform.schema.xmlbind import Element, XmlBinding

XSL = "http://www.w3.org/1999/XSL/Transform"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, remove_blank_text=True)


@functools.lru_cache(maxsize=64)
def stylesheet(text: str) -> Any:
    """The compiled stylesheet; raises FieldError with lxml's message."""
    try:
        document = etree.fromstring(text.encode(), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise FieldError(f"not a usable XSLT stylesheet: {exc}") from None
    # lxml resolves xsl:include and xsl:import while compiling, before any access control applies: a
    # stylesheet must be self-contained, or it could read files on the machine running vmform.
    for tag in ("include", "import"):
        if document.find(f".//{{{XSL}}}{tag}") is not None:
            raise FieldError(f"xsl:{tag} is refused: a stylesheet must be self-contained (no files are read)")
    try:
        return etree.XSLT(document, access_control=etree.XSLTAccessControl.DENY_ALL)
    except etree.XSLTParseError as exc:
        raise FieldError(f"not a usable XSLT stylesheet: {exc}") from None


def transform(text: str, root: Element) -> Element:
    """The stylesheet's output for a document (a new tree)."""
    compiled = stylesheet(text)
    try:
        result = compiled(root)
    except etree.XSLTApplyError as exc:
        raise FieldError(f"the XSLT stylesheet failed: {_reason(compiled, exc)}") from None
    output = result.getroot()
    if output is None:
        raise FieldError("the XSLT stylesheet produced no document")
    return output


def _reason(compiled: Any, exc: Exception) -> str:
    """libxslt's own words for a failure (lxml's exception often says only "unknown error"), one line."""
    messages = [" ".join(entry.message.split()) for entry in getattr(compiled, "error_log", ()) if entry.message]
    known = [m for m in messages if m and m != "unknown error"]
    text = "; ".join(dict.fromkeys(known[-2:])) or str(exc)
    if "infinite template recursion" in text:  # libxslt's advice about xsltproc options does not apply here
        return "templates nested deeper than libxslt's limit of 3000 (a template that calls itself without end?)"
    return text


def canonical(root: Element) -> bytes:
    copy = etree.fromstring(etree.tostring(root), _PARSER)  # drops layout whitespace, as libvirt's own output
    return etree.tostring(copy, method="c14n")


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Stylesheet(ValueType):
    """Inline stylesheet text, or {file: PATH} (relative to the manifest; read by the loader)."""

    def parse(self, raw: Any) -> str:
        if isinstance(raw, Mapping) and set(raw) == {"file"} and isinstance(raw["file"], str):
            return f"file:{raw['file']}"  # resolved and read by the loader, which knows the manifest's directory
        if not isinstance(raw, str) or "<" not in raw:
            raise FieldError("expected an XSLT stylesheet (inline text) or {file: PATH}")
        stylesheet(raw)
        return raw

    def describe(self) -> str:
        return "XSLT stylesheet (inline) or {file: PATH}"

    def display(self, value: Any) -> str:
        return f"stylesheet {digest(value)}"


@dataclass(frozen=True)
class StylesheetBinding(XmlBinding):
    """Writing runs the stylesheet over the whole document, in place."""

    def read(self, root: Element) -> Any:
        return None  # compared by running it over the host's XML (diff)

    def write(self, root: Element, value: Any) -> None:
        if not value:
            return
        output = transform(value, root)
        if output.tag != root.tag:
            raise FieldError(f"the XSLT stylesheet turned <{root.tag}> into <{output.tag}>")
        root.attrib.clear()
        root.attrib.update(dict(output.attrib))
        root.text = output.text
        for child in list(root):
            root.remove(child)
        for child in list(output):
            root.append(child)


def pending_effect(text: str, live_root: Element | None) -> tuple[bool, str]:
    """Whether running the stylesheet over the host's XML would change it, and a short description."""
    if live_root is None:
        return False, ""
    output = transform(text, live_root)
    if canonical(output) == canonical(live_root):
        return False, ""
    return True, _describe_difference(live_root, output)


def _describe_difference(before: Element, after: Element) -> str:
    """The first few element paths whose serialisation differs."""
    found: list[str] = []

    def walk(old: Element | None, new: Element | None, path: str) -> None:
        if len(found) >= 3:
            return
        if old is None or new is None or old.tag != new.tag or dict(old.attrib) != dict(new.attrib) or \
                (old.text or "").strip() != (new.text or "").strip() or len(old) != len(new):
            found.append(path)
            return
        for index, (old_child, new_child) in enumerate(zip(old, new, strict=True)):
            if isinstance(old_child.tag, str):
                walk(old_child, new_child, f"{path}/{old_child.tag}[{index}]")

    walk(before, after, before.tag)
    return ", ".join(found) or before.tag
