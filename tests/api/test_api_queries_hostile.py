"""Hostile input to the read-model queries (statements, balance as of, audit trail): every
malformed request is refused at once with INVALID_ARGUMENT, NOT_FOUND or OUT_OF_RANGE, never
UNKNOWN or INTERNAL, and a forged page token never makes the server wait for a position."""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import grpc
import pytest
from api_helpers import CCY, World
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.api.client import CustodyError
from ledger.api.pb import audit_trail_pb, query_pb

SC = grpc.StatusCode
ALLOWED = {SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.OUT_OF_RANGE}
SETTINGS = settings(
    max_examples=int(os.environ.get("API_HOSTILE_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
texts = st.one_of(st.text(max_size=80), st.text(min_size=120, max_size=300))


def _forged(kind: str, snapshot: int, inner: str, platform: str = "p1") -> str:
    raw = json.dumps({"v": 1, "p": platform, "k": kind, "s": snapshot, "t": inner})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


tokens = st.one_of(
    st.text(max_size=600),
    st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.builds(
        _forged,
        st.sampled_from(["statement", "audit", "accounts"]),
        st.one_of(int64, st.integers(min_value=10**6, max_value=10**12)),
        st.one_of(st.text(max_size=40), st.just("eyJxIjoiMCIsInMiOjEsIm4iOjB9")),
        st.sampled_from(["p1", "p2"]),
    ),
)


def _refused_quickly(call: Any) -> None:
    started = time.monotonic()
    try:
        call()
    except CustodyError as exc:
        assert exc.code in ALLOWED, exc
        assert exc.domain == "custody.v1", exc
    # a forged snapshot past the log's head must not wait for the read model (5 s bound)
    assert time.monotonic() - started < 2.0


@pytest.fixture
def busy(world: World) -> World:
    for i in range(5):
        world.p1.transfer(f"t-{i}", "alice", "bob", 10, CCY)
    return world


@SETTINGS
@given(
    account=st.one_of(st.sampled_from(["alice", "nobody"]), texts),
    page_size=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    token=tokens,
    kinds=st.lists(texts, max_size=40),
    lo=st.one_of(st.none(), int64),
    hi=st.one_of(st.none(), int64),
)
def test_malformed_statements(
    busy: World,
    account: str,
    page_size: int,
    token: str,
    kinds: list[str],
    lo: int | None,
    hi: int | None,
) -> None:
    _refused_quickly(
        lambda: busy.p1.get_statement(
            account,
            from_time_ms=lo,
            to_time_ms=hi,
            kinds=kinds,
            page_size=page_size,
            page_token=token,
        )
    )


@SETTINGS
@given(
    account=st.one_of(st.sampled_from(["alice", "omni", "nobody"]), texts),
    at=st.one_of(
        st.none(),
        st.tuples(st.just("at_position"), int64),
        st.tuples(st.just("at_time_ms"), int64),
    ),
)
def test_malformed_balance_at(busy: World, account: str, at: tuple[str, int] | None) -> None:
    kwargs: dict[str, Any] = {} if at is None else {at[0]: at[1]}
    _refused_quickly(lambda: busy.p1.get_balance_at(account, **kwargs))


@SETTINGS
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            "account_id": texts,
            "actor": texts,
            "role": texts,
            "operation": texts,
            "kind": texts,
            "code": texts,
            "outcome": st.integers(min_value=-(2**31), max_value=2**31 - 1),
            "from_time_ms": int64,
            "to_time_ms": int64,
            "from_position": int64,
            "to_position": int64,
            "page_size": st.integers(min_value=-(2**31), max_value=2**31 - 1),
            "page_token": tokens,
        },
    )
)
def test_malformed_audit_queries(busy: World, fields: dict[str, Any]) -> None:
    client = busy.auditor
    request = audit_trail_pb.ListAuditEventsRequest(platform_id="p1", **fields)

    def call() -> None:
        try:
            client.audit.ListAuditEvents(request, timeout=5, metadata=client.metadata)
        except grpc.RpcError as exc:
            raise CustodyError.from_rpc_error(exc) from None

    _refused_quickly(call)


def test_forged_snapshot_past_the_head_is_an_invalid_token(busy: World) -> None:
    head = busy.p1.get_balance_at("alice").as_of_position
    genuine = busy.p1.get_statement("alice", page_size=1).next_page_token
    inner = json.loads(base64.urlsafe_b64decode(genuine + "=" * (-len(genuine) % 4)))["t"]
    for snapshot in (head + 1, 10**12, -2):
        started = time.monotonic()
        with pytest.raises(CustodyError) as exc:
            busy.p1.get_statement(
                "alice", page_size=1, page_token=_forged("statement", snapshot, inner)
            )
        assert (exc.value.code, exc.value.reason) == (SC.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        assert time.monotonic() - started < 2.0
    # the genuine inner token with a genuine earlier snapshot is accepted
    page = busy.p1.get_statement("alice", page_size=1, page_token=_forged("statement", 3, inner))
    assert page.as_of_position == 3 and all(line.position <= 3 for line in page.items)
    raw = query_pb.GetStatementRequest(platform_id="p1", account_id="alice", page_token=genuine)
    assert busy.p1.queries.GetStatement(raw, timeout=5, metadata=busy.p1.metadata).lines
