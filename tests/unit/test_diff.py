"""diff.compare, table-driven: every file in diff_cases/ is one case, this runner is generic.

A case is a YAML mapping:

* ``manifest`` -- manifest text (the resource under test plus whatever it references), loaded as project ``unit``;
* ``address`` -- the resource under test, e.g. ``domain.web``;
* ``live_xml`` -- its persistent (inactive) XML as libvirt prints it; ``active`` -- whether it runs;
  ``running_xml`` -- a running domain's live XML (defaults to ``live_xml`` when active);
* ``state`` / ``autostart`` -- what the libvirt API reports (domains: state defaults to running/stopped by
  ``active``; autostart defaults to false for domains, true otherwise); ``persistent: false`` -- a domain or
  network that only runs (undefined while it ran);
* volumes: ``live_pool`` (the pool the volume was found in) and ``live_volumes`` (``{pool, name, path}`` of
  other volumes on the host, so a backing file's path resolves like live.read_host does);
* ``expect`` -- the exact set of ``{path, effect}`` field changes; ``expect_pending`` -- the exact list of
  pending field names (default: none); ``expect_error`` -- compare must raise PlanError containing it;
* cloud-init seeds: ``live_xml`` is the seed volume's XML, ``live_seed`` what vmform's ledger records of its
  content (``user_data`` as text here; the runner keeps only its fingerprint, as the ledger does);
* ``xfail`` -- the case pins down a known library bug (strict: it must keep failing until fixed).
* three-way removals: a domain's or network's last-applied record is in its ``live_xml`` (``<vmform:applied>``
  inside the owner element); a pool's is ``live_applied``, its ledger entry's ``applied`` value.

The live values are built with the kinds' own XML bindings (live._read_bound), exactly as read_host does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmform.diff import LAST_APPLIED, LIST_KEYS, compare, is_duplicate_path
from vmform.errors import PlanError
from vmform.lastapplied import AppliedRecord, read_record
from vmform.live import LiveObject, _read_bound, _resolve_backing, domain_object, parse_xml, seed_object
from vmform.manifest.loader import load_manifests
from vmform.model import Manifests, Resource
from vmform.plan import FieldChange
from vmform.render.xml import render_resource, to_text
from vmform.schema.registry import KINDS
from vmform.schema.types import Effect
from vmform.sensitive import fingerprint, masked

CASES_DIR = Path(__file__).parent / "diff_cases"
CASE_FILES = sorted(CASES_DIR.glob("*.yaml"))
PROJECT = "unit"
CASE_KEYS = {
    "manifest", "address", "live_xml", "running_xml", "active", "state", "autostart", "live_pool", "live_volumes",
    "expect", "expect_pending", "expect_error", "xfail", "live_seed", "live_applied", "persistent",
}

# Every managed (compared) field of every kind must be changed by at least one case; see test_coverage.
COMPARED_FIELDS = {
    (kind.name, spec.name) for kind in KINDS.values() for spec in kind.fields if spec.compare and spec.name != "source"
}


@dataclass
class Case:
    path: Path
    data: dict[str, Any]
    expect: set[tuple[str, str]] = field(default_factory=set)


def read_case(path: Path) -> Case:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: a case is a mapping"
    unknown = set(data) - CASE_KEYS
    assert not unknown, f"{path.name}: unknown keys {sorted(unknown)}"
    for key in ("manifest", "address", "live_xml", "expect"):
        assert key in data, f"{path.name}: '{key}' is required"
    expect = set()
    for entry in data["expect"]:
        assert set(entry) == {"path", "effect"}, f"{path.name}: expect entries are {{path, effect}}: {entry}"
        assert entry["effect"] in {e.value for e in Effect}, f"{path.name}: bad effect {entry['effect']}"
        expect.add((entry["path"], entry["effect"]))
    assert len(expect) == len(data["expect"]), f"{path.name}: duplicate expect entries"
    assert not (data.get("expect_error") and expect), f"{path.name}: expect_error excludes field changes"
    return Case(path, data, expect)


def load(manifest: str, directory: Path) -> Manifests:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "manifest.yaml"
    path.write_text(manifest, encoding="utf-8")
    return load_manifests(PROJECT, [path], root=directory)


def live_object(resource: Resource, data: dict[str, Any]) -> LiveObject:
    """The LiveObject read_host would build from this XML and these API answers."""
    kind = resource.kind.name
    active = bool(data.get("active", False))
    root = parse_xml(data["live_xml"])
    values = _read_bound(kind, root)
    name = root.findtext("name") or resource.libvirt_name
    if kind == "domain":
        running_root = parse_xml(data.get("running_xml") or data["live_xml"]) if active else None
        obj = domain_object(name, root.findtext("uuid") or "", root, running_root,
                            data.get("state", "running" if active else "stopped"), bool(data.get("autostart", False)),
                            PROJECT, bool(data.get("persistent", True)))
        obj.address = resource.address
        return obj
    if kind in ("network", "pool"):
        values["autostart"] = bool(data.get("autostart", True))
        applied = read_record(root) if kind == "network" else AppliedRecord.from_entry(data.get("live_applied"))
        return LiveObject(kind, name, values, {"uuid": root.findtext("uuid")}, address=resource.address, active=active,
                          config_root=root, running_root=root if active else None, applied=applied,
                          persistent=bool(data.get("persistent", True)))
    if kind == "cloudinit":
        pool = data.get("live_pool") or resource.desired["pool"]
        volume = LiveObject("volume", name, {"pool": pool}, {"pool": pool, "path": root.findtext("target/path")},
                            address=resource.address, active=True)
        seed = dict(data["live_seed"])
        seed["user_data"] = fingerprint(seed.get("user_data"))
        return seed_object(volume, {"seed": seed})
    # volume: as live.read_volumes, then _resolve_backing across the host's volumes
    pool = data.get("live_pool") or resource.desired["pool"]
    values["pool"] = pool
    backing = root.find("backingStore/path")
    backing_format = root.find("backingStore/format")
    values["backing_path"] = backing.text if backing is not None else None
    values["backing_format"] = backing_format.get("type") if backing_format is not None else None
    obj = LiveObject(kind, name, values, {"pool": pool, "path": root.findtext("target/path")}, address=resource.address,
                     active=True)
    others = [
        LiveObject("volume", v["name"], {}, {"pool": v["pool"], "path": v["path"]}, active=True)
        for v in data.get("live_volumes") or []
    ]
    _resolve_backing([obj, *others])
    return obj


def run_case(case: Case, tmp_path: Path) -> None:
    data = case.data
    manifests = load(data["manifest"], tmp_path)
    assert data["address"] in manifests.resources, f"no {data['address']} in the manifest"
    resource = manifests.resources[data["address"]]
    live = live_object(resource, data)
    if data.get("expect_error"):
        with pytest.raises(PlanError) as info:
            compare(resource, live)
        assert data["expect_error"] in info.value.message
        return
    before_desired = copy.deepcopy(resource.desired)
    changes, forcing, pending = compare(resource, live)
    got = {(c.path, c.effect.value) for c in changes}
    assert len(got) == len(changes), f"duplicate field changes: {changes}"
    assert got == case.expect, (
        f"\n  unexpected: {sorted(got - case.expect)}\n  missing:    {sorted(case.expect - got)}\n  all: {changes}"
    )
    assert sorted(forcing) == sorted(p for p, e in got if e == "replace"), "forcing must list exactly the replaces"
    pending_names = sorted(p.split(" ", 1)[0] for p in pending)
    assert pending_names == sorted(data.get("expect_pending") or []), f"pending: {pending}"
    assert resource.desired == before_desired, "compare must not modify the desired values"
    # An existing domain is compared with the defaults recorded on it (pinned fields), not this vmform's.
    settled = resource.kind.settle(resource, live) if resource.kind.settle is not None else resource.desired
    for change in changes:
        check_change_values(resource, live, change, settled)


def check_change_values(resource: Resource, live: LiveObject, change: FieldChange,
                        settled: dict[str, Any] | None = None) -> None:
    """A change carries the desired value as 'after' and the live (config or running) value as 'before'."""
    all_desired = resource.desired if settled is None else settled
    if change.path in ("persistent", "active"):  # drift no field states: a transient or stopped object
        assert (change.before, change.after) == (False, True)
        assert change.display_before and change.display_after
        return
    if is_duplicate_path(change.path):  # a second device with a managed key: removed, by its address
        name, key = change.path.split("[", 1)[0], change.path.split("[", 1)[1].split("]", 1)[0]
        assert change.after is None and change.before is not None
        assert change.before[LIST_KEYS[(resource.kind.name, name)][0]] == key and change.before["address"]
        return
    if change.path == LAST_APPLIED:  # only vmform's record is rewritten: both sides are what it lists
        assert isinstance(change.before, list) and isinstance(change.after, list) and change.before != change.after
        return
    if change.path.startswith("xml."):
        wanted_value: Any = resource.desired.get("xml") or {}
        for step in change.path.split(".")[1:]:
            if not isinstance(wanted_value, dict) or step not in wanted_value:
                # A three-way removal: the manifest no longer states it; the host has it.
                assert change.before is not None and change.display_before, change
                return
            wanted_value = wanted_value[step]
        assert change.after == wanted_value
        assert change.display_after, f"{change.path}: empty display"
        return
    name, _, key = change.path.partition("[")
    if name not in all_desired:  # a three-way removal of a curated field: the host's value goes
        spec = resource.kind.spec(name)
        assert spec is not None and spec.removal is not None, change
        assert change.after is None and change.before == live.values.get(name) and change.before is not None
        return
    desired = all_desired[name]
    if key:
        key = key.rstrip("]")
        list_key = LIST_KEYS[(resource.kind.name, name)][0]
        wanted = next((item for item in desired if item[list_key] == key), None)
        assert change.after == wanted
        assert change.before is None or change.before.get(list_key) == key
    elif resource.kind.spec(name) is not None and resource.kind.spec(name).sensitive:  # type: ignore[union-attr]
        # Sensitive: the change carries fingerprints only, and shows them masked.
        assert change.after == fingerprint(desired) and change.before == fingerprint(live.values.get(name))
        assert change.display_after == masked(desired) and str(desired) not in change.display_after
    else:
        assert change.after == desired
        assert change.before in (live.values.get(name), live.running_values.get(name))
        assert change.before != change.after or live.running_values.get(name) != desired
    assert change.display_after, f"{change.path}: empty display"


def test_cases_are_collected() -> None:
    assert len(CASE_FILES) >= 60, "diff_cases/ went missing or the glob broke"


@pytest.mark.parametrize("path", CASE_FILES, ids=[p.stem for p in CASE_FILES])
def test_diff_case(path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    case = read_case(path)
    if case.data.get("xfail"):
        request.applymarker(pytest.mark.xfail(reason=case.data["xfail"], strict=True, raises=AssertionError))
    run_case(case, tmp_path)


def test_coverage_every_managed_field_changes_somewhere() -> None:
    """Each compared field of each kind is the subject of at least one passing case, in each effect it can have."""
    seen: set[tuple[str, str]] = set()
    effects: dict[tuple[str, str], set[str]] = {}
    errors: set[tuple[str, str]] = set()
    for path in CASE_FILES:
        case = read_case(path)
        if case.data.get("xfail"):
            continue
        kind = case.data["address"].split(".")[0]
        for field_path, effect in case.expect:
            name = field_path.split("[")[0].split(".")[0]
            seen.add((kind, name))
            effects.setdefault((kind, name), set()).add(effect)
        if case.data.get("expect_error"):
            errors.add((kind, case.data["address"]))
    assert COMPARED_FIELDS - seen == set()
    for name in ("description", "type", "arch", "machine", "vcpus", "max_vcpus", "memory", "max_memory", "boot",
                 "disks", "interfaces", "graphics", "serial_console"):
        assert {"live", "restart"} <= effects[("domain", name)] or name == "description", name
    assert errors, "no case expects a PlanError"


# --- the runner itself must be able to fail ----------------------------------------------------------

def _mutated(path: str, **changes: Any) -> Case:
    case = read_case(CASES_DIR / path)
    data = {**case.data, **changes}
    expect = {(e["path"], e["effect"]) for e in data["expect"]}
    return Case(case.path, data, expect)


def test_runner_fails_on_missing_extra_or_wrong_effect(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="missing"):
        run_case(_mutated("domain_nochange_running.yaml", expect=[{"path": "memory", "effect": "live"}]), tmp_path / "a")
    with pytest.raises(AssertionError, match="unexpected"):
        run_case(_mutated("domain_vcpus_grow_running.yaml", expect=[]), tmp_path / "b")
    with pytest.raises(AssertionError, match="unexpected"):
        run_case(_mutated("domain_vcpus_grow_running.yaml", expect=[{"path": "vcpus", "effect": "restart"}]),
                 tmp_path / "c")
    with pytest.raises(AssertionError, match="pending"):
        run_case(_mutated("domain_memory_balloon_lags.yaml", expect_pending=[]), tmp_path / "d")
    with pytest.raises(PlanError):  # an unexpected PlanError is not swallowed
        run_case(_mutated("volume_size_shrink.yaml", expect_error=None,
                          expect=[{"path": "size", "effect": "live"}]), tmp_path / "e")


def test_read_case_rejects_typos(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("manifest: x\naddress: domain.a\nlive_xml: <domain/>\nexpect: []\nexpected_pending: []\n")
    with pytest.raises(AssertionError, match="unknown keys"):
        read_case(path)


# --- render -> libvirt XML -> read back through the same bindings -----------------------------------------

RICH = """\
pools:
  images:
    path: /var/lib/vmform/images/
