"""Real `custody serve` processes (mutual TLS, write leases) and `custody project run --follow`
workers on one PostgreSQL schema, gRPC clients that retry with the same client ids, a killer,
and the checks: nothing acknowledged lost or doubled, one writer at a time, chains verify,
projections caught up and equal to a rebuild, one projection worker per projection at a time.

Used by tests/cluster/test_serve_cluster.py and bench/serve_campaign.py (plain code, no pytest).
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger import records
from ledger.api.certs import create_dev_pki
from ledger.api.client import CustodyClient, CustodyError, instruction
from ledger.checkpoint import generate_key
from ledger.config import Config
from ledger.lease import WriterInfo, lease_key, lookup_writer, writer_history
from ledger.store import LedgerStore, log_stream
from ledger.writer import verify_stored_chain
from projections.runner import LeaseInfo, ProjectionRunner, lease_rows

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CUSTODY = [sys.executable, "-c", "import sys; from ledger.cli import main; sys.exit(main())"]
CCY = "CNY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_for(cond: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)


def base_env(store_env: dict[str, str], shared: Path, poll_ms: int) -> dict[str, str]:
    """What every server and worker shares: the store, one signing key and one master key
    (servers take turns writing a platform, so they must sign and encrypt alike)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODY_", "POSTGRES_"))}
    env.update(store_env)
    shared.mkdir(parents=True, exist_ok=True)
    key = shared / "checkpoint.key"
    if not key.exists():
        generate_key(key)
    master = shared / "master.b64"
    if not master.exists():
        master.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    env.update(
        {
            "CUSTODY_SIGNING_KEY": str(key),
            "CUSTODY_MASTER_KEY": master.read_text().strip(),
            "CUSTODY_PROJECTIONS": "off",  # separate `custody project run --follow` workers
            "CUSTODY_RISK": "off",
            "CUSTODY_LEASE_POLL_MS": str(poll_ms),
            "CUSTODY_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
    )
    return env


def make_pki(out: Path, platforms: list[str]) -> Path:
    create_dev_pki(out, platforms=platforms)  # server certificate: localhost, 127.0.0.1, ::1
    return out


@dataclass
class Interval:
    """A stretch during which one process said it wrote a platform (from its own log)."""

    server_id: str
    platform: str
    start_ms: int
    end_ms: int | None


def _ts_ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


class Proc:
    """One child process; stderr (JSON log lines) and stdout go to files read on demand."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], out_dir: Path) -> None:
        self.name = name
        self.err = out_dir / f"{name}.err"
        self.out = out_dir / f"{name}.out"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=out_dir)
        self.started_ms = wall_ms()
        self.killed_at_ms: int | None = None
        self.stopped_at_ms: int | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> list[dict[str, Any]]:
        out = []
        text = self.err.read_text(errors="replace") if self.err.exists() else ""
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def kill(self) -> int:
        self.killed_at_ms = wall_ms()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return self.killed_at_ms

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.stopped_at_ms is None:
            self.stopped_at_ms = wall_ms()

    def died_unasked(self) -> str | None:
        if self.alive() or self.killed_at_ms is not None or self.stopped_at_ms is not None:
            return None
        return f"{self.name} exited {self.proc.returncode}: {self.err.read_text()[-3000:]}"


class ServerProc(Proc):
    def __init__(
        self, server_id: str, port: int, env: dict[str, str], out_dir: Path, pki: Path
    ) -> None:
        self.server_id = server_id
        self.port = port
        self.address = f"127.0.0.1:{port}"
        data = out_dir / server_id
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            *CUSTODY,
            "--data-dir",
            str(data),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tls-dir",
            str(pki),
            "--server-id",
            server_id,
            "--advertise",
            self.address,
        ]
        super().__init__(server_id, argv, {**env, "CUSTODY_SERVER_ID": server_id}, out_dir)

    def ready(self) -> bool:
        return any(str(r.get("message", "")).startswith("serving custody.v1") for r in self.log())

    def intervals(self, during_shutdown: bool = False) -> list[Interval]:
        """When it said it started and stopped writing each platform; an open stretch ends
        when the process was killed or stopped."""
        out: list[Interval] = []
        open_: dict[str, Interval] = {}
        for rec in self.log():
            msg = str(rec.get("message", ""))
            words = msg.split(" ")
            if msg.startswith("writing platform "):
                iv = Interval(self.server_id, words[2], _ts_ms(rec["ts"]), None)
                open_[words[2]] = iv
                out.append(iv)
            elif msg.startswith("no longer writing platform ") and words[4] in open_:
                open_.pop(words[4]).end_ms = _ts_ms(rec["ts"])
        end = self.killed_at_ms or self.stopped_at_ms
        for iv in open_.values():
            iv.end_ms = end
        return out


class WorkerProc(Proc):
    """`custody project run --follow`, named by CUSTODY_SERVER_ID (its lease session says so)."""

    def __init__(self, worker_id: str, env: dict[str, str], out_dir: Path) -> None:
        self.worker_id = worker_id
        argv = [*CUSTODY, "project", "run", "--follow"]
        super().__init__(worker_id, argv, {**env, "CUSTODY_SERVER_ID": worker_id}, out_dir)


class ServeCluster:
    """`size` server slots (a port each); a killed server is replaced on its port by a fresh
    process with a new id (`s<slot>-g<generation>`) and a fresh data folder."""

    def __init__(
        self,
        env: dict[str, str],
        config: Config,
        out_dir: Path,
        pki: Path,
        size: int = 3,
        ports: list[int] | None = None,
        slot_env: list[dict[str, str]] | None = None,
    ) -> None:
        """`ports`: the slots' ports (default: free ones); `slot_env`: what differs per slot
        (e.g. CUSTODY_STORE_NAME when a placement spreads platforms over databases)."""
        self.env = env
        self.config = config
        self.schema = config.postgres.get("POSTGRES_SCHEMA") or "public"
        self.out_dir = out_dir
        self.pki = pki
        self.ports = ports if ports is not None else [free_port() for _ in range(size)]
        self.slot_env = slot_env if slot_env is not None else [{} for _ in self.ports]
        assert len(self.slot_env) == len(self.ports)
        self.servers: dict[int, ServerProc] = {}
        self.retired: list[ServerProc] = []
        self.generation: Counter[int] = Counter()
        self.workers: dict[str, WorkerProc] = {}
        self.retired_workers: list[WorkerProc] = []
        self.store = LedgerStore(config)  # the harness's own view of the database
        self.shutdown_ms: int | None = None  # when `stop` began

    # -- servers --------------------------------------------------------------------------------

    def start_server(self, port: int) -> ServerProc:
        self.generation[port] += 1
        sid = f"s{self.ports.index(port)}-g{self.generation[port]}"
        env = {**self.env, **self.slot_env[self.ports.index(port)]}
        server = ServerProc(sid, port, env, self.out_dir, self.pki)
        self.servers[port] = server
        return server

    def start(self, timeout: float = 60.0) -> None:
        """The first server alone until it serves (on an empty schema it creates the tables:
        servers creating them at the same moment can fail with "tuple concurrently updated"),
        then the others together."""
        first, *rest = self.ports
        self.start_server(first)
        self.wait(self.servers[first].ready, timeout, "the first server ready")
        for port in rest:
            self.start_server(port)
        self.wait(lambda: all(s.ready() for s in self.servers.values()), timeout, "servers ready")

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        def check() -> bool:
            for proc in [*self.servers.values(), *self.workers.values()]:
                problem = proc.died_unasked()
                if problem:
                    raise AssertionError(problem)
            return cond()

        wait_for(check, timeout, what)

    def writer(self, platform: str, store: LedgerStore | None = None) -> WriterInfo | None:
        """The platform's writer row if some session holds its lease now (in `store`, by
        default the cluster's one)."""
        store = store or self.store
        schema = store.config.postgres.get("POSTGRES_SCHEMA") or "public"
        key = lease_key(self.config.ledger_id, schema, platform)
        info = lookup_writer(store.datastore, schema, key, platform)
        return info if info is not None and info.held else None

    def server_by_id(self, server_id: str) -> ServerProc | None:
        for s in self.servers.values():
            if s.server_id == server_id:
                return s
        return None

    def kill_writer(self, platform: str, timeout: float = 60.0) -> dict[str, Any]:
        """SIGKILL the platform's writer, start a replacement on its port, and wait until a
        live server holds every lease the killed one held. Failover = kill -> the new epoch's
        `since` (when the new writer announced itself, after taking the lease and catching up)."""

        def live_writer() -> bool:
            info = self.writer(platform)
            return info is not None and self.server_by_id(info.server_id) is not None

        self.wait(live_writer, timeout, f"a live writer of {platform}")
        info = self.writer(platform)
        assert info is not None
        victim = self.server_by_id(info.server_id)
        assert victim is not None and victim.alive()
        written = {
            p: w.epoch
            for p in self.platforms()
            if (w := self.writer(p)) is not None and w.server_id == victim.server_id
        }
        killed_at = victim.kill()
        self.retired.append(victim)
        self.start_server(victim.port)
        new: dict[str, WriterInfo] = {}

        def taken() -> bool:
            for p, epoch in written.items():
                w = self.writer(p)
                if w is not None and w.epoch > epoch and self.server_by_id(w.server_id):
                    new[p] = w
            return len(new) == len(written)

        self.wait(taken, timeout, f"new writers for {sorted(written)}")
        return {
            "killed": victim.server_id,
            "at_ms": killed_at,
            "failover_ms": {p: w.since_ms - killed_at for p, w in new.items()},
            "new_writer": {p: w.server_id for p, w in new.items()},
        }

    def platforms(self) -> list[str]:
        return sorted(self.store.platform_ids())

    def intervals(self, during_shutdown: bool = False) -> list[Interval]:
        """Every writing stretch that began before shutdown. During shutdown servers stop one
        after the other and hand their platforms on; a stopped server's stretch ends when its
        process has exited (after it released its leases), so a successor's stretch that began
        then would look like an overlap that is only the end time being late."""
        cut = self.shutdown_ms
        return [
            iv
            for s in [*self.retired, *self.servers.values()]
            for iv in s.intervals()
            if cut is None or iv.start_ms < cut or during_shutdown
        ]

    # -- projection workers ---------------------------------------------------------------------

    def start_worker(self, worker_id: str) -> WorkerProc:
        worker = WorkerProc(worker_id, self.env, self.out_dir)
        self.workers[worker_id] = worker
        return worker

    def leases(self) -> list[LeaseInfo]:
        runner = ProjectionRunner(self.store)
        runner.ensure_tables()  # the workers may not have created them yet
        return lease_rows(runner.db)

    def kill_lease_holder(self, replacement: str, timeout: float = 60.0) -> dict[str, Any]:
        """SIGKILL the worker holding the most projection leases, start `replacement`, and
        wait until every lease it held is held by a live worker at a later epoch."""
        self.wait(
            lambda: any(r.worker in self.workers for r in self.leases()),
            timeout,
            "a projection lease holder",
        )
        held = self.leases()
        counts = Counter(r.worker for r in held if r.worker in self.workers)
        victim_id = counts.most_common(1)[0][0]
        victim = self.workers.pop(victim_id)
        mine = {(r.name, r.platform): r.epoch for r in held if r.worker == victim_id}
        killed_at = victim.kill()
        self.retired_workers.append(victim)
        self.start_worker(replacement)

        def taken() -> bool:
            now = {(r.name, r.platform): r for r in self.leases()}
            return all(now[k].epoch > e and now[k].worker in self.workers for k, e in mine.items())

        self.wait(taken, timeout, f"workers to take over {sorted(mine)}")
        now = {(r.name, r.platform): r for r in self.leases()}
        return {
            "killed": victim_id,
            "at_ms": killed_at,
            "taken_by": sorted({now[k].worker for k in mine}),
            "takeover_ms": max(now[k].since_ms - killed_at for k in mine),
        }

    def projections_at_head(self) -> bool:
        runner = ProjectionRunner(self.store)
        rows = runner.status()
        return bool(rows) and all(s.lag == 0 for s in rows)

    # -- shutdown -------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.shutdown_ms is None:
            self.shutdown_ms = wall_ms()
        for proc in [*self.workers.values(), *self.servers.values()]:
            proc.stop()

    def close(self) -> None:
        self.stop()
        self.store.close()


# -- clients --------------------------------------------------------------------------------------


@dataclass
class Ack:
    platform: str
    status: str
    seq: int
    address: str  # the server that answered
    at_ms: int


@dataclass
class ClientStats:
    acks: dict[str, Ack] = field(default_factory=dict)
    retries: int = 0
    errors: list[str] = field(default_factory=list)  # the first few retryable ones
    fatal: list[str] = field(default_factory=list)  # anything not retryable: a test failure


class LoadClient(threading.Thread):
    """Sends SubmitBatch requests of `batch` transfers (alice -> bob, 1 minor unit each, unique
    client ids) for one platform through CustodyClient (mutual TLS, follows WRITER_ELSEWHERE);
    a retryable failure is retried with the same client ids, from another server."""

    def __init__(
        self,
        name: str,
        addresses: list[str],
        pki: Path,
        platform: str,
        batch: int,
        stop: threading.Event,
        seed: int,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.addresses = addresses
        self.platform = platform
        self.batch = batch
        self.stop_event = stop
        self.rng = random.Random(seed)
        self.stats = ClientStats()
        self.client = CustodyClient.mtls(
            self.rng.choice(addresses),
            pki / "ca.pem",
            pki / f"platform-{platform}.pem",
            pki / f"platform-{platform}.key",
            platform_id=platform,
            timeout_s=10.0,
            retries=2,
            backoff_s=0.05,
        )

    def run(self) -> None:
        n = 0
        try:
            while not self.stop_event.is_set() and not self.stats.fatal:
                self.send_until_acked([f"{self.name}-{n}-{k}" for k in range(self.batch)])
                n += 1
        except Exception as exc:  # recorded: the test fails on it
            self.stats.fatal.append(repr(exc))
        finally:
            self.client.close()

    def send_until_acked(self, cids: list[str]) -> None:
        items = [
            instruction(
                "transfer",
                client_id=cid,
                from_account_id="alice",
                to_account_id="bob",
                amount_minor=1,
                currency=CCY,
            )
            for cid in cids
        ]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                results = self.client.submit_batch(items)
            except CustodyError as exc:
                if not exc.retryable:
                    self.stats.fatal.append(f"{self.client.target}: {exc}")
                    return
                self.stats.retries += 1
                if len(self.stats.errors) < 20:
                    self.stats.errors.append(f"{self.client.target}: {exc.reason}")
                # nothing is known to have happened: same ids, from another server
                self.client.use_target(self.rng.choice(self.addresses))
                time.sleep(0.05)
                continue
            now = wall_ms()
            for cid, r in zip(cids, results, strict=True):
                if r.client_id != cid or r.status not in ("accepted", "replayed"):
                    self.stats.fatal.append(f"{cid}: {r}")
                    return
                self.stats.acks[cid] = Ack(
                    self.platform, r.status, r.position, self.client.target, now
                )
            return
        self.stats.fatal.append(f"batch {cids[0]} never acknowledged")


# -- checks ---------------------------------------------------------------------------------------


@dataclass
class Findings:
    acknowledged: int
    found: int
    lost: list[str]
    duplicates: list[str]
    misplaced: list[str]
    outside_epoch: list[str]
    overlaps: list[str]
    epochs_ok: bool
    chains: dict[str, tuple[int, int | None, str]]
    history: dict[str, list[WriterInfo]]
    records: dict[str, int]

    @property
    def chains_ok(self) -> bool:
        return all(bad is None for _, bad, _ in self.chains.values())

    @property
    def clean(self) -> bool:
        return (
            not (self.lost or self.duplicates or self.misplaced or self.outside_epoch)
            and not self.overlaps
            and self.epochs_ok
            and self.chains_ok
        )


def check_ledger(cluster: ServeCluster, acks: dict[str, Ack]) -> Findings:
    """Hold every platform's log against what the clients were told and the writers' record."""
    store, schema = cluster.store, cluster.schema
    count: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], int] = {}
    chains: dict[str, tuple[int, int | None, str]] = {}
    history: dict[str, list[WriterInfo]] = {}
    sizes: dict[str, int] = {}
    for platform in cluster.platforms():
        chains[platform] = verify_stored_chain(store, platform)
        history[platform] = writer_history(store.datastore, schema, platform)
        n = 0
        for seq, kind, packed in store.iter_rows(log_stream(platform)):
            n += 1
            if kind != records.REFUSED_KIND:  # a client id is consumed only if accepted
                cid = records.decode(records.unpack_state(packed)[1])["cid"]
                count[platform, cid] += 1
                where[platform, cid] = seq
        sizes[platform] = n
    lost = [cid for cid, a in acks.items() if count[a.platform, cid] == 0]
    misplaced = [cid for cid, a in acks.items() if where.get((a.platform, cid), a.seq) != a.seq]
    outside = []
    for cid, a in acks.items():
        if a.status != "accepted":
            continue  # a replay names the position an earlier writer gave it
        owner = None
        for info in history[a.platform]:
            if info.from_seq <= a.seq:
                owner = info
        # the server that answered "accepted" must be the writer of the epoch holding it
        if owner is None or owner.address != a.address:
            outside.append(f"{cid}@{a.seq} via {a.address}, epoch owner {owner}")
    epochs_ok = all(
        [h.epoch for h in hs] == list(range(1, len(hs) + 1))
        and all(x.from_seq <= y.from_seq for x, y in itertools.pairwise(hs))
        for hs in history.values()
    )
    return Findings(
        acknowledged=len(acks),
        found=sum(1 for cid, a in acks.items() if count[a.platform, cid] == 1),
        lost=lost,
        duplicates=[f"{p}/{cid}" for (p, cid), n in count.items() if n > 1],
        misplaced=misplaced,
        outside_epoch=outside,
        overlaps=overlapping(cluster.intervals()),
        epochs_ok=epochs_ok,
        chains=chains,
        history=history,
        records=sizes,
    )


