"""Destruction looks at the host, not only at the manifests (issue 20), on the real daemon.

* A volume is never deleted while any domain on the host uses it, managed or not: a running guest that did not
  let go of a hot-unplugged disk, another project's running domain sharing a shareable disk, a domain defined
  outside vmform. The plan says why it waits; apply checks the host again right before deleting (a saved plan
  made before the use began); destroy keeps it and says so (exit 1); a later apply deletes it once the use ended.
* A base image is never replaced under its overlays: the overlays are replaced with it (listed, counted, each
  with allow_data_loss), and each new overlay backs onto the new base file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from lxml import etree

pytestmark = pytest.mark.libvirt


def _disk_targets(dom: Any, flags: int = 0) -> list[str]:
    """What virsh domblklist shows (flags=0: the running guest; INACTIVE: the persistent definition)."""
    root = etree.fromstring(dom.XMLDesc(flags).encode())
    return sorted(t.get("dev") for t in root.findall("devices/disk/target"))


def _volume(conn: Any, pool: str, name: str) -> Any | None:
    storage = conn.storagePoolLookupByName(pool)
    storage.refresh(0)
    try:
        return storage.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return None


def _ledger_volumes(conn: Any, project: str) -> set[str]:
    from vmform.ownership import Ledger

    return set(Ledger.load(conn, project).volumes)


def test_a_disk_the_running_guest_keeps_is_not_deleted(project: Any, conn: Any) -> None:
    """Failure 1: disks [root, a] on a running guest without ACPI hotplug (no OS: a live detach of a virtio disk
    never completes). Removing a and its volume, then applying twice, never deletes the volume while the
    running guest still has vdb; the plan says why. Once the guest let go (it stopped), apply deletes it."""
    p = project.prefix
    full = f"""
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
volumes:
  root: {{name: {p}-root, pool: pool, size: 16MiB}}
  a: {{name: {p}-a, pool: pool, size: 16MiB}}
domains:
  web: {{name: {p}-web, type: qemu, memory: 32MiB, disks: [root, a]}}
