"""Storage volume fields."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

from vmform.schema.kind import Kind
from vmform.schema.types import Effect, Enum, FieldSpec, Ref, Size, Str
from vmform.schema.xmlbind import Attr, SizeText

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("pool", Ref("pool"), "the pool holding the volume", effect=Effect.REPLACE, required=True,
              xml="(the pool it lives in)"),
    FieldSpec("format", Enum(("qcow2", "raw")), "image format", effect=Effect.REPLACE, xml="target/format/@type",
              default="qcow2", binding=Attr("target/format", "type")),
    FieldSpec("size", Size(minimum=1024**2), "virtual size (default: the backing image's or the source's size)",
              effect=Effect.LIVE, xml="capacity", effect_doc="growing is live (block resize when in use); shrinking is refused",
              binding=SizeText("capacity", unit="bytes", default_unit="bytes")),
    FieldSpec("backing", Ref("volume"), "volume this one is a qcow2 overlay of", effect=Effect.REPLACE,
              xml="backingStore/path"),
    FieldSpec("source", Str(), "local image file uploaded into the volume through libvirt (path relative to the manifest)",
              effect=Effect.REPLACE, xml="(content digest kept in vmform's ledger)"),
)


def check(values: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if values.get("backing") is not None and values.get("format") == "raw":
        yield ("backing",), "only qcow2 volumes can have a backing volume"
    if values.get("backing") is not None and values.get("source") is not None:
        yield ("source",), "a volume takes either 'source' or 'backing', not both"


def bind(resource: Any, index: Any) -> dict[str, Any]:
    values = resource.values
    pool = index.get("pool", values["pool"])
    desired: dict[str, Any] = {
        "pool": pool.libvirt_name if pool is not None else values["pool"],
        "format": values["format"],
    }
    if "size" in values:
        desired["size"] = values["size"]
    if values.get("backing") is not None:
        base = index.get("volume", values["backing"])
        if base is not None:
            base_pool = index.get("pool", base.values["pool"])
            desired["backing"] = {
                "pool": base_pool.libvirt_name if base_pool is not None else base.values["pool"],
                "volume": base.libvirt_name,
                "format": base.values["format"],
            }
    if values.get("source") is not None:
        desired["source"] = values["source"]  # made absolute by the loader
        desired["source_sha256"] = file_sha256(values["source"])
    return desired


_digests: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """Digest of a local image, remembered per (path, size, mtime) within one process."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as image:
            for block in iter(lambda: image.read(1024 * 1024), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


KIND = Kind("volume", "volumes", FIELDS, "a storage volume (disk image)", bind=bind, check=check)
