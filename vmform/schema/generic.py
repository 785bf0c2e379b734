"""libvirt XML <-> YAML-able data, one-to-one, driven by libvirt's own RelaxNG schemas.

The mapping (see also docs in the module's public functions):

* an element is a mapping; its attributes and its child elements are keys. The schema tells, for
  the element's place in the document, whether a key is an attribute or a child element;
* a name the schema allows both as an attribute and as a child of one element: a scalar means the
  attribute, a mapping or list means the element; ``"@name"`` always names the attribute (used on
  import when both are present), and a text-only element in such a clash is written ``{_text: …}``;
* a child that may repeat (zeroOrMore/oneOrMore, a repeating group, or named twice in a group) is
  always a list, even with one item; any other child is a single value;
* an element with only text is a scalar; with attributes (or children) and text, the text is under
  ``_text``; an empty element without attributes is ``{}``;
* element names in a foreign namespace the schema knows (``qemu:commandline``) keep a prefix
  derived from the namespace URI; content the schema leaves open (``<metadata>``'s children) is
  kept opaque, as a list of XML strings under ``_xml``. ``foreign_namespaces`` lists both;
* values are strings; an int becomes its decimal string where the schema's datatype can hold it;
  a bool becomes yes/no (or on/off) only where the schema's values are exactly those choices;
  floats and nulls are refused (their exact digits would not survive YAML).

Errors are ``FieldError``/``FieldErrors`` with ``.path`` relative to the data given.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from vmform.schema.types import FieldError, FieldErrors, did_you_mean
from vmform.schema.xmlbind import Element

RNG = "http://relaxng.org/ns/structure/1.0"
XML_NS = "http://www.w3.org/XML/1998/namespace"
SCHEMA_DIRS = ("/usr/share/libvirt/schemas", "/usr/local/share/libvirt/schemas")
SCHEMA_FILES = {"domain": "domain.rng", "network": "network.rng", "pool": "storagepool.rng"}
ROOTS = {"domain": "domain", "network": "network", "pool": "pool"}
TEXT = "_text"
OPAQUE = "_xml"

Path = tuple[str | int, ...]

_NUMERIC = {
    "int", "integer", "long", "short", "byte", "unsignedInt", "unsignedLong", "unsignedShort",
    "unsignedByte", "positiveInteger", "nonNegativeInteger", "negativeInteger", "nonPositiveInteger",
    "decimal", "double", "float",
}  # fmt: skip
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class SchemaUnavailable(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- model


@dataclass
class ValueSpec:
    """What text an attribute or an element may hold: literal choices and/or datatypes."""

    literals: set[str] = field(default_factory=set)
    free: bool = False  # any text (rng:text, string without pattern, datatypes we do not check)
    numeric: bool = False
    patterns: set[str] = field(default_factory=set)
    host_path: bool = False  # one of libvirt's path datatypes (absFilePath, …): names a file on the host

    def add(self, other: ValueSpec) -> None:
        self.literals |= other.literals
        self.free = self.free or other.free
        self.numeric = self.numeric or other.numeric
        self.patterns |= other.patterns
        self.host_path = self.host_path or other.host_path

    @property
    def enumerated(self) -> bool:
        """Only a finite set of literal values is allowed."""
        return bool(self.literals) and not (self.free or self.numeric or self.patterns)

    @property
    def empty(self) -> bool:
        return not (self.literals or self.free or self.numeric or self.patterns)

    def accepts_int(self, value: int) -> bool:
        if self.free or self.numeric or str(value) in self.literals:
            return True
        for pattern in self.patterns:
            with contextlib.suppress(re.error):
                if re.fullmatch(pattern, str(value)):
                    return True
        return False

    def bool_words(self) -> tuple[str, str] | None:
        if {"yes", "no"} <= self.literals:
            return ("yes", "no")
        if {"on", "off"} <= self.literals:
            return ("on", "off")
        return None


@dataclass
class ChildRef:
    qname: str  # Clark notation {uri}local
    defs: set[int] = field(default_factory=set)  # ids of <element> definitions reachable under this name
    repeat: bool = False


@dataclass
class ElementInfo:
    """What one element definition (or a merge of several sharing a name) allows."""

    attrs: dict[str, ValueSpec] = field(default_factory=dict)  # by Clark name
    children: dict[str, ChildRef] = field(default_factory=dict)  # by Clark name
    text: ValueSpec = field(default_factory=ValueSpec)
    any_attrs: bool = False
    any_children: bool = False


@dataclass
class _Summary:
    """A pattern's contribution to its element: attributes, children, text."""

    info: ElementInfo = field(default_factory=ElementInfo)

    @staticmethod
    def combine(parts: list[_Summary], how: str) -> _Summary:
        out = _Summary()
        seen: set[str] = set()
        for part in parts:
            info = part.info
            for name, spec in info.attrs.items():
                out.info.attrs.setdefault(name, ValueSpec()).add(spec)
            for name, child in info.children.items():
                mine = out.info.children.get(name)
                if mine is None:
                    out.info.children[name] = ChildRef(child.qname, set(child.defs), child.repeat)
                else:
                    mine.defs |= child.defs
                    # the same name twice in a sequence (not in alternatives) means it can repeat
                    mine.repeat = mine.repeat or child.repeat or (how != "choice" and name in seen)
            seen |= set(info.children)
            out.info.text.add(info.text)
            out.info.any_attrs = out.info.any_attrs or info.any_attrs
            out.info.any_children = out.info.any_children or info.any_children
        return out

    def repeated(self) -> _Summary:
        out = _Summary.combine([self], "group")
        for child in out.info.children.values():
            child.repeat = True
        return out


