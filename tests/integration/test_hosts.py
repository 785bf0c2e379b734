"""Several hosts in one project, on real daemons: the fake remote hosts b and c of remote_hosts.py (over
qemu+tcp and qemu+ssh). Apply on both, re-plan "No changes.", destroy to nothing on each; an unreachable host
fails the plan in one line, or is skipped; a domain moves between hosts by editing host:."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.remote_hosts import RemoteHost


class HostsProject:
    def __init__(self, project: Any, hosts: dict[str, RemoteHost], extra_hosts: dict[str, str] | None = None,
                 migration_uri: str = "tcp://127.0.0.1") -> None:
        self.project, self.hosts = project, hosts
        self.prefix = project.prefix
        table = "".join(f'[hosts.{name}]\nuri = "{host.uri}"\nmigration_uri = "{migration_uri}"\n'
                        for name, host in hosts.items())
        table += "".join(f'[hosts.{name}]\nuri = "{uri}"\n' for name, uri in (extra_hosts or {}).items())
        (project.root / "vmform.toml").write_text(
            f'[project]\nname = "{project.prefix}"\nmanifests = ["*.yaml"]\nparallelism = 4\nshutdown_timeout = 5\n'
            f'default_host = "{next(iter(hosts))}"\npool_roots = ["/var/lib/vmform-test"]\n\n{table}')

    def write(self, text: str) -> None:
        self.project.write(textwrap.dedent(text))

    def run(self, *args: str, check: bool = True) -> Any:
        return self.project.run(*args, check=check)

    def names(self, host: str) -> list[str]:
        conn = self.hosts[host].conn()
        return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(self.prefix))

    def cleanup(self) -> None:
        for host in self.hosts.values():
            self.project.cleanup(host.conn())

    def leftovers(self) -> list[str]:
        return [f"{name}: {found}" for name, host in self.hosts.items() for found in self.project.leftovers(host.conn())]


@pytest.fixture
def two_hosts(project: Any, remote_host_b: RemoteHost, remote_host_ssh: RemoteHost) -> Iterator[HostsProject]:
    hosts = HostsProject(project, {"b": remote_host_b, "c": remote_host_ssh})
    try:
        yield hosts
    finally:
        hosts.cleanup()


def lab(hosts: HostsProject, moved: str = "b") -> str:
    p, pool_root, bridge = hosts.prefix, hosts.hosts["b"].pool_root, hosts.project.bridge_prefix
    return f"""
pools:
  pool_b: {{name: {p}-pool, host: b, path: {pool_root}/{p}}}
  pool_c: {{name: {p}-pool, host: c, path: {pool_root}/{p}}}
networks:
  net_b: {{name: {p}-net, host: b, bridge: {bridge}b}}
  net_c: {{name: {p}-net, host: c, bridge: {bridge}c}}
volumes:
  disk:
    for_each: {{b1: b, b2: b, c1: c, c2: c}}
    name: "{p}-{{{{ each.key }}}}.qcow2"
    host: "{{{{ each.value }}}}"
    pool: "pool_{{{{ each.value }}}}"
    format: qcow2
    size: 16MiB
  moving:
    name: {p}-mover.qcow2
    host: {moved}
    pool: pool_{moved}
    format: qcow2
    size: 16MiB
cloudinit:
  seed: {{name: {p}-mover-seed, host: {moved}, pool: pool_{moved}, user_data: {{runcmd: [[echo, moved]]}}}}
domains:
  vm:
    for_each: {{b1: b, b2: b, c1: c, c2: c}}
    name: "{p}-{{{{ each.key }}}}"
    host: "{{{{ each.value }}}}"
    type: qemu
    memory: 32MiB
    state: stopped
    disks: [{{volume: 'disk["{{{{ each.key }}}}"]'}}]
    interfaces: [{{network: "net_{{{{ each.value }}}}"}}]
  mover:
    name: {p}-mover
    host: {moved}
    type: qemu
    memory: 32MiB
    state: stopped
    disks: [{{volume: moving}}]
    cloudinit: seed
