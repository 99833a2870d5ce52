"""Metrics through a real server: scrape /metrics after a workload and check that every counter
moved by exactly what the workload did, that the pulled gauges tell the service's real state
(queue, writer, log end, checkpoints, projection and early-warning lag, open alerts), and that
label values stay bounded whatever ids callers use. SQLite and PostgreSQL."""

from __future__ import annotations

import inspect
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from helpers import BOOKKEEPING_POLICY, Platform, deposit, make_platform, transfer
from obs_helpers import CCY, Served, delta, samples, served, value

from controls.codes import Code
from ledger import commands as c
from ledger import metrics
from ledger.api.client import CustodyClient, CustodyError
from ledger.config import Config, ConfigError
from ledger.service import LedgerService
from ledger.writer import Outcome, PlatformWriter
from projections.runner import ProjectionRunner
from risk import store as rs
from risk.engine import RiskEngine
from risk.matrix import LEVELS

# The writer-side hooks (ledger/metrics.py: observe_commit, observe_commit_failed) are called by
# PlatformWriter.commit once the lead wires them (see docs/OPERATIONS.md, Observability).
HOOKS_WIRED = "metrics.observe_commit" in inspect.getsource(PlatformWriter.commit)
RPC = "custody_rpc_requests_total"


@pytest.fixture
def srv(store_env: dict[str, str]) -> Served:
    with served(store_env) as s:
        yield s  # type: ignore[misc]


def _workload(s: Served) -> tuple[CustodyClient, CustodyClient]:
    operator = s.client("operator", "dev")
    operator.create_platform("p1", "Platform p1", policy=BOOKKEEPING_POLICY)
    p1 = s.client("platform", "p1")
    for cid, account, kind, role in [
        ("o-omni", "omni", "omnibus", None),
        ("o-alice", "alice", "customer", "lender"),
        ("o-bob", "bob", "customer", "borrower"),
        ("o-carol", "carol", "customer", "other"),
    ]:
        p1.open_account(cid, account, kind=kind, currency=CCY, role=role)
    p1.deposit("d-1", "omni", "alice", 1_000, CCY, bank_ref="seed")
    for i in range(1, 6):
        p1.transfer(f"t-{i}", "alice", "bob", 10, CCY)
    for i in range(6, 9):
        with pytest.raises(CustodyError) as err:
            p1.transfer(f"t-{i}", "bob", "carol", 100_000, CCY)
        assert err.value.reason == Code.INSUFFICIENT_FUNDS
    assert p1.transfer("t-1", "alice", "bob", 10, CCY).status == "replayed"
    return operator, p1


def test_workload_moves_rpc_counters_and_pulled_gauges(srv: Served) -> None:
    before = srv.scrape()
    _workload(srv)
    anonymous = CustodyClient(grpc.insecure_channel(srv.target), retries=0)
    srv.clients.append(anonymous)
    with pytest.raises(CustodyError) as err:
        anonymous.get_balance("alice", platform_id="p1")
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED

    expected = {
        ("PlatformService/CreatePlatform", "OK"): 1,
        ("AccountService/OpenAccount", "OK"): 4,
        ("MovementService/Deposit", "OK"): 1,
        ("MovementService/Transfer", "OK"): 6,  # five accepted, one replayed
        ("MovementService/Transfer", "FAILED_PRECONDITION"): 3,
        ("QueryService/GetBalance", "UNAUTHENTICATED"): 1,
    }

    # error answers are counted before they go out (errors.abort): no waiting needed
    after = srv.scrape()
    for (method, code), n in expected.items():
        assert delta(after, before, RPC, method=method, code=code) == n, (method, code)
    # nothing else was called
    moved = {
        (dict(labels)["method"], dict(labels)["code"])
        for (name, labels), v in after.items()
        if name == RPC and v != before.get((name, labels), 0.0)
    }
    assert moved == set(expected)
    count = "custody_rpc_duration_seconds_count"
    assert delta(after, before, count, method="MovementService/Transfer") == 9
    assert delta(after, before, count, method="QueryService/GetBalance") == 1
    assert (
        delta(
            after, before, "custody_rpc_duration_seconds_sum", method="AccountService/OpenAccount"
        )
        > 0
    )
    # buckets are cumulative and the last one holds every call
    inf = value(
        after, "custody_rpc_duration_seconds_bucket", method="MovementService/Transfer", le="+Inf"
    )
    assert inf == value(after, count, method="MovementService/Transfer")

    # pulled from the service's own state
    records, _ = srv.service.head("p1")
    assert records == 14  # platform, 4 accounts, deposit, 5 transfers, 3 refusals (no replay)
    assert value(after, "custody_log_records", platform="p1") == records
    assert value(after, "custody_queue_depth_instructions", platform="p1") == 0
    assert value(after, "custody_writer_role", platform="p1") == 1
    assert value(after, "custody_writer_fenced", platform="p1") == 0
    assert value(after, "custody_writer_dirty", platform="p1") == 0
    assert value(after, "custody_queue_capacity_instructions") == srv.service.config.queue_max
    assert value(after, "custody_checkpoint_interval_seconds") == 60
    last = srv.service.checkpoint("p1")
    signed = 0 if last is None else last.size
    assert value(after, "custody_checkpoint_unsigned_records", platform="p1") == records - signed


