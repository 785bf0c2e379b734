"""The library API: what the CLI (and any other client) calls. No printing here."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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
from vmform.hostplan import plan_hosts
from vmform.hosts import HostConnections
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

Connections = ConnectionPool | HostConnections  # one host, or the project's hosts


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


def connect(workspace: Workspace, uri: str | None = None, skip_unreachable: bool = False) -> HostConnections:
    """Connections to the project's hosts (opened when first used); ``uri`` overrides the default host's."""
    return HostConnections(workspace.project, uri, skip_unreachable)


def read_live(workspace: Workspace, connections: Connections,
              only: dict[str, set[str]] | None = None, host: str | None = None) -> LiveState:
    """One host's state (the default host's unless ``host`` names another)."""
    host = host or workspace.project.default_host
    manifests = workspace.manifests.on_host(host) if workspace.project.several_hosts else workspace.manifests
    pools = {r.desired["pool"] for r in manifests.of_kind("volume")}
    pools |= {r.libvirt_name for r in manifests.of_kind("pool")}
    pools |= {r.desired["pool"] for r in manifests.of_kind("cloudinit")}
    pool = connections.pool(host) if isinstance(connections, HostConnections) else connections
    return read_host(pool.main, workspace.project.name, pools, only)


def read_hosts(workspace: Workspace, connections: HostConnections) -> dict[str, LiveState]:
    """Every reachable host's state, read at once (one thread per host)."""
    from concurrent.futures import ThreadPoolExecutor

    hosts = connections.reachable()
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(hosts)))) as workers:
        states = list(workers.map(lambda h: read_live(workspace, connections, host=h), hosts))
    return dict(zip(hosts, states, strict=True))


def _protected(workspace: Workspace) -> frozenset[str]:
    return frozenset(a for a, r in workspace.manifests.resources.items() if r.lifecycle.get("prevent_destroy"))


def plan(workspace: Workspace, connections: Connections, targets: list[str] | None = None,
         restart: bool = False) -> Plan:
    """What apply would change. ``restart`` lets restart-class changes restart domains and networks."""
    return _plan_with_live(workspace, connections, targets, restart)[0]


def _plan_with_live(workspace: Workspace, connections: Connections, targets: list[str] | None,
                    restart: bool) -> tuple[Plan, dict[str, LiveState]]:
    chosen = _expand_targets(workspace, targets)
    options = PlanOptions(restart=restart, targets=frozenset(chosen), protected=_protected(workspace))
    if isinstance(connections, HostConnections) and workspace.project.several_hosts:
        lives = read_hosts(workspace, connections)
        the_plan = plan_hosts(workspace.manifests, workspace.graph, workspace.order, lives, options,
                              _uris(lives), workspace.project.default_host, set(connections.unreachable))
        return _with_widening(workspace, _skipped(the_plan, connections)), lives
    live = read_live(workspace, connections)
    plan_made = make_plan(workspace.manifests, workspace.graph, live, workspace.order, options)
    return _with_widening(workspace, plan_made), {workspace.project.default_host: live}


# The key of Plan.allowed under which vmform.toml's widenings are listed (shown in bold like any opt-in).
PROJECT_ALLOWED = "vmform.toml"


def _with_widening(workspace: Workspace, the_plan: Plan) -> Plan:
    """A project that widens what vmform allows by default (pool_roots) says so in every plan."""
    roots = workspace.project.pool_roots
    if not roots:
        return the_plan
    allowed = {PROJECT_ALLOWED: tuple(f"pool_roots {root}" for root in roots), **the_plan.allowed}
    return dataclasses.replace(the_plan, allowed=allowed)


def _uris(lives: dict[str, LiveState]) -> dict[str, str]:
    return {host: live.uri for host, live in lives.items()}


def _skipped(the_plan: Plan, connections: HostConnections) -> Plan:
    """A plan made without the hosts that could not be reached says so (plan --skip-unreachable)."""
    if not connections.unreachable:
        return the_plan
    notes = [f"host {host} skipped: {why}" for host, why in sorted(connections.unreachable.items())]
    return dataclasses.replace(the_plan, notes=(*notes, *the_plan.notes))


