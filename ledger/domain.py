"""In-memory live state of one platform's log: accounts, holds, finished instructions.

This state is a pure fold over the platform's records (`PlatformState.apply`). The writer applies
each record it commits and a restart replays the log, so both paths run the same code and must
agree; controls read it through the `controls.view` protocols and never mutate it.
"""

from __future__ import annotations

import enum
import hashlib
from array import array
from collections.abc import Callable, Iterator, MutableMapping
from itertools import accumulate
from operator import attrgetter
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
    """What an accepted instruction produced, for idempotent replies and reversals.

    `entries` (the postings, which only a reversal needs) may be left in the instruction's
    stored record: then `source(seq, kind)` reads them from there on first use (see DoneTable).
    """

    __slots__ = ("_entries", "fingerprint", "kind", "reversed_by", "seq", "source")

    def __init__(
        self,
        fingerprint: int,
        seq: int,
        kind: str,
        entries: list[list[Any]] | None,
        source: Callable[[int, str], list[list[Any]] | None] | None = None,
    ) -> None:
        self.fingerprint = fingerprint
        self.seq = seq
        self.kind = kind
        self._entries = entries
        self.source = source
        self.reversed_by: str | None = None

    @property
    def entries(self) -> list[list[Any]] | None:
        source = self.source
        if source is not None:
            self._entries = source(self.seq, self.kind)
            self.source = None
        return self._entries


# -- the done table at scale ----------------------------------------------------------------------
#
# A platform keeps every accepted client id forever (a retry must get the same answer forever),
# so at 10 M records the done table is most of the state. As a dict of objects it cannot be
# rebuilt from a snapshot in seconds (10 M strings and a 10 M-entry dict take ~8 s alone). So
# rows that reach a snapshot move into a compact, immutable `DoneBase`: flat columns plus an
# open-addressing hash table over them, stored as they are in the snapshot and loaded without
# building one Python object per row. Lookups are exact: the hash only finds the slot, the
# client id itself is compared. Rows accepted since live in a plain dict in front of it.

DONE_KEY_LEN: Final = 16  # blake2b key of the base's hash table (random per base)
DONE_MAX_ROWS: Final = (1 << 31) - 1  # table entries hold row + 1 in 32 bits; 2^32 slots at most
DONE_MAX_KINDS: Final = 256  # kinds are one byte per row
DONE_MAX_LOAD: Final = 0.5  # table slots >= 2 x rows: a miss probes 1.5 slots on average
_LOW32: Final = 0xFFFFFFFF
# any str is a valid key (a lone surrogate too: looking one up must not raise), one bytes each
_UTF8: Final = ("utf-8", "surrogatepass")
_FINGERPRINT: Final = attrgetter("fingerprint")
_SEQ: Final = attrgetter("seq")
_KIND: Final = attrgetter("kind")
_BLAKE2B: Final = hashlib.blake2b


def _keyed(key: bytes) -> Any:
    """The tag hash, keyed: 32 bits of BLAKE2b, so chosen client ids cannot be made to pile up
    on one slot. A row's tag is `int.from_bytes(digest of keyed.copy() + cid, "big")`; copying
    the keyed state skips hashing the key block for every client id."""
    return _BLAKE2B(digest_size=4, key=key)


def _bits_for(rows: int) -> int:
    bits = 4
    while (1 << bits) * DONE_MAX_LOAD < rows:
        bits += 1
    assert bits <= 32, "DONE_MAX_ROWS keeps the table within 2^32 slots"
    return bits