@pytest.mark.skipif(not HOOKS_WIRED, reason="PlatformWriter.commit does not call ledger.metrics")
def test_workload_moves_instruction_and_commit_counters(srv: Served) -> None:
    before = srv.scrape()
    _workload(srv)
    after = srv.scrape()
    name = "custody_instructions_total"
    assert delta(after, before, name, status="accepted", code="none") == 11
    assert delta(after, before, name, status="refused", code="INSUFFICIENT_FUNDS") == 3
    assert delta(after, before, name, status="replayed", code="none") == 1
    # one caller at a time: every stored group is one instruction; the replay stored nothing
    assert delta(after, before, "custody_commit_batch_instructions_count") == 14
    assert delta(after, before, "custody_commit_batch_instructions_sum") == 14
    assert delta(after, before, "custody_commit_batch_instructions_bucket", le="1.0") == 14
    assert delta(after, before, "custody_commit_duration_seconds_count") == 14
    assert delta(after, before, "custody_commit_failures_total") == 0


def test_projection_risk_and_checkpoint_gauges(srv: Served) -> None:
    _, p1 = _workload(srv)
    service = srv.service
    runner = ProjectionRunner(service.store)
    try:
        runner.catch_up("p1")
        scraped = srv.scrape()
        names = [p.name for p in runner.projections]
        for projection in names:
            lag = ("custody_projection_lag_records", "custody_projection_lag_seconds")
            for metric in lag:
                assert (metric, (("platform", "p1"), ("projection", projection))) in scraped
                assert value(scraped, metric, projection=projection, platform="p1") == 0
        p1.transfer("t-late-1", "alice", "bob", 1, CCY)
        p1.transfer("t-late-2", "alice", "bob", 1, CCY)
        time.sleep(0.05)
        scraped = srv.scrape()
        for projection in names:
            lag_records = value(
                scraped, "custody_projection_lag_records", projection=projection, platform="p1"
            )
            assert lag_records == 2
            status = next(st for st in runner.status("p1") if st.name == projection)
            assert lag_records == status.lag
            lag_s = value(
                scraped, "custody_projection_lag_seconds", projection=projection, platform="p1"
            )
            assert 0.04 < lag_s < 60
    finally:
        runner.close()

    engine = RiskEngine(service)
    engine.catch_up("p1")
    scraped = srv.scrape()
    assert value(scraped, "custody_risk_lag_records", platform="p1") == engine.status("p1")["lag"]
    open_now = rs.open_counts(engine.db, "p1")
    for level in LEVELS:
        assert value(scraped, "custody_alerts_open", platform="p1", level=level) == open_now.get(
            level, 0
        )
    p1.transfer("t-late-3", "alice", "bob", 1, CCY)
    scraped = srv.scrape()
    assert value(scraped, "custody_risk_lag_records", platform="p1") == engine.status("p1")["lag"]
    assert engine.status("p1")["lag"] >= 1

    service.sign_checkpoint("p1")
    scraped = srv.scrape()
    assert value(scraped, "custody_checkpoint_unsigned_records", platform="p1") == 0
    assert 0 <= value(scraped, "custody_checkpoint_age_seconds", platform="p1") < 10


