"""Every RPC's happy path, end to end through a real server with mutual TLS."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from api_helpers import CCY, World

from ledger.api.client import CustodyError, instruction
from ledger.api.pb import common_pb


def test_create_platform_and_list_nothing(world: World) -> None:
    receipt = world.operator.create_platform("p3", "Platform three")
    assert receipt.kind == "platform_created"
    assert receipt.position == 0
    page = world.operator.list_accounts(platform_id="p3")
    assert page.items == [] and page.next_page_token == ""


def test_account_lifecycle(world: World) -> None:
    p1 = world.p1
    r = p1.open_account(
        "o-dave", "dave", kind="customer", currency=CCY, role="guarantor", holder_name="Dave D"
    )
    assert r.kind == "account_opened" and not r.replayed
    again = p1.open_account(
        "o-dave", "dave", kind="customer", currency=CCY, role="guarantor", holder_name="Dave D"
    )
    assert again.replayed and again.position == r.position
    acc = p1.get_account("dave")
    assert acc.kind == common_pb.ACCOUNT_KIND_CUSTOMER
    assert acc.role == common_pb.CUSTOMER_ROLE_GUARANTOR
    assert acc.status == common_pb.ACCOUNT_STATUS_OPEN
    assert acc.opened_position == r.position
    assert p1.freeze_account("f-dave", "dave", "kyc review").kind == "account_frozen"
    assert p1.get_account("dave").status == common_pb.ACCOUNT_STATUS_FROZEN
    # unfreezing is a manual operation: the custodian's operator, not the platform
    unfrozen = world.operator.unfreeze_account("u-dave", "dave", "kyc done", platform_id="p1")
    assert unfrozen.kind == "account_unfrozen"
    assert p1.close_account("c-dave", "dave").kind == "account_closed"
    assert p1.get_account("dave").status == common_pb.ACCOUNT_STATUS_CLOSED


def test_movements(world: World) -> None:
    p1 = world.p1
    assert p1.transfer("t1", "alice", "bob", 3_000, CCY, purpose="disbursement").kind == (
        "transferred"
    )
    operator = world.operator
    assert operator.reverse("rev1", "t1", "mistake", platform_id="p1").kind == "reversed"
    assert p1.charge_fee("fee1", "alice", "fee", 100, CCY, "service").kind == "fee_charged"
    topped = operator.top_up_shortfall("top1", "own", "carol", 50, CCY, "late", platform_id="p1")
    assert topped.kind == "shortfall_topped_up"
    assert p1.deposit("d-susp", "omni", "susp", 70, CCY, bank_ref="unknown").kind == "deposited"
    assert p1.get_balance("alice").posted_minor == 10_000 - 100
    assert p1.get_balance("bob").posted_minor == 0
    assert p1.get_balance("carol").posted_minor == 50
    assert p1.get_balance("susp").posted_minor == 70


def test_balances_after_movements(world: World) -> None:
    p1 = world.p1
    p1.transfer("t1", "alice", "bob", 3_000, CCY)
    p1.charge_fee("fee1", "bob", "fee", 100, CCY, "service")
    alice, bob, fee = (p1.get_balance(a) for a in ("alice", "bob", "fee"))
    assert (alice.posted_minor, alice.held_minor, alice.available_minor) == (7_000, 0, 7_000)
    assert (bob.posted_minor, bob.available_minor) == (2_900, 2_900)
    assert fee.posted_minor == 100
    assert alice.currency == CCY
    assert alice.as_of_position == bob.as_of_position


def test_holds_and_withdrawals(world: World) -> None:
    p1 = world.p1
    assert p1.place_hold("h1", "alice", "bob", 1_000, CCY, "bid", world.future_ms()).kind == (
        "hold_placed"
    )
    alice = p1.get_balance("alice")
    assert (alice.posted_minor, alice.held_minor, alice.available_minor) == (10_000, 1_000, 9_000)
    assert p1.capture_hold("cap1", "h1", 400).kind == "hold_captured"
    assert p1.get_balance("bob").posted_minor == 400
    p1.place_hold("h2", "alice", "bob", 500, CCY, "bid", world.future_ms())
    assert p1.release_hold("rel2", "h2", "outbid").kind == "hold_released"
    assert p1.expire_holds("exp1").kind == "holds_expired"
    w = p1.request_withdrawal("w1", "alice", "omni", 2_000, CCY, "acct-9", world.future_ms())
    assert w.kind == "withdrawal_requested"
    assert p1.settle_withdrawal("ws1", "w1", bank_ref="b-1").kind == "withdrawal_settled"
    p1.request_withdrawal("w2", "alice", "omni", 100, CCY, "acct-9", world.future_ms())
    assert p1.fail_withdrawal("wf2", "w2", "bank rejected").kind == "withdrawal_failed"
    alice = p1.get_balance("alice")
    assert (alice.posted_minor, alice.held_minor) == (10_000 - 400 - 2_000, 0)


def test_submit_batch_unlinked_mixes_results(world: World) -> None:
    results = world.p1.submit_batch(
        [
            instruction(
                "transfer",
                client_id="b1",
                from_account_id="alice",
                to_account_id="bob",
                amount_minor=10,
                currency=CCY,
            ),
            instruction(
                "transfer",
                client_id="b2",
                from_account_id="alice",
                to_account_id="bob",
                amount_minor=10**9,
                currency=CCY,
            ),
            instruction(
                "transfer",
                client_id="b3",
                from_account_id="alice",
                to_account_id="bob",
                amount_minor=10,
                currency="???",
            ),
            instruction(
                "open_account",
                client_id="b4",
                account_id="erin",
                kind="customer",
                currency=CCY,
                role="lender",
            ),
        ]
    )
    assert [r.status for r in results] == ["accepted", "refused", "invalid", "accepted"]
    assert results[1].reason == "INSUFFICIENT_FUNDS" and results[1].control
    assert results[2].reason == "INVALID_ARGUMENT" and results[2].field == "currency"
    assert results[2].position == -1
    assert world.p1.get_balance("bob").posted_minor == 10


def test_submit_batch_linked_all_or_nothing(world: World) -> None:
    items = [
        instruction(
            "transfer",
            client_id="L1",
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=10,
            currency=CCY,
        ),
        instruction(
            "transfer",
            client_id="L2",
            from_account_id="bob",
            to_account_id="alice",
            amount_minor=10**9,
            currency=CCY,
        ),
    ]
    results = world.p1.submit_batch(items, linked=True)
    assert [r.reason for r in results] == ["LINKED_FAILED", "INSUFFICIENT_FUNDS"]
    assert world.p1.get_balance("bob").posted_minor == 0
    ok = world.p1.submit_batch(items[:1], linked=True)
    assert [r.status for r in ok] == ["accepted"]


def test_list_accounts_paginates(world: World) -> None:
    p1 = world.p1
    items = [
        instruction(
            "open_account",
            client_id=f"bulk-{i:03}",
            account_id=f"z{i:03}",
            kind="customer",
            currency=CCY,
            role="other",
        )
        for i in range(25)
    ]
    assert all(r.ok for r in p1.submit_batch(items))
    first = p1.list_accounts(page_size=10)
    assert len(first.items) == 10 and first.next_page_token
    ids = [a.account_id for a in p1.iter_accounts(page_size=7)]
    assert ids == sorted(ids) and len(ids) == 33 and len(set(ids)) == 33
    balances = p1.list_balances(page_size=5000)  # coerced to the 1000 cap
    assert len(balances.items) == 33 and balances.next_page_token == ""
    assert {b.account_id: b.posted_minor for b in balances.items}["alice"] == 10_000


def test_page_token_is_bound_to_its_list(world: World) -> None:
    token = world.p1.list_accounts(page_size=1).next_page_token
    with pytest.raises(CustodyError) as err:
        world.p1.list_balances(page_size=1, page_token=token)
    assert err.value.reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(CustodyError) as err:
        world.p1.list_accounts(page_size=-1)
    assert err.value.code.name == "INVALID_ARGUMENT"


def test_subscribe_log_returns_the_chain(world: World) -> None:
    records = list(world.p1.subscribe_log())
    assert [r.position for r in records] == list(range(len(records)))
    head = b"\x00" * 32
    for r in records:
        head = hashlib.sha256(head + r.record).digest()
        assert r.chain_hash == head
        assert msgspec.json.decode(r.record)["kind"] == r.kind
    assert records[0].kind == "platform_created"
    tail = list(world.p1.subscribe_log(start_position=len(records) - 2))
    assert [r.position for r in tail] == [len(records) - 2, len(records) - 1]


def test_subscribe_log_follows_new_records(world: World) -> None:
    start = len(list(world.p1.subscribe_log()))
    stream = world.auditor.subscribe_log(start, follow=True, timeout_s=10, platform_id="p1")
    world.p1.transfer("t-follow", "alice", "bob", 1, CCY)
    first = next(stream)
    assert first.position == start and first.kind == "transferred"
    stream.close()


def test_operator_acts_on_any_platform(world: World) -> None:
    r = world.operator.open_account(
        "op-x", "x", kind="customer", currency=CCY, role="other", platform_id="p2"
    )
    assert r.kind == "account_opened"
    assert world.p2.get_account("x").platform_id == "p2"


def test_read_only_roles_can_read(world: World) -> None:
    for client in (world.auditor, world.regulator, world.checker):
        assert client.get_balance("alice", platform_id="p1").posted_minor == 10_000
        assert client.list_accounts(platform_id="p1").items


def test_concurrent_single_transfers_share_commits(world: World) -> None:
    from concurrent.futures import ThreadPoolExecutor

    p1 = world.p1
    with ThreadPoolExecutor(16) as pool:
        receipts = list(
            pool.map(lambda i: p1.transfer(f"c-{i}", "alice", "bob", 1, CCY), range(200))
        )
    assert len({r.position for r in receipts}) == 200
    assert p1.get_balance("bob").posted_minor == 200
