"""Desired resources vs live objects -> the Plan's changes. Only what the manifests manage is compared."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from vmform import lastapplied
from vmform.errors import PlanError, PlanErrors
from vmform.live import LiveObject, LiveState, VolumeUse
from vmform.ownership import INCOMPLETE_UPLOAD
from vmform.plan import Action, Change, FieldChange, Plan
from vmform.schema import extra_xml, xslt
from vmform.schema.cloudinit import volume_name as seed_volume_name
from vmform.schema.registry import KINDS
from vmform.schema.types import Effect, FieldSpec
from vmform.sensitive import fingerprint, masked

if TYPE_CHECKING:
    import networkx as nx

    from vmform.model import Manifests, Resource

# List fields whose items are matched by a key, so one added NIC is one change, not a new list; and how a
# change to one item takes effect on a running object (adding and removing one is always live).
LIST_KEYS: dict[tuple[str, str], tuple[str, Effect]] = {
    ("domain", "disks"): ("target", Effect.RESTART),
    ("domain", "interfaces"): ("mac", Effect.RESTART),
    ("network", "dhcp_hosts"): ("mac", Effect.LIVE),
    ("network", "dns_hosts"): ("ip", Effect.LIVE),
}


def display(spec: FieldSpec | None, value: Any) -> str:
    if value is None:
        return "(unset)"
    if spec is not None and spec.sensitive:
        return masked(value)
    if spec is not None and not isinstance(value, dict | list):
        try:
            return spec.type.display(value)
        except (TypeError, ValueError):
            pass
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_nested(v)}" for k, v in value.items() if v not in (None, False)) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(display(None, v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _nested(value: Any) -> str:
    return display(None, value) if isinstance(value, dict | list) else str(value)


def _field(spec: FieldSpec | None, path: str, before: Any, after: Any, effect: Effect) -> FieldChange:
    return FieldChange(path, before, after, effect, display(spec, before), display(spec, after))


def _domain_effect(spec: FieldSpec, desired: dict[str, Any], live: LiveObject) -> Effect:
    """Live only when libvirt can do it on the running domain; otherwise at the next restart."""
    if not live.active:
        return Effect.LIVE  # nothing runs: the new definition is all there is
    if spec.name in ("state", "autostart", "description"):
        return Effect.LIVE
    running = live.running_values
    if spec.name == "memory":
        return Effect.LIVE if desired["memory"] <= (running.get("max_memory") or 0) else Effect.RESTART
    if spec.name == "vcpus":
        # Hot-unplugging a vCPU needs the guest's help and many machine types refuse it: only growth is live.
        grows = (running.get("vcpus") or 0) <= desired["vcpus"] <= (running.get("max_vcpus") or 0)
        return Effect.LIVE if grows else Effect.RESTART
    return Effect.RESTART


def _effect(kind: str, spec: FieldSpec, desired: dict[str, Any], live: LiveObject) -> Effect:
    if kind == "domain":
        return _domain_effect(spec, desired, live)
    if kind == "network":
        if spec.effect is Effect.LIVE or not live.active:
            return Effect.LIVE
        return Effect.RESTART
    return spec.effect


def _hotpluggable(kind: str, field_name: str, item: dict[str, Any]) -> bool:
    """Whether libvirt can attach or detach this item on a running domain: PCI-like buses only; IDE and
    SATA drives (cdroms included) are fixed for the life of the QEMU process."""
    if kind == "domain" and field_name == "disks":
        return item.get("bus") in ("virtio", "scsi", "usb")
    return True


def _list_changes(kind: str, spec: FieldSpec, key: str, before: list[Any] | None, after: list[Any], live: LiveObject,
                  running: list[Any] | None, pending: list[str], modify_effect: Effect = Effect.RESTART,
                  unplugging: frozenset[str] = frozenset()) -> list[FieldChange]:
    """Per-item changes of a keyed list. An item the persistent config already has right, but the running
    object does not, is a change only when libvirt can fix it live; otherwise it is pending (waits for the
    next restart), so a plan right after apply is empty."""
    changes: list[FieldChange] = []
    before_by = {item.get(key): item for item in before or []}
    after_by = {item.get(key): item for item in after}
    running_by = {item.get(key): item for item in running} if running is not None else before_by

    def plug_effect(item: dict[str, Any]) -> Effect:
        return Effect.LIVE if not live.active or _hotpluggable(kind, spec.name, item) else Effect.RESTART

    def lagging(path: str, effect: Effect, old: Any, new: Any) -> None:
        if effect is Effect.LIVE:
            changes.append(_field(spec, path, old, new, effect))
        else:
            pending.append(path)

    for item_key, item in after_by.items():
        old = before_by.get(item_key)
        path = f"{spec.name}[{item_key}]"
        if old is None:
            changes.append(_field(spec, path, old, item, plug_effect(item)))
            continue
        config_right = _comparable(old, item) == item
        if item_key not in running_by:
            lagging(path, plug_effect(item), None, item)
            continue
        if config_right and _comparable(running_by[item_key], item) == item:
            continue
        effect = modify_effect if live.active else Effect.LIVE
        differing = {k for k in item if old.get(k) != item[k] or running_by[item_key].get(k) != item[k]}
        if live.active and differing <= _live_item_keys(kind, spec.name, item):
            effect = Effect.LIVE
        if config_right:
            lagging(path, effect, running_by[item_key], item)
        else:
            changes.append(_field(spec, path, old, item, effect))
    for item_key, item in before_by.items():
        if item_key not in after_by:
            changes.append(_field(spec, f"{spec.name}[{item_key}]", item, None, plug_effect(item)))
    for item_key, item in running_by.items():  # attached live only (e.g. virsh attach-interface --live)
        if item_key not in after_by and item_key not in before_by:
            if item_key in unplugging:  # asked to leave already; the guest has not let go (see UNPLUG_NAMESPACE)
                pending.append(f"{spec.name}[{item_key}] {UNRELEASED}")
            else:
                lagging(f"{spec.name}[{item_key}]", plug_effect(item), item, None)
    return changes


def _live_item_keys(kind: str, field_name: str, item: dict[str, Any]) -> set[str]:
    """Parts of a list item libvirt changes on the running object with updateDeviceFlags: a NIC's network
    or bridge, a cdrom's medium."""
    if kind == "domain" and field_name == "interfaces":
        return {"network", "bridge"}
    if kind == "domain" and field_name == "disks" and item.get("device") == "cdrom":
        return {"path", "volume", "pool", "format"}
    return set()


