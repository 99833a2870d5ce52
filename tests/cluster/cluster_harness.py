"""Several ledger servers on one PostgreSQL schema, clients that follow redirects, a killer, and
the checks of the failover campaign. Used by tests/cluster and bench/failover.py.

Plain functions and classes (no pytest): the benchmark imports them too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger import records
from ledger.config import Config
from ledger.lease import WriterInfo, writer_history
from ledger.store import LedgerStore, log_stream
from ledger.writer import verify_stored_chain

NODE = Path(__file__).with_name("cluster_node.py")
REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Role:
    platform: str
    role: str
    epoch: int
    from_seq: int
    wall_ms: int


class Node:
    """One server process; its stdout (events) goes to a file parsed on demand."""

    def __init__(self, server_id: str, port: int, env: dict[str, str], out_dir: Path) -> None:
        self.server_id = server_id
        self.port = port
        self.out = out_dir / f"{server_id}.out"
        self.err = out_dir / f"{server_id}.err"
        node_env = dict(env)
        node_env["CUSTODY_SERVER_ID"] = server_id
        node_env["CUSTODY_ADVERTISE"] = f"127.0.0.1:{port}"
        node_env["CUSTODY_DATA_DIR"] = str(out_dir / server_id)
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(NODE)], stdout=out, stderr=err, env=node_env
            )
        self.killed_at_ms: int | None = None

    def lines(self) -> list[str]:
        text = self.out.read_text() if self.out.exists() else ""
        return text.split("\n")[:-1]

    def ready(self) -> bool:
        return any(line.startswith("ready ") for line in self.lines())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def roles(self) -> list[Role]:
        out = []
        for line in self.lines():
            parts = line.split(" ")
            if parts[0] == "role":
                _, platform, role, epoch, from_seq, at = parts
                out.append(
                    Role(
                        platform,
                        role,
                        -1 if epoch == "-" else int(epoch),
                        -1 if from_seq == "-" else int(from_seq),
                        int(at),
                    )
                )
        return out

    def writes(self, platform: str) -> Role | None:
        """Its latest role event for the platform if that is 'writer' (and it is alive)."""
        if not self.alive():
            return None
        mine = [r for r in self.roles() if r.platform == platform]
        return mine[-1] if mine and mine[-1].role == "writer" else None

    def kill(self) -> int:
        self.killed_at_ms = wall_ms()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return self.killed_at_ms

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


class Cluster:
    def __init__(self, store_env: dict[str, str], out_dir: Path, size: int = 3) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODY_", "POSTGRES_"))}
        env.update(store_env)
        env["CUSTODY_PROJECTIONS"] = "off"
        env["CUSTODY_RISK"] = "off"
        env["CUSTODY_CHECKPOINT_EVERY"] = "0"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self.env = env
        self.out_dir = out_dir
        self.ports = [free_port() for _ in range(size)]
        self.nodes: dict[int, Node] = {}
        self.generation: Counter[int] = Counter()
        self.retired: list[Node] = []

    def start_node(self, port: int) -> Node:
        self.generation[port] += 1
        server_id = f"s{self.ports.index(port)}-g{self.generation[port]}"
        node = Node(server_id, port, self.env, self.out_dir)
        self.nodes[port] = node
        return node

    def start(self, timeout: float = 60.0) -> None:
        for port in self.ports:
            self.start_node(port)
            time.sleep(0.2)  # the first one started takes every lease; the others follow
        self.wait(lambda: all(n.ready() for n in self.nodes.values()), timeout, "nodes ready")

    def wait(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            for node in self.nodes.values():
                if not node.alive() and node.killed_at_ms is None:
                    raise AssertionError(f"{node.server_id} died: {node.err.read_text()[-3000:]}")
            time.sleep(0.005)
        raise AssertionError(f"timed out waiting for {what}")

    def writer_of(self, platform: str) -> tuple[Node, Role] | None:
        found = [(n, r) for n in self.nodes.values() if (r := n.writes(platform)) is not None]
        assert len(found) <= 1, f"two live servers say they write {platform}: {found}"
        return found[0] if found else None

    def kill_writer(self, platform: str, timeout: float = 30.0) -> dict[str, Any]:
        """SIGKILL the platform's writer, start a replacement process on its port, and wait until
        a live server writes every platform the killed one wrote. Returns the failover figures."""
        self.wait(lambda: self.writer_of(platform) is not None, timeout, f"a writer of {platform}")
        found = self.writer_of(platform)
        assert found is not None
        victim, _ = found
        written = [p for p in self.platforms() if victim.writes(p) is not None]
        epochs = {p: r.epoch for p in written if (r := victim.writes(p)) is not None}
        killed_at = victim.kill()
        self.retired.append(victim)
        self.start_node(victim.port)
        takeovers: dict[str, int] = {}

        def taken() -> bool:
            for p in written:
                now = self.writer_of(p)
                if now is not None and now[1].epoch > epochs[p]:
                    takeovers[p] = now[1].wall_ms - killed_at
            return len(takeovers) == len(written)

        self.wait(taken, timeout, f"a new writer for {written}")
        return {"killed": victim.server_id, "at_ms": killed_at, "failover_ms": takeovers}

    def platforms(self) -> list[str]:
        seen: set[str] = set()
        for node in [*self.nodes.values(), *self.retired]:
            seen.update(r.platform for r in node.roles())
        return sorted(seen)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()


@dataclass
class Ack:
    platform: str
    status: str
    seq: int
    server: str
    at_ms: int


@dataclass
class ClientStats:
    acks: dict[str, Ack] = field(default_factory=dict)
    redirects: int = 0
    retries: int = 0
    errors: list[str] = field(default_factory=list)


def call_node(
    conns: dict[int, tuple[socket.socket, Any]], port: int, request: bytes, timeout_s: float
) -> dict[str, Any]:
    """One request line to a node on `port` and its answer line, on a connection kept in
    `conns`; a failed call drops the connection, so the next one reconnects."""
    conn = conns.get(port)
    if conn is None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        conn = (sock, sock.makefile("rb"))
        conns[port] = conn
    sock, reader = conn
    try:
        sock.sendall(request)
        line = reader.readline()
        if not line:
            raise ConnectionError("closed")
        answer: dict[str, Any] = json.loads(line)
        return answer
    except BaseException:
        conns.pop(port, None)
        sock.close()
        raise


class Client(threading.Thread):
    """Submits batches of transfers with unique client ids to whichever server writes, following
    redirects, retrying a batch (same ids) on a dropped connection until it is acknowledged."""

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
        self.stats = ClientStats()
        self.leader: dict[str, int] = {}
        self.conns: dict[int, tuple[socket.socket, Any]] = {}

    def run(self) -> None:
        n = 0
        while not self.stop_event.is_set():
            platform = self.platforms[n % len(self.platforms)]
            cids = [f"{self.name}-{n}-{k}" for k in range(self.batch)]
            self.send_until_acked(platform, cids)
            n += 1
        for sock, _ in self.conns.values():
            sock.close()

    def _call(self, port: int, request: bytes) -> dict[str, Any]:
        return call_node(self.conns, port, request, timeout_s=10)

    def send_until_acked(self, platform: str, cids: list[str]) -> None:
        request = json.dumps({"platform": platform, "cids": cids}).encode() + b"\n"
        port = self.leader.get(platform, self.rng.choice(self.ports))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                answer = self._call(port, request)
            except (OSError, ValueError) as exc:
                self.stats.retries += 1
                if len(self.stats.errors) < 20:
                    self.stats.errors.append(f"{port}: {exc!r}")
                port = self.rng.choice([p for p in self.ports if p != port])
                time.sleep(0.02)
                continue
            if "ok" in answer:
                now = wall_ms()
                for cid, status, seq in answer["ok"]:
                    assert status in ("accepted", "replayed"), answer
                    self.stats.acks[cid] = Ack(platform, status, seq, answer["server"], now)
                self.leader[platform] = port
                return
            if "elsewhere" in answer:
                self.stats.redirects += 1
                address = answer["elsewhere"]
                if address:
                    port = int(address.rpartition(":")[2])
                else:  # a failover in progress: try again shortly
                    time.sleep(0.02)
                    port = self.rng.choice(self.ports)
                continue
            self.stats.retries += 1  # "retry": nothing happened, same ids again
            if len(self.stats.errors) < 20:
                self.stats.errors.append(f"{port}: {answer.get('retry')}")
            time.sleep(0.02)
        raise AssertionError(f"batch {cids[0]} never acknowledged")


@dataclass
class Findings:
    acknowledged: int
    found: int
    lost: list[str]
    duplicates: list[str]
    misplaced: list[str]
    outside_epoch: list[str]
    chain: dict[str, tuple[int, int | None, str]]
    history: dict[str, list[WriterInfo]]
    records: dict[str, int]


def check_log(config: Config, platforms: list[str], acks: dict[str, Ack]) -> Findings:
    """Read every platform's log back and hold it against what clients were told."""
    store = LedgerStore(config)
    schema = config.postgres.get("POSTGRES_SCHEMA") or "public"
    try:
        cid_count: Counter[tuple[str, str]] = Counter()  # (platform, client id)
        cid_where: dict[tuple[str, str], int] = {}
        chain: dict[str, tuple[int, int | None, str]] = {}
        history: dict[str, list[WriterInfo]] = {}
        counts: dict[str, int] = {}
        for platform in platforms:
            chain[platform] = verify_stored_chain(store, platform)
            history[platform] = writer_history(store.datastore, schema, platform)
            n = 0
            for seq, kind, packed in store.iter_rows(log_stream(platform)):
                n += 1
                rec = records.decode(records.unpack_state(packed)[1])
                if kind != records.REFUSED_KIND:  # a client id is consumed only if accepted
                    cid_count[platform, rec["cid"]] += 1
                    cid_where[platform, rec["cid"]] = seq
            counts[platform] = n
    finally:
        store.close()
    lost = [cid for cid, ack in acks.items() if cid_count[ack.platform, cid] == 0]
    duplicates = [f"{p}/{cid}" for (p, cid), n in cid_count.items() if n > 1]
    misplaced = [
        cid for cid, ack in acks.items() if cid_where.get((ack.platform, cid), ack.seq) != ack.seq
    ]
    outside: list[str] = []
    for cid, ack in acks.items():
        if ack.status != "accepted":
            continue  # a replay names the position some earlier writer gave it
        epochs = history[ack.platform]
        owner = None
        for info in epochs:
            if info.from_seq <= ack.seq:
                owner = info
        if owner is None or owner.server_id != ack.server:
            outside.append(f"{cid}@{ack.seq} by {ack.server}, epoch owner {owner}")
    return Findings(
        acknowledged=len(acks),
        found=sum(1 for cid, ack in acks.items() if cid_count[ack.platform, cid] == 1),
        lost=lost,
        duplicates=duplicates,
        misplaced=misplaced,
        outside_epoch=outside,
        chain=chain,
        history=history,
        records=counts,
    )


def prepare_platforms(config: Config, platforms: list[str], funds: int) -> None:
    """Create the platforms (accounts alice and bob, alice funded) before the servers start."""
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
