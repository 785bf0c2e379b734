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
        delete_volume(ctx, change.address, pool_name, change.live_name or change.name)


def delete_volume(ctx: ApplyContext, address: str, pool_name: str, name: str) -> None:
    """Delete a volume (already gone is fine), one storage job at a time per pool, then forget it."""
    import libvirt

    try:
        vol = _pool(ctx, pool_name).storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise
    else:
        with ctx.pool_locks[pool_name]:
            vol.delete(0)
    ctx.ledger.forget("volume", address, pool=pool_name, name=name)
    ctx.save_ledger()


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
