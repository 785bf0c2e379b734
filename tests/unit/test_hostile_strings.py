"""Hostile text in every string field the declarations have: the manifest either fails with file:line
errors, or it renders to XML that libvirt's schema accepts and whose element structure is the same as
with a plain value: no value ever becomes XML structure. test_random_manifests.py goes further: whole random
manifests over every kind and field, these strings among their values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from vmform.errors import ManifestErrors, VmformError
from vmform.manifest.loader import load_manifests
from vmform.manifest.variables import VariableInputs
from vmform.render.validate import validate
from vmform.render.xml import render_resource
from vmform.schema.registry import KINDS
from vmform.schema.types import ListOf, Obj, Str

BASE = {
    "pools": {"p": {"path": "/var/lib/vmform/p"}},
    "volumes": {"v": {"pool": "p", "size": "1GiB"}},
    "networks": {"n": {"mode": "isolated", "ipv4": "10.9.0.1/24"}},
    "domains": {"d": {"memory": "64MiB", "disks": ["v"], "interfaces": ["n"]}},
}
HOSTILE = st.one_of(
    st.sampled_from(["a'/><qemu:commandline>", "]]><x/>", "<!--", "&amp;&lt;", "\"'><b>", "{{ 1 }}", "%s%n",
                     "../../etc/passwd", "a\nb", " lead", "trail ", "ü中\u202e", "x" * 300, "/etc/shadow", "/dev/sda",
                     "{% for i in range(9) %}{% endfor %}", "{{ '/etc/' ~ 'shadow' }}", "/var/lib/vmform/p/../../../etc",
                     "/var/lib/vmform/p/other", "{#", "\\x00"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
)


def string_fields() -> list[tuple[str, tuple[str, ...]]]:
    """(kind, path) of every Str field, top level or inside a list item / mapping (first level)."""
    found = []
    for kind in KINDS.values():
        if kind.name == "cloudinit":
            continue  # its strings are seed file contents, not XML (tests/unit/test_cloudinit.py)
        for spec in kind.fields:
            if isinstance(spec.type, Str):
                found.append((kind.name, (spec.name,)))
            inner = spec.type.item if isinstance(spec.type, ListOf) else spec.type
            if isinstance(inner, Obj):
                for sub in inner.fields:
                    if isinstance(sub.type, Str):
                        found.append((kind.name, (spec.name, sub.name)))
    return found


FIELDS = string_fields()


def structure(root: Any) -> list[str]:
    return sorted(etree.ElementTree(root).getpath(node) for node in root.iter() if isinstance(node.tag, str))


def manifest_with(kind: str, path: tuple[str, ...], value: str) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    section, key = KINDS[kind].section, {"pool": "p", "volume": "v", "network": "n", "domain": "d"}[kind]
    target = data[section][key]
    if len(path) == 1:
        target[path[0]] = value
    else:
        spec = KINDS[kind].spec(path[0])
        assert spec is not None
        if isinstance(spec.type, ListOf):
            items = target.get(path[0]) or [{}]
            item = items[0] if isinstance(items[0], dict) else {spec.type.item.shorthand: items[0]}  # type: ignore[attr-defined]
            item[path[1]] = value
            target[path[0]] = [item]
        else:
            target[path[0]] = {path[1]: value}
    return data


def render_all(tmp_path: Path, data: dict[str, Any]) -> dict[str, Any]:
    file = tmp_path / "m.yaml"
    file.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    manifests = load_manifests("hostile", [file], tmp_path, {}, VariableInputs(environ={}))
    roots = {}
    for resource in manifests.resources.values():
        backing = "/b/p" if resource.desired.get("backing") else None
        root = render_resource(resource.kind.name, resource.libvirt_name, resource.desired, "hostile",
                               resource.address, backing)
        validate(resource.kind.name, root, resource.address)
        roots[resource.address] = root
    return roots


def test_every_string_field_is_covered() -> None:
    assert len(FIELDS) >= 10, FIELDS


@pytest.mark.parametrize(("kind", "path"), FIELDS, ids=[f"{k}.{'.'.join(p)}" for k, p in FIELDS])
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=HOSTILE)
def test_hostile_strings_never_become_structure(tmp_path: Path, kind: str, path: tuple[str, ...], value: str) -> None:
    try:
        baseline = render_all(tmp_path, manifest_with(kind, path, "abc"))  # the same field, a plain value
    except VmformError:
        baseline = {}
    try:
        roots = render_all(tmp_path, manifest_with(kind, path, value))
    except ManifestErrors as exc:
        assert exc.errors and all(error.position is not None for error in exc.errors), exc
        return
    except VmformError as exc:  # e.g. the rendered XML refused by libvirt's schema: one clear message
        assert "\n" not in str(exc) and str(exc)
        return
    from vmform.schema import optins

    resources = load_manifests("hostile", [tmp_path / "m.yaml"], tmp_path, {}, VariableInputs(environ={})).resources
    scope = optins.scope_of(resources.values())
    for address, root in roots.items():
        assert not root.findall(".//{http://libvirt.org/schemas/domain/qemu/1.0}commandline")
        kind = address.split(".", 1)[0]
        # Nothing in the manifest opts in: no host path outside its pools may be in what would be sent.
        assert not optins.findings(kind, root, scope), (address, value, optins.findings(kind, root, scope))
        if address in baseline:
            assert structure(root) == structure(baseline[address]), (address, value)
