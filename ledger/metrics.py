"""Prometheus metrics of a custody server (docs/OPERATIONS.md, "Observability").

Two kinds, in registries of their own (never prometheus_client's global one):

* pushed, in `REGISTRY`, by the few places where something happens: the gRPC call gate
  (`rpc_done`: RPCs by method and status code, latency by method), the platform writer's commit
  (`observe_commit` / `observe_commit_failed`: instructions decided by outcome status and code,
  batch size in instructions, commit latency, failed commits), the checkpoint signer
  (`checkpoint_signed`) and the customer-signature check (`observe_signature`). Each hook costs a
  few hundred nanoseconds per group or call, a tally of outcomes per instruction, nothing else
  (measured in tests/observability/measure_overhead.py);
* pulled, by `ServiceCollector` at scrape time, from the service's own state: queue depth per
  platform, writer role and state, log end, checkpoint age and unsigned records, projection and
  early-warning lag (records and seconds), open alerts by level. Nothing on the hot path changes
  for them.

Label values are bounded: `method` is one of the custody.v1 methods the gate wraps, `code` a gRPC
status name or a ledger/API reason code (anything else is counted as `OTHER`), `platform` one of
the ledger's platforms (configuration), `projection` one of the read models, `level` one of the
alert levels. No client id, account id, actor or request id is ever a label value.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final

import msgspec
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.process_collector import ProcessCollector

from controls.codes import Code

if TYPE_CHECKING:
    from ledger.service import LedgerService
    from ledger.writer import Outcome

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` twin of every counter

# Pushed metrics live here; a scrape also collects a ServiceCollector (see `scrape_registry`).
REGISTRY: Final = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # CPU, memory, open files of this process

# 0.5 ms .. 5 s: a group commit on SQLite is ~1 ms, a slow PostgreSQL commit tens of ms.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
# instructions per group commit: 1 .. CUSTODY_GROUP_MAX (at most 65536)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
SIGNATURE_BUCKETS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01)

OTHER: Final = "OTHER"
NONE: Final = "none"
STATUSES: Final = frozenset({"accepted", "pending", "replayed", "refused", "invalid"})
GRPC_CODES: Final = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)
REASON_CODES: Final = frozenset(str(code) for code in Code)

RPCS: Final = Counter(
    "custody_rpc_requests",
    "custody.v1 calls answered, by method and gRPC status code",
    ("method", "code"),
    registry=REGISTRY,
)
RPC_SECONDS: Final = Histogram(
    "custody_rpc_duration_seconds",
    "Time from the call gate to the answer of unary custody.v1 calls, by method",
    ("method",),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
INSTRUCTIONS: Final = Counter(
    "custody_instructions",
    "Instructions decided and committed, by outcome status and refusal/invalid code",
    ("status", "code"),
    registry=REGISTRY,
)
COMMIT_BATCH: Final = Histogram(
    "custody_commit_batch_instructions",
    "Instructions in one committed group (one database transaction)",
    buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)
COMMIT_SECONDS: Final = Histogram(
    "custody_commit_duration_seconds",
    "Time to store one decided group and mark it committed",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
COMMIT_FAILURES: Final = Counter(
    "custody_commit_failures",
    "Groups whose database transaction did not commit (none of their instructions happened)",
    registry=REGISTRY,
)
CHECKPOINTS: Final = Counter(
    "custody_checkpoints_signed",
    "Checkpoints signed by this server, by platform",
    ("platform",),
    registry=REGISTRY,
)
SIGNATURES: Final = Counter(
    "custody_signature_verifications",
    "Customer Ed25519 signatures verified (cache misses only), by result",
    ("result",),
    registry=REGISTRY,
)
SIGNATURE_SECONDS: Final = Histogram(
    "custody_signature_verify_duration_seconds",
    "Time to verify one customer signature",
    buckets=SIGNATURE_BUCKETS,
    registry=REGISTRY,
)


def bounded(value: str, allowed: frozenset[str]) -> str:
    """`value` if it is one of `allowed`, else OTHER: label values never grow with input."""
    return value if value in allowed else OTHER


# -- gRPC (called by the call gate, ledger/api/handlers.py) ---------------------------------------

# (method, code) -> counter child; method -> histogram child: no labels() lookup per call
_rpc_children: dict[tuple[str, str], Any] = {}
_rpc_latency_children: dict[str, Any] = {}


def rpc_done(method: str, code: str, seconds: float | None) -> None:
    """One custody.v1 call answered with `code` (a grpc.StatusCode name). `method` must be one of
    the gate's own method names (bounded); `seconds` None for streams (they last as long as the
    caller listens, so they stay out of the latency histogram)."""
    key = (method, code)
    child = _rpc_children.get(key)
    if child is None:
        child = _rpc_children[key] = RPCS.labels(method, bounded(code, GRPC_CODES))
    child.inc()
    if seconds is not None:
        timer = _rpc_latency_children.get(method)
        if timer is None:
            timer = _rpc_latency_children[method] = RPC_SECONDS.labels(method)
        timer.observe(seconds)


def short_method(path: str) -> str:
    """`/custody.v1.MovementService/Transfer` -> `MovementService/Transfer`."""
    service, _, name = path.rpartition("/")
    return f"{service.rpartition('.')[2]}/{name}"


# -- the writer (hooks for ledger/writer.py and ledger/service.py) ---------------------------------

_OUTCOME_KEY: Final = attrgetter("status", "code")
_STATUS: Final = attrgetter("status")
_CODE: Final = attrgetter("code")
_ACCEPTED: Final = "accepted"
_instruction_children: dict[tuple[str, str], Any] = {}


def _instruction_child(key: tuple[str, str]) -> Any:
    child = _instruction_children.get(key)
    if child is None:
        status, code = key
        child = INSTRUCTIONS.labels(
            bounded(status, STATUSES), bounded(code, REASON_CODES) if code else NONE
        )
        _instruction_children[key] = child
    return child


def observe_commit(answers: Sequence[Sequence[Outcome]], seconds: float | None) -> None:
    """A group's instructions happened: its answers (one list of outcomes per request) and how
    long its database transaction took (None for a group that stored nothing, e.g. only
    replays: its outcomes are counted, it is not a commit). Counts every instruction by
    (status, code), and for a commit the group's size and the latency.

    Called by `PlatformWriter.commit` after the store's transaction, which every path goes
    through (group committer, `execute`, platform creation)."""
    flat = list(chain.from_iterable(answers))
    size = len(flat)
    statuses = Tally(map(_STATUS, flat))  # one C-level pass: ~50 ns per instruction
    if len(statuses) > 1 or _ACCEPTED not in statuses:
        # refusals, invalid input, replays: a second pass over those that carry a code
        for key, count in Tally(map(_OUTCOME_KEY, filter(_CODE, flat))).items():
            _instruction_child(key).inc(count)
            statuses[key[0]] -= count
    for status, count in statuses.items():
        if count:
            _instruction_child((status, "")).inc(count)
    if seconds is not None:
        COMMIT_BATCH.observe(size)
        COMMIT_SECONDS.observe(seconds)


def observe_commit_failed() -> None:
    """A group's transaction did not commit (CommitFailed, or anything else in the commit)."""
    COMMIT_FAILURES.inc()