volumes:
  base: {pool: images, size: 10GiB}
  root: {pool: images, size: 20GiB, backing: base}
  data: {pool: images, format: raw, size: 1GiB}
networks:
  lan:
    mode: nat
    bridge: vmbr-lan
    ipv4: 10.40.0.1/24
    dhcp: {start: 10.40.0.100, end: 10.40.0.200}
    mtu: 9000
    domain: lan.test
  bare:
    mode: isolated
domains:
  web:
    description: "web <server> & 'friends'"
    type: qemu
    arch: x86_64
    machine: pc-q35-8.2
    vcpus: 2
    max_vcpus: 4
    memory: 1GiB
    max_memory: 2GiB
    boot: [network, hd]
    disks: [root, {volume: data, bus: sata, readonly: true}]
    interfaces: [lan, {bridge: br0, mac: "52:54:00:aa:bb:cc", model: e1000}]
    graphics: spice
    serial_console: false
  tiny: {}
"""


def rendered_values(resource: Resource) -> tuple[dict[str, Any], str]:
    kind = resource.kind.name
    root = render_resource(kind, resource.libvirt_name, resource.desired, PROJECT, resource.address,
                           backing_path="/var/lib/vmform/images/base")
    text = to_text(root)
    values = _read_bound(kind, parse_xml(text))
    if kind == "domain":
        values["description"] = values["description"] or ""  # as live.read_domain: no element is ""
    return values, text


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> Manifests:
    return load(RICH, tmp_path_factory.mktemp("rich"))


@pytest.mark.parametrize("address", ["domain.web", "domain.tiny", "network.lan", "network.bare", "pool.images",
                                     "volume.base", "volume.root", "volume.data"])
def test_render_read_round_trip(rich: Manifests, address: str) -> None:
    resource = rich.resources[address]
    values, text = rendered_values(resource)
    bound = [s.name for s in resource.kind.fields if s.binding is not None and s.compare]
    assert set(values) == set(bound)
    for name in bound:
        if name in resource.desired:
            assert values[name] == resource.desired[name], f"{address}.{name} in:\n{text}"
        else:
            # not managed (no default): vmform writes nothing libvirt would have to keep
            assert values[name] in (None, [], "isolated"), f"{address}.{name} rendered without being set"
    assert parse_xml(text).findtext("name") == resource.libvirt_name


@pytest.mark.parametrize("address", ["domain.web", "domain.tiny", "network.lan", "network.bare", "pool.images",
                                     "volume.root"])
def test_rendered_document_compares_clean(rich: Manifests, address: str) -> None:
    """What vmform rendered, read back as the live object, needs no change (stopped and running)."""
    resource = rich.resources[address]
    _, text = rendered_values(resource)
    data: dict[str, Any] = {"live_xml": text, "state": resource.desired.get("state"),
                            "autostart": resource.desired.get("autostart"),
                            "live_volumes": [{"pool": "images", "name": "base", "path": "/var/lib/vmform/images/base"}]}
    for active in (False, True):
        if resource.kind.name == "domain":
            data["state"] = "running" if active else "stopped"
            resource.desired["state"] = data["state"]
        live = live_object(resource, {**data, "active": active})
        changes, forcing, pending = compare(resource, live)
        # A network or pool that does not run is started: the one change an inactive one needs.
        started = ["active"] if not active and resource.kind.name in ("network", "pool") else []
        assert ([c.path for c in changes], forcing, pending) == (started, [], []), text


def test_round_trip_detects_a_lossy_binding(rich: Manifests) -> None:
    """The round-trip check is able to fail: a document missing a field reads back differently."""
    resource = rich.resources["domain.web"]
    _, text = rendered_values(resource)
    root = parse_xml(text)
    root.find("os").remove(root.find("os/boot"))
    values = _read_bound("domain", root)
    assert values["boot"] != resource.desired["boot"]
