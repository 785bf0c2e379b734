"""How changes take effect on the real daemon: live, at restart (with and without permission), replace with
its data-loss opt-in, drift made outside vmform, lifecycle controls, --target, and network changes that
must not leave running guests detached."""

from __future__ import annotations

import os
from typing import Any

import libvirt
from lxml import etree

VIR_CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG


def lab(project: Any, domain_extra: str = "", volume_extra: str = "", network_extra: str = "",
        memory: str = "64MiB", vcpus: int = 1, state: str = "running") -> str:
    p = project.prefix
    return f"""
networks:
  {p}-lan:
    mode: isolated
    bridge: {project.bridge_prefix}a
    ipv4: {project.subnet}.1/24
    dhcp: {{start: {project.subnet}.100, end: {project.subnet}.200}}
{network_extra}
pools:
  {p}-pool: {{path: {project.pool_dir}}}
volumes:
  {p}-root: {{pool: {p}-pool, size: 32MiB{volume_extra}}}
domains:
  {p}-vm:
    type: qemu
    vcpus: {vcpus}
    max_vcpus: 2
    memory: {memory}
    max_memory: 128MiB
    disks: [{p}-root]
    interfaces: [{{network: {p}-lan, mac: "52:54:00:aa:72:01"}}]
    state: {state}
{domain_extra}
"""


def fields(plan: dict[str, Any], address: str) -> dict[str, str]:
    for change in plan["changes"]:
        if change["address"] == address:
            return {f["path"]: f["effect"] for f in change["fields"]}
    return {}


def no_changes(project: Any) -> None:
    result = project.run("plan", check=True)
    assert "No changes." in result.stdout, result.stdout


def domain_id_of(conn: Any, dom: Any) -> int:
    """The running domain's id (a new one after each start). virDomainGetID answers from the handle's
    cached id, so look the domain up again."""
    return int(conn.lookupByUUIDString(dom.UUIDString()).ID())


def tap_master(dom: Any) -> str | None:
    root = etree.fromstring(dom.XMLDesc(0).encode())
    dev = root.find("devices/interface/target").get("dev")
    link = f"/sys/class/net/{dev}/master"
    return os.path.basename(os.readlink(link)) if os.path.exists(link) else None


def test_live_changes_reach_the_running_domain_without_restart(project: Any, conn: Any) -> None:
    project.write(lab(project))
    project.apply()
    dom = conn.lookupByName(f"{project.prefix}-vm")
    domain_id = domain_id_of(conn, dom)
    project.write(lab(project, memory="96MiB", vcpus=2))
    plan = project.plan_json()
    assert fields(plan, f"domain.{project.prefix}-vm") == {"memory": "live", "vcpus": "live"}
    project.apply()
    assert domain_id_of(conn, dom) == domain_id, "a live change must not restart the domain"
    assert dom.info()[3] == 2  # what `virsh dominfo` shows as CPU(s)
    assert dom.maxMemory() == 128 * 1024
    no_changes(project)


def test_restart_class_change_waits_for_permission(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    first_id = domain_id_of(conn, dom)
    project.write(lab(project, domain_extra="    boot: [network, hd]\n    graphics: vnc"))
    plan = project.run("plan", check=True)
    assert "(at next restart)" in plan.stdout
    assert f"Changes waiting for a restart: domain.{p}-vm" in plan.stdout
    project.apply()
    assert domain_id_of(conn, dom) == first_id, "no restart without permission"
    config = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    assert config.find("devices/graphics").get("type") == "vnc"
    after = project.run("plan", check=True)
    assert "No changes." in after.stdout and "takes effect when it restarts" in after.stdout

    preview = project.run("plan", "--restart", check=True)
    assert f"Restarts planned: domain.{p}-vm" in preview.stdout
    applied = project.run("apply", "--auto-approve", "--restart", check=True)
    assert dom.isActive() and domain_id_of(conn, dom) != first_id, applied.stdout
    assert f"Restarted by this apply: domain.{p}-vm" in applied.stdout, applied.stdout  # what apply did
    running = etree.fromstring(dom.XMLDesc(0).encode())
    assert running.find("devices/graphics").get("type") == "vnc"
    assert [b.get("dev") for b in running.findall("os/boot")] == ["network", "hd"]
    result = project.run("plan", check=True)
    assert "No changes." in result.stdout and "restarts" not in result.stdout


def test_restart_policy_allowed_restarts_without_flag(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project, domain_extra="    restart_policy: allowed"))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    first_id = domain_id_of(conn, dom)
    project.write(lab(project, domain_extra="    restart_policy: allowed\n    graphics: vnc"))
    assert f"Restarts planned: domain.{p}-vm" in project.run("plan", check=True).stdout
    project.apply()
    assert dom.isActive() and domain_id_of(conn, dom) != first_id
    no_changes(project)


