"""The pieces of fault handling that need no daemon: when a lock's holder is provably gone, which errors mean a
dropped connection, and a reconnecting pool on libvirt's test driver."""

from __future__ import annotations

import subprocess
import sys

import libvirt
import pytest

from vmform.connection import ConnectionPool, is_connection_lost
from vmform.errors import ConnectionLost
from vmform.ownership import LockInfo, _this_process


def test_a_running_holder_is_not_gone() -> None:
    assert LockInfo("id", {**_this_process(), "command": "apply"}).holder_gone() is None


def test_a_dead_holder_on_this_machine_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    holder = {**_this_process(), "pid": child.pid}
    assert LockInfo("id", holder).holder_gone() == f"process {child.pid} is no longer running"


def test_a_reused_pid_is_gone() -> None:
    holder = {**_this_process(), "start_ticks": _this_process()["start_ticks"] - 1}
    assert "another process now" in (LockInfo("id", holder).holder_gone() or "")


@pytest.mark.parametrize("change", [
    {"machine": "elsewhere.example"},  # another machine: never judged
    {"boot_id": "another-boot"},  # rebooted since, or another host with the same name
    {"pid_ns": -1},  # another container's pids
    {"boot_id": None},  # an older vmform's lock: no proof possible
    {"pid": "1234"},
])
def test_a_holder_that_cannot_be_checked_is_never_judged_gone(change: dict[str, object]) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    holder = {**_this_process(), "pid": child.pid, **change}
    assert LockInfo("id", holder).holder_gone() is None


def test_dropped_connection_errors_are_told_from_refusals() -> None:
    conn = libvirt.open("test:///default")
    try:
        conn.lookupByName("no-such-domain")
    except libvirt.libvirtError as exc:
        assert not is_connection_lost(exc, conn)  # a refusal: the connection is fine
    conn.close()
    assert is_connection_lost(ConnectionLost("gone"))
    assert is_connection_lost(RuntimeError("x"), conn)  # a closed connection is not alive


def test_the_pool_reopens_a_closed_connection_and_gives_up_after_the_timeout() -> None:
    pool = ConnectionPool("test:///default", reconnect_timeout=0)
    first = pool.main
    first.close()
    assert pool.ensure().getLibVersion() > 0 and pool.main is not first and pool.reconnects == 1
    pool.uri = "vmformnone:///nothing"  # no such driver: cannot reopen
    pool.main.close()
    with pytest.raises(ConnectionLost, match="lost the connection to vmformnone:///nothing and could not reconnect within 0s"):
        pool.ensure()
    pool.close()
