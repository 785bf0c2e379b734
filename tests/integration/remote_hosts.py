"""Fake remote libvirt hosts for the integration tests: a second and a third system libvirtd on this machine.

Each fake host ("b", "c", …) is an independent system libvirtd with everything that makes it a host of its own:

- **A mount namespace** (``unshare -m --propagation private``), kept alive by a holder process (``sleep``) into
  which the daemons are started with ``nsenter -t HOLDER -m``. In it:

  - a tmpfs on ``/run`` (pid files, ``/run/libvirt/libvirt-sock``, virtlogd's socket, QEMU's monitor sockets,
    dnsmasq's files: nothing there can meet the host daemon's);
  - ``/etc/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt`` and ``/var/log/libvirt`` bind-mounted from
    ``STATE = /var/lib/vmform-test/hosts/<session>/<name>/{etc,lib,cache,log}``. ``etc`` is seeded with the host's
    ``*.conf`` files and ``nwfilter/`` only: the host's domains, networks, pools and secrets are never copied;
  - the host's own pool storage under ``pool_root`` (below).

  The network namespace is the host's: the daemon listens on 127.0.0.1 and its QEMUs' migration ports are on
  127.0.0.1 too. Bridges of networks a test defines on a fake host are real bridges of this machine: use
  isolated networks with ``vmft…`` bridge names, as on the host daemon.

- **libvirtd.conf**: ``listen_tls = 0``, ``listen_tcp = 1``, ``listen_addr = "127.0.0.1"``, its own ``tcp_port``,
  ``auth_tcp = "none"`` (tests only!) and its own ``host_uuid`` (libvirt refuses to migrate to a host with the same
  UUID; this machine has no SMBIOS, so ``getSysinfo`` fails and the UUID is read from ``getCapabilities``).
  libvirt 9.0 on Debian 12 without systemd: plain ``libvirtd --listen`` (no socket activation; ``--listen`` is only
  refused when systemd hands the daemon sockets). Its pid file and unix sockets are the defaults, on the private /run.
  ``virtlogd`` (QEMU's stdio goes through it) runs in the same namespace, started first. The daemons are executed
  through symlinks named ``vmftest-libvirtd``, ``vmftest-virtlogd`` and ``vmftest-sshd`` (a process's name is
  the basename it was executed as): ``pgrep -x libvirtd`` in scripts/bootstrap and ``pkill libvirtd``-style kills
  meant for the host's daemon never see them.
  ``lib``, ``cache`` and ``log`` get the host's first-level directories (modes and owners, no files), e.g.
  ``/var/log/libvirt/qemu`` where console logs go; the host's QEMU capability cache is copied (same binaries, so
  libvirt accepts it: about 4 s less before a fake host's first domain starts).

- **qemu.conf** (the host's, plus): ``cgroup_controllers = [ ]`` — without systemd, libvirt names a domain's cgroup
  ``machine/qemu-<id>-<name>.libvirt-qemu`` and two daemons count ids on their own, so during a migration both ends
  could ask for the same cgroup. QEMU runs as ``libvirt-qemu`` (the host's user; libvirtd creates and chowns its
  ``/var/lib/libvirt/qemu`` itself); domains are ``type='qemu'`` (TCG), /dev/kvm is not used.
  Not settable there: ``migration_address``/``migration_host = "127.0.0.1"`` make the QEMU driver fail to load
  ("must not be the address of the local machine"); pass the migration URI per migration instead (see
  docs/MULTIHOST-TESTING.md).

- **Reachable** as ``qemu+tcp://127.0.0.1:PORT/system`` (``RemoteHost.uri``); the start waits (bounded) until
  ``libvirt.open`` works, or fails with the daemon's log tail.

- **Storage**: ``pool_root`` (``/var/lib/vmform-test/hosts/<session>/pools``) is the *same path* on every fake host
  of a session but *different storage* on each: every namespace bind-mounts its own ``STATE/pools`` there (in this
  process's namespace the path is an empty directory). That is what real hosts look like — a pool at the same
  path on each — and what a migration with non-shared storage needs (the disk keeps its path; libvirt copies its
  contents). ``host_path(path)`` turns a daemon-side path into where this process sees the file. Any other path
  (e.g. ``/var/lib/vmform-test/<prefix>``) is one directory seen by every host, i.e. shared storage.

- **ssh transport** (``remote_host_ssh``: daemon c reached as ``qemu+ssh://``): an ``sshd`` on 127.0.0.1, on a free
  port, with a host key and a client key generated per session, runs *inside c's mount namespace* (started with
  ``nsenter`` like the daemons). libvirt's ssh transport runs ``ssh … sh -c '…virt-ssh-helper qemu:///system…
  || nc -U /var/run/libvirt/libvirt-sock'`` on the far side; both find c's socket because the commands sshd
  spawns see c's private /run. The URI is
  ``qemu+ssh://root@127.0.0.1:PORT/system?keyfile=KEY&no_tty=1&command=WRAPPER`` where WRAPPER is a two-line
  script running ``ssh -F /dev/null -o UserKnownHostsFile=KNOWN_HOSTS -o StrictHostKeyChecking=yes "$@"``: the
  host key is really verified against a known_hosts file made from the generated key, and root's ~/.ssh is never
  read or written. (``no_verify=1`` also works but makes ssh append the key to ~/.ssh/known_hosts.)
  The alternative of an sshd in the host's namespace with ``socket=/proc/HOLDER/root/run/libvirt/libvirt-sock``
  in the URI is not needed and not used.

- **Teardown** (also when tests fail): every domain on the fake host is destroyed and undefined, networks and pools
  stopped and undefined (the whole daemon belongs to the session); sshd, libvirtd and virtlogd get SIGTERM, then
  SIGKILL after a bound; QEMU or dnsmasq processes the daemon left (found from the pid files on its private /run)
  are killed; the holder is killed, which ends the namespace and with it its mounts; the state is removed. The
  daemons are started with PR_SET_PDEATHSIG, so they also end if pytest itself is killed; a later session removes
  state directories whose session process is gone.

Everything is started lazily, once per session, by the first test that asks for a fixture.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

POOL_ROOT = Path(os.environ.get("VMFORM_TEST_POOL_ROOT", "/var/lib/vmform-test"))
HOSTS_ROOT = POOL_ROOT / "hosts"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


def _libvirt() -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _die_with_parent(sig: int) -> Callable[[], None]:
    """A preexec_fn: the child gets ``sig`` when this process dies (so a killed pytest leaves no daemons).
    libc is loaded here, in the parent: the child between fork and exec only makes the call."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return arm


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path}: not readable)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path}: empty)"


