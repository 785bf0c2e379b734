"""Domain (VM) fields."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from lxml import etree

from vmform.schema.kind import Kind
from vmform.schema.types import (
    Bool,
    Effect,
    Enum,
    FieldSpec,
    Int,
    ListOf,
    Mac,
    Obj,
    Ref,
    Size,
    Str,
)
from vmform.schema.xmlbind import Attr, Element, SizeText, Text, XmlBinding, ensure
from vmform.units import format_size

DISK_BUSES = ("virtio", "sata", "scsi", "ide", "usb")
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3")
BOOT_DEVICES = ("hd", "cdrom", "network", "fd")
_DEV_PREFIX = {"virtio": "vd", "sata": "sd", "scsi": "sd", "usb": "sd", "ide": "hd"}


def _device_names(prefix: str) -> Iterator[str]:
    """vda … vdz, vdaa … vdzz: the names the kernel gives disks, in order."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for first in letters:
        yield prefix + first
    for first in letters:
        for second in letters:
            yield prefix + first + second


def _vcpu_read_current(root: Element) -> Any:
    node = root.find("vcpu")
    if node is None or node.text is None:
        return None
    return int(node.get("current") or node.text)


def _vcpu_read_max(root: Element) -> Any:
    node = root.find("vcpu")
    return None if node is None or node.text is None else int(node.text)


class VcpuCurrent(XmlBinding):
    def read(self, root: Element) -> Any:
        return _vcpu_read_current(root)

    def write(self, root: Element, value: Any) -> None:
        node = ensure(root, "vcpu")
        maximum = int(node.text) if node.text else value
        node.set("placement", node.get("placement") or "static")
        if value == maximum:
            node.attrib.pop("current", None)
        else:
            node.set("current", str(value))


class VcpuMax(XmlBinding):
    def read(self, root: Element) -> Any:
        return _vcpu_read_max(root)

    def write(self, root: Element, value: Any) -> None:
        node = ensure(root, "vcpu")
        current = node.get("current") or node.text
        node.text = str(value)
        if current is not None and int(current) != value:
            node.set("current", current)
        else:
            node.attrib.pop("current", None)


class BootDevices(XmlBinding):
    def read(self, root: Element) -> Any:
        return [node.get("dev") for node in root.findall("os/boot")]

    def write(self, root: Element, value: Any) -> None:
        os_node = ensure(root, "os")
        for node in os_node.findall("boot"):
            os_node.remove(node)
        for dev in value:
            etree.SubElement(os_node, "boot", dev=dev)


def _disk_from_xml(node: Element) -> dict[str, Any]:
    source = node.find("source")
    target = node.find("target")
    driver = node.find("driver")
    disk: dict[str, Any] = {}
    if node.get("type") == "volume" and source is not None:
        disk["pool"] = source.get("pool")
        disk["volume"] = source.get("volume")
    elif source is not None and source.get("file") is not None:
        disk["path"] = source.get("file")
    elif source is not None and source.get("dev") is not None:
        disk["path"] = source.get("dev")
    disk["format"] = driver.get("type") if driver is not None else None
    disk["target"] = target.get("dev") if target is not None else None
    disk["bus"] = target.get("bus") if target is not None else None
    disk["readonly"] = node.find("readonly") is not None
    return disk


def disk_element(disk: dict[str, Any]) -> Element:
    """The <disk> element for a desired disk (also what live attach sends)."""
    node = etree.Element("disk", type="volume", device="disk")
    etree.SubElement(node, "driver", name="qemu", type=disk["format"])
    etree.SubElement(node, "source", pool=disk["pool"], volume=disk["volume"])
    etree.SubElement(node, "target", dev=disk["target"], bus=disk["bus"])
    if disk.get("readonly"):
        etree.SubElement(node, "readonly")
    return node


