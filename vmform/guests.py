"""What the declared domains report once they run: state and IP addresses (from the libvirt network's DHCP
leases, and from the guest agent when one answers), waiting for addresses, and serial console logs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from vmform.connection import libvirt_message
from vmform.errors import HostError, VmformError
from vmform.events import Watch, wait_for
from vmform.live import parse_xml
from vmform.ownership import read_owner

if TYPE_CHECKING:
    import libvirt

    from vmform.model import Manifests


@dataclass(frozen=True)
class Address:
    interface: str  # the guest's name for it (agent) or the host's tap (leases)
    mac: str
    ip: str
    prefix: int
    source: str  # "lease" or "agent"


@dataclass
class DomainOutput:
    address: str  # domain.web
    name: str  # libvirt name
    state: str  # running | stopped | paused | absent (declared, not on the host) | …
    addresses: list[Address] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "addresses": [asdict(a) for a in self.addresses]}


_STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "stopped", 6: "crashed",
           7: "suspended"}


def _addresses(dom: libvirt.virDomain) -> list[Address]:
    import libvirt

    found: list[Address] = []
    sources = (("lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
               ("agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT))
    for source_name, source in sources:
        try:
            interfaces = dom.interfaceAddresses(source, 0) or {}
        except libvirt.libvirtError:
            continue  # no agent (the usual case), or no network with leases
        for name, info in sorted(interfaces.items()):
            if source_name == "agent" and name == "lo":
                continue
            for entry in info.get("addrs") or []:
                found.append(Address(name, info.get("hwaddr") or "", entry["addr"], int(entry["prefix"]), source_name))
    return found


def _owned_domains(conn: libvirt.virConnect, project: str) -> dict[str, libvirt.virDomain]:
    import libvirt

    owned = {}
    for dom in conn.listAllDomains():
        try:
            owner = read_owner(parse_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
        except libvirt.libvirtError:
            continue  # vanished while we listed
        if owner is not None and owner[0] == project:
            owned[owner[1]] = dom
    return owned


def domain_outputs(conn: libvirt.virConnect, manifests: Manifests) -> list[DomainOutput]:
    """Every declared domain, in manifest order, with its state and addresses."""
    import libvirt

    try:
        owned = _owned_domains(conn, manifests.project)
        result = []
        for resource in manifests.of_kind("domain"):
            dom = owned.get(resource.address)
            if dom is None:
                result.append(DomainOutput(resource.address, resource.libvirt_name, "absent"))
                continue
            state = _STATES.get(dom.state()[0], "unknown")
            addresses = _addresses(dom) if dom.isActive() else []
            result.append(DomainOutput(resource.address, dom.name(), state, addresses))
        return result
    except libvirt.libvirtError as exc:
        raise HostError(f"cannot read the domains' state: {libvirt_message(exc)}") from None


def awaited_domains(manifests: Manifests) -> list[str]:
    """Domains that should get an address: declared running, with an interface on a network that hands out
    DHCP leases."""
    wanted = []
    for resource in manifests.of_kind("domain"):
        if resource.desired.get("state", "running") != "running":
            continue
        networks = [manifests.resolve("network", nic["network"], resource.module)
                    for nic in resource.values.get("interfaces") or [] if isinstance(nic, dict) and nic.get("network")]
        if any(n is not None and (n.values.get("dhcp") or n.values.get("dhcp_hosts")) for n in networks):
            wanted.append(resource.address)
    return wanted


class WaitTimeout(VmformError):
    """Domains did not report an address in time."""


# libvirt has no DHCP lease event (9.0 has network lifecycle events only): leases that no event announces are
# read again at this interval; everything else (a domain starting, its guest agent connecting, a network
# starting) wakes the wait through libvirt's event API at once.
LEASE_RECHECK = 1.0


def wait_for_addresses(conn: libvirt.virConnect, manifests: Manifests, timeout: float,
                       interval: float = LEASE_RECHECK,
                       progress: Callable[[DomainOutput], None] | None = None) -> list[DomainOutput]:
    """Wait (bounded) until every awaited domain reports an IP address; returns all domains' outputs."""
    import libvirt

    wanted = set(awaited_domains(manifests))
    reported: set[str] = set()
    outputs: list[DomainOutput] = []

    def done() -> bool:
        nonlocal outputs
        outputs = domain_outputs(conn, manifests)
        for output in outputs:
            if output.address in wanted and output.addresses and output.address not in reported:
                reported.add(output.address)
                if progress is not None:
                    progress(output)
        return not wanted - reported

    with Watch(conn).domain(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE).domain(
            libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE).network(libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE) as watch:
        if wait_for(watch, done, timeout, recheck=interval):
            return outputs
    missing = sorted(wanted - reported)
    raise WaitTimeout(f"no IP address within {timeout:.0f}s for {', '.join(missing)} (DHCP leases and guest "
                      "agent checked)")


def awaited_agents(manifests: Manifests) -> list[str]:
    """Domains whose guest agent apply --wait-agent waits for: declared running, with the agent channel."""
    return [r.address for r in manifests.of_kind("domain")
            if r.desired.get("state", "running") == "running" and r.desired.get("guest_agent")]