def test_replacing_a_volume_needs_the_data_loss_opt_in(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project, state="stopped"))
    project.apply()
    project.write(lab(project, state="stopped", volume_extra=", format: raw"))
    refused = project.run("plan")
    assert refused.code == 1
    assert f"volume.{p}-root must be replaced (format cannot change in place)" in refused.stderr
    assert "allow_data_loss" in refused.stderr
    project.write(lab(project, state="stopped", volume_extra=", format: raw, lifecycle: {allow_data_loss: true}"))
    plan = project.run("plan", check=True)
    assert f"-/+ volume \"{p}-root\"" in plan.stdout
    assert "forces replacement" in plan.stdout
    project.apply()
    vol = conn.storagePoolLookupByName(f"{p}-pool").storageVolLookupByName(f"{p}-root")
    assert "<format type='raw'/>" in vol.XMLDesc(0)
    no_changes(project)


def test_drift_is_shown_with_the_live_value_and_corrected(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    # virsh setmem --config and virsh edit: the persistent definition changed behind vmform's back.
    dom.setMemoryFlags(96 * 1024, VIR_CONFIG)
    root = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    root.find("vcpu").set("current", "2")
    conn.defineXML(etree.tostring(root, encoding="unicode"))
    plan = project.run("plan", check=True).stdout
    assert "memory    = 96MiB -> 64MiB" in plan or "memory = 96MiB -> 64MiB" in plan
    assert "vcpus" in plan and "2 -> 1" in plan
    project.apply()
    no_changes(project)

    # A stopped domain that should run, and a deleted volume.
    dom.destroy()
    conn.storagePoolLookupByName(f"{p}-pool").storageVolLookupByName(f"{p}-root").delete(0)
    plan_json = project.plan_json()
    actions = {c["address"]: c["action"] for c in plan_json["changes"]}
    assert actions == {f"volume.{p}-root": "create", f"domain.{p}-vm": "update"}
    assert fields(plan_json, f"domain.{p}-vm") == {"state": "live"}
    state_change = next(c for c in plan_json["changes"] if c["address"] == f"domain.{p}-vm")["fields"][0]
    assert (state_change["before"], state_change["after"]) == ("stopped", "running")
    project.apply()
    assert dom.isActive()
    no_changes(project)

    # An interface detached from the persistent definition (virsh detach-interface --config).
    nic = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()).find("devices/interface")
    dom.detachDeviceFlags(etree.tostring(nic, encoding="unicode"), VIR_CONFIG)
    plan = project.run("plan", check=True).stdout
    assert "+ interfaces[52:54:00:aa:72:01]" in plan
    project.apply()
    no_changes(project)


def test_fields_vmform_does_not_manage_are_left_alone(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project, state="stopped"))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    root = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    root.find("on_crash").text = "restart"
    watchdog = etree.SubElement(root.find("devices"), "watchdog", model="i6300esb", action="reset")
    assert watchdog is not None
    conn.defineXML(etree.tostring(root, encoding="unicode"))
    no_changes(project)
    project.write(lab(project, state="stopped", memory="96MiB"))
    project.apply()
    kept = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    assert kept.findtext("on_crash") == "restart"
    assert kept.find("devices/watchdog").get("model") == "i6300esb"


