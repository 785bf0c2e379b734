"""The fake remote hosts of tests/integration/remote_hosts.py are real, independent libvirt hosts: their own
UUIDs and objects, reachable over qemu+tcp:// and qemu+ssh://, and a running domain live-migrates between them
with its disk copied (the facts docs/MULTIHOST-TESTING.md states are checked here)."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from tests.integration.remote_hosts import RemoteHost

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
# Where the destination QEMU listens and where the source sends: loopback only (without LISTEN_ADDRESS the
# destination's migration and NBD ports listen on every interface).
LOCAL_MIGRATION = {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1",
                   libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1"}


def host_uuid(conn: Any) -> str:
    match = re.search(r"<host>\s*<uuid>([^<]+)</uuid>", conn.getCapabilities())
    assert match, "no host uuid in the capabilities"
    return match.group(1)


def domain_xml(name: str, disk: str | None = None) -> str:
    disk_xml = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
                "<target dev='vda' bus='virtio'/></disk>") if disk else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {disk_xml}
    <serial type='pty'/><console type='pty'/>
  </devices>
</domain>"""


def pool_xml(name: str, host: RemoteHost) -> str:
    return f"<pool type='dir'><name>{name}</name><target><path>{host.pool_root}/{name}</path></target></pool>"


def volume_xml(name: str) -> str:
    return (f"<volume><name>{name}</name><capacity unit='MiB'>64</capacity>"
            "<target><format type='qcow2'/></target></volume>")


def cpu_time_grows(dom: Any, timeout: float = 10.0) -> bool:
    """The guest is executing: its CPU time keeps growing."""
    first = dom.info()[4]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if dom.info()[4] > first:
            return True
    return False


@pytest.fixture
def prefix(remote_host_b: RemoteHost, remote_host_c: RemoteHost) -> Iterator[str]:
    """A vmftest-… prefix whose domains and pools are removed from both fake hosts afterwards."""
    name = f"vmftest-{secrets.token_hex(3)}"
    yield name
    for host in (remote_host_b, remote_host_c):
        conn = host.conn()
        for dom in conn.listAllDomains():
            if dom.name().startswith(name):
                persistent = dom.isPersistent()
                if dom.isActive():
                    dom.destroy()
                if persistent:
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        for net in conn.listAllNetworks():
            if net.name().startswith(name):
                if net.isActive():
                    net.destroy()
                net.undefine()
        for pool in conn.listAllStoragePools():
            if pool.name().startswith(name):
                if pool.isActive():
                    for vol in pool.listAllVolumes():
                        vol.delete(0)
                    pool.destroy()
                pool.undefine()


def test_fake_hosts_are_independent_hosts(remote_host_b: RemoteHost, remote_host_c: RemoteHost,
                                          prefix: str) -> None:
    b, c = remote_host_b.conn(), remote_host_c.conn()
    # The host daemon, on a connection of this test's own (the session's may be stale if it was restarted).
    conn = libvirt.open(os.environ.get("VMFORM_TEST_URI", "qemu:///system"))
    assert remote_host_b.uri.startswith("qemu+tcp://127.0.0.1:") and remote_host_b.uri.endswith("/system")
    uuids = {host_uuid(b), host_uuid(c), host_uuid(conn)}
    assert len(uuids) == 3, uuids
    assert host_uuid(b) == remote_host_b.host_uuid and host_uuid(c) == remote_host_c.host_uuid
    # Nothing of the host daemon's is there, and what is defined on b is on b only.
    assert not b.listAllDomains() or all(d.name().startswith("vmftest-") for d in b.listAllDomains())
    assert not any(n.name() == "default" for n in b.listAllNetworks())
    b.defineXML(domain_xml(f"{prefix}-only-b"))
    assert [d.name() for d in b.listAllDomains() if d.name().startswith(prefix)] == [f"{prefix}-only-b"]
    assert not [d for d in c.listAllDomains() if d.name().startswith(prefix)]
    assert not [d for d in conn.listAllDomains() if d.name().startswith(prefix)]
    conn.close()


