"""cloud-init NoCloud seeds: the files of a seed and the ISO 9660 image (volume label ``cidata``) that carries
them, built in memory with pycdlib (Joliet and Rock Ridge names, so every guest sees ``user-data``,
``meta-data`` and ``network-config`` under their real names)."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import yaml

LABEL = "cidata"
# ISO 9660 level-1 names (8.3, upper case) under the Rock Ridge / Joliet names cloud-init looks for.
_ISO_NAMES = {"user-data": "/USERDATA.;1", "meta-data": "/METADATA.;1", "network-config": "/NETWORKC.;1"}


def dump_yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False, allow_unicode=True)


def content_digest(user_data: str, meta_data: dict[str, Any], network_config: str | None) -> str:
    """What the default instance-id is made of: a change to any part of the seed gives a new instance-id."""
    rest = {key: value for key, value in meta_data.items() if key != "instance-id"}
    digest = hashlib.sha256()
    for part in (user_data, json.dumps(rest, sort_keys=True, default=str), network_config or ""):
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def seed_files(desired: dict[str, Any]) -> dict[str, bytes]:
    """The seed's files from a cloudinit resource's desired values."""
    files = {
        "user-data": desired["user_data"].encode(),
        "meta-data": dump_yaml(desired["meta_data"]).encode(),
    }
    if desired.get("network_config") is not None:
        files["network-config"] = desired["network_config"].encode()
    return files


def build_iso(files: dict[str, bytes]) -> bytes:
    """An ISO 9660 image labelled ``cidata`` holding the given files at its root."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=LABEL, joliet=3, rock_ridge="1.09")
    try:
        for name, data in files.items():
            iso.add_fp(io.BytesIO(data), len(data), _ISO_NAMES[name], rr_name=name, joliet_path=f"/{name}")
        out = io.BytesIO()
        iso.write_fp(out)
    finally:
        iso.close()
    return out.getvalue()


def read_iso(image: bytes) -> tuple[str, dict[str, bytes]]:
    """(volume label, files by Rock Ridge name) of a seed image: for tests and checks."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        files: dict[str, bytes] = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot() or child.rock_ridge is None:
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue()
    finally:
        iso.close()
    return label, files