def _clark(uri: str, local: str) -> str:
    return f"{{{uri}}}{local}" if uri else local


class _Grammar:
    def __init__(self, parent: _Grammar | None) -> None:
        self.parent = parent
        self.defines: dict[str, list[Element]] = {}
        self.combine: dict[str, str] = {}
        self.start: list[Element] = []


@dataclass
class SchemaModel:
    """Element definitions of one libvirt schema, keyed by an id; ``root`` is the top element's id."""

    kind: str
    root: int
    defs: dict[int, ElementInfo]
    prefixes: dict[str, str]  # namespace URI -> prefix used in keys
    _merged: dict[frozenset[int], ElementInfo] = field(default_factory=dict, repr=False)

    def info(self, defs: set[int] | frozenset[int]) -> ElementInfo:
        """The union of several definitions sharing a name (``<source>`` under each disk type)."""
        key = frozenset(defs)
        found = self._merged.get(key)
        if found is None:
            if len(key) == 1:
                found = self.defs[next(iter(key))]
            else:
                found = _Summary.combine([_Summary(self.defs[i]) for i in sorted(key)], "choice").info
            self._merged[key] = found
        return found

    @property
    def uris(self) -> dict[str, str]:
        return {prefix: uri for uri, prefix in self.prefixes.items()}

    def key(self, qname: str) -> str:
        """The YAML key of an element or attribute name."""
        if qname.startswith("{"):
            uri, local = qname[1:].split("}", 1)
            if uri == XML_NS:
                return f"xml:{local}"
            return f"{self.prefixes.get(uri, uri)}:{local}"
        return qname

    def qname(self, key: str) -> str:
        if ":" in key:
            prefix, local = key.split(":", 1)
            if prefix == "xml":
                return _clark(XML_NS, local)
            uri = self.uris.get(prefix)
            if uri is not None:
                return _clark(uri, local)
        return key


