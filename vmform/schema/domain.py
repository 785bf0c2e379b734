"""Domain (VM) fields."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lxml import etree

from vmform.schema.extra_xml import ExtraXml, ExtraXmlBinding
from vmform.schema.kind import Kind
from vmform.schema.types import (
    ABSOLUTE_DIR,
    ABSOLUTE_FILE,
    Bool,
    Effect,
    Enum,
    FieldError,
    FieldErrors,
    FieldSpec,
    Int,
    IPv4Address,
    ListOf,
    Mac,
    Obj,
    Ref,
    Removal,
    Size,
    Str,
    ValueType,
)
from vmform.schema.xmlbind import Attr, Element, SizeText, Text, XmlBinding, ensure, to_yes_no
from vmform.schema.xslt import Stylesheet, StylesheetBinding
from vmform.units import format_size

DISK_BUSES = ("virtio", "sata", "scsi", "ide", "usb")
DISK_DEVICES = ("disk", "cdrom")
DISK_FORMATS = ("raw", "qcow2", "qed", "vmdk", "vdi", "vpc", "vhdx", "luks")
DISK_CACHES = ("none", "writeback", "writethrough", "directsync", "unsafe", "default")
VIDEO_MODELS = ("none", "virtio", "qxl", "vga", "cirrus", "bochs", "ramfb")
CPU_MODES = ("host-passthrough", "host-model", "maximum", "custom")
FS_DRIVERS = ("virtiofs", "9p")
PCI_ADDRESS = r"[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]"  # a PCI slot is 0-1f (libvirt: pciSlot)
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
    """A <disk> as a value in libvirt terms; optional keys (cache, serial, device) only when present."""
    source = node.find("source")
    target = node.find("target")
    driver = node.find("driver")
    disk: dict[str, Any] = {}
    device = node.get("device") or "disk"
    if device != "disk":
        disk["device"] = device
    if node.get("type") == "volume" and source is not None:
        disk["pool"] = source.get("pool")
        disk["volume"] = source.get("volume")
    elif source is not None and source.get("file") is not None:
        disk["path"] = source.get("file")
    elif source is not None and source.get("dev") is not None:
        disk["path"] = source.get("dev")
    if driver is not None and driver.get("type") is not None:
        disk["format"] = driver.get("type")
    disk["target"] = target.get("dev") if target is not None else None
    disk["bus"] = target.get("bus") if target is not None else None
    disk["readonly"] = node.find("readonly") is not None
    disk["shareable"] = node.find("shareable") is not None
    if node.findtext("wwn") is not None:
        disk["wwn"] = node.findtext("wwn")
    if driver is not None and driver.get("cache") is not None:
        disk["cache"] = driver.get("cache")
    serial = node.findtext("serial")
    if serial is not None:
        disk["serial"] = serial
    return disk


def _disk_type(disk: dict[str, Any]) -> str:
    if disk.get("volume") is not None:
        return "volume"
    path = disk.get("path")
    return "block" if path is not None and path.startswith("/dev/") else "file"


def _disk_source(disk: dict[str, Any]) -> dict[str, str] | None:
    if disk.get("volume") is not None:
        return {"pool": disk["pool"], "volume": disk["volume"]}
    if disk.get("path") is not None:
        return {"dev" if _disk_type(disk) == "block" else "file": disk["path"]}
    return None  # an empty cdrom drive


def disk_element(disk: dict[str, Any]) -> Element:
    """The <disk> element for a desired disk (also what live attach sends)."""
    node = etree.Element("disk", type=_disk_type(disk), device=disk.get("device", "disk"))
    driver = etree.SubElement(node, "driver", name="qemu")
    if disk.get("format"):
        driver.set("type", disk["format"])
    if disk.get("cache"):
        driver.set("cache", disk["cache"])
    source = _disk_source(disk)
    if source is not None:
        etree.SubElement(node, "source", **source)
    etree.SubElement(node, "target", dev=disk["target"], bus=disk["bus"])
    if disk.get("readonly"):
        etree.SubElement(node, "readonly")
    if disk.get("shareable"):
        etree.SubElement(node, "shareable")
    if disk.get("serial") is not None:
        etree.SubElement(node, "serial").text = disk["serial"]
    if disk.get("wwn") is not None:
        etree.SubElement(node, "wwn").text = disk["wwn"]
    return node


def _update_disk(node: Element, disk: dict[str, Any]) -> None:
    """Rewrite a live <disk> to the desired one, keeping what libvirt added (address, alias, ...).
    Optional settings the desired disk does not state (cache, serial) are left as they are."""
    node.set("type", _disk_type(disk))
    node.set("device", disk.get("device", "disk"))
    driver = node.find("driver")
    if driver is None:
        driver = etree.Element("driver", name="qemu")
        node.insert(0, driver)
    if disk.get("format"):
        driver.set("type", disk["format"])
    if disk.get("cache"):
        driver.set("cache", disk["cache"])
    wanted = _disk_source(disk)
    source = node.find("source")
    if wanted is None:
        if source is not None:
            node.remove(source)
    else:
        if source is None:
            source = etree.Element("source")
            driver.addnext(source)
        for attr in ("pool", "volume", "file", "dev", "index"):
            source.attrib.pop(attr, None)
        for attr, value in wanted.items():
            source.set(attr, value)
    target = node.find("target")
    if target is None:
        target = etree.SubElement(node, "target")
    if target.get("bus") not in (None, disk["bus"]):
        address = node.find("address")
        if address is not None:  # a drive address does not fit a PCI bus (and back): libvirt assigns anew
            node.remove(address)
    target.set("dev", disk["target"])
    target.set("bus", disk["bus"])
    readonly = node.find("readonly")
    if disk.get("readonly") and readonly is None:
        target.addnext(etree.Element("readonly"))
    elif not disk.get("readonly") and readonly is not None:
        node.remove(readonly)
    shareable = node.find("shareable")
    if disk.get("shareable") and shareable is None:
        (node.find("readonly") if node.find("readonly") is not None else target).addnext(etree.Element("shareable"))
    elif not disk.get("shareable") and shareable is not None:
        node.remove(shareable)
    for tag in ("serial", "wwn"):
        if disk.get(tag) is not None:
            element = node.find(tag)
            if element is None:
                element = etree.SubElement(node, tag)
            element.text = disk[tag]


_DISK_XPATH = "devices/disk[@device='disk']|devices/disk[@device='cdrom']"


class DiskList(XmlBinding):
    """All <disk device='disk'> and <disk device='cdrom'> of a domain, matched by target device."""

    def read(self, root: Element) -> Any:
        return [_disk_from_xml(node) for node in root.xpath(_DISK_XPATH)]

    def write(self, root: Element, value: Any) -> None:
        devices = ensure(root, "devices")
        existing = {
            (node.find("target").get("dev") if node.find("target") is not None else None): node  # type: ignore[union-attr]
            for node in root.xpath(_DISK_XPATH)
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
        if any(disk["bus"] == "scsi" for disk in value) and devices.find("controller[@type='scsi']") is None:
            # Without one, libvirt picks an emulated LSI controller; virtio-scsi is what guests want.
            _insert_device(devices, etree.Element("controller", type="scsi", index="0", model="virtio-scsi"))


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


IGNITION_ENTRY = "opt/com.coreos/config"


class IgnitionConfig(XmlBinding):
    """An Ignition config handed to the guest through QEMU's firmware config (``<sysinfo type='fwcfg'>``)."""

    def _entry(self, root: Element) -> Element | None:
        for entry in root.findall("sysinfo[@type='fwcfg']/entry"):
            if entry.get("name") == IGNITION_ENTRY:
                return entry
        return None

    def read(self, root: Element) -> Any:
        entry = self._entry(root)
        return None if entry is None else (entry.text or "")

    def write(self, root: Element, value: Any) -> None:
        entry = self._entry(root)
        if value is None:
            if entry is not None:
                sysinfo = entry.getparent()
                sysinfo.remove(entry)
                if len(sysinfo) == 0:
                    root.remove(sysinfo)
            return
        if entry is None:
            sysinfo = root.find("sysinfo[@type='fwcfg']")
            if sysinfo is None:
                sysinfo = etree.SubElement(root, "sysinfo", type="fwcfg")
            entry = etree.SubElement(sysinfo, "entry", name=IGNITION_ENTRY)
        entry.text = value


