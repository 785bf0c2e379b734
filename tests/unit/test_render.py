"""Rendered libvirt XML: valid against libvirt's RelaxNG schemas, and immune to hostile string values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from lxml import etree

from vmform.errors import ManifestErrors, VmformError
from vmform.live import _read_bound, parse_xml
from vmform.manifest.loader import load_manifests
from vmform.model import Manifests
from vmform.render.validate import InvalidXMLError, schemas_available, validate
from vmform.render.xml import (
    render_domain,
    render_network,
    render_pool,
    render_resource,
    render_volume,
    to_text,
)
from vmform.schema.types import FieldError, Str

PROJECT = "unit"

RICH = """\
pools:
  images:
    path: /var/lib/vmform/images
volumes:
  base: {pool: images, size: 10GiB}
  root: {pool: images, size: 20GiB, backing: base}
  data: {pool: images, format: raw, size: 1GiB}
  scratch: {pool: images}
networks:
  lan:
    mode: nat
    bridge: vmbr-lan
    ipv4: 10.40.0.1/24
    dhcp: {start: 10.40.0.100, end: 10.40.0.200}
    mtu: 9000
    domain: lan.test
  routed: {mode: route, ipv4: 10.41.0.1/16}
  opened: {mode: open, ipv4: 10.42.0.1/24}
  host: {mode: bridge, bridge: br0}
  bare: {}
domains:
  web:
    description: web server
    type: kvm
    arch: x86_64
    machine: q35
    vcpus: 2
    max_vcpus: 8
    memory: 1GiB
    max_memory: 4GiB
    boot: [hd, cdrom, network]
    disks: [root, {volume: data, bus: sata, readonly: true}, {volume: scratch, bus: scsi}]
    interfaces: [lan, {bridge: br0, mac: "52:54:00:aa:bb:cc", model: e1000e}, {network: routed, model: rtl8139}]
    graphics: vnc
  desktop:
    type: qemu
    arch: aarch64
    graphics: spice
    serial_console: false
    disks: [{volume: base, bus: usb}, {volume: data, bus: ide}]
  tiny: {}