class _Builder:
    def __init__(self) -> None:
        self.defs: dict[int, ElementInfo] = {}
        self.nodes: dict[int, Element] = {}
        self.node_ids: dict[Any, int] = {}
        self.pending: list[tuple[int, Element, _Grammar]] = []
        self.define_cache: dict[tuple[int, str], _Summary] = {}
        self.in_progress: set[tuple[int, str]] = set()
        self.namespaces: set[str] = set()
        self.files: set[str] = set()

    # ---- loading grammars (include, define/combine, start, div)

    def load(self, path: str, parent: _Grammar | None = None) -> _Grammar:
        grammar = _Grammar(parent)
        self._load_into(grammar, path, overrides=set())
        return grammar

    def _load_into(self, grammar: _Grammar, path: str, overrides: set[str]) -> None:
        self.files.add(os.path.abspath(path))
        doc = etree.parse(path, etree.XMLParser(remove_comments=True, resolve_entities=False, no_network=True))
        root = doc.getroot()
        self._grammar_children(grammar, root, path, overrides)

    def _grammar_children(self, grammar: _Grammar, node: Element, path: str, overrides: set[str]) -> None:
        for child in node:
            if not isinstance(child.tag, str):
                continue
            tag = etree.QName(child).localname
            if tag == "define":
                name = child.get("name")
                if name in overrides:
                    continue
                grammar.defines.setdefault(name, []).append(child)
                if child.get("combine"):
                    grammar.combine[name] = child.get("combine")
            elif tag == "start":
                if "start" not in overrides:
                    grammar.start.append(child)
            elif tag == "div":
                self._grammar_children(grammar, child, path, overrides)
            elif tag == "include":
                href = os.path.join(os.path.dirname(path), child.get("href"))
                # defines (and start) inside <include> replace the included file's ones
                local = {d.get("name") for d in child if isinstance(d.tag, str) and etree.QName(d).localname == "define"}
                if any(isinstance(d.tag, str) and etree.QName(d).localname == "start" for d in child):
                    local.add("start")
                self._load_into(grammar, href, overrides | local)
                self._grammar_children(grammar, child, path, overrides)

    # ---- walking patterns

    def element_id(self, node: Element, grammar: _Grammar) -> int:
        found = self.node_ids.get(node)
        if found is None:
            found = len(self.nodes)
            self.node_ids[node] = found
            self.nodes[found] = node
            self.pending.append((found, node, grammar))
        return found

    def define(self, name: str, grammar: _Grammar) -> _Summary:
        key = (id(grammar), name)
        cached = self.define_cache.get(key)
        if cached is not None:
            return cached
        if key in self.in_progress:  # a reference loop outside any element: not valid RNG, contribute nothing
            return _Summary()
        self.in_progress.add(key)
        nodes = grammar.defines.get(name)
        if not nodes:
            raise SchemaUnavailable(f"RNG define '{name}' is referenced but not defined")
        how = "choice" if grammar.combine.get(name, "choice") == "choice" and len(nodes) > 1 else "group"
        result = _Summary.combine([self.group(list(n), grammar) for n in nodes], how)
        self.in_progress.discard(key)
        self.define_cache[key] = result
        return result

    def group(self, nodes: list[Element], grammar: _Grammar) -> _Summary:
        return _Summary.combine([self.pattern(n, grammar) for n in nodes if isinstance(n.tag, str)], "group")

    def pattern(self, node: Element, grammar: _Grammar) -> _Summary:
        tag = etree.QName(node).localname
        if tag in ("group", "interleave"):
            return self.group(list(node), grammar)
        if tag == "choice":
            return _Summary.combine([self.pattern(n, grammar) for n in node if isinstance(n.tag, str)], "choice")
        if tag == "optional":
            return self.group(list(node), grammar)
        if tag in ("zeroOrMore", "oneOrMore"):
            return self.group(list(node), grammar).repeated()
        if tag == "ref":
            found = self.define(node.get("name"), grammar)
            if node.get("name") in HOST_PATH_DEFINES:  # a copy: the cached define stays as it is
                marked = _Summary.combine([found], "group")
                marked.info.text.host_path = True
                return marked
            return found
        if tag == "parentRef":
            assert grammar.parent is not None
            return self.define(node.get("name"), grammar.parent)
        if tag == "externalRef":
            href = os.path.join(os.path.dirname(node.getroottree().docinfo.URL or "."), node.get("href"))
            sub = self.load(href, grammar)
            return self.group(list(sub.start[0]), sub)
        if tag == "grammar":
            sub = _Grammar(grammar)
            self._grammar_children(sub, node, node.getroottree().docinfo.URL or ".", set())
            return self.group(list(sub.start[0]), sub)
        out = _Summary()
        if tag == "element":
            names, anything = self._names(node)
            if anything:
                out.info.any_children = True
            else:
                eid = self.element_id(node, grammar)
                for qname in names:
                    out.info.children[qname] = ChildRef(qname, {eid}, False)
        elif tag == "attribute":
            names, anything = self._names(node, attribute=True)
            if anything:
                out.info.any_attrs = True
            content = [n for n in node if isinstance(n.tag, str) and etree.QName(n).localname not in _NAME_CLASSES]
            spec = self.group(content, grammar).info.text if content else ValueSpec(free=True)
            if spec.empty:
                spec = ValueSpec(free=True)
            if spec.free and not spec.patterns and {etree.QName(q).localname for q in names} & UNTYPED_PATH_NAMES:
                spec.host_path = True  # e.g. a character device's <source path=…>, which the schema leaves untyped
            for qname in names:
                out.info.attrs[qname] = spec
        elif tag == "text" or tag == "list":
            out.info.text.free = True
        elif tag == "mixed":
            out = self.group(list(node), grammar)
            out.info.text.free = True
        elif tag == "value":
            out.info.text.literals.add((node.text or "").strip())
        elif tag == "data":
            datatype = node.get("type", "")
            pattern = [p.text for p in node if isinstance(p.tag, str) and etree.QName(p).localname == "param" and p.get("name") == "pattern"]
            if pattern:
                out.info.text.patterns.update(p or "" for p in pattern)
            elif datatype in _NUMERIC:
                out.info.text.numeric = True
            else:
                out.info.text.free = True
        # empty, notAllowed: nothing
        return out

    def _names(self, node: Element, attribute: bool = False) -> tuple[list[str], bool]:
        """The Clark names of an element/attribute pattern, or (…, True) for anyName/nsName."""
        ns = node.get("ns")
        if ns is None and not attribute:
            ns = next((a.get("ns") for a in node.iterancestors() if a.get("ns") is not None), "")
        ns = ns or ""
        if node.get("name") is not None:
            name = node.get("name")
            if ":" in name:  # a QName with a prefix declared in the RNG file
                prefix, local = name.split(":", 1)
                ns = node.nsmap.get(prefix, "")
                name = local
            if ns:
                self.namespaces.add(ns)
            return [_clark(ns, name)], False
        names: list[str] = []
        for child in node:
            if not isinstance(child.tag, str):
                continue
            local = etree.QName(child).localname
            if local in ("anyName", "nsName"):
                return [], True
            if local == "name":
                names.append(_clark(child.get("ns", ns), (child.text or "").strip()))
            elif local == "choice":
                for sub in child:
                    if isinstance(sub.tag, str) and etree.QName(sub).localname in ("anyName", "nsName"):
                        return [], True
                    if isinstance(sub.tag, str) and etree.QName(sub).localname == "name":
                        names.append(_clark(sub.get("ns", ns), (sub.text or "").strip()))
        return names, False

    def build(self, kind: str, path: str) -> SchemaModel:
        grammar = self.load(path)
        start = self.group(list(grammar.start[0]), grammar)
        root_q = ROOTS[kind]
        if root_q not in start.info.children:
            raise SchemaUnavailable(f"{path} does not start with <{root_q}>")
        while self.pending:
            eid, node, egrammar = self.pending.pop()
            content = [n for n in node if isinstance(n.tag, str) and etree.QName(n).localname not in _NAME_CLASSES]
            self.defs[eid] = self.group(content, egrammar).info
        root_defs = start.info.children[root_q].defs
        prefixes = _prefixes(self.namespaces)
        model = SchemaModel(kind, -1, self.defs, prefixes)
        if len(root_defs) == 1:
            model.root = next(iter(root_defs))
        else:
            model.root = max(self.defs) + 1
            model.defs[model.root] = model.info(root_defs)
        return model


