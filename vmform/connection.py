"""The one seam to libvirt: opening connections (real daemon or test:///default) and a small pool of them.

libvirtd serves at most 5 calls at once per client connection, so parallel work opens a few.
A connection that libvirtd dropped (the daemon restarted) is opened again on its next use, waiting up to
``reconnect_timeout`` seconds for the daemon to come back; a call that was in flight when it dropped fails
and is reported as interrupted (libvirt cannot say whether the daemon carried it out).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from vmform.errors import ConnectionLost, HostError
from vmform.journal import guard

if TYPE_CHECKING:
    import libvirt

_handler_installed = False


def _libvirt() -> object:
    global _handler_installed
    import libvirt

    if not _handler_installed:
        # libvirt prints every error to stderr by default; vmform reports errors itself.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        # Events (waiting for a shutdown, an agent, an address) need the loop registered before connections open.
        from vmform.events import start_event_loop

        start_event_loop()
        _handler_installed = True
    return libvirt


def libvirt_message(exc: BaseException) -> str:
    """libvirt's own message, one line, without the 'virFoo() failed' noise."""
    get_message = getattr(exc, "get_error_message", None)
    message = get_message() if get_message else None
    return " ".join(str(message or exc).split())


def is_connection_lost(exc: BaseException, conn: libvirt.virConnect | None = None) -> bool:
    """Whether an error means the connection to libvirtd broke (daemon restarted or gone), not that libvirt
    refused the call. libvirt reports a broken transport from its RPC layer; ``conn`` is checked too."""
    if isinstance(exc, ConnectionLost):
        return True
    get_domain = getattr(exc, "get_error_domain", None)
    get_code = getattr(exc, "get_error_code", None)
    if get_domain is not None and get_code is not None:
        import libvirt

        if get_domain() == libvirt.VIR_FROM_RPC or get_code() == libvirt.VIR_ERR_NO_CONNECT:
            return True
    if conn is not None:
        try:
            return not conn.isAlive()
        except Exception:  # noqa: BLE001 - a connection that cannot say is not alive
            return True
    return False


def open_connection(uri: str | None) -> libvirt.virConnect:
    import libvirt

    _libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        shown = uri or "libvirt's default URI"
        raise HostError(f"cannot connect to {shown}: {libvirt_message(exc)}") from None


class ConnectionPool:
    """One connection per worker thread, opened on first use, all closed together. A connection libvirtd
    dropped is replaced on its next use (``get``, ``main``), waiting up to ``reconnect_timeout`` seconds.

    Every connection it hands out is guarded (vmform.journal): its mutating calls, and those of every object
    it returns, are checked against the planned change the calling thread serves, and journaled. ``host`` is
    the project's name for the host (what a Change's ``host`` says)."""

    def __init__(self, uri: str | None, first: libvirt.virConnect | None = None,
                 reconnect_timeout: float = 30.0, host: str | None = None) -> None:
        self.uri = uri
        self.host = host
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0  # how many times a dropped connection was opened again
        self._local = threading.local()
        self._all: list[libvirt.virConnect] = []
        self._lock = threading.Lock()
        self._main = guard(first or open_connection(uri), host)
        self._all.append(self._main)
        self._local.conn = self._main

    @property
    def main(self) -> libvirt.virConnect:
        """The connection of the thread that opened the pool (reads, the lock), reopened when dropped."""
        old = self._main
        if not _alive(old):
            new = self._reopen(old)
            if getattr(self._local, "conn", None) is old:
                self._local.conn = new
        return self._main

    def get(self) -> libvirt.virConnect:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = guard(open_connection(self.uri), self.host)
            with self._lock:
                self._all.append(conn)
            self._local.conn = conn
        elif not _alive(conn):
            conn = self._reopen(conn)
            self._local.conn = conn
        return conn

    def current(self) -> libvirt.virConnect | None:
        """This thread's connection as it is (not reopened), to ask whether it dropped."""
        return getattr(self._local, "conn", None)

    def ensure(self) -> libvirt.virConnect:
        """This thread's connection, proven to answer (one round trip): apply calls it before each change, so
        a daemon that restarted while nothing was in flight costs a reconnect, not a failed change."""
        conn = self.get()
        try:
            conn.getLibVersion()
        except Exception as exc:  # noqa: BLE001 - libvirtError; anything else is not ours to judge
            if not is_connection_lost(exc, conn):
                raise
            conn = self._reopen(conn)
            self._local.conn = conn
        return conn

    def _reopen(self, old: libvirt.virConnect) -> libvirt.virConnect:
        """A new connection in place of a dropped one, retried until ``reconnect_timeout``."""
        import libvirt

        _libvirt()
        deadline = time.monotonic() + self.reconnect_timeout
        shown = self.uri or "libvirt's default URI"
        while True:
            try:
                conn = guard(libvirt.open(self.uri), self.host)
                break
            except libvirt.libvirtError as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionLost(
                        f"lost the connection to {shown} and could not reconnect within "
                        f"{self.reconnect_timeout:.0f}s: {libvirt_message(exc)}") from None
                time.sleep(0.25)
        with self._lock:
            if old in self._all:
                self._all.remove(old)
            self._all.append(conn)
            self.reconnects += 1
            if old is self._main:
                self._main = conn
        try:
            old.close()
        except Exception:  # noqa: BLE001 - the old connection is dead; closing it is best effort
            pass
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            self._all.clear()


def _alive(conn: libvirt.virConnect) -> bool:
    """libvirt's own view, without a round trip: false once a call found the socket closed."""
    try:
        return bool(conn.isAlive())
    except Exception:  # noqa: BLE001 - a closed handle
        return False


def host_identity(conn: libvirt.virConnect) -> dict[str, str]:
    """Which libvirt host a connection reaches: its URI, hostname and host UUID (from the capabilities).
    Two URIs can name one host, and one URI (qemu:///system) names a different host on every machine."""
    import libvirt
    from lxml import etree

    try:
        uri = conn.getURI()
        hostname = conn.getHostname()
        caps = etree.fromstring(conn.getCapabilities().encode(), etree.XMLParser(resolve_entities=False, no_network=True))
    except libvirt.libvirtError as exc:
        raise HostError(f"cannot identify the libvirt host: {libvirt_message(exc)}") from None
    uuid = caps.findtext("host/uuid") or ""
    return {"uri": uri, "hostname": hostname, "uuid": uuid}
