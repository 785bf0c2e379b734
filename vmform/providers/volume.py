"""Volumes: created through the storage API (qcow2 overlays state their backing format), images uploaded
through the stream API so a remote host needs no shared filesystem, growth by resize."""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from vmform.images import inspect_image, local_image
from vmform.ownership import Recorded
from vmform.plan import Change
from vmform.providers.base import ApplyContext, Provider
from vmform.render.validate import validate
from vmform.render.xml import render_volume, to_text

UPLOAD_CHUNK = 4 * 1024 * 1024


def upload(conn: Any, vol: Any, reader: BinaryIO, size: int) -> None:
    """Send ``size`` bytes from ``reader`` into a volume through libvirt's stream API (works on remote hosts)."""
    stream = conn.newStream(0)
    vol.upload(stream, 0, size, 0)
    try:
        remaining = size
        while remaining > 0:
            chunk = reader.read(min(UPLOAD_CHUNK, remaining))
            if not chunk:
                break
            sent = 0
            while sent < len(chunk):
                sent += stream.send(chunk[sent:])
            remaining -= len(chunk)
        stream.finish()
    except Exception:
        stream.abort()
        raise


def _pool(ctx: ApplyContext, name: str) -> Any:
    return ctx.connections.get().storagePoolLookupByName(name)


