"""Reading the host in bulk: one listAll* call per kind, one XML fetch per object, mapped into the same
field values the manifests bind to, so desired and live compare field by field."""

from __future__ import annotations

from collections.abc import Callable
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
    # False for a domain or network that only runs: undefined outside vmform while it ran (transient).
    persistent: bool = True
    # Devices that repeat the key of another (a second interface with a managed MAC, attached outside vmform):
    # left out of values/running_values, so the device vmform manages is the one compared (see duplicate_devices).
    duplicates: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class LiveState:
    uri: str
    objects: list[LiveObject]
    ledger: Ledger
    # Who uses the volumes' files (any domain's disks, any pool's overlays): read from the host only when a
    # plan deletes or replaces a volume (read_uses). None: taken from the objects above (not read from a host).
    uses_reader: Callable[[], HostUses] | None = field(default=None, repr=False, compare=False)
    _uses: HostUses | None = field(default=None, repr=False, compare=False)

    def volume_uses(self) -> HostUses:
        """Every use of a volume's file on the host, read once, when first asked for."""
        if self._uses is None:
            self._uses = self.uses_reader() if self.uses_reader is not None else uses_from_objects(self.objects)
        return self._uses

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


# Live-only record of the devices vmform asked a running guest to release (a hot-unplug it has not completed):
# the device leaves the running domain when it restarts, and the next plan says so instead of detaching again.
UNPLUG_NAMESPACE = "https://vmform.dev/xmlns/unplug/1"
UNPLUG_KEY = "vmfunplug"
# The keyed device lists of a domain: how their elements are found and what their key is.
DEVICE_LISTS = {
    "disks": ("devices/disk[@device='disk']|devices/disk[@device='cdrom']", "target", "dev"),
    "interfaces": ("devices/interface", "mac", "address"),
}


def device_key(field_name: str, node: Element) -> str | None:
    child = node.find(DEVICE_LISTS[field_name][1])
    return child.get(DEVICE_LISTS[field_name][2]) if child is not None else None


def device_address(node: Element) -> str:
    """Where a device sits in the guest (``pci:0000:00:08.0``): what tells two devices with one key apart, in
    the persistent and the running definition alike (libvirt keeps the address from one to the other)."""
    address = node.find("address")
    if address is None:
        return ""
    if address.get("type") == "pci":
        numbers = [int(address.get(part) or "0", 16) for part in ("domain", "bus", "slot", "function")]
        return "pci:{:04x}:{:02x}:{:02x}.{:x}".format(*numbers)
    return ":".join([address.get("type") or "", *(f"{k}={v}" for k, v in sorted(address.attrib.items()) if k != "type")])


def device_nodes(root: Element, field_name: str) -> list[Element]:
    return list(root.xpath(DEVICE_LISTS[field_name][0]))


def _split_duplicates(values: dict[str, Any], root: Element, partner: Element | None, where: str) -> list[dict[str, Any]]:
    """Take the devices out of ``values`` that repeat another's key (libvirt refuses two disks with one target,
    but not two interfaces with one MAC). The one kept is the one the other definition (``partner``: running
    for the persistent one, and back) has at the same address, else the first: an attach outside vmform
    appends. Returns the others, each with where it is and its address, for the plan to remove."""
    extra: list[dict[str, Any]] = []
    for field_name in DEVICE_LISTS:
        items = values.get(field_name)
        nodes = device_nodes(root, field_name)
        if not items or len(items) != len(nodes):
            continue
        keys = [device_key(field_name, node) for node in nodes]
        repeated = {key for key in keys if key is not None and keys.count(key) > 1}
        if not repeated:
            continue
        keep: dict[str, int] = {}
        for key in repeated:
            indexes = [i for i, k in enumerate(keys) if k == key]
            partner_addresses = {device_address(n) for n in device_nodes(partner, field_name)
                                 if device_key(field_name, n) == key} if partner is not None else set()
            matched = [i for i in indexes if device_address(nodes[i]) in partner_addresses]
            keep[key] = matched[0] if matched else indexes[0]
        kept = []
        for index, (item_key, item) in enumerate(zip(keys, items, strict=True)):
            if item_key is not None and item_key in repeated and keep[item_key] != index:
                extra.append({"field": field_name, "key": item_key, "address": device_address(nodes[index]),
                              "where": where, "item": item})
            else:
                kept.append(item)
        values[field_name] = kept
    return extra


