"""YAML to plain Python values, remembering where every key and value came from.

PyYAML's composer keeps marks on nodes; we convert nodes ourselves so that positions survive and
duplicate keys (which PyYAML silently overwrites) become errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from vmform.errors import ManifestError, Position

Path = tuple[str | int, ...]
# Expanding aliases can blow up exponentially ("billion laughs"); no real manifest comes near this.
MAX_NODES = 200_000
# Nesting deeper than this is refused (500 '[' would otherwise exhaust Python's recursion); libvirt's deepest
# XML, written under xml:, stays far below it.
MAX_DEPTH = 64


@dataclass
class SourceMap:
    """Positions of values and of mapping keys, by path from the document root."""

    file: str
    values: dict[Path, Position] = field(default_factory=dict)
    keys: dict[Path, Position] = field(default_factory=dict)

    def value(self, path: Path) -> Position:
        """The position of the value at path, or of its nearest known ancestor."""
        for cut in range(len(path), -1, -1):
            found = self.values.get(path[:cut])
            if found is not None:
                return found
        return Position(self.file, 1, 1)

    def key(self, path: Path) -> Position:
        return self.keys.get(path) or self.value(path)


@dataclass
class YamlDocument:
    data: Any
    source: SourceMap


def _position(file: str, mark: yaml.Mark | None) -> Position:
    if mark is None:
        return Position(file, 1, 1)
    return Position(file, mark.line + 1, mark.column + 1)


class _Converter:
    def __init__(self, file: str, loader: yaml.SafeLoader) -> None:
        self.file = file
        self.loader = loader
        self.source = SourceMap(file)
        self.errors: list[ManifestError] = []
        self.count = 0

    def convert(self, node: yaml.Node, path: Path, active: frozenset[int]) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise ManifestError(
                f"document expands to more than {MAX_NODES} values (alias bomb?)", _position(self.file, node.start_mark)
            )
        if id(node) in active:
            raise ManifestError("recursive YAML alias", _position(self.file, node.start_mark))
        if len(path) > MAX_DEPTH:
            raise ManifestError(f"YAML nested deeper than {MAX_DEPTH} levels", _position(self.file, node.start_mark))
        self.source.values[path] = _position(self.file, node.start_mark)
        if isinstance(node, yaml.MappingNode):
            explicit = {id(key) for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"}
            self.loader.flatten_mapping(node)  # applies YAML merge keys (<<); merged pairs come first
            result: dict[str, Any] = {}
            merged: set[str] = set()
            inner = active | {id(node)}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.errors.append(ManifestError("mapping keys must be plain strings", _position(self.file, key_node.start_mark)))
                    continue
                key = self.loader.construct_object(key_node)
                if not isinstance(key, str):
                    key = str(key) if key is not None and not isinstance(key, bool) else key
                    if not isinstance(key, str):
                        self.errors.append(
                            ManifestError(f"mapping key {key_node.value!r} must be a string", _position(self.file, key_node.start_mark))
                        )
                        continue
                if key in result and key in merged and id(key_node) in explicit:
                    merged.discard(key)  # an explicit key overrides a merged one, as YAML says
                elif key in result:
                    first = self.source.keys.get((*path, key))
                    where = f" (first at line {first.line})" if first else ""
                    self.errors.append(
                        ManifestError(f"duplicate key '{key}'{where}", _position(self.file, key_node.start_mark))
                    )
                    continue
                if id(key_node) not in explicit:
                    merged.add(key)
                self.source.keys[(*path, key)] = _position(self.file, key_node.start_mark)
                result[key] = self.convert(value_node, (*path, key), inner)
            return result
        if isinstance(node, yaml.SequenceNode):
            inner = active | {id(node)}
            return [self.convert(item, (*path, index), inner) for index, item in enumerate(node.value)]
        try:
            return self.loader.construct_object(node)
        except yaml.constructor.ConstructorError as exc:
            raise ManifestError(f"bad YAML value: {exc.problem}", _position(self.file, node.start_mark)) from None


# libyaml's parser (when PyYAML was built with it) composes the same nodes, with the same marks, about ten
# times faster than the pure-Python one: at 500 domains that was 0.6 s of a 1.5 s plan. Its error messages
# differ, so a stream it rejects is parsed again by the pure-Python loader, whose messages are the ones users
# see; so is text with characters PyYAML's reader refuses and libyaml might not.
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", None)


def load_yaml(text: str, file: str) -> tuple[list[YamlDocument], list[ManifestError]]:
    """Every document of a YAML stream, converted, with the errors found on the way."""
    if _FAST_LOADER is not None and not yaml.reader.Reader.NON_PRINTABLE.search(text):
        try:
            return _load_with(_FAST_LOADER, text, file, fast=True)
        except yaml.YAMLError:
            pass
    return _load_with(yaml.SafeLoader, text, file, fast=False)


def _load_with(loader_class: Any, text: str, file: str, fast: bool) -> tuple[list[YamlDocument], list[ManifestError]]:
    documents: list[YamlDocument] = []
    errors: list[ManifestError] = []
    loader: yaml.SafeLoader | None = None
    try:
        loader = loader_class(text)
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            converter = _Converter(file, loader)
            try:
                data = converter.convert(node, (), frozenset())
            except ManifestError as exc:
                errors.append(exc)
                continue
            errors.extend(converter.errors)
            documents.append(YamlDocument(data, converter.source))
    except yaml.MarkedYAMLError as exc:
        if fast:
            raise
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        errors.append(ManifestError(f"YAML syntax error: {problem}", _position(file, mark)))
    except yaml.YAMLError as exc:  # reader errors (bad characters) carry no mark
        if fast:
            raise
        errors.append(_reader_error(exc, text, file))
    except RecursionError:  # PyYAML's composer recurses per level, before the converter can count them
        mark = getattr(getattr(loader, "peek_event", lambda: None)(), "start_mark", None) if loader else None
        errors.append(ManifestError(f"YAML nested deeper than {MAX_DEPTH} levels", _position(file, mark)))
    finally:
        if loader is not None:
            loader.dispose()
    return documents, errors


def _reader_error(exc: yaml.YAMLError, text: str, file: str) -> ManifestError:
    """PyYAML's reader errors (a character YAML refuses) in one line, at the character's line and column."""
    offset = getattr(exc, "position", None)
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(offset, int):
        before = text[:offset]
        line, column = before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1
        character = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return ManifestError(f"YAML error: character #x{character:04x} is not allowed in YAML", Position(file, line, column))
    return ManifestError(f"YAML error: {' '.join(str(exc).split())}", Position(file, 1, 1))