@dataclass(frozen=True)
class IgnitionText(ValueType):
    """An Ignition config: JSON text, or a mapping written as compact JSON."""

    def parse(self, raw: Any) -> str:
        if isinstance(raw, dict):
            return json.dumps(raw, separators=(",", ":"), sort_keys=True)
        text = Str(max_length=1024 * 1024).parse(raw)
        try:
            json.loads(text)
        except ValueError as exc:
            raise FieldError(f"an Ignition config is JSON: {exc}") from None
        return text

    def describe(self) -> str:
        return "Ignition config (JSON text or a mapping)"


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


class ConsoleLog(XmlBinding):
    """``<serial><log file=… append='on'/>``: the serial console is also written to a file on the host
    (by virtlogd), which ``vmform console`` reads."""

    def read(self, root: Element) -> Any:
        node = root.find("devices/serial/log")
        return None if node is None else node.get("file")

    def write(self, root: Element, value: Any) -> None:
        # The serial console's <console> is the same character device: libvirt shows the log on both.
        for device in root.xpath("devices/serial[1]|devices/console[target/@type='serial']"):
            for node in device.findall("log"):
                device.remove(node)
            if value:
                log = etree.Element("log", file=value, append="on")
                source = device.find("source")
                if source is not None:
                    source.addnext(log)
                else:
                    device.insert(0, log)


@dataclass(frozen=True)
class ConsoleLogType(ValueType):
    """true (the default file), false (none), or an absolute path on the host."""

    def parse(self, raw: Any) -> Any:
        if isinstance(raw, bool):
            return raw
        return Str(pattern=ABSOLUTE_FILE, hint="an absolute path on the host, or true/false").parse(raw)

    def describe(self) -> str:
        return "boolean or absolute path"


CONSOLE_LOG_DIR = "/var/log/libvirt/qemu"


def console_log_path(domain_name: str) -> str:
    return f"{CONSOLE_LOG_DIR}/{domain_name}-console.log"


_SEC_BOOT_LOADERS = ("secboot", ".ms.", "secure", "enrolled")


def _legacy_efi_loader(os_node: Element | None) -> Element | None:
    """A hand-written <loader type='pflash'>…OVMF/edk2…</loader> (no firmware auto-selection)."""
    loader = os_node.find("loader") if os_node is not None else None
    if loader is None:
        return None
    text = (loader.text or "").lower()
    if loader.get("type") == "pflash" or "ovmf" in text or "edk2" in text or "aavmf" in text:
        return loader
    return None


X86_ARCHES = (None, "x86_64", "i686")


class Firmware(XmlBinding):
    """``<os firmware='efi'>``: libvirt's firmware auto-selection picks the UEFI image (never a distro OVMF path in
    a manifest); an explicit OVMF pflash loader reads as efi too. bios is the absence of UEFI on x86 (SeaBIOS,
    libvirt's default): written as no firmware attribute at all, because ``firmware='bios'`` needs a SeaBIOS
    firmware descriptor that not every distribution ships (Debian 12 does not: such a domain fails to start).
    A non-x86 domain without UEFI reads as unset."""

    def read(self, root: Element) -> Any:
        os_node = root.find("os")
        if os_node is not None and os_node.get("firmware") in ("efi", "bios"):
            return os_node.get("firmware")
        if _legacy_efi_loader(os_node) is not None:
            return "efi"
        arch = os_node.find("type").get("arch") if os_node is not None and os_node.find("type") is not None else None
        return "bios" if arch in X86_ARCHES else None

    def write(self, root: Element, value: Any) -> None:
        if value is None or self.read(root) == value:
            return
        os_node = ensure(root, "os")
        if value == "efi":
            os_node.set("firmware", "efi")
            return
        # bios: drop any EFI loader, NVRAM and firmware feature requests.
        os_node.attrib.pop("firmware", None)
        for tag in ("loader", "nvram", "firmware"):
            for node in os_node.findall(tag):
                os_node.remove(node)


