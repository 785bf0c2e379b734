"""State drift made outside vmform, on the real daemon: a network stopped (virsh net-destroy), a domain or network
undefined while it ran (transient), autostart switched, an interface attached with a MAC vmform manages, and a
guest that does not release a hot-unplugged device. Each is shown in the plan, corrected by apply, and the next
plan converges; "Restarted" is said only of what apply really restarted."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from tests.guest.build import INIT_PROLOGUE, build_guest

INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE
MAC = "52:54:00:aa:74:01"


def lab(project: Any, domains: str, volumes: str = "") -> str:
    p = project.prefix
    return f"""
networks:
  {p}-lan:
    mode: isolated
    bridge: {project.bridge_prefix}a
    ipv4: {project.subnet}.1/24
pools:
  {p}-pool: {{path: {project.pool_dir}, autostart: true}}
volumes:
  {p}-root: {{pool: {p}-pool, size: 16MiB}}
{volumes}
domains:
{domains}
"""


def vm(project: Any, name: str = "vm", extra: str = "", disks: str = "", mac: str = MAC) -> str:
    """A 64 MiB TCG domain without an OS (it never answers ACPI), on the lab network; ``disks``: volume names."""
    p = project.prefix
    return f"""  {p}-{name}:
    type: qemu
    memory: 64MiB
    disks: [{disks}]
    interfaces: [{{network: {p}-lan, mac: "{mac}"}}]
{extra}"""


def set_toml(project: Any, **settings: Any) -> None:
    """Change vmform.toml settings of the test project (shutdown_timeout, force_off, detach_timeout)."""
    path = project.root / "vmform.toml"
    lines = [line for line in path.read_text().splitlines() if line.split(" = ")[0] not in settings]
    lines += [f"{key} = {str(value).lower() if isinstance(value, bool) else value}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")


def no_changes(project: Any) -> str:
    result = project.run("plan", check=True).stdout
    assert "No changes." in result, result
    return result


def fields(plan: dict[str, Any], address: str) -> dict[str, str]:
    for change in plan["changes"]:
        if change["address"] == address:
            return {f["path"]: f["effect"] for f in change["fields"]}
    return {}


def tap_master(dom: Any) -> str | None:
    dev = etree.fromstring(dom.XMLDesc(0).encode()).find("devices/interface/target").get("dev")
    link = f"/sys/class/net/{dev}/master"
    return os.path.basename(os.readlink(link)) if os.path.exists(link) else None


def interfaces(dom: Any, flags: int = 0) -> list[tuple[str, str]]:
    """(MAC, address) of each interface, in the running (0) or persistent (INACTIVE) definition."""
    root = etree.fromstring(dom.XMLDesc(flags).encode())
    found = []
    for node in root.findall("devices/interface"):
        address = node.find("address")
        found.append((node.find("mac").get("address"), address.get("slot") if address is not None else ""))
    return found


def disk_targets(dom: Any, flags: int = 0) -> list[str]:
    root = etree.fromstring(dom.XMLDesc(flags).encode())
    return sorted(t.get("dev") for t in root.findall("devices/disk/target"))


def domain_id(conn: Any, dom: Any) -> int:
    return int(conn.lookupByUUIDString(dom.UUIDString()).ID())


def nic_xml(project: Any, mac: str = MAC) -> str:
    return (f"<interface type='network'><mac address='{mac}'/><source network='{project.prefix}-lan'/>"
            "<model type='virtio'/></interface>")


def test_stopped_network_is_planned_started_and_its_guests_replugged(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project, vm(project, disks=f"{p}-root") + vm(project, "off", "    state: stopped\n", mac="52:54:00:aa:74:02")))
    project.apply()
    dom, off = conn.lookupByName(f"{p}-vm"), conn.lookupByName(f"{p}-off")
    net = conn.networkLookupByName(f"{p}-lan")
    bridge = f"{project.bridge_prefix}a"
    assert tap_master(dom) == bridge
    net.destroy()  # virsh net-destroy: the running guest's tap loses its bridge
    # The manifest now wants the stopped domain running: on main, starting it failed (network not active).
    project.write(lab(project, vm(project, disks=f"{p}-root") + vm(project, "off", mac="52:54:00:aa:74:02")))
    plan = project.plan_json()
    assert fields(plan, f"network.{p}-lan") == {"active": "live"}, plan
    network_change = next(c for c in plan["changes"] if c["address"] == f"network.{p}-lan")
    assert network_change["replug"] == [f"{p}-vm"]
    assert f"network.{p}-lan" in next(c for c in plan["changes"] if c["address"] == f"domain.{p}-off")["depends_on"]
    shown = project.run("plan", check=True).stdout
    assert "active = inactive (stopped outside vmform) -> active" in shown, shown
    project.apply()
    assert net.isActive() and off.isActive()
    assert tap_master(dom) == bridge, "the running guest must be plugged into the network again"
    assert tap_master(off) == bridge
    no_changes(project)


def test_stopped_pool_is_started_and_its_volumes_are_not_planned_again(project: Any, conn: Any) -> None:
    """libvirt lists no volumes of a stopped pool: on main the plan wanted to create them again (and failed)."""
    p = project.prefix
    project.write(lab(project, vm(project, disks=f"{p}-root", extra="    state: stopped\n")))
    project.apply()
    pool = conn.storagePoolLookupByName(f"{p}-pool")
    pool.destroy()  # virsh pool-destroy
    project.write(lab(project, vm(project, disks=f"{p}-root")))
    plan = project.plan_json()
    assert {c["address"]: c["action"] for c in plan["changes"]} == {f"pool.{p}-pool": "update", f"domain.{p}-vm": "update"}
    assert fields(plan, f"pool.{p}-pool") == {"active": "live"}
    assert f"pool.{p}-pool" in next(c for c in plan["changes"] if c["address"] == f"domain.{p}-vm")["depends_on"]
    assert any(note.startswith(f"volume.{p}-root: its pool pool.{p}-pool is stopped") for note in plan["notes"])
    project.apply()
    assert pool.isActive() and conn.lookupByName(f"{p}-vm").isActive()
    no_changes(project)


def test_domain_undefined_while_running_is_defined_again(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project, vm(project, extra="    autostart: true\n")))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    uuid, first_id = dom.UUIDString(), domain_id(conn, dom)
    dom.undefine()  # virsh undefine of a running domain: it runs on, transient
    assert not dom.isPersistent() and dom.isActive()
    plan = project.plan_json()
    assert fields(plan, f"domain.{p}-vm") == {"persistent": "live", "autostart": "live"}, plan
    shown = project.run("plan", check=True).stdout
    assert "persistent = transient (undefined outside vmform while it ran) -> persistent" in shown, shown
    project.apply()  # on main: "cannot set autostart for transient domain", on every apply
    dom = conn.lookupByUUIDString(uuid)
    assert dom.isPersistent() and dom.autostart() == 1
    assert domain_id(conn, dom) == first_id, "making it persistent must not restart it"
    config = etree.fromstring(dom.XMLDesc(INACTIVE).encode())
    assert config.find("devices/interface/mac").get("address") == MAC
    assert config.find("metadata/{https://vmform.dev/xmlns/balloon/1}balloon") is None, "live-only records stay out"
    no_changes(project)
    # It is a definition like any other now: a stop keeps it.
    project.write(lab(project, vm(project, extra="    autostart: true\n    state: stopped\n")))
    project.apply()
    assert conn.lookupByUUIDString(uuid).isPersistent()
    no_changes(project)


def test_autostart_switched_outside_is_planned_and_corrected(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project, vm(project, extra="    autostart: true\n")
                      + vm(project, "manual", mac="52:54:00:aa:74:02", disks=f"{p}-other"),
                      volumes=f"  {p}-other: {{pool: {p}-pool, size: 16MiB}}"))
    project.apply()
    dom, manual = conn.lookupByName(f"{p}-vm"), conn.lookupByName(f"{p}-manual")
    net, pool = conn.networkLookupByName(f"{p}-lan"), conn.storagePoolLookupByName(f"{p}-pool")
    dom.setAutostart(0)
    manual.setAutostart(1)  # the reverse: on where the manifest wants it off
    pool.setAutostart(0)
    net.undefine()  # virsh net-undefine of the running network: transient, and its autostart is gone with it
    plan = project.plan_json()
    assert fields(plan, f"domain.{p}-vm") == {"autostart": "live"}
    assert fields(plan, f"domain.{p}-manual") == {"autostart": "live"}
    assert fields(plan, f"pool.{p}-pool") == {"autostart": "live"}
    assert fields(plan, f"network.{p}-lan") == {"persistent": "live", "autostart": "live"}, plan
    project.apply()  # on main: "cannot set autostart for transient network"
    assert dom.autostart() == 1 and manual.autostart() == 0 and pool.autostart() == 1
    net = conn.networkLookupByName(f"{p}-lan")
    assert net.isPersistent() and net.autostart() == 1 and net.isActive()
    assert tap_master(dom) == f"{project.bridge_prefix}a", "defining the network again must not unplug its guests"
    no_changes(project)


def test_interface_attached_outside_with_a_managed_mac_is_removed(project: Any, conn: Any) -> None:
    """The live variant: a guest with an OS (the tiny test guest) releases the hot-unplugged NIC."""
    p = project.prefix
    guest = build_guest(INIT_PROLOGUE + 'echo "vmf: booted"\nwhile :; do sleep 60; done\n')
    boot = f"""    memory: 160MiB
    kernel: {guest.kernel}
    initrd: {guest.initrd}
    cmdline: "console=ttyS0"
    console_log: true
    allow: [host_paths]
