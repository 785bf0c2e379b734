"""Reading the host in bulk: one listAll* call per kind, one XML fetch per object, mapped into the same
field values the manifests bind to, so desired and live compare field by field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from vmform.connection import libvirt_message
from vmform.errors import HostError
from vmform.lastapplied import AppliedRecord, read_record
from vmform.model import local_address
from vmform.ownership import BALLOON_NAMESPACE, INCOMPLETE_UPLOAD, Ledger, read_owner
from vmform.schema.registry import KINDS
from vmform.schema.xmlbind import Element

if TYPE_CHECKING:
    import libvirt

# XML from libvirt is data, never a place to resolve entities or fetch DTDs from.
SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, remove_blank_text=True)


def parse_xml(text: str) -> Element:
    return etree.fromstring(text.encode(), SAFE_PARSER)


@dataclass
class LiveObject:
    kind: str
    name: str
    values: dict[str, Any]  # config (persistent) values, same keys and terms as Resource.desired
    identity: dict[str, Any]  # uuid (domains, networks, pools), pool+path (volumes)
    address: str | None = None  # set when this project owns it
    owner_project: str | None = None  # another project that owns it (domains, networks)
    active: bool = False
    running_values: dict[str, Any] = field(default_factory=dict)  # live-effect fields of a running domain
    # The parsed documents, for the xml: section's comparison (read only when a manifest states one).
    config_root: Element | None = field(default=None, repr=False, compare=False)
    running_root: Element | None = field(default=None, repr=False, compare=False)
    # What vmform stated when it last wrote the object (lastapplied.AppliedRecord); None: nothing recorded.
    applied: Any = field(default=None, repr=False, compare=False)


@dataclass
class LiveState:
    uri: str
    objects: list[LiveObject]
    ledger: Ledger

    def owned(self) -> dict[str, LiveObject]:
        return {obj.address: obj for obj in self.objects if obj.address is not None}

    def by_name(self, kind: str, name: str, pool: str | None = None) -> LiveObject | None:
        for obj in self.objects:
            if obj.kind == kind and obj.name == name and (pool is None or obj.identity.get("pool") == pool):
                return obj
        return None


def _read_bound(kind: str, root: Element) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for spec in KINDS[kind].fields:
        if spec.binding is not None and spec.compare:
            values[spec.name] = spec.binding.read(root)
    return values


def domain_object(name: str, uuid: str, config: Element, running_root: Element | None, state: str,
                  autostart: bool, project: str) -> LiveObject:
    """A domain's LiveObject from its persistent XML and, when it runs, its live XML."""
    values = _read_bound("domain", config)
    values["description"] = values.get("description") or ""
    values["state"] = state
    values["autostart"] = autostart
    running: dict[str, Any] = {}
    if running_root is not None:
        running = _read_bound("domain", running_root)
        running["description"] = running.get("description") or ""
        balloon = running_root.find(f"metadata/{{{BALLOON_NAMESPACE}}}balloon")
        if balloon is not None:
            try:
                running["balloon"] = {"target": int(balloon.get("target")), "actual": int(balloon.get("actual"))}
            except (TypeError, ValueError):
                pass
    obj = LiveObject("domain", name, values, {"uuid": uuid}, active=running_root is not None, running_values=running,
                     config_root=config, running_root=running_root, applied=read_record(config))
    _set_owner(obj, read_owner(config), project)
    return obj


def _state_name(state: int) -> str:
    """vmform's name for a libvirt domain state; "stopped" for the states in which nothing runs."""
    import libvirt

    if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_NOSTATE):
        return "stopped"
    return {libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}.get(state, "running")