class SecureBoot(XmlBinding):
    """``<os><firmware><feature name='secure-boot'/>`` and ``enrolled-keys`` (libvirt needs keys enrolled for a
    secure boot that actually verifies; both follow the one switch). Secure boot also needs SMM."""

    def read(self, root: Element) -> Any:
        feature = root.find("os/firmware/feature[@name='secure-boot']")
        if feature is not None:
            return feature.get("enabled") == "yes"
        loader = _legacy_efi_loader(root.find("os"))
        if loader is not None:
            if loader.get("secure") is not None:
                return loader.get("secure") == "yes"
            text = (loader.text or "").lower()
            return any(mark in text for mark in _SEC_BOOT_LOADERS)
        return None

    def write(self, root: Element, value: Any) -> None:
        if value is None:
            return
        os_node = ensure(root, "os")
        loader = _legacy_efi_loader(os_node)
        if loader is not None and os_node.get("firmware") is None:
            # A hand-picked firmware image: switch to libvirt's auto-selection so the feature request applies.
            for tag in ("loader", "nvram"):
                for node in os_node.findall(tag):
                    os_node.remove(node)
            os_node.set("firmware", "efi")
        firmware = os_node.find("firmware")
        if firmware is None:
            firmware = etree.Element("firmware")
            type_node = os_node.find("type")
            if type_node is not None:
                type_node.addnext(firmware)
            else:
                os_node.insert(0, firmware)
        for name in ("enrolled-keys", "secure-boot"):
            feature = firmware.find(f"feature[@name='{name}']")
            if feature is None:
                feature = etree.SubElement(firmware, "feature", name=name)
            feature.set("enabled", to_yes_no(value))
        if value:
            ensure(root, "features/smm").set("state", "on")


class Cpu(XmlBinding):
    """``<cpu mode=…>`` and, for custom, ``<model>``; topology, features and the rest are kept."""

    def read(self, root: Element) -> Any:
        node = root.find("cpu")
        if node is None:
            return None
        model = node.findtext("model")
        mode = node.get("mode") or ("custom" if model is not None else None)
        if mode is None:
            return None
        value = {"mode": mode}
        if mode == "custom" and model is not None:
            value["model"] = model
        return value

    def write(self, root: Element, value: Any) -> None:
        if value is None:  # removed from the manifest: libvirt's default model; what the xml: section states stays
            node = root.find("cpu")
            if node is not None:
                for attr in ("mode", "match", "check"):
                    node.attrib.pop(attr, None)
                for model in node.findall("model"):
                    node.remove(model)
                if len(node) == 0 and not node.attrib:
                    root.remove(node)
            return
        node = ensure(root, "cpu")
        node.set("mode", value["mode"])
        model = node.find("model")
        if value["mode"] == "custom":
            if model is None:
                model = etree.Element("model")
                node.insert(0, model)
            if model.text != value.get("model"):
                model.text = value.get("model")
                model.attrib.pop("vendor_id", None)
        else:
            for attr in ("match",):
                node.attrib.pop(attr, None)
            if model is not None:
                node.remove(model)


class Video(XmlBinding):
    """The first (primary) ``<video><model type=…>``; none is libvirt's explicit ``<model type='none'/>`` (no
    adapter even with graphics)."""

    def read(self, root: Element) -> Any:
        node = root.find("devices/video/model")
        return None if node is None else node.get("type")

    def write(self, root: Element, value: Any) -> None:
        if value is None:
            return
        devices = ensure(root, "devices")
        videos = devices.findall("video")
        if value == "none":
            for node in videos[1:]:
                devices.remove(node)
        if videos:
            model = ensure(videos[0], "model")
            if model.get("type") != value:
                model.attrib.clear()  # sizes and heads belong to the old model; libvirt fills in the new one's
                model.set("type", value)
                address = videos[0].find("address")
                if address is not None:
                    videos[0].remove(address)
            return
        video = etree.Element("video")
        etree.SubElement(video, "model", type=value)
        _insert_device(devices, video)


class Rng(XmlBinding):
    """A virtio RNG fed from the host's /dev/urandom. No RNG reads as unset (None); ``bind`` turns false into
    None, which removes any RNG."""

    def read(self, root: Element) -> Any:
        return True if root.find("devices/rng") is not None else None

    def write(self, root: Element, value: Any) -> None:
        devices = ensure(root, "devices")
        nodes = devices.findall("rng")
        if value and not nodes:
            rng = etree.Element("rng", model="virtio")
            etree.SubElement(rng, "backend", model="random").text = "/dev/urandom"
            _insert_device(devices, rng)
        elif not value:
            for node in nodes:
                devices.remove(node)


GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
_AGENT_XPATH = f"devices/channel[target/@type='virtio'][target/@name='{GUEST_AGENT_CHANNEL}']"