class DoneBase:
    """Done rows that reached a snapshot, in flat columns (row r = the r-th row added).

    cids: the client ids' UTF-8 bytes concatenated, `offsets[r]`..`offsets[r+1]` for row r;
    fps: 16 bytes per row (big-endian fingerprint); seqs: the record positions; kinds: one byte
    per row, an index into `kind_names`; table: 2^bits slots, each 0 (empty) or
    tag << 32 | (row + 1), linear probing from slot tag >> (32 - bits). `reversed` maps the
    reversed rows to their reversal's client id. Columns are memoryviews straight over the
    snapshot body after a load, arrays once rows have been added.
    """

    __slots__ = (
        "bits",
        "cids",
        "fps",
        "key",
        "keyed",
        "kind_names",
        "kinds",
        "n",
        "offsets",
        "reversed",
        "seqs",
        "source",
        "table",
    )

    def __init__(
        self,
        key: bytes,
        kind_names: list[str],
        cids: Any,
        offsets: Any,
        fps: Any,
        seqs: Any,
        kinds: Any,
        table: Any,
        reversed_by: dict[str, str],
    ) -> None:
        n = len(seqs)
        bits = len(table).bit_length() - 1
        if not (
            len(key) == DONE_KEY_LEN
            and len(kind_names) <= DONE_MAX_KINDS
            and n <= DONE_MAX_ROWS
            and len(offsets) == n + 1
            and offsets[0] == 0
            and offsets[n] == len(cids)
            and len(fps) == 16 * n
            and len(kinds) == n
            and not bytes(kinds).translate(None, bytes(range(len(kind_names))))  # C speed
            and 4 <= bits <= 32
            and len(table) == 1 << bits
            and n <= (1 << bits) * DONE_MAX_LOAD
        ):
            raise ValueError("done table columns are inconsistent")
        self.key = key
        self.keyed = _keyed(key)
        self.kind_names = kind_names
        self.cids = cids
        self.offsets = offsets
        self.fps = fps
        self.seqs = seqs
        self.kinds = kinds
        self.table = table
        self.bits = bits
        self.n = n
        self.reversed = reversed_by
        # reads a row's postings from its record (set by ledger/snapshot.py: needs the store)
        self.source: Callable[[int, str], list[list[Any]] | None] | None = None

    @classmethod
    def empty(cls, key: bytes) -> DoneBase:
        empty = bytearray
        return cls(key, [], empty(), array("Q", [0]), empty(), array("q"), empty(), _table(4), {})

    def find(self, cid: str) -> int:
        """The row of `cid`, or -1. Exact: a tag match is confirmed on the client id."""
        raw = cid.encode(*_UTF8)
        h = self.keyed.copy()
        h.update(raw)
        tag = int.from_bytes(h.digest(), "big")
        table = self.table
        mask = len(table) - 1
        i = tag >> (32 - self.bits)
        cids, offsets = self.cids, self.offsets
        for _ in range(len(table)):  # bounded: a table is never full (DONE_MAX_LOAD)
            entry = table[i]
            if entry == 0:
                return -1
            if entry >> 32 == tag:
                r: int = (entry & _LOW32) - 1
                if cids[offsets[r] : offsets[r + 1]] == raw:
                    return r
            i = (i + 1) & mask
        raise StateError("done table has no free slot")

    def cid(self, r: int) -> str:
        return bytes(self.cids[self.offsets[r] : self.offsets[r + 1]]).decode(*_UTF8)

    def row(self, r: int, cid: str) -> Done:
        done = Done(
            int.from_bytes(self.fps[16 * r : 16 * r + 16], "big"),
            self.seqs[r],
            self.kind_names[self.kinds[r]],
            None,
            self.source or _no_source,
        )
        done.reversed_by = self.reversed.get(cid)
        return done

    def extend(self, rows: dict[str, Done], loaded: dict[str, Done]) -> None:
        """Append `rows` (in their order) and fold in the reversal marks of `loaded`, in place:
        a capture costs the new rows, not the table. All or nothing: on any failure the
        columns are cut back and the slots taken are emptied again."""
        n = self.n + len(rows)
        if n > DONE_MAX_ROWS:
            raise ValueError(f"more than {DONE_MAX_ROWS} accepted client ids")
        kind_index = {k: i for i, k in enumerate(self.kind_names)}
        kind_names = list(self.kind_names)
        for done in rows.values():
            if done.kind not in kind_index:
                kind_index[done.kind] = len(kind_names)
                kind_names.append(done.kind)
        if len(kind_names) > DONE_MAX_KINDS:
            raise ValueError("too many record kinds")
        self._own()
        cids, offsets, fps, seqs, kinds = self.cids, self.offsets, self.fps, self.seqs, self.kinds
        old = (self.n, len(cids))
        bits = _bits_for(n)
        table = self.table if bits == self.bits else self._grown(bits)
        taken: list[int] = []  # slots filled in `table`, emptied again on failure
        try:
            raws = [cid.encode(*_UTF8) for cid in rows]
            dones = list(rows.values())
            ends = accumulate(map(len, raws), initial=len(cids))
            next(ends)  # `initial` is the last offset already there
            offsets.extend(ends)
            cids += b"".join(raws)
            fps += b"".join([fp.to_bytes(16, "big") for fp in map(_FINGERPRINT, dones)])
            seqs.extend(map(_SEQ, dones))
            kinds += bytes(map(kind_index.__getitem__, map(_KIND, dones)))
            mask = (1 << bits) - 1
            shift = 32 - bits
            copy = self.keyed.copy
            from_bytes = int.from_bytes
            append = taken.append
            for r, raw in enumerate(raws, self.n + 1):  # stored as row + 1
                h = copy()
                h.update(raw)
                t = from_bytes(h.digest(), "big")
                i = t >> shift
                while table[i]:
                    i = (i + 1) & mask
                table[i] = t << 32 | r
                append(i)
        except BaseException:
            n0, c0 = old
            del cids[c0:], offsets[n0 + 1 :], fps[16 * n0 :], seqs[n0:], kinds[n0:]
            for i in taken:
                table[i] = 0
            raise
        self.table, self.bits, self.n, self.kind_names = table, bits, n, kind_names
        for table_ in (rows, loaded):
            for cid, done in table_.items():
                if done.reversed_by is not None:
                    self.reversed[cid] = done.reversed_by

    def _own(self) -> None:
        """Growable copies of columns that are still views over a loaded snapshot body."""
        for name in ("cids", "fps", "kinds"):
            if type(getattr(self, name)) is not bytearray:
                setattr(self, name, bytearray(getattr(self, name)))
        for name, code in (("offsets", "Q"), ("seqs", "q"), ("table", "Q")):
            if type(getattr(self, name)) is not array:
                setattr(self, name, _copy(code, getattr(self, name)))

    def _grown(self, bits: int) -> array[int]:
        """The table at 2^bits slots: an entry's slot is a prefix of its 32-bit tag, so no
        client id is hashed again."""
        table = _table(bits)
        mask = (1 << bits) - 1
        shift = 32 - bits
        for entry in self.table:
            if entry:
                i = (entry >> 32) >> shift
                while table[i]:
                    i = (i + 1) & mask
                table[i] = entry
        return table