def test_queue_depth_is_what_waits_for_the_committer(service: LedgerService) -> None:
    p = make_platform(service)
    registry = metrics.scrape_registry(service)

    def depth() -> float:
        scraped = samples(metrics.exposition(registry).decode())
        return value(scraped, "custody_queue_depth_instructions", platform=p.id)

    actor = "platform:test"
    cmd = deposit(p, "q-0", p.customers[0], 1)
    service.submit(p.id, [cmd], actor).result(10)  # starts the committer
    platform = service._platforms[p.id]
    futures = []
    with platform.cond:  # the decide thread cannot take a group while we hold the lock
        first = service.submit(p.id, [msg(p, 1)], actor)
        committer = platform.committer
        assert committer is not None
        deadline = time.monotonic() + 10
        while committer._queued and time.monotonic() < deadline:  # taken, now waiting on us
            time.sleep(0.001)
        futures = [service.submit(p.id, [msg(p, i)], actor) for i in range(2, 9)]
        futures.append(service.submit(p.id, [msg(p, 9), msg(p, 10), msg(p, 11)], actor))
        assert depth() == 10
    for f in [first, *futures]:
        f.result(10)
    assert depth() == 0


def msg(p: Platform, i: int) -> c.Command:
    return deposit(p, f"q-{i}", p.customers[0], 1)


def test_labels_stay_bounded_under_many_distinct_ids(tmp_path: Path) -> None:
    env = {"CUSTODY_STORE": "sqlite", "CUSTODY_DATA_DIR": str(tmp_path)}
    with served(env) as s:
        _, p1 = _workload(s)

        def series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
            return {key for key in s.scrape() if key[0].startswith("custody_")}

        hostile = CustodyClient(
            grpc.insecure_channel(s.target),
            metadata=(("x-custody-role", "platform"), ("x-custody-platform", "p1")),
            retries=0,
        )
        s.clients.append(hostile)
        ids: list[str] = []

        def round_of(n: int, tag: str) -> None:
            for i in range(n):
                cid = f"cid-{uuid.uuid4().hex}"
                ids.append(cid)
                p1.transfer(cid, "alice", "bob", 1, CCY)  # accepted, each a new client id
                ids.append(f"acct{tag}{i}")
                with pytest.raises(CustodyError):  # an unknown account each time
                    p1.transfer(f"x-{cid}", "alice", f"acct{tag}{i}", 1, CCY)
                rid = f"req-{uuid.uuid4().hex}"
                ids.append(rid)
                hostile.metadata = (*hostile.metadata[:2], ("x-request-id", rid))
                hostile.get_balance("alice")

        round_of(1, "w")  # every kind of call once
        first = series()
        round_of(120, "z")  # 360 new ids: client ids, account ids, request ids
        later = series()
        assert later == first, later ^ first
        text = s.scrape_text()
        for used in ids:
            assert used not in text
        for _, labels in later:
            for label, val in labels:
                assert label in {
                    "method",
                    "code",
                    "status",
                    "platform",
                    "projection",
                    "level",
                    "le",
                    "result",
                }, label
                assert len(val) <= 64


def test_label_values_are_bounded_by_construction() -> None:
    metrics.rpc_done("MovementService/Transfer", "NOT_A_STATUS", 0.001)
    scraped = samples(metrics.exposition(metrics.scrape_registry(None)).decode())
    assert value(scraped, RPC, method="MovementService/Transfer", code="OTHER") >= 1
    assert (
        "custody_rpc_requests_total",
        (("code", "NOT_A_STATUS"), ("method", "MovementService/Transfer")),
    ) not in scraped
    before = samples(metrics.exposition(metrics.scrape_registry(None)).decode())
    odd = Outcome("client-7f3a", "refused", code="SOMETHING_NEW_FROM_A_CLIENT")
    weird = Outcome("client-8", "unheard-of", code="")
    metrics.observe_commit([[odd, weird], [Outcome("c9", "accepted")]], 0.002)
    after = samples(metrics.exposition(metrics.scrape_registry(None)).decode())
    name = "custody_instructions_total"
    assert delta(after, before, name, status="refused", code="OTHER") == 1
    assert delta(after, before, name, status="OTHER", code="none") == 1
    assert delta(after, before, name, status="accepted", code="none") == 1
    assert delta(after, before, "custody_commit_batch_instructions_sum") == 3
    assert delta(after, before, "custody_commit_duration_seconds_bucket", le="0.0025") == 1
    assert not any("client-" in dict(labels).get("code", "") for _, labels in after)


