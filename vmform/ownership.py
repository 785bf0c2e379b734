"""Who owns what, and the project lock — all kept on the libvirt host itself, reached through the connection.

- Domains and networks carry ``<metadata><vmform:owner project=… address=…/></metadata>``.
- Pools and volumes have no metadata element in libvirt. Their ownership is kept in a *ledger*: a
  libvirt secret (usage ``vmform/<project>/ledger``, not private) whose value is the zlib-compressed JSON
  list of owned pools (with the UUID vmform gave them) and volumes. Secrets live in libvirtd's secret
  driver, so every checkout, CI runner or remote ``qemu+ssh://`` client of the host sees the same ledger.
- The lock is another secret, ``vmform/<project>/lock``: defining a secret whose usage already exists
  fails, which makes taking the lock atomic on the host.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from vmform.connection import libvirt_message
from vmform.errors import HostError, LockError

if TYPE_CHECKING:
    import libvirt

NAMESPACE = "https://vmform.dev/xmlns/owner/1"
PREFIX = "vmform"
# Live-only record of the balloon target vmform asked for and the size the guest reported then.
BALLOON_NAMESPACE = "https://vmform.dev/xmlns/balloon/1"
LEDGER_VERSION = 1
# What the next plan reads as the content of a volume (or seed) whose upload did not finish: a ledger entry is
# marked "incomplete" before the volume is created and unmarked once its image is all there, so an apply
# killed or cut off during the upload leaves a volume the next plan replaces, never one it takes as done.
INCOMPLETE_UPLOAD = "incomplete upload (interrupted)"


def owner_element(project: str, address: str) -> etree._Element:
    return etree.Element(f"{{{NAMESPACE}}}owner", nsmap={PREFIX: NAMESPACE}, project=project, address=address)


def set_owner(root: etree._Element, project: str, address: str) -> None:
    metadata = root.find("metadata")
    if metadata is None:
        metadata = etree.SubElement(root, "metadata")
    for old in metadata.findall(f"{{{NAMESPACE}}}owner"):
        metadata.remove(old)
    metadata.append(owner_element(project, address))


def read_owner(root: etree._Element) -> tuple[str, str] | None:
    """(project, address) from a domain's or network's XML, or None when vmform does not own it."""
    node = root.find(f"metadata/{{{NAMESPACE}}}owner")
    if node is None or not node.get("project") or not node.get("address"):
        return None
    return node.get("project"), node.get("address")  # type: ignore[return-value]


def _usage(project: str, what: str) -> str:
    return f"vmform/{project}/{what}"


def _secret_xml(description: str, usage: str) -> str:
    root = etree.Element("secret", ephemeral="no", private="no")
    etree.SubElement(root, "description").text = description
    usage_node = etree.SubElement(root, "usage", type="iscsi")
    etree.SubElement(usage_node, "target").text = usage
    return etree.tostring(root, encoding="unicode")


def _lookup_secret(conn: libvirt.virConnect, usage: str) -> libvirt.virSecret | None:
    import libvirt

    try:
        return conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
            return None
        raise HostError(f"cannot read vmform's records on the host: {libvirt_message(exc)}") from None


@dataclass(frozen=True)
class Recorded:
    """What one ``Ledger.record`` did, so that ``Ledger.undo`` can put back exactly what was there before: the
    entry the address had (None: none) and, when that entry described another object, where it was moved."""

    kind: str
    address: str
    entry: dict[str, Any]
    previous: dict[str, Any] | None
    displaced_to: str | None


@dataclass
class Ledger:
    """Owned pools and volumes of one project on one host.

    Saving is read-modify-write: ``save`` reads the ledger on the host again, replays what this process
    recorded, undid and forgot since its last save, and writes the result, so it never overwrites entries it
    did not write itself (another apply's, made while this one ran)."""

    project: str
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)  # address -> {name, uuid}
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)  # address -> {pool, name, source_sha256?}
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # What changed since the last save, in order: ("record", Recorded) / ("undo", Recorded) /
    # ("forget", (kind, address, identity)).
    _pending: list[tuple[str, Any]] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def load(cls, conn: libvirt.virConnect, project: str) -> Ledger:
        pools, volumes = _read_entries(conn, project)
        return cls(project, pools, volumes)

    def save(self, conn: libvirt.virConnect) -> None:
        """Write this process's changes into the ledger as the host holds it now (read, replay, write)."""
        import libvirt

        with self._lock:
            replayed = len(self._pending)
            changes = list(self._pending)
        pools, volumes = _read_entries(conn, self.project)
        for operation, argument in changes:
            _replay(pools, volumes, operation, argument)
        payload = {"version": LEDGER_VERSION, "project": self.project, "pools": pools, "volumes": volumes}
        usage = _usage(self.project, "ledger")
        try:
            secret = _lookup_secret(conn, usage)
            if not payload["pools"] and not payload["volumes"]:
                if secret is not None:
                    secret.undefine()
            else:
                if secret is None:
                    secret = conn.secretDefineXML(
                        _secret_xml(f"vmform ownership ledger of project {self.project} (pools and volumes)", usage)
                    )
                secret.setValue(zlib.compress(json.dumps(payload, sort_keys=True).encode(), 9))
        except libvirt.libvirtError as exc:
            raise HostError(f"cannot record ownership on the host: {libvirt_message(exc)}") from None
        with self._lock:
            # What the host holds now, plus what was changed here while this save ran (saved next time).
            del self._pending[:replayed]
            for operation, argument in self._pending:
                _replay(pools, volumes, operation, argument)
            self.pools, self.volumes = pools, volumes

    def pool_address(self, name: str, uuid: str) -> str | None:
        for address, entry in self.pools.items():
            if entry.get("name") == name and entry.get("uuid") == uuid:
                return address
        return None

    def volume_address(self, pool: str, name: str) -> str | None:
        for address, entry in self.volumes.items():
            if entry.get("pool") == pool and entry.get("name") == name:
                return address
        return None

    def has(self, kind: str, address: str, **identity: Any) -> bool:
        """Whether an entry under ``address`` describes this object (name=, pool=, uuid=)."""
        with self._lock:
            entry = (self.pools if kind == "pool" else self.volumes).get(address)
            return entry is not None and all(entry.get(k) == v for k, v in identity.items())

    def record(self, kind: str, address: str, entry: dict[str, Any]) -> Recorded:
        """Own a new object. An older object still recorded under the address (create-before-destroy)
        stays owned under ``address~replaced-N`` until it is deleted, so it is never orphaned. The result
        lets ``undo`` take back exactly this record when the create it was made for is refused."""
        with self._lock:
            done = _record(self.pools if kind == "pool" else self.volumes, kind, address, entry)
            self._pending.append(("record", done))
            return done

    def undo(self, recorded: Recorded) -> None:
        """Take back a ``record`` whose create libvirt refused: what the address held before comes back
        (an entry another apply wrote stays exactly as it was); nothing else changes."""
        with self._lock:
            _undo(self.pools if recorded.kind == "pool" else self.volumes, recorded)
            self._pending.append(("undo", recorded))

    def forget(self, kind: str, address: str, **identity: Any) -> None:
        """Drop an entry; with identity (name=, pool=, uuid=), only when it still describes that object
        (a create-before-destroy replacement has already recorded the new one under the same address).
        Call it only once the object is gone from the host."""
        with self._lock:
            _forget(self.pools if kind == "pool" else self.volumes, address, identity)
            self._pending.append(("forget", (kind, address, identity)))


