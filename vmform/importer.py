"""Adopting existing, unmanaged libvirt objects: their persistent XML is read through the *same* field
bindings the diff uses, turned back into manifest values, written as YAML, and the objects are marked as
owned by the project (metadata for domains and networks, the ledger for pools).

No printing here: ``import_objects`` returns an ``ImportResult`` the CLI shows.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from lxml import etree

from vmform.connection import libvirt_message
from vmform.errors import VmformError
from vmform.lastapplied import AppliedRecord, applied_element, record_for, write_record
from vmform.live import parse_xml
from vmform.ownership import NAMESPACE, Ledger, ProjectLock, read_owner, set_owner
from vmform.schema.domain import DISK_BUSES, NIC_MODELS
from vmform.schema.registry import KINDS
from vmform.schema.types import NAME, FieldError, FieldSpec, ListOf, Obj, Size
from vmform.schema.xmlbind import Element
from vmform.units import format_size

if TYPE_CHECKING:
    import libvirt

    from vmform.api import Workspace

IMPORTABLE = ("network", "pool", "domain")  # in the order their sections are written

# What libvirt generates or fills in by itself, so a manifest need not say it: never counted as lost.
# "path" ignores any value there; "path=value" only libvirt's default value.
_IGNORED_PATHS = {
    "uuid", "metadata", "os/nvram", "mac", "ip/@netmask", "source", "target/permissions", "capacity", "allocation",
    "available", "devices/disk/source/@index", "devices/disk/backingStore", "devices/interface/source/@portid",
    "devices/interface/source/@bridge", "devices/interface/target", "cpu/@check", "cpu/@match",
}
_IGNORED_VALUES = {
    "devices/disk/driver/@name=qemu", "devices/hostdev/@managed=yes", "devices/filesystem/@type=mount",
    "devices/graphics/@autoport=yes", "devices/graphics/@port=-1", "devices/graphics/@listen=127.0.0.1",
    "devices/graphics/listen/@type=address", "devices/graphics/listen/@address=127.0.0.1",
    "devices/video/model/@heads=1", "devices/video/model/@primary=yes", "devices/video/model/@ram=65536",
    "devices/video/model/@vram=65536", "devices/video/model/@vram=16384", "devices/video/model/@vgamem=16384",
    "devices/tpm/@model=tpm-crb", "devices/tpm/backend/@version=2.0", "devices/rng/@model=virtio",
    "devices/rng/backend/@model=random", "devices/rng/backend=/dev/urandom",
    "devices/serial/@type=pty", "devices/serial/target/@type=isa-serial", "devices/serial/target/@port=0",
    "devices/serial/target/model/@name=isa-serial", "devices/console/@type=pty", "devices/console/target/@type=serial",
    "devices/console/target/@port=0", "devices/console", "devices/console/target",
    "vcpu/@placement=static", "bridge/@stp=on", "bridge/@delay=0",
    # The guest agent channel: libvirt binds the socket where it wants; firmware='bios' is no UEFI, as is nothing.
    "devices/channel/@type=unix", "devices/channel/source/@mode=bind", "devices/channel/target/@type=virtio",
    "devices/channel/target/@name=org.qemu.guest_agent.0", "os/@firmware=bios",
}
_IGNORED_LEAVES = {"address", "alias"}


@dataclass
class ImportedObject:
    address: str
    kind: str
    name: str  # libvirt name
    values: dict[str, Any]  # manifest values, in field-declaration order
    not_expressed: list[str] = field(default_factory=list)  # live XML paths no curated field covers
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportResult:
    output: Path
    objects: list[ImportedObject]
    outside_globs: bool = False  # the output file is not one of the project's manifest patterns


class ImportError_(VmformError):
    pass


def _quoted(value: str) -> Any:
    return _Quoted(value)


class _Quoted(str):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Quoted, lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", str(data), style='"'))


def _manifest_value(spec: FieldSpec, value: Any) -> Any:
    """A live (libvirt-terms) value in the form a manifest writes it."""
    if value is None:
        return None
    if isinstance(spec.type, Size):
        return format_size(value)
    if isinstance(spec.type, ListOf) and isinstance(spec.type.item, Obj):
        return [_obj_value(spec.type.item, item) for item in value]
    if isinstance(spec.type, Obj):
        return _obj_value(spec.type, value)
    if isinstance(value, str) and ":" in value:
        return _quoted(value)  # MACs, PCI addresses: YAML 1.1 would read some as numbers
    return value


def _obj_value(obj: Obj, value: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for spec in obj.fields:
        if value.get(spec.name) is not None:
            result[spec.name] = _manifest_value(spec, value[spec.name])
    return result


def _read_fields(kind: str, root: Element) -> dict[str, Any]:
    return {spec.name: spec.binding.read(root) for spec in KINDS[kind].fields if spec.binding is not None}


class _Refs:
    """Manifest names of declared or imported networks, pools and volumes, by libvirt identity."""

    def __init__(self, workspace: Workspace, imported: list[tuple[str, str, str]]) -> None:
        self.networks: dict[str, str] = {}
        self.volumes: dict[tuple[Any, str], str] = {}
        for resource in workspace.manifests.resources.values():
            kind = resource.kind.name
            if kind == "network":
                self.networks[resource.libvirt_name] = resource.key
            elif kind == "volume":
                self.volumes[(resource.desired.get("pool"), resource.libvirt_name)] = resource.key
        for kind, name, key in imported:
            if kind == "network":
                self.networks.setdefault(name, key)


def _domain_values(conn: libvirt.virConnect, dom: libvirt.virDomain, root: Element, refs: _Refs,
                   obj: ImportedObject) -> dict[str, Any]:
    live = _read_fields("domain", root)
    values: dict[str, Any] = {}
    for spec in KINDS["domain"].fields:
        try:
            _domain_field(conn, dom, root, refs, obj, spec, live.get(spec.name), values)
        except ImportError_ as exc:
            # Not expressible as the curated field: the xml: section carries this part of the document.
            values.pop(spec.name, None)
            obj.notes.append(f"{spec.name}: written in the xml: section ({exc.message.split(': ', 1)[-1]})")
    if root.find("devices/graphics") is not None and len(root.findall("devices/graphics")) > 1:
        values.pop("graphics", None)
        values.pop("video", None)
        obj.notes.append("graphics: more than one graphics device, written in the xml: section")
    return values


def _domain_field(conn: libvirt.virConnect, dom: libvirt.virDomain, root: Element, refs: _Refs, obj: ImportedObject,
                  spec: FieldSpec, value: Any, values: dict[str, Any]) -> None:
    name = spec.name
    if name == "description":
        if value:
            values[name] = value
    elif name == "disks":
        values[name] = [_disk_value(conn, disk, refs, obj) for disk in value or []]
    elif name == "interfaces":
        values[name] = [_interface_value(nic, refs, obj) for nic in value or []]
    elif name in ("rng", "guest_agent"):
        values[name] = bool(value)  # false: the domain has none, and the default must not add one
    elif name == "tpm":
        if value is not None or root.find("devices/tpm") is None:
            values[name] = value or "none"
    elif name == "state":
        values[name] = "running" if dom.isActive() else "stopped"
    elif name == "autostart":
        values[name] = bool(dom.autostart())
    elif name == "graphics":
        if value not in ("none", "vnc", "spice"):
            raise ImportError_(f"{obj.address}: graphics type '{value}' cannot be expressed (vnc, spice or none)")
        values[name] = value
    elif name == "xml":
        pass  # filled by _carry_rest once the curated fields are known
    elif value is not None:
        values[name] = _manifest_value(spec, value)


def _disk_value(conn: libvirt.virConnect, disk: dict[str, Any], refs: _Refs, obj: ImportedObject) -> dict[str, Any]:
    import libvirt

    entry: dict[str, Any] = {}
    target = disk.get("target")
    if disk.get("volume") is not None:
        key = refs.volumes.get((disk.get("pool"), disk["volume"]))
        if key is not None:
            entry["volume"] = key
        else:
            try:
                path = conn.storagePoolLookupByName(disk["pool"]).storageVolLookupByName(disk["volume"]).path()
            except libvirt.libvirtError as exc:
                raise ImportError_(f"{obj.address}: disk {target}: volume {disk['pool']}/{disk['volume']}: "
                                   f"{libvirt_message(exc)}") from None
            entry["path"] = path
            obj.notes.append(f"disk {target}: volume {disk['pool']}/{disk['volume']} is not declared in the manifests; "
                             "imported as its path (apply would switch the disk to type='file'); declare the volume "
                             "and write 'volume:' instead")
    elif disk.get("path") is not None:
        entry["path"] = disk["path"]
    device = disk.get("device", "disk")
    if device != "disk":
        entry["device"] = device
    if "volume" not in entry and "path" not in entry and device != "cdrom":
        raise ImportError_(f"{obj.address}: disk {target}: a {device} that is neither a volume nor a file cannot be "
                           "expressed (network or block source)")
    if disk.get("format") is not None and "volume" not in entry:
        entry["format"] = disk["format"]
    elif "path" in entry:
        raise ImportError_(f"{obj.address}: disk {target} has no driver format; vmform never lets qemu probe one "
                           "(add <driver type='raw|qcow2'/> first)")
    if disk.get("bus") not in DISK_BUSES:
        raise ImportError_(f"{obj.address}: disk {target}: bus '{disk.get('bus')}' cannot be expressed")
    entry["bus"] = disk["bus"]
    entry["target"] = target
    if bool(disk.get("readonly")) != (device == "cdrom"):
        entry["readonly"] = bool(disk.get("readonly"))
    if disk.get("shareable"):
        entry["shareable"] = True
    for key in ("cache", "serial", "wwn"):
        if disk.get(key) is not None:
            entry[key] = disk[key]
    return entry


def _interface_value(nic: dict[str, Any], refs: _Refs, obj: ImportedObject) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if nic.get("network") is not None:
        key = refs.networks.get(nic["network"])
        if key is None:
            raise ImportError_(
                f"{obj.address}: interface {nic.get('mac')} uses network '{nic['network']}', which is neither declared "
                f"in the manifests nor imported; import network.{nic['network']} as well"
            )
        entry["network"] = key
    elif nic.get("bridge") is not None:
        entry["bridge"] = nic["bridge"]
    else:
        raise ImportError_(f"{obj.address}: interface {nic.get('mac')} of type '{nic.get('type')}' cannot be expressed "
                           "(network or bridge)")
    entry["mac"] = _quoted(nic["mac"])
    model = nic.get("model")
    if model not in NIC_MODELS:
        raise ImportError_(f"{obj.address}: interface {nic.get('mac')}: model '{model}' cannot be expressed")
    entry["model"] = model
    return entry


def _generic_values(kind: str, root: Element, autostart: bool, active: bool = True) -> dict[str, Any]:
    live = _read_fields(kind, root)
    values: dict[str, Any] = {}
    for spec in KINDS[kind].fields:
        if spec.name == "autostart":
            values["autostart"] = autostart
        elif spec.name == "active":
            if not active:  # an inactive network stays inactive when it is made again from the manifest
                values["active"] = False
        elif live.get(spec.name) is not None and live.get(spec.name) != []:
            values[spec.name] = _manifest_value(spec, live[spec.name])
    return values


CARRIES_XML = ("domain", "network", "pool")  # kinds with an xml: section

# Parts of a document import never writes into a manifest, and why.
NOT_CARRIED = {
    "name": "the manifest key is the name",
    "uuid": "libvirt's identity of the object; vmform finds its objects by their owner record",
    "metadata": "vmform keeps its ownership record there",
}


def _carry_rest(item: ImportedObject, root: Element) -> None:
    """Put what the curated fields do not hold into item.values["xml"] (recomputed from scratch)."""
    from vmform.schema.extra_xml import overlap, owned_paths, regions

    item.values.pop("xml", None)
    if item.kind not in CARRIES_XML:
        return
    while True:
        data = _rest(item, root)
        # What is left of an element a curated field only partly says (a graphics device's listen address
        # beside its type) is a whole repeated element in the xml: section: the curated field yields to it.
        owned = owned_paths(data, item.kind) if data else []
        clashing = [spec for spec in _curated(item)
                    if any(overlap(path, region) for path in owned for region in regions(spec, item.kind))]
        if not clashing:
            break
        for spec in clashing:
            del item.values[spec.name]
            item.notes.append(f"{spec.name}: written in the xml: section (the rest of its element has no curated field)")
    if data:
        item.values["xml"] = data


def _curated(item: ImportedObject) -> list[FieldSpec]:
    """The curated fields an imported object writes that live in its XML."""
    return [spec for spec in KINDS[item.kind].fields
            if spec.name in item.values and spec.binding is not None and spec.xml and spec.name != "xml"]


def _rest(item: ImportedObject, root: Element) -> dict[str, Any]:
    """The generic data of the document without what the curated fields and vmform itself hold."""
    from vmform.schema import generic
    from vmform.schema.extra_xml import document_data, regions

    data = copy.deepcopy(document_data(root, item.kind) or {})
    note = f"metadata: not carried ({NOT_CARRIED['metadata']}); it stays on the host"
    if data.get("metadata") and note not in item.notes:
        item.notes.append(note)
    for key in NOT_CARRIED:
        data.pop(key, None)
    for spec in _curated(item):
        for region in regions(spec, item.kind):
            _remove(data, region)
    foreign = [str(where[-1]) for where in generic.foreign_namespaces(data)]
    if foreign:
        # The object already does it: carry it, and say so where the manifest opts in.
        _allow(item, ["foreign_xml"])
        note = (f"allow: [foreign_xml] written: the object uses XML outside libvirt's namespace "
                f"({', '.join(foreign)}), carried under xml:")
        if note not in item.notes:
            item.notes.append(note)
    return data


def _allow(item: ImportedObject, names: list[str]) -> None:
    from vmform.schema.kind import OPT_INS

    item.values["allow"] = sorted({*(item.values.get("allow") or []), *names}, key=OPT_INS.index)


def _default_emulator(conn: libvirt.virConnect, root: Element) -> str | None:
    """The emulator libvirt picks by itself for this domain's architecture and type (it writes it into every
    domain it defines): the same path in an imported domain is no choice of its own."""
    import libvirt

    os_type = root.find("os/type")
    try:
        caps = etree.fromstring(conn.getDomainCapabilities(None, os_type.get("arch") if os_type is not None else None,
                                                           None, root.get("type") or "kvm").encode(),
                                etree.XMLParser(resolve_entities=False, no_network=True))
    except (libvirt.libvirtError, etree.XMLSyntaxError):
        return None
    return caps.findtext("path")


def _opt_ins(conn: libvirt.virConnect, workspace: Workspace, found: list[tuple[str, str, Any, Element]],
             objects: list[ImportedObject]) -> None:
    """What an imported object already does that a manifest must opt in to (host paths, host devices, a custom
    emulator) is written as allow: with a note, so the manifest says it. libvirt's default emulator is dropped."""
    from vmform.schema.optins import DEFAULT_POOL_ROOTS, Scope, needed, scope_of

    roots = (*DEFAULT_POOL_ROOTS, *workspace.project.pool_roots)
    declared = scope_of(workspace.manifests.resources.values(), roots)
    directories = set(declared.directories)
    pools = set(declared.pools)
    for kind, name, _obj, root in found:
        if kind == "pool":
            pools.add(name)
            path = root.findtext("target/path")
            if path and path.startswith("/") and os.path.normpath(path) != "/":
                directories.add(os.path.normpath(path))
    scope = Scope(tuple(sorted(directories)), frozenset(pools), declared.volumes, roots)
    for (kind, _name, _obj, root), item in zip(found, objects, strict=True):
        if kind == "domain":
            emulator = root.find("devices/emulator")
            if emulator is not None and (emulator.text or "").strip() == _default_emulator(conn, root):
                emulator.getparent().remove(emulator)
        names = needed(kind, root, scope)
        pool_path = root.findtext("target/path") if kind == "pool" else None
        if pool_path and not scope.in_roots(pool_path):
            names = sorted({*names, "host_paths"})  # a pool outside the pool roots
        if names:
            _allow(item, names)
            item.notes.append(f"allow: [{', '.join(names)}] written: the object already uses what vmform refuses "
                              "without it (see docs/SECURITY.md)")


