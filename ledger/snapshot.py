"""State snapshots (`custody-snapshot/v2`): a restart replays only the log's tail.

A snapshot is the writer's complete live state at a committed position P (P records stored):
every table of `PlatformState`, the chain head (the stored hash of record P-1) and the Merkle
tree (`MerkleLog.snapshot()`). It is msgpack (msgspec), stored in its own `snapshots` table
beside the log, never in it: the log stays the only source of truth and a snapshot is only a
cache of its fold. Design and threat model: docs/SNAPSHOTS.md.

Body bytes: MAGIC, then a 32-byte MAC of the payload (SHA-256, or HMAC-SHA256 when the writer
has a snapshot key), then the msgpack payload. Loading checks, in order: magic, MAC, format and
code version, platform and position against the row, P <= the stored log end, the stored chain
hash of record P-1 == the snapshot's head, that record's time and Merkle leaf. Any failure means
"not this snapshot" and the caller falls back to a full replay.

The payload also names the code it was made by (a digest of the fold's source and the state's
layout): after an upgrade that changes how records fold, old snapshots are ignored and the
first start replays the whole log.
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import os
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import msgspec

from controls import policy as _policy_module
from controls.policy import Policy
from ledger import domain as _domain_module
from ledger import fold as _fold_module
from ledger import records
from ledger.domain import (
    DONE_KEY_LEN,
    Account,
    AccountKind,
    AccountStatus,
    Alert,
    Done,
    DoneBase,
    Hold,
    HoldStatus,
    PendingRequest,
    PlatformState,
    Standing,
)
from ledger.domain import StateError as StateError
from ledger.fold import recorded_postings
from ledger.merkle import Fetch, MerkleLog

FORMAT: Final = "custody-snapshot/v2"
MAGIC: Final = b"custody-snapshot/v2\n"
# v1 kept the done table as per-row columns rebuilt into a dict on load (43 s at 10 M records).
# It is refused with its own message; the restart then replays the whole log (and the service's
# next snapshot is v2). A v1 body could not load anyway: its `code` digest names older code.
MAGIC_V1: Final = b"custody-snapshot/v1\n"
MAC_LEN: Final = 32
KEEP_DEFAULT: Final = 2
TABLE: Final = "snapshots"
# Stored in parts (SQLite and PostgreSQL cap one value at 1 GB), each in a transaction of its
# own, so a 700 MB body at 10 M records never holds SQLite's one write lock for long: the
# platform's commits go on between parts (one transaction for the whole body blocked them for
# 5-10 s, long enough for a commit to time out and the writer to reload its whole log).
PART_BYTES: Final = 16 << 20
_COMPLETE_PART: Final = -1  # the marker row: written last, body = the number of parts

assert records.FINGERPRINT_LEN == 16, "DoneBase keeps 16 bytes per fingerprint"


class SnapshotError(ValueError):
    """This snapshot cannot be used (corrupt, forged, foreign, stale or from other code)."""


def _layout() -> dict[str, list[str]]:
    classes: list[Any] = [Account, Hold, Done, PendingRequest, Standing, Alert, PlatformState]
    out = {cls.__name__: list(cls.__slots__) for cls in classes}
    out["Policy"] = list(Policy.__struct_fields__)
    return out


def _code_version() -> str:
    """Digest of what decides the shape and meaning of the state: the fold, the domain, the
    policy and this module. Any change invalidates existing snapshots (one full replay)."""
    h = hashlib.sha256(msgspec.json.encode(_layout()))
    for module in (_domain_module, _fold_module, _policy_module):
        try:
            h.update(Path(module.__file__ or "").read_bytes())
        except OSError:  # no source (frozen app): the layout alone has to do
            h.update(module.__name__.encode())
    try:
        h.update(Path(__file__).read_bytes())
    except OSError:
        h.update(FORMAT.encode())
    return h.hexdigest()[:32]


CODE_VERSION: Final = _code_version()

# Every PlatformState slot this module captures. A slot added to the state without being added
# here makes `capture` refuse: a snapshot must never silently miss part of the state.
CAPTURED_SLOTS: Final = frozenset(
    {
        "_sp",  # must be None (no linked batch open)
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
    }
)


class Payload(msgspec.Struct, forbid_unknown_fields=True):
    """Everything a restart needs; small tables as lists (insertion order is kept)."""

    format: str
    code: str
    platform: str
    position: int  # records covered: 0 .. position-1
    head: bytes  # chain hash of record position-1
    created_ms: int
    # PlatformState scalars
    next_seq: int
    last_ts_ms: int
    created: bool
    gate: str
    policy: Policy
    day: int
    totals: list[tuple[str, int, int]]
    omnibus_ids: list[str]
    # objects: slot values in the class's __slots__ order
    accounts: list[list[Any]]
    holds: list[list[Any]]
    pending_holds: list[str]
    requests: list[list[Any]]
    standing: list[list[Any]]
    alerts: list[list[Any]]
    # the done table's base (ledger/domain.py DoneBase), its columns as they are in memory:
    # decoded as memoryviews over the body, so loading builds no object per row
    byteorder: str  # the int columns are in this machine order
    done_key: bytes
    done_kind_names: list[str]
    done_cids: memoryview
    done_offsets: memoryview  # uint64, rows + 1
    done_fps: memoryview  # 16 bytes per row, big-endian
    done_seqs: memoryview  # int64 per row
    done_kinds: memoryview  # one byte per row: index into done_kind_names
    done_table: memoryview  # uint64 slots
    done_reversed: list[tuple[str, str]]
    # per-day and authorisation tables
    liabilities: list[tuple[str, int, int]]
    reconciliations: list[tuple[str, dict[str, Any]]]
    reconciliation_ids: list[str]
    # id -> (currency, signed difference not yet settled)
    reconciliation_open: list[tuple[str, tuple[str, int]]]
    nonces: list[tuple[Any, str, int]]
    auth_failures: list[tuple[str, list[int]]]
    day_counters: list[tuple[str, str, int, int]]
    day_lvt: list[tuple[str, str, int]]
    day_outflow: list[tuple[str, int]]
    day_start_custody: list[tuple[str, int]]
    tree: bytes  # MerkleLog.snapshot()


# sorted keys: the dicts kept from records (sealed holders, requests, reconciliations) come out
# exactly as a replay decodes them from canonical JSON, whatever order the writer built them in
_ENCODER: Final = msgspec.msgpack.Encoder(order="sorted")
_DECODER: Final = msgspec.msgpack.Decoder(Payload)


@contextmanager
def _no_gc() -> Iterator[None]:
    """Millions of new containers, none of them garbage: no collection while building."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _mac(key: bytes | None, payload: bytes | memoryview) -> bytes:
    if key is None:
        return hashlib.sha256(payload).digest()
    return hmac.new(key, payload, hashlib.sha256).digest()


