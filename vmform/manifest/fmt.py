"""vmform fmt: manifests in one canonical layout, comments kept (ruamel.yaml round-trip).

The layout (docs/MANIFEST.md, "Formatting"):

- sections in the order networks, pools, volumes, domains; resources keep the order they were written in;
- a resource's keys in the order its fields are declared (the order of the field tables), then ``name``,
  ``depends_on``, ``lifecycle``, ``restart_policy``; the keys of nested mappings (a disk, an interface, …)
  in their declared order too; keys vmform does not know stay, after the known ones;
- 2-space indentation, list items indented under their key; flow style (``{a: 1}``) and quoting kept.

Only the order of keys and the whitespace change: the values, and so the meaning, never do.
"""

from __future__ import annotations

import difflib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmform.errors import ManifestError, ManifestErrors, Position
from vmform.schema.kind import META_FIELDS
from vmform.schema.registry import KINDS, SECTIONS
from vmform.schema.types import FieldSpec, ListOf, Obj, ValueType


def _yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # never re-wrap a long string
    yaml.preserve_quotes = True
    yaml.explicit_start = False
    yaml.brace_single_entry_mapping_in_flow_sequence = True  # keep [{volume: x}], not [volume: x]
    return yaml


def _reorder(mapping: Any, order: list[str]) -> None:
    """Known keys first, in declared order; unknown keys after them, in their own order."""
    from ruamel.yaml.comments import CommentedMap

    if not isinstance(mapping, CommentedMap):
        return
    keys = list(mapping.keys())
    wanted = [k for k in order if k in mapping] + [k for k in keys if k not in order]
    if wanted == keys:
        return
    for key in wanted:
        mapping.move_to_end(key)


def _format_value(value_type: ValueType, value: Any) -> None:
    if isinstance(value_type, Obj) and isinstance(value, dict):
        _format_fields(value_type.fields, value)
    elif isinstance(value_type, ListOf) and isinstance(value, list):
        for item in value:
            _format_value(value_type.item, item)


def _format_fields(fields: tuple[FieldSpec, ...], mapping: dict[str, Any]) -> None:
    _reorder(mapping, [spec.name for spec in fields])
    for spec in fields:
        if spec.name in mapping:
            _format_value(spec.type, mapping[spec.name])


def format_document(document: Any) -> None:
    if not isinstance(document, dict):
        return
    _reorder(document, ["variables", *(kind.section for kind in KINDS.values()), "modules", "outputs"])
    for section, body in document.items():
        kind = SECTIONS.get(section)
        if kind is None or not isinstance(body, dict):
            continue
        for resource in body.values():
            if isinstance(resource, dict):
                _format_fields(kind.fields + META_FIELDS, resource)


def format_text(text: str, shown: str = "<manifest>") -> str:
    """The canonical form of a manifest file's text (every YAML document in it)."""
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    yaml = _yaml()
    try:
        documents = list(yaml.load_all(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        position = Position(shown, mark.line + 1, mark.column + 1) if mark is not None else Position(shown, 1, 1)
        raise ManifestErrors([ManifestError(f"cannot format: {exc.problem}", position)]) from None
    except YAMLError as exc:
        raise ManifestErrors([ManifestError(f"cannot format: {exc}", Position(shown, 1, 1))]) from None
    if not documents:
        return text
    for document in documents:
        format_document(document)
    stream = io.StringIO()
    if len(documents) == 1:
        yaml.dump(documents[0], stream)
    else:
        yaml.dump_all(documents, stream)
    return stream.getvalue()


@dataclass(frozen=True)
class FormatResult:
    path: Path
    shown: str
    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def diff(self) -> str:
        return "".join(difflib.unified_diff(self.before.splitlines(keepends=True), self.after.splitlines(keepends=True),
                                            f"a/{self.shown}", f"b/{self.shown}"))


def format_files(files: list[Path], write: bool = True, root: Path | None = None) -> list[FormatResult]:
    """Format each file (rewriting those that change when ``write``); errors of all files together. Paths
    in messages are relative to ``root`` (the project's), as they appear in the repository."""
    results: list[FormatResult] = []
    errors: list[ManifestError] = []
    for path in files:
        shown = os.path.relpath(path, root) if root is not None else os.path.relpath(path)
        try:
            before = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(ManifestError(f"cannot read manifest: {exc}", Position(shown, 1, 1)))
            continue
        try:
            after = format_text(before, shown)
        except ManifestErrors as exc:
            errors.extend(exc.errors)
            continue
        results.append(FormatResult(path, shown, before, after))
    if errors:
        raise ManifestErrors(errors)
    if write:
        for result in results:
            if result.changed:
                result.path.write_text(result.after, encoding="utf-8")
    return results
