"""What reconciliation needs from a platform's log, folded from the stored records.

One pass over the log (chain-checked, like every other reader) gives:
- the accounts (kind, currency) and, at the cut-off, the posted balance of every customer and
  suspense account (the requirement) and the log size there (`snapshot_size`);
- every movement of an omnibus bank mirror (deposits = receipts, withdrawal settlements =
  payouts, reversals touching the mirror), with its references, time and counterparty;
- every reconciliation settlement (`reconciliation_settled`): it posts own funds <-> platform
  bank only, but it is a bank transfer into (a shortfall's cover) or out of (an excess
  returned) the omnibus account, so the bank shows it there;
- the recorded reconciliations: what is left to settle of each one's difference;
- the policy's business-day offset (the ledger's calendar).

Reads only: the ledger's store is never written here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from controls.policy import DAY_MS, HOUR_MS
from ledger import records
from ledger.store import LedgerStore, log_stream

_DECODE: Final = msgspec.json.Decoder().decode
REQUIREMENT_KINDS: Final = frozenset({"customer", "suspense"})
MIRROR_KINDS: Final = frozenset({"omnibus"})


class LedgerReadError(Exception):
    """The log cannot be read for reconciliation (broken chain, unknown account, ...)."""


@dataclass(frozen=True, slots=True)
class LedgerItem:
    """A movement of an omnibus mirror: what the bank should show on the omnibus account."""

    key: str  # the record's client id (an executed request: the request's id)
    seq: int
    ts: int
    day: str  # business day of `ts` in the ledger's calendar
    kind: str  # receipt | payout | return | settlement
    mirror: str  # the omnibus mirror account (a settlement: the currency's first one)
    amount_minor: int  # signed like the bank: + receipt, - payout
    currency: str
    refs: tuple[str, ...]  # bank_ref, client id, withdrawal id, ...
    counterparty: str  # the customer/suspense account credited, or the payout's payee alias
    reverses: str = ""  # a reversal: the client id it reverses
    # a settlement: the reconciliation it settles. It names no omnibus account, so it matches
    # a bank line on any omnibus account of its currency.
    settles: str = ""


@dataclass
class Recorded:
    """A `reconciliation_completed` record and what is left of its difference."""

    reconciliation_id: str
    currency: str
    day: str  # business day of its cut-off (`as_of`)
    difference_minor: int  # as recorded: < 0 shortfall, > 0 excess
    left_minor: int  # signed like the difference; 0 once settled (or balanced)
    settlements: int = 0  # reconciliation_settled records so far
    attempts: int = 0  # settlement instructions logged (requests and refusals)
    # settlement requests waiting for a checker: request id -> (amount, expiry ms, the cmd)
    pending: dict[str, tuple[int, int, dict[str, Any]]] = field(default_factory=dict)

    def pending_at(self, now_ms: int) -> dict[str, tuple[int, int, dict[str, Any]]]:
        return {k: v for k, v in self.pending.items() if v[1] >= now_ms}

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "pending"}
        d["pending"] = {k: v[0] for k, v in self.pending.items()}
        return d


@dataclass
class _Acc:
    kind: str
    ccy: str
    balance: int = 0  # credits - debits posted (credit-normal view)


@dataclass
class LedgerView:
    platform: str
    size: int = 0  # records read
    day_offset_ms: int = 8 * HOUR_MS
    accounts: dict[str, _Acc] = field(default_factory=dict)
    items: list[LedgerItem] = field(default_factory=list)
    cutoff_ms: int | None = None
    snapshot_size: int = 0  # log size at the cut-off
    # currency -> sum of customer and suspense balances at the cut-off
    requirement: dict[str, int] = field(default_factory=dict)
    # reconciliation id -> the recorded reconciliation (whole log, not only up to the cut-off)
    reconciliations: dict[str, Recorded] = field(default_factory=dict)

    def kind_of(self, account: str) -> str | None:
        acc = self.accounts.get(account)
        return None if acc is None else acc.kind

    def accounts_of(self, kind: str, currency: str) -> list[str]:
        return sorted(
            a for a, acc in self.accounts.items() if acc.kind == kind and acc.ccy == currency
        )

    def day_of(self, ts_ms: int) -> str:
        return day_of(ts_ms, self.day_offset_ms)


def day_of(ts_ms: int, offset_ms: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=(ts_ms + offset_ms) // DAY_MS)).isoformat()


def day_end_ms(day: str, offset_ms: int) -> int:
    """The last millisecond of business day `day` (local midnight minus one)."""
    d = dt.date.fromisoformat(day)
    days = (d - dt.date(1970, 1, 1)).days + 1
    return days * DAY_MS - offset_ms - 1


def read(store: LedgerStore, platform: str, day: str | None = None) -> LedgerView:
    """Fold the whole stored log; the requirement is taken at the end of business `day` (the
    last record with `ts` <= its last millisecond), or after every record if no day."""
    rows = store.iter_rows(log_stream(platform))
    return fold(platform, rows, day)


def fold(
    platform: str, rows: Iterable[tuple[int, str, bytes]], day: str | None = None
) -> LedgerView:
    view = LedgerView(platform)
    f = _Folder(view)
    head = records.CHAIN_GENESIS
    for pos, kind, packed in rows:
        if pos != view.size:
            raise LedgerReadError(f"{platform}: record {view.size} is missing from the log")
        link, data = records.unpack_state(packed)
        head = records.chain_next(head, data)
        if link != head:
            raise LedgerReadError(f"{platform}: record {pos}: chain link mismatch")
        rec = _DECODE(data)
        if rec.get("seq") != pos or rec.get("kind") != kind or rec.get("platform") != platform:
            raise LedgerReadError(f"{platform}: record {pos}: position, kind or platform mismatch")
        if day is not None and not f.snapped:
            cutoff = day_end_ms(day, view.day_offset_ms)
            view.cutoff_ms = cutoff
            if rec["ts"] > cutoff:
                f.snapshot(pos)
        f.record(rec, pos)
        view.size = pos + 1
    if not f.snapped:
        f.snapshot(view.size)
    if day is not None:
        view.cutoff_ms = day_end_ms(day, view.day_offset_ms)
    return view


class _Folder:
    def __init__(self, view: LedgerView) -> None:
        self.v = view
        self.snapped = False
        self.holds: dict[str, dict[str, Any]] = {}  # hold id -> spec (+ payee alias)
        self.requests: dict[str, dict[str, Any]] = {}  # request id -> the maker's cmd
        self.settle_requests: dict[str, str] = {}  # request id -> reconciliation id

    def snapshot(self, size: int) -> None:
        v = self.v
        v.snapshot_size = size
        req: dict[str, int] = {}
        for acc in v.accounts.values():
            if acc.kind in REQUIREMENT_KINDS:
                req[acc.ccy] = req.get(acc.ccy, 0) + acc.balance
        v.requirement = req
        self.snapped = True

    def _post(self, debit: str, credit: str, amount: int, seq: int) -> None:
        a, b = self.v.accounts.get(debit), self.v.accounts.get(credit)
        if a is None or b is None:
            raise LedgerReadError(f"record {seq}: a posting names an unknown account")
        a.balance -= amount
        b.balance += amount

    def _item(
        self,
        rec: dict[str, Any],
        cmd: dict[str, Any],
        kind: str,
        mirror: str,
        amount: int,
        refs: list[str],
        counterparty: str,
        reverses: str = "",
        settles: str = "",
    ) -> None:
        v = self.v
        key = rec.get("executes") or rec["cid"]
        refs = [r for r in dict.fromkeys([*refs, key]) if r]
        v.items.append(
            LedgerItem(
                key=key,
                seq=rec["seq"],
                ts=rec["ts"],
                day=v.day_of(rec["ts"]),
                kind=kind,
                mirror=mirror,
                amount_minor=amount,
                currency=rec["ccy"],
                refs=tuple(refs),
                counterparty=counterparty,
                reverses=reverses,
                settles=settles,
            )
        )

    def _settle_attempt(self, rec: dict[str, Any], cmd: dict[str, Any]) -> Recorded | None:
        if cmd.get("op") != "settle_reconciliation":
            return None
        recorded = self.v.reconciliations.get(cmd.get("reconciliation_id", ""))
        if recorded is not None:
            recorded.attempts += 1
        return recorded

    def record(self, rec: dict[str, Any], seq: int) -> None:
        kind = rec["kind"]
        if kind == records.REFUSED_KIND:
            self._settle_attempt(rec, rec.get("cmd", {}))
            return
        v = self.v
        policy = rec.get("policy")
        if isinstance(policy, dict) and "day_offset_ms" in policy:
            v.day_offset_ms = int(policy["day_offset_ms"])
        cmd = rec.get("cmd", {})
        if "executes" in rec:
            cmd = self.requests.get(rec["executes"], cmd)
        if kind == "approval_requested":
            request = rec["request"]
            self.requests[request["id"]] = cmd
            recorded = self._settle_attempt(rec, cmd)
            if recorded is not None:
                recorded.pending[request["id"]] = (cmd["amount_minor"], request["expires"], cmd)
                self.settle_requests[request["id"]] = recorded.reconciliation_id
            return
        done = rec.get("executes") or rec.get("rejects")
        if done in self.settle_requests:
            rid = self.settle_requests.pop(done)
            v.reconciliations[rid].pending.pop(done, None)
        spec = rec.get("account")
        if spec is not None:
            v.accounts[spec["id"]] = _Acc(spec["kind"], spec["ccy"])
            return
        if kind == "reconciliation_completed":
            r = rec["reconciliation"]
            v.reconciliations[r["id"]] = Recorded(
                r["id"], r["ccy"], v.day_of(r["as_of"]), r["difference"], r["difference"]
            )
            return
        entries = rec.get("entries")
        if entries is not None:
            for debit, credit, amount in entries:
                self._post(debit, credit, amount, seq)
                if "settles" in rec:
                    self._settlement(rec, cmd, debit, credit, amount)
                else:
                    self._mirror_entry(rec, cmd, kind, debit, credit, amount)
            return
        hold = rec.get("hold")
        if hold is not None:
            self.holds[hold["id"]] = {**hold, "payee": cmd.get("payee_ref", "")}
            return
        for hold_id, captured, _status in rec.get("resolve", ()):
            h = self.holds.pop(hold_id, None)
            if h is None:
                raise LedgerReadError(f"record {seq}: resolves an unknown hold")
            if not captured:
                continue
            self._post(h["debit"], h["credit"], captured, seq)
            if self.v.kind_of(h["credit"]) in MIRROR_KINDS:
                refs = [cmd.get("bank_ref", ""), hold_id]
                self._item(rec, cmd, "payout", h["credit"], -captured, refs, h["payee"])

    def _settlement(
        self, rec: dict[str, Any], cmd: dict[str, Any], debit: str, credit: str, amt: int
    ) -> None:
        """Own funds -> platform bank covers a shortfall: the platform's bank pays into the
        omnibus account (+amt there); platform bank -> own funds returns an excess (-amt)."""
        v = self.v
        rid = rec["settles"]
        recorded = v.reconciliations.get(rid)
        if recorded is None:
            raise LedgerReadError(f"record {rec['seq']}: settles unknown reconciliation {rid!r}")
        recorded.settlements += 1
        left = recorded.left_minor
        recorded.left_minor = left + amt if left < 0 else left - amt
        cover = v.kind_of(debit) == "own_funds"
        omnibus = v.accounts_of("omnibus", rec["ccy"])
        self._item(
            rec,
            cmd,
            "settlement",
            omnibus[0] if omnibus else "",
            amt if cover else -amt,
            [rid],
            credit if cover else debit,  # the platform's bank account
            settles=rid,
        )

    def _mirror_entry(
        self, rec: dict[str, Any], cmd: dict[str, Any], kind: str, debit: str, credit: str, amt: int
    ) -> None:
        dk, ck = self.v.kind_of(debit), self.v.kind_of(credit)
        refs = [cmd.get("bank_ref", "")]
        reverses = rec.get("reverses", "")
        label = "return" if kind == "reversed" else "receipt"
        if dk in MIRROR_KINDS:  # money arrived in the omnibus account
            self._item(rec, cmd, label, debit, amt, refs, credit, reverses)
        elif ck in MIRROR_KINDS:  # money left it
            self._item(
                rec,
                cmd,
                "return" if kind == "reversed" else "payout",
                credit,
                -amt,
                refs,
                debit,
                reverses,
            )