_NAME_CLASSES = {"name", "anyName", "nsName", "except"}
# The datatypes of basictypes.rng that name files and directories on the host (schema/optins.py checks them).
HOST_PATH_DEFINES = frozenset({"absFilePath", "absDirPath", "filePath", "dirPath"})
# Attributes of these names that the schema types only as text are host paths too.
UNTYPED_PATH_NAMES = frozenset({"path", "file", "dir", "socket", "root"})


def host_path_values(element: Element, kind: str) -> Iterator[tuple[str, str]]:
    """(where, value) for every attribute and text in a document that libvirt's schema types as a host path
    (``devices/channel/source/@path``), found by walking the document alongside the schema."""
    schema = model(kind)

    def walk(node: Element, info: ElementInfo, where: str) -> Iterator[tuple[str, str]]:
        for name, value in node.attrib.items():
            spec = info.attrs.get(name)
            if spec is not None and spec.host_path:
                yield f"{where}/@{etree.QName(name).localname}", value
        if info.text.host_path and (node.text or "").strip():
            yield where, (node.text or "").strip()
        for child in node:
            if not isinstance(child.tag, str):
                continue
            ref = info.children.get(child.tag)
            if ref is not None:
                yield from walk(child, schema.info(ref.defs), f"{where}/{etree.QName(child).localname}")

    yield from walk(element, schema.info({schema.root}), etree.QName(element).localname)


def _prefixes(uris: set[str]) -> dict[str, str]:
    """A key prefix for each namespace the schema names: ``…/domain/qemu/1.0`` -> ``qemu``."""
    out: dict[str, str] = {}
    for uri in sorted(uris):
        parts = [p for p in uri.rstrip("/").split("/") if p]
        words = [p for p in parts if not re.fullmatch(r"[0-9.]+", p)]
        prefix = re.sub(r"[^A-Za-z0-9_]", "_", words[-1]) if words else "ns"
        base, n = prefix, 1
        while prefix in out.values() or prefix == "xml":
            n += 1
            prefix = f"{base}{n}"
        out[uri] = prefix
    return out


_models: dict[str, SchemaModel] = {}
_lock = threading.Lock()


def schema_path(kind: str) -> str:
    if kind not in SCHEMA_FILES:
        raise ValueError(f"unknown kind '{kind}' (one of {', '.join(SCHEMA_FILES)})")
    for directory in SCHEMA_DIRS:
        path = os.path.join(directory, SCHEMA_FILES[kind])
        if os.path.exists(path):
            return path
    raise SchemaUnavailable(f"libvirt's {SCHEMA_FILES[kind]} is not installed (looked in {', '.join(SCHEMA_DIRS)})")


def build_model(kind: str) -> SchemaModel:
    """Build the model from the RNG files, without any cache."""
    return _Builder().build(kind, schema_path(kind))


def model(kind: str) -> SchemaModel:
    """The schema model of ``domain``, ``network`` or ``pool``, built once per process (about 20 ms for
    domain.rng and everything it includes, so no on-disk cache)."""
    with _lock:
        found = _models.get(kind)
        if found is None:
            found = _models[kind] = build_model(kind)
        return found


# ----------------------------------------------------------------------------------- XML -> data


def element_to_data(element: Element, kind: str, path: Path = ()) -> Any:
    """The data of a libvirt document's root element (``<domain>`` …): its attributes and children.

    Raises FieldErrors (paths relative to ``path``) for content the schema does not allow."""
    schema = model(kind)
    if element.tag != ROOTS[kind]:
        raise FieldErrors([FieldError(f"expected a <{ROOTS[kind]}> document, got <{element.tag}>", path)])
    errors: list[FieldError] = []
    data = _to_data(element, schema.defs[schema.root], schema, path, errors)
    if errors:
        raise FieldErrors(errors)
    return data