def overlapping(intervals: list[Interval]) -> list[str]:
    """Pairs of processes whose own logs say they wrote one platform at the same time."""
    bad = []
    by_platform: dict[str, list[Interval]] = {}
    for iv in intervals:
        by_platform.setdefault(iv.platform, []).append(iv)
    for platform, ivs in by_platform.items():
        ivs.sort(key=lambda iv: iv.start_ms)
        for x, y in itertools.pairwise(ivs):
            if x.end_ms is None or x.end_ms > y.start_ms:
                bad.append(
                    f"{platform}: {x.server_id} until {x.end_ms}, {y.server_id} from {y.start_ms}"
                )
    return bad


@dataclass
class ProjectionFindings:
    at_head: bool
    equal_to_rebuild: dict[str, bool]
    history: list[LeaseInfo]
    one_at_a_time: list[str]  # problems found in the lease history (empty: fine)


def check_projections(cluster: ServeCluster) -> ProjectionFindings:
    """After the workers stopped: read models at the head, equal to a rebuild from zero, and a
    lease history in which each (projection, platform) passed from worker to worker with
    consecutive epochs, each starting where the last stopped or later, never going back."""
    runner = ProjectionRunner(cluster.store)
    at_head = all(s.lag == 0 for s in runner.status())
    history = lease_rows(runner.db, history=True)
    problems = []
    by_key: dict[tuple[str, str], list[LeaseInfo]] = {}
    for h in history:
        by_key.setdefault((h.name, h.platform), []).append(h)
    for key, hs in by_key.items():
        if [h.epoch for h in hs] != list(range(1, len(hs) + 1)):
            problems.append(f"{key}: epochs {[h.epoch for h in hs]}")
        if any(x.from_position > y.from_position for x, y in itertools.pairwise(hs)):
            problems.append(f"{key}: a takeover went back: {[h.from_position for h in hs]}")
        if any(x.since_ms > y.since_ms for x, y in itertools.pairwise(hs)):
            problems.append(f"{key}: takeovers out of order")
    digests = {p: runner.digest(p) for p in cluster.platforms()}
    runner.rebuild()
    equal = {p: runner.digest(p) == d for p, d in digests.items()}
    runner.close()
    return ProjectionFindings(at_head, equal, history, problems)


