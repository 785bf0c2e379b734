"""Defaults on the real daemon (serial console, virtio RNG, guest agent channel, UEFI, machine type), each switched
off, kept per domain across a change of vmform's defaults; and waiting on libvirt's events (guest agent
connected, DHCP lease, ACPI shutdown) with the small test guest under TCG."""

from __future__ import annotations

from typing import Any

import pytest

from tests.guest.build import INIT_PROLOGUE, build_guest
from vmform import api, guests
from vmform.events import Watch
from vmform.journal import serving
from vmform.live import parse_xml
from vmform.plan import Action, Change, FieldChange
from vmform.providers import domain as domain_provider
from vmform.schema import domain as domain_schema
from vmform.schema.types import Effect

pytestmark = pytest.mark.libvirt

AGENT = "org.qemu.guest_agent.0"


def _xml(conn: Any, name: str, inactive: bool = True) -> Any:
    import libvirt

    return parse_xml(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0))


def _devices(root: Any) -> dict[str, bool]:
    return {
        "serial": root.find("devices/serial") is not None and root.find("devices/console") is not None,
        "rng": root.find("devices/rng[@model='virtio']/backend[@model='random']") is not None,
        "agent": root.find(f"devices/channel[@type='unix']/target[@type='virtio'][@name='{AGENT}']") is not None,
        "efi": root.find("os").get("firmware") == "efi",
    }


