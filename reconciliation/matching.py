"""External reconciliation: bank statement entries against the ledger's omnibus movements.

Passes, each over what the previous ones left:
1. **reference**: an entry's end-to-end ids, instruction ids, batch id, entry and bank
   references against the ledger movements' `bank_ref`, client ids and withdrawal ids; one
   movement of the same amount, or several sharing the reference (a batch) whose amounts add
   up to the entry, or one per end-to-end id of a batch-booked entry;
2. **amount + date + counterparty**: the same signed amount, the ledger's business day within
   `match_window_days` of the booking date, the counterparty equal when both sides know it
   (the bank account mapped through the configuration's `counterparties`), closest day first;
3. **batch**: one bank entry for several ledger payouts (or receipts) within the date window
   whose amounts add up to it: a subset-sum search over at most `batch_max_items` candidates
   and `batch_max_steps` nodes per entry (bounded: it gives up rather than run away);
4. **returned excess**: a bank receipt the ledger cannot book (platform money, e.g. interest the
   contract gives the platform) that a recorded excess was settled for: one unmatched credit of
   exactly a returning settlement's amount, booked by the day of the reconciliation it settles,
   is explained by that settlement (method `returned_excess`, no ledger side of its own: the
   settlement itself matches the bank's return debit). It gets no suspense suggestion.

A reconciliation settlement names no omnibus account: it matches a bank line on any omnibus
account of its currency.

Then every item gets a state:
- `matched` (with the method), or `timing` when the ledger side is after the cut-off: the bank
  booked it by day D, the ledger after (an item in transit of -amount for the day's figures);
- ledger movements up to the cut-off without a bank entry: `timing` when younger than
  `timing_days` (expected to clear: in transit of +amount), else `unmatched_ledger`;
- a ledger receipt and its reversal, both without a bank entry: `cancelled` (no money moved);
- bank entries without a ledger movement: `unmatched_bank`. A receipt among them gets a
  suggested `Deposit` into **suspense** (never straight to a customer); an operator books it
  and clears suspense to the customer later, through a checker.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ledger import commands as c
from reconciliation.ledger_view import LedgerItem, LedgerView, day_end_ms
from reconciliation.model import Entry, normalise_account
from reconciliation.statements import PlatformConfig, ReconStore

MATCHED: Final = "matched"
TIMING: Final = "timing"
UNMATCHED_BANK: Final = "unmatched_bank"
UNMATCHED_LEDGER: Final = "unmatched_ledger"
CANCELLED: Final = "cancelled"


@dataclass(frozen=True, slots=True)
class BankItem:
    sha256: str
    n: int
    mirror: str
    entry: Entry

    @property
    def key(self) -> str:
        return f"{self.sha256[:16]}:{self.n}:{self.entry.index}"

    @property
    def amount_minor(self) -> int:
        return self.entry.amount_minor

    @property
    def date(self) -> str:
        return self.entry.booking_date


@dataclass(frozen=True)
class Match:
    bank: tuple[BankItem, ...]
    ledger: tuple[LedgerItem, ...]
    method: str  # reference | amount_date | batch | returned_excess
    state: str  # matched | timing

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "method": self.method,
            "bank": [b.key for b in self.bank],
            "ledger": [x.key for x in self.ledger],
            "amount_minor": sum(b.amount_minor for b in self.bank),
        }


@dataclass(frozen=True)
class Open:
    """An item without a counterpart, with its age in days at the reconciliation day."""

    side: str  # bank | ledger
    state: str  # unmatched_bank | unmatched_ledger | timing | cancelled
    key: str
    mirror: str
    amount_minor: int
    date: str
    age_days: int
    refs: tuple[str, ...]
    counterparty: str

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["refs"] = list(self.refs)
        return d


@dataclass
class MatchResult:
    platform: str
    day: str
    cutoff_ms: int
    matches: list[Match] = field(default_factory=list)
    open: list[Open] = field(default_factory=list)
    suggestions: list[c.Deposit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def of_state(self, state: str) -> list[Open]:
        return [o for o in self.open if o.state == state]

    @property
    def breaks(self) -> int:
        return sum(1 for o in self.open if o.state in (UNMATCHED_BANK, UNMATCHED_LEDGER))

    @property
    def in_transit_minor(self) -> int:
        """Documented items in transit at the cut-off, signed as they change the bank balance
        still to come: ledger movements the bank has not booked yet (+amount), bank entries
        the ledger recorded only after the cut-off (-amount)."""
        total = sum(o.amount_minor for o in self.open if o.side == "ledger" and o.state == TIMING)
        for m in self.matches:
            if m.state == TIMING:
                total -= sum(b.amount_minor for b in m.bank)
        return total

    def counts(self) -> dict[str, int]:
        out = {
            "matched": sum(1 for m in self.matches if m.state == MATCHED),
            "timing_bank": sum(1 for m in self.matches if m.state == TIMING),
            "batch": sum(1 for m in self.matches if m.method == "batch"),
        }
        for state in (TIMING, UNMATCHED_BANK, UNMATCHED_LEDGER, CANCELLED):
            out[state if state != TIMING else "timing_ledger"] = len(self.of_state(state))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "day": self.day,
            "cutoff_ms": self.cutoff_ms,
            "counts": self.counts(),
            "breaks": self.breaks,
            "in_transit_minor": self.in_transit_minor,
            "matches": [m.to_json() for m in self.matches],
            "open": [o.to_json() for o in self.open],
            "suggested_deposits": [_cmd_json(s) for s in self.suggestions],
            "notes": list(self.notes),
        }


def _cmd_json(cmd: c.Command) -> dict[str, Any]:
    import msgspec

    out: dict[str, Any] = msgspec.to_builtins(cmd)
    return out


def _days(a: str, b: str) -> int:
    return (dt.date.fromisoformat(a) - dt.date.fromisoformat(b)).days


def bank_items(recon: ReconStore, platform: str, day: str) -> tuple[list[BankItem], list[str]]:
    """Booked entries of every used statement whose period started by `day`, and the
    SHA-256 of those statements' files."""
    items: list[BankItem] = []
    shas: list[str] = []
    for s in recon.statements(platform, status="used"):
        if s.opening_date > day:
            continue
        if s.sha256 not in shas:
            shas.append(s.sha256)
        for e in recon.entries(platform, s.sha256, s.n):
            if e.status == "BOOK" and e.booking_date <= day:
                items.append(BankItem(s.sha256, s.n, s.mirror, e))
    return items, shas