def _yield_fields(item: ImportedObject, root: Element) -> bool:
    """Drop the curated fields whose part of the document they cannot fully say; True when any was dropped."""
    from vmform.schema.extra_xml import overlap, regions

    dropped = []
    for spec in KINDS[item.kind].fields:
        if spec.name not in item.values or spec.binding is None or not spec.xml or spec.name == "xml":
            continue
        spec_regions = regions(spec, item.kind)
        lost = [path for path in item.not_expressed
                if any(overlap(tuple(path.split("/")), region) for region in spec_regions)]
        if lost:
            del item.values[spec.name]
            dropped.append(spec.name)
            item.notes.append(f"{spec.name}: written in the xml: section ({', '.join(lost)} has no curated field)")
    if dropped:
        _carry_rest(item, root)
    return bool(dropped)


def _remove(node: Any, steps: tuple[str, ...]) -> None:
    """Remove the part of generic data a region names (in every item of the lists on the way)."""
    if isinstance(node, list):
        for entry in node:
            _remove(entry, steps)
        return
    if not steps or not isinstance(node, dict):
        return
    step, rest = steps[0], steps[1:]
    keys = [step, step[1:]] if step.startswith("@") else [step]
    for key in keys:
        if key not in node:
            continue
        child = node[key]
        if not rest or (rest == ("_text",) and isinstance(child, str)):
            del node[key]
            continue
        had = _content(child)
        _remove(child, rest)
        if had and not _content(child):
            del node[key]  # emptied by the removal, not an empty element to begin with


