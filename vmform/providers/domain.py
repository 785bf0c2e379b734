"""Domains: define, start, live changes through libvirt's LIVE APIs, shutdown and undefine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lxml import etree

from vmform.diff import is_duplicate_path
from vmform.errors import VmformError
from vmform.events import Watch, wait_for
from vmform.lastapplied import record_for, unset_removed, write_record
from vmform.live import UNPLUG_KEY, UNPLUG_NAMESPACE, device_address, device_key, device_nodes, parse_xml
from vmform.plan import Change, FieldChange
from vmform.providers.base import ApplyContext, Provider
from vmform.render.validate import validate
from vmform.render.xml import render_domain, to_text, write_fields
from vmform.schema.domain import disk_element, interface_element
from vmform.schema.types import Effect
from vmform.schema.xmlbind import SizeText

API_FIELDS = {"state", "autostart", "persistent"}
DETACH_TIMEOUT = 30.0  # the default of ApplyContext.detach_timeout (vmform.toml detach_timeout)


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


def record_unplug(dom: Any, field_name: str, key: str, address: str) -> None:
    """Remember (live only, so a restart forgets it) that vmform asked the guest to release this device."""
    import libvirt

    current = parse_xml(dom.XMLDesc(0)).find(f"metadata/{{{UNPLUG_NAMESPACE}}}unplug")
    record = etree.Element("unplug")
    for entry in current.findall(f"{{{UNPLUG_NAMESPACE}}}device") if current is not None else []:
        if (entry.get("field"), entry.get("key"), entry.get("address")) != (field_name, key, address):
            etree.SubElement(record, "device", **{k: v for k, v in entry.attrib.items() if isinstance(v, str)})
    etree.SubElement(record, "device", field=field_name, key=key, address=address)
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, etree.tostring(record, encoding="unicode"), UNPLUG_KEY,
                    UNPLUG_NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_LIVE)


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
        # A second device with a managed key is removed by its address, never through the keyed list.
        duplicates = [f for f in change.fields if is_duplicate_path(f.path)]
        fields = [f for f in change.fields if not is_duplicate_path(f.path)]
        touched = {_top_field(f.path) for f in fields}
        if "persistent" in touched:
            self._define_persistent(ctx, dom, change)
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
        unreleased: list[str] = []  # devices asked to leave the running guest that it did not let go of
        for duplicate in duplicates:
            if duplicate.effect is Effect.LIVE and not self._remove_duplicate(ctx, dom, duplicate):
                unreleased.append(duplicate.path)
        if dom.isActive():
            for field_change in fields:
                live_change = field_change.effect is Effect.LIVE and _top_field(field_change.path) not in API_FIELDS
                if live_change and not self._apply_live(ctx, dom, field_change, after):
                    unreleased.append(field_change.path)
        if "autostart" in touched:
            dom.setAutostart(1 if after["autostart"] else 0)
        restart = change.restart or (bool(unreleased) and change.restart_allowed)
        if "state" in touched:
            self._set_state(ctx, dom, after["state"], after.get("memory"))
        elif restart and dom.isActive():
            if unreleased and not change.restart:
                ctx.tell(f"domain {dom.name()}: restarting it, the guest did not release {', '.join(unreleased)}")
            stop(dom, ctx.shutdown_timeout, force_off=ctx.force_off, tell=ctx.tell)
            start(dom, after.get("memory"))
            ctx.record_restart(change.address)
            unreleased = []
        if unreleased and dom.isActive():
            ctx.record_waiting(change.address, f"{', '.join(unreleased)} leave{'s' if len(unreleased) == 1 else ''} "
                               f"the running guest at its next restart: the guest did not release "
                               f"{'it' if len(unreleased) == 1 else 'them'} within {ctx.detach_timeout:.0f}s "
                               "(apply --restart or restart_policy: allowed restarts it)")

    def _define_persistent(self, ctx: ApplyContext, dom: Any, change: Change) -> None:
        """Define a transient domain again (someone undefined it while it ran): from its running definition, with
        every managed field written from the manifests. What libvirt assigned (UUID, device addresses, the
        recorded defaults) and settings made outside vmform stay, as in any update; the live-only records
        of this run (balloon, pending unplugs) do not go into the definition."""
        import libvirt

        from vmform.ownership import BALLOON_NAMESPACE

        assert change.after is not None
        root = parse_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        metadata = root.find("metadata")
        for namespace in (BALLOON_NAMESPACE, UNPLUG_NAMESPACE):
            for record in metadata.findall(f"{{{namespace}}}*") if metadata is not None else []:
                metadata.remove(record)
        write_fields("domain", root, change.after)
        root.set("type", change.after.get("type", root.get("type") or "kvm"))
        write_record(root, record_for("domain", change.after))
        validate("domain", root, change.address)
        ctx.connections.get().defineXML(to_text(root))

    def _remove_duplicate(self, ctx: ApplyContext, dom: Any, duplicate: FieldChange) -> bool:
        """Remove a second device with a managed key, by its address: from the definition at once, from the
        running guest by a hot-unplug. False when the guest did not release it."""
        import libvirt

        item = duplicate.before or {}
        name = _top_field(duplicate.path)
        key = duplicate.path.split("[", 1)[1].split("]", 1)[0]
        address = item.get("address") or ""
        where = item.get("where") or []

        def node_in(root: Any) -> Any:
            return next((node for node in device_nodes(root, name)
                         if device_key(name, node) == key and device_address(node) == address), None)

        if "config" in where and dom.isPersistent():
            node = node_in(parse_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
            if node is not None:
                dom.detachDeviceFlags(etree.tostring(node, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if "live" in where and dom.isActive():
            node = node_in(parse_xml(dom.XMLDesc(0)))
            if node is not None:
                return self._detach_node(ctx, dom, name, key, node)
        return True

    def _apply_live(self, ctx: ApplyContext, dom: Any, change: FieldChange, after: dict[str, Any]) -> bool:
        """Apply one live-effect change to the running domain; False when a device it detaches is not released."""
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
                key = change.after["target" if name == "disks" else "mac"]
                if any(device_key(name, node) == key for node in device_nodes(parse_xml(dom.XMLDesc(0)), name)):
                    return True  # only the definition lacked it (detached --config): a second one would be a duplicate
                dom.attachDeviceFlags(etree.tostring(build(change.after), encoding="unicode"), live)
            elif change.after is None and change.before is not None:
                return self._detach(ctx, dom, name, change.before)
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
        return True

    def _detach(self, ctx: ApplyContext, dom: Any, name: str, item: dict[str, Any]) -> bool:
        """Detach a device from the running guest by the live element, so libvirt matches exactly the device
        that is there. False when the guest did not release it."""
        key = "target" if name == "disks" else "mac"
        live_root = parse_xml(dom.XMLDesc(0))
        element = None
        for node in device_nodes(live_root, name):
            if device_key(name, node) == item.get(key):
                element = node
        if element is None:
            return True
        return self._detach_node(ctx, dom, name, str(item.get(key)), element)

    def _detach_node(self, ctx: ApplyContext, dom: Any, name: str, key: str, element: Any) -> bool:
        """Hot-unplug one device and wait (bounded) until the guest lets go of it. When it does not (a guest
        without ACPI hotplug never answers; DEVICE_REMOVAL_FAILED is a refusal), the device stays in the running
        guest until it restarts: that is recorded on the running domain, so the next plan waits for the restart
        instead of asking again, and False is returned."""
        import libvirt

        alias = element.find("alias").get("name") if element.find("alias") is not None else None
        address = device_address(element)
        failed: list[str] = []

        def refused(device: str) -> bool:
            if alias is None or device == alias:
                failed.append(device)
                return True
            return False

        def gone() -> bool:
            return not any(device_key(name, node) == key and device_address(node) == address
                           for node in device_nodes(parse_xml(dom.XMLDesc(0)), name))

        # Detach is asynchronous: DEVICE_REMOVED says the guest let go, DEVICE_REMOVAL_FAILED that it refused.
        with Watch(dom.connect(), dom).domain(
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, lambda removed: alias is None or removed == alias
        ).domain(
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, refused
        ) as watch:
            dom.detachDeviceFlags(etree.tostring(element, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            if wait_for(watch, lambda: bool(failed) or gone(), ctx.detach_timeout) and not failed:
                return True
        if gone():
            return True
        record_unplug(dom, name, key, address)
        return False

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
        persistent = bool(dom.isPersistent())  # a transient one (undefined outside vmform) is gone once stopped
        if dom.isActive():
            dom.destroy()  # the domain is going away with its disks: no need to wait for the guest
        if not persistent:
            return
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        )
        dom.undefineFlags(flags)


PROVIDER = DomainProvider()