def _unplugging(running_root: Element) -> list[dict[str, str]]:
    """The devices vmform asked the guest to release that the running domain still has (same key, same address)."""
    record = running_root.find(f"metadata/{{{UNPLUG_NAMESPACE}}}unplug")
    if record is None:
        return []
    found = []
    # libvirt puts the record's children in its namespace (<vmfunplug:device>) when it stores the metadata.
    for entry in [*record.findall(f"{{{UNPLUG_NAMESPACE}}}device"), *record.findall("device")]:
        field_name, key, address = entry.get("field"), entry.get("key"), entry.get("address") or ""
        if field_name not in DEVICE_LISTS:
            continue
        if any(device_key(field_name, node) == key and device_address(node) == address
               for node in device_nodes(running_root, field_name)):
            found.append({"field": field_name, "key": key, "address": address})
    return found


def domain_object(name: str, uuid: str, config: Element, running_root: Element | None, state: str,
                  autostart: bool, project: str, persistent: bool = True) -> LiveObject:
    """A domain's LiveObject from its persistent XML and, when it runs, its live XML."""
    values = _read_bound("domain", config)
    config_extra = _split_duplicates(values, config, running_root, "config")
    running_extra: list[dict[str, Any]] = []
    values["description"] = values.get("description") or ""
    values["state"] = state
    values["autostart"] = autostart
    running: dict[str, Any] = {}
    if running_root is not None:
        running = _read_bound("domain", running_root)
        running["description"] = running.get("description") or ""
        running_extra = _split_duplicates(running, running_root, config, "live")
        unplugging = _unplugging(running_root)
        if unplugging:
            running["unplugging"] = unplugging
        balloon = running_root.find(f"metadata/{{{BALLOON_NAMESPACE}}}balloon")
        if balloon is not None:
            try:
                running["balloon"] = {"target": int(balloon.get("target")), "actual": int(balloon.get("actual"))}
            except (TypeError, ValueError):
                pass
    obj = LiveObject("domain", name, values, {"uuid": uuid}, active=running_root is not None, running_values=running,
                     config_root=config, running_root=running_root, applied=read_record(config),
                     persistent=persistent, duplicates=_merge_duplicates(config_extra, running_extra))
    _set_owner(obj, read_owner(config), project)
    return obj


def _merge_duplicates(config: list[dict[str, Any]], running: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per extra device: one in both definitions (same key and address) is removed from both."""
    merged = [dict(entry, where=[entry["where"]]) for entry in config]
    for entry in running:
        same = next((m for m in merged if (m["field"], m["key"], m["address"]) ==
                     (entry["field"], entry["key"], entry["address"])), None)
        if same is not None:
            same["where"].append("live")
        else:
            merged.append(dict(entry, where=["live"]))
    return merged


def _state_name(state: int) -> str:
    """vmform's name for a libvirt domain state; "stopped" for the states in which nothing runs."""
    import libvirt

    if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_NOSTATE):
        return "stopped"
    return {libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}.get(state, "running")


@dataclass
class DomainFacts:
    """State, autostart and persistence of every domain, from a few listAllDomains calls with filters instead of
    four calls per domain (state, isPersistent, autostart): at 500 domains that is 5 round trips, not 2000."""

    states: dict[str, int]  # UUID -> libvirt state, for domains that are running, paused or shut off
    autostart: set[str]  # UUIDs (only persistent domains can autostart)
    transient: set[str] = field(default_factory=set)  # UUIDs of domains that only run (undefined while running)

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
        transient = {dom.UUIDString() for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)}
        return cls(states, autostart, transient)