"""
    project.write(full)
    project.apply()
    dom = conn.lookupByName(f"{p}-web")
    assert _disk_targets(dom) == ["vda", "vdb"]

    project.write(full.replace(f"  a: {{name: {p}-a, pool: pool, size: 16MiB}}\n", "").replace("[root, a]", "[root]"))
    outputs = []
    for _ in range(2):  # the first apply tries the detach; the second must not take the timeout as done
        applied = project.run("apply", "--auto-approve")
        output = applied.stdout + applied.stderr
        outputs.append(output)
        assert "volume.a: destroyed" not in output, output
        assert _volume(conn, f"{p}-pool", f"{p}-a") is not None, output
        assert _disk_targets(dom) == ["vda", "vdb"]  # the guest still has it
        assert "Traceback" not in output
    for output in outputs:  # each plan (and summary) says why the volume stays
        assert "volume.a is still attached to running domain.web (vdb)" in output, output
        assert "it is deleted after the disk leaves the guest" in output, output
    assert "volume.a" in _ledger_volumes(conn, p)  # still owned: a later apply deletes it

    dom.destroy()  # the guest lets go of vdb the only way it can: it stops
    applied = project.run("apply", "--auto-approve", check=True)
    assert "volume.a: destroyed" in applied.stdout, applied.stdout
    assert _volume(conn, f"{p}-pool", f"{p}-a") is None
    assert _disk_targets(dom) == ["vda"]
    assert "No changes." in project.run("plan", check=True).stdout


@pytest.fixture
def second(tmp_path: Path, conn: Any, project: Any) -> Iterator[Any]:
    """A second vmform project on the same host (its objects start with the first one's prefix)."""
    root = tmp_path / "second"
    root.mkdir()
    other = type(project)(root, f"{project.prefix}-b", conn)
    other.pool_dir = project.pool_dir.parent / f"{project.prefix}-b"
    try:
        yield other
    finally:
        other.cleanup()
        shutil.rmtree(other.pool_dir, ignore_errors=True)


def test_a_shareable_disk_another_running_domain_uses_is_kept(project: Any, second: Any, conn: Any) -> None:
    """Failure 1, shared: a raw shareable volume of project A is a disk of A's running domain and of project
    B's running domain (existing: true). A removes it from its domain and its manifests: A's domain lets go
    (a scsi disk leaves a guest at once), the volume stays while B's guest has it, and the plan says so."""
    p = project.prefix
    disk = "{volume: shared, bus: scsi, shareable: true, cache: none}"
    with_shared = f"""
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
volumes:
  shared: {{name: {p}-shared, pool: pool, size: 16MiB, format: raw}}
domains:
  a: {{name: {p}-a, type: qemu, memory: 32MiB, disks: [{disk}]}}
"""
    project.write(with_shared)
    project.apply()
    second.write(f"""
pools:
  theirs: {{name: {p}-pool, existing: true}}
volumes:
  shared: {{name: {p}-shared, pool: theirs, existing: true, format: raw}}
domains:
  b: {{name: {p}-b-vm, type: qemu, memory: 32MiB, disks: [{disk}]}}
""")
    second.apply()
    dom_a, dom_b = conn.lookupByName(f"{p}-a"), conn.lookupByName(f"{p}-b-vm")
    assert _disk_targets(dom_a) == ["sda"] and _disk_targets(dom_b) == ["sda"]

    project.write(f"""
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
domains:
  a: {{name: {p}-a, type: qemu, memory: 32MiB, disks: []}}
""")
    waits = (f"volume.shared is still attached to running domain '{p}-b-vm' (vmform project '{second.prefix}') "
             "(sda, shareable); it is deleted after the disk leaves the guest")
    plan = project.plan_json()
    assert [c["address"] for c in plan["changes"]] == ["domain.a"], plan["changes"]
    assert waits in plan["notes"] and "volume.shared" in plan["waiting"], plan
    applied = project.run("apply", "--auto-approve")
    assert "volume.shared: destroyed" not in applied.stdout, applied.stdout
    assert _volume(conn, f"{p}-pool", f"{p}-shared") is not None
    assert _disk_targets(dom_b) == ["sda"]
    after = project.run("plan", check=True).stdout
    assert waits in after, after

    # B lets go of it: the next apply deletes it.
    second.write(f"""
domains:
  b: {{name: {p}-b-vm, type: qemu, memory: 32MiB, disks: [], state: stopped}}
""")
    second.apply()
    applied = project.run("apply", "--auto-approve", check=True)
    assert "volume.shared: destroyed" in applied.stdout, applied.stdout
    assert _volume(conn, f"{p}-pool", f"{p}-shared") is None


def _foreign_domain(conn: Any, name: str, path: str) -> Any:
    """A domain made outside vmform (no owner record) with the volume's file as its disk vdb."""
    return conn.defineXML(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><os><type>hvm</type></os>"
        "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='vdb' bus='virtio'/></disk></devices></domain>")


def test_a_volume_a_foreign_domain_uses_is_never_deleted(project: Any, conn: Any) -> None:
    """Failure 1, foreign: a domain defined through libvirt (not in the project) uses the volume's file. A
    saved plan made before that deletes it: apply refuses the plan, stale (the apply-time check right before
    deleting is proven by test_a_disk_the_running_guest_keeps_is_not_deleted). A new
    plan says why and has no changes; destroy keeps it (and its pool) and exits 1; once the domain is gone,
    destroy deletes it."""
    p = project.prefix
    project.write(f"""
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
volumes:
  keep: {{name: {p}-keep, pool: pool, size: 16MiB}}
  data: {{name: {p}-data, pool: pool, size: 16MiB}}
""")
    project.apply()
    path = _volume(conn, f"{p}-pool", f"{p}-data").path()
    project.write(f"""
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
volumes:
  keep: {{name: {p}-keep, pool: pool, size: 16MiB}}
""")
    saved = project.root / "prune.plan"
    project.run("plan", "-out", str(saved), check=True)
    foreign = _foreign_domain(conn, f"{p}-foreign", path)
    why = f"still a disk (vdb) in the definition of domain '{p}-foreign' (not managed by this project)"

    # The saved plan no longer is what the manifests and the host give (the volume is in use now): refused
    # before anything is done, as stale.
    applied = project.run("apply", str(saved))
    assert applied.code == 1, applied.stdout + applied.stderr
    assert "volume.data: destroyed" not in applied.stdout
    assert "changes are not the plan its manifests and the host give now (volume.data differ)" in applied.stderr, \
        applied.stderr
    assert _volume(conn, f"{p}-pool", f"{p}-data") is not None
    assert "volume.data" in _ledger_volumes(conn, p)

    planned = project.run("plan", check=True).stdout
    assert "No changes." in planned and f"volume.data is {why}; it is deleted once no domain uses it" in planned, planned
    applied = project.run("apply", "--auto-approve", check=True)
    assert "destroyed" not in applied.stdout and _volume(conn, f"{p}-pool", f"{p}-data") is not None

    destroyed = project.run("destroy", "--auto-approve")
    assert destroyed.code == 1, destroyed.stdout + destroyed.stderr
    assert "volume.data: destroyed" not in destroyed.stdout and "volume.keep: destroyed" in destroyed.stdout
    assert f"volume.data: not destroyed: {why}" in destroyed.stderr, destroyed.stderr
    assert _volume(conn, f"{p}-pool", f"{p}-data") is not None
    assert etree.fromstring(foreign.XMLDesc(0).encode()).find("devices/disk/source").get("file") == path

    foreign.undefine()
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


def _backing_file(path: str) -> str | None:
    shown = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True,
                           check=True).stdout
    return json.loads(shown).get("backing-filename")