def _comparable(live_item: dict[str, Any], desired_item: dict[str, Any]) -> dict[str, Any]:
    """The live item limited to the keys the desired item states."""
    return {k: live_item.get(k) for k in desired_item}


def compare(resource: Resource, live: LiveObject) -> tuple[list[FieldChange], list[str], list[str]]:
    """Field changes needed to turn live into desired, the fields that force a replace, and the fields
    whose new value waits for the running object's restart."""
    kind = resource.kind.name
    desired = resource.kind.settle(resource, live) if resource.kind.settle is not None else resource.desired
    changes: list[FieldChange] = []
    forcing: list[str] = []
    pending: list[str] = []
    ignored = set((resource.values.get("lifecycle") or {}).get("ignore_changes") or [])
    for spec in resource.kind.fields:
        if not spec.compare or spec.name not in desired or spec.name in ignored:
            continue
        after = desired[spec.name]
        before = live.values.get(spec.name)
        if kind == "volume" and spec.name == "source":
            # Compared by content: the ledger keeps the digest of what was uploaded.
            after_digest = resource.desired.get("source_sha256")
            if live.values.get("source_sha256") != after_digest:
                changes.append(_field(spec, "source", live.values.get("source_sha256"), after_digest, Effect.REPLACE))
                forcing.append("source")
            continue
        if spec.name == "xml":
            changes.extend(_extra_xml_changes(resource, spec, live, pending))
            continue
        if spec.name == "xslt":
            changes.extend(_stylesheet_changes(resource, spec, live, pending))
            continue
        if spec.sensitive:
            # Compared by digest: the host side keeps only the fingerprint (or its text), and so does the plan.
            after = fingerprint(after)
            before = fingerprint(before)
        list_key = LIST_KEYS.get((kind, spec.name))
        if list_key is not None:
            running = live.running_values.get(spec.name) if live.active and live.running_values else None
            unplugging = frozenset(entry["key"] for entry in live.running_values.get("unplugging") or []
                                   if entry["field"] == spec.name)
            changes.extend(_list_changes(kind, spec, list_key[0], before, after, live, running, pending, list_key[1],
                                         unplugging))
            continue
        if kind == "volume" and spec.name == "size" and before is not None and after < before:
            raise PlanError(
                f"{resource.address}: size {display(spec, after)} is smaller than the volume's {display(spec, before)}; "
                "shrinking a disk image loses data and is refused"
            )
        running_value = live.running_values.get(spec.name, before) if live.active and live.running_values else before
        if spec.sensitive:
            running_value = fingerprint(running_value)
        if spec.same is not None:  # libvirt rewrote the value into an equal one: compare as written
            before = after if spec.same(before, after) else before
            running_value = after if spec.same(running_value, after) else running_value
        if before == after and running_value == after:
            continue
        effect = _effect(kind, spec, desired, live)
        if spec.effect is Effect.REPLACE:
            effect = Effect.REPLACE
            forcing.append(spec.name)
        if before == after:
            # The persistent config is already right; only the running domain lags behind.
            if kind == "domain" and spec.name == "memory" and _balloon_lagging(live, after, running_value):
                # libvirt reports the balloon's actual size. vmform already asked for this target and the
                # guest has not moved since (no balloon driver): asking again would change nothing.
                pending.append(f"memory (the guest reports {display(spec, running_value)} of memory, vmform asked for "
                               f"{display(spec, after)})")
            elif effect is Effect.LIVE:
                changes.append(_field(spec, spec.name, running_value, after, effect))
            else:
                pending.append(spec.name)
            continue
        changes.append(_field(spec, spec.name, before, after, effect))
    changes.extend(_removals(resource, live, desired, ignored, changes))
    changes.extend(state_drift(kind, live, pending, resource.desired.get("active", True) is not False))
    return changes, forcing, pending


# The plan's name for a change that only rewrites vmform's last-applied record on the object.
LAST_APPLIED = "last_applied"


