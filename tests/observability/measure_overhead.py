"""Cost of the metric hooks on the write path and the call gate (CPU time, best of 7 trials).

    python tests/observability/measure_overhead.py

`observe_commit` runs once per committed group (PlatformWriter.commit) with every outcome of
the group; `rpc_done` once per custody.v1 call. Prints ns per instruction for several group
sizes, the all-accepted case and one with 10 % refusals.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ledger import metrics
from ledger.writer import Outcome


def best(fn: Callable[[], object], reps: int, trials: int = 7) -> float:
    """Seconds of CPU per call, the best of `trials` runs of `reps` calls."""
    runs = []
    for _ in range(trials):
        start = time.process_time()
        for _ in range(reps):
            fn()
        runs.append((time.process_time() - start) / reps)
    return min(runs)


def main() -> None:
    for n in (1, 32, 1000, 8192):
        answers = [[Outcome(f"c{i}", "accepted", seq=i, kind="transferred")] for i in range(n)]
        per = best(lambda a=answers: metrics.observe_commit(a, 0.001), max(20, 100_000 // n))  # type: ignore[misc]
        print(
            f"observe_commit, group of {n:5d}: {per * 1e6:8.2f} us = {per / n * 1e9:7.1f} ns/instr"
        )
    mixed = [
        [
            Outcome(f"c{i}", "refused", code="INSUFFICIENT_FUNDS")
            if i % 10 == 0
            else Outcome(f"c{i}", "accepted")
            for i in range(1000)
        ]
    ]
    per = best(lambda: metrics.observe_commit(mixed, 0.001), 100)
    print(f"observe_commit, 1000 with 10% refused: {per / 1000 * 1e9:7.1f} ns/instr")
    per = best(lambda: metrics.rpc_done("MovementService/Transfer", "OK", 0.001), 20_000)
    print(f"rpc_done: {per * 1e6:.2f} us per call")


if __name__ == "__main__":
    main()
