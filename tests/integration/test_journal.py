"""The journal on the real daemon: `apply --journal FILE` and `destroy --journal FILE` write one JSON line per
libvirt mutation, each attributed to the planned change it serves (or to the project lock)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import unplanned_mutations

pytestmark = pytest.mark.libvirt

FIELDS = {"time", "host", "address", "action", "category", "call", "kind", "name", "verdict", "reason"}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_apply_and_destroy_journal_every_mutation_under_its_planned_change(project: Any, tmp_path: Path) -> None:
    project.write(f"""
        networks:
          net: {{name: PFX-net, mode: isolated, bridge: BRPa}}
        pools:
          pool: {{name: PFX-pool, path: {project.pool_dir}}}
        volumes:
          disk: {{name: PFX-disk, pool: pool, size: 16MiB}}
        domains:
          vm: {{name: PFX-vm, type: qemu, memory: 32MiB, state: stopped, disks: [disk], interfaces: [net]}}
    """)
    applied, destroyed = tmp_path / "apply.jsonl", tmp_path / "destroy.jsonl"
    project.run("apply", "--auto-approve", "--journal", str(applied), check=True)
    lines = _lines(applied)
    assert lines and all(set(line) == FIELDS for line in lines)
    assert unplanned_mutations(applied) == []
    served = {(line["address"], line["action"], line["call"], line["kind"], line["name"]) for line in lines
              if line["category"] == "change"}
    prefix = project.prefix
    assert ("network.net", "create", "virConnect.networkDefineXML", "network", f"{prefix}-net") in served
    assert ("pool.pool", "create", "virStoragePool.build", "pool", f"{prefix}-pool") in served
    assert ("volume.disk", "create", "virStoragePool.createXML", "volume", f"{prefix}-pool/{prefix}-disk") in served
    assert ("domain.vm", "create", "virConnect.defineXML", "domain", f"{prefix}-vm") in served
    assert not any(call == "virDomain.create" for _, _, call, _, _ in served)  # state: stopped, never started
    ledger = [line for line in lines if line["category"] == "ledger"]
    assert ledger and {line["address"] for line in ledger} <= {"pool.pool", "volume.disk"}
    assert all(line["name"] == f"vmform/{prefix}/ledger" for line in ledger)
    locks = [line for line in lines if line["category"] == "lock"]
    assert [line["call"] for line in locks][0] == "virConnect.secretDefineXML" and locks[-1]["call"] == "virSecret.undefine"
    assert all(line["address"] is None and line["host"] == "default" for line in locks)

    project.run("destroy", "--auto-approve", "--journal", str(destroyed), check=True)
    gone = {(line["address"], line["action"], line["call"]) for line in _lines(destroyed)
            if line["category"] == "change"}
    assert ("domain.vm", "delete", "virDomain.undefineFlags") in gone
    assert ("volume.disk", "delete", "virStorageVol.delete") in gone
    assert ("network.net", "delete", "virNetwork.undefine") in gone
    assert unplanned_mutations(destroyed) == []
    assert project.leftovers() == []


def test_a_run_without_changes_mutates_nothing(project: Any, tmp_path: Path) -> None:
    project.write("""
        networks:
          net: {name: PFX-net, mode: isolated, bridge: BRPa}
    """)
    project.apply()
    again = tmp_path / "again.jsonl"
    result = project.run("apply", "--auto-approve", "--journal", str(again), check=True)
    assert "No changes" in result.stdout
    # apply takes the lock before it plans (lock first, then plan); beyond the lock's own secret, nothing
    entries = _lines(again)
    assert entries and all(entry["category"] == "lock" and entry["kind"] in ("secret", "connection")
                           and entry["verdict"] == "ok" for entry in entries), entries
