"""Networks: define, start, autostart; DHCP reservations changed live with networkUpdate; restart-class
changes applied by restarting the network and re-plugging the running guests' interfaces."""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any

from lxml import etree

from vmform.lastapplied import record_for, unset_removed, write_record
from vmform.live import parse_xml
from vmform.plan import Change
from vmform.providers.base import ApplyContext, Provider
from vmform.render.validate import validate
from vmform.render.xml import render_network, to_text, write_fields
from vmform.schema.network import dhcp_host_element, dns_host_element
from vmform.schema.types import Effect

LIVE_FIELDS = {"autostart", "dhcp_hosts"}
_UNNAMED_BRIDGES = threading.Lock()


def _lookup(ctx: ApplyContext, change: Change) -> Any:
    conn = ctx.connections.get()
    uuid = change.identity.get("uuid")
    return conn.networkLookupByUUIDString(uuid) if uuid else conn.networkLookupByName(change.live_name or change.name)


def replug(ctx: ApplyContext, network: str, domain_names: tuple[str, ...]) -> None:
    """After a network restart its bridge is new and the guests' taps hang loose. Switching an interface
    to type='bridge' on that bridge and back to type='network' makes libvirt re-attach the tap, live,
    without the guest noticing more than a short link outage."""
    import libvirt

    conn = ctx.connections.get()
    bridge = parse_xml(conn.networkLookupByName(network).XMLDesc(0)).find("bridge").get("name")
    for name in domain_names:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            continue  # gone since the plan was made: nothing to re-plug
        if not dom.isActive():
            continue
        for node in parse_xml(dom.XMLDesc(0)).findall("devices/interface[@type='network']"):
            source = node.find("source")
            if source is None or source.get("network") != network:
                continue
            as_bridge = copy.deepcopy(node)
            as_bridge.set("type", "bridge")
            as_bridge.find("source").attrib.clear()
            as_bridge.find("source").set("bridge", bridge)
            as_network = copy.deepcopy(node)
            as_network.find("source").attrib.clear()
            as_network.find("source").set("network", network)
            for element in (as_bridge, as_network):
                target = element.find("target")
                if target is not None:
                    element.remove(target)
                dom.updateDeviceFlags(etree.tostring(element, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)


class NetworkProvider(Provider):
    kind = "network"

    def create(self, ctx: ApplyContext, change: Change) -> None:
        assert change.after is not None
        root = render_network(change.name, change.after, ctx.project, change.address)
        validate("network", root, change.address)
        # libvirt names a bridge (virbrN) at define time and can hand the same free name to two networks
        # defined at once ("error creating bridge interface virbr2: File exists"): those go one at a time.
        with contextlib.nullcontext() if change.after.get("bridge") else _UNNAMED_BRIDGES:
            net = ctx.connections.get().networkDefineXML(to_text(root))
            try:
                if change.after.get("active", True) is not False:
                    net.create()
            except Exception as exc:
                if not ctx.refused(exc):
                    raise
                net.undefine()  # a network that cannot start (bridge name taken, ...) is not left behind half-made
                raise
        net.setAutostart(1 if change.after.get("autostart", True) else 0)

    def update(self, ctx: ApplyContext, change: Change) -> None:
        import libvirt

        assert change.after is not None
        net = _lookup(ctx, change)
        touched = {f.path.split("[", 1)[0].split(".", 1)[0] for f in change.fields}
        if "persistent" in touched:
            # Undefined outside vmform while it ran: defined again from its running definition (same UUID and
            # bridge) with the manifests' values.
            root = parse_xml(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE))
            write_fields("network", root, change.after)
            write_record(root, record_for("network", change.after))
            validate("network", root, change.address)
            ctx.connections.get().networkDefineXML(to_text(root))
        xml_fields = sorted(touched - {"autostart", "persistent", "active"})
        if xml_fields:
            root = parse_xml(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE))
            removed = unset_removed("network", root, change, ctx.project)  # three-way removals the plan lists
            write_fields("network", root, {**change.after, **removed}, xml_fields)
            write_record(root, record_for("network", change.after))
            validate("network", root, change.address)
            ctx.connections.get().networkDefineXML(to_text(root))
        if net.isActive() and change.restart:
            net.destroy()
            net.create()
            replug(ctx, net.name(), change.replug)
            ctx.record_restart(change.address)
        elif net.isActive():
            # Removals first: libvirt matches a DNS host to delete by its names too, and a new entry with the
            # same name would make that ambiguous.
            for field in sorted(change.fields, key=lambda f: f.after is not None):
                if field.path.startswith("dhcp_hosts[") and field.effect is Effect.LIVE:
                    self._update_host(net, field.before, field.after)
                elif field.path.startswith("dns_hosts[") and field.effect is Effect.LIVE:
                    self._update_dns_host(net, field.before, field.after)
        if "autostart" in touched:
            net.setAutostart(1 if change.after["autostart"] else 0)
        if not net.isActive():
            net.create()
            # Stopped outside vmform while guests ran: their taps lost the bridge and stay off it until re-plugged.
            replug(ctx, net.name(), change.replug)

    def _update_host(self, net: Any, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
        import libvirt

        section = libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST
        if after is None:
            command, host = libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, before
        elif before is None:
            command, host = libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, after
        else:
            command, host = libvirt.VIR_NETWORK_UPDATE_COMMAND_MODIFY, after
        assert host is not None
        xml = etree.tostring(dhcp_host_element(host), encoding="unicode")
        net.update(command, section, -1, xml, libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE)

    def _update_dns_host(self, net: Any, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
        """libvirt cannot modify a DNS host in place: the old entry goes, the new one comes."""
        import libvirt

        section, live = libvirt.VIR_NETWORK_SECTION_DNS_HOST, libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
        if before is not None:
            xml = etree.tostring(dns_host_element(before), encoding="unicode")
            net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, section, -1, xml, live)
        if after is not None:
            xml = etree.tostring(dns_host_element(after), encoding="unicode")
            net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, section, -1, xml, live)

    def delete(self, ctx: ApplyContext, change: Change) -> None:
        net = _lookup(ctx, change)
        persistent = bool(net.isPersistent())  # a transient one (undefined outside vmform) is gone once stopped
        if net.isActive():
            net.destroy()
        if persistent:
            net.undefine()


PROVIDER = NetworkProvider()