"""


def test_two_domains_on_each_of_two_hosts_apply_converge_and_destroy(two_hosts: HostsProject) -> None:
    p = two_hosts.prefix
    two_hosts.write(lab(two_hosts))
    plan = two_hosts.run("plan", "--json").json()
    assert plan["hosts"] == {"b": two_hosts.hosts["b"].uri, "c": two_hosts.hosts["c"].uri}
    assert {c["host"] for c in plan["changes"] if c["kind"] == "domain"} == {"b", "c"}
    shown = two_hosts.run("plan").stdout
    assert "host b (" in shown and "host c (" in shown
    two_hosts.run("apply", "--auto-approve")
    assert two_hosts.names("b") == [f"{p}-b1", f"{p}-b2", f"{p}-mover"]
    assert two_hosts.names("c") == [f"{p}-c1", f"{p}-c2"]
    assert "No changes." in two_hosts.run("plan").stdout

    # A stopped domain moves by editing host: one migration, its disk copied; the old copies of its volume and
    # seed are deleted on b, shown and counted in the plan.
    disk_b = two_hosts.hosts["b"].conn().storagePoolLookupByName(f"{p}-pool").storageVolLookupByName(f"{p}-mover.qcow2")
    two_hosts.write(lab(two_hosts, moved="c"))
    plan = two_hosts.run("plan", "--json").json()
    assert plan["summary"] == {"add": 2, "change": 0, "destroy": 2, "move": 1}, plan["summary"]
    assert sorted((c["address"], c["action"], c["host"]) for c in plan["changes"]) == [
        ("cloudinit.seed", "create", "c"), ("cloudinit.seed", "delete", "b"), ("domain.mover", "migrate", "c"),
        ("volume.moving", "create", "c"), ("volume.moving", "delete", "b")]
    assert "Plan: 2 to add, 0 to change, 2 to destroy, 1 to move." in two_hosts.run("plan").stdout
    assert disk_b.info()[1] > 0
    # Saved, as a pipeline does (plan on the pull request, apply on merge): the file knows both hosts.
    saved = str(two_hosts.project.root / "move.plan")
    two_hosts.run("plan", "-out", saved)
    assert set(json.loads(Path(saved).read_text())["hosts"]) == {"b", "c"}
    two_hosts.run("apply", saved)
    assert two_hosts.names("b") == [f"{p}-b1", f"{p}-b2"]
    assert two_hosts.names("c") == [f"{p}-c1", f"{p}-c2", f"{p}-mover"]
    pool_b = two_hosts.hosts["b"].conn().storagePoolLookupByName(f"{p}-pool")
    pool_b.refresh(0)
    assert f"{p}-mover.qcow2" not in pool_b.listVolumes() and f"{p}-mover-seed.iso" not in pool_b.listVolumes()
    assert "No changes." in two_hosts.run("plan").stdout

    two_hosts.run("destroy", "--auto-approve")
    assert two_hosts.leftovers() == []


def test_an_unreachable_host_fails_the_plan_or_is_skipped(project: Any, remote_host_b: RemoteHost) -> None:
    hosts = HostsProject(project, {"b": remote_host_b}, {"gone": "qemu+tcp://127.0.0.1:1/system"})
    try:
        p = project.prefix
        hosts.write(f"""
domains:
  here: {{name: {p}-here, host: b, type: qemu, memory: 32MiB, state: stopped}}
  there: {{name: {p}-there, host: gone, type: qemu, memory: 32MiB, state: stopped}}
""")
        failed = hosts.run("plan", check=False)
        assert failed.code == 1
        errors = [line for line in failed.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and "host gone (qemu+tcp://127.0.0.1:1/system)" in errors[0], failed.stderr
        assert "Traceback" not in failed.stderr
        skipped = hosts.run("plan", "--skip-unreachable", "--json").json()
        assert [c["address"] for c in skipped["changes"]] == ["domain.here"]
        assert any(n.startswith("host gone skipped:") for n in skipped["notes"])
        # apply does what it can reach, and fails for the host it cannot: exit 1, one line naming it.
        applied = hosts.run("apply", "--auto-approve", "--skip-unreachable", check=False)
        assert applied.code == 1 and "domain.here: created" in applied.stdout, applied.stdout
        assert "Error: host gone (qemu+tcp://127.0.0.1:1/system)" in applied.stderr, applied.stderr
        assert hosts.names("b") == [f"{p}-here"]
        assert hosts.run("destroy", "--auto-approve", "--skip-unreachable", check=False).code == 1
        assert hosts.leftovers() == []
    finally:
        hosts.cleanup()


COUNTER_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
n=0
while :; do echo "vmf-count $n"; n=$((n+1)); sleep 1; done
"""


def _counts(path: Path) -> list[int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith("vmf-count ") and
            line.split()[1].isdigit()]


def _wait_count(path: Path, at_least: int, timeout: float) -> list[int]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = _counts(path)
        if counts and counts[-1] >= at_least:
            return counts
        time.sleep(0.5)
    return _counts(path)


