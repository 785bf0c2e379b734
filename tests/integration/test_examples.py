"""The example projects that use modules, applied on the real daemon as a user would (with the test's names,
an isolated network, TCG and a small local base image instead of the Debian download)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def test_examples_lab_applies_converges_and_grows_by_one_node(project: Any, conn: Any, tmp_path: Path) -> None:
    p = project.prefix
    text = (REPO / "examples/lab/main.yaml").read_text().replace("../../modules/", f"{REPO}/modules/")
    project.write(text)
    base = project.root / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    (project.root / "test.vars").write_text(
        f"prefix: {p}\nbase_image: {base}\npool_path: {project.pool_dir}\nsubnet: '{project.subnet}'\n"
        "network_mode: isolated\ndomain_type: qemu\n"
        "nodes: {web: {host: 10, memory: 64MiB, vcpus: 1}, db: {host: 11, memory: 64MiB, vcpus: 1}}\n")
    variables = ("-var-file", str(project.root / "test.vars"))
    applied = project.run("apply", "--auto-approve", *variables, check=True)
    assert "Apply complete! Resources: 9 added" in applied.stdout, applied.stdout
    assert sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(p)) == [f"{p}-db", f"{p}-web"]
    assert "<forward" not in conn.networkLookupByName(f"{p}-net").XMLDesc(0)
    assert "No changes." in project.run("plan", *variables, check=True).stdout
    outputs = project.run("output", "--json", *variables, check=True).json()["outputs"]
    assert outputs["nodes"] == [f"{p}-db", f"{p}-web"]
    inventory = project.run("inventory", *variables, check=True).stdout
    assert "lab:" in inventory and "node:" in inventory and f"{project.subnet}.10" in inventory

    more = ("-var", "nodes={web: {host: 10, memory: 64MiB, vcpus: 1}, app: {host: 12, memory: 64MiB, vcpus: 1}, "
            "db: {host: 11, memory: 64MiB, vcpus: 1}}")
    plan = project.run("plan", "--json", *variables, *more, check=True).json()
    assert {(c["address"], c["action"]) for c in plan["changes"]} == {
        ("module.net.network.net", "update"),
        ('module.node["app"].volume.root', "create"),
        ('module.node["app"].cloudinit.seed', "create"),
        ('module.node["app"].domain.vm', "create"),
    }
    project.run("destroy", "--auto-approve", *variables, check=True)
    assert project.leftovers() == []