def checkpoint_signed(platform_id: str) -> None:
    """A new checkpoint was signed for the platform (not a re-answered last one)."""
    CHECKPOINTS.labels(platform_id).inc()


def observe_signature(seconds: float, valid: bool) -> None:
    """One Ed25519 verification of a customer's signature (a memoised answer is not one)."""
    SIGNATURES.labels("valid" if valid else "invalid").inc()
    SIGNATURE_SECONDS.observe(seconds)


# -- pulled at scrape time ------------------------------------------------------------------------

_DECODE: Final = msgspec.json.Decoder().decode
_HASH_LEN: Final = 32


class ServiceCollector:
    """Gauges read from a LedgerService (and its database) when Prometheus scrapes.

    Reads only: the platforms' writers (role, fenced, dirty, committed position), their group
    committers' queue depth, the checkpoint logs (last signed size, its file's time), the
    projections' and the early-warning engine's stored positions (`proj_positions`,
    `risk_positions`) and the open alerts (`risk_alerts`). A table that does not exist (the
    engine never ran against this database) leaves its metrics out.
    """

    def __init__(self, service: LedgerService, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.clock = clock
        self.started = clock()
        self._lock = threading.Lock()  # one scrape at a time: each runs a few SQL reads

    def describe(self) -> Iterable[Metric]:
        return []  # the families vary with the database; nothing to reserve

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._collect()

    def _collect(self) -> Iterator[Metric]:
        service = self.service
        config = service.config
        now = self.clock()
        platforms = service.platform_ids()
        log_end: dict[str, int] = {}

        queue = GaugeMetricFamily(
            "custody_queue_depth_instructions",
            "Instructions waiting for the platform's group committer",
            labels=("platform",),
        )
        role = GaugeMetricFamily(
            "custody_writer_role",
            "1 if this server writes the platform's log, 0 if it follows another server",
            labels=("platform",),
        )
        fenced = GaugeMetricFamily(
            "custody_writer_fenced",
            "1 if this server should write the platform but its writer is fenced (another "
            "writer appended to the log)",
            labels=("platform",),
        )
        dirty = GaugeMetricFamily(
            "custody_writer_dirty",
            "1 if the platform's live state must be rebuilt from the store before the next group",
            labels=("platform",),
        )
        position = GaugeMetricFamily(
            "custody_log_records",
            "Records in the platform's log as this server knows it (committed)",
            labels=("platform",),
        )
        unsigned = GaugeMetricFamily(
            "custody_checkpoint_unsigned_records",
            "Committed records not yet covered by a signed checkpoint",
            labels=("platform",),
        )
        age = GaugeMetricFamily(
            "custody_checkpoint_age_seconds",
            "Seconds since the platform's last checkpoint was signed (since this server started "
            "watching if none ever was)",
            labels=("platform",),
        )
        for pid in platforms:
            platform = _platform(service, pid)
            if platform is None:
                continue
            writer = platform.writer
            committed = int(writer.committed_next_seq)
            log_end[pid] = committed - 1
            is_writer = getattr(platform, "role", "writer") == "writer"
            committer = platform.committer
            queue.add_metric((pid,), 0 if committer is None else int(committer._queued))
            role.add_metric((pid,), 1 if is_writer else 0)
            fenced.add_metric((pid,), 1 if is_writer and writer.fenced else 0)
            dirty.add_metric((pid,), 1 if writer.dirty else 0)
            position.add_metric((pid,), committed)
            last = platform.checkpoints.last
            unsigned.add_metric((pid,), committed - (0 if last is None else last.size))
            signed_at = self.started
            if last is not None:
                with contextlib.suppress(OSError):
                    signed_at = os.stat(platform.checkpoints.directory / "last.json").st_mtime
            age.add_metric((pid,), max(0.0, now - signed_at))
        yield from (queue, role, fenced, dirty, position, unsigned, age)

        yield GaugeMetricFamily(
            "custody_queue_capacity_instructions",
            "CUSTODY_QUEUE_MAX: most instructions waiting for one platform's writer",
            value=config.queue_max,
        )
        yield GaugeMetricFamily(
            "custody_checkpoint_interval_seconds",
            "CUSTODY_CHECKPOINT_INTERVAL_S: a checkpoint is due this long after new records",
            value=config.checkpoint_interval_s,
        )
        yield from self._followers(log_end, now)

    def _followers(self, log_end: dict[str, int], now: float) -> Iterator[Metric]:
        """Projections' and early-warning lag, open alerts: from their tables, if they exist."""
        from projections.db import Db
        from risk.store import RiskDb

        store = self.service.store
        proj_db = Db(store)
        risk_db = RiskDb(store)
        ts_cache: dict[tuple[str, int], float | None] = {}

        def first_unread_ts(pid: str, pos: int) -> float | None:
            key = (pid, pos)
            if key not in ts_cache:
                ts_cache[key] = _record_ts_s(self.service, pid, pos + 1)
            return ts_cache[key]

        rows = _query(
            proj_db, f"SELECT name, platform, position FROM {proj_db.t('proj_positions')}"
        )
        if rows is not None:
            lag = GaugeMetricFamily(
                "custody_projection_lag_records",
                "Log records not yet projected into the read model (log end - position)",
                labels=("projection", "platform"),
            )
            lag_s = GaugeMetricFamily(
                "custody_projection_lag_seconds",
                "Age of the oldest record not yet projected into the read model (0 when current)",
                labels=("projection", "platform"),
            )
            for name, pid, pos in rows:
                if pid not in log_end or not _is_name(str(name)):
                    continue
                behind = max(0, log_end[pid] - int(pos))
                lag.add_metric((str(name), pid), behind)
                ts = first_unread_ts(pid, int(pos)) if behind else None
                lag_s.add_metric((str(name), pid), 0.0 if ts is None else max(0.0, now - ts))
            yield lag
            yield lag_s

        rows = _query(risk_db, f"SELECT platform, position FROM {risk_db.t('risk_positions')}")
        if rows is not None:
            rlag = GaugeMetricFamily(
                "custody_risk_lag_records",
                "Log records the early-warning engine has not read yet",
                labels=("platform",),
            )
            rlag_s = GaugeMetricFamily(
                "custody_risk_lag_seconds",
                "Age of the oldest record the early-warning engine has not read (0 when current)",
                labels=("platform",),
            )
            for pid, pos in rows:
                if pid not in log_end:
                    continue
                behind = max(0, log_end[pid] - int(pos))
                rlag.add_metric((pid,), behind)
                ts = first_unread_ts(pid, int(pos)) if behind else None
                rlag_s.add_metric((pid,), 0.0 if ts is None else max(0.0, now - ts))
            yield rlag
            yield rlag_s

        rows = _query(
            risk_db,
            f"SELECT platform, level, COUNT(*) FROM {risk_db.t('risk_alerts')} "
            "WHERE status <> 'closed' GROUP BY platform, level",
        )
        if rows is not None:
            from risk.matrix import LEVELS

            alerts = GaugeMetricFamily(
                "custody_alerts_open",
                "Early-warning alerts not closed, by platform and level",
                labels=("platform", "level"),
            )
            counts = {(str(p), str(lv)): int(n) for p, lv, n in rows}
            for pid in log_end:
                for level in LEVELS:
                    alerts.add_metric((pid, level), counts.get((pid, level), 0))
            yield alerts


def _platform(service: LedgerService, platform_id: str) -> Any:
    """The service's per-platform object (writer, committer, checkpoint log), or None."""
    platforms: dict[str, Any] = service._platforms
    return platforms.get(platform_id)


def _is_name(name: str) -> bool:
    return 0 < len(name) <= 64 and name.replace("_", "").isalnum()


def _query(db: Any, sql: str) -> list[tuple[Any, ...]] | None:
    """Rows of a read-only query, or None if it fails (typically: the table does not exist)."""
    try:
        with db.reading() as cur:
            rows: list[tuple[Any, ...]] = db.fetchall(cur, sql)
            return rows
    except Exception:
        return None


def _record_ts_s(service: LedgerService, platform_id: str, seq: int) -> float | None:
    """The time (seconds) of the record at `seq` in the platform's log, or None."""
    from ledger.store import log_stream

    try:
        rows = service.store.read(log_stream(platform_id), after=seq - 1, limit=1)
    except Exception:
        return None
    if not rows or rows[0][0] != seq:
        return None
    try:
        rec = _DECODE(rows[0][2][_HASH_LEN:])
        return int(rec["ts"]) / 1000.0
    except Exception:
        return None


class _Pushed:
    """REGISTRY's metrics, as one collector of a scrape registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def scrape_registry(service: LedgerService | None) -> CollectorRegistry:
    """What `/metrics` serves: the pushed metrics and, with a service, its pulled gauges."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Pushed())
    if service is not None:
        registry.register(ServiceCollector(service))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition format (version 0.0.4)."""
    return generate_latest(registry)


# -- the /metrics endpoint ------------------------------------------------------------------------

PATH: Final = "/metrics"
DEFAULT_HOST: Final = "127.0.0.1"


def _handler(render: Callable[[], bytes]) -> type[BaseHTTPRequestHandler]:
    import logging

    log = logging.getLogger("ledger.metrics")

    class Handler(BaseHTTPRequestHandler):
        server_version = "custody-metrics"
        sys_version = ""

        def _answer(self, status: HTTPStatus, body: bytes, ctype: str, head: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if status is HTTPStatus.METHOD_NOT_ALLOWED:
                self.send_header("Allow", "GET, HEAD")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            if self.path.split("?", 1)[0] != PATH:
                self._answer(HTTPStatus.NOT_FOUND, b"404 not found\n", "text/plain", head)
                return
            try:
                body = render()
            except Exception:
                log.exception("metrics could not be collected")
                self._answer(
                    HTTPStatus.INTERNAL_SERVER_ERROR, b"500 metrics failed\n", "text/plain", head
                )
                return
            self._answer(HTTPStatus.OK, body, CONTENT_TYPE_PLAIN_0_0_4, head)

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _refuse(self) -> None:
            self._answer(HTTPStatus.METHOD_NOT_ALLOWED, b"405 read-only\n", "text/plain", False)

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics %s", format % args)

    return Handler


class MetricsServer:
    """`GET /metrics` on host:port (loopback by default) in a daemon thread; `close()` stops it."""

    def __init__(self, service: LedgerService | None, port: int, host: str = DEFAULT_HOST) -> None:
        self.registry = scrape_registry(service)
        registry = self.registry
        try:
            self.httpd = ThreadingHTTPServer((host, port), _handler(lambda: exposition(registry)))
        except OSError as exc:
            raise OSError(f"cannot bind the metrics port {host}:{port}: {exc}") from None
        self.httpd.daemon_threads = True
        self.host = host
        self.port: int = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join(timeout=5)
        self.httpd.server_close()
