"""Locks, the ledger and moves between hosts, on real daemons (the host's libvirtd and the fake hosts b and c of
remote_hosts.py). One test per failure of issue 20's "Locks and the ledger" and "Moves between hosts":

- an apply that waits for the lock plans after getting it (never runs a plan made before the other apply);
- a create that fails because the object already exists never removes the entry the ledger holds for it;
- with --skip-unreachable, a move to a host that is down is left out, never turned into a delete;
- a move's plan shows and counts the deletes of the old copies; a cold move is complete when apply ends;
- interfaces are retargeted like disks: a network named differently on the new host, live and cold."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from lxml import etree

from tests.integration.remote_hosts import RemoteHost
from tests.integration.test_faults import ledger, lock_secret  # the project's records on the host
from tests.integration.test_hosts import HostsProject

pytestmark = pytest.mark.libvirt

CREATED = re.compile(r"^(\S+): created \(")


# --- helpers ---------------------------------------------------------------------------------------------------
def start(project: Any, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmform", "-C", str(project.root), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env={**os.environ, "NO_COLOR": "1"},
    )


def read_created(process: subprocess.Popen[str], count: int) -> list[str]:
    assert process.stdout is not None
    created: list[str] = []
    while len(created) < count:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"apply ended after {len(created)} created lines")
        match = CREATED.match(line)
        if match:
            created.append(match.group(1))
    return created


def volumes_in(conn: Any, pool_name: str) -> list[str]:
    pool = conn.storagePoolLookupByName(pool_name)
    pool.refresh(0)
    return sorted(pool.listVolumes())


# --- Locks and the ledger --------------------------------------------------------------------------------------
def big_project(project: Any, volumes: int, domains: int) -> str:
    """A network, a pool, ``volumes`` small volumes and ``domains`` defined (stopped) domains using them."""
    p = project.prefix
    lines = ["networks:", f"  {p}-net: {{mode: isolated, bridge: {project.bridge_prefix}a, ipv4: {project.subnet}.1/24}}",
             "pools:", f"  {p}-pool: {{path: {project.pool_dir}}}", "volumes:"]
    lines += [f"  {p}-v{i:02d}: {{pool: {p}-pool, size: 1MiB}}" for i in range(volumes)]
    lines.append("domains:")
    for i in range(domains):
        lines += [f"  {p}-d{i}:", "    type: qemu", "    memory: 32MiB", f"    disks: [{p}-v{i:02d}]",
                  f"    interfaces: [{{network: {p}-net}}]", "    state: stopped"]
    return "\n".join(lines) + "\n"


def test_a_waiting_apply_plans_after_it_gets_the_lock_and_keeps_the_ledger(project: Any, conn: Any) -> None:
    """`apply & apply --lock-timeout`: the second one waits, then plans what the first one left ("No changes.");
    it never runs a plan made before the wait, whose creates all fail with "already exists" and used to drop
    the first apply's ledger entries."""
    p = project.prefix
    volumes, domains = 20, 10  # 32 resources
    project.write(big_project(project, volumes, domains))
    first = start(project, "apply", "--auto-approve", "--parallelism", "1")
    second: subprocess.Popen[str] | None = None
    try:
        read_created(first, 3)
        first.send_signal(signal.SIGSTOP)  # holding the lock, in the middle of its work
        try:
            second = start(project, "apply", "--auto-approve", "--lock-timeout", "120")
            assert second.stderr is not None
            waiting = second.stderr.readline()
            assert waiting.startswith(f"Waiting up to 120s for the lock of project {p}, held by "), waiting
            assert f"(pid {first.pid}, apply)" in waiting, waiting
        finally:
            first.send_signal(signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=300)
        second_out, second_err = second.communicate(timeout=300)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.communicate()
    print(f"first apply:\n{first_out}{first_err}\nsecond apply:\n{second_out}{second_err}")
    assert first.returncode == 0, first_out + first_err
    assert f"Apply complete! Resources: {volumes + domains + 2} added" in first_out
    # The second planned once it had the lock: there was nothing left to do, and it did nothing.
    assert second.returncode == 0, second_out + second_err
    assert "No changes." in second_out and "will be created" not in second_out, second_out
    assert "already exists" not in second_out + second_err
    assert "No changes." in project.run("plan", check=True).stdout
    entries = ledger(conn, p)
    assert sorted(entries["volumes"]) == sorted(f"volume.{p}-v{i:02d}" for i in range(volumes)), entries
    assert list(entries["pools"]) == [f"pool.{p}-pool"], entries
    assert lock_secret(conn, p) is None