def _removals(resource: Resource, live: LiveObject, desired: dict[str, Any], ignored: set[str],
              found: list[FieldChange]) -> list[FieldChange]:
    """Three-way: what vmform stated when it last wrote the object (``live.applied``) and the manifest no longer
    states is removed from the host. Only recorded entries are candidates, so libvirt's additions and what
    someone else added are never touched; an object without a record (an older vmform's) has none."""
    recorded = live.applied
    if recorded is None:
        return []
    kind = resource.kind.name
    now = lastapplied.record_for(kind, desired)
    removals: list[FieldChange] = []
    for name in recorded.fields:
        spec = resource.kind.spec(name)
        if spec is None or spec.removal is None or name in desired or name in ignored:
            continue
        if any(extra_xml.overlap(path, region) for path in now.xml for region in extra_xml.regions(spec, kind)):
            continue  # the xml: section states that part of the document now
        before = live.values.get(name)
        if before is None or before == spec.removal.value:
            continue
        removals.append(_field(spec, name, before, None, _effect(kind, spec, desired, live)))
    gone = [path for path in lastapplied.removed_paths(recorded, now.xml) if not _curated_claims(resource, desired, path)]
    if gone and "xml" not in ignored and live.config_root is not None:
        from vmform.render.xml import render_resource
        from vmform.schema.generic import value_at

        host = extra_xml.document_data(live.config_root, kind)
        rendered = extra_xml.document_data(
            render_resource(kind, resource.libvirt_name, desired, "", resource.address), kind)
        for path in gone:
            before = value_at(host, path)
            after = value_at(rendered, path)
            if before is None or after is not None and extra_xml.matches(after, before, path[-1]):
                continue
            removals.append(FieldChange(lastapplied.xml_change_path(path), before, after,
                                        Effect.RESTART if live.active else Effect.LIVE,
                                        display(None, before), display(None, after)))
    rewrites = [c for c in [*found, *removals] if _rewrites_definition(resource, c.path)]
    if now != recorded and not rewrites:
        # Nothing else rewrites the definition (which writes the record too): the record alone is brought up to
        # date, so that a later removal removes what the manifest states now, and only that.
        removals.append(FieldChange(LAST_APPLIED, recorded.shown(), now.shown(), Effect.LIVE,
                                    ", ".join(recorded.shown()) or "(nothing)", ", ".join(now.shown()) or "(nothing)"))
    return removals


def _curated_claims(resource: Resource, desired: dict[str, Any], path: tuple[str, ...]) -> bool:
    """A curated field the manifest has now (stated or by default) writes that part of the document."""
    kind = resource.kind.name
    return any(spec.name in desired and extra_xml.overlap(path, region)
               for spec in resource.kind.fields if spec.binding is not None and spec.name not in ("xml", "xslt")
               for region in extra_xml.regions(spec, kind))


def _rewrites_definition(resource: Resource, path: str) -> bool:
    """Whether applying a field change redefines the object (so its last-applied record is written with it)."""
    if resource.kind.name == "pool":
        return True  # a pool's record is in its ledger entry, which every update of the pool writes
    spec = resource.kind.spec(path.split("[", 1)[0].split(".", 1)[0])
    return spec is not None and spec.binding is not None


# How a removal that waits for the guest reads in the plan's notes ("disks[vdb] removal (…) configured; …").
UNRELEASED = "removal (the guest has not released the device)"
DEVICE_NOUNS = {"interfaces": ("interface", "MAC address"), "disks": ("disk", "target")}


def duplicate_path(entry: dict[str, Any]) -> str:
    """The plan path of a device that repeats a managed one's key: ``interfaces[52:54:00:aa:00:01]@pci:0000:00:08.0``."""
    return f"{entry['field']}[{entry['key']}]@{entry['address'] or 'unaddressed'}"


def is_duplicate_path(path: str) -> bool:
    return "]@" in path


def state_drift(kind: str, live: LiveObject, pending: list[str], wants_active: bool = True) -> list[FieldChange]:
    """What was changed outside vmform that no manifest field states: a domain or network undefined while it ran
    (transient), a network or pool stopped, devices that repeat a managed device's key. Each is a change that
    apply corrects, so the plan shows it instead of a later apply failing on it."""
    changes: list[FieldChange] = []
    if kind in ("domain", "network") and not live.persistent:
        # Defined again from the running definition with every managed field written from the manifests: what
        # libvirt assigned (UUID, device addresses, MACs) stays; settings made outside vmform on the running
        # object are kept too, as an update keeps them.
        changes.append(FieldChange("persistent", False, True, Effect.LIVE, "transient (undefined outside vmform while it ran)",
                                   "persistent (defined again from its running definition, with the manifests' values)"))
    if kind in ("network", "pool") and not live.active and wants_active:
        after = "active (started; running guests' interfaces are plugged in again)" if kind == "network" else "active (started)"
        changes.append(FieldChange("active", False, True, Effect.LIVE, "inactive (stopped outside vmform)", after))
    unplugging = {(e["field"], e["key"], e["address"]) for e in live.running_values.get("unplugging") or []}
    for entry in live.duplicates:
        where = list(entry["where"])
        path = duplicate_path(entry)
        if "live" in where and (entry["field"], entry["key"], entry["address"]) in unplugging:
            where.remove("live")  # asked to leave already: it goes when the guest restarts
            pending.append(f"{path} {UNRELEASED}")
        if not where:
            continue
        changes.append(FieldChange(path, {**entry["item"], "address": entry["address"], "where": where}, None,
                                   Effect.LIVE, _duplicate_display(entry, where), "(removed)"))
    return changes


def _duplicate_display(entry: dict[str, Any], where: list[str]) -> str:
    noun, key_name = DEVICE_NOUNS.get(entry["field"], (entry["field"], "key"))
    place = {("config", "live"): "in the running domain and its definition", ("live",): "in the running domain",
             ("config",): "in the domain's definition"}[tuple(sorted(where))]
    return f"a second {noun} with this {key_name} {place}, not in the manifests: {display(None, entry['item'])}"


def _extra_xml_changes(resource: Resource, spec: FieldSpec, live: LiveObject, pending: list[str]) -> list[FieldChange]:
    """The xml: section: every stated value must be on the host (libvirt's own additions are not changes)."""
    kind = resource.kind.name
    desired = resource.desired["xml"]
    found = [
        FieldChange(extra_xml.path_text(path), before, after, Effect.RESTART if live.active else Effect.LIVE,
                    display(None, before), display(None, after))
        for path, before, after in extra_xml.changes(desired, extra_xml.document_data(live.config_root, kind))
    ]
    if not found and live.active and live.running_root is not None:
        running = extra_xml.document_data(live.running_root, kind)
        if any(True for _ in extra_xml.changes(desired, running)):
            pending.append("xml")  # configured; the running object picks it up when it restarts
    return found


