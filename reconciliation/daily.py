"""Daily internal reconciliation: requirement against resource, recorded through a checker.

For business day D and each currency of the platform's omnibus accounts:

- **requirement** = the sum of every customer and suspense account's posted balance at the end
  of D (the log prefix up to the last record written by D's last millisecond, its size is the
  record's `snapshot_size`);
- **resource** = the bank's closing balance on D (the used statement of each omnibus account
  that closes on D) ± documented items in transit from matching (ledger movements the bank has
  not booked yet, bank entries the ledger recorded only after the cut-off);
- **difference** = resource − requirement: 0 balanced, < 0 shortfall, > 0 excess.

`run_daily` submits `RecordReconciliation` as the operator (always a request: a checker signs
it off with `custody requests approve`). Once a shortfall or an excess is recorded,
`prepare_settlement` (called by `run_daily` when the record is already there, or by
`custody recon settle`) submits `SettleReconciliation` for what is left of the difference, as
the operator; a checker always approves it. A shortfall's settlement books the platform's
payment from its own bank into the omnibus account (own funds -> platform bank), an excess's
the omnibus account's payment back to the platform's bank (platform bank -> own funds); the
next statement shows it and matching pairs it with that bank line. A `TopUpShortfall` is not
used for a reconciliation difference (docs/RECONCILIATION.md §4 says when it is right).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from ledger import commands as c
from ledger.service import LedgerService
from ledger.store import LedgerStore
from ledger.writer import Outcome
from reconciliation import ledger_view, matching
from reconciliation.statements import (
    RECON_BALANCED,
    RECON_EXCESS,
    RECON_SHORTFALL,
    STATEMENT_MISSING,
    PlatformConfig,
    ReconStore,
    StoredStatement,
)

MAX_STATEMENTS: Final = 64  # RecordReconciliation lists at most this many files


class ReconciliationError(Exception):
    """The reconciliation cannot be done (no statement for the day, no omnibus account...)."""


@dataclass
class Figures:
    platform: str
    day: str
    currency: str
    cutoff_ms: int
    snapshot_size: int
    statements: list[str]  # SHA-256 of the files whose statements close on the day
    bank_closing_minor: int
    in_transit_minor: int
    requirement_minor: int
    breaks: int

    @property
    def difference_minor(self) -> int:
        return self.bank_closing_minor + self.in_transit_minor - self.requirement_minor

    @property
    def result(self) -> str:
        d = self.difference_minor
        return "balanced" if d == 0 else "shortfall" if d < 0 else "excess"

    @property
    def reconciliation_id(self) -> str:
        """Day, currency and a digest of the figures: re-running with the same inputs asks for
        the same record (idempotent), different inputs make a new request."""
        body = "|".join(
            str(x)
            for x in (
                self.snapshot_size,
                *self.statements,
                self.bank_closing_minor,
                self.in_transit_minor,
                self.requirement_minor,
                self.breaks,
            )
        )
        return f"{self.day}-{self.currency}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"

    def command(self) -> c.RecordReconciliation:
        rid = self.reconciliation_id
        return c.RecordReconciliation(
            client_id=f"recon:{rid}",
            reconciliation_id=rid,
            currency=self.currency,
            as_of_ms=self.cutoff_ms,
            snapshot_size=self.snapshot_size,
            statements=list(self.statements),
            bank_closing_minor=self.bank_closing_minor,
            in_transit_minor=self.in_transit_minor,
            requirement_minor=self.requirement_minor,
            difference_minor=self.difference_minor,
            breaks=self.breaks,
            result=self.result,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "day": self.day,
            "currency": self.currency,
            "reconciliation_id": self.reconciliation_id,
            "cutoff_ms": self.cutoff_ms,
            "snapshot_size": self.snapshot_size,
            "statements": list(self.statements),
            "bank_closing_minor": self.bank_closing_minor,
            "in_transit_minor": self.in_transit_minor,
            "requirement_minor": self.requirement_minor,
            "difference_minor": self.difference_minor,
            "breaks": self.breaks,
            "result": self.result,
        }


@dataclass
class DailyResult:
    figures: list[Figures]
    match: matching.MatchResult
    record: dict[str, Outcome] = field(default_factory=dict)  # currency -> outcome
    settlement: dict[str, Outcome] = field(default_factory=dict)  # currency -> its request
    receipts: list[Outcome] = field(default_factory=list)  # suggested deposits booked
    actions: list[str] = field(default_factory=list)  # what is left for people to do

    def to_json(self) -> dict[str, Any]:
        def out(o: Outcome) -> dict[str, Any]:
            d: dict[str, Any] = msgspec.to_builtins(o)
            return d

        return {
            "figures": [f.to_json() for f in self.figures],
            "match": self.match.to_json(),
            "record": {k: out(v) for k, v in self.record.items()},
            "settlement": {k: out(v) for k, v in self.settlement.items()},
            "receipts": [out(o) for o in self.receipts],
            "actions": list(self.actions),
        }


def run_match(
    store: LedgerStore, recon: ReconStore, platform: str, day: str, config: PlatformConfig
) -> tuple[ledger_view.LedgerView, matching.MatchResult, list[str]]:
    """Fold the log, match the used statements up to `day`, record the open items."""
    view = ledger_view.read(store, platform, day)
    bank, shas = matching.bank_items(recon, platform, day)
    result = matching.match(view, bank, day, config)
    recon.save_open_items(
        platform,
        day,
        [
            (
                o.side,
                o.key,
                o.state,
                o.mirror,
                o.amount_minor,
                o.date,
                o.age_days,
                "\n".join(o.refs),
                o.counterparty,
            )
            for o in result.open
        ],
    )
    return view, result, shas


def _day_statements(
    recon: ReconStore, platform: str, day: str, mirrors: Sequence[str]
) -> dict[str, StoredStatement]:
    """The used statement of each mirror that closes on `day` (the last, if several)."""
    out: dict[str, StoredStatement] = {}
    for s in recon.statements(platform, status="used"):
        if s.closing_date == day and s.mirror in mirrors:
            out[s.mirror] = s
    return out


def compute(
    store: LedgerStore,
    recon: ReconStore,
    platform: str,
    day: str,
    config: PlatformConfig,
    now_ms: int | None = None,
) -> tuple[list[Figures], matching.MatchResult]:
    """The day's figures per currency; raises ReconciliationError when a statement is
    missing (and records a `statement_missing` event)."""
    view, result, _ = run_match(store, recon, platform, day, config)
    mirrors = sorted(set(config.accounts.values()))
    ccys: dict[str, list[str]] = {}
    for m in mirrors:
        acc = view.accounts.get(m)
        if acc is None or acc.kind != "omnibus":
            raise ReconciliationError(f"configured mirror {m!r} is not an omnibus account")
        ccys.setdefault(acc.ccy, []).append(m)
    stmts = _day_statements(recon, platform, day, mirrors)
    missing = [m for m in mirrors if m not in stmts]
    if missing:
        recon.add_event(
            platform, STATEMENT_MISSING, {"day": day, "mirrors": missing}, key=day, at_ms=now_ms
        )
        raise ReconciliationError(
            f"no usable bank statement closing on {day} for {', '.join(missing)}"
        )
    figures: list[Figures] = []
    for ccy, ms in sorted(ccys.items()):
        shas = sorted({stmts[m].sha256 for m in ms})
        if len(shas) > MAX_STATEMENTS:
            raise ReconciliationError(f"more than {MAX_STATEMENTS} statement files on {day}")
        closing = sum(stmts[m].closing_minor for m in ms)
        if closing < 0:
            raise ReconciliationError(f"the omnibus account is overdrawn ({closing}) on {day}")
        transit = sum(
            o.amount_minor
            for o in result.open
            if o.side == "ledger" and o.state == matching.TIMING and o.mirror in ms
        )
        transit -= sum(
            b.amount_minor
            for mt in result.matches
            if mt.state == matching.TIMING
            for b in mt.bank
            if b.mirror in ms
        )
        breaks = sum(
            1
            for o in result.open
            if o.mirror in ms and o.state in (matching.UNMATCHED_BANK, matching.UNMATCHED_LEDGER)
        )
        figures.append(
            Figures(
                platform=platform,
                day=day,
                currency=ccy,
                cutoff_ms=ledger_view.day_end_ms(day, view.day_offset_ms),
                snapshot_size=max(view.snapshot_size, 1),
                statements=shas,
                bank_closing_minor=closing,
                in_transit_minor=transit,
                requirement_minor=view.requirement.get(ccy, 0),
                breaks=breaks,
            )
        )
    return figures, result


def book_receipts(
    service: LedgerService, platform: str, suggestions: Sequence[c.Deposit], actor: str
) -> list[Outcome]:
    """Book unmatched bank receipts into suspense (one instruction each, as `actor`)."""
    return [service.execute(platform, [cmd], actor)[0] for cmd in suggestions]


def settlement_command(
    view: ledger_view.LedgerView,
    reconciliation_id: str,
    amount_minor: int | None = None,
    now_ms: int | None = None,
) -> c.SettleReconciliation:
    """The settlement of what is left of a recorded reconciliation's difference (or of
    `amount_minor` of it). Without an amount, a settlement request still waiting for a checker
    is given again (re-running replays it). Raises ReconciliationError for an unknown, balanced
    or settled reconciliation, an amount beyond what is left once the waiting requests are
    counted, or missing platform accounts; the ledger checks the difference again when the
    checker approves."""
    recorded = view.reconciliations.get(reconciliation_id)
    if recorded is None:
        raise ReconciliationError(f"no recorded reconciliation {reconciliation_id!r}")
    left = abs(recorded.left_minor)
    if left == 0:
        what = "balanced" if recorded.difference_minor == 0 else "settled"
        raise ReconciliationError(f"reconciliation {reconciliation_id!r} is {what}")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    waiting = recorded.pending_at(now)
    if amount_minor is None and waiting:
        first = waiting[min(waiting)][2]
        cmd: c.SettleReconciliation = msgspec.convert(first, c.SettleReconciliation)
        return cmd
    available = left - sum(amount for amount, _, _ in waiting.values())
    amount = available if amount_minor is None else amount_minor
    if not 0 < amount <= available:
        pending = f" ({left - available} in requests waiting for a checker)" if waiting else ""
        raise ReconciliationError(
            f"reconciliation {reconciliation_id!r}: {amount} is not in 1..{available}, what "
            f"is left{pending}"
        )
    ccy = recorded.currency
    own = view.accounts_of("own_funds", ccy)
    bank = view.accounts_of("platform_bank", ccy)
    if not own or not bank:
        raise ReconciliationError(f"no own-funds or platform bank account in {ccy}")
    return c.SettleReconciliation(
        # a new client id per instruction: a refused or rejected one is never reused
        client_id=f"settle:{reconciliation_id}:{recorded.attempts + 1}",
        reconciliation_id=reconciliation_id,
        own_account_id=own[0],
        platform_bank_account_id=bank[0],
        amount_minor=amount,
        currency=ccy,
    )


def settlement_action(cmd: c.SettleReconciliation, shortfall: bool) -> str:
    """What the people do once the checker approved the settlement."""
    if shortfall:
        move = (
            f"the platform pays {cmd.amount_minor} {cmd.currency} from its own bank account "
            "into the omnibus account"
        )
    else:
        move = (
            f"the omnibus account pays {cmd.amount_minor} {cmd.currency} back to the "
            "platform's own bank account"
        )
    return (
        f"{cmd.currency}: a checker approves settlement {cmd.client_id}; then {move} with "
        f"end-to-end id {cmd.reconciliation_id} (in transit until the statement shows it)"
    )


def prepare_settlement(
    service: LedgerService,
    platform: str,
    reconciliation_id: str,
    actor: str,
    amount_minor: int | None = None,
    view: ledger_view.LedgerView | None = None,
    now_ms: int | None = None,
) -> tuple[c.SettleReconciliation, Outcome]:
    """Submit `SettleReconciliation` for a recorded shortfall or excess, as the operator
    `actor` (a request: a checker approves it)."""
    if not actor.startswith("operator:"):
        raise ReconciliationError(f"a settlement is prepared by an operator, not {actor!r}")
    if view is None:
        view = ledger_view.read(service.store, platform)
    cmd = settlement_command(view, reconciliation_id, amount_minor, now_ms)
    [outcome] = service.execute(platform, [cmd], actor)
    return cmd, outcome


def run_daily(
    service: LedgerService,
    platform: str,
    day: str,
    config: PlatformConfig,
    actor: str,
    book_unmatched_receipts: bool = False,
    now_ms: int | None = None,
) -> DailyResult:
    """Match, compute and submit the day's reconciliation record as the operator `actor`; once
    it is recorded (a later run, after the checker's approval), also the settlement request of
    a shortfall, or of an excess when no unknown receipt might be customer money."""
    if not actor.startswith("operator:"):
        raise ReconciliationError(f"the reconciliation is submitted by an operator, not {actor!r}")
    recon = ReconStore(service.store)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    figures, result = compute(service.store, recon, platform, day, config, now)
    receipts: list[Outcome] = []
    if book_unmatched_receipts and result.suggestions:
        receipts = book_receipts(service, platform, result.suggestions, actor)
        figures, result = compute(service.store, recon, platform, day, config, now)
    out = DailyResult(figures, result, receipts=receipts)
    if result.suggestions:
        out.actions.append(
            f"{len(result.suggestions)} unmatched bank receipt(s): book into suspense "
            "(recon run --book-receipts), then clear suspense to the customer with a checker"
        )
    for f in figures:
        [rec] = service.execute(platform, [f.command()], actor)
        out.record[f.currency] = rec
        if rec.status == "pending":
            out.actions.append(
                f"{f.currency}: a checker approves reconciliation request {rec.client_id}"
            )
        detail = f.to_json()
        if f.result == "balanced":
            recon.add_event(platform, RECON_BALANCED, detail, key=f.reconciliation_id, at_ms=now)
            continue
        shortfall = f.result == "shortfall"
        event = RECON_SHORTFALL if shortfall else RECON_EXCESS
        recon.add_event(platform, event, detail, key=f.reconciliation_id, at_ms=now)
        if rec.status == "pending":
            out.actions.append(
                f"{f.currency}: once the reconciliation is approved, run again (or recon settle "
                f"--reconciliation {f.reconciliation_id}) to prepare its settlement"
            )
            continue
        if not rec.ok:
            continue
        receipts_open = [s for s in result.suggestions if s.currency == f.currency]
        if not shortfall and receipts_open:
            # an unknown receipt is probably a customer's: it goes to suspense, never back
            out.actions.append(
                f"{f.currency}: excess {f.difference_minor} with {len(receipts_open)} unknown "
                "receipt(s): book customer money into suspense (--book-receipts); only what is "
                f"platform money is returned: recon settle --reconciliation {f.reconciliation_id}"
            )
            continue
        view = ledger_view.read(service.store, platform)
        recorded = view.reconciliations.get(f.reconciliation_id)
        if recorded is None or recorded.left_minor == 0:
            continue  # settled already
        try:
            cmd, t = prepare_settlement(
                service, platform, f.reconciliation_id, actor, view=view, now_ms=now
            )
        except ReconciliationError as exc:
            out.actions.append(f"{f.currency}: cannot prepare the settlement: {exc}")
            continue
        out.settlement[f.currency] = t
        if t.status == "pending":
            out.actions.append(settlement_action(cmd, shortfall))
        elif not t.ok:
            out.actions.append(
                f"{f.currency}: settlement {t.status} ({t.code}): {t.message}".rstrip(": ")
            )
    return out