def test_replacing_a_base_replaces_its_overlays_on_the_new_file(project: Any, conn: Any) -> None:
    """Failure 2: the source of a base that three qcow2 overlays back onto changes (one overlay is the disk of
    a running domain). The plan lists the three overlays as -/+ and counts them; without allow_data_loss it is
    one error naming them; with it, apply makes the base and each overlay again, each on the new base file."""
    p = project.prefix
    images = project.root / "images"
    images.mkdir()
    for name, size in (("base.qcow2", "32M"), ("base2.qcow2", "48M")):  # another image, another digest
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images / name), size], check=True)
    overlay = "{{name: {p}-{n}, pool: pool, backing: base{extra}}}"

    def manifest(source: str, extra: str = "") -> str:
        overlays = "\n".join(f"  {n}: " + overlay.format(p=p, n=n, extra=extra) for n in ("o1", "o2", "o3"))
        return f"""
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
volumes:
  base: {{name: {p}-base, pool: pool, source: images/{source}, format: qcow2}}
{overlays}
domains:
  vm: {{name: {p}-vm, type: qemu, memory: 32MiB, disks: [o1]}}
"""

    project.write(manifest("base.qcow2"))
    project.apply()
    vols = {n: _volume(conn, f"{p}-pool", f"{p}-{n}") for n in ("base", "o1", "o2", "o3")}
    paths = {n: v.path() for n, v in vols.items()}
    # A hard link keeps each old file (and its inode) alive: a freed inode number can be handed to the new file
    # at once, so comparing numbers alone would say "not made again" by chance.
    keep = Path(str(project.pool_dir) + "-old")
    keep.mkdir(parents=True, exist_ok=True)
    for n, path in paths.items():
        os.link(path, keep / n)
    assert all(_backing_file(paths[n]) == paths["base"] for n in ("o1", "o2", "o3"))

    project.write(manifest("base2.qcow2"))
    refused = project.run("plan")
    assert refused.code == 1, refused.stdout + refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, refused.stderr
    assert "volume.base must be replaced" in errors[0] and "volume.o1, volume.o2, volume.o3" in errors[0], errors
    assert "allow_data_loss" in errors[0] and "main.yaml:" in errors[0], errors

    project.write(manifest("base2.qcow2", ", lifecycle: {allow_data_loss: true}"))
    plan = project.plan_json()
    actions = {c["address"]: c["action"] for c in plan["changes"]}
    assert {a: actions.get(a) for a in ("volume.base", "volume.o1", "volume.o2", "volume.o3")} == dict.fromkeys(
        ("volume.base", "volume.o1", "volume.o2", "volume.o3"), "delete_then_create"), actions
    assert plan["summary"]["add"] == 4 and plan["summary"]["destroy"] == 4, plan["summary"]
    text = project.run("plan", check=True).stdout
    assert "Plan: 4 to add" in text and "4 to destroy" in text, text

    applied = project.run("apply", "--auto-approve", check=True)
    for name in ("base", "o1", "o2", "o3"):
        assert f"volume.{name}: replaced" in applied.stdout, applied.stdout
    new_paths = {n: _volume(conn, f"{p}-pool", f"{p}-{n}").path() for n in ("base", "o1", "o2", "o3")}
    assert new_paths == paths
    assert not os.path.samefile(new_paths["base"], keep / "base")  # a new base file
    for name in ("o1", "o2", "o3"):
        assert not os.path.samefile(new_paths[name], keep / name), f"{name} was not made again"
        assert _backing_file(new_paths[name]) == new_paths["base"]
        volume_xml = etree.fromstring(_volume(conn, f"{p}-pool", f"{p}-{name}").XMLDesc(0).encode())
        assert volume_xml.findtext("backingStore/path") == new_paths["base"]
    shutil.rmtree(keep)
    assert "No changes." in project.run("plan", check=True).stdout