def test_defaults_apply_replan_and_each_switches_off(project: Any, conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    p = project.prefix
    project.write(f"""
    domains:
      dflt: {{name: {p}-on, type: qemu, memory: 128MiB, state: stopped}}
      uefi: {{name: {p}-uefi, type: qemu, memory: 128MiB, state: stopped, firmware: efi}}
      bare:
        name: {p}-off
        type: qemu
        memory: 128MiB
        state: stopped
        rng: false
        guest_agent: false
        serial_console: false
        firmware: bios
    """)
    project.apply()
    assert "No changes." in project.run("plan", check=True).stdout

    on, off, uefi = _xml(conn, f"{p}-on"), _xml(conn, f"{p}-off"), _xml(conn, f"{p}-uefi")
    assert _devices(on) == {"serial": True, "rng": True, "agent": True, "efi": False}
    assert on.find("devices/rng/backend").text == "/dev/urandom"
    assert on.find("os/type").get("machine").startswith("pc-i440fx-")  # vmform's default, resolved by libvirt
    record = domain_schema.read_defaults_record(on)
    assert record == {"machine": "pc", "firmware": "bios", "serial_console": True, "rng": True, "guest_agent": True}
    assert _devices(uefi) == {"serial": True, "rng": True, "agent": True, "efi": True}
    assert uefi.find("os/loader") is None, "UEFI through libvirt's auto-selection, never an OVMF path"
    assert _devices(off) == {"serial": False, "rng": False, "agent": False, "efi": False}
    assert off.find("os").get("firmware") is None  # bios: SeaBIOS, which needs no firmware descriptor

    # Both start: UEFI picked by libvirt, and the domain without UEFI on SeaBIOS.
    project.write((project.root / "main.yaml").read_text().replace("state: stopped", "state: running"))
    project.apply()
    assert "No changes." in project.run("plan", check=True).stdout
    running = _xml(conn, f"{p}-uefi", inactive=False)
    assert running.find("os/loader") is not None and "OVMF" in running.find("os/loader").text
    project.write((project.root / "main.yaml").read_text().replace("state: running", "state: stopped"))
    project.apply()

    # Switching each default off on the existing domain removes its device.
    text = (project.root / "main.yaml").read_text()
    project.write(text.replace("state: stopped}", "state: stopped, rng: false, guest_agent: false, "
                               "serial_console: false}", 1).replace("firmware: efi}", "firmware: bios}"))
    planned = {c["address"]: {f["path"] for f in c["fields"]} for c in project.plan_json()["changes"]}
    assert planned == {"domain.dflt": {"rng", "guest_agent", "serial_console"}, "domain.uefi": {"firmware"}}
    project.apply()
    assert "No changes." in project.run("plan", check=True).stdout
    assert _devices(_xml(conn, f"{p}-on")) == {"serial": False, "rng": False, "agent": False, "efi": False}
    assert _devices(_xml(conn, f"{p}-uefi"))["efi"] is False
    # ... and removing the switches brings the defaults the domain was created with back.
    project.write(text)
    project.apply()
    assert _devices(_xml(conn, f"{p}-on")) == {"serial": True, "rng": True, "agent": True, "efi": False}
    assert _devices(_xml(conn, f"{p}-uefi"))["efi"] is True
    assert "No changes." in project.run("plan", check=True).stdout

    # A newer vmform with other defaults (q35, UEFI, no RNG, no agent) plans no change to these domains.
    monkeypatch.setitem(domain_schema.MACHINE_DEFAULTS, None, "q35")
    specs = {name: domain_schema.KIND.spec(name) for name in ("firmware", "rng", "guest_agent")}
    newer = {"firmware": "efi", "rng": False, "guest_agent": False}
    old = {name: spec.default for name, spec in specs.items()}  # type: ignore[union-attr]
    try:
        for name, value in newer.items():
            object.__setattr__(specs[name], "default", value)
        workspace = api.load_workspace(project.root)
        assert workspace.manifests.resources["domain.dflt"].desired["machine"] == "q35"
        connections = api.connect(workspace)
        try:
            plan = api.plan(workspace, connections)
        finally:
            connections.close()
    finally:
        for name, value in old.items():
            object.__setattr__(specs[name], "default", value)
    assert plan.changes == (), [c.address for c in plan.changes]


GUEST_INIT = INIT_PROLOGUE + r"""
echo "vmf: booted"
# The guest agent's virtio-serial port: a guest opening it is what libvirt reports as the agent connecting.
sleep 15
port=""
for dir in /sys/class/virtio-ports/*; do
    if [ "$(cat "$dir/name" 2>/dev/null)" = "org.qemu.guest_agent.0" ]; then port="/dev/$(basename "$dir")"; fi
done
echo "agent port: $port"
exec 3<>"$port"
echo "vmf: agent port open"
ip link set lo up
ip link set eth0 up
if udhcpc -i eth0 -n -q -t 20 -T 2 -s /bin/true >/dev/null 2>&1; then echo "dhcp: lease ok"; else echo "dhcp: no lease"; fi
while :; do sleep 60; done
"""


class _Recording(Watch):
    """A Watch that keeps what it saw for the test."""

    log: list[tuple[int, tuple[Any, ...]]] = []

    def close(self) -> None:
        _Recording.log.extend(self.seen)
        super().close()


def test_waits_use_events(project: Any, conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt

    guest = build_guest(GUEST_INIT)
    p, subnet = project.prefix, project.subnet
    project.write(f"""
    networks:
      lan: {{name: {p}-lan, mode: isolated, bridge: BRP0, ipv4: {subnet}.1/24,
             dhcp: {{start: {subnet}.100, end: {subnet}.150}}}}
    domains:
      g:
        name: {p}-g
        type: qemu
        memory: 192MiB
        kernel: {guest.kernel}
        initrd: {guest.initrd}
        cmdline: "console=ttyS0 quiet"
        console_log: true
        interfaces: [lan]
        allow: [host_paths]     # the test kernel and initrd live outside the pools
    """)
    project.apply()
    monkeypatch.setattr(guests, "Watch", _Recording)
    monkeypatch.setattr(domain_provider, "Watch", _Recording)
    _Recording.log = []
    workspace = api.load_workspace(project.root)
    connections = api.connect(workspace)
    try:
        dom = connections.main.lookupByName(f"{p}-g")
        assert not guests.agent_connected(dom), "the guest opens the agent port only after a while"
        # The guest agent: woken by AGENT_LIFECYCLE (connected), bounded by the timeout.
        assert api.wait_for_agents(workspace, connections, 240) == ["domain.g"]
        assert guests.agent_connected(dom)
        agent_events = [args for event_id, args in _Recording.log if event_id == libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE]
        assert any(args[1] == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED for args in agent_events), \
            _Recording.log
        # An address from the network's DHCP lease (libvirt has no lease event: re-read, bounded).
        outputs = api.wait_for_addresses(workspace, connections, 240)
        (output,) = outputs
        assert output.addresses and output.addresses[0].ip.startswith(f"{subnet}.")
        # A clean ACPI shutdown, waited for on the STOPPED lifecycle event: the guest powered itself off.
        _Recording.log = []
        # As apply stops it: serving a planned change of its state (the journal refuses a stop outside one).
        stopping = Change("domain.g", "domain", f"{p}-g", Action.UPDATE,
                          fields=(FieldChange("state", "running", "stopped", Effect.LIVE),))
        with serving(stopping):
            domain_provider.stop(dom, timeout=120)
        assert not dom.isActive()
        stopped = [args for event_id, args in _Recording.log if event_id == libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE]
        assert (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN) in \
            [(args[1], args[2]) for args in stopped], stopped
        # Waiting for a domain that is already off returns from the check made after registering.
        assert domain_provider.wait_until_off(dom, 5)
    finally:
        connections.close()
    # apply --wait-agent through the CLI: nothing runs now, so nothing to wait for once it is stopped.
    result = project.run("apply", "--auto-approve", "--wait-agent", "--wait-ip", "--wait-timeout", "240", check=True)
    assert "domain.g: guest agent connected" in result.stdout, result.stdout
    assert f"domain.g: {subnet}." in result.stdout, result.stdout
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


def test_import_maps_missing_defaults_back(project: Any, conn: Any) -> None:
    """A domain without the defaults imports with each switched off, so the defaults add nothing to it; one with
    them imports with them on. Either way the next plan is "No changes."."""
    p = project.prefix
    bare = f"""<domain type='qemu'><name>{p}-bare</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os><features><acpi/></features><devices/></domain>"""
    full = f"""<domain type='qemu'><name>{p}-full</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
      <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os><features><acpi/></features><devices>
      <serial type='pty'><target port='0'/></serial><console type='pty'><target type='serial' port='0'/></console>
      <channel type='unix'><target type='virtio' name='{AGENT}'/></channel>
      <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng></devices></domain>"""
    conn.defineXML(bare)
    conn.defineXML(full)
    imported = project.run("import", f"domain.{p}-bare", f"domain.{p}-full", check=True)
    assert "imported" in imported.stdout, imported.stdout
    text = (project.root / "imported.yaml").read_text()
    bare_part, full_part = text.split(f"{p}-full:")[0], text.split(f"{p}-full:")[1]
    for line in ("firmware: bios", "rng: false", "guest_agent: false", "serial_console: false", "machine: pc-i440fx-"):
        assert line in bare_part, text
    for line in ("firmware: efi", "rng: true", "guest_agent: true", "machine: pc-q35-"):
        assert line in full_part, text
    assert "not carried" not in text, text
    assert "No changes." in project.run("plan", check=True).stdout
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []
