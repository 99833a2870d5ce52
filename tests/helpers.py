"""Shared helpers for the ledger tests: stores, platforms, balances, log inspection.

Plain functions (no pytest imports) so that fixtures, hypothesis state machines and the crash
child can all use them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controls.policy import DAY_MS, FeeRule, Policy
from ledger import commands as c
from ledger import records
from ledger.config import Config
from ledger.service import LedgerService
from ledger.store import log_stream
from ledger.writer import Outcome

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_CONNINFO = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=5"
START_MS = 1_700_000_000_000  # the fake clock's starting time (2023-11-14)
ACTOR = "platform:test"
OPERATOR = "operator:test"
CHECKER = "checker:reviewer"  # a different person from operator:test

# Tests of bookkeeping (movements, holds, replay, storage) run under this policy: it switches
# off the controls that need customer keys, bound payees, a checker or a fee schedule, so each
# test states only what it is about. The controls' own tests (tests/controls) use the default
# policy, which is strict.
BOOKKEEPING_POLICY = Policy(
    require_customer_signature=0,
    require_bound_payee=0,
    approval_ops=frozenset(),
    approval_above_minor=0,
    limits={},
    outflow_cap_bp=0,
    fees={
        code: FeeRule(max_minor=2**62)
        for code in ("F", "F1", "X", "SERVICE-2024", "service", "fee", "svc")
    },
    hold_max_ms=10 * 365 * DAY_MS,
    refusal_records_per_min=1_000_000,
)
# Instructions only a custodian operator gives (manual operations, suspense clearing).
_OPERATOR_TYPES = (c.Reverse, c.UnfreezeAccount, c.SetPolicy, c.SetGate, c.ResetKey)


def actor_for(cmd: c.Command) -> str:
    """The actor a bookkeeping test gives an instruction as: an operator for manual operations
    and suspense clearing (suspense accounts are named `...susp`), the platform otherwise."""
    if isinstance(cmd, _OPERATOR_TYPES):
        return OPERATOR
    if isinstance(cmd, c.Transfer) and cmd.from_account_id.endswith("susp"):
        return OPERATOR
    return ACTOR


class FakeClock:
    """A clock the test moves by hand: `clock.now = ...` or `clock.advance(ms)`."""

    def __init__(self, now_ms: int = START_MS) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


# -- stores ---------------------------------------------------------------------------------------


def pg_skip_allowed() -> bool:
    return os.environ.get("CUSTODY_SKIP_PG") == "1"


def pg_reachable() -> str | None:
    """None if PostgreSQL answers, else the reason it does not."""
    try:
        import psycopg

        with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure to connect is a reason
        return f"{type(exc).__name__}: {exc}"
    return None


def require_postgres() -> None:
    """Fail (or skip, with CUSTODY_SKIP_PG=1) when PostgreSQL does not answer."""
    import pytest

    reason = pg_reachable()
    if reason is None:
        return
    if pg_skip_allowed():
        pytest.skip(f"PostgreSQL unreachable and CUSTODY_SKIP_PG=1: {reason}")
    pytest.fail(
        f"PostgreSQL unreachable at 127.0.0.1:5432 ({reason}); set CUSTODY_SKIP_PG=1 to skip"
    )


def pg_execute(sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return list(cur.fetchall()) if cur.description else []


def sqlite_env(data_dir: Path) -> dict[str, str]:
    return {"CUSTODY_STORE": "sqlite", "CUSTODY_DATA_DIR": str(data_dir)}


@contextmanager
def pg_env(data_dir: Path) -> Iterator[dict[str, str]]:
    """A fresh schema `t_<hex>` in database `test`, dropped (CASCADE) afterwards."""
    schema = "t_" + uuid.uuid4().hex[:16]
    pg_execute(f"CREATE SCHEMA {schema}")
    try:
        yield {
            "CUSTODY_STORE": "postgres",
            "POSTGRES_DBNAME": "test",
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": "5432",
            "POSTGRES_USER": "postgres",
            "POSTGRES_PASSWORD": "",
            "POSTGRES_SCHEMA": schema,
            "CUSTODY_DATA_DIR": str(data_dir),
        }
    finally:
        pg_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def subprocess_env(store_env: dict[str, str]) -> dict[str, str]:
    """The environment for a child process using the same store as the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODY_", "POSTGRES_"))}
    env.update(store_env)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    return env


def open_service(config: Config, clock: FakeClock | None = None) -> LedgerService:
    service = LedgerService(config, clock_ms=clock)
    service.start()
    return service


# -- platforms ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    id: str
    currency: str
    omni: str
    pbank: str
    own: str
    fee: str
    susp: str
    customers: tuple[str, ...]


