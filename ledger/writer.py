"""The single writer of one platform's log: decide, chain and commit many instructions at once.

Live state is in memory. An instruction is validated, checked for idempotent replay, planned,
run through the controls, turned into exactly one record, chained, and folded into the state;
a whole group of instructions from many callers then commits in ONE database transaction.
Nothing is acknowledged before that commit. If the commit fails, the in-memory state is rebuilt
from the store (it may be ahead of it) and every caller in the group gets an error.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
import psycopg
from eventsourcing import persistence as es_persistence

from controls.base import Proposal, Refusal
from controls.codes import Code
from controls.customer_authorisation import is_signature_failure, signer_account
from controls.customer_authorisation import payload as auth_payload
from controls.idempotency import Replay, classify, conflict_refusal
from controls.maker_checker import manual_op, needs_approval
from controls.policy import DAY_MS
from controls.registry import run_annotators, run_controls
from controls.roles import role_of
from ledger import commands as c
from ledger import metrics, records, snapshot
from ledger.decide import plan
from ledger.domain import PlatformState, StateError
from ledger.fold import apply_record
from ledger.merkle import MerkleLog, leaf_hash, store_fetcher
from ledger.pii import PiiError
from ledger.store import LedgerStore, NewRow, WriterClaim, WriterSuperseded, log_stream
from ledger.validate import InvalidInput, is_actor, validate

_log = logging.getLogger("ledger.writer")
# Failures of the connection itself, not answers of the database: a commit may have landed.
_CONNECTION_ERRORS: Final = (
    es_persistence.OperationalError,
    es_persistence.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
_ENCODE: Final = records.ENCODER.encode
_SHA256: Final = hashlib.sha256
_FINGERPRINT: Final = records.fingerprint
_REFUSED: Final = records.REFUSED_KIND
_KIND_BY_OP: Final = records.KIND_BY_OP
_PII_TYPES: Final = frozenset({c.OpenAccount, c.BindPayee})
_MAX_TRACKED_ACTORS: Final = 10_000  # per minute, for the refusal-record budget
# Only plain movements and account lifecycle may be linked (all or none); governance,
# approvals and customer-key changes stand alone, so a savepoint never has to undo them.
LINKABLE_TYPES: Final = frozenset(
    {
        c.OpenAccount,
        c.FreezeAccount,
        c.CloseAccount,
        c.Deposit,
        c.Transfer,
        c.ChargeFee,
        c.PlaceHold,
        c.CaptureHold,
        c.ReleaseHold,
        c.RequestWithdrawal,
        c.SettleWithdrawal,
        c.FailWithdrawal,
    }
)


def _invalid(cmd: c.Command, exc: InvalidInput) -> Outcome:
    return Outcome(
        getattr(cmd, "client_id", ""),
        "invalid",
        code=Code.INVALID_ARGUMENT,
        message=exc.message,
        field=exc.field,
    )


class Outcome(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the caller learns about one instruction, only after its record is durable."""

    client_id: str
    status: str  # accepted | pending (waits for a checker) | replayed | refused | invalid
    seq: int = -1
    kind: str = ""
    code: str = ""
    control: str = ""
    message: str = ""
    field: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("accepted", "replayed", "pending")


class Request(msgspec.Struct, frozen=True):
    """One caller's instructions; `linked` means all or none (an atomic batch)."""

    commands: Sequence[c.Command]
    actor: str
    linked: bool = False


class Prepared:
    """A decided group: its records (not yet stored) and the answers to give once they are."""

    __slots__ = ("answers", "epoch", "next_seq", "rows")

    def __init__(
        self, rows: list[NewRow], answers: list[list[Outcome]], next_seq: int, epoch: int
    ) -> None:
        self.rows = rows
        self.answers = answers
        self.next_seq = next_seq
        self.epoch = epoch


class ChainBroken(RuntimeError):
    """A stored record does not link to its predecessor: the log was altered."""


class CommitFailed(RuntimeError):
    """The group was not confirmed as stored. Either it certainly was not (a refused or earlier
    failed transaction: nothing happened), or, as `CommitOutcomeUnknown`, nobody can say here.
    Either way a retry with the same client ids is safe: it replays the stored result or
    decides the instructions anew."""


class CommitOutcomeUnknown(CommitFailed):
    """The connection failed during the group's transaction (dropped, reset, PostgreSQL
    restarted): the COMMIT may have landed without its answer arriving. The writer rebuilds
    from the store, so a retry with the same client ids learns the outcome (`replayed`)."""