def _to_data(element: Element, info: ElementInfo, schema: SchemaModel, path: Path, errors: list[FieldError]) -> Any:
    out: dict[str, Any] = {}
    for qname, value in element.attrib.items():
        key = schema.key(qname)
        if qname not in info.attrs and not info.any_attrs:
            errors.append(FieldError(f"attribute '{key}' is not allowed here by libvirt's schema", (*path, key), True))
            continue
        out[key] = value
    opaque: list[str] = []
    children = [c for c in element if isinstance(c.tag, str)]
    for child in children:
        qname = child.tag
        key = schema.key(qname)
        ref = info.children.get(qname)
        if ref is None:
            if info.any_children:
                opaque.append(_serialize(child))
            else:
                errors.append(FieldError(f"element <{key}> is not allowed here by libvirt's schema", (*path, key), True))
            continue
        if ref.repeat:
            items = out.setdefault(key, [])
            if not isinstance(items, list):  # an attribute of the same name came first
                out[f"@{key}"] = out.pop(key)
                items = out[key] = []
            value = _to_data(child, schema.info(ref.defs), schema, (*path, key, len(items)), errors)
            items.append(value)
        else:
            if key in out and qname not in info.attrs:
                errors.append(FieldError(f"<{key}> appears more than once; libvirt's schema allows one", (*path, key), True))
                continue
            if key in out:
                out[f"@{key}"] = out.pop(key)
            out[key] = _to_data(child, schema.info(ref.defs), schema, (*path, key), errors)
        if child.tail is not None and child.tail.strip():
            errors.append(FieldError("text between child elements (mixed content) is not supported", (*path, key)))
    # a clash name holding a text-only element must not read back as the attribute
    for qname in info.children:
        key = schema.key(qname)
        if qname in info.attrs and isinstance(out.get(key), str) and f"@{key}" not in out and key not in element.attrib:
            out[key] = {TEXT: out[key]}
    if opaque:
        out[OPAQUE] = opaque
    text = element.text
    if not out and not children:
        if text and (text.strip() or not info.text.empty):
            return text
        return {}  # an empty element, or only layout whitespace where the schema allows no text
    if text is not None and text.strip():
        if not info.text.empty or info.any_children:
            out[TEXT] = text
        else:
            errors.append(FieldError("text is not allowed in this element by libvirt's schema", path))
    return out


def _serialize(element: Element) -> str:
    """One opaque element as XML text, declaring exactly the namespaces it uses."""
    alone = copy.deepcopy(element)
    alone.tail = None
    etree.cleanup_namespaces(alone)
    text: str = etree.tostring(alone, encoding="unicode", with_tail=False)
    return text


# ----------------------------------------------------------------------------------- data -> XML

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_comments=False, huge_tree=False)


def data_to_element(data: Any, kind: str) -> Element:
    """A new libvirt document root (``<domain>`` …) built from data. Raises FieldErrors."""
    schema = model(kind)
    root = etree.Element(ROOTS[kind])
    errors: list[FieldError] = []
    if not isinstance(data, Mapping):
        raise FieldErrors([FieldError(f"expected a mapping, got {_type_name(data)}", ())])
    _fill(root, data, schema.defs[schema.root], schema, (), errors, merge=False)
    if errors:
        raise FieldErrors(errors)
    return root


def merge_into(element: Element, data: Any, kind: str) -> None:
    """Write data into an existing document root in place.

    Attributes named are set; a repeatable child named (a list) replaces all existing siblings of that
    name at the position of the first one; a single child given as a mapping is merged into the existing
    one (created when missing); a text value replaces the element's text (and its children; its attributes
    stay). Everything else is left alone.
    Nothing is changed when the data has errors."""
    schema = model(kind)
    if not isinstance(data, Mapping):
        raise FieldErrors([FieldError(f"expected a mapping, got {_type_name(data)}", ())])
    errors: list[FieldError] = []
    _fill(etree.Element(ROOTS[kind]), data, schema.defs[schema.root], schema, (), errors, merge=False)  # check only
    if errors:
        raise FieldErrors(errors)
    _fill(element, data, schema.defs[schema.root], schema, (), errors, merge=True)
    if errors:  # pragma: no cover - _check found them all
        raise FieldErrors(errors)


def _type_name(raw: Any) -> str:
    if raw is None:
        return "nothing (null)"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a mapping"}.get(
        type(raw), type(raw).__name__
    )


