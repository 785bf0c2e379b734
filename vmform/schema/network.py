"""Network fields."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

from lxml import etree

from vmform.schema.domain import HOSTNAME
from vmform.schema.extra_xml import ExtraXml, ExtraXmlBinding
from vmform.schema.kind import Kind
from vmform.schema.types import (
    Bool,
    Effect,
    Enum,
    FieldSpec,
    Int,
    IPv4Address,
    IPv4Interface,
    ListOf,
    Mac,
    Obj,
    Removal,
    Str,
)
from vmform.schema.xmlbind import Attr, Element, XmlBinding, ensure
from vmform.schema.xslt import Stylesheet, StylesheetBinding

MODES = ("isolated", "nat", "route", "open", "bridge")


class Mode(XmlBinding):
    def read(self, root: Element) -> Any:
        forward = root.find("forward")
        return "isolated" if forward is None else (forward.get("mode") or "nat")

    def write(self, root: Element, value: Any) -> None:
        forward = root.find("forward")
        if value == "isolated":
            if forward is not None:
                root.remove(forward)
            return
        if forward is None or forward.get("mode") != value:
            if forward is not None:
                root.remove(forward)
            forward = etree.SubElement(root, "forward", mode=value)


def _ipv4(root: Element) -> Element | None:
    for node in root.findall("ip"):
        if node.get("family") in (None, "ipv4"):
            return node
    return None


class IPv4(XmlBinding):
    def read(self, root: Element) -> Any:
        node = _ipv4(root)
        if node is None or node.get("address") is None:
            return None
        prefix = node.get("prefix")
        if prefix is None and node.get("netmask"):
            prefix = str(ipaddress.IPv4Network(f"0.0.0.0/{node.get('netmask')}").prefixlen)
        return str(ipaddress.IPv4Interface(f"{node.get('address')}/{prefix or 24}"))

    def write(self, root: Element, value: Any) -> None:
        node = _ipv4(root)
        if value is None:
            if node is not None:
                root.remove(node)
            return
        if node is None:
            node = etree.SubElement(root, "ip")
        iface = ipaddress.IPv4Interface(value)
        node.attrib.pop("netmask", None)
        node.attrib.pop("family", None)
        node.set("address", str(iface.ip))
        node.set("prefix", str(iface.network.prefixlen))


class Dhcp(XmlBinding):
    def read(self, root: Element) -> Any:
        node = _ipv4(root)
        rng = node.find("dhcp/range") if node is not None else None
        if rng is None:
            return None
        return {"start": rng.get("start"), "end": rng.get("end")}

    def write(self, root: Element, value: Any) -> None:
        node = _ipv4(root)
        if node is None:
            return  # check() refuses dhcp without ipv4
        if value is None:
            dhcp = node.find("dhcp")
            if dhcp is not None:
                for rng in dhcp.findall("range"):
                    dhcp.remove(rng)
                if len(dhcp) == 0:
                    node.remove(dhcp)
            return
        dhcp = ensure(node, "dhcp")
        for rng in dhcp.findall("range"):
            dhcp.remove(rng)
        dhcp.insert(0, etree.Element("range", start=value["start"], end=value["end"]))


def dhcp_host_element(host: dict[str, Any]) -> Element:
    node = etree.Element("host", mac=host["mac"])
    if host.get("name"):
        node.set("name", host["name"])
    node.set("ip", host["ip"])
    return node


class DhcpHosts(XmlBinding):
    """Static DHCP reservations, matched by MAC (``networkUpdate`` changes them on a running network)."""

    def read(self, root: Element) -> Any:
        node = _ipv4(root)
        if node is None:
            return []
        hosts = []
        for host in node.findall("dhcp/host"):
            entry = {"mac": (host.get("mac") or "").lower(), "ip": host.get("ip")}
            if host.get("name"):
                entry["name"] = host.get("name")
            hosts.append(entry)
        return hosts

    def write(self, root: Element, value: Any) -> None:
        node = _ipv4(root)
        if node is None:
            return
        dhcp = node.find("dhcp")
        if dhcp is None:
            if not value:
                return
            dhcp = etree.SubElement(node, "dhcp")
        for host in dhcp.findall("host"):
            dhcp.remove(host)
        for host in value:
            dhcp.append(dhcp_host_element(host))  # after the ranges, as libvirt's schema orders them
        if len(dhcp) == 0:
            node.remove(dhcp)


class DnsHosts(XmlBinding):
    """DNS host entries (``<dns><host ip=…><hostname>…``), matched by address (``networkUpdate`` changes them on
    a running network); the rest of ``<dns>`` is left as it is."""

    def read(self, root: Element) -> Any:
        return [{"ip": host.get("ip"), "hostnames": [name.text or "" for name in host.findall("hostname")]}
                for host in root.findall("dns/host")]

    def write(self, root: Element, value: Any) -> None:
        dns = root.find("dns")
        if dns is None:
            if not value:
                return
            dns = etree.Element("dns")
            ip = root.find("ip")
            if ip is not None:
                ip.addprevious(dns)
            else:
                root.append(dns)
        for host in dns.findall("host"):
            dns.remove(host)
        for host in value:
            dns.append(dns_host_element(host))
        if len(dns) == 0 and not dns.attrib:
            root.remove(dns)


def dns_host_element(host: dict[str, Any]) -> Element:
    node = etree.Element("host", ip=host["ip"])
    for name in host["hostnames"]:
        etree.SubElement(node, "hostname").text = name
    return node


DNS_HOST = Obj((
    FieldSpec("ip", IPv4Address(), "the address", required=True),
    FieldSpec("hostnames", ListOf(Str(pattern=HOSTNAME, hint="a host name such as web or web.lab.test"), min_items=1),
              "names that resolve to it", required=True),
))

DHCP_HOST = Obj((
    FieldSpec("mac", Mac(), "the guest interface's MAC address", required=True),
    FieldSpec("ip", IPv4Address(), "the address it always gets", required=True),
    FieldSpec("name", Str(pattern=r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", hint="a host name"), "host name handed out with it"),
))

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("mode", Enum(MODES), "isolated (no forwarding), nat, route, open, or bridge (an existing host bridge)",
              xml="forward/@mode", default="isolated", binding=Mode()),
    FieldSpec("bridge", Str(pattern=r"[A-Za-z0-9_.-]{1,15}", hint="at most 15 letters, digits, _.-"),
              "bridge device name (default: libvirt picks virbrN); for mode bridge, the existing host bridge",
              xml="bridge/@name", binding=Attr("bridge", "name")),
    FieldSpec("ipv4", IPv4Interface(), "the host's address and prefix on the network, e.g. 10.40.0.1/24",
              xml="ip/@address, ip/@prefix", binding=IPv4(),
              removal=Removal("no IPv4 address on the host side (and no DHCP)")),
    FieldSpec("dhcp", Obj((FieldSpec("start", IPv4Address(), "first leased address", required=True),
                           FieldSpec("end", IPv4Address(), "last leased address", required=True))),
              "DHCP range", xml="ip/dhcp/range", binding=Dhcp(), removal=Removal("no DHCP range")),
    FieldSpec("dhcp_hosts", ListOf(DHCP_HOST), "static DHCP reservations", effect=Effect.LIVE,
              xml="ip/dhcp/host", default=[], binding=DhcpHosts(),
              effect_doc="networkUpdate, no network restart (also made from domain interfaces with ip)"),
    FieldSpec("dns_hosts", ListOf(DNS_HOST), "DNS host entries (also made from domain interfaces with ip and "
              "hostname)", effect=Effect.LIVE, xml="dns/host", default=[], binding=DnsHosts(),
              effect_doc="networkUpdate, no network restart"),
    FieldSpec("mtu", Int(68, 65535), "MTU of the bridge", xml="mtu/@size", binding=Attr("mtu", "size", int, str),
              removal=Removal("libvirt's default MTU")),
    FieldSpec("domain", Str(pattern=r"[A-Za-z0-9.-]{1,253}", hint="a DNS domain name"), "DNS domain of the network",
              xml="domain/@name", binding=Attr("domain", "name"), removal=Removal("no DNS domain")),
    FieldSpec("autostart", Bool(), "start with the host", effect=Effect.LIVE, default=True),
    FieldSpec("active", Bool(), "started (the default), or only defined: false keeps a network vmform creates, or "
              "imports inactive, stopped; a managed network stopped outside vmform is started again only while "
              "this is true", effect=Effect.LIVE, default=True, compare=False),
    FieldSpec("xml", ExtraXml("network"), "anything else of libvirt's network XML, element by element (see "
              "'The xml: section'); merged after the curated fields", xml="(any)", binding=ExtraXmlBinding("network")),
    FieldSpec("xslt", Stylesheet(), "an XSLT stylesheet run last over the XML vmform writes (for ported "
              "configurations); it must be idempotent", xml="(any)", binding=StylesheetBinding()),
)


def add_reservations(manifests: Any) -> Iterator[tuple[Any, tuple[str | int, ...], str]]:
    """A domain interface's ``ip`` and ``hostname`` become its network's DHCP host and DNS host entries (in
    the network's desired values). Yields (domain resource, relative path, message) for mistakes."""
    for domain in manifests.of_kind("domain"):
        written = domain.values.get("interfaces") or []
        bound = domain.desired.get("interfaces") or []
        for number, (nic, desired_nic) in enumerate(zip(written, bound, strict=False)):
            if not isinstance(nic, dict) or nic.get("ip") is None or nic.get("network") is None:
                continue
            network = manifests.resolve("network", nic["network"], domain.module)
            if network is None:
                continue
            where = ("interfaces", number, "ip")
            subnet = network.desired.get("ipv4")
            if subnet is None or ipaddress.IPv4Address(nic["ip"]) not in ipaddress.IPv4Interface(subnet).network:
                yield domain, where, f"{nic['ip']} is not in {network.address}'s ipv4 network ({subnet or 'none'})"
                continue
            if "dhcp_hosts" not in network.desired:
                yield domain, where, f"{network.address}'s xml: section states its DHCP hosts; {nic['ip']} cannot be added"
                continue
            hosts = network.desired["dhcp_hosts"]
            if any(host["ip"] == nic["ip"] for host in hosts):
                yield domain, where, f"{nic['ip']} is already reserved on {network.address}"
                continue
            entry = {"mac": desired_nic["mac"], "ip": nic["ip"]}
            if nic.get("hostname"):
                entry["name"] = nic["hostname"].split(".", 1)[0]
            hosts.append(entry)
            if nic.get("hostname"):
                if "dns_hosts" not in network.desired:
                    yield domain, ("interfaces", number, "hostname"), (
                        f"{network.address}'s xml: section states its DNS hosts; a hostname cannot be added to them")
                    continue
                network.desired["dns_hosts"].append({"ip": nic["ip"], "hostnames": [nic["hostname"]]})


def check(values: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    mode = values.get("mode", "isolated")
    carried = values.get("xml") or {}  # what the xml: section says instead of the curated fields
    forward: dict[str, Any] = carried["forward"] if isinstance(carried.get("forward"), dict) else {}
    if mode == "bridge":
        if not values.get("bridge") and not carried.get("bridge") and not (forward.get("interface") or forward.get("pf")):
            yield ("mode",), "mode bridge needs 'bridge': the name of an existing host bridge (or xml: forward interfaces)"
        for key in ("ipv4", "dhcp", "domain"):
            if key in values:
                yield (key,), f"'{key}' does not apply to mode bridge (the host bridge's own network serves it)"
    if "dhcp" in values:
        if "ipv4" not in values:
            yield ("dhcp",), "dhcp needs ipv4 (the network's own address and prefix)"
        else:
            net = ipaddress.IPv4Interface(values["ipv4"]).network
            start, end = (ipaddress.IPv4Address(values["dhcp"][k]) for k in ("start", "end"))
            for key, addr in (("start", start), ("end", end)):
                if addr not in net:
                    yield ("dhcp", key), f"{addr} is outside the network {net}"
            if start > end:
                yield ("dhcp",), f"dhcp start {start} is after end {end}"
    hosts = values.get("dhcp_hosts") or []
    if hosts and "ipv4" not in values:
        yield ("dhcp_hosts",), "dhcp_hosts needs ipv4 (the network's own address and prefix)"
    elif hosts:
        net = ipaddress.IPv4Interface(values["ipv4"]).network
        seen_mac: dict[str, int] = {}
        seen_ip: dict[str, int] = {}
        for number, host in enumerate(hosts):
            if ipaddress.IPv4Address(host["ip"]) not in net:
                yield ("dhcp_hosts", number, "ip"), f"{host['ip']} is outside the network {net}"
            if host["mac"] in seen_mac:
                yield ("dhcp_hosts", number, "mac"), f"MAC {host['mac']} is already reserved by dhcp_hosts[{seen_mac[host['mac']]}]"
            if host["ip"] in seen_ip:
                yield ("dhcp_hosts", number, "ip"), f"{host['ip']} is already reserved by dhcp_hosts[{seen_ip[host['ip']]}]"
            seen_mac[host["mac"]] = number
            seen_ip[host["ip"]] = number
    if mode in ("nat", "route", "open") and "ipv4" not in values and not carried.get("ip"):
        yield ("mode",), f"mode {mode} needs ipv4 (the network's own address and prefix)"


KIND = Kind("network", "networks", FIELDS, "a libvirt virtual network", check=check)