@dataclass
class NetworkFacts:
    """Which networks run, start with the host and are only running (transient): four filtered
    listAllNetworks calls for the whole host instead of three calls per network."""

    active: set[str]  # UUIDs
    inactive: set[str]
    autostart: set[str]
    transient: set[str]

    def known(self, uuid: str) -> bool:
        """False for a network defined while the lists were read: ask the network itself."""
        return uuid in self.active or uuid in self.inactive

    @classmethod
    def read(cls, conn: libvirt.virConnect) -> NetworkFacts:
        import libvirt

        def uuids(flag: int) -> set[str]:
            return {net.UUIDString() for net in conn.listAllNetworks(flag)}

        return cls(uuids(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE), uuids(libvirt.VIR_CONNECT_LIST_NETWORKS_INACTIVE),
                   uuids(libvirt.VIR_CONNECT_LIST_NETWORKS_AUTOSTART), uuids(libvirt.VIR_CONNECT_LIST_NETWORKS_TRANSIENT))


@dataclass
class PoolFacts:
    """Which storage pools run and start with the host, from three filtered listAllStoragePools calls."""

    active: set[str]  # UUIDs
    inactive: set[str]
    autostart: set[str]

    def known(self, uuid: str) -> bool:
        return uuid in self.active or uuid in self.inactive

    @classmethod
    def read(cls, conn: libvirt.virConnect) -> PoolFacts:
        import libvirt

        def uuids(flag: int) -> set[str]:
            return {pool.UUIDString() for pool in conn.listAllStoragePools(flag)}

        return cls(uuids(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE), uuids(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_INACTIVE),
                   uuids(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_AUTOSTART))


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
        persistent = uuid not in facts.transient
    else:
        persistent = bool(dom.isPersistent())
        autostart = bool(dom.autostart()) if persistent else False
    running_root = parse_xml(dom.XMLDesc(0)) if active else None
    return domain_object(dom.name(), uuid, config, running_root, state_name, autostart, project, persistent)


def read_network(net: libvirt.virNetwork, project: str, facts: NetworkFacts | None = None) -> LiveObject:
    import libvirt

    config = parse_xml(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE))
    values = _read_bound("network", config)
    uuid = net.UUIDString()
    if facts is not None and facts.known(uuid):
        values["autostart"], active, persistent = uuid in facts.autostart, uuid in facts.active, uuid not in facts.transient
    else:
        values["autostart"], active, persistent = bool(net.autostart()), bool(net.isActive()), bool(net.isPersistent())
    running_root = parse_xml(net.XMLDesc(0)) if active else None
    running = _read_bound("network", running_root) if running_root is not None else {}
    obj = LiveObject("network", net.name(), values, {"uuid": uuid}, active=active, running_values=running,
                     config_root=config, running_root=running_root, applied=read_record(config),
                     persistent=persistent)
    _set_owner(obj, read_owner(config), project)
    return obj


def _set_owner(obj: LiveObject, owner: tuple[str, str] | None, project: str) -> None:
    if owner is None:
        return
    if owner[0] == project:
        obj.address = owner[1]
    else:
        obj.owner_project = owner[0]


def read_pool(pool: libvirt.virStoragePool, ledger: Ledger, facts: PoolFacts | None = None) -> LiveObject:
    import libvirt

    config = parse_xml(pool.XMLDesc(libvirt.VIR_STORAGE_XML_INACTIVE))
    values = _read_bound("pool", config)
    uuid = pool.UUIDString()
    if facts is not None and facts.known(uuid):
        values["autostart"], active = uuid in facts.autostart, uuid in facts.active
    else:
        values["autostart"], active = bool(pool.autostart()), bool(pool.isActive())
    obj = LiveObject("pool", pool.name(), values, {"uuid": uuid}, active=active, config_root=config)
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
        network_facts = NetworkFacts.read(conn)
        for net in conn.listAllNetworks():
            if skipped("network", net.name()):
                continue
            try:
                objects.append(read_network(net, project, network_facts))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                    raise
        owned_pools = {entry["name"] for entry in ledger.pools.values()} | {e["pool"] for e in ledger.volumes.values()}
        wanted = (pool_names or set()) | owned_pools
        index = _volume_index(ledger)
        pool_facts = PoolFacts.read(conn)
        for pool in conn.listAllStoragePools():
            try:
                obj = read_pool(pool, ledger, pool_facts)
                volumes = read_volumes(pool, ledger, index) if obj.active and obj.name in wanted else []
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL):
                    raise
                continue  # vanished while we read (another client deleted it)
            objects.append(obj)
            objects.extend(volumes)
        _resolve_backing(objects)
        return LiveState(conn.getURI(), objects, ledger, uses_reader=lambda: read_uses(conn))
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