def _stylesheet_changes(resource: Resource, spec: FieldSpec, live: LiveObject, pending: list[str]) -> list[FieldChange]:
    """The stylesheet holds on the host when running it over the host's XML changes nothing."""
    text = resource.desired["xslt"]
    differs, where = xslt.pending_effect(text, live.config_root)
    if differs:
        shown = f"{xslt.digest(text)} changes {where}"
        return [FieldChange("xslt", None, text, Effect.RESTART if live.active else Effect.LIVE,
                            f"(the host's XML at {where})", shown)]
    if live.active and xslt.pending_effect(text, live.running_root)[0]:
        pending.append("xslt")
    return []


def _balloon_lagging(live: LiveObject, target: int, actual: Any) -> bool:
    record = live.running_values.get("balloon") or {}
    return record.get("target") == target and record.get("actual") == actual


def _collision(resource: Resource, live: LiveObject) -> PlanError:
    owner = f"owned by vmform project '{live.owner_project}'" if live.owner_project else "not managed by vmform"
    where = f" in pool '{live.identity.get('pool')}'" if resource.kind.name == "volume" else ""
    return PlanError(
        f"{resource.kind.name} '{resource.libvirt_name}'{where} exists and is {owner}; vmform will not adopt, change "
        f"or delete it — rename {resource.address} (name:) or remove the existing object",
        resource.key_position(),
    )


def _live_dependencies(obj: LiveObject, owned_index: dict[tuple[str, str], str]) -> list[str]:
    """Addresses of owned objects this live object uses (so deleting those waits for it)."""
    deps: list[str] = []
    if obj.kind == "domain":
        for disk in obj.values.get("disks") or []:
            if disk.get("volume"):
                deps.append(owned_index.get(("volume", f"{disk.get('pool')}/{disk['volume']}"), ""))
        for nic in obj.values.get("interfaces") or []:
            if nic.get("network"):
                deps.append(owned_index.get(("network", nic["network"]), ""))
    elif obj.kind in ("volume", "cloudinit"):
        deps.append(owned_index.get(("pool", obj.identity["pool"]), ""))
        backing = obj.values.get("backing") or {}
        if backing.get("volume"):
            deps.append(owned_index.get(("volume", f"{backing['pool']}/{backing['volume']}"), ""))
    return [d for d in deps if d]


@dataclass(frozen=True)
class PlanOptions:
    restart: bool = False  # apply --restart: restart-class changes may restart domains and networks
    targets: frozenset[str] = frozenset()
    protected: frozenset[str] = frozenset()  # prevent_destroy addresses (from the manifests, also for destroy)
    # Where each protected address says prevent_destroy (destroy plans against no manifests: errors still point
    # at the line).
    protected_at: Any = None


def _using_network(live: LiveState, network: str) -> tuple[str, ...]:
    """Running domains with an interface on this network: a network restart must re-plug them."""
    users = []
    for obj in live.objects:
        if obj.kind == "domain" and obj.active:
            nics = obj.running_values.get("interfaces") or obj.values.get("interfaces") or []
            if any(nic.get("network") == network for nic in nics):
                users.append(obj.name)
    return tuple(sorted(users))


def _pending_changes(resource: Resource, live: LiveObject, pending: list[str]) -> list[FieldChange]:
    """Restart-class values already in the persistent config, shown as what the restart brings."""
    result = []
    for name in pending:
        field_name = name.split(" ", 1)[0]
        if is_duplicate_path(field_name):  # a second device with a managed key, leaving with the restart
            entry = next((e for e in live.duplicates if duplicate_path(e) == field_name), None)
            if entry is not None:
                item = {**entry["item"], "address": entry["address"], "where": ["live"]}
                result.append(FieldChange(field_name, item, None, Effect.RESTART, _duplicate_display(entry, ["live"]),
                                          "(removed)"))
            continue
        if "[" in field_name:  # one item of a keyed list: "disks[sda]"
            list_name, item_key = field_name[:-1].split("[", 1)
            key = LIST_KEYS[(resource.kind.name, list_name)][0]
            running_item = _keyed(live.running_values.get(list_name), key, item_key)
            desired_item = _keyed(resource.desired.get(list_name), key, item_key)
            result.append(_field(resource.kind.spec(list_name), field_name, running_item, desired_item, Effect.RESTART))
            continue
        spec = resource.kind.spec(field_name)
        before = live.running_values.get(field_name) if field_name != "xml" else None
        result.append(_field(spec, field_name, before, resource.desired.get(field_name), Effect.RESTART))
    return result


def _keyed(items: list[Any] | None, key: str, item_key: str) -> Any:
    return next((item for item in items or [] if str(item.get(key)) == item_key), None)


