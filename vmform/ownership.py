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
from dataclasses import dataclass, field
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


@dataclass
class Ledger:
    """Owned pools and volumes of one project on one host."""

    project: str
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)  # address -> {name, uuid}
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)  # address -> {pool, name, source_sha256?}
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, conn: libvirt.virConnect, project: str) -> Ledger:
        import libvirt

        secret = _lookup_secret(conn, _usage(project, "ledger"))
        if secret is None:
            return cls(project)
        try:
            raw = secret.value()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:  # defined but never given a value
                return cls(project)
            raise HostError(f"cannot read vmform's ledger: {libvirt_message(exc)}") from None
        try:
            data = json.loads(zlib.decompress(raw))
        except (zlib.error, ValueError):
            raise HostError(f"vmform's ledger for project {project} on this host is unreadable") from None
        if data.get("version", 0) > LEDGER_VERSION:
            raise HostError("this host's vmform ledger was written by a newer vmform; upgrade vmform")
        return cls(project, dict(data.get("pools", {})), dict(data.get("volumes", {})))

    def save(self, conn: libvirt.virConnect) -> None:
        import libvirt

        with self._lock:  # a consistent copy: apply's workers record and forget entries while one saves
            payload = {"version": LEDGER_VERSION, "project": self.project, "pools": dict(self.pools),
                       "volumes": dict(self.volumes)}
        usage = _usage(self.project, "ledger")
        try:
            secret = _lookup_secret(conn, usage)
            if not payload["pools"] and not payload["volumes"]:
                if secret is not None:
                    secret.undefine()
                return
            if secret is None:
                secret = conn.secretDefineXML(
                    _secret_xml(f"vmform ownership ledger of project {self.project} (pools and volumes)", usage)
                )
            secret.setValue(zlib.compress(json.dumps(payload, sort_keys=True).encode(), 9))
        except libvirt.libvirtError as exc:
            raise HostError(f"cannot record ownership on the host: {libvirt_message(exc)}") from None

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

    def record(self, kind: str, address: str, entry: dict[str, Any]) -> None:
        """Own a new object. An older object still recorded under the address (create-before-destroy)
        stays owned under ``address~replaced-N`` until it is deleted, so it is never orphaned."""
        with self._lock:
            entries = self.pools if kind == "pool" else self.volumes
            old = entries.get(address)
            identity = ("uuid",) if kind == "pool" else ("pool", "name")
            if old is not None and any(old.get(k) != entry.get(k) for k in identity):
                number = 1
                while f"{address}~replaced-{number}" in entries:
                    number += 1
                entries[f"{address}~replaced-{number}"] = old
            entries[address] = entry

    def forget(self, kind: str, address: str, **identity: Any) -> None:
        """Drop an entry; with identity (name=, pool=, uuid=), only when it still describes that object
        (a create-before-destroy replacement has already recorded the new one under the same address)."""
        with self._lock:
            entries = self.pools if kind == "pool" else self.volumes
            for key in [k for k in entries if k == address or k.startswith(f"{address}~replaced-")]:
                if all(entries[key].get(name) == value for name, value in identity.items()):
                    del entries[key]


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid())


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


class ProjectLock:
    """The host-side lock of one project; a context manager."""

    def __init__(self, conn: libvirt.virConnect, project: str, command: str, timeout: float = 0.0) -> None:
        self.conn = conn
        self.project = project
        self.command = command
        self.timeout = timeout
        self.secret: libvirt.virSecret | None = None
        self.lock_id: str | None = None

    def acquire(self) -> None:
        import libvirt

        usage = _usage(self.project, "lock")
        holder = {
            "user": _user_name(),
            "machine": socket.gethostname(),
            "pid": os.getpid(),
            "command": self.command,
            "since": time.time(),
        }
        started = time.monotonic()
        deadline = started + self.timeout
        while True:
            try:
                secret = self.conn.secretDefineXML(_secret_xml(f"vmform lock of project {self.project}", usage))
            except libvirt.libvirtError as exc:
                existing = current_lock(self.conn, self.project)
                if existing is None:
                    if _lookup_secret(self.conn, usage) is None and time.monotonic() < deadline + 5:
                        time.sleep(0.05)
                        continue  # released between our define and our look: try again
                    raise HostError(f"cannot take the project lock: {libvirt_message(exc)}") from None
                if time.monotonic() >= deadline:
                    waited = f" (waited {time.monotonic() - started:.0f}s)" if self.timeout > 0 else ""
                    raise LockError(
                        f"project {self.project} is locked{waited}: {existing.describe()}. If that process is gone, "
                        f"remove the lock with: vmform force-unlock {existing.lock_id}"
                    ) from None
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
                continue
            try:
                secret.setValue(json.dumps(holder).encode())
            except libvirt.libvirtError:
                pass  # the lock is held either way; only the holder details are missing
            self.secret = secret
            self.lock_id = secret.UUIDString()
            return

    def release(self) -> None:
        import libvirt

        if self.secret is not None:
            try:
                self.secret.undefine()
            except libvirt.libvirtError:
                pass
            self.secret = None

    def __enter__(self) -> ProjectLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def current_lock(conn: libvirt.virConnect, project: str) -> LockInfo | None:
    import libvirt

    secret = _lookup_secret(conn, _usage(project, "lock"))
    if secret is None:
        return None
    try:
        holder = json.loads(secret.value())
    except (libvirt.libvirtError, ValueError):
        holder = {}
    return LockInfo(secret.UUIDString(), holder)


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
