"""Storage volume fields."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from vmform.images import file_digest, is_url
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
    FieldSpec("source", Str(), "image uploaded into the volume through libvirt: a local file (relative to the "
              "manifest) or an http(s) URL; .xz and .gz images are decompressed (downloads are cached)",
              effect=Effect.REPLACE, xml="(content digest kept in vmform's ledger)"),
    FieldSpec("preallocation", Enum(("off", "metadata", "full")), "space reserved when the volume is created: off "
              "(thin), metadata (qcow2 metadata written up front), full (every byte allocated)", effect=Effect.REPLACE,
              default="off", compare=False, xml="allocation"),
    FieldSpec("sha256", Str(pattern=r"[0-9A-Fa-f]{64}", hint="64 hexadecimal digits"),
              "expected sha256 of the source as served (or as the file is); a mismatch fails before anything "
              "reaches the host", compare=False),
)


def check(values: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if values.get("backing") is not None and values.get("format") == "raw":
        yield ("backing",), "only qcow2 volumes can have a backing volume"
    if values.get("backing") is not None and values.get("source") is not None:
        yield ("source",), "a volume takes either 'source' or 'backing', not both"
    if values.get("preallocation") == "metadata" and values.get("format") == "raw":
        yield ("preallocation",), "metadata preallocation is for qcow2 volumes (a raw volume has no metadata)"
    if values.get("preallocation", "off") != "off" and (values.get("source") or values.get("backing")):
        yield ("preallocation",), "preallocation applies to blank volumes (not to a source image or an overlay)"
    if values.get("sha256") is not None and values.get("source") is None:
        yield ("sha256",), "sha256 checks a source image: it needs 'source'"


def bind(resource: Any, index: Any) -> dict[str, Any]:
    values = resource.values
    pool = index.get("pool", values["pool"])
    desired: dict[str, Any] = {
        "pool": pool.libvirt_name if pool is not None else values["pool"],
        "format": values["format"],
    }
    if "size" in values:
        desired["size"] = values["size"]
    if values.get("preallocation", "off") != "off":
        desired["preallocation"] = values["preallocation"]
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
        desired["source"] = values["source"]  # a local path is made absolute by the loader
        if values.get("sha256"):
            desired["source_sha256"] = values["sha256"].lower()
        elif is_url(values["source"]):
            desired["source_sha256"] = f"url:{values['source']}"  # no download to plan: the URL is the identity
        else:
            desired["source_sha256"] = file_digest(values["source"])
    return desired


KIND = Kind("volume", "volumes", FIELDS, "a storage volume (disk image)", bind=bind, check=check)
