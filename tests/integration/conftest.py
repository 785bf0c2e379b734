"""Integration fixtures: a vmform project in a temp dir, driven through the real CLI against the real
libvirt daemon. Every object is named vmftest-<id>-… and removed at teardown, even when the test fails."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Fake remote libvirt hosts (remote_host_b, remote_host_c, remote_host_ssh) and the private daemon of the tests that
# stop or restart one (private_daemon), started lazily when a test asks.
from tests.integration.remote_hosts import (  # noqa: F401
    private_daemon,
    remote_host_b,
    remote_host_c,
    remote_host_ssh,
    remote_hosts,
)

URI = os.environ.get("VMFORM_TEST_URI", "qemu:///system")
POOL_ROOT = Path(os.environ.get("VMFORM_TEST_POOL_ROOT", "/var/lib/vmform-test"))


def _subnets_in_use() -> set[str]:
    """The 10.x.y prefixes of the host's addresses (libvirt networks that run, quickstart, …)."""
    try:
        shown = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {".".join(word.split("/")[0].split(".")[:3]) for word in shown.split() if word.startswith("10.")}


def _free_subnet(number: int) -> str:
    """A /24 of the test's own (10.200-249.x.0) that no host interface uses, so side-by-side runs and a running
    quickstart never fight over a subnet."""
    used = _subnets_in_use()
    for attempt in range(50 * 256):
        candidate = (number + attempt * 7919) % (50 * 256)
        subnet = f"10.{200 + candidate % 50}.{candidate // 50}"
        if subnet not in used:
            return subnet
    return f"10.{200 + number % 50}.{(number // 50) % 256}"


def _libvirt() -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


class _Connection:
    """A libvirt connection that is opened again when its daemon dropped it: every attribute is the current
    connection's. The suite never restarts the host's daemon, but a private one (``project.use_private_daemon``)
    is restarted by test_faults.py and test_contract_property.py, and an admin may restart the host's."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn = _libvirt().open(uri)

    def _current(self) -> Any:
        if not self._conn.isAlive():
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - a dead connection
                pass
            self._conn = _libvirt().open(self.uri)
        return self._conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current(), name)


# Journal entries that serve no planned change and are still allowed: the project lock, and (until issue 21
# makes adoption a planned change) what `vmform import` marks as owned.
OUTSIDE_PLAN_CATEGORIES = {"lock", "import"}


def unplanned_mutations(path: Path) -> list[dict[str, Any]]:
    """The entries of a journal (JSON lines) that were refused or serve no planned change. A last line cut off
    (an apply killed mid-write) is skipped."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry["verdict"] != "ok" or (entry["address"] is None and entry["category"] not in OUTSIDE_PLAN_CATEGORIES):
            found.append(entry)
    return found


