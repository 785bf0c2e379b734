"""The lossless generic mapping (vmform/schema/generic.py) over the round-trip corpus as well: every
virt-install domain, formatdomain-style domain, network and pool of tests/corpus (placeholders filled in
as the integration test fills them) validates against libvirt's RNG schema and survives
XML → data → YAML → data → XML unchanged. Offline: no daemon."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree

from vmform.schema import generic

SCHEMAS = "/usr/share/libvirt/schemas"
pytestmark = pytest.mark.skipif(not os.path.exists(f"{SCHEMAS}/domain.rng"), reason="libvirt's RNG schemas are not installed")

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
FOLDERS = {"domains": "domain", "virt-install": "domain", "doc-domains": "domain", "networks": "network", "pools": "pool"}
RNG_FILES = {"domain": "domain.rng", "network": "network.rng", "pool": "storagepool.rng"}
FILES = sorted((kind, path) for folder, kind in FOLDERS.items() for path in (CORPUS / folder).glob("*.xml"))
PLACEHOLDERS = {"NAME_PLACEHOLDER": "vmftest-000000-case", "DISKDIR_PLACEHOLDER": "/var/lib/vmform/t-vmftest-000000",
                "NETWORK_PLACEHOLDER": "vmftest-000000-net", "POOLDIR_PLACEHOLDER": "/var/lib/vmform/t-pool",
                "BRIDGE_PLACEHOLDER": "vmft00000000"}
_rng: dict[str, Any] = {}


def rng(kind: str) -> Any:
    if kind not in _rng:
        _rng[kind] = etree.RelaxNG(etree.parse(f"{SCHEMAS}/{RNG_FILES[kind]}"))
    return _rng[kind]


def document(path: Path) -> Any:
    text = path.read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    parser = etree.XMLParser(remove_comments=True, resolve_entities=False, no_network=True)
    return etree.fromstring(text.encode(), parser)


def canon(element: Any) -> tuple[Any, ...]:
    text = element.text if element.text is not None and element.text.strip() else None
    return (element.tag, sorted(element.attrib.items()), text, [canon(c) for c in element if isinstance(c.tag, str)])


def test_corpus_folders_are_there() -> None:
    assert len(FILES) >= 140


@pytest.mark.parametrize(("kind", "path"), FILES, ids=[f"{p.parent.name}/{p.stem}" for _, p in FILES])
def test_generic_mapping_is_lossless(kind: str, path: Path) -> None:
    original = document(path)
    assert rng(kind).validate(original), rng(kind).error_log.last_error
    data = generic.element_to_data(original, kind)
    loaded = yaml.safe_load(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    assert loaded == data
    rebuilt = generic.data_to_element(loaded, kind)
    assert canon(rebuilt) == canon(original)
    assert rng(kind).validate(rebuilt), rng(kind).error_log.last_error