# --- who uses a volume's file: read only when a plan deletes or replaces a volume -----------------------


@dataclass(frozen=True)
class VolumeUse:
    """One use of a volume's file found on the host: a disk of a domain (managed or not), or another volume
    (in any pool) whose backing file it is."""

    path: str  # the file used
    holder_kind: str  # "domain" or "volume"
    holder: str  # the domain's libvirt name, or the overlay volume's name
    uuid: str = ""  # a domain's
    pool: str = ""  # an overlay's pool
    target: str = ""  # a domain's disk target (vdb)
    running: bool = False  # in the running domain's live XML
    defined: bool = False  # in the domain's persistent definition
    shareable: bool = False
    owner: tuple[str, str] | None = None  # a domain's vmform owner record (project, address)
    source_pool: str = ""  # a disk given as <source pool= volume=>: the pool and volume it names
    source_volume: str = ""

    def holder_key(self) -> tuple[str, str]:
        """How apply finds the holder again: a domain by UUID, a volume by pool/name."""
        return ("domain", self.uuid) if self.holder_kind == "domain" else ("volume", f"{self.pool}/{self.holder}")


@dataclass
class HostUses:
    """Every use of a file by a domain disk or as a backing file, indexed by the file's path (and, for disks
    named by pool and volume, by pool/volume)."""

    by_path: dict[str, list[VolumeUse]] = field(default_factory=dict)
    by_volume: dict[tuple[str, str], list[VolumeUse]] = field(default_factory=dict)

    def add(self, use: VolumeUse) -> None:
        if use.path:
            self.by_path.setdefault(use.path, []).append(use)
        if use.source_pool and use.source_volume:
            self.by_volume.setdefault((use.source_pool, use.source_volume), []).append(use)

    def of(self, path: str, pool: str = "", name: str = "") -> list[VolumeUse]:
        """The uses of one volume (by its path, or by the pool and name a disk names it by), each once."""
        found = list(self.by_path.get(path, []))
        found += [use for use in self.by_volume.get((pool, name), []) if use not in found]
        return found


def domain_uses(name: str, uuid: str, config: Element | None, running: Element | None,
                volume_paths: dict[tuple[str, str], str] | None = None) -> list[VolumeUse]:
    """The files a domain's disks use, one VolumeUse per (file, target), saying whether the running domain,
    its persistent definition, or both have it. ``volume_paths`` resolves disks given by pool and volume."""
    found: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    owner = read_owner(config) if config is not None else (read_owner(running) if running is not None else None)
    for root, where in ((config, "defined"), (running, "running")):
        if root is None:
            continue
        for disk in root.findall("devices/disk"):
            source = disk.find("source")
            if source is None:
                continue
            target = disk.find("target")
            dev = target.get("dev") if target is not None else ""
            pool, volume = source.get("pool") or "", source.get("volume") or ""
            path = source.get("file") or source.get("dev") or ""
            if not path and pool and volume:
                path = (volume_paths or {}).get((pool, volume), "")
            if not path and not (pool and volume):
                continue
            key = (path, pool, volume, str(dev))
            entry = found.setdefault(key, {"shareable": False, "defined": False, "running": False})
            entry[where] = True
            entry["shareable"] = entry["shareable"] or disk.find("shareable") is not None
    return [VolumeUse(path, "domain", name, uuid=uuid, target=dev, running=entry["running"], defined=entry["defined"],
                      shareable=entry["shareable"], owner=owner, source_pool=pool, source_volume=volume)
            for (path, pool, volume, dev), entry in found.items()]


def backing_use(pool: str, name: str, root: Element) -> VolumeUse | None:
    """A volume's use of its backing file, if it has one."""
    backing = root.find("backingStore/path")
    if backing is None or not backing.text:
        return None
    return VolumeUse(backing.text, "volume", name, pool=pool)


