"""Defaults people rely on (serial console, virtio RNG, guest agent channel, UEFI, machine type): what a new
domain gets, how each is switched off, and the record that keeps an existing domain at the defaults it was
created with, so a newer vmform with other defaults plans no change to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from vmform.diff import compare, make_plan
from vmform.graph import build_graph, creation_order
from vmform.live import LiveState, domain_object, parse_xml
from vmform.model import Manifests
from vmform.ownership import Ledger
from vmform.plan import Action
from vmform.render.xml import render_domain, to_text
from vmform.schema import domain as domain_schema
from vmform.schema.registry import KINDS

DOMAIN = KINDS["domain"]


def _spec(name: str) -> Any:
    spec = DOMAIN.spec(name)
    assert spec is not None
    return spec


@contextmanager
def _default(name: str, value: Any) -> Iterator[None]:
    """This vmform's default for one field changed (as a newer vmform might)."""
    spec = _spec(name)
    old = spec.default
    object.__setattr__(spec, "default", value)
    try:
        yield
    finally:
        object.__setattr__(spec, "default", old)


def _printed(root: Any) -> Any:
    """What libvirt prints back for a domain vmform rendered: the machine alias resolved."""
    printed = parse_xml(to_text(root))
    type_node = printed.find("os/type")
    type_node.set("arch", "x86_64")
    if type_node.get("machine") == "pc":
        type_node.set("machine", "pc-i440fx-7.2")
    elif type_node.get("machine") == "q35":
        type_node.set("machine", "pc-q35-7.2")
    return printed


def _live(root: Any, project: str = "unit", address: str = "domain.web") -> Any:
    obj = domain_object("web", "6f1c2a7e-3b1d-4f7a-9c55-2f0d8f4e9a10", root, None, "stopped", False, project)
    assert obj.address == address
    return obj


MANIFEST = "domains:\n  web: {type: qemu, memory: 64MiB, state: stopped}\n"


def test_a_new_domain_gets_every_default(load_files: Callable[..., Manifests]) -> None:
    desired = load_files({"m.yaml": MANIFEST}).resources["domain.web"].desired
    assert desired["machine"] == "pc" and desired["firmware"] == "bios"
    assert desired["rng"] is True and desired["guest_agent"] is True and desired["serial_console"] is True
    root = render_domain("web", desired, "unit", "domain.web")
    assert root.find("os").get("firmware") is None  # bios: SeaBIOS, libvirt's default, needs no descriptor
    assert root.find("os/type").get("machine") == "pc"
    assert root.find("devices/rng/backend").text == "/dev/urandom"
    channel = root.find("devices/channel")
    assert channel.get("type") == "unix" and channel.find("target").attrib == {
        "type": "virtio", "name": "org.qemu.guest_agent.0"}
    assert root.find("devices/serial") is not None and root.find("devices/console") is not None
    assert domain_schema.read_defaults_record(root) == {
        "machine": "pc", "firmware": "bios", "serial_console": True, "rng": True, "guest_agent": True}


def test_uefi_through_libvirts_auto_selection(load_files: Callable[..., Manifests]) -> None:
    desired = load_files({"m.yaml": MANIFEST.replace("state: stopped", "state: stopped, firmware: efi")}
                         ).resources["domain.web"].desired
    root = render_domain("web", desired, "unit", "domain.web")
    assert root.find("os").get("firmware") == "efi"
    assert root.find("os/loader") is None and root.find("os/nvram") is None  # never a distro OVMF path


def test_each_default_switched_off(load_files: Callable[..., Manifests]) -> None:
    text = ("domains:\n  web: {type: qemu, memory: 64MiB, rng: false, guest_agent: false, serial_console: false, "
            "firmware: bios}\n")
    desired = load_files({"m.yaml": text}).resources["domain.web"].desired
    root = render_domain("web", desired, "unit", "domain.web")
    assert root.find("os").get("firmware") is None  # SeaBIOS: libvirt's default, no firmware descriptor needed
    for path in ("devices/rng", "devices/channel", "devices/serial", "devices/console", "os/loader"):
        assert root.find(path) is None, path


def test_machine_default_follows_arch(load_files: Callable[..., Manifests]) -> None:
    text = "domains:\n  arm: {arch: aarch64}\n  x86: {arch: x86_64}\n  set: {machine: q35}\n"
    resources = load_files({"m.yaml": text}).resources
    assert resources["domain.arm"].desired["machine"] == "virt"
    assert resources["domain.x86"].desired["machine"] == "pc"
    assert resources["domain.set"].desired["machine"] == "q35"