class VolumeProvider(Provider):
    kind = "volume"

    def create(self, ctx: ApplyContext, change: Change) -> None:
        import libvirt

        after = change.after
        assert after is not None
        pool = _pool(ctx, after["pool"])
        backing_path = None
        capacity = after.get("size")
        if after.get("backing"):
            base = _pool(ctx, after["backing"]["pool"]).storageVolLookupByName(after["backing"]["volume"])
            backing_path = base.path()
            base_capacity = base.info()[1]
            capacity = max(capacity or 0, base_capacity)
        image = None
        local = None
        if after.get("source"):
            # Downloaded, checked and decompressed before anything is created on the host.
            expected = after.get("source_sha256")
            local = str(local_image(after["source"], None if str(expected).startswith("url:") else expected))
            image = inspect_image(local, after["format"])
            capacity = image.virtual_size
        if capacity is None:
            raise RuntimeError(f"{change.address}: needs a size (or a backing volume or source image)")
        root = render_volume(change.name, after, capacity, backing_path)
        validate("volume", root, change.address)
        entry: dict[str, Any] = {"pool": after["pool"], "name": change.name}
        if after.get("source_sha256"):
            entry["source_sha256"] = after["source_sha256"]
        # Recorded before it exists, so an interrupted apply never leaves an unowned volume behind; marked
        # incomplete until its image is all uploaded, so an interrupted upload is replaced by the next apply.
        recorded = ctx.ledger.record("volume", change.address,
                                     {**entry, "incomplete": True} if image is not None else entry)
        ctx.save_ledger()
        with ctx.pool_locks[after["pool"]]:
            try:
                flags = libvirt.VIR_STORAGE_VOL_CREATE_PREALLOC_METADATA if after.get("preallocation") == "metadata" else 0
                vol = pool.createXML(to_text(root), flags)
            except libvirt.libvirtError as exc:
                if not ctx.refused(exc):
                    raise  # the volume may exist now: it stays recorded as owned
                undo_refused_record(ctx, recorded)
                raise
            try:
                if image is not None:
                    self._upload(ctx, vol, str(local))
                    if after.get("size") and after["size"] > image.virtual_size:
                        vol.resize(after["size"], 0)
                    ctx.ledger.record("volume", change.address, entry)  # complete now
                    ctx.save_ledger()
            except Exception as exc:
                if not ctx.refused(exc):
                    raise  # the half-made volume stays owned; the next plan shows it
                vol.delete(0)
                ctx.ledger.forget("volume", change.address, pool=after["pool"], name=change.name)
                ctx.save_ledger()
                raise

    def _upload(self, ctx: ApplyContext, vol: Any, path: str) -> None:
        with open(path, "rb") as image:
            upload(ctx.connections.get(), vol, image, os.path.getsize(path))

    def update(self, ctx: ApplyContext, change: Change) -> None:
        after = change.after
        assert after is not None
        for field_change in change.fields:
            if field_change.path == "size":
                vol = _pool(ctx, after["pool"]).storageVolLookupByName(change.name)
                user = _running_user(ctx, vol.path(), after["pool"], change.name)
                if user is not None:
                    # QEMU holds the image open (and locked): grow it through the running domain, so the
                    # guest sees the new size at once.
                    import libvirt

                    domain, target = user
                    domain.blockResize(target, after["size"], libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                    continue
                with ctx.pool_locks[after["pool"]]:
                    vol.resize(after["size"], 0)

    def delete(self, ctx: ApplyContext, change: Change) -> None:
        pool_name = str(change.identity.get("pool") or (change.before or {}).get("pool"))
        # A base replaced under its overlays: they go first (each is a -/+ of this plan, made again on the new
        # file by its own change), so the base is never deleted while a volume backs onto it.
        for overlay in change.identity.get("overlays") or []:
            delete_volume(ctx, overlay["address"], overlay["pool"], overlay["name"], replacing=True)
        delete_volume(ctx, change.address, pool_name, change.live_name or change.name,
                      held_by=[tuple(h) for h in change.identity.get("held_by") or []],
                      replacing=change.action.is_replace())


def delete_volume(ctx: ApplyContext, address: str, pool_name: str, name: str,
                  held_by: list[tuple[str, ...]] | None = None, replacing: bool = False) -> None:
    """Delete a volume (already gone is fine), one storage job at a time per pool, then forget it. Right
    before, the host is checked again: while any domain or volume still uses the file (``held_by``: the users
    the plan saw, whose planned changes should have ended their use), the volume is kept, stays owned, and
    VolumeInUse says why. A replace lets the project's own domains keep using it (the plan said so)."""
    import libvirt

    try:
        vol = _pool(ctx, pool_name).storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise
    else:
        _check_unused(ctx, address, vol.path(), pool_name, name, held_by or [], replacing)
        with ctx.pool_locks[pool_name]:
            vol.delete(0)
    ctx.ledger.forget("volume", address, pool=pool_name, name=name)
    ctx.save_ledger()


def _check_unused(ctx: ApplyContext, address: str, path: str, pool: str, name: str,
                  held_by: list[tuple[str, ...]], replacing: bool) -> None:
    """Raise VolumeInUse when a domain's disk or another volume's backing file still is this volume. Checks
    the users the plan saw and those in the apply's own reading of the host (one bulk read per apply), each
    read again now, so a use that ended since is no reason to wait."""
    from vmform.diff import describe_use
    from vmform.errors import VolumeInUse
    from vmform.live import read_holder_uses, read_uses

    conn = ctx.connections.get()
    with ctx.volume_uses_lock:
        if ctx.volume_uses is None:
            ctx.volume_uses = read_uses(conn)
        seen = [use.holder_key() for use in ctx.volume_uses.of(path, pool, name)]
    holders = list(dict.fromkeys([*(tuple(h) for h in held_by), *seen]))
    for holder in holders:
        if holder == ("volume", f"{pool}/{name}"):
            continue
        for use in read_holder_uses(conn, (holder[0], holder[1]), path, pool, name):
            mine = use.owner[1] if use.owner is not None and use.owner[0] == ctx.project else None
            if replacing and use.holder_kind == "domain" and mine is not None:
                continue  # the project's own domain: the plan showed what its guest keeps until it restarts
            holder_address = mine if use.holder_kind == "domain" else ctx.ledger.volume_address(use.pool, use.holder)
            what, when = describe_use(use, holder_address)
            raise VolumeInUse(f"{what}; {when} (a later apply deletes it)")


def undo_refused_record(ctx: ApplyContext, recorded: Recorded) -> None:
    """After libvirt refused a create: take back only the entry this create wrote. What the address held
    before comes back as it was, so a create that failed because the object already exists ("already
    exists": another apply made it, and recorded it) never removes that apply's entry."""
    ctx.ledger.undo(recorded)
    ctx.save_ledger()


def _running_user(ctx: ApplyContext, path: str, pool: str, name: str) -> tuple[Any, str] | None:
    """A running domain with this image as a disk (by path, or as pool/volume), and the disk's target."""
    import libvirt

    from vmform.live import parse_xml

    for domain in ctx.connections.get().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        for disk in parse_xml(domain.XMLDesc(0)).findall("devices/disk"):
            source, target = disk.find("source"), disk.find("target")
            if source is None or target is None:
                continue
            if source.get("file") == path or (source.get("pool"), source.get("volume")) == (pool, name):
                return domain, str(target.get("dev"))
    return None


PROVIDER = VolumeProvider()