def saved_plan(workspace: Workspace, connections: Connections, targets: list[str] | None = None,
               restart: bool = False) -> SavedPlan:
    """A plan with what ``apply_saved`` checks before executing it: the hosts' identities and the
    fingerprints of the manifests and of the live state the plan read. Write it with ``planfile.write``."""
    the_plan, lives = _plan_with_live(workspace, connections, targets, restart)
    identities = _identities(workspace, connections, list(lives))
    fingerprints = planfile.Fingerprints(
        manifests=planfile.manifests_fingerprint(workspace.project, workspace.manifests),
        live=_live_fingerprints(workspace, lives),
    )
    default = identities.get(workspace.project.default_host) or next(iter(identities.values()))
    several = identities if workspace.project.several_hosts else {}
    return SavedPlan(the_plan, default, fingerprints, tuple(targets or ()), hosts=several, restart=restart)


def _identities(workspace: Workspace, connections: Connections, hosts: list[str]) -> dict[str, dict[str, str]]:
    if not isinstance(connections, HostConnections):
        return {workspace.project.default_host: host_identity(connections.main)}
    return {host: host_identity(connections.pool(host).main) for host in hosts}


def _live_fingerprints(workspace: Workspace, lives: dict[str, LiveState]) -> dict[str, str | None]:
    """Per address; with several hosts, per address@host (an address is on two hosts while it moves)."""
    if not workspace.project.several_hosts:
        return planfile.live_fingerprints(workspace.manifests, next(iter(lives.values())))
    found: dict[str, str | None] = {}
    for host, live in lives.items():
        for address, digest in planfile.live_fingerprints(workspace.manifests.on_host(host), live).items():
            found[f"{address}@{host}"] = digest
    return found


def destroy_plan(workspace: Workspace, connections: Connections, targets: list[str] | None = None) -> Plan:
    """Deleting everything this project owns on the host (or only the targets and what uses them)."""
    import networkx as nx

    nothing = Manifests(workspace.project.name)
    protected = _protected(workspace)
    where = {a: workspace.manifests.resources[a].position("lifecycle", "prevent_destroy") for a in protected}
    options = PlanOptions(protected=protected, protected_at=where)
    if isinstance(connections, HostConnections) and workspace.project.several_hosts:
        lives = read_hosts(workspace, connections)
        full = _skipped(plan_hosts(nothing, nx.DiGraph(), [], lives, options, _uris(lives),
                                   workspace.project.default_host), connections)
    else:
        live = read_live(workspace, connections)
        full = make_plan(nothing, nx.DiGraph(), live, [], options)
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
    return dataclasses.replace(full, changes=tuple(c for c in full.changes if c.address in keep))


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


def _lock_hosts(workspace: Workspace, connections: Connections) -> list[str]:
    """The hosts whose project lock an apply or destroy takes: every reachable host of the project (with
    --skip-unreachable, the ones that answered), in name order, so two applies never deadlock."""
    if isinstance(connections, HostConnections) and workspace.project.several_hosts:
        return sorted(connections.reachable())
    return [workspace.project.default_host]


# The project locks this context holds, by (connections, host): ``apply_plan`` and ``apply_saved`` inside
# ``locked`` use them instead of taking them again (a second take would wait for ourselves).
_HELD: ContextVar[dict[tuple[int, str], ProjectLock] | None] = ContextVar("vmform_held_locks", default=None)


@dataclass
class HeldLocks:
    """The project locks ``locked`` took, by host."""

    locks: dict[str, ProjectLock]

    @property
    def left_behind(self) -> list[str]:
        return [lock.left_behind for lock in self.locks.values() if lock.left_behind]


