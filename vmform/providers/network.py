"""Networks: define, start, autostart; updates redefine the persistent config."""

from __future__ import annotations

from typing import Any

from vmform.live import parse_xml
from vmform.plan import Change
from vmform.providers.base import ApplyContext, Provider
from vmform.render.validate import validate
from vmform.render.xml import render_network, to_text, write_fields


def _lookup(ctx: ApplyContext, change: Change) -> Any:
    conn = ctx.connections.get()
    uuid = change.identity.get("uuid")
    return conn.networkLookupByUUIDString(uuid) if uuid else conn.networkLookupByName(change.live_name or change.name)


class NetworkProvider(Provider):
    kind = "network"

    def create(self, ctx: ApplyContext, change: Change) -> None:
        assert change.after is not None
        root = render_network(change.name, change.after, ctx.project, change.address)
        validate("network", root, change.address)
        net = ctx.connections.get().networkDefineXML(to_text(root))
        try:
            net.create()
        except Exception:
            net.undefine()  # a network that cannot start (bridge name taken, ...) is not left behind half-made
            raise
        net.setAutostart(1 if change.after.get("autostart", True) else 0)

    def update(self, ctx: ApplyContext, change: Change) -> None:
        import libvirt

        assert change.after is not None
        net = _lookup(ctx, change)
        touched = {f.path for f in change.fields}
        xml_fields = sorted(touched - {"autostart"})
        if xml_fields:
            root = parse_xml(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE))
            write_fields("network", root, change.after, xml_fields)
            validate("network", root, change.address)
            ctx.connections.get().networkDefineXML(to_text(root))
        if "autostart" in touched:
            net.setAutostart(1 if change.after["autostart"] else 0)
        if not net.isActive():
            net.create()

    def delete(self, ctx: ApplyContext, change: Change) -> None:
        net = _lookup(ctx, change)
        if net.isActive():
            net.destroy()
        net.undefine()


PROVIDER = NetworkProvider()