def read_uses(conn: libvirt.virConnect) -> HostUses:
    """Every domain's disks (persistent definition, and live XML of the running ones) and every volume's
    backing file, in every active pool, managed or not: one listAll* per kind and one XML fetch per object.
    Only read when a plan deletes or replaces a volume."""
    import libvirt

    uses = HostUses()
    volume_paths: dict[tuple[str, str], str] = {}
    try:
        for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
            try:
                pool_name = pool.name()
                for vol in pool.listAllVolumes():
                    root = parse_xml(vol.XMLDesc(0))
                    path = root.findtext("target/path") or vol.path()
                    volume_paths[(pool_name, vol.name())] = path
                    use = backing_use(pool_name, vol.name(), root)
                    if use is not None:
                        uses.add(use)
            except libvirt.libvirtError as exc:
                # Gone or stopped while we read (another client): it holds no volume anyone can use now.
                if exc.get_error_code() not in (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL,
                                                libvirt.VIR_ERR_OPERATION_INVALID):
                    raise
        active = {dom.UUIDString() for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
        transient = {dom.UUIDString() for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)}
        for dom in conn.listAllDomains():
            try:
                for use in _read_domain_uses(dom, dom.UUIDString() in active, dom.UUIDString() not in transient,
                                             volume_paths):
                    uses.add(use)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # vanished while we read
                    raise
    except libvirt.libvirtError as exc:
        raise HostError(f"cannot read which domains and volumes use the volumes this plan deletes: "
                        f"{libvirt_message(exc)}") from None
    return uses


def _read_domain_uses(dom: libvirt.virDomain, active: bool, persistent: bool,
                      volume_paths: dict[tuple[str, str], str] | None) -> list[VolumeUse]:
    import libvirt

    config = parse_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) if persistent else None
    running = parse_xml(dom.XMLDesc(0)) if active else None
    return domain_uses(dom.name(), dom.UUIDString(), config, running, volume_paths)


def read_holder_uses(conn: libvirt.virConnect, holder: tuple[str, str], path: str, pool: str,
                     name: str) -> list[VolumeUse]:
    """One holder's uses of one volume, read again now (apply's check right before a delete): a domain by
    UUID, an overlay by pool/name. Gone is no use."""
    import libvirt

    kind, key = holder
    try:
        if kind == "domain":
            dom = conn.lookupByUUIDString(key)
            found = _read_domain_uses(dom, bool(dom.isActive()), bool(dom.isPersistent()), {(pool, name): path})
        else:
            pool_name, volume_name = key.split("/", 1)
            vol = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(volume_name)
            use = backing_use(pool_name, volume_name, parse_xml(vol.XMLDesc(0)))
            found = [use] if use is not None else []
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_STORAGE_POOL,
                                    libvirt.VIR_ERR_NO_STORAGE_VOL):
            return []
        raise
    return [use for use in found if use.path == path or (use.source_pool, use.source_volume) == (pool, name)]


def uses_from_objects(objects: list[LiveObject]) -> HostUses:
    """The uses a LiveState already holds (its domains' documents, its volumes' backing files): for a LiveState
    that was not read from a host (tests, tools), so planning sees the same uses as read_uses would."""
    uses = HostUses()
    paths = {(obj.identity.get("pool"), obj.name): obj.identity.get("path") for obj in objects if obj.kind == "volume"}
    by_volume = {(str(p), str(n)): str(path) for (p, n), path in paths.items() if path}
    for obj in objects:
        if obj.kind == "domain":
            for use in domain_uses(obj.name, str(obj.identity.get("uuid") or ""), obj.config_root, obj.running_root,
                                   by_volume):
                uses.add(use)
        elif obj.kind == "volume":
            backing = obj.values.get("backing") or {}
            path = backing.get("path") or by_volume.get((str(backing.get("pool")), str(backing.get("volume"))))
            if path:
                uses.add(VolumeUse(path, "volume", obj.name, pool=str(obj.identity.get("pool"))))
    return uses
