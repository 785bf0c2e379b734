"""The journal's policy on libvirt's test driver: a mutation no planned change allows is refused before libvirt
sees it (the object is still there afterwards), the allowed calls pass, and the JSON lines say what happened."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from vmform.apply import execute
from vmform.connection import ConnectionPool
from vmform.journal import JOURNAL, Target, UnplannedMutation, check, is_guarded, is_mutation, serving
from vmform.ownership import Ledger
from vmform.plan import Action, Change, FieldChange, Plan
from vmform.providers.base import ApplyContext
from vmform.schema.types import Effect

HOST = "default"
VOLUME_XML = "<volume><name>{name}</name><capacity>1048576</capacity><target><format type='raw'/></target></volume>"


@pytest.fixture(autouse=True)
def _fresh_journal_project() -> Iterator[None]:
    """JOURNAL is process-wide: a test that ran vmform in-process before (the contract property test, the
    Ansible module's) leaves its project there, which would make this file's lock secrets another project's."""
    saved = JOURNAL.project
    JOURNAL.project = None
    yield
    JOURNAL.project = saved


@pytest.fixture
def pool() -> Iterator[ConnectionPool]:
    """A guarded pool on the test driver; its state (domain "test", network "default", pool "default-pool")
    is shared by the tests of this process, so each test uses names of its own."""
    connections = ConnectionPool("test:///default", host=HOST)
    yield connections
    connections.close()


_RAW: list[Any] = []


def _raw(pool: ConnectionPool) -> Any:
    """A connection of the test's own, not guarded, on the same test driver state (to look behind vmform)."""
    if not _RAW:
        _RAW.append(libvirt.open("test:///default"))
    conn = _RAW[0]
    assert not is_guarded(conn)
    return conn


def _volume(pool: ConnectionPool, name: str) -> None:
    _raw(pool).storagePoolLookupByName("default-pool").createXML(VOLUME_XML.format(name=name), 0)


def _change(address: str, action: Action, name: str, **extra: Any) -> Change:
    kind = address.split(".", 1)[0]
    return Change(address=address, kind=kind, name=name, action=action, host=HOST, **extra)


def _field(path: str, effect: Effect = Effect.LIVE) -> FieldChange:
    return FieldChange(path, None, None, effect)


def _last() -> Any:
    return JOURNAL.entries[-1]


# --- what must be refused --------------------------------------------------------------------------------------

def test_an_undefine_under_an_update_is_refused_before_libvirt_sees_it(pool: ConnectionPool) -> None:
    dom = pool.get().lookupByName("test")
    assert is_guarded(dom) and isinstance(dom, libvirt.virDomain)
    refusal = (r"^internal error: domain\.test: virDomain\.undefineFlags on domain test serves no planned change "
               r"\(update\)$")
    with serving(_change("domain.test", Action.UPDATE, "test", fields=(_field("memory"),))), \
            pytest.raises(UnplannedMutation, match=refusal):
        dom.undefineFlags(0)
    assert _raw(pool).lookupByName("test").isPersistent()  # still defined: libvirt never saw the call
    entry = _last()
    assert (entry.verdict, entry.address, entry.call, entry.kind, entry.name) == (
        "refused", "domain.test", "virDomain.undefineFlags", "domain", "test")
    assert "does not undefine" in entry.reason


def test_a_delete_of_an_object_the_plan_does_not_delete_is_refused(pool: ConnectionPool) -> None:
    _raw(pool).defineXML("<domain type='test'><name>other</name><memory>1024</memory><os><type>hvm</type></os></domain>")
    with serving(_change("domain.other", Action.DELETE, "other")):
        with pytest.raises(UnplannedMutation, match="virDomain.destroy on domain test serves no planned change"):
            pool.get().lookupByName("test").destroy()
        with pytest.raises(UnplannedMutation, match="virStoragePool.destroy on pool default-pool"):
            pool.get().storagePoolLookupByName("default-pool").destroy()
        pool.get().lookupByName("other").undefine()  # its own object: allowed
    assert _raw(pool).lookupByName("test").isActive()
    assert _raw(pool).storagePoolLookupByName("default-pool").isActive()
    assert "other" not in [d.name() for d in _raw(pool).listAllDomains()]


def test_a_mutation_outside_any_change_is_refused(pool: ConnectionPool) -> None:
    with pytest.raises(UnplannedMutation, match=r"no planned change: virNetwork\.destroy on network default .*"
                                                r"\(outside any change\)"):
        pool.main.networkLookupByName("default").destroy()
    assert _raw(pool).networkLookupByName("default").isActive()
    assert _last().category == "change" and _last().address is None


def test_a_volume_delete_under_a_move_is_refused_unless_the_move_lists_it(pool: ConnectionPool) -> None:
    _volume(pool, "listed")
    _volume(pool, "unlisted")
    move = _change("domain.test", Action.MIGRATE, "test", identity={
        "from_host": HOST, "volumes": [{"address": "volume.listed", "pool": "default-pool", "name": "listed"}]})
    storage = pool.get().storagePoolLookupByName("default-pool")
    with serving(move):
        with pytest.raises(UnplannedMutation, match="virStorageVol.delete on volume default-pool/unlisted"):
            storage.storageVolLookupByName("unlisted").delete(0)
        storage.storageVolLookupByName("listed").delete(0)
    left = _raw(pool).storagePoolLookupByName("default-pool").listVolumes()
    assert "unlisted" in left and "listed" not in left


def test_a_restart_class_stop_under_an_update_needs_the_restart(pool: ConnectionPool) -> None:
    dom = pool.get().lookupByName("test")
    with serving(_change("domain.test", Action.UPDATE, "test", fields=(_field("memory"),))):
        with pytest.raises(UnplannedMutation):
            dom.destroy()
        with pytest.raises(UnplannedMutation):  # no autostart field in the change
            dom.setAutostart(1)
    assert _raw(pool).lookupByName("test").isActive()
    with serving(_change("domain.test", Action.UPDATE, "test", fields=(_field("cpu", Effect.RESTART),),
                         restart=True)):
        dom.shutdown()
        dom.create()
    assert _raw(pool).lookupByName("test").isActive()


def test_a_replug_touches_only_the_interfaces_of_the_domains_it_lists(pool: ConnectionPool) -> None:
    dom = pool.get().lookupByName("test")
    nic = "<interface type='network'><source network='default'/><mac address='52:54:00:aa:00:01'/></interface>"
    disk = "<disk type='file' device='disk'><source file='/x'/><target dev='vdb'/></disk>"
    replug = _change("network.default", Action.UPDATE, "default", fields=(_field("ips", Effect.RESTART),),
                     restart=True, replug=("test",))
    unlisted = _change("network.default", Action.UPDATE, "default", fields=(_field("ips", Effect.RESTART),),
                       restart=True)
    with serving(unlisted), pytest.raises(UnplannedMutation, match="virDomain.updateDeviceFlags on domain test"):
        dom.updateDeviceFlags(nic, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    with serving(replug):
        with pytest.raises(UnplannedMutation):  # a disk is no interface
            dom.updateDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        with pytest.raises(libvirt.libvirtError):  # allowed: libvirt itself decides (the test driver cannot)
            dom.updateDeviceFlags(nic, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert _last().verdict == "ok" and _last().address == "network.default"


def test_a_volume_update_resizes_its_own_volume_only(pool: ConnectionPool) -> None:
    _volume(pool, "mine")
    _volume(pool, "theirs")
    grow = _change("volume.mine", Action.UPDATE, "mine", fields=(_field("size"),),
                   after={"pool": "default-pool", "size": 2 * 1048576})
    storage = pool.get().storagePoolLookupByName("default-pool")
    with serving(grow):
        with pytest.raises(libvirt.libvirtError, match="not supported"):  # allowed: the test driver cannot
            storage.storageVolLookupByName("mine").resize(2 * 1048576, 0)
        assert _last().verdict == "ok"
        with pytest.raises(UnplannedMutation, match="virStorageVol.resize on volume default-pool/theirs"):
            storage.storageVolLookupByName("theirs").resize(2 * 1048576, 0)
        with pytest.raises(UnplannedMutation, match="virStorageVol.delete"):
            storage.storageVolLookupByName("mine").delete(0)
        with pytest.raises(UnplannedMutation, match="virDomain.blockResize"):  # domain test has no such disk
            pool.get().lookupByName("test").blockResize("vda", 2 * 1048576, 0)
    assert {"mine", "theirs"} <= set(_raw(pool).storagePoolLookupByName("default-pool").listVolumes())
    assert _raw(pool).storagePoolLookupByName("default-pool").storageVolLookupByName("theirs").info()[1] == 1048576


def test_a_create_defines_and_starts_its_own_object_and_undoes_only_what_it_made(pool: ConnectionPool) -> None:
    xml = "<network><name>{}</name><bridge name='vmfj{}'/></network>"
    with serving(_change("network.fresh", Action.CREATE, "fresh")):
        with pytest.raises(UnplannedMutation, match="virConnect.networkDefineXML on network other"):
            pool.get().networkDefineXML(xml.format("other", 1))
        net = pool.get().networkDefineXML(xml.format("fresh", 0))
        net.create()
        net.setAutostart(1)
        with pytest.raises(UnplannedMutation):  # a create never stops what it starts
            net.destroy()
        net_again = pool.get().networkLookupByName("fresh")
        assert is_guarded(net_again)
    with serving(_change("network.default", Action.CREATE, "default")), pytest.raises(UnplannedMutation):
        pool.get().networkLookupByName("default").undefine()  # not made by this change
    assert _raw(pool).networkLookupByName("default").isPersistent()
    with serving(_change("network.again", Action.CREATE, "again")):
        net = pool.get().networkDefineXML(xml.format("again", 2))
        net.undefine()  # made by this change in this apply: it may be undone (a network that cannot start)


def test_the_lock_is_written_outside_any_change_and_the_ledger_is_not() -> None:
    """The test driver has no secrets: the calls are checked as the guarded secret methods check them."""
    def write(usage: str, method: str = "setValue") -> None:
        check(HOST, "virSecret", method, Target("secret", usage))

    write("vmform/journalunit/lock", "secretDefineXML")
    write("vmform/journalunit/lock", "undefine")
    assert (_last().category, _last().verdict, _last().address) == ("lock", "ok", None)
    with pytest.raises(UnplannedMutation, match="virSecret.setValue on secret vmform/journalunit/ledger serves no "
                                                "planned change"):
        write("vmform/journalunit/ledger")
    assert (_last().category, _last().verdict) == ("ledger", "refused")
    with serving(_change("volume.a", Action.CREATE, "a")):
        write("vmform/journalunit/ledger")
        with pytest.raises(UnplannedMutation):  # a secret that is not vmform's
            write("/etc/some-volume-key")
        with pytest.raises(UnplannedMutation):  # the ledger of a host the change does not touch
            check("elsewhere", "virSecret", "setValue", Target("secret", "vmform/journalunit/ledger"))
    with serving(None, "import"):
        write("vmform/journalunit/ledger")
        assert _last().category == "import" and _last().verdict == "ok"
        check(HOST, "virDomain", "setMetadata", Target("domain", "adopted"))
        assert _last().category == "import" and _last().verdict == "ok"
        with pytest.raises(UnplannedMutation):
            check(HOST, "virDomain", "destroy", Target("domain", "adopted"))


def test_reads_pass_and_unknown_methods_are_mutations() -> None:
    assert not is_mutation("virDomain", "XMLDesc") and not is_mutation("virConnect", "listAllDomains")
    assert is_mutation("virDomain", "undefineFlags") and is_mutation("virStorageVol", "wipe")
    assert is_mutation("virDomain", "someMethodLibvirtAddsLater")
    assert is_mutation("virDomainSnapshot", "delete") and not is_mutation("virDomainSnapshot", "getXMLDesc")
    for name in ("virDomain", "virNetwork", "virStoragePool", "virStorageVol", "virSecret"):
        cls = getattr(libvirt, name)
        mutating = {m for m in dir(cls) if not m.startswith("_") and is_mutation(name, m)}
        assert {"setAutostart", "delete", "undefine", "undefineFlags", "setValue", "resize", "upload", "update",
                "create", "destroy", "attachDeviceFlags", "migrate3"} & set(dir(cls)) <= mutating | {"c_pointer"}


def test_execute_fails_the_change_and_counts_the_refusal(pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmform.providers.domain import DomainProvider

    def buggy_update(self: Any, ctx: ApplyContext, change: Change) -> None:
        dom = ctx.connections.get().lookupByName(change.name)
        try:
            dom.undefineFlags(0)  # a bug: an update never undefines
        except Exception:  # noqa: BLE001 - a provider that swallows errors still fails the change
            pass

    monkeypatch.setattr(DomainProvider, "update", buggy_update)
    change = _change("domain.test", Action.UPDATE, "test", fields=(_field("memory"),), after={"memory": 1})
    result = execute(Plan("journalunit", "test:///default", (change,)), ApplyContext(pool, "journalunit",
                     Ledger("journalunit")), 1)
    assert result.refused == 1 and not result.ok
    assert result.failed == {"domain.test": "internal error: domain.test: virDomain.undefineFlags on domain test "
                                            "serves no planned change (update)"}
    assert _raw(pool).lookupByName("test").isPersistent()


def test_execute_of_real_providers_journals_every_call_as_ok(pool: ConnectionPool, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A network created and a volume created and deleted through the real providers: each call is journaled
    under its change, and written as JSON lines to VMFORM_JOURNAL."""
    path = tmp_path / "journal.jsonl"
    monkeypatch.setenv("VMFORM_JOURNAL", str(path))
    net = Change("network.n", "network", "vmfj-n", Action.CREATE, host=HOST,
                 after={"bridge": "vmfjn0", "autostart": True, "forward": None})
    vol = Change("volume.v", "volume", "v", Action.CREATE, host=HOST,
                 after={"pool": "default-pool", "size": 1048576, "format": "raw"})
    ctx = ApplyContext(pool, "journalunit", Ledger("journalunit"))
    monkeypatch.setattr("vmform.providers.network.render_network", lambda name, after, project, address:
                        __import__("lxml.etree").etree.fromstring(
                            f"<network><name>{name}</name><bridge name='{after['bridge']}'/></network>"))
    monkeypatch.setattr("vmform.providers.network.validate", lambda *a: None)
    monkeypatch.setattr("vmform.providers.volume.validate", lambda *a: None)
    # The test driver has no secrets: a ledger save is the write the guarded secret would check.
    monkeypatch.setattr(ApplyContext, "save_ledger", lambda self: check(
        HOST, "virSecret", "setValue", Target("secret", "vmform/journalunit/ledger")))
    mark = JOURNAL.mark()
    result = execute(Plan("journalunit", "test:///default", (net, vol)), ctx, 1)
    assert result.ok, result.failed
    delete = Change("volume.v", "volume", "v", Action.DELETE, host=HOST, identity={"pool": "default-pool"})
    assert execute(Plan("journalunit", "test:///default", (delete,)), ctx, 1).ok
    entries = JOURNAL.since(mark)
    assert {e.verdict for e in entries} == {"ok"}
    calls = [(e.address, e.category, e.call) for e in entries]
    assert ("network.n", "change", "virConnect.networkDefineXML") in calls
    assert ("network.n", "change", "virNetwork.create") in calls
    assert ("volume.v", "ledger", "virSecret.setValue") in calls
    assert ("volume.v", "change", "virStoragePool.createXML") in calls
    assert ("volume.v", "change", "virStorageVol.delete") in calls
    lines = [json.loads(line) for line in path.read_text().splitlines()][-len(entries):]
    assert [line["call"] for line in lines] == [e.call for e in entries]
    assert set(lines[0]) == {"time", "host", "address", "action", "category", "call", "kind", "name", "verdict",
                             "reason"}
    created = next(line for line in lines if line["call"] == "virStoragePool.createXML")
    assert created | {"time": "t"} == {"time": "t", "host": HOST, "address": "volume.v", "action": "create",
                                       "category": "change", "call": "virStoragePool.createXML", "kind": "volume",
                                       "name": "default-pool/v", "verdict": "ok", "reason": None}
    JOURNAL.close()


def test_the_summary_counts_refused_mutations(capsys: pytest.CaptureFixture[str]) -> None:
    from vmform.apply import ApplyResult
    from vmform.cli import Output, _report

    result = ApplyResult(done=["network.a"], failed={"domain.test": "internal error: …"}, refused=2)
    with pytest.raises(SystemExit) as exited:
        _report(Output(color=False), Plan("journalunit", "test:///default", ()), "apply", result)
    assert exited.value.code == 1
    shown = capsys.readouterr()
    assert "Apply incomplete: 1 done, 1 failed, 0 skipped, 2 mutations refused (internal error)." in shown.out
    assert "Error: domain.test: internal error: …" in shown.err


def test_a_base_replace_deletes_only_the_overlays_it_lists(pool: ConnectionPool) -> None:
    _volume(pool, "overlay-listed")
    _volume(pool, "overlay-other")
    base = _change("volume.base", Action.DELETE_THEN_CREATE, "base", identity={
        "pool": "default-pool", "overlays": [{"address": "volume.o", "pool": "default-pool", "name": "overlay-listed"}]})
    storage = pool.get().storagePoolLookupByName("default-pool")
    with serving(base):
        storage.storageVolLookupByName("overlay-listed").delete(0)
        with pytest.raises(UnplannedMutation, match="virStorageVol.delete on volume default-pool/overlay-other"):
            storage.storageVolLookupByName("overlay-other").delete(0)
    left = _raw(pool).storagePoolLookupByName("default-pool").listVolumes()
    assert "overlay-other" in left and "overlay-listed" not in left
