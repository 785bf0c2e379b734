"""Which libvirt calls each planned action allows, on which objects: the journal's policy (vmform.journal).

A change may act only on its own object (by UUID when the plan knows it, else by its libvirt name, today's or
the planned one), and only with the calls its action implies:

- ``+`` create: define or create the object of its own name, start it, set its autostart (a domain also its
  balloon metadata, and ``suspend`` when its state is paused). It may undo only what it made itself in this apply
  (a network that cannot start is undefined, a volume whose upload failed is deleted).
- ``~`` update: redefine its object. A domain: devices (when disks or interfaces change), memory and vCPUs
  (when those change), autostart (when it changes), metadata; start, stop, suspend and resume only when the
  change restarts it or changes its ``state``. A network: live updates, autostart, start; stop only when it
  restarts, and the interfaces of exactly the running domains its ``replug`` lists. A pool: autostart, start.
  A volume: resize, and blockResize on the running domain that uses it. Never undefine, never delete.
- ``-`` delete: stop, undefine or delete its own object (a pool is refreshed first, to see it is empty).
- ``-/+`` and ``+/-``: what delete and create allow; a base volume replaced under its overlays also deletes the
  overlays its change lists (``identity.overlays``; each is a ``-/+`` of the same plan).
- ``>`` move: migrate or undefine the domain on its old host, define it and set its autostart on the new one,
  upload into the new host's volumes of its disks, and delete on the old host only the volumes the move lists.

Every change may write its hosts' ledger (category ``ledger``). The project lock (category ``lock``) may be
written anywhere. ``vmform import`` (category ``import``) may only mark what it adopts: a domain's metadata, a
network's definition, the ledger.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmform.journal import Scope, Target
    from vmform.plan import Change

_SECRET_USAGE = re.compile(r"^vmform/(?P<project>[^/]+)/(?P<what>lock|ledger)$")

# What a call does, by the kind of object it acts on.
_GROUPS: dict[str, dict[str, str]] = {
    "domain": {
        "defineXML": "define", "defineXMLFlags": "define",
        "create": "start", "createWithFlags": "start", "createWithFiles": "start",
        "resume": "resume", "pMWakeup": "resume", "suspend": "suspend",
        "shutdown": "stop", "shutdownFlags": "stop", "destroy": "stop", "destroyFlags": "stop",
        "reboot": "stop", "reset": "stop", "managedSave": "stop", "pMSuspendForDuration": "stop",
        "undefine": "undefine", "undefineFlags": "undefine",
        "attachDevice": "device", "attachDeviceFlags": "device", "detachDevice": "device",
        "detachDeviceFlags": "device", "detachDeviceAlias": "device", "updateDeviceFlags": "device",
        "setMemory": "memory", "setMemoryFlags": "memory", "setMaxMemory": "memory",
        "setVcpus": "vcpus", "setVcpusFlags": "vcpus", "setVcpu": "vcpus",
        "setAutostart": "autostart", "setMetadata": "metadata", "blockResize": "resize",
        "migrate": "migrate", "migrate2": "migrate", "migrate3": "migrate", "migrateToURI": "migrate",
        "migrateToURI2": "migrate", "migrateToURI3": "migrate",
    },
    "network": {
        "networkDefineXML": "define", "networkDefineXMLFlags": "define", "create": "start", "destroy": "stop",
        "undefine": "undefine", "update": "update", "setAutostart": "autostart",
    },
    "pool": {
        "storagePoolDefineXML": "define", "build": "build", "create": "start", "destroy": "stop",
        "delete": "delete", "undefine": "undefine", "refresh": "refresh", "setAutostart": "autostart",
    },
    "volume": {
        "createXML": "create", "createXMLFrom": "create", "upload": "upload", "resize": "resize",
        "delete": "delete", "wipe": "wipe", "wipePattern": "wipe",
    },
    "secret": {"secretDefineXML": "define", "setValue": "value", "undefine": "undefine"},
}

# What each action allows on its own object, by resource kind (cloudinit seeds are volumes).
_CREATE = {
    "domain": {"define", "start", "autostart", "metadata"},
    "network": {"define", "start", "autostart"},
    "pool": {"define", "build", "start", "autostart"},
    "volume": {"create", "upload", "resize"},
    "cloudinit": {"create", "upload"},
}
_DELETE = {
    "domain": {"stop", "undefine"},
    "network": {"stop", "undefine"},
    "pool": {"refresh", "stop", "delete", "undefine"},
    "volume": {"delete"},
    "cloudinit": {"delete"},
}
_UNDO = {"undefine", "delete"}  # what a create may do to an object it made itself in this apply


def decide(scope: Scope | None, host: str | None, method: str, target: Target, args: tuple[Any, ...],
           project: str | None) -> tuple[str, str | None]:
    """(category, why it is refused or None when allowed) for one mutating call."""
    group = _GROUPS.get(target.kind, {}).get(method)
    if target.kind == "secret":
        match = _SECRET_USAGE.match(target.name)
        if match is None or (project is not None and match["project"] != project) or group is None:
            return "change", "vmform writes no secret but its own lock and ledger"
        if match["what"] == "lock":
            return "lock", None
        if scope is None:
            return "ledger", "a ledger write outside any change"
        if scope.change is None:  # import marks adopted pools in the ledger: journaled as what it serves
            if scope.category == "import":
                return "import", None
            return "ledger", "a ledger write outside any change"
        if host is not None and host not in scope.hosts:
            return "ledger", f"the ledger of host {host}, which {scope.change.address} does not change"
        return "ledger", None
    if scope is None:
        return "change", "a mutation outside any planned change"
    if scope.change is None:
        if scope.category == "import":
            allowed = (target.kind, group) in {("domain", "metadata"), ("network", "define")}
            return "import", None if allowed else "import only marks what it adopts"
        return scope.category, "a mutation outside any planned change"
    change = scope.change
    if host is not None and host not in scope.hosts:
        return "change", f"host {host} is not a host of {change.address}"
    if group is None:
        return "change", f"{method} is no call a {_action(change)} makes"
    return "change", _allowed(scope, change, host, method, group, target, args)


def _action(change: Change) -> str:
    return f"{change.action.name.lower()} ({change.action.value}) of {change.address}"


def _allowed(scope: Scope, change: Change, host: str | None, method: str, group: str, target: Target,
             args: tuple[Any, ...]) -> str | None:
    from vmform.plan import Action

    action = change.action
    if action is Action.MIGRATE:
        return _migrate(scope, change, host, group, target)
    if action is Action.UPDATE:
        return _update(change, group, target, args)
    own_kind = "volume" if change.kind == "cloudinit" else change.kind
    if (change.kind == "volume" and action.is_replace() and target.kind == "volume" and group == "delete"
            and (target.pool, target.name) in _listed(change, "overlays")):
        return None  # a base replaced under its overlays deletes them first (each is a -/+ of the same plan)
    if target.kind != own_kind or not _own(change, target):
        return f"{target.kind} {target.shown()} is not the object of {change.address}"
    allowed: set[str] = set()
    if action in (Action.CREATE, Action.DELETE_THEN_CREATE, Action.CREATE_THEN_DELETE):
        allowed |= _CREATE.get(change.kind, set())
        if change.kind == "domain" and (change.after or {}).get("state") == "paused":
            allowed.add("suspend")
        if group in _UNDO and target.key() in scope.made:
            return None
    if action in (Action.DELETE, Action.DELETE_THEN_CREATE, Action.CREATE_THEN_DELETE):
        allowed |= _DELETE.get(change.kind, set())
    if group in allowed:
        return None
    return f"a {_action(change)} does not {group} its {target.kind}"


def _listed(change: Change, key: str) -> set[tuple[Any, Any]]:
    """(pool, name) of the volumes a change's identity lists under ``key`` (a move's old volumes, a base's
    overlays): deletes the plan shows, carried out by this change."""
    return {(v.get("pool"), v.get("name")) for v in change.identity.get(key) or [] if isinstance(v, dict)}


def _names(change: Change) -> set[str]:
    return {n for n in (change.name, change.live_name) if n}


def _own(change: Change, target: Target) -> bool:
    """Whether ``target`` is the change's own object: its UUID when both are known, else one of its names."""
    if change.kind in ("volume", "cloudinit"):
        pools = {p for p in ((change.after or {}).get("pool"), (change.before or {}).get("pool"),
                             change.identity.get("pool")) if p}
        if change.kind == "cloudinit":
            from vmform.schema.cloudinit import volume_name

            names = {volume_name(n) for n in _names(change)}
            if change.identity.get("volume"):
                names.add(str(change.identity["volume"]))
        else:
            names = _names(change)
        return target.name in names and target.pool in pools  # a volume whose pool is unknown is no one's
    uuid = change.identity.get("uuid")
    if uuid and target.uuid:
        return str(uuid).lower() == target.uuid.lower()
    return target.name in _names(change)