@dataclass
class DomainFacts:
    """State and autostart of every domain, from a few listAllDomains calls with filters instead of three
    calls per domain (state, isPersistent, autostart): at 500 domains that is 4 round trips, not 1500."""

    states: dict[str, int]  # UUID -> libvirt state, for domains that are running, paused or shut off
    autostart: set[str]  # UUIDs (only persistent domains can autostart)

    @classmethod
    def read(cls, conn: libvirt.virConnect) -> DomainFacts:
        import libvirt

        states: dict[str, int] = {}
        for flag, state in ((libvirt.VIR_CONNECT_LIST_DOMAINS_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF),
                            (libvirt.VIR_CONNECT_LIST_DOMAINS_PAUSED, libvirt.VIR_DOMAIN_PAUSED),
                            (libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING, libvirt.VIR_DOMAIN_RUNNING)):
            for dom in conn.listAllDomains(flag):
                states[dom.UUIDString()] = state
        autostart = {dom.UUIDString() for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)}
        return cls(states, autostart)


def read_domain(dom: libvirt.virDomain, project: str, facts: DomainFacts | None = None) -> LiveObject:
    import libvirt

    uuid = dom.UUIDString()
    config = parse_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    known = facts.states.get(uuid) if facts is not None else None
    # Any other state (blocked, being shut down, crashed, pmsuspended) and domains that changed state while
    # the lists were read: ask the domain itself.
    state = known if known is not None else dom.state()[0]
    state_name = _state_name(state)
    active = state_name != "stopped"
    if facts is not None:
        autostart = uuid in facts.autostart
    else:
        autostart = bool(dom.autostart()) if dom.isPersistent() else False
    running_root = parse_xml(dom.XMLDesc(0)) if active else None
    return domain_object(dom.name(), uuid, config, running_root, state_name, autostart, project)


def read_network(net: libvirt.virNetwork, project: str) -> LiveObject:
    import libvirt

    config = parse_xml(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE))
    values = _read_bound("network", config)
    values["autostart"] = bool(net.autostart())
    active = bool(net.isActive())
    running_root = parse_xml(net.XMLDesc(0)) if active else None
    running = _read_bound("network", running_root) if running_root is not None else {}
    obj = LiveObject("network", net.name(), values, {"uuid": net.UUIDString()}, active=active, running_values=running,
                     config_root=config, running_root=running_root, applied=read_record(config))
    _set_owner(obj, read_owner(config), project)
    return obj


def _set_owner(obj: LiveObject, owner: tuple[str, str] | None, project: str) -> None:
    if owner is None:
        return
    if owner[0] == project:
        obj.address = owner[1]
    else:
        obj.owner_project = owner[0]


def read_pool(pool: libvirt.virStoragePool, ledger: Ledger) -> LiveObject:
    import libvirt

    config = parse_xml(pool.XMLDesc(libvirt.VIR_STORAGE_XML_INACTIVE))
    values = _read_bound("pool", config)
    values["autostart"] = bool(pool.autostart())
    uuid = pool.UUIDString()
    obj = LiveObject("pool", pool.name(), values, {"uuid": uuid}, active=bool(pool.isActive()), config_root=config)
    obj.address = ledger.pool_address(pool.name(), uuid)
    if obj.address is not None:
        obj.applied = AppliedRecord.from_entry(ledger.pools[obj.address].get("applied"))
    return obj


def _volume_index(ledger: Ledger) -> dict[tuple[str, str], str]:
    """(pool, name) -> address, as Ledger.volume_address answers it (the first entry wins), built once per
    read instead of scanning the ledger for every volume (quadratic at hundreds of volumes)."""
    index: dict[tuple[str, str], str] = {}
    for address, entry in ledger.volumes.items():
        index.setdefault((entry.get("pool"), entry.get("name")), address)  # type: ignore[arg-type]
    return index


