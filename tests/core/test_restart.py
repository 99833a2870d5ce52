"""Restart reproduces the live state exactly; personal data is only ever stored as ciphertext."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import (
    START_MS,
    FakeClock,
    Platform,
    assert_balanced,
    deposit,
    hold,
    log_records,
    make_platform,
    ok,
    open_service,
    pg_execute,
    run,
    snapshot,
    transfer,
)

from ledger import commands as c
from ledger.config import Config
from ledger.pii import PiiError
from ledger.service import LedgerService
from ledger.writer import verify_stored_chain

PID = "p1"
LATER = START_MS + 3_600_000
NAMES = {"dan": "Dan Q. Testperson-7781", "erin": "张三丰测试"}
FAY = "Fay Uniquename-5512"  # only ever in a refused (linked-failed) instruction


def _mixed_history(service: LedgerService, clock: FakeClock) -> Platform:
    p = make_platform(service)
    usd = make_platform(service, PID, currency="USD", customers=("zed",), prefix="usd-")
    other = make_platform(service, "p2", customers=("alice", "yan"))
    for account_id, name in NAMES.items():
        ok(
            service,
            PID,
            c.OpenAccount(
                client_id=f"open:{account_id}",
                account_id=account_id,
                kind="customer",
                currency="CNY",
                role="lender",
                holder_name=name,
            ),
        )
    ok(
        service,
        PID,
        deposit(p, "d1", "alice", 50_000),
        deposit(p, "d2", "dan", 7_000),
        deposit(usd, "d-usd", "usd-zed", 999),
        c.Deposit(
            client_id="d-own",
            mirror_account_id=p.pbank,
            account_id=p.own,
            amount_minor=3_000,
            currency="CNY",
        ),
        transfer(p, "t1", "alice", "bob", 4_000, "disbursement"),
        transfer(p, "t2", "bob", "carol", 1_000, "repayment"),
        c.ChargeFee(
            client_id="f1",
            from_account_id="alice",
            to_account_id=p.fee,
            amount_minor=25,
            currency="CNY",
            fee_code="F",
        ),
        c.TopUpShortfall(
            client_id="top",
            from_account_id=p.own,
            to_account_id="erin",
            amount_minor=300,
            currency="CNY",
            reason="x",
        ),
        hold(p, "h-pending", "alice", "bob", 1_000, LATER),
        hold(p, "h-cap", "alice", "carol", 800, LATER),
        c.CaptureHold(client_id="cap", hold_id="h-cap", amount_minor=500),
        hold(p, "h-rel", "dan", "bob", 100, LATER),
        c.ReleaseHold(client_id="rel", hold_id="h-rel", reason="cancelled"),
        hold(p, "h-exp", "dan", "carol", 100, START_MS + 10),
        c.RequestWithdrawal(
            client_id="w-pending",
            account_id="carol",
            mirror_account_id=p.omni,
            amount_minor=200,
            currency="CNY",
            payee_ref="bank:carol",
            expires_at_ms=LATER,
        ),
        c.RequestWithdrawal(
            client_id="w-done",
            account_id="bob",
            mirror_account_id=p.omni,
            amount_minor=300,
            currency="CNY",
            payee_ref="bank:bob",
            expires_at_ms=LATER,
        ),
        c.SettleWithdrawal(client_id="w-done-s", withdrawal_id="w-done"),
        c.Reverse(client_id="rev-t2", movement_id="t2", reason="error"),
        c.FreezeAccount(client_id="fz", account_id="erin", reason="kyc"),
    )
    # refusals and a failed linked batch are part of the history too
    run(service, PID, transfer(p, "too-much", "bob", "alice", 10**9))
    run(
        service,
        PID,
        transfer(p, "l1", "alice", "bob", 1),
        c.OpenAccount(
            client_id="open-fay",
            account_id="fay",
            kind="customer",
            currency="CNY",
            role="other",
            holder_name=FAY,
        ),
        transfer(p, "l2", "erin", "bob", 1),  # erin is frozen
        linked=True,
    )
    clock.now = START_MS + 10
    ok(service, PID, c.ExpireHolds(client_id="sweep"))
    ok(service, "p2", c.CloseAccount(client_id="close-yan", account_id="yan"))
    ok(service, "p2", deposit(other, "p2-d", "alice", 5))
    clock.now = START_MS + 20
    return p


def test_restart_reproduces_state(config: Config, clock: FakeClock) -> None:
    service = open_service(config, clock)
    try:
        p = _mixed_history(service, clock)
        before = {pid: snapshot(service, pid) for pid in ("p1", "p2")}
        heads = {pid: service.head(pid) for pid in ("p1", "p2")}
    finally:
        service.close()
    service = open_service(config, clock)
    try:
        assert service.platform_ids() == ["p1", "p2"]
        for pid in ("p1", "p2"):
            assert snapshot(service, pid) == before[pid]
            assert service.head(pid) == heads[pid]
            n, bad, reason = verify_stored_chain(service.store, pid)
            assert (n, bad, reason) == (before[pid]["next_seq"], None, "ok")
            assert_balanced(service, pid)
        with service.reading(PID) as st:
            assert str(st.holds["h-pending"].status) == "pending"
            assert str(st.holds["h-exp"].status) == "expired"
            assert set(st.pending_holds) == {"h-pending", "w-pending"}
            assert str(st.accounts["erin"].status) == "frozen"
            assert st.done["t2"].reversed_by == "rev-t2"
        # the log continues where it stopped
        [o] = ok(service, PID, deposit(p, "after", "bob", 1))
        assert o.seq == before[PID]["next_seq"]
        assert verify_stored_chain(service.store, PID)[1] is None
    finally:
        service.close()


def test_time_never_goes_backwards(
    service: LedgerService, platform: Platform, clock: FakeClock
) -> None:
    ok(service, PID, deposit(platform, "d1", "alice", 1))
    clock.now = START_MS - 3_600_000  # the wall clock jumps back an hour
    ok(service, PID, deposit(platform, "d2", "alice", 1))
    stamps = [r["ts"] for r in log_records(service, PID)]
    assert stamps == sorted(stamps) and stamps[-1] == START_MS


# -- personal data ------------------------------------------------------------------------------


def _raw_store_bytes(config: Config) -> bytes:
    """Every byte the store holds: the SQLite files, or every row of the PostgreSQL schema."""
    if config.store == "sqlite":
        path = Path(config.sqlite_path)
        return b"".join(f.read_bytes() for f in path.parent.glob(path.name + "*"))
    schema = config.postgres["POSTGRES_SCHEMA"]
    chunks: list[bytes] = []
    tables = pg_execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
    )
    assert tables
    for (table,) in tables:
        for row in pg_execute(f'SELECT * FROM "{schema}"."{table}"'):
            for value in row:
                if isinstance(value, bytes | bytearray | memoryview):
                    chunks.append(bytes(value))
                elif value is not None:
                    chunks.append(str(value).encode())
    return b"\n".join(chunks)


def _holder(service: LedgerService, account_id: str) -> Any:
    with service.reading(PID) as st:
        return st.accounts[account_id].holder


def test_personal_data_only_as_ciphertext(config: Config, clock: FakeClock) -> None:
    service = open_service(config, clock)
    try:
        _mixed_history(service, clock)
        # refused and linked-failed instructions carrying a name must not leak it either
        run(
            service,
            PID,
            c.OpenAccount(
                client_id="dup-dan",
                account_id="dan",
                kind="customer",
                currency="CNY",
                role="lender",
                holder_name="Dan Q. Testperson-7781",
            ),
        )
        for rec in log_records(service, PID):
            if rec["kind"] == "account_opened" and rec["account"]["id"] in NAMES:
                holder = rec["account"]["holder"]
                assert set(holder) == {"kid", "ct"} and holder["kid"] == rec["account"]["id"]
            name_in_cmd = rec["cmd"].get("holder_name")
            if name_in_cmd is not None:
                assert name_in_cmd.startswith("blind:")
    finally:
        service.close()
    raw = _raw_store_bytes(config)
    assert len(raw) > 1000
    for name in [*NAMES.values(), FAY]:
        for encoding in ("utf-8", "utf-16-le", "utf-16-be"):
            assert name.encode(encoding) not in raw, (name, encoding)
    assert b"Dan Q. Testperson" not in raw
    service = open_service(config, clock)
    try:
        for account_id, name in NAMES.items():
            assert service.vault.open(PID, _holder(service, account_id)) == name
    finally:
        service.close()


def test_destroyed_key_erases_the_person_not_the_chain(config: Config, clock: FakeClock) -> None:
    service = open_service(config, clock)
    try:
        _mixed_history(service, clock)
        before = snapshot(service, PID)
        sealed = _holder(service, "dan")
        assert service.vault.open(PID, sealed) == NAMES["dan"]
        service.vault.destroy(PID, "dan")
        with pytest.raises(PiiError):
            service.vault.open(PID, sealed)
        assert service.vault.open(PID, _holder(service, "erin")) == NAMES["erin"]  # others intact
        assert verify_stored_chain(service.store, PID)[1:] == (None, "ok")
    finally:
        service.close()
    service = open_service(config, clock)  # the erasure survives a restart, the log still loads
    try:
        assert snapshot(service, PID) == before
        with pytest.raises(PiiError):
            service.vault.open(PID, _holder(service, "dan"))
        assert service.vault.open(PID, _holder(service, "erin")) == NAMES["erin"]
        n, bad, reason = verify_stored_chain(service.store, PID)
        assert (n, bad, reason) == (before["next_seq"], None, "ok")
        # the erased customer's money is still accounted for
        assert_balanced(service, PID)
    finally:
        service.close()


def test_tampered_ciphertext_does_not_decrypt(service: LedgerService, platform: Platform) -> None:
    ok(
        service,
        PID,
        c.OpenAccount(
            client_id="o",
            account_id="gus",
            kind="customer",
            currency="CNY",
            role="other",
            holder_name="Gus",
        ),
    )
    sealed = dict(_holder(service, "gus"))
    assert service.vault.open(PID, sealed) == "Gus"
    ct = bytearray(sealed["ct"].encode())
    ct[20] = ord("A") if ct[20] != ord("A") else ord("B")
    with pytest.raises(PiiError):
        service.vault.open(PID, {"kid": "gus", "ct": ct.decode()})
    with pytest.raises(PiiError):  # bound to its account: another subject's key does not open it
        service.vault.open(PID, {"kid": "alice", "ct": sealed["ct"]})