def _slots(obj: Any, names: tuple[str, ...]) -> list[Any]:
    return [getattr(obj, name) for name in names]


def _build(cls: type, names: tuple[str, ...], values: list[Any]) -> Any:
    if len(values) != len(names):
        raise SnapshotError(f"{cls.__name__}: {len(values)} values for {len(names)} slots")
    obj: Any = object.__new__(cls)
    for name, value in zip(names, values, strict=True):
        setattr(obj, name, value)
    return obj


# -- capture --------------------------------------------------------------------------------------


def capture(
    state: PlatformState,
    head: bytes,
    tree: MerkleLog,
    created_ms: int,
    key: bytes | None = None,
) -> bytes:
    """The snapshot body of a committed, quiescent state (no savepoint, tree == state)."""
    if state._sp is not None:
        raise SnapshotError("a linked batch is open")
    unknown = set(PlatformState.__slots__) - CAPTURED_SLOTS
    if unknown:
        raise SnapshotError(f"state slots not captured by this snapshot format: {sorted(unknown)}")
    position = state.next_seq
    if tree.size != position:
        raise SnapshotError(f"tree holds {tree.size} records, state {position}")
    with _no_gc():
        # Rows accepted since the last snapshot join the done table's base, in the live state:
        # the next capture costs only what is new, and the rows' postings, which their records
        # hold, leave memory. Atomic (a new base is swapped in) and invisible to lookups.
        base = state.done.freeze(os.urandom(DONE_KEY_LEN))
        if base.source is None:
            base.source = postings_reader(state, tree.fetch)
        payload = Payload(
            format=FORMAT,
            code=CODE_VERSION,
            platform=state.platform_id,
            position=position,
            head=head,
            created_ms=created_ms,
            next_seq=state.next_seq,
            last_ts_ms=state.last_ts_ms,
            created=state.created,
            gate=state.gate,
            policy=state.policy,
            day=state.day,
            totals=[(ccy, d, c) for ccy, (d, c) in state.totals_by_currency.items()],
            omnibus_ids=list(state.omnibus_ids),
            accounts=[_slots(a, Account.__slots__) for a in state.accounts.values()],
            holds=[_slots(h, Hold.__slots__) for h in state.holds.values()],
            pending_holds=list(state.pending_holds),
            requests=[_slots(r, PendingRequest.__slots__) for r in state.requests.values()],
            standing=[_slots(s, Standing.__slots__) for s in state.standing.values()],
            alerts=[_slots(a, Alert.__slots__) for a in state.alerts.values()],
            byteorder=sys.byteorder,
            done_key=base.key,
            done_kind_names=base.kind_names,
            done_cids=_bytes_view(base.cids),
            done_offsets=_bytes_view(base.offsets),
            done_fps=_bytes_view(base.fps),
            done_seqs=_bytes_view(base.seqs),
            done_kinds=_bytes_view(base.kinds),
            done_table=_bytes_view(base.table),
            done_reversed=sorted(base.reversed.items()),
            liabilities=[(a, size, seq) for (a, size), seq in state.liabilities.items()],
            reconciliations=list(state.reconciliations.items()),
            reconciliation_ids=sorted(state.reconciliation_ids),
            reconciliation_open=list(getattr(state, "reconciliation_open", {}).items()),
            nonces=[(a, n, exp) for (a, n), exp in state.nonces.items()],
            auth_failures=[(a, list(t)) for a, t in state.auth_failures.items()],
            day_counters=[(a, op, s, n) for (a, op), (s, n) in state.day_counters.items()],
            day_lvt=[(a, d, s) for (a, d), s in state.day_lvt.items()],
            day_outflow=list(state.day_outflow.items()),
            day_start_custody=list(state.day_start_custody.items()),
            tree=tree.snapshot(),
        )
        data = _ENCODER.encode(payload)
    return MAGIC + _mac(key, data) + data