def test_lifecycle_controls(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project, state="stopped", volume_extra=", lifecycle: {prevent_destroy: true}",
                      domain_extra="    lifecycle: {ignore_changes: [memory]}"))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    dom.setMemoryFlags(96 * 1024, VIR_CONFIG)
    no_changes(project)  # memory drift ignored
    refused = project.run("destroy", "--auto-approve")
    assert refused.code == 1 and f"volume.{p}-root has lifecycle.prevent_destroy set" in refused.stderr
    assert conn.lookupByName(f"{p}-vm") is not None

    # create_before_destroy: the renamed volume is created before the old one goes.
    project.write(lab(project, state="stopped",
                      volume_extra=f", name: {p}-root2, lifecycle: {{create_before_destroy: true, allow_data_loss: true}}"))
    plan = project.run("plan", check=True).stdout
    assert f"+/- volume \"{p}-root2\"" in plan
    project.apply()
    pool = conn.storagePoolLookupByName(f"{p}-pool")
    assert sorted(pool.listVolumes()) == [f"{p}-root2"]
    no_changes(project)


def test_target_limits_the_plan(project: Any) -> None:
    p = project.prefix
    project.write(lab(project, state="stopped"))
    plan = project.run("plan", "--json", "--target", f"volume.{p}-root", check=True).json()
    assert {c["address"] for c in plan["changes"]} == {f"volume.{p}-root", f"pool.{p}-pool"}
    project.run("apply", "--auto-approve", "--target", f"volume.{p}-root", check=True)
    assert {c["address"] for c in project.plan_json()["changes"]} == {f"network.{p}-lan", f"domain.{p}-vm"}
    assert project.run("plan", "--detailed-exitcode").code == 2
    project.apply()
    assert project.run("plan", "--detailed-exitcode").code == 0
    bad = project.run("plan", "--target", "domain.nope")
    assert bad.code == 1 and "no such resource" in bad.stderr


def test_dhcp_reservations_change_live_and_network_restart_replugs(project: Any, conn: Any) -> None:
    p = project.prefix
    hosts = '  dhcp_hosts: [{mac: "52:54:00:aa:72:01", ip: SUBNET.10, name: vm}]'.replace("SUBNET", project.subnet)
    project.write(lab(project))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    net = conn.networkLookupByName(f"{p}-lan")
    bridge = f"{project.bridge_prefix}a"
    assert tap_master(dom) == bridge
    project.write(lab(project, network_extra="  " + hosts.replace("\n", "\n  ")))
    plan = project.plan_json()
    assert fields(plan, f"network.{p}-lan") == {"dhcp_hosts[52:54:00:aa:72:01]": "live"}
    project.apply()
    assert f"ip='{project.subnet}.10'" in net.XMLDesc(0)  # the running network has it, without a restart
    assert tap_master(dom) == bridge
    no_changes(project)

    # A restart-class network change: with --restart the network restarts and the guest is re-plugged.
    project.write(lab(project, network_extra="  " + hosts + "\n    mtu: 1400"))
    preview = project.run("plan", "--restart", check=True).stdout
    assert f"re-plugging the interfaces of {p}-vm" in preview
    project.run("apply", "--auto-approve", "--restart", check=True)
    assert "<mtu size='1400'/>" in net.XMLDesc(0)
    assert tap_master(dom) == bridge, "the guest must not be left detached"
    no_changes(project)


def test_moving_a_nic_to_another_network_is_live(project: Any, conn: Any) -> None:
    p = project.prefix
    other = f"""
  {p}-other:
    mode: isolated
    bridge: {project.bridge_prefix}b
"""
    project.write(lab(project, network_extra=other))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    first_id = domain_id_of(conn, dom)
    assert tap_master(dom) == f"{project.bridge_prefix}a"
    moved = lab(project, network_extra=other).replace(f"{{network: {p}-lan, mac:", f"{{network: {p}-other, mac:")
    project.write(moved)
    assert fields(project.plan_json(), f"domain.{p}-vm") == {"interfaces[52:54:00:aa:72:01]": "live"}
    project.apply()
    assert tap_master(dom) == f"{project.bridge_prefix}b"
    assert domain_id_of(conn, dom) == first_id
    no_changes(project)


