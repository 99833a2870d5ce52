"""In-memory live state of one platform's log: accounts, holds, finished instructions.

This state is a pure fold over the platform's records (`PlatformState.apply`). The writer applies
each record it commits and a restart replays the log, so both paths run the same code and must
agree; controls read it through the `controls.view` protocols and never mutate it.
"""

from __future__ import annotations

import enum
from typing import Any, Final

from controls.policy import DAY_MS, DEFAULT_POLICY, Policy
from ledger.money import SUM_MAX_MINOR


class AccountKind(enum.StrEnum):
    CUSTOMER = "customer"  # segregated customer sub-account (customer money, liability)
    OMNIBUS = "omnibus"  # mirror of the custody bank account holding all customer money (asset)
    OWN_FUNDS = "own_funds"  # the platform's own money (liability to the platform)
    FEE_INCOME = "fee_income"  # fees earned by the platform (platform money)
    SUSPENSE = "suspense"  # unidentified bank receipts (customer money until cleared)
    PLATFORM_BANK = "platform_bank"  # mirror of the platform's own-funds bank account (asset)


class CustomerRole(enum.StrEnum):
    LENDER = "lender"
    BORROWER = "borrower"
    GUARANTOR = "guarantor"
    OTHER = "other"


class AccountStatus(enum.StrEnum):
    OPEN = "open"
    FROZEN = "frozen"
    CLOSED = "closed"


class HoldStatus(enum.StrEnum):
    PENDING = "pending"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


# Asset-side mirrors carry debit-normal balances; everything else is credit-normal.
ASSET_KINDS: Final = frozenset({AccountKind.OMNIBUS, AccountKind.PLATFORM_BANK})
# Accounts whose available balance (credits - debits - pending debits) may never go below zero.
NON_NEGATIVE_KINDS: Final = frozenset(
    {AccountKind.CUSTOMER, AccountKind.OWN_FUNDS, AccountKind.FEE_INCOME, AccountKind.SUSPENSE}
)
CUSTOMER_MONEY_KINDS: Final = frozenset({AccountKind.CUSTOMER, AccountKind.SUSPENSE})


class Account:
    """One ledger account. Totals are TigerBeetle-style monotone counters, never decremented."""

    __slots__ = (
        "credits_pending_minor",
        "credits_posted_minor",
        "currency",
        "debits_pending_minor",
        "debits_posted_minor",
        "holder",
        "holder_blind",
        "holder_type",
        "id",
        "kind",
        "last_seq",
        "must_not_go_negative",
        "opened_seq",
        "payee_bank",
        "payee_bound_ms",
        "payee_ref",
        "payee_replaced",
        "public_key",
        "role",
        "status",
        "tokens",
    )

    def __init__(
        self,
        account_id: str,
        kind: AccountKind,
        currency: str,
        role: str | None,
        opened_seq: int,
        holder: dict[str, Any] | None,
    ) -> None:
        self.id = account_id
        self.kind = kind
        self.currency = currency
        self.role = role
        self.status = AccountStatus.OPEN
        self.opened_seq = opened_seq
        self.last_seq = opened_seq
        self.holder = holder
        self.must_not_go_negative = kind in NON_NEGATIVE_KINDS
        self.debits_posted_minor = 0
        self.credits_posted_minor = 0
        self.debits_pending_minor = 0
        self.credits_pending_minor = 0
        # customer facts the controls need: blinded holder name, key, bound payout account
        self.holder_blind: str | None = None
        self.holder_type = "individual"
        self.public_key = ""
        self.payee_ref = ""
        self.payee_bank: dict[str, str] | None = None
        self.payee_bound_ms = 0
        self.payee_replaced = False  # the binding replaced an earlier one: cool-off applies
        self.tokens: tuple[str, ...] = ()  # screening tokens of the holder and bound accounts

    @property
    def posted_minor(self) -> int:
        """Signed balance in the account's normal direction."""
        if self.kind in ASSET_KINDS:
            return self.debits_posted_minor - self.credits_posted_minor
        return self.credits_posted_minor - self.debits_posted_minor

    @property
    def held_minor(self) -> int:
        return self.debits_pending_minor

    @property
    def available_minor(self) -> int:
        return self.credits_posted_minor - self.debits_posted_minor - self.debits_pending_minor

    def has_activity_outstanding(self) -> bool:
        return (
            self.debits_posted_minor != self.credits_posted_minor
            or self.debits_pending_minor != 0
            or self.credits_pending_minor != 0
        )


