"""The generic libvirt XML <-> YAML mapping (vmform/schema/generic.py), driven by libvirt's RNG schemas."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from vmform.schema import generic
from vmform.schema.types import FieldError, FieldErrors

SCHEMAS = "/usr/share/libvirt/schemas"
pytestmark = pytest.mark.skipif(not os.path.exists(f"{SCHEMAS}/domain.rng"), reason="libvirt's RNG schemas are not installed")

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "generic"
KINDS = {"domains": "domain", "networks": "network", "pools": "pool"}
RNG_FILES = {"domain": "domain.rng", "network": "network.rng", "pool": "storagepool.rng"}
FILES = sorted((kind, path) for folder, kind in KINDS.items() for path in (CORPUS / folder).glob("*.xml"))
_rng: dict[str, Any] = {}


def rng(kind: str) -> Any:
    if kind not in _rng:
        _rng[kind] = etree.RelaxNG(etree.parse(f"{SCHEMAS}/{RNG_FILES[kind]}"))
    return _rng[kind]


def parse(path: Path) -> Any:
    return etree.parse(str(path), etree.XMLParser(remove_comments=True, resolve_entities=False, no_network=True)).getroot()


def canon(element: Any) -> tuple[Any, ...]:
    """Tag (with namespace), attributes (all values), text unless whitespace-only, children in order."""
    text = element.text if element.text is not None and element.text.strip() else None
    children = [canon(child) for child in element if isinstance(child.tag, str)]
    return (element.tag, sorted(element.attrib.items()), text, children)


def canon_unordered(element: Any) -> tuple[Any, ...]:
    """As canon, but siblings of different names may come in any order (same-name order still counts)."""
    tag, attrs, text, _ = canon(element)
    children = sorted((canon_unordered(c) for c in element if isinstance(c.tag, str)), key=lambda c: str(c[0]))
    return (tag, attrs, text, children)


def yaml_round_trip(data: Any, sort_keys: bool = False) -> Any:
    return yaml.safe_load(yaml.safe_dump(data, sort_keys=sort_keys, allow_unicode=True))


def errors_of(data: Any, kind: str = "domain") -> list[FieldError]:
    with pytest.raises(FieldErrors) as caught:
        generic.data_to_element(data, kind)
    return caught.value.errors


# ----------------------------------------------------------------------------------------- corpus


def test_corpus_is_large_enough() -> None:
    counts = {kind: sum(1 for k, _ in FILES if k == kind) for kind in KINDS.values()}
    assert counts["domain"] >= 15 and counts["network"] >= 19 and counts["pool"] >= 14, counts
    # libvirt's own formatting of the samples (generate_live.py, test driver) is part of it
    assert sum(1 for _, path in FILES if path.name.startswith("live-")) >= 24


@pytest.mark.parametrize(("kind", "path"), FILES, ids=[f"{p.parent.name}/{p.name}" for _, p in FILES])
def test_corpus_round_trip(kind: str, path: Path) -> None:
    original = parse(path)
    assert rng(kind).validate(original), rng(kind).error_log.last_error

    data = generic.element_to_data(original, kind)
    rebuilt = generic.data_to_element(data, kind)
    assert canon(rebuilt) == canon(original)
    assert rng(kind).validate(rebuilt), rng(kind).error_log.last_error

    # through YAML text, in document order; with sorted keys (PyYAML's default) only the order of
    # differently named siblings may change
    loaded = yaml_round_trip(data)
    assert loaded == data and list(loaded) == list(data)
    assert canon(generic.data_to_element(loaded, kind)) == canon(original)
    loaded = yaml_round_trip(data, sort_keys=True)
    assert loaded == data
    assert canon_unordered(generic.data_to_element(loaded, kind)) == canon_unordered(original)
    # stable: converting the rebuilt document gives the same data, key order included
    again = generic.element_to_data(rebuilt, kind)
    assert again == data and list(again) == list(data)
    # merging the whole data into an empty root is the same as building it
    empty = etree.Element(original.tag)
    generic.merge_into(empty, data, kind)
    assert canon(empty) == canon(original)


def test_corpus_covers_the_features_asked_for() -> None:
    text = "\n".join(path.read_text() for _, path in FILES)
    for needle in (
        "q35", "OVMF", "<topology", "<numa>", "<hugepages", "<iothreads>", "bus=\"sata\"", "bus=\"scsi\"", "bus=\"usb\"",
        "cache=\"none\"", "cache=\"writeback\"", "device=\"cdrom\"", "e1000e", "rtl8139", "type=\"vnc\"", "type=\"spice\"",
        "<video>", "spicevmc", "org.qemu.guest_agent.0", "<rng ", "<tpm ", "<watchdog", "<sound", "<audio", "<filesystem",
        "<timer", "<pm>", "<features>", "<memballoon", "<controller", "<hostdev", "<qemu:commandline",
        "mode='nat'", "mode='route'", "mode='open'", "mode='bridge'", "<host mac=", "<srv ", "<txt ", "family='ipv6'",
        "<mtu ", "<portgroup", "type='dir'", "type='logical'", "type='netfs'",
    ):  # fmt: skip
        assert needle in text, needle


# ------------------------------------------------------------------------------------- the mapping


def domain_data(name: str) -> Any:
    return generic.element_to_data(parse(CORPUS / "domains" / name), "domain")


def test_shapes_scalars_text_and_empty_elements() -> None:
    data = domain_data("doc-hostdev-metadata.xml")
    assert data["type"] == "kvm"  # the root's own attributes are keys; its name is not
    assert data["on_poweroff"] == "destroy"  # text only: a scalar
    assert data["devices"]["emulator"] == "/usr/bin/qemu-system-x86_64"
    assert data["memory"] == {"unit": "KiB", "_text": "1524288"}  # attributes and text
    assert data["features"]["acpi"] == {}  # empty element
    assert data["devices"]["disk"][3]["readonly"] == {}
    assert list(data)[:4] == ["type", "name", "uuid", "title"]  # attributes first, then document order


def test_repeatable_children_are_lists_even_with_one_item() -> None:
    data = domain_data("doc-hostdev-metadata.xml")
    assert data["cputune"]["iothreadpin"] == [{"iothread": "2", "cpuset": "5,6"}]
    assert isinstance(data["cputune"]["emulatorpin"], dict)  # cannot repeat: a single mapping
    assert isinstance(data["sysinfo"], list)
    assert isinstance(data["devices"]["disk"][2]["target"], dict)
    net = generic.element_to_data(parse(CORPUS / "networks" / "open.xml"), "network")
    assert isinstance(net["ip"], list) and len(net["ip"]) == 1
    assert isinstance(net["ip"][0]["dhcp"]["range"], list)
    assert isinstance(net["forward"], dict)
    pool = generic.element_to_data(parse(CORPUS / "pools" / "logical.xml"), "pool")
    assert isinstance(pool["source"]["device"], list) and isinstance(pool["source"]["format"], dict)


def test_repeated_sibling_order_is_kept() -> None:
    data = domain_data("doc-hostdev-metadata.xml")
    assert [b["dev"] for b in data["os"]["boot"]] == ["hd", "cdrom"]
    data["os"]["boot"].reverse()
    built = generic.data_to_element(data, "domain")
    assert [b.get("dev") for b in built.findall("os/boot")] == ["cdrom", "hd"]


def test_children_are_emitted_in_the_order_of_the_mapping() -> None:
    built = generic.data_to_element({"name": "x", "devices": {"disk": [], "emulator": "/bin/q"}, "memory": "1"}, "domain")
    assert [child.tag for child in built] == ["name", "devices", "memory"]


def test_attribute_and_element_of_the_same_name() -> None:
    data = domain_data("doc-hostdev-metadata.xml")
    vnc, spice = data["devices"]["graphics"]
    # both present: the attribute is spelled @listen, the element keeps the plain key
    assert vnc["@listen"] == "192.168.1.5"
    assert vnc["listen"] == [{"type": "address", "address": "192.168.1.5"}]
    assert spice["listen"] == [{"type": "network", "network": "rednet"}]
    # a scalar means the attribute, a list means the element
    built = generic.data_to_element({"devices": {"graphics": [{"type": "vnc", "listen": "0.0.0.0"}]}}, "domain")
    assert built.find("devices/graphics").get("listen") == "0.0.0.0"
    built = generic.data_to_element({"devices": {"graphics": [{"type": "vnc", "listen": [{"type": "none"}]}]}}, "domain")
    assert built.find("devices/graphics").get("listen") is None
    assert built.find("devices/graphics/listen").get("type") == "none"
    controller = data["devices"]["controller"][2]
    assert controller["@model"] == "pcie-root-port" and controller["model"] == {"name": "pcie-root-port"}


def test_text_only_element_in_a_clash_reads_back_as_the_element() -> None:
    schema = generic.model("domain")
    os_info = schema.info(schema.defs[schema.root].children["os"].defs)
    assert "firmware" in os_info.attrs and "firmware" in os_info.children
    element = etree.fromstring("<domain><os><firmware><feature enabled='no' name='secure-boot'/></firmware></os></domain>")
    data = generic.element_to_data(element, "domain")
    assert data["os"]["firmware"] == {"feature": [{"enabled": "no", "name": "secure-boot"}]}
    assert data["os"].get("@firmware") is None
    element = etree.fromstring("<domain><os firmware='efi'><type>hvm</type></os></domain>")
    data = generic.element_to_data(element, "domain")
    assert data["os"] == {"firmware": "efi", "type": "hvm"}
    assert canon(generic.data_to_element(data, "domain")) == canon(element)


def test_text_may_always_be_written_under_text_key() -> None:
    built = generic.data_to_element({"name": {"_text": "web"}, "on_reboot": {"_text": "restart"}}, "domain")
    assert built.findtext("name") == "web" and built.findtext("on_reboot") == "restart"


def test_yaml_sensitive_strings_survive_dump_and_load() -> None:
    pool = generic.element_to_data(parse(CORPUS / "pools" / "dir.xml"), "pool")
    assert pool["target"]["permissions"]["mode"] == "0755"
    data = {"a": "yes", "b": "no", "c": "on", "d": "off", "e": "0755", "f": "0x1f", "g": "1e3", "h": "12:30", "i": "null", "j": "~"}
    dumped = yaml.safe_dump(data)
    assert "'yes'" in dumped and "'0755'" in dumped and "'off'" in dumped
    assert yaml.safe_load(dumped) == data
    assert yaml_round_trip(pool) == pool


def test_values_bool_and_int() -> None:
    built = generic.data_to_element(
        {
            "name": "x",
            "vcpu": 2,
            "memory": {"unit": "KiB", "_text": 1048576},
            "features": {"pvspinlock": {"state": True}},
            "pm": {"suspend-to-mem": {"enabled": False}},
            "devices": {"hostdev": [{"mode": "subsystem", "type": "pci", "managed": True}]},
        },
        "domain",
    )
    assert built.findtext("vcpu") == "2"
    assert built.findtext("memory") == "1048576"
    assert built.find("features/pvspinlock").get("state") == "on"  # virOnOff
    assert built.find("pm/suspend-to-mem").get("enabled") == "no"  # virYesNo
    assert built.find("devices/hostdev").get("managed") == "yes"


def test_namespaced_elements_and_opaque_metadata() -> None:
    data = domain_data("doc-hostdev-metadata.xml")
    assert data["qemu:commandline"]["qemu:arg"] == [{"value": "-newarg"}, {"value": "-other"}]
    metadata = data["metadata"]["_xml"]
    assert metadata[0] == '<app1:foo xmlns:app1="http://app1.org/app1/">..</app1:foo>'
    assert "xmlns:qemu" not in metadata[1]  # only the namespaces the element uses
    assert generic.foreign_namespaces(data) == [("metadata", "_xml"), ("qemu:commandline",)]
    built = generic.data_to_element(data, "domain")
    assert built.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline") is not None
    net = generic.element_to_data(parse(CORPUS / "networks" / "dnsmasq-options.xml"), "network")
    assert generic.foreign_namespaces(net) == [("dnsmasq:options",)]
    pool = generic.element_to_data(parse(CORPUS / "pools" / "netfs-mountopts.xml"), "pool")
    assert pool["fs:mount_opts"] == {"fs:option": [{"name": "sync"}, {"name": "lazytime"}]}
    assert generic.foreign_namespaces(domain_data("vi-minimal.xml")) == []


def test_paths() -> None:
    data = {
        "memory": {"unit": "KiB", "_text": "1024"},
        "on_poweroff": "destroy",
        "os": {"firmware": "efi", "boot": [{"dev": "hd"}]},
        "devices": {"graphics": [{"type": "vnc", "listen": [{"type": "none"}], "@listen": "0.0.0.0"}]},
    }
    assert generic.paths(data, "domain") == {
        ("memory",), ("memory", "@unit"), ("memory", "_text"), ("on_poweroff",),
        ("os",), ("os", "@firmware"), ("os", "boot"), ("os", "boot", "@dev"),
        ("devices",), ("devices", "graphics"), ("devices", "graphics", "@type"), ("devices", "graphics", "listen"),
        ("devices", "graphics", "listen", "@type"), ("devices", "graphics", "@listen"),
    }  # fmt: skip


def test_merge_into_drops_the_assigned_address_of_a_changed_model() -> None:
    def merged(data: dict[str, Any]) -> Any:
        element = etree.fromstring("<domain type='qemu'><devices><watchdog model='i6300esb' action='reset'>"
                                   "<address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>"
                                   "</watchdog></devices></domain>")
        generic.merge_into(element, {"devices": {"watchdog": data}}, "domain")
        return element.find("devices/watchdog")

    assert merged({"model": "ib700"}).find("address") is None
    assert merged({"model": "i6300esb", "action": "pause"}).find("address") is not None  # same model: kept
    stated = merged({"address": {"type": "pci", "slot": "0x05"}, "model": "i6300esb"}).find("address")
    assert stated is not None and stated.get("slot") == "0x05"


def test_merge_into_changes_only_what_the_data_names() -> None:
    element = parse(CORPUS / "domains" / "doc-hostdev-metadata.xml")
    before = copy.deepcopy(element)
    generic.merge_into(
        element,
        {
            "os": {"boot": [{"dev": "network"}], "bootmenu": {"timeout": 10}},
            "devices": {"rng": [{"model": "virtio", "backend": {"model": "random", "_text": "/dev/urandom"}}], "watchdog": {"action": "reset"}},
            "on_crash": "destroy",
            "type": "qemu",
        },
        "domain",
    )
    assert element.get("type") == "qemu"
    assert [b.get("dev") for b in element.findall("os/boot")] == ["network"]
    assert element.find("os/bootmenu").attrib == {"enable": "yes", "timeout": "10"}  # merged, not replaced
    assert element.find("os/loader").text == before.find("os/loader").text
    assert [r.findtext("backend") for r in element.findall("devices/rng")] == ["/dev/urandom"]
    assert element.find("devices/watchdog").attrib == {"model": "i6300esb", "action": "reset"}
    assert element.findtext("on_crash") == "destroy"
    # the boot list took the place of the old boot elements
    assert [child.tag for child in element.find("os")] == [child.tag for child in before.find("os") if child.tag != "boot" or child is before.find("os/boot")]
    assert canon(element.find("devices/disk")) == canon(before.find("devices/disk"))
    assert len(element.findall("devices/*")) == len(before.findall("devices/*"))
    # errors change nothing
    snapshot = canon(element)
    with pytest.raises(FieldErrors):
        generic.merge_into(element, {"name": "ok", "devices": {"dsik": []}}, "domain")
    assert canon(element) == snapshot


# ------------------------------------------------------------------------------------------ errors


def test_unknown_key_with_did_you_mean_and_path() -> None:
    [error] = errors_of({"name": "x", "devices": {"disk": [{"type": "file", "tagret": {"dev": "vda"}}]}})
    assert error.path == ("devices", "disk", 0, "tagret")
    assert "did you mean 'target'" in error.message and error.at_key
    [error] = errors_of({"memroy": "1"})
    assert error.path == ("memroy",) and "did you mean 'memory'" in error.message


def test_list_for_a_child_that_cannot_repeat() -> None:
    [error] = errors_of({"os": [{"type": "hvm"}]})
    assert error.path == ("os",) and "cannot repeat" in error.message


def test_single_value_for_a_repeatable_child() -> None:
    [error] = errors_of({"devices": {"disk": {"type": "file"}}})
    assert error.path == ("devices", "disk") and "always a list" in error.message


def test_bad_enumerated_values() -> None:
    [error] = errors_of({"devices": {"disk": [{"type": "fiel"}]}})
    assert error.path == ("devices", "disk", 0, "type") and "did you mean 'file'" in error.message
    [error] = errors_of({"on_poweroff": "destory"})
    assert error.path == ("on_poweroff",) and "did you mean 'destroy'" in error.message
    [error] = errors_of({"forward": {"mode": "nta"}}, "network")
    assert error.path == ("forward", "mode") and "did you mean 'nat'" in error.message


def test_bool_where_the_attribute_is_not_yes_no() -> None:
    [error] = errors_of({"devices": {"disk": [{"type": True}]}})
    assert error.path == ("devices", "disk", 0, "type") and "true/false" in error.message
    [error] = errors_of({"name": False})
    assert error.path == ("name",) and "true/false" in error.message


def test_other_value_errors() -> None:
    errors = errors_of(
        {
            "memory": {"_text": 1.5},
            "devices": {"interface": [{"type": "network", "mac": {"address": 190_000_000}}]},  # unquoted 52:54:… in YAML 1.1
            "title": None,
            "features": {"acpi": "yes"},
            "description": "bell\x07",
        }
    )
    by_path = {e.path: e.message for e in errors}
    assert "quoted string" in by_path[("memory", "_text")]
    assert "quote values such as MAC addresses" in by_path[("devices", "interface", 0, "mac", "address")]
    assert "null" in by_path[("title",)]
    assert "holds no text" in by_path[("features", "acpi")]
    assert "U+0007" in by_path[("description",)]
    errors = errors_of({"metadata": {"_xml": ["<a:b xmlns:a='urn:x'>", 3]}})
    assert {e.path for e in errors} == {("metadata", "_xml", 0), ("metadata", "_xml", 1)}
    [error] = errors_of({"devices": {"_xml": ["<x/>"]}})
    assert error.path == ("devices", "_xml")


def test_import_refuses_what_the_schema_does_not_allow() -> None:
    element = etree.fromstring("<domain type='kvm'><name>x</name><nmae>y</nmae><os bogus='1'/></domain>")
    with pytest.raises(FieldErrors) as caught:
        generic.element_to_data(element, "domain")
    assert {e.path for e in caught.value.errors} == {("nmae",), ("os", "bogus")}
    with pytest.raises(FieldErrors) as caught:
        generic.element_to_data(element, "domain", path=("domain", "web", "libvirt"))
    assert ("domain", "web", "libvirt", "nmae") in {e.path for e in caught.value.errors}
    with pytest.raises(FieldErrors, match="expected a <network> document"):
        generic.element_to_data(element, "network")
    twice = etree.fromstring("<domain><name>x</name><name>y</name></domain>")
    with pytest.raises(FieldErrors, match="more than once"):
        generic.element_to_data(twice, "domain")


# ------------------------------------------------------------------------------------------- model


def test_model_knows_libvirt() -> None:
    # How fast it builds is the benchmark's business (bench/run.py), never a timed assertion here.
    for kind in ("domain", "network", "pool"):
        generic.build_model(kind)
    schema = generic.model("domain")
    root = schema.defs[schema.root]
    assert root.children["devices"].repeat is False and root.children["sysinfo"].repeat is True
    devices = schema.info(root.children["devices"].defs)
    assert devices.children["disk"].repeat and devices.children["disk"].defs
    disk = schema.info(devices.children["disk"].defs)
    source = schema.info(disk.children["source"].defs)  # merged over every disk type
    assert {"file", "dev", "protocol", "pool", "volume", "dir"} <= set(source.attrs)
    assert disk.attrs["type"].enumerated and "file" in disk.attrs["type"].literals
    metadata = schema.info(root.children["metadata"].defs)
    assert metadata.any_children
    assert schema.prefixes["http://libvirt.org/schemas/domain/qemu/1.0"] == "qemu"


# ---------------------------------------------------------------------------------------- property


def _mutate(element: Any, rnd: Any) -> None:
    """Drop random children and shuffle runs of repeated siblings, everywhere in the tree."""
    for node in list(element.iter()):
        children = [c for c in node if isinstance(c.tag, str)]
        for child in children:
            if rnd.random() < 0.15:
                node.remove(child)
        children = [c for c in node if isinstance(c.tag, str)]
        start = 0
        while start < len(children):
            end = start
            while end < len(children) and children[end].tag == children[start].tag:
                end += 1
            run = children[start:end]
            if len(run) > 1:
                first = node.index(run[0])
                for child in run:
                    node.remove(child)
                rnd.shuffle(run)
                for offset, child in enumerate(run):
                    node.insert(first + offset, child)
            start = end


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(min_value=0, max_value=len(FILES) - 1), rnd=st.randoms(use_true_random=False))
def test_property_random_subsets_and_permutations_round_trip(index: int, rnd: Any) -> None:
    kind, path = FILES[index]
    element = parse(path)
    _mutate(element, rnd)
    data = generic.element_to_data(element, kind)
    assert canon(generic.data_to_element(data, kind)) == canon(element)
    assert canon(generic.data_to_element(yaml_round_trip(data), kind)) == canon(element)