def _stop(proc: subprocess.Popen[Any] | None, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _kill_pid(pid: int, expect: str) -> None:
    """SIGTERM/SIGKILL a process a fake daemon started, if it still runs and its command line has ``expect``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if expect.encode() not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class RemoteHost:
    """One fake host: an independent system libvirtd in its own mount namespace (see the module docstring).

    ``uri`` is the URI of the transport this object stands for (tcp, or ssh for ``remote_host_ssh``);
    ``tcp_uri`` and ``ssh_uri`` are both always there (``ssh_uri`` is None until sshd runs)."""

    def __init__(self, farm: FakeHosts, name: str, transport: str = "tcp") -> None:
        self.farm = farm
        self.name = name
        self.transport = transport
        self.state = farm.session_dir / name
        self.pool_root = str(farm.session_dir / "pools")  # the same path on every fake host, its own storage
        self.host_uuid = str(uuid.uuid4())
        self.port = 0
        self.ssh_port = 0
        self.ssh_uri: str | None = None
        self.ssh_key: Path | None = None
        self.holder: subprocess.Popen[Any] | None = None
        self.virtlogd: subprocess.Popen[Any] | None = None
        self.libvirtd: subprocess.Popen[Any] | None = None
        self.sshd: subprocess.Popen[Any] | None = None
        self._conns: dict[str, Any] = {}  # by transport; shared with the via_ssh() view

    # --- what tests use ------------------------------------------------------------------------------------
    @property
    def tcp_uri(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.port}/system"

    @property
    def uri(self) -> str:
        if self.transport == "ssh":
            assert self.ssh_uri is not None, "sshd is not running for this host"
            return self.ssh_uri
        return self.tcp_uri

    def open(self) -> Any:
        """A new libvirt connection over this object's transport; the caller closes it. When it fails, the
        libvirtError carries the daemons' log tail as a note."""
        libvirt = _libvirt()
        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            exc.add_note(f"fake host {self.name}:\n{self.log_tail(15)}")
            raise

    def conn(self) -> Any:
        """A connection over this object's transport, kept for the session (reopened if it died); do not close
        it."""
        cached = self._conns.get(self.transport)
        if cached is None or not cached.isAlive():
            cached = self._conns[self.transport] = self.open()
        return cached

    def via_ssh(self) -> RemoteHost:
        """The same daemon, with ``uri`` the qemu+ssh:// one (sshd started on first use)."""
        self.farm.ensure_sshd(self)
        return _TransportView(self, "ssh")

    def host_path(self, path: str | Path) -> Path:
        """Where this process sees a file that the daemon (and its QEMUs) see at ``path``: ``pool_root``,
        /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and /run are the host's own; any
        other path is the same file in both namespaces."""
        text = str(path)
        for inside, outside in ((self.pool_root, self.state / "pools"),
                                ("/etc/libvirt", self.state / "etc"),
                                ("/var/lib/libvirt", self.state / "lib"),
                                ("/var/cache/libvirt", self.state / "cache"),
                                ("/var/log/libvirt", self.state / "log"),
                                ("/var/run", self.run_dir),
                                ("/run", self.run_dir)):
            if text == inside or text.startswith(inside + "/"):
                return outside / text[len(inside):].lstrip("/")
        return Path(text)

    @property
    def run_dir(self) -> Path:
        """The daemon's private /run, as this process sees it."""
        assert self.holder is not None
        return Path(f"/proc/{self.holder.pid}/root/run")

    def log_tail(self, lines: int = 30) -> str:
        states = [f"{name}: " + ("not started" if proc is None else "running" if proc.poll() is None
                                 else f"exited with {proc.returncode}")
                  for name, proc in (("libvirtd", self.libvirtd), ("virtlogd", self.virtlogd), ("sshd", self.sshd))]
        parts = ["; ".join(states),
                 f"--- {self.state / 'libvirtd.stderr'}", _tail(self.state / "libvirtd.stderr", lines),
                 f"--- {self.state / 'log/libvirtd.log'}", _tail(self.state / "log" / "libvirtd.log", lines),
                 f"--- {self.state / 'virtlogd.stderr'}", _tail(self.state / "virtlogd.stderr", 10)]
        if self.sshd is not None:
            parts += [f"--- {self.state / 'sshd.stderr'}", _tail(self.state / "sshd.stderr", lines)]
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"<RemoteHost {self.name} {self.uri if self.port else '(not started)'}>"

    # --- start ---------------------------------------------------------------------------------------------
    def _seed(self) -> None:
        for sub in ("etc", "lib", "cache", "log", "pools", "ssh", "bin"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        # The daemons run under names of their own (a process's name is the basename it was executed as), so
        # `pgrep -x libvirtd` in scripts/bootstrap never takes a fake host for the host's daemon and a `pkill
        # libvirtd` meant for the host's leaves them alone.
        for program in ("libvirtd", "virtlogd", "sshd"):
            real = shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")
            if real is None:
                raise RuntimeError(f"fake host {self.name}: {program} is not installed (run scripts/bootstrap)")
            (self.state / "bin" / f"vmftest-{program}").symlink_to(real)
        self.state.chmod(0o711)
        (self.state / "pools").chmod(0o755)  # QEMU (libvirt-qemu) reaches its disks through it
        (self.state / "ssh").chmod(0o700)
        # The host's directory layout (first level, with modes and owners; no files): /var/log/libvirt/qemu for
        # console logs, /var/lib/libvirt/images, /var/lib/libvirt/qemu owned by libvirt-qemu, …
        for outside, inside in (("lib", "/var/lib/libvirt"), ("cache", "/var/cache/libvirt"),
                                ("log", "/var/log/libvirt")):
            with contextlib.suppress(OSError):
                for entry in Path(inside).iterdir():
                    if entry.is_dir() and not entry.is_symlink():
                        info = entry.stat()
                        target = self.state / outside / entry.name
                        target.mkdir(exist_ok=True)
                        target.chmod(info.st_mode & 0o7777)
                        os.chown(target, info.st_uid, info.st_gid)
        etc = self.state / "etc"
        for item in Path("/etc/libvirt").iterdir():
            if item.is_file() and item.suffix == ".conf":
                shutil.copy2(item, etc / item.name)
        if Path("/etc/libvirt/nwfilter").is_dir():
            shutil.copytree("/etc/libvirt/nwfilter", etc / "nwfilter", dirs_exist_ok=True)
        for sub in ("qemu/networks/autostart", "qemu/autostart", "storage/autostart", "secrets", "hooks"):
            (etc / sub).mkdir(parents=True, exist_ok=True)
        # The host daemon's QEMU capability cache (same binaries, same libvirt): probing QEMU again would cost each
        # fake host about 4 s on its first domain. libvirt checks the cache's validity itself and probes if stale.
        host_caps = Path("/var/cache/libvirt/qemu/capabilities")
        if host_caps.is_dir():
            shutil.copytree(host_caps, self.state / "cache" / "qemu" / "capabilities", dirs_exist_ok=True)
        self._write_libvirtd_conf()
        with open(etc / "qemu.conf", "a") as qemu_conf:
            qemu_conf.write(
                "\n# vmform test fake host (tests/integration/remote_hosts.py)\n"
                "cgroup_controllers = [ ]\n"
            )

    def _write_libvirtd_conf(self) -> None:
        (self.state / "etc" / "libvirtd.conf").write_text(
            "# vmform test fake host (tests/integration/remote_hosts.py): TCP without auth, tests only\n"
            "listen_tls = 0\n"
            "listen_tcp = 1\n"
            'listen_addr = "127.0.0.1"\n'
            f'tcp_port = "{self.port}"\n'
            'auth_tcp = "none"\n'
            f'host_uuid = "{self.host_uuid}"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        )

    def _start_holder(self) -> None:
        pools_mount = self.pool_root
        script = "\n".join([
            "set -e",
            "mount -t tmpfs -o mode=755 vmftest-run /run",
            "mkdir -p /run/libvirt /run/lock /run/sshd",
            f"mount --bind {self.state}/etc /etc/libvirt",
            f"mount --bind {self.state}/lib /var/lib/libvirt",
            f"mount --bind {self.state}/cache /var/cache/libvirt",
            f"mount --bind {self.state}/log /var/log/libvirt",
            f"mount --bind {self.state}/pools {pools_mount}",
            "echo ready",
            "exec sleep 2147483647",
        ])
        Path(pools_mount).mkdir(parents=True, exist_ok=True)
        Path(pools_mount).chmod(0o755)
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_die_with_parent(signal.SIGKILL),
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            _stop(self.holder, 2)
            err = self.holder.stderr.read() if self.holder.stderr else ""
            raise RuntimeError(f"fake host {self.name}: the mount namespace could not be set up: {line} {err}")

    def _program(self, name: str) -> str:
        return str(self.state / "bin" / f"vmftest-{name}")

    def _in_namespace(self, argv: list[str], log_name: str) -> subprocess.Popen[Any]:
        assert self.holder is not None
        log = open(self.state / log_name, "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(
                ["nsenter", "-t", str(self.holder.pid), "-m", "--", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(signal.SIGTERM), start_new_session=True,
            )
        finally:
            log.close()

    def _wait_for(self, what: str, ready: Callable[[], bool], proc: subprocess.Popen[Any]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"fake host {self.name}: {what} exited with {proc.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake host {self.name}: {what} not ready after {START_TIMEOUT:.0f} s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def start(self) -> None:
        self._seed()
        self._start_holder()
        self.virtlogd = self._in_namespace([self._program("virtlogd")], "virtlogd.stderr")
        self._wait_for("virtlogd", lambda: (self.run_dir / "libvirt" / "virtlogd-sock").exists(), self.virtlogd)
        for _attempt in range(3):  # the free port may be taken between the probe and libvirtd's bind
            self.port = free_port()
            self._write_libvirtd_conf()
            try:
                self.start_libvirtd()
                return
            except RuntimeError:
                assert self.libvirtd is not None
                if self.libvirtd.poll() is None or "in use" not in _tail(self.state / "log" / "libvirtd.log"):
                    raise
        raise RuntimeError(f"fake host {self.name}: libvirtd found no free port\n{self.log_tail()}")

    def start_libvirtd(self) -> None:
        """Start libvirtd (again: after ``stop_libvirtd`` it keeps its port, UUID and objects; domains that kept
        running are found again) and wait until it answers."""
        libvirt = _libvirt()
        self.libvirtd = self._in_namespace([self._program("libvirtd"), "--listen"], "libvirtd.stderr")
        last_error = ""

        def answers() -> bool:
            nonlocal last_error
            try:
                libvirt.open(self.tcp_uri).close()
                return True
            except libvirt.libvirtError as exc:
                last_error = str(exc)
                return False

        try:
            self._wait_for(f"libvirtd on {self.tcp_uri}", answers, self.libvirtd)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nlast connection error: {last_error}") from None

    def stop_libvirtd(self, kill: bool = False) -> None:
        """Stop only libvirtd (SIGTERM, then SIGKILL after a bound; ``kill``: SIGKILL at once, as a crash): the
        host is unreachable, its domains keep running, and everything it keeps on disk (domains, networks,
        pools, secrets, its port and UUID) is there when ``start_libvirtd`` starts it again.

        Call it (and ``start_libvirtd``) from the main thread: the daemon is started with PR_SET_PDEATHSIG, which
        fires when the *thread* that started it ends."""
        for cached in self._conns.values():
            with contextlib.suppress(Exception):
                cached.close()
        self._conns.clear()
        if kill and self.libvirtd is not None and self.libvirtd.poll() is None:
            self.libvirtd.kill()
            self.libvirtd.wait(STOP_TIMEOUT)
        _stop(self.libvirtd)

    def restart_libvirtd(self, kill: bool = False) -> None:
        """Stop libvirtd (``kill``: with SIGKILL) and start it again; it answers when this returns."""
        self.stop_libvirtd(kill)
        self.start_libvirtd()

    @property
    def libvirtd_running(self) -> bool:
        return self.libvirtd is not None and self.libvirtd.poll() is None

    @contextlib.contextmanager
    def unreachable(self) -> Iterator[None]:
        """The host's libvirtd is stopped for the body and started again afterwards, whatever happens."""
        self.stop_libvirtd()
        try:
            yield
        finally:
            self.start_libvirtd()

    def start_sshd(self) -> None:
        ssh = self.state / "ssh"
        for key in ("host_key", "client_key"):
            if not (ssh / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vmftest-{self.name}",
                                "-f", str(ssh / key)], check=True, capture_output=True)
        shutil.copy2(ssh / "client_key.pub", ssh / "authorized_keys")
        host_pub = (ssh / "host_key.pub").read_text().split()
        last = ""
        for _attempt in range(3):
            self.ssh_port = free_port()
            (ssh / "sshd_config").write_text("\n".join([
                f"Port {self.ssh_port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {ssh}/host_key",
                f"AuthorizedKeysFile {ssh}/authorized_keys",
                "PidFile /run/sshd-vmftest.pid",
                "PermitRootLogin prohibit-password",
                "AllowUsers root",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "PrintMotd no",
                "X11Forwarding no",
                "AllowTcpForwarding no",
                "LogLevel VERBOSE",
                "",
            ]))
            (ssh / "known_hosts").write_text(f"[127.0.0.1]:{self.ssh_port} {host_pub[0]} {host_pub[1]}\n")
            wrapper = ssh / "ssh"
            wrapper.write_text(
                "#!/bin/sh\n"
                "# libvirt's qemu+ssh command for the fake host: verify the session's host key, leave ~/.ssh alone\n"
                f'exec ssh -F /dev/null -o UserKnownHostsFile={ssh}/known_hosts -o GlobalKnownHostsFile=/dev/null '
                f'-o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10 "$@"\n'
            )
            wrapper.chmod(0o755)
            self.ssh_key = ssh / "client_key"
            self.ssh_uri = (f"qemu+ssh://root@127.0.0.1:{self.ssh_port}/system"
                            f"?keyfile={self.ssh_key}&no_tty=1&command={wrapper}")
            self.sshd = self._in_namespace([self._program("sshd"), "-D", "-e", "-f", f"{ssh}/sshd_config"], "sshd.stderr")

            def listening() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", self.ssh_port), timeout=1).close()
                    return True
                except OSError:
                    return False

            try:
                self._wait_for(f"sshd on 127.0.0.1:{self.ssh_port}", listening, self.sshd)
                return
            except RuntimeError as exc:
                last = str(exc)
                if self.sshd.poll() is None:
                    raise
        raise RuntimeError(f"fake host {self.name}: sshd did not start\n{last}")

    # --- stop ----------------------------------------------------------------------------------------------
    def _remove_objects(self) -> None:
        """Every domain, network and pool on this fake daemon (all of them belong to the session)."""
        libvirt = _libvirt()
        try:
            conn = libvirt.open(self.tcp_uri)
        except libvirt.libvirtError:
            return
        try:
            for dom in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                      | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                                      | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            for net in conn.listAllNetworks():
                with contextlib.suppress(libvirt.libvirtError):
                    if net.isActive():
                        net.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    net.undefine()
            for pool in conn.listAllStoragePools():
                with contextlib.suppress(libvirt.libvirtError):
                    if pool.isActive():
                        pool.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    pool.undefine()
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _children(self) -> list[tuple[int, str]]:
        """QEMU and dnsmasq processes this daemon started, from the pid files on its private /run."""
        found: list[tuple[int, str]] = []
        if self.holder is None or self.holder.poll() is not None:
            return found
        for sub, expect in (("libvirt/qemu", "qemu"), ("libvirt/network", "dnsmasq")):
            with contextlib.suppress(OSError):
                for pidfile in (self.run_dir / sub).glob("*.pid"):
                    with contextlib.suppress(OSError, ValueError):
                        found.append((int(pidfile.read_text().strip()), expect))
        return found

    def _namespace_pids(self) -> list[int]:
        """Every process in this host's mount namespace but the holder (all started by this fixture: sshd
        sessions, virt-ssh-helper, nc, …)."""
        if self.holder is None or self.holder.poll() is not None:
            return []
        try:
            ns = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        except OSError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.holder.pid:
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "ns" / "mnt") == ns:
                        found.append(int(entry.name))
        return found

    def stop(self) -> None:
        for cached in self._conns.values():
            with contextlib.suppress(Exception):
                cached.close()
        self._conns.clear()
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            self._remove_objects()
        children = self._children()
        _stop(self.libvirtd)  # first: the ssh sessions' helpers lose their socket and end
        _stop(self.sshd)
        _stop(self.virtlogd)
        for pid, expect in children:
            _kill_pid(pid, expect)
        for pid in self._namespace_pids():
            _kill_pid(pid, "")
        _stop(self.holder, 2)  # the last process of the namespace: its mounts go with it
        shutil.rmtree(self.state, ignore_errors=True)


class _TransportView(RemoteHost):
    """The same fake host through another transport: ``transport`` is its own, every other attribute (daemons,
    ports, cached connections) is read from and written to the host itself, so both always agree."""

    def __init__(self, host: RemoteHost, transport: str) -> None:  # RemoteHost.__init__ deliberately not called
        self.__dict__["_host"] = host
        self.__dict__["transport"] = transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_host"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_host"], name, value)


class FakeHosts:
    """The session's fake hosts, started on first use."""

    def __init__(self) -> None:
        self.session = f"vmftest-{secrets.token_hex(3)}"
        self.session_dir = HOSTS_ROOT / self.session
        self.hosts: dict[str, RemoteHost] = {}
        self._remove_stale()

    @staticmethod
    def _remove_stale() -> None:
        """State left by sessions whose pytest is gone (their daemons died with them: PR_SET_PDEATHSIG)."""
        if not HOSTS_ROOT.is_dir():
            return
        for old in HOSTS_ROOT.iterdir():
            try:
                owner = int((old / "owner.pid").read_text())
            except (OSError, ValueError):
                continue
            if not _alive(owner):
                shutil.rmtree(old, ignore_errors=True)

    def host(self, name: str) -> RemoteHost:
        if name not in self.hosts:
            self.session_dir.mkdir(parents=True, exist_ok=True)
            for directory in (POOL_ROOT, HOSTS_ROOT, self.session_dir):
                directory.chmod(0o755)
            (self.session_dir / "owner.pid").write_text(str(os.getpid()))
            host = RemoteHost(self, name)
            self.hosts[name] = host
            try:
                host.start()
            except BaseException:
                host.stop()
                del self.hosts[name]
                raise
        return self.hosts[name]

    def ensure_sshd(self, host: RemoteHost) -> None:
        if host.sshd is None or host.sshd.poll() is not None:
            host.start_sshd()

    def stop(self) -> None:
        for host in self.hosts.values():
            host.stop()
        self.hosts.clear()
        shutil.rmtree(self.session_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def remote_hosts() -> Iterator[FakeHosts]:
    """The session's fake hosts; ``remote_hosts.host("d")`` starts another one."""
    farm = FakeHosts()
    try:
        yield farm
    finally:
        farm.stop()


@pytest.fixture(scope="session")
def remote_host_b(remote_hosts: FakeHosts) -> RemoteHost:
    """Fake host b, over qemu+tcp://127.0.0.1:PORT/system."""
    return remote_hosts.host("b")


@pytest.fixture(scope="session")
def remote_host_c(remote_hosts: FakeHosts) -> RemoteHost:
    """Fake host c, over qemu+tcp://127.0.0.1:PORT/system."""
    return remote_hosts.host("c")


@pytest.fixture
def private_daemon(remote_hosts: FakeHosts) -> Iterator[RemoteHost]:
    """A private libvirtd of the session's own, for tests that stop, restart or kill a daemon (never the host's):
    a fake host like b and c (started once per session), reached over qemu+tcp.
    ``project.use_private_daemon(private_daemon)`` points a project at it. Running when the test starts, and
    started again after it if the test left it stopped (before the project fixture cleans it up)."""
    host = remote_hosts.host("private")  # started on the first use, kept for the session
    if not host.libvirtd_running:
        host.start_libvirtd()
    yield host
    if not host.libvirtd_running:
        host.start_libvirtd()


@pytest.fixture(scope="session")
def remote_host_ssh(remote_host_c: RemoteHost) -> RemoteHost:
    """Fake host c again, with ``uri`` its qemu+ssh:// URI (through an sshd in c's namespace)."""
    return remote_host_c.via_ssh()