def test_a_create_that_finds_its_object_there_keeps_the_ledger_entry(project: Any, conn: Any) -> None:
    """A plan applied twice through the library (api.apply_plan, as a caller that planned before another apply
    ran): the second run's creates of a pool, then of a volume and a seed, meet "already exists". They leave
    the ledger exactly as the first run wrote it, so the objects stay owned and the next plan has nothing to do."""
    from vmform import api

    p = project.prefix
    pool = f"""
pools:
  {p}-pool: {{path: {project.pool_dir}}}
"""
    volumes = f"""
volumes:
  {p}-disk: {{pool: {p}-pool, size: 1MiB}}
cloudinit:
  {p}-seed: {{pool: {p}-pool, user_data: {{runcmd: [[echo, hello]]}}}}
"""
    for text, creates in ((pool, [f"pool.{p}-pool"]), (pool + volumes, [f"cloudinit.{p}-seed", f"volume.{p}-disk"])):
        project.write(text)
        workspace = api.load_workspace(project.root)
        connections = api.connect(workspace)
        try:
            stale = api.plan(workspace, connections)
            assert sorted(c.address for c in stale.changes) == creates, stale.changes
            assert api.apply_plan(workspace, connections, stale).ok
            written = ledger(conn, p)
            again = api.apply_plan(workspace, connections, stale)  # the same creates once more
        finally:
            connections.close()
        print(again)
        assert sorted(again.failed) == creates, again
        assert all("exist" in message for message in again.failed.values()), again.failed
        assert ledger(conn, p) == written  # every entry as the first run wrote it, none moved or dropped
        assert "No changes." in project.run("plan", check=True).stdout
    assert sorted(ledger(conn, p)["volumes"]) == [f"cloudinit.{p}-seed", f"volume.{p}-disk"]
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


# --- Moves between hosts ---------------------------------------------------------------------------------------
@pytest.fixture
def hosts_b_c(project: Any, remote_host_b: RemoteHost, remote_host_c: RemoteHost) -> Iterator[HostsProject]:
    hosts = HostsProject(project, {"b": remote_host_b, "c": remote_host_c})
    try:
        yield hosts
    finally:
        hosts.cleanup()


def move_lab(hosts: HostsProject, moved: str = "b", state: str = "stopped", networks: str = "same") -> str:
    """A pool and a network on each host; domain.mover with its volume and seed on ``moved``. With
    networks="renamed", each host's network has a libvirt name of its own."""
    p, pool_root, bridge = hosts.prefix, hosts.hosts["b"].pool_root, hosts.project.bridge_prefix
    net_b, net_c = (f"{p}-net", f"{p}-net") if networks == "same" else (f"{p}-net-on-b", f"{p}-net-on-c")
    return f"""
pools:
  pool_b: {{name: {p}-pool, host: b, path: {pool_root}/{p}}}
  pool_c: {{name: {p}-pool, host: c, path: {pool_root}/{p}}}
networks:
  net_b: {{name: {net_b}, host: b, bridge: {bridge}b}}
  net_c: {{name: {net_c}, host: c, bridge: {bridge}c}}
volumes:
  moving: {{name: {p}-mover.qcow2, host: {moved}, pool: pool_{moved}, format: qcow2, size: 16MiB}}
cloudinit:
  seed: {{name: {p}-mover-seed, host: {moved}, pool: pool_{moved}, user_data: {{runcmd: [[echo, moved]]}}}}
domains:
  mover:
    name: {p}-mover
    host: {moved}
    type: qemu
    memory: 32MiB
    state: {state}
    disks: [{{volume: moving}}]
    cloudinit: seed
    interfaces: [{{network: net_{moved}}}]
"""


def test_skip_unreachable_never_turns_a_move_into_a_delete(hosts_b_c: HostsProject) -> None:
    """domain.mover (stopped), its volume and seed move from b to c while c is down: apply --skip-unreachable
    leaves them out (a note says why) and deletes nothing on b; once c is back, the move happens."""
    p, b, c = hosts_b_c.prefix, hosts_b_c.hosts["b"], hosts_b_c.hosts["c"]
    hosts_b_c.write(move_lab(hosts_b_c, "b"))
    hosts_b_c.run("apply", "--auto-approve")
    hosts_b_c.write(move_lab(hosts_b_c, "c"))
    with c.unreachable():
        planned = hosts_b_c.run("plan", "--skip-unreachable", "--json").json()
        assert planned["changes"] == [], planned["changes"]
        notes = "\n".join(planned["notes"])
        for address in ("domain.mover", "volume.moving", "cloudinit.seed"):
            assert f"{address} moves from host b to host c, which was not reached: left out" in notes, notes
        applied = hosts_b_c.run("apply", "--auto-approve", "--skip-unreachable", check=False)
        print(applied.stdout, applied.stderr)
        assert applied.code == 1 and "destroyed" not in applied.stdout, applied.stdout
        assert "Error: host c (" in applied.stderr and "Traceback" not in applied.stderr, applied.stderr
        assert hosts_b_c.names("b") == [f"{p}-mover"]
        assert volumes_in(b.conn(), f"{p}-pool") == [f"{p}-mover-seed.iso", f"{p}-mover.qcow2"]
        assert sorted(ledger(b.conn(), p)["volumes"]) == ["cloudinit.seed", "volume.moving"]
    # Both hosts answer again: the move is planned and done, the old copies deleted as the plan said.
    moved = hosts_b_c.run("apply", "--auto-approve")
    assert "domain.mover: migrated" in moved.stdout, moved.stdout
    assert hosts_b_c.names("b") == [] and hosts_b_c.names("c") == [f"{p}-mover"]
    assert volumes_in(b.conn(), f"{p}-pool") == []
    assert "No changes." in hosts_b_c.run("plan").stdout
    hosts_b_c.run("destroy", "--auto-approve")
    assert hosts_b_c.leftovers() == []


