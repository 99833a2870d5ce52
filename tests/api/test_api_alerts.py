"""AlertService and the dashboard port through a real server with mutual TLS, on SQLite and
PostgreSQL: alerts raised by the early-warning system arrive on the stream, acknowledging and
closing are decided by level, the risk indicators and the dashboard come from the engine's read
model."""

from __future__ import annotations

import contextlib
import http.client
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api_helpers import CCY, World
from helpers import pg_env, require_postgres, sqlite_env

from ledger import commands as c
from ledger.api.client import AlertEvent, CustodyError
from ledger.api.server import RunningServer, running_server
from ledger.config import Config
from ledger.service import LedgerService
from risk.engine import RiskEngine

SC = grpc.StatusCode
SYSTEM = "system:early-warning"


@pytest.fixture(params=["sqlite", "postgres"])
def api_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerService]:
    """The ledger behind the server (overrides conftest's SQLite-only one for this module)."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            env = sqlite_env(tmp_path / "data")
        else:
            require_postgres()
            env = stack.enter_context(pg_env(tmp_path / "data"))
        service = LedgerService(Config.from_env(env))
        service.start()
        stack.callback(service.close)
        yield service


@pytest.fixture
def api_server(api_service: LedgerService, pki: Path) -> Iterator[RunningServer]:
    with running_server(
        api_service, host="127.0.0.1", port=0, tls_dir=pki, dashboard_port=0
    ) as srv:
        yield srv


def raise_alert(
    service: LedgerService, alert_id: str, level: str, platform: str = "p1", rule: str = "W15"
) -> int:
    """RaiseAlert as the early-warning system, through the ledger service like the engine."""
    [outcome] = service.execute(
        platform,
        [
            c.RaiseAlert(
                client_id=f"risk:{alert_id}",
                alert_id=alert_id,
                rule=rule,
                level=level,
                subject="alice",
                summary=f"{level} test alert",
            )
        ],
        SYSTEM,
    )
    assert outcome.status == "accepted", outcome
    return outcome.seq


def test_raised_alert_appears_on_the_stream(world: World) -> None:
    events: queue.Queue[AlertEvent | BaseException] = queue.Queue()
    head = world.p1.get_policy().as_of_position + 1

    def follow() -> None:
        try:
            for event in world.p1.stream_alerts(head, follow=True, timeout_s=20):
                events.put(event)
        except CustodyError as exc:
            events.put(exc)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    world.p1.transfer("before-alert", "alice", "bob", 5, CCY)  # not an alert: never streamed
    position = raise_alert(world.service, "W15-aaa", "RED")
    first = events.get(timeout=15)
    assert isinstance(first, AlertEvent)
    assert (first.step, first.alert_id, first.level, first.rule, first.position) == (
        "raised",
        "W15-aaa",
        "RED",
        "W15",
        position,
    )
    assert first.actor == SYSTEM and first.text == "RED test alert" and first.subject == "alice"
    world.checker.acknowledge_alert("ack-1", "W15-aaa", "looking", platform_id="p1")
    second = events.get(timeout=15)
    assert isinstance(second, AlertEvent)
    assert (second.step, second.level, second.actor, second.text) == (
        "acknowledged",
        "RED",
        "checker:dev",
        "looking",
    )
    # another platform's alerts never reach p1's stream
    raise_alert(world.service, "W15-p2", "YELLOW", platform="p2")
    raise_alert(world.service, "W15-bbb", "YELLOW")
    third = events.get(timeout=15)
    assert isinstance(third, AlertEvent) and third.alert_id == "W15-bbb"
    # without follow: the history up to the head, then the stream ends
    history = list(world.auditor.stream_alerts(0, platform_id="p1"))
    assert [(e.step, e.alert_id) for e in history] == [
        ("raised", "W15-aaa"),
        ("acknowledged", "W15-aaa"),
        ("raised", "W15-bbb"),
    ]
    # an acknowledgement of an alert raised before the start position still names its level
    late = list(world.auditor.stream_alerts(position + 1, platform_id="p1"))
    assert (late[0].step, late[0].level, late[0].rule) == ("acknowledged", "RED", "W15")
    with pytest.raises(CustodyError) as denied:
        list(world.p1.stream_alerts(0, platform_id="p2"))
    assert denied.value.reason == "PLATFORM_MISMATCH"


def test_the_stream_ends_cleanly_on_shutdown(api_service: LedgerService, pki: Path) -> None:
    from ledger.api.client import CustodyClient

    api_service.create_platform("p1", "P1", "operator:dev")
    with running_server(api_service, host="127.0.0.1", port=0, tls_dir=pki) as srv:
        client = CustodyClient.mtls(
            f"127.0.0.1:{srv.port}",
            pki / "ca.pem",
            pki / "platform-p1.pem",
            pki / "platform-p1.key",
            retries=0,
        )
        done: queue.Queue[str] = queue.Queue()

        streaming = threading.Event()

        def follow() -> None:
            try:
                for _ in client.stream_alerts(0, follow=True, timeout_s=30):
                    streaming.set()  # the stream is established and delivering
                done.put("ended")
            except CustodyError as exc:
                done.put(f"error {exc.code}")

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        raise_alert(api_service, "W01-x", "ORANGE", rule="W01")
        assert streaming.wait(timeout=10), "the alert never reached the stream"
        srv.stop(grace_s=2.0)  # shut down under an open, following stream
        outcome = done.get(timeout=10)
        client.close()
    assert outcome in ("ended", "error StatusCode.UNAVAILABLE", "error StatusCode.CANCELLED")


def test_close_by_level_and_role(world: World) -> None:
    raise_alert(world.service, "W17-red", "RED", rule="W17")
    raise_alert(world.service, "W16-yellow", "YELLOW", rule="W16")
    # an operator may acknowledge a RED alert but not close it
    world.operator.acknowledge_alert("op-ack", "W17-red", "on it", platform_id="p1")
    with pytest.raises(CustodyError) as refused:
        world.operator.close_alert("op-close", "W17-red", "fixed", platform_id="p1")
    assert (refused.value.code, refused.value.reason) == (
        SC.PERMISSION_DENIED,
        "ALERT_LEVEL_FORBIDDEN",
    )
    assert refused.value.metadata.get("control") == "alerts"
    # a platform may not close a RED alert either, but closes its YELLOW ones
    with pytest.raises(CustodyError) as platform_red:
        world.p1.close_alert("p1-close-red", "W17-red", "fixed")
    assert platform_red.value.reason == "ALERT_LEVEL_FORBIDDEN"
    closed_yellow = world.p1.close_alert("p1-close-y", "W16-yellow", "reviewed")
    assert closed_yellow.status == "accepted" and closed_yellow.kind == "alert_closed"
    # a checker closes RED
    receipt = world.checker.close_alert("ck-close", "W17-red", "top-up done", platform_id="p1")
    assert receipt.status == "accepted"
    again = world.checker.close_alert("ck-close", "W17-red", "top-up done", platform_id="p1")
    assert again.status == "replayed"
    with pytest.raises(CustodyError) as closed:
        world.checker.close_alert("ck-close-2", "W17-red", "again", platform_id="p1")
    assert (closed.value.code, closed.value.reason) == (SC.FAILED_PRECONDITION, "ALERT_CLOSED")
    # read-only roles cannot act on alerts at all
    with pytest.raises(CustodyError) as read_only:
        world.regulator.acknowledge_alert("rg", "W16-yellow", "x", platform_id="p1")
    assert (read_only.value.code, read_only.value.reason) == (
        SC.PERMISSION_DENIED,
        "READ_ONLY_ROLE",
    )
    with pytest.raises(CustodyError) as missing:
        world.checker.close_alert("ck-none", "W99-none", "x", platform_id="p1")
    assert (missing.value.code, missing.value.reason) == (SC.NOT_FOUND, "ALERT_NOT_FOUND")
    with pytest.raises(CustodyError) as other:
        world.p2.acknowledge_alert("p2-ack", "W16-yellow", "x", platform_id="p1")
    assert other.value.reason == "PLATFORM_MISMATCH"


def test_list_and_get_alerts(world: World) -> None:
    ids = []
    for i, level in enumerate(["GREEN", "YELLOW", "ORANGE", "RED", "YELLOW", "RED", "RED"]):
        ids.append(f"W0{i}-{level.lower()}")
        raise_alert(world.service, ids[-1], level, rule=f"W0{i}")
    world.checker.close_alert("close-1", ids[3], "done", platform_id="p1")
    every = list(world.auditor.iter_alerts(page_size=2, platform_id="p1"))
    assert [a.alert_id for a in every] == ids  # in the order they were raised
    assert [a.raised_position for a in every] == sorted(a.raised_position for a in every)
    reds = list(world.p1.iter_alerts(level="RED", page_size=1))
    assert [a.alert_id for a in reds] == [ids[3], ids[5], ids[6]]
    open_reds = list(world.p1.iter_alerts(level="red", status="raised"))
    assert [a.alert_id for a in open_reds] == [ids[5], ids[6]]
    one = world.regulator.get_alert(ids[3], platform_id="p1")
    assert (one.status, one.level, one.rule, one.summary, one.raised_by) == (
        "closed",
        "RED",
        "W03",
        "RED test alert",
        SYSTEM,
    )
    assert world.p2.list_alerts().items == []
    with pytest.raises(CustodyError) as missing:
        world.p2.get_alert(ids[0])
    assert missing.value.reason == "ALERT_NOT_FOUND"
    with pytest.raises(CustodyError) as bad_token:
        world.p1.list_alerts(page_token=world.p2.list_alerts(page_size=1).next_page_token or "x")
    assert bad_token.value.reason == "INVALID_PAGE_TOKEN"


def test_indicators_and_dashboard_from_the_engine(world: World) -> None:
    service = world.service
    series, position = world.auditor.get_risk_indicators(platform_id="p1")
    assert (series, position) == ({}, -1)  # the engine has not read p1 yet
    raise_alert(service, "W15-dash", "RED")
    RiskEngine(service).catch_up("p1")
    series, position = world.p1.get_risk_indicators()
    assert position >= 0
    assert series["records"] and sum(v for _, v in series["records"]) >= position
    port = world.server.dashboard_port
    assert port is not None

    def get(path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(method, path)
        answer = conn.getresponse()
        body = answer.read().decode("utf-8")
        headers = {k.lower(): v for k, v in answer.getheaders()}
        conn.close()
        return answer.status, body, headers

    status, body, headers = get("/dashboard")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "风险预警" in body and "Risk dashboard" in body  # both languages
    assert "W15-dash" in body and "<script" not in body
    assert "default-src 'none'" in headers["content-security-policy"]
    status, one, _ = get("/dashboard?platform=p1")
    assert status == 200 and "platform-p1" in one and "platform-p2" not in one
    assert get("/dashboard?platform=p1%27%20OR%201=1")[0] == 404
    assert get("/dashboard?platform=nope")[0] == 404
    assert get("/dashboard?sql=1")[0] == 400
    assert get("/elsewhere")[0] == 404
    assert get("/dashboard", "POST")[0] == 405
    assert get("/dashboard", "DELETE")[0] == 405
