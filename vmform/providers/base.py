"""What every provider gets: connections, the project, the ownership ledger, per-pool storage locks."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    # libvirt fails concurrent jobs on one pool ("pool has asynchronous jobs running"): one at a time per pool.
    pool_locks: defaultdict[str, threading.Lock] = field(default_factory=lambda: defaultdict(threading.Lock))
    ledger_lock: threading.Lock = field(default_factory=threading.Lock)

    def save_ledger(self) -> None:
        with self.ledger_lock:
            self.ledger.save(self.connections.get())


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
