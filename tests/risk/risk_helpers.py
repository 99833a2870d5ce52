"""Helpers for the early-warning tests: an engine with chosen rules, reconciliations, queries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from helpers import CHECKER, OPERATOR, FakeClock, Platform, log_records

from ledger import commands as c
from ledger.service import LedgerService
from risk import store as rs
from risk.engine import RiskEngine
from risk.feed import ReconciliationFeed
from risk.ruleset import RuleSet

DIGEST = "ab" * 32
HOUR = 3_600_000
DAY = 24 * HOUR


def engine(
    service: LedgerService,
    clock: FakeClock,
    only: Iterable[str],
    feed: ReconciliationFeed | None = None,
    **sections: Any,
) -> RiskEngine:
    """An engine with only the rules under test switched on (the others would fire too as the
    test moves time, e.g. a missing reconciliation)."""
    rules = RuleSet(enabled=frozenset(only), **sections)
    return RiskEngine(service, rules, feed=feed, clock_ms=clock)


def found(eng: RiskEngine, platform: str = "p1", rule: str | None = None) -> list[dict[str, Any]]:
    """The platform's alerts (from the read model), oldest first."""
    eng.catch_up(platform)
    rows = rs.alerts(eng.db, platform)
    rows.sort(key=lambda a: a["raised_seq"])
    return [a for a in rows if rule is None or a["rule"] == rule]


def levels(eng: RiskEngine, rule: str, platform: str = "p1") -> list[str]:
    return [a["level"] for a in found(eng, platform, rule)]


def alert_records(service: LedgerService, platform: str = "p1") -> list[dict[str, Any]]:
    return [r for r in log_records(service, platform) if r["kind"] == "alert_raised"]


def gate(service: LedgerService, platform: str = "p1") -> str:
    with service.reading(platform) as st:
        return str(st.gate)


def reconcile(
    service: LedgerService,
    rid: str,
    as_of_ms: int,
    closing: int,
    requirement: int,
    currency: str = "CNY",
    platform: str = "p1",
) -> None:
    """Record a reconciliation: an operator makes it, a checker signs it off."""
    difference = closing - requirement
    result = "balanced" if difference == 0 else "shortfall" if difference < 0 else "excess"
    with service.reading(platform) as st:
        size = st.next_seq
    cmd = c.RecordReconciliation(
        client_id=f"recon:{rid}",
        reconciliation_id=rid,
        currency=currency,
        as_of_ms=as_of_ms,
        snapshot_size=size,
        statements=[DIGEST],
        bank_closing_minor=closing,
        in_transit_minor=0,
        requirement_minor=requirement,
        difference_minor=difference,
        breaks=0,
        result=result,
    )
    [o] = service.execute(platform, [cmd], OPERATOR)
    assert o.status == "pending", o
    [a] = service.execute(
        platform, [c.ApproveRequest(client_id=f"approve:{rid}", request_id=o.client_id)], CHECKER
    )
    assert a.status == "accepted", a


def withdraw(p: Platform, cid: str, account: str, amount: int, expires_ms: int) -> c.Command:
    return c.RequestWithdrawal(
        client_id=cid,
        account_id=account,
        mirror_account_id=p.omni,
        amount_minor=amount,
        currency=p.currency,
        payee_ref="card-1",
        expires_at_ms=expires_ms,
    )
