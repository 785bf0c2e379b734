"""Uploading a local image through the stream API, overlays on it, and `vmform render` on the real daemon."""

from __future__ import annotations

import subprocess
from typing import Any


def test_source_image_is_uploaded_and_overlaid(project: Any, conn: Any) -> None:
    p = project.prefix
    image = project.root / "images" / "base.qcow2"
    image.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "48M"], check=True)
    project.write(f"""
    pools:
      {p}-pool: {{path: {project.pool_dir}}}
    volumes:
      {p}-base: {{pool: {p}-pool, source: images/base.qcow2, format: qcow2}}
      {p}-root: {{pool: {p}-pool, size: 96MiB, backing: {p}-base}}
    """)
    project.apply()
    pool = conn.storagePoolLookupByName(f"{p}-pool")
    base = pool.storageVolLookupByName(f"{p}-base")
    root = pool.storageVolLookupByName(f"{p}-root")
    assert base.info()[1] == 48 * 1024**2
    assert root.info()[1] == 96 * 1024**2
    assert f"<path>{base.path()}</path>" in root.XMLDesc(0)
    assert "No changes." in project.run("plan", check=True).stdout

    # A changed image is a different source: the volume must be replaced, and the overlay on it with it,
    # which discards the overlay's data (refused without allow_data_loss on the overlay).
    subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    refused = project.run("plan")
    assert refused.code == 1 and f"volume.{p}-root" in refused.stderr, refused.stderr
    manifest = project.root / "main.yaml"
    manifest.write_text(manifest.read_text().replace(f"backing: {p}-base}}",
                                                     f"backing: {p}-base, lifecycle: {{allow_data_loss: true}}}}"))
    plan = project.plan_json()
    base_change = next(c for c in plan["changes"] if c["address"] == f"volume.{p}-base")
    assert base_change["action"] == "delete_then_create"
    assert "source" in base_change["reason"]
    root_change = next(c for c in plan["changes"] if c["address"] == f"volume.{p}-root")
    assert root_change["action"] == "delete_then_create"
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


def test_render_prints_valid_xml_and_qemu_command_line(project: Any) -> None:
    p = project.prefix
    project.write(f"""
    domains:
      {p}-vm:
        type: qemu
        memory: 64MiB
        description: "a'/><qemu:commandline>"
    """)
    result = project.run("render", f"domain.{p}-vm", check=True)
    assert f"<name>{p}-vm</name>" in result.stdout
    assert "a'/&gt;&lt;qemu:commandline&gt;" in result.stdout
    assert "qemu-system-x86_64" in result.stdout
    assert "-m" in result.stdout
    assert project.leftovers() == []