"""


def load(tmp_path: Path, text: str) -> Manifests:
    path = tmp_path / "manifest.yaml"
    path.write_text(text, encoding="utf-8")
    return load_manifests(PROJECT, [path], root=tmp_path)


def render(manifests: Manifests, address: str) -> etree._Element:
    resource = manifests.resources[address]
    return render_resource(resource.kind.name, resource.libvirt_name, resource.desired, PROJECT, address,
                           backing_path="/var/lib/vmform/images/base")


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> Manifests:
    return load(tmp_path_factory.mktemp("rich"), RICH)


RICH_ADDRESSES = [
    "pool.images", "volume.base", "volume.root", "volume.data", "volume.scratch", "network.lan", "network.routed",
    "network.opened", "network.host", "network.bare", "domain.web", "domain.desktop", "domain.tiny",
]


def test_schemas_are_installed() -> None:
    # Without libvirt's schemas validate() silently accepts everything; these tests would prove nothing.
    assert schemas_available()


def test_rich_manifest_is_complete(rich: Manifests) -> None:
    assert sorted(rich.resources) == sorted(RICH_ADDRESSES)


@pytest.mark.parametrize("address", RICH_ADDRESSES)
def test_rendered_document_validates(rich: Manifests, address: str) -> None:
    root = render(rich, address)
    validate(address.split(".")[0], root, address)
    # and the serialised text, as sent to libvirt, too
    validate(address.split(".")[0], parse_xml(to_text(root)), address)


BROKEN = [
    ("domain.web", lambda root: etree.SubElement(root.find("devices"), "bogus")),
    ("domain.web", lambda root: root.find("vcpu").__setattr__("text", "many")),
    ("domain.tiny", lambda root: root.set("type", "vmware-please")),
    ("network.lan", lambda root: root.find("forward").set("mode", "teleport")),
    ("pool.images", lambda root: root.remove(root.find("target"))),
    ("volume.root", lambda root: root.find("capacity").__setattr__("text", "-5")),
]


@pytest.mark.parametrize(("address", "breaker"), BROKEN, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BROKEN)])
def test_broken_document_is_refused(rich: Manifests, address: str, breaker: Any) -> None:
    root = render(rich, address)
    breaker(root)
    with pytest.raises(InvalidXMLError) as info:
        validate(address.split(".")[0], root, address)
    assert address in str(info.value)
    assert ".rng" in str(info.value)


# --- injection ----------------------------------------------------------------------------------------

HOSTILE = [
    "a'/><qemu:commandline><qemu:arg value='-evil'/></qemu:commandline>",
    'a"/><devices><hostdev mode="subsystem"/></devices>',
    "]]><x>",
    "<![CDATA[</description><x/>]]>",
    "&xxe;",
    "&amp;&lt;&#x41;",
    '<!DOCTYPE d [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
    "<?xml version='1.0'?><domain/>",
    "--><!--x",
    "'\"`$(reboot)`;",
    "Ünïcødé — 日本語 🚀 \u200b\u202e",
    "tab\tand\nnewline inside",
]
BENIGN = "plain text"


def element_tags(root: etree._Element) -> list[str]:
    return sorted(str(node.tag) for node in root.iter())


def manifest_with_description(description: str) -> str:
    return yaml.safe_dump({
        "pools": {"images": {"path": "/var/lib/vmform/images"}},
        "volumes": {"root": {"pool": "images", "size": "1GiB"}},
        "networks": {"lan": {"mode": "nat", "ipv4": "10.40.0.1/24"}},
        "domains": {"web": {"description": description, "disks": ["root"], "interfaces": ["lan"]}},
    }, allow_unicode=True)


def _round_trip_description(tmp_path: Path, description: str) -> tuple[list[str], Any]:
    manifests = load(tmp_path, manifest_with_description(description))
    assert manifests.resources["domain.web"].desired["description"] == description
    root = render(manifests, "domain.web")
    validate("domain", root, "domain.web")
    text = to_text(root)
    parsed = parse_xml(text)
    return element_tags(parsed), _read_bound("domain", parsed)["description"]


@pytest.fixture(scope="module")
def benign_tags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tags, value = _round_trip_description(tmp_path_factory.mktemp("benign"), BENIGN)
    assert value == BENIGN
    return tags


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_description_keeps_structure_and_round_trips(tmp_path: Path, benign_tags: list[str], value: str) -> None:
    tags, read_back = _round_trip_description(tmp_path, value)
    assert tags == benign_tags
    assert read_back == value


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_names_in_rendered_documents(value: str) -> None:
    """Names reach render_* only after the loader's NAME check, but the renderer must not depend on it."""
    benign = {
        "domain": render_domain("web", {"description": "x"}, PROJECT, "domain.web"),
        "network": render_network("lan", {"mode": "isolated"}, PROJECT, "network.lan"),
        "pool": render_pool("images", {"type": "dir", "path": "/var/lib/vmform/images"}),
        "volume": render_volume("vol", {"format": "qcow2"}, 1024**3),
    }
    hostile = {
        "domain": render_domain(value, {"description": value}, value, value),
        "network": render_network(value, {"mode": "isolated"}, value, value),
        "pool": render_pool(value, {"type": "dir", "path": "/var/lib/vmform/" + value}),
        "volume": render_volume(value, {"format": "qcow2"}, 1024**3),
    }
    for kind, root in hostile.items():
        parsed = parse_xml(to_text(root))
        assert element_tags(parsed) == element_tags(benign[kind]), kind
        assert parsed.findtext("name") == value
    pool = parse_xml(to_text(hostile["pool"]))
    # the binding normalises the path (os.path.normpath) and strips it (see the whitespace xfail below)
    assert _read_bound("pool", pool)["path"] == os.path.normpath("/var/lib/vmform/" + value.strip())
    owner = parse_xml(to_text(hostile["domain"])).find("metadata/{https://vmform.dev/xmlns/owner/1}owner")
    assert owner is not None and owner.get("project") == value and owner.get("address") == value


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_pool_path_round_trips(tmp_path: Path, value: str) -> None:
    text = yaml.safe_dump({"pools": {"images": {"path": "/var/lib/vmform/x" + value}}}, allow_unicode=True)
    if "\n" in value or "\r" in value:
        # libvirt's path types refuse line breaks: refused at the manifest's line, before anything is rendered
        with pytest.raises(ManifestErrors, match="an absolute path"):
            load(tmp_path, text)
        return
    manifests = load(tmp_path, text)
    root = render(manifests, "pool.images")
    validate("pool", root, "pool.images")
    parsed = parse_xml(to_text(root))
    assert element_tags(parsed) == ["name", "path", "pool", "target"]
    assert _read_bound("pool", parsed)["path"] == manifests.resources["pool.images"].desired["path"]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("section", ["domains", "networks", "pools"])