def _bytes_view(column: Any) -> memoryview:
    return memoryview(column).cast("B")


def postings_reader(
    state: PlatformState, fetch: Fetch | None
) -> Callable[[int, str], list[list[Any]] | None] | None:
    """How a done row in the base gets its postings back: from its own stored record, folded
    exactly as `apply_record` did (`recorded_postings`). None without a store."""
    if fetch is None:
        return None

    def read(seq: int, kind: str) -> list[list[Any]] | None:
        data = fetch(seq, seq + 1)
        if len(data) != 1:
            raise StateError(f"record {seq} is not stored")
        rec = records.decode(data[0])
        if rec.get("seq") != seq or rec.get("kind") != kind:
            raise StateError(f"record {seq} is not the {kind} its done row names")
        return recorded_postings(state, rec)

    return read


# A full replay leaves every done row in the dict of new rows; the first capture would then
# move them all into the base under the platform lock (about 30 s at 10 M rows on a loaded
# 2-core machine). Past this many rows the load does it instead, before anything is served.
SETTLE_MIN_ROWS: Final = 1_000_000


def settle(state: PlatformState, tree: MerkleLog, min_rows: int | None = None) -> None:
    """After a full replay: move a big done table's rows into its compact base (`DoneBase`),
    dropping their postings from memory (read back from their records when a reversal needs
    them). Below `min_rows` (default SETTLE_MIN_ROWS) nothing happens: a capture does it."""
    limit = SETTLE_MIN_ROWS if min_rows is None else min_rows
    if state._sp is not None or len(state.done.rows) < max(limit, 1):
        return
    with _no_gc():
        base = state.done.freeze(os.urandom(DONE_KEY_LEN))
    if base.source is None:
        base.source = postings_reader(state, tree.fetch)


# -- restore --------------------------------------------------------------------------------------


def open_body(body: bytes, key: bytes | None = None) -> Payload:
    """Check the magic and MAC, decode, check format and code version. Raises SnapshotError."""
    if body.startswith(MAGIC_V1):
        raise SnapshotError("custody-snapshot/v1 is no longer read (a full replay follows)")
    if not body.startswith(MAGIC) or len(body) < len(MAGIC) + MAC_LEN:
        raise SnapshotError(f"not a {FORMAT} body")
    view = memoryview(body)
    mac = bytes(view[len(MAGIC) : len(MAGIC) + MAC_LEN])
    data = view[len(MAGIC) + MAC_LEN :]
    if not hmac.compare_digest(mac, _mac(key, data)):
        raise SnapshotError("digest does not match the snapshot body")
    try:
        with _no_gc():
            payload = _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotError(f"snapshot does not decode: {exc}") from None
    if payload.format != FORMAT:
        raise SnapshotError(f"unknown snapshot format {payload.format!r}")
    if payload.code != CODE_VERSION:
        raise SnapshotError("snapshot made by other code (fold or state layout changed)")
    if payload.position != payload.next_seq or payload.position < 1:
        raise SnapshotError("snapshot position and state disagree")
    if len(payload.head) != records.HASH_LEN:
        raise SnapshotError("chain head is not 32 bytes")
    if payload.byteorder != sys.byteorder:
        raise SnapshotError(f"snapshot made on a {payload.byteorder}-endian machine")
    return payload


