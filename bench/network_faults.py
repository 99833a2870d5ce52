"""Network-fault campaign: ledger servers under load while their PostgreSQL connections are
dropped, stalled or cut mid-answer, and while a (private) PostgreSQL restarts.

What it does. Two server processes (tests/cluster/cluster_node.py) write two platforms on one
schema; client threads send batches of 1-unit transfers with unique client ids, follow
WRITER_ELSEWHERE redirects and retry a batch with the SAME ids after any retryable error until
it is acknowledged. Then, round after round, it injects every fault kind:

  proxy phase: each server reaches the shared PostgreSQL (127.0.0.1:5432, a fresh schema,
  dropped afterwards) through its own loopback TCP proxy (tests/cluster/faults.py):
    drop-writer-fin    every connection of the writing server closed (FIN)
    drop-all-rst       every connection of both servers reset (RST)
    stall-writer       the writing server's bytes held --stall-s, then released
    stall-all          both servers' bytes held --stall-s
    stall-writer-long  held --long-stall-s: longer than the lease timeout (max(3 x poll, 2 s)),
                       so the writer's watchdog must fence it
    answers-lost       PostgreSQL's answers held --stall-s while it works on, then RST: commits
                       land that their sender never hears about (outcome unknown)
    partition-writer   the writing server's bytes held until the OTHER server writes its
                       platform (PostgreSQL ends the silent lease session after 2 x the lease
                       timeout; at most --partition-max-s): 'takeover' below is that time
  restart phase: a PRIVATE PostgreSQL 15 (initdb in a temporary folder, run as user postgres on
  a free port; never the shared server) that the servers use directly:
    restart-fast       pg_ctl restart -m fast (sessions terminated, clean shutdown)
    restart-immediate  pg_ctl restart -m immediate (like a crash: WAL recovery)

What it prints. Faults injected per kind with the time to recover after each (from the end of
the fault until EVERY client has had an acknowledgement again: median, max); movements
acknowledged vs found in the log; duplicates (client ids stored twice: must be 0); wrong
answers (an answer no correct server gives: a refusal of a valid transfer, `replayed` on a
first attempt, an acknowledgement not in the log or at another position: must be 0); errors
clients saw by kind (each must be retryable: UNAVAILABLE / ABORTED / RESOURCE_EXHAUSTED /
DEADLINE_EXCEEDED in ledger/api/errors.py); throughput (acknowledged transfers per second)
during faults (fault start to recovery) vs outside them; how often servers gave up and took
write roles. Exits 1 if anything acknowledged is missing, duplicated, misplaced or contradicted,
or a client saw a non-retryable error.

    /work/venv/bin/python bench/network_faults.py --rounds 5
    /work/venv/bin/python bench/network_faults.py --rounds 3 --kinds stall-writer-long,answers-lost
    /work/venv/bin/python bench/network_faults.py --rounds 10 --poll-ms 1000 --no-restart

Timing depends on the machine's load: quote figures with the command and `uptime`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from cluster_harness import Cluster, check_log, prepare_platforms  # noqa: E402
from faults import (  # noqa: E402
    Answers,
    Fault,
    FaultClient,
    FaultProxy,
    PrivatePostgres,
    ProxiedCluster,
    StallUntil,
    answers_lost,
    drop_all,
    initdb_unavailable,
    inject,
    merged,
    proxies_for,
    retryable,
    role_changes,
    stall_for,
    wait_recovered,
)
from helpers import pg_env  # noqa: E402

from ledger.config import Config  # noqa: E402

PROXY_KINDS = (
    "drop-writer-fin",
    "drop-all-rst",
    "stall-writer",
    "stall-all",
    "stall-writer-long",
    "answers-lost",
    "partition-writer",
)
RESTART_KINDS = ("restart-fast", "restart-immediate")


def _proxy_faults(
    cluster: ProxiedCluster,
    proxies: list[FaultProxy],
    args: argparse.Namespace,
    partition: StallUntil,
) -> dict[str, Callable[[], None]]:
    def writer() -> list[FaultProxy]:
        return cluster.writer_proxies("p1")

    def both() -> list[FaultProxy]:
        return proxies

    return {
        "drop-writer-fin": drop_all(writer, rst=False),
        "drop-all-rst": drop_all(both, rst=True),
        "stall-writer": stall_for(writer, args.stall_s),
        "stall-all": stall_for(both, args.stall_s),
        "stall-writer-long": stall_for(writer, args.long_stall_s),
        "answers-lost": answers_lost(writer, args.stall_s),
        "partition-writer": partition,
    }


def _campaign(
    cluster: Cluster,
    faults_by_kind: dict[str, Callable[[], object]],
    kinds: list[str],
    args: argparse.Namespace,
    platforms: list[str],
) -> tuple[list[FaultClient], list[Fault], float, float]:
    """Start the servers and clients, inject `kinds` round after round; returns the clients,
    the faults and the load's start and end (monotonic)."""
    stop = threading.Event()
    clients = [
        FaultClient(f"c{i}", cluster.ports, platforms, args.batch, stop, seed=args.seed + i)
        for i in range(args.clients)
    ]
    faults: list[Fault] = []
    try:
        cluster.start()
        for client in clients:
            client.start()
        began = time.monotonic()
        if wait_recovered(clients, began, 60) is None:
            raise SystemExit("the servers never served the clients")
        time.sleep(args.gap_s)
        for round_no in range(args.rounds):
            for kind in kinds:
                fault = inject(clients, kind, faults_by_kind[kind], args.recovery_timeout_s)
                faults.append(fault)
                took = "never" if fault.recovery_s is None else f"{fault.recovery_s * 1000:.0f} ms"
                print(f"  round {round_no + 1} {kind}: recovered after {took}", flush=True)
                time.sleep(args.gap_s)
        ended = time.monotonic()
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=300)
        cluster.stop()
    return clients, faults, began, ended


