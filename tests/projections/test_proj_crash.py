"""SIGKILL a projecting process mid-batch: after a restart the read models equal a clean run."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FakeClock, last_position, subprocess_env
from proj_workload import run_workload

from ledger.service import LedgerService
from projections.runner import ProjectionRunner

CHILD = Path(__file__).resolve().parent / "proj_crash_child.py"


def _spawn(store_env: dict[str, str], stop_at: int, marker: Path) -> subprocess.Popen[bytes]:
    marker.unlink(missing_ok=True)
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(stop_at), str(marker)],
        env=subprocess_env(store_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(marker: Path, child: subprocess.Popen[bytes], text: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text() in (text, "done"):
            return
        if child.poll() is not None:
            _, err = child.communicate()
            pytest.fail(f"child exited {child.returncode}: {err.decode()[-2000:]}")
        time.sleep(0.01)
    child.kill()
    pytest.fail(f"child never reported {text!r}")


def _reference_digest(service: LedgerService) -> str:
    reference = ProjectionRunner(service.store)
    reference.rebuild("p1")
    return reference.digest("p1")


def test_sigkill_inside_the_transaction_loses_the_batch_only(
    service: LedgerService, clock: FakeClock, store_env: dict[str, str], tmp_path: Path
) -> None:
    run_workload(service, clock, 300)
    last = last_position(service, "p1")
    marker = tmp_path / "marker"
    child = _spawn(store_env, 5, marker)
    _wait_for(marker, child, "in transaction")
    child.send_signal(signal.SIGKILL)
    child.wait()
    # the fifth batch's statement rows and position never committed; the first four did
    runner = ProjectionRunner(service.store, batch_size=17)
    positions = {s.name: s.position for s in runner.status("p1")}
    assert positions["statements"] == 4 * 17 - 1
    if runner.db.is_pg:  # each projection commits on its own: the audit trail's fifth may have
        assert positions["audit"] in (4 * 17 - 1, 5 * 17 - 1)
    else:  # one transaction for both
        assert positions["audit"] == 4 * 17 - 1
    runner.catch_up("p1")
    assert runner.status("p1")[0].position == last
    recovered = runner.digest("p1")
    assert recovered == _reference_digest(service)


def test_sigkill_at_random_moments_then_resume(
    service: LedgerService, clock: FakeClock, store_env: dict[str, str], tmp_path: Path
) -> None:
    run_workload(service, clock, 600, seed=3)
    marker = tmp_path / "marker"
    rnd = random.Random(11)
    kills = 0
    for _ in range(12):
        child = _spawn(store_env, 0, marker)
        _wait_for(marker, child, "started")
        time.sleep(rnd.uniform(0.0, 0.1))
        child.send_signal(signal.SIGKILL)
        child.wait()
        kills += marker.read_text() != "done"  # killed before it had finished
        if kills == 3:
            break
    assert kills >= 1
    runner = ProjectionRunner(service.store, batch_size=17)
    runner.catch_up("p1")
    assert runner.digest("p1") == _reference_digest(service)