def restore(payload: Payload, fetch: Fetch | None = None) -> tuple[PlatformState, MerkleLog]:
    """The live state and Merkle tree a snapshot describes. Raises SnapshotError."""
    try:
        with _no_gc():
            return _restore(payload, fetch)
    except SnapshotError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, struct.error) as exc:
        raise SnapshotError(f"snapshot is inconsistent: {exc!r}") from None


def _restore(p: Payload, fetch: Fetch | None) -> tuple[PlatformState, MerkleLog]:
    state = PlatformState(p.platform)
    state.next_seq = p.next_seq
    state.last_ts_ms = p.last_ts_ms
    state.created = p.created
    state.gate = p.gate
    state.policy = p.policy
    state.day = p.day
    state.totals_by_currency = {ccy: [d, c] for ccy, d, c in p.totals}

    accounts: dict[str, Account] = {}
    for values in p.accounts:
        account = _build(Account, Account.__slots__, values)
        account.kind = AccountKind(account.kind)
        account.status = AccountStatus(account.status)
        account.tokens = tuple(account.tokens)
        accounts[account.id] = account
    state.accounts = accounts
    for account_id in p.omnibus_ids:
        if accounts[account_id].kind is not AccountKind.OMNIBUS:
            raise SnapshotError(f"{account_id} is not an omnibus account")
    state.omnibus_ids = list(p.omnibus_ids)

    holds: dict[str, Hold] = {}
    for values in p.holds:
        hold = _build(Hold, Hold.__slots__, values)
        hold.status = HoldStatus(hold.status)
        holds[hold.id] = hold
    state.holds = holds
    state.pending_holds = {hold_id: holds[hold_id] for hold_id in p.pending_holds}
    if any(h.status is not HoldStatus.PENDING for h in state.pending_holds.values()) or sum(
        h.status is HoldStatus.PENDING for h in holds.values()
    ) != len(state.pending_holds):
        raise SnapshotError("pending holds disagree with hold statuses")

    state.requests = {
        r.id: r for r in (_build(PendingRequest, PendingRequest.__slots__, v) for v in p.requests)
    }
    state.standing = {
        s.id: s for s in (_build(Standing, Standing.__slots__, v) for v in p.standing)
    }
    state.alerts = {a.id: a for a in (_build(Alert, Alert.__slots__, v) for v in p.alerts)}

    base = DoneBase(
        p.done_key,
        p.done_kind_names,
        p.done_cids,
        p.done_offsets.cast("Q"),
        p.done_fps,
        p.done_seqs.cast("q"),
        p.done_kinds,
        p.done_table.cast("Q"),
        dict(p.done_reversed),
    )
    if len(base.reversed) != len(p.done_reversed) or any(
        base.find(cid) < 0 for cid in base.reversed
    ):
        raise SnapshotError("a reversed client id is not in the done table")
    base.source = postings_reader(state, fetch)
    state.done.base = base

    state.liabilities = {(a, size): seq for a, size, seq in p.liabilities}
    state.reconciliations = dict(p.reconciliations)
    state.reconciliation_ids = set(p.reconciliation_ids)
    if "reconciliation_open" in PlatformState.__slots__:
        state.reconciliation_open = {k: (v[0], v[1]) for k, v in p.reconciliation_open}  # type: ignore[attr-defined,unused-ignore]
    state.nonces = {(a, nonce): exp for a, nonce, exp in p.nonces}
    state.auth_failures = {a: tuple(times) for a, times in p.auth_failures}
    state.day_counters = {(a, op): (s, k) for a, op, s, k in p.day_counters}
    state.day_lvt = {(a, d): s for a, d, s in p.day_lvt}
    state.day_outflow = dict(p.day_outflow)
    state.day_start_custody = dict(p.day_start_custody)

    tree = MerkleLog.restore(p.tree, fetch)
    if tree.size != p.position:
        raise SnapshotError(f"tree holds {tree.size} records, snapshot claims {p.position}")
    return state, tree


