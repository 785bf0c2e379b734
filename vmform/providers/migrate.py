"""Moving a domain to another host of the project (Action.MIGRATE).

The volumes that move with it were created on the destination first (their own create changes, which the
migration waits for). A running domain is live-migrated, managed by vmform over its two connections (the
source daemon needs no credentials for the destination), natively with its writable disks copied by QEMU
(VIR_MIGRATE_NON_SHARED_DISK); the
domain keeps running on the source if anything fails. A stopped domain's writable volumes are copied through
the storage API, then it is defined on the destination and undefined on the source. Either way the domain's
disks and interfaces are re-pointed at what the manifests give it on the new host: its volumes there, and
each interface's network by that host's libvirt name (a network may be named differently on each host). The
old copies of its volumes and seed are deleted by delete changes of their own on the old host, which wait
for this one: the migration itself deletes nothing.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from lxml import etree

from vmform.errors import HostError
from vmform.live import parse_xml
from vmform.render.xml import to_text

if TYPE_CHECKING:
    import libvirt

    from vmform.plan import Change
    from vmform.providers.base import ApplyContext

CHUNK = 4 * 1024 * 1024


def migrate(dest: ApplyContext, source: ApplyContext, change: Change, migration_uri: str | None) -> None:
    import libvirt

    src_conn, dst_conn = source.connections.get(), dest.connections.get()
    identity = change.identity
    try:
        dom = src_conn.lookupByUUIDString(identity["uuid"])
    except libvirt.libvirtError as exc:
        raise HostError(f"{change.address} is not on host {identity['from_host']} any more: "
                        f"{exc.get_error_message()}") from None
    disks = _disk_map(src_conn, dst_conn, dom, change)
    interfaces = {nic["mac"]: nic for nic in (change.after or {}).get("interfaces") or [] if nic.get("mac")}
    persistent = _retarget(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_MIGRATABLE), disks,
                           interfaces)
    if dom.isActive():
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: _retarget(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), disks,
                                                          interfaces),
            libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: persistent,
        }
        if migration_uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = migration_uri
            address = urlparse(migration_uri).hostname
            if address:
                params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = address
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        if any(disk["copy"] for disk in disks.values()):
            # The whole disk: libvirt 9 refuses an incremental copy into volumes made beforehand (an overlay
            # gets its base's blocks too, still reading correctly on the base the new host has).
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
        dom.migrate3(dst_conn, params, flags)
    else:
        for disk in disks.values():
            if disk["copy"]:
                _copy_volume(source, dest, disk)
        dst_conn.defineXML(persistent)
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                          | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    moved = dst_conn.lookupByUUIDString(identity["uuid"])
    moved.setAutostart(1 if (change.after or {}).get("autostart") else 0)


def _disk_map(src_conn: libvirt.virConnect, dst_conn: libvirt.virConnect, dom: libvirt.virDomain,
              change: Change) -> dict[str, dict[str, Any]]:
    """By target (vda, hdc): the disk's source on the old host and the volume it becomes on the new one
    (from the plan's "after", the domain as the manifests put it on the new host)."""
    wanted = {d["target"]: d for d in (change.after or {}).get("disks") or [] if d.get("volume")}
    result: dict[str, dict[str, Any]] = {}
    for node in parse_xml(dom.XMLDesc(0)).findall("devices/disk"):
        target, source = node.find("target"), node.find("source")
        if target is None or source is None or target.get("dev") not in wanted:
            continue
        desired = wanted[str(target.get("dev"))]
        dst_volume = dst_conn.storagePoolLookupByName(desired["pool"]).storageVolLookupByName(desired["volume"])
        if node.get("type") == "volume":
            src_volume = src_conn.storagePoolLookupByName(source.get("pool")).storageVolLookupByName(source.get("volume"))
        else:
            src_volume = src_conn.storageVolLookupByPath(source.get("file") or source.get("dev"))
        readonly = node.find("readonly") is not None or node.find("shareable") is not None
        result[str(target.get("dev"))] = {"pool": desired["pool"], "volume": desired["volume"],
                                          "path": dst_volume.path(), "source": src_volume, "target": dst_volume,
                                          "copy": not readonly}
    return result


def _retarget(xml: str, disks: dict[str, dict[str, Any]], interfaces: dict[str, dict[str, Any]]) -> str:
    """The domain's XML with each moving disk pointing at its volume on the new host, and each interface (by
    MAC) at the network or bridge the manifests give it there."""
    root = parse_xml(xml)
    for node in root.findall("devices/interface"):
        mac = node.find("mac")
        nic = interfaces.get(str(mac.get("address")).lower()) if mac is not None else None
        if nic is None:
            continue
        old_source = node.find("source")
        fresh = etree.Element("source")
        if nic.get("network") is not None:
            node.set("type", "network")
            fresh.set("network", nic["network"])
        elif nic.get("bridge") is not None:
            node.set("type", "bridge")
            fresh.set("bridge", nic["bridge"])
        else:
            continue
        if old_source is None:
            mac.addnext(fresh)  # type: ignore[union-attr]
        else:
            # The old host's port and bridge go with the old network (a live XML names both).
            node.replace(old_source, fresh)
        for stale in node.findall("target"):  # the old host's tap device name
            node.remove(stale)
    for node in root.findall("devices/disk"):
        target = node.find("target")
        disk = disks.get(str(target.get("dev"))) if target is not None else None
        if disk is None:
            continue
        source = node.find("source")
        kept = {k: v for k, v in source.attrib.items() if k not in ("pool", "volume", "file", "dev")}
        fresh = copy.deepcopy(source)
        fresh.attrib.clear()
        fresh.attrib.update({"pool": disk["pool"], "volume": disk["volume"], **kept})
        node.set("type", "volume")
        node.replace(source, fresh)
    return to_text(root)


def _copy_volume(source: ApplyContext, dest: ApplyContext, disk: dict[str, Any]) -> None:
    """A stopped domain's volume, byte for byte through two storage streams (remote hosts too)."""
    src_stream = source.connections.get().newStream(0)
    dst_stream = dest.connections.get().newStream(0)
    with source.pool_locks[disk["source"].storagePoolLookupByVolume().name()], dest.pool_locks[disk["pool"]]:
        disk["source"].download(src_stream, 0, 0, 0)
        disk["target"].upload(dst_stream, 0, 0, 0)
        try:
            while True:
                data = src_stream.recv(CHUNK)
                if data == -2:  # noqa: PLR2004 - libvirt's "would block"
                    continue
                if not data:
                    break
                _send(dst_stream, data)
            src_stream.finish()
            dst_stream.finish()
        except BaseException:
            for stream in (src_stream, dst_stream):
                try:
                    stream.abort()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
            raise


def _send(stream: libvirt.virStream, data: bytes) -> None:
    sent = 0
    while sent < len(data):
        count = stream.send(data[sent:])
        if count == -2:  # noqa: PLR2004 - would block
            continue
        sent += count