def test_push_hooks_count(service: LedgerService) -> None:
    """The hooks the service calls, on real outcomes from a real writer."""
    p = make_platform(service)
    registry = metrics.scrape_registry(service)
    before = samples(metrics.exposition(registry).decode())
    answers = [
        service.execute(
            p.id,
            [
                deposit(p, "h-1", p.customers[0], 5),
                transfer(p, "h-2", p.customers[1], p.customers[0], 10**6),
            ],
            "platform:test",
        )
    ]
    metrics.observe_commit(answers, 0.004)
    metrics.observe_commit_failed()
    metrics.checkpoint_signed(p.id)
    metrics.observe_signature(0.0001, True)
    metrics.observe_signature(0.0002, False)
    after = samples(metrics.exposition(registry).decode())
    wired = 2 if HOOKS_WIRED else 1  # the writer counted the execute itself too
    name = "custody_instructions_total"
    assert delta(after, before, name, status="accepted", code="none") == wired
    assert delta(after, before, name, status="refused", code="INSUFFICIENT_FUNDS") == wired
    assert delta(after, before, "custody_commit_failures_total") == 1
    assert delta(after, before, "custody_checkpoints_signed_total", platform=p.id) >= 1
    assert delta(after, before, "custody_signature_verifications_total", result="valid") == 1
    assert delta(after, before, "custody_signature_verifications_total", result="invalid") == 1
    assert delta(after, before, "custody_signature_verify_duration_seconds_count") == 2


def test_metrics_endpoint_answers_only_get_metrics(tmp_path: Path) -> None:
    env = {"CUSTODY_STORE": "sqlite", "CUSTODY_DATA_DIR": str(tmp_path)}
    with served(env) as s:
        assert s.server.metrics is not None and s.server.metrics.host == "127.0.0.1"
        assert "# TYPE custody_rpc_requests_total counter" in s.scrape_text()
        base = f"http://127.0.0.1:{s.server.metrics_port}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/dashboard", timeout=5)
        assert err.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(f"{base}/metrics", data=b"x"), timeout=5)
        assert err.value.code == 405
        port = s.server.metrics_port
    with pytest.raises(OSError):  # stopped with the server
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_port_configuration(tmp_path: Path) -> None:
    base = {"CUSTODY_DATA_DIR": str(tmp_path)}
    assert (Config.from_env(base).metrics_host, Config.from_env(base).metrics_port) == (
        "127.0.0.1",
        0,
    )
    one = Config.from_env({**base, "CUSTODY_METRICS_PORT": "9464"})
    assert (one.metrics_host, one.metrics_port) == ("127.0.0.1", 9464)
    two = Config.from_env({**base, "CUSTODY_METRICS_PORT": "0.0.0.0:9100"})
    assert (two.metrics_host, two.metrics_port) == ("0.0.0.0", 9100)
    six = Config.from_env({**base, "CUSTODY_METRICS_PORT": "[::1]:9100"})
    assert (six.metrics_host, six.metrics_port) == ("::1", 9100)
    for bad in ("x", "99999", ":9100", "a b:1", "host:", "-1"):
        with pytest.raises(ConfigError):
            Config.from_env({**base, "CUSTODY_METRICS_PORT": bad})
    assert Config.from_env(base).log_format == "auto"
    assert Config.from_env({**base, "CUSTODY_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigError):
        Config.from_env({**base, "CUSTODY_LOG_FORMAT": "yaml"})


def test_writer_state_gauges_follow_the_writer(service: LedgerService) -> None:
    p = make_platform(service)
    registry = metrics.scrape_registry(service)
    writer = service._platforms[p.id].writer
    writer.dirty = True
    try:
        scraped = samples(metrics.exposition(registry).decode())
        assert value(scraped, "custody_writer_dirty", platform=p.id) == 1
    finally:
        writer.dirty = False
    writer.fenced = True
    try:
        scraped = samples(metrics.exposition(registry).decode())
        assert value(scraped, "custody_writer_fenced", platform=p.id) == 1
        with pytest.raises(Exception):  # noqa: B017 - fenced: refused whatever the class
            service.execute(p.id, [msg(p, 99)], "platform:test")
    finally:
        writer.fenced = False
    scraped = samples(metrics.exposition(registry).decode())
    assert value(scraped, "custody_writer_fenced", platform=p.id) == 0