def agent_connected(dom: libvirt.virDomain) -> bool:
    """Whether the guest agent is connected (libvirt's live XML: the channel target's state)."""
    from vmform.schema.domain import GUEST_AGENT_CHANNEL

    if not dom.isActive():
        return False
    target = parse_xml(dom.XMLDesc(0)).find(f"devices/channel/target[@name='{GUEST_AGENT_CHANNEL}']")
    return target is not None and target.get("state") == "connected"


def wait_for_agents(conn: libvirt.virConnect, manifests: Manifests, timeout: float,
                    progress: Callable[[str], None] | None = None) -> list[str]:
    """Wait (bounded) until the guest agent of every awaited domain has connected: libvirt's AGENT_LIFECYCLE
    event (state connected) wakes the wait; each domain is checked once after the callbacks are registered, so
    an agent that connected before is found too. Returns the addresses waited for."""
    import libvirt

    wanted = awaited_agents(manifests)
    connected: set[str] = set()

    def done() -> bool:
        try:
            owned = _owned_domains(conn, manifests.project)
            for address in wanted:
                dom = owned.get(address)
                if address not in connected and dom is not None and agent_connected(dom):
                    connected.add(address)
                    if progress is not None:
                        progress(address)
        except libvirt.libvirtError as exc:
            raise HostError(f"cannot read the domains' guest agents: {libvirt_message(exc)}") from None
        return connected >= set(wanted)

    def agent_up(state: int, _reason: int) -> bool:
        return state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED

    with Watch(conn).domain(libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, agent_up) as watch:
        if wait_for(watch, done, timeout):
            return wanted
    missing = sorted(set(wanted) - connected)
    raise WaitTimeout(f"no guest agent connected within {timeout:.0f}s for {', '.join(missing)} (is qemu-guest-agent "
                      "installed and running in the guest?)")


def console_log(conn: libvirt.virConnect, manifests: Manifests, address: str) -> Path:
    """The host file a domain's serial console is logged to; only readable when the host is this machine."""
    import libvirt

    resource = manifests.resources.get(address)
    if resource is None or resource.kind.name != "domain":
        from vmform.schema.types import did_you_mean

        domains = [r.address for r in manifests.of_kind("domain")]
        raise VmformError(f"no domain '{address}'{did_you_mean(address, domains)}")
    dom = _owned_domains(conn, manifests.project).get(address)
    if dom is None:
        raise VmformError(f"{address} does not exist on the host (apply first)")
    root = parse_xml(dom.XMLDesc(0 if dom.isActive() else libvirt.VIR_DOMAIN_XML_INACTIVE))
    log = root.find("devices/serial/log")
    if log is None or not log.get("file"):
        raise VmformError(f"{address} has no console log; set console_log: true on it")
    host = urlparse(conn.getURI()).hostname
    if host not in (None, "", "localhost", "127.0.0.1", "::1"):
        raise VmformError(f"{address}'s console log is {log.get('file')} on {host}; vmform console reads it only "
                          "when the host is this machine (use virsh console there)")
    return Path(str(log.get("file")))


def console_stream(conn: libvirt.virConnect, manifests: Manifests, address: str,
                   stop: threading.Event | None = None) -> Iterator[bytes]:
    """What a running domain writes to its serial console from now on, through libvirt's console stream
    (virDomainOpenConsole), so it works on a remote host too. Attached when this returns; the iterator ends
    when the guest stops or ``stop`` is set."""
    import libvirt

    resource = manifests.resources.get(address)
    if resource is None or resource.kind.name != "domain":
        raise VmformError(f"no domain '{address}'")
    dom = _owned_domains(conn, manifests.project).get(address)
    if dom is None or not dom.isActive():
        raise VmformError(f"{address} is not running")
    stream = conn.newStream(0)
    try:
        dom.openConsole(None, stream, 0)
    except libvirt.libvirtError as exc:
        raise HostError(f"cannot attach to {address}'s console: {libvirt_message(exc)}") from None
    return _console_chunks(stream, stop)


def _console_chunks(stream: libvirt.virStream, stop: threading.Event | None) -> Iterator[bytes]:
    import libvirt

    # recv blocks in C; a reader thread keeps the caller responsive (Ctrl-C, stop).
    chunks: queue.Queue[bytes | None] = queue.Queue()

    def reader() -> None:
        try:
            while True:
                data = stream.recv(65536)
                if not isinstance(data, bytes) or not data:
                    break
                chunks.put(data)
        except libvirt.libvirtError:
            pass
        chunks.put(None)

    threading.Thread(target=reader, name="vmform-console", daemon=True).start()
    try:
        while stop is None or not stop.is_set():
            try:
                chunk = chunks.get(timeout=0.25)
            except queue.Empty:
                continue
            if chunk is None:
                return
            yield chunk
    finally:
        try:
            stream.abort()
        except libvirt.libvirtError:
            pass