def make_platform(
    service: LedgerService,
    platform_id: str = "p1",
    currency: str = "CNY",
    customers: Sequence[str] = ("alice", "bob", "carol"),
    prefix: str = "",
    policy: Policy | None = BOOKKEEPING_POLICY,
) -> Platform:
    """Create (if needed) a platform and open its structural and customer accounts."""
    if platform_id not in service.platform_ids():
        outcome = service.create_platform(
            platform_id, f"Platform {platform_id}", "operator:root", policy
        )
        assert outcome.status == "accepted", outcome
    roles = ("lender", "borrower", "guarantor", "other")
    p = Platform(
        platform_id,
        currency,
        omni=f"{prefix}omni",
        pbank=f"{prefix}pbank",
        own=f"{prefix}own",
        fee=f"{prefix}fee",
        susp=f"{prefix}susp",
        customers=tuple(f"{prefix}{name}" for name in customers),
    )
    cmds: list[c.Command] = [
        c.OpenAccount(
            client_id=f"open:{p.omni}", account_id=p.omni, kind="omnibus", currency=currency
        ),
        c.OpenAccount(
            client_id=f"open:{p.pbank}", account_id=p.pbank, kind="platform_bank", currency=currency
        ),
        c.OpenAccount(
            client_id=f"open:{p.own}", account_id=p.own, kind="own_funds", currency=currency
        ),
        c.OpenAccount(
            client_id=f"open:{p.fee}", account_id=p.fee, kind="fee_income", currency=currency
        ),
        c.OpenAccount(
            client_id=f"open:{p.susp}", account_id=p.susp, kind="suspense", currency=currency
        ),
    ]
    for i, acc in enumerate(p.customers):
        cmds.append(
            c.OpenAccount(
                client_id=f"open:{acc}",
                account_id=acc,
                kind="customer",
                currency=currency,
                role=roles[i % len(roles)],
            )
        )
    outcomes = service.execute(platform_id, cmds, "operator:root")
    assert all(o.status == "accepted" for o in outcomes), outcomes
    return p


def run(
    service: LedgerService, platform_id: str, *cmds: c.Command, linked: bool = False
) -> list[Outcome]:
    """One request when every instruction has the same actor (see `actor_for`), else one
    request per instruction, in order."""
    actors = {actor_for(cmd) for cmd in cmds}
    if len(actors) <= 1:
        actor = actors.pop() if actors else ACTOR
        return service.execute(platform_id, list(cmds), actor, linked=linked)
    assert not linked, "a linked batch has one actor"
    return [service.execute(platform_id, [cmd], actor_for(cmd))[0] for cmd in cmds]


def run1(service: LedgerService, platform_id: str, cmd: c.Command) -> Outcome:
    [outcome] = service.execute(platform_id, [cmd], actor_for(cmd))
    return outcome


def ok(service: LedgerService, platform_id: str, *cmds: c.Command) -> list[Outcome]:
    """Run commands that must all be accepted."""
    outcomes = run(service, platform_id, *cmds)
    assert [o.status for o in outcomes] == ["accepted"] * len(cmds), outcomes
    return outcomes


def deposit(p: Platform, cid: str, account: str, amount: int) -> c.Deposit:
    return c.Deposit(
        client_id=cid,
        mirror_account_id=p.omni,
        account_id=account,
        amount_minor=amount,
        currency=p.currency,
    )


def transfer(
    p: Platform, cid: str, src: str, dst: str, amount: int, purpose: str = "transfer"
) -> c.Transfer:
    return c.Transfer(
        client_id=cid,
        from_account_id=src,
        to_account_id=dst,
        amount_minor=amount,
        currency=p.currency,
        purpose=purpose,
    )


def hold(
    p: Platform, cid: str, src: str, dst: str, amount: int, expires_ms: int, reason: str = "bid"
) -> c.PlaceHold:
    return c.PlaceHold(
        client_id=cid,
        from_account_id=src,
        to_account_id=dst,
        amount_minor=amount,
        currency=p.currency,
        reason=reason,
        expires_at_ms=expires_ms,
    )


# -- state inspection -----------------------------------------------------------------------------


def balances(service: LedgerService, platform_id: str) -> dict[str, tuple[int, int, int]]:
    """account id -> (posted, held, available)."""
    with service.reading(platform_id) as st:
        return {
            a.id: (a.posted_minor, a.held_minor, a.available_minor) for a in st.accounts.values()
        }


def bal(service: LedgerService, platform_id: str, account_id: str) -> tuple[int, int, int]:
    return balances(service, platform_id)[account_id]