def match(
    view: LedgerView,
    bank: Sequence[BankItem],
    day: str,
    config: PlatformConfig,
) -> MatchResult:
    """Match `bank` entries against the ledger's omnibus movements, as at the end of `day`."""
    cutoff = day_end_ms(day, view.day_offset_ms)
    horizon = cutoff + max(config.timing_days, 1) * 86_400_000
    ledger = [x for x in view.items if x.ts <= horizon]
    res = MatchResult(view.platform, day, cutoff)
    m = _Matcher(ledger, config)
    m.by_reference(bank)
    m.by_amount_date(bank)
    m.by_batch(bank)
    m.returned_excess(bank, view, cutoff)
    for bank_side, ledger_side, method in m.pairs:
        late = any(x.ts > cutoff for x in ledger_side)
        res.matches.append(
            Match(tuple(bank_side), tuple(ledger_side), method, TIMING if late else MATCHED)
        )
    _classify(res, view, m, bank, ledger, cutoff, config)
    return res


class _Matcher:
    def __init__(self, ledger: Sequence[LedgerItem], config: PlatformConfig) -> None:
        self.config = config
        self.ledger = list(ledger)
        self.free: set[int] = set(range(len(self.ledger)))
        self.bank_done: set[str] = set()
        self.pairs: list[tuple[list[BankItem], list[LedgerItem], str]] = []
        self.by_ref: dict[str, list[int]] = defaultdict(list)
        for i, x in enumerate(self.ledger):
            for r in x.refs:
                self.by_ref[r].append(i)

    def _take(self, b: BankItem, idxs: Iterable[int], method: str) -> None:
        picked = sorted(set(idxs))
        self.free.difference_update(picked)
        self.bank_done.add(b.key)
        self.pairs.append(([b], [self.ledger[i] for i in picked], method))

    def _fits(self, b: BankItem, i: int) -> bool:
        x = self.ledger[i]
        return (
            i in self.free
            and (x.mirror == b.mirror or bool(x.settles))
            and x.currency == b.entry.currency
            and (x.amount_minor > 0) == (b.amount_minor > 0)
        )

    def by_reference(self, bank: Sequence[BankItem]) -> None:
        for b in bank:
            e = b.entry
            refs = [f"recon-receipt:{b.key}", *e.refs()]
            refs += [t for t in e.remittance.split() if t in self.by_ref]
            done = False
            for r in refs:
                cands = [i for i in self.by_ref.get(r, ()) if self._fits(b, i)]
                exact = [i for i in cands if self.ledger[i].amount_minor == b.amount_minor]
                if exact:
                    self._take(b, exact[:1], "reference")
                    done = True
                    break
                if len(cands) > 1 and sum(self.ledger[i].amount_minor for i in cands) == (
                    b.amount_minor
                ):
                    self._take(b, cands, "batch")
                    done = True
                    break
            if done or len(e.end_to_end_ids) < 2:
                continue
            # batch booking: one transaction per end-to-end id
            picked: list[int] = []
            for e2e in e.end_to_end_ids:
                cands = [
                    i for i in self.by_ref.get(e2e, ()) if self._fits(b, i) and i not in picked
                ]
                if not cands:
                    break
                picked.append(cands[0])
            else:
                if sum(self.ledger[i].amount_minor for i in picked) == b.amount_minor:
                    self._take(b, picked, "batch")

    def _counterparty(self, b: BankItem) -> str:
        acct = b.entry.counterparty_account
        return self.config.counterparties.get(normalise_account(acct), "") if acct else ""

    def _in_window(self, b: BankItem, i: int) -> bool:
        return abs(_days(self.ledger[i].day, b.date)) <= self.config.match_window_days

    def by_amount_date(self, bank: Sequence[BankItem]) -> None:
        index: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i in sorted(self.free):
            x = self.ledger[i]
            index[("" if x.settles else x.mirror, x.amount_minor)].append(i)
        for b in bank:
            if b.key in self.bank_done:
                continue
            cp = self._counterparty(b)
            cands = [
                i
                for i in (
                    *index.get((b.mirror, b.amount_minor), ()),
                    *index.get(("", b.amount_minor), ()),
                )
                if self._fits(b, i)
                and self._in_window(b, i)
                and (not cp or not self.ledger[i].counterparty or self.ledger[i].counterparty == cp)
            ]
            if not cands:
                continue
            best = min(
                cands,
                key=lambda i: (
                    0 if cp and self.ledger[i].counterparty == cp else 1,
                    abs(_days(self.ledger[i].day, b.date)),
                    self.ledger[i].seq,
                ),
            )
            self._take(b, [best], "amount_date")

    def by_batch(self, bank: Sequence[BankItem]) -> None:
        cfg = self.config
        for b in bank:
            if b.key in self.bank_done:
                continue
            cands = [i for i in sorted(self.free) if self._fits(b, i) and self._in_window(b, i)]
            if len(cands) < 2:
                continue
            cands.sort(key=lambda i: (abs(_days(self.ledger[i].day, b.date)), self.ledger[i].seq))
            cands = cands[: cfg.batch_max_items]
            found = subset_sum(
                [abs(self.ledger[i].amount_minor) for i in cands],
                abs(b.amount_minor),
                cfg.batch_max_steps,
            )
            if found is not None and len(found) >= 2:
                self._take(b, [cands[k] for k in found], "batch")

    def returned_excess(self, bank: Sequence[BankItem], view: LedgerView, cutoff: int) -> None:
        """Each settlement (by the cut-off) returning an excess explains one unmatched bank
        credit of its amount booked by its reconciliation's day (the platform money it
        returned); the settlement stays free to match the bank's return debit."""
        for x in self.ledger:
            recorded = view.reconciliations.get(x.settles) if x.settles else None
            if recorded is None or x.amount_minor >= 0 or x.ts > cutoff:
                continue
            for b in bank:
                if (
                    b.key not in self.bank_done
                    and b.amount_minor == -x.amount_minor
                    and b.entry.currency == x.currency
                    and b.date <= recorded.day
                ):
                    self.bank_done.add(b.key)
                    self.pairs.append(([b], [], "returned_excess"))
                    break


