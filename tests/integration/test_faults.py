"""Faults on the real daemon: apply killed with SIGKILL, libvirtd restarted or gone while apply runs, one
resource failing among independent ones, Ctrl-C during apply, and a guest that does not shut down.

The tests that stop or restart libvirtd do it to a private daemon the suite starts itself (``private_project``:
the session's fake host "private" of remote_hosts.py, reached over qemu+tcp), never to the host's daemon, which
other clients on the machine use.

Every fault is made at a deterministic point: apply runs with --parallelism 1 and the test acts after the
N-th "created" line it reads from apply's stdout, or once apply says it waits for the lock."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt
import pytest
from lxml import etree

from tests.integration.remote_hosts import RemoteHost

URI = os.environ.get("VMFORM_TEST_URI", "qemu:///system")

pytestmark = pytest.mark.libvirt

CREATED = re.compile(r"^(\S+): created \(")


def manifest(project: Any, volumes: int, domains: int = 0) -> str:
    """A network, a pool, ``volumes`` small volumes and ``domains`` stopped domains (one volume each)."""
    p = project.prefix
    lines = [
        "networks:",
        f"  {p}-net: {{mode: isolated, bridge: {project.bridge_prefix}a, ipv4: {project.subnet}.1/24}}",
        "pools:",
        f"  {p}-pool: {{path: {project.pool_dir}}}",
        "volumes:",
    ]
    lines += [f"  {p}-v{i:02d}: {{pool: {p}-pool, size: 1MiB}}" for i in range(volumes)]
    if domains:
        lines.append("domains:")
        for i in range(domains):
            lines += [f"  {p}-d{i}:", "    type: qemu", "    memory: 64MiB", f"    disks: [{p}-v{i:02d}]",
                      f"    interfaces: [{{network: {p}-net}}]", "    state: stopped"]
    return "\n".join(lines) + "\n"


def declared(project: Any, volumes: int, domains: int = 0) -> set[str]:
    p = project.prefix
    return ({f"network.{p}-net", f"pool.{p}-pool"} | {f"volume.{p}-v{i:02d}" for i in range(volumes)}
            | {f"domain.{p}-d{i}" for i in range(domains)})


def start_apply(project: Any, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmform", "-C", str(project.root), "apply", "--auto-approve", "--parallelism", "1",
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env={**os.environ, "NO_COLOR": "1"},
    )


def start_shutdown_wait(project: Any) -> subprocess.Popen[str]:
    """An apply in the middle of one long change: it stops a running guest without an OS (which ignores ACPI),
    with a 300 s shutdown timeout and no force-off."""
    p = project.prefix
    toml = project.root / "vmform.toml"
    toml.write_text(toml.read_text().replace("shutdown_timeout = 5\nforce_off = true\n", "shutdown_timeout = 300\n"))
    text = f"""
domains:
  {p}-vm: {{type: qemu, memory: 64MiB, state: STATE}}
"""
    project.write(text.replace("STATE", "running"))
    project.apply()
    project.write(text.replace("STATE", "stopped"))
    return start_apply(project)


def read_created(process: subprocess.Popen[str], count: int) -> list[str]:
    """Read apply's stdout line by line until ``count`` "created" lines; the addresses created."""
    assert process.stdout is not None
    created: list[str] = []
    while len(created) < count:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"apply ended after {len(created)} created lines: {process.stderr.read() if process.stderr else ''}")
        match = CREATED.match(line)
        if match:
            created.append(match.group(1))
    return created


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    for line in stderr.splitlines():
        assert line.startswith(("Error: ", "Warning: ", "Interrupted", "Removed a stale lock", "Waiting up to")) or \
            re.match(r"domain \S+: waiting up to \d+s for the guest to shut down$", line), line


def ledger(conn: Any, prefix: str) -> dict[str, Any]:
    try:
        secret = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, f"vmform/{prefix}/ledger")
    except libvirt.libvirtError:
        return {"pools": {}, "volumes": {}}
    return json.loads(zlib.decompress(secret.value()))


