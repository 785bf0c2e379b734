"""vmform's last-applied record (vmform/lastapplied.py) and the generic removal of what it lists
(generic.unset_path): written where libvirt keeps it, read back the same, and removals that leave vmform's own
base and everything not listed alone."""

from __future__ import annotations

from lxml import etree

from vmform.lastapplied import (
    AppliedRecord,
    applied_element,
    read_record,
    record_for,
    removed_paths,
    write_record,
    xml_change_path,
)
from vmform.ownership import set_owner
from vmform.render.xml import render_domain
from vmform.schema.generic import unset_path, value_at


def _domain(body: str) -> etree._Element:
    return etree.fromstring(f"<domain type='qemu'><name>a</name>{body}</domain>")


def test_record_of_values_lists_removable_fields_and_xml_paths() -> None:
    values = {"memory": 64 * 1024**2, "kernel": "/k", "description": "", "cpu": {"mode": "maximum"},
              "xml": {"memoryBacking": {"hugepages": {}}, "on_crash": "restart", "clock": {"offset": "utc"},
                      "devices": {"watchdog": [{"model": "i6300esb"}]}}}
    record = record_for("domain", values)
    assert record.fields == ("cpu", "kernel")  # memory and description have defaults: never "removed"
    assert record.xml == (("clock", "@offset"), ("devices", "watchdog"), ("memoryBacking", "hugepages"),
                          ("on_crash", "_text"))
    assert [xml_change_path(p) for p in record.xml] == [
        "xml.clock.offset", "xml.devices.watchdog", "xml.memoryBacking.hugepages", "xml.on_crash"]
    assert AppliedRecord.from_entry(record.to_entry()) == record
    assert AppliedRecord.from_entry(None) is None


def test_record_round_trips_through_the_owner_element() -> None:
    root = _domain("")
    assert read_record(root) is None  # not vmform's
    set_owner(root, "p", "domain.a")
    assert read_record(root) is None  # an older vmform's: nothing recorded
    record = AppliedRecord.of(["kernel"], [("on_crash", "_text")])
    write_record(root, record)
    write_record(root, record)  # replaced, never doubled
    assert len(root.findall(".//{https://vmform.dev/xmlns/owner/1}applied")) == 1
    reread = etree.fromstring(etree.tostring(root))
    assert read_record(reread) == record
    write_record(root, AppliedRecord())
    assert read_record(root) == AppliedRecord()  # an empty record is a record: "vmform stated nothing"


def test_record_set_through_set_metadata_shape() -> None:
    """import gives libvirt an owner element without a namespace (libvirt adds it) holding the record."""
    owner = etree.Element("owner", project="p", address="domain.a")
    owner.append(applied_element(AppliedRecord.of(["cpu"], [])))
    text = etree.tostring(owner).decode().replace("<owner ", "<vmform:owner xmlns:vmform='https://vmform.dev/xmlns/owner/1' ")
    text = text.replace("</owner>", "</vmform:owner>")
    root = _domain(f"<metadata>{text}</metadata>")
    assert read_record(root) == AppliedRecord.of(["cpu"], [])


def test_render_writes_the_record_of_what_it_sends() -> None:
    values = {"type": "qemu", "memory": 64 * 1024**2, "max_memory": 64 * 1024**2, "vcpus": 1, "max_vcpus": 1,
              "disks": [], "interfaces": [], "xml": {"on_crash": "restart"}}
    root = render_domain("a", values, "p", "domain.a")
    assert read_record(root) == AppliedRecord.of([], [("on_crash", "_text")])


def test_unset_path_removes_and_restores_vmform_base() -> None:
    host = _domain("<features><acpi/><apic/><pae/></features><memoryBacking><hugepages/><nosharepages/></memoryBacking>"
                   "<clock offset='localtime'/><on_crash>restart</on_crash>")
    rendered = _domain("<features><acpi/><apic/></features><on_crash>destroy</on_crash>")
    unset_path(host, ("memoryBacking", "hugepages"), "domain", rendered)
    unset_path(host, ("features", "pae"), "domain", rendered)
    unset_path(host, ("clock", "@offset"), "domain", rendered)
    unset_path(host, ("on_crash", "_text"), "domain", rendered)
    assert host.find("memoryBacking/hugepages") is None and host.find("memoryBacking/nosharepages") is not None
    assert host.find("features/pae") is None and host.find("features/acpi") is not None
    assert host.find("clock") is None  # left empty, and vmform renders none: gone
    assert host.findtext("on_crash") == "destroy"  # vmform's own default comes back
    # An attribute of vmform's base element: removing it keeps the element (<apic/> is vmform's).
    host = _domain("<features><acpi/><apic eoi='on'/></features>")
    unset_path(host, ("features", "apic", "@eoi"), "domain", _domain("<features><acpi/><apic/></features>"))
    assert host.find("features/apic") is not None and host.find("features/apic").get("eoi") is None


def test_unset_path_removes_a_whole_list() -> None:
    host = _domain("<devices><watchdog model='i6300esb'/><watchdog model='ib700'/><rng model='virtio'/></devices>")
    unset_path(host, ("devices", "watchdog"), "domain", _domain("<devices/>"))
    assert host.find("devices/watchdog") is None and host.find("devices/rng") is not None


def test_value_at_reads_generic_data() -> None:
    data = {"on_crash": "restart", "clock": {"offset": "utc"}, "memoryBacking": {"hugepages": {}}}
    assert value_at(data, ("on_crash", "_text")) == "restart"
    assert value_at(data, ("clock", "@offset")) == "utc"
    assert value_at(data, ("memoryBacking", "hugepages")) == {}
    assert value_at(data, ("memoryBacking", "nosharepages")) is None
    assert value_at(None, ("a",)) is None


def test_a_device_no_longer_named_is_removed_whole() -> None:
    recorded = AppliedRecord.of([], [("devices", "watchdog", "@model"), ("devices", "watchdog", "@action"),
                                     ("devices", "memballoon", "@model"), ("devices", "memballoon", "stats", "@period")])
    # memballoon is still named (its model): only its stats go; the watchdog is not named at all any more.
    assert removed_paths(recorded, (("devices", "memballoon", "@model"),)) == [
        ("devices", "memballoon", "stats", "@period"), ("devices", "watchdog")]