def _content(value: Any) -> bool:
    """Whether generic data holds anything but empty elements."""
    if isinstance(value, list):
        return any(_content(entry) for entry in value)
    return bool(value)


def _facts(root: Element) -> Counter[str]:
    """Every element (``devices/disk``), attribute value (``devices/disk/@type=file``) and text
    (``on_crash=restart``) of a document, counted: a lost floppy drive is one ``devices/disk`` fewer."""
    found: Counter[str] = Counter()

    def walk(node: Element, prefix: str) -> None:
        for child in node:
            if not isinstance(child.tag, str):
                continue
            path = f"{prefix}{etree.QName(child).localname}"
            found[path] += 1
            for name, value in child.attrib.items():
                found[f"{path}/@{etree.QName(name).localname}={value}"] += 1
            if child.text and child.text.strip():
                found[f"{path}={child.text.strip()}"] += 1
            walk(child, path + "/")

    walk(root, "")
    for name, value in root.attrib.items():
        found[f"@{name}={value}"] += 1
    return found


def _ignored(fact: str) -> bool:
    path = fact.split("=", 1)[0]
    if any(part in _IGNORED_LEAVES for part in path.split("/")):
        return True
    if fact in _IGNORED_VALUES:
        return True
    return any(path == ignored or path.startswith(ignored + "/") for ignored in _IGNORED_PATHS)