def _update_disk(node: Element, disk: dict[str, Any]) -> None:
    """Rewrite a live <disk> to the desired one, keeping what libvirt added (address, alias, ...)."""
    fresh = disk_element(disk)
    node.set("type", "volume")
    for tag in ("driver", "source", "target"):
        old = node.find(tag)
        new = fresh.find(tag)
        assert new is not None
        if old is None:
            node.append(new)
        else:
            for attr in ("type", "pool", "volume", "dev", "bus", "file", "name"):
                old.attrib.pop(attr, None)
            for attr, value in new.attrib.items():
                old.set(attr, value)
    readonly = node.find("readonly")
    if disk.get("readonly") and readonly is None:
        etree.SubElement(node, "readonly")
    elif not disk.get("readonly") and readonly is not None:
        node.remove(readonly)


class DiskList(XmlBinding):
    """All <disk device='disk'> of a domain, matched by target device."""

    def read(self, root: Element) -> Any:
        return [_disk_from_xml(node) for node in root.findall("devices/disk[@device='disk']")]

    def write(self, root: Element, value: Any) -> None:
        devices = ensure(root, "devices")
        existing = {
            (node.find("target").get("dev") if node.find("target") is not None else None): node  # type: ignore[union-attr]
            for node in devices.findall("disk[@device='disk']")
        }
        wanted = {disk["target"] for disk in value}
        for target, node in existing.items():
            if target not in wanted:
                devices.remove(node)
        for disk in value:
            node = existing.get(disk["target"])
            if node is not None:
                _update_disk(node, disk)
            else:
                _insert_device(devices, disk_element(disk))


def interface_element(nic: dict[str, Any]) -> Element:
    if nic.get("network") is not None:
        node = etree.Element("interface", type="network")
        etree.SubElement(node, "mac", address=nic["mac"])
        etree.SubElement(node, "source", network=nic["network"])
    else:
        node = etree.Element("interface", type="bridge")
        etree.SubElement(node, "mac", address=nic["mac"])
        etree.SubElement(node, "source", bridge=nic["bridge"])
    etree.SubElement(node, "model", type=nic["model"])
    return node


def _interface_from_xml(node: Element) -> dict[str, Any]:
    source = node.find("source")
    mac = node.find("mac")
    model = node.find("model")
    nic: dict[str, Any] = {"mac": mac.get("address") if mac is not None else None}
    kind = node.get("type")
    if kind == "network":
        nic["network"] = source.get("network") if source is not None else None
    elif kind == "bridge":
        nic["bridge"] = source.get("bridge") if source is not None else None
    else:
        nic["type"] = kind
    nic["model"] = model.get("type") if model is not None else None
    return nic


def _insert_device(devices: Element, node: Element) -> None:
    """Append a device after the last of its tag, so libvirt's device order (and PCI slots) stays stable."""
    same = devices.findall(node.tag)
    if same:
        same[-1].addnext(node)
    else:
        devices.append(node)


class InterfaceList(XmlBinding):
    """All <interface> of a domain, matched by MAC address."""

    def read(self, root: Element) -> Any:
        return [_interface_from_xml(node) for node in root.findall("devices/interface")]

    def write(self, root: Element, value: Any) -> None:
        devices = ensure(root, "devices")
        existing: dict[str | None, Element] = {}
        for node in devices.findall("interface"):
            mac = node.find("mac")
            existing[mac.get("address") if mac is not None else None] = node
        wanted = {nic["mac"] for nic in value}
        for mac, node in existing.items():
            if mac not in wanted:
                devices.remove(node)
        for nic in value:
            node = existing.get(nic["mac"])
            fresh = interface_element(nic)
            if node is None:
                _insert_device(devices, fresh)
                continue
            node.set("type", fresh.get("type"))  # type: ignore[arg-type]
            for tag in ("source", "model"):
                old, new = node.find(tag), fresh.find(tag)
                assert new is not None
                if old is None:
                    node.append(new)
                else:
                    old.attrib.clear()
                    old.attrib.update(new.attrib)


class Graphics(XmlBinding):
    def read(self, root: Element) -> Any:
        node = root.find("devices/graphics")
        return "none" if node is None else node.get("type")

    def write(self, root: Element, value: Any) -> None:
        devices = ensure(root, "devices")
        for node in devices.findall("graphics"):
            devices.remove(node)
        if value != "none":
            node = etree.SubElement(devices, "graphics", type=value, autoport="yes", listen="127.0.0.1")
            etree.SubElement(node, "listen", type="address", address="127.0.0.1")
            if devices.find("video") is None:
                video = etree.SubElement(devices, "video")
                etree.SubElement(video, "model", type="virtio" if value == "vnc" else "qxl")