def make_plan(manifests: Manifests, graph: nx.DiGraph, live: LiveState, order: list[str],
              options: PlanOptions | set[str] | None = None) -> Plan:
    if options is None or isinstance(options, set):
        options = PlanOptions(targets=frozenset(options or ()))
    owned = live.owned()
    errors: list[PlanError] = []
    changes: dict[str, Change] = {}
    notes: list[str] = []
    replaced: set[str] = set()
    unread: dict[str, str] = {}  # volume address -> its stopped pool's address (see _in_stopped_pool)

    for address in order:
        resource = manifests.resources[address]
        kind = resource.kind.name
        current = owned.get(address)
        if current is not None and current.kind != kind:
            current = None
        if resource.values.get("existing"):
            # Only used: it must be there, and it is never created, changed or deleted.
            pool = resource.desired.get("pool") if kind == "volume" else None
            if live.by_name(kind, resource.libvirt_name, pool) is None:
                where = f" in pool '{pool}'" if pool else ""
                errors.append(PlanError(f"{kind} '{resource.libvirt_name}'{where} (existing: true) does not exist on "
                                        f"{live.uri}", resource.key_position()))
            continue
        if current is None and _in_stopped_pool(address, live, owned) is not None:
            unread[address] = _in_stopped_pool(address, live, owned) or ""
            notes.append(f"{address}: its pool {unread[address]} is stopped, so the volume cannot be read; apply starts "
                         "the pool, and the next plan compares the volume")
            continue
        if current is None:
            pool = resource.desired.get("pool") if kind in ("volume", "cloudinit") else None
            same_name = live.by_name(kind, resource.libvirt_name, pool)
            if kind == "cloudinit" and same_name is None:
                same_name = live.by_name("volume", seed_volume_name(resource.libvirt_name), pool)
            if same_name is not None:
                errors.append(_collision(resource, same_name))
                continue
            changes[address] = Change(address, kind, resource.libvirt_name, Action.CREATE, after=resource.desired)
            continue
        created = resource
        if resource.kind.settle is not None:  # an existing object keeps the pinned defaults it was created with
            resource = replace(resource, desired=resource.kind.settle(resource, current))
        try:
            field_changes, forcing, pending = compare(resource, current)
        except PlanError as exc:
            errors.append(exc)
            continue
        renamed = current.name != resource.libvirt_name
        if renamed:
            forcing.append("name")
            field_changes.append(_field(None, "name", current.name, resource.libvirt_name, Effect.REPLACE))
        # A volume (or seed) is rebuilt when what it stands on is: its pool, or its backing image.
        if kind in ("volume", "cloudinit"):
            pool_address = _address_of(manifests, "pool", resource.values["pool"], resource)
            backing_address = _address_of(manifests, "volume", resource.values.get("backing"), resource)
            if pool_address in replaced:
                forcing.append(f"its pool {pool_address} is replaced")
            if backing_address in replaced:
                forcing.append(f"its backing volume {backing_address} is replaced")
        if kind == "domain":
            for disk, desired_disk in zip(resource.values.get("disks") or [], resource.desired.get("disks") or [], strict=False):
                used = _address_of(manifests, "volume", disk.get("volume"), resource) if isinstance(disk, dict) else None
                if used in replaced and current.active:
                    field_changes.append(_field(None, f"disks[{desired_disk.get('target')}]", desired_disk, desired_disk,
                                                Effect.RESTART))
                    notes.append(f"{address}: {used} is replaced; the running guest keeps the old image until it restarts")
            seed = resource.values.get("cloudinit")
            seed_resource = manifests.resolve("cloudinit", seed, resource.module) if seed else None
            if seed_resource is not None and seed_resource.address in replaced and current.active:
                seed_volume = seed_volume_name(seed_resource.libvirt_name)
                seed_disk = next((d for d in resource.desired.get("disks") or [] if d.get("volume") == seed_volume), None)
                if seed_disk is not None:
                    # Same volume name, new file: the running QEMU still holds the old one open. A live medium
                    # change (eject, insert) puts the new seed in the drive, so the guest's next boot reads it.
                    field_changes.append(FieldChange(f"disks[{seed_disk['target']}]", seed_disk, seed_disk, Effect.LIVE,
                                                     f"{seed_volume} (the old seed)", f"{seed_volume} (the new seed)"))
                notes.append(f"{address}: the new seed of {seed_resource.address} goes into the running guest's cdrom drive "
                             "now; cloud-init applies it at the guest's next boot (new instance-id)")
        if forcing:
            replaced.add(address)
        restart = False
        replug: tuple[str, ...] = ()
        wants_running = resource.desired.get("state", "running") == "running"
        restart_fields = [f for f in field_changes if f.effect is Effect.RESTART]
        for lag in [p for p in pending if p.startswith("memory (")]:
            notes.append(f"{address}: {lag[len('memory ('):-1]}; the guest has not ballooned to it "
                         "(no balloon driver, or not yet)")
        pending = [p for p in pending if not p.startswith("memory (")]
        if current.active and not forcing and kind in ("domain", "network") and (restart_fields or pending):
            if resource.restart_allowed(options.restart) and (kind == "network" or wants_running):
                restart = True
                field_changes.extend(_pending_changes(resource, current, pending))
                if kind == "network":
                    replug = _using_network(live, current.name)
            elif pending:
                what = "restarts" if kind == "domain" else "is restarted (its guests' interfaces are re-plugged)"
                notes.append(f"{address}: {', '.join(pending)} configured; takes effect when it {what} "
                             f"(apply --restart or restart_policy: allowed)")
        if not field_changes and kind == "volume" and backing_address in replaced:
            # Its backing volume gets a new file: this overlay is made again on it (never left on the old one).
            field_changes.append(_rebuilt_on_new_backing(resource, current, backing_address))
        if not field_changes:
            continue
        if kind == "network" and not current.active and not forcing:
            replug = _using_network(live, current.name)  # stopped outside vmform: their taps hang loose
        action = Action.DELETE_THEN_CREATE if forcing else Action.UPDATE
        if forcing and resource.lifecycle.get("create_before_destroy"):
            moved = renamed or (kind == "volume" and current.identity.get("pool") != resource.desired.get("pool"))
            if not moved:
                errors.append(PlanError(
                    f"{address}: create_before_destroy needs the replacement to differ in name (or pool) from the "
                    f"object it replaces; libvirt cannot hold two '{resource.libvirt_name}' at once",
                    resource.position("lifecycle", "create_before_destroy")))
                continue
            action = Action.CREATE_THEN_DELETE
        reason = f"{', '.join(forcing)} cannot change in place" if forcing else ""
        if forcing and all(f.startswith("its ") for f in forcing):
            reason = "; ".join(forcing)
        if kind == "cloudinit" and forcing:
            reason = (f"{', '.join(forcing)} changed: a new seed, which takes effect on the guest's next boot "
                      f"(new instance-id {resource.desired['meta_data'].get('instance-id')})")
        changes[address] = Change(  # a replacement is a new object: it gets this vmform's defaults
            address, kind, resource.libvirt_name, action, before=current.values,
            after=created.desired if forcing else resource.desired,
            fields=tuple(field_changes), reason=reason, live_name=current.name if renamed else None,
            identity=current.identity, restart=restart, replug=replug,
            restart_allowed=kind == "domain" and current.active and wants_running and not forcing
            and resource.restart_allowed(options.restart),
        )

    for address, obj in owned.items():
        if address not in manifests.resources or manifests.resources[address].kind.name != obj.kind:
            changes[address] = Change(address, obj.kind, obj.name, Action.DELETE, before=obj.values, identity=obj.identity)

    # What the host says about the volumes this plan deletes or replaces: anything still using them?
    uses = _plan_volume_uses(manifests, live, changes)
    notes.extend(uses.notes)
    errors.extend(uses.errors)

    allowed: dict[str, tuple[str, ...]] = {}
    for address in order:
        names = manifests.resources[address].values.get("allow") or []
        if names and (address in changes or not options.targets):
            allowed[address] = tuple(names)
    errors.extend(_refusals(manifests, changes, options, uses.grouped))
    if errors:
        raise PlanErrors(errors)

    # Apply order: creates/updates wait for what they reference; deletes wait for what used them.
    owned_index: dict[tuple[str, str], str] = {}
    for address, obj in owned.items():
        key = f"{obj.identity['pool']}/{obj.name}" if obj.kind == "volume" else obj.name
        owned_index[(obj.kind, key)] = address
        if obj.kind == "cloudinit":  # domains use a seed as the volume it is
            owned_index[("volume", f"{obj.identity['pool']}/{obj.identity['volume']}")] = address
    dependents: dict[str, set[str]] = {address: set() for address in changes}
    for address, change in changes.items():
        if change.action is not Action.DELETE and address in graph:
            for dependency in graph.predecessors(address):
                if dependency in changes:
                    dependents[address].add(dependency)
                elif unread.get(dependency) in changes:  # a volume in a stopped pool: wait for the pool's start
                    dependents[address].add(unread[dependency])
    for address, obj in owned.items():
        if address not in changes:
            continue
        for used in _live_dependencies(obj, owned_index):
            # Deleting an object waits for the changes of whatever uses it (a domain detaching a disk, ...).
            if used in changes and used != address and changes[used].action is Action.DELETE:
                dependents[used].add(address)
    for address, waits in uses.waits_for.items():  # a delete waits for the changes that end its uses
        dependents[address].update(w for w in waits if w in changes and w != address)
    ordered = _order(changes, dependents, order)
    final = tuple(
        Change(**{**change.__dict__, "depends_on": tuple(sorted(dependents[change.address]))}) for change in ordered
    )
    if options.targets:
        final = _limit_to_targets(final, set(options.targets))
    return Plan(manifests.project, live.uri, final, tuple(notes), allowed=allowed, waiting=uses.waiting)


