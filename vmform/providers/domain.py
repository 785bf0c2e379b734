"""Domains: define, start, live changes through libvirt's LIVE APIs, shutdown and undefine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lxml import etree

from vmform.errors import VmformError
from vmform.events import Watch, wait_for
from vmform.lastapplied import record_for, unset_removed, write_record
from vmform.live import parse_xml
from vmform.plan import Change, FieldChange
from vmform.providers.base import ApplyContext, Provider
from vmform.render.validate import validate
from vmform.render.xml import render_domain, to_text, write_fields
from vmform.schema.domain import disk_element, interface_element
from vmform.schema.registry import KINDS
from vmform.schema.types import Effect
from vmform.schema.xmlbind import SizeText

API_FIELDS = {"state", "autostart"}
DETACH_TIMEOUT = 30.0


def _lookup(ctx: ApplyContext, change: Change) -> Any:
    import libvirt

    conn = ctx.connections.get()
    uuid = change.identity.get("uuid")
    try:
        return conn.lookupByUUIDString(uuid) if uuid else conn.lookupByName(change.live_name or change.name)
    except libvirt.libvirtError:
        return conn.lookupByName(change.live_name or change.name)


def _top_field(path: str) -> str:
    """The field a change path belongs to: disks[vda] -> disks, xml.devices.watchdog -> xml."""
    return path.split("[", 1)[0].split(".", 1)[0]


def wait_until_off(dom: Any, timeout: float, then: Any = None) -> bool:
    """Wait (bounded) for the domain's STOPPED lifecycle event; ``then`` (e.g. the ACPI shutdown request) runs
    after the callback is registered, so a guest that stops at once is not missed."""
    import libvirt

    with Watch(dom.connect(), dom).domain(
        libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lambda event, _detail: event == libvirt.VIR_DOMAIN_EVENT_STOPPED
    ) as watch:
        if then is not None:
            then()
        # Checked each second too: a connection libvirtd dropped (a restart) delivers no event, and the wait
        # must end with that error instead of sleeping out the timeout.
        return wait_for(watch, lambda: not dom.isActive(), timeout, recheck=1.0)


def record_balloon(dom: Any, target: int) -> None:
    """Remember (live only) the balloon target asked for and the size the guest reports now, so the next
    plan can tell a guest that does not balloon (nothing to do) from one whose memory was changed since."""
    import libvirt

    from vmform.ownership import BALLOON_NAMESPACE

    root = parse_xml(dom.XMLDesc(0))
    actual = SizeText("currentMemory").read(root)
    record = etree.Element("balloon", target=str(target), actual=str(actual))
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, etree.tostring(record, encoding="unicode"), "vmfballoon",
                    BALLOON_NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def start(dom: Any, memory: int | None) -> None:
    dom.create()
    if memory is not None:  # None: the xml: section states the memory, not the curated field
        record_balloon(dom, memory)


def stop(dom: Any, timeout: float, graceful: bool = True, force_off: bool = True,
         tell: Callable[[str], None] | None = None) -> None:
    """ACPI shutdown with a bounded wait; then power off, only when ``force_off`` allows it. Otherwise a guest
    still running after ``timeout`` seconds is left running and the change fails, saying how to allow it."""
    import libvirt

    if not dom.isActive():
        return

    def request() -> None:
        dom.shutdown()
        if tell is not None:
            tell(f"domain {dom.name()}: waiting up to {timeout:.0f}s for the guest to shut down")

    if graceful and timeout > 0:
        try:
            if wait_until_off(dom, timeout, then=request):
                return
        except libvirt.libvirtError:
            if not dom.isActive():
                return
            if not force_off:
                raise
    if not force_off:
        raise VmformError(
            f"the guest did not shut down within {timeout:.0f}s (shutdown_timeout) "
            "and is left running; vmform powers a domain off only when allowed: apply --force-off, or "
            "force_off = true in vmform.toml")
    try:
        dom.destroy()
    except libvirt.libvirtError:
        if dom.isActive():
            raise


class DomainProvider(Provider):
    kind = "domain"

    def create(self, ctx: ApplyContext, change: Change) -> None:
        assert change.after is not None
        root = render_domain(change.name, change.after, ctx.project, change.address)
        validate("domain", root, change.address)
        conn = ctx.connections.get()
        dom = conn.defineXML(to_text(root))
        if change.after.get("autostart"):
            dom.setAutostart(1)
        if change.after.get("state", "running") in ("running", "paused"):
            start(dom, change.after.get("memory"))
            if change.after.get("state") == "paused":
                dom.suspend()

    def update(self, ctx: ApplyContext, change: Change) -> None:
        import libvirt

        assert change.after is not None
        after = change.after
        dom = _lookup(ctx, change)
        touched = {_top_field(f.path) for f in change.fields}
        xml_fields = sorted(touched - API_FIELDS)
        if xml_fields:
            root = parse_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            removed = unset_removed("domain", root, change, ctx.project)  # three-way removals the plan lists
            write_fields("domain", root, {**after, **removed}, xml_fields)
            if "type" in xml_fields:
                root.set("type", after["type"])
            write_record(root, record_for("domain", after))
            validate("domain", root, change.address)
            ctx.connections.get().defineXML(to_text(root))
        if dom.isActive():
            for field_change in change.fields:
                if field_change.effect is Effect.LIVE and _top_field(field_change.path) not in API_FIELDS:
                    self._apply_live(dom, field_change, after)
        if "autostart" in touched:
            dom.setAutostart(1 if after["autostart"] else 0)
        if "state" in touched:
            self._set_state(ctx, dom, after["state"], after.get("memory"))
        elif change.restart and dom.isActive():
            stop(dom, ctx.shutdown_timeout, force_off=ctx.force_off, tell=ctx.tell)
            start(dom, after.get("memory"))

    def _apply_live(self, dom: Any, change: FieldChange, after: dict[str, Any]) -> None:
        import libvirt

        live = libvirt.VIR_DOMAIN_AFFECT_LIVE
        name = _top_field(change.path)
        if name == "memory":
            dom.setMemoryFlags(after["memory"] // 1024, live)
            record_balloon(dom, after["memory"])
        elif name == "vcpus":
            dom.setVcpusFlags(after["vcpus"], live)
        elif name == "description":
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, after["description"] or None, None, None, live)
        elif name in ("disks", "interfaces"):
            build = disk_element if name == "disks" else interface_element
            if change.before is None and change.after is not None:
                dom.attachDeviceFlags(etree.tostring(build(change.after), encoding="unicode"), live)
            elif change.after is None and change.before is not None:
                self._detach(dom, name, change.before)
            elif change.after is not None:
                # Another network or bridge for the same NIC (libvirt re-plugs the tap), or another medium in a
                # cdrom drive: the guest keeps its device.
                if name == "disks" and change.after.get("device") == "cdrom" and change.before == change.after:
                    # The same volume with new content (a replaced seed): libvirt changes nothing for an unchanged
                    # source, so eject first (forced: a guest may hold the tray locked) and insert it again.
                    empty = {k: v for k, v in change.after.items() if k not in ("pool", "volume", "path")}
                    dom.updateDeviceFlags(etree.tostring(build(empty), encoding="unicode"),
                                          live | libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE)
                dom.updateDeviceFlags(etree.tostring(build(change.after), encoding="unicode"), live)

    def _detach(self, dom: Any, name: str, item: dict[str, Any]) -> None:
        """Detach is asynchronous: the guest must let go. Wait (bounded) until the device is gone."""
        import libvirt

        spec = KINDS["domain"].spec(name)
        assert spec is not None and spec.binding is not None
        key = "target" if name == "disks" else "mac"
        # Detach by the live element, so libvirt matches exactly the device that is there.
        live_root = parse_xml(dom.XMLDesc(0))
        xpath = "devices/disk[@device='disk']" if name == "disks" else "devices/interface"
        element = None
        for node in live_root.findall(xpath):
            found = node.find("target").get("dev") if name == "disks" else node.find("mac").get("address")  # type: ignore[union-attr]
            if found == item.get(key):
                element = node
        if element is None:
            return
        alias = element.find("alias").get("name") if element.find("alias") is not None else None
        failed: list[str] = []

        def refused(device: str) -> bool:
            if alias is None or device == alias:
                failed.append(device)
                return True
            return False

        def gone() -> bool:
            current = spec.binding.read(parse_xml(dom.XMLDesc(0)))
            return all(entry.get(key) != item.get(key) for entry in current)

        # Detach is asynchronous: DEVICE_REMOVED says the guest let go, DEVICE_REMOVAL_FAILED that it refused.
        with Watch(dom.connect(), dom).domain(
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, lambda removed: alias is None or removed == alias
        ).domain(
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, refused
        ) as watch:
            dom.detachDeviceFlags(etree.tostring(element, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            if wait_for(watch, lambda: bool(failed) or gone(), DETACH_TIMEOUT) and not failed:
                return
        if failed:
            raise RuntimeError(f"the guest refused to release {name[:-1]} {item.get(key)} (DEVICE_REMOVAL_FAILED); it "
                               "is gone from the configuration and leaves at the next restart")
        raise RuntimeError(
            f"the guest did not release {name[:-1]} {item.get(key)} within {DETACH_TIMEOUT:.0f}s (guests without "
            "ACPI hotplug support never do); it is gone from the configuration and leaves at the next restart"
        )

    def _set_state(self, ctx: ApplyContext, dom: Any, state: str, ctx_memory: int | None) -> None:
        import libvirt

        current, _ = dom.state()
        if state == "running":
            if current == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            elif current == libvirt.VIR_DOMAIN_PMSUSPENDED:
                dom.pMWakeup(0)
            elif not dom.isActive():
                start(dom, ctx_memory)
        elif state == "paused":
            if not dom.isActive():
                start(dom, ctx_memory)
            if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
                dom.suspend()
        else:
            stop(dom, ctx.shutdown_timeout, force_off=ctx.force_off, tell=ctx.tell)

    def delete(self, ctx: ApplyContext, change: Change) -> None:
        import libvirt

        dom = _lookup(ctx, change)
        if dom.isActive():
            dom.destroy()  # the domain is going away with its disks: no need to wait for the guest
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        )
        dom.undefineFlags(flags)


PROVIDER = DomainProvider()
