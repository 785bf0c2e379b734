"""Executing a Plan: its changes in dependency order, independent ones in parallel on a bounded pool.
A failure stops only what depends on it. Apply never re-decides what the plan decided."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from vmform.connection import libvirt_message
from vmform.errors import VmformError
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

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped and not self.mismatched


# Events for progress displays: (address, "start" | "done" | "failed" | "skipped", detail)
ProgressCallback = Callable[[Change, str, str], None]


def _run(contexts: Mapping[str, ApplyContext], change: Change) -> None:
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


def execute(plan: Plan, ctx: ApplyContext | Mapping[str, ApplyContext], parallelism: int,
            progress: ProgressCallback | None = None, stop: threading.Event | None = None,
            host_parallelism: Mapping[str, int] | None = None) -> ApplyResult:
    """Run the plan's changes; ``ctx`` is the one host's context, or each host's by name (several hosts work
    at once, each with at most its ``host_parallelism`` changes in flight)."""
    contexts = ctx if isinstance(ctx, Mapping) else {change.host: ctx for change in plan.changes}
    limits = dict(host_parallelism or {})
    result = ApplyResult()
    changes = {change.address: change for change in plan.changes}
    waiting = {address: {d for d in change.depends_on if d in changes} for address, change in changes.items()}
    dependents: dict[str, set[str]] = {address: set() for address in changes}
    for address, deps in waiting.items():
        for dep in deps:
            dependents[dep].add(address)
    order = [change.address for change in plan.changes]
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

    with ThreadPoolExecutor(max_workers=max(1, parallelism), thread_name_prefix="vmform-apply") as pool:
        while True:
            if stop is None or not stop.is_set():
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
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                address = running.pop(future)
                error = future.exception()
                if error is None:
                    result.done.append(address)
                    for dependent in dependents[address]:
                        waiting[dependent].discard(address)
                    if progress:
                        progress(changes[address], "done", "")
                else:
                    message = _message(error)
                    result.failed[address] = message
                    if progress:
                        progress(changes[address], "failed", message)
                    skip_dependents(address, f"{address} failed")
    for address in order:
        if address not in started:
            result.skipped[address] = "interrupted"
    return result
