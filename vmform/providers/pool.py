"""Storage pools: define with a vmform-chosen UUID (recorded in the ledger first), build, start, autostart."""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from vmform.diff import LAST_APPLIED
from vmform.lastapplied import AppliedRecord, record_for, unset_removed
from vmform.live import parse_xml
from vmform.plan import Change
from vmform.providers.base import ApplyContext, Provider
from vmform.render.validate import validate
from vmform.render.xml import render_pool, to_text, write_fields
from vmform.schema.pool import BUILT_TYPES


def _lookup(ctx: ApplyContext, change: Change) -> Any:
    conn = ctx.connections.get()
    uuid = change.identity.get("uuid")
    return conn.storagePoolLookupByUUIDString(uuid) if uuid else conn.storagePoolLookupByName(change.live_name or change.name)


class PoolProvider(Provider):
    kind = "pool"

    def create(self, ctx: ApplyContext, change: Change) -> None:
        import libvirt

        assert change.after is not None
        pool_uuid = str(uuidlib.uuid4())
        root = render_pool(change.name, change.after, pool_uuid)
        validate("pool", root, change.address)
        # Recorded before it exists: a crash right after define still leaves it owned, never orphaned.
        recorded = ctx.ledger.record("pool", change.address, {"name": change.name, "uuid": pool_uuid,
                                                              "applied": record_for("pool", change.after).to_entry()})
        ctx.save_ledger()
        conn = ctx.connections.get()
        try:
            pool = conn.storagePoolDefineXML(to_text(root))
        except libvirt.libvirtError as exc:
            if ctx.refused(exc):  # after a dropped connection the pool may exist: it stays recorded
                # Only this create's entry is taken back: a pool that "already exists" keeps its own entry.
                ctx.ledger.undo(recorded)
                ctx.save_ledger()
            raise
        try:
            if change.after.get("type", "dir") in BUILT_TYPES:
                pool.build(0)
            if change.after.get("active", True) is not False:
                pool.create(0)
        except libvirt.libvirtError as exc:
            if not ctx.refused(exc):
                raise
            pool.undefine()
            ctx.ledger.undo(recorded)  # gone again: what the address held before comes back
            ctx.save_ledger()
            raise
        pool.setAutostart(1 if change.after.get("autostart", True) else 0)

    def update(self, ctx: ApplyContext, change: Change) -> None:
        import libvirt

        assert change.after is not None
        pool = _lookup(ctx, change)
        xml_fields = sorted({f.path.split("[", 1)[0].split(".", 1)[0] for f in change.fields} - {"autostart", "active", LAST_APPLIED})
        entry = ctx.ledger.pools.get(change.address)
        recorded = AppliedRecord.from_entry(entry.get("applied")) if entry is not None else None
        if xml_fields:
            # Redefined in place (same UUID): an active pool picks the new definition up when it restarts.
            root = parse_xml(pool.XMLDesc(libvirt.VIR_STORAGE_XML_INACTIVE))
            removed = unset_removed("pool", root, change, ctx.project, recorded or AppliedRecord())
            write_fields("pool", root, {**change.after, **removed}, xml_fields)
            validate("pool", root, change.address)
            ctx.connections.get().storagePoolDefineXML(to_text(root))
        applied = record_for("pool", change.after).to_entry()
        if entry is not None and entry.get("applied") != applied:
            # A pool's last-applied record lives in its ledger entry: written with every update of the pool.
            ctx.ledger.record("pool", change.address, {**entry, "applied": applied})
            ctx.save_ledger()
        if any(f.path == "autostart" for f in change.fields):
            pool.setAutostart(1 if change.after["autostart"] else 0)
        if not pool.isActive():
            pool.create(0)

    def delete(self, ctx: ApplyContext, change: Change) -> None:
        import libvirt

        pool = _lookup(ctx, change)
        with ctx.pool_locks[change.live_name or change.name]:
            if pool.isActive():
                pool.refresh(0)
                remaining = pool.listVolumes()
                if remaining:
                    raise RuntimeError(
                        f"pool '{pool.name()}' still holds volumes vmform does not own ({', '.join(sorted(remaining)[:5])}); "
                        "it is left in place"
                    )
                pool.destroy()
            try:
                pool.delete(0)  # removes the (now empty) directory
            except libvirt.libvirtError:
                pass
            pool.undefine()
        ctx.ledger.forget("pool", change.address, uuid=change.identity.get("uuid"))
        ctx.save_ledger()


PROVIDER = PoolProvider()