def _fields(change: Change) -> set[str]:
    return {f.path.split("[", 1)[0].split(".", 1)[0] for f in change.fields}


def _update(change: Change, group: str, target: Target, args: tuple[Any, ...]) -> str | None:
    fields = _fields(change)
    if change.kind == "network" and target.kind == "domain":
        if target.name in change.replug and group == "device" and target.device == "interface":
            return None
        return (f"a {_action(change)} re-plugs the interfaces of {', '.join(change.replug) or 'no domain'}, "
                f"not {group} on domain {target.name}")
    if change.kind == "volume" and target.kind == "domain":
        if group == "resize" and "size" in fields and _domain_uses(target, change, args):
            return None
        return f"a {_action(change)} does not {group} domain {target.name}"
    own_kind = "volume" if change.kind == "cloudinit" else change.kind
    if target.kind != own_kind or not _own(change, target):
        return f"{target.kind} {target.shown()} is not the object of {change.address}"
    # restart_allowed: the plan says the domain restarts when its guest does not release an unplugged device.
    unplug_restart = change.kind == "domain" and change.restart_allowed and bool(fields & {"disks", "interfaces"})
    restarts = change.restart or "state" in fields or unplug_restart
    allowed: set[str] = {"define"}
    if change.kind == "domain":
        allowed |= {"metadata"}
        if fields & {"disks", "interfaces"}:
            allowed.add("device")
        if "memory" in fields:
            allowed.add("memory")
        if "vcpus" in fields:
            allowed.add("vcpus")
        if "autostart" in fields:
            allowed.add("autostart")
        if restarts:
            allowed |= {"start", "stop", "suspend", "resume"}
    elif change.kind == "network":
        allowed |= {"update", "autostart", "start"}
        if restarts:
            allowed.add("stop")
    elif change.kind == "pool":
        allowed |= {"autostart", "start"}
    elif change.kind == "volume":
        allowed = {"resize"} if "size" in fields else set()
    else:
        allowed = set()
    if group in allowed:
        return None
    return f"a {_action(change)} does not {group} its {target.kind}"


