"""count and for_each on the real daemon: instances apply, converge, and shrink or grow one by one."""

from __future__ import annotations

from typing import Any


def project_text(project: Any, workers: int, nets: str) -> str:
    return f"""
variables:
  workers: {{type: number, default: {workers}}}
networks:
  lan:
    for_each: {nets}
    name: "{project.prefix}-lan-{{{{ each.key }}}}"
    bridge: "{project.bridge_prefix}{{{{ each.key }}}}"
domains:
  worker:
    count: "{{{{ var.workers }}}}"
    name: "{project.prefix}-worker-{{{{ index }}}}"
    type: qemu
    memory: 32MiB
    vcpus: "{{{{ 1 + index }}}}"
    max_vcpus: 4
    interfaces: ['lan["a"]']
    state: stopped
"""


def test_instances_apply_converge_and_change_one_by_one(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(project_text(project, 3, "[a, c]"))
    project.apply()
    assert sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(p)) == [
        f"{p}-worker-0", f"{p}-worker-1", f"{p}-worker-2"]
    assert conn.lookupByName(f"{p}-worker-2").vcpusFlags(0x2) >= 1
    assert "No changes." in project.run("plan", check=True).stdout

    project.write(project_text(project, 2, "[a, b, c]"))
    plan = project.plan_json()
    assert {(c["address"], c["action"]) for c in plan["changes"]} == {
        ("domain.worker[2]", "delete"), ('network.lan["b"]', "create")}
    project.apply()
    assert "No changes." in project.run("plan", check=True).stdout
    assert "No changes." in project.run("plan", "-var", "workers=2", check=True).stdout
    assert project.run("plan", "--detailed-exitcode", "-var", "workers=3").code == 2
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


def test_expressions_reading_other_resources_order_the_apply(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(f"""
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
volumes:
  data: {{name: {p}-data, pool: pool, format: raw, size: 16MiB}}
domains:
  vm:
    name: "{{{{ volume.data.name }}}}-vm"
    type: qemu
    memory: 32MiB
    state: stopped
    disks: [{{path: "{{{{ volume.data.path }}}}", format: raw}}]
""")
    project.apply()
    xml = conn.lookupByName(f"{p}-data-vm").XMLDesc(0)
    assert f"file='{project.pool_dir}/{p}-data'" in xml
    assert "No changes." in project.run("plan", check=True).stdout


def test_project_outputs(project: Any) -> None:
    p = project.prefix
    project.write(f"""
variables:
  secret: {{type: string, default: s3cret, sensitive: true}}
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
volumes:
  data: {{name: {p}-data, pool: pool, format: raw, size: 16MiB}}
domains:
  vm: {{name: {p}-vm, type: qemu, memory: 32MiB, state: stopped}}
outputs:
  state: "{{{{ domain.vm.state }}}}"
  data_path: {{value: "{{{{ volume.data.path }}}}", description: the data disk}}
  names: "{{{{ [domain.vm.name, volume.data.name] }}}}"
""")
    applied = project.apply().stdout
    assert "Outputs:" in applied and "state = stopped" in applied
    assert project.run("output", "data_path", check=True).stdout.strip() == f"{project.pool_dir}/{p}-data"
    data = project.run("output", "--json", check=True).json()
    assert data["outputs"] == {"state": "stopped", "data_path": f"{project.pool_dir}/{p}-data",
                               "names": [f"{p}-vm", f"{p}-data"]}
    missing = project.run("output", "nope")
    assert missing.code == 1 and "no output 'nope'" in missing.stderr