def not_expressed(live_root: Element, rendered_root: Element) -> list[str]:
    """Paths of what the live XML holds and the XML vmform renders from the imported values does not
    (values compared, elements counted), without what libvirt fills in by itself."""
    lost = _facts(live_root) - _facts(rendered_root)
    missing = sorted({fact.split("=", 1)[0] for fact in lost if not _ignored(fact)})
    # Report an element once, not each of its attributes and children as well.
    return [p for p in missing if not any(p.startswith(other + "/") for other in missing if other != p)]


def _lookup(conn: libvirt.virConnect, kind: str, name: str) -> Any:
    import libvirt

    try:
        if kind == "domain":
            return conn.lookupByName(name)
        if kind == "network":
            return conn.networkLookupByName(name)
        return conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        return None


def _all_ledgers(conn: libvirt.virConnect) -> list[Ledger]:
    ledgers = []
    for secret in conn.listAllSecrets():
        usage = secret.usageID() or ""
        if usage.startswith("vmform/") and usage.endswith("/ledger"):
            ledgers.append(Ledger.load(conn, usage[len("vmform/"):-len("/ledger")]))
    return ledgers


def _owner_of(conn: libvirt.virConnect, kind: str, obj: Any, root: Element) -> tuple[str, str] | None:
    if kind in ("domain", "network"):
        return read_owner(root)
    for ledger in _all_ledgers(conn):
        address = ledger.pool_address(obj.name(), obj.UUIDString())
        if address is not None:
            return ledger.project, address
    return None