class Hold:
    __slots__ = (
        "amount_minor",
        "credit",
        "debit",
        "expires_at_ms",
        "id",
        "kind",
        "owner_ref",
        "placed_seq",
        "reason",
        "status",
    )

    def __init__(
        self,
        hold_id: str,
        debit: str,
        credit: str,
        amount_minor: int,
        expires_at_ms: int,
        reason: str,
        kind: str,
        placed_seq: int,
        owner_ref: str = "",
    ) -> None:
        self.owner_ref = owner_ref
        self.id = hold_id
        self.debit = debit
        self.credit = credit
        self.amount_minor = amount_minor
        self.expires_at_ms = expires_at_ms
        self.reason = reason
        self.kind = kind
        self.placed_seq = placed_seq
        self.status = HoldStatus.PENDING


class Done:
    """What an accepted instruction produced, for idempotent replies and reversals."""

    __slots__ = ("entries", "fingerprint", "kind", "reversed_by", "seq")

    def __init__(
        self,
        fingerprint: int,
        seq: int,
        kind: str,
        entries: list[list[Any]] | None,
    ) -> None:
        self.fingerprint = fingerprint
        self.seq = seq
        self.kind = kind
        self.entries = entries
        self.reversed_by: str | None = None


class PendingRequest:
    """A manual operation waiting for a checker (maker-checker)."""

    __slots__ = ("cmd", "executed_by", "expires_at_ms", "id", "maker", "op", "seq", "status")

    def __init__(
        self, request_id: str, op: str, cmd: dict[str, Any], maker: str, expires: int, seq: int
    ) -> None:
        self.id = request_id
        self.op = op
        self.cmd = cmd
        self.maker = maker
        self.expires_at_ms = expires
        self.seq = seq
        self.status = "pending"  # pending | approved | rejected
        self.executed_by: str | None = None


class Standing:
    """A customer-signed standing authorisation (auto-bid, auto-repay)."""

    __slots__ = ("account", "id", "payee", "per_txn_max_minor", "purpose", "revoked", "valid_until")

    def __init__(
        self, standing_id: str, account: str, purpose: str, payee: str, cap: int, until: int
    ) -> None:
        self.id = standing_id
        self.account = account
        self.purpose = purpose
        self.payee = payee
        self.per_txn_max_minor = cap
        self.valid_until = until
        self.revoked = False


class Alert:
    """An early-warning alert and where it is in its lifecycle."""

    __slots__ = ("id", "level", "raised_seq", "rule", "status", "subject")

    def __init__(self, alert_id: str, rule: str, level: str, subject: str, seq: int) -> None:
        self.id = alert_id
        self.rule = rule
        self.level = level
        self.subject = subject
        self.raised_seq = seq
        self.status = "raised"  # raised | acknowledged | closed


_MISSING: Final = object()


class StateError(Exception):
    """A record does not apply to the state: the log is inconsistent (corrupt or forged)."""


_ACCOUNT_MUTABLE = (
    "status",
    "last_seq",
    "debits_posted_minor",
    "credits_posted_minor",
    "debits_pending_minor",
    "credits_pending_minor",
)