def test_disk_hotplug_is_live_and_sata_waits_for_restart(project: Any, conn: Any) -> None:
    p = project.prefix
    extra_volumes = f"\n  {p}-data: {{pool: {p}-pool, size: 16MiB}}\n  {p}-sata: {{pool: {p}-pool, size: 16MiB}}"
    project.write(lab(project, volume_extra="}" + extra_volumes + "\n#"))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    first_id = domain_id_of(conn, dom)
    with_data = lab(project, volume_extra="}" + extra_volumes + "\n#").replace(
        f"disks: [{p}-root]", f"disks: [{p}-root, {{volume: {p}-data, bus: virtio}}, {{volume: {p}-sata, bus: sata}}]")
    project.write(with_data)
    plan = project.plan_json()
    assert fields(plan, f"domain.{p}-vm") == {"disks[vdb]": "live", "disks[sda]": "restart"}
    project.apply()
    running = etree.fromstring(dom.XMLDesc(0).encode())
    assert sorted(t.get("dev") for t in running.findall("devices/disk/target")) == ["vda", "vdb"]
    config = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    assert sorted(t.get("dev") for t in config.findall("devices/disk/target")) == ["sda", "vda", "vdb"]
    assert domain_id_of(conn, dom) == first_id, "hot-plugging a disk must not restart the domain"
    after = project.run("plan", check=True).stdout
    assert "No changes." in after and "takes effect when it restarts" in after, after
    restarted = project.run("plan", "--restart", check=True).stdout
    assert f"Restarts planned: domain.{p}-vm" in restarted and "disks[sda]" in restarted, restarted
    project.run("apply", "--auto-approve", "--restart", check=True)
    running = etree.fromstring(dom.XMLDesc(0).encode())
    assert sorted(t.get("dev") for t in running.findall("devices/disk/target")) == ["sda", "vda", "vdb"]
    no_changes(project)


def test_paused_state_is_kept_and_resumed(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project, state="paused"))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    no_changes(project)
    project.write(lab(project, state="running"))
    assert fields(project.plan_json(), f"domain.{p}-vm") == {"state": "live"}
    project.apply()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    no_changes(project)


def test_growing_a_volume_a_running_domain_uses_is_live(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    first_id = domain_id_of(conn, dom)
    project.write(lab(project).replace(f"{{pool: {p}-pool, size: 32MiB}}", f"{{pool: {p}-pool, size: 48MiB}}"))
    assert fields(project.plan_json(), f"volume.{p}-root") == {"size": "live"}
    project.apply()
    assert dom.blockInfo("vda")[0] == 48 * 1024**2  # the running guest's disk is the new size
    assert domain_id_of(conn, dom) == first_id
    no_changes(project)


def test_machine_alias_converges(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project, state="stopped", domain_extra="    machine: q35"))
    project.apply()
    machine = etree.fromstring(conn.lookupByName(f"{p}-vm").XMLDesc(0).encode()).find("os/type").get("machine")
    assert machine.startswith("pc-q35-"), machine  # libvirt resolved the alias
    no_changes(project)
    project.write(lab(project, state="stopped", domain_extra="    machine: pc"))
    assert fields(project.plan_json(), f"domain.{p}-vm") == {"machine": "live"}


def test_interface_ip_and_hostname_are_live_reservations(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(lab(project))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    net = conn.networkLookupByName(f"{p}-lan")
    first_id = domain_id_of(conn, dom)
    nic = '{network: ' + p + '-lan, mac: "52:54:00:aa:72:01"'
    reserved = lab(project).replace(nic + "}", nic + f", ip: {project.subnet}.50, hostname: vm.lab.test}}")
    project.write(reserved)
    assert fields(project.plan_json(), f"network.{p}-lan") == {
        "dhcp_hosts[52:54:00:aa:72:01]": "live", f"dns_hosts[{project.subnet}.50]": "live"}
    project.apply()
    running = net.XMLDesc(0)
    assert f"ip='{project.subnet}.50'" in running and "<hostname>vm.lab.test</hostname>" in running
    assert domain_id_of(conn, dom) == first_id and tap_master(dom) == f"{project.bridge_prefix}a"
    no_changes(project)
    project.write(reserved.replace(f"{project.subnet}.50", f"{project.subnet}.51"))
    project.apply()
    assert f"<host ip='{project.subnet}.51'>" in net.XMLDesc(0) and f"{project.subnet}.50'" not in net.XMLDesc(0)
    no_changes(project)