@contextmanager
def locked(workspace: Workspace, connections: Connections, command: str = "apply", lock_timeout: float = 0.0,
           notice: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> Iterator[HeldLocks]:
    """Hold the project lock of every host the project uses for the body: take the lock first, then read
    the hosts and plan (``plan``, ``destroy_plan``, ``check_saved``), confirm, execute (``apply_plan``,
    ``apply_saved``: they use these locks), then release. An apply that had to wait for another one thus
    plans what that one left, never what was there before it. A lock that cannot be released is told to
    ``notice`` as a warning."""
    taken: dict[str, ProjectLock] = {}
    held = dict(_HELD.get() or {})
    try:
        for host in _lock_hosts(workspace, connections):
            key = (id(connections), host)
            if key in held:
                continue  # an outer ``locked`` holds it
            lock = ProjectLock(_pool(connections, host), workspace.project.name, command, lock_timeout, notice, stop)
            lock.acquire()
            taken[host] = lock
            held[key] = lock
    except BaseException:
        _release(list(taken.values()))
        raise
    token = _HELD.set(held)
    result = HeldLocks(taken)
    try:
        yield result
    finally:
        _HELD.reset(token)
        _release(list(taken.values()))
        if notice is not None:
            for text in result.left_behind:
                notice(f"Warning: {text}")


def release_held() -> None:
    """Release the locks ``locked`` holds in this context now (a process about to exit at once, e.g. after a
    second Ctrl-C abandoned the changes in flight, does not get to leave ``locked``)."""
    for lock in (_HELD.get() or {}).values():
        lock.release()


def apply_plan(workspace: Workspace, connections: Connections, plan_to_apply: Plan, parallelism: int | None = None,
               progress: ProgressCallback | None = None, lock_timeout: float = 0.0, command: str = "apply",
               stop: threading.Event | None = None, abandon: threading.Event | None = None,
               notice: Callable[[str], None] | None = None, force_off: bool | None = None) -> ApplyResult:
    """Execute a plan under the project lock of every host it changes. Inside ``locked`` it uses the locks
    held there (the plan was made under them); otherwise it takes them itself, waiting up to ``lock_timeout``
    seconds for each (a lock left by a process that is provably gone is removed, and ``notice`` says so) —
    then the plan may have been made before another apply changed the hosts: prefer ``locked``.
    ``force_off`` lets a domain that does not shut down within shutdown_timeout be powered off (None: the
    project's force_off setting)."""
    locks = _locks(workspace, connections, plan_to_apply, command, lock_timeout, notice, stop)
    try:
        result = _execute(workspace, connections, plan_to_apply, parallelism, progress, stop, abandon, force_off,
                          notice)
    finally:
        _release(locks)
    result.notes.extend(lock.left_behind for lock in locks if lock.left_behind)
    return result


def _plan_hosts(workspace: Workspace, plan_to_apply: Plan) -> list[str]:
    hosts = {c.host for c in plan_to_apply.changes} | {str(c.identity["from_host"]) for c in plan_to_apply.changes
                                                         if "from_host" in c.identity}
    return sorted(hosts) or [workspace.project.default_host]


def _pool(connections: Connections, host: str) -> ConnectionPool:
    return connections.pool(host) if isinstance(connections, HostConnections) else connections


def _locks(workspace: Workspace, connections: Connections, plan_to_apply: Plan, command: str, lock_timeout: float,
           notice: Callable[[str], None] | None, stop: threading.Event | None) -> list[ProjectLock]:
    """The project lock on every host the plan touches that this context does not hold yet (``locked``), taken
    in name order (two applies never deadlock); the ones taken here, to release."""
    held = _HELD.get() or {}
    taken: list[ProjectLock] = []
    try:
        for host in _plan_hosts(workspace, plan_to_apply):
            if (id(connections), host) in held:
                continue
            lock = ProjectLock(_pool(connections, host), workspace.project.name, command, lock_timeout, notice, stop)
            lock.acquire()
            taken.append(lock)
    except BaseException:
        _release(taken)
        raise
    return taken


def _release(locks: list[ProjectLock]) -> None:
    for lock in reversed(locks):
        lock.release()


def check_saved(workspace: Workspace, connections: Connections, saved: SavedPlan) -> None:
    """Raise StalePlanError unless the saved plan was made for this project and its hosts, from the
    manifests as they are and the hosts as they are now."""
    planfile.check_project(saved, workspace.project.name)
    if saved.hosts:
        if not isinstance(connections, HostConnections) or not workspace.project.several_hosts:
            raise planfile.StalePlanError("this plan was made for a project with several hosts; this one has one")
        for host, identity in saved.hosts.items():
            if host not in workspace.project.hosts:
                raise planfile.StalePlanError(f"this plan was made for host {host}, which vmform.toml no longer has")
            planfile.check_host(saved, host_identity(connections.pool(host).main), identity)
        lives = {host: read_live(workspace, connections, host=host) for host in saved.hosts}
    else:
        planfile.check_host(saved, host_identity(connections.main))
        lives = {workspace.project.default_host: read_live(workspace, connections)}
    manifests_now = planfile.manifests_fingerprint(workspace.project, workspace.manifests)
    planfile.check_fresh(saved, manifests_now, _live_fingerprints(workspace, lives))
    # Compared, never applied: what runs is the saved plan (apply never re-decides what plan decided).
    planfile.check_same_plan(saved, plan(workspace, connections, list(saved.targets) or None, saved.restart))


def apply_saved(workspace: Workspace, connections: Connections, saved: SavedPlan, parallelism: int | None = None,
                progress: ProgressCallback | None = None, lock_timeout: float = 0.0,
                stop: threading.Event | None = None, abandon: threading.Event | None = None,
                notice: Callable[[str], None] | None = None, force_off: bool | None = None) -> ApplyResult:
    """Execute exactly a saved plan: under the lock (``locked``'s, or taken here), after checking it still
    holds against the hosts as they are once the lock is held; never re-planned."""
    planfile.check_project(saved, workspace.project.name)
    locks = _locks(workspace, connections, saved.plan, "apply (saved plan)", lock_timeout, notice, stop)
    try:
        check_saved(workspace, connections, saved)
        result = _execute(workspace, connections, saved.plan, parallelism, progress, stop, abandon, force_off,
                          notice)
    finally:
        _release(locks)
    result.notes.extend(lock.left_behind for lock in locks if lock.left_behind)
    return result


def _execute(workspace: Workspace, connections: Connections, plan_to_apply: Plan, parallelism: int | None,
             progress: ProgressCallback | None, stop: threading.Event | None, abandon: threading.Event | None = None,
             force_off: bool | None = None, notice: Callable[[str], None] | None = None) -> ApplyResult:
    project = workspace.project
    contexts: dict[str, ApplyContext] = {}
    limits: dict[str, int] = {}
    for host in _plan_hosts(workspace, plan_to_apply):
        pool = _pool(connections, host)
        spec = project.hosts.get(host)
        contexts[host] = ApplyContext(pool, project.name, Ledger.load(pool.main, project.name), project.shutdown_timeout,
                                      force_off=project.force_off if force_off is None else force_off, notice=notice,
                                      migration_uri=spec.migration_uri if spec is not None else None,
                                      detach_timeout=project.detach_timeout)
        limits[host] = parallelism or (spec.parallelism if spec is not None else None) or project.parallelism
    result = execute(plan_to_apply, contexts, sum(limits.values()), progress, stop, abandon, limits)
    if result.lost_connection is None and not result.abandoned:
        for host, ctx in contexts.items():
            try:
                ctx.connections.ensure()  # libvirtd may have restarted while the changes ran
                verify_applied(workspace, connections, plan_to_apply, result, host)
            except ConnectionLost as exc:
                result.lost_connection = str(exc)
    return result


def verify_applied(workspace: Workspace, connections: Connections, applied: Plan,
                   result: ApplyResult, host: str | None = None) -> None:
    """Read back every object apply touched (on ``host``, default: the default host) and compare it with the
    manifests, as the next plan would: what the plan said must be what the host holds. A difference is never
    accepted silently."""
    from vmform.diff import compare
    from vmform.plan import Action

    host = host or workspace.project.default_host
    from vmform.apply import keyed_changes

    done = set(result.done)
    touched = [change for key, change in keyed_changes(applied.changes).items()
               if key in done and (change.host == host or not workspace.project.several_hosts)]
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
    owned = read_live(workspace, connections, names, host).owned()
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


def lock_holder(workspace: Workspace, connections: Connections) -> LockInfo | None:
    """Who holds the project's lock on the host, if anyone."""
    return current_lock(connections.main, workspace.project.name)


def force_unlock(workspace: Workspace, connections: Connections, lock_id: str) -> LockInfo:
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


def domain_outputs(workspace: Workspace, connections: Connections) -> list[DomainOutput]:
    """State and IP addresses of every declared domain (on its host)."""
    if not isinstance(connections, HostConnections) or not workspace.project.several_hosts:
        return guests.domain_outputs(connections.main, workspace.manifests)
    found: list[DomainOutput] = []
    for host in connections.reachable():
        found += guests.domain_outputs(connections.pool(host).main, workspace.manifests.on_host(host))
    return found


SENSITIVE_SHOWN = "(sensitive)"  # what a sensitive output is shown as, by every client


def project_outputs(workspace: Workspace, connections: Connections, show_sensitive: bool = False) -> dict[str, Any]:
    """The project's outputs, evaluated against the host: domains offer state, ips and ip (the first). A
    sensitive output is ``(sensitive)`` unless ``show_sensitive``: the CLI and the Ansible module both mask here."""
    from vmform.errors import ManifestError, ManifestErrors
    from vmform.manifest.expressions import ResourceReader, evaluate_tree

    manifests = workspace.manifests
    if not manifests.outputs:
        return {}
    runtime = {}
    for output in domain_outputs(workspace, connections):
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
    if not show_sensitive:
        values = {name: SENSITIVE_SHOWN if manifests.outputs[name].sensitive else value for name, value in values.items()}
    return values


def inventory(workspace: Workspace, connections: Connections) -> Any:
    """An Ansible inventory of the project's domains (vmform.inventory.Inventory)."""
    from vmform import inventory as ansible_inventory

    return ansible_inventory.build(workspace.manifests, domain_outputs(workspace, connections))


def awaited_domains(workspace: Workspace) -> list[str]:
    """The domains apply --wait-ip waits for: declared running, with an interface on a network with DHCP."""
    return guests.awaited_domains(workspace.manifests)


def wait_for_addresses(workspace: Workspace, connections: Connections, timeout: float,
                       progress: Callable[[DomainOutput], None] | None = None) -> list[DomainOutput]:
    """Wait (bounded) until every declared running domain on a DHCP network reports an address."""
    return _wait_per_host(workspace, connections, timeout,
                          lambda conn, manifests, left: guests.wait_for_addresses(conn, manifests, left, progress=progress))


def awaited_agents(workspace: Workspace) -> list[str]:
    """The domains apply --wait-agent waits for: declared running, with the guest agent channel."""
    return guests.awaited_agents(workspace.manifests)


def wait_for_agents(workspace: Workspace, connections: Connections, timeout: float,
                    progress: Callable[[str], None] | None = None) -> list[str]:
    """Wait (bounded, on libvirt's agent lifecycle events) until every awaited domain's guest agent connected."""
    return _wait_per_host(workspace, connections, timeout,
                          lambda conn, manifests, left: guests.wait_for_agents(conn, manifests, left, progress=progress))


def _wait_per_host(workspace: Workspace, connections: Connections, timeout: float,
                   wait: Callable[[Any, Manifests, float], list[Any]]) -> list[Any]:
    """One wait per host, in turn, all within one deadline."""
    if not isinstance(connections, HostConnections) or not workspace.project.several_hosts:
        return wait(connections.main, workspace.manifests, timeout)
    import time

    deadline = time.monotonic() + timeout
    found: list[Any] = []
    for host in connections.reachable():
        found += wait(connections.pool(host).main, workspace.manifests.on_host(host),
                      max(0.0, deadline - time.monotonic()))
    return found


def console_log_path(workspace: Workspace, connections: Connections, address: str) -> Path:
    """The local file a domain's serial console is logged to (console_log)."""
    return guests.console_log(_host_of(workspace, connections, address), workspace.manifests, address)


def console_stream(workspace: Workspace, connections: Connections, address: str,
                   stop: threading.Event | None = None) -> Iterator[bytes]:
    """A running domain's serial console output from now on, through libvirt (remote hosts too)."""
    return guests.console_stream(_host_of(workspace, connections, address), workspace.manifests, address, stop)


def _host_of(workspace: Workspace, connections: Connections, address: str) -> Any:
    """The connection to the host a resource lives on."""
    resource = workspace.manifests.resources.get(address)
    if resource is None or not isinstance(connections, HostConnections):
        return connections.main
    return connections.pool(resource.host).main


def _check_addresses(workspace: Workspace, addresses: list[str] | None) -> None:
    from vmform.errors import VmformError
    from vmform.schema.types import did_you_mean

    for address in addresses or []:
        if address not in workspace.manifests.resources:
            raise VmformError(f"no resource '{address}'{did_you_mean(address, list(workspace.manifests.resources))}")
