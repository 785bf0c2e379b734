"""docs/MANIFEST.md's field tables are generated from the declarations; they must be current."""

from pathlib import Path

from vmform.docs import BEGIN, END, field_tables
from vmform.schema.registry import KINDS

MANIFEST_DOC = Path(__file__).resolve().parents[2] / "docs" / "MANIFEST.md"


def test_manifest_doc_tables_are_current() -> None:
    text = MANIFEST_DOC.read_text(encoding="utf-8")
    committed = text[text.index(BEGIN): text.index(END) + len(END)]
    assert committed == field_tables(), "docs/MANIFEST.md is stale: run python -m vmform.docs"


def test_every_field_is_documented_with_its_effect() -> None:
    tables = field_tables()
    for kind in KINDS.values():
        for spec in kind.fields:
            assert f"| `{spec.name}` |" in tables
            assert spec.doc
