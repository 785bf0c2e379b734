"""Removals take effect (three-way) on the real daemon: what vmform wrote last time (its last-applied record on the
object) and the manifest no longer states is removed from the host and shown as a `-` field change; what libvirt
added, or someone added outside vmform, is never removed. Domains stay defined (stopped) unless a test says
otherwise: a domain with hugepages may not start on this host."""

from __future__ import annotations

from typing import Any

import libvirt
import yaml
from lxml import etree


def plan_fields(project: Any) -> dict[str, dict[str, str]]:
    plan = project.plan_json()
    return {c["address"]: {f["path"]: f["effect"] for f in c["fields"]} for c in plan["changes"]}


def inactive(dom: Any) -> Any:
    return etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())


def domain(project: Any, xml: str, extra: str = "", state: str = "stopped") -> str:
    return f"""
domains:
  {project.prefix}-vm:
    type: qemu
    memory: 64MiB
    state: {state}
{extra}    xml:
{xml}
"""


def test_removed_xml_entries_are_removed_from_the_host(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(domain(project, """\
      memoryBacking: {hugepages: {}, nosharepages: {}}
      on_crash: restart
      clock: {offset: localtime}
      features: {pae: {}}
      devices: {watchdog: {model: i6300esb, action: reset}}
"""))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    config = inactive(dom)
    assert config.find("memoryBacking/hugepages") is not None and config.findtext("on_crash") == "restart"
    assert config.find("clock").get("offset") == "localtime" and config.find("features/pae") is not None
    assert plan_fields(project) == {}

    # hugepages, on_crash, the clock and pae leave the manifest; nosharepages stays.
    project.write(domain(project, "      memoryBacking: {nosharepages: {}}\n"))
    assert plan_fields(project) == {f"domain.{p}-vm": {
        "xml.memoryBacking.hugepages": "live", "xml.on_crash": "live", "xml.clock.offset": "live",
        "xml.features.pae": "live", "xml.devices.watchdog": "live"}}
    shown = project.run("plan", check=True).stdout
    assert "- xml.memoryBacking.hugepages" in shown and "- xml.features.pae" in shown, shown
    assert '~ xml.on_crash' in shown and '"restart" -> "destroy"' in shown, shown  # back to vmform's own default
    project.apply()
    config = inactive(dom)
    assert config.find("memoryBacking/hugepages") is None, etree.tostring(config).decode()
    assert config.find("memoryBacking/nosharepages") is not None
    assert config.findtext("on_crash") == "destroy"
    assert config.find("clock") is None or config.find("clock").get("offset") != "localtime"
    assert config.find("features/pae") is None and config.find("features/acpi") is not None
    assert config.find("devices/watchdog") is None, "a device no longer named goes whole (with its address)"
    assert "No changes." in project.run("plan", check=True).stdout


def test_what_was_added_outside_vmform_stays(project: Any, conn: Any) -> None:
    """Only what vmform recorded is removed: an entry added with virsh edit (a redefine through libvirt) is
    neither a difference nor removed, even in the same element as a removed one."""
    p = project.prefix
    project.write(domain(project, """\
      memoryBacking: {nosharepages: {}}
      on_crash: restart
"""))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    edited = inactive(dom)  # as virsh edit would: the persistent XML with additions, defined again
    etree.SubElement(edited.find("memoryBacking"), "hugepages")
    etree.SubElement(edited.find("features"), "pae")
    conn.defineXML(etree.tostring(edited).decode())
    assert plan_fields(project) == {}, "additions made outside vmform are not differences"

    project.write(domain(project, "      {}\n", extra="    description: edited\n"))
    assert plan_fields(project) == {f"domain.{p}-vm": {
        "description": "live", "xml.memoryBacking.nosharepages": "live", "xml.on_crash": "live"}}
    project.apply()
    config = inactive(dom)
    assert config.find("memoryBacking/nosharepages") is None
    assert config.find("memoryBacking/hugepages") is not None, "added outside vmform: never removed"
    assert config.find("features/pae") is not None, "added outside vmform: never removed"
    assert config.findtext("on_crash") == "destroy"
    assert "No changes." in project.run("plan", check=True).stdout


def test_removed_curated_fields_are_removed(project: Any, conn: Any) -> None:
    """Curated fields without a default (kernel, cmdline, cpu) go when their line goes; description and
    autostart go back to their defaults."""
    p = project.prefix
    stated = f"""
domains:
  {p}-vm:
    type: qemu
    memory: 64MiB
    state: stopped
    allow: [host_paths]
    kernel: /var/lib/{p}-missing/vmlinuz
    cmdline: console=ttyS0 quiet
    cpu: maximum
    description: with a kernel
    autostart: true
"""
    project.write(stated)
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    config = inactive(dom)
    assert config.findtext("os/kernel") and config.findtext("os/cmdline") and config.find("cpu").get("mode") == "maximum"

    project.write(domain(project, "      {}\n"))
    assert plan_fields(project) == {f"domain.{p}-vm": {
        "kernel": "live", "cmdline": "live", "cpu": "live", "description": "live", "autostart": "live"}}
    shown = project.run("plan", check=True).stdout
    assert "- kernel" in shown and "- cmdline" in shown and "- cpu" in shown, shown
    project.apply()
    config = inactive(dom)
    assert config.find("os/kernel") is None and config.find("os/cmdline") is None
    assert config.find("cpu") is None or config.find("cpu").get("mode") != "maximum"
    assert not config.findtext("description") and not dom.autostart()
    assert "No changes." in project.run("plan", check=True).stdout


def test_network_removals(project: Any, conn: Any) -> None:
    p = project.prefix
    network = f"""
networks:
  {p}-lan:
    mode: isolated
    bridge: {project.bridge_prefix}x
    ipv4: {project.subnet}.1/24
    MTU
    XML
"""
    project.write(network.replace("MTU", "mtu: 1400").replace("XML", "xml: {dns: {forwardPlainNames: 'no'}}"))
    project.apply()
    net = conn.networkLookupByName(f"{p}-lan")
    config = etree.fromstring(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE).encode())
    assert config.find("mtu").get("size") == "1400" and config.find("dns").get("forwardPlainNames") == "no"

    project.write(network.replace("MTU", "").replace("XML", ""))
    assert plan_fields(project) == {f"network.{p}-lan": {"mtu": "restart", "xml.dns.forwardPlainNames": "restart"}}
    project.run("apply", "--auto-approve", "--restart", check=True)
    for flags in (libvirt.VIR_NETWORK_XML_INACTIVE, 0):
        config = etree.fromstring(net.XMLDesc(flags).encode())
        assert config.find("mtu") is None, etree.tostring(config).decode()
        assert config.find("dns") is None or config.find("dns").get("forwardPlainNames") is None
    assert "No changes." in project.run("plan", check=True).stdout