class Savepoint:
    """Old values of everything touched since it was taken, so a linked batch can be undone."""

    __slots__ = (
        "accounts",
        "done",
        "holds",
        "new_accounts",
        "new_done",
        "new_holds",
        "scalars",
        "undo",
    )

    def __init__(self, state: PlatformState) -> None:
        self.accounts: dict[str, tuple[Any, ...]] = {}
        self.holds: dict[str, HoldStatus] = {}
        self.done: dict[str, str | None] = {}
        self.new_accounts: list[str] = []
        self.new_holds: list[str] = []
        self.new_done: list[str] = []
        # (dict, key, old value or _MISSING) for the per-day and authorisation tables
        self.undo: list[tuple[dict[Any, Any], Any, Any]] = []
        self.scalars = (
            state.next_seq,
            state.last_ts_ms,
            state.created,
            {k: list(v) for k, v in state.totals_by_currency.items()},
            state.day,
            state.day_counters,
            state.day_lvt,
            state.day_outflow,
            state.day_start_custody,
            state.nonces,
            state.auth_failures,
        )


class PlatformState:
    """The fold of one platform's records. `apply` trusts nothing it is given."""

    __slots__ = (
        "_sp",
        "accounts",
        "alerts",
        "auth_failures",
        "created",
        "day",
        "day_counters",
        "day_lvt",
        "day_outflow",
        "day_start_custody",
        "done",
        "gate",
        "holds",
        "last_ts_ms",
        "liabilities",
        "next_seq",
        "nonces",
        "omnibus_ids",
        "pending_holds",
        "platform_id",
        "policy",
        "reconciliation_ids",
        "reconciliation_open",
        "reconciliations",
        "requests",
        "standing",
        "totals_by_currency",
    )

    def __init__(self, platform_id: str) -> None:
        self.platform_id = platform_id
        self.accounts: dict[str, Account] = {}
        self.holds: dict[str, Hold] = {}
        # Pending holds only, in placement order: the expiry sweep must not scan history.
        self.pending_holds: dict[str, Hold] = {}
        self.done: dict[str, Done] = {}
        self.next_seq = 0
        self.last_ts_ms = 0
        self.created = False
        # currency -> [sum of posted debits, sum of posted credits]; equal at every record.
        self.totals_by_currency: dict[str, list[int]] = {}
        self._sp: Savepoint | None = None
        # governance: the policy in force, the platform gate, manual requests, standing auths
        self.policy: Policy = DEFAULT_POLICY
        self.gate = "NORMAL"
        self.requests: dict[str, PendingRequest] = {}
        self.standing: dict[str, Standing] = {}
        self.omnibus_ids: list[str] = []
        self.alerts: dict[str, Alert] = {}
        # (currency, snapshot size) -> position of its published liabilities statement
        self.liabilities: dict[tuple[str, int], int] = {}
        # currency -> the last reconciliation_completed record's figures (and its position)
        self.reconciliations: dict[str, dict[str, Any]] = {}
        self.reconciliation_ids: set[str] = set()  # settled or balanced: one a day per currency
        # reconciliation id -> signed difference still to settle (shortfall < 0, excess > 0)
        self.reconciliation_open: dict[str, tuple[str, int]] = {}  # id -> (currency, left)
        # customer authorisation: (account, nonce) -> expiry, and recent failures per account
        self.nonces: dict[tuple[str, str], int] = {}
        self.auth_failures: dict[str, tuple[int, ...]] = {}
        # the business day (policy.day_offset_ms) and what happened in it so far
        self.day = -1
        self.day_counters: dict[tuple[str, str], tuple[int, int]] = {}  # (acct, op)->(sum, n)
        self.day_lvt: dict[tuple[str, str], int] = {}  # (customer acct, "in"|"out") -> sum
        self.day_outflow: dict[str, int] = {}  # currency -> withdrawals - deposits, customers
        self.day_start_custody: dict[str, int] = {}  # currency -> omnibus balance at day start

    # -- savepoints (linked batches) ------------------------------------------------------------

    def savepoint(self) -> Savepoint:
        assert self._sp is None, "savepoints do not nest"
        self._sp = Savepoint(self)
        return self._sp

    def release(self, sp: Savepoint) -> None:
        assert self._sp is sp
        self._sp = None

    def rollback(self, sp: Savepoint) -> None:
        assert self._sp is sp
        self._sp = None
        for account_id, values in sp.accounts.items():
            account = self.accounts[account_id]
            for name, value in zip(_ACCOUNT_MUTABLE, values, strict=True):
                setattr(account, name, value)
        for hold_id, status in sp.holds.items():
            hold = self.holds[hold_id]
            hold.status = status
            if status is HoldStatus.PENDING:
                self.pending_holds[hold_id] = hold
        for cid, reversed_by in sp.done.items():
            self.done[cid].reversed_by = reversed_by
        for account_id in sp.new_accounts:
            if self.accounts.pop(account_id).kind is AccountKind.OMNIBUS:
                self.omnibus_ids.remove(account_id)
        for hold_id in sp.new_holds:
            del self.holds[hold_id]
            self.pending_holds.pop(hold_id, None)
        for cid in sp.new_done:
            del self.done[cid]
        for table, key, old in reversed(sp.undo):
            if old is _MISSING:
                table.pop(key, None)
            else:
                table[key] = old
        (
            self.next_seq,
            self.last_ts_ms,
            self.created,
            self.totals_by_currency,
            self.day,
            self.day_counters,
            self.day_lvt,
            self.day_outflow,
            self.day_start_custody,
            self.nonces,
            self.auth_failures,
        ) = sp.scalars

    def _save_account(self, sp: Savepoint, account: Account) -> None:
        if account.id not in sp.accounts:
            sp.accounts[account.id] = tuple(getattr(account, n) for n in _ACCOUNT_MUTABLE)

    # -- lifecycle primitives -------------------------------------------------------------------

    def add_account(self, account: Account) -> None:
        if account.id in self.accounts:
            raise StateError(f"record {account.opened_seq}: account {account.id!r} opened twice")
        self.accounts[account.id] = account
        if account.kind is AccountKind.OMNIBUS:
            self.omnibus_ids.append(account.id)
        if self._sp is not None:
            self._sp.new_accounts.append(account.id)

    def set_status(self, account: Account, status: AccountStatus, seq: int) -> None:
        if self._sp is not None:
            self._save_account(self._sp, account)
        account.status = status
        account.last_seq = seq

    def add_done(self, client_id: str, done: Done) -> None:
        if client_id in self.done:
            raise StateError(f"record {done.seq}: client id {client_id!r} accepted twice")
        self.done[client_id] = done
        if self._sp is not None:
            self._sp.new_done.append(client_id)

    def mark_reversed(self, client_id: str, by_client_id: str, seq: int) -> None:
        original = self.done.get(client_id)
        if original is None or original.reversed_by is not None:
            raise StateError(f"record {seq}: {client_id!r} is not reversible")
        if self._sp is not None and client_id not in self._sp.done:
            self._sp.done[client_id] = original.reversed_by
        original.reversed_by = by_client_id

    # -- posting primitives (callers have already run the controls) --------------------------

    def post(self, debit_id: str, credit_id: str, amount_minor: int, seq: int) -> None:
        debit = self.accounts[debit_id]
        credit = self.accounts[credit_id]
        sp = self._sp
        if sp is not None:
            self._save_account(sp, debit)
            self._save_account(sp, credit)
        if debit.currency != credit.currency:
            raise StateError(f"record {seq}: currency mismatch {debit_id}->{credit_id}")
        debit.debits_posted_minor += amount_minor
        credit.credits_posted_minor += amount_minor
        debit.last_seq = seq
        credit.last_seq = seq
        totals = self.totals_by_currency.setdefault(debit.currency, [0, 0])
        totals[0] += amount_minor
        totals[1] += amount_minor
        if totals[0] > SUM_MAX_MINOR or credit.credits_posted_minor > SUM_MAX_MINOR:
            raise StateError(f"record {seq}: total overflows 2^63-1")
        if debit.must_not_go_negative and debit.available_minor < 0:
            raise StateError(f"record {seq}: account {debit_id} below zero")

    def reserve(self, hold: Hold) -> None:
        if hold.id in self.holds:
            raise StateError(f"record {hold.placed_seq}: hold {hold.id} placed twice")
        debit = self.accounts[hold.debit]
        credit = self.accounts[hold.credit]
        sp = self._sp
        if sp is not None:
            self._save_account(sp, debit)
            self._save_account(sp, credit)
            sp.new_holds.append(hold.id)
        debit.debits_pending_minor += hold.amount_minor
        credit.credits_pending_minor += hold.amount_minor
        debit.last_seq = hold.placed_seq
        if debit.must_not_go_negative and debit.available_minor < 0:
            raise StateError(f"record {hold.placed_seq}: hold {hold.id} overdraws {hold.debit}")
        self.holds[hold.id] = hold
        self.pending_holds[hold.id] = hold

    def resolve(self, hold_id: str, captured_minor: int, status: HoldStatus, seq: int) -> None:
        hold = self.holds.get(hold_id)
        if hold is None or hold.status is not HoldStatus.PENDING:
            raise StateError(f"record {seq}: hold {hold_id} is not pending")
        if not 0 <= captured_minor <= hold.amount_minor:
            raise StateError(f"record {seq}: capture beyond hold {hold_id}")
        debit = self.accounts[hold.debit]
        credit = self.accounts[hold.credit]
        sp = self._sp
        if sp is not None:
            self._save_account(sp, debit)
            self._save_account(sp, credit)
            if hold_id not in sp.holds and hold_id not in sp.new_holds:
                sp.holds[hold_id] = hold.status
        debit.debits_pending_minor -= hold.amount_minor
        credit.credits_pending_minor -= hold.amount_minor
        hold.status = status
        del self.pending_holds[hold_id]
        if captured_minor:
            self.post(hold.debit, hold.credit, captured_minor, seq)

    # -- the business day and authorisation tables (journaled inside savepoints) -------------

    def put(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        sp = self._sp
        if sp is not None:
            sp.undo.append((table, key, table.get(key, _MISSING)))
        table[key] = value

    def roll_day(self, ts_ms: int) -> None:
        """Start a new business day when `ts_ms` falls in one: per-day tables restart, the
        custody balance at its start is noted, expired nonces and old failures are dropped."""
        day = (ts_ms + self.policy.day_offset_ms) // DAY_MS
        if day == self.day:
            return
        self.day = day
        self.day_counters = {}
        self.day_lvt = {}
        self.day_outflow = {}
        custody: dict[str, int] = {}
        for account_id in self.omnibus_ids:
            account = self.accounts[account_id]
            custody[account.currency] = custody.get(account.currency, 0) + account.posted_minor
        self.day_start_custody = custody
        self.nonces = {k: exp for k, exp in self.nonces.items() if exp >= ts_ms}
        window = self.policy.auth_failure_window_ms + self.policy.auth_lock_ms
        self.auth_failures = {
            k: kept
            for k, times in self.auth_failures.items()
            if (kept := tuple(t for t in times if t > ts_ms - window))
        }

    def recent_failures(self, account_id: str, since_ms: int) -> tuple[int, ...]:
        """Bad-signature times of an account within the failure window before `since_ms`
        and after it (callers pass now - lock duration to see failures that still lock)."""
        window = self.policy.auth_failure_window_ms
        return tuple(t for t in self.auth_failures.get(account_id, ()) if t > since_ms - window)

    def totals_balanced(self) -> bool:
        return all(d == c for d, c in self.totals_by_currency.values())
