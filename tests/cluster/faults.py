"""Network faults between ledger servers and PostgreSQL, on loopback: a TCP proxy that can drop
or stall every connection it carries, a private PostgreSQL that can be restarted under load, and
clients that hold every answer they get against the log afterwards.

Used by tests/cluster/test_network_faults.py and bench/network_faults.py. Plain classes (no
pytest). The shared PostgreSQL on 5432 is never touched beyond the schema a test creates: the
proxy only forwards to it, and restarts happen on a private instance this module starts.

    proxy = FaultProxy(("127.0.0.1", 5432)); proxy.start()   # servers connect to proxy.port
    proxy.drop(rst=True)      # every carried connection closed abruptly (RST to both sides)
    proxy.stall(); ...; proxy.resume()   # nothing forwarded meanwhile, then everything flows
    proxy.stall(TO_SERVER)    # PostgreSQL works on, its answers wait (commits land unconfirmed)

    with PrivatePostgres.create() as pg:   # initdb (as user postgres) in /tmp, a free port
        pg.restart("immediate")            # stopped and removed on exit, whatever happened
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from cluster_harness import Ack, Cluster, Node, call_node

from ledger.api.errors import from_exception
from ledger.lease import WriterElsewhere
from ledger.service import Overloaded, ServiceClosed
from ledger.writer import CommitFailed, CommitOutcomeUnknown, StoreUnavailable, WriterFenced

CHUNK_MAX: Final = 64 * 1024  # bytes read at once per direction: the proxy's whole buffer
PG_BIN: Final = Path("/usr/lib/postgresql/15/bin")
PG_OS_USER: Final = "postgres"  # initdb refuses root: the private cluster runs as this user
_START_TIMEOUT_S: Final = 60
BOTH: Final = "both"
TO_POSTGRES: Final = "to-postgres"  # the server's queries
TO_SERVER: Final = "to-server"  # PostgreSQL's answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the proxy ----------------------------------------------------------------------------------


class _Pair:
    """One proxied connection: the server's side and PostgreSQL's side."""

    def __init__(self, down: asyncio.StreamWriter, up: asyncio.StreamWriter) -> None:
        self.down = down
        self.up = up
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self, rst: bool) -> None:
        for writer in (self.down, self.up):
            transport = writer.transport
            if rst:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):  # linger 0: close() sends RST, not FIN
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
            transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """A TCP proxy on 127.0.0.1:<free port> in front of `target`, run by its own event loop thread.

    Buffers are bounded: each direction of each connection holds at most one read of CHUNK_MAX
    bytes; while stalled the proxy reads nothing more, so the senders' TCP windows fill and they
    block exactly as on a stalled network (nothing is lost or reordered, only delayed). New
    connections are accepted while stalled, and stall too. `drop` closes every connection it
    carries at once, both sides, with FIN or (rst=True) RST; later connections work normally.
    """

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"proxy-{self.port}", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._flowing: dict[str, asyncio.Event] = {}
        self._pairs: set[_Pair] = set()
        self._ready = threading.Event()
        self.accepted = 0  # connections accepted since start
        self.dropped = 0  # connections closed by `drop`
        self.stalled = False

    # thread-safe API ------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    @property
    def active(self) -> int:
        """Connections carried right now."""
        count: int = self._call(lambda: len(self._pairs))
        return count

    def drop(self, rst: bool = False) -> int:
        """Close every carried connection abruptly; returns how many were closed."""

        def act() -> int:
            pairs = list(self._pairs)
            self._pairs.clear()
            for pair in pairs:
                pair.abort(rst)
            self.dropped += len(pairs)
            return len(pairs)

        count: int = self._call(act)
        return count

    def stall(self, direction: str = BOTH) -> None:
        """Stop forwarding bytes (connections stay open): both ways, or only TO_POSTGRES
        (queries wait) or only TO_SERVER (PostgreSQL works, its answers wait: a COMMIT then
        lands while its sender cannot know)."""
        assert direction in (BOTH, TO_POSTGRES, TO_SERVER)

        def act() -> None:
            for name in (TO_POSTGRES, TO_SERVER):
                if direction in (BOTH, name):
                    self._flowing[name].clear()
            self.stalled = True

        self._call(act)

    def resume(self) -> None:
        def act() -> None:
            for event in self._flowing.values():
                event.set()
            self.stalled = False

        self._call(act)

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for pair in list(self._pairs):
                pair.abort(rst=False)
            self._pairs.clear()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the loop's side --------------------------------------------------------------------------

    def _call(self, fn: Any) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def boot() -> None:
            self._flowing = {TO_POSTGRES: asyncio.Event(), TO_SERVER: asyncio.Event()}
            for event in self._flowing.values():
                event.set()
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )
            self._ready.set()

        self._loop.run_until_complete(boot())
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.target, limit=CHUNK_MAX)
        except OSError:
            down_w.transport.abort()  # the database is down: so is the proxied connection
            return
        pair = _Pair(down_w, up_w)
        self._pairs.add(pair)
        pair.tasks = [
            asyncio.ensure_future(self._pump(down_r, up_w, pair, self._flowing[TO_POSTGRES])),
            asyncio.ensure_future(self._pump(up_r, down_w, pair, self._flowing[TO_SERVER])),
        ]

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: _Pair,
        flowing: asyncio.Event,
    ) -> None:
        try:
            while True:
                await flowing.wait()  # a stall holds the data before it is read...
                data = await reader.read(CHUNK_MAX)
                if not data:
                    break
                await flowing.wait()  # ...or after (a read that began before the stall)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        # one side closed (or failed): close both, as a real connection would end
        if pair in self._pairs:
            self._pairs.discard(pair)
            pair.abort(rst=False)


# -- a private PostgreSQL -----------------------------------------------------------------------


def initdb_unavailable() -> str | None:
    """Why a private PostgreSQL cannot be created here, or None when it can."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).exists():
            return f"{PG_BIN / tool} not found (PostgreSQL 15 server binaries)"
    if shutil.which("runuser") is None and os.geteuid() == 0:
        return "runuser not found: cannot run initdb as a non-root user"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            return f"no OS user {PG_OS_USER!r} to run initdb as"
    return None