def prepare_platforms(config: Config, platforms: list[str], funds: int) -> None:
    """Create the platforms (bookkeeping policy: no customer signatures; alice funded)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from helpers import deposit, make_platform, ok

    from ledger.service import LedgerService

    service = LedgerService(config, lease=False)
    service.start()
    try:
        for platform in platforms:
            p = make_platform(service, platform)
            ok(service, platform, deposit(p, f"fund-{platform}", "alice", funds))
    finally:
        service.close()


def throughput(
    acks: dict[str, Ack], kills: list[int], window_ms: int = 5000, bucket_ms: int = 250
) -> tuple[float, float]:
    """(steady, around kills) acknowledgements per second: 250 ms buckets; 'around' is the
    `window_ms` after each kill, steady is the rest (first and last second left out)."""
    per: Counter[int] = Counter(a.at_ms // bucket_ms for a in acks.values())
    if not per:
        return 0.0, 0.0
    first, last = min(per), max(per)
    around: set[int] = set()
    for at in kills:
        around.update(range(at // bucket_ms, (at + window_ms) // bucket_ms))
    edge = 1000 // bucket_ms
    scale = 1000 / bucket_ms
    steady = [per[b] * scale for b in range(first + edge, last - edge) if b not in around]
    during = [per[b] * scale for b in range(first, last + 1) if b in around]
    return (
        sum(steady) / len(steady) if steady else 0.0,
        sum(during) / len(during) if during else 0.0,
    )