def test_pool_root_is_the_same_path_with_separate_storage(remote_host_b: RemoteHost,
                                                          remote_host_c: RemoteHost, prefix: str) -> None:
    paths = []
    for host in (remote_host_b, remote_host_c):
        pool = host.conn().storagePoolDefineXML(pool_xml(f"{prefix}-pool", host))
        pool.build(0)
        pool.create(0)
        paths.append(pool.createXML(volume_xml(f"{prefix}-{host.name}.qcow2"), 0).path())
    assert paths[0].rsplit("/", 1)[0] == paths[1].rsplit("/", 1)[0]  # one pool path on both hosts …
    assert remote_host_b.host_path(paths[0]).is_file() and not remote_host_b.host_path(paths[1]).exists()
    assert remote_host_c.host_path(paths[1]).is_file() and not remote_host_c.host_path(paths[0]).exists()


def free_subnet() -> str:
    """A 10.250-254.x /24 that no interface of this machine uses."""
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    used = {".".join(word.split("/")[0].split(".")[:3]) for word in shown.split() if word.startswith("10.")}
    while True:
        subnet = f"10.{250 + secrets.randbelow(5)}.{secrets.randbelow(256)}"
        if subnet not in used:
            return subnet


def test_isolated_network_on_a_fake_host(remote_host_b: RemoteHost, prefix: str) -> None:
    """A network with DHCP starts on a fake host (its dnsmasq runs in b's namespace, its bridge is a real one of
    this machine) and is not seen by the host daemon."""
    subnet = free_subnet()
    bridge = "vmft" + prefix.split("-")[1]
    net = remote_host_b.conn().networkDefineXML(
        f"<network><name>{prefix}-net</name><bridge name='{bridge}'/>"
        f"<ip address='{subnet}.1' netmask='255.255.255.0'><dhcp><range start='{subnet}.10' end='{subnet}.20'/>"
        "</dhcp></ip></network>")
    net.create()
    assert net.isActive()
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", bridge], capture_output=True, text=True)
    assert f"{subnet}.1/24" in shown.stdout
    pidfile = remote_host_b.host_path(f"/run/libvirt/network/{prefix}-net.pid")
    assert pidfile.exists(), "no dnsmasq for the network"


@pytest.mark.parametrize("proxy", ["auto", "netcat", "native"])
def test_ssh_transport_reaches_the_namespaced_daemon(remote_host_ssh: RemoteHost, remote_host_c: RemoteHost,
                                                     proxy: str) -> None:
    """proxy=auto runs virt-ssh-helper on the far side, netcat/native `nc -U /var/run/libvirt/libvirt-sock`:
    both reach c's daemon because sshd runs in c's mount namespace."""
    assert remote_host_ssh.uri.startswith("qemu+ssh://root@127.0.0.1:")
    ssh = libvirt.open(f"{remote_host_ssh.uri}&proxy={proxy}")
    try:
        assert host_uuid(ssh) == remote_host_c.host_uuid
    finally:
        ssh.close()


def make_disk(host: RemoteHost, pool_name: str, volume: str) -> str:
    """A dir pool at the same path on each fake host holds the disk; returns the volume's path."""
    pool = host.conn().storagePoolDefineXML(pool_xml(pool_name, host))
    pool.build(0)
    pool.create(0)
    return str(pool.createXML(volume_xml(volume), 0).path())