def test_a_running_guest_moves_live_and_keeps_counting(two_hosts: HostsProject) -> None:
    from tests.guest.build import build_guest

    guest = build_guest(COUNTER_INIT)
    p, pool_root = two_hosts.prefix, two_hosts.hosts["b"].pool_root

    def manifest(host: str) -> str:
        return f"""
pools:
  pool_b: {{name: {p}-pool, host: b, path: {pool_root}/{p}}}
  pool_c: {{name: {p}-pool, host: c, path: {pool_root}/{p}}}
volumes:
  data: {{name: {p}-data.qcow2, host: {host}, pool: pool_{host}, format: qcow2, size: 32MiB}}
domains:
  counter:
    name: {p}-counter
    host: {host}
    type: qemu
    memory: 96MiB
    kernel: {guest.kernel}
    initrd: {guest.initrd}
    cmdline: console=ttyS0 quiet
    console_log: true
    disks: [{{volume: data}}]
    allow: [host_paths]     # the test kernel and initrd live outside the pools
"""

    two_hosts.write(manifest("b"))
    two_hosts.run("apply", "--auto-approve")
    log = Path(f"/var/log/libvirt/qemu/{p}-counter-console.log")
    log_b, log_c = two_hosts.hosts["b"].host_path(str(log)), two_hosts.hosts["c"].host_path(str(log))
    before = _wait_count(log_b, 3, 120)
    assert before and before[-1] >= 3, f"the guest did not count on b: {log_b.read_text(errors='replace')[-2000:]}"
    assert "No changes." in two_hosts.run("plan").stdout

    two_hosts.write(manifest("c"))
    plan = two_hosts.run("plan", "--json").json()
    assert [(c["address"], c["action"], c["host"]) for c in plan["changes"]] == [
        ("volume.data", "delete", "b"), ("volume.data", "create", "c"), ("domain.counter", "migrate", "c")]
    shown = two_hosts.run("plan").stdout
    print(shown)
    assert ("domain.counter will be migrated (from host b to host c, live move: it keeps running, its disks are "
            "copied with it)") in shown
    moved = two_hosts.run("apply", "--auto-approve")
    print(moved.stdout)
    assert "domain.counter: migrated" in moved.stdout
    last_on_b = _counts(log_b)[-1]
    after = _wait_count(log_c, last_on_b + 3, 60)
    print("serial log on b, last lines:", _counts(log_b)[-3:], "\nserial log on c, first lines:", after[:3])
    assert after and after[0] > 0 and after[0] <= last_on_b + 2, (last_on_b, after[:5])  # it went on counting
    assert two_hosts.names("b") == [] and two_hosts.names("c") == [f"{p}-counter"]
    dom = two_hosts.hosts["c"].conn().lookupByName(f"{p}-counter")
    assert dom.isActive() and dom.isPersistent()
    pool_b = two_hosts.hosts["b"].conn().storagePoolLookupByName(f"{p}-pool")
    pool_b.refresh(0)
    assert pool_b.listVolumes() == []
    assert f"{p}-data.qcow2" in two_hosts.hosts["c"].conn().storagePoolLookupByName(f"{p}-pool").listVolumes()
    assert "No changes." in two_hosts.run("plan").stdout
    two_hosts.run("destroy", "--auto-approve")
    assert two_hosts.leftovers() == []


def test_a_failed_migration_leaves_the_domain_running_where_it_was(project: Any, remote_host_b: RemoteHost,
                                                                    remote_host_c: RemoteHost) -> None:
    # The destination is told to listen on an address it does not have (TEST-NET-1): its QEMU cannot bind,
    # so the migration fails before anything is sent.
    hosts = HostsProject(project, {"b": remote_host_b, "c": remote_host_c}, migration_uri="tcp://192.0.2.1")
    try:
        p = project.prefix

        def manifest(host: str) -> str:
            return f"""
domains:
  vm: {{name: {p}-vm, host: {host}, type: qemu, memory: 32MiB}}
"""
        hosts.write(manifest("b"))
        hosts.run("apply", "--auto-approve")
        hosts.write(manifest("c"))
        failed = hosts.run("apply", "--auto-approve", check=False)
        assert failed.code == 1 and "domain.vm: failed:" in failed.stdout, failed.stdout
        assert "Traceback" not in failed.stderr
        dom = remote_host_b.conn().lookupByName(f"{p}-vm")
        assert dom.isActive() and dom.isPersistent()
        assert hosts.names("c") == []
        again = hosts.run("plan", "--json").json()
        assert [(c["address"], c["action"]) for c in again["changes"]] == [("domain.vm", "migrate")]
        hosts.write(manifest("b"))
        assert "No changes." in hosts.run("plan").stdout
        hosts.run("destroy", "--auto-approve")
        assert hosts.leftovers() == []
    finally:
        hosts.cleanup()
