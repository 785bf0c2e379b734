"""The core issue, end to end on the real daemon: apply, converge, change, prune, destroy, refuse, isolate."""

from __future__ import annotations

from typing import Any

import pytest

MANIFEST = """
networks:
  PFX-lan:
    mode: isolated
    bridge: BRPa
    ipv4: SUBNET.1/24
    dhcp: {start: SUBNET.100, end: SUBNET.200}
  PFX-back:
    mode: isolated
    bridge: BRPb
pools:
  PFX-pool: {type: dir, path: POOLDIR}
volumes:
  PFX-base: {pool: PFX-pool, size: 64MiB}
  PFX-web-root: {pool: PFX-pool, size: 128MiB, backing: PFX-base}
  PFX-db-root: {pool: PFX-pool, size: 64MiB, format: raw}
domains:
  PFX-web:
    description: web frontend
    type: qemu
    vcpus: VCPUS
    max_vcpus: 2
    memory: MEMORY
    max_memory: 128MiB
    disks: [{volume: PFX-web-root}]
    interfaces: INTERFACES
    state: running
    autostart: true
  PFX-db:
    type: qemu
    memory: 32MiB
    disks: [PFX-db-root]
    state: stopped
"""


def manifest(project: Any, vcpus: int = 1, memory: str = "64MiB",
             interfaces: str = '[{network: PFX-lan, mac: "52:54:00:aa:00:01"}]', with_db: bool = True) -> str:
    text = MANIFEST.replace("POOLDIR", str(project.pool_dir)).replace("SUBNET", project.subnet).replace("VCPUS", str(vcpus))
    text = text.replace("MEMORY", memory).replace("INTERFACES", interfaces)
    if not with_db:
        text = text.split("  PFX-db:\n")[0]
        text = text.replace("  PFX-db-root: {pool: PFX-pool, size: 64MiB, format: raw}\n", "")
    return text


def changed_fields(plan: dict[str, Any]) -> dict[str, set[str]]:
    return {c["address"]: {f["path"] for f in c["fields"]} for c in plan["changes"]}


