"""Validation of rendered XML against libvirt's own RelaxNG schemas (the ones virt-xml-validate uses)."""

from __future__ import annotations

import os
import threading

from lxml import etree

from vmform.errors import VmformError
from vmform.schema.xmlbind import Element

SCHEMA_DIRS = ("/usr/share/libvirt/schemas", "/usr/local/share/libvirt/schemas")
_SCHEMA_FILES = {"domain": "domain.rng", "network": "network.rng", "pool": "storagepool.rng", "volume": "storagevol.rng",
                 "cloudinit": "storagevol.rng"}  # a seed is a volume
_cache: dict[str, etree.RelaxNG | None] = {}
_lock = threading.Lock()


class InvalidXMLError(VmformError):
    pass


def _schema(kind: str) -> etree.RelaxNG | None:
    with _lock:
        if kind not in _cache:
            _cache[kind] = None
            for directory in SCHEMA_DIRS:
                path = os.path.join(directory, _SCHEMA_FILES[kind])
                if os.path.exists(path):
                    _cache[kind] = etree.RelaxNG(etree.parse(path))
                    break
        return _cache[kind]


def schemas_available() -> bool:
    return _schema("domain") is not None


def validate(kind: str, root: Element, address: str) -> None:
    """Raise InvalidXMLError naming the resource when libvirt's schema refuses the document."""
    schema = _schema(kind)
    if schema is None:
        return  # no schemas on this machine (remote-only client); libvirt still validates on define
    if not schema.validate(root):
        error = schema.error_log.last_error
        detail = f"line {error.line}: {error.message}" if error is not None else "invalid document"
        raise InvalidXMLError(f"{address}: rendered libvirt XML does not validate against {_SCHEMA_FILES[kind]} ({detail})")