def _xml(kind: str, obj: Any) -> Element:
    import libvirt

    flag = {"domain": libvirt.VIR_DOMAIN_XML_INACTIVE, "network": libvirt.VIR_NETWORK_XML_INACTIVE,
            "pool": libvirt.VIR_STORAGE_XML_INACTIVE}[kind]
    return parse_xml(obj.XMLDesc(flag))


def _select(conn: libvirt.virConnect, addresses: list[str], take_all: bool, pattern: str) -> list[tuple[str, str]]:
    chosen: list[tuple[str, str]] = []
    for address in addresses:
        kind, _, name = address.partition(".")
        if kind not in IMPORTABLE or not name:
            raise ImportError_(f"'{address}' is not an address like domain.NAME, network.NAME or pool.NAME")
        if (kind, name) not in chosen:
            chosen.append((kind, name))
    if take_all:
        listing = {"domain": conn.listAllDomains, "network": conn.listAllNetworks, "pool": conn.listAllStoragePools}
        for kind in IMPORTABLE:
            for obj in listing[kind]():
                name = obj.name()
                if not fnmatch.fnmatchcase(name, pattern) or (kind, name) in chosen:
                    continue
                if _owner_of(conn, kind, obj, _xml(kind, obj)) is None:
                    chosen.append((kind, name))
    return chosen


