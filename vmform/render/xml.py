"""Desired values -> libvirt XML, through the field declarations' bindings."""

from __future__ import annotations

from typing import Any

from lxml import etree

from vmform.lastapplied import record_for, write_record
from vmform.ownership import set_owner
from vmform.schema.domain import write_defaults_record
from vmform.schema.registry import KINDS
from vmform.schema.xmlbind import Element, ensure


def write_fields(kind: str, root: Element, values: dict[str, Any], names: list[str] | None = None) -> None:
    """Write the named fields (all bound ones by default) into root, in place."""
    specs = [s for s in KINDS[kind].fields if s.binding is not None and (names is None or s.name in names)]
    # Maxima first: <vcpu current=…> and <currentMemory> are checked against them.
    specs.sort(key=lambda s: not s.name.startswith("max_"))
    for spec in specs:
        if spec.name in values:
            spec.binding.write(root, values[spec.name])


def render_domain(name: str, values: dict[str, Any], project: str, address: str) -> Element:
    root = etree.Element("domain", type=values.get("type", "kvm"))
    etree.SubElement(root, "name").text = name
    set_owner(root, project, address)
    os_node = etree.SubElement(root, "os")
    etree.SubElement(os_node, "type").text = "hvm"
    features = etree.SubElement(root, "features")
    etree.SubElement(features, "acpi")
    etree.SubElement(features, "apic")
    etree.SubElement(root, "on_poweroff").text = "destroy"
    etree.SubElement(root, "on_reboot").text = "restart"
    etree.SubElement(root, "on_crash").text = "destroy"
    ensure(root, "devices")
    write_defaults_record(root, values.get("arch"))
    write_fields("domain", root, values)
    write_record(root, record_for("domain", values))
    return root


def render_network(name: str, values: dict[str, Any], project: str, address: str) -> Element:
    root = etree.Element("network")
    etree.SubElement(root, "name").text = name
    set_owner(root, project, address)
    write_fields("network", root, values)
    write_record(root, record_for("network", values))
    return root


def render_pool(name: str, values: dict[str, Any], uuid: str | None = None) -> Element:
    root = etree.Element("pool", type=values.get("type", "dir"))
    etree.SubElement(root, "name").text = name
    if uuid:
        etree.SubElement(root, "uuid").text = uuid
    write_fields("pool", root, values)
    return root


def render_volume(name: str, values: dict[str, Any], capacity: int, backing_path: str | None = None) -> Element:
    root = etree.Element("volume")
    etree.SubElement(root, "name").text = name
    capacity_node = etree.SubElement(root, "capacity", unit="bytes")
    capacity_node.text = str(capacity)
    # Full preallocation: libvirt allocates every byte it is asked to.
    allocated = capacity if values.get("preallocation") == "full" else 0
    etree.SubElement(root, "allocation", unit="bytes").text = str(allocated)
    target = etree.SubElement(root, "target")
    etree.SubElement(target, "format", type=values.get("format", "qcow2"))
    permissions = etree.SubElement(target, "permissions")
    etree.SubElement(permissions, "mode").text = "0600"
    backing = values.get("backing")
    if backing is not None and backing_path is not None:
        store = etree.SubElement(root, "backingStore")
        etree.SubElement(store, "path").text = backing_path
        # Always state the backing format: qemu must never probe it.
        etree.SubElement(store, "format", type=backing.get("format") or "qcow2")
    return root


def render_seed_volume(name: str, values: dict[str, Any]) -> tuple[Element, bytes]:
    """The volume a cloud-init seed is uploaded into, sized to its ISO image (which it returns too)."""
    from vmform.schema.cloudinit import volume_name
    from vmform.seed import build_iso, seed_files

    image = build_iso(seed_files(values))
    return render_volume(volume_name(name), {"format": "raw"}, len(image)), image


def to_text(root: Element) -> str:
    return etree.tostring(root, encoding="unicode", pretty_print=True)


def render_resource(kind: str, name: str, values: dict[str, Any], project: str, address: str,
                    backing_path: str | None = None) -> Element:
    """The XML a resource is created from (volumes: with the size known at plan time, 0 when derived)."""
    if kind == "domain":
        return render_domain(name, values, project, address)
    if kind == "network":
        return render_network(name, values, project, address)
    if kind == "pool":
        return render_pool(name, values)
    if kind == "cloudinit":
        return render_seed_volume(name, values)[0]
    return render_volume(name, values, values.get("size") or 0, backing_path)