def lock_secret(conn: Any, prefix: str) -> Any:
    try:
        return conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, f"vmform/{prefix}/lock")
    except libvirt.libvirtError:
        return None


def on_host(conn: Any, project: Any) -> dict[str, list[str]]:
    """Every object carrying the test's prefix, by kind (volumes of every pool)."""
    p = project.prefix
    found: dict[str, list[str]] = {"domain": [], "network": [], "pool": [], "volume": []}
    found["domain"] = sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(p))
    found["network"] = sorted(n.name() for n in conn.listAllNetworks() if n.name().startswith(p))
    for pool in conn.listAllStoragePools():
        if pool.name().startswith(p):
            found["pool"].append(pool.name())
            if pool.isActive():
                pool.refresh(0)
                found["volume"] += sorted(v.name() for v in pool.listAllVolumes())
    return found


def planned(project: Any) -> dict[str, str]:
    """address -> action of the next plan."""
    return {c["address"]: c["action"] for c in project.plan_json()["changes"]}


def assert_converged(project: Any, conn: Any, volumes: int, domains: int = 0) -> None:
    """Exactly the declared objects, each once, all owned, no lock, and a plan with nothing to do."""
    p = project.prefix
    assert "No changes." in project.run("plan", check=True).stdout
    host = on_host(conn, project)
    assert host["volume"] == sorted(f"{p}-v{i:02d}" for i in range(volumes)), host
    assert host["domain"] == sorted(f"{p}-d{i}" for i in range(domains)), host
    assert host["network"] == [f"{p}-net"] and host["pool"] == [f"{p}-pool"], host
    entries = ledger(conn, p)
    assert sorted(entries["volumes"]) == sorted(f"volume.{p}-v{i:02d}" for i in range(volumes)), entries
    assert list(entries["pools"]) == [f"pool.{p}-pool"], entries
    assert lock_secret(conn, p) is None