def _in_stopped_pool(address: str, live: LiveState, owned: dict[str, LiveObject]) -> str | None:
    """The address of the owned pool, stopped outside vmform, that holds this owned volume (or seed): libvirt
    lists no volumes of a stopped pool, and planning a create for a volume that is there would fail."""
    entry = live.ledger.volumes.get(address)
    if entry is None:
        return None
    for pool_address, pool in owned.items():
        if pool.kind == "pool" and pool.name == entry.get("pool") and not pool.active:
            return pool_address
    return None


def _refusals(manifests: Manifests, changes: dict[str, Change], options: PlanOptions,
              grouped: set[str] | frozenset[str] = frozenset()) -> list[PlanError]:
    """Changes the manifests forbid: destroying protected resources, replacing volumes that hold data
    (``grouped``: overlays whose refusal their base's replacement already gave, in one line)."""
    errors = []
    for address, change in changes.items():
        resource = manifests.resources.get(address)
        destroys = change.action is Action.DELETE or change.action.is_replace()
        protected = address in options.protected or (resource is not None and resource.lifecycle.get("prevent_destroy"))
        if destroys and protected:
            what = "destroy" if change.action is Action.DELETE else f"replace ({change.reason})"
            position = (resource.position("lifecycle", "prevent_destroy") if resource is not None
                        else (options.protected_at or {}).get(address))
            errors.append(PlanError(f"{address} has lifecycle.prevent_destroy set, and this plan would {what} it", position))
            continue
        if change.kind == "volume" and change.action.is_replace() and resource is not None:
            holds_data = not resource.values.get("source") or _attached(manifests, resource)
            if any(f.path == "source" and f.before == INCOMPLETE_UPLOAD for f in change.fields):
                holds_data = False  # its upload was cut off: it never held more than part of its image
            if holds_data and not resource.lifecycle.get("allow_data_loss") and address not in grouped:
                errors.append(PlanError(
                    f"{address} must be replaced ({change.reason}), which discards the data it holds; "
                    f"set lifecycle.allow_data_loss: true on it to allow that", resource.key_position()))
    return errors