def _table(bits: int) -> array[int]:
    return array("Q", bytes(8 << bits))


def _copy(code: str, column: Any) -> array[int]:
    """A growable copy of an int column (an array, or a memoryview over a snapshot body)."""
    out = array(code)
    out.frombytes(memoryview(column).cast("B"))
    return out


def _no_source(seq: int, kind: str) -> list[list[Any]] | None:
    raise StateError(f"the postings of record {seq} are in the store, and none is attached")


class DoneTable(MutableMapping[str, Done]):
    """Client id -> Done: rows accepted since the last snapshot in a dict (`rows`), older ones in
    a `DoneBase`. A base row read once is kept in `loaded`, so it is the same object on every
    read (a reversal marks it; a savepoint rollback unmarks it)."""

    __slots__ = ("base", "loaded", "miss", "rows")

    def __init__(self) -> None:
        self.rows: dict[str, Done] = {}
        self.base: DoneBase | None = None
        self.loaded: dict[str, Done] = {}
        # the last client id the base was asked for and does not hold: `add` right after the
        # writer's own check need not look again (the base only changes in `freeze`)
        self.miss: object = None

    def __contains__(self, cid: object) -> bool:
        if cid in self.rows:
            return True
        base = self.base
        if base is None or type(cid) is not str:
            return False
        if cid in self.loaded or base.find(cid) >= 0:
            return True
        self.miss = cid
        return False

    def get(self, cid: str, default: Any = None) -> Any:
        done = self.rows.get(cid)
        if done is not None:
            return done
        base = self.base
        if base is None:
            return default
        done = self.loaded.get(cid)
        if done is not None:
            return done
        r = base.find(cid)
        if r < 0:
            self.miss = cid
            return default
        done = self.loaded[cid] = base.row(r, cid)
        return done

    def __getitem__(self, cid: str) -> Done:
        done: Done | None = self.get(cid)
        if done is None:
            raise KeyError(cid)
        return done

    def add(self, cid: str, done: Done) -> bool:
        """Add a new row; False (and nothing added) if `cid` is already in the table."""
        rows = self.rows
        if cid in rows:
            return False
        base = self.base
        if base is not None and cid != self.miss and (cid in self.loaded or base.find(cid) >= 0):
            return False
        rows[cid] = done
        return True

    def __setitem__(self, cid: str, done: Done) -> None:
        if not self.add(cid, done):
            raise KeyError(f"client id {cid!r} is already done")

    def __delitem__(self, cid: str) -> None:
        del self.rows[cid]  # only new rows are ever taken back (a rolled back savepoint)

    def __len__(self) -> int:
        return len(self.rows) + (0 if self.base is None else self.base.n)

    def __iter__(self) -> Iterator[str]:
        base = self.base
        if base is not None:
            for r in range(base.n):
                yield base.cid(r)
        yield from self.rows

    def freeze(self, key: bytes | None = None) -> DoneBase:
        """Move every row into the base (a snapshot stores the base as it is). All or nothing
        (`DoneBase.extend`); `key` keys a first base's hash."""
        base = self.base
        if base is None:
            assert key is not None and len(key) == DONE_KEY_LEN
            base = DoneBase.empty(key)
        base.extend(self.rows, self.loaded)
        self.base = base
        self.rows = {}
        self.loaded = {}
        self.miss = None
        return base


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
        self.done = DoneTable()
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
        if not self.done.add(client_id, done):
            raise StateError(f"record {done.seq}: client id {client_id!r} accepted twice")
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