def _read_entries(conn: libvirt.virConnect, project: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pools, volumes) of the project's ledger as the host holds it now."""
    import libvirt

    secret = _lookup_secret(conn, _usage(project, "ledger"))
    if secret is None:
        return {}, {}
    try:
        raw = secret.value()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:  # defined but never given a value
            return {}, {}
        raise HostError(f"cannot read vmform's ledger: {libvirt_message(exc)}") from None
    try:
        data = json.loads(zlib.decompress(raw))
    except (zlib.error, ValueError):
        raise HostError(f"vmform's ledger for project {project} on this host is unreadable") from None
    if data.get("version", 0) > LEDGER_VERSION:
        raise HostError("this host's vmform ledger was written by a newer vmform; upgrade vmform")
    return dict(data.get("pools", {})), dict(data.get("volumes", {}))


_IDENTITY = {"pool": ("uuid",), "volume": ("pool", "name")}


def _record(entries: dict[str, Any], kind: str, address: str, entry: dict[str, Any]) -> Recorded:
    old = entries.get(address)
    displaced_to = None
    if old is not None and any(old.get(k) != entry.get(k) for k in _IDENTITY.get(kind, _IDENTITY["volume"])):
        number = 1
        while f"{address}~replaced-{number}" in entries:
            number += 1
        displaced_to = f"{address}~replaced-{number}"
        entries[displaced_to] = old
    entries[address] = entry
    return Recorded(kind, address, dict(entry), None if old is None else dict(old), displaced_to)