def test_apply_converge_change_prune_destroy(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(manifest(project))
    first = project.plan_json()
    assert first["summary"] == {"add": 8, "change": 0, "destroy": 0}

    project.apply()
    again = project.run("plan", check=True)
    assert "No changes." in again.stdout
    web = conn.lookupByName(f"{p}-web")
    assert web.isActive() and web.autostart()
    assert not conn.lookupByName(f"{p}-db").isActive()
    assert conn.storagePoolLookupByName(f"{p}-pool").storageVolLookupByName(f"{p}-web-root").info()[1] == 128 * 1024**2

    # memory and vCPUs within their maxima, and one more NIC: live changes, exactly those.
    nics = '[{network: PFX-lan, mac: "52:54:00:aa:00:01"}, {network: PFX-back, model: e1000}]'
    project.write(manifest(project, vcpus=2, memory="96MiB", interfaces=nics))
    plan = project.plan_json()
    assert plan["summary"] == {"add": 0, "change": 1, "destroy": 0}
    fields = changed_fields(plan)[f"domain.{p}-web"]
    assert {f for f in fields if not f.startswith("interfaces[")} == {"vcpus", "memory"}
    assert len([f for f in fields if f.startswith("interfaces[")]) == 1
    assert {f["effect"] for f in plan["changes"][0]["fields"]} == {"live"}

    project.apply()
    assert web.isActive(), "a live change must not stop the domain"
    assert web.vcpusFlags(0) == 2  # VIR_DOMAIN_AFFECT_CURRENT on a running domain reads the live value
    assert len(_live_macs(web)) == 2
    assert "No changes." in project.run("plan", check=True).stdout

    # Removing resources from the manifest plans exactly their deletion.
    project.write(manifest(project, vcpus=2, memory="96MiB", interfaces=nics, with_db=False))
    plan = project.plan_json()
    assert {(c["address"], c["action"]) for c in plan["changes"]} == {
        (f"domain.{p}-db", "delete"), (f"volume.{p}-db-root", "delete"),
    }
    project.apply()
    assert "No changes." in project.run("plan", check=True).stdout

    destroyed = project.run("destroy", "--auto-approve", check=True)
    assert "Destroy complete!" in destroyed.stdout
    assert project.leftovers() == []


def _live_macs(dom: Any) -> list[str]:
    from lxml import etree

    root = etree.fromstring(dom.XMLDesc(0).encode())
    return [node.get("address") for node in root.findall("devices/interface/mac")]


def test_unmanaged_object_with_colliding_name_is_refused_and_untouched(project: Any, conn: Any) -> None:
    p = project.prefix
    foreign_xml = f"<network><name>{p}-lan</name><bridge name='{project.bridge_prefix}x'/></network>"
    foreign = conn.networkDefineXML(foreign_xml)
    before = foreign.XMLDesc(0)
    project.write(f"""
    networks:
      {p}-lan: {{mode: isolated, bridge: {project.bridge_prefix}a}}
    """)
    result = project.run("plan")
    assert result.code == 1
    assert f"network '{p}-lan' exists and is not managed by vmform" in result.stderr
    assert "main.yaml:3:" in result.stderr
    assert "Traceback" not in result.stderr
    assert project.run("apply", "--auto-approve").code == 1
    destroyed = project.run("destroy", "--auto-approve", check=True)
    assert "No changes." in destroyed.stdout
    assert conn.networkLookupByName(f"{p}-lan").XMLDesc(0) == before


def test_a_failing_resource_does_not_stop_an_independent_one(project: Any, conn: Any) -> None:
    p = project.prefix
    # An unmanaged network already holds the bridge name the manifest asks for: creating it must fail.
    taken = f"{project.bridge_prefix}t"
    squatter = conn.networkDefineXML(f"<network><name>{p}-squatter</name><bridge name='{taken}'/></network>")
    squatter.create()
    project.write(f"""
    networks:
      {p}-net: {{mode: isolated, bridge: {taken}}}
    pools:
      {p}-pool: {{path: {project.pool_dir}}}
    volumes:
      {p}-vol: {{pool: {p}-pool, size: 16MiB}}
    domains:
      {p}-vm:
        type: qemu
        memory: 32MiB
        interfaces: [{p}-net]
        state: stopped
    """)
    result = project.run("apply", "--auto-approve")
    assert result.code == 1
    assert f"network.{p}-net: failed" in result.stdout
    assert f"domain.{p}-vm: skipped (network.{p}-net failed)" in result.stdout
    assert "1 failed, 1 skipped" in result.stdout
    assert conn.storagePoolLookupByName(f"{p}-pool").storageVolLookupByName(f"{p}-vol") is not None
    plan = project.plan_json()
    assert {c["address"] for c in plan["changes"]} == {f"network.{p}-net", f"domain.{p}-vm"}
    squatter.destroy()
    squatter.undefine()
    project.apply()
    assert "No changes." in project.run("plan", check=True).stdout
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


@pytest.mark.parametrize("broken", [
    "domains:\n  x:\n    memory: 2GB\n",
    "domains:\n  x:\n    memroy: 1GiB\n",
    "domains:\n  x: {disks: [nope]}\n",
    "networks: [\n",
])
def test_manifest_mistakes_are_one_line_errors_without_traceback(project: Any, broken: str) -> None:
    project.write(broken)
    result = project.run("plan")
    assert result.code == 1
    assert result.stderr.startswith("Error: main.yaml:")
    assert "Traceback" not in result.stderr


def test_apply_reads_back_and_refuses_a_host_that_differs_from_the_plan(project: Any, monkeypatch: Any) -> None:
    """Apply proves itself: a provider that silently does not do its work is caught by the read-back."""
    from vmform import api
    from vmform.providers.domain import DomainProvider

    project.write(manifest(project, with_db=False))
    project.apply()
    project.write(manifest(project, with_db=False, memory="96MiB"))
    monkeypatch.setattr(DomainProvider, "update", lambda self, ctx, change: None)
    workspace = api.load_workspace(project.root)
    connections = api.connect(workspace)
    try:
        planned = api.plan(workspace, connections)
        result = api.apply_plan(workspace, connections, planned)
    finally:
        connections.close()
    p = project.prefix
    assert not result.ok
    assert result.mismatched == {f"domain.{p}-web": "memory: planned 96MiB, the host has 64MiB"}, result.mismatched