def _wait_for(condition: Any, what: str, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def private_project(project: Any, private_daemon: RemoteHost) -> Any:
    """The project, on the session's private libvirtd (remote_hosts.py) instead of the host's: the tests that stop
    or restart a daemon do it to that one. ``project.conn`` is a connection to it; the fixture cleans it up."""
    project.use_private_daemon(private_daemon)
    project.daemon = private_daemon
    return project


@contextmanager
def libvirtd_stopped(project: Any) -> Iterator[None]:
    """The project's private libvirtd stopped (SIGTERM) for the body, started again afterwards, whatever happens.
    Never the host's daemon: the project must be a ``private_project``."""
    host: RemoteHost = project.daemon
    assert project.uri == host.tcp_uri != URI, "only a private daemon is ever stopped"
    with host.unreachable():
        yield
    try:
        project.conn.getLibVersion()  # the test's connection notices it was dropped, and is opened again
    except libvirt.libvirtError:
        pass


def test_sigkill_mid_apply_leaves_an_exact_plan_and_a_recoverable_lock(project: Any, conn: Any) -> None:
    p = project.prefix
    volumes, domains = 24, 4
    project.write(manifest(project, volumes, domains))
    everything = declared(project, volumes, domains)
    process = start_apply(project)
    try:
        created = read_created(process, 27)  # the network, the pool, the 24 volumes and the first domain
        process.send_signal(signal.SIGKILL)
    finally:
        code, _out, _err = finish(process)
    assert code == -signal.SIGKILL

    # The killed apply's lock is still there, naming the dead process.
    lock = lock_secret(conn, p)
    assert lock is not None
    assert f'"pid": {process.pid}' in (etree.fromstring(lock.XMLDesc(0).encode()).findtext("description") or "")

    # The plan shows exactly what is left: creates of what is not on the host, nothing else, no collision.
    left = planned(project)
    assert set(left.values()) == {"create"}, left
    assert not set(left) & set(created)
    owned_now = {f"volume.{v}" for v in on_host(conn, project)["volume"]} | {
        f"domain.{d}" for d in on_host(conn, project)["domain"]}
    assert set(left) | owned_now | {f"network.{p}-net", f"pool.{p}-pool"} == everything
    assert not set(left) & owned_now
    assert len(left) <= len(everything) - len(created)
    # Everything on the host is owned: volumes are in the ledger (a killed apply may have recorded one more
    # that it had not made yet; the plan creates it).
    assert {f"volume.{v}" for v in on_host(conn, project)["volume"]} <= set(ledger(conn, p)["volumes"])
    for name in on_host(conn, project)["domain"]:
        owner = etree.fromstring(conn.lookupByName(name).XMLDesc(0).encode()).find(
            "metadata/{https://vmform.dev/xmlns/owner/1}owner")
        assert owner is not None and owner.get("project") == p and owner.get("address") == f"domain.{name}"
    plan_text = project.run("plan", check=True).stdout
    print(f"killed after {len(created)} created lines; the next plan: {len(left)} to add\n{plan_text}")

    # The next apply removes the dead process's lock by itself, says so in one line, and completes the rest.
    second = project.run("apply", "--auto-approve")
    assert second.code == 0, second.stdout + second.stderr
    no_traceback(second.stderr)
    assert f"Removed a stale lock of project {p}: held by " in second.stderr
    assert f"(pid {process.pid}, apply)" in second.stderr and f"but process {process.pid} is no longer running" in second.stderr
    assert f"Apply complete! Resources: {len(left)} added, 0 changed, 0 destroyed." in second.stdout
    assert_converged(project, conn, volumes, domains)


def test_sigkill_during_an_image_upload_leaves_a_volume_the_next_apply_replaces(project: Any, conn: Any) -> None:
    """A volume is recorded as incomplete until its image is all uploaded: killed mid-upload, the next plan
    replaces it (no allow_data_loss needed: it never held its whole image), and the next apply completes it."""
    import hashlib

    p = project.prefix
    image = project.root / "disk.raw"
    with open(image, "wb") as handle:  # 512 MiB, mostly a hole: every byte of it goes through the upload stream
        handle.write(os.urandom(1 << 20))
        handle.seek((1 << 29) - (1 << 20))
        handle.write(os.urandom(1 << 20))
    project.write(f"""
pools:
  {p}-pool: {{path: {project.pool_dir}}}
volumes:
  {p}-img: {{pool: {p}-pool, source: {image}, format: raw}}
domains:
  {p}-vm: {{type: qemu, memory: 64MiB, disks: [{p}-img], state: stopped}}
""")
    process = start_apply(project)
    try:
        def volume_exists() -> bool:
            try:
                conn.storagePoolLookupByName(f"{p}-pool").storageVolLookupByName(f"{p}-img")
            except libvirt.libvirtError:
                return False
            return True

        _wait_for(volume_exists, "the volume to be created", limit=300)
        process.send_signal(signal.SIGSTOP)  # created, its upload under way: freeze, look, then kill
        entry = ledger(conn, p)["volumes"][f"volume.{p}-img"]
        assert entry.get("incomplete") is True, entry
        process.send_signal(signal.SIGKILL)
    finally:
        code, _out, _err = finish(process)
    assert code == -signal.SIGKILL
    left = project.plan_json()
    actions = {c["address"]: c["action"] for c in left["changes"]}
    assert actions == {f"volume.{p}-img": "delete_then_create", f"domain.{p}-vm": "create"}, actions
    second = project.run("apply", "--auto-approve")
    assert second.code == 0, second.stdout + second.stderr
    no_traceback(second.stderr)
    assert f"volume.{p}-img: replaced" in second.stdout
    path = conn.storagePoolLookupByName(f"{p}-pool").storageVolLookupByName(f"{p}-img").path()

    def digest(name: str) -> str:
        with open(name, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    assert digest(path) == digest(str(image)), "the volume holds the whole image"
    assert "incomplete" not in ledger(conn, p)["volumes"][f"volume.{p}-img"]
    assert "No changes." in project.run("plan", check=True).stdout


def test_a_lock_of_another_machine_is_removed_only_with_force_unlock(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(manifest(project, 1))
    holder = {"user": "ci", "machine": "elsewhere.example", "pid": 4242, "command": "apply", "since": 0,
              "boot_id": "x", "pid_ns": 1, "start_ticks": 1}
    secret = conn.secretDefineXML(
        f"<secret ephemeral='no' private='no'><description>vmform lock of project {p}: {json.dumps(holder)}"
        f"</description><usage type='iscsi'><target>vmform/{p}/lock</target></usage></secret>")
    blocked = project.run("apply", "--auto-approve")
    assert blocked.code == 1
    assert blocked.stderr.strip() == (
        f"Error: project {p} is locked: held by ci on elsewhere.example (pid 4242, apply) since 1970-01-01 00:00:00 "
        f"UTC; lock id {secret.UUIDString()}. If that process is gone, remove the lock with: "
        f"vmform force-unlock {secret.UUIDString()}")
    assert project.run("force-unlock", secret.UUIDString(), check=True).code == 0
    project.apply()
    assert_converged(project, conn, 1)


def test_libvirtd_restart_while_apply_waits_is_survived_by_reconnecting(private_project: Any) -> None:
    """apply plans, then waits for the lock; libvirtd restarts meanwhile: apply reconnects and completes."""
    project, conn = private_project, private_project.conn
    p = project.prefix
    volumes = 6
    project.write(manifest(project, volumes))
    holder = {"user": "ci", "machine": "elsewhere.example", "pid": 4242, "command": "apply", "since": 0}
    conn.secretDefineXML(
        f"<secret ephemeral='no' private='no'><description>vmform lock of project {p}: {json.dumps(holder)}"
        f"</description><usage type='iscsi'><target>vmform/{p}/lock</target></usage></secret>")
    process = start_apply(project, "--lock-timeout", "300")
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert line.startswith(f"Waiting up to 300s for the lock of project {p}, held by ci on elsewhere.example"), line
        with libvirtd_stopped(project):
            pass
        lock_secret(conn, p).undefine()  # the other apply is done
    finally:
        code, out, err = finish(process)
    assert code == 0, out + err
    no_traceback(err)
    assert f"Apply complete! Resources: {volumes + 2} added, 0 changed, 0 destroyed." in out
    print(out)
    assert_converged(project, conn, volumes)


def test_libvirtd_restart_mid_apply_is_reported_and_a_rerun_completes(private_project: Any) -> None:
    """apply is frozen (SIGSTOP) after 8 created lines, libvirtd restarts, apply goes on (SIGCONT): a change
    in flight is reported as interrupted, in one line; the rest runs on a new connection."""
    project, conn = private_project, private_project.conn
    volumes = 24
    project.write(manifest(project, volumes))
    process = start_apply(project)
    try:
        created = read_created(process, 8)
        process.send_signal(signal.SIGSTOP)
        try:
            with libvirtd_stopped(project):
                pass
        finally:
            process.send_signal(signal.SIGCONT)
    finally:
        code, out, err = finish(process)
    no_traceback(err)
    print(f"after {len(created)} created lines: exit {code}\n{out}\n{err}")
    if code == 0:  # the restart fell between two changes: apply reconnected and finished
        assert f"Apply complete! Resources: {volumes + 2} added" in out
    else:
        assert code == 1 and "Apply incomplete: " in out and " 1 interrupted" in out, out
        interrupted = [line for line in err.splitlines() if ": interrupted: the connection to libvirtd dropped" in line]
        assert len(interrupted) == 1, err
        rerun = project.run("apply", "--auto-approve")
        assert rerun.code == 0, rerun.stdout + rerun.stderr
        no_traceback(rerun.stderr)
    assert_converged(project, conn, volumes)


def test_libvirtd_restart_during_a_change_in_flight_reports_it_interrupted(private_project: Any) -> None:
    """A change in flight when libvirtd restarts (apply waits for a guest that ignores ACPI to shut down): apply
    reports it interrupted in one line, releases the lock through a new connection; a re-run completes."""
    project, conn = private_project, private_project.conn
    p = project.prefix
    process = start_shutdown_wait(project)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert line == f"domain {p}-vm: waiting up to 300s for the guest to shut down\n", line
        with libvirtd_stopped(project):
            pass
    finally:
        code, out, err = finish(process)
    print(out, line + err)
    assert code == 1
    no_traceback(err)
    assert "Apply incomplete: 0 done, 0 failed, 1 interrupted, 0 skipped." in out
    errors = err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(
        f"Error: domain.{p}-vm: interrupted: the connection to libvirtd dropped while it was in flight ("), err
    assert errors[0].endswith("); whether libvirtd carried it out is unknown until the next plan")
    assert lock_secret(conn, p) is None, "the lock is released through a new connection"
    assert conn.lookupByName(f"{p}-vm").isActive()
    assert planned(project) == {f"domain.{p}-vm": "update"}
    toml = project.root / "vmform.toml"
    toml.write_text(toml.read_text().replace("shutdown_timeout = 300\n", "shutdown_timeout = 1\n"))
    project.run("apply", "--auto-approve", "--force-off", check=True)
    assert not conn.lookupByName(f"{p}-vm").isActive()
    assert "No changes." in project.run("plan", check=True).stdout


def test_libvirtd_gone_mid_apply_names_what_was_and_was_not_done(private_project: Any) -> None:
    """libvirtd stops while apply runs and stays away longer than reconnect_timeout: apply says in one line what
    it did and what it did not; once libvirtd is back, the next apply (removing the dead lock) completes."""
    project, conn = private_project, private_project.conn
    p = project.prefix
    volumes = 24
    with open(project.root / "vmform.toml", "a") as settings:
        settings.write("reconnect_timeout = 0\n")
    project.write(manifest(project, volumes))
    process = start_apply(project)
    try:
        created = read_created(process, 8)
        process.send_signal(signal.SIGSTOP)
        try:
            with libvirtd_stopped(project):
                process.send_signal(signal.SIGCONT)
                code, out, err = finish(process)
        finally:
            process.send_signal(signal.SIGCONT)
    finally:
        if process.poll() is None:
            finish(process)
    print(f"after {len(created)} created lines: exit {code}\n{out}\n{err}")
    assert code == 1
    no_traceback(err)
    errors = [line for line in err.splitlines() if line.startswith("Error: lost the connection")]
    assert len(errors) == 1, err
    done = len(created) + len([line for line in out.splitlines() if CREATED.match(line)])
    assert errors[0].startswith(f"Error: lost the connection to {project.uri} and could not reconnect within 0s: ")
    assert f"; {done} done" in errors[0] and "not started: " in errors[0] and "Run vmform apply again" in errors[0]
    assert "Apply incomplete: " in out and " not started." in out
    # The lock could not be released (no daemon): said in a warning; the next apply removes it.
    assert "Warning: could not release the lock of project" in err
    rerun = project.run("apply", "--auto-approve")
    assert rerun.code == 0, rerun.stdout + rerun.stderr
    no_traceback(rerun.stderr)
    assert f"Removed a stale lock of project {p}" in rerun.stderr
    assert_converged(project, conn, volumes)


def test_one_failing_resource_does_not_stop_independent_ones(project: Any, conn: Any) -> None:
    p = project.prefix
    taken = f"{project.bridge_prefix}t"
    # Another network (not this project's) already uses the bridge name the manifest asks for.
    other = conn.networkDefineXML(f"<network><name>{p}-other</name><bridge name='{taken}'/></network>")
    other.create()
    project.write(f"""
networks:
  {p}-net: {{mode: isolated, bridge: {taken}, ipv4: {project.subnet}.1/24}}
  {p}-ok: {{mode: isolated, bridge: {project.bridge_prefix}b}}
pools:
  {p}-pool: {{path: {project.pool_dir}}}
volumes:
  {p}-huge: {{pool: {p}-pool, size: 10TiB, format: raw, preallocation: full}}
  {p}-a: {{pool: {p}-pool, size: 1MiB}}
  {p}-b: {{pool: {p}-pool, size: 1MiB}}
domains:
  {p}-vm:
    type: qemu
    memory: 64MiB
    disks: [{p}-huge]
    state: stopped
""")
    result = project.run("apply", "--auto-approve")
    print(result.stdout, result.stderr)
    assert result.code == 1
    no_traceback(result.stderr)
    assert "Apply incomplete: 4 done, 2 failed, 1 skipped." in result.stdout
    assert f"domain.{p}-vm: skipped (volume.{p}-huge failed)" in result.stdout
    errors = result.stderr.splitlines()
    assert len(errors) == 2 and errors[0].startswith(f"Error: network.{p}-net: ") and errors[1].startswith(
        f"Error: volume.{p}-huge: "), errors
    assert f"bridge name '{taken}' already in use" in errors[0] and "No space left on device" in errors[1], errors
    host = on_host(conn, project)
    assert host["volume"] == [f"{p}-a", f"{p}-b"] and host["network"] == [f"{p}-ok", f"{p}-other"], host
    assert sorted(ledger(conn, p)["volumes"]) == [f"volume.{p}-a", f"volume.{p}-b"]
    assert planned(project) == {f"network.{p}-net": "create", f"volume.{p}-huge": "create", f"domain.{p}-vm": "create"}
    assert lock_secret(conn, p) is None


def test_ctrl_c_finishes_the_change_in_flight_releases_the_lock_and_says_what_was_done(project: Any, conn: Any) -> None:
    p = project.prefix
    volumes = 24
    project.write(manifest(project, volumes))
    process = start_apply(project)
    try:
        created = read_created(process, 8)
        process.send_signal(signal.SIGINT)
    finally:
        code, out, err = finish(process)
    print(out, err)
    assert code == 130
    no_traceback(err)
    assert "Interrupted: finishing the changes in flight, starting no more" in err
    # What it says it did: the created lines read before the signal, and those printed after it.
    done = created + [m.group(1) for m in map(CREATED.match, out.splitlines()) if m]
    summary = [line for line in out.splitlines() if line.startswith("Apply interrupted: ")]
    left = volumes + 2 - len(done)
    assert summary == [f"Apply interrupted: {len(done)} done, 0 failed, 0 skipped, {left} not started."], out
    # What it says it did is exactly what the host has; nothing half-made, the lock released.
    assert lock_secret(conn, p) is None
    made = {f"volume.{v}" for v in on_host(conn, project)["volume"]}
    assert made == {a for a in done if a.startswith("volume.")}
    assert set(ledger(conn, p)["volumes"]) == made
    assert set(planned(project)) == declared(project, volumes) - set(done)
    project.apply()
    assert_converged(project, conn, volumes)


def test_ctrl_c_lets_the_change_in_flight_finish_and_starts_no_more(project: Any, conn: Any) -> None:
    """Ctrl-C while a change is in flight (apply waits for a guest to shut down): that change finishes (the guest
    is powered off after shutdown_timeout, allowed here), the next one never starts, the lock is released."""
    p = project.prefix
    toml = project.root / "vmform.toml"
    toml.write_text(toml.read_text().replace("shutdown_timeout = 5\n", "shutdown_timeout = 3\n"))
    text = f"""
domains:
  {p}-a: {{type: qemu, memory: 64MiB, state: STATE}}
  {p}-b: {{type: qemu, memory: 64MiB, state: STATE}}
"""
    project.write(text.replace("STATE", "running"))
    project.apply()
    project.write(text.replace("STATE", "stopped"))
    process = start_apply(project)
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
        assert re.fullmatch(rf"domain {p}-[ab]: waiting up to 3s for the guest to shut down\n", first), first
        process.send_signal(signal.SIGINT)
    finally:
        code, out, err = finish(process)
    print(out, first + err)
    assert code == 130
    no_traceback(err)
    in_flight = first.split()[1].rstrip(":")
    other = f"{p}-b" if in_flight == f"{p}-a" else f"{p}-a"
    assert f"domain.{in_flight}: updated (" in out
    assert "Apply interrupted: 1 done, 0 failed, 0 skipped, 1 not started." in out
    assert not conn.lookupByName(in_flight).isActive() and conn.lookupByName(other).isActive()
    assert lock_secret(conn, p) is None
    assert planned(project) == {f"domain.{other}": "update"}


def test_a_second_ctrl_c_stops_waiting_for_the_change_in_flight(project: Any, conn: Any) -> None:
    """The first Ctrl-C lets a change in flight finish; the second abandons it: reported interrupted, lock
    released, exit 130, no traceback."""
    p = project.prefix
    process = start_shutdown_wait(project)
    try:
        assert process.stderr is not None
        assert process.stderr.readline() == f"domain {p}-vm: waiting up to 300s for the guest to shut down\n"
        process.send_signal(signal.SIGINT)
        assert process.stderr.readline().startswith("Interrupted: finishing the changes in flight, starting no more")
        process.send_signal(signal.SIGINT)
    finally:
        code, out, err = finish(process)
    print(out, err)
    assert code == 130
    no_traceback(err)
    assert "Apply interrupted: 0 done, 0 failed, 1 interrupted, 0 skipped." in out
    assert err.splitlines() == [
        f"Error: domain.{p}-vm: interrupted: abandoned while in flight (Ctrl-C): libvirtd completes or fails it on its "
        "own; the next plan shows which"]
    assert lock_secret(conn, p) is None
    assert conn.lookupByName(f"{p}-vm").isActive()
    assert planned(project) == {f"domain.{p}-vm": "update"}


def test_a_guest_that_does_not_shut_down_is_forced_off_only_when_allowed(project: Any, conn: Any) -> None:
    p = project.prefix
    toml = project.root / "vmform.toml"
    toml.write_text(toml.read_text().replace("shutdown_timeout = 5\nforce_off = true\n", "shutdown_timeout = 2\n"))
    text = f"""
domains:
  {p}-vm: {{type: qemu, memory: 64MiB, state: STATE}}
"""
    project.write(text.replace("STATE", "running"))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    assert dom.isActive()
    # No OS: the guest ignores the ACPI request. Not allowed to force it off: the change fails, it keeps running.
    project.write(text.replace("STATE", "stopped"))
    refused = project.run("apply", "--auto-approve")
    assert refused.code == 1
    no_traceback(refused.stderr)
    assert refused.stderr.splitlines() == [f"domain {p}-vm: waiting up to 2s for the guest to shut down", (
        f"Error: domain.{p}-vm: the guest did not shut down within 2s (shutdown_timeout) and is left running; "
        "vmform powers a domain off only when allowed: apply --force-off, or force_off = true in vmform.toml")]
    assert dom.isActive()
    assert lock_secret(conn, p) is None
    # Allowed for this run: powered off after the timeout.
    project.run("apply", "--auto-approve", "--force-off", check=True)
    assert not dom.isActive()
    # Allowed in vmform.toml.
    project.write(text.replace("STATE", "running"))
    project.apply()
    toml.write_text(toml.read_text() + "force_off = true\n")
    project.write(text.replace("STATE", "stopped"))
    project.apply()
    assert not dom.isActive()
    assert "No changes." in project.run("plan", check=True).stdout