def test_a_move_plan_shows_its_deletes_and_a_cold_move_is_complete(hosts_b_c: HostsProject) -> None:
    """The plan of a move lists the old host's volume and seed deletes (counted, waiting for the migration); a
    stopped domain's move says "cold move", never "at next restart", and nothing waits for a restart after it."""
    p, b, c = hosts_b_c.prefix, hosts_b_c.hosts["b"], hosts_b_c.hosts["c"]
    hosts_b_c.write(move_lab(hosts_b_c, "b"))
    hosts_b_c.run("apply", "--auto-approve")
    hosts_b_c.write(move_lab(hosts_b_c, "c"))
    plan = hosts_b_c.run("plan", "--json").json()
    assert plan["summary"] == {"add": 2, "change": 0, "destroy": 2, "move": 1}, plan["summary"]
    assert sorted((ch["address"], ch["action"], ch["host"]) for ch in plan["changes"]) == [
        ("cloudinit.seed", "create", "c"), ("cloudinit.seed", "delete", "b"), ("domain.mover", "migrate", "c"),
        ("volume.moving", "create", "c"), ("volume.moving", "delete", "b")]
    for change in plan["changes"]:
        if change["action"] == "delete":
            assert "domain.mover" in change["depends_on"], change  # the old copy goes once the domain has moved
    shown = hosts_b_c.run("plan").stdout
    print(shown)
    assert "Plan: 2 to add, 0 to change, 2 to destroy, 1 to move." in shown
    assert "cold move" in shown and "at next restart" not in shown and "waiting for a restart" not in shown, shown
    moved = hosts_b_c.run("apply", "--auto-approve")
    print(moved.stdout)
    assert "Apply complete! Resources: 2 added, 0 changed, 2 destroyed, 1 moved." in moved.stdout
    assert "waiting for a restart" not in moved.stdout
    assert hosts_b_c.names("b") == [] and hosts_b_c.names("c") == [f"{p}-mover"]
    assert volumes_in(b.conn(), f"{p}-pool") == []
    assert volumes_in(c.conn(), f"{p}-pool") == [f"{p}-mover-seed.iso", f"{p}-mover.qcow2"]
    assert ledger(b.conn(), p)["volumes"] == {}
    assert sorted(ledger(c.conn(), p)["volumes"]) == ["cloudinit.seed", "volume.moving"]
    after = hosts_b_c.run("plan")
    assert "No changes." in after.stdout and "waiting for a restart" not in after.stdout, after.stdout
    hosts_b_c.run("destroy", "--auto-approve")
    assert hosts_b_c.leftovers() == []


def _network_of(conn: Any, name: str, inactive: bool = False) -> list[str]:
    dom = conn.lookupByName(name)
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
    return [s.get("network") for s in etree.fromstring(xml.encode()).findall("devices/interface/source")]


@pytest.mark.parametrize("state", ["running", "stopped"])
def test_a_move_retargets_interfaces_to_the_new_hosts_network(hosts_b_c: HostsProject, state: str) -> None:
    """The network is net_b (libvirt name …-net-on-b) on b and net_c (…-net-on-c) on c: a live move (running) and
    a cold move (stopped) both put the interface on c's network."""
    p, c = hosts_b_c.prefix, hosts_b_c.hosts["c"]
    hosts_b_c.write(move_lab(hosts_b_c, "b", state, networks="renamed"))
    hosts_b_c.run("apply", "--auto-approve")
    hosts_b_c.write(move_lab(hosts_b_c, "c", state, networks="renamed"))
    moved = hosts_b_c.run("apply", "--auto-approve", check=False)
    print(moved.stdout, moved.stderr)
    assert moved.code == 0 and "domain.mover: migrated" in moved.stdout, moved.stdout + moved.stderr
    assert hosts_b_c.names("b") == [] and hosts_b_c.names("c") == [f"{p}-mover"]
    dom = c.conn().lookupByName(f"{p}-mover")
    assert bool(dom.isActive()) == (state == "running")
    assert _network_of(c.conn(), f"{p}-mover", inactive=True) == [f"{p}-net-on-c"]
    if state == "running":
        assert _network_of(c.conn(), f"{p}-mover") == [f"{p}-net-on-c"]
    assert ("live move" if state == "running" else "cold move") in moved.stdout, moved.stdout
    after = hosts_b_c.run("plan")
    assert "No changes." in after.stdout, after.stdout
    hosts_b_c.run("destroy", "--auto-approve")
    assert hosts_b_c.leftovers() == []
