"""What every provider gets: connections, the project, the ownership ledger, per-pool storage locks."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmform.connection import ConnectionPool
from vmform.ownership import Ledger

if TYPE_CHECKING:
    from vmform.plan import Change


@dataclass
class ApplyContext:
    connections: ConnectionPool
    project: str
    ledger: Ledger
    shutdown_timeout: float = 60.0
    migration_uri: str | None = None  # where a domain migrating to this host is sent ([hosts] migration_uri)
    force_off: bool = False  # power off a domain that did not shut down within shutdown_timeout
    detach_timeout: float = 30.0  # how long a hot-unplug waits for the guest to release the device
    notice: Callable[[str], None] | None = None  # one line for the user while a change waits (shutdown, ...)
    # libvirt fails concurrent jobs on one pool ("pool has asynchronous jobs running"): one at a time per pool.
    pool_locks: defaultdict[str, threading.Lock] = field(default_factory=lambda: defaultdict(threading.Lock))
    ledger_lock: threading.Lock = field(default_factory=threading.Lock)
    # Group commit of ledger saves: how many saves were asked for, how many of those a finished save covers.
    _ledger_changed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _ledger_asked: int = 0
    _ledger_covered: int = 0
    _ledger_saving: bool = False
    # The host's volume uses (vmform.live.HostUses), read once per apply at its first volume delete.
    volume_uses: Any = field(default=None, repr=False)
    volume_uses_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # What apply really did beyond the plan's own words, for its summary: the addresses of the domains and
    # networks it restarted, and per address what now waits for the object's next restart (a device its guest
    # did not release). Filled by the providers, read into the ApplyResult.
    restarted: list[str] = field(default_factory=list)
    waiting_for_restart: dict[str, str] = field(default_factory=dict)

    def tell(self, text: str) -> None:
        if self.notice is not None:
            self.notice(text)

    def record_restart(self, address: str) -> None:
        if address not in self.restarted:
            self.restarted.append(address)

    def record_waiting(self, address: str, what: str) -> None:
        self.waiting_for_restart[address] = what

    def refused(self, exc: BaseException) -> bool:
        """Whether libvirt refused a call (so nothing was made), rather than the connection dropping while
        it was in flight (libvirtd may have carried it out). Only a refusal may undo a ledger entry."""
        from vmform.connection import is_connection_lost

        return not is_connection_lost(exc, self.connections.current())

    def save_ledger(self) -> None:
        """Write the ledger to the host; returns once a save that began after the caller's change finished.

        Callers change the ledger first, then call this. While one save runs, others queue up; the next save
        writes all their changes at once, so 8 workers creating volumes make a handful of saves, not one each
        (at 500 volumes, one save per volume was most of destroy's time). A failed save covers nobody: the
        waiting callers try again themselves and get their own error."""
        with self._ledger_changed:
            self._ledger_asked += 1
            mine = self._ledger_asked
            while self._ledger_saving and self._ledger_covered < mine:
                self._ledger_changed.wait()
            if self._ledger_covered >= mine:
                return
            self._ledger_saving = True
            covers = self._ledger_asked  # every change asked for so far is in the ledger now
        saved = False
        try:
            with self.ledger_lock:
                self.ledger.save(self.connections.get())
            saved = True
        finally:
            with self._ledger_changed:
                self._ledger_saving = False
                if saved:
                    self._ledger_covered = max(self._ledger_covered, covers)
                self._ledger_changed.notify_all()


class Provider:
    kind = ""

    def create(self, ctx: ApplyContext, change: Change) -> None:
        raise NotImplementedError

    def update(self, ctx: ApplyContext, change: Change) -> None:
        raise NotImplementedError

    def delete(self, ctx: ApplyContext, change: Change) -> None:
        raise NotImplementedError

    def replace(self, ctx: ApplyContext, change: Change) -> None:
        self.delete(ctx, change)
        self.create(ctx, change)