def test_hostile_resource_names_are_refused_by_the_loader(tmp_path: Path, section: str, value: str) -> None:
    body: dict[str, Any] = {"path": "/var/lib/vmform/images"} if section == "pools" else {}
    with pytest.raises(ManifestErrors):
        load(tmp_path, yaml.safe_dump({section: {"ok": {**body, "name": value}}}, allow_unicode=True))
    with pytest.raises(ManifestErrors):
        load(tmp_path, yaml.safe_dump({section: {value: body}}, allow_unicode=True))


# --- random description text ----------------------------------------------------------------------------

# Characters XML 1.0 allows: #x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] | [#x10000-#x10FFFF]
XML_CHARS = st.characters(
    blacklist_categories=("Cs",),
    blacklist_characters=[chr(c) for c in range(0x20) if c not in (0x9, 0xA, 0xD)] + ["\ufffe", "\uffff"],
)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(XML_CHARS, max_size=80))
def test_random_description_round_trips(tmp_path: Path, benign_tags: list[str], text: str) -> None:
    assume(text == text.strip())  # surrounding whitespace: see test_description_whitespace_round_trips
    assume("\r" not in text)  # YAML folds CR line breaks; a manifest cannot carry one
    tags, read_back = _round_trip_description(tmp_path, text)
    assert tags == benign_tags
    assert read_back == (text or None)  # an empty <description/> reads as None; live.read_domain maps it to ""


@pytest.mark.parametrize("value", ["web server\n", "  indented", "tab\t"])
def test_description_whitespace_round_trips(tmp_path: Path, value: str) -> None:
    _, read_back = _round_trip_description(tmp_path, value)
    assert read_back == value


CONTROL = [chr(c) for c in (0x1, 0x8, 0xB, 0xC, 0x1B, 0x1F)] + ["\ufffe"]


@pytest.mark.parametrize("char", CONTROL, ids=[f"U+{ord(c):04X}" for c in CONTROL])
def test_control_characters_give_a_clean_error(tmp_path: Path, char: str) -> None:
    try:
        manifests = load(tmp_path, manifest_with_description(f"bell{char}here"))
    except ManifestErrors:
        return  # refused by the loader with a position: fine
    try:
        render(manifests, "domain.web")
    except VmformError:
        return
    pytest.fail("a description lxml cannot write was neither refused nor rendered")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=["\x00"]), min_size=1,
                    max_size=20))
def test_any_loadable_description_renders_or_fails_cleanly(text: str) -> None:
    """Every text Str() accepts (all but NUL) either renders into a valid document of the usual structure or
    is refused with a vmform error -- never a raw lxml exception."""
    try:
        assert Str().parse(text) == text
    except FieldError:
        return  # refused at load time, with the field's position
    try:
        root = render_domain("web", {"description": text}, PROJECT, "domain.web")
    except VmformError:
        return
    validate("domain", root, "domain.web")
    assert element_tags(parse_xml(to_text(root))) == element_tags(
        render_domain("web", {"description": "x"}, PROJECT, "domain.web"))
