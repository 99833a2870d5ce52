"""Statements, balances as of a time or position, and the audit trail, through a real server with
mutual TLS, checked against the log replayed independently (query_helpers). Every test runs on
SQLite and on PostgreSQL (the read models' SQL differs by dialect)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from api_helpers import CCY, World
from helpers import pg_env, require_postgres, sqlite_env
from query_helpers import account_after_each, log_records, make_history, refused_with

from ledger.api.client import (
    AuditEvent,
    CustodyClient,
    CustodyError,
    PageCapReached,
    StatementLine,
    instruction,
)
from ledger.api.server import ServerOptions, running_server
from ledger.config import Config
from ledger.service import LedgerService
from projections.runner import ProjectionRunner

SC = grpc.StatusCode


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


Call = Callable[[], object]


def _walk(client: CustodyClient, account: str, size: int, **kw: object) -> list[StatementLine]:
    lines: list[StatementLine] = []
    token = ""
    as_of = None
    while True:
        page = client.get_statement(account, page_size=size, page_token=token, **kw)  # type: ignore[arg-type]
        assert len(page.items) <= size
        if as_of is None:
            as_of = page.as_of_position
        assert page.as_of_position == as_of  # one snapshot for the whole walk
        lines += page.items
        if not page.next_page_token:
            return lines
        token = page.next_page_token


# -- statements ----------------------------------------------------------------------------------


def test_statement_pages_through_every_line(world: World) -> None:
    make_history(world)
    recs = log_records(world.p1)
    snapshots = account_after_each(recs, "alice")
    lines = _walk(world.p1, "alice", 4)
    # oldest first, no duplicates, no gaps
    keys = [(line.position, line.index) for line in lines]
    assert keys == sorted(set(keys))
    # a line for exactly the records that changed alice's posted or held amount
    changed = {
        s.seq
        for prev, s in itertools.pairwise(snapshots)
        if (s.posted, s.held) != (prev.posted, prev.held)
    }
    assert {line.position for line in lines} == changed
    # balances after each line are the replayed balances after that record
    by_seq = {s.seq: s for s in snapshots}
    last_of_record = {line.position: line for line in lines}
    for seq, line in last_of_record.items():
        assert (line.posted_minor, line.held_minor) == (by_seq[seq].posted, by_seq[seq].held)
    # the running sum of the changes is the balance
    assert sum(line.amount_minor for line in lines) == world.p1.get_balance("alice").posted_minor
    assert sum(line.held_delta_minor for line in lines) == 0  # both holds resolved
    directions = {line.direction for line in lines}
    assert {"credit", "debit", "hold", "capture", "release"} <= directions
    ts = {r["seq"]: r["ts"] for r in recs}
    assert all(line.time_ms == ts[line.position] for line in lines)
    # the same walk with one big page gives the same lines
    page = world.p1.get_statement("alice", page_size=1000)
    assert page.items == lines and page.next_page_token == "" and page.currency == CCY
    # and the client's iterator too
    assert list(world.p1.iter_statement("alice", page_size=3)) == lines


def test_statement_tokens_are_stable_and_walks_are_snapshots(world: World) -> None:
    make_history(world)
    first = world.p1.get_statement("bob", page_size=3)
    again = world.p1.get_statement("bob", page_size=3)
    assert first == again and first.next_page_token
    snapshot = first.as_of_position
    # writes after the first page: the walk still ends at its snapshot
    for i in range(5):
        world.p1.transfer(f"late-{i}", "alice", "bob", 1, CCY)
    rest = list(world.p1.iter_statement("bob", page_size=3))  # a fresh walk sees the new lines
    token = first.next_page_token
    walked = list(first.items)
    while token:
        page = world.p1.get_statement("bob", page_size=3, page_token=token)
        assert page.as_of_position == snapshot
        walked += page.items
        token = page.next_page_token
    assert all(line.position <= snapshot for line in walked)
    assert rest[: len(walked)] == walked
    assert [line.client_id for line in rest[len(walked) :]] == [f"late-{i}" for i in range(5)]
    # the same token answers the same page however often it is used
    second = world.p1.get_statement("bob", page_size=3, page_token=first.next_page_token)
    assert second == world.p1.get_statement("bob", page_size=3, page_token=first.next_page_token)


def test_page_token_of_another_query_is_refused(world: World) -> None:
    make_history(world)
    page = world.p1.get_statement("alice", page_size=2)
    token = page.next_page_token
    assert token
    others: list[Call] = [
        lambda: world.p1.get_statement("bob", page_size=2, page_token=token),
        lambda: world.p1.get_statement("alice", page_size=2, page_token=token, kinds=["deposited"]),
        lambda: world.p1.get_statement("alice", page_size=2, page_token=token, from_time_ms=1),
        lambda: world.p1.list_audit_events(page_size=2, page_token=token),
        lambda: world.p1.list_accounts(page_size=2, page_token=token),
        lambda: world.p1.get_statement("alice", page_token="not-a-token"),
        lambda: world.p1.get_statement("alice", page_token="x" * 600),
        # another platform's caller with a p1 token (its own platform: p2)
        lambda: world.auditor.get_statement("alice", page_token=token, platform_id="p2"),
    ]
    for call in others:
        with pytest.raises(CustodyError) as exc:
            call()
        refused_with(exc, SC.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        assert "page_token" in exc.value.fields
    audit_token = world.p1.list_audit_events(page_size=2).next_page_token
    with pytest.raises(CustodyError) as exc:
        world.p1.get_statement("alice", page_size=2, page_token=audit_token)
    refused_with(exc, SC.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    # the token still works for its own query
    assert world.p1.get_statement("alice", page_size=2, page_token=token).items


def test_statement_filters_by_time_and_kind(world: World) -> None:
    make_history(world)
    recs = log_records(world.p1)
    every = _walk(world.p1, "alice", 1000)
    times = sorted({line.time_ms for line in every})
    assert len(times) >= 3, "the history should span several milliseconds"
    lo, hi = times[1], times[-2]
    ranged = _walk(world.p1, "alice", 2, from_time_ms=lo, to_time_ms=hi)
    assert ranged == [line for line in every if lo <= line.time_ms <= hi]
    assert _walk(world.p1, "alice", 5, from_time_ms=hi + 1) == [
        line for line in every if line.time_ms > hi
    ]
    kinds = ["hold_placed", "hold_captured"]
    assert {r["kind"] for r in recs} >= {"hold_placed"}
    filtered = _walk(world.p1, "alice", 2, kinds=kinds)
    assert filtered and filtered == [line for line in every if line.kind in kinds]
    bad_queries: list[Call] = [
        lambda: world.p1.get_statement("alice", from_time_ms=10, to_time_ms=5),
        lambda: world.p1.get_statement("alice", from_time_ms=-1),
        lambda: world.p1.get_statement("alice", kinds=["k"] * 33),
        lambda: world.p1.get_statement("alice", kinds=["bad kind"]),
        lambda: world.p1.get_statement("alice", page_size=-1),
        lambda: world.p1.get_statement("no such/account"),
    ]
    for bad in bad_queries:
        with pytest.raises(CustodyError) as exc:
            bad()
        refused_with(exc, SC.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    with pytest.raises(CustodyError) as exc:
        world.p1.get_statement("nobody")
    refused_with(exc, SC.NOT_FOUND, "ACCOUNT_NOT_FOUND")


def test_page_size_is_capped_and_iterator_page_cap_is_loud(world: World) -> None:
    p1 = world.p1
    for start, n in ((0, 500), (500, 500), (1_000, 5)):  # 1,005 lines for bob, in batches
        p1.submit_batch(
            [
                instruction(
                    "transfer",
                    client_id=f"m-{start + k}",
                    from_account_id="alice",
                    to_account_id="bob",
                    amount_minor=1,
                    currency=CCY,
                )
                for k in range(n)
            ]
        )
    big = p1.get_statement("bob", page_size=5_000)
    assert len(big.items) == 1_000 and big.next_page_token
    default = p1.get_statement("bob")
    assert len(default.items) == 100
    with pytest.raises(PageCapReached) as cap:
        list(p1.iter_statement("bob", page_size=10, max_pages=3))
    assert cap.value.next_page_token
    rest = p1.get_statement("bob", page_size=1000, page_token=cap.value.next_page_token)
    assert rest.items[0].position > 0


# -- balance as of a position or a time -------------------------------------------------------


@pytest.mark.parametrize("account", ["alice", "bob", "carol", "omni", "fee"])
def test_balance_at_every_position_equals_replaying_the_prefix(world: World, account: str) -> None:
    make_history(world)
    recs = log_records(world.p1)
    opened = next(
        r["seq"] for r in recs if r["kind"] == "account_opened" and r["account"]["id"] == account
    )
    for snap in account_after_each(recs, account):
        if snap.seq < opened:
            continue
        bal = world.auditor.get_balance_at(account, at_position=snap.seq, platform_id="p1")
        assert bal.as_of_position == snap.seq
        assert (bal.posted_minor, bal.held_minor, bal.available_minor) == (
            snap.posted,
            snap.held,
            snap.available,
        ), snap
        assert bal.currency == CCY
        assert bal.last_movement_position <= snap.seq
    # now = the head: the same figures as the live GetBalance
    live = world.p1.get_balance(account)
    now = world.p1.get_balance_at(account)
    assert now.as_of_position == live.as_of_position == recs[-1]["seq"]
    assert (now.posted_minor, now.held_minor, now.available_minor) == (
        live.posted_minor,
        live.held_minor,
        live.available_minor,
    )


def test_balance_at_a_time(world: World) -> None:
    make_history(world)
    recs = log_records(world.p1)
    snaps = account_after_each(recs, "alice")
    for snap in snaps[::3]:
        # after every record written at or before that millisecond
        last = max(s.seq for s in snaps if s.ts <= snap.ts)
        bal = world.p1.get_balance_at("alice", at_time_ms=snap.ts)
        assert bal.as_of_position == last
        assert bal.posted_minor == snaps[last].posted and bal.held_minor == snaps[last].held
    before = world.p1.get_balance_at("alice", at_time_ms=recs[0]["ts"] - 1)
    assert before.as_of_position == -1 and before.posted_minor == 0
    assert before.last_movement_position == -1
    future = world.p1.get_balance_at("alice", at_time_ms=recs[-1]["ts"] + 3_600_000)
    assert future.as_of_position == recs[-1]["seq"]


def test_balance_at_refusals(world: World) -> None:
    head = log_records(world.p1)[-1]["seq"]
    with pytest.raises(CustodyError) as exc:
        world.p1.get_balance_at("alice", at_position=head + 1)
    refused_with(exc, SC.OUT_OF_RANGE, "POSITION_OUT_OF_RANGE")
    assert exc.value.metadata["head_position"] == str(head)
    with pytest.raises(CustodyError) as exc:
        world.p1.get_balance_at("alice", at_position=-1)
    refused_with(exc, SC.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    with pytest.raises(CustodyError) as exc:
        world.p1.get_balance_at("ghost")
    refused_with(exc, SC.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    with pytest.raises(CustodyError) as exc:
        world.operator.get_balance_at("alice", platform_id="p9")
    refused_with(exc, SC.NOT_FOUND, "PLATFORM_NOT_FOUND")
    with pytest.raises(ValueError):
        world.p1.get_balance_at("alice", at_position=1, at_time_ms=1)


# -- the audit trail -----------------------------------------------------------------------------


def _all_events(client: CustodyClient, **filters: Any) -> list[AuditEvent]:
    return list(client.iter_audit_events(page_size=3, **filters))


def test_audit_trail_has_every_record_and_filters(world: World) -> None:
    make_history(world)
    recs = log_records(world.p1)
    events = _all_events(world.auditor, platform_id="p1")
    assert [e.position for e in events] == [r["seq"] for r in recs]
    for e, r in zip(events, recs, strict=True):
        assert (e.kind, e.actor, e.time_ms) == (r["kind"], r["actor"], r["ts"])
        assert e.outcome == ("refused" if r["kind"] == "command_refused" else "accepted")
        assert e.role == r["actor"].split(":")[0]
        assert e.client_id == r.get("cid", "")
    refused = [e for e in events if e.outcome == "refused"]
    assert refused and refused[0].code == "INSUFFICIENT_FUNDS"
    assert refused[0].account_ids == ("carol", "bob") or set(refused[0].account_ids) == {
        "carol",
        "bob",
    }
    assert refused[0].amount_minor == 1_000_000

    def check(expected: list[AuditEvent], **filters: Any) -> None:
        got = _all_events(world.auditor, platform_id="p1", **filters)
        assert got == expected, filters
        assert expected, f"the history should have events for {filters}"

    check(refused, outcome="refused")
    check([e for e in events if e.outcome == "accepted"], outcome="accepted")
    check([e for e in events if e.code == "INSUFFICIENT_FUNDS"], code="INSUFFICIENT_FUNDS")
    check([e for e in events if "carol" in e.account_ids], account_id="carol")
    check([e for e in events if e.actor == "operator:dev"], actor="operator:dev")
    check([e for e in events if e.role == "platform"], role="platform")
    check([e for e in events if e.operation == "transfer"], operation="transfer")
    check([e for e in events if e.kind == "reversed"], kind="reversed")
    check(
        [e for e in events if e.operation == "transfer" and e.outcome == "refused"],
        operation="transfer",
        outcome="refused",
    )
    times = sorted({e.time_ms for e in events})
    lo, hi = times[1], times[-2]
    check([e for e in events if lo <= e.time_ms <= hi], from_time_ms=lo, to_time_ms=hi)
    check([e for e in events if 5 <= e.position <= 20], from_position=5, to_position=20)
    check(
        [e for e in events if "alice" in e.account_ids and e.position >= 10],
        account_id="alice",
        from_position=10,
    )
    reversal = next(e for e in events if e.kind == "reversed")
    assert reversal.reverses == "t-ab-0" and reversal.operation == "reverse"
    assert reversal.policy_version is not None
    assert world.auditor.list_audit_events(platform_id="p1", actor="nobody:x").items == []


def test_audit_trail_walk_is_a_snapshot_and_refuses_bad_filters(world: World) -> None:
    make_history(world)
    first = world.p1.list_audit_events(page_size=5)
    world.p1.transfer("after", "alice", "bob", 1, CCY)
    token, walked = first.next_page_token, list(first.items)
    while token:
        page = world.p1.list_audit_events(page_size=5, page_token=token)
        assert page.as_of_position == first.as_of_position
        walked += page.items
        token = page.next_page_token
    assert walked[-1].position == first.as_of_position
    assert all(e.client_id != "after" for e in walked)
    assert _all_events(world.p1)[-1].client_id == "after"
    for filters in (
        {"account_id": "bad id!"},
        {"actor": "x" * 200},
        {"from_time_ms": 9, "to_time_ms": 8},
        {"from_position": 9, "to_position": 8},
        {"from_position": -1},
        {"page_size": -5},
    ):
        with pytest.raises(CustodyError) as exc:
            world.p1.list_audit_events(**filters)  # type: ignore[arg-type]
        refused_with(exc, SC.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    with pytest.raises(CustodyError) as exc:
        world.p1.list_audit_events(outcome="accepted", page_token=first.next_page_token)
    refused_with(exc, SC.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


# -- who may read what ---------------------------------------------------------------------------


def test_platforms_only_read_their_own_platform(world: World) -> None:
    make_history(world)
    p1, p2 = world.p1, world.p2
    foreign: list[Call] = [
        lambda: p1.get_statement("alice", platform_id="p2"),
        lambda: p1.get_balance_at("alice", platform_id="p2"),
        lambda: p1.list_audit_events(platform_id="p2"),
        lambda: p2.get_statement("alice", platform_id="p1"),
        lambda: p2.get_balance_at("alice", at_position=3, platform_id="p1"),
        lambda: p2.list_audit_events(platform_id="p1", account_id="alice"),
    ]
    for call in foreign:
        with pytest.raises(CustodyError) as exc:
            call()
        refused_with(exc, SC.PERMISSION_DENIED, "PLATFORM_MISMATCH")
    # p2's own platform has no alice, and its trail has only its own records
    with pytest.raises(CustodyError) as exc:
        p2.get_statement("alice")
    refused_with(exc, SC.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    own = _all_events(p2)
    assert [e.kind for e in own] == ["platform_created"]
    assert _all_events(p2, account_id="alice") == []


def test_auditors_and_regulators_read_but_never_write(world: World) -> None:
    make_history(world)
    for reader in (world.auditor, world.regulator, world.checker):
        assert reader.get_statement("alice", platform_id="p1").items
        assert reader.get_balance_at("alice", at_position=5, platform_id="p1").as_of_position == 5
        assert reader.list_audit_events(platform_id="p1", outcome="refused").items
        with pytest.raises(CustodyError) as exc:
            reader.get_statement("alice")  # staff must name the platform
        refused_with(exc, SC.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    for reader in (world.auditor, world.regulator):
        with pytest.raises(CustodyError) as exc:
            reader.transfer("aud-t", "alice", "bob", 1, CCY, platform_id="p1")
        refused_with(exc, SC.PERMISSION_DENIED, "READ_ONLY_ROLE")
    assert (
        world.p1.get_balance("alice").posted_minor == world.p1.get_balance_at("alice").posted_minor
    )


# -- a read model that is behind -----------------------------------------------------------------


def test_projection_behind_is_failed_precondition_with_positions(
    world: World, api_service: LedgerService, pki: Path
) -> None:
    """In `wait` mode (projection workers elsewhere) nothing projects for the query: it waits
    its bound, then answers PROJECTION_BEHIND with both positions; once a worker has caught up
    the same query succeeds."""
    world.p1.transfer("t-w", "alice", "bob", 5, CCY)
    api_service.create_platform("p3", "three", "operator:dev")
    options = ServerOptions(read_models="wait", read_model_wait_s=0.3)
    with (
        running_server(api_service, port=0, tls_dir=pki, options=options) as srv,
        CustodyClient.mtls(
            f"127.0.0.1:{srv.port}",
            pki / "ca.pem",
            pki / "operator-dev.pem",
            pki / "operator-dev.key",
            retries=0,
        ) as op,
    ):
        with pytest.raises(CustodyError) as exc:
            op.list_audit_events(platform_id="p3")
        refused_with(exc, SC.FAILED_PRECONDITION, "PROJECTION_BEHIND")
        assert exc.value.metadata["projected_position"] == "-1"
        assert exc.value.metadata["requested_position"] == "0"
        assert exc.value.retry_delay_s is not None
        runner = ProjectionRunner(api_service.store)
        try:
            runner.catch_up("p3")
        finally:
            runner.close()
        events = op.list_audit_events(platform_id="p3")
        assert [e.kind for e in events.items] == ["platform_created"]
        assert events.as_of_position == 0