class StoreUnavailable(CommitFailed):
    """The store cannot be read to rebuild the state; retry later (nothing was decided)."""


class WriterFenced(RuntimeError):
    """Another writer appended to this platform's log; this one must stop writing."""


class PlatformWriter:
    def __init__(
        self,
        store: LedgerStore,
        platform_id: str,
        *,
        sealer: Callable[[str, str], dict[str, str]] | None = None,
        blinder: Callable[[str, str], str] | None = None,
        clock_ms: Callable[[], int] | None = None,
        screener: Callable[[str], str] | None = None,
    ) -> None:
        self.store = store
        self.platform_id = platform_id
        self.stream = log_stream(platform_id)
        self.sealer = sealer
        self.blinder = blinder
        self.clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.screener = screener
        # refusal records per actor in the current minute: actor -> (written, suppressed)
        self._refusal_window = -1
        self._refusals: dict[str, tuple[int, int]] = {}
        self.state = PlatformState(platform_id)
        self.head = records.CHAIN_GENESIS
        # RFC 6962 tree over the same records, in the same order: the leaves of checkpoints and
        # proofs. It may run ahead of the store like the state; proofs use committed sizes only.
        self.tree = MerkleLog(store_fetcher(store, platform_id))
        self.fenced = False
        # (platform, server id, lease epoch) while this server holds the platform's write lease
        # (set by the service): every commit checks it in its transaction (WriterSuperseded)
        self.claim: WriterClaim | None = None
        self.epoch = 0
        self.committed_next_seq = 0  # next position after the last stored record
        self.prepared_next_seq = 0  # next position after the last successfully decided group
        self.dirty = False  # a prepare failed half-way: state must be rebuilt before use

    # -- startup --------------------------------------------------------------------------------

    # State snapshots (ledger/snapshot.py, docs/SNAPSHOTS.md). The service may set a key (then
    # snapshots are HMAC-SHA256 authenticated, so someone who can write the database cannot
    # forge a state), switch them off, or keep more than two.
    snapshot_key: bytes | None = None
    use_snapshots: bool = True
    snapshot_keep: int = snapshot.KEEP_DEFAULT
    snapshot_position = -1  # where the last load started: a snapshot's position, or -1

    def load(self, progress: Callable[[int], None] | None = None) -> None:
        """Rebuild the live state: from the newest usable snapshot plus the log's tail, or else
        by replaying (and re-chaining) every stored record.

        All or nothing: if reading or replaying fails, the previous state, chain head and tree
        are put back, so nobody is ever served a half-built (or empty) ledger. A snapshot that
        does not check out against the log (digest, chain head, position, version), or whose
        tail does not replay, is ignored with a warning: the full replay decides.
        """
        before = (self.state, self.head, self.tree, self.snapshot_position)
        try:
            self.snapshot_position = -1
            if not (self.use_snapshots and self._load_snapshot_and_tail(progress)):
                self.snapshot_position = -1
                self._reset()
                self._replay_from(-1, progress)
                snapshot.settle(self.state, self.tree)  # a big done table: compact it now
        except BaseException:
            self.state, self.head, self.tree, self.snapshot_position = before
            raise
        self.committed_next_seq = self.prepared_next_seq = self.state.next_seq

    def _reset(self) -> None:
        self.state = PlatformState(self.platform_id)
        self.head = records.CHAIN_GENESIS
        self.tree = MerkleLog(store_fetcher(self.store, self.platform_id))

    def _replay_from(self, after: int, progress: Callable[[int], None] | None) -> None:
        for seq, kind, packed in self.store.iter_rows(self.stream, after=after):
            self._replay_row(seq, kind, packed)
            if progress is not None and seq % 100_000 == 0:
                progress(seq)

    def _load_snapshot_and_tail(self, progress: Callable[[int], None] | None) -> bool:
        """Try the stored snapshots, newest first; True once one of them plus the tail loaded."""
        try:
            table = snapshot.SnapshotStore(self.store)
            positions = table.positions(self.platform_id)
            if not positions:
                return False
            last = self.store.last_row(self.stream)
        except Exception as exc:  # no snapshot table or unreadable: the log alone decides
            _log.warning("platform %s: snapshots unreadable (%s)", self.platform_id, exc)
            return False
        end = 0 if last is None else last[0] + 1
        for position in positions:
            if position > end:
                _log.error(
                    "platform %s: snapshot at %d is beyond the log's end %d: ignored (was the "
                    "log truncated?)",
                    self.platform_id,
                    position,
                    end,
                )
                continue
            try:
                self._restore_snapshot(table, position)
            except Exception as exc:
                _log.warning(
                    "platform %s: snapshot at %d not used: %s", self.platform_id, position, exc
                )
                continue
            try:
                self._replay_from(position - 1, progress)
            except Exception as exc:
                _log.warning(
                    "platform %s: the tail after the snapshot at %d does not replay (%s); "
                    "replaying the whole log",
                    self.platform_id,
                    position,
                    exc,
                )
                return False
            return True
        return False

    def _restore_snapshot(self, table: snapshot.SnapshotStore, position: int) -> None:
        """Load the snapshot at `position` after checking it against the stored log."""
        payload = snapshot.open_body(table.body(self.platform_id, position), self.snapshot_key)
        if payload.platform != self.platform_id or payload.position != position:
            raise snapshot.SnapshotError("snapshot is for another platform or position")
        rows = self.store.read(self.stream, after=position - 2, limit=1)
        if not rows or rows[0][0] != position - 1:
            raise snapshot.SnapshotError(f"record {position - 1} is not stored")
        stored_hash, data = records.unpack_state(rows[0][2])
        if stored_hash != payload.head:
            raise snapshot.SnapshotError(f"chain head differs from stored record {position - 1}")
        if records.decode(data).get("ts") != payload.last_ts_ms:
            raise snapshot.SnapshotError(f"time differs from stored record {position - 1}")
        state, tree = snapshot.restore(payload, store_fetcher(self.store, self.platform_id))
        if tree.leaf_hash_at(position - 1) != leaf_hash(data):
            raise snapshot.SnapshotError(f"Merkle leaf differs from stored record {position - 1}")
        self.state, self.head, self.tree = state, payload.head, tree
        self.snapshot_position = position

    def capture_snapshot(self) -> tuple[int, bytes] | None:
        """The snapshot body of the committed state, or None when none can be taken now.

        Caller: holds the platform lock, pipeline drained (nothing prepared and uncommitted).
        Costs about 1 µs per row added to the `done` table since the last capture (they move into
        its compact base) plus the encoding of the body (1.4-2.3 s at 10 M records, measured in
        docs/SNAPSHOTS.md); storing the body (`store_snapshot`) needs no lock.
        """
        if self.fenced or self.dirty or self.state._sp is not None:
            return None
        if self.committed_next_seq != self.prepared_next_seq:
            raise RuntimeError("pipeline not drained: a prepared group is not committed")
        state = self.state
        position = state.next_seq
        if position == 0 or position != self.committed_next_seq or self.tree.size != position:
            return None
        # `prepare` rolls the business day before a group's first record; if that group wrote
        # nothing, the state is in a day its log has not reached, which a replay would not
        # reproduce exactly (expired nonces are dropped at the roll). Wait for the next record.
        if (state.last_ts_ms + state.policy.day_offset_ms) // DAY_MS != state.day:
            return None
        created_ms = time.time_ns() // 1_000_000
        return position, snapshot.capture(
            state, self.head, self.tree, created_ms, self.snapshot_key
        )

    def store_snapshot(self, position: int, body: bytes) -> None:
        """Store a captured body (one transaction; keeps the newest `snapshot_keep`). No lock
        needed: the log's table is not touched and the body is immutable."""
        created_ms = time.time_ns() // 1_000_000
        table = snapshot.SnapshotStore(self.store)
        table.save(self.platform_id, position, created_ms, body, self.snapshot_keep)

    def save_snapshot(self) -> int | None:
        """Capture and store a snapshot; returns its position (None if none could be taken).

        Caller: holds the platform lock with the pipeline drained, for the whole call; to hold
        the lock only while capturing, call `capture_snapshot` under it and `store_snapshot`
        after releasing it.
        """
        captured = self.capture_snapshot()
        if captured is None:
            return None
        self.store_snapshot(*captured)
        return captured[0]

    def _replay_row(self, seq: int, kind: str, packed: bytes) -> None:
        if seq != self.state.next_seq:
            raise ChainBroken(
                f"platform {self.platform_id}: record {self.state.next_seq} is missing"
            )
        try:
            stored_hash, data = records.unpack_state(packed)
        except ValueError as exc:
            raise ChainBroken(f"platform {self.platform_id}: record {seq}: {exc}") from None
        head = _SHA256(self.head + data).digest()
        if head != stored_hash:
            raise ChainBroken(f"platform {self.platform_id}: chain broken at record {seq}")
        rec = records.decode(data)
        if rec.get("kind") != kind or rec.get("v") != records.RECORD_VERSION:
            raise ChainBroken(f"platform {self.platform_id}: record {seq} kind/version mismatch")
        fp = None
        if kind != _REFUSED:
            fp = _FINGERPRINT(_ENCODE(rec["cmd"]))
        apply_record(self.state, rec, fp)
        self.head = head
        self.tree.append(data)

    # -- the hot path ---------------------------------------------------------------------------

    def execute(self, requests: Sequence[Request]) -> list[list[Outcome]]:
        """Decide every request, commit all their records in one transaction, then answer.

        The caller must hold the platform's lock and no prepared group may be in flight.
        """
        prepared = self.prepare(requests)
        if prepared.rows:
            try:
                self.commit(prepared)
            except CommitFailed as exc:
                self.recover(exc.__cause__ or exc)
                raise
        self.mark_committed(prepared)
        return prepared.answers

    def mark_committed(self, prepared: Prepared) -> None:
        """After the group's transaction committed (caller holds the platform lock): its records
        join the Merkle tree, which therefore only ever holds stored records, so proofs and
        checkpoints at any size up to `committed_next_seq` never need an unstored one."""
        if prepared.rows:
            self.tree.extend(
                [
                    memoryview(row[3])[records.HASH_LEN :]
                    for row in prepared.rows
                    if row[0] == self.stream
                ]
            )
        else:  # nothing stored (e.g. only replays): not a commit, but its answers count
            metrics.observe_commit(prepared.answers, None)
        assert self.tree.size == prepared.next_seq, "tree and log disagree"
        self.committed_next_seq = prepared.next_seq

    def prepare(self, requests: Sequence[Request]) -> Prepared:
        """Decide a group: fold it into the live state and chain its records, without storing.

        The state now runs ahead of the store until `commit` succeeds; if it fails, `recover`
        rebuilds the state from the store and bumps the epoch so that every group prepared on
        top of the failed one is refused too.
        """
        if self.fenced:
            raise WriterFenced(f"writer for {self.platform_id} is fenced")
        if self.dirty:
            self.ensure_clean()
        for request in requests:
            if not is_actor(request.actor):
                raise ValueError("actor must be 1..128 printable characters")
        state = self.state
        ts = max(self.clock_ms(), state.last_ts_ms)
        # The controls must see today's tables even before today's first record; replay rolls
        # at that record, with the same result (nothing happened in between).
        state.roll_day(ts)
        rows: list[NewRow] = []
        answers: list[list[Outcome]] = []
        try:
            for request in requests:
                if request.linked:
                    answers.append(self._linked(request, ts, rows))
                else:
                    actor = request.actor
                    answers.append([self._one(cmd, actor, ts, rows) for cmd in request.commands])
        except BaseException:
            # A bug or an interrupt half-way through a group leaves the live state ahead of
            # anything decided: throw it away and rebuild from the store before the next group.
            self.dirty = True
            raise
        self.prepared_next_seq = state.next_seq
        return Prepared(rows, answers, state.next_seq, self.epoch)

    def ensure_clean(self) -> None:
        """Rebuild the state after a failed prepare. Caller: lock held, pipeline drained."""
        if not self.dirty:
            return
        assert self.committed_next_seq == self.prepared_next_seq, "pipeline not drained"
        self.epoch += 1
        try:
            self.load()
        except Exception as exc:
            raise StoreUnavailable(f"platform {self.platform_id}: cannot reload: {exc}") from exc
        self.dirty = False

    def commit(self, prepared: Prepared) -> None:
        """Store a prepared group in ONE database transaction. Safe outside the platform lock."""
        assert prepared.rows
        if prepared.epoch != self.epoch:
            raise CommitFailed(f"an earlier commit for platform {self.platform_id} failed")
        rows = prepared.rows
        if rows[0][2] == "platform_created":
            rows = [*rows, self.store.directory_entry(self.platform_id)]
        started = time.perf_counter()
        try:
            if self.claim is None:
                self.store.append(rows)
            else:
                self.store.append(rows, self.claim)
        except Exception as exc:
            metrics.observe_commit_failed()
            if isinstance(exc, _CONNECTION_ERRORS):
                raise CommitOutcomeUnknown(
                    f"platform {self.platform_id}: the connection failed during the commit"
                ) from exc
            raise CommitFailed(f"commit failed for platform {self.platform_id}") from exc
        metrics.observe_commit(prepared.answers, time.perf_counter() - started)

    def recover(self, exc: BaseException) -> None:
        """After a failed commit: rebuild from the store; fence if another writer took over."""
        from ledger.store import IntegrityError

        self.epoch += 1  # every group decided on top of the failed one fails with it
        self.prepared_next_seq = self.committed_next_seq
        if isinstance(exc, IntegrityError | WriterSuperseded):
            self.fenced = True  # someone else holds this log: stop, never fork it
        else:  # e.g. a dropped connection: its siblings in the pool are likely broken too
            self.store.discard_broken_connections()
        try:
            self.load()
            self.dirty = False
        except Exception:
            # The database is (still) away: keep nothing decided, and rebuild before the next
            # read or group; until then callers get StoreUnavailable and retry.
            self.dirty = True

    def _one(
        self, cmd: c.Command, actor: str, ts: int, rows: list[NewRow], linked: bool = False
    ) -> Outcome:
        """Decide one instruction: at most one record, appended to `rows` and folded into state."""
        try:
            validate(cmd)
        except InvalidInput as exc:
            return _invalid(cmd, exc)
        plain = cmd
        if type(cmd) in _PII_TYPES:
            try:
                cmd = self._blinded(cmd)
            except PiiError as exc:  # e.g. the subject's key was destroyed (erased person)
                return Outcome(
                    cmd.client_id,
                    "invalid",
                    code=Code.PERSONAL_DATA_UNAVAILABLE,
                    message=str(exc),
                    field="holder_name",
                )
        cmd_bytes = _ENCODE(cmd)
        fp = _FINGERPRINT(cmd_bytes)
        state = self.state
        cid = cmd.client_id
        replay = Replay.NEW if cid not in state.done else classify(state.done, cid, fp)
        if replay is not Replay.NEW:
            if replay is Replay.SAME:
                return self._replayed(cid)
            return self._refuse(cmd, cmd_bytes, conflict_refusal(cid), actor, ts, rows)
        planned = plan(state, cmd, ts)
        if type(planned) is Refusal:
            return self._refuse(cmd, cmd_bytes, planned, actor, ts, rows)
        proposal, effects = planned  # type: ignore[misc]
        proposal.actor = actor
        proposal.role = role_of(actor)
        proposal.ts = ts
        auth = getattr(cmd, "auth", None)
        if auth is not None and auth.signature:
            proposal.auth_payload = auth_payload(self.platform_id, msgspec.to_builtins(plain))
        if plain is not cmd:
            proposal.tokens = self._tokens(plain)
        policy = state.policy
        refusal = run_controls(state, proposal, policy)
        if refusal is not None:
            return self._refuse(cmd, cmd_bytes, refusal, actor, ts, rows, proposal)
        if type(cmd) is c.ApproveRequest:
            return self._execute_request(cmd, cmd_bytes, fp, proposal, actor, ts, rows)
        why = needs_approval(state, proposal, policy)
        if why is not None:
            if linked:
                refusal = Refusal(
                    Code.APPROVAL_REQUIRED, "maker_checker", f"{why}: not in a linked batch"
                )
                return self._refuse(cmd, cmd_bytes, refusal, actor, ts, rows)
            return self._request(cmd, cmd_bytes, fp, proposal, why, actor, ts, rows)
        self._add_personal_data(plain, proposal, effects)
        return self._accept(cmd, cmd_bytes, fp, proposal, effects, actor, ts, rows)

    def _replayed(self, cid: str) -> Outcome:
        """The answer to an instruction given again: what it did, or where its request is."""
        state = self.state
        done = state.done[cid]
        if done.kind != records.REQUESTED_KIND:
            return Outcome(cid, "replayed", done.seq, done.kind)
        request = state.requests[cid]
        if request.status == "pending":
            return Outcome(cid, "pending", done.seq, done.kind)
        if request.status == "approved":
            assert request.executed_by is not None
            executed = state.done[request.executed_by]
            return Outcome(cid, "replayed", executed.seq, executed.kind)
        return Outcome(
            cid,
            "refused",
            done.seq,
            done.kind,
            code=Code.REQUEST_REJECTED,
            control="maker_checker",
            message="a checker rejected this request",
        )

    def _accept(
        self,
        cmd: c.Command,
        cmd_bytes: bytes,
        fp: int,
        proposal: Proposal,
        effects: dict[str, Any],
        actor: str,
        ts: int,
        rows: list[NewRow],
    ) -> Outcome:
        state = self.state
        kind = _KIND_BY_OP[proposal.op]
        seq = state.next_seq
        rec: dict[str, Any] = {
            "v": 1,
            "platform": self.platform_id,
            "seq": seq,
            "ts": ts,
            "kind": kind,
            "cid": cmd.client_id,
            "actor": actor,
            "pv": state.policy.version,
            "cmd": msgspec.Raw(cmd_bytes),
        }
        rec.update(effects)
        if proposal.entries:
            tags = run_annotators(state, proposal, state.policy)
            if tags is not None:
                rec["tags"] = tags
        data = _ENCODE(rec)
        head = _SHA256(self.head + data).digest()
        rows.append((self.stream, seq, kind, head + data))
        self.head = head
        auth = getattr(cmd, "auth", None)
        if type(cmd) is c.OpenAccount or (auth is not None and auth.nonce):
            rec["cmd"] = msgspec.to_builtins(cmd, order="sorted")  # the state keeps facts (fold)
        apply_record(state, rec, fp)
        return Outcome(cmd.client_id, "accepted", seq, kind)

    def _request(
        self,
        cmd: c.Command,
        cmd_bytes: bytes,
        fp: int,
        proposal: Proposal,
        why: str,
        actor: str,
        ts: int,
        rows: list[NewRow],
    ) -> Outcome:
        """Record a manual operation as a pending request for a checker (maker-checker)."""
        state = self.state
        seq = state.next_seq
        rec: dict[str, Any] = {
            "v": 1,
            "platform": self.platform_id,
            "seq": seq,
            "ts": ts,
            "kind": records.REQUESTED_KIND,
            "cid": cmd.client_id,
            "actor": actor,
            "pv": state.policy.version,
            "cmd": msgspec.Raw(cmd_bytes),
            "request": {
                "id": cmd.client_id,
                "op": manual_op(state, proposal),
                "expires": ts + state.policy.approval_ttl_ms,
                "why": why,
            },
        }
        self._append(rec, records.REQUESTED_KIND, rows)
        rec["cmd"] = msgspec.to_builtins(cmd, order="sorted")
        apply_record(state, rec, fp)
        return Outcome(cmd.client_id, "pending", seq, records.REQUESTED_KIND)

    def _execute_request(
        self,
        cmd: c.ApproveRequest,
        cmd_bytes: bytes,
        fp: int,
        approval: Proposal,
        actor: str,
        ts: int,
        rows: list[NewRow],
    ) -> Outcome:
        """A checker approved: plan the maker's instruction again on today's state and run every
        control again (but not the maker-checker or the customer's consent, both given)."""
        state = self.state
        request = approval.request
        inner = msgspec.convert(request.cmd, c.AnyCommand)  # type: ignore[arg-type]
        planned = plan(state, inner, ts)
        if type(planned) is Refusal:
            return self._refuse(cmd, cmd_bytes, planned, actor, ts, rows)
        proposal, effects = planned  # type: ignore[misc]
        proposal.actor = request.maker
        proposal.role = role_of(request.maker)
        proposal.ts = ts
        proposal.executing = True
        refusal = run_controls(state, proposal, state.policy)
        if refusal is not None:
            return self._refuse(cmd, cmd_bytes, refusal, actor, ts, rows)
        effects["executes"] = request.id
        return self._accept(cmd, cmd_bytes, fp, proposal, effects, actor, ts, rows)

    def _refuse(
        self,
        cmd: c.Command,
        cmd_bytes: bytes,
        refusal: Refusal,
        actor: str,
        ts: int,
        rows: list[NewRow],
        proposal: Proposal | None = None,
        linked_to: str | None = None,
    ) -> Outcome:
        state = self.state
        suppressed = 0
        auth_failed = None
        if proposal is not None and is_signature_failure(refusal):
            auth_failed = signer_account(proposal)
        # a bad signature is always recorded: it counts towards the lock, which bounds them
        if linked_to is None and state._sp is None and auth_failed is None:
            suppressed = self._refusal_budget(actor, ts)
            if suppressed < 0:  # over the actor's budget: answered, counted, not recorded
                return Outcome(
                    cmd.client_id,
                    "refused",
                    kind=_REFUSED,
                    code=refusal.code.value,
                    control=refusal.control,
                    message=refusal.message,
                )
        rec: dict[str, Any] = {
            "v": 1,
            "platform": self.platform_id,
            "seq": state.next_seq,
            "ts": ts,
            "kind": _REFUSED,
            "cid": cmd.client_id,
            "actor": actor,
            "pv": state.policy.version,
            "cmd": msgspec.Raw(cmd_bytes),
            "code": refusal.code.value,
            "control": refusal.control,
            "message": refusal.message,
        }
        if linked_to is not None:
            rec["linked_to"] = linked_to
        if suppressed:
            rec["suppressed"] = suppressed
        if auth_failed is not None:
            rec["auth_failed"] = auth_failed
        self._append(rec, _REFUSED, rows)
        apply_record(state, rec, None)
        return Outcome(
            cmd.client_id,
            "refused",
            seq=rec["seq"],
            kind=_REFUSED,
            code=refusal.code.value,
            control=refusal.control,
            message=refusal.message,
        )

    def _refusal_budget(self, actor: str, ts: int) -> int:
        """Refusal records per actor per minute are capped by policy so that a misbehaving
        client cannot flood the log. Returns -1 to suppress this one, else how many were
        suppressed before it (recorded on it, so the log still accounts for them)."""
        window = ts // 60_000
        if window != self._refusal_window:
            self._refusal_window = window
            # a new minute: budgets restart, but suppressed counts wait for the next record
            self._refusals = {a: (0, n) for a, (_, n) in self._refusals.items() if n}
        known = self._refusals.get(actor)
        if known is None and len(self._refusals) >= _MAX_TRACKED_ACTORS:
            return 0  # cannot track more actors this minute: record rather than lose count
        written, suppressed = known or (0, 0)
        if written >= self.state.policy.refusal_records_per_min:
            self._refusals[actor] = (written, suppressed + 1)
            return -1
        self._refusals[actor] = (written + 1, 0)
        return suppressed

    def _append(self, rec: dict[str, Any], kind: str, rows: list[NewRow]) -> None:
        data = _ENCODE(rec)
        head = _SHA256(self.head + data).digest()
        rows.append((self.stream, rec["seq"], kind, head + data))
        self.head = head

    # -- linked batches -------------------------------------------------------------------------

    def _linked(self, request: Request, ts: int, rows: list[NewRow]) -> list[Outcome]:
        found = self._first_malformed(request.commands)
        if found is not None:  # a batch with a malformed item is not a batch: write nothing
            bad_index, malformed = found
            return [
                malformed
                if index == bad_index
                else Outcome(
                    getattr(cmd, "client_id", ""),
                    "invalid",
                    code=Code.LINKED_FAILED,
                    message="linked with a malformed instruction",
                )
                for index, cmd in enumerate(request.commands)
            ]
        state = self.state
        sp = state.savepoint()
        mark = len(rows)
        head_mark = self.head
        outcomes: list[Outcome] = []
        for cmd in request.commands:
            outcome = self._one(cmd, request.actor, ts, rows, linked=True)
            outcomes.append(outcome)
            if not outcome.ok:
                break
        else:
            state.release(sp)
            return outcomes
        state.rollback(sp)
        del rows[mark:]
        self.head = head_mark
        failed = outcomes[-1]
        if failed.status == "invalid":  # e.g. erased personal data: nothing is recorded
            return [
                failed
                if index == len(outcomes) - 1
                else Outcome(
                    getattr(cmd, "client_id", ""),
                    "invalid",
                    code=Code.LINKED_FAILED,
                    message=f"linked with invalid instruction {failed.client_id!r}",
                )
                for index, cmd in enumerate(request.commands)
            ]
        return self._refuse_linked(request, len(outcomes) - 1, failed, ts, rows)

    @staticmethod
    def _first_malformed(commands: Sequence[c.Command]) -> tuple[int, Outcome] | None:
        """The index and `invalid` answer of the first malformed item, if any. A client id
        repeated inside one linked batch is malformed: the batch cannot be all-or-none."""
        seen: set[str] = set()
        for index, cmd in enumerate(commands):
            try:
                validate(cmd)
                if type(cmd) not in LINKABLE_TYPES:
                    raise InvalidInput("op", "cannot be part of a linked batch")
                if cmd.client_id in seen:
                    raise InvalidInput("client_id", "repeated inside a linked batch")
                seen.add(cmd.client_id)
            except InvalidInput as exc:
                return index, Outcome(
                    getattr(cmd, "client_id", ""),
                    "invalid",
                    code=Code.INVALID_ARGUMENT,
                    message=exc.message,
                    field=exc.field,
                )
        return None

    def _refuse_linked(
        self, request: Request, failed_index: int, failed: Outcome, ts: int, rows: list[NewRow]
    ) -> list[Outcome]:
        """Record the cause for the failing item and LINKED_FAILED for every other item.

        An item that was already accepted before this batch (same client id, same content)
        keeps its original answer and gets no record: it happened, whatever this batch did.
        """
        assert failed.status == "refused", "malformed items are caught before deciding"
        outcomes: list[Outcome] = []
        for index, cmd in enumerate(request.commands):
            try:
                blinded = self._blinded(cmd)
            except PiiError as exc:  # cannot be recorded without its personal data's key
                outcomes.append(
                    Outcome(
                        cmd.client_id,
                        "invalid",
                        code=Code.PERSONAL_DATA_UNAVAILABLE,
                        message=str(exc),
                        field="holder_name",
                    )
                )
                continue
            cmd_bytes = _ENCODE(blinded)
            done = self.state.done.get(cmd.client_id)
            if done is not None and done.fingerprint == _FINGERPRINT(cmd_bytes):
                outcomes.append(Outcome(cmd.client_id, "replayed", done.seq, done.kind))
                continue
            if index == failed_index:
                refusal = Refusal(Code(failed.code), failed.control, failed.message)
                outcomes.append(self._refuse(blinded, cmd_bytes, refusal, request.actor, ts, rows))
                continue
            refusal = Refusal(
                Code.LINKED_FAILED,
                "linked_batch",
                f"linked instruction {failed.client_id!r} was refused",
            )
            outcomes.append(
                self._refuse(
                    blinded,
                    cmd_bytes,
                    refusal,
                    request.actor,
                    ts,
                    rows,
                    linked_to=failed.client_id,
                )
            )
        return outcomes

    # -- personal data --------------------------------------------------------------------------

    def _blinded(self, cmd: c.Command) -> c.Command:
        """Replace personal data in the instruction by a keyed blind before it is recorded."""
        if isinstance(cmd, c.OpenAccount) and cmd.holder_name is not None:
            blind = self._blinder()
            return msgspec.structs.replace(cmd, holder_name=blind(cmd.account_id, cmd.holder_name))
        if isinstance(cmd, c.BindPayee):
            blind = self._blinder()
            return msgspec.structs.replace(
                cmd,
                bank_account=blind(cmd.account_id, cmd.bank_account),
                holder_name=blind(cmd.account_id, cmd.holder_name),
            )
        return cmd

    def _blinder(self) -> Callable[[str, str], str]:
        if self.blinder is None or self.sealer is None:
            raise StateError("personal data needs the PII vault")
        return self.blinder

    def _tokens(self, plain: c.Command) -> tuple[str, ...]:
        """Screening tokens of the personal data a command brings (names, bank accounts)."""
        if self.screener is None:
            return ()
        if isinstance(plain, c.OpenAccount) and plain.holder_name is not None:
            return (self.screener(plain.holder_name),)
        if isinstance(plain, c.BindPayee):
            return (self.screener(plain.bank_account),)
        return ()

    def _add_personal_data(
        self, plain: c.Command, proposal: Proposal, effects: dict[str, Any]
    ) -> None:
        """Sealed personal data and screening tokens join the accepted record's effects."""
        if isinstance(plain, c.OpenAccount) and plain.holder_name is not None:
            effects["account"]["holder"] = self._seal(plain.account_id, plain.holder_name)
            if proposal.tokens:
                effects["account"]["screen"] = list(proposal.tokens)
        elif isinstance(plain, c.BindPayee):
            effects["payee"]["bank"] = self._seal(plain.account_id, plain.bank_account)
            if proposal.tokens:
                effects["payee"]["screen"] = proposal.tokens[0]

    def _seal(self, subject: str, plaintext: str) -> dict[str, str]:
        assert self.sealer is not None
        return self.sealer(subject, plaintext)


def verify_stored_chain(store: LedgerStore, platform_id: str) -> tuple[int, int | None, str]:
    """Walk a platform's stored chain. Returns (records checked, first bad position, reason)."""
    head = records.CHAIN_GENESIS
    expected = 0
    count = 0
    for seq, kind, packed in store.iter_rows(log_stream(platform_id)):
        if seq != expected:
            return count, expected, f"position {expected} missing (next stored is {seq})"
        try:
            stored_hash, data = records.unpack_state(packed)
        except ValueError as exc:
            return count, seq, str(exc)
        head = _SHA256(head + data).digest()
        if head != stored_hash:
            return count, seq, "chain link does not match the record and its predecessor"
        try:
            rec = records.decode(data)
        except (ValueError, msgspec.DecodeError) as exc:
            return count, seq, f"record does not decode: {exc}"
        if rec.get("seq") != seq or rec.get("kind") != kind or rec.get("platform") != platform_id:
            return count, seq, "record position, kind or platform differs from where it is stored"
        expected += 1
        count += 1
    return count, None, "ok"
