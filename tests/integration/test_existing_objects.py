"""Objects vmform did not create, used explicitly (existing: true): read and used, never changed or deleted;
a missing one fails the plan with one line."""

from __future__ import annotations

import subprocess
from typing import Any


def test_existing_network_pool_and_volume_are_used_and_left_alone(project: Any, conn: Any) -> None:
    p = project.prefix
    # Made by someone else (here: the test, through libvirt), not by vmform.
    net = conn.networkDefineXML(f"<network><name>{p}-ext</name><bridge name='{project.bridge_prefix}x'/></network>")
    pool_dir = project.pool_dir / "ext"
    pool_dir.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(pool_dir / "golden.qcow2"), "16M"], check=True)
    pool = conn.storagePoolDefineXML(f"<pool type='dir'><name>{p}-ext</name><target><path>{pool_dir}</path></target></pool>")
    pool.create(0)
    network_xml, pool_xml = net.XMLDesc(0), pool.XMLDesc(0)
    project.write(f"""
networks:
  outside: {{name: {p}-ext, existing: true}}
pools:
  outside: {{name: {p}-ext, existing: true}}
volumes:
  golden: {{name: golden.qcow2, pool: outside, existing: true}}
  overlay: {{name: {p}-overlay, pool: outside, backing: golden}}
domains:
  vm:
    name: {p}-vm
    type: qemu
    memory: 32MiB
    state: stopped
    disks: [overlay]
    interfaces: [outside]
""")
    plan = project.plan_json()
    assert {c["address"] for c in plan["changes"]} == {"volume.overlay", "domain.vm"}
    project.apply()
    assert f"network='{p}-ext'" in conn.lookupByName(f"{p}-vm").XMLDesc(0)
    assert "No changes." in project.run("plan", check=True).stdout
    project.run("destroy", "--auto-approve", check=True)
    assert net.XMLDesc(0) == network_xml and pool.XMLDesc(0) == pool_xml  # untouched
    assert sorted(pool.listVolumes()) == ["golden.qcow2"]  # the overlay went, the existing volume stayed

    missing = project.root / "main.yaml"
    missing.write_text(missing.read_text().replace(f"name: {p}-ext, existing: true}}\npools",
                                                   f"name: {p}-nope, existing: true}}\npools"))
    result = project.run("plan")
    assert result.code == 1
    assert f"network '{p}-nope' (existing: true) does not exist on qemu:///system" in result.stderr
    assert "Traceback" not in result.stderr