def _as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_OS_USER, "--", *args]
    return args


@dataclass
class PrivatePostgres:
    """A PostgreSQL 15 cluster of our own in a temporary folder, on a free loopback port.

    It exists so that restarts (`pg_ctl restart -m fast|immediate`) never touch the shared
    server. `stop` (also on `__exit__`, whatever happened) stops it and removes the folder.
    """

    root: Path
    port: int
    restarts: Counter[str] = field(default_factory=Counter)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    @classmethod
    def create(cls, parent: Path | None = None) -> PrivatePostgres:
        """initdb (as user postgres when run as root) in a new folder under `parent` (default:
        the system's temporary folder), then start it."""
        reason = initdb_unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        root = Path(tempfile.mkdtemp(prefix="custody-pg-", dir=parent))
        if os.geteuid() == 0:
            shutil.chown(root, PG_OS_USER, PG_OS_USER)  # `parent` must let that user through
        pg = cls(root, free_port())
        try:
            subprocess.run(
                _as_postgres(
                    [
                        str(PG_BIN / "initdb"),
                        "-D",
                        str(pg.data),
                        "-A",
                        "trust",
                        "-U",
                        "postgres",
                        "--no-sync",  # initdb's own files only; the server runs with fsync on
                    ]
                ),
                check=True,
                capture_output=True,
                timeout=120,
            )
            with (pg.data / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"\nport = {pg.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{root}'\n"
                    "shared_buffers = 32MB\nmax_connections = 100\nfsync = on\n"
                )
            pg.start()
        except BaseException:
            pg.stop()
            raise
        return pg

    def _pg_ctl(self, *args: str, timeout: float = _START_TIMEOUT_S) -> None:
        subprocess.run(
            _as_postgres(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), *args]
            ),
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        self._pg_ctl("-w", "-t", str(_START_TIMEOUT_S), "start")

    def restart(self, mode: str = "fast") -> float:
        """`pg_ctl restart -m MODE` (fast: sessions terminated, clean shutdown; immediate: as a
        crash, recovery from the WAL). Returns the seconds until it accepts connections again."""
        assert mode in ("fast", "immediate", "smart")
        started = time.monotonic()
        self._pg_ctl("-w", "-t", str(_START_TIMEOUT_S), "-m", mode, "restart")
        self.restarts[mode] += 1
        return time.monotonic() - started

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def stop(self) -> None:
        """Stop the server (immediate if a fast stop does not finish) and remove its folder."""
        try:
            if self.running():
                try:
                    self._pg_ctl("-w", "-m", "fast", "stop", timeout=30)
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                    self._pg_ctl("-w", "-m", "immediate", "stop", timeout=30)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def env(self, schema: str) -> dict[str, str]:
        """The store environment of a ledger using `schema` (created here) of this cluster."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        return {
            "CUSTODY_STORE": "postgres",
            "POSTGRES_DBNAME": "postgres",
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": "postgres",
            "POSTGRES_PASSWORD": "",
            "POSTGRES_SCHEMA": schema,
        }

    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=5"

    def __enter__(self) -> PrivatePostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- what clients are told, and whether it is retryable ------------------------------------------

RETRYABLE_STATUSES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def _api_kinds() -> dict[str, grpc.StatusCode]:
    """The failures a server can answer with, by exception name, and the gRPC status the API
    gives each (ledger/api/errors.py, the one mapping clients see)."""
    samples: list[BaseException] = [
        CommitFailed("x"),
        CommitOutcomeUnknown("x"),
        StoreUnavailable("x"),
        WriterFenced("x"),
        WriterElsewhere("p"),
        Overloaded("x"),
        ServiceClosed(),
        TimeoutError(),
    ]
    kinds: dict[str, grpc.StatusCode] = {}
    for exc in samples:
        error = from_exception(exc)
        assert error is not None
        kinds[type(exc).__name__] = error.code
    return kinds


API_KINDS: Final = _api_kinds()


def retryable(kind: str) -> bool:
    """An error a client may retry with the same client ids (anything unknown is not)."""
    status = API_KINDS.get(kind)
    return status is not None and status in RETRYABLE_STATUSES


@dataclass
class Answers:
    """Everything one client was told, for the checks and the figures."""

    acks: dict[str, Ack] = field(default_factory=dict)
    ack_times: list[float] = field(default_factory=list)  # monotonic, one per acknowledged id
    errors: Counter[str] = field(default_factory=Counter)  # error kind -> answers
    wrong: list[str] = field(default_factory=list)  # answers that contradict what was asked
    redirects: int = 0
    transport: int = 0  # the client could not reach a server (never expected here)


class FaultClient(threading.Thread):
    """Sends batches of 1-unit transfers with unique client ids to cluster_node servers, follows
    redirects and retries a batch with the same ids until it is acknowledged; records every
    answer. A wrong answer is one no correct server could give: a refusal or an unknown status
    (every transfer here is valid and funded), `replayed` on a batch's first attempt, or an
    answer naming other client ids than were sent."""

    def __init__(
        self,
        name: str,
        ports: list[int],
        platforms: list[str],
        batch: int,
        stop: threading.Event,
        seed: int,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.ports = ports
        self.platforms = platforms
        self.batch = batch
        self.stop_event = stop
        self.rng = random.Random(seed)
        self.answers = Answers()
        self.leader: dict[str, int] = {}
        self.conns: dict[int, tuple[socket.socket, Any]] = {}
        self.failed: BaseException | None = None

    def run(self) -> None:
        n = 0
        try:
            while not self.stop_event.is_set():
                platform = self.platforms[n % len(self.platforms)]
                cids = [f"{self.name}-{n}-{k}" for k in range(self.batch)]
                self._send_until_acked(platform, cids)
                n += 1
        except BaseException as exc:
            self.failed = exc
        finally:
            for sock, _ in self.conns.values():
                sock.close()

    def _call(self, port: int, request: bytes) -> dict[str, Any]:
        return call_node(self.conns, port, request, timeout_s=90)

    def _send_until_acked(self, platform: str, cids: list[str]) -> None:
        request = json.dumps({"platform": platform, "cids": cids}).encode() + b"\n"
        port = self.leader.get(platform, self.rng.choice(self.ports))
        answers = self.answers
        first = True
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                answer = self._call(port, request)
            except (OSError, ValueError):
                answers.transport += 1
                port = self.rng.choice(self.ports)
                time.sleep(0.05)
                continue
            if "ok" in answer:
                now_ms = time.time_ns() // 1_000_000
                now = time.monotonic()
                got = [row[0] for row in answer["ok"]]
                if got != cids:
                    answers.wrong.append(f"asked {cids}, answered for {got}")
                for cid, status, seq in answer["ok"]:
                    if status not in ("accepted", "replayed") or (first and status == "replayed"):
                        answers.wrong.append(f"{cid}: {status} at {seq} (first try: {first})")
                        continue
                    answers.acks[cid] = Ack(platform, status, seq, answer["server"], now_ms)
                    answers.ack_times.append(now)
                self.leader[platform] = port
                return
            first = False
            if "elsewhere" in answer:
                answers.redirects += 1
                answers.errors["WriterElsewhere"] += 1
                address = answer["elsewhere"]
                if address:
                    port = int(address.rpartition(":")[2])
                else:  # nobody writes it right now: try again shortly
                    time.sleep(0.02)
                    port = self.rng.choice(self.ports)
                continue
            why = str(answer.get("retry", ""))
            answers.errors[why.partition(":")[0] or "unknown"] += 1
            time.sleep(0.02)
        raise AssertionError(f"batch {cids[0]} never acknowledged")


def merged(clients: list[FaultClient]) -> Answers:
    out = Answers()
    for client in clients:
        a = client.answers
        out.acks.update(a.acks)
        out.ack_times.extend(a.ack_times)
        out.errors.update(a.errors)
        out.wrong.extend(a.wrong)
        out.redirects += a.redirects
        out.transport += a.transport
    out.ack_times.sort()
    return out


@dataclass
class Fault:
    """One injected fault: its kind, when it began and ended (monotonic), when every client had
    an acknowledgement again after it (`recovered`, None if never)."""

    kind: str
    began: float
    ended: float
    recovered: float | None = None

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered is None else self.recovered - self.ended


def wait_recovered(
    clients: list[FaultClient], after: float, timeout: float, poll_s: float = 0.01
) -> float | None:
    """When every live client has had an acknowledgement at or after `after` (None: timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        firsts = []
        for client in clients:
            times = client.answers.ack_times
            # list.append is atomic: a copy of the tail is enough
            later = [t for t in times[-2000:] if t >= after]
            if not later:
                break
            firsts.append(min(later))
        else:
            return max(firsts)
        time.sleep(poll_s)
    return None


@contextmanager
def proxies_for(target: tuple[str, int], count: int) -> Iterator[list[FaultProxy]]:
    """`count` started proxies in front of `target`, closed afterwards whatever happens."""
    started: list[FaultProxy] = []
    try:
        for _ in range(count):
            started.append(FaultProxy(target).start())
        yield started
    finally:
        for proxy in started:
            proxy.close()


class ProxiedCluster(Cluster):
    """A cluster_harness.Cluster whose server i reaches PostgreSQL through `proxies[i]`."""

    def __init__(self, store_env: dict[str, str], out_dir: Path, proxies: list[FaultProxy]):
        super().__init__(store_env, out_dir, size=len(proxies))
        self.proxies = proxies

    def start_node(self, port: int) -> Node:
        proxy = self.proxies[self.ports.index(port)]
        shared = self.env
        self.env = {**shared, "POSTGRES_PORT": str(proxy.port)}
        try:
            return super().start_node(port)
        finally:
            self.env = shared

    def proxy_of(self, node: Node) -> FaultProxy:
        return self.proxies[self.ports.index(node.port)]

    def taken_over(self, platform: str) -> Callable[[list[FaultProxy]], bool]:
        """A StallUntil condition: a server behind none of the stalled proxies writes it."""

        def cond(stalled: list[FaultProxy]) -> bool:
            found = self.writer_of(platform)
            return found is not None and self.proxy_of(found[0]) not in stalled

        return cond

    def writer_proxies(self, platform: str, timeout: float = 30.0) -> list[FaultProxy]:
        """The proxy of the server writing `platform` now (waits for one)."""
        self.wait(lambda: self.writer_of(platform) is not None, timeout, f"a writer of {platform}")
        found = self.writer_of(platform)
        assert found is not None
        return [self.proxy_of(found[0])]


def stall_for(
    proxies: Callable[[], list[FaultProxy]], seconds: float, direction: str = BOTH
) -> Callable[[], None]:
    """A fault: the proxies forward nothing (that way) for `seconds`, then everything flows."""

    def act() -> None:
        chosen = proxies()
        for proxy in chosen:
            proxy.stall(direction)
        try:
            time.sleep(seconds)
        finally:
            for proxy in chosen:
                proxy.resume()

    return act


def drop_all(proxies: Callable[[], list[FaultProxy]], rst: bool) -> Callable[[], None]:
    """A fault: every connection the proxies carry is closed at once (FIN, or RST)."""

    def act() -> None:
        for proxy in proxies():
            proxy.drop(rst=rst)

    return act


class StallUntil:
    """A fault: the proxies forward nothing until `cond(proxies)` holds (checked every 10 ms) or
    `timeout` seconds passed; `met` says which. For a partition that must be survived without
    it healing, e.g. 'until another server has taken the writer's platforms over'."""

    def __init__(
        self,
        proxies: Callable[[], list[FaultProxy]],
        cond: Callable[[list[FaultProxy]], bool],
        timeout: float,
    ) -> None:
        self.proxies = proxies
        self.cond = cond
        self.timeout = timeout
        self.met: list[bool] = []
        self.took_s: list[float] = []

    def __call__(self) -> None:
        chosen = self.proxies()
        for proxy in chosen:
            proxy.stall()
        began = time.monotonic()
        met = False
        try:
            while time.monotonic() - began < self.timeout:
                if self.cond(chosen):
                    met = True
                    break
                time.sleep(0.01)
        finally:
            for proxy in chosen:
                proxy.resume()
        self.met.append(met)
        self.took_s.append(time.monotonic() - began)


def answers_lost(proxies: Callable[[], list[FaultProxy]], seconds: float) -> Callable[[], None]:
    """A fault: PostgreSQL's answers are held for `seconds` while it goes on working, then every
    connection is dropped (RST): whatever was committed meanwhile was never confirmed to its
    sender, the 'outcome unknown' case a retry with the same client ids must settle."""

    def act() -> None:
        chosen = proxies()
        for proxy in chosen:
            proxy.stall(TO_SERVER)
        try:
            time.sleep(seconds)
        finally:
            for proxy in chosen:
                proxy.drop(rst=True)
                proxy.resume()

    return act


def inject(
    clients: list[FaultClient], kind: str, act: Callable[[], object], timeout: float
) -> Fault:
    """Run one fault (`act` returns when it is over) and wait until every client has had an
    acknowledgement after it; `recovered` stays None if that takes longer than `timeout`."""
    began = time.monotonic()
    act()
    fault = Fault(kind, began, time.monotonic())
    fault.recovered = wait_recovered(clients, fault.ended, timeout)
    return fault


def role_changes(cluster: Cluster) -> Counter[str]:
    """How often servers took ('writer') or gave up ('follower') a platform's write role."""
    counts: Counter[str] = Counter()
    for node in [*cluster.nodes.values(), *cluster.retired]:
        counts.update(role.role for role in node.roles())
    return counts