def _attached(manifests: Manifests, volume: Resource) -> bool:
    for domain in manifests.of_kind("domain"):
        for disk in domain.values.get("disks") or []:
            if isinstance(disk, dict) and disk.get("volume") and \
                    manifests.resolve("volume", disk["volume"], domain.module) is volume:
                return True
    return False


def _address_of(manifests: Manifests, kind: str, name: str | None, user: Resource) -> str | None:
    """The address of the resource ``user`` names (None: it names none, or one not declared)."""
    found = manifests.resolve(kind, name, user.module) if name else None
    return found.address if found is not None else None


def _order(changes: dict[str, Change], dependents: dict[str, set[str]], order: list[str]) -> list[Change]:
    """A stable order for printing: topological by the apply dependencies, manifest order otherwise."""
    import networkx as nx

    graph = nx.DiGraph()
    rank = {address: index for index, address in enumerate(order)}
    for address in changes:
        graph.add_node(address)
    for address, deps in dependents.items():
        for dep in deps:
            graph.add_edge(dep, address)
    kinds = list(KINDS)

    def sort_key(address: str) -> tuple[int, int, str]:
        change = changes[address]
        return (1 if change.action is Action.DELETE else 0, rank.get(address, len(rank) + kinds.index(change.kind)), address)

    return [changes[a] for a in nx.lexicographical_topological_sort(graph, key=sort_key)]


def _limit_to_targets(changes: tuple[Change, ...], targets: set[str]) -> tuple[Change, ...]:
    by_address = {c.address: c for c in changes}
    keep: set[str] = set()
    stack = [t for t in targets if t in by_address]
    while stack:
        address = stack.pop()
        if address in keep:
            continue
        keep.add(address)
        stack.extend(d for d in by_address[address].depends_on if d in by_address)
    return tuple(c for c in changes if c.address in keep)


# --- host-aware destruction: what uses a volume the plan deletes or replaces ------------------------------


@dataclass
class _VolumeUsePlan:
    """What the uses found on the host do to a plan's volume deletes and replaces."""

    waiting: dict[str, str]  # address -> why its delete is not in this plan
    waits_for: dict[str, set[str]]  # address -> the changes it must wait for (they remove the use)
    notes: list[str]
    errors: list[PlanError]
    grouped: set[str]  # overlays whose data-loss refusal is said once, in their base's error


def _volume_key(change: Change) -> tuple[str, str, str]:
    """(path, pool, libvirt name) of the volume file a change deletes (a seed: its .iso volume)."""
    identity = change.identity
    name = str(identity.get("volume") or change.live_name or change.name)
    return str(identity.get("path") or ""), str(identity.get("pool") or ""), name


def _holder_address(use: VolumeUse, live: LiveState, project: str, domains: dict[str, str]) -> str | None:
    """The address of this project's object that holds the use, None when the holder is not the project's."""
    if use.holder_kind == "domain":
        if use.owner is not None:
            return use.owner[1] if use.owner[0] == project else None
        return domains.get(use.uuid)
    return live.ledger.volume_address(use.pool, use.holder)


def _who(use: VolumeUse, holder: str | None) -> str:
    """The holder as the plan names it: its address when the project's, else its libvirt name and owner."""
    if holder is not None:
        return holder
    if use.holder_kind == "volume":
        return f"volume '{use.holder}' in pool '{use.pool}' (not managed by this project)"
    owner = f"vmform project '{use.owner[0]}'" if use.owner is not None else "not managed by this project"
    return f"domain '{use.holder}' ({owner})"


def describe_use(use: VolumeUse, holder: str | None) -> tuple[str, str]:
    """(what the use is, when the delete can happen), for the plan's notes and apply's summary."""
    who = _who(use, holder)
    if use.holder_kind == "volume":
        return f"the backing file of {who}", "it is deleted after that volume is"
    shared = ", shareable" if use.shareable else ""
    if use.running:
        return (f"still attached to running {who} ({use.target}{shared})",
                "it is deleted after the disk leaves the guest")
    return (f"still a disk ({use.target}{shared}) in the definition of {who}",
            "it is deleted once no domain uses it")


def _use_removed(use: VolumeUse, remover: Change | None, path: str, pool: str, name: str) -> bool:
    """Whether this planned change of the holder ends the use (deletes the holder, or takes the disk out of
    its definition and, for a running domain, out of the guest: live, by a restart, or by stopping it)."""
    if remover is None:
        return False
    if remover.action is Action.DELETE or remover.action.is_replace():
        return True
    if use.holder_kind != "domain" or remover.action is not Action.UPDATE:
        return False
    disk = next((f for f in remover.fields if f.path == f"disks[{use.target}]"), None)
    stops = any(f.path == "state" and f.after == "stopped" for f in remover.fields)
    if disk is None:
        return stops and not use.defined
    after = disk.after
    stays = after is not None and (after.get("path") == path or (after.get("pool"), after.get("volume")) == (pool, name))
    if stays:
        return False
    return not use.running or disk.effect is Effect.LIVE or remover.restart or stops