def _scalar(value: Any, spec: ValueSpec, path: Path, what: str) -> str | None:
    """The XML text of a YAML scalar, or None after raising nothing (errors are raised)."""
    if isinstance(value, bool):
        words = spec.bool_words()
        if words is None:
            choices = f" (one of {', '.join(sorted(spec.literals))})" if spec.enumerated else ""
            raise FieldError(f"{what} is not a yes/no value, so true/false cannot be used here; write the value as a string{choices}", path)
        return words[0] if value else words[1]
    if isinstance(value, int):
        if not spec.accepts_int(value):
            choices = f"one of {', '.join(sorted(spec.literals))}" if spec.enumerated else "a string"
            raise FieldError(f"{what} does not take the number {value}; expected {choices} (quote values such as MAC addresses)", path)
        return str(value)
    if isinstance(value, float):
        raise FieldError(f"{what}: write {value!r} as a quoted string, so its exact digits survive YAML", path)
    if value is None:
        raise FieldError(f"{what} needs a value, got nothing (null); use {{}} for an empty element", path)
    if not isinstance(value, str):
        raise FieldError(f"{what} expects a string, got {_type_name(value)}", path)
    bad = _NOT_XML.search(value)
    if bad:
        raise FieldError(f"character U+{ord(bad.group()):04X} is not allowed here (libvirt's XML cannot hold it)", path)
    if spec.enumerated and value not in spec.literals and value.strip() not in spec.literals:
        raise FieldError(
            f"'{value}' is not valid for {what} (one of {', '.join(sorted(spec.literals))}){did_you_mean(value, sorted(spec.literals))}", path
        )
    return value


def _allowed_keys(info: ElementInfo, schema: SchemaModel) -> list[str]:
    return sorted({schema.key(q) for q in info.attrs} | {schema.key(q) for q in info.children})


def _new_child(parent: Element, qname: str, schema: SchemaModel, position: int | None = None) -> Element:
    nsmap = None
    if qname.startswith("{"):
        uri = qname[1:].split("}", 1)[0]
        prefix = schema.prefixes.get(uri)
        if prefix is not None and parent.nsmap.get(prefix) != uri:
            nsmap = {prefix: uri}
    child = etree.Element(qname, nsmap=nsmap) if nsmap else etree.Element(qname)
    if position is None:
        parent.append(child)
    else:
        parent.insert(position, child)
    return child


def _fill(
    element: Element, data: Any, info: ElementInfo, schema: SchemaModel, path: Path, errors: list[FieldError], merge: bool
) -> None:
    name = schema.key(element.tag) if isinstance(element.tag, str) else "?"
    if isinstance(data, list):
        errors.append(FieldError(f"<{name}> cannot repeat here; give a single value, not a list", path))
        return
    if not isinstance(data, Mapping):
        if info.text.empty:
            errors.append(
                FieldError(f"<{name}> holds no text; expected a mapping of its attributes and children, got {_type_name(data)}", path)
            )
            return
        try:
            element.text = _scalar(data, info.text, path, f"<{name}>")
        except FieldError as exc:
            errors.append(exc)
        return
    for key, value in data.items():
        where = (*path, key)
        if not isinstance(key, str):
            errors.append(FieldError(f"keys must be strings, got {_type_name(key)}", where, True))
            continue
        if key == TEXT:
            if info.text.empty:
                errors.append(FieldError(f"<{name}> holds no text", where, True))
                continue
            try:
                element.text = _scalar(value, info.text, where, f"the text of <{name}>")
            except FieldError as exc:
                errors.append(exc)
            continue
        if key == OPAQUE:
            _opaque(element, value, info, schema, where, errors, merge)
            continue
        explicit_attr = key.startswith("@")
        bare = key[1:] if explicit_attr else key
        qname = schema.qname(bare)
        is_attr = qname in info.attrs or (info.any_attrs and ":" in bare and not explicit_attr and qname not in info.children)
        is_attr = is_attr or (explicit_attr and info.any_attrs)
        is_child = qname in info.children and not explicit_attr
        if is_attr and is_child:
            is_attr = not isinstance(value, Mapping | list)
            is_child = not is_attr
        if is_attr:
            spec = info.attrs.get(qname, ValueSpec(free=True))
            try:
                text = _scalar(value, spec, where, f"attribute '{bare}'")
            except FieldError as exc:
                errors.append(exc)
                continue
            if qname.startswith("{") and qname[1:].split("}", 1)[0] not in schema.prefixes and not qname.startswith(f"{{{XML_NS}}}"):
                errors.append(FieldError(f"unknown namespace prefix in '{bare}'", where, True))
                continue
            if merge and bare == "model" and element.get(qname) not in (None, text) and "address" not in data:
                # The address libvirt gave the old model is not the new one's (ib700 takes none at all).
                for assigned in element.findall("address"):
                    element.remove(assigned)
            element.set(qname, text)
            continue
        if not is_child:
            allowed = _allowed_keys(info, schema)
            shown = ", ".join(allowed) if len(allowed) <= 12 else ", ".join(allowed[:12]) + ", …"
            hint = did_you_mean(bare, allowed)
            errors.append(FieldError(f"'{bare}' is not allowed in <{name}> by libvirt's schema{hint} (allowed: {shown or 'nothing'})", where, True))
            continue
        ref = info.children[qname]
        child_info = schema.info(ref.defs)
        if ref.repeat:
            if not isinstance(value, list):
                errors.append(FieldError(f"<{bare}> may repeat, so it is always a list; write it as a list (- …), even with one item", where))
                continue
            position = None
            if merge:
                existing = element.findall(qname)
                if existing:
                    position = element.index(existing[0])
                    for old in existing:
                        element.remove(old)
            for index, item in enumerate(value):
                child = _new_child(element, qname, schema, None if position is None else position + index)
                _fill(child, item, child_info, schema, (*where, index), errors, merge=False)
            continue
        if isinstance(value, list):
            errors.append(FieldError(f"<{bare}> cannot repeat here; give a single value, not a list", where))
            continue
        existing_child = element.find(qname) if merge else None
        if existing_child is None:
            existing_child = _new_child(element, qname, schema)
        elif not isinstance(value, Mapping):
            # A text value is the element's text: its attributes (maybe written by a curated field) stay.
            for old in list(existing_child):
                existing_child.remove(old)
        _fill(existing_child, value, child_info, schema, where, errors, merge=merge)