def import_objects(workspace: Workspace, conn: libvirt.virConnect, addresses: list[str], take_all: bool = False,
                   pattern: str = "*", output: Path | None = None, force: bool = False) -> ImportResult:
    """Write manifests for unmanaged objects and mark them owned by the workspace's project."""
    import libvirt

    from vmform.journal import JOURNAL, guard
    from vmform.render.xml import render_resource

    project = workspace.project.name
    JOURNAL.project = project
    conn = guard(conn, workspace.project.default_host)  # its writes are journaled (category import)
    out = Path(output) if output is not None else workspace.project.root / "imported.yaml"
    if not out.is_absolute():
        out = Path.cwd() / out
    if out.exists() and not force:
        raise ImportError_(f"{out} exists; choose another file with -o or pass --force to overwrite it")
    try:
        chosen = _select(conn, addresses, take_all, pattern)
    except libvirt.libvirtError as exc:
        raise ImportError_(f"cannot list the host's objects: {libvirt_message(exc)}") from None
    if not chosen:
        raise ImportError_("nothing to import" + (f" (no unmanaged object matches '{pattern}')" if take_all else ""))

    # Look everything up and refuse early: missing objects, owned objects, names a manifest already uses.
    found: list[tuple[str, str, Any, Element]] = []
    for kind, name in chosen:
        obj = _lookup(conn, kind, name)
        if obj is None:
            raise ImportError_(f"{kind}.{name}: no {kind} named '{name}' on {conn.getURI()}")
        root = _xml(kind, obj)
        owner = _owner_of(conn, kind, obj, root)
        if owner is not None:
            if owner[0] == project:
                raise ImportError_(f"{kind}.{name}: already owned by this project (as {owner[1]})")
            raise ImportError_(f"{kind}.{name}: owned by vmform project '{owner[0]}'; vmform will not adopt it")
        try:
            NAME.parse(name)
        except FieldError as exc:
            raise ImportError_(f"{kind}.{name}: the name {exc.message}") from None
        address = f"{kind}.{name}"
        if address in workspace.manifests.resources:
            raise ImportError_(f"{address} is already declared in the manifests")
        for resource in workspace.manifests.resources.values():
            if resource.kind.name == kind and resource.libvirt_name == name:
                raise ImportError_(f"{address}: {resource.address} already declares a {kind} named '{name}'")
        found.append((kind, name, obj, root))

    refs = _Refs(workspace, [(kind, name, name) for kind, name, _, _ in found])
    objects: list[ImportedObject] = []
    for kind, name, obj, root in found:
        item = ImportedObject(f"{kind}.{name}", kind, name, {})
        if kind == "domain":
            item.values = _domain_values(conn, obj, root, refs, item)
        else:
            item.values = _generic_values(kind, root, bool(obj.autostart()), bool(obj.isActive()))
        objects.append(item)

    # Everything no curated field holds goes into the xml: section. Check the YAML loads with the declared
    # manifests and render it: a part of the document that still goes missing sits inside a curated field
    # that cannot say it (a disk's discard mode, ...): that field then yields its part to the xml: section.
    _opt_ins(conn, workspace, found, objects)
    roots = {f"{kind}.{name}": root for kind, name, _, root in found}
    for item in objects:
        _carry_rest(item, roots[item.address])
    for _attempt in range(len(KINDS["domain"].fields)):
        text = render_yaml(objects, project)
        manifests = _load_with(workspace, text, out)
        yielded = False
        for item in objects:
            resource = manifests.resources[item.address]
            rendered = render_resource(item.kind, item.name, resource.desired, project, item.address)
            item.not_expressed = not_expressed(roots[item.address], rendered)
            if item.kind in CARRIES_XML and item.not_expressed:
                yielded |= _yield_fields(item, roots[item.address])
        if not yielded:
            break
    text = render_yaml(objects, project)  # its header lists what the final manifests do not carry
    # What the imported manifests state is what vmform adopted: its last-applied record, so that a line removed
    # from them later is removed from the host. From the manifests loaded last (the final text, unless the loop
    # ran out of attempts: then a record lists less, and less is ever removed).
    records = {item.address: record_for(item.kind, manifests.resources[item.address].desired) for item in objects}

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    _mark(conn, project, found, objects, records)
    globs = [str(workspace.project.root / p) for p in workspace.project.manifest_patterns]
    outside = not any(fnmatch.fnmatch(str(out), g) for g in globs)
    return ImportResult(out, objects, outside)


