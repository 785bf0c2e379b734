"""diff.make_plan's host-aware destruction decisions, table-driven: every file in plan_cases/ is one case.

A case is a YAML mapping:

* ``before`` -- manifest text of what the project made earlier: each resource is on the host as vmform renders it,
  owned by the project (pools and volumes in the ledger; a ``source:`` volume with the digest of its image then);
* ``manifest`` -- the manifests the plan is made from (``destroy: true``: none, as ``vmform destroy`` plans);
* ``running`` -- the domains of ``before`` that run (their live XML is what ``before`` renders);
* ``defined_as_manifest`` -- domains whose persistent definition already is what ``manifest`` renders (the running
  guest kept the old one: an unreleased hot-unplug);
* ``foreign`` -- objects on the host the project does not own: ``{kind: domain, xml, running}`` or
  ``{kind: volume, pool, xml}``;
* ``files`` -- files to create next to the manifest (source images), path -> text;
* ``expect_changes`` -- address -> plan symbol (+ ~ -/+ +/- -), exactly the plan's changes;
* ``expect_depends`` -- address -> addresses its change waits for (at least these);
* ``expect_waiting`` -- the addresses in the plan's ``waiting`` (exactly);
* ``expect_notes`` -- texts each found in one of the plan's notes;
* ``expect_overlays`` -- address -> the overlay addresses its replace deletes first (identity.overlays);
* ``expect_error`` -- make_plan raises exactly one PlanError, containing this text.

The host's uses (domain disks, backing files) come from the same parsing live.read_uses does (live.domain_uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import yaml

from vmform.diff import PlanOptions, make_plan
from vmform.errors import PlanErrors
from vmform.graph import build_graph, creation_order
from vmform.live import LiveObject, LiveState, _read_bound, _resolve_backing, domain_object, parse_xml
from vmform.manifest.loader import load_manifests
from vmform.model import Manifests, Resource
from vmform.ownership import Ledger
from vmform.plan import Plan
from vmform.render.xml import render_resource, to_text

CASES_DIR = Path(__file__).parent / "plan_cases"
CASE_FILES = sorted(CASES_DIR.glob("*.yaml"))
PROJECT = "unit"
CASE_KEYS = {"before", "manifest", "destroy", "running", "defined_as_manifest", "foreign", "files", "expect_changes",
             "expect_depends", "expect_waiting", "expect_notes", "expect_overlays", "expect_error"}


def _load(text: str, directory: Path, files: dict[str, str]) -> Manifests:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(content)
    path = directory / "manifest.yaml"
    path.write_text(text, encoding="utf-8")
    return load_manifests(PROJECT, [path], root=directory)


def _pool_paths(manifests: Manifests) -> dict[str, str]:
    return {r.libvirt_name: str(r.desired["path"]).rstrip("/") for r in manifests.of_kind("pool")}


def _rendered(resource: Resource, pools: dict[str, str]) -> str:
    backing = resource.desired.get("backing") if resource.kind.name == "volume" else None
    backing_path = f"{pools[backing['pool']]}/{backing['volume']}" if backing else None
    return to_text(render_resource(resource.kind.name, resource.libvirt_name, resource.desired, PROJECT,
                                   resource.address, backing_path))


def _volume_object(xml: str, pool: str, pool_path: str, address: str | None) -> LiveObject:
    """As live.read_volumes builds it (libvirt adds target/path; rendered XML has none)."""
    root = parse_xml(xml)
    name = root.findtext("name") or ""
    values = _read_bound("volume", root)
    values["pool"] = pool
    backing = root.find("backingStore/path")
    values["backing_path"] = backing.text if backing is not None else None
    backing_format = root.find("backingStore/format")
    values["backing_format"] = backing_format.get("type") if backing_format is not None else None
    path = root.findtext("target/path") or f"{pool_path}/{name}"
    return LiveObject("volume", name, values, {"pool": pool, "path": path}, address=address, active=True)


def host_state(case: dict[str, Any], before: Manifests, after: Manifests | None) -> LiveState:
    pools = {**_pool_paths(before), **(_pool_paths(after) if after is not None else {})}
    ledger = Ledger(PROJECT)
    objects: list[LiveObject] = []
    running = set(case.get("running") or [])
    as_manifest = set(case.get("defined_as_manifest") or [])
    for resource in before.resources.values():
        kind = resource.kind.name
        text = _rendered(resource, pools)
        if kind == "domain":
            config_text = _rendered(after.resources[resource.address], pools) if resource.address in as_manifest \
                and after is not None else text
            active = resource.address in running
            obj = domain_object(resource.libvirt_name, f"uuid-{resource.address}", parse_xml(config_text),
                                parse_xml(text) if active else None, "running" if active else "stopped", False,
                                PROJECT)
            assert obj.address == resource.address
        elif kind == "pool":
            root = parse_xml(text)
            values = _read_bound("pool", root)
            values["autostart"] = True
            uuid = f"uuid-{resource.address}"
            obj = LiveObject("pool", resource.libvirt_name, values, {"uuid": uuid}, address=resource.address,
                             active=True, config_root=root)
            ledger.record("pool", resource.address, {"name": resource.libvirt_name, "uuid": uuid})
        elif kind == "volume":
            pool = resource.desired["pool"]
            obj = _volume_object(text, pool, pools[pool], resource.address)
            entry: dict[str, Any] = {"pool": pool, "name": resource.libvirt_name}
            if resource.desired.get("source_sha256"):
                entry["source_sha256"] = resource.desired["source_sha256"]
                obj.values["source_sha256"] = entry["source_sha256"]
            ledger.record("volume", resource.address, entry)
        else:
            raise AssertionError(f"plan cases do not build {kind} objects")
        objects.append(obj)
    for number, item in enumerate(case.get("foreign") or []):
        if item["kind"] == "domain":
            root = parse_xml(item["xml"])
            active = bool(item.get("running"))
            objects.append(domain_object(root.findtext("name") or "", f"uuid-foreign-{number}", root,
                                         root if active else None, "running" if active else "stopped", False, PROJECT))
        else:
            objects.append(_volume_object(item["xml"], item["pool"], pools.get(item["pool"], f"/{item['pool']}"), None))
    _resolve_backing(objects)
    return LiveState("test:///default", objects, ledger)


def plan_case(path: Path, tmp_path: Path) -> tuple[dict[str, Any], Plan | PlanErrors]:
    case = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown = set(case) - CASE_KEYS
    assert not unknown, f"{path.name}: unknown keys {sorted(unknown)}"
    files = case.get("files") or {}
    before = _load(case["before"], tmp_path / "before", files)
    after = None if case.get("destroy") else _load(case["manifest"], tmp_path / "after", files)
    live = host_state(case, before, after)
    try:
        if after is None:
            return case, make_plan(Manifests(PROJECT), nx.DiGraph(), live, [], PlanOptions())
        graph = build_graph(after)
        return case, make_plan(after, graph, live, creation_order(graph))
    except PlanErrors as exc:
        return case, exc


def test_cases_are_collected() -> None:
    assert len(CASE_FILES) >= 8, "plan_cases/ went missing or the glob broke"


@pytest.mark.parametrize("path", CASE_FILES, ids=[p.stem for p in CASE_FILES])
def test_plan_case(path: Path, tmp_path: Path) -> None:
    case, result = plan_case(path, tmp_path)
    if case.get("expect_error"):
        assert isinstance(result, PlanErrors), f"expected an error, got the plan {result}"
        messages = [str(e) for e in result.errors]
        assert len(messages) == 1 and case["expect_error"] in messages[0], messages
        return
    assert isinstance(result, Plan), f"unexpected errors: {[str(e) for e in result.errors]}"
    plan = result
    got = {c.address: c.action.value for c in plan.changes}
    assert got == case.get("expect_changes", {}), f"changes: {got}\nnotes: {plan.notes}"
    by_address = {c.address: c for c in plan.changes}
    for address, deps in (case.get("expect_depends") or {}).items():
        assert set(deps) <= set(by_address[address].depends_on), by_address[address].depends_on
    assert set(plan.waiting) == set(case.get("expect_waiting") or []), plan.waiting
    for text in case.get("expect_notes") or []:
        assert any(text in note for note in plan.notes), f"no note has {text!r}: {plan.notes}"
    for address, overlays in (case.get("expect_overlays") or {}).items():
        found = sorted(o["address"] for o in by_address[address].identity.get("overlays") or [])
        assert found == sorted(overlays), found