def _plan_volume_uses(manifests: Manifests, live: LiveState, changes: dict[str, Change]) -> _VolumeUsePlan:
    """Volumes are never deleted while anything on the host uses them, and a base image is never replaced
    under its overlays. Reads the host's uses (every domain, every pool) only when the plan deletes or
    replaces a volume. Changes ``changes`` in place: a delete that must wait leaves the plan (a note and
    ``waiting`` say why), and a delete or replace records in its identity what apply must check again
    (``held_by``) and which overlays it replaces first (``overlays``)."""
    found = _VolumeUsePlan({}, {}, [], [], set())
    deleting = [a for a, c in changes.items()
                if (c.kind in ("volume", "cloudinit") and c.action is Action.DELETE)
                or (c.kind == "volume" and c.action.is_replace())]
    if not deleting:
        return found
    uses = live.volume_uses()
    domains = {str(o.identity.get("uuid")): str(o.address) for o in live.objects if o.kind == "domain" and o.address}

    def uses_of(address: str) -> list[tuple[VolumeUse, str | None]]:
        path, pool, name = _volume_key(changes[address])
        return [(use, _holder_address(use, live, manifests.project, domains)) for use in uses.of(path, pool, name)
                if not (use.holder_kind == "volume" and (use.pool, use.holder) == (pool, name))]

    # Deletes: one that a use outlives waits (leaves the plan); that may keep what it stands on (an overlay
    # that waits keeps its base; a volume that waits keeps its pool), so until nothing more changes.
    kept_pools: dict[str, str] = {}
    settled = False
    while not settled:
        settled = True
        for address in [a for a in deleting if a in changes and changes[a].action is Action.DELETE]:
            path, pool, name = _volume_key(changes[address])
            staying = [(use, holder) for use, holder in uses_of(address)
                       if not _use_removed(use, changes.get(holder) if holder else None, path, pool, name)]
            if not staying:
                continue
            what, when = describe_use(*staying[0])
            more = "".join(f", and {describe_use(*other)[0]}" for other in staying[1:])
            found.waiting[address] = f"{what}{more}; {when}"
            found.notes.append(f"{address} is {what}{more}; {when}")
            kept_pools.setdefault(pool, address)
            del changes[address]
            settled = False
    for address, change in list(changes.items()):
        held = kept_pools.get(change.live_name or change.name)
        if change.kind == "pool" and change.action is Action.DELETE and held is not None:
            found.waiting[address] = f"it holds {held}, which is kept"
            found.notes.append(f"{address} is kept: it holds {held}, which is still in use")
            del changes[address]

    for address in [a for a in deleting if a in changes]:
        change = changes[address]
        path, pool, name = _volume_key(change)
        held_by: list[list[str]] = []
        overlays: list[dict[str, str]] = []
        waits: set[str] = set()
        for use, holder in uses_of(address):
            remover = changes.get(holder) if holder else None
            held_by.append(list(use.holder_key()))
            if change.action is Action.DELETE:
                assert holder is not None and remover is not None  # a use no planned change ends made it wait
                waits.add(holder)
                if use.holder_kind == "domain" and use.running and remover.action is Action.UPDATE:
                    what, when = describe_use(use, holder)
                    found.notes.append(f"{address} is {what}; {when} (apply checks the host again right before "
                                       "deleting it)")
                continue
            found.errors.extend(_replace_refusal(manifests, change, use, holder, remover, overlays, waits))
        found.waits_for[address] = waits
        if held_by or overlays:
            changes[address] = replace(change, identity={**change.identity, "held_by": held_by, "overlays": overlays})
        if overlays:
            found.errors.extend(_overlay_data_loss(manifests, change, overlays, found.grouped))
    return found


def _replace_refusal(manifests: Manifests, change: Change, use: VolumeUse, holder: str | None,
                     remover: Change | None, overlays: list[dict[str, str]], waits: set[str]) -> list[PlanError]:
    """A replace of a volume something uses: the project's own domains follow the plan (it says what happens
    to the running guest); overlays of the project are replaced with it (first deleted, then made again on
    the new file) or deleted before it; anything else that uses it makes the replace an error."""
    resource = manifests.resources.get(change.address)
    position = resource.key_position() if resource is not None else None
    who = _who(use, holder)
    if use.holder_kind == "domain":
        if holder is not None:
            return []
        return [PlanError(f"{change.address} must be replaced ({change.reason}), but {who} uses it as its disk "
                          f"{use.target}; vmform never replaces a disk under a domain it does not manage (detach it "
                          "there first)", position)]
    if holder is None:
        return [PlanError(f"{change.address} must be replaced ({change.reason}), but {who} backs onto it: a new "
                          "file under it would corrupt that volume; vmform refuses to replace it", position)]
    if remover is not None and remover.action is Action.DELETE:
        waits.add(holder)
        return []
    if remover is not None and remover.action.is_replace():
        overlays.append({"address": holder, "pool": use.pool, "name": use.holder})
        return []
    return [PlanError(f"{change.address} must be replaced ({change.reason}), but {holder} backs onto it and is not "
                      "replaced with it; a new file under it would corrupt it", position)]


def _overlay_data_loss(manifests: Manifests, base: Change, overlays: list[dict[str, str]],
                       grouped: set[str]) -> list[PlanError]:
    """One error for every overlay a base's replacement discards without allow_data_loss (at the base)."""
    refused = []
    for overlay in overlays:
        resource = manifests.resources.get(overlay["address"])
        if resource is not None and not resource.lifecycle.get("allow_data_loss"):
            refused.append(overlay["address"])
    grouped.update(refused)
    if not refused:
        return []
    resource = manifests.resources.get(base.address)
    return [PlanError(
        f"{base.address} must be replaced ({base.reason}), and the {len(overlays)} volumes backing onto it are "
        f"replaced with it, which discards the data they hold: {', '.join(sorted(refused))}; set "
        "lifecycle.allow_data_loss: true on each of them to allow that",
        resource.key_position() if resource is not None else None)]


def _rebuilt_on_new_backing(resource: Resource, live: LiveObject, backing_address: str) -> FieldChange:
    """The field change of an overlay replaced only because its backing volume is: same backing, new file."""
    backing = live.values.get("backing")
    return FieldChange("backing", backing, resource.desired.get("backing"), Effect.REPLACE,
                       f"{backing_address} (the file being replaced)", f"{backing_address} (its new file)")
