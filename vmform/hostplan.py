"""One plan over the project's hosts: each host is planned on its own (its resources against its own live
state), then the plans are joined. A domain whose host: changed shows on both (created on the new host,
deleted from the old): it becomes one migration. The volumes and seed that move with it are created on the
new host first, and their old copies are deleted on the old host by delete changes of their own that wait
for the migration: every delete a move implies is in the plan, shown and counted.

A move needs both hosts: when the new host could not be reached (--skip-unreachable), the resource and what
moves with it are left out of the plan with a note, never deleted from the host it is on."""

from __future__ import annotations

from collections.abc import Collection
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
               options: PlanOptions, uris: dict[str, str], default_host: str,
               unreachable: Collection[str] = ()) -> Plan:
    """The plan of every host in ``lives`` (the hosts left out, ``unreachable`` ones, are not planned, and
    nothing declared on them is deleted from the others)."""
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
    notes += _leave_out_moves_to(unreachable, per_host, manifests)
    changes = _join(per_host, manifests, lives, errors)
    if errors:
        raise PlanErrors(errors)
    return Plan(manifests.project, uris.get(default_host, ""), tuple(changes), tuple(notes), hosts=dict(uris),
                allowed=allowed, waiting=waiting)


def _leave_out_moves_to(unreachable: Collection[str], per_host: dict[str, list[Change]],
                        manifests: Manifests) -> list[str]:
    """Drop the deletes of resources the manifests put on a host that could not be reached: they move there,
    and a move needs both hosts. What waits for a dropped delete (the pool it stood in) is dropped too. The
    notes say what was left out."""
    notes: list[str] = []
    for host, changes in per_host.items():
        left_out: dict[str, str] = {}
        for change in changes:
            resource = manifests.resources.get(change.address)
            if change.action is Action.DELETE and resource is not None and resource.host in unreachable:
                left_out[change.address] = resource.host
        grew = True
        while grew:  # what waits for a left-out delete waits for ever
            grew = False
            for change in changes:
                blocked = next((d for d in change.depends_on if d in left_out), None)
                if change.address not in left_out and blocked is not None:
                    left_out[change.address] = left_out[blocked]
                    grew = True
        for address, target in left_out.items():
            resource = manifests.resources.get(address)
            if resource is not None and resource.host == target:
                notes.append(f"{address} moves from host {host} to host {target}, which was not reached: left out "
                             "(a move needs both hosts); it stays on host " + host)
            else:
                notes.append(f"{address} on host {host} is left out: it waits for a move to host {target}, "
                             "which was not reached")
        per_host[host] = [change for change in changes if change.address not in left_out]
        if unreachable:
            # Where a domain was is known only to its old host: one that was not reached may still hold it.
            for change in per_host[host]:
                if change.action is Action.CREATE and change.kind == "domain":
                    notes.append(f"{change.address} is created on host {host}; if it is still on host "
                                 f"{' or '.join(sorted(unreachable))} (not reached), that copy shows as a delete in "
                                 "the plan once the host answers")
    return notes


def _join(per_host: dict[str, list[Change]], manifests: Manifests, lives: dict[str, LiveState],
          errors: list[PlanError]) -> list[Change]:
    created = {c.address: c for changes in per_host.values() for c in changes if c.action is Action.CREATE}
    deleted = {c.address: c for changes in per_host.values() for c in changes if c.action is Action.DELETE}
    moving = {a for a in created if a in deleted and created[a].host != deleted[a].host}
    migrations: dict[str, Change] = {}
    old_copies: dict[str, str] = {}  # a volume or seed moving with a domain -> the domain (its old copy waits)
    for address in sorted(moving):
        new, old = created[address], deleted[address]
        if new.kind != "domain":
            continue
        source_volumes = _moving_volumes(old, moving, deleted)
        old_copies.update({v["address"]: address for v in source_volumes})
        live = next((o for o in lives[old.host].objects if o.address == address and o.kind == "domain"), None)
        running = bool(live is not None and live.active)
        # Either way the move is done when apply ends: nothing waits for a restart.
        how = ("live move: it keeps running, its disks are copied with it" if running
               else "cold move: it is stopped; its disks are copied and it is defined there")
        migrations[address] = Change(
            address, "domain", new.name, Action.MIGRATE, host=new.host, before=old.before, after=new.after,
            fields=(FieldChange("host", old.host, new.host, Effect.LIVE, old.host, new.host),),
            reason=f"from host {old.host} to host {new.host}, {how}",
            depends_on=new.depends_on,
            identity={**old.identity, "from_host": old.host, "from_name": old.name, "running": running,
                      "volumes": source_volumes},
        )
    for address in sorted(moving - set(migrations) - set(old_copies)):
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
                continue  # the domain's delete on the old host is the migration's
            if change.address in old_copies and change.action is Action.DELETE:
                domain = old_copies[change.address]
                change = replace(change, reason=f"its copy on host {change.host}: it moved with {domain} to host "
                                                f"{migrations[domain].host}, deleted once the domain is there",
                                 depends_on=tuple(dict.fromkeys((*change.depends_on, domain))))
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