class SerialConsole(XmlBinding):
    def read(self, root: Element) -> Any:
        return root.find("devices/serial") is not None

    def write(self, root: Element, value: Any) -> None:
        devices = ensure(root, "devices")
        has = devices.find("serial") is not None
        if value and not has:
            serial = etree.SubElement(devices, "serial", type="pty")
            etree.SubElement(serial, "target", port="0")
            console = etree.SubElement(devices, "console", type="pty")
            etree.SubElement(console, "target", type="serial", port="0")
        elif not value and has:
            for tag in ("serial", "console"):
                for node in devices.findall(tag):
                    devices.remove(node)


DISK = Obj(
    (
        FieldSpec("volume", Ref("volume"), "the volume attached as this disk", required=True),
        FieldSpec("bus", Enum(DISK_BUSES), "disk bus", default="virtio"),
        FieldSpec("target", Str(pattern=r"(vd|sd|hd|xvd)[a-z]{1,2}", hint="e.g. vda, sdb"), "guest device name (default: next free for the bus)"),
        FieldSpec("readonly", Bool(), "attach read-only", default=False),
    ),
    shorthand="volume",
)

INTERFACE = Obj(
    (
        FieldSpec("network", Ref("network"), "vmform network to plug into"),
        FieldSpec("bridge", Str(pattern=r"[A-Za-z0-9_.-]{1,15}", hint="a host bridge name, at most 15 characters"), "existing host bridge to plug into"),
        FieldSpec("mac", Mac(), "MAC address (default: derived from project and address, stable across rebuilds)"),
        FieldSpec("model", Enum(NIC_MODELS), "NIC model", default="virtio"),
    ),
    shorthand="network",
)

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("description", Str(), "free text shown by virsh", effect=Effect.LIVE, xml="description", default="",
              binding=Text("description")),
    FieldSpec("type", Enum(("kvm", "qemu")), "hypervisor: kvm (hardware) or qemu (TCG emulation)", xml="domain/@type",
              default="kvm", binding=Attr(".", "type")),
    FieldSpec("arch", Enum(("x86_64", "i686", "aarch64", "ppc64le", "s390x", "riscv64")),
              "guest architecture (default: the host's)", xml="os/type/@arch", binding=Attr("os/type", "arch")),
    FieldSpec("machine", Str(pattern=r"[A-Za-z0-9_.-]+"), "machine type, e.g. q35 or pc (default: libvirt's)",
              xml="os/type/@machine", binding=Attr("os/type", "machine")),
    FieldSpec("vcpus", Int(1, 4096), "virtual CPUs online", effect=Effect.LIVE, xml="vcpu/@current", default=1,
              effect_doc="live up to max_vcpus, else restart", binding=VcpuCurrent()),
    FieldSpec("max_vcpus", Int(1, 4096), "virtual CPUs the domain can grow to live (default: vcpus)", xml="vcpu",
              binding=VcpuMax()),
    FieldSpec("memory", Size(minimum=16 * 1024**2, multiple=1024), "memory (balloon target)", effect=Effect.LIVE, xml="currentMemory",
              default=512 * 1024**2, effect_doc="live up to max_memory, else restart", binding=SizeText("currentMemory")),
    FieldSpec("max_memory", Size(minimum=16 * 1024**2, multiple=1024), "memory the domain can balloon up to live (default: memory)",
              xml="memory", binding=SizeText("memory")),
    FieldSpec("boot", ListOf(Enum(BOOT_DEVICES), max_items=4), "boot device order", xml="os/boot/@dev", default=["hd"],
              binding=BootDevices()),
    FieldSpec("disks", ListOf(DISK), "disks, each a volume", effect=Effect.LIVE, xml="devices/disk[@device='disk']",
              default=[], effect_doc="adding/removing a disk is live; changing one restarts", binding=DiskList()),
    FieldSpec("interfaces", ListOf(INTERFACE), "network interfaces", effect=Effect.LIVE, xml="devices/interface",
              default=[], effect_doc="adding/removing an interface is live; changing one restarts", binding=InterfaceList()),
    FieldSpec("graphics", Enum(("none", "vnc", "spice")), "graphical console (listens on 127.0.0.1)",
              xml="devices/graphics/@type", default="none", binding=Graphics()),
    FieldSpec("serial_console", Bool(), "a serial port and console on a pty", xml="devices/serial", default=True,
              binding=SerialConsole()),
    FieldSpec("state", Enum(("running", "stopped")), "whether the domain runs", effect=Effect.LIVE, default="running"),
    FieldSpec("autostart", Bool(), "start with the host", effect=Effect.LIVE, default=False),
)