def _opaque(
    element: Element, value: Any, info: ElementInfo, schema: SchemaModel, where: Path, errors: list[FieldError], merge: bool
) -> None:
    name = schema.key(element.tag) if isinstance(element.tag, str) else "?"
    if not info.any_children:
        errors.append(FieldError(f"<{name}> takes no free-form XML ({OPAQUE})", where, True))
        return
    if not isinstance(value, list):
        errors.append(FieldError(f"{OPAQUE} is a list of XML elements as strings", where))
        return
    parsed: list[Element] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            errors.append(FieldError(f"expected an XML element as a string, got {_type_name(item)}", (*where, index)))
            continue
        try:
            node = etree.fromstring(item, _PARSER)
        except etree.XMLSyntaxError as exc:
            errors.append(FieldError(f"not well-formed XML: {exc}", (*where, index)))
            continue
        parsed.append(node)
    if merge:
        for old in [c for c in element if isinstance(c.tag, str) and c.tag not in info.children]:
            element.remove(old)
    for node in parsed:
        element.append(node)


# ---------------------------------------------------------------------------------------- queries


def _walk(data: Any, path: Path) -> Iterator[tuple[Path, str, Any]]:
    if isinstance(data, Mapping):
        for key, value in data.items():
            yield (*path, key), key, value
            if key != OPAQUE:
                yield from _walk(value, (*path, key))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            yield from _walk(item, (*path, index))


def foreign_namespaces(data: Any) -> list[Path]:
    """Paths of everything outside libvirt's own namespace: prefixed keys (``qemu:commandline``) and
    opaque content (``_xml``, e.g. ``<metadata>``'s children); only the outermost of a subtree."""
    found: list[Path] = []
    for where, key, _ in _walk(data, ()):
        if any(where[: len(outer)] == outer for outer in found):
            continue  # only the outermost foreign entry of a subtree
        bare = key[1:] if isinstance(key, str) and key.startswith("@") else key
        if isinstance(bare, str) and (bare == OPAQUE or (":" in bare and not bare.startswith("xml:"))):
            found.append(where)
    return found


def paths(data: Any, kind: str) -> set[tuple[str, ...]]:
    """Every element and attribute path the data sets, without list indexes. Attributes end in
    ``@name``, an element's text in ``_text`` and opaque content in ``_xml``: ``("devices", "disk")``,
    ``("devices", "disk", "@type")``, ``("memory", "@unit")``, ``("memory", "_text")``, ``("on_poweroff",)``.
    Unknown keys are reported as they are (as elements); ``data_to_element`` refuses them anyway."""
    schema = model(kind)
    out: set[tuple[str, ...]] = set()
    _paths(data, schema.defs[schema.root], schema, (), out)
    return out


def _paths(data: Any, info: ElementInfo | None, schema: SchemaModel, prefix: tuple[str, ...], out: set[tuple[str, ...]]) -> None:
    if isinstance(data, list):
        for item in data:
            _paths(item, info, schema, prefix, out)
        return
    if not isinstance(data, Mapping):
        if prefix:
            out.add(prefix)
        return
    if prefix:
        out.add(prefix)
    for key, value in data.items():
        if not isinstance(key, str):
            continue
        if key in (TEXT, OPAQUE):
            out.add((*prefix, key))
            continue
        bare, is_attr, ref = _classify(key, value, info, schema)
        if is_attr:
            out.add((*prefix, f"@{bare}"))
        else:
            _paths(value, schema.info(ref.defs) if ref is not None else None, schema, (*prefix, bare), out)


def _classify(key: str, value: Any, info: ElementInfo | None, schema: SchemaModel) -> tuple[str, bool, ChildRef | None]:
    """A data key's bare name, whether it is an attribute here, and its child element's reference."""
    bare = key[1:] if key.startswith("@") else key
    qname = schema.qname(bare)
    ref = info.children.get(qname) if info is not None else None
    is_attr = info is not None and (qname in info.attrs or info.any_attrs) and (
        key.startswith("@") or ref is None or not isinstance(value, Mapping | list)
    )
    return bare, is_attr, ref


