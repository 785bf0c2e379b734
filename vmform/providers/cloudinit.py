"""cloud-init seeds: the ISO is built in memory and uploaded into its pool through libvirt's stream API, so a
remote host needs no shared filesystem. A changed seed is a new volume (replace); the ledger records what
it holds, the user-data only as a digest."""

from __future__ import annotations

import io
from typing import Any

from vmform.plan import Change
from vmform.providers.base import ApplyContext, Provider
from vmform.providers.volume import delete_volume, undo_refused_record, upload
from vmform.render.validate import validate
from vmform.render.xml import render_seed_volume, to_text
from vmform.schema.cloudinit import volume_name
from vmform.sensitive import fingerprint


def ledger_entry(pool: str, volume: str, after: dict[str, Any]) -> dict[str, Any]:
    return {
        "pool": pool,
        "name": volume,
        "seed": {
            "user_data": fingerprint(after["user_data"]),
            "meta_data": after["meta_data"],
            "network_config": after.get("network_config"),
        },
    }


class CloudInitProvider(Provider):
    kind = "cloudinit"

    def create(self, ctx: ApplyContext, change: Change) -> None:
        import libvirt

        after = change.after
        assert after is not None
        root, image = render_seed_volume(change.name, after)
        validate("cloudinit", root, change.address)
        volume = volume_name(change.name)
        pool = ctx.connections.get().storagePoolLookupByName(after["pool"])
        # Recorded before it exists, so an interrupted apply never leaves an unowned seed behind.
        # Marked incomplete until the ISO is all uploaded (an interrupted upload is replaced by the next apply).
        recorded = ctx.ledger.record("volume", change.address,
                                     {**ledger_entry(after["pool"], volume, after), "incomplete": True})
        ctx.save_ledger()
        with ctx.pool_locks[after["pool"]]:
            try:
                vol = pool.createXML(to_text(root), 0)
            except libvirt.libvirtError as exc:
                if not ctx.refused(exc):
                    raise  # the volume may exist now: it stays recorded as owned
                undo_refused_record(ctx, recorded)
                raise
            try:
                upload(ctx.connections.get(), vol, io.BytesIO(image), len(image))
                ctx.ledger.record("volume", change.address, ledger_entry(after["pool"], volume, after))
                ctx.save_ledger()
            except Exception as exc:
                if not ctx.refused(exc):
                    raise  # the half-made volume stays owned; the next plan shows it
                vol.delete(0)
                ctx.ledger.forget("volume", change.address, pool=after["pool"], name=volume)
                ctx.save_ledger()
                raise

    def update(self, ctx: ApplyContext, change: Change) -> None:
        raise RuntimeError(f"{change.address}: a seed is never changed in place")  # every field is replace-class

    def delete(self, ctx: ApplyContext, change: Change) -> None:
        pool_name = str(change.identity.get("pool") or (change.before or {}).get("pool"))
        volume = str(change.identity.get("volume") or volume_name(change.live_name or change.name))
        delete_volume(ctx, change.address, pool_name, volume,
                      held_by=[tuple(h) for h in change.identity.get("held_by") or []],
                      replacing=change.action.is_replace())


PROVIDER = CloudInitProvider()
