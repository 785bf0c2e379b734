"""Sensitive values (cloud-init user-data): compared and shown by digest and size, never by content.

A sensitive field's desired value is its text; what the host side keeps (vmform's ledger) and what every
plan, JSON document and printed line carries is its fingerprint, ``{"sha256": …, "size": …}``. Only
``vmform show --sensitive`` prints the text itself.
"""

from __future__ import annotations

import hashlib
from typing import Any


def fingerprint(value: Any) -> dict[str, Any] | None:
    """The digest and size of a sensitive value (text or bytes); a fingerprint stays itself."""
    if value is None:
        return None
    if is_fingerprint(value):
        return dict(value)
    data = value if isinstance(value, bytes) else str(value).encode()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def is_fingerprint(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"sha256", "size"}


def masked(value: Any) -> str:
    """How a sensitive value is shown: ``(sensitive, sha256:<12 hex>, N bytes)``."""
    print_ = fingerprint(value)
    if print_ is None:
        return "(unset)"
    return f"(sensitive, sha256:{print_['sha256'][:12]}, {print_['size']} bytes)"