@pytest.mark.parametrize("name, newer", [("machine", "q35"), ("firmware", "efi"), ("rng", False),
                                         ("guest_agent", False), ("serial_console", False)])
def test_a_newer_default_plans_no_change_to_an_existing_domain(
        name: str, newer: Any, load_files: Callable[..., Manifests], monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = load_files({"m.yaml": MANIFEST})
    resource = manifests.resources["domain.web"]
    live = _live(_printed(render_domain("web", resource.desired, "unit", "domain.web")))
    assert compare(resource, live) == ([], [], [])
    # A newer vmform with another default: the same manifest, loaded again, desires the new default ...
    if name == "machine":
        monkeypatch.setitem(domain_schema.MACHINE_DEFAULTS, None, newer)
        newer_manifests = load_files({"m.yaml": MANIFEST})
    else:
        with _default(name, newer):
            newer_manifests = load_files({"m.yaml": MANIFEST})
    newer_resource = newer_manifests.resources["domain.web"]
    assert newer_resource.desired.get(name) != resource.desired[name]
    # ... but the existing domain keeps the default it was created with: no change.
    assert compare(newer_resource, live) == ([], [], [])
    graph = build_graph(newer_manifests)
    order = creation_order(graph)
    plan = make_plan(newer_manifests, graph, LiveState("test:///", [live], Ledger("unit")), order)
    assert plan.changes == ()


def test_a_new_domain_of_a_newer_vmform_gets_the_newer_default(
        load_files: Callable[..., Manifests], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(domain_schema.MACHINE_DEFAULTS, None, "q35")
    resource = load_files({"m.yaml": MANIFEST}).resources["domain.web"]
    root = render_domain("web", resource.desired, "unit", "domain.web")
    assert root.find("os/type").get("machine") == "q35"
    assert domain_schema.read_defaults_record(root)["machine"] == "q35"


def test_a_replaced_domain_gets_this_vmforms_defaults(load_files: Callable[..., Manifests],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = load_files({"m.yaml": MANIFEST})
    live = _live(_printed(render_domain("web", manifests.resources["domain.web"].desired, "unit", "domain.web")))
    monkeypatch.setitem(domain_schema.MACHINE_DEFAULTS, None, "q35")
    renamed = load_files({"m.yaml": MANIFEST.replace("state: stopped", "state: stopped, name: web2")})
    graph = build_graph(renamed)
    order = creation_order(graph)
    plan = make_plan(renamed, graph, LiveState("test:///", [live], Ledger("unit")), order)
    (change,) = plan.changes
    assert change.action is Action.DELETE_THEN_CREATE
    assert change.after["machine"] == "q35"  # the new domain is made with today's defaults


def test_stated_values_win_over_the_record(load_files: Callable[..., Manifests]) -> None:
    manifests = load_files({"m.yaml": MANIFEST})
    live = _live(_printed(render_domain("web", manifests.resources["domain.web"].desired, "unit", "domain.web")))
    stated = load_files({"m.yaml": MANIFEST.replace("state: stopped", "state: stopped, rng: false, machine: q35")})
    changes, _, _ = compare(stated.resources["domain.web"], live)
    assert {c.path for c in changes} == {"rng", "machine"}


def test_record_with_unknown_values_leaves_the_field_unmanaged() -> None:
    root = parse_xml("<domain><metadata><d:defaults xmlns:d='https://vmform.dev/xmlns/defaults/1' "
                     "firmware='coreboot' rng='yes'/></metadata></domain>")
    assert domain_schema.read_defaults_record(root) == {"rng": True}
    assert domain_schema.read_defaults_record(parse_xml("<domain/>")) is None


def test_a_new_arch_takes_this_vmforms_machine_for_it(load_files: Callable[..., Manifests]) -> None:
    manifests = load_files({"m.yaml": MANIFEST})
    live = _live(_printed(render_domain("web", manifests.resources["domain.web"].desired, "unit", "domain.web")))
    moved = load_files({"m.yaml": MANIFEST.replace("state: stopped", "state: stopped, arch: aarch64")})
    changes, _, _ = compare(moved.resources["domain.web"], live)
    assert {(c.path, c.after) for c in changes} == {("arch", "aarch64"), ("machine", "virt")}