"""
    project.write(lab(project, vm(project, extra=boot).replace("    memory: 64MiB\n", "")))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    log = Path(f"/var/log/libvirt/qemu/{p}-vm-console.log")
    deadline = time.monotonic() + 120
    while "vmf: booted" not in (log.read_text(errors="replace") if log.exists() else ""):
        assert time.monotonic() < deadline, "the test guest did not boot"
        time.sleep(0.5)
    first_id = domain_id(conn, dom)
    dom.attachDeviceFlags(nic_xml(project), libvirt.VIR_DOMAIN_AFFECT_LIVE)  # virsh attach-interface --live
    assert [mac for mac, _ in interfaces(dom)] == [MAC, MAC]
    extra_slot = interfaces(dom)[1][1]
    plan = project.plan_json()
    (path, effect), = fields(plan, f"domain.{p}-vm").items()
    assert path.startswith(f"interfaces[{MAC}]@pci:") and effect == "live", plan
    shown = project.run("plan", check=True).stdout
    assert "a second interface with this MAC address in the running domain, not in the manifests" in shown, shown
    applied = project.apply()  # on main: every later apply failed with "multiple devices matching MAC address"
    assert interfaces(dom) == [(MAC, interfaces(dom, INACTIVE)[0][1])], applied.stdout
    assert interfaces(dom)[0][1] != extra_slot, "the interface vmform manages stays, the extra one goes"
    assert domain_id(conn, dom) == first_id and "Restarted" not in applied.stdout
    no_changes(project)


def test_interface_attached_to_the_definition_only_is_removed(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project, vm(project)))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    first_id = domain_id(conn, dom)
    dom.attachDeviceFlags(nic_xml(project), libvirt.VIR_DOMAIN_AFFECT_CONFIG)  # virsh attach-interface --config
    assert [mac for mac, _ in interfaces(dom, INACTIVE)] == [MAC, MAC]
    managed_slot = interfaces(dom, INACTIVE)[0][1]
    (path, effect), = fields(project.plan_json(), f"domain.{p}-vm").items()
    assert path.startswith(f"interfaces[{MAC}]@pci:") and effect == "live"
    assert "in the domain's definition, not in the manifests" in project.run("plan", check=True).stdout
    project.apply()
    assert interfaces(dom, INACTIVE) == [(MAC, managed_slot)]
    assert interfaces(dom) == [(MAC, managed_slot)] and domain_id(conn, dom) == first_id
    no_changes(project)
    # In both definitions at once (attach --live --config): the guest without an OS does not release the live one,
    # and with --restart the domain is restarted so it goes now.
    dom.attachDeviceFlags(nic_xml(project), libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    set_toml(project, detach_timeout=1)
    project.run("apply", "--auto-approve", "--restart", "--force-off", check=True)
    assert interfaces(dom, INACTIVE) == [(MAC, managed_slot)] and interfaces(dom) == [(MAC, managed_slot)]
    no_changes(project)


def test_unreleased_hot_unplug_leaves_the_definition_and_waits_for_restart(project: Any, conn: Any) -> None:
    """A guest without an OS never answers the ACPI unplug: the disk leaves the definition at once, the summary
    and the next plan say it leaves the running guest when it restarts, and --restart restarts only that domain."""
    p = project.prefix
    set_toml(project, detach_timeout=2)
    data = f"  {p}-data: {{pool: {p}-pool, size: 16MiB}}\n  {p}-other: {{pool: {p}-pool, size: 16MiB}}"
    both = vm(project, disks=f"{p}-root, {p}-data") + vm(project, "other", mac="52:54:00:aa:74:02", disks=f"{p}-other")
    project.write(lab(project, both, volumes=data))
    project.apply()
    dom, other = conn.lookupByName(f"{p}-vm"), conn.lookupByName(f"{p}-other")
    first_id, other_id = domain_id(conn, dom), domain_id(conn, other)
    assert disk_targets(dom) == ["vda", "vdb"]
    without = vm(project, disks=f"{p}-root") + vm(project, "other", mac="52:54:00:aa:74:02", disks=f"{p}-other")
    project.write(lab(project, without, volumes=data))
    assert fields(project.plan_json(), f"domain.{p}-vm") == {"disks[vdb]": "live"}
    applied = project.run("apply", "--auto-approve", check=True)  # on main: the change failed, and again each apply
    assert disk_targets(dom, INACTIVE) == ["vda"], "the device leaves the definition at once"
    assert disk_targets(dom) == ["vda", "vdb"] and domain_id(conn, dom) == first_id
    assert (f"Waiting for a restart: domain.{p}-vm: disks[vdb] leaves the running guest at its next restart"
            in applied.stdout), applied.stdout
    assert "Restarted" not in applied.stdout
    replan = no_changes(project)
    assert f"domain.{p}-vm: disks[vdb] removal (the guest has not released the device)" in replan, replan

    # With restart allowed, the domain is restarted in the same apply; the other domain, changed live, is not.
    project.write(lab(project, without.replace(f"disks: [{p}-other]", f"disks: [{p}-other]\n    description: b"),
                      volumes=data))
    preview = project.run("plan", "--restart", check=True).stdout
    assert f"Restarts planned: domain.{p}-vm" in preview, preview
    applied = project.run("apply", "--auto-approve", "--restart", "--force-off", check=True)
    assert disk_targets(dom) == ["vda"] and domain_id(conn, dom) != first_id, applied.stdout
    assert domain_id(conn, other) == other_id
    restarted = [line for line in applied.stdout.splitlines() if line.startswith("Restarted by this apply:")]
    assert restarted == [f"Restarted by this apply: domain.{p}-vm"], applied.stdout
    no_changes(project)


def test_unreleased_hot_unplug_restarts_in_the_same_apply_when_allowed(project: Any, conn: Any) -> None:
    """restart_policy: allowed, and the unplug the guest does not answer: restarted at once, and said so."""
    p = project.prefix
    set_toml(project, detach_timeout=2)
    data = f"  {p}-data: {{pool: {p}-pool, size: 16MiB}}"
    policy = "    restart_policy: allowed\n"
    project.write(lab(project, vm(project, extra=policy, disks=f"{p}-root, {p}-data"), volumes=data))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    first_id = domain_id(conn, dom)
    project.write(lab(project, vm(project, extra=policy, disks=f"{p}-root"), volumes=data))
    shown = project.run("plan", check=True).stdout
    assert "restarted if its guest does not release a detached device" in shown, shown
    applied = project.apply()
    assert disk_targets(dom, INACTIVE) == ["vda"] and disk_targets(dom) == ["vda"], applied.stdout
    assert domain_id(conn, dom) != first_id
    assert f"Restarted by this apply: domain.{p}-vm" in applied.stdout, applied.stdout
    assert "Waiting for a restart" not in applied.stdout
    no_changes(project)


def test_a_restart_that_fails_is_never_reported_as_restarted(project: Any, conn: Any) -> None:
    """apply --restart without force_off: the guest without an OS ignores the ACPI shutdown, so the restart fails;
    the plan said it would restart, the summary must not say it did."""
    p = project.prefix
    set_toml(project, detach_timeout=1, shutdown_timeout=1, force_off=False)
    data = f"  {p}-data: {{pool: {p}-pool, size: 16MiB}}"
    project.write(lab(project, vm(project, disks=f"{p}-root, {p}-data"), volumes=data))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    first_id = domain_id(conn, dom)
    # A restart-class change and a detach the guest does not answer, as in the report.
    project.write(lab(project, vm(project, extra="    graphics: vnc\n", disks=f"{p}-root"), volumes=data))
    applied = project.run("apply", "--auto-approve", "--restart")
    assert applied.code == 1, applied.stdout
    assert "Restarted by this apply" not in applied.stdout, applied.stdout
    assert f"Restarts planned: domain.{p}-vm" in applied.stdout  # the plan's promise, printed before apply
    assert "did not shut down within 1s" in applied.stderr, applied.stderr
    assert dom.isActive() and domain_id(conn, dom) == first_id
    assert disk_targets(dom, INACTIVE) == ["vda"]
