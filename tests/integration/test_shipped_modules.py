"""The shipped modules (modules/lab-network, modules/cloud-vm) used with for_each on the real daemon: they
apply, converge, and a change of inputs plans exactly the changes it means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODULES = Path(__file__).resolve().parents[2] / "modules"


def lab(project: Any, workers: str) -> str:
    p, net = project.prefix, project.subnet
    return f"""
variables:
  workers: {{type: map, default: {workers}}}
pools:
  images: {{name: {p}-images, path: {project.pool_dir}}}
volumes:
  base: {{name: {p}-base.qcow2, pool: images, format: qcow2, size: 64MiB}}
modules:
  lab:
    source: {MODULES}/lab-network
    inputs:
      name: {p}-lab
      bridge: {project.bridge_prefix}l
      ipv4: {net}.1/24
      dhcp: {{start: {net}.100, end: {net}.150}}
      dns_hosts: [{{ip: {net}.1, hostnames: [gateway]}}]
  worker:
    source: {MODULES}/cloud-vm
    for_each: "{{{{ var.workers }}}}"
    inputs:
      name: "{p}-{{{{ each.key }}}}"
      pool: images
      base: base
      disk_size: 128MiB
      network: "{{{{ module.lab.network }}}}"
      ip: "{net}.{{{{ each.value.host }}}}"
      hostname: "{{{{ each.key }}}}"
      memory: "{{{{ each.value.memory }}}}"
      domain_type: qemu
      state: stopped
      user_data: {{packages: [htop]}}
outputs:
  names: "{{{{ module.worker | dictsort | map(attribute=1) | map(attribute='name') | list }}}}"
  network: "{{{{ module.lab.name }}}}"
"""


def test_both_shipped_modules_with_for_each_apply_and_change_exactly(project: Any, conn: Any) -> None:
    p, net = project.prefix, project.subnet
    project.write(lab(project, "{a: {host: 11, memory: 64MiB}, b: {host: 12, memory: 64MiB}}"))
    applied = project.apply()
    assert "Apply complete! Resources: 9 added" in applied.stdout, applied.stdout
    assert sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(p)) == [f"{p}-a", f"{p}-b"]
    network_xml = conn.networkLookupByName(f"{p}-lab").XMLDesc(0)
    assert f"ip='{net}.11'" in network_xml and f"ip='{net}.12'" in network_xml
    assert "<hostname>gateway</hostname>" in network_xml
    volume = conn.storagePoolLookupByName(f"{p}-images").storageVolLookupByName(f"{p}-a-root.qcow2")
    assert f"{p}-base.qcow2" in volume.XMLDesc(0)  # the overlay stands on the project's base image
    assert "No changes." in project.run("plan", check=True).stdout
    outputs = project.run("output", "--json", check=True).json()["outputs"]
    assert outputs["names"] == [f"{p}-a", f"{p}-b"]
    assert outputs["network"] == f"{p}-lab"

    # A new worker in the middle of the map, one address moved, one worker's memory changed.
    project.write(lab(project, "{a: {host: 21, memory: 64MiB}, c: {host: 13, memory: 64MiB}, "
                               "b: {host: 12, memory: 96MiB}}"))
    plan = project.plan_json()
    assert {(c["address"], c["action"]) for c in plan["changes"]} == {
        ("module.lab.network.net", "update"),
        ('module.worker["b"].domain.vm', "update"),
        ('module.worker["c"].volume.root', "create"),
        ('module.worker["c"].cloudinit.seed', "create"),
        ('module.worker["c"].domain.vm', "create"),
    }
    network_change = next(c for c in plan["changes"] if c["address"] == "module.lab.network.net")
    assert any(f"{net}.21" in str(f["after"]) for f in network_change["fields"])
    assert all(f["effect"] == "live" for f in network_change["fields"]), network_change
    memory_change = next(c for c in plan["changes"] if c["address"] == 'module.worker["b"].domain.vm')
    assert {f["path"] for f in memory_change["fields"]} == {"memory", "max_memory"}  # max_memory follows memory

    project.apply()
    assert "No changes." in project.run("plan", check=True).stdout
    assert f"ip='{net}.21'" in conn.networkLookupByName(f"{p}-lab").XMLDesc(0)

    # --target a module's instance takes exactly what it declares.
    project.run("destroy", "--auto-approve", "--target", 'module.worker["c"]', check=True)
    assert sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(p)) == [f"{p}-a", f"{p}-b"]
    again = project.plan_json()
    assert {(c["address"], c["action"]) for c in again["changes"]} == {
        ('module.worker["c"].volume.root', "create"),
        ('module.worker["c"].cloudinit.seed', "create"),
        ('module.worker["c"].domain.vm', "create"),
    }
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []
