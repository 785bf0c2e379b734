"""The xml: section's comparison and overlap rules (vmform/schema/extra_xml.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmform.errors import ManifestErrors
from vmform.model import Manifests
from vmform.schema import extra_xml
from vmform.schema.domain import FIELDS as DOMAIN_FIELDS

Load = Callable[[dict[str, str]], Manifests]


def spec(name: str) -> Any:
    return next(s for s in DOMAIN_FIELDS if s.name == name)


@pytest.mark.parametrize(("field_name", "expected"), [
    ("disks", [("devices", "disk")]),
    ("arch", [("os", "type", "@arch")]),
    ("type", [("@type",)]),
    ("max_vcpus", [("vcpu", "_text")]),
    ("vcpus", [("vcpu", "@current")]),
    ("max_memory", [("memory", "_text"), ("memory", "@unit")]),
])
def test_regions_come_from_the_declarations(field_name: str, expected: list[tuple[str, ...]]) -> None:
    assert extra_xml.regions(spec(field_name), "domain") == expected


@pytest.mark.parametrize(("desired", "live", "changed"), [
    # libvirt's additions around stated values are not changes
    ({"on_crash": "restart"}, {"on_crash": "restart", "on_reboot": "restart"}, []),
    ({"devices": {"watchdog": {"model": "i6300esb"}}},
     {"devices": {"watchdog": {"model": "i6300esb", "action": "reset", "address": {"type": "pci"}}}}, []),
    # a list matches a subsequence of the live list, in order
    ({"devices": {"controller": [{"type": "usb", "model": "qemu-xhci"}]}},
     {"devices": {"controller": [{"type": "pci", "model": "pci-root"}, {"type": "usb", "model": "qemu-xhci", "index": "0"}]}},
     []),
    ({"cpu": {"feature": [{"name": "b"}, {"name": "a"}]}},
     {"cpu": {"feature": [{"name": "a"}, {"name": "b"}]}}, [("cpu", "feature")]),
    # amounts compare in bytes, whatever the unit
    ({"memoryBacking": {"hugepages": {"page": [{"size": "2", "unit": "MiB"}]}}},
     {"memoryBacking": {"hugepages": {"page": [{"size": "2048", "unit": "KiB"}]}}}, []),
    ({"memory": {"_text": "1", "unit": "GiB"}}, {"memory": {"_text": "1048576", "unit": "KiB"}}, []),
    ({"memory": {"_text": "2", "unit": "GiB"}}, {"memory": {"_text": "1048576", "unit": "KiB"}}, [("memory",)]),
    # MACs and UUIDs are printed lower-case
    ({"devices": {"interface": [{"mac": {"address": "52:54:00:AA:BB:CC"}}]}},
     {"devices": {"interface": [{"mac": {"address": "52:54:00:aa:bb:cc"}, "type": "network"}]}}, []),
    # a difference is reported at the deepest mapping that holds it
    ({"os": {"bootmenu": {"enable": "yes", "timeout": "500"}}}, {"os": {"bootmenu": {"enable": "yes"}}},
     [("os", "bootmenu", "timeout")]),
    ({"on_crash": "restart"}, {}, [("on_crash",)]),
    # values libvirt drops at define are not differences
    ({"os": {"bootmenu": {"enable": "no", "timeout": "0"}}}, {"os": {"bootmenu": {"enable": "no"}}}, []),
    ({"memoryBacking": {"nosharepages": {}}}, {"memoryBacking": {"nosharepages": ""}}, []),
])
def test_changes(desired: dict[str, Any], live: dict[str, Any], changed: list[tuple[str, ...]]) -> None:
    assert [path for path, _, _ in extra_xml.changes(desired, live)] == changed


def test_defaults_yield_and_written_fields_stay(load_files: Load) -> None:
    manifests = load_files({"m.yaml": (
        "domains:\n"
        "  db:\n    xml:\n      memory: {unit: MiB, _text: 64}\n      os: {boot: [{dev: network}]}\n      vcpu: 2\n"
        "  web:\n    vcpus: 2\n    memory: 64MiB\n    xml: {on_crash: restart, vcpu: {placement: static}}\n"
    )})
    db = manifests.resources["domain.db"].desired
    for yielded in ("max_memory", "memory", "boot", "max_vcpus", "vcpus"):
        assert yielded not in db, yielded
    assert db["disks"] == [] and db["type"] == "kvm"
    web = manifests.resources["domain.web"].desired
    assert web["vcpus"] == 2 and web["max_vcpus"] == 2 and web["memory"] == 64 * 1024**2


def test_every_curated_field_writes_only_where_its_declaration_says(tmp_path: Path) -> None:
    """The overlap rules and import trust each field's ``xml`` declaration: check it against what the binding
    really writes, for every value the diff cases use."""
    from lxml import etree

    from vmform.manifest.loader import load_manifests
    from vmform.schema import generic

    checked: set[tuple[str, str]] = set()
    outside: set[tuple[str, str, tuple[str, ...]]] = set()
    for number, case in enumerate(sorted((Path(__file__).parent / "diff_cases").glob("*.yaml"))):
        manifest = tmp_path / f"m{number}.yaml"
        manifest.write_text(yaml.safe_load(case.read_text())["manifest"])
        try:
            manifests = load_manifests("unit", [manifest], tmp_path)
        except ManifestErrors:
            continue  # cases about load errors
        for resource in manifests.resources.values():
            kind = resource.kind.name
            if kind not in ("domain", "network"):
                continue
            for field_spec in resource.kind.fields:
                if field_spec.binding is None or field_spec.name == "xml" or field_spec.name not in resource.desired:
                    continue
                root = etree.Element(kind)
                field_spec.binding.write(root, resource.desired[field_spec.name])
                written = generic.element_to_data(root, kind)
                checked.add((kind, field_spec.name))
                for path in extra_xml.owned_paths(written, kind):
                    if not any(extra_xml.overlap(path, region) for region in extra_xml.regions(field_spec, kind)):
                        outside.add((kind, field_spec.name, path))
    assert not outside, sorted(outside)
    assert len(checked) >= 25, sorted(checked)


@pytest.mark.parametrize("sheet", [
    '<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">'
    '<xsl:include href="file:///etc/passwd"/></xsl:stylesheet>',
    '<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">'
    '<xsl:import href="file:///tmp/any.xsl"/></xsl:stylesheet>',
])
def test_stylesheets_cannot_read_files(load_files: Load, sheet: str) -> None:
    with pytest.raises(ManifestErrors) as info:
        load_files({"m.yaml": f"domains:\n  web:\n    xslt: '{sheet}'\n"})
    assert "is refused: a stylesheet must be self-contained" in str(info.value)


def test_stylesheet_functions_cannot_read_files(tmp_path: Path) -> None:
    from lxml import etree

    from vmform.schema.types import FieldError
    from vmform.schema.xslt import transform

    secret = tmp_path / "secret.xml"
    secret.write_text("<secret>s3cret</secret>")
    sheet = ('<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform"><xsl:template '
             f'match="/"><domain><xsl:copy-of select="document(\'{secret}\')"/></domain></xsl:template></xsl:stylesheet>')
    with pytest.raises(FieldError, match="denied"):
        transform(sheet, etree.fromstring("<domain/>"))