def _domain_uses(target: Target, change: Change, args: tuple[Any, ...]) -> bool:
    """Whether the domain's disk being resized (``target.disk``: its pool and volume, which the journal read
    from the domain) is the change's volume: a volume's ~ grows its own image through the running guest only."""
    return target.disk is not None and target.disk == ((change.after or {}).get("pool"), change.name)


def _migrate(scope: Scope, change: Change, host: str | None, group: str, target: Target) -> str | None:
    source = str(change.identity.get("from_host"))
    if target.kind == "domain":
        if not _own(change, target):
            return f"domain {target.name} is not the domain {change.address} moves"
        if host == source and group in ("migrate", "undefine"):
            return None
        if host == change.host and group in ("define", "autostart"):
            return None
        return f"a {_action(change)} does not {group} its domain on host {host}"
    if target.kind == "volume":
        if host == source and group == "delete":
            if (target.pool, target.name) in _listed(change, "volumes"):
                return None
            return f"volume {target.shown()} on host {host} is not a volume the move of {change.address} deletes"
        if host == change.host and group == "upload":
            disks = {(d.get("pool"), d.get("volume")) for d in (change.after or {}).get("disks") or []}
            if (target.pool, target.name) in disks:
                return None
        return f"a {_action(change)} does not {group} volume {target.shown()} on host {host}"
    return f"a {_action(change)} does not {group} {target.kind} {target.shown()}"
