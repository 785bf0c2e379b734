"""Executing a Plan: its changes in dependency order, independent ones in parallel on a bounded pool.
A failure stops only what depends on it. Apply never re-decides what the plan decided.

Faults: a change in flight when libvirtd drops the connection is *interrupted* (libvirt cannot say whether
the daemon carried it out; the next plan reads what it did); later changes run on a new connection. When
no new connection can be opened, nothing more starts. ``stop`` (first Ctrl-C) starts nothing more and lets
the changes in flight finish; ``abandon`` (second Ctrl-C) stops waiting for them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from vmform.connection import is_connection_lost, libvirt_message
from vmform.errors import ConnectionLost, VmformError, VolumeInUse
from vmform.journal import JOURNAL, Scope, UnplannedMutation, refusal_message, serving
from vmform.plan import Action, Change, Plan
from vmform.providers import provider_for
from vmform.providers.base import ApplyContext


@dataclass
class ApplyResult:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # address -> message
    skipped: dict[str, str] = field(default_factory=dict)  # address -> the failure it waited for
    # address -> what the host holds that differs from the plan's "after", found by reading it back
    mismatched: dict[str, str] = field(default_factory=dict)
    # address -> why its outcome is unknown: in flight when the connection dropped, or abandoned
    interrupted: dict[str, str] = field(default_factory=dict)
    lost_connection: str | None = None  # why libvirtd could not be reached again, when it could not
    # address -> why a delete was not made: right before it, the host showed something still using the volume
    waiting: dict[str, str] = field(default_factory=dict)
    stopped: bool = False  # stop (Ctrl-C, SIGTERM) was asked for before every change had started
    abandoned: bool = False  # changes were still in flight when apply stopped waiting for them
    notes: list[str] = field(default_factory=list)  # said after the summary (a lock left behind, ...)
    # mutations the journal refused (each an internal error: a call no planned change allows)
    refused: int = 0
    restarted: list[str] = field(default_factory=list)  # domains and networks this apply really restarted
    # address -> what of it takes effect only when it restarts (a device its guest did not release)
    waiting_for_restart: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (not self.failed and not self.skipped and not self.mismatched and not self.interrupted
                and not self.waiting and not self.refused)

    @property
    def not_started(self) -> list[str]:
        return [address for address, reason in self.skipped.items() if reason.startswith("not started")]


# Events for progress displays: (address, "start" | "done" | "failed" | "skipped" | "interrupted" | "waiting",
# detail)
ProgressCallback = Callable[[Change, str, str], None]


class _NotStarted(Exception):
    """No connection to libvirtd to start a change on: nothing of it was done."""


class _Interrupted(Exception):
    """The connection dropped while the change was in flight: its outcome is unknown."""


def _run(contexts: Mapping[str, ApplyContext], change: Change) -> None:
    ctx = contexts[change.host]
    try:
        ctx.connections.ensure()  # libvirtd restarted since the last change: reconnect before starting
    except ConnectionLost as exc:
        raise _NotStarted(str(exc)) from None
    try:
        with serving(change) as scope:
            _call(contexts, change)
    except Exception as exc:
        if scope.refused:  # the first refusal is the change's error, whatever a provider made of it
            raise UnplannedMutation(_refusal(scope)) from None
        if is_connection_lost(exc, ctx.connections.current()):
            raise _Interrupted(_message(exc)) from None
        raise
    if scope.refused:  # a provider swallowed the refusal: the change still failed
        raise UnplannedMutation(_refusal(scope))


def _refusal(scope: Scope) -> str:
    return refusal_message(scope.refused[0])


def _call(contexts: Mapping[str, ApplyContext], change: Change) -> None:
    ctx = contexts[change.host]
    provider = provider_for(change.kind)
    if change.action is Action.MIGRATE:
        from vmform.providers.migrate import migrate

        migrate(ctx, contexts[change.identity["from_host"]], change, ctx.migration_uri)
    elif change.action is Action.CREATE:
        provider.create(ctx, change)
    elif change.action is Action.UPDATE:
        provider.update(ctx, change)
    elif change.action is Action.DELETE:
        provider.delete(ctx, change)
    elif change.action is Action.DELETE_THEN_CREATE:
        provider.replace(ctx, change)
    elif change.action is Action.CREATE_THEN_DELETE:
        provider.create(ctx, change)
        provider.delete(ctx, change)


def _message(exc: BaseException) -> str:
    if isinstance(exc, VmformError):
        return str(exc)
    text = libvirt_message(exc)
    return text or type(exc).__name__


def keyed_changes(changes: tuple[Change, ...]) -> dict[str, Change]:
    """The plan's changes by address; an address with a change on two hosts (a volume that moves with its
    domain: created on the new host, its old copy deleted on the old one) as ``address@host``."""
    count: dict[str, int] = {}
    for change in changes:
        count[change.address] = count.get(change.address, 0) + 1
    return {(change.address if count[change.address] == 1 else f"{change.address}@{change.host}"): change
            for change in changes}


def _dependencies(change: Change, changes: Mapping[str, Change]) -> set[str]:
    """The keys of the changes ``change`` waits for: an address on two hosts means its change on the same host."""
    found = set()
    for address in change.depends_on:
        if address in changes:
            found.add(address)
        elif f"{address}@{change.host}" in changes:
            found.add(f"{address}@{change.host}")
    return found


def execute(plan: Plan, ctx: ApplyContext | Mapping[str, ApplyContext], parallelism: int,
            progress: ProgressCallback | None = None, stop: threading.Event | None = None,
            abandon: threading.Event | None = None, host_parallelism: Mapping[str, int] | None = None) -> ApplyResult:
    """Run the plan's changes; ``ctx`` is the one host's context, or each host's by name (several hosts work
    at once, each with at most its ``host_parallelism`` changes in flight)."""
    contexts = ctx if isinstance(ctx, Mapping) else {change.host: ctx for change in plan.changes}
    limits = dict(host_parallelism or {})
    result = ApplyResult()
    journal_mark = JOURNAL.mark()
    changes = keyed_changes(plan.changes)
    waiting = {address: _dependencies(change, changes) for address, change in changes.items()}
    dependents: dict[str, set[str]] = {address: set() for address in changes}
    for address, deps in waiting.items():
        for dep in deps:
            dependents[dep].add(address)
    order = list(changes)
    running: dict[Future[None], str] = {}
    started: set[str] = set()

    def skip_dependents(address: str, reason: str) -> None:
        stack = list(dependents[address])
        while stack:
            dependent = stack.pop()
            if dependent in started or dependent in result.skipped:
                continue
            result.skipped[dependent] = reason
            started.add(dependent)
            if progress:
                progress(changes[dependent], "skipped", reason)
            stack.extend(dependents[dependent])

    def stopping() -> bool:
        return (stop is not None and stop.is_set()) or result.lost_connection is not None

    pool = ThreadPoolExecutor(max_workers=max(1, parallelism), thread_name_prefix="vmform-apply")
    try:
        while True:
            if not stopping():
                for address in order:
                    if address in started or waiting[address] or len(running) >= parallelism:
                        continue
                    host = changes[address].host
                    if host in limits and sum(1 for a in running.values() if changes[a].host == host) >= limits[host]:
                        continue
                    started.add(address)
                    if progress:
                        progress(changes[address], "start", "")
                    running[pool.submit(_run, contexts, changes[address])] = address
            if not running:
                break
            # Bounded waits, so a second Ctrl-C (abandon) is seen while a slow change runs.
            finished, _ = wait(list(running), timeout=0.2, return_when=FIRST_COMPLETED)
            if not finished and abandon is not None and abandon.is_set():
                for address in running.values():
                    result.interrupted[address] = ("abandoned while in flight (Ctrl-C): libvirtd completes or fails "
                                                   "it on its own; the next plan shows which")
                    if progress:
                        progress(changes[address], "interrupted", result.interrupted[address])
                result.abandoned = True
                running.clear()
                break
            for future in finished:
                address = running.pop(future)
                error = future.exception()
                if error is None:
                    result.done.append(address)
                    for dependent in dependents[address]:
                        waiting[dependent].discard(address)
                    if progress:
                        progress(changes[address], "done", "")
                elif isinstance(error, _NotStarted):
                    result.lost_connection = result.lost_connection or str(error)
                    started.discard(address)  # reported below with the others that never started
                elif isinstance(error, VolumeInUse):
                    result.waiting[address] = str(error)
                    if progress:
                        progress(changes[address], "waiting", str(error))
                    skip_dependents(address, f"{address} is kept")
                elif isinstance(error, _Interrupted):
                    message = (f"the connection to libvirtd dropped while it was in flight ({error}); whether "
                               "libvirtd carried it out is unknown until the next plan")
                    result.interrupted[address] = message
                    if progress:
                        progress(changes[address], "interrupted", message)
                    skip_dependents(address, f"{address} was interrupted")
                else:
                    message = _message(error)
                    result.failed[address] = message
                    if progress:
                        progress(changes[address], "failed", message)
                    skip_dependents(address, f"{address} failed")
    finally:
        pool.shutdown(wait=not result.abandoned, cancel_futures=True)
    result.refused = sum(1 for entry in JOURNAL.since(journal_mark) if entry.verdict == "refused")
    for context in {id(c): c for c in contexts.values()}.values():  # what the providers say they did
        result.restarted.extend(a for a in context.restarted if a not in result.restarted)
        result.waiting_for_restart.update(context.waiting_for_restart)
    reason = ("not started: libvirtd could not be reached" if result.lost_connection is not None
              else "not started: apply was interrupted")
    for address in order:
        if address not in started:
            result.skipped[address] = reason
            result.stopped = result.stopped or (stop is not None and stop.is_set())
    return result