def _load_with(workspace: Workspace, text: str, out: Path) -> Any:
    import tempfile

    from vmform.errors import ManifestErrors
    from vmform.manifest.loader import load_manifests

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / out.name
        path.write_text(text, encoding="utf-8")
        try:
            return load_manifests(workspace.project.name, [*workspace.project.manifest_files(), path],
                                  workspace.project.root, workspace.project.settings)
        except ManifestErrors as exc:
            # Positions name the file being written, never the temporary copy it was checked in.
            shown = os.path.relpath(path, workspace.project.root)
            problems = "; ".join(_named(str(e).replace(shown, str(out)), e, shown, text) for e in exc.errors)
            raise ImportError_(f"the imported manifests would not load (nothing was written or marked): {problems}") from None


def _named(message: str, error: Any, shown: str, text: str) -> str:
    """An error in the written manifest, prefixed with the object it is about (``domain.NAME: …``)."""
    from vmform.schema.registry import SECTIONS

    position = getattr(error, "position", None)
    if position is None or position.file != shown:
        return message
    lines = text.splitlines()[:position.line]
    name = next((line.strip().rstrip(":") for line in reversed(lines) if line.startswith("  ") and not
                 line.startswith("   ") and line.rstrip().endswith(":")), None)
    section = next((line.rstrip().rstrip(":") for line in reversed(lines) if line and not line[0].isspace()
                    and not line.startswith("#")), None)
    kind = SECTIONS.get(section or "")
    return f"{kind.name}.{name}: {message}" if kind is not None and name else message


