"""cloud-init NoCloud seeds: a read-only ISO (label ``cidata``) in a pool, attached to domains as a cdrom.

The seed is a volume named ``<name>.iso``, owned through the ledger like any volume; the ledger also keeps
what the seed holds (the user-data only as a digest), so a change is found without reading the ISO back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmform.schema.kind import Kind
from vmform.schema.types import Effect, FieldError, FieldSpec, Ref, Str, ValueType, _type_name
from vmform.seed import content_digest, dump_yaml

SEED_EFFECT = "a new seed with a new instance-id; cloud-init applies it at the guest's next boot"


@dataclass(frozen=True)
class CloudConfig(ValueType):
    """Text as it goes into the seed; a mapping is written as YAML (with a header line such as
    ``#cloud-config``); ``{file: PATH}`` reads a file relative to the manifest (the loader resolves it)."""

    header: str = ""

    def parse(self, raw: Any) -> Any:
        if isinstance(raw, Mapping) and set(raw) == {"file"}:
            return {"file": Str(pattern=r"[^\x00]+", hint="a file path").parse(raw["file"])}
        if isinstance(raw, Mapping):
            return (self.header + "\n" if self.header else "") + dump_yaml(dict(raw))
        if isinstance(raw, str):
            return raw
        raise FieldError(f"expected text, a mapping or {{file: PATH}}, got {_type_name(raw)}")

    def describe(self) -> str:
        return "text, mapping, or {file: PATH}"

    def display(self, value: Any) -> str:
        text = str(value)
        if "\n" not in text.rstrip("\n"):
            return f'"{text}"'
        first = text.split("\n", 1)[0]
        return f'"{first}…" ({text.count(chr(10)) + 1} lines, sha256:{hashlib.sha256(text.encode()).hexdigest()[:12]})'


@dataclass(frozen=True)
class MetaData(ValueType):
    def parse(self, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, Mapping):
            raise FieldError(f"expected a mapping such as {{local-hostname: web}}, got {_type_name(raw)}")
        for key, value in raw.items():
            if not isinstance(key, str):
                raise FieldError(f"meta-data keys are strings, got {_type_name(key)}", (str(key),), at_key=True)
            if isinstance(value, list | dict):
                continue
            if value is not None and not isinstance(value, str | int | float | bool):
                raise FieldError(f"unsupported value {_type_name(value)}", (key,))
        if "instance-id" in raw and not isinstance(raw["instance-id"], str):
            raise FieldError("instance-id must be a string", ("instance-id",))
        return dict(raw)

    def describe(self) -> str:
        return "mapping"


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("pool", Ref("pool"), "the pool holding the seed image (<name>.iso)", effect=Effect.REPLACE,
              required=True, xml="(the pool it lives in)"),
    FieldSpec("user_data", CloudConfig("#cloud-config"),
              "user-data: text, a mapping (written as #cloud-config YAML), or {file: PATH} relative to the manifest; "
              "sensitive: plans and output show only its digest and size", effect=Effect.REPLACE, required=True,
              effect_doc=SEED_EFFECT, xml="(seed file user-data; digest kept in vmform's ledger)", sensitive=True),
    FieldSpec("meta_data", MetaData(), "meta-data, e.g. {local-hostname: web}; instance-id defaults to a digest of "
              "the whole seed, so any change gives a new one", effect=Effect.REPLACE, default={},
              effect_doc=SEED_EFFECT, xml="(seed file meta-data)"),
    FieldSpec("network_config", CloudConfig(), "network-config (version 1 or 2): text, a mapping, or {file: PATH}",
              effect=Effect.REPLACE, effect_doc=SEED_EFFECT, xml="(seed file network-config)"),
)


def volume_name(seed_name: str) -> str:
    return f"{seed_name}.iso"


def bind(resource: Any, index: Any) -> dict[str, Any]:
    values = resource.values
    pool = index.get("pool", values["pool"])
    user_data = values["user_data"]
    network_config = values.get("network_config")
    meta_data = dict(values.get("meta_data") or {})
    if "instance-id" not in meta_data:
        meta_data = {"instance-id": "iid-" + content_digest(user_data, meta_data, network_config)[:16], **meta_data}
    desired: dict[str, Any] = {
        "pool": pool.libvirt_name if pool is not None else values["pool"],
        "user_data": user_data,
        "meta_data": meta_data,
        "network_config": network_config,  # None too: dropping it from the manifest is a change
    }
    return desired


KIND = Kind("cloudinit", "cloudinit", FIELDS, "a cloud-init NoCloud seed (an ISO labelled cidata, attached as a "
            "read-only cdrom)", bind=bind)