def owned_paths(data: Any, kind: str) -> list[tuple[str, ...]]:
    """The parts of a document the data sets outright: attributes (``("vcpu", "@placement")``), texts
    (``("on_crash", "_text")``), empty elements, and whole repeatable lists (``("devices", "disk")``)."""
    schema = model(kind)
    out: list[tuple[str, ...]] = []
    if isinstance(data, Mapping):
        _owned(data, schema.defs[schema.root], schema, (), out)
    return out


def _owned(data: Mapping[str, Any], info: ElementInfo | None, schema: SchemaModel, prefix: tuple[str, ...],
           out: list[tuple[str, ...]]) -> None:
    for key, value in data.items():
        if key in (TEXT, OPAQUE):
            out.append((*prefix, key))
            continue
        bare, is_attr, ref = _classify(key, value, info, schema)
        if is_attr:
            out.append((*prefix, f"@{bare}"))
        elif isinstance(value, list) or (isinstance(value, Mapping) and not value):
            out.append((*prefix, bare))
        elif isinstance(value, Mapping):
            _owned(value, schema.info(ref.defs) if ref is not None else None, schema, (*prefix, bare), out)
        else:
            out.append((*prefix, bare, TEXT))


@functools.lru_cache(maxsize=8)
def allowed_keys(kind: str) -> tuple[str, ...]:
    """The keys allowed at the top of ``kind``'s generic section."""
    schema = model(kind)
    return tuple(_allowed_keys(schema.defs[schema.root], schema))


# --------------------------------------------------------------------------- removing what was stated


def value_at(data: Any, path: tuple[str, ...]) -> Any:
    """The value a document's data holds at an ``owned_paths`` path (None: nothing there)."""
    node = data
    for step in path:
        if isinstance(node, str):
            return node if step == TEXT else None
        if not isinstance(node, Mapping):
            return None
        if step.startswith("@"):
            found = node.get(step)
            if found is None and not isinstance(node.get(step[1:]), Mapping | list):
                found = node.get(step[1:])
            node = found
        else:
            node = node.get(step)
        if node is None:
            return None
    return node


def _element_at(root: Element, steps: tuple[str, ...], schema: SchemaModel, create: bool = False) -> Element | None:
    node = root
    for step in steps:
        qname = schema.qname(step)
        found = node.find(qname)
        if found is None:
            if not create:
                return None
            found = _new_child(node, qname, schema)
        node = found
    return node


def _info_at(steps: tuple[str, ...], schema: SchemaModel) -> ElementInfo | None:
    info: ElementInfo | None = schema.defs[schema.root]
    for step in steps:
        ref = info.children.get(schema.qname(step)) if info is not None else None
        info = schema.info(ref.defs) if ref is not None else None
    return info


def unset_path(root: Element, path: tuple[str, ...], kind: str, rendered: Element | None = None) -> None:
    """Take what an ``owned_paths`` path names out of a document, in place: an attribute, an element's text,
    every element of that name (a list is stated whole), or the opaque content. Where ``rendered`` (the
    document vmform would create from the manifests as they are now) has something there, it is put back as
    rendered: vmform's own base (``<features><acpi/>``, ``<on_crash>destroy``) is what a removed line returns
    to. Elements this leaves empty, and which the rendered document does not have, go too."""
    schema = model(kind)
    parents, last = path[:-1], path[-1]
    host_parent = _element_at(root, parents, schema)
    rendered_parent = _element_at(rendered, parents, schema) if rendered is not None else None
    if last.startswith("@"):
        qname = schema.qname(last[1:])
        if host_parent is not None:
            host_parent.attrib.pop(qname, None)
        if rendered_parent is not None and rendered_parent.get(qname) is not None:
            _element_at(root, parents, schema, create=True).set(qname, rendered_parent.get(qname))  # type: ignore[union-attr]
    elif last == TEXT:
        if host_parent is not None:
            host_parent.text = None
        if rendered_parent is not None and rendered_parent.text and rendered_parent.text.strip():
            _element_at(root, parents, schema, create=True).text = rendered_parent.text  # type: ignore[union-attr]
    else:
        if last == OPAQUE:
            info = _info_at(parents, schema)

            def matches(child: Element) -> bool:
                return isinstance(child.tag, str) and (info is None or child.tag not in info.children)
        else:
            qname = schema.qname(last)

            def matches(child: Element) -> bool:
                return child.tag == qname
        if host_parent is not None:
            for child in [c for c in host_parent if matches(c)]:
                host_parent.remove(child)
        copies = [copy.deepcopy(c) for c in rendered_parent if matches(c)] if rendered_parent is not None else []
        if copies:
            target = _element_at(root, parents, schema, create=True)
            assert target is not None
            for child in copies:
                target.append(child)
    for depth in range(len(parents), 0, -1):  # parents left empty, innermost first
        node = _element_at(root, parents[:depth], schema)
        if node is None:
            continue
        empty = not node.attrib and len(node) == 0 and not (node.text or "").strip()
        if not empty or (rendered is not None and _element_at(rendered, parents[:depth], schema) is not None):
            break
        parent = node.getparent()
        if parent is not None:
            parent.remove(node)
