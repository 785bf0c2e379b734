"""The xml: section on the real daemon: what it states is defined, converges to "No changes." whatever
libvirt adds around it, changes take effect as the plan says, and it never rewrites what it does not state."""

from __future__ import annotations

from typing import Any

import libvirt
from lxml import etree


def manifest(project: Any, on_crash: str = "restart", state: str = "stopped", txt: str = "hello") -> str:
    p = project.prefix
    return f"""
networks:
  {p}-lan:
    mode: isolated
    bridge: {project.bridge_prefix}x
    ipv4: {project.subnet}.1/24
    xml:
      dns:
        txt: [{{name: info, value: {txt}}}]
        host: [{{ip: {project.subnet}.5, hostname: [db.lan.test]}}]
domains:
  {p}-vm:
    type: qemu
    memory: 64MiB
    state: {state}
    interfaces: [{p}-lan]
    xml:
      on_crash: {on_crash}
      os: {{bootmenu: {{enable: true, timeout: 500}}}}
      memoryBacking: {{nosharepages: {{}}}}
      devices:
        watchdog: {{model: i6300esb, action: reset}}
        memballoon: {{model: virtio, stats: {{period: 10}}}}
"""


def plan_fields(project: Any) -> dict[str, dict[str, str]]:
    plan = project.plan_json()
    return {c["address"]: {f["path"]: f["effect"] for f in c["fields"]} for c in plan["changes"]}


def test_xml_section_applies_converges_and_changes(project: Any, conn: Any) -> None:
    p = project.prefix
    project.write(manifest(project))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")
    config = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    assert config.findtext("on_crash") == "restart"
    assert config.find("devices/watchdog").get("action") == "reset"
    assert config.find("os/bootmenu").get("timeout") == "500"
    assert config.find("devices/memballoon/stats").get("period") == "10"
    net = conn.networkLookupByName(f"{p}-lan")
    assert "<txt name='info' value='hello'/>" in net.XMLDesc(0)
    assert plan_fields(project) == {}, "libvirt's additions around the xml: section must not show as changes"

    # A stopped domain: the new definition is all there is.
    project.write(manifest(project, on_crash="preserve"))
    assert plan_fields(project) == {f"domain.{p}-vm": {"xml.on_crash": "live"}}
    project.apply()
    assert etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()).findtext("on_crash") == "preserve"
    assert plan_fields(project) == {}

    # Started: a change to the section waits for the restart, the running domain keeps its value.
    project.write(manifest(project, on_crash="preserve", state="running"))
    project.apply()
    project.write(manifest(project, on_crash="restart", state="running", txt="bye"))
    assert plan_fields(project) == {f"domain.{p}-vm": {"xml.on_crash": "restart"},
                                    f"network.{p}-lan": {"xml.dns.txt": "restart"}}
    project.apply()
    assert etree.fromstring(dom.XMLDesc(0).encode()).findtext("on_crash") == "preserve"
    assert etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()).findtext("on_crash") == "restart"
    result = project.run("plan", check=True).stdout
    assert "No changes." in result and "takes effect when it restarts" in result, result
    project.run("apply", "--auto-approve", "--restart", check=True)
    assert etree.fromstring(dom.XMLDesc(0).encode()).findtext("on_crash") == "restart"
    assert "<txt name='bye' value='bye'/>" not in net.XMLDesc(0) and "value='bye'" in net.XMLDesc(0)
    assert "No changes." in project.run("plan", check=True).stdout

    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


SHEET = """
    xslt: |
      <xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
        <xsl:template match="@*|node()"><xsl:copy><xsl:apply-templates select="@*|node()"/></xsl:copy></xsl:template>
        <xsl:template match="/domain/on_crash"><on_crash>ACTION</on_crash></xsl:template>
      </xsl:stylesheet>
"""


def test_xslt_patches_hold_on_the_host_and_show_in_the_plan(project: Any, conn: Any) -> None:
    p = project.prefix
    base = f"domains:\n  {p}-vm:\n    type: qemu\n    memory: 64MiB\n    state: stopped\n"
    project.write(base + SHEET.replace("ACTION", "preserve"))
    project.apply()
    dom = conn.lookupByName(f"{p}-vm")

    def on_crash() -> str:
        return etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()).findtext("on_crash")

    assert on_crash() == "preserve"
    assert plan_fields(project) == {}
    # Drift in what only the stylesheet says is seen and corrected.
    root = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    root.find("on_crash").text = "destroy"
    conn.defineXML(etree.tostring(root, encoding="unicode"))
    assert plan_fields(project) == {f"domain.{p}-vm": {"xslt": "live"}}
    project.apply()
    assert on_crash() == "preserve"
    # A changed stylesheet is a change like any other.
    project.write(base + SHEET.replace("ACTION", "restart"))
    plan = project.run("plan", check=True).stdout
    assert "xslt" in plan and "on_crash" in plan, plan
    project.apply()
    assert on_crash() == "restart"
    assert plan_fields(project) == {}