# Jinja's openings: text read from the host that holds one is written so that it loads back verbatim.
_EXPRESSION_OPENING = re.compile(r"\{[{%#]")


def literal_text(value: Any) -> Any:
    """A value as the loader must read it back: every ``{{``, ``{%`` and ``{#`` in text written as the
    expression ``{{ '{{' }}`` (docs/MANIFEST.md, *Expressions*), in nested values too."""
    if isinstance(value, str) and _EXPRESSION_OPENING.search(value):
        escaped = _EXPRESSION_OPENING.sub(lambda match: "{{ '" + match.group(0) + "' }}", value)
        return _Quoted(escaped) if isinstance(value, _Quoted) else escaped
    if isinstance(value, dict):
        return {key: literal_text(item) for key, item in value.items()}  # keys are never evaluated
    if isinstance(value, list):
        return [literal_text(item) for item in value]
    return value


def render_yaml(objects: list[ImportedObject], project: str) -> str:
    sections: dict[str, dict[str, Any]] = {}
    for kind in IMPORTABLE:
        for item in objects:
            if item.kind == kind:
                sections.setdefault(KINDS[kind].section, {})[item.name] = literal_text(item.values)
    header = [
        f"# Imported by `vmform import` into project {project}: these objects are now owned by it.",
        "# Curated fields first; whatever no curated field says is under xml:, one-to-one with libvirt's XML.",
    ]
    for item in objects:
        if item.not_expressed:
            header.append(f"# {item.address}: not carried: {', '.join(item.not_expressed)}")
    body = yaml.dump(sections, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    return "\n".join(header) + "\n" + body


def _mark(conn: libvirt.virConnect, project: str, found: list[tuple[str, str, Any, Element]],
          objects: list[ImportedObject], records: dict[str, AppliedRecord]) -> None:
    import libvirt

    from vmform.journal import serving

    # Adoption writes ownership outside any plan (issue 21 makes it a planned change): the journal allows
    # exactly these writes, as category "import".
    with ProjectLock(conn, project, "import"), serving(None, "import"):
        ledger: Ledger | None = None
        for (kind, name, obj, _root), item in zip(found, objects, strict=True):
            try:
                if kind == "domain":
                    # libvirt puts the element into the namespace itself: give it without one.
                    # (its children keep the namespace they are given: the last-applied record)
                    owner_node = etree.Element("owner", project=project, address=item.address)
                    owner_node.append(applied_element(records[item.address]))
                    owner = etree.tostring(owner_node, encoding="unicode")
                    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
                    if obj.isActive():
                        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
                    obj.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, owner, "vmform", NAMESPACE, flags)
                elif kind == "network":
                    root = _xml("network", obj)
                    set_owner(root, project, item.address)
                    write_record(root, records[item.address])
                    conn.networkDefineXML(etree.tostring(root, encoding="unicode"))
                else:
                    if ledger is None:
                        ledger = Ledger.load(conn, project)
                    ledger.record("pool", item.address, {"name": name, "uuid": obj.UUIDString(),
                                                         "applied": records[item.address].to_entry()})
                    ledger.save(conn)
            except libvirt.libvirtError as exc:
                raise ImportError_(f"{item.address}: cannot mark it as owned: {libvirt_message(exc)} (the objects "
                                   "before it in the file are owned; remove this one from the file)") from None