def _undo(entries: dict[str, Any], recorded: Recorded) -> None:
    if entries.get(recorded.address) != recorded.entry:
        return  # recorded again since (or already undone): not ours to take back
    if recorded.previous is None:
        del entries[recorded.address]
    else:
        entries[recorded.address] = recorded.previous
    if recorded.displaced_to is not None and entries.get(recorded.displaced_to) == recorded.previous:
        del entries[recorded.displaced_to]


def _forget(entries: dict[str, Any], address: str, identity: dict[str, Any]) -> None:
    for key in [k for k in entries if k == address or k.startswith(f"{address}~replaced-")]:
        if all(entries[key].get(name) == value for name, value in identity.items()):
            del entries[key]


def _replay(pools: dict[str, Any], volumes: dict[str, Any], operation: str, argument: Any) -> None:
    if operation == "record":
        _record(pools if argument.kind == "pool" else volumes, argument.kind, argument.address, argument.entry)
    elif operation == "undo":
        _undo(pools if argument.kind == "pool" else volumes, argument)
    else:
        kind, address, identity = argument
        _forget(pools if kind == "pool" else volumes, address, identity)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid())


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot), or None when there is no such process: a pid and
    its start time name one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _this_process() -> dict[str, Any]:
    """Who takes a lock: enough to name it to people, and to prove later, on this machine, that it is gone."""
    return {
        "user": _user_name(),
        "machine": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.time(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "start_ticks": _start_ticks(os.getpid()),
    }


@dataclass(frozen=True)
class LockInfo:
    lock_id: str
    holder: dict[str, Any]

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.holder.get("since", 0)))
        return (
            f"held by {self.holder.get('user', '?')} on {self.holder.get('machine', '?')} "
            f"(pid {self.holder.get('pid', '?')}, {self.holder.get('command', '?')}) since {since}; lock id {self.lock_id}"
        )

    def holder_gone(self) -> str | None:
        """Why the holder is provably gone, or None when it may be alive. Only a holder on this machine, in
        this boot and this pid namespace can be proven gone: its pid no longer runs, or runs another process
        (started at another time). A holder elsewhere (another machine, container or a qemu+ssh:// client)
        is never judged: its lock is removed with force-unlock."""
        holder = self.holder
        pid = holder.get("pid")
        if (not isinstance(pid, int) or holder.get("machine") != socket.gethostname()
                or not holder.get("boot_id") or holder.get("boot_id") != _boot_id()
                or holder.get("pid_ns") is None or holder.get("pid_ns") != _pid_namespace()):
            return None
        started = _start_ticks(pid)
        if started is None:
            return f"process {pid} is no longer running"
        if holder.get("start_ticks") is not None and started != holder["start_ticks"]:
            return f"process {pid} is no longer running (its pid belongs to another process now)"
        return None


LockNotice = Callable[[str], None]


