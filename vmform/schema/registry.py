"""All resource kinds, in the order their sections are documented and created."""

from __future__ import annotations

from vmform.schema import cloudinit, domain, network, pool, volume
from vmform.schema.kind import Kind

KINDS: dict[str, Kind] = {kind.name: kind for kind in (network.KIND, pool.KIND, volume.KIND, cloudinit.KIND, domain.KIND)}
SECTIONS: dict[str, Kind] = {kind.section: kind for kind in KINDS.values()}
