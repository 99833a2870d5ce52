"""What every projection provides to the runner, and the errors the runner raises.

A projection is a pure function of one platform's log prefix: the runner hands it decoded
records in log order inside a transaction, and it writes only its own `proj_` tables there.
Keeping it pure is what makes rebuild-from-zero and crash recovery give identical rows.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import msgspec

from ledger.records import HASH_LEN
from ledger.store import DIRECTORY_STREAM
from projections.db import Db

T = TypeVar("T")


class Record(msgspec.Struct, gc=False):
    """The fields of a log record the projections read, decoded once per record by the runner.

    A typed struct decodes faster than a dict and skips what no projection needs (`cid`, `tags`,
    `message`, ...: query pages read those back from the log). `cmd` stays raw
    bytes: the audit trail decodes its `op` (and, for refusals, the whole instruction) itself.
    Fields are lenient (`Any`) so that a record kind the projections do not know still decodes.
    """

    seq: int
    kind: str
    platform: str
    ts: int
    actor: Any = ""
    code: Any = None
    entries: Any = None
    hold: Any = None
    resolve: Any = None
    account: Any = None
    subject: Any = None
    cmd: msgspec.Raw = msgspec.Raw(b"null")


RECORD_DECODER: Final = msgspec.json.Decoder(Record)
# Money fields of a record, exactly the ones ledger/fold.py applies (docs/FORMAT.md §3).
EFFECT_KEYS: Final = frozenset({"entries", "hold", "resolve", "account", "subject", "reverses"})
# Debit-normal mirrors of real bank accounts (docs/FORMAT.md §4); all other kinds are credit-normal.
ASSET_KINDS: Final = frozenset({"omnibus", "platform_bank"})
STATUS_BY_KIND: Final = {
    "account_frozen": "frozen",
    "account_unfrozen": "open",
    "account_closed": "closed",
}
INT64_MAX: Final = 2**63 - 1
# Integer keys of a platform's accounts (and audit names): the platform's number (its position
# in the store's directory) in the high bits, the order of first appearance in its log in the
# low bits. Both are fixed by the log, so a rebuild gives the same keys; one platform's keys are
# one contiguous range, which is what its rows are scoped (dumped, dropped) by.
KEY_BITS: Final = 32
LOCAL_KEYS_MAX: Final = 2**KEY_BITS


class ProjectionError(Exception):
    """The log cannot be projected (a broken chain, a posting to an unknown account, ...)."""


class PositionConflict(ProjectionError):
    """Someone else moved this projection's position: our batch was rolled back, nothing lost."""


class LogChanged(ProjectionError):
    """A read model points at a log position whose record is not the one it projected."""


def log_body(platform: str, seq: int, state: Any, decode: Callable[[bytes], T]) -> T:
    """A record read back from the event table's `state` (chain hash + canonical bytes).

    The runner checked its chain link when it projected it; here only that it is the record
    the read model points at (position and platform), in case the log was swapped underneath.
    """
    try:
        rec: Any = decode(bytes(state)[HASH_LEN:])
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise LogChanged(f"{platform}: record at position {seq} no longer decodes") from None
    if isinstance(rec, dict):
        found = (rec.get("seq"), rec.get("platform"))
    else:
        found = (getattr(rec, "seq", None), getattr(rec, "platform", None))
    if found != (seq, platform):
        raise LogChanged(f"{platform}: the log at position {seq} is not the projected record")
    return rec  # type: ignore[no-any-return]


def platform_number(db: Db, cur: Any, platform: str) -> int:
    """The platform's position in the store's directory stream: immutable once the platform
    exists, so it can stand for the platform in the integer keys of the big tables (cached)."""
    cached = db.platform_numbers.get(platform)
    if cached is not None:
        return cached
    ph = db.ph
    cur.execute(
        f"SELECT originator_version, state FROM {db.events_table()} "
        f"WHERE originator_id = {ph} ORDER BY originator_version",
        (DIRECTORY_STREAM,),
    )
    for row in cur.fetchall():
        number, state = (row["originator_version"], row["state"]) if isinstance(row, dict) else row
        db.platform_numbers[bytes(state).decode()] = int(number)
    if platform not in db.platform_numbers:
        raise ProjectionError(f"platform {platform!r} is not in the store's directory")
    return db.platform_numbers[platform]


def key_range(pno: int) -> tuple[int, int]:
    """The inclusive range of the integer keys of platform number `pno`."""
    assert 0 <= pno < 2 ** (63 - KEY_BITS), pno
    return pno << KEY_BITS, (pno << KEY_BITS) + LOCAL_KEYS_MAX - 1


def scope(db: Db, cur: Any, platform: str, column: str) -> tuple[str, tuple[Any, ...]]:
    """WHERE clause and parameters selecting one platform's rows of a table scoped by `column`:
    `platform` (the id), `pno` (the platform's number) or an integer key column (its range)."""
    ph = db.ph
    if column == "platform":
        return f"platform = {ph}", (platform,)
    pno = platform_number(db, cur, platform)
    if column == "pno":
        return f"pno = {ph}", (pno,)
    return f"{column} BETWEEN {ph} AND {ph}", key_range(pno)


class NotProjected(ProjectionError):
    """A query asks about a log position the projection has not reached yet."""


class Projection(abc.ABC):
    """One read model. Subclasses keep caches only as a speed-up: `reset` must make them reload."""

    name: str
    # (table, primary-key columns in dump order, scope column: see `scope`).
    tables: tuple[tuple[str, tuple[str, ...], str], ...]
    # Bumped when the tables change shape: the runner then drops them (and `retired` tables of
    # earlier layouts) and projects the log again from the start.
    layout: int = 1
    retired: tuple[str, ...] = ()

    @abc.abstractmethod
    def create(self, db: Db, cur: Any) -> None:
        """Create this projection's tables and indexes if missing."""

    @abc.abstractmethod
    def apply(self, db: Db, cur: Any, platform: str, recs: Sequence[Record]) -> None:
        """Write the effects of `recs` (consecutive, in log order) in the runner's transaction."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every cache: the transaction that filled it may have rolled back."""

    def drop(self, db: Db, cur: Any, platform: str) -> None:
        """Delete this platform's rows (the runner resets the position in the same transaction)."""
        for table, _, column in self.tables:
            where, params = scope(db, cur, platform, column)
            cur.execute(f"DELETE FROM {db.t(table)} WHERE {where}", params)
        self.reset()