@pytest.mark.parametrize("driver", ["peer2peer", "managed"])
def test_live_migration_with_disk_copy(remote_host_b: RemoteHost, remote_host_c: RemoteHost, prefix: str,
                                       driver: str) -> None:
    """A running TCG domain with a qcow2 disk moves from b to c: native migration to loopback (URI and listen
    address given per migration), the disk copied over NBD into the volume created on c first. peer2peer: b's
    daemon connects to c itself (migrateToURI3); managed: this client holds both connections (migrate3)."""
    b, c = remote_host_b.conn(), remote_host_c.conn()
    path = make_disk(remote_host_b, f"{prefix}-pool", f"{prefix}-disk.qcow2")
    assert make_disk(remote_host_c, f"{prefix}-pool", f"{prefix}-disk.qcow2") == path
    # Data the copy must carry: 1 MiB of 0x5a at 1 MiB, written before the guest starts.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 1M", str(remote_host_b.host_path(path))],
                   check=True, capture_output=True)
    dom = b.defineXML(domain_xml(f"{prefix}-mig", disk=path))
    dom.create()

    started = time.monotonic()
    if driver == "peer2peer":
        dom.migrateToURI3(remote_host_c.uri, LOCAL_MIGRATION, MIGRATE_FLAGS | libvirt.VIR_MIGRATE_NON_SHARED_DISK)
    else:
        dom.migrate3(c, LOCAL_MIGRATION,
                     (MIGRATE_FLAGS & ~libvirt.VIR_MIGRATE_PEER2PEER) | libvirt.VIR_MIGRATE_NON_SHARED_DISK)
    print(f"live migration b -> c ({driver}) with the disk copied: {time.monotonic() - started:.2f} s")

    assert not [d for d in b.listAllDomains() if d.name().startswith(prefix)]  # undefined on b
    moved = c.lookupByName(f"{prefix}-mig")
    assert moved.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED]
    assert moved.isPersistent()
    assert cpu_time_grows(moved)
    copied = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x5a 1M 1M",
                             str(remote_host_c.host_path(path))], capture_output=True, text=True)
    assert copied.returncode == 0 and "Pattern verification failed" not in copied.stdout, copied.stdout


def test_tunnelled_migration_over_ssh(remote_host_b: RemoteHost, remote_host_ssh: RemoteHost,
                                      remote_host_c: RemoteHost, prefix: str) -> None:
    """PEER2PEER|TUNNELLED to c's qemu+ssh:// URI: b's daemon runs ssh itself, and the memory goes through that
    libvirt connection — no migration port at all. The domain has no disk (see the next test)."""
    b, c = remote_host_b.conn(), remote_host_c.conn()
    dom = b.createXML(domain_xml(f"{prefix}-tun"), 0)  # transient: PERSIST_DEST makes it persistent on c
    started = time.monotonic()
    dom.migrateToURI3(remote_host_ssh.uri, {}, MIGRATE_FLAGS | libvirt.VIR_MIGRATE_TUNNELLED)
    print(f"tunnelled live migration b -> c over qemu+ssh: {time.monotonic() - started:.2f} s")
    moved = c.lookupByName(f"{prefix}-tun")
    assert moved.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED]
    assert moved.isPersistent()
    assert not [d for d in b.listAllDomains() if d.name().startswith(prefix)]
    assert cpu_time_grows(moved)


def test_tunnelled_migration_cannot_copy_disks_and_leaves_the_domain_running(
        remote_host_b: RemoteHost, remote_host_c: RemoteHost, prefix: str) -> None:
    """libvirt 9.0 with QEMU 7.2 refuses TUNNELLED|NON_SHARED_DISK; the domain keeps running on the source and is
    not left on the destination."""
    b, c = remote_host_b.conn(), remote_host_c.conn()
    path = make_disk(remote_host_b, f"{prefix}-pool", f"{prefix}-disk.qcow2")
    make_disk(remote_host_c, f"{prefix}-pool", f"{prefix}-disk.qcow2")
    dom = b.defineXML(domain_xml(f"{prefix}-tundisk", disk=path))
    dom.create()
    with pytest.raises(libvirt.libvirtError):
        dom.migrateToURI3(remote_host_c.uri, {},
                          MIGRATE_FLAGS | libvirt.VIR_MIGRATE_TUNNELLED | libvirt.VIR_MIGRATE_NON_SHARED_DISK)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and dom.isPersistent()
    assert not [d for d in c.listAllDomains() if d.name().startswith(prefix)]
    assert cpu_time_grows(dom)


def test_a_fake_host_can_be_unreachable_for_a_while(remote_host_b: RemoteHost, prefix: str) -> None:
    """``unreachable()`` stops b's libvirtd (connections fail, its domains keep running) and starts it again."""
    remote_host_b.conn().createXML(domain_xml(f"{prefix}-survivor"), 0)
    with remote_host_b.unreachable(), pytest.raises(libvirt.libvirtError, match="Connection refused"):
        libvirt.open(remote_host_b.uri)
    dom = remote_host_b.conn().lookupByName(f"{prefix}-survivor")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert host_uuid(remote_host_b.conn()) == remote_host_b.host_uuid
