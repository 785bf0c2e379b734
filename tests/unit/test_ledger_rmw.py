"""Ledger saves are read-modify-write: a save replays this Ledger's own records, undos and forgets onto the
ledger as the host holds it, so it never drops an entry another apply wrote; ``undo`` takes back exactly one
record (what the address held before comes back). The host's secret store is a small fake here (libvirt's
test driver has no secrets); tests/integration/test_locks_and_moves.py proves the same on the real daemon."""

from __future__ import annotations

import json
import zlib
from typing import Any

import libvirt
import pytest

from vmform.ownership import Ledger


class FakeSecret:
    def __init__(self, store: FakeHost, usage: str) -> None:
        self.store, self.usage = store, usage

    def value(self) -> bytes:
        if self.usage not in self.store.values:
            raise _no_secret()
        return self.store.values[self.usage]

    def setValue(self, value: bytes) -> None:  # noqa: N802 - libvirt's name
        self.store.values[self.usage] = value

    def undefine(self) -> None:
        self.store.defined.discard(self.usage)
        self.store.values.pop(self.usage, None)


def _no_secret() -> libvirt.libvirtError:
    error = libvirt.libvirtError("no secret")
    error.err = (libvirt.VIR_ERR_NO_SECRET, 0, "no secret", 0, "", None, None, 0, 0)
    return error


class FakeHost:
    """secretLookupByUsage / secretDefineXML, as much as Ledger uses."""

    def __init__(self) -> None:
        self.defined: set[str] = set()
        self.values: dict[str, bytes] = {}

    def secretLookupByUsage(self, _type: int, usage: str) -> FakeSecret:  # noqa: N802
        if usage not in self.defined:
            raise _no_secret()
        return FakeSecret(self, usage)

    def secretDefineXML(self, xml: str) -> FakeSecret:  # noqa: N802
        usage = xml.split("<target>")[1].split("</target>")[0]
        self.defined.add(usage)
        return FakeSecret(self, usage)

    def held(self) -> dict[str, Any]:
        raw = self.values.get("vmform/p/ledger")
        return json.loads(zlib.decompress(raw)) if raw else {"pools": {}, "volumes": {}}


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


def test_a_save_keeps_what_another_apply_saved_meanwhile(host: FakeHost) -> None:
    first, second = Ledger.load(host, "p"), Ledger.load(host, "p")  # type: ignore[arg-type]
    first.record("volume", "volume.a", {"pool": "pool", "name": "a"})
    first.save(host)  # type: ignore[arg-type]
    second.record("volume", "volume.b", {"pool": "pool", "name": "b"})
    second.save(host)  # type: ignore[arg-type]
    assert sorted(host.held()["volumes"]) == ["volume.a", "volume.b"]
    assert sorted(second.volumes) == ["volume.a", "volume.b"]  # the in-memory view is the host's now


def test_undoing_a_refused_create_leaves_the_entry_that_was_there(host: FakeHost) -> None:
    other = Ledger.load(host, "p")  # type: ignore[arg-type]
    other.record("volume", "volume.a", {"pool": "pool", "name": "a", "source_sha256": "abc"})
    other.record("pool", "pool.x", {"name": "x", "uuid": "uuid-1"})
    other.save(host)  # type: ignore[arg-type]
    before = host.held()
    mine = Ledger.load(host, "p")  # type: ignore[arg-type]
    volume = mine.record("volume", "volume.a", {"pool": "pool", "name": "a", "incomplete": True})
    pool = mine.record("pool", "pool.x", {"name": "x", "uuid": "uuid-2"})  # another UUID: the old one is displaced
    assert pool.displaced_to == "pool.x~replaced-1"
    mine.save(host)  # type: ignore[arg-type]
    mine.undo(volume)  # "storage volume 'a' exists already"
    mine.undo(pool)  # "pool 'x' already exists"
    mine.save(host)  # type: ignore[arg-type]
    assert host.held() == before


def test_undo_of_a_new_entry_removes_only_it(host: FakeHost) -> None:
    mine = Ledger.load(host, "p")  # type: ignore[arg-type]
    mine.record("volume", "volume.keep", {"pool": "pool", "name": "keep"})
    refused = mine.record("volume", "volume.new", {"pool": "pool", "name": "new"})
    mine.undo(refused)  # record and undo in one save: nothing of volume.new reaches the host
    mine.save(host)  # type: ignore[arg-type]
    assert list(host.held()["volumes"]) == ["volume.keep"]


def test_forget_removes_only_the_object_it_names(host: FakeHost) -> None:
    mine = Ledger.load(host, "p")  # type: ignore[arg-type]
    mine.record("volume", "volume.a", {"pool": "pool", "name": "a"})
    mine.save(host)  # type: ignore[arg-type]
    mine.forget("volume", "volume.a", pool="pool", name="another")
    mine.save(host)  # type: ignore[arg-type]
    assert list(host.held()["volumes"]) == ["volume.a"]
    mine.forget("volume", "volume.a", pool="pool", name="a")
    mine.save(host)  # type: ignore[arg-type]
    assert "vmform/p/ledger" not in host.defined  # an empty ledger is removed