def test_pool_xml_removal(project: Any, conn: Any) -> None:
    """A pool's record is in vmform's ledger (pools have no metadata element)."""
    p = project.prefix
    pool = f"""
pools:
  images:
    name: {p}-images
    path: {project.pool_dir}/images
    XML
"""
    project.write(pool.replace("XML", "xml: {target: {permissions: {mode: '0750'}}}"))
    project.apply()
    config = etree.fromstring(conn.storagePoolLookupByName(f"{p}-images").XMLDesc(0).encode())
    assert config.findtext("target/permissions/mode") == "0750"

    project.write(pool.replace("XML", ""))
    assert plan_fields(project) == {"pool.images": {"xml.target.permissions.mode": "restart"}}
    project.apply()
    config = etree.fromstring(conn.storagePoolLookupByName(f"{p}-images").XMLDesc(
        libvirt.VIR_STORAGE_XML_INACTIVE).encode())
    assert config.findtext("target/permissions/mode") != "0750", etree.tostring(config).decode()
    assert "No changes." in project.run("plan", check=True).stdout


def test_import_records_what_it_adopted(project: Any, conn: Any) -> None:
    """vmform import records the adopted state: removing a line from the imported manifest removes it."""
    p = project.prefix
    project.write("# the domain is imported into imported.yaml\n")
    conn.defineXML(f"""
<domain type='qemu'>
  <name>{p}-adopted</name>
  <memory unit='MiB'>64</memory>
  <memoryBacking><nosharepages/></memoryBacking>
  <os><type arch='x86_64'>hvm</type></os>
  <on_crash>restart</on_crash>
</domain>""")
    project.run("import", f"domain.{p}-adopted", check=True)
    assert "No changes." in project.run("plan", check=True).stdout
    imported = project.root / "imported.yaml"
    data = yaml.safe_load(imported.read_text())
    section = data["domains"][f"{p}-adopted"]["xml"]
    assert section["memoryBacking"] == {"nosharepages": {}}, section
    del section["memoryBacking"]
    imported.write_text(yaml.safe_dump(data, sort_keys=False))
    assert plan_fields(project) == {f"domain.{p}-adopted": {"xml.memoryBacking.nosharepages": "live"}}
    project.apply()
    dom = conn.lookupByName(f"{p}-adopted")
    assert inactive(dom).find("memoryBacking/nosharepages") is None
    assert inactive(dom).findtext("on_crash") == "restart", "still stated: kept"
    assert "No changes." in project.run("plan", check=True).stdout


def test_running_domain_removal_waits_for_restart(project: Any, conn: Any) -> None:
    """On a running domain an xml: removal is restart-class: the definition loses it at once, the guest keeps it
    until it restarts, and with restart allowed it restarts in the same apply."""
    p = project.prefix
    project.write(domain(project, "      on_crash: restart\n      memoryBacking: {nosharepages: {}}\n", state="running"))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    assert dom.isActive()
    project.write(domain(project, "      memoryBacking: {nosharepages: {}}\n", state="running"))
    assert plan_fields(project) == {f"domain.{p}-vm": {"xml.on_crash": "restart"}}
    project.apply()
    assert inactive(dom).findtext("on_crash") == "destroy"
    assert etree.fromstring(dom.XMLDesc(0).encode()).findtext("on_crash") == "restart", "the guest keeps it until restart"
    assert "No changes." in project.run("plan", check=True).stdout

    project.write(domain(project, "      {}\n", state="running"))
    assert plan_fields(project) == {f"domain.{p}-vm": {"xml.memoryBacking.nosharepages": "restart"}}
    applied = project.run("apply", "--auto-approve", "--restart", check=True).stdout
    assert "Restarted by this apply" in applied, applied
    running = etree.fromstring(dom.XMLDesc(0).encode())
    assert running.find("memoryBacking/nosharepages") is None and running.findtext("on_crash") == "destroy"
    assert "No changes." in project.run("plan", check=True).stdout