# -- the table ------------------------------------------------------------------------------------


class SnapshotStore:
    """The `snapshots` table beside the log: (platform, position, part, created_ms, body).

    A snapshot is written in parts (PART_BYTES each, one transaction per part), then a marker
    row (part -1, body = the number of parts) in the last transaction, with the older complete
    snapshots beyond `keep` and any unfinished ones deleted. Only marked snapshots are listed,
    so one cut short by a crash is never read (its MAC would refuse it anyway). The log's table
    is never touched; snapshots are a cache of state the log determines.
    """

    def __init__(self, store: Any) -> None:
        self._datastore = store.datastore
        self._pg = bool(store.is_postgres)
        self._ph = "%s" if self._pg else "?"
        schema = getattr(self._datastore, "schema", "") if self._pg else ""
        self._table = f'"{schema}".{TABLE}' if schema else TABLE
        blob = "BYTEA" if self._pg else "BLOB"
        with self._datastore.transaction(commit=True) as cur:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} (platform TEXT NOT NULL, "
                "position BIGINT NOT NULL, part INTEGER NOT NULL, created_ms BIGINT NOT NULL, "
                f"body {blob} NOT NULL, PRIMARY KEY (platform, position, part))"
            )

    def save(
        self, platform_id: str, position: int, created_ms: int, body: bytes, keep: int
    ) -> None:
        assert keep >= 1
        ph = self._ph
        t = self._table
        view = memoryview(body)
        parts = [view[i : i + PART_BYTES] for i in range(0, len(body), PART_BYTES)] or [view]
        insert = (
            f"INSERT INTO {t} (platform, position, part, created_ms, body) "
            f"VALUES ({ph},{ph},{ph},{ph},{ph})"
        )
        with self._datastore.transaction(commit=True) as cur:
            # a snapshot at the same position (taken again) replaces the old one
            cur.execute(
                f"DELETE FROM {t} WHERE platform={ph} AND position={ph}", (platform_id, position)
            )
        for index, part in enumerate(parts):
            with self._datastore.transaction(commit=True) as cur:
                cur.execute(insert, (platform_id, position, index, created_ms, bytes(part)))
        with self._datastore.transaction(commit=True) as cur:
            count = len(parts).to_bytes(8, "big")
            cur.execute(insert, (platform_id, position, _COMPLETE_PART, created_ms, count))
            cur.execute(
                f"SELECT position, MIN(part) AS first FROM {t} WHERE platform={ph} "
                "GROUP BY position ORDER BY position DESC",
                (platform_id,),
            )
            found = [(_col(row, "position"), _col(row, "first")) for row in cur.fetchall()]
            complete = [pos for pos, first in found if first == _COMPLETE_PART]
            # only older unfinished ones: a newer one may be another save still in progress
            unfinished = [pos for pos, first in found if first != _COMPLETE_PART and pos < position]
            for old in complete[keep:] + unfinished:
                cur.execute(
                    f"DELETE FROM {t} WHERE platform={ph} AND position={ph}", (platform_id, old)
                )

    def positions(self, platform_id: str) -> list[int]:
        """Stored snapshot positions, newest first."""
        ph = self._ph
        with self._datastore.transaction(commit=False) as cur:
            cur.execute(
                f"SELECT position FROM {self._table} WHERE platform={ph} "
                f"AND part={_COMPLETE_PART} ORDER BY position DESC",
                (platform_id,),
            )
            return [int(_col(row, "position")) for row in cur.fetchall()]

    def body(self, platform_id: str, position: int) -> bytes:
        ph = self._ph
        with self._datastore.transaction(commit=False) as cur:
            cur.execute(
                f"SELECT part, body FROM {self._table} WHERE platform={ph} AND position={ph} "
                "ORDER BY part",
                (platform_id, position),
            )
            rows = cur.fetchall()
        parts = [_col(row, "part") for row in rows]
        if not parts or parts[0] != _COMPLETE_PART:
            raise SnapshotError("snapshot is unfinished")
        count = int.from_bytes(bytes(_col(rows[0], "body")), "big")
        if parts[1:] != list(range(count)):
            raise SnapshotError("snapshot parts are missing")
        return b"".join(bytes(_col(row, "body")) for row in rows[1:])

    def delete(self, platform_id: str) -> None:
        with self._datastore.transaction(commit=True) as cur:
            cur.execute(f"DELETE FROM {self._table} WHERE platform={self._ph}", (platform_id,))


def _col(row: Any, name: str) -> Any:
    return row[name]