def stable_mac(project: str, address: str, index: int) -> str:
    """A MAC in QEMU's 52:54:00 range derived from project and interface address, so rebuilds keep it."""
    digest = hashlib.sha256(f"{project}/{address}/interfaces[{index}]".encode()).digest()
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in digest[:3])


def bind(resource: Any, index: Any) -> dict[str, Any]:
    values = dict(resource.values)
    desired: dict[str, Any] = {}
    for spec in FIELDS:
        if spec.name in values:
            desired[spec.name] = values[spec.name]
    desired.setdefault("max_vcpus", desired["vcpus"])
    desired.setdefault("max_memory", desired["memory"])
    used: set[str] = set()
    for disk in desired["disks"]:
        if disk.get("target"):
            used.add(disk["target"])
    disks = []
    for disk in desired["disks"]:
        volume = index.get("volume", disk["volume"])
        pool = index.get("pool", volume.values["pool"]) if volume is not None else None
        target = disk.get("target")
        if not target:
            prefix = _DEV_PREFIX[disk["bus"]]
            target = next(name for name in _device_names(prefix) if name not in used)
            used.add(target)
        disks.append({
            "pool": pool.libvirt_name if pool is not None else None,
            "volume": volume.libvirt_name if volume is not None else disk["volume"],
            "format": volume.values.get("format", "qcow2") if volume is not None else "qcow2",
            "target": target,
            "bus": disk["bus"],
            "readonly": disk["readonly"],
        })
    desired["disks"] = disks
    nics = []
    for number, nic in enumerate(desired["interfaces"]):
        entry: dict[str, Any] = {"mac": nic.get("mac") or stable_mac(index.project, resource.address, number)}
        if nic.get("network") is not None:
            network = index.get("network", nic["network"])
            entry["network"] = network.libvirt_name if network is not None else nic["network"]
        else:
            entry["bridge"] = nic["bridge"]
        entry["model"] = nic["model"]
        nics.append(entry)
    desired["interfaces"] = nics
    return desired


def check(values: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if "max_vcpus" in values and values.get("vcpus", 1) > values["max_vcpus"]:
        yield ("vcpus",), f"vcpus ({values['vcpus']}) is more than max_vcpus ({values['max_vcpus']})"
    if "max_memory" in values and values.get("memory", 0) > values["max_memory"]:
        yield ("memory",), (
            f"memory ({format_size(values['memory'])}) is more than max_memory ({format_size(values['max_memory'])})"
        )
    targets: dict[str, int] = {}
    for number, disk in enumerate(values.get("disks", [])):
        if disk.get("target"):
            if disk["target"] in targets:
                yield ("disks", number, "target"), f"target {disk['target']} is already used by disks[{targets[disk['target']]}]"
            targets[disk["target"]] = number
    macs: dict[str, int] = {}
    for number, nic in enumerate(values.get("interfaces", [])):
        has_network, has_bridge = nic.get("network") is not None, nic.get("bridge") is not None
        if has_network == has_bridge:
            yield ("interfaces", number), "an interface needs exactly one of 'network' or 'bridge'"
        if nic.get("mac"):
            if nic["mac"] in macs:
                yield ("interfaces", number, "mac"), f"MAC {nic['mac']} is already used by interfaces[{macs[nic['mac']]}]"
            macs[nic["mac"]] = number


KIND = Kind("domain", "domains", FIELDS, "a virtual machine (libvirt domain)", bind=bind, check=check)
