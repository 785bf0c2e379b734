"""ApplyContext.save_ledger group-commits: every caller returns only after a save that holds its change, one
save may cover many callers, and a failed save covers nobody (each waiting caller then saves itself)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from vmform.errors import HostError
from vmform.ownership import Ledger
from vmform.providers.base import ApplyContext


class RecordingLedger(Ledger):
    """Keeps what each finished save wrote instead of writing to a host; the first ``failures`` saves fail."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__("unit")
        self.saved: list[set[str]] = []
        self.failures = failures
        self.attempts = 0

    def save(self, conn: Any) -> None:
        with self._lock:
            snapshot = set(self.volumes)
            self.attempts += 1
            fail = self.attempts <= self.failures
        time.sleep(0.05)  # a round trip to libvirtd, long enough for the other callers to queue up
        if fail:
            raise HostError("cannot record ownership on the host: (test)")
        self.saved.append(snapshot)


class Connections:
    def get(self) -> None:
        return None


def _run(ledger: RecordingLedger, callers: int) -> dict[str, BaseException | None]:
    ctx = ApplyContext(Connections(), "unit", ledger)  # type: ignore[arg-type]
    barrier = threading.Barrier(callers)
    outcome: dict[str, BaseException | None] = {}
    covered: dict[str, bool] = {}

    def worker(number: int) -> None:
        address = f"volume.v{number}"
        barrier.wait()
        ledger.record("volume", address, {"pool": "p", "name": f"v{number}"})
        try:
            ctx.save_ledger()
        except HostError as exc:
            outcome[address] = exc
            return
        outcome[address] = None
        covered[address] = any(address in snapshot for snapshot in ledger.saved)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(covered.values()), covered
    return outcome


def test_every_caller_returns_after_a_save_holding_its_change() -> None:
    ledger = RecordingLedger()
    outcome = _run(ledger, 12)
    assert all(error is None for error in outcome.values())
    assert len(ledger.saved) < 12  # callers that queued behind a save shared the next one
    assert ledger.saved[-1] == {f"volume.v{n}" for n in range(12)}


def test_a_failed_save_fails_its_caller_and_the_others_save_again() -> None:
    ledger = RecordingLedger(failures=1)
    outcome = _run(ledger, 6)
    failed = [address for address, error in outcome.items() if error is not None]
    assert len(failed) == 1
    assert ledger.saved and ledger.saved[-1] >= {a for a, error in outcome.items() if error is None}


@pytest.mark.parametrize("callers", [1, 2])
def test_few_callers(callers: int) -> None:
    ledger = RecordingLedger()
    _run(ledger, callers)
    assert len(ledger.saved) >= 1
