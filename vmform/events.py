"""Waiting on libvirt's event API instead of polling.

libvirt delivers domain and network events only through an event loop: ``virEventRegisterDefaultImpl()``
once per process, before connections are opened, and a thread running ``virEventRunDefaultImpl()``
(``start_event_loop``, which ``connection.open_connection`` calls). A wait then registers a callback,
checks once whether what it waits for has already happened (an event from before the registration is never
delivered), and sleeps on a ``threading.Event`` that the callback sets, bounded by a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import libvirt

_lock = threading.Lock()
_started = False

# What a connection without event delivery (opened by another program before the loop was registered) falls
# back to: the same waits, re-checked at this interval. vmform's own connections never need it.
FALLBACK_INTERVAL = 0.5


def start_event_loop() -> None:
    """Register libvirt's default event loop implementation and run it on a daemon thread (once)."""
    global _started
    with _lock:
        if _started:
            return
        import libvirt

        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run, name="vmform-libvirt-events", daemon=True).start()
        _started = True


def event_loop_running() -> bool:
    return _started


def _run() -> None:
    import libvirt

    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            time.sleep(0.1)  # a failing iteration must not spin; the loop itself is event-driven


class Watch:
    """Callbacks registered on one connection for one domain (or all), woken by any of their events.

    ``wait(deadline)`` returns True when an event arrived before the deadline. ``live`` is False when the
    connection cannot deliver events (then ``wait`` returns after ``FALLBACK_INTERVAL`` so the caller checks
    again)."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain | None = None) -> None:
        self.conn = conn
        self.dom = dom
        self.fired = threading.Event()
        self.seen: list[tuple[int, tuple[Any, ...]]] = []  # (event id, callback arguments), for the caller
        self._domain_ids: list[int] = []
        self._network_ids: list[int] = []
        self.live = event_loop_running() and conn is not None

    def domain(self, event_id: int, accept: Callable[..., bool] | None = None) -> Watch:
        """Wake on this domain event (when ``accept(*callback_args)`` says so, if given)."""
        import libvirt

        def callback(*args: Any) -> None:
            if accept is None or accept(*args[2:-1]):  # without conn, dom and opaque
                self.seen.append((event_id, args[1:-1]))
                self.fired.set()

        if not self.live:
            return self
        try:
            self._domain_ids.append(self.conn.domainEventRegisterAny(self.dom, event_id, callback, None))
        except libvirt.libvirtError:
            self.live = False
        return self

    def network(self, event_id: int) -> Watch:
        import libvirt

        def callback(*args: Any) -> None:
            self.seen.append((event_id, args[1:-1]))
            self.fired.set()

        if not self.live:
            return self
        try:
            self._network_ids.append(self.conn.networkEventRegisterAny(None, event_id, callback, None))
        except libvirt.libvirtError:
            self.live = False
        return self

    def wait(self, deadline: float, recheck: float | None = None) -> bool:
        """Until an event arrives, the deadline passes, or ``recheck`` seconds (what no event announces)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        limits = [remaining]
        if recheck is not None:
            limits.append(recheck)
        if not self.live:
            limits.append(FALLBACK_INTERVAL)
        fired = self.fired.wait(min(limits))
        self.fired.clear()
        return fired

    def close(self) -> None:
        import libvirt

        for callback_id in self._domain_ids:
            try:
                self.conn.domainEventDeregisterAny(callback_id)
            except libvirt.libvirtError:
                pass
        for callback_id in self._network_ids:
            try:
                self.conn.networkEventDeregisterAny(callback_id)
            except libvirt.libvirtError:
                pass
        self._domain_ids.clear()
        self._network_ids.clear()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(watch: Watch, done: Callable[[], bool], timeout: float, recheck: float | None = None) -> bool:
    """True once ``done()`` holds: checked right away (after the callbacks are registered, so nothing that
    happens in between is missed) and again after every event, bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        watch.wait(deadline, recheck)
