"""The one seam to libvirt: opening connections (real daemon or test:///default) and a small pool of them.

libvirtd serves at most 5 calls at once per client connection, so parallel work opens a few.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from vmform.errors import HostError

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


def open_connection(uri: str | None) -> libvirt.virConnect:
    import libvirt

    _libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        shown = uri or "libvirt's default URI"
        raise HostError(f"cannot connect to {shown}: {libvirt_message(exc)}") from None


class ConnectionPool:
    """One connection per worker thread, opened on first use, all closed together."""

    def __init__(self, uri: str | None, first: libvirt.virConnect | None = None) -> None:
        self.uri = uri
        self._local = threading.local()
        self._all: list[libvirt.virConnect] = []
        self._lock = threading.Lock()
        self.main = first or open_connection(uri)
        self._all.append(self.main)
        self._local.conn = self.main

    def get(self) -> libvirt.virConnect:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = open_connection(self.uri)
            with self._lock:
                self._all.append(conn)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            self._all.clear()


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