def _report(
    title: str,
    config: Config,
    cluster: Cluster,
    clients: list[FaultClient],
    faults: list[Fault],
    span: tuple[float, float],
    platforms: list[str],
) -> bool:
    answers: Answers = merged(clients)
    findings = check_log(config, platforms, answers.acks)
    chain_ok = all(findings.chain[p][1] is None for p in platforms)
    wrong = len(answers.wrong) + len(findings.misplaced) + len(findings.lost)
    not_retryable = {k: n for k, n in answers.errors.items() if not retryable(k)}
    failed_clients = [f"{c.name}: {c.failed!r}" for c in clients if c.failed is not None]
    print(f"\n== {title}")
    print("faults injected, and time to recover after each (ms, fault end -> every client served)")
    by_kind: dict[str, list[Fault]] = {}
    for fault in faults:
        by_kind.setdefault(fault.kind, []).append(fault)
    for kind, group in by_kind.items():
        times = [f.recovery_s * 1000 for f in group if f.recovery_s is not None]
        never = sum(f.recovery_s is None for f in group)
        median = f"{statistics.median(times):.0f}" if times else "-"
        most = f"{max(times):.0f}" if times else "-"
        print(f"  {kind:18} {len(group):3}  median {median:>6}  max {most:>6}  never {never}")
    replayed = sum(ack.status == "replayed" for ack in answers.acks.values())
    print(
        f"acknowledged {findings.acknowledged}, found exactly once {findings.found} "
        f"(acknowledged as replayed: {replayed}, a retry of a group whose commit had landed)"
    )
    print(
        f"lost {len(findings.lost)}, duplicates {len(findings.duplicates)}, misplaced "
        f"{len(findings.misplaced)}, outside their writer's epoch {len(findings.outside_epoch)}"
    )
    print(
        f"wrong answers {wrong} (answers {len(answers.wrong)}, lost/misplaced acks "
        f"{len(findings.lost) + len(findings.misplaced)})"
    )
    print(f"chains verify: {chain_ok} {dict((p, findings.chain[p][0]) for p in platforms)}")
    print(
        f"errors seen by clients: {dict(answers.errors)}; not retryable: {not_retryable}; "
        f"client->server transport errors {answers.transport}"
    )
    print(f"write roles: {dict(role_changes(cluster))}")
    began, ended = span
    windows = [(f.began, f.recovered if f.recovered is not None else f.ended) for f in faults]
    in_fault = sum(1 for t in answers.ack_times if any(a <= t <= b for a, b in windows))
    fault_s = sum(b - a for a, b in windows)
    outside = sum(1 for t in answers.ack_times if began <= t <= ended) - in_fault
    outside_s = max(ended - began - fault_s, 1e-9)
    print(
        f"throughput: during faults {in_fault / max(fault_s, 1e-9):.0f}/s over {fault_s:.1f} s, "
        f"outside {outside / outside_s:.0f}/s over {outside_s:.1f} s"
    )
    if failed_clients:
        print(f"clients failed: {failed_clients}")
    return (
        wrong == 0
        and not findings.duplicates
        and not findings.outside_epoch
        and chain_ok
        and not not_retryable
        and not failed_clients
        and findings.found == findings.acknowledged
        and all(f.recovered is not None for f in faults)
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="times each fault kind is injected")
    parser.add_argument(
        "--kinds",
        default=",".join(PROXY_KINDS + RESTART_KINDS),
        help="comma-separated fault kinds to inject (default: all)",
    )
    parser.add_argument("--no-restart", action="store_true", help="skip the restart phase")
    parser.add_argument("--poll-ms", type=int, default=200, help="CUSTODY_LEASE_POLL_MS")
    parser.add_argument("--clients", type=int, default=6, help="client threads")
    parser.add_argument("--batch", type=int, default=5, help="transfers per request")
    parser.add_argument("--stall-s", type=float, default=1.0, help="a short stall")
    parser.add_argument(
        "--long-stall-s", type=float, default=4.0, help="a stall past the lease timeout"
    )
    parser.add_argument(
        "--partition-max-s", type=float, default=30.0, help="longest partition-writer stall"
    )
    parser.add_argument("--gap-s", type=float, default=1.0, help="load between faults")
    parser.add_argument("--recovery-timeout-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(PROXY_KINDS + RESTART_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}")
    platforms = ["p1", "p2"]
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs; {vars(args)}")
    ok = True
    proxy_kinds = [k for k in kinds if k in PROXY_KINDS]
    if proxy_kinds:
        with tempfile.TemporaryDirectory() as tmp, pg_env(Path(tmp)) as store_env:
            env = {**store_env, "CUSTODY_LEASE_POLL_MS": str(args.poll_ms)}
            config = Config.from_env(env)
            prepare_platforms(config, platforms, funds=10**12)
            with proxies_for(("127.0.0.1", 5432), 2) as proxies:
                cluster = ProxiedCluster(env, Path(tmp), proxies)
                partition = StallUntil(
                    lambda: cluster.writer_proxies("p1"),
                    cluster.taken_over("p1"),
                    args.partition_max_s,
                )
                by_kind = _proxy_faults(cluster, proxies, args, partition)
                print("proxy phase (shared PostgreSQL through loopback proxies)")
                clients, faults, began, ended = _campaign(
                    cluster, dict(by_kind), proxy_kinds, args, platforms
                )
                dropped = sum(p.dropped for p in proxies)
            if partition.took_s:
                print(
                    f"partition-writer: taken over {sum(partition.met)} of {len(partition.met)} "
                    f"within {args.partition_max_s} s; takeover s median "
                    f"{statistics.median(partition.took_s):.2f} max {max(partition.took_s):.2f}"
                )
                ok &= all(partition.met)
            ok &= _report(
                f"proxy faults (connections dropped by the proxies: {dropped})",
                config,
                cluster,
                clients,
                faults,
                (began, ended),
                platforms,
            )
    restart_kinds = [k for k in kinds if k in RESTART_KINDS and not args.no_restart]
    if restart_kinds:
        reason = initdb_unavailable()
        if reason is not None:
            print(f"restart phase skipped: {reason}")
        else:
            with tempfile.TemporaryDirectory() as tmp, PrivatePostgres.create() as pg:
                schema = "custody_" + uuid.uuid4().hex[:8]
                env = {
                    **pg.env(schema),
                    "CUSTODY_DATA_DIR": tmp,
                    "CUSTODY_LEASE_POLL_MS": str(args.poll_ms),
                }
                config = Config.from_env(env)
                prepare_platforms(config, platforms, funds=10**12)
                direct = Cluster(env, Path(tmp), size=2)
                restart_faults: dict[str, Callable[[], object]] = {
                    "restart-fast": lambda: pg.restart("fast"),
                    "restart-immediate": lambda: pg.restart("immediate"),
                }
                print(f"restart phase (private PostgreSQL on port {pg.port})")
                clients, faults, began, ended = _campaign(
                    direct, restart_faults, restart_kinds, args, platforms
                )
                ok &= _report(
                    f"PostgreSQL restarts {dict(Counter(pg.restarts))}",
                    config,
                    direct,
                    clients,
                    faults,
                    (began, ended),
                    platforms,
                )
    print(f"\nload average {os.getloadavg()}")
    print("OK" if ok else "FAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
