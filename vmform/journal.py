"""The journal: every mutating libvirt call, checked against the planned change it serves before libvirt sees it.

Apply runs each change inside ``serving(change)``; every call made in that thread is attributed to that change.
The connections ``ConnectionPool`` hands out are guarded (``guard``), and so is every libvirt object they
return, so providers call libvirt as they always did. A read passes straight through (its classification is
cached per class and method). A mutation is checked by ``policy``: which calls a planned action allows, on which
objects. A call the change's action does not allow, or one made outside any change, is recorded as ``refused``
and raises ``UnplannedMutation`` instead of reaching libvirt. Outside a change only the project lock may be
written (category ``lock``); ledger writes are journaled under the change they serve (category ``ledger``);
``vmform import`` marks what it adopts under category ``import`` (outside any plan, for now).

The journal is always on. ``apply --journal FILE`` (or ``VMFORM_JOURNAL=FILE``, appended to) writes it as JSON
lines, one object per mutating call (docs/JSON.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Any

from vmform.errors import VmformError

if TYPE_CHECKING:
    from vmform.plan import Change

ENV = "VMFORM_JOURNAL"


class UnplannedMutation(VmformError):
    """A libvirt mutation that serves no planned change (or one its change's action does not allow): refused
    before it reached libvirt. Always a bug in vmform, never the user's doing."""


@dataclass(frozen=True)
class Entry:
    """One mutating libvirt call, as the journal's JSON lines show it (docs/JSON.md)."""

    time: str  # UTC, ISO 8601 with milliseconds
    host: str | None  # the project's host name the connection reaches
    address: str | None  # the planned change the call serves (None: outside any change)
    action: str | None  # that change's action: create, update, delete, delete_then_create, create_then_delete, migrate
    category: str  # change | ledger | lock | import
    call: str  # libvirt-python class and method: virDomain.undefineFlags
    kind: str  # what it acts on: domain, network, pool, volume, secret, connection
    name: str  # its libvirt name (a volume: pool/name; a secret: its usage)
    verdict: str  # ok | refused
    reason: str | None = None  # why it was refused

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Target:
    """What a mutating call acts on."""

    kind: str
    name: str
    pool: str | None = None  # a volume's pool
    uuid: str | None = None  # a domain's, network's or pool's UUID when known
    device: str | None = None  # the root tag of a device XML (attach/detach/update), the disk of a blockResize
    disk: tuple[str | None, str | None] | None = None  # a blockResize: the (pool, volume) that disk is

    def shown(self) -> str:
        return f"{self.pool}/{self.name}" if self.kind == "volume" and self.pool else self.name

    def key(self) -> tuple[str, str, str | None]:
        return self.kind, self.name, self.pool


@dataclass
class Scope:
    """What the current thread's calls serve: a planned change, or a category (import) outside any plan."""

    change: Change | None
    category: str = "change"
    made: set[tuple[str, str, str | None]] = field(default_factory=set)  # objects this change defined or created
    refused: list[Entry] = field(default_factory=list)

    @property
    def hosts(self) -> set[str]:
        if self.change is None:
            return set()
        hosts = {self.change.host}
        if "from_host" in self.change.identity:
            hosts.add(str(self.change.identity["from_host"]))
        return hosts


class Journal:
    """A thread-safe list of entries, written as JSON lines to its sinks as they come (so an apply killed half
    way still leaves what it did)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.entries: list[Entry] = []
        self._sinks: dict[str, IO[str]] = {}  # --journal FILE: everything this process journaled
        self._env_path: str | None = None  # VMFORM_JOURNAL: what is journaled while it names this file
        self._env_sink: IO[str] | None = None
        self.project: str | None = None  # when known, a lock or ledger secret must be this project's

    def mark(self) -> int:
        return len(self.entries)

    def since(self, mark: int) -> list[Entry]:
        with self._lock:
            return self.entries[mark:]

    def write_to(self, path: str, append: bool = False) -> None:
        """Write every entry (those so far and those to come) to ``path`` as JSON lines."""
        with self._lock:
            self._open(path, append)

    def _open(self, path: str, append: bool) -> IO[str]:
        sink = self._sinks.get(path)
        if sink is None:
            sink = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._sinks[path] = sink
            for entry in self.entries:
                sink.write(json.dumps(entry.to_json(), sort_keys=True) + "\n")
            sink.flush()
        return sink

    def record(self, entry: Entry) -> None:
        with self._lock:
            self._follow_environment()
            self.entries.append(entry)
            sinks = [*self._sinks.values(), *([self._env_sink] if self._env_sink is not None else [])]
            for sink in sinks:
                sink.write(json.dumps(entry.to_json(), sort_keys=True) + "\n")
                sink.flush()

    def _follow_environment(self) -> None:
        """VMFORM_JOURNAL as it is now: entries from now on are appended there (a process that works for several
        projects in turn, as a library user or a test does, gives each its own file)."""
        path = os.environ.get(ENV) or None
        if path == self._env_path:
            return
        if self._env_sink is not None:
            self._env_sink.close()
        self._env_path, self._env_sink = path, None
        if path is not None and path not in self._sinks:
            try:
                self._env_sink = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            except OSError:
                pass  # an audit file that cannot be opened must not fail the call it records

    def close(self) -> None:
        with self._lock:
            for sink in self._sinks.values():
                sink.close()
            self._sinks.clear()
            if self._env_sink is not None:
                self._env_sink.close()
            self._env_path, self._env_sink = None, None


JOURNAL = Journal()
_local = threading.local()


def current() -> Scope | None:
    return getattr(_local, "scope", None)


@contextlib.contextmanager
def serving(change: Change | None, category: str = "change") -> Iterator[Scope]:
    """Attribute every libvirt mutation this thread makes inside the block to ``change`` (apply's ``_run``), or,
    with ``change=None``, to a category outside any plan (``import``)."""
    previous = current()
    scope = Scope(change, category)
    _local.scope = scope
    try:
        yield scope
    finally:
        _local.scope = previous


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


# --- classifying libvirt-python's methods -----------------------------------------------------------------------

# Reads: passed straight through. Everything not listed here (or in _CONTROL) is a mutation, so a method added
# to libvirt-python later is checked (and refused outside a change) rather than silently passed.
_READS: dict[str, frozenset[str]] = {
    "virConnect": frozenset({
        "baselineCPU", "baselineHypervisorCPU", "compareCPU", "compareHypervisorCPU", "domainListGetStats",
        "domainXMLFromNative", "domainXMLToNative", "findStoragePoolSources", "getAllDomainStats", "getCPUMap",
        "getCPUModelNames", "getCPUStats", "getCapabilities", "getCellsFreeMemory", "getDomainCapabilities",
        "getFreeMemory", "getFreePages", "getHostname", "getInfo", "getLibVersion", "getMaxVcpus",
        "getMemoryParameters", "getMemoryStats", "getSEVInfo", "getSecurityModel", "getStoragePoolCapabilities",
        "getSysinfo", "getType", "getURI", "getVersion", "interfaceLookupByMACString", "interfaceLookupByName",
        "isAlive", "isEncrypted", "isSecure", "listAllDevices", "listAllDomains", "listAllInterfaces",
        "listAllNWFilterBindings", "listAllNWFilters", "listAllNetworks", "listAllSecrets", "listAllStoragePools",
        "listDefinedDomains", "listDefinedInterfaces", "listDefinedNetworks", "listDefinedStoragePools",
        "listDevices", "listDomainsID", "listInterfaces", "listNWFilters", "listNetworks", "listSecrets",
        "listStoragePools", "lookupByID", "lookupByName", "lookupByUUID", "lookupByUUIDString",
        "networkLookupByName", "networkLookupByUUID", "networkLookupByUUIDString", "nodeDeviceLookupByName",
        "nodeDeviceLookupSCSIHostByWWN", "numOfDefinedDomains", "numOfDefinedInterfaces", "numOfDefinedNetworks",
        "numOfDefinedStoragePools", "numOfDevices", "numOfDomains", "numOfInterfaces", "numOfNWFilters",
        "numOfNetworks", "numOfSecrets", "numOfStoragePools", "nwfilterBindingLookupByPortDev",
        "nwfilterLookupByName", "nwfilterLookupByUUID", "nwfilterLookupByUUIDString", "saveImageGetXMLDesc",
        "secretLookupByUUID", "secretLookupByUUIDString", "secretLookupByUsage", "storagePoolLookupByName",
        "storagePoolLookupByTargetPath", "storagePoolLookupByUUID", "storagePoolLookupByUUIDString",
        "storageVolLookupByKey", "storageVolLookupByPath", "virConnGetLastError",
    }),
    "virDomain": frozenset({
        "ID", "OSType", "UUID", "UUIDString", "XMLDesc", "authorizedSSHKeysGet", "autostart", "backupGetXMLDesc",
        "blkioParameters", "blockInfo", "blockIoTune", "blockJobInfo", "blockPeek", "blockStats", "blockStatsFlags",
        "checkpointLookupByName", "connect", "controlInfo", "diskErrors", "emulatorPinInfo", "fsInfo",
        "getCPUStats", "getTime", "guestInfo", "guestVcpus", "hasCurrentSnapshot", "hasManagedSaveImage",
        "hostname", "info", "interfaceAddresses", "interfaceParameters", "interfaceStats", "ioThreadInfo",
        "isActive", "isPersistent", "isUpdated", "jobInfo", "jobStats", "launchSecurityInfo", "listAllCheckpoints",
        "listAllSnapshots", "managedSaveGetXMLDesc", "maxMemory", "maxVcpus", "memoryParameters", "memoryPeek",
        "memoryStats", "messages", "metadata", "migrateGetCompressionCache", "migrateGetMaxDowntime",
        "migrateGetMaxSpeed", "name", "numaParameters", "perfEvents", "schedulerParameters",
        "schedulerParametersFlags", "schedulerType", "securityLabel", "securityLabelList", "snapshotCurrent",
        "snapshotListNames", "snapshotLookupByName", "snapshotNum", "state", "vcpuPinInfo", "vcpus", "vcpusFlags",
        # A console or channel stream reads what the guest prints; it changes nothing on the host.
        "openConsole", "openChannel", "screenshot",
    }),
    "virNetwork": frozenset({
        "DHCPLeases", "UUID", "UUIDString", "XMLDesc", "autostart", "bridgeName", "connect", "isActive",
        "isPersistent", "listAllPorts", "name", "portLookupByUUID", "portLookupByUUIDString",
    }),
    "virStoragePool": frozenset({
        "UUID", "UUIDString", "XMLDesc", "autostart", "connect", "info", "isActive", "isPersistent",
        "listAllVolumes", "listVolumes", "name", "numOfVolumes", "storageVolLookupByName",
    }),
    "virStorageVol": frozenset({
        "XMLDesc", "connect", "info", "infoFlags", "key", "name", "path", "storagePoolLookupByVolume",
        "download",  # reads the volume into a stream
    }),
    "virSecret": frozenset({"UUID", "UUIDString", "XMLDesc", "connect", "usageID", "usageType", "value"}),
    # A stream carries the bytes of an upload or download that was itself checked (virStorageVol.upload).
    "virStream": frozenset({
        "abort", "connect", "eventAddCallback", "eventRemoveCallback", "eventUpdateCallback", "finish", "recv",
        "recvAll", "recvFlags", "recvHole", "send", "sendAll", "sendHole", "sparseRecvAll", "sparseSendAll",
    }),
}
# Plumbing of the client connection itself (events, keepalive, closing): nothing on the host changes.
_CONTROL = frozenset({
    "c_pointer", "close", "domainEventDeregister", "domainEventDeregisterAny", "domainEventRegister",
    "domainEventRegisterAny", "networkEventDeregisterAny", "networkEventRegisterAny", "nodeDeviceEventDeregisterAny",
    "nodeDeviceEventRegisterAny", "registerCloseCallback", "secretEventDeregisterAny", "secretEventRegisterAny",
    "setKeepAlive", "storagePoolEventDeregisterAny", "storagePoolEventRegisterAny", "unregisterCloseCallback",
    "newStream", "virConnResetLastError",
})
_KINDS = {"virConnect": "connection", "virDomain": "domain", "virNetwork": "network", "virStoragePool": "pool",
          "virStorageVol": "volume", "virSecret": "secret", "virStream": "stream"}
_classified: dict[tuple[str, str], bool] = {}  # (class, method) -> is it a mutation


def is_mutation(class_name: str, method: str) -> bool:
    key = (class_name, method)
    found = _classified.get(key)
    if found is None:
        reads = _READS.get(class_name)
        if reads is None:  # a class this module does not know (snapshots, checkpoints, ...): only plain getters
            found = not (method.startswith(("get", "list", "num", "is", "lookup")) or method in ("name", "XMLDesc",
                                                                                              "connect"))
        else:
            found = method not in reads and method not in _CONTROL
        _classified[key] = found
    return found


# --- guarded objects ------------------------------------------------------------------------------------------
# A guarded object is the libvirt-python object itself, its class swapped for a subclass whose mutating methods
# are checked first and whose look-ups guard what they return. Reads are libvirt-python's own methods, so a plan
# costs what it cost; ``isinstance(dom, libvirt.virDomain)`` still holds. Every object libvirt-python makes keeps
# the connection it came from (``_conn``), and the guarded connection knows its host.

_LIBVIRT_CLASSES: tuple[type, ...] | None = None
_GUARDED: dict[type, type] = {}
_RETURNING_OBJECTS: dict[str, bool] = {}


def _libvirt_classes() -> tuple[type, ...]:
    global _LIBVIRT_CLASSES
    if _LIBVIRT_CLASSES is None:
        import libvirt

        names = ("virConnect", "virDomain", "virNetwork", "virStoragePool", "virStorageVol", "virSecret", "virStream",
                 "virDomainSnapshot", "virDomainCheckpoint", "virNetworkPort", "virNodeDevice", "virInterface",
                 "virNWFilter", "virNWFilterBinding")
        _LIBVIRT_CLASSES = tuple(getattr(libvirt, n) for n in names if hasattr(libvirt, n))
    return _LIBVIRT_CLASSES


def _returns_objects(method: str) -> bool:
    """Whether a read returns libvirt objects (which must be guarded too): look-ups, listAll*, connect()."""
    found = _RETURNING_OBJECTS.get(method)
    if found is None:
        found = (method.startswith(("lookup", "listAll")) or "Lookup" in method
                 or method in ("connect", "newStream", "snapshotCurrent"))
        _RETURNING_OBJECTS[method] = found
    return found


def _guarded_class(cls: type) -> type:
    found = _GUARDED.get(cls)
    if found is None:
        class_name = cls.__name__
        namespace: dict[str, Any] = {"_vmf_guarded": True, "__module__": __name__}
        for name in dir(cls):
            method = getattr(cls, name, None)
            if name.startswith("_") or not callable(method) or isinstance(method, type):
                continue
            if is_mutation(class_name, name):
                namespace[name] = _checked_method(class_name, name, method)
            elif _returns_objects(name):
                namespace[name] = _wrapping_method(method)
        found = type(f"Guarded{class_name}", (cls,), namespace)
        _GUARDED[cls] = found
    return found


def guard(obj: Any, host: str | None) -> Any:
    """Guard a libvirt connection (in place: its class becomes the guarded subclass) for the host the project
    calls ``host``; every object it returns is guarded too. A guarded object is returned as it is."""
    if obj is None or getattr(obj, "_vmf_guarded", False):
        return obj
    obj.__dict__["_vmf_host"] = host
    obj.__class__ = _guarded_class(type(obj))
    return obj


def is_guarded(obj: Any) -> bool:
    return bool(getattr(obj, "_vmf_guarded", False))


def _host_of(obj: Any) -> str | None:
    for _ in range(3):  # an object's connection (``_conn``) knows its host
        if "_vmf_host" in obj.__dict__:
            return obj.__dict__["_vmf_host"]  # type: ignore[no-any-return]
        obj = obj.__dict__.get("_conn")
        if obj is None:
            return None
    return None


def _wrap(result: Any, parent: Any) -> Any:
    if isinstance(result, list):
        return [_wrap(item, parent) for item in result]
    if not isinstance(result, _libvirt_classes()) or getattr(result, "_vmf_guarded", False):
        return result
    if type(result).__name__ == "virStorageVol" and type(parent).__name__.endswith("virStoragePool"):
        result.__dict__["_vmf_pool"] = parent.name()  # found in a pool: no round trip to name it later
    result.__class__ = _guarded_class(type(result))
    return result


def _wrapping_method(method: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _wrap(method(self, *args, **kwargs), self)

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


def _checked_method(class_name: str, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        check(_host_of(self), class_name, name, _target(self, class_name, name, args), args)
        return _wrap(method(self, *args, **kwargs), self)

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


def _xml_root(text: Any) -> Any:
    from lxml import etree

    if not isinstance(text, str):
        return None
    try:
        return etree.fromstring(text.encode(), etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError:
        return None


_DEFINES_FROM_XML = {
    "defineXML": "domain", "defineXMLFlags": "domain", "createXML": "domain", "createXMLWithFiles": "domain",
    "networkDefineXML": "network", "networkDefineXMLFlags": "network", "networkCreateXML": "network",
    "networkCreateXMLFlags": "network", "storagePoolDefineXML": "pool", "storagePoolCreateXML": "pool",
    "secretDefineXML": "secret",
}


def _target(raw: Any, class_name: str, name: str, args: tuple[Any, ...]) -> Target:
    """The object a mutating call acts on (read without another round trip where libvirt-python has it)."""
    if class_name == "virConnect":
        kind = _DEFINES_FROM_XML.get(name)
        root = _xml_root(args[0]) if args and kind else None
        if kind is None or root is None:
            return Target("connection", name)
        if kind == "secret":
            usage = root.find("usage")
            text = ""
            if usage is not None:
                text = next((child.text for child in usage if child.text), "") or ""
            return Target("secret", text.strip())
        return Target(kind, (root.findtext("name") or "").strip(), uuid=(root.findtext("uuid") or "").strip() or None)
    if class_name == "virDomain":
        device = None
        if name in ("attachDevice", "attachDeviceFlags", "detachDevice", "detachDeviceFlags", "updateDeviceFlags"):
            element = _xml_root(args[0]) if args else None
            device = element.tag if element is not None else "?"
        elif name == "blockResize" and args:
            device = str(args[0])
            return Target("domain", raw.name(), uuid=raw.UUIDString(), device=device, disk=_disk_volume(raw, device))
        return Target("domain", raw.name(), uuid=raw.UUIDString(), device=device)
    if class_name == "virNetwork":
        return Target("network", raw.name(), uuid=raw.UUIDString())
    if class_name == "virStoragePool":
        if name in ("createXML", "createXMLFrom"):
            root = _xml_root(args[0]) if args else None
            volume = (root.findtext("name") or "").strip() if root is not None else "?"
            return Target("volume", volume, pool=raw.name())
        return Target("pool", raw.name(), uuid=raw.UUIDString())
    if class_name == "virStorageVol":
        pool = raw.__dict__.get("_vmf_pool")
        if pool is None:
            try:
                pool = raw.storagePoolLookupByVolume().name()
            except Exception:  # noqa: BLE001 - a volume whose pool cannot be named is checked without one
                pool = None
        return Target("volume", raw.name(), pool=pool)
    if class_name == "virSecret":
        return Target("secret", raw.usageID() or raw.UUIDString())
    return Target(_KINDS.get(class_name, class_name), _name_of(raw))


def _disk_volume(dom: Any, device: str) -> tuple[str | None, str | None] | None:
    """The (pool, volume) of the domain's disk ``device`` (a target dev or a path), read from its live XML."""
    from vmform.live import parse_xml

    try:
        root = parse_xml(dom.XMLDesc(0))
        for disk in root.findall("devices/disk"):
            source, target = disk.find("source"), disk.find("target")
            if source is None or target is None:
                continue
            path = source.get("file") or source.get("dev")
            if device not in (target.get("dev"), path):
                continue
            if source.get("volume"):
                return source.get("pool"), source.get("volume")
            if path:
                vol = dom.connect().storageVolLookupByPath(path)
                return vol.storagePoolLookupByVolume().name(), vol.name()
    except Exception:  # noqa: BLE001 - a disk that cannot be named is no disk of the change's volume
        return None
    return None


def _name_of(raw: Any) -> str:
    try:
        return str(raw.name())
    except Exception:  # noqa: BLE001 - an object without a name
        return "?"


def check(host: str | None, class_name: str, method: str, target: Target, args: tuple[Any, ...] = ()) -> None:
    """Journal one mutating call; raise UnplannedMutation (before libvirt sees it) when no planned change allows
    it."""
    from vmform.policy import decide

    scope = current()
    category, reason = decide(scope, host, method, target, args, JOURNAL.project)
    change = scope.change if scope is not None else None
    entry = Entry(
        time=_now(), host=host, address=change.address if change is not None else None,
        action=change.action.name.lower() if change is not None else None, category=category,
        call=f"{class_name}.{method}", kind=target.kind, name=target.shown(),
        verdict="ok" if reason is None else "refused", reason=reason,
    )
    JOURNAL.record(entry)
    if reason is not None:
        if scope is not None:
            scope.refused.append(entry)
        raise UnplannedMutation(refusal_message(entry))
    if scope is not None and method in _MAKES:
        scope.made.add(target.key())


# Calls that bring an object into being: a change may undo (undefine, delete) what it made itself, and only that.
_MAKES = frozenset({"defineXML", "defineXMLFlags", "networkDefineXML", "networkDefineXMLFlags",
                    "storagePoolDefineXML", "createXML", "createXMLFrom"})


def refusal_message(entry: Entry) -> str:
    action = entry.action or "outside any change"
    return (f"internal error: {entry.address or 'no planned change'}: {entry.call} on {entry.kind} {entry.name} "
            f"serves no planned change ({action})")