@pytest.fixture(autouse=True)
def journal_check(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every vmform the test runs (CLI subprocesses and in-process calls) journals its libvirt mutations to a
    file of this test's; the test fails when any of them was refused or served no planned change."""
    path = tmp_path_factory.mktemp("journal") / "journal.jsonl"
    monkeypatch.setenv("VMFORM_JOURNAL", str(path))
    yield path
    bad = unplanned_mutations(path)
    if bad:
        shown = "\n".join(f"  {e['call']} on {e['kind']} {e['name']} (host {e['host']}, serving {e['address']} "
                           f"{e['action']}, {e['category']}): {e['verdict']}{': ' + e['reason'] if e['reason'] else ''}"
                           for e in bad[:20])
        pytest.fail(f"{len(bad)} libvirt mutation(s) outside the plan (journal {path}):\n{shown}", pytrace=False)


@pytest.fixture(scope="session")
def conn() -> Iterator[Any]:
    libvirt = _libvirt()
    try:
        connection = _Connection(URI)
    except libvirt.libvirtError as exc:  # pragma: no cover - the suite needs the daemon
        pytest.fail(f"the integration tests need libvirtd at {URI}: {exc}")
    yield connection
    connection.close()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


class TestProject:
    """A vmform project whose libvirt objects all start with ``prefix``."""

    def __init__(self, root: Path, prefix: str, conn: Any) -> None:
        self.root = root
        self.prefix = prefix
        self.conn = conn
        self.uri = URI
        self.daemons: list[Any] = [conn]  # the connections whose daemons the fixture cleans up afterwards
        self.bridge_prefix = "vmft" + prefix.split("-")[1][:6]  # bridge names: at most 15 characters
        # QEMU runs as another user: pools live where it can reach them, not in pytest's private tmp.
        self.pool_dir = POOL_ROOT / prefix
        # A /24 of its own (10.200-249.x.0), so tests running side by side never fight over a subnet.
        number = int(prefix.split("-")[1], 16)
        self.subnet = _free_subnet(number)
        # Test domains mostly have no OS and never answer an ACPI shutdown: they may be powered off after 5 s.
        (root / "vmform.toml").write_text(
            f'[project]\nname = "{prefix}"\nuri = "{URI}"\nmanifests = ["*.yaml"]\nparallelism = 4\nshutdown_timeout = 5\n'
            'force_off = true\npool_roots = ["' + str(POOL_ROOT) + '"]\n'
        )

    def use_private_daemon(self, host: Any) -> None:
        """Point the project at ``host``, a private libvirtd the suite started (a fake host of remote_hosts.py),
        instead of the host's daemon: vmform.toml's ``uri``, ``self.conn`` (reopened when the daemon restarts)
        and the fixture's cleanup. For tests that stop, restart or kill the daemon."""
        settings = self.root / "vmform.toml"
        settings.write_text(settings.read_text().replace(f'uri = "{self.uri}"', f'uri = "{host.tcp_uri}"'))
        self.uri = host.tcp_uri
        self.conn = _Connection(host.tcp_uri)
        self.daemons.append(self.conn)

    def write(self, text: str, name: str = "main.yaml") -> None:
        body = textwrap.dedent(text).replace("PFX", self.prefix).replace("BRP", self.bridge_prefix)
        (self.root / name).write_text(body)

    def run(self, *args: str, check: bool | None = None) -> Result:
        env = {**os.environ, "NO_COLOR": "1"}
        completed = subprocess.run(
            [sys.executable, "-m", "vmform", "-C", str(self.root), *args],
            capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL,
        )
        result = Result(completed.returncode, completed.stdout, completed.stderr)
        if check is True and result.code != 0:
            raise AssertionError(f"vmform {' '.join(args)} exited {result.code}\n{result.stdout}\n{result.stderr}")
        return result

    def plan_json(self) -> dict[str, Any]:
        result = self.run("plan", "--json", check=True)
        return json.loads(result.stdout)

    def apply(self) -> Result:
        return self.run("apply", "--auto-approve", check=True)

    def cleanup(self, on: Any = None) -> None:
        """Remove every libvirt object carrying this test's prefix (and only those), on the host daemon or on
        the connection ``on`` (a fake remote host)."""
        libvirt = _libvirt()
        conn = on or self.conn
        for dom in conn.listAllDomains():
            if dom.name().startswith(self.prefix):
                persistent = dom.isPersistent()  # a transient one (test_state_drift.py) is gone once destroyed
                if dom.isActive():
                    dom.destroy()
                if persistent:
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        for pool in conn.listAllStoragePools():
            if pool.name().startswith(self.prefix):
                if pool.isActive():
                    for vol in pool.listAllVolumes():
                        vol.delete(0)
                    pool.destroy()
                try:
                    pool.delete(0)
                except libvirt.libvirtError:
                    pass
                pool.undefine()
        for net in conn.listAllNetworks():
            if net.name().startswith(self.prefix):
                persistent = net.isPersistent()
                if net.isActive():
                    net.destroy()
                if persistent:
                    net.undefine()
        for secret in conn.listAllSecrets():
            if (secret.usageID() or "").startswith(f"vmform/{self.prefix}/"):
                secret.undefine()

    def leftovers(self, on: Any = None) -> list[str]:
        conn = on or self.conn
        found = [f"domain {d.name()}" for d in conn.listAllDomains() if d.name().startswith(self.prefix)]
        found += [f"network {n.name()}" for n in conn.listAllNetworks() if n.name().startswith(self.prefix)]
        found += [f"pool {p.name()}" for p in conn.listAllStoragePools() if p.name().startswith(self.prefix)]
        found += [f"secret {s.usageID()}" for s in conn.listAllSecrets() if (s.usageID() or "").startswith(f"vmform/{self.prefix}/")]
        return found


@pytest.fixture
def project(tmp_path: Path, conn: Any) -> Iterator[TestProject]:
    prefix = f"vmftest-{secrets.token_hex(3)}"
    test_project = TestProject(tmp_path, prefix, conn)
    try:
        yield test_project
    finally:
        failures: list[BaseException] = []
        for daemon in test_project.daemons:  # each one, even when another's cleanup failed
            try:
                test_project.cleanup(daemon)
            except Exception as exc:  # noqa: BLE001 - raised below, after the others
                failures.append(exc)
        shutil.rmtree(test_project.pool_dir, ignore_errors=True)
        if failures:
            raise failures[0]
