"""The project's libvirt hosts: one connection pool per host, opened when first needed, and the host state
read from all of them at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from vmform.connection import ConnectionPool
from vmform.errors import HostError
from vmform.journal import JOURNAL

if TYPE_CHECKING:
    import libvirt

    from vmform.project import Project


class HostConnections:
    """A ConnectionPool per host of the project. Used where one pool was, it stands for the default host
    (``main``, ``get``, ``uri``), so single-host code paths read as before."""

    def __init__(self, project: Project, uri: str | None = None, skip_unreachable: bool = False) -> None:
        self.project = project
        JOURNAL.project = project.name  # a lock or ledger secret vmform writes must be this project's
        self.skip_unreachable = skip_unreachable
        self._uris = {name: (uri if uri is not None and name == project.default_host else host.uri)
                      for name, host in project.hosts.items()}
        self._pools: dict[str, ConnectionPool] = {}
        self.unreachable: dict[str, str] = {}  # host -> why (with skip_unreachable)

    @property
    def names(self) -> list[str]:
        return list(self._uris)

    def uri_of(self, host: str) -> str | None:
        return self._uris[host]

    def pool(self, host: str) -> ConnectionPool:
        if host not in self._pools:
            try:
                self._pools[host] = ConnectionPool(self._uris[host], reconnect_timeout=self.project.reconnect_timeout,
                                                   host=host)
            except HostError as exc:
                if len(self._uris) == 1:
                    raise
                raise HostError(f"host {host} ({self._uris[host] or 'default URI'}): {exc}") from None
        return self._pools[host]

    def reachable(self) -> list[str]:
        """The hosts to work on: every host, connected to concurrently; an unreachable one is an error, or
        with skip_unreachable is left out and remembered in ``unreachable``."""
        missing = [name for name in self._uris if name not in self._pools and name not in self.unreachable]
        if missing:
            with ThreadPoolExecutor(max_workers=min(8, len(missing))) as workers:
                outcomes = list(workers.map(self._try_open, missing))
            failures = [message for message in outcomes if message]
            if failures and not self.skip_unreachable:
                raise HostError(failures[0] if len(failures) == 1 else "; ".join(failures))
        return [name for name in self._uris if name in self._pools]

    def _try_open(self, host: str) -> str | None:
        try:
            self.pool(host)
        except HostError as exc:
            self.unreachable[host] = str(exc)
            return str(exc)
        return None

    # The default host, as a single ConnectionPool would offer it.
    @property
    def main(self) -> libvirt.virConnect:
        return self.pool(self.project.default_host).main

    def get(self) -> libvirt.virConnect:
        return self.pool(self.project.default_host).get()

    def ensure(self) -> libvirt.virConnect:
        return self.pool(self.project.default_host).ensure()

    def current(self) -> libvirt.virConnect | None:
        return self.pool(self.project.default_host).current()

    @property
    def uri(self) -> str | None:
        return self._uris[self.project.default_host]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
