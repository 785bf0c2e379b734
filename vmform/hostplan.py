"""One plan over the project's hosts: each host is planned on its own (its resources against its own live
state), then the plans are joined. A domain whose host: changed shows on both (created on the new host,
deleted from the old): it becomes one migration, and the volumes that move with it are created on the new
host first and removed from the old one by the migration, once the domain runs where it should."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from vmform.diff import PlanOptions, make_plan
from vmform.errors import PlanError, PlanErrors
from vmform.plan import Action, Change, FieldChange, Plan
from vmform.schema.types import Effect

if TYPE_CHECKING:
    import networkx as nx

    from vmform.live import LiveState
    from vmform.model import Manifests


def plan_hosts(manifests: Manifests, graph: nx.DiGraph, order: list[str], lives: dict[str, LiveState],
               options: PlanOptions, uris: dict[str, str], default_host: str) -> Plan:
    """The plan of every host in ``lives`` (the hosts left out, unreachable ones, are not planned)."""
    per_host: dict[str, list[Change]] = {}
    notes: list[str] = []
    allowed: dict[str, tuple[str, ...]] = {}
    waiting: dict[str, str] = {}  # deletes kept while something on their host uses the object
    errors: list[PlanError] = []
    for host, live in lives.items():
        mine = manifests.on_host(host)
        try:
            plan = make_plan(mine, graph.subgraph(mine.resources).copy(), live,
                             [a for a in order if a in mine.resources], options)
        except PlanErrors as exc:
            errors.extend(exc.errors)
            continue
        per_host[host] = [replace(change, host=host) for change in plan.changes]
        allowed.update(plan.allowed)
        waiting.update({address: f"{host}: {why}" for address, why in plan.waiting.items()})
        notes += [f"{host}: {note}" for note in plan.notes]
    if errors:
        raise PlanErrors(errors)
    changes = _join(per_host, manifests, lives, errors)
    if errors:
        raise PlanErrors(errors)
    return Plan(manifests.project, uris.get(default_host, ""), tuple(changes), tuple(notes), hosts=dict(uris),
                allowed=allowed, waiting=waiting)


def _join(per_host: dict[str, list[Change]], manifests: Manifests, lives: dict[str, LiveState],
          errors: list[PlanError]) -> list[Change]:
    created = {c.address: c for changes in per_host.values() for c in changes if c.action is Action.CREATE}
    deleted = {c.address: c for changes in per_host.values() for c in changes if c.action is Action.DELETE}
    moving = {a for a in created if a in deleted and created[a].host != deleted[a].host}
    migrations: dict[str, Change] = {}
    absorbed: set[str] = set()  # source-side deletes a migration does itself
    for address in sorted(moving):
        new, old = created[address], deleted[address]
        if new.kind != "domain":
            continue
        source_volumes = _moving_volumes(old, moving, deleted)
        absorbed.update(v["address"] for v in source_volumes)
        live = next((o for o in lives[old.host].objects if o.address == address and o.kind == "domain"), None)
        running = bool(live is not None and live.active)
        migrations[address] = Change(
            address, "domain", new.name, Action.MIGRATE, host=new.host, before=old.before, after=new.after,
            fields=(FieldChange("host", old.host, new.host, Effect.LIVE if running else Effect.RESTART, old.host,
                                new.host),),
            reason=f"from host {old.host} to host {new.host}, "
                   + ("live: its disks are copied with it" if running else "stopped: its disks are copied"),
            depends_on=new.depends_on,
            identity={**old.identity, "from_host": old.host, "from_name": old.name, "running": running,
                      "volumes": source_volumes},
        )
    for address in sorted(moving - set(migrations) - absorbed):
        new, old = created[address], deleted[address]
        resource = manifests.resources.get(address)
        errors.append(PlanError(
            f"{address} moves from host {old.host} to host {new.host}: only domains move between hosts (with "
            f"their volumes); give the {new.kind} a new name or key on {new.host}, or remove it from {old.host} first",
            resource.key_position() if resource is not None else None))
    joined: list[Change] = []
    for host in per_host:
        for change in per_host[host]:
            if change.address in migrations:
                if change.action is Action.CREATE:
                    joined.append(migrations[change.address])
                continue  # the delete on the old host is the migration's
            if change.address in absorbed and change.action is Action.DELETE:
                continue
            joined.append(change)  # a delete that waited for the domain's delete now waits for its migration
    return joined


def _moving_volumes(old: Change, moving: set[str], deleted: dict[str, Change]) -> list[dict[str, Any]]:
    """The domain's volumes (and seed) that move with it: deleted on its old host, created on its new one."""
    found = []
    for address in sorted(moving):
        change = deleted[address]
        if change.kind in ("volume", "cloudinit") and old.address in _users(change, deleted):
            found.append({"address": address, "kind": change.kind, "pool": change.identity.get("pool"),
                          "name": change.identity.get("volume", change.name)})
    return found


def _users(volume_delete: Change, deleted: dict[str, Change]) -> set[str]:
    """Deletes wait for the deletes of what used the object: the domains among them used this volume."""
    return {a for a in volume_delete.depends_on if a in deleted and deleted[a].kind == "domain"}
