"""The curated domain fields: each renders to XML libvirt's schema accepts, reads back through its own binding
to the desired value, survives a define on the real daemon (what libvirt 9 prints back compares equal), and
reads from XML written by other tools (virt-install, hand-written OVMF loaders)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmform.errors import ManifestErrors
from vmform.live import _read_bound, parse_xml
from vmform.model import Manifests
from vmform.render.validate import schemas_available, validate
from vmform.render.xml import render_domain, to_text, write_fields
from vmform.schema.domain import machine_matches
from vmform.schema.registry import KINDS

PROJECT = "unit"
FIELDS = KINDS["domain"]

# Manifest snippets of one domain (type qemu) exercising each new field; the key names the case.
CASES: dict[str, str] = {
    "firmware_efi": "firmware: efi",
    "firmware_bios": "firmware: bios",
    "secure_boot_on": "{machine: q35, firmware: efi, secure_boot: true}",
    "secure_boot_off": "{machine: q35, firmware: efi, secure_boot: false}",
    "cpu_passthrough": "cpu: host-passthrough",
    "cpu_host_model": "cpu: {mode: host-model}",
    "cpu_maximum": "cpu: maximum",
    "cpu_custom": "cpu: {mode: custom, model: Skylake-Client}",
    "disk_path_file": "disks: [{path: /var/lib/vmform/t-a.qcow2, format: qcow2, cache: none, serial: disk-a1}]",
    "disk_path_block": "disks: [{path: /dev/vmform-test-nonexistent, format: raw, bus: scsi}]",
    "disk_cdrom_empty": "disks: [{device: cdrom}]",
    "disk_cdrom_iso": "disks: [{device: cdrom, path: /var/lib/vmform/t-seed.iso, format: raw, bus: ide}]",
    "disk_mixed": (
        "disks: [{path: /var/lib/vmform/t-a.raw, format: raw, bus: sata, cache: writeback},"
        " {device: cdrom}, {path: /var/lib/vmform/t-b.qcow2, format: qcow2, readonly: true}]"
    ),
    "video_virtio": "{graphics: vnc}",
    "video_qxl": "{graphics: spice, video: qxl}",
    "video_vga": "{graphics: vnc, video: vga}",
    "video_none": "{graphics: vnc, video: none}",
    "video_bochs_headless": "video: bochs",
    "video_ramfb": "{graphics: vnc, video: ramfb}",
    "rng_on": "rng: true",
    "rng_off": "rng: false",
    "guest_agent_on": "guest_agent: true",
    "guest_agent_off": "guest_agent: false",
    "defaults_off": "{rng: false, guest_agent: false, serial_console: false, firmware: bios}",
    "tpm_emulated": "tpm: emulated",
    "tpm_none": "tpm: none",
    "filesystems": (
        "filesystems: [{source: /var/lib/vmform/t-share, target: share},"
        " {source: /srv, target: srv, driver: 9p}]"
    ),
    "hostdevs": "hostdevs: [\"0000:00:1f.3\", {pci: \"0000:00:1d.0\"}]",
}


@pytest.fixture
def desired(load_files: Callable[..., Manifests]) -> Callable[[str], dict[str, Any]]:
    def make(snippet: str) -> dict[str, Any]:
        manifests = load_files({"m.yaml": "domains:\n  probe:\n    type: qemu\n    memory: 64MiB\n"
                                          f"    state: stopped\n  other: {_settings(snippet)}\n"})
        values = dict(manifests.resources["domain.other"].desired)
        values["type"] = "qemu"
        return values

    return make


def _settings(snippet: str) -> str:
    body = snippet.strip()
    body = body[1:-1] if body.startswith("{") else body
    return "{allow: [host_paths, host_devices], " + body + "}"  # path disks, shares and hostdevs need them


def _bound(values: dict[str, Any]) -> dict[str, Any]:
    """The desired values of the fields that have a binding (what a read gives back)."""
    return {s.name: values[s.name] for s in FIELDS.fields if s.binding is not None and s.name in values}


def _read(root: Any) -> dict[str, Any]:
    values = _read_bound("domain", root)
    values["description"] = values.get("description") or ""
    return values


@pytest.mark.parametrize("case", list(CASES))
def test_render_validate_read_back(case: str, desired: Callable[[str], dict[str, Any]]) -> None:
    values = desired(CASES[case])
    root = render_domain("vmftest-fields-x", values, PROJECT, "domain.other")
    if schemas_available():
        validate("domain", root, "domain.other")
    read = _read(parse_xml(to_text(root)))
    for name, value in _bound(values).items():
        assert read[name] == value, f"{case}: {name} in\n{to_text(root)}"


# --- the real daemon: define, read back what libvirt prints, compare -----------------------------------------


@pytest.fixture(scope="module")
def daemon() -> Iterator[Any]:
    try:
        import libvirt
    except ImportError:  # pragma: no cover
        pytest.skip("libvirt-python is not installed")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:  # pragma: no cover - needs the daemon
        pytest.skip(f"no libvirtd: {exc}")
    yield conn
    conn.close()


def _define_and_read(conn: Any, root: Any) -> Any:
    import libvirt

    name = f"vmftest-fields-{secrets.token_hex(4)}"
    root.find("name").text = name
    dom = conn.defineXML(to_text(root))
    try:
        return parse_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    finally:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


@pytest.mark.parametrize("case", list(CASES))
def test_libvirt_prints_back_equal(case: str, desired: Callable[[str], dict[str, Any]], daemon: Any) -> None:
    values = desired(CASES[case])
    printed = _define_and_read(daemon, render_domain("x", values, PROJECT, "domain.other"))
    read = _read(printed)
    for name, value in _bound(values).items():
        if name == "machine":
            continue  # libvirt canonicalises the alias (q35 -> pc-q35-7.2): a known, separately handled rewrite
        assert read[name] == value, f"{case}: {name} after define"
    # Writing the same values into what libvirt printed changes nothing it would print differently.
    again = parse_xml(to_text(printed))
    write_fields("domain", again, {k: v for k, v in values.items() if k != "machine"})
    assert _read(again) == read


def test_update_in_place_keeps_addresses_and_switches_fields(desired: Callable[[str], dict[str, Any]],
                                                              daemon: Any) -> None:
    before = desired("{graphics: vnc, video: qxl, disks: [{path: /var/lib/vmform/t-a.raw, format: raw}], "
                     "filesystems: [{source: /srv, target: srv, driver: 9p}], tpm: emulated, rng: true}")
    printed = _define_and_read(daemon, render_domain("x", before, PROJECT, "domain.other"))
    disk_address = printed.find("devices/disk/address")
    assert disk_address is not None
    after = desired("{graphics: vnc, video: virtio, disks: [{path: /var/lib/vmform/t-b.qcow2, format: qcow2, "
                    "cache: none}], filesystems: [{source: /srv, target: srv}], tpm: none, rng: false, "
                    "cpu: {mode: custom, model: qemu64}}")
    write_fields("domain", printed, after)
    validate("domain", printed, "domain.other")
    assert printed.find("devices/disk/address").attrib == disk_address.attrib  # type: ignore[union-attr]
    reprinted = _define_and_read(daemon, printed)
    read = _read(reprinted)
    for name, value in _bound(after).items():
        if name == "machine":  # the default alias (pc) comes back as libvirt's versioned type
            assert machine_matches(read[name], value), name
            continue
        assert read[name] == value, name
    assert reprinted.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]


# --- XML other tools write ----------------------------------------------------------------------------------


def _domain(os_xml: str = "", devices: str = "") -> Any:
    return parse_xml(f"<domain type='kvm'><name>x</name><os>{os_xml}<type>hvm</type></os>"
                     f"<devices>{devices}</devices></domain>")


def test_legacy_ovmf_loader_reads_as_efi() -> None:
    root = _domain("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
                   "<nvram>/var/lib/libvirt/qemu/nvram/x_VARS.fd</nvram>")
    assert FIELDS.spec("firmware").binding.read(root) == "efi"  # type: ignore[union-attr]
    assert FIELDS.spec("secure_boot").binding.read(root) is False  # type: ignore[union-attr]
    secure = _domain("<loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>")
    assert FIELDS.spec("secure_boot").binding.read(secure) is True  # type: ignore[union-attr]
    # Asking for efi again changes nothing: the hand-picked loader stays.
    FIELDS.spec("firmware").binding.write(root, "efi")  # type: ignore[union-attr]
    assert root.find("os/loader") is not None and root.find("os").get("firmware") is None


def test_bios_drops_efi_loader() -> None:
    root = _domain("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>/x</nvram>")
    FIELDS.spec("firmware").binding.write(root, "bios")  # type: ignore[union-attr]
    assert root.find("os/loader") is None and root.find("os/nvram") is None
    assert FIELDS.spec("firmware").binding.read(root) == "bios"  # type: ignore[union-attr]


def test_tpm_tis_and_passthrough() -> None:
    tis = _domain(devices="<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>")
    assert FIELDS.spec("tpm").binding.read(tis) == "emulated"  # type: ignore[union-attr]
    host = _domain(devices="<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>")
    assert FIELDS.spec("tpm").binding.read(host) is None  # type: ignore[union-attr]


def test_virt_install_filesystem_without_driver_is_9p() -> None:
    root = _domain(devices="<filesystem type='mount' accessmode='mapped'><source dir='/srv'/>"
                           "<target dir='srv'/></filesystem>")
    assert FIELDS.spec("filesystems").binding.read(root) == [  # type: ignore[union-attr]
        {"source": "/srv", "target": "srv", "driver": "9p"}
    ]


def test_cpu_model_without_mode_is_custom() -> None:
    root = parse_xml("<domain><cpu><model>Haswell</model></cpu></domain>")
    assert FIELDS.spec("cpu").binding.read(root) == {"mode": "custom", "model": "Haswell"}  # type: ignore[union-attr]


@pytest.mark.parametrize(("snippet", "message"), [
    ("disks: [{path: /var/lib/x.img}]", "needs 'format'"),
    ("disks: [{readonly: true}]", "'volume' is required"),
    ("firmware: bios\n    secure_boot: true", "secure_boot needs firmware: efi"),
    ("cpu: custom", "cpu mode custom needs 'model'"),
    ("cpu: {mode: host-model, model: Haswell}", "only to cpu mode custom"),
    ("hostdevs: [\"0000:01:00.0\", \"0000:01:00.0\"]", "already used"),
    ("hostdevs: [\"01:00.0\"]", "not valid here"),
    ("filesystems: [{source: srv, target: x}]", "not valid here"),
])
def test_checks(snippet: str, message: str, load_files: Callable[..., Manifests]) -> None:
    with pytest.raises(ManifestErrors) as info:
        load_files({"m.yaml": f"domains:\n  web:\n    {snippet}\n"})
    assert any(message in str(e) for e in info.value.errors), [str(e) for e in info.value.errors]


def test_cdrom_defaults(desired: Callable[[str], dict[str, Any]]) -> None:
    values = desired("disks: [{path: /var/lib/a.img, format: raw}, {device: cdrom}, {device: cdrom}]")
    assert [(d["target"], d["bus"], d["readonly"]) for d in values["disks"]] == [
        ("vda", "virtio", False), ("sda", "sata", True), ("sdb", "sata", True)
    ]