class GuestAgent(XmlBinding):
    """The qemu guest agent's virtio-serial channel (``<channel type='unix'><target type='virtio'
    name='org.qemu.guest_agent.0'/>``; libvirt picks the socket path and adds the virtio-serial controller).
    No channel reads as unset (None); ``bind`` turns false into None, which removes it."""

    def read(self, root: Element) -> Any:
        return True if root.xpath(_AGENT_XPATH) else None

    def write(self, root: Element, value: Any) -> None:
        devices = ensure(root, "devices")
        nodes = root.xpath(_AGENT_XPATH)
        if value and not nodes:
            channel = etree.Element("channel", type="unix")
            etree.SubElement(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
            _insert_device(devices, channel)
        elif not value:
            for node in nodes:
                devices.remove(node)


class Tpm(XmlBinding):
    """An emulated TPM 2.0 (swtpm): ``<tpm model='tpm-crb'><backend type='emulator' version='2.0'/>``;
    tpm-tis reads as emulated too. A passthrough TPM is not expressible (reads as unset)."""

    def read(self, root: Element) -> Any:
        node = root.find("devices/tpm")
        if node is None:
            return None  # bind turns "none" into None
        backend = node.find("backend")
        return "emulated" if backend is not None and backend.get("type") == "emulator" else None

    def write(self, root: Element, value: Any) -> None:
        if self.read(root) == value:
            return
        devices = ensure(root, "devices")
        for node in devices.findall("tpm"):
            devices.remove(node)
        if value == "emulated":
            tpm = etree.Element("tpm", model="tpm-crb")
            etree.SubElement(tpm, "backend", type="emulator", version="2.0")
            _insert_device(devices, tpm)


def _filesystem_from_xml(node: Element) -> dict[str, Any]:
    driver = node.find("driver")
    return {
        "source": node.find("source").get("dir") if node.find("source") is not None else None,  # type: ignore[union-attr]
        "target": node.find("target").get("dir") if node.find("target") is not None else None,  # type: ignore[union-attr]
        "driver": "virtiofs" if driver is not None and driver.get("type") == "virtiofs" else "9p",
    }


def _by_key(items: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Unordered device lists compare sorted by their key (the order in the XML carries no meaning)."""
    return sorted(items, key=lambda item: str(item.get(key)))


class Filesystems(XmlBinding):
    """``<filesystem type='mount'>`` shares of host directories, matched by mount tag. virtiofs needs shared
    memory: ``<memoryBacking><source type='memfd'/><access mode='shared'/>`` is written when one is present."""

    XPATH = "devices/filesystem[@type='mount']|devices/filesystem[not(@type)]"

    def read(self, root: Element) -> Any:
        return _by_key([_filesystem_from_xml(node) for node in root.xpath(self.XPATH)], "target")

    def write(self, root: Element, value: Any) -> None:
        devices = ensure(root, "devices")
        existing = {_filesystem_from_xml(node)["target"]: node for node in root.xpath(self.XPATH)}
        wanted = {fs["target"] for fs in value}
        for target, node in existing.items():
            if target not in wanted:
                devices.remove(node)
        for fs in value:
            node = existing.get(fs["target"])
            if node is None:
                node = etree.Element("filesystem", type="mount")
                etree.SubElement(node, "source", dir=fs["source"])
                etree.SubElement(node, "target", dir=fs["target"])
                _insert_device(devices, node)
            ensure(node, "source").set("dir", fs["source"])
            driver = node.find("driver")
            if fs["driver"] == "virtiofs":
                if driver is None:
                    driver = etree.Element("driver")
                    node.insert(0, driver)
                driver.attrib.clear()
                driver.set("type", "virtiofs")
                node.set("accessmode", "passthrough")
            else:
                if driver is not None and driver.get("type") == "virtiofs":
                    node.remove(driver)
                if node.get("accessmode") is None:
                    node.set("accessmode", "mapped")
        if any(fs["driver"] == "virtiofs" for fs in value):
            backing = root.find("memoryBacking")
            if backing is None:
                backing = etree.Element("memoryBacking")
                anchor = root.find("currentMemory") if root.find("currentMemory") is not None else root.find("memory")
                if anchor is not None:
                    anchor.addnext(backing)
                else:
                    root.append(backing)
            ensure(backing, "source").set("type", "memfd")
            ensure(backing, "access").set("mode", "shared")


def _pci_text(address: Element) -> str:
    return "{:04x}:{:02x}:{:02x}.{:x}".format(
        *(int(address.get(part) or "0", 16) for part in ("domain", "bus", "slot", "function"))
    )


class HostDevs(XmlBinding):
    """PCI host devices passed through (``<hostdev mode='subsystem' type='pci' managed='yes'>``), by address."""

    XPATH = "devices/hostdev[@mode='subsystem'][@type='pci']"

    def _existing(self, root: Element) -> dict[str, Element]:
        found = {}
        for node in root.xpath(self.XPATH):
            address = node.find("source/address")
            if address is not None:
                found[_pci_text(address)] = node
        return found

    def read(self, root: Element) -> Any:
        return [{"pci": pci} for pci in sorted(self._existing(root))]

    def write(self, root: Element, value: Any) -> None:
        devices = ensure(root, "devices")
        existing = self._existing(root)
        wanted = {dev["pci"] for dev in value}
        for pci, node in existing.items():
            if pci not in wanted:
                devices.remove(node)
        for dev in value:
            if dev["pci"] in existing:
                continue
            domain, bus, rest = dev["pci"].split(":")
            slot, function = rest.split(".")
            node = etree.Element("hostdev", mode="subsystem", type="pci", managed="yes")
            etree.SubElement(etree.SubElement(node, "source"), "address", domain=f"0x{domain}", bus=f"0x{bus}",
                             slot=f"0x{slot}", function=f"0x{function}")
            _insert_device(devices, node)


class DiskObj(Obj):
    """A disk entry: a volume, a path, or (cdrom only) nothing; the missing source is reported with the other
    problems of the entry."""

    def parse(self, raw: Any) -> dict[str, Any]:
        if self.shorthand and isinstance(raw, str):
            raw = {self.shorthand: raw}
        problems: list[FieldError] = []
        values: dict[str, Any] = {}
        try:
            values = super().parse(raw)
        except FieldErrors as exc:
            problems.extend(exc.errors)
        except FieldError as exc:
            problems.append(exc)
        if isinstance(raw, dict) and raw.get("volume") is None and raw.get("path") is None \
                and raw.get("device", "disk") != "cdrom":
            problems.append(FieldError("'volume' is required (or 'path'; only a cdrom may be an empty drive)"))
        if problems:
            raise FieldErrors(problems)
        return values


DISK = DiskObj(
    (
        FieldSpec("volume", Ref("volume"), "the volume attached as this disk (or give 'path')"),
        FieldSpec("path", Str(pattern=ABSOLUTE_FILE, hint="an absolute path"),
                  "a host file (or a /dev/… block device) attached as this disk, instead of a volume"),
        FieldSpec("format", Enum(DISK_FORMATS), "image format of a 'path' disk (required: vmform never lets qemu probe "
                  "it); a volume's format is the volume's"),
        FieldSpec("device", Enum(DISK_DEVICES), "disk, or cdrom (a cdrom without volume/path is an empty drive)",
                  default="disk"),
        FieldSpec("bus", Enum(DISK_BUSES), "disk bus (default: virtio; sata for a cdrom)"),
        FieldSpec("target", Str(pattern=r"(vd|sd|hd|xvd)[a-z]{1,2}", hint="e.g. vda, sdb"), "guest device name (default: next free for the bus)"),
        FieldSpec("readonly", Bool(), "attach read-only (default: false; true for a cdrom)"),
        FieldSpec("cache", Enum(DISK_CACHES), "host cache mode (default: libvirt's)"),
        FieldSpec("serial", Str(pattern=r"[A-Za-z0-9_ .+-]{1,36}", hint="letters, digits, _ .+-, at most 36"),
                  "serial number the guest sees"),
        FieldSpec("wwn", Str(pattern=r"[0-9a-fA-F]{16}", hint="16 hexadecimal digits"),
                  "World Wide Name the guest sees (scsi, sata and ide disks)"),
        FieldSpec("shareable", Bool(), "may be attached to several domains at once (use a raw volume and cache: "
                  "none; the guests must coordinate, e.g. a cluster filesystem)"),
    ),
    shorthand="volume",
)

CPU = Obj(
    (
        FieldSpec("mode", Enum(CPU_MODES), "host-passthrough, host-model, maximum, or custom (with model)", required=True),
        FieldSpec("model", Str(pattern=r"[A-Za-z0-9_.-]+"), "CPU model name for mode custom, e.g. Skylake-Client"),
    ),
    shorthand="mode",
)

FILESYSTEM = Obj(
    (
        FieldSpec("source", Str(pattern=ABSOLUTE_DIR, hint="an absolute path"), "host directory shared", required=True),
        FieldSpec("target", Str(pattern=r"[A-Za-z0-9_.-]{1,36}", hint="letters, digits, _.-"),
                  "mount tag the guest mounts", required=True),
        FieldSpec("driver", Enum(FS_DRIVERS), "virtiofs (needs shared memory, written for you) or 9p",
                  default="virtiofs"),
    ),
)

HOSTDEV = Obj(
    (
        FieldSpec("pci", Str(pattern=PCI_ADDRESS, hint="domain:bus:slot.function, e.g. 0000:01:00.0"),
                  "PCI address of the host device", required=True),
    ),
    shorthand="pci",
)

HOSTNAME = r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"

INTERFACE = Obj(
    (
        FieldSpec("network", Ref("network"), "vmform network to plug into"),
        FieldSpec("bridge", Str(pattern=r"[A-Za-z0-9_.-]{1,15}", hint="a host bridge name, at most 15 characters"), "existing host bridge to plug into"),
        FieldSpec("mac", Mac(), "MAC address (default: derived from project and address, stable across rebuilds)"),
        FieldSpec("model", Enum(NIC_MODELS), "NIC model", default="virtio"),
        FieldSpec("ip", IPv4Address(), "address reserved for this NIC: becomes a DHCP host entry of its network "
                  "(changed live, no network restart)"),
        FieldSpec("hostname", Str(pattern=HOSTNAME, hint="a host name such as web or web.lab.test"),
                  "DNS name for the reserved address: a DNS host entry of its network (changed live)"),
    ),
    shorthand="network",
)

# QEMU machine aliases and the versioned types libvirt resolves them to when it defines a domain.
MACHINE_ALIASES = {"q35": r"pc-q35-[0-9.]+", "pc": r"pc-i440fx-[0-9.]+", "virt": r"virt-[0-9.]+",
                   "s390-ccw-virtio": r"s390-ccw-virtio-[0-9.]+", "pseries": r"pseries-[0-9.]+"}


def machine_matches(live: Any, desired: Any) -> bool:
    """A domain defined with an alias keeps the versioned type it got: no change, and no restart after a QEMU
    upgrade moves the alias."""
    pattern = MACHINE_ALIASES.get(str(desired))
    return live == desired or (pattern is not None and isinstance(live, str) and re.fullmatch(pattern, live) is not None)


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("description", Str(), "free text shown by virsh", effect=Effect.LIVE, xml="description", default="",
              binding=Text("description")),
    FieldSpec("type", Enum(("kvm", "qemu")), "hypervisor: kvm (hardware) or qemu (TCG emulation)", xml="domain/@type",
              default="kvm", binding=Attr(".", "type")),
    FieldSpec("arch", Enum(("x86_64", "i686", "aarch64", "ppc64le", "s390x", "riscv64")),
              "guest architecture (default: the host's)", xml="os/type/@arch", binding=Attr("os/type", "arch")),
    FieldSpec("machine", Str(pattern=r"[A-Za-z0-9_.-]+"), "machine type, e.g. q35 or pc; an alias matches the "
              "versioned type libvirt resolves it to (q35: pc-q35-7.2)",
              xml="os/type/@machine", binding=Attr("os/type", "machine"), same=machine_matches, pinned=True,
              default_doc="pc on x86 (arch unset, x86_64, i686), virt on aarch64 and riscv64, pseries on ppc64le, "
              "s390-ccw-virtio on s390x"),
    FieldSpec("firmware", Enum(("bios", "efi")), "efi: UEFI, the firmware image picked by libvirt's auto-selection "
              "(<os firmware='efi'>, never a distro OVMF path); bios: no UEFI (SeaBIOS on x86). An existing OVMF "
              "pflash loader reads as efi", xml="os/@firmware", binding=Firmware(), default="bios", pinned=True),
    FieldSpec("secure_boot", Bool(), "UEFI secure boot with the distribution's keys enrolled (needs firmware: efi; "
              "turns on SMM)", xml="os/firmware/feature[@name='secure-boot'], features/smm", binding=SecureBoot()),
    FieldSpec("cpu", CPU, "CPU model: host-passthrough | host-model | maximum, or {mode: custom, model: NAME}",
              xml="cpu/@mode, cpu/model", binding=Cpu(),
              removal=Removal("libvirt's default CPU model (the mode and model go; topology or features the xml: "
                              "section states stay)")),
    FieldSpec("vcpus", Int(1, 4096), "virtual CPUs online", effect=Effect.LIVE, xml="vcpu/@current", default=1,
              effect_doc="live up to max_vcpus, else restart", binding=VcpuCurrent()),
    FieldSpec("max_vcpus", Int(1, 4096), "virtual CPUs the domain can grow to live (default: vcpus)", xml="vcpu/text()",
              binding=VcpuMax(), default_doc="vcpus"),
    FieldSpec("memory", Size(minimum=16 * 1024**2, multiple=1024), "memory (balloon target)", effect=Effect.LIVE, xml="currentMemory/text(), currentMemory/@unit",
              default=512 * 1024**2, effect_doc="live up to max_memory, else restart", binding=SizeText("currentMemory")),
    FieldSpec("max_memory", Size(minimum=16 * 1024**2, multiple=1024), "memory the domain can balloon up to live (default: memory)",
              xml="memory/text(), memory/@unit", binding=SizeText("memory"), default_doc="memory"),
    FieldSpec("boot", ListOf(Enum(BOOT_DEVICES), max_items=4), "boot device order", xml="os/boot/@dev", default=["hd"],
              binding=BootDevices()),
    FieldSpec("kernel", Str(pattern=ABSOLUTE_FILE, hint="an absolute path on the host"),
              "direct kernel boot: the kernel image, a path on the host that QEMU can read", xml="os/kernel",
              binding=Text("os/kernel"), removal=Removal("no direct kernel boot: the domain boots from its disks")),
    FieldSpec("initrd", Str(pattern=ABSOLUTE_FILE, hint="an absolute path on the host"),
              "direct kernel boot: the initrd, a path on the host (needs kernel)", xml="os/initrd",
              binding=Text("os/initrd"), removal=Removal("no initrd")),
    FieldSpec("cmdline", Str(), "direct kernel boot: the kernel command line (needs kernel)", xml="os/cmdline",
              binding=Text("os/cmdline"), removal=Removal("no kernel command line")),
    FieldSpec("disks", ListOf(DISK), "disks and cdroms: a volume, a host path, or (cdrom) nothing; scsi disks get "
              "a virtio-scsi controller unless the domain has a scsi controller", effect=Effect.LIVE,
              xml="devices/disk[@device='disk' or 'cdrom']",
              default=[], effect_doc="adding/removing a disk is live; changing one restarts", binding=DiskList()),
    FieldSpec("interfaces", ListOf(INTERFACE), "network interfaces", effect=Effect.LIVE, xml="devices/interface",
              default=[], effect_doc="adding/removing an interface is live; changing one restarts", binding=InterfaceList()),
    FieldSpec("filesystems", ListOf(FILESYSTEM), "host directories shared with the guest, by mount tag",
              xml="devices/filesystem, memoryBacking/source, memoryBacking/access", binding=Filesystems(),
              removal=Removal("no shared directories", [])),
    FieldSpec("hostdevs", ListOf(HOSTDEV), "PCI host devices passed through to the guest (managed by libvirt)",
              xml="devices/hostdev[@type='pci']", binding=HostDevs(),
              removal=Removal("no PCI host devices (given back to the host)", [])),
    FieldSpec("graphics", Enum(("none", "vnc", "spice")), "graphical console (listens on 127.0.0.1)",
              xml="devices/graphics/@type", default="none", binding=Graphics()),
    FieldSpec("video", Enum(VIDEO_MODELS), "video adapter (default: virtio when graphics is vnc or spice, else "
              "libvirt's)", xml="devices/video/model/@type", binding=Video()),
    FieldSpec("serial_console", Bool(), "a serial port and console on a pty (cloud images hang at boot without "
              "one); false: none", xml="devices/serial, devices/console", default=True, binding=SerialConsole(),
              pinned=True),
    FieldSpec("console_log", ConsoleLogType(), "also write the serial console to a file on the host: true ("
              f"{CONSOLE_LOG_DIR}/<name>-console.log) or a path; vmform console prints it", xml="devices/serial/log/@file",
              binding=ConsoleLog(), removal=Removal("no console log file (the file itself stays)")),
    FieldSpec("cloudinit", Ref("cloudinit"), "a cloud-init seed attached as a read-only cdrom after the disks (sata on q35 "
              "machines, else ide)", xml="devices/disk[@device='cdrom']", compare=False),
    FieldSpec("rng", Bool(), "a virtio random number generator fed from the host's /dev/urandom (guests get "
              "entropy at boot); false: none", xml="devices/rng", binding=Rng(), default=True, pinned=True),
    FieldSpec("guest_agent", Bool(), "the qemu guest agent's virtio-serial channel (org.qemu.guest_agent.0): "
              "addresses from the agent, apply waiting for the guest, clean shutdowns; false: none",
              xml=f"devices/channel[target/@name='{GUEST_AGENT_CHANNEL}']", binding=GuestAgent(), default=True,
              pinned=True),
    FieldSpec("tpm", Enum(("none", "emulated")), "TPM: emulated is a TPM 2.0 (tpm-crb) backed by swtpm; a tpm-tis "
              "emulated TPM reads as emulated too", xml="devices/tpm", binding=Tpm()),
    FieldSpec("ignition", IgnitionText(), "an Ignition config (Fedora CoreOS, Flatcar) passed through QEMU's firmware "
              "config; sensitive: plans show its digest", xml="sysinfo[@type='fwcfg']/entry", binding=IgnitionConfig(),
              sensitive=True, removal=Removal("no Ignition config")),
    FieldSpec("state", Enum(("running", "stopped", "paused")), "whether the domain runs (paused: started, then its vCPUs stopped)", effect=Effect.LIVE, default="running"),
    FieldSpec("autostart", Bool(), "start with the host", effect=Effect.LIVE, default=False),
    FieldSpec("groups", ListOf(Str(pattern=r"[A-Za-z_][A-Za-z0-9_]{0,63}", hint="an Ansible group name")),
              "Ansible inventory groups of this domain (vmform inventory); not part of libvirt", compare=False),
    FieldSpec("xml", ExtraXml("domain"), "anything else of libvirt's domain XML, element by element (see "
              "'The xml: section'); merged after the curated fields", xml="(any)", binding=ExtraXmlBinding("domain")),
    FieldSpec("xslt", Stylesheet(), "an XSLT stylesheet run last over the XML vmform writes (for ported "
              "configurations); it must be idempotent", xml="(any)", binding=StylesheetBinding()),
)


def stable_mac(project: str, address: str, index: int) -> str:
    """A MAC in QEMU's 52:54:00 range derived from project and interface address, so rebuilds keep it."""
    digest = hashlib.sha256(f"{project}/{address}/interfaces[{index}]".encode()).digest()
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in digest[:3])


def _seed_disk(values: dict[str, Any], machine: str | None, index: Any, used: set[str]) -> dict[str, Any]:
    """The cdrom carrying the domain's cloud-init seed: SATA on q35 machines (which have no IDE), IDE on the others
    (i440fx, libvirt's default on x86, where guest kernels without AHCI, such as Debian's cloud kernel, still
    find it)."""
    from vmform.schema.cloudinit import volume_name

    seed = index.get("cloudinit", values["cloudinit"])
    pool = index.get("pool", seed.values["pool"]) if seed is not None else None
    bus = "sata" if "q35" in (machine or "") else "ide"
    target = next(name for name in _device_names(_DEV_PREFIX[bus]) if name not in used)
    used.add(target)
    return {
        "device": "cdrom",
        "pool": pool.libvirt_name if pool is not None else None,
        "volume": volume_name(seed.libvirt_name if seed is not None else values["cloudinit"]),
        "format": "raw",
        "target": target,
        "bus": bus,
        "readonly": True,
    }


def bind(resource: Any, index: Any) -> dict[str, Any]:
    values = dict(resource.values)
    desired: dict[str, Any] = {}
    for spec in FIELDS:
        if spec.name in values:
            desired[spec.name] = values[spec.name]
    desired.setdefault("max_vcpus", desired["vcpus"])
    desired.setdefault("max_memory", desired["memory"])
    if "machine" not in desired and default_machine(desired.get("arch")) is not None:
        desired["machine"] = default_machine(desired.get("arch"))
    used: set[str] = set()
    for disk in desired["disks"]:
        if disk.get("target"):
            used.add(disk["target"])
    disks = []
    for disk in desired["disks"]:
        device = disk.get("device", "disk")
        bus = disk.get("bus") or ("sata" if device == "cdrom" else "virtio")
        target = disk.get("target")
        if not target:
            prefix = _DEV_PREFIX[bus]
            target = next(name for name in _device_names(prefix) if name not in used)
            used.add(target)
        item: dict[str, Any] = {}
        if device != "disk":
            item["device"] = device
        if disk.get("volume") is not None:
            volume = index.get("volume", disk["volume"])
            pool = index.get("pool", volume.values["pool"]) if volume is not None else None
            item["pool"] = pool.libvirt_name if pool is not None else None
            item["volume"] = volume.libvirt_name if volume is not None else disk["volume"]
            item["format"] = volume.values.get("format", "qcow2") if volume is not None else "qcow2"
        elif disk.get("path") is not None:
            item["path"] = disk["path"]
            item["format"] = disk.get("format")
        else:
            item["format"] = disk.get("format") or "raw"  # libvirt writes raw into an empty drive's driver
        item["target"] = target
        item["bus"] = bus
        item["readonly"] = disk["readonly"] if disk.get("readonly") is not None else device == "cdrom"
        item["shareable"] = bool(disk.get("shareable"))
        for key in ("cache", "serial", "wwn"):
            if disk.get(key) is not None:
                item[key] = disk[key].lower() if key == "wwn" else disk[key]
        disks.append(item)
    if values.get("cloudinit") is not None:
        disks.append(_seed_disk(values, desired.get("machine"), index, used))
    desired["disks"] = disks
    if desired.get("console_log") is True:
        desired["console_log"] = console_log_path(resource.libvirt_name)
    elif desired.get("console_log") is False:
        desired["console_log"] = None
    nics = []
    for number, nic in enumerate(desired["interfaces"]):
        entry: dict[str, Any] = {"mac": nic.get("mac") or stable_mac(index.project, resource.address, number)}
        if nic.get("network") is not None:
            network = index.get("network", nic["network"])
            entry["network"] = network.libvirt_name if network is not None else nic["network"]
        else:
            entry["bridge"] = nic["bridge"]
        entry["model"] = nic["model"]
        nics.append(entry)  # ip and hostname live on the network (network.reservations), not in the domain
    desired["interfaces"] = nics
    if "video" not in desired and desired.get("graphics", "none") != "none":
        desired["video"] = "virtio"
    for name, key in (("filesystems", "target"), ("hostdevs", "pci")):
        if name in desired:
            desired[name] = _by_key(desired[name], key)
    for name in ("rng", "guest_agent", "tpm"):
        if name in desired:
            desired[name] = _device_value(name, desired[name])
    return desired


def _device_value(name: str, value: Any) -> Any:
    """"No RNG", "no guest agent" and "no TPM" are the absence of the device, which reads as None."""
    if name in ("rng", "guest_agent") and value is False or name == "tpm" and value == "none":
        return None
    return value


# ---------------------------------------------------------------------------------- defaults kept per domain

# The machine type vmform gives a domain that does not state one, by architecture (None: arch unset, which is
# the host's; vmform assumes x86 there). Recorded on the domain with the other pinned defaults.
MACHINE_DEFAULTS: dict[str | None, str] = {
    None: "pc", "x86_64": "pc", "i686": "pc", "aarch64": "virt", "riscv64": "virt", "ppc64le": "pseries",
    "s390x": "s390-ccw-virtio",
}
DEFAULTS_NAMESPACE = "https://vmform.dev/xmlns/defaults/1"
DEFAULTS_PREFIX = "vmform-defaults"
# What a domain made before vmform recorded its defaults was given: the serial console only (the other pinned
# fields were left to libvirt, so they stay unmanaged on such a domain unless its manifest states them).
LEGACY_DEFAULTS: dict[str, Any] = {"serial_console": True}


def default_machine(arch: str | None) -> str | None:
    return MACHINE_DEFAULTS.get(arch)


def pinned_fields() -> tuple[FieldSpec, ...]:
    return tuple(spec for spec in FIELDS if spec.pinned)


def creation_defaults(arch: str | None) -> dict[str, Any]:
    """The defaults of this vmform for the pinned fields, in manifest terms, as recorded on a new domain."""
    found: dict[str, Any] = {}
    for spec in pinned_fields():
        value = default_machine(arch) if spec.name == "machine" else spec.default
        if value is not None:
            found[spec.name] = value
    return found


def write_defaults_record(root: Element, arch: str | None) -> None:
    """``<metadata><vmform-defaults:defaults machine='pc' firmware='efi' rng='yes' …/>``: the defaults this
    domain was created with (written once, at create; updates never touch it)."""
    metadata = root.find("metadata")
    if metadata is None:
        metadata = etree.SubElement(root, "metadata")
    for old in metadata.findall(f"{{{DEFAULTS_NAMESPACE}}}defaults"):
        metadata.remove(old)
    record = etree.SubElement(metadata, f"{{{DEFAULTS_NAMESPACE}}}defaults", nsmap={DEFAULTS_PREFIX: DEFAULTS_NAMESPACE})
    for name, value in creation_defaults(arch).items():
        record.set(name, to_yes_no(value) if isinstance(value, bool) else str(value))


def read_defaults_record(root: Element | None) -> dict[str, Any] | None:
    """The pinned defaults recorded on a domain (manifest terms), or None when it has no record."""
    node = root.find(f"metadata/{{{DEFAULTS_NAMESPACE}}}defaults") if root is not None else None
    if node is None:
        return None
    found: dict[str, Any] = {}
    for spec in pinned_fields():
        text = node.get(spec.name)
        if text is None:
            continue
        try:
            found[spec.name] = spec.type.parse(text in ("yes", "true") if isinstance(spec.type, Bool) else text)
        except FieldError:
            continue  # a value this vmform does not know: left unmanaged, like a missing one
    return found


def settle_defaults(resource: Any, live: Any) -> dict[str, Any]:
    """The desired values for an existing domain: a pinned field its manifest does not state takes the default
    recorded on the domain when it was created (see ``FieldSpec.pinned``), not this vmform's default; a field the
    record does not hold is left unmanaged. Everything else is ``resource.desired`` as it is."""
    record = read_defaults_record(live.config_root)
    if record is None:
        record = LEGACY_DEFAULTS
    desired = dict(resource.desired)
    for spec in pinned_fields():
        if spec.name not in desired or (*resource.path, spec.name) in resource.source.keys:
            continue  # stated in the manifest, or yielded to the xml: section
        if spec.name == "machine" and desired.get("arch") not in (None, live.values.get("arch")):
            continue  # another architecture: the recorded machine type belongs to the old one
        if spec.name in record:
            desired[spec.name] = _device_value(spec.name, record[spec.name])
        else:
            del desired[spec.name]
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
    for number, disk in enumerate(values.get("disks", [])):
        sources = [key for key in ("volume", "path") if disk.get(key) is not None]
        if len(sources) > 1:
            yield ("disks", number), "a disk takes either 'volume' or 'path', not both"
        if disk.get("path") is not None and disk.get("format") is None:
            yield ("disks", number, "path"), "a 'path' disk needs 'format' (raw, qcow2, …): vmform never lets qemu probe it"
        if disk.get("volume") is not None and disk.get("format") is not None:
            yield ("disks", number, "format"), "a volume disk takes its format from the volume; drop 'format'"
    cpu = values.get("cpu")
    if cpu is not None:
        if cpu["mode"] == "custom" and not cpu.get("model"):
            yield ("cpu",), "cpu mode custom needs 'model'"
        if cpu["mode"] != "custom" and cpu.get("model"):
            yield ("cpu", "model"), f"'model' applies only to cpu mode custom, not {cpu['mode']}"
    for name in ("initrd", "cmdline"):
        if values.get(name) is not None and values.get("kernel") is None:
            yield (name,), f"{name} needs kernel (direct kernel boot)"
    if values.get("console_log") not in (None, False) and values.get("serial_console") is False:
        yield ("console_log",), "console_log needs serial_console: true"
    if values.get("secure_boot") and values.get("firmware") != "efi":
        yield ("secure_boot",), "secure_boot needs firmware: efi"
    for name, key in (("filesystems", "target"), ("hostdevs", "pci")):
        seen: dict[str, int] = {}
        for number, item in enumerate(values.get(name, [])):
            if item[key] in seen:
                yield (name, number, key), f"{key} {item[key]} is already used by {name}[{seen[item[key]]}]"
            seen[item[key]] = number
    macs: dict[str, int] = {}
    for number, nic in enumerate(values.get("interfaces", [])):
        has_network, has_bridge = nic.get("network") is not None, nic.get("bridge") is not None
        if has_network == has_bridge:
            yield ("interfaces", number), "an interface needs exactly one of 'network' or 'bridge'"
        for key in ("ip", "hostname"):
            if nic.get(key) is not None and nic.get("network") is None:
                yield ("interfaces", number, key), f"'{key}' is a reservation on a vmform network: it needs 'network'"
        if nic.get("hostname") is not None and nic.get("ip") is None:
            yield ("interfaces", number, "hostname"), "'hostname' names the reserved address: it needs 'ip'"
        if nic.get("mac"):
            if nic["mac"] in macs:
                yield ("interfaces", number, "mac"), f"MAC {nic['mac']} is already used by interfaces[{macs[nic['mac']]}]"
            macs[nic["mac"]] = number


KIND = Kind("domain", "domains", FIELDS, "a virtual machine (libvirt domain)", bind=bind, check=check,
            settle=settle_defaults)