class ProjectLock:
    """The host-side lock of one project; a context manager.

    ``connections`` is a ConnectionPool (its ``main`` connection is reopened when libvirtd restarted) or a
    plain libvirt connection. A lock whose holder is provably gone (killed on this machine) is removed on
    the way, and ``notice`` is told; any other holder is waited for up to ``timeout`` seconds."""

    def __init__(self, connections: Any, project: str, command: str, timeout: float = 0.0,
                 notice: LockNotice | None = None, stop: threading.Event | None = None) -> None:
        self.connections = connections
        self.project = project
        self.command = command
        self.timeout = timeout
        self.notice = notice
        self.stop = stop
        self.lock_id: str | None = None
        self.left_behind: str | None = None  # why the lock could not be released, if it could not

    @property
    def conn(self) -> libvirt.virConnect:
        return getattr(self.connections, "main", self.connections)

    def acquire(self) -> None:
        import libvirt

        usage = _usage(self.project, "lock")
        holder = {**_this_process(), "command": self.command}
        started = time.monotonic()
        deadline = started + self.timeout
        told_waiting = False
        reconnects = 0
        while True:
            if self.stop is not None and self.stop.is_set():
                raise KeyboardInterrupt  # Ctrl-C or SIGTERM while waiting: nothing taken, nothing done
            try:
                secret = self.conn.secretDefineXML(_secret_xml(
                    f"vmform lock of project {self.project}: {json.dumps(holder, sort_keys=True)}", usage))
            except libvirt.libvirtError as exc:
                from vmform.connection import is_connection_lost

                if is_connection_lost(exc) and reconnects < 5:
                    reconnects += 1
                    continue  # libvirtd restarted: ``conn`` opens a new connection (or says it cannot)
                existing = current_lock(self.conn, self.project)
                if existing is None:
                    if _lookup_secret(self.conn, usage) is None and time.monotonic() < deadline + 5:
                        time.sleep(0.05)
                        continue  # released between our define and our look: try again
                    raise HostError(f"cannot take the project lock: {libvirt_message(exc)}") from None
                gone = existing.holder_gone()
                if gone is not None:
                    if _remove_if_current(self.conn, existing.lock_id) and self.notice is not None:
                        self.notice(f"Removed a stale lock of project {self.project}: {existing.describe()}, but {gone}.")
                    continue
                if time.monotonic() >= deadline:
                    waited = f" (waited {time.monotonic() - started:.0f}s)" if self.timeout > 0 else ""
                    raise LockError(
                        f"project {self.project} is locked{waited}: {existing.describe()}. If that process is gone, "
                        f"remove the lock with: vmform force-unlock {existing.lock_id}"
                    ) from None
                if not told_waiting and self.notice is not None:
                    self.notice(f"Waiting up to {self.timeout:.0f}s for the lock of project {self.project}, "
                                f"{existing.describe()}...")
                    told_waiting = True
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
                continue
            try:
                secret.setValue(json.dumps(holder).encode())  # also in the value, for older vmform versions
            except libvirt.libvirtError:
                pass  # the description already names the holder
            self.lock_id = secret.UUIDString()
            return

    def release(self) -> None:
        """Remove the lock; through a new connection when libvirtd restarted meanwhile. When it cannot be
        removed, ``left_behind`` says why and how to remove it."""
        import libvirt

        if self.lock_id is None:
            return
        lock_id, self.lock_id = self.lock_id, None
        try:
            try:
                self.conn.secretLookupByUUIDString(lock_id).undefine()
            except libvirt.libvirtError as exc:
                from vmform.connection import is_connection_lost

                if not is_connection_lost(exc):
                    raise
                self.conn.secretLookupByUUIDString(lock_id).undefine()  # on a new connection (``conn`` reopens)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return  # removed already (force-unlock)
            self.left_behind = (f"could not release the lock of project {self.project} ({libvirt_message(exc)}); "
                                f"the next apply on this machine removes it, or: vmform force-unlock {lock_id}")
        except HostError as exc:  # no connection to libvirtd any more
            self.left_behind = (f"could not release the lock of project {self.project} ({exc}); the next apply on "
                                f"this machine removes it, or: vmform force-unlock {lock_id}")

    def __enter__(self) -> ProjectLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _remove_if_current(conn: libvirt.virConnect, lock_id: str) -> bool:
    """Undefine the lock secret ``lock_id`` (a lock taken since has another id and stays)."""
    import libvirt

    try:
        conn.secretLookupByUUIDString(lock_id).undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
            return False
        raise HostError(f"cannot remove the stale lock {lock_id}: {libvirt_message(exc)}") from None
    return True


def current_lock(conn: libvirt.virConnect, project: str) -> LockInfo | None:
    import libvirt

    secret = _lookup_secret(conn, _usage(project, "lock"))
    if secret is None:
        return None
    holder: dict[str, Any] = {}
    try:
        description = etree.fromstring(secret.XMLDesc(0).encode(), etree.XMLParser(resolve_entities=False,
                                       no_network=True)).findtext("description") or ""
        if "{" in description:
            holder = json.loads(description[description.index("{"):])
    except (libvirt.libvirtError, ValueError, etree.XMLSyntaxError):
        holder = {}
    if not holder:  # a lock taken by an older vmform: the holder is in the value
        try:
            holder = json.loads(secret.value())
        except (libvirt.libvirtError, ValueError):
            holder = {}
    return LockInfo(secret.UUIDString(), holder if isinstance(holder, dict) else {})


def force_unlock(conn: libvirt.virConnect, project: str, lock_id: str) -> LockInfo:
    """Remove the project's lock, only when ``lock_id`` names it (so a lock taken since is never removed)."""
    import libvirt

    info = current_lock(conn, project)
    if info is None:
        raise LockError(f"project {project} is not locked")
    if info.lock_id != lock_id.strip().lower():
        raise LockError(f"lock id {lock_id} does not match the current lock of project {project} "
                        f"({info.describe()}); nothing removed")
    try:
        conn.secretLookupByUUIDString(info.lock_id).undefine()
    except libvirt.libvirtError as exc:
        raise HostError(f"cannot remove the lock: {libvirt_message(exc)}") from None
    return info
