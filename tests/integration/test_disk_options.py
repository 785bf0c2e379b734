"""Disk options on the real daemon: a raw volume shared by two domains, serial and wwn, converging."""

from __future__ import annotations

from typing import Any

import libvirt
from lxml import etree


def test_shared_raw_disk_with_serial_and_wwn(project: Any, conn: Any) -> None:
    p = project.prefix
    shared = "{volume: shared, bus: scsi, cache: none, shareable: true, serial: DATA1, wwn: 5000c50015ea71ac}"

    def manifest(disk: str) -> str:
        return f"""
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
volumes:
  shared: {{name: {p}-shared, pool: pool, format: raw, size: 16MiB}}
domains:
  a: {{name: {p}-a, type: qemu, memory: 32MiB, state: stopped, disks: [{disk}]}}
  b: {{name: {p}-b, type: qemu, memory: 32MiB, state: stopped, disks: [{shared}]}}
"""

    project.write(manifest(shared))
    project.apply()
    for name in ("a", "b"):
        disk = etree.fromstring(conn.lookupByName(f"{p}-{name}").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()
                                ).find("devices/disk")
        assert disk.find("shareable") is not None and disk.findtext("serial") == "DATA1"
        assert disk.findtext("wwn") == "5000c50015ea71ac" and disk.find("target").get("bus") == "scsi"
    config = etree.fromstring(conn.lookupByName(f"{p}-a").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    assert [c.get("model") for c in config.findall("devices/controller[@type='scsi']")] == ["virtio-scsi"]
    assert "No changes." in project.run("plan", check=True).stdout
    project.write(manifest(shared.replace("shareable: true", "shareable: false")))
    plan = project.plan_json()
    assert {(c["address"], tuple(f["path"] for f in c["fields"])) for c in plan["changes"]} == {
        ("domain.a", ("disks[sda]",))}
    project.apply()
    assert "No changes." in project.run("plan", check=True).stdout


def test_ignition_config_through_firmware_config(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(f"""
domains:
  core:
    name: {p}-core
    type: qemu
    memory: 32MiB
    state: stopped
    ignition: {{ignition: {{version: 3.4.0}}, passwd: {{users: [{{name: core, sshAuthorizedKeys: [secret-key]}}]}}}}
""")
    plan = project.run("plan", check=True).stdout
    assert "secret-key" not in plan and "(sensitive, sha256:" in plan
    project.apply()
    root = etree.fromstring(conn.lookupByName(f"{p}-core").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    entry = root.find("sysinfo[@type='fwcfg']/entry[@name='opt/com.coreos/config']")
    assert entry is not None and '"sshAuthorizedKeys":["secret-key"]' in entry.text
    assert "No changes." in project.run("plan", check=True).stdout


def test_preallocation(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(f"""
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
volumes:
  thin: {{name: {p}-thin, pool: pool, format: raw, size: 16MiB}}
  full: {{name: {p}-full, pool: pool, format: raw, size: 16MiB, preallocation: full}}
  meta: {{name: {p}-meta, pool: pool, size: 64MiB, preallocation: metadata}}
""")
    project.apply()
    pool = conn.storagePoolLookupByName(f"{p}-pool")
    allocation = {name: pool.storageVolLookupByName(f"{p}-{name}").info()[2] for name in ("thin", "full", "meta")}
    assert allocation["full"] >= 16 * 1024**2 > allocation["thin"], allocation
    assert allocation["meta"] > 0, allocation
    assert "No changes." in project.run("plan", check=True).stdout
