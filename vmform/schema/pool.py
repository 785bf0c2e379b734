"""Storage pool fields."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from vmform.schema.extra_xml import ExtraXml, ExtraXmlBinding
from vmform.schema.kind import Kind
from vmform.schema.types import ABSOLUTE_DIR, Bool, Effect, Enum, FieldSpec, Str
from vmform.schema.xmlbind import Attr, Text

POOL_TYPES = ("dir", "fs", "netfs", "logical", "disk", "iscsi", "iscsi-direct", "scsi", "mpath", "rbd", "gluster",
              "zfs", "vstorage")
BUILT_TYPES = ("dir", "netfs")  # building the others formats devices: vmform never does it

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("type", Enum(POOL_TYPES), "pool type; vmform builds only dir and netfs pools (the others must exist: "
              "their build would format disks)", effect=Effect.REPLACE, xml="pool/@type", default="dir",
              binding=Attr(".", "type")),
    FieldSpec("path", Str(pattern=ABSOLUTE_DIR, hint="an absolute path"), "directory holding the volumes",
              effect=Effect.REPLACE, xml="target/path", required=True, binding=Text("target/path", os.path.normpath)),
    FieldSpec("autostart", Bool(), "start with the host", effect=Effect.LIVE, default=True),
    FieldSpec("active", Bool(), "started (the default), or only defined: false keeps a pool vmform creates, or "
              "imports inactive, stopped (its volumes cannot be used then); a managed pool stopped outside vmform is "
              "started again only while this is true", effect=Effect.LIVE, default=True, compare=False),
    FieldSpec("xml", ExtraXml("pool"), "anything else of libvirt's storage pool XML (source, target permissions, …), "
              "element by element; merged after the curated fields", xml="(any)", binding=ExtraXmlBinding("pool")),
)


# libvirt's schema has no target directory for these: vmform, which manages a pool by its path, only uses them.
NO_TARGET = ("rbd", "gluster", "iscsi-direct")
# Every type but these is made from a source (a device, a host, a volume group, …) that libvirt requires.
NO_SOURCE = ("dir", "mpath")


def check(values: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    kind = values.get("type", "dir")
    if kind in NO_TARGET:
        yield ("type",), (f"a {kind} pool has no target directory in libvirt, and vmform manages a pool by its path: "
                          "declare it with existing: true to use it")
    elif kind not in NO_SOURCE and not (values.get("xml") or {}).get("source"):
        yield ("type",), (f"a {kind} pool needs its source (the device, host or name it is made from): write it under "
                          "xml: source")
    path = values.get("path")
    if path is not None:
        from vmform.schema.optins import system_directory

        # File pools only: a device pool's target (mpath: /dev/mapper) is outside the pool roots, so it needs
        # allow: [host_paths] anyway.
        file_pool = kind in ("dir", "fs", "netfs")
        why = system_directory(os.path.normpath(path)) if path.startswith("/") and file_pool else ""
        if os.path.normpath(path) == "/" or ".." in path.split("/"):
            yield ("path",), f"'{path}' is not an acceptable pool directory"
        elif why and not values.get("existing"):
            yield ("path",), f"'{path}' {why}: never a pool directory vmform makes"
        values["path"] = os.path.normpath(path)


KIND = Kind("pool", "pools", FIELDS, "a storage pool", check=check)