def snapshot(service: LedgerService, platform_id: str) -> dict[str, Any]:
    """Everything observable about a platform's live state, as plain comparable data."""
    with service.reading(platform_id) as st:
        accounts = {
            a.id: (
                str(a.kind),
                a.currency,
                a.role,
                str(a.status),
                a.opened_seq,
                a.last_seq,
                a.holder,
                a.debits_posted_minor,
                a.credits_posted_minor,
                a.debits_pending_minor,
                a.credits_pending_minor,
            )
            for a in st.accounts.values()
        }
        holds = {
            h.id: (
                h.debit,
                h.credit,
                h.amount_minor,
                h.expires_at_ms,
                h.reason,
                h.kind,
                h.placed_seq,
                str(h.status),
            )
            for h in st.holds.values()
        }
        done = {
            cid: (d.fingerprint, d.seq, d.kind, d.entries, d.reversed_by)
            for cid, d in st.done.items()
        }
        snap = {
            "accounts": accounts,
            "holds": holds,
            "done": done,
            "next_seq": st.next_seq,
            "last_ts_ms": st.last_ts_ms,
            "created": st.created,
            "totals": {k: list(v) for k, v in st.totals_by_currency.items()},
        }
    next_seq, head = service.head(platform_id)
    snap["head"] = head
    assert next_seq == snap["next_seq"]
    return snap


def money_state(snap: dict[str, Any]) -> dict[str, Any]:
    """The part of a snapshot that a refused command must not change."""
    return {
        "accounts": snap["accounts"],
        "holds": snap["holds"],
        "done": snap["done"],
        "totals": snap["totals"],
        "created": snap["created"],
    }


def assert_balanced(service: LedgerService, platform_id: str) -> None:
    """Per currency: posted debits == posted credits and pending debits == pending credits."""
    with service.reading(platform_id) as st:
        sums: dict[str, list[int]] = {}
        for a in st.accounts.values():
            s = sums.setdefault(a.currency, [0, 0, 0, 0])
            s[0] += a.debits_posted_minor
            s[1] += a.credits_posted_minor
            s[2] += a.debits_pending_minor
            s[3] += a.credits_pending_minor
        for ccy, (dp, cp, dpend, cpend) in sums.items():
            assert dp == cp, f"{ccy}: posted debits {dp} != credits {cp}"
            assert dpend == cpend, f"{ccy}: pending debits {dpend} != credits {cpend}"
            assert st.totals_by_currency.get(ccy, [0, 0]) == [dp, cp], ccy
        assert st.totals_balanced()
    # the same from the log alone, independent of the live state
    log_sums: dict[str, list[int]] = {}
    holds: dict[str, tuple[str, int]] = {}
    for rec in log_records(service, platform_id):
        if rec["kind"] == records.REFUSED_KIND:
            continue
        if "hold" in rec:
            holds[rec["hold"]["id"]] = (rec["ccy"], rec["hold"]["amount"])
        for debit, credit, amount in rec.get("entries", ()):
            assert debit != credit
            s = log_sums.setdefault(rec["ccy"], [0, 0])
            s[0] += amount
            s[1] += amount
        for hold_id, captured, _ in rec.get("resolve", ()):
            if captured:
                ccy, _amount = holds[hold_id]
                s = log_sums.setdefault(ccy, [0, 0])
                s[0] += captured
                s[1] += captured
    with service.reading(platform_id) as st:
        for ccy, s in log_sums.items():
            assert st.totals_by_currency[ccy] == s, ccy


def assert_no_negative(service: LedgerService, platform_id: str) -> None:
    with service.reading(platform_id) as st:
        for a in st.accounts.values():
            if str(a.kind) in ("customer", "own_funds", "fee_income", "suspense"):
                assert a.available_minor >= 0, (a.id, a.available_minor)
                assert a.posted_minor >= 0, (a.id, a.posted_minor)


# -- the log ------------------------------------------------------------------------------------


def stored_rows(service: LedgerService, platform_id: str) -> list[tuple[int, str, bytes]]:
    return list(service.store.iter_rows(log_stream(platform_id)))


def decode_state(packed: bytes) -> dict[str, Any]:
    _, data = records.unpack_state(packed)
    return records.decode(data)


def log_records(service: LedgerService, platform_id: str) -> list[dict[str, Any]]:
    return [decode_state(packed) for _, _, packed in stored_rows(service, platform_id)]


def record_at(service: LedgerService, platform_id: str, seq: int) -> dict[str, Any]:
    rows = service.store.read(log_stream(platform_id), after=seq - 1, limit=1)
    assert rows and rows[0][0] == seq, f"no stored record at position {seq}"
    rec = decode_state(rows[0][2])
    assert rec["seq"] == seq and rows[0][1] == rec["kind"]
    return rec


def last_position(service: LedgerService, platform_id: str) -> int:
    row = service.store.last_row(log_stream(platform_id))
    return -1 if row is None else row[0]
