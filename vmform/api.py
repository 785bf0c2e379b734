"""The library API: what the CLI (and any other client) calls. No printing here."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmform import guests, planfile
from vmform.apply import ApplyResult, ProgressCallback, execute
from vmform.connection import ConnectionPool, host_identity
from vmform.diff import PlanOptions, make_plan
from vmform.errors import ConnectionLost
from vmform.graph import build_graph, creation_order
from vmform.guests import DomainOutput
from vmform.live import LiveState, read_host
from vmform.manifest.loader import load_manifests
from vmform.manifest.variables import VariableInputs
from vmform.model import Manifests
from vmform.ownership import Ledger, LockInfo, ProjectLock, current_lock
from vmform.ownership import force_unlock as remove_lock
from vmform.plan import Plan
from vmform.planfile import SavedPlan
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


def load_workspace(directory: Path | str | None = None, variables: VariableInputs | None = None) -> Workspace:
    """The project, its manifests loaded with ``variables`` (set from outside: files, assignments, env)."""
    project = load_project(directory)
    manifests = load_manifests(project.name, project.manifest_files(), project.root, project.settings, variables)
    graph = build_graph(manifests)
    return Workspace(project, manifests, graph, creation_order(graph))


def load_project_only(directory: Path | str | None = None) -> Project:
    """The project settings alone, without loading its manifests (vmform fmt works on broken ones too)."""
    return load_project(directory)


def validate(workspace: Workspace) -> None:
    """Check what every resource would render against libvirt's RNG schemas (no connection needed); the
    manifest schema, references and cycles were checked when the workspace loaded."""
    from vmform.render.validate import validate as validate_xml

    for resource in workspace.manifests.resources.values():
        if not resource.values.get("existing"):  # only used: vmform never writes its XML
            validate_xml(resource.kind.name, render(workspace, resource), resource.address)


def render(workspace: Workspace, resource: Any) -> Any:
    """The XML a resource is created from (a volume's backing file at the path its pool will give it)."""
    from vmform.render.xml import render_resource

    return render_resource(resource.kind.name, resource.libvirt_name, resource.desired, workspace.project.name,
                           resource.address, _backing_path(workspace, resource))


def _backing_path(workspace: Workspace, resource: Any) -> str | None:
    backing = resource.desired.get("backing") if resource.kind.name == "volume" else None
    if not backing:
        return None
    pools = [p for p in workspace.manifests.of_kind("pool") if p.libvirt_name == backing.get("pool")]
    directory = pools[0].desired.get("path") if pools else f"/{backing.get('pool')}"
    return f"{directory}/{backing.get('volume')}"


def connect(workspace: Workspace, uri: str | None = None) -> ConnectionPool:
    return ConnectionPool(uri or workspace.project.uri, reconnect_timeout=workspace.project.reconnect_timeout)


def read_live(workspace: Workspace, connections: ConnectionPool, only: dict[str, set[str]] | None = None) -> LiveState:
    pools = {r.desired["pool"] for r in workspace.manifests.of_kind("volume")}
    pools |= {r.libvirt_name for r in workspace.manifests.of_kind("pool")}
    pools |= {r.desired["pool"] for r in workspace.manifests.of_kind("cloudinit")}
    return read_host(connections.main, workspace.project.name, pools, only)


def _protected(workspace: Workspace) -> frozenset[str]:
    return frozenset(a for a, r in workspace.manifests.resources.items() if r.lifecycle.get("prevent_destroy"))


def plan(workspace: Workspace, connections: ConnectionPool, targets: list[str] | None = None,
         restart: bool = False) -> Plan:
    """What apply would change. ``restart`` lets restart-class changes restart domains and networks."""
    return _plan_with_live(workspace, connections, targets, restart)[0]


def _plan_with_live(workspace: Workspace, connections: ConnectionPool, targets: list[str] | None,
                    restart: bool) -> tuple[Plan, LiveState]:
    chosen = _expand_targets(workspace, targets)
    live = read_live(workspace, connections)
    options = PlanOptions(restart=restart, targets=frozenset(chosen), protected=_protected(workspace))
    return make_plan(workspace.manifests, workspace.graph, live, workspace.order, options), live


def saved_plan(workspace: Workspace, connections: ConnectionPool, targets: list[str] | None = None,
               restart: bool = False) -> SavedPlan:
    """A plan with what ``apply_saved`` checks before executing it: the host's identity and the
    fingerprints of the manifests and of the live state the plan read. Write it with ``planfile.write``."""
    host = host_identity(connections.main)
    the_plan, live = _plan_with_live(workspace, connections, targets, restart)
    fingerprints = planfile.Fingerprints(
        manifests=planfile.manifests_fingerprint(workspace.project, workspace.manifests),
        live=planfile.live_fingerprints(workspace.manifests, live),
    )
    return SavedPlan(the_plan, host, fingerprints, tuple(targets or ()))


def destroy_plan(workspace: Workspace, connections: ConnectionPool, targets: list[str] | None = None) -> Plan:
    """Deleting everything this project owns on the host (or only the targets and what uses them)."""
    import networkx as nx

    live = read_live(workspace, connections)
    nothing = Manifests(workspace.project.name)
    protected = _protected(workspace)
    where = {a: workspace.manifests.resources[a].position("lifecycle", "prevent_destroy") for a in protected}
    full = make_plan(nothing, nx.DiGraph(), live, [], PlanOptions(protected=protected, protected_at=where))
    if not targets:
        return full
    # Deleting a target first needs its users gone (a volume's domain): keep the targets and every delete
    # theirs waits for, never what they stand on (the pool stays).
    keep: set[str] = set()
    by_address = {change.address: change for change in full.changes}
    stack = [address for address in _expand_targets(workspace, targets) if address in by_address]
    while stack:
        address = stack.pop()
        if address not in keep:
            keep.add(address)
            stack.extend(by_address[address].depends_on)
    return Plan(full.project, full.host_uri, tuple(c for c in full.changes if c.address in keep))


def _expand_targets(workspace: Workspace, targets: list[str] | None) -> list[str]:
    """The resources --target names: one address, or a module's (module.web: everything it declares)."""
    from vmform.errors import VmformError
    from vmform.schema.types import did_you_mean

    chosen: list[str] = []
    for target in targets or []:
        found = workspace.manifests.dependency_targets(target)
        if not found:
            known = [*workspace.manifests.resources, *workspace.manifests.modules]
            raise VmformError(f"--target {target}: no such resource or module{did_you_mean(target, known)}")
        chosen += [address for address in found if address not in chosen]
    return chosen


def apply_plan(workspace: Workspace, connections: ConnectionPool, plan_to_apply: Plan, parallelism: int | None = None,
               progress: ProgressCallback | None = None, lock_timeout: float = 0.0, command: str = "apply",
               stop: threading.Event | None = None, abandon: threading.Event | None = None,
               notice: Callable[[str], None] | None = None, force_off: bool | None = None) -> ApplyResult:
    """Execute a plan under the project lock (waiting up to ``lock_timeout`` seconds for it; a lock left by a
    process that is provably gone is removed, and ``notice`` says so). ``force_off`` lets a domain that does
    not shut down within shutdown_timeout be powered off (None: the project's force_off setting)."""
    lock = ProjectLock(connections, workspace.project.name, command, lock_timeout, notice, stop)
    lock.acquire()
    try:
        result = _execute(workspace, connections, plan_to_apply, parallelism, progress, stop, abandon, force_off,
                          notice)
    finally:
        lock.release()
    if lock.left_behind:
        result.notes.append(lock.left_behind)
    return result


def check_saved(workspace: Workspace, connections: ConnectionPool, saved: SavedPlan) -> None:
    """Raise StalePlanError unless the saved plan was made for this project and host, from the manifests
    as they are and the host as it is now."""
    planfile.check_project(saved, workspace.project.name)
    planfile.check_host(saved, host_identity(connections.main))
    manifests_now = planfile.manifests_fingerprint(workspace.project, workspace.manifests)
    live = read_live(workspace, connections)
    planfile.check_fresh(saved, manifests_now, planfile.live_fingerprints(workspace.manifests, live))


def apply_saved(workspace: Workspace, connections: ConnectionPool, saved: SavedPlan, parallelism: int | None = None,
                progress: ProgressCallback | None = None, lock_timeout: float = 0.0,
                stop: threading.Event | None = None, abandon: threading.Event | None = None,
                notice: Callable[[str], None] | None = None, force_off: bool | None = None) -> ApplyResult:
    """Execute exactly a saved plan: under the lock, after checking it still holds; never re-planned."""
    planfile.check_project(saved, workspace.project.name)
    lock = ProjectLock(connections, workspace.project.name, "apply (saved plan)", lock_timeout, notice, stop)
    lock.acquire()
    try:
        check_saved(workspace, connections, saved)
        result = _execute(workspace, connections, saved.plan, parallelism, progress, stop, abandon, force_off,
                          notice)
    finally:
        lock.release()
    if lock.left_behind:
        result.notes.append(lock.left_behind)
    return result


def _execute(workspace: Workspace, connections: ConnectionPool, plan_to_apply: Plan, parallelism: int | None,
             progress: ProgressCallback | None, stop: threading.Event | None, abandon: threading.Event | None = None,
             force_off: bool | None = None, notice: Callable[[str], None] | None = None) -> ApplyResult:
    ledger = Ledger.load(connections.main, workspace.project.name)
    ctx = ApplyContext(connections, workspace.project.name, ledger, workspace.project.shutdown_timeout,
                       force_off=workspace.project.force_off if force_off is None else force_off, notice=notice)
    result = execute(plan_to_apply, ctx, parallelism or workspace.project.parallelism, progress, stop, abandon)
    if result.lost_connection is None and not result.abandoned:
        try:
            connections.ensure()  # libvirtd may have restarted while the changes ran
            verify_applied(workspace, connections, plan_to_apply, result)
        except ConnectionLost as exc:
            result.lost_connection = str(exc)
    return result


def verify_applied(workspace: Workspace, connections: ConnectionPool, applied: Plan, result: ApplyResult) -> None:
    """Read back every object apply touched and compare it with the manifests, as the next plan would: what
    the plan said must be what the host holds. A difference is never accepted silently."""
    from vmform.diff import compare
    from vmform.plan import Action

    touched = [change for change in applied.changes if change.address in result.done]
    if not touched:
        return
    # Only the domains and networks apply touched, by every name they had or have: with one domain changed
    # among hundreds, the read-back costs one domain's XML, not the host's.
    names: dict[str, set[str]] = {"domain": set(), "network": set()}
    for change in touched:
        if change.kind in names:
            names[change.kind].update(n for n in (change.name, change.live_name) if n)
            resource = workspace.manifests.resources.get(change.address)
            if resource is not None:
                names[change.kind].add(resource.libvirt_name)
    owned = read_live(workspace, connections, names).owned()
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


def lock_holder(workspace: Workspace, connections: ConnectionPool) -> LockInfo | None:
    """Who holds the project's lock on the host, if anyone."""
    return current_lock(connections.main, workspace.project.name)


def force_unlock(workspace: Workspace, connections: ConnectionPool, lock_id: str) -> LockInfo:
    """Remove a lock left by a killed process; only when ``lock_id`` is the current lock's."""
    return remove_lock(connections.main, workspace.project.name, lock_id)


def show_values(workspace: Workspace, addresses: list[str] | None = None,
                sensitive: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """The desired values (libvirt terms, derived defaults filled in) of the named resources, all when none
    are named; sensitive values masked unless ``sensitive``."""
    from vmform.plan import mask_sensitive

    _check_addresses(workspace, addresses)
    chosen = addresses or workspace.order
    result = []
    for address in chosen:
        resource = workspace.manifests.resources[address]
        values = dict(resource.desired)
        result.append((address, values if sensitive else mask_sensitive(resource.kind.name, values) or {}))
    return result


def domain_outputs(workspace: Workspace, connections: ConnectionPool) -> list[DomainOutput]:
    """State and IP addresses of every declared domain."""
    return guests.domain_outputs(connections.main, workspace.manifests)


def project_outputs(workspace: Workspace, connections: ConnectionPool) -> dict[str, Any]:
    """The project's outputs, evaluated against the host: domains offer state, ips and ip (the first)."""
    from vmform.errors import ManifestError, ManifestErrors
    from vmform.manifest.expressions import ResourceReader, evaluate_tree

    manifests = workspace.manifests
    if not manifests.outputs:
        return {}
    runtime = {}
    for output in guests.domain_outputs(connections.main, manifests):
        ips = [a.ip for a in output.addresses]
        runtime[output.address] = {"state": output.state, "ips": ips, "ip": ips[0] if ips else None}
    values: dict[str, Any] = {}
    errors = []
    for name, spec in manifests.outputs.items():
        reader = ResourceReader(manifests, set(manifests.resources), f"output.{name}", spec.position, runtime)
        value, problems = evaluate_tree(spec.value, {"var": dict(manifests.variables), **reader.namespaces()})
        errors += [ManifestError(f"output '{name}': {message}", spec.position) for _where, message in problems]
        values[name] = value
    if errors:
        raise ManifestErrors(errors)
    return values


def inventory(workspace: Workspace, connections: ConnectionPool) -> Any:
    """An Ansible inventory of the project's domains (vmform.inventory.Inventory)."""
    from vmform import inventory as ansible_inventory

    return ansible_inventory.build(workspace.manifests, guests.domain_outputs(connections.main, workspace.manifests))


def awaited_domains(workspace: Workspace) -> list[str]:
    """The domains apply --wait-ip waits for: declared running, with an interface on a network with DHCP."""
    return guests.awaited_domains(workspace.manifests)


def wait_for_addresses(workspace: Workspace, connections: ConnectionPool, timeout: float,
                       progress: Callable[[DomainOutput], None] | None = None) -> list[DomainOutput]:
    """Wait (bounded) until every declared running domain on a DHCP network reports an address."""
    return guests.wait_for_addresses(connections.main, workspace.manifests, timeout, progress=progress)


def awaited_agents(workspace: Workspace) -> list[str]:
    """The domains apply --wait-agent waits for: declared running, with the guest agent channel."""
    return guests.awaited_agents(workspace.manifests)


def wait_for_agents(workspace: Workspace, connections: ConnectionPool, timeout: float,
                    progress: Callable[[str], None] | None = None) -> list[str]:
    """Wait (bounded, on libvirt's agent lifecycle events) until every awaited domain's guest agent connected."""
    return guests.wait_for_agents(connections.main, workspace.manifests, timeout, progress=progress)


def console_log_path(workspace: Workspace, connections: ConnectionPool, address: str) -> Path:
    """The local file a domain's serial console is logged to (console_log)."""
    return guests.console_log(connections.main, workspace.manifests, address)


def console_stream(workspace: Workspace, connections: ConnectionPool, address: str,
                   stop: threading.Event | None = None) -> Iterator[bytes]:
    """A running domain's serial console output from now on, through libvirt (remote hosts too)."""
    return guests.console_stream(connections.main, workspace.manifests, address, stop)


def _check_addresses(workspace: Workspace, addresses: list[str] | None) -> None:
    from vmform.errors import VmformError
    from vmform.schema.types import did_you_mean

    for address in addresses or []:
        if address not in workspace.manifests.resources:
            raise VmformError(f"no resource '{address}'{did_you_mean(address, list(workspace.manifests.resources))}")
