"""Idempotent replays (also across a restart), ID_REUSED, linked batches and their rollback."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from helpers import (
    OPERATOR,
    START_MS,
    FakeClock,
    Platform,
    assert_balanced,
    assert_no_negative,
    bal,
    deposit,
    hold,
    last_position,
    log_records,
    make_platform,
    money_state,
    ok,
    open_service,
    record_at,
    run,
    run1,
    snapshot,
    transfer,
)

from ledger import commands as c
from ledger.config import Config
from ledger.service import LedgerService

PID = "p1"
LATER = START_MS + 3_600_000


def _instructions(p: Platform) -> list[Any]:
    """One of each accepted kind, in an order that makes them all succeed."""
    return [
        c.OpenAccount(
            client_id="open-dan",
            account_id="dan",
            kind="customer",
            currency="CNY",
            role="borrower",
            holder_name="Dan Smith",
        ),
        deposit(p, "d1", "alice", 10_000),
        transfer(p, "t1", "alice", "bob", 1_000, "bid"),
        c.ChargeFee(
            client_id="f1",
            from_account_id="alice",
            to_account_id=p.fee,
            amount_minor=10,
            currency="CNY",
            fee_code="F",
        ),
        hold(p, "h1", "alice", "bob", 500, LATER),
        c.CaptureHold(client_id="cap1", hold_id="h1", amount_minor=200),
        hold(p, "h2", "alice", "carol", 300, LATER),
        c.ReleaseHold(client_id="rel2", hold_id="h2", reason="lost"),
        c.RequestWithdrawal(
            client_id="w1",
            account_id="alice",
            mirror_account_id=p.omni,
            amount_minor=100,
            currency="CNY",
            payee_ref="bank:alice",
            expires_at_ms=LATER,
        ),
        c.SettleWithdrawal(client_id="w1-s", withdrawal_id="w1"),
        c.Reverse(client_id="r1", movement_id="t1", reason="error"),
        c.FreezeAccount(client_id="fz", account_id="carol", reason="kyc"),
        c.ExpireHolds(client_id="sweep"),
    ]


def test_same_id_same_content_replays(service: LedgerService, platform: Platform) -> None:
    cmds = _instructions(platform)
    first = ok(service, PID, *cmds)
    before, last = snapshot(service, PID), last_position(service, PID)
    again = run(service, PID, *cmds)
    assert [(o.client_id, o.status, o.seq, o.kind) for o in again] == [
        (o.client_id, "replayed", o.seq, o.kind) for o in first
    ]
    assert all(o.ok for o in again)
    assert snapshot(service, PID) == before
    assert last_position(service, PID) == last


def test_replay_ignores_actor_and_linking(service: LedgerService, platform: Platform) -> None:
    [first] = ok(service, PID, deposit(platform, "d1", "alice", 5))
    before = snapshot(service, PID)
    [o1] = service.execute(PID, [deposit(platform, "d1", "alice", 5)], "operator:someone-else")
    [o2] = run(service, PID, deposit(platform, "d1", "alice", 5), linked=True)
    assert (o1.status, o1.seq) == (o2.status, o2.seq) == ("replayed", first.seq)
    assert snapshot(service, PID) == before


def test_replay_within_one_batch(service: LedgerService, platform: Platform) -> None:
    p = platform
    outcomes = run(service, PID, deposit(p, "d1", "alice", 5), deposit(p, "d1", "alice", 5))
    assert [o.status for o in outcomes] == ["accepted", "replayed"]
    assert outcomes[0].seq == outcomes[1].seq
    assert bal(service, PID, "alice") == (5, 0, 5)
    assert sum(1 for r in log_records(service, PID) if r["cid"] == "d1") == 1


@pytest.mark.parametrize(
    "changed",
    [
        {"amount_minor": 1_001},
        {"to_account_id": "carol"},
        {"purpose": "repayment"},
    ],
    ids=["amount", "payee", "purpose"],
)
def test_same_id_other_content_is_id_reused(
    service: LedgerService, platform: Platform, changed: dict[str, Any]
) -> None:
    p = platform
    ok(service, PID, deposit(p, "d1", "alice", 10_000))
    [first] = ok(service, PID, transfer(p, "t1", "alice", "bob", 1_000))
    fields = {
        "client_id": "t1",
        "from_account_id": "alice",
        "to_account_id": "bob",
        "amount_minor": 1_000,
        "currency": "CNY",
        **changed,
    }
    before = snapshot(service, PID)
    [o] = run(service, PID, c.Transfer(**fields))
    assert (o.status, o.code, o.control) == ("refused", "ID_REUSED", "idempotency")
    assert o.seq == before["next_seq"]
    assert record_at(service, PID, o.seq)["code"] == "ID_REUSED"
    assert money_state(snapshot(service, PID)) == money_state(before)
    # the original is still what the id means
    [replayed] = run(service, PID, transfer(p, "t1", "alice", "bob", 1_000))
    assert (replayed.status, replayed.seq) == ("replayed", first.seq)


def test_id_reused_for_another_kind_of_instruction(
    service: LedgerService, platform: Platform
) -> None:
    p = platform
    ok(service, PID, deposit(p, "x1", "alice", 10))
    [o] = run(service, PID, c.FreezeAccount(client_id="x1", account_id="bob", reason="r"))
    assert o.code == "ID_REUSED"
    with service.reading(PID) as st:
        assert str(st.accounts["bob"].status) == "open"


def test_open_account_with_personal_data_replays(
    service: LedgerService, platform: Platform
) -> None:
    cmd = c.OpenAccount(
        client_id="open-dan",
        account_id="dan",
        kind="customer",
        currency="CNY",
        role="other",
        holder_name="Dan",
    )
    [first] = ok(service, PID, cmd)
    [again] = run(service, PID, cmd)
    assert (again.status, again.seq) == ("replayed", first.seq)
    other_name = c.OpenAccount(
        client_id="open-dan",
        account_id="dan",
        kind="customer",
        currency="CNY",
        role="other",
        holder_name="Daniel",
    )
    [conflict] = run(service, PID, other_name)
    assert conflict.code == "ID_REUSED"


def test_client_ids_are_per_platform(service: LedgerService, platform: Platform) -> None:
    other = make_platform(service, "p2")
    [a] = ok(service, PID, deposit(platform, "d1", "alice", 5))
    [b] = ok(service, "p2", deposit(other, "d1", "alice", 7))
    assert a.status == b.status == "accepted"
    assert bal(service, PID, "alice") == (5, 0, 5)
    assert bal(service, "p2", "alice") == (7, 0, 7)


def test_replay_survives_restart(config: Config, clock: FakeClock) -> None:
    service = open_service(config, clock)
    try:
        p = make_platform(service)
        cmds = _instructions(p)
        first = ok(service, PID, *cmds)
        before = snapshot(service, PID)
    finally:
        service.close()
    service = open_service(config, clock)
    try:
        assert snapshot(service, PID) == before
        again = run(service, PID, *cmds)
        assert [(o.status, o.seq) for o in again] == [("replayed", o.seq) for o in first]
        assert snapshot(service, PID) == before
        [conflict] = run(service, PID, deposit(p, "d1", "alice", 10_001))
        assert conflict.code == "ID_REUSED"
        [fresh] = run(service, PID, deposit(p, "d2", "alice", 1))
        assert (fresh.status, fresh.seq) == ("accepted", before["next_seq"] + 1)
    finally:
        service.close()


# -- linked batches -------------------------------------------------------------------------------


def test_linked_batch_success(service: LedgerService, platform: Platform) -> None:
    p = platform
    ok(service, PID, deposit(p, "d1", "alice", 1_000))
    start = snapshot(service, PID)["next_seq"]
    outcomes = run(
        service,
        PID,
        transfer(p, "l1", "alice", "bob", 600),
        transfer(p, "l2", "bob", "carol", 600),  # only possible after l1
        transfer(p, "l3", "carol", "alice", 100),
        linked=True,
    )
    assert [(o.status, o.seq) for o in outcomes] == [
        ("accepted", start),
        ("accepted", start + 1),
        ("accepted", start + 2),
    ]
    assert bal(service, PID, "alice") == (500, 0, 500)
    assert bal(service, PID, "bob") == (0, 0, 0)
    assert bal(service, PID, "carol") == (500, 0, 500)
    assert_balanced(service, PID)


@pytest.mark.parametrize("failing_index", [0, 1, 3])
def test_linked_batch_failure_changes_nothing(
    service: LedgerService, platform: Platform, failing_index: int
) -> None:
    p = platform
    ok(service, PID, deposit(p, "d1", "alice", 1_000))
    originals: list[Any] = [
        transfer(p, "l0", "alice", "bob", 100),
        transfer(p, "l1", "alice", "carol", 100),
        transfer(p, "l2", "bob", "carol", 50),
        transfer(p, "l3", "alice", "bob", 100),
    ]
    cmds = list(originals)
    cmds[failing_index] = transfer(p, f"l{failing_index}", "carol", "alice", 10**9)
    before = snapshot(service, PID)
    outcomes = run(service, PID, *cmds, linked=True)
    failing = f"l{failing_index}"
    for i, o in enumerate(outcomes):
        assert o.status == "refused"
        if i == failing_index:
            assert (o.code, o.control) == ("INSUFFICIENT_FUNDS", "available_funds")
        else:
            assert (o.code, o.control) == ("LINKED_FAILED", "linked_batch")
            assert failing in o.message
    after = snapshot(service, PID)
    assert money_state(after) == money_state(before)
    # one refusal record per item, in order, each naming the cause
    assert [o.seq for o in outcomes] == list(range(before["next_seq"], before["next_seq"] + 4))
    recs = [record_at(service, PID, o.seq) for o in outcomes]
    assert [r["cid"] for r in recs] == [f"l{i}" for i in range(4)]
    for i, r in enumerate(recs):
        assert r["kind"] == "command_refused"
        assert r.get("linked_to") == (None if i == failing_index else failing)
    # none of the ids was consumed: the same batch succeeds once the cause is fixed
    retried = run(service, PID, *originals, linked=True)
    assert [o.status for o in retried] == ["accepted"] * 4
    assert bal(service, PID, "alice") == (700, 0, 700)
    assert bal(service, PID, "bob") == (150, 0, 150)
    assert bal(service, PID, "carol") == (150, 0, 150)
    assert_balanced(service, PID)
    assert_no_negative(service, PID)


def test_linked_batch_rollback_restores_everything(
    service: LedgerService, platform: Platform, clock: FakeClock, config: Config
) -> None:
    """Accounts opened, holds placed/resolved, freezes: all undone by the savepoint. (Reversals
    are manual operations and cannot be linked: see the next test.)"""
    p = platform
    ok(
        service,
        PID,
        deposit(p, "d1", "alice", 10_000),
        transfer(p, "t0", "alice", "bob", 1_000),
        hold(p, "h0", "alice", "bob", 700, START_MS + 50),
    )
    before = snapshot(service, PID)
    batch: list[Any] = [
        c.OpenAccount(
            client_id="open-dan",
            account_id="dan",
            kind="customer",
            currency="CNY",
            role="lender",
            holder_name="Dan",
        ),
        deposit(p, "d-dan", "dan", 5_000),
        hold(p, "h-dan", "dan", "alice", 2_000, START_MS + 10),
        c.CaptureHold(client_id="cap-dan", hold_id="h-dan", amount_minor=1_500),
        hold(p, "h-new", "alice", "carol", 100, START_MS + 10),
        c.ReleaseHold(client_id="rel-h0", hold_id="h0", reason="in batch"),
        c.FreezeAccount(client_id="fz-bob", account_id="bob", reason="in batch"),
        c.OpenAccount(client_id="open-usd", account_id="usd1", kind="suspense", currency="USD"),
        transfer(p, "boom", "carol", "alice", 1),  # carol has nothing: refused
    ]
    outcomes = run(service, PID, *batch, linked=True)
    assert outcomes[-1].code == "INSUFFICIENT_FUNDS"
    assert all(o.code == "LINKED_FAILED" for o in outcomes[:-1])
    after = snapshot(service, PID)
    assert money_state(after) == money_state(before)
    with service.reading(PID) as st:
        assert "dan" not in st.accounts and "usd1" not in st.accounts
        assert set(st.holds) == {"h0"} and str(st.holds["h0"].status) == "pending"
        assert set(st.pending_holds) == {"h0"}
        assert "USD" not in st.totals_by_currency
    # the restored pending hold is found by the sweep; the rolled-back ones are not
    clock.now = START_MS + 50
    [sweep] = ok(service, PID, c.ExpireHolds(client_id="sweep"))
    assert record_at(service, PID, sweep.seq)["resolve"] == [["h0", 0, "expired"]]
    # the rolled-back ids are free: the batch without its failing item goes through
    clock.now = START_MS
    batch[2] = hold(p, "h-dan", "dan", "alice", 2_000, LATER)
    batch[4] = hold(p, "h-new", "alice", "carol", 100, LATER)
    del batch[5]  # h0 is no longer pending
    retry = run(service, PID, *batch[:-1], linked=True)
    assert [o.status for o in retry] == ["accepted"] * len(batch[:-1]), retry
    assert bal(service, PID, "dan") == (3_500, 0, 3_500)
    assert bal(service, PID, "alice") == (9_000 + 1_500, 100, 10_400)
    assert_balanced(service, PID)
    with service.reading(PID) as st:
        assert service.vault.open(PID, st.accounts["dan"].holder) == "Dan"
    snap = snapshot(service, PID)
    fresh = open_service(config, clock)
    try:
        assert snapshot(fresh, PID) == snap
    finally:
        fresh.close()


def test_manual_operations_cannot_be_linked(service: LedgerService, platform: Platform) -> None:
    """A linked batch holds plain movements and account lifecycle only; a reversal (or any
    manual operation) stands alone, so a savepoint never has to undo one. The whole batch is
    answered invalid and nothing is written."""
    p = platform
    ok(service, PID, deposit(p, "d1", "alice", 100), transfer(p, "t0", "alice", "bob", 10))
    before, last = snapshot(service, PID), last_position(service, PID)
    for manual in (
        c.Reverse(client_id="rev-t0", movement_id="t0", reason="in batch"),
        c.UnfreezeAccount(client_id="unfz", account_id="bob", reason="in batch"),
    ):
        outcomes = service.execute(
            PID, [transfer(p, "t1", "alice", "bob", 5), manual], OPERATOR, linked=True
        )
        assert [(o.status, o.code) for o in outcomes] == [
            ("invalid", "LINKED_FAILED"),
            ("invalid", "INVALID_ARGUMENT"),
        ], outcomes
        assert outcomes[1].field == "op"
        assert snapshot(service, PID) == before and last_position(service, PID) == last
    # alone, the reversal goes through (as the operator's manual operation)
    [rev] = ok(service, PID, c.Reverse(client_id="rev-t0", movement_id="t0", reason="alone"))
    with service.reading(PID) as st:
        assert st.done["t0"].reversed_by == rev.client_id == "rev-t0"


def test_linked_failure_after_a_replayed_item(service: LedgerService, platform: Platform) -> None:
    p = platform
    [d1] = ok(service, PID, deposit(p, "d1", "alice", 100))
    before = snapshot(service, PID)
    outcomes = run(
        service,
        PID,
        deposit(p, "d1", "alice", 100),
        transfer(p, "big", "alice", "bob", 10**6),
        linked=True,
    )
    # d1 already happened: it keeps its original answer and gets no refusal record (BRIEF §3)
    assert (outcomes[0].status, outcomes[0].seq) == ("replayed", d1.seq)
    assert (outcomes[1].status, outcomes[1].code) == ("refused", "INSUFFICIENT_FUNDS")
    assert outcomes[1].seq == d1.seq + 1  # the only record this batch wrote
    assert money_state(snapshot(service, PID)) == money_state(before)
    [again] = run(service, PID, deposit(p, "d1", "alice", 100))
    assert (again.status, again.seq) == ("replayed", d1.seq)


def test_repeated_client_id_inside_a_linked_batch_is_invalid(
    service: LedgerService, platform: Platform
) -> None:
    p = platform
    before = snapshot(service, PID)
    outcomes = run(
        service,
        PID,
        deposit(p, "same", "alice", 1),
        deposit(p, "same", "alice", 2),
        linked=True,
    )
    assert [o.status for o in outcomes] == ["invalid", "invalid"]
    assert outcomes[1].field == "client_id"
    assert snapshot(service, PID) == before


def test_linked_and_unlinked_requests_in_one_group(
    service: LedgerService, platform: Platform
) -> None:
    """Concurrent submissions share commits; each linked request is still all-or-none."""
    p = platform
    ok(service, PID, deposit(p, "d1", "alice", 1_000))
    futures = []
    for i in range(20):
        futures.append(
            service.submit(
                PID,
                [
                    transfer(p, f"ok{i}-a", "alice", "bob", 1),
                    transfer(p, f"ok{i}-b", "bob", "carol", 1),
                ],
                "platform:client",
                linked=True,
            )
        )
        futures.append(
            service.submit(
                PID,
                [
                    transfer(p, f"bad{i}-a", "alice", "bob", 1),
                    transfer(p, f"bad{i}-b", "carol", "bob", 10**6),
                ],
                "platform:client",
                linked=True,
            )
        )
        futures.append(service.submit(PID, [deposit(p, f"dep{i}", "carol", 2)], "platform:client"))
    results = [f.result(timeout=30) for f in futures]
    for i in range(20):
        good, bad, dep = results[3 * i : 3 * i + 3]
        assert [o.status for o in good] == ["accepted", "accepted"]
        assert [o.code for o in bad] == ["LINKED_FAILED", "INSUFFICIENT_FUNDS"]
        assert dep[0].status == "accepted"
    assert bal(service, PID, "alice") == (980, 0, 980)
    assert bal(service, PID, "bob") == (0, 0, 0)
    assert bal(service, PID, "carol") == (60, 0, 60)
    assert_balanced(service, PID)


def test_concurrent_clients_never_overdraw(service: LedgerService, platform: Platform) -> None:
    p = platform
    ok(service, PID, deposit(p, "d1", "alice", 100))
    results: list[Any] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        outcomes = service.submit(
            PID, [transfer(p, f"spend{n}", "alice", "bob", 10)], "platform:c"
        ).result(30)
        same = service.execute(PID, [transfer(p, f"spend{n}", "alice", "bob", 10)], "platform:c")
        with lock:
            results.append((outcomes[0], same[0]))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 40
    accepted = [first for first, _ in results if first.status == "accepted"]
    assert len(accepted) == 10
    assert all(
        first.code == "INSUFFICIENT_FUNDS" for first, _ in results if first.status != "accepted"
    )
    for first, second in results:
        if first.status == "accepted":
            assert (second.status, second.seq) == ("replayed", first.seq)
    assert bal(service, PID, "alice") == (0, 0, 0)
    assert bal(service, PID, "bob") == (100, 0, 100)
    assert_balanced(service, PID)
    assert_no_negative(service, PID)


def test_same_id_submitted_concurrently_is_written_once(
    service: LedgerService, platform: Platform
) -> None:
    p = platform
    cmd = deposit(p, "once", "alice", 7)
    futures = [service.submit(PID, [cmd], "platform:c") for _ in range(30)]
    outcomes = [f.result(timeout=30)[0] for f in futures]
    assert sorted(o.status for o in outcomes) == ["accepted"] + ["replayed"] * 29
    assert len({o.seq for o in outcomes}) == 1
    assert bal(service, PID, "alice") == (7, 0, 7)
    assert sum(1 for r in log_records(service, PID) if r["cid"] == "once") == 1


def test_single_refusal_does_not_affect_neighbours(
    service: LedgerService, platform: Platform
) -> None:
    p = platform
    ok(service, PID, deposit(p, "d1", "alice", 100))
    outcomes = run(
        service,
        PID,
        transfer(p, "a", "alice", "bob", 60),
        transfer(p, "b", "alice", "bob", 60),
        transfer(p, "c", "alice", "bob", 40),
    )
    assert [o.status for o in outcomes] == ["accepted", "refused", "accepted"]
    assert bal(service, PID, "alice") == (0, 0, 0)
    assert run1(service, PID, transfer(p, "b", "alice", "bob", 60)).code == "INSUFFICIENT_FUNDS"