def subset_sum(values: Sequence[int], target: int, max_steps: int) -> list[int] | None:
    """Indexes of values (all > 0) adding up to `target`, found by a depth-first search that
    visits at most `max_steps` nodes; None if none was found within the budget."""
    order = sorted(range(len(values)), key=lambda k: -values[k])
    vals = [values[k] for k in order]
    suffix = [0] * (len(vals) + 1)
    for k in range(len(vals) - 1, -1, -1):
        suffix[k] = suffix[k + 1] + vals[k]
    steps = 0
    chosen: list[int] = []

    def dfs(k: int, remaining: int) -> bool:
        nonlocal steps
        if remaining == 0:
            return True
        if k == len(vals) or suffix[k] < remaining:
            return False
        steps += 1
        if steps > max_steps:
            return False
        if vals[k] <= remaining:
            chosen.append(k)
            if dfs(k + 1, remaining - vals[k]):
                return True
            chosen.pop()
        return dfs(k + 1, remaining)

    if target <= 0 or not dfs(0, target):
        return None
    return sorted(order[k] for k in chosen)


def _classify(
    res: MatchResult,
    view: LedgerView,
    m: _Matcher,
    bank: Sequence[BankItem],
    ledger: Sequence[LedgerItem],
    cutoff: int,
    config: PlatformConfig,
) -> None:
    day = res.day
    free = [ledger[i] for i in sorted(m.free) if ledger[i].ts <= cutoff]
    # a receipt and its reversal, neither seen at the bank: nothing moved
    by_key = {x.key: x for x in free}
    cancelled: set[str] = set()
    for x in free:
        orig = by_key.get(x.reverses) if x.reverses else None
        if orig is not None and orig.amount_minor == -x.amount_minor and orig.key not in cancelled:
            cancelled.update((x.key, orig.key))
    for x in free:
        age = _days(day, x.day)
        if x.key in cancelled:
            state = CANCELLED
        elif age < config.timing_days:
            state = TIMING
        else:
            state = UNMATCHED_LEDGER
        res.open.append(
            Open(
                "ledger", state, x.key, x.mirror, x.amount_minor, x.day, age, x.refs, x.counterparty
            )
        )
    for b in bank:
        if b.key in m.bank_done:
            continue
        e = b.entry
        res.open.append(
            Open(
                "bank",
                UNMATCHED_BANK,
                b.key,
                b.mirror,
                e.amount_minor,
                e.booking_date,
                _days(day, e.booking_date),
                e.refs(),
                e.counterparty_account or e.counterparty_name,
            )
        )
        if e.amount_minor > 0:
            susp = view.accounts_of("suspense", e.currency)
            if not susp:
                res.notes.append(f"no suspense account in {e.currency}: receipt {b.key} waits")
                continue
            ref = (e.refs() or ("",))[0]
            res.suggestions.append(
                c.Deposit(
                    client_id=f"recon-receipt:{b.key}",
                    mirror_account_id=b.mirror,
                    account_id=susp[0],
                    amount_minor=e.amount_minor,
                    currency=e.currency,
                    bank_ref=ref[:256],
                )
            )
