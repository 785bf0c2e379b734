"""One provider per resource kind: turns a planned Change into libvirt calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmform.providers.base import Provider


def provider_for(kind: str) -> Provider:
    from vmform.providers import cloudinit, domain, network, pool, volume  # noqa: F401 - imported for their PROVIDER

    return {"cloudinit": cloudinit.PROVIDER, "domain": domain.PROVIDER, "network": network.PROVIDER, "pool": pool.PROVIDER, "volume": volume.PROVIDER}[kind]