def read_volumes(pool: libvirt.virStoragePool, ledger: Ledger,
                 index: dict[tuple[str, str], str] | None = None) -> list[LiveObject]:
    result = []
    pool_name = pool.name()
    if index is None:
        index = _volume_index(ledger)
    for vol in pool.listAllVolumes():
        root = parse_xml(vol.XMLDesc(0))
        values = _read_bound("volume", root)
        values["pool"] = pool_name
        backing = root.find("backingStore/path")
        path_node = root.find("target/path")
        obj = LiveObject(
            "volume",
            vol.name(),
            values,
            {"pool": pool_name, "path": path_node.text if path_node is not None else vol.path()},
            active=True,
        )
        obj.values["backing_path"] = backing.text if backing is not None else None
        backing_format = root.find("backingStore/format")
        obj.values["backing_format"] = backing_format.get("type") if backing_format is not None else None
        obj.address = index.get((pool_name, obj.name))
        if obj.address is not None and local_address(obj.address).startswith("cloudinit."):
            result.append(seed_object(obj, ledger.volumes[obj.address]))
            continue
        if obj.address is not None:
            entry = ledger.volumes[obj.address]
            digest = entry.get("source_sha256")
            if digest:
                obj.values["source_sha256"] = INCOMPLETE_UPLOAD if entry.get("incomplete") else digest
        result.append(obj)
    return result


def seed_object(volume: LiveObject, entry: dict[str, Any]) -> LiveObject:
    """A cloud-init seed's volume as its seed: what it holds comes from the ledger (user-data as a digest)."""
    seed = entry.get("seed") or {}
    values = {
        "pool": volume.values["pool"],
        "user_data": INCOMPLETE_UPLOAD if entry.get("incomplete") else seed.get("user_data"),
        "meta_data": seed.get("meta_data"),
        "network_config": seed.get("network_config"),
    }
    name = volume.name[: -len(".iso")] if volume.name.endswith(".iso") else volume.name
    identity = {**volume.identity, "volume": volume.name}
    return LiveObject("cloudinit", name, values, identity, address=volume.address, active=True)


def read_host(conn: libvirt.virConnect, project: str, pool_names: set[str] | None = None,
              only: dict[str, set[str]] | None = None) -> LiveState:
    """Everything vmform compares, in one pass. Volumes are read only in the pools named (plus owned ones).
    ``only`` (kind -> libvirt names) limits the domains and networks read to those names, for apply's
    read-back of what it touched; pools and volumes are always read whole (a volume's backing resolves
    against every volume)."""
    import libvirt

    def skipped(kind: str, name: str) -> bool:
        return only is not None and name not in only.get(kind, set())

    try:
        ledger = Ledger.load(conn, project)
        objects: list[LiveObject] = []
        facts = DomainFacts.read(conn)
        for dom in conn.listAllDomains():
            if skipped("domain", dom.name()):
                continue
            try:
                objects.append(read_domain(dom, project, facts))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # vanished while we read
                    raise
        for net in conn.listAllNetworks():
            if skipped("network", net.name()):
                continue
            try:
                objects.append(read_network(net, project))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                    raise
        owned_pools = {entry["name"] for entry in ledger.pools.values()} | {e["pool"] for e in ledger.volumes.values()}
        wanted = (pool_names or set()) | owned_pools
        index = _volume_index(ledger)
        for pool in conn.listAllStoragePools():
            try:
                obj = read_pool(pool, ledger)
                volumes = read_volumes(pool, ledger, index) if obj.active and obj.name in wanted else []
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL):
                    raise
                continue  # vanished while we read (another client deleted it)
            objects.append(obj)
            objects.extend(volumes)
        _resolve_backing(objects)
        return LiveState(conn.getURI(), objects, ledger)
    except libvirt.libvirtError as exc:
        raise HostError(f"cannot read the host's state: {libvirt_message(exc)}") from None


def _resolve_backing(objects: list[LiveObject]) -> None:
    """Volumes name their backing file by path; map it to (pool, volume) like the manifests do."""
    by_path = {obj.identity["path"]: obj for obj in objects if obj.kind == "volume"}
    for obj in objects:
        if obj.kind != "volume":
            continue
        path = obj.values.pop("backing_path", None)
        backing_format = obj.values.pop("backing_format", None)
        if path is None:
            obj.values["backing"] = None
            continue
        base = by_path.get(path)
        if base is not None:
            obj.values["backing"] = {"pool": base.identity["pool"], "volume": base.name, "format": backing_format}
        else:
            obj.values["backing"] = {"path": path, "format": backing_format}
