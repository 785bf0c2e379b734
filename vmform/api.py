"""The library API: what the CLI (and any other client) calls. No printing here."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmform.apply import ApplyResult, ProgressCallback, execute
from vmform.connection import ConnectionPool
from vmform.diff import PlanOptions, make_plan
from vmform.graph import build_graph, creation_order
from vmform.live import LiveState, read_host
from vmform.manifest.loader import load_manifests
from vmform.model import Manifests
from vmform.ownership import Ledger, ProjectLock
from vmform.plan import Plan
from vmform.project import Project, load_project
from vmform.providers.base import ApplyContext

if TYPE_CHECKING:
    import networkx as nx


@dataclass
class Workspace:
    """A project with its manifests loaded and checked."""

    project: Project
    manifests: Manifests
    graph: nx.DiGraph
    order: list[str]


def load_workspace(directory: Path | str | None = None) -> Workspace:
    project = load_project(directory)
    manifests = load_manifests(project.name, project.manifest_files(), project.root)
    graph = build_graph(manifests)
    return Workspace(project, manifests, graph, creation_order(graph))


def connect(workspace: Workspace, uri: str | None = None) -> ConnectionPool:
    return ConnectionPool(uri or workspace.project.uri)


def read_live(workspace: Workspace, connections: ConnectionPool) -> LiveState:
    pools = {r.desired["pool"] for r in workspace.manifests.of_kind("volume")}
    pools |= {r.libvirt_name for r in workspace.manifests.of_kind("pool")}
    return read_host(connections.main, workspace.project.name, pools)


def _protected(workspace: Workspace) -> frozenset[str]:
    return frozenset(a for a, r in workspace.manifests.resources.items() if r.lifecycle.get("prevent_destroy"))


def plan(workspace: Workspace, connections: ConnectionPool, targets: list[str] | None = None,
         restart: bool = False) -> Plan:
    """What apply would change. ``restart`` lets restart-class changes restart domains and networks."""
    _check_targets(workspace, targets)
    live = read_live(workspace, connections)
    options = PlanOptions(restart=restart, targets=frozenset(targets or ()), protected=_protected(workspace))
    return make_plan(workspace.manifests, workspace.graph, live, workspace.order, options)


def destroy_plan(workspace: Workspace, connections: ConnectionPool, targets: list[str] | None = None) -> Plan:
    """Deleting everything this project owns on the host (or only the targets and what uses them)."""
    import networkx as nx

    live = read_live(workspace, connections)
    nothing = Manifests(workspace.project.name)
    full = make_plan(nothing, nx.DiGraph(), live, [], PlanOptions(protected=_protected(workspace)))
    if not targets:
        return full
    _check_targets(workspace, targets)
    # Deleting a target first needs its users gone: keep the targets and every change that waits for them.
    keep = set(targets)
    grew = True
    while grew:
        grew = False
        for change in full.changes:
            if change.address not in keep and any(dep in keep for dep in change.depends_on):
                keep.add(change.address)
                grew = True
    return Plan(full.project, full.host_uri, tuple(c for c in full.changes if c.address in keep))


def _check_targets(workspace: Workspace, targets: list[str] | None) -> None:
    from vmform.errors import VmformError
    from vmform.schema.types import did_you_mean

    for target in targets or []:
        if target not in workspace.manifests.resources:
            raise VmformError(f"--target {target}: no such resource{did_you_mean(target, list(workspace.manifests.resources))}")


def apply_plan(workspace: Workspace, connections: ConnectionPool, plan_to_apply: Plan, parallelism: int | None = None,
               progress: ProgressCallback | None = None, lock_timeout: float = 0.0, command: str = "apply",
               stop: threading.Event | None = None) -> ApplyResult:
    with ProjectLock(connections.main, workspace.project.name, command, lock_timeout):
        ledger = Ledger.load(connections.main, workspace.project.name)
        ctx = ApplyContext(connections, workspace.project.name, ledger, workspace.project.shutdown_timeout)
        result = execute(plan_to_apply, ctx, parallelism or workspace.project.parallelism, progress, stop)
    verify_applied(workspace, connections, plan_to_apply, result)
    return result


def verify_applied(workspace: Workspace, connections: ConnectionPool, applied: Plan, result: ApplyResult) -> None:
    """Read back every object apply touched and compare it with the manifests, as the next plan would: what
    the plan said must be what the host holds. A difference is never accepted silently."""
    from vmform.diff import compare
    from vmform.plan import Action

    touched = [change for change in applied.changes if change.address in result.done]
    if not touched:
        return
    owned = read_live(workspace, connections).owned()
    for change in touched:
        current = owned.get(change.address)
        if change.action is Action.DELETE:
            if current is not None:
                result.mismatched[change.address] = "still on the host after it was deleted"
            continue
        resource = workspace.manifests.resources.get(change.address)
        if resource is None:
            continue
        if current is None:
            result.mismatched[change.address] = "not on the host after apply"
            continue
        differences, _, _ = compare(resource, current)
        if differences:
            result.mismatched[change.address] = "; ".join(
                f"{d.path}: planned {d.display_after}, the host has {d.display_before}" for d in differences)
