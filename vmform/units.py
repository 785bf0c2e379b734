"""Sizes: parsing what users write (``2GiB``, ``512MiB``) and printing bytes back the same way."""

from __future__ import annotations

import re
from fractions import Fraction

_BINARY = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5}
_DECIMAL = {"kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "pb": 1000**5}
# libvirt's own unit spellings, as found in XML unit='...' attributes.
_LIBVIRT_UNITS = {
    "b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
    "p": 1024**5, "pib": 1024**5, "pb": 1000**5, "e": 1024**6, "eib": 1024**6, "eb": 1000**6,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


class SizeSyntaxError(ValueError):
    pass


def parse_size(text: str | int) -> int:
    """Bytes from a manifest size. Binary units (KiB, MiB, GiB, TiB) only: ``2GB`` is ambiguous and refused."""
    if isinstance(text, bool):
        raise SizeSyntaxError("expected a size such as 512MiB or 20GiB, got a boolean")
    if isinstance(text, int):
        if text < 0:
            raise SizeSyntaxError("a size cannot be negative")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise SizeSyntaxError(f"'{text}' is not a size; write it like 512MiB or 20GiB")
    number, unit = match.group(1), match.group(2).lower()
    if unit in _DECIMAL:
        binary = match.group(2)[0].upper() + "iB"
        raise SizeSyntaxError(
            f"'{text}' uses a decimal unit; vmform sizes are binary: write {number}{binary} (or bytes)"
        )
    if unit not in _BINARY:
        raise SizeSyntaxError(f"'{text}' has an unknown unit '{match.group(2)}'; use B, KiB, MiB, GiB, TiB or PiB")
    value = Fraction(number) * _BINARY[unit]  # exact: floats round sizes above 2**53
    if value.denominator != 1:
        raise SizeSyntaxError(f"'{text}' is not a whole number of bytes")
    return int(value)


def libvirt_to_bytes(value: str, unit: str | None, default_unit: str = "KiB") -> int:
    """Bytes from a libvirt XML number and its unit attribute."""
    factor = _LIBVIRT_UNITS.get((unit or default_unit).lower())
    if factor is None:
        raise ValueError(f"unknown libvirt unit {unit!r}")
    return int(value) * factor


def format_size(size: int) -> str:
    """The shortest exact binary spelling: 1073741824 -> '1GiB', 1536 -> '1536B'... 1536KiB."""
    for unit, factor in (("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
