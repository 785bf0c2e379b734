"""Which domains apply --wait-ip waits for, and where vmform console refuses to read (remote hosts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from vmform.errors import VmformError
from vmform.guests import Address, DomainOutput, WaitTimeout, awaited_domains, console_log, wait_for_addresses
from vmform.model import Manifests

MANIFEST = """
networks:
  leased: {ipv4: 10.0.0.1/24, dhcp: {start: 10.0.0.10, end: 10.0.0.20}}
  reserved: {ipv4: 10.0.1.1/24, dhcp_hosts: [{mac: "52:54:00:00:00:01", ip: 10.0.1.5}]}
  static: {ipv4: 10.0.2.1/24}
domains:
  a: {interfaces: [leased]}
  b: {interfaces: [{network: reserved, mac: "52:54:00:00:00:01"}]}
  c: {interfaces: [static]}
  d: {interfaces: [leased], state: stopped}
  e: {interfaces: [{bridge: br0}]}
  f: {console_log: true}
"""


def test_wait_ip_waits_for_running_domains_on_dhcp_networks(load_files: Callable[..., Manifests]) -> None:
    assert awaited_domains(load_files({"m.yaml": MANIFEST})) == ["domain.a", "domain.b"]


def test_wait_ip_is_bounded_and_names_the_missing(load_files: Callable[..., Manifests],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = load_files({"m.yaml": MANIFEST})
    answers = {"domain.a": [Address("vnet0", "52:54:00:00:00:09", "10.0.0.11", 24, "lease")], "domain.b": []}
    monkeypatch.setattr("vmform.guests.domain_outputs", lambda conn, m: [
        DomainOutput(address, address.split(".")[1], "running", list(ips)) for address, ips in answers.items()])
    with pytest.raises(WaitTimeout, match=r"within 0s for domain.b \("):
        wait_for_addresses(None, manifests, timeout=0, interval=0)
    answers["domain.b"] = [Address("vnet1", "52:54:00:00:00:01", "10.0.1.5", 24, "lease")]
    seen: list[str] = []
    wait_for_addresses(None, manifests, timeout=0, interval=0, progress=lambda o: seen.append(o.address))
    assert seen == ["domain.a", "domain.b"]


class _FakeDomain:
    def __init__(self, xml: str) -> None:
        self.xml = xml

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802 - libvirt's name
        return self.xml

    def isActive(self) -> bool:  # noqa: N802
        return True


class _FakeConn:
    def __init__(self, uri: str, domains: list[Any]) -> None:
        self.uri, self.domains = uri, domains

    def getURI(self) -> str:  # noqa: N802
        return self.uri

    def listAllDomains(self) -> list[Any]:  # noqa: N802
        return self.domains


DOMAIN_XML = """<domain type='qemu'><name>f</name><metadata>
<vmform:owner xmlns:vmform="https://vmform.dev/xmlns/owner/1" project="unit" address="domain.f"/></metadata>
<devices><serial type='pty'><log file='/var/log/libvirt/qemu/f-console.log' append='on'/></serial></devices></domain>"""


def test_console_log_is_read_locally_and_refused_for_a_remote_host(load_files: Callable[..., Manifests]) -> None:
    manifests = load_files({"m.yaml": MANIFEST})
    local = _FakeConn("qemu:///system", [_FakeDomain(DOMAIN_XML)])
    assert str(console_log(local, manifests, "domain.f")) == "/var/log/libvirt/qemu/f-console.log"
    remote = _FakeConn("qemu+ssh://root@kvm1.example/system", [_FakeDomain(DOMAIN_XML)])
    with pytest.raises(VmformError, match="on kvm1.example; vmform console reads it only when the host is this machine"):
        console_log(remote, manifests, "domain.f")
    without_log = DOMAIN_XML.replace('address="domain.f"', 'address="domain.a"').replace(
        "<log file='/var/log/libvirt/qemu/f-console.log' append='on'/>", "")
    with pytest.raises(VmformError, match="has no console log; set console_log: true"):
        console_log(_FakeConn("qemu:///system", [_FakeDomain(without_log)]), manifests, "domain.a")
    with pytest.raises(VmformError, match="does not exist on the host"):
        console_log(_FakeConn("qemu:///system", []), manifests, "domain.f")
    with pytest.raises(VmformError, match="no domain 'domain.g'"):
        console_log(local, manifests, "domain.g")
