"""docs/MANIFEST.md's field tables, generated from the field declarations so they cannot drift.

Run ``python -m vmform.docs`` to rewrite the generated part of docs/MANIFEST.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vmform.diff import display
from vmform.schema.kind import META_FIELDS
from vmform.schema.registry import KINDS
from vmform.schema.types import FieldSpec, ListOf, Obj

BEGIN = "<!-- BEGIN GENERATED FIELD TABLES (python -m vmform.docs) -->"
END = "<!-- END GENERATED FIELD TABLES -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(specs: tuple[FieldSpec, ...], prefix: str = "") -> list[str]:
    rows = []
    for spec in specs:
        default = "required" if spec.required else (display(spec, spec.default) if spec.default is not None else "libvirt's")
        if spec.default_doc:
            default = spec.default_doc
        if spec.pinned:
            default += " (kept per domain: see 'Defaults')"
        if not prefix and spec.compare and spec.removal is not None:
            default += f"; a removed line: {spec.removal.doc} (see 'Removing a line')"
        elif not prefix and spec.compare and spec.default is None and spec.binding is not None and not spec.pinned \
                and not spec.required and spec.name not in ("xml", "xslt") and not spec.default_doc:
            default += "; a removed line leaves the host's value as it is"
        effect = spec.effect.value + (f" ({spec.effect_doc})" if spec.effect_doc else "")
        if not spec.compare:
            effect = "—"
        elif prefix:
            effect = ""  # a part of a value changes the way the whole value does
        xml = f"`{spec.xml}`" if spec.xml else ("API" if spec.binding is None and spec.compare and not prefix else "")
        rows.append(f"| `{prefix}{spec.name}` | {_cell(spec.type.describe())} | {_cell(default)} | {_cell(effect)} | {_cell(xml)} | {_cell(spec.doc)} |")
        inner = spec.type.item if isinstance(spec.type, ListOf) else spec.type
        if isinstance(inner, Obj):
            rows.extend(_rows(inner.fields, f"{prefix}{spec.name}[]." if isinstance(spec.type, ListOf) else f"{prefix}{spec.name}."))
    return rows


def field_tables() -> str:
    parts = [BEGIN, ""]
    header = ["| field | type | default | how a change takes effect | libvirt XML | meaning |", "|---|---|---|---|---|---|"]
    for kind in KINDS.values():
        parts.append(f"### {kind.section} — {kind.doc}")
        parts.append("")
        parts.extend(header)
        parts.extend(_rows(kind.fields))
        parts.append("")
    parts.append("### Keys every resource accepts")
    parts.append("")
    parts.extend(header)
    parts.extend(_rows(META_FIELDS))
    parts.append("")
    parts.append(END)
    return "\n".join(parts)


def update(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + field_tables() + text[end:]
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs" / "MANIFEST.md"
    print(("updated " if update(target) else "up to date: ") + str(target))
